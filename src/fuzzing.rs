//! Entry points of the cargo-fuzz targets in `fuzz/`, compiled only under
//! `cfg(fuzzing)` (set by cargo-fuzz) and for the unit test that replays the corpus.
//!
//! They check more than "no panic": whatever the decoder accepted must re-encode to
//! exactly the bytes it consumed, however the input was split into reads.

use bytes::BytesMut;

use crate::qemu::{Limits, QemuDecoder, QemuEncoder};
use crate::xbzrle::{self, Delta};

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

/// XBZRLE both ways. `data[0]` picks the page size (64 << n bytes, up to 4 KiB).
/// The rest is applied as a delta to a page made of the same bytes (it must not
/// panic); then the page before and after, whatever decoding did to it, are encoded
/// and decoded again, which must give back the page after.
pub fn xbzrle(data: &[u8]) {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let len = 64 << (size % 7);
    let old: Vec<u8> = rest.iter().copied().cycle().take(len).collect();
    if old.len() < len {
        return;
    }
    let mut new = old.clone();
    let _ = xbzrle::decode(rest, &mut new);
    let mut out = vec![0; len];
    match xbzrle::encode(&old, &new, &mut out) {
        Delta::Unchanged => assert!(old == new, "unchanged but the pages differ"),
        Delta::TooLarge => {}
        Delta::Encoded(n) => {
            let mut page = old.clone();
            xbzrle::decode(&out[..n], &mut page).expect("our own delta decodes");
            assert!(page == new, "decode(encode(old, new)) != new");
        }
    }
}

/// Loads `data` as a template catalog file, whole and from a reader of unknown
/// length (same result, same error), and as the source's index. Whatever loads must
/// write back to exactly `data`, and its index must find every template.
pub fn catalog_load(data: &[u8]) {
    use crate::page::Fingerprint;
    use crate::template::{Catalog, TemplateIndex};
    let whole = Catalog::from_bytes(data);
    match (&whole, Catalog::from_reader(data)) {
        (Ok(a), Ok(b)) => assert!(
            *a == b,
            "from_bytes and from_reader load different catalogs"
        ),
        (Err(a), Err(b)) => assert_eq!(
            (a.kind(), a.offset(), a.field()),
            (b.kind(), b.offset(), b.field()),
            "from_bytes and from_reader fail differently"
        ),
        _ => panic!("from_bytes and from_reader disagree"),
    }
    let index = TemplateIndex::from_reader(data);
    let Ok(catalog) = whole else {
        return;
    };
    let mut out = Vec::new();
    catalog.write_to(&mut out).expect("writing to memory");
    assert!(
        out == data,
        "the catalog written back differs from the bytes loaded"
    );
    let index = index.expect("a catalog that loads also indexes");
    assert_eq!(index.id(), catalog.id());
    for n in 0..catalog.len() as u32 {
        let page = catalog.get(n).expect("a template");
        assert_eq!(index.lookup(page), Some((n, Fingerprint::of(page))));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Runs every file of a target's checked-in seed corpus through its entry point.
    fn replay(target: &str, entry_point: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus exists") {
            let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
            entry_point(&data);
            count += 1;
        }
        assert!(
            count >= 10,
            "seed corpus of {target} has only {count} inputs"
        );
    }

    #[test]
    fn qemu_decode_corpus_replays() {
        replay("qemu_decode", super::qemu_decode);
    }

    #[test]
    fn xbzrle_corpus_replays() {
        replay("xbzrle", super::xbzrle);
    }

    #[test]
    fn catalog_load_corpus_replays() {
        replay("catalog_load", super::catalog_load);
    }
}
