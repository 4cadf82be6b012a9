//! Where a decoder is in its stream, and the typed errors it reports from there:
//! one place for the main channel's decoder and the multifd channels' decoder, so
//! that both count consumed bytes and give error offsets the same way.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::Error;

/// Bytes consumed so far: the stream offset of the first byte not yet consumed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Position(u64);

impl Position {
    /// The stream offset of the first byte not yet consumed.
    pub(crate) fn offset(self) -> u64 {
        self.0
    }

    /// Consumes the first `n` bytes of `src` and hands them out.
    pub(crate) fn take(&mut self, src: &mut BytesMut, n: usize) -> Bytes {
        self.0 += n as u64;
        src.split_to(n).freeze()
    }

    /// Consumes the first `n` bytes of `src`.
    pub(crate) fn skip(&mut self, src: &mut BytesMut, n: usize) {
        self.0 += n as u64;
        src.advance(n);
    }

    /// [`Error::Malformed`] at `at` bytes past the position.
    pub(crate) fn malformed(self, at: usize, field: &'static str, reason: &'static str) -> Error {
        Error::Malformed {
            offset: self.0 + at as u64,
            field,
            reason,
        }
    }

    /// [`Error::Unsupported`] at `at` bytes past the position.
    pub(crate) fn unsupported(self, at: usize, field: &'static str, reason: &'static str) -> Error {
        Error::Unsupported {
            offset: self.0 + at as u64,
            field,
            reason,
        }
    }

    /// [`Error::LimitExceeded`] at `at` bytes past the position.
    pub(crate) fn limit(self, at: usize, field: &'static str, value: usize, limit: usize) -> Error {
        Error::LimitExceeded {
            offset: self.0 + at as u64,
            field,
            value: value as u64,
            limit: limit as u64,
        }
    }

    /// [`Error::Truncated`]: the input ended after the `pending` bytes not yet
    /// consumed, while reading `field`.
    pub(crate) fn truncated(self, pending: usize, field: &'static str) -> Error {
        Error::Truncated {
            offset: self.0 + pending as u64,
            field,
        }
    }
}
