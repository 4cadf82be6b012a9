//! Seen-before: a page whose bytes were already delivered in this migration travels
//! as a back-reference plus its fingerprint.
//!
//! Both halves number the pages delivered (fill, template and seen-before pages
//! aside) 0, 1, 2, ... in stream order. The destination keeps the last `window` of
//! them in a ring, `window` being the window's bytes divided by the page size (so
//! the memory a peer can make it hold does not grow with the page size it names); the source remembers which content has which number for the same
//! window and refers back by distance. Eviction is by number, so the two agree on
//! what is referenceable without talking. The source finds candidates by the page's
//! [`Page::prefilter`], a 64-bit hash keyed at random per process (a guest cannot
//! aim for collisions), and sends the page's BLAKE3 fingerprint; the destination
//! checks the page it restores against it. The destination hashes a kept page at its
//! first reference only: a guest's many copies of one page cost one BLAKE3 there, and
//! later references compare fingerprints. A source that can afford the window's
//! bytes too ([`SeenBefore::holding`]) does the same: it confirms a candidate by
//! comparing bytes and sends the fingerprint it computed at the first reference.

mod ring;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::fill::fill_byte;
use super::{Claim, MULTIFD_CHANNEL_SHARE, Page, PageAt, PageOut, Restore, tag};
use crate::error::{Error, Result};
use crate::page::{FINGERPRINT_LEN, Fingerprint};
use crate::varint;
use ring::Ring;

/// The source half of seen-before. Memory: about 40 bytes per page of the window,
/// plus the pages themselves if [`holding`](Self::holding).
#[derive(Debug)]
pub struct SeenBefore {
    window_bytes: usize,
    /// The window in pages, once the page size is known (0 before the first page).
    window: u64,
    next_id: u64,
    /// Hash of a delivered page's bytes → its latest number.
    latest: HashMap<u64, u64, BuildHasherDefault<KeyBits>>,
    /// Hashes of the pages numbered `next_id - order.len() .. next_id`.
    order: VecDeque<u64>,
    /// The window's pages, when holding them.
    kept: Option<Ring>,
}

/// The keys of [`SeenBefore::latest`] are already keyed hashes: the map uses their
/// bits as they are instead of hashing them again.
#[derive(Debug, Default)]
struct KeyBits(u64);

impl Hasher for KeyBits {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // only u64 keys are hashed; fold anything else in for completeness
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

impl SeenBefore {
    /// Remembers the last `window_bytes / page size` delivered pages (at least 1).
    /// The destination's [`SeenBeforeRestore`] must keep at least as many.
    pub fn new(window_bytes: usize) -> Self {
        Self {
            window_bytes,
            window: 0,
            next_id: 0,
            latest: HashMap::default(),
            order: VecDeque::new(),
            kept: None,
        }
    }

    /// Like [`new`](Self::new), keeping the window's pages as the destination does
    /// (`window_bytes`, touched as pages arrive): a repeated page is
    /// confirmed by comparing bytes, about 0.3 µs, and its fingerprint is computed at
    /// its first repeat only, instead of a BLAKE3 (1.4-2 µs) per repeat. Worth it
    /// where pages repeat much; the stream is the same either way, except that a
    /// pre-filter collision travels raw instead of failing at the destination.
    pub fn holding(window_bytes: usize) -> Self {
        Self {
            kept: Some(Ring::new(window_bytes)),
            ..Self::new(window_bytes)
        }
    }
}

impl Claim for SeenBefore {
    fn tag(&self) -> u8 {
        tag::SEEN
    }

    fn claim(&mut self, page: &Page<'_>, body: &mut Vec<u8>) -> bool {
        let Some(&id) = self.latest.get(&page.prefilter()) else {
            return false;
        };
        let fingerprint = match &mut self.kept {
            Some(kept) if kept.page(id) != page.data => return false,
            Some(kept) => kept.fingerprint(id),
            None => Fingerprint::of(page.data),
        };
        varint::put(body, self.next_id - 1 - id);
        body.extend_from_slice(&fingerprint.0);
        true
    }

    fn on_multifd_channel(&mut self) {
        debug_assert_eq!(self.window, 0, "the window is fixed at the first page");
        self.window_bytes /= MULTIFD_CHANNEL_SHARE;
        if let Some(kept) = &mut self.kept {
            kept.share_for_channel();
        }
    }

    fn delivered(&mut self, page: &Page<'_>) {
        if !numbered(page) {
            return;
        }
        if self.window == 0 {
            self.window = window_pages(self.window_bytes, page.data.len());
        }
        let hash = page.prefilter();
        let id = self.next_id;
        self.next_id += 1;
        if let Some(kept) = &mut self.kept {
            kept.keep(id, page.data);
        }
        self.latest.insert(hash, id);
        self.order.push_back(hash);
        if self.order.len() as u64 > self.window {
            let old = self.order.pop_front().expect("window is at least 1");
            if self.latest.get(&old) == Some(&(id - self.window)) {
                self.latest.remove(&old);
            }
        }
    }
}

/// Whether a delivered page gets a number, at both ends alike: not if it is one byte
/// repeated (a fill page costs a byte anyway), nor if it travelled as a template
/// (its recurrences are templates too, and the destination restores it from the
/// catalog without keeping a copy), nor if it travelled as a seen-before reference
/// (its bytes are in the window already: the window then spans more distinct pages,
/// and the destination does not copy them a second time).
///
/// The tag is looked at first: a page that travelled as FILL was scanned once
/// already, and only pages no fill resolver claimed need the scan.
fn numbered(page: &Page<'_>) -> bool {
    !matches!(page.tag(), Some(tag::FILL | tag::TEMPLATE | tag::SEEN))
        && fill_byte(page.data).is_none()
}

/// How many pages of `page_size` a window of `window_bytes` holds (at least one).
fn window_pages(window_bytes: usize, page_size: usize) -> u64 {
    (window_bytes / page_size.max(1)).max(1) as u64
}

/// The destination half of seen-before: a ring of the last delivered pages.
#[derive(Debug)]
pub struct SeenBeforeRestore {
    next_id: u64,
    ring: Ring,
}

impl SeenBeforeRestore {
    /// Keeps the last `window_bytes / page size` delivered pages (memory:
    /// `window_bytes` at most whatever the page size, touched as pages arrive; the
    /// address space for all of it is reserved at the first page and given back
    /// when this is dropped).
    pub fn new(window_bytes: usize) -> Self {
        Self {
            next_id: 0,
            ring: Ring::new(window_bytes),
        }
    }
}

impl Restore for SeenBeforeRestore {
    fn tag(&self) -> u8 {
        tag::SEEN
    }

    fn restore(&mut self, _at: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()> {
        let malformed = |reason| Error::Malformed {
            offset: 0,
            field: "seen-before body",
            reason,
        };
        let (distance, n) = varint::get(body).ok_or(malformed("bad distance"))?;
        let fp: [u8; FINGERPRINT_LEN] = body[n..]
            .try_into()
            .map_err(|_| malformed("not a distance and a fingerprint"))?;
        let fingerprint = Fingerprint(fp);
        if distance >= self.next_id.min(self.ring.window())
            || out.page_size() != self.ring.page_size()
        {
            return Err(Error::Unresolved {
                resolver: "seen-before",
                fingerprint,
                reason: "refers beyond the pages this end keeps",
            });
        }
        let id = self.next_id - 1 - distance;
        if self.ring.fingerprint(id) != fingerprint {
            return Err(Error::Unresolved {
                resolver: "seen-before",
                fingerprint,
                reason: "the kept page does not match the fingerprint",
            });
        }
        out.copy_from_slice(self.ring.page(id))
    }

    fn delivered(&mut self, page: &Page<'_>) {
        if numbered(page) {
            self.ring.keep(self.next_id, page.data);
            self.next_id += 1;
        }
    }

    fn on_multifd_channel(&mut self) {
        self.ring.share_for_channel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::out::restored;

    /// The page size of these tests.
    const P: usize = 64;

    fn page(n: u8) -> Vec<u8> {
        let mut p = vec![n; P];
        p[0] = n.wrapping_add(1);
        p
    }

    const AT: PageAt<'static> = PageAt {
        block: b"b",
        offset: 0,
    };

    fn deliver(src: &mut SeenBefore, dst: &mut SeenBeforeRestore, data: &[u8]) {
        src.delivered(&Page::new(AT, data));
        dst.delivered(&Page::new(AT, data));
    }

    #[test]
    fn template_and_seen_pages_take_no_number_at_either_end() {
        let (mut src, mut dst) = (SeenBefore::new(4 * P), SeenBeforeRestore::new(4 * P));
        let (raw, template) = (page(1), page(2));
        for (data, tag) in [
            (&raw, tag::RAW),
            (&template, tag::TEMPLATE),
            (&raw, tag::SEEN),
        ] {
            src.delivered(&Page::new(AT, data).delivered_as(tag));
            dst.delivered(&Page::new(AT, data).delivered_as(tag));
        }
        let mut body = Vec::new();
        assert!(!src.claim(&Page::new(AT, &template), &mut body));
        assert!(src.claim(&Page::new(AT, &raw), &mut body));
        assert_eq!(
            body[0], 0,
            "neither the template nor the reference moved it back"
        );
        assert_eq!(restored(&mut dst, AT, &body, 64).unwrap(), raw);
    }

    #[test]
    fn references_stay_within_the_window_on_both_sides() {
        let (mut src, mut dst) = (SeenBefore::new(3 * P), SeenBeforeRestore::new(3 * P));
        for n in 0..5 {
            deliver(&mut src, &mut dst, &page(n));
        }
        let mut body = Vec::new();
        // pages 0 and 1 have left the window of 3
        for n in [0, 1] {
            let p = page(n);
            assert!(!src.claim(&Page::new(AT, &p), &mut body));
        }
        for n in [2, 3, 4] {
            body.clear();
            let p = page(n);
            assert!(src.claim(&Page::new(AT, &p), &mut body));
            assert_eq!(restored(&mut dst, AT, &body, 64).unwrap(), p);
        }
    }

    #[test]
    fn only_delivered_pages_are_referenceable() {
        let mut src = SeenBefore::new(4 * P);
        let (offered, other) = (page(1), page(2));
        let mut body = Vec::new();
        // offered, then another page delivered: that one is remembered, not the first
        assert!(!src.claim(&Page::new(AT, &offered), &mut body));
        src.delivered(&Page::new(AT, &other));
        assert!(!src.claim(&Page::new(AT, &offered), &mut body));
        src.delivered(&Page::new(AT, &offered));
        for p in [&other, &offered] {
            body.clear();
            assert!(src.claim(&Page::new(AT, p), &mut body));
        }
    }

    #[test]
    fn a_source_holding_its_pages_sends_the_same_references() {
        let (mut plain, mut holding) = (SeenBefore::new(3 * P), SeenBefore::holding(3 * P));
        let mut dst = SeenBeforeRestore::new(3 * P);
        // repeats within the window, one beyond it, and a slot reused in between
        for n in [1, 2, 1, 3, 1, 4, 5, 2, 6, 6, 1] {
            let p = page(n);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let claimed = plain.claim(&Page::new(AT, &p), &mut a);
            assert_eq!(claimed, holding.claim(&Page::new(AT, &p), &mut b));
            assert_eq!(a, b, "page {n}");
            let tag = match claimed {
                true => {
                    assert_eq!(restored(&mut dst, AT, &a, 64).unwrap(), p);
                    tag::SEEN
                }
                false => tag::RAW,
            };
            for end in [&mut plain as &mut dyn Claim, &mut holding] {
                end.delivered(&Page::new(AT, &p).delivered_as(tag));
            }
            dst.delivered(&Page::new(AT, &p).delivered_as(tag));
        }
    }

    #[test]
    fn a_checked_page_is_compared_by_fingerprint_until_its_slot_is_reused() {
        let (mut src, mut dst) = (SeenBefore::new(2 * P), SeenBeforeRestore::new(2 * P));
        deliver(&mut src, &mut dst, &page(1));
        deliver(&mut src, &mut dst, &page(2));
        let mut body = Vec::new();
        assert!(src.claim(&Page::new(AT, &page(1)), &mut body));
        for _ in 0..2 {
            assert_eq!(restored(&mut dst, AT, &body, 64).unwrap(), page(1));
        }
        let mut forged = body.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert!(
            restored(&mut dst, AT, &forged, 64).is_err(),
            "a checked page still refuses another fingerprint"
        );
        // page 3 takes page 1's slot: page 1's fingerprint must not vouch for it
        deliver(&mut src, &mut dst, &page(3));
        let mut stale = vec![0];
        stale.extend_from_slice(&body[1..]);
        assert!(matches!(
            restored(&mut dst, AT, &stale, 64),
            Err(Error::Unresolved { .. })
        ));
    }

    #[test]
    fn a_wrong_fingerprint_or_distance_fails() {
        let (mut src, mut dst) = (SeenBefore::new(4 * P), SeenBeforeRestore::new(4 * P));
        deliver(&mut src, &mut dst, &page(9));
        let mut body = Vec::new();
        let p = page(9);
        assert!(src.claim(&Page::new(AT, &p), &mut body));
        let mut forged = body.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert!(matches!(
            restored(&mut dst, AT, &forged, 64),
            Err(Error::Unresolved { .. })
        ));
        body[0] = 1; // distance 1: nothing that far back
        assert!(matches!(
            restored(&mut dst, AT, &body, 64),
            Err(Error::Unresolved { .. })
        ));
    }
}
