//! The store-node interface: what the ring needs of a key-value server, kept small
//! so that a Redis server and an in-process map are interchangeable behind it.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;

/// The future a [`Node`] method returns (boxed so that nodes are `dyn`-usable).
pub type NodeFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// One store node of the ring: binary keys to binary values.
///
/// Each call is one batch a node answers as a whole (one round trip for Redis);
/// callers bound the batch size. Errors are transport or server failures: the
/// caller treats the node as failed for this batch and asks a replica. A missing
/// key is not an error but `None`.
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
