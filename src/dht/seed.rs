//! Seeding a ring with a catalog ([`push`]) and checking that it holds it
//! ([`verify`]): the operator's side of TMDHT, used by `examples/catalog.rs`.
//!
//! Both walk the catalog node by node, in batches of [`DhtOptions::batch`]
//! templates, at most [`DhtOptions::in_flight`] batches at once: memory stays at a
//! few batches of pages whatever the catalog's size.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;

use super::DhtOptions;
use super::cluster::Cluster;
use super::layout::{CURRENT_KEY, Manifest, manifest_key, template_key};
use super::node::node_error;
use crate::error::{Error, Result};
use crate::template::Catalog;

/// What [`push`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PushReport {
    /// Templates of the catalog.
    pub templates: usize,
    /// Per node, in membership order: its name and the templates it now holds.
    pub per_node: Vec<(String, usize)>,
    /// Time taken.
    pub elapsed: Duration,
}

/// What [`verify`] found on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeCheck {
    /// The node's name.
    pub name: String,
    /// Templates the ring places on it.
    pub assigned: usize,
    /// Of those, how many it holds byte for byte.
    pub present: usize,
    /// How many it does not hold.
    pub missing: usize,
    /// How many it holds with other bytes.
    pub wrong: usize,
    /// Whether it holds the catalog's manifest, valid.
    pub manifest: bool,
    /// Whether its current-catalog pointer names this catalog.
    pub current: bool,
    /// The first request error, if the node failed.
    pub error: Option<String>,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Per node, in membership order.
    pub nodes: Vec<NodeCheck>,
    /// Templates of the catalog.
    pub templates: usize,
    /// Templates of which no node holds a correct copy.
    pub lost: usize,
}

impl VerifyReport {
    /// Template copies missing or wrong, over all nodes.
    pub fn missing(&self) -> usize {
        self.nodes.iter().map(|n| n.missing + n.wrong).sum()
    }

    /// The most templates on one node divided by the mean (1.0 is perfect).
    pub fn balance(&self) -> f64 {
        balance(self.nodes.iter().map(|n| n.assigned))
    }

    /// Whether every template is on all its nodes and every node has the manifest.
    pub fn ok(&self) -> bool {
        self.missing() == 0 && self.nodes.iter().all(|n| n.manifest && n.error.is_none())
    }
}

/// The most of `counts` divided by their mean.
pub(super) fn balance(counts: impl Iterator<Item = usize> + Clone) -> f64 {
    let (n, sum) = counts
        .clone()
        .fold((0usize, 0usize), |(n, s), c| (n + 1, s + c));
    let max = counts.max().unwrap_or(0);
    match sum {
        0 => 1.0,
        _ => max as f64 * n as f64 / sum as f64,
    }
}

/// Template numbers placed on each node.
fn placement(cluster: &Cluster, catalog: &Catalog) -> Vec<Vec<u32>> {
    let mut per_node = vec![Vec::new(); cluster.nodes().len()];
    for (n, fp) in catalog.fingerprints().iter().enumerate() {
        for node in cluster.ring().owners(fp) {
            per_node[node].push(n as u32);
        }
    }
    per_node
}

/// Batches of `(node, template numbers)`, `batch` templates each.
fn batches(per_node: &[Vec<u32>], batch: usize) -> Vec<(usize, Vec<u32>)> {
    per_node
        .iter()
        .enumerate()
        .flat_map(|(node, templates)| {
            templates
                .chunks(batch.max(1))
                .map(move |chunk| (node, chunk.to_vec()))
        })
        .collect()
}

/// Stores `catalog` on `cluster`: every template on its owners, then the manifest
/// and the current-catalog pointer on every node (so a destination that finds
/// the pointer finds the templates). Idempotent: pushing again repairs a node that
/// lost its data. Fails at the first node error ([`Error::Config`] naming the node
/// if it refused the credentials or its TLS certificate was refused).
pub async fn push(cluster: &Arc<Cluster>, catalog: &Catalog) -> Result<PushReport> {
    let started = Instant::now();
    let options: &DhtOptions = cluster.options();
    let per_node = placement(cluster, catalog);
    let mut work = batches(&per_node, options.batch).into_iter();
    let mut tasks = JoinSet::new();
    let spawn = |tasks: &mut JoinSet<io::Result<()>>, (node, templates): (usize, Vec<u32>)| {
        let entries: Vec<(Vec<u8>, Bytes)> = templates
            .iter()
            .map(|&n| {
                let fp = catalog.fingerprint(n).expect("a template number");
                let page = catalog.get(n).expect("a template number");
                (template_key(&fp), Bytes::copy_from_slice(page))
            })
            .collect();
        let node = cluster.nodes()[node].clone();
        tasks.spawn(async move { node.set_many(&entries).await });
    };
    for job in work.by_ref().take(options.in_flight.max(1)) {
        spawn(&mut tasks, job);
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| Error::Io(io::Error::other(e)))?
            .map_err(node_error)?;
        if let Some(job) = work.next() {
            spawn(&mut tasks, job);
        }
    }
    let manifest = Manifest::of(catalog).encode();
    let id = Bytes::copy_from_slice(&catalog.id().0);
    let entries = [
        (manifest_key(&catalog.id()), manifest),
        (CURRENT_KEY.to_vec(), id),
    ];
    for node in cluster.nodes() {
        // the manifest before the pointer: a reader never sees a pointer without it
        node.set_many(&entries[..1]).await.map_err(node_error)?;
        node.set_many(&entries[1..]).await.map_err(node_error)?;
    }
    Ok(PushReport {
        templates: catalog.len(),
        per_node: cluster
            .nodes()
            .iter()
            .zip(&per_node)
            .map(|(node, t)| (node.name().to_string(), t.len()))
            .collect(),
        elapsed: started.elapsed(),
    })
}

/// Checks that `cluster` holds `catalog`: every template byte for byte on each of
/// its owners, the manifest on every node. A node that fails counts all its
/// templates as missing.
pub async fn verify(cluster: &Arc<Cluster>, catalog: &Catalog) -> Result<VerifyReport> {
    let options = cluster.options();
    let per_node = placement(cluster, catalog);
    let mut checks: Vec<NodeCheck> = cluster
        .nodes()
        .iter()
        .zip(&per_node)
        .map(|(node, t)| NodeCheck {
            name: node.name().to_string(),
            assigned: t.len(),
            present: 0,
            missing: 0,
            wrong: 0,
            manifest: false,
            current: false,
            error: None,
        })
        .collect();
    let mut good = vec![false; catalog.len()];
    let mut work = batches(&per_node, options.batch).into_iter();
    let mut tasks = JoinSet::new();
    let spawn = |tasks: &mut JoinSet<_>, (node, templates): (usize, Vec<u32>)| {
        let keys: Vec<Vec<u8>> = templates
            .iter()
            .map(|&n| template_key(&catalog.fingerprint(n).expect("a template number")))
            .collect();
        let cluster = cluster.clone();
        tasks.spawn(async move {
            let answer = cluster.get_from(node, &keys).await;
            (node, templates, answer)
        });
    };
    for job in work.by_ref().take(options.in_flight.max(1)) {
        spawn(&mut tasks, job);
    }
    while let Some(done) = tasks.join_next().await {
        let (node, templates, answer) = done.map_err(|e| Error::Io(io::Error::other(e)))?;
        if let Some(job) = work.next() {
            spawn(&mut tasks, job);
        }
        let check = &mut checks[node];
        match answer {
            Ok(values) => {
                for (n, value) in templates.into_iter().zip(values) {
                    match value {
                        None => check.missing += 1,
                        Some(v) if Some(&v[..]) == catalog.get(n) => {
                            check.present += 1;
                            good[n as usize] = true;
                        }
                        Some(_) => check.wrong += 1,
                    }
                }
            }
            Err(e) => {
                check.missing += templates.len();
                check.error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let keys = [manifest_key(&catalog.id()), CURRENT_KEY.to_vec()];
    for (i, check) in checks.iter_mut().enumerate() {
        match cluster.get_from(i, &keys).await {
            Ok(values) => {
                let manifest = values[0].as_ref().is_some_and(|m| {
                    Manifest::decode(m, &catalog.id(), options.max_templates).is_ok()
                });
                check.manifest = manifest;
                check.current = values[1].as_deref() == Some(&catalog.id().0[..]);
            }
            Err(e) => {
                check.error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let lost = good.iter().filter(|&&g| !g).count();
    Ok(VerifyReport {
        nodes: checks,
        templates: catalog.len(),
        lost,
    })
}
