//! TMDHT: decoding a template-heavy dedup stream through a ring of 4 local
//! `redis-server` processes (R = 2) against the local catalog, template lookups per
//! second, the ring's balance and Redis memory per template.
//!
//! The stream is synthetic unless `MIGSTREAM_BENCH_STREAM` and
//! `MIGSTREAM_BENCH_CATALOG` name a QEMU stream and a catalog file (e.g. the
//! held-out capture and catalog of `docs/benchmarks.md`); then the bench also
//! checks that the stream decodes byte-identical with one of the four nodes killed.
//!
//! - `decode/local`: `DedupDecoder::with_templates`, the catalog in memory.
//! - `decode/ring-warm`: a new migration on a store whose LRU cache already holds
//!   every template (the steady state of a destination serving many migrations).
//! - `decode/ring-cold`: the cache is emptied before each iteration (untimed), so
//!   every template is fetched from Redis, verified, cached and restored; the
//!   frames before the one that waits for templates are restored while they are
//!   fetched (the decoder prepares one frame ahead), as `relay::decode_stream`
//!   does.
//! - `decode/ring-cold-sequential`: the same, each fetch awaited before decoding on.
//! - `lookups/ring`: `Cluster::fetch` of 4096 templates (batched per node,
//!   pipelined, every page verified), counted per template.
//! - `cpu:` (after criterion's figures): CPU time, not wall time, per page of the
//!   local decode and of the cold decode, and per template of a cold fetch in this
//!   process and in the Redis servers: what the machine's load changes least, and
//!   what bounds the cold path on a machine whose cores also run the servers.
//!
//! The ring is decoded as the destination proxy (`examples/proxy.rs`) does it: in
//! a task of a multi-thread tokio runtime with a worker per core, so that the
//! fetch's requests, replies and page checks run on another worker while the
//! decoder restores the frame before. `MIGSTREAM_BENCH_DHT_THREADS=N` sets the
//! workers; `0` is one current-thread runtime, where decode and fetch share one
//! core (this bench's default until the DHT cold-path work). The Redis servers run
//! where the scheduler puts them. If `redis-server` is not installed, the bench
//! says so and runs nothing.
//!
//! ```text
//! cargo bench --bench dht -- --noplot
//! MIGSTREAM_BENCH_DHT_THREADS=0 cargo bench --bench dht -- --noplot    # current-thread
//! MIGSTREAM_BENCH_STREAM=target/ratio/heldout-idle.mig \
//! MIGSTREAM_BENCH_CATALOG=target/ratio/catalog.cat cargo bench --bench dht -- --noplot
//! ```

#[path = "../tests/redis_server/mod.rs"]
mod redis_server;
#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput};
use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
use migstream::dht::{Cluster, DhtOptions, DhtTemplates, push};
use migstream::page::Fingerprint;
use migstream::qemu::{QemuDecoder, QemuEncoder};
use migstream::resolve::{TemplateStore, tag};
use migstream::template::{Catalog, TemplateIndex};
use redis_server::RedisServer;
use support::synthetic::Layout;

const PAGE: usize = 4096;
/// Templates of the synthetic catalog (32 MiB).
const TEMPLATES: usize = 8192;
/// Pages nothing claims, one after every 8 templates.
const RAW_EVERY: usize = 8;

/// A QEMU stream (the tests' synthetic layout, one `pc.ram` block) of the templates
/// in a scrambled order, a raw page after every [`RAW_EVERY`]: 89 % template pages.
fn synthetic() -> (Catalog, Bytes) {
    let templates = support::random_pages(TEMPLATES, PAGE, 0x7e3a);
    let raw = support::random_pages(TEMPLATES / RAW_EVERY, PAGE, 0x9a11);
    let catalog = Catalog::from_pages(PAGE, &templates).expect("catalog");
    let mut order: Vec<&Vec<u8>> = Vec::new();
    for i in 0..TEMPLATES {
        // a stride co-prime with the count: every template once, not in catalog order
        order.push(&templates[(i * 4099) % TEMPLATES]);
        if i % RAW_EVERY == RAW_EVERY - 1 {
            order.push(&raw[i / RAW_EVERY]);
        }
    }
    let mut layout = Layout::new([("pc.ram", (order.len() * PAGE) as u64)]);
    let mut records = layout.setup();
    records.push(Layout::part());
    for (i, page) in order.iter().enumerate() {
        records.push(layout.page_copied(0, (i * PAGE) as u64, page));
    }
    records.extend(Layout::end_of_payload());
    records.extend(Layout::device_tail(
        Bytes::from_static(&[0; 16]),
        Bytes::from_static(br#"{"devices": []}"#),
    ));
    let mut enc = QemuEncoder::new();
    let mut out = BytesMut::new();
    records
        .iter()
        .for_each(|r| enc.encode(r, &mut out).expect("encodable"));
    (catalog, out.freeze())
}

/// The dedup stream of `qemu` with templates of `catalog`.
fn encode(catalog: &Catalog, qemu: &[u8]) -> (Bytes, u64) {
    let mut enc = DedupEncoder::with_templates(Arc::new(TemplateIndex::new(catalog)));
    let (mut input, mut wire) = (BytesMut::from(qemu), BytesMut::new());
    let mut dec = QemuDecoder::new();
    while let Some(record) = dec.decode_eof(&mut input).expect("valid QEMU stream") {
        enc.encode(&record, &mut wire).expect("encodable");
    }
    enc.finish(&mut wire).expect("end");
    let templates = enc.stats().pages(tag::TEMPLATE);
    (wire.freeze(), templates)
}

/// Decodes `wire` through `store` (a new migration), handing the QEMU bytes to
/// `out`. Whenever the decoder waits for pages, they are fetched; with `overlap`
/// the decoder restores the frames before the one that waits meanwhile, as
/// `relay::decode_stream` does, else the fetch is awaited first.
async fn decode_ring(
    store: &DhtTemplates,
    wire: &Bytes,
    overlap: bool,
    mut out: impl FnMut(Bytes),
) -> migstream::Result<()> {
    let (templates, fetch) = store.open();
    let mut fetch = fetch.expect("a fetcher");
    let mut dec = DedupDecoder::with_template_resolver(templates, store.catalog_id())
        .expect("a template store");
    let mut buf = BytesMut::from(&wire[..]);
    loop {
        match dec.decode_eof(&mut buf)? {
            Decoded::Qemu(bytes) => out(bytes),
            Decoded::Fetch if overlap => {
                let restore = async {
                    tokio::task::yield_now().await;
                    while !dec.is_waiting() {
                        let Decoded::Qemu(bytes) = dec.decode(&mut buf)? else {
                            break;
                        };
                        out(bytes);
                    }
                    Ok::<_, migstream::Error>(())
                };
                let (fetched, restored) = tokio::join!(fetch.fetch(), restore);
                restored?;
                fetched?;
            }
            Decoded::Fetch => fetch.fetch().await?,
            _ => return Ok(()),
        }
    }
}

/// The QEMU bytes `decode_ring` gives, counted, decoding in a task of `runtime` as
/// the destination proxy does.
fn decode_ring_len(
    runtime: &tokio::runtime::Runtime,
    store: &DhtTemplates,
    wire: &Bytes,
    overlap: bool,
) -> usize {
    let (store, wire) = (store.clone(), wire.clone());
    let decode = runtime.spawn(async move {
        let mut n = 0;
        decode_ring(&store, &wire, overlap, |bytes| n += black_box(bytes).len())
            .await
            .expect("decodes");
        n
    });
    runtime.block_on(decode).expect("the decode task")
}

/// The QEMU bytes `decode_ring` gives, for the byte-identical check.
async fn decode_ring_bytes(store: &DhtTemplates, wire: &Bytes) -> migstream::Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_ring(store, wire, true, |bytes| out.extend_from_slice(&bytes)).await?;
    Ok(out)
}

fn decode_local(catalog: &Arc<Catalog>, wire: &Bytes) -> usize {
    let mut dec = DedupDecoder::with_templates(catalog.clone());
    let (mut buf, mut n) = (BytesMut::from(&wire[..]), 0);
    while let Decoded::Qemu(bytes) = dec.decode_eof(&mut buf).expect("decodes") {
        n += black_box(bytes).len();
    }
    n
}

/// CPU seconds (user and system, every thread) that process `pid`, or this one,
/// has used: from `/proc`, in clock ticks of 1/100 s (Linux's `USER_HZ`); `None`
/// without `/proc`.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    let stat = std::fs::read_to_string(path).ok()?;
    // the fields after the command name: state is the first, utime the 12th
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// The CPU time every restored template costs, whatever the load: the local decode
/// per page of the stream, and a cold fetch (`Cluster::fetch` of the whole
/// catalog) per template, in this process and in the Redis servers. Decoding cold
/// costs the sum; on a machine of C cores shared with the servers it cannot run
/// faster than the sum over C, nor than the local decode alone.
fn cpu_budget(
    runtime: &tokio::runtime::Runtime,
    servers: &[RedisServer],
    store: &DhtTemplates,
    catalog: &Arc<Catalog>,
    wire: &Bytes,
) {
    const ROUNDS: usize = 20;
    let servers_cpu = || -> Option<f64> { servers.iter().map(|s| cpu_seconds(s.pid())).sum() };
    let Some(start) = cpu_seconds(None) else {
        println!("cpu: no /proc, not measured");
        return;
    };
    let pages = (0..ROUNDS)
        .map(|_| decode_local(catalog, wire))
        .sum::<usize>()
        / PAGE;
    let local = cpu_seconds(None).expect("/proc") - start;
    let fps = catalog.fingerprints();
    let (client, server) = (cpu_seconds(None).expect("/proc"), servers_cpu());
    for _ in 0..ROUNDS {
        let pages = runtime
            .block_on(store.cluster().fetch(fps, catalog.page_size()))
            .expect("fetched");
        assert_eq!(pages.len(), fps.len());
    }
    let client = cpu_seconds(None).expect("/proc") - client;
    let server = server.zip(servers_cpu()).map(|(a, b)| b - a);
    let cold = cpu_seconds(None).expect("/proc");
    for _ in 0..ROUNDS {
        store.clear_cache();
        decode_ring_len(runtime, store, wire, true);
    }
    let cold = cpu_seconds(None).expect("/proc") - cold;
    let per = |seconds: f64, n: usize| seconds * 1e6 / n as f64;
    let fetched = ROUNDS * fps.len();
    println!(
        "cpu: local decode {:.2} us per page, cold decode {:.2} us per page here; cold fetch {:.2} us per template here + {} in the Redis servers",
        per(local, pages),
        per(cold, pages),
        per(client, fetched),
        server.map_or("?".to_string(), |s| format!("{:.2} us", per(s, fetched)))
    );
}

/// A tuning knob from the environment.
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    if !redis_server::available("bench dht") {
        println!("dht bench: redis-server not installed, skipped");
        return;
    }
    let (catalog, qemu, real) = match (
        std::env::var("MIGSTREAM_BENCH_STREAM"),
        std::env::var("MIGSTREAM_BENCH_CATALOG"),
    ) {
        (Ok(stream), Ok(catalog)) => {
            let qemu = Bytes::from(std::fs::read(&stream).expect("the stream"));
            let catalog = Catalog::load(&catalog).expect("the catalog");
            (catalog, qemu, true)
        }
        _ => {
            let (catalog, qemu) = synthetic();
            (catalog, qemu, false)
        }
    };
    let catalog = Arc::new(catalog);
    let (wire, template_pages) = encode(&catalog, &qemu);
    println!(
        "stream: {} QEMU bytes, {} template pages ({:.0} %), {} templates in the catalog, {} dedup bytes",
        qemu.len(),
        template_pages,
        100.0 * template_pages as f64 * PAGE as f64 / qemu.len() as f64,
        catalog.len(),
        wire.len()
    );

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dht-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let mut servers = RedisServer::start_many(&dir, 4);
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let threads = env_usize("MIGSTREAM_BENCH_DHT_THREADS");
    let runtime = match threads {
        Some(0) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(threads) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
        // as the destination proxy: a worker per core
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .expect("runtime");
    let mut options = DhtOptions::default();
    options.cache_pages = catalog.len().max(1);
    options.batch = env_usize("MIGSTREAM_BENCH_DHT_BATCH").unwrap_or(options.batch);
    options.in_flight = env_usize("MIGSTREAM_BENCH_DHT_IN_FLIGHT").unwrap_or(options.in_flight);
    println!(
        "options: {} keys per request, {} requests in flight, {}",
        options.batch,
        options.in_flight,
        match threads {
            Some(0) => "a current-thread runtime".to_string(),
            _ => format!("{} tokio workers", runtime.metrics().num_workers()),
        }
    );
    let cluster = Arc::new(Cluster::redis(&urls, 2, options.clone()).expect("cluster"));

    // push: balance and Redis memory per template
    let before: Vec<u64> = servers.iter().map(RedisServer::used_memory).collect();
    let report = runtime.block_on(push(&cluster, &catalog)).expect("pushed");
    let after: Vec<u64> = servers.iter().map(RedisServer::used_memory).collect();
    let counts: Vec<usize> = report.per_node.iter().map(|n| n.1).collect();
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    let max = *counts.iter().max().expect("nodes") as f64;
    println!(
        "push: {} templates x 2 replicas in {:.3} s; per node {counts:?}; balance max/mean {:.3}",
        report.templates,
        report.elapsed.as_secs_f64(),
        max / mean
    );
    for (i, n) in counts.iter().enumerate() {
        let delta = after[i].saturating_sub(before[i]);
        println!(
            "  node {i}: used_memory +{delta} bytes for {n} templates = {:.0} bytes per template ({:.0} over the page)",
            delta as f64 / *n as f64,
            delta as f64 / *n as f64 - PAGE as f64
        );
    }

    let store = runtime
        .block_on(DhtTemplates::from_cluster(
            cluster.clone(),
            Some(catalog.id()),
            options,
        ))
        .expect("store");
    let out = runtime
        .block_on(decode_ring_bytes(&store, &wire))
        .expect("decoded");
    assert!(out == qemu[..], "the ring's output differs");

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    {
        let mut g = c.benchmark_group("dht/decode");
        g.throughput(Throughput::Bytes(qemu.len() as u64));
        g.bench_function("local", |b| {
            b.iter(|| assert_eq!(decode_local(&catalog, &wire), qemu.len()))
        });
        g.bench_function("ring-warm", |b| {
            b.iter(|| {
                let n = decode_ring_len(&runtime, &store, &wire, true);
                assert_eq!(n, qemu.len())
            })
        });
        for (name, overlap) in [("ring-cold", true), ("ring-cold-sequential", false)] {
            g.bench_function(name, |b| {
                b.iter_batched(
                    || store.clear_cache(),
                    |()| {
                        let n = decode_ring_len(&runtime, &store, &wire, overlap);
                        assert_eq!(n, qemu.len())
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }
    {
        let fps: Vec<Fingerprint> = catalog.fingerprints().iter().take(4096).copied().collect();
        let mut g = c.benchmark_group("dht/lookups");
        g.throughput(Throughput::Elements(fps.len() as u64));
        g.bench_function("ring", |b| {
            b.iter(|| {
                let pages = runtime
                    .block_on(cluster.fetch(&fps, catalog.page_size()))
                    .expect("fetched");
                assert_eq!(pages.len(), fps.len());
            })
        });
        g.finish();
    }
    c.final_summary();
    cpu_budget(&runtime, &servers, &store, &catalog, &wire);

    // one of four nodes killed: the stream still decodes byte-identical
    servers[1].kill();
    store.clear_cache();
    let started = Instant::now();
    let out = runtime
        .block_on(decode_ring_bytes(&store, &wire))
        .expect("decoded with a node down");
    assert!(out == qemu[..], "output differs with a node down");
    println!(
        "{} stream decoded byte-identical through the ring with node 1 of 4 killed, cold cache, in {:.3} s",
        if real { "the given" } else { "the synthetic" },
        started.elapsed().as_secs_f64()
    );
}
