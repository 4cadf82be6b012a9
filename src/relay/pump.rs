//! One direction of a link: QEMU stream to dedup stream, and back.

use bytes::BytesMut;
use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;

use super::Progress;
use crate::dedup::{DedupDecoder, DedupEncoder, DedupFrames, Stats};
use crate::error::{Error, Result};
use crate::qemu::QemuDecoder;
use crate::resolve::Fetch;

/// Bytes of dedup stream handed to the transport at a time.
const CHUNK: usize = 256 * 1024;

/// Reads a QEMU stream from `qemu` to its end, writes the dedup stream made by
/// `encoder` to `wan`, and shuts `wan`'s writing side down after the END frame.
/// Returns the encoder's final counters.
pub async fn dedup<R, W>(
    qemu: R,
    mut wan: W,
    encoder: DedupEncoder,
    progress: &Progress,
) -> Result<Stats>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let records = FramedRead::new(qemu, QemuDecoder::new());
    let mut frames = DedupFrames::new(records, encoder, CHUNK);
    while let Some(chunk) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut frames).poll_next(cx)).await
    {
        wan.write_all(&chunk?).await?;
        progress.set(frames.stats());
    }
    wan.shutdown().await?;
    Ok(frames.stats().clone())
}

/// Reads a dedup stream from `wan` to its END frame, writes the verified QEMU bytes
/// to `qemu`, and shuts `qemu`'s writing side down at the end. Whenever the decoder
/// waits for pages (see [`DedupDecoder::waiting`]), `fetch` fetches them.
pub async fn restore<R, W>(
    mut wan: R,
    mut qemu: W,
    decoder: &mut DedupDecoder,
    mut fetch: Option<&mut (dyn Fetch + '_)>,
    progress: &Progress,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(CHUNK);
    let mut eof = false;
    loop {
        let decoded = match eof {
            false => decoder.decode(&mut input)?,
            true => decoder.decode_eof(&mut input)?,
        };
        if let Some(bytes) = decoded {
            qemu.write_all(&bytes).await?;
            progress.set(decoder.stats());
        } else if decoder.waiting() {
            let Some(fetch) = fetch.as_deref_mut() else {
                return Err(Error::Io(std::io::Error::other(
                    "a resolver waits for pages but nothing fetches them",
                )));
            };
            fetch.fetch().await?;
        } else if eof {
            break;
        } else {
            input.reserve(CHUNK);
            eof = wan.read_buf(&mut input).await? == 0;
        }
    }
    progress.set(decoder.stats());
    qemu.shutdown().await?;
    Ok(())
}
