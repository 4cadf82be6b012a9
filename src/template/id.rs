//! The catalog's identity: what the two proxies compare in their handshake to be
//! sure a template reference means the same page at both ends.

use std::fmt;
use std::str::FromStr;

use crate::page::Fingerprint;

/// BLAKE3 key-derivation context of the identity digest. It names the format
/// version, so a future format cannot produce the identity of a version-1 catalog.
const CONTEXT: &str = "migstream template catalog v1 identity";

/// A catalog's identity: 32 bytes of BLAKE3 over its page size, its template count
/// and its fingerprint table (sorted, so the identity does not depend on the order
/// the templates were found in).
///
/// The pages themselves are covered through their fingerprints: a catalog is only
/// ever loaded after every page was checked against its fingerprint, so two
/// catalogs with one identity hold the same pages unless BLAKE3-128 collides, the
/// same assumption page references on the wire already rest on. Hashing the table
/// rather than the pages lets the source, which does not keep the pages, verify the
/// identity from the table alone.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CatalogId(pub [u8; 32]);

impl CatalogId {
    /// The identity of a catalog of `page_size`-byte pages with these fingerprints,
    /// in table order (also of a DHT manifest, which has no pages).
    pub(crate) fn compute(page_size: u32, fingerprints: &[Fingerprint]) -> Self {
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&page_size.to_be_bytes());
        h.update(&(fingerprints.len() as u64).to_be_bytes());
        for fp in fingerprints {
            h.update(&fp.0);
        }
        Self(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for CatalogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CatalogId({self})")
    }
}

impl fmt::Display for CatalogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// The 64 hex digits [`Display`](fmt::Display) prints (either case), e.g. for a
/// catalog id given on a command line.
impl FromStr for CatalogId {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        let invalid = |reason: &str| crate::Error::Config {
            what: "catalog id",
            reason: format!("{s:?}: {reason}"),
        };
        if s.len() != 64 {
            return Err(invalid("not 64 hex digits"));
        }
        let mut id = [0u8; 32];
        let digit = |b: u8| char::from(b).to_digit(16).ok_or_else(|| invalid("not hex"));
        for (byte, pair) in id.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
            *byte = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        Ok(Self(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints() {
        let id = CatalogId::compute(4096, &[Fingerprint::of(&[7u8; 4096])]);
        let text = id.to_string();
        assert_eq!(text.parse::<CatalogId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<CatalogId>().unwrap(), id);
        for bad in [
            "",
            &text[..62],
            &format!("{text}00"),
            &format!("g{}", &text[1..]),
        ] {
            let err = bad.parse::<CatalogId>().unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config, "{bad:?}");
        }
        // a sign or a multi-byte character is not a hex digit
        let plus = format!("+{}", &text[1..]);
        assert!(plus.parse::<CatalogId>().is_err());
        let wide = format!("é{}", &text[2..]);
        assert_eq!(wide.len(), 64);
        assert!(wide.parse::<CatalogId>().is_err());
    }
}
