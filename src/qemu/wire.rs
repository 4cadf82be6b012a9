//! Numeric constants of QEMU's migration stream, exactly as `migration/savevm.c`
//! and `migration/ram.c` define them (identical in QEMU 7.2 and 10.0 unless noted).
//!
//! Everything on the main channel is big-endian.

/// `QEMU_VM_FILE_MAGIC`: the first four bytes of every main-channel stream ("QEVM").
pub const FILE_MAGIC: u32 = 0x5145_564D;
/// `QEMU_VM_FILE_VERSION`: the only stream version QEMU loads.
pub const FILE_VERSION: u32 = 3;
/// `QEMU_VM_FILE_VERSION_COMPAT`: the obsolete version QEMU rejects explicitly.
pub const FILE_VERSION_COMPAT: u32 = 2;

/// Top-level record type bytes.
pub mod record_type {
    /// `QEMU_VM_EOF`: end of the device stream.
    pub const EOF: u8 = 0x00;
    /// `QEMU_VM_SECTION_START`: full section header, first payload of a live handler.
    pub const SECTION_START: u8 = 0x01;
    /// `QEMU_VM_SECTION_PART`: short header, an iteration of a live handler.
    pub const SECTION_PART: u8 = 0x02;
    /// `QEMU_VM_SECTION_END`: short header, the last payload of a live handler.
    pub const SECTION_END: u8 = 0x03;
    /// `QEMU_VM_SECTION_FULL`: full header, a device's whole state (no length on the wire).
    pub const SECTION_FULL: u8 = 0x04;
    /// `QEMU_VM_SUBSECTION`: only inside a VMState payload.
    pub const SUBSECTION: u8 = 0x05;
    /// `QEMU_VM_VMDESCRIPTION`: be32 length + JSON, after EOF.
    pub const VMDESCRIPTION: u8 = 0x06;
    /// `QEMU_VM_CONFIGURATION`: machine type and subsections, right after the header.
    pub const CONFIGURATION: u8 = 0x07;
    /// `QEMU_VM_COMMAND`: be16 command, be16 length, payload.
    pub const COMMAND: u8 = 0x08;
    /// `QEMU_VM_SECTION_FOOTER`: be32 section id after a section payload.
    pub const SECTION_FOOTER: u8 = 0x7E;
}

/// RAM record flags: the low bits of each record's be64 word.
pub mod ram_flag {
    /// Obsolete since 2009, never sent; rejected.
    pub const FULL: u64 = 0x001;
    /// A page filled with one byte (u8 fill follows).
    pub const ZERO: u64 = 0x002;
    /// The offset bits carry the total RAM size; the block list follows.
    pub const MEM_SIZE: u64 = 0x004;
    /// A raw page follows.
    pub const PAGE: u64 = 0x008;
    /// End of the RAM section payload.
    pub const EOS: u64 = 0x010;
    /// Modifier: the block name is omitted, the last block is meant.
    pub const CONTINUE: u64 = 0x020;
    /// An XBZRLE-encoded page follows.
    pub const XBZRLE: u64 = 0x040;
    /// RDMA hook: control passes to RDMA code (unsupported here).
    pub const HOOK: u64 = 0x080;
    /// A zlib-compressed page follows (QEMU 7.2 `compress` capability).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// Multifd synchronisation point (QEMU 8.0 and later).
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// `QEMU_VM_COMMAND` sub-command numbers (`enum qemu_vm_cmd`).
pub mod command {
    /// `MIG_CMD_OPEN_RETURN_PATH`, length 0.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// `MIG_CMD_PING`, length 4.
    pub const PING: u16 = 2;
    /// `MIG_CMD_POSTCOPY_ADVISE`, length 0 or 16.
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// `MIG_CMD_POSTCOPY_LISTEN`, length 0.
    pub const POSTCOPY_LISTEN: u16 = 4;
    /// `MIG_CMD_POSTCOPY_RUN`, length 0.
    pub const POSTCOPY_RUN: u16 = 5;
    /// `MIG_CMD_POSTCOPY_RAM_DISCARD`, variable length.
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// `MIG_CMD_PACKAGED`, length 4; its be32 counts bytes that follow the command.
    pub const PACKAGED: u16 = 7;
    /// `MIG_CMD_ENABLE_COLO`, length 0.
    pub const ENABLE_COLO: u16 = 8;
    /// `MIG_CMD_POSTCOPY_RESUME`, length 0.
    pub const POSTCOPY_RESUME: u16 = 9;
    /// `MIG_CMD_RECV_BITMAP`, variable length.
    pub const RECV_BITMAP: u16 = 10;
    /// `MIG_CMD_SWITCHOVER_START`, length 0 (QEMU 10.0 only).
    pub const SWITCHOVER_START: u16 = 11;

    /// The payload length QEMU's loader requires, or `None` where it varies.
    pub const fn fixed_len(cmd: u16) -> Option<u16> {
        match cmd {
            PING | PACKAGED => Some(4),
            POSTCOPY_ADVISE | POSTCOPY_RAM_DISCARD | RECV_BITMAP => None,
            _ => Some(0),
        }
    }
}

/// The idstr of the RAM live section.
pub const RAM_IDSTR: &[u8] = b"ram";
/// The only RAM section version QEMU loads.
pub const RAM_VERSION: u32 = 4;
/// XBZRLE records carry this encoding byte (`ENCODING_FLAG_XBZRLE`).
pub const XBZRLE_ENCODING: u8 = 0x01;
/// The VMState name of the configuration record, prefix of its subsections.
pub const CONFIGURATION_NAME: &[u8] = b"configuration";

/// Whether QEMU could use `n` as its target page size: a power of two from 1 KiB
/// (the smallest `TARGET_PAGE_BITS`, 10) to 64 KiB.
pub const fn is_page_size(n: usize) -> bool {
    n.is_power_of_two() && n >= 1024 && n <= 65536
}

/// `n`, if [`is_page_size`]: the page size a caller sets on a codec.
///
/// # Panics
///
/// If it is not.
pub(crate) fn checked_page_size(n: usize) -> usize {
    assert!(
        is_page_size(n),
        "target page size must be a power of two from 1 KiB to 64 KiB"
    );
    n
}

/// zlib's `compressBound()`: QEMU 7.2 rejects a compressed page longer than this.
pub const fn zlib_compress_bound(len: usize) -> usize {
    len + (len >> 12) + (len >> 14) + (len >> 25) + 13
}
