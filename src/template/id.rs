//! The catalog's identity: what the two proxies compare in their handshake to be
//! sure a template reference means the same page at both ends.

use std::fmt;

use crate::page::Fingerprint;

/// BLAKE3 key-derivation context of the identity digest. It names the format
/// version, so a future format cannot produce the identity of a version-1 catalog.
const CONTEXT: &str = "migstream template catalog v1 identity";

/// A catalog's identity: 32 bytes of BLAKE3 over its page size, its template count
/// and its fingerprint table (sorted, so the identity does not depend on the order
/// the templates were found in).
///
/// The pages themselves are covered through their fingerprints: a catalog is only
/// ever loaded after every page was checked against its fingerprint, so two
/// catalogs with one identity hold the same pages unless BLAKE3-128 collides, the
/// same assumption page references on the wire already rest on. Hashing the table
/// rather than the pages lets the source, which does not keep the pages, verify the
/// identity from the table alone.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CatalogId(pub [u8; 32]);

impl CatalogId {
    /// The identity of a catalog of `page_size`-byte pages with these fingerprints,
    /// in table order (also of a DHT manifest, which has no pages).
    pub(crate) fn compute(page_size: u32, fingerprints: &[Fingerprint]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&page_size.to_be_bytes());
        h.update(&(fingerprints.len() as u64).to_be_bytes());
        for fp in fingerprints {
            h.update(&fp.0);
        }
        Self(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for CatalogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CatalogId({self})")
    }
}

impl fmt::Display for CatalogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
