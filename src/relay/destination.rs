//! The destination end of a link: the link on one side, the destination QEMU on the
//! other.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{Progress, Report, pump};
use crate::dedup::wire::Greeting;
use crate::dedup::{DedupDecoder, Limits};
use crate::error::Result;
use crate::resolve::TemplateStore;

/// Where the destination end restores pages from.
#[derive(Debug, Clone, Default)]
pub struct DestinationConfig {
    /// The template store (local catalog or DHT ring), if any.
    pub templates: Option<Arc<dyn TemplateStore>>,
    /// Caps on what the source's frames can make this end hold.
    pub limits: Limits,
}

/// Runs the destination end of one migration: `link` is the connection from the
/// source end (read half, write half), `qemu` the connection to the destination
/// QEMU.
///
/// Greets the source with the catalog it holds, restores the QEMU stream (fetching
/// templates from the store when they are not local), and passes the destination
/// QEMU's return path back over the link. See the [module docs](super) for what
/// happens on failure.
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
    let ((from_link, mut to_link), (mut from_qemu, to_qemu)) = (link, qemu);
    let catalog = config.templates.as_ref().map(|s| s.catalog_id());
    let greeting = Greeting {
        catalog: catalog.map_or([0; 32], |id| id.0),
    };
    to_link.write_all(&greeting.to_bytes()).await?;
    let (mut decoder, mut fetch) = match &config.templates {
        Some(store) => {
            let (restore, fetch) = store.open();
            let decoder = DedupDecoder::with_template_resolver(restore, store.catalog_id());
            (decoder, fetch)
        }
        None => (DedupDecoder::with_default_resolvers(), None),
    };
    decoder = decoder.with_limits(config.limits.clone());
    let forward = pump::restore(
        from_link,
        to_qemu,
        &mut decoder,
        fetch.as_deref_mut(),
        progress,
    );
    // QEMU closes its side once it has loaded the whole stream, but a QEMU without a
    // return path may close its writing half at any time: only errors count here
    let back = async {
        tokio::io::copy(&mut from_qemu, &mut to_link).await?;
        Ok(())
    };
    tokio::try_join!(forward, back)?;
    to_link.shutdown().await?;
    Ok(Report {
        stats: decoder.stats().clone(),
        templates: decoder.hello().is_some_and(|h| h.catalog != [0; 32]),
    })
}
