//! Byte-exact round trips of streams written by real QEMU 7.2 and 10.0, captured by
//! `harness/capture-matrix.sh` (file streams and live TCP migrations, with and without
//! xbzrle and multifd). The test is `#[ignore]`d, so plain `cargo test` lists it as
//! ignored; the README's test command (`scripts/test.sh`) captures the streams, sets
//! `MIGSTREAM_STREAMS` and runs it with `--include-ignored`, where a missing capture
//! is a failure.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use migstream::qemu::{QemuDecoder, QemuEncoder, RamRecord, Record};

struct Capture {
    file: PathBuf,
    qemu: String,
    machine: String,
    workload: String,
    kind: String,
    caps: String,
}

fn captures() -> Vec<Capture> {
    let dir = std::env::var_os("MIGSTREAM_STREAMS")
        .map(PathBuf::from)
        .expect("MIGSTREAM_STREAMS must name a directory of captures (run scripts/test.sh)");
    let manifest = std::fs::read_to_string(dir.join("manifest.tsv"))
        .unwrap_or_else(|e| panic!("{}/manifest.tsv: {e}", dir.display()));
    let captures: Vec<Capture> = manifest
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert!(
                f.len() >= 6,
                "manifest line with fewer than 6 fields: {line}"
            );
            Capture {
                file: dir.join(f[0]),
                qemu: f[1].into(),
                machine: f[2].into(),
                workload: f[3].into(),
                kind: f[4].into(),
                caps: f[5].into(),
            }
        })
        .collect();
    assert!(!captures.is_empty(), "empty manifest in {}", dir.display());
    captures
}

/// Decodes `bytes` in reads whose sizes cycle through `reads`, re-encodes every record,
/// asserts the output is the input, and counts records by kind.
fn round_trip(bytes: &[u8], reads: &[usize]) -> BTreeMap<&'static str, usize> {
    let (mut dec, mut enc) = (QemuDecoder::new(), QemuEncoder::new());
    let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
    let mut counts = BTreeMap::new();
    let mut compared = 0;
    let (mut fed, mut reads) = (0, reads.iter().cycle());
    loop {
        let record = match fed == bytes.len() {
            true => dec.decode_eof(&mut buf),
            false => dec.decode(&mut buf),
        };
        let record = record.unwrap_or_else(|e| panic!("decode failed: {e}"));
        let Some(record) = record else {
            if fed == bytes.len() {
                break;
            }
            let end = (fed + reads.next().unwrap()).min(bytes.len());
            buf.extend_from_slice(&bytes[fed..end]);
            fed = end;
            continue;
        };
        *counts.entry(kind(&record)).or_default() += 1;
        enc.encode(&record, &mut out).unwrap();
        if out.len() > 1 << 20 {
            assert!(
                out[..] == bytes[compared..compared + out.len()],
                "output differs near byte {compared}"
            );
            compared += out.len();
            out.clear();
        }
    }
    assert!(
        out[..] == bytes[compared..],
        "output differs near byte {compared}"
    );
    assert_eq!(compared + out.len(), bytes.len());
    counts
}

fn kind(record: &Record) -> &'static str {
    match record {
        Record::Ram(RamRecord::Page { .. }) => "page",
        Record::Ram(RamRecord::Zero { .. }) => "zero",
        Record::Ram(RamRecord::Xbzrle { .. }) => "xbzrle",
        Record::Ram(RamRecord::MultifdFlush) => "flush",
        Record::SectionPart { .. } => "part",
        Record::SectionFull(_) => "full",
        Record::Eof => "eof",
        Record::VmDescription(_) => "vmdesc",
        // how device state is chunked depends on the reads: counted apart
        Record::Opaque(_) => "opaque chunk",
        _ => "other",
    }
}

#[test]
#[ignore = "needs real QEMU captures: scripts/test.sh runs it"]
fn real_qemu_streams_round_trip_byte_exact() {
    let captures = captures();
    let mut versions = BTreeMap::new();
    for c in &captures {
        let name = c.file.display();
        let bytes = std::fs::read(&c.file).unwrap_or_else(|e| panic!("{name}: {e}"));
        let whole = round_trip(&bytes, &[bytes.len()]);
        let socket_like = round_trip(&bytes, &[65536, 1, 4095, 7, 131072, 4097, 333]);
        let without_chunks = |mut counts: BTreeMap<&'static str, usize>| {
            counts.remove("opaque chunk");
            counts
        };
        assert_eq!(
            without_chunks(whole.clone()),
            without_chunks(socket_like),
            "{name}: records depend on read sizes"
        );
        let n = |k| whole.get(k).copied().unwrap_or(0);
        assert_eq!(
            (n("eof"), n("vmdesc"), n("full")),
            (1, 1, 1),
            "{name}: tail"
        );
        if c.caps.contains("multifd") {
            assert_eq!(
                n("page"),
                0,
                "{name}: multifd main channel carries no page data"
            );
        } else {
            assert!(n("page") > 0, "{name}: no pages");
        }
        if c.caps.contains("xbzrle") {
            assert!(
                n("xbzrle") > 0,
                "{name}: xbzrle capability but no XBZRLE records"
            );
        }
        if c.workload == "dirty" && c.kind == "live" {
            assert!(n("part") >= 3, "{name}: a dirty live migration iterates");
        }
        eprintln!(
            "{name}: {} bytes, qemu {} {} {} {} [{}]: {whole:?}",
            bytes.len(),
            c.qemu,
            c.machine,
            c.workload,
            c.kind,
            c.caps
        );
        *versions.entry(c.qemu.clone()).or_insert(0) += 1;
    }
    assert!(
        versions.len() >= 2,
        "streams of both QEMU 7.2 and 10.0 expected, got {versions:?}"
    );
}

/// Replays the pages of QEMU's own xbzrle captures and checks, for every XBZRLE record,
/// that our decoder accepts it on top of the page the destination holds and that our
/// encoder, given that page and the result, writes exactly QEMU's bytes.
#[test]
#[ignore = "needs real QEMU captures: scripts/test.sh runs it"]
fn qemu_xbzrle_deltas_decode_and_re_encode_exactly() {
    use migstream::xbzrle::{self, Delta};
    use std::collections::HashMap;

    let captures: Vec<Capture> = captures()
        .into_iter()
        .filter(|c| c.caps.contains("xbzrle"))
        .collect();
    assert!(
        captures.len() >= 2,
        "xbzrle captures of both QEMU versions expected"
    );
    for c in &captures {
        let bytes = std::fs::read(&c.file).unwrap();
        let (records, err) = support::decode_reads(&bytes, 1 << 20);
        assert!(err.is_none(), "{}: {err:?}", c.file.display());
        let mut pages: HashMap<(bytes::Bytes, u64), Vec<u8>> = HashMap::new();
        let mut verified = 0;
        for record in records {
            let Record::Ram(ram) = record else { continue };
            match ram {
                RamRecord::Page { addr, data } => {
                    pages.insert((addr.block, addr.offset), data.to_vec());
                }
                RamRecord::Zero { addr, fill } => {
                    pages.insert((addr.block, addr.offset), vec![fill; 4096]);
                }
                RamRecord::Xbzrle { addr, data } => {
                    // a page never sent is still the destination's initial zeros
                    let old = pages
                        .get(&(addr.block.clone(), addr.offset))
                        .cloned()
                        .unwrap_or(vec![0; 4096]);
                    let mut new = old.clone();
                    xbzrle::decode(&data, &mut new)
                        .unwrap_or_else(|e| panic!("{}: {e}", c.file.display()));
                    let mut out = vec![0; 4096];
                    assert_eq!(
                        xbzrle::encode(&old, &new, &mut out),
                        Delta::Encoded(data.len())
                    );
                    assert!(
                        out[..data.len()] == data[..],
                        "{}: re-encoded delta differs",
                        c.file.display()
                    );
                    pages.insert((addr.block, addr.offset), new);
                    verified += 1;
                }
                _ => {}
            }
        }
        assert!(verified > 0, "{}: no XBZRLE records", c.file.display());
        eprintln!(
            "{}: {verified} XBZRLE records decoded and re-encoded exactly",
            c.file.display()
        );
    }
}

/// `decode(encode(x)) == x` through the dedup stream with the built-in resolvers, on
/// every capture; prints the ratio of dedup bytes to QEMU bytes.
#[test]
#[ignore = "needs real QEMU captures: scripts/test.sh runs it"]
fn dedup_stream_round_trips_real_qemu_streams() {
    use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
    use migstream::resolve::tag;

    for c in &captures() {
        let name = c.file.display();
        let bytes = std::fs::read(&c.file).unwrap();
        let (mut dec, mut enc) = (QemuDecoder::new(), DedupEncoder::with_default_resolvers());
        let (mut input, mut wire) = (BytesMut::from(&bytes[..]), BytesMut::new());
        while let Some(record) = dec.decode_eof(&mut input).unwrap() {
            enc.encode(&record, &mut wire).unwrap();
        }
        enc.finish(&mut wire).unwrap();
        let pages = enc.stats().clone();
        let wire_len = wire.len();
        let mut back = DedupDecoder::with_default_resolvers();
        let mut compared = 0;
        while let Decoded::Qemu(out) = back
            .decode_eof(&mut wire)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
        {
            assert!(
                out[..] == bytes[compared..compared + out.len()],
                "{name}: differs near byte {compared}"
            );
            compared += out.len();
        }
        assert_eq!(compared, bytes.len(), "{name}: incomplete");
        eprintln!(
            "{name}: ratio {:.3} ({} -> {wire_len}); pages raw {} fill {} xbzrle {} seen {}",
            wire_len as f64 / bytes.len() as f64,
            bytes.len(),
            pages.pages(tag::RAW),
            pages.pages(tag::FILL),
            pages.pages(tag::XBZRLE),
            pages.pages(tag::SEEN),
        );
    }
}
