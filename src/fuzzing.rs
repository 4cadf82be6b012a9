//! Entry points of the cargo-fuzz targets in `fuzz/`, compiled only under
//! `cfg(fuzzing)` (set by cargo-fuzz) and for the unit test that replays the corpus.
//!
//! They check more than "no panic": whatever the decoder accepted must re-encode to
//! exactly the bytes it consumed, however the input was split into reads.

use bytes::BytesMut;

use crate::qemu::{Limits, QemuDecoder, QemuEncoder};

/// Decodes `data[1..]` fed in reads of a size drawn from `data[0]`, re-encodes every
/// record, and asserts the output equals the consumed input.
pub fn qemu_decode(data: &[u8]) {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    // 0 = the whole input at once; otherwise reads of 1..=255 bytes
    let read = match seed {
        0 => input.len().max(1),
        n => usize::from(n),
    };
    let limits = Limits {
        max_opaque_chunk: 1 + usize::from(seed % 7) * 100,
        max_vmdesc_len: 4096,
        ..Limits::default()
    };
    let mut dec = QemuDecoder::with_limits(limits);
    let mut enc = QemuEncoder::new();
    let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
    let mut fed = 0;
    loop {
        let at_end = fed == input.len();
        let step = match at_end {
            true => dec.decode_eof(&mut buf),
            false => dec.decode(&mut buf),
        };
        match step {
            Ok(Some(record)) => {
                enc.encode(&record, &mut out)
                    .expect("a decoded record encodes");
                assert_eq!(
                    out.len() as u64,
                    dec.offset(),
                    "encoded length != consumed length"
                );
            }
            Ok(None) if !at_end => {
                let end = (fed + read).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Ok(None) | Err(_) => break,
        }
    }
    assert_eq!(
        &out[..],
        &input[..out.len()],
        "re-encoded bytes differ from the input"
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Replays the checked-in seed corpus of every fuzz target through its entry point.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/qemu_decode");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/qemu_decode exists") {
            let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
            super::qemu_decode(&data);
            count += 1;
        }
        assert!(count >= 10, "seed corpus has only {count} inputs");
    }
}
