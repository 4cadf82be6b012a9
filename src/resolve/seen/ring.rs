//! The pages of a seen-before window, kept by number: the destination's copy of what
//! it delivered, and the source's when it holds them.

use crate::page::Fingerprint;

/// The last `window` numbered pages: page `id` lives at slot `id % window`.
#[derive(Debug)]
pub(super) struct Ring {
    window_bytes: usize,
    /// `window_bytes / page_size` pages, once the page size is known (0 before).
    window: u64,
    /// The stream's page size, learnt from the first page kept.
    page_size: usize,
    /// Grows one page at a time up to `window` pages.
    bytes: Vec<u8>,
    /// The fingerprint of the page in each slot, once asked for: a page referred to
    /// again (the many copies of one page in a guest) is hashed once.
    fingerprints: Vec<Option<Fingerprint>>,
}

impl Ring {
    pub(super) fn new(window_bytes: usize) -> Self {
        Self {
            window_bytes,
            window: 0,
            page_size: 0,
            bytes: Vec::new(),
            fingerprints: Vec::new(),
        }
    }

    /// Keeps a multifd channel's share of the window (before the first page: the
    /// window is fixed then).
    pub(super) fn share_for_channel(&mut self) {
        debug_assert_eq!(self.window, 0, "the window is fixed at the first page");
        self.window_bytes /= crate::resolve::MULTIFD_CHANNEL_SHARE;
    }

    /// How many pages it keeps at most (0 before the first page).
    pub(super) fn window(&self) -> u64 {
        self.window
    }

    /// The page size of the pages kept, 0 before the first.
    pub(super) fn page_size(&self) -> usize {
        self.page_size
    }

    /// Keeps `page` as page `id`, in place of page `id - window`.
    pub(super) fn keep(&mut self, id: u64, page: &[u8]) {
        if self.page_size == 0 {
            self.page_size = page.len();
            self.window = super::window_pages(self.window_bytes, self.page_size);
            // address space for the whole window (touched only as pages arrive): a
            // ring grown by doubling would be copied several times; if the allocator
            // refuses that much at once, it grows as needed
            let bytes = self.window as usize * self.page_size;
            let _ = self.bytes.try_reserve_exact(bytes);
        }
        let slot = self.slot(id);
        match self
            .bytes
            .get_mut(slot * self.page_size..(slot + 1) * self.page_size)
        {
            Some(kept) => {
                kept.copy_from_slice(page);
                self.fingerprints[slot] = None;
            }
            None => {
                self.bytes.extend_from_slice(page);
                self.fingerprints.push(None);
            }
        }
    }

    /// Page `id`, which must be among the last `window` kept.
    pub(super) fn page(&self, id: u64) -> &[u8] {
        let slot = self.slot(id);
        &self.bytes[slot * self.page_size..(slot + 1) * self.page_size]
    }

    /// The fingerprint of page `id`, hashed at the first call for this page only.
    pub(super) fn fingerprint(&mut self, id: u64) -> Fingerprint {
        let slot = self.slot(id);
        match self.fingerprints[slot] {
            Some(fingerprint) => fingerprint,
            None => {
                let fingerprint = Fingerprint::of(self.page(id));
                self.fingerprints[slot] = Some(fingerprint);
                fingerprint
            }
        }
    }

    fn slot(&self, id: u64) -> usize {
        (id % self.window) as usize
    }
}
