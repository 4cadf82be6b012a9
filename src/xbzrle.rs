//! XBZRLE, QEMU's page delta encoding, byte-compatible with `migration/xbzrle.c`.
//!
//! A delta of a new page against an old one is a sequence of pairs: a run of bytes
//! that did not change (only its length), then a run that did (its length and the new
//! bytes). Lengths are QEMU's "small ULEB128": one byte below 0x80, otherwise two
//! (`v & 0x7F | 0x80`, `v >> 7`), at most 0x3FFF. The trailing unchanged run is left
//! out; the first unchanged run may be empty. Runs are maximal.
//!
//! ```text
//! [ unchanged len | changed len | changed bytes ... ] [ unchanged len | changed len | ... ] ...
//! ```
//!
//! [`encode`] makes the same bytes and the same "too large" decision as QEMU's generic
//! encoder, so a delta QEMU sends can be re-made exactly from the two pages;
//! [`decode`] accepts exactly what QEMU's destination accepts and applies the delta in
//! place, as QEMU does.

use crate::error::{Error, Result};

/// Largest run length the small ULEB128 carries.
const MAX_RUN: usize = 0x3FFF;

/// What [`encode`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// The pages are identical: QEMU sends nothing at all for such a page.
    Unchanged,
    /// The delta does not fit the output limit (QEMU then sends the page raw).
    TooLarge,
    /// This many bytes of delta were written to the front of the output.
    Encoded(usize),
}

/// Encodes `new` as a delta against `old` into `out`, whose length is the limit
/// (QEMU uses one page). `old` and `new` must have the same length.
///
/// Reproduces QEMU's checks exactly, including its early "too large" answer when
/// fewer than two bytes of room remain even if only unchanged bytes follow.
pub fn encode(old: &[u8], new: &[u8], out: &mut [u8]) -> Delta {
    assert_eq!(old.len(), new.len(), "XBZRLE pages of different sizes");
    let (len, limit) = (new.len(), out.len());
    let (mut i, mut d) = (0, 0);
    while i < len {
        if d + 2 > limit {
            return Delta::TooLarge;
        }
        let unchanged = equal_run(old, new, i);
        if unchanged == len {
            return Delta::Unchanged;
        }
        i += unchanged;
        if i == len {
            return Delta::Encoded(d);
        }
        let Some(n) = put_uleb(&mut out[d..], unchanged) else {
            return Delta::TooLarge;
        };
        d += n;
        if d + 2 > limit {
            return Delta::TooLarge;
        }
        let changed = diff_run(old, new, i);
        let Some(n) = put_uleb(&mut out[d..], changed) else {
            return Delta::TooLarge;
        };
        d += n;
        if d + changed > limit {
            return Delta::TooLarge;
        }
        out[d..d + changed].copy_from_slice(&new[i..i + changed]);
        d += changed;
        i += changed;
    }
    Delta::Encoded(d)
}

/// Applies the delta `encoded` to `page` in place (unchanged runs keep the page's
/// bytes). Fails, with the offset inside `encoded`, on whatever QEMU's destination
/// rejects; `page` may then be partly written.
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<()> {
    let (len, limit) = (encoded.len(), page.len());
    let (mut i, mut d) = (0, 0);
    while i < len {
        if len - i < 2 {
            return Err(malformed(i, "unchanged run: fewer than 2 bytes left"));
        }
        let (unchanged, n) =
            get_uleb(&encoded[i..]).ok_or_else(|| malformed(i + 1, "unchanged run: bad length"))?;
        if unchanged == 0 && i != 0 {
            return Err(malformed(i, "unchanged run: empty after the first"));
        }
        i += n;
        d += unchanged;
        if d > limit {
            return Err(malformed(i - n, "unchanged run: beyond the page"));
        }
        if len - i < 2 {
            return Err(malformed(i, "changed run: fewer than 2 bytes left"));
        }
        let (changed, n) =
            get_uleb(&encoded[i..]).ok_or_else(|| malformed(i + 1, "changed run: bad length"))?;
        if changed == 0 {
            return Err(malformed(i, "changed run: empty"));
        }
        i += n;
        if d + changed > limit || i + changed > len {
            return Err(malformed(i - n, "changed run: beyond the page or the data"));
        }
        page[d..d + changed].copy_from_slice(&encoded[i..i + changed]);
        d += changed;
        i += changed;
    }
    Ok(())
}

/// Length of the run of equal bytes from `i` on (a word at a time, then bytes).
fn equal_run(old: &[u8], new: &[u8], start: usize) -> usize {
    let mut i = start;
    while let (Some(a), Some(b)) = (word(old, i), word(new, i)) {
        if a != b {
            break;
        }
        i += 8;
    }
    while i < new.len() && old[i] == new[i] {
        i += 1;
    }
    i - start
}

/// Length of the run of differing bytes from `i` on. A word is skipped whole only if
/// none of its bytes is equal (no zero byte in the XOR of the two words).
fn diff_run(old: &[u8], new: &[u8], start: usize) -> usize {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = start;
    while let (Some(a), Some(b)) = (word(old, i), word(new, i)) {
        let x = a ^ b;
        if x.wrapping_sub(LOW) & !x & HIGH != 0 {
            break;
        }
        i += 8;
    }
    while i < new.len() && old[i] != new[i] {
        i += 1;
    }
    i - start
}

fn word(bytes: &[u8], i: usize) -> Option<u64> {
    let chunk = bytes.get(i..i + 8)?;
    Some(u64::from_ne_bytes(chunk.try_into().expect("8 bytes")))
}

/// Writes `v` as a small ULEB128; `None` if it does not fit `out` or the encoding.
fn put_uleb(out: &mut [u8], v: usize) -> Option<usize> {
    match v {
        0..0x80 => {
            *out.first_mut()? = v as u8;
            Some(1)
        }
        0x80..=MAX_RUN => {
            let bytes = out.get_mut(..2)?;
            bytes[0] = (v & 0x7F) as u8 | 0x80;
            bytes[1] = (v >> 7) as u8;
            Some(2)
        }
        _ => None,
    }
}

/// Reads a small ULEB128 from the front of `bytes` (at least 2 bytes present): the
/// value and its length, or `None` if the second byte has its high bit set.
fn get_uleb(bytes: &[u8]) -> Option<(usize, usize)> {
    let first = usize::from(bytes[0]);
    if first < 0x80 {
        return Some((first, 1));
    }
    let second = usize::from(bytes[1]);
    (second < 0x80).then_some((first & 0x7F | second << 7, 2))
}

fn malformed(offset: usize, reason: &'static str) -> Error {
    Error::Malformed {
        offset: offset as u64,
        field: "XBZRLE data",
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The format written the obvious way, a byte at a time, with QEMU's checks.
    fn reference_encode(old: &[u8], new: &[u8], limit: usize) -> Delta {
        if old == new {
            return Delta::Unchanged;
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i < new.len() {
            if out.len() + 2 > limit {
                return Delta::TooLarge;
            }
            let z = (i..new.len()).take_while(|&j| old[j] == new[j]).count();
            i += z;
            if i == new.len() {
                break;
            }
            reference_uleb(&mut out, z);
            if out.len() + 2 > limit {
                return Delta::TooLarge;
            }
            let n = (i..new.len()).take_while(|&j| old[j] != new[j]).count();
            reference_uleb(&mut out, n);
            if out.len() + n > limit {
                return Delta::TooLarge;
            }
            out.extend_from_slice(&new[i..i + n]);
            i += n;
        }
        Delta::Encoded(out.len())
    }

    fn reference_uleb(out: &mut Vec<u8>, v: usize) {
        match v < 0x80 {
            true => out.push(v as u8),
            false => out.extend([(v & 0x7F) as u8 | 0x80, (v >> 7) as u8]),
        }
    }

    /// Pages that differ in a few runs of random lengths: the interesting cases.
    fn page_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let runs = prop::collection::vec((0usize..300, 1usize..40, any::<u8>()), 0..60);
        (prop::collection::vec(any::<u8>(), 4096), runs).prop_map(|(old, runs)| {
            let mut new = old.clone();
            let mut at = 0;
            for (gap, len, x) in runs {
                at += gap;
                for b in new.iter_mut().skip(at).take(len) {
                    *b ^= x | 1;
                }
                at += len;
            }
            (old, new)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn encode_matches_the_reference_and_decodes_back((old, new) in page_pair(), limit in prop::sample::select(vec![4096usize, 4000, 600, 64, 2])) {
            let mut out = vec![0; limit];
            let delta = encode(&old, &new, &mut out);
            prop_assert_eq!(delta, reference_encode(&old, &new, limit));
            if let Delta::Encoded(n) = delta {
                let mut expected = Vec::new();
                let mut page = old.clone();
                decode(&out[..n], &mut page).unwrap();
                prop_assert!(page == new);
                // and the bytes are the reference's bytes
                let mut i = 0;
                while i < new.len() {
                    let z = (i..new.len()).take_while(|&j| old[j] == new[j]).count();
                    i += z;
                    if i == new.len() { break; }
                    reference_uleb(&mut expected, z);
                    let c = (i..new.len()).take_while(|&j| old[j] != new[j]).count();
                    reference_uleb(&mut expected, c);
                    expected.extend_from_slice(&new[i..i + c]);
                    i += c;
                }
                prop_assert_eq!(&out[..n], &expected[..]);
            }
        }

        #[test]
        fn decode_never_panics_and_stays_in_the_page(data in prop::collection::vec(any::<u8>(), 0..64), len in 1usize..64) {
            let mut page = vec![0xEEu8; len];
            let _ = decode(&data, &mut page);
        }
    }

    #[test]
    fn unchanged_and_whole_page_changes() {
        let old = vec![7u8; 4096];
        let mut out = vec![0; 4096];
        assert_eq!(encode(&old, &old, &mut out), Delta::Unchanged);
        let new = vec![8u8; 4096];
        // 00 (no unchanged bytes), 0x80 0x20 (4096), 4096 bytes: 4099 > 4096
        assert_eq!(encode(&old, &new, &mut out), Delta::TooLarge);
        let mut one = old.clone();
        one[4095] = 9;
        assert_eq!(encode(&old, &one, &mut out), Delta::Encoded(4));
        assert_eq!(&out[..4], &[0xFF, 0x1F, 0x01, 0x09]);
    }

    #[test]
    fn too_large_when_two_bytes_of_room_are_missing_even_if_only_equal_bytes_follow() {
        // one changed byte every other byte for the first 2044 bytes: 2 bytes of
        // header + 1 byte per change, then only equal bytes remain
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        for i in (1..2044).step_by(2) {
            new[i] = 1;
        }
        let mut out = vec![0; 4096];
        let Delta::Encoded(n) = encode(&old, &new, &mut out) else {
            panic!()
        };
        // with exactly `n + 1` bytes of room QEMU still says "too large"
        let mut tight = vec![0; n + 1];
        assert_eq!(encode(&old, &new, &mut tight), Delta::TooLarge);
        let mut enough = vec![0; n + 2];
        assert_eq!(encode(&old, &new, &mut enough), Delta::Encoded(n));
    }

    #[test]
    fn decode_rejects_what_qemu_rejects() {
        let mut page = vec![0u8; 4096];
        let reason = |data: &[u8], page: &mut [u8]| match decode(data, page) {
            Err(Error::Malformed { offset, reason, .. }) => (offset, reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(&[0x00], &mut page).1,
            "unchanged run: fewer than 2 bytes left"
        );
        assert_eq!(
            reason(&[0x80, 0x80, 0x01, 0x01], &mut page).1,
            "unchanged run: bad length"
        );
        assert_eq!(
            reason(&[0x00, 0x00], &mut page).1,
            "changed run: fewer than 2 bytes left"
        );
        assert_eq!(
            reason(&[0x00, 0x00, 0x00], &mut page).1,
            "changed run: empty"
        );
        assert_eq!(
            reason(&[0x00, 0x01, 0xAA, 0x00, 0x01, 0xBB], &mut page),
            (3, "unchanged run: empty after the first")
        );
        assert_eq!(
            reason(&[0x00, 0x05, 0xAA], &mut page).1,
            "changed run: beyond the page or the data"
        );
        assert_eq!(
            reason(&[0x81, 0x20, 0x01, 0x01], &mut page).1,
            "unchanged run: beyond the page"
        );
        assert!(decode(&[], &mut page).is_ok());
        // a first unchanged run of 0, and a non-canonical two-byte length, as QEMU allows
        decode(&[0x00, 0x01, 0xAA, 0x80, 0x00], &mut page).unwrap_err();
        decode(&[0x00, 0x81, 0x00, 0xAA], &mut page).unwrap();
        assert_eq!(page[0], 0xAA);
    }
}
