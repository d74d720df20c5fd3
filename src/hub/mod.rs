//! The hub: judges every committed change against the membership cache, the
//! policy rules and each subscriber's bindings, serializes each distinct
//! frame once, and queues the shared bytes into per-connection outboxes.
//!
//! ```text
//!  change stage ──Vec<StageEvent> (bounded)──▶ hub task ──Bytes──▶ Outbox per connection ──flush, once per batch──▶ sockets
//!                                                   │               (the hub, or flusher tasks for large batches;
//!                                                   │                a full socket is left to its writer task)
//!  realtime layer ──Control (bounded)──────────▶    │ (join, leave, re-auth, disconnect)
//!                                                   └──ack(end_lsn)──▶ replication source
//! ```
//!
//! One task owns the subscription registry and is the only writer of the
//! membership cache, so ordering is simple: control messages are handled
//! before data (biased), and transactions strictly in commit order.
//!
//! # Per transaction
//!
//! 1. Changes are collected until Commit in a [`ChangeLog`](crate::spill::ChangeLog): in memory up to
//!    [`HubConfig::max_tx_bytes`], the rest spilled to disk (see
//!    [`crate::spill`]). Nothing of a transaction is delivered before its
//!    Commit is known, whatever its size.
//! 2. At Commit, the transaction's membership changes are applied to the
//!    cache first: every change is judged with the memberships *as of its
//!    commit*, as PostgreSQL's RLS would judge a read right after it.
//! 3. Per change and subscribed role, the table's plan
//!    ([`crate::policy::plan`]) names the candidates through the registry's
//!    indexes (viewers by claim, members of the row's group, or everyone of
//!    the role); the compiled predicate judges each candidate on the old and
//!    new row, giving its event (see [`crate::policy::EventType::transition`]),
//!    narrowed to subscriptions whose bindings match schema, table, event and
//!    filter. The `data` JSON is built once per (event, column mask); each
//!    frame once per (vsn, topic, ids, event, mask); subscribers share the
//!    `Bytes`.
//! 4. The end LSN is acknowledged to the source once everything is queued;
//!    a transaction that queued frames records its commit → queued latency in
//!    [`HubStats::delivery_latency`], and the open/handled commit times feed
//!    the replication lag (see [`crate::replication::status`]).
//!
//! # Memory and slow readers
//!
//! Every outbox charges one global [`OutboxBudget`]
//! ([`HubConfig::outbox_budget`]). The fan-out goes change by change and
//! checks the budget before each: when it is used up, the hub *pauses* (it
//! stops reading the change stage, so back-pressure reaches the slot, which
//! keeps the WAL; control requests are still served). Readers that keep
//! reading release memory and the fan-out resumes, so a reader entitled to a
//! million rows of one transaction receives all of them. The fan-out stops
//! when the budget is full and resumes once it is under 3/4 (so it works in
//! batches, not frame by frame). A pause — no progress at all — lasts at most
//! [`HubConfig::max_pause`]; then the furthest-behind reader is closed
//! (1013, with the reason) and the pause starts over. Independently, a reader
//! whose oldest unwritten frame is older than [`HubConfig::max_reader_lag`]
//! is closed (1013). Pauses and closes are counted in [`HubStats`].
//!
//! # Logs
//!
//! At `debug` (target `walcast::hub`, e.g. `RUST_LOG=info,walcast::hub=debug`)
//! the hub logs one event per transaction, before acknowledging it:
//! `"transaction handled"` with `xid`, `commit_lsn`, `end_lsn`, `changes` (row
//! changes) and `catch_up`, or `"transaction already handled; skipped"` with
//! `xid`, `commit_lsn` and `end_lsn` for a duplicate after a reconnect. Never
//! row values. With `select txid_current()` in a writing transaction, this
//! tells which transactions walcast has handled (xids are the 32-bit ones,
//! `txid_current() % 2^32`).
//!
//! # Resume
//!
//! After a replication reconnect, transactions already handled (commit LSN
//! below the last handled end LSN) are skipped, so clients see no
//! duplicates: a transaction is delivered whole at its commit and
//! acknowledged after, so a reconnect anywhere inside it re-sends it whole
//! and it is skipped whole. After a restart with an existing slot, transactions committed
//! before the membership load point are the catch-up window (see
//! [`crate::policy::caches`]): their membership changes are applied,
//! their row changes go to `service_role` subscribers only.

mod database;
mod flow;
pub mod frame;
pub mod latency;
pub mod registry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use crate::outbox::{self, CloseReason, Outbox, OutboxBudget, OutboxLimits, PushError, DEFAULT_OUTBOX_BUDGET};
pub use frame::Vsn;

use std::time::{Duration, Instant};

use crate::change::{Change, Datum, RelationInfo, Row, TxEvent};
use crate::lsn::Lsn;
use crate::policy::fallback::{Fallback, FallbackStats, Verdict};
use crate::policy::plan::Loaded;
use crate::policy::predicate::{CacheId, CastError, ClaimPath, ColType, Context, Scalar};
use crate::policy::{Access, Caches, EventType, Filter, Index, PolicySet, TablePlan, Viewer};
use crate::replication::AckHandle;
use crate::spill::{Spill, SpillError, SpillStats};
use flow::{Delivery, OpenTx};
use latency::LatencyHistogram;
use registry::{Registry, Slot};

/// Identifies one WebSocket connection.
pub type ConnId = u64;

/// What the change stage sends the hub.
#[derive(Debug, Clone)]
pub enum StageEvent {
    /// The policies were (re)loaded with their caches: transactions
    /// committing before `at.lsn` are the catch-up window unless the load
    /// was exact.
    Policies(Box<Loaded>),
    /// The policies changed while walcast runs and were read again (after
    /// the transaction that changed them, or after a poll saw a change):
    /// plans are replaced for every later transaction; caches whose spec is
    /// unchanged keep their data, new ones are exact from `at.lsn` on (see
    /// [`Caches::adopt`]).
    PolicyUpdate {
        /// The policies and the new caches.
        loaded: Box<Loaded>,
        /// The catalog read already includes policy DDL the stream has not
        /// reached: every transaction is judged as in the catch-up window
        /// until an update that is not ahead.
        ahead: bool,
    },
    /// A cluster edge starts from a source's snapshot: the policy state as
    /// the source's hub would hold it after the transaction ending at
    /// `handled` (see [`crate::scaleout`]).
    Restore {
        /// The policies and caches.
        loaded: Box<Loaded>,
        /// As [`StageEvent::PolicyUpdate`]'s.
        ahead: bool,
        /// End LSN of the last transaction the caches include: earlier
        /// transactions read again from the stream are skipped.
        handled: Lsn,
    },
    /// Close every subscribed connection with the reason (a cluster edge
    /// that missed changes the stream no longer holds: its clients reload
    /// and join again).
    CloseAll(CloseReason),
    /// The replication connection restarted: forget any partial transaction.
    Reset,
    /// A transaction boundary or change.
    Tx(TxEvent),
}

/// Which events a binding wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventMatch {
    /// `*`.
    All,
    /// One event type.
    Only(EventType),
}

/// One postgres_changes binding of a channel.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The id echoed in the join reply and sent in `ids`.
    pub id: u32,
    /// Schema (`None` = any).
    pub schema: Option<String>,
    /// Table (`None` = every table of the schema).
    pub table: Option<String>,
    /// Events wanted.
    pub event: EventMatch,
    /// Row filter.
    pub filter: Filter,
    /// `select`: the columns wanted (the key columns are always sent);
    /// `None` = all.
    pub select: Option<Vec<String>>,
}

impl Binding {
    /// Whether this binding wants `event` on `relation` for `row`.
    fn wants(&self, relation: &RelationInfo, event: EventType, row: Option<&crate::change::Row>) -> bool {
        if let EventMatch::Only(e) = self.event {
            if e != event {
                return false;
            }
        }
        if self.schema.as_deref().is_some_and(|s| s != relation.schema) {
            return false;
        }
        if self.table.as_deref().is_some_and(|t| t != relation.table) {
            return false;
        }
        self.filter.is_empty() || row.is_some_and(|row| self.filter.matches_row(relation, row))
    }
}

/// A channel's subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The connection.
    pub conn: ConnId,
    /// The channel topic (`realtime:…`).
    pub topic: String,
    /// The socket's serializer.
    pub vsn: Vsn,
    /// Who the channel's token says it is.
    pub viewer: Viewer,
    /// Bindings, in join order.
    pub bindings: Vec<Binding>,
    /// The connection's outbox.
    pub outbox: Arc<Outbox>,
    /// Queued once the subscription is live ("Subscribed to PostgreSQL").
    pub on_live: Option<Bytes>,
    /// Queued (once per subscription) when changes are withheld from it
    /// because the database-evaluation queue is full.
    pub on_withheld: Option<Bytes>,
}

/// Requests from the realtime layer.
#[derive(Debug)]
pub enum Control {
    /// Add a subscription, replacing the connection's one on the same topic.
    Join(Subscription),
    /// Remove a connection's subscription on a topic.
    Leave {
        /// The connection.
        conn: ConnId,
        /// The topic.
        topic: String,
    },
    /// The channel's token changed: new viewer; `on_live` is queued after.
    Reauth {
        /// The connection.
        conn: ConnId,
        /// The topic.
        topic: String,
        /// The new viewer.
        viewer: Viewer,
        /// Queued once the change is live.
        on_live: Option<Bytes>,
    },
    /// The connection is gone: remove all its subscriptions.
    Disconnect {
        /// The connection.
        conn: ConnId,
    },
    /// Close every subscribed connection with `reason` (a cluster edge
    /// that lost its stream stops serving data it can no longer keep
    /// current).
    CloseAll(CloseReason),
}

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Most change bytes (as [`crate::change::Change::byte_size`] counts
    /// them) held in memory per transaction; the rest is spilled to disk.
    pub max_tx_bytes: usize,
    /// Most bytes all outboxes together hold (queued and being written).
    pub outbox_budget: usize,
    /// A reader whose oldest unwritten frame is older than this is closed.
    pub max_reader_lag: Duration,
    /// The longest the fan-out pauses on a full outbox budget before the
    /// furthest-behind reader is closed.
    pub max_pause: Duration,
}

impl Default for HubConfig {
    /// 16 MiB per transaction in memory (about 40,000 `orders` rows), a
    /// 512 MiB outbox budget, 30 s reader lag, 10 s pauses.
    fn default() -> Self {
        HubConfig {
            max_tx_bytes: 16 << 20,
            outbox_budget: DEFAULT_OUTBOX_BUDGET,
            max_reader_lag: Duration::from_secs(30),
            max_pause: Duration::from_secs(10),
        }
    }
}

/// Counters (monotonic unless noted), readable while the hub runs.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Transactions handled.
    pub transactions: AtomicU64,
    /// Row changes judged.
    pub changes: AtomicU64,
    /// Frames queued into outboxes.
    pub deliveries: AtomicU64,
    /// Distinct frames serialized.
    pub frames_built: AtomicU64,
    /// Connections the hub closed as slow consumers (reader lag or furthest
    /// behind; the session counts write stalls and reply floods).
    pub slow_consumers: AtomicU64,
    /// Of those, closed for reader lag.
    pub lagging_readers_closed: AtomicU64,
    /// Of those, closed as the furthest behind after a pause.
    pub furthest_behind_closed: AtomicU64,
    /// Times the fan-out paused on a full outbox budget.
    pub pauses: AtomicU64,
    /// Microseconds spent paused (finished pauses).
    pub paused_micros: AtomicU64,
    /// Paused now (gauge).
    pub paused: AtomicBool,
    /// Times the hub waited for the spill disk budget.
    pub spill_waits: AtomicU64,
    /// Transactions skipped as already handled (after a reconnect).
    pub duplicate_transactions: AtomicU64,
    /// Transactions in the catch-up window.
    pub catch_up_transactions: AtomicU64,
    /// The transaction being handled is in the catch-up window: tables
    /// whose policies read memberships are database-evaluated (gauge).
    pub in_catch_up: AtomicBool,
    /// Policies read again at run time (a `walcast-policy` message or a
    /// poll that saw a change).
    pub policy_reloads: AtomicU64,
    /// Transactions that outgrew memory and were spilled to disk.
    pub spilled_transactions: AtomicU64,
    /// Current subscriptions (gauge).
    pub subscriptions: AtomicU64,
    /// Last end LSN handled (gauge).
    pub handled_lsn: AtomicU64,
    /// Changes withheld from a role whose policies for the table need the
    /// database but could not be checked (walcast may not `SET ROLE`, or
    /// the evaluation queue was full).
    pub database_denied: AtomicU64,
    /// Candidate viewers judged (index hits; the fan-out's work).
    pub candidates: AtomicU64,
    /// Row filters evaluated (the bindings with a filter of the candidates
    /// a change reached; the filter index keeps this to the subscribers a
    /// change's values may match, plus unindexed filters).
    pub filter_evaluations: AtomicU64,
    /// Rows in the membership caches (gauge).
    pub cache_rows: AtomicU64,
    /// Approximate bytes of the membership caches (gauge).
    pub cache_bytes: AtomicU64,
    /// Database evaluation (tables whose policies PostgreSQL judges).
    pub database: Arc<FallbackStats>,
    /// Per membership cache: description, rows, bytes, over budget.
    pub caches: std::sync::Mutex<Vec<(String, usize, usize, bool)>>,
    /// Commit → queued latency of each transaction that queued frames: the
    /// commit timestamp (the database's clock) against the wall clock once
    /// its last frame was queued.
    pub delivery_latency: LatencyHistogram,
    /// Commit → the walsender sent the transaction's Begin (both the
    /// database's clock: its commit timestamp against the XLogData's send
    /// time), per transaction the change stage reads: the database's share.
    pub walsender_latency: LatencyHistogram,
    /// The walsender sent the transaction's Begin (database clock) → the
    /// change stage decoded it (wall clock): the link, the source and the
    /// source queue.
    pub intake_latency: LatencyHistogram,
    /// The policies and caches were loaded (set by the change stage at the
    /// load, and by the hub when it sees [`StageEvent::Policies`]).
    pub memberships_loaded: AtomicBool,
}

/// Errors that stop the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The membership table does not match the configuration (definite).
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// A spill file failed (definite).
    #[error(transparent)]
    Spill(#[from] SpillError),
}

/// Handle for the realtime layer.
#[derive(Debug, Clone)]
pub struct HubHandle {
    control: mpsc::Sender<Control>,
    /// Counters.
    pub stats: Arc<HubStats>,
    /// The policies in force (replaced by the hub at each load).
    pub policies: Arc<RwLock<Arc<PolicySet>>>,
    /// The global outbox budget every connection's outbox charges.
    pub budget: Arc<OutboxBudget>,
    /// Spill counters (disk bytes).
    pub spill: Arc<SpillStats>,
}

impl HubHandle {
    /// Sends a control request (waits only for room in the control queue).
    ///
    /// # Errors
    /// When the hub has stopped.
    pub async fn send(&self, control: Control) -> Result<(), Control> {
        self.control.send(control).await.map_err(|e| e.0)
    }

    /// Whether the hub has stopped.
    pub fn is_closed(&self) -> bool {
        self.control.is_closed()
    }

    /// Control requests queued now (cheap: the channel's used capacity).
    pub fn control_queue_len(&self) -> usize {
        self.control.max_capacity() - self.control.capacity()
    }

    /// The policies in force now.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.read().map(|p| Arc::clone(&p)).unwrap_or_default()
    }

    /// Capacity of the control queue.
    pub fn control_queue_capacity(&self) -> usize {
        self.control.max_capacity()
    }

    /// Sends a control request without waiting.
    ///
    /// # Errors
    /// When the queue is full or the hub has stopped.
    #[allow(clippy::result_large_err)] // the request comes back whole to be retried; no allocation to box it
    pub fn try_send(&self, control: Control) -> Result<(), Control> {
        self.control.try_send(control).map_err(|e| match e {
            mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
        })
    }
}

/// Creates a hub; run [`Hub::run`] on a task and give the handle to the
/// realtime layer. Transactions that outgrow memory go to `spill`.
pub fn hub(config: HubConfig, ack: AckHandle, spill: Spill) -> (Hub, HubHandle) {
    let (control_tx, control_rx) = mpsc::channel(1024);
    let stats = Arc::new(HubStats::default());
    let budget = OutboxBudget::new(config.outbox_budget);
    let handle = HubHandle {
        control: control_tx,
        stats: Arc::clone(&stats),
        policies: Arc::new(RwLock::new(Arc::new(PolicySet::default()))),
        budget: Arc::clone(&budget),
        spill: Arc::clone(spill.stats()),
    };
    let core = Core::new(config, Arc::clone(&handle.policies), ack, stats, budget, spill);
    (Hub { core, control: control_rx, verdicts: None }, handle)
}

/// The hub task's state.
#[derive(Debug)]
pub struct Hub {
    core: Core,
    control: mpsc::Receiver<Control>,
    verdicts: Option<mpsc::Receiver<Verdict>>,
}

impl Hub {
    /// Lets the hub submit checks of database-evaluated tables to
    /// `fallback` and receive their verdicts on `verdicts` (without it,
    /// those tables are withheld).
    pub fn attach_fallback(&mut self, fallback: Fallback, verdicts: mpsc::Receiver<Verdict>) {
        self.core.fallback = Some(fallback);
        self.verdicts = Some(verdicts);
    }

    /// Runs until `input` ends or `shutdown`; then closes every outbox with
    /// [`CloseReason::shutdown`].
    ///
    /// # Errors
    /// A definite policy or spill error.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<StageEvent>>,
        shutdown: CancellationToken,
    ) -> Result<(), HubError> {
        let budget = Arc::clone(&self.core.budget);
        // One flusher per worker thread: a large batch's writes run on all
        // of them while the hub goes on.
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        self.core.flushers = crate::outbox::flusher::Flushers::start(if workers > 1 { workers } else { 0 });
        let mut pending = Vec::new().into_iter();
        let mut verdicts = self.verdicts.take();
        let mut tick = tokio::time::interval(READER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let result = loop {
            if self.core.busy() {
                self.core.flush();
                // Paused: on the outbox budget (until readers release memory)
                // or on the spill disk budget (retried every second).
                let wait = if self.core.spill_blocked.is_some() { SPILL_RETRY } else { PAUSE_RECHECK };
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break Ok(()),
                    Some(control) = self.control.recv() => self.core.control(control),
                    _ = tick.tick() => self.core.check_readers(),
                    () = budget.wait_for_room(wait) => {}
                }
                if let Err(err) = self.core.resume() {
                    tracing::error!(error = %err, "hub stopped");
                    break Err(err);
                }
                continue;
            }
            if let Some(event) = pending.next() {
                if let Err(err) = self.core.stage(event) {
                    tracing::error!(error = %err, "hub stopped");
                    break Err(err);
                }
                continue;
            }
            // The batch is handled: its frames go out, one write per socket.
            self.core.flush();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some(control) = self.control.recv() => self.core.control(control),
                _ = tick.tick() => self.core.check_readers(),
                // Verdicts only between transactions' fan-outs, never while
                // paused: their frames charge the same outbox budget.
                Some(verdict) = next_verdict(&mut verdicts) => self.core.verdict(verdict),
                batch = input.recv() => {
                    let Some(batch) = batch else { break Ok(()) };
                    pending = batch.into_iter();
                }
            }
        };
        self.core.flush();
        self.core.close_all(CloseReason::shutdown());
        result
    }

    /// The synchronous core, for benchmarks and tests that drive the hub
    /// without tasks.
    pub fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

/// The next verdict, or never without a fallback.
async fn next_verdict(verdicts: &mut Option<mpsc::Receiver<Verdict>>) -> Option<Verdict> {
    match verdicts {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// How often readers' lag is checked.
const READER_CHECK: Duration = Duration::from_secs(1);
/// How long a paused fan-out waits before looking again without a wake-up.
const PAUSE_RECHECK: Duration = Duration::from_millis(250);
/// How often a push refused by the spill disk budget is retried.
const SPILL_RETRY: Duration = Duration::from_secs(1);

/// How a relation's columns line up with a plan's (the WAL's Relation
/// message may carry a column list, or columns in another order).
#[derive(Debug)]
struct ColumnMap {
    /// Plan column → relation column.
    to_rel: Vec<Option<usize>>,
    /// Relation column → plan column.
    to_plan: Vec<Option<usize>>,
    /// Relation columns in the table's primary key (sent whatever a
    /// binding's `select` says; pgoutput's key flag marks every column
    /// under REPLICA IDENTITY FULL, so it cannot serve).
    primary_key: Vec<bool>,
}

/// One row image judged for one viewer.
struct Judge<'a> {
    row: Option<&'a Row>,
    map: &'a ColumnMap,
    sub: &'a registry::Sub,
    claims: &'a [(ClaimPath, ColType)],
    caches: &'a Caches,
}

const ABSENT: Datum = Datum::Absent;

impl Context for Judge<'_> {
    fn column(&self, index: usize) -> &Datum {
        match (self.row, self.map.to_rel.get(index).copied().flatten()) {
            (Some(row), Some(i)) => row.0.get(i).unwrap_or(&ABSENT),
            _ => &ABSENT,
        }
    }
    fn claims(&self) -> &serde_json::Value {
        &self.sub.viewer.claims
    }
    fn claim(&self, path: &ClaimPath, ty: ColType) -> Result<Option<Scalar>, CastError> {
        // Resolved at join for indexed claims: no JSON walk per change.
        match self.sub.resolved_claim(self.claims, path, ty) {
            Some(v) => v.clone(),
            None => path.value(self.claims(), ty),
        }
    }
    fn member(&self, cache: CacheId, outer: Option<&Scalar>, user: &Scalar) -> bool {
        self.caches.member(cache, outer, user)
    }
    fn user_rows(&self, cache: CacheId, user: &Scalar) -> (bool, bool) {
        self.caches.user_rows(cache, user)
    }
}

/// The hub's synchronous core: registry, transaction handling, fan-out.
#[derive(Debug)]
pub struct Core {
    config: HubConfig,
    policies: Arc<PolicySet>,
    shared_policies: Arc<RwLock<Arc<PolicySet>>>,
    caches: Caches,
    ack: AckHandle,
    stats: Arc<HubStats>,
    registry: Registry,
    /// Transactions committing before this are the catch-up window.
    judge_from: Lsn,
    /// The policies in force were read ahead of the stream (see
    /// [`StageEvent::PolicyUpdate`]): every transaction is catch-up.
    policies_ahead: bool,
    /// End LSN of the last transaction handled.
    handled: Lsn,
    open: Option<OpenTx>,
    skipping: bool,
    budget: Arc<OutboxBudget>,
    spill: Spill,
    /// A change the spill disk budget refused, to push again.
    spill_blocked: Option<Change>,
    delivering: Option<Delivery>,
    /// When the current pause on the outbox budget started; it ends when
    /// the fan-out makes progress again.
    paused_since: Option<Instant>,
    columns_cache: HashMap<u32, (Arc<RelationInfo>, Bytes)>,
    maps: HashMap<u32, (Arc<RelationInfo>, Arc<ColumnMap>)>,
    frames: HashMap<Vec<u8>, Bytes>,
    data: HashMap<(u8, u16), Bytes>,
    key: Vec<u8>,
    ids: Vec<u32>,
    /// Scratch: the matching bindings with a `select` list, per delivery.
    selects: Vec<usize>,
    /// Scratch: candidate slots per change and role.
    candidates: Vec<Slot>,
    /// Database evaluation, when attached.
    fallback: Option<Fallback>,
    /// Checks submitted, by id, until their verdicts come.
    jobs: HashMap<u64, database::Job>,
    next_job: u64,
    /// Sequence of the transaction being delivered, and its checks.
    tx_seq: u64,
    tx_checks: usize,
    /// Acknowledgements waiting for checks.
    held: database::HeldAcks,
    doomed: Vec<ConnId>,
    /// Outboxes with frames queued since the last [`Core::flush`]: written
    /// once per batch, one `writev` per socket, from this task.
    to_flush: Vec<Arc<Outbox>>,
    /// Who writes them: the hub alone, or flusher tasks too (in [`Hub::run`]).
    flushers: crate::outbox::flusher::Flushers,
}

impl Core {
    fn new(
        config: HubConfig,
        shared_policies: Arc<RwLock<Arc<PolicySet>>>,
        ack: AckHandle,
        stats: Arc<HubStats>,
        budget: Arc<OutboxBudget>,
        spill: Spill,
    ) -> Core {
        Core {
            budget,
            spill,
            spill_blocked: None,
            delivering: None,
            paused_since: None,
            config,
            policies: Arc::new(PolicySet::default()),
            shared_policies,
            caches: Caches::default(),
            ack,
            stats,
            registry: Registry::default(),
            judge_from: Lsn::ZERO,
            policies_ahead: false,
            handled: Lsn::ZERO,
            open: None,
            skipping: false,
            columns_cache: HashMap::new(),
            maps: HashMap::new(),
            frames: HashMap::new(),
            data: HashMap::new(),
            key: Vec::new(),
            ids: Vec::new(),
            selects: Vec::new(),
            candidates: Vec::new(),
            fallback: None,
            jobs: HashMap::new(),
            next_job: 0,
            tx_seq: 0,
            tx_checks: 0,
            held: database::HeldAcks::default(),
            doomed: Vec::new(),
            to_flush: Vec::new(),
            flushers: crate::outbox::flusher::Flushers::inline(),
        }
    }

    /// Installs loaded policies and caches (the change stage's load).
    fn install(&mut self, loaded: Loaded) {
        self.judge_from = if loaded.at.exact { Lsn::ZERO } else { loaded.at.lsn };
        self.replace_policies(loaded);
    }

    /// Installs policies read again at run time: caches whose spec is
    /// unchanged keep the data the hub maintained from the WAL; new caches
    /// make the tables that read them catch-up until the stream passes their
    /// load (see [`Caches::adopt`]). Between transactions only.
    fn update(&mut self, mut loaded: Loaded, ahead: bool) {
        let old = std::mem::take(&mut self.caches);
        let (kept, fresh) = loaded.caches.adopt(old, loaded.at);
        self.policies_ahead = ahead;
        self.stats.policy_reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(caches_kept = kept, caches_loaded = fresh, lsn = %loaded.at.lsn, ahead, "policies reloaded");
        self.replace_policies(loaded);
    }

    fn replace_policies(&mut self, loaded: Loaded) {
        self.registry.set_claims(loaded.policies.indexed_claims());
        if let Ok(mut shared) = self.shared_policies.write() {
            *shared = Arc::clone(&loaded.policies);
        }
        self.policies = loaded.policies;
        self.caches = loaded.caches;
        self.maps.clear();
        self.cache_gauges();
        self.stats.memberships_loaded.store(true, Ordering::Relaxed);
    }

    fn cache_gauges(&self) {
        self.stats.cache_rows.store(self.caches.rows() as u64, Ordering::Relaxed);
        self.stats.cache_bytes.store(self.caches.bytes() as u64, Ordering::Relaxed);
        if let Ok(mut summary) = self.stats.caches.lock() {
            *summary = self.caches.summary();
        }
    }

    /// Writes the frames queued since the last flush: each outbox once, as
    /// much as its socket takes without waiting (the rest goes to that
    /// socket's writer task). Called once a batch of events is handled,
    /// before the hub waits, and every few hundred changes of a large
    /// transaction.
    pub fn flush(&mut self) {
        self.flushers.flush(&mut self.to_flush);
    }

    /// Handles one control request.
    pub fn control(&mut self, control: Control) {
        match control {
            Control::Join(sub) => {
                let on_live = sub.on_live.clone();
                let outbox = Arc::clone(&sub.outbox);
                self.registry.insert(sub);
                if let Some(frame) = on_live {
                    let _ = outbox.push(frame);
                }
            }
            Control::Leave { conn, topic } => {
                self.registry.remove(conn, &topic);
            }
            Control::Reauth { conn, topic, viewer, on_live } => {
                let Some(outbox) = self.registry.reauth(conn, &topic, viewer) else { return };
                if let Some(frame) = on_live {
                    let _ = outbox.push(frame);
                }
            }
            Control::Disconnect { conn } => self.remove_conn(conn),
            Control::CloseAll(reason) => self.close_all(reason),
        }
        self.stats.subscriptions.store(self.registry.len() as u64, Ordering::Relaxed);
    }

    fn remove_conn(&mut self, conn: ConnId) {
        self.registry.remove_conn(conn);
        self.stats.subscriptions.store(self.registry.len() as u64, Ordering::Relaxed);
    }

    /// Closes every outbox (shutdown).
    pub fn close_all(&mut self, reason: CloseReason) {
        for (_, sub) in self.registry.iter() {
            sub.outbox.close(reason.clone());
        }
    }

    /// Drops the subscriptions of connections closed during this step.
    fn reap(&mut self) {
        while let Some(conn) = self.doomed.pop() {
            // Counted where the close was decided (reader checks here, write
            // stalls and reply floods in the session).
            self.remove_conn(conn);
        }
    }

    fn columns_json(&mut self, relation: &Arc<RelationInfo>) -> Bytes {
        if let Some((rel, bytes)) = self.columns_cache.get(&relation.oid) {
            if Arc::ptr_eq(rel, relation) || **rel == **relation {
                return bytes.clone();
            }
        }
        let bytes = frame::columns_json(relation, None);
        self.columns_cache.insert(relation.oid, (Arc::clone(relation), bytes.clone()));
        bytes
    }

    fn column_map(&mut self, plan: &TablePlan, relation: &Arc<RelationInfo>) -> Arc<ColumnMap> {
        if let Some((rel, map)) = self.maps.get(&relation.oid) {
            if Arc::ptr_eq(rel, relation) || **rel == **relation {
                return Arc::clone(map);
            }
        }
        let to_rel: Vec<Option<usize>> = plan.columns.iter().map(|c| relation.column_index(c)).collect();
        let to_plan: Vec<Option<usize>> =
            relation.columns.iter().map(|c| plan.columns.iter().position(|p| *p == c.name)).collect();
        let primary_key =
            to_plan.iter().map(|p| p.is_some_and(|p| plan.primary_key.get(p).copied().unwrap_or(false))).collect();
        let map = Arc::new(ColumnMap { to_rel, to_plan, primary_key });
        self.maps.insert(relation.oid, (Arc::clone(relation), Arc::clone(&map)));
        map
    }

    /// Applies a committed change to the membership caches.
    fn apply_to_caches(&mut self, change: &Change) {
        self.caches.apply(change);
    }

    fn fan_out(&mut self, tx: &OpenTx, change: &Change, now: u64) {
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        let Some(event) = EventType::of(change.op) else { return };
        let policies = Arc::clone(&self.policies);
        // A table the plans do not know (published after the load): nobody.
        let Some(plan) = policies.table(change.relation.oid) else { return };
        let map = self.column_map(plan, &change.relation);
        let columns = self.columns_json(&change.relation);
        self.frames.clear();
        self.data.clear();
        let roles: Vec<Arc<str>> = self.registry.roles().map(|(r, _)| Arc::clone(r)).collect();
        let mut candidates = std::mem::take(&mut self.candidates);
        for (role_no, role) in roles.iter().enumerate() {
            let Some(rp) = plan.role(role) else { continue };
            let mask: Option<Vec<bool>> = rp
                .columns
                .as_ref()
                .map(|m| map.to_plan.iter().map(|p| p.is_some_and(|p| m.get(p).copied().unwrap_or(false))).collect());
            let shape = MaskRef { id: role_no as u16, mask: mask.as_deref(), primary_key: &map.primary_key };
            candidates.clear();
            // PostgreSQL decides for policies that do not compile, and for
            // predicates whose caches cannot be trusted: a cache over its
            // budget, a cache loaded at run time the stream has not caught up
            // with, or the catch-up window after a restart (caches loaded from
            // the current state may be ahead of or behind the commit).
            let by_database = matches!(rp.access, Access::Database(_))
                || match &rp.access {
                    Access::Rows(expr) => {
                        tx.catch_up || tx.reads_inexact(expr) || rp.caches.iter().any(|&c| self.caches.is_over(c))
                    }
                    _ => false,
                };
            match &rp.access {
                Access::Nothing(_) => continue,
                _ if by_database => {
                    let Some(check) = rp.database.as_ref() else {
                        self.stats.database_denied.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    self.registry.filtered_candidates(change, &mut candidates);
                    self.stats.candidates.fetch_add(candidates.len() as u64, Ordering::Relaxed);
                    let check = Arc::clone(check);
                    self.submit_check(&check, role, tx.xid, event, change, &map, &tx.commit_timestamp, &candidates);
                }
                // Covered by the arm above.
                Access::Database(_) => continue,
                Access::Everything => {
                    self.registry.filtered_candidates(change, &mut candidates);
                    self.stats.candidates.fetch_add(candidates.len() as u64, Ordering::Relaxed);
                    for (k, &slot) in candidates.iter().enumerate() {
                        self.prefetch_ahead(&candidates, k);
                        if self.registry.get(slot).is_some_and(|s| same_role(&s.viewer.role, role)) {
                            self.deliver(slot, event, change, &tx.commit_timestamp, &columns, shape, now);
                        }
                    }
                }
                Access::Rows(expr) => {
                    self.index_candidates(&rp.index, change, &map, &mut candidates);
                    candidates.sort_unstable();
                    candidates.dedup();
                    self.stats.candidates.fetch_add(candidates.len() as u64, Ordering::Relaxed);
                    for (k, &slot) in candidates.iter().enumerate() {
                        self.prefetch_ahead(&candidates, k);
                        let Some(sub) = self.registry.get(slot) else { continue };
                        if !same_role(&sub.viewer.role, role) {
                            continue;
                        }
                        let judge = |row: Option<&Row>| {
                            let claims = self.registry.claims();
                            expr.eval(&Judge { row, map: &map, sub, claims, caches: &self.caches }).visible()
                        };
                        let sees_new = event != EventType::Delete && judge(change.record.as_ref());
                        let sees_old = match event {
                            EventType::Insert => false,
                            // No old image (REPLICA IDENTITY DEFAULT, key
                            // unchanged): judged by the new row, as Supabase
                            // does; never a move-out.
                            EventType::Update if change.old_record.is_none() => sees_new,
                            _ => judge(change.old_record.as_ref()),
                        };
                        let Some(ev) = event.transition(sees_old, sees_new) else { continue };
                        self.deliver(slot, ev, change, &tx.commit_timestamp, &columns, shape, now);
                    }
                }
            }
        }
        self.candidates = candidates;
    }

    /// The fan-out's prefetch pipeline, at candidate `k`: the subscription
    /// [`PREFETCH_AHEAD`] slots ahead starts loading, and the bindings and
    /// outbox of the one half as far ahead (whose subscription should have
    /// arrived by now). With 10,000 sockets each touched a few times a
    /// second, every subscription, binding list and queue is a cache miss;
    /// overlapped, they cost a fraction of one after another.
    fn prefetch_ahead(&self, candidates: &[Slot], k: usize) {
        if k == 0 {
            for &first in candidates.iter().take(PREFETCH_AHEAD) {
                self.registry.prefetch(first);
            }
        }
        if let Some(&ahead) = candidates.get(k + PREFETCH_AHEAD) {
            self.registry.prefetch(ahead);
        }
        if let Some(&near) = candidates.get(k + PREFETCH_AHEAD / 2) {
            self.registry.prefetch_parts(near);
        }
    }

    /// Candidate slots for a change under `index` (a superset of those who
    /// may see the old or new row; the predicate decides).
    fn index_candidates(&self, index: &Index, change: &Change, map: &ColumnMap, out: &mut Vec<Slot>) {
        let value = |column: usize, row: Option<&Row>, ty| -> Option<Scalar> {
            let i = map.to_rel.get(column).copied().flatten()?;
            let text = row?.0.get(i)?.as_str()?;
            Scalar::parse(ty, text).ok()
        };
        match index {
            Index::Nobody => {}
            Index::Everyone => {
                self.registry.filtered_candidates(change, out);
            }
            Index::Claim { path, ty, column } => {
                if !self.registry.indexes_claim(path, *ty) {
                    self.registry.filtered_candidates(change, out);
                    return;
                }
                for row in [change.old_record.as_ref(), change.record.as_ref()] {
                    if let Some(v) = value(*column, row, *ty) {
                        self.registry.claim_candidates(path, *ty, &v, out);
                    }
                }
            }
            Index::Member { cache, column, path, ty } => {
                let Some(spec) = self.caches.specs().get(*cache) else { return };
                let Some((_, group_ty)) = &spec.group else {
                    self.registry.filtered_candidates(change, out);
                    return;
                };
                if !self.registry.indexes_claim(path, *ty) {
                    self.registry.filtered_candidates(change, out);
                    return;
                }
                let Some(data) = self.caches.get(*cache) else { return };
                for row in [change.old_record.as_ref(), change.record.as_ref()] {
                    if let Some(g) = value(*column, row, *group_ty) {
                        data.for_each_member(&g, |user| self.registry.claim_candidates(path, *ty, user, out));
                    }
                }
            }
            Index::Union(parts) => {
                for p in parts {
                    self.index_candidates(p, change, map, out);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        slot: Slot,
        event: EventType,
        change: &Change,
        commit_timestamp: &str,
        columns: &Bytes,
        shape: MaskRef<'_>,
        now: u64,
    ) {
        let Some(sub) = self.registry.get(slot) else { return };
        let row = match event {
            EventType::Insert | EventType::Update => change.record.as_ref(),
            EventType::Delete => change.old_record.as_ref(),
        };
        self.ids.clear();
        // The `select` lists of the matching bindings, all of them; one
        // binding without a list wants every column.
        self.selects.clear();
        let mut every_column = false;
        let mut evaluated = 0u64;
        for (i, binding) in sub.bindings.iter().enumerate() {
            evaluated += u64::from(!binding.filter.is_empty());
            if binding.wants(&change.relation, event, row) {
                self.ids.push(binding.id);
                match &binding.select {
                    Some(_) => self.selects.push(i),
                    None => every_column = true,
                }
            }
        }
        self.stats.filter_evaluations.fetch_add(evaluated, Ordering::Relaxed);
        if self.ids.is_empty() {
            return;
        }
        // The role's columns, narrowed by the bindings' `select` (the key
        // columns always go, as Supabase sends them).
        let selected: Option<Vec<bool>> = (!every_column).then(|| {
            change
                .relation
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let wanted = self
                        .selects
                        .iter()
                        .any(|&b| sub.bindings[b].select.as_ref().is_some_and(|cols| cols.contains(&c.name)));
                    (shape.primary_key.get(i).copied().unwrap_or(false) || wanted) && shape.mask.is_none_or(|m| m[i])
                })
                .collect()
        });
        let (mask, mask_id) = match &selected {
            Some(m) => (Some(m.as_slice()), u16::MAX),
            None => (shape.mask, shape.id),
        };
        self.key.clear();
        self.key.push(sub.vsn as u8);
        self.key.push(event as u8);
        self.key.extend_from_slice(&sub.topic_id.to_ne_bytes());
        match mask {
            Some(m) if mask_id == u16::MAX => self.key.extend(m.iter().map(|b| u8::from(*b) + 2)),
            Some(_) => self.key.extend_from_slice(&mask_id.to_ne_bytes()),
            None => {}
        }
        self.key.push(0);
        for id in &self.ids {
            self.key.extend_from_slice(&id.to_ne_bytes());
        }
        let frame = match self.frames.get(self.key.as_slice()) {
            Some(frame) => frame.clone(),
            None => {
                let build = |mask: Option<&[bool]>| {
                    let masked_columns;
                    let columns: &[u8] = match mask {
                        Some(m) => {
                            masked_columns = frame::columns_json(&change.relation, Some(m));
                            &masked_columns
                        }
                        None => columns,
                    };
                    frame::data_json(change, event, commit_timestamp, columns, mask)
                };
                let data = if mask_id == u16::MAX {
                    build(mask)
                } else {
                    self.data
                        .entry((event as u8, if mask.is_some() { mask_id } else { u16::MAX - 1 }))
                        .or_insert_with(|| build(mask))
                        .clone()
                };
                let frame = frame::postgres_changes(sub.vsn, &sub.topic, &self.ids, &data);
                self.stats.frames_built.fetch_add(1, Ordering::Relaxed);
                self.frames.insert(self.key.clone(), frame.clone());
                frame
            }
        };
        match sub.outbox.push_deferred(frame, now) {
            Ok(list) => {
                if list {
                    self.to_flush.push(Arc::clone(&sub.outbox));
                }
                self.stats.deliveries.fetch_add(1, Ordering::Relaxed);
            }
            Err(PushError::Full) | Err(PushError::Closed) => self.doomed.push(sub.conn),
        }
    }
}

/// How many candidates ahead the fan-out starts loading a subscription.
const PREFETCH_AHEAD: usize = 6;

/// Whether two roles are the same (the registry interns them: usually one
/// pointer comparison).
fn same_role(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// The column mask of the role being delivered to, with an id for caches.
#[derive(Clone, Copy)]
struct MaskRef<'a> {
    id: u16,
    mask: Option<&'a [bool]>,
    /// The relation's primary-key columns (always sent).
    primary_key: &'a [bool],
}

#[cfg(test)]
mod tests;
