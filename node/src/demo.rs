//! `causeway demo`: three nodes in three regions on loopback, a partition,
//! and convergence measured on both sides of it.
//!
//! Each node is a full peer (its own RocksDB store, identity and libp2p
//! swarm on 127.0.0.1), run in this process. Only the first node is given as
//! bootstrap peer; the others find each other through discovery. The demo
//! writes in every region, waits for convergence, cuts one region off by
//! blocking its peers in each node's connection layer, keeps writing on
//! both sides, heals, and waits again. Along the way a client carries a
//! session token from one region to another: once while connected (the read
//! there waits until it holds the client's write), once across the cut (the
//! read answers "not yet" instead of stale data, and succeeds after the
//! heal), and asks for a write to reach two other regions during the cut.
//! It exits 0 only if every replica ends identical and holds every write and
//! every token read behaved as documented.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use causeway_engine::replication::ids::ClusterId;
use causeway_engine::{DocId, SessionToken};
use serde_json::{json, Value};

use crate::local_cluster::{self, LocalNode as Replica};
use crate::network::RegionNeed;

/// How long the demo waits for any one convergence before failing.
pub const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(20);

/// The regions of the demo, in start order.
pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// Runs the demo with stores in `dir`, or in a fresh temporary directory.
pub async fn run(dir: Option<PathBuf>) -> Result<()> {
    let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let root = dir.unwrap_or_else(|| temp.path().to_path_buf());
    let doc = DocId::new("demo/incident-42")?;
    let replicas = local_cluster::start(&root, &ClusterId::new("demo")?, &REGIONS).await?;
    say(format!("stores in {}", root.display()));
    for r in &replicas {
        say(format!(
            "{}: node {} listening on {}",
            r.region,
            r.node.peer_id(),
            r.addrs[0]
        ));
    }
    let took = local_cluster::await_mesh(&replicas, CONVERGENCE_TIMEOUT).await?;
    say(format!(
        "full mesh after {:.0} ms ({} and {} were given only {}'s address and found each other by discovery)",
        ms(took), REGIONS[1], REGIONS[2], REGIONS[0]
    ));

    // Concurrently creating the same nested map in several places leaves one
    // of them visible (Automerge's rule for conflicting puts of one key), so
    // the document and its `notes` map are created once, then shared.
    replicas[0].engine.put_json(
        &doc,
        &json!({"title": "disk latency in eu-west", "notes": {}}),
    )?;
    let took = converge(&replicas, &doc, 0).await?;
    say(format!(
        "{} created the document; every region had it {:.0} ms later",
        replicas[0].region,
        ms(took)
    ));
    for r in &replicas {
        write(r, &doc, &format!("{}-1", r.region))?;
    }
    say("wrote one note in each region at the same time");
    let took = converge(&replicas, &doc, 3).await?;
    say(format!(
        "converged in {:.0} ms: every region holds all 3 notes",
        ms(took)
    ));

    carry_token(&replicas[0], &replicas[1], &doc).await?;
    write_through_a_partition(&replicas, &doc).await?;
    let replicas = lose_a_disk_and_restore(replicas, &root, &doc).await?;
    let value = replicas[0].engine.get_json(&doc)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    local_cluster::shutdown(&replicas).await?;
    say("all replicas converged; nodes shut down cleanly");
    Ok(())
}

/// Backs the last region up while it runs, writes on, stops it and wipes
/// its store, restores the backup and starts it again: it comes back with
/// a new store id and gets what was written after the backup from its
/// peers.
async fn lose_a_disk_and_restore(
    mut replicas: Vec<Replica>,
    root: &std::path::Path,
    doc: &DocId,
) -> Result<Vec<Replica>> {
    let lost = replicas.pop().context("three replicas")?;
    let (region, notes_before) = (lost.region.clone(), notes(&lost, doc)?);
    let backup_dir = root.join(format!("backup-{region}"));
    let node = Some((lost.node.peer_id().to_string(), region.clone()));
    let taken = crate::backup::take_from_engine(&lost.engine, &backup_dir, None, node)?;
    say(format!(
        "backed up {region} while it ran: {} documents, {} bytes, verified, in {}",
        taken.documents,
        taken.bytes,
        backup_dir.display()
    ));
    write(&replicas[0], doc, "after-backup")?;
    replicas.push(lost);
    converge(&replicas, doc, notes_before + 1).await?;
    let lost = replicas.pop().context("three replicas")?;
    lost.node.shutdown().await?;
    drop(lost);
    let data_dir = root.join(&region);
    std::fs::remove_dir_all(data_dir.join(crate::backup::STORE_DIR))?;
    say(format!(
        "{region} stopped and its store deleted (a lost disk); restoring the backup"
    ));
    let restored = crate::backup::restore(&backup_dir, &data_dir)?;
    let key = local_cluster::cluster_key(root)?;
    let cluster = ClusterId::new("demo")?;
    let back = local_cluster::start_node(root, &cluster, key, &region, &replicas[0].addrs).await?;
    let held = notes(&back, doc)?;
    replicas.push(back);
    let took = converge(&replicas, doc, notes_before + 1).await?;
    say(format!(
        "{region} restarted from the backup with a new store id ({}) holding {held} of {} notes; \
         it had the note written after the backup {:.0} ms later",
        restored.store_id,
        notes_before + 1,
        ms(took)
    ));
    Ok(replicas)
}

/// Cuts the last region off, writes on both sides, heals, and waits for
/// convergence.
async fn write_through_a_partition(replicas: &[Replica], doc: &DocId) -> Result<()> {
    let (cut, rest) = replicas.split_last().context("three replicas")?;
    partition(cut, rest, true).await?;
    say(format!("cut {} off from the other regions", cut.region));
    for r in replicas {
        for n in 2..=3 {
            write(r, doc, &format!("{}-{n}", r.region))?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (seen_by_cut, seen_by_rest) = (notes(cut, doc)?, notes(&rest[0], doc)?);
    say(format!(
        "both sides kept writing: {} sees {} notes, {} sees {}",
        cut.region, seen_by_cut, rest[0].region, seen_by_rest
    ));
    // 4 notes before the cut, 2 more per region during it.
    if seen_by_cut == 4 + 2 * replicas.len() {
        bail!(
            "the partition did not hold: {} received writes from across the cut",
            cut.region
        );
    }

    // A client writes in the connected majority and then reads in the cut
    // region with its token: the read says what is missing, not stale data.
    let client = &rest[0];
    let written = client.engine.merge_json(
        doc,
        &json!({"notes": {"client": format!("written in {}", client.region)}}),
    )?;
    let missing = wait_for(cut, &written.session, Duration::from_millis(300)).await?;
    if missing.is_empty() {
        bail!("{} held a write made across the cut", cut.region);
    }
    say(format!(
        "a client wrote in {} and took its session token to {}: the read there answers \"not yet\" (missing {} head) instead of stale data",
        client.region,
        cut.region,
        missing.heads(doc).map_or(0, <[_]>::len)
    ));
    let need = RegionNeed::Count(2);
    let heads = written.heads.clone();
    let reached = client
        .node
        .wait_for_regions(doc.clone(), heads, need, Duration::from_millis(500))
        .await?;
    if reached.satisfied {
        bail!("a write reached two other regions across the cut");
    }
    say(format!(
        "the same write asked for 2 other regions: after 500 ms it is durable in {} and known in {:?} only",
        client.region, reached.regions
    ));

    partition(cut, rest, false).await?;
    say("healed the partition");
    let healed = Instant::now();
    let missing = wait_for(cut, &written.session, CONVERGENCE_TIMEOUT).await?;
    if !missing.is_empty() {
        bail!(
            "{} did not get the client's write after the heal",
            cut.region
        );
    }
    say(format!(
        "the client's token read in {} succeeds {:.0} ms after the heal",
        cut.region,
        ms(healed.elapsed())
    ));
    // Those, and the client's note.
    let took = converge(replicas, doc, 5 + 2 * replicas.len()).await?;
    say(format!(
        "converged in {:.0} ms after the heal: identical heads and content everywhere",
        ms(took)
    ));
    Ok(())
}

/// A client writes in `from`, then reads in `to` carrying its session token.
async fn carry_token(from: &Replica, to: &Replica, doc: &DocId) -> Result<()> {
    let written = from.engine.merge_json(
        doc,
        &json!({"notes": {"roaming": format!("written in {}", from.region)}}),
    )?;
    let start = Instant::now();
    let missing = wait_for(to, &written.session, CONVERGENCE_TIMEOUT).await?;
    let seen = to.engine.get_json(doc)?;
    if !missing.is_empty() || seen["notes"]["roaming"].is_null() {
        bail!(
            "the token read in {} did not see the client's write",
            to.region
        );
    }
    say(format!(
        "a client wrote in {} and read in {} with its session token: answered after {:.1} ms, with its note",
        from.region,
        to.region,
        ms(start.elapsed())
    ));
    Ok(())
}

/// What of `token` `r` still lacks after waiting up to `timeout`.
async fn wait_for(r: &Replica, token: &SessionToken, timeout: Duration) -> Result<SessionToken> {
    let (engine, token) = (r.engine.clone(), token.clone());
    Ok(tokio::task::spawn_blocking(move || engine.wait_for_session(&token, timeout)).await??)
}

fn write(r: &Replica, doc: &DocId, note: &str) -> Result<()> {
    let patch = json!({"notes": {note: format!("written in {}", r.region)}});
    r.engine.merge_json(doc, &patch)?;
    Ok(())
}

fn notes(r: &Replica, doc: &DocId) -> Result<usize> {
    let value = r.engine.get_json(doc)?;
    Ok(value["notes"].as_object().map_or(0, serde_json::Map::len))
}

/// Waits until every replica has the same heads and content, with
/// `expected` notes.
async fn converge(replicas: &[Replica], doc: &DocId, expected: usize) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let heads: Vec<_> = replicas
            .iter()
            .map(|r| r.engine.heads(doc).unwrap_or_default())
            .collect();
        let values: Vec<Value> = replicas
            .iter()
            .map(|r| r.engine.get_json(doc).unwrap_or(Value::Null))
            .collect();
        let same =
            heads.windows(2).all(|w| w[0] == w[1]) && values.windows(2).all(|w| w[0] == w[1]);
        if same && notes(&replicas[0], doc)? == expected {
            return Ok(start.elapsed());
        }
        if start.elapsed() > CONVERGENCE_TIMEOUT {
            bail!("replicas did not converge within {CONVERGENCE_TIMEOUT:?}: {values:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Blocks (or unblocks) `cut`'s peers on `cut` and `cut` on the others.
async fn partition(cut: &Replica, rest: &[Replica], blocked: bool) -> Result<()> {
    let others: Vec<_> = rest.iter().map(|r| r.node.peer_id()).collect();
    cut.node.block(others, blocked).await?;
    for r in rest {
        r.node.block(vec![cut.node.peer_id()], blocked).await?;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn say(line: impl AsRef<str>) {
    println!("demo: {}", line.as_ref());
}
