//! `--qemu`: the same modes with two real QEMUs and the proxy binary, through the
//! project's harness. For each mode, `harness/lab.py migrate` boots a source and a
//! destination QEMU 10.0 (TCG), starts `proxy source` and `proxy destination`
//! between them, migrates a running guest, and checks that the guest's own
//! checksum of the data it holds is unchanged after the move.
//!
//! The proxies' link is mutually authenticated TLS, as in production: lab.py makes a
//! throwaway CA, the destination's certificate (`dest.test`, `127.0.0.1`) and the
//! source's client certificate (`source.test`) with `openssl` in each run's
//! directory and passes them as `--tls-cert/--tls-key/--tls-ca`, the destination
//! with `--tls-allow source.test`. The demo checks every report says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use migstream::dht::{self, Cluster, DEFAULT_REPLICAS, DhtOptions};
use migstream::resolve::tag;
use migstream::template::{Catalog, CatalogBuilder, Threshold};
use serde_json::Value;

use super::modes::Mode;
use super::out::{self, outln};
use super::table::{self, Row};
use super::{Error, TempDir};

/// The harness, the QEMU lab it set up, and the proxy binary.
struct Lab {
    repo: PathBuf,
    proxy: PathBuf,
}

/// The guest to migrate: a workload of `harness/guest-init.sh` and its RAM.
struct Guest {
    workload: String,
    mem: u32,
}

/// Runs every mode with a guest of `mem` MiB doing `workload` (the `--workload`
/// and `--mem` the demo was given, checked there).
pub(crate) fn run(workload: &str, mem: u32) -> Result<(), Error> {
    let guest = Guest {
        workload: workload.to_string(),
        mem,
    };
    let lab = Lab::find()?;
    let dir = TempDir::new()?;
    outln!(
        "migstream demo --qemu: a {} MiB `{}` guest live-migrated between two QEMU 10.0 \
         through {}, the proxies' link over mutual TLS (a throwaway CA per run: \
         destination dest.test, source source.test)\n",
        guest.mem,
        guest.workload,
        lab.proxy.display()
    )?;
    let catalog = lab.catalog(&dir.0)?;
    let ring = Ring::start(&dir.0, &catalog)?;
    let mut rows = Vec::new();
    for mode in Mode::ALL {
        let dht = ring.as_ref().map(|r| r.urls.as_str());
        if mode == Mode::Dht && dht.is_none() {
            outln!(
                "{:<28} not run: no redis-server (scripts/test.sh installs it)",
                mode.label()
            )?;
            continue;
        }
        rows.push(lab.migrate(&guest, mode, &catalog, dht, &dir.0)?);
        if out::closed() {
            return Ok(()); // nobody reads on (`demo --qemu | head`)
        }
    }
    outln!()?;
    table::print(&rows)?;
    outln!(
        "\nAll {} migrations completed through the proxies with the guest's data intact.",
        rows.len()
    )?;
    Ok(())
}

impl Lab {
    /// Checks everything the harness needs, with what to do when something is missing.
    fn find() -> Result<Self, Error> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let lab_py = repo.join("harness/lab.py");
        if !lab_py.is_file() {
            return Err(format!(
                "{} not found: run the demo from a clone of migstream",
                lab_py.display()
            )
            .into());
        }
        let help = Command::new("python3")
            .arg(&lab_py)
            .args(["migrate", "--help"])
            .output();
        let help = match help {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            _ => {
                return Err(
                    "`python3 harness/lab.py migrate` does not run: python3 missing, or a \
                     harness without the migrate command (harness/setup.sh installs python3)"
                        .into(),
                );
            }
        };
        // a harness older than the proxies' TLS would start them without credentials,
        // and they refuse to run so
        if !help.contains("--plaintext") {
            return Err(format!(
                "{} predates the proxies' mutual TLS: update the checkout",
                lab_py.display()
            )
            .into());
        }
        let lab = std::env::var_os("MIGSTREAM_LAB_DIR")
            .map_or(repo.join("target/qemu-lab"), PathBuf::from);
        for needed in [
            "qemu10/bin/qemu-system-x86_64",
            "kernel/vmlinuz",
            "guest/initramfs.cpio.gz",
        ] {
            if !lab.join(needed).exists() {
                return Err(format!(
                    "no QEMU lab ({} missing): run harness/setup.sh first (Debian 12, as root; it \
                     unpacks QEMU 7.2 and 10.0, a kernel and a busybox guest into target/qemu-lab)",
                    lab.join(needed).display()
                )
                .into());
            }
        }
        let proxy = std::env::current_exe()?.with_file_name("proxy");
        if !proxy.is_file() {
            return Err(format!(
                "{} missing: build it next to the demo with `cargo build --release --examples`",
                proxy.display()
            )
            .into());
        }
        Ok(Self { repo, proxy })
    }

    /// A catalog from two idle guests' migration streams (`lab.py capture-file`): the
    /// pages found in both, i.e. the kernel and firmware every guest shares.
    fn catalog(&self, dir: &Path) -> Result<PathBuf, Error> {
        let mut builder = CatalogBuilder::new(Threshold::Inputs(2));
        for input in ["idle-1", "idle-2"] {
            outln!("capturing the migration stream of idle guest {input} for the catalog ...")?;
            let stream = dir.join(format!("{input}.mig"));
            let args = [
                "capture-file",
                "-o",
                path(&stream)?,
                "--qemu",
                "10",
                "-w",
                "idle",
            ];
            self.lab_py(&args, &dir.join(format!("{input}.log")))?;
            builder.add(&stream)?;
        }
        let catalog = builder.build()?;
        let path = dir.join("templates.cat");
        catalog.save(&path)?;
        outln!(
            "catalog: {} templates found in both idle guests\n",
            catalog.len()
        )?;
        Ok(path)
    }

    /// One migration through the proxies in `mode`; its row from lab.py's report.
    fn migrate(
        &self,
        guest: &Guest,
        mode: Mode,
        catalog: &Path,
        dht: Option<&str>,
        dir: &Path,
    ) -> Result<Row, Error> {
        outln!("{:<28} migrating through the proxies ...", mode.label())?;
        let report = dir.join(format!("{mode:?}.json"));
        let mem = guest.mem.to_string();
        let proxy = path(&self.proxy)?;
        let mut args = vec![
            "migrate",
            "--proxy",
            proxy,
            "--qemu",
            "10",
            "-w",
            &guest.workload,
            "-m",
            &mem,
        ];
        args.extend(["-o", path(&report)?]);
        let catalog = format!("--catalog {}", shell_quote(path(catalog)?));
        let resolvers = match mode {
            Mode::Lz4 => Some("--resolvers none"),
            Mode::Fill => Some("--resolvers fill"),
            Mode::Seen => Some("--resolvers fill,xbzrle,seen"),
            _ => None,
        };
        args.extend(
            resolvers
                .map(|r| ["--src-proxy-arg", r])
                .into_iter()
                .flatten(),
        );
        let dht = format!("--dht {}", dht.unwrap_or_default());
        match mode {
            Mode::Catalog => {
                args.extend(["--src-proxy-arg", &catalog, "--dst-proxy-arg", &catalog])
            }
            Mode::Dht => args.extend(["--src-proxy-arg", &catalog, "--dst-proxy-arg", &dht]),
            _ => {}
        }
        self.lab_py(&args, &dir.join(format!("{mode:?}.log")))?;
        let r: Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        let number = |v: &Value| v.as_u64().unwrap_or(0);
        let (ready, check) = (&r["ready_sum"], &r["check_sum"]);
        if r["ok"] != true || ready != check {
            return Err(
                format!("{}: lab.py's checks failed: {}", mode.label(), r["checks"]).into(),
            );
        }
        if r["link"] != "mutual TLS" {
            return Err(format!(
                "{}: the link was {}, not mutual TLS",
                mode.label(),
                r["link"]
            )
            .into());
        }
        let total_ms = number(&r["migration"]["total-time"]);
        outln!(
            "{:<28} guest data checksum {} before and after; QEMU: total {:.1} s, downtime {} ms; \
             link: mutual TLS",
            "",
            ready.as_str().unwrap_or("?"),
            total_ms as f64 / 1e3,
            number(&r["migration"]["downtime"]),
        )?;
        Ok(Row {
            guest: guest.workload.clone(),
            mode: mode.label(),
            qemu_bytes: number(&r["qemu_bytes"]),
            wire_bytes: number(&r["wire_bytes"]),
            seconds: total_ms as f64 / 1e3,
            pages: tag::NAMED.map(|(kind, _)| number(&r["pages"][kind])),
        })
    }

    /// Runs `python3 harness/lab.py ARGS` with its output in `log`; on failure, the
    /// error carries the log's last lines.
    fn lab_py(&self, args: &[&str], log: &Path) -> Result<(), Error> {
        let out = std::fs::File::create(log)?;
        let status = Command::new("python3")
            .arg(self.repo.join("harness/lab.py"))
            .args(args)
            .current_dir(&self.repo)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(format!("lab.py {} failed ({status}):\n{}", args[0], tail.join("\n")).into())
    }
}

/// Three local Redis servers holding the catalog: the DHT ring `proxy destination
/// --dht` fetches templates from. Stopped (by their process handles) when dropped.
struct Ring {
    servers: Vec<Child>,
    /// `redis://127.0.0.1:PORT,...`, as `--dht` takes them.
    urls: String,
}

impl Ring {
    /// Starts the servers and pushes `catalog` to them; `None` without `redis-server`.
    fn start(dir: &Path, catalog: &Path) -> Result<Option<Self>, Error> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        if !found.is_ok_and(|s| s.success()) {
            return Ok(None);
        }
        let mut ring = Ring {
            servers: Vec::new(),
            urls: String::new(),
        };
        let mut urls = Vec::new();
        for n in 1..=3 {
            // a port the kernel just handed out is free, short of a race with another program
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let data = dir.join(format!("redis-{n}"));
            std::fs::create_dir_all(&data)?;
            let server = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&data)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?;
            ring.servers.push(server);
            wait_listening(port)?;
            urls.push(format!("redis://127.0.0.1:{port}"));
        }
        let catalog = Catalog::load(catalog)?;
        let cluster = Arc::new(Cluster::redis(
            &urls,
            DEFAULT_REPLICAS,
            DhtOptions::default(),
        )?);
        let runtime = tokio::runtime::Runtime::new()?;
        let pushed = runtime.block_on(dht::push(&cluster, &catalog))?;
        let held: Vec<String> = pushed.per_node.iter().map(|(_, n)| n.to_string()).collect();
        outln!(
            "DHT ring: 3 redis-servers holding {} templates\n",
            held.join(" + ")
        )?;
        ring.urls = urls.join(",");
        Ok(Some(ring))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// Waits up to 10 s for a server to accept connections on `port`.
fn wait_listening(port: u16) -> Result<(), Error> {
    for _ in 0..1000 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(format!("redis-server on port {port} did not start").into())
}

fn path(p: &Path) -> Result<&str, Error> {
    p.to_str()
        .ok_or_else(|| format!("{}: not UTF-8", p.display()).into())
}

/// `s` as one word for lab.py, which splits proxy arguments like a shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
