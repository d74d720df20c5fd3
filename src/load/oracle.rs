//! The oracle: from the ledger of committed writes, which client must receive
//! which change, and the checker that compares that with what the clients
//! received.
//!
//! Written independently of the relay's own policy code (a checker that
//! reused the code under test could not catch its mistakes); a unit test pins
//! the two transition tables to each other so a deliberate change of
//! semantics shows up here.
//!
//! # Rules (mirroring `sql/0004_row_level_security.sql` and Supabase)
//!
//! - A user may see an order or membership row while a member of the row's
//!   dealership, judged with the memberships **as of the change's commit**.
//!   The load writer makes every membership change a barrier (no order write
//!   in flight), so the memberships are constant between two membership
//!   changes and each order write is judged against exactly one state.
//! - Visibility transitions per user: INSERT → INSERT to members of the new
//!   row's dealership; DELETE → DELETE to members of the old row's
//!   dealership; UPDATE → UPDATE to users who see both sides, INSERT to users
//!   who see only the new row, DELETE to users who see only the old row.
//! - A membership change is judged with the memberships after it: the granted
//!   user sees its own grant (INSERT), a revoked user does not see its own
//!   revocation (DELETE), the other members of the dealership see both.
//! - Filter `status=eq.pending` on the orders binding: INSERT and UPDATE
//!   events are matched on the new row, DELETE events on the old row (after
//!   the transition: a user who gets an UPDATE turned into a DELETE is matched
//!   on the old row). The memberships binding has no filter.
//! - Each expected change is received exactly once; per (client, row) in
//!   write order (rows are written again only after the previous write
//!   committed, and each write carries a per-row sequence number).
//!
//! Invariant: a received change is *correct* only when it equals an expected
//! one in every field the oracle knows (row, sequence number, event, the
//! judged row's dealership and status). Anything else is a leak.

use std::collections::HashMap;

/// Order statuses, as in `sql/0002_tables.sql` (index = status code).
pub const STATUSES: [&str; 5] = ["draft", "pending", "in_progress", "completed", "cancelled"];
/// The code of `pending` (the filtered clients' `status=eq.pending`).
pub const PENDING: u8 = 1;
/// Status code of a row without a status (memberships) or an unknown one.
pub const NO_STATUS: u8 = u8::MAX;
/// Dealership index of an unknown (foreign) dealership.
pub const UNKNOWN: u32 = u32::MAX;

/// The status code of a status text.
pub fn status_code(text: &str) -> u8 {
    STATUSES.iter().position(|s| *s == text).map_or(NO_STATUS, |i| i as u8)
}

/// The published tables a load run writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `public.orders`.
    Orders = 0,
    /// `public.dealer_memberships`.
    Memberships = 1,
}

/// The event a client receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// `INSERT`.
    Insert = 0,
    /// `UPDATE`.
    Update = 1,
    /// `DELETE`.
    Delete = 2,
}

impl Event {
    /// `INSERT`, `UPDATE`, `DELETE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Insert => "INSERT",
            Event::Update => "UPDATE",
            Event::Delete => "DELETE",
        }
    }

    /// From the `type` of a postgres_changes payload.
    pub fn parse(text: &str) -> Option<Event> {
        match text {
            "INSERT" => Some(Event::Insert),
            "UPDATE" => Some(Event::Update),
            "DELETE" => Some(Event::Delete),
            _ => None,
        }
    }
}

/// What the oracle knows of one version of an order row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowState {
    /// Dealership index.
    pub dealership: u32,
    /// Status code ([`STATUSES`]).
    pub status: u8,
}

/// One committed write, in commit order between membership changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// An order INSERT (`old` none), UPDATE (both) or DELETE (`new` none).
    Order {
        /// Order index.
        order: u32,
        /// Per-row sequence number of this write (0 = the insert or seed).
        seq: u32,
        /// The row before (UPDATE, DELETE).
        old: Option<RowState>,
        /// The row after (INSERT, UPDATE).
        new: Option<RowState>,
        /// When the statement was issued (µs since the run's epoch).
        t_us: u64,
    },
    /// A membership granted (a `dealer_memberships` INSERT).
    Grant {
        /// Membership row index.
        membership: u32,
        /// User index.
        user: u32,
        /// Dealership index.
        dealership: u32,
    },
    /// A membership revoked (a `dealer_memberships` DELETE).
    Revoke {
        /// Membership row index.
        membership: u32,
        /// User index.
        user: u32,
        /// Dealership index.
        dealership: u32,
    },
}

/// One delivery, expected or received: which row version, as which event.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// Row index (order or membership, per `table`).
    pub key: u32,
    /// Per-row sequence number of the write (memberships: 0 grant, 1 revoke).
    pub seq: u32,
    /// Dealership of the judged row (the new row for INSERT/UPDATE, the old
    /// row for DELETE).
    pub dealership: u32,
    /// When it was received (µs since the run's epoch; 0 for expected ones).
    pub recv_us: u32,
    /// The table.
    pub table: Table,
    /// The event.
    pub event: Event,
    /// Status of the judged row ([`NO_STATUS`] for memberships).
    pub status: u8,
}

impl Delivery {
    /// Whether two deliveries are the same change (receive time aside).
    pub fn same(&self, other: &Delivery) -> bool {
        self.key == other.key
            && self.seq == other.seq
            && self.dealership == other.dealership
            && self.table == other.table
            && self.event == other.event
            && self.status == other.status
    }

    fn row(&self) -> (Table, u32) {
        (self.table, self.key)
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = STATUSES.get(usize::from(self.status)).copied().unwrap_or("-");
        let dealership = if self.dealership == UNKNOWN { "?".to_owned() } else { self.dealership.to_string() };
        write!(f, "{} seq {} (dealership {dealership}, status {status})", self.event.as_str(), self.seq)
    }
}

/// Which event a user gets for a write it sees the old and/or new row of;
/// `op` is the write's own event. The transition table of the module docs.
pub fn transition(op: Event, sees_old: bool, sees_new: bool) -> Option<Event> {
    match op {
        Event::Insert => sees_new.then_some(Event::Insert),
        Event::Delete => sees_old.then_some(Event::Delete),
        Event::Update => match (sees_old, sees_new) {
            (true, true) => Some(Event::Update),
            (false, true) => Some(Event::Insert),
            (true, false) => Some(Event::Delete),
            (false, false) => None,
        },
    }
}

/// Whether `status=eq.pending` matches `event` of a write from `old` to
/// `new`: INSERT/UPDATE on the new row, DELETE on the old row.
pub fn pending_filter_matches(event: Event, old: Option<RowState>, new: Option<RowState>) -> bool {
    let row = match event {
        Event::Insert | Event::Update => new,
        Event::Delete => old,
    };
    row.is_some_and(|r| r.status == PENDING)
}

/// Members of every dealership (sorted user indexes).
#[derive(Debug, Clone, Default)]
pub struct Members {
    by_dealership: Vec<Vec<u32>>,
}

impl Members {
    /// No members in `dealerships` dealerships.
    pub fn new(dealerships: usize) -> Members {
        Members { by_dealership: vec![Vec::new(); dealerships] }
    }

    /// Makes `user` a member of `dealership` (idempotent).
    pub fn grant(&mut self, user: u32, dealership: u32) {
        let list = self.list_mut(dealership);
        if let Err(pos) = list.binary_search(&user) {
            list.insert(pos, user);
        }
    }

    /// Removes `user` from `dealership` (idempotent).
    pub fn revoke(&mut self, user: u32, dealership: u32) {
        let list = self.list_mut(dealership);
        if let Ok(pos) = list.binary_search(&user) {
            list.remove(pos);
        }
    }

    /// Whether `user` is a member of `dealership`.
    pub fn is_member(&self, user: u32, dealership: u32) -> bool {
        self.members(dealership).binary_search(&user).is_ok()
    }

    /// The members of `dealership`.
    pub fn members(&self, dealership: u32) -> &[u32] {
        self.by_dealership.get(dealership as usize).map_or(&[], Vec::as_slice)
    }

    fn list_mut(&mut self, dealership: u32) -> &mut Vec<u32> {
        let i = dealership as usize;
        if self.by_dealership.len() <= i {
            self.by_dealership.resize(i + 1, Vec::new());
        }
        &mut self.by_dealership[i]
    }
}

/// One expected delivery to a user's clients.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    /// The delivery.
    pub delivery: Delivery,
    /// Whether a client with the `status=eq.pending` filter receives it too.
    pub passes_filter: bool,
}

/// What each user's clients must receive, per user, sorted by row (stable:
/// in write order within a row).
#[derive(Debug, Default)]
pub struct Expectations {
    /// Per user index.
    pub per_user: Vec<Vec<Expected>>,
    /// Write call time per (order, seq), for write→receive latency of events
    /// whose frame does not carry the version's own timestamp (DELETE).
    pub write_time: HashMap<(u32, u32), u64>,
}

impl Expectations {
    /// Replays the ledger from the initial memberships.
    pub fn compute(initial: &Members, ledger: &[Entry], users: usize) -> Expectations {
        let mut members = initial.clone();
        let mut per_user: Vec<Vec<Expected>> = vec![Vec::new(); users];
        let mut write_time = HashMap::new();
        let mut audience: Vec<(u32, bool, bool)> = Vec::new();
        for entry in ledger {
            match *entry {
                Entry::Order { order, seq, old, new, t_us } => {
                    write_time.insert((order, seq), t_us);
                    let op = match (old, new) {
                        (None, Some(_)) => Event::Insert,
                        (Some(_), Some(_)) => Event::Update,
                        (Some(_), None) => Event::Delete,
                        (None, None) => continue,
                    };
                    audience.clear();
                    let none: &[u32] = &[];
                    let olds = old.map_or(none, |o| members.members(o.dealership));
                    let news = new.map_or(none, |n| members.members(n.dealership));
                    // Both lists are sorted: merge them.
                    let (mut i, mut j) = (0, 0);
                    while i < olds.len() || j < news.len() {
                        match (olds.get(i), news.get(j)) {
                            (Some(&a), Some(&b)) if a == b => {
                                audience.push((a, true, true));
                                i += 1;
                                j += 1;
                            }
                            (Some(&a), Some(&b)) if a < b => {
                                audience.push((a, true, false));
                                i += 1;
                            }
                            (Some(&a), None) => {
                                audience.push((a, true, false));
                                i += 1;
                            }
                            (_, Some(&b)) => {
                                audience.push((b, false, true));
                                j += 1;
                            }
                            (None, None) => break,
                        }
                    }
                    for &(user, sees_old, sees_new) in &audience {
                        let Some(event) = transition(op, sees_old, sees_new) else { continue };
                        let judged = if event == Event::Delete { old } else { new };
                        let Some(judged) = judged else { continue };
                        let Some(list) = per_user.get_mut(user as usize) else { continue };
                        list.push(Expected {
                            delivery: Delivery {
                                key: order,
                                seq,
                                dealership: judged.dealership,
                                recv_us: 0,
                                table: Table::Orders,
                                event,
                                status: judged.status,
                            },
                            passes_filter: pending_filter_matches(event, old, new),
                        });
                    }
                }
                Entry::Grant { membership, user, dealership } | Entry::Revoke { membership, user, dealership } => {
                    let grant = matches!(entry, Entry::Grant { .. });
                    if grant {
                        members.grant(user, dealership);
                    } else {
                        members.revoke(user, dealership);
                    }
                    let delivery = Delivery {
                        key: membership,
                        seq: if grant { 0 } else { 1 },
                        dealership,
                        recv_us: 0,
                        table: Table::Memberships,
                        event: if grant { Event::Insert } else { Event::Delete },
                        status: NO_STATUS,
                    };
                    for &u in members.members(dealership) {
                        if let Some(list) = per_user.get_mut(u as usize) {
                            list.push(Expected { delivery, passes_filter: true });
                        }
                    }
                }
            }
        }
        for list in &mut per_user {
            list.sort_by_key(|e| e.delivery.row());
        }
        Expectations { per_user, write_time }
    }

    /// How many deliveries a client of `user` (with or without the filter)
    /// must receive.
    pub fn count(&self, user: u32, filtered: bool) -> usize {
        self.per_user.get(user as usize).map_or(0, |l| l.iter().filter(|e| !filtered || e.passes_filter).count())
    }
}

/// What one client received.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    /// Client index.
    pub client: u32,
    /// Its user.
    pub user: u32,
    /// Whether its orders binding has `status=eq.pending`.
    pub filtered: bool,
    /// Deliveries in arrival order.
    pub received: Vec<Delivery>,
}

/// Kinds of check failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// A change the client's user may not see (or with wrong content/event).
    Leak,
    /// A change received more than once.
    Duplicate,
    /// An expected change never received.
    Missing,
    /// Received out of write order for its row.
    OutOfOrder,
}

impl FailureKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Leak => "leak",
            FailureKind::Duplicate => "duplicate",
            FailureKind::Missing => "missing",
            FailureKind::OutOfOrder => "out of order",
        }
    }
}

/// One offending case.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What went wrong.
    pub kind: FailureKind,
    /// Client index.
    pub client: u32,
    /// Its user index.
    pub user: u32,
    /// The table.
    pub table: Table,
    /// Row index.
    pub key: u32,
    /// What was expected (for a leak: the expected change of the same write,
    /// if the user was entitled to one).
    pub expected: Option<Delivery>,
    /// What was received.
    pub got: Option<Delivery>,
}

/// The checker's result.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Deliveries expected in all.
    pub expected: u64,
    /// Deliveries received in all.
    pub received: u64,
    /// Received and expected, once, in order.
    pub correct: u64,
    /// Leaks.
    pub leaks: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Missing deliveries.
    pub missing: u64,
    /// Out-of-order deliveries.
    pub out_of_order: u64,
    /// The first failure of each kind (by client index, then row).
    pub first: Vec<Failure>,
}

impl Verdict {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.leaks == 0 && self.duplicates == 0 && self.missing == 0 && self.out_of_order == 0
    }

    fn fail(&mut self, failure: Failure) {
        match failure.kind {
            FailureKind::Leak => self.leaks += 1,
            FailureKind::Duplicate => self.duplicates += 1,
            FailureKind::Missing => self.missing += 1,
            FailureKind::OutOfOrder => self.out_of_order += 1,
        }
        if !self.first.iter().any(|f| f.kind == failure.kind) {
            self.first.push(failure);
        }
    }
}

/// Compares every client's deliveries with the expectations.
pub fn check(expectations: &Expectations, clients: &[ClientRecord]) -> Verdict {
    let mut verdict = Verdict::default();
    let empty: Vec<Expected> = Vec::new();
    let mut received: Vec<Delivery> = Vec::new();
    let mut wanted: Vec<Delivery> = Vec::new();
    let mut matched: Vec<bool> = Vec::new();
    for client in clients {
        let all = expectations.per_user.get(client.user as usize).unwrap_or(&empty);
        wanted.clear();
        wanted.extend(all.iter().filter(|e| !client.filtered || e.passes_filter).map(|e| e.delivery));
        received.clear();
        received.extend_from_slice(&client.received);
        // Stable: arrival order kept within a row.
        received.sort_by_key(Delivery::row);
        verdict.expected += wanted.len() as u64;
        verdict.received += received.len() as u64;
        let failure = |kind, row: (Table, u32), expected, got| Failure {
            kind,
            client: client.client,
            user: client.user,
            table: row.0,
            key: row.1,
            expected,
            got,
        };
        let (mut w, mut r) = (0, 0);
        while w < wanted.len() || r < received.len() {
            let row = match (wanted.get(w), received.get(r)) {
                (Some(a), Some(b)) => a.row().min(b.row()),
                (Some(a), None) => a.row(),
                (None, Some(b)) => b.row(),
                (None, None) => break,
            };
            let w_end = w + wanted[w..].iter().take_while(|d| d.row() == row).count();
            let r_end = r + received[r..].iter().take_while(|d| d.row() == row).count();
            let want = &wanted[w..w_end];
            matched.clear();
            matched.resize(want.len(), false);
            let mut last: Option<usize> = None;
            for got in &received[r..r_end] {
                match want.iter().position(|e| e.same(got)) {
                    Some(i) if matched[i] => {
                        verdict.fail(failure(FailureKind::Duplicate, row, Some(want[i]), Some(*got)))
                    }
                    Some(i) => {
                        matched[i] = true;
                        if last.is_some_and(|l| i < l) {
                            verdict.fail(failure(FailureKind::OutOfOrder, row, Some(want[i]), Some(*got)));
                        } else {
                            verdict.correct += 1;
                        }
                        last = Some(last.map_or(i, |l| l.max(i)));
                    }
                    None => {
                        let same_write = want.iter().find(|e| e.seq == got.seq).copied();
                        verdict.fail(failure(FailureKind::Leak, row, same_write, Some(*got)));
                    }
                }
            }
            for (i, e) in want.iter().enumerate() {
                if !matched[i] {
                    verdict.fail(failure(FailureKind::Missing, row, Some(*e), None));
                }
            }
            w = w_end;
            r = r_end;
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(dealership: u32, status: &str) -> RowState {
        RowState { dealership, status: status_code(status) }
    }

    fn order(order: u32, seq: u32, old: Option<RowState>, new: Option<RowState>) -> Entry {
        Entry::Order { order, seq, old, new, t_us: 1_000 + u64::from(seq) }
    }

    #[test]
    fn transitions_match_the_relay_rules() {
        use crate::policy::EventType;
        for (op, theirs) in
            [(Event::Insert, EventType::Insert), (Event::Update, EventType::Update), (Event::Delete, EventType::Delete)]
        {
            for old in [false, true] {
                for new in [false, true] {
                    let ours = transition(op, old, new).map(Event::as_str);
                    let relay = theirs.transition(old, new).map(EventType::as_str);
                    assert_eq!(ours, relay, "{op:?} old={old} new={new}");
                }
            }
        }
        assert_eq!(transition(Event::Update, true, false), Some(Event::Delete));
        assert_eq!(transition(Event::Update, false, true), Some(Event::Insert));
        assert_eq!(transition(Event::Insert, true, false), None);
        assert_eq!(transition(Event::Delete, false, true), None);
    }

    #[test]
    fn the_pending_filter_reads_the_row_the_event_carries() {
        let (p, d) = (Some(at(0, "pending")), Some(at(0, "draft")));
        assert!(pending_filter_matches(Event::Insert, None, p));
        assert!(!pending_filter_matches(Event::Insert, None, d));
        // pending → draft: the UPDATE is judged on the new (draft) row.
        assert!(!pending_filter_matches(Event::Update, p, d));
        assert!(pending_filter_matches(Event::Update, d, p));
        // Moved out of view while pending: the DELETE is judged on the old row.
        assert!(pending_filter_matches(Event::Delete, p, d));
        assert!(!pending_filter_matches(Event::Delete, d, p));
        assert!(pending_filter_matches(Event::Delete, p, None));
    }

    /// Users 0 (dealership 0), 1 (dealership 1), 2 (both), 3 (none).
    fn world() -> Members {
        let mut m = Members::new(2);
        m.grant(0, 0);
        m.grant(1, 1);
        m.grant(2, 0);
        m.grant(2, 1);
        m
    }

    fn events(e: &Expectations, user: usize) -> Vec<(u32, u32, Event)> {
        e.per_user[user].iter().map(|x| (x.delivery.key, x.delivery.seq, x.delivery.event)).collect()
    }

    #[test]
    fn expectations_follow_moves_and_membership_barriers() {
        let ledger = vec![
            order(7, 0, None, Some(at(0, "pending"))),
            // Moved from 0 to 1 (and to draft).
            order(7, 1, Some(at(0, "pending")), Some(at(1, "draft"))),
            // User 3 joins dealership 1; sees its own grant.
            Entry::Grant { membership: 9, user: 3, dealership: 1 },
            order(7, 2, Some(at(1, "draft")), None),
            // User 1 leaves dealership 1: does not see its own revocation.
            Entry::Revoke { membership: 4, user: 1, dealership: 1 },
        ];
        let e = Expectations::compute(&world(), &ledger, 4);
        use Event::*;
        assert_eq!(events(&e, 0), vec![(7, 0, Insert), (7, 1, Delete)]);
        assert_eq!(events(&e, 1), vec![(7, 1, Insert), (7, 2, Delete), (9, 0, Insert)]);
        // Sorted by row (orders, then memberships by index), write order within a row.
        assert_eq!(events(&e, 2), vec![(7, 0, Insert), (7, 1, Update), (7, 2, Delete), (4, 1, Delete), (9, 0, Insert)]);
        assert_eq!(events(&e, 3), vec![(7, 2, Delete), (4, 1, Delete), (9, 0, Insert)]);
        // User 0's DELETE carries the old row (dealership 0, pending): passes the filter.
        let del = e.per_user[0][1];
        assert_eq!((del.delivery.dealership, del.delivery.status, del.passes_filter), (0, PENDING, true));
        // User 1's INSERT carries the new row (draft): filtered clients skip it.
        assert!(!e.per_user[1][0].passes_filter);
        assert_eq!(e.count(2, false), 5);
        // The UPDATE to draft and the DELETE of the draft row do not match.
        assert_eq!(e.count(2, true), 3);
        assert_eq!(e.write_time[&(7, 1)], 1_001);
    }

    fn record(client: u32, user: u32, filtered: bool, e: &Expectations) -> ClientRecord {
        let received =
            e.per_user[user as usize].iter().filter(|x| !filtered || x.passes_filter).map(|x| x.delivery).collect();
        ClientRecord { client, user, filtered, received }
    }

    fn fixture() -> (Expectations, Vec<ClientRecord>) {
        let ledger = vec![
            order(1, 0, None, Some(at(0, "pending"))),
            order(2, 0, None, Some(at(1, "pending"))),
            order(1, 1, Some(at(0, "pending")), Some(at(0, "in_progress"))),
            order(2, 1, Some(at(1, "pending")), Some(at(0, "pending"))),
            order(1, 2, Some(at(0, "in_progress")), None),
        ];
        let e = Expectations::compute(&world(), &ledger, 4);
        let clients =
            vec![record(0, 0, false, &e), record(1, 1, true, &e), record(2, 2, false, &e), record(3, 3, false, &e)];
        (e, clients)
    }

    #[test]
    fn exact_deliveries_pass() {
        let (e, clients) = fixture();
        let v = check(&e, &clients);
        assert!(v.passed(), "{v:?}");
        assert_eq!(v.expected, v.received);
        assert_eq!(v.correct, v.expected);
        assert!(v.expected > 0);
    }

    #[test]
    fn the_checker_flags_a_leak() {
        let (e, mut clients) = fixture();
        // User 3 belongs to no dealership: any order delivery is a leak.
        let mut leaked = e.per_user[0][0].delivery;
        leaked.recv_us = 5;
        clients[3].received.push(leaked);
        let v = check(&e, &clients);
        assert!(!v.passed());
        assert_eq!((v.leaks, v.missing, v.duplicates), (1, 0, 0));
        let f = &v.first[0];
        assert_eq!((f.kind, f.client, f.user, f.key), (FailureKind::Leak, 3, 3, leaked.key));
        assert!(f.expected.is_none());
    }

    #[test]
    fn the_checker_flags_a_wrong_event_as_a_leak() {
        let (e, mut clients) = fixture();
        // User 1 must get order 2's move out of dealership 1 as a DELETE; an
        // UPDATE (carrying the new row) instead is a leak.
        let pos = clients[1].received.iter().position(|d| d.key == 2 && d.seq == 1).expect("the move");
        assert_eq!(clients[1].received[pos].event, Event::Delete);
        clients[1].received[pos].event = Event::Update;
        let v = check(&e, &clients);
        assert_eq!((v.leaks, v.missing), (1, 1));
        let leak = v.first.iter().find(|f| f.kind == FailureKind::Leak).unwrap();
        assert_eq!(leak.expected.map(|d| d.event), Some(Event::Delete));
    }

    #[test]
    fn the_checker_flags_a_filter_leak() {
        let (e, mut clients) = fixture();
        // Client 0 (user 0) now has the filter: order 1's in_progress UPDATE
        // and the DELETE of that in_progress row do not match
        // status=eq.pending, so receiving them is a leak each.
        clients[0].filtered = true;
        let v = check(&e, &clients);
        assert_eq!((v.leaks, v.missing), (2, 0), "{v:?}");
        let f = &v.first[0];
        assert_eq!((f.key, f.got.map(|d| d.status)), (1, Some(status_code("in_progress"))));
    }

    #[test]
    fn the_checker_flags_a_missing_delivery() {
        let (e, mut clients) = fixture();
        let dropped = clients[2].received.remove(1);
        let v = check(&e, &clients);
        assert_eq!((v.missing, v.leaks), (1, 0));
        let f = &v.first[0];
        assert_eq!((f.kind, f.client, f.key), (FailureKind::Missing, 2, dropped.key));
        assert!(f.expected.is_some_and(|d| d.same(&dropped)) && f.got.is_none());
    }

    #[test]
    fn the_checker_flags_duplicates_and_reordering() {
        let (e, mut clients) = fixture();
        let again = clients[2].received[0];
        clients[2].received.push(again);
        let v = check(&e, &clients);
        assert_eq!((v.duplicates, v.leaks, v.missing), (1, 0, 0));

        let (e, mut clients) = fixture();
        // Swap two deliveries of the same row (order 1, seq 0 and 1).
        let r = &mut clients[0].received;
        let a = r.iter().position(|d| d.key == 1 && d.seq == 0).unwrap();
        let b = r.iter().position(|d| d.key == 1 && d.seq == 1).unwrap();
        r.swap(a, b);
        let v = check(&e, &clients);
        assert_eq!((v.out_of_order, v.missing, v.leaks), (1, 0, 0));
    }

    #[test]
    fn a_wrong_version_is_a_leak_not_a_match() {
        let (e, mut clients) = fixture();
        clients[0].received[0].status = status_code("draft");
        let v = check(&e, &clients);
        assert_eq!((v.leaks, v.missing), (1, 1));
    }
}
