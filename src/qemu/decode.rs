//! The incremental, sans-IO decoder of QEMU's main migration channel.
//!
//! ```text
//!             ┌────────┐   ┌───────────────┐
//!   bytes ──▶ │ Header │──▶│ Configuration │──┐
//!             └────────┘   └───────────────┘  ▼
//!   ┌──────────────────────────────────── TopLevel ◀──────────────┐
//!   │ START/PART/END "ram"   COMMAND   PACKAGED         FULL / other START
//!   ▼                          │          ▼                  ▼
//! RamRecords ──▶ PagePayload   │      Packaged(n) ──┐   DeviceState (opaque)
//!   │  ▲  ▲─────────┘          └────────────────────┤        │ tail `00 06 len {`
//!   │  └── MemSizeBlocks                            │        ▼
//!   └─ EOS ─▶ Footer ───────────────────────────────┴─▶  AfterEof ──▶ Done
//! ```
//!
//! The decoder keeps its place in [`Phase`]: a record whose header is complete is
//! consumed at once, and a page payload that has not fully arrived is waited for in
//! `PagePayload` without parsing its header again. Small headers (at most a few
//! hundred bytes, bounded by [`Limits`]) are checked for completeness before they are
//! consumed. Every error is fatal: the decoder stays failed.

use bytes::{Buf, Bytes, BytesMut};

use super::Limits;
use super::cursor::Cursor;
use super::record::{
    Command, ConfigSubsection, Configuration, MemSize, PageAddr, RamBlock, RamRecord, Record,
    SectionHeader,
};
use super::tail;
use super::wire::{self, command, ram_flag, record_type};
use crate::error::{Error, Result};

/// The page size of every x86 target (`TARGET_PAGE_BITS` = 12).
pub const DEFAULT_PAGE_SIZE: usize = 4096;

/// Decodes a QEMU main-channel migration stream into [`Record`]s.
///
/// Feed it bytes as they arrive: [`decode`](Self::decode) returns `Ok(None)` when it
/// needs more, `Ok(Some(record))` after consuming a record's bytes from the front of
/// the buffer, or an error (after which it stays failed). At the end of the input
/// call [`decode_eof`](Self::decode_eof) until it returns `Ok(None)`; it fails with
/// [`Error::Truncated`] if the stream stopped before its end.
///
/// ```
/// use bytes::BytesMut;
/// use migstream::qemu::{QemuDecoder, Record};
///
/// let mut dec = QemuDecoder::new();
/// let mut buf = BytesMut::from(&b"QEVM\0\0\0\x03\0"[..]); // header, then EOF
/// assert_eq!(dec.decode(&mut buf)?, Some(Record::Header));
/// assert_eq!(dec.decode_eof(&mut buf)?, Some(Record::Eof));
/// assert_eq!(dec.decode_eof(&mut buf)?, None);
/// # Ok::<(), migstream::Error>(())
/// ```
#[derive(Debug)]
pub struct QemuDecoder {
    limits: Limits,
    page_size: usize,
    phase: Phase,
    /// Stream offset of the first byte not yet consumed.
    offset: u64,
    ram: RamState,
}

/// What the RAM section's records depend on, learnt along the stream.
#[derive(Debug, Default)]
struct RamState {
    section_id: Option<u32>,
    blocks: Vec<RamBlock>,
    /// Index of the block of the last page record, which CONTINUE refers to.
    current: Option<usize>,
    /// `x-ignore-shared` announced: every listed block carries its `mr_addr`.
    ignore_shared: bool,
    /// `mapped-ram` announced: pages live at file offsets, not in the stream.
    mapped_ram: bool,
    /// Postcopy advised with huge-page blocks: some block entries carry a page size
    /// that the stream cannot reveal.
    huge_page_blocks: bool,
}

#[derive(Debug)]
enum Phase {
    Header,
    Configuration,
    TopLevel,
    RamRecords {
        section_id: u32,
    },
    MemSizeBlocks {
        section_id: u32,
        total: u64,
        listed: u64,
        blocks: Vec<RamBlock>,
    },
    PagePayload {
        section_id: u32,
        kind: PayloadKind,
        addr: PageAddr,
        len: usize,
    },
    Footer {
        section_id: u32,
    },
    Packaged {
        remaining: u64,
    },
    DeviceState,
    AfterEof,
    Done,
    Failed,
}

impl Phase {
    /// What the decoder was reading, for a truncation error.
    fn reading(&self) -> &'static str {
        match self {
            Self::Header => "file header",
            Self::Configuration => "configuration",
            Self::TopLevel | Self::Footer { .. } => "record before EOF",
            Self::RamRecords { .. } => "RAM record",
            Self::MemSizeBlocks { .. } => "RAM block list",
            Self::PagePayload { .. } => "page payload",
            Self::Packaged { .. } => "packaged command data",
            Self::DeviceState => "device state before EOF",
            Self::AfterEof | Self::Done | Self::Failed => "device description",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum PayloadKind {
    Page,
    Xbzrle,
    Compressed,
}

impl PayloadKind {
    fn record(self, addr: PageAddr, data: Bytes) -> Record {
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

/// What one step of the state machine did.
enum Step {
    Emit(Record),
    NeedMore,
    Continue,
}

impl Default for QemuDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl QemuDecoder {
    /// A decoder for x86 streams (4 KiB target pages) with default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A decoder with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            page_size: DEFAULT_PAGE_SIZE,
            phase: Phase::Header,
            offset: 0,
            ram: RamState::default(),
        }
    }

    /// Sets the target page size for streams of targets other than x86 whose page
    /// size is not announced in the configuration. Must be a power of two from 1 KiB
    /// to 64 KiB.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        assert!(
            page_size.is_power_of_two() && (1024..=65536).contains(&page_size),
            "target page size must be a power of two from 1 KiB to 64 KiB"
        );
        self.page_size = page_size;
        self
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits; they apply from the next record on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The target page size in force.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Stream offset of the next byte to be consumed (= bytes consumed so far).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the stream has reached its EOF record.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::AfterEof | Phase::Done)
    }

    /// Decodes the next record from the front of `src`, or asks for more bytes.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Record>> {
        self.run(src, false)
    }

    /// Like [`decode`](Self::decode), for when no more bytes will come: returns the
    /// remaining records, then `Ok(None)` if the stream ended where a stream may end.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Record>> {
        match self.run(src, true)? {
            Some(record) => Ok(Some(record)),
            None if src.is_empty() && self.is_finished() => Ok(None),
            None => {
                let field = self.phase.reading();
                self.phase = Phase::Failed;
                Err(Error::Truncated {
                    offset: self.offset + src.len() as u64,
                    field,
                })
            }
        }
    }

    fn run(&mut self, src: &mut BytesMut, at_end: bool) -> Result<Option<Record>> {
        loop {
            // A step that fails leaves `Failed` behind: every error is fatal.
            let phase = std::mem::replace(&mut self.phase, Phase::Failed);
            let (next, step) = self.step(phase, src, at_end)?;
            self.phase = next;
            match step {
                Step::Emit(record) => return Ok(Some(record)),
                Step::NeedMore => return Ok(None),
                Step::Continue => {}
            }
        }
    }

    fn step(&mut self, phase: Phase, src: &mut BytesMut, at_end: bool) -> Result<(Phase, Step)> {
        match phase {
            Phase::Header => self.header(src),
            Phase::Configuration => self.configuration(src),
            Phase::TopLevel => self.top_level(src),
            Phase::RamRecords { section_id } => self.ram_record(src, section_id),
            Phase::MemSizeBlocks {
                section_id,
                total,
                listed,
                blocks,
            } => self.mem_size_blocks(src, section_id, total, listed, blocks),
            Phase::PagePayload {
                section_id,
                kind,
                addr,
                len,
            } => {
                if src.len() < len {
                    let phase = Phase::PagePayload {
                        section_id,
                        kind,
                        addr,
                        len,
                    };
                    return Ok((phase, Step::NeedMore));
                }
                let data = self.take(src, len);
                Ok((
                    Phase::RamRecords { section_id },
                    Step::Emit(kind.record(addr, data)),
                ))
            }
            Phase::Footer { section_id } => self.footer(src, section_id),
            Phase::Packaged { remaining } => {
                if remaining == 0 {
                    return Ok((Phase::TopLevel, Step::Continue));
                }
                if src.is_empty() {
                    return Ok((Phase::Packaged { remaining }, Step::NeedMore));
                }
                let n = src
                    .len()
                    .min(self.limits.max_opaque_chunk)
                    .min(remaining as usize);
                let chunk = self.take(src, n);
                let remaining = remaining - n as u64;
                Ok((
                    Phase::Packaged { remaining },
                    Step::Emit(Record::Opaque(chunk)),
                ))
            }
            Phase::DeviceState => self.device_state(src, at_end),
            Phase::AfterEof => self.vm_description(src),
            Phase::Done => match src.is_empty() {
                true => Ok((Phase::Done, Step::NeedMore)),
                false => {
                    Err(self.malformed(0, "trailing bytes", "bytes after the device description"))
                }
            },
            Phase::Failed => Err(self.malformed(0, "stream", "the decoder failed earlier")),
        }
    }

    fn header(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        let mut c = Cursor::new(src);
        let (Some(magic), Some(version)) = (c.be32(), c.be32()) else {
            return Ok((Phase::Header, Step::NeedMore));
        };
        if magic != wire::FILE_MAGIC {
            return Err(self.malformed(0, "file magic", "not \"QEVM\""));
        }
        if version == wire::FILE_VERSION_COMPAT {
            return Err(self.unsupported(4, "file version", "obsolete version 2"));
        }
        if version != wire::FILE_VERSION {
            return Err(self.malformed(4, "file version", "not 3"));
        }
        self.skip(src, 8);
        Ok((Phase::Configuration, Step::Emit(Record::Header)))
    }

    fn configuration(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        match src.first() {
            None => return Ok((Phase::Configuration, Step::NeedMore)),
            Some(&record_type::CONFIGURATION) => {}
            Some(_) => return Ok((Phase::TopLevel, Step::Continue)),
        }
        let Some((config, len)) = self.parse_configuration(src)? else {
            if src.len() > self.limits.max_config_len {
                return Err(self.limit(
                    0,
                    "configuration length",
                    src.len(),
                    self.limits.max_config_len,
                ));
            }
            return Ok((Phase::Configuration, Step::NeedMore));
        };
        if len > self.limits.max_config_len {
            return Err(self.limit(0, "configuration length", len, self.limits.max_config_len));
        }
        for sub in &config.subsections {
            match sub {
                ConfigSubsection::TargetPageBits(bits) => {
                    if !(10..=16).contains(bits) {
                        return Err(self.unsupported(
                            0,
                            "target page bits",
                            "page size outside 1 KiB..64 KiB",
                        ));
                    }
                    self.page_size = 1 << bits;
                }
                ConfigSubsection::Capabilities(names) => {
                    for name in names {
                        match &name[..] {
                            b"x-ignore-shared" => self.ram.ignore_shared = true,
                            b"mapped-ram" => self.ram.mapped_ram = true,
                            _ => {}
                        }
                    }
                }
                ConfigSubsection::Uuid(_) => {}
            }
        }
        self.skip(src, len);
        Ok((Phase::TopLevel, Step::Emit(Record::Configuration(config))))
    }

    /// Parses a whole configuration record (type byte included) if `buf` holds it
    /// and the byte after it, which tells whether another subsection follows.
    fn parse_configuration(&self, buf: &[u8]) -> Result<Option<(Configuration, usize)>> {
        const PREFIX: &[u8] = wire::CONFIGURATION_NAME;
        let mut c = Cursor::new(buf);
        c.u8();
        let Some(len) = c.be32() else { return Ok(None) };
        let len = len as usize;
        if len > self.limits.max_config_len {
            return Err(self.limit(1, "machine type length", len, self.limits.max_config_len));
        }
        let Some(machine) = c.take(len) else {
            return Ok(None);
        };
        let mut config = Configuration {
            machine: Bytes::copy_from_slice(machine),
            subsections: Vec::new(),
        };
        // QEMU's loader finds the end of a VMState by peeking: a subsection follows
        // only if the next bytes are 0x05 and a name starting with the parent's.
        loop {
            let at = c.pos();
            match c.peek(0, 2) {
                None => return Ok(None),
                Some(&[record_type::SUBSECTION, n]) if usize::from(n) > PREFIX.len() => {}
                Some(_) => return Ok(Some((config, at))),
            }
            let Some(name) = Cursor::new(&buf[at + 1..]).cstr8() else {
                return Ok(None);
            };
            if !name.starts_with(PREFIX) {
                return Ok(Some((config, at)));
            }
            c.take(2 + name.len());
            let Some(version) = c.be32() else {
                return Ok(None);
            };
            let sub = match name {
                b"configuration/target-page-bits" => match c.be32() {
                    Some(bits) => ConfigSubsection::TargetPageBits(bits),
                    None => return Ok(None),
                },
                b"configuration/capabilities" => {
                    let Some(count) = c.be32() else {
                        return Ok(None);
                    };
                    if count as usize > self.limits.max_capabilities {
                        let limit = self.limits.max_capabilities;
                        return Err(self.limit(
                            c.pos() - 4,
                            "capability count",
                            count as usize,
                            limit,
                        ));
                    }
                    let mut names = Vec::new();
                    for _ in 0..count {
                        let Some(name) = c.cstr8() else {
                            return Ok(None);
                        };
                        names.push(Bytes::copy_from_slice(name));
                    }
                    ConfigSubsection::Capabilities(names)
                }
                b"configuration/uuid" => match c.take(16) {
                    Some(uuid) => ConfigSubsection::Uuid(uuid.try_into().expect("16 bytes")),
                    None => return Ok(None),
                },
                _ => {
                    return Err(self.unsupported(
                        at,
                        "configuration subsection",
                        "unknown subsection name",
                    ));
                }
            };
            if version != 1 {
                return Err(self.unsupported(at, "configuration subsection version", "not 1"));
            }
            config.subsections.push(sub);
        }
    }

    fn top_level(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        let Some(&kind) = src.first() else {
            return Ok((Phase::TopLevel, Step::NeedMore));
        };
        match kind {
            record_type::SECTION_START | record_type::SECTION_FULL => self.full_section(src, kind),
            record_type::SECTION_PART | record_type::SECTION_END => {
                let Some(section_id) = Cursor::new(&src[1..]).be32() else {
                    return Ok((Phase::TopLevel, Step::NeedMore));
                };
                if Some(section_id) != self.ram.section_id {
                    return Err(self.malformed(
                        1,
                        "section id",
                        "no live section with this id was started",
                    ));
                }
                self.skip(src, 5);
                let record = match kind {
                    record_type::SECTION_PART => Record::SectionPart { section_id },
                    _ => Record::SectionEnd { section_id },
                };
                Ok((Phase::RamRecords { section_id }, Step::Emit(record)))
            }
            record_type::COMMAND => self.command(src),
            record_type::EOF => {
                self.skip(src, 1);
                Ok((Phase::AfterEof, Step::Emit(Record::Eof)))
            }
            record_type::CONFIGURATION => {
                Err(self.malformed(0, "record type", "configuration not right after the header"))
            }
            record_type::SECTION_FOOTER => {
                Err(self.malformed(0, "record type", "section footer outside a section"))
            }
            record_type::VMDESCRIPTION => {
                Err(self.malformed(0, "record type", "device description before EOF"))
            }
            _ => Err(self.malformed(0, "record type", "unknown record type")),
        }
    }

    fn full_section(&mut self, src: &mut BytesMut, kind: u8) -> Result<(Phase, Step)> {
        let mut c = Cursor::new(&src[1..]);
        let (Some(section_id), Some(idstr), Some(instance_id), Some(version_id)) =
            (c.be32(), c.cstr8(), c.be32(), c.be32())
        else {
            return Ok((Phase::TopLevel, Step::NeedMore));
        };
        let len = 1 + c.pos();
        let idstr_len = idstr.len();
        if kind == record_type::SECTION_START && idstr == wire::RAM_IDSTR {
            if self.ram.section_id.is_some() {
                return Err(self.malformed(1, "section id", "a second RAM section was started"));
            }
            if version_id != wire::RAM_VERSION {
                return Err(self.unsupported(len - 4, "RAM section version", "not 4"));
            }
        }
        let bytes = self.take(src, len);
        let header = SectionHeader {
            section_id,
            idstr: bytes.slice(6..6 + idstr_len),
            instance_id,
            version_id,
        };
        if kind == record_type::SECTION_FULL {
            return Ok((Phase::DeviceState, Step::Emit(Record::SectionFull(header))));
        }
        // A live section other than RAM (block migration, dirty bitmaps, VFIO) has a
        // payload format this crate does not parse: the rest passes through opaquely.
        let next = match header.idstr == wire::RAM_IDSTR {
            true => {
                self.ram.section_id = Some(section_id);
                Phase::RamRecords { section_id }
            }
            false => Phase::DeviceState,
        };
        Ok((next, Step::Emit(Record::SectionStart(header))))
    }

    fn command(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        let mut c = Cursor::new(&src[1..]);
        let (Some(cmd), Some(len)) = (c.be16(), c.be16()) else {
            return Ok((Phase::TopLevel, Step::NeedMore));
        };
        if cmd == 0 {
            return Err(self.malformed(1, "command", "command 0 is invalid"));
        }
        if cmd > command::SWITCHOVER_START {
            return Err(self.unsupported(1, "command", "unknown command"));
        }
        if command::fixed_len(cmd).is_some_and(|fixed| fixed != len)
            || (cmd == command::POSTCOPY_ADVISE && len != 0 && len != 16)
        {
            return Err(self.malformed(3, "command length", "not the command's fixed length"));
        }
        let len = usize::from(len);
        if len > self.limits.max_command_len {
            return Err(self.limit(3, "command length", len, self.limits.max_command_len));
        }
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok((Phase::TopLevel, Step::NeedMore));
        }
        let payload = self.take(src, 5 + len).slice(5..);
        let mut next = Phase::TopLevel;
        match cmd {
            command::PACKAGED => {
                let remaining =
                    u64::from(u32::from_be_bytes(payload[..].try_into().expect("len 4")));
                next = Phase::Packaged { remaining };
            }
            command::POSTCOPY_ADVISE if len == 16 => {
                let summary = u64::from_be_bytes(payload[..8].try_into().expect("len 16"));
                self.ram.huge_page_blocks = summary != self.page_size as u64;
            }
            _ => {}
        }
        Ok((next, Step::Emit(Record::Command(Command { cmd, payload }))))
    }

    /// The hot path: one record of a RAM section payload.
    fn ram_record(&mut self, src: &mut BytesMut, section_id: u32) -> Result<(Phase, Step)> {
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
            return Err(self.malformed(
                0,
                "RAM record flags",
                "CONTINUE on a record without a page",
            ));
        }
        match kind {
            ram_flag::MEM_SIZE => {
                if self.ram.mapped_ram {
                    return Err(self.unsupported(0, "RAM setup", "mapped-ram streams"));
                }
                if self.ram.huge_page_blocks {
                    return Err(self.unsupported(
                        0,
                        "RAM setup",
                        "postcopy with huge-page RAM blocks",
                    ));
                }
                if !self.ram.blocks.is_empty() {
                    return Err(self.malformed(0, "RAM setup", "a second block list"));
                }
                self.skip(src, 8);
                let phase = Phase::MemSizeBlocks {
                    section_id,
                    total: offset,
                    listed: 0,
                    blocks: Vec::new(),
                };
                Ok((phase, Step::Continue))
            }
            ram_flag::EOS | ram_flag::MULTIFD_FLUSH if offset == 0 => {
                self.skip(src, 8);
                match kind {
                    ram_flag::EOS => Ok((
                        Phase::Footer { section_id },
                        Step::Emit(Record::Ram(RamRecord::Eos)),
                    )),
                    _ => Ok((here, Step::Emit(Record::Ram(RamRecord::MultifdFlush)))),
                }
            }
            ram_flag::EOS | ram_flag::MULTIFD_FLUSH => Err(self.malformed(
                0,
                "RAM record offset",
                "non-zero on a record without a page",
            )),
            ram_flag::HOOK => Err(self.unsupported(0, "RAM record flags", "RDMA hook")),
            _ => Err(self.malformed(0, "RAM record flags", "unknown flag combination")),
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
                    return Err(self.malformed(
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
                    return Err(self.malformed(8, "RAM block name", "not in the setup block list"));
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
                    return Err(self.malformed(name_end, "XBZRLE encoding", "not 0x01"));
                }
                if usize::from(len) > self.page_size {
                    return Err(self.malformed(
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
                    return Err(self.malformed(
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
            return Err(self.malformed(0, "RAM record offset", "beyond the end of its RAM block"));
        }
        let addr = PageAddr {
            block: ram_block.idstr.clone(),
            offset,
            continued,
        };
        self.ram.current = Some(block);
        self.skip(src, 8 + c.pos());
        let kind = match body {
            Body::Payload(kind) => kind,
            Body::Fill(fill) => {
                return Ok((
                    here,
                    Step::Emit(Record::Ram(RamRecord::Zero { addr, fill })),
                ));
            }
        };
        if src.len() >= len {
            let data = self.take(src, len);
            return Ok((here, Step::Emit(kind.record(addr, data))));
        }
        src.reserve(len - src.len());
        let phase = Phase::PagePayload {
            section_id,
            kind,
            addr,
            len,
        };
        Ok((phase, Step::NeedMore))
    }

    fn mem_size_blocks(
        &mut self,
        src: &mut BytesMut,
        section_id: u32,
        total: u64,
        mut listed: u64,
        mut blocks: Vec<RamBlock>,
    ) -> Result<(Phase, Step)> {
        while listed < total {
            if blocks.len() >= self.limits.max_ram_blocks {
                return Err(self.limit(
                    0,
                    "RAM block count",
                    blocks.len() + 1,
                    self.limits.max_ram_blocks,
                ));
            }
            let mut c = Cursor::new(src);
            let (Some(name), Some(used_length)) = (c.cstr8(), c.be64()) else {
                return Ok((
                    Phase::MemSizeBlocks {
                        section_id,
                        total,
                        listed,
                        blocks,
                    },
                    Step::NeedMore,
                ));
            };
            let mr_addr = match self.ram.ignore_shared {
                false => None,
                true => match c.be64() {
                    Some(addr) => Some(addr),
                    None => {
                        return Ok((
                            Phase::MemSizeBlocks {
                                section_id,
                                total,
                                listed,
                                blocks,
                            },
                            Step::NeedMore,
                        ));
                    }
                },
            };
            if name.is_empty() {
                return Err(self.malformed(0, "RAM block name", "empty"));
            }
            if blocks.iter().any(|b| b.idstr == name) {
                return Err(self.malformed(1, "RAM block name", "listed twice"));
            }
            listed = match listed.checked_add(used_length) {
                Some(sum) if sum <= total => sum,
                _ => {
                    return Err(self.malformed(
                        1 + name.len(),
                        "RAM block length",
                        "blocks exceed the total RAM size",
                    ));
                }
            };
            let idstr = Bytes::copy_from_slice(name);
            self.skip(src, c.pos());
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

    fn footer(&mut self, src: &mut BytesMut, section_id: u32) -> Result<(Phase, Step)> {
        match src.first() {
            None => return Ok((Phase::Footer { section_id }, Step::NeedMore)),
            Some(&record_type::SECTION_FOOTER) => {}
            Some(_) => return Ok((Phase::TopLevel, Step::Continue)),
        }
        let Some(id) = Cursor::new(&src[1..]).be32() else {
            return Ok((Phase::Footer { section_id }, Step::NeedMore));
        };
        if id != section_id {
            return Err(self.malformed(
                1,
                "section footer",
                "section id differs from the section's",
            ));
        }
        self.skip(src, 5);
        Ok((Phase::TopLevel, Step::Emit(Record::Footer { section_id })))
    }

    fn device_state(&mut self, src: &mut BytesMut, at_end: bool) -> Result<(Phase, Step)> {
        let opaque = tail::device_state_len(src, self.limits.max_vmdesc_len, at_end);
        if opaque > 0 {
            let chunk = self.take(src, opaque.min(self.limits.max_opaque_chunk));
            return Ok((Phase::DeviceState, Step::Emit(Record::Opaque(chunk))));
        }
        if !at_end || src.is_empty() {
            return Ok((Phase::DeviceState, Step::NeedMore));
        }
        // The stream ended exactly after `00 [06 len json]`: EOF and its description.
        self.skip(src, 1);
        Ok((Phase::AfterEof, Step::Emit(Record::Eof)))
    }

    fn vm_description(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        match src.first() {
            None => return Ok((Phase::AfterEof, Step::NeedMore)),
            Some(&record_type::VMDESCRIPTION) => {}
            Some(_) => {
                return Err(self.malformed(
                    0,
                    "record type",
                    "only the device description may follow EOF",
                ));
            }
        }
        let Some(len) = Cursor::new(&src[1..]).be32() else {
            return Ok((Phase::AfterEof, Step::NeedMore));
        };
        let len = len as usize;
        if len > self.limits.max_vmdesc_len {
            return Err(self.limit(
                1,
                "device description length",
                len,
                self.limits.max_vmdesc_len,
            ));
        }
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok((Phase::AfterEof, Step::NeedMore));
        }
        let json = self.take(src, 5 + len).slice(5..);
        Ok((Phase::Done, Step::Emit(Record::VmDescription(json))))
    }

    fn take(&mut self, src: &mut BytesMut, n: usize) -> Bytes {
        self.offset += n as u64;
        src.split_to(n).freeze()
    }

    fn skip(&mut self, src: &mut BytesMut, n: usize) {
        self.offset += n as u64;
        src.advance(n);
    }

    fn malformed(&self, at: usize, field: &'static str, reason: &'static str) -> Error {
        let offset = self.offset + at as u64;
        Error::Malformed {
            offset,
            field,
            reason,
        }
    }

    fn unsupported(&self, at: usize, field: &'static str, reason: &'static str) -> Error {
        let offset = self.offset + at as u64;
        Error::Unsupported {
            offset,
            field,
            reason,
        }
    }

    fn limit(&self, at: usize, field: &'static str, value: usize, limit: usize) -> Error {
        Error::LimitExceeded {
            offset: self.offset + at as u64,
            field,
            value: value as u64,
            limit: limit as u64,
        }
    }
}
