//! The end-to-end liveness probe: every [`HeartbeatConfig::interval`] a
//! non-transactional logical decoding message with the prefix
//! [`HEARTBEAT_PREFIX`] is written on a SQL connection, and the stream
//! counts it when it comes back through the slot.
//!
//! ```text
//!  heartbeat task ──pg_logical_emit_message(false, 'walcast-hb', now)──▶ WAL
//!                                                                        │ decoded by the walsender
//!  ReplicationStream ◀──────────────── XLogData 'M' (non-transactional) ─┘
//! ```
//!
//! Keepalives show that the walsender process lives; the heartbeat shows
//! that WAL written now is decoded and reaches walcast, so an idle database
//! still has traffic on the link and a link that stopped carrying it is
//! noticed by the stream's silence deadline (see [`super`], "Liveness").
//! Being non-transactional, the message needs no transaction and arrives
//! outside any, where the stream takes its position as progress, so the slot
//! moves forward on an idle database too.
//!
//! Invariants: one SQL connection at a time; every write has a deadline (the
//! interval, at least one second), and a connection that missed it or failed
//! is dropped and made again at the next tick, so a hung connection never
//! stalls the probe. Failures are counted and logged at most once a minute;
//! they never stop replication (the silence deadline judges the link).

use std::time::Duration;

use super::AckHandle;
use crate::pgconn::PgConfig;

/// The prefix of heartbeat messages; transactional messages whose prefix
/// starts with `walcast` are walcast's own markers (passed on by the change
/// stage), this one is not transactional and is not passed on.
pub const HEARTBEAT_PREFIX: &str = "walcast-hb";

/// Default of [`HeartbeatConfig::interval`].
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Least time between two warnings about failing heartbeats.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// How the heartbeat runs.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// Time between two heartbeats.
    pub interval: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig { interval: DEFAULT_HEARTBEAT_INTERVAL }
    }
}

/// The SQL that writes one heartbeat; `$1` is the sender's clock (unix µs,
/// as text), for whoever reads the WAL.
pub const HEARTBEAT_SQL: &str = "select pg_catalog.pg_logical_emit_message(false, 'walcast-hb', $1::text)";

/// Writes heartbeats until the future is dropped (the source task drops it
/// with the stream). Counts into `ack`'s status.
pub async fn run(connection: PgConfig, config: HeartbeatConfig, ack: AckHandle) {
    let deadline = config.interval.max(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<tokio_postgres::Client> = None;
    // PostgreSQL gives up on a stuck heartbeat too, not only walcast.
    let connection = connection.with_statement_timeout(deadline);
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        ticker.tick().await;
        let result = tokio::time::timeout(deadline, beat(&connection, &mut client)).await;
        let error = match result {
            Ok(Ok(())) => {
                ack.status().count_heartbeat_sent(true);
                continue;
            }
            Ok(Err(err)) => crate::pgconn::cause(&err),
            Err(_) => format!("no answer within {deadline:?}"),
        };
        // Whatever went wrong, the next beat starts on a new connection.
        client = None;
        ack.status().count_heartbeat_sent(false);
        if last_warning.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
            tracing::warn!(
                error = %error,
                "could not write the replication heartbeat (pg_logical_emit_message); `walcast check` tells \
                 whether the role may call it"
            );
            last_warning = Some(tokio::time::Instant::now());
        }
    }
}

/// One heartbeat, connecting first when there is no connection.
async fn beat(connection: &PgConfig, client: &mut Option<tokio_postgres::Client>) -> Result<(), tokio_postgres::Error> {
    let conn = match client {
        Some(conn) if !conn.is_closed() => conn,
        _ => client.insert(crate::pgconn::connect(connection).await?),
    };
    let now = super::status::unix_micros_now().to_string();
    conn.execute(HEARTBEAT_SQL, &[&now]).await?;
    Ok(())
}
