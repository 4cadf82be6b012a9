//! Deduplicate a QEMU migration stream file, and rebuild it.
//!
//! ```text
//! cargo run --release --example dedup -- encode [--catalog C] IN.mig OUT.mz
//! cargo run --release --example dedup -- decode [--catalog C | --dht URLS [--replicas R]] IN.mz OUT.mig
//! cargo run --release --features zstd --example dedup -- encode --zstd 3 IN.mig OUT.mz
//! cargo run --release --example dedup -- encode --lz4-acceleration 4 IN.mig OUT.mz
//! ```
//!
//! `--lz4-acceleration N` compresses with migstream's own LZ4 encoder, probing every
//! N-th position at first: less CPU for a few % more bytes (`Compression::Lz4Accelerated`).
//!
//! Both stream with bounded memory (1 MiB reads) and end with a line
//! `in <BYTES> bytes out <BYTES> bytes ratio <R> <X.XX> GB/s` and the pages by kind.
//! `decode(encode(x))` is byte-identical to `x`; decode fails, writing nothing past
//! the damage, on any corruption.

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use migstream::dedup::{Compression, DedupDecoder, DedupEncoder, Stats};
use migstream::dht::DEFAULT_REPLICAS;
use migstream::qemu::QemuDecoder;
use migstream::relay::{self, Progress};
use migstream::resolve::TemplateStore;
use migstream::template::TemplateIndex;
use tokio::io::BufWriter;

#[path = "support/mod.rs"]
mod support;
#[path = "support/templates.rs"]
mod templates;

use support::{READ, read_into};
use templates::template_store;

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedup: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: dedup encode [--catalog C] [--zstd LEVEL | --lz4-acceleration N] IN.mig OUT.mz | \
dedup decode [--catalog C | --dht URLS [--replicas R]] IN.mz OUT.mig";

fn run(args: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let (mut catalog, mut zstd, mut files) = (None, None, Vec::new());
    let mut acceleration = None;
    let (mut dht, mut replicas) = (None, DEFAULT_REPLICAS);
    let mut args = args.into_iter();
    let command = args.next().ok_or(USAGE)?;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--catalog" => catalog = Some(args.next().ok_or(USAGE)?),
            "--zstd" => zstd = Some(args.next().ok_or(USAGE)?.parse::<i32>()?),
            "--lz4-acceleration" => acceleration = Some(args.next().ok_or(USAGE)?.parse::<u32>()?),
            "--dht" => dht = Some(args.next().ok_or(USAGE)?),
            "--replicas" => replicas = args.next().ok_or(USAGE)?.parse()?,
            _ => files.push(arg),
        }
    }
    let [input, output] = &files[..] else {
        return Err(USAGE.into());
    };
    match command.as_str() {
        "encode" => {
            let mut enc = match &catalog {
                Some(path) => DedupEncoder::with_templates(Arc::new(TemplateIndex::load(path)?)),
                None => DedupEncoder::with_default_resolvers(),
            };
            match (zstd, acceleration) {
                (Some(_), Some(_)) => return Err(USAGE.into()),
                (Some(level), None) => enc = with_zstd(enc, level)?,
                (None, Some(n)) => enc = enc.with_compression(Compression::Lz4Accelerated(n)),
                (None, None) => {}
            }
            encode(input, output, enc)
        }
        "decode" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let store = template_store(catalog.as_deref(), dht.as_deref(), replicas).await?;
                decode(input, output, store).await
            })
        }
        _ => Err(USAGE.into()),
    }
}

#[cfg(feature = "zstd")]
fn with_zstd(enc: DedupEncoder, level: i32) -> Result<DedupEncoder, Box<dyn std::error::Error>> {
    Ok(enc.with_compression(Compression::Zstd(level)))
}

#[cfg(not(feature = "zstd"))]
fn with_zstd(_: DedupEncoder, _: i32) -> Result<DedupEncoder, Box<dyn std::error::Error>> {
    Err("--zstd needs the zstd feature: cargo run --release --features zstd --example dedup".into())
}

fn encode(
    input: &str,
    output: &str,
    mut enc: DedupEncoder,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let (mut file, mut out) = (File::open(input)?, File::create(output)?);
    let mut records = QemuDecoder::new();
    let (mut buf, mut wire) = (BytesMut::with_capacity(2 * READ), BytesMut::new());
    let mut at_end = false;
    loop {
        let record = match at_end {
            true => records.decode_eof(&mut buf)?,
            false => records.decode(&mut buf)?,
        };
        match record {
            Some(record) => enc.encode(&record, &mut wire)?,
            None if at_end => break,
            None => at_end = read_into(&mut file, &mut buf)? == 0,
        }
        if wire.len() >= READ {
            out.write_all(&wire)?;
            wire.clear();
        }
    }
    enc.finish(&mut wire)?;
    out.write_all(&wire)?;
    report(
        enc.stats(),
        enc.stats().qemu_bytes,
        enc.stats().wire_bytes,
        started,
    );
    Ok(())
}

/// Decodes through the same pump as the destination proxy, so that a store which
/// fetches pages (the DHT ring) gets each frame's templates in one batch.
async fn decode(
    input: &str,
    output: &str,
    templates: Option<Arc<dyn TemplateStore>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let (mut dec, mut fetch) = match &templates {
        Some(store) => {
            let (restore, fetch) = store.open();
            (
                DedupDecoder::with_template_resolver(restore, store.catalog_id())?,
                fetch,
            )
        }
        None => (DedupDecoder::with_default_resolvers(), None),
    };
    let file = tokio::fs::File::open(input).await?;
    let out = BufWriter::with_capacity(READ, tokio::fs::File::create(output).await?);
    let progress = Progress::default();
    relay::decode_stream(file, out, &mut dec, fetch.as_deref_mut(), &progress).await?;
    report(
        dec.stats(),
        dec.stats().wire_bytes,
        dec.stats().qemu_bytes,
        started,
    );
    Ok(())
}

fn report(stats: &Stats, bytes_in: u64, bytes_out: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let qemu = stats.qemu_bytes as f64;
    println!(
        "in {bytes_in} bytes out {bytes_out} bytes ratio {:.4} {:.2} GB/s",
        stats.ratio(),
        qemu / seconds / 1e9
    );
    let pages: Vec<String> = stats
        .named_pages()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("pages {}", pages.join(", "));
}
