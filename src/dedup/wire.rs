//! Constants and fixed layouts of the dedup stream (`docs/wire-format.md`).

use bytes::{BufMut, BytesMut};

use crate::cursor::Cursor;
use crate::template::CatalogId;

/// First bytes of a HELLO payload.
pub const MAGIC: [u8; 4] = *b"MGSD";
/// Version of the dedup stream format, and of the link's return direction.
pub const VERSION: u16 = 4;
/// Frame header: type byte and be32 payload length.
pub const FRAME_HEADER: usize = 5;
/// Bytes of the running digest (XXH3-128) each DATA frame and the END frame carry.
pub const FRAME_DIGEST: usize = 16;

/// Frame types.
pub mod frame {
    /// Versions, page size, catalog identity. Always first.
    pub const HELLO: u8 = 0x01;
    /// A batch of entries, compressed.
    pub const DATA: u8 = 0x02;
    /// Total QEMU bytes and their digest. Always last.
    pub const END: u8 = 0x03;
}

/// How a DATA frame's batch is stored.
pub mod codec {
    /// As is (when compression would not shrink it).
    pub const STORED: u8 = 0x00;
    /// One LZ4 block.
    pub const LZ4: u8 = 0x01;
    /// One zstd frame (with the `zstd` cargo feature).
    pub const ZSTD: u8 = 0x02;
}

/// Entry tag of QEMU bytes carried verbatim; page tags are in [`crate::resolve::tag`].
pub const ENTRY_QEMU: u8 = 0x00;

/// Page entry address flag: QEMU's record carried CONTINUE (block name omitted).
pub const PAGE_CONTINUE: u8 = 0x01;
/// Page entry address flag: the page is in the same block as the previous page
/// entry, whose name is therefore omitted. (QEMU's CONTINUE may refer to a ZERO
/// record in between, which travels as verbatim bytes: the two differ.)
pub const PAGE_SAME_BLOCK: u8 = 0x02;

/// The HELLO frame's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Hello {
    /// Target page size of the QEMU stream.
    pub page_size: u32,
    /// The template catalog the source refers to, if any.
    pub catalog: Option<CatalogId>,
    /// The migration this stream is part of, chosen at random by the source: every
    /// connection of one migration (QEMU's main channel and its multifd channels)
    /// carries the same, so a destination can group them.
    pub session: [u8; 16],
    /// Which of the migration's QEMU connections this stream carries: 0 the main
    /// channel, `n` the multifd channel `n - 1`.
    pub channel: u16,
}

/// Length of a HELLO payload.
pub const HELLO_LEN: usize = 4 + 2 + 2 + 4 + 32 + 16 + 2 + 2;
/// Length of an END payload.
pub const END_LEN: usize = 8 + FRAME_DIGEST;
/// Bytes of a DATA payload before its batch: codec, flags, raw length, digest.
pub const DATA_HEADER: usize = 1 + 1 + 4 + FRAME_DIGEST;

/// DATA frame flag: this frame holds QEMU's EOF or what follows it. The destination
/// releases such frames' bytes only after the END frame confirmed the whole stream,
/// so QEMU never sees a complete stream that was not checked whole.
pub const FLAG_HOLD: u8 = 0x01;

impl Hello {
    /// The HELLO of a QEMU main channel of `page_size` pages referring to `catalog`.
    pub fn new(page_size: u32, catalog: Option<CatalogId>) -> Self {
        Self {
            page_size,
            catalog,
            session: [0; 16],
            channel: 0,
        }
    }

    /// The same, as channel `channel` of migration `session`.
    pub fn in_session(mut self, session: [u8; 16], channel: u16) -> Self {
        self.session = session;
        self.channel = channel;
        self
    }

    pub(crate) fn put(&self, dst: &mut BytesMut) {
        put_frame_header(dst, frame::HELLO, HELLO_LEN);
        dst.put_slice(&MAGIC);
        dst.put_u16(VERSION);
        dst.put_u16(0);
        dst.put_u32(self.page_size);
        dst.put_slice(&self.catalog.map_or([0; 32], |id| id.0));
        dst.put_slice(&self.session);
        dst.put_u16(self.channel);
        dst.put_u16(0);
    }

    /// Parses a HELLO payload found at stream offset `at`.
    pub(crate) fn parse(p: &[u8], at: u64) -> crate::Result<Self> {
        let malformed = |offset: u64, field, reason| crate::Error::Malformed {
            offset: at + offset,
            field,
            reason,
        };
        let mut c = Cursor::new(p);
        let fields = (|| {
            let head = (c.array::<4>()?, c.be16()?, c.be16()?, c.be32()?);
            Some((
                head,
                c.array::<32>()?,
                c.array::<16>()?,
                c.be16()?,
                c.be16()?,
            ))
        })();
        let Some(((magic, version, flags, page_size), catalog, session, channel, reserved)) =
            fields.filter(|_| p.len() == HELLO_LEN)
        else {
            return Err(malformed(0, "hello", "not a migstream dedup stream"));
        };
        if magic != MAGIC {
            return Err(malformed(0, "hello", "not a migstream dedup stream"));
        }
        if version != VERSION {
            return Err(crate::Error::Unsupported {
                offset: at + 4,
                field: "dedup stream version",
                reason: "not version 4",
            });
        }
        if flags != 0 {
            return Err(malformed(6, "hello flags", "not zero"));
        }
        if !page_size.is_power_of_two() || !(1024..=65536).contains(&page_size) {
            return Err(malformed(
                8,
                "page size",
                "not a power of two from 1 KiB to 64 KiB",
            ));
        }
        if reserved != 0 {
            return Err(malformed(62, "hello reserved", "not zero"));
        }
        Ok(Hello {
            page_size,
            catalog: (catalog != [0; 32]).then_some(CatalogId(catalog)),
            session,
            channel,
        })
    }
}

/// A DATA frame's header: how its batch is stored, and the running digest after the
/// frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataHeader {
    /// How the batch is stored ([`codec`]).
    pub(crate) codec: u8,
    /// [`FLAG_HOLD`] or 0.
    pub(crate) flags: u8,
    /// The batch's length once decompressed.
    pub(crate) raw_len: u32,
    /// The running digest after this frame.
    pub(crate) digest: [u8; FRAME_DIGEST],
}

impl DataHeader {
    /// The header's bytes the running digest covers, before the stored batch: all
    /// but the digest itself, so that no flip on the wire goes unseen.
    pub(crate) fn covered(&self) -> [u8; 6] {
        let [a, b, c, d] = self.raw_len.to_be_bytes();
        [self.codec, self.flags, a, b, c, d]
    }

    /// Writes the frame header and this header, for a stored batch of `body_len`
    /// bytes, which the caller appends.
    pub(crate) fn put(&self, dst: &mut BytesMut, body_len: usize) {
        put_frame_header(dst, frame::DATA, DATA_HEADER + body_len);
        dst.put_slice(&self.covered());
        dst.put_slice(&self.digest);
    }

    /// The header at the start of a DATA payload, if it is that long.
    pub(crate) fn parse(payload: &[u8]) -> Option<Self> {
        let mut c = Cursor::new(payload);
        Some(Self {
            codec: c.u8()?,
            flags: c.u8()?,
            raw_len: c.be32()?,
            digest: c.array()?,
        })
    }
}

/// The END frame: the stream's total QEMU bytes and its final running digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct End {
    pub(crate) qemu_bytes: u64,
    pub(crate) digest: [u8; FRAME_DIGEST],
}

impl End {
    /// Writes the whole frame.
    pub(crate) fn put(&self, dst: &mut BytesMut) {
        put_frame_header(dst, frame::END, END_LEN);
        dst.put_u64(self.qemu_bytes);
        dst.put_slice(&self.digest);
    }

    /// An END payload, if it has exactly the length of one.
    pub(crate) fn parse(payload: &[u8]) -> Option<Self> {
        let mut c = Cursor::new(payload);
        let end = Self {
            qemu_bytes: c.be64()?,
            digest: c.array()?,
        };
        (payload.len() == END_LEN).then_some(end)
    }
}

/// The running digest's current value as it travels: XXH3-128, big-endian.
///
/// It is a checksum against corrupted, lost or reordered bytes and against bugs in
/// either end, not page identity (that is BLAKE3, see [`crate::page`]) and not a MAC:
/// whoever can change the frames can recompute any unkeyed digest, cryptographic or
/// not, so a link that needs protection from an active attacker runs over TLS or a
/// VPN. XXH3 runs at memory speed where BLAKE3 would take most of a core.
pub(crate) fn digest_bytes(hasher: &twox_hash::XxHash3_128) -> [u8; FRAME_DIGEST] {
    hasher.finish_128().to_be_bytes()
}

/// The type and payload length of the frame `src` starts with, if its header is in:
/// the framing of both directions of a link.
pub(crate) fn frame_header(src: &[u8]) -> Option<(u8, usize)> {
    let mut c = Cursor::new(src);
    Some((c.u8()?, c.be32()? as usize))
}

/// Writes a frame header: the framing of both directions of a link.
pub(crate) fn put_frame_header(dst: &mut BytesMut, kind: u8, len: usize) {
    dst.reserve(FRAME_HEADER + len);
    dst.put_u8(kind);
    dst.put_u32(u32::try_from(len).expect("frames are bounded by the batch limit"));
}
