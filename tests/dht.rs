//! TMDHT: template pages served by a ring of store nodes. In-process nodes test the
//! store's logic; real `redis-server` processes (started here on loopback ports)
//! test what the ring is for: byte-identical decoding with a node killed mid-way,
//! a clean failure naming the page when every replica is gone, timeouts, and a
//! restarted node used again.
//!
//! Without redis-server installed the Redis tests skip loudly; with
//! `MIGSTREAM_REQUIRE_REDIS=1` (scripts/test.sh) they fail instead.

mod redis_server;
mod support;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use migstream::dedup::{DedupDecoder, DedupEncoder};
use migstream::dht::{
    Cluster, DhtOptions, DhtTemplates, MemoryNode, Node, Timeouts, layout, push, verify,
};
use migstream::page::Fingerprint;
use migstream::qemu::{RamRecord, Record};
use migstream::resolve::{Fetch, TemplateStore};
use migstream::template::{Catalog, TemplateIndex};
use migstream::{Error, ErrorKind};
use redis_server::RedisServer;

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
    let mut dec = DedupDecoder::with_template_resolver(templates, store.catalog_id());
    let (mut buf, mut out, mut fetches) = (BytesMut::from(wire), Vec::new(), 0);
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(bytes)) => out.extend_from_slice(&bytes),
            Ok(None) if dec.waiting() => {
                before_fetch(fetches);
                fetches += 1;
                if let Err(e) = fetch.fetch().await {
                    return (out, Some(e), fetches);
                }
            }
            Ok(None) => break,
            Err(e) => return (out, Some(e), fetches),
        }
    }
    loop {
        match dec.decode_eof(&mut buf) {
            Ok(Some(bytes)) => out.extend_from_slice(&bytes),
            Ok(None) => return (out, None, fetches),
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
    assert_eq!(gets, 600 + 2); // + the current pointer and the manifest
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
    options.timeouts = Timeouts {
        connect: Duration::from_millis(500),
        request: Duration::from_secs(2),
    };
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
    options.timeouts = Timeouts {
        connect: Duration::from_millis(200),
        request: Duration::from_millis(300),
    };
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
