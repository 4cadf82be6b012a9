//! # migstream
//!
//! Async Rust codecs for QEMU's live-migration wire format, built to deduplicate VM
//! memory while it is in flight between two unmodified QEMUs.
//!
//! The [`qemu`] module is the foundation: a sans-IO, byte-exact, zero-copy decoder
//! and encoder of QEMU 7.2 and 10.0 migration streams, also usable as tokio-util
//! `Decoder`/`Encoder` over any transport:
//!
//! ```
//! use futures::StreamExt;
//! use migstream::qemu::{QemuDecoder, Record};
//! use tokio_util::codec::FramedRead;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), migstream::Error> {
//! # let stream = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/qemu-7.2-pc-paused.mig"));
//! // any AsyncRead works: a TcpStream from QEMU, a file, a byte slice
//! let mut records = FramedRead::new(&stream[..], QemuDecoder::new());
//! let mut kinds = Vec::new();
//! while let Some(record) = records.next().await {
//!     kinds.push(match record? {
//!         Record::Header => "header",
//!         Record::Ram(_) => "ram",
//!         Record::Eof => "eof",
//!         _ => "other",
//!     });
//! }
//! assert_eq!(kinds.first(), Some(&"header"));
//! assert_eq!(kinds.last(), Some(&"other")); // the JSON device description
//! # Ok(())
//! # }
//! ```
//!
//! Errors about stream bytes carry the byte offset and the field: see [`Error`].
//!
//! # Features
//!
//! - `relay` (default): the two ends of a dedup link and the proxies (`relay`), with
//!   tokio's runtime and networking and mutual TLS (rustls with the ring provider).
//! - `dht` (default): TMDHT, templates on a ring of store nodes (`dht`), over any
//!   `dht::Node`.
//! - `redis` (default, implies `dht`): the ring's Redis node (`dht::RedisNode`,
//!   `dht::DhtTemplates::connect`) through the `redis` crate, most of the
//!   dependency tree.
//! - `zstd`: zstd compression of dedup batches ([`dedup::Compression`]), smaller
//!   than LZ4 and slower, for slow links.
//!
//! With `default-features = false` the codecs ([`qemu`], [`dedup`]), resolvers,
//! catalogs and XBZRLE build on tokio's I/O traits alone.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod cursor;
pub mod dedup;
#[cfg(feature = "dht")]
pub mod dht;
mod error;
#[cfg(feature = "relay")]
#[doc = include_str!("../docs/library.md")]
pub mod guide {}
#[cfg(any(fuzzing, test))]
pub mod fuzzing;
pub mod page;
pub mod qemu;
#[cfg(feature = "relay")]
pub mod relay;
pub mod resolve;
pub mod template;
mod varint;
pub mod xbzrle;

pub use error::{Error, ErrorKind, Result};
