//! Order numbering in bulk: orders written into one dealership with the
//! numbers left to the trigger, against the same writes with the numbers
//! given explicitly.
//!
//! `cargo bench --bench order_numbers` (env: `WALCAST_BENCH_ROWS`, default
//! 50,000; `WALCAST_BENCH_STATEMENTS`, default 20,000, 0 skips that shape;
//! `WALCAST_BENCH_RUNS`, default 5; `WALCAST_BENCH_OLD=0` skips the old
//! trigger).
//!
//! One ephemeral cluster ([`common::bench_database`]). First the schema up to
//! `0006` (the per-row counter upsert of `0003`, "old"), then `0007` applied
//! on top ("new"). Two shapes: one `INSERT … SELECT generate_series` of ROWS
//! orders (the case), and STATEMENTS single-row `INSERT`s in one
//! transaction (a server-side `DO` loop). For each schema and shape RUNS
//! rounds alternate the two paths, each timed write starting from an emptied
//! `public.orders` (TRUNCATE and CHECKPOINT, untimed): `trigger` leaves
//! `order_number` to the trigger, `explicit` gives `BENCH-SALES-<n>` numbers
//! of the same shape (the trigger still runs and returns at once). Both keep
//! every index of the schema. Each trigger round is checked: the expected
//! count of distinct numbers, continuing the counter without a gap. Printed:
//! per schema, shape and path min/median/max seconds, and the ratio of the
//! medians trigger ÷ explicit.

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

/// How the orders are written.
#[derive(Clone, Copy)]
enum Shape {
    /// One `INSERT … SELECT generate_series` statement.
    Bulk,
    /// One single-row `INSERT` statement per order, all in one transaction
    /// (a server-side `DO` loop, so client round trips do not count).
    Statements,
}

impl Shape {
    fn label(self, rows: i32) -> String {
        match self {
            Shape::Bulk => format!("1 statement × {rows} rows"),
            Shape::Statements => format!("{rows} statements × 1 row, 1 transaction"),
        }
    }
}

/// The numbers given explicitly: `BENCH-SALES-<first + g>`, shaped like the
/// trigger's.
const EXPLICIT_NUMBER: &str =
    "'BENCH-SALES-' || lpad((FIRST::bigint + g)::text, greatest(6, length((FIRST::bigint + g)::text)), '0')";

/// One timed write of `rows` orders; `explicit` is the number the first order
/// gets when the numbers are given (`None`: the trigger numbers them).
async fn insert(db: &Client, f: &Fixture, shape: Shape, rows: i32, explicit: Option<i64>) -> anyhow::Result<f64> {
    db.batch_execute("truncate public.orders; checkpoint").await?;
    let (column, number) = match explicit {
        None => ("", String::new()),
        Some(first) => ("order_number, ", format!("{}, ", EXPLICIT_NUMBER.replace("FIRST", &first.to_string()))),
    };
    let (d, u) = (f.dealership, f.user);
    let sql = match shape {
        Shape::Bulk => format!(
            "insert into public.orders (dealership_id, {column}type, customer_info, created_by) \
             select '{d}', {number}'sales', jsonb_build_object('name', 'Customer ' || g), '{u}' \
             from generate_series(0, {rows} - 1) g"
        ),
        Shape::Statements => format!(
            "do $$ begin for g in 0..{rows} - 1 loop \
                 insert into public.orders (dealership_id, {column}type, customer_info, created_by) \
                 values ('{d}', {number}'sales', jsonb_build_object('name', 'Customer ' || g), '{u}'); \
             end loop; end $$"
        ),
    };
    let started = Instant::now();
    db.batch_execute(&sql).await?;
    let seconds = started.elapsed().as_secs_f64();
    let inserted: i64 = db.query_one("select count(*) from public.orders", &[]).await?.get(0);
    if inserted != i64::from(rows) {
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
async fn measure(db: &Client, f: &Fixture, label: &str, shape: Shape, rows: i32, runs: usize) -> anyhow::Result<f64> {
    let mut trigger = Vec::with_capacity(runs);
    let mut explicit = Vec::with_capacity(runs);
    for run in 1..=runs {
        let t = insert(db, f, shape, rows, None).await?;
        let last: i64 = db
            .query_one(
                "select last_value from private.order_number_counters where dealership_id = $1 and type = 'sales'",
                &[&f.dealership],
            )
            .await?
            .get(0);
        check_numbers(db, rows, last).await?;
        let e = insert(db, f, shape, rows, Some(last + 1)).await?;
        eprintln!("{label}, {}: run {run}: trigger {t:.3} s, explicit {e:.3} s", shape.label(rows));
        trigger.push(t);
        explicit.push(e);
    }
    let (tmin, tmed, tmax) = spread(&mut trigger);
    let (emin, emed, emax) = spread(&mut explicit);
    let ratio = tmed / emed;
    let shape = shape.label(rows);
    println!("| {label} | {shape} | trigger | {tmin:.3} | {tmed:.3} | {tmax:.3} | {ratio:.2} |");
    println!("| {label} | {shape} | explicit | {emin:.3} | {emed:.3} | {emax:.3} | |");
    Ok(ratio)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows: i32 = env_or("WALCAST_BENCH_ROWS", 50_000);
    let statements: i32 = env_or("WALCAST_BENCH_STATEMENTS", 20_000);
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

    println!("order numbers into one dealership, {runs} alternating rounds per schema and shape");
    println!("| schema | shape | numbers | min s | median s | max s | trigger ÷ explicit (medians) |");
    println!("|---|---|---|---|---|---|---|");
    let shapes = [(Shape::Bulk, rows), (Shape::Statements, statements)];
    let shapes = shapes.iter().filter(|(_, n)| *n > 0);
    if old != 0 {
        for &(shape, n) in shapes.clone() {
            measure(&db, &fixture, "0003 (per-row upsert)", shape, n, runs).await?;
        }
    }
    apply(&db, |name| name >= "0007").await?;
    for &(shape, n) in shapes {
        measure(&db, &fixture, "0007 (lock once, write per statement)", shape, n, runs).await?;
    }
    Ok(())
}
