//! Storage errors are fatal (invariant 7): when a write fails, the failing call
//! returns `Error::Storage` with the cause, and every later call refuses work
//! instead of serving state that may not match what was acknowledged.
//!
//! The test fills a small tmpfs until RocksDB's WAL write fails. Mounting needs
//! root (CI runs as root); without it the test says so and checks nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::process::Command;

use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{ScalarValue, ROOT};
use causeway_engine::{Engine, EngineConfig, Error};
use common::id;
use serde_json::json;

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_failed_write_stops_the_engine() {
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("storage_failure: skipped, mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(dir.path())
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mount -t tmpfs failed although running as root"
    );
    let _mount = Mount(dir.path().to_path_buf());

    let engine = Engine::open(dir.path().join("store"), EngineConfig::default()).unwrap();
    engine.put_json(&id("early"), &json!({"ok": true})).unwrap();
    let blob = vec![0x5a_u8; 256 * 1024];
    let mut failure = None;
    for i in 0..200 {
        let write = engine.upsert(&id(&format!("fill/{i}")), |tx| {
            tx.put(ROOT, "blob", ScalarValue::Bytes(blob.clone()))
        });
        match write {
            Ok(_) => continue,
            Err(e) => {
                failure = Some((i, e));
                break;
            }
        }
    }
    let (at, err) = failure.expect("an 8 MiB tmpfs must fill up within 50 MiB of writes");
    assert!(
        matches!(err, Error::Storage(_)),
        "write {at} failed with {err}"
    );
    assert!(err.to_string().contains("engine has stopped"), "{err}");
    eprintln!("storage_failure: write {at} failed: {err}");

    let later = engine
        .put_json(&id("after"), &json!({"small": 1}))
        .unwrap_err();
    assert!(matches!(later, Error::Storage(_)), "{later}");
    let read = engine.get_json(&id("early")).unwrap_err();
    assert!(matches!(read, Error::Storage(_)), "{read}");
}
