//! The change stage's router for Broadcast from Database: takes every
//! change of a `realtime` relation out of the Postgres Changes path, and
//! hands the INSERTs into `realtime.messages` — as
//! [`DbMessage`]s, in commit order — to the delivery stage
//! ([`crate::realtime::rooms::database`]) over a bounded channel.
//!
//! ```text
//!  assembler ─TxEvent─▶ Router ─(other changes, Begin, Commit)─▶ batch ─▶ hub ─▶ ack end_lsn
//!                         └─ realtime.messages INSERT ─▶ DbMessage ─(bounded, awaited)─▶ delivery stage
//! ```
//!
//! # Acknowledgement invariant
//!
//! The slot is never acknowledged past a message that was not handed to
//! the delivery stage: a message is sent on the channel (the stage awaits
//! room) *before* the events after it — its transaction's Commit included —
//! go into the batch for the hub, and the hub acknowledges a transaction's
//! `end_lsn` only once it has handled that Commit. The replication stream
//! acknowledges an idle keepalive position only when every received Commit
//! is acknowledged (see [`crate::replication`]), so the same holds there.
//!
//! # No duplicates after a reconnect
//!
//! The walsender resends from the slot's confirmed position, which may be
//! behind what was handed on. As the hub does, a transaction whose commit
//! LSN is below the end LSN of the last transaction handled is skipped
//! whole; a transaction interrupted part-way (its messages already handed
//! before the connection broke) skips, when resent, as many messages as
//! were handed (a transaction decodes the same every time). After a restart
//! of walcast nothing is known: rows after the slot's position are sent
//! again (at-least-once, as Supabase's own stream is at-most-once the other
//! way).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::change::{Change, TxEvent};
use crate::lsn::Lsn;
use crate::realtime::messages::{self, DbBroadcastStats, DbMessage};

/// Messages queued between the change stage and the delivery stage.
pub const QUEUE: usize = 1024;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Router {
    /// The delivery stage (`None`: nobody delivers; rows are only kept out
    /// of Postgres Changes).
    out: Option<mpsc::Sender<DbMessage>>,
    /// Leave `realtime` changes in the batches (a cluster's source node:
    /// they travel in the stream, and each edge routes them).
    passthrough: bool,
    stats: Arc<DbBroadcastStats>,
    /// End LSN of the last transaction whose messages were all handed on.
    handled: Lsn,
    /// Commit LSN of the transaction open now.
    open: Option<Lsn>,
    /// The open transaction was handled before (a resend): skip it whole.
    skipping: bool,
    /// `realtime.messages` changes of the open transaction seen so far.
    seen: u64,
    /// Of the open transaction, the first `skip` were handed on before a
    /// reconnect.
    skip: u64,
    /// A transaction interrupted by a reconnect: (commit LSN, messages
    /// handed on).
    partial: Option<(Lsn, u64)>,
}

impl Router {
    pub(super) fn new(out: Option<mpsc::Sender<DbMessage>>, stats: Arc<DbBroadcastStats>) -> Router {
        Router {
            out,
            passthrough: false,
            stats,
            handled: Lsn::ZERO,
            open: None,
            skipping: false,
            seen: 0,
            skip: 0,
            partial: None,
        }
    }

    /// A router that takes nothing out (see `passthrough`).
    pub(super) fn passthrough(stats: Arc<DbBroadcastStats>) -> Router {
        Router { passthrough: true, ..Router::new(None, stats) }
    }

    /// A router for events read from a cluster's stream (an edge node):
    /// as [`Router::new`], public to the crate.
    pub(crate) fn for_stream(out: Option<mpsc::Sender<DbMessage>>, stats: Arc<DbBroadcastStats>) -> Router {
        Router::new(out, stats)
    }

    /// The replication connection restarted: a transaction left open will
    /// be resent from its Begin.
    pub(crate) fn reset(&mut self) {
        if let Some(lsn) = self.open.take() {
            if !self.skipping && self.seen.max(self.skip) > 0 {
                self.partial = Some((lsn, self.seen.max(self.skip)));
            }
        }
        self.skipping = false;
    }

    /// Takes the `realtime` changes out of `events` (in place, order kept),
    /// handing the messages on; returns once each is queued.
    pub(crate) async fn route(&mut self, events: &mut Vec<TxEvent>) {
        let realtime = |e: &TxEvent| matches!(e, TxEvent::Change(c) if messages::is_realtime(&c.relation));
        if self.passthrough || !events.iter().any(realtime) {
            for event in events.iter() {
                self.track(event);
            }
            return;
        }
        let all = std::mem::take(events);
        for event in all {
            match event {
                TxEvent::Change(change) if messages::is_realtime(&change.relation) => {
                    if messages::is_messages(&change.relation) {
                        self.message(&change).await;
                    }
                }
                other => {
                    self.track(&other);
                    events.push(other);
                }
            }
        }
    }

    fn track(&mut self, event: &TxEvent) {
        match event {
            TxEvent::Begin(begin) => {
                self.open = Some(begin.commit_lsn);
                self.seen = 0;
                self.skipping = begin.commit_lsn < self.handled;
                self.skip = match self.partial {
                    Some((lsn, n)) if lsn == begin.commit_lsn => n,
                    _ => 0,
                };
                if self.partial.is_some_and(|(lsn, _)| lsn <= begin.commit_lsn) {
                    self.partial = None;
                }
            }
            TxEvent::Commit(info) => {
                self.open = None;
                self.skipping = false;
                self.handled = self.handled.max(info.end_lsn);
            }
            _ => {}
        }
    }

    async fn message(&mut self, change: &Change) {
        self.seen += 1;
        if self.skipping || self.seen <= self.skip {
            return;
        }
        match messages::from_change(change) {
            Ok(Some(message)) => {
                if let Some(out) = &self.out {
                    if out.send(message).await.is_err() {
                        // The delivery stage ended (shutdown): nobody to
                        // deliver to any more.
                        self.out = None;
                    }
                }
            }
            Ok(None) => {}
            Err(why) => {
                self.stats.dropped(why);
                tracing::debug!(reason = why.label(), "realtime.messages row not broadcast: {why}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::change::{value::ValueKind, ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxInfo};
    use crate::pgoutput::{PgTimestamp, ReplicaIdentity};

    fn relation(schema: &str, table: &str) -> Arc<RelationInfo> {
        let columns = ["id", "topic", "event", "private", "payload"]
            .iter()
            .map(|name| ColumnInfo {
                name: (*name).into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: false,
                kind: ValueKind::Text,
            })
            .collect();
        Arc::new(RelationInfo {
            oid: 7,
            schema: schema.into(),
            table: table.into(),
            replica_identity: ReplicaIdentity::Default,
            columns,
        })
    }

    fn change(schema: &str, table: &str, n: u32) -> TxEvent {
        let text = |s: String| Datum::Text(Bytes::from(s));
        TxEvent::Change(Change {
            relation: relation(schema, table),
            op: Op::Insert,
            record: Some(Row(vec![
                text(format!("id-{n}")),
                text("room".into()),
                text("ev".into()),
                text("f".into()),
                text("{}".into()),
            ])),
            old_record: None,
            missing_toast: Vec::new(),
        })
    }

    fn begin(commit: u64) -> TxEvent {
        TxEvent::Begin(TxBegin { xid: 1, commit_lsn: Lsn(commit), commit_timestamp: PgTimestamp(0) })
    }

    fn commit(commit: u64) -> TxEvent {
        TxEvent::Commit(TxInfo {
            xid: 1,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            commit_timestamp: PgTimestamp(0),
        })
    }

    fn ids(rx: &mut mpsc::Receiver<DbMessage>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m.id);
        }
        out
    }

    #[tokio::test]
    async fn messages_leave_the_postgres_changes_path_in_order() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut router = Router::new(Some(tx), Arc::default());
        let mut events = vec![
            begin(100),
            change("public", "orders", 0),
            change("realtime", "messages", 1),
            change("realtime", "subscription", 9),
            change("realtime", "messages", 2),
            commit(100),
        ];
        router.route(&mut events).await;
        assert_eq!(ids(&mut rx), ["id-1", "id-2"]);
        assert_eq!(events.len(), 3, "Begin, the public change, Commit");
        assert!(matches!(&events[1], TxEvent::Change(c) if c.relation.table == "orders"));
    }

    #[tokio::test]
    async fn a_reconnect_never_sends_a_message_twice() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut router = Router::new(Some(tx), Arc::default());
        router.route(&mut vec![begin(100), change("realtime", "messages", 1), commit(100)]).await;
        // Interrupted after one message of the next transaction.
        router.route(&mut vec![begin(200), change("realtime", "messages", 2)]).await;
        router.reset();
        assert_eq!(ids(&mut rx), ["id-1", "id-2"]);
        // The walsender resends both transactions.
        let mut again = vec![
            begin(100),
            change("realtime", "messages", 1),
            commit(100),
            begin(200),
            change("realtime", "messages", 2),
            change("realtime", "messages", 3),
            commit(200),
        ];
        router.route(&mut again).await;
        assert_eq!(ids(&mut rx), ["id-3"]);
        assert_eq!(again.len(), 4, "Begin and Commit still go to the hub");
        // A later transaction goes through whole.
        router.route(&mut vec![begin(300), change("realtime", "messages", 4), commit(300)]).await;
        assert_eq!(ids(&mut rx), ["id-4"]);
    }

    #[tokio::test]
    async fn malformed_rows_are_counted_not_sent() {
        let (tx, mut rx) = mpsc::channel(16);
        let stats = Arc::new(DbBroadcastStats::default());
        let mut router = Router::new(Some(tx), Arc::clone(&stats));
        let TxEvent::Change(mut bad) = change("realtime", "messages", 1) else { unreachable!() };
        bad.record.as_mut().unwrap().0[2] = Datum::Null;
        router.route(&mut vec![begin(100), TxEvent::Change(bad), change("realtime", "messages", 2), commit(100)]).await;
        assert_eq!(ids(&mut rx), ["id-2"]);
        assert_eq!(stats.dropped_by_reason()[0], ("missing_column", 1));
    }
}
