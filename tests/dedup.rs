//! The dedup stream: `decode(encode(x)) == x` on real QEMU streams, and every damage
//! to the dedup stream is detected before damaged QEMU bytes are released.

mod support;

use bytes::BytesMut;
use migstream::ErrorKind;
use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
use migstream::resolve::{Claim, Page, PageAt, PageOut, Restore};
use proptest::prelude::*;

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// QEMU stream → dedup stream, feeding the QEMU decoder in reads of `read` bytes.
fn encode_with(mut enc: DedupEncoder, qemu: &[u8], read: usize) -> Vec<u8> {
    let (records, err) = support::decode_reads(qemu, read);
    assert!(err.is_none(), "{err:?}");
    let mut wire = BytesMut::new();
    for r in &records {
        enc.encode(r, &mut wire).unwrap();
    }
    enc.finish(&mut wire).unwrap();
    wire.to_vec()
}

/// Dedup stream → QEMU bytes released, fed in reads of `read` bytes; the error if any.
fn decode_with(
    mut dec: DedupDecoder,
    wire: &[u8],
    read: usize,
) -> (Vec<u8>, Option<migstream::Error>) {
    let (mut buf, mut out) = (BytesMut::new(), Vec::new());
    let mut chunks = wire.chunks(read.max(1));
    loop {
        let step = match buf.is_empty() && chunks.len() == 0 {
            false => dec.decode(&mut buf),
            true => dec.decode_eof(&mut buf),
        };
        match step {
            Ok(Decoded::Qemu(bytes)) => out.extend_from_slice(&bytes),
            // more input, or (after END) the check that nothing follows it
            Ok(Decoded::NeedInput | Decoded::Done) => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => {
                    return match dec.decode_eof(&mut buf) {
                        Ok(_) => (out, None),
                        Err(e) => (out, Some(e)),
                    };
                }
            },
            Ok(other) => panic!("these resolvers never wait: {other:?}"),
            Err(e) => return (out, Some(e)),
        }
    }
}

#[test]
fn bundled_streams_round_trip() {
    for name in ["qemu-7.2-pc-paused.mig", "qemu-10.0-q35-paused.mig"] {
        let qemu = testdata(name);
        let wire = encode_with(DedupEncoder::with_default_resolvers(), &qemu, 1 << 16);
        for read in [1 << 20, 4096, 333] {
            let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &wire, read);
            assert!(err.is_none(), "{name}: {err:?}");
            assert!(out == qemu, "{name}: decode(encode(x)) != x");
        }
        eprintln!("{name}: {} -> {} bytes", qemu.len(), wire.len());
    }
}

/// Batches compressed on 2 or 4 threads make the same frames as on the caller's
/// thread, whatever the flushes in between (a QEMU side going quiet), with small
/// batches so that many are in flight at once; and they decode to the stream.
#[test]
fn threads_make_the_same_frames() {
    for name in ["qemu-7.2-pc-paused.mig", "qemu-10.0-q35-paused.mig"] {
        let qemu = testdata(name);
        let (records, err) = support::decode_reads(&qemu, 1 << 16);
        assert!(err.is_none(), "{err:?}");
        for flush_every in [0, 1, 7, 100] {
            let encode = |threads| {
                let mut enc = DedupEncoder::with_default_resolvers()
                    .with_batch_size(4096)
                    .with_threads(threads);
                let mut wire = BytesMut::new();
                for (i, r) in records.iter().enumerate() {
                    enc.encode(r, &mut wire).unwrap();
                    if flush_every > 0 && i % flush_every == 0 {
                        enc.flush(&mut wire).unwrap();
                    }
                }
                enc.finish(&mut wire).unwrap();
                (wire, enc.digest(), enc.stats().clone())
            };
            let (one, digest, stats) = encode(1);
            assert!(stats.wire_bytes as usize == one.len() && one.len() < qemu.len());
            for threads in [2, 4] {
                let (wire, d, s) = encode(threads);
                assert!(
                    wire == one,
                    "{name}: {threads} threads, flush every {flush_every}"
                );
                assert_eq!((d, s), (digest, stats.clone()));
            }
            let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &one, 4096);
            assert!(err.is_none() && out == qemu, "{name}: {err:?}");
        }
    }
}

#[test]
fn every_flipped_byte_is_detected_before_release() {
    let qemu = testdata("qemu-10.0-q35-paused.mig");
    let enc = DedupEncoder::with_default_resolvers().with_batch_size(16 << 10);
    let wire = encode_with(enc, &qemu, 1 << 20);
    // every byte of the small frames, and a stride through the rest
    let positions: Vec<usize> = (0..120)
        .chain((120..wire.len()).step_by(401))
        .chain(wire.len() - 120..wire.len())
        .collect();
    for at in positions {
        let mut bad = wire.clone();
        bad[at] ^= 0x20;
        let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &bad, 1 << 20);
        assert!(err.is_some(), "flip at {at} went unnoticed");
        assert!(
            out.len() < qemu.len() && qemu.starts_with(&out),
            "flip at {at}: released {} bytes",
            out.len()
        );
    }
}

#[test]
fn truncation_is_an_error_and_releases_only_a_prefix() {
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let enc = DedupEncoder::with_default_resolvers().with_batch_size(8 << 10);
    let wire = encode_with(enc, &qemu, 1 << 20);
    for cut in (0..wire.len()).step_by(97) {
        let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &wire[..cut], 1000);
        let err = err.unwrap_or_else(|| panic!("cut at {cut} not detected"));
        assert_eq!(err.kind(), ErrorKind::Truncated, "cut {cut}: {err}");
        assert!(qemu.starts_with(&out), "cut {cut}");
    }
}

/// A resolver from outside the crate: pages whose bytes count up 0, 1, 2, ...
struct Ramp;

fn is_ramp(page: &[u8]) -> bool {
    page.iter().enumerate().all(|(i, &b)| b == i as u8)
}

impl Claim for Ramp {
    fn tag(&self) -> u8 {
        0x80
    }
    fn claim(&mut self, page: &Page<'_>, _body: &mut Vec<u8>) -> bool {
        is_ramp(page.data)
    }
}

impl Restore for Ramp {
    fn tag(&self) -> u8 {
        0x80
    }
    fn restore(
        &mut self,
        _at: PageAt<'_>,
        _body: &[u8],
        out: &mut PageOut<'_>,
    ) -> migstream::Result<()> {
        out.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = i as u8);
        Ok(())
    }
}

/// A restore half that refuses every body, as a custom resolver reports it.
struct Refusing;

impl Restore for Refusing {
    fn tag(&self) -> u8 {
        0x80
    }
    fn restore(&mut self, _: PageAt<'_>, _: &[u8], _: &mut PageOut<'_>) -> migstream::Result<()> {
        Err(migstream::Error::resolver(0x80, "not a ramp I know"))
    }
}

/// A restore half that returns without writing its page.
struct Forgetful;

impl Restore for Forgetful {
    fn tag(&self) -> u8 {
        0x80
    }
    fn restore(&mut self, _: PageAt<'_>, _: &[u8], _: &mut PageOut<'_>) -> migstream::Result<()> {
        Ok(())
    }
}

#[test]
fn a_custom_resolver_plugs_in() {
    use bytes::Bytes;
    use migstream::qemu::{RamRecord, Record};
    let ramp: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    let mut records = support::sample_records();
    records.insert(
        9,
        Record::Ram(RamRecord::Page {
            addr: support::page_addr("pc.ram", 3, true),
            data: Bytes::from(ramp),
        }),
    );
    let qemu = support::encode(&records);
    let enc = DedupEncoder::new(vec![Box::new(Ramp)]).unwrap();
    let mut wire = BytesMut::new();
    let mut enc = enc;
    for r in support::decode(&qemu, 1 << 20) {
        enc.encode(&r, &mut wire).unwrap();
    }
    enc.finish(&mut wire).unwrap();
    assert_eq!(enc.stats().pages(0x80), 1);
    let (out, err) = decode_with(DedupDecoder::new(vec![Box::new(Ramp)]).unwrap(), &wire, 100);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(out, qemu);
    // without the resolver the destination refuses rather than guessing
    let (_, err) = decode_with(DedupDecoder::new(vec![]).unwrap(), &wire, 100);
    assert_eq!(err.unwrap().kind(), ErrorKind::Malformed);
    // a resolver that writes no page fails its frame where the page is missing
    let (out, err) = decode_with(
        DedupDecoder::new(vec![Box::new(Forgetful)]).unwrap(),
        &wire,
        100,
    );
    let err = err.expect("a page was not written");
    assert_eq!(err.kind(), ErrorKind::Malformed);
    assert_eq!(err.field(), Some("batch entry"), "{err}");
    assert!(out.len() < qemu.len());
    // a resolver's own error names its tag and the frame's stream offset
    let (_, err) = decode_with(
        DedupDecoder::new(vec![Box::new(Refusing)]).unwrap(),
        &wire,
        100,
    );
    let err = err.expect("refused");
    assert_eq!(err.kind(), ErrorKind::Resolver);
    assert!(err.offset().unwrap() > 0, "{err}");
    assert!(
        err.to_string().contains("0x80") && err.to_string().contains("not a ramp"),
        "{err}"
    );
}

/// A resolver whose tag the format reserves.
struct Squatter(u8);

impl Claim for Squatter {
    fn tag(&self) -> u8 {
        self.0
    }
    fn claim(&mut self, _: &Page<'_>, _: &mut Vec<u8>) -> bool {
        false
    }
}

#[test]
fn reserved_or_repeated_tags_are_refused_when_an_end_is_built() {
    for tag in [0x00, 0x01, 0x06, 0x7f] {
        let err = DedupEncoder::new(vec![Box::new(Squatter(tag))]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{tag:#x}: {err}");
    }
    assert!(DedupEncoder::new(vec![Box::new(Squatter(0x80)), Box::new(Squatter(0x80))]).is_err());
    assert!(DedupDecoder::new(vec![Box::new(Ramp), Box::new(Forgetful)]).is_err());
    assert!(DedupEncoder::new(vec![Box::new(Squatter(0x80)), Box::new(Squatter(0xff))]).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn reads_and_batch_sizes_do_not_matter(read in 1usize..5000, batch in 1usize..100_000) {
        let qemu = testdata("qemu-7.2-pc-paused.mig");
        let wire = encode_with(DedupEncoder::with_default_resolvers().with_batch_size(batch), &qemu, read);
        let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &wire, read);
        prop_assert!(err.is_none());
        prop_assert!(out == qemu);
    }
}

#[tokio::test]
async fn async_adapters_over_pipes() {
    use futures::{SinkExt, StreamExt};
    use migstream::dedup::DedupFrames;
    use migstream::qemu::QemuDecoder;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};

    let qemu = testdata("qemu-10.0-q35-paused.mig");
    // QEMU -> source proxy over a small pipe, source proxy -> destination proxy over another
    let (mut from_qemu, qemu_rx) = tokio::io::duplex(8192);
    let (wan_tx, wan_rx) = tokio::io::duplex(8192);
    let input = qemu.clone();
    let qemu_side = tokio::spawn(async move {
        from_qemu.write_all(&input).await.unwrap();
        from_qemu.shutdown().await.unwrap();
    });
    let source = tokio::spawn(async move {
        let records = FramedRead::new(qemu_rx, QemuDecoder::new());
        let mut frames =
            DedupFrames::new(records, DedupEncoder::with_default_resolvers(), 64 << 10);
        let mut wan = FramedWrite::new(wan_tx, BytesCodec::new());
        while let Some(chunk) = frames.next().await {
            wan.send(chunk.unwrap()).await.unwrap();
        }
        SinkExt::<bytes::Bytes>::close(&mut wan).await.unwrap();
        frames.stats().clone()
    });
    let mut out = Vec::new();
    let mut dest = FramedRead::new(wan_rx, DedupDecoder::with_default_resolvers());
    while let Some(bytes) = dest.next().await {
        out.extend_from_slice(&bytes.unwrap());
    }
    qemu_side.await.unwrap();
    let stats = source.await.unwrap();
    assert_eq!(stats.qemu_bytes, qemu.len() as u64);
    assert!(out == qemu, "destination bytes differ");
}

#[cfg(feature = "zstd")]
#[test]
fn zstd_batches_round_trip_and_are_smaller() {
    use migstream::dedup::Compression;
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let lz4 = encode_with(DedupEncoder::with_default_resolvers(), &qemu, 1 << 20);
    let enc = DedupEncoder::with_default_resolvers().with_compression(Compression::Zstd(3));
    let zstd = encode_with(enc, &qemu, 1 << 20);
    assert!(
        zstd.len() < lz4.len(),
        "zstd {} lz4 {}",
        zstd.len(),
        lz4.len()
    );
    let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &zstd, 4096);
    assert!(err.is_none(), "{err:?}");
    assert!(out == qemu);
}

#[test]
fn accelerated_lz4_batches_round_trip_with_any_decoder() {
    use migstream::dedup::Compression;
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let plain = encode_with(DedupEncoder::with_default_resolvers(), &qemu, 1 << 20);
    for n in [1, 4, 1000] {
        let enc =
            DedupEncoder::with_default_resolvers().with_compression(Compression::Lz4Accelerated(n));
        let fast = encode_with(enc, &qemu, 1 << 20);
        // the same entries, only the LZ4 blocks differ; 1000 hardly looks for matches
        let slack = qemu.len() / 10;
        assert!(
            n > 4 || fast.len() < plain.len() + slack,
            "acceleration {n}: {} bytes, lz4_flex {}",
            fast.len(),
            plain.len()
        );
        let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &fast, 4096);
        assert!(err.is_none(), "acceleration {n}: {err:?}");
        assert!(out == qemu, "acceleration {n}: decoded bytes differ");
    }
}

#[test]
fn templates_round_trip_and_a_wrong_catalog_is_refused() {
    use migstream::template::{Catalog, CatalogBuilder, TemplateIndex, Threshold};
    use std::sync::Arc;
    let path = format!(
        "{}/testdata/qemu-7.2-pc-paused.mig",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut builder = CatalogBuilder::new(Threshold::Occurrences(1));
    builder.add(&path).unwrap();
    let catalog = Arc::new(builder.build().unwrap());
    assert!(catalog.len() > 40);
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let index = Arc::new(TemplateIndex::new(&catalog));
    let mut enc = DedupEncoder::with_templates(index);
    let mut wire = BytesMut::new();
    for r in support::decode(&qemu, 1 << 20) {
        enc.encode(&r, &mut wire).unwrap();
    }
    enc.finish(&mut wire).unwrap();
    assert_eq!(
        enc.stats().pages(migstream::resolve::tag::TEMPLATE),
        catalog.len() as u64
    );
    let (out, err) = decode_with(DedupDecoder::with_templates(catalog.clone()), &wire, 5000);
    assert!(err.is_none(), "{err:?}");
    assert!(out == qemu);
    // another catalog, or none: refused at the HELLO, before any QEMU byte
    let other = Arc::new(Catalog::from_pages(4096, [vec![7u8; 4096]]).unwrap());
    for dec in [
        DedupDecoder::with_templates(other),
        DedupDecoder::with_default_resolvers(),
    ] {
        let (out, err) = decode_with(dec, &wire, 5000);
        assert_eq!(err.unwrap().kind(), ErrorKind::CatalogMismatch);
        assert!(out.is_empty());
    }
}

#[test]
fn an_empty_stream_is_hello_and_end() {
    let mut wire = BytesMut::new();
    DedupEncoder::with_default_resolvers()
        .finish(&mut wire)
        .unwrap();
    let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &wire, 7);
    assert!(err.is_none() && out.is_empty(), "{err:?}");
}

#[test]
fn output_per_frame_is_bounded_on_both_ends() {
    use bytes::Bytes;
    use migstream::dedup::{Limits, MAX_FRAME_QEMU_BYTES};
    use migstream::qemu::{RamRecord, Record};
    // 6000 one-byte-filled pages: a few bytes each in the batch, 4 KiB each out
    let mut records = vec![
        Record::Header,
        Record::SectionStart(support::section(1, "ram", 0, 4)),
    ];
    records.push(support::mem_size(&[("pc.ram", 6000 * 4096)]));
    for page in 0..6000 {
        records.push(Record::Ram(RamRecord::Page {
            addr: support::page_addr("pc.ram", page, page > 0),
            data: Bytes::from(vec![0x11; 4096]),
        }));
    }
    records.push(Record::Ram(RamRecord::Eos));
    records.push(Record::Eof);
    let qemu = support::encode(&records);
    let wire = encode_with(DedupEncoder::with_default_resolvers(), &qemu, 1 << 20);
    // the encoder cut frames at MAX_FRAME_QEMU_BYTES of output, though the batch is small
    let mut small = Limits::default();
    small.max_output = MAX_FRAME_QEMU_BYTES + (1 << 20);
    let (out, err) = decode_with(
        DedupDecoder::with_default_resolvers().with_limits(small),
        &wire,
        1 << 16,
    );
    assert!(err.is_none(), "{err:?}");
    assert!(out == qemu);
    // a decoder allowing less refuses before building more than its limit
    let mut tiny = Limits::default();
    tiny.max_output = 1 << 20;
    let (_, err) = decode_with(
        DedupDecoder::with_default_resolvers().with_limits(tiny),
        &wire,
        1 << 16,
    );
    assert_eq!(err.unwrap().kind(), ErrorKind::LimitExceeded);
}

/// The codecs under tokio-util: QEMU records into a `FramedWrite` of dedup frames,
/// ended by `End`, and back out of a `FramedRead`.
#[tokio::test]
async fn the_codecs_work_as_tokio_util_encoder_and_decoder() {
    use futures::{SinkExt, StreamExt};
    use migstream::dedup::End;
    use tokio_util::codec::{FramedRead, FramedWrite};
    let qemu = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/qemu-10.0-q35-paused.mig"
    ))
    .unwrap();
    let mut wire = Vec::new();
    let mut frames = FramedWrite::new(&mut wire, DedupEncoder::with_default_resolvers());
    for record in support::decode(&qemu, 1 << 20) {
        frames.send(record).await.unwrap();
    }
    // `send` flushes: the END frame is out
    frames.send(End).await.unwrap();
    drop(frames);
    assert!(wire.len() < qemu.len());
    let mut back = FramedRead::new(&wire[..], DedupDecoder::with_default_resolvers());
    let mut rebuilt = Vec::new();
    while let Some(bytes) = back.next().await {
        rebuilt.extend_from_slice(&bytes.unwrap());
    }
    assert!(
        rebuilt == qemu,
        "decode(encode(x)) == x through FramedWrite and FramedRead"
    );
}

/// A multifd channel's bytes → its dedup stream, the channel decoder fed in reads
/// of `read` bytes.
fn encode_channel_with(enc: &mut DedupEncoder, channel: &[u8], read: usize) -> Vec<u8> {
    use migstream::qemu::multifd::MultifdDecoder;
    let (mut dec, mut input, mut wire) = (MultifdDecoder::new(), BytesMut::new(), BytesMut::new());
    for chunk in channel.chunks(read) {
        input.extend_from_slice(chunk);
        while let Some(record) = dec.decode(&mut input).unwrap() {
            enc.encode_channel(&record, &mut wire).unwrap();
        }
    }
    assert!(dec.decode_eof(&mut input).unwrap().is_none());
    enc.finish(&mut wire).unwrap();
    wire.to_vec()
}

/// Every bundled multifd channel (real excerpts and each version's quirks: stale
/// slots, zero pages, SYNC-only packets, zstd payloads, device state) comes back byte
/// for byte through the dedup stream, whatever the reads, and says it is a channel.
#[test]
fn multifd_channels_round_trip() {
    let dir = format!("{}/testdata/multifd", env!("CARGO_MANIFEST_DIR"));
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "mfd") {
            continue;
        }
        let channel = std::fs::read(&path).unwrap();
        for read in [1, 700, 1 << 20] {
            let mut enc = DedupEncoder::with_default_resolvers();
            let wire = encode_channel_with(&mut enc, &channel, read);
            let mut dec = DedupDecoder::with_default_resolvers();
            let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &wire, 333);
            assert!(err.is_none(), "{}: {err:?}", path.display());
            assert_eq!(out, channel, "{} (reads of {read})", path.display());
            let mut all = BytesMut::from(&wire[..]);
            while let Decoded::Qemu(_) = dec.decode_eof(&mut all).unwrap() {}
            assert!(dec.hello().unwrap().channel > 0, "{}", path.display());
        }
        files += 1;
    }
    assert!(files >= 8, "only {files} channel files");
}

/// Pages travel as page entries on a channel (fill, seen-before), compressed packets
/// as they are and counted as opaque; a flipped byte anywhere is caught.
#[test]
fn multifd_channel_pages_are_deduplicated_and_damage_is_caught() {
    let raw = testdata("multifd/qemu-7.2-nocomp.mfd");
    let mut enc = DedupEncoder::with_default_resolvers();
    let wire = encode_channel_with(&mut enc, &raw, 1 << 20);
    let pages: u64 = enc.stats().named_pages().map(|(_, n)| n).sum();
    assert!(pages > 0, "{:?}", enc.stats());
    assert_eq!(enc.stats().opaque_bytes, 0);
    assert_eq!(enc.stats().qemu_bytes, raw.len() as u64);
    for at in (0..wire.len()).step_by(7) {
        let mut bad = wire.clone();
        bad[at] ^= 0x20;
        let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &bad, 4096);
        assert!(err.is_some(), "flip at {at} went unseen");
        assert!(raw.starts_with(&out), "flip at {at} released damaged bytes");
    }

    let zstd = testdata("multifd/qemu-10.0-zstd.mfd");
    let mut enc = DedupEncoder::with_default_resolvers();
    encode_channel_with(&mut enc, &zstd, 1 << 20);
    assert!(enc.stats().opaque_bytes > 0);
}

/// One encoder carries one connection: a channel record after main-channel records,
/// or the other way round, is refused before anything is written.
#[test]
fn an_encoder_carries_one_kind_of_connection() {
    use migstream::qemu::multifd::MultifdDecoder;
    let channel = testdata("multifd/qemu-10.0-nocomp.mfd");
    let mut input = BytesMut::from(&channel[..]);
    let greeting = MultifdDecoder::new().decode(&mut input).unwrap().unwrap();
    let (records, _) = support::decode_reads(&testdata("qemu-7.2-pc-paused.mig"), 1 << 20);
    let mut wire = BytesMut::new();
    let mut main = DedupEncoder::with_default_resolvers();
    main.encode(&records[0], &mut wire).unwrap();
    let refused = main.encode_channel(&greeting, &mut wire).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidRecord, "{refused}");
    let mut chan = DedupEncoder::with_default_resolvers();
    chan.encode_channel(&greeting, &mut wire).unwrap();
    let refused = chan.encode(&records[0], &mut wire).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidRecord, "{refused}");
}

/// Every channel QEMU wrote in the captured multifd migrations
/// (`harness/capture-multifd.py`, `$MIGSTREAM_STREAMS/multifd`) comes back byte for
/// byte through the dedup stream; prints each capture's ratio, channels against the
/// main channel.
#[test]
#[ignore = "needs the multifd captures: $MIGSTREAM_STREAMS/multifd (the README's test command)"]
fn captured_multifd_channels_round_trip_through_the_dedup_stream() {
    let streams = std::env::var_os("MIGSTREAM_STREAMS").expect("MIGSTREAM_STREAMS");
    let dir = std::path::Path::new(&streams).join("multifd");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "mfd"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "{} channel files in {}",
        files.len(),
        dir.display()
    );
    for path in files {
        let channel = std::fs::read(&path).unwrap();
        let mut enc = DedupEncoder::with_default_resolvers();
        let wire = encode_channel_with(&mut enc, &channel, 1 << 16);
        let (out, err) = decode_with(DedupDecoder::with_default_resolvers(), &wire, 1 << 16);
        assert!(err.is_none(), "{}: {err:?}", path.display());
        assert!(out == channel, "{} differs", path.display());
        let pages: Vec<String> = enc
            .stats()
            .named_pages()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        eprintln!(
            "{}: {} -> {} bytes, ratio {:.3}, opaque {} ({})",
            path.file_name().unwrap().to_string_lossy(),
            channel.len(),
            wire.len(),
            enc.stats().ratio(),
            enc.stats().opaque_bytes,
            pages.join(" ")
        );
    }
}
