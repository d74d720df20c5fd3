//! The change model: relations as published, rows, and committed changes.

use std::sync::Arc;

use bytes::Bytes;

use super::value::{self, ValueKind};
use crate::lsn::Lsn;
use crate::pgoutput::{PgTimestamp, ReplicaIdentity};

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// The whole table was emptied.
    Truncate,
}

impl Op {
    /// The upper-case name Supabase uses (`INSERT`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
        }
    }
}

/// A published column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// `pg_type.typname` (`int4`, `_text`, an enum's name, …).
    pub type_name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Part of the replica identity key.
    pub is_key: bool,
    /// How its values become JSON (resolved once per relation).
    pub kind: ValueKind,
}

/// A published relation, as its latest Relation message described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationInfo {
    /// Relation OID.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns, in order.
    pub columns: Vec<ColumnInfo>,
}

impl RelationInfo {
    /// Position of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column's value in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// The value's text form.
    Text(Bytes),
    /// Not known: an unchanged TOASTed value with no old row to take it from,
    /// or a column that is not part of a key-only old row. Left out of JSON,
    /// never turned into NULL.
    Absent,
}

impl Datum {
    /// The text form, if present and valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Datum::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }
}

/// A row: one datum per published column of its relation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row(pub Vec<Datum>);

impl Row {
    /// Approximate heap bytes held (for memory accounting).
    pub fn byte_size(&self) -> usize {
        self.0
            .iter()
            .map(|d| match d {
                Datum::Text(b) => b.len() + std::mem::size_of::<Datum>(),
                _ => std::mem::size_of::<Datum>(),
            })
            .sum()
    }
}

/// One row change of a committed transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The relation, as of this change.
    pub relation: Arc<RelationInfo>,
    /// What happened.
    pub op: Op,
    /// The new row (INSERT, UPDATE).
    pub record: Option<Row>,
    /// The old row (UPDATE, DELETE): the whole row under REPLICA IDENTITY FULL,
    /// otherwise the key columns (other columns [`Datum::Absent`]); for an
    /// UPDATE without an old tuple, the key columns taken from the new row.
    pub old_record: Option<Row>,
    /// Columns left out of `record` because they were unchanged TOASTed values
    /// with no old row to recover them from.
    pub missing_toast: Vec<String>,
}

impl Change {
    /// Approximate heap bytes held.
    pub fn byte_size(&self) -> usize {
        std::mem::size_of::<Change>()
            + self.record.as_ref().map_or(0, Row::byte_size)
            + self.old_record.as_ref().map_or(0, Row::byte_size)
    }

    /// Appends `row` as a JSON object (column → value as Supabase encodes it),
    /// leaving out absent columns.
    pub fn write_row_json(&self, row: &Row, out: &mut Vec<u8>) {
        self.write_row_json_limited(row, None, out);
    }

    /// As [`Change::write_row_json`]; with `max_value_len`, columns whose JSON
    /// value is longer are left out (Supabase's rule for records over its
    /// payload limit: keep the values of at most 64 bytes).
    pub fn write_row_json_limited(&self, row: &Row, max_value_len: Option<usize>, out: &mut Vec<u8>) {
        self.write_row_json_masked(row, max_value_len, None, out);
    }

    /// As [`Change::write_row_json_limited`], leaving out the columns `mask`
    /// (in relation order) does not keep.
    pub fn write_row_json_masked(
        &self,
        row: &Row,
        max_value_len: Option<usize>,
        mask: Option<&[bool]>,
        out: &mut Vec<u8>,
    ) {
        out.push(b'{');
        let mut first = true;
        for (i, (column, datum)) in self.relation.columns.iter().zip(&row.0).enumerate() {
            if matches!(datum, Datum::Absent) || mask.is_some_and(|m| !m.get(i).copied().unwrap_or(false)) {
                continue;
            }
            let rollback = out.len();
            if !first {
                out.push(b',');
            }
            write_json_string(&column.name, out);
            out.push(b':');
            let value_start = out.len();
            match datum {
                Datum::Null | Datum::Absent => out.extend_from_slice(b"null"),
                Datum::Text(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => value::write_json(&column.kind, text, out),
                    // The connection's client_encoding is UTF8, so this does not
                    // happen; keep the output valid JSON if it does.
                    Err(_) => write_json_string(&String::from_utf8_lossy(bytes), out),
                },
            }
            if max_value_len.is_some_and(|max| out.len() - value_start > max) {
                out.truncate(rollback);
                continue;
            }
            first = false;
        }
        out.push(b'}');
    }

    /// `record` as a JSON value (tests and tools; the hot path writes bytes).
    pub fn record_json(&self) -> Option<serde_json::Value> {
        self.record.as_ref().map(|row| self.row_value(row))
    }

    /// `old_record` as a JSON value.
    pub fn old_record_json(&self) -> Option<serde_json::Value> {
        self.old_record.as_ref().map(|row| self.row_value(row))
    }

    fn row_value(&self, row: &Row) -> serde_json::Value {
        let mut out = Vec::new();
        self.write_row_json(row, &mut out);
        serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
    }
}

/// Appends `text` as a JSON string.
pub(crate) fn write_json_string(text: &str, out: &mut Vec<u8>) {
    // serde_json escapes exactly as JSON requires; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// A transaction boundary or change, in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxEvent {
    /// A committed transaction starts; its changes follow.
    Begin(TxBegin),
    /// One change of the current transaction.
    Change(Change),
    /// The current transaction ends; acknowledge `end_lsn` once handled.
    Commit(TxInfo),
    /// A transactional logical decoding message of the current transaction
    /// (`pg_logical_emit_message(true, prefix, content)`) whose prefix
    /// starts with [`WALCAST_MESSAGE_PREFIX`], in WAL order among its
    /// changes, so a later stage can react to walcast's own markers exactly
    /// where they were written. Other prefixes belong to other tools and are
    /// not passed on.
    Message {
        /// The prefix, starting with `walcast`.
        prefix: String,
        /// The content as written.
        content: bytes::Bytes,
        /// LSN of the message.
        lsn: crate::lsn::Lsn,
    },
}

/// The prefix of the logical decoding messages walcast passes on
/// ([`TxEvent::Message`]).
pub const WALCAST_MESSAGE_PREFIX: &str = "walcast";

/// The start of a committed transaction (pgoutput sends only committed
/// transactions, so its changes can be passed on before the Commit arrives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxBegin {
    /// Transaction id.
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// Commit time.
    pub commit_timestamp: PgTimestamp,
}

/// What is known about a committed transaction at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxInfo {
    /// Transaction id.
    pub xid: u32,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: what the slot is acknowledged with.
    pub end_lsn: Lsn,
    /// Commit time.
    pub commit_timestamp: PgTimestamp,
}
