//! Build a TMDM template catalog from VMs' migration streams or memory images, and
//! inspect one.
//!
//! ```text
//! cargo run --release --example catalog -- build --threshold T [--count inputs|occurrences] --out CATALOG INPUT...
//! cargo run --release --example catalog -- info CATALOG
//! ```
//!
//! `build` keeps the non-zero pages found in at least T inputs (`--count inputs`, the
//! default) or at least T times in all (`--count occurrences`). An input starting
//! with "QEVM" is read as a QEMU stream, any other file as a raw memory image.
//! `info` loads the catalog twice, whole with every page verified and as the
//! source's index, and reports the speed of both.

use std::process::ExitCode;
use std::time::Instant;

use migstream::template::{Catalog, CatalogBuilder, InputKind, TemplateIndex, Threshold, format};

const USAGE: &str = "usage: catalog build --threshold T [--count inputs|occurrences] --out CATALOG INPUT...\n       catalog info CATALOG";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => match parse_build(&args[1..]) {
            Some((threshold, out, inputs)) => build(threshold, &out, &inputs),
            None => return usage(),
        },
        Some("info") if args.len() == 2 => info(&args[1]),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("catalog: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

/// The threshold, the output path and the inputs of `build`.
fn parse_build(args: &[String]) -> Option<(Threshold, String, Vec<String>)> {
    let (mut threshold, mut count, mut out, mut inputs) = (None, "inputs", None, Vec::new());
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threshold" => threshold = Some(args.next()?.parse::<u32>().ok()?),
            "--count" => count = args.next()?.as_str(),
            "--out" => out = Some(args.next()?.clone()),
            _ => inputs.push(arg.clone()),
        }
    }
    let threshold = match count {
        "inputs" => Threshold::Inputs(threshold?),
        "occurrences" => Threshold::Occurrences(threshold?),
        _ => return None,
    };
    (!inputs.is_empty()).then_some((threshold, out?, inputs))
}

fn build(threshold: Threshold, out: &str, inputs: &[String]) -> Result<(), String> {
    let started = Instant::now();
    let mut builder = CatalogBuilder::new(threshold);
    for path in inputs {
        let stats = builder.add(path).map_err(|e| format!("{path}: {e}"))?;
        let kind = match stats.kind {
            InputKind::QemuStream => "QEMU stream",
            InputKind::RawImage => "raw image",
        };
        println!(
            "{path}: {kind}, {} pages ({} zero)",
            stats.pages, stats.zero_pages
        );
    }
    let distinct = builder.distinct();
    let catalog = builder.build().map_err(|e| e.to_string())?;
    catalog.save(out).map_err(|e| format!("{out}: {e}"))?;
    let bytes = std::fs::metadata(out).map_err(|e| e.to_string())?.len();
    println!(
        "kept {} templates of {distinct} distinct non-zero pages ({threshold:?})",
        catalog.len()
    );
    println!(
        "wrote {out}: {bytes} bytes in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    println!("id {}", catalog.id());
    Ok(())
}

fn info(path: &str) -> Result<(), String> {
    let fail = |e: migstream::Error| format!("{path}: {e}");
    let bytes = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let started = Instant::now();
    let catalog = Catalog::load(path).map_err(fail)?;
    let load = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let index = TemplateIndex::load(path).map_err(fail)?;
    let index_load = started.elapsed().as_secs_f64();
    let gbps = |seconds: f64| bytes as f64 / seconds / 1e9;
    println!("{path}: template catalog version {}", format::VERSION);
    println!("  page size  {}", catalog.page_size());
    println!("  templates  {}", catalog.len());
    println!("  id         {}", catalog.id());
    println!("  size       {bytes} bytes");
    println!(
        "  load       {load:.3} s, {:.2} GB/s, verified ok",
        gbps(load)
    );
    println!(
        "  index      {index_load:.3} s, {:.2} GB/s, {} bytes ({:.1} per template)",
        gbps(index_load),
        index.heap_bytes(),
        index.heap_bytes() as f64 / catalog.len().max(1) as f64
    );
    Ok(())
}
