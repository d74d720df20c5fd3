//! The relay's memory under 1,000 stalled readers and after they close,
//! per allocator: what the global outbox budget bounds, and whether the
//! allocator gives the memory of closed clients back to the system.
//!
//! `cargo bench --bench rss_return` (env: `WALCAST_BENCH_SOCKETS`, default
//! 1,000; `WALCAST_BENCH_RUNS`, runs per allocator, default 2;
//! `WALCAST_BENCH_BUDGET`, the `--outbox-budget` in bytes, default 64 MiB;
//! `WALCAST_BENCH_ALLOCATORS`, `name=path` pairs separated by commas, the
//! relay executables to compare, default this build's `walcast`). The
//! allocator candidates are builds of the binary with a cargo feature each
//! (`alloc-glibc`, `alloc-trim`, `alloc-mimalloc`; none: jemalloc, as the
//! binary ships); `scripts/rss-return.sh` builds them and runs this bench.
//!
//! One ephemeral cluster with the walcast schema. Each run starts `walcast
//! serve` (release binary of the candidate) as a child process with
//! `--outbox-budget BUDGET --ws-write-buffer 4096`, opens SOCKETS WebSocket
//! connections that each join a channel of their own (`realtime:rss-K`, so
//! each gets frames of its own, as per-user channels do) as `service_role`
//! on every change of `public.orders`, and never read (with a 4 KiB
//! `SO_RCVBUF`). The relay's RSS after they all joined is the baseline.
//! Batches of 50 orders (~1 KiB of metadata each, ~1.7 KiB frames) are then
//! written until `/metrics` shows the fan-out paused on the budget (or the
//! outboxes hold 90 % of it), and held 3 s; RSS is sampled every 100 ms
//! meanwhile (the peak), and the relay's CPU time per frame queued is
//! reported (what an allocator costs the fan-out). Then every socket is dropped at once
//! and RSS sampled every 250 ms for 15 s: the table gives RSS 10 s and 15 s
//! after the close and the first time it was within 20 % of the baseline.
//! Last, a fresh reader must receive a new order (the pipeline recovered).
//! Runs alternate between the candidates so drift on the machine spreads
//! over all of them.

mod common;
use common::{env_or, PeakRss};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::json;
use walcast::cluster::Cluster;
use walcast::hub::Vsn;
use walcast::load::client::{Endpoint, Subscribed};
use walcast::load::relay::{proc_sample, spawn_child, ChildRelay};
use walcast::realtime::auth::sign_hs256;
use walcast::schema::{self, Migrations};

const SECRET: &str = "rss-bench-secret-rss-bench-secret-0123456789";

/// How long RSS is followed after the sockets close.
const AFTER_CLOSE: Duration = Duration::from_secs(15);
/// `SO_RCVBUF` of the stalled sockets, so their side of the connection
/// takes little. The relay's side still does: its send buffers grow up to
/// `net.ipv4.tcp_wmem`'s maximum (4 MiB here; ~650 KiB queued per socket
/// when the budget filled), kernel memory that is neither the relay's RSS
/// nor charged to the budget. The outboxes fill when the fan-out outruns
/// the kernel, and stay full once those buffers are.
const RECV_BUFFER: u32 = 4096;
/// How long the full budget is held before the sockets close.
const HOLD: Duration = Duration::from_secs(3);
/// Orders per write transaction.
const BATCH: i64 = 50;
/// The share of the baseline RSS may exceed "back".
const BACK_WITHIN: f64 = 0.20;

fn token(role: &str) -> String {
    let now = walcast::realtime::session::now_unix();
    sign_hs256(SECRET.as_bytes(), &json!({"role": role, "iat": now, "exp": now + 6 * 3600, "aud": "authenticated"}))
}

/// A relay executable to measure.
struct Candidate {
    name: String,
    exe: PathBuf,
}

/// One run's figures (RSS in KiB).
struct Run {
    baseline_kb: u64,
    peak_kb: u64,
    /// At the end of the hold.
    held_kb: u64,
    /// Outbox bytes at the end of the hold.
    held_outbox_bytes: u64,
    /// Frames queued to connections by then.
    deliveries: u64,
    /// The relay's CPU time from the baseline to the end of the hold.
    relay_cpu_s: f64,
    /// Outbox bytes when the writes stopped.
    outbox_bytes: u64,
    pauses: u64,
    orders: i64,
    fill: Duration,
    /// Relay saw every socket closed, after the drop.
    all_closed: Option<Duration>,
    at_10s_kb: u64,
    at_15s_kb: u64,
    /// First sample within [`BACK_WITHIN`] of the baseline, after the drop.
    back: Option<Duration>,
}

impl Run {
    /// The relay's CPU time per frame queued, baseline to the end of the hold.
    fn cpu_per_delivery_us(&self) -> f64 {
        self.relay_cpu_s * 1e6 / self.deliveries.max(1) as f64
    }
}

/// `GET path` on the relay: the body.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    Ok(response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// A metric's value (unlabelled sample) from a `/metrics` body.
fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// What every run shares.
struct Bench {
    cluster: Cluster,
    db: tokio_postgres::Client,
    /// The dealership the orders go to.
    dealership: uuid::Uuid,
    /// Their creator.
    user: uuid::Uuid,
    sockets: usize,
    budget: usize,
}

async fn run_once(bench: &Bench, candidate: &Candidate, i: usize) -> anyhow::Result<Run> {
    let Bench { cluster, db, dealership, user, sockets, budget } = bench;
    let (dealership, user, sockets, budget) = (*dealership, *user, *sockets, *budget);
    let slot = format!("rss_run{i}");
    let log = PathBuf::from("target").join("bench").join(format!("rss-return-relay-{i}.log"));
    let _ = std::fs::remove_file(&log);
    let extra = ["--outbox-budget".to_owned(), budget.to_string(), "--ws-write-buffer".to_owned(), "4096".to_owned()];
    let relay = spawn_child(&ChildRelay {
        exe: &candidate.exe,
        database_url: &cluster.url("bench"),
        jwt_secret: SECRET,
        slot: &slot,
        max_connections: sockets + 64,
        log: &log,
        extra_args: &extra,
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pid = relay.pid().context("the child relay's pid")?;
    let addr = relay.addr();
    let endpoint = Endpoint::new(addr, relay.path(), &token("anon"), Vsn::V2);
    let service = token("service_role");
    let bindings = json!([{"event": "*", "schema": "public", "table": "orders"}]);
    let wait = Duration::from_secs(60);
    let small = endpoint.clone().with_recv_buffer(RECV_BUFFER);
    let stalled: Vec<Subscribed> = futures::stream::iter(0..sockets)
        .map(|k| Subscribed::connect(&small, None, format!("realtime:rss-{k}"), bindings.clone(), &service, wait))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    let active: bool = db
        .query_one("select coalesce(bool_or(active), false) from pg_replication_slots where slot_name = $1", &[&slot])
        .await?
        .get(0);
    if !active {
        bail!("slot {slot} is not streaming");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = proc_sample(pid).context("relay /proc")?;
    let baseline_kb = before.rss_kb;

    let sampler = PeakRss::start(pid, baseline_kb, Duration::from_millis(100));
    let started = Instant::now();
    let mut orders = 0i64;
    let (outbox_bytes, pauses) = loop {
        db.execute(
            "insert into public.orders (dealership_id, order_number, type, status, customer_info, vehicle_info,
                                        created_by, metadata)
             select $1, 'RSS-' || $3::bigint || '-' || g, 'sales', 'pending',
                    jsonb_build_object('name', 'customer ' || g, 'email', 'c' || g || '@example.com'),
                    jsonb_build_object('vin', md5(g::text), 'make', 'Honda', 'year', 2024),
                    $2, jsonb_build_object('notes', repeat(md5(g::text), 32))
             from generate_series($4::bigint, $4::bigint + $5::bigint - 1) g",
            &[&dealership, &user, &(i as i64), &orders, &BATCH],
        )
        .await?;
        orders += BATCH;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = get(addr, "/metrics").await?;
        let (bytes, pauses) = (metric(&body, "walcast_outbox_bytes"), metric(&body, "walcast_fanout_pauses_total"));
        if pauses > 0 || bytes >= budget as u64 * 9 / 10 {
            break (bytes, pauses);
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!("the outboxes hold {bytes} bytes after {orders} orders and 90 s; the budget was not reached");
        }
    };
    let fill = started.elapsed();
    tokio::time::sleep(HOLD).await;
    let sampled_peak_kb = sampler.stop().await;
    let held = proc_sample(pid).context("relay /proc")?;
    let held_kb = held.rss_kb;
    let relay_cpu_s = held.ticks.saturating_sub(before.ticks) as f64 / walcast::load::relay::ticks_per_second();
    let body = get(addr, "/metrics").await?;
    let held_outbox_bytes = metric(&body, "walcast_outbox_bytes");
    let deliveries = metric(&body, "walcast_deliveries_total");
    let peak_kb = sampled_peak_kb.max(held_kb);

    let closed_at = Instant::now();
    drop(stalled);
    let mut all_closed = None;
    let mut back = None;
    let (mut at_10s_kb, mut at_15s_kb) = (0, 0);
    let limit_kb = (baseline_kb as f64 * (1.0 + BACK_WITHIN)) as u64;
    while closed_at.elapsed() < AFTER_CLOSE {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let rss_kb = proc_sample(pid).context("relay /proc")?.rss_kb;
        let since = closed_at.elapsed();
        if back.is_none() && rss_kb <= limit_kb {
            back = Some(since);
        }
        if since <= Duration::from_secs(10) {
            at_10s_kb = rss_kb;
        }
        at_15s_kb = rss_kb;
        if all_closed.is_none() && metric(&get(addr, "/metrics").await?, "walcast_sockets_open") == 0 {
            all_closed = Some(since);
        }
    }

    // The pipeline recovered: a fresh reader gets a new order.
    let mut fresh = Subscribed::connect(&endpoint, None, "realtime:fresh".into(), bindings, &service, wait)
        .await
        .map_err(|e| anyhow::anyhow!("fresh reader: {e}"))?;
    db.execute(
        "insert into public.orders (dealership_id, order_number, type, customer_info, created_by)
         values ($1, 'RSS-FRESH-' || $3::bigint, 'sales', '{}', $2)",
        &[&dealership, &user, &(i as i64)],
    )
    .await?;
    let (got, _) = fresh.count_changes(1, Duration::from_secs(30)).await.map_err(|e| anyhow::anyhow!("fresh: {e}"))?;
    if got != 1 {
        bail!("the fresh reader got no change after the stalled sockets closed");
    }
    drop(fresh);

    relay.stop().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    for _ in 0..50 {
        if db.execute("select pg_drop_replication_slot($1)", &[&slot]).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if std::fs::read_to_string(&log).unwrap_or_default().contains("panicked") {
        bail!("the relay panicked (see {})", log.display());
    }
    Ok(Run {
        baseline_kb,
        peak_kb,
        held_kb,
        held_outbox_bytes,
        deliveries,
        relay_cpu_s,
        outbox_bytes,
        pauses,
        orders,
        fill,
        all_closed,
        at_10s_kb,
        at_15s_kb,
        back,
    })
}

/// min / median / max of `values`, formatted.
fn spread(mut values: Vec<f64>) -> String {
    let median = common::median(&mut values);
    let (min, max) = (values[0], values[values.len() - 1]);
    let digits = if max < 10.0 { 2 } else { 1 };
    format!("{min:.digits$} / {median:.digits$} / {max:.digits$}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sockets: usize = env_or("WALCAST_BENCH_SOCKETS", 1000).max(1);
    let runs: usize = env_or("WALCAST_BENCH_RUNS", 2).max(1);
    let budget: usize = env_or("WALCAST_BENCH_BUDGET", 64 << 20);
    let candidates: Vec<Candidate> = match std::env::var("WALCAST_BENCH_ALLOCATORS") {
        Ok(list) => list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|pair| {
                let (name, exe) = pair.split_once('=').context("WALCAST_BENCH_ALLOCATORS: name=path,…")?;
                Ok(Candidate { name: name.to_owned(), exe: PathBuf::from(exe) })
            })
            .collect::<anyhow::Result<_>>()?,
        Err(_) => vec![Candidate { name: "this build".into(), exe: PathBuf::from(env!("CARGO_BIN_EXE_walcast")) }],
    };
    walcast::load::relay::raise_nofile(sockets as u64 * 2 + 1024);
    let (cluster, mut db) = common::bench_database().await?;
    schema::migrate(&mut db, &Migrations::embedded()).await?;
    let dealership = uuid::Uuid::new_v4();
    let user = uuid::Uuid::new_v4();
    db.execute("insert into public.dealerships (id, name, code) values ($1, 'R', 'R')", &[&dealership]).await?;
    let email = format!("{user}@walcast.invalid");
    db.execute("insert into auth.users (id, email) values ($1, $2)", &[&user, &email]).await?;
    db.execute("insert into public.profiles (id, email) values ($1, $2)", &[&user, &email]).await?;

    let bench = Bench { cluster, db, dealership, user, sockets, budget };
    let mib = |kb: u64| kb as f64 / 1024.0;
    println!(
        "rss_return: relay RSS with {sockets} stalled readers (--outbox-budget {:.0} MiB, --ws-write-buffer 4096), then after they close",
        budget as f64 / (1 << 20) as f64
    );
    println!(
        "| run | allocator | baseline | peak (growth) | outbox at the stop, pauses | orders, fill | end of hold (growth), \
         outbox | relay CPU per delivery | relay saw all closed | RSS +10 s | RSS +15 s | within 20 % of baseline |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut results: Vec<Vec<Run>> = candidates.iter().map(|_| Vec::new()).collect();
    let mut i = 0;
    for _ in 0..runs {
        for (c, candidate) in candidates.iter().enumerate() {
            let run = run_once(&bench, candidate, i).await.with_context(|| format!("run {i} ({})", candidate.name))?;
            let pct = |kb: u64| 100.0 * kb as f64 / run.baseline_kb as f64;
            println!(
                "| {i} | {} | {:.1} MiB | {:.1} MiB (+{:.1}) | {:.1} MiB, {} | {}, {:.1} s | {:.1} MiB (+{:.1}), {:.1} MiB | \
                 {:.2} µs | {} | {:.1} MiB ({:.0} %) | {:.1} MiB ({:.0} %) | {} |",
                candidate.name,
                mib(run.baseline_kb),
                mib(run.peak_kb),
                mib(run.peak_kb.saturating_sub(run.baseline_kb)),
                run.outbox_bytes as f64 / (1 << 20) as f64,
                run.pauses,
                run.orders,
                run.fill.as_secs_f64(),
                mib(run.held_kb),
                mib(run.held_kb.saturating_sub(run.baseline_kb)),
                run.held_outbox_bytes as f64 / (1 << 20) as f64,
                run.cpu_per_delivery_us(),
                run.all_closed.map_or_else(|| "no".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
                mib(run.at_10s_kb),
                pct(run.at_10s_kb),
                mib(run.at_15s_kb),
                pct(run.at_15s_kb),
                run.back.map_or_else(|| "not in 15 s".to_owned(), |d| format!("{:.2} s", d.as_secs_f64())),
            );
            results[c].push(run);
            i += 1;
        }
    }
    println!();
    println!("min / median / max per allocator ({runs} runs each)");
    println!(
        "| allocator | baseline MiB | peak growth MiB | growth at the end of the hold MiB | relay CPU per delivery µs | \
         RSS 10 s after the close, % of baseline | back within 20 % of baseline, s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (candidate, runs) in candidates.iter().zip(&results) {
        let growth = |kb: fn(&Run) -> u64| -> Vec<f64> {
            runs.iter().map(|r| mib(kb(r).saturating_sub(r.baseline_kb))).collect()
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            candidate.name,
            spread(runs.iter().map(|r| mib(r.baseline_kb)).collect()),
            spread(growth(|r| r.peak_kb)),
            spread(growth(|r| r.held_kb)),
            spread(runs.iter().map(Run::cpu_per_delivery_us).collect()),
            spread(runs.iter().map(|r| 100.0 * r.at_10s_kb as f64 / r.baseline_kb as f64).collect()),
            spread(runs.iter().map(|r| r.back.map_or(f64::INFINITY, |d| d.as_secs_f64())).collect()),
        );
    }
    Ok(())
}
