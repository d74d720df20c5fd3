//! The live dashboard (`/`, `src/http/dashboard.html`) in headless Chromium.
//!
//! - `dashboard_shows_live_changes_in_chromium`: a person picks a demo user; the board starts
//!   with the orders that user may see (a read through RLS), a change committed in PostgreSQL
//!   shows up, a change the user may not see does not, a delete takes the card away.
//! - `dashboard_shows_the_truth_after_switching_users`: with the demo writer changing orders every
//!   [`WRITER_INTERVAL`], each switch of user empties the event list at once, and within
//!   [`SYNC_WITHIN`] the board holds exactly the orders (ids, statuses, dealerships) a fresh read
//!   through RLS as that user returns; the health strip shows numbers from `/metrics`; the
//!   screenshot is kept in `<target>/dashboard.png`.
//! - `dashboard_shows_who_views_a_dealership_and_pings`: two pages (alice, bob) view NORTH and
//!   each lists both viewers (Presence on `realtime:dealership:<id>`); a ping from one shows on
//!   the other and not on the sender's own list of received pings; a ping over HTTP broadcast
//!   (a kind 4 frame to the page) shows too; a page moving to another dealership, or switching
//!   user, or closing, updates the other page's list. bob's page with alice's ping is kept in
//!   `<target>/dashboard-presence.png`.
//! - `demo_orders_reads_through_rls_and_is_demo_only`: `GET /demo/orders` answers what RLS lets
//!   the token's user see, refuses missing, forged and non-API-role tokens, and is not served
//!   outside demo mode.
//!
//! The browser is driven by `tests/clients/dashboard.mjs` (playwright-core and Debian's
//! `chromium`, both installed by `bash scripts/test-deps.sh`) over its JSON line protocol.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::demo::{self, DemoInfo};

use crate::support::server::{http_get, http_post, now, token, TestServer, SECRET};
use crate::support::{query_as, Who};

/// How long one driver event may take (the driver's own waits give up after 15 s).
const EVENT_WAIT: Duration = Duration::from_secs(20);

/// How often the demo writer changes something while users are switched.
const WRITER_INTERVAL: Duration = Duration::from_millis(150);

/// How soon after a switch of user the board must equal a fresh read through RLS.
const SYNC_WITHIN: Duration = Duration::from_secs(5);

/// The driver process: `tests/clients/dashboard.mjs`.
struct Dashboard {
    child: Child,
    stdin: ChildStdin,
    events: Lines<BufReader<ChildStdout>>,
    /// `{"ev":"console"}` events seen so far (page console errors and warnings).
    console: Vec<Value>,
    /// The driver's stderr, for failure messages.
    stderr: Arc<Mutex<String>>,
}

impl Dashboard {
    /// Opens `url` and picks `user` in the page's user picker; returns once the page is subscribed.
    async fn open(url: &str, user: &str) -> Dashboard {
        let clients = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
        let mut child = Command::new("node")
            .arg(clients.join("dashboard.mjs"))
            .args(["--url", url, "--user", user, "--timeout-ms", "15000"])
            .current_dir(&clients)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node ({e}): run `bash scripts/test-deps.sh`"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take().unwrap();
        let events = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut dashboard = Dashboard { child, stdin, events, console: Vec::new(), stderr };
        // Chromium's start counts against the first event.
        let subscribed = dashboard.next_within(EVENT_WAIT * 2).await;
        assert_eq!(subscribed, json!({"ev": "subscribed", "user": user}));
        dashboard
    }

    /// The next event other than `console`, waiting at most `wait`; panics on `error` or exit.
    async fn next_within(&mut self, wait: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let line = match tokio::time::timeout_at(deadline, self.events.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(_) => self.fail("the driver exited"),
                Err(_) => self.fail(&format!("no event within {wait:?}")),
            };
            let event: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| self.fail(&format!("not JSON ({e}): {line}")));
            match event["ev"].as_str() {
                Some("console") => self.console.push(event),
                Some("error") => self.fail(&format!("driver error: {event}")),
                _ => return event,
            }
        }
    }

    /// Sends one command and returns its event.
    async fn send(&mut self, command: Value) -> Value {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.expect("the driver reads commands");
        self.stdin.flush().await.unwrap();
        self.next_within(EVENT_WAIT).await
    }

    fn fail(&self, what: &str) -> ! {
        let stderr = self.stderr.lock().unwrap().clone();
        panic!("dashboard driver: {what}\nconsole events: {:?}\ndriver stderr:\n{stderr}", self.console);
    }

    /// Closes the browser; the driver exits 0.
    async fn close(mut self) -> Vec<Value> {
        assert_eq!(self.send(json!({"cmd": "close"})).await["ev"], "closed");
        let status = tokio::time::timeout(EVENT_WAIT, self.child.wait()).await.expect("the driver exits").unwrap();
        assert!(status.success(), "driver exit: {status}");
        // Console events printed before the exit.
        while let Ok(Some(line)) = self.events.next_line().await {
            self.console.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
        }
        self.console
    }
}

/// Where the screenshot goes: `$CARGO_TARGET_DIR/dashboard.png`, else `target/dashboard.png`.
fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&target).unwrap();
    let path = target.join("dashboard.png");
    if path.is_absolute() {
        path
    } else {
        std::env::current_dir().unwrap().join(path)
    }
}

fn dealership(info: &DemoInfo, code: &str) -> Uuid {
    info.dealerships.iter().find(|d| d.code == code).unwrap_or_else(|| panic!("demo dealership {code}")).id
}

fn user_id(info: &DemoInfo, name: &str) -> Uuid {
    info.users.iter().find(|u| u.name == name).unwrap_or_else(|| panic!("demo user {name}")).id
}

/// Inserts an order as a superuser; returns its id and order number.
async fn insert_order(client: &Client, dealership: Uuid, created_by: Uuid, customer: &str) -> (Uuid, String) {
    let row = client
        .query_one(
            "insert into public.orders (dealership_id, type, status, customer_info, vehicle_info, created_by) \
             values ($1, 'service', 'pending', $2, '{\"make\": \"Volvo\", \"model\": \"XC60\"}', $3) \
             returning id, order_number",
            &[&dealership, &json!({ "name": customer }), &created_by],
        )
        .await
        .expect("insert order");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn dashboard_shows_live_changes_in_chromium() {
    let started = Instant::now();
    let info = demo::demo_info(SECRET.as_bytes(), now());
    let demo_json = serde_json::to_vec(&info).unwrap();
    let mut server = TestServer::with_config(|config| config.demo_json = Some(demo_json.into())).await;
    demo::seed(&mut server.client).await.expect("demo data");
    let (north, east) = (dealership(&info, "NORTH"), dealership(&info, "EAST"));
    let alice = info.users.iter().find(|u| u.name == "alice").expect("alice");
    assert!(alice.dealerships.contains(&north) && !alice.dealerships.contains(&east), "{}", alice.description);

    let mut page = Dashboard::open(&format!("http://{}/", server.addr()), "alice").await;

    // The board starts with what alice may see now (nothing writes meanwhile).
    let truth = rls_orders(&mut server.client, Who::User(alice.id)).await;
    assert!(!truth.is_empty(), "the demo data has orders alice may see");
    let board = page.send(json!({"cmd": "board"})).await;
    assert_eq!(board_orders(&board), truth, "the board after loading is alice's read through RLS");
    let before = truth.len();

    // One order alice may see, one she may not, then a status change of the first.
    let client = &server.client;
    let (north_id, north_number) = insert_order(client, north, user_id(&info, "bob"), "Grace Hopper").await;
    let (_, east_number) = insert_order(client, east, user_id(&info, "carol"), "Alan Turing").await;
    client.execute("update public.orders set status = 'in_progress' where id = $1", &[&north_id]).await.unwrap();

    let seen = page.send(json!({"cmd": "expect", "order_number": north_number, "status": "in_progress"})).await;
    assert_eq!(seen["ev"], "seen", "{seen}");
    assert_eq!(seen["column"], "NORTH", "{seen}");
    assert_eq!(seen["status"], "in_progress", "{seen}");
    assert_eq!(seen["order_count"], before + 1, "the read plus the live insert: {seen}");
    assert!(seen["text"].as_str().unwrap().contains("Grace Hopper"), "{seen}");

    // The EAST insert was committed before the update just seen, so it would be here by now.
    let absent = page.send(json!({"cmd": "absent", "order_number": east_number, "ms": 800})).await;
    assert_eq!(absent, json!({"ev": "absent", "order_number": east_number, "appeared": false}));

    client.execute("delete from public.orders where id = $1", &[&north_id]).await.unwrap();
    let gone = page.send(json!({"cmd": "gone", "order_number": north_number})).await;
    assert_eq!(gone, json!({"ev": "gone", "order_number": north_number, "order_count": before}));

    let console = page.close().await;
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] != "warning").collect();
    assert!(errors.is_empty(), "page console errors: {errors:?}");
    eprintln!("dashboard live changes test: {:?}", started.elapsed());
}

#[tokio::test]
async fn dashboard_shows_the_truth_after_switching_users() {
    let started = Instant::now();
    let info = demo::demo_info(SECRET.as_bytes(), now());
    let demo_json = serde_json::to_vec(&info).unwrap();
    let mut server = TestServer::with_config(|config| config.demo_json = Some(demo_json.into())).await;
    demo::seed(&mut server.client).await.expect("demo data");
    let stop_writer = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(demo::run_writer(server.db.url().to_owned(), WRITER_INTERVAL, stop_writer.clone()));

    let opened = Instant::now();
    let mut page = Dashboard::open(&format!("http://{}/", server.addr()), "alice").await;
    let alice = user_id(&info, "alice");
    let board =
        wait_for_truth(&mut page, &mut server.client, "alice", Who::User(alice), Instant::now() + SYNC_WITHIN).await;
    assert!(!board["orders"].as_array().unwrap().is_empty(), "alice sees orders: {board}");
    // alice's events pile up: the writer touches her dealerships several times a second.
    let deadline = Instant::now() + SYNC_WITHIN;
    while page.send(json!({"cmd": "board"})).await["log"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no event listed for alice within {SYNC_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("opened as alice, synced and with events in {:?}", opened.elapsed());

    let everyone: BTreeSet<String> = info.dealerships.iter().map(|d| d.id.to_string()).collect();
    let viewers = [
        ("dave", Who::User(user_id(&info, "dave")), BTreeSet::new()),
        ("carol", Who::User(user_id(&info, "carol")), BTreeSet::from([dealership(&info, "EAST").to_string()])),
        ("service role", Who::Service, everyone),
    ];
    for (name, who, visible) in viewers {
        let switched_at = Instant::now();
        let switched = page.send(json!({"cmd": "switch", "user": name})).await;
        assert_eq!(
            switched,
            json!({"ev": "switched", "user": name, "log_count": 0, "order_count": 0}),
            "the previous viewer's events and orders leave with the switch"
        );
        let board = wait_for_truth(&mut page, &mut server.client, name, who, switched_at + SYNC_WITHIN).await;
        eprintln!("switched to {name}: the board equals the read through RLS after {:?}", switched_at.elapsed());
        // Every event listed since the switch is one this viewer may see.
        for event in board["log"].as_array().unwrap() {
            let dealership = event["dealership_id"].as_str().unwrap_or_default();
            assert!(visible.contains(dealership), "{name} is shown an event of dealership {dealership}: {board}");
        }
    }

    // The health strip shows the relay's numbers (the service role receives every change now).
    let deadline = Instant::now() + SYNC_WITHIN;
    let health = loop {
        let health = page.send(json!({"cmd": "board"})).await["health"].clone();
        let number = |key: &str| health[key].as_str().and_then(|v| v.parse::<f64>().ok());
        if let (Some(connections), Some(rate), Some(lag_seconds), Some(lag_bytes)) =
            (number("connections"), number("deliveries_per_second"), number("lag_seconds"), number("lag_bytes"))
        {
            assert!(connections >= 1.0 && lag_seconds >= 0.0 && lag_bytes >= 0.0, "{health}");
            if rate > 0.0 {
                break health;
            }
        }
        assert!(Instant::now() < deadline, "the health strip shows no deliveries/s: {health}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let text = health["text"].as_str().unwrap();
    assert!(
        text.contains("connections") && text.contains("deliveries/s") && text.contains("replication lag"),
        "{text}"
    );

    let path = screenshot_path();
    let _ = std::fs::remove_file(&path);
    let shot = page.send(json!({"cmd": "screenshot", "path": path})).await;
    assert_eq!(shot["ev"], "screenshot", "{shot}");
    let png = std::fs::read(&path).expect("the screenshot exists");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {}", path.display());
    assert!(png.len() > 10 * 1024, "{} is only {} bytes", path.display(), png.len());

    stop_writer.cancel();
    writer.await.unwrap();
    let console = page.close().await;
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] != "warning").collect();
    assert!(errors.is_empty(), "page console errors: {errors:?}");
    eprintln!("dashboard switching test: {:?}, screenshot {} ({} bytes)", started.elapsed(), path.display(), png.len());
}

/// The names a `viewers` event lists, sorted, and how many of them are the page itself.
fn viewer_names(event: &Value) -> (Vec<String>, usize) {
    let viewers = event["viewers"].as_array().unwrap_or_else(|| panic!("no viewers in {event}"));
    let mut names: Vec<String> = viewers.iter().map(|v| v["user"].as_str().unwrap_or_default().to_owned()).collect();
    names.sort();
    (names, viewers.iter().filter(|v| v["me"] == true).count())
}

#[tokio::test]
async fn dashboard_shows_who_views_a_dealership_and_pings() {
    let started = Instant::now();
    let info = demo::demo_info(SECRET.as_bytes(), now());
    let demo_json = serde_json::to_vec(&info).unwrap();
    let mut server = TestServer::with_config(|config| config.demo_json = Some(demo_json.into())).await;
    demo::seed(&mut server.client).await.expect("demo data");
    let url = format!("http://{}/", server.addr());
    let (mut alice, mut bob) = tokio::join!(Dashboard::open(&url, "alice"), Dashboard::open(&url, "bob"));

    // Both view NORTH: each lists both, itself once.
    let a = alice.send(json!({"cmd": "view", "dealership": "NORTH"})).await;
    let b = bob.send(json!({"cmd": "view", "dealership": "NORTH"})).await;
    assert_eq!((a["ev"].as_str(), b["ev"].as_str()), (Some("viewing"), Some("viewing")), "{a} {b}");
    assert_ne!(a["viewer"], b["viewer"], "one presence key per tab: {a} {b}");
    for page in [&mut alice, &mut bob] {
        let viewers = page.send(json!({"cmd": "viewers", "count": 2})).await;
        assert_eq!(viewer_names(&viewers), (vec!["alice".to_owned(), "bob".to_owned()], 1), "{viewers}");
    }

    // A ping from bob shows on alice's page; alice's reaches bob, who did not get his own.
    let pinged = bob.send(json!({"cmd": "ping"})).await;
    assert_eq!(pinged["ev"], "pinged", "{pinged}");
    assert!(pinged["text"].as_str().unwrap().contains("1 other viewer"), "{pinged}");
    let seen = alice.send(json!({"cmd": "expect_ping", "from": "bob"})).await;
    assert_eq!((&seen["ev"], &seen["pings_received"]), (&json!("ping_seen"), &json!(1)), "{seen}");
    assert!(seen["text"].as_str().unwrap().contains("bob pinged the team"), "{seen}");
    assert_eq!(alice.send(json!({"cmd": "ping"})).await["ev"], "pinged");
    let seen = bob.send(json!({"cmd": "expect_ping", "from": "alice"})).await;
    assert_eq!(seen["pings_received"], 1, "bob's own ping is not shown as received: {seen}");
    let path = screenshot_path().with_file_name("dashboard-presence.png");
    let shot = bob.send(json!({"cmd": "screenshot", "path": path})).await;
    assert_eq!(shot["ev"], "screenshot", "{shot}");

    // A ping over HTTP broadcast reaches the page as a kind 4 frame.
    let north = dealership(&info, "NORTH");
    let target = format!("/realtime/v1/api/broadcast/dealership%3A{north}/events/ping");
    let headers = [("apikey", info.anon_key.as_str()), ("content-type", "application/json")];
    let body = json!({"from": "ops", "at": "2026-01-02T03:04:05Z"}).to_string();
    assert_eq!(http_post(server.addr(), &target, &headers, body.as_bytes()).await, (202, String::new()));
    let seen = alice.send(json!({"cmd": "expect_ping", "from": "ops"})).await;
    assert_eq!((&seen["at"], &seen["pings_received"]), (&json!("2026-01-02T03:04:05Z"), &json!(2)), "{seen}");

    // bob moves to EAST and back, then switches to carol: alice's list follows.
    assert_eq!(bob.send(json!({"cmd": "view", "dealership": "EAST"})).await["ev"], "viewing");
    let viewers = alice.send(json!({"cmd": "viewers", "count": 1, "users": ["alice"]})).await;
    assert_eq!(viewer_names(&viewers), (vec!["alice".to_owned()], 1), "{viewers}");
    let viewers = bob.send(json!({"cmd": "viewers", "count": 1, "users": ["bob"]})).await;
    assert_eq!(viewer_names(&viewers), (vec!["bob".to_owned()], 1), "{viewers}");
    assert_eq!(bob.send(json!({"cmd": "view", "dealership": "NORTH"})).await["ev"], "viewing");
    alice.send(json!({"cmd": "viewers", "count": 2, "users": ["alice", "bob"]})).await;
    assert_eq!(bob.send(json!({"cmd": "switch", "user": "carol"})).await["ev"], "switched");
    let viewers = alice.send(json!({"cmd": "viewers", "count": 2, "users": ["alice", "carol"]})).await;
    assert_eq!(viewer_names(&viewers), (vec!["alice".to_owned(), "carol".to_owned()], 1), "{viewers}");

    // bob's page closes: alice is alone.
    let console = bob.close().await;
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] != "warning").collect();
    assert!(errors.is_empty(), "second page console errors: {errors:?}");
    let viewers = alice.send(json!({"cmd": "viewers", "count": 1, "users": ["alice"]})).await;
    assert_eq!(viewer_names(&viewers), (vec!["alice".to_owned()], 1), "{viewers}");

    let console = alice.close().await;
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] != "warning").collect();
    assert!(errors.is_empty(), "page console errors: {errors:?}");
    eprintln!("dashboard presence and ping test: {:?}", started.elapsed());
}

#[tokio::test]
async fn demo_orders_reads_through_rls_and_is_demo_only() {
    let info = demo::demo_info(SECRET.as_bytes(), now());
    let demo_json = serde_json::to_vec(&info).unwrap();
    let mut server = TestServer::with_config(|config| config.demo_json = Some(demo_json.into())).await;
    demo::seed(&mut server.client).await.expect("demo data");
    let addr = server.addr();
    let get = |token: String| async move {
        let authorization = format!("Bearer {token}");
        let (status, body) = http_get(addr, "/demo/orders", &[("authorization", authorization.as_str())]).await;
        (status, serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)))
    };

    for user in &info.users {
        let (status, body) = get(user.token.clone()).await;
        assert_eq!(status, 200, "{}: {body}", user.name);
        assert_eq!(body["role"], "authenticated");
        let truth = rls_orders(&mut server.client, Who::User(user.id)).await;
        assert_eq!(board_orders(&body), truth, "{}", user.name);
        for order in body["orders"].as_array().unwrap() {
            assert!(order["updated_at"].as_str().unwrap().ends_with("+00:00"), "{order}");
        }
    }
    let (status, body) = get(info.service_role_key.clone()).await;
    assert_eq!(
        (status, body["orders"].as_array().map(Vec::len)),
        (200, Some(rls_orders(&mut server.client, Who::Service).await.len()))
    );
    let (status, body) = get(info.anon_key.clone()).await;
    assert_eq!((status, &body["orders"]), (200, &json!([])), "anon sees no orders");

    // Refused: no token, a forged one, a role that is not an API role, a sub that is no user id.
    let (status, _) = http_get(addr, "/demo/orders", &[]).await;
    assert_eq!(status, 401);
    let forged = walcast::realtime::auth::sign_hs256(
        b"another-secret-another-secret-another-secret",
        &json!({"role": "service_role", "exp": now() + 60}),
    );
    assert_eq!(get(forged).await, (401, json!({"error": "Failed to validate JWT signature"})));
    assert_eq!(get(token("postgres", None, 60)).await.0, 403);
    let not_a_user = walcast::realtime::auth::sign_hs256(
        SECRET.as_bytes(),
        &json!({"role": "authenticated", "sub": "alice", "exp": now() + 60}),
    );
    assert_eq!(get(not_a_user).await.0, 403);
    assert_eq!(get(token("authenticated", None, -10)).await.0, 401, "expired");

    // Not served outside the demo.
    let plain = TestServer::start().await;
    let (status, body) = http_get(
        plain.addr(),
        "/demo/orders",
        &[("authorization", format!("Bearer {}", info.service_role_key).as_str())],
    )
    .await;
    assert_eq!((status, body.as_str()), (404, r#"{"error":"not in demo mode"}"#));
}

/// `(id, status, dealership_id)` of every order `who` may see, read through RLS by the test.
async fn rls_orders(client: &mut Client, who: Who) -> BTreeSet<(String, String, String)> {
    query_as(client, who, "select id::text, status, dealership_id::text from public.orders", &[])
        .await
        .expect("read as the user")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// `(id, status, dealership_id)` of every order in `orders` of a `board` event or a
/// `/demo/orders` answer.
fn board_orders(board: &Value) -> BTreeSet<(String, String, String)> {
    let field = |order: &Value, key: &str| order[key].as_str().unwrap_or_default().to_owned();
    board["orders"]
        .as_array()
        .unwrap_or_else(|| panic!("no orders in {board}"))
        .iter()
        .map(|order| (field(order, "id"), field(order, "status"), field(order, "dealership_id")))
        .collect()
}

/// Polls until the page has merged `name`'s read and its board equals a read through RLS as
/// `who` done just before; returns that board. Panics at `deadline`, showing the difference.
async fn wait_for_truth(page: &mut Dashboard, client: &mut Client, name: &str, who: Who, deadline: Instant) -> Value {
    loop {
        let truth = rls_orders(client, who).await;
        let board = page.send(json!({"cmd": "board"})).await;
        let shown = board_orders(&board);
        if board["synced"] == name && shown == truth {
            return board;
        }
        if Instant::now() >= deadline {
            panic!(
                "the board for {name} did not equal a read through RLS in time\n\
                 synced: {}\nonly on the board: {:?}\nonly in the read: {:?}",
                board["synced"],
                shown.difference(&truth).collect::<Vec<_>>(),
                truth.difference(&shown).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
