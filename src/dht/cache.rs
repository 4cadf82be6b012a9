//! The hot templates of a store: a least-recently-used map from fingerprint to
//! page, bounded by a page count, so that templates many migrations reference
//! (firmware, kernels) are fetched from the ring once rather than per migration.
//!
//! Entries live in one slab linked into a recency list by index: no allocation per
//! hit, one per new page (its `Bytes`, shared with whoever still holds it).

use std::collections::HashMap;

use bytes::Bytes;

use crate::page::Fingerprint;

/// No slot.
const NIL: usize = usize::MAX;

#[derive(Debug)]
struct Slot {
    fp: Fingerprint,
    page: Bytes,
    /// Towards the most recent.
    prev: usize,
    /// Towards the least recent.
    next: usize,
}

/// A bounded LRU map of verified template pages.
#[derive(Debug)]
pub(super) struct Lru {
    map: HashMap<Fingerprint, usize, ahash::RandomState>,
    slots: Vec<Slot>,
    /// Most recently used.
    head: usize,
    /// Least recently used: evicted first.
    tail: usize,
    capacity: usize,
}

impl Lru {
    /// A cache of at most `capacity` pages (0: nothing is kept).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::default(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    /// Number of pages held.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The page of `fp`, now the most recently used.
    pub(super) fn get(&mut self, fp: &Fingerprint) -> Option<Bytes> {
        let i = *self.map.get(fp)?;
        self.unlink(i);
        self.push_front(i);
        Some(self.slots[i].page.clone())
    }

    /// Keeps `page` as `fp`'s, evicting the least recently used page if full.
    pub(super) fn insert(&mut self, fp: Fingerprint, page: Bytes) {
        if self.capacity == 0 {
            return;
        }
        if let Some(&i) = self.map.get(&fp) {
            self.slots[i].page = page;
            self.unlink(i);
            self.push_front(i);
            return;
        }
        let i = if self.map.len() < self.capacity {
            self.slots.push(Slot {
                fp,
                page,
                prev: NIL,
                next: NIL,
            });
            self.slots.len() - 1
        } else {
            let i = self.tail;
            self.unlink(i);
            self.map.remove(&self.slots[i].fp);
            self.slots[i].fp = fp;
            self.slots[i].page = page;
            i
        };
        self.map.insert(fp, i);
        self.push_front(i);
    }

    /// Drops every page.
    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.slots.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
        self.slots[i].prev = NIL;
        self.slots[i].next = NIL;
    }

    fn push_front(&mut self, i: usize) {
        self.slots[i].next = self.head;
        match self.head {
            NIL => self.tail = i,
            h => self.slots[h].prev = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(i: u32) -> Fingerprint {
        Fingerprint::of(&i.to_le_bytes())
    }

    fn page(i: u32) -> Bytes {
        Bytes::from(i.to_le_bytes().to_vec())
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut lru = Lru::new(3);
        (0..3).for_each(|i| lru.insert(fp(i), page(i)));
        assert_eq!(lru.get(&fp(0)), Some(page(0))); // 0 is now the most recent
        lru.insert(fp(3), page(3)); // evicts 1
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.get(&fp(1)), None);
        assert_eq!(lru.get(&fp(0)), Some(page(0)));
        assert_eq!(lru.get(&fp(2)), Some(page(2)));
        lru.insert(fp(4), page(4)); // evicts 3
        assert_eq!(lru.get(&fp(3)), None);
        assert!([0, 2, 4].iter().all(|&i| lru.get(&fp(i)) == Some(page(i))));
    }

    #[test]
    fn stays_bounded_and_consistent() {
        let mut lru = Lru::new(100);
        for i in 0..10_000u32 {
            lru.insert(fp(i % 337), page(i % 337));
            if i % 3 == 0 {
                lru.get(&fp(i % 101));
            }
            assert!(lru.len() <= 100);
        }
        // the recency list holds exactly the mapped slots
        let (mut n, mut i) = (0, lru.head);
        while i != NIL {
            assert_eq!(lru.map[&lru.slots[i].fp], i);
            (n, i) = (n + 1, lru.slots[i].next);
        }
        assert_eq!(n, lru.len());
        lru.clear();
        assert_eq!(lru.get(&fp(1)), None);
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let mut lru = Lru::new(0);
        lru.insert(fp(1), page(1));
        assert_eq!((lru.len(), lru.get(&fp(1))), (0, None));
    }
}
