//! XBZRLE deltas: a page delivered before travels as its difference to the last
//! version both ends hold, in QEMU's XBZRLE encoding ([`crate::xbzrle`]).
//!
//! Both halves keep the last delivered version of pages in a direct-mapped cache of
//! the same geometry, updated with every page delivered in stream order except
//! templates (which only drop their page's older version), so they agree on which
//! base a delta refers to. A page identical to its cached version has an empty
//! body.

use super::{Claim, Page, PageAt, PageOut, Restore, tag};
use crate::error::{Error, Result};
use crate::xbzrle::{self, Delta};

/// Default cache size of both halves, as QEMU's `xbzrle-cache-size`.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Blocks given a number (and so cached), in the order first seen: QEMU's machines
/// have a few dozen RAM blocks; pages of further blocks are neither cached nor
/// encoded as deltas, at both ends alike, so a peer naming block after block cannot
/// make either end hold or scan more names.
pub(super) const MAX_BLOCKS: usize = 256;

/// The cache both halves keep: slot → (block number, offset) and the page bytes.
/// Its geometry is fixed by the first page it sees: `cache_bytes / page size` slots.
#[derive(Debug)]
struct Cache {
    cache_bytes: usize,
    /// The page size of the geometry (0 until the first page).
    page_size: usize,
    keys: Vec<Option<(u32, u64)>>,
    /// One page per slot, in one buffer; a slot's bytes mean something only while
    /// it has a key. Memory is touched as slots are first used.
    pages: Vec<u8>,
    /// Block names in the order first seen (the same order at both ends).
    blocks: Vec<Vec<u8>>,
}

impl Cache {
    fn new(cache_bytes: usize) -> Self {
        Self {
            cache_bytes,
            page_size: 0,
            keys: Vec::new(),
            pages: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Keeps a multifd channel's share of the cache (before the first page: the
    /// geometry is fixed then).
    fn share_for_channel(&mut self) {
        debug_assert!(
            self.keys.is_empty(),
            "the geometry is fixed at the first page"
        );
        self.cache_bytes /= crate::resolve::MULTIFD_CHANNEL_SHARE;
    }

    /// The number of `block`, `None` beyond [`MAX_BLOCKS`].
    fn block_number(&mut self, block: &[u8]) -> Option<u32> {
        // pages come block by block: look from the most recent name back
        match self.blocks.iter().rposition(|b| b == block) {
            Some(i) => Some(i as u32),
            None if self.blocks.len() < MAX_BLOCKS => {
                self.blocks.push(block.to_vec());
                Some((self.blocks.len() - 1) as u32)
            }
            None => None,
        }
    }

    /// The slot and key of the page at `at`, `None` if its block is not cached.
    fn slot(&mut self, at: PageAt<'_>, page_size: usize) -> Option<(usize, (u32, u64))> {
        if self.keys.is_empty() {
            self.page_size = page_size.max(1);
            let slots = (self.cache_bytes / self.page_size).max(1);
            self.keys = vec![None; slots];
            self.pages = vec![0; slots * self.page_size];
        }
        let key = (self.block_number(at.block)?, at.offset);
        let page = at.offset / page_size.max(1) as u64;
        let mixed = page ^ u64::from(key.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Some(((mixed % self.keys.len() as u64) as usize, key))
    }

    /// The cached version of the page at `at`, if the cache holds one of this size.
    fn get(&mut self, at: PageAt<'_>, page_size: usize) -> Option<&[u8]> {
        let (slot, key) = self.slot(at, page_size)?;
        let start = slot * self.page_size;
        (self.keys[slot] == Some(key) && page_size == self.page_size)
            .then(|| &self.pages[start..start + page_size])
    }

    fn put(&mut self, page: &Page<'_>) {
        let Some((slot, key)) = self.slot(page.at, page.data.len()) else {
            return;
        };
        // a template is not kept: it is code or read-only data that is hardly ever
        // sent again, and keeping it would copy a page at both ends for nothing
        if page.tag() == Some(tag::TEMPLATE) {
            if self.keys[slot] == Some(key) {
                self.keys[slot] = None;
            }
            return;
        }
        // a page of another size than the geometry's is not kept (at both ends alike)
        if page.data.len() != self.page_size {
            self.keys[slot] = None;
            return;
        }
        let start = slot * self.page_size;
        self.pages[start..start + self.page_size].copy_from_slice(page.data);
        self.keys[slot] = Some(key);
    }
}

/// The source half: claims pages whose delta to their cached version is smaller than
/// half a page.
#[derive(Debug)]
pub struct XbzrleDelta {
    cache: Cache,
    out: Vec<u8>,
}

impl XbzrleDelta {
    /// A cache of `cache_bytes`; the destination's [`XbzrleRestore`] must have the
    /// same size.
    pub fn new(cache_bytes: usize) -> Self {
        Self {
            cache: Cache::new(cache_bytes),
            out: Vec::new(),
        }
    }
}

impl Claim for XbzrleDelta {
    fn tag(&self) -> u8 {
        tag::XBZRLE
    }

    fn claim(&mut self, page: &Page<'_>, body: &mut Vec<u8>) -> bool {
        let Some(old) = self.cache.get(page.at, page.data.len()) else {
            return false;
        };
        // a delta is worth it only below half a page
        self.out.resize(page.data.len() / 2, 0);
        match xbzrle::encode(old, page.data, &mut self.out) {
            Delta::Unchanged => true,
            Delta::Encoded(n) => {
                body.extend_from_slice(&self.out[..n]);
                true
            }
            Delta::TooLarge => false,
        }
    }

    fn delivered(&mut self, page: &Page<'_>) {
        self.cache.put(page);
    }

    fn on_multifd_channel(&mut self) {
        self.cache.share_for_channel();
    }
}

/// The destination half: applies deltas to the cached version of the page.
#[derive(Debug)]
pub struct XbzrleRestore {
    cache: Cache,
}

impl XbzrleRestore {
    /// The counterpart of [`XbzrleDelta::new`] with the same size.
    pub fn new(cache_bytes: usize) -> Self {
        Self {
            cache: Cache::new(cache_bytes),
        }
    }
}

impl Restore for XbzrleRestore {
    fn tag(&self) -> u8 {
        tag::XBZRLE
    }

    fn restore(&mut self, at: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()> {
        let Some(old) = self.cache.get(at, out.page_size()) else {
            return Err(Error::Malformed {
                offset: 0,
                field: "XBZRLE delta",
                reason: "no earlier version of the page is cached",
            });
        };
        out.copy_from_slice(old)?;
        xbzrle::decode(body, out.as_mut_slice())
    }

    fn delivered(&mut self, page: &Page<'_>) {
        self.cache.put(page);
    }

    fn on_multifd_channel(&mut self) {
        self.cache.share_for_channel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::out::restored;

    const AT: PageAt<'static> = PageAt {
        block: b"pc.ram",
        offset: 8192,
    };

    /// The two halves, with caches of 4 slots of 64-byte pages.
    fn halves() -> (XbzrleDelta, XbzrleRestore) {
        (XbzrleDelta::new(4 * 64), XbzrleRestore::new(4 * 64))
    }

    #[test]
    fn a_template_drops_the_cached_version_of_its_page() {
        let (at, (mut src, mut dst)) = (AT, halves());
        let (v1, template) = (vec![1u8; 64], vec![2u8; 64]);
        src.delivered(&Page::new(at, &v1));
        dst.delivered(&Page::new(at, &v1));
        let mut body = Vec::new();
        assert!(src.claim(&Page::new(at, &v1), &mut body), "cached");
        let delivered = Page::new(at, &template).delivered_as(tag::TEMPLATE);
        src.delivered(&delivered);
        dst.delivered(&delivered);
        body.clear();
        assert!(
            !src.claim(&Page::new(at, &template), &mut body),
            "not cached"
        );
        assert!(restored(&mut dst, at, &[], 64).is_err(), "no stale base");
    }

    #[test]
    fn deltas_against_the_same_cached_version() {
        let (at, (mut src, mut dst)) = (AT, halves());
        let v1 = vec![1u8; 64];
        let mut body = Vec::new();
        assert!(
            !src.claim(&Page::new(at, &v1), &mut body),
            "nothing cached yet"
        );
        src.delivered(&Page::new(at, &v1));
        dst.delivered(&Page::new(at, &v1));
        let mut v2 = v1.clone();
        v2[10] = 7;
        assert!(src.claim(&Page::new(at, &v2), &mut body));
        assert_eq!(restored(&mut dst, at, &body, 64).unwrap(), v2);
        // another page in a different block never uses this one's version
        let other = PageAt {
            block: b"pc.bios",
            offset: 8192,
        };
        assert!(restored(&mut dst, other, &body, 64).is_err());
    }
}
