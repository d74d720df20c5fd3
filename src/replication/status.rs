//! The replication progress shared by the stream, the source task, the hub
//! and the monitor (`/metrics`, `/ready`): plain atomics, written as things
//! happen and read without locks.
//!
//! ```text
//!  ReplicationStream ── received, keepalive_end, in_transaction, last_commit_end,
//!                       reported_flush, behind_since, message/byte counters
//!  run_source ───────── state (starting → streaming ⇄ disconnected → failed | stopped), last error
//!  relay ────────────── failed (a stage's error), stopped
//!  hub ──────────────── acked (AckHandle::ack), open and handled commit timestamps
//!                              │
//!                              ▼ ReplicationStatus::lag, ::state, ::error
//!                       monitor (metrics, readiness)
//! ```
//!
//! It lives inside [`AckHandle`](super::AckHandle), which every party already
//! holds, so no signature changes were needed to share it.
//!
//! # Lag
//!
//! *Bytes*: `received − processed`. `received` is the highest WAL position
//! the server sent (XLogData) or reported in a keepalive; `processed` is what
//! the slot may be told is flushed — the stream's own rule (see
//! [`super`]): the last acknowledged `end_lsn`, or, when no received
//! transaction is pending, the latest keepalive's `wal_end`. During a
//! catch-up the walsender only reports what it has decoded so far, so this is
//! walcast's own backlog; the slot watchdog reports the server's view
//! (`pg_current_wal_lsn() − confirmed_flush_lsn`).
//!
//! *Seconds*: 0 when nothing received is unprocessed. Otherwise `now − t`,
//! where `t` is, by preference:
//! 1. the commit time of the transaction the hub has open (changes arrive in
//!    commit order, so nothing older is pending);
//! 2. else the later of the last handled commit time and the moment this
//!    "behind" episode began, when the episode began after the server had
//!    shown us caught up (a keepalive on this connection): both bound the age
//!    of the oldest pending change from above, and the second keeps a
//!    transaction after a long idle spell from reading as hours of lag;
//! 3. else the time streaming started on this connection.
//!
//! Either way, once nothing at all has arrived from the walsender for half
//! the replication timeout, the seconds are at least the time since the last
//! message ([`ReplicationStatus::silence`]): a silently dead link otherwise
//! reads as caught up (0 bytes pending) while changes pile up on the server.
//!
//! Commit times come from the server's clock: skew shows up as lag (clamped
//! at 0 when the server is ahead).
//!
//! Invariants: writers are the stream (one per connection at a time), the
//! source task, the relay and the hub; every field has one writer role;
//! nothing here allocates except [`ReplicationStatus::error`] text, written
//! only on errors.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::lsn::Lsn;

/// What the replication source is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Not yet streaming (first connection).
    Starting,
    /// `START_REPLICATION` succeeded; messages flow.
    Streaming,
    /// A transient error interrupted streaming; reconnecting with backoff.
    Disconnected,
    /// A definite error (or a failed stage) stopped the pipeline.
    Failed,
    /// Stopped by shutdown.
    Stopped,
}

impl SourceState {
    /// Every state, for labelled gauges.
    pub const ALL: [SourceState; 5] = [
        SourceState::Starting,
        SourceState::Streaming,
        SourceState::Disconnected,
        SourceState::Failed,
        SourceState::Stopped,
    ];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceState::Starting => "starting",
            SourceState::Streaming => "streaming",
            SourceState::Disconnected => "disconnected",
            SourceState::Failed => "failed",
            SourceState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> SourceState {
        SourceState::ALL.get(usize::from(v)).copied().unwrap_or(SourceState::Failed)
    }
}

/// Replication lag (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// WAL received (or reported) but not yet processed.
    pub bytes: u64,
    /// Age of the oldest unprocessed change, in seconds (0 when caught up).
    pub seconds: f64,
}

/// Microseconds since the Unix epoch, now.
pub fn unix_micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The shared progress. Reach it through [`AckHandle::status`](super::AckHandle::status).
#[derive(Debug, Default)]
pub struct ReplicationStatus {
    /// `end_lsn` of the last transaction downstream handed on (hub).
    pub(super) acked: AtomicU64,
    /// [`SourceState`] as `u8` (source task, relay).
    state: AtomicU8,
    /// Why the source is disconnected or failed (written on errors only).
    error: Mutex<Option<String>>,
    /// Highest WAL position received or reported by the server (stream).
    received: AtomicU64,
    /// Last keepalive `wal_end` on this connection (stream).
    keepalive_end: AtomicU64,
    /// Between a received Begin and its Commit (stream).
    in_transaction: AtomicBool,
    /// `end_lsn` of the last Commit received (stream).
    last_commit_end: AtomicU64,
    /// Last `flush` sent in a standby status update (stream).
    reported_flush: AtomicU64,
    /// A keepalive arrived on this connection: the server showed us its end (stream).
    synced: AtomicBool,
    /// Unix µs when the current "behind" episode began; 0 = not known (stream).
    behind_since: AtomicI64,
    /// Unix µs when streaming started on this connection (stream).
    streaming_since: AtomicI64,
    /// Unix µs of the last keepalive received (stream).
    last_keepalive: AtomicI64,
    /// CopyData messages received (stream).
    messages: AtomicU64,
    /// Unix µs of the last message received from the walsender, or of the
    /// stream's start; 0 = never streamed (stream).
    last_message: AtomicI64,
    /// Silence longer than this (µs) counts as lag and makes the link
    /// silent for readiness; 0 = never (source task, from the deadline).
    silence_grace: AtomicI64,
    /// Heartbeats written on the SQL connection (heartbeat task).
    heartbeats_sent: AtomicU64,
    /// Heartbeats that failed or timed out (heartbeat task).
    heartbeat_errors: AtomicU64,
    /// Heartbeats received back through the slot (stream).
    heartbeats_received: AtomicU64,
    /// CopyData payload bytes received (stream).
    bytes: AtomicU64,
    /// Times streaming started (source task).
    connects: AtomicU64,
    /// Transient interruptions (source task).
    interruptions: AtomicU64,
    /// Commit time (unix µs) of the transaction the hub has open; 0 = none (hub).
    open_commit: AtomicI64,
    /// Commit time (unix µs) of the last transaction the hub handled; 0 = none (hub).
    handled_commit: AtomicI64,
}

impl ReplicationStatus {
    /// The source's state.
    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The last error (the reason of `disconnected` or `failed`).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Highest WAL position received or reported by the server.
    pub fn received(&self) -> Lsn {
        Lsn(self.received.load(Ordering::Relaxed))
    }

    /// The last acknowledged `end_lsn`.
    pub fn acked(&self) -> Lsn {
        Lsn(self.acked.load(Ordering::Acquire))
    }

    /// The last `flush` position sent to the server.
    pub fn reported_flush(&self) -> Lsn {
        Lsn(self.reported_flush.load(Ordering::Relaxed))
    }

    /// What the slot may be told is flushed now (the stream's rule).
    pub fn processed(&self) -> Lsn {
        super::progress::flush_position(
            Lsn(self.acked.load(Ordering::Acquire)),
            self.in_transaction.load(Ordering::Relaxed),
            Lsn(self.last_commit_end.load(Ordering::Relaxed)),
            Lsn(self.keepalive_end.load(Ordering::Relaxed)),
            Lsn(self.reported_flush.load(Ordering::Relaxed)),
        )
    }

    fn is_behind(&self) -> bool {
        self.received() > self.processed()
    }

    /// The lag at `now_micros` (unix µs). A link silent past the grace
    /// (half the replication timeout) lags at least since its last message:
    /// nothing is known to have been received since.
    pub fn lag(&self, now_micros: i64) -> Lag {
        let bytes = self.received().0.saturating_sub(self.processed().0);
        let silence = self.silence(now_micros).map_or(0.0, |d| d.as_secs_f64());
        if bytes == 0 {
            return Lag { bytes: 0, seconds: silence };
        }
        let since = lag_reference(
            self.open_commit.load(Ordering::Relaxed),
            self.handled_commit.load(Ordering::Relaxed),
            self.behind_since.load(Ordering::Relaxed),
            self.streaming_since.load(Ordering::Relaxed),
        );
        let seconds = if since == 0 { 0.0 } else { now_micros.saturating_sub(since).max(0) as f64 / 1e6 };
        Lag { bytes, seconds: seconds.max(silence) }
    }

    /// How long nothing has arrived from the walsender, when that is longer
    /// than the grace (half the replication timeout: a healthy link answers
    /// the keepalive request sent after a third); `None` while the link is
    /// heard from, before the first stream and without a timeout.
    pub fn silence(&self, now_micros: i64) -> Option<std::time::Duration> {
        let grace = self.silence_grace.load(Ordering::Relaxed);
        let last = self.last_message.load(Ordering::Relaxed);
        if grace <= 0 || last == 0 {
            return None;
        }
        let silent = now_micros.saturating_sub(last);
        (silent > grace).then(|| std::time::Duration::from_micros(silent.unsigned_abs()))
    }

    /// Unix µs of the last message from the walsender (0: never streamed).
    pub fn last_message_micros(&self) -> i64 {
        self.last_message.load(Ordering::Relaxed)
    }

    /// Heartbeats written on the SQL connection.
    pub fn heartbeats_sent(&self) -> u64 {
        self.heartbeats_sent.load(Ordering::Relaxed)
    }

    /// Heartbeats that could not be written in time.
    pub fn heartbeat_errors(&self) -> u64 {
        self.heartbeat_errors.load(Ordering::Relaxed)
    }

    /// Heartbeats received back through the slot.
    pub fn heartbeats_received(&self) -> u64 {
        self.heartbeats_received.load(Ordering::Relaxed)
    }

    /// Unix µs of the last keepalive (0: none yet).
    pub fn last_keepalive_micros(&self) -> i64 {
        self.last_keepalive.load(Ordering::Relaxed)
    }

    /// CopyData messages received.
    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// CopyData payload bytes received.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Times streaming started.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Transient interruptions.
    pub fn interruptions(&self) -> u64 {
        self.interruptions.load(Ordering::Relaxed)
    }

    // ---- source task and relay ----

    /// The replication timeout in force (`None`: none): silence past half
    /// of it is reported (see [`ReplicationStatus::silence`]).
    pub(crate) fn set_silence_timeout(&self, timeout: Option<std::time::Duration>) {
        let grace = timeout.map_or(0, |t| i64::try_from((t / 2).as_micros()).unwrap_or(i64::MAX));
        self.silence_grace.store(grace, Ordering::Relaxed);
    }

    /// A heartbeat was written (`ok`) or failed.
    pub(crate) fn count_heartbeat_sent(&self, ok: bool) {
        let counter = if ok { &self.heartbeats_sent } else { &self.heartbeat_errors };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn set_error(&self, text: String) {
        *self.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text);
    }

    /// Streaming started on a new connection (a failure stays a failure).
    pub(crate) fn set_streaming(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        if self.state() != SourceState::Failed {
            self.state.store(SourceState::Streaming as u8, Ordering::Release);
        }
    }

    /// A transient error; the source reconnects.
    pub(crate) fn set_disconnected(&self, reason: &dyn std::fmt::Display) {
        self.interruptions.fetch_add(1, Ordering::Relaxed);
        if self.state() != SourceState::Failed {
            self.set_error(reason.to_string());
            self.state.store(SourceState::Disconnected as u8, Ordering::Release);
        }
    }

    /// A definite error stopped the pipeline (the first one is kept).
    pub(crate) fn set_failed(&self, reason: String) {
        if self.state() != SourceState::Failed {
            self.set_error(reason);
            self.state.store(SourceState::Failed as u8, Ordering::Release);
        }
    }

    /// Stopped without error (shutdown), unless already failed.
    pub(crate) fn set_stopped(&self) {
        if self.state() != SourceState::Failed {
            self.state.store(SourceState::Stopped as u8, Ordering::Release);
        }
    }

    // ---- stream ----

    /// A new connection streams from `confirmed`.
    pub(super) fn stream_started(&self, confirmed: Lsn) {
        self.received.store(confirmed.0, Ordering::Relaxed);
        self.keepalive_end.store(0, Ordering::Relaxed);
        self.in_transaction.store(false, Ordering::Relaxed);
        self.last_commit_end.store(confirmed.0, Ordering::Relaxed);
        self.reported_flush.store(confirmed.0, Ordering::Relaxed);
        self.synced.store(false, Ordering::Relaxed);
        self.behind_since.store(0, Ordering::Relaxed);
        let now = unix_micros_now();
        self.streaming_since.store(now, Ordering::Relaxed);
        // START_REPLICATION was just answered: the link is heard from.
        self.last_message.store(now, Ordering::Relaxed);
        self.open_commit.store(0, Ordering::Relaxed);
    }

    /// One CopyData message of `len` bytes.
    pub(super) fn count_message(&self, len: usize) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.last_message.store(unix_micros_now(), Ordering::Relaxed);
    }

    /// A heartbeat came back through the slot.
    pub(super) fn count_heartbeat_received(&self) {
        self.heartbeats_received.fetch_add(1, Ordering::Relaxed);
    }

    /// An XLogData: `received` is the stream's new high-water mark; `begin`
    /// when it carries a Begin (a behind episode may start there).
    pub(super) fn on_data(&self, received: Lsn, begin: bool) {
        let was_behind = begin && self.is_behind();
        self.received.store(received.0, Ordering::Relaxed);
        if begin && !was_behind {
            // Fresh episode: known to start now only if the server showed us
            // caught up on this connection.
            let since = if self.synced.load(Ordering::Relaxed) { unix_micros_now() } else { 0 };
            self.behind_since.store(since, Ordering::Relaxed);
        }
    }

    /// Transaction boundaries seen by the stream.
    pub(super) fn on_transaction(&self, in_transaction: bool, last_commit_end: Lsn) {
        self.in_transaction.store(in_transaction, Ordering::Relaxed);
        self.last_commit_end.store(last_commit_end.0, Ordering::Relaxed);
    }

    /// A keepalive reporting `wal_end`; `received` is the new high-water mark.
    pub(super) fn on_keepalive(&self, wal_end: Lsn, received: Lsn) {
        let was_behind = self.is_behind();
        self.keepalive_end.fetch_max(wal_end.0, Ordering::Relaxed);
        self.received.store(received.0, Ordering::Relaxed);
        let now = unix_micros_now();
        self.last_keepalive.store(now, Ordering::Relaxed);
        if !self.is_behind() {
            self.behind_since.store(0, Ordering::Relaxed);
        } else if !was_behind && self.synced.load(Ordering::Relaxed) {
            self.behind_since.store(now, Ordering::Relaxed);
        }
        self.synced.store(true, Ordering::Relaxed);
    }

    /// A standby status update reported `flush`.
    pub(super) fn on_status(&self, flush: Lsn) {
        self.reported_flush.store(flush.0, Ordering::Relaxed);
    }

    // ---- hub ----

    /// The hub opened a transaction committed at `commit_micros` (unix µs).
    pub(crate) fn transaction_opened(&self, commit_micros: i64) {
        self.open_commit.store(commit_micros, Ordering::Relaxed);
    }

    /// The hub handled (and acknowledged) a transaction committed at `commit_micros`.
    pub(crate) fn transaction_handled(&self, commit_micros: i64) {
        self.handled_commit.store(commit_micros, Ordering::Relaxed);
        self.open_commit.store(0, Ordering::Relaxed);
    }
}

/// The time lag is measured from (see the module doc); 0 = unknown.
fn lag_reference(open_commit: i64, handled_commit: i64, behind_since: i64, streaming_since: i64) -> i64 {
    if open_commit != 0 {
        return open_commit;
    }
    match handled_commit.max(behind_since) {
        0 => streaming_since,
        t => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;

    #[test]
    fn reference_prefers_the_open_transaction() {
        assert_eq!(lag_reference(5 * S, 9 * S, 9 * S, 1), 5 * S);
        assert_eq!(lag_reference(0, 3 * S, 7 * S, 1), 7 * S, "episode began after the last commit");
        assert_eq!(lag_reference(0, 8 * S, 7 * S, 1), 8 * S);
        assert_eq!(lag_reference(0, 0, 0, 4 * S), 4 * S, "nothing known: since streaming started");
        assert_eq!(lag_reference(0, 0, 0, 0), 0);
    }

    fn streaming(confirmed: u64) -> ReplicationStatus {
        let s = ReplicationStatus::default();
        s.stream_started(Lsn(confirmed));
        s.acked.store(confirmed, Ordering::Release);
        s.set_streaming();
        s
    }

    #[test]
    fn caught_up_means_no_lag() {
        let s = streaming(100);
        assert_eq!(s.lag(unix_micros_now()), Lag { bytes: 0, seconds: 0.0 });
        // A keepalive beyond an idle position is processed at once.
        s.on_keepalive(Lsn(500), Lsn(500));
        assert_eq!(s.processed(), Lsn(500));
        assert_eq!(s.lag(unix_micros_now()).bytes, 0);
    }

    #[test]
    fn a_pending_transaction_is_lag_until_acknowledged() {
        let s = streaming(100);
        s.on_keepalive(Lsn(100), Lsn(100)); // synced
        s.on_data(Lsn(200), true);
        s.on_transaction(true, Lsn(100));
        s.on_data(Lsn(300), false);
        s.on_transaction(false, Lsn(320));
        s.on_data(Lsn(320), false);
        let lag = s.lag(unix_micros_now() + 2 * S);
        assert_eq!(lag.bytes, 220);
        assert!(lag.seconds >= 1.9 && lag.seconds < 10.0, "episode start bounds it: {lag:?}");
        // The hub opens the transaction: its commit time rules.
        let committed = unix_micros_now() - 30 * S;
        s.transaction_opened(committed);
        let lag = s.lag(unix_micros_now());
        assert!(lag.seconds >= 29.0 && lag.seconds < 40.0, "{lag:?}");
        // Acknowledged: caught up.
        s.acked.fetch_max(320, Ordering::AcqRel);
        s.transaction_handled(committed);
        assert_eq!(s.lag(unix_micros_now()), Lag { bytes: 0, seconds: 0.0 });
    }

    #[test]
    fn old_commit_after_idle_is_not_hours_of_lag() {
        let s = streaming(100);
        s.transaction_handled(unix_micros_now() - 3600 * S);
        s.on_keepalive(Lsn(150), Lsn(150));
        // A new transaction after an hour of quiet.
        s.on_data(Lsn(200), true);
        s.on_transaction(true, Lsn(100));
        let lag = s.lag(unix_micros_now());
        assert!(lag.bytes > 0 && lag.seconds < 5.0, "{lag:?}");
    }

    #[test]
    fn unsynced_backlog_is_measured_from_the_last_commit() {
        let s = streaming(100);
        s.transaction_handled(unix_micros_now() - 600 * S);
        // Reconnected with a backlog: no keepalive yet.
        s.on_data(Lsn(200), true);
        let lag = s.lag(unix_micros_now());
        assert!(lag.seconds >= 599.0, "{lag:?}");
    }

    #[test]
    fn a_silent_link_lags_from_its_last_message() {
        let s = streaming(100);
        let now = unix_micros_now();
        assert_eq!(s.silence(now + 3600 * S), None, "no timeout configured: silence is not judged");
        s.set_silence_timeout(Some(std::time::Duration::from_secs(30)));
        assert_eq!(s.silence(now + 10 * S), None, "within the grace (15 s)");
        assert_eq!(s.lag(now + 10 * S), Lag { bytes: 0, seconds: 0.0 });
        let lag = s.lag(now + 20 * S);
        assert_eq!(lag.bytes, 0);
        assert!(lag.seconds >= 19.0 && lag.seconds < 25.0, "{lag:?}");
        // A message resets it.
        s.count_message(10);
        assert_eq!(s.silence(unix_micros_now() + S), None);
    }

    #[test]
    fn failure_is_sticky_and_keeps_the_first_reason() {
        let s = ReplicationStatus::default();
        assert_eq!(s.state(), SourceState::Starting);
        s.set_streaming();
        s.set_disconnected(&"connection reset");
        assert_eq!((s.state(), s.error().as_deref()), (SourceState::Disconnected, Some("connection reset")));
        s.set_failed("slot dropped".into());
        s.set_failed("second".into());
        s.set_stopped();
        s.set_disconnected(&"later");
        assert_eq!((s.state(), s.error().as_deref()), (SourceState::Failed, Some("slot dropped")));
        assert_eq!(s.interruptions(), 2);
    }
}
