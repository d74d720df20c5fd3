//! The replication source task: connects, makes sure the slot exists, streams,
//! and reconnects after transient errors with capped exponential backoff.
//!
//! Each (re)connection first yields [`SourceEvent::Started`]: the new
//! walsender resends Relation messages and every transaction after the slot's
//! `confirmed_flush_lsn`, so downstream must reset its per-connection state
//! (relation cache, a transaction left open by the broken connection) when it
//! sees it. Changes of a transaction interrupted mid-way may therefore be seen
//! twice: delivery is at-least-once, never lossy.
//!
//! A definite error (see [`ReplicationError::is_transient`]) ends the task with
//! that error; the operator must act. The task records what it is doing in
//! the [`ReplicationStatus`](super::ReplicationStatus) of its [`AckHandle`]
//! (streaming, disconnected with the error, failed with the error, stopped),
//! which `/ready` reports.
//!
//! The slot is created only by the task's first connection; with
//! [`SlotOptions::failover`] (PostgreSQL 17+) as a failover slot, and an
//! existing slot without failover is altered to one. With
//! [`SourceConfig::export_snapshot`], creating it exports a snapshot and the
//! task hands it downstream as [`SourceEvent::Snapshot`], waiting until the
//! lease is released (the snapshot lives only until the walsender runs its
//! next command), so downstream can read the database exactly as of the
//! slot's consistent point. A slot that disappears after streaming started
//! is a definite error: WAL since then is gone for walcast, and recreating
//! the slot silently would skip it.

use std::time::Duration;

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::heartbeat::{self, HeartbeatConfig};
use super::{AckHandle, ReplicationError, ReplicationStream, SlotOptions, StreamConfig, WalConnection, WalEvent};
use crate::lsn::Lsn;
use crate::pgconn::PgConfig;

/// First retry delay after a transient error.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The capacity (in [`SourceEvent`]s, each up to a batch of
/// [`BATCH_MESSAGES`](super::stream::BATCH_MESSAGES) messages or
/// [`BATCH_BYTES`](super::stream::BATCH_BYTES)) the relay gives the channel
/// into which [`run_source`] sends: about 4 MiB of pgoutput in flight.
pub const SOURCE_QUEUE_BATCHES: usize = 16;

/// What the source task is told to do.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Connection parameters (parsed from the database URL), TLS included;
    /// the SQL connections of the relay and catalog use them too.
    pub connection: PgConfig,
    /// Slot and publications.
    pub slot: SlotOptions,
    /// Status update cadence.
    pub stream: StreamConfig,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
    /// When the slot has to be created, export its snapshot downstream.
    pub export_snapshot: bool,
    /// The end-to-end heartbeat (`None`: off); see [`super::heartbeat`].
    pub heartbeat: Option<HeartbeatConfig>,
}

impl SourceConfig {
    /// Defaults: status every second, 10 s connect timeout, no snapshot
    /// export, a heartbeat every 5 s and a 30 s silence deadline.
    /// `connection` is a [`PgConfig`] or a tokio-postgres config (see
    /// [`WalConnection::connect`]).
    pub fn new(connection: impl Into<PgConfig>, slot: SlotOptions) -> Self {
        SourceConfig {
            connection: connection.into(),
            slot,
            stream: StreamConfig::default(),
            connect_timeout: Duration::from_secs(10),
            export_snapshot: false,
            heartbeat: Some(HeartbeatConfig::default()),
        }
    }
}

impl SourceConfig {
    /// Gives [`SourceConfig::connection`] TCP keepalive and
    /// `TCP_USER_TIMEOUT` matching the silence deadline (see
    /// [`PgConfig::set_tcp_liveness`]), so every connection made with it —
    /// replication, heartbeat, and the SQL ones of whoever shares it — fails
    /// at the kernel level within about the same time.
    pub fn apply_tcp_liveness(&mut self) {
        if let Some(timeout) = self.stream.silence_timeout {
            self.connection.set_tcp_liveness(timeout);
        }
    }
}

/// Longest wait for downstream to release an exported snapshot.
const SNAPSHOT_LEASE_MAX: Duration = Duration::from_secs(600);

/// An exported snapshot, valid until released (or every clone dropped).
#[derive(Debug, Clone)]
pub struct SnapshotLease {
    /// The snapshot's name, for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
    /// The slot's consistent point: the first transaction streamed commits
    /// after it, and the snapshot sees exactly everything before it.
    pub consistent_point: Lsn,
    release: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl SnapshotLease {
    /// Lets the source go on (the snapshot becomes invalid).
    pub fn release(&self) {
        if let Some(tx) = self.release.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = tx.send(());
        }
    }
}

impl PartialEq for SnapshotLease {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.consistent_point == other.consistent_point
    }
}

impl Eq for SnapshotLease {}

/// What the source passes downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The slot was just created with an exported snapshot (only with
    /// [`SourceConfig::export_snapshot`]); streaming waits for its release.
    Snapshot(SnapshotLease),
    /// A (re)connection started streaming from the slot; downstream resets its
    /// per-connection state.
    Started {
        /// The slot's `confirmed_flush_lsn` when streaming started.
        confirmed: Lsn,
        /// Whether the slot was created by this connection.
        created: bool,
        /// The walsender's process id.
        pid: i32,
    },
    /// Messages from the walsender, in the order received: what had arrived
    /// together (see [`ReplicationStream::next_batch`]), never empty.
    Wal(Vec<WalEvent>),
}

/// Runs until shutdown or a definite error. Acknowledgements from downstream
/// go through `ack`, which survives reconnects. The heartbeat (when
/// configured) runs alongside for as long as the source does, through
/// reconnects, so the link it probes is judged the same way each time.
///
/// # Errors
/// The definite error that stopped replication; `Ok(())` on shutdown.
pub async fn run_source(
    mut config: SourceConfig,
    out: mpsc::Sender<SourceEvent>,
    ack: AckHandle,
    shutdown: CancellationToken,
) -> Result<(), ReplicationError> {
    config.apply_tcp_liveness();
    ack.status().set_silence_timeout(config.stream.silence_timeout);
    let beats = async {
        match config.heartbeat.clone() {
            Some(beat) => heartbeat::run(config.connection.clone(), beat, ack.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = supervise(&config, out, &ack, shutdown) => result,
        () = beats => Ok(()),
    }
}

/// The reconnect loop of [`run_source`].
async fn supervise(
    config: &SourceConfig,
    out: mpsc::Sender<SourceEvent>,
    ack: &AckHandle,
    shutdown: CancellationToken,
) -> Result<(), ReplicationError> {
    let mut backoff = BACKOFF_START;
    let mut streamed_before = false;
    let mut config = std::borrow::Cow::Borrowed(config);
    loop {
        if shutdown.is_cancelled() {
            ack.status().set_stopped();
            return Ok(());
        }
        let result = stream_once(&config, &out, ack, &shutdown, &mut backoff, &mut streamed_before).await;
        match result {
            Err(ReplicationError::Shutdown) | Ok(()) => {
                ack.status().set_stopped();
                return Ok(());
            }
            Err(err) if missing_optional(&err, &config.slot).is_some() => {
                // pgoutput (before PostgreSQL 18) reads the publications as
                // of each change it decodes: an optional publication created
                // after the slot's position fails every change before it.
                // Stream without it rather than fail the whole relay; the
                // next start of walcast (past that point by then) has it.
                let name = missing_optional(&err, &config.slot).unwrap_or_default().to_owned();
                tracing::warn!(
                    publication = %name,
                    error = %err,
                    "the slot's position predates this publication; streaming without it until walcast restarts"
                );
                config.to_mut().slot.optional_publications.retain(|p| *p != name);
            }
            Err(err) if err.is_transient() => {
                ack.status().set_disconnected(&err);
                tracing::warn!(error = %err, retry_in = ?backoff, "replication interrupted; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(err) => {
                ack.status().set_failed(format!("replication failed: {err}"));
                tracing::error!(error = %err, "replication stopped");
                return Err(err);
            }
        }
    }
}

async fn stream_once(
    config: &SourceConfig,
    out: &mpsc::Sender<SourceEvent>,
    ack: &AckHandle,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
    streamed_before: &mut bool,
) -> Result<(), ReplicationError> {
    let mut conn = WalConnection::connect(&config.connection, config.connect_timeout).await?;
    let created = if *streamed_before {
        false
    } else {
        match ensure_slot(&mut conn, &config.slot, config.export_snapshot).await? {
            Some(slot) => {
                if let Some(name) = slot.snapshot_name {
                    let (tx, rx) = oneshot::channel();
                    let lease = SnapshotLease {
                        name,
                        consistent_point: slot.consistent_point,
                        release: Arc::new(Mutex::new(Some(tx))),
                    };
                    if out.send(SourceEvent::Snapshot(lease)).await.is_err() {
                        return Err(ReplicationError::Shutdown);
                    }
                    tokio::select! {
                        _ = rx => {}
                        _ = tokio::time::sleep(SNAPSHOT_LEASE_MAX) => {
                            tracing::warn!("the exported snapshot was not released in time; streaming anyway");
                        }
                        () = shutdown.cancelled() => return Err(ReplicationError::Shutdown),
                    }
                }
                true
            }
            None => false,
        }
    };
    // Bounded like the connect: a path gone quiet right after it must not
    // hang the source before its stream's own deadline applies.
    let start = async {
        let confirmed = confirmed_flush(&mut conn, &config.slot.slot).await?;
        *streamed_before = true;
        let mut slot = config.slot.clone();
        slot.publications = conn.publication_names(&config.slot).await?;
        slot.optional_publications.clear();
        conn.start_replication(&slot, Lsn::ZERO).await?;
        Ok::<_, ReplicationError>(confirmed)
    };
    let confirmed = match tokio::time::timeout(config.connect_timeout, start).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("START_REPLICATION was not answered within {:?}", config.connect_timeout),
            )))
        }
    };
    ack.status().set_streaming();
    let pid = conn.pid();
    tracing::info!(slot = %config.slot.slot, %confirmed, created, pid, "streaming");
    if out.send(SourceEvent::Started { confirmed, created, pid }).await.is_err() {
        return Err(ReplicationError::Shutdown);
    }
    // Streaming works again: the next interruption starts from a short delay.
    *backoff = BACKOFF_START;
    let mut stream = ReplicationStream::new(conn, ack.clone(), config.stream.clone(), confirmed);
    // Straight into `out`, a batch per hand-off: the stream keeps answering
    // its status timer while `out` is full (see `ReplicationStream::pump`).
    let result = stream.pump_into(out, SourceEvent::Wal, shutdown).await;
    match result {
        Err(ReplicationError::Shutdown) => {
            // Best effort: tell the server where we are and close cleanly.
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), stream.stop()).await {
                conn.terminate().await;
            }
            Err(ReplicationError::Shutdown)
        }
        other => other,
    }
}

/// The optional publication a server error says is missing (`42704`
/// naming it), if any.
fn missing_optional<'a>(err: &ReplicationError, slot: &'a SlotOptions) -> Option<&'a str> {
    let ReplicationError::Server { err } = err else { return None };
    if err.code != "42704" || !err.message.contains("publication") {
        return None;
    }
    slot.optional_publications.iter().map(String::as_str).find(|name| err.message.contains(&format!("\"{name}\"")))
}

/// Creates the slot when it is missing; returns it when it did. With
/// [`SlotOptions::failover`] the slot is created as a failover slot, and an
/// existing one without failover is altered to it (a failover slot a
/// standby synchronized, found after its promotion, is used as it is).
async fn ensure_slot(
    conn: &mut WalConnection,
    options: &SlotOptions,
    export_snapshot: bool,
) -> Result<Option<super::CreatedSlot>, ReplicationError> {
    let slot = options.slot.as_str();
    match conn.create_slot_with(slot, export_snapshot, options.failover).await {
        Ok(created) => Ok(Some(created)),
        Err(err) if err.sqlstate() == Some("42710") => {
            if options.failover && !is_failover_slot(conn, slot).await? {
                conn.set_slot_failover(slot).await?;
                tracing::info!(slot, "the existing slot is a failover slot now");
            }
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Whether `slot` is a failover slot (`pg_replication_slots.failover`,
/// PostgreSQL 17+), read over the walsender connection.
async fn is_failover_slot(conn: &mut WalConnection, slot: &str) -> Result<bool, ReplicationError> {
    let sql = format!(
        "SELECT failover FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
        super::slot::quote_literal(slot)
    );
    Ok(conn.simple_query(&sql).await?.first("failover") == Some("t"))
}

/// The slot's `confirmed_flush_lsn`, read over the walsender connection (a
/// logical walsender also runs plain SQL).
async fn confirmed_flush(conn: &mut WalConnection, slot: &str) -> Result<Lsn, ReplicationError> {
    let sql = format!(
        "SELECT confirmed_flush_lsn::text AS lsn, wal_status FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
        super::slot::quote_literal(slot)
    );
    let result = conn.simple_query(&sql).await?;
    if result.first("wal_status") == Some("lost") {
        return Err(super::PgError {
            severity: "ERROR".into(),
            code: "55000".into(),
            message: format!("replication slot \"{slot}\" has been invalidated (wal_status = lost)"),
            detail: None,
            hint: None,
        }
        .into());
    }
    match result.first("lsn") {
        Some(text) => text.parse().map_err(|_| ReplicationError::Protocol(format!("bad confirmed_flush_lsn {text:?}"))),
        None if result.rows.is_empty() => Err(super::PgError {
            severity: "ERROR".into(),
            code: "42704".into(),
            message: format!("replication slot \"{slot}\" was dropped while walcast was streaming from it"),
            detail: None,
            hint: None,
        }
        .into()),
        None => Ok(Lsn::ZERO),
    }
}
