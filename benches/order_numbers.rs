//! Order numbering in a bulk insert: one `INSERT … SELECT generate_series`
//! of ROWS orders into one dealership, numbered by the trigger, against the
//! same insert with the numbers given explicitly.
//!
//! `cargo bench --bench order_numbers` (env: `WALCAST_BENCH_ROWS`, default
//! 50,000; `WALCAST_BENCH_RUNS`, default 5; `WALCAST_BENCH_OLD=0` skips the
//! old trigger).
//!
//! One ephemeral cluster ([`common::bench_database`]). First the schema up to
//! `0006` (the per-row counter upsert of `0003`, "old"), then `0007` applied
//! on top ("new"). For each schema RUNS rounds alternate the two paths, each
//! timed insert starting from an emptied `public.orders` (TRUNCATE and
//! CHECKPOINT, untimed): `trigger` leaves `order_number` to the trigger,
//! `explicit` gives `<CODE>-SALES-<n>` numbers of the same shape (the
//! trigger still runs and returns at once). Both keep every index of the
//! schema. Each trigger round is checked: ROWS distinct numbers, continuing
//! the counter without a gap. Printed: per schema and path min/median/max
//! seconds, and the ratio of the medians trigger ÷ explicit.

mod common;
use common::{env_or, median};

use std::time::Instant;

use anyhow::{bail, Context};
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::schema::Migrations;

/// The dealership and creator the orders belong to.
struct Fixture {
    dealership: Uuid,
    user: Uuid,
}

/// Applies the embedded migrations whose names satisfy `pick`, without the
/// bookkeeping of `walcast::schema::migrate` (each file is idempotent).
async fn apply(db: &Client, pick: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    for m in Migrations::embedded().iter().filter(|m| pick(&m.name)) {
        db.batch_execute(&m.sql).await.with_context(|| format!("applying {}", m.name))?;
    }
    Ok(())
}

/// One timed insert of `rows` orders; `first` is the number the first order
/// gets (explicit numbers only; the trigger takes its own).
async fn insert(db: &Client, f: &Fixture, rows: i32, explicit: Option<i64>) -> anyhow::Result<f64> {
    db.batch_execute("truncate public.orders; checkpoint").await?;
    let started = Instant::now();
    let inserted = match explicit {
        None => {
            db.execute(
                "insert into public.orders (dealership_id, type, customer_info, created_by) \
                 select $1, 'sales', jsonb_build_object('name', 'Customer ' || g), $2 \
                 from generate_series(1, $3) g",
                &[&f.dealership, &f.user, &rows],
            )
            .await?
        }
        Some(first) => {
            db.execute(
                "insert into public.orders (dealership_id, order_number, type, customer_info, created_by) \
                 select $1, 'BENCH-SALES-' || lpad(($4::bigint + g)::text, greatest(6, length(($4::bigint + g)::text)), '0'), 'sales', \
                        jsonb_build_object('name', 'Customer ' || g), $2 \
                 from generate_series(0, $3 - 1) g",
                &[&f.dealership, &f.user, &rows, &first],
            )
            .await?
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if inserted != rows as u64 {
        bail!("inserted {inserted} rows, expected {rows}");
    }
    Ok(seconds)
}

/// Checks the trigger round just inserted: `rows` distinct numbers, from
/// `last - rows + 1` to `last`.
async fn check_numbers(db: &Client, rows: i32, last: i64) -> anyhow::Result<()> {
    let row = db
        .query_one(
            "select count(distinct order_number), min(substr(order_number, 13)::bigint), \
                    max(substr(order_number, 13)::bigint), bool_and(order_number like 'BENCH-SALES-%') \
             from public.orders",
            &[],
        )
        .await?;
    let (distinct, min, max, shaped): (i64, i64, i64, bool) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let first = last - i64::from(rows) + 1;
    if distinct != i64::from(rows) || min != first || max != last || !shaped {
        bail!("numbers: {distinct} distinct, {min} … {max}; expected {rows}, {first} … {last}");
    }
    Ok(())
}

/// min / median / max of `values`.
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    let m = median(values);
    (values[0], m, values[values.len() - 1])
}

/// RUNS alternating rounds of both paths on the schema now applied; prints
/// one table row per path and returns the ratio of the medians.
async fn measure(db: &Client, f: &Fixture, label: &str, rows: i32, runs: usize) -> anyhow::Result<f64> {
    let mut trigger = Vec::with_capacity(runs);
    let mut explicit = Vec::with_capacity(runs);
    for run in 1..=runs {
        let t = insert(db, f, rows, None).await?;
        let last: i64 = db
            .query_one(
                "select last_value from private.order_number_counters where dealership_id = $1 and type = 'sales'",
                &[&f.dealership],
            )
            .await?
            .get(0);
        check_numbers(db, rows, last).await?;
        let e = insert(db, f, rows, Some(last + 1)).await?;
        eprintln!("{label} run {run}: trigger {t:.3} s, explicit {e:.3} s");
        trigger.push(t);
        explicit.push(e);
    }
    let (tmin, tmed, tmax) = spread(&mut trigger);
    let (emin, emed, emax) = spread(&mut explicit);
    let ratio = tmed / emed;
    println!("| {label} | trigger | {tmin:.3} | {tmed:.3} | {tmax:.3} | {ratio:.2} |");
    println!("| {label} | explicit | {emin:.3} | {emed:.3} | {emax:.3} | |");
    Ok(ratio)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows: i32 = env_or("WALCAST_BENCH_ROWS", 50_000);
    let runs: usize = env_or("WALCAST_BENCH_RUNS", 5);
    let old: u8 = env_or("WALCAST_BENCH_OLD", 1);
    let (_cluster, db) = common::bench_database().await?;
    apply(&db, |name| name < "0007").await?;
    let user = Uuid::new_v4();
    db.execute("insert into auth.users (id, email) values ($1, 'bench@example.com')", &[&user]).await?;
    db.execute("insert into public.profiles (id, email) values ($1, 'bench@example.com')", &[&user]).await?;
    let dealership: Uuid = db
        .query_one("insert into public.dealerships (name, code) values ('Bench', 'BENCH') returning id", &[])
        .await?
        .get(0);
    let fixture = Fixture { dealership, user };

    println!("order numbers: {rows}-row INSERT … SELECT into one dealership, {runs} alternating rounds per schema");
    println!("| schema | numbers | min s | median s | max s | trigger ÷ explicit (medians) |");
    println!("|---|---|---|---|---|---|");
    if old != 0 {
        measure(&db, &fixture, "0003 (per-row upsert)", rows, runs).await?;
    }
    apply(&db, |name| name >= "0007").await?;
    measure(&db, &fixture, "0007 (lock once, write per statement)", rows, runs).await?;
    Ok(())
}
