//! cargo-fuzz target `wire_decode`: see `causeway_engine::fuzzing::wire_decode`.
//! A single allocation beyond a few copies of the input aborts while
//! Causeway's decoders run, beyond Automerge's own ceiling while Automerge's
//! run.
#![no_main]

use causeway_engine::fuzzing::wire_decode::{run_with, Decoder, AUTOMERGE_MAX_ALLOCATION};

#[global_allocator]
static ALLOC: causeway_fuzz::CappedAlloc = causeway_fuzz::CappedAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_fuzz::unwind_panics();
    let ours = causeway_fuzz::decode_cap(data.len());
    run_with(data, &mut |decoder| {
        causeway_fuzz::set_cap(match decoder {
            Decoder::Causeway => ours,
            Decoder::Automerge => AUTOMERGE_MAX_ALLOCATION.max(ours),
        })
    });
    causeway_fuzz::set_cap(usize::MAX);
});
