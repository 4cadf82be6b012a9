//! Decodes arbitrary bytes as a QEMU migration stream (byte 0 picks the read size),
//! re-encodes every record and checks the output equals the consumed input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    migstream::fuzzing::qemu_decode(data);
});
