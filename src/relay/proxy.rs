//! The two proxies between unmodified QEMUs, as a library: what `examples/proxy.rs`
//! runs. Each serves one connection at a time per call and holds what the
//! connections share: the TLS settings, the caps on what a peer can make it hold,
//! and (at the destination) whether templates are trusted right now.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::group::{Group, Member, Registry};
use super::net::{self, Conn, Endpoint};
use super::source::{Carried, carry, new_session};
use super::tls::{TlsClient, TlsServer};
use super::{DestinationConfig, Handshake, Progress, Report, Served, SourceConfig, accept, lock};
use crate::error::{Error, Result};
use crate::qemu::multifd::{self, ChannelRecord, MultifdDecoder};
use crate::qemu::wire::FILE_MAGIC;

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
    /// Multifd channels one migration may have besides its main channel (QEMU's
    /// `multifd-channels`); a destination holds up to 152 MiB for each.
    pub max_channels: usize,
}

impl Default for ProxyLimits {
    /// One migration, 16 handshakes, 8 multifd channels.
    fn default() -> Self {
        Self {
            max_migrations: 1,
            max_handshakes: 16,
            max_channels: 8,
        }
    }
}

impl ProxyLimits {
    /// With at most `n` migrations at once (at least 1).
    pub fn with_max_migrations(mut self, n: usize) -> Self {
        self.max_migrations = n.max(1);
        self
    }

    /// With at most `n` multifd channels per migration (0: multifd refused).
    pub fn with_max_channels(mut self, n: usize) -> Self {
        self.max_channels = n;
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

/// The source proxy: takes the source QEMU's connections and carries each migration
/// over links it opens to the destination proxy, one link connection per QEMU
/// connection.
///
/// A multifd migration's connections all reach the proxy's one address; QEMU's
/// greeting names a channel but not its migration (its VM UUID is all zeros unless
/// QEMU runs with `-uuid`). So a multifd channel joins the one migration in progress,
/// and is refused while there is none or several: run one source proxy (or one
/// listening address) per VM that migrates at once. A channel id seen twice in a
/// migration, or another VM UUID, is refused too, which fails that migration
/// cleanly rather than mixing two VMs' memory.
#[derive(Debug)]
pub struct SourceProxy {
    config: SourceConfig,
    link: String,
    tls: Option<TlsClient>,
    limits: ProxyLimits,
    migrations: Arc<Semaphore>,
    /// The migrations in progress, for their multifd channels to join.
    in_progress: Registry,
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
            in_progress: Registry::default(),
        }
    }

    /// With these caps.
    pub fn with_limits(mut self, limits: ProxyLimits) -> Self {
        self.migrations = Arc::new(Semaphore::new(limits.max_migrations));
        self.limits = limits;
        self
    }

    /// Carries what the source QEMU sends on `qemu`: a migration's main channel
    /// (until the migration, multifd channels included, ends) or one of its multifd
    /// channels, told apart by their first bytes.
    pub async fn serve(&self, qemu: Conn, progress: &Progress) -> Result<Served> {
        net::tune_source_qemu(&qemu)?;
        let handshake = self.config.timeouts.handshake;
        let (mut from_qemu, to_qemu) = tokio::io::split(qemu);
        let mut first = [0; multifd::wire::GREETING_LEN];
        read_within(handshake, &mut from_qemu, &mut first[..4]).await?;
        if first[..4] == FILE_MAGIC.to_be_bytes() {
            let from_qemu = std::io::Cursor::new(first[..4].to_vec()).chain(from_qemu);
            let report = self.serve_main((from_qemu, to_qemu), progress).await?;
            return Ok(Served::Migration(Box::new(report)));
        }
        if multifd::wire::is_channel_start(&first) != Some(true) {
            return Err(Error::Malformed {
                offset: 0,
                field: "QEMU connection",
                reason: "neither a migration stream (QEVM) nor a multifd channel",
            });
        }
        read_within(handshake, &mut from_qemu, &mut first[4..]).await?;
        let Some(ChannelRecord::Greeting(greeting)) =
            MultifdDecoder::new().decode(&mut BytesMut::from(&first[..]))?
        else {
            unreachable!("a whole greeting decodes to a greeting or an error");
        };
        progress.set_channel(greeting.channel_id);
        let from_qemu = std::io::Cursor::new(first.to_vec()).chain(from_qemu);
        self.serve_channel((from_qemu, to_qemu), greeting.channel_id, greeting.uuid)
            .await?;
        Ok(Served::Channel(greeting.channel_id))
    }

    async fn serve_main<QR, QW>(&self, qemu: (QR, QW), progress: &Progress) -> Result<Report>
    where
        QR: AsyncRead + Unpin,
        QW: AsyncWrite + Unpin,
    {
        let _slot = slot(&self.migrations, "migrations", self.limits.max_migrations)?;
        let group = self.in_progress.start(new_session())?;
        group.follow_channels(progress);
        let carried = group
            .run(async {
                let link = self.connect().await?;
                let main = Carried::Main {
                    page_size: Some(group.ready_sender()),
                };
                let session = group.session();
                carry(qemu, link, &self.config, progress, session, main).await
            })
            .await;
        let report = group.finish(carried).await;
        self.in_progress.end(&group);
        report
    }

    async fn serve_channel<QR, QW>(&self, qemu: (QR, QW), id: u8, uuid: [u8; 16]) -> Result<()>
    where
        QR: AsyncRead + Unpin,
        QW: AsyncWrite + Unpin,
    {
        // QEMU connects its main channel first, but its channels may speak first
        let group = self
            .in_progress
            .find(self.config.timeouts.handshake, |groups| {
                let mut open = groups.iter().filter(|g| g.is_open());
                match (open.next(), open.next()) {
                    (Some(group), None) => Some(Ok(group.clone())),
                    (None, _) => None,
                    (Some(_), Some(_)) => Some(Err(Error::Config {
                        what: "multifd channel",
                        reason: "several migrations in progress: which one is this \
                                 channel's? Run one source proxy per VM that migrates \
                                 at once"
                            .into(),
                    })),
                }
            })
            .await?;
        let member = group.join(id, Some(uuid), self.limits.max_channels)?;
        let outcome = group
            .run(async {
                let page_size = group.ready(self.config.timeouts.idle).await?;
                let link = self.connect().await?;
                let channel = Carried::Channel { page_size };
                let (session, progress) = (group.session(), member.progress());
                carry(qemu, link, &self.config, progress, session, channel).await
            })
            .await;
        member.end(&outcome);
        outcome.map(drop)
    }

    /// Opens a link connection to the destination proxy.
    async fn connect(&self) -> Result<(ReadHalf<Box<dyn Link>>, WriteHalf<Box<dyn Link>>)> {
        let timeouts = &self.config.timeouts;
        let link = Endpoint::Tcp(self.link.clone())
            .connect(timeouts.connect)
            .await?;
        if let Some(tcp) = link.as_tcp() {
            net::tune_link(tcp, timeouts.idle, true)?;
        }
        let link: Box<dyn Link> = match &self.tls {
            Some(tls) => Box::new(
                tokio::time::timeout(timeouts.handshake, tls.connect(link))
                    .await
                    .map_err(|_| Error::Timeout {
                        what: "the TLS handshake",
                    })??,
            ),
            None => Box::new(link),
        };
        Ok(tokio::io::split(link))
    }
}

/// Fills `buf` from `from` within `timeout`: the first bytes of a QEMU connection.
async fn read_within<R: AsyncRead + Unpin>(
    timeout: Duration,
    from: &mut R,
    buf: &mut [u8],
) -> Result<()> {
    match tokio::time::timeout(timeout, from.read_exact(buf)).await {
        Ok(read) => read.map(drop).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::PeerClosed {
                what: "its first bytes",
            },
            _ => e.into(),
        }),
        Err(_) => Err(Error::Timeout {
            what: "the first bytes of a QEMU connection",
        }),
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
    /// The migrations in progress, for their multifd channels to join by session.
    in_progress: Registry,
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
            in_progress: Registry::default(),
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
            && lock(&self.templates_off_until).is_none_or(|until| Instant::now() >= until)
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
        let hello = *handshake.hello();
        tracing::info!(
            templates = hello.catalog.is_some(),
            page_size = hello.page_size,
            channel = hello.channel,
            "a source authenticated and sent its HELLO"
        );
        let part = match hello.channel {
            0 => self.start_migration(hello.session),
            n => {
                // a channel's link may come before its main channel's: wait for it,
                // in the handshake slot and time
                let id = u8::try_from(n - 1).expect("the decoder refuses channels beyond 256");
                let session = |g: &&Arc<Group>| g.session() == hello.session;
                self.in_progress
                    .find(timeouts.handshake, |groups| {
                        groups.iter().find(session).cloned().map(Ok)
                    })
                    .await
                    .and_then(|group| group.join(id, None, self.limits.max_channels))
                    .map(Part::Channel)
            }
        };
        drop(handshake_slot);
        match part {
            Ok(part) => Ok(Incoming {
                proxy: self,
                offered: offered && hello.catalog.is_some(),
                handshake,
                part,
            }),
            Err(refused) => {
                let _ = handshake.refuse(&refused).await;
                Err(refused)
            }
        }
    }

    /// A migration slot and a group for the main channel of migration `session`.
    fn start_migration(&self, session: [u8; 16]) -> Result<Part> {
        let slot = slot(&self.migrations, "migrations", self.limits.max_migrations)?;
        let group = self.in_progress.start(session)?;
        Ok(Part::Main { group, _slot: slot })
    }

    /// After the template store failed to restore a page of a migration it was
    /// offered for, offers no catalog for the cool-down.
    fn note_template_failure(&self, restored: &Result<Report>, offered: bool) {
        if let (Err(e @ Error::Unresolved { .. }), true) = (restored, offered) {
            *lock(&self.templates_off_until) = Some(Instant::now() + self.template_cooldown);
            tracing::error!(
                error = %e,
                cooldown = ?self.template_cooldown,
                "the template store failed a migration: no catalog offered until the cool-down ends"
            );
        }
    }
}

/// A link a destination proxy can run.
trait Link: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Link for T {}

/// The handshake of a link of either kind.
type LinkHandshake = Handshake<ReadHalf<Box<dyn Link>>, WriteHalf<Box<dyn Link>>>;

/// A migration, or one of its multifd channels, a [`DestinationProxy`] accepted: an
/// authenticated source, a valid HELLO, a slot. [`restore`](Self::restore) connects
/// to the destination QEMU.
pub struct Incoming<'a> {
    proxy: &'a DestinationProxy,
    handshake: LinkHandshake,
    /// Whether the source refers to the proxy's template store.
    offered: bool,
    part: Part,
}

/// Which part of its migration an accepted link carries.
enum Part {
    /// The main channel, in a migration slot.
    Main {
        group: Arc<Group>,
        _slot: OwnedSemaphorePermit,
    },
    /// A multifd channel of the migration of a main channel.
    Channel(Member),
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
    /// [`Handshake::restore`]): a main channel until the migration, multifd channels
    /// included, ends; a multifd channel once its main channel's QEMU connection is
    /// open (QEMU takes its main channel first). If the template store fails to
    /// restore a page, the proxy offers no catalog for its cool-down, so QEMU's retry
    /// goes through.
    pub async fn restore(self, progress: &Progress) -> Result<Served> {
        let Incoming {
            proxy,
            handshake,
            offered,
            part,
        } = self;
        let timeouts = &proxy.config.timeouts;
        match part {
            Part::Main { group, _slot } => {
                group.follow_channels(progress);
                let restored = group
                    .run(async {
                        let qemu = proxy.connect_qemu(handshake).await?;
                        group.set_ready(1);
                        let (handshake, qemu) = qemu;
                        handshake.restore(qemu, progress).await
                    })
                    .await;
                proxy.note_template_failure(&restored, offered);
                let report = group.finish(restored).await;
                proxy.in_progress.end(&group);
                report.map(|report| Served::Migration(Box::new(report)))
            }
            Part::Channel(member) => {
                let id = member.channel();
                progress.set_channel(id);
                let group = member.group();
                let restored = group
                    .run(async {
                        group.ready(timeouts.handshake + timeouts.connect).await?;
                        let (handshake, qemu) = proxy.connect_qemu(handshake).await?;
                        handshake.restore(qemu, member.progress()).await
                    })
                    .await;
                proxy.note_template_failure(&restored, offered);
                member.end(&restored);
                restored.map(|_| Served::Channel(id))
            }
        }
    }
}

impl DestinationProxy {
    /// Connects to the destination QEMU for `handshake`'s link; tells the source if
    /// that fails.
    async fn connect_qemu(
        &self,
        handshake: LinkHandshake,
    ) -> Result<(LinkHandshake, (ReadHalf<Conn>, WriteHalf<Conn>))> {
        match self.qemu.connect(self.config.timeouts.connect).await {
            Ok(qemu) => Ok((handshake, tokio::io::split(qemu))),
            Err(e) => {
                let _ = handshake.refuse(&e).await;
                Err(e)
            }
        }
    }
}
