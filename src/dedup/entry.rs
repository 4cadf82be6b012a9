//! The entries of a DATA frame's batch (`docs/wire-format.md`, "The batch"), written
//! and read in one place.

use super::wire::{ENTRY_QEMU, PAGE_CONTINUE, PAGE_SAME_BLOCK};
use crate::cursor::Cursor;
use crate::varint;

/// One entry of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry<'a> {
    /// QEMU bytes carried verbatim.
    Qemu(&'a [u8]),
    /// A page: its resolver's tag, address and body.
    Page {
        tag: u8,
        /// Byte offset in its block / page size.
        page: u64,
        /// QEMU's record carried CONTINUE (main channel only).
        continued: bool,
        /// The block name, unless it is the previous page entry's.
        block: Option<&'a [u8]>,
        body: &'a [u8],
    },
}

impl Entry<'_> {
    /// Appends the entry to `batch`. A block name is at most 255 bytes (QEMU's and
    /// the multifd decoders' limit).
    pub(super) fn put(&self, batch: &mut Vec<u8>) {
        match *self {
            Entry::Qemu(bytes) => {
                batch.push(ENTRY_QEMU);
                varint::put(batch, bytes.len() as u64);
                batch.extend_from_slice(bytes);
            }
            Entry::Page {
                tag,
                page,
                continued,
                block,
                body,
            } => {
                batch.push(tag);
                varint::put(batch, page);
                let flags = if continued { PAGE_CONTINUE } else { 0 };
                match block {
                    None => batch.push(flags | PAGE_SAME_BLOCK),
                    Some(name) => {
                        batch.push(flags);
                        batch.push(u8::try_from(name.len()).expect("block names fit a byte"));
                        batch.extend_from_slice(name);
                    }
                }
                varint::put(batch, body.len() as u64);
                batch.extend_from_slice(body);
            }
        }
    }
}

/// Reads the entries of a batch.
pub(super) struct EntryReader<'a> {
    rest: Cursor<'a>,
}

impl<'a> EntryReader<'a> {
    pub(super) fn new(batch: &'a [u8]) -> Self {
        Self {
            rest: Cursor::new(batch),
        }
    }

    /// The next entry of the batch, `Ok(None)` at its end.
    pub(super) fn entry(&mut self) -> std::result::Result<Option<Entry<'a>>, &'static str> {
        let r = &mut self.rest;
        let Some(tag) = r.u8() else {
            return Ok(None);
        };
        if tag == ENTRY_QEMU {
            let bytes = r.counted().ok_or("verbatim bytes beyond the batch")?;
            return Ok(Some(Entry::Qemu(bytes)));
        }
        let page = r.varint().ok_or("bad page number")?;
        let flags = r.u8().ok_or("page address beyond the batch")?;
        if flags & !(PAGE_CONTINUE | PAGE_SAME_BLOCK) != 0 {
            return Err("unknown page address flags");
        }
        let block = match flags & PAGE_SAME_BLOCK {
            0 => Some(r.cstr8().ok_or("block name beyond the batch")?),
            _ => None,
        };
        let body = r.counted().ok_or("page body beyond the batch")?;
        Ok(Some(Entry::Page {
            tag,
            page,
            continued: flags & PAGE_CONTINUE != 0,
            block,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_as_written() {
        let entries = [
            Entry::Qemu(b"QEVM\0\0\0\x03"),
            Entry::Page {
                tag: 0x03,
                page: 300,
                continued: false,
                block: Some(b"pc.ram"),
                body: &[1; 17],
            },
            Entry::Page {
                tag: 0x80,
                page: u64::MAX >> 12,
                continued: true,
                block: None,
                body: &[],
            },
            Entry::Qemu(&[]),
        ];
        let (mut batch, mut ends) = (Vec::new(), Vec::new());
        for entry in &entries {
            entry.put(&mut batch);
            ends.push(batch.len());
        }
        let mut reader = EntryReader::new(&batch);
        for entry in entries {
            assert_eq!(reader.entry(), Ok(Some(entry)));
        }
        assert_eq!(reader.entry(), Ok(None));
        // a batch cut inside an entry is an error, never a shorter entry
        for cut in (1..batch.len()).filter(|cut| !ends.contains(cut)) {
            let mut reader = EntryReader::new(&batch[..cut]);
            let ended = loop {
                match reader.entry() {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            assert!(ended.is_err(), "cut at {cut}: {ended:?}");
        }
    }
}
