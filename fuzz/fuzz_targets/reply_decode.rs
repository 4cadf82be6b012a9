//! The return direction of a link (greeting, QEMU return path, DONE / FAILED) from a
//! hostile destination: typed errors only, and every accepted message re-encodes to
//! its bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::reply_decode(data));
