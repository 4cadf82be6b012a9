//! Deduplicate a QEMU migration stream file, and rebuild it.
//!
//! ```text
//! cargo run --release --example dedup -- encode IN.mig OUT.mz
//! cargo run --release --example dedup -- decode IN.mz OUT.mig
//! cargo run --release --features zstd --example dedup -- encode --zstd 3 IN.mig OUT.mz
//! ```
//!
//! Both stream with bounded memory (1 MiB reads) and end with a line
//! `in <BYTES> bytes out <BYTES> bytes ratio <R> <X.XX> GB/s` and the pages by kind.
//! `decode(encode(x))` is byte-identical to `x`; decode fails, writing nothing past
//! the damage, on any corruption.

use std::fs::File;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Instant;

use bytes::BytesMut;
use migstream::dedup::{DedupDecoder, DedupEncoder, Stats};
use migstream::qemu::QemuDecoder;
use migstream::resolve::tag;

const READ: usize = 1 << 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["encode", input, output] => encode(input, output, DedupEncoder::with_default_resolvers()),
        #[cfg(feature = "zstd")]
        ["encode", "--zstd", level, input, output] => match level.parse() {
            Ok(level) => {
                let enc = DedupEncoder::with_default_resolvers()
                    .with_compression(migstream::dedup::Compression::Zstd(level));
                encode(input, output, enc)
            }
            Err(_) => Err("--zstd takes a level".into()),
        },
        ["decode", input, output] => decode(input, output),
        _ => {
            eprintln!("usage: dedup encode IN.mig OUT.mz | dedup decode IN.mz OUT.mig");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedup: {e}");
            ExitCode::FAILURE
        }
    }
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

fn decode(input: &str, output: &str) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let (mut file, mut out) = (File::open(input)?, File::create(output)?);
    let mut dec = DedupDecoder::with_default_resolvers();
    let mut buf = BytesMut::with_capacity(2 * READ);
    let mut at_end = false;
    loop {
        let bytes = match at_end {
            true => dec.decode_eof(&mut buf)?,
            false => dec.decode(&mut buf)?,
        };
        match bytes {
            Some(bytes) => out.write_all(&bytes)?,
            None if at_end => break,
            None => at_end = read_into(&mut file, &mut buf)? == 0,
        }
    }
    report(
        dec.stats(),
        dec.stats().wire_bytes,
        dec.stats().qemu_bytes,
        started,
    );
    Ok(())
}

/// Reads up to `READ` bytes appended to `buf`; returns how many.
fn read_into(file: &mut File, buf: &mut BytesMut) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ, 0);
    let n = file.read(&mut buf[start..])?;
    buf.truncate(start + n);
    Ok(n)
}

fn report(stats: &Stats, bytes_in: u64, bytes_out: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let qemu = stats.qemu_bytes as f64;
    println!(
        "in {bytes_in} bytes out {bytes_out} bytes ratio {:.4} {:.2} GB/s",
        stats.wire_bytes as f64 / qemu.max(1.0),
        qemu / seconds / 1e9
    );
    let kinds = [
        ("raw", tag::RAW),
        ("fill", tag::FILL),
        ("seen", tag::SEEN),
        ("template", tag::TEMPLATE),
        ("xbzrle", tag::XBZRLE),
    ];
    let pages: Vec<String> = kinds
        .iter()
        .map(|(name, t)| format!("{name} {}", stats.pages[usize::from(*t)]))
        .collect();
    println!("pages {}", pages.join(", "));
}
