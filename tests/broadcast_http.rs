//! Broadcast over HTTP (broadcast-presence.md §2.5, checklist item 7): the
//! real supabase-js falls back to the REST batch from a channel that is not
//! joined and sends single messages with `httpSend` (JSON and binary), the
//! Python client with `http_send`; members on 2.0.0 and 1.0.0 receive what
//! Supabase sends them. Raw requests check the refusals (401, 403, 413, 415,
//! 422, 429), both path prefixes, the deny path of private messages and the
//! counters.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use walcast::hub::Vsn;
use walcast::realtime::auth::sign_hs256;

use crate::support::clients::{is_status, Driver, Kind};
use crate::support::server::{anon, http_get, http_post, http_request, now, token, TestServer, Ws};

/// A supabase-js (or Python) member of `topic` that emits every broadcast.
async fn member(name: &str, kind: Kind, url: &str, topic: &str) -> Driver {
    let mut js = Driver::start(name, kind, url, &anon()).await;
    js.command(json!({"cmd": "broadcast_subscribe", "channel": topic})).await;
    let status = js.expect("SUBSCRIBED", |e| is_status(e, topic, None)).await;
    assert_eq!(status["status"], "SUBSCRIBED", "{name}: {status}");
    js
}

async fn received(js: &mut Driver, topic: &str) -> Value {
    js.expect("a broadcast", |e| e["ev"] == "broadcast" && e["channel"] == topic).await["message"].clone()
}

/// A raw socket joined to `topic` (no bindings); returns once the join is
/// done (a heartbeat's reply follows it on the socket).
async fn raw_member(t: &TestServer, vsn: Vsn, topic: &str) -> Ws {
    let mut ws = t.connect(&anon(), vsn).await;
    ws.join(topic, json!([]), None).await;
    let reply = ws.expect(topic, "phx_reply").await;
    assert_eq!(reply.payload["status"], "ok", "{:?}", reply.raw);
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    ws.expect("phoenix", "phx_reply").await;
    ws
}

/// What a raw socket received as a broadcast.
#[derive(Debug, PartialEq)]
enum Got {
    /// A text `broadcast` push's payload.
    Text(Value),
    /// A kind 4 frame: event, meta, encoding, payload bytes.
    Kind4 { topic: String, event: String, meta: String, encoding: u8, payload: Vec<u8> },
}

/// The next broadcast on a raw socket (other frames skipped).
async fn raw_received(ws: &mut Ws) -> Got {
    loop {
        match ws.next_message().await.expect("socket open") {
            Message::Text(text) => {
                let frame = ws.decode(text.as_str());
                if frame.event == "broadcast" {
                    return Got::Text(frame.payload);
                }
            }
            Message::Binary(b) => {
                assert_eq!(b[0], 4, "a kind 4 frame: {b:?}");
                let (tl, el, ml, encoding) = (b[1] as usize, b[2] as usize, b[3] as usize, b[4]);
                let text = |from: usize, len: usize| String::from_utf8(b[from..from + len].to_vec()).unwrap();
                return Got::Kind4 {
                    topic: text(5, tl),
                    event: text(5 + tl, el),
                    meta: text(5 + tl + el, ml),
                    encoding,
                    payload: b[5 + tl + el + ml..].to_vec(),
                };
            }
            _ => {}
        }
    }
}

/// Nothing (more) arrives on a raw socket within a short wait.
async fn raw_nothing(ws: &mut Ws) {
    if let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(400), ws.next_message()).await {
        panic!("expected nothing, got {message:?}");
    }
}

/// Nothing more arrives on a driver's `topic` within a short wait.
async fn nothing_more(js: &mut Driver, topic: &str) {
    let mark = js.mark();
    tokio::time::sleep(Duration::from_millis(400)).await;
    js.assert_none_since(mark, "no broadcast", |e| e["ev"] == "broadcast" && e["channel"] == topic);
}

#[tokio::test]
async fn the_official_clients_broadcast_over_http() {
    let t = TestServer::start().await;
    let url = format!("http://{}", t.addr());
    let room = "room-1";
    let mut v2 = member("v2", Kind::SupabaseJs("2.0.0"), &url, room).await;
    let mut v1 = member("v1", Kind::SupabaseJs("1.0.0"), &url, room).await;
    let mut raw = raw_member(&t, Vsn::V2, "realtime:room-1").await;

    // A channel that is not joined: send() falls back to the REST batch → 'ok',
    // and every member gets a text broadcast.
    let mut sender = Driver::start("sender", Kind::SupabaseJs("2.0.0"), &url, &anon()).await;
    sender.command(json!({"cmd": "channel", "channel": room})).await;
    sender.command(json!({"cmd": "broadcast_send", "channel": room, "event": "cursor", "payload": {"x": 1}})).await;
    let sent = sender.expect("the send's result", |e| e["ev"] == "sent").await;
    assert_eq!(sent["result"], "ok", "{sent}");
    let want = json!({"type": "broadcast", "event": "cursor", "payload": {"x": 1}});
    assert_eq!(received(&mut v2, room).await, want);
    assert_eq!(received(&mut v1, room).await, want);
    assert_eq!(raw_received(&mut raw).await, Got::Text(want.clone()));

    // httpSend (JSON) → 202 → {success:true}; 2.0.0 gets kind 4, 1.0.0 text.
    sender.command(json!({"cmd": "http_send", "channel": room, "event": "cursor", "payload": {"x": 2}})).await;
    let sent = sender.expect("httpSend's result", |e| e["ev"] == "http_sent").await;
    assert_eq!(sent["result"], json!({"success": true}), "{sent}");
    let want = json!({"type": "broadcast", "event": "cursor", "payload": {"x": 2}});
    assert_eq!(received(&mut v2, room).await, want);
    assert_eq!(received(&mut v1, room).await, want);
    let kind4 = |event: &str, encoding: u8, payload: &[u8]| Got::Kind4 {
        topic: "realtime:room-1".into(),
        event: event.into(),
        meta: String::new(),
        encoding,
        payload: payload.to_vec(),
    };
    assert_eq!(raw_received(&mut raw).await, kind4("cursor", 1, br#"{"x":2}"#));

    // httpSend (ArrayBuffer) → octet-stream → 2.0.0 gets the bytes, 1.0.0 nothing.
    let bytes = [0u8, 1, 2, 255];
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    sender.command(json!({"cmd": "http_send", "channel": room, "event": "blob", "binary": b64})).await;
    let sent = sender.expect("httpSend's result", |e| e["ev"] == "http_sent").await;
    assert_eq!(sent["result"], json!({"success": true}), "{sent}");
    let got = received(&mut v2, room).await;
    assert_eq!((got["event"].clone(), got["payload"].clone()), (json!("blob"), json!({"binary": b64})));
    assert_eq!(raw_received(&mut raw).await, kind4("blob", 0, &bytes));

    // Private, not allowed (Realtime Authorization denies every write for
    // now): httpSend rejects with "Unauthorized"; the REST fallback is still
    // accepted ('ok'), the item skipped. (Another topic: supabase-js hands
    // back the existing channel for a topic it has.)
    sender.command(json!({"cmd": "channel", "channel": "secret", "private": true})).await;
    sender.command(json!({"cmd": "http_send", "channel": "secret", "event": "cursor", "payload": {"x": 3}})).await;
    let sent = sender.expect("httpSend's result", |e| e["ev"] == "http_sent").await;
    assert_eq!(sent["error"], "Unauthorized", "{sent}");
    sender.command(json!({"cmd": "broadcast_send", "channel": "secret", "event": "cursor", "payload": {"x": 4}})).await;
    let sent = sender.expect("the send's result", |e| e["ev"] == "sent").await;
    assert_eq!(sent["result"], "ok", "{sent}");

    // Python http_send (a channel it never joined).
    let mut py = Driver::start("py", Kind::Python, &url, &anon()).await;
    py.command(json!({"cmd": "channel", "channel": room})).await;
    py.command(json!({"cmd": "http_send", "channel": room, "event": "ping", "payload": {"n": 1}})).await;
    let sent = py.expect("http_send's result", |e| e["ev"] == "http_sent").await;
    assert_eq!(sent["result"], "ok", "{sent}");
    let want = json!({"type": "broadcast", "event": "ping", "payload": {"n": 1}});
    assert_eq!(received(&mut v2, room).await, want);
    assert_eq!(received(&mut v1, room).await, want);
    assert_eq!(raw_received(&mut raw).await, kind4("ping", 1, br#"{"n":1}"#));

    // The 1.0.0 member never got the bytes, nobody the private messages.
    nothing_more(&mut v1, room).await;
    nothing_more(&mut v2, room).await;
    raw_nothing(&mut raw).await;
    for driver in [&mut v2, &mut v1, &mut sender, &mut py] {
        driver.assert_clean();
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn raw_requests_are_checked_and_counted() {
    let t = TestServer::start().await;
    let addr = t.addr();
    let mut v2 = raw_member(&t, Vsn::V2, "realtime:room-1").await;
    let mut v1 = raw_member(&t, Vsn::V1, "realtime:room-1").await;
    let key = anon();
    let apikey = [("apikey", key.as_str()), ("content-type", "application/json")];
    let batch = |messages: Value| serde_json::to_vec(&json!({ "messages": messages })).unwrap();
    let one = batch(json!([{"topic": "room-1", "event": "e", "payload": {"a": 1}}]));

    // 401: no token, a token signed with another secret (Bearer wins over a
    // good apikey), an expired one.
    let unauthorized = (401, json!({"message": "Unauthorized"}).to_string());
    assert_eq!(http_post(addr, "/api/broadcast", &[], &one).await, unauthorized);
    let forged = sign_hs256(b"another-secret-of-at-least-32-characters!", &json!({"role": "anon", "exp": now() + 60}));
    let bearer = format!("Bearer {forged}");
    let headers = [("apikey", key.as_str()), ("authorization", bearer.as_str())];
    assert_eq!(http_post(addr, "/api/broadcast", &headers, &one).await, unauthorized);
    let expired = token("anon", None, -60);
    assert_eq!(http_post(addr, "/realtime/v1/api/broadcast", &[("apikey", &expired)], &one).await, unauthorized);

    // 202 with an empty body: the apikey alone, and a Bearer token over a bad
    // apikey; `id` becomes meta.id; both prefixes.
    let with_id = batch(json!([{"topic": "room-1", "event": "e", "payload": {"a": 1}, "id": "m-1"}]));
    assert_eq!(http_post(addr, "/api/broadcast", &apikey, &with_id).await, (202, String::new()));
    let want = json!({"type": "broadcast", "event": "e", "payload": {"a": 1}, "meta": {"id": "m-1"}});
    assert_eq!(raw_received(&mut v2).await, Got::Text(want.clone()));
    assert_eq!(raw_received(&mut v1).await, Got::Text(want));
    let bearer = format!("Bearer {key}");
    let headers = [("apikey", "not-a-token"), ("authorization", bearer.as_str())];
    assert_eq!(http_post(addr, "/realtime/v1/api/broadcast/", &headers, &one).await, (202, String::new()));
    let want = json!({"type": "broadcast", "event": "e", "payload": {"a": 1}});
    assert_eq!(raw_received(&mut v2).await, Got::Text(want.clone()));
    assert_eq!(raw_received(&mut v1).await, Got::Text(want));

    // 422: missing fields, a payload that is not an object, a payload over
    // --max-broadcast-bytes; nothing of such a batch is sent.
    let (status, body) = http_post(addr, "/api/broadcast", &apikey, &batch(json!([{"event": "e"}]))).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, body),
        (
            422,
            json!({"errors": {"messages": ["messages[0].topic: can't be blank", "messages[0].payload: can't be blank"]}})
        )
    );
    let mixed = batch(
        json!([{"topic": "room-1", "event": "e", "payload": {}}, {"topic": "room-1", "event": "e", "payload": [1]}]),
    );
    let (status, body) = http_post(addr, "/api/broadcast", &apikey, &mixed).await;
    assert_eq!((status, body.contains("messages[1].payload: must be an object")), (422, true), "{body}");
    let big = batch(json!([{"topic": "room-1", "event": "e", "payload": {"pad": "x".repeat(300 << 10)}}]));
    let (status, body) = http_post(addr, "/api/broadcast", &apikey, &big).await;
    let too_large = json!({"errors": {"messages": ["Payload size exceeds tenant limit"]}});
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()), (422, too_large));
    assert_eq!(http_post(addr, "/api/broadcast", &apikey, &batch(json!({}))).await.0, 422);
    // 400: not JSON.
    assert_eq!(http_post(addr, "/api/broadcast", &apikey, b"{messages").await.0, 400);
    // 429: more than 100 messages.
    let many: Vec<Value> = (0..101).map(|_| json!({"topic": "room-1", "event": "e", "payload": {}})).collect();
    let (status, body) = http_post(addr, "/api/broadcast", &apikey, &batch(json!(many))).await;
    let want = json!({"message": "Too many messages to broadcast, please reduce the batch size"});
    assert_eq!((status, serde_json::from_str::<Value>(&body).unwrap()), (429, want));
    // 413: a body announced over --max-message-bytes (1 MiB) is refused unread.
    let length = ((1 << 20) + 1).to_string();
    let headers = [("apikey", key.as_str()), ("content-length", length.as_str())];
    let (status, body) = http_post(addr, "/api/broadcast", &headers, b"").await;
    assert_eq!(status, 413, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{body}");
    raw_nothing(&mut v2).await;

    // A private item is skipped (Realtime Authorization denies it), the
    // public one delivered: 202.
    let private = batch(json!([
        {"topic": "room-1", "event": "hidden", "payload": {}, "private": true},
        {"topic": "room-1", "event": "shown", "payload": {}},
    ]));
    assert_eq!(http_post(addr, "/api/broadcast", &apikey, &private).await, (202, String::new()));
    let Got::Text(got) = raw_received(&mut v2).await else { panic!("a text broadcast") };
    assert_eq!(got["event"], "shown");
    let Got::Text(got) = raw_received(&mut v1).await else { panic!("a text broadcast") };
    assert_eq!(got["event"], "shown");

    // Single: JSON (path segments decoded, `persist` ignored) → kind 4 to
    // 2.0.0, text to 1.0.0; no content type = JSON; bytes → kind 4 enc 0
    // only; other types 415; private 403; oversized 422.
    let target = "/realtime/v1/api/broadcast/room%2D1/events/a%20b?persist=true";
    assert_eq!(http_post(addr, target, &apikey, b"[1, 2]").await, (202, String::new()));
    let Got::Kind4 { topic, event, encoding, payload, .. } = raw_received(&mut v2).await else { panic!("kind 4") };
    assert_eq!(
        (topic.as_str(), event.as_str(), encoding, payload.as_slice()),
        ("realtime:room-1", "a b", 1, &b"[1,2]"[..])
    );
    let want = json!({"type": "broadcast", "event": "a b", "payload": [1, 2]});
    assert_eq!(raw_received(&mut v1).await, Got::Text(want));
    let bare = [("apikey", key.as_str())];
    assert_eq!(http_post(addr, "/api/broadcast/room-1/events/n", &bare, b"7").await, (202, String::new()));
    assert!(matches!(raw_received(&mut v2).await, Got::Kind4 { encoding: 1, .. }));
    assert_eq!(raw_received(&mut v1).await, Got::Text(json!({"type": "broadcast", "event": "n", "payload": 7})));
    let octets = [("apikey", key.as_str()), ("content-type", "application/octet-stream")];
    assert_eq!(http_post(addr, "/api/broadcast/room-1/events/raw", &octets, b"\x00\xff").await, (202, String::new()));
    let Got::Kind4 { encoding, payload, .. } = raw_received(&mut v2).await else { panic!("kind 4") };
    assert_eq!((encoding, payload.as_slice()), (0, &b"\x00\xff"[..]));
    let text = [("apikey", key.as_str()), ("content-type", "text/plain")];
    let (status, body) = http_post(addr, "/api/broadcast/room-1/events/e", &text, b"hi").await;
    let error = serde_json::from_str::<Value>(&body).unwrap()["error"].as_str().unwrap_or_default().to_owned();
    assert_eq!((status, error.starts_with("Unsupported Media Type.")), (415, true), "{body}");
    let (status, body) = http_post(addr, "/api/broadcast/room-1/events/e?private=true", &apikey, b"{}").await;
    assert_eq!((status, body), unauthorized_403());
    let big = serde_json::to_vec(&json!({"pad": "x".repeat(300 << 10)})).unwrap();
    assert_eq!(http_post(addr, "/api/broadcast/room-1/events/e", &apikey, &big).await.0, 422);
    assert_eq!(http_post(addr, "/api/broadcast/room-1/events/e", &[], b"{}").await, unauthorized);
    // The 1.0.0 socket got no raw bytes, nobody anything refused.
    raw_nothing(&mut v1).await;
    raw_nothing(&mut v2).await;

    // Other methods and paths: 404 as before.
    assert_eq!(http_get(addr, "/api/broadcast", &[]).await.0, 404);
    assert_eq!(http_request(addr, "PUT", "/api/broadcast", &apikey, &one).await.0, 404);
    assert_eq!(http_post(addr, "/api/broadcast/room-1/events", &apikey, &one).await.0, 404);
    assert_eq!(http_post(addr, "/api/other", &apikey, &one).await.0, 404);

    let (_, metrics) = http_get(addr, "/metrics", &[]).await;
    let metric = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).unwrap_or("-").to_owned()
    };
    assert_eq!(metric("walcast_http_broadcasts_total"), "6", "{metrics}");
    assert_eq!(metric("walcast_http_broadcasts_private_denied_total"), "2");
    let refused = |reason: &str| metric(&format!("walcast_http_broadcasts_refused_total{{reason=\"{reason}\"}}"));
    let counts: Vec<(&str, String)> = [
        "unauthorized",
        "invalid",
        "payload_too_large",
        "bad_body",
        "too_many_messages",
        "body_too_large",
        "unsupported_media_type",
        "forbidden",
        "busy",
    ]
    .into_iter()
    .map(|r| (r, refused(r)))
    .collect();
    let want: Vec<(&str, String)> = [
        ("unauthorized", 4),
        ("invalid", 3),
        ("payload_too_large", 2),
        ("bad_body", 1),
        ("too_many_messages", 1),
        ("body_too_large", 1),
        ("unsupported_media_type", 1),
        ("forbidden", 1),
        ("busy", 0),
    ]
    .into_iter()
    .map(|(r, n)| (r, n.to_string()))
    .collect();
    assert_eq!(counts, want);
    t.server.shutdown().await.unwrap();
}

fn unauthorized_403() -> (u16, String) {
    (403, json!({"message": "Unauthorized"}).to_string())
}
