//! Broadcast from Database: the `realtime.messages` table as walcast reads
//! it (broadcast-presence.md §4.5, §5).
//!
//! ```text
//!  realtime.send() ─▶ INSERT realtime.messages_YYYY_MM_DD ─▶ walcast_messages publication
//!    (publish_via_partition_root: relation realtime.messages) ─▶ slot ─▶ change stage
//!    ─▶ [`from_change`] ─▶ DbMessage ─▶ (bounded) ─▶ rooms::database stage ─▶ rooms.send
//! ```
//!
//! - [`from_change`]: one committed row → a [`DbMessage`], or why it is
//!   dropped (a required column missing, a `binary_payload` that is not
//!   pgoutput's hex text of bytea).
//! - [`maintain_partitions`]: the daily partitions `realtime.messages_YYYY_MM_DD`,
//!   yesterday … today+3 created, those whose range ended more than 72 h ago
//!   dropped; [`run_partitions`] runs it at start and every hour.
//! - [`replay`]: Supabase's replay query (§5.3) for private channels.
//!
//! Invariants: only INSERTs become messages (updates, deletes and
//! truncates of the table are never broadcast); the table's timestamps are
//! `timestamp` without time zone in UTC, so every value walcast writes or
//! compares is computed `at time zone 'utc'` and the session's TimeZone
//! never matters; row values are never logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Datum, Op, RelationInfo};
use crate::pgconn::PgConfig;

/// The schema of the table (and of every relation walcast keeps out of
/// Postgres Changes).
pub const SCHEMA: &str = "realtime";
/// The table.
pub const TABLE: &str = "messages";
/// walcast's own publication of `realtime.messages` (created by `walcast
/// setup`, `sql/walcast/0002_realtime_messages.sql`), streamed on the slot
/// next to the user's publication when it exists.
pub const PUBLICATION: &str = "walcast_messages";

/// Partitions kept ahead of today (today+1 … today+[`DAYS_AHEAD`]).
pub const DAYS_AHEAD: i32 = 3;
/// A partition whose range ended more than this long ago is dropped (and
/// its messages can no longer be replayed).
pub const RETENTION: Duration = Duration::from_secs(72 * 3600);
/// How often `walcast serve` maintains the partitions.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);
/// `statement_timeout` of the maintenance session (DDL waits for locks on
/// the table; it must not queue behind a long transaction for ever).
pub const MAINTENANCE_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Most rows [`replay`] returns (Supabase's clamp).
pub const MAX_REPLAY: i64 = 25;

/// Whether `relation` is in the `realtime` schema: such changes never go
/// to Postgres Changes subscribers.
pub fn is_realtime(relation: &RelationInfo) -> bool {
    relation.schema == SCHEMA
}

/// Whether `relation` is `realtime.messages` (the root, as
/// `publish_via_partition_root` names it, or a daily partition when another
/// publication publishes the partitions themselves).
pub fn is_messages(relation: &RelationInfo) -> bool {
    is_realtime(relation) && (relation.table == TABLE || is_partition_name(&relation.table))
}

/// `messages_YYYY_MM_DD`.
fn is_partition_name(name: &str) -> bool {
    let Some(date) = name.strip_prefix("messages_") else { return false };
    let b = date.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'_' } else { c.is_ascii_digit() })
}

/// One row of `realtime.messages`, ready to broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbMessage {
    /// The row id (`meta.id`).
    pub id: String,
    /// The sub-topic (`room-1`; the channel topic is `realtime:room-1`).
    pub topic: String,
    /// The user event.
    pub event: String,
    /// Whether it goes to private channels (else to public ones).
    pub private: bool,
    /// 1: `payload` is JSON text; 0: raw bytes (`binary_payload`).
    pub encoding: u8,
    /// The payload.
    pub payload: Bytes,
}

/// Why a row is not broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    /// A required column is missing or NULL (`id`, `topic`, `event`,
    /// `private`, and `payload` or `binary_payload`).
    #[error("realtime.messages row without {0}; not broadcast")]
    MissingColumn(&'static str),
    /// `binary_payload` is not in pgoutput's hex text form of bytea.
    #[error("realtime.messages row whose binary_payload is not hex bytea text; not broadcast")]
    BadBinary,
    /// The payload is larger than the broadcast limit.
    #[error("realtime.messages payload larger than the broadcast limit; not broadcast")]
    TooLarge,
}

impl Dropped {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Dropped::MissingColumn(_) => "missing_column",
            Dropped::BadBinary => "bad_binary",
            Dropped::TooLarge => "too_large",
        }
    }
}

/// The row of an INSERT into `realtime.messages` as a message; `Ok(None)`
/// for any other operation (never broadcast).
///
/// # Errors
/// [`Dropped`] when a required column is missing or malformed.
pub fn from_change(change: &Change) -> Result<Option<DbMessage>, Dropped> {
    if change.op != Op::Insert {
        return Ok(None);
    }
    let Some(row) = change.record.as_ref() else { return Err(Dropped::MissingColumn("a row")) };
    let column = |name: &str| -> Option<&Bytes> {
        let i = change.relation.column_index(name)?;
        match row.0.get(i)? {
            Datum::Text(bytes) => Some(bytes),
            Datum::Null | Datum::Absent => None,
        }
    };
    let text = |name: &'static str| -> Result<String, Dropped> {
        let bytes = column(name).ok_or(Dropped::MissingColumn(name))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Dropped::MissingColumn(name))
    };
    let id = text("id")?;
    let topic = text("topic")?;
    let event = text("event")?;
    let private = match column("private").map(|b| b.as_ref()) {
        Some(b"t") => true,
        Some(b"f") => false,
        _ => return Err(Dropped::MissingColumn("private")),
    };
    let (encoding, payload) = match (column("binary_payload"), column("payload")) {
        (Some(hex), _) => (0, Bytes::from(decode_bytea(hex).ok_or(Dropped::BadBinary)?)),
        (None, Some(json)) => (1, json.clone()),
        (None, None) => return Err(Dropped::MissingColumn("payload")),
    };
    Ok(Some(DbMessage { id, topic, event, private, encoding, payload }))
}

/// Decodes the text form of a bytea value in hex output (`\x0a1b…`, what
/// the walsender sends with the default `bytea_output`); `None` otherwise.
pub fn decode_bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

/// Counters of Broadcast from Database, shared by the change stage (rows
/// dropped at conversion), the delivery stage and the partition keeper.
#[derive(Debug, Default)]
pub struct DbBroadcastStats {
    /// Messages handed to the rooms (each counts once, whatever the number
    /// of receivers).
    pub delivered: AtomicU64,
    /// Frames the rooms queued for them.
    pub frames: AtomicU64,
    /// Rows dropped: a required column missing.
    pub dropped_missing_column: AtomicU64,
    /// Rows dropped: a malformed `binary_payload`.
    pub dropped_bad_binary: AtomicU64,
    /// Rows dropped: payload over the broadcast limit.
    pub dropped_too_large: AtomicU64,
    /// Partitions created by walcast.
    pub partitions_created: AtomicU64,
    /// Partitions dropped by walcast.
    pub partitions_dropped: AtomicU64,
    /// Maintenance runs that failed.
    pub maintenance_failures: AtomicU64,
}

impl DbBroadcastStats {
    /// Counts a dropped row.
    pub fn dropped(&self, why: Dropped) {
        let counter = match why {
            Dropped::MissingColumn(_) => &self.dropped_missing_column,
            Dropped::BadBinary => &self.dropped_bad_binary,
            Dropped::TooLarge => &self.dropped_too_large,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// `(label, count)` of every drop reason, for `/metrics`.
    pub fn dropped_by_reason(&self) -> [(&'static str, u64); 3] {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (Dropped::MissingColumn("").label(), load(&self.dropped_missing_column)),
            (Dropped::BadBinary.label(), load(&self.dropped_bad_binary)),
            (Dropped::TooLarge.label(), load(&self.dropped_too_large)),
        ]
    }
}

/// Errors of this module's SQL.
#[derive(Debug, thiserror::Error)]
pub enum MessagesError {
    /// A query failed.
    #[error("{what} failed: {}", crate::pgconn::cause(.source))]
    Database {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> MessagesError {
    move |source| MessagesError::Database { what, source }
}

/// What one maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionReport {
    /// Partitions created (`messages_YYYY_MM_DD`).
    pub created: Vec<String>,
    /// Partitions dropped.
    pub dropped: Vec<String>,
    /// `false` when `realtime.messages` is missing or not partitioned
    /// (nothing to do).
    pub partitioned: bool,
}

/// The days (UTC) that must have a partition, missing ones only:
/// (name, from, to).
const MISSING_SQL: &str = "
select 'messages_' || to_char(day, 'YYYY_MM_DD'), day::timestamp::text, (day + 1)::timestamp::text
  from (select (now() at time zone 'utc')::date + i as day from generate_series(-1, $1::int) i) d
 where to_regclass('realtime.' || quote_ident('messages_' || to_char(day, 'YYYY_MM_DD'))) is null
 order by day";

/// Daily partitions whose range ended more than `$1` seconds ago.
const EXPIRED_SQL: &str = "
select c.relname::text
  from pg_catalog.pg_inherits i
  join pg_catalog.pg_class c on c.oid = i.inhrelid
 where i.inhparent = 'realtime.messages'::regclass
   and c.relname ~ '^messages_[0-9]{4}_[0-9]{2}_[0-9]{2}$'
   and to_date(substr(c.relname, 10), 'YYYY_MM_DD') + 1
       < (now() at time zone 'utc') - make_interval(secs => $1::float8)
 order by 1";

/// Creates the missing daily partitions yesterday … today+[`DAYS_AHEAD`]
/// (UTC) and drops those whose range ended more than [`RETENTION`] ago.
/// Only partitions named `messages_YYYY_MM_DD` are ever dropped. Needs to
/// own `realtime.messages` (or be a superuser).
///
/// # Errors
/// The first statement that failed (e.g. no privilege, or a lock not
/// granted within the session's statement timeout).
pub async fn maintain_partitions(client: &Client) -> Result<PartitionReport, MessagesError> {
    let mut report = PartitionReport::default();
    let kind: Option<i8> = client
        .query_one(
            "select (select c.relkind from pg_catalog.pg_class c where c.oid = to_regclass('realtime.messages'))",
            &[],
        )
        .await
        .map_err(db("looking up realtime.messages"))?
        .get(0);
    if kind != Some(b'p' as i8) {
        return Ok(report);
    }
    report.partitioned = true;
    let missing = client.query(MISSING_SQL, &[&DAYS_AHEAD]).await.map_err(db("listing missing partitions"))?;
    for row in missing {
        let (name, from, to): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let sql = format!(
            "create table if not exists realtime.{} partition of realtime.messages for values from ({}) to ({})",
            crate::replication::slot::quote_ident(&name),
            crate::replication::slot::quote_literal(&from),
            crate::replication::slot::quote_literal(&to),
        );
        client.batch_execute(&sql).await.map_err(db("creating a realtime.messages partition"))?;
        report.created.push(name);
    }
    let expired =
        client.query(EXPIRED_SQL, &[&(RETENTION.as_secs() as f64)]).await.map_err(db("listing expired partitions"))?;
    for row in expired {
        let name: String = row.get(0);
        let sql = format!("drop table if exists realtime.{}", crate::replication::slot::quote_ident(&name));
        client.batch_execute(&sql).await.map_err(db("dropping an expired realtime.messages partition"))?;
        report.dropped.push(name);
    }
    Ok(report)
}

/// Keeps the partitions: [`maintain_partitions`] now and every `every`, on
/// a session of its own under [`MAINTENANCE_STATEMENT_TIMEOUT`] (made again
/// after an error). Failures are logged and counted; Broadcast from
/// Database then lacks tomorrow's partition at worst, and `walcast check`
/// says so. Runs until `shutdown`.
pub async fn run_partitions(
    connection: PgConfig,
    every: Duration,
    stats: std::sync::Arc<DbBroadcastStats>,
    shutdown: CancellationToken,
) {
    let config = connection.with_statement_timeout(MAINTENANCE_STATEMENT_TIMEOUT);
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = match crate::pgconn::connect(&config).await {
                Ok(c) => Some(c),
                Err(err) => {
                    stats.maintenance_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %crate::pgconn::cause(&err), "realtime.messages partitions: cannot connect");
                    continue;
                }
            };
        }
        let Some(session) = client.as_ref() else { continue };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = maintain_partitions(session) => outcome,
        };
        match outcome {
            Ok(report) => {
                stats.partitions_created.fetch_add(report.created.len() as u64, Ordering::Relaxed);
                stats.partitions_dropped.fetch_add(report.dropped.len() as u64, Ordering::Relaxed);
                if !report.created.is_empty() || !report.dropped.is_empty() {
                    tracing::info!(created = ?report.created, dropped = ?report.dropped, "realtime.messages partitions");
                }
            }
            Err(err) => {
                stats.maintenance_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "realtime.messages partitions not maintained; retrying next time");
            }
        }
    }
}

/// A message read back by [`replay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The row id (`meta.id`).
    pub id: String,
    /// The user event.
    pub event: String,
    /// 1: JSON text; 0: raw bytes.
    pub encoding: u8,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Supabase's replay query (§5.3): the newest `limit` (clamped to
/// 1…[`MAX_REPLAY`]) private broadcast rows of `sub_topic` inserted from
/// `since_ms` (Unix milliseconds) until a minute from now, returned oldest
/// first. Read as the session's role (walcast's, which bypasses RLS); rows
/// without an event or a payload are left out, as the live stream drops
/// them.
///
/// # Errors
/// The query failed.
pub async fn replay(
    client: &Client,
    sub_topic: &str,
    since_ms: i64,
    limit: i64,
) -> Result<Vec<Replayed>, MessagesError> {
    let limit = limit.clamp(1, MAX_REPLAY);
    let rows = client
        .query(
            "select id::text, event, payload::text, binary_payload from (
                 select id, event, payload, binary_payload, inserted_at from realtime.messages
                  where topic = $1 and private is true and extension = 'broadcast'
                    and inserted_at >= (to_timestamp($2::bigint::float8 / 1000) at time zone 'utc')
                    and inserted_at < (now() at time zone 'utc') + interval '1 minute'
                  order by inserted_at desc
                  limit $3::bigint) newest
              order by inserted_at",
            &[&sub_topic, &since_ms, &limit],
        )
        .await
        .map_err(db("replaying realtime.messages"))?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let event: Option<String> = row.get(1);
            let json: Option<String> = row.get(2);
            let binary: Option<Vec<u8>> = row.get(3);
            let (encoding, payload) = match (binary, json) {
                (Some(bytes), _) => (0, bytes),
                (None, Some(json)) => (1, json.into_bytes()),
                (None, None) => return None,
            };
            Some(Replayed { id: row.get(0), event: event?, encoding, payload })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::change::{value::ValueKind, ColumnInfo, Row};
    use crate::pgoutput::ReplicaIdentity;

    fn relation(table: &str, columns: &[&str]) -> Arc<RelationInfo> {
        Arc::new(RelationInfo {
            oid: 1,
            schema: SCHEMA.into(),
            table: table.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .map(|name| ColumnInfo {
                    name: (*name).into(),
                    type_name: "text".into(),
                    type_oid: 25,
                    is_key: false,
                    kind: ValueKind::Text,
                })
                .collect(),
        })
    }

    const COLUMNS: &[&str] =
        &["id", "topic", "extension", "event", "payload", "binary_payload", "private", "inserted_at", "updated_at"];

    fn insert(values: &[Option<&str>]) -> Change {
        Change {
            relation: relation(TABLE, COLUMNS),
            op: Op::Insert,
            record: Some(Row(values
                .iter()
                .map(|v| match v {
                    Some(text) => Datum::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => Datum::Null,
                })
                .collect())),
            old_record: None,
            missing_toast: Vec::new(),
        }
    }

    const ID: &str = "6b0c8e4e-6f7a-4d2e-9a55-0c1c3b1e2f10";

    fn row(payload: Option<&'static str>, binary: Option<&'static str>) -> [Option<&'static str>; 9] {
        [
            Some(ID),
            Some("room-1"),
            Some("broadcast"),
            Some("ev"),
            payload,
            binary,
            Some("f"),
            Some("2026-12-06 08:00:00"),
            Some("2026-12-06 08:00:00"),
        ]
    }

    #[test]
    fn a_json_row_becomes_a_message() {
        let message = from_change(&insert(&row(Some(r#"{"a": 1, "id": "x"}"#), None))).unwrap().unwrap();
        assert_eq!(
            message,
            DbMessage {
                id: ID.into(),
                topic: "room-1".into(),
                event: "ev".into(),
                private: false,
                encoding: 1,
                payload: Bytes::from_static(br#"{"a": 1, "id": "x"}"#),
            }
        );
        let mut private = row(Some("{}"), None);
        private[6] = Some("t");
        assert!(from_change(&insert(&private)).unwrap().unwrap().private);
    }

    #[test]
    fn a_binary_row_is_decoded_from_hex() {
        let message = from_change(&insert(&row(None, Some("\\x00ff10Ab")))).unwrap().unwrap();
        assert_eq!((message.encoding, message.payload.as_ref()), (0, &[0x00, 0xff, 0x10, 0xab][..]));
        let empty = from_change(&insert(&row(None, Some("\\x")))).unwrap().unwrap();
        assert_eq!((empty.encoding, empty.payload.len()), (0, 0));
        for bad in ["00ff", "\\x0", "\\xzz", "\\000"] {
            let mut values = row(None, None);
            values[5] = Some(bad);
            assert_eq!(from_change(&insert(&values)), Err(Dropped::BadBinary), "{bad}");
        }
    }

    #[test]
    fn rows_missing_a_required_column_are_dropped() {
        for (i, name) in [(0, "id"), (1, "topic"), (3, "event"), (6, "private")] {
            let mut values = row(Some("{}"), None);
            values[i] = None;
            assert_eq!(from_change(&insert(&values)), Err(Dropped::MissingColumn(name)));
        }
        assert_eq!(from_change(&insert(&row(None, None))), Err(Dropped::MissingColumn("payload")));
        let mut odd = row(Some("{}"), None);
        odd[6] = Some("yes");
        assert_eq!(from_change(&insert(&odd)), Err(Dropped::MissingColumn("private")));
        // A relation without the column at all (another table layout).
        let mut change = insert(&row(Some("{}"), None));
        change.relation = relation(TABLE, &["id", "topic"]);
        assert_eq!(from_change(&change), Err(Dropped::MissingColumn("event")));
        // Absent (an unchanged TOASTed value) counts as missing.
        let mut change = insert(&row(Some("{}"), None));
        change.record.as_mut().unwrap().0[3] = Datum::Absent;
        assert_eq!(from_change(&change), Err(Dropped::MissingColumn("event")));
    }

    #[test]
    fn only_inserts_are_broadcast() {
        for op in [Op::Update, Op::Delete, Op::Truncate] {
            let mut change = insert(&row(Some("{}"), None));
            change.op = op;
            assert_eq!(from_change(&change), Ok(None), "{op:?}");
        }
    }

    #[test]
    fn relations_kept_out_of_postgres_changes() {
        assert!(is_messages(&relation("messages", &[])));
        assert!(is_messages(&relation("messages_2026_12_06", &[])));
        assert!(!is_messages(&relation("messages_2026_12_6", &[])));
        assert!(!is_messages(&relation("messages_x", &[])));
        assert!(!is_messages(&relation("subscription", &[])));
        assert!(is_realtime(&relation("subscription", &[])));
        let mut public = (*relation("messages", &[])).clone();
        public.schema = "public".into();
        assert!(!is_messages(&public) && !is_realtime(&public));
    }

    #[test]
    fn drop_labels() {
        let stats = DbBroadcastStats::default();
        stats.dropped(Dropped::MissingColumn("id"));
        stats.dropped(Dropped::TooLarge);
        stats.dropped(Dropped::TooLarge);
        assert_eq!(stats.dropped_by_reason(), [("missing_column", 1), ("bad_binary", 0), ("too_large", 2)]);
    }
}
