//! Committed transactions ⇄ chunked stream payloads: how the source node
//! puts each transaction on the JetStream stream and how edge nodes read it
//! back into the [`TxEvent`]s their hub takes.
//!
//! ```text
//!  source: TxEvent… ──TxChunker::push──▶ Chunk{payload, commit_lsn, index, end_lsn}… ──▶ stream
//!  edge:   stream ──TxReader::read(index, payload)──▶ TxEvent…
//! ```
//!
//! # Format
//!
//! A transaction is one byte stream of frames, each
//! `[u32 little-endian length][postcard-encoded WireEvent]`, cut into chunks
//! of exactly `max_bytes` (the last one shorter, never empty). A frame may
//! straddle chunks, so a single huge row still travels; the reader keeps the
//! partial frame until the next chunk of the same transaction.
//!
//! Relations travel once per transaction: a `Relation` frame comes before
//! the first change of a relation in the transaction (and again if its
//! description changed mid-transaction); changes name it by oid.
//!
//! # Invariants
//!
//! - The decoded events equal the encoded ones (`==`), including
//!   [`Datum::Absent`], `missing_toast`, LSNs and timestamps; column kinds
//!   are derived from the type exactly as the assembler does.
//! - The reader hands out one `Arc<RelationInfo>` per relation per
//!   transaction, not one per change.
//! - Decoding never panics: bad input is a [`WireError`] with a reason;
//!   frames over [`MAX_FRAME`] and events out of order are refused.
//! - On any error the transaction in progress is unusable: the caller
//!   resets (the reader may already have appended some of its events, so
//!   the consumer of `out` must drop the partial transaction too).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::change::assemble::kind_for;
use crate::change::{Change, ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxEvent, TxInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{PgTimestamp, ReplicaIdentity};

/// The longest frame accepted either way: 1 GiB (PostgreSQL's own limit
/// for one value).
pub const MAX_FRAME: usize = 1 << 30;

/// The smallest chunk size [`TxChunker::new`] accepts.
pub const MIN_CHUNK: usize = 64;

/// Length prefix of a frame.
const HEADER: usize = 4;

/// Errors of the transaction wire format (none is transient: the bytes or
/// the event order are wrong, and trying again gives the same answer).
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// An event could not be encoded.
    #[error("encoding a transaction event: {0}")]
    Encode(#[source] postcard::Error),
    /// A frame does not decode as an event.
    #[error("a frame of the transaction stream does not decode: {0}")]
    Decode(#[source] postcard::Error),
    /// A frame is longer than [`MAX_FRAME`].
    #[error("a frame of {len} bytes is over the {MAX_FRAME}-byte limit")]
    FrameTooLarge {
        /// Its length.
        len: u64,
    },
    /// Events or chunks came in an order a transaction cannot have.
    #[error("out of order: {0}")]
    Sequence(String),
    /// A change named a relation no `Relation` frame of its transaction described.
    #[error("change for relation OID {0} without a Relation frame in its transaction")]
    UnknownRelation(u32),
    /// A row does not have one value per column of its relation.
    #[error("relation {relation}: a row has {got} values for {expected} columns")]
    ColumnCount {
        /// `schema.table`.
        relation: String,
        /// Columns described.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// A replica identity byte is not one of `d`, `n`, `f`, `i`.
    #[error("unknown replica identity byte {0:#04x}")]
    ReplicaIdentity(u8),
    /// A frame is longer than the event it holds.
    #[error("a frame of {len} bytes leaves {unread} bytes after its event")]
    FrameLength {
        /// The frame's length.
        len: usize,
        /// Bytes left after the event.
        unread: usize,
    },
    /// Bytes follow the Commit frame in its chunk.
    #[error("{0} bytes after the transaction's Commit")]
    TrailingBytes(usize),
}

impl WireError {
    /// Whether retrying may help: never (the same bytes decode the same way).
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// One stream message's payload of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Up to `max_bytes` bytes of the transaction's frame stream.
    pub payload: Bytes,
    /// The transaction's commit LSN (`TxBegin::commit_lsn`): with `index`, the message's dedup id.
    pub commit_lsn: Lsn,
    /// 0, 1, … within the transaction.
    pub index: u32,
    /// Some(end_lsn) on the transaction's last chunk (the one holding its Commit).
    pub end_lsn: Option<Lsn>,
}

/// Bytes, written as one postcard byte string (not a sequence of numbers).
#[derive(Debug)]
struct Blob<'a>(Cow<'a, [u8]>);

impl Serialize for Blob<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de, 'a> Deserialize<'de> for Blob<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BlobVisitor<'a>(std::marker::PhantomData<Blob<'a>>);

        impl<'de, 'a> serde::de::Visitor<'de> for BlobVisitor<'a> {
            type Value = Blob<'a>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                Ok(Blob(Cow::Owned(v.to_vec())))
            }

            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                Ok(Blob(Cow::Owned(v)))
            }
        }

        deserializer.deserialize_bytes(BlobVisitor(std::marker::PhantomData))
    }
}

/// One value of a row.
#[derive(Debug, Serialize, Deserialize)]
enum WireDatum<'a> {
    Null,
    Text(Blob<'a>),
    Absent,
}

/// What happened to a row ([`Op`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum WireOp {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl From<Op> for WireOp {
    fn from(op: Op) -> WireOp {
        match op {
            Op::Insert => WireOp::Insert,
            Op::Update => WireOp::Update,
            Op::Delete => WireOp::Delete,
            Op::Truncate => WireOp::Truncate,
        }
    }
}

impl From<WireOp> for Op {
    fn from(op: WireOp) -> Op {
        match op {
            WireOp::Insert => Op::Insert,
            WireOp::Update => Op::Update,
            WireOp::Delete => Op::Delete,
            WireOp::Truncate => Op::Truncate,
        }
    }
}

/// A published column (its `kind` is derived again on decode).
#[derive(Debug, Serialize, Deserialize)]
struct WireColumn<'a> {
    name: Cow<'a, str>,
    type_name: Cow<'a, str>,
    type_oid: u32,
    is_key: bool,
}

/// One frame: [`TxEvent`] with relations sent apart. LSNs are raw `u64`s
/// and timestamps raw `i64`s (the serde form of [`Lsn`] is its text).
#[derive(Debug, Serialize, Deserialize)]
enum WireEvent<'a> {
    Begin {
        xid: u32,
        commit_lsn: u64,
        commit_timestamp: i64,
    },
    Relation {
        oid: u32,
        schema: Cow<'a, str>,
        table: Cow<'a, str>,
        /// The `relreplident` byte.
        replica_identity: u8,
        columns: Vec<WireColumn<'a>>,
    },
    Change {
        oid: u32,
        op: WireOp,
        record: Option<Vec<WireDatum<'a>>>,
        old_record: Option<Vec<WireDatum<'a>>>,
        missing_toast: Vec<Cow<'a, str>>,
    },
    Message {
        prefix: Cow<'a, str>,
        content: Blob<'a>,
        lsn: u64,
    },
    Commit {
        xid: u32,
        commit_lsn: u64,
        end_lsn: u64,
        commit_timestamp: i64,
    },
}

fn wire_row(row: &Row) -> Vec<WireDatum<'_>> {
    row.0
        .iter()
        .map(|d| match d {
            Datum::Null => WireDatum::Null,
            Datum::Text(b) => WireDatum::Text(Blob(Cow::Borrowed(b))),
            Datum::Absent => WireDatum::Absent,
        })
        .collect()
}

fn wire_relation(rel: &RelationInfo) -> WireEvent<'_> {
    WireEvent::Relation {
        oid: rel.oid,
        schema: Cow::Borrowed(&rel.schema),
        table: Cow::Borrowed(&rel.table),
        replica_identity: rel.replica_identity.as_byte(),
        columns: rel
            .columns
            .iter()
            .map(|c| WireColumn {
                name: Cow::Borrowed(&c.name),
                type_name: Cow::Borrowed(&c.type_name),
                type_oid: c.type_oid,
                is_key: c.is_key,
            })
            .collect(),
    }
}

/// Cuts committed transactions into chunks (the source side).
#[derive(Debug)]
pub struct TxChunker {
    max_bytes: usize,
    /// The open transaction's Begin.
    open: Option<TxBegin>,
    /// Frame bytes not yet handed out as a chunk.
    buf: BytesMut,
    /// Index of the next chunk.
    index: u32,
    /// Relations described so far in the open transaction.
    sent: HashMap<u32, Arc<RelationInfo>>,
    /// Scratch for one encoded event.
    scratch: Vec<u8>,
}

impl TxChunker {
    /// Chunks of at most `max_bytes` payload bytes each (`max_bytes` ≥ 64;
    /// smaller values are raised to [`MIN_CHUNK`]).
    pub fn new(max_bytes: usize) -> TxChunker {
        TxChunker {
            max_bytes: max_bytes.max(MIN_CHUNK),
            open: None,
            buf: BytesMut::new(),
            index: 0,
            sent: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Appends one event of a committed transaction (Begin first, Commit last, in order);
    /// pushes every chunk that is full, and at the Commit the final one, to `out`.
    ///
    /// # Errors
    /// An event out of order, or a frame over [`MAX_FRAME`]; the open
    /// transaction is then unusable ([`TxChunker::reset`]).
    pub fn push(&mut self, event: &TxEvent, out: &mut Vec<Chunk>) -> Result<(), WireError> {
        match event {
            TxEvent::Begin(begin) => {
                if self.open.is_some() {
                    return Err(WireError::Sequence("Begin inside an open transaction".into()));
                }
                self.reset();
                self.open = Some(*begin);
                self.frame(&WireEvent::Begin {
                    xid: begin.xid,
                    commit_lsn: begin.commit_lsn.0,
                    commit_timestamp: begin.commit_timestamp.0,
                })?;
            }
            TxEvent::Change(change) => {
                self.require_open("Change")?;
                let rel = &change.relation;
                let known = self.sent.get(&rel.oid).is_some_and(|s| Arc::ptr_eq(s, rel) || **s == **rel);
                if !known {
                    self.frame(&wire_relation(rel))?;
                    self.sent.insert(rel.oid, Arc::clone(rel));
                }
                self.frame(&WireEvent::Change {
                    oid: rel.oid,
                    op: change.op.into(),
                    record: change.record.as_ref().map(wire_row),
                    old_record: change.old_record.as_ref().map(wire_row),
                    missing_toast: change.missing_toast.iter().map(|s| Cow::Borrowed(s.as_str())).collect(),
                })?;
            }
            TxEvent::Message { prefix, content, lsn } => {
                self.require_open("Message")?;
                self.frame(&WireEvent::Message {
                    prefix: Cow::Borrowed(prefix),
                    content: Blob(Cow::Borrowed(content)),
                    lsn: lsn.0,
                })?;
            }
            TxEvent::Commit(info) => {
                let begin = self.require_open("Commit")?;
                self.frame(&WireEvent::Commit {
                    xid: info.xid,
                    commit_lsn: info.commit_lsn.0,
                    end_lsn: info.end_lsn.0,
                    commit_timestamp: info.commit_timestamp.0,
                })?;
                self.flush_full(begin.commit_lsn, out);
                // Never empty: the Commit frame is at least its header.
                out.push(Chunk {
                    payload: self.buf.split().freeze(),
                    commit_lsn: begin.commit_lsn,
                    index: self.index,
                    end_lsn: Some(info.end_lsn),
                });
                self.reset();
                return Ok(());
            }
        }
        if let Some(begin) = self.open {
            self.flush_full(begin.commit_lsn, out);
        }
        Ok(())
    }

    /// Forget a partial transaction (the source restarted).
    pub fn reset(&mut self) {
        self.open = None;
        self.buf.clear();
        self.index = 0;
        self.sent.clear();
    }

    fn require_open(&self, what: &str) -> Result<TxBegin, WireError> {
        self.open.ok_or_else(|| WireError::Sequence(format!("{what} outside a transaction (no Begin)")))
    }

    /// Appends one frame to the buffer.
    fn frame(&mut self, event: &WireEvent<'_>) -> Result<(), WireError> {
        self.scratch.clear();
        let scratch = postcard::to_extend(event, std::mem::take(&mut self.scratch)).map_err(WireError::Encode)?;
        self.scratch = scratch;
        let len = self.scratch.len();
        if len > MAX_FRAME {
            return Err(WireError::FrameTooLarge { len: len as u64 });
        }
        self.buf.reserve(HEADER + len);
        // Fits: at most MAX_FRAME (1 GiB).
        self.buf.put_u32_le(len as u32);
        self.buf.extend_from_slice(&self.scratch);
        Ok(())
    }

    /// Hands out full chunks while more bytes follow them (so the last
    /// chunk, the one with the Commit, is never empty).
    fn flush_full(&mut self, commit_lsn: Lsn, out: &mut Vec<Chunk>) {
        while self.buf.len() > self.max_bytes {
            out.push(Chunk {
                payload: self.buf.split_to(self.max_bytes).freeze(),
                commit_lsn,
                index: self.index,
                end_lsn: None,
            });
            self.index += 1;
        }
    }
}

/// Reads chunks back into transaction events (the edge side).
#[derive(Debug, Default)]
pub struct TxReader {
    /// Index of the next chunk while a transaction is open.
    next: Option<u32>,
    /// Whether the open transaction's Begin was decoded.
    began: bool,
    /// Bytes of a frame not complete yet.
    pending: Vec<u8>,
    /// Relations of the open transaction.
    relations: HashMap<u32, Arc<RelationInfo>>,
}

impl TxReader {
    /// A reader waiting for a transaction's first chunk.
    pub fn new() -> TxReader {
        TxReader::default()
    }

    /// Decodes one chunk's payload, appending the complete events it finishes to `out`.
    /// `index` is the chunk's index: a chunk with index > 0 while no transaction is open
    /// (the reader started mid-transaction) is skipped (returns Ok, nothing appended);
    /// index 0 while a transaction is open is an error (caller resets).
    ///
    /// # Errors
    /// A chunk out of order, a frame that does not decode or is too long,
    /// events out of order; then [`TxReader::reset`], and drop what was
    /// appended of the transaction. A chunk 0 refused because a transaction
    /// was open (the source restarted it) can be read again after the reset.
    pub fn read(&mut self, index: u32, payload: &[u8], out: &mut Vec<TxEvent>) -> Result<(), WireError> {
        match self.next {
            None if index > 0 => return Ok(()),
            None => {
                self.reset();
                self.next = Some(0);
            }
            Some(_) if index == 0 => {
                return Err(WireError::Sequence("a transaction's first chunk while another is open".into()))
            }
            Some(expected) if index != expected => {
                return Err(WireError::Sequence(format!("chunk {index} where chunk {expected} was expected")))
            }
            Some(_) => {}
        }
        self.next = Some(index.saturating_add(1));
        self.pending.extend_from_slice(payload);
        let mut pos = 0;
        let mut committed = false;
        let result = loop {
            let rest = &self.pending[pos..];
            let Some(header) = rest.get(..HEADER) else { break Ok(()) };
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if len > MAX_FRAME {
                break Err(WireError::FrameTooLarge { len: len as u64 });
            }
            let Some(body) = rest.get(HEADER..HEADER + len) else { break Ok(()) };
            pos += HEADER + len;
            let event = match postcard::take_from_bytes::<WireEvent<'_>>(body) {
                Ok((event, [])) => event,
                Ok((_, unread)) => break Err(WireError::FrameLength { len, unread: unread.len() }),
                Err(err) => break Err(WireError::Decode(err)),
            };
            committed = matches!(event, WireEvent::Commit { .. });
            if let Err(err) = apply(&mut self.began, &mut self.relations, event, out) {
                break Err(err);
            }
            if committed {
                let trailing = self.pending.len() - pos;
                break if trailing > 0 { Err(WireError::TrailingBytes(trailing)) } else { Ok(()) };
            }
        };
        if committed && result.is_ok() {
            // The transaction is over: wait for the next one's chunk 0.
            self.reset();
        } else {
            self.pending.drain(..pos);
        }
        result
    }

    /// Forget a partial transaction (a new leader term, a gap).
    pub fn reset(&mut self) {
        self.next = None;
        self.began = false;
        self.pending.clear();
        self.relations.clear();
    }

    /// Whether a transaction is open: its chunk 0 was read, its Commit not
    /// yet (its Begin may still be split across chunks).
    pub fn in_transaction(&self) -> bool {
        self.next.is_some()
    }
}

/// Turns one decoded frame into events of the open transaction.
fn apply(
    began: &mut bool,
    relations: &mut HashMap<u32, Arc<RelationInfo>>,
    event: WireEvent<'_>,
    out: &mut Vec<TxEvent>,
) -> Result<(), WireError> {
    let require = |began: bool, what: &str| {
        if began {
            Ok(())
        } else {
            Err(WireError::Sequence(format!("{what} before the transaction's Begin")))
        }
    };
    match event {
        WireEvent::Begin { xid, commit_lsn, commit_timestamp } => {
            if *began {
                return Err(WireError::Sequence("a second Begin in one transaction".into()));
            }
            *began = true;
            out.push(TxEvent::Begin(TxBegin {
                xid,
                commit_lsn: Lsn(commit_lsn),
                commit_timestamp: PgTimestamp(commit_timestamp),
            }));
        }
        WireEvent::Relation { oid, schema, table, replica_identity, columns } => {
            require(*began, "Relation")?;
            let replica_identity =
                ReplicaIdentity::from_byte(replica_identity).ok_or(WireError::ReplicaIdentity(replica_identity))?;
            let columns = columns
                .into_iter()
                .map(|c| ColumnInfo {
                    kind: kind_for(c.type_oid, &c.type_name),
                    name: c.name.into_owned(),
                    type_name: c.type_name.into_owned(),
                    type_oid: c.type_oid,
                    is_key: c.is_key,
                })
                .collect();
            let rel =
                RelationInfo { oid, schema: schema.into_owned(), table: table.into_owned(), replica_identity, columns };
            relations.insert(oid, Arc::new(rel));
        }
        WireEvent::Change { oid, op, record, old_record, missing_toast } => {
            require(*began, "Change")?;
            let relation = relations.get(&oid).ok_or(WireError::UnknownRelation(oid))?;
            let row = |values: Option<Vec<WireDatum<'_>>>| -> Result<Option<Row>, WireError> {
                let Some(values) = values else { return Ok(None) };
                if values.len() != relation.columns.len() {
                    return Err(WireError::ColumnCount {
                        relation: format!("{}.{}", relation.schema, relation.table),
                        expected: relation.columns.len(),
                        got: values.len(),
                    });
                }
                Ok(Some(Row(values
                    .into_iter()
                    .map(|v| match v {
                        WireDatum::Null => Datum::Null,
                        WireDatum::Text(b) => Datum::Text(Bytes::from(b.0.into_owned())),
                        WireDatum::Absent => Datum::Absent,
                    })
                    .collect())))
            };
            let record = row(record)?;
            let old_record = row(old_record)?;
            out.push(TxEvent::Change(Change {
                relation: Arc::clone(relation),
                op: op.into(),
                record,
                old_record,
                missing_toast: missing_toast.into_iter().map(Cow::into_owned).collect(),
            }));
        }
        WireEvent::Message { prefix, content, lsn } => {
            require(*began, "Message")?;
            out.push(TxEvent::Message {
                prefix: prefix.into_owned(),
                content: Bytes::from(content.0.into_owned()),
                lsn: Lsn(lsn),
            });
        }
        WireEvent::Commit { xid, commit_lsn, end_lsn, commit_timestamp } => {
            require(*began, "Commit")?;
            *began = false;
            relations.clear();
            out.push(TxEvent::Commit(TxInfo {
                xid,
                commit_lsn: Lsn(commit_lsn),
                end_lsn: Lsn(end_lsn),
                commit_timestamp: PgTimestamp(commit_timestamp),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, type_name: &str, type_oid: u32, is_key: bool) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            type_name: type_name.into(),
            type_oid,
            is_key,
            kind: kind_for(type_oid, type_name),
        }
    }

    fn todos(identity: ReplicaIdentity) -> Arc<RelationInfo> {
        Arc::new(RelationInfo {
            oid: 16_384,
            schema: "public".into(),
            table: "todos".into(),
            replica_identity: identity,
            columns: vec![
                col("id", "int8", 20, true),
                col("title", "text", 25, false),
                col("done", "bool", 16, false),
                col("tags", "_mood", 90_001, false),
                col("mood", "mood", 90_000, false),
                col("body", "jsonb", 3802, false),
            ],
        })
    }

    fn members() -> Arc<RelationInfo> {
        Arc::new(RelationInfo {
            oid: 16_400,
            schema: "app".into(),
            table: "members".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![col("id", "uuid", 2950, true), col("team", "text", 25, false)],
        })
    }

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn change(relation: &Arc<RelationInfo>, op: Op, record: Option<Row>, old: Option<Row>) -> TxEvent {
        TxEvent::Change(Change { relation: Arc::clone(relation), op, record, old_record: old, missing_toast: vec![] })
    }

    fn begin(n: u64) -> TxEvent {
        TxEvent::Begin(TxBegin {
            xid: n as u32,
            commit_lsn: Lsn(0x1_0000_0000 + n * 100),
            commit_timestamp: PgTimestamp(-5 + n as i64),
        })
    }

    fn commit(n: u64) -> TxEvent {
        TxEvent::Commit(TxInfo {
            xid: n as u32,
            commit_lsn: Lsn(0x1_0000_0000 + n * 100),
            end_lsn: Lsn(0x1_0000_0000 + n * 100 + 40),
            commit_timestamp: PgTimestamp(-5 + n as i64),
        })
    }

    /// Several transactions covering every kind of event.
    fn transactions() -> Vec<Vec<TxEvent>> {
        let todos_d = todos(ReplicaIdentity::Default);
        let mut todos_f = (*todos(ReplicaIdentity::Full)).clone();
        todos_f.columns.push(col("added", "timestamptz", 1184, false));
        let todos_f = Arc::new(todos_f);
        let m = members();
        let full =
            |id: &str| Row(vec![t(id), t("a \"title\""), t("t"), t("{happy,sad}"), t("ok"), t("{\"k\": [1, 2]}")]);
        let key_only =
            |id: &str| Row(vec![t(id), Datum::Absent, Datum::Absent, Datum::Absent, Datum::Absent, Datum::Absent]);
        let toasted = Change {
            relation: Arc::clone(&todos_d),
            op: Op::Update,
            record: Some(Row(vec![t("2"), Datum::Text(Bytes::new()), t("f"), Datum::Null, t("meh"), Datum::Absent])),
            old_record: Some(key_only("2")),
            missing_toast: vec!["body".into()],
        };
        vec![
            vec![
                begin(1),
                change(&todos_d, Op::Insert, Some(full("1")), None),
                change(&m, Op::Insert, Some(Row(vec![t("00000000-0000-4000-8000-000000000001"), t("red")])), None),
                TxEvent::Change(toasted),
                change(&todos_d, Op::Delete, None, Some(key_only("1"))),
                TxEvent::Message {
                    prefix: "walcast:policy".into(),
                    content: Bytes::from_static(b"\x00\xffreload"),
                    lsn: Lsn(123),
                },
                change(
                    &m,
                    Op::Update,
                    Some(Row(vec![t("00000000-0000-4000-8000-000000000001"), t("blue")])),
                    Some(Row(vec![t("00000000-0000-4000-8000-000000000001"), t("red")])),
                ),
                // The relation changed mid-transaction (ALTER TABLE).
                change(
                    &todos_f,
                    Op::Update,
                    Some({
                        let mut r = full("3");
                        r.0.push(t("2024-01-01 00:00:00+00"));
                        r
                    }),
                    Some({
                        let mut r = full("3");
                        r.0.push(Datum::Null);
                        r
                    }),
                ),
                change(&todos_f, Op::Truncate, None, None),
                commit(1),
            ],
            vec![begin(2), commit(2)],
            vec![
                begin(3),
                change(&todos_d, Op::Insert, Some(full(&"9".repeat(300))), None),
                change(&todos_d, Op::Insert, Some(full("4")), None),
                commit(3),
            ],
        ]
    }

    fn round_trip(max_bytes: usize, txs: &[Vec<TxEvent>]) {
        let mut chunker = TxChunker::new(max_bytes);
        let mut reader = TxReader::new();
        for tx in txs {
            let mut chunks = Vec::new();
            for event in tx {
                chunker.push(event, &mut chunks).unwrap();
            }
            let TxEvent::Begin(b) = &tx[0] else { unreachable!() };
            let TxEvent::Commit(c) = &tx[tx.len() - 1] else { unreachable!() };
            let mut events = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                assert_eq!(chunk.index, i as u32);
                assert_eq!(chunk.commit_lsn, b.commit_lsn);
                assert!(!chunk.payload.is_empty() && chunk.payload.len() <= chunker.max_bytes, "{max_bytes}");
                assert_eq!(chunk.end_lsn, (i + 1 == chunks.len()).then_some(c.end_lsn));
                reader.read(chunk.index, &chunk.payload, &mut events).unwrap();
                assert_eq!(reader.in_transaction(), i + 1 < chunks.len());
            }
            assert_eq!(&events, tx, "chunks of {max_bytes} bytes");
            // One Arc per relation (and description) per transaction.
            let mut arcs: Vec<&Arc<RelationInfo>> = Vec::new();
            for e in &events {
                if let TxEvent::Change(c) = e {
                    match arcs.iter().find(|a| a.oid == c.relation.oid && ***a == c.relation) {
                        Some(a) => assert!(Arc::ptr_eq(a, &c.relation)),
                        None => arcs.push(&c.relation),
                    }
                }
            }
        }
    }

    #[test]
    fn transactions_round_trip_at_every_chunk_size() {
        let txs = transactions();
        for max in [64, 100, 4096, 1 << 24] {
            round_trip(max, &txs);
        }
    }

    #[test]
    fn relations_travel_once_per_transaction_and_again_when_changed() {
        let txs = transactions();
        let mut chunker = TxChunker::new(100);
        let mut relations = Vec::new();
        for tx in &txs {
            let mut chunks = Vec::new();
            for e in tx {
                chunker.push(e, &mut chunks).unwrap();
            }
            let stream: Vec<u8> = chunks.iter().flat_map(|c| c.payload.iter().copied()).collect();
            let mut rest = &stream[..];
            let mut oids = Vec::new();
            while !rest.is_empty() {
                let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                if let WireEvent::Relation { oid, .. } = postcard::from_bytes(&rest[4..4 + len]).unwrap() {
                    oids.push(oid);
                }
                rest = &rest[4 + len..];
            }
            relations.push(oids);
        }
        // todos, members, todos again after its ALTER; none in an empty
        // transaction; todos once for two inserts.
        assert_eq!(relations, vec![vec![16_384, 16_400, 16_384], vec![], vec![16_384]]);
    }

    #[test]
    fn kinds_are_derived_as_the_assembler_does() {
        let txs = transactions();
        let mut chunker = TxChunker::new(4096);
        let mut chunks = Vec::new();
        for e in &txs[0] {
            chunker.push(e, &mut chunks).unwrap();
        }
        let mut events = Vec::new();
        let mut reader = TxReader::new();
        for c in &chunks {
            reader.read(c.index, &c.payload, &mut events).unwrap();
        }
        let TxEvent::Change(c) = &events[1] else { panic!("{events:?}") };
        assert_eq!(
            c.relation.columns[3].kind,
            crate::change::value::ValueKind::array_of(&crate::change::value::ValueKind::Text)
        );
        assert_eq!(c.relation.columns[4].kind, crate::change::value::ValueKind::Text);
        assert_eq!(c.relation.columns[0].kind, crate::change::value::kind_of(20));
    }

    #[test]
    fn a_row_of_one_mib_travels_in_64_kib_chunks() {
        let rel = members();
        let big = "x".repeat(1 << 20);
        let tx = vec![begin(7), change(&rel, Op::Insert, Some(Row(vec![t("id"), t(&big)])), None), commit(7)];
        let mut chunker = TxChunker::new(64 << 10);
        let mut chunks = Vec::new();
        for e in &tx {
            chunker.push(e, &mut chunks).unwrap();
        }
        assert_eq!(chunks.len(), 17, "1 MiB and a little, in 64 KiB pieces");
        let mut reader = TxReader::new();
        let mut events = Vec::new();
        for c in &chunks {
            reader.read(c.index, &c.payload, &mut events).unwrap();
        }
        assert_eq!(events, tx);
    }

    #[test]
    fn a_reader_started_mid_transaction_skips_to_the_next_one() {
        let txs = transactions();
        let mut chunker = TxChunker::new(64);
        let mut first = Vec::new();
        for e in &txs[0] {
            chunker.push(e, &mut first).unwrap();
        }
        assert!(first.len() > 3);
        let mut second = Vec::new();
        for e in &txs[1] {
            chunker.push(e, &mut second).unwrap();
        }
        let mut reader = TxReader::new();
        let mut events = Vec::new();
        for c in &first[2..] {
            reader.read(c.index, &c.payload, &mut events).unwrap();
            assert!(!reader.in_transaction());
        }
        assert!(events.is_empty());
        for c in &second {
            reader.read(c.index, &c.payload, &mut events).unwrap();
        }
        assert_eq!(events, txs[1]);
    }

    #[test]
    fn chunks_out_of_order_are_refused() {
        let txs = transactions();
        let mut chunker = TxChunker::new(64);
        let mut chunks = Vec::new();
        for e in &txs[0] {
            chunker.push(e, &mut chunks).unwrap();
        }
        let mut reader = TxReader::new();
        let mut events = Vec::new();
        reader.read(0, &chunks[0].payload, &mut events).unwrap();
        assert!(reader.in_transaction());
        assert!(matches!(reader.read(0, &chunks[0].payload, &mut events), Err(WireError::Sequence(_))));
        assert!(matches!(reader.read(2, &chunks[2].payload, &mut events), Err(WireError::Sequence(_))));
        reader.reset();
        assert!(!reader.in_transaction());
        events.clear();
        for c in &chunks {
            reader.read(c.index, &c.payload, &mut events).unwrap();
        }
        assert_eq!(events, txs[0]);
    }

    #[test]
    fn events_out_of_order_are_refused() {
        let txs = transactions();
        let mut chunker = TxChunker::new(64);
        let mut out = Vec::new();
        for e in [&txs[0][1], &txs[0][5], &commit(1)] {
            let err = chunker.push(e, &mut out).unwrap_err();
            assert!(matches!(err, WireError::Sequence(_)) && !err.is_transient(), "{err}");
        }
        chunker.push(&begin(1), &mut out).unwrap();
        assert!(matches!(chunker.push(&begin(2), &mut out), Err(WireError::Sequence(_))));
        chunker.reset();
        chunker.push(&begin(2), &mut out).unwrap();
        chunker.push(&commit(2), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].end_lsn, Some(Lsn(0x1_0000_0000 + 240)));

        // A stream whose first frame is not a Begin, and one with two Begins.
        let frame = |e: &WireEvent<'_>| {
            let body = postcard::to_allocvec(e).unwrap();
            let mut f = (body.len() as u32).to_le_bytes().to_vec();
            f.extend(body);
            f
        };
        let commit_frame = frame(&WireEvent::Commit { xid: 1, commit_lsn: 1, end_lsn: 2, commit_timestamp: 0 });
        let begin_frame = frame(&WireEvent::Begin { xid: 1, commit_lsn: 1, commit_timestamp: 0 });
        let mut reader = TxReader::new();
        assert!(matches!(reader.read(0, &commit_frame, &mut Vec::new()), Err(WireError::Sequence(_))));
        reader.reset();
        let twice = [begin_frame.clone(), begin_frame.clone()].concat();
        assert!(matches!(reader.read(0, &twice, &mut Vec::new()), Err(WireError::Sequence(_))));
        reader.reset();
        let change = frame(&WireEvent::Change {
            oid: 5,
            op: WireOp::Insert,
            record: None,
            old_record: None,
            missing_toast: vec![],
        });
        let orphan = [begin_frame.clone(), change].concat();
        assert!(matches!(reader.read(0, &orphan, &mut Vec::new()), Err(WireError::UnknownRelation(5))));
        reader.reset();
        let trailing = [begin_frame.clone(), commit_frame, vec![1, 2]].concat();
        assert!(matches!(reader.read(0, &trailing, &mut Vec::new()), Err(WireError::TrailingBytes(2))));
        reader.reset();
        let mut long = begin_frame;
        long[0] += 1;
        long.push(0);
        assert!(matches!(reader.read(0, &long, &mut Vec::new()), Err(WireError::FrameLength { unread: 1, .. })));
    }

    #[test]
    fn frames_over_the_limit_are_refused() {
        let mut reader = TxReader::new();
        let header = ((MAX_FRAME as u32) + 1).to_le_bytes();
        let err = reader.read(0, &header, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
    }

    /// splitmix64.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn garbage_truncated_and_mutated_payloads_never_panic() {
        let mut chunker = TxChunker::new(4096);
        let mut good = Vec::new();
        for e in &transactions()[0] {
            chunker.push(e, &mut good).unwrap();
        }
        let good = good[0].payload.to_vec();
        let mut state = 7;
        for round in 0..3_000 {
            let mut bytes = match round % 3 {
                0 => (0..next(&mut state) % 200).map(|_| next(&mut state) as u8).collect::<Vec<u8>>(),
                1 => good[..(next(&mut state) as usize % good.len())].to_vec(),
                _ => good.clone(),
            };
            if round % 3 == 2 {
                for _ in 0..1 + next(&mut state) % 4 {
                    let i = next(&mut state) as usize % bytes.len();
                    bytes[i] = next(&mut state) as u8;
                }
            }
            let mut reader = TxReader::new();
            let mut events = Vec::new();
            let split = next(&mut state) as usize % (bytes.len() + 1);
            if reader.read(0, &bytes[..split], &mut events).is_ok() {
                let _ = reader.read(1, &bytes[split..], &mut events);
            }
        }
    }
}
