//! DHT manifests from store nodes: parse arbitrary bytes, re-encode whatever parses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| migstream::fuzzing::dht_manifest(data));
