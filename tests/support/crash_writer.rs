//! Child process for the crash-safety test (`tests/crash_safety.rs`).
//!
//! Usage: `causeway-crash-writer <store-dir> <first-key> <writers>`
//!
//! Opens the store with the default (`Sync`) durability and an aggressive
//! compaction policy, then `writers` threads write unique keys as fast as they
//! can, each to its own set of documents. After each write is acknowledged the
//! thread prints `ack <doc> <key>` on stdout. The parent kills this process with
//! SIGKILL at a random moment and checks that every printed write survived.

use std::io::Write;
use std::sync::{Arc, Mutex};

use causeway_engine::{CompactionPolicy, DocId, Engine, EngineConfig};

/// Documents each writer spreads its keys over.
const DOCS_PER_WRITER: u64 = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: causeway-crash-writer <store-dir> <first-key> <writers>");
        std::process::exit(2);
    }
    let first: u64 = args[2]
        .parse()
        .unwrap_or_else(|_| fail("first-key must be a number"));
    let writers: u64 = args[3]
        .parse()
        .unwrap_or_else(|_| fail("writers must be a number"));
    let config = EngineConfig {
        compaction: CompactionPolicy {
            max_log_changes: 7,
            max_log_bytes: 4096,
        },
        ..EngineConfig::default()
    };
    let engine = Engine::open(&args[1], config).unwrap_or_else(|e| fail(&e.to_string()));
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let engine = engine.clone();
            let stdout = Arc::clone(&stdout);
            std::thread::spawn(move || write_forever(&engine, &stdout, w, first))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn write_forever(engine: &Engine, stdout: &Mutex<std::io::Stdout>, writer: u64, first: u64) {
    for n in 0.. {
        let key = first + n;
        let doc = DocId::new(format!("w{writer}/d{}", key % DOCS_PER_WRITER))
            .unwrap_or_else(|e| fail(&e.to_string()));
        let patch = serde_json::json!({ format!("k{key}"): key });
        engine
            .merge_json(&doc, &patch)
            .unwrap_or_else(|e| fail(&e.to_string()));
        let mut out = stdout
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(out, "ack {doc} k{key}");
        let _ = out.flush();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("causeway-crash-writer: {msg}");
    std::process::exit(1)
}
