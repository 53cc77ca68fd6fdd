//! The libp2p part of `bench lag`'s path, measured alone: three swarms
//! built as the nodes build theirs ([`build_swarm`]: TCP with the cluster
//! key's handshake, Noise, yamux, and gossipsub signing every message and
//! checking every signature, with the nodes' configuration), each driven by
//! a thread of its own on the nodes' runtime
//! ([`runtime`](causeway_node::network::runtime)) as a node's networking
//! task is, with no engine and no replication core behind them.
//!
//! A publishes each of the benchmark's own deltas (the envelope a node
//! gossips for each write: its origin, region, document, change and
//! heads). A delta is timed from the moment the benchmark's thread asks A
//! to publish it to the moment that thread hears B's (or C's) gossipsub
//! event, as lag is timed from A's acknowledgement to the moment the
//! benchmark's thread hears B's (or C's) engine event. Receivers do not
//! forward what they hear, so each receives one copy: the figure is the
//! least this stack takes. What lag takes beyond it, the receivers' fsyncs
//! and Automerge's apply is Causeway's own code, or the nodes contending
//! for the machine's cores.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use causeway_engine::replication::ids::{ClusterId, NodeId, Region};
use causeway_engine::replication::wire::{
    Bytes, Delta, Envelope, Heads, Message, GOSSIP_FORMAT_VERSION,
};
use causeway_engine::DocId;
use causeway_node::cluster_key::ClusterKey;
use causeway_node::identity::node_id;
use causeway_node::network::behaviour::{build_swarm, Behaviour, BehaviourEvent, Protocols};
use causeway_node::NodeConfig;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, Multiaddr, Swarm};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

/// How long the swarms may take to connect and form their gossip mesh.
const MESH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one delta may take to reach both receivers.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the benchmark's thread asks of a swarm's thread.
enum Command {
    /// Dial this address.
    Dial(Multiaddr),
    /// Publish these bytes on the cluster's topic.
    Publish(Vec<u8>),
    /// Report how many peers the swarm's gossip mesh holds for the topic.
    MeshPeers(std_mpsc::Sender<usize>),
}

/// One swarm's thread and how to reach it.
struct Peer {
    commands: mpsc::UnboundedSender<Command>,
    thread: std::thread::JoinHandle<Result<()>>,
}

/// The time each of `changes` (a document's changes, one per write, in
/// order), gossiped as a node gossips a write's delta from A, takes to reach
/// B and to reach C: two samples per change, `pause` apart.
pub(super) fn gossip_times(changes: &[Vec<u8>], pause: Duration) -> Result<Vec<Duration>> {
    let cluster = ClusterId::new("bench")?;
    let key = ClusterKey::generate()?;
    let regions = ["eu-west", "us-east", "ap-south"];
    let (heard_tx, heard) = std_mpsc::channel();
    let mut peers = Vec::new();
    let mut addrs = Vec::new();
    let mut origin = None;
    for (i, region) in regions.iter().enumerate() {
        let identity = Keypair::generate_ed25519();
        if i == 0 {
            origin = Some(node_id(&identity.public().to_peer_id()));
        }
        let mut config = NodeConfig::loopback(Region::new(*region)?, cluster.clone());
        config.cluster_key = Some(key);
        // A publishes and hears nothing; B and C report what they hear.
        let heard = (i > 0).then(|| heard_tx.clone());
        let (peer, addr) = spawn(identity, &config, heard)?;
        addrs.push(addr);
        peers.push(peer);
    }
    drop(heard_tx);
    let origin = origin.context("no origin")?;
    // Each dials every swarm started before it, as a full mesh.
    for (i, peer) in peers.iter().enumerate() {
        for addr in &addrs[..i] {
            send(peer, Command::Dial(addr.clone()))?;
        }
    }
    await_mesh(&peers, regions.len() - 1)?;
    let deltas = deltas(&cluster, &origin, regions[0], changes)?;
    let mut times = Vec::with_capacity(2 * deltas.len());
    let result = (|| -> Result<()> {
        for delta in deltas {
            std::thread::sleep(pause);
            let asked = Instant::now();
            send(&peers[0], Command::Publish(delta.clone()))?;
            for _ in 1..regions.len() {
                let data = heard
                    .recv_timeout(DELIVERY_TIMEOUT)
                    .context("a delta did not reach both receivers within 10 s")?;
                times.push(asked.elapsed());
                if data != delta {
                    bail!("a receiver heard another message than the one published");
                }
            }
        }
        Ok(())
    })();
    let mut threads = Vec::new();
    for peer in peers {
        drop(peer.commands);
        threads.push(peer.thread);
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow!("a swarm's thread panicked"))??;
    }
    result.map(|()| times)
}

/// The envelope a node gossips for each of `changes`: one delta each, with
/// the change's own hash as the heads (the document's history is linear).
fn deltas(
    cluster: &ClusterId,
    origin: &NodeId,
    region: &str,
    changes: &[Vec<u8>],
) -> Result<Vec<Vec<u8>>> {
    let doc = DocId::new("bench/lag")?;
    let region = Region::new(region)?;
    changes
        .iter()
        .map(|bytes| {
            let change = automerge::Change::from_bytes(bytes.clone())
                .context("the benchmark's own changes do not decode")?;
            let envelope = Envelope {
                cluster: cluster.clone(),
                message: Message::Delta(Delta {
                    origin: origin.clone(),
                    region: region.clone(),
                    doc: doc.clone(),
                    changes: vec![Bytes(bytes.clone())],
                    heads: Heads::new(&[change.hash()]),
                }),
            };
            Ok(envelope.encode_at(GOSSIP_FORMAT_VERSION))
        })
        .collect()
}

fn send(peer: &Peer, command: Command) -> Result<()> {
    peer.commands
        .send(command)
        .map_err(|_| anyhow!("a swarm's thread stopped"))
}

/// Waits until every swarm's gossip mesh holds `others` peers.
fn await_mesh(peers: &[Peer], others: usize) -> Result<()> {
    let start = Instant::now();
    loop {
        let mut formed = true;
        for peer in peers {
            let (tx, rx) = std_mpsc::channel();
            send(peer, Command::MeshPeers(tx))?;
            formed &= rx.recv()? == others;
        }
        if formed {
            return Ok(());
        }
        if start.elapsed() > MESH_TIMEOUT {
            bail!("the swarms did not form a gossip mesh within {MESH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds a swarm for `config` under `identity` on a thread of its own,
/// listening; returns it with its listening address. If `heard` is given,
/// the data of every gossip message the swarm receives goes there.
fn spawn(
    identity: Keypair,
    config: &NodeConfig,
    heard: Option<std_mpsc::Sender<Vec<u8>>>,
) -> Result<(Peer, Multiaddr)> {
    let protocols = Protocols::new(&config.cluster)?;
    let runtime = causeway_node::network::runtime()?;
    let mut swarm = {
        let _context = runtime.enter();
        build_swarm(identity, config, &protocols, &mut Registry::default())?
    };
    for addr in &config.listen {
        swarm.listen_on(addr.clone())?;
    }
    let (commands, inbox) = mpsc::unbounded_channel();
    let (addr_tx, addr_rx) = std_mpsc::channel();
    let topic = protocols.topic.clone();
    let thread = std::thread::Builder::new()
        .name("bench-gossip".into())
        .spawn(move || runtime.block_on(drive(swarm, topic, inbox, addr_tx, heard)))?;
    let addr = addr_rx
        .recv_timeout(MESH_TIMEOUT)
        .context("a swarm did not start listening")?;
    Ok((Peer { commands, thread }, addr))
}

/// A swarm's thread: takes commands until the benchmark drops its sender,
/// reports its first listening address, and reports every gossip message
/// it hears. It does not forward them: a node forwards a delta only once it
/// applied and synced it, after the moment lag measures, and copies
/// forwarded at once would reach the other receiver and cost it a
/// signature check inside this measurement.
async fn drive(
    mut swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    mut commands: mpsc::UnboundedReceiver<Command>,
    listening: std_mpsc::Sender<Multiaddr>,
    heard: Option<std_mpsc::Sender<Vec<u8>>>,
) -> Result<()> {
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    // Only the first is awaited; later ones have no reader.
                    let _ = listening.send(address);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                    propagation_source,
                    message_id,
                    message,
                })) => {
                    // Not forwarded: no duplicate reaches the other
                    // receiver, so this is the least the stack takes.
                    swarm.behaviour_mut().gossip.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Ignore,
                    );
                    if let Some(heard) = &heard {
                        // The benchmark stops listening only once it failed.
                        let _ = heard.send(message.data);
                    }
                }
                _ => {}
            },
            command = commands.recv() => match command {
                Some(Command::Dial(addr)) => swarm.dial(addr)?,
                Some(Command::Publish(bytes)) => {
                    swarm.behaviour_mut().gossip.publish(topic.clone(), bytes)?;
                }
                Some(Command::MeshPeers(reply)) => {
                    let n = swarm.behaviour().gossip.mesh_peers(&topic.hash()).count();
                    let _ = reply.send(n);
                }
                None => return Ok(()),
            },
        }
    }
}
