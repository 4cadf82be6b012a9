//! Frames the decoder took off its input ahead of their turn, their batches
//! decompressed meanwhile on [`Workers`] with more than one thread, so that
//! decompressing the next frames overlaps restoring this one; with one, on the
//! caller's thread when the frame's turn comes, or earlier when the decoder asks, so
//! that the next frame's pages can be fetched while this one is restored. Everything about a
//! frame that touches the output or the running digest stays with the decoder, in
//! stream order; this is the queue and the decompression alone.
//!
//! Memory is bounded in bytes, not frames: the frames taken and not yet given back
//! ([`Ahead::done`]), stored and decompressed, pass a budget by one frame at most.

use std::collections::VecDeque;

use bytes::Bytes;

use super::compress::Decompressor;
use super::wire::DataHeader;
use super::workers::Workers;
use crate::error::{Error, Result};

/// Look-ahead per decompressing thread, stored and decompressed bytes: a few
/// frames of 256 KiB batches each, little against one frame's [`Limits`](super::Limits).
pub(super) const BYTES_PER_THREAD: usize = 4 << 20;

/// A frame taken off the input, at its stream offset.
pub(super) struct Taken {
    pub(super) at: u64,
    pub(super) frame: Frame,
}

/// What a frame taken ahead is.
pub(super) enum Frame {
    /// A DATA frame whose header checked out.
    Data {
        header: DataHeader,
        stored: Bytes,
        batch: Batch,
    },
    /// The END frame's payload.
    End(Bytes),
    /// What was wrong with the input at this frame, reported when its turn comes.
    Failed(Error),
}

/// A DATA frame's batch.
pub(super) enum Batch {
    /// To be decompressed on the caller's thread.
    Stored,
    /// On a worker; its result comes back in submission order.
    InFlight,
    Done(Decompressed),
}

/// A batch decompressed into `raw` (sized to its length): `Ok(true)` if the stored
/// batch decompressed to exactly that length.
pub(super) struct Decompressed {
    pub(super) raw: Vec<u8>,
    pub(super) outcome: Result<bool>,
}

/// A job of the workers: codec, stored batch, the buffer to decompress into.
type Job = (u8, Bytes, Vec<u8>);

fn decompress(decompressor: &mut Decompressor, (codec, stored, mut raw): Job) -> Decompressed {
    let outcome = decompressor.decompress(codec, &stored, &mut raw);
    Decompressed { raw, outcome }
}

/// The frames taken ahead, oldest first.
pub(super) struct Ahead {
    frames: VecDeque<Taken>,
    /// With more than one thread.
    workers: Option<Workers<Job, Decompressed, Decompressor>>,
    /// With one thread.
    inline: Decompressor,
    /// Stored and decompressed bytes of the frames taken and not yet done with.
    bytes: usize,
    budget: usize,
    /// Most frames queued (taken, not popped).
    max_queued: usize,
    /// An END frame or an error was queued: nothing after it is taken.
    closed: bool,
    /// Batch buffers of frames done with, for the next frames.
    spare: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead")
            .field("frames", &self.frames.len())
            .field("bytes", &self.bytes)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Ahead {
    /// Look-ahead for `threads` decompressing threads, the caller's among them; one
    /// decompresses inline, when a frame is restored.
    pub(super) fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let workers =
            (threads > 1).then(|| Workers::new(threads, Decompressor::default, decompress));
        Self {
            max_queued: workers.as_ref().map_or(1, Workers::capacity),
            workers,
            frames: VecDeque::new(),
            inline: Decompressor::default(),
            bytes: 0,
            budget: threads * BYTES_PER_THREAD,
            closed: false,
            spare: Vec::new(),
        }
    }

    /// Whether another frame may be taken: always when nothing is held, else while
    /// the budget and the queue allow and nothing closed the stream.
    pub(super) fn has_room(&self) -> bool {
        !self.closed
            && (self.bytes == 0
                || (self.bytes < self.budget && self.frames.len() < self.max_queued))
    }

    /// Queues a DATA frame, and starts decompressing its batch if there are workers.
    pub(super) fn push_data(&mut self, at: u64, header: DataHeader, stored: Bytes) {
        self.bytes += stored.len() + header.raw_len as usize;
        let batch = match &mut self.workers {
            Some(workers) => {
                let raw = batch_buffer(&mut self.spare, &header);
                workers.submit((header.codec, stored.clone(), raw));
                Batch::InFlight
            }
            None => Batch::Stored,
        };
        let frame = Frame::Data {
            header,
            stored,
            batch,
        };
        self.frames.push_back(Taken { at, frame });
    }

    /// Queues the END frame or an error: the last frame taken.
    pub(super) fn push_last(&mut self, at: u64, frame: Frame) {
        self.closed = true;
        self.frames.push_back(Taken { at, frame });
    }

    /// The oldest frame, its batch decompressed.
    pub(super) fn pop(&mut self) -> Option<Taken> {
        self.decompress_oldest(true);
        self.frames.pop_front()
    }

    /// The oldest frame if it is a DATA frame whose batch decompressed well: a frame
    /// whose pages may be fetched ahead. With `wait`, its batch is decompressed now
    /// if it has to be; without, `None` unless it is already.
    pub(super) fn pop_ready(&mut self, wait: bool) -> Option<Taken> {
        if !self.decompress_oldest(wait) {
            return None;
        }
        let Frame::Data { batch, .. } = &self.frames.front()?.frame else {
            return None;
        };
        match batch {
            Batch::Done(Decompressed {
                outcome: Ok(true), ..
            }) => self.frames.pop_front(),
            _ => None,
        }
    }

    /// Brings the oldest frame's batch to [`Batch::Done`]: decompresses it on this
    /// thread or waits for its worker with `wait`, else only takes a result that is
    /// there. False if it is not done.
    fn decompress_oldest(&mut self, wait: bool) -> bool {
        let Some(Taken {
            frame:
                Frame::Data {
                    header,
                    stored,
                    batch,
                },
            ..
        }) = self.frames.front_mut()
        else {
            return true;
        };
        let done = match batch {
            Batch::Done(_) => return true,
            Batch::Stored if wait => {
                let raw = batch_buffer(&mut self.spare, header);
                decompress(&mut self.inline, (header.codec, stored.clone(), raw))
            }
            Batch::Stored => return false,
            Batch::InFlight => {
                let workers = self.workers.as_mut().expect("in flight on the workers");
                let result = match wait {
                    true => workers.next(),
                    false => workers.try_next(),
                };
                let Some(result) = result else {
                    return false;
                };
                result
            }
        };
        *batch = Batch::Done(done);
        true
    }

    /// Gives back a DATA frame's batch buffer once its frame is restored, with the
    /// length of its stored batch: what it held no longer counts.
    pub(super) fn done(&mut self, raw: Vec<u8>, stored_len: usize) {
        self.bytes -= stored_len + raw.len();
        // kept whatever its size: big batches freed and allocated again frame after
        // frame left the process holding 68 MiB (one stream) and 280 MiB (nine) more
        // after the hostile migrations of tests/attack.rs ended. No more buffers are
        // kept than were in use at once, which the budget bounds.
        if self.spare.len() < self.max_queued + 1 {
            self.spare.push(raw);
        }
    }

    /// Stored and decompressed bytes held now (a batch counts decompressed from
    /// when its frame is taken).
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most [`bytes`](Self::bytes) may be before one more frame is taken.
    #[cfg(test)]
    pub(super) fn budget(&self) -> usize {
        self.budget
    }
}

/// A buffer for `header`'s batch decompressed: a spare one if there is one.
fn batch_buffer(spare: &mut Vec<Vec<u8>>, header: &DataHeader) -> Vec<u8> {
    let mut raw = spare.pop().unwrap_or_default();
    raw.resize(header.raw_len as usize, 0);
    raw
}
