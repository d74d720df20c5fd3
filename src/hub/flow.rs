//! The hub's transaction flow: collect a transaction until its Commit (in a
//! [`ChangeLog`], spilled past the memory budget), apply its membership
//! changes, fan it out change by change under the global outbox budget
//! (pausing when it is full), then acknowledge it; and the reader checks
//! (lag, furthest behind in a long pause). See the parent module for the
//! rules; this file is their implementation.
//!
//! Invariants: nothing of a transaction is queued before its Commit was
//! seen; it is acknowledged only after its last change was fanned out;
//! [`Core::stage`] is never called while [`Core::busy`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{frame, ConnId, Core, HubError, StageEvent};
use crate::change::{Change, TxEvent, TxInfo};
use crate::outbox::{self, CloseReason};
use crate::replication::status::unix_micros_now;
use crate::spill::{ChangeLog, Cursor};

/// Changes fanned out between two reads of the clock.
const CLOCK_EVERY: usize = 256;

/// The transaction being collected.
#[derive(Debug)]
pub(super) struct OpenTx {
    /// The transaction id (database evaluation waits until it is visible).
    pub(super) xid: u32,
    pub(super) commit_timestamp: String,
    /// Commit time, µs since the Unix epoch (latency and lag).
    commit_micros: i64,
    /// [`HubStats::deliveries`] when the transaction opened.
    deliveries_at_open: u64,
    pub(super) catch_up: bool,
    /// Caches not exact at this commit (reloaded at run time after it):
    /// predicates reading them are judged as in the catch-up window.
    inexact: Vec<crate::policy::predicate::CacheId>,
    changes: ChangeLog,
    /// Whether any change is a membership change (the pass that applies
    /// them first is skipped otherwise).
    memberships: bool,
    /// Row changes seen (for the per-transaction debug event).
    count: usize,
}

impl OpenTx {
    /// Whether `expr` reads a cache that is not exact at this commit.
    pub(super) fn reads_inexact(&self, expr: &crate::policy::predicate::Expr) -> bool {
        if self.inexact.is_empty() {
            return false;
        }
        let mut hit = false;
        expr.for_each_member(&mut |id| hit |= self.inexact.contains(&id));
        hit
    }
}

/// A committed transaction being fanned out.
#[derive(Debug)]
pub(super) struct Delivery {
    tx: OpenTx,
    info: TxInfo,
    cursor: Cursor,
}

impl Core {
    /// Whether the core is paused in the middle of a transaction (a
    /// fan-out waiting for outbox room, or a change waiting for spill disk
    /// room): call [`Core::resume`] rather than [`Core::stage`] until not.
    pub fn busy(&self) -> bool {
        self.delivering.is_some() || self.spill_blocked.is_some()
    }

    /// Handles one event from the change stage. Must not be called while
    /// [`Core::busy`].
    ///
    /// # Errors
    /// A definite policy error (the membership table no longer matches) or
    /// a definite spill error.
    pub fn stage(&mut self, event: StageEvent) -> Result<(), HubError> {
        debug_assert!(!self.busy(), "stage() while busy");
        match event {
            StageEvent::Policies(loaded) => {
                self.install(*loaded);
                Ok(())
            }
            StageEvent::PolicyUpdate { loaded, ahead } => {
                // The change stage sends updates between transactions; one
                // inside would judge the transaction's changes by the new
                // plans (and its inexact caches were fixed at Begin).
                debug_assert!(self.open.is_none(), "policy update inside a transaction");
                self.update(*loaded, ahead);
                Ok(())
            }
            StageEvent::Restore { loaded, ahead, handled } => {
                debug_assert!(self.open.is_none(), "restore inside a transaction");
                self.install(*loaded);
                self.policies_ahead = ahead;
                self.handled = self.handled.max(handled);
                Ok(())
            }
            StageEvent::CloseAll(reason) => {
                self.close_all(reason);
                Ok(())
            }
            StageEvent::Reset => {
                self.open = None;
                self.skipping = false;
                Ok(())
            }
            StageEvent::Tx(TxEvent::Begin(begin)) => {
                if begin.commit_lsn < self.handled {
                    self.skipping = true;
                    self.open = None;
                    return Ok(());
                }
                self.skipping = false;
                let catch_up = begin.commit_lsn < self.judge_from || self.policies_ahead;
                self.stats.in_catch_up.store(catch_up, Ordering::Relaxed);
                let commit_micros = begin.commit_timestamp.unix_micros();
                self.ack.status().transaction_opened(commit_micros);
                self.open = Some(OpenTx {
                    xid: begin.xid,
                    commit_timestamp: frame::commit_timestamp(begin.commit_timestamp),
                    commit_micros,
                    deliveries_at_open: self.stats.deliveries.load(Ordering::Relaxed),
                    catch_up,
                    inexact: self.caches.inexact_at(begin.commit_lsn),
                    changes: self.spill.log(self.config.max_tx_bytes),
                    memberships: false,
                    count: 0,
                });
                Ok(())
            }
            StageEvent::Tx(TxEvent::Change(change)) => {
                if self.skipping {
                    return Ok(());
                }
                self.collect(change)
            }
            // walcast's own markers: nothing in the hub reacts to them yet.
            StageEvent::Tx(TxEvent::Message { .. }) => Ok(()),
            StageEvent::Tx(TxEvent::Commit(info)) => {
                if self.skipping {
                    self.skipping = false;
                    self.stats.duplicate_transactions.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        xid = info.xid,
                        commit_lsn = %info.commit_lsn,
                        end_lsn = %info.end_lsn,
                        "transaction already handled; skipped"
                    );
                    return Ok(());
                }
                let Some(mut tx) = self.open.take() else { return Ok(()) };
                tx.changes.seal()?;
                if tx.changes.spilled() {
                    self.stats.spilled_transactions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        xid = info.xid,
                        changes = tx.changes.len(),
                        disk_bytes = tx.changes.disk_size(),
                        "large transaction spilled to disk; judging it whole at commit"
                    );
                }
                // Membership changes first, all of them: every change is
                // judged with the memberships as of the commit.
                if tx.memberships {
                    let mut cursor = Cursor::default();
                    while let Some((_, change)) = tx.changes.read(&mut cursor)? {
                        if self.caches.follows(change.relation.oid) {
                            self.apply_to_caches(&change);
                        }
                    }
                    self.cache_gauges();
                }
                self.tx_seq += 1;
                self.tx_checks = 0;
                self.delivering = Some(Delivery { tx, info, cursor: Cursor::default() });
                self.pump()
            }
        }
    }

    /// Adds a change to the open transaction.
    fn collect(&mut self, change: Change) -> Result<(), HubError> {
        let Some(tx) = self.open.as_mut() else { return Ok(()) };
        if self.caches.follows(change.relation.oid) {
            tx.memberships = true;
        }
        match tx.changes.push(0, change) {
            Ok(()) => {
                tx.count += 1;
                Ok(())
            }
            Err((err, Some(change))) if err.is_transient() => {
                // The spill disk budget is full: pause (the slot keeps the
                // WAL) and push the same change again later.
                self.stats.spill_waits.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "hub paused");
                self.spill_blocked = Some(change);
                Ok(())
            }
            Err((err, _)) => Err(err.into()),
        }
    }

    /// Goes on after [`Core::busy`]: pushes a change the spill refused
    /// again, or fans out more of the committed transaction.
    ///
    /// # Errors
    /// As [`Core::stage`].
    pub fn resume(&mut self) -> Result<(), HubError> {
        if let Some(change) = self.spill_blocked.take() {
            return self.collect(change);
        }
        self.pump()
    }

    /// Fans out the committed transaction change by change until it is done
    /// (then acknowledges it) or the outbox budget is used up (a pause).
    fn pump(&mut self) -> Result<(), HubError> {
        let Some(mut d) = self.delivering.take() else { return Ok(()) };
        let mut now = outbox::now_ms();
        let mut since_clock = 0;
        let result = loop {
            // Pause when the budget is full; once paused, resume only when it
            // is back under its resume mark (3/4), so the hub works in
            // batches rather than waking for every frame written.
            let hold =
                if self.paused_since.is_some() { self.budget.over_resume_mark() } else { self.budget.exhausted() };
            if hold {
                if self.paused_since.is_none() {
                    self.paused_since = Some(Instant::now());
                    self.stats.pauses.fetch_add(1, Ordering::Relaxed);
                    self.stats.paused.store(true, Ordering::Relaxed);
                    tracing::debug!(used = self.budget.used(), "outbox budget full; fan-out paused");
                }
                self.delivering = Some(d);
                return Ok(());
            }
            // Progress: a pause (if any) ended here.
            self.end_pause();
            let change = match d.tx.changes.read(&mut d.cursor) {
                Ok(Some((_, change))) => change,
                Ok(None) => break Ok(()),
                Err(err) => break Err(err.into()),
            };
            since_clock += 1;
            if since_clock == CLOCK_EVERY {
                since_clock = 0;
                now = outbox::now_ms();
                // A large transaction's frames go out as it is fanned out.
                self.flush();
            }
            self.fan_out(&d.tx, &change, now);
            self.reap();
        };
        self.end_pause();
        self.finish(d.tx, d.info);
        result
    }

    fn end_pause(&mut self) {
        if let Some(since) = self.paused_since.take() {
            self.stats.paused_micros.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.stats.paused.store(false, Ordering::Relaxed);
        }
    }

    /// A transaction was fanned out whole: latency, progress, acknowledgement.
    fn finish(&mut self, tx: OpenTx, info: TxInfo) {
        if self.stats.deliveries.load(Ordering::Relaxed) > tx.deliveries_at_open {
            self.stats.delivery_latency.observe_micros(unix_micros_now().saturating_sub(tx.commit_micros));
        }
        if tx.catch_up {
            self.stats.catch_up_transactions.fetch_add(1, Ordering::Relaxed);
        }
        self.handled = info.end_lsn;
        self.stats.handled_lsn.store(info.end_lsn.0, Ordering::Relaxed);
        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
        // Before the acknowledgement: a transaction the slot has been
        // told about has always been logged (at `debug`).
        tracing::debug!(
            xid = info.xid,
            commit_lsn = %info.commit_lsn,
            end_lsn = %info.end_lsn,
            changes = tx.count,
            catch_up = tx.catch_up,
            "transaction handled"
        );
        // Held while checks of this or an earlier transaction are out.
        if let Some(lsn) = self.held.finished(self.tx_seq, info.end_lsn, self.tx_checks) {
            self.ack.ack(lsn);
        }
        self.ack.status().transaction_handled(tx.commit_micros);
    }

    /// Closes readers whose oldest unwritten frame is older than
    /// [`HubConfig::max_reader_lag`](super::HubConfig::max_reader_lag), and — when the fan-out has been paused
    /// for [`HubConfig::max_pause`](super::HubConfig::max_pause) — the furthest-behind reader.
    pub fn check_readers(&mut self) {
        let now = outbox::now_ms();
        let limit = self.config.max_reader_lag;
        let mut worst: Option<(ConnId, Duration, usize)> = None;
        for (conn, sub) in self.registry.connections() {
            let lag = sub.outbox.lag(now);
            if lag > limit {
                if sub.outbox.close_now(CloseReason::reader_lag(lag, limit)) {
                    self.stats.lagging_readers_closed.fetch_add(1, Ordering::Relaxed);
                    self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(conn, lag_ms = lag.as_millis() as u64, "closing a reader that fell behind");
                }
                self.doomed.push(conn);
                continue;
            }
            let held = sub.outbox.held();
            if held > 0 && worst.is_none_or(|(_, l, h)| (lag, held) > (l, h)) {
                worst = Some((conn, lag, held));
            }
        }
        if let (Some(since), Some((conn, lag, held))) = (self.paused_since, worst) {
            let paused = since.elapsed();
            if paused >= self.config.max_pause && self.budget.exhausted() {
                let reason = CloseReason::furthest_behind(paused, self.budget.limit());
                if let Some(sub) = self.registry.of_conn(conn) {
                    sub.outbox.close_now(reason);
                }
                self.stats.furthest_behind_closed.fetch_add(1, Ordering::Relaxed);
                self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    conn,
                    lag_ms = lag.as_millis() as u64,
                    held,
                    "outbox budget full too long; closing the furthest-behind reader"
                );
                self.doomed.push(conn);
                // The next pause is measured from here (the time so far is
                // counted).
                self.stats.paused_micros.fetch_add(paused.as_micros() as u64, Ordering::Relaxed);
                self.paused_since = Some(Instant::now());
            }
        }
        self.reap();
    }
}
