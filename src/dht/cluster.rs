//! A ring and its nodes: where every template is, which nodes failed lately, and
//! the batched, verified, failing-over fetch of templates.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::task::JoinSet;

use super::DhtOptions;
use super::layout::template_key;
use super::node::{Node, is_refusal};
#[cfg(feature = "redis")]
use super::redis_node::RedisNode;
use super::ring::Ring;
use crate::error::{Error, Result};
use crate::page::Fingerprint;

/// Store nodes, the placement of templates over them, and their recent failures.
///
/// Cheap to share (`Arc`): one cluster serves every store and migration of a
/// process, so each node has one connection.
pub struct Cluster {
    ring: Ring,
    nodes: Vec<Arc<dyn Node>>,
    /// When each node last failed, if it has not answered since.
    failed: Vec<Mutex<Option<Instant>>>,
    options: DhtOptions,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name()).collect();
        f.debug_struct("Cluster")
            .field("nodes", &names)
            .field("replicas", &self.ring.replicas())
            .finish_non_exhaustive()
    }
}

/// One template being looked for: its owners, best first, and how far down the
/// list the search is.
struct Want {
    fp: Fingerprint,
    owners: Vec<usize>,
    next: usize,
    /// Whether some owner answered without a correct copy (rather than failing).
    answered: bool,
}

/// What one batch to one node came back with.
enum Answer {
    /// The node answered; per template, its verified page or `None`.
    Pages(Vec<(Want, Option<Bytes>)>),
    /// The node failed or timed out.
    Failed(Vec<Want>),
}

impl Cluster {
    /// A cluster of `nodes` (their names are the ring's membership list) keeping
    /// `replicas` copies of every template.
    pub fn new(nodes: Vec<Arc<dyn Node>>, replicas: usize, options: DhtOptions) -> Result<Self> {
        let names: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
        let ring = Ring::new(&names, replicas)?;
        let failed = nodes.iter().map(|_| Mutex::new(None)).collect();
        Ok(Self {
            ring,
            nodes,
            failed,
            options,
        })
    }

    /// A cluster of Redis servers at `urls` (`redis://[[USER]:PASSWORD@]host:port`,
    /// or `rediss://` with [`DhtOptions::redis_tls`]), in any order: a node's URL
    /// less its credentials is its identity in the ring, so every host must spell it
    /// alike. Nothing is connected yet.
    ///
    /// Fails with [`Error::Config`] for a URL that does not parse or TLS settings
    /// given for a `redis://` node.
    #[cfg(feature = "redis")]
    pub fn redis<S: AsRef<str>>(urls: &[S], replicas: usize, options: DhtOptions) -> Result<Self> {
        let nodes = urls
            .iter()
            .map(|url| {
                let node = RedisNode::with_tls(
                    url.as_ref(),
                    options.timeouts,
                    options.redis_tls.as_ref(),
                )?;
                Ok(Arc::new(node) as Arc<dyn Node>)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(nodes, replicas, options)
    }

    /// The placement.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The nodes, in membership order.
    pub fn nodes(&self) -> &[Arc<dyn Node>] {
        &self.nodes
    }

    /// The options it was made with.
    pub fn options(&self) -> &DhtOptions {
        &self.options
    }

    /// The owners of `fp`, best first, nodes that failed lately moved last.
    pub fn owners(&self, fp: &Fingerprint) -> Vec<usize> {
        let mut owners = self.ring.owners(fp);
        owners.sort_by_key(|&i| self.failed_lately(i)); // stable: ring order otherwise
        owners
    }

    /// Asks node `i` for the values of `keys`, within the batch deadline; records
    /// the node's failure or recovery.
    pub async fn get_from(&self, i: usize, keys: &[Vec<u8>]) -> io::Result<Vec<Option<Bytes>>> {
        let deadline = self.options.timeouts.connect + self.options.timeouts.request;
        let answer = tokio::time::timeout(deadline, self.nodes[i].get_many(keys)).await;
        let answer = answer.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{}: no answer within {deadline:?}", self.nodes[i].name()),
            ))
        });
        match answer {
            Ok(values) if values.len() == keys.len() => {
                self.record(i, false);
                Ok(values)
            }
            Ok(_) => {
                self.record(i, true);
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: wrong number of values", self.nodes[i].name()),
                ))
            }
            Err(e) => {
                self.record(i, true);
                Err(e)
            }
        }
    }

    /// Fetches the pages of `wanted` (distinct fingerprints) from their owners:
    /// batched per node, at most `in_flight` requests at once, each page checked
    /// against its fingerprint and `page_size`. A node that fails, times out, lacks
    /// a page or answers a wrong one is passed over for the next owner.
    ///
    /// Fails with [`Error::Unresolved`] naming the first fingerprint no owner could
    /// give. Must run inside a tokio runtime (requests are spawned tasks).
    pub async fn fetch(
        self: &Arc<Self>,
        wanted: &[Fingerprint],
        page_size: usize,
    ) -> Result<Vec<(Fingerprint, Bytes)>> {
        let mut pending: Vec<Want> = wanted
            .iter()
            .map(|&fp| Want {
                fp,
                owners: self.owners(&fp),
                next: 0,
                answered: false,
            })
            .collect();
        let mut found = Vec::with_capacity(wanted.len());
        // each round asks every pending template's next owner: at most R rounds
        while !pending.is_empty() {
            let mut by_node: HashMap<usize, Vec<Want>> = HashMap::new();
            for want in pending.drain(..) {
                let Some(&node) = want.owners.get(want.next) else {
                    return Err(unresolved(&want));
                };
                by_node.entry(node).or_default().push(want);
            }
            let mut batches = Vec::new();
            for (node, mut wants) in by_node {
                while !wants.is_empty() {
                    let rest = wants.split_off(wants.len().min(self.options.batch.max(1)));
                    batches.push((node, std::mem::replace(&mut wants, rest)));
                }
            }
            let mut tasks = JoinSet::new();
            let mut batches = batches.into_iter();
            for (node, wants) in batches.by_ref().take(self.options.in_flight.max(1)) {
                tasks.spawn(self.clone().ask(node, wants, page_size));
            }
            while let Some(answer) = tasks.join_next().await {
                let answer = answer.map_err(|e| Error::Io(io::Error::other(e)))?;
                if let Some((node, wants)) = batches.next() {
                    tasks.spawn(self.clone().ask(node, wants, page_size));
                }
                match answer {
                    Answer::Pages(pages) => {
                        for (mut want, page) in pages {
                            match page {
                                Some(page) => found.push((want.fp, page)),
                                None => {
                                    want.next += 1;
                                    want.answered = true;
                                    pending.push(want);
                                }
                            }
                        }
                    }
                    Answer::Failed(wants) => pending.extend(wants.into_iter().map(|mut w| {
                        w.next += 1;
                        w
                    })),
                }
            }
        }
        Ok(found)
    }

    /// One batch to one node; pages are verified here, in the task, so that a
    /// multi-threaded runtime hashes them on every core.
    async fn ask(self: Arc<Self>, node: usize, wants: Vec<Want>, page_size: usize) -> Answer {
        let keys: Vec<Vec<u8>> = wants.iter().map(|w| template_key(&w.fp)).collect();
        match self.get_from(node, &keys).await {
            Ok(values) => Answer::Pages(
                wants
                    .into_iter()
                    .zip(values)
                    .map(|(want, page)| {
                        let wrong = page
                            .as_ref()
                            .is_some_and(|p| p.len() != page_size || !want.fp.matches(p));
                        if wrong {
                            tracing::warn!(
                                node = self.nodes[node].name(),
                                fingerprint = %want.fp,
                                "dht: a node answered a wrong page; asking the next owner"
                            );
                        }
                        (want, page.filter(|_| !wrong))
                    })
                    .collect(),
            ),
            Err(e) => {
                if is_refusal(&e) {
                    // configured wrongly, not down: its replicas serve meanwhile
                    tracing::warn!("dht: {e}");
                } else {
                    tracing::warn!(
                        node = self.nodes[node].name(),
                        pages = wants.len(),
                        error = %e,
                        "dht: node failed or timed out; its replicas serve"
                    );
                }
                Answer::Failed(wants)
            }
        }
    }

    fn failed_lately(&self, i: usize) -> bool {
        let failed = *self.failed[i].lock().unwrap_or_else(|e| e.into_inner());
        failed.is_some_and(|at| at.elapsed() < self.options.retry_after)
    }

    fn record(&self, i: usize, failed: bool) {
        let mut at = self.failed[i].lock().unwrap_or_else(|e| e.into_inner());
        *at = failed.then(Instant::now);
    }
}

fn unresolved(want: &Want) -> Error {
    Error::Unresolved {
        resolver: "dht",
        fingerprint: want.fp,
        reason: match want.answered {
            true => "no live node holding it has a correct copy",
            false => "every node holding it is down or timed out",
        },
    }
}
