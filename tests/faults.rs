//! Faults with real processes and a real PostgreSQL (docs/operations.md §3
//! and §4): `walcast serve` runs as a child process (`support::relay`), a
//! writer task commits single-row orders at a steady rate, and each test
//! breaks something under that load.
//!
//! 1. `kill -9` of walcast, writes while it is down, a restart: every
//!    committed transaction is handled (the hub's per-transaction debug
//!    event, by xid) before the kill or after the restart.
//! 2. The walsender terminated 20 times: walcast reconnects each time and a
//!    `service_role` client that stays connected receives every order.
//! 3. PostgreSQL restarted (`pg_ctl restart -m fast`) on a cluster of the
//!    test's own: walcast resumes, the client receives every order.
//! 4. Definite errors — the slot dropped between reconnects, the publication
//!    dropped, REPLICATION revoked, and a role that row level security hides
//!    memberships from: the process exits with status 1 and an error naming
//!    what happened and the fix (logged, and printed last), and the fix
//!    works.
//! 5. The network path silently stopped (a proxy that forwards nothing and
//!    closes nothing): walcast notices within its replication timeout,
//!    `/ready` and the metrics say so, and once packets flow it reconnects
//!    and the client receives every order once; and an idle link with the
//!    heartbeat off is not mistaken for a silent one.
//!
//! Tests that do not restart or reconfigure PostgreSQL use a database of the
//! shared scratch server and a slot of their own; the restart test starts
//! its own cluster. Every wait has a deadline ([`WAIT`]).
//!
//! Figures (writes, duplicates, reconnects, times) are printed; run with
//! `--nocapture` to see them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use uuid::Uuid;
use walcast::cluster::{Cluster, ClusterConfig};
use walcast::schema::{self, Migrations};

use crate::support::load::{connect, poll, slot_state, write_order, ChangeWitness, OrderWriter, Write, ROW_VALUE};
use crate::support::relay::{ReadyProbe, RelayProcess};
use crate::support::server::SECRET;
use crate::support::{add_member, create_dealership, create_user, migrated_db, sqlstate};

/// How long any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(30);

/// xid → whether it was in the catch-up window, from a relay's
/// "transaction handled" events.
pub(crate) fn handled(relay: &RelayProcess) -> HashMap<u32, bool> {
    relay
        .events_named("transaction handled")
        .iter()
        .map(|e| {
            let xid = e["fields"]["xid"].as_u64().expect("xid") as u32;
            (xid, e["fields"]["catch_up"].as_bool().unwrap_or(false))
        })
        .collect()
}

/// The "streaming" events (one per (re)connection) with their walsender pids.
pub(crate) fn streaming_pids(relay: &RelayProcess) -> Vec<i64> {
    relay.events_named("streaming").iter().map(|e| e["fields"]["pid"].as_i64().unwrap_or(-1)).collect()
}

pub(crate) async fn terminate(client: &Client, pid: i32) {
    client.execute("select pg_terminate_backend($1)", &[&pid]).await.expect("pg_terminate_backend");
}

/// The walsender pid streaming `slot`, once it is not `previous`.
pub(crate) async fn new_walsender(client: &Client, slot: &str, previous: Option<i32>) -> i32 {
    poll("a new walsender on the slot", WAIT, || async move {
        slot_state(client, slot).await.and_then(|s| s.active_pid).filter(|pid| Some(*pid) != previous)
    })
    .await
}

/// Waits for the relay to exit; checks it failed and that its final
/// `walcast: …` line (what the operator sees) carries every needle. Returns
/// that line.
pub(crate) async fn expect_exit(relay: &mut RelayProcess, needles: &[&str]) -> String {
    let status = relay.wait_exit(WAIT).await.unwrap_or_else(|| panic!("walcast kept running:\n{}", relay.output()));
    assert_eq!(status.code(), Some(1), "a definite error exits with status 1\n{}", relay.output());
    let last = relay
        .plain_stderr()
        .into_iter()
        .rfind(|l| l.starts_with("walcast: "))
        .unwrap_or_else(|| panic!("no final error line:\n{}", relay.output()));
    for needle in needles {
        assert!(last.contains(needle), "{needle:?} is not in the final error line: {last}");
    }
    assert_no_values(relay);
    last
}

/// The logs hold no row values and no secret (the hub logs each transaction
/// at debug in these tests).
fn assert_no_values(relay: &RelayProcess) {
    let leaked = relay.stderr_lines().into_iter().find(|l| l.contains(ROW_VALUE) || l.contains(SECRET));
    assert!(leaked.is_none(), "row values or secrets in the logs: {leaked:?}");
}

/// [`expect_exit`] for a definite replication error: it is also logged, once,
/// as the `replication stopped` error event with the same needles.
async fn expect_definite_exit(relay: &mut RelayProcess, needles: &[&str]) -> String {
    let last = expect_exit(relay, needles).await;
    let logged: Vec<String> = relay
        .events_named("replication stopped")
        .iter()
        .filter(|e| e["level"] == "ERROR")
        .filter_map(|e| e["fields"]["error"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(logged.len(), 1, "one `replication stopped` error event:\n{}", relay.output());
    for needle in needles {
        assert!(logged[0].contains(needle), "{needle:?} is not in the logged error: {}", logged[0]);
    }
    last
}

/// What `GET /ready` said around a definite error, checked when the build
/// has it (one without answers 404): ready before the fault; once it turned
/// 503 it never said 200 again; a `replication failed` reason carries the
/// needles. `must_see` (faults that cut the walsender first: a `disconnected`
/// phase of at least the first backoff precedes the failure) requires a 503
/// to have been seen; otherwise the failure can end the process within
/// milliseconds of `/ready` turning 503. Returns a summary for the report.
fn check_ready(probe: &ReadyProbe, needles: &[&str], must_see: bool) -> String {
    let answers = probe.answers();
    assert!(!answers.is_empty(), "/ready (or its 404) answered before the fault");
    if answers[0].status == 404 {
        return "no /ready on this build (404)".to_owned();
    }
    assert_eq!(answers[0].status, 200, "ready before the fault: {}", answers[0].body);
    let Some(first) = answers.iter().position(|a| a.status == 503) else {
        assert!(!must_see, "/ready never said 503 before the process exited: {answers:?}");
        return format!("/ready: {} answers, all 200 (the failure window was missed)", answers.len());
    };
    let after = &answers[first..];
    assert!(after.iter().all(|a| a.status == 503), "/ready said 200 again after 503: {after:?}");
    let failed: Vec<&str> =
        after.iter().map(|a| a.body.as_str()).filter(|b| b.contains("replication failed")).collect();
    for body in &failed {
        for needle in needles {
            let escaped = serde_json::to_string(needle).unwrap();
            let escaped = &escaped[1..escaped.len() - 1];
            assert!(body.contains(escaped), "{needle:?} is not in the /ready reason: {body}");
        }
    }
    let last = failed.last().copied().unwrap_or(after[after.len() - 1].body.as_str());
    format!("/ready: 200, then 503 ×{} ({} with the failure), last: {last}", after.len(), failed.len())
}

/// Runs `walcast check` against `url`; returns (success, stdout).
pub(crate) async fn walcast_check(url: &str, slot: &str) -> (bool, String) {
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .env_clear()
        .args(["check", "--database-url", url, "--jwt-secret", SECRET, "--slot", slot])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, check).await.expect("walcast check finishes").expect("run walcast check");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Rows of the membership load a relay logged.
fn memberships_loaded(relay: &RelayProcess) -> u64 {
    relay
        .events()
        .iter()
        .find(|e| e["fields"]["message"].as_str().is_some_and(|m| m.starts_with("memberships loaded")))
        .and_then(|e| e["fields"]["rows"].as_u64())
        .unwrap_or_else(|| panic!("no membership load logged:\n{}", relay.output()))
}

/// A dealership with a member, for the writer.
pub(crate) async fn fixture(client: &Client, code: &str) -> (Uuid, Uuid) {
    let dealership = create_dealership(client, code).await;
    let user = create_user(client, &format!("{}@example.com", code.to_lowercase())).await;
    add_member(client, user, dealership, "admin").await;
    (dealership, user)
}

/// Writes `n` orders now; returns their ids.
pub(crate) async fn write_now(client: &Client, (dealership, user): (Uuid, Uuid), n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(write_order(client, dealership, user).await.expect("write").id);
    }
    ids
}

/// A fresh walcast relay on `url` serves a `service_role` client that
/// receives new orders.
async fn assert_streams(relay: &RelayProcess, client: &Client, fixture: (Uuid, Uuid)) {
    let witness = ChangeWitness::subscribe(relay.addr).await;
    let fresh = write_now(client, fixture, 5).await;
    let missing = witness.wait_for(&fresh, WAIT).await;
    assert!(missing.is_empty(), "{} of 5 new orders did not arrive:\n{}", missing.len(), relay.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_then_restart_loses_no_committed_transaction() {
    const WRITES: usize = 300;
    let (db, client) = migrated_db().await;
    let fx = fixture(&client, "KILL").await;
    let slot = format!("{}_k", db.name());
    let mut first = RelayProcess::start(db.url(), &slot).await;
    let writer = OrderWriter::spawn(db.url(), fx.0, fx.1, Duration::from_millis(8), Some(WRITES));
    writer.wait_count(WRITES / 3, WAIT).await;
    // Mid-way, once the slot has confirmed some of the writes (status
    // updates go out about once a second).
    let early = writer.written()[WRITES / 6].lsn;
    let confirmed = poll("the slot confirming early writes", WAIT, || async {
        slot_state(&client, &slot).await.and_then(|s| s.confirmed).filter(|c| *c > early)
    })
    .await;
    // Then somewhere between two status updates.
    writer.wait_count(writer.count() + 40, WAIT).await;

    first.kill9();
    let killed = Instant::now();
    let at_kill = writer.count();
    // Keep writing while walcast is down.
    writer.wait_count(at_kill + WRITES / 5, WAIT).await;
    // Every write completed by now was committed while walcast was down.
    let while_down = writer.count();
    let mut second = RelayProcess::spawn(db.url(), &slot, &[]);
    second.wait_serving().await;
    // The earliest client possible: it connects as soon as the listener is
    // bound, which is after the backlog was replayed.
    let early = ChangeWitness::subscribe(second.addr).await;
    let subscribed = writer.count();
    let down_for = killed.elapsed();
    let at_restart = writer.count();
    let writes = writer.join(WAIT * 2).await;
    assert_eq!(writes.len(), WRITES);
    let last = writes.iter().map(|w| w.lsn).max().unwrap();

    // The slot moves past the last write only once walcast handled it.
    let caught_up = Instant::now();
    poll("confirmed_flush_lsn past the last write", WAIT, || async {
        slot_state(&client, &slot).await.and_then(|s| s.confirmed).filter(|c| *c > last)
    })
    .await;
    let catch_up_time = caught_up.elapsed();

    let before = handled(&first);
    let after = handled(&second);
    let missing: Vec<&Write> =
        writes.iter().filter(|w| !before.contains_key(&w.xid) && !after.contains_key(&w.xid)).collect();
    assert!(
        missing.is_empty(),
        "{} committed transactions never reached the hub, e.g. {:?}\n{}",
        missing.len(),
        missing.first(),
        second.output()
    );
    let written: HashSet<u32> = writes.iter().map(|w| w.xid).collect();
    let duplicates = after.keys().filter(|x| before.contains_key(x) && written.contains(x)).count();
    let catch_up = after.iter().filter(|(x, c)| **c && written.contains(x)).count();
    // The restarted relay resumed at the slot's position: what the slot had
    // confirmed is not sent again (at most the one write in progress when a
    // keepalive position was confirmed).
    let resent = writes.iter().filter(|w| w.lsn < confirmed && after.contains_key(&w.xid)).count();
    assert!(resent <= 1, "{resent} transactions the slot had confirmed before the kill were sent again");

    // Changes committed while walcast was down reach a client only if it
    // subscribed while the backlog was still being replayed (the listener
    // binds once streaming started, not once the backlog is done), and then
    // only in the catch-up window, which serves service_role alone; the
    // writes after it subscribed (but one that may have been in flight) all
    // arrive.
    let got: HashSet<Uuid> = early.ids().into_iter().collect();
    let down: Vec<&Write> = writes[at_kill..while_down].iter().collect();
    let reached: Vec<&&Write> = down.iter().filter(|w| got.contains(&w.id)).collect();
    for write in &reached {
        assert_eq!(after.get(&write.xid), Some(&true), "a change of the downtime reached a client outside catch-up");
    }
    // Empty when the writer finished before the client subscribed (a slow
    // restart on a loaded machine).
    let later: Vec<Uuid> = writes[(subscribed + 1).min(writes.len())..].iter().map(|w| w.id).collect();
    let missing = early.wait_for(&later, WAIT).await;
    assert!(missing.is_empty(), "{} of {} orders after the subscription missing", missing.len(), later.len());
    // A service_role client of the restarted relay receives new changes.
    assert_streams(&second, &client, fx).await;
    assert!(second.is_running());
    assert_no_values(&first);
    assert_no_values(&second);
    println!(
        "kill -9: {} of the {} changes committed while down reached the earliest (service_role) client, all in \
         the catch-up window",
        reached.len(),
        down.len()
    );
    println!(
        "kill -9: {WRITES} writes; {at_kill} before the kill, {} while down ({:.2} s, restart to serving {:.2} s); \
         handled before the kill {}, after the restart {} ({} in the catch-up window); duplicates {duplicates}; \
         missing 0; slot past the last write {:.2} s after the writer finished",
        at_restart - at_kill,
        down_for.as_secs_f64(),
        second.startup.as_secs_f64(),
        before.keys().filter(|x| written.contains(x)).count(),
        after.keys().filter(|x| written.contains(x)).count(),
        catch_up,
        catch_up_time.as_secs_f64(),
    );
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_terminated_20_times_under_load_the_client_misses_nothing() {
    const KILLS: usize = 20;
    let (db, client) = migrated_db().await;
    let fx = fixture(&client, "TERM").await;
    let slot = format!("{}_t", db.name());
    let mut relay = RelayProcess::start(db.url(), &slot).await;
    let witness = ChangeWitness::subscribe(relay.addr).await;
    let writer = OrderWriter::spawn(db.url(), fx.0, fx.1, Duration::from_millis(5), None);

    let mut pids = vec![new_walsender(&client, &slot, None).await];
    let mut reconnects = Vec::new();
    let mut confirmed = Vec::new();
    for _ in 0..KILLS {
        // Stream under load for a moment, then cut the walsender.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let pid = *pids.last().unwrap();
        confirmed.push(slot_state(&client, &slot).await.and_then(|s| s.confirmed).expect("the slot"));
        terminate(&client, pid).await;
        let cut = Instant::now();
        pids.push(new_walsender(&client, &slot, Some(pid)).await);
        reconnects.push(cut.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let writer_errors = writer.errors();
    let writes = writer.finish().await;
    let expected: Vec<Uuid> = writes.iter().map(|w| w.id).collect();
    let missing = witness.wait_for(&expected, WAIT).await;
    assert!(missing.is_empty(), "{} of {} orders never arrived\n{}", missing.len(), expected.len(), relay.output());

    let received = witness.ids();
    let unique: HashSet<&Uuid> = received.iter().collect();
    let duplicates = received.len() - unique.len();
    assert!(relay.is_running(), "walcast exited:\n{}", relay.output());
    assert!(!witness.closed(), "the client stayed connected");
    assert_no_values(&relay);
    let distinct: HashSet<i32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), KILLS + 1, "a new walsender each time: {pids:?}");
    let logged = streaming_pids(&relay);
    assert_eq!(logged.len(), KILLS + 1, "one `streaming` log per connection: {logged:?}");
    let interrupted = relay.events_named("replication interrupted; reconnecting").len();
    assert!(interrupted >= KILLS, "{interrupted} reconnect warnings for {KILLS} terminations");
    let skipped = relay.events_named("transaction already handled; skipped").len();
    // Each new connection reports at once what the last one acknowledged:
    // the slot moves although no connection lives for a status interval,
    // and a reconnect replays about what the previous connection handled.
    let moved = confirmed.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(moved >= KILLS / 2, "the slot moved at only {moved} of {} reconnects: {confirmed:?}", KILLS - 1);
    assert!(skipped <= 2 * writes.len(), "{skipped} replayed transactions for {} writes", writes.len());
    let max = reconnects.iter().max().unwrap();
    let mean = reconnects.iter().sum::<Duration>() / reconnects.len() as u32;
    println!(
        "walsender terminated {KILLS} times: {} writes, all received by the client ({} frames, {duplicates} \
         duplicates); {} walsender pids, {} `streaming` logs, {interrupted} reconnect warnings, {skipped} \
         replayed transactions skipped by the hub, the slot moved at {moved} of {} reconnects; reconnect \
         mean {:.0} ms, max {:.0} ms; {} writer errors",
        writes.len(),
        received.len(),
        distinct.len(),
        logged.len(),
        KILLS - 1,
        mean.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        writer_errors,
    );
    relay.stop();
}

async fn own_cluster() -> Cluster {
    tokio::task::spawn_blocking(|| Cluster::start(ClusterConfig::ephemeral().setting("wal_level", "logical")))
        .await
        .unwrap()
        .expect("a cluster of the test's own")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_the_relay_it_resumes() {
    let cluster = own_cluster().await;
    let url = cluster.url("postgres");
    let mut client = connect(&url).await.unwrap();
    schema::migrate(&mut client, &Migrations::embedded()).await.unwrap();
    let fx = fixture(&client, "RESTART").await;
    let mut relay = RelayProcess::start(&url, "walcast_restart").await;
    let witness = ChangeWitness::subscribe(relay.addr).await;
    let writer = OrderWriter::spawn(&url, fx.0, fx.1, Duration::from_millis(10), None);
    writer.wait_count(30, WAIT).await;

    let connections = streaming_pids(&relay).len();
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.restart().map(|()| cluster)
    })
    .await
    .unwrap()
    .expect("pg_ctl restart -m fast");
    let restart_took = started.elapsed();
    let restarted = Instant::now();
    poll("walcast streaming again", WAIT, || async { (streaming_pids(&relay).len() > connections).then_some(()) })
        .await;
    let resumed_after = restarted.elapsed();
    let at_restart = writer.written().iter().filter(|w| w.at >= restarted).count();
    let n = writer.count();
    writer.wait_count(n + 30, WAIT).await;
    let writes = writer.finish().await;
    let after = writes.iter().filter(|w| w.at >= restarted).count();
    assert!(after >= 30, "writes after the restart: {after}");
    let expected: Vec<Uuid> = writes.iter().map(|w| w.id).collect();
    let missing = witness.wait_for(&expected, WAIT).await;
    assert!(missing.is_empty(), "{} of {} orders never arrived\n{}", missing.len(), expected.len(), relay.output());
    assert!(relay.is_running(), "walcast exited:\n{}", relay.output());
    assert!(!witness.closed(), "the client stayed connected");
    assert_no_values(&relay);
    let received = witness.ids();
    let duplicates = received.len() - received.iter().collect::<HashSet<_>>().len();
    println!(
        "PostgreSQL restart: pg_ctl restart took {:.2} s; walcast streaming again {:.2} s after it returned \
         ({} reconnect warnings); {} writes ({} after the restart, {at_restart} of them before walcast resumed), \
         all received, {duplicates} duplicates",
        restart_took.as_secs_f64(),
        resumed_after.as_secs_f64(),
        relay.events_named("replication interrupted; reconnecting").len(),
        writes.len(),
        after,
    );
    relay.stop();
    drop(client);
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_between_reconnects_is_a_definite_error() {
    let (db, client) = migrated_db().await;
    let fx = fixture(&client, "SLOT").await;
    let slot = format!("{}_d", db.name());
    let mut relay = RelayProcess::start(db.url(), &slot).await;
    let witness = ChangeWitness::subscribe(relay.addr).await;
    let probe = ReadyProbe::start(relay.addr);
    poll("a /ready answer", WAIT, || async { (!probe.answers().is_empty()).then_some(()) }).await;
    let deadline = Instant::now() + WAIT;
    let mut attempts = 0;
    loop {
        assert!(Instant::now() < deadline, "could not drop the slot between reconnects");
        attempts += 1;
        if let Some(pid) = slot_state(&client, &slot).await.and_then(|s| s.active_pid) {
            terminate(&client, pid).await;
        }
        match client.execute("select pg_drop_replication_slot($1)", &[&slot]).await {
            Ok(_) => break,
            Err(err) if sqlstate(&err) == "55006" => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(err) => panic!("drop slot: {err}"),
        }
    }
    let line = expect_definite_exit(&mut relay, &[&format!("replication slot \"{slot}\""), "42704", "fix: "]).await;
    assert!(line.contains("restart walcast to recreate it"), "{line}");
    assert_eq!(witness.wait_closed(WAIT).await, Some(1001), "sockets are closed as the server goes away");
    let ready = check_ready(&probe, &[&format!("replication slot \"{slot}\"")], true);
    println!("slot dropped ({attempts} terminate/drop rounds): {line}; {ready}");

    // The fix: a restart recreates the slot and streams again.
    let again = RelayProcess::start(db.url(), &slot).await;
    let created = again.events_named("streaming");
    assert_eq!(created[0]["fields"]["created"], true, "the restart recreated the slot");
    assert_streams(&again, &client, fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_dropped_is_a_definite_error() {
    let (db, client) = migrated_db().await;
    let fx = fixture(&client, "PUB").await;
    let slot = format!("{}_p", db.name());
    let mut relay = RelayProcess::start(db.url(), &slot).await;
    let probe = ReadyProbe::start(relay.addr);
    poll("a /ready answer", WAIT, || async { (!probe.answers().is_empty()).then_some(()) }).await;
    client.batch_execute("drop publication supabase_realtime").await.unwrap();
    // pgoutput notices when it decodes the next published change.
    write_now(&client, fx, 1).await;
    let line =
        expect_definite_exit(&mut relay, &["publication \"supabase_realtime\" does not exist", "42704", "fix: "]).await;
    let ready = check_ready(&probe, &["publication \"supabase_realtime\" does not exist"], false);
    println!("publication dropped: {line}; {ready}");

    let version: i32 = client.query_one("select current_setting('server_version_num')::int", &[]).await.unwrap().get(0);
    client
        .batch_execute("create publication supabase_realtime for table public.orders, public.dealer_memberships")
        .await
        .unwrap();
    if version < 180_000 {
        // PostgreSQL before 18 decodes each change with the catalog as of
        // that change: the change written while the publication was missing
        // fails again, recreated publication or not. The fix must say so.
        let mut again = RelayProcess::spawn(db.url(), &slot, &[]);
        let second = expect_definite_exit(&mut again, &["publication \"supabase_realtime\" does not exist"]).await;
        println!("after recreating the publication: {second}");
        assert!(line.contains("pg_drop_replication_slot"), "the fix names the slot drop: {line}");
    }
    // The fix: drop the slot (once its walsender is gone), restart.
    poll("the slot dropped", WAIT, || async {
        client.execute("select pg_drop_replication_slot($1)", &[&slot]).await.ok().map(|_| ())
    })
    .await;
    let again = RelayProcess::start(db.url(), &slot).await;
    assert_streams(&again, &client, fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_revoked_is_a_definite_error() {
    let (db, client) = migrated_db().await;
    let fx = fixture(&client, "PRIV").await;
    let role = format!("walcast_r_{}", &Uuid::new_v4().simple().to_string()[..12]);
    // The scratch cluster trusts local connections; a password keeps this
    // working against a TEST_DATABASE_URL server that asks for one.
    let password = "faults-role-pw";
    let url = format!("postgres://{role}:{password}@{}", db.url().split_once('@').expect("user@host").1);
    let slot = format!("{}_r", db.name());

    // A role with REPLICATION and SELECT on the memberships only: row level
    // security would show it none of them. `check` says so, and `serve`
    // refuses to start rather than serve users nothing.
    client
        .batch_execute(&format!(
            "create role {role} with login replication password '{password}'; \
             grant select on public.dealer_memberships to {role};"
        ))
        .await
        .unwrap();
    let (ready, report) = walcast_check(&url, &slot).await;
    assert!(!ready, "{report}");
    assert!(report.contains("[FAIL] membership table") && report.contains("bypassrls"), "{report}");
    let mut relay = RelayProcess::spawn(&url, &slot, &[]);
    let line = expect_exit(&mut relay, &["row-level security", "dealer_memberships", "BYPASSRLS"]).await;
    assert!(relay.stderr_lines().iter().all(|l| !l.contains(password)), "the password stays out of the logs");
    let slots: i64 = client
        .query_one("select count(*) from pg_replication_slots where slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the failed start left no slot behind");
    println!("role without BYPASSRLS: {line}");

    // Without membership in the API roles: a warning with the README's grant.
    client.batch_execute(&format!("alter role {role} bypassrls")).await.unwrap();
    let (_, report) = walcast_check(&url, &slot).await;
    assert!(report.contains("[WARN] set role authenticated"), "{report}");
    // The documented role (README, set-up step 4): ready, every membership loaded.
    client.batch_execute(&format!("grant anon, authenticated to {role}")).await.unwrap();
    let (ready, report) = walcast_check(&url, &slot).await;
    assert!(ready, "{report}");
    assert!(report.contains("[ok  ] set role authenticated"), "{report}");
    let mut relay = RelayProcess::start(&url, &slot).await;
    assert_eq!(memberships_loaded(&relay), 1, "the role reads every membership");
    assert_streams(&relay, &client, fx).await;

    // REPLICATION revoked: the running walsender keeps streaming…
    let witness = ChangeWitness::subscribe(relay.addr).await;
    client.batch_execute(&format!("alter role {role} noreplication")).await.unwrap();
    let fresh = write_now(&client, fx, 1).await;
    assert!(witness.wait_for(&fresh, WAIT).await.is_empty(), "streaming goes on until a reconnect");
    assert!(relay.is_running());
    // …until it is cut: the reconnect is refused.
    let probe = ReadyProbe::start(relay.addr);
    poll("a /ready answer", WAIT, || async { (!probe.answers().is_empty()).then_some(()) }).await;
    let pid = new_walsender(&client, &slot, None).await;
    terminate(&client, pid).await;
    let line = expect_definite_exit(&mut relay, &["42501", "replication", "fix: ", "ALTER ROLE", "REPLICATION"]).await;
    let ready = check_ready(&probe, &["42501", "ALTER ROLE"], true);
    println!("REPLICATION revoked: {line}; {ready}");

    // The fix: grant it back, restart.
    client.batch_execute(&format!("alter role {role} replication")).await.unwrap();
    let again = RelayProcess::start(&url, &slot).await;
    assert_streams(&again, &client, fx).await;
    drop(again);
    let _ = client.batch_execute(&format!("drop owned by {role}; drop role {role}")).await;
}

/// The value of the first sample of `name` in `/metrics` (any labels).
async fn metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = crate::support::relay::try_get(addr, "/metrics").await?;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// 5. The network path to PostgreSQL goes silent (a proxy of the test's
///    own stops forwarding, closing nothing): walcast notices within its
///    replication timeout, says so on `/ready` and in the metrics meanwhile,
///    reconnects once packets flow again, and the client receives every
///    order written meanwhile (written directly, not through the proxy)
///    exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_network_path_is_noticed_reported_and_reconnected_without_loss() {
    use crate::support::proxy::{upstream_of, Proxy};
    use crate::support::relay::try_get;
    /// The configured deadline; the ceilings below are generous multiples.
    const TIMEOUT: Duration = Duration::from_secs(3);
    const SILENT_FOR: Duration = Duration::from_secs(6);
    let (db, client) = migrated_db().await;
    let fx = fixture(&client, "SILENT").await;
    let slot = format!("{}_s", db.name());
    let proxy = Proxy::start(upstream_of(db.url())).await;
    let mut relay = RelayProcess::spawn(
        &proxy.url_via(db.url()),
        &slot,
        &["--replication-timeout", "3", "--heartbeat-interval", "0.5"],
    );
    relay.wait_serving().await;
    let addr = relay.addr;
    let witness = ChangeWitness::subscribe(addr).await;
    let writer = OrderWriter::spawn(db.url(), fx.0, fx.1, Duration::from_millis(20), None);
    writer.wait_count(20, WAIT).await;
    // Heartbeats make the round trip before the fault.
    poll("heartbeats received back through the slot", WAIT, || async {
        metric(addr, "walcast_replication_heartbeats_received_total").await.filter(|n| *n >= 2.0)
    })
    .await;
    let before = try_get(addr, "/ready").await.expect("/ready answers");
    assert_eq!(before.0, 200, "ready before the fault: {}", before.1);

    proxy.pause();
    let paused = Instant::now();
    // /ready stops saying 200 within the deadline (it fails on the lag
    // first, from half the deadline, then on the disconnection).
    let not_ready = poll("/ready to turn 503 on the silent link", WAIT, || async {
        try_get(addr, "/ready").await.filter(|(status, _)| *status == 503).map(|_| paused.elapsed())
    })
    .await;
    let detected = poll("the silent link dropped", WAIT, || async {
        relay
            .events_named("replication interrupted; reconnecting")
            .iter()
            .any(|e| e["fields"]["error"].as_str().is_some_and(|m| m.contains("no message from the walsender")))
            .then(|| paused.elapsed())
    })
    .await;
    // Silence counts from the last message received, which may have been
    // in flight when the proxy paused.
    assert!(
        detected + Duration::from_secs(1) >= TIMEOUT,
        "dropped after {detected:?}, before the {TIMEOUT:?} deadline"
    );
    assert!(detected < TIMEOUT * 3, "dropped only after {detected:?} (deadline {TIMEOUT:?})");
    assert!(not_ready < detected + Duration::from_secs(1), "/ready 503 after {not_ready:?}, drop after {detected:?}");
    // While the path stays silent: not ready, the lag counts from the last
    // message received, and the slot is not reported active.
    let (status, body) = try_get(addr, "/ready").await.expect("/ready answers");
    assert_eq!(status, 503, "{body}");
    let lag = metric(addr, "walcast_replication_lag_seconds").await.expect("lag gauge");
    assert!(lag >= TIMEOUT.as_secs_f64() / 2.0, "lag {lag} s on a link silent for {:?}", paused.elapsed());
    if let Some(active) = metric(addr, "walcast_slot_active").await {
        assert_eq!(active, 0.0, "walcast_slot_active on a silent link");
    }
    let sleep_for = SILENT_FOR.saturating_sub(paused.elapsed());
    tokio::time::sleep(sleep_for).await;
    let connects_before = relay.events_named("streaming").len();

    proxy.resume();
    let resumed = Instant::now();
    poll("/ready 200 again after the path came back", WAIT, || async {
        try_get(addr, "/ready").await.filter(|(status, _)| *status == 200).map(|_| ())
    })
    .await;
    let recovered = resumed.elapsed();
    let writes = writer.finish().await;
    let expected: Vec<Uuid> = writes.iter().map(|w| w.id).collect();
    let missing = witness.wait_for(&expected, WAIT).await;
    assert!(missing.is_empty(), "{} of {} orders never arrived\n{}", missing.len(), expected.len(), relay.output());
    let received = witness.ids();
    let unique: HashSet<&Uuid> = received.iter().collect();
    assert_eq!(received.len(), unique.len(), "duplicates delivered to the client");
    let streaming = relay.events_named("streaming").len();
    assert!(streaming > connects_before, "a new stream after the path came back: {streaming}");
    assert!(!witness.closed(), "the client stayed connected");
    assert!(relay.is_running(), "walcast exited:\n{}", relay.output());
    assert_no_values(&relay);
    let errors = metric(addr, "walcast_replication_heartbeat_errors_total").await.unwrap_or(0.0);
    let interruptions = metric(addr, "walcast_replication_interruptions_total").await.unwrap_or(0.0);
    assert!(interruptions >= 1.0, "{interruptions} interruptions counted");
    println!(
        "silent path: {} writes, all received once; /ready 503 after {:.2} s, link dropped after {:.2} s \
         (deadline {:.0} s); path silent {:.1} s; ready again {:.2} s after it came back; {streaming} streams, \
         {interruptions} interruptions, {errors} heartbeat errors, {} proxy connections",
        writes.len(),
        not_ready.as_secs_f64(),
        detected.as_secs_f64(),
        TIMEOUT.as_secs_f64(),
        SILENT_FOR.as_secs_f64(),
        recovered.as_secs_f64(),
        proxy.accepted(),
    );
    relay.stop();
}

/// The other side of the silence deadline: an idle database with the
/// heartbeat off sends nothing on its own, yet the link is not dropped,
/// because the status update asks the walsender for a keepalive after a
/// third of the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_link_without_heartbeats_is_kept_by_keepalive_requests() {
    use crate::support::relay::try_get;
    const TIMEOUT_SECS: u64 = 2;
    let (db, _client) = migrated_db().await;
    let slot = format!("{}_i", db.name());
    let mut relay = RelayProcess::spawn(db.url(), &slot, &["--replication-timeout", "2", "--heartbeat-interval", "0"]);
    relay.wait_serving().await;
    // Three deadlines of an idle publication.
    tokio::time::sleep(Duration::from_secs(3 * TIMEOUT_SECS)).await;
    let interrupted = relay.events_named("replication interrupted; reconnecting");
    assert!(interrupted.is_empty(), "an idle healthy link was dropped: {interrupted:?}");
    let (status, body) = try_get(relay.addr, "/ready").await.expect("/ready answers");
    assert_eq!(status, 200, "{body}");
    let sent = metric(relay.addr, "walcast_replication_heartbeats_sent_total").await;
    assert_eq!(sent, Some(0.0), "the heartbeat is off");
    let messages = metric(relay.addr, "walcast_replication_messages_total").await.unwrap_or(0.0);
    assert!(messages >= 2.0, "keepalives answered the requests: {messages} messages");
    relay.stop();
}
