//! `/metrics`, `/health`, `/ready` and the slot watchdog against a real
//! PostgreSQL: the exposition parses line by line, counters move with real
//! traffic, a dropped slot makes `/ready` fail with the slot error, and the
//! watchdog raises its warning past a byte limit.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use walcast::hub::Vsn;

use crate::support::server::{anon, http_get, user, TestServer};
use crate::support::{add_member, create_dealership, create_order, create_user};

/// How long a test waits for a metric or readiness to change.
const WAIT: Duration = Duration::from_secs(20);

/// One sample line: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// One parsed exposition.
#[derive(Debug)]
struct Exposition {
    /// Every sample line, in order.
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|s| s.2)
    }

    /// Like [`Exposition::get`], for a sample that must be there.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }
}

fn is_metric_name(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses the text format strictly: `# HELP`/`# TYPE` before each family
/// (once), every other line `name{label="value",…} value`, `walcast_` names,
/// counters ending in `_total`, histogram buckets cumulative up to `+Inf` =
/// `_count`.
fn parse(text: &str) -> Exposition {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut helped = HashSet::new();
    let mut typed = std::collections::HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        assert!(!line.is_empty(), "no blank lines");
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("help text");
            assert!(is_metric_name(name) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_owned()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("type");
            assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
            assert!(name.starts_with("walcast_"), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counters end in _total: {line}");
            }
            assert!(helped.contains(name), "HELP before TYPE: {line}");
            assert!(typed.insert(name.to_owned(), kind.to_owned()).is_none(), "TYPE twice for {name}");
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("name value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, body)) => {
                let body = body.strip_suffix('}').unwrap_or_else(|| panic!("closing brace: {line}"));
                let mut labels = Vec::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (label, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("label=\"…\": {line}"));
                    assert!(is_metric_name(label), "{line}");
                    let mut text = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().unwrap_or_else(|| panic!("unterminated label: {line}")) {
                            (_, '\\') => match chars.next().map(|c| c.1) {
                                Some('\\') => text.push('\\'),
                                Some('"') => text.push('"'),
                                Some('n') => text.push('\n'),
                                other => panic!("bad escape {other:?}: {line}"),
                            },
                            (i, '"') => break i,
                            (_, c) => text.push(c),
                        }
                    };
                    labels.push((label.to_owned(), text));
                    rest = &after[end + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
                (name, labels)
            }
        };
        assert!(is_metric_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| typed.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(name);
        assert!(typed.contains_key(family), "sample before its TYPE: {line}");
        samples.push((name.to_owned(), labels, value));
    }
    let exposition = Exposition { samples };
    for (family, kind) in &typed {
        if kind == "histogram" {
            let buckets: Vec<f64> =
                exposition.samples.iter().filter(|s| s.0 == format!("{family}_bucket")).map(|s| s.2).collect();
            assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{family} buckets are cumulative");
            let count = exposition.value(&format!("{family}_count"), &[]);
            assert_eq!(exposition.value(&format!("{family}_bucket"), &[("le", "+Inf")]), count);
        }
    }
    exposition
}

/// GET /metrics: checks the status and content type, returns the parsed body.
async fn scrape(addr: SocketAddr) -> Exposition {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await.expect("response in time").unwrap();
    let response = String::from_utf8(response).expect("UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    parse(body)
}

/// Scrapes until `done` holds for the exposition; returns it.
async fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let exposition = scrape(addr).await;
        if done(&exposition) {
            return exposition;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {exposition:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET /ready: (status, JSON body).
async fn ready(addr: SocketAddr) -> (u16, Value) {
    let (status, body) = http_get(addr, "/ready", &[]).await;
    (status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("/ready answers JSON: {body}")))
}

#[tokio::test]
async fn metrics_parse_and_counters_move_with_a_join_and_an_insert() {
    let t = TestServer::start().await;
    let addr = t.addr();
    let before = scrape_until(addr, "the first slot poll", |m| m.value("walcast_slot_polls_total", &[]) >= 1.0).await;
    assert_eq!(before.value("walcast_ready", &[]), 1.0);
    assert_eq!(before.value("walcast_replication_state", &[("state", "streaming")]), 1.0);
    assert_eq!(before.value("walcast_replication_state", &[("state", "failed")]), 0.0);
    assert_eq!(before.value("walcast_memberships_loaded", &[]), 1.0);
    assert_eq!(before.value("walcast_sockets_open", &[]), 0.0);
    assert_eq!(before.value("walcast_slot_present", &[]), 1.0);
    assert_eq!(before.value("walcast_slot_wal_warning", &[]), 0.0, "1 GiB default limit");
    assert_eq!(before.value("walcast_slot_wal_status", &[("status", "reserved")]), 1.0);
    assert!(before.value("walcast_slot_retained_wal_bytes", &[]) >= 0.0);
    // Batches of WAL messages (replication::SOURCE_QUEUE_BATCHES).
    let capacity = walcast::replication::SOURCE_QUEUE_BATCHES as f64;
    assert_eq!(before.value("walcast_source_queue_events_capacity", &[]), capacity);
    assert!(before.get("walcast_stage_queue_batches", &[]).is_some());
    assert!(before.get("walcast_hub_control_queue_requests", &[]).is_some());
    assert!(before.get("walcast_build_info", &[("version", env!("CARGO_PKG_VERSION"))]).is_some());

    let owner = create_user(&t.client, "owner@example.com").await;
    let member = create_user(&t.client, "member@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    add_member(&t.client, member, north, "user").await;
    let mut ws = t.connect(&anon(), Vsn::V2).await;
    let topic = "realtime:orders";
    ws.subscribe(topic, json!([{"event": "*", "schema": "public", "table": "orders"}]), Some(&user(member))).await;
    create_order(&t.client, north, owner, "sales", "pending").await;
    let frame = ws.expect(topic, "postgres_changes").await;
    assert_eq!(frame.payload["data"]["type"], "INSERT");

    let count = |m: &Exposition, name: &str| m.value(name, &[]);
    let after = scrape_until(addr, "the delivery to be counted", |m| {
        count(m, "walcast_delivery_latency_seconds_count") > count(&before, "walcast_delivery_latency_seconds_count")
    })
    .await;
    for name in [
        "walcast_joins_total",
        "walcast_deliveries_total",
        "walcast_transactions_total",
        "walcast_changes_total",
        "walcast_frames_built_total",
        "walcast_sockets_opened_total",
        "walcast_replication_messages_total",
        "walcast_replication_received_bytes_total",
        "walcast_memberships",
    ] {
        assert!(count(&after, name) > count(&before, name), "{name} moved");
    }
    assert_eq!(count(&after, "walcast_joins_refused_total"), count(&before, "walcast_joins_refused_total"));
    assert_eq!(count(&after, "walcast_sockets_open"), 1.0);
    assert_eq!(count(&after, "walcast_channels_open"), 1.0);
    assert_eq!(count(&after, "walcast_subscriptions"), 1.0);
    // Same machine, same clock: the insert reached the outbox well within 2.5 s.
    let within = after.value("walcast_delivery_latency_seconds_bucket", &[("le", "2.5")]);
    assert_eq!(within, count(&after, "walcast_delivery_latency_seconds_count"));
    assert!(count(&after, "walcast_delivery_latency_seconds_sum") >= 0.0);
    // The database's share and the link's, per transaction read: the insert
    // (and the memberships before it) were counted, within 2.5 s.
    for name in ["walcast_walsender_latency_seconds", "walcast_intake_latency_seconds"] {
        let n = count(&after, &format!("{name}_count"));
        assert!(n > count(&before, &format!("{name}_count")), "{name} counted the insert");
        assert_eq!(after.value(&format!("{name}_bucket"), &[("le", "2.5")]), n, "{name} within 2.5 s");
    }
    // Caught up once the hub acknowledged.
    scrape_until(addr, "no lag", |m| count(m, "walcast_replication_lag_bytes") == 0.0).await;

    drop(ws);
    scrape_until(addr, "the socket to close", |m| count(m, "walcast_sockets_open") == 0.0).await;
}

#[tokio::test]
async fn health_and_ready_answer_once_started() {
    let t = TestServer::start().await;
    let (status, body) = http_get(t.addr(), "/health", &[]).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = ready(t.addr()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["replication"], "streaming");
    assert!(body.get("reason").is_none(), "{body}");
    assert!(body["lag_bytes"].is_u64() && body["lag_seconds"].is_number(), "{body}");
}

#[tokio::test]
async fn ready_fails_with_the_slot_error_when_the_slot_is_dropped() {
    let t = TestServer::start().await;
    assert_eq!(ready(t.addr()).await.0, 200);
    let slot: String = t
        .client
        .query_one("select slot_name::text from pg_replication_slots where database = current_database()", &[])
        .await
        .unwrap()
        .get(0);
    // An active slot cannot be dropped: end its walsender and drop it before
    // walcast reconnects (it retries after 100 ms), retrying until it works.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        t.client
            .execute(
                "select pg_terminate_backend(active_pid, 5000) from pg_replication_slots \
                 where slot_name = $1 and active_pid is not null",
                &[&slot],
            )
            .await
            .unwrap();
        match t.client.execute("select pg_drop_replication_slot($1)", &[&slot]).await {
            Ok(_) => break,
            Err(err) => {
                assert!(tokio::time::Instant::now() < deadline, "could not drop the slot: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let (status, body) = ready(t.addr()).await;
        if status == 503 && body["replication"] == "failed" {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["ready"], false);
    let reason = body["reason"].as_str().expect("a reason");
    assert!(reason.contains("slot") && reason.contains(&slot), "{reason}");
    assert!(reason.contains("42704"), "the server's error code: {reason}");
    let m = scrape(t.addr()).await;
    assert_eq!(m.value("walcast_ready", &[]), 0.0);
    assert_eq!(m.value("walcast_replication_state", &[("state", "failed")]), 1.0);
    assert!(m.value("walcast_replication_interruptions_total", &[]) >= 1.0, "the terminated walsender");
    // /health still says the process serves.
    assert_eq!(http_get(t.addr(), "/health", &[]).await.0, 200);
}

#[tokio::test]
async fn slot_watchdog_warns_past_the_byte_limit() {
    let t = TestServer::with_config(|config| {
        config.monitoring.slot_wal_warn_bytes = Some(1);
        config.monitoring.slot_poll_interval = Some(Duration::from_millis(100));
    })
    .await;
    // Some WAL past the slot's restart_lsn.
    let owner = create_user(&t.client, "owner@example.com").await;
    let north = create_dealership(&t.client, "NORTH").await;
    create_order(&t.client, north, owner, "sales", "pending").await;
    let m = scrape_until(t.addr(), "the WAL warning", |m| m.get("walcast_slot_wal_warning", &[]) == Some(1.0)).await;
    let slot = &m.samples.iter().find(|s| s.0 == "walcast_slot_wal_warning").unwrap().1[0];
    assert_eq!(slot.0, "slot");
    assert!(slot.1.starts_with("ws_"), "{slot:?}");
    assert!(m.value("walcast_slot_retained_wal_bytes", &[]) > 1.0);
    assert!(m.value("walcast_slot_wal_warnings_total", &[]) >= 1.0);
    assert_eq!(m.value("walcast_slot_present", &[]), 1.0);
    assert_eq!(m.value("walcast_slot_active", &[]), 1.0);
    let statuses: f64 = ["reserved", "extended", "unreserved", "lost"]
        .iter()
        .map(|s| m.value("walcast_slot_wal_status", &[("status", s)]))
        .sum();
    assert_eq!(statuses, 1.0, "exactly one wal_status");
    assert!(m.get("walcast_slot_max_wal_keep_bytes", &[]).is_some());
    assert!(m.value("walcast_slot_confirmed_lag_bytes", &[]) >= 0.0);
    // The warning is about WAL, not readiness.
    assert_eq!(ready(t.addr()).await.0, 200);
}
