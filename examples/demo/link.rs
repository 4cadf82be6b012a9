//! One migration over loopback TCP, four parties as four tasks, each with its own
//! socket, exactly as with real QEMUs and `examples/proxy.rs`:
//!
//! ```text
//! source QEMU ──tcp──▶ source proxy ══ dedup stream, mutual TLS ══▶ destination proxy ──tcp──▶ destination QEMU
//! (this demo)          relay::SourceProxy                             relay::DestinationProxy   (this demo)
//! ```
//!
//! The link's certificates are made for the run: a CA, `dest.demo` for the
//! destination, `source.demo` for the source, the only client name it allows.
//!
//! The fake QEMUs hash what they send and receive: delivery is byte-exact when the
//! two hashes agree.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use migstream::relay::net::{Conn, Endpoint};
use migstream::relay::tls::{TlsClient, TlsIdentity, TlsServer};
use migstream::relay::{
    DestinationConfig, DestinationProxy, Progress, Report, SourceConfig, SourceProxy,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
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

/// The source proxy: takes the QEMU connection, links to the destination proxy.
async fn source_end(
    listener: TcpListener,
    to: SocketAddr,
    config: SourceConfig,
) -> Result<Report, Error> {
    let (qemu, _) = listener.accept().await?;
    let tls = TlsClient::new(&CERTS.source, "dest.demo")?;
    let proxy = SourceProxy::new(config, to.to_string(), Some(tls));
    let served = proxy.serve(Conn::Tcp(qemu), &Progress::default()).await?;
    served.report().ok_or_else(not_a_migration)
}

/// The destination proxy: takes the link, checks the source's certificate and
/// HELLO, then connects to the destination QEMU.
async fn destination_end(
    listener: TcpListener,
    to: SocketAddr,
    config: DestinationConfig,
) -> Result<Report, Error> {
    let (link, _) = listener.accept().await?;
    let tls = TlsServer::new(&CERTS.destination, &["source.demo".to_string()])?;
    let proxy = DestinationProxy::new(config, Endpoint::Tcp(to.to_string()), Some(tls));
    let incoming = proxy.handshake(Conn::Tcp(link)).await?;
    let served = incoming.restore(&Progress::default()).await?;
    served.report().ok_or_else(not_a_migration)
}

/// The demo's QEMU connects one main channel (no multifd).
fn not_a_migration() -> Error {
    "a multifd channel where the demo expects its migration".into()
}

/// Both proxies' certificates, made once per run.
struct Certs {
    source: TlsIdentity,
    destination: TlsIdentity,
}

static CERTS: LazyLock<Certs> = LazyLock::new(|| {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a key"))
        .expect("a self-signed CA");
    let identity = |name: &str| {
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .and_then(|params| params.signed_by(&key, &ca))
            .expect("a certificate");
        let (cert, key) = (cert.pem(), key.serialize_pem());
        TlsIdentity::from_pem(cert.as_bytes(), key.as_bytes(), ca.pem().as_bytes())
            .expect("the certificates made here load")
    };
    Certs {
        source: identity("source.demo"),
        destination: identity("dest.demo"),
    }
});

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
