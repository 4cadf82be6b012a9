//! The two dedup proxies between two unmodified QEMUs, over a mutually authenticated
//! TLS link.
//!
//! ```text
//! QEMU ──▶ proxy source ══ dedup stream, mutual TLS ══▶ proxy destination ──▶ QEMU -incoming
//!
//! proxy destination --listen 0.0.0.0:4444 --to unix:/run/qemu-in.sock \
//!     --tls-cert dst.pem --tls-key dst.key --tls-ca ca.pem --tls-allow src.example [--catalog C | --dht URLS]
//! proxy source --listen unix:/run/mig.sock --to dst.example:4444 \
//!     --tls-cert src.pem --tls-key src.key --tls-ca ca.pem [--catalog C]
//! (source QEMU monitor)  migrate -d unix:/run/mig.sock
//! ```
//!
//! `proxy --help` and `proxy source --help` list every option. What the library does
//! for each (TLS, limits, timeouts, the verdict) is in `migstream::relay`; this
//! program parses arguments and prints. Each proxy prints `listening on ADDR` once
//! listening, a progress line every second per migration, and when a migration ends
//! either `wire <BYTES> bytes qemu <BYTES> bytes ratio <R> ...` (at the source: only
//! once the destination confirmed every byte reached its QEMU) or
//! `migration failed: ...`; `--json` prints one JSON object per migration on
//! stdout. Any error closes both connections of that migration: the source QEMU
//! reports the migration failed and its VM keeps running; a retry starts afresh.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use migstream::dedup::{MAX_THREADS, Resolvers, Stats};
use migstream::relay::net::{Conn, Endpoint};
use migstream::relay::tls::{TlsClient, TlsIdentity, TlsServer};
use migstream::relay::{
    DestinationConfig, DestinationProxy, Progress, ProxyLimits, Report, SourceConfig, SourceProxy,
    Timeouts,
};
use migstream::template::{Catalog, TemplateIndex};

#[path = "support/compression.rs"]
mod compression;
#[path = "support/templates.rs"]
mod templates;

use compression::CompressionArgs;
use templates::{DhtArgs, template_store};

#[derive(Parser)]
#[command(
    version,
    about = "The dedup proxies between a source and a destination QEMU"
)]
struct Cli {
    #[command(subcommand)]
    role: RoleArgs,
}

#[derive(Subcommand)]
enum RoleArgs {
    /// Takes the source QEMU's migration and sends it, deduplicated, to the destination proxy.
    Source(SourceArgs),
    /// Takes links from source proxies and restores each migration into the destination QEMU.
    Destination(DestinationArgs),
}

/// What both roles take.
#[derive(Args)]
struct Common {
    /// Where to listen: the source for its QEMU (HOST:PORT or unix:PATH), the
    /// destination for links (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Where to connect: the source to the destination proxy (HOST:PORT), the
    /// destination to its QEMU (HOST:PORT or unix:PATH).
    #[arg(long, value_name = "ADDR")]
    to: String,
    /// This end's certificate chain (PEM) for the link's mutual TLS.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<String>,
    /// This end's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<String>,
    /// The CA bundle (PEM) the peer's certificate must chain to.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<String>,
    /// Run the link without TLS: neither encrypted nor authenticated. Only for a link
    /// inside a VPN or an ssh tunnel.
    #[arg(long, conflicts_with = "tls_cert")]
    plaintext: bool,
    /// Template catalog file.
    #[arg(long, value_name = "FILE")]
    catalog: Option<String>,
    /// Migrations at once; more are refused [default: 1]. A source proxy with more
    /// cannot tell whose multifd channels are whose while several run: it refuses them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    max_migrations: usize,
    /// Multifd channels per migration (QEMU's multifd-channels); more are refused.
    #[arg(long, value_name = "N", default_value_t = 8)]
    max_channels: usize,
    /// Links in their handshake at once (destination); more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    max_handshakes: usize,
    /// Seconds for a TLS handshake and the peer's first message.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Seconds without progress either way before a migration is given up.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    idle_timeout: f64,
    /// Seconds to set up a connection (the link, QEMU).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    connect_timeout: f64,
    /// Threads compressing (source) or decompressing (destination) a migration's
    /// main channel, this one's included [default: half the cores, at least 1, at
    /// most 4].
    #[arg(long, value_name = "N", default_value_t = half_the_cores(), hide_default_value = true)]
    threads: usize,
    /// Serve one migration and exit with its outcome.
    #[arg(long)]
    once: bool,
    /// One JSON object per migration on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct SourceArgs {
    #[command(flatten)]
    common: Common,
    /// The name the destination's certificate must have [default: the host of --to].
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Keep the catalog's pages in memory and confirm template hits by comparing bytes.
    #[arg(long, requires = "catalog")]
    hold_catalog: bool,
    /// Keep the seen-before window's pages (up to 256 MiB per migration) and confirm repeats by comparing bytes.
    #[arg(long)]
    hold_seen: bool,
    /// Resolvers to run, from fill,xbzrle,seen; none for LZ4 alone [default: all].
    #[arg(long, value_name = "LIST")]
    resolvers: Option<String>,
    #[command(flatten)]
    compression: CompressionArgs,
    /// MiB of QEMU stream taken in beyond what the destination acknowledged, at most
    /// (the window follows the link: about two round trips of its pace): QEMU then
    /// sees the link's pace when it decides to stop the VM.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    credit_window: u64,
}

#[derive(Args)]
struct DestinationArgs {
    #[command(flatten)]
    common: Common,
    /// Client certificate names allowed on the link (comma-separated); any of the CA if not given.
    #[arg(
        long,
        value_name = "NAME[,NAME]",
        value_delimiter = ',',
        requires = "tls_cert"
    )]
    tls_allow: Vec<String>,
    // the ring of Redis nodes to fetch templates from, instead of --catalog
    #[command(flatten)]
    dht: DhtArgs,
    /// Seconds without a catalog offered after the template store failed a migration.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    template_cooldown: f64,
}

/// One end's proxy, shared by all its migrations.
enum Role {
    Source(SourceProxy),
    Destination(DestinationProxy),
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
    json: bool,
    quiet: bool,
    /// Migrations so far: main channels that got past the handshake.
    migrations: AtomicU64,
}

fn main() -> ExitCode {
    // a migration's futures, nested relay in proxy, outgrow the 2 MiB of tokio's
    // default worker stack in a debug build (about 1.9 MiB measured in gdb)
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(8 << 20)
        .build()
        .expect("a tokio runtime")
        .block_on(proxy_main())
}

async fn proxy_main() -> ExitCode {
    let cli = Cli::parse();
    // the library's events (refused links, failover, timeouts): warnings and worse,
    // or as MIGSTREAM_LOG says (error, warn, info, debug, trace)
    let level = std::env::var("MIGSTREAM_LOG")
        .ok()
        .and_then(|level| level.parse().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error>;

async fn run(cli: Cli) -> Result<ExitCode, BoxError> {
    let common = match &cli.role {
        RoleArgs::Source(a) => &a.common,
        RoleArgs::Destination(a) => &a.common,
    };
    let identity = match (&common.tls_cert, &common.tls_key, &common.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsIdentity::from_pem_files(cert, key, ca)?),
        _ if common.plaintext => None,
        _ => {
            return Err(
                "the link needs --tls-cert, --tls-key and --tls-ca (or --plaintext \
                         for a link inside a VPN or an ssh tunnel)"
                    .into(),
            );
        }
    };
    // first, so that the line announcing the address comes first; migrations that
    // connect while the template store loads wait in the backlog
    let listener = common.listen.parse::<Endpoint>()?.listen().await?;
    let plain = match identity {
        None => " (plaintext link: not encrypted, not authenticated)",
        Some(_) => "",
    };
    eprintln!("listening on {}{plain}", listener.local_addr()?);
    let timeouts = Timeouts::default()
        .with_handshake(Duration::from_secs_f64(common.handshake_timeout))
        .with_idle(Duration::from_secs_f64(common.idle_timeout))
        .with_connect(Duration::from_secs_f64(common.connect_timeout));
    let role = match &cli.role {
        RoleArgs::Source(a) => Role::Source(source_proxy(a, identity.as_ref(), timeouts)?),
        RoleArgs::Destination(a) => {
            Role::Destination(destination_proxy(a, identity.as_ref(), timeouts).await?)
        }
    };
    let proxy = Arc::new(Proxy {
        role,
        json: common.json,
        quiet: common.quiet,
        migrations: AtomicU64::new(0),
    });
    // outcomes of migrations (not of refused connections), for --once
    let (outcomes, mut outcome) = tokio::sync::mpsc::unbounded_channel();
    loop {
        tokio::select! {
            (conn, peer) = listener.accept() => {
                let (proxy, outcomes) = (proxy.clone(), outcomes.clone());
                tokio::spawn(async move {
                    if let Some(ok) = proxy.serve(conn, peer).await {
                        let _ = outcomes.send(ok);
                    }
                });
            }
            Some(ok) = outcome.recv(), if common.once => {
                return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
        }
    }
}

/// The default `--threads`: half the cores this process may run on, 1 to
/// [`MAX_THREADS`]. A proxy shares its host with the guests and QEMU: on a 2-vCPU
/// host migrating at 1 Gbit/s, one thread per proxy was faster than two in 7 of 8
/// runs, for 9-30 % less CPU (`docs/benchmarks.md`, WAN, "Paced credit window").
fn half_the_cores() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, MAX_THREADS)
}

fn limits(common: &Common) -> ProxyLimits {
    ProxyLimits::default()
        .with_max_migrations(common.max_migrations)
        .with_max_handshakes(common.max_handshakes)
        .with_max_channels(common.max_channels)
}

fn source_proxy(
    a: &SourceArgs,
    identity: Option<&TlsIdentity>,
    timeouts: Timeouts,
) -> Result<SourceProxy, BoxError> {
    let compression = a.compression.compression()?;
    let templates = match &a.common.catalog {
        Some(path) if a.hold_catalog => Some(Arc::new(TemplateIndex::holding(Arc::new(
            Catalog::load(path)?,
        )))),
        Some(path) => Some(Arc::new(TemplateIndex::load(path)?)),
        None => None,
    };
    let mut resolvers = Resolvers::default()
        .with_templates(templates)
        .with_hold_seen(a.hold_seen);
    if let Some(list) = &a.resolvers {
        let names: Vec<&str> = list.split(',').filter(|n| *n != "none").collect();
        if let Some(bad) = names
            .iter()
            .find(|n| !["fill", "xbzrle", "seen"].contains(n))
        {
            return Err(format!(
                "--resolvers: unknown resolver {bad:?} (fill, xbzrle, seen, none)"
            )
            .into());
        }
        resolvers = resolvers
            .with_fill(names.contains(&"fill"))
            .with_xbzrle(names.contains(&"xbzrle"))
            .with_seen(names.contains(&"seen"));
    }
    let to = &a.common.to;
    let tls = match identity {
        Some(identity) => {
            let default_name = to.rsplit_once(':').map_or(to.as_str(), |(host, _)| host);
            let name = a
                .tls_server_name
                .as_deref()
                .unwrap_or(default_name.trim_start_matches('[').trim_end_matches(']'));
            Some(TlsClient::new(identity, name)?)
        }
        None => None,
    };
    let config = SourceConfig::default()
        .with_resolvers(resolvers)
        .with_compression(compression)
        .with_timeouts(timeouts)
        .with_credit_window(a.credit_window << 20)
        .with_threads(a.common.threads);
    Ok(SourceProxy::new(config, to.clone(), tls).with_limits(limits(&a.common)))
}

async fn destination_proxy(
    a: &DestinationArgs,
    identity: Option<&TlsIdentity>,
    timeouts: Timeouts,
) -> Result<DestinationProxy, BoxError> {
    let tls = match identity {
        Some(identity) => Some(TlsServer::new(identity, &a.tls_allow)?),
        None => None,
    };
    let store = template_store(a.common.catalog.as_deref(), &a.dht).await?;
    let mut config = DestinationConfig::default()
        .with_timeouts(timeouts)
        .with_threads(a.common.threads);
    if let Some(store) = store {
        config = config.with_templates(store);
    }
    let qemu: Endpoint = a.common.to.parse()?;
    Ok(DestinationProxy::new(config, qemu, tls)
        .with_limits(limits(&a.common))
        .with_template_cooldown(Duration::from_secs_f64(a.template_cooldown)))
}

impl Proxy {
    /// Runs the migration of one connection and reports it: `Some(true)` if it
    /// succeeded, `None` if the connection was refused before it became a migration
    /// (a port scan, a peer without the right certificate, a stalled handshake):
    /// that is logged, not counted. A multifd channel is reported with its
    /// migration, by the main channel's connection.
    async fn serve(self: Arc<Self>, conn: Conn, peer: String) -> Option<bool> {
        let started = Instant::now();
        let progress = Arc::new(Progress::default());
        let id = Arc::new(OnceLock::new());
        let outcome = match &self.role {
            Role::Source(proxy) => {
                self.ticking(&id, &progress, proxy.serve(conn, &progress))
                    .await
            }
            Role::Destination(proxy) => {
                let incoming = match proxy.handshake(conn).await {
                    Ok(incoming) => incoming,
                    Err(e) => {
                        tracing::warn!("link from {peer} refused: {e}");
                        return None;
                    }
                };
                self.ticking(&id, &progress, incoming.restore(&progress))
                    .await
            }
        };
        if let Some(channel) = progress.channel() {
            match outcome {
                Ok(_) => tracing::debug!("multifd channel {channel} ended"),
                Err(e) => tracing::warn!("multifd channel {channel} failed: {e}"),
            }
            return None;
        }
        let outcome = outcome
            .map(|served| served.report().expect("a main channel's connection"))
            .map_err(|e| e.to_string());
        let id = *id.get_or_init(|| self.next_id());
        self.report(id, &outcome, &progress.snapshot(), started.elapsed());
        Some(outcome.is_ok())
    }

    /// The next migration's number.
    fn next_id(&self) -> u64 {
        self.migrations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Runs `work` with a progress line for migration `id` every second, unless
    /// `--quiet`.
    async fn ticking<T>(
        self: &Arc<Self>,
        id: &Arc<OnceLock<u64>>,
        progress: &Arc<Progress>,
        work: impl Future<Output = T>,
    ) -> T {
        let ticker =
            (!self.quiet).then(|| tokio::spawn(self.clone().tick(id.clone(), progress.clone())));
        let outcome = work.await;
        if let Some(ticker) = ticker {
            ticker.abort();
        }
        outcome
    }

    /// Prints the progress of migration `id` (numbered at the first line) every
    /// second until aborted: in place on a terminal, as lines otherwise. A multifd
    /// channel's progress is in its main channel's line.
    async fn tick(self: Arc<Self>, id: Arc<OnceLock<u64>>, progress: Arc<Progress>) {
        let (started, terminal) = (Instant::now(), std::io::stderr().is_terminal());
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            if progress.channel().is_some() {
                return;
            }
            let id = *id.get_or_init(|| self.next_id());
            let stats = progress.snapshot();
            let rate = stats.qemu_bytes as f64 / started.elapsed().as_secs_f64() / 1e6;
            let line = format!(
                "[{} #{id}] qemu {:.1} MB wire {:.1} MB ratio {:.4} {rate:.1} MB/s {}",
                self.role.name(),
                stats.qemu_bytes as f64 / 1e6,
                stats.wire_bytes as f64 / 1e6,
                stats.ratio(),
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
                 templates {}{}) {}",
                stats.wire_bytes,
                stats.qemu_bytes,
                stats.ratio(),
                if report.templates { "on" } else { "off" },
                match report.channels.len() {
                    0 => String::new(),
                    n => format!(", {n} multifd channels"),
                },
                pages(stats),
            ),
            Err(e) => eprintln!("\rmigration failed: {e} (migration {id}, {role}, {secs:.2} s)"),
        }
        if self.json {
            let channels: Vec<serde_json::Value> = outcome.as_ref().map_or(vec![], |report| {
                let channel = |(id, stats): &(u8, Stats)| {
                    serde_json::json!({
                        "channel": id,
                        "qemu_bytes": stats.qemu_bytes,
                        "wire_bytes": stats.wire_bytes,
                        "ratio": stats.ratio(),
                        "opaque_bytes": stats.opaque_bytes,
                        "pages": pages_json(stats),
                    })
                };
                report.channels.iter().map(channel).collect()
            });
            let line = serde_json::json!({
                "migration": id,
                "role": role,
                "ok": outcome.is_ok(),
                "error": outcome.as_ref().err(),
                "qemu_bytes": stats.qemu_bytes,
                "wire_bytes": stats.wire_bytes,
                "ratio": stats.ratio(),
                "seconds": secs,
                "templates": outcome.as_ref().is_ok_and(|r| r.templates),
                "pages": pages_json(stats),
                "opaque_bytes": stats.opaque_bytes,
                "channels": channels,
            });
            // a closed stdout (`| head`) must not take the proxy down
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }
}

fn pages_json(stats: &Stats) -> serde_json::Map<String, serde_json::Value> {
    let named = stats.named_pages();
    named
        .map(|(name, n)| (name.to_string(), n.into()))
        .collect()
}

fn pages(stats: &Stats) -> String {
    let named = stats.named_pages().map(|(name, n)| format!("{name}={n}"));
    named.collect::<Vec<_>>().join(" ")
}
