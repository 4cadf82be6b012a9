//! The proxy-to-proxy dedup stream: QEMU's migration stream with page payloads
//! replaced by resolver references, batched and compressed, in length-prefixed
//! frames a reader can bound and skip. Sans-IO like [`crate::qemu`]. The format is
//! specified in `docs/wire-format.md`.
//!
//! ```
//! use bytes::BytesMut;
//! use migstream::dedup::{DedupDecoder, DedupEncoder};
//! use migstream::qemu::QemuDecoder;
//!
//! # let qemu_stream = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/qemu-7.2-pc-paused.mig"));
//! // source side: QEMU records in, frames out
//! let (mut records, mut enc) = (QemuDecoder::new(), DedupEncoder::with_default_resolvers());
//! let (mut input, mut wire) = (BytesMut::from(&qemu_stream[..]), BytesMut::new());
//! while let Some(record) = records.decode_eof(&mut input)? {
//!     enc.encode(&record, &mut wire)?;
//! }
//! enc.finish(&mut wire)?;
//! assert!(wire.len() < qemu_stream.len());
//!
//! // destination side: frames in, the source QEMU's exact bytes out
//! let mut dec = DedupDecoder::with_default_resolvers();
//! let mut qemu_out = Vec::new();
//! while let Some(bytes) = dec.decode_eof(&mut wire)? {
//!     qemu_out.extend_from_slice(&bytes);
//! }
//! assert_eq!(&qemu_out[..], &qemu_stream[..]);
//! # Ok::<(), migstream::Error>(())
//! ```

mod compress;
mod decode;
mod encode;
mod stream;
pub mod wire;

pub use compress::Compression;
pub use decode::DedupDecoder;
pub use encode::{DEFAULT_BATCH, DedupEncoder, MAX_FRAME_QEMU_BYTES};
pub use stream::DedupFrames;

use std::sync::Arc;

use crate::resolve::{
    Claim, DEFAULT_CACHE_BYTES, Fill, Restore, SeenBefore, SeenBeforeRestore, TemplateClaim,
    TemplateRestore, XbzrleDelta, XbzrleRestore,
};
use crate::template::{Catalog, TemplateIndex};

/// Default seen-before window: the last 65536 distinct pages (256 MiB of 4 KiB pages
/// at the destination, ~2.5 MiB at the source).
pub const DEFAULT_SEEN_WINDOW: u64 = 65536;

/// Caps on what a peer's frame can make the decoder hold.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest frame payload.
    pub max_frame: usize,
    /// Largest batch once decompressed.
    pub max_batch: usize,
    /// Most QEMU bytes held back from QEMU's EOF to the END frame (device
    /// description and what shares a batch with it).
    pub max_held: usize,
    /// Most QEMU bytes one DATA frame may stand for (a page claimed in a few bytes
    /// still makes a whole page).
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 32 << 20,
            max_batch: 32 << 20,
            max_held: 64 << 20,
            max_output: 64 << 20,
        }
    }
}

/// Counters of a dedup encoder or decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// QEMU stream bytes taken in (encoder) or given out (decoder).
    pub qemu_bytes: u64,
    /// Dedup stream bytes given out (encoder) or taken in (decoder).
    pub wire_bytes: u64,
    /// Pages by entry tag ([`crate::resolve::tag`]).
    pub pages: [u64; 256],
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            qemu_bytes: 0,
            wire_bytes: 0,
            pages: [0; 256],
        }
    }
}

impl DedupEncoder {
    /// An encoder with the built-in local resolvers, in this order: fill pages, XBZRLE
    /// deltas against a 64 MiB cache, seen-before with [`DEFAULT_SEEN_WINDOW`].
    pub fn with_default_resolvers() -> Self {
        Self::new(default_claims(None))
    }

    /// The built-in resolvers plus templates of the catalog `index` was built from
    /// (tried right after fill pages); the catalog's identity goes in the HELLO.
    pub fn with_templates(index: Arc<TemplateIndex>) -> Self {
        let id = index.id();
        Self::new(default_claims(Some(index))).with_catalog_id(id.0)
    }
}

impl DedupDecoder {
    /// The decoder matching [`DedupEncoder::with_default_resolvers`].
    pub fn with_default_resolvers() -> Self {
        Self::new(default_restores(None))
    }

    /// The decoder matching [`DedupEncoder::with_templates`]: refuses a stream that
    /// names another catalog than `catalog`.
    pub fn with_templates(catalog: Arc<Catalog>) -> Self {
        let id = catalog.id();
        Self::new(default_restores(Some(catalog))).with_catalog_id(id)
    }
}

fn default_claims(templates: Option<Arc<TemplateIndex>>) -> Vec<Box<dyn Claim>> {
    let mut claims: Vec<Box<dyn Claim>> = vec![Box::new(Fill)];
    if let Some(index) = templates {
        claims.push(Box::new(TemplateClaim::new(index)));
    }
    claims.push(Box::new(XbzrleDelta::new(DEFAULT_CACHE_BYTES)));
    claims.push(Box::new(SeenBefore::new(DEFAULT_SEEN_WINDOW)));
    claims
}

fn default_restores(catalog: Option<Arc<Catalog>>) -> Vec<Box<dyn Restore>> {
    let mut restores: Vec<Box<dyn Restore>> = vec![Box::new(Fill)];
    if let Some(catalog) = catalog {
        restores.push(Box::new(TemplateRestore::new(catalog)));
    }
    restores.push(Box::new(XbzrleRestore::new(DEFAULT_CACHE_BYTES)));
    restores.push(Box::new(SeenBeforeRestore::new(DEFAULT_SEEN_WINDOW)));
    restores
}
