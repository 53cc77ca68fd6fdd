//! The cache's memory estimate against measured heap use.
//!
//! The memory budget is only as good as the per-document estimate behind it.
//! This test counts every heap byte the process holds (a counting global
//! allocator) while documents of different shapes are loaded into the cache,
//! and checks that the engine's estimate stays within a factor of two of what
//! was actually allocated, either way. It prints the figures.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use causeway_engine::automerge::transaction::Transactable;
use causeway_engine::automerge::{ObjType, ROOT};
use causeway_engine::{Engine, EngineConfig};
use common::{buffered, id};
use serde_json::json;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates every call to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Loads `count` documents written by `write` into a fresh engine's cache and
/// returns (measured heap bytes, estimated bytes) per document.
fn measure(count: usize, write: impl Fn(&Engine, usize)) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), buffered()).unwrap();
    for i in 0..count {
        write(&engine, i);
    }
    drop(engine);
    let config = EngineConfig {
        cache_budget_bytes: usize::MAX / 2,
        ..buffered()
    };
    let engine = Engine::open(dir.path(), config).unwrap();
    // Warm RocksDB's block cache and table readers so they are not counted.
    engine.heads(&id("warm")).unwrap_err();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..count {
        engine.heads(&id(&format!("m/{i}"))).unwrap();
    }
    let measured = (LIVE.load(Ordering::Relaxed) - before) as f64 / count as f64;
    let estimated = engine.stats().cache_bytes as f64 / count as f64;
    (measured, estimated)
}

#[test]
fn the_estimate_is_within_a_factor_of_two_of_measured_heap() {
    let small = measure(500, |e, i| {
        e.put_json(
            &id(&format!("m/{i}")),
            &json!({"sku": "coffee", "cents": 350, "n": i}),
        )
        .unwrap();
    });
    let edited = measure(100, |e, i| {
        for k in 0..20 {
            e.merge_json(
                &id(&format!("m/{i}")),
                &json!({ "count": k, "tags": ["a", "b"] }),
            )
            .unwrap();
        }
    });
    let keystrokes = measure(2, |e, i| {
        let doc = id(&format!("m/{i}"));
        let text = e
            .upsert(&doc, |tx| tx.put_object(ROOT, "text", ObjType::Text))
            .unwrap()
            .value;
        for c in 0..3000usize {
            e.update(&doc, |tx| tx.splice_text(&text, c / 2, 0, "x"))
                .unwrap();
        }
    });
    let mut off = Vec::new();
    for (name, (measured, estimated)) in [
        ("small json", small),
        ("20 merges", edited),
        ("3,000 one-key transactions", keystrokes),
    ] {
        println!(
            "memory-estimate: {name}: measured {measured:.0} B/doc, estimated {estimated:.0} B/doc, ratio {:.2}",
            estimated / measured
        );
        if estimated > 2.0 * measured || measured > 2.0 * estimated {
            off.push(name);
        }
    }
    assert!(off.is_empty(), "estimate off by more than 2x for {off:?}");
}
