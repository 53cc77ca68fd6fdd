//! The dashboard (`/ui`) in a real browser: Chromium, driven by Playwright
//! (`tests/ui/dashboard.mjs`), watches node A of a three-region cluster
//! while one region is cut off and healed, and checks what a person would
//! see. Screenshots go to `target/test-artefacts/dashboard/`.
//!
//! Needs Node.js and Debian's `chromium` (`make deps` installs both as
//! root; otherwise `sudo apt-get install chromium`, or point
//! `CAUSEWAY_CHROMIUM` at a Chromium or Chrome binary).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::cluster::{create_token, wait_until, NodeProc};

/// Where Chromium is: `CAUSEWAY_CHROMIUM`, else Debian's.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CAUSEWAY_CHROMIUM") {
        return PathBuf::from(path);
    }
    let debian = PathBuf::from("/usr/bin/chromium");
    assert!(
        debian.exists(),
        "the dashboard test needs Chromium: run `make deps` as root, or \
         `sudo apt-get install chromium`, or set CAUSEWAY_CHROMIUM to a Chromium binary"
    );
    debian
}

/// Installs playwright-core (pinned in tests/ui/package.json) unless it is
/// there.
fn install_playwright(dir: &Path) {
    let manifest = dir.join("node_modules/playwright-core/package.json");
    let pinned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("package.json")).unwrap()).unwrap();
    let want = pinned["dependencies"]["playwright-core"].clone();
    let have = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| v["version"].clone());
    if have.as_ref() != Some(&want) {
        let status = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir)
            .status()
            .expect("npm (install Node.js and npm: make deps)");
        assert!(status.success(), "npm install in {}", dir.display());
    }
}

#[test]
fn the_dashboard_shows_a_cut_region_falling_behind_and_catching_up() {
    let browser = chromium();
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    install_playwright(&ui);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts/dashboard");
    std::fs::create_dir_all(&out).unwrap();

    // Three regions. Once they form a mesh, one tokens file for all (each
    // node reads it within a second): an admin token for the partition, a
    // read token for the page.
    let root = tempfile::tempdir().unwrap();
    let (a, b, c) = support::cluster::three(root.path());
    let admin = create_token(&a.dir, &["admin:*"], &["--name", "test operator"]);
    let reader = create_token(&a.dir, &["read:*"], &["--name", "dashboard"]);
    for n in [&b, &c] {
        std::fs::copy(a.dir.join("tokens.toml"), n.dir.join("tokens.toml")).unwrap();
    }
    for n in [&a, &b, &c] {
        wait_until(
            Duration::from_secs(10),
            "the tokens file to be read",
            || n.request("GET", "/v1/docs", &[], b"").status == 401,
        );
    }

    // Writes on a all along, so that a cut region falls behind.
    let running = Arc::new(AtomicBool::new(true));
    let writer = std::thread::spawn({
        let (running, http, auth) = (
            Arc::clone(&running),
            a.http.clone(),
            format!("Bearer {admin}"),
        );
        move || {
            let mut i = 0u64;
            while running.load(Ordering::Relaxed) {
                let body = format!("{{\"i\":{i}}}");
                let path = format!("/v1/docs/feed/{}", i % 20);
                let headers = [
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ];
                let resp = support::cluster::http(&http, "PUT", &path, &headers, body.as_bytes());
                assert_eq!(resp.status, 200, "{}", resp.text());
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            i
        }
    });

    // `three` puts a in eu, b in us, c in ap.
    let node = |n: &NodeProc, region: &str| json!({"url": format!("http://{}", n.http), "peer_id": n.peer_id, "region": region});
    let config = json!({
        "url": format!("http://{}", a.http),
        "reader": reader,
        "admin": admin,
        "nodes": [node(&a, "eu"), node(&b, "us"), node(&c, "ap")],
        "cut": "ap",
        "out": out.display().to_string(),
        "chromium": browser.display().to_string(),
    });
    let run = Command::new("node")
        .arg(ui.join("dashboard.mjs"))
        .arg(config.to_string())
        .current_dir(&ui)
        .output()
        .expect("node (install Node.js: make deps)");
    running.store(false, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser saw something else: {}\n{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!(
        "dashboard: {} (while {writes} writes were made on a)",
        stdout.trim()
    );
}
