//! Decodes arbitrary bytes as a multifd channel (byte 0 picks the read size),
//! re-encodes every record and checks the output equals the consumed input, and that
//! the records and the error do not depend on the read size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::multifd_decode(data));
