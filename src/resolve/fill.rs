//! Pages of one repeated byte (zero pages above all) that QEMU sends as full PAGE
//! records, e.g. with `zero-page-detection=none` or XBZRLE cache misses.

use super::{Claim, Page, PageAt, PageOut, Restore, tag};
use crate::error::{Error, Result};

/// Claims and restores pages filled with a single byte value; body: that byte.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fill;

/// The byte `page` is filled with, if it is.
pub(crate) fn fill_byte(page: &[u8]) -> Option<u8> {
    let (&first, rest) = page.split_first()?;
    // compare against the page shifted by one: all equal iff every byte is `first`
    (rest == &page[..rest.len()]).then_some(first)
}

impl Claim for Fill {
    fn tag(&self) -> u8 {
        tag::FILL
    }

    fn claim(&mut self, page: &Page<'_>, body: &mut Vec<u8>) -> bool {
        match fill_byte(page.data) {
            Some(byte) => {
                body.push(byte);
                true
            }
            None => false,
        }
    }
}

impl Restore for Fill {
    fn tag(&self) -> u8 {
        tag::FILL
    }

    fn restore(&mut self, _at: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()> {
        let &[byte] = body else {
            return Err(Error::Malformed {
                offset: 0,
                field: "fill page body",
                reason: "not exactly one byte",
            });
        };
        out.fill(byte);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_pages() {
        assert_eq!(fill_byte(&[0; 4096]), Some(0));
        assert_eq!(fill_byte(&[0xAB; 4096]), Some(0xAB));
        let mut page = [0u8; 4096];
        page[4095] = 1;
        assert_eq!(fill_byte(&page), None);
        page[4095] = 0;
        page[0] = 1;
        assert_eq!(fill_byte(&page), None);
    }
}
