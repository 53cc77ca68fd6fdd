//! cargo-fuzz target `documents`: see `causeway_engine::fuzzing::documents`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    causeway_fuzz::unwind_panics();
    causeway_engine::fuzzing::documents::run(data);
});
