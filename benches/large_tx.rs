//! P7: the relay's peak memory through one 1,000,000-row transaction.
//!
//! `cargo bench --bench large_tx` (env: `WALCAST_BENCH_ROWS`, default
//! 1,000,000; `WALCAST_BENCH_RUNS`, default 3; `WALCAST_BENCH_RELAY_EXE`, a
//! wrapper to run the relay under, e.g. a heap profiler).
//!
//! One ephemeral cluster with the walcast schema; dealerships A and B; three
//! users: `all` (member of A, `public.orders` `*`), `few` (member of A,
//! `status=eq.pending`, which one row in 1,000 matches) and `other` (member
//! of B). Each run starts `walcast serve` as a child process (a slot of its
//! own), subscribes the three over WebSocket (vsn 2.0.0), then one `INSERT …
//! SELECT generate_series` writes ROWS orders into A in one transaction
//! (with explicit order numbers: the numbering trigger's one counter row,
//! updated once per order, makes a single-transaction bulk insert into one
//! dealership quadratic — 131 s for 100,000 rows — and is not what this
//! measures). The
//! relay's RSS is sampled every 20 ms from `/proc`, and its `VmHWM` (peak
//! RSS of the process's life) read at the end. `few` and `other` must receive
//! exactly what they may see (ROWS/1000 and 0) or the run fails; `all` must
//! receive every row or be closed with 1013 (slow consumer: its bounded
//! outbox filled faster than its socket drained), and the table says which.
//! The relay is stopped after each run, so each peak is one run's.

mod common;
use common::{env_or, median};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use walcast::cluster::Cluster;
use walcast::hub::Vsn;
use walcast::load::client::{Endpoint, Subscribed};
use walcast::load::relay::{proc_sample, spawn_child, ChildRelay};
use walcast::realtime::auth::sign_hs256;
use walcast::schema::{self, Migrations};

const SECRET: &str = "p7-bench-secret-p7-bench-secret-0123456789";

fn token(role: &str, sub: Option<uuid::Uuid>) -> String {
    let now = walcast::realtime::session::now_unix();
    let mut claims = json!({"role": role, "iat": now, "exp": now + 6 * 3600, "aud": "authenticated"});
    if let Some(sub) = sub {
        claims["sub"] = json!(sub);
    }
    sign_hs256(SECRET.as_bytes(), &claims)
}

/// One run's figures.
struct Run {
    baseline_kb: u64,
    sampled_peak_kb: u64,
    hwm_kb: u64,
    insert: Duration,
    /// Commit → the last row at `all` (when it took every row).
    commit_to_last: Option<Duration>,
    /// What `all` got.
    all_outcome: String,
    relay_cpu_s: f64,
}

struct Users {
    all: uuid::Uuid,
    few: uuid::Uuid,
    other: uuid::Uuid,
    dealership_a: uuid::Uuid,
}

async fn run_once(
    cluster: &Cluster,
    db: &tokio_postgres::Client,
    users: &Users,
    rows: u64,
    i: usize,
) -> anyhow::Result<Run> {
    let slot = format!("p7_run{i}");
    let log = std::path::PathBuf::from("target").join("bench").join(format!("large-tx-relay-{i}.log"));
    let _ = std::fs::remove_file(&log);
    // A wrapper (e.g. running the relay under `valgrind --tool=massif`) may
    // stand in for the relay executable.
    let exe = std::env::var_os("WALCAST_BENCH_RELAY_EXE")
        .map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_walcast")), std::path::PathBuf::from);
    let relay = spawn_child(&ChildRelay {
        exe: &exe,
        database_url: &cluster.url("bench"),
        jwt_secret: SECRET,
        slot: &slot,
        max_connections: 64,
        log: &log,
        extra_args: &[],
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pid = relay.pid().context("the child relay's pid")?;
    let endpoint = Endpoint::new(relay.addr(), relay.path(), &token("anon", None), Vsn::V2);
    let orders = |filter: Option<&str>| {
        let mut binding = json!({"event": "*", "schema": "public", "table": "orders"});
        if let Some(filter) = filter {
            binding["filter"] = json!(filter);
        }
        json!([binding])
    };
    let wait = Duration::from_secs(30);
    let topic = || "realtime:p7".to_owned();
    let mut all =
        Subscribed::connect(&endpoint, None, topic(), orders(None), &token("authenticated", Some(users.all)), wait)
            .await
            .map_err(|e| anyhow::anyhow!("subscribe all: {e}"))?;
    let mut few = Subscribed::connect(
        &endpoint,
        None,
        topic(),
        orders(Some("status=eq.pending")),
        &token("authenticated", Some(users.few)),
        wait,
    )
    .await
    .map_err(|e| anyhow::anyhow!("subscribe few: {e}"))?;
    let mut other =
        Subscribed::connect(&endpoint, None, topic(), orders(None), &token("authenticated", Some(users.other)), wait)
            .await
            .map_err(|e| anyhow::anyhow!("subscribe other: {e}"))?;
    // The relay streams from its slot (subscriptions are live only once it does).
    let active: bool = db
        .query_one("select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1", &[&slot])
        .await?
        .get(0);
    if !active {
        bail!("slot {slot} is not streaming");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proc_sample(pid).context("relay /proc")?;

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before.rss_kb));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = proc_sample(pid) {
                    peak.fetch_max(s.rss_kb, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let idle = Duration::from_secs(60);
    let want_few = rows / 1000;
    let all_task = tokio::spawn(async move { all.count_changes(rows, idle).await });
    let few_task = tokio::spawn(async move { few.count_changes(want_few, idle).await });
    // Returns only if B's member gets something (or its socket fails).
    let other_task = tokio::spawn(async move { other.count_changes(1, Duration::from_secs(3600)).await });
    let started = Instant::now();
    db.execute(
        "insert into public.orders (dealership_id, order_number, type, status, customer_info, vehicle_info,
                                    created_by, metadata)
         select $1, 'A-BULK' || $4::bigint || '-' || lpad(g::text, 7, '0'), 'sales',
                case when g % 1000 = 0 then 'pending' else 'draft' end,
                jsonb_build_object('name', 'customer ' || g, 'email', 'c' || g || '@example.com'),
                jsonb_build_object('vin', md5(g::text), 'make', 'Honda', 'year', 2024),
                $2, '{}'
         from generate_series(1, $3::bigint) g",
        &[&users.dealership_a, &users.all, &(rows as i64), &(i as i64)],
    )
    .await?;
    let committed = Instant::now();
    let insert = committed - started;
    let (got_few, _) = few_task.await?.map_err(|e| anyhow::anyhow!("client few: {e}"))?;
    // `all` is owed every row; a client that cannot take them as fast as the
    // relay produces them is closed as a slow consumer (bounded outbox): that
    // is reported, not hidden.
    let (all_outcome, last_all) = match all_task.await? {
        Ok((n, last)) if n == rows => ("every row".to_owned(), last),
        Ok((n, _)) => bail!("client all: {n} of {rows} deliveries, then silence"),
        Err(e) if e.contains("1013 slow consumer") => {
            let after = e.split(" after ").nth(1).and_then(|t| t.split(' ').next()).unwrap_or("?");
            (format!("closed 1013 (slow consumer) after {after}"), None)
        }
        Err(e) => bail!("client all: {e}"),
    };
    // Anything for B's member would have come with A's rows: a short grace.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got_other = if other_task.is_finished() {
        other_task.await?.map_err(|e| anyhow::anyhow!("client other: {e}"))?.0
    } else {
        other_task.abort();
        0
    };
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let after = proc_sample(pid).context("relay /proc")?;
    relay.stop().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    for _ in 0..50 {
        if db.execute("select pg_drop_replication_slot($1)", &[&slot]).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if (got_few, got_other) != (want_few, 0) {
        bail!("deliveries few/other = {got_few}/{got_other}, expected {want_few}/0");
    }
    // A panic anywhere in the relay is a bug (and, with RUST_BACKTRACE set,
    // its symbolized backtrace once cost ~100 MiB of this peak).
    let relay_log = std::fs::read_to_string(&log).unwrap_or_default();
    if relay_log.contains("panicked") {
        bail!("the relay panicked (see {})", log.display());
    }
    Ok(Run {
        baseline_kb: before.rss_kb,
        sampled_peak_kb: peak.load(Ordering::Relaxed),
        hwm_kb: after.hwm_kb,
        insert,
        commit_to_last: last_all.map(|t| t.saturating_duration_since(committed)),
        all_outcome,
        relay_cpu_s: after.ticks.saturating_sub(before.ticks) as f64 / walcast::load::relay::ticks_per_second(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rows: u64 = env_or("WALCAST_BENCH_ROWS", 1_000_000).max(1000);
    let runs: usize = env_or("WALCAST_BENCH_RUNS", 3).max(1);
    let (cluster, mut db) = common::bench_database().await?;
    schema::migrate(&mut db, &Migrations::embedded()).await?;
    let users = Users {
        all: uuid::Uuid::new_v4(),
        few: uuid::Uuid::new_v4(),
        other: uuid::Uuid::new_v4(),
        dealership_a: uuid::Uuid::new_v4(),
    };
    let dealership_b = uuid::Uuid::new_v4();
    db.execute(
        "insert into public.dealerships (id, name, code) values ($1, 'A', 'A'), ($2, 'B', 'B')",
        &[&users.dealership_a, &dealership_b],
    )
    .await?;
    for (user, dealership) in
        [(users.all, users.dealership_a), (users.few, users.dealership_a), (users.other, dealership_b)]
    {
        let email = format!("{user}@walcast.invalid");
        db.execute("insert into auth.users (id, email) values ($1, $2)", &[&user, &email]).await?;
        db.execute("insert into public.profiles (id, email) values ($1, $2)", &[&user, &email]).await?;
        db.execute(
            "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user')",
            &[&user, &dealership],
        )
        .await?;
    }

    println!("P7: relay peak RSS through one {rows}-row transaction (walcast serve as a child process)");
    println!("| run | RSS before | sampled peak | VmHWM | insert (commit) | relay CPU | client `all` | commit → its last row |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut hwm = Vec::new();
    let mut growth = Vec::new();
    for i in 0..runs {
        let run = run_once(&cluster, &db, &users, rows, i).await?;
        let mb = |kb: u64| kb as f64 / 1024.0;
        println!(
            "| {i} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s | {:.1} CPU-s | {} | {} |",
            mb(run.baseline_kb),
            mb(run.sampled_peak_kb),
            mb(run.hwm_kb),
            run.insert.as_secs_f64(),
            run.relay_cpu_s,
            run.all_outcome,
            run.commit_to_last.map_or_else(|| "—".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        );
        hwm.push(mb(run.hwm_kb));
        growth.push(mb(run.sampled_peak_kb.saturating_sub(run.baseline_kb)));
    }
    println!(
        "median VmHWM {:.1} MiB (sampled growth over the idle relay {:.1} MiB)",
        median(&mut hwm),
        median(&mut growth),
    );
    Ok(())
}
