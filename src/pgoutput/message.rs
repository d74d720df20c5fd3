//! The pgoutput message types, one struct per wire message.
//!
//! These are plain data: the decoder in [`decode()`](super::decode()) builds them from
//! XLogData payloads and the encoder in [`encode()`](super::encode()) turns them back into
//! the exact bytes. Field names follow PostgreSQL's "Logical Replication
//! Message Formats" documentation.
//!
//! Invariants:
//! - Every field is kept as sent (flags as raw bytes), so re-encoding a
//!   decoded message gives back the same bytes; the one exception is
//!   [`StreamStart::first_segment`], a boolean that PostgreSQL itself reads
//!   as `byte == 1`.
//! - `xid: Option<u32>` fields are `Some` exactly when the message was decoded
//!   inside a Stream Start … Stream Stop block (protocol ≥ 2), where
//!   PostgreSQL prefixes those messages with the streamed transaction's xid.
//! - Tuple values are [`Bytes`] slices of the payload they were decoded from:
//!   no copy, and they keep that payload alive.

use bytes::Bytes;

use crate::lsn::Lsn;

/// A PostgreSQL timestamp: microseconds since 2000-01-01 00:00:00 UTC.
///
/// Kept raw because it is only passed through (and because `TimestampTz`
/// spans a range no `SystemTime` conversion handles on every platform).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
    pub const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

    /// The same instant as microseconds since the Unix epoch, saturating at
    /// the `i64` bounds (PostgreSQL's `infinity` values sit there).
    pub const fn unix_micros(self) -> i64 {
        self.0.saturating_add(Self::POSTGRES_EPOCH_UNIX_MICROS)
    }
}

/// One decoded pgoutput message (protocol versions 1 to 4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: a transaction committed.
    Commit(Commit),
    /// `O`: the transaction originated on another node.
    Origin(Origin),
    /// `R`: a table's published columns (sent before its first change).
    Relation(Relation),
    /// `Y`: a user-defined type referenced by a Relation.
    Type(Type),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a `pg_logical_emit_message` message (option `messages`).
    LogicalMessage(LogicalMessage),
    /// `S`: a block of a streamed in-progress transaction starts.
    StreamStart(StreamStart),
    /// `E`: the current stream block ends.
    StreamStop,
    /// `c`: a streamed transaction committed.
    StreamCommit(StreamCommit),
    /// `A`: a streamed (sub)transaction aborted.
    StreamAbort(StreamAbort),
    /// `b`: a prepared transaction starts (option `two_phase`).
    BeginPrepare(BeginPrepare),
    /// `P`: a transaction was prepared.
    Prepare(Prepare),
    /// `K`: a prepared transaction was committed.
    CommitPrepared(CommitPrepared),
    /// `r`: a prepared transaction was rolled back.
    RollbackPrepared(RollbackPrepared),
    /// `p`: a streamed transaction was prepared; same layout as [`Prepare`].
    StreamPrepare(Prepare),
}

impl Message {
    /// The wire tag byte of this message.
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => tag::BEGIN,
            Message::Commit(_) => tag::COMMIT,
            Message::Origin(_) => tag::ORIGIN,
            Message::Relation(_) => tag::RELATION,
            Message::Type(_) => tag::TYPE,
            Message::Insert(_) => tag::INSERT,
            Message::Update(_) => tag::UPDATE,
            Message::Delete(_) => tag::DELETE,
            Message::Truncate(_) => tag::TRUNCATE,
            Message::LogicalMessage(_) => tag::MESSAGE,
            Message::StreamStart(_) => tag::STREAM_START,
            Message::StreamStop => tag::STREAM_STOP,
            Message::StreamCommit(_) => tag::STREAM_COMMIT,
            Message::StreamAbort(_) => tag::STREAM_ABORT,
            Message::BeginPrepare(_) => tag::BEGIN_PREPARE,
            Message::Prepare(_) => tag::PREPARE,
            Message::CommitPrepared(_) => tag::COMMIT_PREPARED,
            Message::RollbackPrepared(_) => tag::ROLLBACK_PREPARED,
            Message::StreamPrepare(_) => tag::STREAM_PREPARE,
        }
    }

    /// The streamed transaction's xid carried by Relation, Type, Insert,
    /// Update, Delete, Truncate and logical messages decoded inside a stream
    /// block; `None` for every other message.
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Message::Relation(m) => m.xid,
            Message::Type(m) => m.xid,
            Message::Insert(m) => m.xid,
            Message::Update(m) => m.xid,
            Message::Delete(m) => m.xid,
            Message::Truncate(m) => m.xid,
            Message::LogicalMessage(m) => m.xid,
            _ => None,
        }
    }
}

/// Wire tag bytes of the top-level messages and the tuple sub-messages.
///
/// Letters are reused (`K` is both "key tuple" and Commit Prepared, `b` both
/// "binary value" and Begin Prepare), so a byte means something only at its
/// position; these constants are grouped by position for that reason.
pub(crate) mod tag {
    pub(crate) const BEGIN: u8 = b'B';
    pub(crate) const COMMIT: u8 = b'C';
    pub(crate) const ORIGIN: u8 = b'O';
    pub(crate) const RELATION: u8 = b'R';
    pub(crate) const TYPE: u8 = b'Y';
    pub(crate) const INSERT: u8 = b'I';
    pub(crate) const UPDATE: u8 = b'U';
    pub(crate) const DELETE: u8 = b'D';
    pub(crate) const TRUNCATE: u8 = b'T';
    pub(crate) const MESSAGE: u8 = b'M';
    pub(crate) const STREAM_START: u8 = b'S';
    pub(crate) const STREAM_STOP: u8 = b'E';
    pub(crate) const STREAM_COMMIT: u8 = b'c';
    pub(crate) const STREAM_ABORT: u8 = b'A';
    pub(crate) const BEGIN_PREPARE: u8 = b'b';
    pub(crate) const PREPARE: u8 = b'P';
    pub(crate) const COMMIT_PREPARED: u8 = b'K';
    pub(crate) const ROLLBACK_PREPARED: u8 = b'r';
    pub(crate) const STREAM_PREPARE: u8 = b'p';

    // Inside Insert/Update/Delete, before a TupleData.
    pub(crate) const TUPLE_NEW: u8 = b'N';
    pub(crate) const TUPLE_KEY: u8 = b'K';
    pub(crate) const TUPLE_OLD: u8 = b'O';

    // Per column inside a TupleData.
    pub(crate) const VALUE_NULL: u8 = b'n';
    pub(crate) const VALUE_UNCHANGED_TOAST: u8 = b'u';
    pub(crate) const VALUE_TEXT: u8 = b't';
    pub(crate) const VALUE_BINARY: u8 = b'b';
}

/// `B` Begin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The final LSN of the transaction (its commit record).
    pub final_lsn: Lsn,
    /// Commit timestamp.
    pub commit_timestamp: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
}

/// `C` Commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently unused (0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: the position to report as flushed once it
    /// is handled (never `commit_lsn`).
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_timestamp: PgTimestamp,
}

/// `O` Origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// A table's replica identity (`pg_class.relreplident`): which old values
/// Update and Delete carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key (old key only when it changes, and on delete).
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns (old tuple `O` on every update and delete).
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The `relreplident` byte for this setting.
    pub const fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    /// The setting for a `relreplident` byte, if it is one of the four.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// `R` Relation: the published columns of a table, in tuple order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// Table OID; Insert/Update/Delete/Truncate refer to it.
    pub oid: u32,
    /// Schema name; empty means `pg_catalog`.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns, in the order tuple values arrive.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Flags; bit 1 marks a replica identity (key) column.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// Data type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

impl Column {
    /// Flag bit set on columns that are part of the replica identity key.
    pub const FLAG_KEY: u8 = 1;

    /// Whether the column is part of the replica identity key.
    pub const fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// `Y` Type: names a user-defined type used by a later Relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// Type OID.
    pub oid: u32,
    /// Schema name; empty means `pg_catalog`.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// One column value inside a [`TupleData`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL (in a key tuple `K`, also "not part of the key").
    Null,
    /// `u`: an unchanged TOASTed value that was not sent; its value is
    /// unknown, **not** NULL.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary send format (option `binary`).
    Binary(Bytes),
}

/// A row: one value per published column of the relation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TupleData {
    /// Values in [`Relation::columns`] order.
    pub columns: Vec<TupleValue>,
}

/// The old row sent before the new one in an Update, or alone in a Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity key columns; the other slots are `n`,
    /// meaning "not part of the key" rather than NULL.
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// `I` Insert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// OID of the relation, as announced by a prior [`Relation`].
    pub relation_oid: u32,
    /// The inserted row.
    pub new: TupleData,
}

/// `U` Update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// OID of the relation, as announced by a prior [`Relation`].
    pub relation_oid: u32,
    /// The old key (when it changed) or the old row (REPLICA IDENTITY FULL).
    pub old: Option<OldTuple>,
    /// The new row; unchanged TOASTed columns are [`TupleValue::UnchangedToast`].
    pub new: TupleData,
}

/// `D` Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// OID of the relation, as announced by a prior [`Relation`].
    pub relation_oid: u32,
    /// The deleted row's key or, with REPLICA IDENTITY FULL, the whole row.
    pub old: OldTuple,
}

/// `T` Truncate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// Option bits: [`Truncate::CASCADE`], [`Truncate::RESTART_IDENTITY`].
    pub options: u8,
    /// OIDs of the truncated relations.
    pub relation_oids: Vec<u32>,
}

impl Truncate {
    /// Option bit: `TRUNCATE … CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit: `TRUNCATE … RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;

    /// Whether `CASCADE` was given.
    pub const fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    /// Whether `RESTART IDENTITY` was given.
    pub const fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }
}

/// `M` logical decoding message (`pg_logical_emit_message`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Streamed transaction's xid (inside a stream block only).
    pub xid: Option<u32>,
    /// Flags: [`LogicalMessage::TRANSACTIONAL`] or 0.
    pub flags: u8,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content, a slice of the decoded payload.
    pub content: Bytes,
}

impl LogicalMessage {
    /// Flag bit: the message is transactional (sent inside Begin … Commit);
    /// non-transactional messages arrive outside any transaction.
    pub const TRANSACTIONAL: u8 = 1;

    /// Whether the message is transactional.
    pub const fn is_transactional(&self) -> bool {
        self.flags & Self::TRANSACTIONAL != 0
    }
}

/// `S` Stream Start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    /// The streamed transaction's xid.
    pub xid: u32,
    /// Whether this is the transaction's first block (wire byte `1`).
    pub first_segment: bool,
}

/// `c` Stream Commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    /// The streamed transaction's xid.
    pub xid: u32,
    /// Flags; currently unused (0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction (the position to report as flushed).
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_timestamp: PgTimestamp,
}

/// `A` Stream Abort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction's xid.
    pub xid: u32,
    /// The aborted subtransaction's xid (equal to `xid` for the whole
    /// transaction).
    pub subxid: u32,
    /// Abort LSN and timestamp; sent only with `streaming = parallel`
    /// (protocol 4), `None` otherwise.
    pub abort: Option<StreamAbortInfo>,
}

/// The extra Stream Abort fields sent with `streaming = parallel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamAbortInfo {
    /// LSN of the abort.
    pub abort_lsn: Lsn,
    /// Abort timestamp.
    pub abort_timestamp: PgTimestamp,
}

/// `b` Begin Prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeginPrepare {
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_timestamp: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global identifier given to `PREPARE TRANSACTION`.
    pub gid: String,
}

/// `P` Prepare, and `p` Stream Prepare (same layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    /// Flags; currently unused (0).
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_timestamp: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global identifier given to `PREPARE TRANSACTION`.
    pub gid: String,
}

/// `K` Commit Prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags; currently unused (0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the commit record.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_timestamp: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global identifier of the prepared transaction.
    pub gid: String,
}

/// `r` Rollback Prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags; currently unused (0).
    pub flags: u8,
    /// End LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// End LSN of the rollback record.
    pub rollback_end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_timestamp: PgTimestamp,
    /// Rollback timestamp.
    pub rollback_timestamp: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global identifier of the prepared transaction.
    pub gid: String,
}
