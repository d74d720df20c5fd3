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
//! that error; the operator must act.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{AckHandle, ReplicationError, ReplicationStream, SlotOptions, StreamConfig, WalConnection, WalEvent};
use crate::lsn::Lsn;

/// First retry delay after a transient error.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What the source task is told to do.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Connection parameters (parsed from the database URL).
    pub connection: tokio_postgres::Config,
    /// Slot and publications.
    pub slot: SlotOptions,
    /// Status update cadence.
    pub stream: StreamConfig,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
}

/// What the source passes downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
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
    /// A message from the walsender.
    Wal(WalEvent),
}

/// Runs until shutdown or a definite error. Acknowledgements from downstream
/// go through `ack`, which survives reconnects.
///
/// # Errors
/// The definite error that stopped replication; `Ok(())` on shutdown.
pub async fn run_source(
    config: SourceConfig,
    out: mpsc::Sender<SourceEvent>,
    ack: AckHandle,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ReplicationError> {
    let mut backoff = BACKOFF_START;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let result = stream_once(&config, &out, &ack, &mut shutdown, &mut backoff).await;
        match result {
            Err(ReplicationError::Shutdown) => return Ok(()),
            Err(err) if err.is_transient() => {
                tracing::warn!(error = %err, retry_in = ?backoff, "replication interrupted; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(err) => {
                tracing::error!(error = %err, "replication stopped");
                return Err(err);
            }
            Ok(()) => return Ok(()),
        }
    }
}

async fn stream_once(
    config: &SourceConfig,
    out: &mpsc::Sender<SourceEvent>,
    ack: &AckHandle,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), ReplicationError> {
    let mut conn = WalConnection::connect(&config.connection, config.connect_timeout).await?;
    let created = ensure_slot(&mut conn, &config.slot.slot).await?;
    let confirmed = confirmed_flush(&mut conn, &config.slot.slot).await?;
    conn.start_replication(&config.slot, Lsn::ZERO).await?;
    let pid = conn.pid();
    tracing::info!(slot = %config.slot.slot, %confirmed, created, pid, "streaming");
    if out.send(SourceEvent::Started { confirmed, created, pid }).await.is_err() {
        return Err(ReplicationError::Shutdown);
    }
    // Streaming works again: the next interruption starts from a short delay.
    *backoff = BACKOFF_START;
    let mut stream = ReplicationStream::new(conn, ack.clone(), config.stream.clone(), confirmed);
    let (tx, mut rx) = mpsc::channel::<WalEvent>(1);
    // Forward through a one-slot channel so the stream keeps answering its
    // status timer while `out` is full.
    let pump = async {
        let result = stream.pump(&tx, shutdown).await;
        drop(tx);
        result
    };
    let forward = async {
        while let Some(event) = rx.recv().await {
            if out.send(SourceEvent::Wal(event)).await.is_err() {
                return;
            }
        }
    };
    let (result, ()) = tokio::join!(pump, forward);
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

/// Creates the slot when it is missing; returns whether it did.
async fn ensure_slot(conn: &mut WalConnection, slot: &str) -> Result<bool, ReplicationError> {
    match conn.create_slot(slot, false).await {
        Ok(_) => Ok(true),
        Err(err) if err.sqlstate() == Some("42710") => Ok(false),
        Err(err) => Err(err),
    }
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
        None => Ok(Lsn::ZERO),
    }
}
