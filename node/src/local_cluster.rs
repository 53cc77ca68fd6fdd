//! Several full nodes in one process on 127.0.0.1, for the demo and the
//! benchmarks: each with its own store, identity and libp2p swarm.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use causeway_engine::replication::ids::{ClusterId, Region};
use causeway_engine::{Engine, EngineConfig};
use libp2p::Multiaddr;

use crate::cluster_key::ClusterKey;
use crate::network::PeerState;
use crate::{identity, Node, NodeConfig, NodeHandle};

/// One node of a local cluster.
pub struct LocalNode {
    /// Its region.
    pub region: String,
    /// Its engine.
    pub engine: Engine,
    /// Its networking layer.
    pub node: NodeHandle,
    /// Where peers dial it.
    pub addrs: Vec<Multiaddr>,
}

/// Starts a node of `cluster` in `region`, with its store and identity in
/// `root/region`, holding `key`, dialling `bootstrap`.
pub async fn start_node(
    root: &Path,
    cluster: &ClusterId,
    key: ClusterKey,
    region: &str,
    bootstrap: &[Multiaddr],
) -> Result<LocalNode> {
    let dir = root.join(region);
    let engine = Engine::open(dir.join("store"), EngineConfig::default())?;
    let (identity, _) = identity::load_or_create(&dir)?;
    let mut config = NodeConfig::loopback(Region::new(region)?, cluster.clone());
    config.bootstrap = bootstrap.to_vec();
    config.cluster_key = Some(key);
    let node = Node::start(engine.clone(), identity, config)?;
    let addrs = node.listen_addrs(Duration::from_secs(5)).await?;
    Ok(LocalNode {
        region: region.to_string(),
        engine,
        node,
        addrs,
    })
}

/// Starts one node per region, all holding the cluster key in
/// `root/cluster.key` (created on first use); every node after the first is
/// given only the first as its bootstrap peer (the rest is discovery).
pub async fn start(root: &Path, cluster: &ClusterId, regions: &[&str]) -> Result<Vec<LocalNode>> {
    let key = cluster_key(root)?;
    let mut nodes: Vec<LocalNode> = Vec::new();
    for region in regions {
        let bootstrap = nodes.first().map(|n| n.addrs.clone()).unwrap_or_default();
        nodes.push(start_node(root, cluster, key, region, &bootstrap).await?);
    }
    Ok(nodes)
}

/// The cluster key in `root/cluster.key`, created there if there is none.
pub fn cluster_key(root: &Path) -> Result<ClusterKey> {
    let path = root.join("cluster.key");
    if path.exists() {
        return Ok(ClusterKey::load(&path)?);
    }
    std::fs::create_dir_all(root)?;
    let key = ClusterKey::generate()?;
    key.create(&path)?;
    Ok(key)
}

/// Waits until every node replicates with every other; returns how long
/// that took.
pub async fn await_mesh(nodes: &[LocalNode], timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let mut done = true;
        for n in nodes {
            let status = n.node.status().await?;
            let replicating = status
                .peers
                .iter()
                .filter(|p| p.state == PeerState::Replicating)
                .count();
            done &= replicating + 1 == nodes.len();
        }
        if done {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("the nodes did not all connect within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Shuts every node down.
pub async fn shutdown(nodes: &[LocalNode]) -> Result<()> {
    for n in nodes {
        n.node.shutdown().await?;
    }
    Ok(())
}
