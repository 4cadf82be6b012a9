//! One migration over loopback TCP, four parties as four tasks, each with its own
//! socket, exactly as with real QEMUs and `examples/proxy.rs`:
//!
//! ```text
//! source QEMU ──tcp──▶ source end ══ dedup stream, tcp ══▶ destination end ──tcp──▶ destination QEMU
//! (this demo)          relay::source                        relay::destination       (this demo)
//! ```
//!
//! The fake QEMUs hash what they send and receive: delivery is byte-exact when the
//! two hashes agree.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use migstream::relay::{self, DestinationConfig, Progress, Report, SourceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::Error;
use super::guest::Guest;
use super::stream::QemuStream;

/// What one QEMU side saw: its byte count and the BLAKE3 hash of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) bytes: u64,
    pub(crate) hash: blake3::Hash,
}

/// How one migration went.
#[derive(Debug)]
pub(crate) struct Migration {
    pub(crate) sent: Seen,
    pub(crate) received: Seen,
    /// PAGE and ZERO records the source QEMU sent.
    pub(crate) pages: (u64, u64),
    pub(crate) source: Report,
    pub(crate) destination: Report,
    pub(crate) elapsed: Duration,
}

/// Migrates `guest` through a source end configured by `source` and a destination
/// end configured by `destination`, every connection a real TCP socket on 127.0.0.1.
/// Fails if any party fails; a mismatch of the hashes is the caller's to judge.
pub(crate) async fn migrate(
    guest: Arc<Guest>,
    source: SourceConfig,
    destination: DestinationConfig,
) -> Result<Migration, Error> {
    let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
    let (src_end, dst_end, dst_qemu) = (
        TcpListener::bind(localhost).await?,
        TcpListener::bind(localhost).await?,
        TcpListener::bind(localhost).await?,
    );
    let (src_end_at, dst_end_at) = (src_end.local_addr()?, dst_end.local_addr()?);
    let dst_qemu_at = dst_qemu.local_addr()?;
    let started = Instant::now();
    let ((sent, pages), received, source, destination) = tokio::try_join!(
        Task::spawn(source_qemu(guest, src_end_at)),
        Task::spawn(destination_qemu(dst_qemu)),
        Task::spawn(source_end(src_end, dst_end_at, source)),
        Task::spawn(destination_end(dst_end, dst_qemu_at, destination)),
    )?;
    Ok(Migration {
        sent,
        received,
        pages,
        source,
        destination,
        elapsed: started.elapsed(),
    })
}

/// The source QEMU: connects, sends the stream, then reads the return path to its end.
async fn source_qemu(guest: Arc<Guest>, to: SocketAddr) -> Result<(Seen, (u64, u64)), Error> {
    let mut socket = TcpStream::connect(to).await?;
    let (mut hasher, mut bytes) = (blake3::Hasher::new(), 0);
    let mut stream = QemuStream::new(&guest);
    for chunk in stream.by_ref() {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        socket.write_all(&chunk).await?;
    }
    socket.shutdown().await?;
    socket.read_to_end(&mut Vec::new()).await?;
    let seen = Seen {
        bytes,
        hash: hasher.finalize(),
    };
    Ok((seen, (stream.pages, stream.zero_pages)))
}

/// The destination QEMU: accepts one connection and reads it to its end (QEMU with
/// no return path writes nothing back).
async fn destination_qemu(listener: TcpListener) -> Result<Seen, Error> {
    let (mut socket, _) = listener.accept().await?;
    let (mut hasher, mut bytes, mut buf) = (blake3::Hasher::new(), 0, vec![0; 256 << 10]);
    loop {
        match socket.read(&mut buf).await? {
            0 => {
                return Ok(Seen {
                    bytes,
                    hash: hasher.finalize(),
                });
            }
            n => {
                hasher.update(&buf[..n]);
                bytes += n as u64;
            }
        }
    }
}

/// The source end (`proxy source`): takes the QEMU connection, dials the destination end.
async fn source_end(
    listener: TcpListener,
    to: SocketAddr,
    config: SourceConfig,
) -> Result<Report, Error> {
    let (qemu, link) = accept_and_dial(listener, to).await?;
    let progress = Progress::default();
    Ok(relay::source(qemu.into_split(), link.into_split(), &config, &progress).await?)
}

/// The destination end (`proxy destination`): takes the link, dials the destination QEMU.
async fn destination_end(
    listener: TcpListener,
    to: SocketAddr,
    config: DestinationConfig,
) -> Result<Report, Error> {
    let (link, qemu) = accept_and_dial(listener, to).await?;
    let progress = Progress::default();
    Ok(relay::destination(link.into_split(), qemu.into_split(), &config, &progress).await?)
}

async fn accept_and_dial(
    listener: TcpListener,
    to: SocketAddr,
) -> Result<(TcpStream, TcpStream), Error> {
    let (inbound, _) = listener.accept().await?;
    let outbound = TcpStream::connect(to).await?;
    for socket in [&inbound, &outbound] {
        socket.set_nodelay(true)?;
    }
    Ok((inbound, outbound))
}

/// A spawned task (so that the parties run on every core), aborted when dropped: if
/// one party fails, `try_join!` drops the others, and none is left waiting for a
/// connection that will never come.
struct Task<T>(JoinHandle<Result<T, Error>>);

impl<T: Send + 'static> Task<T> {
    fn spawn(work: impl Future<Output = Result<T, Error>> + Send + 'static) -> Self {
        Self(tokio::spawn(work))
    }
}

impl<T> Future for Task<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| joined?)
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
