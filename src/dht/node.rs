//! The store-node interface: what the ring needs of a key-value server, kept small
//! so that a Redis server and an in-process map are interchangeable behind it.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use std::time::Duration;

/// The future a [`Node`] method returns (boxed so that nodes are `dyn`-usable).
pub type NodeFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// One store node of the ring: binary keys to binary values.
///
/// Each call is one batch a node answers as a whole (one round trip for Redis);
/// callers bound the batch size. Errors are transport or server failures: the
/// caller treats the node as failed for this batch and asks a replica. A missing
/// key is not an error but `None`.
///
/// A failure that no retry cures, because the node is configured wrongly rather
/// than down (it refused the credentials or its TLS certificate was refused), is an
/// `io::Error` carrying a [`crate::Error::Config`] that names the node: the
/// destination's store refuses to start on it rather than silently lose the node.
pub trait Node: Send + Sync + Debug {
    /// The name the node is configured under (its URL): its identity in the ring.
    fn name(&self) -> &str;

    /// The values of `keys`, in order; `None` for a key the node does not hold.
    fn get_many<'a>(&'a self, keys: &'a [Vec<u8>]) -> NodeFuture<'a, Vec<Option<Bytes>>>;

    /// Stores every `(key, value)`, replacing what was there.
    fn set_many<'a>(&'a self, entries: &'a [(Vec<u8>, Bytes)]) -> NodeFuture<'a, ()>;

    /// Removes `keys` (absent keys are not an error).
    fn delete_many<'a>(&'a self, keys: &'a [Vec<u8>]) -> NodeFuture<'a, ()>;
}

/// The configuration error that a node's failure carries, if it is a refusal that no
/// retry cures (see [`Node`]); the failure itself otherwise.
pub(crate) fn refusal(e: io::Error) -> Result<crate::Error, io::Error> {
    if !is_refusal(&e) {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner().map(|inner| inner.downcast::<crate::Error>()) {
        Some(Ok(config)) => Ok(*config),
        Some(Err(inner)) => Err(io::Error::new(kind, inner)),
        None => Err(io::Error::from(kind)),
    }
}

/// A node's failure as the crate's error: its [`crate::Error::Config`] if it is a
/// refusal, [`crate::Error::Io`] otherwise.
pub(crate) fn node_error(e: io::Error) -> crate::Error {
    refusal(e).unwrap_or_else(crate::Error::Io)
}

/// Whether a node's failure is a refusal that no retry cures (see [`Node`]).
pub(crate) fn is_refusal(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::Error>())
        .is_some_and(|inner| matches!(inner, crate::Error::Config { .. }))
}

/// How long a store node (a Redis server) may take, per connection attempt and per
/// request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Longest wait for a TCP connection and its handshake.
    pub connect: Duration,
    /// Longest wait for the answer to one batch.
    pub request: Duration,
}

impl Timeouts {
    /// `connect` per connection attempt, `request` per batch.
    pub fn new(connect: Duration, request: Duration) -> Self {
        Self { connect, request }
    }
}

impl Default for Timeouts {
    /// 1 s to connect, 2 s per batch: long enough for a 1 MiB answer on a busy
    /// host, short enough that a dead node's replica is asked within a few seconds.
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(2),
        }
    }
}
