//! TMDHT: template pages served by a ring of store nodes in the destination data
//! center, for when the template set outgrows one host or must survive losing one.
//!
//! - [`Ring`] places each template on `R` nodes of a configured membership list by
//!   rendezvous hashing of its fingerprint;
//! - [`Node`] is what a store node must do (batched get and set), implemented by
//!   `RedisNode` (a Redis server, pipelined over one connection, reconnecting;
//!   feature `redis`) and [`MemoryNode`] (in-process, for tests and demos);
//! - [`Cluster`] is a ring and its nodes, and fetches templates batched per node,
//!   with bounded requests in flight, falling over to a replica when a node fails,
//!   times out or answers with a page that does not match its fingerprint;
//! - [`push`] and [`verify`] seed a ring with a catalog and check it;
//! - [`DhtTemplates`] is a [`TemplateStore`](crate::resolve::TemplateStore): the
//!   destination's template resolver over the ring, with a bounded LRU cache of hot
//!   templates shared by every migration it serves.
//!
//! The key layout is in [`layout`] and `docs/dht.md`.
//!
//! The Redis node needs the `redis` feature (on by default).
//!
//! ```no_run
//! # #[cfg(feature = "redis")] {
//! use migstream::dedup::{Decoded, DedupDecoder};
//! use migstream::dht::{DhtOptions, DhtTemplates};
//! use migstream::resolve::TemplateStore;
//!
//! # async fn run() -> migstream::Result<()> {
//! let urls = ["redis://10.0.0.1:6379".to_string(), "redis://10.0.0.2:6379".to_string()];
//! // the catalog pushed last (`catalog push`), its manifest checked against its id
//! let store = DhtTemplates::connect(&urls, 2, DhtOptions::default()).await?;
//! let (templates, mut fetch) = store.open();
//! let mut decoder = DedupDecoder::with_template_resolver(templates, store.catalog_id())?;
//! # let mut input = bytes::BytesMut::new();
//! loop {
//!     match decoder.decode(&mut input)? {
//!         Decoded::Qemu(qemu_bytes) => { /* to the destination QEMU */ }
//!         // (`relay::decode_stream` restores the frames before the one that waits
//!         // while it fetches: see `Decoded::Fetch`)
//!         Decoded::Fetch => fetch.as_mut().expect("a fetcher").fetch().await?,
//!         _ => break, // read more input, or the stream is complete
//!     }
//! }
//! # Ok(())
//! # }
//! # }
//! ```

mod cache;
mod cluster;
pub mod layout;
mod memory;
mod node;
#[cfg(feature = "redis")]
mod redis_node;
#[cfg(feature = "redis")]
mod redis_tls;
mod ring;
mod seed;
mod store;

pub use cluster::Cluster;
pub use layout::Manifest;
pub use memory::MemoryNode;
pub use node::{Node, NodeFuture, Timeouts};
#[cfg(feature = "redis")]
pub use redis_node::RedisNode;
#[cfg(feature = "redis")]
pub use redis_tls::RedisTls;
pub use ring::{DEFAULT_REPLICAS, Ring};
pub use seed::{NodeCheck, PushReport, VerifyReport, push, verify};
pub use store::DhtTemplates;

use std::time::Duration;

/// Tuning of a [`Cluster`] and a [`DhtTemplates`] store. Every bound on memory is
/// here; nothing is sized by what a peer sends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DhtOptions {
    /// Connect and request timeouts of Redis nodes; a batch to any node is also
    /// abandoned after `connect + request`.
    pub timeouts: Timeouts,
    /// Keys per request to one node (MGET / MSET size).
    pub batch: usize,
    /// Requests in flight at once, over all nodes, per fetch or push.
    pub in_flight: usize,
    /// For this long after a node failed, it is asked last (after its replicas).
    pub retry_after: Duration,
    /// Pages the store's LRU cache of hot templates keeps (shared by migrations).
    pub cache_pages: usize,
    /// Most distinct templates one dedup frame may need: what a migration pins
    /// while the frame is fetched and restored.
    pub max_frame_pages: usize,
    /// Most templates a manifest may list.
    pub max_templates: u64,
    /// TLS settings of `rediss://` nodes (a private CA, a client certificate);
    /// `None`: such nodes trust the system's roots. Refused for `redis://` nodes.
    #[cfg(feature = "redis")]
    pub redis_tls: Option<RedisTls>,
}

impl Default for DhtOptions {
    /// 256 keys per request (1 MiB answers of 4 KiB pages), 8 in flight, 64 MiB
    /// of 4 KiB pages cached, 16384 pages per frame (the decoder's default
    /// `max_output`, 64 MiB, of 4 KiB pages), manifests up to 2^26 templates.
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            batch: 256,
            in_flight: 8,
            retry_after: Duration::from_secs(1),
            cache_pages: 16384,
            max_frame_pages: 16384,
            max_templates: 1 << 26,
            #[cfg(feature = "redis")]
            redis_tls: None,
        }
    }
}
