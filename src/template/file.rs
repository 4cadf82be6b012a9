//! Writing a [`Catalog`] to its file and loading it back, checked end to end (see
//! [`format`](super::format) for the layout and the order of the checks).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::Catalog;
use super::format::{self, Header};
use crate::error::{Error, Result};

impl Catalog {
    /// Writes the catalog file (the writer is buffered here).
    pub fn write_to(&self, w: impl Write) -> Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, w);
        let header = Header {
            page_size: self.page_size,
            count: self.len() as u64,
            id: self.id,
        };
        w.write_all(&header.encode())?;
        self.fingerprints
            .iter()
            .try_for_each(|fp| w.write_all(&fp.0))?;
        w.write_all(&self.pages)?;
        w.flush()?;
        Ok(())
    }

    /// Writes the catalog file at `path`, replacing any file there.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let file = File::create(path)?;
        self.write_to(&file)?;
        file.sync_all()?;
        Ok(())
    }

    /// Loads and verifies the catalog file at `path`, checking its length against
    /// the header before anything is allocated.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        read(&mut file, Some(len))
    }

    /// Loads and verifies a catalog file held in memory.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        read(&mut &data[..], Some(data.len() as u64))
    }

    /// Loads and verifies a catalog file from a reader of unknown length. Memory is
    /// reserved only as the bytes arrive (a megabyte ahead), so a hostile count
    /// costs nothing until the input holds that much. Reads in big pieces: no need
    /// to buffer the reader.
    pub fn from_reader(mut r: impl Read) -> Result<Self> {
        read(&mut r, None)
    }
}

fn read(r: &mut impl Read, file_len: Option<u64>) -> Result<Catalog> {
    let (header, fingerprints) = format::read_head(r, file_len)?;
    let page_size = header.page_size as usize;
    let mut pages = Vec::new();
    // no more than the file holds: a short file fails where its pages run out
    let in_file = file_len.map_or(0, |len| len - header.pages_offset());
    pages.reserve_exact(in_file.min(header.pages_len()) as usize);
    for (first, offset, len) in format::page_reads(header) {
        let start = pages.len();
        format::read_into(r, &mut pages, offset, len, "template pages")?;
        let expected = &fingerprints[first as usize..];
        let bad = pages[start..]
            .chunks_exact(page_size)
            .zip(expected)
            .position(|(page, fp)| !fp.matches(page));
        if let Some(i) = bad {
            return Err(Error::Malformed {
                offset: offset + (i * page_size) as u64,
                field: "template page",
                reason: "does not match its fingerprint",
            });
        }
    }
    format::expect_end(r, header.file_len())?;
    Ok(Catalog {
        page_size: header.page_size,
        fingerprints,
        pages,
        id: header.id,
    })
}
