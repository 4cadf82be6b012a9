//! Deduplicate a QEMU migration stream file, and rebuild it.
//!
//! ```text
//! cargo run --release --example dedup -- encode [--catalog C] IN.mig OUT.mz
//! cargo run --release --example dedup -- decode [--catalog C | --dht URLS|@FILE [--replicas R] [--dht-catalog ID] [TLS]] IN.mz OUT.mig
//! cargo run --release --features zstd --example dedup -- encode --zstd 3 IN.mig OUT.mz
//! cargo run --release --example dedup -- encode --lz4-acceleration 4 IN.mig OUT.mz
//! ```
//!
//! `dedup --help` and `dedup encode|decode --help` list every option; decode's ring
//! flags (`--dht`, `--replicas`, `--dht-catalog`, and TLS: `--redis-ca`,
//! `--redis-cert`, `--redis-key`) are `proxy destination`'s.
//! `--lz4-acceleration N` compresses with migstream's own LZ4 encoder, probing every
//! N-th position at first: less CPU for a few % more bytes (`Compression::Lz4Accelerated`).
//!
//! Both stream with bounded memory (1 MiB reads) and end with a line
//! `in <BYTES> bytes out <BYTES> bytes ratio <R> <X.XX> GB/s` and the pages by kind.
//! `decode(encode(x))` is byte-identical to `x`; decode fails on any corruption.
//! Both write to a temporary file beside OUT, renamed to OUT once complete: on
//! failure, no OUT appears (and an OUT already there is left as it was). A closed
//! stdout (`| head`) ends the printing, not the work.

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use clap::{Args, Parser, Subcommand};
use migstream::dedup::{DedupDecoder, DedupEncoder, EncoderInput, Stats, available_threads};
use migstream::qemu::QemuDecoder;
use migstream::qemu::multifd::{self, MultifdDecoder};
use migstream::relay::{self, Progress};
use migstream::resolve::TemplateStore;
use migstream::template::TemplateIndex;
use tokio::io::BufWriter;
use tokio_util::codec::Decoder;

#[path = "support/compression.rs"]
mod compression;
#[path = "support/out.rs"]
mod out;
#[path = "support/output.rs"]
mod output;
#[path = "support/pipe.rs"]
mod pipe;
#[path = "support/mod.rs"]
mod support;
#[path = "support/templates.rs"]
mod templates;

use compression::CompressionArgs;
use out::outln;
use output::Output;
use pipe::{read_on_a_thread, write_on_a_thread};
use support::{READ, read_into};
use templates::{DhtArgs, template_store};

#[derive(Parser)]
#[command(
    version,
    about = "Deduplicate a QEMU migration stream file, and rebuild it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deduplicates and compresses a QEMU migration stream file.
    Encode(EncodeArgs),
    /// Rebuilds the QEMU migration stream, byte-identical, from an encoded file.
    Decode(DecodeArgs),
}

#[derive(Args)]
struct EncodeArgs {
    /// Template catalog file: its pages are sent as references.
    #[arg(long, value_name = "FILE")]
    catalog: Option<String>,
    #[command(flatten)]
    compression: CompressionArgs,
    /// Threads compressing batches (the same output whatever the number) [default: the cores, at most 4].
    #[arg(long, value_name = "N", default_value_t = available_threads(), hide_default_value = true)]
    threads: usize,
    /// The QEMU migration stream to read.
    #[arg(value_name = "IN.mig")]
    input: String,
    /// The encoded file to write.
    #[arg(value_name = "OUT.mz")]
    output: String,
}

#[derive(Args)]
struct DecodeArgs {
    /// Template catalog file: the encoder's.
    #[arg(long, value_name = "FILE")]
    catalog: Option<String>,
    // the ring of Redis nodes to fetch templates from, instead of --catalog
    #[command(flatten)]
    dht: DhtArgs,
    /// Threads decompressing batches [default: the cores, at most 4].
    #[arg(long, value_name = "N", default_value_t = available_threads(), hide_default_value = true)]
    threads: usize,
    /// The encoded file to read.
    #[arg(value_name = "IN.mz")]
    input: String,
    /// The QEMU migration stream to write.
    #[arg(value_name = "OUT.mig")]
    output: String,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Encode(a) => {
            let enc = match &a.catalog {
                Some(path) => DedupEncoder::with_templates(Arc::new(
                    TemplateIndex::load(path).map_err(|e| format!("--catalog {path}: {e}"))?,
                )),
                None => DedupEncoder::with_default_resolvers(),
            };
            let enc = enc
                .with_compression(a.compression.compression()?)
                .with_threads(a.threads);
            encode(&a.input, &a.output, enc, a.threads)
        }
        Command::Decode(a) => {
            // more threads: a template store's fetches also run beside the decoding
            let runtime = match a.threads {
                1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut multi = tokio::runtime::Builder::new_multi_thread();
                    multi.worker_threads(n);
                    multi
                }
            }
            .enable_all()
            .build()?;
            runtime.block_on(async {
                let store = template_store(a.catalog.as_deref(), &a.dht).await?;
                decode(&a.input, &a.output, store, a.threads).await
            })
        }
    }
}

/// Encodes the file `input` into `output`: on this thread alone (`threads` 1), or
/// with the files read and written on threads of their own.
fn encode(
    input: &str,
    output: &str,
    mut enc: DedupEncoder,
    threads: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let mut file = File::open(input).map_err(|e| format!("{input}: {e}"))?;
    let (partial, mut out) = Output::create(output).map_err(|e| format!("{output}: {e}"))?;
    if threads == 1 {
        let read = |buf: &mut BytesMut| read_into(&mut file, buf);
        encode_file(read, |frames| out.write_all(&frames), &mut enc)?;
    } else {
        let pieces = read_on_a_thread(file, READ);
        let (to_writer, writer) = write_on_a_thread(out);
        let read = |buf: &mut BytesMut| match pieces.recv() {
            Ok(piece) => piece.map(|piece| {
                buf.extend_from_slice(&piece);
                piece.len()
            }),
            Err(_) => Ok(0),
        };
        let write = |frames: Bytes| {
            let gone = || std::io::Error::other("the writing thread failed");
            to_writer.send(frames).map_err(|_| gone())
        };
        let encoded = encode_file(read, write, &mut enc);
        drop(to_writer);
        // the writer's own error first: a failed send only says it stopped
        writer.join().map_err(|_| "the writing thread panicked")??;
        encoded?;
    }
    partial.commit().map_err(|e| format!("{output}: {e}"))?;
    report(
        enc.stats(),
        enc.stats().qemu_bytes,
        enc.stats().wire_bytes,
        started,
    )?;
    Ok(())
}

/// Encodes what `read` appends to a buffer (how many bytes; 0 at the end), a main
/// channel or a multifd channel file (harness/capture-multifd.py), giving `write`
/// the frames as they come, and the END frame.
fn encode_file(
    mut read: impl FnMut(&mut BytesMut) -> std::io::Result<usize>,
    mut write: impl FnMut(Bytes) -> std::io::Result<()>,
    enc: &mut DedupEncoder,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut buf = BytesMut::with_capacity(2 * READ);
    let at_end = read(&mut buf)? == 0;
    let channel = multifd::wire::is_channel_start(&buf) == Some(true);
    let input = (&mut read, &mut buf, at_end);
    let mut wire = match channel {
        true => encode_records(MultifdDecoder::new(), input, enc, &mut write)?,
        false => encode_records(QemuDecoder::new(), input, enc, &mut write)?,
    };
    enc.finish(&mut wire)?;
    write(wire.freeze())?;
    Ok(())
}

/// Reads the records of the input (`buf` holds what was read so far, `at_end`
/// whether that was all) into `enc`, writing its frames as they come; returns what
/// is left to write.
fn encode_records<D, T>(
    mut records: D,
    (read, buf, mut at_end): (
        &mut impl FnMut(&mut BytesMut) -> std::io::Result<usize>,
        &mut BytesMut,
        bool,
    ),
    enc: &mut DedupEncoder,
    write: &mut impl FnMut(Bytes) -> std::io::Result<()>,
) -> Result<BytesMut, Box<dyn std::error::Error>>
where
    D: Decoder<Item = T, Error = migstream::Error>,
    T: EncoderInput,
{
    let mut wire = BytesMut::new();
    loop {
        let record = match at_end {
            true => records.decode_eof(buf)?,
            false => records.decode(buf)?,
        };
        match record {
            Some(record) => record.encode_into(enc, &mut wire)?,
            None if at_end => return Ok(wire),
            None => at_end = read(buf)? == 0,
        }
        if wire.len() >= READ {
            write(wire.split().freeze())?;
        }
    }
}

/// Decodes through the same pump as the destination proxy, so that a store which
/// fetches pages (the DHT ring) gets each frame's templates in one batch.
async fn decode(
    input: &str,
    output: &str,
    templates: Option<Arc<dyn TemplateStore>>,
    threads: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let (dec, mut fetch) = match &templates {
        Some(store) => {
            let (restore, fetch) = store.open();
            (
                DedupDecoder::with_template_resolver(restore, store.catalog_id())?,
                fetch,
            )
        }
        None => (DedupDecoder::with_default_resolvers(), None),
    };
    let mut dec = dec.with_threads(threads);
    let file = tokio::fs::File::open(input)
        .await
        .map_err(|e| format!("{input}: {e}"))?;
    let (partial, out) = Output::create(output).map_err(|e| format!("{output}: {e}"))?;
    let out = BufWriter::with_capacity(READ, tokio::fs::File::from_std(out));
    let progress = Progress::default();
    relay::decode_stream(file, out, &mut dec, fetch.as_deref_mut(), &progress).await?;
    partial.commit().map_err(|e| format!("{output}: {e}"))?;
    report(
        dec.stats(),
        dec.stats().wire_bytes,
        dec.stats().qemu_bytes,
        started,
    )?;
    Ok(())
}

fn report(stats: &Stats, bytes_in: u64, bytes_out: u64, started: Instant) -> std::io::Result<()> {
    let seconds = started.elapsed().as_secs_f64();
    let qemu = stats.qemu_bytes as f64;
    outln!(
        "in {bytes_in} bytes out {bytes_out} bytes ratio {:.4} {:.2} GB/s",
        stats.ratio(),
        qemu / seconds / 1e9
    )?;
    let pages: Vec<String> = stats
        .named_pages()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    outln!("pages {}", pages.join(", "))
}
