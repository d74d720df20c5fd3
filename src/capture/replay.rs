//! Replay: a capture fed through the change stage without PostgreSQL.
//!
//! Sits where the replication stage sits in the live pipeline: it reads the
//! recorded XLogData payloads in file order and pushes them through a fresh
//! [`Assembler`], so decoding, relation caching and transaction assembly run
//! exactly as they did live, and hands the sink the same [`TxEvent`]s in the
//! same order (protocol 1 changes pass through as they arrive, streamed
//! transactions only once committed), so memory stays as bounded as live.
//!
//! Pacing: [`Pace::Fastest`] reads as fast as the stages go (benchmarks);
//! [`Pace::Recorded`] sleeps so records leave at the intervals the server
//! sent them (load tests that want the original rhythm). Keepalives are read
//! and skipped; they carry no changes.
//!
//! Invariants: a capture that ends inside a record or holds a corrupt one
//! stops the replay with that error after every event before it was
//! delivered; a transaction still open at the end of the file is reported
//! ([`ReplayReport::incomplete_transaction`]), its Commit never invented.

use std::io::BufRead;
use std::time::{Duration, Instant};

use super::{CaptureError, CaptureReader};
use crate::change::{Assembler, ChangeError, TxEvent};
use crate::replication::WalEvent;

/// How fast a replay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pace {
    /// As fast as the stages go.
    #[default]
    Fastest,
    /// At the pace the server sent the records (from their send times).
    Recorded,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    /// Records read (XLogData and keepalives).
    pub records: u64,
    /// pgoutput messages decoded.
    pub messages: u64,
    /// Commits delivered to the sink.
    pub transactions: u64,
    /// Row changes delivered.
    pub changes: u64,
    /// pgoutput payload bytes decoded.
    pub payload_bytes: u64,
    /// Wall time of the replay, sink included.
    pub elapsed: Duration,
    /// Most bytes the assembler held for streamed transactions.
    pub peak_buffered_bytes: usize,
    /// Whether the capture ended inside a transaction.
    pub incomplete_transaction: bool,
}

impl ReplayReport {
    /// Changes per second of wall time.
    pub fn changes_per_sec(&self) -> f64 {
        per_sec(self.changes, self.elapsed)
    }

    /// Payload megabytes (10⁶ bytes) per second of wall time.
    pub fn megabytes_per_sec(&self) -> f64 {
        per_sec(self.payload_bytes, self.elapsed) / 1e6
    }
}

fn per_sec(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Errors of [`replay`].
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The capture could not be read (truncated, corrupt, I/O).
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// A recorded message could not be assembled.
    #[error("record {record}: {source}")]
    Change {
        /// 0-based index of the offending record.
        record: u64,
        /// What went wrong.
        source: ChangeError,
    },
}

/// Events taken at once from a committed streamed transaction.
const DRAIN_BATCH: usize = 256;

/// Replays `reader` through a fresh assembler, calling `sink` with each event
/// in the order a live run produces them.
///
/// # Errors
/// The first unreadable record or unassemblable message; everything committed
/// before it has reached the sink.
pub fn replay<R: BufRead>(
    mut reader: CaptureReader<R>,
    pace: Pace,
    mut sink: impl FnMut(TxEvent),
) -> Result<ReplayReport, ReplayError> {
    let mut assembler = Assembler::new();
    let mut report = ReplayReport::default();
    let mut events = Vec::new();
    let started = Instant::now();
    // (first send time in the capture, wall clock when it was replayed)
    let mut clock: Option<(i64, Instant)> = None;
    while let Some(event) = reader.next_event()? {
        report.records += 1;
        let (data, send_time) = match event {
            WalEvent::XLogData { data, send_time, .. } => (data, send_time),
            WalEvent::Keepalive { .. } => continue,
        };
        if pace == Pace::Recorded {
            let (first, at) = *clock.get_or_insert((send_time, Instant::now()));
            let due = at + Duration::from_micros(send_time.saturating_sub(first).max(0) as u64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        report.messages += 1;
        report.payload_bytes += data.len() as u64;
        let record = report.records - 1;
        assembler.push(&data, &mut events).map_err(|source| ReplayError::Change { record, source })?;
        loop {
            for event in events.drain(..) {
                match &event {
                    TxEvent::Change(_) => report.changes += 1,
                    TxEvent::Commit(_) => report.transactions += 1,
                    TxEvent::Begin(_) | TxEvent::Message { .. } => {}
                }
                sink(event);
            }
            if !assembler.has_pending() {
                break;
            }
            assembler
                .drain_pending(&mut events, DRAIN_BATCH)
                .map_err(|source| ReplayError::Change { record, source })?;
        }
    }
    report.incomplete_transaction = assembler.in_transaction() || assembler.open_streams() > 0;
    report.elapsed = started.elapsed();
    report.peak_buffered_bytes = assembler.peak_buffered_bytes();
    Ok(report)
}
