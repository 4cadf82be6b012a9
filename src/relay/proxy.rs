//! The two proxies between unmodified QEMUs, as a library: what `examples/proxy.rs`
//! runs. Each serves one connection at a time per call and holds what the
//! connections share: the TLS settings, the caps on what a peer can make it hold,
//! and (at the destination) whether templates are trusted right now.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::net::{self, Conn, Endpoint};
use super::tls::{TlsClient, TlsServer};
use super::{DestinationConfig, Handshake, Progress, Report, SourceConfig, accept, source};
use crate::error::{Error, Result};

/// What the connections to one proxy can make it hold at once.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyLimits {
    /// Migrations in progress at once; one more is refused ([`Error::Busy`]). A
    /// destination QEMU started with `-incoming` takes a single migration.
    pub max_migrations: usize,
    /// Connections not yet authenticated at once (TLS handshake, HELLO); more are
    /// closed at once, so a flood of connections cannot starve real migrations of
    /// file descriptors or memory. Each is also bounded by the handshake timeout.
    pub max_handshakes: usize,
}

impl Default for ProxyLimits {
    /// One migration, 16 handshakes.
    fn default() -> Self {
        Self {
            max_migrations: 1,
            max_handshakes: 16,
        }
    }
}

impl ProxyLimits {
    /// With at most `n` migrations at once (at least 1).
    pub fn with_max_migrations(mut self, n: usize) -> Self {
        self.max_migrations = n.max(1);
        self
    }

    /// With at most `n` connections in their handshake at once (at least 1).
    pub fn with_max_handshakes(mut self, n: usize) -> Self {
        self.max_handshakes = n.max(1);
        self
    }
}

/// A slot out of `limit` slots for `what`, or [`Error::Busy`].
fn slot(slots: &Arc<Semaphore>, what: &'static str, limit: usize) -> Result<OwnedSemaphorePermit> {
    slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::Busy { what, limit })
}

/// The source proxy: takes the source QEMU's connection and carries its migration
/// over a link it opens to the destination proxy.
#[derive(Debug)]
pub struct SourceProxy {
    config: SourceConfig,
    link: String,
    tls: Option<TlsClient>,
    limits: ProxyLimits,
    migrations: Arc<Semaphore>,
}

impl SourceProxy {
    /// A proxy that links to the destination proxy at `link` (`HOST:PORT`) over `tls`
    /// (`None`: plain TCP, for a link already inside a VPN or tunnel).
    pub fn new(config: SourceConfig, link: impl Into<String>, tls: Option<TlsClient>) -> Self {
        let limits = ProxyLimits::default();
        Self {
            migrations: Arc::new(Semaphore::new(limits.max_migrations)),
            config,
            link: link.into(),
            tls,
            limits,
        }
    }

    /// With these caps.
    pub fn with_limits(mut self, limits: ProxyLimits) -> Self {
        self.migrations = Arc::new(Semaphore::new(limits.max_migrations));
        self.limits = limits;
        self
    }

    /// Carries the migration the source QEMU sends on `qemu`.
    pub async fn serve(&self, qemu: Conn, progress: &Progress) -> Result<Report> {
        let _slot = slot(&self.migrations, "migrations", self.limits.max_migrations)?;
        net::tune_source_qemu(&qemu)?;
        let timeouts = &self.config.timeouts;
        let link = Endpoint::Tcp(self.link.clone())
            .connect(timeouts.connect)
            .await?;
        if let Some(tcp) = link.as_tcp() {
            net::tune_link(tcp, timeouts.idle, true)?;
        }
        let qemu = tokio::io::split(qemu);
        match &self.tls {
            Some(tls) => {
                let link = tokio::time::timeout(timeouts.handshake, tls.connect(link))
                    .await
                    .map_err(|_| Error::Timeout {
                        what: "the TLS handshake",
                    })??;
                source(qemu, tokio::io::split(link), &self.config, progress).await
            }
            None => source(qemu, tokio::io::split(link), &self.config, progress).await,
        }
    }
}

/// The destination proxy: takes a link from a source proxy, authenticates it, and
/// only then connects to the destination QEMU.
#[derive(Debug)]
pub struct DestinationProxy {
    config: DestinationConfig,
    qemu: Endpoint,
    tls: Option<TlsServer>,
    limits: ProxyLimits,
    migrations: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    template_cooldown: Duration,
    /// Until when the template store is not offered, after it failed a migration.
    templates_off_until: Mutex<Option<Instant>>,
}

/// How long a destination offers no catalog after its template store failed to
/// restore a page.
pub const DEFAULT_TEMPLATE_COOLDOWN: Duration = Duration::from_secs(600);

impl DestinationProxy {
    /// A proxy that restores migrations into the destination QEMU at `qemu`, taking
    /// links over `tls` (`None`: plain TCP, for a link already inside a VPN or
    /// tunnel).
    pub fn new(config: DestinationConfig, qemu: Endpoint, tls: Option<TlsServer>) -> Self {
        let limits = ProxyLimits::default();
        Self {
            migrations: Arc::new(Semaphore::new(limits.max_migrations)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            config,
            qemu,
            tls,
            limits,
            template_cooldown: DEFAULT_TEMPLATE_COOLDOWN,
            templates_off_until: Mutex::new(None),
        }
    }

    /// With these caps.
    pub fn with_limits(mut self, limits: ProxyLimits) -> Self {
        self.migrations = Arc::new(Semaphore::new(limits.max_migrations));
        self.handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
        self.limits = limits;
        self
    }

    /// After the template store failed to restore a page, offer no catalog for this
    /// long ([`DEFAULT_TEMPLATE_COOLDOWN`]), so that QEMU's retry goes through
    /// without templates instead of failing the same way.
    pub fn with_template_cooldown(mut self, cooldown: Duration) -> Self {
        self.template_cooldown = cooldown;
        self
    }

    /// Whether the template store is offered to sources now.
    pub fn templates_offered(&self) -> bool {
        self.config.templates.is_some()
            && self
                .templates_off_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_none_or(|until| Instant::now() >= until)
    }

    /// Takes one connection from the link's port up to the point where it is known
    /// to be a migration: the TLS handshake (a certificate of the CA, with an
    /// allowed name) and the source's HELLO, within the handshake timeout, and a
    /// free migration slot (else the source is told [`Error::Busy`]). Nothing here
    /// touches the destination QEMU: a connection that fails this step, a port scan
    /// or a peer of another protocol, costs a handshake slot for a moment.
    pub async fn handshake(&self, link: Conn) -> Result<Incoming<'_>> {
        let handshake_slot = slot(&self.handshakes, "handshakes", self.limits.max_handshakes)?;
        let timeouts = &self.config.timeouts;
        if let Some(tcp) = link.as_tcp() {
            net::tune_link(tcp, timeouts.idle, false)?;
        }
        let link: Box<dyn Link> = match &self.tls {
            Some(tls) => Box::new(
                tokio::time::timeout(timeouts.handshake, tls.accept(link))
                    .await
                    .map_err(|_| Error::Timeout {
                        what: "the TLS handshake",
                    })??,
            ),
            None => Box::new(link),
        };
        let offered = self.templates_offered();
        let mut config = self.config.clone();
        if !offered {
            config.templates = None;
        }
        let handshake = accept(tokio::io::split(link), &config).await?;
        drop(handshake_slot);
        tracing::info!(
            templates = handshake.hello().catalog.is_some(),
            page_size = handshake.hello().page_size,
            "a source authenticated and sent its HELLO"
        );
        match slot(&self.migrations, "migrations", self.limits.max_migrations) {
            Ok(slot) => Ok(Incoming {
                proxy: self,
                offered: offered && handshake.hello().catalog.is_some(),
                handshake,
                _slot: slot,
            }),
            Err(busy) => {
                let _ = handshake.refuse(&busy).await;
                Err(busy)
            }
        }
    }
}

/// A link a destination proxy can run.
trait Link: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Link for T {}

/// The handshake of a link of either kind.
type LinkHandshake = Handshake<ReadHalf<Box<dyn Link>>, WriteHalf<Box<dyn Link>>>;

/// A migration a [`DestinationProxy`] accepted: an authenticated source, a valid
/// HELLO, a slot. [`restore`](Self::restore) connects to the destination QEMU.
pub struct Incoming<'a> {
    proxy: &'a DestinationProxy,
    handshake: LinkHandshake,
    /// Whether the source refers to the proxy's template store.
    offered: bool,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Incoming<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("handshake", &self.handshake)
            .finish_non_exhaustive()
    }
}

impl Incoming<'_> {
    /// Connects to the destination QEMU and restores the migration into it (see
    /// [`Handshake::restore`]). If the template store fails to restore a page, the
    /// proxy offers no catalog for its cool-down, so QEMU's retry goes through.
    pub async fn restore(self, progress: &Progress) -> Result<Report> {
        let Incoming {
            proxy,
            handshake,
            offered,
            _slot,
        } = self;
        let qemu = match proxy.qemu.connect(proxy.config.timeouts.connect).await {
            Ok(qemu) => qemu,
            Err(e) => {
                let _ = handshake.refuse(&e).await;
                return Err(e);
            }
        };
        let restored = handshake.restore(tokio::io::split(qemu), progress).await;
        if let (Err(e @ Error::Unresolved { .. }), true) = (&restored, offered) {
            *proxy
                .templates_off_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) =
                Some(Instant::now() + proxy.template_cooldown);
            tracing::error!(
                error = %e,
                cooldown = ?proxy.template_cooldown,
                "the template store failed a migration: no catalog offered until the cool-down ends"
            );
        }
        restored
    }
}
