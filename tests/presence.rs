//! Presence with the real clients (broadcast-presence.md §3, checklist
//! 8–14): supabase-js 2.0.0 and 1.0.0 in one room and the Python client see
//! exactly the room's members — joins, updates, several metas under one
//! key, untrack, leave and a killed client — and the wire rules (state after
//! the join reply, a diff per change, the rate limit and the map rule) hold
//! on a raw socket.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::clients::{is_status, Driver, Kind};
use crate::support::server::{anon, TestServer, Ws};
use walcast::hub::Vsn;

async fn member(name: &str, kind: Kind, url: &str, room: &str, key: Option<&str>) -> Driver {
    let mut js = Driver::start(name, kind, url, &anon()).await;
    let mut cmd = json!({"cmd": "presence_subscribe", "channel": room});
    if let Some(key) = key {
        cmd["key"] = json!(key);
    }
    js.command(cmd).await;
    let status = js.expect("SUBSCRIBED", |e| is_status(e, room, None)).await;
    assert_eq!(status["status"], "SUBSCRIBED", "{name}: {status}");
    js
}

async fn track(js: &mut Driver, room: &str, payload: Value) -> Value {
    js.command(json!({"cmd": "track", "channel": room, "payload": payload})).await;
    js.expect("the track's result", |e| e["ev"] == "tracked" && e["channel"] == room).await["result"].clone()
}

async fn untrack(js: &mut Driver, room: &str) -> Value {
    js.command(json!({"cmd": "untrack", "channel": room})).await;
    js.expect("the untrack's result", |e| e["ev"] == "untracked" && e["channel"] == room).await["result"].clone()
}

/// The next presence event of `kind` on `room`.
async fn presence(js: &mut Driver, room: &str, kind: &str) -> Value {
    js.expect(kind, |e| e["ev"] == "presence" && e["channel"] == room && e["kind"] == kind).await
}

/// A state's metas without their refs, per key, sorted: what the app sees.
fn members(state: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (key, metas) in state.as_object().expect("a state object") {
        let mut metas: Vec<Value> = metas
            .as_array()
            .expect("a list of presences")
            .iter()
            .map(|m| {
                let mut m = m.as_object().unwrap().clone();
                let r = m.remove("presence_ref").or_else(|| m.remove("phx_ref"));
                assert!(r.is_some_and(|r| r.as_str().is_some_and(|r| !r.is_empty())), "every meta has a ref: {state}");
                Value::Object(m)
            })
            .collect();
        metas.sort_by_key(Value::to_string);
        out.insert(key.clone(), Value::Array(metas));
    }
    Value::Object(out)
}

/// Waits until `js`'s presence state on `room` equals `want` (refs aside).
async fn state_becomes(js: &mut Driver, room: &str, want: &Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let last = js.since(0, |e| e["ev"] == "presence" && e["channel"] == room).last().map(|e| members(&e["state"]));
        if last.as_ref() == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence state of {room} is {last:?}, want {want}\n{}",
            js.report()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn supabase_js_sees_exactly_the_rooms_members_in_both_protocol_versions() {
    let t = TestServer::start().await;
    let url = format!("http://{}", t.addr());
    let room = "lobby";
    let mut a = member("a", Kind::SupabaseJs("2.0.0"), &url, room, Some("u1")).await;
    // presence_state {} right after the join: a sync with an empty state.
    assert_eq!(members(&presence(&mut a, room, "sync").await["state"]), json!({}));
    let mut b = member("b", Kind::SupabaseJs("1.0.0"), &url, room, Some("u2")).await;
    presence(&mut b, room, "sync").await;

    assert_eq!(track(&mut a, room, json!({"user": "u1"})).await, "ok");
    let joined = presence(&mut b, room, "join").await;
    assert_eq!(joined["key"], "u1");
    state_becomes(&mut b, room, &json!({"u1": [{"user": "u1"}]})).await;
    state_becomes(&mut a, room, &json!({"u1": [{"user": "u1"}]})).await;
    assert_eq!(track(&mut b, room, json!({"user": "u2"})).await, "ok");
    let both = json!({"u1": [{"user": "u1"}], "u2": [{"user": "u2"}]});
    state_becomes(&mut a, room, &both).await;

    // A third socket with the same key: its state arrives whole at the
    // join, and its track adds a second meta under u1.
    let mut c = member("c", Kind::SupabaseJs("2.0.0"), &url, room, Some("u1")).await;
    state_becomes(&mut c, room, &both).await;
    assert_eq!(track(&mut c, room, json!({"user": "u1", "tab": 2})).await, "ok");
    let three = json!({"u1": [{"tab": 2, "user": "u1"}, {"user": "u1"}], "u2": [{"user": "u2"}]});
    for js in [&mut a, &mut b, &mut c] {
        state_becomes(js, room, &three).await;
    }

    // An update replaces a's meta (one diff: joins and leaves).
    assert_eq!(track(&mut a, room, json!({"user": "u1", "status": "away"})).await, "ok");
    let updated = json!({"u1": [{"status": "away", "user": "u1"}, {"tab": 2, "user": "u1"}], "u2": [{"user": "u2"}]});
    for js in [&mut a, &mut b, &mut c] {
        state_becomes(js, room, &updated).await;
    }
    // The same payload again changes nothing: no presence event anywhere.
    let mark = b.mark();
    assert_eq!(track(&mut a, room, json!({"user": "u1", "status": "away"})).await, "ok");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.assert_none_since(mark, "a presence event", |e| e["ev"] == "presence");

    // untrack: c's meta leaves.
    assert_eq!(untrack(&mut c, room).await, "ok");
    let after_untrack = json!({"u1": [{"status": "away", "user": "u1"}], "u2": [{"user": "u2"}]});
    state_becomes(&mut a, room, &after_untrack).await;
    state_becomes(&mut b, room, &after_untrack).await;

    // b leaves the channel: u2 leaves.
    b.unsubscribe(room).await;
    a.expect("u2's leave", |e| e["ev"] == "presence" && e["kind"] == "leave" && e["key"] == "u2").await;
    state_becomes(&mut a, room, &json!({"u1": [{"status": "away", "user": "u1"}]})).await;

    // c tracks again, then its process is killed: its meta leaves.
    track(&mut c, room, json!({"user": "c"})).await;
    state_becomes(&mut a, room, &json!({"u1": [{"status": "away", "user": "u1"}, {"user": "c"}]})).await;
    drop(c);
    state_becomes(&mut a, room, &json!({"u1": [{"status": "away", "user": "u1"}]})).await;

    // Without a key the server picks one per join: a UUID.
    let mut d = member("d", Kind::SupabaseJs("2.0.0"), &url, room, None).await;
    track(&mut d, room, json!({"user": "d"})).await;
    let joined = a.expect("d's join", |e| e["kind"] == "join" && e["presences"][0]["user"] == "d").await;
    let key = joined["key"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&key).is_ok(), "a generated key is a UUID: {key}");

    let (_, body) = crate::support::server::http_get(t.addr(), "/metrics", &[]).await;
    let metric = |name: &str| {
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).unwrap_or("0").to_owned()
    };
    assert_eq!(metric("walcast_presences"), "2", "a's and d's entries");
    t.server.shutdown().await.unwrap();
}

/// The Python client's presence (1.0.0, no buffering): its callbacks fire
/// and its state matches the room; every meta carries `phx_ref`.
#[tokio::test]
async fn python_presence_with_supabase_js() {
    let t = TestServer::start().await;
    let url = format!("http://{}", t.addr());
    let room = "py-room";
    let mut py = member("py", Kind::Python, &url, room, Some("py")).await;
    let mut js = member("js", Kind::SupabaseJs("2.0.0"), &url, room, Some("js")).await;
    assert_eq!(track(&mut js, room, json!({"who": "js"})).await, "ok");
    let joined = presence(&mut py, room, "join").await;
    assert_eq!(joined["key"], "js");
    track(&mut py, room, json!({"who": "py"})).await;
    let both = json!({"js": [{"who": "js"}], "py": [{"who": "py"}]});
    state_becomes(&mut py, room, &both).await;
    state_becomes(&mut js, room, &both).await;
    untrack(&mut py, room).await;
    state_becomes(&mut js, room, &json!({"js": [{"who": "js"}]})).await;
    let left = presence(&mut py, room, "leave").await;
    assert_eq!(left["key"], "py");
    t.server.shutdown().await.unwrap();
}

/// Join with presence config on a raw socket.
async fn join_presence(ws: &mut Ws, vsn: Vsn, topic: &str, key: &str, enabled: bool) -> String {
    let join_ref = ws.make_ref();
    let payload = json!({"config": {"broadcast": {"self": false}, "presence": {"key": key, "enabled": enabled},
                                    "postgres_changes": [], "private": false}});
    let frame = match vsn {
        Vsn::V2 => json!([join_ref, join_ref, topic, "phx_join", payload]),
        Vsn::V1 => {
            json!({"topic": topic, "event": "phx_join", "payload": payload, "ref": join_ref, "join_ref": join_ref})
        }
    };
    ws.send_raw(tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into())).await;
    join_ref
}

#[tokio::test]
async fn presence_wire_rules_limits_and_disabled_channels() {
    let t = TestServer::start().await;
    let topic = "realtime:wire";
    let mut a = t.connect(&anon(), Vsn::V2).await;
    let join_ref = join_presence(&mut a, Vsn::V2, topic, "a", true).await;
    // The reply, then presence_state (a channel push with the join_ref).
    let reply = a.next().await.unwrap();
    assert_eq!((reply.event.as_str(), reply.payload["status"].clone()), ("phx_reply", json!("ok")));
    let state = a.next().await.unwrap();
    assert_eq!(state.event, "presence_state");
    assert_eq!(state.join_ref.as_deref(), Some(join_ref.as_str()));
    assert_eq!(state.payload, json!({}));

    // A channel that did not enable presence: no presence_state; its
    // tracking is still seen by others (and diffs still reach it).
    let mut b = t.connect(&anon(), Vsn::V1).await;
    let b_ref = join_presence(&mut b, Vsn::V1, topic, "b", false).await;
    assert_eq!(b.next().await.unwrap().event, "phx_reply");
    let track_ref = b.send(Some(&b_ref), topic, "presence", json!({"event": "track", "payload": {"n": 1}})).await;
    let reply = b.next().await.unwrap();
    assert_eq!(reply.event, "presence_diff", "the tracker's own channel gets the diff (before the reply)");
    assert_eq!(reply.raw["ref"], Value::Null);
    let reply = b.next().await.unwrap();
    assert_eq!((reply.event.as_str(), reply.msg_ref.as_deref()), ("phx_reply", Some(track_ref.as_str())));
    assert_eq!(reply.payload, json!({"status": "ok", "response": {}}));
    let diff = a.expect(topic, "presence_diff").await;
    assert_eq!(diff.join_ref, None, "diffs are fastlane");
    assert_eq!(diff.payload["leaves"], json!({}));
    assert_eq!(diff.payload["joins"]["b"]["metas"][0]["n"], 1);
    assert!(diff.payload["joins"]["b"]["metas"][0]["phx_ref"].is_string());

    // A payload that is not a map.
    a.send(Some(&join_ref), topic, "presence", json!({"event": "track", "payload": [1]})).await;
    let reply = a.expect(topic, "phx_reply").await;
    assert_eq!(reply.payload["response"], json!({"reason": "Presence track payload must be a map"}));
    // No event: ok, nothing happens. Unknown event: error.
    a.send(Some(&join_ref), topic, "presence", json!({})).await;
    assert_eq!(a.expect(topic, "phx_reply").await.payload["status"], "ok");
    a.send(Some(&join_ref), topic, "presence", json!({"event": "wave"})).await;
    assert_eq!(a.expect(topic, "phx_reply").await.payload, json!({"status": "error", "response": {}}));
    // Those were 3 calls in this window; 2 more pass, the 6th closes the channel.
    for n in 0..2 {
        a.send(Some(&join_ref), topic, "presence", json!({"event": "track", "payload": {"n": n}})).await;
        a.expect(topic, "phx_reply").await;
    }
    a.send(Some(&join_ref), topic, "presence", json!({"event": "untrack"})).await;
    let system = a.expect(topic, "system").await;
    assert_eq!(system.payload["message"], "Client presence rate limit exceeded");
    assert_eq!(system.payload["status"], "error");
    a.expect(topic, "phx_close").await;
    // Its presence left with it; b saw the join and the leave of key a.
    let mut saw_leave = false;
    while let Some(frame) = b.next_within(Duration::from_secs(2)).await {
        if frame.event == "presence_diff" && frame.payload["leaves"].get("a").is_some() {
            saw_leave = true;
            break;
        }
    }
    assert!(saw_leave, "the closed channel's presence left");
    // The socket still serves: a heartbeat is answered.
    a.send(None, "phoenix", "heartbeat", json!({})).await;
    loop {
        let frame = a.next().await.expect("the socket is open");
        if frame.topic == "phoenix" {
            assert_eq!(frame.payload["status"], "ok");
            break;
        }
    }
    t.server.shutdown().await.unwrap();
}
