//! The demo writer: believable order activity, one small change per step.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::Instrument;
use uuid::Uuid;

use super::data::{self, DEALERSHIPS, ORDER_TYPES};
use super::DemoError;

/// The writer deletes rather than inserts once the demo dealerships hold this
/// many orders.
pub const MAX_ORDERS: i64 = 30;

/// Below this many orders the writer only inserts.
pub const MIN_ORDERS: i64 = 5;

/// Candidates a step picks among (the oldest by `updated_at`), so the same
/// order is not always the one that moves.
const CANDIDATES: i64 = 4;

/// What one [`Writer::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriterStep {
    /// A new `pending` order.
    Inserted {
        /// `orders.id`.
        id: Uuid,
        /// The number the trigger assigned.
        order_number: String,
        /// Its dealership's code.
        dealership_code: String,
    },
    /// An order moved on (`draft → pending → in_progress → completed`) or was
    /// cancelled.
    StatusChanged {
        /// `orders.id`.
        id: Uuid,
        /// Its number.
        order_number: String,
        /// The status before.
        from: String,
        /// The status after.
        to: String,
    },
    /// A completed or cancelled order (or, at [`MAX_ORDERS`] with none of
    /// those, the oldest order) was deleted.
    Deleted {
        /// `orders.id`.
        id: Uuid,
        /// Its number.
        order_number: String,
    },
    /// Nothing changed: another writer took every candidate first.
    Idle,
}

impl WriterStep {
    /// A short name for logs: `insert`, `status`, `delete`, `idle`.
    pub fn kind(&self) -> &'static str {
        match self {
            WriterStep::Inserted { .. } => "insert",
            WriterStep::StatusChanged { .. } => "status",
            WriterStep::Deleted { .. } => "delete",
            WriterStep::Idle => "idle",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Insert,
    Advance,
    Cancel,
    DeleteFinished,
    DeleteOldest,
}

/// A xorshift64* generator: deterministic for a seed, good enough to pick demo
/// activity (not for anything secret).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so small seeds differ well; never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Writes demo activity over a connection of its own.
///
/// Each [`step`](Writer::step) is one statement in autocommit, so each is one
/// transaction on the replication stream.
#[derive(Debug)]
pub struct Writer {
    client: Client,
    rng: Rng,
    dealership_ids: Vec<Uuid>,
}

impl Writer {
    /// Connects to a database loaded with the demo data; `seed` fixes the
    /// sequence of choices (the same seed on the same data makes the same
    /// steps).
    ///
    /// # Errors
    /// When the connection fails, or the demo dealerships are missing
    /// ([`DemoError::NotSeeded`]).
    pub async fn connect(url: &str, seed: u64) -> Result<Writer, DemoError> {
        let client = super::connect(url).await?;
        let dealership_ids = data::dealership_ids();
        let found: i64 = client
            .query_one("select count(*) from public.dealerships where id = any($1)", &[&dealership_ids])
            .await
            .map_err(DemoError::db("look up the demo dealerships"))?
            .get(0);
        if found != dealership_ids.len() as i64 {
            return Err(DemoError::NotSeeded);
        }
        Ok(Writer { client, rng: Rng::new(seed), dealership_ids })
    }

    /// Whether the connection is gone (the writer must be reconnected).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The number of orders in the demo dealerships.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn order_count(&self) -> Result<i64, DemoError> {
        Ok(self
            .client
            .query_one("select count(*) from public.orders where dealership_id = any($1)", &[&self.dealership_ids])
            .await
            .map_err(DemoError::db("count the demo orders"))?
            .get(0))
    }

    /// One change: below [`MIN_ORDERS`] an insert, at [`MAX_ORDERS`] a delete,
    /// otherwise a weighted pick of insert, status advance, cancellation and
    /// delete (deletes grow likelier as the count grows). A pick without a
    /// candidate falls back to the next action that has one.
    ///
    /// # Errors
    /// When a statement fails; the writer stays usable.
    pub async fn step(&mut self) -> Result<WriterStep, DemoError> {
        use Action::*;
        let count = self.order_count().await?;
        let plan: &[Action] = if count >= MAX_ORDERS {
            &[DeleteFinished, DeleteOldest]
        } else if count < MIN_ORDERS {
            &[Insert]
        } else {
            // Weights: insert 3, advance 4, cancel 1, delete 1..=4.
            let delete = 1 + (3 * count / MAX_ORDERS) as usize;
            let roll = self.rng.below(8 + delete);
            match roll {
                0..=2 => &[Insert],
                3..=6 => &[Advance, Insert],
                7 => &[Cancel, Advance, Insert],
                _ => &[DeleteFinished, Advance, Insert],
            }
        };
        for action in plan {
            if let Some(step) = self.act(*action).await? {
                return Ok(step);
            }
        }
        Ok(WriterStep::Idle)
    }

    async fn act(&mut self, action: Action) -> Result<Option<WriterStep>, DemoError> {
        match action {
            Action::Insert => self.insert().await.map(Some),
            Action::Advance => {
                self.change_status(
                    &["draft", "pending", "in_progress"],
                    "case status when 'draft' then 'pending' when 'pending' then 'in_progress' else 'completed' end",
                )
                .await
            }
            Action::Cancel => self.change_status(&["draft", "pending", "in_progress"], "'cancelled'").await,
            Action::DeleteFinished => self.delete(&["completed", "cancelled"]).await,
            Action::DeleteOldest => self.delete(&["draft", "pending", "in_progress", "completed", "cancelled"]).await,
        }
    }

    async fn insert(&mut self) -> Result<WriterStep, DemoError> {
        let dealership = &DEALERSHIPS[self.rng.below(DEALERSHIPS.len())];
        let kind = ORDER_TYPES[self.rng.below(ORDER_TYPES.len())];
        let customer = data::customer_info(self.rng.below(data::CUSTOMERS.len()));
        let vehicle = data::vehicle_info(self.rng.below(data::VEHICLES.len()));
        let row = self
            .client
            .query_one(
                "insert into public.orders (dealership_id, type, status, customer_info, vehicle_info, created_by) \
                 values ($1, $2, 'pending', $3, $4, $5) returning id, order_number",
                &[&dealership.id, &kind, &customer, &vehicle, &dealership.creator],
            )
            .await
            .map_err(DemoError::db("insert a demo order"))?;
        Ok(WriterStep::Inserted {
            id: row.get(0),
            order_number: row.get(1),
            dealership_code: dealership.code.to_owned(),
        })
    }

    /// Moves one of the oldest orders in `from` to `to_sql` (an expression
    /// over `status`); `None` when there is none.
    async fn change_status(&mut self, from: &[&str], to_sql: &str) -> Result<Option<WriterStep>, DemoError> {
        let Some((id, status)) = self.pick(from).await? else {
            return Ok(None);
        };
        // Guarded by the status just read: a concurrent change makes this a no-op.
        let sql = format!(
            "update public.orders set status = {to_sql} where id = $1 and status = $2 returning order_number, status"
        );
        let row = self
            .client
            .query_opt(&sql, &[&id, &status])
            .await
            .map_err(DemoError::db("change a demo order's status"))?;
        Ok(row.map(|row| WriterStep::StatusChanged { id, order_number: row.get(0), from: status, to: row.get(1) }))
    }

    /// Deletes the oldest order in one of `statuses`; `None` when there is none.
    async fn delete(&mut self, statuses: &[&str]) -> Result<Option<WriterStep>, DemoError> {
        let row = self
            .client
            .query_opt(
                "delete from public.orders where id = (\
                     select id from public.orders where dealership_id = any($1) and status = any($2) \
                     order by updated_at, id limit 1) \
                 returning id, order_number",
                &[&self.dealership_ids, &statuses],
            )
            .await
            .map_err(DemoError::db("delete a demo order"))?;
        Ok(row.map(|row| WriterStep::Deleted { id: row.get(0), order_number: row.get(1) }))
    }

    /// One of the [`CANDIDATES`] least recently updated orders in `statuses`.
    async fn pick(&mut self, statuses: &[&str]) -> Result<Option<(Uuid, String)>, DemoError> {
        let rows = self
            .client
            .query(
                "select id, status from public.orders where dealership_id = any($1) and status = any($2) \
                 order by updated_at, id limit $3",
                &[&self.dealership_ids, &statuses, &CANDIDATES],
            )
            .await
            .map_err(DemoError::db("pick a demo order"))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = &rows[self.rng.below(rows.len())];
        Ok(Some((row.get(0), row.get(1))))
    }
}

/// Runs a [`Writer`] every `interval` until `shutdown` is cancelled. Failed steps and lost connections are logged (kind and
/// SQLSTATE, never row values) and retried on the next tick, reconnecting when
/// needed.
pub async fn run_writer(url: String, interval: Duration, shutdown: tokio_util::sync::CancellationToken) {
    let span = tracing::info_span!("demo_writer", interval_ms = interval.as_millis() as u64);
    async move {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id());
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut writer: Option<Writer> = None;
        tracing::info!("demo writer started");
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown first.
                () = shutdown.cancelled() => break,
                // 2. The next step.
                _ = ticks.tick() => {}
            }
            if writer.as_ref().is_none_or(Writer::is_closed) {
                match Writer::connect(&url, seed).await {
                    Ok(w) => writer = Some(w),
                    Err(err) => {
                        tracing::warn!(error = %err, code = err.sqlstate(), "demo writer cannot connect; retrying");
                        continue;
                    }
                }
            }
            let Some(w) = writer.as_mut() else { continue };
            match w.step().await {
                Ok(step) => tracing::debug!(kind = step.kind(), "demo writer step"),
                Err(err) => tracing::warn!(error = %err, code = err.sqlstate(), "demo writer step failed"),
            }
        }
        tracing::info!("demo writer stopped");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_spreads() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            let x = a.below(4);
            assert_eq!(x, b.below(4));
            seen[x] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        assert_ne!(Rng::new(1).next(), Rng::new(2).next());
        assert_ne!(Rng::new(0).0, 0);
    }
}
