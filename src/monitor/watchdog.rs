//! The slot watchdog: a best-effort task that polls `pg_replication_slots`
//! on its own SQL connection and warns before the slot's retained WAL fills
//! the server's disk or passes `max_slot_wal_keep_size` (which invalidates
//! the slot and loses changes).
//!
//! ```text
//!  every interval: connect if needed ──▶ one query ──▶ SlotWatch (atomics) ──▶ /metrics
//!                                                        └─ entering/leaving the warning: log
//! ```
//!
//! The query (the same figures as `sql/monitoring/replication_slots.sql`)
//! reads, for the configured slot: `wal_status`, `active`,
//! `pg_current_wal_lsn() − restart_lsn` (WAL the slot keeps),
//! `pg_current_wal_lsn() − confirmed_flush_lsn` (the server's view of
//! walcast's lag), `safe_wal_size`, and `max_slot_wal_keep_size` through
//! `current_setting` (`-1` = unlimited). On a standby the current position
//! is `pg_last_wal_receive_lsn()`.
//!
//! The warning is on while the retained WAL is above
//! [`WatchdogConfig::warn_fraction`] of `max_slot_wal_keep_size` (when that
//! is not `-1`) or above [`WatchdogConfig::warn_bytes`], or while
//! `wal_status` is `unreserved` or `lost`. It is logged at `warn` (slot name
//! and bytes) when it comes on and at `info` when it clears.
//!
//! Invariants: the watchdog never affects replication — errors (PostgreSQL
//! down, missing privileges) are counted, logged once per streak, and
//! retried at the next interval; the task is aborted, not drained, at
//! shutdown. It logs no connection string. Its connection goes through
//! [`crate::pgconn::connect`]: the same TLS settings as every other SQL
//! connection.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::pgconn::PgConfig;
use crate::replication::status::unix_micros_now;

/// Time allowed to connect and to run the query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sentinel for "not known" in the `i64` gauges.
const UNKNOWN: i64 = i64::MIN;

/// The one query; `$1` is the slot name. One row even when the slot is missing.
const SLOT_QUERY: &str = "\
with pos as (
    select case when pg_is_in_recovery() then pg_last_wal_receive_lsn() else pg_current_wal_lsn() end as lsn
)
select case when current_setting('max_slot_wal_keep_size') = '-1' then -1::int8
            else pg_size_bytes(current_setting('max_slot_wal_keep_size')) end as max_keep,
       s.slot_name is not null as present,
       coalesce(s.active, false) as active,
       s.wal_status,
       pg_wal_lsn_diff(pos.lsn, s.restart_lsn)::int8 as retained,
       pg_wal_lsn_diff(pos.lsn, s.confirmed_flush_lsn)::int8 as confirmed_lag,
       s.safe_wal_size
  from pos
  left join pg_catalog.pg_replication_slots s on s.slot_name = $1";

/// `pg_replication_slots.wal_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalStatus {
    /// Within `max_wal_size`.
    Reserved,
    /// Beyond `max_wal_size`, kept by the slot or `wal_keep_size`.
    Extended,
    /// Will be removed at the next checkpoint: the slot is about to be lost.
    Unreserved,
    /// Removed: the slot is invalidated.
    Lost,
}

impl WalStatus {
    /// Every status, for labelled gauges.
    pub const ALL: [WalStatus; 4] = [WalStatus::Reserved, WalStatus::Extended, WalStatus::Unreserved, WalStatus::Lost];

    /// PostgreSQL's name.
    pub fn as_str(self) -> &'static str {
        match self {
            WalStatus::Reserved => "reserved",
            WalStatus::Extended => "extended",
            WalStatus::Unreserved => "unreserved",
            WalStatus::Lost => "lost",
        }
    }

    fn parse(text: &str) -> Option<WalStatus> {
        WalStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Watchdog settings.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    /// Time between polls.
    pub interval: Duration,
    /// Warn past this fraction of `max_slot_wal_keep_size` (`None`: never).
    pub warn_fraction: Option<f64>,
    /// Warn past this many retained bytes (`None`: never).
    pub warn_bytes: Option<u64>,
}

/// What the last poll found, for `/metrics`. All atomics.
#[derive(Debug)]
pub struct SlotWatch {
    polls: AtomicU64,
    poll_errors: AtomicU64,
    last_poll_micros: AtomicI64,
    present: AtomicBool,
    active: AtomicBool,
    retained: AtomicI64,
    confirmed_lag: AtomicI64,
    safe_wal_size: AtomicI64,
    max_keep: AtomicI64,
    /// 0 = unknown, else 1 + index in [`WalStatus::ALL`].
    wal_status: AtomicU8,
    warning: AtomicBool,
    warnings: AtomicU64,
}

impl Default for SlotWatch {
    fn default() -> Self {
        SlotWatch {
            polls: AtomicU64::new(0),
            poll_errors: AtomicU64::new(0),
            last_poll_micros: AtomicI64::new(0),
            present: AtomicBool::new(false),
            active: AtomicBool::new(false),
            retained: AtomicI64::new(UNKNOWN),
            confirmed_lag: AtomicI64::new(UNKNOWN),
            safe_wal_size: AtomicI64::new(UNKNOWN),
            max_keep: AtomicI64::new(UNKNOWN),
            wal_status: AtomicU8::new(0),
            warning: AtomicBool::new(false),
            warnings: AtomicU64::new(0),
        }
    }
}

fn known(v: i64) -> Option<i64> {
    (v != UNKNOWN).then_some(v)
}

impl SlotWatch {
    /// Successful polls.
    pub fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Failed polls (connection or query errors).
    pub fn poll_errors(&self) -> u64 {
        self.poll_errors.load(Ordering::Relaxed)
    }

    /// Unix µs of the last successful poll (0: none).
    pub fn last_poll_micros(&self) -> i64 {
        self.last_poll_micros.load(Ordering::Relaxed)
    }

    /// The slot exists.
    pub fn present(&self) -> bool {
        self.present.load(Ordering::Relaxed)
    }

    /// A walsender streams from the slot.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// WAL the slot retains (`pg_current_wal_lsn() − restart_lsn`), bytes.
    pub fn retained_bytes(&self) -> Option<i64> {
        known(self.retained.load(Ordering::Relaxed))
    }

    /// `pg_current_wal_lsn() − confirmed_flush_lsn`, bytes.
    pub fn confirmed_lag_bytes(&self) -> Option<i64> {
        known(self.confirmed_lag.load(Ordering::Relaxed))
    }

    /// `safe_wal_size` (bytes left before the slot is at risk; `None` when
    /// unlimited or unknown).
    pub fn safe_wal_size_bytes(&self) -> Option<i64> {
        known(self.safe_wal_size.load(Ordering::Relaxed))
    }

    /// `max_slot_wal_keep_size` in bytes (-1 = unlimited).
    pub fn max_keep_bytes(&self) -> Option<i64> {
        known(self.max_keep.load(Ordering::Relaxed))
    }

    /// `wal_status`.
    pub fn wal_status(&self) -> Option<WalStatus> {
        match self.wal_status.load(Ordering::Relaxed) {
            0 => None,
            i => WalStatus::ALL.get(usize::from(i) - 1).copied(),
        }
    }

    /// The warning is on.
    pub fn warning(&self) -> bool {
        self.warning.load(Ordering::Relaxed)
    }

    /// Times the warning came on.
    pub fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Relaxed)
    }
}

/// One poll's reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reading {
    max_keep: i64,
    present: bool,
    active: bool,
    wal_status: Option<WalStatus>,
    retained: Option<i64>,
    confirmed_lag: Option<i64>,
    safe_wal_size: Option<i64>,
}

/// Why the reading deserves a warning, if it does.
fn warning_reason(reading: &Reading, config: &WatchdogConfig) -> Option<String> {
    if let Some(status @ (WalStatus::Unreserved | WalStatus::Lost)) = reading.wal_status {
        return Some(format!("wal_status is {}", status.as_str()));
    }
    let retained = reading.retained?;
    if let Some(fraction) = config.warn_fraction.filter(|f| f.is_finite() && *f >= 0.0) {
        if reading.max_keep >= 0 && retained as f64 > fraction * reading.max_keep as f64 {
            return Some(format!(
                "more than {:.0}% of max_slot_wal_keep_size ({} bytes)",
                fraction * 100.0,
                reading.max_keep
            ));
        }
    }
    match config.warn_bytes {
        Some(limit) if u64::try_from(retained).is_ok_and(|r| r > limit) => {
            Some(format!("more than the {limit}-byte warning limit"))
        }
        _ => None,
    }
}

async fn connect(connection: &PgConfig) -> Result<tokio_postgres::Client, String> {
    match tokio::time::timeout(QUERY_TIMEOUT, crate::pgconn::connect(&connection.with_statement_timeout(QUERY_TIMEOUT)))
        .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(err)) => Err(crate::pgconn::describe(&err)),
        Err(_) => Err(format!("connecting took longer than {QUERY_TIMEOUT:?}")),
    }
}

async fn poll(client: &tokio_postgres::Client, slot: &str) -> Result<Reading, String> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let row = match tokio::time::timeout(QUERY_TIMEOUT, client.query_one(SLOT_QUERY, &params)).await {
        Ok(Ok(row)) => row,
        Ok(Err(err)) => return Err(crate::pgconn::describe(&err)),
        Err(_) => return Err(format!("the query took longer than {QUERY_TIMEOUT:?}")),
    };
    let get = |name: &str| row.try_get::<_, Option<i64>>(name).map_err(|err| err.to_string());
    Ok(Reading {
        max_keep: get("max_keep")?.unwrap_or(-1),
        present: row.try_get("present").map_err(|err| err.to_string())?,
        active: row.try_get("active").map_err(|err| err.to_string())?,
        wal_status: row
            .try_get::<_, Option<&str>>("wal_status")
            .map_err(|err| err.to_string())?
            .and_then(WalStatus::parse),
        retained: get("retained")?,
        confirmed_lag: get("confirmed_lag")?,
        safe_wal_size: get("safe_wal_size")?,
    })
}

/// Polls every `config.interval` until aborted.
pub async fn run(connection: PgConfig, slot: String, config: WatchdogConfig, watch: Arc<SlotWatch>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing = false;
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = async {
            if client.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
                client = Some(connect(&connection).await?);
            }
            match client.as_ref() {
                Some(c) => poll(c, &slot).await,
                None => Err("no connection".to_owned()),
            }
        }
        .await;
        match result {
            Ok(reading) => {
                if failing {
                    tracing::info!("slot watchdog polls again");
                    failing = false;
                }
                record(&watch, &slot, &reading, &config);
            }
            Err(err) => {
                watch.poll_errors.fetch_add(1, Ordering::Relaxed);
                client = None;
                if !failing {
                    tracing::warn!(error = %err, "slot watchdog cannot read pg_replication_slots; retrying");
                    failing = true;
                } else {
                    tracing::debug!(error = %err, "slot watchdog poll failed");
                }
            }
        }
    }
}

fn record(watch: &SlotWatch, slot: &str, reading: &Reading, config: &WatchdogConfig) {
    watch.max_keep.store(reading.max_keep, Ordering::Relaxed);
    watch.present.store(reading.present, Ordering::Relaxed);
    watch.active.store(reading.active, Ordering::Relaxed);
    watch.retained.store(reading.retained.unwrap_or(UNKNOWN), Ordering::Relaxed);
    watch.confirmed_lag.store(reading.confirmed_lag.unwrap_or(UNKNOWN), Ordering::Relaxed);
    watch.safe_wal_size.store(reading.safe_wal_size.unwrap_or(UNKNOWN), Ordering::Relaxed);
    let status = reading.wal_status.and_then(|s| WalStatus::ALL.iter().position(|&x| x == s));
    watch.wal_status.store(status.map_or(0, |i| (i + 1) as u8), Ordering::Relaxed);
    let reason = warning_reason(reading, config);
    let was = watch.warning.swap(reason.is_some(), Ordering::Relaxed);
    match (&reason, was) {
        (Some(reason), false) => {
            watch.warnings.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                slot,
                retained_bytes = reading.retained.unwrap_or(0),
                max_slot_wal_keep_size_bytes = reading.max_keep,
                wal_status = reading.wal_status.map_or("unknown", WalStatus::as_str),
                "replication slot retains WAL: {reason}; walcast may be stuck or far behind (the server keeps \
                 this WAL on disk until walcast confirms it)"
            );
        }
        (None, true) => {
            tracing::info!(
                slot,
                retained_bytes = reading.retained.unwrap_or(0),
                "replication slot WAL back under the limits"
            );
        }
        _ => {}
    }
    watch.last_poll_micros.store(unix_micros_now(), Ordering::Relaxed);
    watch.polls.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(retained: i64, max_keep: i64, wal_status: WalStatus) -> Reading {
        Reading {
            max_keep,
            present: true,
            active: true,
            wal_status: Some(wal_status),
            retained: Some(retained),
            confirmed_lag: Some(0),
            safe_wal_size: None,
        }
    }

    fn config(warn_fraction: Option<f64>, warn_bytes: Option<u64>) -> WatchdogConfig {
        WatchdogConfig { interval: Duration::from_secs(10), warn_fraction, warn_bytes }
    }

    #[test]
    fn warning_rules() {
        let gib = 1 << 30;
        let c = config(Some(0.5), Some(gib as u64));
        // Unlimited keep size: only the byte limit applies.
        assert_eq!(warning_reason(&reading(gib, -1, WalStatus::Reserved), &c), None);
        assert!(warning_reason(&reading(gib + 1, -1, WalStatus::Extended), &c).unwrap().contains("byte"));
        // Half of a 100 MiB keep size.
        let keep = 100 << 20;
        assert_eq!(warning_reason(&reading(keep / 2, keep, WalStatus::Reserved), &c), None);
        assert!(warning_reason(&reading(keep / 2 + 1, keep, WalStatus::Reserved), &c)
            .unwrap()
            .contains("max_slot_wal_keep_size"));
        // Status alone.
        assert!(warning_reason(&reading(0, -1, WalStatus::Unreserved), &c).unwrap().contains("unreserved"));
        assert!(warning_reason(&reading(0, -1, WalStatus::Lost), &c).unwrap().contains("lost"));
        // Disabled limits.
        let off = config(None, None);
        assert_eq!(warning_reason(&reading(i64::MAX, keep, WalStatus::Extended), &off), None);
        // A missing slot (no retained figure) is not a WAL warning.
        let mut missing = reading(0, keep, WalStatus::Reserved);
        missing.retained = None;
        missing.wal_status = None;
        assert_eq!(warning_reason(&missing, &c), None);
    }

    #[test]
    fn record_counts_transitions() {
        let watch = SlotWatch::default();
        let c = config(None, Some(1));
        record(&watch, "s", &reading(10, -1, WalStatus::Reserved), &c);
        record(&watch, "s", &reading(20, -1, WalStatus::Reserved), &c);
        assert!(watch.warning());
        assert_eq!(watch.warnings(), 1);
        record(&watch, "s", &reading(0, -1, WalStatus::Reserved), &c);
        assert!(!watch.warning());
        record(&watch, "s", &reading(5, -1, WalStatus::Extended), &c);
        assert_eq!((watch.warnings(), watch.polls()), (2, 4));
        assert_eq!(watch.wal_status(), Some(WalStatus::Extended));
        assert_eq!(watch.retained_bytes(), Some(5));
        assert_eq!(watch.max_keep_bytes(), Some(-1));
        assert_eq!(watch.safe_wal_size_bytes(), None);
    }
}
