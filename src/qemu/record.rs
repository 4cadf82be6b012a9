//! Typed records of a QEMU migration stream, as the decoder hands them out and the
//! encoder takes them back.
//!
//! Every field needed to rebuild the original bytes is kept, including what QEMU's
//! own loader ignores (the CONTINUE modifier, a ZERO page's fill byte, footers), so
//! that `encode(decode(stream)) == stream` holds byte for byte. Page payloads and
//! names are [`Bytes`] slices of the decoder's input buffer: no copy on decode.

use bytes::Bytes;

/// One top-level unit of a migration stream, in stream order.
///
/// ```text
/// Header  Configuration?  { Command | SectionStart/Part/End Ram* Footer? }*
///         SectionFull Opaque*  Eof  VmDescription?
/// ```
///
/// After the first device section (`SectionFull`, or the START of a live section
/// other than RAM) the rest of the stream is carried as [`Record::Opaque`] chunks:
/// device state has no length on the wire and can only be delimited by QEMU's
/// compiled-in device code. The trailing `Eof` and `VmDescription` are still
/// recognised when the stream ends with them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// Magic "QEVM" and version 3 (the only version QEMU loads).
    Header,
    /// Machine type and configuration subsections.
    Configuration(Configuration),
    /// Full header of a live section's first payload (for RAM: the setup payload).
    SectionStart(SectionHeader),
    /// Short header of a live section's iteration.
    SectionPart {
        /// Section id of an earlier `SectionStart`.
        section_id: u32,
    },
    /// Short header of a live section's completion.
    SectionEnd {
        /// Section id of an earlier `SectionStart`.
        section_id: u32,
    },
    /// Full header of a device section; its payload follows as [`Record::Opaque`].
    SectionFull(SectionHeader),
    /// Section footer (`0x7E`, be32 section id); QEMU sends one after every section
    /// unless `send-section-footer` is off.
    Footer {
        /// The id of the section just finished.
        section_id: u32,
    },
    /// One record of the RAM section's payload.
    Ram(RamRecord),
    /// A `QEMU_VM_COMMAND`.
    Command(Command),
    /// Bytes passed through without interpretation: device state, or the bytes a
    /// `PACKAGED` command announces.
    Opaque(Bytes),
    /// `QEMU_VM_EOF`: the end of the device stream.
    Eof,
    /// The JSON device description QEMU appends after EOF (without its type byte and
    /// length prefix).
    VmDescription(Bytes),
}

/// Header of a START or FULL section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    /// Section id, from QEMU's global registration counter; never assume a value.
    pub section_id: u32,
    /// Handler or device name, e.g. `ram`, `timer`, `0000:00:01.1/ide`.
    pub idstr: Bytes,
    /// Instance number of this idstr.
    pub instance_id: u32,
    /// Version of the handler's or device's state.
    pub version_id: u32,
}

/// The `QEMU_VM_CONFIGURATION` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    /// Machine type name, e.g. `pc-i440fx-10.0`.
    pub machine: Bytes,
    /// Subsections in stream order.
    pub subsections: Vec<ConfigSubsection>,
}

/// The configuration subsections QEMU 7.2 and 10.0 define (all version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigSubsection {
    /// `configuration/target-page-bits`: log2 of the target page size; sent only
    /// when it exceeds the target's minimum (never on x86).
    TargetPageBits(u32),
    /// `configuration/capabilities`: migration capabilities QEMU validates
    /// (`x-ignore-shared`, `mapped-ram`).
    Capabilities(Vec<Bytes>),
    /// `configuration/uuid`: the VM UUID (with `validate-uuid`).
    Uuid([u8; 16]),
}

impl ConfigSubsection {
    /// The subsection's name on the wire.
    pub fn name(&self) -> &'static [u8] {
        match self {
            Self::TargetPageBits(_) => b"configuration/target-page-bits",
            Self::Capabilities(_) => b"configuration/capabilities",
            Self::Uuid(_) => b"configuration/uuid",
        }
    }
}

/// A `QEMU_VM_COMMAND`: sub-command number and payload (see [`super::wire::command`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Sub-command number.
    pub cmd: u16,
    /// Payload; its length is the command's be16 length.
    pub payload: Bytes,
}

/// One record inside a RAM section payload.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RamRecord {
    /// The setup record: total RAM size and the list of RAM blocks.
    MemSize(MemSize),
    /// A page sent raw.
    Page {
        /// Where the page goes.
        addr: PageAddr,
        /// Exactly one target page of bytes.
        data: Bytes,
    },
    /// A page filled with one byte (QEMU always sends 0; 7.2 accepts other values).
    Zero {
        /// Where the page goes.
        addr: PageAddr,
        /// The fill byte.
        fill: u8,
    },
    /// A page XBZRLE-encoded against the destination's current copy of it.
    Xbzrle {
        /// Where the page goes.
        addr: PageAddr,
        /// The encoded bytes (at most one page).
        data: Bytes,
    },
    /// A page compressed as one zlib stream (QEMU 7.2 `compress` capability).
    Compressed {
        /// Where the page goes.
        addr: PageAddr,
        /// The zlib stream.
        data: Bytes,
    },
    /// A multifd synchronisation point (QEMU 8.0 and later).
    MultifdFlush,
    /// End of this RAM section payload.
    Eos,
}

/// The RAM setup record (`MEM_SIZE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemSize {
    /// Total bytes of migratable RAM; equals the sum of the blocks' lengths.
    pub total: u64,
    /// The RAM blocks, in QEMU's block-list order.
    pub blocks: Vec<RamBlock>,
}

/// A RAM block as listed in the setup record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// Block name, e.g. `pc.ram`.
    pub idstr: Bytes,
    /// Length in bytes.
    pub used_length: u64,
    /// Guest-physical address of the block's memory region; present exactly when
    /// the `x-ignore-shared` capability is announced in the configuration.
    pub mr_addr: Option<u64>,
}

/// The address of a page record: block, offset, and how the block was named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageAddr {
    /// The RAM block's name (shared with the setup record's block list).
    pub block: Bytes,
    /// Byte offset of the page inside the block (page aligned).
    pub offset: u64,
    /// Whether the record carried CONTINUE (block name omitted on the wire because
    /// it equals the previous page record's block).
    pub continued: bool,
}
