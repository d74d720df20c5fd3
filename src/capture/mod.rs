//! Capture files: the raw replication stream recorded to disk (`walcast
//! record`) and read back (`walcast replay`) so the downstream stages can be
//! driven — for load tests and benchmarks — without PostgreSQL.
//!
//! # Format (version 1)
//!
//! All integers big-endian.
//!
//! ```text
//! header   8 bytes   magic "WALCAST\0"
//!          u16       format version (1)
//!          u16       flags (0; readers refuse unknown flags)
//!          u32       metadata length M (≤ 1 MiB)
//!          M bytes   metadata: UTF-8 JSON object (see [`CaptureMeta`])
//! record*  u8        kind: b'w' XLogData, b'k' primary keepalive
//!          u64       wal_start (XLogData; 0 for keepalives)
//!          u64       wal_end
//!          i64       server send time, µs since 2000-01-01 UTC
//!          u32       payload length L (≤ 1 GiB; 0 for keepalives)
//!          L bytes   payload: the pgoutput message exactly as received
//! ```
//!
//! Every XLogData payload is kept, Relation and Type messages included, so a
//! replay decodes exactly as the live stream did. A file ends at a record
//! boundary; a recorder killed mid-write leaves a truncated last record,
//! which the reader reports as [`CaptureError::Truncated`] with its offset
//! after yielding every complete record.
//!
//! Invariants: the reader checks every length against its limit before
//! allocating, never panics on a corrupt file, and yields records in file
//! order.

mod replay;

pub use replay::{replay, Pace, ReplayError, ReplayReport};

use std::io::{self, BufRead, Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::replication::WalEvent;

/// The file magic.
pub const MAGIC: &[u8; 8] = b"WALCAST\0";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Largest metadata block accepted.
pub const MAX_META: u32 = 1 << 20;
/// Largest payload accepted (one pgoutput message).
pub const MAX_PAYLOAD: u32 = 1 << 30;

/// What the recorder knew about the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureMeta {
    /// Replication slot the stream came from.
    pub slot: String,
    /// Publications streamed.
    pub publications: Vec<String>,
    /// pgoutput protocol version.
    pub proto_version: u8,
    /// Whether in-progress transactions were streamed.
    pub streaming: bool,
    /// `server_version` of the source.
    pub server_version: String,
    /// Position the recording started from.
    pub start_lsn: Lsn,
    /// Wall-clock start of the recording (RFC 3339, UTC).
    pub recorded_at: String,
}

/// Errors reading or writing a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file could not be read or written.
    #[error("capture I/O: {0}")]
    Io(#[from] io::Error),
    /// Not a walcast capture.
    #[error("not a walcast capture file (bad magic); record one with `walcast record --out FILE`")]
    BadMagic,
    /// A version this build cannot read.
    #[error("capture format version {0} is not supported by this walcast (it reads version {VERSION})")]
    UnsupportedVersion(u16),
    /// The header is malformed.
    #[error("corrupt capture header: {0}")]
    BadHeader(String),
    /// A record is malformed.
    #[error("corrupt capture record at byte {offset}: {reason}")]
    BadRecord {
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file ends inside a record (the recorder was interrupted).
    #[error("capture truncated inside the record at byte {offset}; every complete record before it was read")]
    Truncated {
        /// Byte offset of the incomplete record.
        offset: u64,
    },
}

/// Writes a capture.
#[derive(Debug)]
pub struct CaptureWriter<W: Write> {
    out: W,
    records: u64,
}

impl<W: Write> CaptureWriter<W> {
    /// Writes the header.
    ///
    /// # Errors
    /// I/O.
    pub fn new(mut out: W, meta: &CaptureMeta) -> Result<Self, CaptureError> {
        let json = serde_json::to_vec(meta).map_err(|e| CaptureError::BadHeader(e.to_string()))?;
        let len = u32::try_from(json.len())
            .ok()
            .filter(|l| *l <= MAX_META)
            .ok_or_else(|| CaptureError::BadHeader("metadata larger than 1 MiB".into()))?;
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_be_bytes())?;
        out.write_all(&0u16.to_be_bytes())?;
        out.write_all(&len.to_be_bytes())?;
        out.write_all(&json)?;
        Ok(CaptureWriter { out, records: 0 })
    }

    /// Appends one event.
    ///
    /// # Errors
    /// I/O, or a payload over [`MAX_PAYLOAD`].
    pub fn write(&mut self, event: &WalEvent) -> Result<(), CaptureError> {
        let (kind, start, end, time, payload): (u8, Lsn, Lsn, i64, &[u8]) = match event {
            WalEvent::XLogData { wal_start, wal_end, send_time, data } => {
                (b'w', *wal_start, *wal_end, *send_time, data)
            }
            WalEvent::Keepalive { wal_end, send_time } => (b'k', Lsn::ZERO, *wal_end, *send_time, &[]),
        };
        let len = u32::try_from(payload.len()).ok().filter(|l| *l <= MAX_PAYLOAD).ok_or_else(|| {
            CaptureError::BadRecord { offset: 0, reason: format!("payload of {} bytes is too large", payload.len()) }
        })?;
        let mut head = [0u8; 29];
        head[0] = kind;
        head[1..9].copy_from_slice(&start.0.to_be_bytes());
        head[9..17].copy_from_slice(&end.0.to_be_bytes());
        head[17..25].copy_from_slice(&time.to_be_bytes());
        head[25..29].copy_from_slice(&len.to_be_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        self.records += 1;
        Ok(())
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Flushes and returns the underlying writer.
    ///
    /// # Errors
    /// I/O.
    pub fn finish(mut self) -> Result<W, CaptureError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a capture record by record.
#[derive(Debug)]
pub struct CaptureReader<R: BufRead> {
    input: R,
    meta: CaptureMeta,
    offset: u64,
    done: bool,
}

impl<R: BufRead> CaptureReader<R> {
    /// Reads and checks the header.
    ///
    /// # Errors
    /// [`CaptureError::BadMagic`], [`CaptureError::UnsupportedVersion`],
    /// [`CaptureError::BadHeader`], or I/O.
    pub fn new(mut input: R) -> Result<Self, CaptureError> {
        let mut head = [0u8; 16];
        read_exact_or(&mut input, &mut head, || CaptureError::BadMagic)?;
        if &head[..8] != MAGIC {
            return Err(CaptureError::BadMagic);
        }
        let version = u16::from_be_bytes([head[8], head[9]]);
        if version != VERSION {
            return Err(CaptureError::UnsupportedVersion(version));
        }
        let flags = u16::from_be_bytes([head[10], head[11]]);
        if flags != 0 {
            return Err(CaptureError::BadHeader(format!("unknown flags {flags:#06x}")));
        }
        let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]);
        if len > MAX_META {
            return Err(CaptureError::BadHeader(format!("metadata length {len} exceeds 1 MiB")));
        }
        let mut json = vec![0u8; len as usize];
        read_exact_or(&mut input, &mut json, || CaptureError::BadHeader("file ends inside the metadata".into()))?;
        let meta = serde_json::from_slice(&json).map_err(|e| CaptureError::BadHeader(format!("metadata: {e}")))?;
        Ok(CaptureReader { input, meta, offset: 16 + u64::from(len), done: false })
    }

    /// The recorder's metadata.
    pub fn meta(&self) -> &CaptureMeta {
        &self.meta
    }

    /// The next record; `Ok(None)` at a clean end of file.
    ///
    /// # Errors
    /// [`CaptureError::Truncated`] or [`CaptureError::BadRecord`] (after which
    /// the reader yields nothing more), or I/O.
    pub fn next_event(&mut self) -> Result<Option<WalEvent>, CaptureError> {
        if self.done {
            return Ok(None);
        }
        let offset = self.offset;
        if self.input.fill_buf()?.is_empty() {
            self.done = true;
            return Ok(None);
        }
        let fail = |this: &mut Self, err: CaptureError| {
            this.done = true;
            Err(err)
        };
        let mut head = [0u8; 29];
        if let Err(err) = read_exact_or(&mut self.input, &mut head, || CaptureError::Truncated { offset }) {
            return fail(self, err);
        }
        let kind = head[0];
        let start = Lsn(u64::from_be_bytes(head[1..9].try_into().unwrap_or_default()));
        let end = Lsn(u64::from_be_bytes(head[9..17].try_into().unwrap_or_default()));
        let time = i64::from_be_bytes(head[17..25].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[25..29].try_into().unwrap_or_default());
        let bad = |reason: String| CaptureError::BadRecord { offset, reason };
        if len > MAX_PAYLOAD {
            return fail(self, bad(format!("payload length {len} exceeds the 1 GiB limit")));
        }
        let event = match kind {
            b'w' => {
                let mut payload = Vec::new();
                // Read through `take` so a corrupt length costs at most what the file holds.
                let got = (&mut self.input).take(u64::from(len)).read_to_end(&mut payload)?;
                if got < len as usize {
                    return fail(self, CaptureError::Truncated { offset });
                }
                WalEvent::XLogData { wal_start: start, wal_end: end, send_time: time, data: Bytes::from(payload) }
            }
            b'k' if len == 0 => WalEvent::Keepalive { wal_end: end, send_time: time },
            b'k' => return fail(self, bad(format!("keepalive with a {len}-byte payload"))),
            other => return fail(self, bad(format!("unknown record kind {other:#04x}"))),
        };
        self.offset += 29 + u64::from(len);
        Ok(Some(event))
    }
}

impl<R: BufRead> Iterator for CaptureReader<R> {
    type Item = Result<WalEvent, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

/// `read_exact`, mapping a short read to `short()`.
fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    short: impl FnOnce() -> CaptureError,
) -> Result<(), CaptureError> {
    match input.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(short()),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<WalEvent> {
        vec![
            WalEvent::XLogData { wal_start: Lsn(0), wal_end: Lsn(0), send_time: 1, data: Bytes::from_static(b"R....") },
            WalEvent::XLogData {
                wal_start: Lsn(100),
                wal_end: Lsn(100),
                send_time: 2,
                data: Bytes::from_static(b"B1234"),
            },
            WalEvent::Keepalive { wal_end: Lsn(200), send_time: 3 },
        ]
    }

    fn write(events: &[WalEvent]) -> Vec<u8> {
        let meta = CaptureMeta { slot: "s".into(), proto_version: 1, ..CaptureMeta::default() };
        let mut w = CaptureWriter::new(Vec::new(), &meta).unwrap();
        for e in events {
            w.write(e).unwrap();
        }
        assert_eq!(w.records(), events.len() as u64);
        w.finish().unwrap()
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
    }

    #[test]
    fn round_trip() {
        let bytes = write(&sample());
        let reader = CaptureReader::new(&bytes[..]).unwrap();
        assert_eq!(reader.meta().slot, "s");
        let back: Vec<WalEvent> = reader.collect::<Result<_, _>>().unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn truncation_yields_complete_records_then_an_error() {
        let bytes = write(&sample());
        let cut = &bytes[..bytes.len() - 3];
        let mut reader = CaptureReader::new(cut).unwrap();
        assert!(reader.next_event().unwrap().is_some());
        // The second record is complete; the keepalive (29 bytes) is cut.
        assert!(reader.next_event().unwrap().is_some());
        assert!(matches!(reader.next_event(), Err(CaptureError::Truncated { .. })));
        assert!(reader.next_event().unwrap().is_none());
    }

    #[test]
    fn rejects_foreign_files() {
        assert!(matches!(CaptureReader::new(&b"PGDMP..."[..]), Err(CaptureError::BadMagic)));
        let mut bytes = write(&[]);
        bytes[9] = 9;
        assert!(matches!(CaptureReader::new(&bytes[..]), Err(CaptureError::UnsupportedVersion(9))));
    }

    #[test]
    fn huge_lengths_do_not_allocate() {
        let mut bytes = write(&[]);
        bytes.push(b'w');
        bytes.extend_from_slice(&[0; 24]);
        bytes.extend_from_slice(&(MAX_PAYLOAD - 1).to_be_bytes());
        bytes.extend_from_slice(b"tiny");
        let mut reader = CaptureReader::new(&bytes[..]).unwrap();
        assert!(matches!(reader.next_event(), Err(CaptureError::Truncated { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut bytes = write(&sample());
            bytes.extend_from_slice(&tail);
            if let Ok(reader) = CaptureReader::new(&bytes[..]) {
                for item in reader.take(100) {
                    let _ = item;
                }
            }
            let _ = CaptureReader::new(&tail[..]).map(|r| r.take(100).count());
        }
    }
}

/// When a recording stops.
#[derive(Debug, Clone, Default)]
pub struct RecordLimits {
    /// Stop after this many committed transactions.
    pub max_transactions: Option<u64>,
    /// Stop after this long.
    pub duration: Option<std::time::Duration>,
}

/// What a recording captured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordReport {
    /// Records written.
    pub records: u64,
    /// Committed transactions captured (and acknowledged to the slot).
    pub transactions: u64,
    /// Payload bytes captured.
    pub bytes: u64,
}

/// Streams from the slot in `config` into a capture at `writer` until a
/// limit or `shutdown`. Each transaction is acknowledged to the slot once its
/// Commit is written and flushed, so a recording resumes where it stopped.
///
/// # Errors
/// A definite replication error, or I/O on the capture.
pub async fn record<W: Write + Send>(
    config: crate::replication::SourceConfig,
    writer: W,
    limits: RecordLimits,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<RecordReport, RecordError> {
    use crate::replication::{run_source, AckHandle, SourceEvent};
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let stop = tokio_util::sync::CancellationToken::new();
    let ack = AckHandle::default();
    let source = tokio::spawn(run_source(config.clone(), tx, ack.clone(), stop.clone()));
    let mut capture: Option<CaptureWriter<W>> = None;
    let mut writer = Some(writer);
    let mut report = RecordReport::default();
    let deadline = limits.duration.map(|d| tokio::time::Instant::now() + d);
    let result = 'record: loop {
        let event = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break Ok(()),
            event = rx.recv() => event,
        };
        let Some(event) = event else { break Ok(()) };
        match event {
            SourceEvent::Snapshot(lease) => lease.release(),
            SourceEvent::Started { confirmed, .. } => {
                if capture.is_none() {
                    let meta = CaptureMeta {
                        slot: config.slot.slot.clone(),
                        publications: config.slot.publications.clone(),
                        proto_version: config.slot.proto_version,
                        streaming: config.slot.streaming,
                        server_version: String::new(),
                        start_lsn: confirmed,
                        recorded_at: humantime_now(),
                    };
                    match writer.take().map(|w| CaptureWriter::new(w, &meta)) {
                        Some(Ok(w)) => capture = Some(w),
                        Some(Err(err)) => break Err(RecordError::Capture(err)),
                        None => {}
                    }
                }
            }
            SourceEvent::Wal(batch) => {
                let Some(w) = capture.as_mut() else { continue };
                for event in batch {
                    if let Err(err) = w.write(&event) {
                        break 'record Err(RecordError::Capture(err));
                    }
                    report.records += 1;
                    if let WalEvent::XLogData { data, .. } = &event {
                        report.bytes += data.len() as u64;
                        // Only a Commit needs decoding here (its end_lsn is acknowledged).
                        let commit = match data.first() {
                            Some(b'C') => crate::pgoutput::decode(data).ok(),
                            _ => None,
                        };
                        if let Some(crate::pgoutput::Message::Commit(commit)) = commit {
                            if let Err(err) = w.out.flush() {
                                break 'record Err(RecordError::Capture(err.into()));
                            }
                            ack.ack(commit.end_lsn);
                            report.transactions += 1;
                            if limits.max_transactions.is_some_and(|max| report.transactions >= max) {
                                break 'record Ok(());
                            }
                        }
                    }
                }
            }
        }
    };
    stop.cancel();
    let source_result = source.await;
    if let Some(w) = capture {
        w.finish().map_err(RecordError::Capture)?;
    }
    result?;
    match source_result {
        Ok(Err(err)) => Err(RecordError::Replication(err)),
        _ => Ok(report),
    }
}

/// Errors of [`record`].
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Replication failed definitely.
    #[error(transparent)]
    Replication(#[from] crate::replication::ReplicationError),
    /// The capture could not be written.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// Now as an RFC 3339 UTC timestamp (seconds precision).
fn humantime_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}
