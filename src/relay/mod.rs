//! The relay: replication source → change stage → hub, wired with bounded
//! channels, plus the one-time membership load.
//!
//! ```text
//!  run_source ──SourceEvent (16)───▶ change stage ──Vec<StageEvent> (64)──▶ Hub ──▶ outboxes
//!      ▲                              │ Snapshot: load memberships in the slot's snapshot
//!      │                              │ Started:  reset assembler; first start on an existing
//!      │                              │           slot: load memberships now (catch-up window)
//!      │                              │ walcast-policy message / poll saw a change: read the
//!      │                              │           policies again at the next commit → PolicyUpdate
//!      └──────── AckHandle ◀──────────┴───────────────────────────── hub acks end_lsn
//!                                     │ realtime.messages INSERTs (Broadcast from Database)
//!                                     └──DbMessage (1024)──▶ delivery stage (rooms)
//! ```
//!
//! Changes of `realtime` relations never reach the hub: [`messages`] hands
//! the `realtime.messages` rows to the delivery stage before the hub can
//! acknowledge their transaction (see its acknowledgement invariant).
//!
//! Policy changes at run time (see [`crate::policy::watch`]): a
//! `walcast-policy` message inside a transaction makes the stage re-read the
//! policies right after forwarding that transaction's Commit, so the hub
//! installs them before the next transaction; a poll (every
//! [`RelayConfig::policy_poll`]) that sees roles — or, without the event
//! trigger, the catalog — change does the same at the next transaction
//! boundary. Polls run in a task of their own (a slow database never holds
//! up the stream); the reload's SQL runs in the stage (the hub stays free of
//! I/O), and while it runs the stage does not read the source.
//!
//! The change stage batches events (up to 256 per send, or whatever is there
//! when the source is momentarily idle) so the channel costs little per
//! change. [`Relay::start`] returns once memberships are loaded and the
//! stream has started, so subscriptions made after it see every later
//! commit. Shutdown: stop the source (final standby status), let the hub
//! close every outbox, then return.
//!
//! How each task ended goes into the shared
//! [`crate::replication::ReplicationStatus`] (a stage's
//! error fails the pipeline for `/ready`); [`RelayQueues`] reads the channel
//! depths through weak senders.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::change::{Assembler, ChangeError, TxEvent};
use crate::hub::{self, HubConfig, HubError, HubHandle, HubStats, StageEvent};
use crate::pgconn::PgConfig;
use crate::policy::{self, PolicyError};
use crate::realtime::messages::{DbBroadcastStats, DbMessage};
use crate::replication::{
    run_source, AckHandle, ReplicationError, ReplicationStatus, SourceConfig, SourceEvent, WalEvent,
    SOURCE_QUEUE_BATCHES,
};
use crate::spill::{Spill, SpillConfig, SpillError, SpillStats};

pub mod messages;

/// Most events per batch sent to the hub.
const BATCH: usize = 256;

/// Everything the relay needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The replication source (its connection is also used for the SQL
    /// membership load; `export_snapshot` is forced on).
    pub source: SourceConfig,
    /// Hub settings.
    pub hub: HubConfig,
    /// Database evaluation of tables whose policies walcast cannot mirror.
    pub database_eval: policy::fallback::FallbackConfig,
    /// Memory budget of the membership caches, all together.
    pub policy_cache_budget: usize,
    /// How long [`Relay::start`] waits for the first stream start.
    pub start_timeout: Duration,
    /// Where transactions that outgrow memory go (the hub's and, with
    /// streaming, the change stage's), and the disk budget.
    pub spill: SpillConfig,
    /// Time between two polls of roles and memberships (and, without the
    /// event trigger, of policies, privileges and functions).
    pub policy_poll: Duration,
    /// Where `realtime.messages` rows go (Broadcast from Database; bounded,
    /// see [`messages::QUEUE`]); `None`: they are only kept out of Postgres
    /// Changes.
    pub messages: Option<mpsc::Sender<DbMessage>>,
}

impl RelayConfig {
    /// Defaults around `source`.
    pub fn new(source: SourceConfig) -> RelayConfig {
        RelayConfig {
            source,
            hub: HubConfig::default(),
            database_eval: policy::fallback::FallbackConfig::default(),
            policy_cache_budget: policy::caches::DEFAULT_BUDGET,
            start_timeout: Duration::from_secs(60),
            spill: SpillConfig { dir: crate::spill::temporary_dir(), disk_budget: crate::spill::DEFAULT_DISK_BUDGET },
            policy_poll: crate::policy::watch::DEFAULT_POLL_INTERVAL,
            messages: None,
        }
    }
}

/// Errors that stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Replication failed definitely.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// A change could not be assembled.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// Memberships could not be loaded or applied.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A policy reload kept reading a catalog without the policy changes the
    /// stream reported (definite: restart walcast; if `walcast.policy_epoch`
    /// was recreated, that is expected once).
    #[error(
        "the catalog still does not show the policy changes the stream reported (policy count {read:?} < \
         {seen}) after {waited:?}; stopping rather than judging by policies that may be stale: restart walcast"
    )]
    PolicyCatalogBehind {
        /// The count the stream's message carried.
        seen: i64,
        /// The count the catalog read showed.
        read: Option<i64>,
        /// How long it waited.
        waited: Duration,
    },
    /// The hub stopped.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The spill directory failed.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// The sink or feed of a cluster node failed (its message says how
    /// and what to do).
    #[error("{0}")]
    Cluster(Box<dyn std::error::Error + Send + Sync>),
    /// The relay did not start in time.
    #[error("the relay did not start streaming within {0:?}; check the database URL and that PostgreSQL is up")]
    StartTimeout(Duration),
    /// A stage ended unexpectedly.
    #[error("relay stage ended: {0}")]
    Stopped(&'static str),
}

impl RelayError {
    /// Whether starting again may help (a cluster's source retries those;
    /// the others need the operator).
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Replication(err) => err.is_transient(),
            RelayError::Change(err) => err.is_transient(),
            RelayError::Policy(err) => err.is_transient(),
            RelayError::Spill(err) => err.is_transient(),
            RelayError::PolicyCatalogBehind { .. } | RelayError::Hub(_) => false,
            RelayError::Cluster(_) | RelayError::StartTimeout(_) | RelayError::Stopped(_) => true,
        }
    }
}

/// The relay's channels, for queue-depth gauges. Holds weak senders only, so
/// it never keeps a channel open.
#[derive(Debug, Clone)]
pub struct RelayQueues {
    source: mpsc::WeakSender<SourceEvent>,
    stage: mpsc::WeakSender<Vec<StageEvent>>,
    stage_spill: Arc<SpillStats>,
    messages: Option<mpsc::WeakSender<DbMessage>>,
    db_broadcast: Arc<DbBroadcastStats>,
}

impl RelayQueues {
    /// `(queued, capacity)` of the replication → change stage channel
    /// (events, each a batch of WAL messages); `None` once it closed.
    pub fn source(&self) -> Option<(usize, usize)> {
        self.source.upgrade().map(|tx| (tx.max_capacity() - tx.capacity(), tx.max_capacity()))
    }

    /// The change stage's spill counters (streamed transactions; the hub's
    /// are in [`HubHandle::spill`]).
    pub fn stage_spill(&self) -> &SpillStats {
        &self.stage_spill
    }

    /// `(queued, capacity)` of the change stage → Broadcast from Database
    /// delivery channel (messages); `None` without one, or once it closed.
    pub fn messages(&self) -> Option<(usize, usize)> {
        self.messages.as_ref()?.upgrade().map(|tx| (tx.max_capacity() - tx.capacity(), tx.max_capacity()))
    }

    /// Counters of Broadcast from Database (shared with the delivery stage
    /// and the partition keeper).
    pub fn db_broadcast(&self) -> &Arc<DbBroadcastStats> {
        &self.db_broadcast
    }

    /// `(queued, capacity)` of the change stage → hub channel (batches of up
    /// to 256 events); `None` once it closed.
    pub fn stage(&self) -> Option<(usize, usize)> {
        self.stage.upgrade().map(|tx| (tx.max_capacity() - tx.capacity(), tx.max_capacity()))
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    /// For the realtime layer.
    pub hub: HubHandle,
    /// Acknowledgements and the shared replication status.
    ack: AckHandle,
    queues: RelayQueues,
    /// Cancelled to stop the stages (the source first sends a final status
    /// update).
    shutdown: CancellationToken,
    /// Cancelled when the first stage task ends (each holds a drop guard).
    ended: CancellationToken,
    /// The stages, in stop order (the source first).
    tasks: Vec<(&'static str, JoinHandle<Result<(), RelayError>>)>,
}

/// What consumes the change stage's batches instead of the hub (a source
/// node of a cluster publishes them): called once with the batches, the
/// acknowledgement handle (acknowledge a transaction's `end_lsn` only once
/// it is durably handed on) and the stop signal.
pub type Sink = Box<
    dyn FnOnce(
            mpsc::Receiver<Vec<StageEvent>>,
            AckHandle,
            CancellationToken,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RelayError>> + Send>>
        + Send,
>;

/// What feeds a hub without a replication source (an edge node of a
/// cluster reads the batches from the stream): called once with the hub's
/// input, the acknowledgement handle (its status is the feed's: streaming,
/// disconnected, failed) and the stop signal.
pub type Feed = Box<
    dyn FnOnce(
            mpsc::Sender<Vec<StageEvent>>,
            AckHandle,
            CancellationToken,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RelayError>> + Send>>
        + Send,
>;

/// The parts of [`RelayConfig`] a hub fed from elsewhere needs.
#[derive(Debug, Clone)]
pub struct FedConfig {
    /// Hub settings.
    pub hub: HubConfig,
    /// Database evaluation (its own connections, to `connection`).
    pub database_eval: policy::fallback::FallbackConfig,
    /// Where database evaluation connects.
    pub connection: PgConfig,
    /// The hub's spill.
    pub spill: SpillConfig,
    /// Broadcast from Database's counters (shared with the delivery stage
    /// and the partition keeper).
    pub db_broadcast: Arc<DbBroadcastStats>,
}

impl Relay {
    /// Starts the pipeline; returns once memberships are loaded and streaming
    /// has started.
    ///
    /// # Errors
    /// A definite error before streaming started, or the start timeout.
    pub async fn start(config: RelayConfig) -> Result<Relay, RelayError> {
        Relay::start_inner(config, None).await
    }

    /// As [`Relay::start`], the change stage's batches going to `sink`
    /// instead of a hub (which is made but never runs: its handle serves
    /// nobody). `realtime` changes stay in the batches (the sink carries
    /// them on; Broadcast from Database is delivered where they arrive).
    ///
    /// # Errors
    /// As [`Relay::start`].
    pub async fn start_with_sink(config: RelayConfig, sink: Sink) -> Result<Relay, RelayError> {
        Relay::start_inner(config, Some(sink)).await
    }

    /// A hub fed by `feed` (no replication source, no change stage);
    /// returns at once — readiness is the feed's to tell.
    ///
    /// # Errors
    /// The spill directory.
    pub fn start_fed(config: FedConfig, feed: Feed) -> Result<Relay, RelayError> {
        let spill =
            // `edge/`: on a node that is also a source, `hub/` and `stream/`
            // are its relay's.
            Spill::new(SpillConfig { dir: config.spill.dir.join("edge"), disk_budget: config.spill.disk_budget })?;
        let shutdown = CancellationToken::new();
        let ack = AckHandle::default();
        let (mut hub, handle) = hub::hub(config.hub.clone(), ack.clone(), spill);
        let (verdicts_tx, verdicts_rx) = mpsc::channel(256);
        let fallback = policy::fallback::spawn(
            config.connection.clone(),
            config.database_eval.clone(),
            Arc::clone(&handle.stats.database),
            verdicts_tx,
        );
        hub.attach_fallback(fallback, verdicts_rx);
        let (stage_tx, stage_rx) = mpsc::channel(64);
        let (closed_source, _) = mpsc::channel(1);
        let queues = RelayQueues {
            source: closed_source.downgrade(),
            stage: stage_tx.downgrade(),
            stage_spill: Arc::default(),
            messages: None,
            db_broadcast: Arc::clone(&config.db_broadcast),
        };
        let ended = CancellationToken::new();
        let feed_task =
            spawn_stage(&ended, record_end(ack.clone(), "stream feed", feed(stage_tx, ack.clone(), shutdown.clone())));
        let hub_task = spawn_stage(
            &ended,
            record_end(ack.clone(), "hub", {
                let stop = shutdown.clone();
                async move { hub.run(stage_rx, stop).await.map_err(RelayError::from) }
            })
            .instrument(tracing::info_span!("hub")),
        );
        Ok(Relay {
            hub: handle,
            ack,
            queues,
            shutdown,
            ended,
            tasks: vec![("stream feed", feed_task), ("hub", hub_task)],
        })
    }

    async fn start_inner(mut config: RelayConfig, sink: Option<Sink>) -> Result<Relay, RelayError> {
        config.source.export_snapshot = true;
        config.source.apply_tcp_liveness();
        // The hub and (with streaming) the change stage spill into
        // directories and budgets of their own: a committed streamed
        // transaction is held by the stage while the hub collects it, so a
        // shared budget could leave each waiting for the other.
        let streaming = config.source.slot.streaming;
        let hub_budget = if streaming { config.spill.disk_budget / 2 } else { config.spill.disk_budget };
        let spill = Spill::new(SpillConfig { dir: config.spill.dir.join("hub"), disk_budget: hub_budget })?;
        let stage_spill = Spill::new(SpillConfig {
            dir: config.spill.dir.join("stream"),
            disk_budget: config.spill.disk_budget - hub_budget,
        })?;
        let shutdown = CancellationToken::new();
        let ack = AckHandle::default();
        let (mut hub, handle) = hub::hub(config.hub.clone(), ack.clone(), spill.clone());
        let (verdicts_tx, verdicts_rx) = mpsc::channel(256);
        let fallback = policy::fallback::spawn(
            config.source.connection.clone(),
            config.database_eval.clone(),
            Arc::clone(&handle.stats.database),
            verdicts_tx,
        );
        hub.attach_fallback(fallback, verdicts_rx);
        let (source_tx, source_rx) = mpsc::channel(SOURCE_QUEUE_BATCHES);
        let (stage_tx, stage_rx) = mpsc::channel(64);
        let queues = RelayQueues {
            source: source_tx.downgrade(),
            stage: stage_tx.downgrade(),
            stage_spill: Arc::clone(stage_spill.stats()),
            messages: config.messages.as_ref().map(mpsc::Sender::downgrade),
            db_broadcast: Arc::default(),
        };
        let router = if sink.is_some() {
            messages::Router::passthrough(Arc::clone(&queues.db_broadcast))
        } else {
            messages::Router::new(config.messages.take(), Arc::clone(&queues.db_broadcast))
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let ended = CancellationToken::new();
        let source_config = config.source.clone();
        let (source_ack, source_stop) = (ack.clone(), shutdown.clone());
        let source = spawn_stage(
            &ended,
            async move { run_source(source_config, source_tx, source_ack, source_stop).await.map_err(RelayError::from) }
                .instrument(tracing::info_span!("replication", slot = %config.source.slot.slot)),
        );
        let stage = spawn_stage(
            &ended,
            record_end(
                ack.clone(),
                "change stage",
                change_stage(
                    config.source.connection.clone(),
                    config.source.slot.publications.clone(),
                    config.policy_poll,
                    config.policy_cache_budget,
                    Arc::clone(&handle.stats),
                    router,
                    stage_spill,
                    source_rx,
                    stage_tx,
                    ready_tx,
                ),
            )
            .instrument(tracing::info_span!("change_stage")),
        );
        let last = match sink {
            None => {
                let stop = shutdown.clone();
                let run = async move { hub.run(stage_rx, stop).await.map_err(RelayError::from) };
                ("hub", spawn_stage(&ended, record_end(ack.clone(), "hub", run).instrument(tracing::info_span!("hub"))))
            }
            Some(sink) => {
                // The hub is not run: a source node judges nothing.
                drop(hub);
                let run = sink(stage_rx, ack.clone(), shutdown.clone());
                (
                    "publisher",
                    spawn_stage(
                        &ended,
                        record_end(ack.clone(), "publisher", run).instrument(tracing::info_span!("publisher")),
                    ),
                )
            }
        };
        let tasks = vec![("replication source", source), ("change stage", stage), last];
        let relay = Relay { hub: handle, ack, queues, shutdown, ended, tasks };
        match tokio::time::timeout(config.start_timeout, ready_rx).await {
            Ok(Ok(())) => Ok(relay),
            Ok(Err(_)) => Err(relay.stop().await.err().unwrap_or(RelayError::Stopped("change stage"))),
            Err(_) => {
                let _ = relay.stop().await;
                Err(RelayError::StartTimeout(config.start_timeout))
            }
        }
    }

    /// Stops the pipeline (source first, with a final status update) and
    /// returns the first error any stage ended with.
    ///
    /// # Errors
    /// That error.
    pub async fn stop(self) -> Result<(), RelayError> {
        self.shutdown.cancel();
        let mut first = Ok(());
        for (name, task) in self.tasks {
            let result = task.await.map_err(|_| RelayError::Stopped(name)).and_then(|r| r);
            if first.is_ok() {
                first = result;
            }
        }
        first
    }

    /// Whether every stage is still running.
    pub fn is_running(&self) -> bool {
        self.tasks.iter().all(|(_, task)| !task.is_finished())
    }

    /// Resolves once any stage has ended (for whatever reason, a panic
    /// included): a wait, where [`Relay::is_running`] would be polled.
    pub fn stage_ended(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.ended.cancelled()
    }

    /// The acknowledgement handle, with the shared replication status (in
    /// the crate only: acknowledging moves the slot).
    pub(crate) fn ack(&self) -> &AckHandle {
        &self.ack
    }

    /// Replication state, progress and lag.
    pub fn replication_status(&self) -> &ReplicationStatus {
        self.ack.status()
    }

    /// The relay's channels (queue depths).
    pub fn queues(&self) -> RelayQueues {
        self.queues.clone()
    }
}

/// Spawns a stage task that cancels `ended` when it finishes, returns or
/// unwinds, so the server can wait for the first stage to end.
fn spawn_stage<T: Send + 'static>(
    ended: &CancellationToken,
    stage: impl std::future::Future<Output = T> + Send + 'static,
) -> JoinHandle<T> {
    let guard = ended.clone().drop_guard();
    tokio::spawn(async move {
        let _guard = guard;
        stage.await
    })
}

/// Runs a stage and records how it ended in the replication status: an error
/// fails the pipeline (and `/ready`), a clean end marks it stopped.
async fn record_end<E: std::fmt::Display>(
    ack: AckHandle,
    stage: &'static str,
    run: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), E> {
    let result = run.await;
    match &result {
        Err(err) => ack.status().set_failed(format!("{stage} failed: {err}")),
        Ok(()) => ack.status().set_stopped(),
    }
    result
}

/// `statement_timeout` of the policy and cache loads (a load streams a
/// whole membership table; minutes are normal, hours are not).
pub const LOAD_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

async fn connect_sql(config: &PgConfig) -> Result<tokio_postgres::Client, PolicyError> {
    Ok(crate::pgconn::connect(&config.with_statement_timeout(LOAD_STATEMENT_TIMEOUT)).await?)
}

/// Logs the plan of every published table and API role (what is mirrored,
/// and why anything is not).
fn log_plans(loaded: &policy::plan::Loaded) {
    for line in loaded.policies.describe(&loaded.caches) {
        tracing::info!(plan = %line, "policy");
    }
}

/// Memory budget of one streamed (protocol 2) transaction in the change
/// stage; at most [`IN_MEMORY_STREAMS`](crate::change::assemble::IN_MEMORY_STREAMS)
/// times this (16 MiB, the hub's default per-transaction budget) is held for
/// all of them together, the rest goes to the spill.
const STREAMED_TX_MEMORY: usize = 4 << 20;

/// First pause when the spill's disk budget refuses a change; it doubles up
/// to [`DISK_WAIT_MAX`].
const DISK_WAIT_START: Duration = Duration::from_millis(100);
/// Longest pause between retries of a change the disk budget refused.
const DISK_WAIT_MAX: Duration = Duration::from_secs(1);
/// Least time between two "disk budget reached" warnings.
const DISK_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Sends a batch to the hub unless empty; false when the hub is gone.
async fn send_batch(output: &mpsc::Sender<Vec<StageEvent>>, batch: &mut Vec<StageEvent>) -> bool {
    if batch.is_empty() {
        return true;
    }
    output.send(std::mem::replace(batch, Vec::with_capacity(BATCH))).await.is_ok()
}

/// Splits a transaction's commit → change-stage time at the walsender's
/// send (the Begin's XLogData): the database's share and the link's
/// (a negative span, one clock behind the other, counts as 0).
fn observe_begin(stats: &HubStats, events: &[TxEvent], send_time: i64) {
    for event in events {
        if let TxEvent::Begin(begin) = event {
            let commit = begin.commit_timestamp.unix_micros();
            let sent = crate::pgoutput::PgTimestamp(send_time).unix_micros();
            let now = crate::replication::status::unix_micros_now();
            stats.walsender_latency.observe_micros(sent.saturating_sub(commit));
            stats.intake_latency.observe_micros(now.saturating_sub(sent));
        }
    }
}

/// Source events → typed, committed changes in batches, plus the membership
/// load at the first start.
///
/// Streamed transactions are held by the assembler (memory up to
/// [`STREAMED_TX_MEMORY`] each, the rest in `spill`); a committed one is
/// drained [`BATCH`] events at a time, each batch sent before the next is
/// read, so a transaction of any size passes in bounded memory. When the
/// spill's disk budget is used up the stage pauses (sending what it has,
/// retrying with a backoff of 0.1 s to 1 s, warning at most every 10 s) and
/// drops nothing: the source channel fills and the slot keeps the WAL.
#[allow(clippy::too_many_arguments)] // the stage's channels and shared state, passed once by Relay::start
async fn change_stage(
    connection: PgConfig,
    publications: Vec<String>,
    policy_poll: Duration,
    cache_budget: usize,
    stats: Arc<HubStats>,
    router: messages::Router,
    spill: Spill,
    mut input: mpsc::Receiver<SourceEvent>,
    output: mpsc::Sender<Vec<StageEvent>>,
    ready: oneshot::Sender<()>,
) -> Result<(), RelayError> {
    let mut ready = Some(ready);
    let mut loaded = false;
    let mut started = false;
    let mut assembler = Assembler::with_spill(spill, STREAMED_TX_MEMORY);
    let mut events = Vec::new();
    let mut last_disk_warning: Option<tokio::time::Instant> = None;
    let mut batch: Vec<StageEvent> = Vec::with_capacity(BATCH);
    let mut follow = Follow::new(connection.clone(), publications.clone(), cache_budget, router);
    // The poller: its own task and session; ends when `notices` drops.
    let (notice_tx, mut notices) = mpsc::channel(1);
    tokio::spawn(policy::watch::poll(connection.clone(), policy_poll, notice_tx).in_current_span());
    loop {
        let event = tokio::select! {
            biased;
            Some(notice) = notices.recv() => {
                // Before the first load there is nothing to refresh (the
                // load reads the catalog after the poll did); after it, the
                // first poll may have missed a change made in between.
                if loaded {
                    if notice == policy::watch::Noticed::Changed {
                        tracing::info!("roles or policies changed (poll)");
                    }
                    follow.due = true;
                }
                if follow.due && !follow.in_tx && loaded {
                    follow.reload(&mut batch).await?;
                    if !send_batch(&output, &mut batch).await {
                        return Ok(());
                    }
                    // That batch may have carried the first load: the
                    // pipeline is ready as after any other send.
                    if started {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                    }
                }
                continue;
            }
            event = input.recv() => match event {
                Some(event) => event,
                None => break,
            },
        };
        match event {
            SourceEvent::Snapshot(lease) => {
                let mut client = connect_sql(&connection).await?;
                let loaded_now = policy::plan::load_with_budget(
                    &mut client,
                    &publications,
                    Some((&lease.name, lease.consistent_point)),
                    cache_budget,
                )
                .await
                .map_err(PolicyError::from)?;
                lease.release();
                log_plans(&loaded_now);
                follow.installed(&loaded_now);
                tracing::info!(rows = loaded_now.at.rows, lsn = %loaded_now.at.lsn, "memberships loaded in the slot's snapshot (policies compiled, caches filled)");
                loaded = true;
                stats.memberships_loaded.store(true, Ordering::Relaxed);
                batch.push(StageEvent::Policies(Box::new(loaded_now)));
            }
            SourceEvent::Started { .. } => {
                started = true;
                assembler.reset();
                follow.in_tx = false;
                follow.router.reset();
                batch.push(StageEvent::Reset);
                if !loaded {
                    let mut client = connect_sql(&connection).await?;
                    let loaded_now = policy::plan::load_with_budget(&mut client, &publications, None, cache_budget)
                        .await
                        .map_err(PolicyError::from)?;
                    log_plans(&loaded_now);
                    follow.installed(&loaded_now);
                    tracing::info!(rows = loaded_now.at.rows, lsn = %loaded_now.at.lsn, "memberships loaded; catch-up window until lsn (policies compiled, caches filled)");
                    loaded = true;
                    stats.memberships_loaded.store(true, Ordering::Relaxed);
                    batch.push(StageEvent::Policies(Box::new(loaded_now)));
                }
            }
            SourceEvent::Wal(wal_batch) => {
                for wal in wal_batch {
                    let WalEvent::XLogData { data, send_time, .. } = wal else { continue };
                    let from = events.len();
                    let mut result = assembler.push(&data, &mut events);
                    observe_begin(&stats, events.get(from..).unwrap_or_default(), send_time);
                    let mut wait = DISK_WAIT_START;
                    while let Err(err) = result {
                        if !err.is_disk_budget() {
                            tracing::error!(error = %err, "change stage stopped");
                            return Err(err.into());
                        }
                        if last_disk_warning.is_none_or(|at| at.elapsed() >= DISK_WARN_INTERVAL) {
                            tracing::warn!(error = %err, "spill disk budget reached; pausing replication until it frees");
                            last_disk_warning = Some(tokio::time::Instant::now());
                        }
                        // Hand on what is done, then pause. Shutdown stops the hub
                        // (closing `output`), and the source's end closes `input`.
                        follow.forward(&mut events, &mut batch).await?;
                        if !send_batch(&output, &mut batch).await || output.is_closed() || input.is_closed() {
                            return Ok(());
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(DISK_WAIT_MAX);
                        result = assembler.resume();
                    }
                    follow.forward(&mut events, &mut batch).await?;
                    while assembler.has_pending() {
                        if batch.len() >= BATCH && !send_batch(&output, &mut batch).await {
                            return Ok(());
                        }
                        if let Err(err) = assembler.drain_pending(&mut events, BATCH.saturating_sub(batch.len()).max(1))
                        {
                            tracing::error!(error = %err, "change stage stopped");
                            return Err(err.into());
                        }
                        follow.forward(&mut events, &mut batch).await?;
                    }
                    // A source batch may hold many transactions: the hub's
                    // batches stay at most about BATCH events all the same.
                    if batch.len() >= BATCH && !send_batch(&output, &mut batch).await {
                        return Ok(());
                    }
                }
            }
        }
        if !batch.is_empty() && (batch.len() >= BATCH || input.is_empty()) {
            if !send_batch(&output, &mut batch).await {
                return Ok(());
            }
            if loaded && started {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
    }
    Ok(())
}

/// Attempts at reading the policies again before the stage gives up (the
/// plans in force would be stale: failing is safer than judging by them).
const RELOAD_ATTEMPTS: u32 = 3;

/// How long a reload reads again (2 ms apart at first, then up to 100 ms)
/// while the catalog does not yet show the policy DDL whose commit the
/// stream delivered; past it the reload fails rather than install plans
/// that may be stale (the relay stops, and a restart reads afresh).
const RELOAD_BEHIND_DEADLINE: Duration = Duration::from_secs(10);

/// The change stage's part in following policy changes (see
/// [`crate::policy::watch`]): notices `walcast-policy` messages and poll
/// differences, and reloads at transaction boundaries.
struct Follow {
    connection: PgConfig,
    publications: Vec<String>,
    /// Specs of the caches in force (the last load sent), which a reload
    /// does not read again: the hub keeps their data.
    known: Vec<policy::compile::CacheSpec>,
    /// The SQL session for reloads (made again after an error).
    client: Option<tokio_postgres::Client>,
    /// The membership caches' memory budget (for new caches).
    budget: usize,
    /// A reload is due at the next transaction boundary.
    due: bool,
    /// The highest count of policy DDL seen in the stream's `walcast-policy`
    /// messages (see `sql/walcast/`): a reload reading a higher count read a
    /// catalog ahead of the stream.
    seen_epoch: Option<i64>,
    /// Between a forwarded Begin and its Commit.
    in_tx: bool,
    /// Takes `realtime` changes out before anything is forwarded.
    router: messages::Router,
}

impl Follow {
    fn new(connection: PgConfig, publications: Vec<String>, budget: usize, router: messages::Router) -> Follow {
        Follow {
            connection,
            publications,
            known: Vec::new(),
            client: None,
            budget,
            due: false,
            seen_epoch: None,
            in_tx: false,
            router,
        }
    }

    /// A load was sent to the hub: its caches are the ones in force.
    fn installed(&mut self, loaded: &policy::plan::Loaded) {
        self.known = loaded.caches.specs().to_vec();
    }

    /// The reload's session: like the first load's, without a statement
    /// timeout (a large membership table takes what it takes).
    async fn client(&mut self) -> Result<&mut tokio_postgres::Client, PolicyError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect_sql(&self.connection).await?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Moves `events` into `batch`; after the Commit of a transaction that
    /// carried a `walcast-policy` message (or with a poll's reload due),
    /// reads the policies again and appends the update.
    async fn forward(&mut self, events: &mut Vec<TxEvent>, batch: &mut Vec<StageEvent>) -> Result<(), RelayError> {
        // First: a message is handed on before its Commit can reach the hub.
        self.router.route(events).await;
        for event in events.drain(..) {
            let commit = match &event {
                TxEvent::Begin(_) => {
                    self.in_tx = true;
                    false
                }
                TxEvent::Message { prefix, content, .. } if prefix == policy::watch::MESSAGE_PREFIX => {
                    self.due = true;
                    if let Some(epoch) = policy::watch::message_epoch(content) {
                        self.seen_epoch = Some(self.seen_epoch.map_or(epoch, |e| e.max(epoch)));
                    }
                    false
                }
                TxEvent::Commit(_) => {
                    self.in_tx = false;
                    true
                }
                _ => false,
            };
            batch.push(StageEvent::Tx(event));
            if commit && self.due {
                self.reload(batch).await?;
            }
        }
        Ok(())
    }

    /// Reads the policies again (current state) and appends the update.
    async fn reload(&mut self, batch: &mut Vec<StageEvent>) -> Result<(), RelayError> {
        self.due = false;
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        let (loaded, epoch) = loop {
            let (loaded, epoch) = self.read_policies().await?;
            // Read behind: the stream may deliver a transaction's commit a
            // moment before PostgreSQL shows it to new snapshots (the commit
            // record is flushed, and sent, before the committing backend
            // leaves the proc array). A catalog read then misses the DDL the
            // stream just reported — and would stay in force until the next
            // change. The DDL's own count, not yet in the catalog, tells.
            let behind = matches!((self.seen_epoch, epoch), (Some(seen), Some(read)) if read < seen);
            if !behind {
                break (loaded, epoch);
            }
            if started.elapsed() >= RELOAD_BEHIND_DEADLINE {
                // Never install plans that may predate the DDL (a dropped
                // permissive policy would stay in force): stop instead.
                return Err(RelayError::PolicyCatalogBehind {
                    seen: self.seen_epoch.unwrap_or_default(),
                    read: epoch,
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        };
        // Read ahead: the catalog includes DDL the stream has not reached
        // (walcast is behind); judged as catch-up until a reload that is not.
        let ahead = matches!((self.seen_epoch, epoch), (Some(seen), Some(read)) if read > seen);
        log_plans(&loaded);
        tracing::info!(rows = loaded.at.rows, lsn = %loaded.at.lsn, ahead, "policies changed; read again");
        self.installed(&loaded);
        batch.push(StageEvent::PolicyUpdate { loaded: Box::new(loaded), ahead });
        Ok(())
    }

    /// The policies and caches read now, with the count of policy DDL in
    /// the catalog read (transient errors retried).
    async fn read_policies(&mut self) -> Result<(policy::plan::Loaded, Option<i64>), RelayError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let publications = self.publications.clone();
            let known = self.known.clone();
            let budget = self.budget;
            let result = match self.client().await {
                Ok(client) => {
                    policy::plan::reload(client, &publications, &known, budget).await.map_err(PolicyError::from)
                }
                Err(err) => Err(err),
            };
            match result {
                Ok(read) => return Ok(read),
                Err(err) if err.is_transient() && attempt < RELOAD_ATTEMPTS => {
                    tracing::warn!(error = %err, attempt, "reading the policies again failed; retrying");
                    self.client = None;
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(err) => {
                    tracing::error!(error = %err, "reading the changed policies failed; stopping rather than judging by stale ones");
                    return Err(err.into());
                }
            }
        }
    }
}
