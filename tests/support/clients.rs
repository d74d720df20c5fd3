//! The official Realtime clients as test subjects: spawns a driver from
//! `tests/clients` (`driver.mjs` for supabase-js and realtime-js 2.80,
//! `driver.py` for Python `realtime`; see `tests/clients/README.md`), writes
//! its commands to stdin and reads its JSON-line events from stdout.
//!
//! Every event is kept in [`Driver::history`], in arrival order. Expectations
//! ([`Driver::expect`]) take the first event not yet taken by an earlier
//! expectation that matches, waiting for new ones if needed; negative checks
//! look at everything since a [`Driver::mark`]. Failures print the driver's
//! recent events (including the library's frame log) and its stderr. With
//! `WALCAST_CLIENT_LOG_DIR=<dir>` every driver leaves its full event log
//! there when dropped. Missing `node_modules`/venv fail the test with a
//! pointer to `scripts/test-deps.sh`; nothing is skipped.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long an expected event may take (generous: two cores, several drivers).
pub const WAIT: Duration = Duration::from_secs(20);

/// How long "nothing arrives" is watched, after a witness has seen the change.
pub const QUIET: Duration = Duration::from_millis(700);

/// `tests/clients`.
pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("clients")
}

/// Which official client a driver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `@supabase/supabase-js` 2.119.1 with `--vsn`, `--auth callback`.
    SupabaseJs(&'static str),
    /// `@supabase/realtime-js` 2.80.0 (vsn 1.0.0).
    RealtimeJsOld,
    /// PyPI `realtime` 2.34.1 (vsn 1.0.0).
    Python,
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::SupabaseJs(vsn) => format!("supabase-js vsn {vsn}"),
            Kind::RealtimeJsOld => "realtime-js-old".to_owned(),
            Kind::Python => "python realtime".to_owned(),
        }
    }
}

/// Fails (never skips) when `scripts/test-deps.sh` has not been run.
fn require_deps(kind: Kind) {
    let dir = clients_dir();
    let needed: Vec<PathBuf> = match kind {
        Kind::SupabaseJs(_) => {
            vec![dir.join("node_modules/@supabase/supabase-js/package.json"), dir.join("node_modules/ws/package.json")]
        }
        Kind::RealtimeJsOld => {
            vec![dir.join("node_modules/realtime-js-2-80/package.json"), dir.join("node_modules/ws/package.json")]
        }
        Kind::Python => vec![dir.join(".venv/bin/python")],
    };
    for path in needed {
        assert!(
            path.exists(),
            "the official client drivers are not installed ({} is missing): run `bash scripts/test-deps.sh` first",
            path.display()
        );
    }
    if kind != Kind::Python {
        let node = std::process::Command::new("node").arg("--version").output();
        assert!(
            node.as_ref().is_ok_and(|o| o.status.success()),
            "`node` is not runnable ({node:?}): run `bash scripts/test-deps.sh` first"
        );
    }
}

/// One running driver process. Killed on drop.
pub struct Driver {
    /// A name for failure messages.
    pub name: String,
    /// Which client.
    pub kind: Kind,
    /// Every event received so far, in order.
    pub history: Vec<Value>,
    /// The `ready` event.
    pub ready: Value,
    taken: Vec<bool>,
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<Value>,
    stderr: Arc<Mutex<String>>,
    next_id: u64,
}

impl Driver {
    /// Starts a driver for `kind` against the server at `base_url`
    /// (`http://127.0.0.1:PORT`) with apikey `key`; waits for `ready`.
    pub async fn start(name: &str, kind: Kind, base_url: &str, key: &str) -> Driver {
        Driver::start_with(name, kind, base_url, key, &[]).await
    }

    /// [`Driver::start`] with more driver options (e.g. `--timeout-ms`).
    pub async fn start_with(name: &str, kind: Kind, base_url: &str, key: &str, options: &[&str]) -> Driver {
        require_deps(kind);
        let dir = clients_dir();
        let mut command = match kind {
            Kind::Python => {
                let mut c = Command::new(dir.join(".venv/bin/python"));
                c.arg(dir.join("driver.py"));
                c
            }
            Kind::SupabaseJs(vsn) => {
                let mut c = Command::new("node");
                c.arg(dir.join("driver.mjs")).args(["--client", "supabase-js", "--auth", "callback", "--vsn", vsn]);
                c
            }
            Kind::RealtimeJsOld => {
                let mut c = Command::new("node");
                c.arg(dir.join("driver.mjs")).args(["--client", "realtime-js-old"]);
                c
            }
        };
        command
            .args(["--url", base_url, "--key", key])
            .args(options)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("{name}: cannot start the {kind:?} driver: {e}"));
        let stdin = child.stdin.take().expect("stdin piped");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut stderr_pipe = child.stderr.take().expect("stderr piped");

        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = serde_json::from_str::<Value>(&line).unwrap_or_else(
                    |e| json!({"ev": "error", "source": "harness", "message": format!("non-JSON stdout line ({e}): {line}")}),
                );
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let mut driver = Driver {
            name: format!("{name} ({})", kind.label()),
            kind,
            history: Vec::new(),
            ready: Value::Null,
            taken: Vec::new(),
            child,
            stdin,
            events,
            stderr,
            next_id: 0,
        };
        driver.ready = driver.expect("ready", |e| e["ev"] == "ready").await;
        driver
    }

    /// The client library's version, from `ready`.
    pub fn version(&self) -> String {
        self.ready["version"].as_str().unwrap_or("?").to_owned()
    }

    /// Where [`Driver::since`] and [`Driver::assert_none_since`] start.
    pub fn mark(&self) -> usize {
        self.history.len()
    }

    fn push(&mut self, event: Value) {
        self.history.push(event);
        self.taken.push(false);
    }

    /// Moves every event already read from the driver into the history.
    pub fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.push(event);
        }
    }

    /// The first untaken event matching `pred`, waiting up to `timeout`; marks it taken.
    pub async fn expect_within(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.drain();
        if let Some(i) = (0..self.history.len()).find(|&i| !self.taken[i] && pred(&self.history[i])) {
            self.taken[i] = true;
            return self.history[i].clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => {
                    let hit = pred(&event);
                    self.push(event);
                    if hit {
                        *self.taken.last_mut().unwrap() = true;
                        return self.history.last().unwrap().clone();
                    }
                }
                Ok(None) => {
                    let status = self.child.try_wait();
                    panic!(
                        "{}: driver exited ({status:?}) while waiting for {what}\n{}",
                        self.name.clone(),
                        self.report()
                    );
                }
                Err(_) => panic!("{}: no {what} within {timeout:?}\n{}", self.name.clone(), self.report()),
            }
        }
    }

    /// [`Driver::expect_within`] with [`WAIT`].
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_within(what, WAIT, pred).await
    }

    /// Events since `mark` matching `pred` (after draining).
    pub fn since(&mut self, mark: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.drain();
        self.history[mark..].iter().filter(|e| pred(e)).cloned().collect()
    }

    /// Fails if any event since `mark` matches `pred`. Call after a quiet
    /// period during which a witness received the change in question.
    pub fn assert_none_since(&mut self, mark: usize, what: &str, pred: impl Fn(&Value) -> bool) {
        let got = self.since(mark, pred);
        assert!(got.is_empty(), "{}: expected no {what}, got {}\n{}", self.name.clone(), compact(&got), self.report());
    }

    /// Sends one command; waits for its `ok` (panics on its `error`).
    pub async fn command(&mut self, mut cmd: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        cmd["id"] = json!(id);
        let line = format!("{cmd}\n");
        if let Err(e) = self.stdin.write_all(line.as_bytes()).await {
            panic!("{}: cannot write {cmd}: {e}\n{}", self.name.clone(), self.report());
        }
        self.stdin.flush().await.expect("flush driver stdin");
        let what = format!("the reply to {cmd}");
        let reply = self.expect(&what, |e| (e["ev"] == "ok" || e["ev"] == "error") && e["id"] == json!(id)).await;
        assert_eq!(reply["ev"], "ok", "{}: {cmd} failed: {reply}\n{}", self.name.clone(), self.report());
        reply
    }

    /// Subscribes `channel` (topic = channel) with `bindings`, optionally
    /// `setAuth(token)` first; waits for `SUBSCRIBED` and then for the
    /// "Subscribed to PostgreSQL" system event, as apps should before writing.
    pub async fn subscribe(&mut self, channel: &str, bindings: Value, token: Option<&str>) {
        self.subscribe_topic(channel, channel, bindings, token).await;
    }

    /// [`Driver::subscribe`] with a topic other than the channel handle.
    pub async fn subscribe_topic(&mut self, channel: &str, topic: &str, bindings: Value, token: Option<&str>) {
        let mut cmd = json!({"cmd": "subscribe", "channel": channel, "topic": topic, "bindings": bindings});
        if let Some(token) = token {
            cmd["token"] = json!(token);
        }
        self.command(cmd).await;
        let status = self.expect(&format!("a status for {channel}"), |e| is_status(e, channel, None)).await;
        assert_eq!(status["status"], "SUBSCRIBED", "{}: {status}\n{}", self.name.clone(), self.report());
        self.expect_postgres_ready(channel).await;
    }

    /// Waits for the next "Subscribed to PostgreSQL" system event of `channel`.
    pub async fn expect_postgres_ready(&mut self, channel: &str) -> Value {
        let event = self
            .expect(&format!("\"Subscribed to PostgreSQL\" on {channel}"), |e| {
                e["ev"] == "system" && e["channel"] == channel
            })
            .await;
        let payload = &event["payload"];
        assert_eq!(
            (payload["status"].as_str(), payload["message"].as_str(), payload["extension"].as_str()),
            (Some("ok"), Some("Subscribed to PostgreSQL"), Some("postgres_changes")),
            "{}: {event}\n{}",
            self.name.clone(),
            self.report()
        );
        event
    }

    /// `setAuth(token)`.
    pub async fn set_auth(&mut self, token: &str) {
        self.command(json!({"cmd": "setAuth", "token": token})).await;
    }

    /// Leaves `channel`; returns the `unsubscribed` result.
    pub async fn unsubscribe(&mut self, channel: &str) -> Value {
        self.command(json!({"cmd": "unsubscribe", "channel": channel})).await;
        let event = self.expect("unsubscribed", |e| e["ev"] == "unsubscribed" && e["channel"] == channel).await;
        event["result"].clone()
    }

    /// The next untaken change event of `channel`/`binding` matching `pred`.
    pub async fn expect_change(
        &mut self,
        channel: &str,
        binding: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let what = format!("{what} on {channel}[{binding}]");
        let event = self.expect(&what, |e| is_change(e, channel, Some(binding)) && pred(&e["payload"])).await;
        event["payload"].clone()
    }

    /// Every status of `channel`, in order.
    pub fn statuses(&mut self, channel: &str) -> Vec<String> {
        self.since(0, |e| is_status(e, channel, None))
            .iter()
            .map(|e| e["status"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    /// Fails if the driver reported any error: in particular a binding
    /// mismatch (realtime-js) or a frame the client rejected (Python's
    /// "Unrecognized message format").
    pub fn assert_clean(&mut self) {
        let errors = self.since(0, |e| e["ev"] == "error");
        for error in &errors {
            let text = error.to_string();
            assert!(
                !text.contains("mismatch between server and client bindings"),
                "{}: binding mismatch: {error}\n{}",
                self.name.clone(),
                self.report()
            );
            assert!(
                !text.contains("Unrecognized message format"),
                "{}: the client rejected a server frame: {error}\n{}",
                self.name.clone(),
                self.report()
            );
        }
        assert!(errors.is_empty(), "{}: error events {}\n{}", self.name.clone(), compact(&errors), self.report());
        let bad = self
            .since(0, |e| e["ev"] == "status" && matches!(e["status"].as_str(), Some("CHANNEL_ERROR" | "TIMED_OUT")));
        assert!(bad.is_empty(), "{}: bad statuses {}\n{}", self.name.clone(), compact(&bad), self.report());
    }

    /// The last events (library frame log included) and stderr, for failures.
    pub fn report(&mut self) -> String {
        self.drain();
        let mut out = String::from("--- last driver events:\n");
        let start = self.history.len().saturating_sub(80);
        for event in &self.history[start..] {
            let mut line = event.to_string();
            if line.len() > 600 {
                let mut cut = 600;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push('…');
            }
            let _ = writeln!(out, "  {line}");
        }
        let stderr = self.stderr.lock().unwrap().clone();
        let tail: String = stderr.chars().rev().take(4000).collect::<Vec<_>>().into_iter().rev().collect();
        let _ = write!(out, "--- stderr:\n{tail}");
        out
    }
}

/// A `status` event of `channel` (with `status`, if given).
pub fn is_status(event: &Value, channel: &str, status: Option<&str>) -> bool {
    event["ev"] == "status" && event["channel"] == channel && status.is_none_or(|s| event["status"] == s)
}

/// A `change` event of `channel` (and `binding`, if given).
pub fn is_change(event: &Value, channel: &str, binding: Option<usize>) -> bool {
    event["ev"] == "change" && event["channel"] == channel && binding.is_none_or(|b| event["binding"] == json!(b))
}

/// Any `change` event.
pub fn any_change(event: &Value) -> bool {
    event["ev"] == "change"
}

/// Waits [`QUIET`]: during it, drivers keep reading into their buffers.
pub async fn quiet_period() {
    tokio::time::sleep(QUIET).await;
}

fn compact(events: &[Value]) -> String {
    events.iter().map(Value::to_string).collect::<Vec<_>>().join("\n  ")
}

impl Drop for Driver {
    /// With `WALCAST_CLIENT_LOG_DIR` set, leaves the driver's events there
    /// (`<name>.jsonl`) for inspection. The process is killed (`kill_on_drop`).
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("WALCAST_CLIENT_LOG_DIR") else { return };
        self.drain();
        let file: String =
            self.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        let body: String = self.history.iter().map(|e| format!("{e}\n")).collect();
        let path = Path::new(&dir).join(format!("{file}-{}.jsonl", self.child.id().unwrap_or(0)));
        let _ = std::fs::write(path, body);
    }
}
