//! Private channels (Realtime Authorization, broadcast-presence.md §4,
//! checklist 15–17) with the real supabase-js: the RLS policies on
//! `realtime.messages` decide who joins (SELECT), who sends and tracks
//! (INSERT), per topic through `realtime.topic()` and `auth.uid()`; a
//! public and a private channel of one name never hear each other; a token
//! change re-runs the read check and a lost right closes the channel.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::clients::{is_status, Driver, Kind};
use crate::support::server::{anon, user, TestServer, Ws};
use walcast::hub::Vsn;

/// The README's private-channel block (a membership table and the two
/// policies), run as written.
fn schema() -> String {
    crate::readme::readme_block("private-channels")
}

async fn driver(name: &str, url: &str, vsn: &'static str) -> Driver {
    // A short push timeout: a denied private broadcast is never answered.
    Driver::start_with(name, Kind::SupabaseJs(vsn), url, &anon(), &["--timeout-ms", "1500"]).await
}

async fn join(js: &mut Driver, room: &str, token: &str, private: bool, ack: bool) -> Value {
    js.command(json!({"cmd": "broadcast_subscribe", "channel": room, "token": token, "private": private, "ack": ack}))
        .await;
    js.expect("a join outcome", |e| {
        is_status(e, room, None) && (e["status"] == "SUBSCRIBED" || e["status"] == "CHANNEL_ERROR")
    })
    .await
}

async fn send(js: &mut Driver, room: &str, event: &str) -> Value {
    js.command(json!({"cmd": "broadcast_send", "channel": room, "event": event, "payload": {"event": event}})).await;
    js.expect("the send's result", |e| e["ev"] == "sent" && e["channel"] == room).await["result"].clone()
}

async fn received(js: &mut Driver, room: &str, event: &str) -> Value {
    js.expect(event, |e| e["ev"] == "broadcast" && e["channel"] == room && e["message"]["event"] == event).await
}

#[tokio::test]
async fn policies_on_realtime_messages_decide_who_joins_sends_and_keeps_reading() {
    let t = TestServer::with_setup(&schema()).await;
    let url = format!("http://{}", t.addr());
    let (writer, reader, stranger) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let db = &t.client;
    db.execute(
        "insert into public.room_members (user_id, room, can_write) values ($1, 'room-1', true), ($2, 'room-1', false)",
        &[&writer, &reader],
    )
    .await
    .unwrap();

    // Read policy: members join; a stranger and anon are refused with Supabase's text.
    let mut w = driver("writer", &url, "2.0.0").await;
    assert_eq!(join(&mut w, "room-1", &user(writer), true, true).await["status"], "SUBSCRIBED");
    let mut r = driver("reader", &url, "1.0.0").await;
    assert_eq!(join(&mut r, "room-1", &user(reader), true, true).await["status"], "SUBSCRIBED");
    let mut s = driver("stranger", &url, "2.0.0").await;
    let refused = join(&mut s, "room-1", &user(stranger), true, false).await;
    assert_eq!(refused["status"], "CHANNEL_ERROR");
    assert!(
        refused
            .to_string()
            .contains("Unauthorized: You do not have permissions to read from this Channel topic: room-1"),
        "{refused}"
    );
    let mut a = driver("anon", &url, "2.0.0").await;
    assert_eq!(join(&mut a, "room-1", &anon(), true, false).await["status"], "CHANNEL_ERROR");

    // A public channel of the same name, joined by the stranger.
    let mut p = driver("public", &url, "2.0.0").await;
    assert_eq!(join(&mut p, "room-1", &user(stranger), false, true).await["status"], "SUBSCRIBED");

    // Write policy: the writer's broadcast reaches the private reader only.
    assert_eq!(send(&mut w, "room-1", "hello").await, "ok");
    let got = received(&mut r, "room-1", "hello").await;
    assert_eq!(got["message"]["payload"], json!({"event": "hello"}));
    // The reader may not send: dropped without a reply (ack times out), as Supabase.
    assert_eq!(send(&mut r, "room-1", "nope").await, "timed out");
    // The public channel's broadcast stays public, and vice versa.
    assert_eq!(send(&mut p, "room-1", "public-hello").await, "ok");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for js in [&mut w, &mut r] {
        let mark = 0;
        js.assert_none_since(mark, "a public or a refused broadcast", |e| {
            e["ev"] == "broadcast" && (e["message"]["event"] == "public-hello" || e["message"]["event"] == "nope")
        });
    }
    p.assert_none_since(0, "a private broadcast", |e| e["ev"] == "broadcast" && e["message"]["event"] == "hello");

    // The reader loses membership; a new token re-runs the check and closes the channel.
    db.execute("delete from public.room_members where user_id = $1", &[&reader]).await.unwrap();
    let fresh = crate::support::server::token("authenticated", Some(reader), 7200);
    r.set_auth(&fresh).await;
    let system = r.expect("the system message", |e| e["ev"] == "system" && e["channel"] == "room-1").await;
    assert_eq!(
        system["payload"]["message"], "You do not have permissions to read from this Channel topic: room-1",
        "{system}"
    );

    let (_, body) = crate::support::server::http_get(t.addr(), "/metrics", &[]).await;
    let metric = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    };
    // supabase-js retries a refused join on its rejoin schedule: at least the two first joins.
    assert!(metric("walcast_joins_refused_private_total") >= 2);
    assert_eq!(metric("walcast_private_writes_denied_total"), 1);
    assert_eq!(metric("walcast_private_channels_revoked_total"), 1);
    assert_eq!(metric("walcast_authorization_checks_total{result=\"granted\"}"), 3, "2 joins + 1 write");
    assert_eq!(metric("walcast_authorization_checks_total{result=\"error\"}"), 0);
    t.server.shutdown().await.unwrap();
}

/// Replay (broadcast-presence.md §5.3, checklist 19): a private join with
/// `broadcast.replay` gets the newest stored messages of its topic, oldest
/// first, marked `replayed`, before live traffic and without duplicates; a
/// public join, bad parameters or no read right are refused with
/// Supabase's texts.
#[tokio::test]
async fn private_joins_replay_the_newest_stored_messages_first() {
    let t = TestServer::with_setup(&schema()).await;
    let member = Uuid::new_v4();
    t.client
        .execute("insert into public.room_members (user_id, room) values ($1, 'room-1')", &[&member])
        .await
        .unwrap();
    let topic = "realtime:room-1";
    // A witness in the room: once it has the third message live, the stream
    // is past them, so a later join gets them only by replay.
    let mut witness = t.connect(&anon(), Vsn::V1).await;
    let config = json!({"config": {"private": true}, "access_token": user(member)});
    witness.send(Some("1"), topic, "phx_join", config).await;
    assert_eq!(witness.expect(topic, "phx_reply").await.payload["status"], "ok");
    for n in 1..=3 {
        t.client
            .execute("select realtime.send(jsonb_build_object('n', $1::int), 'ev', 'room-1', true)", &[&n])
            .await
            .unwrap();
    }
    for n in 1..=3 {
        assert_eq!(witness.expect(topic, "broadcast").await.payload["payload"]["n"], n);
    }
    // Another topic's and a public message are never replayed here.
    t.client.execute("select realtime.send('{\"n\":0}', 'ev', 'room-2', true)", &[]).await.unwrap();
    t.client.execute("select realtime.send('{\"n\":0}', 'ev', 'room-1', false)", &[]).await.unwrap();
    let since = walcast::realtime::session::now_unix() * 1000 - 3_600_000;
    let join = |private: bool, replay: Value| {
        json!({"config": {"broadcast": {"replay": replay}, "presence": {"key": ""}, "private": private},
               "access_token": user(member)})
    };

    let mut ws = t.connect(&anon(), Vsn::V1).await;
    ws.send(Some("1"), topic, "phx_join", join(true, json!({"since": since, "limit": 2}))).await;
    let reply = ws.expect(topic, "phx_reply").await;
    assert_eq!(reply.payload["status"], "ok", "{:?}", reply.raw);
    let mut replayed = Vec::new();
    for _ in 0..2 {
        let frame = ws.next().await.expect("a replayed message");
        assert_eq!(frame.event, "broadcast", "{:?}", frame.raw);
        assert_eq!(frame.payload["meta"]["replayed"], true);
        replayed.push(frame.payload["payload"]["n"].as_i64().unwrap());
    }
    assert_eq!(replayed, vec![2, 3], "the newest two, oldest first");
    // Live traffic follows, once.
    t.client.execute("select realtime.send('{\"n\":4}', 'ev', 'room-1', true)", &[]).await.unwrap();
    let live = ws.expect(topic, "broadcast").await;
    assert_eq!(live.payload["payload"]["n"], 4);
    assert!(live.payload["meta"].get("replayed").is_none(), "{:?}", live.raw);
    assert!(ws.next_within(Duration::from_millis(500)).await.is_none_or(|f| f.event != "broadcast"));

    // Refusals, each with Supabase's text.
    for (private, replay, token, want) in [
        (
            false,
            json!({"since": since}),
            user(member),
            "UnableToReplayMessages: Replay is not allowed for public channels",
        ),
        (true, json!({"limit": 2}), user(member), "UnableToReplayMessages: Replay params are not valid"),
        (true, json!({"since": "yesterday"}), user(member), "UnableToReplayMessages: Replay params are not valid"),
        (
            true,
            json!({"since": since}),
            user(Uuid::new_v4()),
            "Unauthorized: You do not have permissions to read from this Channel topic: room-3",
        ),
    ] {
        let topic = "realtime:room-3";
        let mut payload = join(private, replay);
        payload["access_token"] = json!(token);
        let mut ws = t.connect(&anon(), Vsn::V2).await;
        ws.send(Some("1"), topic, "phx_join", payload).await;
        let reply = ws.expect(topic, "phx_reply").await;
        assert_eq!(reply.payload["response"]["reason"], want, "{:?}", reply.raw);
    }

    // supabase-js 2.0.0 with the same config: the replayed messages reach the listener.
    let url = format!("http://{}", t.addr());
    let mut js = driver("js", &url, "2.0.0").await;
    js.command(json!({"cmd": "broadcast_subscribe", "channel": "room-1", "token": user(member), "private": true,
                      "replay": {"since": since, "limit": 3}}))
        .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = js
            .expect("a replayed broadcast", |e| e["ev"] == "broadcast" && e["message"]["meta"]["replayed"] == true)
            .await;
        got.push(e["message"]["payload"]["n"].as_i64().unwrap());
    }
    assert_eq!(got, vec![2, 3, 4]);
    t.server.shutdown().await.unwrap();
}

/// Presence and HTTP on private channels: a member's track is judged by the
/// INSERT policy (a reader's is answered `error`, a writer's reaches the
/// room), presence never crosses to the public room of the same name, and a
/// REST broadcast to a private topic is sent only for a caller the INSERT
/// policy allows (403 otherwise), reaching private members only.
#[tokio::test]
async fn private_presence_and_http_follow_the_policies() {
    let t = TestServer::with_setup(&schema()).await;
    let (writer, reader) = (Uuid::new_v4(), Uuid::new_v4());
    t.client
        .execute(
            "insert into public.room_members (user_id, room, can_write) values ($1, 'room-1', true), ($2, 'room-1', false)",
            &[&writer, &reader],
        )
        .await
        .unwrap();
    let topic = "realtime:room-1";
    let join = |private: bool, token: String| json!({"config": {"presence": {"key": "", "enabled": true}, "private": private}, "access_token": token});
    let mut w = t.connect(&anon(), Vsn::V2).await;
    w.send(Some("1"), topic, "phx_join", join(true, user(writer))).await;
    assert_eq!(w.expect(topic, "phx_reply").await.payload["status"], "ok");
    assert_eq!(w.expect(topic, "presence_state").await.payload, json!({}));
    let mut r = t.connect(&anon(), Vsn::V1).await;
    r.send(Some("1"), topic, "phx_join", join(true, user(reader))).await;
    assert_eq!(r.expect(topic, "phx_reply").await.payload["status"], "ok");
    r.expect(topic, "presence_state").await;
    let mut public = t.connect(&anon(), Vsn::V2).await;
    public.send(Some("1"), topic, "phx_join", join(false, user(reader))).await;
    assert_eq!(public.expect(topic, "phx_reply").await.payload["status"], "ok");
    public.expect(topic, "presence_state").await;

    // The reader may not track; the writer may.
    r.send(Some("1"), topic, "presence", json!({"event": "track", "payload": {"who": "reader"}})).await;
    assert_eq!(r.expect(topic, "phx_reply").await.payload, json!({"status": "error", "response": {}}));
    w.send(Some("1"), topic, "presence", json!({"event": "track", "payload": {"who": "writer"}})).await;
    let diff = r.expect(topic, "presence_diff").await;
    let joins = diff.payload["joins"].as_object().unwrap();
    assert_eq!(joins.len(), 1);
    assert_eq!(joins.values().next().unwrap()["metas"][0]["who"], "writer");

    // REST: the reader's private message is refused, the writer's delivered to private members only.
    let url_path = "/realtime/v1/api/broadcast/room-1/events/note?private=true";
    let post = |token: String| {
        let addr = t.addr();
        async move {
            let bearer = format!("Bearer {token}");
            let anon = anon();
            let headers =
                [("apikey", anon.as_str()), ("authorization", bearer.as_str()), ("content-type", "application/json")];
            crate::support::server::http_post(addr, url_path, &headers, br#"{"n":1}"#).await
        }
    };
    let (status, body) = post(user(reader)).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = post(user(writer)).await;
    assert_eq!(status, 202, "{body}");
    let got = r.expect(topic, "broadcast").await;
    assert_eq!((got.payload["event"].clone(), got.payload["payload"].clone()), (json!("note"), json!({"n": 1})));
    // Policies see the upgrade's x-* headers as request.headers (and nothing else of it).
    t.client
        .batch_execute(
            "create policy by_header on realtime.messages for select to anon
               using ((select realtime.topic()) = 'lobby'
                      and current_setting('request.headers', true)::json ->> 'x-room-key' = 'open-sesame'
                      and current_setting('request.headers', true)::json ->> 'host' is null)",
        )
        .await
        .unwrap();
    let lobby = "realtime:lobby";
    for (key, want) in [("open-sesame", "ok"), ("wrong", "error")] {
        let mut ws = Ws::upgrade_from(t.addr(), None, &anon(), &[("x-room-key", key)]).await.expect("upgraded");
        ws.send(Some("1"), lobby, "phx_join", json!({"config": {"private": true}})).await;
        assert_eq!(ws.expect(lobby, "phx_reply").await.payload["status"], want, "x-room-key {key}");
    }
    // The public channel saw neither the private presence nor the message.
    while let Some(frame) = public.next_within(Duration::from_millis(500)).await {
        assert!(frame.event != "presence_diff" && frame.event != "broadcast", "{:?}", frame.raw);
    }
    t.server.shutdown().await.unwrap();
}

/// The Python client (1.0.0) on a private channel: a member joins and
/// receives a writer's broadcast; a stranger's join is refused with
/// Supabase's text.
#[tokio::test]
async fn python_private_channels() {
    let t = TestServer::with_setup(&schema()).await;
    let url = format!("http://{}", t.addr());
    let (writer, member, stranger) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    t.client
        .execute(
            "insert into public.room_members (user_id, room, can_write) values ($1, 'room-1', true), ($2, 'room-1', false)",
            &[&writer, &member],
        )
        .await
        .unwrap();
    let mut py = Driver::start("py", Kind::Python, &url, &anon()).await;
    assert_eq!(join(&mut py, "room-1", &user(member), true, false).await["status"], "SUBSCRIBED");
    let mut w = driver("writer", &url, "2.0.0").await;
    assert_eq!(join(&mut w, "room-1", &user(writer), true, true).await["status"], "SUBSCRIBED");
    assert_eq!(send(&mut w, "room-1", "hello").await, "ok");
    let got = received(&mut py, "room-1", "hello").await;
    assert_eq!(got["message"]["payload"], json!({"event": "hello"}));
    let mut out = Driver::start("py-stranger", Kind::Python, &url, &anon()).await;
    let refused = join(&mut out, "room-1", &user(stranger), true, false).await;
    assert_eq!(refused["status"], "CHANNEL_ERROR", "{refused}");
    assert!(
        refused.to_string().contains("You do not have permissions to read from this Channel topic: room-1"),
        "{refused}"
    );
    t.server.shutdown().await.unwrap();
}
