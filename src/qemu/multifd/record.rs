//! Typed records of a multifd channel, as the decoder hands them out and the encoder
//! takes them back.
//!
//! Every byte needed to rebuild the channel is kept, including what QEMU's loader
//! ignores: the greeting's reserved bytes, a packet's reserved header bytes, its
//! `next_packet_size` when no page data follows (QEMU 7.2 leaves a stale value there)
//! and its offset slots past the pages it carries (QEMU 7.2 leaves stale offsets
//! there). Page data and names are [`Bytes`] slices of the decoder's input: no copy.

use bytes::Bytes;

use super::wire::flag;

/// One unit of a multifd channel, in channel order: the greeting, then packets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelRecord {
    /// The 64-byte `MultiFDInit_t` that opens the channel.
    Greeting(ChannelGreeting),
    /// A RAM packet: header, offset slots and page data.
    Packet(Packet),
    /// A device-state packet (QEMU 10.0 with VFIO devices that support it).
    DeviceState(DeviceStatePacket),
}

/// The greeting that opens a multifd channel (`MultiFDInit_t`). Its magic
/// ([`wire::MAGIC`](super::wire::MAGIC)) and version (1) are checked by the decoder and
/// written by the encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelGreeting {
    /// The VM's UUID: all zeros unless QEMU runs with `-uuid`. The destination QEMU
    /// refuses a channel whose UUID differs from its own.
    pub uuid: [u8; 16],
    /// The channel's number, 0 to `multifd-channels` - 1.
    pub channel_id: u8,
    /// The 39 reserved bytes after the id, as on the wire (QEMU writes zeros).
    pub reserved: [u8; 39],
}

/// A RAM packet (`MultiFDPacket_t`), every field as on the wire.
///
/// The page data that follows the header is, in both QEMU versions: nothing when
/// `normal_pages` is 0; otherwise `normal_pages` raw pages without compression, or
/// `next_packet_size` bytes of compressed data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Flag bits: [`flag::SYNC`] and the compression method (see [`Packet::compression`]).
    pub flags: u32,
    /// Pages the sender's packet can hold: 128 for 4 KiB pages, or 0 in QEMU 10.0's
    /// SYNC-only packets.
    pub pages_alloc: u32,
    /// Pages whose data this packet carries; their offsets are the first slots.
    pub normal_pages: u32,
    /// The page data's length as the sender counted it. Stale (a previous packet's)
    /// in QEMU 7.2 packets without pages.
    pub next_packet_size: u32,
    /// The sender's global packet counter.
    pub packet_num: u64,
    /// QEMU 10.0: zero pages, whose offsets follow the normal pages' (no data is
    /// sent for them). Reserved, and zero, in QEMU 7.2.
    pub zero_pages: u32,
    /// The 28 reserved header bytes after `zero_pages`, as on the wire.
    pub reserved: [u8; 28],
    /// The RAM block's name without its NUL padding; empty in QEMU 10.0's SYNC-only
    /// packets, possibly a previous packet's in QEMU 7.2's.
    pub block: Bytes,
    /// Every offset slot as on the wire (128 for 4 KiB pages): `normal_pages` offsets
    /// of the pages carried, then `zero_pages` zero-page offsets, then slots QEMU
    /// does not read (QEMU 7.2 leaves stale offsets there).
    pub offsets: Vec<u64>,
    /// The page data.
    pub payload: Payload,
}

/// The page data of a RAM packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Without compression: one target page per normal page, in slot order (slices
    /// of the decoder's input, never copied). Empty when the packet has no pages.
    Pages(Vec<Bytes>),
    /// With compression (zlib, zstd, ...): the packet's part of the channel's
    /// compression stream, opaque. Each channel keeps one stream for its whole life,
    /// so a payload cannot be decompressed without the channel's earlier ones.
    /// Empty when the packet has no normal pages.
    Compressed(Bytes),
}

impl Payload {
    /// Bytes of page data on the wire.
    pub fn len(&self) -> usize {
        match self {
            Self::Pages(pages) => pages.iter().map(Bytes::len).sum(),
            Self::Compressed(data) => data.len(),
        }
    }

    /// Whether no page data follows the header.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The compression method of a packet's page data (`multifd-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// Raw pages.
    None,
    /// zlib (QEMU 7.2 and 10.0).
    Zlib,
    /// zstd (QEMU 7.2 and 10.0).
    Zstd,
    /// Intel QPL (QEMU 9.1 and later).
    Qpl,
    /// Huawei UADK (QEMU 9.1 and later).
    Uadk,
    /// Intel QATzip (QEMU 9.2 and later).
    Qatzip,
}

impl Compression {
    /// The method named by the compression bits of `flags`, or `None` if they name
    /// none QEMU defines.
    pub fn from_flags(flags: u32) -> Option<Self> {
        Some(match flags & flag::COMPRESSION_MASK {
            flag::NOCOMP => Self::None,
            flag::ZLIB => Self::Zlib,
            flag::ZSTD => Self::Zstd,
            flag::QPL => Self::Qpl,
            flag::UADK => Self::Uadk,
            flag::QATZIP => Self::Qatzip,
            _ => return None,
        })
    }

    /// The compression bits of this method.
    pub fn flag(self) -> u32 {
        match self {
            Self::None => flag::NOCOMP,
            Self::Zlib => flag::ZLIB,
            Self::Zstd => flag::ZSTD,
            Self::Qpl => flag::QPL,
            Self::Uadk => flag::UADK,
            Self::Qatzip => flag::QATZIP,
        }
    }
}

impl Packet {
    /// Whether the packet carries [`flag::SYNC`]: the channel's last packet before a
    /// synchronisation point (QEMU 7.2 may set it on a packet that carries pages).
    pub fn is_sync(&self) -> bool {
        self.flags & flag::SYNC != 0
    }

    /// The compression method the flags name (`None` only for flags the decoder
    /// would not have accepted).
    pub fn compression(&self) -> Option<Compression> {
        Compression::from_flags(self.flags)
    }

    /// The offsets of the pages whose data the packet carries.
    pub fn normal_offsets(&self) -> &[u64] {
        self.offsets
            .get(..self.normal_pages as usize)
            .unwrap_or_default()
    }

    /// The offsets of the zero pages (QEMU 10.0's `zero-page-detection=multifd`).
    pub fn zero_offsets(&self) -> &[u64] {
        let start = self.normal_pages as usize;
        let end = start.saturating_add(self.zero_pages as usize);
        self.offsets.get(start..end).unwrap_or_default()
    }

    /// The uncompressed pages with their offsets in the block, in slot order; none for
    /// a compressed packet.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &Bytes)> {
        let pages = match &self.payload {
            Payload::Pages(pages) => &pages[..],
            Payload::Compressed(_) => &[],
        };
        self.normal_offsets().iter().copied().zip(pages)
    }
}

/// A device-state packet (`MultiFDPacketDeviceState_t`, QEMU 10.0): a chunk of a
/// device's state sent over a multifd channel, opaque here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatePacket {
    /// Flag bits ([`flag::DEVICE_STATE`] among them; never [`flag::SYNC`]).
    pub flags: u32,
    /// The device's idstr without its NUL padding.
    pub idstr: Bytes,
    /// The device's instance id.
    pub instance_id: u32,
    /// The state bytes (`next_packet_size` of them on the wire, at least one).
    pub data: Bytes,
}
