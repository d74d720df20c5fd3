//! The open-loop writer: order changes at a fixed arrival rate from a pool of
//! PostgreSQL connections, membership changes as barriers, and the ledger of
//! everything committed.
//!
//! ```text
//!  scheduler (one task: owns the rows, the memberships and the ledger)
//!     │ op at t0 + k/rate (catching up when late: open loop)
//!     ▼
//!  shared queue ──▶ writer 1..W (one connection each; one transaction takes
//!     ▲                 │        what is queued, up to --batch writes)
//!     │                 │ done (rows affected)
//!     └─────────────────┘
//!  churn tick ──▶ barrier: stop dispatching, wait for in-flight writes,
//!                 grant/revoke on the admin connection, resume
//! ```
//!
//! Invariants (what the oracle relies on):
//! - a row is written again only after its previous write's completion was
//!   recorded, so per-row order is the ledger's order (`seq` 0, 1, 2, …);
//! - a membership change starts only when no order write is in flight and
//!   order writes resume only after it committed, so every order write
//!   commits between the same two membership changes it was issued between;
//! - every write must affect exactly one row; anything else (or an error)
//!   stops the run — the ledger would no longer be exact;
//! - the writes of one transaction touch distinct rows (a row is never in
//!   flight twice), and its inserts run in dealership order, so two batches'
//!   order-number counter locks cannot deadlock;
//! - the live order count stays near `live_orders` (inserts get likelier
//!   below it, deletes above it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_postgres::Client;

use super::client::Shared;
use super::ids::{Ids, Rng, Tag};
use super::oracle::{Entry, Members, RowState, STATUSES};
use super::seed::{connect, World};
use super::LoadError;

/// What to write.
#[derive(Debug, Clone)]
pub struct WritePlan {
    /// Order changes per second.
    pub rate: f64,
    /// For how long.
    pub duration: Duration,
    /// Connections in the pool.
    pub writers: usize,
    /// Most writes per transaction (whatever is queued, up to this).
    pub batch: usize,
    /// Membership changes per second (0: none).
    pub churn: f64,
    /// Target number of live orders.
    pub live_orders: u32,
    /// Seed of the choices.
    pub seed: u64,
}

/// What the writer did.
#[derive(Debug)]
pub struct WriteOutcome {
    /// Everything committed, in commit order between membership changes.
    pub ledger: Vec<Entry>,
    /// Order writes: inserts, status updates, moves, deletes.
    pub counts: [u64; 4],
    /// Membership grants and revokes.
    pub churn: [u64; 2],
    /// Order-write transactions committed (fewer than the writes with
    /// `--batch` above 1).
    pub transactions: u64,
    /// Ticks skipped because no row was free to write.
    pub skipped: u64,
    /// How late writes were issued relative to their schedule (µs).
    pub schedule_lag: Histogram<u64>,
    /// Time from the first to the last write's completion.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Insert,
    Status,
    Move,
    Delete,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: Kind,
    order: u32,
    seq: u32,
    old: Option<RowState>,
    new: Option<RowState>,
    scheduled_us: u64,
}

struct Done {
    op: Op,
    t_us: u64,
    result: Result<u64, String>,
}

/// Row states: `None` = deleted (or never existed).
struct Rows {
    state: Vec<Option<(RowState, u32)>>,
    /// Live rows not being written.
    idle: Vec<u32>,
    live: u32,
}

/// Runs the plan; `progress` counts completed writes.
///
/// # Errors
/// A failed write or membership change, or a write that affected ≠ 1 row.
pub async fn run(
    url: &str,
    world: &World,
    ids: Ids,
    plan: &WritePlan,
    shared: &Shared,
    progress: &AtomicU64,
) -> Result<WriteOutcome, LoadError> {
    let (op_tx, op_rx) = mpsc::unbounded_channel::<Op>();
    let op_rx = Arc::new(Mutex::new(op_rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let creator = ids.uuid(Tag::User, world.writer_user());
    let transactions = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..plan.writers.max(1) {
        let client = connect(url).await?;
        let statements = Statements::prepare(&client).await?;
        let op_rx = Arc::clone(&op_rx);
        let done_tx = done_tx.clone();
        let epoch = shared.epoch;
        let batch = plan.batch.max(1);
        let transactions = Arc::clone(&transactions);
        writers.push(tokio::spawn(async move {
            let mut ops = Vec::with_capacity(batch);
            loop {
                {
                    let mut rx = op_rx.lock().await;
                    let Some(op) = rx.recv().await else { break };
                    ops.push(op);
                    while ops.len() < batch {
                        match rx.try_recv() {
                            Ok(op) => ops.push(op),
                            Err(_) => break,
                        }
                    }
                }
                let t_us = epoch.elapsed().as_micros() as u64;
                let results = if let [op] = ops[..] {
                    vec![statements.execute(&client, &ids, creator, op, t_us).await]
                } else {
                    statements.execute_batch(&client, &ids, creator, &mut ops, t_us).await
                };
                transactions.fetch_add(1, Ordering::Relaxed);
                for (op, result) in ops.drain(..).zip(results) {
                    if done_tx.send(Done { op, t_us, result }).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    drop(done_tx);
    let admin = connect(url).await?;
    let mut rng = Rng::new(plan.seed ^ 0x5eed_0f0d_de55);
    let mut members = world.members.clone();
    let mut user_memberships: Vec<Vec<(u32, u32)>> = vec![Vec::new(); world.users as usize];
    for &(m, u, d) in &world.memberships {
        user_memberships[u as usize].push((m, d));
    }
    let mut next_membership = world.memberships.len() as u32;
    let mut rows = Rows {
        state: world.orders.iter().map(|&s| Some((s, 0))).collect(),
        idle: (0..world.orders.len() as u32).collect(),
        live: world.orders.len() as u32,
    };
    let mut outcome = WriteOutcome {
        ledger: Vec::new(),
        counts: [0; 4],
        churn: [0; 2],
        transactions: 0,
        skipped: 0,
        schedule_lag: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds"),
        elapsed: Duration::ZERO,
    };

    let start = Instant::now();
    shared.writes_start_us.store(shared.now_us(), Ordering::Relaxed);
    let end = start + plan.duration;
    let interval = Duration::from_secs_f64(1.0 / plan.rate.max(0.001));
    let churn_interval = (plan.churn > 0.0).then(|| Duration::from_secs_f64(1.0 / plan.churn));
    let mut next_tick = start;
    let mut next_churn = churn_interval.map(|i| start + i);
    let mut in_flight = 0usize;
    let mut barrier = false;
    let result: Result<(), LoadError> = loop {
        let now = Instant::now();
        if !barrier && next_churn.is_some_and(|t| t <= now && t < end) {
            barrier = true;
        }
        if barrier && in_flight == 0 {
            if let Err(err) = churn(
                &admin,
                &ids,
                &mut rng,
                &mut members,
                &mut user_memberships,
                &mut next_membership,
                world.dealerships,
                &mut outcome,
            )
            .await
            {
                break Err(err);
            }
            barrier = false;
            if let (Some(t), Some(i)) = (next_churn.as_mut(), churn_interval) {
                *t += i;
            }
            continue;
        }
        if !barrier {
            // Every tick that is due (open loop: late ticks are caught up).
            let mut burst = 0;
            while next_tick <= now && next_tick < end && burst < 10_000 {
                let scheduled_us = next_tick.saturating_duration_since(start).as_micros() as u64;
                match pick(&mut rows, &mut rng, world, plan.live_orders, scheduled_us) {
                    Some(op) => {
                        if op_tx.send(op).is_err() {
                            break;
                        }
                        in_flight += 1;
                    }
                    None => outcome.skipped += 1,
                }
                next_tick += interval;
                burst += 1;
            }
        }
        if now >= end && in_flight == 0 {
            break Ok(());
        }
        let wake = if barrier || now >= end {
            None
        } else {
            Some(next_churn.map_or(next_tick, |c| c.min(next_tick)).min(end))
        };
        tokio::select! {
            biased;
            done = done_rx.recv() => {
                let Some(done) = done else { break Err(LoadError::Relay("every writer stopped".into())) };
                in_flight -= 1;
                if let Err(err) = complete(&mut rows, &mut outcome, done, shared) {
                    break Err(err);
                }
                progress.fetch_add(1, Ordering::Relaxed);
            }
            () = sleep_until(wake.unwrap_or(end)), if wake.is_some() => {}
            () = tokio::time::sleep(Duration::from_millis(50)), if wake.is_none() => {}
        }
    };
    drop(op_tx);
    outcome.elapsed = start.elapsed();
    outcome.transactions = transactions.load(Ordering::Relaxed);
    for writer in writers {
        writer.abort();
    }
    result.map(|()| outcome)
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t).await;
}

/// Chooses the next order write; `None` when no row is free to write.
fn pick(rows: &mut Rows, rng: &mut Rng, world: &World, target: u32, scheduled_us: u64) -> Option<Op> {
    let bias = f64::from(rows.live.max(1)) / f64::from(target.max(1));
    let w_insert = 25.0 / bias.max(0.05);
    let w_delete = 25.0 * bias;
    let (w_status, w_move) = (35.0, 15.0);
    let roll = rng.unit() * (w_insert + w_delete + w_status + w_move);
    let insert = rows.idle.is_empty() || roll < w_insert || rows.live == 0;
    let dealership = |rng: &mut Rng| rng.below(world.dealerships);
    let status = |rng: &mut Rng| rng.below(STATUSES.len() as u32) as u8;
    if insert {
        if rows.live > target.saturating_mul(2).max(16) {
            return None;
        }
        let order = rows.state.len() as u32;
        let new = RowState { dealership: dealership(rng), status: status(rng) };
        rows.state.push(Some((new, 0)));
        rows.live += 1;
        return Some(Op { kind: Kind::Insert, order, seq: 0, old: None, new: Some(new), scheduled_us });
    }
    let slot = rng.below(rows.idle.len() as u32) as usize;
    let order = rows.idle.swap_remove(slot);
    let (old, seq) = rows.state[order as usize]?;
    let roll = roll - w_insert;
    let (kind, new) = if roll < w_delete {
        (Kind::Delete, None)
    } else if roll < w_delete + w_status {
        let mut s = status(rng);
        if s == old.status {
            s = (s + 1) % STATUSES.len() as u8;
        }
        (Kind::Status, Some(RowState { status: s, ..old }))
    } else {
        let mut d = dealership(rng);
        if d == old.dealership && world.dealerships > 1 {
            d = (d + 1) % world.dealerships;
        }
        // A move sometimes changes the status too (filter transitions on moves).
        let s = if rng.below(3) == 0 { status(rng) } else { old.status };
        (Kind::Move, Some(RowState { dealership: d, status: s }))
    };
    Some(Op { kind, order, seq: seq + 1, old: Some(old), new, scheduled_us })
}

/// Records a completed write in the ledger and frees its row.
fn complete(rows: &mut Rows, outcome: &mut WriteOutcome, done: Done, shared: &Shared) -> Result<(), LoadError> {
    let op = done.op;
    match done.result {
        Ok(1) => {}
        Ok(n) => {
            return Err(LoadError::Write(format!(
                "{:?} of order {} (seq {}) affected {n} rows, expected 1: the ledger would be wrong",
                op.kind, op.order, op.seq
            )))
        }
        Err(err) => return Err(LoadError::Write(format!("{:?} of order {} failed: {err}", op.kind, op.order))),
    }
    let start_us = shared.writes_start_us.load(Ordering::Relaxed);
    outcome.schedule_lag.saturating_record(done.t_us.saturating_sub(start_us).saturating_sub(op.scheduled_us).max(1));
    outcome.ledger.push(Entry::Order { order: op.order, seq: op.seq, old: op.old, new: op.new, t_us: done.t_us });
    outcome.counts[op.kind as usize] += 1;
    match op.new {
        Some(new) => {
            rows.state[op.order as usize] = Some((new, op.seq));
            rows.idle.push(op.order);
        }
        None => {
            rows.state[op.order as usize] = None;
            rows.live -= 1;
        }
    }
    Ok(())
}

/// One membership change (grant or revoke) on the admin connection.
#[allow(clippy::too_many_arguments)]
async fn churn(
    admin: &Client,
    ids: &Ids,
    rng: &mut Rng,
    members: &mut Members,
    user_memberships: &mut [Vec<(u32, u32)>],
    next_membership: &mut u32,
    dealerships: u32,
    outcome: &mut WriteOutcome,
) -> Result<(), LoadError> {
    if user_memberships.is_empty() {
        return Ok(());
    }
    let user = rng.below(user_memberships.len() as u32);
    let mine = &mut user_memberships[user as usize];
    let can_grant = (mine.len() as u32) < dealerships.min(4);
    let revoke = mine.len() >= 2 && (!can_grant || rng.below(2) == 0);
    if revoke {
        let (membership, dealership) = mine.swap_remove(rng.below(mine.len() as u32) as usize);
        let n = admin
            .execute("delete from public.dealer_memberships where id = $1", &[&ids.uuid(Tag::Membership, membership)])
            .await
            .map_err(|e| LoadError::Write(format!("revoking a membership: {e}")))?;
        if n != 1 {
            return Err(LoadError::Write(format!("revoking membership {membership} affected {n} rows")));
        }
        members.revoke(user, dealership);
        outcome.ledger.push(Entry::Revoke { membership, user, dealership });
        outcome.churn[1] += 1;
    } else if can_grant {
        let mut dealership = rng.below(dealerships);
        while mine.iter().any(|&(_, d)| d == dealership) {
            dealership = (dealership + 1) % dealerships;
        }
        let membership = *next_membership;
        *next_membership += 1;
        let n = admin
            .execute(
                "insert into public.dealer_memberships (id, user_id, dealership_id, role) values ($1, $2, $3, 'user')",
                &[
                    &ids.uuid(Tag::Membership, membership),
                    &ids.uuid(Tag::User, user),
                    &ids.uuid(Tag::Dealership, dealership),
                ],
            )
            .await
            .map_err(|e| LoadError::Write(format!("granting a membership: {e}")))?;
        if n != 1 {
            return Err(LoadError::Write(format!("granting membership {membership} affected {n} rows")));
        }
        mine.push((membership, dealership));
        members.grant(user, dealership);
        outcome.ledger.push(Entry::Grant { membership, user, dealership });
        outcome.churn[0] += 1;
    }
    Ok(())
}

/// The prepared statements of one writer connection.
struct Statements {
    insert: tokio_postgres::Statement,
    update: tokio_postgres::Statement,
    delete: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, LoadError> {
        let prepare =
            |sql: &'static str| async move { client.prepare(sql).await.map_err(LoadError::db("prepare a write")) };
        Ok(Statements {
            insert: prepare(
                "insert into public.orders (id, dealership_id, type, status, customer_info, created_by, metadata) \
                 values ($1, $2, 'sales', $3, '{\"name\": \"load\"}', $4, \
                 jsonb_build_object('load_t_us', $5::int8, 'load_seq', $6::int4))",
            )
            .await?,
            update: prepare(
                "update public.orders set dealership_id = $2, status = $3, \
                 metadata = jsonb_build_object('load_t_us', $4::int8, 'load_seq', $5::int4) where id = $1",
            )
            .await?,
            delete: prepare("delete from public.orders where id = $1").await?,
        })
    }

    /// The writes in one transaction, pipelined; one result per op (in the
    /// order `ops` ends up in: inserts first, by dealership). When anything
    /// fails the transaction rolls back and every op reports the failure.
    async fn execute_batch(
        &self,
        client: &Client,
        ids: &Ids,
        creator: uuid::Uuid,
        ops: &mut [Op],
        t_us: u64,
    ) -> Vec<Result<u64, String>> {
        // Inserts lock their dealership's counter row: one order for all.
        ops.sort_by_key(|op| match (op.kind, op.new) {
            (Kind::Insert, Some(new)) => (0, new.dealership),
            _ => (1, 0),
        });
        let fail = |err: String, n: usize| vec![Err(err); n];
        if let Err(err) = client.batch_execute("begin").await {
            return fail(err.to_string(), ops.len());
        }
        let results =
            futures::future::join_all(ops.iter().map(|&op| self.execute(client, ids, creator, op, t_us))).await;
        let first_error = results.iter().find_map(|r| r.as_ref().err()).cloned();
        let end = if first_error.is_some() { "rollback" } else { "commit" };
        match (client.batch_execute(end).await, first_error) {
            (Ok(()), None) => results,
            (_, Some(err)) => fail(format!("{err} (the batch rolled back)"), ops.len()),
            (Err(err), None) => fail(format!("commit failed: {err}"), ops.len()),
        }
    }

    async fn execute(&self, client: &Client, ids: &Ids, creator: uuid::Uuid, op: Op, t_us: u64) -> Result<u64, String> {
        let id = ids.uuid(Tag::Order, op.order);
        let t = t_us as i64;
        let seq = op.seq as i32;
        let result = match (op.kind, op.new) {
            (Kind::Insert, Some(new)) => {
                let d = ids.uuid(Tag::Dealership, new.dealership);
                let s = STATUSES[usize::from(new.status)];
                client.execute(&self.insert, &[&id, &d, &s, &creator, &t, &seq]).await
            }
            (Kind::Status | Kind::Move, Some(new)) => {
                let d = ids.uuid(Tag::Dealership, new.dealership);
                let s = STATUSES[usize::from(new.status)];
                client.execute(&self.update, &[&id, &d, &s, &t, &seq]).await
            }
            (Kind::Delete, _) => client.execute(&self.delete, &[&id]).await,
            _ => return Err("an insert or update without its new row".into()),
        };
        result.map_err(|e| e.to_string())
    }
}
