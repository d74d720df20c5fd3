//! The WebSocket server against a real PostgreSQL: every Phoenix message and
//! rule of `realtime-protocol.md` §1–5 that Postgres Changes uses, in both
//! serializers, and writes reaching exactly the entitled sockets.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use walcast::hub::Vsn;
use walcast::realtime::Limits;

use crate::support::server::{anon, http_get, token, upgrade, user, TestServer, Ws};
use crate::support::{add_member, create_dealership, create_order, create_user};

const BOTH: [Vsn; 2] = [Vsn::V1, Vsn::V2];
const QUIET: Duration = Duration::from_millis(600);

fn orders(filter: Option<&str>) -> Value {
    let mut binding = json!({"event": "*", "schema": "public", "table": "orders"});
    if let Some(filter) = filter {
        binding["filter"] = json!(filter);
    }
    json!([binding])
}

/// Waits for the next postgres_changes frame on `topic`.
async fn change(ws: &mut Ws, topic: &str) -> Value {
    ws.expect(topic, "postgres_changes").await.payload
}

/// Asserts nothing arrives for a while (a change committed before the call
/// would have arrived by then: the relay is one in-memory hop).
async fn silent(ws: &mut Ws) {
    if let Some(frame) = ws.next_within(QUIET).await {
        panic!("expected nothing, got {:?}", frame.raw);
    }
}

#[tokio::test]
async fn heartbeat_join_changes_and_leave_in_both_serializers() {
    let t = TestServer::start().await;
    let owner = create_user(&t.client, "owner@example.com").await;
    let member = create_user(&t.client, "member@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    add_member(&t.client, member, north, "user").await;

    for vsn in BOTH {
        let mut ws = t.connect(&anon(), vsn).await;
        // Heartbeat: reply on `phoenix` echoing the ref.
        let sent = ws.send(None, "phoenix", "heartbeat", json!({})).await;
        let reply = ws.expect("phoenix", "phx_reply").await;
        assert_eq!(reply.msg_ref.as_deref(), Some(sent.as_str()));
        assert_eq!(reply.payload, json!({"status": "ok", "response": {}}));
        if vsn == Vsn::V2 {
            assert_eq!(reply.raw[0], Value::Null);
        }

        // Join: the reply echoes both bindings verbatim, in order, plus ids.
        let bindings = json!([
            {"event": "*", "schema": "public", "table": "orders"},
            {"event": "INSERT", "schema": "public", "table": "orders", "filter": "status=eq.pending"}
        ]);
        let topic = "realtime:orders-feed";
        let join_ref = ws.join(topic, bindings.clone(), Some(&user(member))).await;
        let reply = ws.expect(topic, "phx_reply").await;
        assert_eq!(reply.msg_ref.as_deref(), Some(join_ref.as_str()));
        if vsn == Vsn::V2 {
            assert_eq!(reply.join_ref.as_deref(), Some(join_ref.as_str()));
        }
        assert_eq!(reply.payload["status"], "ok");
        let echoed = reply.payload["response"]["postgres_changes"].as_array().unwrap().clone();
        assert_eq!(echoed.len(), 2);
        let mut ids = Vec::new();
        for (got, sent) in echoed.iter().zip(bindings.as_array().unwrap()) {
            let mut got = got.as_object().unwrap().clone();
            let id = got.remove("id").and_then(|v| v.as_u64()).expect("numeric id");
            assert!(id < 1 << 27);
            ids.push(id);
            assert_eq!(&Value::Object(got), sent, "echoed verbatim without added keys");
        }
        let system = ws.expect(topic, "system").await;
        assert_eq!(
            system.payload,
            json!({"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": "orders-feed"})
        );
        assert_eq!(system.msg_ref, None);
        if vsn == Vsn::V2 {
            assert_eq!(system.join_ref.as_deref(), Some(join_ref.as_str()));
        }

        // INSERT pending matches both bindings: one frame with both ids.
        let order = create_order(&t.client, north, owner, "sales", "pending").await;
        let frame = ws.expect(topic, "postgres_changes").await;
        assert_eq!((frame.join_ref.as_deref(), frame.msg_ref.as_deref()), (None, None));
        let mut got_ids: Vec<u64> =
            frame.payload["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        got_ids.sort_unstable();
        let mut want = ids.clone();
        want.sort_unstable();
        assert_eq!(got_ids, want);
        let data = &frame.payload["data"];
        assert_eq!(data["type"], "INSERT");
        assert_eq!(data["schema"], "public");
        assert_eq!(data["table"], "orders");
        assert_eq!(data["record"]["id"], json!(order));
        assert_eq!(data["record"]["status"], "pending");
        assert_eq!(data["record"]["customer_info"], json!({"name": "Ada Lovelace"}), "jsonb as nested JSON");
        assert!(data.get("old_record").is_none());
        assert_eq!(data["errors"], Value::Null);
        let ts = data["commit_timestamp"].as_str().unwrap();
        assert!(ts.len() == 24 && ts.ends_with('Z'), "{ts}");
        assert!(data["columns"].as_array().unwrap().iter().any(|c| c == &json!({"name": "status", "type": "text"})));

        // UPDATE goes to the `*` binding only, with the old row (FULL identity).
        t.client.execute("update public.orders set status = 'completed' where id = $1", &[&order]).await.unwrap();
        let payload = change(&mut ws, topic).await;
        assert_eq!(payload["ids"], json!([ids[0]]));
        assert_eq!(payload["data"]["type"], "UPDATE");
        assert_eq!(payload["data"]["old_record"]["status"], "pending");
        assert_eq!(payload["data"]["record"]["status"], "completed");

        // DELETE: only old_record.
        t.client.execute("delete from public.orders where id = $1", &[&order]).await.unwrap();
        let payload = change(&mut ws, topic).await;
        assert_eq!(payload["data"]["type"], "DELETE");
        assert_eq!(payload["data"]["old_record"]["id"], json!(order));
        assert!(payload["data"].get("record").is_none());

        // Leave: ok reply, then phx_close with ref = join_ref; nothing after.
        let leave_ref = ws.send(Some(&join_ref), topic, "phx_leave", json!({})).await;
        let reply = ws.expect(topic, "phx_reply").await;
        assert_eq!(reply.msg_ref.as_deref(), Some(leave_ref.as_str()));
        assert_eq!(reply.payload, json!({"status": "ok", "response": {}}));
        let close = ws.next().await.unwrap();
        assert_eq!(close.event, "phx_close");
        assert_eq!(close.msg_ref.as_deref(), Some(join_ref.as_str()));
        assert_eq!(close.payload, json!({}));
        create_order(&t.client, north, owner, "sales", "pending").await;
        silent(&mut ws).await;
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_write_reaches_exactly_the_entitled_sockets() {
    let t = TestServer::start().await;
    let owner = create_user(&t.client, "o@example.com").await;
    let alice = create_user(&t.client, "alice@example.com").await;
    let bob = create_user(&t.client, "bob@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    let south = create_dealership(&t.client, "SOUTH").await;
    add_member(&t.client, alice, north, "user").await;
    add_member(&t.client, bob, south, "user").await;

    let topic = "realtime:orders";
    let mut sockets = Vec::new();
    for (name, key, access) in [
        ("alice", anon(), Some(user(alice))),
        ("bob", anon(), Some(user(bob))),
        ("anon", anon(), None),
        ("service", token("service_role", None, 3600), None),
        ("stranger", anon(), Some(user(Uuid::new_v4()))),
        ("alice-filtered", anon(), Some(user(alice))),
    ] {
        let mut ws = t.connect(&key, Vsn::V2).await;
        let filter = (name == "alice-filtered").then_some("type=eq.service");
        ws.subscribe(topic, orders(filter), access.as_deref()).await;
        sockets.push((name, ws));
    }
    let order = create_order(&t.client, north, owner, "sales", "pending").await;
    let service_order = create_order(&t.client, north, owner, "service", "pending").await;
    for (name, ws) in &mut sockets {
        let mut got = Vec::new();
        while let Some(frame) = ws.next_within(QUIET).await {
            if frame.event == "postgres_changes" {
                got.push(frame.payload["data"]["record"]["id"].clone());
            }
        }
        let want: Vec<Value> = match *name {
            "alice" | "service" => vec![json!(order), json!(service_order)],
            "alice-filtered" => vec![json!(service_order)],
            _ => vec![],
        };
        assert_eq!(got, want, "{name}");
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn auth_at_upgrade_and_join() {
    let t = TestServer::start().await;
    let addr = t.addr();
    // Upgrade refusals are HTTP responses with Supabase's texts.
    let (status, body) = upgrade(addr, "/realtime/v1/websocket?vsn=2.0.0", &[]).await;
    assert_eq!((status, body.as_str()), (401, r#"{"error":"API key is missing"}"#));
    let expired = token("anon", None, -30);
    let (status, body) = upgrade(addr, &format!("/socket/websocket?apikey={expired}"), &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("Token has expired"), "{body}");
    let forged =
        walcast::realtime::auth::sign_hs256(b"another-secret", &json!({"role": "anon", "exp": 4_000_000_000_i64}));
    let (status, body) = upgrade(addr, &format!("/realtime/v1/websocket?apikey={forged}"), &[]).await;
    assert_eq!(status, 401, "{body}");
    let no_role = walcast::realtime::auth::sign_hs256(
        crate::support::server::SECRET.as_bytes(),
        &json!({"exp": 4_000_000_000_i64}),
    );
    let (status, body) = upgrade(addr, &format!("/realtime/v1/websocket?apikey={no_role}"), &[]).await;
    assert_eq!((status, body.as_str()), (401, r#"{"error":"Fields `role` and `exp` are required in JWT"}"#));
    let (status, _) = upgrade(addr, &format!("/realtime/v1/websocket?apikey={}&vsn=3.0.0", anon()), &[]).await;
    assert_eq!(status, 400);
    // The apikey header works as well as the parameter; /socket/websocket too; no vsn = 1.0.0.
    let (status, _) = http_get(addr, "/nowhere", &[]).await;
    assert_eq!(status, 404);
    let mut ws = Ws::connect(addr, "/socket/websocket", &anon(), None).await;
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    let reply = ws.next().await.unwrap();
    assert!(reply.raw.is_object(), "missing vsn means 1.0.0 objects");

    for vsn in BOTH {
        let mut ws = t.connect(&anon(), vsn).await;
        for (bad, want) in [
            // Minted 300 s expired; a busy machine may verify it a second later.
            (token("authenticated", Some(Uuid::new_v4()), -300), "InvalidJWTToken: Token has expired 30"),
            (forged.clone(), "InvalidJWTToken: "),
            (no_role.clone(), "InvalidJWTToken: Fields `role` and `exp` are required in JWT"),
            ("not-a-jwt".to_owned(), "InvalidJWTToken: "),
        ] {
            let join_ref = ws.join("realtime:x", orders(None), Some(&bad)).await;
            let reply = ws.expect("realtime:x", "phx_reply").await;
            assert_eq!(reply.msg_ref.as_deref(), Some(join_ref.as_str()));
            assert_eq!(reply.payload["status"], "error");
            let reason = reply.payload["response"]["reason"].as_str().unwrap();
            assert!(reason.starts_with(want), "{reason} vs {want}");
            if let Some(n) = reason.strip_prefix("InvalidJWTToken: Token has expired ") {
                let n: i64 = n.strip_suffix(" seconds ago").expect("seconds ago").parse().unwrap();
                assert!((300..330).contains(&n), "{reason}");
            }
        }
        // An `sb_…` access token is ignored: the socket's apikey applies.
        ws.join("realtime:y", orders(None), Some("sb_publishable_abc")).await;
        assert_eq!(ws.expect("realtime:y", "phx_reply").await.payload["status"], "ok");
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn access_token_upgrades_anon_and_expiry_closes_the_channel() {
    let t = TestServer::start().await;
    let owner = create_user(&t.client, "o@example.com").await;
    let member = create_user(&t.client, "m@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    add_member(&t.client, member, north, "user").await;

    for vsn in BOTH {
        let topic = "realtime:feed";
        let mut ws = t.connect(&anon(), vsn).await;
        let reply = ws.subscribe(topic, orders(None), None).await;
        let join_ref = reply.msg_ref.clone();
        create_order(&t.client, north, owner, "sales", "pending").await;
        silent(&mut ws).await;

        // anon → user: no reply, a fresh "Subscribed to PostgreSQL", then changes.
        ws.send(join_ref.as_deref(), topic, "access_token", json!({"access_token": user(member)})).await;
        let frame = ws.next().await.unwrap();
        assert_eq!(frame.event, "system", "no reply to access_token: {:?}", frame.raw);
        assert_eq!(frame.payload["message"], "Subscribed to PostgreSQL");
        let order = create_order(&t.client, north, owner, "sales", "pending").await;
        assert_eq!(change(&mut ws, topic).await["data"]["record"]["id"], json!(order));

        // Back to a stranger: nothing more.
        ws.send(join_ref.as_deref(), topic, "access_token", json!({"access_token": user(Uuid::new_v4())})).await;
        assert_eq!(ws.expect(topic, "system").await.payload["message"], "Subscribed to PostgreSQL");
        create_order(&t.client, north, owner, "sales", "pending").await;
        silent(&mut ws).await;

        // A bad access_token closes the channel with a system error.
        ws.send(join_ref.as_deref(), topic, "access_token", json!({"access_token": token("anon", None, -5)})).await;
        let system = ws.expect(topic, "system").await;
        assert_eq!(system.payload["status"], "error");
        assert!(system.payload["message"].as_str().unwrap().starts_with("Token has expired"), "{:?}", system.raw);
        let close = ws.expect(topic, "phx_close").await;
        assert_eq!(close.msg_ref, join_ref);

        // Expiry at `exp`: system error, phx_close, and no change afterwards.
        let short = token("authenticated", Some(member), 2);
        let reply = ws.subscribe("realtime:short", orders(None), Some(&short)).await;
        let system = ws.expect("realtime:short", "system").await;
        assert_eq!(system.payload["extension"], "system");
        assert_eq!(system.payload["status"], "error");
        let message = system.payload["message"].as_str().unwrap();
        assert!(message.starts_with("Token has expired ") && message.ends_with(" seconds ago"), "{message}");
        let close = ws.expect("realtime:short", "phx_close").await;
        assert_eq!(close.msg_ref, reply.msg_ref);
        create_order(&t.client, north, owner, "sales", "pending").await;
        silent(&mut ws).await;
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn rejoin_replaces_bad_bindings_report_and_unknown_events_get_errors() {
    let t = TestServer::start().await;
    let owner = create_user(&t.client, "o@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    let service = token("service_role", None, 3600);

    for vsn in BOTH {
        let mut ws = t.connect(&service, vsn).await;
        let topic = "realtime:a";
        let first = ws.subscribe(topic, orders(Some("status=eq.draft")), None).await;
        // Second join on the same topic: the old channel is closed, the new one replaces it.
        let join_ref = ws.join(topic, orders(Some("status=eq.pending")), None).await;
        let close = ws.next().await.unwrap();
        assert_eq!(close.event, "phx_close");
        assert_eq!(close.msg_ref, first.msg_ref, "the close names the old join");
        let reply = ws.expect(topic, "phx_reply").await;
        assert_eq!(reply.msg_ref.as_deref(), Some(join_ref.as_str()));
        let new_id = reply.payload["response"]["postgres_changes"][0]["id"].clone();
        assert_eq!(ws.expect(topic, "system").await.payload["message"], "Subscribed to PostgreSQL");
        create_order(&t.client, north, owner, "sales", "draft").await;
        create_order(&t.client, north, owner, "sales", "pending").await;
        let payload = change(&mut ws, topic).await;
        assert_eq!(payload["data"]["record"]["status"], "pending", "only the new binding applies");
        assert_eq!(payload["ids"], json!([new_id]));
        silent(&mut ws).await;

        // Bad filter / unpublished table: join ok, then a system error; the channel stays open.
        for (bindings, want) in [
            (orders(Some("nope=eq.1")), "Error parsing `filter` params: invalid column for filter nope"),
            (orders(Some("status=like")), "Error parsing `filter` params: "),
            (json!([{"event": "*", "schema": "public", "table": "profiles"}]), "Unable to subscribe to changes"),
        ] {
            ws.join("realtime:bad", bindings, None).await;
            assert_eq!(ws.expect("realtime:bad", "phx_reply").await.payload["status"], "ok");
            let system = ws.expect("realtime:bad", "system").await;
            assert_eq!(system.payload["status"], "error");
            assert_eq!(system.payload["extension"], "postgres_changes");
            let message = system.payload["message"].as_str().unwrap();
            assert!(message.starts_with(want), "{message}");
        }
        // No bindings: ok reply with an empty list, no system message.
        ws.join("realtime:empty", json!([]), None).await;
        let reply = ws.expect("realtime:empty", "phx_reply").await;
        assert_eq!(reply.payload["response"], json!({"postgres_changes": []}));
        // Unknown events and unjoined topics get error replies.
        let r = ws.send(Some("9"), "realtime:a", "shout", json!({})).await;
        let reply = ws.expect("realtime:a", "phx_reply").await;
        assert_eq!((reply.msg_ref.as_deref(), reply.payload["status"].as_str()), (Some(r.as_str()), Some("error")));
        ws.send(None, "realtime:never-joined", "broadcast", json!({"type": "broadcast"})).await;
        let reply = ws.expect("realtime:never-joined", "phx_reply").await;
        assert_eq!(reply.payload["response"]["reason"], "unmatched topic");
        ws.send(None, "room", "phx_join", json!({})).await;
        assert_eq!(ws.expect("room", "phx_reply").await.payload["response"]["reason"], "unmatched topic");
        // Malformed frames are ignored; the socket keeps working.
        ws.send_raw(Message::Text("{not json".into())).await;
        ws.send_raw(Message::Text("[1,2]".into())).await;
        ws.send(None, "phoenix", "heartbeat", json!({})).await;
        assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok");
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn binary_frames_limits_idle_and_shutdown() {
    let limits = Limits {
        max_channels: 3,
        max_message_bytes: 4096,
        idle_timeout: Duration::from_secs(2),
        join_burst: 5,
        joins_per_second: 1,
        ..Limits::default()
    };
    let t = TestServer::with_limits(limits).await;
    let key = token("service_role", None, 3600);

    // A 2.0.0 binary broadcast push on a channel not joined gets an error
    // reply; the socket stays.
    let mut ws = t.connect(&key, Vsn::V2).await;
    let mut frame = vec![3, 1, 1, 13, 6, 0, 1];
    frame.extend_from_slice(b"15realtime:roomcursor{\"x\":1}");
    ws.send_raw(Message::Binary(frame.into())).await;
    let reply = ws.expect("realtime:room", "phx_reply").await;
    assert_eq!(reply.payload["status"], "error");
    assert_eq!(reply.payload["response"]["reason"], "unmatched topic");
    assert_eq!((reply.join_ref.as_deref(), reply.msg_ref.as_deref()), (Some("1"), Some("5")));
    ws.send_raw(Message::Binary(vec![3, 200, 0].into())).await; // truncated: ignored
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok");

    // Channel limit.
    for i in 0..3 {
        ws.join(&format!("realtime:c{i}"), json!([]), None).await;
        assert_eq!(ws.expect(&format!("realtime:c{i}"), "phx_reply").await.payload["status"], "ok");
    }
    ws.join("realtime:c3", json!([]), None).await;
    let reply = ws.expect("realtime:c3", "phx_reply").await;
    assert_eq!(reply.payload["response"]["reason"], "ChannelRateLimitReached: Too many channels");
    // Rejoining an existing topic is not a new channel.
    ws.join("realtime:c0", json!([]), None).await;
    assert_eq!(ws.expect("realtime:c0", "phx_reply").await.payload["status"], "ok");

    // Join rate: the burst is spent (5 joins); the next is refused, as
    // Supabase does, and the socket with its other channels carries on. (A
    // slow machine may refill a token between joins, so allow a few more
    // before the refusal.)
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts <= 5, "the join rate limit never triggered");
        ws.join("realtime:c1", json!([]), None).await;
        let reply = ws.expect("realtime:c1", "phx_reply").await;
        if reply.payload["status"] == "error" {
            assert_eq!(reply.payload["response"]["reason"], "ClientJoinRateLimitReached: Too many joins per second");
            break;
        }
    }
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok", "the socket stays open");
    // Once a token refilled (1 per second), joins work again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ws.join("realtime:c2", json!([]), None).await;
    assert_eq!(ws.expect("realtime:c2", "phx_reply").await.payload["status"], "ok");

    // A topic over 1,024 bytes gets an error reply, not silence.
    let long = format!("realtime:{}", "t".repeat(1100));
    ws.join(&long, json!([]), None).await;
    let reply = ws.expect(&long, "phx_reply").await;
    assert_eq!(reply.payload["status"], "error");
    assert_eq!(reply.payload["response"]["reason"], "TopicNameTooLong: a topic is at most 1024 bytes");
    let at_limit = format!("realtime:{}", "t".repeat(1024 - "realtime:".len()));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ws.join(&at_limit, json!([]), None).await;
    let reply = ws.expect(&at_limit, "phx_reply").await;
    assert_eq!(reply.payload["response"]["reason"], "ChannelRateLimitReached: Too many channels", "1,024 bytes pass");

    // A message over the size limit closes with 1009.
    let mut ws = t.connect(&key, Vsn::V2).await;
    ws.send(None, "phoenix", "heartbeat", json!({"pad": "x".repeat(5000)})).await;
    assert_eq!(ws.close_code().await, Some(1009));

    // Silence closes the socket after the idle timeout.
    let mut ws = t.connect(&key, Vsn::V1).await;
    assert_eq!(ws.close_code().await, Some(1000));

    // Shutdown closes open sockets with 1001.
    let mut ws = t.connect(&key, Vsn::V2).await;
    ws.subscribe("realtime:s", orders(None), None).await;
    let (status, body) = http_get(t.addr(), "/health", &[]).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let shutdown = tokio::spawn(t.server.shutdown());
    assert_eq!(ws.close_code().await, Some(1001));
    shutdown.await.unwrap().unwrap();
}

/// Intervals arrive in PostgreSQL's default style, as Supabase sends them
/// (`"1 day 02:00:00"`, not ISO 8601's `P1DT2H`), even when the database
/// itself defaults to `iso_8601`: the replication connection pins
/// `IntervalStyle=postgres`. The expectation is PostgreSQL's own `to_jsonb`
/// in the default style.
#[tokio::test]
async fn intervals_arrive_in_postgres_default_style() {
    let t = TestServer::with_schema(
        "create table public.timers (id int primary key, span interval, spans interval[]);
         alter table public.timers replica identity full;
         grant select on public.timers to service_role;
         alter publication supabase_realtime add table public.timers;
         do $$ begin
             execute format('alter database %I set intervalstyle = %L', current_database(), 'iso_8601');
         end $$;",
    )
    .await;
    let key = token("service_role", None, 3600);
    let topic = "realtime:timers";
    let binding = json!([{"event": "*", "schema": "public", "table": "timers"}]);
    for vsn in BOTH {
        let mut ws = t.connect(&key, vsn).await;
        ws.subscribe(topic, binding.clone(), None).await;
        t.client.execute("insert into public.timers values (1, '1 day 2 hours', '{1 day, 1 mon}')", &[]).await.unwrap();
        t.client
            .execute("update public.timers set span = span * -1.5 - interval '1 second' where id = 1", &[])
            .await
            .unwrap();
        t.client.execute("delete from public.timers where id = 1", &[]).await.unwrap();
        let insert = change(&mut ws, topic).await;
        assert_eq!(insert["data"]["record"]["span"], "1 day 02:00:00", "{insert}");
        assert_eq!(insert["data"]["record"]["spans"], json!(["1 day", "1 mon"]), "{insert}");
        let update = change(&mut ws, topic).await;
        assert_eq!(update["data"]["old_record"]["span"], "1 day 02:00:00", "{update}");
        t.client.batch_execute("set intervalstyle = 'postgres'").await.unwrap();
        let want: Value = t
            .client
            .query_one("select to_jsonb(interval '1 day 2 hours' * -1.5 - interval '1 second')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(want, json!("-1 days -15:00:01"), "PostgreSQL's own rendering");
        assert_eq!(update["data"]["record"]["span"], want, "{update}");
        let delete = change(&mut ws, topic).await;
        assert_eq!(delete["data"]["old_record"]["span"], want, "{delete}");
        assert_eq!(delete["data"]["old_record"]["spans"], json!(["1 day", "1 mon"]), "{delete}");
    }
    t.server.shutdown().await.unwrap();
}
