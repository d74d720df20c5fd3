//! The copy-both stream after `START_REPLICATION`: XLogData and primary
//! keepalives in, standby status updates out.
//!
//! Invariants:
//! - `write`, `flush` and `apply` sent to the server never go backwards, and
//!   `flush` never passes what downstream acknowledged except by an idle
//!   keepalive position (see the module doc of [`super`]);
//! - a status update goes out at least every [`StreamConfig::status_interval`]
//!   even while downstream applies backpressure ([`ReplicationStream::pump`]
//!   keeps answering the timer while it waits for channel capacity), at once
//!   when a keepalive asks for a reply, and at once when the stream starts
//!   with an acknowledgement the slot has not been told yet (after a
//!   reconnect);
//! - messages are passed on in the order received, in batches of what had
//!   already arrived ([`ReplicationStream::next_batch`]: one hand-off and
//!   one wake-up downstream per batch); a batch waits for more only deep
//!   inside a large transaction, at most one [`COALESCE_WAIT`] tick, never
//!   once its transaction's Commit is in it; nothing is dropped;
//! - a [`ReplicationStream::next`] call that receives nothing at all for
//!   [`StreamConfig::silence_timeout`] fails with
//!   [`ReplicationError::Silent`] (a status write stuck on a dead path
//!   included); after a third of it, its status update asks the walsender
//!   for a keepalive, which a live walsender answers at once;
//! - a non-transactional logical decoding message outside any transaction
//!   (the heartbeat) counts as progress like a keepalive's `wal_end`.
//!
//! The stream peeks at the first byte of each pgoutput payload only to know
//! whether a transaction or stream block is open (`B` … `C`, `S` … `E`) and
//! the last Commit's `end_lsn`, and has the pgoutput decoder read an `M`
//! outside them (the heartbeat); decoding is the pgoutput module's job.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::Backend;
use super::progress::Progress;
use super::status::ReplicationStatus;
use super::{ReplicationError, WalConnection};
use crate::lsn::Lsn;

/// Most messages [`ReplicationStream::next_batch`] puts in one batch.
pub const BATCH_MESSAGES: usize = 512;
/// Payload bytes after which [`ReplicationStream::next_batch`] ends a batch:
/// with the source's queue of [`SOURCE_QUEUE_BATCHES`](super::SOURCE_QUEUE_BATCHES)
/// batches, what waits between the source and the change stage stays near
/// a few MiB (plus one message of any size per batch).
pub const BATCH_BYTES: usize = 256 * 1024;

/// How long [`ReplicationStream::next_batch`] waits, once per batch, for
/// more of a large transaction when what had arrived makes a small batch
/// (tokio's timer rounds it up to its 1 ms tick).
pub const COALESCE_WAIT: Duration = Duration::from_micros(500);
/// Messages of one transaction (or stream block) after which batches of it
/// may wait [`COALESCE_WAIT`]: transactions smaller than this are handed on
/// as they arrive.
pub const COALESCE_AFTER: u64 = 256;

/// A message's payload size, for [`BATCH_BYTES`].
fn event_bytes(event: &WalEvent) -> usize {
    match event {
        WalEvent::XLogData { data, .. } => data.len(),
        WalEvent::Keepalive { .. } => 0,
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEvent {
    /// An XLogData message carrying one pgoutput message.
    XLogData {
        /// WAL start of this data (0 for messages that are not the last of a change).
        wal_start: Lsn,
        /// Server's WAL end at sending time (same rule).
        wal_end: Lsn,
        /// Server clock when sent, µs since 2000-01-01 UTC.
        send_time: i64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A primary keepalive: everything before `wal_end` has been sent.
    Keepalive {
        /// The server's sent position.
        wal_end: Lsn,
        /// Server clock when sent, µs since 2000-01-01 UTC.
        send_time: i64,
    },
}

/// Default of [`StreamConfig::silence_timeout`]: below PostgreSQL's default
/// `wal_sender_timeout` (60 s), so walcast gives up on a dead path before the
/// server does.
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Tuning of the stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Status updates at least this often; keep it ≤ 1 s and ≤ half of the
    /// server's `wal_sender_timeout`.
    pub status_interval: Duration,
    /// A stream that receives nothing at all (no data, no keepalive) for this
    /// long while it waits ends with [`ReplicationError::Silent`]; after a
    /// third of it the status update asks the walsender for a keepalive.
    /// `None`: wait forever.
    pub silence_timeout: Option<Duration>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig { status_interval: Duration::from_secs(1), silence_timeout: Some(DEFAULT_SILENCE_TIMEOUT) }
    }
}

/// Downstream's acknowledgement of processed transactions: the `end_lsn` of
/// the last transaction fully handed on. Cloneable; acknowledgements only move
/// forward. It also carries the shared [`ReplicationStatus`] (progress, state,
/// lag) that metrics and readiness read.
#[derive(Debug, Clone, Default)]
pub struct AckHandle(Arc<ReplicationStatus>);

impl AckHandle {
    /// A handle starting at `lsn`.
    pub fn new(lsn: Lsn) -> Self {
        let status = ReplicationStatus::default();
        status.acked.store(lsn.0, Ordering::Release);
        AckHandle(Arc::new(status))
    }

    /// Acknowledges everything up to `end_lsn` (a Commit's `end_lsn`).
    pub fn ack(&self, end_lsn: Lsn) {
        self.0.acked.fetch_max(end_lsn.0, Ordering::AcqRel);
    }

    /// The highest acknowledged position.
    pub fn acked(&self) -> Lsn {
        self.0.acked()
    }

    /// The shared progress and state of replication.
    pub fn status(&self) -> &ReplicationStatus {
        &self.0
    }
}

/// A started replication stream.
#[derive(Debug)]
pub struct ReplicationStream {
    conn: WalConnection,
    ack: AckHandle,
    config: StreamConfig,
    /// Highest WAL position received (`write`).
    received: Lsn,
    /// Last `flush` reported; never reported lower again.
    reported_flush: Lsn,
    /// Transaction boundaries and keepalives seen: the acknowledgement rule.
    progress: Progress,
    /// XLogData messages since the last Begin or Stream Start (see
    /// [`COALESCE_AFTER`]).
    tx_messages: u64,
    next_status: Instant,
}

impl ReplicationStream {
    /// Wraps a connection on which `START_REPLICATION` succeeded. `confirmed`
    /// is the slot's `confirmed_flush_lsn` (nothing lower is ever reported).
    pub fn new(conn: WalConnection, ack: AckHandle, config: StreamConfig, confirmed: Lsn) -> Self {
        ack.ack(confirmed);
        ack.status().stream_started(confirmed);
        // Progress acknowledged on an earlier connection that the slot has
        // not heard of (that connection broke within a status interval) is
        // reported at once: otherwise connections that keep breaking within
        // a second never move the slot, and each reconnect replays more.
        let next_status =
            if ack.acked() > confirmed { Instant::now() } else { Instant::now() + config.status_interval };
        ReplicationStream {
            conn,
            ack,
            next_status,
            config,
            received: confirmed,
            reported_flush: confirmed,
            progress: Progress::new(confirmed),
            tx_messages: 0,
        }
    }

    /// The acknowledgement handle downstream uses.
    pub fn ack_handle(&self) -> AckHandle {
        self.ack.clone()
    }

    /// Highest WAL position received.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// The backend pid of the walsender.
    pub fn pid(&self) -> i32 {
        self.conn.pid()
    }

    /// The next message. Sends status updates when due or asked for while it
    /// waits.
    ///
    /// # Errors
    /// I/O, EOF, server errors (e.g. a publication that does not exist).
    ///
    /// Silence is counted from the call: every message returns, so a call
    /// that waits past [`StreamConfig::silence_timeout`] has seen nothing
    /// for that long (time spent not reading, under downstream
    /// backpressure, is not the link's fault and does not count).
    pub async fn next(&mut self) -> Result<WalEvent, ReplicationError> {
        let silence = self.config.silence_timeout;
        let waiting_since = Instant::now();
        let silent_at = silence.map(|timeout| waiting_since + timeout);
        let ping_at = silence.map(|timeout| waiting_since + timeout / 3);
        let mut pinged = false;
        loop {
            let wake = silent_at.map_or(self.next_status, |at| at.min(self.next_status));
            let msg = match tokio::time::timeout_at(wake, self.conn.read()).await {
                Err(_elapsed) => {
                    let now = Instant::now();
                    if let (Some(at), Some(timeout)) = (silent_at, silence) {
                        if now >= at {
                            return Err(ReplicationError::Silent(timeout));
                        }
                    }
                    if now >= self.next_status {
                        // An idle but healthy walsender may send nothing
                        // for a long time (it sends keepalives on its own
                        // only when our replies stop): ask it for one.
                        let ping = !pinged && ping_at.is_some_and(|at| now >= at);
                        pinged |= ping;
                        let send = self.send_status(ping);
                        match silent_at {
                            // A write blocked on a dead path must not outlive
                            // the deadline either (flush is cancel-safe).
                            Some(at) => match tokio::time::timeout_at(at, send).await {
                                Ok(result) => result?,
                                Err(_) => return Err(ReplicationError::Silent(silence.unwrap_or_default())),
                            },
                            None => send.await?,
                        }
                    }
                    continue;
                }
                Ok(msg) => msg?,
            };
            if let Some(event) = self.on_backend(msg).await? {
                return Ok(event);
            }
        }
    }

    /// One backend message: the event it carries, if any.
    async fn on_backend(&mut self, msg: Backend) -> Result<Option<WalEvent>, ReplicationError> {
        match msg {
            Backend::CopyData(payload) => self.on_copy_data(payload).await,
            Backend::CopyDone => Err(ReplicationError::Eof),
            Backend::Other(postgres_protocol::message::backend::Message::ErrorResponse(body)) => {
                Err(super::PgError::from_body(&body)?.into())
            }
            Backend::Other(_) | Backend::CopyBoth => Ok(None),
        }
    }

    async fn on_copy_data(&mut self, payload: Bytes) -> Result<Option<WalEvent>, ReplicationError> {
        self.ack.status().count_message(payload.len());
        match payload.first() {
            Some(b'w') => {
                if payload.len() < 25 {
                    return Err(ReplicationError::Protocol(format!("XLogData of {} bytes", payload.len())));
                }
                let wal_start = Lsn(read_u64(&payload[1..9]));
                let wal_end = Lsn(read_u64(&payload[9..17]));
                let send_time = read_u64(&payload[17..25]) as i64;
                let data = payload.slice(25..);
                // Positions of 0 mark messages that are not the last of a change.
                self.received = self.received.max(wal_start).max(wal_end);
                self.ack.status().on_data(self.received, data.first() == Some(&b'B'));
                self.track_transaction(&data);
                self.on_logical_message(&data, wal_start.max(wal_end));
                Ok(Some(WalEvent::XLogData { wal_start, wal_end, send_time, data }))
            }
            Some(b'k') => {
                if payload.len() < 18 {
                    return Err(ReplicationError::Protocol(format!("keepalive of {} bytes", payload.len())));
                }
                let wal_end = Lsn(read_u64(&payload[1..9]));
                let send_time = read_u64(&payload[9..17]) as i64;
                let reply = payload[17] != 0;
                self.progress.on_keepalive(wal_end);
                self.received = self.received.max(wal_end);
                self.ack.status().on_keepalive(wal_end, self.received);
                if reply {
                    self.send_status(false).await?;
                }
                Ok(Some(WalEvent::Keepalive { wal_end, send_time }))
            }
            Some(other) => Err(ReplicationError::Protocol(format!("unknown copy message {:?}", *other as char))),
            None => Err(ReplicationError::Protocol("empty copy message".into())),
        }
    }

    /// A non-transactional logical decoding message outside any transaction
    /// (the heartbeat, see [`super::heartbeat`]) is progress like a
    /// keepalive: logical decoding sends in WAL order, so every transaction
    /// committed before `position` has been sent, and with nothing pending it
    /// may be reported flushed. Without this, each heartbeat would read as
    /// unprocessed WAL, and the lag would count from the last commit, however
    /// old.
    fn on_logical_message(&mut self, data: &Bytes, position: Lsn) {
        // Position 0 marks a message that is not the last of its change: no progress to take.
        if data.first() != Some(&b'M') || !self.progress.outside_transactions() || position == Lsn::ZERO {
            return;
        }
        let Ok(crate::pgoutput::Message::LogicalMessage(message)) = crate::pgoutput::decode(data) else { return };
        if message.is_transactional() {
            return;
        }
        if message.prefix == super::heartbeat::HEARTBEAT_PREFIX {
            self.ack.status().count_heartbeat_received();
        }
        self.progress.on_keepalive(position);
        self.ack.status().on_keepalive(position, self.received);
    }

    /// Follows transaction boundaries (see [`Progress::on_pgoutput`]) and
    /// publishes them to the status snapshot.
    fn track_transaction(&mut self, data: &[u8]) {
        self.tx_messages = match data.first() {
            Some(b'B' | b'S') => 0,
            _ => self.tx_messages.saturating_add(1),
        };
        if self.progress.on_pgoutput(data) {
            self.ack.status().on_transaction(self.progress.in_transaction, self.progress.last_commit_end);
        }
    }

    /// The `flush` position to report now (the rule: [`Progress::flush`]).
    fn flush_position(&self) -> Lsn {
        self.progress.flush(self.ack.acked(), self.reported_flush)
    }

    /// Sends a standby status update now.
    ///
    /// # Errors
    /// I/O.
    pub async fn send_status(&mut self, reply_requested: bool) -> Result<(), ReplicationError> {
        let flush = self.flush_position();
        let write = self.received.max(flush);
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(write.0);
        msg.put_u64(flush.0);
        msg.put_u64(flush.0);
        msg.put_i64(pg_now_micros());
        msg.put_u8(u8::from(reply_requested));
        self.conn.queue_copy_data(&msg)?;
        self.conn.flush().await?;
        self.reported_flush = flush;
        self.ack.status().on_status(flush);
        self.next_status = Instant::now() + self.config.status_interval;
        tracing::trace!(%write, %flush, "standby status update");
        Ok(())
    }

    /// The last `flush` position reported to the server.
    pub fn reported_flush(&self) -> Lsn {
        self.reported_flush
    }

    /// The next batch of messages, appended to `batch`: waits for the first
    /// as [`ReplicationStream::next`] does (status timer, silence deadline),
    /// then takes every further message already received — buffered, or
    /// readable from the socket without waiting — up to
    /// [`BATCH_MESSAGES`] messages or [`BATCH_BYTES`] of payload (a single
    /// larger message is a batch of its own). One wake-up downstream per
    /// batch instead of one per message is what keeps a backlog's drain
    /// cheap. Only inside a transaction that has already sent
    /// [`COALESCE_AFTER`] messages does a batch wait, once, one
    /// [`COALESCE_WAIT`] tick for more (before or after reading); a batch
    /// holding its transaction's Commit is handed on without waiting, so a
    /// Commit arrives at most one tick later than it would have.
    ///
    /// # Errors
    /// As [`ReplicationStream::next`]; messages appended before the error
    /// stay in `batch`.
    pub async fn next_batch(&mut self, batch: &mut Vec<WalEvent>) -> Result<(), ReplicationError> {
        let mut bytes = 0;
        // Mid-way through a large transaction, more is certainly coming:
        // waiting a tick before reading (rather than waking at its first
        // byte) lets a whole batch gather for one wake-up.
        let mut coalesced = self.coalescing();
        if coalesced {
            tokio::time::sleep(COALESCE_WAIT).await;
        }
        let first = self.next().await?;
        bytes += event_bytes(&first);
        batch.push(first);
        loop {
            while batch.len() < BATCH_MESSAGES && bytes < BATCH_BYTES {
                let Some(msg) = self.conn.read_ready()? else { break };
                if let Some(event) = self.on_backend(msg).await? {
                    bytes += event_bytes(&event);
                    batch.push(event);
                }
            }
            let full = batch.len() >= BATCH_MESSAGES || bytes >= BATCH_BYTES;
            if full || coalesced || !self.coalescing() {
                return Ok(());
            }
            // Deep inside a large transaction the walsender is replaying
            // committed WAL message by message: waiting a tick lets a batch
            // gather instead of waking both stages per message, and delays
            // nothing a client could see sooner (the transaction's Commit is
            // still to come; it arrives at most one tick later).
            coalesced = true;
            tokio::time::sleep(COALESCE_WAIT).await;
        }
    }

    /// Whether [`ReplicationStream::next_batch`] may wait for more: inside a
    /// transaction (or stream block) that has already sent
    /// [`COALESCE_AFTER`] messages, so small transactions never wait.
    fn coalescing(&self) -> bool {
        !self.progress.outside_transactions() && self.tx_messages >= COALESCE_AFTER
    }

    /// Moves batches of messages ([`ReplicationStream::next_batch`]) into
    /// `out` until shutdown or an error, answering the status timer also
    /// while `out` is full, so backpressure never starves the server of
    /// feedback.
    ///
    /// # Errors
    /// [`ReplicationError::Shutdown`] when `shutdown` fires (after a final
    /// status update), or the stream's error.
    pub async fn pump(
        &mut self,
        out: &mpsc::Sender<Vec<WalEvent>>,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicationError> {
        self.pump_into(out, |batch| batch, shutdown).await
    }

    /// As [`ReplicationStream::pump`], each batch wrapped by `wrap` (the
    /// source sends them as [`super::SourceEvent::Wal`], without a hop
    /// through another task).
    ///
    /// # Errors
    /// As [`ReplicationStream::pump`].
    pub async fn pump_into<T>(
        &mut self,
        out: &mpsc::Sender<T>,
        wrap: impl Fn(Vec<WalEvent>) -> T,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicationError> {
        loop {
            // 1. shutdown, 2. status timer while waiting for capacity, 3. capacity.
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.send_status(false).await?;
                    return Err(ReplicationError::Shutdown);
                }
                _ = tokio::time::sleep_until(self.next_status) => {
                    self.send_status(false).await?;
                    continue;
                }
                permit = out.reserve() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return Err(ReplicationError::Shutdown),
                },
            };
            let mut batch = Vec::with_capacity(64);
            let result = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.send_status(false).await?;
                    return Err(ReplicationError::Shutdown);
                }
                result = self.next_batch(&mut batch) => result,
            };
            // What arrived before an error is passed on: it was received in
            // order and downstream may still use it (a reconnect replays
            // whatever is not acknowledged).
            if !batch.is_empty() {
                permit.send(wrap(batch));
            }
            result?;
        }
    }

    /// Ends streaming cleanly: a final status update, CopyDone, and reading
    /// until the server is ready for commands again. Returns the connection.
    ///
    /// # Errors
    /// I/O or a server error while ending.
    pub async fn stop(mut self) -> Result<WalConnection, ReplicationError> {
        self.send_status(false).await?;
        self.conn.queue_copy_done();
        self.conn.flush().await?;
        loop {
            // Keepalives may still arrive after the server's CopyDone.
            match self.conn.read().await? {
                Backend::Other(postgres_protocol::message::backend::Message::ReadyForQuery(_)) => return Ok(self.conn),
                Backend::Other(postgres_protocol::message::backend::Message::ErrorResponse(body)) => {
                    return Err(super::PgError::from_body(&body)?.into())
                }
                _ => {}
            }
        }
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(raw)
}

/// Now, in µs since 2000-01-01 UTC.
fn pg_now_micros() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    unix - PG_EPOCH_OFFSET_MICROS
}
