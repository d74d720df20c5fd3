//! Cluster mode (`--nats-url`) with a real nats-server: two walcast nodes
//! on one database share Broadcast and Presence — a message sent on one
//! node (WebSocket or REST) reaches the room's members on the other, a
//! presence tracked on one shows on the other (at once, and in the state a
//! later joiner gets), leaves with its channel, leaves at once when its node
//! shuts down cleanly, and leaves after the node timeout when its node goes
//! silent.

use std::time::Duration;

use serde_json::{json, Value};
use walcast::hub::Vsn;
use walcast::scaleout::ClusterSettings;

use crate::support::nats::NatsServer;
use crate::support::server::{anon, TestServer, Ws};

fn cluster(url: &str) -> ClusterSettings {
    let mut settings = ClusterSettings::new(url);
    settings.heartbeat = Duration::from_millis(200);
    settings.node_timeout = Duration::from_secs(2);
    settings
}

async fn join(ws: &mut Ws, topic: &str, key: &str) {
    let payload = json!({"config": {"broadcast": {"self": false}, "presence": {"key": key, "enabled": true}}});
    ws.send(Some("1"), topic, "phx_join", payload).await;
    assert_eq!(ws.expect(topic, "phx_reply").await.payload["status"], "ok");
}

/// The next presence_diff (or state) on `topic`, skipping other frames.
async fn next_presence(ws: &mut Ws, topic: &str) -> (String, Value) {
    loop {
        let frame = ws.next().await.expect("the socket is open");
        if frame.topic == topic && frame.event.starts_with("presence_") {
            return (frame.event, frame.payload);
        }
    }
}

#[tokio::test]
async fn two_nodes_share_broadcast_and_presence_over_nats() {
    let nats = NatsServer::start().await;
    let a = TestServer::with_config(|c| c.cluster = Some(cluster(&nats.url))).await;
    let b = a.peer(|c| c.cluster = Some(cluster(&nats.url))).await;
    let topic = "realtime:room-1";

    let mut on_a = a.connect(&anon(), Vsn::V1).await;
    join(&mut on_a, topic, "alice").await;
    assert_eq!(next_presence(&mut on_a, topic).await, ("presence_state".into(), json!({})));
    let mut on_b = Ws::connect(b.local_addr(), "/realtime/v1/websocket", &anon(), Some(Vsn::V1)).await;
    join(&mut on_b, topic, "bob").await;
    assert_eq!(next_presence(&mut on_b, topic).await, ("presence_state".into(), json!({})));

    // Presence: alice tracks on A; bob's node shows it (with A's phx_ref).
    on_a.send(Some("1"), topic, "presence", json!({"event": "track", "payload": {"name": "alice"}})).await;
    let (event, diff) = next_presence(&mut on_b, topic).await;
    assert_eq!(event, "presence_diff");
    let alice_meta = diff["joins"]["alice"]["metas"][0].clone();
    assert_eq!(alice_meta["name"], "alice");
    let (_, own) = next_presence(&mut on_a, topic).await;
    assert_eq!(own["joins"]["alice"]["metas"][0]["phx_ref"], alice_meta["phx_ref"], "one ref on every node");

    // A later joiner on B gets alice in its state.
    let mut late = Ws::connect(b.local_addr(), "/realtime/v1/websocket", &anon(), Some(Vsn::V1)).await;
    join(&mut late, topic, "carol").await;
    let (event, state) = next_presence(&mut late, topic).await;
    assert_eq!(event, "presence_state");
    assert_eq!(state["alice"]["metas"][0]["name"], "alice");

    // Broadcast: B → A over WebSocket, and a REST broadcast on A → B.
    on_b.send(Some("1"), topic, "broadcast", json!({"type": "broadcast", "event": "hi", "payload": {"from": "bob"}}))
        .await;
    let got = on_a.expect(topic, "broadcast").await;
    assert_eq!(got.payload["payload"], json!({"from": "bob"}));
    let anon_key = anon();
    let (status, body) = crate::support::server::http_post(
        a.addr(),
        "/realtime/v1/api/broadcast",
        &[("apikey", anon_key.as_str()), ("content-type", "application/json")],
        br#"{"messages":[{"topic":"room-1","event":"rest","payload":{"n":1}}]}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(on_b.expect(topic, "broadcast").await.payload["event"], "rest");
    // carol (on B with bob) had bob's message first, then the REST one.
    assert_eq!(late.expect(topic, "broadcast").await.payload["event"], "hi");
    assert_eq!(late.expect(topic, "broadcast").await.payload["event"], "rest");

    // alice leaves the channel: her presence leaves on B.
    on_a.send(Some("1"), topic, "phx_leave", json!({})).await;
    let (_, diff) = next_presence(&mut on_b, topic).await;
    assert_eq!(diff["leaves"]["alice"]["metas"][0]["phx_ref"], alice_meta["phx_ref"]);

    // bob tracks on B, then B shuts down cleanly: A's members see him leave at once.
    on_b.send(Some("1"), topic, "presence", json!({"event": "track", "payload": {"name": "bob"}})).await;
    let mut watcher = a.connect(&anon(), Vsn::V1).await;
    join(&mut watcher, topic, "dave").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (event, payload) = next_presence(&mut watcher, topic).await;
        let bob_there = match event.as_str() {
            "presence_state" => payload.get("bob").is_some(),
            _ => payload["joins"].get("bob").is_some(),
        };
        if bob_there {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "bob's presence did not reach A");
    }
    b.shutdown().await.unwrap();
    let (_, diff) = next_presence(&mut watcher, topic).await;
    assert_eq!(diff["leaves"]["bob"]["metas"][0]["name"], "bob", "{diff}");
    a.server.shutdown().await.unwrap();
}

/// A node that goes silent (here: a raw NATS client speaking for a node
/// that then stops) has its presences leave after the node timeout.
#[tokio::test]
async fn a_silent_nodes_presences_leave_after_the_timeout() {
    let nats = NatsServer::start().await;
    let a = TestServer::with_config(|c| c.cluster = Some(cluster(&nats.url))).await;
    let topic = "realtime:room-2";
    let mut on_a = a.connect(&anon(), Vsn::V1).await;
    join(&mut on_a, topic, "watcher").await;
    next_presence(&mut on_a, topic).await;
    let ghost = async_nats::connect(&nats.url).await.unwrap();
    let track = json!({"node": 4242, "op": "track", "topic": topic, "private": false, "conn": 1, "key": "ghost",
                       "payload": {"name": "ghost"}, "phx_ref": "ghost-ref"});
    ghost.publish("walcast.rooms", serde_json::to_vec(&track).unwrap().into()).await.unwrap();
    ghost.flush().await.unwrap();
    let started = tokio::time::Instant::now();
    let (_, diff) = next_presence(&mut on_a, topic).await;
    assert_eq!(diff["joins"]["ghost"]["metas"][0]["phx_ref"], "ghost-ref");
    // Garbage on the subject is counted and ignored.
    ghost.publish("walcast.rooms", "not json".into()).await.unwrap();
    ghost.flush().await.unwrap();
    let (_, diff) = next_presence(&mut on_a, topic).await;
    assert_eq!(diff["leaves"]["ghost"]["metas"][0]["name"], "ghost");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "left only after the 2 s timeout, not {waited:?}");
    let (_, body) = crate::support::server::http_get(a.addr(), "/metrics", &[]).await;
    for line in ["walcast_cluster_nodes_gone_total 1", "walcast_cluster_events_malformed_total 1"] {
        assert!(body.contains(line), "{line}\n{body}");
    }
    a.server.shutdown().await.unwrap();
}

/// `walcast check` with `nats_url` (as a config file gives it): the server
/// answers with its version; an unreachable one fails with the fix.
#[tokio::test]
async fn check_reports_the_nats_server() {
    use std::str::FromStr;
    use walcast::config::check::{self, Status};
    use walcast::config::{FileConfig, Settings};
    let nats = NatsServer::start().await;
    let (db, _client) = crate::support::migrated_db().await;
    let dead = format!(
        "nats://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    );
    for (url, want) in [(nats.url.clone(), Status::Ok), (dead, Status::Fail)] {
        let given = FileConfig {
            database_url: Some(db.url().to_owned()),
            jwt_secret: Some("secret".into()),
            slot_name: Some(format!("check_{}", uuid::Uuid::new_v4().simple())),
            nats_url: Some(url.clone()),
            ..FileConfig::default()
        };
        let settings = Settings::resolve(given, None).expect("valid settings");
        let findings = check::run(&settings, &tokio_postgres::Config::from_str(db.url()).unwrap()).await;
        let line = findings.iter().find(|f| f.check == "nats").expect("a nats line");
        assert_eq!(line.status, want, "{line}");
        if want == Status::Ok {
            assert!(line.detail.contains("nats-server 2.15.1 with JetStream"), "{line}");
            assert!(line.detail.contains("role: all"), "{line}");
            let find =
                |name: &str| findings.iter().find(|f| f.check == name).unwrap_or_else(|| panic!("a {name} line"));
            let stream = find("change stream");
            assert!(stream.status == Status::Ok && stream.detail.contains("does not exist yet"), "{stream}");
            assert!(find("source lease").detail.contains("free"), "{}", find("source lease"));
            // The test's role is a superuser: it may end a stale walsender.
            assert_eq!(find("end stale walsender").status, Status::Ok);
        }
    }
}
