//! QEMU's own migration format, sans-IO: record types, an incremental decoder over
//! `BytesMut` and an encoder into `BytesMut`, with no tokio, clock or IO in the core.
//!
//! `encode(decode(s)) == s` byte for byte for the main channel of every precopy
//! stream QEMU 7.2 and 10.0 write: RAM records are parsed exactly (pages handed out as
//! [`Bytes`](bytes::Bytes) slices of the input, never copied), and everything after the
//! first device section, whose end only QEMU's device code knows, passes through as
//! opaque chunks. The format is QEMU's own (`migration/savevm.c`, `migration/ram.c`
//! of QEMU's sources).
//!
//! ```
//! use bytes::BytesMut;
//! use migstream::qemu::{QemuDecoder, QemuEncoder, RamRecord, Record};
//!
//! # let stream = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/qemu-7.2-pc-paused.mig"));
//! let (mut dec, mut enc) = (QemuDecoder::new(), QemuEncoder::new());
//! let mut input = BytesMut::from(&stream[..]);
//! let mut output = BytesMut::new();
//! let mut pages = 0;
//! while let Some(record) = dec.decode_eof(&mut input)? {
//!     if let Record::Ram(RamRecord::Page { .. }) = record {
//!         pages += 1;
//!     }
//!     enc.encode(&record, &mut output)?;
//! }
//! assert_eq!(&output[..], &stream[..]);
//! assert_eq!(pages, 49); // a paused 16 MiB guest: mostly zero pages
//! # Ok::<(), migstream::Error>(())
//! ```

mod codec;
mod decode;
mod drive;
mod encode;
mod limits;
pub mod multifd;
mod record;
mod tail;
// QEMU's constants (`migration/*.h`): for the crate's own benches and fuzzing, not
// an API
#[doc(hidden)]
pub mod wire;

pub use decode::{DEFAULT_PAGE_SIZE, QemuDecoder};
pub use encode::QemuEncoder;
pub(crate) use encode::put_page_header;
pub use limits::Limits;
pub use record::{
    Command, ConfigSubsection, Configuration, MemSize, PageAddr, RamBlock, RamRecord, Record,
    SectionHeader,
};
