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
//! 1. Changes are buffered until Commit (up to [`HubConfig::max_tx_bytes`]).
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
//! A full outbox closes that connection (slow consumer) and removes its
//! subscriptions; nobody else waits. A transaction larger than the buffer
//! budget is judged change by change from the point it overflows (memory
//! stays bounded); a membership change later in such a transaction then
//! takes effect from its position rather than from the commit — logged and
//! counted in [`HubStats::overflowed_transactions`].
//!
//! # Resume
//!
//! After a replication reconnect, transactions already handled (commit LSN
//! below the last acknowledged end LSN) are skipped, so clients see no
//! duplicates. After a restart with an existing slot, transactions committed
//! before the membership load point are the catch-up window (see
//! [`crate::policy::membership`]): their membership changes are applied,
//! their row changes go to `service_role` subscribers only.

pub mod frame;
pub mod outbox;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

pub use frame::Vsn;
pub use outbox::{CloseReason, Outbox, OutboxLimits, PushError};

use crate::change::{Change, RelationInfo, TxEvent};
use crate::lsn::Lsn;
use crate::monitor::histogram::LatencyHistogram;
use crate::policy::{EventType, Filter, LoadedAt, MembershipCache, Rules, Viewer};
use crate::replication::status::unix_micros_now;
use crate::replication::AckHandle;

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
    /// them) buffered per transaction before judging change by change.
    pub max_tx_bytes: usize,
}

impl Default for HubConfig {
    /// 16 MiB per transaction (about 40,000 `orders` rows). `cargo bench
    /// --bench large_tx` measured a 34–37 MiB peak relay RSS through a
    /// 1,000,000-row transaction with it (docs/benchmarks.md, P7).
    fn default() -> Self {
        HubConfig { max_tx_bytes: 16 << 20 }
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
    /// Connections closed as slow consumers.
    pub slow_consumers: AtomicU64,
    /// Transactions skipped as already handled (after a reconnect).
    pub duplicate_transactions: AtomicU64,
    /// Transactions in the catch-up window.
    pub catch_up_transactions: AtomicU64,
    /// Transactions that outgrew the buffer budget.
    pub overflowed_transactions: AtomicU64,
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
}

/// Handle for the realtime layer.
#[derive(Debug, Clone)]
pub struct HubHandle {
    control: mpsc::Sender<Control>,
    /// Counters.
    pub stats: Arc<HubStats>,
    /// The membership cache (read-only use outside the hub).
    pub memberships: Arc<MembershipCache>,
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
/// realtime layer.
pub fn hub(config: HubConfig, rules: Rules, memberships: Arc<MembershipCache>, ack: AckHandle) -> (Hub, HubHandle) {
    let (control_tx, control_rx) = mpsc::channel(1024);
    let stats = Arc::new(HubStats::default());
    let handle = HubHandle { control: control_tx, stats: Arc::clone(&stats), memberships: Arc::clone(&memberships) };
    let core = Core::new(config, rules, memberships, ack, stats);
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
    /// A definite policy error.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<StageEvent>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), HubError> {
        let result = loop {
            tokio::select! {
                biased;
                _ = crate::replication::stream::stopped(&mut shutdown) => break Ok(()),
                Some(control) = self.control.recv() => self.core.control(control),
                batch = input.recv() => {
                    let Some(batch) = batch else { break Ok(()) };
                    if let Err(err) = batch.into_iter().try_for_each(|event| self.core.stage(event)) {
                        tracing::error!(error = %err, "hub stopped");
                        break Err(err);
                    }
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

/// The transaction being collected.
#[derive(Debug, Default)]
struct OpenTx {
    commit_timestamp: String,
    /// Commit time, µs since the Unix epoch (latency and lag).
    commit_micros: i64,
    /// [`HubStats::deliveries`] when the transaction opened.
    deliveries_at_open: u64,
    catch_up: bool,
    changes: Vec<Change>,
    bytes: usize,
    overflowed: bool,
    /// Row changes seen (for the per-transaction debug event).
    count: usize,
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
    ) -> Core {
        Core {
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

    /// Handles one event from the change stage.
    ///
    /// # Errors
    /// A definite policy error (the membership table no longer matches).
    pub fn stage(&mut self, event: StageEvent) -> Result<(), HubError> {
        match event {
            StageEvent::Loaded(at) => {
                self.judge_from = if at.exact { Lsn::ZERO } else { at.lsn };
                self.stats.memberships_loaded.store(true, Ordering::Relaxed);
                Ok(())
            }
            StageEvent::Reset => {
                self.open = None;
                self.skipping = false;
                Ok(())
            }
            StageEvent::Tx(TxEvent::Begin(begin)) => {
                if begin.commit_lsn < self.handled {
                    self.skipping = true;
                    self.open = None;
                    return Ok(());
                }
                self.skipping = false;
                let commit_micros = begin.commit_timestamp.unix_micros();
                self.ack.status().transaction_opened(commit_micros);
                self.open = Some(OpenTx {
                    commit_timestamp: frame::commit_timestamp(begin.commit_timestamp),
                    commit_micros,
                    deliveries_at_open: self.stats.deliveries.load(Ordering::Relaxed),
                    catch_up: begin.commit_lsn < self.judge_from,
                    ..OpenTx::default()
                });
                Ok(())
            }
            StageEvent::Tx(TxEvent::Change(change)) => {
                if self.skipping {
                    return Ok(());
                }
                let Some(mut tx) = self.open.take() else { return Ok(()) };
                tx.count += 1;
                let result = if tx.overflowed {
                    self.handle_changes(&tx, std::slice::from_ref(&change))
                } else {
                    tx.bytes += change.byte_size();
                    tx.changes.push(change);
                    if tx.bytes > self.config.max_tx_bytes {
                        tx.overflowed = true;
                        self.stats.overflowed_transactions.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            bytes = tx.bytes,
                            "transaction larger than the hub's buffer budget: judging the rest change by change"
                        );
                        let changes = std::mem::take(&mut tx.changes);
                        tx.bytes = 0;
                        self.handle_changes(&tx, &changes)
                    } else {
                        Ok(())
                    }
                };
                self.open = Some(tx);
                self.reap();
                result
            }
            StageEvent::Tx(TxEvent::Commit(info)) => {
                if self.skipping {
                    self.skipping = false;
                    self.stats.duplicate_transactions.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        xid = info.xid,
                        commit_lsn = %info.commit_lsn,
                        end_lsn = %info.end_lsn,
                        "transaction already handled; skipped"
                    );
                    return Ok(());
                }
                let Some(tx) = self.open.take() else { return Ok(()) };
                let mut tx = tx;
                let changes = std::mem::take(&mut tx.changes);
                let result = self.handle_changes(&tx, &changes);
                self.reap();
                if self.stats.deliveries.load(Ordering::Relaxed) > tx.deliveries_at_open {
                    self.stats.delivery_latency.observe_micros(unix_micros_now().saturating_sub(tx.commit_micros));
                }
                if tx.catch_up {
                    self.stats.catch_up_transactions.fetch_add(1, Ordering::Relaxed);
                }
                self.handled = info.end_lsn;
                self.stats.handled_lsn.store(info.end_lsn.0, Ordering::Relaxed);
                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                // Before the acknowledgement: a transaction the slot has been
                // told about has always been logged (at `debug`).
                tracing::debug!(
                    xid = info.xid,
                    commit_lsn = %info.commit_lsn,
                    end_lsn = %info.end_lsn,
                    changes = tx.count,
                    catch_up = tx.catch_up,
                    "transaction handled"
                );
                self.ack.ack(info.end_lsn);
                self.ack.status().transaction_handled(tx.commit_micros);
                result
            }
        }
    }

    /// Membership changes first (as of commit), then every change judged.
    fn handle_changes(&mut self, tx: &OpenTx, changes: &[Change]) -> Result<(), HubError> {
        let table = self.rules.memberships();
        for change in changes.iter().filter(|c| table.is(&c.relation)) {
            self.memberships.apply(table, change)?;
        }
        for change in changes {
            self.fan_out(tx, change);
        }
        Ok(())
    }

    /// Drops connections whose outbox overflowed during this step.
    fn reap(&mut self) {
        while let Some(conn) = self.doomed.pop() {
            if self.by_conn.contains_key(&conn) {
                self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(conn, "closing a slow consumer");
                self.remove_conn(conn);
            }
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

    fn fan_out(&mut self, tx: &OpenTx, change: &Change) {
        self.stats.changes.fetch_add(1, Ordering::Relaxed);
        let Some(judgment) = self.rules.judge(change) else { return };
        let columns = self.columns_json(&change.relation);
        let mut data: [Option<Bytes>; 3] = [None, None, None];
        self.frames.clear();
        // service_role: sees every published change as it is.
        let service = std::mem::take(&mut self.service);
        for &idx in &service {
            self.deliver(idx, judgment.event, change, &tx.commit_timestamp, &columns, &mut data);
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
                self.deliver(idx, event, change, &tx.commit_timestamp, &columns, &mut data);
            }
        }
        self.targets = targets;
        self.users = users;
    }

    fn deliver(
        &mut self,
        idx: usize,
        event: EventType,
        change: &Change,
        commit_timestamp: &str,
        columns: &Bytes,
        data: &mut [Option<Bytes>; 3],
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
        match sub.outbox.push(frame) {
            Ok(()) => {
                self.stats.deliveries.fetch_add(1, Ordering::Relaxed);
            }
            Err(PushError::Full) | Err(PushError::Closed) => self.doomed.push(sub.conn),
        }
    }
}

#[cfg(test)]
mod tests;
