//! Database evaluation: for tables whose policies walcast cannot mirror in
//! memory, PostgreSQL itself evaluates the policies — for the row *as it
//! was at commit* (the WAL's old and new images, not a re-read of the live
//! row), as the viewer's role with the viewer's claims.
//!
//! Sits beside the in-memory plans: the hub submits [`Check`]s (one per
//! change × role, with the distinct claim sets of the candidate viewers) and
//! receives [`Verdict`]s on a channel; it never waits for the database. A
//! small pool of connections of its own evaluates them; a table always goes
//! to the same connection, which works FIFO, so verdicts for a table come
//! back in commit order.
//!
//! One round trip per (check, claim set): a simple-query string
//!
//! ```sql
//! SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = …; SET LOCAL search_path = '';
//! SET LOCAL ROLE "authenticated"; SELECT set_config('request.jwt.claims', '{…}', true);
//! SELECT n, (<USING of the policies, combined>) IS TRUE FROM (VALUES (0, '…'::uuid, …), (1, …)) AS "tbl"(n, "col", …)
//! ```
//!
//! — one implicit transaction (a multi-statement simple query), so the
//! settings end with it and an error leaves the connection idle — and the
//! claim sets of one check are pipelined on the connection. The
//! policies' own subqueries and helpers run under the viewer's role and
//! RLS, exactly as a SELECT would. Tables the policies read are read *as of
//! now*, not as of the commit — the one unavoidable difference.
//!
//! The walsender sends a commit a moment before it becomes visible to other
//! sessions (it is flushed to the WAL first), so before a transaction's
//! first check a worker waits until PostgreSQL shows the transaction as
//! visible (`pg_visible_in_snapshot`); otherwise the policies' subqueries
//! would read the tables as they were before it.
//!
//! Invariants: the number of claim sets in flight is bounded in total
//! ([`FallbackConfig::max_checks`]); a full queue refuses the check (the hub
//! denies and says so) rather than waiting; any error or timeout is a
//! denial, never a delivery.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::pgconn::PgConfig;
use crate::replication::slot::{quote_ident, quote_literal};

/// Settings of the evaluator.
#[derive(Debug, Clone)]
pub struct FallbackConfig {
    /// Connections (and workers) of the pool.
    pub connections: usize,
    /// Most claim sets queued or in flight, all tables together.
    pub max_checks: usize,
    /// `statement_timeout` of each evaluation (and the client's deadline,
    /// with a second of slack).
    pub timeout: Duration,
}

impl Default for FallbackConfig {
    /// 2 connections, 10,000 checks, 5 s.
    fn default() -> Self {
        FallbackConfig { connections: 2, max_checks: 10_000, timeout: Duration::from_secs(5) }
    }
}

/// How PostgreSQL evaluates one (table, role): the combined `USING`
/// expressions and the table's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseCheck {
    /// Table oid.
    pub table: u32,
    /// The table's name (the alias the expressions refer to it by).
    pub alias: String,
    /// `schema.name`, for logs.
    pub qualified: String,
    /// Policy names, for logs.
    pub policies: Vec<String>,
    /// `(permissive OR …) AND restrictive AND …`, each as `pg_get_expr` gave it.
    pub predicate: String,
    /// Columns: name and SQL type.
    pub columns: Vec<(String, String)>,
    /// The role to evaluate as.
    pub role: String,
}

/// One change × role to evaluate.
#[derive(Debug)]
pub struct Check {
    /// Chosen by the submitter; echoed in the verdict.
    pub id: u64,
    /// The transaction the change committed in (32-bit xid; 0 = do not
    /// wait for visibility).
    pub xid: u32,
    /// What to evaluate.
    pub plan: Arc<DatabaseCheck>,
    /// The distinct claim sets (JSON), one verdict each.
    pub claims: Vec<Arc<str>>,
    /// Row images (column texts in plan order, `None` = NULL); an image
    /// that is `None` cannot be evaluated (a column was absent) and is not
    /// visible.
    pub images: Vec<Option<Vec<Option<String>>>>,
}

/// The outcome of a [`Check`].
#[derive(Debug)]
pub struct Verdict {
    /// The check's id.
    pub id: u64,
    /// Per claim set: per image, visible; or the error (denied).
    pub results: Vec<Result<Vec<bool>, String>>,
}

/// Counters.
#[derive(Debug, Default)]
pub struct FallbackStats {
    /// Claim sets evaluated.
    pub evaluated: AtomicU64,
    /// Claim sets denied by an error or timeout.
    pub errors: AtomicU64,
    /// Checks refused because the queue was full.
    pub refused: AtomicU64,
    /// Claim sets queued or in flight (gauge).
    pub in_flight: AtomicUsize,
}

/// The submitting side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Fallback {
    workers: Vec<mpsc::UnboundedSender<Check>>,
    /// Counters.
    pub stats: Arc<FallbackStats>,
    max_checks: usize,
}

impl Fallback {
    /// Whether the bound is reached (a check now would be refused).
    pub fn is_full(&self) -> bool {
        self.workers.is_empty() || self.stats.in_flight.load(Ordering::Acquire) >= self.max_checks
    }

    /// Counts a check refused without [`Fallback::submit`] (the queue was
    /// full).
    pub fn refused(&self) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues a check, or hands it back when the total bound is reached.
    ///
    /// # Errors
    /// The check, when refused.
    #[allow(clippy::result_large_err)] // handed back whole, like a full channel does
    pub fn submit(&self, check: Check) -> Result<(), Check> {
        let n = check.claims.len();
        let used = self.stats.in_flight.fetch_add(n, Ordering::AcqRel);
        if used + n > self.max_checks || self.workers.is_empty() {
            self.stats.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(check);
        }
        let worker = &self.workers[check.plan.table as usize % self.workers.len()];
        // The bound is the counter: the channel itself is unbounded.
        worker.send(check).map_err(|e| {
            self.stats.in_flight.fetch_sub(n, Ordering::AcqRel);
            e.0
        })
    }
}

/// Starts the pool; verdicts go to `verdicts`. Connections are opened by
/// each worker (and re-opened after an error) on first use.
pub fn spawn(
    connection: PgConfig,
    config: FallbackConfig,
    stats: Arc<FallbackStats>,
    verdicts: mpsc::Sender<Verdict>,
) -> Fallback {
    let mut workers = Vec::new();
    for i in 0..config.connections.max(1) {
        let (tx, rx) = mpsc::unbounded_channel();
        workers.push(tx);
        tokio::spawn(
            worker(connection.clone(), config.timeout, rx, verdicts.clone(), Arc::clone(&stats))
                .instrument(tracing::info_span!("database_eval", worker = i)),
        );
    }
    Fallback { workers, stats, max_checks: config.max_checks }
}

async fn worker(
    connection: PgConfig,
    timeout: Duration,
    mut input: mpsc::UnboundedReceiver<Check>,
    verdicts: mpsc::Sender<Verdict>,
    stats: Arc<FallbackStats>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    // The last transaction seen visible (checks of one transaction come
    // together).
    let mut visible_xid: Option<u32> = None;
    while let Some(check) = input.recv().await {
        let n = check.claims.len();
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match tokio::time::timeout(timeout, crate::pgconn::connect(&connection)).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(err)) => {
                    tracing::warn!(error = %crate::pgconn::describe(&err), "database evaluation cannot connect");
                    None
                }
                Err(_) => None,
            };
        }
        let results = match &client {
            Some(c) => {
                let ready = if check.xid == 0 || visible_xid == Some(check.xid) {
                    Ok(())
                } else {
                    wait_visible(c, check.xid, timeout).await
                };
                match ready {
                    Ok(()) => {
                        visible_xid = Some(check.xid);
                        evaluate(c, &check, timeout).await
                    }
                    Err(e) => vec![Err(e); n],
                }
            }
            None => vec![Err("no connection to the database".to_owned()); n],
        };
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            stats.errors.fetch_add(failed as u64, Ordering::Relaxed);
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                // The policy's name and the error, never row values or claims.
                tracing::warn!(
                    table = %check.plan.qualified,
                    policies = %check.plan.policies.join(", "),
                    error = %e,
                    "database evaluation failed; denied"
                );
            }
            if results.iter().any(|r| r.as_ref().is_err_and(|e| e.contains("timeout") || e.contains("closed"))) {
                // A hung or broken connection is replaced.
                client = None;
            }
        }
        stats.evaluated.fetch_add(n as u64, Ordering::Relaxed);
        stats.in_flight.fetch_sub(n, Ordering::AcqRel);
        if verdicts.send(Verdict { id: check.id, results }).await.is_err() {
            return;
        }
    }
}

/// Whether the transaction with 32-bit id `$1` is visible to a new
/// snapshot. The full id takes the epoch of the snapshot's `xmax` (or the
/// one before, for an id above `xmax`'s low half: it wrapped).
const VISIBLE_SQL: &str = "
SELECT pg_catalog.pg_visible_in_snapshot(
    (CASE WHEN $1::bigint <= (x & 4294967295) THEN ((x >> 32) << 32) | $1::bigint
          ELSE (((x >> 32) - 1) << 32) | $1::bigint END)::text::xid8,
    s)
FROM (SELECT pg_catalog.pg_current_snapshot() AS s,
             pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::bigint AS x) AS snap";

/// Waits (polling, up to `timeout`) until transaction `xid` is visible.
async fn wait_visible(client: &tokio_postgres::Client, xid: u32, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_micros(200);
    loop {
        let row = tokio::time::timeout(timeout, client.query_one(VISIBLE_SQL, &[&i64::from(xid)]))
            .await
            .map_err(|_| "client timeout".to_owned())?
            .map_err(|e| e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()))?;
        if row.try_get::<_, bool>(0).unwrap_or(false) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("transaction {xid} did not become visible within {timeout:?}"));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The SQL for one claim set (see the module doc).
pub fn sql(plan: &DatabaseCheck, claims: &str, images: &[Option<Vec<Option<String>>>], timeout: Duration) -> String {
    let mut rows = Vec::new();
    for (n, image) in images.iter().enumerate() {
        let Some(values) = image else { continue };
        let mut row = vec![n.to_string()];
        for ((_, ty), v) in plan.columns.iter().zip(values) {
            row.push(match v {
                Some(text) => format!("{}::{ty}", quote_literal(text)),
                None => format!("NULL::{ty}"),
            });
        }
        rows.push(format!("({})", row.join(", ")));
    }
    let names: Vec<String> = plan.columns.iter().map(|(c, _)| quote_ident(c)).collect();
    format!(
        "SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = {ms}; SET LOCAL search_path = ''; \
         SET LOCAL ROLE {role}; SELECT pg_catalog.set_config('request.jwt.claims', {claims}, true); \
         SELECT __walcast_n, ({predicate}) IS TRUE FROM (VALUES {rows}) AS {alias}(__walcast_n, {names})",
        ms = timeout.as_millis(),
        role = quote_ident(&plan.role),
        claims = quote_literal(claims),
        predicate = plan.predicate,
        rows = rows.join(", "),
        alias = quote_ident(&plan.alias),
        names = names.join(", "),
    )
}

async fn evaluate(client: &tokio_postgres::Client, check: &Check, timeout: Duration) -> Vec<Result<Vec<bool>, String>> {
    let images = check.images.len();
    if check.images.iter().all(Option::is_none) {
        return vec![Ok(vec![false; images]); check.claims.len()];
    }
    // Pipelined on the one connection: each string is one round trip.
    let queries = check.claims.iter().map(|claims| {
        let text = sql(&check.plan, claims, &check.images, timeout);
        async move {
            let run = client.simple_query(&text);
            let messages = match tokio::time::timeout(timeout + Duration::from_secs(1), run).await {
                Err(_) => {
                    return Err("client timeout".to_owned());
                }
                Ok(Err(e)) => {
                    return Err(e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()));
                }
                Ok(Ok(m)) => m,
            };
            let mut visible = vec![false; images];
            for m in messages {
                // Only the verdict rows have two columns (set_config's has one).
                if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                    if row.len() != 2 {
                        continue;
                    }
                    let n = row.try_get(0).ok().flatten().and_then(|n| n.parse::<usize>().ok());
                    if let (Some(n), Ok(Some("t"))) = (n, row.try_get(1)) {
                        if n < images {
                            visible[n] = true;
                        }
                    }
                }
            }
            Ok(visible)
        }
    });
    futures::future::join_all(queries).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_quotes_every_value_and_name() {
        let plan = DatabaseCheck {
            table: 1,
            alias: "we\"ird".into(),
            qualified: "public.we\"ird".into(),
            policies: vec!["p".into()],
            predicate: "(created_at > now())".into(),
            columns: vec![("id".into(), "bigint".into()), ("note".into(), "text".into())],
            role: "authenticated".into(),
        };
        let images = vec![Some(vec![Some("1".into()), Some("it's".into())]), None, Some(vec![Some("2".into()), None])];
        let sql = sql(&plan, r#"{"sub":"o'neil"}"#, &images, Duration::from_secs(5));
        assert!(sql.contains("SET LOCAL ROLE \"authenticated\""), "{sql}");
        assert!(sql.contains(r#"set_config('request.jwt.claims', '{"sub":"o''neil"}', true)"#), "{sql}");
        assert!(sql.contains("(0, '1'::bigint, 'it''s'::text), (2, '2'::bigint, NULL::text)"), "{sql}");
        assert!(sql.contains("AS \"we\"\"ird\"(__walcast_n, \"id\", \"note\")"), "{sql}");
        assert!(sql.contains("statement_timeout = 5000"), "{sql}");
    }
}
