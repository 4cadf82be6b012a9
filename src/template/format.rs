//! The catalog file, version 1: one self-describing file holding the templates, so
//! that the destination can load them and the source can index them.
//!
//! All integers are big-endian. `N` is the template count, `P` the page size.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `MGSTCAT\0` (`4d 47 53 54 43 41 54 00`) |
//! | 8 | 4 | format version, `1` |
//! | 12 | 4 | page size `P`: a power of two from 1024 to 65536 |
//! | 16 | 8 | template count `N`, at most 2³² − 1 (templates are numbered by a `u32`) |
//! | 24 | 32 | identity digest: the catalog's [`CatalogId`] |
//! | 56 | 16 × `N` | fingerprint table: each template's [`Fingerprint`], strictly ascending |
//! | 56 + 16 × `N` | `P` × `N` | the template pages, in the order of the table |
//!
//! The file ends right after the last page: its length is exactly
//! `56 + N × (16 + P)`. The identity digest is
//! `BLAKE3-derive-key("migstream template catalog v1 identity", be32 P ‖ be64 N ‖ table)`
//! (see [`CatalogId`]): it covers the pages through their fingerprints, and a loader
//! checks every page against its fingerprint. So one digest serves both ends: the
//! destination, which loads the pages, verifies all of the file; the source, which
//! only needs the table, verifies the table and the header without hashing pages.
//!
//! Sorting makes the file canonical: one set of pages has one file and one identity,
//! whatever order the builder met them in.
//!
//! A loader checks, in this order, and stops at the first failure with a typed
//! [`Error`] carrying the byte offset: magic, version, page size, count (against
//! 2³² − 1 and, when the length of the file is known, against that length, before
//! the table is allocated), the identity digest, the order of the table, every page
//! against its fingerprint as it is read, and that nothing follows the last page.
//! Memory is never reserved beyond the bytes the input holds (plus one megabyte
//! when its length is unknown), and a file gives the same error whether its length
//! is known or not.

use std::io::Read;

use super::CatalogId;
use crate::error::{Error, Result};
use crate::page::{FINGERPRINT_LEN, Fingerprint};

/// The first eight bytes of a catalog file.
pub const MAGIC: [u8; 8] = *b"MGSTCAT\0";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Bytes before the fingerprint table.
pub const HEADER_LEN: usize = 56;
/// Most templates a catalog holds: they are numbered by a `u32`, and `u32::MAX` is
/// never a template number.
pub const MAX_TEMPLATES: u64 = u32::MAX as u64;

/// Allocation ahead of the bytes actually read: a hostile count costs at most this
/// much before the input runs out.
const UNCHECKED_RESERVE: u64 = 1 << 20;

/// Bytes of pages read at once by the loaders.
const PAGE_READ: u64 = 1 << 20;

/// The fixed-size header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) page_size: u32,
    pub(crate) count: u64,
    pub(crate) id: CatalogId,
}

impl Header {
    /// The header bytes.
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_be_bytes());
        out[12..16].copy_from_slice(&self.page_size.to_be_bytes());
        out[16..24].copy_from_slice(&self.count.to_be_bytes());
        out[24..].copy_from_slice(&self.id.0);
        out
    }

    /// Parses and checks the header fields on their own (also a DHT manifest's),
    /// with at most `max_templates` templates.
    pub(crate) fn parse(b: &[u8; HEADER_LEN], max_templates: u64) -> Result<Self> {
        let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        if b[..8] != MAGIC {
            return Err(malformed(0, "catalog magic", "not \"MGSTCAT\\0\""));
        }
        if be32(8) != VERSION {
            return Err(Error::Unsupported {
                offset: 8,
                field: "catalog version",
                reason: "only version 1 is known",
            });
        }
        let page_size = be32(12);
        if !page_size.is_power_of_two() || !(1024..=65536).contains(&page_size) {
            return Err(malformed(
                12,
                "catalog page size",
                "not a power of two from 1 KiB to 64 KiB",
            ));
        }
        let count = u64::from_be_bytes(b[16..24].try_into().expect("8 bytes"));
        // lower than MAX_TEMPLATES on 32-bit targets too, where the file must fit in memory
        let limit = max_templates
            .min(MAX_TEMPLATES)
            .min((usize::MAX as u64) / (FINGERPRINT_LEN as u64 + 65536));
        if count > limit {
            return Err(Error::LimitExceeded {
                offset: 16,
                field: "template count",
                value: count,
                limit,
            });
        }
        let id = CatalogId(b[24..].try_into().expect("32 bytes"));
        Ok(Self {
            page_size,
            count,
            id,
        })
    }

    /// File offset of the first page.
    pub(super) fn pages_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.count * FINGERPRINT_LEN as u64
    }

    /// Bytes of the page region.
    pub(super) fn pages_len(&self) -> u64 {
        self.count * u64::from(self.page_size)
    }

    /// Length of the whole file.
    pub(super) fn file_len(&self) -> u64 {
        self.pages_offset() + self.pages_len()
    }
}

/// Reads and checks a catalog's header and fingerprint table: everything up to the
/// pages. `file_len`, when known, is checked against the count before the table is
/// allocated; a file too short for its table gives the error reading it would give.
pub(super) fn read_head(
    r: &mut impl Read,
    file_len: Option<u64>,
) -> Result<(Header, Vec<Fingerprint>)> {
    let mut raw = Vec::new();
    read_into(r, &mut raw, 0, HEADER_LEN as u64, "catalog header")?;
    let header = Header::parse(raw[..].try_into().expect("header length"), MAX_TEMPLATES)?;
    if let Some(len) = file_len.filter(|&len| len < header.pages_offset()) {
        return Err(Error::Truncated {
            offset: len,
            field: "fingerprint table",
        });
    }
    let table_len = header.count * FINGERPRINT_LEN as u64;
    raw.clear();
    read_into(
        r,
        &mut raw,
        HEADER_LEN as u64,
        table_len,
        "fingerprint table",
    )?;
    Ok((header, parse_table(&header, &raw)?))
}

/// The fingerprint table of a catalog with this header (`table`: its `16 × count`
/// bytes, the caller's invariant), checked as the file format requires (also a DHT
/// manifest's): it hashes to the identity digest, and it is strictly ascending.
pub(crate) fn parse_table(header: &Header, table: &[u8]) -> Result<Vec<Fingerprint>> {
    let fingerprints: Vec<Fingerprint> = table
        .chunks_exact(FINGERPRINT_LEN)
        .map(|fp| Fingerprint(fp.try_into().expect("16 bytes")))
        .collect();
    if CatalogId::compute(header.page_size, &fingerprints) != header.id {
        return Err(malformed(
            24,
            "identity digest",
            "does not match the page size, count and fingerprint table",
        ));
    }
    if let Some(i) = fingerprints.windows(2).position(|w| w[0] >= w[1]) {
        let offset = HEADER_LEN + (i + 1) * FINGERPRINT_LEN;
        return Err(malformed(
            offset as u64,
            "fingerprint table",
            "not strictly ascending",
        ));
    }
    Ok(fingerprints)
}

/// The page region in reads of one megabyte: the number of
/// the first template read, its file offset and the bytes to read. Loaders work on
/// each read while it is in the CPU cache.
pub(super) fn page_reads(header: Header) -> impl Iterator<Item = (u64, u64, u64)> {
    let page_size = u64::from(header.page_size);
    let per_read = PAGE_READ / page_size; // a page is at most 64 KiB
    (0..header.count)
        .step_by(per_read as usize)
        .map(move |first| {
            let pages = per_read.min(header.count - first);
            let offset = header.pages_offset() + first * page_size;
            (first, offset, pages * page_size)
        })
}

/// Appends the `len` bytes found at file offset `offset` to `buf`, in as few reads
/// as the reader allows. Memory beyond `buf`'s spare capacity is reserved only as
/// bytes arrive, so a hostile length costs at most a megabyte ahead of the input.
pub(super) fn read_into(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    offset: u64,
    len: u64,
    field: &'static str,
) -> Result<()> {
    buf.reserve(len.min(UNCHECKED_RESERVE) as usize);
    let n = r.by_ref().take(len).read_to_end(buf)? as u64;
    match n == len {
        true => Ok(()),
        false => Err(Error::Truncated {
            offset: offset + n,
            field,
        }),
    }
}

/// Checks that the reader has nothing after offset `end`, the end of the last page.
pub(super) fn expect_end(r: &mut impl Read, end: u64) -> Result<()> {
    match r.by_ref().take(1).read_to_end(&mut Vec::new())? {
        0 => Ok(()),
        _ => Err(malformed(
            end,
            "end of catalog",
            "bytes after the last page",
        )),
    }
}

fn malformed(offset: u64, field: &'static str, reason: &'static str) -> Error {
    Error::Malformed {
        offset,
        field,
        reason,
    }
}
