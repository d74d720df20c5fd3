//! The hub: judges every committed change against the membership cache, the
//! policy rules and each subscriber's bindings, serializes each distinct
//! frame once, and queues the shared bytes into per-connection outboxes.
//!
//! ```text
//!  change stage ──Vec<StageEvent> (bounded)──▶ hub task ──Bytes──▶ Outbox per connection ──▶ WebSocket writer
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
//! 3. Per change, the audience is the members of the old and new row's
//!    dealership (plus `service_role` subscribers), each with its own event
//!    after visibility transitions (see [`crate::policy::rules`]), narrowed to
//!    subscriptions whose bindings match schema, table, event and filter.
//!    The `data` JSON is built once per event type; each frame once per
//!    (vsn, topic, ids, event type); subscribers share the `Bytes`.
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
//! [`crate::policy::membership`]): their membership changes are applied,
//! their row changes go to `service_role` subscribers only.

mod flow;
pub mod frame;
pub mod latency;
pub mod outbox;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

pub use frame::Vsn;
pub use outbox::{CloseReason, Outbox, OutboxBudget, OutboxLimits, PushError, DEFAULT_OUTBOX_BUDGET};

use std::time::{Duration, Instant};

use crate::change::{Change, RelationInfo, TxEvent};
use crate::lsn::Lsn;
use crate::policy::{EventType, Filter, LoadedAt, MembershipCache, Rules, Viewer};
use crate::replication::AckHandle;
use crate::spill::{Spill, SpillError, SpillStats};
use flow::{Delivery, OpenTx};
use latency::LatencyHistogram;

/// Identifies one WebSocket connection.
pub type ConnId = u64;

/// What the change stage sends the hub.
#[derive(Debug, Clone)]
pub enum StageEvent {
    /// The memberships were (re)loaded: transactions committing before
    /// `lsn` are the catch-up window unless the load was exact.
    Loaded(LoadedAt),
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
    /// Transactions that outgrew memory and were spilled to disk.
    pub spilled_transactions: AtomicU64,
    /// Current subscriptions (gauge).
    pub subscriptions: AtomicU64,
    /// Last end LSN handled (gauge).
    pub handled_lsn: AtomicU64,
    /// Commit → queued latency of each transaction that queued frames: the
    /// commit timestamp (the database's clock) against the wall clock once
    /// its last frame was queued.
    pub delivery_latency: LatencyHistogram,
    /// The membership cache was loaded (set by the change stage at the load,
    /// and by the hub when it sees [`StageEvent::Loaded`]).
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
    /// The membership cache (read-only use outside the hub).
    pub memberships: Arc<MembershipCache>,
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

    /// Control requests queued now (cheap: the channel's used capacity).
    pub fn control_queue_len(&self) -> usize {
        self.control.max_capacity() - self.control.capacity()
    }

    /// Capacity of the control queue.
    pub fn control_queue_capacity(&self) -> usize {
        self.control.max_capacity()
    }

    /// Sends a control request without waiting.
    ///
    /// # Errors
    /// When the queue is full or the hub has stopped.
    pub fn try_send(&self, control: Control) -> Result<(), Control> {
        self.control.try_send(control).map_err(|e| match e {
            mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
        })
    }
}

/// Creates a hub; run [`Hub::run`] on a task and give the handle to the
/// realtime layer. Transactions that outgrow memory go to `spill`.
pub fn hub(
    config: HubConfig,
    rules: Rules,
    memberships: Arc<MembershipCache>,
    ack: AckHandle,
    spill: Spill,
) -> (Hub, HubHandle) {
    let (control_tx, control_rx) = mpsc::channel(1024);
    let stats = Arc::new(HubStats::default());
    let budget = OutboxBudget::new(config.outbox_budget);
    let handle = HubHandle {
        control: control_tx,
        stats: Arc::clone(&stats),
        memberships: Arc::clone(&memberships),
        budget: Arc::clone(&budget),
        spill: Arc::clone(spill.stats()),
    };
    let core = Core::new(config, rules, memberships, ack, stats, budget, spill);
    (Hub { core, control: control_rx }, handle)
}

/// The hub task's state.
#[derive(Debug)]
pub struct Hub {
    core: Core,
    control: mpsc::Receiver<Control>,
}

impl Hub {
    /// Runs until `input` ends or `shutdown`; then closes every outbox with
    /// [`CloseReason::shutdown`].
    ///
    /// # Errors
    /// A definite policy or spill error.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<StageEvent>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), HubError> {
        let budget = Arc::clone(&self.core.budget);
        let mut pending = Vec::new().into_iter();
        let mut tick = tokio::time::interval(READER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let result = loop {
            if self.core.busy() {
                // Paused: on the outbox budget (until readers release memory)
                // or on the spill disk budget (retried every second).
                let wait = if self.core.spill_blocked.is_some() { SPILL_RETRY } else { PAUSE_RECHECK };
                tokio::select! {
                    biased;
                    _ = crate::replication::stream::stopped(&mut shutdown) => break Ok(()),
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
            tokio::select! {
                biased;
                _ = crate::replication::stream::stopped(&mut shutdown) => break Ok(()),
                Some(control) = self.control.recv() => self.core.control(control),
                _ = tick.tick() => self.core.check_readers(),
                batch = input.recv() => {
                    let Some(batch) = batch else { break Ok(()) };
                    pending = batch.into_iter();
                }
            }
        };
        self.core.close_all(CloseReason::shutdown());
        result
    }

    /// The synchronous core, for benchmarks and tests that drive the hub
    /// without tasks.
    pub fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

/// How often readers' lag is checked.
const READER_CHECK: Duration = Duration::from_secs(1);
/// How long a paused fan-out waits before looking again without a wake-up.
const PAUSE_RECHECK: Duration = Duration::from_millis(250);
/// How often a push refused by the spill disk budget is retried.
const SPILL_RETRY: Duration = Duration::from_secs(1);

/// A registered subscription.
#[derive(Debug)]
struct Sub {
    conn: ConnId,
    topic: Arc<str>,
    vsn: Vsn,
    viewer: Viewer,
    bindings: Vec<Binding>,
    outbox: Arc<Outbox>,
}

/// The hub's synchronous core: registry, transaction handling, fan-out.
#[derive(Debug)]
pub struct Core {
    config: HubConfig,
    rules: Rules,
    memberships: Arc<MembershipCache>,
    ack: AckHandle,
    stats: Arc<HubStats>,
    subs: Vec<Option<Sub>>,
    free: Vec<usize>,
    by_key: HashMap<(ConnId, Arc<str>), usize>,
    by_conn: HashMap<ConnId, Vec<usize>>,
    by_user: HashMap<Uuid, Vec<usize>>,
    service: Vec<usize>,
    topics: HashMap<Arc<str>, ()>,
    /// Transactions committing before this are the catch-up window.
    judge_from: Lsn,
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
    frames: HashMap<Vec<u8>, Bytes>,
    key: Vec<u8>,
    ids: Vec<u32>,
    /// Scratch: (user, sees old row, sees new row) per change.
    users: Vec<(Uuid, bool, bool)>,
    /// Scratch: one user's subscriptions while delivering to them.
    targets: Vec<usize>,
    doomed: Vec<ConnId>,
}

impl Core {
    fn new(
        config: HubConfig,
        rules: Rules,
        memberships: Arc<MembershipCache>,
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
            rules,
            memberships,
            ack,
            stats,
            subs: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            by_conn: HashMap::new(),
            by_user: HashMap::new(),
            service: Vec::new(),
            topics: HashMap::new(),
            judge_from: Lsn::ZERO,
            handled: Lsn::ZERO,
            open: None,
            skipping: false,
            columns_cache: HashMap::new(),
            frames: HashMap::new(),
            key: Vec::new(),
            ids: Vec::new(),
            users: Vec::new(),
            targets: Vec::new(),
            doomed: Vec::new(),
        }
    }

    /// Handles one control request.
    pub fn control(&mut self, control: Control) {
        match control {
            Control::Join(sub) => {
                let on_live = sub.on_live.clone();
                let outbox = Arc::clone(&sub.outbox);
                self.remove(sub.conn, &sub.topic);
                self.insert(sub);
                if let Some(frame) = on_live {
                    let _ = outbox.push(frame);
                }
            }
            Control::Leave { conn, topic } => self.remove(conn, &topic),
            Control::Reauth { conn, topic, viewer, on_live } => {
                let Some(&idx) = self.by_key.get(&(conn, Arc::from(topic.as_str()))) else { return };
                let Some(sub) = self.subs[idx].as_mut() else { return };
                let old = sub.viewer;
                sub.viewer = viewer;
                let outbox = Arc::clone(&sub.outbox);
                self.unindex_viewer(idx, old);
                self.index_viewer(idx, viewer);
                if let Some(frame) = on_live {
                    let _ = outbox.push(frame);
                }
            }
            Control::Disconnect { conn } => self.remove_conn(conn),
        }
    }

    fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some((t, _)) = self.topics.get_key_value(topic) {
            return Arc::clone(t);
        }
        let t: Arc<str> = Arc::from(topic);
        self.topics.insert(Arc::clone(&t), ());
        t
    }

    fn insert(&mut self, sub: Subscription) {
        let topic = self.intern(&sub.topic);
        let entry = Sub {
            conn: sub.conn,
            topic: Arc::clone(&topic),
            vsn: sub.vsn,
            viewer: sub.viewer,
            bindings: sub.bindings,
            outbox: sub.outbox,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.subs[i] = Some(entry);
                i
            }
            None => {
                self.subs.push(Some(entry));
                self.subs.len() - 1
            }
        };
        self.by_key.insert((sub.conn, topic), idx);
        self.by_conn.entry(sub.conn).or_default().push(idx);
        self.index_viewer(idx, sub.viewer);
        self.stats.subscriptions.fetch_add(1, Ordering::Relaxed);
    }

    fn index_viewer(&mut self, idx: usize, viewer: Viewer) {
        match viewer {
            Viewer::Service => self.service.push(idx),
            Viewer::User(u) => self.by_user.entry(u).or_default().push(idx),
            Viewer::Anon | Viewer::Other => {}
        }
    }

    fn unindex_viewer(&mut self, idx: usize, viewer: Viewer) {
        let drop_from = |list: &mut Vec<usize>| {
            if let Some(pos) = list.iter().position(|&i| i == idx) {
                list.swap_remove(pos);
            }
        };
        match viewer {
            Viewer::Service => drop_from(&mut self.service),
            Viewer::User(u) => {
                if let Some(list) = self.by_user.get_mut(&u) {
                    drop_from(list);
                    if list.is_empty() {
                        self.by_user.remove(&u);
                    }
                }
            }
            Viewer::Anon | Viewer::Other => {}
        }
    }

    fn remove(&mut self, conn: ConnId, topic: &str) {
        let Some(idx) = self.by_key.remove(&(conn, Arc::from(topic))) else { return };
        self.remove_idx(idx);
        if let Some(list) = self.by_conn.get_mut(&conn) {
            list.retain(|&i| i != idx);
            if list.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
    }

    fn remove_idx(&mut self, idx: usize) {
        let Some(sub) = self.subs[idx].take() else { return };
        self.unindex_viewer(idx, sub.viewer);
        self.by_key.remove(&(sub.conn, Arc::clone(&sub.topic)));
        self.free.push(idx);
        self.stats.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if Arc::strong_count(&sub.topic) == 2 {
            // Only the interning table holds it now.
            self.topics.remove(&sub.topic);
        }
    }

    fn remove_conn(&mut self, conn: ConnId) {
        for idx in self.by_conn.remove(&conn).unwrap_or_default() {
            self.remove_idx(idx);
        }
    }

    /// Closes every outbox (shutdown).
    pub fn close_all(&mut self, reason: CloseReason) {
        for sub in self.subs.iter().flatten() {
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
        let bytes = frame::columns_json(relation);
        self.columns_cache.insert(relation.oid, (Arc::clone(relation), bytes.clone()));
        bytes
    }

    fn fan_out(&mut self, tx: &OpenTx, change: &Change, now: u64) {
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        let Some(judgment) = self.rules.judge(change) else { return };
        let columns = self.columns_json(&change.relation);
        let mut data: [Option<Bytes>; 3] = [None, None, None];
        self.frames.clear();
        // service_role: sees every published change as it is.
        let service = std::mem::take(&mut self.service);
        for &idx in &service {
            self.deliver(idx, judgment.event, change, &tx.commit_timestamp, &columns, &mut data, now);
        }
        self.service = service;
        if tx.catch_up || !judgment.by_dealership {
            return;
        }
        // Candidates with what the member lists already say: (user, sees the
        // old row, sees the new row). Reading the lists is the membership
        // check; no second lookup per user.
        let mut users = std::mem::take(&mut self.users);
        users.clear();
        if let Some(old) = judgment.old {
            self.memberships.for_each_member(old, |u| users.push((u, true, false)));
        }
        match judgment.new {
            Some(new) if judgment.old == Some(new) => users.iter_mut().for_each(|u| u.2 = true),
            Some(new) => {
                self.memberships.for_each_member(new, |u| users.push((u, false, true)));
                if judgment.old.is_some() {
                    users.sort_unstable_by_key(|u| u.0);
                    users.dedup_by(|later, kept| {
                        let same = later.0 == kept.0;
                        if same {
                            kept.1 |= later.1;
                            kept.2 |= later.2;
                        }
                        same
                    });
                }
            }
            None => {}
        }
        // A reused copy of each user's list (`deliver` needs `&mut self`),
        // rather than a fresh allocation per user and change.
        let mut targets = std::mem::take(&mut self.targets);
        for &(user, sees_old, sees_new) in &users {
            let Some(event) = judgment.transition(sees_old, sees_new) else { continue };
            let Some(list) = self.by_user.get(&user) else { continue };
            targets.clear();
            targets.extend_from_slice(list);
            for &idx in &targets {
                self.deliver(idx, event, change, &tx.commit_timestamp, &columns, &mut data, now);
            }
        }
        self.targets = targets;
        self.users = users;
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        idx: usize,
        event: EventType,
        change: &Change,
        commit_timestamp: &str,
        columns: &Bytes,
        data: &mut [Option<Bytes>; 3],
        now: u64,
    ) {
        let Some(sub) = self.subs[idx].as_ref() else { return };
        let row = match event {
            EventType::Insert | EventType::Update => change.record.as_ref(),
            EventType::Delete => change.old_record.as_ref(),
        };
        self.ids.clear();
        for binding in &sub.bindings {
            if binding.wants(&change.relation, event, row) {
                self.ids.push(binding.id);
            }
        }
        if self.ids.is_empty() {
            return;
        }
        self.key.clear();
        self.key.push(sub.vsn as u8);
        self.key.push(event as u8);
        self.key.extend_from_slice(&(Arc::as_ptr(&sub.topic) as *const u8 as usize).to_ne_bytes());
        for id in &self.ids {
            self.key.extend_from_slice(&id.to_ne_bytes());
        }
        let frame = match self.frames.get(self.key.as_slice()) {
            Some(frame) => frame.clone(),
            None => {
                let data = data[event as usize]
                    .get_or_insert_with(|| frame::data_json(change, event, commit_timestamp, columns))
                    .clone();
                let frame = frame::postgres_changes(sub.vsn, &sub.topic, &self.ids, &data);
                self.stats.frames_built.fetch_add(1, Ordering::Relaxed);
                self.frames.insert(self.key.clone(), frame.clone());
                frame
            }
        };
        match sub.outbox.push_at(frame, now) {
            Ok(()) => {
                self.stats.deliveries.fetch_add(1, Ordering::Relaxed);
            }
            Err(PushError::Full) | Err(PushError::Closed) => self.doomed.push(sub.conn),
        }
    }
}

#[cfg(test)]
mod tests;
