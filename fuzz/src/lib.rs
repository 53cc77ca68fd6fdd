//! Support for the cargo-fuzz targets in `fuzz_targets/`. The harnesses
//! themselves live in `causeway_engine::fuzzing`, so that `cargo test` in the
//! main workspace replays the committed corpora through the same code.
//!
//! [`CappedAlloc`] makes "never allocates past the limits" checkable: a
//! target installs it as the global allocator and sets a cap for each input;
//! an allocation above the cap aborts the process, which libFuzzer reports
//! as a crash and saves the input. (libFuzzer's own `-malloc_limit_mb` needs
//! a sanitizer's allocator hooks, which these builds do without.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Puts back Rust's default panic hook in place of libFuzzer's, which aborts
/// at the first panic even when the code catches it. The engine catches
/// panics inside Automerge's decoders (`causeway_engine`'s `codec` module),
/// so those must unwind; a panic nothing catches still reaches libfuzzer-sys,
/// which aborts and reports the input. Call at the start of every input.
pub fn unwind_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| drop(std::panic::take_hook()));
}

/// The cap in force, in bytes (`usize::MAX`: none).
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator, refusing single allocations above the cap.
pub struct CappedAlloc;

/// Sets the largest single allocation allowed from now on.
pub fn set_cap(bytes: usize) {
    CAP.store(bytes, Ordering::Relaxed);
}

/// The cap for decoding an input of `len` bytes: what a decoder may need
/// for the input's contents (a few copies of it) plus fixed headroom, so an
/// allocation sized by a length field in the input rather than by the input
/// itself is caught.
pub fn decode_cap(len: usize) -> usize {
    len.saturating_mul(8).saturating_add(1 << 20)
}

// SAFETY: every method forwards to `System` unchanged, or aborts before
// allocating.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn check(size: usize) {
    if size > CAP.load(Ordering::Relaxed) {
        // No allocation from here on: a fixed message, then abort.
        let _ = std::io::stderr().write_all(b"allocation above the cap for this input\n");
        std::process::abort();
    }
}
