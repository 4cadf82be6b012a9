//! The crate's error type.
//!
//! Errors about the bytes of a stream carry the absolute byte offset where the
//! problem was found and the wire field involved, so a failing migration can be
//! diagnosed from the log line alone.

use std::io;

/// What went wrong, without the details; see [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The bytes break the format.
    Malformed,
    /// Valid QEMU, but a feature this crate does not carry (RDMA, mapped-ram, ...).
    Unsupported,
    /// A length or count is beyond the configured [`Limits`](crate::qemu::Limits).
    LimitExceeded,
    /// The stream ended in the middle of a record, or before its end.
    Truncated,
    /// A record handed to an encoder cannot be written.
    InvalidRecord,
    /// A page could not be restored exactly (missing template, fingerprint mismatch).
    Unresolved,
    /// A resolver refused a page body.
    Resolver,
    /// The peer refers to a template catalog this end does not hold.
    CatalogMismatch,
    /// A peer or a store did not answer in time.
    Timeout,
    /// The peer closed the connection before the migration's end.
    PeerClosed,
    /// The far end of a link reported that its side of the migration failed.
    Remote,
    /// The link's TLS handshake or certificates failed.
    Tls,
    /// Every slot for a migration is taken.
    Busy,
    /// A configuration (certificates, options, resolvers) is unusable.
    Config,
    /// The transport failed.
    Io,
}

/// An error of a migstream codec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes break the format.
    #[error("malformed stream at byte {offset}: {field}: {reason}")]
    Malformed {
        /// Absolute stream offset of the offending field.
        offset: u64,
        /// The wire field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Valid QEMU, but not carried by this crate.
    #[error("unsupported at byte {offset}: {field}: {reason}")]
    Unsupported {
        /// Absolute stream offset of the field.
        offset: u64,
        /// The wire field.
        field: &'static str,
        /// Which feature.
        reason: &'static str,
    },
    /// A length or count is beyond the configured limit.
    #[error("limit exceeded at byte {offset}: {field} is {value}, limit {limit}")]
    LimitExceeded {
        /// Absolute stream offset of the field.
        offset: u64,
        /// The wire field.
        field: &'static str,
        /// The value on the wire.
        value: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The stream ended inside a record or before the end of the migration.
    #[error("stream truncated at byte {offset}: {field} incomplete")]
    Truncated {
        /// Absolute stream offset where the bytes ran out.
        offset: u64,
        /// What was being read.
        field: &'static str,
    },
    /// A record handed to an encoder cannot be written.
    #[error("invalid record for encoding: {field}: {reason}")]
    InvalidRecord {
        /// The record field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A page could not be restored exactly: the migration must fail rather than
    /// deliver a guessed page.
    #[error("{resolver} cannot restore page {fingerprint}: {reason}")]
    Unresolved {
        /// The resolver that failed.
        resolver: &'static str,
        /// The fingerprint of the page that was wanted.
        fingerprint: crate::page::Fingerprint,
        /// Why.
        reason: &'static str,
    },
    /// A resolver refused the body of a page entry: the resolver's own reason, with
    /// its tag and the stream offset of the frame.
    #[error("resolver {tag:#04x} refused a page at byte {offset}: {reason}")]
    Resolver {
        /// The entry tag of the resolver.
        tag: u8,
        /// Absolute stream offset of the frame holding the entry (filled in by the
        /// decoder; 0 where a resolver builds the error).
        offset: u64,
        /// The resolver's reason.
        reason: String,
    },
    /// The peer refers to a template catalog this end does not hold.
    #[error("the stream refers to template catalog {wanted}, this end holds {}", held.map_or("none".to_string(), |id| id.to_string()))]
    CatalogMismatch {
        /// The catalog the stream refers to.
        wanted: crate::template::CatalogId,
        /// The catalog this end holds, if any.
        held: Option<crate::template::CatalogId>,
    },
    /// A peer or a store did not answer in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// The peer closed the connection early.
    #[error("the peer closed the connection before {what}")]
    PeerClosed {
        /// What had not happened yet.
        what: &'static str,
    },
    /// The far end of a link reported that its side of the migration failed.
    #[error("the destination failed: {reason}")]
    Remote {
        /// The far end's own error, as it reported it.
        reason: String,
    },
    /// The link's TLS handshake failed, or the peer's certificate was refused.
    #[cfg(feature = "relay")]
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Every slot of a kind is taken (migrations, or connections in their handshake).
    #[error("busy: {limit} {what} in progress already")]
    Busy {
        /// What is at its limit.
        what: &'static str,
        /// How many are allowed at once.
        limit: usize,
    },
    /// A configuration (certificates, options, resolvers) is unusable.
    #[error("invalid configuration: {what}: {reason}")]
    Config {
        /// What is configured wrongly.
        what: &'static str,
        /// Why it cannot be used.
        reason: String,
    },
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// What a resolver (a custom one especially) returns for a page body it cannot
    /// restore: the decoder adds the stream offset of the frame.
    pub fn resolver(tag: u8, reason: impl Into<String>) -> Self {
        Self::Resolver {
            tag,
            offset: 0,
            reason: reason.into(),
        }
    }

    /// The error of a resolver of the frame at stream offset `frame_at`, with that
    /// offset where the resolver could not know it.
    pub(crate) fn in_frame(self, frame_at: u64) -> Self {
        match self {
            Self::Resolver {
                tag,
                offset: 0,
                reason,
            } => Self::Resolver {
                tag,
                offset: frame_at,
                reason,
            },
            Self::Malformed {
                offset: 0,
                field,
                reason,
            } => Self::Malformed {
                offset: frame_at,
                field,
                reason,
            },
            other => other,
        }
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Malformed { .. } => ErrorKind::Malformed,
            Self::Unsupported { .. } => ErrorKind::Unsupported,
            Self::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            Self::Truncated { .. } => ErrorKind::Truncated,
            Self::InvalidRecord { .. } => ErrorKind::InvalidRecord,
            Self::Unresolved { .. } => ErrorKind::Unresolved,
            Self::Resolver { .. } => ErrorKind::Resolver,
            Self::CatalogMismatch { .. } => ErrorKind::CatalogMismatch,
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::PeerClosed { .. } => ErrorKind::PeerClosed,
            Self::Remote { .. } => ErrorKind::Remote,
            #[cfg(feature = "relay")]
            Self::Tls(_) => ErrorKind::Tls,
            Self::Busy { .. } => ErrorKind::Busy,
            Self::Config { .. } => ErrorKind::Config,
            Self::Io(_) => ErrorKind::Io,
        }
    }

    /// The absolute stream offset the error refers to, if it is about stream bytes.
    pub fn offset(&self) -> Option<u64> {
        match *self {
            Self::Malformed { offset, .. }
            | Self::Unsupported { offset, .. }
            | Self::LimitExceeded { offset, .. }
            | Self::Truncated { offset, .. }
            | Self::Resolver { offset, .. } => Some(offset),
            _ => None,
        }
    }

    /// The wire or record field the error is about, if any.
    pub fn field(&self) -> Option<&'static str> {
        match *self {
            Self::Malformed { field, .. }
            | Self::Unsupported { field, .. }
            | Self::LimitExceeded { field, .. }
            | Self::Truncated { field, .. }
            | Self::InvalidRecord { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Crosses an `io::Error` boundary (e.g. `FramedRead` over a transport) without
/// losing the typed error: get it back with `io::Error::get_ref` + `downcast_ref`.
impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Io(io) => io,
            Error::Truncated { .. } | Error::PeerClosed { .. } => {
                io::Error::new(io::ErrorKind::UnexpectedEof, err)
            }
            Error::Timeout { .. } => io::Error::new(io::ErrorKind::TimedOut, err),
            Error::InvalidRecord { .. } => io::Error::new(io::ErrorKind::InvalidInput, err),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
