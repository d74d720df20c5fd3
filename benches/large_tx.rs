//! P7: one 1,000,000-row transaction to 10 subscribers entitled to every row —
//! every row delivered to all 10, none disconnected, the relay's peak RSS, and
//! the time to deliver it beside the walsender's own time to send it.
//!
//! `cargo bench --bench large_tx` (env: `WALCAST_BENCH_ROWS`, default
//! 1,000,000; `WALCAST_BENCH_RUNS`, default 3; `WALCAST_BENCH_RELAY_ARGS`,
//! extra `walcast serve` flags separated by spaces, e.g. `--outbox-budget
//! 67108864`; `WALCAST_BENCH_RELAY_EXE`, a wrapper to run the relay under,
//! e.g. a heap profiler).
//!
//! One ephemeral cluster with the walcast schema; dealerships A and B; twelve
//! users: ten readers (each a member of A, `public.orders` `*`, each on its
//! own socket), `few` (member of A, `status=eq.pending`, which one row in
//! 1,000 matches) and `other` (member of B). Each run starts `walcast serve`
//! as a child process (a slot of its own), subscribes the twelve over
//! WebSocket (vsn 2.0.0), creates a second pgoutput slot, then one `INSERT …
//! SELECT generate_series` writes ROWS orders into A in one transaction.
//!
//! The insert supplies explicit order numbers. Since sql/0007 the numbering
//! trigger is linear for bulk inserts (1.31× the explicit insert at 50,000
//! rows, docs/order-numbers-bench.md), so it would work; explicit numbers
//! keep the insert time comparable with the earlier P7 runs and keep the
//! trigger's cost out of a benchmark about the relay (the changes the relay
//! receives are the same shape either way).
//!
//! The run fails unless each of the ten receives every row and none is
//! closed, `few` receives exactly ROWS/1000 rows and `other` none (both are
//! still read for a second after the readers finish), the relay did not
//! panic and `walcast_slow_consumer_closes_total` is 0; a failed run still
//! prints its figures, and the bench exits with an error after the last run.
//! Per run: the relay's
//! RSS before the insert, sampled every 20 ms, and its `VmHWM` (peak RSS of
//! the process's life) at the end; the insert's time; the relay's CPU; commit
//! → the last row at the slowest of the ten; a few counters from the relay's
//! `/metrics`. Then, with the relay stopped, `pg_recvlogical` reads the
//! second slot (pgoutput, `proto_version=1`, the same publication) up to
//! `pg_current_wal_lsn()` as read right after the commit, writing to
//! `/dev/null`: the walsender's own time to decode and send the same
//! transaction, connect included. It decodes the whole transaction then,
//! whereas the relay's walsender decoded it while the insert ran, so this
//! time is an upper bound on the walsender's share of commit → last row.
//! The relay is stopped after each run, so each peak is one run's; its log
//! and its last `/metrics` are kept in `target/bench/large-tx-relay-<run>.*`.

mod common;
use common::{env_or, median, recvlogical_run, PeakRss};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use walcast::cluster::Cluster;
use walcast::hub::Vsn;
use walcast::load::client::{Endpoint, Subscribed};
use walcast::load::relay::{proc_sample, spawn_child, ChildRelay};
use walcast::realtime::auth::sign_hs256;
use walcast::schema::{self, Migrations};

const SECRET: &str = "p7-bench-secret-p7-bench-secret-0123456789";

/// Subscribers entitled to every row.
const READER_COUNT: usize = 10;

/// Longest a reader may take to receive every row (`count_changes` heartbeats
/// and keeps waiting while the socket is open, so this bounds a stuck run).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(1800);

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
    /// Commit → the last row at the slowest of the readers that received
    /// every row (`None` when none did).
    commit_to_last: Option<Duration>,
    /// Readers that received every row.
    complete_count: usize,
    relay_cpu_s: f64,
    /// `pg_recvlogical` from start to exit, on the second slot.
    walsender: Duration,
    /// From the relay's `/metrics` at the end of the run.
    metrics: Metrics,
    /// Why the run failed (empty: it passed).
    failures: Vec<String>,
}

/// Counters read from the relay's `/metrics`.
struct Metrics {
    pause_count: f64,
    paused_s: f64,
    spilled_transaction_count: f64,
    spill_written_bytes: f64,
    slow_consumer_close_count: f64,
}

struct Users {
    readers: Vec<uuid::Uuid>,
    few: uuid::Uuid,
    other: uuid::Uuid,
    dealership_a: uuid::Uuid,
}

/// What [`Subscribed::count_changes`] returns.
type Counted = Result<(u64, Option<Instant>), String>;

/// Reads `client` until `expect` deliveries arrived (sent on the returned
/// channel), then keeps reading (heartbeating) for anything more: the task
/// finishes only if something more arrives or the socket ends.
fn spawn_exact(mut client: Subscribed, expect: u64) -> (oneshot::Receiver<Result<u64, String>>, JoinHandle<Counted>) {
    let (first_tx, first_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let first = tokio::time::timeout(DELIVERY_TIMEOUT, client.count_changes(expect, DELIVERY_TIMEOUT))
            .await
            .unwrap_or_else(|_| Err(format!("not {expect} deliveries within {DELIVERY_TIMEOUT:?}")));
        let failed = first.is_err();
        let _ = first_tx.send(first.map(|(n, _)| n));
        if failed {
            return Ok((0, None));
        }
        client.count_changes(1, Duration::from_secs(3600)).await
    });
    (first_rx, task)
}

/// `GET /metrics` from the relay (HTTP/1.0, so the body is plain text).
async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /metrics: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_owned())
    })
    .await?
}

/// The value of an unlabelled sample `name` in a text exposition.
fn sample(exposition: &str, name: &str) -> anyhow::Result<f64> {
    exposition
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .with_context(|| format!("{name} in /metrics"))
}

/// Drops `slot`, retrying while its walsender is still exiting.
async fn drop_slot(db: &tokio_postgres::Client, slot: &str) {
    for _ in 0..50 {
        if db.execute("select pg_drop_replication_slot($1)", &[&slot]).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run_once(
    cluster: &Cluster,
    db: &tokio_postgres::Client,
    users: &Users,
    relay_args: &[String],
    rows: u64,
    i: usize,
) -> anyhow::Result<Run> {
    let slot = format!("p7_run{i}");
    let walsender_slot = format!("p7_walsender{i}");
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
        extra_args: relay_args,
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
    let mut readers = Vec::with_capacity(users.readers.len());
    for (n, user) in users.readers.iter().enumerate() {
        let token = token("authenticated", Some(*user));
        let reader = Subscribed::connect(&endpoint, None, topic(), orders(None), &token, wait)
            .await
            .map_err(|e| anyhow::anyhow!("subscribe reader {n}: {e}"))?;
        readers.push(reader);
    }
    let few = Subscribed::connect(
        &endpoint,
        None,
        topic(),
        orders(Some("status=eq.pending")),
        &token("authenticated", Some(users.few)),
        wait,
    )
    .await
    .map_err(|e| anyhow::anyhow!("subscribe few: {e}"))?;
    let other =
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
    // The walsender's own run reads this slot once the relay is done.
    db.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&walsender_slot]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proc_sample(pid).context("relay /proc")?;

    let sampler = PeakRss::start(pid, before.rss_kb, Duration::from_millis(20));
    let want_few = rows / 1000;
    let reader_tasks: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            tokio::spawn(async move {
                tokio::time::timeout(DELIVERY_TIMEOUT, reader.count_changes(rows, DELIVERY_TIMEOUT))
                    .await
                    .unwrap_or_else(|_| Err(format!("not every row within {DELIVERY_TIMEOUT:?}")))
            })
        })
        .collect();
    let (few_first, few_more) = spawn_exact(few, want_few);
    let (other_first, other_more) = spawn_exact(other, 0);
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
        &[&users.dealership_a, &users.readers[0], &(rows as i64), &(i as i64)],
    )
    .await?;
    let committed = Instant::now();
    let endpos: String = db.query_one("select pg_current_wal_lsn()::text", &[]).await?.get(0);
    let insert = committed - started;

    // Every reader must take every row and stay open.
    let (mut last, mut complete_count) = (None, 0);
    let mut failures = Vec::new();
    for (n, task) in reader_tasks.into_iter().enumerate() {
        match task.await? {
            Ok((got, Some(at))) if got == rows => {
                last = last.max(Some(at));
                complete_count += 1;
            }
            Ok((got, _)) => failures.push(format!("reader {n}: {got} of {rows} rows")),
            Err(e) => failures.push(format!("reader {n}: {e}")),
        }
    }
    let got_few = few_first.await?.map_err(|e| anyhow::anyhow!("client few: {e}"))?;
    let got_other = other_first.await?.map_err(|e| anyhow::anyhow!("client other: {e}"))?;
    // Anything more for `few` or `other` would have come with A's rows: a
    // short grace after the last of them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, more) in [("few", few_more), ("other", other_more)] {
        if more.is_finished() {
            match more.await? {
                Ok((n, _)) => failures.push(format!("client {name}: {n} more than it may see")),
                Err(e) => failures.push(format!("client {name}: {e}")),
            }
        } else {
            more.abort();
        }
    }
    if (got_few, got_other) != (want_few, 0) {
        failures.push(format!("deliveries few/other = {got_few}/{got_other}, expected {want_few}/0"));
    }
    let sampled_peak_kb = sampler.stop().await;
    let after = proc_sample(pid).context("relay /proc")?;
    let exposition = scrape(relay.addr()).await;
    relay.stop().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    drop_slot(db, &slot).await;
    // Blocks this worker thread, but nothing else of the bench runs meanwhile.
    let walsender = recvlogical_run(cluster, &walsender_slot, &endpos, "supabase_realtime");
    drop_slot(db, &walsender_slot).await;
    let walsender = walsender?;
    // A panic anywhere in the relay is a bug (and, with RUST_BACKTRACE set,
    // its symbolized backtrace once cost ~100 MiB of this peak).
    let relay_log = std::fs::read_to_string(&log).unwrap_or_default();
    if relay_log.contains("panicked") {
        failures.push(format!("the relay panicked (see {})", log.display()));
    }
    let exposition = exposition?;
    let _ = std::fs::write(log.with_extension("metrics"), &exposition);
    let metrics = Metrics {
        pause_count: sample(&exposition, "walcast_fanout_pauses_total")?,
        paused_s: sample(&exposition, "walcast_fanout_paused_seconds_total")?,
        spilled_transaction_count: sample(&exposition, "walcast_spilled_transactions_total")?,
        spill_written_bytes: sample(&exposition, "walcast_spill_written_bytes_total{stage=\"hub\"}")?,
        slow_consumer_close_count: sample(&exposition, "walcast_slow_consumer_closes_total")?,
    };
    if metrics.slow_consumer_close_count != 0.0 {
        failures.push(format!("walcast_slow_consumer_closes_total = {}", metrics.slow_consumer_close_count));
    }
    Ok(Run {
        baseline_kb: before.rss_kb,
        sampled_peak_kb,
        hwm_kb: after.hwm_kb,
        insert,
        commit_to_last: last.map(|last| last.saturating_duration_since(committed)),
        complete_count,
        relay_cpu_s: after.ticks.saturating_sub(before.ticks) as f64 / walcast::load::relay::ticks_per_second(),
        walsender,
        metrics,
        failures,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rows: u64 = env_or("WALCAST_BENCH_ROWS", 1_000_000).max(1000);
    let runs: usize = env_or("WALCAST_BENCH_RUNS", 3).max(1);
    let relay_args: Vec<String> =
        std::env::var("WALCAST_BENCH_RELAY_ARGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    let (cluster, mut db) = common::bench_database().await?;
    schema::migrate(&mut db, &Migrations::embedded()).await?;
    let users = Users {
        readers: (0..READER_COUNT).map(|_| uuid::Uuid::new_v4()).collect(),
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
    let members = users
        .readers
        .iter()
        .map(|&reader| (reader, users.dealership_a))
        .chain([(users.few, users.dealership_a), (users.other, dealership_b)]);
    for (user, dealership) in members {
        let email = format!("{user}@walcast.invalid");
        db.execute("insert into auth.users (id, email) values ($1, $2)", &[&user, &email]).await?;
        db.execute("insert into public.profiles (id, email) values ($1, $2)", &[&user, &email]).await?;
        db.execute(
            "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user')",
            &[&user, &dealership],
        )
        .await?;
    }

    println!(
        "P7: one {rows}-row transaction to {READER_COUNT} subscribers entitled to every row \
         (walcast serve as a child process; PostgreSQL {}; relay args: {})",
        cluster.version(),
        if relay_args.is_empty() { "defaults".to_owned() } else { relay_args.join(" ") },
    );
    println!(
        "| run | result | RSS before | sampled peak | VmHWM | insert (commit) | relay CPU \
         | commit → last row (slowest of {READER_COUNT}) | pg_recvlogical | fan-out pauses | paused | spilled tx \
         | spill written | slow-consumer closes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut peak, mut hwm, mut insert, mut deliver, mut walsender, mut cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut failed = Vec::new();
    for i in 0..runs {
        let run = run_once(&cluster, &db, &users, &relay_args, rows, i).await?;
        let mb = |kb: u64| kb as f64 / 1024.0;
        let m = &run.metrics;
        println!(
            "| {i} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s | {:.1} CPU-s | {} | {:.1} s | {} | {:.1} s | {} \
             | {:.1} MiB | {} |",
            if run.failures.is_empty() { "pass" } else { "**FAIL**" },
            mb(run.baseline_kb),
            mb(run.sampled_peak_kb),
            mb(run.hwm_kb),
            run.insert.as_secs_f64(),
            run.relay_cpu_s,
            match (run.commit_to_last, run.complete_count) {
                (None, _) => "—".to_owned(),
                (Some(d), READER_COUNT) => format!("{:.1} s", d.as_secs_f64()),
                (Some(d), n) => format!("{:.1} s ({n} of {READER_COUNT} complete)", d.as_secs_f64()),
            },
            run.walsender.as_secs_f64(),
            m.pause_count,
            m.paused_s,
            m.spilled_transaction_count,
            m.spill_written_bytes / (1024.0 * 1024.0),
            m.slow_consumer_close_count,
        );
        peak.push(mb(run.sampled_peak_kb));
        hwm.push(mb(run.hwm_kb));
        insert.push(run.insert.as_secs_f64());
        if let (Some(d), READER_COUNT) = (run.commit_to_last, run.complete_count) {
            deliver.push(d.as_secs_f64());
        }
        walsender.push(run.walsender.as_secs_f64());
        cpu.push(run.relay_cpu_s);
        if !run.failures.is_empty() {
            failed.push(format!("run {i}: {}", run.failures.join("; ")));
        }
    }
    let walsender = median(&mut walsender);
    let deliver = (!deliver.is_empty()).then(|| median(&mut deliver));
    println!(
        "| **median** | | | {:.1} MiB | **{:.1} MiB** | {:.1} s | {:.1} CPU-s | **{}** | **{walsender:.1} s** | | | | | |",
        median(&mut peak),
        median(&mut hwm),
        median(&mut insert),
        median(&mut cpu),
        deliver.map_or_else(|| "—".to_owned(), |d| format!("{d:.1} s")),
    );
    if let Some(deliver) = deliver {
        println!(
            "commit → last row ÷ pg_recvlogical = {:.2} ({:.0} vs {:.0} rows/s per subscriber; runs where all \
             {READER_COUNT} took every row)",
            deliver / walsender,
            rows as f64 / deliver,
            rows as f64 / walsender,
        );
    }
    if !failed.is_empty() {
        bail!("{} of {runs} runs failed:\n{}", failed.len(), failed.join("\n"));
    }
    println!("every row to all {READER_COUNT} in every run, none closed; few and other exact");
    Ok(())
}
