//! What a dedup encoder or decoder counts.

use crate::resolve::tag;

/// Counters of a dedup encoder or decoder.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// QEMU stream bytes taken in (encoder) or given out (decoder).
    pub qemu_bytes: u64,
    /// Dedup stream bytes given out (encoder) or taken in (decoder).
    pub wire_bytes: u64,
    /// QEMU bytes the encoder carried as they were because QEMU had compressed them
    /// itself (`multifd-compression`) or they are device state on a multifd channel:
    /// nothing in them was deduplicated. Counted by the encoder only.
    pub opaque_bytes: u64,
    /// Pages by entry tag.
    pages: [u64; 256],
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            qemu_bytes: 0,
            wire_bytes: 0,
            opaque_bytes: 0,
            pages: [0; 256],
        }
    }
}

impl Stats {
    /// Pages that travelled with entry tag `tag` ([`crate::resolve::tag`], or a
    /// custom resolver's).
    pub fn pages(&self, tag: u8) -> u64 {
        self.pages[usize::from(tag)]
    }

    /// The built-in kinds by name (`raw`, `fill`, `seen`, `template`, `xbzrle`) and
    /// their page counts, in that order, for reports.
    pub fn named_pages(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        tag::NAMED.iter().map(|&(name, t)| (name, self.pages(t)))
    }

    /// Dedup stream bytes per QEMU byte (0 before the first QEMU byte).
    pub fn ratio(&self) -> f64 {
        match self.qemu_bytes {
            0 => 0.0,
            qemu => self.wire_bytes as f64 / qemu as f64,
        }
    }

    /// Adds `other`'s counters to these: a migration's, over its connections.
    pub fn add(&mut self, other: &Stats) {
        self.qemu_bytes += other.qemu_bytes;
        self.wire_bytes += other.wire_bytes;
        self.opaque_bytes += other.opaque_bytes;
        for (mine, theirs) in self.pages.iter_mut().zip(&other.pages) {
            *mine += theirs;
        }
    }

    /// Counts one page of `tag`.
    pub(crate) fn count_page(&mut self, tag: u8) {
        self.pages[usize::from(tag)] += 1;
    }
}
