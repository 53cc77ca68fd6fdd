//! Backups of real `causeway node` processes on 127.0.0.1: a node backed up
//! through its HTTP API while clients write, whose disk is then lost and
//! restored from the backup, gets back every acknowledged write the
//! cluster holds, including those made after the backup; its peers see
//! its new store id (a new incarnation) and forget what it had reported.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::ffi::OsStr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use support::cluster::{causeway_bin, lost_writes, three, wait_until, writer, NodeProc};

/// Runs `causeway ARGS` and returns the JSON it prints.
fn causeway(args: &[&OsStr]) -> Value {
    let out = Command::new(causeway_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "causeway {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn store_id(node: &NodeProc) -> String {
    node.status()["engine"]["store_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_node_restored_from_a_backup_taken_under_load_gets_back_every_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    // c is the node restored: it restarts on a new port and finds the
    // others through a, its bootstrap peer.
    let (a, b, mut c) = three(root.path());
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers = [
        writer(a.http.clone(), "a", Arc::clone(&stop), Arc::clone(&acked)),
        writer(c.http.clone(), "c", Arc::clone(&stop), Arc::clone(&acked)),
    ];
    thread::sleep(Duration::from_millis(800));

    // The backup, taken while both writers go on.
    let backup = root.path().join("backup");
    let url = format!("http://{}", c.http);
    let taken = causeway(&[
        "backup".as_ref(),
        "--url".as_ref(),
        url.as_ref(),
        "--to".as_ref(),
        backup.as_os_str(),
    ]);
    let before_backup = acked.lock().unwrap().len();
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let after_backup = acked.len() - before_backup;
    assert!(
        after_backup > 0,
        "no write was acknowledged after the backup"
    );
    // Everything acknowledged is held by the whole cluster before c's
    // disk goes.
    wait_until(Duration::from_secs(60), "every write on every node", || {
        lost_writes(&acked, &[&a, &b, &c]) == 0
    });
    let old_store = store_id(&c);
    assert_eq!(taken["store_id"].as_str(), Some(old_store.as_str()));

    // c's disk is lost: it stops, its store goes, the backup comes back.
    assert!(c.terminate().success());
    std::fs::remove_dir_all(c.dir.join("store")).unwrap();
    let restored = causeway(&[
        "restore".as_ref(),
        "--from".as_ref(),
        backup.as_os_str(),
        "--data-dir".as_ref(),
        c.dir.as_os_str(),
    ]);
    c.restart();
    let new_store = store_id(&c);
    assert_ne!(new_store, old_store, "a restored store gets a new store id");
    assert_eq!(restored["store_id"].as_str(), Some(new_store.as_str()));
    let caught_up = wait_until(
        Duration::from_secs(60),
        "every acknowledged write on the restored node",
        || lost_writes(&acked, &[&c]) == 0,
    );
    assert_eq!(lost_writes(&acked, &[&a, &b, &c]), 0);
    wait_until(
        Duration::from_secs(30),
        "both peers to see c's new store id",
        || {
            [&a, &b]
                .iter()
                .all(|n| n.metric("causeway_peer_stores_renewed_total", "") >= 1.0)
        },
    );
    println!(
        "{} writes acknowledged ({after_backup} after the backup); backup of {} documents, {} bytes, \
         taken in {:.2} s under load; restored in {:.2} s; the restored node held every write \
         {:.2} s after it started (0 lost)",
        acked.len(),
        taken["documents"],
        taken["bytes"],
        taken["seconds"].as_f64().unwrap(),
        restored["seconds"].as_f64().unwrap(),
        caught_up.as_secs_f64(),
    );
}
