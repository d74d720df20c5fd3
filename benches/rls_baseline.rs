//! P8: who may see a change — walcast's membership cache against asking
//! PostgreSQL per subscriber per change, the way Supabase's `apply_rls` does
//! (realtime-protocol.md §8: for each subscriber, set the role and JWT claims,
//! then select the row by primary key under Row Level Security).
//!
//! `cargo bench --bench rls_baseline` (env: `WALCAST_BENCH_DEALERSHIPS`,
//! default 100; `WALCAST_BENCH_USERS`, default 1,000; `WALCAST_BENCH_ORDERS`,
//! default 1,000; `WALCAST_BENCH_CHANGES`, default 100; `WALCAST_BENCH_RUNS`,
//! default 3).
//!
//! One ephemeral cluster with the walcast schema (sql/): USERS users, each a
//! member of one of DEALERSHIPS dealerships, ORDERS orders spread over the
//! dealerships. Every user is one subscriber (`authenticated`, claims as a
//! Supabase JWT carries them); the changes are the first CHANGES orders taken
//! as INSERTs. Every path decides, for every (change, subscriber) pair,
//! whether the subscriber may see the row:
//!
//! - `walcast/per pair`: policies compiled and caches loaded once with
//!   `policy::plan::load`, then per change and subscriber the compiled
//!   predicate of `orders` for `authenticated`; looped
//!   until at least a second has passed.
//! - `walcast/index`: as the hub decides: per change only the members of the
//!   row's dealership are looked up and judged; every other subscriber is a
//!   "no" without any work. Counted as pairs decided per second.
//! - `pg/client 1 conn`: per change one transaction; per subscriber
//!   `set_config('role', 'authenticated', true)` + the claims, then
//!   `select 1 from public.orders where id = $1` (prepared, pipelined: one
//!   round trip per check) on one connection, as Supabase's poller has one.
//! - `pg/client 2 conn`: the same with the changes split over 2 connections.
//! - `pg/in-db loop`: one call per change to a PL/pgSQL function (written for
//!   this benchmark) that loops over a subscriber table doing the same
//!   set-role, set-claims and select per subscriber inside the database —
//!   `apply_rls`'s shape without client round trips, the fairer baseline.
//!
//! Every path must give the same answer for every pair (the process exits
//! non-zero otherwise). Rates are checks (pairs decided) per second, printed
//! per run and as medians over RUNS runs, with the ratio walcast ÷ baseline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use walcast::change::{Change, Datum, Op, Row};
use walcast::cluster::{Cluster, ClusterConfig};
use walcast::pgoutput::ReplicaIdentity;
use walcast::policy::plan::Loaded;
use walcast::policy::predicate::{CacheId, ColType, Context as PolicyContext, Expr, Scalar};
use walcast::policy::{Access, Caches, Index};

mod common;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

use common::ORDER_COLUMNS;

struct Subscriber {
    user: Uuid,
    /// The JWT claims as Supabase stores them per subscription.
    claims: String,
}

struct Data {
    subscribers: Vec<Subscriber>,
    /// (order id, the change as walcast would see it).
    changes: Vec<(Uuid, Change)>,
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = conn.await {
            eprintln!("connection error: {err}");
        }
    });
    Ok(client)
}

async fn seed(client: &Client, dealerships: usize, users: usize, orders: usize) -> anyhow::Result<()> {
    client
        .batch_execute(&format!(
            "insert into auth.users (id, email)
                 select gen_random_uuid(), 'user' || g || '@bench.test' from generate_series(1, {users}) g;
             insert into public.profiles (id, email, full_name) select id, email, email from auth.users;
             insert into public.dealerships (name, code)
                 select 'Dealership ' || g, 'D' || g from generate_series(1, {dealerships}) g;
             create temporary table u as
                 select id, (row_number() over (order by id) - 1)::int as n from auth.users;
             create temporary table d as
                 select id, (row_number() over (order by id) - 1)::int as n from public.dealerships;
             insert into public.dealer_memberships (user_id, dealership_id, role)
                 select u.id, d.id, 'user' from u join d on d.n = u.n % {dealerships};
             insert into public.orders (dealership_id, type, status, customer_info, vehicle_info, created_by)
                 select d.id,
                        (array['sales', 'service', 'recon', 'carwash'])[1 + g % 4],
                        (array['draft', 'pending', 'in_progress', 'completed', 'cancelled'])[1 + g % 5],
                        jsonb_build_object('name', 'Customer ' || g, 'email', 'c' || g || '@example.com',
                                           'phone', '+1 555 ' || lpad(g::text, 4, '0')),
                        jsonb_build_object('vin', md5(g::text), 'make', 'Honda', 'year', 2024),
                        u.id
                 from generate_series(0, {orders} - 1) g
                 join d on d.n = g % {dealerships}
                 join u on u.n = (g * 7) % {users};
             analyze;"
        ))
        .await?;
    Ok(())
}

async fn load_data(client: &Client, changes: usize) -> anyhow::Result<Data> {
    let rows = client
        .query(
            "select u.id, u.email, extract(epoch from u.created_at)::int8 \
             from auth.users u join public.dealer_memberships m on m.user_id = u.id order by u.id",
            &[],
        )
        .await?;
    let subscribers = rows
        .iter()
        .map(|r| {
            let (user, email, iat): (Uuid, String, i64) = (r.get(0), r.get(1), r.get(2));
            let claims = serde_json::json!({
                "aud": "authenticated",
                "exp": iat + 3600,
                "iat": iat,
                "iss": "http://127.0.0.1:54321/auth/v1",
                "sub": user,
                "email": email,
                "phone": "",
                "app_metadata": {"provider": "email", "providers": ["email"]},
                "user_metadata": {},
                "role": "authenticated",
                "aal": "aal1",
                "amr": [{"method": "password", "timestamp": iat}],
                "session_id": Uuid::new_v4(),
                "is_anonymous": false
            })
            .to_string();
            Subscriber { user, claims }
        })
        .collect();

    let relation = common::orders_relation(ReplicaIdentity::Default);
    let select = ORDER_COLUMNS.iter().map(|(name, _)| format!("{name}::text")).collect::<Vec<_>>().join(", ");
    let rows = client
        .query(&format!("select id, {select} from public.orders o order by o.id limit $1"), &[&(changes as i64)])
        .await?;
    let changes = rows
        .iter()
        .map(|r| {
            let id: Uuid = r.get(0);
            let datums = (1..=ORDER_COLUMNS.len())
                .map(|i| r.get::<_, Option<String>>(i).map_or(Datum::Null, |text| Datum::Text(Bytes::from(text))))
                .collect();
            let change = Change {
                relation: Arc::clone(&relation),
                op: Op::Insert,
                record: Some(Row(datums)),
                old_record: None,
                missing_toast: Vec::new(),
            };
            (id, change)
        })
        .collect();
    Ok(Data { subscribers, changes })
}

/// The compiled plan of `orders` for `authenticated`, and the caches.
struct Judge<'a> {
    expr: &'a Expr,
    index: &'a Index,
    caches: &'a Caches,
    map: Vec<Option<usize>>,
}

struct Ctx<'a> {
    row: &'a Row,
    map: &'a [Option<usize>],
    claims: &'a serde_json::Value,
    caches: &'a Caches,
}

const ABSENT: Datum = Datum::Absent;

impl PolicyContext for Ctx<'_> {
    fn column(&self, index: usize) -> &Datum {
        self.map.get(index).copied().flatten().and_then(|i| self.row.0.get(i)).unwrap_or(&ABSENT)
    }
    fn claims(&self) -> &serde_json::Value {
        self.claims
    }
    fn member(&self, cache: CacheId, outer: Option<&Scalar>, user: &Scalar) -> bool {
        self.caches.member(cache, outer, user)
    }
    fn user_rows(&self, cache: CacheId, user: &Scalar) -> (bool, bool) {
        self.caches.user_rows(cache, user)
    }
}

impl Judge<'_> {
    fn new<'a>(loaded: &'a Loaded, change: &Change) -> Judge<'a> {
        let plan = loaded.policies.table_by_name("public", "orders").expect("orders is published");
        let role = plan.role("authenticated").expect("authenticated exists");
        let Access::Rows(expr) = &role.access else { panic!("orders is not in memory: {:?}", role.access) };
        let map = plan.columns.iter().map(|c| change.relation.column_index(c)).collect();
        Judge { expr, index: &role.index, caches: &loaded.caches, map }
    }

    fn sees(&self, change: &Change, claims: &serde_json::Value) -> bool {
        let row = change.record.as_ref().expect("an INSERT has a row");
        self.expr.eval(&Ctx { row, map: &self.map, claims, caches: self.caches }).visible()
    }

    /// The users of the row's group (the hub's candidates).
    fn audience(&self, change: &Change, out: &mut Vec<String>) {
        let Index::Member { cache, column, .. } = self.index else { panic!("orders is indexed by membership") };
        let row = change.record.as_ref().expect("an INSERT has a row");
        let Some(group) = self.map[*column].and_then(|i| row.0.get(i)).and_then(Datum::as_str) else { return };
        let Ok(group) = Scalar::parse(ColType::Uuid, group) else { return };
        if let Some(c) = self.caches.get(*cache) {
            c.for_each_member(&group, |u| out.push(u.canonical()));
        }
    }
}

fn claims_of(user: Uuid) -> serde_json::Value {
    serde_json::json!({"role": "authenticated", "sub": user.to_string()})
}

/// walcast: visibility of every pair (row-major: change × subscriber), and the rate.
fn walcast_path(data: &Data, loaded: &Loaded) -> (Vec<bool>, f64) {
    let judge = Judge::new(loaded, &data.changes[0].1);
    let claims: Vec<serde_json::Value> = data.subscribers.iter().map(|s| claims_of(s.user)).collect();
    let pairs = data.changes.len() * data.subscribers.len();
    let mut visible = vec![false; pairs];
    let mut checks = 0u64;
    let started = Instant::now();
    let mut first = true;
    while first || started.elapsed() < Duration::from_secs(1) {
        let mut k = 0;
        for (_, change) in &data.changes {
            for c in &claims {
                visible[k] = judge.sees(std::hint::black_box(change), c);
                k += 1;
            }
        }
        std::hint::black_box(&mut visible);
        checks += pairs as u64;
        first = false;
    }
    (visible, checks as f64 / started.elapsed().as_secs_f64())
}

/// walcast as the hub does it: only the members of the row's dealership are
/// candidates (every other subscriber is decided "no" without a lookup).
/// Returns the visibility of every pair and pairs decided per second.
fn walcast_index_path(data: &Data, loaded: &Loaded) -> (Vec<bool>, f64) {
    let judge = Judge::new(loaded, &data.changes[0].1);
    let subs = data.subscribers.len();
    let index: HashMap<String, usize> =
        data.subscribers.iter().enumerate().map(|(i, s)| (s.user.to_string(), i)).collect();
    let claims: HashMap<String, serde_json::Value> =
        data.subscribers.iter().map(|s| (s.user.to_string(), claims_of(s.user))).collect();
    let mut visible = vec![false; data.changes.len() * subs];
    let mut audience = Vec::new();
    for (c, (_, change)) in data.changes.iter().enumerate() {
        audience.clear();
        judge.audience(change, &mut audience);
        for user in &audience {
            if let (Some(&i), Some(cl)) = (index.get(user), claims.get(user)) {
                if judge.sees(change, cl) {
                    visible[c * subs + i] = true;
                }
            }
        }
    }
    let mut decided = 0u64;
    let mut seen = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        for (_, change) in &data.changes {
            audience.clear();
            judge.audience(std::hint::black_box(change), &mut audience);
            for user in &audience {
                if let Some(cl) = claims.get(user) {
                    seen += u64::from(judge.sees(change, cl));
                }
            }
        }
        decided += (data.changes.len() * subs) as u64;
    }
    std::hint::black_box(seen);
    (visible, decided as f64 / started.elapsed().as_secs_f64())
}

/// PostgreSQL per check from the client, changes `range` on one connection.
async fn client_checks(client: Client, data: Arc<Data>, range: std::ops::Range<usize>) -> anyhow::Result<Vec<bool>> {
    let mut client = client;
    let set = client
        .prepare("select set_config('role', 'authenticated', true), set_config('request.jwt.claims', $1, true)")
        .await?;
    let check = client.prepare("select 1 from public.orders where id = $1").await?;
    let mut visible = Vec::with_capacity(range.len() * data.subscribers.len());
    for (id, _) in &data.changes[range] {
        let tx = client.transaction().await?;
        for subscriber in &data.subscribers {
            // Both requests are sent before either answer is read: one round trip.
            let (claims, row): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) = ([&subscriber.claims], [id]);
            let (_, rows) = futures::try_join!(tx.execute(&set, &claims), tx.query(&check, &row))?;
            visible.push(!rows.is_empty());
        }
        tx.commit().await?;
    }
    Ok(visible)
}

async fn client_path(url: &str, data: &Arc<Data>, connections: usize) -> anyhow::Result<(Vec<bool>, f64)> {
    let n = data.changes.len();
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(connect(url).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let range = n * i / connections..n * (i + 1) / connections;
            tokio::spawn(client_checks(client, Arc::clone(data), range))
        })
        .collect();
    let mut visible = Vec::with_capacity(n * data.subscribers.len());
    for task in tasks {
        visible.extend(task.await??);
    }
    let rate = visible.len() as f64 / started.elapsed().as_secs_f64();
    Ok((visible, rate))
}

/// The in-database loop: one function call per change.
const IN_DB_FUNCTION: &str = "
create schema bench;
create table bench.subscribers (ord int primary key, user_id uuid not null, claims text not null);
-- For one changed row: each subscriber's visibility, in subscriber order,
-- judged as that subscriber (role + claims, then the row by primary key
-- under Row Level Security).
create function bench.visible_to(p_id uuid) returns boolean[]
language plpgsql
as $$
declare
    s record;
    seen boolean;
    result boolean[] := '{}';
begin
    for s in select claims from bench.subscribers order by ord loop
        perform set_config('role', 'authenticated', true);
        perform set_config('request.jwt.claims', s.claims, true);
        select exists (select 1 from public.orders o where o.id = p_id) into seen;
        perform set_config('role', 'none', true);
        result := result || seen;
    end loop;
    return result;
end
$$;";

async fn in_db_path(client: &Client, data: &Data) -> anyhow::Result<(Vec<bool>, f64)> {
    let call = client.prepare("select bench.visible_to($1)").await?;
    let mut visible = Vec::with_capacity(data.changes.len() * data.subscribers.len());
    let started = Instant::now();
    for (id, _) in &data.changes {
        let seen: Vec<bool> = client.query_one(&call, &[id]).await?.get(0);
        visible.extend(seen);
    }
    let rate = visible.len() as f64 / started.elapsed().as_secs_f64();
    Ok((visible, rate))
}

/// Number of pairs where `got` disagrees with `want` (printing the first few).
fn disagreements(name: &str, data: &Data, want: &[bool], got: &[bool]) -> usize {
    if want.len() != got.len() {
        eprintln!("{name}: {} answers, expected {}", got.len(), want.len());
        return want.len().max(got.len());
    }
    let subs = data.subscribers.len();
    let mut bad = 0;
    for (k, (w, g)) in want.iter().zip(got).enumerate() {
        if w != g {
            if bad < 5 {
                eprintln!(
                    "{name} disagrees with walcast: order {} subscriber {}: walcast {w}, {name} {g}",
                    data.changes[k / subs].0,
                    data.subscribers[k % subs].user
                );
            }
            bad += 1;
        }
    }
    bad
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let dealerships = env_usize("WALCAST_BENCH_DEALERSHIPS", 100).max(1);
    let users = env_usize("WALCAST_BENCH_USERS", 1_000).max(1);
    let orders = env_usize("WALCAST_BENCH_ORDERS", 1_000).max(1);
    let changes = env_usize("WALCAST_BENCH_CHANGES", 100).clamp(1, orders);
    let runs = env_usize("WALCAST_BENCH_RUNS", 3).max(1);

    let setup = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(ClusterConfig::ephemeral())).await??;
    let admin = connect(&cluster.url("postgres")).await?;
    admin.batch_execute("create database bench").await?;
    let url = cluster.url("bench");
    let mut client = connect(&url).await?;
    walcast::schema::migrate(&mut client, &walcast::schema::Migrations::embedded()).await.context("migrate")?;
    seed(&client, dealerships, users, orders).await.context("seed")?;
    client.batch_execute(IN_DB_FUNCTION).await.context("in-db function")?;
    let data = Arc::new(load_data(&client, changes).await?);
    if data.subscribers.len() != users {
        bail!("{} subscribers, expected {users}", data.subscribers.len());
    }
    let insert = client.prepare("insert into bench.subscribers (ord, user_id, claims) values ($1, $2, $3)").await?;
    for (i, s) in data.subscribers.iter().enumerate() {
        client.execute(&insert, &[&(i as i32), &s.user, &s.claims]).await?;
    }
    client.batch_execute("analyze bench.subscribers").await?;

    let loaded =
        walcast::policy::plan::load(&mut client, &["supabase_realtime".to_owned()], None).await.context("policies")?;
    eprintln!(
        "PostgreSQL {}; {dealerships} dealerships, {users} users (1 membership each, {} loaded), {orders} orders; \
         {} changes x {} subscribers = {} checks per path per run; setup {:.1} s",
        cluster.version(),
        loaded.at.rows,
        data.changes.len(),
        data.subscribers.len(),
        data.changes.len() * data.subscribers.len(),
        setup.elapsed().as_secs_f64()
    );

    let names = ["walcast/per pair", "walcast/index", "pg/client 1 conn", "pg/client 2 conn", "pg/in-db loop"];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut bad = 0;
    println!("run  path               checks/s        changes/s    visible");
    for run in 0..runs {
        let (want, rate) = walcast_path(&data, &loaded);
        let expected_visible = data.changes.len() * users / dealerships;
        let visible = want.iter().filter(|v| **v).count();
        // Each order's dealership has USERS/DEALERSHIPS members (exact when it divides).
        if users % dealerships == 0 && visible != expected_visible {
            bail!("walcast found {visible} visible pairs, expected {expected_visible}");
        }
        let mut results = vec![(want.clone(), rate), walcast_index_path(&data, &loaded)];
        results.push(client_path(&url, &data, 1).await?);
        results.push(client_path(&url, &data, 2).await?);
        results.push(in_db_path(&client, &data).await?);
        for (i, (got, rate)) in results.iter().enumerate() {
            bad += disagreements(names[i], &data, &want, got);
            println!(
                "{run:<4} {:<18} {rate:<15.0} {:<12.0} {}",
                names[i],
                rate / data.subscribers.len() as f64,
                got.iter().filter(|v| **v).count()
            );
            rates[i].push(*rate);
        }
    }
    let (walcast, index) = (median(&rates[0]), median(&rates[1]));
    let subs = data.subscribers.len() as f64;
    println!("median over {runs} runs (changes/s = checks/s / {subs} subscribers):");
    println!("  {:<18} {walcast:.0} checks/s, {:.0} changes/s", names[0], walcast / subs);
    println!("  {:<18} {index:.0} checks/s, {:.0} changes/s", names[1], index / subs);
    for (name, r) in names.iter().zip(&rates).skip(2) {
        let m = median(r);
        println!(
            "  {name:<18} {m:.0} checks/s, {:.1} changes/s (walcast/per pair ÷ this = {:.0}x, walcast/index ÷ \
             this = {:.0}x)",
            m / subs,
            walcast / m,
            index / m
        );
    }
    if bad > 0 {
        eprintln!("{bad} (change, subscriber) pairs where a PostgreSQL path and walcast disagree");
        std::process::exit(1);
    }
    println!("all paths agree on every (change, subscriber) pair");
    Ok(())
}
