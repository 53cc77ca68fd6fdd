//! cargo-fuzz target `sync_messages`: see `causeway_engine::fuzzing::sync_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_fuzz::unwind_panics();
    causeway_engine::fuzzing::sync_messages::run(data);
});
