//! Broadcast from Database (broadcast-presence.md §4.5, §5): `walcast
//! setup` creates the `realtime` objects only where absent and the
//! `walcast_messages` publication; `walcast serve` streams it on its slot
//! and delivers every committed `realtime.messages` INSERT, in commit
//! order, to the channels of its topic (supabase-js 2.0.0 as kind 4 with
//! `meta.id`, 1.0.0 and the Python client as text; raw bytes to 2.0.0 only);
//! private rows never reach
//! public channels; non-object payloads and rolled-back sends send nothing;
//! partitions are kept; replay reads the newest private rows; Postgres
//! Changes on the `realtime` schema are refused with the reason.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::Client;
use walcast::config::check::{self, Finding, Status};
use walcast::config::{FileConfig, Settings};
use walcast::realtime::messages::{self, maintain_partitions, replay};
use walcast::schema::{self, Migrations};

use crate::support::clients::{is_status, Driver, Kind};
use crate::support::server::{anon, user, TestServer};
use crate::support::{empty_db, migrated_db};

/// A table whose trigger calls `realtime.broadcast_changes` (private, as
/// Supabase's docs write it), and a read policy for its topic.
const GAME_SCHEMA: &str = "
create table public.moves (id int primary key, game_id int not null, note text);
create function public.moves_broadcast() returns trigger language plpgsql as $$
begin
  perform realtime.broadcast_changes('game:' || coalesce(new.game_id, old.game_id), tg_op, tg_op,
                                     tg_table_name, tg_table_schema, new, old);
  return null;
end $$;
create trigger moves_broadcast after insert or update or delete on public.moves
  for each row execute function public.moves_broadcast();
create policy game_read on realtime.messages for select to authenticated
  using ((select realtime.topic()) = 'game:42');";

async fn member(name: &str, kind: Kind, url: &str, topic: &str) -> Driver {
    let mut driver = Driver::start(name, kind, url, &anon()).await;
    driver.command(json!({"cmd": "broadcast_subscribe", "channel": topic})).await;
    let status = driver.expect("SUBSCRIBED", |e| is_status(e, topic, None)).await;
    assert_eq!(status["status"], "SUBSCRIBED", "{name}: {status}");
    driver
}

async fn received(driver: &mut Driver, topic: &str) -> Value {
    driver.expect("a broadcast", |e| e["ev"] == "broadcast" && e["channel"] == topic).await["message"].clone()
}

/// The id of the newest row of `topic`.
async fn newest_id(client: &Client, topic: &str) -> String {
    client
        .query_one(
            "select id::text from realtime.messages where topic = $1 order by inserted_at desc limit 1",
            &[&topic],
        )
        .await
        .unwrap()
        .get(0)
}

fn metric(body: &str, name: &str) -> String {
    body.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).unwrap_or("0").to_owned()
}

#[tokio::test]
async fn database_messages_reach_public_channels_of_every_client_in_commit_order() {
    let t = TestServer::with_setup(GAME_SCHEMA).await;
    let url = format!("http://{}", t.addr());
    let room = "room-1";
    let mut v2 = member("v2", Kind::SupabaseJs("2.0.0"), &url, room).await;
    let mut v1 = member("v1", Kind::SupabaseJs("1.0.0"), &url, room).await;
    let mut py = member("py", Kind::Python, &url, room).await;
    let mut other = member("other", Kind::SupabaseJs("2.0.0"), &url, "room-2").await;

    // `realtime.send(…, false)` reaches the public channels of the topic:
    // the listener sees meta.id, and the payload carries the same id.
    t.client.execute("select realtime.send('{\"a\":1}', 'ev', 'room-1', false)", &[]).await.unwrap();
    let id = newest_id(&t.client, room).await;
    let want = json!({"type": "broadcast", "event": "ev", "meta": {"id": id}, "payload": {"a": 1, "id": id}});
    assert_eq!(received(&mut v2, room).await, want, "supabase-js 2.0.0 (kind 4 with meta)");
    assert_eq!(received(&mut v1, room).await, want, "supabase-js 1.0.0 (text)");
    let got = received(&mut py, room).await;
    assert_eq!((got["event"].clone(), got["payload"].clone()), (json!("ev"), json!({"a": 1, "id": id})), "{got}");

    // A private row, a non-object payload, a rolled-back send: nothing.
    // Then three transactions committing in another order than they
    // inserted: they arrive in commit order, right after the first marker.
    let mark = other.mark();
    t.client.execute("select realtime.send('{\"secret\":true}', 'private', 'room-1', true)", &[]).await.unwrap();
    t.client.execute("select realtime.send('[1, 2]', 'array', 'room-1', false)", &[]).await.unwrap();
    t.client.execute("select realtime.send('7', 'number', 'room-1', false)", &[]).await.unwrap();
    t.client
        .batch_execute("begin; select realtime.send('{\"n\":0}', 'rolled-back', 'room-1', false); rollback;")
        .await
        .unwrap();
    let second = t.db.connect().await.unwrap();
    t.client.batch_execute("begin; select realtime.send('{\"n\":1}', 'a1', 'room-1', false);").await.unwrap();
    second.batch_execute("begin; select realtime.send('{\"n\":2}', 'b1', 'room-1', false); commit;").await.unwrap();
    t.client.batch_execute("select realtime.send('{\"n\":3}', 'a2', 'room-1', false); commit;").await.unwrap();
    for driver in [&mut v2, &mut v1, &mut py] {
        let events: Vec<Value> =
            [received(driver, room).await, received(driver, room).await, received(driver, room).await]
                .iter()
                .map(|m| m["event"].clone())
                .collect();
        assert_eq!(events, ["b1", "a1", "a2"], "{}", driver.report());
    }

    // broadcast_changes from a row trigger: the payloads of §5.2, on the
    // private topic `game:42`, to private channels whose read policy
    // allows it (2.0.0: kind 4 with meta; 1.0.0: text); public channels
    // hear nothing of it.
    let player = user(uuid::Uuid::new_v4());
    let mut private = Vec::new();
    for (name, vsn) in [("p2", "2.0.0"), ("p1", "1.0.0")] {
        let mut js = Driver::start(name, Kind::SupabaseJs(vsn), &url, &anon()).await;
        js.command(json!({"cmd": "broadcast_subscribe", "channel": "game:42", "token": player, "private": true})).await;
        let status = js.expect("SUBSCRIBED", |e| is_status(e, "game:42", None)).await;
        assert_eq!(status["status"], "SUBSCRIBED", "{name}: {status}");
        private.push(js);
    }
    t.client.batch_execute("insert into public.moves values (1, 42, 'e4')").await.unwrap();
    t.client.batch_execute("update public.moves set note = 'e5' where id = 1").await.unwrap();
    t.client.batch_execute("delete from public.moves where id = 1").await.unwrap();
    let new = json!({"id": 1, "game_id": 42, "note": "e4"});
    let updated = json!({"id": 1, "game_id": 42, "note": "e5"});
    let expected =
        [("INSERT", json!(null), new.clone()), ("UPDATE", new, updated.clone()), ("DELETE", updated, json!(null))];
    for js in &mut private {
        for (op, old, record) in &expected {
            let message = received(js, "game:42").await;
            assert_eq!((message["type"].clone(), message["event"].clone()), (json!("broadcast"), json!(op)));
            let payload = &message["payload"];
            assert_eq!(payload["id"], message["meta"]["id"], "{message}");
            assert_eq!(
                payload,
                &json!({"id": payload["id"], "operation": op, "table": "moves", "schema": "public",
                        "record": record, "old_record": old}),
            );
        }
    }

    // Raw bytes: to supabase-js 2.0.0 only (kind 4, encoding 0).
    t.client.execute("select realtime.send_binary('\\x0102ff', 'bin', 'room-1', false)", &[]).await.unwrap();
    let id = newest_id(&t.client, room).await;
    let raw = received(&mut v2, room).await;
    assert_eq!(raw, json!({"type": "broadcast", "event": "bin", "meta": {"id": id}, "payload": {"binary": "AQL/"}}));

    // Nothing of it reached a public channel, nor another topic.
    t.client.execute("select realtime.send('{}', 'marker', 'room-1', false)", &[]).await.unwrap();
    for driver in [&mut v2, &mut v1, &mut py] {
        assert_eq!(received(driver, room).await["event"], "marker");
    }
    other.assert_none_since(mark, "no broadcast on room-2", |e| e["ev"] == "broadcast");

    // Postgres Changes on the realtime schema: refused, with the reason.
    v2.command(json!({"cmd": "subscribe", "channel": "pg", "bindings": [
        {"event": "*", "schema": "realtime", "table": "messages"}
    ]}))
    .await;
    let system = v2.expect("the refusal", |e| e["ev"] == "system" && e["channel"] == "pg").await;
    assert_eq!(system["payload"]["status"], "error", "{system}");
    let message = system["payload"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("realtime schema") && message.contains("Broadcast from Database"), "{message}");

    // Counters: every row handed to its room — room-1's first, the private
    // one (to the private room-1), the three ordered ones, the three game
    // rows (private game:42), the binary one, the marker; none dropped by walcast (the
    // non-object and rolled-back sends never became rows).
    let (_, body) = crate::support::server::http_get(t.addr(), "/metrics", &[]).await;
    assert_eq!(metric(&body, "walcast_db_broadcasts_total"), "10", "{body}");
    assert_eq!(metric(&body, "walcast_db_broadcasts_dropped_total{reason=\"missing_column\"}"), "0");
    t.server.shutdown().await.unwrap();
}

fn settings(url: &str) -> Settings {
    let given = FileConfig {
        database_url: Some(url.to_owned()),
        jwt_secret: Some("secret".into()),
        slot_name: Some(format!("check_{}", uuid::Uuid::new_v4().simple())),
        ..FileConfig::default()
    };
    Settings::resolve(given, None).expect("valid settings")
}

async fn findings(url: &str) -> Vec<Finding> {
    check::run(&settings(url), &tokio_postgres::Config::from_str(url).unwrap()).await
}

fn find<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
    findings.iter().find(|f| f.check == check).unwrap_or_else(|| panic!("no {check} in {findings:#?}"))
}

async fn today_partition(client: &Client, days: i32) -> String {
    client
        .query_one("select 'messages_' || to_char((now() at time zone 'utc')::date + $1::int, 'YYYY_MM_DD')", &[&days])
        .await
        .unwrap()
        .get(0)
}

async fn partitions(client: &Client) -> Vec<String> {
    client
        .query(
            "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid \
             where i.inhparent = 'realtime.messages'::regclass order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn setup_is_idempotent_and_partitions_are_kept_in_utc() {
    let (db, mut client) = migrated_db().await;
    let before = findings(db.url()).await;
    assert_eq!(find(&before, "broadcast from database").status, Status::Warn, "{before:#?}");
    let report = schema::migrate(&mut client, &Migrations::walcast()).await.unwrap();
    assert!(report.applied.contains(&"walcast/0002_realtime_messages.sql".to_owned()), "{report:?}");
    assert!(schema::migrate(&mut client, &Migrations::walcast()).await.unwrap().applied.is_empty());
    let mut want = Vec::new();
    for day in -1..=3 {
        want.push(today_partition(&client, day).await);
    }
    assert_eq!(partitions(&client).await, want, "yesterday … today+3");
    let pubs: Vec<(String, bool, bool, bool)> = client
        .query("select pubname::text, pubviaroot, pubinsert, pubupdate from pg_publication order by 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(pubs.contains(&("walcast_messages".into(), true, true, false)), "{pubs:?}");
    let user_pub: Vec<String> = client
        .query("select tablename::text from pg_publication_tables where pubname = 'supabase_realtime'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!user_pub.iter().any(|t| t.starts_with("messages")), "{user_pub:?}");
    // Even published in the user's publication (which walcast never does),
    // realtime.messages is no Postgres Changes table: not in the join
    // catalog, no policy plan.
    client.batch_execute("alter publication supabase_realtime add table realtime.messages").await.unwrap();
    let publications = ["supabase_realtime".to_owned()];
    let config = walcast::pgconn::PgConfig::from(tokio_postgres::Config::from_str(db.url()).unwrap());
    let catalog = walcast::realtime::catalog::Catalog::load(config, &publications).await.unwrap();
    assert!(catalog.tables().iter().all(|t| t.schema != "realtime"));
    let loaded = walcast::policy::plan::load(&mut client, &publications, None).await.unwrap();
    let plans = loaded.policies.describe(&loaded.caches);
    assert!(!plans.is_empty() && plans.iter().all(|line| !line.contains("realtime.")), "{plans:?}");
    client.batch_execute("alter publication supabase_realtime drop table realtime.messages").await.unwrap();
    let ok = findings(db.url()).await;
    for line in [
        "broadcast from database",
        "realtime.send",
        "publication walcast_messages",
        "private channels",
        "realtime.messages partition",
    ] {
        assert_eq!(find(&ok, line).status, Status::Ok, "{line}: {ok:#?}");
    }

    // In a session far from UTC: names and bounds are still UTC days. An
    // old partition is dropped; a missing one ahead is created; today's
    // missing is reported by `walcast check` until then.
    client.batch_execute("set timezone = 'Pacific/Kiritimati'").await.unwrap();
    let today = today_partition(&client, 0).await;
    let ahead = today_partition(&client, 2).await;
    client
        .batch_execute(&format!(
            "create table realtime.messages_2020_01_01 partition of realtime.messages
               for values from ('2020-01-01') to ('2020-01-02');
             create table realtime.kept_by_hand partition of realtime.messages
               for values from ('2019-01-01') to ('2019-01-02');
             drop table realtime.{today}; drop table realtime.{ahead};"
        ))
        .await
        .unwrap();
    let missing = findings(db.url()).await;
    let line = find(&missing, "realtime.messages partition");
    assert_eq!(line.status, Status::Warn, "{missing:#?}");
    assert!(line.detail.contains(&today) && line.detail.contains("nothing is sent"), "{line}");
    let report = maintain_partitions(&client).await.unwrap();
    assert_eq!(report.created, [today.clone(), ahead.clone()]);
    assert_eq!(report.dropped, ["messages_2020_01_01"]);
    let mut kept = want.clone();
    kept.insert(0, "kept_by_hand".into());
    assert_eq!(partitions(&client).await, kept, "only messages_YYYY_MM_DD partitions are dropped");
    let again = maintain_partitions(&client).await.unwrap();
    assert!(again.created.is_empty() && again.dropped.is_empty(), "{again:?}");
    // A row sent now lands in today's UTC partition.
    client.execute("select realtime.send('{}', 'ev', 'utc', false)", &[]).await.unwrap();
    let (partition, inserted_utc): (String, bool) = client
        .query_one(
            "select tableoid::regclass::text,
                    abs(extract(epoch from inserted_at - (now() at time zone 'utc'))) < 60
               from realtime.messages where topic = 'utc'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((partition, inserted_utc), (format!("realtime.{today}"), true));
}

#[tokio::test]
async fn setup_leaves_an_existing_realtime_schema_untouched() {
    let (_db, mut client) = empty_db().await;
    // A Supabase-like database: its own table (another shape, not
    // partitioned) and its own send().
    client
        .batch_execute(
            "create schema realtime;
             create table realtime.messages (id uuid primary key default gen_random_uuid(), topic text not null,
               extension text not null, event text, payload jsonb, private boolean, inserted_at timestamp);
             insert into realtime.messages (topic, extension) values ('kept', 'broadcast');
             create function realtime.send(payload jsonb, event text, topic text, private boolean default true)
               returns void language sql as $$ select null::void $$;
             comment on function realtime.send(jsonb, text, text, boolean) is 'theirs';",
        )
        .await
        .unwrap();
    for _ in 0..2 {
        schema::migrate(&mut client, &Migrations::walcast()).await.unwrap();
    }
    let row = client
        .query_one(
            "select (select relkind::text from pg_class where oid = 'realtime.messages'::regclass),
                    (select count(*) from realtime.messages where topic = 'kept'),
                    (select count(*) from pg_attribute where attrelid = 'realtime.messages'::regclass
                       and attname = 'binary_payload'),
                    obj_description('realtime.send(jsonb, text, text, boolean)'::regprocedure, 'pg_proc'),
                    to_regprocedure('realtime.broadcast_changes(text, text, text, text, text, record, record, text)')
                      is not null,
                    (select count(*) from pg_inherits where inhparent = 'realtime.messages'::regclass)",
            &[],
        )
        .await
        .unwrap();
    let got: (String, i64, i64, Option<String>, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
    assert_eq!(got, ("r".into(), 1, 0, Some("theirs".into()), true, 0), "table, rows and send() untouched");
    // Not partitioned: maintenance has nothing to do.
    assert!(!maintain_partitions(&client).await.unwrap().partitioned);
}

#[tokio::test]
async fn replay_returns_the_newest_private_rows_oldest_first() {
    let (_db, mut client) = migrated_db().await;
    schema::migrate(&mut client, &Migrations::walcast()).await.unwrap();
    // A session TimeZone far from UTC must not shift the window.
    client.batch_execute("set timezone = 'America/Los_Angeles'").await.unwrap();
    client
        .batch_execute(
            "insert into realtime.messages (topic, extension, event, private, payload, inserted_at) values
               ('r', 'broadcast', 'old', true, '{\"n\":0}', (now() at time zone 'utc') - interval '2 hours'),
               ('r', 'broadcast', 'e1', true, '{\"n\":1}', (now() at time zone 'utc') - interval '3 minutes'),
               ('r', 'broadcast', 'e2', true, '{\"n\":2}', (now() at time zone 'utc') - interval '2 minutes'),
               ('r', 'broadcast', 'e3', true, '{\"n\":3}', (now() at time zone 'utc') - interval '1 minutes'),
               ('r', 'broadcast', 'public', false, '{}', now() at time zone 'utc'),
               ('r', 'presence', 'presence', true, '{}', now() at time zone 'utc'),
               ('other', 'broadcast', 'other', true, '{}', now() at time zone 'utc');
             insert into realtime.messages (topic, extension, event, private, binary_payload) values
               ('bin', 'broadcast', 'raw', true, '\\x0102ff');",
        )
        .await
        .unwrap();
    let since = walcast::realtime::session::now_unix() * 1000 - 3_600_000;
    let events = |rows: &[messages::Replayed]| rows.iter().map(|r| r.event.clone()).collect::<Vec<_>>();
    let two = replay(&client, "r", since, 2).await.unwrap();
    assert_eq!(events(&two), ["e2", "e3"], "the newest two, oldest first");
    assert_eq!((two[0].encoding, two[0].payload.as_slice()), (1, &br#"{"n": 2}"#[..]));
    assert_eq!(two[0].id.len(), 36);
    assert_eq!(events(&replay(&client, "r", since, 100).await.unwrap()), ["e1", "e2", "e3"]);
    assert_eq!(events(&replay(&client, "r", since, 0).await.unwrap()), ["e3"], "limit clamped to 1");
    assert_eq!(events(&replay(&client, "r", since - 7_200_000, 25).await.unwrap()), ["old", "e1", "e2", "e3"]);
    assert!(replay(&client, "r", since + 7_200_000, 25).await.unwrap().is_empty(), "since in the future");
    let raw = replay(&client, "bin", since, 25).await.unwrap();
    assert_eq!((raw[0].encoding, raw[0].payload.as_slice()), (0, &[1u8, 2, 255][..]));
}

/// A server on `db` streaming through `slot`.
async fn serve(db: &walcast::cluster::ScratchDatabase, slot: &str) -> walcast::server::Server {
    use walcast::realtime::auth::AuthConfig;
    use walcast::relay::RelayConfig;
    use walcast::replication::{SlotOptions, SourceConfig};
    use walcast::server::{ServeConfig, Server};
    let source = SourceConfig::new(
        tokio_postgres::Config::from_str(db.url()).unwrap(),
        SlotOptions::new(slot, "supabase_realtime"),
    );
    let auth = AuthConfig { jwt_secret: Some(crate::support::server::SECRET.into()), jwks: None, audience: None };
    let mut config = ServeConfig::new(RelayConfig::new(source), auth);
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    Server::start(config).await.expect("server starts")
}

/// `walcast_db_broadcasts_total` once it reaches `want` (10 s at most).
async fn delivered_reaches(server: &walcast::server::Server, want: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = crate::support::server::http_get(server.local_addr(), "/metrics", &[]).await;
        let got = metric(&body, "walcast_db_broadcasts_total");
        if got == want || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// pgoutput (before PostgreSQL 18) reads the publications as of each change
/// it decodes, so a slot whose position predates `walcast setup` cannot
/// decode the changes before it with `walcast_messages` asked for: walcast
/// streams without it (Postgres Changes unharmed) and has it after a
/// restart, once the slot is past that point.
#[tokio::test]
async fn a_slot_older_than_the_publication_streams_without_it_until_restart() {
    let (db, mut client) = migrated_db().await;
    let slot = format!("ws_{}", uuid::Uuid::new_v4().simple());
    client.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.unwrap();
    let user = crate::support::create_user(&client, "a@example.com").await;
    let dealership = crate::support::create_dealership(&client, "D1").await;
    crate::support::add_member(&client, user, dealership, "admin").await;
    schema::migrate(&mut client, &Migrations::walcast()).await.unwrap();

    let server = serve(&db, &slot).await;
    client.execute("select realtime.send('{}', 'ev', 'room-1', false)", &[]).await.unwrap();
    // The relay keeps streaming (a later change still gets through), the
    // message is not delivered.
    let other = crate::support::create_dealership(&client, "D2").await;
    crate::support::add_member(&client, user, other, "admin").await;
    let lsn: String = client.query_one("select pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let lsn: walcast::lsn::Lsn = lsn.parse().unwrap();
    let stats = Arc::clone(&server.relay().hub.stats);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stats.handled_lsn.load(std::sync::atomic::Ordering::Relaxed) < lsn.0 {
        assert!(server.relay().is_running(), "the relay stopped");
        assert!(tokio::time::Instant::now() < deadline, "the relay stopped streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.relay().is_running());
    // Had the message been streamed, it would have been handed on before
    // that later commit reached the hub: queued or delivered by now.
    let (_, body) = crate::support::server::http_get(server.local_addr(), "/metrics", &[]).await;
    assert_eq!(metric(&body, "walcast_db_broadcasts_total"), "0");
    assert_eq!(metric(&body, "walcast_db_broadcast_queue_messages"), "0");
    server.shutdown().await.unwrap();

    let server = serve(&db, &slot).await;
    client.execute("select realtime.send('{}', 'ev', 'room-1', false)", &[]).await.unwrap();
    assert_eq!(delivered_reaches(&server, "1").await, "1", "streamed after the restart");
    server.shutdown().await.unwrap();
}
