//! The destination end of a link: the link on one side, the destination QEMU on the
//! other. It runs in two steps, so that QEMU is touched only once the peer proved to
//! be a migstream source: [`accept`] greets the source and reads its HELLO,
//! [`Handshake::restore`] then feeds the destination QEMU.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};

use super::activity::Activity;
use super::pump::{self, Signals};
use super::{Progress, Report, Timeouts};
use crate::dedup::{ACK_EVERY, DedupDecoder, Limits, MAX_RETURN_CHUNK, Reply, default_restores};
use crate::dedup::{FRAME_DIGEST, Hello};
use crate::error::{Error, Result};
use crate::resolve::{Fetch, Restore, TemplateStore};

/// Makes a fresh custom destination-side resolver for each stream.
type RestoreFactory = Arc<dyn Fn() -> Box<dyn Restore> + Send + Sync>;

/// Where the destination end restores pages from, and what it lets a source do.
#[derive(Clone)]
#[non_exhaustive]
pub struct DestinationConfig {
    /// The template store (local catalog or DHT ring), if any.
    pub templates: Option<Arc<dyn TemplateStore>>,
    /// Caps on what the source's frames can make this end hold.
    pub limits: Limits,
    /// How long to wait for the HELLO, and for progress.
    pub timeouts: Timeouts,
    /// Threads decompressing the main channel's batches
    /// ([`DedupDecoder::with_threads`]; 1, the default: on the migration's task).
    /// A multifd channel decompresses on its own task.
    pub threads: usize,
    /// Custom resolvers, besides the built-in ones.
    custom: Vec<RestoreFactory>,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        Self {
            templates: None,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            threads: 1,
            custom: Vec::new(),
        }
    }
}

impl std::fmt::Debug for DestinationConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationConfig")
            .field("templates", &self.templates)
            .field("limits", &self.limits)
            .field("timeouts", &self.timeouts)
            .field("threads", &self.threads)
            .field("custom", &self.custom.len())
            .finish()
    }
}

impl DestinationConfig {
    /// Restoring templates from `store`.
    pub fn with_templates(mut self, store: Arc<dyn TemplateStore>) -> Self {
        self.templates = Some(store);
        self
    }

    /// With these limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// With these timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Decompressing the main channel's batches on this many threads (at most
    /// [`MAX_THREADS`](crate::dedup::MAX_THREADS)).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, crate::dedup::MAX_THREADS);
        self
    }

    /// With the restoring half of a custom resolver, made by `make` for every
    /// stream: the counterpart of the source's
    /// [`Resolvers::with_custom`](crate::dedup::Resolvers::with_custom).
    pub fn with_restore(
        mut self,
        make: impl Fn() -> Box<dyn Restore> + Send + Sync + 'static,
    ) -> Self {
        self.custom.push(Arc::new(make));
        self
    }

    /// A decoder for one stream, and the fetcher of its template store, if any.
    fn decoder(&self) -> Result<(DedupDecoder, Option<Box<dyn Fetch>>)> {
        let (templates, fetch, catalog) = match &self.templates {
            Some(store) => {
                let (restore, fetch) = store.open();
                (Some(restore), fetch, Some(store.catalog_id()))
            }
            None => (None, None, None),
        };
        let mut restores = default_restores(templates);
        restores.extend(self.custom.iter().map(|make| make()));
        let mut decoder = DedupDecoder::new(restores)?
            .with_limits(self.limits.clone())
            .with_threads(self.threads);
        if let Some(id) = catalog {
            decoder = decoder.with_catalog_id(id);
        }
        Ok((decoder, fetch))
    }
}

/// A link whose source sent a valid HELLO: the moment to connect to the destination
/// QEMU. Dropping it closes the link.
pub struct Handshake<LR, LW> {
    from_link: LR,
    to_link: LW,
    /// What was read past the HELLO.
    input: BytesMut,
    decoder: DedupDecoder,
    fetch: Option<Box<dyn Fetch>>,
    hello: Hello,
    timeouts: Timeouts,
    activity: Activity,
}

impl<LR, LW> std::fmt::Debug for Handshake<LR, LW> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

/// Greets the source end on `link` with the catalog `config` holds and reads its
/// HELLO, within the handshake timeout. Nothing else is done: the caller connects
/// to the destination QEMU only if this succeeds, so a port scan, a stream of
/// another protocol or a stalled peer never reaches QEMU.
pub async fn accept<LR, LW>(link: (LR, LW), config: &DestinationConfig) -> Result<Handshake<LR, LW>>
where
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
{
    let (mut from_link, mut to_link) = link;
    let mut greeting = BytesMut::new();
    Reply::Greeting {
        catalog: config.templates.as_ref().map(|s| s.catalog_id()),
    }
    .encode(&mut greeting);
    let (mut decoder, fetch) = config.decoder()?;
    let mut input = BytesMut::with_capacity(pump::CHUNK);
    let handshake = async {
        to_link.write_all(&greeting).await?;
        to_link.flush().await?;
        loop {
            if let Some(hello) = decoder.decode_hello(&mut input)? {
                return Ok(hello);
            }
            if from_link.read_buf(&mut input).await? == 0 {
                return Err(Error::PeerClosed { what: "its HELLO" });
            }
        }
    };
    let hello = match tokio::time::timeout(config.timeouts.handshake, handshake).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            // a peer that sent something else than a HELLO learns why, if it listens
            let mut failed = BytesMut::new();
            Reply::Failed {
                reason: e.to_string(),
            }
            .encode(&mut failed);
            let _ = to_link.write_all(&failed).await;
            let _ = to_link.shutdown().await;
            return Err(e);
        }
        Err(_) => {
            return Err(Error::Timeout {
                what: "the source's HELLO",
            });
        }
    };
    Ok(Handshake {
        from_link,
        to_link,
        input,
        decoder,
        fetch,
        hello,
        timeouts: config.timeouts.clone(),
        activity: Activity::new(),
    })
}

impl<LR, LW> Handshake<LR, LW>
where
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
{
    /// The source's HELLO.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Tells the source its migration cannot be served (e.g. [`Error::Busy`]) and
    /// closes the link.
    pub async fn refuse(mut self, error: &Error) -> Result<()> {
        let mut failed = BytesMut::new();
        Reply::Failed {
            reason: error.to_string(),
        }
        .encode(&mut failed);
        self.to_link.write_all(&failed).await?;
        self.to_link.shutdown().await?;
        Ok(())
    }

    /// Restores the QEMU stream onto `qemu` (read half, write half), fetching
    /// templates from the store when they are not local, and passes the destination
    /// QEMU's return path back over the link. Once the END frame verified and every
    /// byte was written to QEMU it confirms the migration to the source
    /// ([`Reply::Done`]); on failure it tells the source why ([`Reply::Failed`]).
    pub async fn restore<QR, QW>(self, qemu: (QR, QW), progress: &Progress) -> Result<Report>
    where
        QR: AsyncRead + Unpin,
        QW: AsyncWrite + Unpin,
    {
        let Handshake {
            from_link,
            to_link,
            input,
            mut decoder,
            mut fetch,
            hello,
            timeouts,
            activity,
        } = self;
        let (from_qemu, to_qemu) = qemu;
        let (verdict, verdict_rx) = oneshot::channel();
        let (verified, verified_rx) = watch::channel(0);
        let forward = async {
            let mut signals = Signals::new(progress, &activity);
            signals.verified = Some(&verified);
            let fetch = fetch.as_deref_mut();
            let restored =
                pump::decode(from_link, input, to_qemu, &mut decoder, fetch, &signals).await;
            let _ = verdict.send(match &restored {
                Ok(()) => Ok((decoder.stats().qemu_bytes, decoder.digest())),
                Err(e) => Err(e.to_string()),
            });
            restored
        };
        let confirmed = AtomicBool::new(false);
        let verdicts = (verified_rx, verdict_rx);
        let back = pass_return_path(from_qemu, to_link, verdicts, &activity, &confirmed);
        let ends = async { tokio::join!(forward, back) };
        let ended = tokio::select! {
            ends = ends => Some(ends),
            _ = activity.stalled(timeouts.idle) => None,
        };
        match ended {
            Some((restored, returned)) => {
                restored?;
                returned?;
            }
            // after DONE only QEMU's return path is left: the migration is done
            None if confirmed.load(Ordering::Relaxed) => {
                tracing::debug!("return path idle after the confirmation");
            }
            None => {
                tracing::warn!(idle = ?timeouts.idle, "no progress on the link: giving up");
                return Err(Error::Timeout {
                    what: "progress on the link (idle timeout)",
                });
            }
        }
        Ok(Report::new(
            decoder.stats().clone(),
            hello.catalog.is_some(),
        ))
    }
}

/// The forward direction's word to the return direction: QEMU bytes verified so
/// far, then the verdict (END's total and digest, or the error).
type Verdicts = (
    watch::Receiver<u64>,
    oneshot::Receiver<std::result::Result<(u64, [u8; FRAME_DIGEST]), String>>,
);

/// Passes the destination QEMU's return path to the link, and acknowledges the QEMU
/// bytes verified every [`ACK_EVERY`] of them, until the forward direction's
/// verdict; sends the verdict (noting in `confirmed` that DONE went out), then
/// (after DONE) the rest of the return path until QEMU closes it. QEMU may close or
/// reset its side at any time (a QEMU without a return path does): the forward
/// direction's outcome decides the migration, not that.
async fn pass_return_path<QR, LW>(
    mut from_qemu: QR,
    mut to_link: LW,
    (mut verified, mut verdict): Verdicts,
    activity: &Activity,
    confirmed: &AtomicBool,
) -> Result<()>
where
    QR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
{
    let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
    let (mut qemu_open, mut verifying, mut acked) = (true, true, 0);
    let outcome = loop {
        buf.reserve(MAX_RETURN_CHUNK);
        tokio::select! {
            outcome = &mut verdict => break outcome,
            changed = verified.changed(), if verifying => {
                verifying = changed.is_ok();
                let qemu_bytes = *verified.borrow_and_update();
                if qemu_bytes >= acked + ACK_EVERY {
                    Reply::Ack { qemu_bytes }.encode(&mut out);
                    to_link.write_all(&out).await?;
                    to_link.flush().await?;
                    out.clear();
                    acked = qemu_bytes;
                }
            }
            read = from_qemu.read_buf(&mut buf), if qemu_open => {
                qemu_open = matches!(read, Ok(n) if n > 0);
                Reply::Qemu(buf.split().freeze()).encode(&mut out);
                to_link.write_all(&out).await?;
                out.clear();
                activity.touch();
            }
        }
    };
    let verdict = match outcome {
        Ok(Ok((qemu_bytes, digest))) => Reply::Done { qemu_bytes, digest },
        Ok(Err(reason)) => Reply::Failed { reason },
        Err(_) => Reply::Failed {
            reason: "the destination end stopped".into(),
        },
    };
    let done = matches!(verdict, Reply::Done { .. });
    verdict.encode(&mut out);
    to_link.write_all(&out).await?;
    to_link.flush().await?;
    confirmed.store(done, Ordering::Relaxed);
    activity.touch();
    while done && qemu_open {
        out.clear();
        buf.reserve(MAX_RETURN_CHUNK);
        qemu_open = matches!(from_qemu.read_buf(&mut buf).await, Ok(n) if n > 0);
        Reply::Qemu(buf.split().freeze()).encode(&mut out);
        to_link.write_all(&out).await?;
        activity.touch();
    }
    to_link.shutdown().await?;
    Ok(())
}

/// Runs the destination end of one migration whose QEMU connection is already open:
/// [`accept`] then [`Handshake::restore`]. A proxy facing the network should call
/// the two itself and connect to QEMU in between (as
/// [`DestinationProxy`](super::DestinationProxy) does).
pub async fn destination<LR, LW, QR, QW>(
    link: (LR, LW),
    qemu: (QR, QW),
    config: &DestinationConfig,
    progress: &Progress,
) -> Result<Report>
where
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
    QR: AsyncRead + Unpin,
    QW: AsyncWrite + Unpin,
{
    accept(link, config).await?.restore(qemu, progress).await
}
