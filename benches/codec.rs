//! Throughput of the QEMU codec on one core: decode only, and decode + re-encode.
//!
//! The input is a QEMU 10.0-like precopy stream of a `pc-i440fx-10.0` guest with
//! 400 MiB of RAM (about 275 MiB on the wire), built here with the encoder (see
//! `support/mod.rs`, shape `Codec`): header, configuration, the RAM setup section
//! (`MEM_SIZE` and the block list), PART sections of a few thousand page records
//! each with their footers, the END section, then a FULL device section whose
//! ~16 KiB of state pass through as opaque bytes, EOF and a ~100 KiB JSON device
//! description.
//!
//! The pages mix roughly like a real guest's first pass: about 35 % ZERO records,
//! the rest PAGE records holding code and data (pages of this bench binary and of
//! the system's shared libraries), random bytes (compressed or encrypted data), and
//! mostly-zero pages with a few non-zero bytes (page tables, sparse structures).
//! Classes come in runs, as they do in guest memory, and every page record but the
//! first of each block carries CONTINUE. A page that happens to be all zero is sent
//! as ZERO, as QEMU does.
//!
//! Set `MIGSTREAM_BENCH_STREAM` to a captured main-channel stream (for example
//! `migrate "exec:cat > vm.mig"`) to bench that file too, as the `capture` id.
//!
//! ```text
//! cargo bench --bench codec -- --noplot
//! ```

mod support;

use std::hint::black_box;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use migstream::qemu::{QemuDecoder, QemuEncoder, Record};
use support::{MIB, Shape, synthetic_stream};

/// Bytes handed to the decoder per read in the socket-like benchmark.
const READ: usize = 64 * 1024;

/// Decodes all of `buf` (the whole stream), handing each record to `f`; returns
/// the emptied buffer so that freeing it is not timed.
fn decode_all(mut buf: BytesMut, mut f: impl FnMut(Record)) -> BytesMut {
    let mut dec = QemuDecoder::new();
    while let Some(record) = dec.decode(&mut buf).expect("valid stream") {
        f(record);
    }
    while let Some(record) = dec.decode_eof(&mut buf).expect("valid stream") {
        f(record);
    }
    buf
}

/// Decodes `stream` handed over in reads of [`READ`] bytes, as from a socket: each
/// read is copied into the decoder's buffer when it asks for more.
fn decode_reads(stream: &[u8], mut f: impl FnMut(Record)) {
    let mut dec = QemuDecoder::new();
    let mut buf = BytesMut::with_capacity(2 * READ);
    let mut reads = stream.chunks(READ);
    loop {
        match dec.decode(&mut buf).expect("valid stream") {
            Some(record) => f(record),
            None => match reads.next() {
                Some(read) => buf.extend_from_slice(read),
                None => break,
            },
        }
    }
    while let Some(record) = dec.decode_eof(&mut buf).expect("valid stream") {
        f(record);
    }
}

/// Decodes and re-encodes `stream` once per way of feeding it, outside any timing,
/// and checks that the output is the input byte for byte.
fn check_round_trip(name: &str, stream: &Bytes) {
    let mut enc = QemuEncoder::new();
    let mut out = BytesMut::with_capacity(stream.len());
    let mut records = 0u64;
    decode_all(BytesMut::from(&stream[..]), |r| {
        records += 1;
        enc.encode(&r, &mut out).expect("encodable record");
    });
    assert!(out[..] == stream[..], "{name}: re-encoded stream differs");
    // the same with 64 KiB reads (opaque chunks may then be cut differently)
    let mut enc = QemuEncoder::new();
    out.clear();
    decode_reads(stream, |r| {
        enc.encode(&r, &mut out).expect("encodable record")
    });
    assert!(
        out[..] == stream[..],
        "{name}: re-encoded stream differs (64 KiB reads)"
    );
    eprintln!(
        "{name}: {} bytes ({:.1} MiB), {records} records, round trip exact",
        stream.len(),
        stream.len() as f64 / MIB as f64
    );
}

fn bench(c: &mut Criterion, streams: &[(&str, Bytes)]) {
    let mut group = support::flat_group(c, "decode", 2, 12);
    for (name, stream) in streams {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_with_input(BenchmarkId::new("whole", name), stream, |b, s| {
            b.iter_batched(
                || BytesMut::from(&s[..]),
                |buf| decode_all(buf, |r| drop(black_box(r))),
                BatchSize::PerIteration,
            )
        });
        group.bench_with_input(BenchmarkId::new("64KiB-reads", name), stream, |b, s| {
            b.iter(|| decode_reads(s, |r| drop(black_box(r))))
        });
    }
    group.finish();

    let mut group = support::flat_group(c, "decode_encode", 2, 15);
    for (name, stream) in streams {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        // reused across iterations: cleared, its capacity kept
        let mut out = BytesMut::with_capacity(stream.len());
        group.bench_with_input(BenchmarkId::new("whole", name), stream, |b, s| {
            b.iter_batched(
                || BytesMut::from(&s[..]),
                |buf| {
                    out.clear();
                    let mut enc = QemuEncoder::new();
                    let buf = decode_all(buf, |r| {
                        enc.encode(&r, &mut out).expect("encodable record");
                    });
                    assert_eq!(out.len(), s.len(), "output length differs from input");
                    buf
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn main() {
    let mut streams = Vec::new();
    let support::Stream {
        bytes: synthetic,
        mix,
        ..
    } = synthetic_stream(Shape::Codec);
    eprintln!(
        "synthetic: {} PART sections, {} PAGE and {} ZERO records ({:.1} % zero)",
        mix.parts,
        mix.page,
        mix.zero,
        100.0 * mix.zero as f64 / (mix.page + mix.zero) as f64
    );
    check_round_trip("synthetic", &synthetic);
    streams.push(("synthetic", synthetic));
    if let Some(path) = std::env::var_os("MIGSTREAM_BENCH_STREAM") {
        let path = Path::new(&path);
        let capture = std::fs::read(path)
            .unwrap_or_else(|e| panic!("MIGSTREAM_BENCH_STREAM={}: {e}", path.display()));
        let capture = Bytes::from(capture);
        check_round_trip("capture", &capture);
        streams.push(("capture", capture));
    }

    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &streams);
    c.final_summary();
}
