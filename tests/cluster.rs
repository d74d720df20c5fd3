//! Scale-out on NATS JetStream with real processes (`walcast serve` as
//! children), a real nats-server (single node, and a 3-node cluster with
//! replicas 3) and a real PostgreSQL: one source holds the slot and
//! publishes, edges serve sockets from the stream, a standby takes over.
//!
//! In each test: every user receives exactly the orders row level security
//! lets them see (0 leaks), each once (0 duplicates), in commit order, and
//! every order committed after the user's join reply arrives — across a
//! `kill -9` of the leader, a transaction larger than the server's
//! `max_payload` (chunked) cut by that kill, a nats-server restart, and an
//! edge cut from NATS past its grace period (not ready, sockets closed with
//! 1013). Deadlines are generous ceilings ([`WAIT`]); takeover times are
//! printed (`--nocapture`), and benchmarked in docs/benchmarks.md.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use uuid::Uuid;

use crate::faults::fixture;
use crate::support::load::{poll, ChangeWitness, OrderWriter, Write};
use crate::support::migrated_db;
use crate::support::nats::{NatsCluster, NatsServer};
use crate::support::relay::{try_get, RelayProcess};
use crate::support::server::user;

/// The longest any one wait may take.
const WAIT: Duration = Duration::from_secs(40);

/// A node of `role` on `slot` (lease 2 s, a snapshot at most every 0.5 s,
/// a spill directory of its own).
fn node(db_url: &str, slot: &str, nats: &str, role: &str, extra: &[&str]) -> RelayProcess {
    let spill = std::env::temp_dir().join(format!("walcast-cluster-{}", Uuid::new_v4().simple()));
    let spill = spill.to_str().expect("a UTF-8 temp dir").to_owned();
    let mut flags = vec!["--nats-url", nats, "--node-role", role, "--lease-ttl-secs", "2", "--spill-dir", &spill];
    flags.extend_from_slice(&["--snapshot-interval-secs", "0.5"]);
    flags.extend_from_slice(extra);
    RelayProcess::spawn(db_url, slot, &flags)
}

/// How long a cluster node may take to serve, or a source to stream: the
/// slot's creation waits for transactions in progress on the (shared, busy)
/// test server, and an edge waits for the first snapshot.
const START: Duration = Duration::from_secs(90);

async fn started(mut relay: RelayProcess) -> RelayProcess {
    relay.wait_serving_within(START).await;
    relay
}

/// Waits until `source` leads and streams (its first snapshot is stored).
async fn streaming(source: &RelayProcess) {
    wait_metric_within(source, "walcast_source_snapshots_total", 1.0, START).await;
}

/// A metric's value (the first sample of `name`), if served.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = try_get(addr, "/metrics").await?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
}

async fn wait_metric(relay: &RelayProcess, name: &str, at_least: f64) -> Duration {
    wait_metric_within(relay, name, at_least, WAIT).await
}

async fn wait_metric_within(relay: &RelayProcess, name: &str, at_least: f64, wait: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if metric(relay.addr, name).await.is_some_and(|v| v >= at_least) {
            return started.elapsed();
        }
        assert!(started.elapsed() < wait, "{name} < {at_least} after {wait:?}:\n{}", relay.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every id of `expected` arrived at `witness`, none twice, nothing else,
/// in `expected`'s order.
async fn assert_exactly(witness: &ChangeWitness, expected: &[Uuid], who: &str, nodes: &[&RelayProcess]) {
    assert_exactly_of(witness, &[expected], who, nodes).await;
}

/// Every id of the `writers`' writes arrived at `witness`, none twice,
/// nothing else, each writer's in its commit order (writers commit
/// concurrently, so only each one's own order is known).
async fn assert_exactly_of(witness: &ChangeWitness, writers: &[&[Uuid]], who: &str, nodes: &[&RelayProcess]) {
    let expected: Vec<Uuid> = writers.concat();
    let missing = witness.wait_for(&expected, WAIT).await;
    let logs = || nodes.iter().map(|n| n.output()).collect::<Vec<_>>().join("\n---\n");
    assert!(missing.is_empty(), "{who}: {} of {} orders never arrived\n{}", missing.len(), expected.len(), logs());
    // Anything more (a leak, a duplicate) would arrive right behind.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = witness.ids();
    let unique: HashSet<&Uuid> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "{who}: {} duplicate deliveries", got.len() - unique.len());
    let allowed: HashSet<&Uuid> = expected.iter().collect();
    let leaks: Vec<&Uuid> = got.iter().filter(|id| !allowed.contains(id)).collect();
    assert!(leaks.is_empty(), "{who}: {} orders it may not see: {leaks:?}", leaks.len());
    for writer in writers {
        let mine: HashSet<&Uuid> = writer.iter().collect();
        let arrived: Vec<Uuid> = got.iter().filter(|id| mine.contains(id)).copied().collect();
        assert_eq!(&arrived, writer, "{who}: commit order");
    }
}

fn ids(writes: &[Write]) -> Vec<Uuid> {
    writes.iter().map(|w| w.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_deliver_exactly_what_rls_allows_and_a_standby_takes_over_after_kill_9() {
    let nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "CLA").await;
    let b = fixture(&client, "CLB").await;
    let slot = format!("{}_c", db.name());
    let mut leader = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    streaming(&leader).await;
    let edge1 = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let edge2 = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let standby = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    assert_eq!(metric(standby.addr, "walcast_source_leader").await, Some(0.0), "one leader at a time");
    // A source serves no sockets.
    let (status, body) = crate::support::server::upgrade(leader.addr, "/realtime/v1/websocket?vsn=1.0.0", &[]).await;
    assert_eq!(status, 503, "{body}");

    let user_a = ChangeWitness::subscribe_as(edge1.addr, &user(a.1)).await;
    let user_b = ChangeWitness::subscribe_as(edge2.addr, &user(b.1)).await;
    let all1 = ChangeWitness::subscribe(edge1.addr).await;
    let all2 = ChangeWitness::subscribe(edge2.addr).await;
    let writer_a = OrderWriter::spawn(db.url(), a.0, a.1, Duration::from_millis(10), None);
    let writer_b = OrderWriter::spawn(db.url(), b.0, b.1, Duration::from_millis(10), None);
    writer_a.wait_count(50, WAIT).await;
    leader.kill9();
    let killed = Instant::now();
    let takeover = wait_metric(&standby, "walcast_source_leader", 1.0).await;
    let count = writer_a.count();
    writer_a.wait_count(count + 50, WAIT).await;
    let (writes_a, writes_b) = (writer_a.finish().await, writer_b.finish().await);
    let (ids_a, ids_b) = (ids(&writes_a), ids(&writes_b));
    let all: [&[Uuid]; 2] = [&ids_a, &ids_b];
    let nodes = [&leader, &edge1, &edge2, &standby];
    assert_exactly(&user_a, &ids(&writes_a), "user A on edge 1", &nodes).await;
    assert_exactly(&user_b, &ids(&writes_b), "user B on edge 2", &nodes).await;
    assert_exactly_of(&all1, &all, "service_role on edge 1", &nodes).await;
    assert_exactly_of(&all2, &all, "service_role on edge 2", &nodes).await;
    assert!(!all1.closed() && !user_b.closed(), "clients stayed connected through the takeover");
    let delivered_by_new = metric(edge1.addr, "walcast_edge_transactions_total").await.unwrap_or(0.0);
    // The failover gap: from the kill to the first order committed after
    // it reaching a client.
    let gap = writes_a
        .iter()
        .chain(&writes_b)
        .filter(|w| w.at > killed)
        .filter_map(|w| all1.arrival(&w.id))
        .min()
        .map(|first| first.duration_since(killed));
    // An edge dies: its client reconnects to the other edge and gets what
    // commits after its new join.
    let mut edge1 = edge1;
    edge1.kill9();
    user_a.wait_closed(WAIT).await;
    let user_a_again = ChangeWitness::subscribe_as(edge2.addr, &user(a.1)).await;
    let after_a = write(&client, a, 3).await;
    let after_b = write(&client, b, 3).await;
    assert_exactly(&user_a_again, &after_a, "user A reconnected to edge 2", &[&standby, &edge2]).await;
    let b_all: Vec<Uuid> = [ids_b.clone(), after_b].concat();
    assert_exactly(&user_b, &b_all, "user B on edge 2", &[&standby, &edge2]).await;
    println!(
        "kill -9 of the leader (lease TTL 2 s): the standby's metric showed it leading {:.2} s after the kill, the \
         first order committed after the kill reached a client {:.2} s after it; {} + {} orders, each delivered \
         once to each entitled client on two edges; edge 1 read {delivered_by_new} transactions",
        takeover.as_secs_f64(),
        gap.map_or(f64::NAN, |g| g.as_secs_f64()),
        writes_a.len(),
        writes_b.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_edge_starts_from_the_snapshot_and_memberships_reach_every_edge() {
    let nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "LTA").await;
    let b = fixture(&client, "LTB").await;
    let slot = format!("{}_l", db.name());
    let source = started(node(db.url(), &slot, &nats.url, "all", &[])).await;
    let early = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let early_a = ChangeWitness::subscribe_as(early.addr, &user(a.1)).await;
    let first = write(&client, a, 3).await;
    // A joins dealership B while the early edge runs (the change travels
    // in the stream), then a late edge starts (from a snapshot that holds
    // it).
    crate::support::add_member(&client, a.1, b.0, "user").await;
    let b_before_late = write(&client, b, 2).await;
    // In the stream (the early edge has them), and a snapshot taken since
    // the first: the late edge starts from one and reads the rest.
    let missing = early_a.wait_for(&b_before_late, WAIT).await;
    assert!(missing.is_empty(), "the early edge got B's orders once A joined B:\n{}", early.output());
    wait_metric(&source, "walcast_source_snapshots_total", 2.0).await;
    let late = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let late_a = ChangeWitness::subscribe_as(late.addr, &user(a.1)).await;
    let on_all = ChangeWitness::subscribe_as(source.addr, &user(a.1)).await;
    let b_after = write(&client, b, 3).await;
    // A leaves B: later B orders reach nobody of A's, A's own still do.
    client
        .execute("delete from public.dealer_memberships where user_id = $1 and dealership_id = $2", &[&a.1, &b.0])
        .await
        .unwrap();
    let _b_hidden = write(&client, b, 3).await;
    let a_last = write(&client, a, 2).await;
    let nodes = [&source, &early, &late];
    let early_expected: Vec<Uuid> = [first.clone(), b_before_late, b_after.clone(), a_last.clone()].concat();
    assert_exactly(&early_a, &early_expected, "user A on the early edge", &nodes).await;
    let late_expected: Vec<Uuid> = [b_after.clone(), a_last.clone()].concat();
    assert_exactly(&late_a, &late_expected, "user A on the late edge", &nodes).await;
    assert_exactly(&on_all, &late_expected, "user A on the `all` node", &nodes).await;
}

/// Waits for `relay` to exit with status 1 and an error line (`walcast: …`)
/// holding every one of `needles`; returns that line.
async fn definite_exit(relay: &mut RelayProcess, needles: &[&str]) -> String {
    let status = relay.wait_exit(WAIT).await.unwrap_or_else(|| panic!("it kept running:\n{}", relay.output()));
    assert_eq!(status.code(), Some(1), "{}", relay.output());
    let line = relay
        .plain_stderr()
        .into_iter()
        .rfind(|l| l.starts_with("walcast: "))
        .unwrap_or_else(|| panic!("no error line:\n{}", relay.output()));
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} is not in the error line: {line}");
    }
    line
}

/// Writes `n` orders for `(dealership, user)` now, one transaction each.
async fn write(client: &Client, fixture: (Uuid, Uuid), n: usize) -> Vec<Uuid> {
    crate::faults::write_now(client, fixture, n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_transaction_cut_by_kill_9_arrives_whole_once_in_order() {
    // 64 KiB messages: a 6,000-row transaction travels in many chunks.
    let nats = NatsServer::start_with("max_payload: 65536\n").await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "BIG").await;
    let slot = format!("{}_b", db.name());
    let mut leader = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    streaming(&leader).await;
    let edge = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let standby = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    let witness = ChangeWitness::subscribe(edge.addr).await;
    let before = metric(leader.addr, "walcast_source_messages_total").await.unwrap_or(0.0);
    const ROWS: i32 = 6000;
    client
        .execute(
            "insert into public.orders (dealership_id, order_number, type, customer_info, metadata, created_by) \
             select $1, 'BIG-' || lpad(n::text, 6, '0'), 'sales', \
                    jsonb_build_object('name', 'Ada Lovelace', 'note', repeat('x', 200)), jsonb_build_object('n', n), $2 \
             from generate_series(1, $3) n",
            &[&a.0, &a.1, &ROWS],
        )
        .await
        .unwrap();
    // Cut the leader once it has published part of the transaction.
    let cut_after = poll("the leader publishing the big transaction", WAIT, || async {
        metric(leader.addr, "walcast_source_messages_total").await.filter(|v| *v >= before + 3.0)
    })
    .await;
    leader.kill9();
    wait_metric(&standby, "walcast_source_leader", 1.0).await;
    let rows = client
        .query("select id from public.orders where order_number like 'BIG-%' order by order_number", &[])
        .await
        .unwrap();
    let expected: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(expected.len(), ROWS as usize);
    assert_exactly(&witness, &expected, "service_role on the edge", &[&leader, &edge, &standby]).await;
    let discarded = metric(edge.addr, "walcast_edge_discarded_total").await.unwrap_or(0.0);
    println!(
        "a {ROWS}-row transaction in 64 KiB chunks, leader killed after {} messages of it: delivered whole, \
         once, in order; the edge discarded {discarded} partial transaction(s)",
        cut_after - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarts_and_an_edge_past_its_grace_period_closes_sockets_then_recovers() {
    let mut nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "NRS").await;
    let slot = format!("{}_n", db.name());
    let source = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    streaming(&source).await;
    let edge = started(node(db.url(), &slot, &nats.url, "edge", &["--edge-max-stale-secs", "1"])).await;
    let witness = ChangeWitness::subscribe(edge.addr).await;
    let before = write(&client, a, 3).await;
    assert_exactly(&witness, &before, "before the restart", &[&source, &edge]).await;

    // NATS goes away: past 1 s the edge is not ready and closes its sockets.
    nats.kill().await;
    let code = witness.wait_closed(WAIT).await;
    assert_eq!(code, Some(1013), "closed with 1013 (try again later)");
    let (status, body) = try_get(edge.addr, "/ready").await.expect("/ready answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("change stream"), "{body}");
    // Changes committed meanwhile wait in the slot.
    let during = write(&client, a, 3).await;
    nats.restart().await;
    poll("the edge ready again", WAIT, || async {
        try_get(edge.addr, "/ready").await.filter(|(s, _)| *s == 200).map(|_| ())
    })
    .await;
    let again = ChangeWitness::subscribe(edge.addr).await;
    let after = write(&client, a, 3).await;
    // The new client is owed what commits after its join; what committed
    // while NATS was down still reaches the stream (the slot kept it).
    assert_exactly_at_least(&again, &after, &[&source, &edge]).await;
    let published = metric(source.addr, "walcast_source_transactions_total").await.unwrap_or(0.0);
    assert!(published >= (before.len() + during.len() + after.len()) as f64, "{published} published");
}

/// Every id of `owed` arrived, once each, in order; ids committed before
/// the client joined may arrive before them.
async fn assert_exactly_at_least(witness: &ChangeWitness, owed: &[Uuid], nodes: &[&RelayProcess]) {
    let missing = witness.wait_for(owed, WAIT).await;
    let logs = || nodes.iter().map(|n| n.output()).collect::<Vec<_>>().join("\n---\n");
    assert!(missing.is_empty(), "{} of {} orders never arrived\n{}", missing.len(), owed.len(), logs());
    let got = witness.ids();
    let unique: HashSet<&Uuid> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicate deliveries");
    let tail: Vec<Uuid> = got.iter().filter(|id| owed.contains(id)).copied().collect();
    assert_eq!(tail, owed, "commit order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_nats_cluster_with_replicas_3_carries_the_stream() {
    let nats = NatsCluster::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "R3C").await;
    let slot = format!("{}_r", db.name());
    let replicas = ["--stream-replicas", "3", "--stream-max-bytes", "67108864", "--stream-max-age-secs", "7200"];
    let mut source = started(node(db.url(), &slot, &nats.url, "source", &replicas)).await;
    streaming(&source).await;
    let edge = started(node(db.url(), &slot, &nats.url, "edge", &replicas)).await;
    let witness = ChangeWitness::subscribe_as(edge.addr, &user(a.1)).await;
    let orders = write(&client, a, 5).await;
    assert_exactly(&witness, &orders, "user A on the edge", &[&source, &edge]).await;
    // The stream really has three replicas.
    let nats_client = async_nats::connect(nats.url.split(',').next().unwrap()).await.unwrap();
    let js = async_nats::jetstream::new(nats_client);
    let mut stream = js.get_stream(format!("WALCAST_{slot}")).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(info.config.max_bytes, 64 << 20, "--stream-max-bytes");
    assert_eq!(info.config.max_age, Duration::from_secs(7200), "--stream-max-age-secs");
    let cluster = info.cluster.clone().expect("clustered");
    assert_eq!(cluster.replicas.len(), 2, "a leader and two replicas: {cluster:?}");
    // A leader stopped cleanly (SIGTERM) hands over: a standby leads and
    // the stream goes on.
    let standby = started(node(db.url(), &slot, &nats.url, "source", &replicas)).await;
    source.stop();
    wait_metric(&standby, "walcast_source_leader", 1.0).await;
    let more = write(&client, a, 3).await;
    let all: Vec<Uuid> = [orders, more].concat();
    assert_exactly(&witness, &all, "user A on the edge, after the handover", &[&standby, &edge]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_silently_is_replaced_and_cannot_write_when_it_returns() {
    use crate::support::proxy::{upstream_of, Proxy};
    let nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "CUT").await;
    let slot = format!("{}_s", db.name());
    // The leader reaches NATS and PostgreSQL through proxies that can go
    // silent (no FIN, no RST); everyone else directly.
    let nats_proxy = Proxy::start(upstream_of(&nats.url.replace("nats://", "nats://x@"))).await;
    let pg_proxy = Proxy::start(upstream_of(db.url())).await;
    let leader_nats = format!("nats://{}", nats_proxy.addr);
    let mut leader = RelayProcess::spawn(
        &pg_proxy.url_via(db.url()),
        &slot,
        &[
            "--nats-url",
            &leader_nats,
            "--node-role",
            "source",
            "--lease-ttl-secs",
            "2",
            "--snapshot-interval-secs",
            "0.5",
        ],
    );
    leader.wait_serving_within(START).await;
    streaming(&leader).await;
    let edge = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let standby = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    let witness = ChangeWitness::subscribe(edge.addr).await;
    let writer = OrderWriter::spawn(db.url(), a.0, a.1, Duration::from_millis(10), None);
    writer.wait_count(30, WAIT).await;

    nats_proxy.pause();
    pg_proxy.pause();
    let cut = Instant::now();
    // The standby takes the lease once it expires, ends the silent
    // walsender that still holds the slot, and streams.
    let takeover = wait_metric(&standby, "walcast_source_leader", 1.0).await;
    let count = writer.count();
    writer.wait_count(count + 30, WAIT).await;
    // The old leader comes back: it lost the lease and must not publish.
    nats_proxy.resume();
    pg_proxy.resume();
    poll("the old leader standing down", WAIT, || async {
        metric(leader.addr, "walcast_source_leader").await.filter(|v| *v == 0.0)
    })
    .await;
    let count = writer.count();
    writer.wait_count(count + 20, WAIT).await;
    let writes = writer.finish().await;
    assert_exactly(&witness, &ids(&writes), "service_role on the edge", &[&leader, &edge, &standby]).await;
    assert!(metric(leader.addr, "walcast_source_leadership_lost_total").await.unwrap_or(0.0) >= 1.0);
    assert_eq!(metric(standby.addr, "walcast_source_leader").await, Some(1.0), "one leader");
    println!(
        "leader cut off silently: the standby led {:.2} s after the cut; {} orders, each delivered once in order",
        cut.elapsed().min(takeover).as_secs_f64(),
        writes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_stream_stops_the_source_and_is_never_skipped() {
    let nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "TOO").await;
    let slot = format!("{}_t", db.name());
    let mut source = started(node(db.url(), &slot, &nats.url, "source", &["--stream-max-bytes", "1048576"])).await;
    // Streaming (the first snapshot is stored once the relay streams).
    streaming(&source).await;
    // About 2.5 MB in one transaction: more than the stream may hold.
    client
        .execute(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             select $1, 'sales', jsonb_build_object('name', 'Ada Lovelace', 'note', repeat('x', 300)), $2 \
             from generate_series(1, 6000)",
            &[&a.0, &a.1],
        )
        .await
        .unwrap();
    let committed: String = client.query_one("select pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    let committed: walcast::lsn::Lsn = committed.parse().unwrap();
    definite_exit(&mut source, &["does not fit the stream", "raise --stream-max-bytes"]).await;
    // Never skipped: the slot stays before the transaction's commit…
    let after = crate::support::load::slot_state(&client, &slot).await.and_then(|s| s.confirmed).expect("the slot");
    assert!(after < committed, "the slot moved past the transaction (confirmed {after}, commit before {committed})");
    // …and a source with a stream that holds it publishes it whole.
    let bigger = started(node(db.url(), &slot, &nats.url, "source", &["--stream-max-bytes", "67108864"])).await;
    wait_metric(&bigger, "walcast_source_transactions_total", 1.0).await;
    let bytes = metric(bigger.addr, "walcast_source_bytes_total").await.unwrap_or(0.0);
    assert!(bytes > 2_000_000.0, "the whole transaction was published ({bytes} bytes)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_oracle_over_two_edges_through_a_leader_kill_finds_every_delivery_exact() {
    let nats = NatsServer::start().await;
    let (db, _client) = migrated_db().await;
    let slot = format!("{}_o", db.name());
    let mut leader = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    streaming(&leader).await;
    let edge1 = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let edge2 = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let standby = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    let urls = format!("ws://{}/realtime/v1/websocket,ws://{}/realtime/v1/websocket", edge1.addr, edge2.addr);
    let dir = tempfile::tempdir().unwrap();
    let json_out = dir.path().join("load.json");
    // 40 clients spread over the two edges, orders and membership churn
    // for 6 s; the leader is killed in the middle.
    let load = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"))
        .current_dir(dir.path())
        .args([
            "load",
            "--relay-url",
            &urls,
            "--database-url",
            db.url(),
            "--jwt-secret",
            crate::support::server::SECRET,
        ])
        .args(["--clients", "40", "--users", "20", "--dealerships", "5", "--live-orders", "50"])
        .args(["--rate", "100", "--duration", "6", "--churn", "3", "--drain-timeout", "30"])
        .arg("--json-out")
        .arg(&json_out)
        .output();
    let kill = async {
        // Once the clients are subscribed and the writes run.
        poll("the load writing", WAIT, || async {
            metric(leader.addr, "walcast_source_transactions_total").await.filter(|v| *v >= 100.0)
        })
        .await;
        leader.kill9();
    };
    let (output, ()) = tokio::join!(load, kill);
    let output = output.expect("walcast load runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let logs = [&edge1, &edge2, &standby].iter().map(|n| n.output()).collect::<Vec<_>>().join("\n---\n");
    assert!(output.status.success() && stdout.contains("result: PASS"), "{stdout}\n{stderr}\n{logs}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    let results = &report["results"];
    for check in ["leaks", "duplicates", "missing", "out_of_order", "protocol_errors", "subscribe_failures"] {
        assert_eq!(results["checks"][check], 0, "{check}: {:#}", results["checks"]);
    }
    assert_eq!(results["clients_subscribed"], 40);
    assert_eq!(metric(standby.addr, "walcast_source_leader").await, Some(1.0), "the standby took over");
    println!(
        "walcast load over two edges through a leader kill: {} deliveries expected, {} received, all correct",
        results["deliveries"]["expected"], results["deliveries"]["received"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definite_replication_error_stops_the_source_naming_the_fix() {
    let nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "DEF").await;
    let slot = format!("{}_d", db.name());
    let mut source = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    streaming(&source).await;
    client.batch_execute("drop publication supabase_realtime").await.unwrap();
    // pgoutput notices when it decodes the next published change: the source
    // exits (status 1) with the error and its fix, rather than retry forever.
    write(&client, a, 1).await;
    let line = definite_exit(&mut source, &["publication \"supabase_realtime\" does not exist"]).await;
    println!("a cluster source on a dropped publication: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_misses_what_retention_removed_closes_its_sockets_and_restarts_from_a_snapshot() {
    use crate::support::proxy::{upstream_of, Proxy};
    let nats = NatsServer::start().await;
    let (db, client) = migrated_db().await;
    let a = fixture(&client, "GAP").await;
    let slot = format!("{}_g", db.name());
    let small = ["--stream-max-bytes", "1048576"];
    let source = started(node(db.url(), &slot, &nats.url, "source", &small)).await;
    streaming(&source).await;
    // The edge reaches NATS through a proxy that can go silent.
    let proxy = Proxy::start(upstream_of(&nats.url.replace("nats://", "nats://x@"))).await;
    let via = format!("nats://{}", proxy.addr);
    let edge = started(node(db.url(), &slot, &via, "edge", &["--edge-max-stale-secs", "120"])).await;
    let witness = ChangeWitness::subscribe(edge.addr).await;
    let first = write(&client, a, 3).await;
    assert_exactly(&witness, &first, "before the gap", &[&source, &edge]).await;

    // While the edge hears nothing, the source publishes more than its
    // consumer asked for (an ordered consumer pulls 500 messages ahead)
    // and then more than the stream keeps (1 MiB): what the edge had not
    // read is removed.
    proxy.pause();
    let published = metric(source.addr, "walcast_source_transactions_total").await.unwrap_or(0.0);
    let snapshots = metric(source.addr, "walcast_source_snapshots_total").await.unwrap_or(0.0);
    write(&client, a, 600).await;
    for _ in 0..10 {
        client
            .execute(
                "insert into public.orders (dealership_id, type, customer_info, created_by) \
                 select $1, 'sales', jsonb_build_object('name', 'Ada Lovelace', 'note', repeat('x', 400)), $2 \
                 from generate_series(1, 300)",
                &[&a.0, &a.1],
            )
            .await
            .unwrap();
    }
    wait_metric(&source, "walcast_source_transactions_total", published + 610.0).await;
    wait_metric(&source, "walcast_source_snapshots_total", snapshots + 1.0).await;
    proxy.resume();
    // Its subscribed client is told (1013) rather than served from caches
    // that missed changes; the edge starts again from the snapshot.
    assert_eq!(witness.wait_closed(WAIT).await, Some(1013), "{}", edge.output());
    wait_metric(&edge, "walcast_edge_resyncs_total", 1.0).await;
    let again = ChangeWitness::subscribe(edge.addr).await;
    let after = write(&client, a, 3).await;
    assert_exactly_at_least(&again, &after, &[&source, &edge]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_from_database_reaches_the_clients_of_every_edge_once_in_commit_order() {
    use crate::support::server::{anon, Ws};
    use serde_json::json;
    use walcast::hub::Vsn;
    let nats = NatsServer::start().await;
    let (db, mut client) = migrated_db().await;
    // `walcast setup`: the realtime schema and the walcast_messages publication.
    walcast::schema::migrate(&mut client, &walcast::schema::Migrations::walcast()).await.expect("walcast setup");
    let slot = format!("{}_m", db.name());
    let source = started(node(db.url(), &slot, &nats.url, "source", &[])).await;
    streaming(&source).await;
    let edge1 = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let edge2 = started(node(db.url(), &slot, &nats.url, "edge", &[])).await;
    let topic = "realtime:room-1";
    let mut clients = Vec::new();
    for edge in [&edge1, &edge2] {
        let mut ws = Ws::connect(edge.addr, "/realtime/v1/websocket", &anon(), Some(Vsn::V1)).await;
        ws.send(Some("1"), topic, "phx_join", json!({"config": {"broadcast": {"self": false}}})).await;
        assert_eq!(ws.expect(topic, "phx_reply").await.payload["status"], "ok");
        clients.push(ws);
    }
    for n in 1..=3 {
        client.execute(&format!("select realtime.send('{{\"n\": {n}}}', 'ev', 'room-1', false)"), &[]).await.unwrap();
    }
    // A private message and another room's reach neither.
    client.execute("select realtime.send('{\"n\": 9}', 'ev', 'room-1', true)", &[]).await.unwrap();
    client.execute("select realtime.send('{\"n\": 8}', 'ev', 'room-2', false)", &[]).await.unwrap();
    for (i, ws) in clients.iter_mut().enumerate() {
        for n in 1..=3 {
            let frame = ws.expect(topic, "broadcast").await;
            assert_eq!(frame.payload["payload"]["n"], n, "edge {}: {}", i + 1, frame.raw);
        }
        // Nothing more: no copy through the other edge, no private row.
        let extra = ws.next_within(Duration::from_millis(500)).await;
        assert!(extra.is_none(), "edge {}: {:?}", i + 1, extra.map(|f| f.raw));
    }
}
