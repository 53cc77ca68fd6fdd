//! Crash safety shown, not claimed (invariant 1: acknowledged means durable).
//!
//! A child process writes as fast as it can with the default `Sync` durability
//! and prints each acknowledged write. This test kills it with SIGKILL at
//! random moments, reopens the store each time, and checks that every
//! acknowledged write is present and that every document loads. It prints
//! cycles, acknowledged writes and lost writes; lost writes must be zero.
//!
//! Knobs (environment): `CRASH_CYCLES` (default 20), `CRASH_SEED` (default
//! random, printed so a run can be replayed).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use causeway_engine::{DocId, Engine, EngineConfig};

const WRITERS: u32 = 4;

#[test]
fn acknowledged_writes_survive_sigkill() {
    let cycles: u32 = env_or("CRASH_CYCLES", 20);
    let seed: u64 = env_or(
        "CRASH_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut total_acked = 0usize;
    let mut next_key = 0u64;
    let started = Instant::now();
    for cycle in 0..cycles {
        let run_ms = 30 + next(&mut rng) % 400;
        let lines = run_and_kill(dir.path(), next_key, Duration::from_millis(run_ms));
        for line in &lines {
            let mut parts = line.split_whitespace();
            let (Some("ack"), Some(doc), Some(key)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            acked
                .entry(doc.to_string())
                .or_default()
                .push(key.to_string());
            total_acked += 1;
        }
        next_key += 1_000_000;
        let lost = verify(dir.path(), &acked);
        assert_eq!(
            lost, 0,
            "cycle {cycle} (seed {seed}): {lost} acknowledged writes lost"
        );
    }
    println!(
        "crash-safety: seed={seed} cycles={cycles} writers={WRITERS} acknowledged_writes={total_acked} lost_writes=0 documents={} elapsed_s={:.1}",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        total_acked >= cycles as usize,
        "the child acknowledged too few writes to test anything"
    );
}

/// Runs the writer for `run`, kills it with SIGKILL, returns its complete stdout lines.
fn run_and_kill(dir: &std::path::Path, first_key: u64, run: Duration) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_causeway-crash-writer"))
        .arg(dir)
        .arg(first_key.to_string())
        .arg(WRITERS.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut buf = String::new();
        let mut r = BufReader::new(stdout);
        while r.read_line(&mut buf).unwrap_or(0) > 0 {
            if buf.ends_with('\n') {
                lines.push(buf.trim_end().to_string());
            }
            buf.clear();
        }
        lines
    });
    std::thread::sleep(run);
    child.kill().expect("SIGKILL writer");
    let status = child.wait().expect("reap writer");
    assert!(
        status.code().is_none(),
        "writer exited on its own ({status}); it should only die by SIGKILL"
    );
    reader.join().unwrap()
}

/// Reopens the store and counts acknowledged writes that are missing.
fn verify(dir: &std::path::Path, acked: &BTreeMap<String, Vec<String>>) -> usize {
    let engine = Engine::open(dir, EngineConfig::default()).expect("store reopens after SIGKILL");
    let mut lost = 0;
    for (doc, keys) in acked {
        let value = engine
            .get_json(&DocId::new(doc.as_str()).unwrap())
            .expect("document loads");
        lost += keys
            .iter()
            .filter(|k| value.get(k.as_str()).is_none())
            .count();
    }
    for page_doc in engine.list("", None, 1000).unwrap().ids {
        engine
            .get_json(&page_doc)
            .expect("every listed document loads");
    }
    lost
}

fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
