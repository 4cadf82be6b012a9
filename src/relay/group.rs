//! The connections of one multifd migration at a proxy: its main channel and the
//! multifd channels that joined it, which succeed or fail together.
//!
//! QEMU opens the main channel, then one connection per multifd channel; at each
//! proxy every connection runs on its own task (its own core), with a link
//! connection of its own. The group ties them: a channel starts once the main
//! channel says it may (the source: the page size is known; the destination: the
//! destination QEMU's main connection is open, as QEMU connects its channels after
//! it), a part that fails makes every other part stop at once (closing its
//! connections, so both QEMUs see the migration fail), and the main channel reports
//! the migration once every channel ended: counters summed, and per channel.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{ChannelProgress, Progress, Report, lock};
use crate::dedup::Stats;
use crate::error::{Error, Result};

/// The migrations in progress at a proxy, which multifd channels join.
#[derive(Debug, Default)]
pub(super) struct Registry {
    groups: Mutex<Vec<Arc<Group>>>,
    /// Wakes the channels waiting for their migration's main channel.
    started: Notify,
}

impl Registry {
    /// Registers the migration `session` of a main channel that arrived.
    pub(super) fn start(&self, session: [u8; 16]) -> Result<Arc<Group>> {
        let mut groups = lock(&self.groups);
        if groups.iter().any(|g| g.session == session) {
            return Err(Error::Config {
                what: "session",
                reason: "a migration with this session is in progress already".into(),
            });
        }
        let group = Group::new(session);
        groups.push(group.clone());
        self.started.notify_waiters();
        Ok(group)
    }

    /// Forgets a migration that ended.
    pub(super) fn end(&self, group: &Arc<Group>) {
        lock(&self.groups).retain(|g| !Arc::ptr_eq(g, group));
    }

    /// The migration `pick` chooses among those in progress, waiting for main
    /// channels to arrive while it chooses none (`None`), for at most `timeout`: a
    /// channel's connection may be read before its main channel's.
    pub(super) async fn find(
        &self,
        timeout: Duration,
        pick: impl Fn(&[Arc<Group>]) -> Option<Result<Arc<Group>>>,
    ) -> Result<Arc<Group>> {
        let wait = async {
            loop {
                // registered before the groups are read: a start in between wakes us
                let started = self.started.notified();
                let mut started = std::pin::pin!(started);
                started.as_mut().enable();
                if let Some(found) = pick(&lock(&self.groups)) {
                    return found;
                }
                started.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(Error::Timeout {
                what: "the main channel of the migration",
            }))
    }
}

/// One migration's connections at a proxy.
#[derive(Debug)]
pub(super) struct Group {
    session: [u8; 16],
    /// What channels wait for before they start: the page size (source) or 1 once
    /// the destination QEMU's main connection is open (destination).
    ready: watch::Sender<Option<usize>>,
    state: Mutex<State>,
    /// Wakes the main channel when a channel ends.
    ended: Notify,
    /// Stops every part when one fails.
    cancel: CancellationToken,
    /// The channels' live counters, which the main channel's [`Progress`] adds up.
    progress: ChannelProgress,
}

#[derive(Debug, Default)]
struct State {
    /// The main channel still runs: channels may join.
    open: bool,
    /// Channel ids that joined.
    channels: BTreeSet<u8>,
    /// The VM UUID of the channels' greetings, once one joined (source only).
    uuid: Option<[u8; 16]>,
    /// Channels still running.
    running: usize,
    /// Channels that ended well, with their counters.
    reports: Vec<(u8, Stats)>,
    /// Why the migration failed, if a part failed first.
    failure: Option<String>,
}

/// A channel's place in its group; ending it (or dropping it) counts the channel
/// as ended.
#[derive(Debug)]
pub(super) struct Member {
    group: Arc<Group>,
    channel: u8,
    progress: Arc<Progress>,
    ended: bool,
}

impl Group {
    /// A group for migration `session`, open to channels.
    pub(super) fn new(session: [u8; 16]) -> Arc<Self> {
        Arc::new(Self {
            session,
            ready: watch::Sender::new(None),
            state: Mutex::new(State {
                open: true,
                ..State::default()
            }),
            ended: Notify::new(),
            cancel: CancellationToken::new(),
            progress: Arc::default(),
        })
    }

    pub(super) fn session(&self) -> [u8; 16] {
        self.session
    }

    /// Whether channels may still join.
    pub(super) fn is_open(&self) -> bool {
        self.lock().open && !self.cancel.is_cancelled()
    }

    /// Adds multifd channel `channel`, at most `max_channels` of them, each id once
    /// and all with one VM `uuid` when given. A second connection with one id, or
    /// another UUID, is not this migration's (another VM's channel that reached the
    /// same address): it is refused, and the migration goes on. If the foreign one
    /// came first, the migration's own channel of that id is the one refused, and
    /// its QEMU fails the migration cleanly: two VMs' memory never mix.
    pub(super) fn join(
        self: &Arc<Self>,
        channel: u8,
        uuid: Option<[u8; 16]>,
        max_channels: usize,
    ) -> Result<Member> {
        let mut state = self.lock();
        let refused = |reason: String| Error::Config {
            what: "multifd channel",
            reason,
        };
        if !state.open || self.cancel.is_cancelled() {
            return Err(refused("its migration ended already".into()));
        }
        if state.channels.len() >= max_channels {
            return Err(Error::Busy {
                what: "multifd channels in one migration",
                limit: max_channels,
            });
        }
        if let Some(uuid) = uuid {
            if *state.uuid.get_or_insert(uuid) != uuid {
                return Err(refused(format!(
                    "channel {channel} names another VM UUID than this migration's channels"
                )));
            }
        }
        if !state.channels.insert(channel) {
            return Err(refused(format!(
                "channel {channel} joined this migration already: two VMs migrating through \
                 one address at once?"
            )));
        }
        state.running += 1;
        let progress = Arc::new(Progress::default());
        lock(&self.progress).push(progress.clone());
        Ok(Member {
            group: self.clone(),
            channel,
            progress,
            ended: false,
        })
    }

    /// Lets channels start, with `value` (see [`Group::ready`]).
    pub(super) fn set_ready(&self, value: usize) {
        self.ready.send_replace(Some(value));
    }

    /// Where the source's main channel sends its page size, letting channels start.
    pub(super) fn ready_sender(&self) -> &watch::Sender<Option<usize>> {
        &self.ready
    }

    /// Waits until channels may start, for at most `timeout`.
    pub(super) async fn ready(&self, timeout: Duration) -> Result<usize> {
        let mut ready = self.ready.subscribe();
        let wait = async {
            tokio::select! {
                value = ready.wait_for(Option::is_some) => Ok(value.ok().and_then(|v| *v)),
                () = self.cancel.cancelled() => Err(self.failed()),
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(Some(value))) => Ok(value),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) | Err(_) => Err(Error::Timeout {
                what: "the main channel of the migration",
            }),
        }
    }

    /// Runs one part of the migration: stops it when another part fails, and makes
    /// every other part stop when it fails.
    pub(super) async fn run<T>(&self, part: impl Future<Output = Result<T>>) -> Result<T> {
        let outcome = tokio::select! {
            outcome = part => outcome,
            () = self.cancel.cancelled() => return Err(self.failed()),
        };
        if let Err(e) = &outcome {
            self.fail(e);
        }
        outcome
    }

    /// Fails the migration: every part stops.
    pub(super) fn fail(&self, error: &Error) {
        self.lock().failure.get_or_insert_with(|| error.to_string());
        self.cancel.cancel();
    }

    /// The main channel's counters follow the channels' too.
    pub(super) fn follow_channels(&self, main: &Progress) {
        main.follow(self.progress.clone());
    }

    /// Ends the migration once its main channel ended with `main`: no channel may
    /// join any more; waits for the running ones (each bounded by its own idle
    /// timeout) and reports the whole migration, or the first failure.
    pub(super) async fn finish(&self, main: Result<Report>) -> Result<Report> {
        let mut report = match main {
            Ok(report) => report,
            Err(e) => {
                self.fail(&e);
                return Err(e);
            }
        };
        loop {
            // registered before the state is read: an end in between still wakes us
            let ended = self.ended.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            {
                let mut state = self.lock();
                state.open = false;
                if state.running == 0 {
                    if state.failure.is_some() {
                        break;
                    }
                    let mut channels = std::mem::take(&mut state.reports);
                    channels.sort_by_key(|(id, _)| *id);
                    for (_, stats) in &channels {
                        report.stats.add(stats);
                    }
                    report.channels = channels;
                    return Ok(report);
                }
            }
            tokio::select! {
                () = ended => {}
                () = self.cancel.cancelled() => break,
            }
        }
        Err(self.failed())
    }

    /// The error of a part stopped because another failed.
    fn failed(&self) -> Error {
        Error::Remote {
            reason: self
                .lock()
                .failure
                .clone()
                .unwrap_or_else(|| "another connection of the migration failed".into()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Member {
    /// The group.
    pub(super) fn group(&self) -> &Group {
        &self.group
    }

    /// The channel's id.
    pub(super) fn channel(&self) -> u8 {
        self.channel
    }

    /// The channel's live counters, added up in the main channel's.
    pub(super) fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The channel's end: its counters join the migration's report, or its error
    /// fails the migration.
    pub(super) fn end(mut self, outcome: &Result<Report>) {
        self.settle(
            outcome
                .as_ref()
                .map(|r| r.stats.clone())
                .map_err(Error::to_string),
        );
    }

    /// Counts the channel out of the running ones with its counters, or fails the
    /// migration with its reason; once.
    fn settle(&mut self, outcome: std::result::Result<Stats, String>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut state = self.group.lock();
        state.running -= 1;
        match outcome {
            Ok(stats) => state.reports.push((self.channel, stats)),
            Err(reason) => {
                state.failure.get_or_insert(reason);
                self.group.cancel.cancel();
            }
        }
        drop(state);
        self.group.ended.notify_waiters();
    }
}

impl Drop for Member {
    /// A channel whose task went away without an outcome fails the migration.
    fn drop(&mut self) {
        self.settle(Err(format!("multifd channel {} stopped", self.channel)));
    }
}
