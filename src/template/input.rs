//! The pages of one builder input, streamed: a QEMU migration stream or a raw
//! memory image, told apart by the stream magic.

use std::fs::File;
use std::io::Read;
use std::ops::ControlFlow;
use std::path::Path;

use bytes::BytesMut;

use crate::error::{Error, Result};
use crate::qemu::{QemuDecoder, RamRecord, Record, wire};

/// Bytes read from an input at once (a multiple of every page size).
const READ: usize = 1 << 20;

/// What an input file was taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A QEMU migration stream (it starts with "QEVM"): the payload of every
    /// `PAGE` record counts. ZERO pages are never templates, XBZRLE and zlib
    /// records carry no whole page, and neither counts.
    QemuStream,
    /// Anything else: a memory image, cut into consecutive pages. A partial page at
    /// the end of the file does not count.
    RawImage,
}

/// Calls `f` with every page of the input at `path`, in file order, until `f`
/// breaks. Memory stays bounded: the file is read one megabyte at a time.
pub(super) fn for_each_page(
    path: &Path,
    page_size: usize,
    f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<InputKind> {
    let mut file = File::open(path)?;
    let mut head = Vec::with_capacity(READ);
    (&mut file).take(4).read_to_end(&mut head)?;
    if head[..] == wire::FILE_MAGIC.to_be_bytes() {
        stream_pages(file, BytesMut::from(&head[..]), page_size, f)?;
        Ok(InputKind::QemuStream)
    } else {
        image_pages(file, head, page_size, f)?;
        Ok(InputKind::RawImage)
    }
}

/// The `PAGE` records of a QEMU stream whose first bytes are in `buf`.
fn stream_pages(
    mut file: File,
    mut buf: BytesMut,
    page_size: usize,
    mut f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<()> {
    let mut dec = QemuDecoder::new().with_page_size(page_size);
    let mut at_end = false;
    loop {
        let record = match at_end {
            true => dec.decode_eof(&mut buf)?,
            false => dec.decode(&mut buf)?,
        };
        match record {
            Some(Record::Ram(RamRecord::Page { data, .. })) => {
                if data.len() != page_size {
                    return Err(Error::Unsupported {
                        offset: dec.offset() - data.len() as u64,
                        field: "page",
                        reason: "the stream's page size is not the catalog's",
                    });
                }
                if f(&data).is_break() {
                    return Ok(());
                }
            }
            Some(_) => {}
            None if at_end => return Ok(()),
            None => {
                let start = buf.len();
                buf.resize(start + READ, 0);
                let n = file.read(&mut buf[start..])?;
                buf.truncate(start + n);
                at_end = n == 0;
            }
        }
    }
}

/// The consecutive pages of a raw image whose first bytes are in `buf`.
fn image_pages(
    mut file: File,
    mut buf: Vec<u8>,
    page_size: usize,
    mut f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<()> {
    loop {
        let want = (READ - buf.len()) as u64;
        (&mut file).take(want).read_to_end(&mut buf)?;
        for page in buf.chunks_exact(page_size) {
            if f(page).is_break() {
                return Ok(());
            }
        }
        if buf.len() < READ {
            return Ok(()); // end of file
        }
        buf.clear();
    }
}
