//! The source role: wait for the lease, then hold the slot and publish
//! every committed transaction to the stream.
//!
//! ```text
//!  lease loop: create "leader" (KV, TTL) ──held──▶ terminate a stale walsender on the slot
//!      ▲            │ renew every TTL/3                  │
//!      │            ▼                                    ▼
//!      └── lost / relay ended ◀── Relay (replication → change stage) ──Vec<StageEvent>──▶ publisher
//!                                                                                        │ chunks, headers,
//!                                                    ack end_lsn ◀── PubAcks (in order) ◀┘ expected-last-sequence
//!                                                    snapshot of the mirror ──▶ object store (at most one in flight)
//! ```
//!
//! Invariants: a transaction's `end_lsn` is acknowledged (so the slot may
//! move past it) only after JetStream acknowledged every chunk of it; every
//! publish carries the sequence the leader expects last, so a second
//! writer is detected at its first publish and stops
//! ([`ScaleoutError::Fenced`]); a lost lease stops the relay before the
//! next renewal would have been due; a snapshot is taken only between
//! transactions, tagged with the sequence of the last message it includes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{kv, object_store};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::log::{self, Log};
use super::snapshot::{self, Mirror, PolicyState};
use super::wire::{Chunk, TxChunker};
use super::{ClusterSettings, ScaleoutError};
use crate::change::TxEvent;
use crate::hub::StageEvent;
use crate::lsn::Lsn;
use crate::relay::{Relay, RelayConfig, RelayError};
use crate::replication::AckHandle;

/// The lease key.
const LEADER_KEY: &str = "leader";

/// Room left in a message for its headers.
const HEADER_ROOM: usize = 1024;

/// Counters of the source role (`/metrics`).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// 1 while this node holds the lease and streams.
    pub leader: AtomicBool,
    /// The current (or last) term: the lease's revision when taken.
    pub term: AtomicU64,
    /// Terms this node led.
    pub terms: AtomicU64,
    /// Transactions published (their last chunk acknowledged).
    pub transactions: AtomicU64,
    /// Messages published (chunks, policy state included).
    pub messages: AtomicU64,
    /// Payload bytes published.
    pub bytes: AtomicU64,
    /// Snapshots stored.
    pub snapshots: AtomicU64,
    /// Stream sequence of the last acknowledged publish.
    pub last_sequence: AtomicU64,
    /// Times leadership ended other than by shutdown (lease lost, fenced,
    /// relay failed).
    pub lost: AtomicU64,
}

/// A running source role.
#[derive(Debug)]
pub struct SourceNode {
    /// Its counters.
    pub stats: Arc<SourceStats>,
    task: JoinHandle<()>,
    stop: CancellationToken,
    /// Cancelled when the role stopped on a definite error (`error` says
    /// which).
    failed: CancellationToken,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl SourceNode {
    /// Starts the lease loop; it leads whenever it holds the lease.
    pub fn start(log: Log, settings: ClusterSettings, relay: RelayConfig, node: String) -> SourceNode {
        let stats = Arc::new(SourceStats::default());
        let stop = CancellationToken::new();
        let failed = CancellationToken::new();
        let error: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let run = lead_when_leased(log, settings, relay, node.clone(), Arc::clone(&stats), stop.clone());
        let (failed_in, error_in) = (failed.clone(), Arc::clone(&error));
        let task = tokio::spawn(
            async move {
                if let Err(err) = run.await {
                    tracing::error!(error = %err, "the source role stopped");
                    if let Ok(mut slot) = error_in.lock() {
                        *slot = Some(err.to_string());
                    }
                    failed_in.cancel();
                }
            }
            .instrument(tracing::info_span!("source", node = %node)),
        );
        SourceNode { stats, task, stop, failed, error }
    }

    /// Resolves when the role stopped on a definite error (a transaction
    /// the stream cannot hold, a snapshot that cannot be encoded): the
    /// operator must act; [`SourceNode::error`] says how.
    pub fn failed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.failed.cancelled()
    }

    /// The definite error the role stopped with, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    /// Stops leading (final standby status, lease released) and waits.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Pause between two attempts at the lease, or after a failed term.
fn retry_pause(settings: &ClusterSettings) -> Duration {
    (settings.lease_ttl / 3).max(Duration::from_millis(200))
}

async fn lead_when_leased(
    log: Log,
    settings: ClusterSettings,
    relay: RelayConfig,
    node: String,
    stats: Arc<SourceStats>,
    stop: CancellationToken,
) -> Result<(), ScaleoutError> {
    let mut standby_logged = false;
    while !stop.is_cancelled() {
        let term = match acquire(&log, &settings, &node).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                if !standby_logged {
                    tracing::info!("another source holds the lease; standing by");
                    standby_logged = true;
                }
                pause(&stop, retry_pause(&settings)).await;
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not take the source lease; retrying");
                pause(&stop, retry_pause(&settings)).await;
                continue;
            }
        };
        standby_logged = false;
        let (store, revision) = term;
        tracing::info!(term = revision, "took the source lease; streaming");
        stats.leader.store(true, Ordering::Relaxed);
        stats.term.store(revision, Ordering::Relaxed);
        stats.terms.fetch_add(1, Ordering::Relaxed);
        let ended = lead(&log, &settings, &relay, &node, &store, revision, &stats, &stop).await;
        stats.leader.store(false, Ordering::Relaxed);
        match ended {
            Ok(()) => {
                // Shutdown: let a standby take over at once.
                let _ = store.delete(LEADER_KEY).await;
                tracing::info!(term = revision, "released the source lease");
                return Ok(());
            }
            Err(err) if !err.is_transient() => {
                // The next term would fail the same way: stop, and let a
                // standby try (it will fail too until the operator acts).
                stats.lost.fetch_add(1, Ordering::Relaxed);
                let _ = store.delete(LEADER_KEY).await;
                return Err(err);
            }
            Err(err) => {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(term = revision, error = %err, "leadership ended");
                pause(&stop, retry_pause(&settings)).await;
            }
        }
    }
    Ok(())
}

async fn pause(stop: &CancellationToken, time: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(time) => {}
    }
}

/// Tries to take the lease: `Some((bucket, revision))` when taken.
async fn acquire(log: &Log, settings: &ClusterSettings, node: &str) -> Result<Option<(kv::Store, u64)>, ScaleoutError> {
    let store = log.lease_bucket(settings.lease_ttl).await?;
    match store.create(LEADER_KEY, Bytes::from(node.to_owned())).await {
        Ok(revision) => Ok(Some((store, revision))),
        Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(err) => Err(ScaleoutError::js("taking the lease", err)),
    }
}

/// One term: renew the lease, run the relay into the publisher, until the
/// lease is lost, the relay ends, or shutdown (`Ok`).
#[allow(clippy::too_many_arguments)] // one term's context, passed once
async fn lead(
    log: &Log,
    settings: &ClusterSettings,
    relay: &RelayConfig,
    node: &str,
    store: &kv::Store,
    revision: u64,
    stats: &Arc<SourceStats>,
    stop: &CancellationToken,
) -> Result<(), ScaleoutError> {
    let lost = CancellationToken::new();
    let renewer = tokio::spawn(renew(store.clone(), node.to_owned(), revision, settings.lease_ttl, lost.clone()));
    // A walsender of a previous leader that was cut off rather than killed
    // still holds the slot: it cannot publish (fenced), but it blocks
    // START_REPLICATION until wal_sender_timeout. End it now.
    terminate_stale_walsender(relay).await;
    let publisher = Publisher::new(log.clone(), revision, Arc::clone(stats), settings.snapshot_interval);
    let sink: crate::relay::Sink = Box::new(move |input, ack, stop| Box::pin(publisher.run(input, ack, stop)));
    let started = tokio::select! {
        () = lost.cancelled() => {
            renewer.abort();
            return Err(ScaleoutError::LeaseLost("before the relay started".into()));
        }
        started = Relay::start_with_sink(relay.clone(), sink) => started,
    };
    let relay = match started {
        Ok(relay) => relay,
        Err(err) => {
            renewer.abort();
            let _ = store.delete(LEADER_KEY).await;
            if !err.is_transient() {
                return Err(ScaleoutError::Replication(err.to_string()));
            }
            return Err(ScaleoutError::js("starting replication", err));
        }
    };
    let outcome = tokio::select! {
        () = stop.cancelled() => Ok(()),
        () = lost.cancelled() => Err(ScaleoutError::LeaseLost("not renewed in time".into())),
        () = relay.stage_ended() => Err(ScaleoutError::js("streaming", "a relay stage ended")),
    };
    renewer.abort();
    let stopped = relay.stop().await;
    match (outcome, stopped) {
        (Ok(()), _) => Ok(()),
        (Err(ScaleoutError::JetStream { .. }), Err(RelayError::Cluster(inner))) => {
            match inner.downcast::<ScaleoutError>() {
                Ok(scaleout) => Err(*scaleout),
                Err(other) => Err(ScaleoutError::js("streaming", other)),
            }
        }
        (Err(ScaleoutError::JetStream { .. }), Err(err)) if !err.is_transient() => {
            Err(ScaleoutError::Replication(err.to_string()))
        }
        (Err(ScaleoutError::JetStream { .. }), Err(err)) => Err(ScaleoutError::js("streaming", err)),
        (Err(err), _) => Err(err),
    }
}

/// Renews the lease every third of its TTL, each attempt bounded by a
/// third of it; cancels `lost` when a renewal is refused (another node took
/// the lease) or none succeeded for two thirds of the TTL — so a leader cut
/// off from NATS stops before its lease can expire and a standby take it.
async fn renew(store: kv::Store, node: String, mut revision: u64, ttl: Duration, lost: CancellationToken) {
    let every = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every.saturating_sub(last_ok.elapsed().min(every))).await;
        let attempt = tokio::time::timeout(every, store.update(LEADER_KEY, Bytes::from(node.clone()), revision)).await;
        match attempt {
            Ok(Ok(next)) => {
                revision = next;
                last_ok = tokio::time::Instant::now();
                continue;
            }
            Ok(Err(err)) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                tracing::error!("the source lease was taken by another node");
                lost.cancel();
                return;
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "renewing the source lease failed"),
            Err(_) => tracing::warn!("renewing the source lease timed out"),
        }
        if last_ok.elapsed() >= ttl * 2 / 3 {
            lost.cancel();
            return;
        }
    }
}

/// Ends a walsender still holding the slot (best effort; needs
/// `pg_signal_backend` or superuser, which `walcast check` verifies).
async fn terminate_stale_walsender(relay: &RelayConfig) {
    let Ok(client) = crate::pgconn::connect(&relay.source.connection).await else { return };
    let result = client
        .query(
            "SELECT pg_catalog.pg_terminate_backend(active_pid) FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&relay.source.slot.slot],
        )
        .await;
    match result {
        Ok(rows) if !rows.is_empty() => tracing::warn!("ended the previous leader's walsender on the slot"),
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %crate::pgconn::cause(&err), "could not end a walsender on the slot"),
    }
}

/// The relay's sink on the leader: publishes and acknowledges.
struct Publisher {
    log: Log,
    term: u64,
    stats: Arc<SourceStats>,
    snapshot_interval: Duration,
}

/// One publish awaiting its PubAck.
struct InFlight {
    ack: async_nats::jetstream::context::PublishAckFuture,
    /// The end LSN to acknowledge once it is stored (a transaction's last
    /// chunk).
    end_lsn: Option<Lsn>,
    bytes: usize,
}

impl Publisher {
    fn new(log: Log, term: u64, stats: Arc<SourceStats>, snapshot_interval: Duration) -> Publisher {
        Publisher { log, term, stats, snapshot_interval }
    }

    async fn run(
        self,
        mut input: mpsc::Receiver<Vec<StageEvent>>,
        ack: AckHandle,
        stop: CancellationToken,
    ) -> Result<(), RelayError> {
        let cluster = |e: ScaleoutError| RelayError::Cluster(Box::new(e));
        let mut stream = self.log.stream().await.map_err(cluster)?;
        let mut last =
            stream.info().await.map_err(|e| cluster(ScaleoutError::js("reading the stream", e)))?.state.last_sequence;
        let snapshots = self.log.snapshots().await.map_err(cluster)?;
        let max_payload = self.log.client.server_info().max_payload.max(4096);
        let mut chunker = TxChunker::new(max_payload - HEADER_ROOM);
        // A stream that holds a policy state already (an earlier leader's):
        // continue it — edges keep judging exactly with what they hold —
        // rather than publish this term's load, which was read ahead of
        // the slot and would put every edge in a catch-up window.
        let (mut mirror, mut skip_load) = match seed(&self.log, last).await {
            Ok(Some(mirror)) => {
                tracing::info!(last_sequence = last, "continuing the stream's policy state");
                (mirror, true)
            }
            Ok(None) => (Mirror::new(), false),
            Err(err) => {
                tracing::warn!(error = %err, "could not read the stream's policy state; publishing a fresh load (edges judge the replayed transactions as catch-up)");
                (Mirror::new(), false)
            }
        };
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut in_tx = false;
        // Payload bytes of the open transaction: one the stream cannot hold
        // whole would evict its own beginning.
        let mut tx_bytes: u64 = 0;
        let max_bytes = u64::try_from(self.log.settings.max_bytes).unwrap_or(u64::MAX);
        let mut policy_states: u64 = 0;
        let mut snapshot_task: Option<JoinHandle<()>> = None;
        let mut snapshot_at: Option<u64> = None;
        let mut next_snapshot = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tracing::info!(term = self.term, last_sequence = last, max_payload, "publishing to the stream");
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => None,
                batch = input.recv() => match batch {
                    Some(batch) => Some(batch),
                    None => break,
                },
            };
            if let Some(batch) = batch {
                let mut flight: Vec<InFlight> = Vec::new();
                for event in batch {
                    if let (true, StageEvent::Policies(loaded)) = (skip_load, &event) {
                        skip_load = false;
                        // An exact load (the slot was made by this start, in
                        // its exported snapshot) starts a new history: send it.
                        if !loaded.at.exact {
                            continue;
                        }
                        mirror = Mirror::new();
                    }
                    mirror.apply(&event);
                    match event {
                        StageEvent::Tx(tx) => {
                            in_tx = !matches!(tx, TxEvent::Commit(_));
                            if matches!(tx, TxEvent::Begin(_)) {
                                tx_bytes = 0;
                            }
                            chunker.push(&tx, &mut chunks).map_err(|e| cluster(e.into()))?;
                            tx_bytes += chunks.iter().map(|c| c.payload.len() as u64).sum::<u64>();
                            if tx_bytes > max_bytes {
                                return Err(cluster(ScaleoutError::TransactionTooLarge {
                                    bytes: tx_bytes,
                                    max: max_bytes,
                                }));
                            }
                            for chunk in chunks.drain(..) {
                                let expected = last + flight.len() as u64;
                                flight.push(self.send_chunk(chunk, expected).await.map_err(cluster)?);
                            }
                        }
                        StageEvent::Policies(loaded) => {
                            let state = PolicyState { loaded: *loaded, ahead: false, handled: Lsn::ZERO };
                            policy_states += 1;
                            self.send_policy(&state, "policies", policy_states, last, &mut flight)
                                .await
                                .map_err(cluster)?;
                            next_snapshot = tokio::time::Instant::now();
                        }
                        StageEvent::PolicyUpdate { loaded, ahead } => {
                            let state = PolicyState { loaded: *loaded, ahead, handled: Lsn::ZERO };
                            policy_states += 1;
                            let kind = if ahead { "update-ahead" } else { "update" };
                            self.send_policy(&state, kind, policy_states, last, &mut flight).await.map_err(cluster)?;
                            next_snapshot = tokio::time::Instant::now();
                        }
                        StageEvent::Reset => {
                            // The walsender resends the open transaction
                            // from its Begin; edges discard the partial one
                            // when they see chunk 0 again.
                            chunker.reset();
                            in_tx = false;
                        }
                        StageEvent::Restore { .. } | StageEvent::CloseAll(_) => {}
                    }
                }
                for sent in flight {
                    let stored = sent.ack.await.map_err(|e| {
                        cluster(if e.kind() == PublishErrorKind::WrongLastSequence {
                            ScaleoutError::Fenced { expected: last }
                        } else {
                            ScaleoutError::js("publishing", e)
                        })
                    })?;
                    last = stored.sequence;
                    self.stats.messages.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(sent.bytes as u64, Ordering::Relaxed);
                    if let Some(end) = sent.end_lsn {
                        ack.ack(end);
                        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.stats.last_sequence.store(last, Ordering::Relaxed);
            }
            // A snapshot between transactions, when due and the stream moved
            // since the last one (at most one being stored).
            let due = tokio::time::Instant::now() >= next_snapshot && snapshot_at != Some(last);
            if due && !in_tx && snapshot_task.as_ref().is_none_or(JoinHandle::is_finished) {
                // Encoded here (between batches: the stream waits for it, no
                // copy of the caches is made); stored in a task of its own.
                match mirror.encode() {
                    Some(Ok(encoded)) => {
                        snapshot_at = Some(last);
                        next_snapshot = tokio::time::Instant::now() + self.snapshot_interval;
                        let stats = Arc::clone(&self.stats);
                        let put = store_snapshot(snapshots.clone(), encoded, last, stats).in_current_span();
                        snapshot_task = Some(tokio::spawn(put));
                    }
                    // Definite (plans without their catalog): edges could
                    // never start from it; stop rather than go on without.
                    Some(Err(err)) => return Err(cluster(err.into())),
                    None => {}
                }
            }
        }
        if let Some(task) = snapshot_task {
            let _ = task.await;
        }
        Ok(())
    }

    fn headers(&self, id: String, index: u32) -> PublishMessage {
        PublishMessage::build()
            .message_id(id)
            .header(log::TERM, self.term.to_string().as_str())
            .header(log::CHUNK, index.to_string().as_str())
    }

    async fn send_chunk(&self, chunk: Chunk, expected: u64) -> Result<InFlight, ScaleoutError> {
        let mut message = self.headers(format!("{}:{}:{}", self.term, chunk.commit_lsn, chunk.index), chunk.index);
        if let Some(end) = chunk.end_lsn {
            message = message.header(log::END_LSN, end.to_string().as_str());
        }
        let bytes = chunk.payload.len();
        let message = message.payload(chunk.payload).expected_last_sequence(expected);
        let ack = self
            .log
            .js
            .send_publish(self.log.names.tx_subject.clone(), message)
            .await
            .map_err(|e| publish_error(e, expected))?;
        Ok(InFlight { ack, end_lsn: chunk.end_lsn, bytes })
    }

    async fn send_policy(
        &self,
        state: &PolicyState,
        kind: &str,
        number: u64,
        last: u64,
        flight: &mut Vec<InFlight>,
    ) -> Result<(), ScaleoutError> {
        let encoded = Bytes::from(snapshot::encode(state)?);
        let size = self.log.client.server_info().max_payload.max(4096) - HEADER_ROOM;
        let pieces: Vec<Bytes> = if encoded.is_empty() {
            vec![encoded]
        } else {
            encoded.chunks(size).map(|c| encoded.slice_ref(c)).collect()
        };
        let count = pieces.len();
        for (index, piece) in pieces.into_iter().enumerate() {
            let index = index as u32;
            let expected = last + flight.len() as u64;
            let mut message = self.headers(format!("{}:p{number}:{index}", self.term), index).header(log::KIND, kind);
            if index as usize + 1 == count {
                message = message.header(log::LAST, "1");
            }
            let bytes = piece.len();
            let message = message.payload(piece).expected_last_sequence(expected);
            let ack = self
                .log
                .js
                .send_publish(self.log.names.policy_subject.clone(), message)
                .await
                .map_err(|e| publish_error(e, expected))?;
            flight.push(InFlight { ack, end_lsn: None, bytes });
        }
        Ok(())
    }
}

/// The policy state at the stream's last sequence `last`: the newest
/// snapshot, then every message after it (`None`: the stream holds none).
async fn seed(log: &Log, last: u64) -> Result<Option<Mirror>, ScaleoutError> {
    use futures::StreamExt;
    if last == 0 {
        return Ok(None);
    }
    let (sequence, state) = match super::edge::load_snapshot(log, Duration::ZERO).await {
        Ok(found) => found,
        Err(ScaleoutError::NoSnapshot { .. }) => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut mirror = Mirror::new();
    mirror.apply(&StageEvent::Restore { loaded: Box::new(state.loaded), ahead: state.ahead, handled: state.handled });
    if sequence >= last {
        return Ok(Some(mirror));
    }
    let mut incoming = super::edge::consume_from(log, sequence + 1).await?;
    let mut decoder = super::edge::Decoder::default();
    let mut events = Vec::new();
    let mut next = sequence + 1;
    while next <= last {
        let message = tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .map_err(|_| ScaleoutError::js("reading the stream's tail", "no message within 10 s"))?
            .ok_or_else(|| ScaleoutError::js("reading the stream's tail", "the consumer ended"))?
            .map_err(|e| ScaleoutError::js("reading the stream's tail", e))?;
        let seq = message.info().map_err(|e| ScaleoutError::js("reading the stream's tail", e))?.stream_sequence;
        if seq != next {
            return Err(ScaleoutError::Evicted { wanted: next, first: seq });
        }
        decoder.decode(&log.names, &message, &mut events)?;
        for event in events.drain(..) {
            mirror.apply(&event);
        }
        next += 1;
    }
    Ok(Some(mirror))
}

fn publish_error(err: async_nats::jetstream::context::PublishError, expected: u64) -> ScaleoutError {
    if err.kind() == PublishErrorKind::WrongLastSequence {
        ScaleoutError::Fenced { expected }
    } else {
        ScaleoutError::js("publishing", err)
    }
}

/// Stores one encoded snapshot (errors are logged: the next one is taken
/// at the next interval).
async fn store_snapshot(store: object_store::ObjectStore, encoded: Vec<u8>, sequence: u64, stats: Arc<SourceStats>) {
    let blob = log::snapshot_blob(sequence, &encoded);
    let mut reader = std::io::Cursor::new(blob);
    match store.put(log::SNAPSHOT_OBJECT, &mut reader).await {
        Ok(_) => {
            stats.snapshots.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sequence, bytes = encoded.len(), "snapshot stored");
        }
        Err(err) => tracing::warn!(error = %err, "storing a snapshot failed; the next one is taken later"),
    }
}
