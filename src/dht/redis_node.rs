//! A Redis server as a store node, through the `redis` crate's multiplexed async
//! connection: one TCP connection per node, every batch one command (`MGET`, `MSET`,
//! `DEL`), and batches sent by concurrent callers pipelined on that connection.
//!
//! Connecting is lazy and repeated: the first request connects, a failed request
//! drops the connection, and the next request connects again. So a node that was
//! down or restarted is used again as soon as it answers, with no background task.

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};

use super::node::{Node, NodeFuture};

/// How long a Redis node may take, per connection attempt and per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait for a TCP connection and its handshake.
    pub connect: Duration,
    /// Longest wait for the answer to one batch.
    pub request: Duration,
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

/// A Redis server reached at a `redis://host:port[/db]` URL.
pub struct RedisNode {
    name: String,
    client: Client,
    timeouts: Timeouts,
    /// The open connection, if any; `None` after a failure (reconnect on next use).
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl fmt::Debug for RedisNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisNode")
            .field("name", &self.name)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl RedisNode {
    /// The node at `url`; nothing is connected until the first request.
    ///
    /// Fails with [`crate::Error::Io`] (`InvalidInput`) if `url` is not a Redis URL.
    pub fn new(url: &str, timeouts: Timeouts) -> crate::Result<Self> {
        let client = Client::open(url)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: {e}")))?;
        Ok(Self {
            name: url.to_string(),
            client,
            timeouts,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// The open connection, connecting first if there is none.
    async fn connection(&self) -> io::Result<MultiplexedConnection> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeouts.connect))
            .set_response_timeout(Some(self.timeouts.request));
        let connect = self
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let c = match tokio::time::timeout(self.timeouts.connect, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.io_error(&e)),
            Err(_) => return Err(self.timed_out("connect")),
        };
        *conn = Some(c.clone());
        Ok(c)
    }

    /// Runs one command; on any failure the connection is dropped, so the next
    /// request reconnects.
    async fn run(&self, cmd: redis::Cmd) -> io::Result<Value> {
        let mut c = self.connection().await?;
        let answer = tokio::time::timeout(self.timeouts.request, cmd.query_async::<Value>(&mut c));
        let result = match answer.await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => self.io_error(&e),
            Err(_) => self.timed_out("request"),
        };
        *self.conn.lock().await = None;
        Err(result)
    }

    fn io_error(&self, e: &redis::RedisError) -> io::Error {
        let kind = match () {
            () if e.is_timeout() => io::ErrorKind::TimedOut,
            () if e.is_connection_refusal() => io::ErrorKind::ConnectionRefused,
            () if e.is_connection_dropped() => io::ErrorKind::ConnectionReset,
            () => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("{}: {e}", self.name))
    }

    fn timed_out(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{}: {what} timed out", self.name),
        )
    }

    fn unexpected(&self, command: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: unexpected answer to {command}", self.name),
        )
    }
}

impl Node for RedisNode {
    fn name(&self) -> &str {
        &self.name
    }

    fn get_many<'a>(&'a self, keys: &'a [Vec<u8>]) -> NodeFuture<'a, Vec<Option<Bytes>>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut cmd = redis::cmd("MGET");
            keys.iter().for_each(|k| {
                cmd.arg(&k[..]);
            });
            let Value::Array(values) = self.run(cmd).await? else {
                return Err(self.unexpected("MGET"));
            };
            if values.len() != keys.len() {
                return Err(self.unexpected("MGET"));
            }
            values
                .into_iter()
                .map(|v| match v {
                    Value::BulkString(bytes) => Ok(Some(Bytes::from(bytes))),
                    Value::Nil => Ok(None),
                    _ => Err(self.unexpected("MGET")),
                })
                .collect()
        })
    }

    fn set_many<'a>(&'a self, entries: &'a [(Vec<u8>, Bytes)]) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            if entries.is_empty() {
                return Ok(());
            }
            let mut cmd = redis::cmd("MSET");
            entries.iter().for_each(|(k, v)| {
                cmd.arg(&k[..]).arg(&v[..]);
            });
            match self.run(cmd).await? {
                Value::Okay => Ok(()),
                _ => Err(self.unexpected("MSET")),
            }
        })
    }

    fn delete_many<'a>(&'a self, keys: &'a [Vec<u8>]) -> NodeFuture<'a, ()> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut cmd = redis::cmd("DEL");
            keys.iter().for_each(|k| {
                cmd.arg(&k[..]);
            });
            match self.run(cmd).await? {
                Value::Int(_) => Ok(()),
                _ => Err(self.unexpected("DEL")),
            }
        })
    }
}
