//! The relay's memory under stalled readers, with `walcast serve` as a child
//! process (the binary this build made, with its global allocator):
//!
//! 1. the global outbox budget bounds it: 1,000 sockets that join a channel
//!    each (frames of their own) and never read, orders written until
//!    `/metrics` shows the fan-out paused on a 32 MiB budget (or the outboxes
//!    at 90 % of it); RSS, sampled every 50 ms, stays within baseline +
//!    budget + 32 MiB, the baseline being the RSS once all 1,000 joined;
//! 2. the memory of closed clients goes back to the system: after every
//!    socket is dropped, RSS is within 20 % of the baseline within 10 s;
//! 3. the pipeline recovered: a fresh reader receives a new order.
//!
//! Figures are printed; run with `--nocapture` to see them. The allocator
//! choice these assertions guard is in `src/main.rs` and
//! `docs/memory-bench.md`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use walcast::hub::Vsn;
use walcast::load::client::{Endpoint, Subscribed};
use walcast::load::relay::{proc_sample, raise_nofile};

use crate::support::load::{poll, slot_state};
use crate::support::relay::{try_get, RelayProcess};
use crate::support::server::{anon, token};
use crate::support::{create_dealership, create_user, migrated_db};

/// Stalled sockets.
const SOCKETS: usize = 1000;
/// `--outbox-budget`.
const BUDGET: u64 = 32 << 20;
/// What RSS may exceed baseline + budget by (allocator and bookkeeping).
const SLACK: u64 = 32 << 20;
/// How long after the last close RSS has to be back.
const RETURN_WITHIN: Duration = Duration::from_secs(10);
/// "Back": within this share of the baseline.
const BACK_WITHIN: f64 = 0.20;
/// Any other wait.
const WAIT: Duration = Duration::from_secs(30);

/// A metric's value (unlabelled sample) from `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (status, body) = try_get(addr, "/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics")) as u64
}

/// The child's RSS in bytes.
fn rss(pid: u32) -> u64 {
    proc_sample(pid).expect("the relay's /proc entry").rss_kb * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_stay_in_budget_and_their_memory_returns() {
    let started = Instant::now();
    // The test process holds 1,000 sockets; the relay inherits the limit.
    raise_nofile(4 * SOCKETS as u64);
    let (db, client) = migrated_db().await;
    let dealership = create_dealership(&client, "MEM").await;
    let user = create_user(&client, "mem@walcast.invalid").await;
    let slot = format!("mem_{}", db.name());
    let budget = BUDGET.to_string();
    let max_connections = (SOCKETS + 64).to_string();
    let mut relay = RelayProcess::spawn(
        db.url(),
        &slot,
        &["--outbox-budget", &budget, "--ws-write-buffer", "4096", "--max-connections", &max_connections],
    );
    relay.wait_serving().await;
    let (addr, pid) = (relay.addr, relay.pid());

    // 1,000 readers, a channel each, that never read.
    let endpoint = Endpoint::new(addr, "/realtime/v1/websocket", &anon(), Vsn::V2);
    let service = token("service_role", None, 3600);
    let bindings = json!([{"event": "*", "schema": "public", "table": "orders"}]);
    let stalled: Vec<Subscribed> = futures::stream::iter(0..SOCKETS)
        .map(|k| Subscribed::connect(&endpoint, None, format!("realtime:mem-{k}"), bindings.clone(), &service, WAIT))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("subscribe: {e}\n{}", relay.output()));
    poll("the slot streaming", WAIT, || async {
        slot_state(&client, &slot).await.and_then(|s| s.active_pid).map(|_| ())
    })
    .await;
    let connected = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss(pid);

    // Orders until the budget is full, RSS sampled all along.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = proc_sample(pid) {
                    peak.fetch_max(s.rss_kb * 1024, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut orders = 0i64;
    let fill_deadline = Instant::now() + WAIT;
    let (outbox_bytes, pauses) = loop {
        client
            .execute(
                "insert into public.orders (dealership_id, order_number, type, customer_info, created_by, metadata)
                 select $1, 'MEM-' || g, 'sales', jsonb_build_object('name', 'customer ' || g), $2,
                        jsonb_build_object('notes', repeat(md5(g::text), 32))
                 from generate_series($3::bigint, $3::bigint + 49) g",
                &[&dealership, &user, &orders],
            )
            .await
            .expect("insert orders");
        orders += 50;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (bytes, pauses) =
            (metric(addr, "walcast_outbox_bytes").await, metric(addr, "walcast_fanout_pauses_total").await);
        if pauses > 0 || bytes >= BUDGET * 9 / 10 {
            break (bytes, pauses);
        }
        assert!(Instant::now() < fill_deadline, "outboxes at {bytes} bytes after {orders} orders: budget not reached");
    };
    let filled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let peak = peak.load(Ordering::Relaxed).max(rss(pid));
    println!(
        "{SOCKETS} stalled readers: baseline {:.1} MiB, peak {:.1} MiB (+{:.1}) with {:.1} MiB in the outboxes, \
         {pauses} pauses, after {orders} orders",
        mib(baseline),
        mib(peak),
        mib(peak - baseline),
        mib(outbox_bytes),
    );
    assert!(
        peak <= baseline + BUDGET + SLACK,
        "RSS peaked at {:.1} MiB, over baseline {:.1} + budget {:.0} + {:.0} MiB",
        mib(peak),
        mib(baseline),
        mib(BUDGET),
        mib(SLACK)
    );

    // Close every socket; the memory goes back.
    let closed_at = Instant::now();
    drop(stalled);
    let limit = (baseline as f64 * (1.0 + BACK_WITHIN)) as u64;
    let mut last = rss(pid);
    while last > limit && closed_at.elapsed() < RETURN_WITHIN {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = rss(pid);
    }
    let back = closed_at.elapsed();
    println!(
        "after the close: {:.1} MiB ({:.0} % of baseline) after {back:.2?}",
        mib(last),
        100.0 * last as f64 / baseline as f64
    );
    assert!(
        last <= limit,
        "RSS {:.1} MiB {RETURN_WITHIN:?} after the last close, over baseline {:.1} MiB + 20 %",
        mib(last),
        mib(baseline)
    );
    poll("every socket closed in the relay", WAIT, || async {
        (metric(addr, "walcast_sockets_open").await == 0 && metric(addr, "walcast_outbox_bytes").await == 0)
            .then_some(())
    })
    .await;

    // The pipeline recovered: a fresh reader gets a new order.
    let mut fresh = Subscribed::connect(&endpoint, None, "realtime:fresh".into(), bindings, &service, WAIT)
        .await
        .unwrap_or_else(|e| panic!("fresh reader: {e}\n{}", relay.output()));
    client
        .execute(
            "insert into public.orders (dealership_id, order_number, type, customer_info, created_by)
             values ($1, 'MEM-FRESH', 'sales', '{}', $2)",
            &[&dealership, &user],
        )
        .await
        .expect("insert the fresh order");
    let (got, _) = fresh.count_changes(1, WAIT).await.unwrap_or_else(|e| panic!("fresh reader: {e}"));
    assert_eq!(got, 1, "the fresh reader receives the new order");
    println!(
        "connected in {connected:.1?}, budget full at {filled:.1?}, memory back {back:.2?} after the close, \
         {:.1?} in all",
        started.elapsed()
    );
    drop(fresh);
    relay.stop();
    poll("the slot dropped", WAIT, || async {
        client.execute("select pg_drop_replication_slot($1)", &[&slot]).await.ok().map(|_| ())
    })
    .await;
}
