//! The one reader of every format the crate parses (QEMU's stream, the dedup
//! stream's frames and batches): a cursor over a byte slice that answers "not
//! enough bytes yet" with `None`, so headers can be checked for completeness before
//! anything is consumed.

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    /// The `n` bytes at `skip` bytes ahead, without moving.
    pub(crate) fn peek(&self, skip: usize, n: usize) -> Option<&'a [u8]> {
        let start = self.pos.checked_add(skip)?;
        self.buf.get(start..start.checked_add(n)?)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn be16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn be32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn be64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// A LEB128 varint (the dedup stream's, see [`crate::varint`]).
    pub(crate) fn varint(&mut self) -> Option<u64> {
        let (v, n) = crate::varint::get(self.buf.get(self.pos..)?)?;
        self.pos += n;
        Some(v)
    }

    /// A varint length followed by that many bytes.
    pub(crate) fn counted(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        self.take(n)
    }

    /// A `u8` length followed by that many bytes (QEMU's counted string).
    pub(crate) fn cstr8(&mut self) -> Option<&'a [u8]> {
        let n = *self.buf.get(self.pos)?;
        let s = self.peek(1, usize::from(n))?;
        self.pos += 1 + s.len();
        Some(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)
            .map(|b| b.try_into().expect("take returned N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_do_not_move() {
        let mut c = Cursor::new(&[0, 1, 2]);
        assert_eq!(c.be32(), None);
        assert_eq!(c.pos(), 0);
        assert_eq!(c.be16(), Some(1));
        assert_eq!(c.cstr8(), None);
        assert_eq!(c.pos(), 2);
    }

    #[test]
    fn counted_string() {
        let mut c = Cursor::new(b"\x03ramX");
        assert_eq!(c.cstr8(), Some(&b"ram"[..]));
        assert_eq!(c.u8(), Some(b'X'));
        assert_eq!(c.u8(), None);
    }
}
