//! The catalog itself: the template pages and their fingerprints, in memory. At the
//! destination it is the local template store that restores referenced pages.

use std::fmt;

use super::CatalogId;
use super::format::MAX_TEMPLATES;
use crate::error::{Error, Result};
use crate::page::Fingerprint;

/// Template pages sorted by fingerprint, with the catalog's identity.
///
/// Templates are numbered `0..len()` in fingerprint order; the number is what a
/// template reference carries. Sorting makes the catalog canonical: one set of pages
/// gives one numbering and one [`CatalogId`], whatever order they were found in.
///
/// Every page matches its fingerprint: built catalogs compute them, loading checks
/// each page, and a catalog never changes afterwards. Restoring a template is
/// therefore a copy, with no hashing per page.
///
/// ```
/// use migstream::template::Catalog;
///
/// let pages = [[1u8; 1024], [2u8; 1024], [1u8; 1024]];
/// let catalog = Catalog::from_pages(1024, &pages)?;
/// assert_eq!(catalog.len(), 2); // one copy of each distinct page
/// let fp = migstream::page::Fingerprint::of(&pages[1]);
/// let n = catalog.find(&fp).expect("a template");
/// assert_eq!(catalog.get(n), Some(&pages[1][..]));
/// # Ok::<(), migstream::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Catalog {
    pub(super) page_size: u32,
    /// Strictly ascending.
    pub(super) fingerprints: Vec<Fingerprint>,
    /// `fingerprints.len()` pages, in the order of `fingerprints`.
    pub(super) pages: Vec<u8>,
    pub(super) id: CatalogId,
}

impl Catalog {
    /// A catalog of the distinct pages among `pages` (duplicates are kept once).
    ///
    /// Fails with [`Error::InvalidRecord`] if `page_size` is not a power of two from
    /// 1 KiB to 64 KiB or a page is not `page_size` bytes long.
    pub fn from_pages<P: AsRef<[u8]>>(
        page_size: usize,
        pages: impl IntoIterator<Item = P>,
    ) -> Result<Self> {
        let invalid = |reason| Error::InvalidRecord {
            field: "template page",
            reason,
        };
        if !page_size.is_power_of_two() || !(1024..=65536).contains(&page_size) {
            return Err(invalid("page size not a power of two from 1 KiB to 64 KiB"));
        }
        let mut entries = Vec::new();
        for page in pages {
            if page.as_ref().len() != page_size {
                return Err(invalid("length differs from the page size"));
            }
            entries.push((Fingerprint::of(page.as_ref()), page));
        }
        entries.sort_unstable_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        let mut bytes = Vec::with_capacity(entries.len() * page_size);
        entries
            .iter()
            .for_each(|e| bytes.extend_from_slice(e.1.as_ref()));
        let fingerprints = entries.into_iter().map(|e| e.0).collect();
        Ok(Self::from_sorted(page_size as u32, fingerprints, bytes))
    }

    /// The catalog of these templates: `fingerprints` strictly ascending, `pages`
    /// the matching pages in the same order (the caller's invariants).
    ///
    /// # Panics
    ///
    /// With more than [`MAX_TEMPLATES`] templates (16 TiB of 4 KiB pages).
    pub(super) fn from_sorted(
        page_size: u32,
        fingerprints: Vec<Fingerprint>,
        pages: Vec<u8>,
    ) -> Self {
        assert!(
            fingerprints.len() as u64 <= MAX_TEMPLATES,
            "too many templates"
        );
        debug_assert_eq!(pages.len(), fingerprints.len() * page_size as usize);
        let id = CatalogId::compute(page_size, &fingerprints);
        Self {
            page_size,
            fingerprints,
            pages,
            id,
        }
    }

    /// The catalog's identity, compared by both ends before any template is referenced.
    pub fn id(&self) -> CatalogId {
        self.id
    }

    /// Number of templates.
    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    /// Whether the catalog has no templates.
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// Bytes in every template page.
    pub fn page_size(&self) -> usize {
        self.page_size as usize
    }

    /// Template number `index`'s page.
    pub fn get(&self, index: u32) -> Option<&[u8]> {
        let ps = self.page_size();
        let start = (index as usize).checked_mul(ps)?;
        self.pages.get(start..start.checked_add(ps)?)
    }

    /// Template number `index`'s fingerprint.
    pub fn fingerprint(&self, index: u32) -> Option<Fingerprint> {
        self.fingerprints.get(index as usize).copied()
    }

    /// The fingerprints of all templates, in template order (ascending).
    pub fn fingerprints(&self) -> &[Fingerprint] {
        &self.fingerprints
    }

    /// The number of the template with fingerprint `fp` (binary search).
    pub fn find(&self, fp: &Fingerprint) -> Option<u32> {
        // at most MAX_TEMPLATES entries: every position fits a u32
        self.fingerprints.binary_search(fp).ok().map(|i| i as u32)
    }

    /// The template pages, one after the other in template order.
    pub(super) fn pages(&self) -> std::slice::ChunksExact<'_, u8> {
        self.pages.chunks_exact(self.page_size())
    }
}

/// Summary only: the pages may be gigabytes.
impl fmt::Debug for Catalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Catalog")
            .field("id", &self.id)
            .field("page_size", &self.page_size)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}
