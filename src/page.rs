//! The page model shared by resolvers, catalogs and the dedup stream: page identity.
//!
//! Guest memory is attacker-controlled, so a page's identity on the wire is a
//! cryptographic fingerprint: the first 128 bits of its BLAKE3 hash. Two different
//! pages with one fingerprint would need a BLAKE3 collision. Fast non-cryptographic
//! hashes are used only to pre-filter (see [`prefilter`]).

use std::fmt;
use std::sync::OnceLock;

/// Bytes in a fingerprint on the wire.
pub const FINGERPRINT_LEN: usize = 16;

/// A page's identity: the first 128 bits of the BLAKE3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; FINGERPRINT_LEN]);

impl Fingerprint {
    /// The fingerprint of `page`.
    pub fn of(page: &[u8]) -> Self {
        let hash = blake3::hash(page);
        let mut fp = [0; FINGERPRINT_LEN];
        fp.copy_from_slice(&hash.as_bytes()[..FINGERPRINT_LEN]);
        Self(fp)
    }

    /// Whether `page` has this fingerprint: the check every restored page passes
    /// before it is written out.
    pub fn matches(&self, page: &[u8]) -> bool {
        Self::of(page) == *self
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A fast 64-bit hash of a page, for pre-filtering only (never for identity): a
/// miss proves a page is not in a set; a hit must be confirmed by its [`Fingerprint`].
///
/// Keyed at random once per process: a guest cannot aim for collisions, and every
/// set built in the process (a template index, a migration's seen-before pages)
/// agrees on one value per page, which [`Page::prefilter`](crate::resolve::Page::prefilter)
/// computes once for all of them. Never on the wire or in files.
///
/// XXH3 with a random secret: over a 4 KiB page it takes about half the time of
/// ahash's portable fallback (builds without AES), and every page pays it.
pub fn prefilter(page: &[u8]) -> u64 {
    static SECRET: OnceLock<[u8; 192]> = OnceLock::new();
    let secret = SECRET.get_or_init(|| {
        // ahash draws its keys from the OS; hashing a counter spreads them into a secret
        let keys = ahash::RandomState::new();
        let mut secret = [0; 192];
        for (i, word) in secret.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&keys.hash_one(i).to_le_bytes());
        }
        secret
    });
    twox_hash::XxHash3_64::oneshot_with_secret(secret, page).expect("a 192-byte secret")
}

/// Whether every byte of `page` is zero (QEMU's `buffer_is_zero`).
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_blake3_prefix() {
        let page = [7u8; 4096];
        let fp = Fingerprint::of(&page);
        assert_eq!(&fp.0[..], &blake3::hash(&page).as_bytes()[..16]);
        assert!(fp.matches(&page));
        assert!(!fp.matches(&[8u8; 4096]));
        assert_eq!(fp.to_string().len(), 32);
    }

    #[test]
    fn zero_pages() {
        let mut page = [0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        assert!(is_zero(&[0u8; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn prefilter_is_stable() {
        assert_eq!(prefilter(&[1u8; 4096]), prefilter(&[1u8; 4096]));
        assert_ne!(prefilter(&[1u8; 4096]), prefilter(&[2u8; 4096]));
    }
}
