//! The pure, sans-IO decoder (and test encoder) of PostgreSQL's pgoutput
//! logical replication format, protocol versions 1 to 4.
//!
//! Where it sits: the replication stage receives XLogData messages from the
//! walsender and hands each one's payload to a [`Decoder`]; the resulting
//! [`Message`]s go on to the change stage (relation cache, transaction
//! assembly). This module does no I/O, keeps no relation cache and knows
//! nothing of transactions; its only state is whether a Stream Start …
//! Stream Stop block is open, because inside one some messages carry an
//! extra xid.
//!
//! Invariants:
//! - Never panics and never allocates on the strength of an unchecked wire
//!   length: malformed input yields a [`DecodeError`] (all definite).
//! - Tuple values and logical message contents are zero-copy [`bytes::Bytes`]
//!   slices of the payload; per message the only allocations are the tuple
//!   `Vec`s and the strings a message owns.
//! - [`encode()`] is the exact inverse: `decode(encode(m)) == m`.
//! - LSNs are [`crate::lsn::Lsn`]; timestamps stay raw microseconds since
//!   2000-01-01 UTC ([`PgTimestamp`]).
//!
//! Layouts follow PostgreSQL's "Logical Replication Message Formats"
//! (<https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>).

mod decode;
mod encode;
mod error;
mod message;

pub use decode::{decode, Decoder};
pub use encode::{encode, encode_into};
pub use error::DecodeError;
pub use message::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, Delete, Insert, LogicalMessage, Message, OldTuple, Origin,
    PgTimestamp, Prepare, Relation, ReplicaIdentity, RollbackPrepared, StreamAbort, StreamAbortInfo, StreamCommit,
    StreamStart, Truncate, TupleData, TupleValue, Type, Update,
};

#[cfg(test)]
mod tests;
