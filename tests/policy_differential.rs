//! The hub's audience against PostgreSQL's own Row Level Security.
//!
//! A randomized workload (orders inserted, updated, moved between
//! dealerships and deleted; memberships granted, revoked, re-roled and moved;
//! several operations per transaction) runs through the real pipeline
//! (replication → change stage → membership cache → hub). After each commit,
//! for every change and every user, PostgreSQL decides which side of the
//! change the user may see *as of that commit*: the new row through the
//! table's RLS (`SET ROLE authenticated` + claims), the old row by evaluating
//! the table's own SELECT policy expression (from `pg_policies`) on the old
//! values as that user. The expected event (INSERT/UPDATE/DELETE after
//! visibility transitions) must equal what the hub queued for that user:
//! 0 leaks, 0 misses.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::hub::{Binding, Control, EventMatch, Outbox, OutboxLimits, Subscription, Vsn};
use walcast::policy::{Filter, Viewer};
use walcast::relay::{Relay, RelayConfig};
use walcast::replication::{SlotOptions, SourceConfig};

use crate::support::{add_member, create_dealership, create_order, create_user, migrated_db, query_as, Who};

/// Tiny deterministic PRNG (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// One change the workload made, as the test knows it.
#[derive(Debug, Clone)]
struct Made {
    table: &'static str,
    op: &'static str,
    id: Uuid,
    /// The old row's values (UPDATE, DELETE), for evaluating the policy.
    old_dealership: Option<Uuid>,
}

pub(crate) struct Subscriber {
    pub(crate) user: Option<Uuid>,
    pub(crate) outbox: Arc<Outbox>,
}

pub(crate) fn subscription(conn: u64, viewer: Viewer, outbox: &Arc<Outbox>, live: &str) -> Subscription {
    let binding = |id, table: &str| Binding {
        id,
        schema: Some("public".into()),
        table: Some(table.into()),
        event: EventMatch::All,
        filter: Filter::default(),
        select: None,
    };
    Subscription {
        conn,
        topic: "realtime:differential".into(),
        vsn: Vsn::V2,
        viewer,
        bindings: vec![binding(1, "orders"), binding(2, "dealer_memberships")],
        outbox: Arc::clone(outbox),
        on_live: Some(Bytes::from(format!(r#"["1",null,"realtime:differential","system",{{"message":"{live}"}}]"#))),
        on_withheld: None,
    }
}

/// `(table, id) → event type` delivered in `frames` (each frame one change).
pub(crate) fn parse_frames(frames: &[Bytes]) -> Vec<(String, Uuid, String)> {
    frames
        .iter()
        .filter_map(|f| {
            let v: serde_json::Value = serde_json::from_slice(f).expect("frame is JSON");
            if v[3] != "postgres_changes" {
                return None;
            }
            let data = &v[4]["data"];
            let row = if data["type"] == "DELETE" { &data["old_record"] } else { &data["record"] };
            let id = Uuid::parse_str(row["id"].as_str().expect("id")).unwrap();
            Some((data["table"].as_str().unwrap().to_owned(), id, data["type"].as_str().unwrap().to_owned()))
        })
        .collect()
}

/// Whether `user` may see the current row `id` of `table`, through RLS.
async fn sees_current(client: &mut Client, user: Uuid, table: &str, id: Uuid) -> bool {
    let sql = format!("select 1 from public.{table} where id = $1");
    !query_as(client, Who::User(user), &sql, &[&id]).await.unwrap().is_empty()
}

/// Whether `user` may see a row of `table` with this dealership, by the
/// table's own SELECT policy expression, evaluated as the user.
async fn sees_values(
    client: &mut Client,
    quals: &HashMap<String, String>,
    user: Uuid,
    table: &str,
    dealership: Uuid,
) -> bool {
    let sql = format!("select exists (select 1 from (select $1::uuid as dealership_id) r where {})", quals[table]);
    query_as(client, Who::User(user), &sql, &[&dealership]).await.unwrap()[0].get(0)
}

fn transition(op: &str, old: bool, new: bool) -> Option<&'static str> {
    match (op, old, new) {
        ("INSERT", _, true) => Some("INSERT"),
        ("DELETE", true, _) => Some("DELETE"),
        ("UPDATE", true, true) => Some("UPDATE"),
        ("UPDATE", false, true) => Some("INSERT"),
        ("UPDATE", true, false) => Some("DELETE"),
        _ => None,
    }
}

pub(crate) async fn start_relay(url: &str, slot: &str) -> Relay {
    start_relay_with(url, slot, |_| {}).await
}

/// As [`start_relay`], with the config adjusted first.
pub(crate) async fn start_relay_with(url: &str, slot: &str, adjust: impl FnOnce(&mut RelayConfig)) -> Relay {
    let source =
        SourceConfig::new(tokio_postgres::Config::from_str(url).unwrap(), SlotOptions::new(slot, "supabase_realtime"));
    let mut config = RelayConfig::new(source);
    adjust(&mut config);
    Relay::start(config).await.expect("relay starts")
}

pub(crate) async fn wait_for_frames(outbox: &Outbox, want: usize, got: &mut Vec<Bytes>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < want {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {} of {want} frames", got.len());
        outbox.try_drain(got);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn hub_audience_equals_postgres_rls_for_a_random_workload() {
    let seed: u64 = std::env::var("WALCAST_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_2026);
    let transactions: usize = std::env::var("WALCAST_DIFF_TXS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    let mut rng = Rng(seed);
    let (db, mut client) = migrated_db().await;
    let quals: HashMap<String, String> = client
        .query("select tablename::text, qual from pg_policies where schemaname = 'public' and cmd = 'SELECT' and tablename in ('orders', 'dealer_memberships')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(quals.len(), 2, "one SELECT policy per table: {quals:?}");

    let mut dealerships = Vec::new();
    for i in 0..4 {
        dealerships.push(create_dealership(&client, &format!("DIFF{i}")).await);
    }
    let mut users = Vec::new();
    for i in 0..24 {
        users.push(create_user(&client, &format!("diff{i}@example.com")).await);
    }
    // memberships: (user, dealership) → membership id
    let mut members: BTreeMap<(Uuid, Uuid), Uuid> = BTreeMap::new();
    for &u in &users {
        for &d in &dealerships {
            if rng.below(3) == 0 {
                add_member(&client, u, d, "user").await;
            }
        }
    }
    for r in client.query("select user_id, dealership_id, id from public.dealer_memberships", &[]).await.unwrap() {
        members.insert((r.get(0), r.get(1)), r.get(2));
    }
    let mut orders: BTreeMap<Uuid, Uuid> = BTreeMap::new(); // order → dealership
    for _ in 0..12 {
        let d = rng.pick(&dealerships);
        orders.insert(create_order(&client, d, users[0], "sales", "pending").await, d);
    }

    let relay = start_relay(db.url(), &format!("{}_s", db.name())).await;
    let mut subscribers = Vec::new();
    let limits = OutboxLimits::default();
    for (i, &u) in users.iter().enumerate() {
        let outbox = Arc::new(Outbox::new(limits));
        relay.hub.send(Control::Join(subscription(i as u64, Viewer::user(u), &outbox, "live"))).await.unwrap();
        subscribers.push(Subscriber { user: Some(u), outbox });
    }
    let service = Arc::new(Outbox::new(limits));
    relay.hub.send(Control::Join(subscription(1000, Viewer::service(), &service, "live"))).await.unwrap();
    let anon = Arc::new(Outbox::new(limits));
    relay.hub.send(Control::Join(subscription(1001, Viewer::anon(), &anon, "live"))).await.unwrap();
    let mut service_frames = Vec::new();
    wait_for_frames(&service, 1, &mut service_frames).await;
    for s in &subscribers {
        let mut live = Vec::new();
        wait_for_frames(&s.outbox, 1, &mut live).await;
    }
    service_frames.clear();

    let (mut checked, mut leaks, mut misses, mut delivered) = (0usize, 0usize, 0usize, 0usize);
    let mut service_total = 0usize;
    for t in 0..transactions {
        let tx = client.transaction().await.unwrap();
        let mut made: Vec<Made> = Vec::new();
        let mut touched = std::collections::HashSet::new();
        for _ in 0..1 + rng.below(4) {
            match rng.below(8) {
                0 | 1 => {
                    let d = rng.pick(&dealerships);
                    let id: Uuid = tx
                        .query_one(
                            "insert into public.orders (dealership_id, type, status, customer_info, created_by) \
                             values ($1, 'service', 'pending', '{\"n\": 1}', $2) returning id",
                            &[&d, &users[0]],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    orders.insert(id, d);
                    touched.insert(id);
                    made.push(Made { table: "orders", op: "INSERT", id, old_dealership: None });
                }
                2 | 3 if !orders.is_empty() => {
                    let ids: Vec<Uuid> = orders.keys().copied().filter(|id| !touched.contains(id)).collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let id = rng.pick(&ids);
                    let old = orders[&id];
                    let new = if rng.below(2) == 0 { rng.pick(&dealerships) } else { old };
                    let status = rng.pick(&["pending", "in_progress", "completed", "cancelled"]);
                    tx.execute(
                        "update public.orders set dealership_id = $2, status = $3 where id = $1",
                        &[&id, &new, &status],
                    )
                    .await
                    .unwrap();
                    orders.insert(id, new);
                    touched.insert(id);
                    made.push(Made { table: "orders", op: "UPDATE", id, old_dealership: Some(old) });
                }
                4 if orders.len() > 3 => {
                    let ids: Vec<Uuid> = orders.keys().copied().filter(|id| !touched.contains(id)).collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let id = rng.pick(&ids);
                    tx.execute("delete from public.orders where id = $1", &[&id]).await.unwrap();
                    let old = orders.remove(&id);
                    touched.insert(id);
                    made.push(Made { table: "orders", op: "DELETE", id, old_dealership: old });
                }
                5 => {
                    let (u, d) = (rng.pick(&users), rng.pick(&dealerships));
                    if members.contains_key(&(u, d)) {
                        continue;
                    }
                    let id: Uuid = tx
                        .query_one(
                            "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user') returning id",
                            &[&u, &d],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    members.insert((u, d), id);
                    touched.insert(id);
                    made.push(Made { table: "dealer_memberships", op: "INSERT", id, old_dealership: None });
                }
                6 if !members.is_empty() => {
                    let keys: Vec<(Uuid, Uuid)> =
                        members.iter().filter(|(_, id)| !touched.contains(*id)).map(|(k, _)| *k).collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let (u, d) = rng.pick(&keys);
                    let id = members.remove(&(u, d)).unwrap();
                    tx.execute("delete from public.dealer_memberships where id = $1", &[&id]).await.unwrap();
                    touched.insert(id);
                    made.push(Made { table: "dealer_memberships", op: "DELETE", id, old_dealership: Some(d) });
                }
                _ if !members.is_empty() => {
                    // Re-role, or move the membership to another dealership.
                    let keys: Vec<(Uuid, Uuid)> =
                        members.iter().filter(|(_, id)| !touched.contains(*id)).map(|(k, _)| *k).collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let (u, d) = rng.pick(&keys);
                    let to = rng.pick(&dealerships);
                    if to != d && members.contains_key(&(u, to)) {
                        continue;
                    }
                    let id = members.remove(&(u, d)).unwrap();
                    let role = rng.pick(&["admin", "manager", "user"]);
                    tx.execute(
                        "update public.dealer_memberships set dealership_id = $2, role = $3 where id = $1",
                        &[&id, &to, &role],
                    )
                    .await
                    .unwrap();
                    members.insert((u, to), id);
                    touched.insert(id);
                    made.push(Made { table: "dealer_memberships", op: "UPDATE", id, old_dealership: Some(d) });
                }
                _ => {}
            }
        }
        tx.commit().await.unwrap();
        if made.is_empty() {
            continue;
        }
        // service_role sees every change as made; once it has them all, the
        // hub has queued the whole transaction for everyone.
        wait_for_frames(&service, made.len(), &mut service_frames).await;
        let got = parse_frames(&service_frames);
        let want: Vec<(String, Uuid, String)> =
            made.iter().map(|m| (m.table.to_owned(), m.id, m.op.to_owned())).collect();
        assert_eq!(got, want, "transaction {t}: service_role sees every change in order");
        service_total += got.len();
        service_frames.clear();

        for s in &subscribers {
            let user = s.user.unwrap();
            let mut frames = Vec::new();
            s.outbox.try_drain(&mut frames);
            let got = parse_frames(&frames);
            let mut expected = Vec::new();
            for m in &made {
                let new = m.op != "DELETE" && sees_current(&mut client, user, m.table, m.id).await;
                let old = match (m.op, m.old_dealership) {
                    ("INSERT", _) | (_, None) => false,
                    (_, Some(d)) => sees_values(&mut client, &quals, user, m.table, d).await,
                };
                if let Some(event) = transition(m.op, old, new) {
                    expected.push((m.table.to_owned(), m.id, event.to_owned()));
                }
                checked += 1;
            }
            delivered += got.len();
            for g in &got {
                if !expected.contains(g) {
                    leaks += 1;
                    eprintln!("LEAK tx {t}: user {user} got {g:?}; expected {expected:?}");
                }
            }
            for e in &expected {
                if !got.contains(e) {
                    misses += 1;
                    eprintln!("MISS tx {t}: user {user} did not get {e:?}; got {got:?}");
                }
            }
            if leaks == 0 && misses == 0 {
                assert_eq!(got, expected, "tx {t}: user {user}: same events in commit order");
            }
        }
    }
    let mut anon_frames = Vec::new();
    anon.try_drain(&mut anon_frames);
    let anon_changes = parse_frames(&anon_frames).len();
    println!(
        "differential (seed {seed:#x}, {transactions} transactions): {service_total} changes × {} users = {checked} \
         (change, user) pairs checked against PostgreSQL RLS; {delivered} deliveries; leaks {leaks}; misses {misses}; \
         anon deliveries {anon_changes}",
        subscribers.len()
    );
    assert_eq!((leaks, misses, anon_changes), (0, 0, 0));
    relay.stop().await.unwrap();
}
