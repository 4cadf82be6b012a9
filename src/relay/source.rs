//! The source end of a link: the source QEMU on one side, the link on the other.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Progress, Report, pump};
use crate::dedup::wire::{GREETING_LEN, Greeting};
use crate::dedup::{Compression, DedupEncoder, Resolvers};
use crate::error::{Error, Result};

/// How the source end deduplicates.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The resolvers to run. Templates are used only if the destination's greeting
    /// names the same catalog.
    pub resolvers: Resolvers,
    /// How batches are compressed.
    pub compression: Compression,
    /// How long to wait for the destination's greeting.
    pub greeting_timeout: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            resolvers: Resolvers::default(),
            compression: Compression::Lz4,
            greeting_timeout: Duration::from_secs(30),
        }
    }
}

/// Runs the source end of one migration: `qemu` is the source QEMU's connection
/// (read half, write half), `link` the connection to the destination end.
///
/// Waits for the destination's greeting, deduplicates the QEMU stream onto the
/// link, and passes the return path back to QEMU until the destination closes it.
/// See the [module docs](super) for what happens on failure.
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
    let ((from_qemu, mut to_qemu), (mut from_link, to_link)) = (qemu, link);
    let mut greeting = [0; GREETING_LEN];
    tokio::time::timeout(config.greeting_timeout, from_link.read_exact(&mut greeting))
        .await
        .map_err(|_| timed_out("the destination's greeting"))??;
    let greeting = Greeting::parse(&greeting)?;
    let mut resolvers = config.resolvers.clone();
    if let Some(index) = &resolvers.templates {
        if index.id().0 != greeting.catalog {
            resolvers.templates = None;
        }
    }
    let templates = resolvers.templates.is_some();
    let encoder = DedupEncoder::with_resolvers(&resolvers).with_compression(config.compression);
    let forward = pump::dedup(from_qemu, to_link, encoder, progress);
    let back = async {
        let n = tokio::io::copy(&mut from_link, &mut to_qemu).await?;
        to_qemu.shutdown().await?;
        Ok(n)
    };
    let stats = both_ways(forward, back).await?;
    Ok(Report { stats, templates })
}

/// Runs the forward direction to its end while passing the return path, which
/// must not end first: the destination end closes it only after the whole stream
/// arrived, so an early end means it is gone. Once the forward direction is done,
/// the return path runs until the destination closes it; its errors no longer
/// matter to a migration whose bytes all went out.
async fn both_ways<T>(
    forward: impl Future<Output = Result<T>>,
    back: impl Future<Output = std::io::Result<u64>>,
) -> Result<T> {
    let (mut forward, mut back) = (std::pin::pin!(forward), std::pin::pin!(back));
    tokio::select! {
        done = &mut forward => {
            let done = done?;
            let _ = back.await;
            Ok(done)
        }
        ended = &mut back => {
            ended?;
            Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the far side closed the connection before the migration ended",
            )))
        }
    }
}

fn timed_out(what: &str) -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("timed out waiting for {what}"),
    ))
}
