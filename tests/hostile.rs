//! Hostile input on the WebSocket side: malformed frames, invalid JSON and
//! UTF-8, oversized messages, a join flood, unknown topics. Each gets a
//! precise error reply or close code, and a second client keeps receiving
//! every change, in order, throughout. Over-budget upgrades (per user, per
//! address, the connection cap under a burst) get HTTP 429 with the budget
//! named, while everyone else connects; `X-Forwarded-For` counts only from a
//! trusted proxy.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use walcast::hub::Vsn;
use walcast::realtime::Limits;

use crate::support::server::{anon, http_get, token, user, TestServer, Ws, WAIT};
use crate::support::{add_member, create_dealership, create_order, create_user};

/// Upgrades a raw TCP connection by hand and returns it (for invalid frames
/// no WebSocket library would send).
async fn raw_socket(t: &TestServer, key: &str) -> TcpStream {
    let mut stream = TcpStream::connect(t.addr()).await.unwrap();
    let request = format!(
        "GET /realtime/v1/websocket?apikey={key}&vsn=2.0.0 HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
         connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream
}

/// Reads server frames off a raw socket until a close frame; returns its code.
async fn raw_close_code(stream: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Parse unmasked server frames (2-byte header, 16-bit extended length).
        while buf.len() >= 2 {
            let opcode = buf[0] & 0x0f;
            let (len, header) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if buf.len() < header + len {
                break;
            }
            if opcode == 8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[header], buf[header + 1]]));
            }
            buf.drain(..header + len);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A masked client frame.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![first, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn hostile_sockets_get_precise_errors_and_a_witness_misses_nothing() {
    let t = TestServer::start().await;
    let owner = create_user(&t.client, "o@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    let service = token("service_role", None, 3600);

    let mut witness = t.connect(&service, Vsn::V2).await;
    witness
        .subscribe("realtime:witness", json!([{"event": "INSERT", "schema": "public", "table": "orders"}]), None)
        .await;
    // Writes run during the whole attack.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer_client = t.db.connect().await.unwrap();
    let writer = tokio::spawn(async move {
        let mut written = Vec::new();
        // At least five writes, however fast the attack finishes.
        while !*stop_rx.borrow() || written.len() < 5 {
            written.push(create_order(&writer_client, north, owner, "sales", "pending").await);
            let _ = tokio::time::timeout(Duration::from_millis(40), stop_rx.changed()).await;
        }
        written
    });

    // 1. Invalid JSON and wrong shapes: ignored; the socket keeps working.
    let mut ws = t.connect(&service, Vsn::V2).await;
    let deep = "[".repeat(10_000);
    for junk in ["{", "null", "[]", "[1,2,3,4]", "{\"topic\":1}", "[null,null,5,\"x\",{}]", deep.as_str(), "\u{0}"] {
        ws.send_raw(Message::Text(junk.into())).await;
    }
    for _ in 0..1_000 {
        ws.send_raw(Message::Text("not json".into())).await;
    }
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok");

    // 2. Unknown topics and events: error replies with reasons.
    ws.send(None, "realtime:nobody-joined-this", "whatever", json!({})).await;
    let reply = ws.expect("realtime:nobody-joined-this", "phx_reply").await;
    assert_eq!(reply.payload["response"]["reason"], "unmatched topic");
    ws.send(None, "not-a-realtime-topic", "phx_join", json!({})).await;
    assert_eq!(ws.expect("not-a-realtime-topic", "phx_reply").await.payload["response"]["reason"], "unmatched topic");
    ws.send(None, "realtime:", "phx_join", json!({})).await;
    let reply = ws.expect("realtime:", "phx_reply").await;
    assert!(reply.payload["response"]["reason"].as_str().unwrap().starts_with("TopicNameRequired"));
    ws.send(None, "phoenix", "reboot", json!({})).await;
    assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "error");

    // 3. A join flood: 10,000 joins pipelined on one socket. The burst is
    // served, then each further join is refused with a precise reason (as
    // Supabase: the join, not the socket).
    let mut flood = t.connect(&service, Vsn::V2).await;
    let frames: Vec<Message> = (0..10_000)
        .map(|i| {
            let topic = format!("realtime:flood-{i}");
            Message::Text(json!([i.to_string(), i.to_string(), topic, "phx_join", {"config": {}}]).to_string().into())
        })
        .collect();
    let mut sink_frames = futures::stream::iter(frames.into_iter().map(Ok));
    // The server may close mid-flood; a failed send is expected then.
    let _ = flood.ws.send_all(&mut sink_frames).await;
    let mut refused = None;
    let mut ok = 0;
    let mut refusals = 0;
    let code = loop {
        if ok + refusals == 10_000 {
            break None;
        }
        match tokio::time::timeout(Duration::from_secs(15), flood.ws.next()).await.expect("flood answered") {
            Some(Ok(Message::Text(text))) => {
                let frame = flood.decode(text.as_str());
                match frame.payload["status"].as_str() {
                    Some("ok") => ok += 1,
                    Some(_) => {
                        refusals += 1;
                        refused = refused.or(frame.payload["response"]["reason"].as_str().map(str::to_owned));
                    }
                    None => {}
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break Some(0),
        }
    };
    assert_eq!(code, None, "every join answered and the socket left open ({ok} ok, {refusals} refused)");
    flood.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(flood.expect("phoenix", "phx_reply").await.payload["status"], "ok", "the socket still serves");
    assert!((1..=100).contains(&ok), "the burst is served before the limit: {ok}");
    let refused = refused.expect("a refusal");
    assert!(
        refused == "ChannelRateLimitReached: Too many channels"
            || refused == "ClientJoinRateLimitReached: Too many joins per second",
        "{refused}"
    );

    // 4. An oversized message: close 1009.
    let mut big = t.connect(&service, Vsn::V1).await;
    big.send(None, "phoenix", "heartbeat", json!({"pad": "x".repeat(2 << 20)})).await;
    assert_eq!(big.close_code().await, Some(1009));

    // 5. Invalid WebSocket frames, written byte by byte.
    let mut raw = raw_socket(&t, &service).await;
    raw.write_all(&client_frame(0x83, b"reserved opcode")).await.unwrap();
    assert_eq!(raw_close_code(&mut raw).await, Some(1002), "reserved opcode");
    let mut raw = raw_socket(&t, &service).await;
    raw.write_all(&client_frame(0x81, &[0xff, 0xfe, 0xfd])).await.unwrap();
    assert_eq!(raw_close_code(&mut raw).await, Some(1007), "invalid UTF-8 text");
    let mut raw = raw_socket(&t, &service).await;
    raw.write_all(&[0x81, 0x05, b'h', b'e', b'l', b'l', b'o']).await.unwrap(); // unmasked
    assert_eq!(raw_close_code(&mut raw).await, Some(1002), "unmasked client frame");
    let mut raw = raw_socket(&t, &service).await;
    raw.write_all(&[0x81, 0xff, 0xff, 0xff]).await.unwrap(); // truncated header, then hang up
    drop(raw);
    let mut raw = raw_socket(&t, &service).await;
    raw.write_all(&client_frame(0x82, &[3, 255, 255, 255, 255, 255, 1, b'x'])).await.unwrap(); // lying lengths
    raw.write_all(&client_frame(0x89, b"ping")).await.unwrap();
    raw.write_all(&client_frame(0x88, &[0x03, 0xe8])).await.unwrap();
    assert_eq!(raw_close_code(&mut raw).await, Some(1000), "binary junk ignored, then a clean close");

    // 6. Bad tokens on joins: precise reasons, the socket stays.
    let mut ws = t.connect(&service, Vsn::V2).await;
    for bad in ["", "x.y.z", "eyJhbGciOiJub25lIn0.eyJyb2xlIjoiYW5vbiIsImV4cCI6OTk5OTk5OTk5OX0."] {
        ws.join("realtime:t", json!([]), Some(bad)).await;
        let reply = ws.expect("realtime:t", "phx_reply").await;
        if bad.is_empty() {
            assert_eq!(reply.payload["status"], "ok", "an empty token falls back to the apikey");
        } else {
            assert!(
                reply.payload["response"]["reason"].as_str().unwrap().starts_with("InvalidJWTToken: "),
                "{:?}",
                reply.raw
            );
        }
    }
    let stranger = token("authenticated", Some(Uuid::new_v4()), 3600);
    ws.join("realtime:u", json!([]), Some(&stranger)).await;
    assert_eq!(ws.expect("realtime:u", "phx_reply").await.payload["status"], "ok");

    // The witness received every order written during all of this, in order.
    let _ = stop_tx.send(true);
    let written = writer.await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        let frame = witness.expect("realtime:witness", "postgres_changes").await;
        seen.push(frame.payload["data"]["record"]["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    assert_eq!(seen, written, "every change, once, in commit order");
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn half_open_and_silent_connections_do_not_block_the_server() {
    let t = TestServer::start().await;
    // Sockets that never finish their request head, or send garbage.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(t.addr()).await.unwrap());
    }
    let mut garbage = TcpStream::connect(t.addr()).await.unwrap();
    garbage.write_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut response)).await;
    assert!(response.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&response));
    let mut huge = TcpStream::connect(t.addr()).await.unwrap();
    let _ = huge.write_all(format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(20_000)).as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), huge.read_to_end(&mut response)).await;
    assert!(response.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&response));
    // A normal client still connects and works.
    let mut ws: Ws = t.connect(&token("anon", None, 3600), Vsn::V2).await;
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok");
    // A head that never comes: the server closes the connection (10 s head
    // timeout; the deadline here is generous).
    let mut silent = idle.pop().unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the server closed a connection that sent no head: {read:?}");
    drop(idle);
    t.server.shutdown().await.unwrap();
}

/// A counter from `/metrics`.
async fn counter(t: &TestServer, name: &str) -> u64 {
    let (status, body) = crate::support::server::http_get(t.addr(), "/metrics", &[]).await;
    assert_eq!(status, 200, "/metrics: {body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics")) as u64
}

/// The issue's repro, bounded: sockets holding 100 channels' worth of
/// 100-value `in` filters cost nothing for changes their values do not
/// match (0 filter evaluations, counted), and reach exactly the socket a
/// value matches; unindexed filters are budgeted per socket and oversized
/// joins refused, each with a reason, the socket left serving.
#[tokio::test]
async fn filters_cost_only_their_owner_and_over_budget_joins_are_refused() {
    let t = TestServer::start().await;
    let owner = create_user(&t.client, "f@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    let service = token("service_role", None, 3600);
    let mut witness = t.connect(&service, Vsn::V2).await;
    witness.subscribe("realtime:w", json!([{"event": "*", "schema": "public", "table": "orders"}]), None).await;

    // 5 sockets × 10 channels × 100 bindings, each `status=in.(…)` of 100
    // values; socket 3's lists hold "completed".
    let mut hostile = Vec::new();
    for s in 0..5 {
        let mut ws = t.connect(&service, Vsn::V2).await;
        for c in 0..10 {
            let bindings: Vec<serde_json::Value> = (0..100)
                .map(|_| {
                    let mut values: Vec<String> = (0..100).map(|v| format!("{v}")).collect();
                    if s == 3 {
                        values[99] = "completed".into();
                    }
                    json!({"event": "*", "schema": "public", "table": "orders",
                           "filter": format!("status=in.({})", values.join(","))})
                })
                .collect();
            ws.subscribe(&format!("realtime:h{c}"), json!(bindings), None).await;
        }
        hostile.push(ws);
    }
    let evaluations = counter(&t, "walcast_filter_evaluations_total").await;
    for _ in 0..10 {
        create_order(&t.client, north, owner, "sales", "pending").await;
    }
    for _ in 0..10 {
        assert_eq!(witness.expect("realtime:w", "postgres_changes").await.payload["data"]["type"], "INSERT");
    }
    assert_eq!(
        counter(&t, "walcast_filter_evaluations_total").await - evaluations,
        0,
        "5,000 filters matching none of the values were never evaluated"
    );
    // A value one socket's filters hold reaches that socket (one frame per
    // channel, naming all 100 bindings), and no other.
    let id = create_order(&t.client, north, owner, "sales", "completed").await;
    assert_eq!(witness.expect("realtime:w", "postgres_changes").await.payload["data"]["record"]["id"], json!(id));
    let mut topics = std::collections::BTreeSet::new();
    while topics.len() < 10 {
        let frame = hostile[3].next().await.expect("socket 3 stays open");
        if frame.event == "postgres_changes" {
            assert_eq!(frame.payload["data"]["record"]["id"], json!(id));
            assert!(!frame.payload["ids"].as_array().unwrap().is_empty());
            assert!(topics.insert(frame.topic.clone()), "one frame per channel: {}", frame.topic);
        }
    }
    assert_eq!(counter(&t, "walcast_filter_evaluations_total").await - evaluations, 1_000, "socket 3's bindings");
    for (s, ws) in hostile.iter_mut().enumerate().filter(|(s, _)| *s != 3) {
        assert!(ws.next_within(Duration::from_millis(300)).await.is_none(), "socket {s} got nothing");
    }

    // A socket's joins hold at most 1 MiB together: socket 0 (10 channels of
    // ~30 KiB joins) may add channels until then, and is refused past it.
    let bindings: Vec<serde_json::Value> = (0..100)
        .map(|_| {
            let values: Vec<String> = (0..100).map(|v| format!("{v}")).collect();
            json!({"event": "*", "schema": "public", "table": "orders",
                   "filter": format!("status=in.({})", values.join(","))})
        })
        .collect();
    let mut accepted = 0;
    let reason = loop {
        hostile[0].join(&format!("realtime:more{accepted}"), json!(bindings), None).await;
        let reply = hostile[0].expect(&format!("realtime:more{accepted}"), "phx_reply").await;
        if reply.payload["status"] != "ok" {
            break reply.payload["response"]["reason"].as_str().unwrap().to_owned();
        }
        accepted += 1;
        assert!(accepted < 100, "never refused");
    };
    assert!(reason.starts_with("InvalidJoinPayload: this socket's channels would hold "), "{reason}");
    assert!(reason.ends_with("at most 1048576 per socket"), "{reason}");
    assert!(accepted >= 10, "room for the first 1 MiB: {accepted} more channels");
    hostile[0].send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(hostile[0].expect("phoenix", "phx_reply").await.payload["status"], "ok");

    // Unindexed filters: 20 per socket by default.
    let mut ws = t.connect(&service, Vsn::V2).await;
    // Every operator no index can look up, in turn (each a valid filter).
    const UNINDEXED: [&str; 13] = [
        "type=neq.t",
        "created_at=lt.2000-01-01",
        "created_at=lte.2000-01-01",
        "created_at=gt.2000-01-01",
        "created_at=gte.2000-01-01",
        "type=like.s%",
        "type=ilike.S%",
        "type=match.^s",
        "type=imatch.^S",
        "type=is.null",
        "type=isdistinct.x",
        "status=not.eq.x",
        "status=not.in.(x,y)",
    ];
    let neq = |n: usize| -> serde_json::Value {
        json!((0..n)
            .map(|i| {
                let filter = format!("{},type=neq.t{i}", UNINDEXED[i % UNINDEXED.len()]);
                json!({"event": "*", "schema": "public", "table": "orders", "filter": filter})
            })
            .collect::<Vec<_>>())
    };
    ws.subscribe("realtime:n1", neq(20), None).await;
    ws.join("realtime:n2", neq(1), None).await;
    let reply = ws.expect("realtime:n2", "phx_reply").await;
    assert_eq!(reply.payload["status"], "error");
    let reason = reply.payload["response"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("TooManyUnindexedFilters: this join adds 1 filters"), "{reason}");
    assert!(reason.contains("at most 20 per socket"), "{reason}");
    // Rejoining the same channel replaces its filters: not counted twice. An
    // eq condition makes a filter indexed, so it does not count at all.
    ws.subscribe("realtime:n1", neq(20), None).await;
    let indexed =
        json!([{"event": "*", "schema": "public", "table": "orders", "filter": "type=neq.x,status=eq.draft"}]);
    ws.subscribe("realtime:n3", indexed, None).await;
    assert_eq!(counter(&t, "walcast_joins_refused_unindexed_filters_total").await, 1);

    // A join larger than 64 KiB: refused with the sizes, the socket serves.
    let mut padded = json!({"config": {"postgres_changes": []}, "pad": "x".repeat(70 << 10)});
    padded["config"]["postgres_changes"] = json!([{"event": "*", "schema": "public", "table": "orders"}]);
    ws.send(Some("9"), "realtime:big", "phx_join", padded).await;
    let reply = ws.expect("realtime:big", "phx_reply").await;
    let reason = reply.payload["response"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("InvalidJoinPayload: the join message is ")
            && reason.ends_with("at most 65536 are accepted"),
        "{reason}"
    );
    ws.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok");
    // A private channel: Realtime Authorization is not evaluated yet, so the
    // join is refused with Supabase's text, never accepted unchecked.
    let private = json!({"config": {"private": true, "postgres_changes": [
        {"event": "*", "schema": "public", "table": "orders"}]}});
    ws.send(Some("10"), "realtime:room-1", "phx_join", private).await;
    let reply = ws.expect("realtime:room-1", "phx_reply").await;
    assert_eq!(reply.payload["status"], "error");
    assert_eq!(
        reply.payload["response"]["reason"],
        "Unauthorized: You do not have permissions to read from this Channel topic: room-1"
    );
    assert_eq!(counter(&t, "walcast_joins_refused_private_total").await, 1);
    // The socket's accepted channels still deliver.
    let id = create_order(&t.client, north, owner, "sales", "draft").await;
    let frame = ws.expect("realtime:n3", "postgres_changes").await;
    assert_eq!(frame.payload["data"]["record"]["id"], json!(id));
    t.server.shutdown().await.unwrap();
}

/// The value of one sample line of `/metrics` (`name` with its labels, as
/// written), 0 when absent.
async fn metric(addr: std::net::SocketAddr, sample: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.parse().unwrap())
}

/// A loopback source address.
fn local(last: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

/// Heartbeats on every socket; each must answer.
async fn all_answer(sockets: &mut [Ws]) {
    for ws in sockets {
        ws.send(None, "phoenix", "heartbeat", json!({})).await;
        assert_eq!(ws.expect("phoenix", "phx_reply").await.payload["status"], "ok");
    }
}

/// Upgrades until one is admitted (a closed socket's budget comes back once
/// its session ends), within the wait.
async fn admitted_eventually(addr: std::net::SocketAddr, source: Option<IpAddr>, key: &str) -> Ws {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Ws::upgrade_from(addr, source, key, &[]).await {
            Ok(ws) => return ws,
            Err((status, body)) => {
                assert_eq!(status, 429, "{body}");
                assert!(tokio::time::Instant::now() < deadline, "the budget never came back: {body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn the_101st_socket_of_a_user_is_refused_and_others_are_unaffected() {
    let t = TestServer::start().await;
    let addr = t.addr();
    let per_user = Limits::default().max_sockets_per_user;
    assert_eq!(per_user, 100, "the documented default");
    let owner = create_user(&t.client, "owner@example.com").await;
    let alice = create_user(&t.client, "alice@example.com").await;
    let bob = create_user(&t.client, "bob@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    add_member(&t.client, bob, north, "user").await;

    let mut alices = Vec::new();
    for _ in 0..per_user {
        alices.push(Ws::upgrade_from(addr, None, &user(alice), &[]).await.expect("within alice's budget"));
    }
    let (status, body) = Ws::upgrade_from(addr, None, &user(alice), &[]).await.err().expect("the 101st is refused");
    assert_eq!(status, 429);
    assert_eq!(body, r#"{"error":"too many sockets for this user (limit 100)"}"#);
    // Another token of the same user counts too: the budget is the `sub`'s.
    let other_token = token("authenticated", Some(alice), 7200);
    let (status, _) = Ws::upgrade_from(addr, None, &other_token, &[]).await.err().expect("same sub, other token");
    assert_eq!(status, 429);
    // Tokens without `sub` are not counted per user.
    let mut anons = Vec::new();
    for _ in 0..3 {
        anons.push(Ws::upgrade_from(addr, None, &anon(), &[]).await.expect("the anon key has no sub"));
    }

    // Everyone else: bob connects and receives changes; alice's sockets serve.
    let mut bobs = Ws::upgrade_from(addr, None, &user(bob), &[]).await.expect("another user connects");
    let topic = "realtime:bob";
    bobs.subscribe(topic, json!([{"event": "INSERT", "schema": "public", "table": "orders"}]), None).await;
    let order = create_order(&t.client, north, owner, "sales", "pending").await;
    let change = bobs.expect(topic, "postgres_changes").await;
    assert_eq!(change.payload["data"]["record"]["id"], json!(order));
    all_answer(&mut alices[..3]).await;
    all_answer(&mut anons).await;
    assert_eq!(metric(addr, r#"walcast_upgrades_refused_total{reason="user"}"#).await, 2.0);
    assert_eq!(metric(addr, r#"walcast_upgrades_refused_total{reason="address"}"#).await, 0.0);
    assert_eq!(metric(addr, r#"walcast_upgrades_refused_total{reason="connections"}"#).await, 0.0);

    // One of alice's sockets closes: her budget has room again.
    alices.pop().unwrap().ws.close(None).await.unwrap();
    let mut again = admitted_eventually(addr, None, &user(alice)).await;
    all_answer(std::slice::from_mut(&mut again)).await;
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_address_over_its_budget_is_refused_and_other_addresses_are_not() {
    let limits = Limits { max_sockets_per_address: 5, ..Limits::default() };
    let t = TestServer::with_limits(limits).await;
    let addr = t.addr();
    let mut sockets = Vec::new();
    for _ in 0..5 {
        sockets.push(Ws::upgrade_from(addr, local(7), &anon(), &[]).await.expect("within the budget"));
    }
    let (status, body) = Ws::upgrade_from(addr, local(7), &anon(), &[]).await.err().expect("the 6th is refused");
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many sockets from this address (limit 5)"}"#));
    // X-Forwarded-For from an untrusted peer (no --trusted-proxies) changes nothing.
    let spoofed = [("x-forwarded-for", "198.51.100.1")];
    let (status, _) = Ws::upgrade_from(addr, local(7), &anon(), &spoofed).await.err().expect("spoofing ignored");
    assert_eq!(status, 429);
    // Another address is unaffected, and the full one's sockets still serve.
    let mut other = Ws::upgrade_from(addr, local(8), &anon(), &[]).await.expect("another address connects");
    all_answer(std::slice::from_mut(&mut other)).await;
    all_answer(&mut sockets).await;
    assert_eq!(metric(addr, r#"walcast_upgrades_refused_total{reason="address"}"#).await, 2.0);
    // A socket closes: the address has room again.
    sockets.pop().unwrap().ws.close(None).await.unwrap();
    admitted_eventually(addr, local(7), &anon()).await;
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let limits = Limits {
        max_sockets_per_address: 2,
        trusted_proxies: walcast::http::Cidr::parse_list("127.0.0.9/32, 10.0.0.0/8").unwrap(),
        ..Limits::default()
    };
    let t = TestServer::with_limits(limits).await;
    let addr = t.addr();
    let (proxy, stranger) = (local(9), local(10));
    let mut held = Vec::new();
    // Behind the trusted proxy: each client address has its own budget.
    for client in ["198.51.100.7", "198.51.100.7", "198.51.100.8", "198.51.100.8"] {
        let xff = [("x-forwarded-for", client)];
        held.push(Ws::upgrade_from(addr, proxy, &anon(), &xff).await.expect("a client behind the proxy"));
    }
    let xff = [("x-forwarded-for", "198.51.100.7")];
    let (status, body) = Ws::upgrade_from(addr, proxy, &anon(), &xff).await.err().expect("the client's third");
    assert_eq!((status, body.as_str()), (429, r#"{"error":"too many sockets from this address (limit 2)"}"#));
    // The rightmost untrusted hop is the client: a value the client put in
    // front of the chain does not help it.
    let chain = [("x-forwarded-for", "203.0.113.50, 198.51.100.7, 10.1.2.3")];
    let (status, _) = Ws::upgrade_from(addr, proxy, &anon(), &chain).await.err().expect("counted as .7");
    assert_eq!(status, 429);
    let chain = [("x-forwarded-for", "198.51.100.7, 198.51.100.9, 10.1.2.3")];
    held.push(Ws::upgrade_from(addr, proxy, &anon(), &chain).await.expect("counted as .9"));
    // The proxy's own address is not what is counted: without a header it
    // has a budget of its own too.
    held.push(Ws::upgrade_from(addr, proxy, &anon(), &[]).await.expect("the proxy itself"));

    // From an untrusted peer the header is ignored: every socket counts
    // under the peer, whatever it claims.
    for claim in ["203.0.113.1", "203.0.113.2"] {
        let xff = [("x-forwarded-for", claim)];
        held.push(Ws::upgrade_from(addr, stranger, &anon(), &xff).await.expect("within the stranger's budget"));
    }
    let xff = [("x-forwarded-for", "203.0.113.3")];
    let (status, _) = Ws::upgrade_from(addr, stranger, &anon(), &xff).await.err().expect("spoofed XFF ignored");
    assert_eq!(status, 429);
    all_answer(&mut held).await;
    assert_eq!(metric(addr, r#"walcast_upgrades_refused_total{reason="address"}"#).await, 3.0);
    t.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_burst_of_upgrades_never_overshoots_the_connection_cap() {
    const CAP: usize = 20;
    const BURST: usize = 120;
    let t = TestServer::with_limits(Limits { max_connections: CAP, ..Limits::default() }).await;
    let addr = t.addr();
    // All at once, each on its own connection and task.
    let attempts: Vec<_> = (0..BURST)
        .map(|i| {
            let source = local(20 + (i % 50) as u8);
            tokio::spawn(async move { Ws::upgrade_from(addr, source, &anon(), &[]).await })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(ws) => open.push(ws),
            Err((status, body)) => {
                assert_eq!((status, body.as_str()), (429, r#"{"error":"Too many connected users"}"#));
                refused += 1;
            }
        }
    }
    assert_eq!(open.len(), CAP, "exactly the cap admitted ({refused} refused)");
    assert_eq!(refused, BURST - CAP);
    all_answer(&mut open).await;
    assert_eq!(metric(addr, "walcast_sockets_open").await, CAP as f64);
    assert_eq!(metric(addr, r#"walcast_upgrades_refused_total{reason="connections"}"#).await, (BURST - CAP) as f64);
    // Plain HTTP is not counted against the cap.
    assert_eq!(http_get(addr, "/health", &[]).await.0, 200);
    // A socket closes: its permit comes back.
    open.pop().unwrap().ws.close(None).await.unwrap();
    open.push(admitted_eventually(addr, None, &anon()).await);
    let (status, _) = Ws::upgrade_from(addr, None, &anon(), &[]).await.err().expect("full again");
    assert_eq!(status, 429);
    t.server.shutdown().await.unwrap();
}

/// The supabase-js way: every socket connects with the anon key and sends
/// the user's token in its joins. The per-user budget counts those tokens
/// too (once per socket), refusing the join past it with the reason, and a
/// closed socket gives its count back.
#[tokio::test]
async fn users_joining_with_their_token_on_anon_sockets_are_counted() {
    let t = TestServer::with_limits(Limits { max_sockets_per_user: 3, ..Limits::default() }).await;
    let alice = create_user(&t.client, "alice@example.com").await;
    let bob = create_user(&t.client, "bob@example.com").await;
    let bindings = || json!([{"event": "*", "schema": "public", "table": "orders"}]);
    let mut alices = Vec::new();
    for i in 0..3 {
        let mut ws = t.connect(&anon(), Vsn::V2).await;
        ws.subscribe(&format!("realtime:a{i}"), bindings(), Some(&user(alice))).await;
        // A second channel of the same socket and user costs nothing more.
        ws.subscribe(&format!("realtime:b{i}"), bindings(), Some(&user(alice))).await;
        alices.push(ws);
    }
    let mut fourth = t.connect(&anon(), Vsn::V2).await;
    fourth.join("realtime:a3", bindings(), Some(&user(alice))).await;
    let reply = fourth.expect("realtime:a3", "phx_reply").await;
    assert_eq!(reply.payload["status"], "error");
    assert_eq!(reply.payload["response"]["reason"], "too many sockets for this user (limit 3)");
    // The socket itself serves: bob's join on it is accepted.
    fourth.subscribe("realtime:bob", bindings(), Some(&user(bob))).await;
    // An access_token switching a channel to alice's token closes it.
    fourth.send(None, "realtime:bob", "access_token", json!({"access_token": user(alice)})).await;
    let system = fourth.expect("realtime:bob", "system").await;
    assert_eq!(system.payload["message"], "too many sockets for this user (limit 3)");
    assert_eq!(metric(t.addr(), "walcast_joins_refused_user_total").await, 2.0);
    // One of alice's sockets closes: its count comes back.
    drop(alices.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        fourth.join("realtime:a4", bindings(), Some(&user(alice))).await;
        let reply = fourth.expect("realtime:a4", "phx_reply").await;
        if reply.payload["status"] == "ok" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the closed socket's count comes back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.server.shutdown().await.unwrap();
}

/// The same budget as a supabase-js app meets it: `createClient(url,
/// anonKey)` + `realtime.setAuth(userToken)` on each client. The user's
/// third client, past a budget of 2, gets `CHANNEL_ERROR` with the reason;
/// another user's client subscribes and receives.
#[tokio::test]
async fn a_supabase_js_user_past_the_socket_budget_gets_channel_error_with_the_reason() {
    use crate::support::clients::{is_change, is_status, Driver, Kind};
    let t = TestServer::with_limits(Limits { max_sockets_per_user: 2, ..Limits::default() }).await;
    let owner = create_user(&t.client, "owner@example.com").await;
    let alice = create_user(&t.client, "alice@example.com").await;
    let bob = create_user(&t.client, "bob@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    add_member(&t.client, bob, north, "user").await;
    let url = format!("http://{}", t.addr());
    let bindings = json!([{"event": "*", "schema": "public", "table": "orders"}]);
    let mut alices = Vec::new();
    for i in 0..2 {
        let mut js = Driver::start(&format!("alice{i}"), Kind::SupabaseJs("2.0.0"), &url, &anon()).await;
        js.subscribe("orders", bindings.clone(), Some(&user(alice))).await;
        alices.push(js);
    }
    let mut third = Driver::start("alice2", Kind::SupabaseJs("2.0.0"), &url, &anon()).await;
    third.command(json!({"cmd": "subscribe", "channel": "orders", "bindings": bindings, "token": user(alice)})).await;
    let status = third.expect("the refusal", |e| is_status(e, "orders", None)).await;
    assert_eq!(status["status"], "CHANNEL_ERROR", "{status}");
    assert!(
        status["error"].as_str().is_some_and(|e| e.contains("too many sockets for this user (limit 2)")),
        "{status}"
    );
    let mut bobs = Driver::start("bob", Kind::SupabaseJs("2.0.0"), &url, &anon()).await;
    bobs.subscribe("orders", bindings.clone(), Some(&user(bob))).await;
    let order = create_order(&t.client, north, owner, "sales", "pending").await;
    let change = bobs.expect("bob's change", |e| is_change(e, "orders", None)).await;
    assert_eq!(change["payload"]["new"]["id"], json!(order.to_string()));
    t.server.shutdown().await.unwrap();
}

/// A kind 3 frame as realtime-js builds it.
fn kind3(join_ref: &str, msg_ref: &str, topic: &str, event: &str, meta: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut f =
        vec![3, join_ref.len() as u8, msg_ref.len() as u8, topic.len() as u8, event.len() as u8, meta.len() as u8, 1];
    for part in [join_ref.as_bytes(), msg_ref.as_bytes(), topic.as_bytes(), event.as_bytes(), meta, payload] {
        f.extend_from_slice(part);
    }
    f
}

/// Hostile Broadcast and Presence traffic (issue 15 §7): malformed and
/// foreign binary frames are ignored and counted, an oversized payload is
/// refused with `payload_size_exceeded`, a sender past its rate gets one
/// `system` notice per second and `ack` errors while the channel stays
/// joined, a presence flood closes only the flooding channel — and a
/// witness in the same room receives exactly the messages that were sent
/// on, throughout.
#[tokio::test]
async fn broadcast_and_presence_abuse_hits_only_the_abuser() {
    let limits = Limits { channel_broadcasts_per_second: 20, socket_broadcasts_per_second: 1_000, ..Limits::default() };
    let t = TestServer::with_limits(limits).await;
    let topic = "realtime:abuse";
    let join =
        json!({"config": {"broadcast": {"self": false, "ack": true}, "presence": {"key": ""}, "private": false}});
    let mut witness = t.connect(&anon(), Vsn::V1).await;
    witness.send(Some("1"), topic, "phx_join", join.clone()).await;
    assert_eq!(witness.expect(topic, "phx_reply").await.payload["status"], "ok");
    let mut abuser = t.connect(&anon(), Vsn::V2).await;
    abuser.send(Some("1"), topic, "phx_join", join).await;
    assert_eq!(abuser.expect(topic, "phx_reply").await.payload["status"], "ok");

    // Malformed binary frames: ignored, counted, the socket still serves.
    let bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![3],
        vec![4, 1, 1, 0, 1, b'x', b'y'],
        vec![3, 200, 0, 0, 0, 0, 1, b'1'],
        {
            let mut f = kind3("1", "2", topic, "e", b"", b"{}");
            f[6] = 7; // an encoding that is neither JSON nor binary
            f
        },
        vec![0xff; 64],
    ];
    let before = counter(&t, "walcast_bad_frames_total").await;
    for frame in &bad {
        abuser.send_raw(Message::Binary(frame.clone().into())).await;
    }
    // A kind 3 push to a topic the socket never joined is answered, not sent.
    abuser.send_raw(Message::Binary(kind3("1", "3", "realtime:other", "e", b"", b"{}").into())).await;
    assert_eq!(abuser.expect("realtime:other", "phx_reply").await.payload["status"], "error");
    // Kind 3 with meta and 255-byte event: sent on (meta ignored).
    let long_event = "e".repeat(255);
    abuser
        .send_raw(Message::Binary(kind3("1", "4", topic, &long_event, b"{\"persist\":true}", b"{\"n\":1}").into()))
        .await;
    assert_eq!(abuser.expect(topic, "phx_reply").await.payload["status"], "ok");
    let got = witness.expect(topic, "broadcast").await;
    assert_eq!(got.payload["event"], long_event.as_str());
    assert_eq!(got.payload["payload"], json!({"n": 1}));
    assert_eq!(counter(&t, "walcast_bad_frames_total").await, before + bad.len() as u64);

    // Oversized (over 256 KiB, under the 1 MiB message cap): refused with the reason.
    let big = json!({"type": "broadcast", "event": "big", "payload": {"pad": "x".repeat(300 << 10)}});
    abuser.send(Some("1"), topic, "broadcast", big).await;
    let reply = abuser.expect(topic, "phx_reply").await;
    assert_eq!(reply.payload, json!({"status": "error", "response": "payload_size_exceeded"}));

    // A flood past 20 per second: at most 20 (+ refill) go out, the rest get
    // `rate_limit_exceeded` and one system notice; the channel stays joined.
    let mut sent = 0;
    let mut refused = 0;
    for n in 0..60 {
        abuser
            .send(Some("1"), topic, "broadcast", json!({"type": "broadcast", "event": "flood", "payload": {"n": n}}))
            .await;
    }
    let mut notices = 0;
    while sent + refused < 60 {
        let frame = abuser.next().await.expect("the socket stays open");
        match frame.event.as_str() {
            "phx_reply" if frame.payload["status"] == "ok" => sent += 1,
            "phx_reply" => {
                assert_eq!(frame.payload["response"], "rate_limit_exceeded");
                refused += 1;
            }
            "system" => {
                assert_eq!(frame.payload["message"], "Too many messages per second");
                notices += 1;
            }
            _ => {}
        }
    }
    // The bucket holds 20 (one went to the 255-byte event above), refilling at 20/s.
    assert!((15..=40).contains(&sent), "sent {sent} of 60 at 20/s");
    assert!(notices >= 1, "the sender was told");
    assert_eq!(counter(&t, "walcast_broadcasts_rate_limited_total").await, refused);
    // The witness got exactly the ones sent on.
    for _ in 0..sent {
        assert_eq!(witness.expect(topic, "broadcast").await.payload["event"], "flood");
    }

    // A presence flood: the 6th call closes the abuser's channel only.
    for n in 0..6 {
        abuser.send(Some("1"), topic, "presence", json!({"event": "track", "payload": {"n": n}})).await;
    }
    let system = abuser.expect(topic, "system").await;
    assert_eq!(system.payload["message"], "Client presence rate limit exceeded");
    abuser.expect(topic, "phx_close").await;
    // The witness saw the abuser's presence come and go, and still serves.
    let mut left = false;
    while let Some(frame) = witness.next_within(Duration::from_secs(2)).await {
        assert_ne!(frame.event, "broadcast", "more broadcasts than were sent on: {:?}", frame.raw);
        if frame.event == "presence_diff" && frame.payload["leaves"].as_object().is_some_and(|l| !l.is_empty()) {
            left = true;
            break;
        }
    }
    assert!(left, "the closed channel's presence left the room");
    witness.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(witness.expect("phoenix", "phx_reply").await.payload["status"], "ok");
    abuser.send(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(abuser.expect("phoenix", "phx_reply").await.payload["status"], "ok");
    t.server.shutdown().await.unwrap();
}

/// The per-socket send rate counts every channel of the socket: with 5 per
/// second per socket (and plenty per channel), six quick sends over two
/// channels get five `ok` and one `rate_limit_exceeded`.
#[tokio::test]
async fn the_socket_send_rate_spans_its_channels() {
    let limits = Limits { channel_broadcasts_per_second: 1_000, socket_broadcasts_per_second: 5, ..Limits::default() };
    let t = TestServer::with_limits(limits).await;
    let mut ws = t.connect(&anon(), Vsn::V2).await;
    let join = json!({"config": {"broadcast": {"self": false, "ack": true}}});
    for topic in ["realtime:a", "realtime:b"] {
        ws.send(Some(topic), topic, "phx_join", join.clone()).await;
        assert_eq!(ws.expect(topic, "phx_reply").await.payload["status"], "ok");
    }
    for n in 0..6 {
        let topic = if n % 2 == 0 { "realtime:a" } else { "realtime:b" };
        ws.send(Some(topic), topic, "broadcast", json!({"type": "broadcast", "event": "e", "payload": {}})).await;
    }
    let (mut ok, mut limited) = (0, 0);
    while ok + limited < 6 {
        let frame = ws.next().await.expect("the socket stays open");
        if frame.event == "phx_reply" {
            match frame.payload["response"].as_str() {
                Some("rate_limit_exceeded") => limited += 1,
                _ => ok += 1,
            }
        }
    }
    assert_eq!((ok, limited), (5, 1));
    t.server.shutdown().await.unwrap();
}
