//! LEB128 variable-length unsigned integers of the dedup stream.

/// Appends `v` in LEB128 (7 bits a byte, low first, high bit = more).
pub(crate) fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 value from the front of `bytes`: the value and its length, or
/// `None` if it is cut short or longer than a `u64` allows.
pub(crate) fn get(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7F);
        if i == 9 && bits > 1 {
            return None;
        }
        v |= bits << (7 * i);
        if b < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(v: u64) {
            let mut out = Vec::new();
            super::put(&mut out, v);
            prop_assert_eq!(super::get(&out), Some((v, out.len())));
            prop_assert_eq!(super::get(&out[..out.len() - 1]), None);
        }
    }

    #[test]
    fn overlong_is_rejected() {
        assert_eq!(super::get(&[0xFF; 10]), None);
        assert_eq!(super::get(&[0x80, 0x00]), Some((0, 2)));
    }
}
