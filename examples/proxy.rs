//! The two dedup proxies between two unmodified QEMUs.
//!
//! ```text
//! QEMU ──tcp──▶ proxy source ══ dedup stream ══▶ proxy destination ──tcp──▶ QEMU -incoming
//!
//! cargo run --release --example proxy -- destination --listen 0.0.0.0:4444 --to 127.0.0.1:4445 [--catalog C | --dht URLS]
//! cargo run --release --example proxy -- source --listen 127.0.0.1:4443 --to DEST_HOST:4444 [--catalog C]
//! (source QEMU monitor)  migrate -d tcp:127.0.0.1:4443
//! ```
//!
//! Options (both roles): `--once` serves one migration and exits with its outcome;
//! `--json` prints one JSON object per migration on stdout; `--quiet` drops the
//! progress lines; `--connect-timeout SECS` (default 10). Source only: `--resolvers
//! LIST` picks from `fill,xbzrle,seen` (default all; `none` for LZ4 alone), `--zstd
//! LEVEL` (with the `zstd` feature), `--lz4-acceleration N` (migstream's own LZ4
//! encoder probing every N-th position at first: less CPU, a few % more bytes).
//! `--catalog` enables templates; the source uses
//! them only if the destination holds the same catalog; `--hold-catalog` makes the
//! source keep the catalog's pages in memory (its size; otherwise ~40 bytes per
//! template) and confirm template hits by comparing bytes instead of hashing them,
//! which saves about 1.4 µs per template page; `--hold-seen` makes it keep the
//! seen-before window's pages too (up to 256 MiB per migration, as the destination
//! does), so that a repeated page is confirmed by comparing bytes, not by a BLAKE3
//! per repeat. Destination only: `--dht
//! redis://H:P,redis://H:P,...` restores templates from the ring of Redis nodes the
//! catalog was pushed to (`catalog -- push`), `--replicas R` as pushed (default 2).
//!
//! Each proxy prints `listening on IP:PORT` once listening, a progress line every
//! second per migration, and when a migration ends either
//! `wire <BYTES> bytes qemu <BYTES> bytes ratio <R> ...` or `migration failed: ...`.
//! Any error closes both connections of that migration: the source QEMU reports
//! the migration failed and its VM keeps running; a retry starts afresh.
//!
//! Memory per migration is bounded whatever the stream's length: at the source the
//! XBZRLE cache (64 MiB) and the seen-before index (~3 MiB; with `--hold-seen` plus
//! the window's pages, 256 MiB); at the destination the
//! seen-before ring (256 MiB), the XBZRLE cache (64 MiB) and at most one frame's
//! buffers and the held tail (`dedup::Limits`: 32 + 32 + 64 + 64 MiB worst case).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use migstream::dedup::{Compression, Resolvers, Stats};
use migstream::dht::DEFAULT_REPLICAS;
use migstream::relay::{self, DestinationConfig, Progress, Report, SourceConfig};
use migstream::resolve::tag;
use migstream::template::{Catalog, TemplateIndex};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/templates.rs"]
mod templates;

use templates::template_store;

const USAGE: &str = "usage: proxy source|destination --listen ADDR --to ADDR [--catalog FILE] \
[--hold-catalog] [--hold-seen] [--dht URLS [--replicas R]] [--resolvers fill,xbzrle,seen|none] [--zstd LEVEL | --lz4-acceleration N] [--once] [--json] \
[--quiet] [--connect-timeout SECS]";

/// One end's settings, shared by all its migrations.
enum Role {
    Source(SourceConfig),
    Destination(DestinationConfig),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Role::Source(_) => "source",
            Role::Destination(_) => "destination",
        }
    }
}

struct Proxy {
    role: Role,
    to: String,
    json: bool,
    quiet: bool,
    connect_timeout: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Vec<String>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut args = args.into_iter();
    let role = args.next().ok_or(USAGE)?;
    let (mut listen, mut to, mut catalog, mut resolvers) = (None, None, None, None);
    let (mut dht, mut replicas) = (None, DEFAULT_REPLICAS);
    let (mut zstd, mut once, mut json, mut quiet, mut timeout) = (None, false, false, false, 10.0);
    let (mut hold, mut hold_seen, mut acceleration) = (false, false, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(USAGE);
        match arg.as_str() {
            "--listen" => listen = Some(value()?),
            "--to" => to = Some(value()?),
            "--catalog" => catalog = Some(value()?),
            "--hold-catalog" => hold = true,
            "--hold-seen" => hold_seen = true,
            "--dht" => dht = Some(value()?),
            "--replicas" => replicas = value()?.parse()?,
            "--resolvers" => resolvers = Some(value()?),
            "--zstd" => zstd = Some(value()?.parse::<i32>()?),
            "--lz4-acceleration" => acceleration = Some(value()?.parse::<u32>()?),
            "--connect-timeout" => timeout = value()?.parse::<f64>()?,
            "--once" => once = true,
            "--json" => json = true,
            "--quiet" => quiet = true,
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}").into()),
        }
    }
    let (listen, to) = (listen.ok_or(USAGE)?, to.ok_or(USAGE)?);
    // first, so that the line announcing the port comes first; migrations that
    // connect while the template store loads wait in the backlog
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    let role = match role.as_str() {
        "source" => {
            let compression = match (zstd, acceleration) {
                (Some(_), Some(_)) => return Err("--zstd or --lz4-acceleration, not both".into()),
                (Some(level), None) => zstd_compression(level)?,
                (None, Some(n)) => Compression::Lz4Accelerated(n),
                (None, None) => Compression::Lz4,
            };
            Role::Source(source_config(
                catalog,
                hold,
                hold_seen,
                resolvers,
                compression,
            )?)
        }
        "destination" => Role::Destination(DestinationConfig {
            templates: template_store(catalog.as_deref(), dht.as_deref(), replicas).await?,
            ..DestinationConfig::default()
        }),
        _ => return Err(USAGE.into()),
    };
    let proxy = Arc::new(Proxy {
        role,
        to,
        json,
        quiet,
        connect_timeout: Duration::from_secs_f64(timeout),
    });
    for id in 1.. {
        let (inbound, _) = listener.accept().await?;
        let migration = tokio::spawn(proxy.clone().serve(id, inbound));
        if once {
            return Ok(match migration.await? {
                true => ExitCode::SUCCESS,
                false => ExitCode::FAILURE,
            });
        }
    }
    unreachable!("a u64 of migrations")
}

fn source_config(
    catalog: Option<String>,
    hold: bool,
    hold_seen: bool,
    resolvers: Option<String>,
    compression: Compression,
) -> Result<SourceConfig, Box<dyn std::error::Error>> {
    let mut chosen = Resolvers {
        templates: match catalog {
            Some(path) if hold => Some(Arc::new(TemplateIndex::holding(Arc::new(Catalog::load(
                path,
            )?)))),
            Some(path) => Some(Arc::new(TemplateIndex::load(path)?)),
            None => None,
        },
        hold_seen,
        ..Resolvers::default()
    };
    if let Some(list) = resolvers {
        let names: Vec<&str> = list.split(',').filter(|n| *n != "none").collect();
        if let Some(bad) = names
            .iter()
            .find(|n| !["fill", "xbzrle", "seen"].contains(n))
        {
            return Err(format!("unknown resolver {bad:?} (fill, xbzrle, seen, none)").into());
        }
        chosen.fill = names.contains(&"fill");
        chosen.xbzrle = names.contains(&"xbzrle");
        chosen.seen = names.contains(&"seen");
    }
    Ok(SourceConfig {
        resolvers: chosen,
        compression,
        ..SourceConfig::default()
    })
}

#[cfg(feature = "zstd")]
fn zstd_compression(level: i32) -> Result<Compression, Box<dyn std::error::Error>> {
    Ok(Compression::Zstd(level))
}

#[cfg(not(feature = "zstd"))]
fn zstd_compression(_level: i32) -> Result<Compression, Box<dyn std::error::Error>> {
    Err("--zstd needs the zstd feature (cargo run --features zstd ...)".into())
}

impl Proxy {
    /// Runs one migration and reports it; true if it succeeded.
    async fn serve(self: Arc<Self>, id: u64, inbound: TcpStream) -> bool {
        let started = Instant::now();
        let progress = Arc::new(Progress::default());
        let ticker = (!self.quiet).then(|| tokio::spawn(self.clone().tick(id, progress.clone())));
        let outcome = self.relay(inbound, &progress).await;
        if let Some(ticker) = ticker {
            ticker.abort();
        }
        self.report(id, &outcome, &progress.snapshot(), started.elapsed());
        outcome.is_ok()
    }

    async fn relay(&self, inbound: TcpStream, progress: &Progress) -> Result<Report, String> {
        let connect = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.to));
        let outbound = match connect.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(format!("connecting to {}: {e}", self.to)),
            Err(_) => return Err(format!("connecting to {}: timed out", self.to)),
        };
        for stream in [&inbound, &outbound] {
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
        }
        if let Role::Source(_) = self.role {
            keep_queues_short(&inbound, &outbound).map_err(|e| e.to_string())?;
        }
        let (inbound, outbound) = (inbound.into_split(), outbound.into_split());
        let report = match &self.role {
            Role::Source(config) => relay::source(inbound, outbound, config, progress).await,
            Role::Destination(config) => {
                relay::destination(inbound, outbound, config, progress).await
            }
        };
        report.map_err(|e| e.to_string())
    }

    /// Prints the progress of migration `id` every second until aborted: in place on
    /// a terminal, as lines otherwise.
    async fn tick(self: Arc<Self>, id: u64, progress: Arc<Progress>) {
        let (started, terminal) = (Instant::now(), std::io::stderr().is_terminal());
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            let stats = progress.snapshot();
            let rate = stats.qemu_bytes as f64 / started.elapsed().as_secs_f64() / 1e6;
            let line = format!(
                "[{} #{id}] qemu {:.1} MB wire {:.1} MB ratio {:.4} {rate:.1} MB/s {}",
                self.role.name(),
                stats.qemu_bytes as f64 / 1e6,
                stats.wire_bytes as f64 / 1e6,
                ratio(&stats),
                pages(&stats),
            );
            match terminal {
                true => eprint!("\r{line}\x1b[K"),
                false => eprintln!("{line}"),
            }
        }
    }

    fn report(&self, id: u64, outcome: &Result<Report, String>, progress: &Stats, took: Duration) {
        let role = self.role.name();
        let stats = outcome.as_ref().map_or(progress, |r| &r.stats);
        let secs = took.as_secs_f64();
        match outcome {
            Ok(report) => eprintln!(
                "\rwire {} bytes qemu {} bytes ratio {:.4} (migration {id}, {role}, {secs:.2} s, \
                 templates {}) {}",
                stats.wire_bytes,
                stats.qemu_bytes,
                ratio(stats),
                if report.templates { "on" } else { "off" },
                pages(stats),
            ),
            Err(e) => eprintln!("\rmigration failed: {e} (migration {id}, {role}, {secs:.2} s)"),
        }
        if self.json {
            let pages: serde_json::Map<String, serde_json::Value> = tag::NAMED
                .iter()
                .map(|&(name, t)| (name.to_string(), stats.pages[usize::from(t)].into()))
                .collect();
            let line = serde_json::json!({
                "migration": id,
                "role": role,
                "ok": outcome.is_ok(),
                "error": outcome.as_ref().err(),
                "qemu_bytes": stats.qemu_bytes,
                "wire_bytes": stats.wire_bytes,
                "ratio": ratio(stats),
                "seconds": secs,
                "templates": outcome.as_ref().is_ok_and(|r| r.templates),
                "pages": pages,
            });
            println!("{line}");
        }
    }
}

/// Bytes the source proxy lets wait in the kernel: unsent on the link, unread from
/// QEMU. The link stays full (what is in flight is not counted), and the source
/// QEMU cannot run far ahead of it.
const QUEUE: u32 = 128 * 1024;

/// Keeps the source QEMU's view of the migration in step with the link. QEMU decides
/// when to stop the VM for the last pass from how fast its socket drains; with the
/// kernel's default queues megabytes of deduplicated stream would wait behind that
/// decision on a slow link, and the VM would stay stopped until they drained.
#[cfg(target_os = "linux")]
fn keep_queues_short(qemu: &TcpStream, link: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(link).set_tcp_notsent_lowat(QUEUE)?;
    socket2::SockRef::from(qemu).set_recv_buffer_size(QUEUE as usize)
}

#[cfg(not(target_os = "linux"))]
fn keep_queues_short(_qemu: &TcpStream, _link: &TcpStream) -> std::io::Result<()> {
    Ok(())
}

fn ratio(stats: &Stats) -> f64 {
    stats.wire_bytes as f64 / (stats.qemu_bytes as f64).max(1.0)
}

fn pages(stats: &Stats) -> String {
    let named = tag::NAMED
        .iter()
        .map(|&(name, t)| (name, stats.pages[usize::from(t)]));
    named
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}
