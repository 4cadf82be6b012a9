//! TMDHT: template pages served by a ring of store nodes. In-process nodes test the
//! store's logic; real `redis-server` processes (started here on loopback ports)
//! test what the ring is for: byte-identical decoding with a node killed mid-way,
//! a clean failure naming the page when every replica is gone, timeouts, and a
//! restarted node used again.
//!
//! Also: nodes that disagree on the current catalog, and the ways a destination
//! reaches its nodes, with a password or an ACL user, over TLS with a private CA
//! and client certificates, never showing a password.
//!
//! Without redis-server installed the Redis tests skip loudly; with
//! `MIGSTREAM_REQUIRE_REDIS=1` (scripts/test.sh) they fail instead.

mod redis_server;
mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
use migstream::dht::{
    Cluster, DhtOptions, DhtTemplates, MemoryNode, Node, RedisTls, Timeouts, layout, push, verify,
};
use migstream::page::Fingerprint;
use migstream::qemu::{RamRecord, Record};
use migstream::resolve::{Fetch, TemplateStore};
use migstream::template::{Catalog, CatalogId, TemplateIndex};
use migstream::{Error, ErrorKind};
use redis_server::{RedisServer, TlsFiles};

const PAGE: usize = 4096;

/// A QEMU stream whose RAM is `templates` (each once, then the first half again)
/// and `others` (not templates), then EOF and a JSON device description; and the
/// length of the stream up to and including EOF.
fn qemu_stream(templates: &[Vec<u8>], others: &[Vec<u8>]) -> (Vec<u8>, usize) {
    let again = &templates[..templates.len() / 2];
    let all: Vec<&Vec<u8>> = templates.iter().chain(others).chain(again).collect();
    let mut records = vec![
        Record::Header,
        Record::SectionStart(support::section(1, "ram", 0, 4)),
        support::mem_size(&[("pc.ram", (all.len() * PAGE) as u64)]),
    ];
    for (i, page) in all.iter().enumerate() {
        records.push(Record::Ram(RamRecord::Page {
            addr: support::page_addr("pc.ram", i as u64, i > 0),
            data: Bytes::from((*page).clone()),
        }));
    }
    records.push(Record::Ram(RamRecord::Eos));
    records.push(Record::Eof);
    let eof_end = support::encode(&records).len();
    records.push(Record::VmDescription(Bytes::from_static(
        br#"{"page_size": 4096, "devices": [{"name": "held back until END"}]}"#,
    )));
    (support::encode(&records), eof_end)
}

/// The dedup stream of `qemu` with templates of `catalog`, in small frames so that
/// a decode takes many fetches.
fn encode(catalog: &Catalog, qemu: &[u8]) -> Vec<u8> {
    let index = Arc::new(TemplateIndex::new(catalog));
    let mut enc = DedupEncoder::with_templates(index).with_batch_size(256);
    let mut wire = BytesMut::new();
    for r in support::decode(qemu, 1 << 20) {
        enc.encode(&r, &mut wire).unwrap();
    }
    enc.finish(&mut wire).unwrap();
    wire.to_vec()
}

/// What a test decodes: a catalog, the QEMU stream, its dedup stream.
struct Fixture {
    catalog: Arc<Catalog>,
    templates: Vec<Vec<u8>>,
    qemu: Vec<u8>,
    eof_end: usize,
    wire: Vec<u8>,
}

fn fixture(templates: usize) -> Fixture {
    let tpl = support::random_pages(templates, PAGE, 0x5eed);
    let others = support::random_pages(64, PAGE, 0xfeed);
    let catalog = Arc::new(Catalog::from_pages(PAGE, &tpl).unwrap());
    let (qemu, eof_end) = qemu_stream(&tpl, &others);
    let wire = encode(&catalog, &qemu);
    Fixture {
        catalog,
        templates: tpl,
        qemu,
        eof_end,
        wire,
    }
}

/// Decodes `wire` through `store` as a destination proxy would: decode; when the
/// decoder waits, fetch, calling `before_fetch` with the number of fetches so far.
/// Returns the QEMU bytes released, the error if any, and the number of fetches.
async fn decode_through(
    store: &DhtTemplates,
    wire: &[u8],
    mut before_fetch: impl FnMut(usize),
) -> (Vec<u8>, Option<Error>, usize) {
    let (templates, fetch) = store.open();
    let mut fetch: Box<dyn Fetch> = fetch.expect("a fetcher");
    let mut dec = DedupDecoder::with_template_resolver(templates, store.catalog_id()).unwrap();
    let (mut buf, mut out, mut fetches) = (BytesMut::from(wire), Vec::new(), 0);
    loop {
        match dec.decode_eof(&mut buf) {
            Ok(Decoded::Qemu(bytes)) => out.extend_from_slice(&bytes),
            Ok(Decoded::Fetch) => {
                before_fetch(fetches);
                fetches += 1;
                if let Err(e) = fetch.fetch().await {
                    return (out, Some(e), fetches);
                }
            }
            Ok(_) => return (out, None, fetches),
            Err(e) => return (out, Some(e), fetches),
        }
    }
}

fn memory_cluster(n: usize, replicas: usize) -> (Arc<Cluster>, Vec<Arc<MemoryNode>>) {
    let nodes: Vec<Arc<MemoryNode>> = (0..n)
        .map(|i| Arc::new(MemoryNode::new(format!("mem{i}"))))
        .collect();
    let dyn_nodes = nodes.iter().map(|n| n.clone() as Arc<dyn Node>).collect();
    let cluster = Cluster::new(dyn_nodes, replicas, DhtOptions::default()).unwrap();
    (Arc::new(cluster), nodes)
}

fn unresolved_fingerprint(err: &Error) -> Fingerprint {
    match err {
        Error::Unresolved {
            resolver: "dht",
            fingerprint,
            ..
        } => *fingerprint,
        other => panic!("expected the dht resolver's Unresolved error, got {other}"),
    }
}

// ---- in-process nodes ----------------------------------------------------------

#[tokio::test]
async fn memory_ring_decodes_byte_identical_and_caches_hot_templates() {
    let f = fixture(600);
    let (cluster, nodes) = memory_cluster(4, 2);
    let report = push(&cluster, &f.catalog).await.unwrap();
    assert_eq!(report.templates, 600);
    assert_eq!(report.per_node.iter().map(|n| n.1).sum::<usize>(), 1200);
    // each node: its templates, the manifest and the current pointer
    for (node, (_, held)) in nodes.iter().zip(&report.per_node) {
        assert_eq!(node.len(), held + 2);
    }
    let store = DhtTemplates::from_cluster(cluster.clone(), None, DhtOptions::default())
        .await
        .unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let (out, err, fetches) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none(), "{err:?}");
    assert!(out == f.qemu);
    assert!(fetches > 3, "{fetches} fetches");
    // every template was asked for once, from its first owner
    let gets: u64 = nodes.iter().map(|n| n.gets()).sum();
    assert_eq!(gets, 600 + 4 + 1); // + every node's current pointer, and the manifest
    assert_eq!(store.cached(), 600);
    // a second migration is served from the cache alone
    let (out, err, fetches) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    assert_eq!(fetches, 0);
    assert_eq!(nodes.iter().map(|n| n.gets()).sum::<u64>(), gets);
}

#[tokio::test]
async fn memory_ring_small_cache_still_restores_every_frame() {
    let f = fixture(600);
    let (cluster, _) = memory_cluster(3, 2);
    push(&cluster, &f.catalog).await.unwrap();
    let mut options = DhtOptions::default();
    options.cache_pages = 7;
    let store = DhtTemplates::from_cluster(cluster, Some(f.catalog.id()), options)
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    assert!(store.cached() <= 7);
}

#[tokio::test]
async fn memory_ring_wrong_page_or_down_node_falls_over_to_the_replica() {
    let f = fixture(300);
    let (cluster, nodes) = memory_cluster(4, 2);
    push(&cluster, &f.catalog).await.unwrap();
    // the first owner of every template answers with a wrong page for it
    let wrong = Bytes::from(vec![0x5a; PAGE]);
    for fp in f.catalog.fingerprints() {
        let first = cluster.ring().owners(fp)[0];
        let entry = [(layout::template_key(fp), wrong.clone())];
        nodes[first].set_many(&entry).await.unwrap();
    }
    let store = DhtTemplates::from_cluster(cluster.clone(), None, DhtOptions::default())
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    let report = verify(&cluster, &f.catalog).await.unwrap();
    assert_eq!(report.missing(), 300);
    assert_eq!(report.nodes.iter().map(|n| n.wrong).sum::<usize>(), 300);
    assert_eq!(report.lost, 0);
    assert!(!report.ok());

    // repaired by pushing again; then one node down loses nothing
    push(&cluster, &f.catalog).await.unwrap();
    assert!(verify(&cluster, &f.catalog).await.unwrap().ok());
    nodes[2].set_down(true);
    store.clear_cache();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
}

#[tokio::test]
async fn memory_ring_every_replica_gone_fails_before_the_end_of_the_stream() {
    let f = fixture(300);
    let (cluster, nodes) = memory_cluster(4, 2);
    push(&cluster, &f.catalog).await.unwrap();
    // the template of the last page before the second pass loses both copies
    let gone = Fingerprint::of(&f.templates[299]);
    let key = [layout::template_key(&gone)];
    for i in cluster.ring().owners(&gone) {
        nodes[i].delete_many(&key).await.unwrap();
    }
    let store = DhtTemplates::from_cluster(cluster, None, DhtOptions::default())
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    let err = err.expect("an error");
    assert_eq!(err.kind(), ErrorKind::Unresolved);
    assert_eq!(unresolved_fingerprint(&err), gone);
    assert!(err.to_string().contains(&gone.to_string()), "{err}");
    assert!(f.qemu.starts_with(&out) && out.len() <= f.eof_end);
    assert!(
        out.len() > 100 * PAGE,
        "only {} bytes before the failure",
        out.len()
    );
}

#[tokio::test]
async fn a_manifest_that_does_not_hash_to_its_id_is_refused() {
    let f = fixture(50);
    let (cluster, nodes) = memory_cluster(2, 1);
    push(&cluster, &f.catalog).await.unwrap();
    let key = layout::manifest_key(&f.catalog.id());
    let good = nodes[0].get_many(std::slice::from_ref(&key)).await.unwrap()[0]
        .clone()
        .unwrap();
    let mut bad = good.to_vec();
    *bad.last_mut().unwrap() ^= 1;
    for node in &nodes {
        node.set_many(&[(key.clone(), Bytes::from(bad.clone()))])
            .await
            .unwrap();
    }
    let err = DhtTemplates::from_cluster(cluster.clone(), None, DhtOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("valid manifest"), "{err}");
    // one good copy anywhere is enough
    nodes[1].set_many(&[(key, good)]).await.unwrap();
    let store = DhtTemplates::from_cluster(cluster, None, DhtOptions::default())
        .await
        .unwrap();
    assert_eq!(store.manifest().fingerprints(), f.catalog.fingerprints());
}

/// Log lines written on this thread while the guard lives.
fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(logs.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

fn logged(logs: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&logs.lock().unwrap()).into_owned()
}

/// Sets node `node`'s current-catalog pointer to `id`.
async fn point(node: &dyn Node, id: &CatalogId) {
    let entry = [(layout::CURRENT_KEY.to_vec(), Bytes::copy_from_slice(&id.0))];
    node.set_many(&entry).await.unwrap();
}

/// A catalog other than the fixture's, pushed before it: its manifest stays on
/// every node.
fn older_catalog() -> Arc<Catalog> {
    let pages = support::random_pages(40, PAGE, 0x01d);
    Arc::new(Catalog::from_pages(PAGE, &pages).unwrap())
}

#[tokio::test]
async fn memory_ring_nodes_disagreeing_on_the_current_catalog_start_on_the_majoritys() {
    let f = fixture(300);
    let old = older_catalog();
    let (cluster, nodes) = memory_cluster(3, 2);
    push(&cluster, &old).await.unwrap();
    push(&cluster, &f.catalog).await.unwrap();
    // the first node (the one a destination used to ask alone) names the old one,
    // whose manifest is still there and checks out
    point(nodes[0].as_ref(), &old.id()).await;
    let (logs, _guard) = capture_logs();
    let store = DhtTemplates::from_cluster(cluster.clone(), None, DhtOptions::default())
        .await
        .unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    let log = logged(&logs);
    assert!(log.contains("WARN"), "{log}");
    assert!(log.contains("different current catalogs"), "{log}");
    assert!(log.contains(&format!("mem0 = {}", old.id())), "{log}");
    assert!(
        log.contains("named by 2 of 3 answering nodes (a majority)"),
        "{log}"
    );

    // pinned, either catalog is served whatever the pointers say
    let pinned = DhtTemplates::from_cluster(cluster.clone(), Some(old.id()), DhtOptions::default())
        .await
        .unwrap();
    assert_eq!(pinned.catalog_id(), old.id());
    assert_eq!(pinned.manifest().fingerprints(), old.fingerprints());

    // most nodes name a catalog that has no manifest anywhere: the next is used
    let bogus = CatalogId([0x77; 32]);
    point(nodes[0].as_ref(), &bogus).await;
    point(nodes[1].as_ref(), &bogus).await;
    let store = DhtTemplates::from_cluster(cluster.clone(), None, DhtOptions::default())
        .await
        .unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let log = logged(&logs);
    assert!(
        log.contains(&format!("no valid manifest of {bogus}")),
        "{log}"
    );
    let pinned =
        DhtTemplates::from_cluster(cluster.clone(), Some(f.catalog.id()), DhtOptions::default())
            .await
            .unwrap();
    assert_eq!(pinned.catalog_id(), f.catalog.id());

    // a node that is down has no say; nor does one without a pointer
    nodes[0].set_down(true);
    nodes[1]
        .delete_many(&[layout::CURRENT_KEY.to_vec()])
        .await
        .unwrap();
    let store = DhtTemplates::from_cluster(cluster.clone(), None, DhtOptions::default())
        .await
        .unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());

    // only catalogs without a manifest named: refused, naming the last one tried
    point(nodes[2].as_ref(), &bogus).await;
    let err = DhtTemplates::from_cluster(cluster, None, DhtOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(
        err.to_string()
            .contains(&format!("valid manifest of catalog {bogus}")),
        "{err}"
    );
}

#[tokio::test]
async fn a_frame_needing_more_templates_than_allowed_is_refused() {
    let f = fixture(300);
    let (cluster, _) = memory_cluster(2, 1);
    push(&cluster, &f.catalog).await.unwrap();
    let mut options = DhtOptions::default();
    options.max_frame_pages = 10;
    let store = DhtTemplates::from_cluster(cluster, None, options)
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert_eq!(err.expect("an error").kind(), ErrorKind::LimitExceeded);
    assert!(out.len() <= f.eof_end);
}

// ---- real Redis servers --------------------------------------------------------

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("dht")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn quick() -> DhtOptions {
    let mut options = DhtOptions::default();
    options.timeouts = Timeouts::new(Duration::from_millis(500), Duration::from_secs(2));
    options
}

fn redis_cluster(servers: &[RedisServer], replicas: usize, options: DhtOptions) -> Arc<Cluster> {
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    Arc::new(Cluster::redis(&urls, replicas, options).unwrap())
}

#[tokio::test]
async fn redis_push_and_verify() {
    if !redis_server::available("redis_push_and_verify") {
        return;
    }
    let mut servers = RedisServer::start_many(&scratch("push_verify"), 4);
    let f = fixture(2000);
    let cluster = redis_cluster(&servers, 2, quick());
    let report = push(&cluster, &f.catalog).await.unwrap();
    let counts: Vec<usize> = report.per_node.iter().map(|n| n.1).collect();
    assert_eq!(counts.iter().sum::<usize>(), 4000);
    let check = verify(&cluster, &f.catalog).await.unwrap();
    assert!(check.ok(), "{check:?}");
    assert_eq!((check.missing(), check.lost), (0, 0));
    assert!(check.balance() <= 1.1, "balance {}", check.balance());
    assert!(check.nodes.iter().all(|n| n.manifest && n.current));
    // the same keys are in the servers, as seen by another client
    let dbsize = servers[0].command("DBSIZE");
    assert_eq!(dbsize.trim(), format!(":{}", counts[0] + 2));

    // one node killed: its copies are missing, nothing is lost
    servers[3].kill();
    let check = verify(&cluster, &f.catalog).await.unwrap();
    assert_eq!(check.missing(), counts[3]);
    assert_eq!(check.lost, 0);
    assert!(check.nodes[3].error.is_some() && !check.ok());
}

#[tokio::test]
async fn redis_ring_decodes_byte_identical_with_a_node_killed_mid_decode() {
    if !redis_server::available("redis_ring_decodes_byte_identical_with_a_node_killed_mid_decode") {
        return;
    }
    let mut servers = RedisServer::start_many(&scratch("kill_mid_decode"), 4);
    let f = fixture(2000);
    let cluster = redis_cluster(&servers, 2, quick());
    push(&cluster, &f.catalog).await.unwrap();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let store = DhtTemplates::connect(&urls, 2, quick()).await.unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let mut killed_at = None;
    let (out, err, fetches) = decode_through(&store, &f.wire, |n| {
        if n == 2 {
            servers[1].kill();
            killed_at = Some(n);
        }
    })
    .await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        killed_at,
        Some(2),
        "killed before the third of {fetches} fetches"
    );
    assert!(fetches > 4, "{fetches} fetches");
    assert!(out == f.qemu, "output differs");
    assert_eq!(store.cached(), 2000);
}

#[tokio::test]
async fn redis_every_replica_gone_is_unresolved_before_the_end_of_the_stream() {
    if !redis_server::available("redis_every_replica_gone_is_unresolved") {
        return;
    }
    let mut servers = RedisServer::start_many(&scratch("replicas_gone"), 4);
    let f = fixture(1000);
    let cluster = redis_cluster(&servers, 2, quick());
    push(&cluster, &f.catalog).await.unwrap();

    // a late template deleted from both its nodes
    let gone = Fingerprint::of(&f.templates[999]);
    for i in cluster.ring().owners(&gone) {
        cluster.nodes()[i]
            .delete_many(&[layout::template_key(&gone)])
            .await
            .unwrap();
    }
    let store = DhtTemplates::from_cluster(cluster.clone(), None, quick())
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    let err = err.expect("an error");
    assert_eq!(unresolved_fingerprint(&err), gone, "{err}");
    assert!(f.qemu.starts_with(&out) && out.len() <= f.eof_end);
    assert!(
        out.len() > 500 * PAGE,
        "only {} bytes before the failure",
        out.len()
    );
    push(&cluster, &f.catalog).await.unwrap();

    // two nodes killed: a template owned by just those two is named
    servers[0].kill();
    servers[2].kill();
    let lost: Vec<Fingerprint> = f
        .templates
        .iter()
        .map(|p| Fingerprint::of(p))
        .filter(|fp| {
            let mut owners = cluster.ring().owners(fp);
            owners.sort_unstable();
            owners == [0, 2]
        })
        .collect();
    assert!(!lost.is_empty());
    store.clear_cache();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    let err = err.expect("an error");
    // one of them (which one depends on the order the nodes' answers came in)
    assert!(lost.contains(&unresolved_fingerprint(&err)), "{err}");
    assert!(err.to_string().contains("down or timed out"), "{err}");
    assert!(f.qemu.starts_with(&out) && out.len() <= f.eof_end);
}

#[tokio::test]
async fn redis_node_that_never_answers_times_out_and_its_replica_serves() {
    if !redis_server::available("redis_node_that_never_answers_times_out") {
        return;
    }
    let servers = RedisServer::start_many(&scratch("silent"), 3);
    // a fourth "node" that accepts connections (the kernel's backlog) and never replies
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let mut urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    urls.push(format!(
        "redis://127.0.0.1:{}",
        silent.local_addr().unwrap().port()
    ));
    let f = fixture(400);
    let mut options = quick();
    options.timeouts = Timeouts::new(Duration::from_millis(200), Duration::from_millis(300));
    // seed the three live nodes with the placement of the four-node ring
    let ring4 = Arc::new(Cluster::redis(&urls, 2, options.clone()).unwrap());
    let live: Vec<Arc<dyn Node>> = ring4.nodes()[..3].to_vec();
    for (n, fp) in f.catalog.fingerprints().iter().enumerate() {
        let page = Bytes::copy_from_slice(f.catalog.get(n as u32).unwrap());
        for i in ring4.ring().owners(fp).into_iter().filter(|&i| i < 3) {
            live[i]
                .set_many(&[(layout::template_key(fp), page.clone())])
                .await
                .unwrap();
        }
    }
    let manifest = migstream::dht::Manifest::of(&f.catalog).encode();
    live[0]
        .set_many(&[(layout::manifest_key(&f.catalog.id()), manifest)])
        .await
        .unwrap();
    let store = DhtTemplates::from_cluster(ring4.clone(), Some(f.catalog.id()), options)
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    drop(silent);
}

#[tokio::test]
async fn redis_killed_node_restarted_on_its_port_is_used_again() {
    if !redis_server::available("redis_killed_node_restarted_on_its_port_is_used_again") {
        return;
    }
    let mut servers = RedisServer::start_many(&scratch("restart"), 4);
    let f = fixture(800);
    let mut options = quick();
    options.cache_pages = 0; // every migration asks the ring
    let cluster = redis_cluster(&servers, 2, options.clone());
    push(&cluster, &f.catalog).await.unwrap();
    let store = DhtTemplates::from_cluster(cluster.clone(), None, options)
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");

    // node 0 dies; its replicas serve
    servers[0].kill();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    // node 0 comes back empty on its port: its misses fall over to replicas too
    servers[0].restart();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    // re-seeded, it must serve alone what it shares with node 1, now killed
    push(&cluster, &f.catalog).await.unwrap();
    servers[1].kill();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    let shared = f
        .catalog
        .fingerprints()
        .iter()
        .filter(|fp| {
            let mut owners = cluster.ring().owners(fp);
            owners.sort_unstable();
            owners == [0, 1]
        })
        .count();
    assert!(shared > 0, "no template on nodes 0 and 1 only");
    let check = verify(&cluster, &f.catalog).await.unwrap();
    assert_eq!(check.nodes[0].present, check.nodes[0].assigned);
    assert_eq!(check.lost, 0);
}

// ---- reaching the nodes: passwords, ACL users, TLS -----------------------------

/// The configuration error a refused node gives, with its `what`.
fn config_error(err: &Error) -> (&'static str, &str) {
    match err {
        Error::Config { what, reason } => (what, reason),
        other => panic!("expected a configuration error, got {other}"),
    }
}

/// Asserts that none of `secrets` shows in `err`'s message or `Debug`.
fn assert_no_secret(err: &Error, secrets: &[&str]) {
    let (text, debug) = (err.to_string(), format!("{err:?}"));
    for secret in secrets {
        assert!(!text.contains(secret) && !debug.contains(secret), "{text}");
    }
}

#[tokio::test]
async fn redis_nodes_with_a_password_or_an_acl_user_and_a_wrong_or_missing_one_named() {
    if !redis_server::available("redis_nodes_with_a_password_or_an_acl_user") {
        return;
    }
    const PASSWORD: &str = "pw-Sesame-4711";
    const USER_PASSWORD: &str = "user-Sesame-0815";
    let dir = scratch("auth");
    let options = redis_server::Options {
        password: Some(PASSWORD.to_string()),
        tls: None,
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|i| RedisServer::start_with(&dir.join(format!("node{i}")), options.clone()))
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    assert!(urls[0].contains(PASSWORD));
    let f = fixture(500);
    let cluster = redis_cluster(&servers, 2, quick());
    // the names (the ring's identities) are the URLs less the password
    for (node, server) in cluster.nodes().iter().zip(&servers) {
        assert_eq!(node.name(), server.plain_url());
    }
    assert!(!format!("{cluster:?}").contains(PASSWORD));
    let report = push(&cluster, &f.catalog).await.unwrap();
    assert!(
        report
            .per_node
            .iter()
            .all(|(name, _)| !name.contains(PASSWORD))
    );
    let store = DhtTemplates::connect(&urls, 2, quick()).await.unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    assert!(!format!("{store:?}").contains(PASSWORD));

    // an ACL user: other credentials, the same ring
    for server in &servers {
        let ok = server.command(&format!("ACL SETUSER migs on >{USER_PASSWORD} ~* +@all"));
        assert_eq!(ok.trim(), "+OK");
    }
    let user_urls: Vec<String> = servers
        .iter()
        .map(|s| format!("redis://migs:{USER_PASSWORD}@127.0.0.1:{}", s.port()))
        .collect();
    let store = DhtTemplates::connect(&user_urls, 2, quick()).await.unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    let by_user = Arc::new(Cluster::redis(&user_urls, 2, quick()).unwrap());
    assert!(verify(&by_user, &f.catalog).await.unwrap().ok());
    // a destination needs no more than MGET on the ring's keys; pushing is refused
    for server in &servers {
        let ok = server.command(&format!(
            "ACL SETUSER reader on >{USER_PASSWORD} ~mgs:* +mget"
        ));
        assert_eq!(ok.trim(), "+OK");
    }
    let reader_urls: Vec<String> = servers
        .iter()
        .map(|s| format!("redis://reader:{USER_PASSWORD}@127.0.0.1:{}", s.port()))
        .collect();
    let store = DhtTemplates::connect(&reader_urls, 2, quick())
        .await
        .unwrap();
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    let reader = Arc::new(Cluster::redis(&reader_urls, 2, quick()).unwrap());
    let err = push(&reader, &f.catalog).await.unwrap_err();
    let (what, reason) = config_error(&err);
    assert_eq!(what, "redis node authentication");
    assert!(reason.contains("ACL does not let this user"), "{err}");

    // a wrong password on one node: a configuration error naming that node
    let secrets = [PASSWORD, USER_PASSWORD, "not-the-password"];
    let mut wrong = urls.clone();
    wrong[1] = format!("redis://:not-the-password@127.0.0.1:{}", servers[1].port());
    let err = DhtTemplates::connect(&wrong, 2, quick()).await.unwrap_err();
    let (what, reason) = config_error(&err);
    assert_eq!(what, "redis node authentication");
    assert!(reason.starts_with(&servers[1].plain_url()), "{err}");
    assert!(
        reason.contains("refused the user name or password"),
        "{err}"
    );
    assert_no_secret(&err, &secrets);
    // ... and pinned alike
    let err = DhtTemplates::connect_to(&wrong, 2, f.catalog.id(), quick())
        .await
        .unwrap_err();
    assert_eq!(config_error(&err).0, "redis node authentication");

    // no password for a node that requires one
    let mut missing = urls.clone();
    missing[2] = servers[2].plain_url();
    let err = DhtTemplates::connect(&missing, 2, quick())
        .await
        .unwrap_err();
    let (what, reason) = config_error(&err);
    assert_eq!(what, "redis node authentication");
    assert!(reason.starts_with(&servers[2].plain_url()), "{err}");
    assert!(reason.contains("requires a password"), "{err}");
    assert_no_secret(&err, &secrets);

    // a wrong password for the ACL user; and push and verify say so too
    let mut wrong_user = user_urls.clone();
    wrong_user[0] = format!(
        "redis://migs:not-the-password@127.0.0.1:{}",
        servers[0].port()
    );
    let err = DhtTemplates::connect(&wrong_user, 2, quick())
        .await
        .unwrap_err();
    assert!(
        config_error(&err).1.starts_with(&servers[0].plain_url()),
        "{err}"
    );
    assert_no_secret(&err, &secrets);
    let bad = Arc::new(Cluster::redis(&wrong_user, 2, quick()).unwrap());
    let err = push(&bad, &f.catalog).await.unwrap_err();
    assert_eq!(config_error(&err).0, "redis node authentication");
    assert_no_secret(&err, &secrets);
    let check = verify(&bad, &f.catalog).await.unwrap();
    assert!(!check.ok());
    let refused = check.nodes[0].error.as_deref().expect("node 0 failed");
    assert!(
        refused.contains("refused the user name or password"),
        "{refused}"
    );
    assert!(secrets.iter().all(|s| !refused.contains(s)), "{refused}");
    assert!(check.nodes[1].error.is_none() && check.nodes[2].error.is_none());
}

#[tokio::test]
async fn redis_nodes_disagreeing_on_the_current_catalog_start_on_the_right_one() {
    if !redis_server::available("redis_nodes_disagreeing_on_the_current_catalog") {
        return;
    }
    let servers = RedisServer::start_many(&scratch("disagree"), 3);
    let f = fixture(300);
    let old = older_catalog();
    let cluster = redis_cluster(&servers, 2, quick());
    push(&cluster, &old).await.unwrap();
    push(&cluster, &f.catalog).await.unwrap();
    // the first node listed names the old catalog (its manifest is still there)
    point(cluster.nodes()[0].as_ref(), &old.id()).await;
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    let store = DhtTemplates::connect(&urls, 2, quick()).await.unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
    // pinned: whichever is asked for
    for id in [old.id(), f.catalog.id()] {
        let pinned = DhtTemplates::connect_to(&urls, 2, id, quick())
            .await
            .unwrap();
        assert_eq!(pinned.catalog_id(), id);
    }
    let (out, err, _) = decode_through(
        &DhtTemplates::connect_to(&urls, 2, f.catalog.id(), quick())
            .await
            .unwrap(),
        &f.wire,
        |_| {},
    )
    .await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");
}

/// A CA, and certificates it signed, as PEM files under `dir`.
struct Pki {
    ca: PathBuf,
    server: TlsFiles,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// A CA (`name`), a server certificate for 127.0.0.1 and a client certificate.
fn make_pki(dir: &Path, name: &str) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf = |san: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("127.0.0.1");
    let (client_cert, client_key) = leaf("destination");
    let ca = write_pem(dir, "ca.pem", &ca_pem);
    Pki {
        server: TlsFiles {
            cert: write_pem(dir, "server.pem", &server_cert),
            key: write_pem(dir, "server-key.pem", &server_key),
            ca: ca.clone(),
            auth_clients: true,
        },
        ca,
        client_cert: write_pem(dir, "client.pem", &client_cert),
        client_key: write_pem(dir, "client-key.pem", &client_key),
    }
}

#[tokio::test]
async fn redis_over_tls_with_a_private_ca_and_client_certificates() {
    if !redis_server::available("redis_over_tls_with_a_private_ca") {
        return;
    }
    const PASSWORD: &str = "tls-Sesame-2024";
    let dir = scratch("tls");
    let pki = make_pki(&dir.join("pki"), "migstream test CA");
    let options = redis_server::Options {
        password: Some(PASSWORD.to_string()),
        tls: Some(pki.server.clone()),
    };
    let servers: Vec<RedisServer> = (0..3)
        .map(|i| RedisServer::start_with(&dir.join(format!("node{i}")), options.clone()))
        .collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    assert!(urls.iter().all(|u| u.starts_with("rediss://:")));
    let tls = RedisTls::from_ca_file(&pki.ca)
        .unwrap()
        .with_client_identity_files(&pki.client_cert, &pki.client_key)
        .unwrap();
    let mut options = quick();
    options.redis_tls = Some(tls.clone());
    let f = fixture(500);
    let cluster = Arc::new(Cluster::redis(&urls, 2, options.clone()).unwrap());
    let tls_port = servers[0].tls_port().unwrap();
    assert_eq!(
        cluster.nodes()[0].name(),
        format!("rediss://127.0.0.1:{tls_port}")
    );
    push(&cluster, &f.catalog).await.unwrap();
    assert!(verify(&cluster, &f.catalog).await.unwrap().ok());
    let store = DhtTemplates::connect(&urls, 2, options.clone())
        .await
        .unwrap();
    assert_eq!(store.catalog_id(), f.catalog.id());
    let (out, err, _) = decode_through(&store, &f.wire, |_| {}).await;
    assert!(err.is_none() && out == f.qemu, "{err:?}");

    // another CA's certificate is refused, naming the node
    let other = make_pki(&dir.join("other-pki"), "some other CA");
    let mut untrusting = quick();
    untrusting.redis_tls = Some(
        RedisTls::from_ca_file(&other.ca)
            .unwrap()
            .with_client_identity_files(&pki.client_cert, &pki.client_key)
            .unwrap(),
    );
    let err = DhtTemplates::connect(&urls, 2, untrusting)
        .await
        .unwrap_err();
    let (what, reason) = config_error(&err);
    assert_eq!(what, "redis node TLS", "{err}");
    assert!(reason.starts_with("rediss://127.0.0.1:"), "{err}");
    assert!(reason.contains("certificate"), "{err}");
    assert_no_secret(&err, &[PASSWORD]);

    // the system's roots do not know the private CA either
    let mut system_roots = quick();
    system_roots.redis_tls = None;
    let err = DhtTemplates::connect(&urls, 2, system_roots)
        .await
        .unwrap_err();
    assert_eq!(config_error(&err).0, "redis node TLS", "{err}");

    // the servers ask for a client certificate: none shown, no catalog
    let mut anonymous = quick();
    anonymous.redis_tls = Some(RedisTls::from_ca_file(&pki.ca).unwrap());
    let err = DhtTemplates::connect(&urls, 2, anonymous)
        .await
        .unwrap_err();
    let (what, reason) = config_error(&err);
    assert_eq!(what, "redis node TLS", "{err}");
    assert!(reason.starts_with("rediss://127.0.0.1:"), "{err}");
    assert!(reason.contains("CertificateRequired"), "{err}");
    assert_no_secret(&err, &[PASSWORD]);

    // TLS settings with a redis:// URL: refused before connecting
    let plain: Vec<String> = servers.iter().map(RedisServer::plain_url).collect();
    let err = Cluster::redis(&plain, 2, options.clone()).unwrap_err();
    assert!(err.to_string().contains("not rediss://"), "{err}");
    // their plain ports want the password too
    let err = DhtTemplates::connect(&plain, 2, quick()).await.unwrap_err();
    assert!(
        config_error(&err).1.contains("requires a password"),
        "{err}"
    );
}
