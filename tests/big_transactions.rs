//! Big transactions end to end (real PostgreSQL, walcast's server, raw
//! Phoenix clients): judged whole at commit whatever their size, delivered in
//! full to readers that keep reading, a staller closed with its reason, and
//! never delivered twice across walsender terminations.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use walcast::hub::Vsn;

use crate::support::relay::{try_get, RelayProcess};
use crate::support::server::{anon, user, TestServer, Ws};
use crate::support::{add_member, create_dealership, create_order, create_user};

fn orders() -> Value {
    json!([{"event": "*", "schema": "public", "table": "orders"}])
}

/// `n` orders in `dealership` with explicit numbers (bulk set-up).
async fn bulk_orders(client: &Client, dealership: Uuid, creator: Uuid, prefix: &str, n: i32) {
    client
        .execute(
            "insert into public.orders (dealership_id, order_number, type, status, customer_info, created_by) \
             select $1, $2 || '-' || g, 'sales', 'pending', '{\"name\": \"bulk\"}', $3 \
             from generate_series(1, $4) g",
            &[&dealership, &prefix, &creator, &n],
        )
        .await
        .expect("bulk orders");
}

/// A socket of `who` subscribed to every order change on `topic`.
async fn subscribed(t: &TestServer, who: Uuid, topic: &str) -> Ws {
    let mut ws = t.connect(&anon(), Vsn::V2).await;
    ws.subscribe(topic, orders(), Some(&user(who))).await;
    ws
}

/// How long these tests wait for the next frame (a debug build judging a
/// 45,000-row transaction on 2 busy cores can be silent for a while).
const FRAME_WAIT: Duration = Duration::from_secs(120);

/// The next frame's text, `None` once the socket closed.
async fn next_text(ws: &mut Ws) -> Option<String> {
    use futures::StreamExt;
    loop {
        match tokio::time::timeout(FRAME_WAIT, ws.ws.next()).await.expect("a frame within the wait") {
            Some(Ok(Message::Text(text))) => return Some(text.as_str().to_owned()),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// postgres_changes payloads up to (not including) the change of order
/// `sentinel`; panics if the socket closes first.
async fn changes_until(ws: &mut Ws, sentinel: Uuid) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let text = next_text(ws).await.expect("socket open");
        let frame = ws.decode(&text);
        if frame.event != "postgres_changes" {
            continue;
        }
        let data = frame.payload["data"].clone();
        let row = if data["type"] == "DELETE" { &data["old_record"] } else { &data["record"] };
        if row["id"] == json!(sentinel) {
            return got;
        }
        got.push(data);
    }
}

/// Creates an order in `dealership` and reads every socket up to its
/// INSERT: whatever was committed before (bulk set-up) is behind them.
async fn settle(client: &Client, dealership: Uuid, creator: Uuid, sockets: &mut [&mut Ws]) {
    let sentinel = create_order(client, dealership, creator, "sales", "pending").await;
    for ws in sockets {
        changes_until(ws, sentinel).await;
    }
}

/// The leak repro's transaction: a bulk update of `bulk_dealership`, then a
/// secret written into `order`, then `revoked` loses and `granted` gains
/// `dealership` — all in one transaction.
async fn revoke_after_bulk(
    client: &mut Client,
    bulk_dealership: Uuid,
    order: Uuid,
    revoked: Uuid,
    granted: Uuid,
    dealership: Uuid,
) {
    let x = client.transaction().await.unwrap();
    x.execute(
        "update public.orders set metadata = jsonb_build_object('pass', random()) where dealership_id = $1",
        &[&bulk_dealership],
    )
    .await
    .unwrap();
    x.execute("update public.orders set customer_info = '{\"secret\": \"s1\"}' where id = $1", &[&order])
        .await
        .unwrap();
    x.execute(
        "delete from public.dealer_memberships where user_id = $1 and dealership_id = $2",
        &[&revoked, &dealership],
    )
    .await
    .unwrap();
    x.execute(
        "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user')",
        &[&granted, &dealership],
    )
    .await
    .unwrap();
    x.commit().await.unwrap();
}

fn about(changes: &[Value], order: Uuid) -> Vec<String> {
    changes
        .iter()
        .filter(|d| d["record"]["id"] == json!(order) || d["old_record"]["id"] == json!(order))
        .map(|d| d["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_membership_change_after_a_bulk_update_applies_to_the_whole_transaction() {
    // Default settings: 45,000 updated rows are far past the hub's 16 MiB
    // memory budget, so the transaction is spilled to disk.
    let t = TestServer::with_config(|c| c.limits.idle_timeout = Duration::from_secs(600)).await;
    let c = &t.client;
    let (d1, d2, dx, seen) = (
        create_dealership(c, "D1").await,
        create_dealership(c, "D2").await,
        create_dealership(c, "DX").await,
        create_dealership(c, "SEEN").await,
    );
    let (a, g) = (create_user(c, "a@example.com").await, create_user(c, "g@example.com").await);
    add_member(c, a, d1, "user").await;
    add_member(c, a, seen, "user").await;
    add_member(c, g, seen, "user").await;
    let o1 = create_order(c, d1, a, "sales", "pending").await;
    let o2 = create_order(c, d2, a, "sales", "pending").await;
    bulk_orders(c, dx, a, "BULK", 45_000).await;
    let mut a_ws = subscribed(&t, a, "realtime:a").await;
    let mut g_ws = subscribed(&t, g, "realtime:g").await;
    settle(c, seen, a, &mut [&mut a_ws, &mut g_ws]).await;
    let bulk = "update public.orders set metadata = jsonb_build_object('pass', random()) where dealership_id = $1";

    // 1. A revoke (and a grant) after the bulk update: A must not get the
    //    secret; G, a member as of the commit, gets the update.
    let mut tx = t.db.server().connect(t.db.name()).await.unwrap();
    revoke_after_bulk(&mut tx, dx, o1, a, g, d1).await;
    let sentinel = create_order(c, seen, a, "sales", "pending").await;
    let a_got = changes_until(&mut a_ws, sentinel).await;
    assert!(a_got.is_empty(), "A, revoked in the same transaction, got {} changes", a_got.len());
    let g_got = changes_until(&mut g_ws, sentinel).await;
    assert_eq!(about(&g_got, o1), ["UPDATE"], "G, granted in the same transaction, sees the update");
    assert_eq!(g_got.len(), 1);
    assert_eq!(g_got[0]["record"]["customer_info"]["secret"], "s1");

    // 2. A grant after the bulk update: A sees the D2 order's update.
    let x = tx.transaction().await.unwrap();
    x.execute(bulk, &[&dx]).await.unwrap();
    x.execute("update public.orders set status = 'in_progress' where id = $1", &[&o2]).await.unwrap();
    x.execute(
        "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, 'user')",
        &[&a, &d2],
    )
    .await
    .unwrap();
    x.commit().await.unwrap();
    let sentinel = create_order(c, seen, a, "sales", "pending").await;
    let a_got = changes_until(&mut a_ws, sentinel).await;
    assert_eq!(about(&a_got, o2), ["UPDATE"], "A, granted D2 in the same transaction, sees its order");
    assert_eq!(a_got.len(), 1);
    assert!(changes_until(&mut g_ws, sentinel).await.is_empty());

    // 3. A dealership move after the bulk update: O1 leaves D1 (G loses it:
    //    DELETE) for D2 (A gains it: INSERT).
    let x = tx.transaction().await.unwrap();
    x.execute(bulk, &[&dx]).await.unwrap();
    x.execute("update public.orders set dealership_id = $2 where id = $1", &[&o1, &d2]).await.unwrap();
    x.commit().await.unwrap();
    let sentinel = create_order(c, seen, a, "sales", "pending").await;
    assert_eq!(about(&changes_until(&mut a_ws, sentinel).await, o1), ["INSERT"]);
    assert_eq!(about(&changes_until(&mut g_ws, sentinel).await, o1), ["DELETE"]);

    let stats = &t.server.relay().hub.stats;
    assert!(stats.spilled_transactions.load(Ordering::Relaxed) >= 3, "the bulk transactions were spilled");
    assert_eq!(stats.slow_consumers.load(Ordering::Relaxed), 0);
}

/// A metric's value from `/metrics` text (unlabelled samples).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// `VmHWM` (peak RSS) of `pid`, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_rows_reach_every_reader_and_a_staller_is_closed_with_the_reason() {
    const ROWS: usize = 20_000;
    const OTHER_ROWS: usize = 100;
    // `walcast serve` as a process (its memory is measured) with an 8 MiB
    // outbox budget, so the staller fills it and is closed after a 10 s
    // pause; readers must still get every row.
    let (db, client) = crate::support::migrated_db().await;
    let c = &client;
    let slot = format!("{}_big", db.name());
    let mut relay = RelayProcess::spawn(db.url(), &slot, &["--outbox-budget", "8388608", "--ws-write-buffer", "4096"]);
    relay.wait_serving().await;
    let addr = relay.addr;
    let (d, other) = (create_dealership(c, "BIG").await, create_dealership(c, "OTHER").await);
    let owner = create_user(c, "owner@example.com").await;
    bulk_orders(c, d, owner, "BIG", ROWS as i32).await;
    bulk_orders(c, other, owner, "OTH", OTHER_ROWS as i32).await;
    let subscribe = |who: Uuid, topic: String| async move {
        let mut ws = Ws::connect(addr, "/realtime/v1/websocket", &anon(), Some(Vsn::V2)).await;
        ws.subscribe(&topic, orders(), Some(&user(who))).await;
        ws
    };
    let mut readers = Vec::new();
    for i in 0..8 {
        let u = create_user(c, &format!("reader{i}@example.com")).await;
        add_member(c, u, d, "user").await;
        readers.push(subscribe(u, format!("realtime:r{i}")).await);
    }
    let mut others = Vec::new();
    for i in 0..3 {
        let u = create_user(c, &format!("other{i}@example.com")).await;
        add_member(c, u, other, "user").await;
        others.push(subscribe(u, format!("realtime:o{i}")).await);
    }
    let staller_id = create_user(c, "staller@example.com").await;
    add_member(c, staller_id, d, "user").await;
    // The staller's receive window is small, so its kernel buffers cannot
    // absorb the transaction.
    let mut staller = Ws::connect_small_window(addr, "/realtime/v1/websocket", &anon(), 4096).await;
    staller.subscribe("realtime:s", orders(), Some(&user(staller_id))).await;
    {
        let mut all: Vec<&mut Ws> = readers.iter_mut().chain(std::iter::once(&mut staller)).collect();
        settle(c, d, owner, &mut all).await;
        let mut all: Vec<&mut Ws> = others.iter_mut().collect();
        settle(c, other, owner, &mut all).await;
    }

    c.execute("update public.orders set status = 'in_progress' where dealership_id in ($1, $2)", &[&d, &other])
        .await
        .unwrap();
    // Counts distinct order ids of postgres_changes frames (raw text: the
    // record's first column is `id`), each at most once; heartbeats keep
    // the socket within Phoenix's idle timeout.
    let count = |want: usize, mut ws: Ws| {
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut ids = HashSet::new();
            let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
            while ids.len() < want {
                let next = tokio::select! {
                    next = tokio::time::timeout(FRAME_WAIT, ws.ws.next()) => next,
                    _ = heartbeat.tick() => {
                        ws.send(None, "phoenix", "heartbeat", json!({})).await;
                        continue;
                    }
                };
                let Ok(Some(Ok(message))) = next else { break };
                let Message::Text(text) = message else { continue };
                let text = text.as_str();
                if !text.contains("\"postgres_changes\"") {
                    continue;
                }
                assert!(text.contains("\"type\":\"UPDATE\""), "{text}");
                let at = text.find("\"record\":{\"id\":\"").expect("record id") + 16;
                assert!(ids.insert(text[at..at + 36].to_owned()), "delivered twice");
            }
            (ids.len(), ws)
        })
    };
    // Each dealership also holds its settle order.
    let readers: Vec<_> = readers.into_iter().map(|ws| count(ROWS + 1, ws)).collect();
    let others: Vec<_> = others.into_iter().map(|ws| count(OTHER_ROWS + 1, ws)).collect();
    // The staller reads nothing until the relay has closed it.
    let closed = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let Some((200, text)) = try_get(addr, "/metrics").await {
                if metric(&text, "walcast_slow_consumer_closes_total") > 0.0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if closed.is_err() {
        let metrics = try_get(addr, "/metrics").await.map(|(_, t)| t).unwrap_or_default();
        let interesting: Vec<&str> =
            metrics.lines().filter(|l| l.starts_with("walcast_") && !l.contains("_bucket")).collect();
        panic!("the staller was not closed:\n{}\n{}", interesting.join("\n"), relay.output());
    }
    let mut reason = None;
    let close = tokio::time::timeout(Duration::from_secs(30), async {
        use futures::StreamExt;
        while let Some(Ok(message)) = staller.ws.next().await {
            if let Message::Close(frame) = message {
                reason = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
        }
    })
    .await;
    assert!(close.is_ok(), "the staller's socket ends");
    let (code, text) = reason.expect("a close frame once the staller reads");
    assert_eq!(code, 1013);
    // Which rule fires first depends on timing: a write that stalls for the
    // write timeout (10 s), or the furthest-behind rule after a 10 s pause.
    assert!(text.contains("slow consumer"), "{text}");

    let mut done = Vec::new();
    for reader in readers {
        let (n, ws) = reader.await.unwrap();
        assert_eq!(n, ROWS + 1, "every reader receives every row");
        done.push(ws);
    }
    for other in others {
        let (n, ws) = other.await.unwrap();
        assert_eq!(n, OTHER_ROWS + 1, "members of the other dealership get their own rows");
        done.push(ws);
    }
    // Everyone but the staller is still connected, with nothing extra queued:
    // the next change each one gets is a new order of its own dealership.
    let (big_next, other_next) =
        (create_order(c, d, owner, "sales", "pending").await, create_order(c, other, owner, "sales", "pending").await);
    for (i, ws) in done.iter_mut().enumerate() {
        let want = if i < 8 { big_next } else { other_next };
        let frame = loop {
            let text = next_text(ws).await.expect("still connected");
            let frame = ws.decode(&text);
            if frame.event == "postgres_changes" {
                break frame;
            }
        };
        assert_eq!(frame.payload["data"]["type"], "INSERT");
        assert_eq!(frame.payload["data"]["record"]["id"], json!(want));
    }
    let (_, text) = try_get(addr, "/metrics").await.expect("/metrics");
    assert_eq!(metric(&text, "walcast_slow_consumer_closes_total"), 1.0, "only the staller was closed");
    assert!(metric(&text, "walcast_fanout_pauses_total") >= 1.0, "the fan-out paused on the budget");
    let peak = peak_rss_kib(relay.pid());
    assert!(peak <= 128 << 10, "relay peak RSS {peak} KiB > 128 MiB");
    relay.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_transaction_interrupted_by_walsender_terminations_is_delivered_exactly_once() {
    const ROWS: usize = 10_000;
    let mut slot = String::new();
    // Little memory and a small outbox budget: the transaction spills and its
    // fan-out pauses, so the terminations land while it is being received
    // and while it is being delivered.
    let t = TestServer::with_config(|c| {
        c.relay.hub.max_tx_bytes = 1 << 20;
        c.relay.hub.outbox_budget = 1 << 20;
        c.limits.idle_timeout = Duration::from_secs(600);
        slot = c.relay.source.slot.slot.clone();
    })
    .await;
    let c = &t.client;
    let d = create_dealership(c, "DUP").await;
    let owner = create_user(c, "dup@example.com").await;
    add_member(c, owner, d, "user").await;
    bulk_orders(c, d, owner, "DUP", ROWS as i32).await;
    let mut ws = subscribed(&t, owner, "realtime:dup").await;
    settle(c, d, owner, &mut [&mut ws]).await;
    let reader = tokio::spawn(async move {
        use futures::StreamExt;
        let mut ws = ws;
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(120), ws.ws.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = next else { panic!("socket ended: {next:?}") };
            let text = text.as_str();
            if !text.contains("\"postgres_changes\"") {
                continue;
            }
            let at = text.find("\"record\":{\"id\":\"").expect("record id") + 16;
            if text.contains("\"type\":\"INSERT\"") {
                return seen; // the sentinel
            }
            *seen.entry(text[at..at + 36].to_owned()).or_default() += 1;
        }
    });
    let writer = t.db.server().connect(t.db.name()).await.unwrap();
    let update = tokio::spawn(async move {
        writer.execute("update public.orders set status = 'in_progress' where dealership_id = $1", &[&d]).await
    });
    let mut terminated = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        terminated += c
            .query(
                "select pg_terminate_backend(active_pid) from pg_replication_slots \
                 where slot_name = $1 and active_pid is not null",
                &[&slot],
            )
            .await
            .unwrap()
            .len();
    }
    // The bulk rows and the settle order.
    assert_eq!(update.await.unwrap().unwrap(), ROWS as u64 + 1);
    assert!(terminated >= 3, "the walsender was terminated {terminated} times");
    create_order(c, d, owner, "sales", "pending").await;
    let seen = reader.await.unwrap();
    assert_eq!(seen.len(), ROWS + 1, "every row arrived");
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n != 1).collect();
    assert!(twice.is_empty(), "{} rows delivered more than once, e.g. {:?}", twice.len(), twice.first());
}

#[tokio::test]
async fn a_revoke_after_a_bulk_update_inside_a_streamed_transaction_applies_to_all_of_it() {
    // Protocol 2: the walsender streams the transaction while it runs (the
    // database's logical_decoding_work_mem is 64 kB), the change stage holds
    // it until Stream Commit, and the hub judges it whole.
    let mut slot = String::new();
    let t = TestServer::with_config(|c| {
        slot = c.relay.source.slot.slot.clone();
        c.relay.source.slot.proto_version = 2;
        c.relay.source.slot.streaming = true;
        c.relay.hub.max_tx_bytes = 256 << 10;
        c.limits.idle_timeout = Duration::from_secs(600);
    })
    .await;
    let c = &t.client;
    c.batch_execute(&format!("alter database {} set logical_decoding_work_mem = '64kB'", t.db.name())).await.unwrap();
    let (d1, dx, seen) =
        (create_dealership(c, "D1").await, create_dealership(c, "DX").await, create_dealership(c, "SEEN").await);
    let (a, g) = (create_user(c, "a@example.com").await, create_user(c, "g@example.com").await);
    add_member(c, a, d1, "user").await;
    add_member(c, a, seen, "user").await;
    add_member(c, g, seen, "user").await;
    let o1 = create_order(c, d1, a, "sales", "pending").await;
    bulk_orders(c, dx, a, "BULK", 5_000).await;
    let mut a_ws = subscribed(&t, a, "realtime:a").await;
    let mut g_ws = subscribed(&t, g, "realtime:g").await;
    settle(c, seen, a, &mut [&mut a_ws, &mut g_ws]).await;
    // A new session, so the database's logical_decoding_work_mem applies to
    // the walsender's decoding of it (it is read per walsender; the relay's
    // walsender started before the setting, so restart its connection).
    c.query(
        "select pg_terminate_backend(active_pid) from pg_replication_slots \
         where slot_name = $1 and active_pid is not null",
        &[&slot],
    )
    .await
    .unwrap();
    let mut writer = t.db.server().connect(t.db.name()).await.unwrap();
    revoke_after_bulk(&mut writer, dx, o1, a, g, d1).await;
    let sentinel = create_order(c, seen, a, "sales", "pending").await;
    let a_got = changes_until(&mut a_ws, sentinel).await;
    assert!(a_got.is_empty(), "A, revoked in the same transaction, got {} changes", a_got.len());
    let g_got = changes_until(&mut g_ws, sentinel).await;
    assert_eq!(about(&g_got, o1), ["UPDATE"]);
    // The walsender did stream it.
    crate::support::wait_until_streamed(c, &slot).await;
}
