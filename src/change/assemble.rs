//! Turns decoded pgoutput messages into committed transactions of typed
//! changes.
//!
//! ```text
//!  push(msg) ──▶ protocol 1: Begin/Change/Commit straight into `out`
//!            └─▶ protocol 2, inside Stream Start … Stop: ChangeLog per top-level xid
//!                  (memory up to the transaction's share, the rest in the Spill)
//!  Stream Commit ──▶ pending ──drain_pending(out, max)──▶ Begin, changes…, Commit
//! ```
//!
//! Invariants:
//! - the relation cache is per stream (per replication connection): a new
//!   Relation message replaces the entry, and tuples are read against the
//!   latest entry for their OID;
//! - protocol 1 sends only committed transactions, in commit order, so their
//!   events pass straight through (nothing is buffered here: memory is bounded
//!   by the channel behind this stage);
//! - streamed (protocol 2) transactions are held in a [`ChangeLog`] each
//!   until Stream Commit and dropped on Stream Abort (a subtransaction abort
//!   discards only the changes tagged with that subtransaction's xid);
//!   [`Assembler::buffered_bytes`] says how many bytes they hold in memory
//!   and [`Assembler::peak_buffered_bytes`] the most ever held;
//! - memory is bounded: each streamed transaction keeps at most its share in
//!   memory (reserved when it opens: the per-transaction budget, or what is
//!   left of the total, possibly nothing) and appends the rest to disk, so
//!   [`Assembler::buffered_bytes`] never exceeds the total budget however
//!   many streamed transactions are open;
//! - a committed streamed transaction is handed out incrementally:
//!   [`Assembler::drain_pending`] appends at most `max` events per call,
//!   Begin first and Commit last, and [`Assembler::push`] refuses the next
//!   message until it is drained, so commit order holds;
//! - a change the spill's disk budget refuses is kept, never dropped:
//!   [`Assembler::push`] returns [`SpillError::DiskBudget`] (transient) and
//!   [`Assembler::resume`] retries it; nothing else is accepted meanwhile;
//! - an unchanged TOASTed value is taken from the old row when the old row is
//!   complete (REPLICA IDENTITY FULL); otherwise it is left out and named in
//!   [`Change::missing_toast`], never turned into NULL.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::model::{Change, ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxEvent, TxInfo};
use super::value::{self, ValueKind};
use crate::pgoutput::{self, Decoder, Message, OldTuple, TupleData, TupleValue};
use crate::spill::{ChangeLog, Cursor, Spill, SpillError};

/// How many streamed transactions get a full per-transaction memory budget
/// at once: the total memory budget of [`Assembler::with_spill`] is this
/// many times the per-transaction one.
pub const IN_MEMORY_STREAMS: usize = 4;

/// Errors of the change stage.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The pgoutput message could not be decoded.
    #[error("pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    /// A row change named a relation no Relation message described.
    #[error("change for relation OID {0} without a preceding Relation message")]
    UnknownRelation(u32),
    /// A tuple does not fit its relation.
    #[error("relation {relation}: tuple has {got} columns, the Relation message announced {expected}")]
    ColumnCount {
        /// `schema.table`.
        relation: String,
        /// Columns announced.
        expected: usize,
        /// Columns received.
        got: usize,
    },
    /// Messages arrived in an order the protocol does not allow.
    #[error("unexpected pgoutput message: {0}")]
    Sequence(String),
    /// Binary tuple data (walcast asks for text).
    #[error("binary tuple data for {0}: walcast streams text values; do not set the `binary` option")]
    Binary(String),
    /// A streamed transaction could not be held on disk:
    /// [`SpillError::DiskBudget`] is transient (the change is kept; call
    /// [`Assembler::resume`] later), the others are definite.
    #[error(transparent)]
    Spill(#[from] SpillError),
    /// [`Assembler::push`] was called while a committed streamed transaction
    /// was still being drained or a change waited for disk budget (a bug in
    /// the caller).
    #[error("a message was pushed before the previous one was finished (drain_pending / resume first)")]
    Busy,
}

impl ChangeError {
    /// A sequencing problem may come from a broken connection and clears on
    /// reconnect, and a full disk budget clears when spilled transactions
    /// finish; malformed data does not.
    pub fn is_transient(&self) -> bool {
        match self {
            ChangeError::Sequence(_) => true,
            ChangeError::Spill(err) => err.is_transient(),
            _ => false,
        }
    }

    /// Whether this is the spill's disk budget refusing a change (pause,
    /// then [`Assembler::resume`]).
    pub fn is_disk_budget(&self) -> bool {
        matches!(self, ChangeError::Spill(SpillError::DiskBudget { .. }))
    }
}

/// A streamed transaction held until it commits.
#[derive(Debug)]
struct Streamed {
    /// Its changes, tagged with the (sub)transaction id that made them.
    log: ChangeLog,
    /// The memory budget it reserved out of the total.
    reserved: usize,
}

/// A committed streamed transaction being handed out.
#[derive(Debug)]
struct Pending {
    /// Its changes (`None`: it had none).
    held: Option<Streamed>,
    /// Where reading stopped.
    cursor: Cursor,
    /// The Begin, until it was handed out.
    begin: Option<TxBegin>,
    /// The Commit, handed out last.
    commit: TxInfo,
}

/// The change stage's state for one replication stream.
#[derive(Debug)]
pub struct Assembler {
    decoder: Decoder,
    relations: HashMap<u32, Arc<RelationInfo>>,
    /// Names of user-defined types announced by Type messages.
    types: HashMap<u32, String>,
    /// The open (protocol 1) transaction.
    open: Option<TxBegin>,
    /// Streamed transactions by top-level xid.
    streams: HashMap<u32, Streamed>,
    /// The top-level xid of the open Stream Start block.
    current_stream: Option<u32>,
    /// The committed streamed transaction being drained.
    pending: Option<Pending>,
    /// Changes the disk budget refused, in order, with their top-level xid
    /// and tag; [`Assembler::resume`] pushes them.
    stalled: VecDeque<(u32, u32, Change)>,
    /// The disk budget that refused the first stalled change.
    stall_budget: u64,
    /// Where streamed transactions spill (`None`: created on first use, see
    /// [`Assembler::new`]).
    spill: Option<Spill>,
    /// Memory budget of one streamed transaction.
    tx_memory_bytes: usize,
    /// Memory budget of all streamed transactions together (`None`: none).
    total_memory_bytes: Option<usize>,
    /// Memory reserved by the open and pending streamed transactions.
    reserved: usize,
    /// Bytes held in memory by streamed transactions now.
    buffered: usize,
    /// The most ever held.
    peak_buffered: usize,
}

impl Default for Assembler {
    fn default() -> Self {
        Assembler::new()
    }
}

impl Assembler {
    /// A fresh assembler (use one per replication connection) that holds
    /// streamed transactions wholly in memory, as protocol 1 needs nothing
    /// held; for protocol 2 prefer [`Assembler::with_spill`].
    pub fn new() -> Self {
        Assembler::build(None, usize::MAX, None)
    }

    /// A fresh assembler whose streamed transactions keep at most
    /// `tx_memory_bytes` each in memory (as [`Change::byte_size`] counts),
    /// and at most [`IN_MEMORY_STREAMS`] × `tx_memory_bytes` together; the
    /// rest goes to `spill`.
    pub fn with_spill(spill: Spill, tx_memory_bytes: usize) -> Self {
        let total = tx_memory_bytes.saturating_mul(IN_MEMORY_STREAMS);
        Assembler::build(Some(spill), tx_memory_bytes, Some(total))
    }

    fn build(spill: Option<Spill>, tx_memory_bytes: usize, total_memory_bytes: Option<usize>) -> Self {
        Assembler {
            decoder: Decoder::default(),
            relations: HashMap::new(),
            types: HashMap::new(),
            open: None,
            streams: HashMap::new(),
            current_stream: None,
            pending: None,
            stalled: VecDeque::new(),
            stall_budget: 0,
            spill,
            tx_memory_bytes,
            total_memory_bytes,
            reserved: 0,
            buffered: 0,
            peak_buffered: 0,
        }
    }

    /// Forgets per-connection state after a reconnect: relations are sent
    /// again by the new walsender, and partial transactions are resent whole.
    /// Held streamed transactions (open, pending or stalled) are dropped with
    /// their spill files; the budgets and the peak are kept.
    pub fn reset(&mut self) {
        let spill = self.spill.take();
        let peak = self.peak_buffered;
        *self = Assembler::build(spill, self.tx_memory_bytes, self.total_memory_bytes);
        self.peak_buffered = peak;
    }

    /// Bytes currently held in memory for streamed transactions (open ones
    /// and the one being drained).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// The most bytes ever held in memory for streamed transactions.
    pub fn peak_buffered_bytes(&self) -> usize {
        self.peak_buffered
    }

    /// Streamed transactions held (open, not yet committed or aborted).
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// Whether a committed streamed transaction still has events for
    /// [`Assembler::drain_pending`].
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether a change waits for disk budget ([`Assembler::resume`]).
    pub fn is_stalled(&self) -> bool {
        !self.stalled.is_empty()
    }

    /// Appends up to `max` (at least one) events of the committed streamed
    /// transaction to `out` — its Begin first, its Commit last — and returns
    /// how many. Call it until [`Assembler::has_pending`] is false before the
    /// next [`Assembler::push`]; memory stays bounded by `max` events.
    ///
    /// # Errors
    /// [`ChangeError::Spill`] when the spill file cannot be read back
    /// (definite); the transaction stays pending.
    pub fn drain_pending(&mut self, out: &mut Vec<TxEvent>, max: usize) -> Result<usize, ChangeError> {
        let Some(pending) = self.pending.as_mut() else { return Ok(0) };
        let max = max.max(1);
        let mut added = 0;
        if let Some(begin) = pending.begin.take() {
            out.push(TxEvent::Begin(begin));
            added += 1;
        }
        while added < max {
            let next = match &pending.held {
                Some(held) => held.log.read(&mut pending.cursor)?,
                None => None,
            };
            match next {
                Some((_, change)) => {
                    out.push(TxEvent::Change(change.into_owned()));
                    added += 1;
                }
                None => {
                    out.push(TxEvent::Commit(pending.commit));
                    added += 1;
                    if let Some(held) = self.pending.take().and_then(|p| p.held) {
                        self.release(held);
                    }
                    break;
                }
            }
        }
        Ok(added)
    }

    /// Retries the changes the disk budget refused, in order.
    ///
    /// # Errors
    /// [`SpillError::DiskBudget`] again (still full: wait and retry), or a
    /// definite spill error.
    pub fn resume(&mut self) -> Result<(), ChangeError> {
        while let Some((top, tag, change)) = self.stalled.pop_front() {
            if let Err((err, change)) = self.push_streamed(top, tag, change) {
                if let Some(change) = change {
                    self.stalled.push_front((top, tag, change));
                }
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// The relation cache entry for `oid`.
    pub fn relation(&self, oid: u32) -> Option<&Arc<RelationInfo>> {
        self.relations.get(&oid)
    }

    /// Whether a (protocol 1) transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Feeds one pgoutput message (an XLogData payload); appends the events it
    /// completes to `out`, in commit order. A Stream Commit only makes its transaction pending: take its events
    /// with [`Assembler::drain_pending`].
    ///
    /// # Errors
    /// Decode errors, unknown relations, impossible sequences;
    /// [`ChangeError::Busy`] while a transaction is pending or a change is
    /// stalled (the message is not taken); [`SpillError::DiskBudget`] when a
    /// streamed change could not be spilled: the message was taken and the
    /// change is kept for [`Assembler::resume`].
    pub fn push(&mut self, data: &Bytes, out: &mut Vec<TxEvent>) -> Result<(), ChangeError> {
        if self.pending.is_some() || !self.stalled.is_empty() {
            return Err(ChangeError::Busy);
        }
        self.take(data, out)?;
        match self.stalled.is_empty() {
            true => Ok(()),
            false => Err(self.budget_error()),
        }
    }

    /// The disk budget error for a stalled change.
    fn budget_error(&self) -> ChangeError {
        ChangeError::Spill(SpillError::DiskBudget { budget: self.stall_budget })
    }

    /// Decodes and applies one message (the body of [`Assembler::push`]).
    fn take(&mut self, data: &Bytes, out: &mut Vec<TxEvent>) -> Result<(), ChangeError> {
        let msg = self.decoder.decode(data)?;
        match msg {
            Message::Begin(b) => {
                if self.open.is_some() {
                    return Err(ChangeError::Sequence("Begin inside an open transaction".into()));
                }
                let begin = TxBegin { xid: b.xid, commit_lsn: b.final_lsn, commit_timestamp: b.commit_timestamp };
                self.open = Some(begin);
                out.push(TxEvent::Begin(begin));
            }
            Message::Commit(c) => {
                let Some(begin) = self.open.take() else {
                    return Err(ChangeError::Sequence("Commit without Begin".into()));
                };
                if begin.commit_lsn != c.commit_lsn {
                    return Err(ChangeError::Sequence(format!(
                        "Commit at {} does not match Begin's commit LSN {}",
                        c.commit_lsn, begin.commit_lsn
                    )));
                }
                out.push(TxEvent::Commit(TxInfo {
                    xid: begin.xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_timestamp: c.commit_timestamp,
                }));
            }
            Message::Relation(r) => {
                let columns = r
                    .columns
                    .iter()
                    .map(|c| {
                        let type_name = self.type_name(c.type_oid);
                        ColumnInfo {
                            kind: kind_for(c.type_oid, &type_name),
                            name: c.name.clone(),
                            type_name,
                            type_oid: c.type_oid,
                            is_key: c.is_key(),
                        }
                    })
                    .collect();
                let schema = if r.namespace.is_empty() { "pg_catalog".to_owned() } else { r.namespace.clone() };
                let info = RelationInfo {
                    oid: r.oid,
                    schema,
                    table: r.name.clone(),
                    replica_identity: r.replica_identity,
                    columns,
                };
                self.relations.insert(r.oid, Arc::new(info));
            }
            Message::Type(t) => {
                self.types.insert(t.oid, t.name.clone());
            }
            Message::Insert(i) => {
                let rel = self.relation_for(i.relation_oid)?;
                let record = self.row(&rel, &i.new)?;
                let change = Change {
                    relation: rel,
                    op: Op::Insert,
                    record: Some(record),
                    old_record: None,
                    missing_toast: vec![],
                };
                self.emit(i.xid, change, out)?;
            }
            Message::Update(u) => {
                let rel = self.relation_for(u.relation_oid)?;
                let mut record = self.row(&rel, &u.new)?;
                let (old, old_full) = match &u.old {
                    Some(OldTuple::Full(t)) => (self.row(&rel, t)?, true),
                    Some(OldTuple::Key(t)) => (self.key_row(&rel, t)?, false),
                    None => (key_from(&rel, &record), false),
                };
                let mut missing_toast = Vec::new();
                for (i, datum) in record.0.iter_mut().enumerate() {
                    if matches!(datum, Datum::Absent) {
                        match old.0.get(i) {
                            Some(value) if old_full && !matches!(value, Datum::Absent) => *datum = value.clone(),
                            _ => missing_toast.push(rel.columns[i].name.clone()),
                        }
                    }
                }
                let change = Change {
                    relation: rel,
                    op: Op::Update,
                    record: Some(record),
                    old_record: Some(old),
                    missing_toast,
                };
                self.emit(u.xid, change, out)?;
            }
            Message::Delete(d) => {
                let rel = self.relation_for(d.relation_oid)?;
                let old = match &d.old {
                    OldTuple::Full(t) => self.row(&rel, t)?,
                    OldTuple::Key(t) => self.key_row(&rel, t)?,
                };
                let change = Change {
                    relation: rel,
                    op: Op::Delete,
                    record: None,
                    old_record: Some(old),
                    missing_toast: vec![],
                };
                self.emit(d.xid, change, out)?;
            }
            Message::Truncate(t) => {
                for oid in &t.relation_oids {
                    let rel = self.relation_for(*oid)?;
                    let change = Change {
                        relation: rel,
                        op: Op::Truncate,
                        record: None,
                        old_record: None,
                        missing_toast: vec![],
                    };
                    self.emit(t.xid, change, out)?;
                }
            }
            Message::StreamStart(s) => {
                if self.current_stream.is_some() {
                    return Err(ChangeError::Sequence("Stream Start inside a stream block".into()));
                }
                if !self.streams.contains_key(&s.xid) {
                    let held = self.open_log()?;
                    self.streams.insert(s.xid, held);
                }
                self.current_stream = Some(s.xid);
            }
            Message::StreamStop => {
                if self.current_stream.take().is_none() {
                    return Err(ChangeError::Sequence("Stream Stop without Stream Start".into()));
                }
            }
            Message::StreamCommit(c) => {
                let mut held = self.streams.remove(&c.xid);
                if let Some(held) = held.as_mut() {
                    held.log.seal()?;
                }
                self.pending = Some(Pending {
                    held,
                    cursor: Cursor::default(),
                    begin: Some(TxBegin { xid: c.xid, commit_lsn: c.commit_lsn, commit_timestamp: c.commit_timestamp }),
                    commit: TxInfo {
                        xid: c.xid,
                        commit_lsn: c.commit_lsn,
                        end_lsn: c.end_lsn,
                        commit_timestamp: c.commit_timestamp,
                    },
                });
            }
            Message::StreamAbort(a) => {
                if a.xid == a.subxid {
                    if let Some(held) = self.streams.remove(&a.xid) {
                        self.release(held);
                    }
                } else if let Some(held) = self.streams.get_mut(&a.xid) {
                    let before = held.log.memory_size();
                    held.log.discard(a.subxid);
                    let after = held.log.memory_size();
                    self.buffered = self.buffered - before + after;
                }
            }
            // walcast's own transactional markers pass on in WAL order. Inside
            // a stream block they would have to be held with the streamed
            // transaction's changes, which the spill log cannot carry yet, so
            // there (protocol 2 only) they are dropped with a debug event;
            // non-transactional ones (the heartbeat) and other tools'
            // prefixes carry nothing walcast relays.
            Message::LogicalMessage(m)
                if m.is_transactional() && m.prefix.starts_with(super::model::WALCAST_MESSAGE_PREFIX) =>
            {
                if self.current_stream.is_some() {
                    tracing::debug!(lsn = %m.lsn, "walcast message inside a streamed transaction not passed on");
                } else if self.open.is_some() {
                    out.push(TxEvent::Message { prefix: m.prefix, content: m.content, lsn: m.lsn });
                } else {
                    return Err(ChangeError::Sequence("transactional message outside a transaction".into()));
                }
            }
            Message::Origin(_) | Message::LogicalMessage(_) => {}
            other => {
                return Err(ChangeError::Sequence(format!(
                    "two-phase message {:?} (walcast does not enable two_phase)",
                    other.tag() as char
                )))
            }
        }
        Ok(())
    }

    /// Passes a change on, or holds it when it belongs to a streamed transaction.
    fn emit(&mut self, xid: Option<u32>, change: Change, out: &mut Vec<TxEvent>) -> Result<(), ChangeError> {
        match self.current_stream {
            // After a refusal, the message's remaining changes (a Truncate's
            // other relations) wait behind the refused one.
            Some(top) if !self.stalled.is_empty() => self.stalled.push_back((top, xid.unwrap_or(top), change)),
            Some(top) => {
                if let Err((err, change)) = self.push_streamed(top, xid.unwrap_or(top), change) {
                    match (err, change) {
                        (SpillError::DiskBudget { budget }, Some(change)) => {
                            self.stall_budget = budget;
                            self.stalled.push_back((top, xid.unwrap_or(top), change));
                        }
                        (err, _) => return Err(err.into()),
                    }
                }
            }
            None if self.open.is_some() => out.push(TxEvent::Change(change)),
            None => return Err(ChangeError::Sequence("row change outside a transaction".into())),
        }
        Ok(())
    }

    /// Appends a change to the log of streamed transaction `top`; a refusal
    /// hands the change back (`Some`) when it may be retried.
    #[allow(clippy::result_large_err)] // as ChangeLog::push: the change comes back unboxed
    fn push_streamed(&mut self, top: u32, tag: u32, change: Change) -> Result<(), (SpillError, Option<Change>)> {
        if !self.streams.contains_key(&top) {
            let held = self.open_log().map_err(|err| (err, None))?;
            self.streams.insert(top, held);
        }
        let held = self.streams.get_mut(&top).expect("inserted above");
        let before = held.log.memory_size();
        let result = held.log.push(tag, change);
        let after = held.log.memory_size();
        self.buffered = self.buffered - before + after;
        self.peak_buffered = self.peak_buffered.max(self.buffered);
        result
    }

    /// An empty log for a new streamed transaction, with its share of the
    /// memory budget reserved.
    fn open_log(&mut self) -> Result<Streamed, SpillError> {
        let reserved = match self.total_memory_bytes {
            Some(total) => self.tx_memory_bytes.min(total.saturating_sub(self.reserved)),
            None => self.tx_memory_bytes,
        };
        let spill = match &self.spill {
            Some(spill) => spill.clone(),
            None => {
                // Assembler::new: logs never outgrow memory (their budget is
                // unbounded), so no directory is needed.
                let spill = Spill::memory_only();
                self.spill.insert(spill).clone()
            }
        };
        self.reserved = self.reserved.saturating_add(reserved);
        Ok(Streamed { log: spill.log(reserved), reserved })
    }

    /// Drops a finished streamed transaction: its memory and reservation are
    /// returned and its spill file removed.
    fn release(&mut self, held: Streamed) {
        self.buffered -= held.log.memory_size();
        self.reserved = self.reserved.saturating_sub(held.reserved);
    }

    fn relation_for(&self, oid: u32) -> Result<Arc<RelationInfo>, ChangeError> {
        self.relations.get(&oid).cloned().ok_or(ChangeError::UnknownRelation(oid))
    }

    fn type_name(&self, oid: u32) -> String {
        match value::builtin_type_name(oid) {
            Some(name) => name.to_owned(),
            None => self.types.get(&oid).cloned().unwrap_or_else(|| oid.to_string()),
        }
    }

    /// A full tuple as a row (`u` → [`Datum::Absent`] for the caller to fill).
    fn row(&self, rel: &RelationInfo, tuple: &TupleData) -> Result<Row, ChangeError> {
        check_width(rel, tuple)?;
        tuple
            .columns
            .iter()
            .map(|v| match v {
                TupleValue::Null => Ok(Datum::Null),
                TupleValue::Text(bytes) => Ok(Datum::Text(bytes.clone())),
                TupleValue::UnchangedToast => Ok(Datum::Absent),
                TupleValue::Binary(_) => Err(ChangeError::Binary(format!("{}.{}", rel.schema, rel.table))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Row)
    }

    /// A key tuple: `n` in a non-key column means "not part of the key".
    fn key_row(&self, rel: &RelationInfo, tuple: &TupleData) -> Result<Row, ChangeError> {
        let mut row = self.row(rel, tuple)?;
        for (datum, column) in row.0.iter_mut().zip(&rel.columns) {
            if !column.is_key {
                *datum = Datum::Absent;
            }
        }
        Ok(row)
    }
}

/// How a column's values become JSON: built-in types by OID; user-defined
/// types (enums, domains, composites) as text, arrays of them (named `_…`) as
/// arrays of text.
pub(crate) fn kind_for(oid: u32, type_name: &str) -> ValueKind {
    if value::builtin_type_name(oid).is_some() {
        value::kind_of(oid)
    } else if type_name.starts_with('_') {
        ValueKind::array_of(&ValueKind::Text)
    } else {
        ValueKind::Text
    }
}

/// The key columns of `record` (what Supabase puts in `old_record` when the
/// server sent no old tuple).
fn key_from(rel: &RelationInfo, record: &Row) -> Row {
    Row(record
        .0
        .iter()
        .zip(&rel.columns)
        .map(|(datum, column)| if column.is_key { datum.clone() } else { Datum::Absent })
        .collect())
}

fn check_width(rel: &RelationInfo, tuple: &TupleData) -> Result<(), ChangeError> {
    if tuple.columns.len() != rel.columns.len() {
        return Err(ChangeError::ColumnCount {
            relation: format!("{}.{}", rel.schema, rel.table),
            expected: rel.columns.len(),
            got: tuple.columns.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Streamed transactions held in spill logs: discard and abort, the
    //! memory budgets, incremental draining, disk-budget pauses and reset.

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::lsn::Lsn;
    use crate::pgoutput::{
        encode, Column, PgTimestamp, Relation, ReplicaIdentity, StreamAbort, StreamCommit, StreamStart, Truncate,
    };

    const OID_A: u32 = 16_400;
    const OID_B: u32 = 16_401;

    fn bytes(msg: Message, in_stream: bool) -> Bytes {
        Bytes::from(encode(&msg, in_stream))
    }

    fn relation(xid: u32, oid: u32) -> Bytes {
        let column = |name: &str, type_oid, flags| Column { flags, name: name.into(), type_oid, type_modifier: -1 };
        bytes(
            Message::Relation(Relation {
                xid: Some(xid),
                oid,
                namespace: "public".into(),
                name: format!("t{oid}"),
                replica_identity: ReplicaIdentity::Full,
                columns: vec![column("id", 23, Column::FLAG_KEY), column("v", 25, 0)],
            }),
            true,
        )
    }

    fn start(xid: u32) -> Bytes {
        bytes(Message::StreamStart(StreamStart { xid, first_segment: true }), false)
    }

    fn stop() -> Bytes {
        bytes(Message::StreamStop, false)
    }

    /// An insert of row `id` (with a 100-byte value) by (sub)transaction `sub`.
    fn insert(sub: u32, id: u32) -> Bytes {
        let new = TupleData {
            columns: vec![
                TupleValue::Text(Bytes::from(id.to_string())),
                TupleValue::Text(Bytes::from(format!("{id:0>100}"))),
            ],
        };
        bytes(Message::Insert(pgoutput::Insert { xid: Some(sub), relation_oid: OID_A, new }), true)
    }

    fn truncate(sub: u32) -> Bytes {
        bytes(Message::Truncate(Truncate { xid: Some(sub), options: 0, relation_oids: vec![OID_A, OID_B] }), true)
    }

    fn commit(xid: u32) -> Bytes {
        let lsn = Lsn(u64::from(xid) << 8);
        bytes(
            Message::StreamCommit(StreamCommit {
                xid,
                flags: 0,
                commit_lsn: lsn,
                end_lsn: Lsn(lsn.0 + 8),
                commit_timestamp: PgTimestamp(0),
            }),
            false,
        )
    }

    fn abort(xid: u32, subxid: u32) -> Bytes {
        bytes(Message::StreamAbort(StreamAbort { xid, subxid, abort: None }), false)
    }

    fn spill(disk_budget: u64) -> (tempfile::TempDir, Spill) {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::new(crate::spill::SpillConfig { dir: dir.path().join("spill"), disk_budget }).unwrap();
        (dir, spill)
    }

    fn push(a: &mut Assembler, data: &Bytes) {
        let mut out = Vec::new();
        a.push(data, &mut out).unwrap();
        assert!(out.is_empty(), "streamed messages emit nothing before Stream Commit");
    }

    /// Drains the pending transaction `max` events at a time; returns the
    /// batches.
    fn drain(a: &mut Assembler, max: usize) -> Vec<Vec<TxEvent>> {
        let mut batches = Vec::new();
        while a.has_pending() {
            let mut out = Vec::new();
            let n = a.drain_pending(&mut out, max).unwrap();
            assert_eq!(n, out.len());
            assert!((1..=max).contains(&n), "{n} events in a batch of at most {max}");
            batches.push(out);
        }
        batches
    }

    /// The ids of a drained transaction's inserts; checks Begin first and
    /// Commit last.
    fn ids(events: &[TxEvent], xid: u32) -> Vec<u32> {
        assert!(matches!(events.first(), Some(TxEvent::Begin(b)) if b.xid == xid), "Begin first");
        assert!(matches!(events.last(), Some(TxEvent::Commit(c)) if c.xid == xid), "Commit last");
        events[1..events.len() - 1]
            .iter()
            .map(|e| match e {
                TxEvent::Change(c) => match &c.record.as_ref().unwrap().0[0] {
                    Datum::Text(id) => std::str::from_utf8(id).unwrap().parse().unwrap(),
                    other => panic!("id {other:?}"),
                },
                other => panic!("a change between Begin and Commit, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn walcast_messages_pass_in_wal_order_and_others_do_not() {
        use crate::pgoutput::{Begin, Commit, LogicalMessage};
        let message = |flags, prefix: &str, lsn| {
            bytes(
                Message::LogicalMessage(LogicalMessage {
                    xid: None,
                    flags,
                    lsn: Lsn(lsn),
                    prefix: prefix.into(),
                    content: Bytes::from_static(b"marker"),
                }),
                false,
            )
        };
        let mut a = Assembler::new();
        let mut out = Vec::new();
        let begin = Begin { final_lsn: Lsn(900), commit_timestamp: PgTimestamp(0), xid: 7 };
        a.push(&bytes(Message::Begin(begin), false), &mut out).unwrap();
        a.push(&message(LogicalMessage::TRANSACTIONAL, "walcast-policy", 100), &mut out).unwrap();
        a.push(&message(LogicalMessage::TRANSACTIONAL, "other-tool", 110), &mut out).unwrap();
        // Non-transactional (the heartbeat's kind) never passes, even with our prefix.
        a.push(&message(0, "walcast-hb", 120), &mut out).unwrap();
        let commit = Commit { flags: 0, commit_lsn: Lsn(900), end_lsn: Lsn(908), commit_timestamp: PgTimestamp(0) };
        a.push(&bytes(Message::Commit(commit), false), &mut out).unwrap();
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(out[0], TxEvent::Begin(_)));
        assert_eq!(
            out[1],
            TxEvent::Message { prefix: "walcast-policy".into(), content: Bytes::from_static(b"marker"), lsn: Lsn(100) }
        );
        assert!(matches!(out[2], TxEvent::Commit(_)));
    }

    #[test]
    fn a_spilled_streamed_transaction_drains_in_order_without_its_aborted_parts() {
        let (_dir, spill) = spill(1 << 30);
        let mut a = Assembler::with_spill(spill.clone(), 2048);
        // Top-level 100 with subtransaction 101 (rolled back), interleaved
        // with 200 (aborted whole).
        push(&mut a, &start(100));
        push(&mut a, &relation(100, OID_A));
        for id in 1..=40 {
            push(&mut a, &insert(100, id));
        }
        push(&mut a, &stop());
        push(&mut a, &start(200));
        push(&mut a, &relation(200, OID_A));
        for id in 1000..1040 {
            push(&mut a, &insert(200, id));
        }
        push(&mut a, &stop());
        push(&mut a, &start(100));
        for id in 41..=60 {
            push(&mut a, &insert(101, id));
        }
        for id in 61..=80 {
            push(&mut a, &insert(100, id));
        }
        push(&mut a, &stop());
        assert_eq!(a.open_streams(), 2);
        push(&mut a, &abort(100, 101));
        push(&mut a, &abort(200, 200));
        assert_eq!(a.open_streams(), 1);
        assert!(spill.stats().spilled_logs.load(Ordering::Relaxed) >= 2, "both outgrew 2 KiB");
        push(&mut a, &commit(100));
        assert!(a.has_pending());

        // Nothing else is taken until it is drained, and the refused message
        // is not consumed.
        let mut out = Vec::new();
        assert!(matches!(a.push(&start(300), &mut out), Err(ChangeError::Busy)));
        let batches = drain(&mut a, 7);
        assert!(batches.len() > 8, "handed out incrementally");
        let events: Vec<TxEvent> = batches.into_iter().flatten().collect();
        let expected: Vec<u32> = (1..=40).chain(61..=80).collect();
        assert_eq!(ids(&events, 100), expected);
        assert!(a.peak_buffered_bytes() > 0 && a.peak_buffered_bytes() <= 2 * 2048, "{}", a.peak_buffered_bytes());
        assert_eq!(a.buffered_bytes(), 0);
        assert_eq!(spill.stats().disk_bytes.load(Ordering::Relaxed), 0, "spill files removed");
        push(&mut a, &start(300));
    }

    #[test]
    fn many_concurrent_streams_share_the_total_memory_budget() {
        let (_dir, spill) = spill(1 << 30);
        let budget = 4096;
        let mut a = Assembler::with_spill(spill.clone(), budget);
        let streams = 2 * IN_MEMORY_STREAMS as u32;
        for round in 0..3 {
            for xid in 1..=streams {
                push(&mut a, &start(xid));
                if round == 0 {
                    push(&mut a, &relation(xid, OID_A));
                }
                for i in 0..20 {
                    push(&mut a, &insert(xid, xid * 1000 + round * 20 + i));
                }
                push(&mut a, &stop());
                assert!(a.buffered_bytes() <= budget * IN_MEMORY_STREAMS);
            }
        }
        assert!(a.peak_buffered_bytes() > budget, "several streams hold memory");
        assert!(a.peak_buffered_bytes() <= budget * IN_MEMORY_STREAMS, "{}", a.peak_buffered_bytes());
        for xid in 1..=streams {
            push(&mut a, &commit(xid));
            let events: Vec<TxEvent> = drain(&mut a, 256).into_iter().flatten().collect();
            assert_eq!(ids(&events, xid), (0..60).map(|i| xid * 1000 + i).collect::<Vec<_>>());
        }
        assert_eq!((a.buffered_bytes(), a.open_streams()), (0, 0));
        assert_eq!(spill.stats().disk_bytes.load(Ordering::Relaxed), 0);
        // Every reservation was returned: a new stream gets a full budget again.
        push(&mut a, &start(99));
        push(&mut a, &insert(99, 1));
        assert!(a.buffered_bytes() > 0, "held in memory");
    }

    #[test]
    fn a_change_the_disk_budget_refuses_waits_for_resume_and_is_kept() {
        let (_dir, spill) = spill(4096);
        let mut a = Assembler::with_spill(spill.clone(), 0);
        push(&mut a, &start(100));
        push(&mut a, &relation(100, OID_A));
        push(&mut a, &relation(100, OID_B));
        push(&mut a, &insert(100, 1));
        // Something else (the hub) takes the rest of the disk budget.
        let mut hog = spill.log(0);
        let rel = Arc::clone(a.relation(OID_A).unwrap());
        let filler = Change { relation: rel, op: Op::Truncate, record: None, old_record: None, missing_toast: vec![] };
        while hog.push(0, filler.clone()).is_ok() {}
        let mut out = Vec::new();
        let err = a.push(&truncate(100), &mut out).unwrap_err();
        assert!(err.is_disk_budget() && err.is_transient(), "{err}");
        assert!(a.is_stalled());
        assert!(matches!(a.push(&stop(), &mut out), Err(ChangeError::Busy)));
        assert!(a.resume().unwrap_err().is_disk_budget(), "still full");
        drop(hog);
        a.resume().unwrap();
        assert!(!a.is_stalled());
        push(&mut a, &insert(100, 2));
        push(&mut a, &stop());
        push(&mut a, &commit(100));
        let events: Vec<TxEvent> = drain(&mut a, 256).into_iter().flatten().collect();
        let ops: Vec<(Op, u32)> = events[1..events.len() - 1]
            .iter()
            .map(|e| match e {
                TxEvent::Change(c) => (c.op, c.relation.oid),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ops, [(Op::Insert, OID_A), (Op::Truncate, OID_A), (Op::Truncate, OID_B), (Op::Insert, OID_A)]);
    }

    #[test]
    fn reset_drops_held_and_pending_transactions_and_their_files() {
        let (_dir, spill) = spill(1 << 30);
        let mut a = Assembler::with_spill(spill.clone(), 512);
        for xid in [1, 2] {
            push(&mut a, &start(xid));
            push(&mut a, &relation(xid, OID_A));
            for id in 0..20 {
                push(&mut a, &insert(xid, id));
            }
            push(&mut a, &stop());
        }
        push(&mut a, &commit(1));
        let mut out = Vec::new();
        a.drain_pending(&mut out, 3).unwrap();
        assert!(a.has_pending() && spill.stats().disk_bytes.load(Ordering::Relaxed) > 0);
        a.reset();
        assert!(!a.has_pending());
        assert_eq!((a.buffered_bytes(), a.open_streams()), (0, 0));
        assert_eq!(spill.stats().disk_bytes.load(Ordering::Relaxed), 0);
        assert!(a.peak_buffered_bytes() > 0, "the peak survives a reset");
        // The new connection resends relations; the budget is whole again.
        push(&mut a, &start(3));
        push(&mut a, &relation(3, OID_A));
        push(&mut a, &insert(3, 7));
        push(&mut a, &stop());
        push(&mut a, &commit(3));
        let events: Vec<TxEvent> = drain(&mut a, 256).into_iter().flatten().collect();
        assert_eq!(ids(&events, 3), [7]);
    }

    #[test]
    fn new_holds_streams_in_memory_and_drains_them_too() {
        let mut a = Assembler::new();
        push(&mut a, &start(5));
        push(&mut a, &relation(5, OID_A));
        for id in 0..300 {
            push(&mut a, &insert(if id % 2 == 0 { 5 } else { 6 }, id));
        }
        push(&mut a, &stop());
        push(&mut a, &abort(5, 6));
        assert!(a.buffered_bytes() > 150 * 100);
        push(&mut a, &commit(5));
        let events: Vec<TxEvent> = drain(&mut a, 64).into_iter().flatten().collect();
        assert_eq!(ids(&events, 5), (0..300).step_by(2).collect::<Vec<_>>());
        assert_eq!(a.buffered_bytes(), 0);
    }
}
