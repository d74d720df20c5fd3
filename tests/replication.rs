//! The replication client against a real PostgreSQL: connection and
//! authentication, slots and exported snapshots, streaming with
//! acknowledgements, idle-slot progress, and error classification.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::Client;
use walcast::lsn::Lsn;
use walcast::replication::{
    AckHandle, ReplicationError, ReplicationStream, SlotOptions, StreamConfig, WalConnection, WalEvent,
};

use crate::support::{create_dealership, create_user, migrated_db};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn wal_connect(url: &str) -> WalConnection {
    let config = tokio_postgres::Config::from_str(url).unwrap();
    WalConnection::connect(&config, CONNECT_TIMEOUT).await.expect("replication connection")
}

async fn confirmed_flush(client: &Client, slot: &str) -> Lsn {
    let text: Option<String> = client
        .query_one("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    text.unwrap().parse().unwrap()
}

/// Reads events until `pred` accepts one, with an overall deadline.
async fn next_matching(
    stream: &mut ReplicationStream,
    what: &str,
    mut pred: impl FnMut(&WalEvent) -> bool,
) -> WalEvent {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let event = stream.next().await.expect("stream");
            if pred(&event) {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn tag(event: &WalEvent) -> Option<u8> {
    match event {
        WalEvent::XLogData { data, .. } => data.first().copied(),
        WalEvent::Keepalive { .. } => None,
    }
}

#[tokio::test]
async fn identify_create_slot_and_read_the_exported_snapshot() {
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "SNAP").await;
    let mut conn = wal_connect(db.url()).await;
    assert!(conn.pid() > 0);
    let ident = conn.identify_system().await.unwrap();
    assert_eq!(ident.dbname.as_deref(), Some(db.name()));
    assert!(ident.timeline >= 1);

    let slot = format!("{}_s", db.name());
    let created = conn.create_slot(&slot, true).await.unwrap();
    let snapshot = created.snapshot_name.clone().expect("exported snapshot");
    assert!(created.consistent_point > Lsn::ZERO);

    // A write after the slot's consistent point is invisible in the snapshot.
    create_dealership(&client, "LATER").await;
    let mut reader = db.connect().await.unwrap();
    let tx = reader
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    tx.batch_execute(&format!("set transaction snapshot '{snapshot}'")).await.unwrap();
    let codes: Vec<String> = tx
        .query("select code from public.dealerships order by code", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(codes, ["SNAP"], "the snapshot is the slot's consistent point (dealership {d})");
    tx.commit().await.unwrap();

    // Existing slot: 42710.
    let err = conn.create_slot(&slot, false).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42710"), "{err}");
    conn.drop_slot(&slot).await.unwrap();
    conn.terminate().await;
}

#[tokio::test]
async fn streams_transactions_and_moves_the_slot_only_on_ack() {
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "STREAM").await;
    let u = create_user(&client, "s@example.com").await;
    let slot = format!("{}_s", db.name());
    let mut conn = wal_connect(db.url()).await;
    let created = conn.create_slot(&slot, false).await.unwrap();
    conn.start_replication(&SlotOptions::new(&slot, "supabase_realtime"), Lsn::ZERO).await.unwrap();
    let ack = AckHandle::new(created.consistent_point);
    let config = StreamConfig { status_interval: Duration::from_millis(100), ..StreamConfig::default() };
    let mut stream = ReplicationStream::new(conn, ack.clone(), config, created.consistent_point);

    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) values ($1, 'sales', '{}', $2)",
            &[&d, &u],
        )
        .await
        .unwrap();
    let mut tags = Vec::new();
    let commit = next_matching(&mut stream, "commit", |e| {
        if let Some(t) = tag(e) {
            tags.push(t);
        }
        tag(e) == Some(b'C')
    })
    .await;
    assert_eq!(tags, b"BRIC", "begin, relation, insert, commit");
    let WalEvent::XLogData { data, wal_end, .. } = commit else { unreachable!() };
    let end_lsn = Lsn(u64::from_be_bytes(data[10..18].try_into().unwrap()));
    assert_eq!(wal_end, end_lsn, "a Commit's XLogData position is its end_lsn");

    // Not acknowledged: the slot must not pass the transaction.
    stream.send_status(false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(confirmed_flush(&client, &slot).await < end_lsn, "flush must wait for the ack");

    ack.ack(end_lsn);
    stream.send_status(false).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while confirmed_flush(&client, &slot).await < end_lsn {
        assert!(tokio::time::Instant::now() < deadline, "slot never reached {end_lsn}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conn = stream.stop().await.unwrap();
    conn.terminate().await;
}

#[tokio::test]
async fn an_idle_publication_does_not_hold_wal_back() {
    let (db, client) = migrated_db().await;
    client.batch_execute("create table public.unpublished (id serial primary key, v text)").await.unwrap();
    let slot = format!("{}_s", db.name());
    let mut conn = wal_connect(db.url()).await;
    let created = conn.create_slot(&slot, false).await.unwrap();
    conn.start_replication(&SlotOptions::new(&slot, "supabase_realtime"), Lsn::ZERO).await.unwrap();
    let ack = AckHandle::new(created.consistent_point);
    let config = StreamConfig { status_interval: Duration::from_millis(100), ..StreamConfig::default() };
    let mut stream = ReplicationStream::new(conn, ack, config, created.consistent_point);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let stop = tokio_util::sync::CancellationToken::new();
    let pump = tokio::spawn(async move {
        let result = stream.pump(&tx, &stop).await;
        (stream, result)
    });
    let drain = tokio::spawn(async move {
        let mut data = 0;
        while let Some(batch) = rx.recv().await {
            let batch: Vec<WalEvent> = batch;
            data += batch.iter().filter(|event| matches!(event, WalEvent::XLogData { .. })).count();
        }
        data
    });

    let start = confirmed_flush(&client, &slot).await;
    let mut last = start;
    for round in 0..5 {
        client
            .execute("insert into public.unpublished (v) select 'x' from generate_series(1, 100)", &[])
            .await
            .unwrap();
        let target: String = client.query_one("select pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
        let target: Lsn = target.parse().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let now = confirmed_flush(&client, &slot).await;
            if now >= target {
                last = now;
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: confirmed_flush_lsn stuck at {now}, WAL at {target}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(last > start);
    pump.abort();
    drain.abort();
    let _ = drain.await;
}

#[tokio::test]
async fn scram_and_md5_password_users_connect() {
    let (db, client) = migrated_db().await;
    let suffix = db.name().rsplit('_').next().unwrap().to_owned();
    let scram_user = format!("walcast_scram_{suffix}");
    let md5_user = format!("walcast_md5_{suffix}");
    client
        .batch_execute(&format!(
            "set password_encryption = 'scram-sha-256';
             create role {scram_user} login replication password 'sc-pass';
             set password_encryption = 'md5';
             create role {md5_user} login replication password 'md5-pass';"
        ))
        .await
        .unwrap();
    let server = db.server();
    let hba_scram = format!("host all {scram_user} 127.0.0.1/32 scram-sha-256");
    let hba_scram_repl = format!("host replication {scram_user} 127.0.0.1/32 scram-sha-256");
    let hba_md5 = format!("host all {md5_user} 127.0.0.1/32 md5");
    let hba_md5_repl = format!("host replication {md5_user} 127.0.0.1/32 md5");
    let changed = server.with_cluster(|c| c.prepend_hba(&[&hba_scram, &hba_scram_repl, &hba_md5, &hba_md5_repl]));
    let Some(changed) = changed else {
        eprintln!("TEST_DATABASE_URL server: pg_hba.conf is not ours; password methods depend on its configuration");
        return;
    };
    changed.unwrap();
    let port = tokio_postgres::Config::from_str(db.url()).unwrap().get_ports()[0];

    for (user, password) in [(&scram_user, "sc-pass"), (&md5_user, "md5-pass")] {
        let url = format!("postgres://{user}:{password}@127.0.0.1:{port}/{}", db.name());
        let mut conn = wal_connect(&url).await;
        assert_eq!(conn.identify_system().await.unwrap().dbname.as_deref(), Some(db.name()));
        conn.terminate().await;

        let bad = format!("postgres://{user}:wrong@127.0.0.1:{port}/{}", db.name());
        let config = tokio_postgres::Config::from_str(&bad).unwrap();
        let err = WalConnection::connect(&config, CONNECT_TIMEOUT).await.unwrap_err();
        assert!(matches!(err, ReplicationError::Auth(_)), "{user}: {err:?}");
        assert!(!err.is_transient());
        assert!(!err.to_string().contains("wrong"), "never echo the password: {err}");

        let none = format!("postgres://{user}@127.0.0.1:{port}/{}", db.name());
        let config = tokio_postgres::Config::from_str(&none).unwrap();
        let err = WalConnection::connect(&config, CONNECT_TIMEOUT).await.unwrap_err();
        assert!(err.to_string().contains("has none"), "{err}");
    }
}

#[tokio::test]
async fn unix_socket_connections_work() {
    let (db, _client) = migrated_db().await;
    let Some(conninfo) = db.server().with_cluster(|c| c.socket_conninfo(db.name())) else {
        return; // external server: no socket of ours
    };
    let config = tokio_postgres::Config::from_str(&conninfo).unwrap();
    let mut conn = WalConnection::connect(&config, CONNECT_TIMEOUT).await.unwrap();
    assert!(conn.identify_system().await.is_ok());
    // Pinned settings: the walsender session runs with UTC and ISO dates.
    let tz = conn.simple_query("show timezone").await.unwrap();
    assert_eq!(tz.rows[0][0].as_deref(), Some("UTC"));
    let style = conn.simple_query("show datestyle").await.unwrap();
    assert_eq!(style.rows[0][0].as_deref(), Some("ISO, MDY"));
    conn.terminate().await;
}

#[tokio::test]
async fn errors_are_classified_and_tell_the_fix() {
    let (db, client) = migrated_db().await;
    let slot = format!("{}_s", db.name());
    // A slot that does not exist.
    let mut conn = wal_connect(db.url()).await;
    let err = conn.start_replication(&SlotOptions::new(&slot, "supabase_realtime"), Lsn::ZERO).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("fix:"), "{err}");

    // A missing publication surfaces at the first decoded change (PG ≤ 17).
    conn.create_slot(&slot, false).await.unwrap();
    conn.start_replication(&SlotOptions::new(&slot, "no_such_publication"), Lsn::ZERO).await.unwrap();
    let mut stream = ReplicationStream::new(conn, AckHandle::default(), StreamConfig::default(), Lsn::ZERO);
    let d = create_dealership(&client, "ERR").await;
    let u = create_user(&client, "e@example.com").await;
    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) values ($1, 'sales', '{}', $2)",
            &[&d, &u],
        )
        .await
        .unwrap();
    let err = first_error(&mut stream).await;
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(err.to_string().contains("CREATE PUBLICATION"), "{err}");
    assert!(!err.is_transient());

    // The slot held by another connection: transient.
    let mut first = wal_connect(db.url()).await;
    first.start_replication(&SlotOptions::new(&slot, "supabase_realtime"), Lsn::ZERO).await.unwrap();
    let mut second = wal_connect(db.url()).await;
    let err = second.start_replication(&SlotOptions::new(&slot, "supabase_realtime"), Lsn::ZERO).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("55006"), "{err}");
    assert!(err.is_transient());

    // The walsender terminated by an administrator: transient.
    let pid = first.pid();
    let mut stream = ReplicationStream::new(first, AckHandle::default(), StreamConfig::default(), Lsn::ZERO);
    client.execute("select pg_terminate_backend($1)", &[&pid]).await.unwrap();
    let err = first_error(&mut stream).await;
    assert!(err.is_transient(), "{err:?}");
}

/// Reads until the stream fails; returns that error.
async fn first_error(stream: &mut ReplicationStream) -> ReplicationError {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(err) = stream.next().await {
                return err;
            }
        }
    })
    .await
    .expect("an error")
}

/// Waits until the collector's source has started streaming once.
async fn wait_started(collector: &Collector) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while collector.starts.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "source never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the source task and collects the ids of committed inserts, acking
/// each Commit; a `Started` event drops the ids of a transaction left open by
/// the broken connection (the server resends it whole).
struct Collector {
    ids: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    starts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<Result<(), ReplicationError>>,
    stop: tokio_util::sync::CancellationToken,
}

fn collect_source(url: &str, slot: &str) -> Collector {
    use walcast::pgoutput::{decode, Message, TupleValue};
    use walcast::replication::{run_source, SourceConfig, SourceEvent};
    let config = SourceConfig {
        connection: tokio_postgres::Config::from_str(url).unwrap().into(),
        slot: SlotOptions::new(slot, "supabase_realtime"),
        stream: StreamConfig { status_interval: Duration::from_millis(100), ..StreamConfig::default() },
        connect_timeout: CONNECT_TIMEOUT,
        export_snapshot: false,
        heartbeat: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let stop = tokio_util::sync::CancellationToken::new();
    let ack = AckHandle::default();
    let task = tokio::spawn(run_source(config, tx, ack.clone(), stop.clone()));
    let ids = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let starts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (ids2, starts2) = (std::sync::Arc::clone(&ids), std::sync::Arc::clone(&starts));
    tokio::spawn(async move {
        let mut pending: Vec<String> = Vec::new();
        while let Some(event) = rx.recv().await {
            match event {
                SourceEvent::Snapshot(lease) => lease.release(),
                SourceEvent::Started { .. } => {
                    starts2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    pending.clear();
                }
                SourceEvent::Wal(batch) => {
                    for event in batch {
                        let WalEvent::XLogData { data, .. } = event else { continue };
                        match decode(&data).unwrap() {
                            Message::Insert(insert) => {
                                if let Some(TupleValue::Text(id)) = insert.new.columns.first() {
                                    pending.push(String::from_utf8(id.to_vec()).unwrap());
                                }
                            }
                            Message::Commit(commit) => {
                                ids2.lock().unwrap().extend(pending.drain(..));
                                ack.ack(commit.end_lsn);
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    });
    Collector { ids, starts, task, stop }
}

#[tokio::test]
async fn the_source_reconnects_after_the_walsender_is_terminated_without_loss() {
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "RECON").await;
    let u = create_user(&client, "r@example.com").await;
    let slot = format!("{}_s", db.name());
    let collector = collect_source(db.url(), &slot);
    wait_started(&collector).await;
    let mut expected = std::collections::BTreeSet::new();
    for round in 0..6 {
        let ids: Vec<uuid::Uuid> = client
            .query(
                "insert into public.orders (dealership_id, type, customer_info, created_by)
                 select $1, 'sales', '{}', $2 from generate_series(1, 50) returning id",
                &[&d, &u],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        expected.extend(ids.iter().map(|id| id.to_string()));
        if round % 2 == 1 {
            // Kill the walsender (ours is the one streaming this slot).
            let pid: Option<i32> = client
                .query_opt("select active_pid from pg_replication_slots where slot_name = $1", &[&slot])
                .await
                .unwrap()
                .and_then(|r| r.get(0));
            if let Some(pid) = pid {
                client.execute("select pg_terminate_backend($1)", &[&pid]).await.unwrap();
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = collector.ids.lock().unwrap().clone();
        if expected.is_subset(&got) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing {} of {} committed rows after reconnects",
            expected.difference(&got).count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(collector.starts.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the source reconnected");
    collector.stop.cancel();
    collector.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_restarted_consumer_resumes_after_its_last_ack() {
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "RESUME").await;
    let u = create_user(&client, "q@example.com").await;
    let slot = format!("{}_s", db.name());
    let insert = |n: i64| {
        let client = &client;
        async move {
            client
                .query(
                    "insert into public.orders (dealership_id, type, customer_info, created_by)
                     select $1, 'sales', '{}', $2 from generate_series(1, $3::int8) returning id::text",
                    &[&d, &u, &n],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<std::collections::BTreeSet<_>>()
        }
    };
    // First consumer: creates the slot, sees and acks the first batch, stops.
    let first = collect_source(db.url(), &slot);
    wait_started(&first).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let batch1 = insert(30).await;
    while !batch1.is_subset(&first.ids.lock().unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "first batch not received");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.stop.cancel();
    first.task.await.unwrap().unwrap();

    // Written while no consumer runs.
    let batch2 = insert(40).await;

    let second = collect_source(db.url(), &slot);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !batch2.is_subset(&second.ids.lock().unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "rows written while stopped were lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = second.ids.lock().unwrap().clone();
    assert!(seen.is_disjoint(&batch1), "a transaction acknowledged before the stop was sent again");
    second.stop.cancel();
    second.task.await.unwrap().unwrap();
}

/// A backlog is handed on in batches (many messages per hand-off), in order,
/// and batching does not change the acknowledgement rule: the slot moves to
/// the acknowledged Commit and no further, though later transactions of the
/// same batches were received.
#[tokio::test]
async fn a_backlog_arrives_in_ordered_batches_and_the_slot_moves_only_to_the_acknowledged_commit() {
    let (db, client) = migrated_db().await;
    let d = create_dealership(&client, "BATCH").await;
    let u = create_user(&client, "b@example.com").await;
    let slot = format!("{}_s", db.name());
    let mut conn = wal_connect(db.url()).await;
    let created = conn.create_slot(&slot, false).await.unwrap();
    for _ in 0..3 {
        client
            .execute(
                "insert into public.orders (dealership_id, type, customer_info, created_by)
                 select $1, 'sales', jsonb_build_object('n', g), $2 from generate_series(1, 1000) g",
                &[&d, &u],
            )
            .await
            .unwrap();
    }
    conn.start_replication(&SlotOptions::new(&slot, "supabase_realtime"), Lsn::ZERO).await.unwrap();
    let ack = AckHandle::new(created.consistent_point);
    let config = StreamConfig { status_interval: Duration::from_millis(100), ..StreamConfig::default() };
    let mut stream = ReplicationStream::new(conn, ack.clone(), config, created.consistent_point);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    let pump = tokio::spawn(async move { stream.pump(&tx, &stop2).await });

    let (mut tags, mut ends, mut largest) = (Vec::new(), Vec::new(), 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ends.len() < 3 {
        let batch: Vec<WalEvent> =
            tokio::time::timeout_at(deadline, rx.recv()).await.expect("three commits in time").expect("pump open");
        assert!(!batch.is_empty(), "a batch is never empty");
        largest = largest.max(batch.len());
        for event in &batch {
            let WalEvent::XLogData { data, .. } = event else { continue };
            tags.push(data[0]);
            if data[0] == b'C' {
                ends.push(walcast::replication::progress::commit_end(data).unwrap());
            }
        }
    }
    assert!(largest > 1, "a backlog of 3,000 rows came one message per hand-off");
    // Order: each transaction is Begin, its (at least) 1,000 Inserts, Commit
    // (Relation and Type messages, and changes other tables' triggers make,
    // left aside).
    let text: String = tags.iter().filter(|t| matches!(t, b'B' | b'I' | b'C')).map(|&t| t as char).collect();
    let transactions: Vec<&str> = text.split_terminator('C').collect();
    assert_eq!(transactions.len(), 3, "{} messages", text.len());
    for t in transactions {
        assert!(t.starts_with('B') && t[1..].chars().all(|c| c == 'I') && t.len() > 1000, "{} messages", t.len());
    }
    assert!(ends[0] < ends[1] && ends[1] < ends[2]);

    // Only the first transaction acknowledged: the slot reaches it, not more.
    ack.ack(ends[0]);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while confirmed_flush(&client, &slot).await < ends[0] {
        assert!(tokio::time::Instant::now() < until, "slot never reached the acknowledged commit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several status intervals later it still has not passed it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at = confirmed_flush(&client, &slot).await;
    assert!(at >= ends[0] && at < ends[1], "slot at {at}, acknowledged {}, next commit {}", ends[0], ends[1]);

    ack.ack(ends[2]);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while confirmed_flush(&client, &slot).await < ends[2] {
        assert!(tokio::time::Instant::now() < until, "slot never reached the last acknowledged commit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = pump.await;
}
