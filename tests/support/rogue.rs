//! A hostile cluster member for tests: the node library's
//! [`causeway_lab::chaos::byzantine::Rogue`] (it holds the cluster key and
//! sends whatever the test makes), with blocking calls over a runtime of
//! its own.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use causeway_engine::replication::ids::{ClusterId, NodeId};
use causeway_engine::replication::wire::{Envelope, Message};
use causeway_lab::chaos::byzantine;
use causeway_node::cluster_key::ClusterKey;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;

/// A connected hostile member.
pub struct Rogue {
    rt: tokio::runtime::Runtime,
    inner: byzantine::Rogue,
}

impl Rogue {
    /// Connects to the node listening on `addr` (ending in `/p2p/<id>`) as
    /// a fresh identity, holding the key in `key_file`; with `gossip`,
    /// waits until the node takes its gossip.
    pub fn connect(key_file: &Path, cluster: &str, addr: &str, gossip: bool) -> Rogue {
        Self::connect_as(Keypair::generate_ed25519(), key_file, cluster, addr, gossip)
    }

    /// [`Rogue::connect`] as `identity`.
    pub fn connect_as(
        identity: Keypair,
        key_file: &Path,
        cluster: &str,
        addr: &str,
        gossip: bool,
    ) -> Rogue {
        Self::try_connect_as(identity, key_file, cluster, addr, gossip)
            .unwrap_or_else(|e| panic!("the rogue could not connect: {e}"))
    }

    /// [`Rogue::connect_as`], or why the node would not have it.
    pub fn try_connect_as(
        identity: Keypair,
        key_file: &Path,
        cluster: &str,
        addr: &str,
        gossip: bool,
    ) -> Result<Rogue, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let key = ClusterKey::load(key_file).unwrap();
        let cluster = ClusterId::new(cluster).unwrap();
        let addr = Multiaddr::from_str(addr).unwrap();
        let inner = rt.block_on(byzantine::Rogue::connect(
            identity, key, &cluster, &addr, gossip,
        ))?;
        Ok(Rogue { rt, inner })
    }

    /// Its name in the replication protocol.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id()
    }

    /// `message` in an envelope of the cluster.
    pub fn envelope(&self, message: Message) -> Vec<u8> {
        self.inner.envelope(message)
    }

    /// Sends a direct message to the target; whether it was accepted.
    pub fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.rt.block_on(self.inner.send(bytes))
    }

    /// Publishes `bytes` by gossip (signed by this identity) and lets the
    /// swarm send it.
    pub fn publish(&mut self, bytes: Vec<u8>) {
        {
            let _context = self.rt.enter();
            self.inner
                .publish(bytes)
                .expect("the target takes this rogue's gossip");
        }
        self.pump(Duration::from_millis(200));
    }

    /// Drives the swarm for `d`; returns the envelopes received by gossip.
    pub fn pump(&mut self, d: Duration) -> Vec<Envelope> {
        self.rt.block_on(self.inner.pump(d))
    }

    /// Whether the target is still connected.
    pub fn connected(&self) -> bool {
        self.inner.connected()
    }

    /// Closes the connection and waits until it is closed.
    pub fn disconnect(self) {
        let Rogue { rt, inner } = self;
        rt.block_on(inner.disconnect());
    }
}
