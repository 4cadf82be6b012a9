//! The dedup stream decoder on hostile frames, and round trips of the QEMU streams
//! the QEMU decoder accepts, with one flipped byte that must be caught.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::dedup_decode(data));
