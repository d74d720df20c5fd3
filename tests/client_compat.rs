//! Compatibility proven with the real clients: supabase-js 2.119.1 (vsn 2.0.0
//! and 1.0.0), @supabase/realtime-js 2.80.0 and Python `realtime` 2.34.1,
//! driven through `tests/clients` against a walcast server on a scratch
//! database. Every subscription waits for "Subscribed to PostgreSQL" before
//! writing (as apps should); every driver ends with no error event (no
//! binding mismatch, no rejected frame) and the expected statuses.
//!
//! "Nothing arrives" is checked after a witness (a service_role or entitled
//! client) has received a later change, plus a short quiet period.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::clients::{any_change, is_change, quiet_period, Driver, Kind};
use crate::support::server::{anon, token, user, TestServer};
use crate::support::{add_member, create_dealership, create_order, create_user};

/// The filter of the second orders binding.
const SERVICE_ONLY: &str = "type=eq.service";

fn orders(filter: Option<&str>) -> Value {
    let mut binding = json!({"event": "*", "schema": "public", "table": "orders"});
    if let Some(filter) = filter {
        binding["filter"] = json!(filter);
    }
    binding
}

fn memberships() -> Value {
    json!({"event": "*", "schema": "public", "table": "dealer_memberships"})
}

fn service_key() -> String {
    token("service_role", None, 3600)
}

/// A server, its URL, and a small world: `member` belongs to `north`;
/// `stranger` is a user without memberships; `south` has no members.
struct World {
    t: TestServer,
    url: String,
    owner: Uuid,
    member: Uuid,
    stranger: Uuid,
    north: Uuid,
    south: Uuid,
}

impl World {
    async fn new() -> World {
        let t = TestServer::start().await;
        // `to_jsonb` of timestamptz in UTC, as walcast's walsender session renders values.
        t.client.batch_execute("set timezone = 'UTC'").await.unwrap();
        let owner = create_user(&t.client, "owner@example.com").await;
        let member = create_user(&t.client, "member@example.com").await;
        let stranger = create_user(&t.client, "stranger@example.com").await;
        let north = create_dealership(&t.client, "NORTH").await;
        let south = create_dealership(&t.client, "SOUTH").await;
        add_member(&t.client, owner, north, "admin").await;
        add_member(&t.client, member, north, "user").await;
        let url = format!("http://{}", t.addr());
        World { t, url, owner, member, stranger, north, south }
    }

    async fn driver(&self, name: &str, kind: Kind, key: &str) -> Driver {
        Driver::start(name, kind, &self.url, key).await
    }

    /// The order row as PostgreSQL's `to_jsonb` renders it.
    async fn order(&self, id: Uuid) -> Value {
        self.t.client.query_one("select to_jsonb(o) from public.orders o where id = $1", &[&id]).await.unwrap().get(0)
    }

    async fn order_in(&self, dealership: Uuid, kind: &str) -> (Uuid, Value) {
        let id = create_order(&self.t.client, dealership, self.owner, kind, "pending").await;
        (id, self.order(id).await)
    }

    async fn set_status(&self, id: Uuid, status: &str) -> Value {
        self.t.client.execute("update public.orders set status = $2 where id = $1", &[&id, &status]).await.unwrap();
        self.order(id).await
    }

    async fn delete_order(&self, id: Uuid) {
        self.t.client.execute("delete from public.orders where id = $1", &[&id]).await.unwrap();
    }

    async fn membership(&self, user: Uuid, dealership: Uuid) -> Value {
        self.t
            .client
            .query_one(
                "select to_jsonb(m) from public.dealer_memberships m where user_id = $1 and dealership_id = $2",
                &[&user, &dealership],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn remove_member(&self, user: Uuid, dealership: Uuid) {
        self.t
            .client
            .execute(
                "delete from public.dealer_memberships where user_id = $1 and dealership_id = $2",
                &[&user, &dealership],
            )
            .await
            .unwrap();
    }

    async fn stop(self) {
        self.t.server.shutdown().await.unwrap();
    }
}

// ------------------------------------------------------------------ payloads

/// The event type and row id of a change payload, in either client's shape.
fn summary(kind: Kind, payload: &Value) -> (String, Value) {
    let (event, new, old) = match kind {
        Kind::Python => (&payload["data"]["type"], &payload["data"]["record"], &payload["data"]["old_record"]),
        _ => (&payload["eventType"], &payload["new"], &payload["old"]),
    };
    let id = if new["id"].is_null() { old["id"].clone() } else { new["id"].clone() };
    (event.as_str().unwrap_or("?").to_owned(), id)
}

fn check_commit_timestamp(ts: &Value, context: &Value) {
    let ts = ts.as_str().unwrap_or_else(|| panic!("commit_timestamp is a string: {context}"));
    let b = ts.as_bytes();
    assert!(
        ts.len() == 24 && ts.ends_with('Z') && b[10] == b'T' && b[19] == b'.',
        "commit_timestamp YYYY-MM-DDTHH:MM:SS.mmmZ: {ts}"
    );
}

/// Waits for the `event` of row `id` on `channel`/`binding` and checks the
/// whole payload: `new`/`old` equal to the rows given (absent = `{}` in JS,
/// no key in Python's raw data), plus schema, table, commit_timestamp, errors.
#[allow(clippy::too_many_arguments)]
async fn expect_row(
    d: &mut Driver,
    channel: &str,
    binding: usize,
    table: &str,
    event: &str,
    id: Uuid,
    new: Option<&Value>,
    old: Option<&Value>,
) -> Value {
    let kind = d.kind;
    let want = (event.to_owned(), json!(id));
    let payload =
        d.expect_change(channel, binding, &format!("{event} of {table} {id}"), |p| summary(kind, p) == want).await;
    match kind {
        Kind::Python => {
            let data = &payload["data"];
            assert_eq!(data["schema"], "public", "{payload}");
            assert_eq!(data["table"], table, "{payload}");
            assert_eq!(data["errors"], Value::Null, "{payload}");
            check_commit_timestamp(&data["commit_timestamp"], &payload);
            assert_eq!(data.get("record"), new, "record of {payload}");
            assert_eq!(data.get("old_record"), old, "old_record of {payload}");
            let columns = data["columns"].as_array().unwrap_or_else(|| panic!("columns: {payload}"));
            assert!(columns.iter().any(|c| c == &json!({"name": "id", "type": "uuid"})), "{payload}");
            let ids = payload["ids"].as_array().unwrap_or_else(|| panic!("ids: {payload}"));
            assert!(!ids.is_empty() && ids.iter().all(|i| i.as_u64().is_some_and(|i| i > 0)), "{payload}");
        }
        _ => {
            let want = json!({
                "schema": "public",
                "table": table,
                "commit_timestamp": payload["commit_timestamp"],
                "eventType": event,
                "new": new.cloned().unwrap_or_else(|| json!({})),
                "old": old.cloned().unwrap_or_else(|| json!({})),
                "errors": null,
            });
            assert_eq!(payload, want, "the callback payload");
            check_commit_timestamp(&payload["commit_timestamp"], &payload);
        }
    }
    payload
}

/// (event, row id) of every change of `channel`/`binding` since `mark`, in order.
fn received(d: &mut Driver, mark: usize, channel: &str, binding: usize) -> Vec<(String, Value)> {
    let kind = d.kind;
    d.since(mark, |e| is_change(e, channel, Some(binding))).iter().map(|e| summary(kind, &e["payload"])).collect()
}

fn ev(event: &str, id: Uuid) -> (String, Value) {
    (event.to_owned(), json!(id))
}

// ------------------------------------------------------------------ rounds

/// INSERT, UPDATE and DELETE of a sales and a service order in `north`, then
/// an order in `south`. `subject` listens on `channel` as a member of north
/// with bindings [all orders, `type=eq.service`]; `witness` on "witness" with
/// [all orders] as service_role; `outsiders` must get nothing at all.
async fn crud_round(
    w: &World,
    subject: &mut Driver,
    channel: &str,
    witness: &mut Driver,
    outsiders: &mut [&mut Driver],
) {
    let mark = subject.mark();
    let witness_mark = witness.mark();
    let outsider_marks: Vec<usize> = outsiders.iter().map(|d| d.mark()).collect();

    let (sales, sales0) = w.order_in(w.north, "sales").await;
    expect_row(subject, channel, 0, "orders", "INSERT", sales, Some(&sales0), None).await;
    let (service, service0) = w.order_in(w.north, "service").await;
    expect_row(subject, channel, 0, "orders", "INSERT", service, Some(&service0), None).await;
    expect_row(subject, channel, 1, "orders", "INSERT", service, Some(&service0), None).await;

    // UPDATE: old is the full old row (REPLICA IDENTITY FULL).
    let sales1 = w.set_status(sales, "in_progress").await;
    let service1 = w.set_status(service, "completed").await;
    expect_row(subject, channel, 0, "orders", "UPDATE", sales, Some(&sales1), Some(&sales0)).await;
    expect_row(subject, channel, 0, "orders", "UPDATE", service, Some(&service1), Some(&service0)).await;
    expect_row(subject, channel, 1, "orders", "UPDATE", service, Some(&service1), Some(&service0)).await;

    // DELETE: only old, the full row.
    w.delete_order(sales).await;
    w.delete_order(service).await;
    expect_row(subject, channel, 0, "orders", "DELETE", sales, None, Some(&sales1)).await;
    expect_row(subject, channel, 0, "orders", "DELETE", service, None, Some(&service1)).await;
    expect_row(subject, channel, 1, "orders", "DELETE", service, None, Some(&service1)).await;

    // Another dealership's order: the witness sees it, the member does not.
    let (south, south0) = w.order_in(w.south, "service").await;
    expect_row(witness, "witness", 0, "orders", "INSERT", south, Some(&south0), None).await;
    quiet_period().await;

    let all = vec![
        ev("INSERT", sales),
        ev("INSERT", service),
        ev("UPDATE", sales),
        ev("UPDATE", service),
        ev("DELETE", sales),
        ev("DELETE", service),
    ];
    let only_service = vec![ev("INSERT", service), ev("UPDATE", service), ev("DELETE", service)];
    assert_eq!(received(subject, mark, channel, 0), all, "{}: unfiltered binding", subject.name);
    assert_eq!(received(subject, mark, channel, 1), only_service, "{}: filtered binding", subject.name);
    let mut witnessed = all.clone();
    witnessed.push(ev("INSERT", south));
    assert_eq!(received(witness, witness_mark, "witness", 0), witnessed, "{}", witness.name);
    for (d, m) in outsiders.iter_mut().zip(outsider_marks) {
        d.assert_none_since(m, "change (not entitled)", any_change);
    }
}

// ------------------------------------------------------------------ scenarios

/// Scenario 1 (and 6): supabase-js with `vsn`.
async fn supabase_js_changes(vsn: &'static str) {
    let w = World::new().await;
    let kind = Kind::SupabaseJs(vsn);
    let (anon_key, service) = (anon(), service_key());
    let (mut member, mut stranger, mut witness) = tokio::join!(
        w.driver("member", kind, &anon_key),
        w.driver("stranger", kind, &anon_key),
        w.driver("witness", kind, &service),
    );
    assert_eq!(member.version(), "2.119.1");
    assert_eq!(member.ready["vsn"], vsn);

    let bindings = json!([orders(None), orders(Some(SERVICE_ONLY))]);
    member.subscribe("orders", bindings.clone(), Some(&user(w.member))).await;
    member.subscribe("memberships", json!([memberships()]), None).await;
    stranger.subscribe("orders", bindings, Some(&user(w.stranger))).await;
    stranger.subscribe("memberships", json!([memberships()]), None).await;
    witness.subscribe("witness", json!([orders(None), memberships()]), None).await;

    crud_round(&w, &mut member, "orders", &mut witness, &mut [&mut stranger]).await;

    // A membership for the member (in a dealership they could not see before) arrives;
    // the stranger sees none of it.
    let (member_mark, stranger_mark) = (member.mark(), stranger.mark());
    add_member(&w.t.client, w.member, w.south, "manager").await;
    let row = w.membership(w.member, w.south).await;
    let id: Uuid = row["id"].as_str().unwrap().parse().unwrap();
    expect_row(&mut witness, "witness", 1, "dealer_memberships", "INSERT", id, Some(&row), None).await;
    expect_row(&mut member, "memberships", 0, "dealer_memberships", "INSERT", id, Some(&row), None).await;
    quiet_period().await;
    assert_eq!(received(&mut member, member_mark, "memberships", 0), vec![ev("INSERT", id)]);
    assert_eq!(received(&mut member, member_mark, "orders", 0), vec![]);
    stranger.assert_none_since(stranger_mark, "change (not entitled)", any_change);

    for d in [&mut member, &mut stranger] {
        d.assert_clean();
        assert_eq!(d.statuses("orders"), ["SUBSCRIBED"], "{}", d.name);
        assert_eq!(d.statuses("memberships"), ["SUBSCRIBED"], "{}", d.name);
    }
    witness.assert_clean();
    assert_eq!(witness.statuses("witness"), ["SUBSCRIBED"]);
    drop((member, stranger, witness));
    w.stop().await;
}

#[tokio::test]
async fn supabase_js_vsn2_changes_reach_the_callbacks() {
    supabase_js_changes("2.0.0").await;
}

#[tokio::test]
async fn supabase_js_vsn1_changes_reach_the_callbacks() {
    supabase_js_changes("1.0.0").await;
}

/// Scenario 2: a token set after the join (supabase-js's accessToken
/// callback; realtime-js 2.80's sticky `setAuth`) upgrades an anonymous
/// channel; memberships granted and revoked in the database while subscribed
/// start and stop the flow.
#[tokio::test]
async fn token_refresh_and_membership_changes_while_subscribed() {
    let w = World::new().await;
    let newbie = create_user(&w.t.client, "newbie@example.com").await;
    let (anon_key, service) = (anon(), service_key());
    let (mut js, mut old, mut newcomer, mut witness) = tokio::join!(
        w.driver("anon-then-member", Kind::SupabaseJs("2.0.0"), &anon_key),
        w.driver("anon-then-member", Kind::RealtimeJsOld, &anon_key),
        w.driver("newbie", Kind::SupabaseJs("2.0.0"), &anon_key),
        w.driver("witness", Kind::SupabaseJs("2.0.0"), &service),
    );
    let feed = json!([orders(None)]);
    js.subscribe("orders", feed.clone(), None).await;
    old.subscribe("orders", feed.clone(), None).await;
    newcomer.subscribe("orders", feed.clone(), Some(&user(newbie))).await;
    witness.subscribe("witness", feed, None).await;

    // Anonymous and membership-less: nothing.
    let marks = (js.mark(), old.mark(), newcomer.mark());
    let (o1, row1) = w.order_in(w.north, "sales").await;
    expect_row(&mut witness, "witness", 0, "orders", "INSERT", o1, Some(&row1), None).await;
    quiet_period().await;
    js.assert_none_since(marks.0, "change as anon", any_change);
    old.assert_none_since(marks.1, "change as anon", any_change);
    newcomer.assert_none_since(marks.2, "change without membership", any_change);

    // setAuth(member): the client pushes access_token; the server confirms with a
    // fresh "Subscribed to PostgreSQL"; a heartbeat (which re-reads the supabase-js
    // token callback) keeps the token.
    for d in [&mut js, &mut old] {
        d.set_auth(&user(w.member)).await;
        d.expect_postgres_ready("orders").await;
        d.command(json!({"cmd": "heartbeat"})).await;
    }
    let (o2, row2) = w.order_in(w.north, "service").await;
    for d in [&mut js, &mut old] {
        expect_row(d, "orders", 0, "orders", "INSERT", o2, Some(&row2), None).await;
    }

    // A membership granted while subscribed: later orders arrive.
    add_member(&w.t.client, newbie, w.north, "user").await;
    let (o3, row3) = w.order_in(w.north, "sales").await;
    for d in [&mut newcomer, &mut js, &mut old] {
        expect_row(d, "orders", 0, "orders", "INSERT", o3, Some(&row3), None).await;
    }
    let row3b = w.set_status(o3, "completed").await;
    expect_row(&mut newcomer, "orders", 0, "orders", "UPDATE", o3, Some(&row3b), Some(&row3)).await;

    // Revoked: they stop (the member's clients, as a witness, still get them).
    w.remove_member(newbie, w.north).await;
    let mark = newcomer.mark();
    let (o4, row4) = w.order_in(w.north, "sales").await;
    for d in [&mut js, &mut old, &mut witness] {
        let channel = if d.name.starts_with("witness") { "witness" } else { "orders" };
        expect_row(d, channel, 0, "orders", "INSERT", o4, Some(&row4), None).await;
    }
    quiet_period().await;
    newcomer.assert_none_since(mark, "change after the membership was revoked", any_change);

    for (d, channel) in
        [(&mut js, "orders"), (&mut old, "orders"), (&mut newcomer, "orders"), (&mut witness, "witness")]
    {
        d.assert_clean();
        assert_eq!(d.statuses(channel), ["SUBSCRIBED"], "{}", d.name);
    }
    drop((js, old, newcomer, witness));
    w.stop().await;
}

/// Scenario 3: leave (removeChannel) → CLOSED, leave ok, no more changes;
/// subscribing the same topic again → SUBSCRIBED and changes again.
#[tokio::test]
async fn leave_and_rejoin() {
    let w = World::new().await;
    let (anon_key, service) = (anon(), service_key());
    let (mut js, mut old, mut witness) = tokio::join!(
        w.driver("member", Kind::SupabaseJs("2.0.0"), &anon_key),
        w.driver("member", Kind::RealtimeJsOld, &anon_key),
        w.driver("witness", Kind::SupabaseJs("2.0.0"), &service),
    );
    let feed = json!([orders(None)]);
    witness.subscribe("witness", feed.clone(), None).await;
    for d in [&mut js, &mut old] {
        d.subscribe_topic("first", "orders", feed.clone(), Some(&user(w.member))).await;
    }
    let (o1, row1) = w.order_in(w.north, "sales").await;
    for d in [&mut js, &mut old] {
        expect_row(d, "first", 0, "orders", "INSERT", o1, Some(&row1), None).await;
    }

    for d in [&mut js, &mut old] {
        assert_eq!(d.unsubscribe("first").await, "ok", "{}: leave reply", d.name);
        assert_eq!(d.statuses("first"), ["SUBSCRIBED", "CLOSED"], "{}", d.name);
    }
    let marks = (js.mark(), old.mark());
    let (o2, row2) = w.order_in(w.north, "sales").await;
    expect_row(&mut witness, "witness", 0, "orders", "INSERT", o2, Some(&row2), None).await;
    quiet_period().await;
    js.assert_none_since(marks.0, "change after leaving", any_change);
    old.assert_none_since(marks.1, "change after leaving", any_change);

    for d in [&mut js, &mut old] {
        d.subscribe_topic("again", "orders", feed.clone(), None).await;
    }
    let (o3, row3) = w.order_in(w.north, "service").await;
    for d in [&mut js, &mut old] {
        expect_row(d, "again", 0, "orders", "INSERT", o3, Some(&row3), None).await;
    }
    w.delete_order(o3).await;
    for d in [&mut js, &mut old] {
        expect_row(d, "again", 0, "orders", "DELETE", o3, None, Some(&row3)).await;
        d.assert_clean();
        assert_eq!(d.statuses("first"), ["SUBSCRIBED", "CLOSED"], "{}", d.name);
        assert_eq!(d.statuses("again"), ["SUBSCRIBED"], "{}", d.name);
    }
    witness.assert_clean();
    drop((js, old, witness));
    w.stop().await;
}

/// Scenario 4: realtime-js 2.80 (vsn 1.0.0, strict binding comparison):
/// an unfiltered and a filtered binding, INSERT/UPDATE/DELETE.
#[tokio::test]
async fn realtime_js_2_80_with_a_filter() {
    let w = World::new().await;
    let (anon_key, service) = (anon(), service_key());
    let (mut old, mut stranger, mut witness) = tokio::join!(
        w.driver("member", Kind::RealtimeJsOld, &anon_key),
        w.driver("stranger", Kind::RealtimeJsOld, &anon_key),
        w.driver("witness", Kind::RealtimeJsOld, &service),
    );
    assert_eq!(old.version(), "2.80.0");
    let bindings = json!([orders(None), orders(Some(SERVICE_ONLY))]);
    old.subscribe("orders", bindings.clone(), Some(&user(w.member))).await;
    stranger.subscribe("orders", bindings, Some(&user(w.stranger))).await;
    witness.subscribe("witness", json!([orders(None)]), None).await;

    crud_round(&w, &mut old, "orders", &mut witness, &mut [&mut stranger]).await;

    for d in [&mut old, &mut stranger] {
        d.assert_clean();
        assert_eq!(d.statuses("orders"), ["SUBSCRIBED"], "{}", d.name);
    }
    witness.assert_clean();
    drop((old, stranger, witness));
    w.stop().await;
}

/// Scenario 5: Python `realtime` (vsn 1.0.0, pydantic-validated frames):
/// raw `{ids, data}` payloads for INSERT/UPDATE/DELETE, with and without a
/// filter; a stranger gets nothing.
#[tokio::test]
async fn python_realtime_receives_changes() {
    let w = World::new().await;
    let (anon_key, service) = (anon(), service_key());
    let (mut py, mut stranger, mut witness) = tokio::join!(
        w.driver("member", Kind::Python, &anon_key),
        w.driver("stranger", Kind::Python, &anon_key),
        w.driver("witness", Kind::SupabaseJs("2.0.0"), &service),
    );
    assert_eq!(py.version(), "2.34.1");
    let bindings = json!([orders(None), orders(Some(SERVICE_ONLY))]);
    py.subscribe("orders", bindings.clone(), Some(&user(w.member))).await;
    stranger.subscribe("orders", bindings, Some(&user(w.stranger))).await;
    witness.subscribe("witness", json!([orders(None)]), None).await;

    crud_round(&w, &mut py, "orders", &mut witness, &mut [&mut stranger]).await;

    for d in [&mut py, &mut stranger] {
        d.assert_clean();
        assert_eq!(d.statuses("orders"), ["SUBSCRIBED"], "{}", d.name);
    }
    witness.assert_clean();
    drop((py, stranger, witness));
    w.stop().await;
}
