//! cargo-fuzz target `apply_changes`: see `causeway_engine::fuzzing::apply_changes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_fuzz::unwind_panics();
    causeway_engine::fuzzing::apply_changes::run(data);
});
