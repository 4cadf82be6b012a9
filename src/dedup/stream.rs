//! Async adapters: the dedup codecs over any transport.
//!
//! Source side: [`DedupFrames`] turns a stream of QEMU records (e.g.
//! `FramedRead::new(qemu_socket, QemuDecoder::new())`) into dedup stream chunks to
//! write to the WAN transport. It flushes a partial batch whenever the QEMU side has
//! nothing more ready, so a QEMU waiting on its peer is never kept waiting on a
//! batch, and it pulls no more input while a full chunk waits to be taken
//! (back-pressure; memory stays bounded). The codecs themselves are tokio-util
//! `Encoder`/`Decoder`s too (see `codec.rs`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_core::Stream;

use super::{DedupEncoder, EncoderInput, Stats};
use crate::error::Result;

/// Dedup stream chunks from a stream of QEMU records, of the main channel or of a
/// multifd channel ([`EncoderInput`]); see the module docs.
#[derive(Debug)]
pub struct DedupFrames<S> {
    records: S,
    encoder: DedupEncoder,
    out: BytesMut,
    chunk: usize,
    /// The encoder's QEMU bytes when the last chunk was handed out.
    handed_out_at: u64,
    finished: bool,
}

/// QEMU bytes after which a chunk is handed out however small: pages claimed in a
/// few bytes (fill, templates) make frames of little output for much input, and a
/// writer that paces its input by QEMU bytes (a credit window) must see them go.
const HAND_OUT_QEMU_BYTES: u64 = 4 << 20;

impl<S> DedupFrames<S> {
    /// Encodes `records` with `encoder`, handing out chunks of about `chunk` bytes
    /// (or less when the input pauses or ends).
    pub fn new(records: S, encoder: DedupEncoder, chunk: usize) -> Self {
        Self {
            records,
            encoder,
            out: BytesMut::new(),
            chunk: chunk.max(1),
            handed_out_at: 0,
            finished: false,
        }
    }

    /// The encoder's running digest (after the last chunk: the END frame's).
    pub fn digest(&self) -> [u8; super::wire::FRAME_DIGEST] {
        self.encoder.digest()
    }

    /// The encoder's counters so far.
    pub fn stats(&self) -> &Stats {
        self.encoder.stats()
    }

    /// The frames made so far, as a chunk.
    fn hand_out(&mut self) -> Bytes {
        self.handed_out_at = self.encoder.stats().qemu_bytes;
        self.out.split().freeze()
    }

    /// What the encoder has batched, as a chunk now rather than when the batch
    /// fills or the input pauses: for a writer about to wait (for the destination's
    /// credit), which must send everything it took in first.
    pub fn flush(&mut self) -> Result<Option<Bytes>> {
        self.encoder.flush(&mut self.out)?;
        Ok((!self.out.is_empty()).then(|| self.hand_out()))
    }

    /// The encoder.
    pub fn encoder(&self) -> &DedupEncoder {
        &self.encoder
    }
}

impl<S, T> Stream for DedupFrames<S>
where
    S: Stream<Item = Result<T>> + Unpin,
    T: EncoderInput,
{
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes>>> {
        let this = &mut *self;
        loop {
            let taken = this.encoder.stats().qemu_bytes - this.handed_out_at;
            if this.out.len() >= this.chunk
                || (!this.out.is_empty() && taken >= HAND_OUT_QEMU_BYTES)
            {
                return Poll::Ready(Some(Ok(this.hand_out())));
            }
            if this.finished {
                return Poll::Ready((!this.out.is_empty()).then(|| Ok(this.hand_out())));
            }
            let step = match Pin::new(&mut this.records).poll_next(cx) {
                Poll::Ready(Some(Ok(record))) => {
                    record.encode_into(&mut this.encoder, &mut this.out)
                }
                Poll::Ready(Some(Err(e))) => Err(e),
                Poll::Ready(None) => {
                    this.finished = true;
                    this.encoder.finish(&mut this.out)
                }
                Poll::Pending => {
                    if let Err(e) = this.encoder.flush(&mut this.out) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    return match this.out.is_empty() {
                        true => Poll::Pending,
                        false => Poll::Ready(Some(Ok(this.hand_out()))),
                    };
                }
            };
            if let Err(e) = step {
                return Poll::Ready(Some(Err(e)));
            }
        }
    }
}
