//! Where a proxy listens and connects: TCP for the link, TCP or a Unix socket on the
//! QEMU side, and the socket options that decide how a link behaves on a WAN.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::error::{Error, Result};

/// A socket address as an operator writes it: `HOST:PORT`, or `unix:PATH` (QEMU's
/// `migrate unix:PATH` and `-incoming unix:PATH`, so that no TCP port is open next
/// to QEMU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `HOST:PORT`, resolved when used.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("unix:") {
            Some("") => Err(Error::Config {
                what: "endpoint",
                reason: "unix: needs a path".into(),
            }),
            Some(path) => Ok(Endpoint::Unix(path.into())),
            None if s
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && !p.is_empty()) =>
            {
                Ok(Endpoint::Tcp(s.to_string()))
            }
            None => Err(Error::Config {
                what: "endpoint",
                reason: format!("{s:?} is neither HOST:PORT nor unix:PATH"),
            }),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => f.write_str(addr),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Endpoint {
    /// Connects, within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Conn> {
        let connect = async {
            Ok::<_, io::Error>(match self {
                Endpoint::Tcp(addr) => {
                    let stream = TcpStream::connect(addr).await?;
                    stream.set_nodelay(true)?;
                    Conn::Tcp(stream)
                }
                Endpoint::Unix(path) => Conn::Unix(UnixStream::connect(path).await?),
            })
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(conn) => conn.map_err(|e| {
                Error::Io(io::Error::new(
                    e.kind(),
                    format!("connecting to {self}: {e}"),
                ))
            }),
            Err(_) => Err(Error::Timeout {
                what: "a connection",
            }),
        }
    }

    /// Listens; a Unix socket file left by an earlier run is replaced.
    pub async fn listen(&self) -> Result<Listener> {
        Ok(match self {
            Endpoint::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr).await?),
            Endpoint::Unix(path) => {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
                Listener::Unix(UnixListener::bind(path)?)
            }
        })
    }
}

/// A listening socket of either kind.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix socket listener.
    Unix(UnixListener),
}

/// Longest pause between two failed `accept` calls.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Listener {
    /// The address it listens on, as [`Endpoint`] writes it.
    pub fn local_addr(&self) -> Result<String> {
        Ok(match self {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(l) => {
                let addr = l.local_addr()?;
                let path = addr.as_pathname().unwrap_or_else(|| "".as_ref());
                format!("unix:{}", path.display())
            }
        })
    }

    /// The next connection and its peer's address. A failed `accept` (no file
    /// descriptor left, a connection reset before it was taken) is logged and retried
    /// after a pause that doubles up to a second: it never ends the process, and
    /// the migrations in flight go on.
    pub async fn accept(&self) -> (Conn, String) {
        let mut pause = Duration::from_millis(10);
        loop {
            let accepted = match self {
                Listener::Tcp(l) => l
                    .accept()
                    .await
                    .map(|(s, peer)| (Conn::Tcp(s), peer.to_string())),
                Listener::Unix(l) => l
                    .accept()
                    .await
                    .map(|(s, _)| (Conn::Unix(s), "unix".to_string())),
            };
            match accepted {
                Ok(conn) => return conn,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "accept failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// A connection of either kind.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix socket.
    Unix(UnixStream),
}

impl Conn {
    /// The TCP stream, if it is one.
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Conn::Tcp(s) => Some(s),
            Conn::Unix(_) => None,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// Bytes a source proxy lets wait in the kernel: unsent on the link, unread from
/// QEMU. The link stays full (what is in flight is not counted), and the source
/// QEMU cannot run far ahead of it.
pub const SHORT_QUEUE: usize = 128 * 1024;

/// How a link's TCP socket notices a peer that vanished: keepalive probes after
/// this much silence, every [`KEEPALIVE_INTERVAL`] after that.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Sets a link's TCP options: no Nagle delay (frames are already batched), keepalive
/// probes and a user timeout of `dead_after`, so that a link black-holed with data
/// in flight fails in that time instead of the kernel's ~15 minutes of
/// retransmissions; and, at the source (`short_queue`), at most [`SHORT_QUEUE`]
/// unsent bytes in the kernel.
pub fn tune_link(link: &TcpStream, dead_after: Duration, short_queue: bool) -> Result<()> {
    link.set_nodelay(true)?;
    let sock = socket2::SockRef::from(link);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    {
        sock.set_tcp_user_timeout(Some(dead_after))?;
        if short_queue {
            sock.set_tcp_notsent_lowat(SHORT_QUEUE as u32)?;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (dead_after, short_queue);
    Ok(())
}

/// Keeps the source QEMU's view of the migration in step with the link. QEMU decides
/// when to stop the VM for the last pass from how fast its socket drains; with the
/// kernel's default queues megabytes of deduplicated stream would wait behind that
/// decision on a slow link, and the VM would stay stopped until they drained.
pub fn tune_source_qemu(qemu: &Conn) -> Result<()> {
    let sock = match qemu {
        Conn::Tcp(s) => socket2::SockRef::from(s),
        Conn::Unix(s) => socket2::SockRef::from(s),
    };
    sock.set_recv_buffer_size(SHORT_QUEUE)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_operators_write_them() {
        assert_eq!(
            "127.0.0.1:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "[::1]:4444".parse::<Endpoint>().unwrap().to_string(),
            "[::1]:4444"
        );
        let unix: Endpoint = "unix:/run/mig.sock".parse().unwrap();
        assert_eq!(unix, Endpoint::Unix("/run/mig.sock".into()));
        assert_eq!(unix.to_string(), "unix:/run/mig.sock");
        for bad in ["unix:", "4444", ":4444", "host:", ""] {
            assert!(
                matches!(bad.parse::<Endpoint>(), Err(Error::Config { .. })),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_unix_socket_listens_connects_and_replaces_a_stale_file() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("migstream-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at: Endpoint = format!("unix:{}", dir.join("s").display()).parse().unwrap();
        drop(at.listen().await.unwrap()); // leaves the socket file behind
        let listener = at.listen().await.unwrap();
        assert_eq!(listener.local_addr().unwrap(), at.to_string());
        let (mut client, (mut server, _)) = tokio::join!(
            async { at.connect(Duration::from_secs(5)).await.unwrap() },
            listener.accept()
        );
        client.write_all(b"ping").await.unwrap();
        let mut got = [0; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
