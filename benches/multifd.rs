//! Throughput of the dedup codec on multifd channels running in parallel, one
//! thread per channel, as the proxies run them (each QEMU connection on a task of
//! its own, so on a core of its own when there are enough). Throughput counts the
//! QEMU bytes of all the channels of an iteration: aggregate, not per channel.
//!
//! The input is a captured multifd migration, one file per channel
//! (`harness/capture-multifd.py`): by default
//! `$MIGSTREAM_STREAMS/multifd/qemu10-q35-idle-4ch.ch{0,1,2,3}.mfd`
//! (`MIGSTREAM_STREAMS` defaults to `target/qemu-streams`), or the channel files
//! `PREFIX.ch{0,1,...}.mfd` of `MIGSTREAM_BENCH_MULTIFD=PREFIX`. Without them the
//! bench says so and measures nothing.
//!
//! - `multifd_encode/N`: N threads, thread i takes channel i's bytes in 64 KiB reads
//!   (as from a socket) through a `MultifdDecoder` and a fresh `DedupEncoder` (the
//!   default resolvers, LZ4) with `encode_channel`, then `finish`; the frames go
//!   into a buffer cleared at 1 MiB, as if written to a socket. The iteration ends
//!   when the last thread is done.
//! - `multifd_decode/N`: the same channels' dedup streams, encoded once outside the
//!   timing; N threads, each decoding one stream whole with a fresh `DedupDecoder`
//!   in 64 KiB reads; the QEMU bytes handed out are dropped.
//!
//! N is 1, 2 and 4 (at most the number of channel files). On a machine with fewer
//! cores than N the threads share them: the aggregate then says what the cores
//! give, not what N cores would. Before any timing, each channel's stream is
//! checked to decode back to the channel's bytes, byte for byte.
//!
//! ```text
//! MIGSTREAM_STREAMS=/path/to/qemu-streams cargo bench --bench multifd -- --noplot
//! ```

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput};
use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
use migstream::qemu::multifd::MultifdDecoder;

/// Bytes handed to a decoder at a time, as a socket read would.
const READ: usize = 64 << 10;
/// Encoder output kept before it is dropped, as if written to a socket.
const SINK: usize = 1 << 20;
/// Thread counts measured (those with enough channel files).
const THREADS: [usize; 3] = [1, 2, 4];

/// The channel files of the capture, in channel order.
fn channel_files() -> Vec<PathBuf> {
    let prefix = match std::env::var_os("MIGSTREAM_BENCH_MULTIFD") {
        Some(p) => PathBuf::from(p),
        None => {
            let streams = std::env::var_os("MIGSTREAM_STREAMS").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/qemu-streams"),
                PathBuf::from,
            );
            streams.join("multifd/qemu10-q35-idle-4ch")
        }
    };
    let mut files = Vec::new();
    loop {
        let mut name = prefix.clone().into_os_string();
        name.push(format!(".ch{}.mfd", files.len()));
        let path = PathBuf::from(name);
        if !path.exists() {
            return files;
        }
        files.push(path);
    }
}

/// One channel's QEMU bytes through the multifd decoder and a dedup encoder;
/// returns the dedup stream if `keep`, else how many bytes it had.
fn encode(channel: &[u8], keep: bool) -> (Vec<u8>, usize) {
    let (mut dec, mut input) = (MultifdDecoder::new(), BytesMut::with_capacity(2 * READ));
    let mut enc = DedupEncoder::with_default_resolvers();
    let (mut wire, mut kept, mut total) = (BytesMut::with_capacity(2 * SINK), Vec::new(), 0);
    let drain = |wire: &mut BytesMut, kept: &mut Vec<u8>, total: &mut usize, at: usize| {
        if wire.len() >= at {
            *total += wire.len();
            if keep {
                kept.extend_from_slice(wire);
            }
            black_box(&wire[..]);
            wire.clear();
        }
    };
    for chunk in channel.chunks(READ) {
        input.extend_from_slice(chunk);
        while let Some(record) = dec.decode(&mut input).expect("a valid channel") {
            enc.encode_channel(&record, &mut wire).expect("encodes");
            drain(&mut wire, &mut kept, &mut total, SINK);
        }
    }
    assert!(dec.decode_eof(&mut input).expect("ends cleanly").is_none());
    enc.finish(&mut wire).expect("finishes");
    drain(&mut wire, &mut kept, &mut total, 0);
    (kept, total)
}

/// One dedup stream decoded whole; the QEMU bytes out, if `keep`, and how many.
fn decode(stream: &[u8], keep: bool) -> (Vec<u8>, usize) {
    let (mut dec, mut buf) = (DedupDecoder::with_default_resolvers(), BytesMut::new());
    let (mut out, mut total) = (Vec::new(), 0);
    let mut reads = stream.chunks(READ);
    loop {
        let step = match buf.is_empty() && reads.len() == 0 {
            false => dec.decode(&mut buf),
            true => dec.decode_eof(&mut buf),
        };
        match step.expect("a valid dedup stream") {
            Decoded::Qemu(bytes) => {
                total += bytes.len();
                if keep {
                    out.extend_from_slice(&bytes);
                }
                black_box(bytes);
            }
            Decoded::NeedInput | Decoded::Done => match reads.next() {
                Some(r) => buf.extend_from_slice(r),
                None => {
                    dec.decode_eof(&mut buf).expect("nothing after END");
                    return (out, total);
                }
            },
            other => unreachable!("local resolvers never wait: {other:?}"),
        }
    }
}

/// Runs `work` on items 0..n, one thread each, and waits for all.
fn parallel<T: Sync>(items: &[T], work: impl Fn(&T) -> usize + Sync) -> usize {
    std::thread::scope(|s| {
        let threads: Vec<_> = items.iter().map(|x| s.spawn(|| work(x))).collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("no panic"))
            .sum()
    })
}

fn main() {
    let files = channel_files();
    if files.is_empty() {
        eprintln!(
            "multifd bench: no channel files (set MIGSTREAM_STREAMS or MIGSTREAM_BENCH_MULTIFD; \
             see the top of benches/multifd.rs); nothing measured"
        );
        return;
    }
    let channels: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let streams: Vec<Vec<u8>> = channels.iter().map(|c| encode(c, true).0).collect();
    for ((path, channel), stream) in files.iter().zip(&channels).zip(&streams) {
        assert!(
            decode(stream, true).0 == *channel,
            "{} differs",
            path.display()
        );
        eprintln!(
            "{}: {} QEMU bytes -> {} dedup bytes (ratio {:.3})",
            path.display(),
            channel.len(),
            stream.len(),
            stream.len() as f64 / channel.len() as f64
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("{} channel files, {cores} cores available", files.len());

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args();
    let ns: Vec<usize> = THREADS.into_iter().filter(|&n| n <= files.len()).collect();
    let mut g = c.benchmark_group("multifd_encode");
    for &n in &ns {
        let mine = &channels[..n];
        g.throughput(Throughput::Bytes(mine.iter().map(|c| c.len() as u64).sum()));
        g.bench_with_input(BenchmarkId::from_parameter(n), mine, |b, mine| {
            b.iter(|| parallel(mine, |c| encode(c, false).1))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("multifd_decode");
    for &n in &ns {
        g.throughput(Throughput::Bytes(
            channels[..n].iter().map(|c| c.len() as u64).sum(),
        ));
        g.bench_with_input(BenchmarkId::from_parameter(n), &streams[..n], |b, mine| {
            b.iter(|| parallel(mine, |s| decode(s, false).1))
        });
    }
    g.finish();
    c.final_summary();
}
