//! The proxy-to-proxy dedup stream: QEMU's migration stream with page payloads
//! replaced by resolver references, batched and compressed, in length-prefixed
//! frames a reader can bound and skip. Sans-IO like [`crate::qemu`]. The format is
//! specified in `docs/wire-format.md`.
//!
//! ```
//! use bytes::BytesMut;
//! use migstream::dedup::{Decoded, DedupDecoder, DedupEncoder};
//! use migstream::qemu::QemuDecoder;
//!
//! # let qemu_stream = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/qemu-7.2-pc-paused.mig"));
//! // source side: QEMU records in, frames out
//! let (mut records, mut enc) = (QemuDecoder::new(), DedupEncoder::with_default_resolvers());
//! let (mut input, mut wire) = (BytesMut::from(&qemu_stream[..]), BytesMut::new());
//! while let Some(record) = records.decode_eof(&mut input)? {
//!     enc.encode(&record, &mut wire)?;
//! }
//! enc.finish(&mut wire)?;
//! assert!(wire.len() < qemu_stream.len());
//!
//! // destination side: frames in, the source QEMU's exact bytes out
//! let mut dec = DedupDecoder::with_default_resolvers();
//! let mut qemu_out = Vec::new();
//! while let Decoded::Qemu(bytes) = dec.decode_eof(&mut wire)? {
//!     qemu_out.extend_from_slice(&bytes);
//! }
//! assert_eq!(&qemu_out[..], &qemu_stream[..]);
//! # Ok::<(), migstream::Error>(())
//! ```
//!
//! The decoder takes whole frames off its input ahead of the one it restores, within
//! a few MiB: [`DedupDecoder::with_threads`] decompresses their batches on other
//! threads, and a resolver that fetches pages from elsewhere (a DHT store) is asked
//! for the next frame's pages before this one is restored, so that the fetch
//! overlaps restoring and writing out ([`Decoded::Fetch`] says how to drive it). The
//! output and its checks stay in stream order on the caller's thread.

mod ahead;
mod codec;
mod compress;
mod decode;
mod encode;
mod entry;
pub(crate) mod lz4;
mod reply;
mod resolvers;
mod stats;
mod stream;
mod workers;
// the constants and layouts of `docs/wire-format.md`: for the crate's own benches
// and fuzzing, not an API
#[doc(hidden)]
pub mod wire;

pub use codec::{EncoderInput, End};
pub use compress::Compression;
pub use decode::{Decoded, DedupDecoder};
pub use encode::{
    DEFAULT_BATCH, DedupEncoder, MAX_CHANNEL_FRAME_QEMU_BYTES, MAX_FRAME_QEMU_BYTES, MAX_THREADS,
    available_threads,
};
pub use reply::{ACK_EVERY, MAX_REASON, MAX_RETURN_CHUNK, Reply, ReplyDecoder};
pub use resolvers::{Resolvers, default_restores};
pub use stats::Stats;
pub use stream::DedupFrames;
pub use wire::{FRAME_DIGEST, Hello, VERSION};

/// Seen-before window of the dedup stream: 256 MiB of pages (65536 pages of 4 KiB)
/// held at the destination, ~2.5 MiB of index at the source for 4 KiB pages. Fixed in
/// bytes, not pages, so that a peer naming a larger page size cannot make the
/// destination hold more.
pub const SEEN_WINDOW_BYTES: usize = 256 << 20;

/// Caps on what a peer's frame can make the decoder hold.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest frame payload.
    pub max_frame: usize,
    /// Largest batch once decompressed.
    pub max_batch: usize,
    /// Most QEMU bytes held back from QEMU's EOF to the END frame (device
    /// description and what shares a batch with it).
    pub max_held: usize,
    /// Most QEMU bytes one DATA frame may stand for (a page claimed in a few bytes
    /// still makes a whole page).
    pub max_output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 32 << 20,
            max_batch: 32 << 20,
            max_held: 64 << 20,
            max_output: 64 << 20,
        }
    }
}

/// What a multifd channel's frame can make the decoder hold, at most: a source
/// sends frames of [`MAX_CHANNEL_FRAME_QEMU_BYTES`] plus one record (a packet of
/// 512 KiB of pages, or up to 16 MiB of device state).
const CHANNEL_FRAME_CAP: usize = 24 << 20;

impl Limits {
    /// These limits, capped for a stream that carries a multifd channel: its frames
    /// are small and nothing is held (QEMU's EOF is on the main channel), so that a
    /// migration of many channels holds little more per channel than the
    /// resolvers' share ([`MULTIFD_CHANNEL_SHARE`](crate::resolve::MULTIFD_CHANNEL_SHARE)).
    /// The decoder applies them itself once the HELLO names a channel.
    pub fn for_multifd_channel(&self) -> Self {
        Self {
            max_frame: self.max_frame.min(CHANNEL_FRAME_CAP),
            max_batch: self.max_batch.min(CHANNEL_FRAME_CAP),
            max_held: 0,
            max_output: self.max_output.min(CHANNEL_FRAME_CAP),
        }
    }
}
