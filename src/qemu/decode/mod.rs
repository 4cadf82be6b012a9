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

use bytes::BytesMut;

use super::Limits;
use super::drive::{self, Phase as _};
mod config;
mod position;
mod ram;

pub(crate) use position::Position;
use ram::PayloadKind;

use super::record::{Command, PageAddr, RamBlock, Record, SectionHeader};
use super::tail;
use super::wire::{self, command, record_type};
use crate::cursor::Cursor;
use crate::error::Result;

/// The page size of every x86 target (`TARGET_PAGE_BITS` = 12).
pub const DEFAULT_PAGE_SIZE: usize = 4096;

/// Decodes a QEMU main-channel migration stream into [`Record`]s.
///
/// Feed it bytes as they arrive: [`decode`](Self::decode) returns `Ok(None)` when it
/// needs more, `Ok(Some(record))` after consuming a record's bytes from the front of
/// the buffer, or an error (after which it stays failed). At the end of the input
/// call [`decode_eof`](Self::decode_eof) until it returns `Ok(None)`; it fails with
/// [`Error::Truncated`](crate::Error::Truncated) if the stream stopped before its end.
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
    /// The first byte not yet consumed.
    pos: Position,
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
pub(crate) enum Phase {
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

impl drive::Phase for Phase {
    const FAILED: Self = Self::Failed;

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

    /// After the EOF record.
    fn may_end(&self) -> bool {
        matches!(self, Self::AfterEof | Self::Done)
    }
}

type Step = drive::Step<Record>;

impl drive::Machine for QemuDecoder {
    type Phase = Phase;
    type Record = Record;

    fn phase_mut(&mut self) -> &mut Phase {
        &mut self.phase
    }

    fn position(&self) -> Position {
        self.pos
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
                let data = self.pos.take(src, len);
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
                let n = src.len().min(self.opaque_chunk()).min(remaining as usize);
                let chunk = self.pos.take(src, n);
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
                false => Err(self.pos.malformed(
                    0,
                    "trailing bytes",
                    "bytes after the device description",
                )),
            },
            Phase::Failed => Err(self
                .pos
                .malformed(0, "stream", "the decoder failed earlier")),
        }
    }
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
            pos: Position::default(),
            ram: RamState::default(),
        }
    }

    /// Sets the target page size for streams of targets other than x86 whose page
    /// size is not announced in the configuration. Must be a power of two from 1 KiB
    /// to 64 KiB.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = wire::checked_page_size(page_size);
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
        self.pos.offset()
    }

    /// Whether the stream has reached its EOF record.
    pub fn is_finished(&self) -> bool {
        self.phase.may_end()
    }

    /// Decodes the next record from the front of `src`, or asks for more bytes.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Record>> {
        drive::run(self, src, false)
    }

    /// Like [`decode`](Self::decode), for when no more bytes will come: returns the
    /// remaining records, then `Ok(None)` if the stream ended where a stream may end.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Record>> {
        drive::run_eof(self, src)
    }

    fn header(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        let mut c = Cursor::new(src);
        let (Some(magic), Some(version)) = (c.be32(), c.be32()) else {
            return Ok((Phase::Header, Step::NeedMore));
        };
        if magic != wire::FILE_MAGIC {
            return Err(self.pos.malformed(0, "file magic", "not \"QEVM\""));
        }
        if version == wire::FILE_VERSION_COMPAT {
            return Err(self
                .pos
                .unsupported(4, "file version", "obsolete version 2"));
        }
        if version != wire::FILE_VERSION {
            return Err(self.pos.malformed(4, "file version", "not 3"));
        }
        self.pos.skip(src, 8);
        Ok((Phase::Configuration, Step::Emit(Record::Header)))
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
                    return Err(self.pos.malformed(
                        1,
                        "section id",
                        "no live section with this id was started",
                    ));
                }
                self.pos.skip(src, 5);
                let record = match kind {
                    record_type::SECTION_PART => Record::SectionPart { section_id },
                    _ => Record::SectionEnd { section_id },
                };
                Ok((Phase::RamRecords { section_id }, Step::Emit(record)))
            }
            record_type::COMMAND => self.command(src),
            record_type::EOF => {
                self.pos.skip(src, 1);
                Ok((Phase::AfterEof, Step::Emit(Record::Eof)))
            }
            record_type::CONFIGURATION => Err(self.pos.malformed(
                0,
                "record type",
                "configuration not right after the header",
            )),
            record_type::SECTION_FOOTER => {
                Err(self
                    .pos
                    .malformed(0, "record type", "section footer outside a section"))
            }
            record_type::VMDESCRIPTION => {
                Err(self
                    .pos
                    .malformed(0, "record type", "device description before EOF"))
            }
            _ => Err(self.pos.malformed(0, "record type", "unknown record type")),
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
                return Err(self.pos.malformed(
                    1,
                    "section id",
                    "a second RAM section was started",
                ));
            }
            if version_id != wire::RAM_VERSION {
                return Err(self
                    .pos
                    .unsupported(len - 4, "RAM section version", "not 4"));
            }
        }
        let bytes = self.pos.take(src, len);
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
            return Err(self.pos.malformed(1, "command", "command 0 is invalid"));
        }
        if cmd > command::SWITCHOVER_START {
            return Err(self.pos.unsupported(1, "command", "unknown command"));
        }
        if command::fixed_len(cmd).is_some_and(|fixed| fixed != len)
            || (cmd == command::POSTCOPY_ADVISE && len != 0 && len != 16)
        {
            return Err(self
                .pos
                .malformed(3, "command length", "not the command's fixed length"));
        }
        let len = usize::from(len);
        if len > self.limits.max_command_len {
            return Err(self
                .pos
                .limit(3, "command length", len, self.limits.max_command_len));
        }
        if src.len() < 5 + len {
            src.reserve(5 + len - src.len());
            return Ok((Phase::TopLevel, Step::NeedMore));
        }
        let payload = self.pos.take(src, 5 + len).slice(5..);
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
            return Err(self.pos.malformed(
                1,
                "section footer",
                "section id differs from the section's",
            ));
        }
        self.pos.skip(src, 5);
        Ok((Phase::TopLevel, Step::Emit(Record::Footer { section_id })))
    }

    fn device_state(&mut self, src: &mut BytesMut, at_end: bool) -> Result<(Phase, Step)> {
        let opaque =
            tail::device_state_len(src, self.limits.max_vmdesc_len, at_end, self.opaque_chunk());
        if opaque > 0 {
            let chunk = self.pos.take(src, opaque);
            return Ok((Phase::DeviceState, Step::Emit(Record::Opaque(chunk))));
        }
        if !at_end || src.is_empty() {
            return Ok((Phase::DeviceState, Step::NeedMore));
        }
        // The stream ended exactly after `00 [06 len json]`: EOF and its description.
        self.pos.skip(src, 1);
        Ok((Phase::AfterEof, Step::Emit(Record::Eof)))
    }

    fn vm_description(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        match src.first() {
            None => return Ok((Phase::AfterEof, Step::NeedMore)),
            Some(&record_type::VMDESCRIPTION) => {}
            Some(_) => {
                return Err(self.pos.malformed(
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
            return Err(self.pos.limit(
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
        let json = self.pos.take(src, 5 + len).slice(5..);
        Ok((Phase::Done, Step::Emit(Record::VmDescription(json))))
    }

    /// The size of opaque chunks handed out (at least one byte, whatever the limits say).
    fn opaque_chunk(&self) -> usize {
        self.limits.max_opaque_chunk.max(1)
    }
}
