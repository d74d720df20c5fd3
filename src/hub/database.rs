//! The hub's side of database evaluation ([`crate::policy::fallback`]):
//! submitting checks for tables whose policies PostgreSQL must judge,
//! delivering the verdicts, and holding the slot's acknowledgement until
//! every check of a transaction is answered (so a crash never skips a
//! change a viewer was owed).
//!
//! Invariants: a verdict is delivered only to the subscription it was asked
//! for — same slot, same connection, same claims (a re-authenticated or
//! replaced subscription gets nothing from an old verdict); an error, a
//! timeout or a full queue denies, and a full queue says so once per
//! subscription (`on_withheld`). Verdicts of a table arrive in commit order
//! (one worker per table), after the in-memory tables' deliveries of the
//! same transaction.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::registry::Slot;
use super::{outbox, ColumnMap, ConnId, Core, MaskRef};
use crate::change::{Change, Datum, Row};
use crate::lsn::Lsn;
use crate::policy::fallback::{Check, DatabaseCheck, Verdict};
use crate::policy::EventType;

/// A subscription a check was asked for.
#[derive(Debug)]
pub(super) struct Asked {
    slot: Slot,
    conn: ConnId,
    claims: Arc<serde_json::Value>,
}

/// A submitted check, waiting for its verdict.
#[derive(Debug)]
pub(super) struct Job {
    /// The transaction (delivery sequence) it belongs to.
    seq: u64,
    change: Change,
    event: EventType,
    commit_timestamp: Arc<str>,
    role: Arc<str>,
    /// Per claim set, the subscriptions that share it.
    groups: Vec<Vec<Asked>>,
}

/// Acknowledgements held back for transactions with checks in flight.
#[derive(Debug, Default)]
pub(super) struct HeldAcks {
    /// (delivery sequence, end LSN, checks still in flight), in order.
    queue: VecDeque<(u64, Lsn, usize)>,
}

impl HeldAcks {
    /// Whether nothing is held.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A transaction finished with `in_flight` checks; returns the LSN that
    /// may be acknowledged now, if any.
    pub(super) fn finished(&mut self, seq: u64, end: Lsn, in_flight: usize) -> Option<Lsn> {
        self.queue.push_back((seq, end, in_flight));
        self.release()
    }

    /// A check of transaction `seq` was answered.
    pub(super) fn answered(&mut self, seq: u64) -> Option<Lsn> {
        if let Some(entry) = self.queue.iter_mut().find(|e| e.0 == seq) {
            entry.2 = entry.2.saturating_sub(1);
        }
        self.release()
    }

    fn release(&mut self) -> Option<Lsn> {
        let mut last = None;
        while self.queue.front().is_some_and(|e| e.2 == 0) {
            last = self.queue.pop_front().map(|e| e.1);
        }
        last
    }
}

/// One row image in plan column order; `None` when a column is absent
/// (an unchanged TOASTed value): such an image cannot be judged.
fn image(row: Option<&Row>, map: &ColumnMap) -> Option<Vec<Option<String>>> {
    let row = row?;
    let mut out = Vec::with_capacity(map.to_rel.len());
    for i in &map.to_rel {
        let datum = i.and_then(|i| row.0.get(i)).unwrap_or(&Datum::Absent);
        out.push(match datum {
            Datum::Null => None,
            Datum::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            Datum::Absent => return None,
        });
    }
    Some(out)
}

impl Core {
    /// Submits the check of one change for the subscriptions of `role` in
    /// `candidates` (deduplicated by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit_check(
        &mut self,
        check: &Arc<DatabaseCheck>,
        role: &Arc<str>,
        xid: u32,
        event: EventType,
        change: &Change,
        map: &ColumnMap,
        commit_timestamp: &str,
        candidates: &[Slot],
    ) {
        let Some(fallback) = self.fallback.clone() else {
            self.stats.database_denied.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if fallback.is_full() {
            // Refused before any grouping work: the hub's time goes to the
            // tables it can serve.
            fallback.refused();
            self.withhold(role, candidates);
            return;
        }
        let mut claims: Vec<Arc<str>> = Vec::new();
        let mut groups: Vec<Vec<Asked>> = Vec::new();
        let mut by_json: HashMap<Arc<str>, usize> = HashMap::new();
        for &slot in candidates {
            let Some(sub) = self.registry.get(slot) else { continue };
            if !super::same_role(&sub.viewer.role, role) {
                continue;
            }
            let at = *by_json.entry(Arc::clone(&sub.viewer.claims_json)).or_insert_with_key(|json| {
                claims.push(Arc::clone(json));
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[at].push(Asked { slot, conn: sub.conn, claims: Arc::clone(&sub.viewer.claims) });
        }
        if groups.is_empty() {
            return;
        }
        let old = if event == EventType::Insert { None } else { image(change.old_record.as_ref(), map) };
        let new = if event == EventType::Delete { None } else { image(change.record.as_ref(), map) };
        let id = self.next_job;
        self.next_job += 1;
        let submitted = fallback.submit(Check { id, xid, plan: Arc::clone(check), claims, images: vec![old, new] });
        match submitted {
            Ok(()) => {
                self.tx_checks += 1;
                self.jobs.insert(
                    id,
                    Job {
                        seq: self.tx_seq,
                        change: change.clone(),
                        event,
                        commit_timestamp: Arc::from(commit_timestamp),
                        role: Arc::clone(role),
                        groups,
                    },
                );
            }
            Err(_) => {
                let slots: Vec<Slot> = groups.iter().flatten().map(|a| a.slot).collect();
                self.withhold(role, &slots);
            }
        }
    }

    /// Full queue: deny these viewers and say so once per subscription;
    /// never wait (other tables must not slow down).
    fn withhold(&mut self, role: &Arc<str>, slots: &[Slot]) {
        self.stats.database_denied.fetch_add(1, Ordering::Relaxed);
        for &slot in slots {
            if self.registry.get(slot).is_none_or(|s| s.viewer.role != *role) {
                continue;
            }
            if let Some((outbox, notice)) = self.registry.withheld_notice(slot) {
                let _ = outbox.push(notice);
            }
        }
    }

    /// Delivers a verdict to the subscriptions it was asked for.
    pub fn verdict(&mut self, verdict: Verdict) {
        let Some(job) = self.jobs.remove(&verdict.id) else { return };
        let policies = Arc::clone(&self.policies);
        if let Some(plan) = policies.table(job.change.relation.oid) {
            let map = self.column_map(plan, &job.change.relation);
            let columns = self.columns_json(&job.change.relation);
            let mask: Option<Vec<bool>> = plan
                .role(&job.role)
                .and_then(|rp| rp.columns.as_ref())
                .map(|m| map.to_plan.iter().map(|p| p.is_some_and(|p| m.get(p).copied().unwrap_or(false))).collect());
            self.frames.clear();
            self.data.clear();
            let now = outbox::now_ms();
            for (group, result) in job.groups.iter().zip(&verdict.results) {
                let Ok(visible) = result else { continue };
                let sees_new = job.event != EventType::Delete && visible.get(1).copied().unwrap_or(false);
                let sees_old = match job.event {
                    EventType::Insert => false,
                    // No old image: judged by the new row (as in memory).
                    EventType::Update if job.change.old_record.is_none() => sees_new,
                    _ => visible.first().copied().unwrap_or(false),
                };
                let Some(event) = job.event.transition(sees_old, sees_new) else { continue };
                for asked in group {
                    let same = self
                        .registry
                        .get(asked.slot)
                        .is_some_and(|s| s.conn == asked.conn && Arc::ptr_eq(&s.viewer.claims, &asked.claims));
                    if same {
                        let shape = MaskRef { id: 0, mask: mask.as_deref(), primary_key: &map.primary_key };
                        self.deliver(asked.slot, event, &job.change, &job.commit_timestamp, &columns, shape, now);
                    }
                }
            }
            self.reap();
        }
        if let Some(lsn) = self.held.answered(job.seq) {
            self.ack.ack(lsn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_wait_for_every_check_of_earlier_transactions() {
        let mut h = HeldAcks::default();
        assert_eq!(h.finished(1, Lsn(10), 0), Some(Lsn(10)));
        assert_eq!(h.finished(2, Lsn(20), 2), None);
        assert_eq!(h.finished(3, Lsn(30), 0), None, "behind transaction 2");
        assert_eq!(h.answered(2), None);
        assert_eq!(h.answered(2), Some(Lsn(30)));
        assert!(h.is_empty());
    }
}
