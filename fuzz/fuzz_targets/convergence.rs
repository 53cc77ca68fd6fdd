//! cargo-fuzz target `convergence`: see `causeway_engine::fuzzing::convergence`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_fuzz::unwind_panics();
    causeway_engine::fuzzing::convergence::run(data);
});
