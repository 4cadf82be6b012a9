//! Build a TMDM template catalog from VMs' migration streams or memory images,
//! inspect one, and distribute one over a ring of Redis nodes.
//!
//! ```text
//! cargo run --release --example catalog -- build --threshold T [--count inputs|occurrences] --out CATALOG INPUT...
//! cargo run --release --example catalog -- info CATALOG
//! cargo run --release --example catalog -- push --nodes URLS|@FILE [--replicas R] [TLS] CATALOG
//! cargo run --release --example catalog -- verify --nodes URLS|@FILE [--replicas R] [TLS] CATALOG
//! ```
//!
//! `catalog --help` and `catalog SUBCOMMAND --help` list every option. A closed
//! stdout (`| head`) ends the printing, not the work: the catalog is still written,
//! the push still done, and the exit status is the work's.
//!
//! `build` keeps the non-zero pages found in at least T inputs (`--count inputs`, the
//! default) or at least T times in all (`--count occurrences`). An input starting
//! with "QEVM" is read as a QEMU stream, any other file as a raw memory image.
//! The catalog is written to a temporary file beside CATALOG, renamed to CATALOG
//! once complete: on failure no CATALOG appears (one already there is left as it
//! was). If no page reaches the threshold, `build` writes nothing and fails.
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
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use migstream::dht::{self, Cluster, DEFAULT_REPLICAS};
use migstream::template::{Catalog, CatalogBuilder, InputKind, TemplateIndex, Threshold, format};

#[path = "support/out.rs"]
mod out;
#[path = "support/output.rs"]
mod output;
// the node list and TLS flags are the destination proxy's; its template store is not
// used here
#[path = "support/templates.rs"]
#[allow(dead_code)]
mod templates;

use out::outln;
use output::Output;
use templates::RedisTlsArgs;

#[derive(Parser)]
#[command(
    version,
    about = "Build a template catalog from VMs' migration streams or memory images, inspect it, \
             push it to a ring of Redis nodes and verify it there"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Builds a catalog of the non-zero pages shared by the inputs.
    Build(BuildArgs),
    /// Loads a catalog, verifying every page, and reports it and the load speeds.
    Info {
        /// The catalog file.
        #[arg(value_name = "CATALOG")]
        catalog: String,
    },
    /// Distributes a catalog over a ring of Redis nodes: every template on its R
    /// nodes, the manifest on every node.
    Push(RingArgs),
    /// Checks that every template is present and correct on its R nodes and every
    /// node holds the manifest; exits non-zero if anything is missing.
    Verify(RingArgs),
}

#[derive(Args)]
struct BuildArgs {
    /// Keep the pages counted at least this many times (see --count).
    #[arg(long, value_name = "T")]
    threshold: u32,
    /// What the threshold counts: the inputs holding a page, or all its occurrences.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = Count::Inputs)]
    count: Count,
    /// The catalog file to write.
    #[arg(long, value_name = "CATALOG")]
    out: String,
    /// QEMU migration streams (starting with "QEVM") or raw memory images.
    #[arg(value_name = "INPUT", required = true)]
    inputs: Vec<String>,
}

/// What `--threshold` counts.
#[derive(Clone, Copy, ValueEnum)]
enum Count {
    /// The inputs holding the page (once per input).
    Inputs,
    /// Every occurrence of the page, in all inputs.
    Occurrences,
}

/// What `push` and `verify` are given.
#[derive(Args)]
struct RingArgs {
    /// The ring's nodes: comma-separated redis://[[USER]:PASSWORD@]HOST:PORT or
    /// rediss:// URLs, or @FILE of them (keeps passwords out of the process list); the
    /// proxies' list, in any order.
    #[arg(long, value_name = "URLS|@FILE")]
    nodes: String,
    /// Copies of each template on the ring.
    #[arg(long, value_name = "R", default_value_t = DEFAULT_REPLICAS)]
    replicas: usize,
    #[command(flatten)]
    tls: RedisTlsArgs,
    /// The catalog file.
    #[arg(value_name = "CATALOG")]
    catalog: String,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Build(a) => {
            let threshold = match a.count {
                Count::Inputs => Threshold::Inputs(a.threshold),
                Count::Occurrences => Threshold::Occurrences(a.threshold),
            };
            build(threshold, &a.out, &a.inputs)
        }
        Command::Info { catalog } => info(&catalog),
        Command::Push(a) => ring("push", &a),
        Command::Verify(a) => ring("verify", &a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("catalog: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A closed stdout is no error (see `out`); any other failure to print is.
fn printed(result: std::io::Result<()>) -> Result<(), String> {
    result.map_err(|e| format!("stdout: {e}"))
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
        printed(outln!(
            "{path}: {kind}, {} pages ({} zero)",
            stats.pages,
            stats.zero_pages
        ))?;
    }
    let distinct = builder.distinct();
    let catalog = builder.build().map_err(|e| e.to_string())?;
    if catalog.is_empty() {
        let (count, what) = match threshold {
            Threshold::Inputs(t) => (t, "inputs"),
            Threshold::Occurrences(t) => (t, "occurrences"),
        };
        return Err(format!(
            "no page reaches the threshold (--threshold {count} --count {what}) among the \
             {distinct} distinct non-zero pages of the {} inputs: {out} not written",
            inputs.len()
        ));
    }
    let (partial, file) = Output::create(out).map_err(|e| format!("{out}: {e}"))?;
    catalog.write_to(&file).map_err(|e| format!("{out}: {e}"))?;
    drop(file);
    partial.commit().map_err(|e| format!("{out}: {e}"))?;
    let bytes = std::fs::metadata(out).map_err(|e| e.to_string())?.len();
    printed(outln!(
        "kept {} templates of {distinct} distinct non-zero pages ({threshold:?})",
        catalog.len()
    ))?;
    printed(outln!(
        "wrote {out}: {bytes} bytes in {:.3} s",
        started.elapsed().as_secs_f64()
    ))?;
    printed(outln!("id {}", catalog.id()))
}

fn info(path: &str) -> Result<(), String> {
    let fail = |e: migstream::Error| format!("{path}: {e}");
    let bytes = std::fs::metadata(path)
        .map_err(|e| format!("{path}: {e}"))?
        .len();
    let started = Instant::now();
    let catalog = Catalog::load(path).map_err(fail)?;
    let load = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let index = TemplateIndex::load(path).map_err(fail)?;
    let index_load = started.elapsed().as_secs_f64();
    let gbps = |seconds: f64| bytes as f64 / seconds / 1e9;
    let lines = || -> std::io::Result<()> {
        outln!("{path}: template catalog version {}", format::VERSION)?;
        outln!("  page size  {}", catalog.page_size())?;
        outln!("  templates  {}", catalog.len())?;
        outln!("  id         {}", catalog.id())?;
        outln!("  size       {bytes} bytes")?;
        outln!(
            "  load       {load:.3} s, {:.2} GB/s, verified ok",
            gbps(load)
        )?;
        outln!(
            "  index      {index_load:.3} s, {:.2} GB/s, {} bytes ({:.1} per template)",
            gbps(index_load),
            index.heap_bytes(),
            index.heap_bytes() as f64 / catalog.len().max(1) as f64
        )
    };
    printed(lines())
}

/// `push` or `verify` over the ring of Redis servers `args` names.
fn ring(cmd: &str, args: &RingArgs) -> Result<(), String> {
    let path = &args.catalog;
    let catalog = Catalog::load(path).map_err(|e| format!("{path}: {e}"))?;
    let nodes = templates::node_urls(&args.nodes).map_err(|e| format!("--nodes: {e}"))?;
    let options = templates::dht_options(&args.tls).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let replicas = args.replicas;
    let cluster = Cluster::redis(&nodes, replicas, options).map_err(|e| e.to_string())?;
    let cluster = Arc::new(cluster);
    printed(outln!(
        "{path}: {} templates of {} bytes, id {}; {} nodes, {replicas} replicas",
        catalog.len(),
        catalog.page_size(),
        catalog.id(),
        nodes.len()
    ))?;
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
        printed(outln!("  {node}: {templates} templates"))?;
    }
    let seconds = report.elapsed.as_secs_f64();
    let copies: usize = report.per_node.iter().map(|n| n.1).sum();
    printed(outln!(
        "pushed {} templates ({copies} copies, manifest on every node) in {seconds:.3} s, {:.0} copies/s, {:.1} MB/s",
        report.templates,
        copies as f64 / seconds,
        (copies * catalog.page_size()) as f64 / seconds / 1e6
    ))
}

async fn verify(cluster: &Arc<Cluster>, catalog: &Catalog) -> Result<(), String> {
    let started = Instant::now();
    let report = dht::verify(cluster, catalog)
        .await
        .map_err(|e| e.to_string())?;
    for n in &report.nodes {
        printed(outln!(
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
        ))?;
    }
    printed(outln!(
        "balance {:.3} (max/mean templates per node), {} copies missing or wrong, {} templates lost, in {:.3} s",
        report.balance(),
        report.missing(),
        report.lost,
        started.elapsed().as_secs_f64()
    ))?;
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
