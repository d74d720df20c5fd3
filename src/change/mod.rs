//! The change stage: decoded pgoutput messages become committed transactions
//! of typed changes, and PostgreSQL text values become JSON the way Supabase
//! Realtime sends them.
//!
//! ```text
//!  WalEvent::XLogData ──▶ Assembler (relation cache, Begin/Commit, streamed
//!                         transactions in spill logs, TOAST, old_record) ──▶ TxEvent in commit order
//!                         (a committed streamed transaction via drain_pending, in batches)
//! ```
//!
//! - [`model`]: relations, rows, [`Change`], [`TxEvent`].
//! - [`assemble`]: the [`Assembler`] (one per replication connection).
//! - [`value`]: text value → JSON, resolved per column once, applied per change
//!   once (never per subscriber).

pub mod assemble;
pub mod model;
pub mod value;

pub use assemble::{Assembler, ChangeError};
pub use model::{Change, ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxEvent, TxInfo, WALCAST_MESSAGE_PREFIX};
