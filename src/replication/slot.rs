//! Replication commands on a [`WalConnection`]: `IDENTIFY_SYSTEM`, slot
//! creation and `START_REPLICATION`.
//!
//! Replication keywords must be upper case (lower case falls through to the
//! SQL parser). Names are always quoted as identifiers, and the publication
//! list as a literal of quoted identifiers, so mixed-case and odd names work.

use super::{ReplicationError, WalConnection};
use crate::lsn::Lsn;

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to.
    pub dbname: Option<String>,
}

/// A slot just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub name: String,
    /// The position from which the slot decodes: every transaction committing
    /// after it is streamed.
    pub consistent_point: Lsn,
    /// The exported snapshot, when asked for: usable by another connection with
    /// `SET TRANSACTION SNAPSHOT` until this connection runs another command.
    pub snapshot_name: Option<String>,
}

/// How to start streaming.
#[derive(Debug, Clone)]
pub struct SlotOptions {
    /// Slot name.
    pub slot: String,
    /// Publication names.
    pub publications: Vec<String>,
    /// Publications streamed as well when they exist at the stream's start
    /// (checked before each `START_REPLICATION`: pgoutput fails on a
    /// missing one), e.g. walcast's own `walcast_messages`. Policies and the
    /// join catalog read [`SlotOptions::publications`] only.
    pub optional_publications: Vec<String>,
    /// pgoutput protocol version: 1 (default) or 2 with streaming of large
    /// in-progress transactions.
    pub proto_version: u8,
    /// Stream large in-progress transactions (needs `proto_version` ≥ 2).
    pub streaming: bool,
    /// Make the slot a failover slot (`FAILOVER`, PostgreSQL 17+): created
    /// with it, or altered to it when it exists without. A physical standby
    /// with `sync_replication_slots = on` then keeps a copy of the slot, and
    /// walcast resumes from that copy once the standby is promoted.
    pub failover: bool,
}

impl SlotOptions {
    /// Protocol 1 for `publication` through `slot`, not a failover slot.
    pub fn new(slot: impl Into<String>, publication: impl Into<String>) -> Self {
        SlotOptions {
            slot: slot.into(),
            publications: vec![publication.into()],
            optional_publications: Vec::new(),
            proto_version: 1,
            streaming: false,
            failover: false,
        }
    }
}

/// Quotes an identifier: `"name"` with inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal: `'text'` with inner quotes doubled.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl WalConnection {
    /// `IDENTIFY_SYSTEM`.
    ///
    /// # Errors
    /// Server error or I/O.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let result = self.simple_query("IDENTIFY_SYSTEM").await?;
        let field = |name: &str| {
            result.first(name).ok_or_else(|| ReplicationError::Protocol(format!("IDENTIFY_SYSTEM without {name}")))
        };
        Ok(SystemIdentity {
            system_id: field("systemid")?.to_owned(),
            timeline: field("timeline")?
                .parse()
                .map_err(|_| ReplicationError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?,
            xlogpos: field("xlogpos")?
                .parse()
                .map_err(|_| ReplicationError::Protocol("IDENTIFY_SYSTEM: bad xlogpos".into()))?,
            dbname: result.first("dbname").map(str::to_owned),
        })
    }

    /// Creates a permanent pgoutput slot. With `export_snapshot` the server
    /// exports the snapshot of the slot's consistent point: read it from a
    /// second, normal connection (`BEGIN ISOLATION LEVEL REPEATABLE READ; SET
    /// TRANSACTION SNAPSHOT '…'`) before running anything else on this one.
    ///
    /// # Errors
    /// `42710` when the slot exists (see [`ReplicationError::sqlstate`]), or
    /// any other server error.
    pub async fn create_slot(&mut self, slot: &str, export_snapshot: bool) -> Result<CreatedSlot, ReplicationError> {
        self.create_slot_with(slot, export_snapshot, false).await
    }

    /// [`WalConnection::create_slot`], as a failover slot when `failover`
    /// (refused before the server is asked on PostgreSQL < 17, see
    /// [`check_failover_version`]).
    ///
    /// # Errors
    /// As [`WalConnection::create_slot`]; [`ReplicationError::Config`] for
    /// `failover` on PostgreSQL 16 or older.
    pub async fn create_slot_with(
        &mut self,
        slot: &str,
        export_snapshot: bool,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        if failover {
            check_failover_version(self.server_version())?;
        }
        let sql = create_slot_sql(slot, export_snapshot, failover, self.server_version());
        let result = self.simple_query(&sql).await?;
        let consistent_point = result
            .first("consistent_point")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT without consistent_point".into()))?;
        Ok(CreatedSlot {
            name: slot.to_owned(),
            consistent_point,
            snapshot_name: result.first("snapshot_name").map(str::to_owned),
        })
    }

    /// `ALTER_REPLICATION_SLOT … (FAILOVER true)`: makes an existing slot a
    /// failover slot (PostgreSQL 17+).
    ///
    /// # Errors
    /// [`ReplicationError::Config`] on PostgreSQL 16 or older; a server error
    /// (e.g. `42704` when the slot is missing, `55006` while it is in use).
    pub async fn set_slot_failover(&mut self, slot: &str) -> Result<(), ReplicationError> {
        check_failover_version(self.server_version())?;
        self.simple_query(&format!("ALTER_REPLICATION_SLOT {} (FAILOVER true)", quote_ident(slot))).await.map(|_| ())
    }

    /// `DROP_REPLICATION_SLOT`, waiting for it to become inactive.
    ///
    /// # Errors
    /// Server error (e.g. `42704` when missing) or I/O.
    pub async fn drop_slot(&mut self, slot: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(slot))).await.map(|_| ())
    }

    /// The publications to stream: [`SlotOptions::publications`] plus those
    /// of [`SlotOptions::optional_publications`] that exist now.
    ///
    /// # Errors
    /// Server error or I/O.
    pub async fn publication_names(&mut self, options: &SlotOptions) -> Result<Vec<String>, ReplicationError> {
        let mut names = options.publications.clone();
        for optional in &options.optional_publications {
            if names.contains(optional) {
                continue;
            }
            let sql = format!(
                "SELECT count(*) AS n FROM pg_catalog.pg_publication WHERE pubname = {}",
                quote_literal(optional)
            );
            if self.simple_query(&sql).await?.first("n") == Some("1") {
                names.push(optional.clone());
            } else {
                tracing::info!(publication = %optional, "publication missing; not streamed");
            }
        }
        Ok(names)
    }

    /// `START_REPLICATION SLOT … LOGICAL start (…)`: the server starts at the
    /// greater of `start` and the slot's `confirmed_flush_lsn`.
    ///
    /// # Errors
    /// Missing slot (`42704`), slot busy (`55006`), invalidated slot (`55000`),
    /// unsupported option (`0A000`), or I/O.
    pub async fn start_replication(&mut self, options: &SlotOptions, start: Lsn) -> Result<(), ReplicationError> {
        if options.streaming && options.proto_version < 2 {
            return Err(ReplicationError::Config("streaming needs proto_version 2 or higher".into()));
        }
        if options.streaming {
            check_streaming_version(self.server_version())?;
        }
        let publications = options.publications.iter().map(|p| quote_ident(p)).collect::<Vec<_>>().join(",");
        let mut args = vec![
            format!("proto_version '{}'", options.proto_version),
            format!("publication_names {}", quote_literal(&publications)),
        ];
        if options.streaming {
            args.push("streaming 'on'".to_owned());
        }
        // Logical decoding messages carry the liveness heartbeat and walcast's
        // own in-transaction markers; pgoutput knows the option from 14 on and
        // an older server would refuse START_REPLICATION over it.
        if asks_for_messages(self.server_version()) {
            args.push("messages 'true'".to_owned());
        }
        let sql =
            format!("START_REPLICATION SLOT {} LOGICAL {start} ({})", quote_ident(&options.slot), args.join(", "));
        self.start_copy_both(&sql).await
    }
}

/// First PostgreSQL major version that streams in-progress transactions
/// (pgoutput protocol 2).
pub const STREAMING_MIN_MAJOR: u32 = 14;

/// First PostgreSQL major version taking `CREATE_REPLICATION_SLOT` options
/// in parentheses (`(SNAPSHOT 'export')`); PostgreSQL 14 knows only the
/// keyword form (`EXPORT_SNAPSHOT`), which later versions still accept.
pub const OPTION_LIST_MIN_MAJOR: u32 = 15;

/// The `CREATE_REPLICATION_SLOT` command for a pgoutput slot: the option
/// list from [`OPTION_LIST_MIN_MAJOR`] on (and when the version is unknown),
/// the keyword form before. `failover` needs the option list (it is refused
/// before PostgreSQL 17 anyway, see [`check_failover_version`]).
pub fn create_slot_sql(slot: &str, export_snapshot: bool, failover: bool, server_version: &str) -> String {
    let slot = quote_ident(slot);
    if server_major(server_version).is_some_and(|major| major < OPTION_LIST_MIN_MAJOR) {
        let snapshot = if export_snapshot { "EXPORT_SNAPSHOT" } else { "NOEXPORT_SNAPSHOT" };
        return format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput {snapshot}");
    }
    let snapshot = if export_snapshot { "export" } else { "nothing" };
    let failover = if failover { ", FAILOVER" } else { "" };
    format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT '{snapshot}'{failover})")
}

/// First PostgreSQL major version with failover slots (`FAILOVER`,
/// `sync_replication_slots`).
pub const FAILOVER_MIN_MAJOR: u32 = 17;

/// Refuses a failover slot on a server older than PostgreSQL 17 with an
/// error that names the setting (an unknown version is left to the server
/// to judge).
///
/// # Errors
/// [`ReplicationError::Config`] (definite).
pub fn check_failover_version(server_version: &str) -> Result<(), ReplicationError> {
    match server_major(server_version) {
        Some(major) if major < FAILOVER_MIN_MAJOR => Err(ReplicationError::Config(format!(
            "--slot-failover (WALCAST_SLOT_FAILOVER, slot_failover = true) needs PostgreSQL {FAILOVER_MIN_MAJOR} or \
             later, this server is {server_version}: turn it off (the slot then stays on this server only) or \
             upgrade PostgreSQL"
        ))),
        _ => Ok(()),
    }
}

/// First PostgreSQL major version whose pgoutput sends logical decoding
/// messages (`messages 'true'`).
pub const MESSAGES_MIN_MAJOR: u32 = 14;

/// Whether to ask pgoutput for logical decoding messages: from
/// [`MESSAGES_MIN_MAJOR`] on, and when the version is unknown (the server
/// judges then), never on an older server.
pub fn asks_for_messages(server_version: &str) -> bool {
    server_major(server_version).is_none_or(|major| major >= MESSAGES_MIN_MAJOR)
}

/// The major version in a `server_version` ("17.2 (Debian …)", "9.6.24",
/// "15beta1"); `None` when it does not start with a number.
pub fn server_major(server_version: &str) -> Option<u32> {
    let digits = server_version.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// Refuses streaming on a server older than PostgreSQL 14 with an error that
/// names the setting (an unknown version is left to the server to judge).
///
/// # Errors
/// [`ReplicationError::Config`] (definite).
pub fn check_streaming_version(server_version: &str) -> Result<(), ReplicationError> {
    match server_major(server_version) {
        Some(major) if major < STREAMING_MIN_MAJOR => Err(ReplicationError::Config(format!(
            "--streaming (WALCAST_STREAMING, streaming = true) needs PostgreSQL {STREAMING_MIN_MAJOR} or later, \
             this server is {server_version}: turn streaming off (PostgreSQL then sends large transactions after \
             they commit) or upgrade PostgreSQL"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_needs_postgresql_14() {
        assert_eq!(server_major("17.2 (Debian 17.2-1.pgdg120+1)"), Some(17));
        assert_eq!(server_major("9.6.24"), Some(9));
        assert_eq!(server_major("15beta1"), Some(15));
        assert_eq!(server_major(""), None);
        let err = check_streaming_version("13.16").unwrap_err();
        assert!(!err.is_transient());
        let text = err.to_string();
        assert!(text.contains("--streaming") && text.contains("PostgreSQL 14") && text.contains("13.16"), "{text}");
        for ok in ["14.0", "18.1", "unknown"] {
            check_streaming_version(ok).unwrap();
        }
    }

    #[test]
    fn slot_creation_in_the_syntax_of_the_server() {
        assert_eq!(
            create_slot_sql("s", true, false, "14.23"),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_sql("s", false, false, "14.23"),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_sql("s", false, false, "15.20 (Debian)"),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            create_slot_sql("s", true, true, "17.10"),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER)"
        );
        assert_eq!(
            create_slot_sql("s", false, false, ""),
            "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
        );
    }

    #[test]
    fn failover_needs_postgresql_17() {
        let err = check_failover_version("16.14").unwrap_err();
        assert!(!err.is_transient());
        let text = err.to_string();
        assert!(text.contains("--slot-failover") && text.contains("PostgreSQL 17") && text.contains("16.14"), "{text}");
        for ok in ["17.0", "18.4 (Debian)", "unknown"] {
            check_failover_version(ok).unwrap();
        }
    }

    #[test]
    fn messages_only_where_pgoutput_knows_the_option() {
        assert!(asks_for_messages("14.0"));
        assert!(asks_for_messages("18.1 (Debian)"));
        assert!(!asks_for_messages("13.16"));
        assert!(asks_for_messages(""), "unknown: let the server judge");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("supabase_realtime"), "\"supabase_realtime\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("\"a\",\"it's\""), "'\"a\",\"it''s\"'");
    }
}
