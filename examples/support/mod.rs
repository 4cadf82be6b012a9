//! What the examples share: reading a file in fixed pieces into a decoder's buffer.

use std::fs::File;
use std::io::{self, Read};

use bytes::BytesMut;

/// Bytes read from a file at a time: memory stays bounded whatever the file size.
pub(crate) const READ: usize = 1 << 20;

/// Reads up to [`READ`] bytes appended to `buf`; returns how many (0 at the end).
pub(crate) fn read_into(file: &mut File, buf: &mut BytesMut) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + READ, 0);
    let n = file.read(&mut buf[start..])?;
    buf.truncate(start + n);
    Ok(n)
}
