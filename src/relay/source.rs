//! The source end of a link: the source QEMU on one side, the link on the other.

use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::codec::FramedRead;

use super::activity::Activity;
use super::pace::{MIN_WINDOW, Pace};
use super::pump::{self, Acked, Credit, Signals};
use super::{Progress, Report, Timeouts};
use crate::dedup::{Compression, DedupEncoder, DedupFrames, Reply, ReplyDecoder, Resolvers};
use crate::error::{Error, Result};
use crate::qemu::QemuDecoder;
use crate::qemu::multifd::MultifdDecoder;
use crate::resolve::MULTIFD_CHANNEL_SHARE;

/// How the source end deduplicates.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SourceConfig {
    /// The resolvers to run. Templates are used only if the destination's greeting
    /// names the same catalog.
    pub resolvers: Resolvers,
    /// How batches are compressed.
    pub compression: Compression,
    /// How long to wait for the greeting, and for progress.
    pub timeouts: Timeouts,
    /// The most QEMU bytes taken in from QEMU that the destination has not
    /// acknowledged yet (plus one frame): beyond its credit window the source reads
    /// no more, so that QEMU sees the pace of the link and of the destination, and its
    /// decision when to stop the VM for the last round (the downtime) rests on that,
    /// not on a proxy next to it swallowing its stream. The window itself follows
    /// the link: about two round trips of the pace the destination acknowledges (at
    /// least 2 MiB; this field is its most, and the window until that pace is
    /// known), so the link stays busy, and at the switchover the proxies hold about
    /// two round trips of the stream, not a fixed amount that takes longer to drain
    /// the slower the link.
    /// Each multifd channel of a migration takes a quarter of it
    /// ([`MULTIFD_CHANNEL_SHARE`]).
    pub credit_window: u64,
    /// Threads compressing the main channel's batches
    /// ([`DedupEncoder::with_threads`]; 1, the default: on the migration's task). A
    /// multifd channel compresses on its own task: QEMU already spreads the pages
    /// over the channels.
    pub threads: usize,
}

/// The default [`SourceConfig::credit_window`]: at most 16 MiB of QEMU bytes, more
/// than a 1 Gbit/s link with 10 ms of round trip carries in two at ratios up to 6.
pub const DEFAULT_CREDIT_WINDOW: u64 = 16 << 20;

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            resolvers: Resolvers::default(),
            compression: Compression::Lz4,
            timeouts: Timeouts::default(),
            credit_window: DEFAULT_CREDIT_WINDOW,
            threads: 1,
        }
    }
}

impl SourceConfig {
    /// With these resolvers.
    pub fn with_resolvers(mut self, resolvers: Resolvers) -> Self {
        self.resolvers = resolvers;
        self
    }

    /// With this compression of batches.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// With these timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// With a credit window of this many QEMU bytes at most (at least 2 MiB: a
    /// destination acknowledges every MiB).
    pub fn with_credit_window(mut self, bytes: u64) -> Self {
        self.credit_window = bytes.max(MIN_WINDOW);
        self
    }

    /// Compressing the main channel's batches on this many threads (at most
    /// [`MAX_THREADS`](crate::dedup::MAX_THREADS)).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, crate::dedup::MAX_THREADS);
        self
    }
}

/// Runs the source end of one migration: `qemu` is the source QEMU's connection
/// (read half, write half), `link` the connection to the destination end.
///
/// Waits for the destination's greeting, deduplicates the QEMU stream onto the
/// link, and passes the return path back to QEMU. Succeeds only once the
/// destination confirmed that the END frame verified and every byte reached its
/// QEMU ([`Reply::Done`]); a FAILED reply, a link that closes or goes silent for
/// the idle timeout before that, is an error. See the [module docs](super).
pub async fn source<QR, QW, LR, LW>(
    qemu: (QR, QW),
    link: (LR, LW),
    config: &SourceConfig,
    progress: &Progress,
) -> Result<Report>
where
    QR: AsyncRead + Unpin,
    QW: AsyncWrite + Unpin,
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
{
    let main = Carried::Main { page_size: None };
    carry(qemu, link, config, progress, new_session(), main).await
}

/// Which of a migration's QEMU connections a source end carries.
#[derive(Debug)]
pub(super) enum Carried<'a> {
    /// The main channel; its page size is sent to `page_size` once known, for the
    /// migration's multifd channels.
    Main {
        page_size: Option<&'a watch::Sender<Option<usize>>>,
    },
    /// A multifd channel of a migration with pages of `page_size`.
    Channel { page_size: usize },
}

/// [`source`] for any of the connections of migration `session`.
pub(super) async fn carry(
    (from_qemu, mut to_qemu): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    (from_link, mut to_link): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
    config: &SourceConfig,
    progress: &Progress,
    session: [u8; 16],
    carried: Carried<'_>,
) -> Result<Report> {
    let activity = Activity::new();
    let mut replies = Replies::new(from_link, &activity);
    let greeting = tokio::time::timeout(config.timeouts.handshake, replies.next("its greeting"))
        .await
        .map_err(|_| Error::Timeout {
            what: "the destination's greeting",
        })??;
    let Reply::Greeting { catalog } = greeting else {
        unreachable!("the reply decoder takes a greeting first");
    };
    let mut resolvers = config.resolvers.clone();
    if resolvers.templates.as_ref().map(|index| index.id()) != catalog {
        resolvers.templates = None;
    }
    let templates = resolvers.templates.is_some();
    tracing::debug!(templates, "greeted by the destination");
    // a migration's channels share about one window: QEMU spreads its pages over them
    let window = match carried {
        Carried::Main { .. } => config.credit_window,
        Carried::Channel { .. } => {
            (config.credit_window / MULTIFD_CHANNEL_SHARE as u64).max(MIN_WINDOW)
        }
    };
    let encoder = DedupEncoder::with_resolvers(&resolvers)?
        .with_compression(config.compression)
        .with_threads(config.threads)
        .with_session(session);
    let (acked, acks) = watch::channel(Acked {
        qemu_bytes: 0,
        at: Instant::now(),
    });
    let credit = Credit {
        acked: acks,
        pace: Pace::new(window),
    };
    let forward = async {
        let mut signals = Signals::new(progress, &activity);
        let encoded = match carried {
            Carried::Main { page_size } => {
                signals.page_size = page_size;
                let records = FramedRead::new(from_qemu, QemuDecoder::new());
                let frames = DedupFrames::new(records, encoder, pump::CHUNK);
                pump::encode(frames, &mut to_link, &signals, Some(credit)).await
            }
            Carried::Channel { page_size } => {
                let channel = MultifdDecoder::new().with_page_size(page_size);
                let records = FramedRead::new(from_qemu, channel);
                let encoder = encoder.with_page_size(page_size);
                let frames = DedupFrames::new(records, encoder, pump::CHUNK);
                pump::encode(frames, &mut to_link, &signals, Some(credit)).await
            }
        };
        if encoded.is_err() {
            // the destination sees the stream end short, and says so
            let _ = to_link.shutdown().await;
        }
        encoded
    };
    let back = async {
        // the acknowledgements end with this direction: a forward direction waiting
        // for credit when the verdict came (the destination's last ACK can come after
        // its DONE, or not at all) stops waiting, and ends
        let acked = acked;
        loop {
            match replies.next("confirming the migration").await? {
                Reply::Qemu(bytes) => {
                    to_qemu.write_all(&bytes).await?;
                    activity.touch();
                }
                Reply::Ack { qemu_bytes } => {
                    acked.send_if_modified(|last| {
                        let more = qemu_bytes > last.qemu_bytes;
                        if more {
                            let at = Instant::now();
                            *last = Acked { qemu_bytes, at };
                        }
                        more
                    });
                    activity.touch();
                }
                Reply::Done { qemu_bytes, digest } => return Ok((qemu_bytes, digest)),
                Reply::Failed { reason } => return Err(Error::Remote { reason }),
                Reply::Greeting { .. } => unreachable!("the reply decoder takes one greeting"),
            }
        }
    };
    let (encoded, confirmed) = tokio::select! {
        ends = both_ends(forward, back) => ends?,
        stalled = activity.stalled(config.timeouts.idle) => {
            tracing::warn!(idle = ?config.timeouts.idle, "no progress on the link: giving up");
            return Err(stalled);
        }
    };
    if confirmed != (encoded.stats.qemu_bytes, encoded.digest) {
        return Err(Error::Remote {
            reason: "confirmed another stream than the one sent".into(),
        });
    }
    // the rest of QEMU's return path, until the destination closes the link
    let drain = async {
        while let Some(reply) = replies.try_next().await? {
            if let Reply::Qemu(bytes) = reply {
                to_qemu.write_all(&bytes).await?;
                activity.touch();
            }
        }
        to_qemu.shutdown().await?;
        Ok::<_, Error>(())
    };
    tokio::select! {
        drained = drain => if let Err(e) = drained {
            tracing::debug!(error = %e, "return path after the confirmation");
        },
        _ = activity.stalled(config.timeouts.idle) => {
            tracing::debug!("return path idle after the confirmation");
        }
    }
    Ok(Report::new(encoded.stats, templates))
}

/// A migration's random name: 128 bits from the process's random hasher keys and a
/// counter, so two migrations through one destination never share one.
pub(super) fn new_session() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let keys = ahash::RandomState::new();
    let mut session = [0; 16];
    session[..8].copy_from_slice(&keys.hash_one((n, 0u8)).to_le_bytes());
    session[8..].copy_from_slice(&keys.hash_one((n, 1u8)).to_le_bytes());
    session
}

/// Runs the forward direction and waits for the destination's verdict. A verdict
/// that is an error ends both at once. If the forward direction fails first, the
/// verdict is still awaited: when the link broke because the destination gave up,
/// its reason (a FAILED reply) says more than the broken pipe.
async fn both_ends<T, V>(
    forward: impl Future<Output = Result<T>>,
    back: impl Future<Output = Result<V>>,
) -> Result<(T, V)> {
    let (mut forward, mut back) = (std::pin::pin!(forward), std::pin::pin!(back));
    tokio::select! {
        verdict = &mut back => {
            let verdict = verdict?;
            Ok((forward.await?, verdict))
        }
        sent = &mut forward => match sent {
            Ok(sent) => Ok((sent, back.await?)),
            Err(e) => Err(match (e, back.await) {
                (Error::Io(_), Err(remote @ Error::Remote { .. })) => remote,
                (e, _) => e,
            }),
        },
    }
}

/// The destination's replies, read off the link's return direction.
struct Replies<'a, R> {
    link: R,
    buf: BytesMut,
    decoder: ReplyDecoder,
    activity: &'a Activity,
}

impl<'a, R: AsyncRead + Unpin> Replies<'a, R> {
    fn new(link: R, activity: &'a Activity) -> Self {
        Self {
            link,
            buf: BytesMut::new(),
            decoder: ReplyDecoder::new(),
            activity,
        }
    }

    /// The next reply; the end of the link before it is an error: the destination
    /// closed the link before `what`.
    async fn next(&mut self, what: &'static str) -> Result<Reply> {
        self.try_next().await?.ok_or(Error::PeerClosed { what })
    }

    /// The next reply, `None` at a clean end of the link.
    async fn try_next(&mut self) -> Result<Option<Reply>> {
        loop {
            if let Some(reply) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(reply));
            }
            self.buf.reserve(16 << 10);
            if self.link.read_buf(&mut self.buf).await? == 0 {
                return self.decoder.decode_eof(&mut self.buf);
            }
            self.activity.touch();
        }
    }
}
