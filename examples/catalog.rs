//! Build a TMDM template catalog from VMs' migration streams or memory images, and
//! inspect one.
//!
//! ```text
//! cargo run --release --example catalog -- build --threshold T [--count inputs|occurrences] --out CATALOG INPUT...
//! cargo run --release --example catalog -- info CATALOG
//! cargo run --release --example catalog -- push --nodes URLS|@FILE [--replicas R] [TLS] CATALOG
//! cargo run --release --example catalog -- verify --nodes URLS|@FILE [--replicas R] [TLS] CATALOG
//! ```
//!
//! `build` keeps the non-zero pages found in at least T inputs (`--count inputs`, the
//! default) or at least T times in all (`--count occurrences`). An input starting
//! with "QEVM" is read as a QEMU stream, any other file as a raw memory image.
//! `info` loads the catalog twice, whole with every page verified and as the
//! source's index, and reports the speed of both.
//!
//! `push` distributes a catalog over a ring of Redis servers (TMDHT, see
//! `docs/dht.md`): every template on its R nodes (default 2), the manifest on every
//! node; it reports the templates per node and the time taken. `verify` checks that
//! every template is present and correct on its R nodes and that every node holds
//! the manifest, reports the balance (most templates on a node ÷ mean) and the
//! missing copies, and exits non-zero if anything is missing. Both must be given the
//! same node list, spelled as the proxies spell it (credentials aside), in any
//! order: `redis://[[USER]:PASSWORD@]H:P` or `rediss://...` URLs, comma-separated,
//! or `@FILE` naming a file of them (keeps passwords out of the process list).
//! TLS: `--redis-ca PEM` (the CA to trust, instead of the system's roots) and
//! `--redis-cert PEM --redis-key PEM` (a client certificate).

use std::process::ExitCode;
use std::time::Instant;

use std::sync::Arc;

use migstream::dht::{self, Cluster, DEFAULT_REPLICAS};
use migstream::template::{Catalog, CatalogBuilder, InputKind, TemplateIndex, Threshold, format};

// the ring's flags are the destination proxy's; the template store is not used here
#[path = "support/templates.rs"]
#[allow(dead_code)]
mod templates;

const USAGE: &str =
    "usage: catalog build --threshold T [--count inputs|occurrences] --out CATALOG INPUT...
       catalog info CATALOG
       catalog push --nodes URLS|@FILE [--replicas R] [--redis-ca PEM] [--redis-cert PEM --redis-key PEM] CATALOG
       catalog verify --nodes URLS|@FILE [--replicas R] [--redis-ca PEM] [--redis-cert PEM --redis-key PEM] CATALOG
       (URLS: redis://[[USER]:PASSWORD@]H:P or rediss://..., comma-separated)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => match parse_build(&args[1..]) {
            Some((threshold, out, inputs)) => build(threshold, &out, &inputs),
            None => return usage(),
        },
        Some("info") if args.len() == 2 => info(&args[1]),
        Some(cmd @ ("push" | "verify")) => match parse_ring(&args[1..]) {
            Some(ring_args) => ring(cmd, &ring_args),
            None => return usage(),
        },
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

/// What `push` and `verify` are given.
struct RingArgs {
    /// `--nodes`: URLs or `@FILE`.
    nodes: String,
    replicas: usize,
    redis_ca: Option<String>,
    redis_cert: Option<String>,
    redis_key: Option<String>,
    catalog: String,
}

fn parse_ring(args: &[String]) -> Option<RingArgs> {
    let (mut nodes, mut replicas, mut catalog) = (None, DEFAULT_REPLICAS, None);
    let (mut redis_ca, mut redis_cert, mut redis_key) = (None, None, None);
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => nodes = Some(args.next()?.clone()),
            "--replicas" => replicas = args.next()?.parse().ok()?,
            "--redis-ca" => redis_ca = Some(args.next()?.clone()),
            "--redis-cert" => redis_cert = Some(args.next()?.clone()),
            "--redis-key" => redis_key = Some(args.next()?.clone()),
            _ if catalog.is_none() => catalog = Some(arg.clone()),
            _ => return None,
        }
    }
    Some(RingArgs {
        nodes: nodes?,
        replicas,
        redis_ca,
        redis_cert,
        redis_key,
        catalog: catalog?,
    })
}

/// `push` or `verify` over the ring of Redis servers `args` names.
fn ring(cmd: &str, args: &RingArgs) -> Result<(), String> {
    let path = &args.catalog;
    let catalog = Catalog::load(path).map_err(|e| format!("{path}: {e}"))?;
    let nodes = templates::node_urls(&args.nodes).map_err(|e| e.to_string())?;
    let options = templates::dht_options(
        args.redis_ca.as_deref(),
        args.redis_cert.as_deref(),
        args.redis_key.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let replicas = args.replicas;
    let cluster = Cluster::redis(&nodes, replicas, options).map_err(|e| e.to_string())?;
    let cluster = Arc::new(cluster);
    println!(
        "{path}: {} templates of {} bytes, id {}; {} nodes, {replicas} replicas",
        catalog.len(),
        catalog.page_size(),
        catalog.id(),
        nodes.len()
    );
    runtime.block_on(async {
        match cmd {
            "push" => push(&cluster, &catalog).await,
            _ => verify(&cluster, &catalog).await,
        }
    })
}

async fn push(cluster: &Arc<Cluster>, catalog: &Catalog) -> Result<(), String> {
    let report = dht::push(cluster, catalog)
        .await
        .map_err(|e| e.to_string())?;
    for (node, templates) in &report.per_node {
        println!("  {node}: {templates} templates");
    }
    let seconds = report.elapsed.as_secs_f64();
    let copies: usize = report.per_node.iter().map(|n| n.1).sum();
    println!(
        "pushed {} templates ({copies} copies, manifest on every node) in {seconds:.3} s, {:.0} copies/s, {:.1} MB/s",
        report.templates,
        copies as f64 / seconds,
        (copies * catalog.page_size()) as f64 / seconds / 1e6
    );
    Ok(())
}

async fn verify(cluster: &Arc<Cluster>, catalog: &Catalog) -> Result<(), String> {
    let started = Instant::now();
    let report = dht::verify(cluster, catalog)
        .await
        .map_err(|e| e.to_string())?;
    for n in &report.nodes {
        println!(
            "  {}: {} assigned, {} present, {} missing, {} wrong, manifest {}, current {}{}",
            n.name,
            n.assigned,
            n.present,
            n.missing,
            n.wrong,
            if n.manifest { "ok" } else { "MISSING" },
            if n.current { "yes" } else { "no" },
            n.error
                .as_ref()
                .map_or(String::new(), |e| format!(", error: {e}"))
        );
    }
    println!(
        "balance {:.3} (max/mean templates per node), {} copies missing or wrong, {} templates lost, in {:.3} s",
        report.balance(),
        report.missing(),
        report.lost,
        started.elapsed().as_secs_f64()
    );
    match report.ok() {
        true => Ok(()),
        false => Err(format!(
            "{} copies missing or wrong, {} templates on no node, {} nodes without the manifest",
            report.missing(),
            report.lost,
            report.nodes.iter().filter(|n| !n.manifest).count()
        )),
    }
}
