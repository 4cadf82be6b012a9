//! What the ring's nodes hold, and under which keys (see `docs/dht.md`):
//!
//! | key | value | on |
//! |---|---|---|
//! | `mgs:t:` + 16-byte fingerprint | the template page | its R owner nodes |
//! | `mgs:m:` + 32-byte catalog id | the manifest: the catalog file's header and fingerprint table | every node |
//! | `mgs:current` | the 32-byte id of the catalog pushed last | every node |
//!
//! Templates are keyed by fingerprint, not by template number, so that catalogs
//! sharing pages share their keys and a node's answer can be checked on its own.
//! The manifest is on every node so a destination can start from any live one, and
//! it is the catalog file's own head so the same checks apply: a manifest is used
//! only if it hashes to the catalog id it is stored under.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::page::{FINGERPRINT_LEN, Fingerprint};
use crate::template::{Catalog, CatalogId, format};

/// Key prefix of a template page.
pub const TEMPLATE_PREFIX: &[u8] = b"mgs:t:";
/// Key prefix of a catalog's manifest.
pub const MANIFEST_PREFIX: &[u8] = b"mgs:m:";
/// Key of the id of the catalog pushed last.
pub const CURRENT_KEY: &[u8] = b"mgs:current";

/// The key of the template with fingerprint `fp`.
pub fn template_key(fp: &Fingerprint) -> Vec<u8> {
    [TEMPLATE_PREFIX, &fp.0[..]].concat()
}

/// The key of catalog `id`'s manifest.
pub fn manifest_key(id: &CatalogId) -> Vec<u8> {
    [MANIFEST_PREFIX, &id.0[..]].concat()
}

/// What a destination needs of a catalog to restore its templates from the ring:
/// the page size and the fingerprint of every template number.
#[derive(Clone, PartialEq, Eq)]
pub struct Manifest {
    page_size: u32,
    fingerprints: Vec<Fingerprint>,
    id: CatalogId,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("id", &self.id)
            .field("page_size", &self.page_size)
            .field("templates", &self.fingerprints.len())
            .finish()
    }
}

impl Manifest {
    /// The manifest of `catalog`.
    pub fn of(catalog: &Catalog) -> Self {
        Self {
            page_size: catalog.page_size() as u32,
            fingerprints: catalog.fingerprints().to_vec(),
            id: catalog.id(),
        }
    }

    /// The catalog's identity.
    pub fn id(&self) -> CatalogId {
        self.id
    }

    /// Bytes of every template page.
    pub fn page_size(&self) -> usize {
        self.page_size as usize
    }

    /// The fingerprints, in template order.
    pub fn fingerprints(&self) -> &[Fingerprint] {
        &self.fingerprints
    }

    /// The fingerprint of template number `n`.
    pub fn fingerprint(&self, n: u32) -> Option<Fingerprint> {
        self.fingerprints.get(n as usize).copied()
    }

    /// The stored form: the first `56 + 16 × N` bytes of the catalog file.
    pub fn encode(&self) -> Bytes {
        let header = format::Header {
            page_size: self.page_size,
            count: self.fingerprints.len() as u64,
            id: self.id,
        };
        let mut out = Vec::with_capacity(format::HEADER_LEN + self.fingerprints.len() * 16);
        out.extend_from_slice(&header.encode());
        self.fingerprints
            .iter()
            .for_each(|fp| out.extend_from_slice(&fp.0));
        out.into()
    }

    /// Parses a stored manifest and checks it: the catalog file's header checks,
    /// at most `max_templates` templates, a table that hashes to the id in the
    /// header, in strictly ascending order, and that id being `expected`.
    pub fn decode(bytes: &[u8], expected: &CatalogId, max_templates: u64) -> Result<Self> {
        let bad = |offset: usize, reason| Error::Malformed {
            offset: offset as u64,
            field: "dht manifest",
            reason,
        };
        let Some(head) = bytes.first_chunk::<{ format::HEADER_LEN }>() else {
            return Err(bad(bytes.len(), "shorter than a catalog header"));
        };
        let header = format::Header::parse(head, max_templates)?;
        let table = &bytes[format::HEADER_LEN..];
        if table.len() as u64 != header.count * FINGERPRINT_LEN as u64 {
            return Err(bad(
                format::HEADER_LEN,
                "table length differs from the count",
            ));
        }
        if header.id != *expected {
            return Err(bad(24, "the manifest of another catalog"));
        }
        Ok(Self {
            page_size: header.page_size,
            fingerprints: format::parse_table(&header, table)?,
            id: header.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_pages(4096, (1..=20u8).map(|b| vec![b; 4096])).unwrap()
    }

    #[test]
    fn manifest_round_trips_and_hashes_to_the_catalog_id() {
        let catalog = catalog();
        let bytes = Manifest::of(&catalog).encode();
        let mut file = Vec::new();
        catalog.write_to(&mut file).unwrap();
        assert_eq!(&bytes[..], &file[..bytes.len()]);
        let back = Manifest::decode(&bytes, &catalog.id(), 1 << 20).unwrap();
        assert_eq!(back, Manifest::of(&catalog));
        assert_eq!(back.fingerprint(3), catalog.fingerprint(3));
    }

    #[test]
    fn damaged_or_foreign_manifests_are_refused() {
        let catalog = catalog();
        let bytes = Manifest::of(&catalog).encode().to_vec();
        let id = catalog.id();
        for at in [0, 13, 23, 30, 60, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(Manifest::decode(&bad, &id, 1 << 20).is_err(), "byte {at}");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 16], &id, 1 << 20).is_err());
        assert!(Manifest::decode(&bytes, &CatalogId([1; 32]), 1 << 20).is_err());
        assert!(Manifest::decode(&bytes, &id, 19).is_err());
    }
}
