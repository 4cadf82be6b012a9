//! The proxy-to-proxy dedup stream: QEMU's migration stream with page payloads
//! replaced by resolver references, batched and compressed, in length-prefixed
//! frames a reader can bound and skip. Sans-IO like [`crate::qemu`]. The format is
//! specified in `docs/wire-format.md`.
//!
//! ```
//! use bytes::BytesMut;
//! use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
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
//! while let Decoded::Qemu(bytes) = dec.decode_eof(&mut wire)? {
//!     qemu_out.extend_from_slice(&bytes);
//! }
//! assert_eq!(&qemu_out[..], &qemu_stream[..]);
//! # Ok::<(), migstream::Error>(())
//! ```

mod compress;
mod decode;
mod encode;
pub(crate) mod lz4;
mod reply;
mod stream;
pub mod wire;

pub use compress::Compression;
pub use decode::{Decoded, DedupDecoder};
pub use encode::{DEFAULT_BATCH, DedupEncoder, MAX_FRAME_QEMU_BYTES};
pub use reply::{MAX_REASON, MAX_RETURN_CHUNK, Reply, ReplyDecoder};
pub use stream::DedupFrames;

use std::sync::Arc;

#[cfg(doc)]
use crate::resolve::TemplateStore;
use crate::resolve::{
    Claim, DEFAULT_CACHE_BYTES, Fill, Restore, SeenBefore, SeenBeforeRestore, TemplateClaim,
    TemplateRestore, XbzrleDelta, XbzrleRestore,
};
use crate::template::{Catalog, CatalogId, TemplateIndex};

/// Seen-before window of the dedup stream: 256 MiB of pages (65536 pages of 4 KiB)
/// held at the destination, ~2.5 MiB of index at the source for 4 KiB pages. Fixed in
/// bytes, not pages, so that a peer naming a larger page size cannot make the
/// destination hold more.
pub const SEEN_WINDOW_BYTES: usize = 256 << 20;

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

/// Which built-in resolvers a [`DedupEncoder`] runs, tried in this order: fill pages,
/// templates, XBZRLE deltas (64 MiB cache), seen-before ([`SEEN_WINDOW_BYTES`]).
/// The decoders of [`DedupDecoder::with_default_resolvers`] and its siblings
/// understand every combination.
#[derive(Debug, Clone)]
pub struct Resolvers {
    /// Pages filled with one byte value.
    pub fill: bool,
    /// Pages of the catalog this index was built from.
    pub templates: Option<Arc<TemplateIndex>>,
    /// XBZRLE deltas against the last version of a page sent.
    pub xbzrle: bool,
    /// References to pages already sent in this migration.
    pub seen: bool,
    /// Keep the seen-before window's pages at the source too
    /// ([`SeenBefore::holding`]): up to [`SEEN_WINDOW_BYTES`] (256 MiB),
    /// for a repeated page confirmed by comparing bytes instead of a BLAKE3.
    pub hold_seen: bool,
}

impl Default for Resolvers {
    /// Every local resolver; no templates.
    fn default() -> Self {
        Self {
            fill: true,
            templates: None,
            xbzrle: true,
            seen: true,
            hold_seen: false,
        }
    }
}

impl Resolvers {
    /// The resolver chain.
    pub fn claims(&self) -> Vec<Box<dyn Claim>> {
        let mut claims: Vec<Box<dyn Claim>> = Vec::new();
        if self.fill {
            claims.push(Box::new(Fill));
        }
        if let Some(index) = &self.templates {
            claims.push(Box::new(TemplateClaim::new(index.clone())));
        }
        if self.xbzrle {
            claims.push(Box::new(XbzrleDelta::new(DEFAULT_CACHE_BYTES)));
        }
        match (self.seen, self.hold_seen) {
            (true, false) => claims.push(Box::new(SeenBefore::new(SEEN_WINDOW_BYTES))),
            (true, true) => claims.push(Box::new(SeenBefore::holding(SEEN_WINDOW_BYTES))),
            (false, _) => {}
        }
        claims
    }
}

impl DedupEncoder {
    /// An encoder running `resolvers`; the template catalog's identity, if any, goes
    /// in the HELLO.
    pub fn with_resolvers(resolvers: &Resolvers) -> Self {
        let encoder = Self::new(resolvers.claims()).expect(BUILT_IN);
        match &resolvers.templates {
            Some(index) => encoder.with_catalog_id(index.id()),
            None => encoder,
        }
    }

    /// An encoder with every built-in local resolver ([`Resolvers::default`]).
    pub fn with_default_resolvers() -> Self {
        Self::with_resolvers(&Resolvers::default())
    }

    /// The built-in resolvers plus templates of the catalog `index` was built from.
    pub fn with_templates(index: Arc<TemplateIndex>) -> Self {
        Self::with_resolvers(&Resolvers {
            templates: Some(index),
            ..Resolvers::default()
        })
    }
}

impl DedupDecoder {
    /// A decoder for streams of any [`Resolvers`] without templates.
    pub fn with_default_resolvers() -> Self {
        Self::new(default_restores(None)).expect(BUILT_IN)
    }

    /// A decoder for streams of any [`Resolvers`], templates of `catalog` included;
    /// refuses a stream that names another catalog.
    pub fn with_templates(catalog: Arc<Catalog>) -> Self {
        let id = catalog.id();
        Self::with_template_resolver(Box::new(TemplateRestore::new(catalog)), id).expect(BUILT_IN)
    }

    /// Like [`with_templates`](Self::with_templates) with templates of catalog `id`
    /// restored by `templates` (e.g. from [`TemplateStore::open`]). Fails with
    /// [`Error::Config`](crate::Error::Config) unless `templates` has the TEMPLATE
    /// tag.
    pub fn with_template_resolver(
        templates: Box<dyn Restore>,
        id: CatalogId,
    ) -> crate::Result<Self> {
        if templates.tag() != crate::resolve::tag::TEMPLATE {
            return Err(crate::Error::Config {
                what: "resolvers",
                reason: format!("a template resolver with tag {:#04x}", templates.tag()),
            });
        }
        Ok(Self::new(default_restores(Some(templates)))
            .expect(BUILT_IN)
            .with_catalog_id(id))
    }
}

/// The built-in resolvers have distinct tags of their own.
const BUILT_IN: &str = "the built-in resolvers' tags are valid and distinct";

fn default_restores(templates: Option<Box<dyn Restore>>) -> Vec<Box<dyn Restore>> {
    let mut restores: Vec<Box<dyn Restore>> = vec![Box::new(Fill)];
    restores.extend(templates);
    restores.push(Box::new(XbzrleRestore::new(DEFAULT_CACHE_BYTES)));
    restores.push(Box::new(SeenBeforeRestore::new(SEEN_WINDOW_BYTES)));
    restores
}
