//! Numeric constants of QEMU's multifd channels, as `migration/multifd.h` and
//! `multifd.c` define them in QEMU 7.2 and 10.0.
//!
//! Everything on a multifd channel is big-endian. A channel starts with a 64-byte
//! greeting (`MultiFDInit_t`), then carries packets: a RAM packet is a 320-byte
//! header (`MultiFDPacket_t`), one 8-byte offset slot per page a packet can hold, and
//! the page data; a device-state packet (QEMU 10.0, VFIO) is a 276-byte header
//! (`MultiFDPacketDeviceState_t`) and its data.

/// `MULTIFD_MAGIC`: the first four bytes of a multifd channel and of every packet.
pub const MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION`: the only version QEMU 7.2 and 10.0 write and accept.
pub const VERSION: u32 = 1;

/// Length of the channel greeting (`MultiFDInit_t`).
pub const GREETING_LEN: usize = 64;
/// Length of a RAM packet header before its offset slots (`MultiFDPacket_t`).
pub const PACKET_HEADER_LEN: usize = 320;
/// The part every packet starts with: magic, version, flags (`MultiFDPacketHdr_t`).
pub const PACKET_PREFIX_LEN: usize = 12;
/// Length of a device-state packet header (`MultiFDPacketDeviceState_t`).
pub const DEVICE_STATE_HEADER_LEN: usize = 276;
/// Length of the RAM block name field, NUL-padded.
pub const BLOCK_NAME_LEN: usize = 256;

/// `MULTIFD_PACKET_SIZE`: the bytes of page data one packet holds at most. The
/// number of offset slots of every RAM packet is this divided by the target page
/// size (128 for 4 KiB pages), whatever the packet's `pages_alloc` says.
pub const PACKET_SIZE: usize = 512 * 1024;

/// Packet flag bits.
pub mod flag {
    /// `MULTIFD_FLAG_SYNC`: the channel's last packet before a synchronisation point.
    pub const SYNC: u32 = 1 << 0;
    /// `MULTIFD_FLAG_COMPRESSION_MASK` of QEMU 10.0 (7.2 used bits 1-3 of it).
    pub const COMPRESSION_MASK: u32 = 0x1f << 1;
    /// `MULTIFD_FLAG_NOCOMP`: page data sent raw.
    pub const NOCOMP: u32 = 0;
    /// `MULTIFD_FLAG_ZLIB`.
    pub const ZLIB: u32 = 1 << 1;
    /// `MULTIFD_FLAG_ZSTD`.
    pub const ZSTD: u32 = 2 << 1;
    /// `MULTIFD_FLAG_QPL` (QEMU 9.1 and later).
    pub const QPL: u32 = 4 << 1;
    /// `MULTIFD_FLAG_UADK` (QEMU 9.1 and later).
    pub const UADK: u32 = 8 << 1;
    /// `MULTIFD_FLAG_QATZIP` (QEMU 9.2 and later).
    pub const QATZIP: u32 = 16 << 1;
    /// `MULTIFD_FLAG_DEVICE_STATE` (QEMU 10.0): a device-state packet, not a RAM one.
    pub const DEVICE_STATE: u32 = 32 << 1;
    /// Every bit QEMU 10.0 defines; any other is refused as unsupported.
    pub const KNOWN: u32 = SYNC | COMPRESSION_MASK | DEVICE_STATE;
}

/// The number of offset slots a RAM packet carries for `page_size`-byte target pages.
pub const fn offset_slots(page_size: usize) -> usize {
    PACKET_SIZE / page_size
}

/// The length of a RAM packet header with its offset slots, for `page_size`-byte pages
/// (1344 bytes for 4 KiB pages).
pub const fn packet_header_len(page_size: usize) -> usize {
    PACKET_HEADER_LEN + 8 * offset_slots(page_size)
}

/// Whether the first bytes of a connection start a multifd channel (rather than a
/// main channel, which starts with `QEVM`). `None` until 4 bytes are there.
pub fn is_channel_start(prefix: &[u8]) -> Option<bool> {
    let magic = prefix.get(..4)?;
    Some(magic == MAGIC.to_be_bytes())
}
