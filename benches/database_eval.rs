//! Database evaluation against a real PostgreSQL (an ephemeral cluster of
//! its own): `cargo bench --bench database_eval`.
//!
//! 1. **Checks per second per claim set**: a pool of 2 connections (the
//!    default) evaluates a PL/pgSQL-policy table's rows; 4,000 checks of 1
//!    claim set, then 400 checks of 10 claim sets; claim sets evaluated per
//!    second, each round reported.
//! 2. **In-memory p99 beside a saturated database-evaluated table**: a relay
//!    with 100 subscribers of `orders` (in memory: dealership membership)
//!    and 200 subscribers with distinct claims of `notes` (database
//!    evaluated). 1,000 single-row `orders` transactions at ~200/s; commit
//!    (client side, after COMMIT returns) → frame queued in the member's
//!    outbox, p50/p99; once alone, once while another connection inserts
//!    5,000 `notes` rows a second (each needs 200 evaluations: the queue
//!    fills and refuses). Alternating, `WALCAST_BENCH_RUNS` rounds
//!    (default 2).

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use walcast::cluster::{Cluster, ClusterConfig};
use walcast::hub::{Binding, Control, EventMatch, Outbox, OutboxLimits, Subscription, Vsn};
use walcast::policy::fallback::{self, Check, DatabaseCheck, FallbackConfig, FallbackStats};
use walcast::policy::{Filter, Viewer};
use walcast::relay::{Relay, RelayConfig};
use walcast::replication::{SlotOptions, SourceConfig};

const NOTES: &str = "
create function public.may_see_note(owner uuid) returns boolean language plpgsql stable as $$
begin
    return owner = (select auth.uid());
end
$$;
create table public.notes (id uuid primary key default gen_random_uuid(), owner uuid, body text);
alter table public.notes replica identity full;
alter table public.notes enable row level security;
create policy own_notes on public.notes for select to authenticated using (public.may_see_note(owner));
grant select on public.notes to authenticated;
alter publication supabase_realtime add table public.notes;
";

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

fn db(e: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!(e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()))
}

fn runs() -> usize {
    std::env::var("WALCAST_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(2).max(1)
}

async fn checks_per_second(url: &str, claim_sets: usize, checks: usize) -> anyhow::Result<f64> {
    let (tx, mut rx) = mpsc::channel(1024);
    let pool = fallback::spawn(
        tokio_postgres::Config::from_str(url)?.into(),
        FallbackConfig::default(),
        Arc::new(FallbackStats::default()),
        tx,
    );
    let plan = Arc::new(DatabaseCheck {
        table: 1,
        alias: "notes".into(),
        qualified: "public.notes".into(),
        policies: vec!["own_notes".into()],
        predicate: "((public.may_see_note(owner)))".into(),
        columns: vec![("id".into(), "uuid".into()), ("owner".into(), "uuid".into()), ("body".into(), "text".into())],
        role: "authenticated".into(),
    });
    let claims: Vec<Arc<str>> = (0..claim_sets)
        .map(|i| Arc::from(format!(r#"{{"role":"authenticated","sub":"{}"}}"#, Uuid::from_u128(i as u128)).as_str()))
        .collect();
    let owner = Uuid::from_u128(0).to_string();
    let started = Instant::now();
    let mut submitted = 0;
    let mut answered = 0;
    while answered < checks {
        while submitted < checks {
            let check = Check {
                xid: 0,
                id: submitted as u64,
                plan: Arc::clone(&plan),
                claims: claims.clone(),
                images: vec![None, Some(vec![Some(Uuid::new_v4().to_string()), Some(owner.clone()), Some("x".into())])],
            };
            if pool.submit(check).is_err() {
                break;
            }
            submitted += 1;
        }
        let verdict = rx.recv().await.context("verdicts")?;
        anyhow::ensure!(verdict.results.iter().all(Result::is_ok), "evaluation failed: {:?}", verdict.results);
        answered += 1;
    }
    Ok((checks * claim_sets) as f64 / started.elapsed().as_secs_f64())
}

fn subscription(conn: u64, viewer: Viewer, table: &str, outbox: &Arc<Outbox>) -> Subscription {
    Subscription {
        conn,
        topic: format!("realtime:{table}"),
        vsn: Vsn::V2,
        viewer,
        bindings: vec![Binding {
            id: 1,
            schema: Some("public".into()),
            table: Some(table.into()),
            event: EventMatch::All,
            filter: Filter::default(),
            select: None,
        }],
        outbox: Arc::clone(outbox),
        on_live: None,
        on_withheld: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Commit → queued latencies of 1,000 orders, with or without a notes flood.
async fn orders_latency(url: &str, run: usize, flood: bool) -> anyhow::Result<(Duration, Duration, u64)> {
    let client = connect(url).await?;
    // The ephemeral cluster commits asynchronously (the WAL writer flushes
    // every 200 ms, and the walsender sends only flushed WAL).
    client.batch_execute("set synchronous_commit = on").await.map_err(db)?;
    let dealership: Uuid = client
        .query_one(
            "insert into public.dealerships (code, name) values ($1, 'd') returning id",
            &[&format!("BENCH{run}{}", u8::from(flood))],
        )
        .await
        .map_err(db)?
        .get(0);
    let member = Uuid::new_v4();
    let email = format!("m{run}{flood}@example.com");
    client.execute("insert into auth.users (id, email) values ($1, $2)", &[&member, &email]).await.map_err(db)?;
    client
        .execute("insert into public.profiles (id, email, full_name) values ($1, $2, $2)", &[&member, &email])
        .await
        .map_err(db)?;
    client
        .execute(
            "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user')",
            &[&member, &dealership],
        )
        .await
        .map_err(db)?;
    let source = SourceConfig::new(
        tokio_postgres::Config::from_str(url)?,
        SlotOptions::new(format!("bench_{run}_{flood}"), "supabase_realtime"),
    );
    let relay = Relay::start(RelayConfig::new(source)).await?;
    let member_box = Arc::new(Outbox::new(OutboxLimits::default()));
    relay.hub.send(Control::Join(subscription(0, Viewer::user(member), "orders", &member_box))).await.ok();
    for i in 1..100 {
        let o = Arc::new(Outbox::new(OutboxLimits::default()));
        relay.hub.send(Control::Join(subscription(i, Viewer::user(Uuid::new_v4()), "orders", &o))).await.ok();
    }
    let mut note_boxes = Vec::new();
    for i in 0..200 {
        let o = Arc::new(Outbox::new(OutboxLimits::default()));
        relay.hub.send(Control::Join(subscription(1000 + i, Viewer::user(Uuid::new_v4()), "notes", &o))).await.ok();
        note_boxes.push(o);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = if flood {
        let flood_client = connect(url).await?;
        let stop = Arc::clone(&stop);
        Some(tokio::spawn(async move {
            let mut rows = 0u64;
            // 5,000 rows/s, each 200 claim sets: far past what the pool
            // evaluates, so the queue stays full and refuses.
            let mut pace = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let _ = flood_client
                    .execute("insert into public.notes (owner, body) select gen_random_uuid(), 'x' from generate_series(1, 50)", &[])
                    .await;
                rows += 50;
            }
            rows
        }))
    } else {
        None
    };
    let insert = client
        .prepare(
            "insert into public.orders (dealership_id, type, customer_info, created_by) \
             values ($1, 'sales', '{\"name\": \"Ada\"}', $2) returning id",
        )
        .await
        .map_err(db)?;
    let mut latencies = Vec::with_capacity(1000);
    let mut frames = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for _ in 0..1000 {
        tick.tick().await;
        let id: Uuid = client.query_one(&insert, &[&dealership, &member]).await.map_err(db)?.get(0);
        let committed = Instant::now();
        let needle = id.to_string();
        let deadline = committed + Duration::from_secs(30);
        loop {
            member_box.try_drain(&mut frames);
            if frames.iter().any(|f| std::str::from_utf8(f).is_ok_and(|s| s.contains(&needle))) {
                latencies.push(committed.elapsed());
                frames.clear();
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "order not delivered in 30 s");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        for b in &note_boxes {
            b.try_drain(&mut Vec::new());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flooded = match flooder {
        Some(f) => f.await.unwrap_or(0),
        None => 0,
    };
    let refused = relay.hub.stats.database.refused.load(Ordering::Relaxed);
    relay.stop().await?;
    client.execute("select pg_drop_replication_slot($1)", &[&format!("bench_{run}_{flood}")]).await.ok();
    latencies.sort();
    eprintln!(
        "  run {run} {}: p50 {:.2} ms, p99 {:.2} ms ({flooded} notes rows flooded, {refused} checks refused)",
        if flood { "with notes flood" } else { "alone" },
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    Ok((percentile(&latencies, 0.5), percentile(&latencies, 0.99), refused))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterConfig::ephemeral())).await??;
    let admin = connect(&cluster.url("postgres")).await?;
    admin.batch_execute("create database bench").await?;
    let url = cluster.url("bench");
    let mut client = connect(&url).await?;
    walcast::schema::migrate(&mut client, &walcast::schema::Migrations::embedded()).await.context("migrate")?;
    client.batch_execute(NOTES).await.context("notes")?;
    eprintln!("PostgreSQL {}; database evaluation, 2 connections", cluster.version());
    for run in 0..runs() {
        let one = checks_per_second(&url, 1, 4000).await?;
        let ten = checks_per_second(&url, 10, 400).await?;
        eprintln!("  run {run}: {one:.0} claim sets/s (1 per check), {ten:.0} claim sets/s (10 per check, pipelined)");
    }
    for run in 0..runs() {
        orders_latency(&url, run, false).await?;
        orders_latency(&url, run, true).await?;
    }
    Ok(())
}
