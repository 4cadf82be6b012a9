//! The incremental, sans-IO decoder of a multifd channel.
//!
//! ```text
//!            ┌──────────┐    ┌────────┐ prefix: RAM    ┌───────────┐    ┌────────────┐
//!  bytes ──▶ │ Greeting │───▶│ Packet │──────────────▶ │ RamHeader │───▶│ RamPayload │
//!            └──────────┘    └────────┘                └───────────┘    └────────────┘
//!                              ▲   │ prefix: DEVICE_STATE ┌──────────────┐  ┌───────────────┐
//!                              │   └────────────────────▶ │ DeviceHeader │─▶│ DevicePayload │
//!                              │                          └──────────────┘  └───────────────┘
//!                              └──── after every packet (straight from RamHeader when the
//!                                    page data is already there)
//! ```
//!
//! A packet's 12-byte prefix (magic, version, flags) is checked as soon as it is
//! there and its flags kept in the phase; the header is parsed once it is complete,
//! and consumed with its payload in one split when the payload is there too (the hot
//! path). Otherwise the header is consumed and the payload waited for in
//! `RamPayload`/`DevicePayload` without parsing the header again. Every error is
//! fatal: the decoder stays failed.

use bytes::{Bytes, BytesMut};

use super::Limits;
use super::record::{
    ChannelGreeting, ChannelRecord, Compression, DeviceStatePacket, Packet, Payload,
};
use super::wire::{self, flag};
use crate::cursor::Cursor;
use crate::error::Result;
use crate::qemu::DEFAULT_PAGE_SIZE;
use crate::qemu::decode::Position;
use crate::qemu::drive;
use crate::qemu::wire::checked_page_size;

/// Decodes one multifd channel (the bytes of one connection, from its first byte)
/// into [`ChannelRecord`]s: the greeting, then packets.
///
/// Feed it bytes as they arrive: [`decode`](Self::decode) returns `Ok(None)` when it
/// needs more, `Ok(Some(record))` after consuming a record's bytes from the front of
/// the buffer, or an error (after which it stays failed). At the end of the input
/// call [`decode_eof`](Self::decode_eof) until it returns `Ok(None)`; it fails with
/// [`Error::Truncated`](crate::Error::Truncated) if the channel stopped inside its greeting or a packet.
///
/// The same rules decode QEMU 7.2 and 10.0 channels; nothing needs to be told about
/// the sender's version. Only the target page size must be known (4 KiB unless set
/// with [`with_page_size`](Self::with_page_size)): it gives the number of offset
/// slots of every packet (512 KiB / page size) and the length of a raw page.
#[derive(Debug)]
pub struct MultifdDecoder {
    limits: Limits,
    page_size: usize,
    phase: Phase,
    /// The first byte not yet consumed.
    pos: Position,
    channel_id: Option<u8>,
}

#[derive(Debug)]
pub(crate) enum Phase {
    Greeting,
    /// At a packet boundary: nothing of the next packet is known.
    Packet,
    /// The prefix of a RAM packet is checked (not consumed); waiting for its header.
    RamHeader {
        flags: u32,
    },
    /// The header is consumed; waiting for `len` bytes of page data.
    RamPayload {
        packet: Packet,
        len: usize,
    },
    /// The prefix of a device-state packet is checked (not consumed).
    DeviceHeader {
        flags: u32,
    },
    /// The header is consumed; waiting for `len` bytes of device state.
    DevicePayload {
        flags: u32,
        idstr: Bytes,
        instance_id: u32,
        len: usize,
    },
    Failed,
}

impl drive::Phase for Phase {
    const FAILED: Self = Self::Failed;

    fn reading(&self) -> &'static str {
        match self {
            Self::Greeting => "channel greeting",
            Self::Packet | Self::RamHeader { .. } | Self::Failed => "packet header",
            Self::RamPayload { .. } => "page data",
            Self::DeviceHeader { .. } => "device-state packet header",
            Self::DevicePayload { .. } => "device-state data",
        }
    }

    /// Between two packets.
    fn may_end(&self) -> bool {
        matches!(self, Self::Packet)
    }
}

type Step = drive::Step<ChannelRecord>;

/// A parsed RAM packet header, before the split.
struct RamHead {
    packet: Packet,
    /// Length of the block name inside the name field.
    name_len: usize,
    /// Bytes of page data after the header.
    payload_len: usize,
}

impl drive::Machine for MultifdDecoder {
    type Phase = Phase;
    type Record = ChannelRecord;

    fn phase_mut(&mut self) -> &mut Phase {
        &mut self.phase
    }

    fn position(&self) -> Position {
        self.pos
    }

    /// A channel has no end record: `at_end` changes nothing.
    fn step(&mut self, phase: Phase, src: &mut BytesMut, _at_end: bool) -> Result<(Phase, Step)> {
        match phase {
            Phase::Greeting => self.greeting(src),
            Phase::Packet => self.prefix(src),
            Phase::RamHeader { flags } => self.ram_header(src, flags),
            Phase::RamPayload { mut packet, len } => {
                if src.len() < len {
                    return Ok((Phase::RamPayload { packet, len }, Step::NeedMore));
                }
                let data = self.pos.take(src, len);
                packet.payload = self.payload(&packet, data, 0);
                Ok((Phase::Packet, Step::Emit(ChannelRecord::Packet(packet))))
            }
            Phase::DeviceHeader { flags } => self.device_header(src, flags),
            Phase::DevicePayload {
                flags,
                idstr,
                instance_id,
                len,
            } => {
                if src.len() < len {
                    let phase = Phase::DevicePayload {
                        flags,
                        idstr,
                        instance_id,
                        len,
                    };
                    return Ok((phase, Step::NeedMore));
                }
                let data = self.pos.take(src, len);
                let record = ChannelRecord::DeviceState(DeviceStatePacket {
                    flags,
                    idstr,
                    instance_id,
                    data,
                });
                Ok((Phase::Packet, Step::Emit(record)))
            }
            Phase::Failed => Err(self
                .pos
                .malformed(0, "channel", "the decoder failed earlier")),
        }
    }
}

impl Default for MultifdDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdDecoder {
    /// A decoder for x86 channels (4 KiB target pages, 128 offset slots) with default
    /// [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A decoder with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            limits,
            page_size: DEFAULT_PAGE_SIZE,
            phase: Phase::Greeting,
            pos: Position::default(),
            channel_id: None,
        }
    }

    /// Sets the target page size (a power of two from 1 KiB to 64 KiB), as
    /// [`QemuDecoder::with_page_size`](crate::qemu::QemuDecoder::with_page_size); it
    /// also sets the number of offset slots per packet, 512 KiB / page size.
    ///
    /// # Panics
    ///
    /// If `page_size` is not such a power of two.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = checked_page_size(page_size);
        self
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits; they apply from the next packet on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The target page size in force.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The offset slots of every RAM packet: 512 KiB / page size.
    pub fn offset_slots(&self) -> usize {
        wire::offset_slots(self.page_size)
    }

    /// Channel offset of the next byte to be consumed (= bytes consumed so far).
    pub fn offset(&self) -> u64 {
        self.pos.offset()
    }

    /// The channel's id, once its greeting is decoded.
    pub fn channel_id(&self) -> Option<u8> {
        self.channel_id
    }

    /// Decodes the next record from the front of `src`, or asks for more bytes.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ChannelRecord>> {
        drive::run(self, src, false)
    }

    /// Like [`decode`](Self::decode), for when no more bytes will come: returns the
    /// remaining records, then `Ok(None)` if the channel ended between two packets.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ChannelRecord>> {
        drive::run_eof(self, src)
    }

    fn greeting(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        let mut c = Cursor::new(src);
        if let Some(magic) = c.be32() {
            if magic == crate::qemu::wire::FILE_MAGIC {
                return Err(self.pos.malformed(
                    0,
                    "channel magic",
                    "a main channel (\"QEVM\"), not a multifd channel",
                ));
            }
            if magic != wire::MAGIC {
                return Err(self.pos.malformed(0, "channel magic", "not 0x11223344"));
            }
        }
        if let Some(version) = c.be32() {
            if version != wire::VERSION {
                return Err(self.pos.malformed(4, "channel version", "not 1"));
            }
        }
        let (Some(uuid), Some(channel_id), Some(reserved)) = (c.take(16), c.u8(), c.take(39))
        else {
            src.reserve(wire::GREETING_LEN - src.len());
            return Ok((Phase::Greeting, Step::NeedMore));
        };
        let greeting = ChannelGreeting {
            uuid: uuid.try_into().expect("16 bytes"),
            channel_id,
            reserved: reserved.try_into().expect("39 bytes"),
        };
        self.pos.skip(src, wire::GREETING_LEN);
        self.channel_id = Some(channel_id);
        Ok((Phase::Packet, Step::Emit(ChannelRecord::Greeting(greeting))))
    }

    /// The 12 bytes every packet starts with: magic, version, flags.
    fn prefix(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        let mut c = Cursor::new(src);
        if let Some(magic) = c.be32() {
            if magic != wire::MAGIC {
                return Err(self.pos.malformed(0, "packet magic", "not 0x11223344"));
            }
        }
        if let Some(version) = c.be32() {
            if version != wire::VERSION {
                return Err(self.pos.malformed(4, "packet version", "not 1"));
            }
        }
        let Some(flags) = c.be32() else {
            return Ok((Phase::Packet, Step::NeedMore));
        };
        if flags & !flag::KNOWN != 0 {
            return Err(self.pos.unsupported(8, "packet flags", "unknown flag bits"));
        }
        if Compression::from_flags(flags).is_none() {
            return Err(self
                .pos
                .malformed(8, "packet flags", "unknown compression method"));
        }
        if flags & flag::DEVICE_STATE != 0 {
            if flags & flag::SYNC != 0 {
                return Err(self
                    .pos
                    .malformed(8, "packet flags", "SYNC on a device-state packet"));
            }
            return Ok((Phase::DeviceHeader { flags }, Step::Continue));
        }
        Ok((Phase::RamHeader { flags }, Step::Continue))
    }

    fn ram_header(&mut self, src: &mut BytesMut, flags: u32) -> Result<(Phase, Step)> {
        let slots = self.offset_slots();
        if slots > self.limits.max_offset_slots {
            return Err(self.pos.limit(
                wire::PACKET_HEADER_LEN,
                "offset slots",
                slots,
                self.limits.max_offset_slots,
            ));
        }
        let header_len = wire::PACKET_HEADER_LEN + 8 * slots;
        if src.len() < header_len {
            src.reserve(header_len - src.len());
            return Ok((Phase::RamHeader { flags }, Step::NeedMore));
        }
        let head = self.parse_ram_header(&src[..header_len], flags, slots)?;
        let RamHead {
            mut packet,
            name_len,
            payload_len,
        } = head;
        let name = 64..64 + name_len;
        if src.len() >= header_len + payload_len {
            // one split for header and page data: the hot path
            let bytes = self.pos.take(src, header_len + payload_len);
            packet.block = bytes.slice(name);
            packet.payload = self.payload(&packet, bytes, header_len);
            return Ok((Phase::Packet, Step::Emit(ChannelRecord::Packet(packet))));
        }
        packet.block = self.pos.take(src, header_len).slice(name);
        src.reserve(payload_len - src.len());
        let phase = Phase::RamPayload {
            packet,
            len: payload_len,
        };
        Ok((phase, Step::NeedMore))
    }

    /// Checks a complete RAM packet header (prefix already checked) field by field.
    fn parse_ram_header(&self, header: &[u8], flags: u32, slots: usize) -> Result<RamHead> {
        let mut c = Cursor::new(&header[wire::PACKET_PREFIX_LEN..]);
        let mut field = || c.be32().expect("a complete header");
        let (pages_alloc, normal_pages, next_packet_size) = (field(), field(), field());
        let packet_num = c.be64().expect("a complete header");
        let zero_pages = c.be32().expect("a complete header");
        let reserved: [u8; 28] = c
            .take(28)
            .and_then(|b| b.try_into().ok())
            .expect("28 bytes");
        let name_field = c.take(wire::BLOCK_NAME_LEN).expect("a complete header");
        if pages_alloc as usize > slots {
            return Err(self.pos.malformed(
                12,
                "pages_alloc",
                "more pages than a packet has offset slots",
            ));
        }
        if normal_pages > pages_alloc {
            return Err(self
                .pos
                .malformed(16, "normal_pages", "more than pages_alloc"));
        }
        if normal_pages as usize > self.limits.max_pages_per_packet {
            return Err(self.pos.limit(
                16,
                "normal_pages",
                normal_pages as usize,
                self.limits.max_pages_per_packet,
            ));
        }
        let compressed = flags & flag::COMPRESSION_MASK != flag::NOCOMP;
        let payload_len = match (normal_pages, compressed) {
            (0, _) => 0,
            (n, false) => n as usize * self.page_size,
            (_, true) => {
                let len = next_packet_size as usize;
                if len > self.limits.max_compressed_len {
                    return Err(self.pos.limit(
                        20,
                        "next_packet_size",
                        len,
                        self.limits.max_compressed_len,
                    ));
                }
                len
            }
        };
        if zero_pages > pages_alloc - normal_pages {
            return Err(self.pos.malformed(
                32,
                "zero_pages",
                "more than pages_alloc leaves after the normal pages",
            ));
        }
        let name_len = self.name_len(name_field, 64, "RAM block name")?;
        if name_len == 0 && normal_pages + zero_pages > 0 {
            return Err(self
                .pos
                .malformed(64, "RAM block name", "empty in a packet with pages"));
        }
        let offsets = (0..slots)
            .map(|_| c.be64().expect("a complete header"))
            .collect();
        let packet = Packet {
            flags,
            pages_alloc,
            normal_pages,
            next_packet_size,
            packet_num,
            zero_pages,
            reserved,
            block: Bytes::new(),
            offsets,
            payload: Payload::Pages(Vec::new()),
        };
        Ok(RamHead {
            packet,
            name_len,
            payload_len,
        })
    }

    /// The page data at `bytes[start..]`: pages sliced out of it, or the compressed
    /// payload as it is.
    fn payload(&self, packet: &Packet, bytes: Bytes, start: usize) -> Payload {
        if packet.flags & flag::COMPRESSION_MASK != flag::NOCOMP {
            return Payload::Compressed(bytes.slice(start..));
        }
        let ps = self.page_size;
        let pages = (0..packet.normal_pages as usize)
            .map(|i| bytes.slice(start + i * ps..start + (i + 1) * ps))
            .collect();
        Payload::Pages(pages)
    }

    fn device_header(&mut self, src: &mut BytesMut, flags: u32) -> Result<(Phase, Step)> {
        const LEN: usize = wire::DEVICE_STATE_HEADER_LEN;
        if src.len() < LEN {
            src.reserve(LEN - src.len());
            return Ok((Phase::DeviceHeader { flags }, Step::NeedMore));
        }
        let mut c = Cursor::new(&src[wire::PACKET_PREFIX_LEN..LEN]);
        let name_field = c.take(wire::BLOCK_NAME_LEN).expect("a complete header");
        let instance_id = c.be32().expect("a complete header");
        let len = c.be32().expect("a complete header") as usize;
        let name_len = self.name_len(name_field, 12, "device idstr")?;
        if name_len == 0 {
            return Err(self.pos.malformed(12, "device idstr", "empty"));
        }
        if len == 0 {
            return Err(self.pos.malformed(
                272,
                "next_packet_size",
                "an empty device-state packet",
            ));
        }
        if len > self.limits.max_device_state_len {
            return Err(self.pos.limit(
                272,
                "next_packet_size",
                len,
                self.limits.max_device_state_len,
            ));
        }
        let idstr = self.pos.take(src, LEN).slice(12..12 + name_len);
        src.reserve(len.saturating_sub(src.len()));
        let phase = Phase::DevicePayload {
            flags,
            idstr,
            instance_id,
            len,
        };
        Ok((phase, Step::Continue))
    }

    /// The length of the NUL-terminated name in a 256-byte field at `at`, whose
    /// padding must be zeros (as QEMU writes it) so that it can be written back.
    fn name_len(&self, field: &[u8], at: usize, what: &'static str) -> Result<usize> {
        let Some(len) = field.iter().position(|&b| b == 0) else {
            return Err(self.pos.malformed(at, what, "not NUL-terminated"));
        };
        if let Some(junk) = field[len..].iter().position(|&b| b != 0) {
            return Err(self.pos.malformed(
                at + len + junk,
                what,
                "bytes after its NUL terminator",
            ));
        }
        Ok(len)
    }
}
