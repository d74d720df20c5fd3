//! The edge role: a hub fed from the stream instead of a slot.
//!
//! ```text
//!  object store "latest" ──(sequence S, policy state)──▶ StageEvent::Restore ─┐
//!  stream, ordered consumer from S+1 ─▶ tx chunks ─▶ TxReader ─▶ Router ─────┼─▶ hub ─▶ sockets
//!                                   │                   └─ realtime.messages ─┼─▶ delivery stage (local rooms)
//!                                   └▶ policy chunks ─▶ Policies / PolicyUpdate┘
//!  connection watch: no NATS for --edge-max-stale-secs ─▶ not ready, sockets closed (1013)
//! ```
//!
//! Invariants: events reach the hub in stream order, whole transactions
//! only — a partial transaction is discarded ([`StageEvent::Reset`]) when its
//! chunk 0 comes again (its leader's walsender restarted) or a newer term's
//! message arrives; a transaction already handled (commit LSN below the
//! last handled end LSN: republished by a new leader) is skipped by the hub;
//! a gap in the stream's sequences (retention removed messages the edge had
//! not read) closes the subscribed sockets (1013) and restarts the edge
//! from a snapshot past the gap, never serving from caches that missed
//! changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::log::{self, Log};
use super::snapshot;
use super::wire::TxReader;
use super::{ClusterSettings, ScaleoutError};
use crate::hub::{CloseReason, Control, HubHandle, StageEvent};
use crate::realtime::messages::{DbBroadcastStats, DbMessage};
use crate::relay::messages::Router;
use crate::relay::{FedConfig, Relay, RelayError};
use crate::replication::AckHandle;

/// Most bytes of one policy state an edge gathers from its chunks (the
/// membership caches' own budget is 1 GiB by default).
pub const MAX_POLICY_STATE: usize = 4 << 30;

/// Most events per batch handed to the hub.
const BATCH: usize = 256;

/// Counters of the edge role (`/metrics`).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Stream sequence of the last message applied.
    pub sequence: AtomicU64,
    /// Messages the stream still holds for this edge (as of the last one).
    pub pending: AtomicU64,
    /// Transactions applied.
    pub transactions: AtomicU64,
    /// Partial transactions discarded (a leader's restart or a new term).
    pub discarded: AtomicU64,
    /// Policy states applied from the stream.
    pub policy_states: AtomicU64,
    /// Times the consumer was made again (reconnects).
    pub consumers: AtomicU64,
    /// Times the edge went stale and closed its sockets.
    pub stale: AtomicU64,
    /// Times the edge found a gap (retention removed what it had not read),
    /// closed its subscribed sockets and started again from a snapshot.
    pub resyncs: AtomicU64,
}

/// Loads the newest snapshot and starts a hub fed from the stream after
/// it. `messages` receives Broadcast from Database rows.
///
/// # Errors
/// No snapshot within `wait`, or one that does not decode.
pub async fn start(
    log: Log,
    settings: &ClusterSettings,
    fed: FedConfig,
    messages: Option<mpsc::Sender<DbMessage>>,
    db_stats: Arc<DbBroadcastStats>,
    wait: Duration,
) -> Result<(Relay, Arc<EdgeStats>), ScaleoutError> {
    let (sequence, state) = load_snapshot(&log, wait).await?;
    tracing::info!(sequence, handled = %state.handled, "edge starts from the snapshot");
    let stats = Arc::new(EdgeStats::default());
    stats.sequence.store(sequence, Ordering::Relaxed);
    let feed_stats = Arc::clone(&stats);
    let feed_log = log.clone();
    let feed: crate::relay::Feed = Box::new(move |output, ack, stop| {
        Box::pin(
            async move {
                feed(feed_log, state, sequence, output, ack, stop, messages, db_stats, feed_stats)
                    .await
                    .map_err(|e| RelayError::Cluster(Box::new(e)))
            }
            .instrument(tracing::info_span!("edge_feed")),
        )
    });
    // Where the stream ends now: the edge serves once it has read that far
    // (a client joining then is not sent changes committed long before).
    let target =
        log.stream().await?.info().await.map_err(|e| ScaleoutError::js("reading the stream", e))?.state.last_sequence;
    let relay = Relay::start_fed(fed, feed).map_err(|e| ScaleoutError::Hub(e.to_string()))?;
    let started = tokio::time::Instant::now();
    loop {
        let read = stats.sequence.load(Ordering::Relaxed) >= target;
        // …and the hub took every batch (it handles a batch whole before
        // it looks at joins again).
        if read && relay.queues().stage().is_none_or(|(queued, _)| queued == 0) {
            break;
        }
        if !relay.is_running() {
            let _ = relay.stop().await;
            return Err(ScaleoutError::Hub("the stream feed stopped while catching up".into()));
        }
        if started.elapsed() >= wait {
            tracing::warn!(
                read = stats.sequence.load(Ordering::Relaxed),
                target,
                "still catching up with the stream; serving anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(sequence = stats.sequence.load(Ordering::Relaxed), "edge caught up with the stream");
    tokio::spawn(
        watch_connection(
            log.client.clone(),
            settings.edge_max_stale,
            relay.hub.clone(),
            relay.ack().clone(),
            Arc::clone(&stats),
        )
        .instrument(tracing::info_span!("edge_watch")),
    );
    Ok((relay, stats))
}

/// The newest snapshot: its sequence and state (waits up to `wait` for
/// one to exist).
pub(crate) async fn load_snapshot(log: &Log, wait: Duration) -> Result<(u64, snapshot::PolicyState), ScaleoutError> {
    let started = tokio::time::Instant::now();
    let store = loop {
        match log.snapshots().await {
            Ok(store) => break store,
            Err(err) if started.elapsed() < wait => {
                tracing::debug!(error = %err, "snapshot store not there yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => return Err(err),
        }
    };
    loop {
        match store.get(log::SNAPSHOT_OBJECT).await {
            Ok(mut object) => {
                let mut blob = Vec::new();
                object.read_to_end(&mut blob).await.map_err(|e| ScaleoutError::js("reading the snapshot", e))?;
                let (sequence, encoded) = log::split_snapshot(&blob)
                    .ok_or_else(|| ScaleoutError::js("reading the snapshot", "shorter than its header"))?;
                let state = snapshot::decode(encoded)?;
                return Ok((sequence, state));
            }
            Err(_) if started.elapsed() < wait => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(_) => {
                return Err(ScaleoutError::NoSnapshot {
                    bucket: log.names.snapshot_bucket.clone(),
                    waited: started.elapsed(),
                })
            }
        }
    }
}

fn header<'a>(message: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[allow(clippy::too_many_arguments)] // the feed's context, passed once
async fn feed(
    log: Log,
    state: snapshot::PolicyState,
    sequence: u64,
    output: mpsc::Sender<Vec<StageEvent>>,
    ack: AckHandle,
    stop: CancellationToken,
    messages: Option<mpsc::Sender<DbMessage>>,
    db_stats: Arc<DbBroadcastStats>,
    stats: Arc<EdgeStats>,
) -> Result<(), ScaleoutError> {
    let restore = StageEvent::Restore { loaded: Box::new(state.loaded), ahead: state.ahead, handled: state.handled };
    if output.send(vec![restore]).await.is_err() {
        return Ok(());
    }
    ack.status().set_streaming();
    let mut next = sequence + 1;
    let mut decoder = Decoder::default();
    let mut router = Router::for_stream(messages, db_stats);
    let mut events = Vec::new();
    let mut decoded: Vec<StageEvent> = Vec::new();
    let mut batch: Vec<StageEvent> = Vec::with_capacity(BATCH);
    let mut backoff = Duration::from_millis(100);
    'consumer: while !stop.is_cancelled() {
        let mut incoming = match consume_from(&log, next).await {
            Ok(incoming) => incoming,
            Err(err) => {
                tracing::warn!(error = %err, "reading the stream failed; retrying");
                pause(&stop, &mut backoff).await;
                continue;
            }
        };
        stats.consumers.fetch_add(1, Ordering::Relaxed);
        backoff = Duration::from_millis(100);
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => break 'consumer,
                message = incoming.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "the stream consumer failed; making it again");
                    continue 'consumer;
                }
                None => continue 'consumer,
            };
            let (seq, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(err) => {
                    tracing::warn!(error = %err, "a stream message without metadata; making the consumer again");
                    continue 'consumer;
                }
            };
            if seq < next {
                continue;
            }
            if seq > next {
                // Retention removed messages this edge had not read: what it
                // holds misses changes. Its subscribed clients are told (they
                // reload and join again, owed what commits after), and it
                // starts again from a snapshot at or past the gap.
                tracing::error!(
                    wanted = next,
                    first = seq,
                    "the stream no longer holds messages this edge had not read; closing subscribed sockets and \
                     starting again from the newest snapshot (raise --stream-max-bytes or --stream-max-age-secs)"
                );
                stats.resyncs.fetch_add(1, Ordering::Relaxed);
                let (sequence, state) =
                    newer_snapshot(&log, seq - 1).await.ok_or(ScaleoutError::Evicted { wanted: next, first: seq })?;
                decoder = Decoder::default();
                router.reset();
                batch.push(StageEvent::Reset);
                batch.push(StageEvent::CloseAll(CloseReason::stream_gap()));
                batch.push(StageEvent::Restore {
                    loaded: Box::new(state.loaded),
                    ahead: state.ahead,
                    handled: state.handled,
                });
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if output.send(full).await.is_err() {
                    return Ok(());
                }
                next = sequence + 1;
                stats.sequence.store(sequence, Ordering::Relaxed);
                continue 'consumer;
            }
            next = seq + 1;
            decoder.decode(&log.names, &message, &mut decoded)?;
            // Broadcast from Database rows go to the delivery stage before
            // their Commit reaches the hub: each run of transaction events
            // passes the router once.
            for event in decoded.drain(..) {
                match event {
                    StageEvent::Tx(tx) => {
                        if matches!(tx, crate::change::TxEvent::Commit(_)) {
                            stats.transactions.fetch_add(1, Ordering::Relaxed);
                        }
                        events.push(tx);
                    }
                    other => {
                        route_into(&mut router, &mut events, &mut batch).await;
                        match &other {
                            StageEvent::Reset => {
                                router.reset();
                                stats.discarded.fetch_add(1, Ordering::Relaxed);
                            }
                            StageEvent::Policies(_) | StageEvent::PolicyUpdate { .. } => {
                                stats.policy_states.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                        batch.push(other);
                    }
                }
            }
            route_into(&mut router, &mut events, &mut batch).await;
            stats.pending.store(pending, Ordering::Relaxed);
            if (batch.len() >= BATCH || pending == 0) && !batch.is_empty() {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if output.send(full).await.is_err() {
                    return Ok(());
                }
            }
            // Read means handed to the hub (what `start` waits for).
            if batch.is_empty() {
                stats.sequence.store(seq, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Passes `events` (transaction events in stream order) through the router
/// and appends what is left to `batch`.
async fn route_into(router: &mut Router, events: &mut Vec<crate::change::TxEvent>, batch: &mut Vec<StageEvent>) {
    if events.is_empty() {
        return;
    }
    router.route(events).await;
    batch.extend(events.drain(..).map(StageEvent::Tx));
}

/// How long an edge that found a gap waits for a snapshot past it.
const RESYNC_WAIT: Duration = Duration::from_secs(60);

/// The newest snapshot once it includes sequence `at_least` (a source
/// stores one every `--snapshot-interval-secs` while the stream moves);
/// `None` if none does within [`RESYNC_WAIT`].
async fn newer_snapshot(log: &Log, at_least: u64) -> Option<(u64, snapshot::PolicyState)> {
    let started = tokio::time::Instant::now();
    loop {
        match load_snapshot(log, Duration::ZERO).await {
            Ok((sequence, state)) if sequence >= at_least => return Some((sequence, state)),
            Ok(_) | Err(_) if started.elapsed() < RESYNC_WAIT => tokio::time::sleep(Duration::from_millis(250)).await,
            Ok(_) | Err(_) => return None,
        }
    }
}

/// An ordered consumer of the whole stream from sequence `next`.
pub(crate) async fn consume_from(
    log: &Log,
    next: u64,
) -> Result<async_nats::jetstream::consumer::pull::Ordered, ScaleoutError> {
    let stream = log.stream().await?;
    let config = pull::OrderedConfig {
        filter_subject: log.names.all_subjects.clone(),
        deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: next },
        ..Default::default()
    };
    let consumer =
        stream.create_consumer(config).await.map_err(|e| ScaleoutError::js("making a stream consumer", e))?;
    consumer.messages().await.map_err(|e| ScaleoutError::js("reading the stream", e))
}

/// Stream messages → the hub's events, in order: whole transactions, the
/// policy states, and a [`StageEvent::Reset`] where a partial transaction
/// is discarded (its chunk 0 again, or a newer leader term).
#[derive(Default)]
pub(crate) struct Decoder {
    reader: TxReader,
    term: u64,
    policy: Vec<u8>,
    events: Vec<crate::change::TxEvent>,
}

impl Decoder {
    /// Decodes one message, appending its events to `out`.
    ///
    /// # Errors
    /// A payload that does not decode (the stream was written by another
    /// version, or by something else): definite.
    pub(crate) fn decode(
        &mut self,
        names: &log::Names,
        message: &async_nats::Message,
        out: &mut Vec<StageEvent>,
    ) -> Result<(), ScaleoutError> {
        let index: u32 = header(message, log::CHUNK).and_then(|v| v.parse().ok()).unwrap_or(0);
        let term: u64 = header(message, log::TERM).and_then(|v| v.parse().ok()).unwrap_or(0);
        if term > self.term {
            // A new leader: whatever the old one left open never commits.
            if self.reader.in_transaction() {
                self.discard(out);
            }
            self.term = term;
        }
        if message.subject.as_str() == names.tx_subject {
            if index == 0 && self.reader.in_transaction() {
                // Its leader's walsender restarted: the transaction comes
                // again from its Begin.
                self.discard(out);
            }
            self.reader.read(index, &message.payload, &mut self.events)?;
            out.extend(self.events.drain(..).map(StageEvent::Tx));
        } else if message.subject.as_str() == names.policy_subject {
            if index == 0 {
                self.policy.clear();
            }
            if self.policy.len() + message.payload.len() > MAX_POLICY_STATE {
                return Err(ScaleoutError::PolicyStateTooLarge { max: MAX_POLICY_STATE });
            }
            self.policy.extend_from_slice(&message.payload);
            if header(message, log::LAST).is_some() {
                let state = snapshot::decode(&self.policy)?;
                self.policy.clear();
                out.push(match header(message, log::KIND) {
                    Some("update") => StageEvent::PolicyUpdate { loaded: Box::new(state.loaded), ahead: false },
                    Some("update-ahead") => StageEvent::PolicyUpdate { loaded: Box::new(state.loaded), ahead: true },
                    _ => StageEvent::Policies(Box::new(state.loaded)),
                });
            }
        }
        Ok(())
    }

    fn discard(&mut self, out: &mut Vec<StageEvent>) {
        self.reader.reset();
        out.push(StageEvent::Reset);
    }
}

async fn pause(stop: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// Watches the NATS connection: disconnected for longer than `max_stale`,
/// the edge reports not ready and closes its subscribed sockets (once per
/// outage); connected again, it is ready again.
async fn watch_connection(
    client: async_nats::Client,
    max_stale: Duration,
    hub: HubHandle,
    ack: AckHandle,
    stats: Arc<EdgeStats>,
) {
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut stale = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if hub.is_closed() {
            return;
        }
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        if connected {
            down_since = None;
            if stale {
                stale = false;
                tracing::info!("the change stream is back");
                ack.status().set_streaming();
            }
            continue;
        }
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        if !stale && since.elapsed() >= max_stale {
            stale = true;
            stats.stale.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                stale_secs = max_stale.as_secs(),
                "lost the change stream (NATS) for longer than --edge-max-stale-secs; not ready, closing sockets"
            );
            ack.status().set_disconnected(&format!("no change stream (NATS) for over {} s", max_stale.as_secs()));
            let _ = hub.send(Control::CloseAll(CloseReason::stream_lost(max_stale))).await;
        }
    }
}
