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
    let report = replay(reader, Pace::Fastest, |e| replayed.push(e.clone())).unwrap();
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
