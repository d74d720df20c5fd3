//! Large transactions: a 1,000,000-row transaction streams through with the
//! change stage holding nothing (protocol 1: the walsender spills to disk and
//! sends the rows after commit; walcast passes them through), and protocol 2
//! streaming holds in-progress transactions until Stream Commit, drops them
//! on Stream Abort, and says how much it held.

use std::sync::atomic::Ordering;
use std::time::Duration;

use walcast::change::{Op, TxEvent};
use walcast::replication::SlotOptions;

use crate::support::migrated_db;
use crate::support::pipeline::{changes, Pipeline};

#[tokio::test]
async fn a_million_row_transaction_passes_with_nothing_buffered() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(
            "create table public.bulk (id int primary key, v text);
             create publication walcast_bulk for table public.bulk;",
        )
        .await
        .unwrap();
    let mut p = Pipeline::start(db.url(), &format!("{}_s", db.name()), "walcast_bulk").await;
    client
        .batch_execute("insert into public.bulk select g, 'row ' || g from generate_series(1, 1000000) g")
        .await
        .unwrap();
    let mut rows = 0u64;
    let mut last_id = 0i64;
    loop {
        match p.next_event().await {
            TxEvent::Begin(_) => {}
            TxEvent::Change(c) => {
                assert_eq!(c.op, Op::Insert);
                let id = c.record_json().unwrap()["id"].as_i64().unwrap();
                assert_eq!(id, last_id + 1, "rows in insertion order");
                last_id = id;
                rows += 1;
            }
            TxEvent::Commit(_) => break,
        }
    }
    assert_eq!(rows, 1_000_000);
    assert_eq!(p.peak_buffered.load(Ordering::Relaxed), 0, "protocol 1: the change stage buffers nothing");
}

#[tokio::test]
async fn streamed_transactions_are_held_until_commit_and_dropped_on_abort() {
    let (db, mut client) = migrated_db().await;
    // Make the walsender stream anything over 64 kB (logical_decoding_work_mem
    // is read by the walsender for this database).
    client
        .batch_execute(&format!(
            "alter database {} set logical_decoding_work_mem = '64kB';
             create table public.s (id int primary key, v text);
             create publication walcast_stream for table public.s;",
            db.name()
        ))
        .await
        .unwrap();
    let mut slot = SlotOptions::new(format!("{}_s", db.name()), "walcast_stream");
    slot.proto_version = 2;
    slot.streaming = true;
    let mut p = Pipeline::start_with(db.url(), slot, None).await;

    // A large transaction aborted after it was streamed: nothing comes out.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("insert into public.s select g, repeat('x', 100) from generate_series(1, 20000) g").await.unwrap();
    tx.rollback().await.unwrap();
    // A large committed one, with a rolled-back subtransaction inside it.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("insert into public.s select g, 'kept' from generate_series(1, 20000) g").await.unwrap();
    tx.batch_execute("savepoint sp").await.unwrap();
    tx.batch_execute("insert into public.s select g, 'dropped' from generate_series(20001, 30000) g").await.unwrap();
    tx.batch_execute("rollback to savepoint sp").await.unwrap();
    tx.batch_execute("insert into public.s values (40000, 'after')").await.unwrap();
    // While it is open, nothing of it leaves the change stage, and once the
    // walsender has streamed part of it (how soon depends on the machine's
    // load), the held bytes are accounted for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(p.quiet_for(Duration::from_millis(500)).await, "an open streamed transaction is held");
        if p.peak_buffered.load(Ordering::Relaxed) > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the held transaction is accounted for");
    }
    tx.commit().await.unwrap();

    let events = p.next_tx().await;
    let rows = changes(&events);
    assert_eq!(rows.len(), 20001, "the aborted subtransaction's 10,000 rows are dropped");
    assert!(rows.iter().all(|c| c.record_json().unwrap()["v"] != "dropped"));
    assert_eq!(rows.last().unwrap().record_json().unwrap()["id"], 40000);
    let TxEvent::Commit(info) = events.last().unwrap() else { panic!("ends with Commit") };
    assert!(info.end_lsn > info.commit_lsn);
    let peak = p.peak_buffered.load(Ordering::Relaxed);
    assert!(peak >= 20000 * 40, "peak held bytes reported: {peak}");
    // The aborted transaction never surfaces, and a small one passes normally.
    client.batch_execute("insert into public.s values (50000, 'small')").await.unwrap();
    let events = p.next_tx().await;
    assert_eq!(changes(&events).len(), 1);
    assert_eq!(changes(&events)[0].record_json().unwrap()["id"], 50000);
}
