//! A rolling upgrade of real `causeway node` processes on 127.0.0.1, from
//! the previous release to this build: a cluster of two nodes of the
//! previous release and one of this build takes writes on an old node and
//! on the new one, then each old node is stopped and started again on its
//! data directory with this build (its store, written by the previous
//! release, is opened by this one) while writes go on. Every acknowledged
//! write must end up on every node.
//!
//! The previous release's binary is built by `scripts/previous_release.sh`
//! (`make test` runs it first); see docs/releases.md.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::cluster::{
    causeway_bin, lost_writes, missing_writes, wait_until, writer, NodeProc, Options, MESH_TIMEOUT,
};

/// The previous release, as `scripts/previous_release.sh` names it.
const PREVIOUS_RELEASE: &str = "v0.1.0";

/// Where `scripts/previous_release.sh` leaves the previous release's binary.
fn previous_release_bin() -> PathBuf {
    let target = causeway_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let bin = target
        .join("previous-release")
        .join(PREVIOUS_RELEASE)
        .join("causeway");
    assert!(
        bin.exists(),
        "{} is missing: build it with `bash scripts/previous_release.sh` (`make test` does)",
        bin.display()
    );
    bin
}

/// What `bin --version` prints.
fn version_of(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Waits until `node` answers `/ready` 200; otherwise fails with what
/// `/ready` said last and the end of the node's log.
fn ready(node: &NodeProc) -> Duration {
    let started = Instant::now();
    loop {
        let r = node.request("GET", "/ready", &[], b"");
        if r.status == 200 {
            return started.elapsed();
        }
        if started.elapsed() > READY_TIMEOUT {
            let log = std::fs::read_to_string(node.dir.join("node.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{} not ready after {READY_TIMEOUT:?}: /ready {} {}\nstatus: {}\nlog (last lines first):\n{}",
                node.name,
                r.status,
                r.text(),
                node.status()["node"],
                tail.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How long a restarted node may take to answer `/ready` 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until every acknowledged write is on every node; otherwise fails
/// saying which node lacks which writes.
fn all_writes_everywhere(acked: &[(String, String)], nodes: &[&NodeProc]) -> Duration {
    let started = Instant::now();
    while lost_writes(acked, nodes) > 0 {
        if started.elapsed() > CONVERGE_TIMEOUT {
            let mut missing = Vec::new();
            for (node, lacks) in nodes.iter().zip(missing_writes(acked, nodes)) {
                missing.push(format!(
                    "{} lacks {} (first: {:?}); peers: {}",
                    node.name,
                    lacks.len(),
                    &lacks[..lacks.len().min(5)],
                    node.status()["node"]["peers"]
                ));
            }
            panic!(
                "after {CONVERGE_TIMEOUT:?}, of {} acknowledged writes:\n{}",
                acked.len(),
                missing.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

/// How long acknowledged writes may take to reach every node.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

type Acked = Arc<Mutex<Vec<(String, String)>>>;

/// A writer on `node` until the returned flag is set.
fn write_on(
    node: &NodeProc,
    tag: &'static str,
    acked: &Acked,
) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = writer(node.http.clone(), tag, Arc::clone(&stop), Arc::clone(acked));
    (stop, handle)
}

fn stop(writer: (Arc<AtomicBool>, thread::JoinHandle<()>)) {
    writer.0.store(true, Ordering::SeqCst);
    writer.1.join().unwrap();
}

#[test]
fn a_cluster_upgraded_one_node_at_a_time_from_the_previous_release_loses_no_write() {
    let old = previous_release_bin();
    let new = causeway_bin();
    let (old_version, new_version) = (version_of(&old), version_of(&new));
    println!("previous release: {old_version}; this build: {new_version}");

    let root = tempfile::tempdir().unwrap();
    let old_options = || Options {
        bin: Some(&old),
        ..Options::default()
    };
    let mut a = NodeProc::start_with(root.path(), "a", "eu", &[], old_options());
    let mut b = NodeProc::start_with(root.path(), "b", "us", &a.listen, old_options());
    let mut c = NodeProc::start_with(root.path(), "c", "ap", &a.listen, Options::default());
    wait_until(MESH_TIMEOUT, "a full mesh of old and new nodes", || {
        [&a, &b, &c].iter().all(|n| n.replicating().len() == 2)
    });

    // Mixed versions, writes in both directions: on old a and on new c.
    let acked: Acked = Arc::default();
    let on_c = write_on(&c, "c", &acked);
    let on_a = write_on(&a, "a", &acked);
    thread::sleep(Duration::from_millis(1500));
    stop(on_a);
    let mixed = acked.lock().unwrap().len();
    all_writes_everywhere(&acked.lock().unwrap(), &[&a, &b, &c]);

    // a is upgraded while c takes writes; then it takes writes again.
    let started = Instant::now();
    a.upgrade(&new, &b.listen);
    let a_restarted = started.elapsed();
    let a_ready = ready(&a);
    let on_a = write_on(&a, "A", &acked);
    // b, the last old node, is upgraded while a and c take writes.
    let b_started = Instant::now();
    b.upgrade(&new, &a.listen);
    let b_restarted = b_started.elapsed();
    let b_ready = ready(&b);
    let upgraded_in = started.elapsed();
    thread::sleep(Duration::from_millis(1000));
    // c, already on this build, restarts while a takes writes: its stop
    // waits for what it sent by then, not for every answer it goes on
    // sending to peers under load.
    stop(on_c);
    let c_started = Instant::now();
    c.upgrade(&new, &a.listen);
    let c_restarted = c_started.elapsed();
    let c_ready = ready(&c);
    let on_c = write_on(&c, "C", &acked);
    thread::sleep(Duration::from_millis(500));
    stop(on_a);
    stop(on_c);

    let acked = acked.lock().unwrap().clone();
    let converged = all_writes_everywhere(&acked, &[&a, &b, &c]);
    wait_until(MESH_TIMEOUT, "a full mesh after the upgrade", || {
        [&a, &b, &c].iter().all(|n| n.replicating().len() == 2)
    });
    println!(
        "{} writes acknowledged ({mixed} while a and b ran {PREVIOUS_RELEASE}), 0 lost; \
         a stopped and started in {:.2} s, ready {:.2} s later; b in {:.2} s, ready {:.2} s later; \
         both upgraded in {:.2} s; c (this build) restarted under load in {:.2} s, ready {:.2} s later; \
         every node held every write {:.2} s after the last write",
        acked.len(),
        a_restarted.as_secs_f64(),
        a_ready.as_secs_f64(),
        b_restarted.as_secs_f64(),
        b_ready.as_secs_f64(),
        upgraded_in.as_secs_f64(),
        c_restarted.as_secs_f64(),
        c_ready.as_secs_f64(),
        converged.as_secs_f64()
    );
}
