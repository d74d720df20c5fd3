//! Encoding [`Message`]s back into pgoutput wire bytes.
//!
//! The inverse of [`decode()`](super::decode()): tests, benches and synthetic captures
//! use it to produce exactly what PostgreSQL would send. It is not on the
//! replication path (walcast never sends pgoutput).
//!
//! Invariants:
//! - `decode_message(&encode(m, s), s) == Ok(m)` for every message whose
//!   `xid` fields are `Some` exactly when `s` (the in-stream flag) is true,
//!   whose strings contain no NUL and whose counts fit their wire fields.
//! - Output is appended; nothing already in the target buffer is touched.

use super::message::{tag, Message, OldTuple, PgTimestamp, Prepare, TupleData, TupleValue};
use crate::lsn::Lsn;

/// Encodes one message into a new buffer; see [`encode_into`].
///
/// # Panics
///
/// As [`encode_into`].
pub fn encode(msg: &Message, in_stream: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(msg, in_stream, &mut out);
    out
}

/// Appends the wire bytes of one message to `out`.
///
/// With `in_stream` the messages that carry a stream xid (Relation, Type,
/// Insert, Update, Delete, Truncate, logical message) get it written first,
/// from their `xid` field (0 if that is `None`); without it the field is
/// ignored. This mirrors the decoder, which fills `xid` exactly inside a
/// stream block. Strings are written as given plus a NUL, so one containing
/// a NUL will not decode back.
///
/// # Panics
///
/// If a tuple or relation has more than 65,535 columns, a truncate more than
/// `i32::MAX` relations, or a value or message content is longer than
/// `i32::MAX` bytes: the wire format cannot express them.
pub fn encode_into(msg: &Message, in_stream: bool, out: &mut Vec<u8>) {
    let mut w = Writer { out, in_stream };
    w.u8(msg.tag());
    match msg {
        Message::Begin(m) => {
            w.lsn(m.final_lsn);
            w.timestamp(m.commit_timestamp);
            w.u32(m.xid);
        }
        Message::Commit(m) => {
            w.u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.timestamp(m.commit_timestamp);
        }
        Message::Origin(m) => {
            w.lsn(m.commit_lsn);
            w.string(&m.name);
        }
        Message::Relation(m) => {
            w.stream_xid(m.xid);
            w.u32(m.oid);
            w.string(&m.namespace);
            w.string(&m.name);
            w.u8(m.replica_identity.as_byte());
            w.u16_count(m.columns.len());
            for column in &m.columns {
                w.u8(column.flags);
                w.string(&column.name);
                w.u32(column.type_oid);
                w.i32(column.type_modifier);
            }
        }
        Message::Type(m) => {
            w.stream_xid(m.xid);
            w.u32(m.oid);
            w.string(&m.namespace);
            w.string(&m.name);
        }
        Message::Insert(m) => {
            w.stream_xid(m.xid);
            w.u32(m.relation_oid);
            w.u8(tag::TUPLE_NEW);
            w.tuple(&m.new);
        }
        Message::Update(m) => {
            w.stream_xid(m.xid);
            w.u32(m.relation_oid);
            if let Some(old) = &m.old {
                w.old_tuple(old);
            }
            w.u8(tag::TUPLE_NEW);
            w.tuple(&m.new);
        }
        Message::Delete(m) => {
            w.stream_xid(m.xid);
            w.u32(m.relation_oid);
            w.old_tuple(&m.old);
        }
        Message::Truncate(m) => {
            w.stream_xid(m.xid);
            w.i32_len(m.relation_oids.len());
            w.u8(m.options);
            for &oid in &m.relation_oids {
                w.u32(oid);
            }
        }
        Message::LogicalMessage(m) => {
            w.stream_xid(m.xid);
            w.u8(m.flags);
            w.lsn(m.lsn);
            w.string(&m.prefix);
            w.i32_len(m.content.len());
            w.out.extend_from_slice(&m.content);
        }
        Message::StreamStart(m) => {
            w.u32(m.xid);
            w.u8(u8::from(m.first_segment));
        }
        Message::StreamStop => {}
        Message::StreamCommit(m) => {
            w.u32(m.xid);
            w.u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.timestamp(m.commit_timestamp);
        }
        Message::StreamAbort(m) => {
            w.u32(m.xid);
            w.u32(m.subxid);
            if let Some(abort) = &m.abort {
                w.lsn(abort.abort_lsn);
                w.timestamp(abort.abort_timestamp);
            }
        }
        Message::BeginPrepare(m) => {
            w.lsn(m.prepare_lsn);
            w.lsn(m.end_lsn);
            w.timestamp(m.prepare_timestamp);
            w.u32(m.xid);
            w.string(&m.gid);
        }
        Message::Prepare(m) | Message::StreamPrepare(m) => w.prepare(m),
        Message::CommitPrepared(m) => {
            w.u8(m.flags);
            w.lsn(m.commit_lsn);
            w.lsn(m.end_lsn);
            w.timestamp(m.commit_timestamp);
            w.u32(m.xid);
            w.string(&m.gid);
        }
        Message::RollbackPrepared(m) => {
            w.u8(m.flags);
            w.lsn(m.prepare_end_lsn);
            w.lsn(m.rollback_end_lsn);
            w.timestamp(m.prepare_timestamp);
            w.timestamp(m.rollback_timestamp);
            w.u32(m.xid);
            w.string(&m.gid);
        }
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    in_stream: bool,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn u16_count(&mut self, count: usize) {
        let count = u16::try_from(count).expect("more than 65535 columns cannot be encoded");
        self.out.extend_from_slice(&count.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn i32_len(&mut self, len: usize) {
        let len = i32::try_from(len).expect("a length above i32::MAX cannot be encoded");
        self.i32(len);
    }

    fn lsn(&mut self, v: Lsn) {
        self.out.extend_from_slice(&v.0.to_be_bytes());
    }

    fn timestamp(&mut self, v: PgTimestamp) {
        self.out.extend_from_slice(&v.0.to_be_bytes());
    }

    fn stream_xid(&mut self, xid: Option<u32>) {
        if self.in_stream {
            self.u32(xid.unwrap_or(0));
        }
    }

    fn string(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(0);
    }

    fn old_tuple(&mut self, old: &OldTuple) {
        match old {
            OldTuple::Key(t) => {
                self.u8(tag::TUPLE_KEY);
                self.tuple(t);
            }
            OldTuple::Full(t) => {
                self.u8(tag::TUPLE_OLD);
                self.tuple(t);
            }
        }
    }

    fn tuple(&mut self, tuple: &TupleData) {
        self.u16_count(tuple.columns.len());
        for value in &tuple.columns {
            match value {
                TupleValue::Null => self.u8(tag::VALUE_NULL),
                TupleValue::UnchangedToast => self.u8(tag::VALUE_UNCHANGED_TOAST),
                TupleValue::Text(bytes) => {
                    self.u8(tag::VALUE_TEXT);
                    self.i32_len(bytes.len());
                    self.out.extend_from_slice(bytes);
                }
                TupleValue::Binary(bytes) => {
                    self.u8(tag::VALUE_BINARY);
                    self.i32_len(bytes.len());
                    self.out.extend_from_slice(bytes);
                }
            }
        }
    }

    fn prepare(&mut self, m: &Prepare) {
        self.u8(m.flags);
        self.lsn(m.prepare_lsn);
        self.lsn(m.end_lsn);
        self.timestamp(m.prepare_timestamp);
        self.u32(m.xid);
        self.string(&m.gid);
    }
}
