//! `walcast check`: is this configuration and this database ready for
//! walcast? Each check reports ok, a warning, or a failure with its fix.
//!
//! Read-only: nothing is created or changed. A failure means `walcast serve`
//! would not start or would not stream; a warning means it would run but
//! differ from what the operator probably expects (e.g. a published table
//! without full replica identity, or rules that do not match RLS).

use std::fmt;

use tokio_postgres::Client;

use super::Settings;
use crate::realtime::auth::Verifier;
use crate::replication::slot::quote_ident;

/// The oldest PostgreSQL major version the version matrix
/// (`tests/versions.rs`) runs walcast on; older ones get a warning.
pub const TESTED_MIN_MAJOR: u32 = 14;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but probably not as intended.
    Warn,
    /// Blocks walcast.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Outcome.
    pub status: Status,
    /// What was checked.
    pub check: String,
    /// What was found.
    pub detail: String,
    /// How to fix it (for warnings and failures).
    pub fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        write!(f, "[{mark}] {:<28} {}", self.check, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       fix: {fix}")?;
        }
        Ok(())
    }
}

/// Whether no check failed.
pub fn ready(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.status != Status::Fail)
}

struct Report(Vec<Finding>);

impl Report {
    fn add(&mut self, status: Status, check: impl Into<String>, detail: impl Into<String>, fix: Option<String>) {
        self.0.push(Finding { status, check: check.into(), detail: detail.into(), fix });
    }
    fn ok(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.add(Status::Ok, check, detail, None);
    }
    fn warn(&mut self, check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) {
        self.add(Status::Warn, check, detail, Some(fix.into()));
    }
    fn fail(&mut self, check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) {
        self.add(Status::Fail, check, detail, Some(fix.into()));
    }
}

/// `statement_timeout` of every query `walcast check` makes.
const CHECK_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs every check against the database at `connection`.
/// `connection` is a [`PgConfig`](crate::pgconn::PgConfig) (TLS as its
/// `sslmode` says) or a tokio-postgres config.
pub async fn run(settings: &Settings, connection: impl Into<crate::pgconn::PgConfig>) -> Vec<Finding> {
    let mut report = Report(Vec::new());
    match Verifier::new(&settings.auth) {
        Ok(_) => report.ok("JWT keys", "configured and valid"),
        Err(err) => report.fail("JWT keys", err.to_string(), "pass --jwt-secret or --jwks"),
    }
    if let Some(cluster) = &settings.cluster {
        // Boxed: connecting to NATS is a large future, and it runs once.
        Box::pin(nats_check(cluster, &settings.slot, &mut report)).await;
    }
    let connection: crate::pgconn::PgConfig = connection.into();
    let mut client = match crate::pgconn::connect(&connection.with_statement_timeout(CHECK_STATEMENT_TIMEOUT)).await {
        Ok(client) => client,
        Err(err) => {
            report.fail(
                "connection",
                format!("cannot connect: {}", crate::pgconn::describe(&err)),
                "check DATABASE_URL (host, port, user, password, database) and that PostgreSQL accepts the connection",
            );
            return report.0;
        }
    };
    if settings.cluster.as_ref().is_some_and(|c| c.role.is_source()) {
        if let Err(err) = signal_check(&client, &mut report).await {
            report.fail("end stale walsender", crate::pgconn::cause(&err).to_string(), "run check as walcast's role");
        }
    }
    if let Err(err) = database_checks(&mut client, settings, &mut report).await {
        report.fail(
            "queries",
            format!("a catalog query failed: {}", crate::pgconn::cause(&err)),
            "run check as a role that can read pg_catalog",
        );
    }
    report.0
}

/// Cluster mode: the NATS server answers, is new enough, has JetStream,
/// and what the deployment's stream and lease hold.
async fn nats_check(cluster: &crate::scaleout::ClusterSettings, slot: &str, report: &mut Report) {
    use crate::scaleout::log;
    let shown = crate::scaleout::redact(&cluster.nats_url.0);
    let connect = log::connect(cluster, "walcast-check");
    let client = match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(err)) => {
            return report.fail(
                "nats",
                format!("cannot connect to {shown}: {err}"),
                "check --nats-url (WALCAST_NATS_URL) and that nats-server runs and accepts this host",
            )
        }
        Err(_) => {
            return report.fail(
                "nats",
                format!("{shown} did not answer within 10 s"),
                "check --nats-url (WALCAST_NATS_URL) and the network path to nats-server",
            )
        }
    };
    let info = client.server_info();
    if !log::version_supported(&info.version) {
        return report.fail(
            "nats",
            format!("{shown}: nats-server {} is too old", info.version),
            format!("run nats-server {} or newer", crate::scaleout::MIN_SERVER_VERSION),
        );
    }
    if !info.jetstream {
        return report.fail(
            "nats",
            format!("{shown}: nats-server {} without JetStream", info.version),
            "start nats-server with -js (or `jetstream {}` in its config)",
        );
    }
    report.ok(
        "nats",
        format!(
            "{shown}: nats-server {} with JetStream (max payload {} bytes); this node's role: {}",
            info.version,
            info.max_payload,
            cluster.role.as_str()
        ),
    );
    let names = log::Names::for_slot(slot);
    let js = async_nats::jetstream::new(client);
    match js.get_stream(&names.stream).await {
        Ok(mut stream) => match stream.info().await {
            Ok(info) => {
                let config = &info.config;
                let detail = format!(
                    "{}: {} messages, {} bytes (max {}), {} replica(s), {:?} storage",
                    names.stream,
                    info.state.messages,
                    info.state.bytes,
                    config.max_bytes,
                    config.num_replicas,
                    config.storage
                );
                if config.storage == async_nats::jetstream::stream::StorageType::File {
                    report.ok("change stream", detail);
                } else {
                    report.fail(
                        "change stream",
                        detail,
                        format!(
                            "delete the stream (nats stream rm {}): walcast makes it with file storage",
                            names.stream
                        ),
                    );
                }
            }
            Err(err) => report.warn(
                "change stream",
                format!("{}: {err}", names.stream),
                "check the JetStream account's permissions",
            ),
        },
        Err(_) => report.ok(
            "change stream",
            format!(
                "{} does not exist yet; the first node makes it ({} replica(s), max {} bytes)",
                names.stream, cluster.stream.replicas, cluster.stream.max_bytes
            ),
        ),
    }
    let leader = match js.get_key_value(&names.lease_bucket).await {
        Ok(store) => store.get("leader").await.ok().flatten(),
        Err(_) => None,
    };
    match leader {
        Some(node) => report.ok("source lease", format!("held by {}", String::from_utf8_lossy(&node))),
        None => report.ok("source lease", "free: the next source node to start leads"),
    }
}

/// Cluster source roles: walcast may end a stale walsender on the slot (a
/// leader cut off rather than dead), so a new leader need not wait for
/// `wal_sender_timeout`.
async fn signal_check(client: &Client, report: &mut Report) -> Result<(), tokio_postgres::Error> {
    let may: bool = client
        .query_one(
            "SELECT rolsuper OR pg_catalog.pg_has_role(current_user, 'pg_signal_backend', 'MEMBER') \
             FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?
        .get(0);
    if may {
        report.ok("end stale walsender", "may end a cut-off leader's walsender (pg_signal_backend)");
    } else {
        report.warn(
            "end stale walsender",
            "no pg_signal_backend: a new leader waits for the old walsender's wal_sender_timeout",
            "GRANT pg_signal_backend TO <walcast role>",
        );
    }
    Ok(())
}

async fn database_checks(
    client: &mut Client,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_one(
            "select current_setting('server_version_num')::int, current_setting('wal_level'), current_user::text, \
             r.rolsuper, r.rolreplication, current_setting('max_replication_slots')::int, \
             current_setting('max_wal_senders')::int, \
             (select count(*) from pg_replication_slots)::int, (select count(*) from pg_stat_replication)::int \
             from pg_roles r where r.rolname = current_user",
            &[],
        )
        .await?;
    let (version, wal_level, user): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
    let (superuser, replication): (bool, bool) = (row.get(3), row.get(4));
    let (max_slots, max_senders, slots, senders): (i32, i32, i32, i32) =
        (row.get(5), row.get(6), row.get(7), row.get(8));
    if version >= TESTED_MIN_MAJOR as i32 * 10_000 {
        report.ok("server version", format!("{}.{}", version / 10_000, version % 10_000));
    } else {
        report.warn(
            "server version",
            format!(
                "{}.{}: walcast is tested on PostgreSQL {TESTED_MIN_MAJOR} and later",
                version / 10_000,
                version % 10_000
            ),
            format!("upgrade to PostgreSQL {TESTED_MIN_MAJOR}+"),
        );
    }
    let (major, minor) = (version / 10_000, version % 10_000);
    let streaming_min = crate::replication::slot::STREAMING_MIN_MAJOR;
    match settings.streaming {
        false => report.ok("streaming", "off: PostgreSQL sends large transactions after they commit (protocol 1)"),
        true if major >= streaming_min as i32 => {
            report.ok("streaming", "on: large transactions stream while they run (protocol 2)")
        }
        true => report.fail(
            "streaming",
            format!("--streaming needs PostgreSQL {streaming_min} or later; this server is {major}.{minor}"),
            "turn --streaming (WALCAST_STREAMING) off, or upgrade PostgreSQL",
        ),
    }
    if wal_level == "logical" {
        report.ok("wal_level", "logical");
    } else {
        report.fail(
            "wal_level",
            format!("{wal_level}: logical decoding is off"),
            "alter system set wal_level = logical; then restart PostgreSQL",
        );
    }
    if superuser || replication {
        report.ok("replication privilege", format!("role {user} may stream"));
    } else {
        report.fail(
            "replication privilege",
            format!("role {user} has neither REPLICATION nor SUPERUSER"),
            format!("alter role {} with replication;", quote_ident(&user)),
        );
    }
    heartbeat_check(client, settings, &user, report).await?;
    failover_check(client, settings, major, minor, report).await?;

    let slot = client
        .query_opt(
            "select plugin::text, database::text, active, wal_status::text from pg_replication_slots where slot_name = $1",
            &[&settings.slot],
        )
        .await?;
    match slot {
        Some(row) => {
            let (plugin, database, active, wal_status): (Option<String>, Option<String>, bool, Option<String>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            let current: String = client.query_one("select current_database()::text", &[]).await?.get(0);
            if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
                report.fail(
                    "replication slot",
                    format!("slot {} exists but is not a pgoutput slot of database {current}", settings.slot),
                    "choose another --slot, or drop that slot if nothing uses it",
                );
            } else if wal_status.as_deref() == Some("lost") {
                report.fail(
                    "replication slot",
                    format!("slot {} has lost required WAL (wal_status = lost)", settings.slot),
                    format!(
                        "drop it (select pg_drop_replication_slot('{}')); walcast creates a fresh one, and clients reload",
                        settings.slot
                    ),
                );
            } else if active {
                report.warn(
                    "replication slot",
                    format!("slot {} is in use by another connection", settings.slot),
                    "stop the other consumer (another walcast?) or choose another --slot",
                );
            } else {
                report.ok("replication slot", format!("{} exists (pgoutput), resumes where it stopped", settings.slot));
            }
        }
        None if slots < max_slots => {
            report.ok(
                "replication slot",
                format!("{} will be created ({slots} of {max_slots} slots used)", settings.slot),
            );
        }
        None => report.fail(
            "replication slot",
            format!("all {max_slots} replication slots are used"),
            "raise max_replication_slots (restart) or drop an unused slot",
        ),
    }
    if senders < max_senders {
        report.ok("wal senders", format!("{senders} of {max_senders} in use"));
    } else {
        report.fail(
            "wal senders",
            format!("all {max_senders} WAL senders are busy"),
            "raise max_wal_senders (restart)",
        );
    }

    publication_checks(client, settings, report).await?;
    policy_checks(client, settings, report).await?;
    policy_change_check(client, settings, report).await?;
    broadcast_checks(client, report).await?;
    Ok(())
}

/// Broadcast from Database (`sql/walcast/0002_realtime_messages.sql`):
/// `realtime.messages`, `realtime.send`, walcast's `walcast_messages`
/// publication, and today's partition. All optional for Postgres Changes,
/// so warnings at worst.
async fn broadcast_checks(client: &Client, report: &mut Report) -> Result<(), tokio_postgres::Error> {
    use crate::realtime::messages::PUBLICATION;
    let setup = "run `walcast setup` (as a superuser): it creates what is missing and never replaces what exists";
    let row = client
        .query_one(
            "select (select c.relkind::text from pg_catalog.pg_class c where c.oid = to_regclass('realtime.messages')),
                    to_regprocedure('realtime.send(jsonb, text, text, boolean)') is not null,
                    exists (select 1 from pg_catalog.pg_publication where pubname = $1),
                    exists (select 1 from pg_catalog.pg_publication p
                              join pg_catalog.pg_publication_rel r on r.prpubid = p.oid
                             where p.pubname = $1 and p.pubviaroot and p.pubinsert
                               and r.prrelid = to_regclass('realtime.messages')),
                    'messages_' || to_char((now() at time zone 'utc')::date, 'YYYY_MM_DD'),
                    to_regclass('realtime.' || quote_ident('messages_' ||
                        to_char((now() at time zone 'utc')::date, 'YYYY_MM_DD'))) is not null",
            &[&PUBLICATION],
        )
        .await?;
    let kind: Option<String> = row.get(0);
    let (send, publication, publishes, today, has_today): (bool, bool, bool, String, bool) =
        (row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    let check = "broadcast from database";
    match kind.as_deref() {
        None => {
            report.warn(check, "realtime.messages does not exist: Broadcast from Database is off", setup);
            return Ok(());
        }
        Some("p") => report.ok(check, "realtime.messages exists, partitioned by day"),
        Some(_) => report.warn(
            check,
            "realtime.messages exists but is not partitioned: walcast keeps no partitions for it",
            "Supabase's and walcast's realtime.messages are partitioned by range on inserted_at",
        ),
    }
    if send {
        report.ok("realtime.send", "exists");
    } else {
        report.warn("realtime.send", "realtime.send(jsonb, text, text, boolean) does not exist", setup);
    }
    match (publication, publishes) {
        (true, true) => report.ok(
            format!("publication {PUBLICATION}"),
            "publishes realtime.messages inserts via the partition root; walcast streams it on its slot",
        ),
        (true, false) => report.warn(
            format!("publication {PUBLICATION}"),
            "exists but does not publish realtime.messages inserts via the partition root",
            format!(
                "drop publication {PUBLICATION}; then create publication {PUBLICATION} for table realtime.messages \
                 with (publish = 'insert', publish_via_partition_root = true);"
            ),
        ),
        (false, _) => report.warn(
            format!("publication {PUBLICATION}"),
            "does not exist: realtime.messages rows are not broadcast",
            setup,
        ),
    }
    // Private channels: the probes insert as walcast (bypassing RLS) and
    // read back as the user.
    let row = client
        .query_one(
            "select has_table_privilege('realtime.messages', 'insert'),
                    has_table_privilege('realtime.messages', 'select'),
                    (select rolsuper or rolbypassrls from pg_catalog.pg_roles where rolname = current_user)
                    or (select c.relowner = (select oid from pg_catalog.pg_roles where rolname = current_user)
                          from pg_catalog.pg_class c where c.oid = to_regclass('realtime.messages')),
                    current_user",
            &[],
        )
        .await?;
    let (insert, select, bypass, me): (bool, bool, bool, String) = (row.get(0), row.get(1), row.get(2), row.get(3));
    match (insert && select, bypass) {
        (true, true) => report.ok("private channels", "walcast may probe realtime.messages as the policies' judge"),
        (false, _) => report.warn(
            "private channels",
            "walcast may not insert into or read realtime.messages: every private join is refused",
            format!("grant select, insert on realtime.messages to {};", quote_ident(&me)),
        ),
        (true, false) => report.warn(
            "private channels",
            "walcast's role is subject to RLS on realtime.messages: its probes fail and every private join is refused",
            format!("alter role {} bypassrls;", quote_ident(&me)),
        ),
    }
    if kind.as_deref() == Some("p") {
        if has_today {
            report.ok("realtime.messages partition", format!("realtime.{today} (today, UTC) exists"));
        } else {
            report.warn(
                "realtime.messages partition",
                format!("realtime.{today} (today, UTC) is missing: realtime.send only warns and nothing is sent"),
                "start `walcast serve`: it creates the partitions yesterday … today+3 (UTC) at start and every hour",
            );
        }
    }
    Ok(())
}

/// `--slot-failover`: refused before PostgreSQL 17; on 17+ whether the
/// slot is (or will be made) a failover slot, and whether the primary names
/// the standby's slot in `synchronized_standby_slots` (without, walcast may
/// be sent changes the standby has not received yet).
async fn failover_check(
    client: &Client,
    settings: &Settings,
    major: i32,
    minor: i32,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let check = "slot failover";
    let min = crate::replication::slot::FAILOVER_MIN_MAJOR as i32;
    if !settings.slot_failover {
        let how = if major >= min {
            "--slot-failover (WALCAST_SLOT_FAILOVER) makes it one".to_owned()
        } else {
            format!("failover slots need PostgreSQL {min}+")
        };
        report.ok(check, format!("off: the slot is not synchronized to standbys ({how})"));
        return Ok(());
    }
    if major < min {
        report.fail(
            check,
            format!("--slot-failover needs PostgreSQL {min} or later; this server is {major}.{minor}"),
            "turn --slot-failover (WALCAST_SLOT_FAILOVER) off, or upgrade PostgreSQL",
        );
        return Ok(());
    }
    let row = client
        .query_one(
            "select (select failover from pg_replication_slots where slot_name = $1), \
             current_setting('synchronized_standby_slots')",
            &[&settings.slot],
        )
        .await?;
    let (failover, standby_slots): (Option<bool>, String) = (row.get(0), row.get(1));
    let slot = match failover {
        Some(true) => format!("{} is a failover slot", settings.slot),
        Some(false) => format!("{} will be made a failover slot at start", settings.slot),
        None => format!("{} will be created as a failover slot", settings.slot),
    };
    if standby_slots.is_empty() {
        report.warn(
            check,
            format!("on: {slot}, but synchronized_standby_slots is empty: walcast may receive changes a standby lacks"),
            "alter system set synchronized_standby_slots = '<the standby's physical slot>'; select pg_reload_conf();",
        );
    } else {
        report.ok(check, format!("on: {slot}; synchronized_standby_slots = {standby_slots}"));
    }
    Ok(())
}

/// Whether walcast's event trigger (`walcast setup`) is installed, and
/// which way policy changes are followed while walcast runs.
async fn policy_change_check(
    client: &Client,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let mode = crate::policy::watch::mode(client).await?;
    let every = settings.policy_poll_interval.as_secs_f64();
    let check = "policy changes";
    match &mode {
        crate::policy::watch::Mode::EventTrigger => {
            report.ok(check, format!("{mode} (every {every} s); the walcast_policy_changes event trigger is installed"))
        }
        crate::policy::watch::Mode::Polling(why) => report.warn(
            check,
            format!("{mode} (every {every} s)"),
            if why.contains("logical messages") {
                "upgrade to PostgreSQL 14 or later, then walcast setup --database-url <url> (as a superuser)"
            } else {
                "walcast setup --database-url <url> (as a superuser) installs the event trigger (sql/walcast/)"
            },
        ),
    }
    Ok(())
}

/// Whether the role may write the replication heartbeat
/// ([`crate::replication::heartbeat`]): `pg_logical_emit_message` executable
/// and a server that writes WAL. Asked of the catalog, so the check stays
/// read-only (calling the function would write WAL). Without it walcast
/// still runs; an idle link is then judged by keepalives alone.
async fn heartbeat_check(
    client: &Client,
    settings: &Settings,
    user: &str,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    if settings.heartbeat_interval.is_none() {
        report.ok("replication heartbeat", "off (--heartbeat-interval 0)");
        return Ok(());
    }
    // The text variant: (boolean, text, text) before PostgreSQL 17, with a
    // defaulted `flush boolean` after; the heartbeat calls it with three.
    let row = client
        .query_one(
            "select coalesce(bool_and(has_function_privilege(p.oid, 'execute')), false), \
             coalesce(min(p.oid::regprocedure::text), 'pg_catalog.pg_logical_emit_message(boolean, text, text)'), \
             pg_is_in_recovery() \
             from pg_catalog.pg_proc p where p.proname = 'pg_logical_emit_message' \
             and p.pronamespace = 'pg_catalog'::regnamespace and p.proargtypes[2] = 'text'::regtype",
            &[],
        )
        .await?;
    let (may_execute, function, in_recovery): (bool, String, bool) = (row.get(0), row.get(1), row.get(2));
    // regprocedure omits the schema on the search path and spaces.
    let function = function.strip_prefix("pg_catalog.").unwrap_or(&function).replace(',', ", ");
    let function = format!("pg_catalog.{function}");
    if in_recovery {
        report.warn(
            "replication heartbeat",
            "the server is a standby: pg_logical_emit_message cannot write WAL here",
            "point walcast at the primary, or turn the heartbeat off with --heartbeat-interval 0",
        );
    } else if !may_execute {
        report.warn(
            "replication heartbeat",
            format!("role {user} may not execute pg_logical_emit_message: no end-to-end heartbeat"),
            format!("grant execute on function {function} to {};", quote_ident(user)),
        );
    } else {
        report.ok("replication heartbeat", format!("role {user} may call pg_logical_emit_message"));
    }
    Ok(())
}

async fn publication_checks(
    client: &Client,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let publication = client
        .query_opt(
            "select pubinsert, pubupdate, pubdelete, pubtruncate from pg_publication where pubname = $1",
            &[&settings.publication],
        )
        .await?;
    let Some(flags) = publication else {
        report.fail(
            "publication",
            format!("publication {} does not exist", settings.publication),
            format!(
                "walcast migrate creates it; or: create publication {} for table public.orders, public.dealer_memberships;",
                quote_ident(&settings.publication)
            ),
        );
        return Ok(());
    };
    let (insert, update, delete): (bool, bool, bool) = (flags.get(0), flags.get(1), flags.get(2));
    if insert && update && delete {
        report.ok("publication", format!("{} publishes insert, update, delete", settings.publication));
    } else {
        report.warn(
            "publication",
            format!(
                "{} does not publish every operation (insert {insert}, update {update}, delete {delete})",
                settings.publication
            ),
            format!(
                "alter publication {} set (publish = 'insert, update, delete, truncate');",
                quote_ident(&settings.publication)
            ),
        );
    }
    let tables = client
        .query(
            "select pt.schemaname::text, pt.tablename::text, c.relreplident::text, c.relrowsecurity \
             from pg_publication_tables pt \
             join pg_namespace n on n.nspname = pt.schemaname \
             join pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename \
             where pt.pubname = $1 order by 1, 2",
            &[&settings.publication],
        )
        .await?;
    if tables.is_empty() {
        report.fail(
            "published tables",
            format!("{} publishes no tables: nothing would stream", settings.publication),
            format!("alter publication {} add table public.orders;", quote_ident(&settings.publication)),
        );
    }
    for row in &tables {
        let (schema, table, identity, rls): (String, String, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let name = format!("{schema}.{table}");
        if identity == "f" {
            report.ok(format!("replica identity {name}"), "full");
        } else {
            report.warn(
                format!("replica identity {name}"),
                "not FULL: UPDATE/DELETE carry only the key, so deletes cannot be routed by dealership or filtered",
                format!("alter table {}.{} replica identity full;", quote_ident(&schema), quote_ident(&table)),
            );
        }
        let _ = rls;
    }
    Ok(())
}

/// Reads the policies as walcast will (with row security off for the
/// membership tables) and reports the plan of every published table and
/// API role: in memory, every row, nothing, or database-evaluated (which
/// this walcast denies), with the fix where there is one.
async fn policy_checks(
    client: &mut Client,
    settings: &Settings,
    report: &mut Report,
) -> Result<(), tokio_postgres::Error> {
    let publications = std::slice::from_ref(&settings.publication);
    let loaded =
        match crate::policy::plan::load_with_budget(client, publications, None, settings.policy_cache_budget).await {
            Ok(l) => l,
            Err(err) => {
                let role = quote_ident(&settings_role(client).await);
                report.fail(
                    "membership table",
                    err.to_string(),
                    format!("alter role {role} bypassrls; (walcast must read every membership row)"),
                );
                return Ok(());
            }
        };
    for table in loaded.policies.tables() {
        let mut roles: Vec<&String> =
            table.roles.keys().filter(|r| ["anon", "authenticated", "service_role"].contains(&r.as_str())).collect();
        roles.sort();
        for role in roles {
            let plan = &table.roles[role];
            let what = format!("plan {}.{} as {role}", table.schema, table.name);
            let line = plan.describe(&table.columns, &loaded.caches);
            match &plan.access {
                crate::policy::Access::Database(_) => report.warn(
                    what,
                    line,
                    "PostgreSQL evaluates each change of this table for this role (one query per distinct claim \
                     set); rewrite the policy in a shape walcast decides in memory (docs/policies.md) to avoid it",
                ),
                _ => report.ok(what, line),
            }
            for w in &plan.warnings {
                report.warn(
                    format!("plan {}.{} as {role}", table.schema, table.name),
                    w.clone(),
                    "see docs/policies.md",
                );
            }
        }
    }
    // Database evaluation runs as the viewer's role: walcast must be able to
    // SET ROLE to the API roles.
    for name in ["anon", "authenticated"] {
        match loaded.policies.role(name) {
            Some(r) if r.settable => report.ok(format!("set role {name}"), "walcast may evaluate policies as it"),
            Some(_) => {
                let me = settings_role(client).await;
                report.warn(
                    format!("set role {name}"),
                    "walcast's role is not a member: policies PostgreSQL must evaluate are withheld from this role",
                    format!("grant {} to {};", quote_ident(name), quote_ident(&me)),
                )
            }
            None => report.warn(format!("set role {name}"), "the role does not exist", "see the README's role recipe"),
        }
    }
    report.ok(
        "membership table",
        format!("{} cache(s), {} rows read", loaded.caches.specs().len(), loaded.caches.rows()),
    );
    for (cache, rows, bytes, over) in loaded.caches.summary() {
        if over {
            report.warn(
                format!("cache {cache}"),
                format!(
                    "over the {} byte budget: dropped, its tables are evaluated by the database",
                    settings.policy_cache_budget
                ),
                "raise --policy-cache-budget (POLICY_CACHE_BUDGET_BYTES)",
            );
        } else {
            report.ok(format!("cache {cache}"), format!("{rows} rows, about {bytes} bytes"));
        }
    }
    Ok(())
}

/// The role walcast connects as (for fixes).
async fn settings_role(client: &Client) -> String {
    client.query_one("select current_user::text", &[]).await.map(|r| r.get(0)).unwrap_or_else(|_| "walcast".into())
}
