//! The source's view of a catalog: which template, if any, a page is, without
//! keeping the template pages (or, if the source can afford them, holding them to
//! confirm hits by comparing bytes: [`TemplateIndex::holding`]).
//!
//! Memory: an open-addressing table of 16-byte slots (a `u64` pre-filter value and a
//! `u32` template number, padded), 1.5 slots per template (load factor 2/3, where
//! linear probing averages 2 probes for a hit and 5 for a miss, in one or two cache
//! lines), plus the 16-byte fingerprint of every template:
//! `1.5 × 16 + 16 = 40` bytes per template, 40 MB for a million templates (see
//! [`TemplateIndex::heap_bytes`]).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::format;
use super::{Catalog, CatalogId};
use crate::error::Result;
use crate::page::{self, Fingerprint};

/// Marks an empty slot: never a template number (see [`format::MAX_TEMPLATES`]).
const EMPTY: u32 = u32::MAX;

/// Maps a page to its template number and fingerprint, for the source side.
///
/// A page is looked up by its fast [`page::prefilter`] value; a hit is then
/// confirmed by computing the page's [`Fingerprint`] and comparing it with the
/// template's, or, by an index [`holding`](Self::holding) the catalog, by comparing
/// the page with the template's bytes (about a tenth of the cost of BLAKE3 over a
/// page, for the catalog's pages in memory). A pre-filter hit alone is never
/// trusted: guest memory is attacker-controlled and the pre-filter is not collision
/// resistant. A page that is not a template costs one pre-filter hash and, unless its
/// pre-filter value collides with a template's, nothing more.
///
/// Two templates with one pre-filter value (for a million templates, a chance of
/// about 3·10⁻⁸) keep only the lower-numbered one in the table: the other is never
/// found, a missed deduplication and never a wrong one.
#[derive(Debug, Clone)]
pub struct TemplateIndex {
    slots: Vec<Slot>,
    fingerprints: Vec<Fingerprint>,
    page_size: usize,
    id: CatalogId,
    /// The catalog itself, when hits are confirmed by comparing bytes.
    pages: Option<Arc<Catalog>>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    prefilter: u64,
    template: u32,
}

impl TemplateIndex {
    /// Indexes the templates of `catalog`.
    pub fn new(catalog: &Catalog) -> Self {
        let mut index = Self::empty(
            catalog.page_size(),
            catalog.fingerprints().to_vec(),
            catalog.id(),
        );
        for (n, page) in catalog.pages().enumerate() {
            index.insert(page::prefilter(page), n as u32);
        }
        index
    }

    /// Indexes the templates of `catalog` and keeps it, to confirm a hit by comparing
    /// the page with the template instead of hashing the page: faster, for the
    /// catalog's size in memory (shared with every other holder of the `Arc`).
    /// A catalog's pages match their fingerprints (see [`Catalog`]), so equal bytes
    /// are as good a confirmation as an equal fingerprint.
    pub fn holding(catalog: Arc<Catalog>) -> Self {
        Self {
            pages: Some(catalog.clone()),
            ..Self::new(&catalog)
        }
    }

    /// Indexes the catalog file at `path` (see [`from_reader`](Self::from_reader)).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        read(&mut file, Some(len))
    }

    /// Indexes a catalog file read from `r`, holding one megabyte of pages at a time.
    ///
    /// The header, the identity digest and the order of the fingerprint table are
    /// checked as by [`Catalog::load`]; the pages are read only for their pre-filter
    /// values and not checked against their fingerprints: a damaged page can only
    /// cause misses, since every hit is confirmed against the verified table. The
    /// pre-filter values are not stored in the file: they are keyed at random per
    /// process (see [`page::prefilter`]).
    pub fn from_reader(mut r: impl Read) -> Result<Self> {
        read(&mut r, None)
    }

    /// The template number and fingerprint of `page`, if it is a template.
    pub fn lookup(&self, page: &[u8]) -> Option<(u32, Fingerprint)> {
        self.lookup_hashed(page::prefilter(page), page)
    }

    /// [`lookup`](Self::lookup) of a page whose [`page::prefilter`] is known.
    pub(crate) fn lookup_hashed(&self, prefilter: u64, page: &[u8]) -> Option<(u32, Fingerprint)> {
        if page.len() != self.page_size {
            return None;
        }
        let template = self.probe(prefilter)?;
        let fp = self.fingerprints[template as usize];
        let same = match &self.pages {
            Some(catalog) => catalog.get(template) == Some(page),
            None => fp.matches(page),
        };
        same.then_some((template, fp))
    }

    /// The identity of the indexed catalog.
    pub fn id(&self) -> CatalogId {
        self.id
    }

    /// Number of templates (including any shadowed by a pre-filter collision).
    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    /// Whether the index has no templates.
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// Bytes of every template page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Heap bytes held: the table and the fingerprints (about 40 per template), not
    /// counting a catalog it is [`holding`](Self::holding).
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
            + self.fingerprints.capacity() * size_of::<Fingerprint>()
    }

    /// An index of these templates with an empty table sized for them.
    fn empty(page_size: usize, fingerprints: Vec<Fingerprint>, id: CatalogId) -> Self {
        let slots = fingerprints.len() + fingerprints.len() / 2 + 1;
        Self {
            slots: vec![
                Slot {
                    prefilter: 0,
                    template: EMPTY
                };
                slots
            ],
            fingerprints,
            page_size,
            id,
            pages: None,
        }
    }

    /// The slot a pre-filter value's probe starts at (multiply-shift: any table size).
    fn home(&self, prefilter: u64) -> usize {
        ((u128::from(prefilter) * self.slots.len() as u128) >> 64) as usize
    }

    /// Records that `template`'s page has this pre-filter value, unless another
    /// template has it already.
    fn insert(&mut self, prefilter: u64, template: u32) {
        let mut i = self.home(prefilter);
        loop {
            let slot = &mut self.slots[i];
            if slot.template == EMPTY {
                *slot = Slot {
                    prefilter,
                    template,
                };
                return;
            }
            if slot.prefilter == prefilter {
                return;
            }
            i = (i + 1) % self.slots.len();
        }
    }

    /// The template whose page has this pre-filter value, if any: a candidate only.
    fn probe(&self, prefilter: u64) -> Option<u32> {
        let mut i = self.home(prefilter);
        loop {
            let slot = self.slots[i];
            if slot.template == EMPTY {
                return None;
            }
            if slot.prefilter == prefilter {
                return Some(slot.template);
            }
            i = (i + 1) % self.slots.len();
        }
    }
}

fn read(r: &mut impl Read, file_len: Option<u64>) -> Result<TemplateIndex> {
    let (header, fingerprints) = format::read_head(r, file_len)?;
    let page_size = header.page_size as usize;
    let mut index = TemplateIndex::empty(page_size, fingerprints, header.id);
    let mut buf = Vec::new();
    for (first, offset, len) in format::page_reads(header) {
        buf.clear();
        format::read_into(r, &mut buf, offset, len, "template pages")?;
        for (i, page) in buf.chunks_exact(page_size).enumerate() {
            index.insert(page::prefilter(page), (first as usize + i) as u32);
        }
    }
    format::expect_end(r, header.file_len())?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; 4096]
    }

    #[test]
    fn a_prefilter_hit_is_confirmed_by_the_fingerprint_or_the_bytes() {
        let catalog = Arc::new(Catalog::from_pages(4096, [page(1)]).unwrap());
        let bare = TemplateIndex::empty(4096, catalog.fingerprints().to_vec(), catalog.id());
        let holding = TemplateIndex {
            pages: Some(catalog.clone()),
            ..bare.clone()
        };
        for mut index in [bare, holding] {
            // forge a collision: page(2)'s pre-filter value points at template 0
            index.insert(page::prefilter(&page(2)), 0);
            assert_eq!(index.probe(page::prefilter(&page(2))), Some(0));
            assert_eq!(index.lookup(&page(2)), None);
            index.insert(page::prefilter(&page(1)), 0);
            assert!(index.lookup(&page(1)).is_some());
        }
    }

    #[test]
    fn a_shared_prefilter_keeps_the_first_template() {
        let catalog = Catalog::from_pages(4096, [page(1), page(2)]).unwrap();
        let mut index = TemplateIndex::empty(4096, catalog.fingerprints().to_vec(), catalog.id());
        let value = page::prefilter(&page(1));
        index.insert(value, 0);
        index.insert(value, 1);
        assert_eq!(index.probe(value), Some(0));
    }

    /// The memory figure of the module docs, for a million templates.
    #[test]
    fn about_40_bytes_per_template() {
        let n: u32 = 1_000_000;
        let fingerprints = (0..n)
            .map(|i| Fingerprint::of(&i.to_le_bytes()))
            .collect::<Vec<_>>();
        let mut index = TemplateIndex::empty(4096, fingerprints, CatalogId([0; 32]));
        for i in 0..n {
            index.insert(page::prefilter(&i.to_le_bytes()), i);
        }
        assert!((0..n).all(|i| index.probe(page::prefilter(&i.to_le_bytes())) == Some(i)));
        let per_template = index.heap_bytes() as f64 / f64::from(n);
        println!("TemplateIndex: {per_template:.2} bytes/template for {n} templates");
        assert!(per_template <= 48.0, "{per_template} bytes per template");
    }
}
