//! Policies, privileges and roles changed while walcast runs: with the event
//! trigger (`walcast setup`) a change applies to every transaction committed
//! after it and to none before (WAL order); role attributes and memberships,
//! and everything without the trigger, are picked up by polling. Deliveries
//! are asserted, not timings: a service_role subscriber marks how far the
//! hub has got.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::config::check::{self, Status};
use walcast::config::{FileConfig, Settings};
use walcast::hub::{Binding, Control, EventMatch, Outbox, OutboxLimits, Subscription, Vsn};
use walcast::policy::{Access, Filter, Viewer};
use walcast::relay::Relay;
use walcast::schema::{self, Migrations};

use crate::policy_differential::{parse_frames, start_relay_with};
use crate::support::{add_member, create_dealership, create_order, create_user, migrated_db};

/// A published table with row level security on and SELECT granted to
/// `authenticated`, but no policy yet.
const NOTES: &str = "
create table public.notes (
    id uuid primary key default gen_random_uuid(),
    owner uuid not null,
    team uuid,
    public boolean not null default false,
    body text not null default 'hello'
);
alter table public.notes replica identity full;
alter table public.notes enable row level security;
grant select on public.notes to authenticated, service_role;
alter publication supabase_realtime add table public.notes;
";

fn subscription(conn: u64, viewer: Viewer, outbox: &Arc<Outbox>) -> Subscription {
    let binding = |id, table: &str| Binding {
        id,
        schema: Some("public".into()),
        table: Some(table.into()),
        event: EventMatch::All,
        filter: Filter::default(),
        select: None,
    };
    Subscription {
        conn,
        topic: "realtime:runtime".into(),
        vsn: Vsn::V2,
        viewer,
        bindings: vec![binding(1, "notes"), binding(2, "orders")],
        outbox: Arc::clone(outbox),
        on_live: None,
        on_withheld: None,
    }
}

/// The relay, a service_role marker and one subscriber per viewer.
struct Setup {
    relay: Relay,
    service: Arc<Outbox>,
    service_frames: Vec<Bytes>,
    viewers: Vec<Arc<Outbox>>,
}

impl Setup {
    async fn start(url: &str, slot: &str, poll: Duration, viewers: Vec<Viewer>) -> Setup {
        let relay = start_relay_with(url, slot, |c| c.policy_poll = poll).await;
        let service = Arc::new(Outbox::new(OutboxLimits::default()));
        relay.hub.send(Control::Join(subscription(100, Viewer::service(), &service))).await.unwrap();
        let mut boxes = Vec::new();
        for (i, viewer) in viewers.into_iter().enumerate() {
            let outbox = Arc::new(Outbox::new(OutboxLimits::default()));
            relay.hub.send(Control::Join(subscription(i as u64, viewer, &outbox))).await.unwrap();
            boxes.push(outbox);
        }
        Setup { relay, service, service_frames: Vec::new(), viewers: boxes }
    }

    /// Waits until the hub has fanned out the change of row `id` (the
    /// service_role subscriber got it); then every viewer's frames for it
    /// (and everything before) are queued.
    async fn reached(&mut self, id: Uuid) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            self.service.try_drain(&mut self.service_frames);
            if parse_frames(&self.service_frames).iter().any(|(_, got, _)| *got == id) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the hub never reached {id}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The row ids viewer `i` received since the last call.
    fn got(&self, i: usize) -> BTreeSet<Uuid> {
        self.records(i).into_iter().map(|r| Uuid::parse_str(r["id"].as_str().unwrap()).unwrap()).collect()
    }

    /// The records viewer `i` received since the last call.
    fn records(&self, i: usize) -> Vec<serde_json::Value> {
        let mut frames = Vec::new();
        self.viewers[i].try_drain(&mut frames);
        frames
            .iter()
            .filter_map(|f| {
                let v: serde_json::Value = serde_json::from_slice(f).unwrap();
                (v[3] == "postgres_changes").then(|| v[4]["data"]["record"].clone())
            })
            .collect()
    }

    /// Waits until the plan of `public.notes` for `role` satisfies `pred`
    /// (a poll's reload was installed).
    async fn plan(&self, role: &str, pred: impl Fn(&Access) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let policies = self.relay.hub.policies();
            let access = policies.table_by_name("public", "notes").and_then(|t| t.role(role)).map(|p| p.access.clone());
            if access.as_ref().is_some_and(&pred) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "plan of notes for {role} stayed {access:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn epoch(client: &Client) -> i64 {
    client.query_one("select epoch from walcast.policy_epoch", &[]).await.unwrap().get(0)
}

async fn note(client: &Client, owner: Uuid, team: Option<Uuid>, public: bool) -> Uuid {
    client
        .query_one(
            "insert into public.notes (owner, team, public) values ($1, $2, $3) returning id",
            &[&owner, &team, &public],
        )
        .await
        .unwrap()
        .get(0)
}

fn set(ids: &[Uuid]) -> BTreeSet<Uuid> {
    ids.iter().copied().collect()
}

fn settings(url: &str) -> Settings {
    let given = FileConfig {
        database_url: Some(url.to_owned()),
        jwt_secret: Some("secret".into()),
        slot_name: Some(format!("check_{}", Uuid::new_v4().simple())),
        ..FileConfig::default()
    };
    Settings::resolve(given, None).expect("valid settings")
}

async fn change_mode(url: &str) -> check::Finding {
    let findings = check::run(&settings(url), &tokio_postgres::Config::from_str(url).unwrap()).await;
    findings.into_iter().find(|f| f.check == "policy changes").expect("a policy changes finding")
}

#[tokio::test]
async fn policies_changed_at_run_time_apply_from_their_commit_in_wal_order() {
    let (db, mut client) = migrated_db().await;
    let report = schema::migrate(&mut client, &Migrations::walcast()).await.expect("walcast setup");
    assert_eq!(
        report.applied,
        vec!["walcast/0001_policy_changes.sql".to_owned(), "walcast/0002_realtime_messages.sql".to_owned()]
    );
    let again = schema::migrate(&mut client, &Migrations::walcast()).await.unwrap();
    assert!(again.applied.is_empty(), "setup twice changes nothing");
    let mode = change_mode(db.url()).await;
    assert_eq!(mode.status, Status::Ok, "{mode}");
    assert!(mode.detail.contains("event trigger"), "{mode}");
    client.batch_execute(NOTES).await.unwrap();
    let (a, b) = (create_user(&client, "a@example.com").await, create_user(&client, "b@example.com").await);
    let d = create_dealership(&client, "RUNTIME").await;
    add_member(&client, a, d, "user").await;
    let team = Uuid::new_v4();

    // Polling every 10 s: nothing below waits for a poll.
    let mut s = Setup::start(
        db.url(),
        &format!("{}_s", db.name()),
        Duration::from_secs(10),
        vec![Viewer::user(a), Viewer::user(b)],
    )
    .await;

    // Created: n1 committed before the policy (and written back to back, so
    // walcast reads the catalog after both) reaches nobody.
    let n1 = note(&client, a, None, false).await;
    client
        .batch_execute(
            "create policy own on public.notes for select to authenticated using (owner = (select auth.uid()))",
        )
        .await
        .unwrap();
    let n2 = note(&client, a, None, false).await;
    let n3 = note(&client, b, None, false).await;
    s.reached(n3).await;
    assert_eq!(s.got(0), set(&[n2]), "a: only what committed after the policy, own rows");
    assert_eq!(s.got(1), set(&[n3]));
    let _ = n1;

    // Altered: n4 (before) under the old expression, n5 and n6 under the new.
    let n4 = note(&client, a, None, true).await;
    client
        .batch_execute("alter policy own on public.notes using (owner = (select auth.uid()) or public)")
        .await
        .unwrap();
    let n5 = note(&client, a, None, true).await;
    let n6 = note(&client, a, None, false).await;
    s.reached(n6).await;
    assert_eq!(s.got(0), set(&[n4, n5, n6]));
    assert_eq!(s.got(1), set(&[n5]), "b: public rows only once the policy says so");

    // Dropped: n7 (before) still reaches its owner, n8 nobody.
    let n7 = note(&client, b, None, false).await;
    client.batch_execute("drop policy own on public.notes").await.unwrap();
    let n8 = note(&client, b, None, true).await;
    s.reached(n8).await;
    assert_eq!(s.got(0), set(&[]));
    assert_eq!(s.got(1), set(&[n7]));

    // A policy naming a membership table created at run time: a new cache,
    // read at the reload, then kept by the WAL.
    client
        .batch_execute(&format!(
            "create table public.team_members (id uuid primary key default gen_random_uuid(), team uuid not null, \
                 user_id uuid not null);
             grant select on public.team_members to authenticated;
             alter publication supabase_realtime add table public.team_members;
             insert into public.team_members (team, user_id) values ('{team}', '{a}');
             create policy team_read on public.notes for select to authenticated
                 using (team in (select tm.team from public.team_members tm where tm.user_id = (select auth.uid())));"
        ))
        .await
        .unwrap();
    s.plan("authenticated", |a| matches!(a, Access::Rows(_))).await;
    let n9 = note(&client, b, Some(team), false).await;
    s.reached(n9).await;
    assert_eq!(s.got(0), set(&[n9]), "a is a member of the team");
    assert_eq!(s.got(1), set(&[]));
    client.execute("insert into public.team_members (team, user_id) values ($1, $2)", &[&team, &b]).await.unwrap();
    let n10 = note(&client, a, Some(team), false).await;
    s.reached(n10).await;
    assert_eq!(s.got(0), set(&[n10]));
    assert_eq!(s.got(1), set(&[n10]), "b joined the team through the WAL-maintained cache");

    // The dealership cache (spec unchanged by every reload) kept its data.
    let order = create_order(&client, d, a, "sales", "pending").await;
    s.reached(order).await;
    assert_eq!(s.got(0), set(&[order]), "orders still reach the dealership's member");
    assert_eq!(s.got(1), set(&[]));
    let reloads = s.relay.hub.stats.policy_reloads.load(Ordering::Relaxed);
    assert!(reloads >= 4, "one reload per policy transaction at least: {reloads}");
    s.relay.stop().await.unwrap();
}

#[tokio::test]
async fn column_grants_and_revokes_at_run_time_narrow_what_arrives() {
    let (db, mut client) = migrated_db().await;
    schema::migrate(&mut client, &Migrations::walcast()).await.expect("walcast setup");
    client.batch_execute(NOTES).await.unwrap();
    client
        .batch_execute("create policy all_rows on public.notes for select to authenticated using (true)")
        .await
        .unwrap();
    let a = create_user(&client, "cols@example.com").await;
    let mut s =
        Setup::start(db.url(), &format!("{}_s", db.name()), Duration::from_secs(10), vec![Viewer::user(a)]).await;

    let n1 = note(&client, a, None, false).await;
    s.reached(n1).await;
    let records = s.records(0);
    assert_eq!(records.len(), 1);
    assert!(records[0].get("body").is_some(), "table-wide SELECT: every column: {}", records[0]);

    client
        .batch_execute(
            "revoke select on public.notes from authenticated; grant select (id, owner) on public.notes to authenticated",
        )
        .await
        .unwrap();
    let n2 = note(&client, a, None, false).await;
    s.reached(n2).await;
    let records = s.records(0);
    assert_eq!(records.len(), 1);
    let keys: BTreeSet<&str> = records[0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "owner"].into_iter().collect(), "only the granted columns");

    client.batch_execute("revoke select (id, owner) on public.notes from authenticated").await.unwrap();
    let n3 = note(&client, a, None, false).await;
    s.reached(n3).await;
    assert!(s.records(0).is_empty(), "no SELECT left: nothing arrives");
    s.relay.stop().await.unwrap();
}

#[tokio::test]
async fn role_membership_and_bypassrls_changes_are_polled() {
    let (db, mut client) = migrated_db().await;
    schema::migrate(&mut client, &Migrations::walcast()).await.expect("walcast setup");
    client.batch_execute(NOTES).await.unwrap();
    client
        .batch_execute(
            "create policy own on public.notes for select to authenticated using (owner = (select auth.uid()))",
        )
        .await
        .unwrap();
    // Roles are cluster-wide: a name of this test's own.
    let role = format!("rt_{}", Uuid::new_v4().simple());
    client.batch_execute(&format!("create role {role} nologin")).await.unwrap();
    let (a, b) = (create_user(&client, "role-a@example.com").await, create_user(&client, "role-b@example.com").await);
    let viewer = Viewer::new(&role, serde_json::json!({"role": role, "sub": a.to_string()}));
    let mut s = Setup::start(db.url(), &format!("{}_s", db.name()), Duration::from_millis(200), vec![viewer]).await;

    let n1 = note(&client, a, None, false).await;
    s.reached(n1).await;
    assert_eq!(s.got(0), set(&[]), "the role has no SELECT yet");

    client.batch_execute(&format!("grant authenticated to {role}")).await.unwrap();
    s.plan(&role, |a| matches!(a, Access::Rows(_))).await;
    let n2 = note(&client, a, None, false).await;
    let n3 = note(&client, b, None, false).await;
    s.reached(n3).await;
    assert_eq!(s.got(0), set(&[n2]), "a member of authenticated: its policies and privileges apply");

    client.batch_execute(&format!("alter role {role} bypassrls")).await.unwrap();
    s.plan(&role, |a| matches!(a, Access::Everything)).await;
    let n4 = note(&client, b, None, false).await;
    s.reached(n4).await;
    assert_eq!(s.got(0), set(&[n4]), "BYPASSRLS: every row");
    s.relay.stop().await.unwrap();
    client.batch_execute(&format!("drop role {role}")).await.unwrap();
}

#[tokio::test]
async fn without_the_trigger_policies_are_polled_and_check_says_so() {
    let (db, client) = migrated_db().await;
    let mode = change_mode(db.url()).await;
    assert_eq!(mode.status, Status::Warn, "{mode}");
    assert!(mode.detail.contains("polling"), "{mode}");
    assert!(mode.fix.as_deref().is_some_and(|f| f.contains("walcast setup")), "{mode}");
    client.batch_execute(NOTES).await.unwrap();
    let a = create_user(&client, "poll@example.com").await;
    let mut s =
        Setup::start(db.url(), &format!("{}_s", db.name()), Duration::from_millis(200), vec![Viewer::user(a)]).await;
    let n1 = note(&client, a, None, false).await;
    s.reached(n1).await;
    assert_eq!(s.got(0), set(&[]));
    client
        .batch_execute("create policy all_rows on public.notes for select to authenticated using (true)")
        .await
        .unwrap();
    s.plan("authenticated", |a| matches!(a, Access::Everything)).await;
    let n2 = note(&client, a, None, false).await;
    s.reached(n2).await;
    assert_eq!(s.got(0), set(&[n2]));
    s.relay.stop().await.unwrap();
}

#[tokio::test]
async fn walcast_setup_installs_the_trigger_once() {
    let (db, client) = crate::support::empty_db().await;
    let run = |url: String| {
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
                .args(["setup", "--database-url", &url])
                .env_remove("DATABASE_URL")
                .output()
                .expect("run walcast");
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.status.success(), text)
        })
    };
    let (ok, out) = run(db.url().to_owned()).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("applied   walcast/0001_policy_changes.sql") && out.contains("2 applied now"), "{out}");
    let (ok, out) = run(db.url().to_owned()).await.unwrap();
    assert!(ok && out.contains("0 applied now, 2 already applied"), "{out}");
    let n: i64 = client
        .query_one("select count(*) from pg_event_trigger where evtname like 'walcast_policy_%'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "ddl_command_end and sql_drop");
    // A role that is not a superuser is told what is needed.
    let role = format!("nosu_{}", Uuid::new_v4().simple());
    client.batch_execute(&format!("create role {role} login password 'pw'")).await.unwrap();
    let (empty, _) = crate::support::empty_db().await;
    client.batch_execute(&format!("grant all on database {} to {role}", empty.name())).await.unwrap();
    let mut config = tokio_postgres::Config::from_str(empty.url()).unwrap();
    config.user(&role).password("pw");
    let (mut other, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let err = schema::migrate(&mut other, &Migrations::walcast()).await.unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(text.contains("needs a superuser"), "{text}");
    drop(other);
    // The trigger counts and reports any role's DDL (security definer).
    let before = epoch(&client).await;
    client.batch_execute(&format!("grant create on schema public to {role}")).await.unwrap();
    let mut config = tokio_postgres::Config::from_str(db.url()).unwrap();
    config.user(&role).password("pw");
    let (owner, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    owner
        .batch_execute(
            "create table public.owned (id int primary key);
             alter table public.owned enable row level security;
             create policy p on public.owned for select using (true);",
        )
        .await
        .unwrap();
    drop(owner);
    assert!(epoch(&client).await >= before + 4, "grant, create table, alter table, create policy counted");
    let empty_admin = empty.connect().await.unwrap();
    empty_admin.batch_execute(&format!("drop owned by {role}")).await.unwrap();
    client.batch_execute(&format!("drop owned by {role}; drop role {role}")).await.unwrap();
}

#[tokio::test]
async fn a_helper_function_redefined_at_run_time_applies_from_its_commit() {
    let (db, mut client) = migrated_db().await;
    schema::migrate(&mut client, &Migrations::walcast()).await.expect("walcast setup");
    client.batch_execute(NOTES).await.unwrap();
    let (a, b) = (create_user(&client, "fn-a@example.com").await, create_user(&client, "fn-b@example.com").await);
    let team = Uuid::new_v4();
    client
        .batch_execute(&format!(
            "create table public.team_members (id uuid primary key default gen_random_uuid(), team uuid not null,
                 user_id uuid not null, active boolean not null);
             alter publication supabase_realtime add table public.team_members;
             insert into public.team_members (team, user_id, active) values ('{team}', '{a}', true), ('{team}', '{b}', false);
             create function public.my_teams() returns setof uuid language sql stable security definer
                 set search_path = '' as $$
                 select tm.team from public.team_members tm where tm.user_id = (select auth.uid()) $$;
             grant execute on function public.my_teams() to authenticated;
             create policy team_read on public.notes for select to authenticated
                 using (team in (select public.my_teams()));"
        ))
        .await
        .unwrap();
    let mut s = Setup::start(
        db.url(),
        &format!("{}_s", db.name()),
        Duration::from_secs(10),
        vec![Viewer::user(a), Viewer::user(b)],
    )
    .await;
    s.plan("authenticated", |a| matches!(a, Access::Rows(_))).await;
    let n1 = note(&client, a, Some(team), false).await;
    s.reached(n1).await;
    client
        .batch_execute(
            "create or replace function public.my_teams() returns setof uuid language sql stable security definer
                 set search_path = '' as $$
                 select tm.team from public.team_members tm where tm.user_id = (select auth.uid()) and tm.active $$;",
        )
        .await
        .unwrap();
    // Right after the new body: judged by it — or, while its new cache (the
    // `active` condition) is not yet exact, withheld from a and b alike.
    let n2 = note(&client, a, Some(team), false).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The reload is in force once the new body's cache (with `active`) is.
    let new_cache = || s.relay.hub.stats.caches.lock().unwrap().iter().any(|(name, ..)| name.contains("active"));
    while !new_cache() {
        assert!(tokio::time::Instant::now() < deadline, "no reload after the redefinition");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n3 = note(&client, a, Some(team), false).await;
    s.reached(n3).await;
    let got_a = s.got(0);
    assert!(got_a.contains(&n1) && got_a.contains(&n3) && got_a.len() <= 3, "{got_a:?}");
    assert_eq!(s.got(1), set(&[n1]), "b was a member before the redefinition, not after it");
    let _ = n2;
    s.relay.stop().await.unwrap();
}

/// The reload after a policy DDL reads the catalog *with* that DDL: the
/// stream may deliver a transaction's commit a moment before PostgreSQL
/// shows it to new snapshots (docs/policies.md, commit visibility), and a
/// catalog read in that moment would install the policies as they were
/// before the DDL — until the next change. Alternately create and drop a
/// policy, writers loading the server beside, and after each a note that
/// must reach its owner exactly while the policy exists. (Found by the
/// concurrent random differential test, seed 2014, under load.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_reload_reads_the_catalog_with_its_ddl_in_it() {
    let (db, mut client) = migrated_db().await;
    schema::migrate(&mut client, &Migrations::walcast()).await.expect("walcast setup");
    client.batch_execute(NOTES).await.unwrap();
    client.batch_execute("create table public.load (n int); set synchronous_commit = on").await.unwrap();
    let a = create_user(&client, "flip@example.com").await;
    let mut s =
        Setup::start(db.url(), &format!("{}_s", db.name()), Duration::from_secs(10), vec![Viewer::user(a)]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    let writers: usize = std::env::var("WALCAST_FLIP_WRITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    for _ in 0..writers {
        let writer = db.connect().await.unwrap();
        let stop = Arc::clone(&stop);
        load.push(tokio::spawn(async move {
            writer.batch_execute("set synchronous_commit = on").await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                writer.batch_execute("insert into public.load values (1)").await.unwrap();
            }
        }));
    }
    let rounds: usize = std::env::var("WALCAST_FLIP_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let mut stale = Vec::new();
    for i in 0..rounds {
        let exists = i % 2 == 0;
        client
            .batch_execute(if exists {
                "create policy flip on public.notes for select to authenticated using (owner = (select auth.uid()))"
            } else {
                "drop policy flip on public.notes"
            })
            .await
            .unwrap();
        let n = note(&client, a, None, false).await;
        s.reached(n).await;
        if s.got(0).contains(&n) != exists {
            stale.push(i);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let reloads = s.relay.hub.stats.policy_reloads.load(Ordering::Relaxed);
    s.relay.stop().await.unwrap();
    assert!(
        stale.is_empty(),
        "policies installed without their DDL after {} of {rounds} changes: {stale:?} ({reloads} reloads)",
        stale.len()
    );
}
