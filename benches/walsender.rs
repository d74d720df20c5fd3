//! P1: walcast's decode-and-assemble rate against `pg_recvlogical`, PostgreSQL's
//! own logical replication client, on the same backlog with the same slot
//! options (pgoutput, proto_version 1, the same publication).
//!
//! `cargo bench --bench walsender` (env: `WALCAST_BENCH_ROWS`, default
//! 1,000,000; `WALCAST_BENCH_RUNS`, default 3).
//!
//! One ephemeral cluster; 2×RUNS slots are created *before* a single
//! transaction inserts ROWS rows, so every slot has the identical backlog.
//! Runs alternate which client goes first. Each run is timed from process or
//! task start (connect included, for both) until the transaction's Commit has
//! been received (walcast: decoded and assembled into typed changes;
//! pg_recvlogical: written to /dev/null with `--endpos` = the Commit's end
//! LSN). The walsender decodes the WAL for each slot anew, so its rate is the
//! ceiling both clients share. A last pass replays a capture of the same
//! backlog with no walsender in the loop: walcast's own decode-and-assemble
//! ceiling.

mod common;
use common::{env_or, median, recvlogical_run};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use walcast::change::{Assembler, TxEvent};
use walcast::lsn::Lsn;
use walcast::replication::{run_source, AckHandle, SlotOptions, SourceConfig, SourceEvent, WalEvent};

const PUBLICATION: &str = "bench_pub";

/// walcast on `slot`: source + assembler until the first Commit. Returns (changes, commit end, elapsed).
async fn walcast_run(url: &str, slot: &str) -> anyhow::Result<(u64, Lsn, Duration)> {
    let started = Instant::now();
    let config = SourceConfig::new(tokio_postgres::Config::from_str(url)?, SlotOptions::new(slot, PUBLICATION));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let stop = tokio_util::sync::CancellationToken::new();
    let ack = AckHandle::default();
    let source = tokio::spawn(run_source(config, tx, ack.clone(), stop.clone()));
    let mut assembler = Assembler::new();
    let mut events = Vec::with_capacity(64);
    let mut changes = 0u64;
    let result = 'outer: loop {
        let Some(event) = rx.recv().await else { bail!("source ended") };
        let SourceEvent::Wal(WalEvent::XLogData { data, .. }) = event else { continue };
        assembler.push(&data, &mut events)?;
        for event in events.drain(..) {
            match event {
                TxEvent::Change(_) => changes += 1,
                TxEvent::Commit(info) => {
                    ack.ack(info.end_lsn);
                    break 'outer (changes, info.end_lsn, started.elapsed());
                }
                TxEvent::Begin(_) | TxEvent::Message { .. } => {}
            }
        }
    };
    stop.cancel();
    let _ = source.await;
    Ok(result)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rows: usize = env_or("WALCAST_BENCH_ROWS", 1_000_000);
    let runs: usize = env_or("WALCAST_BENCH_RUNS", 3).max(1);
    let (cluster, client) = common::bench_database().await?;
    client
        .batch_execute(&format!(
            "create table public.bulk (id int primary key, dealership_id uuid not null, status text not null,
                                       amount numeric not null, info jsonb not null, created_at timestamptz not null);
             alter table public.bulk replica identity full;
             create publication {PUBLICATION} for table public.bulk;"
        ))
        .await?;
    for i in 0..runs {
        for kind in ["w", "r"] {
            client
                .execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&format!("{kind}{i}")])
                .await?;
        }
    }
    client.execute("select pg_create_logical_replication_slot('capture', 'pgoutput')", &[]).await?;
    let load = Instant::now();
    client
        .batch_execute(&format!(
            "insert into public.bulk
             select g, '7d9f3c1e-2b4a-4c6d-8e0f-1a2b3c4d5e6f', 'pending', g * 1.25,
                    jsonb_build_object('name', 'customer ' || g, 'vin', md5(g::text)), now()
             from generate_series(1, {rows}) g"
        ))
        .await?;
    let wal_bytes: i64 = client
        .query_one("select (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 from pg_replication_slots where slot_name = 'w0'", &[])
        .await?
        .get(0);
    eprintln!(
        "PostgreSQL {}; backlog: 1 transaction, {rows} rows, {:.1} MB of WAL, loaded in {:.1} s",
        cluster.version(),
        wal_bytes as f64 / 1e6,
        load.elapsed().as_secs_f64()
    );

    let url = cluster.url("bench");
    let mut walcast_rates = Vec::new();
    let mut recv_rates = Vec::new();
    println!("run  client          rows       seconds   rows/s");
    // The first walcast run learns the Commit's end LSN (the same on every
    // slot); after it, the order alternates so neither client always goes first.
    let mut endpos = None;
    for i in 0..runs {
        let order: [bool; 2] = if i % 2 == 0 { [true, false] } else { [false, true] };
        for walcast_turn in order {
            if walcast_turn {
                let (changes, end, elapsed) = walcast_run(&url, &format!("w{i}")).await?;
                if changes != rows as u64 {
                    bail!("walcast received {changes} changes, expected {rows}");
                }
                endpos = Some(end);
                let rate = changes as f64 / elapsed.as_secs_f64();
                println!("{i:<4} walcast         {changes:<10} {:<9.3} {rate:.0}", elapsed.as_secs_f64());
                walcast_rates.push(rate);
            } else {
                let end = endpos.context("walcast runs first")?;
                let elapsed = recvlogical_run(&cluster, &format!("r{i}"), &end.to_string(), PUBLICATION)?;
                let rate = rows as f64 / elapsed.as_secs_f64();
                println!("{i:<4} pg_recvlogical  {rows:<10} {:<9.3} {rate:.0}", elapsed.as_secs_f64());
                recv_rates.push(rate);
            }
        }
    }
    let (w, r) = (median(&mut walcast_rates), median(&mut recv_rates));
    println!("median over {runs} runs: walcast {w:.0} rows/s, pg_recvlogical {r:.0} rows/s, ratio {:.3}", w / r);

    // walcast's own ceiling: the same backlog from a capture, no walsender.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("backlog.walcast");
    let config = SourceConfig::new(tokio_postgres::Config::from_str(&url)?, SlotOptions::new("capture", PUBLICATION));
    let stop_rx = tokio_util::sync::CancellationToken::new();
    let writer = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
    let limits = walcast::capture::RecordLimits { max_transactions: Some(1), duration: None };
    walcast::capture::record(config, writer, limits, stop_rx).await?;
    let mut replay_rates = Vec::new();
    for _ in 0..runs {
        let path = path.clone();
        let report = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let reader = walcast::capture::CaptureReader::new(std::io::BufReader::with_capacity(
                1 << 20,
                std::fs::File::open(path)?,
            ))?;
            Ok(walcast::capture::replay(reader, walcast::capture::Pace::Fastest, |_| {})?)
        })
        .await??;
        replay_rates.push(report.changes_per_sec());
    }
    println!(
        "replay of the same backlog (no walsender): median {:.0} rows/s over {runs} runs",
        median(&mut replay_rates)
    );
    Ok(())
}
