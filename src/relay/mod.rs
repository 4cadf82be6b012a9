//! Async adapters: the two ends of a dedup link over any transport, and the proxies
//! that run them over mutually authenticated TLS.
//!
//! ```text
//! QEMU ──▶ [source] ══ dedup stream ══════════════════▶ [destination] ──▶ QEMU
//!      ◀──          ◀═ greeting, QEMU's return path, ═           ◀──
//!                      DONE or FAILED
//! ```
//!
//! [`source`] reads the source QEMU's stream, deduplicates it and writes the dedup
//! stream to the link; [`destination`] restores the exact QEMU bytes and writes them to
//! the destination QEMU. The destination speaks first on the way back: a
//! [`Reply::Greeting`](crate::dedup::Reply::Greeting) naming the template catalog it
//! holds, so the source refers to templates only when both ends hold the same
//! catalog (a mismatch costs ratio, never the migration). Then QEMU's return path is
//! passed through, and at the end the destination's verdict: DONE once the END frame
//! verified and every byte reached its QEMU, or FAILED with its reason. The source
//! reports success only on DONE.
//!
//! Both ends return an error, and drop (close) every transport they were given, on
//! any failure, including no progress either way for [`Timeouts::idle`]: the source
//! QEMU sees its migration connection fail while its VM keeps running, and the
//! destination QEMU never receives the end of a stream that was not verified whole.
//! Memory per link is bounded by the codecs' limits.
//!
//! The halves of each transport are passed separately (e.g. from
//! `TcpStream::into_split` or `tokio::io::split`), so any `AsyncRead`/`AsyncWrite`
//! pair works. A proxy facing a network uses [`SourceProxy`] and
//! [`DestinationProxy`]: mutual TLS ([`tls`]), QEMU connected only after the peer
//! authenticated and sent a valid HELLO, and every resource a peer can hold capped
//! ([`ProxyLimits`]).
//!
//! A migration's futures nest deeply (proxy, group, link, pump, codec): in a debug
//! build polling them takes close to the 2 MiB of stack tokio gives its worker
//! threads by default, so a program built without optimisation should give them
//! more (`tokio::runtime::Builder::thread_stack_size`; the `proxy` example uses
//! 8 MiB). Release builds need a fraction of it.
//!
//! The proxies also carry multifd migrations: every QEMU connection of one (the
//! main channel, then `multifd-channels` more) is served by its own call, on its own
//! task, with a link connection of its own; the proxies group them by migration
//! (the HELLO's session), connect the destination QEMU's main channel first, fail
//! them together, and report the migration from its main channel's call
//! ([`Served::Migration`], with [`Report::channels`]); a channel's call returns
//! [`Served::Channel`].
//!
//! ```
//! use migstream::relay::{self, DestinationConfig, Progress, SourceConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), migstream::Error> {
//! # let qemu_stream: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/qemu-7.2-pc-paused.mig"));
//! // the link between the proxies, and the destination QEMU, as in-memory pipes
//! let (link_src, link_dst) = tokio::io::duplex(1 << 20);
//! let (src_read, src_write) = tokio::io::split(link_src);
//! let (dst_read, dst_write) = tokio::io::split(link_dst);
//! let mut delivered = Vec::new();
//! let (from_source_qemu, to_source_qemu) = (qemu_stream, tokio::io::sink());
//! let (from_dest_qemu, to_dest_qemu) = (tokio::io::empty(), &mut delivered);
//! let (src_config, dst_config) = (SourceConfig::default(), DestinationConfig::default());
//! let (src_progress, dst_progress) = (Progress::default(), Progress::default());
//!
//! let (sent, received) = tokio::try_join!(
//!     relay::source(
//!         (from_source_qemu, to_source_qemu),
//!         (src_read, src_write),
//!         &src_config,
//!         &src_progress,
//!     ),
//!     relay::destination(
//!         (dst_read, dst_write),
//!         (from_dest_qemu, to_dest_qemu),
//!         &dst_config,
//!         &dst_progress,
//!     ),
//! )?;
//! assert_eq!(delivered, qemu_stream);
//! assert_eq!(sent.stats.wire_bytes, received.stats.wire_bytes);
//! # Ok(())
//! # }
//! ```

mod activity;
mod destination;
mod group;
pub mod net;
mod pace;
mod proxy;
mod pump;
mod source;
pub mod tls;

pub use destination::{DestinationConfig, Handshake, accept, destination};
pub use proxy::{DEFAULT_TEMPLATE_COOLDOWN, DestinationProxy, Incoming, ProxyLimits, SourceProxy};
pub use pump::{decode_stream, encode_stream};
pub use source::{DEFAULT_CREDIT_WINDOW, SourceConfig, source};

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dedup::Stats;

/// How long an end of a link waits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// For the TLS handshake and the peer's first message (the destination's
    /// greeting, the source's HELLO): a peer that connects and says nothing is let go.
    pub handshake: Duration,
    /// For any progress, either way, on either side of an end (bytes from or to the
    /// link or QEMU, a page fetched): a peer that stalls, or a link black-holed, ends
    /// the migration. Also the link's TCP user timeout.
    pub idle: Duration,
    /// For a TCP or Unix connection to be set up (the link, QEMU).
    pub connect: Duration,
}

impl Default for Timeouts {
    /// 10 s for the handshake and for connecting, 60 s without progress: QEMU sends
    /// continuously during a migration, and the destination answers within a
    /// round trip of the END frame.
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            connect: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    /// With this handshake timeout.
    pub fn with_handshake(mut self, timeout: Duration) -> Self {
        self.handshake = timeout;
        self
    }

    /// With this idle timeout.
    pub fn with_idle(mut self, timeout: Duration) -> Self {
        self.idle = timeout;
        self
    }

    /// With this connect timeout.
    pub fn with_connect(mut self, timeout: Duration) -> Self {
        self.connect = timeout;
        self
    }
}

/// What one end of a link reports once its migration is over.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// The codec's counters: QEMU bytes, dedup stream bytes, pages by kind; for a
    /// multifd migration, summed over the main channel and every multifd channel.
    pub stats: Stats,
    /// Whether template references were in use (both ends held the same catalog).
    pub templates: bool,
    /// A multifd migration's channels by id, with their own counters (included in
    /// `stats`); empty without multifd.
    pub channels: Vec<(u8, Stats)>,
}

impl Report {
    fn new(stats: Stats, templates: bool) -> Self {
        Self {
            stats,
            templates,
            channels: Vec::new(),
        }
    }
}

/// What a proxy did with one QEMU connection or link.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Served {
    /// A migration's main channel, which ended with the migration: its report
    /// covers the multifd channels that joined it.
    Migration(Box<Report>),
    /// A multifd channel, which joined the migration of a main channel: it is in
    /// that migration's report.
    Channel(u8),
}

impl Served {
    /// The migration's report; `None` for a multifd channel (its counters are in its
    /// migration's).
    pub fn report(self) -> Option<Report> {
        match self {
            Self::Migration(report) => Some(*report),
            Self::Channel(_) => None,
        }
    }
}

/// The live counters of a migration's multifd channels, shared by them and by the
/// main channel's [`Progress`].
type ChannelProgress = Arc<Mutex<Vec<Arc<Progress>>>>;

/// Counters of a link in progress, for a live progress line; shared with the task
/// running the link. A multifd migration's main channel counts its channels too.
#[derive(Debug, Default)]
pub struct Progress {
    stats: Mutex<Option<Stats>>,
    /// The channels of the migration, when this is its main channel's.
    channels: Mutex<Option<ChannelProgress>>,
    /// The multifd channel this is, once known (ids 0-255 as 1-256; 0: not one).
    channel: AtomicU16,
}

impl Progress {
    /// The counters so far (with the multifd channels', for a main channel).
    pub fn snapshot(&self) -> Stats {
        let mut stats = lock(&self.stats).clone().unwrap_or_default();
        if let Some(channels) = &*lock(&self.channels) {
            for channel in lock(channels).iter() {
                stats.add(&channel.snapshot());
            }
        }
        stats
    }

    /// The multifd channel this connection turned out to be: its counters are in
    /// its main channel's.
    pub fn channel(&self) -> Option<u8> {
        match self.channel.load(Ordering::Relaxed) {
            0 => None,
            n => u8::try_from(n - 1).ok(),
        }
    }

    fn set(&self, stats: &Stats) {
        match &mut *lock(&self.stats) {
            Some(s) => s.clone_from(stats),
            slot => *slot = Some(stats.clone()),
        }
    }

    fn follow(&self, channels: ChannelProgress) {
        *lock(&self.channels) = Some(channels);
    }

    fn set_channel(&self, channel: u8) {
        self.channel
            .store(u16::from(channel) + 1, Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // counters stay meaningful even if a reader panicked
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
