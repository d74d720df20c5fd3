//! Large transactions: a 1,000,000-row transaction streams through with the
//! change stage holding nothing (protocol 1: the walsender spills to disk and
//! sends the rows after commit; walcast passes them through), and protocol 2
//! streaming holds in-progress transactions until Stream Commit, drops them
//! on Stream Abort, and says how much it held; with a spill, what a streamed
//! transaction holds in memory stays under its budget and the rest goes to
//! disk, and `walcast serve --streaming` delivers exactly the committed rows.

use std::sync::atomic::Ordering;
use std::time::Duration;

use uuid::Uuid;
use walcast::change::{Assembler, Op, TxEvent};
use walcast::replication::SlotOptions;
use walcast::spill::{Spill, SpillConfig};

use crate::support::load::ChangeWitness;
use crate::support::pipeline::{changes, Pipeline};
use crate::support::relay::RelayProcess;
use crate::support::{add_member, create_dealership, create_user, migrated_db};

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
            TxEvent::Begin(_) | TxEvent::Message { .. } => {}
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

/// Waits until the pipeline's assembler holds bytes of a streamed
/// transaction, asserting nothing leaves it meanwhile.
async fn wait_until_streamed(p: &mut Pipeline) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(p.quiet_for(Duration::from_millis(500)).await, "an open streamed transaction is held");
        if p.peak_buffered.load(Ordering::Relaxed) > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the held transaction is accounted for");
    }
}

#[tokio::test]
async fn spilled_streamed_transactions_come_out_exactly_within_the_memory_budget() {
    const BUDGET: usize = 64 << 10;
    let (db, mut client) = migrated_db().await;
    client
        .batch_execute(&format!(
            "alter database {} set logical_decoding_work_mem = '64kB';
             create table public.s (id int primary key, v text);
             create publication walcast_spill for table public.s;",
            db.name()
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spill = Spill::new(SpillConfig { dir: dir.path().join("spill"), disk_budget: 1 << 30 }).unwrap();
    let mut slot = SlotOptions::new(format!("{}_s", db.name()), "walcast_spill");
    slot.proto_version = 2;
    slot.streaming = true;
    let assembler = Assembler::with_spill(spill.clone(), BUDGET);
    let mut p = Pipeline::start_assembling(db.url(), slot, None, assembler).await;

    // Two streamed transactions at once: one aborted at top level, one
    // committed with a rolled-back and a released savepoint inside.
    let other = db.connect().await.unwrap();
    other.batch_execute("begin").await.unwrap();
    other
        .batch_execute("insert into public.s select g, repeat('a', 100) from generate_series(100001, 120000) g")
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("insert into public.s select g, 'kept' from generate_series(1, 20000) g").await.unwrap();
    tx.batch_execute("savepoint sp").await.unwrap();
    tx.batch_execute("insert into public.s select g, 'dropped' from generate_series(20001, 30000) g").await.unwrap();
    tx.batch_execute("rollback to savepoint sp").await.unwrap();
    tx.batch_execute("savepoint sp2").await.unwrap();
    tx.batch_execute("insert into public.s select g, 'kept' from generate_series(30001, 31000) g").await.unwrap();
    tx.batch_execute("release savepoint sp2").await.unwrap();
    tx.batch_execute("insert into public.s values (40000, 'after')").await.unwrap();
    wait_until_streamed(&mut p).await;
    other.batch_execute("rollback").await.unwrap();
    tx.commit().await.unwrap();

    let events = p.next_tx().await;
    let ids: Vec<i64> = changes(&events).iter().map(|c| c.record_json().unwrap()["id"].as_i64().unwrap()).collect();
    let expected: Vec<i64> = (1..=20000).chain(30001..=31000).chain([40000]).collect();
    let first_difference = ids.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(ids == expected, "{} rows, first difference at {first_difference:?}", ids.len());
    assert!(changes(&events).iter().all(|c| c.record_json().unwrap()["v"] != "dropped"));
    let stats = spill.stats();
    assert!(stats.spilled_logs.load(Ordering::Relaxed) >= 1, "the transaction outgrew memory and spilled");
    assert_eq!(stats.disk_bytes.load(Ordering::Relaxed), 0, "spill files removed once drained or aborted");
    let peak = p.peak_buffered.load(Ordering::Relaxed);
    assert!(peak > 0 && peak <= 2 * BUDGET, "each streamed transaction held at most {BUDGET} bytes: peak {peak}");

    // The aborted transaction never surfaces; a small one passes normally.
    client.batch_execute("insert into public.s values (50000, 'small')").await.unwrap();
    let events = p.next_tx().await;
    assert_eq!(changes(&events).len(), 1);
    assert_eq!(changes(&events)[0].record_json().unwrap()["id"], 50000);
}

#[tokio::test]
async fn serve_with_streaming_delivers_exactly_the_committed_rows() {
    let (db, client) = migrated_db().await;
    client
        .batch_execute(&format!("alter database {} set logical_decoding_work_mem = '64kB'", db.name()))
        .await
        .unwrap();
    let dealership = create_dealership(&client, "STREAM").await;
    let user = create_user(&client, "stream@example.com").await;
    add_member(&client, user, dealership, "admin").await;
    let slot = format!("{}_serve", db.name());
    let mut relay = RelayProcess::spawn(db.url(), &slot, &["--streaming"]);
    relay.wait_serving().await;
    let witness = ChangeWitness::subscribe(relay.addr).await;

    let insert = |n: i32| {
        format!(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             select '{dealership}', 'sales', jsonb_build_object('name', repeat('x', 200), 'n', g), '{user}' \
             from generate_series(1, {n}) g returning id"
        )
    };
    let ids = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>();
    client.batch_execute("begin").await.unwrap();
    let mut kept = ids(client.query(&insert(400), &[]).await.unwrap());
    client.batch_execute("savepoint sp").await.unwrap();
    let dropped = ids(client.query(&insert(300), &[]).await.unwrap());
    client.batch_execute("rollback to savepoint sp").await.unwrap();
    kept.extend(ids(client.query(&insert(100), &[]).await.unwrap()));
    client.batch_execute("commit").await.unwrap();
    // A later small transaction: once it arrived, everything before it did.
    let last = ids(client.query(&insert(1), &[]).await.unwrap());
    kept.extend(&last);

    let missing = witness.wait_for(&last, Duration::from_secs(30)).await;
    assert!(missing.is_empty(), "the transactions arrive:\n{}", relay.output());
    let got = witness.ids();
    assert!(got.iter().all(|id| !dropped.contains(id)), "no row of the rolled-back savepoint");
    assert!(got == kept, "every committed row once, in order: {} received, {} expected", got.len(), kept.len());
    // The walsender did stream it (protocol 2), rather than send it after commit.
    crate::support::wait_until_streamed(&client, &slot).await;
    assert!(relay.is_running());
}
