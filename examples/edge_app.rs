//! An edge app that is a Causeway peer itself: it embeds the engine and the
//! networking layer, keeps writing while its regional node is unreachable,
//! and converges with it when the region comes back.
//!
//! The regional node runs in this process too (its own store, identity and
//! libp2p swarm on 127.0.0.1); stopping it makes it unreachable exactly as a
//! network outage would. Run with:
//!
//! ```text
//! cargo run --example edge_app
//! ```

use std::time::{Duration, Instant};

use causeway_engine::replication::ids::{ClusterId, Region};
use causeway_engine::{DocId, Engine, EngineConfig};
use causeway_node::{identity, Node, NodeConfig, NodeHandle};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let cluster = ClusterId::new("shop")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let region_addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse()?;

    // The regional node, listening on a fixed port so it can come back there.
    let region_engine = Engine::open(dir.path().join("region/store"), EngineConfig::default())?;
    let start_region = |engine: Engine| -> Result<NodeHandle, Box<dyn std::error::Error>> {
        let (key, _) = identity::load_or_create(&dir.path().join("region"))?;
        let mut config = NodeConfig::loopback(Region::new("eu-west")?, cluster.clone());
        config.listen = vec![region_addr.clone()];
        Ok(Node::start(engine, key, config)?)
    };
    let region = start_region(region_engine.clone())?;
    region.listen_addrs(Duration::from_secs(5)).await?;

    // The edge app: its own store and identity, the region as bootstrap peer.
    let till = Engine::open(dir.path().join("till/store"), EngineConfig::default())?;
    let (key, _) = identity::load_or_create(&dir.path().join("till"))?;
    let mut config = NodeConfig::loopback(Region::new("store-12")?, cluster.clone());
    config.bootstrap = vec![region_addr.clone()];
    let edge = Node::start(till.clone(), key, config)?;

    let day = DocId::new("store-12/sales/2026-11-24")?;
    till.merge_json(&day, &json!({"sales": {"s1": 350}}))?;
    let t = converge(&till, &region_engine, &day).await?;
    println!(
        "online: sale s1 reached the region in {:.0} ms",
        t.as_secs_f64() * 1e3
    );

    region.shutdown().await?;
    println!("the regional node is unreachable");
    for (sale, cents) in [("s2", 420), ("s3", 180)] {
        till.merge_json(&day, &json!({"sales": {sale: cents}}))?;
        println!("offline: recorded sale {sale} (durable on the till)");
    }
    region_engine.merge_json(&day, &json!({"prices_updated": true}))?;
    println!("meanwhile the region updated prices");

    let region = start_region(region_engine.clone())?;
    let t = converge(&till, &region_engine, &day).await?;
    println!(
        "the region is back: converged {:.0} ms after it restarted",
        t.as_secs_f64() * 1e3
    );
    println!("{}", serde_json::to_string_pretty(&till.get_json(&day)?)?);
    edge.shutdown().await?;
    region.shutdown().await?;
    Ok(())
}

/// Waits until both engines hold the same heads of `doc`.
async fn converge(
    a: &Engine,
    b: &Engine,
    doc: &DocId,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    while b.heads(doc).ok() != Some(a.heads(doc)?) {
        if start.elapsed() > Duration::from_secs(30) {
            return Err("no convergence within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(start.elapsed())
}
