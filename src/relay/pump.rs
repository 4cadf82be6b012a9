//! One direction of a link: a QEMU stream to a dedup stream, and back.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::codec::FramedRead;

use super::Progress;
use super::activity::Activity;
use super::pace::Pace;
use crate::dedup::{Decoded, DedupDecoder, DedupEncoder, DedupFrames, EncoderInput, Stats, wire};
use crate::error::{Error, Result};
use crate::qemu::QemuDecoder;
use crate::resolve::Fetch;

/// Bytes of dedup stream handed to the transport at a time.
pub(super) const CHUNK: usize = 256 * 1024;

/// Where a pump tells how it goes.
pub(super) struct Signals<'a> {
    /// The live counters.
    pub(super) progress: &'a Progress,
    /// The idle watchdog, touched at every step.
    pub(super) activity: &'a Activity,
    /// Source: where the page size goes once the HELLO is out (for the migration's
    /// multifd channels).
    pub(super) page_size: Option<&'a watch::Sender<Option<usize>>>,
    /// Destination: the QEMU bytes verified so far, which its return direction
    /// acknowledges ([`Reply::Ack`](crate::dedup::Reply::Ack)).
    pub(super) verified: Option<&'a watch::Sender<u64>>,
}

impl<'a> Signals<'a> {
    pub(super) fn new(progress: &'a Progress, activity: &'a Activity) -> Self {
        Self {
            progress,
            activity,
            page_size: None,
            verified: None,
        }
    }
}

/// A source's credit: it takes no more QEMU bytes in while a window of them is not
/// acknowledged by the destination, a window that follows the pace of the link and
/// of the destination ([`Pace`]).
pub(super) struct Credit {
    pub(super) acked: watch::Receiver<Acked>,
    pub(super) pace: Pace,
}

/// The destination's last acknowledgement.
#[derive(Debug, Clone, Copy)]
pub(super) struct Acked {
    pub(super) qemu_bytes: u64,
    /// When it arrived.
    pub(super) at: Instant,
}

impl Credit {
    /// Whether `taken` QEMU bytes fill the window, after the last acknowledgement.
    fn spent(&mut self, taken: u64) -> bool {
        let acked = *self.acked.borrow_and_update();
        self.pace.acked(acked.qemu_bytes, acked.at);
        // a destination's count is a peer's number: no overflow
        taken > acked.qemu_bytes.saturating_add(self.pace.window())
    }
}

/// What an encoding direction reports at its end.
#[derive(Debug)]
pub(super) struct Encoded {
    pub(super) stats: Stats,
    /// The END frame's digest.
    pub(super) digest: [u8; wire::FRAME_DIGEST],
}

/// Reads a QEMU stream from `qemu` to its end, writes the dedup stream made by
/// `encoder` to `wan`, and shuts `wan`'s writing side down after the END frame.
/// Returns the encoder's final counters.
pub async fn encode_stream<R, W>(
    qemu: R,
    wan: W,
    encoder: DedupEncoder,
    progress: &Progress,
) -> Result<Stats>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let records = FramedRead::new(qemu, QemuDecoder::new());
    let frames = DedupFrames::new(records, encoder, CHUNK);
    let activity = Activity::new();
    let encoded = encode(frames, wan, &Signals::new(progress, &activity), None).await?;
    Ok(encoded.stats)
}

/// Writes the chunks of `frames` to `wan` and shuts it down after the END frame;
/// with `credit`, takes no more QEMU input while a window of it is unacknowledged.
pub(super) async fn encode<S, T, W>(
    mut frames: DedupFrames<S>,
    mut wan: W,
    signals: &Signals<'_>,
    mut credit: Option<Credit>,
) -> Result<Encoded>
where
    S: Stream<Item = Result<T>> + Unpin,
    T: EncoderInput,
    W: AsyncWrite + Unpin,
{
    loop {
        if let Some(credit) = &mut credit {
            while credit.spent(frames.stats().qemu_bytes) {
                // everything taken in goes out before waiting for the destination
                if let Some(chunk) = frames.flush()? {
                    wan.write_all(&chunk).await?;
                }
                wan.flush().await?;
                signals.activity.touch();
                if credit.acked.changed().await.is_err() {
                    // the return direction ended: its verdict decides, not the credit
                    break;
                }
            }
        }
        // the next chunk's QEMU bytes are taken in from now on
        let started = Instant::now();
        let Some(chunk) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut frames).poll_next(cx)).await
        else {
            break;
        };
        wan.write_all(&chunk?).await?;
        if let Some(credit) = &mut credit {
            credit.pace.taken(frames.stats().qemu_bytes, started);
        }
        signals.activity.touch();
        signals.progress.set(frames.stats());
        if let Some(page_size) = signals.page_size {
            // the first chunk starts with the HELLO, written once the size is known
            page_size.send_if_modified(|known| {
                let size = frames.encoder().page_size();
                known.replace(size) != Some(size)
            });
        }
    }
    if let Some(credit) = &credit {
        // what the window was near the switchover, for who measures the downtime
        let pace = &credit.pace;
        tracing::debug!(
            window = pace.window(),
            round_trip = ?pace.round_trip(),
            pace = pace.pace(),
            "credit at the end of the stream"
        );
    }
    wan.shutdown().await?;
    Ok(Encoded {
        stats: frames.stats().clone(),
        digest: frames.digest(),
    })
}

/// Reads a dedup stream from `wan` to its END frame, writes the verified QEMU bytes
/// to `qemu`, and shuts `qemu`'s writing side down at the end. Whenever the decoder
/// waits for pages ([`Decoded::Fetch`]), `fetch` fetches them, while the frames
/// before the one that waits are restored and written out.
pub async fn decode_stream<R, W>(
    wan: R,
    qemu: W,
    decoder: &mut DedupDecoder,
    fetch: Option<&mut (dyn Fetch + '_)>,
    progress: &Progress,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let input = BytesMut::with_capacity(CHUNK);
    let activity = Activity::new();
    decode(
        wan,
        input,
        qemu,
        decoder,
        fetch,
        &Signals::new(progress, &activity),
    )
    .await
}

/// [`decode_stream`] starting with the bytes already read into `input`.
pub(super) async fn decode<R, W>(
    mut wan: R,
    mut input: BytesMut,
    mut qemu: W,
    decoder: &mut DedupDecoder,
    mut fetch: Option<&mut (dyn Fetch + '_)>,
    signals: &Signals<'_>,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut eof = false;
    loop {
        let decoded = match eof {
            false => decoder.decode(&mut input)?,
            true => decoder.decode_eof(&mut input)?,
        };
        report_verified(decoder, signals);
        match decoded {
            Decoded::Qemu(bytes) => write_out(&mut qemu, decoder, bytes, signals).await?,
            Decoded::Fetch => {
                let Some(fetch) = fetch.as_deref_mut() else {
                    return Err(Error::Config {
                        what: "resolvers",
                        reason: "a resolver waits for pages but nothing fetches them".into(),
                    });
                };
                let restore = async {
                    // the fetch's requests go out before the decoder takes the thread
                    tokio::task::yield_now().await;
                    while !decoder.is_waiting() {
                        let decoded = decoder.decode(&mut input)?;
                        report_verified(decoder, signals);
                        let Decoded::Qemu(bytes) = decoded else {
                            break;
                        };
                        write_out(&mut qemu, decoder, bytes, signals).await?;
                    }
                    Ok::<_, Error>(())
                };
                let (fetched, restored) = tokio::join!(fetch.fetch(), restore);
                // an error of the decoder is of a frame before the one fetched for
                restored?;
                fetched?;
                signals.activity.touch();
            }
            // the source waits for the verdict: the link stays open after END
            Decoded::Done => break,
            Decoded::NeedInput => {
                input.reserve(CHUNK);
                eof = wan.read_buf(&mut input).await? == 0;
                signals.activity.touch();
            }
        }
    }
    signals.progress.set(decoder.stats());
    qemu.flush().await?;
    qemu.shutdown().await?;
    Ok(())
}

/// Tells the return direction how many QEMU bytes the decoder verified: written
/// to QEMU next, or held until END.
fn report_verified(decoder: &DedupDecoder, signals: &Signals<'_>) {
    if let Some(verified) = signals.verified {
        let now = decoder.stats().qemu_bytes;
        verified.send_if_modified(|v| std::mem::replace(v, now) != now);
    }
}

/// Writes verified QEMU bytes out, and tells how far the decoder got. (`&mut`: a
/// decoder is `Send` but not `Sync`, and a shared borrow held across the write
/// would make the task's future not `Send`.)
async fn write_out<W: AsyncWrite + Unpin>(
    qemu: &mut W,
    decoder: &mut DedupDecoder,
    bytes: Bytes,
    signals: &Signals<'_>,
) -> Result<()> {
    qemu.write_all(&bytes).await?;
    signals.activity.touch();
    signals.progress.set(decoder.stats());
    Ok(())
}
