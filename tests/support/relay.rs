//! `walcast serve` as a child process, for tests that kill it, watch it exit,
//! or read its logs.
//!
//! The child runs the built binary (`CARGO_BIN_EXE_walcast`) with a clean
//! environment (only `RUST_LOG` and `PATH`), `serve --log-format json` (the
//! flag after the subcommand: `walcast --log-format json serve` is refused by
//! the argument parser), port 0 on
//! 127.0.0.1, and the test's JWT secret. Its stdout and stderr are read by
//! two threads into memory: stdout holds the "walcast serving on ws://…"
//! line the address is taken from, stderr the JSON log lines (one event
//! each) and, after an error, the final `walcast: …` line. Dropping a
//! [`RelayProcess`] stops the child (SIGTERM, then SIGKILL after 5 s), so a
//! failing test leaves no relay behind.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::server::SECRET;

/// The default `RUST_LOG` of a child: info, plus the hub's per-transaction
/// debug events (xid, LSNs, change count; never row values).
pub const RUST_LOG: &str = "info,walcast::hub=debug";

/// How long [`RelayProcess::start`] waits for the child to serve.
pub const START_WAIT: Duration = Duration::from_secs(30);

/// Lines read from one of the child's pipes.
type Lines = Arc<Mutex<Vec<String>>>;

/// A `walcast serve` child process.
pub struct RelayProcess {
    child: Child,
    /// Where it serves (once [`RelayProcess::start`] returned).
    pub addr: SocketAddr,
    stdout: Lines,
    stderr: Lines,
    /// When it was spawned.
    pub spawned: Instant,
    /// How long it took from spawn to serving.
    pub startup: Duration,
    status: Option<ExitStatus>,
    /// The two pipe readers: finished once their pipe reached end of file.
    readers: [std::thread::JoinHandle<()>; 2],
}

fn pump(pipe: impl Read + Send + 'static, lines: Lines) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    })
}

impl RelayProcess {
    /// Spawns `walcast serve` on `database_url` with `slot`, and waits until
    /// it serves. Panics (with the child's output) if it exits or does not
    /// serve within [`START_WAIT`].
    pub async fn start(database_url: &str, slot: &str) -> RelayProcess {
        let mut relay = RelayProcess::spawn(database_url, slot, &[]);
        relay.wait_serving().await;
        relay
    }

    /// Spawns `walcast serve` without waiting; `extra` flags are appended.
    pub fn spawn(database_url: &str, slot: &str, extra: &[&str]) -> RelayProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_walcast"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", std::env::var("WALCAST_TEST_RUST_LOG").unwrap_or_else(|_| RUST_LOG.to_owned()))
            .args(["serve", "--log-format", "json", "--database-url", database_url, "--jwt-secret", SECRET])
            .args(["--host", "127.0.0.1", "--port", "0", "--slot", slot])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = command.spawn().expect("spawn walcast serve");
        let stdout = Lines::default();
        let stderr = Lines::default();
        let readers = [
            pump(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            pump(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        RelayProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout,
            stderr,
            spawned,
            startup: Duration::ZERO,
            status: None,
            readers,
        }
    }

    /// Waits for the "walcast serving on ws://ADDR/…" line; panics with the
    /// child's output if it exits first or takes longer than [`START_WAIT`].
    pub async fn wait_serving(&mut self) {
        self.wait_serving_within(START_WAIT).await;
    }

    /// As [`RelayProcess::wait_serving`], within `wait`.
    pub async fn wait_serving_within(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let line = self.stdout.lock().unwrap().iter().find(|l| l.starts_with("walcast serving on ws://")).cloned();
            if let Some(line) = line {
                let addr = line["walcast serving on ws://".len()..].split('/').next().unwrap();
                self.addr = addr.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
                self.startup = self.spawned.elapsed();
                return;
            }
            if let Some(status) = self.try_status() {
                panic!("walcast exited ({status}) before serving:\n{}", self.output());
            }
            assert!(Instant::now() < deadline, "walcast did not serve within {wait:?}:\n{}", self.output());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Whether the child still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // unreaped child, so it cannot have been reused.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill -9: {}", std::io::Error::last_os_error());
        self.status = Some(self.child.wait().expect("wait"));
    }

    /// Waits (polling, at most `wait`) for the child to exit.
    /// Once it has, also waits (at most 5 s) until its last output was read,
    /// so a final error line is in [`RelayProcess::plain_stderr`].
    pub async fn wait_exit(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.try_status() {
                let read = Instant::now() + Duration::from_secs(5);
                while !self.readers.iter().all(std::thread::JoinHandle::is_finished) && Instant::now() < read {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the child: SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            // SAFETY: as in `kill9`.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.try_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.try_status().is_none() {
                self.kill9();
            }
        }
        self.status
    }

    /// Everything it wrote to stderr so far (log lines, then any final error).
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Its JSON log events so far (stderr lines that parse as JSON objects).
    pub fn events(&self) -> Vec<Value> {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(Value::is_object)
            .collect()
    }

    /// The log events whose message is `message`.
    pub fn events_named(&self, message: &str) -> Vec<Value> {
        self.events().into_iter().filter(|e| e["fields"]["message"] == message).collect()
    }

    /// The stderr lines that are not JSON: the binary's final `walcast: …`
    /// error line (and anything printed outside the logger).
    pub fn plain_stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().iter().filter(|l| serde_json::from_str::<Value>(l).is_err()).cloned().collect()
    }

    /// stdout and stderr, for failure messages (the last 60 lines of stderr).
    pub fn output(&self) -> String {
        let stdout = self.stdout.lock().unwrap().join("\n");
        let stderr = self.stderr.lock().unwrap();
        let tail = stderr.iter().skip(stderr.len().saturating_sub(60)).cloned().collect::<Vec<_>>().join("\n");
        format!("--- stdout\n{stdout}\n--- stderr (tail)\n{tail}")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `GET /ready` answer.
#[derive(Debug, Clone)]
pub struct ReadyAnswer {
    /// When it arrived.
    pub at: Instant,
    /// HTTP status.
    pub status: u16,
    /// The body.
    pub body: String,
}

/// Polls `GET /ready` every 5 ms in the background until the server stops
/// answering (or the probe is dropped), keeping every answer. Builds
/// without `/ready` answer 404.
pub struct ReadyProbe {
    answers: Arc<Mutex<Vec<ReadyAnswer>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A raw `GET target`: (status, body), or `None` when the server does not
/// answer within a second.
pub async fn try_get(addr: SocketAddr, target: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange).await.ok().flatten()
}

impl ReadyProbe {
    /// Starts polling `addr`.
    pub fn start(addr: SocketAddr) -> ReadyProbe {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let answers = Arc::clone(&answers);
            tokio::spawn(async move {
                let mut misses = 0;
                while misses < 20 {
                    match try_get(addr, "/ready").await {
                        Some((status, body)) => {
                            misses = 0;
                            answers.lock().unwrap().push(ReadyAnswer { at: Instant::now(), status, body });
                        }
                        None => misses += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        ReadyProbe { answers, task }
    }

    /// Every answer so far.
    pub fn answers(&self) -> Vec<ReadyAnswer> {
        self.answers.lock().unwrap().clone()
    }
}

impl Drop for ReadyProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}
