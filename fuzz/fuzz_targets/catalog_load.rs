//! Template catalog files: load arbitrary bytes, write back whatever loads.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::catalog_load(data));
