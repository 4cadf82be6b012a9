//! Throughput of the dedup stream on one core: `DedupEncoder` (QEMU records in,
//! frames out, LZ4) and `DedupDecoder` (frames in, the QEMU bytes out), with the
//! default resolvers and with a template catalog. Throughput counts QEMU bytes.
//!
//! The input is the synthetic stream of `support/mod.rs`, shape `Dedup`: a
//! `pc-i440fx-10.0` guest with 400 MiB of RAM, about 35 % ZERO records, code and data
//! pages that hardly repeat, sparse and random pages, 5 % copies of recent pages and
//! a dirty pass. Its first 48 MiB of code pages are a "shared OS image": the
//! `templates` benches build a catalog of exactly those pages, as if other guests
//! had contributed them.
//!
//! - `dedup_encode/*`: the stream is decoded into records once, outside the timing;
//!   each iteration builds a fresh encoder (a new migration) and encodes every
//!   record, writing frames into a buffer that is cleared at 1 MiB, as if written to
//!   a socket.
//!   `templates-held` encodes with a source that holds the catalog
//!   ([`TemplateIndex::holding`]): template hits confirmed by comparing bytes, not
//!   by BLAKE3. `templates-held-seen` holds the seen-before window's pages too
//!   (`Resolvers::hold_seen`): a repeated page is confirmed by comparing bytes and
//!   its fingerprint computed once, instead of a BLAKE3 per repeat. Both give the
//!   same dedup stream. `templates-held-lz4a4` holds the catalog and compresses with
//!   `Compression::Lz4Accelerated(4)`: the same entries, other LZ4 blocks.
//! - `dedup_decode/*`: the dedup stream is encoded once, outside the timing; each
//!   iteration gets a fresh copy of it (untimed setup) and a fresh decoder, and
//!   decodes it whole; the QEMU bytes handed out are dropped. `threads/1` decodes
//!   on the bench's thread alone, `threads/2` decompresses batches on two threads
//!   of the decoder's (`DedupDecoder::with_threads`) while the bench's thread
//!   restores pages.
//!
//! - `dedup_threads/encode-N`: `dedup_encode` with the default resolvers, batches
//!   compressed on N threads ([`DedupEncoder::with_threads`]; 1: on the caller's).
//!   Under `MIGSTREAM_BENCH_CPU_TIME` it times the caller's thread alone: what is
//!   left on the critical path once the batches go to the other threads.
//!
//! - `dedup_floor/*`: what either end cannot avoid on the same case, as the ceiling
//!   of the two above. `hash_source`: the running digest (XXH3-128) over the QEMU
//!   bytes and the frames, plus a BLAKE3 fingerprint per seen-before and template
//!   page. `hash_destination`: the same digest, plus a fingerprint per distinct
//!   content among the seen-before pages (a kept page is hashed at its first
//!   reference; template pages were checked when the catalog was loaded).
//!   `lz4_compress`: compressing the encoder's batches, as recovered from the dedup
//!   stream. `lz4_decompress`: decompressing its LZ4 frames. The encoder can be no
//!   faster than `hash_source` and `lz4_compress` together, the decoder no faster
//!   than `hash_destination` and `lz4_decompress` together.
//!
//! Before any timing, each case checks once that decoding the encoded stream gives
//! back the QEMU stream byte for byte.
//!
//! Set `MIGSTREAM_BENCH_STREAM` to a captured main-channel stream to bench that file
//! too (id `capture`), and `MIGSTREAM_BENCH_CATALOG` to a catalog file (see the
//! `catalog` example) to bench the capture with it. Set `MIGSTREAM_BENCH_CPU_TIME=1`
//! to time the thread's CPU time instead of wall time, on a machine where other jobs
//! run (Linux only: `/proc/thread-self/schedstat`, which the kernel brings up to date
//! at every scheduler tick, i.e. to within 4 ms at HZ=250; an iteration takes
//! 150-900 ms).
//!
//! ```text
//! cargo bench --bench dedup -- --noplot
//! MIGSTREAM_BENCH_CPU_TIME=1 MIGSTREAM_BENCH_STREAM=target/ratio/heldout-idle.mig \
//! MIGSTREAM_BENCH_CATALOG=target/ratio/catalog.cat cargo bench --bench dedup -- --noplot
//! ```

mod support;

use std::collections::HashSet;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use migstream::dedup::wire::{self, codec, frame};
use migstream::dedup::{Compression, Decoded, DedupDecoder, DedupEncoder, Resolvers, Stats};
use migstream::qemu::{QemuDecoder, RamRecord, Record};
use migstream::resolve::tag;
use migstream::template::{Catalog, TemplateIndex};
use support::{MIB, Shape, synthetic_stream};

/// Encoder output kept before it is dropped, as if written to a socket.
const SINK: usize = 1 << 20;

/// One stream to bench, with or without templates.
struct Case {
    /// `stream` id in the benchmark names.
    stream: &'static str,
    /// The QEMU stream.
    qemu: Bytes,
    /// Its records, decoded once.
    records: Vec<Record>,
    catalog: Option<(Arc<Catalog>, Arc<TemplateIndex>)>,
    /// The dedup stream, encoded once (the decode benchmarks' input).
    wire: Bytes,
    /// Its DATA frames, for the floor benchmarks.
    frames: Vec<Frame>,
    /// Pages that travelled as seen-before references: each costs one BLAKE3 of a
    /// page at the source.
    seen: usize,
    /// Distinct contents among them: the destination hashes a kept page at its first
    /// reference only (at least once per distinct content).
    seen_distinct: usize,
    /// Pages that travelled as template references: each costs one BLAKE3 of a page
    /// at the source (the destination's catalog was checked when it was loaded).
    templates: usize,
}

/// A DATA frame of a case's dedup stream.
struct Frame {
    codec: u8,
    /// The batch as it travels.
    body: Bytes,
    /// The batch once decompressed.
    raw: Vec<u8>,
}

impl Case {
    fn resolvers(&self) -> &'static str {
        match self.catalog {
            Some(_) => "templates",
            None => "default",
        }
    }

    fn encoder(&self) -> DedupEncoder {
        match &self.catalog {
            Some((_, index)) => DedupEncoder::with_templates(index.clone()),
            None => DedupEncoder::with_default_resolvers(),
        }
    }

    fn decoder(&self) -> DedupDecoder {
        match &self.catalog {
            Some((catalog, _)) => DedupDecoder::with_templates(catalog.clone()),
            None => DedupDecoder::with_default_resolvers(),
        }
    }

    /// How a decode bench is named: by resolvers and decompressing threads.
    fn decode_id(&self, threads: usize) -> BenchmarkId {
        BenchmarkId::new(
            format!("{}/threads/{threads}", self.resolvers()),
            self.stream,
        )
    }
}

/// Decodes a whole QEMU stream into its records.
fn records(stream: &Bytes) -> Vec<Record> {
    let mut buf = BytesMut::from(&stream[..]);
    let mut dec = QemuDecoder::new();
    let mut records = Vec::new();
    while let Some(record) = dec.decode_eof(&mut buf).expect("valid QEMU stream") {
        records.push(record);
    }
    records
}

/// Encodes `records` with `enc` into `sink`, clearing it whenever it holds
/// [`SINK`] bytes; returns the encoder (dropped outside the timing).
fn encode(records: &[Record], mut enc: DedupEncoder, sink: &mut BytesMut) -> DedupEncoder {
    for record in records {
        enc.encode(record, sink).expect("encodable record");
        if sink.len() >= SINK {
            black_box(&sink[..]);
            sink.clear();
        }
    }
    enc.finish(sink).expect("end of stream");
    sink.clear();
    enc
}

/// Decodes the whole dedup stream in `wire`; returns the QEMU bytes' length.
fn decode(mut wire: BytesMut, dec: &mut DedupDecoder) -> usize {
    let mut n = 0;
    while let Decoded::Qemu(bytes) = dec.decode_eof(&mut wire).expect("valid dedup stream") {
        n += black_box(bytes).len();
    }
    n
}

/// Builds the case, encoding the stream once and checking the round trip.
fn case(
    stream: &'static str,
    qemu: Bytes,
    records: Vec<Record>,
    catalog: Option<Arc<Catalog>>,
) -> Case {
    let mut case = Case {
        stream,
        qemu,
        records,
        catalog: catalog.map(|c| {
            let index = Arc::new(TemplateIndex::new(&c));
            (c, index)
        }),
        wire: Bytes::new(),
        frames: Vec::new(),
        seen: 0,
        seen_distinct: 0,
        templates: 0,
    };
    let mut enc = case.encoder();
    let mut wire = BytesMut::new();
    let mut seen = HashSet::new();
    for record in &case.records {
        let before = enc.stats().pages(tag::SEEN);
        enc.encode(record, &mut wire).expect("encodable record");
        if let Record::Ram(RamRecord::Page { data, .. }) = record {
            if enc.stats().pages(tag::SEEN) > before {
                seen.insert(blake3::hash(data));
            }
        }
    }
    case.seen_distinct = seen.len();
    enc.finish(&mut wire).expect("end of stream");
    case.wire = wire.freeze();
    case.frames = data_frames(&case.wire);
    case.seen = enc.stats().pages(tag::SEEN) as usize;
    case.templates = enc.stats().pages(tag::TEMPLATE) as usize;
    check_round_trip(&case, case.resolvers(), &case.wire, enc.stats());
    case
}

/// Checks once that `wire`, encoded from the case's stream by the encoder `name`,
/// decodes back to it byte for byte, and prints its ratio.
fn check_round_trip(case: &Case, name: &str, wire: &[u8], stats: &Stats) {
    let mut dec = case.decoder();
    let mut src = BytesMut::from(wire);
    let mut out = Vec::with_capacity(case.qemu.len());
    while let Decoded::Qemu(bytes) = dec.decode_eof(&mut src).expect("valid dedup stream") {
        out.extend_from_slice(&bytes);
    }
    let stream = case.stream;
    assert!(
        out[..] == case.qemu[..],
        "{stream}/{name}: the round trip differs"
    );
    eprintln!(
        "{stream}/{name}: {} QEMU bytes -> {} dedup bytes (ratio {:.4}), round trip exact; {}",
        case.qemu.len(),
        wire.len(),
        wire.len() as f64 / case.qemu.len() as f64,
        pages(stats)
    );
}

/// The DATA frames of a dedup stream (`docs/wire-format.md`), batches decompressed.
fn data_frames(mut stream: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some((header, rest)) = stream.split_first_chunk::<{ wire::FRAME_HEADER }>() {
        let len = u32::from_be_bytes(header[1..].try_into().expect("4 bytes")) as usize;
        let (payload, rest) = rest.split_at(len);
        stream = rest;
        if header[0] != frame::DATA {
            continue;
        }
        let codec = payload[0];
        let raw_len = u32::from_be_bytes(payload[2..6].try_into().expect("4 bytes")) as usize;
        let body = Bytes::copy_from_slice(&payload[wire::DATA_HEADER..]);
        let raw = match codec {
            codec::LZ4 => lz4_flex::block::decompress(&body, raw_len).expect("an LZ4 block"),
            _ => body.to_vec(),
        };
        frames.push(Frame { codec, body, raw });
    }
    frames
}

/// What an end hashes: the running digest (XXH3-128) over the QEMU bytes and the
/// frames, and one BLAKE3 page fingerprint for each of `fingerprints` pages.
fn hash_floor(case: &Case, fingerprints: usize) -> u128 {
    let mut digest = twox_hash::XxHash3_128::new();
    digest.write(&case.qemu);
    for f in &case.frames {
        digest.write(&f.body);
    }
    let pages = case.qemu.chunks_exact(support::PAGE).cycle();
    for page in pages.take(fingerprints) {
        black_box(blake3::hash(page));
    }
    digest.finish_128()
}

/// Compresses every batch of the case as the encoder does; returns the bytes out.
fn lz4_compress_floor(case: &Case, out: &mut Vec<u8>) -> usize {
    let mut n = 0;
    for f in &case.frames {
        out.resize(lz4_flex::block::get_maximum_output_size(f.raw.len()), 0);
        n += lz4_flex::block::compress_into(&f.raw, out).expect("output sized by the bound");
    }
    n
}

/// Decompresses every LZ4 frame of the case as the decoder does.
fn lz4_decompress_floor(case: &Case, out: &mut Vec<u8>) -> usize {
    let mut n = 0;
    for f in case.frames.iter().filter(|f| f.codec == codec::LZ4) {
        out.resize(f.raw.len(), 0);
        n += lz4_flex::block::decompress_into(&f.body, out).expect("an LZ4 block");
    }
    n
}

fn pages(stats: &Stats) -> String {
    let pages: Vec<String> = stats
        .named_pages()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    format!("pages {}", pages.join(", "))
}

/// The calling thread's CPU time, user and system (page faults included).
struct CpuTime(WallTime);

/// Nanoseconds the calling thread has run.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat (Linux with schedstats)")
}

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = Duration;

    fn start(&self) -> u64 {
        thread_cpu_ns()
    }

    fn end(&self, start: u64) -> Duration {
        Duration::from_nanos(thread_cpu_ns() - start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    /// Nanoseconds, like wall time: the same units and throughputs.
    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>, cases: &[Case]) {
    let mut group = support::flat_group(c, "dedup_encode", 2, 10);
    for case in cases {
        group.throughput(Throughput::Bytes(case.qemu.len() as u64));
        let mut sink = BytesMut::with_capacity(2 * SINK);
        group.bench_function(BenchmarkId::new(case.resolvers(), case.stream), |b| {
            b.iter_batched(
                || case.encoder(),
                |enc| encode(&case.records, enc, &mut sink),
                BatchSize::PerIteration,
            )
        });
        // the same references, confirmed by comparing bytes with what the source holds
        if let Some((catalog, _)) = &case.catalog {
            let held = Resolvers::default()
                .with_templates(Some(Arc::new(TemplateIndex::holding(catalog.clone()))));
            let held_seen = held.clone().with_hold_seen(true);
            let (plain, fast) = (Compression::Lz4, Compression::Lz4Accelerated(4));
            for (name, resolvers, compression) in [
                ("templates-held", held.clone(), plain),
                ("templates-held-seen", held_seen, plain),
                ("templates-held-lz4a4", held, fast),
            ] {
                if compression != plain {
                    let mut enc = DedupEncoder::with_resolvers(&resolvers)
                        .expect("built-in resolvers")
                        .with_compression(compression);
                    let mut wire = BytesMut::new();
                    for record in &case.records {
                        enc.encode(record, &mut wire).expect("encodable record");
                    }
                    enc.finish(&mut wire).expect("end of stream");
                    check_round_trip(case, name, &wire, enc.stats());
                }
                group.bench_function(BenchmarkId::new(name, case.stream), |b| {
                    b.iter_batched(
                        || {
                            DedupEncoder::with_resolvers(&resolvers)
                                .expect("built-in resolvers")
                                .with_compression(compression)
                        },
                        |enc| encode(&case.records, enc, &mut sink),
                        BatchSize::PerIteration,
                    )
                });
            }
        }
    }
    group.finish();

    let mut group = support::flat_group(c, "dedup_threads", 2, 10);
    for case in cases.iter().filter(|case| case.catalog.is_none()) {
        let mut sink = BytesMut::with_capacity(2 * SINK);
        group.throughput(Throughput::Bytes(case.qemu.len() as u64));
        for threads in [1, 2, 4] {
            let id = BenchmarkId::new(format!("encode-{threads}"), case.stream);
            group.bench_function(id, |b| {
                b.iter_batched(
                    || case.encoder().with_threads(threads),
                    |enc| encode(&case.records, enc, &mut sink),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();

    let mut group = support::flat_group(c, "dedup_decode", 2, 10);
    for case in cases {
        group.throughput(Throughput::Bytes(case.qemu.len() as u64));
        for threads in [1, 2] {
            group.bench_function(case.decode_id(threads), |b| {
                b.iter_batched(
                    || {
                        let wire = BytesMut::from(&case.wire[..]);
                        (wire, case.decoder().with_threads(threads))
                    },
                    |(wire, mut dec)| {
                        let n = decode(wire, &mut dec);
                        assert_eq!(n, case.qemu.len(), "QEMU bytes out");
                        dec
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();

    let mut group = support::flat_group(c, "dedup_floor", 1, 5);
    let mut out = Vec::new();
    for case in cases {
        group.throughput(Throughput::Bytes(case.qemu.len() as u64));
        let id = |what| BenchmarkId::new(what, format!("{}/{}", case.resolvers(), case.stream));
        let (source, destination) = (case.seen + case.templates, case.seen_distinct);
        group.bench_function(id("hash_source"), |b| b.iter(|| hash_floor(case, source)));
        group.bench_function(id("hash_destination"), |b| {
            b.iter(|| hash_floor(case, destination))
        });
        group.bench_function(id("lz4_compress"), |b| {
            b.iter(|| lz4_compress_floor(case, &mut out))
        });
        group.bench_function(id("lz4_decompress"), |b| {
            b.iter(|| lz4_decompress_floor(case, &mut out))
        });
    }
    group.finish();
}

fn main() {
    let synthetic = synthetic_stream(Shape::Dedup);
    let mix = &synthetic.mix;
    eprintln!(
        "synthetic: {} bytes ({:.1} MiB), {} PART sections, {} PAGE and {} ZERO records; \
         catalog of {} image pages",
        synthetic.bytes.len(),
        synthetic.bytes.len() as f64 / MIB as f64,
        mix.parts,
        mix.page,
        mix.zero,
        synthetic.image.len()
    );
    let catalog = Catalog::from_pages(support::PAGE, &synthetic.image).expect("valid pages");
    let catalog = Arc::new(catalog);
    let records = self::records(&synthetic.bytes);
    let mut cases = vec![
        case("synthetic", synthetic.bytes.clone(), records.clone(), None),
        case("synthetic", synthetic.bytes, records, Some(catalog)),
    ];
    if let Some(path) = std::env::var_os("MIGSTREAM_BENCH_STREAM") {
        let path = PathBuf::from(path);
        let qemu = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("MIGSTREAM_BENCH_STREAM={}: {e}", path.display()));
        let qemu = Bytes::from(qemu);
        let records = self::records(&qemu);
        cases.push(case("capture", qemu.clone(), records.clone(), None));
        if let Some(path) = std::env::var_os("MIGSTREAM_BENCH_CATALOG") {
            let path = PathBuf::from(path);
            let catalog = Catalog::load(&path)
                .unwrap_or_else(|e| panic!("MIGSTREAM_BENCH_CATALOG={}: {e}", path.display()));
            cases.push(case("capture", qemu, records, Some(Arc::new(catalog))));
        }
    }

    if std::env::var_os("MIGSTREAM_BENCH_CPU_TIME").is_some() {
        let mut c = Criterion::default()
            .with_measurement(CpuTime(WallTime))
            .configure_from_args();
        bench(&mut c, &cases);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench(&mut c, &cases);
        c.final_summary();
    }
}
