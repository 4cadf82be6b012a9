//! The return direction of a link, destination to source (`docs/wire-format.md`, "A
//! link between two proxies"): the greeting, the destination QEMU's return path, and
//! the destination's verdict on the migration. Each message is parsed and written
//! here, side by side; framed like the dedup stream (type byte, be32 length) so a
//! reader bounds every message before it buffers it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::wire::{FRAME_DIGEST, FRAME_HEADER, VERSION, frame_header, put_frame_header};
use crate::cursor::Cursor;
use crate::error::{Error, Result};
use crate::template::CatalogId;

/// First bytes of the destination's greeting.
const GREETING_MAGIC: [u8; 4] = *b"MGSR";
/// Payload length of a greeting.
const GREETING_LEN: usize = 4 + 2 + 2 + 32;
/// Payload length of a DONE message.
const DONE_LEN: usize = 8 + FRAME_DIGEST;
/// Payload length of an ACK message.
const ACK_LEN: usize = 8;
/// Longest reason a FAILED message carries; longer ones are cut.
pub const MAX_REASON: usize = 1024;
/// A destination acknowledges ([`Reply::Ack`]) whenever the QEMU bytes it verified
/// grew by this much: a source's credit window is at least twice that.
pub const ACK_EVERY: u64 = 1 << 20;
/// Most return-path bytes in one message: QEMU's return path carries small
/// messages, and a reader never buffers more than this for one.
pub const MAX_RETURN_CHUNK: usize = 64 << 10;

/// Message types of the return direction (distinct from the dedup stream's frame
/// types, so a stream fed to the wrong reader fails at its first byte).
mod kind {
    pub(super) const GREETING: u8 = 0x11;
    pub(super) const QEMU: u8 = 0x12;
    pub(super) const DONE: u8 = 0x13;
    pub(super) const FAILED: u8 = 0x14;
    pub(super) const ACK: u8 = 0x15;
}

/// What the destination end sends the source end.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// First, as soon as the link is up: the template catalog the destination can
    /// restore from, if any. The source refers to templates only if it is its own.
    Greeting {
        /// The destination's catalog.
        catalog: Option<CatalogId>,
    },
    /// Bytes of the destination QEMU's return path, passed through unchanged.
    Qemu(Bytes),
    /// The END frame verified and every QEMU byte written to the destination QEMU:
    /// the only outcome on which the source may report success.
    Done {
        /// Length of the QEMU stream delivered.
        qemu_bytes: u64,
        /// The running digest of the END frame it verified.
        digest: [u8; FRAME_DIGEST],
    },
    /// The destination's side failed; the stream was not delivered whole.
    Failed {
        /// The destination's error, at most [`MAX_REASON`] bytes.
        reason: String,
    },
    /// How far the destination got: a source keeps at most its credit window of
    /// QEMU bytes beyond this, so that its QEMU sees the pace of the link and of the
    /// destination rather than of a proxy next to it (QEMU decides when to stop the
    /// VM from the pace it sees). Sent before the verdict only.
    Ack {
        /// QEMU bytes of the stream verified so far (and written to the destination
        /// QEMU, but for those held until END).
        qemu_bytes: u64,
    },
}

impl Reply {
    /// Appends the message's bytes to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Reply::Greeting { catalog } => {
                put_frame_header(dst, kind::GREETING, GREETING_LEN);
                dst.put_slice(&GREETING_MAGIC);
                dst.put_u16(VERSION);
                dst.put_u16(0);
                dst.put_slice(&catalog.map_or([0; 32], |id| id.0));
            }
            Reply::Qemu(bytes) => {
                for chunk in bytes.chunks(MAX_RETURN_CHUNK) {
                    put_frame_header(dst, kind::QEMU, chunk.len());
                    dst.put_slice(chunk);
                }
            }
            Reply::Done { qemu_bytes, digest } => {
                put_frame_header(dst, kind::DONE, DONE_LEN);
                dst.put_u64(*qemu_bytes);
                dst.put_slice(digest);
            }
            Reply::Ack { qemu_bytes } => {
                put_frame_header(dst, kind::ACK, ACK_LEN);
                dst.put_u64(*qemu_bytes);
            }
            Reply::Failed { reason } => {
                let mut end = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                put_frame_header(dst, kind::FAILED, end);
                dst.put_slice(&reason.as_bytes()[..end]);
            }
        }
    }
}

/// Reads the return direction: [`Reply`] messages in the order a destination may
/// send them (the greeting first and once; then return-path bytes and ACKs, one DONE
/// or one FAILED; return-path bytes may follow DONE, nothing follows FAILED).
/// Sans-IO, also a tokio-util `Decoder`.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    /// Stream offset of the first byte not consumed yet.
    offset: u64,
    greeted: bool,
    done: bool,
    failed: bool,
}

impl ReplyDecoder {
    /// A decoder at the start of the return direction.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next message, `Ok(None)` if `src` does not hold a whole one yet.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Reply>> {
        let Some((kind, len)) = frame_header(src) else {
            return Ok(None);
        };
        let at = self.offset;
        let malformed = |field, reason| Error::Malformed {
            offset: at,
            field,
            reason,
        };
        if self.failed {
            return Err(malformed("reply", "bytes after FAILED"));
        }
        let (wanted, max) = match kind {
            kind::GREETING if self.greeted => return Err(malformed("reply", "a second greeting")),
            kind::GREETING => (GREETING_LEN, GREETING_LEN),
            _ if !self.greeted => {
                return Err(malformed("greeting", "not a migstream destination"));
            }
            // the writer sends no empty chunk: one would only cost a reader a turn
            kind::QEMU if len == 0 => {
                return Err(Error::Malformed {
                    offset: at + 1,
                    field: "reply length",
                    reason: "an empty return-path chunk",
                });
            }
            kind::QEMU => (len, MAX_RETURN_CHUNK),
            kind::DONE | kind::FAILED if self.done => {
                return Err(malformed("reply", "a second verdict"));
            }
            kind::DONE => (DONE_LEN, DONE_LEN),
            kind::FAILED => (len, MAX_REASON),
            kind::ACK if self.done => return Err(malformed("reply", "an ACK after the verdict")),
            kind::ACK => (ACK_LEN, ACK_LEN),
            _ => return Err(malformed("reply type", "unknown")),
        };
        if len > max {
            return Err(Error::LimitExceeded {
                offset: at + 1,
                field: "reply length",
                value: len as u64,
                limit: max as u64,
            });
        }
        if len != wanted {
            return Err(Error::Malformed {
                offset: at + 1,
                field: "reply length",
                reason: "not the length of its type",
            });
        }
        if src.len() < FRAME_HEADER + len {
            return Ok(None);
        }
        src.advance(FRAME_HEADER);
        let payload = src.split_to(len).freeze();
        self.offset += (FRAME_HEADER + len) as u64;
        let body_at = at + FRAME_HEADER as u64;
        let reply = match kind {
            kind::GREETING => {
                self.greeted = true;
                parse_greeting(&payload, body_at)?
            }
            kind::QEMU => Reply::Qemu(payload),
            kind::ACK => Reply::Ack {
                qemu_bytes: Cursor::new(&payload).be64().expect("an ACK has its length"),
            },
            kind::DONE => {
                self.done = true;
                let mut c = Cursor::new(&payload);
                let done = (c.be64(), c.array());
                let (Some(qemu_bytes), Some(digest)) = done else {
                    unreachable!("a DONE payload has its length")
                };
                Reply::Done { qemu_bytes, digest }
            }
            _ => {
                self.done = true;
                self.failed = true;
                Reply::Failed {
                    reason: String::from_utf8_lossy(&payload).into_owned(),
                }
            }
        };
        Ok(Some(reply))
    }

    /// Like [`decode`](Self::decode) at the end of the input: fails if it ends inside
    /// a message.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Reply>> {
        match self.decode(src)? {
            None if !src.is_empty() => Err(Error::Truncated {
                offset: self.offset + src.len() as u64,
                field: "reply",
            }),
            reply => Ok(reply),
        }
    }

    /// Whether a DONE or FAILED message was read.
    pub fn verdict_read(&self) -> bool {
        self.done
    }
}

fn parse_greeting(p: &[u8], at: u64) -> Result<Reply> {
    let mut c = Cursor::new(p);
    let fields = (c.array::<4>(), c.be16(), c.be16(), c.array::<32>());
    let (Some(magic), Some(version), Some(flags), Some(catalog)) = fields else {
        unreachable!("a greeting payload has its length")
    };
    if magic != GREETING_MAGIC {
        return Err(Error::Malformed {
            offset: at,
            field: "greeting",
            reason: "not a migstream destination",
        });
    }
    if version != VERSION {
        return Err(Error::Unsupported {
            offset: at + 4,
            field: "greeting version",
            reason: "not version 4 of the dedup stream",
        });
    }
    if flags != 0 {
        return Err(Error::Malformed {
            offset: at + 6,
            field: "greeting flags",
            reason: "not zero",
        });
    }
    Ok(Reply::Greeting {
        catalog: (catalog != [0; 32]).then_some(CatalogId(catalog)),
    })
}

impl tokio_util::codec::Decoder for ReplyDecoder {
    type Item = Reply;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Reply>> {
        ReplyDecoder::decode(self, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(replies: &[Reply]) -> BytesMut {
        let mut b = BytesMut::new();
        for r in replies {
            r.encode(&mut b);
        }
        b
    }

    fn decode_all(mut b: BytesMut) -> Result<Vec<Reply>> {
        let mut d = ReplyDecoder::new();
        let mut out = Vec::new();
        while let Some(r) = d.decode(&mut b)? {
            out.push(r);
        }
        assert!(b.is_empty(), "all consumed");
        Ok(out)
    }

    #[test]
    fn every_message_round_trips_whole_and_byte_by_byte() {
        let replies = vec![
            Reply::Greeting {
                catalog: Some(CatalogId([7; 32])),
            },
            Reply::Qemu(Bytes::from_static(b"return path")),
            Reply::Ack {
                qemu_bytes: 1 << 40,
            },
            Reply::Done {
                qemu_bytes: 123_456,
                digest: [9; 16],
            },
            Reply::Qemu(Bytes::from_static(b"more")),
        ];
        let wire = bytes_of(&replies);
        assert_eq!(decode_all(wire.clone()).unwrap(), replies);
        let (mut d, mut buf, mut out) = (ReplyDecoder::new(), BytesMut::new(), Vec::new());
        for &b in wire.iter() {
            buf.put_u8(b);
            while let Some(r) = d.decode(&mut buf).unwrap() {
                out.push(r);
            }
        }
        assert_eq!(out, replies);
    }

    #[test]
    fn a_long_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON);
        let got = decode_all(bytes_of(&[
            Reply::Greeting { catalog: None },
            Reply::Failed { reason },
        ]))
        .unwrap();
        let Reply::Failed { reason } = &got[1] else {
            panic!("{got:?}")
        };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn out_of_order_or_oversized_messages_are_refused_with_their_offset() {
        let greeting = Reply::Greeting { catalog: None };
        let done = Reply::Done {
            qemu_bytes: 1,
            digest: [0; 16],
        };
        let failed = Reply::Failed { reason: "x".into() };
        let mut empty = bytes_of(std::slice::from_ref(&greeting));
        empty.extend_from_slice(&[kind::QEMU, 0, 0, 0, 0]);
        assert_eq!(decode_all(empty).unwrap_err().offset(), Some(46));
        let ack = Reply::Ack { qemu_bytes: 7 };
        let cases: [(Vec<Reply>, u64); 5] = [
            (vec![done.clone()], 0),
            (vec![greeting.clone(), done.clone(), ack], 74),
            (vec![greeting.clone(), greeting.clone()], 45),
            (vec![greeting.clone(), done.clone(), done.clone()], 74),
            (
                vec![
                    greeting.clone(),
                    failed,
                    Reply::Qemu(Bytes::from_static(b"q")),
                ],
                51,
            ),
        ];
        for (replies, offset) in cases {
            let err = decode_all(bytes_of(&replies)).unwrap_err();
            assert_eq!(err.offset(), Some(offset), "{replies:?}: {err}");
        }
        let mut huge = bytes_of(&[greeting]);
        huge.put_u8(kind::QEMU);
        huge.put_u32(u32::MAX);
        let err = decode_all(huge).unwrap_err();
        assert!(
            matches!(err, Error::LimitExceeded { offset: 46, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_dedup_stream_or_another_version_is_not_a_greeting() {
        let mut hello = BytesMut::new();
        hello.put_u8(0x01);
        hello.put_u32(44);
        hello.put_slice(b"MGSD");
        let err = ReplyDecoder::new().decode(&mut hello).unwrap_err();
        assert!(
            err.to_string().contains("not a migstream destination"),
            "{err}"
        );
        let mut old = bytes_of(&[Reply::Greeting { catalog: None }]);
        old[10] = 2;
        let err = ReplyDecoder::new().decode(&mut old).unwrap_err();
        assert!(matches!(err, Error::Unsupported { offset: 9, .. }), "{err}");
    }
}
