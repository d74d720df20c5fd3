//! The live dashboard (`/`, `src/http/dashboard.html`) in headless Chromium: a person picks a
//! demo user, a change committed in PostgreSQL shows up on the board, a change the user may not
//! see does not, and a screenshot is kept in `<target>/dashboard.png`.
//!
//! The browser is driven by `tests/clients/dashboard.mjs` (playwright-core and Debian's
//! `chromium`, both installed by `bash scripts/test-deps.sh`) over its JSON line protocol.

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

use crate::support::server::{now, TestServer, SECRET};

/// How long one driver event may take (the driver's own waits give up after 15 s).
const EVENT_WAIT: Duration = Duration::from_secs(20);

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

    // One order alice may see, one she may not, then a status change of the first.
    let client = &server.client;
    let (north_id, north_number) = insert_order(client, north, user_id(&info, "bob"), "Grace Hopper").await;
    let (_, east_number) = insert_order(client, east, user_id(&info, "carol"), "Alan Turing").await;
    client.execute("update public.orders set status = 'in_progress' where id = $1", &[&north_id]).await.unwrap();

    let seen = page.send(json!({"cmd": "expect", "order_number": north_number, "status": "in_progress"})).await;
    assert_eq!(seen["ev"], "seen", "{seen}");
    assert_eq!(seen["column"], "NORTH", "{seen}");
    assert_eq!(seen["status"], "in_progress", "{seen}");
    assert_eq!(seen["order_count"], 1, "only the live change is on the board: {seen}");
    assert!(seen["text"].as_str().unwrap().contains("Grace Hopper"), "{seen}");

    // The EAST insert was committed before the update just seen, so it would be here by now.
    let absent = page.send(json!({"cmd": "absent", "order_number": east_number, "ms": 800})).await;
    assert_eq!(absent, json!({"ev": "absent", "order_number": east_number, "appeared": false}));

    let path = screenshot_path();
    let _ = std::fs::remove_file(&path);
    let shot = page.send(json!({"cmd": "screenshot", "path": path})).await;
    assert_eq!(shot["ev"], "screenshot", "{shot}");
    let png = std::fs::read(&path).expect("the screenshot exists");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {}", path.display());
    assert!(png.len() > 10 * 1024, "{} is only {} bytes", path.display(), png.len());

    client.execute("delete from public.orders where id = $1", &[&north_id]).await.unwrap();
    let gone = page.send(json!({"cmd": "gone", "order_number": north_number})).await;
    assert_eq!(gone, json!({"ev": "gone", "order_number": north_number, "order_count": 0}));

    let console = page.close().await;
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] != "warning").collect();
    assert!(errors.is_empty(), "page console errors: {errors:?}");
    eprintln!("dashboard test: {:?}, screenshot {} ({} bytes)", started.elapsed(), path.display(), png.len());
}
