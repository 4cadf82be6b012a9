//! Finding the end of the device-state region without a device schema.
//!
//! Device sections carry no lengths, so after the first one the decoder passes bytes
//! through opaquely. A precopy stream still ends in a recognisable way:
//!
//! ```text
//! ... device state ... | 00 (EOF) | 06 | be32 len | '{' ... JSON (len bytes) |  <end of stream>
//! ```
//!
//! (or a bare `00` when QEMU suppresses the description). A position that could be
//! the start of that tail is held back until more bytes refute it — they run past
//! the `len` it announces, or contradict the pattern — or the stream ends exactly
//! where it says. At most `6 + max_vmdesc_len` bytes are ever held.

/// Whether a `00 06 len {json}` tail can start at `tail[0]`.
///
/// Before the end of the stream, "can" includes a tail cut short by the end of the
/// buffer. At the end, only an exact fit (or a bare EOF byte) qualifies.
fn could_be_tail(tail: &[u8], max_vmdesc_len: usize, at_end: bool) -> bool {
    if tail.first() != Some(&0) {
        return false;
    }
    if tail.len() == 1 {
        return true;
    }
    if tail[1] != super::wire::record_type::VMDESCRIPTION {
        return false;
    }
    let Some(len) = tail.get(2..6) else {
        return !at_end;
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len == 0 || len > max_vmdesc_len {
        return false;
    }
    if tail.len() > 6 && tail[6] != b'{' {
        return false;
    }
    let full = 6 + len;
    if at_end {
        tail.len() == full
    } else {
        tail.len() <= full
    }
}

/// How many leading bytes of `buf`, up to `max_len`, are certainly device state, not
/// the stream's tail. Looks at no more than `max_len` positions, so handing out a
/// large buffer in chunks of `max_len` costs linear time.
pub(crate) fn device_state_len(
    buf: &[u8],
    max_vmdesc_len: usize,
    at_end: bool,
    max_len: usize,
) -> usize {
    let scan = buf.len().min(max_len);
    (0..scan)
        .find(|&p| could_be_tail(&buf[p..], max_vmdesc_len, at_end))
        .unwrap_or(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(json: &[u8]) -> Vec<u8> {
        let mut t = vec![0, 6];
        t.extend_from_slice(&(json.len() as u32).to_be_bytes());
        t.extend_from_slice(json);
        t
    }

    #[test]
    fn holds_a_possible_tail_until_refuted() {
        let mut buf = b"\x01\x02device".to_vec();
        buf.extend(tail(b"{}"));
        assert_eq!(device_state_len(&buf, 100, false, usize::MAX), 8);
        assert_eq!(device_state_len(&buf, 100, true, usize::MAX), 8);
        // one more byte than the length announces: it was device state after all
        buf.push(7);
        assert_eq!(device_state_len(&buf, 100, false, usize::MAX), buf.len());
    }

    #[test]
    fn prefixes_of_a_tail_are_held_only_before_the_end() {
        let t = tail(b"{\"a\": 1}");
        for cut in 2..t.len() {
            assert_eq!(
                device_state_len(&t[..cut], 100, false, usize::MAX),
                0,
                "cut {cut}"
            );
            // at the end a cut tail is device state (a lone trailing 00 aside)
            assert!(
                device_state_len(&t[..cut], 100, true, usize::MAX) > 0,
                "cut {cut}"
            );
        }
        assert_eq!(
            device_state_len(&[5, 0], 100, true, usize::MAX),
            1,
            "bare EOF"
        );
    }

    #[test]
    fn scans_at_most_max_len_positions() {
        let mut buf = vec![1u8; 100];
        buf.extend(tail(b"{}"));
        assert_eq!(device_state_len(&buf, 100, false, 10), 10);
        assert_eq!(device_state_len(&buf, 100, false, 1000), 100);
    }

    #[test]
    fn oversized_or_non_json_is_device_state() {
        let t = tail(b"{}");
        assert_eq!(device_state_len(&t, 1, true, usize::MAX), t.len());
        let mut not_json = tail(b"[]");
        not_json[6] = b'[';
        assert_eq!(
            device_state_len(&not_json, 100, true, usize::MAX),
            not_json.len()
        );
    }
}
