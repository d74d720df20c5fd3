//! Broadcast on public channels with the real supabase-js (2.0.0 sends
//! kind 3 binary pushes and receives kind 4; 1.0.0 sends and receives text):
//! every member of the topic receives, the sender only with `self`, `ack`
//! resolves after the fan-out, an oversized payload resolves `error`, and a
//! channel on another topic receives nothing; the Python client (1.0.0) and
//! supabase-js broadcast to each other.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::clients::{is_status, Driver, Kind};
use crate::support::server::{anon, TestServer};

async fn member(name: &str, kind: Kind, url: &str, topic: &str, echo: bool, ack: bool) -> Driver {
    let mut js = Driver::start(name, kind, url, &anon()).await;
    js.command(json!({"cmd": "broadcast_subscribe", "channel": topic, "self": echo, "ack": ack})).await;
    let status = js.expect("SUBSCRIBED", |e| is_status(e, topic, None)).await;
    assert_eq!(status["status"], "SUBSCRIBED", "{name}: {status}");
    js
}

async fn send(js: &mut Driver, topic: &str, event: &str, payload: Value) -> Value {
    js.command(json!({"cmd": "broadcast_send", "channel": topic, "event": event, "payload": payload})).await;
    js.expect("the send's result", |e| e["ev"] == "sent" && e["channel"] == topic).await["result"].clone()
}

async fn received(js: &mut Driver, topic: &str) -> Value {
    js.expect("a broadcast", |e| e["ev"] == "broadcast" && e["channel"] == topic).await["message"].clone()
}

/// Nothing more arrives on `topic` within a short wait.
async fn nothing_more(js: &mut Driver, topic: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mark = js.mark();
    js.assert_none_since(mark, "no broadcast", |e| e["ev"] == "broadcast" && e["channel"] == topic);
}

#[tokio::test]
async fn supabase_js_broadcasts_reach_every_member_in_both_protocol_versions() {
    let t = TestServer::start().await;
    let url = format!("http://{}", t.addr());
    let room = "room-1";
    let mut a = member("a", Kind::SupabaseJs("2.0.0"), &url, room, false, true).await;
    let mut b = member("b", Kind::SupabaseJs("1.0.0"), &url, room, false, false).await;
    let mut c = member("c", Kind::SupabaseJs("2.0.0"), &url, room, true, false).await;
    let mut other = member("other", Kind::SupabaseJs("2.0.0"), &url, "room-2", true, false).await;

    // 2.0.0 with ack: a kind 3 push; 'ok' once sent on; the others receive
    // (1.0.0 as text), the sender does not (no `self`).
    assert_eq!(send(&mut a, room, "cursor", json!({"x": 1})).await, "ok");
    let want = json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1}});
    assert_eq!(received(&mut b, room).await, want);
    assert_eq!(received(&mut c, room).await, want);
    nothing_more(&mut a, room).await;

    // `self`: c receives its own too.
    send(&mut c, room, "moved", json!({"y": [1, 2]})).await;
    let want = json!({"type": "broadcast", "event": "moved", "payload": {"y": [1, 2]}});
    for js in [&mut a, &mut b, &mut c] {
        assert_eq!(received(js, room).await, want);
    }

    // 1.0.0 sends text; the 2.0.0 members receive it.
    send(&mut b, room, "hello", json!({"from": "b"})).await;
    let want = json!({"type": "broadcast", "event": "hello", "payload": {"from": "b"}});
    assert_eq!(received(&mut a, room).await, want);
    assert_eq!(received(&mut c, room).await, want);
    nothing_more(&mut b, room).await;

    // Over 256 KiB: not sent; with ack, 'error'.
    assert_eq!(send(&mut a, room, "big", json!({"pad": "x".repeat(300 << 10)})).await, "error");
    nothing_more(&mut b, room).await;
    nothing_more(&mut c, room).await;

    // Another topic heard nothing of it all.
    nothing_more(&mut other, "room-2").await;
    let (_, body) = crate::support::server::http_get(t.addr(), "/metrics", &[]).await;
    let metric = |name: &str| {
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).unwrap_or("0").to_owned()
    };
    assert_eq!(metric("walcast_broadcasts_total"), "3");
    assert_eq!(metric("walcast_broadcast_frames_total"), "7");
    assert_eq!(metric("walcast_broadcasts_too_large_total"), "1");
    t.server.shutdown().await.unwrap();
}

/// The Python client (1.0.0) with a supabase-js 2.0.0 member: both ways.
#[tokio::test]
async fn python_and_supabase_js_broadcast_to_each_other() {
    let t = TestServer::start().await;
    let url = format!("http://{}", t.addr());
    let room = "room-py";
    let mut py = member("py", Kind::Python, &url, room, false, false).await;
    let mut js = member("js", Kind::SupabaseJs("2.0.0"), &url, room, false, true).await;
    assert_eq!(send(&mut js, room, "ping", json!({"n": 1})).await, "ok");
    let got = received(&mut py, room).await;
    assert_eq!((got["event"].clone(), got["payload"].clone()), (json!("ping"), json!({"n": 1})));
    send(&mut py, room, "pong", json!({"n": 2})).await;
    let got = received(&mut js, room).await;
    assert_eq!(got, json!({"type": "broadcast", "event": "pong", "payload": {"n": 2}}));
    t.server.shutdown().await.unwrap();
}
