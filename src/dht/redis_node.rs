//! A Redis server as a store node, through the `redis` crate's multiplexed async
//! connection: one TCP connection per node, every batch one command (`MGET`, `MSET`,
//! `DEL`), and batches sent by concurrent callers pipelined on that connection.
//!
//! Credentials come from the URL (`redis://:PASSWORD@host:port` or
//! `redis://USER:PASSWORD@host:port`, sent as `AUTH` on every new connection) and
//! are kept out of the node's name; TLS is a `rediss://` URL, with a
//! [`RedisTls`] for a private CA or a client certificate.
//!
//! Connecting is lazy and repeated: the first request connects, a failed request
//! drops the connection, and the next request connects again. So a node that was
//! down or restarted is used again as soon as it answers, with no background task.

use std::fmt;
use std::io;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, Value};

use super::node::{Node, NodeFuture, Timeouts};
use super::redis_tls::RedisTls;
use crate::error::{Error, Result};

/// A Redis server reached at a `redis://[[USER]:PASSWORD@]host:port[/db]` URL, or
/// `rediss://...` for TLS.
///
/// Its [name](Node::name), which is also its identity in the ring, is the URL less
/// its credentials: the password is in no name, error message or `Debug` output,
/// and changing a password does not move templates.
pub struct RedisNode {
    name: String,
    client: Client,
    timeouts: Timeouts,
    /// The password, to scrub from the text of the server's errors.
    password: Option<String>,
    tls: bool,
    /// The open connection, if any; `None` after a failure (reconnect on next use).
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl fmt::Debug for RedisNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisNode")
            .field("name", &self.name)
            .field("timeouts", &self.timeouts)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl RedisNode {
    /// The node at `url`; nothing is connected until the first request. A
    /// `rediss://` URL trusts the system's roots.
    ///
    /// Fails with [`Error::Config`] if `url` is not a Redis URL.
    pub fn new(url: &str, timeouts: Timeouts) -> Result<Self> {
        Self::with_tls(url, timeouts, None)
    }

    /// The node at `url`, a `rediss://` URL if `tls` is given: its CA is the only
    /// one trusted and its client certificate, if any, is shown.
    ///
    /// Fails with [`Error::Config`] if `url` is not a Redis URL, or if `tls` is
    /// given for a URL that is not `rediss://` (TLS settings for a node reached in
    /// the clear are a mistake, not a preference).
    ///
    /// For a `rediss://` URL, rustls' ring provider becomes the process's default
    /// crypto provider unless one was installed already: the redis crate builds
    /// its TLS configuration with the default provider.
    pub fn with_tls(url: &str, timeouts: Timeouts, tls: Option<&RedisTls>) -> Result<Self> {
        let name = without_credentials(url);
        let invalid = |reason: String| Error::Config {
            what: "redis node URL",
            reason: format!("{name}: {reason}"),
        };
        let info = url
            .into_connection_info()
            .map_err(|e| invalid(scrub(&e.to_string(), password_of(url).as_deref())))?;
        let password = info.redis_settings().password().map(str::to_string);
        let scrub = |e: redis::RedisError| invalid(scrub(&e.to_string(), password.as_deref()));
        let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let client = match tls {
            Some(_) if !is_tls => {
                return Err(invalid(
                    "TLS settings are given but the URL is not rediss://".to_string(),
                ));
            }
            Some(tls) => Client::build_with_tls(info, tls.certificates()).map_err(scrub)?,
            None => Client::open(info).map_err(scrub)?,
        };
        if is_tls {
            // the redis crate builds its rustls configuration with the process's
            // default provider: make it ring (this crate's) unless one is chosen
            // already, so that a build that also has aws-lc-rs cannot panic there
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        Ok(Self {
            name,
            client,
            timeouts,
            password,
            tls: is_tls,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Whether it is reached over TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.tls
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

    /// The `io::Error` of a failed request. A refusal that no retry can cure (the
    /// server refused the credentials, or its TLS certificate was refused) carries
    /// an [`Error::Config`] naming the node (see [`Node`]).
    fn io_error(&self, e: &redis::RedisError) -> io::Error {
        let text = scrub(&e.to_string(), self.password.as_deref());
        if let Some(why) = auth_refusal(e) {
            let reason = format!("{}: {why} ({text})", self.name);
            let what = "redis node authentication";
            return io::Error::new(
                io::ErrorKind::PermissionDenied,
                Error::Config { what, reason },
            );
        }
        if let Some(tls) = tls_failure(e) {
            let reason = format!("{}: TLS handshake failed: {tls}", self.name);
            let what = "redis node TLS";
            return io::Error::new(io::ErrorKind::InvalidData, Error::Config { what, reason });
        }
        let kind = match () {
            () if e.is_timeout() => io::ErrorKind::TimedOut,
            () if e.is_connection_refusal() => io::ErrorKind::ConnectionRefused,
            () if e.is_connection_dropped() => io::ErrorKind::ConnectionReset,
            () => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("{}: {text}", self.name))
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

/// Why the server refused the client, if it did: `AUTH` failed, or a command was
/// refused for want of it.
fn auth_refusal(e: &redis::RedisError) -> Option<&'static str> {
    match e.code() {
        Some("NOAUTH") => Some("the server requires a password and the URL gives none"),
        Some("WRONGPASS") => Some("the server refused the user name or password of the URL"),
        Some("NOPERM") => Some("the server's ACL does not let this user run the command"),
        _ if e.kind() == redis::ErrorKind::AuthenticationFailed => {
            Some("the server refused the user name or password of the URL")
        }
        _ => None,
    }
}

/// The rustls error of a failed TLS handshake, if that is what `e` is (the redis
/// crate keeps tokio-rustls' `io::Error` in an `Arc`).
fn tls_failure(e: &redis::RedisError) -> Option<&rustls::Error> {
    let source = std::error::Error::source(e)?;
    let io = match source.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>() {
        Some(arc) => arc.downcast_ref::<io::Error>()?,
        None => source.downcast_ref::<io::Error>()?,
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// `url` without the user name and password of its authority, nor a `user` or
/// `pass` query parameter (the redis crate's way for Unix sockets): the node's
/// name. The authority ends at the first `/`, `?` or `#` after `://`, and the
/// credentials at its last `@`, as URL parsers split them.
pub(crate) fn without_credentials(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = match rest[..end].rfind('@') {
        Some(at) => &rest[at + 1..end],
        None => &rest[..end],
    };
    let tail = &rest[end..];
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| {
                    let key = p.split_once('=').map_or(*p, |(k, _)| k);
                    key != "pass" && key != "user"
                })
                .collect();
            let mut tail = path.to_string();
            if !kept.is_empty() {
                tail = format!("{tail}?{}", kept.join("&"));
            }
            if let Some(f) = fragment {
                tail = format!("{tail}#{f}");
            }
            tail
        }
        None => tail.to_string(),
    };
    format!("{}{host}{tail}", &url[..start])
}

/// The password of `url` as written (still percent-encoded), for scrubbing the
/// error of a URL that does not parse.
fn password_of(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let userinfo = &rest[..rest[..end].rfind('@')?];
    userinfo.split_once(':').map(|(_, p)| p.to_string())
}

/// `text` with every occurrence of `password` replaced, in case a server or a
/// parser ever echoes it.
fn scrub(text: &str, password: Option<&str>) -> String {
    match password {
        Some(p) if !p.is_empty() => text.replace(p, "<redacted>"),
        _ => text.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_named_by_its_url_less_its_credentials() {
        for (url, name) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://user:s3cret@h:6379/2", "redis://h:6379/2"),
            (
                "rediss://user:p%40ss@h.example:6380",
                "rediss://h.example:6380",
            ),
            ("redis://:a@b@h:1", "redis://h:1"),
            (
                "redis://h:1/0?protocol=resp3",
                "redis://h:1/0?protocol=resp3",
            ),
            (
                "redis+unix:///run/r.sock?db=1&pass=s3cret",
                "redis+unix:///run/r.sock?db=1",
            ),
            (
                "redis+unix:///run/r.sock?pass=s3cret&user=u",
                "redis+unix:///run/r.sock",
            ),
            ("not a url", "not a url"),
        ] {
            assert_eq!(without_credentials(url), name, "{url}");
        }
    }

    #[test]
    fn no_password_in_names_errors_or_debug() {
        let timeouts = Timeouts::default();
        let node = RedisNode::new("redis://u:s3cret@127.0.0.1:1", timeouts).unwrap();
        assert_eq!(node.name(), "redis://127.0.0.1:1");
        assert!(!format!("{node:?}").contains("s3cret"));
        assert!(!node.is_tls());
        for bad in [
            "redis://:s3cret@127.0.0.1:notaport",
            "http://:s3cret@127.0.0.1:1",
            "rediss://:s3cret@[::1:1",
        ] {
            let err = RedisNode::new(bad, timeouts).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Config {
                        what: "redis node URL",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            assert!(!err.to_string().contains("s3cret"), "{err}");
            assert!(!format!("{err:?}").contains("s3cret"), "{err:?}");
        }
        // TLS settings for a node reached in the clear are refused
        let err = RedisNode::with_tls(
            "redis://:s3cret@127.0.0.1:1",
            timeouts,
            Some(&RedisTls::default()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not rediss://"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let node = RedisNode::with_tls(
            "rediss://:s3cret@127.0.0.1:1",
            timeouts,
            Some(&RedisTls::default()),
        )
        .unwrap();
        assert!(node.is_tls());
    }

    #[test]
    fn scrubbing_removes_every_copy_of_the_password() {
        assert_eq!(scrub("a pw b pw", Some("pw")), "a <redacted> b <redacted>");
        assert_eq!(scrub("a pw", Some("")), "a pw");
        assert_eq!(scrub("a pw", None), "a pw");
        assert_eq!(
            password_of("redis://u:p%40ss@h:1").as_deref(),
            Some("p%40ss")
        );
        assert_eq!(password_of("redis://h:1"), None);
    }
}
