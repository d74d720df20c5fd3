//! Decoding pgoutput payloads into [`Message`]s.
//!
//! The replication stage calls [`Decoder::decode`] (or [`decode`] when it
//! never enables streaming) on the pgoutput payload of each XLogData message.
//! Decoding is a pure function of the bytes plus one bit of state: whether we
//! are inside a Stream Start … Stream Stop block, where Relation, Type,
//! Insert, Update, Delete, Truncate and logical messages carry an extra
//! leading xid.
//!
//! Invariants (the parser's safety rules):
//! - No input can make it panic: every read goes through [`Reader`], which
//!   checks the remaining length first and never indexes.
//! - No allocation is sized by an unchecked wire count: a count of N items
//!   is first checked against the bytes left, at the minimum size of an item,
//!   so a forged column count or length cannot reserve memory it is not
//!   backed by. Negative Int32 lengths are errors.
//! - Strings are NUL-terminated UTF-8; tuple values and logical message
//!   contents are zero-copy [`Bytes`] slices of the payload.
//! - A message must use the payload exactly: leftover bytes are an error,
//!   since they mean we misread the layout.

use bytes::Bytes;

use super::error::DecodeError;
use super::message::{
    tag, Begin, BeginPrepare, Column, Commit, CommitPrepared, Delete, Insert, LogicalMessage, Message, OldTuple,
    Origin, PgTimestamp, Prepare, Relation, ReplicaIdentity, RollbackPrepared, StreamAbort, StreamAbortInfo,
    StreamCommit, StreamStart, Truncate, TupleData, TupleValue, Type, Update,
};
use crate::lsn::Lsn;

/// Decodes one pgoutput message sent outside any stream block.
///
/// Use a [`Decoder`] instead when the replication connection enables
/// `streaming`, because messages inside a stream block carry an extra xid.
///
/// # Errors
///
/// Returns a [`DecodeError`] if the bytes are not exactly one well-formed
/// message.
pub fn decode(bytes: &Bytes) -> Result<Message, DecodeError> {
    decode_message(bytes, false)
}

/// A pgoutput decoder that follows Stream Start / Stream Stop, so it knows
/// when messages carry the streamed transaction's xid.
///
/// Use one per replication connection; after a reconnect start a new one (or
/// call [`Decoder::reset`]), because the server starts outside any block.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    in_stream: bool,
}

impl Decoder {
    /// A decoder outside any stream block.
    pub const fn new() -> Self {
        Decoder { in_stream: false }
    }

    /// Whether the last message left us inside a Stream Start … Stream Stop
    /// block.
    pub const fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Forgets any open stream block.
    pub fn reset(&mut self) {
        self.in_stream = false;
    }

    /// Decodes one message, entering a stream block on Stream Start and
    /// leaving it on Stream Stop.
    ///
    /// # Errors
    ///
    /// Returns a [`DecodeError`] if the bytes are not exactly one well-formed
    /// message, or if a Stream Start arrives inside a block or a Stream Stop
    /// outside one. On error the stream state is unchanged.
    pub fn decode(&mut self, bytes: &Bytes) -> Result<Message, DecodeError> {
        let message = decode_message(bytes, self.in_stream)?;
        match message {
            Message::StreamStart(_) if self.in_stream => return Err(DecodeError::NestedStreamStart),
            Message::StreamStart(_) => self.in_stream = true,
            Message::StreamStop if !self.in_stream => return Err(DecodeError::StreamStopOutsideBlock),
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(message)
    }
}

/// The lower-case name of a message tag, used in errors; `None` for bytes
/// that are not a pgoutput message tag.
fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        tag::BEGIN => "begin",
        tag::COMMIT => "commit",
        tag::ORIGIN => "origin",
        tag::RELATION => "relation",
        tag::TYPE => "type",
        tag::INSERT => "insert",
        tag::UPDATE => "update",
        tag::DELETE => "delete",
        tag::TRUNCATE => "truncate",
        tag::MESSAGE => "logical decoding",
        tag::STREAM_START => "stream start",
        tag::STREAM_STOP => "stream stop",
        tag::STREAM_COMMIT => "stream commit",
        tag::STREAM_ABORT => "stream abort",
        tag::BEGIN_PREPARE => "begin prepare",
        tag::PREPARE => "prepare",
        tag::COMMIT_PREPARED => "commit prepared",
        tag::ROLLBACK_PREPARED => "rollback prepared",
        tag::STREAM_PREPARE => "stream prepare",
        _ => return None,
    })
}

/// Decodes one message, with the stream-block xid prefix when `in_stream`.
pub(super) fn decode_message(bytes: &Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let Some((&tag, body)) = bytes.split_first() else {
        return Err(DecodeError::Empty);
    };
    let Some(name) = message_name(tag) else {
        return Err(DecodeError::UnknownTag { tag });
    };
    let mut r = Reader { src: bytes, rest: body, message: name };
    let message = match tag {
        tag::BEGIN => Message::Begin(Begin {
            final_lsn: r.lsn("final lsn")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        tag::COMMIT => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
        }),
        tag::ORIGIN => {
            Message::Origin(Origin { commit_lsn: r.lsn("origin commit lsn")?, name: r.string("origin name")? })
        }
        tag::RELATION => Message::Relation(relation(&mut r, in_stream)?),
        tag::TYPE => Message::Type(Type {
            xid: r.stream_xid(in_stream)?,
            oid: r.u32("type oid")?,
            namespace: r.string("namespace")?,
            name: r.string("type name")?,
        }),
        tag::INSERT => {
            let xid = r.stream_xid(in_stream)?;
            let relation_oid = r.u32("relation oid")?;
            match r.u8("tuple marker")? {
                tag::TUPLE_NEW => Message::Insert(Insert { xid, relation_oid, new: r.tuple()? }),
                byte => return Err(r.unexpected(byte, "'N'")),
            }
        }
        tag::UPDATE => {
            let xid = r.stream_xid(in_stream)?;
            let relation_oid = r.u32("relation oid")?;
            let (old, marker) = match r.u8("tuple marker")? {
                tag::TUPLE_KEY => (Some(OldTuple::Key(r.tuple()?)), r.u8("new tuple marker")?),
                tag::TUPLE_OLD => (Some(OldTuple::Full(r.tuple()?)), r.u8("new tuple marker")?),
                byte => (None, byte),
            };
            if marker != tag::TUPLE_NEW {
                let expected = if old.is_some() { "'N'" } else { "'K', 'O' or 'N'" };
                return Err(r.unexpected(marker, expected));
            }
            Message::Update(Update { xid, relation_oid, old, new: r.tuple()? })
        }
        tag::DELETE => {
            let xid = r.stream_xid(in_stream)?;
            let relation_oid = r.u32("relation oid")?;
            let old = match r.u8("tuple marker")? {
                tag::TUPLE_KEY => OldTuple::Key(r.tuple()?),
                tag::TUPLE_OLD => OldTuple::Full(r.tuple()?),
                byte => return Err(r.unexpected(byte, "'K' or 'O'")),
            };
            Message::Delete(Delete { xid, relation_oid, old })
        }
        tag::TRUNCATE => {
            let xid = r.stream_xid(in_stream)?;
            let count = r.length("relation count")?;
            let options = r.u8("options")?;
            r.ensure_items(count, 4, "relation oids")?;
            let mut relation_oids = Vec::with_capacity(count);
            for _ in 0..count {
                relation_oids.push(r.u32("relation oid")?);
            }
            Message::Truncate(Truncate { xid, options, relation_oids })
        }
        tag::MESSAGE => {
            let xid = r.stream_xid(in_stream)?;
            let flags = r.u8("flags")?;
            let lsn = r.lsn("message lsn")?;
            let prefix = r.string("prefix")?;
            let len = r.length("content length")?;
            Message::LogicalMessage(LogicalMessage { xid, flags, lsn, prefix, content: r.bytes(len, "content")? })
        }
        tag::STREAM_START => Message::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            // PostgreSQL reads it as `byte == 1`; do the same.
            first_segment: r.u8("first segment")? == 1,
        }),
        tag::STREAM_STOP => Message::StreamStop,
        tag::STREAM_COMMIT => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
        }),
        tag::STREAM_ABORT => {
            let xid = r.u32("xid")?;
            let subxid = r.u32("subxid")?;
            // Protocol 4 with streaming=parallel appends two fields; the
            // message itself does not say which, so the length decides.
            let abort = if r.rest.is_empty() {
                None
            } else {
                Some(StreamAbortInfo {
                    abort_lsn: r.lsn("abort lsn")?,
                    abort_timestamp: r.timestamp("abort timestamp")?,
                })
            };
            Message::StreamAbort(StreamAbort { xid, subxid, abort })
        }
        tag::BEGIN_PREPARE => Message::BeginPrepare(BeginPrepare {
            prepare_lsn: r.lsn("prepare lsn")?,
            end_lsn: r.lsn("end lsn")?,
            prepare_timestamp: r.timestamp("prepare timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        tag::PREPARE => Message::Prepare(prepare(&mut r)?),
        tag::STREAM_PREPARE => Message::StreamPrepare(prepare(&mut r)?),
        tag::COMMIT_PREPARED => Message::CommitPrepared(CommitPrepared {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_timestamp: r.timestamp("commit timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        tag::ROLLBACK_PREPARED => Message::RollbackPrepared(RollbackPrepared {
            flags: r.u8("flags")?,
            prepare_end_lsn: r.lsn("prepare end lsn")?,
            rollback_end_lsn: r.lsn("rollback end lsn")?,
            prepare_timestamp: r.timestamp("prepare timestamp")?,
            rollback_timestamp: r.timestamp("rollback timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        // `message_name` accepted the tag, so it is one of the arms above;
        // answering rather than panicking keeps the no-panic rule local.
        _ => return Err(DecodeError::UnknownTag { tag }),
    };
    r.finish()?;
    Ok(message)
}

fn relation(r: &mut Reader<'_>, in_stream: bool) -> Result<Relation, DecodeError> {
    let xid = r.stream_xid(in_stream)?;
    let oid = r.u32("relation oid")?;
    let namespace = r.string("namespace")?;
    let name = r.string("relation name")?;
    let identity = r.u8("replica identity")?;
    let replica_identity =
        ReplicaIdentity::from_byte(identity).ok_or(DecodeError::UnknownReplicaIdentity { byte: identity })?;
    let count = usize::from(r.u16("column count")?);
    // flags(1) + name(at least its NUL) + type oid(4) + typmod(4)
    r.ensure_items(count, 10, "columns")?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(Column {
            flags: r.u8("column flags")?,
            name: r.string("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation { xid, oid, namespace, name, replica_identity, columns })
}

fn prepare(r: &mut Reader<'_>) -> Result<Prepare, DecodeError> {
    Ok(Prepare {
        flags: r.u8("flags")?,
        prepare_lsn: r.lsn("prepare lsn")?,
        end_lsn: r.lsn("end lsn")?,
        prepare_timestamp: r.timestamp("prepare timestamp")?,
        xid: r.u32("xid")?,
        gid: r.string("gid")?,
    })
}

/// A bounds-checked cursor over one message's body.
struct Reader<'a> {
    /// The whole payload, for zero-copy slices.
    src: &'a Bytes,
    /// The unread tail of `src`.
    rest: &'a [u8],
    /// Message name for errors.
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated { message: self.message, field, needed, remaining: self.rest.len() }
    }

    fn unexpected(&self, byte: u8, expected: &'static str) -> DecodeError {
        DecodeError::UnexpectedSubmessage { message: self.message, byte, expected }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, field: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(field).map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    /// The xid prefix present only inside a stream block.
    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32("stream xid").map(Some)
        } else {
            Ok(None)
        }
    }

    /// An Int32 length or count; negative values are errors.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let length = self.i32(field)?;
        usize::try_from(length).map_err(|_| DecodeError::NegativeLength { message: self.message, field, length })
    }

    /// Checks that `count` items of at least `min_size` bytes each can fit in
    /// what is left, before anything is allocated for them.
    fn ensure_items(&self, count: usize, min_size: usize, field: &'static str) -> Result<(), DecodeError> {
        let needed = count.saturating_mul(min_size);
        if needed > self.rest.len() {
            return Err(self.truncated(field, needed));
        }
        Ok(())
    }

    /// The next `len` bytes as a zero-copy slice of the payload.
    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let Some((_, tail)) = self.rest.split_at_checked(len) else {
            return Err(self.truncated(field, len));
        };
        // `rest` is always a suffix of `src`, so this is in bounds.
        let start = self.src.len() - self.rest.len();
        let value = self.src.slice(start..start + len);
        self.rest = tail;
        Ok(value)
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString { message: self.message, field });
        };
        let (text, tail) = self.rest.split_at(nul);
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8 { message: self.message, field })?;
        // Skip the NUL (`tail` starts with it).
        self.rest = tail.get(1..).unwrap_or_default();
        Ok(text.to_owned())
    }

    /// A TupleData: Int16 column count, then one kind byte (plus length and
    /// bytes for `t`/`b`) per column.
    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = usize::from(self.u16("tuple column count")?);
        // Every column takes at least its kind byte.
        self.ensure_items(count, 1, "tuple columns")?;
        let mut columns = Vec::with_capacity(count);
        for column in 0..count {
            let value = match self.u8("tuple value kind")? {
                tag::VALUE_NULL => TupleValue::Null,
                tag::VALUE_UNCHANGED_TOAST => TupleValue::UnchangedToast,
                tag::VALUE_TEXT => {
                    let len = self.length("text value length")?;
                    TupleValue::Text(self.bytes(len, "text value")?)
                }
                tag::VALUE_BINARY => {
                    let len = self.length("binary value length")?;
                    TupleValue::Binary(self.bytes(len, "binary value")?)
                }
                kind => return Err(DecodeError::UnknownTupleKind { message: self.message, column, kind }),
            };
            columns.push(value);
        }
        Ok(TupleData { columns })
    }

    /// Requires that the whole payload was used.
    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { message: self.message, count: self.rest.len() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds wire bytes by hand, independently of the encoder.
    struct Wire(Vec<u8>);

    impl Wire {
        fn new(tag: u8) -> Self {
            Wire(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn str(self, s: &str) -> Self {
            self.raw(s.as_bytes()).u8(0)
        }
        fn text(self, s: &str) -> Self {
            let len = i32::try_from(s.len()).unwrap();
            self.u8(b't').i32(len).raw(s.as_bytes())
        }
        fn done(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn ok(bytes: &Bytes) -> Message {
        decode(bytes).unwrap_or_else(|e| panic!("decode failed: {e}"))
    }

    fn ok_in_stream(bytes: &Bytes) -> Message {
        decode_message(bytes, true).unwrap_or_else(|e| panic!("decode failed: {e}"))
    }

    // ---- one test per message type -------------------------------------

    #[test]
    fn begin() {
        let b = Wire::new(b'B').u64(0x0000_0001_0154_1DC0).i64(771_245_123_456_789).u32(742).done();
        assert_eq!(
            ok(&b),
            Message::Begin(Begin {
                final_lsn: Lsn(0x0000_0001_0154_1DC0),
                commit_timestamp: PgTimestamp(771_245_123_456_789),
                xid: 742,
            })
        );
    }

    #[test]
    fn commit() {
        let b = Wire::new(b'C').u8(0).u64(0x1541DC0).u64(0x1541DF0).i64(-5).done();
        assert_eq!(
            ok(&b),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x1541DC0),
                end_lsn: Lsn(0x1541DF0),
                commit_timestamp: PgTimestamp(-5),
            })
        );
    }

    #[test]
    fn origin() {
        let b = Wire::new(b'O').u64(99).str("node_a").done();
        assert_eq!(ok(&b), Message::Origin(Origin { commit_lsn: Lsn(99), name: "node_a".to_owned() }));
    }

    fn relation_wire(in_stream_xid: Option<u32>) -> Bytes {
        let mut w = Wire::new(b'R');
        if let Some(xid) = in_stream_xid {
            w = w.u32(xid);
        }
        w.u32(16_384)
            .str("public")
            .str("messages")
            .u8(b'f')
            .u16(3)
            .u8(1)
            .str("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .str("body")
            .u32(1043)
            .i32(259)
            .u8(0)
            .str("größe")
            .u32(16_500)
            .i32(-1)
            .done()
    }

    fn expected_relation(xid: Option<u32>) -> Relation {
        Relation {
            xid,
            oid: 16_384,
            namespace: "public".to_owned(),
            name: "messages".to_owned(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column { flags: 1, name: "id".to_owned(), type_oid: 20, type_modifier: -1 },
                Column { flags: 0, name: "body".to_owned(), type_oid: 1043, type_modifier: 259 },
                Column { flags: 0, name: "größe".to_owned(), type_oid: 16_500, type_modifier: -1 },
            ],
        }
    }

    #[test]
    fn relation() {
        let msg = ok(&relation_wire(None));
        assert_eq!(msg, Message::Relation(expected_relation(None)));
        let Message::Relation(rel) = msg else { unreachable!() };
        assert!(rel.columns[0].is_key());
        assert!(!rel.columns[1].is_key());
    }

    #[test]
    fn relation_in_stream_carries_xid() {
        let msg = ok_in_stream(&relation_wire(Some(901)));
        assert_eq!(msg, Message::Relation(expected_relation(Some(901))));
        assert_eq!(msg.stream_xid(), Some(901));
        // The same bytes outside a stream are misread, and must fail cleanly.
        assert!(decode(&relation_wire(Some(901))).is_err());
    }

    #[test]
    fn relation_replica_identities_and_empty_namespace() {
        for (byte, ident) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            let b = Wire::new(b'R').u32(1).str("").str("t").u8(byte).u16(0).done();
            let Message::Relation(rel) = ok(&b) else { panic!("not a relation") };
            assert_eq!(rel.replica_identity, ident);
            assert_eq!(rel.namespace, "");
            assert!(rel.columns.is_empty());
        }
        let b = Wire::new(b'R').u32(1).str("").str("t").u8(b'x').u16(0).done();
        assert_eq!(decode(&b), Err(DecodeError::UnknownReplicaIdentity { byte: b'x' }));
    }

    #[test]
    fn type_message() {
        let b = Wire::new(b'Y').u32(16_500).str("public").str("mood").done();
        assert_eq!(
            ok(&b),
            Message::Type(Type { xid: None, oid: 16_500, namespace: "public".to_owned(), name: "mood".to_owned() })
        );
        let b = Wire::new(b'Y').u32(77).u32(16_500).str("public").str("mood").done();
        assert_eq!(ok_in_stream(&b).stream_xid(), Some(77));
    }

    #[test]
    fn insert_with_every_value_kind() {
        let b = Wire::new(b'I')
            .u32(16_384)
            .u8(b'N')
            .u16(5)
            .text("42")
            .u8(b'n')
            .u8(b'u')
            .u8(b'b')
            .i32(3)
            .raw(&[0, 1, 0xff])
            .text("")
            .done();
        let msg = ok(&b);
        assert_eq!(
            msg,
            Message::Insert(Insert {
                xid: None,
                relation_oid: 16_384,
                new: TupleData {
                    columns: vec![
                        text("42"),
                        TupleValue::Null,
                        TupleValue::UnchangedToast,
                        TupleValue::Binary(Bytes::from_static(&[0, 1, 0xff])),
                        text(""),
                    ],
                },
            })
        );
        // Values are slices of the payload, not copies.
        let Message::Insert(insert) = msg else { unreachable!() };
        let TupleValue::Text(v) = &insert.new.columns[0] else { unreachable!() };
        let range = b.as_ptr() as usize..b.as_ptr() as usize + b.len();
        assert!(range.contains(&(v.as_ptr() as usize)));
    }

    #[test]
    fn insert_in_stream() {
        let b = Wire::new(b'I').u32(5).u32(16_384).u8(b'N').u16(1).text("x").done();
        assert_eq!(
            ok_in_stream(&b),
            Message::Insert(Insert { xid: Some(5), relation_oid: 16_384, new: TupleData { columns: vec![text("x")] } })
        );
    }

    #[test]
    fn insert_without_n_is_rejected() {
        let b = Wire::new(b'I').u32(1).u8(b'K').u16(0).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::UnexpectedSubmessage { message: "insert", byte: b'K', expected: "'N'" })
        );
    }

    #[test]
    fn update_new_only() {
        let b = Wire::new(b'U').u32(7).u8(b'N').u16(2).text("1").u8(b'u').done();
        assert_eq!(
            ok(&b),
            Message::Update(Update {
                xid: None,
                relation_oid: 7,
                old: None,
                new: TupleData { columns: vec![text("1"), TupleValue::UnchangedToast] },
            })
        );
    }

    #[test]
    fn update_with_key_and_old() {
        for (marker, wrap) in [(b'K', OldTuple::Key as fn(TupleData) -> OldTuple), (b'O', OldTuple::Full)] {
            let b = Wire::new(b'U')
                .u32(7)
                .u8(marker)
                .u16(2)
                .text("1")
                .u8(b'n')
                .u8(b'N')
                .u16(2)
                .text("2")
                .text("hello")
                .done();
            let old = wrap(TupleData { columns: vec![text("1"), TupleValue::Null] });
            assert_eq!(old.tuple().columns.len(), 2);
            assert_eq!(
                ok(&b),
                Message::Update(Update {
                    xid: None,
                    relation_oid: 7,
                    old: Some(old),
                    new: TupleData { columns: vec![text("2"), text("hello")] },
                })
            );
        }
    }

    #[test]
    fn update_without_new_tuple_is_rejected() {
        // Old key, then something other than `N`.
        let b = Wire::new(b'U').u32(7).u8(b'K').u16(1).text("1").u8(b'K').u16(0).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::UnexpectedSubmessage { message: "update", byte: b'K', expected: "'N'" })
        );
        // No tuple marker we know at all.
        let b = Wire::new(b'U').u32(7).u8(b'X').u16(0).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::UnexpectedSubmessage { message: "update", byte: b'X', expected: "'K', 'O' or 'N'" })
        );
        // Old key and then the payload ends.
        let b = Wire::new(b'U').u32(7).u8(b'K').u16(0).done();
        assert!(matches!(
            decode(&b),
            Err(DecodeError::Truncated { message: "update", field: "new tuple marker", needed: 1, remaining: 0 })
        ));
    }

    #[test]
    fn delete_key_and_old() {
        let b = Wire::new(b'D').u32(9).u8(b'K').u16(1).text("3").done();
        assert_eq!(
            ok(&b),
            Message::Delete(Delete {
                xid: None,
                relation_oid: 9,
                old: OldTuple::Key(TupleData { columns: vec![text("3")] }),
            })
        );
        let b = Wire::new(b'D').u32(9).u32(9).u8(b'O').u16(2).text("3").u8(b'n').done();
        assert_eq!(
            ok_in_stream(&b),
            Message::Delete(Delete {
                xid: Some(9),
                relation_oid: 9,
                old: OldTuple::Full(TupleData { columns: vec![text("3"), TupleValue::Null] }),
            })
        );
        let b = Wire::new(b'D').u32(9).u8(b'N').u16(0).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::UnexpectedSubmessage { message: "delete", byte: b'N', expected: "'K' or 'O'" })
        );
    }

    #[test]
    fn truncate() {
        let b = Wire::new(b'T').i32(2).u8(3).u32(100).u32(200).done();
        let msg = ok(&b);
        assert_eq!(msg, Message::Truncate(Truncate { xid: None, options: 3, relation_oids: vec![100, 200] }));
        let Message::Truncate(t) = msg else { unreachable!() };
        assert!(t.cascade() && t.restart_identity());

        let b = Wire::new(b'T').u32(12).i32(0).u8(0).done();
        let Message::Truncate(t) = ok_in_stream(&b) else { panic!("not a truncate") };
        assert_eq!(t.xid, Some(12));
        assert!(t.relation_oids.is_empty());
        assert!(!t.cascade() && !t.restart_identity());
    }

    #[test]
    fn truncate_bad_counts() {
        let b = Wire::new(b'T').i32(-1).u8(0).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::NegativeLength { message: "truncate", field: "relation count", length: -1 })
        );
        // A huge count must fail before reserving memory for it.
        let b = Wire::new(b'T').i32(i32::MAX).u8(0).u32(1).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::Truncated {
                message: "truncate",
                field: "relation oids",
                needed: usize::try_from(i32::MAX).unwrap() * 4,
                remaining: 4,
            })
        );
    }

    #[test]
    fn logical_message() {
        let b = Wire::new(b'M').u8(1).u64(0x10).str("walcast").i32(5).raw(b"hello").done();
        let msg = ok(&b);
        assert_eq!(
            msg,
            Message::LogicalMessage(LogicalMessage {
                xid: None,
                flags: 1,
                lsn: Lsn(0x10),
                prefix: "walcast".to_owned(),
                content: Bytes::from_static(b"hello"),
            })
        );
        let Message::LogicalMessage(m) = msg else { unreachable!() };
        assert!(m.is_transactional());

        let b = Wire::new(b'M').u32(44).u8(0).u64(0x10).str("p").i32(0).done();
        let Message::LogicalMessage(m) = ok_in_stream(&b) else { panic!("not a logical message") };
        assert_eq!(m.xid, Some(44));
        assert!(!m.is_transactional());
        assert!(m.content.is_empty());
    }

    #[test]
    fn stream_start_stop_commit() {
        let b = Wire::new(b'S').u32(900).u8(1).done();
        assert_eq!(ok(&b), Message::StreamStart(StreamStart { xid: 900, first_segment: true }));
        let b = Wire::new(b'S').u32(900).u8(0).done();
        assert_eq!(ok(&b), Message::StreamStart(StreamStart { xid: 900, first_segment: false }));
        assert_eq!(ok(&Wire::new(b'E').done()), Message::StreamStop);
        let b = Wire::new(b'c').u32(900).u8(0).u64(0x200).u64(0x230).i64(12).done();
        assert_eq!(
            ok(&b),
            Message::StreamCommit(StreamCommit {
                xid: 900,
                flags: 0,
                commit_lsn: Lsn(0x200),
                end_lsn: Lsn(0x230),
                commit_timestamp: PgTimestamp(12),
            })
        );
    }

    #[test]
    fn stream_abort_both_forms() {
        let b = Wire::new(b'A').u32(900).u32(901).done();
        assert_eq!(ok(&b), Message::StreamAbort(StreamAbort { xid: 900, subxid: 901, abort: None }));
        let b = Wire::new(b'A').u32(900).u32(900).u64(0x300).i64(1_000).done();
        assert_eq!(
            ok(&b),
            Message::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 900,
                abort: Some(StreamAbortInfo { abort_lsn: Lsn(0x300), abort_timestamp: PgTimestamp(1_000) }),
            })
        );
        // Half of the parallel fields is neither form.
        let b = Wire::new(b'A').u32(900).u32(900).u64(0x300).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::Truncated { message: "stream abort", field: "abort timestamp", needed: 8, remaining: 0 })
        );
    }

    #[test]
    fn two_phase_messages() {
        let b = Wire::new(b'b').u64(1).u64(2).i64(3).u32(4).str("gid-1").done();
        assert_eq!(
            ok(&b),
            Message::BeginPrepare(BeginPrepare {
                prepare_lsn: Lsn(1),
                end_lsn: Lsn(2),
                prepare_timestamp: PgTimestamp(3),
                xid: 4,
                gid: "gid-1".to_owned(),
            })
        );

        let prepared = Prepare {
            flags: 0,
            prepare_lsn: Lsn(5),
            end_lsn: Lsn(6),
            prepare_timestamp: PgTimestamp(7),
            xid: 8,
            gid: "g".to_owned(),
        };
        let body = |tag| Wire::new(tag).u8(0).u64(5).u64(6).i64(7).u32(8).str("g").done();
        assert_eq!(ok(&body(b'P')), Message::Prepare(prepared.clone()));
        assert_eq!(ok(&body(b'p')), Message::StreamPrepare(prepared));

        let b = Wire::new(b'K').u8(0).u64(9).u64(10).i64(11).u32(12).str("g2").done();
        assert_eq!(
            ok(&b),
            Message::CommitPrepared(CommitPrepared {
                flags: 0,
                commit_lsn: Lsn(9),
                end_lsn: Lsn(10),
                commit_timestamp: PgTimestamp(11),
                xid: 12,
                gid: "g2".to_owned(),
            })
        );

        let b = Wire::new(b'r').u8(0).u64(13).u64(14).i64(15).i64(16).u32(17).str("g3").done();
        assert_eq!(
            ok(&b),
            Message::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: Lsn(13),
                rollback_end_lsn: Lsn(14),
                prepare_timestamp: PgTimestamp(15),
                rollback_timestamp: PgTimestamp(16),
                xid: 17,
                gid: "g3".to_owned(),
            })
        );
    }

    // ---- malformed input ------------------------------------------------

    #[test]
    fn empty_and_unknown_tag() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(decode(&Bytes::from_static(b"Z123")), Err(DecodeError::UnknownTag { tag: b'Z' }));
        // Tuple sub-message letters are not top-level tags.
        assert_eq!(decode(&Bytes::from_static(b"N")), Err(DecodeError::UnknownTag { tag: b'N' }));
        let err = decode(&Bytes::from_static(&[0xfe])).unwrap_err();
        assert_eq!(err.to_string(), "unknown pgoutput message tag 'þ' (0xfe)");
    }

    /// Valid messages whose every strict prefix must fail to decode.
    fn valid_samples() -> Vec<(Bytes, bool)> {
        vec![
            (Wire::new(b'B').u64(1).i64(2).u32(3).done(), false),
            (Wire::new(b'C').u8(0).u64(1).u64(2).i64(3).done(), false),
            (Wire::new(b'O').u64(1).str("o").done(), false),
            (relation_wire(None), false),
            (relation_wire(Some(3)), true),
            (Wire::new(b'Y').u32(1).str("s").str("t").done(), false),
            (Wire::new(b'I').u32(1).u8(b'N').u16(3).text("ab").u8(b'n').u8(b'b').i32(1).u8(7).done(), false),
            (Wire::new(b'U').u32(4).u32(1).u8(b'O').u16(1).text("a").u8(b'N').u16(2).text("b").u8(b'u').done(), true),
            (Wire::new(b'D').u32(1).u8(b'K').u16(1).text("k").done(), false),
            (Wire::new(b'T').i32(2).u8(1).u32(5).u32(6).done(), false),
            (Wire::new(b'M').u8(1).u64(1).str("p").i32(2).raw(b"hi").done(), false),
            (Wire::new(b'S').u32(1).u8(1).done(), false),
            (Wire::new(b'c').u32(1).u8(0).u64(1).u64(2).i64(3).done(), false),
            (Wire::new(b'A').u32(1).u32(2).done(), false),
            (Wire::new(b'b').u64(1).u64(2).i64(3).u32(4).str("g").done(), false),
            (Wire::new(b'P').u8(0).u64(1).u64(2).i64(3).u32(4).str("g").done(), false),
            (Wire::new(b'K').u8(0).u64(1).u64(2).i64(3).u32(4).str("g").done(), false),
            (Wire::new(b'r').u8(0).u64(1).u64(2).i64(3).i64(4).u32(5).str("g").done(), false),
            (Wire::new(b'p').u8(0).u64(1).u64(2).i64(3).u32(4).str("g").done(), false),
        ]
    }

    #[test]
    fn every_strict_prefix_is_an_error() {
        for (full, in_stream) in valid_samples() {
            assert!(decode_message(&full, in_stream).is_ok(), "{full:?}");
            for len in 0..full.len() {
                let prefix = full.slice(..len);
                let result = decode_message(&prefix, in_stream);
                assert!(result.is_err(), "prefix {len} of {full:?} decoded: {result:?}");
            }
        }
    }

    #[test]
    fn truncation_error_names_field_and_sizes() {
        let b = Wire::new(b'B').u64(1).i64(2).u8(0).done();
        assert_eq!(decode(&b), Err(DecodeError::Truncated { message: "begin", field: "xid", needed: 4, remaining: 1 }));
        let b = Wire::new(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(10).raw(b"abc").done();
        let err = decode(&b).unwrap_err();
        assert_eq!(err, DecodeError::Truncated { message: "insert", field: "text value", needed: 10, remaining: 3 });
        assert_eq!(err.to_string(), "truncated insert message: text value needs 10 bytes but 3 remain");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for (full, in_stream) in valid_samples() {
            let mut extended = full.to_vec();
            extended.push(0);
            let result = decode_message(&Bytes::from(extended), in_stream);
            if full.first() == Some(&b'A') {
                // One extra byte looks like the start of the parallel fields.
                assert!(matches!(result, Err(DecodeError::Truncated { .. })));
            } else {
                assert!(matches!(result, Err(DecodeError::TrailingBytes { count: 1, .. })), "{full:?}: {result:?}");
            }
        }
        let b = Wire::new(b'E').u8(0).u8(0).done();
        assert_eq!(decode(&b), Err(DecodeError::TrailingBytes { message: "stream stop", count: 2 }));
    }

    #[test]
    fn negative_lengths_are_rejected() {
        for kind in [b't', b'b'] {
            let b = Wire::new(b'I').u32(1).u8(b'N').u16(1).u8(kind).i32(-1).done();
            assert!(matches!(decode(&b), Err(DecodeError::NegativeLength { length: -1, .. })));
        }
        let b = Wire::new(b'M').u8(0).u64(0).str("p").i32(i32::MIN).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::NegativeLength { message: "logical decoding", field: "content length", length: i32::MIN })
        );
    }

    #[test]
    fn huge_counts_and_lengths_fail_before_allocating() {
        let b = Wire::new(b'I').u32(1).u8(b'N').u16(u16::MAX).u8(b'n').done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::Truncated { message: "insert", field: "tuple columns", needed: 65_535, remaining: 1 })
        );
        let b = Wire::new(b'R').u32(1).str("s").str("t").u8(b'd').u16(u16::MAX).done();
        assert_eq!(
            decode(&b),
            Err(DecodeError::Truncated { message: "relation", field: "columns", needed: 655_350, remaining: 0 })
        );
        let b = Wire::new(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(i32::MAX).done();
        assert!(matches!(decode(&b), Err(DecodeError::Truncated { field: "text value", remaining: 0, .. })));
        let b = Wire::new(b'M').u8(0).u64(0).str("p").i32(i32::MAX).raw(b"x").done();
        assert!(matches!(decode(&b), Err(DecodeError::Truncated { field: "content", remaining: 1, .. })));
    }

    #[test]
    fn unknown_tuple_kind() {
        let b = Wire::new(b'I').u32(1).u8(b'N').u16(2).u8(b'n').u8(b'x').done();
        let err = decode(&b).unwrap_err();
        assert_eq!(err, DecodeError::UnknownTupleKind { message: "insert", column: 1, kind: b'x' });
        assert_eq!(err.to_string(), "unknown tuple value kind 'x' (0x78) for column 1 in insert message");
    }

    #[test]
    fn strings_need_nul_and_utf8() {
        let b = Wire::new(b'O').u64(1).raw(b"no-terminator").done();
        assert_eq!(decode(&b), Err(DecodeError::UnterminatedString { message: "origin", field: "origin name" }));
        let b = Wire::new(b'Y').u32(1).str("public").raw(&[0xc3, 0x28, 0]).done();
        assert_eq!(decode(&b), Err(DecodeError::InvalidUtf8 { message: "type", field: "type name" }));
        let b = Wire::new(b'R').u32(1).str("s").str("t").u8(b'd').u16(1).u8(0).raw(&[0xff, 0]).u32(25).i32(-1).done();
        assert_eq!(decode(&b), Err(DecodeError::InvalidUtf8 { message: "relation", field: "column name" }));
    }

    // ---- stream state ---------------------------------------------------

    #[test]
    fn decoder_tracks_stream_blocks() {
        let mut d = Decoder::new();
        assert!(!d.in_stream());

        let insert_outside = Wire::new(b'I').u32(1).u8(b'N').u16(0).done();
        let insert_inside = Wire::new(b'I').u32(700).u32(1).u8(b'N').u16(0).done();

        assert_eq!(d.decode(&insert_outside).unwrap().stream_xid(), None);

        let start = Wire::new(b'S').u32(700).u8(1).done();
        assert!(matches!(d.decode(&start), Ok(Message::StreamStart(_))));
        assert!(d.in_stream());

        assert_eq!(
            d.decode(&insert_inside).unwrap(),
            Message::Insert(Insert { xid: Some(700), relation_oid: 1, new: TupleData::default() })
        );
        // Outside-form bytes are now too short for the xid prefix.
        assert!(d.decode(&insert_outside).is_err());
        assert!(d.in_stream(), "a failed decode must not change state");

        // Nested start is refused and leaves the block open.
        assert_eq!(d.decode(&start), Err(DecodeError::NestedStreamStart));
        assert!(d.in_stream());

        let stop = Wire::new(b'E').done();
        assert_eq!(d.decode(&stop), Ok(Message::StreamStop));
        assert!(!d.in_stream());
        assert_eq!(d.decode(&stop), Err(DecodeError::StreamStopOutsideBlock));
        assert!(!d.in_stream());

        // Stream Commit/Abort come outside blocks and carry no prefix.
        let commit = Wire::new(b'c').u32(700).u8(0).u64(1).u64(2).i64(3).done();
        assert!(matches!(d.decode(&commit), Ok(Message::StreamCommit(_))));
        assert_eq!(d.decode(&insert_outside).unwrap().stream_xid(), None);

        d.decode(&start).unwrap();
        assert!(d.in_stream());
        d.reset();
        assert!(!d.in_stream());
    }

    #[test]
    fn stream_xid_only_on_streamable_messages() {
        let begin = Wire::new(b'B').u64(1).i64(2).u32(3).done();
        assert_eq!(ok_in_stream(&begin).stream_xid(), None);
        let trunc = Wire::new(b'T').u32(8).i32(0).u8(0).done();
        assert_eq!(ok_in_stream(&trunc).stream_xid(), Some(8));
    }
}
