//! migstream's accelerated LZ4 encoder: lz4_flex must decode its blocks back.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::lz4_encode(data));
