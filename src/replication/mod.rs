//! The replication stage: walcast's own logical-replication client.
//!
//! ```text
//!  PostgreSQL walsender ──CopyData──▶ ReplicationStream ──WalEvent──▶ (decoder, downstream)
//!          ▲                               │    ▲
//!          └──── standby status 'r' ───────┘    └── AckHandle::ack(end_lsn) from downstream
//! ```
//!
//! - [`conn`]: the wire connection (TLS per `sslmode` — see
//!   [`crate::pgconn`] —, startup with `replication=database`, authentication
//!   trust/cleartext/MD5/SCRAM-SHA-256(-PLUS), simple queries, CopyBoth
//!   framing) on `postgres-protocol`.
//! - [`slot`]: `IDENTIFY_SYSTEM`, slot creation (optionally exporting a
//!   snapshot) and `START_REPLICATION`.
//! - [`stream`]: the copy-both stream: XLogData and keepalives in, standby
//!   status updates out.
//! - [`source`]: the long-lived task: ensure the slot, stream, reconnect with
//!   backoff after transient errors.
//! - [`status`]: the progress, state and lag shared with the hub and the
//!   monitor (inside [`AckHandle`]).
//! - [`heartbeat`]: the end-to-end liveness probe, a non-transactional
//!   logical decoding message written on a SQL connection every few seconds
//!   and expected back through the slot.
//!
//! # Liveness
//!
//! A network path can die without a reset: reads then wait forever while
//! the server's side, until its `wal_sender_timeout`, still shows the slot
//! active. So the link is judged by what arrives. [`heartbeat`] makes sure
//! something flows on an idle database (its message comes back through the
//! slot), the stream asks the walsender for a keepalive once a third of the
//! deadline passes in silence, and a stream that receives nothing at all for
//! [`StreamConfig::silence_timeout`] ends with the transient
//! [`ReplicationError::Silent`], so the source reconnects. Until then the
//! status tells the truth: lag grows from the last message received once
//! half the deadline passed without one, and `/ready` says so. TCP
//! keepalive and `TCP_USER_TIMEOUT`
//! ([`crate::pgconn::PgConfig::set_tcp_liveness`]) make the kernel fail a
//! dead socket too, for the cases where the application would not notice
//! (a write blocked on a full send buffer).
//!
//! # Progress (what the slot is told)
//!
//! `write` is the highest WAL position received. `flush` = `apply` is the
//! `end_lsn` of the last transaction the downstream stage has acknowledged
//! through [`stream::AckHandle`], or — when no transaction is open and every
//! received transaction is acknowledged — the latest keepalive's `wal_end`:
//! everything before it has been sent to us, so acknowledging it lets the
//! server recycle WAL while the publication is idle (otherwise a busy database
//! with a quiet publication fills its disk). All three never go backwards.
//! Updates go out on a timer (at most 1 s apart, and at most half of
//! `wal_sender_timeout`) and at once when the server asks.
//!
//! Delivery is at-least-once: the slot only moves past what downstream
//! acknowledged, so after a crash the server resends from the last
//! acknowledged `end_lsn` (or earlier: slot positions persist at checkpoints).
//!
//! # Errors
//!
//! [`ReplicationError::is_transient`] splits errors into transient ones (I/O,
//! EOF, server shutdown `57P01`, slot busy `55006`, timeouts) that a supervisor
//! retries with backoff, and definite ones whose message tells the operator the
//! fix (wal_level, missing publication or slot, invalidated slot, missing
//! privilege, bad credentials, TLS refused or certificate not trusted).

pub mod conn;
pub mod heartbeat;
pub mod progress;
pub mod slot;
pub mod source;
pub mod status;
pub mod stream;

pub use conn::{QueryResult, WalConnection};
pub use slot::{CreatedSlot, SlotOptions, SystemIdentity};
pub use source::{run_source, SnapshotLease, SourceConfig, SourceEvent, SOURCE_QUEUE_BATCHES};
pub use status::{Lag, ReplicationStatus, SourceState};
pub use stream::{AckHandle, ReplicationStream, StreamConfig, WalEvent};

use postgres_protocol::message::backend::ErrorResponseBody;

/// An error reported by the server, with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// Severity (`ERROR`, `FATAL`, …), not localized.
    pub severity: String,
    /// SQLSTATE, e.g. `42704`.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Detail, if any.
    pub detail: Option<String>,
    /// Hint, if any.
    pub hint: Option<String>,
}

impl PgError {
    fn from_body(body: &ErrorResponseBody) -> Result<PgError, std::io::Error> {
        use fallible_iterator::FallibleIterator;
        let mut err =
            PgError { severity: String::new(), code: String::new(), message: String::new(), detail: None, hint: None };
        let mut fields = body.fields();
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => err.severity = value,
                b'S' if err.severity.is_empty() => err.severity = value,
                b'C' => err.code = value,
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                _ => {}
            }
        }
        Ok(err)
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

/// Errors of the replication stage.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed.
    #[error("replication connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("the server closed the replication connection")]
    Eof,
    /// The server sent something this client does not understand.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// The connection settings are unusable.
    #[error("replication configuration: {0}")]
    Config(String),
    /// Authentication failed.
    #[error("authentication failed: {0}; check the user and password in the database URL")]
    Auth(String),
    /// TLS could not be set up (refused, or the server certificate failed
    /// verification); the message names the fix.
    #[error(transparent)]
    Tls(#[from] crate::pgconn::TlsError),
    /// The server reported an error.
    #[error("{err}{}", fix_for(.err).map(|f| format!(" — fix: {f}")).unwrap_or_default())]
    Server {
        /// The server's error.
        err: PgError,
    },
    /// Nothing at all (data, keepalive, heartbeat) arrived from the walsender
    /// for the replication timeout: the network path may be silently dead, so
    /// the connection is dropped and made again.
    #[error(
        "no message from the walsender for {0:?} (--replication-timeout); the connection is presumed dead \
         and is made again"
    )]
    Silent(std::time::Duration),
    /// The stream was stopped by shutdown.
    #[error("replication stopped by shutdown")]
    Shutdown,
}

impl From<PgError> for ReplicationError {
    fn from(err: PgError) -> Self {
        ReplicationError::Server { err }
    }
}

impl ReplicationError {
    /// Whether reconnecting (with backoff) may succeed; definite errors need
    /// the operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io(_)
            | ReplicationError::Eof
            | ReplicationError::Protocol(_)
            | ReplicationError::Silent(_) => true,
            ReplicationError::Config(_) | ReplicationError::Auth(_) | ReplicationError::Shutdown => false,
            ReplicationError::Server { err } => is_transient_sqlstate(&err.code),
            ReplicationError::Tls(err) => err.is_transient(),
        }
    }

    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { err } => Some(&err.code),
            _ => None,
        }
    }
}

/// SQLSTATEs after which reconnecting can work.
fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        // admin_shutdown, crash_shutdown, cannot_connect_now (server starting or stopping)
        "57P01" | "57P02" | "57P03"
        // object_in_use: "replication slot … is active for PID …"
        | "55006"
        // query_canceled
        | "57014"
    ) || code.starts_with("08") // connection exceptions
        || code.starts_with("53") // insufficient resources (too many connections, out of memory)
        || code.starts_with("40") // serialization failure / deadlock
}

/// What the operator should do about a definite server error.
fn fix_for(err: &PgError) -> Option<&'static str> {
    let msg = err.message.as_str();
    match err.code.as_str() {
        "55000" if msg.contains("wal_level") => {
            Some("set wal_level = logical in postgresql.conf (on Supabase it already is) and restart PostgreSQL")
        }
        "55000" if msg.contains("invalidated") || msg.contains("cannot read from logical replication slot") => Some(
            "the slot was invalidated (it fell behind max_slot_wal_keep_size); drop it with \
             SELECT pg_drop_replication_slot('<slot>') and restart walcast, which recreates it — \
             changes in the gap are lost, so clients must reload",
        ),
        "55000" if msg.contains("replica identity") => {
            Some("give every published table a replica identity: ALTER TABLE <table> REPLICA IDENTITY FULL")
        }
        // pgoutput reads the publication with the catalog as of each change
        // it decodes (before PostgreSQL 18), so a change committed while the
        // publication was missing fails again after it is recreated: the
        // slot must go too.
        "42704" if msg.contains("publication") => Some(
            "create the publication (`walcast migrate`, or CREATE PUBLICATION supabase_realtime FOR TABLE \
             public.orders, public.dealer_memberships), then drop walcast's slot \
             (SELECT pg_drop_replication_slot('<slot>')) and restart walcast, which recreates it: the slot \
             cannot decode past a change committed while the publication was missing, even once it exists \
             again; changes in that gap are not delivered, so clients should reload",
        ),
        "42704" if msg.contains("slot") => Some(
            "the replication slot is missing; restart walcast to recreate it (changes committed while it \
             was missing are not delivered; clients should reload)",
        ),
        "42501" => Some(
            "the role needs the REPLICATION attribute (ALTER ROLE <user> REPLICATION) and access to the \
             database; on Supabase use the postgres role",
        ),
        "53400" => Some("raise max_replication_slots / max_wal_senders in postgresql.conf, or drop unused slots"),
        "0A000" => Some("this PostgreSQL does not support the requested option; walcast needs PostgreSQL 14 or newer"),
        _ if err.code.starts_with("28") => Some("check the user and password in the database URL and pg_hba.conf"),
        _ => None,
    }
}
