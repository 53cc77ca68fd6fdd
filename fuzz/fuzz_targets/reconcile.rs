//! cargo-fuzz target `reconcile`: see `causeway_engine::fuzzing::reconcile`.
//! Any single allocation beyond a few copies of the input aborts.
#![no_main]

#[global_allocator]
static ALLOC: causeway_fuzz::CappedAlloc = causeway_fuzz::CappedAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_fuzz::unwind_panics();
    causeway_fuzz::set_cap(causeway_fuzz::decode_cap(data.len()));
    causeway_engine::fuzzing::reconcile::run(data);
    causeway_fuzz::set_cap(usize::MAX);
});
