//! Where a [`Restore`](super::Restore) writes the page it restores.

use std::fmt;

use bytes::{BufMut, BytesMut};

use crate::error::{Error, Result};

/// The place of one restored page, at the end of the decoder's output.
///
/// A resolver writes the page in one of three ways: [`copy_from_slice`](Self::copy_from_slice)
/// for a page it holds (a template, a kept page), [`fill`](Self::fill) for a page of one
/// repeated byte, or [`as_mut_slice`](Self::as_mut_slice) to build the page in place.
/// The first two write each byte once; the output is not zero-filled first, which on a
/// destination restoring mostly templates was a tenth of the decoder's time. The decoder
/// fails the frame if a resolver returns without writing the page.
pub struct PageOut<'a> {
    out: &'a mut BytesMut,
    start: usize,
    size: usize,
}

impl<'a> PageOut<'a> {
    /// The page that `out` gets next.
    pub(crate) fn new(out: &'a mut BytesMut, size: usize) -> Self {
        let start = out.len();
        Self { out, start, size }
    }

    /// Bytes in one page of this stream.
    pub fn page_size(&self) -> usize {
        self.size
    }

    /// Whether the page has been written.
    pub fn is_written(&self) -> bool {
        self.out.len() > self.start
    }

    /// Sets the page to a copy of `page`, which must be one page long.
    pub fn copy_from_slice(&mut self, page: &[u8]) -> Result<()> {
        if page.len() != self.size {
            return Err(Error::Malformed {
                offset: 0,
                field: "restored page",
                reason: "not one page long",
            });
        }
        self.out.truncate(self.start);
        self.out.extend_from_slice(page);
        Ok(())
    }

    /// Sets every byte of the page to `byte`.
    pub fn fill(&mut self, byte: u8) {
        self.out.truncate(self.start);
        self.out.put_bytes(byte, self.size);
    }

    /// The page, to build in place: as last written, zeros if it was not.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if !self.is_written() {
            self.out.put_bytes(0, self.size);
        }
        &mut self.out[self.start..]
    }
}

impl fmt::Debug for PageOut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageOut")
            .field("page_size", &self.size)
            .field("is_written", &self.is_written())
            .finish()
    }
}

/// Restores one page on its own, as the decoder would: the resolvers' unit tests.
#[cfg(test)]
pub(crate) fn restored(
    r: &mut dyn super::Restore,
    at: super::PageAt<'_>,
    body: &[u8],
    page_size: usize,
) -> Result<Vec<u8>> {
    let mut out = BytesMut::new();
    let mut page = PageOut::new(&mut out, page_size);
    r.restore(at, body, &mut page)?;
    assert!(page.is_written(), "the resolver wrote no page");
    Ok(out.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_of_writing_gives_one_page_after_what_was_there() {
        let mut out = BytesMut::from(&b"head"[..]);
        let mut page = PageOut::new(&mut out, 4);
        assert!(!page.is_written());
        assert!(
            page.copy_from_slice(b"abc").is_err(),
            "three bytes are not a page"
        );
        assert!(!page.is_written());
        page.fill(7);
        page.copy_from_slice(b"abcd").unwrap();
        page.as_mut_slice()[0] = b'x';
        assert!(page.is_written());
        assert_eq!(&out[..], b"headxbcd");

        let mut page = PageOut::new(&mut out, 4);
        assert_eq!(
            page.as_mut_slice(),
            [0; 4],
            "an unwritten page reads as zeros"
        );
        page.fill(1);
        assert_eq!(&out[..], b"headxbcd\x01\x01\x01\x01");
    }
}
