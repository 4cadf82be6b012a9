//! End to end with real QEMU: a running guest migrates from a source QEMU through the
//! source proxy and the destination proxy (`examples/proxy.rs`) into a destination
//! QEMU, driven by `harness/lab.py migrate`. A case passes only if the migration
//! completes, the destination runs, the guest's own checksum of the data it holds is
//! unchanged, and both proxies report success (lab.py checks all of it and writes a
//! JSON report, which the tests read for the figures they assert on).
//!
//! Every case runs the proxies' link over mutual TLS: lab.py makes a throwaway CA, a
//! destination certificate (`dest.test`, `127.0.0.1`) and a source client certificate
//! (`source.test`) with `openssl` in each run's directory and starts the destination
//! with `--tls-allow source.test`; `migrate` checks the report says so.
//!
//! The tests are `#[ignore]`d, so plain `cargo test` lists them as ignored. They need
//! `harness/setup.sh` to have run and `MIGSTREAM_PROXY` to name the proxy binary
//! (`cargo build --release --example proxy` → `target/release/examples/proxy`);
//! `scripts/test.sh` runs them with `--include-ignored`, where a missing binary is a
//! failure. The guests are TCG VMs on a small box: one case runs at a time (a mutex),
//! every port is picked by the kernel, every run has its own directory, and every
//! wait, here and in lab.py, is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

mod redis_server;

/// One QEMU pair at a time: TCG guests load both cores, and the fault tests depend on
/// a migration being under way when the fault comes.
static SERIAL: Mutex<()> = Mutex::new(());

/// Upper bound of one lab.py run (its own limits are shorter: boot 120 s, migration
/// 300 s); past it the run is stopped with SIGTERM, then SIGKILL.
const RUN_LIMIT: Duration = Duration::from_secs(900);

const MIB: u64 = 1 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the reports, logs and the template test's streams go.
fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-qemu");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

fn proxy() -> PathBuf {
    let path = std::env::var_os("MIGSTREAM_PROXY")
        .map(PathBuf::from)
        .expect(
            "MIGSTREAM_PROXY must name the proxy binary: cargo build --release --example proxy, \
         then MIGSTREAM_PROXY=target/release/examples/proxy (scripts/test.sh does both)",
        );
    assert!(
        path.is_file(),
        "MIGSTREAM_PROXY={}: no such file (cargo build --release --example proxy)",
        path.display()
    );
    path
}

/// Runs `python3 harness/lab.py ARGS`, its output into `log`, for at most RUN_LIMIT.
fn run_lab(args: &[&str], log: &Path) -> ExitStatus {
    let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err = out.try_clone().unwrap();
    let mut child = Command::new("python3")
        .arg(repo().join("harness/lab.py"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("python3 harness/lab.py: cannot start");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > RUN_LIMIT {
            // SIGTERM first: lab.py then stops its QEMUs and proxies
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let term = Instant::now();
            while term.elapsed() < Duration::from_secs(60) {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "lab.py {args:?} still running after {RUN_LIMIT:?}; log: {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `lab.py migrate` with the proxy and `args`; returns its report. A failed run is a
/// test failure showing the failed checks and the end of lab.py's log.
fn migrate(name: &str, args: &[&str]) -> Value {
    let proxy = proxy();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = out_dir();
    let (report, log) = (
        dir.join(format!("{name}.json")),
        dir.join(format!("{name}.log")),
    );
    let _ = std::fs::remove_file(&report);
    let mut all = vec![
        "migrate",
        "--proxy",
        proxy.to_str().unwrap(),
        "-o",
        report.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let started = Instant::now();
    let status = run_lab(&all, &log);
    let json: Option<Value> = std::fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let failed: Vec<String> = json
        .as_ref()
        .and_then(|j| j["checks"].as_object())
        .map(|c| {
            c.iter()
                .filter(|(_, v)| *v != &Value::Bool(true))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        status.success(),
        "{name}: lab.py migrate {args:?} failed ({status}); failed checks {failed:?}; \
         report {}; log {}:\n{}",
        report.display(),
        log.display(),
        tail(&log, 25)
    );
    let json = json.unwrap_or_else(|| panic!("{name}: no report at {}", report.display()));
    assert_eq!(json["ok"], Value::Bool(true), "{name}: report not ok");
    if !args.contains(&"--plaintext") {
        assert_eq!(json["link"], "mutual TLS", "{name}: link");
        for end in ["src_proxy_argv", "dst_proxy_argv"] {
            let argv = json[end].as_array().expect("proxy argv in the report");
            assert!(
                argv.iter().any(|a| a == "--tls-ca"),
                "{name}: {end} {argv:?}"
            );
        }
    }
    assert!(failed.is_empty(), "{name}: failed checks {failed:?}");
    let (qemu, wire) = (bytes(&json, "qemu_bytes"), bytes(&json, "wire_bytes"));
    assert!(qemu > 0 && wire > 0, "{name}: no traffic reported");
    eprintln!(
        "{name}: ok in {:.1} s ({}): qemu {qemu} bytes, wire {wire} bytes, ratio {:.3}, pages {}, \
         migration {} ms, xbzrle pages {}",
        started.elapsed().as_secs_f64(),
        json["link"],
        wire as f64 / qemu as f64,
        json["pages"],
        json["migration"]["total-time"],
        json["migration"]["xbzrle-cache"]["pages"]
    );
    json
}

fn bytes(json: &Value, key: &str) -> u64 {
    json[key]
        .as_u64()
        .unwrap_or_else(|| panic!("report: {key} missing or not a number: {}", json[key]))
}

fn pages(json: &Value, kind: &str) -> u64 {
    json["pages"][kind].as_u64().unwrap_or(0)
}

fn xbzrle_pages(json: &Value) -> u64 {
    json["migration"]["xbzrle-cache"]["pages"]
        .as_u64()
        .unwrap_or(0)
}

/// A QEMU 10.0 → 10.0 case, `pc` machine, 128 MiB.
fn qemu10(name: &str, workload: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--qemu", "10", "-w", workload];
    args.extend_from_slice(extra);
    migrate(name, &args)
}

const XBZRLE: &[&str] = &["--cap", "xbzrle=on"];
/// A dirtying guest behind 16 MiB/s: precopy needs several passes, so re-dirtied
/// pages are sent again (as QEMU's XBZRLE records with the capability). Without
/// auto-converge, whether it ever ends depended on the guest's dirty rate against
/// the link under the machine's load (one CI run: still 4-9 MiB to go after 300 s);
/// QEMU then throttles the guest until it does.
const SLOW: &[&str] = &[
    "--bandwidth",
    "16777216",
    "--min-dirty-syncs",
    "3",
    "--cap",
    "auto-converge=on",
];

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_idle() {
    let r = qemu10("qemu10-idle", "idle", &[]);
    assert!(bytes(&r, "wire_bytes") < bytes(&r, "qemu_bytes"));
}

/// The source proxy compresses with migstream's own LZ4 encoder (acceleration 4);
/// the destination decodes its blocks with lz4_flex, as any LZ4 frame.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_idle_lz4_accelerated() {
    let r = qemu10(
        "qemu10-idle-lz4a4",
        "idle",
        &["--src-proxy-arg", "--lz4-acceleration 4"],
    );
    assert!(
        2 * bytes(&r, "wire_bytes") < bytes(&r, "qemu_bytes"),
        "ratio above 0.5"
    );
}

/// Unix sockets on both QEMU sides (`--qemu-unix`): the source QEMU migrates to
/// `unix:RUNDIR/src.sock`, where `proxy source --listen unix:...` takes it; the
/// destination QEMU waits at `-incoming unix:RUNDIR/dst.sock` for `proxy destination
/// --to unix:...`. The source checks the destination's certificate for its DNS name
/// (`--tls-server-name dest.test`) rather than for the address it dials.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_over_unix_sockets() {
    let r = qemu10(
        "qemu10-idle-unix",
        "idle",
        &[
            "--qemu-unix",
            "--src-proxy-arg",
            "--tls-server-name dest.test",
        ],
    );
    assert_eq!(r["qemu_side"], "unix");
    assert!(r["qemu_uri"].as_str().unwrap().starts_with("unix:"));
    let after = |argv: &str, opt: &str| -> String {
        let argv = r[argv].as_array().unwrap();
        let at = argv.iter().position(|a| a == opt).unwrap();
        argv[at + 1].as_str().unwrap().to_string()
    };
    assert!(after("src_proxy_argv", "--listen").starts_with("unix:"));
    assert!(after("dst_proxy_argv", "--to").starts_with("unix:"));
    assert!(bytes(&r, "wire_bytes") < bytes(&r, "qemu_bytes"));
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_idle_xbzrle() {
    qemu10("qemu10-idle-xbzrle", "idle", XBZRLE);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_fill() {
    let r = qemu10("qemu10-fill", "fill", &[]);
    // 64 MiB of random data cross as raw pages
    assert!(pages(&r, "raw") * 4096 >= 60 * MIB, "pages {}", r["pages"]);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_fill_xbzrle() {
    qemu10("qemu10-fill-xbzrle", "fill", XBZRLE);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_dup() {
    let r = qemu10("qemu10-dup", "dup", &[]);
    // 64 MiB of copies of one 1 MiB seed: the copies go as seen-before references
    assert!(pages(&r, "seen") * 4096 >= 48 * MIB, "pages {}", r["pages"]);
    assert!(bytes(&r, "wire_bytes") * 2 < bytes(&r, "qemu_bytes"));
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_dup_xbzrle() {
    qemu10("qemu10-dup-xbzrle", "dup", XBZRLE);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_dirty() {
    let r = qemu10(
        "qemu10-dirty",
        "dirty",
        &[SLOW, &["--min-proxy-pages", "xbzrle=1"]].concat(),
    );
    // without QEMU's xbzrle, re-sent pages become the proxy's own XBZRLE deltas
    assert!(pages(&r, "xbzrle") > 0, "pages {}", r["pages"]);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_dirty_xbzrle() {
    let r = qemu10(
        "qemu10-dirty-xbzrle",
        "dirty",
        &[SLOW, XBZRLE, &["--min-xbzrle-pages", "1"]].concat(),
    );
    assert!(xbzrle_pages(&r) > 0, "no XBZRLE pages: {}", r["migration"]);
}

/// QEMU 7.2 on both ends, a dirtying guest with xbzrle. `--ram-tail-kib 8`: 7.2 under
/// TCG loses guest writes during precopy when guest RAM is a multiple of 256 KiB
/// (harness/README.md).
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu72_dirty_xbzrle() {
    let r = migrate(
        "qemu7.2-dirty-xbzrle",
        &[
            &["--qemu", "7.2", "-w", "dirty", "--ram-tail-kib", "8"],
            SLOW,
            XBZRLE,
            &["--min-xbzrle-pages", "1"],
        ]
        .concat(),
    );
    assert!(xbzrle_pages(&r) > 0, "no XBZRLE pages: {}", r["migration"]);
}

/// A 7.2 source into a 10.0 destination, with 7.2's machine type on both.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu72_to_qemu10_machine_72() {
    qemu72_to_qemu10("qemu7.2to10-pc-i440fx-7.2-fill", &[]);
}

/// Migrates a `fill` guest (`--ram-tail-kib 8`: see `qemu72_dirty_xbzrle`) from
/// QEMU 7.2 to 10.0 with 7.2's machine type on both, with lab.py's `extra`
/// arguments, and checks that both ran as asked.
fn qemu72_to_qemu10(name: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--src-qemu",
        "7.2",
        "--dst-qemu",
        "10",
        "--machine",
        "pc-i440fx-7.2",
        "-w",
        "fill",
        "--ram-tail-kib",
        "8",
    ];
    args.extend_from_slice(extra);
    let r = migrate(name, &args);
    assert_eq!(r["machine_type"], "pc-i440fx-7.2", "{name}");
    assert!(
        r["dst_qemu_version"].as_str().unwrap().starts_with("10."),
        "{name}"
    );
    r
}

/// The stream of an idle guest, made once per test process with `lab.py
/// capture-file` into `catalog-input-NAME.mig`: the template tests' inputs.
fn captured_idle(name: &str) -> PathBuf {
    static STREAMS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut made = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = out_dir();
    let input = format!("catalog-input-{name}");
    let (stream, log) = (
        dir.join(format!("{input}.mig")),
        dir.join(format!("{input}.log")),
    );
    if made.contains(&input) {
        return stream;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let status = run_lab(
        &[
            "capture-file",
            "-o",
            stream.to_str().unwrap(),
            "--qemu",
            "10",
            "-w",
            "idle",
        ],
        &log,
    );
    assert!(
        status.success(),
        "capture-file {input} failed; log {}:\n{}",
        log.display(),
        tail(&log, 20)
    );
    made.push(input);
    stream
}

/// A template catalog built from two other guests' streams (made here once with
/// `lab.py capture-file`), shared by the catalog tests.
fn captured_catalog() -> &'static Path {
    use migstream::template::{CatalogBuilder, Threshold};
    static CATALOG: OnceLock<PathBuf> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let catalog = out_dir().join("templates.tmdm");
        let mut builder = CatalogBuilder::new(Threshold::Inputs(2));
        for input in ["a", "b"] {
            builder.add(captured_idle(input)).unwrap();
        }
        let built = builder.build().unwrap();
        assert!(!built.is_empty(), "no page shared by the two guests");
        built.save(&catalog).unwrap();
        eprintln!("catalog: {} templates", built.len());
        catalog
    })
}

/// Both proxies load the template catalog; the migrating guest's pages found in it
/// travel as catalog references.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_template_catalog() {
    let arg = format!("--catalog {}", captured_catalog().display());
    let r = qemu10("qemu10-idle-catalog", "idle", &template_args(&arg, &arg));
    assert!(pages(&r, "template") > 0, "pages {}", r["pages"]);
}

/// The destination proxy restores the templates from a ring of three real Redis
/// servers the catalog was pushed to (two copies of each), instead of the file.
#[test]
#[ignore = "needs QEMU (harness/setup.sh), redis-server and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_templates_from_a_redis_ring() {
    let (_servers, src, dst) = ring_of_the_catalog("qemu10_templates_from_a_redis_ring", "ring");
    let r = qemu10("qemu10-idle-dht", "idle", &template_args(&src, &dst));
    assert!(pages(&r, "template") > 0, "pages {}", r["pages"]);
}

/// lab.py arguments that give the source and destination proxies these options and
/// fail the migration unless some page travels as a template reference.
fn template_args<'a>(src: &'a str, dst: &'a str) -> [&'a str; 6] {
    [
        "--src-proxy-arg",
        src,
        "--dst-proxy-arg",
        dst,
        "--min-proxy-pages",
        "template=1",
    ]
}

/// Three real Redis servers (in `out_dir()/dir`) holding the captured catalog, two
/// copies of each template, for `test`: the servers (stopped when dropped), and the
/// source and destination proxy options that use them.
fn ring_of_the_catalog(test: &str, dir: &str) -> (Vec<redis_server::RedisServer>, String, String) {
    use migstream::dht::{Cluster, DhtOptions, push};
    use migstream::template::Catalog;
    use redis_server::RedisServer;

    let catalog = captured_catalog();
    assert!(
        redis_server::available(test),
        "redis-server is required (harness/setup.sh installs it)"
    );
    let servers = RedisServer::start_many(&out_dir().join(dir), 3);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = Arc::new(Cluster::redis(&urls, 2, DhtOptions::default()).unwrap());
    let pushed = runtime.block_on(push(&cluster, &Catalog::load(catalog).unwrap()));
    pushed.expect("catalog push to the ring");
    let src = format!("--catalog {}", catalog.display());
    let dst = format!("--dht {}", urls.join(","));
    (servers, src, dst)
}

/// A `fill` guest with 16 MiB of random data: its stream (about 70 MB, throttled
/// to 32 MiB/s for the faulty attempt) lasts long enough for the fault to come
/// while the source QEMU is still sending (see `--fault` in lab.py).
const FAULTY: &[&str] = &["--data-mb", "16"];

/// The destination proxy dies mid-migration: the source QEMU reports the migration
/// failed and its VM keeps running; a new destination QEMU and proxy then receive it.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn kill_destination_proxy_then_retry() {
    let r = qemu10(
        "qemu10-fill-kill-dst-proxy",
        "fill",
        &[FAULTY, &["--fault", "kill-dst-proxy"]].concat(),
    );
    let first = &r["attempts"][0];
    assert_eq!(first["migration"]["status"], "failed");
    assert_eq!(first["checks"]["src_running"], true);
    assert_eq!(r["migration"]["status"], "completed");
}

/// One byte of the dedup stream flipped between the proxies, 1 MiB in: the migration
/// fails, the destination does not run the guest, the source VM keeps running; the
/// retry without corruption succeeds.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn corrupt_byte_between_proxies_then_retry() {
    let r = qemu10(
        "qemu10-fill-corrupt",
        "fill",
        &[FAULTY, &["--fault", "corrupt"]].concat(),
    );
    let first = &r["attempts"][0];
    assert_eq!(first["migration"]["status"], "failed");
    assert_eq!(first["checks"]["dst_guest_not_running"], true);
    assert_eq!(first["checks"]["src_running"], true);
    assert_eq!(first["proxies"]["dst"]["ok"], false);
    assert_eq!(r["migration"]["status"], "completed");
}

/// Every raw page of the QEMU stream file at `path`, in stream order, each address
/// once (its first time): (RAM block, offset in it) and the page's fingerprint.
fn raw_pages(path: &Path) -> Vec<((bytes::Bytes, u64), migstream::page::Fingerprint)> {
    use std::collections::HashSet;
    use std::io::Read;

    use bytes::BytesMut;
    use migstream::page::Fingerprint;
    use migstream::qemu::{QemuDecoder, RamRecord, Record};

    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut decoder, mut buf) = (QemuDecoder::new(), BytesMut::new());
    let (mut pages, mut seen, mut at_end) = (Vec::new(), HashSet::new(), false);
    loop {
        let record = match at_end {
            true => decoder.decode_eof(&mut buf),
            false => decoder.decode(&mut buf),
        };
        match record.unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            Some(Record::Ram(RamRecord::Page { addr, data })) => {
                let at = (addr.block, addr.offset);
                if seen.insert(at.clone()) {
                    pages.push((at, Fingerprint::of(&data)));
                }
            }
            Some(_) => {}
            None if at_end => return pages,
            None => {
                let start = buf.len();
                buf.resize(start + (1 << 20), 0);
                let n = file.read(&mut buf[start..]).unwrap();
                buf.truncate(start + n);
                at_end = n == 0;
            }
        }
    }
}

/// A template of `catalog` that an idle guest sends for sure, and early: the first
/// page in stream order that three idle guests (the catalog's two inputs and a
/// third) all send at the same address with the same bytes, and that is no fill
/// page (the fill resolver would take it before the templates). In practice one of
/// the firmware's pages, which every boot puts in the same place.
fn template_every_idle_guest_sends(catalog: &migstream::template::Catalog) -> u32 {
    use std::collections::HashMap;

    let streams: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| raw_pages(&captured_idle(name)))
        .collect();
    let others: Vec<HashMap<_, _>> = streams[1..]
        .iter()
        .map(|pages| pages.iter().cloned().collect())
        .collect();
    let (at, (addr, fp)) = streams[0]
        .iter()
        .enumerate()
        .find(|(_, (addr, fp))| {
            let page = catalog.find(fp).and_then(|n| catalog.get(n));
            page.is_some_and(|p| p.iter().any(|&b| b != p[0]))
                && others.iter().all(|m| m.get(addr) == Some(fp))
        })
        .expect("no template that all three idle guests send at the same address");
    eprintln!(
        "template {fp}: page {at} of {} in the stream, {} +{:#x}",
        streams[0].len(),
        String::from_utf8_lossy(&addr.0),
        addr.1
    );
    catalog.find(fp).unwrap()
}

/// The template store fails a migration: one template the guest sends is damaged on
/// both of its owners in the Redis ring (R = 2), so the destination proxy cannot
/// restore it from either (every fetched page is checked against its fingerprint).
/// The first migration fails cleanly: the source VM runs on with its data, the source
/// proxy reports `ok: false`, the destination proxy names the page and starts its
/// template cool-down. QEMU's retry, through the same two proxies (no restart) into
/// a new destination QEMU at the same address, goes through without templates.
#[test]
#[ignore = "needs QEMU (harness/setup.sh), redis-server and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_retry_without_templates_after_a_template_store_failure() {
    use migstream::dht::layout::template_key;
    use migstream::dht::{Cluster, DhtOptions, push};
    use migstream::template::Catalog;
    use redis_server::RedisServer;

    assert!(
        redis_server::available("qemu10_retry_without_templates_after_a_template_store_failure"),
        "redis-server is required (harness/setup.sh installs it)"
    );
    let path = captured_catalog();
    let catalog = Catalog::load(path).unwrap();
    let n = template_every_idle_guest_sends(&catalog);
    let fp = catalog.fingerprint(n).unwrap();
    let servers = RedisServer::start_many(&out_dir().join("ring-damaged"), 3);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = Arc::new(Cluster::redis(&urls, 2, DhtOptions::default()).unwrap());
    runtime
        .block_on(push(&cluster, &catalog))
        .expect("catalog push to the ring");
    // the same bytes but one: the owners hold a page that is not the template
    let mut wrong = catalog.get(n).unwrap().to_vec();
    wrong[100] ^= 0x5a;
    let key = template_key(&fp);
    let owners = cluster.owners(&fp);
    assert_eq!(owners.len(), 2, "owners of {fp}: {owners:?}");
    for (i, node) in cluster.nodes().iter().enumerate() {
        let keys = [key.clone()];
        let held = runtime.block_on(node.get_many(&keys)).unwrap();
        if owners.contains(&i) {
            assert_eq!(held[0].as_deref(), catalog.get(n), "{} before", node.name());
            let entry = [(key.clone(), bytes::Bytes::from(wrong.clone()))];
            runtime.block_on(node.set_many(&entry)).unwrap();
            let held = runtime.block_on(node.get_many(&keys)).unwrap();
            assert_eq!(
                held[0].as_deref(),
                Some(&wrong[..]),
                "{} after",
                node.name()
            );
        } else {
            assert_eq!(held[0], None, "{} holds {fp} but is no owner", node.name());
        }
    }
    let (src, dst) = (
        format!("--catalog {}", path.display()),
        format!("--dht {}", urls.join(",")),
    );
    let r = qemu10(
        "qemu10-idle-dht-damaged-template",
        "idle",
        &[
            "--src-proxy-arg",
            &src,
            "--dst-proxy-arg",
            &dst,
            "--fault",
            "template-store",
        ],
    );
    let first = &r["attempts"][0];
    assert_eq!(first["migration"]["status"], "failed");
    assert_eq!(first["checks"]["src_running"], true);
    assert_eq!(first["checks"]["src_sum_intact"], true);
    assert_eq!(first["checks"]["dst_proxy_cooldown_logged"], true);
    assert_eq!(first["proxies"]["src"]["ok"], false);
    assert_eq!(first["proxies"]["dst"]["ok"], false);
    let error = first["proxies"]["dst"]["error"].as_str().unwrap();
    assert!(
        error.contains(&fp.to_string()),
        "destination error: {error}"
    );
    assert_eq!(r["migration"]["status"], "completed");
    assert_eq!(r["proxies"]["src"]["templates"], false);
    assert_eq!(r["proxies"]["dst"]["templates"], false);
    assert_eq!(pages(&r, "template"), 0, "pages {}", r["pages"]);
    assert_eq!(r["checks"]["sum_matches"], true);
}

// ------------------------------------------------------------------------ multifd
//
// QEMU's multifd migrations through the proxies: the main channel and every multifd
// channel are QEMU connections of their own, each carried on a link connection of
// its own (over mutual TLS, as above), grouped per migration at both proxies. Besides
// lab.py's checks (the guest's checksum, both proxies ok, and `proxy_channels_*`:
// both proxies report the channels asked for, ids 0.., each with bytes, agreeing
// channel by channel), every case checks the channels in the report itself
// (`multifd_channels`).

/// Multifd with `n` channels (QEMU's own default for the rest).
fn multifd(n: u32) -> Vec<String> {
    ["--cap", "multifd=on", "--param"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("multifd-channels={n}")])
        .collect()
}

/// The channel reports of a multifd migration's source proxy (JSON `channels`), with
/// what holds for any multifd migration: `n` channels, ids 0..n, at both proxies;
/// each carried QEMU bytes and link bytes; together no more than the totals (which
/// add the main channel), and exactly the bytes QEMU says it sent on its multifd
/// channels (query-migrate's `ram.multifd-bytes`; QEMU 7.2 leaves each channel's
/// 64-byte greeting, `MultiFDInit_t`, out of it, 10.0 counts it). Returns the pages
/// the channels carried, by kind, summed.
fn multifd_channels(name: &str, r: &Value, n: usize) -> std::collections::BTreeMap<String, u64> {
    let channels = r["channels"].as_array().expect("report: channels");
    let ids: Vec<u64> = channels
        .iter()
        .map(|c| c["channel"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (0..n as u64).collect::<Vec<_>>(),
        "{name}: channel ids"
    );
    let dst = r["proxies"]["dst"]["channels"]
        .as_array()
        .expect("dst channels");
    assert_eq!(
        dst.len(),
        n,
        "{name}: channels the destination proxy reports"
    );
    for check in [
        "proxy_channels_as_asked",
        "proxy_channels_carried_bytes",
        "proxy_channels_within_totals",
        "proxies_agree_channels",
    ] {
        assert_eq!(r["checks"][check], true, "{name}: check {check}");
    }
    let (mut qemu, mut wire) = (0, 0);
    let mut pages = std::collections::BTreeMap::<String, u64>::new();
    for c in channels {
        let (q, w) = (bytes(c, "qemu_bytes"), bytes(c, "wire_bytes"));
        assert!(q > 0 && w > 0, "{name}: channel {c}");
        (qemu, wire) = (qemu + q, wire + w);
        for (kind, count) in c["pages"].as_object().expect("channel pages") {
            *pages.entry(kind.clone()).or_default() += count.as_u64().unwrap();
        }
    }
    assert!(
        qemu <= bytes(r, "qemu_bytes") && wire <= bytes(r, "wire_bytes"),
        "{name}: channels {qemu}/{wire} bytes, totals {}/{}",
        r["qemu_bytes"],
        r["wire_bytes"]
    );
    for (kind, count) in &pages {
        assert!(*count <= self::pages(r, kind), "{name}: {kind} pages");
    }
    let greetings = match r["qemu_version"].as_str().unwrap().starts_with("7.2.") {
        true => 64 * n as u64,
        false => 0,
    };
    assert_eq!(
        Some(qemu),
        r["migration"]["ram-multifd-bytes"]
            .as_u64()
            .map(|sent| sent + greetings),
        "{name}: the channels' QEMU bytes against QEMU's ram.multifd-bytes (+ {greetings})"
    );
    eprintln!(
        "{name}: {n} channels: qemu {qemu} bytes, wire {wire} bytes, pages {pages:?}; \
         main channel qemu {} bytes",
        bytes(r, "qemu_bytes") - qemu
    );
    pages
}

/// A QEMU 10.0 multifd case: `q35`, 4 channels, zero pages found by QEMU's multifd
/// threads (`zero`: `multifd`, the default) or by its migration thread and sent on
/// the main channel (`legacy`). Returns the report and the channels' pages.
fn qemu10_multifd(
    name: &str,
    workload: &str,
    zero: &str,
    extra: &[&str],
) -> (Value, std::collections::BTreeMap<String, u64>) {
    let (channels, zero_param) = (multifd(4), format!("zero-page-detection={zero}"));
    let mut args: Vec<&str> = vec!["--machine", "q35", "--param", &zero_param];
    args.extend(channels.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let r = qemu10(name, workload, &args);
    assert_eq!(r["machine_type"], "pc-q35-10.0", "{name}: machine");
    let effective = &r["effective_params"]["src"];
    assert_eq!(
        effective["zero-page-detection"], zero,
        "{name}: {effective}"
    );
    assert_eq!(effective["multifd-channels"], 4, "{name}: {effective}");
    let pages = multifd_channels(name, &r, 4);
    (r, pages)
}

fn kind(pages: &std::collections::BTreeMap<String, u64>, kind: &str) -> u64 {
    pages.get(kind).copied().unwrap_or(0)
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_idle() {
    let (_, pages) = qemu10_multifd("qemu10-multifd-idle", "idle", "multifd", &[]);
    assert!(kind(&pages, "raw") > 0, "pages {pages:?}");
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_idle_legacy_zero_pages() {
    let (_, pages) = qemu10_multifd("qemu10-multifd-idle-legacy", "idle", "legacy", &[]);
    assert!(kind(&pages, "raw") > 0, "pages {pages:?}");
}

/// 64 MiB of random data cross as raw pages, every one on a multifd channel.
fn assert_fill(name: &str, pages: &std::collections::BTreeMap<String, u64>) {
    assert!(kind(pages, "raw") * 4096 >= 60 * MIB, "{name}: {pages:?}");
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_fill() {
    let (_, pages) = qemu10_multifd("qemu10-multifd-fill", "fill", "multifd", &[]);
    assert_fill("qemu10-multifd-fill", &pages);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_fill_legacy_zero_pages() {
    let name = "qemu10-multifd-fill-legacy";
    let (_, pages) = qemu10_multifd(name, "fill", "legacy", &[]);
    assert_fill(name, &pages);
}

/// 64 MiB of copies of one 1 MiB seed: a channel refers only to pages it carried
/// itself (only templates cross channels), so each channel sends the seed's pages
/// once and its later copies as seen-before references.
fn assert_dup(name: &str, r: &Value, pages: &std::collections::BTreeMap<String, u64>) {
    assert!(kind(pages, "seen") * 4096 >= 48 * MIB, "{name}: {pages:?}");
    assert!(
        bytes(r, "wire_bytes") * 2 < bytes(r, "qemu_bytes"),
        "{name}"
    );
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_dup() {
    let name = "qemu10-multifd-dup";
    let (r, pages) = qemu10_multifd(name, "dup", "multifd", &[]);
    assert_dup(name, &r, &pages);
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_dup_legacy_zero_pages() {
    let name = "qemu10-multifd-dup-legacy";
    let (r, pages) = qemu10_multifd(name, "dup", "legacy", &[]);
    assert_dup(name, &r, &pages);
}

/// A dirtying guest behind 16 MiB/s (`SLOW`): pages re-sent on the same channel
/// become the proxy's own XBZRLE deltas against the version that channel carried.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_dirty() {
    let name = "qemu10-multifd-dirty";
    let (_, pages) = qemu10_multifd(name, "dirty", "multifd", SLOW);
    assert!(kind(&pages, "xbzrle") > 0, "{name}: {pages:?}");
}

#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_dirty_legacy_zero_pages() {
    let name = "qemu10-multifd-dirty-legacy";
    let (_, pages) = qemu10_multifd(name, "dirty", "legacy", SLOW);
    assert!(kind(&pages, "xbzrle") > 0, "{name}: {pages:?}");
}

/// The template catalog of `qemu10_template_catalog` with 4 multifd channels: the
/// templates are the one thing every channel shares, and they are found on them.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_template_catalog() {
    let name = "qemu10-multifd-idle-catalog";
    let arg = format!("--catalog {}", captured_catalog().display());
    let (r, pages) = qemu10_multifd(name, "idle", "multifd", &template_args(&arg, &arg));
    assert_eq!(r["proxies"]["src"]["templates"], true, "{name}");
    assert!(kind(&pages, "template") > 0, "{name}: {pages:?}");
}

/// The same with the destination's templates in a ring of three real Redis servers
/// (two copies of each): every channel's destination end looks them up there.
#[test]
#[ignore = "needs QEMU (harness/setup.sh), redis-server and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_templates_from_a_redis_ring() {
    let name = "qemu10-multifd-idle-dht";
    let (_servers, src, dst) =
        ring_of_the_catalog("qemu10_multifd_templates_from_a_redis_ring", "ring-multifd");
    let (r, pages) = qemu10_multifd(name, "idle", "multifd", &template_args(&src, &dst));
    assert_eq!(r["proxies"]["dst"]["templates"], true, "{name}");
    assert!(kind(&pages, "template") > 0, "{name}: {pages:?}");
}

/// QEMU 7.2 on both ends, 2 multifd channels, a `fill` guest (`--ram-tail-kib 8`:
/// see `qemu72_dirty_xbzrle`). 7.2 has no zero-page-detection parameter: its multifd
/// channels carry every page.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu72_multifd_fill() {
    let name = "qemu7.2-multifd-fill";
    let channels = multifd(2);
    let mut args = vec!["--qemu", "7.2", "-w", "fill", "--ram-tail-kib", "8"];
    args.extend(channels.iter().map(String::as_str));
    let r = migrate(name, &args);
    assert!(r["qemu_version"].as_str().unwrap().starts_with("7.2."));
    let pages = multifd_channels(name, &r, 2);
    assert_fill(name, &pages);
}

/// A 7.2 source into a 10.0 destination with 7.2's machine type, 2 multifd channels:
/// QEMU 10 takes 7.2's multifd packets for that machine type.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu72_to_qemu10_multifd_machine_72() {
    let name = "qemu7.2to10-multifd-pc-i440fx-7.2-fill";
    let channels = multifd(2);
    let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
    let r = qemu72_to_qemu10(name, &channels);
    let pages = multifd_channels(name, &r, 2);
    assert_fill(name, &pages);
}

/// QEMU compresses its multifd pages itself (`multifd-compression=zstd`): the
/// channels' packets cross unchanged, counted as opaque bytes, not deduplicated.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn qemu10_multifd_zstd() {
    let name = "qemu10-multifd-zstd-idle";
    let (r, pages) = qemu10_multifd(
        name,
        "idle",
        "multifd",
        &["--param", "multifd-compression=zstd"],
    );
    assert_eq!(r["effective_params"]["src"]["multifd-compression"], "zstd");
    let opaque = bytes(&r, "opaque_bytes");
    assert!(
        0 < opaque && opaque <= bytes(&r, "qemu_bytes"),
        "{name}: opaque bytes {opaque}"
    );
    for c in r["channels"].as_array().unwrap() {
        assert!(bytes(c, "opaque_bytes") > 0, "{name}: channel {c}");
    }
    // no page the proxies could see into
    assert!(pages.values().all(|&n| n == 0), "{name}: {pages:?}");
}

/// The destination proxy dies mid-migration while 4 multifd channels run: every
/// channel of the migration fails with it, the source QEMU reports the migration
/// failed and its VM keeps running with its data; a new destination QEMU and proxy
/// then receive it over all its channels.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn multifd_kill_destination_proxy_then_retry() {
    let name = "qemu10-multifd-fill-kill-dst-proxy";
    let (r, _) = qemu10_multifd(
        name,
        "fill",
        "multifd",
        &[FAULTY, &["--fault", "kill-dst-proxy"]].concat(),
    );
    let first = &r["attempts"][0];
    assert_eq!(first["checks"]["fault_injected"], true);
    assert_eq!(first["migration"]["status"], "failed");
    assert_eq!(first["checks"]["src_running"], true);
    assert_eq!(first["checks"]["src_sum_intact"], true);
    assert_eq!(first["proxies"]["src"]["ok"], false);
    assert_eq!(r["migration"]["status"], "completed");
}

/// One byte flipped on a multifd channel's link connection, 1 MiB into it
/// (`--fault-connection 1`: the proxies open the main channel's link connection
/// first, then one per channel). The link runs over mutual TLS, as in
/// `corrupt_byte_between_proxies_then_retry`, so the destination's TLS layer refuses
/// the record (`cannot decrypt peer's message`; over `--plaintext` it would be the
/// dedup stream's digest). The whole migration fails, the destination does not run
/// the guest, the source VM keeps running; the retry, untouched, succeeds.
#[test]
#[ignore = "needs QEMU (harness/setup.sh) and MIGSTREAM_PROXY: scripts/test.sh runs it"]
fn multifd_corrupt_byte_on_a_channel_then_retry() {
    let name = "qemu10-multifd-fill-corrupt-channel";
    let (r, _) = qemu10_multifd(
        name,
        "fill",
        "multifd",
        &[FAULTY, &["--fault", "corrupt", "--fault-connection", "1"]].concat(),
    );
    let first = &r["attempts"][0];
    assert_eq!(first["checks"]["fault_injected"], true);
    assert_eq!(r["relay"]["corrupted"]["connection"], 1, "{}", r["relay"]);
    assert_eq!(first["migration"]["status"], "failed");
    assert_eq!(first["checks"]["dst_guest_not_running"], true);
    assert_eq!(first["checks"]["src_running"], true);
    assert_eq!(first["checks"]["src_sum_intact"], true);
    assert_eq!(first["proxies"]["src"]["ok"], false);
    assert_eq!(first["proxies"]["dst"]["ok"], false);
    let error = first["proxies"]["dst"]["error"].as_str().unwrap();
    assert!(
        error.contains("decrypt"),
        "{name}: destination error: {error}"
    );
    assert_eq!(r["checks"]["relay_retry_clean"], true);
    assert_eq!(r["migration"]["status"], "completed");
}
