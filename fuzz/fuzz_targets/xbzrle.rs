//! XBZRLE decode of arbitrary deltas, and encode/decode round trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::xbzrle(data));
