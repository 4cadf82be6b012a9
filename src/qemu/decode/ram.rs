//! The RAM section payload: the setup block list and the page records (the hot path).

use bytes::{Buf, Bytes, BytesMut};

use super::{Phase, QemuDecoder, Step};
use crate::cursor::Cursor;
use crate::error::Result;
use crate::qemu::record::{MemSize, PageAddr, RamBlock, RamRecord, Record};
use crate::qemu::wire::{self, ram_flag};

#[derive(Debug, Clone, Copy)]
pub(crate) enum PayloadKind {
    Page,
    Xbzrle,
    Compressed,
}

impl PayloadKind {
    pub(super) fn record(self, addr: PageAddr, data: Bytes) -> Record {
        Record::Ram(match self {
            Self::Page => RamRecord::Page { addr, data },
            Self::Xbzrle => RamRecord::Xbzrle { addr, data },
            Self::Compressed => RamRecord::Compressed { addr, data },
        })
    }
}

/// What follows a page record's header.
enum Body {
    /// A ZERO record's fill byte; nothing follows.
    Fill(u8),
    /// A payload of a length given beside it.
    Payload(PayloadKind),
}

impl QemuDecoder {
    /// The hot path: one record of a RAM section payload.
    pub(super) fn ram_record(
        &mut self,
        src: &mut BytesMut,
        section_id: u32,
    ) -> Result<(Phase, Step)> {
        let here = Phase::RamRecords { section_id };
        let Some(word) = src.get(..8) else {
            return Ok((here, Step::NeedMore));
        };
        let word = u64::from_be_bytes(word.try_into().expect("8 bytes"));
        let page_mask = self.page_size as u64 - 1;
        let (offset, flags) = (word & !page_mask, word & page_mask);
        let continued = flags & ram_flag::CONTINUE != 0;
        let kind = flags & !ram_flag::CONTINUE;
        if matches!(
            kind,
            ram_flag::ZERO | ram_flag::PAGE | ram_flag::XBZRLE | ram_flag::COMPRESS_PAGE
        ) {
            return self.page_record(src, section_id, kind, offset, continued);
        }
        if continued {
            return Err(self.pos.malformed(
                0,
                "RAM record flags",
                "CONTINUE on a record without a page",
            ));
        }
        match kind {
            ram_flag::MEM_SIZE => {
                if self.ram.mapped_ram {
                    return Err(self.pos.unsupported(0, "RAM setup", "mapped-ram streams"));
                }
                if self.ram.huge_page_blocks {
                    return Err(self.pos.unsupported(
                        0,
                        "RAM setup",
                        "postcopy with huge-page RAM blocks",
                    ));
                }
                if !self.ram.blocks.is_empty() {
                    return Err(self.pos.malformed(0, "RAM setup", "a second block list"));
                }
                self.pos.skip(src, 8);
                let phase = Phase::MemSizeBlocks {
                    section_id,
                    total: offset,
                    listed: 0,
                    blocks: Vec::new(),
                };
                Ok((phase, Step::Continue))
            }
            ram_flag::EOS | ram_flag::MULTIFD_FLUSH if offset == 0 => {
                self.pos.skip(src, 8);
                match kind {
                    ram_flag::EOS => Ok((
                        Phase::Footer { section_id },
                        Step::Emit(Record::Ram(RamRecord::Eos)),
                    )),
                    _ => Ok((here, Step::Emit(Record::Ram(RamRecord::MultifdFlush)))),
                }
            }
            ram_flag::EOS | ram_flag::MULTIFD_FLUSH => Err(self.pos.malformed(
                0,
                "RAM record offset",
                "non-zero on a record without a page",
            )),
            ram_flag::HOOK => Err(self.pos.unsupported(0, "RAM record flags", "RDMA hook")),
            _ => Err(self
                .pos
                .malformed(0, "RAM record flags", "unknown flag combination")),
        }
    }

    fn page_record(
        &mut self,
        src: &mut BytesMut,
        section_id: u32,
        kind: u64,
        offset: u64,
        continued: bool,
    ) -> Result<(Phase, Step)> {
        let here = Phase::RamRecords { section_id };
        let mut c = Cursor::new(&src[8..]);
        let block = if continued {
            match self.ram.current {
                Some(block) => block,
                None => {
                    return Err(self.pos.malformed(
                        0,
                        "RAM record flags",
                        "CONTINUE before any named block",
                    ));
                }
            }
        } else {
            let Some(name) = c.cstr8() else {
                return Ok((here, Step::NeedMore));
            };
            match self.ram.blocks.iter().position(|b| b.idstr == name) {
                Some(block) => block,
                None => {
                    return Err(self.pos.malformed(
                        8,
                        "RAM block name",
                        "not in the setup block list",
                    ));
                }
            }
        };
        let name_end = 8 + c.pos();
        let (body, len) = match kind {
            ram_flag::ZERO => match c.u8() {
                Some(fill) => (Body::Fill(fill), 0),
                None => return Ok((here, Step::NeedMore)),
            },
            ram_flag::PAGE => (Body::Payload(PayloadKind::Page), self.page_size),
            ram_flag::XBZRLE => {
                let (Some(encoding), Some(len)) = (c.u8(), c.be16()) else {
                    return Ok((here, Step::NeedMore));
                };
                if encoding != wire::XBZRLE_ENCODING {
                    return Err(self.pos.malformed(name_end, "XBZRLE encoding", "not 0x01"));
                }
                if usize::from(len) > self.page_size {
                    return Err(self.pos.malformed(
                        name_end + 1,
                        "XBZRLE length",
                        "longer than a page",
                    ));
                }
                (Body::Payload(PayloadKind::Xbzrle), usize::from(len))
            }
            _ => {
                let Some(len) = c.be32() else {
                    return Ok((here, Step::NeedMore));
                };
                if len as usize > wire::zlib_compress_bound(self.page_size) {
                    return Err(self.pos.malformed(
                        name_end,
                        "compressed page length",
                        "beyond zlib's bound for a page",
                    ));
                }
                (Body::Payload(PayloadKind::Compressed), len as usize)
            }
        };
        let ram_block = &self.ram.blocks[block];
        if offset >= ram_block.used_length {
            return Err(self.pos.malformed(
                0,
                "RAM record offset",
                "beyond the end of its RAM block",
            ));
        }
        let addr = PageAddr {
            block: ram_block.idstr.clone(),
            offset,
            continued,
        };
        self.ram.current = Some(block);
        let header = 8 + c.pos();
        let kind = match body {
            Body::Payload(kind) => kind,
            Body::Fill(fill) => {
                self.pos.skip(src, header);
                let record = Record::Ram(RamRecord::Zero { addr, fill });
                return Ok((here, Step::Emit(record)));
            }
        };
        if src.len() >= header + len {
            // one split for header and payload: the hot path of a page record
            let mut data = self.pos.take(src, header + len);
            data.advance(header);
            return Ok((here, Step::Emit(kind.record(addr, data))));
        }
        self.pos.skip(src, header);
        src.reserve(len - src.len());
        let phase = Phase::PagePayload {
            section_id,
            kind,
            addr,
            len,
        };
        Ok((phase, Step::NeedMore))
    }

    pub(super) fn mem_size_blocks(
        &mut self,
        src: &mut BytesMut,
        section_id: u32,
        total: u64,
        mut listed: u64,
        mut blocks: Vec<RamBlock>,
    ) -> Result<(Phase, Step)> {
        while listed < total {
            if blocks.len() >= self.limits.max_ram_blocks {
                return Err(self.pos.limit(
                    0,
                    "RAM block count",
                    blocks.len() + 1,
                    self.limits.max_ram_blocks,
                ));
            }
            let mut c = Cursor::new(src);
            let mr_addr = |c: &mut Cursor<'_>| match self.ram.ignore_shared {
                true => c.be64().map(Some),
                false => Some(None),
            };
            let (Some(name), Some(used_length), Some(mr_addr)) =
                (c.cstr8(), c.be64(), mr_addr(&mut c))
            else {
                let phase = Phase::MemSizeBlocks {
                    section_id,
                    total,
                    listed,
                    blocks,
                };
                return Ok((phase, Step::NeedMore));
            };
            if name.is_empty() {
                return Err(self.pos.malformed(0, "RAM block name", "empty"));
            }
            if blocks.iter().any(|b| b.idstr == name) {
                return Err(self.pos.malformed(1, "RAM block name", "listed twice"));
            }
            listed = match listed.checked_add(used_length) {
                Some(sum) if sum <= total => sum,
                _ => {
                    return Err(self.pos.malformed(
                        1 + name.len(),
                        "RAM block length",
                        "blocks exceed the total RAM size",
                    ));
                }
            };
            let idstr = Bytes::copy_from_slice(name);
            self.pos.skip(src, c.pos());
            blocks.push(RamBlock {
                idstr,
                used_length,
                mr_addr,
            });
        }
        self.ram.blocks = blocks.clone();
        let record = Record::Ram(RamRecord::MemSize(MemSize { total, blocks }));
        Ok((Phase::RamRecords { section_id }, Step::Emit(record)))
    }
}
