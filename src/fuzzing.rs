//! Entry points of the cargo-fuzz targets in `fuzz/`, compiled only under
//! `cfg(fuzzing)` (set by cargo-fuzz) and for the unit test that replays the corpus.
//!
//! They check more than "no panic": whatever the decoder accepted must re-encode to
//! exactly the bytes it consumed, however the input was split into reads.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

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
    round_trip(
        QemuDecoder::with_limits(limits),
        QemuEncoder::new(),
        QemuDecoder::offset,
        input,
        read,
    );
}

/// Decodes `input` fed in reads of `read` bytes and re-encodes every record: after
/// each record the output must be as long as what the decoder consumed (`offset`),
/// and at the end equal to the input it consumed. Gives the records and the error
/// that stopped the decoder, if any.
fn round_trip<D, E>(
    mut dec: D,
    mut enc: E,
    offset: fn(&D) -> u64,
    input: &[u8],
    read: usize,
) -> (Vec<D::Item>, Option<crate::Error>)
where
    D: Decoder<Error = crate::Error>,
    E: for<'r> Encoder<&'r D::Item, Error = crate::Error>,
{
    let (mut buf, mut out, mut records) = (BytesMut::new(), BytesMut::new(), Vec::new());
    let mut fed = 0;
    let err = loop {
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
                    offset(&dec),
                    "encoded length != consumed length"
                );
                records.push(record);
            }
            Ok(None) if !at_end => {
                let end = (fed + read).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    assert!(
        out[..] == input[..out.len()],
        "re-encoded bytes differ from the input"
    );
    (records, err)
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

/// migstream's accelerated LZ4 encoder on `data[1..]`, with the acceleration
/// `data[0] % 9` (0 counts as 1): lz4_flex, which decodes every LZ4 frame at the
/// destination, must give back exactly the input. The input is also repeated once
/// so that matches reach back across the whole of it.
pub fn lz4_encode(data: &[u8]) {
    let Some((&accel, rest)) = data.split_first() else {
        return;
    };
    let mut encoder = crate::dedup::lz4::Lz4Encoder::new(u32::from(accel % 9));
    let twice = [rest, rest].concat();
    for input in [rest, &twice[..]] {
        let mut out = Vec::new();
        encoder.compress(input, &mut out);
        let back = lz4_flex::block::decompress(&out, input.len()).expect("a valid LZ4 block");
        assert!(back == input, "decompress(compress(x)) != x");
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

#[cfg(feature = "dht")]
/// DHT manifests, which come from store nodes: arbitrary bytes parsed as the
/// manifest of the catalog they name; whatever is accepted names that catalog and
/// encodes back to exactly the bytes it was parsed from.
pub fn dht_manifest(data: &[u8]) {
    use crate::dht::Manifest;
    use crate::template::CatalogId;
    let named = data.get(24..56).and_then(|id| id.try_into().ok());
    let id = CatalogId(named.unwrap_or([0; 32]));
    if let Ok(manifest) = Manifest::decode(data, &id, 1 << 16) {
        assert_eq!(manifest.id(), id);
        assert_eq!(
            &manifest.encode()[..],
            data,
            "a manifest re-encodes differently"
        );
    }
}

/// The return direction of a link (greeting, return path, verdict), from a hostile
/// destination: `data[0]` sets the read size, the rest is fed in reads of that
/// many bytes. Every message accepted must re-encode to exactly the bytes it was
/// read from (a FAILED reason that is not UTF-8 aside, which is read lossily).
pub fn reply_decode(data: &[u8]) {
    use crate::dedup::{Reply, ReplyDecoder};
    let Some((&read, rest)) = data.split_first() else {
        return;
    };
    let (mut decoder, mut input) = (ReplyDecoder::new(), BytesMut::new());
    for chunk in rest.chunks(usize::from(read) + 1) {
        input.extend_from_slice(chunk);
        loop {
            let before = input.clone();
            match decoder.decode(&mut input) {
                Ok(Some(reply)) => {
                    let consumed = &before[..before.len() - input.len()];
                    let mut again = BytesMut::new();
                    reply.encode(&mut again);
                    let lossy = matches!(reply, Reply::Failed { .. })
                        && std::str::from_utf8(&consumed[5..]).is_err();
                    assert!(
                        lossy || again[..] == consumed[..],
                        "{reply:?} re-encodes differently"
                    );
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.decode_eof(&mut input);
}

/// The dedup stream decoder. Odd `data[0]`: the rest is fed as dedup frames in reads
/// of `data[0] / 2 + 1` bytes (hostile input: must end in `Ok` or a typed error).
/// Even `data[0]`: the rest is taken as a QEMU stream, or as a multifd channel if it
/// starts like one; whatever the QEMU (or multifd) decoder accepts goes through the
/// dedup encoder and decoder, which must give the same bytes back, and then with one
/// byte of the dedup stream flipped (at a position drawn from the data), which must
/// fail without releasing a wrong byte.
pub fn dedup_decode(data: &[u8]) {
    use crate::dedup::DedupEncoder;
    use crate::qemu::multifd::{MultifdDecoder, MultifdEncoder, wire::is_channel_start};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        let _ = dedup_round(rest, usize::from(mode / 2) + 1);
        return;
    }
    // the records the QEMU (or multifd) decoder accepts, and their exact bytes
    let (mut input, mut expected) = (BytesMut::from(rest), BytesMut::new());
    let mut enc =
        DedupEncoder::with_default_resolvers().with_batch_size(1 + usize::from(mode) * 64);
    let mut wire = BytesMut::new();
    if is_channel_start(rest) == Some(true) {
        let (mut records, mut channel) = (MultifdDecoder::new(), MultifdEncoder::new());
        while let Ok(Some(record)) = records.decode_eof(&mut input) {
            channel
                .encode(&record, &mut expected)
                .expect("a decoded record encodes");
            if enc.encode_channel(&record, &mut wire).is_err() {
                return;
            }
        }
    } else {
        let (mut records, mut qemu) = (QemuDecoder::new(), QemuEncoder::new());
        while let Ok(Some(record)) = records.decode_eof(&mut input) {
            qemu.encode(&record, &mut expected)
                .expect("a decoded record encodes");
            if enc.encode(&record, &mut wire).is_err() {
                return;
            }
        }
    }
    enc.finish(&mut wire).expect("finishing a dedup stream");
    let (out, err) = dedup_round(&wire, 1 + usize::from(mode));
    assert!(
        err.is_none(),
        "dedup stream of accepted records failed: {err:?}"
    );
    assert!(out[..] == expected[..], "decode(encode(x)) != x");
    let at = rest.iter().fold(0usize, |h, &b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    }) % wire.len();
    wire[at] ^= 0x01;
    let (out, err) = dedup_round(&wire, 1 + usize::from(mode));
    assert!(
        err.is_some(),
        "a flipped byte at {at} of {} went unnoticed",
        wire.len()
    );
    assert!(
        expected.starts_with(&out),
        "bytes released after a flip differ"
    );
}

/// Decodes a dedup stream fed in reads of `read` bytes: the QEMU bytes released and
/// the error, if any.
fn dedup_round(wire: &[u8], read: usize) -> (Vec<u8>, Option<crate::Error>) {
    use crate::dedup::Decoded;
    let mut dec = crate::dedup::DedupDecoder::with_default_resolvers();
    let (mut buf, mut out) = (BytesMut::new(), Vec::new());
    let mut chunks = wire.chunks(read);
    loop {
        match dec.decode(&mut buf) {
            Ok(Decoded::Qemu(bytes)) => out.extend_from_slice(&bytes),
            // more input, or (after END) the check that nothing follows it
            Ok(Decoded::NeedInput | Decoded::Done) => match chunks.next() {
                Some(chunk) => buf.extend_from_slice(chunk),
                None => loop {
                    match dec.decode_eof(&mut buf) {
                        Ok(Decoded::Qemu(bytes)) => out.extend_from_slice(&bytes),
                        Ok(_) => return (out, None),
                        Err(e) => return (out, Some(e)),
                    }
                },
            },
            Ok(decoded) => unreachable!("the default resolvers never wait: {decoded:?}"),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// A multifd channel decoded from `data[1..]` in reads of `data[0]`² bytes (0: all
/// at once), every record re-encoded: the output must equal the consumed input after
/// each record, and the records and the error (kind, offset, field) must be the same
/// as when the whole input is decoded at once.
pub fn multifd_decode(data: &[u8]) {
    use crate::qemu::multifd::{Limits, MultifdDecoder, MultifdEncoder};
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let read = match seed {
        0 => input.len().max(1),
        n => usize::from(n) * usize::from(n),
    };
    let limits = Limits {
        max_device_state_len: 1 << 20,
        ..Limits::default()
    };
    let run = |read: usize| {
        let (records, err) = round_trip(
            MultifdDecoder::with_limits(limits.clone()),
            MultifdEncoder::new(),
            MultifdDecoder::offset,
            input,
            read,
        );
        (records, err.map(|e| (e.kind(), e.offset(), e.field())))
    };
    let (records, err) = run(read);
    let (whole, whole_err) = run(input.len().max(1));
    assert!(records == whole, "records depend on the read size");
    assert_eq!(err, whole_err, "the error depends on the read size");
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// A fuzz target's entry point.
    type EntryPoint = fn(&[u8]);

    /// Runs every file of every target's checked-in seed corpus (made by
    /// `tests/fuzz_seeds.rs`) through the target's entry point.
    #[test]
    fn every_fuzz_corpus_replays() {
        #[cfg_attr(not(feature = "dht"), allow(unused_mut))]
        let mut targets: Vec<(&str, EntryPoint)> = vec![
            ("qemu_decode", super::qemu_decode),
            ("multifd_decode", super::multifd_decode),
            ("dedup_decode", super::dedup_decode),
            ("reply_decode", super::reply_decode),
            ("xbzrle", super::xbzrle),
            ("lz4_encode", super::lz4_encode),
            ("catalog_load", super::catalog_load),
        ];
        #[cfg(feature = "dht")]
        targets.push(("dht_manifest", super::dht_manifest));
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, entry_point) in targets {
            let mut count = 0;
            for entry in std::fs::read_dir(corpus.join(target)).expect("the seed corpus exists") {
                let path = entry.expect("corpus entry").path();
                // shown only if the seed fails
                eprintln!("{target}: {}", path.display());
                entry_point(&std::fs::read(&path).expect("corpus file"));
                count += 1;
            }
            assert!(
                count >= 10,
                "seed corpus of {target} has only {count} inputs"
            );
        }
    }
}
