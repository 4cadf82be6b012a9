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
//! - `restore` copies pinned pages. The pins are dropped when the next frame's
//!   `prepare` starts, so a migration holds at most one frame's templates
//!   (bounded by [`DhtOptions::max_frame_pages`]).
//!
//! Pages are verified once, when fetched; the cache and the pins hold immutable
//! verified bytes, so restoring a cached template costs a copy and no hash.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::DhtOptions;
use super::cache::Lru;
use super::cluster::Cluster;
use super::layout::{CURRENT_KEY, Manifest, manifest_key};
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
    /// (`redis://host:port`), `replicas` copies per template: its id is read from
    /// the first node that has one (`mgs:current`), its manifest from the first
    /// node whose copy checks out.
    pub async fn connect<S: AsRef<str>>(
        urls: &[S],
        replicas: usize,
        options: DhtOptions,
    ) -> Result<Self> {
        let cluster = Cluster::redis(urls, replicas, options.clone())?;
        Self::from_cluster(Arc::new(cluster), None, options).await
    }

    /// Like [`connect`](Self::connect) for catalog `id`.
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
    /// Fails with [`Error::Io`] (`NotFound`) if no node holds a manifest of it
    /// that hashes to its id, and with the last node error if none answered.
    pub async fn from_cluster(
        cluster: Arc<Cluster>,
        id: Option<CatalogId>,
        options: DhtOptions,
    ) -> Result<Self> {
        let id = match id {
            Some(id) => id,
            None => current(&cluster).await?,
        };
        let manifest = load_manifest(&cluster, &id, options.max_templates).await?;
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
    /// The pages of the frame being prepared or restored.
    pinned: HashMap<Fingerprint, Bytes, ahash::RandomState>,
    /// Templates of that frame neither pinned nor cached: what `fetch` gets.
    wanted: HashSet<Fingerprint, ahash::RandomState>,
    /// Set by `restore`: the next `prepare` starts a new frame.
    restoring: bool,
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
        if m.restoring {
            m.pinned.clear();
            m.wanted.clear();
            m.restoring = false;
        }
        if m.pinned.contains_key(&fp) {
            return Ok(true);
        }
        if let Some(page) = self.shared.cache().get(&fp) {
            m.pinned.insert(fp, page);
            return Ok(true);
        }
        if !m.wanted.contains(&fp) {
            let limit = self.shared.options.max_frame_pages;
            if m.pinned.len() + m.wanted.len() >= limit {
                return Err(Error::LimitExceeded {
                    offset: 0,
                    field: "distinct templates of one frame",
                    value: (m.pinned.len() + m.wanted.len() + 1) as u64,
                    limit: limit as u64,
                });
            }
            m.wanted.insert(fp);
        }
        Ok(false)
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
        let mut m = lock(&self.migration);
        m.restoring = true;
        let page = match m.pinned.get(&fp) {
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
                        Some(page) => {
                            m.pinned.insert(fp, page);
                        }
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
                m.pinned.insert(fp, page);
            }
            Ok(())
        })
    }
}

/// The id of the catalog pushed last, from the first node that has one.
async fn current(cluster: &Cluster) -> Result<CatalogId> {
    let key = [CURRENT_KEY.to_vec()];
    let mut last_error = None;
    for i in 0..cluster.nodes().len() {
        match cluster.get_from(i, &key).await {
            Ok(values) => {
                let id = values.into_iter().next().flatten();
                if let Some(id) = id.and_then(|v| <[u8; 32]>::try_from(&v[..]).ok()) {
                    return Ok(CatalogId(id));
                }
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(no_catalog(
        last_error,
        "no node names a current catalog".into(),
    ))
}

/// Catalog `id`'s manifest, from the first node whose copy checks out.
async fn load_manifest(cluster: &Cluster, id: &CatalogId, max_templates: u64) -> Result<Manifest> {
    let key = [manifest_key(id)];
    let mut last_error = None;
    for i in 0..cluster.nodes().len() {
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
