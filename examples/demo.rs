//! The migstream demo: live-migrate VMs through the two dedup proxies and see what
//! crosses the link.
//!
//! ```text
//! cargo run --release --example demo            # needs nothing but Rust
//! cargo run --release --example demo -- --qemu  # two real QEMUs (harness/setup.sh first)
//! cargo run --release --example demo -- --qemu --workload fill --mem 512
//! ```
//!
//! `demo --help` lists the options.
//!
//! With no arguments, everything happens in this process:
//!
//! 1. guests are built in memory from this machine's own programs, libraries and
//!    data files (their shared OS image and page cache), private heap data, free
//!    memory and duplicated pages ([`guest`]);
//! 2. a template catalog is built from four of them, as an operator would from
//!    captured migration streams, and pushed to a DHT ring of three in-process store
//!    nodes ([`modes`]);
//! 3. two other guests, not in the catalog, are migrated the way QEMU 10.0 sends
//!    them ([`stream`]) through `migstream::relay`'s source and destination ends over
//!    loopback TCP ([`link`]), once per resolver mode, each time checking that the
//!    destination QEMU received exactly the bytes the source QEMU sent;
//! 4. a table shows what QEMU sent, what crossed the link, and how long it took.
//!
//! `--qemu` runs the same modes with real QEMUs and the proxy binary through the
//! project's harness ([`real_qemu`]).
//!
//! The demo stops quietly (exit status 0) once nobody reads what it prints:
//! `demo | head -3`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use migstream::template::{Catalog, CatalogBuilder, Threshold};

#[path = "support/out.rs"]
mod out;

#[path = "demo/guest.rs"]
mod guest;
#[path = "demo/host_files.rs"]
mod host_files;
#[path = "demo/link.rs"]
mod link;
#[path = "demo/modes.rs"]
mod modes;
#[path = "demo/real_qemu.rs"]
mod real_qemu;
#[path = "demo/stream.rs"]
mod stream;
#[path = "../tests/support/synthetic.rs"]
mod synthetic;
#[path = "demo/table.rs"]
mod table;

use guest::{DB, Guest, WEB};
use host_files::HostFiles;
use modes::{Mode, Templates};
use out::outln;
use stream::QemuStream;
use table::Row;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// RAM of every guest, MiB (firmware and video memory come on top).
const GUEST_MIB: u32 = 192;

/// Templates are the pages found in at least this many catalog guests.
const CATALOG_THRESHOLD: u32 = 2;

#[derive(Parser)]
#[command(
    version,
    about = "Live-migrate VMs through the two dedup proxies and see what crosses the link"
)]
struct Cli {
    /// Run with two real QEMUs and the proxy binary, through the project's harness
    /// (harness/setup.sh first), instead of in this process.
    #[arg(long)]
    qemu: bool,
    /// What the --qemu guest does while it migrates.
    #[arg(
        long,
        value_name = "WORKLOAD",
        value_parser = ["idle", "fill", "dup", "dirty"],
        default_value = "dup",
        requires = "qemu"
    )]
    workload: String,
    /// The --qemu guest's RAM, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, requires = "qemu")]
    mem: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.qemu {
        false => tokio::runtime::Runtime::new()
            .map_err(Error::from)
            .and_then(|rt| rt.block_on(in_process())),
        true => real_qemu::run(&cli.workload, cli.mem),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo with no arguments: guests, catalog and both ends in this process.
async fn in_process() -> Result<(), Error> {
    let started = Instant::now();
    outln!("migstream demo: VMs live-migrated through the two dedup ends over loopback TCP\n")?;
    let files = Arc::new(HostFiles::load());
    let (os, data) = (&files.os, &files.data);
    outln!(
        "shared software  {:.1} MiB OS image ({} files of {}), {:.1} MiB data files ({} files of {})",
        mib(os.len()),
        os.files.len(),
        os.origin,
        mib(data.len()),
        data.files.len(),
        data.origin
    )?;
    if out::closed() {
        return Ok(()); // nobody reads on (`demo | head`)
    }
    let guest = |name: &str, profile, seed| {
        Arc::new(Guest::new(name, profile, GUEST_MIB, seed, files.clone()))
    };
    let in_catalog = [
        guest("cat-1", &WEB, 11),
        guest("cat-2", &DB, 12),
        guest("cat-3", &WEB, 13),
        guest("cat-4", &DB, 14),
    ];
    let migrated = [guest("web-1", &WEB, 21), guest("db-1", &DB, 22)];

    let building = Instant::now();
    let dir = TempDir::new()?;
    let catalog = build_catalog(&in_catalog, &dir.0)?;
    drop(dir);
    outln!(
        "catalog          {} templates ({:.1} MiB) from {} guests of {GUEST_MIB} MiB, {}: the pages \
         found in at least {CATALOG_THRESHOLD} of them, built in {:.1} s",
        catalog.len(),
        mib(catalog.len() as u64 * guest::PAGE as u64),
        in_catalog.len(),
        names(&in_catalog),
        building.elapsed().as_secs_f64()
    )?;
    if out::closed() {
        return Ok(());
    }
    let templates = Templates::new(catalog).await?;
    let held: Vec<String> = templates
        .nodes
        .iter()
        .map(|n| n.len().to_string())
        .collect();
    outln!(
        "DHT ring         3 in-process nodes holding {} keys (each template on 2 nodes)",
        held.join(" + ")
    )?;
    outln!(
        "migrated         {}: {GUEST_MIB} MiB each + {:.0} MiB firmware and video memory, not in the catalog; \
         {} passes (the later ones resend what the guest dirtied meanwhile)\n",
        names(&migrated),
        mib(migrated[0].ram_bytes()) - f64::from(GUEST_MIB),
        guest::PASSES
    )?;

    let mut rows = Vec::new();
    for guest in &migrated {
        for mode in Mode::ALL {
            rows.push(migrate(guest, mode, &templates).await?);
            if out::closed() {
                return Ok(());
            }
        }
    }
    outln!()?;
    table::print(&rows)?;
    conclude(&rows, started)?;
    Ok(())
}

/// Writes each guest's migration stream to a file and counts their pages with
/// [`CatalogBuilder`], which keeps the pages found in [`CATALOG_THRESHOLD`] guests.
fn build_catalog(guests: &[Arc<Guest>], dir: &Path) -> Result<Catalog, Error> {
    use std::io::Write;
    let mut builder = CatalogBuilder::new(Threshold::Inputs(CATALOG_THRESHOLD));
    for guest in guests {
        let path = dir.join(format!("{}.mig", guest.name));
        let mut file = std::fs::File::create(&path)?;
        for chunk in QemuStream::new(guest) {
            file.write_all(&chunk)?;
        }
        builder.add(&path)?;
    }
    Ok(builder.build()?)
}

/// Migrates `guest` in `mode`, checks the delivery, and returns its table row.
async fn migrate(guest: &Arc<Guest>, mode: Mode, templates: &Templates) -> Result<Row, Error> {
    if mode == Mode::Dht {
        templates.dht.clear_cache(); // as on a destination host that fetched nothing yet
    }
    let fetched_before: u64 = templates.fetched().iter().sum();
    let (source, destination) = (mode.source(templates), mode.destination(templates));
    let run = link::migrate(guest.clone(), source, destination).await?;
    if run.received != run.sent {
        return Err(format!(
            "{} in mode {:?}: the destination QEMU received {} bytes (BLAKE3 {}), the source QEMU sent {} (BLAKE3 {})",
            guest.name, mode, run.received.bytes, run.received.hash, run.sent.bytes, run.sent.hash
        )
        .into());
    }
    if mode.uses_templates() && !(run.source.templates && run.destination.templates) {
        return Err(format!("{} in mode {mode:?}: templates were not used", guest.name).into());
    }
    if mode == Mode::ALL[0] {
        let (pages, zero_pages) = run.pages;
        outln!(
            "{} ({}): QEMU sends {:.1} MB, {pages} pages + {zero_pages} zero pages in {} passes, BLAKE3 {}",
            guest.name,
            guest.profile.kind,
            table::mb(run.sent.bytes),
            guest::PASSES,
            &run.sent.hash.to_hex()[..16],
        )?;
    }
    let fetched = templates.fetched().iter().sum::<u64>() - fetched_before;
    outln!(
        "  {:<28} delivered byte-exact (same BLAKE3) in {:.2} s{}",
        mode.label(),
        run.elapsed.as_secs_f64(),
        match mode {
            Mode::Dht => format!("; {fetched} templates fetched from the ring"),
            _ => String::new(),
        }
    )?;
    Ok(Row {
        guest: guest.name.clone(),
        mode: mode.label(),
        qemu_bytes: run.sent.bytes,
        wire_bytes: run.source.stats.wire_bytes,
        seconds: run.elapsed.as_secs_f64(),
        pages: table::pages(&run.source.stats),
    })
}

/// The one-line conclusion: per guest, the share of QEMU's bytes that crossed the
/// link with LZ4 alone and with every resolver and the DHT's templates.
fn conclude(rows: &[Row], started: Instant) -> std::io::Result<()> {
    let share = |guest: &str, mode: Mode| {
        let row = rows
            .iter()
            .find(|r| r.guest == guest && r.mode == mode.label());
        row.map_or(f64::NAN, |r| 100.0 * r.ratio())
    };
    let mut guests: Vec<&str> = rows.iter().map(|r| r.guest.as_str()).collect();
    guests.dedup();
    let each = |mode| {
        guests
            .iter()
            .map(|g| format!("{:.0} % ({g})", share(g, mode)))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    outln!(
        "\nAll {} migrations arrived byte-exact in {:.0} s. What crossed the link, of what QEMU sent: \
         {} with every resolver and templates from the DHT ring, against {} with LZ4 alone.",
        rows.len(),
        started.elapsed().as_secs_f64(),
        each(Mode::Dht),
        each(Mode::Lz4),
    )
}

/// "name (profile), ..." of `guests`.
fn names(guests: &[Arc<Guest>]) -> String {
    let names: Vec<String> = guests
        .iter()
        .map(|g| format!("{} ({})", g.name, g.profile.kind))
        .collect();
    names.join(", ")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// A scratch directory, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("migstream-demo-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
