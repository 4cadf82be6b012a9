//! The destination's template store over a ring: a [`TemplateStore`] whose
//! resolvers restore template references from pages fetched from the ring.
//!
//! Per migration, [`TemplateStore::open`] gives a [`Restore`] and a [`Fetch`] that
//! share the migration's state:
//!
//! - `prepare` sees every template reference of a frame before any page of it is
//!   restored. A template found in the store's LRU cache is *pinned*: the
//!   migration keeps its own handle on the page until the frame is restored, so
//!   another migration filling the cache cannot evict it in between. A template
//!   not cached is recorded as wanted, and the decoder waits;
//! - `fetch` gets every wanted page of the frame in one go (batched per node, with
//!   failover, each page verified against its fingerprint), caches and pins them;
//! - `restore` copies pinned pages. A frame's pins are dropped at its `end_frame`.
//!   The decoder prepares one frame ahead of the one it restores, so that the next
//!   frame's templates are fetched while this one is restored: a migration holds
//!   the pins of two frames at most, each bounded by [`DhtOptions::max_frame_pages`].
//!
//! Pages are verified once, when fetched; the cache and the pins hold immutable
//! verified bytes, so restoring a cached template costs a copy and no hash.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::task::JoinSet;

use super::DhtOptions;
use super::cache::Lru;
use super::cluster::Cluster;
use super::layout::{CURRENT_KEY, Manifest, manifest_key};
use super::node::refusal;
use crate::error::{Error, Result};
use crate::page::Fingerprint;
use crate::resolve::{Fetch, PageAt, PageOut, Restore, TemplateStore, tag};
use crate::template::CatalogId;
use crate::varint;

/// Templates of one catalog, restored from a ring of store nodes.
///
/// Clones share the cluster, the manifest and the cache.
#[derive(Debug, Clone)]
pub struct DhtTemplates {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    cluster: Arc<Cluster>,
    manifest: Manifest,
    cache: Mutex<Lru>,
    options: DhtOptions,
}

impl DhtTemplates {
    /// The store of the catalog pushed last to the Redis servers at `urls`
    /// (`redis://[[USER]:PASSWORD@]host:port`, or `rediss://` for TLS, trusting
    /// [`DhtOptions::redis_tls`]), `replicas` copies per template: the catalog the
    /// most nodes name in `mgs:current` and whose manifest checks out (see
    /// [`from_cluster`](Self::from_cluster)).
    #[cfg(feature = "redis")]
    pub async fn connect<S: AsRef<str>>(
        urls: &[S],
        replicas: usize,
        options: DhtOptions,
    ) -> Result<Self> {
        let cluster = Cluster::redis(urls, replicas, options.clone())?;
        Self::from_cluster(Arc::new(cluster), None, options).await
    }

    /// Like [`connect`](Self::connect) for catalog `id`.
    #[cfg(feature = "redis")]
    pub async fn connect_to<S: AsRef<str>>(
        urls: &[S],
        replicas: usize,
        id: CatalogId,
        options: DhtOptions,
    ) -> Result<Self> {
        let cluster = Cluster::redis(urls, replicas, options.clone())?;
        Self::from_cluster(Arc::new(cluster), Some(id), options).await
    }

    /// The store of catalog `id` (or of the catalog pushed last) on `cluster`.
    ///
    /// Every node is asked for its `mgs:current` first, at once. Unpinned (`id`
    /// `None`), the catalog most answering nodes name is used if its manifest
    /// checks out, else the next most named, and so on; nodes that disagree are
    /// logged (`tracing` warning). Pinned, `mgs:current` decides nothing.
    ///
    /// Fails with [`Error::Config`] naming the node if a node refuses the
    /// credentials of its URL or its TLS certificate is refused (a node that is
    /// down or times out is only passed over), and with [`Error::Io`]
    /// (`NotFound`) if no node holds a manifest of the catalog that hashes to its
    /// id, with the last node error if none answered.
    pub async fn from_cluster(
        cluster: Arc<Cluster>,
        id: Option<CatalogId>,
        options: DhtOptions,
    ) -> Result<Self> {
        let pointers = read_pointers(&cluster).await?;
        let manifest = match id {
            Some(id) => {
                let naming: Vec<usize> = (0..pointers.len())
                    .filter(|&i| matches!(pointers[i], Pointer::Names(c) if c == id))
                    .collect();
                if naming.len() < pointers.len() {
                    tracing::info!(
                        "dht: catalog {id} pinned; the nodes' current catalogs: {}",
                        describe(&cluster, &pointers)
                    );
                }
                let order = manifest_order(&pointers, &naming);
                load_manifest(&cluster, &id, options.max_templates, &order).await?
            }
            None => current_manifest(&cluster, &pointers, options.max_templates).await?,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                cluster,
                manifest,
                cache: Mutex::new(Lru::new(options.cache_pages)),
                options,
            }),
        })
    }

    /// The catalog's manifest (page size and fingerprints).
    pub fn manifest(&self) -> &Manifest {
        &self.shared.manifest
    }

    /// The ring and its nodes.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.shared.cluster
    }

    /// Pages in the cache of hot templates.
    pub fn cached(&self) -> usize {
        self.shared.cache().len()
    }

    /// Empties the cache of hot templates (pages pinned by migrations stay).
    pub fn clear_cache(&self) {
        self.shared.cache().clear();
    }
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, Lru> {
        // the cache is consistent after every call, even one that panicked
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TemplateStore for DhtTemplates {
    fn catalog_id(&self) -> CatalogId {
        self.shared.manifest.id()
    }

    fn open(&self) -> (Box<dyn Restore>, Option<Box<dyn Fetch>>) {
        let migration = Arc::new(Mutex::new(Migration::default()));
        let restore = DhtRestore {
            shared: self.shared.clone(),
            migration: migration.clone(),
        };
        let fetch = DhtFetch {
            shared: self.shared.clone(),
            migration,
        };
        (Box::new(restore), Some(Box::new(fetch)))
    }
}

/// The state of one migration, shared by its `Restore` and `Fetch` halves.
#[derive(Debug, Default)]
struct Migration {
    /// The pages pinned for each frame begun and not ended, oldest first: the
    /// frame being restored and the one prepared after it.
    frames: VecDeque<Pins>,
    /// Templates of the newest frame neither pinned nor cached: what `fetch` gets.
    wanted: HashSet<Fingerprint, ahash::RandomState>,
}

type Pins = HashMap<Fingerprint, Bytes, ahash::RandomState>;

impl Migration {
    /// A page pinned for any frame begun.
    fn pinned(&self, fp: &Fingerprint) -> Option<&Bytes> {
        self.frames.iter().find_map(|pins| pins.get(fp))
    }

    /// Pins `page` for the newest frame: no longer wanted.
    fn pin(&mut self, fp: Fingerprint, page: Bytes) {
        self.wanted.remove(&fp);
        if let Some(pins) = self.frames.back_mut() {
            pins.insert(fp, page);
        }
    }
}

fn lock(m: &Mutex<Migration>) -> MutexGuard<'_, Migration> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The template number a body carries, if it is one.
fn template_number(body: &[u8]) -> Option<u32> {
    match varint::get(body) {
        Some((n, len)) if len == body.len() => u32::try_from(n).ok(),
        _ => None,
    }
}

/// The `Restore` half of one migration.
#[derive(Debug)]
struct DhtRestore {
    shared: Arc<Shared>,
    migration: Arc<Mutex<Migration>>,
}

impl Restore for DhtRestore {
    fn tag(&self) -> u8 {
        tag::TEMPLATE
    }

    fn prepare(&mut self, body: &[u8]) -> Result<bool> {
        let Some(fp) = template_number(body).and_then(|n| self.shared.manifest.fingerprint(n))
        else {
            return Ok(true); // `restore` reports it, at its place in the frame
        };
        let mut m = lock(&self.migration);
        if m.frames.back().is_some_and(|pins| pins.contains_key(&fp)) {
            return Ok(true);
        }
        // pinned for the frame before, or cached: pinned for this one too
        let page = m.pinned(&fp).cloned();
        if let Some(page) = page.or_else(|| self.shared.cache().get(&fp)) {
            m.pin(fp, page);
            return Ok(true);
        }
        if !m.wanted.contains(&fp) {
            let limit = self.shared.options.max_frame_pages;
            let held = m.frames.back().map_or(0, HashMap::len) + m.wanted.len();
            if held >= limit {
                return Err(Error::LimitExceeded {
                    offset: 0,
                    field: "distinct templates of one frame",
                    value: (held + 1) as u64,
                    limit: limit as u64,
                });
            }
            m.wanted.insert(fp);
        }
        Ok(false)
    }

    fn begin_frame(&mut self) {
        let mut m = lock(&self.migration);
        // what the frame before wanted is pinned by now: it was ready
        m.wanted.clear();
        m.frames.push_back(Pins::default());
    }

    fn end_frame(&mut self) {
        lock(&self.migration).frames.pop_front();
    }

    fn restore(&mut self, _at: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()> {
        let Some(fp) = template_number(body).and_then(|n| self.shared.manifest.fingerprint(n))
        else {
            return Err(Error::Malformed {
                offset: 0,
                field: "template body",
                reason: "not a template number of this catalog",
            });
        };
        if self.shared.manifest.page_size() != out.page_size() {
            return Err(Error::Malformed {
                offset: 0,
                field: "template body",
                reason: "the catalog's page size differs from the stream's",
            });
        }
        let m = lock(&self.migration);
        let page = match m.pinned(&fp) {
            Some(page) => page.clone(),
            None => match self.shared.cache().get(&fp) {
                Some(page) => page,
                None => {
                    return Err(Error::Unresolved {
                        resolver: "dht",
                        fingerprint: fp,
                        reason: "restored before it was fetched",
                    });
                }
            },
        };
        out.copy_from_slice(&page) // verified, and of the page size, when fetched
    }
}

/// The `Fetch` half of one migration.
#[derive(Debug)]
struct DhtFetch {
    shared: Arc<Shared>,
    migration: Arc<Mutex<Migration>>,
}

impl Fetch for DhtFetch {
    fn fetch(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            let wanted: Vec<Fingerprint> = {
                let mut m = lock(&self.migration);
                let wanted: Vec<Fingerprint> = m.wanted.drain().collect();
                // another migration may have brought some in meanwhile
                let mut cache = self.shared.cache();
                let mut missing = Vec::with_capacity(wanted.len());
                for fp in wanted {
                    match cache.get(&fp) {
                        Some(page) => m.pin(fp, page),
                        None => missing.push(fp),
                    }
                }
                missing
            };
            if wanted.is_empty() {
                return Ok(());
            }
            let page_size = self.shared.manifest.page_size();
            let pages = self.shared.cluster.fetch(&wanted, page_size).await?;
            let mut m = lock(&self.migration);
            let mut cache = self.shared.cache();
            for (fp, page) in pages {
                cache.insert(fp, page.clone());
                m.pin(fp, page);
            }
            Ok(())
        })
    }
}

/// What one node's `mgs:current` says.
#[derive(Debug)]
enum Pointer {
    /// It names this catalog.
    Names(CatalogId),
    /// It answered with no pointer (or not 32 bytes).
    Nothing,
    /// It failed or timed out.
    Failed(io::Error),
}

/// Every node's `mgs:current`, asked at once, in membership order. This also
/// probes every node: one that refuses the credentials or whose TLS certificate is
/// refused fails the start with its [`Error::Config`], rather than leave the ring
/// a node short without a word.
async fn read_pointers(cluster: &Arc<Cluster>) -> Result<Vec<Pointer>> {
    let mut tasks = JoinSet::new();
    for i in 0..cluster.nodes().len() {
        let cluster = cluster.clone();
        tasks.spawn(async move { (i, cluster.get_from(i, &[CURRENT_KEY.to_vec()]).await) });
    }
    let mut answers: Vec<Option<io::Result<Vec<Option<Bytes>>>>> =
        (0..cluster.nodes().len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, answer) = joined.map_err(|e| Error::Io(io::Error::other(e)))?;
        answers[i] = Some(answer);
    }
    let mut pointers = Vec::with_capacity(answers.len());
    for answer in answers {
        pointers.push(match answer {
            Some(Ok(values)) => match values.into_iter().next().flatten() {
                Some(v) => <[u8; 32]>::try_from(&v[..])
                    .map_or(Pointer::Nothing, |id| Pointer::Names(CatalogId(id))),
                None => Pointer::Nothing,
            },
            Some(Err(e)) => match refusal(e) {
                Ok(config) => return Err(config),
                Err(e) => Pointer::Failed(e),
            },
            None => Pointer::Failed(io::Error::other("the request task did not report")),
        });
    }
    Ok(pointers)
}

/// The catalogs the nodes name, most named first (ties: in the order of the first
/// node naming them), each with the nodes naming it.
fn candidates(pointers: &[Pointer]) -> Vec<(CatalogId, Vec<usize>)> {
    let mut named: Vec<(CatalogId, Vec<usize>)> = Vec::new();
    for (i, p) in pointers.iter().enumerate() {
        if let Pointer::Names(id) = p {
            match named.iter_mut().find(|(c, _)| c == id) {
                Some((_, nodes)) => nodes.push(i),
                None => named.push((*id, vec![i])),
            }
        }
    }
    named.sort_by_key(|(_, nodes)| std::cmp::Reverse(nodes.len())); // stable
    named
}

/// The order to ask nodes for a manifest: `first`, then the other nodes that
/// answered, then those that failed.
fn manifest_order(pointers: &[Pointer], first: &[usize]) -> Vec<usize> {
    let answered = |i: &usize| !matches!(pointers[*i], Pointer::Failed(_));
    let mut order = first.to_vec();
    order.extend((0..pointers.len()).filter(|i| !first.contains(i) && answered(i)));
    order.extend((0..pointers.len()).filter(|i| !first.contains(i) && !answered(i)));
    order
}

/// "node = id" for every node, for the log.
fn describe(cluster: &Cluster, pointers: &[Pointer]) -> String {
    let nodes = cluster.nodes().iter().zip(pointers);
    let each = nodes.map(|(node, p)| match p {
        Pointer::Names(id) => format!("{} = {id}", node.name()),
        Pointer::Nothing => format!("{} = none", node.name()),
        Pointer::Failed(_) => format!("{} = no answer", node.name()),
    });
    each.collect::<Vec<_>>().join(", ")
}

/// The manifest of the catalog pushed last. The nodes' `mgs:current` should agree;
/// if they do not (a node missed a push, was restored from an old snapshot, or was
/// tampered with), the catalog most of them name is tried first and each other
/// one in turn, and the first whose manifest checks out is used. Disagreement is
/// logged.
async fn current_manifest(
    cluster: &Cluster,
    pointers: &[Pointer],
    max_templates: u64,
) -> Result<Manifest> {
    let candidates = candidates(pointers);
    let answering = pointers
        .iter()
        .filter(|p| !matches!(p, Pointer::Failed(_)))
        .count();
    let Some((first, _)) = candidates.first() else {
        let last_error = pointers.iter().rev().find_map(|p| match p {
            Pointer::Failed(e) => Some(io::Error::new(e.kind(), e.to_string())),
            _ => None,
        });
        let what = "no node names a current catalog".to_string();
        return Err(no_catalog(last_error, what));
    };
    if candidates.len() > 1 {
        let (votes, majority) = (candidates[0].1.len(), candidates[0].1.len() * 2 > answering);
        tracing::warn!(
            "dht: the nodes name different current catalogs ({}); trying {first} first, named by {votes} of {answering} answering nodes{}",
            describe(cluster, pointers),
            if majority {
                " (a majority)"
            } else {
                " (no majority)"
            },
        );
    }
    let mut last = None;
    for (id, naming) in &candidates {
        let order = manifest_order(pointers, naming);
        match load_manifest(cluster, id, max_templates, &order).await {
            Ok(manifest) => {
                if id != first {
                    tracing::warn!("dht: using current catalog {id}: no valid manifest of {first}");
                }
                return Ok(manifest);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| no_catalog(None, "no node names a current catalog".into())))
}

/// Catalog `id`'s manifest, from the first node in `order` whose copy checks out.
async fn load_manifest(
    cluster: &Cluster,
    id: &CatalogId,
    max_templates: u64,
    order: &[usize],
) -> Result<Manifest> {
    let key = [manifest_key(id)];
    let mut last_error = None;
    for &i in order {
        match cluster.get_from(i, &key).await {
            Ok(values) => {
                if let Some(bytes) = values.into_iter().next().flatten() {
                    match Manifest::decode(&bytes, id, max_templates) {
                        Ok(manifest) => return Ok(manifest),
                        Err(e) => {
                            last_error = Some(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("{}: {e}", cluster.nodes()[i].name()),
                            ));
                        }
                    }
                }
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(no_catalog(
        last_error,
        format!("no node holds a valid manifest of catalog {id}"),
    ))
}

fn no_catalog(last_error: Option<io::Error>, what: String) -> Error {
    let message = match last_error {
        Some(e) => format!("{what} (last error: {e})"),
        None => what,
    };
    Error::Io(io::Error::new(io::ErrorKind::NotFound, message))
}
