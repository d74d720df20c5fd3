//! Hub core tests without PostgreSQL: synthetic transactions through
//! [`Core::stage`], checked against a model of the memberships.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::change::{ColumnInfo, Datum, Op, Row, TxBegin, TxInfo};
use crate::pgoutput::{PgTimestamp, ReplicaIdentity};
use crate::policy::plan::Loaded;
use crate::policy::{Caches, LoadedAt, PolicySet};
use crate::spill::Spill;

fn relation(oid: u32, table: &str, columns: &[&str]) -> Arc<RelationInfo> {
    Arc::new(RelationInfo {
        oid,
        schema: "public".into(),
        table: table.into(),
        replica_identity: ReplicaIdentity::Full,
        columns: columns
            .iter()
            .map(|name| ColumnInfo {
                name: (*name).into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: *name == "id",
                kind: crate::change::value::kind_of(25),
            })
            .collect(),
    })
}

/// Installs sql/'s plans (orders = oid 1, dealer_memberships = oid 2) with
/// empty caches, loaded `at`.
fn install(hub: &mut Hub, at: LoadedAt) {
    let (policies, specs, _) = PolicySet::compile(&crate::load::schema::dealership_catalog(1, 2));
    let loaded = Loaded { policies: Arc::new(policies), caches: Caches::new(specs), at, catalog: None };
    hub.core_mut().stage(StageEvent::Policies(Box::new(loaded))).unwrap();
}

fn text(s: impl ToString) -> Datum {
    Datum::Text(Bytes::from(s.to_string()))
}

struct Fixture {
    hub: Hub,
    budget: Arc<OutboxBudget>,
    orders: Arc<RelationInfo>,
    memberships_rel: Arc<RelationInfo>,
    lsn: u64,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(HubConfig::default())
    }

    fn with(config: HubConfig) -> Fixture {
        Fixture::with_spill(config, Spill::temporary())
    }

    fn with_spill(config: HubConfig, spill: Spill) -> Fixture {
        let (mut hub, handle) = hub(config, AckHandle::default(), spill);
        install(&mut hub, LoadedAt { lsn: Lsn::ZERO, exact: true, rows: 0 });
        Fixture {
            hub,
            budget: handle.budget,
            orders: relation(1, "orders", &["id", "dealership_id", "status"]),
            memberships_rel: relation(2, "dealer_memberships", &["id", "user_id", "dealership_id", "role"]),
            lsn: 100,
        }
    }

    fn join(&mut self, conn: ConnId, viewer: Viewer, topic: &str) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::with_budget(OutboxLimits::default(), Arc::clone(&self.budget)));
        self.hub.core_mut().control(Control::Join(Subscription {
            conn,
            topic: topic.into(),
            vsn: Vsn::V2,
            viewer,
            bindings: vec![Binding {
                id: 5,
                schema: Some("public".into()),
                table: None,
                event: EventMatch::All,
                filter: Filter::default(),
                select: None,
            }],
            outbox: Arc::clone(&outbox),
            on_live: None,
            on_withheld: None,
        }));
        outbox
    }

    fn order(&self, op: Op, id: u32, old: Option<Uuid>, new: Option<Uuid>) -> Change {
        let row = |d: Uuid| Row(vec![text(id), text(d), text("pending")]);
        Change {
            relation: Arc::clone(&self.orders),
            op,
            record: new.map(row),
            old_record: old.map(row),
            missing_toast: vec![],
        }
    }

    fn membership(&self, op: Op, key: &str, user: Uuid, d: Uuid) -> Change {
        let row = Row(vec![text(key), text(user), text(d), text("user")]);
        let (record, old_record) = if op == Op::Delete { (None, Some(row)) } else { (Some(row), None) };
        Change { relation: Arc::clone(&self.memberships_rel), op, record, old_record, missing_toast: vec![] }
    }

    fn commit_at(&mut self, commit_lsn: u64, changes: Vec<Change>) {
        let core = self.hub.core_mut();
        core.stage(StageEvent::Tx(TxEvent::Begin(TxBegin {
            xid: 1,
            commit_lsn: Lsn(commit_lsn),
            commit_timestamp: PgTimestamp(0),
        })))
        .unwrap();
        for c in changes {
            core.stage(StageEvent::Tx(TxEvent::Change(c))).unwrap();
        }
        core.stage(StageEvent::Tx(TxEvent::Commit(TxInfo {
            xid: 1,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(commit_lsn + 8),
            commit_timestamp: PgTimestamp(0),
        })))
        .unwrap();
        assert!(!core.busy(), "an unlimited budget never pauses");
    }

    fn commit(&mut self, changes: Vec<Change>) {
        self.lsn += 16;
        let lsn = self.lsn;
        self.commit_at(lsn, changes);
    }
}

fn drain(outbox: &Outbox) -> Vec<Bytes> {
    let mut out = Vec::new();
    outbox.try_drain(&mut out);
    out
}

/// (table, type, dealership of the row the event carries)
fn events(frames: &[Bytes]) -> Vec<(String, String, Uuid)> {
    frames
        .iter()
        .map(|f| {
            let v: serde_json::Value = serde_json::from_slice(f).unwrap();
            let data = &v[4]["data"];
            let row = if data["type"] == "DELETE" { &data["old_record"] } else { &data["record"] };
            (
                data["table"].as_str().unwrap().to_owned(),
                data["type"].as_str().unwrap().to_owned(),
                Uuid::parse_str(row["dealership_id"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn frames_are_shared_between_subscribers_of_the_same_topic() {
    let mut f = Fixture::new();
    let d = Uuid::new_v4();
    let (u1, u2) = (Uuid::new_v4(), Uuid::new_v4());
    f.commit(vec![f.membership(Op::Insert, "m1", u1, d), f.membership(Op::Insert, "m2", u2, d)]);
    let a = f.join(1, Viewer::user(u1), "realtime:orders");
    let b = f.join(2, Viewer::user(u2), "realtime:orders");
    let c = f.join(3, Viewer::user(u2), "realtime:other");
    f.commit(vec![f.order(Op::Insert, 1, None, Some(d))]);
    let (fa, fb, fc) = (drain(&a), drain(&b), drain(&c));
    assert_eq!((fa.len(), fb.len(), fc.len()), (1, 1, 1));
    assert_eq!(fa[0].as_ptr(), fb[0].as_ptr(), "one serialization shared by both");
    assert_ne!(fa[0].as_ptr(), fc[0].as_ptr(), "another topic is another frame");
    assert_eq!(f.hub.core_mut().stats.frames_built.load(Ordering::Relaxed), 2);
}

#[test]
fn duplicates_after_a_reconnect_are_skipped_and_the_catch_up_window_reaches_only_service_role() {
    let mut f = Fixture::new();
    let d = Uuid::new_v4();
    let u = Uuid::new_v4();
    install(&mut f.hub, LoadedAt { lsn: Lsn(1000), exact: false, rows: 0 });
    let user = f.join(1, Viewer::user(u), "realtime:x");
    let service = f.join(2, Viewer::service(), "realtime:x");
    // In the window: membership applied, row change to service_role only.
    f.commit_at(500, vec![f.membership(Op::Insert, "m", u, d), f.order(Op::Insert, 1, None, Some(d))]);
    assert!(drain(&user).is_empty());
    assert_eq!(drain(&service).len(), 2);
    f.commit_at(1000, vec![f.order(Op::Insert, 2, None, Some(d))]);
    assert_eq!(drain(&user).len(), 1, "from the load point on, exact");
    assert_eq!(drain(&service).len(), 1);
    // A reconnect re-sends the last transaction: skipped.
    f.hub.core_mut().stage(StageEvent::Reset).unwrap();
    f.commit_at(1000, vec![f.order(Op::Insert, 2, None, Some(d))]);
    assert!(drain(&user).is_empty() && drain(&service).is_empty());
    assert_eq!(f.hub.core_mut().stats.duplicate_transactions.load(Ordering::Relaxed), 1);
}

fn small_memory() -> HubConfig {
    HubConfig { max_tx_bytes: 1000, ..HubConfig::default() }
}

#[test]
fn a_spilled_transaction_is_judged_whole_with_the_memberships_as_of_its_commit() {
    // The leak repro: a revoke (and a grant) *after* a bulk update, in one
    // transaction far larger than the hub's memory budget.
    let mut f = Fixture::with(small_memory());
    let (d1, dx) = (Uuid::new_v4(), Uuid::new_v4());
    let (a, g) = (Uuid::new_v4(), Uuid::new_v4());
    f.commit(vec![f.membership(Op::Insert, "a-d1", a, d1), f.membership(Op::Insert, "a-dx", a, dx)]);
    let a_box = f.join(1, Viewer::user(a), "realtime:x");
    let g_box = f.join(2, Viewer::user(g), "realtime:x");
    let mut changes: Vec<Change> = (0..500).map(|i| f.order(Op::Update, i, Some(dx), Some(dx))).collect();
    changes.push(f.order(Op::Update, 9999, Some(d1), Some(d1)));
    changes.push(f.membership(Op::Delete, "a-d1", a, d1));
    changes.push(f.membership(Op::Insert, "g-d1", g, d1));
    f.commit(changes);
    let a_got = events(&drain(&a_box));
    assert_eq!(a_got.len(), 500, "A sees the DX updates");
    assert!(
        a_got.iter().all(|(_, _, d)| *d == dx),
        "A must not see the D1 order it lost access to in this transaction"
    );
    let g_got: Vec<_> = events(&drain(&g_box)).into_iter().filter(|(t, _, _)| t == "orders").collect();
    assert_eq!(g_got.len(), 1, "G, granted in the same transaction, sees the D1 order: {g_got:?}");
    assert_eq!((g_got[0].1.as_str(), g_got[0].2), ("UPDATE", d1));
    assert_eq!(f.hub.core_mut().stats.spilled_transactions.load(Ordering::Relaxed), 1);
}

#[test]
fn a_full_outbox_budget_pauses_the_fan_out_and_a_reader_that_keeps_reading_gets_everything() {
    let mut f = Fixture::with(HubConfig { outbox_budget: 20_000, ..small_memory() });
    let d = Uuid::new_v4();
    let u = Uuid::new_v4();
    f.commit(vec![f.membership(Op::Insert, "m", u, d)]);
    let reader = f.join(1, Viewer::user(u), "realtime:x");
    let changes: Vec<Change> = (0..2000).map(|i| f.order(Op::Insert, i, None, Some(d))).collect();
    let core = f.hub.core_mut();
    core.stage(StageEvent::Tx(TxEvent::Begin(TxBegin {
        xid: 2,
        commit_lsn: Lsn(1000),
        commit_timestamp: PgTimestamp(0),
    })))
    .unwrap();
    for change in changes {
        core.stage(StageEvent::Tx(TxEvent::Change(change))).unwrap();
    }
    core.stage(StageEvent::Tx(TxEvent::Commit(TxInfo {
        xid: 2,
        commit_lsn: Lsn(1000),
        end_lsn: Lsn(1008),
        commit_timestamp: PgTimestamp(0),
    })))
    .unwrap();
    let mut got = Vec::new();
    let mut rounds = 0;
    while core.busy() {
        assert!(f.budget.used() >= 20_000, "paused only on a full budget");
        assert!(core.stats.handled_lsn.load(Ordering::Relaxed) < 1008, "not acknowledged before it is all queued");
        got.extend(drain(&reader));
        core.resume().unwrap();
        rounds += 1;
    }
    got.extend(drain(&reader));
    assert!(rounds > 10, "the fan-out paused {rounds} times");
    let ids: Vec<String> = got
        .iter()
        .map(|f| {
            let v: serde_json::Value = serde_json::from_slice(f).unwrap();
            v[4]["data"]["record"]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, (0..2000).map(|i| i.to_string()).collect::<Vec<_>>(), "every row, once, in order");
    assert_eq!(core.stats.handled_lsn.load(Ordering::Relaxed), 1008);
    assert!(core.stats.pauses.load(Ordering::Relaxed) >= 1);
    assert_eq!(core.stats.slow_consumers.load(Ordering::Relaxed), 0);
}

#[test]
fn a_full_spill_disk_budget_pauses_the_hub_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spill = Spill::new(crate::spill::SpillConfig { dir: dir.path().join("s"), disk_budget: 4096 }).unwrap();
    let mut f = Fixture::with_spill(HubConfig { max_tx_bytes: 0, ..HubConfig::default() }, spill.clone());
    let d = Uuid::new_v4();
    let u = Uuid::new_v4();
    f.commit(vec![f.membership(Op::Insert, "m", u, d)]);
    let reader = f.join(1, Viewer::user(u), "realtime:x");
    // Another log holds the whole disk budget.
    let mut other = spill.log(0);
    while other.push(0, f.order(Op::Insert, 0, None, Some(d))).is_ok() {}
    let change = f.order(Op::Insert, 42, None, Some(d));
    let core = f.hub.core_mut();
    core.stage(StageEvent::Tx(TxEvent::Begin(TxBegin {
        xid: 3,
        commit_lsn: Lsn(5000),
        commit_timestamp: PgTimestamp(0),
    })))
    .unwrap();
    core.stage(StageEvent::Tx(TxEvent::Change(change))).unwrap();
    assert!(core.busy(), "the refused change waits");
    core.resume().unwrap();
    assert!(core.busy(), "still no room");
    assert!(core.stats.spill_waits.load(Ordering::Relaxed) >= 2);
    drop(other);
    core.resume().unwrap();
    assert!(!core.busy());
    core.stage(StageEvent::Tx(TxEvent::Commit(TxInfo {
        xid: 3,
        commit_lsn: Lsn(5000),
        end_lsn: Lsn(5008),
        commit_timestamp: PgTimestamp(0),
    })))
    .unwrap();
    let got = drain(&reader);
    assert_eq!(got.len(), 1, "the change that waited is delivered");
}

#[test]
fn a_reader_past_its_lag_is_closed_with_the_reason_and_the_others_keep_their_subscriptions() {
    let mut f = Fixture::with(HubConfig { max_reader_lag: Duration::from_millis(50), ..HubConfig::default() });
    let d = Uuid::new_v4();
    let (u, v) = (Uuid::new_v4(), Uuid::new_v4());
    f.commit(vec![f.membership(Op::Insert, "m", u, d), f.membership(Op::Insert, "n", v, d)]);
    let stalled = f.join(1, Viewer::user(u), "realtime:x");
    let reading = f.join(2, Viewer::user(v), "realtime:x");
    f.commit(vec![f.order(Op::Insert, 1, None, Some(d))]);
    drain(&reading);
    std::thread::sleep(Duration::from_millis(120));
    f.hub.core_mut().check_readers();
    assert!(stalled.is_closed());
    let mut out = Vec::new();
    let reason = futures::executor::block_on(stalled.next_batch(&mut out)).unwrap_err();
    assert_eq!(reason.code, 1013);
    assert!(reason.reason.contains("oldest undelivered message"), "{}", reason.reason);
    assert!(!reading.is_closed());
    f.commit(vec![f.order(Op::Insert, 2, None, Some(d))]);
    assert_eq!(drain(&reading).len(), 1);
    assert_eq!(f.hub.core_mut().stats.lagging_readers_closed.load(Ordering::Relaxed), 1);
}

#[derive(Debug, Clone)]
enum Step {
    Grant(usize, usize),
    Revoke(usize, usize),
    Insert(usize),
    Move(usize, usize),
    Delete(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6usize, 0..3usize).prop_map(|(u, d)| Step::Grant(u, d)),
        (0..6usize, 0..3usize).prop_map(|(u, d)| Step::Revoke(u, d)),
        (0..3usize).prop_map(Step::Insert),
        (0..12usize, 0..3usize).prop_map(|(o, d)| Step::Move(o, d)),
        (0..12usize).prop_map(Step::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No subscriber ever receives a change for a dealership it was not a
    /// member of as of that change's commit; and every member gets it.
    #[test]
    fn deliveries_follow_memberships_as_of_each_commit(
        txs in prop::collection::vec(prop::collection::vec(step(), 1..6), 1..25),
        spill in any::<bool>(),
    ) {
        // With `spill`, every transaction goes to disk whole.
        let mut f = Fixture::with(HubConfig { max_tx_bytes: if spill { 0 } else { 16 << 20 }, ..HubConfig::default() });
        let users: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        let dealers: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let outboxes: Vec<Arc<Outbox>> =
            users.iter().enumerate().map(|(i, &u)| f.join(i as ConnId, Viewer::user(u), "realtime:p")).collect();
        let mut members: BTreeSet<(usize, usize)> = BTreeSet::new();
        let mut orders: BTreeMap<u32, usize> = BTreeMap::new();
        let mut next_order = 0u32;
        for tx in txs {
            let mut changes = Vec::new();
            // (order id, old dealership, new dealership) per row change, in order
            let mut row_changes: Vec<(Option<usize>, Option<usize>)> = Vec::new();
            let mut touched = BTreeSet::new();
            for s in tx {
                match s {
                    Step::Grant(u, d) if !members.contains(&(u, d)) => {
                        members.insert((u, d));
                        changes.push(f.membership(Op::Insert, &format!("{u}-{d}"), users[u], dealers[d]));
                        row_changes.push((None, Some(d)));
                    }
                    Step::Revoke(u, d) if members.contains(&(u, d)) => {
                        members.remove(&(u, d));
                        changes.push(f.membership(Op::Delete, &format!("{u}-{d}"), users[u], dealers[d]));
                        row_changes.push((Some(d), None));
                    }
                    Step::Insert(d) => {
                        next_order += 1;
                        orders.insert(next_order, d);
                        touched.insert(next_order);
                        changes.push(f.order(Op::Insert, next_order, None, Some(dealers[d])));
                        row_changes.push((None, Some(d)));
                    }
                    Step::Move(o, d) => {
                        let Some((&id, &old)) = orders.iter().nth(o % orders.len().max(1)) else { continue };
                        if touched.contains(&id) { continue; }
                        orders.insert(id, d);
                        touched.insert(id);
                        changes.push(f.order(Op::Update, id, Some(dealers[old]), Some(dealers[d])));
                        row_changes.push((Some(old), Some(d)));
                    }
                    Step::Delete(o) => {
                        let Some((&id, &old)) = orders.iter().nth(o % orders.len().max(1)) else { continue };
                        if touched.contains(&id) { continue; }
                        orders.remove(&id);
                        touched.insert(id);
                        changes.push(f.order(Op::Delete, id, Some(dealers[old]), None));
                        row_changes.push((Some(old), None));
                    }
                    _ => {}
                }
            }
            if changes.is_empty() { continue; }
            f.commit(changes);
            for (u, outbox) in outboxes.iter().enumerate() {
                let got = events(&drain(outbox));
                let member = |d: Option<usize>| d.is_some_and(|d| members.contains(&(u, d)));
                let mut want = Vec::new();
                for (old, new) in &row_changes {
                    let ty = match (old.is_some(), new.is_some(), member(*old), member(*new)) {
                        (false, true, _, true) => Some("INSERT"),
                        (true, false, true, _) => Some("DELETE"),
                        (true, true, true, true) => Some("UPDATE"),
                        (true, true, false, true) => Some("INSERT"),
                        (true, true, true, false) => Some("DELETE"),
                        _ => None,
                    };
                    if let Some(ty) = ty {
                        let d = if ty == "DELETE" { old.unwrap() } else { new.unwrap() };
                        want.push((ty.to_owned(), dealers[d]));
                    }
                }
                for (_, ty, d) in &got {
                    let di = dealers.iter().position(|x| x == d).unwrap();
                    prop_assert!(members.contains(&(u, di)) || ty == "DELETE",
                        "user {u} got {ty} for dealership {di} without membership at commit");
                }
                let got: Vec<(String, Uuid)> = got.into_iter().map(|(_, ty, d)| (ty, d)).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}

/// A policy update at run time: the dealership cache (same spec) keeps the
/// memberships the WAL built; an update read ahead of the stream judges like
/// the catch-up window until one that is not.
#[test]
fn a_policy_update_keeps_unchanged_caches_and_an_ahead_one_is_catch_up() {
    let mut f = Fixture::new();
    let (d, u) = (Uuid::new_v4(), Uuid::new_v4());
    f.commit(vec![f.membership(Op::Insert, "m", u, d)]);
    let user = f.join(1, Viewer::user(u), "realtime:x");
    let service = f.join(2, Viewer::service(), "realtime:x");
    let update = |f: &mut Fixture, ahead: bool| {
        let (policies, specs, _) = PolicySet::compile(&crate::load::schema::dealership_catalog(1, 2));
        let at = LoadedAt { lsn: Lsn(f.lsn + 1), exact: false, rows: 0 };
        let loaded = Loaded { policies: Arc::new(policies), caches: Caches::new(specs), at, catalog: None };
        f.hub.core_mut().stage(StageEvent::PolicyUpdate { loaded: Box::new(loaded), ahead }).unwrap();
    };
    update(&mut f, false);
    f.commit(vec![f.order(Op::Insert, 1, None, Some(d))]);
    assert_eq!(drain(&user).len(), 1, "the kept cache still knows the member");
    assert_eq!(drain(&service).len(), 1);
    update(&mut f, true);
    f.commit(vec![f.order(Op::Insert, 2, None, Some(d))]);
    assert!(drain(&user).is_empty(), "read ahead of the stream: service_role only");
    assert_eq!(drain(&service).len(), 1);
    update(&mut f, false);
    f.commit(vec![f.order(Op::Insert, 3, None, Some(d))]);
    assert_eq!(drain(&user).len(), 1);
    assert_eq!(f.hub.core_mut().stats.policy_reloads.load(Ordering::Relaxed), 3);
}

/// Joins `conn` as service_role with one binding on public.orders per filter
/// spec (binding ids 1, 2, …).
fn join_filtered(f: &mut Fixture, conn: ConnId, specs: &[&str]) -> (Arc<Outbox>, Vec<Binding>) {
    let outbox = Arc::new(Outbox::with_budget(OutboxLimits::default(), Arc::clone(&f.budget)));
    let bindings: Vec<Binding> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| Binding {
            id: i as u32 + 1,
            schema: Some("public".into()),
            table: Some("orders".into()),
            event: EventMatch::All,
            filter: Filter::for_relation(spec, &f.orders).unwrap(),
            select: None,
        })
        .collect();
    f.hub.core_mut().control(Control::Join(Subscription {
        conn,
        topic: format!("realtime:f{conn}"),
        vsn: Vsn::V2,
        viewer: Viewer::service(),
        bindings: bindings.clone(),
        outbox: Arc::clone(&outbox),
        on_live: None,
        on_withheld: None,
    }));
    (outbox, bindings)
}

fn order_row(id: &str, status: Option<&str>) -> Row {
    Row(vec![text(id), text(Uuid::nil()), status.map_or(Datum::Null, text)])
}

/// The binding ids of each frame.
fn frame_ids(frames: &[Bytes]) -> Vec<Vec<u64>> {
    frames
        .iter()
        .map(|f| {
            let v: serde_json::Value = serde_json::from_slice(f).unwrap();
            let mut ids: Vec<u64> = v[4]["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
            ids.sort_unstable();
            ids
        })
        .collect()
}

#[test]
fn eq_and_in_filters_are_looked_up_not_evaluated_for_every_change() {
    let mut f = Fixture::new();
    // 200 subscribers with a 100-value `in` filter each, none matching "x".
    let mut hostile = Vec::new();
    for conn in 0..200u64 {
        let values: Vec<String> = (0..100).map(|v| format!("s{conn}-{v}")).collect();
        let spec = format!("status=in.({})", values.join(","));
        hostile.push(join_filtered(&mut f, conn, &[&spec]).0);
    }
    let (eq, _) = join_filtered(&mut f, 1000, &["status=eq.x"]);
    let (neq, _) = join_filtered(&mut f, 1001, &["status=neq.y"]);
    let (all, _) = join_filtered(&mut f, 1002, &[""]);
    let stats = Arc::clone(&f.hub.core_mut().stats);
    let evaluations = || stats.filter_evaluations.load(Ordering::Relaxed);
    let before = evaluations();
    let insert = Change {
        relation: Arc::clone(&f.orders),
        op: Op::Insert,
        record: Some(order_row("1", Some("x"))),
        old_record: None,
        missing_toast: vec![],
    };
    f.commit(vec![insert]);
    // Judged: the eq subscriber (a key hit) and the unindexed neq one; the
    // 200 `in` filters were never evaluated.
    assert_eq!(evaluations() - before, 2);
    assert_eq!(frame_ids(&drain(&eq)), vec![vec![1]]);
    assert_eq!(frame_ids(&drain(&neq)), vec![vec![1]]);
    assert_eq!(frame_ids(&drain(&all)), vec![vec![1]]);
    assert!(hostile.iter().all(|o| drain(o).is_empty()));
    // A value one `in` list holds reaches exactly that subscriber.
    let before = evaluations();
    let update = Change {
        relation: Arc::clone(&f.orders),
        op: Op::Update,
        record: Some(order_row("1", Some("s7-42"))),
        old_record: Some(order_row("1", Some("x"))),
        missing_toast: vec![],
    };
    f.commit(vec![update]);
    assert_eq!(evaluations() - before, 3, "the eq (old row's key), the neq, and subscriber 7");
    assert_eq!(frame_ids(&drain(&hostile[7])), vec![vec![1]]);
    assert!(drain(&eq).is_empty(), "an update is judged on the new row");
    assert!(hostile.iter().enumerate().all(|(i, o)| i == 7 || drain(o).is_empty()));
}

#[derive(Debug, Clone)]
struct FilterCase {
    subs: Vec<Vec<&'static str>>,
    changes: Vec<(u8, Option<&'static str>, Option<&'static str>, &'static str)>,
}

const SPECS: &[&str] = &[
    "",
    "status=eq.a",
    "status=in.(a,b)",
    "status=in.(c)",
    "status=in.()",
    "status=neq.a",
    "status=not.eq.b",
    "status=like.a%",
    "status=is.null",
    "id=eq.1",
    "id=in.(1,2),status=eq.b",
    "status=in.(a,b,c),id=eq.2",
];

fn filter_case() -> impl Strategy<Value = FilterCase> {
    let statuses = proptest::option::of(proptest::sample::select(vec!["a", "b", "c"]));
    (
        proptest::collection::vec(proptest::collection::vec(proptest::sample::select(SPECS.to_vec()), 1..4), 1..8),
        proptest::collection::vec(
            (0u8..3, statuses.clone(), statuses, proptest::sample::select(vec!["1", "2", "3"])),
            1..12,
        ),
    )
        .prop_map(|(subs, changes)| FilterCase { subs, changes })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// The filter index delivers exactly what evaluating every binding
    /// would: the same subscribers, the same binding ids, for inserts,
    /// updates (the old and new values) and deletes.
    #[test]
    fn the_filter_index_delivers_exactly_what_every_binding_says(case in filter_case()) {
        let mut f = Fixture::new();
        let mut subs = Vec::new();
        for (conn, specs) in case.subs.iter().enumerate() {
            subs.push(join_filtered(&mut f, conn as u64, specs));
        }
        for (op, old, new, id) in case.changes {
            let (op, record, old_record) = match op {
                0 => (Op::Insert, Some(order_row(id, new)), None),
                1 => (Op::Update, Some(order_row(id, new)), Some(order_row(id, old))),
                _ => (Op::Delete, None, Some(order_row(id, old))),
            };
            let change = Change { relation: Arc::clone(&f.orders), op, record, old_record, missing_toast: vec![] };
            let event = EventType::of(op).unwrap();
            let row = if op == Op::Delete { change.old_record.as_ref() } else { change.record.as_ref() };
            let expected: Vec<Vec<Vec<u64>>> = subs
                .iter()
                .map(|(_, bindings)| {
                    let mut ids: Vec<u64> = bindings
                        .iter()
                        .filter(|b| b.wants(&change.relation, event, row))
                        .map(|b| u64::from(b.id))
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    if ids.is_empty() { vec![] } else { vec![ids] }
                })
                .collect();
            f.commit(vec![change]);
            let got: Vec<Vec<Vec<u64>>> = subs.iter().map(|(o, _)| frame_ids(&drain(o))).collect();
            prop_assert_eq!(got, expected);
        }
    }
}
