//! The encoder: [`Record`]s back into the exact bytes QEMU wrote.

use bytes::{BufMut, BytesMut};

use super::decode::DEFAULT_PAGE_SIZE;
use super::record::{ConfigSubsection, PageAddr, RamRecord, Record, SectionHeader};
use super::wire::{self, ram_flag, record_type};
use crate::error::{Error, Result};

/// Writes [`Record`]s as QEMU's main-channel bytes.
///
/// For every stream the [`QemuDecoder`](super::QemuDecoder) accepts, encoding its
/// records in order gives back the consumed bytes exactly. Records are checked on
/// the way out ([`Error::InvalidRecord`]) so that a resolver bug cannot produce a
/// stream QEMU would misread: a page of the wrong size, a CONTINUE that would refer
/// to another block, a name too long for its length byte.
#[derive(Debug)]
pub struct QemuEncoder {
    page_size: usize,
    /// The block of the last page record written, which CONTINUE refers to.
    last_block: Option<bytes::Bytes>,
}

impl Default for QemuEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuEncoder {
    /// An encoder for x86 streams (4 KiB target pages).
    pub fn new() -> Self {
        Self {
            page_size: DEFAULT_PAGE_SIZE,
            last_block: None,
        }
    }

    /// Sets the target page size (see [`QemuDecoder::with_page_size`](super::QemuDecoder::with_page_size)).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = wire::checked_page_size(page_size);
        self
    }

    /// Appends the bytes of `record` to `dst`.
    pub fn encode(&mut self, record: &Record, dst: &mut BytesMut) -> Result<()> {
        match record {
            Record::Header => {
                dst.put_u32(wire::FILE_MAGIC);
                dst.put_u32(wire::FILE_VERSION);
            }
            Record::Configuration(config) => {
                let machine_len = u32::try_from(config.machine.len())
                    .map_err(|_| invalid("configuration machine", "longer than 4 GiB"))?;
                dst.put_u8(record_type::CONFIGURATION);
                dst.put_u32(machine_len);
                dst.put_slice(&config.machine);
                for sub in &config.subsections {
                    dst.put_u8(record_type::SUBSECTION);
                    put_cstr8(dst, sub.name(), "configuration subsection")?;
                    dst.put_u32(1);
                    match sub {
                        ConfigSubsection::TargetPageBits(bits) => {
                            dst.put_u32(*bits);
                            if (10..=16).contains(bits) {
                                self.page_size = 1 << bits;
                            }
                        }
                        ConfigSubsection::Capabilities(names) => {
                            let count = u32::try_from(names.len())
                                .map_err(|_| invalid("capabilities", "more than 2^32"))?;
                            dst.put_u32(count);
                            for name in names {
                                put_cstr8(dst, name, "capability name")?;
                            }
                        }
                        ConfigSubsection::Uuid(uuid) => dst.put_slice(uuid),
                    }
                }
            }
            Record::SectionStart(header) => {
                put_full_header(dst, record_type::SECTION_START, header)?
            }
            Record::SectionFull(header) => put_full_header(dst, record_type::SECTION_FULL, header)?,
            Record::SectionPart { section_id } => {
                dst.put_u8(record_type::SECTION_PART);
                dst.put_u32(*section_id);
            }
            Record::SectionEnd { section_id } => {
                dst.put_u8(record_type::SECTION_END);
                dst.put_u32(*section_id);
            }
            Record::Footer { section_id } => {
                dst.put_u8(record_type::SECTION_FOOTER);
                dst.put_u32(*section_id);
            }
            Record::Ram(ram) => self.encode_ram(ram, dst)?,
            Record::Command(command) => {
                let len = u16::try_from(command.payload.len())
                    .map_err(|_| invalid("command payload", "longer than 65535 bytes"))?;
                dst.reserve(5 + command.payload.len());
                dst.put_u8(record_type::COMMAND);
                dst.put_u16(command.cmd);
                dst.put_u16(len);
                dst.put_slice(&command.payload);
            }
            Record::Opaque(bytes) => dst.extend_from_slice(bytes),
            Record::Eof => dst.put_u8(record_type::EOF),
            Record::VmDescription(json) => {
                let len = u32::try_from(json.len())
                    .map_err(|_| invalid("device description", "longer than 4 GiB"))?;
                dst.reserve(5 + json.len());
                dst.put_u8(record_type::VMDESCRIPTION);
                dst.put_u32(len);
                dst.put_slice(json);
            }
        }
        Ok(())
    }

    fn encode_ram(&mut self, ram: &RamRecord, dst: &mut BytesMut) -> Result<()> {
        match ram {
            RamRecord::MemSize(mem) => {
                let listed = mem
                    .blocks
                    .iter()
                    .try_fold(0u64, |sum, b| sum.checked_add(b.used_length));
                if listed != Some(mem.total) {
                    return Err(invalid(
                        "RAM block list",
                        "block lengths do not add up to the total",
                    ));
                }
                self.put_word(dst, mem.total, ram_flag::MEM_SIZE)?;
                for block in &mem.blocks {
                    put_cstr8(dst, &block.idstr, "RAM block name")?;
                    dst.put_u64(block.used_length);
                    if let Some(addr) = block.mr_addr {
                        dst.put_u64(addr);
                    }
                }
            }
            RamRecord::Page { addr, data } => {
                if data.len() != self.page_size {
                    return Err(invalid("page data", "not exactly one target page"));
                }
                dst.reserve(8 + 256 + data.len());
                self.put_page_header(dst, addr, ram_flag::PAGE)?;
                dst.put_slice(data);
            }
            RamRecord::Zero { addr, fill } => {
                self.put_page_header(dst, addr, ram_flag::ZERO)?;
                dst.put_u8(*fill);
            }
            RamRecord::Xbzrle { addr, data } => {
                if data.len() > self.page_size {
                    return Err(invalid("XBZRLE data", "longer than a page"));
                }
                dst.reserve(8 + 256 + 3 + data.len());
                self.put_page_header(dst, addr, ram_flag::XBZRLE)?;
                dst.put_u8(wire::XBZRLE_ENCODING);
                dst.put_u16(data.len() as u16);
                dst.put_slice(data);
            }
            RamRecord::Compressed { addr, data } => {
                if data.len() > wire::zlib_compress_bound(self.page_size) {
                    return Err(invalid(
                        "compressed page",
                        "longer than zlib's bound for a page",
                    ));
                }
                dst.reserve(8 + 256 + 4 + data.len());
                self.put_page_header(dst, addr, ram_flag::COMPRESS_PAGE)?;
                dst.put_u32(data.len() as u32);
                dst.put_slice(data);
            }
            RamRecord::MultifdFlush => dst.put_u64(ram_flag::MULTIFD_FLUSH),
            RamRecord::Eos => dst.put_u64(ram_flag::EOS),
        }
        Ok(())
    }

    /// Appends the bytes of a PAGE record that come before its data (the record word
    /// and, unless CONTINUE, the block name), for writers that send the page bytes
    /// themselves (vectored IO) or replace them (the dedup stream). The page data must
    /// follow: exactly one target page.
    pub fn encode_page_header(&mut self, addr: &PageAddr, dst: &mut BytesMut) -> Result<()> {
        self.put_page_header(dst, addr, ram_flag::PAGE)
    }

    /// The record word and, unless CONTINUE, the block name.
    fn put_page_header(&mut self, dst: &mut BytesMut, addr: &PageAddr, flag: u64) -> Result<()> {
        if addr.continued && self.last_block.as_ref() != Some(&addr.block) {
            return Err(invalid(
                "page address",
                "CONTINUE with a block other than the previous page's",
            ));
        }
        if addr.offset & (self.page_size as u64 - 1) != 0 {
            return Err(invalid(
                "RAM record offset",
                "not aligned to the target page size",
            ));
        }
        if addr.block.len() > 255 {
            return Err(invalid("RAM block name", "longer than 255 bytes"));
        }
        put_page_header(dst, addr.offset, flag, addr.continued, &addr.block);
        if !addr.continued && self.last_block.as_ref() != Some(&addr.block) {
            self.last_block = Some(addr.block.clone());
        }
        Ok(())
    }

    fn put_word(&self, dst: &mut BytesMut, offset: u64, flags: u64) -> Result<()> {
        if offset & (self.page_size as u64 - 1) != 0 {
            return Err(invalid(
                "RAM record offset",
                "not aligned to the target page size",
            ));
        }
        dst.put_u64(offset | flags);
        Ok(())
    }
}

/// The header of a page-carrying RAM record: word, then the block name unless
/// CONTINUE. `offset` is page aligned and `block` at most 255 bytes.
pub(crate) fn put_page_header(
    dst: &mut BytesMut,
    offset: u64,
    flag: u64,
    continued: bool,
    block: &[u8],
) {
    match continued {
        true => dst.put_u64(offset | flag | ram_flag::CONTINUE),
        false => {
            dst.put_u64(offset | flag);
            dst.put_u8(block.len() as u8);
            dst.put_slice(block);
        }
    }
}

fn put_full_header(dst: &mut BytesMut, kind: u8, header: &SectionHeader) -> Result<()> {
    dst.put_u8(kind);
    dst.put_u32(header.section_id);
    put_cstr8(dst, &header.idstr, "section idstr")?;
    dst.put_u32(header.instance_id);
    dst.put_u32(header.version_id);
    Ok(())
}

fn put_cstr8(dst: &mut BytesMut, s: &[u8], field: &'static str) -> Result<()> {
    let len = u8::try_from(s.len()).map_err(|_| invalid(field, "longer than 255 bytes"))?;
    dst.put_u8(len);
    dst.put_slice(s);
    Ok(())
}

fn invalid(field: &'static str, reason: &'static str) -> Error {
    Error::InvalidRecord { field, reason }
}
