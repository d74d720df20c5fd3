//! The acknowledgement rule, free of I/O: which WAL position the slot may be
//! told is flushed, from what downstream acknowledged and what the stream
//! has seen.
//!
//! [`super::ReplicationStream`] keeps a [`Progress`] per connection and asks
//! it for each standby status update's `flush`; the status snapshot
//! ([`super::ReplicationStatus::processed`]) applies the same
//! [`flush_position`] to its atomics, so the rule is written once.
//!
//! Invariants (each has a test below):
//! - `flush` never passes the `end_lsn` downstream acknowledged (the hub
//!   acknowledges a transaction only once it finished it) while a received
//!   transaction is open or committed but unacknowledged; batching the
//!   hand-offs between stages changes when acknowledgements arrive, never
//!   what they cover;
//! - with nothing received pending, `flush` may move to the latest
//!   keepalive's `wal_end` (or a heartbeat's position), so an idle
//!   publication does not hold WAL back;
//! - `flush` never goes backwards.

use crate::lsn::Lsn;

/// What the stream has seen of transaction boundaries and keepalives on one
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Between a Begin and its Commit.
    pub in_transaction: bool,
    /// Between a Stream Start and its Stream Stop (protocol 2).
    pub in_stream_block: bool,
    /// `end_lsn` of the last Commit (or Stream Commit) received.
    pub last_commit_end: Lsn,
    /// Highest keepalive `wal_end` (or idle heartbeat position) seen.
    pub keepalive_end: Lsn,
}

impl Progress {
    /// A connection that starts streaming at the slot's `confirmed` position.
    pub fn new(confirmed: Lsn) -> Self {
        Progress { in_transaction: false, in_stream_block: false, last_commit_end: confirmed, keepalive_end: Lsn::ZERO }
    }

    /// Follows the boundaries a pgoutput message marks (by its tag and, for a
    /// Commit or Stream Commit, its `end_lsn` at a fixed offset: these are
    /// top-level message types). Returns whether the transaction state
    /// (`in_transaction`, `last_commit_end`) changed.
    pub fn on_pgoutput(&mut self, data: &[u8]) -> bool {
        match data.first() {
            Some(b'S') => self.in_stream_block = true,
            Some(b'E') => self.in_stream_block = false,
            Some(b'B') => {
                self.in_transaction = true;
                return true;
            }
            Some(b'C' | b'c') => {
                let Some(end) = commit_end(data) else { return false };
                if data[0] == b'C' {
                    self.in_transaction = false;
                }
                self.last_commit_end = self.last_commit_end.max(end);
                return true;
            }
            _ => {}
        }
        false
    }

    /// A keepalive (or an idle heartbeat message) at `wal_end`.
    pub fn on_keepalive(&mut self, wal_end: Lsn) {
        self.keepalive_end = self.keepalive_end.max(wal_end);
    }

    /// Whether a message now would be outside any transaction or stream block.
    pub fn outside_transactions(&self) -> bool {
        !self.in_transaction && !self.in_stream_block
    }

    /// The `flush` to report, given downstream's acknowledgement and the last
    /// `flush` reported.
    pub fn flush(&self, acked: Lsn, reported: Lsn) -> Lsn {
        flush_position(acked, self.in_transaction, self.last_commit_end, self.keepalive_end, reported)
    }
}

/// The rule itself: `acked`, or — when no received transaction is open or
/// unacknowledged — the later of `acked` and `keepalive_end`; never below
/// `reported`.
pub fn flush_position(
    acked: Lsn,
    in_transaction: bool,
    last_commit_end: Lsn,
    keepalive_end: Lsn,
    reported: Lsn,
) -> Lsn {
    let idle = !in_transaction && acked >= last_commit_end;
    let flush = if idle { acked.max(keepalive_end) } else { acked };
    flush.max(reported)
}

/// The `end_lsn` of a pgoutput Commit (`C`: flags(1) commit_lsn(8)
/// end_lsn(8)) or Stream Commit (`c`: xid(4) flags(1) commit_lsn(8)
/// end_lsn(8)); `None` for anything else or a short message.
pub fn commit_end(data: &[u8]) -> Option<Lsn> {
    let at = match data.first() {
        Some(b'C') => 10,
        Some(b'c') => 14,
        _ => return None,
    };
    let raw: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
    Some(Lsn(u64::from_be_bytes(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(end: u64) -> Vec<u8> {
        let mut m = vec![b'C', 0];
        m.extend_from_slice(&(end - 8).to_be_bytes());
        m.extend_from_slice(&end.to_be_bytes());
        m.extend_from_slice(&0i64.to_be_bytes());
        m
    }

    #[test]
    fn flush_stays_at_the_acknowledgement_while_a_received_transaction_is_unfinished() {
        let mut p = Progress::new(Lsn(100));
        assert!(p.on_pgoutput(b"B"));
        p.on_keepalive(Lsn(500));
        // Open transaction: the keepalive's position is not ours to report.
        assert_eq!(p.flush(Lsn(100), Lsn(100)), Lsn(100));
        assert!(p.on_pgoutput(&commit(300)));
        assert_eq!(p.last_commit_end, Lsn(300));
        // Committed and received, but the hub has not finished it.
        assert_eq!(p.flush(Lsn(100), Lsn(100)), Lsn(100));
        // The hub finished it: now the keepalive beyond it may be reported.
        assert_eq!(p.flush(Lsn(300), Lsn(100)), Lsn(500));
    }

    #[test]
    fn many_transactions_received_in_one_batch_flush_only_to_what_was_acknowledged() {
        let mut p = Progress::new(Lsn(100));
        for end in [200, 300, 400] {
            p.on_pgoutput(b"B");
            p.on_pgoutput(&commit(end));
        }
        p.on_keepalive(Lsn(450));
        assert_eq!(p.flush(Lsn(200), Lsn(100)), Lsn(200));
        assert_eq!(p.flush(Lsn(300), Lsn(200)), Lsn(300));
        assert_eq!(p.flush(Lsn(400), Lsn(300)), Lsn(450));
    }

    #[test]
    fn flush_never_goes_backwards() {
        let p = Progress::new(Lsn(100));
        assert_eq!(p.flush(Lsn(50), Lsn(120)), Lsn(120));
    }

    #[test]
    fn stream_blocks_and_stream_commits_are_followed() {
        let mut p = Progress::new(Lsn(0));
        assert!(!p.on_pgoutput(b"S"));
        assert!(!p.outside_transactions());
        assert!(!p.on_pgoutput(b"E"));
        assert!(p.outside_transactions());
        let mut sc = vec![b'c', 0, 0, 0, 7, 0];
        sc.extend_from_slice(&90u64.to_be_bytes());
        sc.extend_from_slice(&99u64.to_be_bytes());
        assert!(p.on_pgoutput(&sc));
        assert_eq!(p.last_commit_end, Lsn(99));
        assert_eq!(commit_end(&sc), Some(Lsn(99)));
        assert_eq!(commit_end(b"C\0short"), None);
        assert!(!p.on_pgoutput(b"Cshort"));
    }
}
