//! A node whose disk nearly fills refuses client writes (507
//! `insufficient_storage`) and answers `/ready` 503 `low_disk` while reads
//! go on, and takes writes again once space is freed. The node's data
//! directory is on a tmpfs of its own, filled with a plain file: this needs
//! root (CI runs as root); elsewhere it says so and stops, unless
//! CAUSEWAY_CHAOS_REQUIRED is set, when it fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::cluster::{wait_until, NodeProc, Options};

/// Size of the tmpfs, MiB.
const TMPFS_MIB: u64 = 512;
/// The node's threshold, MiB.
const MIN_FREE_MIB: u64 = 300;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_MIB}m"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn put(node: &NodeProc, id: &str) -> (u16, String) {
    let r = node.request(
        "PUT",
        &format!("/v1/docs/{id}"),
        &[("content-type", "application/json")],
        json!({"id": id}).to_string().as_bytes(),
    );
    (r.status, r.code())
}

#[test]
fn a_node_nearly_out_of_disk_refuses_writes_until_space_is_freed() {
    if !causeway_lab::chaos::is_root() {
        assert!(
            std::env::var_os("CAUSEWAY_CHAOS_REQUIRED").is_none(),
            "the disk space test needs root (it mounts a tmpfs)"
        );
        eprintln!("SKIPPED: the disk space test needs root (it mounts a tmpfs)");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&root.path().join("disk"));
    let tables = format!("[engine]\nmin_free_mib = {MIN_FREE_MIB}\n");
    let a = NodeProc::start_with(
        &mnt.0,
        "a",
        "eu",
        &[],
        Options {
            tables: &tables,
            ..Options::default()
        },
    );
    assert_eq!(put(&a, "disk/before").0, 200);
    let disk = |a: &NodeProc| a.status()["node"]["disk"].clone();
    wait_until(
        Duration::from_secs(10),
        "the first look at the disk",
        || disk(&a)["free_bytes"].is_u64(),
    );
    let free = disk(&a)["free_bytes"].as_u64().unwrap();
    assert!(free > MIN_FREE_MIB << 20, "{free} bytes free at the start");

    // Fill the disk to 50 MiB under the threshold.
    let filler = mnt.0.join("filler");
    let fill = free - ((MIN_FREE_MIB - 50) << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    let refused = wait_until(Duration::from_secs(10), "writes refused", || {
        put(&a, "disk/probe") == (507, "insufficient_storage".to_string())
    });
    let ready = a.request("GET", "/ready", &[], b"");
    assert_eq!((ready.status, ready.code()), (503, "low_disk".to_string()));
    assert_eq!(
        a.get_doc("disk/before").unwrap().0,
        json!({"id": "disk/before"})
    );
    assert_eq!(a.metric("causeway_low_disk", ""), 1.0);
    assert_eq!(disk(&a)["low"], true);

    // Space comes back: writes are taken again.
    std::fs::remove_file(&filler).unwrap();
    let back = wait_until(Duration::from_secs(10), "writes taken again", || {
        put(&a, "disk/after").0 == 200
    });
    assert_eq!(a.request("GET", "/ready", &[], b"").status, 200);
    assert_eq!(a.metric("causeway_low_disk", ""), 0.0);
    println!(
        "{} MiB free at the start, {MIN_FREE_MIB} MiB threshold: writes refused {:.2} s after the disk filled, \
         taken again {:.2} s after space was freed; reads served throughout",
        free >> 20,
        refused.as_secs_f64(),
        back.as_secs_f64()
    );
    drop(a);
}
