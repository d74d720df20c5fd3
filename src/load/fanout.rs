//! `walcast replay --subscribers N`: a recorded capture pushed through the
//! decoder, the change stage, the policy and the hub's fan-out to N synthetic
//! subscribers — the relay's whole CPU path except sockets, with no
//! PostgreSQL in the loop.
//!
//! Sits beside [`crate::capture::replay`] (which stops at the change stage)
//! and drives the same [`crate::hub::Core`] the live relay runs, with the
//! plans the policy compiler makes of sql/'s policies
//! ([`super::schema`]). The subscribers are made up before the timed pass:
//!
//! - a first, untimed pass over the capture lists the dealerships its rows
//!   belong to (their `dealership_id`), in first-seen order, and the oids
//!   of `orders` and `dealer_memberships`;
//! - subscriber `i` is user `i`, a member of dealership `i mod D` (D = the
//!   dealerships found, or `--dealerships` of them), joined on one shared
//!   topic (or one topic each with `unique_topics`) with the bindings
//!   `walcast load` uses: `public.orders` (`*`; a `filtered` fraction with
//!   `status=eq.pending`) and `public.dealer_memberships` (`*`);
//! - membership rows in the capture still reach the membership cache in WAL
//!   order, as live; they grant and revoke the recorded users, not ours.
//!
//! The timed pass decodes, assembles, judges, serializes and queues; queued
//! frames are drained (what the socket writers do, minus the write) whenever
//! a million are pending, inside the timing. Invariant: every frame queued is
//! counted by the hub's own delivery counter, which the report quotes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use uuid::Uuid;

use crate::capture::{self, CaptureReader, Pace, ReplayReport};
use crate::change::Datum;
use crate::change::TxEvent;
use crate::hub::{
    hub, Binding, Control, EventMatch, HubConfig, HubError, HubHandle, Outbox, OutboxLimits, StageEvent, Subscription,
    Vsn,
};
use crate::lsn::Lsn;
use crate::policy::plan::Loaded;
use crate::policy::{Caches, Filter, LoadedAt, PolicySet, Viewer};
use crate::replication::AckHandle;
use crate::spill::Spill;

/// Frames left queued before the replay drains every outbox.
const DRAIN_EVERY: u64 = 1_000_000;

/// The synthetic audience of a fan-out replay.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Subscribers (one connection and one channel each).
    pub subscribers: u32,
    /// Spread the subscribers over at most this many of the capture's
    /// dealerships (`None`: all of them).
    pub dealerships: Option<u32>,
    /// Fraction of subscribers whose binding has `status=eq.pending`.
    pub filtered: f64,
    /// One topic per subscriber: no frame is shared (the worst case).
    pub unique_topics: bool,
    /// Phoenix serializer of every subscriber.
    pub vsn: Vsn,
}

/// What a fan-out replay did.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    /// The timed pass as the change stage saw it.
    pub replay: ReplayReport,
    /// Subscribers joined.
    pub subscribers: u32,
    /// Dealerships the subscribers were spread over.
    pub dealerships: usize,
    /// Frames queued into outboxes (the hub's counter).
    pub deliveries: u64,
    /// Distinct frames serialized.
    pub frames_built: u64,
    /// Wall time of the timed pass (decode, policy, fan-out, drains).
    pub elapsed: Duration,
}

impl FanoutReport {
    /// Deliveries per second of the timed pass.
    pub fn deliveries_per_sec(&self) -> f64 {
        self.deliveries as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Row changes per second of the timed pass.
    pub fn changes_per_sec(&self) -> f64 {
        self.replay.changes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Errors of a fan-out replay.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// The capture could not be opened (definite: check the path).
    #[error("opening {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The capture is unreadable or holds an unassemblable message (definite).
    #[error(transparent)]
    Replay(#[from] capture::ReplayError),
    /// The capture's header is unreadable (definite).
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    /// The hub refused a change (definite: the membership table's shape).
    #[error("hub: {0}")]
    Hub(#[from] HubError),
    /// Nothing to spread subscribers over (definite: record a capture with
    /// order or membership rows, or pass no --subscribers).
    #[error("the capture holds no rows with a dealership: nothing for synthetic subscribers to see")]
    NoDealerships,
    /// A bad setting (definite).
    #[error("{0}")]
    Config(&'static str),
}

fn open(path: &Path) -> Result<CaptureReader<std::io::BufReader<std::fs::File>>, FanoutError> {
    let file =
        std::fs::File::open(path).map_err(|source| FanoutError::Open { path: path.display().to_string(), source })?;
    Ok(CaptureReader::new(std::io::BufReader::with_capacity(1 << 20, file))?)
}

/// What the first pass found: dealerships in first-seen order, and the
/// oids of `orders` and `dealer_memberships`.
struct Seen {
    dealerships: Vec<Uuid>,
    orders: u32,
    memberships: u32,
}

/// The dealerships the capture's rows belong to, in first-seen order.
fn dealerships_in(path: &Path) -> Result<Seen, FanoutError> {
    let mut seen = HashSet::new();
    let mut out = Seen { dealerships: Vec::new(), orders: 0, memberships: 0 };
    capture::replay(open(path)?, Pace::Fastest, |event| {
        if let TxEvent::Change(change) = event {
            let rel = &change.relation;
            match (rel.schema.as_str(), rel.table.as_str()) {
                ("public", "orders") => out.orders = rel.oid,
                ("public", "dealer_memberships") => out.memberships = rel.oid,
                _ => return,
            }
            let Some(col) = rel.column_index("dealership_id") else { return };
            for row in [change.old_record.as_ref(), change.record.as_ref()].into_iter().flatten() {
                if let Some(d) = row.0.get(col).and_then(Datum::as_str).and_then(|s| Uuid::parse_str(s).ok()) {
                    if seen.insert(d) {
                        out.dealerships.push(d);
                    }
                }
            }
        }
    })?;
    Ok(out)
}

/// Deterministic user ids for the synthetic subscribers.
fn synthetic_user(i: u32) -> Uuid {
    Uuid::from_u128(0x5157_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
}

/// Replays the capture at `path` through the hub to `config.subscribers`
/// synthetic subscribers.
///
/// # Errors
/// An unreadable capture, a capture with no dealership rows, or a hub error.
pub fn replay_fanout(path: &Path, pace: Pace, config: &FanoutConfig) -> Result<FanoutReport, FanoutError> {
    if config.subscribers == 0 {
        return Err(FanoutError::Config("--subscribers must be at least 1"));
    }
    if !(0.0..=1.0).contains(&config.filtered) {
        return Err(FanoutError::Config("--filtered is a fraction between 0 and 1"));
    }
    let found = dealerships_in(path)?;
    let mut dealerships = found.dealerships;
    if let Some(cap) = config.dealerships {
        dealerships.truncate(cap as usize);
    }
    if dealerships.is_empty() {
        return Err(FanoutError::NoDealerships);
    }

    let (mut hub, handle) = hub(HubConfig::default(), AckHandle::default(), Spill::temporary());
    let core = hub.core_mut();
    let (policies, specs, _) = PolicySet::compile(&super::schema::dealership_catalog(found.orders, found.memberships));
    let mut caches = Caches::new(specs);
    // Unbounded in practice: the replay drains them itself.
    let limits = OutboxLimits::default();
    let pending = Filter::parse("status=eq.pending", |column| (column == "status").then_some("text"))
        .map_err(|_| FanoutError::Config("the built-in filter does not parse"))?;
    let mut outboxes = Vec::with_capacity(config.subscribers as usize);
    // Same spread as `walcast load`: a deterministic fraction is filtered.
    let mut filtered_so_far = 0u64;
    for i in 0..config.subscribers {
        let user = synthetic_user(i);
        let dealership = dealerships[i as usize % dealerships.len()];
        caches.apply(&super::schema::membership_insert(found.memberships, i, user, dealership));
        let want = ((u64::from(i) + 1) as f64 * config.filtered).floor() as u64;
        let filter = if want > filtered_so_far {
            filtered_so_far += 1;
            pending.clone()
        } else {
            Filter::default()
        };
        let outbox = Arc::new(Outbox::new(limits));
        core.control(Control::Join(Subscription {
            conn: u64::from(i),
            topic: if config.unique_topics { format!("realtime:replay-{i}") } else { "realtime:replay".into() },
            vsn: config.vsn,
            viewer: Viewer::user(user),
            bindings: vec![
                Binding {
                    id: 1,
                    schema: Some("public".into()),
                    table: Some("orders".into()),
                    event: EventMatch::All,
                    filter,
                    select: None,
                },
                Binding {
                    id: 2,
                    schema: Some("public".into()),
                    table: Some("dealer_memberships".into()),
                    event: EventMatch::All,
                    filter: Filter::default(),
                    select: None,
                },
            ],
            outbox: Arc::clone(&outbox),
            on_live: None,
            on_withheld: None,
        }));
        outboxes.push(outbox);
    }

    let rows = caches.rows();
    core.stage(StageEvent::Policies(Box::new(Loaded {
        policies: Arc::new(policies),
        caches,
        at: LoadedAt { lsn: Lsn::ZERO, exact: true, rows },
        catalog: None,
    })))?;

    let started = Instant::now();
    let mut drained = Vec::new();
    let mut drained_at = 0u64;
    let mut failure = None;
    let replay = capture::replay(open(path)?, pace, |event| {
        if failure.is_some() {
            return;
        }
        let commit = matches!(event, TxEvent::Commit(_));
        if let Err(err) = core.stage(StageEvent::Tx(event)) {
            failure = Some(err);
            return;
        }
        let queued = handle.stats.deliveries.load(Ordering::Relaxed);
        if commit && queued - drained_at >= DRAIN_EVERY {
            drain(&outboxes, &mut drained);
            drained_at = queued;
        }
    })?;
    if let Some(err) = failure {
        return Err(err.into());
    }
    drain(&outboxes, &mut drained);
    let elapsed = started.elapsed();
    Ok(report(replay, config, dealerships.len(), &handle, elapsed))
}

fn report(
    replay: ReplayReport,
    config: &FanoutConfig,
    dealerships: usize,
    handle: &HubHandle,
    elapsed: Duration,
) -> FanoutReport {
    FanoutReport {
        replay,
        subscribers: config.subscribers,
        dealerships,
        deliveries: handle.stats.deliveries.load(Ordering::Relaxed),
        frames_built: handle.stats.frames_built.load(Ordering::Relaxed),
        elapsed,
    }
}

/// Empties every outbox, as the connections' writers would.
fn drain(outboxes: &[Arc<Outbox>], scratch: &mut Vec<Bytes>) {
    for outbox in outboxes {
        if outbox.depth().0 > 0 {
            // Frames are queued and the outbox is open: the batch is ready now.
            let _ = outbox.next_batch(scratch).now_or_never();
            scratch.clear();
        }
    }
}
