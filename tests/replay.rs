//! Record and replay: a capture replayed without PostgreSQL gives exactly the
//! change stream of the live run that recorded it; `walcast replay` reports it;
//! a damaged capture fails precisely after replaying what came before.

use std::time::Duration;

use walcast::capture::{replay, CaptureReader, Pace};
use walcast::change::TxEvent;
use walcast::replication::SlotOptions;

use crate::support::migrated_db;
use crate::support::pipeline::Pipeline;

#[tokio::test]
async fn replaying_a_capture_gives_the_live_change_stream() {
    let (db, mut client) = migrated_db().await;
    client
        .batch_execute(
            "create table public.r1 (id int primary key, v text, doc jsonb, at timestamptz default now());
             create table public.r2 (id int primary key, n numeric, tags text[]);
             alter table public.r2 replica identity full;
             create publication walcast_replay for table public.r1, public.r2;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.walcast");
    let file = std::fs::File::create(&path).unwrap();
    let slot = SlotOptions::new(format!("{}_s", db.name()), "walcast_replay");
    let mut live = Pipeline::start_with(db.url(), slot, Some(file)).await;

    let big = "(select jsonb_object_agg('k' || i, md5(i::text)) from generate_series(1, 400) i)";
    client
        .batch_execute(&format!(
            "insert into public.r1 (id, v, doc) values (1, 'a', {big}), (2, 'b', null);
             insert into public.r2 values (1, 1.50, '{{x,\"y z\",NULL}}');
             update public.r1 set v = 'c' where id = 1;
             update public.r2 set n = 'NaN' where id = 1;
             delete from public.r1 where id = 2;"
        ))
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("insert into public.r1 (id, v) select g, 'm' from generate_series(10, 500) g").await.unwrap();
    tx.batch_execute("update public.r2 set tags = '{}'").await.unwrap();
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("insert into public.r1 (id) values (999)").await.unwrap();
    tx.rollback().await.unwrap();
    client.batch_execute("truncate public.r2; insert into public.r2 values (7, 7, null)").await.unwrap();

    let mut live_events = Vec::new();
    let mut commits = 0;
    // A multi-statement simple query is one transaction: 3 commits in all.
    while commits < 3 {
        let event = live.next_event().await;
        commits += usize::from(matches!(event, TxEvent::Commit(_)));
        live_events.push(event);
    }
    assert!(live.quiet_for(Duration::from_millis(500)).await, "3 committed transactions, nothing more");
    let writer = live.stop().await.expect("capture writer");
    writer.finish().unwrap();

    let reader = CaptureReader::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
    assert_eq!(reader.meta().publications, vec!["walcast_replay".to_owned()]);
    let mut replayed = Vec::new();
    let report = replay(reader, Pace::Fastest, |e| replayed.push(e)).unwrap();
    assert_eq!(report.transactions, 3);
    assert_eq!(report.changes, (2 + 1 + 1 + 1 + 1) + (491 + 1) + (1 + 1));
    assert!(!report.incomplete_transaction);
    assert_eq!(replayed.len(), live_events.len());
    for (i, (got, want)) in replayed.iter().zip(&live_events).enumerate() {
        assert_eq!(got, want, "event {i} differs between replay and live");
    }
    // The JSON each change becomes is identical too (same relation metadata).
    let json = |events: &[TxEvent]| -> Vec<Option<serde_json::Value>> {
        events.iter().filter_map(|e| if let TxEvent::Change(c) = e { Some(c.record_json()) } else { None }).collect()
    };
    assert_eq!(json(&replayed), json(&live_events));

    // The CLI replays it and reports the same counts, at recorded pace too.
    for pace in ["fastest", "recorded"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
            .args(["replay", "--json", "--pace", pace])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["transactions"], 3, "{report}");
        assert_eq!(report["changes"], 500, "{report}");
        assert!(report["changes_per_sec"].as_f64().unwrap() > 0.0);
    }

    // A capture cut inside its last record: every event before the cut is
    // replayed, then the reader names the offset.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.walcast");
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let reader = CaptureReader::new(std::io::BufReader::new(std::fs::File::open(&cut).unwrap())).unwrap();
    let mut count = 0;
    let err = replay(reader, Pace::Fastest, |_| count += 1).unwrap_err();
    assert!(err.to_string().contains("truncated inside the record at byte"), "{err}");
    assert!(count >= live_events.len() - 1, "replayed up to the cut: {count}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walcast")).arg("replay").arg(&cut).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `walcast replay --subscribers N`: each recorded change reaches exactly the
/// synthetic subscribers of its dealerships (subscriber `i` belongs to the
/// `i mod D`-th dealership the capture names), moves reach both sides, and
/// the CLI reports the same count.
#[tokio::test]
async fn fanout_replay_reaches_each_dealerships_synthetic_subscribers() {
    use walcast::load::fanout::{replay_fanout, FanoutConfig};

    let (db, client) = migrated_db().await;
    let (a, b, c) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let user = uuid::Uuid::new_v4();
    client
        .execute(
            "insert into public.dealerships (id, name, code) select d, 'D' || n, 'D' || n \
             from unnest($1::uuid[]) with ordinality as t (d, n)",
            &[&vec![a, b, c]],
        )
        .await
        .unwrap();
    client.execute("insert into auth.users (id, email) values ($1, 'u@walcast.invalid')", &[&user]).await.unwrap();
    client.execute("insert into public.profiles (id, email) values ($1, 'u@walcast.invalid')", &[&user]).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.walcast");
    let slot = SlotOptions::new(format!("{}_s", db.name()), "supabase_realtime");
    let mut live = Pipeline::start_with(db.url(), slot, Some(std::fs::File::create(&path).unwrap())).await;
    let insert = "insert into public.orders (id, dealership_id, type, status, customer_info, created_by, metadata) \
                  select gen_random_uuid(), $1, 'sales', 'draft', '{}', $2, '{}' from generate_series(1, $3::int)";
    client.execute(insert, &[&a, &user, &4i32]).await.unwrap(); // A: 4 inserts
    client.execute(insert, &[&b, &user, &2i32]).await.unwrap(); // B: 2 inserts
    let first_a = "(select id from public.orders where dealership_id = $1 order by id limit 1)";
    client.execute(&format!("update public.orders set status = 'pending' where id = {first_a}"), &[&a]).await.unwrap(); // A: 1 update
    client
        .execute(&format!("update public.orders set dealership_id = $2 where id = {first_a}"), &[&b, &c])
        .await
        .unwrap(); // B → C: a DELETE for B's subscribers, an INSERT for C's
    client.execute(&format!("delete from public.orders where id = {first_a}"), &[&a]).await.unwrap(); // A: 1 delete
    client
        .execute(
            "insert into public.dealer_memberships (id, user_id, dealership_id, role) values (gen_random_uuid(), $1, $2, 'user')",
            &[&user, &c],
        )
        .await
        .unwrap(); // C: 1 membership row
    let mut commits = 0;
    while commits < 6 {
        commits += usize::from(matches!(live.next_event().await, TxEvent::Commit(_)));
    }
    live.stop().await.expect("capture writer").finish().unwrap();

    let config = |subscribers, dealerships| FanoutConfig {
        subscribers,
        dealerships,
        filtered: 0.0,
        unique_topics: false,
        vsn: walcast::hub::Vsn::V2,
    };
    // 7 subscribers over A, B, C (first seen in that order): A has 3, B 2, C 2.
    // 4·3 + 2·2 (inserts) + 3 (update) + 2 + 2 (move) + 3 (delete) + 2 (membership).
    let report = replay_fanout(&path, Pace::Fastest, &config(7, None)).unwrap();
    assert_eq!((report.replay.transactions, report.replay.changes, report.dealerships), (6, 10, 3));
    assert_eq!(report.deliveries, 28);
    assert!(report.frames_built < report.deliveries, "one shared topic: frames are shared");
    // Over A and B only: A has 4, B 3, and nobody sees C's side.
    // 4·4 + 2·3 + 4 + 3 (move: B's DELETE only) + 4 + 0.
    let report = replay_fanout(&path, Pace::Fastest, &config(7, Some(2))).unwrap();
    assert_eq!(report.deliveries, 33);
    // One topic per subscriber: nothing shared, the same deliveries.
    let report = replay_fanout(&path, Pace::Fastest, &FanoutConfig { unique_topics: true, ..config(7, None) }).unwrap();
    assert_eq!((report.deliveries, report.frames_built), (28, 28));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(["replay", "--json", "--subscribers", "7", "--filtered", "0"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["deliveries"].as_u64(), report["changes"].as_u64()), (Some(28), Some(10)), "{report}");
    assert!(report["deliveries_per_sec"].as_f64().unwrap() > 0.0);
}
