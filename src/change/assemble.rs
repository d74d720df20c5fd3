//! Turns decoded pgoutput messages into committed transactions of typed
//! changes.
//!
//! Invariants:
//! - the relation cache is per stream (per replication connection): a new
//!   Relation message replaces the entry, and tuples are read against the
//!   latest entry for their OID;
//! - protocol 1 sends only committed transactions, in commit order, so their
//!   events pass straight through (nothing is buffered here: memory is bounded
//!   by the channel behind this stage);
//! - streamed (protocol 2) transactions are held until Stream Commit and
//!   dropped on Stream Abort (a subtransaction abort drops only that
//!   subtransaction's changes); [`Assembler::buffered_bytes`] says how much is
//!   held and [`Assembler::peak_buffered_bytes`] the most ever held;
//! - an unchanged TOASTed value is taken from the old row when the old row is
//!   complete (REPLICA IDENTITY FULL); otherwise it is left out and named in
//!   [`Change::missing_toast`], never turned into NULL.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::model::{Change, ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxEvent, TxInfo};
use super::value::{self, ValueKind};
use crate::pgoutput::{self, Decoder, Message, OldTuple, TupleData, TupleValue};

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
}

impl ChangeError {
    /// A sequencing problem may come from a broken connection and clears on
    /// reconnect; malformed data does not.
    pub fn is_transient(&self) -> bool {
        matches!(self, ChangeError::Sequence(_))
    }
}

/// A streamed transaction held until it commits.
#[derive(Debug, Default)]
struct Streamed {
    /// Changes with the (sub)transaction id that made them.
    changes: Vec<(u32, Change)>,
    bytes: usize,
}

/// The change stage's state for one replication stream.
#[derive(Debug, Default)]
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
    buffered: usize,
    peak_buffered: usize,
}

impl Assembler {
    /// A fresh assembler (use one per replication connection).
    pub fn new() -> Self {
        Assembler::default()
    }

    /// Forgets per-connection state after a reconnect: relations are sent
    /// again by the new walsender, and partial transactions are resent whole.
    pub fn reset(&mut self) {
        *self = Assembler::default();
    }

    /// Bytes currently held for streamed transactions.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// The most bytes ever held for streamed transactions.
    pub fn peak_buffered_bytes(&self) -> usize {
        self.peak_buffered
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
    /// completes to `out`, in commit order.
    ///
    /// # Errors
    /// Decode errors, unknown relations, impossible sequences.
    pub fn push(&mut self, data: &Bytes, out: &mut Vec<TxEvent>) -> Result<(), ChangeError> {
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
                self.current_stream = Some(s.xid);
                self.streams.entry(s.xid).or_default();
            }
            Message::StreamStop => {
                if self.current_stream.take().is_none() {
                    return Err(ChangeError::Sequence("Stream Stop without Stream Start".into()));
                }
            }
            Message::StreamCommit(c) => {
                let streamed = self.streams.remove(&c.xid).unwrap_or_default();
                self.buffered = self.buffered.saturating_sub(streamed.bytes);
                out.push(TxEvent::Begin(TxBegin {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    commit_timestamp: c.commit_timestamp,
                }));
                out.extend(streamed.changes.into_iter().map(|(_, change)| TxEvent::Change(change)));
                out.push(TxEvent::Commit(TxInfo {
                    xid: c.xid,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_timestamp: c.commit_timestamp,
                }));
            }
            Message::StreamAbort(a) => {
                if a.xid == a.subxid {
                    if let Some(streamed) = self.streams.remove(&a.xid) {
                        self.buffered = self.buffered.saturating_sub(streamed.bytes);
                    }
                } else if let Some(streamed) = self.streams.get_mut(&a.xid) {
                    let mut dropped = 0;
                    streamed.changes.retain(|(sub, change)| {
                        let keep = *sub != a.subxid;
                        if !keep {
                            dropped += change.byte_size();
                        }
                        keep
                    });
                    streamed.bytes -= dropped;
                    self.buffered = self.buffered.saturating_sub(dropped);
                }
            }
            // Origins and logical decoding messages carry nothing walcast relays.
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
            Some(top) => {
                let size = change.byte_size();
                let streamed = self.streams.entry(top).or_default();
                streamed.changes.push((xid.unwrap_or(top), change));
                streamed.bytes += size;
                self.buffered += size;
                self.peak_buffered = self.peak_buffered.max(self.buffered);
            }
            None if self.open.is_some() => out.push(TxEvent::Change(change)),
            None => return Err(ChangeError::Sequence("row change outside a transaction".into())),
        }
        Ok(())
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
fn kind_for(oid: u32, type_name: &str) -> ValueKind {
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
