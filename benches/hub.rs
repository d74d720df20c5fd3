//! Filter evaluation and hub fan-out, in memory (no PostgreSQL, no sockets):
//! `cargo bench --bench hub` (short: `cargo bench --bench hub -- --warm-up-time 1 --measurement-time 3`).
//!
//! - `filter_eval`: [`Filter::matches_row`] on an `orders` row (the columns of
//!   `public.orders` in sql/0002) for typical filters, on a row that matches
//!   and one that does not; time per evaluation.
//! - `hub_fanout`: 10,000 subscribers (10,000 users, one connection and one
//!   `realtime:orders` subscription each, vsn 2.0.0, `public.orders`, event
//!   `*`, no filter) over 1,000 dealerships (10 members each). One iteration
//!   is one committed transaction (Begin, 1 or 100 INSERTs into `orders` for
//!   random dealerships, Commit) pushed through [`Core::stage`]: judging,
//!   membership lookups, serialization (one frame per change, shared by its 10
//!   receivers) and 10 outbox pushes per change. Throughput is in deliveries.
//!   Changes are built before the timed section; outboxes are drained between
//!   timed chunks (never inside them), so memory stays bounded and the
//!   queues' capacity is warm, as with a live writer task.
//! - `hub_filters`: 10,000 `service_role` subscribers on `public.orders`
//!   (every row visible), one change per transaction into a random one of
//!   1,000 dealerships. `unfiltered`: no filter (10,000 deliveries per
//!   change); `in_100_indexed`: each subscriber's filter is
//!   `dealership_id=in.(…)` over 100 distinct dealerships (≈1,000 matches
//!   per change), looked up through the filter index. `in_100_one_by_one`
//!   evaluates the same 10,000 filters on the change's row one after another
//!   — what the hub did per change before the index (no deliveries). Time is
//!   per change.
//! - Before criterion runs, a counting global allocator reports the heap
//!   allocations (`alloc`, `alloc_zeroed` and `realloc` calls) the hub makes
//!   per change for the 1-change transaction over 10,000 transactions, after
//!   a 10,000-transaction warm-up.
//!
//! The counting allocator costs one relaxed atomic add per allocation in every
//! benchmark of this file.

#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use futures::FutureExt;
use uuid::Uuid;
use walcast::change::{Change, Datum, Op, RelationInfo, Row, TxBegin, TxEvent, TxInfo};
use walcast::hub::{
    hub, Binding, Control, Core, EventMatch, Hub, HubConfig, HubHandle, Outbox, OutboxLimits, StageEvent, Subscription,
    Vsn,
};
use walcast::lsn::Lsn;
use walcast::pgoutput::{PgTimestamp, ReplicaIdentity};
use walcast::policy::{Filter, Viewer};
use walcast::replication::AckHandle;

mod common;

// ---------------------------------------------------------------------------
// Counting allocator

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed.
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------
// The orders relation and rows

const DEALERSHIPS: usize = 1_000;
const USERS_PER_DEALERSHIP: usize = 10;
const BINDING_ID: u32 = 74_182_923;

/// `public.orders` as published (sql/0002), REPLICA IDENTITY FULL.
fn orders_relation() -> Arc<RelationInfo> {
    common::orders_relation(ReplicaIdentity::Full)
}

fn text(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// One orders row, as pgoutput text values.
fn orders_row(id: Uuid, dealership: Uuid, seq: u64, status: &str, created_at: &str) -> Row {
    Row(vec![
        text(&id.to_string()),
        text(&dealership.to_string()),
        text(&format!("NORTH-SALES-{seq:06}")),
        Datum::Text(Bytes::from_static(b"sales")),
        text(status),
        Datum::Text(Bytes::from_static(
            br#"{"name": "Jane Doe", "email": "jane@example.com", "phone": "+1 555 0100"}"#,
        )),
        Datum::Text(Bytes::from_static(
            br#"{"vin": "1HGCM82633A004352", "make": "Honda", "year": 2024, "model": "Accord"}"#,
        )),
        Datum::Null,
        Datum::Text(Bytes::from_static(b"{}")),
        Datum::Text(Bytes::from_static(b"3f2504e0-4f89-11d3-9a0c-0305e82c3301")),
        Datum::Null,
        text(created_at),
        text(created_at),
    ])
}

/// splitmix64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(((u128::from(self.next()) << 64) | u128::from(self.next())).to_be_bytes())
            .into_uuid()
    }
}

// ---------------------------------------------------------------------------
// filter_eval

fn bench_filter(c: &mut Criterion) {
    let relation = orders_relation();
    let dealership = Uuid::parse_str("7d9f3c1e-2b4a-4c6d-8e0f-1a2b3c4d5e6f").unwrap();
    let other = Uuid::parse_str("0b6f1d2e-3c4a-4b5d-9e6f-7a8b9c0d1e2f").unwrap();
    let hit = orders_row(Uuid::new_v4(), dealership, 1, "pending", "2026-11-25 10:00:00.123456+00");
    let miss = orders_row(Uuid::new_v4(), other, 2, "completed", "2025-06-30 23:59:59.999999+00");
    let filters = [
        ("status_eq", "status=eq.pending".to_owned()),
        ("dealership_eq_uuid", format!("dealership_id=eq.{dealership}")),
        ("status_in_3", "status=in.(draft,pending,in_progress)".to_owned()),
        ("created_at_gte", "created_at=gte.2026-01-01T00:00:00Z".to_owned()),
        ("and_dealership_status_in", format!("dealership_id=eq.{dealership},status=in.(draft,pending,in_progress)")),
    ];
    let mut group = c.benchmark_group("filter_eval");
    group.throughput(Throughput::Elements(1));
    for (name, spec) in &filters {
        let filter = Filter::for_relation(spec, &relation).expect("filter parses");
        assert!(filter.matches_row(&relation, &hit), "{spec} should match");
        assert!(!filter.matches_row(&relation, &miss), "{spec} should not match");
        for (which, row) in [("match", &hit), ("no_match", &miss)] {
            group.bench_function(format!("{name}/{which}"), |b| {
                b.iter(|| black_box(&filter).matches_row(black_box(&relation), black_box(row)))
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// hub_fanout

/// A hub with 10,000 subscribed users over 1,000 dealerships.
struct World {
    hub: Hub,
    handle: HubHandle,
    outboxes: Vec<Arc<Outbox>>,
    dealerships: Vec<Uuid>,
    relation: Arc<RelationInfo>,
    rng: Rng,
    lsn: u64,
    seq: u64,
    drained: Vec<Bytes>,
}

impl World {
    fn new() -> World {
        let mut rng = Rng(0x5eed);
        let mut memberships = Vec::new();
        let (mut hub, handle) = hub(HubConfig::default(), AckHandle::default(), walcast::spill::Spill::temporary());
        let limits = OutboxLimits::default();
        let dealerships: Vec<Uuid> = (0..DEALERSHIPS).map(|_| rng.uuid()).collect();
        let mut outboxes = Vec::with_capacity(DEALERSHIPS * USERS_PER_DEALERSHIP);
        let core = hub.core_mut();
        for &dealership in &dealerships {
            for _ in 0..USERS_PER_DEALERSHIP {
                let user = rng.uuid();
                memberships.push((user, dealership));
                let outbox = Arc::new(Outbox::new(limits));
                core.control(Control::Join(Subscription {
                    conn: outboxes.len() as u64,
                    topic: "realtime:orders".into(),
                    vsn: Vsn::V2,
                    viewer: Viewer::user(user),
                    bindings: vec![Binding {
                        id: BINDING_ID,
                        schema: Some("public".into()),
                        table: Some("orders".into()),
                        event: EventMatch::All,
                        filter: Filter::default(),
                        select: None,
                    }],
                    outbox: Arc::clone(&outbox),
                    on_live: None,
                    on_withheld: None,
                }));
                outboxes.push(outbox);
            }
        }
        let relation = orders_relation();
        let loaded = walcast::load::schema::dealership_loaded(relation.oid, relation.oid + 1, &memberships);
        core.stage(walcast::hub::StageEvent::Policies(Box::new(loaded))).expect("policies");
        World { hub, handle, outboxes, dealerships, relation, rng, lsn: 0x100_0000, seq: 0, drained: Vec::new() }
    }

    /// Appends one committed transaction of `changes` orders INSERTs.
    fn transaction(&mut self, changes: usize, out: &mut Vec<StageEvent>) {
        let commit_lsn = Lsn(self.lsn + 0x100 * changes as u64);
        let end_lsn = Lsn(commit_lsn.0 + 0x30);
        self.lsn = end_lsn.0;
        let xid = (self.seq & 0xffff_ffff) as u32;
        // 2026-11-25 10:00:00 UTC plus a millisecond per transaction.
        let commit_timestamp = PgTimestamp(848_916_000_000_000 + self.seq as i64 * 1000);
        out.push(StageEvent::Tx(TxEvent::Begin(TxBegin { xid, commit_lsn, commit_timestamp })));
        for _ in 0..changes {
            self.seq += 1;
            let dealership = self.dealerships[self.rng.below(self.dealerships.len())];
            let id = self.rng.uuid();
            out.push(StageEvent::Tx(TxEvent::Change(Change {
                relation: Arc::clone(&self.relation),
                op: Op::Insert,
                record: Some(orders_row(id, dealership, self.seq, "pending", "2026-11-25 10:00:00.123456+00")),
                old_record: None,
                missing_toast: Vec::new(),
            })));
        }
        out.push(StageEvent::Tx(TxEvent::Commit(TxInfo { xid, commit_lsn, end_lsn, commit_timestamp })));
    }

    fn core(&mut self) -> &mut Core {
        self.hub.core_mut()
    }

    /// Empties every outbox (what the writer tasks would do).
    fn drain(&mut self) {
        drain_outboxes(&self.outboxes, &mut self.drained);
    }

    fn deliveries(&self) -> u64 {
        self.handle.stats.deliveries.load(Ordering::Relaxed)
    }
}

/// Empties every outbox (what the writer tasks would do).
fn drain_outboxes(outboxes: &[Arc<Outbox>], drained: &mut Vec<Bytes>) {
    for outbox in outboxes {
        if outbox.depth().0 > 0 {
            let ready = outbox.next_batch(drained).now_or_never();
            assert!(matches!(ready, Some(Ok(()))), "outbox closed");
            drained.clear();
        }
    }
}

/// Stages `events`, all of them.
fn stage_all(core: &mut Core, events: &mut Vec<StageEvent>) {
    for event in events.drain(..) {
        core.stage(event).expect("hub stage");
    }
}

fn bench_fanout(c: &mut Criterion) {
    let mut world = World::new();
    let mut group = c.benchmark_group("hub_fanout");
    for changes in [1usize, 100] {
        let deliveries_per_tx = (changes * USERS_PER_DEALERSHIP) as u64;
        group.throughput(Throughput::Elements(deliveries_per_tx));
        // Transactions per untimed drain.
        let chunk = (1000 / changes).max(1) as u64;
        group.bench_function(format!("10k_subs_1k_dealerships/tx_{changes}_changes"), |b| {
            b.iter_custom(|iters| {
                let mut events = Vec::with_capacity(chunk as usize * (changes + 2));
                let mut elapsed = Duration::ZERO;
                let before = world.deliveries();
                let mut done = 0;
                while done < iters {
                    let n = chunk.min(iters - done);
                    for _ in 0..n {
                        world.transaction(changes, &mut events);
                    }
                    let start = Instant::now();
                    stage_all(world.core(), &mut events);
                    elapsed += start.elapsed();
                    world.drain();
                    done += n;
                }
                assert_eq!(world.deliveries() - before, iters * deliveries_per_tx, "every change reaches 10");
                elapsed
            })
        });
    }
    group.finish();
}

/// Heap allocations per change for 1-change transactions (10 deliveries each).
fn allocations_report() {
    const TRANSACTIONS: usize = 10_000;
    const CHUNK: usize = 100;
    let mut world = World::new();
    let mut events = Vec::with_capacity(CHUNK * 3);
    let mut run = |world: &mut World| -> (u64, u64) {
        let mut allocations = 0;
        let before = world.deliveries();
        for _ in 0..TRANSACTIONS / CHUNK {
            for _ in 0..CHUNK {
                world.transaction(1, &mut events);
            }
            let start = ALLOCATIONS.load(Ordering::Relaxed);
            stage_all(world.core(), &mut events);
            allocations += ALLOCATIONS.load(Ordering::Relaxed) - start;
            world.drain();
        }
        (allocations, world.deliveries() - before)
    };
    run(&mut world); // warm-up: registry maps, outbox queues, frame cache
    let (allocations, deliveries) = run(&mut world);
    assert_eq!(deliveries, (TRANSACTIONS * USERS_PER_DEALERSHIP) as u64);
    println!(
        "allocations per change: {:.2} ({allocations} allocations over {TRANSACTIONS} one-change transactions, \
         {deliveries} deliveries)",
        allocations as f64 / TRANSACTIONS as f64
    );
}

/// 10,000 service_role subscribers with `filters[i]` (binding on orders).
struct Filtered {
    hub: Hub,
    handle: HubHandle,
    outboxes: Vec<Arc<Outbox>>,
    dealerships: Vec<Uuid>,
    relation: Arc<RelationInfo>,
    rng: Rng,
    lsn: u64,
    drained: Vec<Bytes>,
}

impl Filtered {
    fn new(specs: &[String], dealerships: Vec<Uuid>) -> Filtered {
        let (mut hub, handle) = hub(HubConfig::default(), AckHandle::default(), walcast::spill::Spill::temporary());
        let relation = orders_relation();
        let core = hub.core_mut();
        let loaded = walcast::load::schema::dealership_loaded(relation.oid, relation.oid + 1, &[]);
        core.stage(walcast::hub::StageEvent::Policies(Box::new(loaded))).expect("policies");
        let mut outboxes = Vec::with_capacity(specs.len());
        for (conn, spec) in specs.iter().enumerate() {
            let outbox = Arc::new(Outbox::new(OutboxLimits::default()));
            core.control(Control::Join(Subscription {
                conn: conn as u64,
                topic: "realtime:orders".into(),
                vsn: Vsn::V2,
                viewer: Viewer::service(),
                bindings: vec![Binding {
                    id: BINDING_ID,
                    schema: Some("public".into()),
                    table: Some("orders".into()),
                    event: EventMatch::All,
                    filter: Filter::for_relation(spec, &relation).expect("filter parses"),
                    select: None,
                }],
                outbox: Arc::clone(&outbox),
                on_live: None,
                on_withheld: None,
            }));
            outboxes.push(outbox);
        }
        Filtered { hub, handle, outboxes, dealerships, relation, rng: Rng(7), lsn: 0x100_0000, drained: Vec::new() }
    }

    fn transaction(&mut self, out: &mut Vec<StageEvent>) {
        let commit_lsn = Lsn(self.lsn + 0x100);
        let end_lsn = Lsn(commit_lsn.0 + 0x30);
        self.lsn = end_lsn.0;
        let commit_timestamp = PgTimestamp(848_916_000_000_000);
        out.push(StageEvent::Tx(TxEvent::Begin(TxBegin { xid: 1, commit_lsn, commit_timestamp })));
        let dealership = self.dealerships[self.rng.below(self.dealerships.len())];
        out.push(StageEvent::Tx(TxEvent::Change(Change {
            relation: Arc::clone(&self.relation),
            op: Op::Insert,
            record: Some(orders_row(self.rng.uuid(), dealership, 1, "pending", "2026-11-25 10:00:00.123456+00")),
            old_record: None,
            missing_toast: Vec::new(),
        })));
        out.push(StageEvent::Tx(TxEvent::Commit(TxInfo { xid: 1, commit_lsn, end_lsn, commit_timestamp })));
    }

    fn drain(&mut self) {
        drain_outboxes(&self.outboxes, &mut self.drained);
    }
}

fn bench_filters(c: &mut Criterion) {
    const SUBSCRIBERS: usize = 10_000;
    let mut rng = Rng(0xf17e);
    let dealerships: Vec<Uuid> = (0..DEALERSHIPS).map(|_| rng.uuid()).collect();
    let in_lists: Vec<String> = (0..SUBSCRIBERS)
        .map(|i| {
            let values: Vec<String> =
                (0..100).map(|k| dealerships[(i * 7 + k * 10) % DEALERSHIPS].to_string()).collect();
            format!("dealership_id=in.({})", values.join(","))
        })
        .collect();
    let mut group = c.benchmark_group("hub_filters");
    group.throughput(Throughput::Elements(1));
    for (name, specs) in [("unfiltered", vec![String::new(); SUBSCRIBERS]), ("in_100_indexed", in_lists.clone())] {
        // Heap held per subscription: the hub with its subscriptions, less
        // the hub alone (outboxes included, the join's JSON not).
        let empty = LIVE_BYTES.load(Ordering::Relaxed);
        let alone = Filtered::new(&[], dealerships.clone());
        let hub_alone = LIVE_BYTES.load(Ordering::Relaxed) - empty;
        drop(alone);
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let mut world = Filtered::new(&specs, dealerships.clone());
        let held = LIVE_BYTES.load(Ordering::Relaxed) - before - hub_alone;
        println!(
            "hub_filters/{name}: {:.0} bytes of heap per subscription ({SUBSCRIBERS} subscriptions, one binding each)",
            held as f64 / SUBSCRIBERS as f64
        );
        group.bench_function(format!("10k_subs/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut events = Vec::with_capacity(30);
                let mut elapsed = Duration::ZERO;
                let before = world.handle.stats.deliveries.load(Ordering::Relaxed);
                let mut done = 0;
                while done < iters {
                    let n = 10.min(iters - done);
                    for _ in 0..n {
                        world.transaction(&mut events);
                    }
                    let start = Instant::now();
                    stage_all(world.hub.core_mut(), &mut events);
                    elapsed += start.elapsed();
                    world.drain();
                    done += n;
                }
                let per_change = (world.handle.stats.deliveries.load(Ordering::Relaxed) - before) / iters.max(1);
                assert!(per_change > 0, "changes are delivered");
                elapsed
            })
        });
    }
    let relation = orders_relation();
    let filters: Vec<Filter> = in_lists.iter().map(|s| Filter::for_relation(s, &relation).unwrap()).collect();
    let row = orders_row(Uuid::new_v4(), dealerships[3], 1, "pending", "2026-11-25 10:00:00.123456+00");
    group.bench_function("10k_subs/in_100_one_by_one", |b| {
        b.iter(|| black_box(&filters).iter().filter(|f| f.matches_row(black_box(&relation), black_box(&row))).count())
    });
    group.finish();
}

criterion_group!(benches, bench_filter, bench_fanout, bench_filters);

fn main() {
    allocations_report();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
