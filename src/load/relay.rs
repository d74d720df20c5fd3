//! The relay under load: a child process (`walcast serve`, the default), the
//! relay in this process, or an external relay; plus what `/proc` says about
//! a process (CPU ticks, VmRSS, VmHWM) and the file-descriptor limit.
//!
//! Invariants:
//! - a child relay listens on 127.0.0.1 only, gets `RLIMIT_NOFILE` raised to
//!   its hard limit before `exec` and `PR_SET_PDEATHSIG(SIGTERM)` so it never
//!   outlives the load process; it is stopped with SIGTERM (then SIGKILL after
//!   a deadline) by its pid, never by name;
//! - readiness is `/health` answering 200, then a real subscription (see
//!   [`super::run`]'s probe), each bounded in time;
//! - an external relay must be on a loopback address.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::LoadError;

/// How long a child relay may take to answer `/health`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child relay may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the relay runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMode {
    /// A `walcast serve` child process (CPU and RSS are the relay's own).
    Process {
        /// The `walcast` executable (default: this one).
        exe: PathBuf,
    },
    /// `Server::start` in this process (RSS and CPU include the load generator).
    InProc,
    /// A running relay at this `ws://host:port/path` URL.
    External {
        /// The URL.
        url: String,
    },
}

/// A started relay.
#[derive(Debug)]
pub enum RelayHandle {
    /// A child process.
    Process {
        /// The child.
        child: Child,
        /// Its listen address.
        addr: SocketAddr,
        /// Its log file.
        log: PathBuf,
    },
    /// In this process.
    InProc(Box<crate::server::Server>),
    /// External.
    External {
        /// Its address.
        addr: SocketAddr,
        /// The WebSocket path.
        path: String,
    },
}

impl RelayHandle {
    /// The WebSocket address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            RelayHandle::Process { addr, .. } | RelayHandle::External { addr, .. } => *addr,
            RelayHandle::InProc(server) => server.local_addr(),
        }
    }

    /// The WebSocket path.
    pub fn path(&self) -> &str {
        match self {
            RelayHandle::External { path, .. } => path,
            _ => "/realtime/v1/websocket",
        }
    }

    /// The pid whose `/proc` entry is the relay's (this process for in-proc;
    /// `None` for an external relay).
    pub fn pid(&self) -> Option<u32> {
        match self {
            RelayHandle::Process { child, .. } => Some(child.id()),
            RelayHandle::InProc(_) => Some(std::process::id()),
            RelayHandle::External { .. } => None,
        }
    }

    /// Whether a child relay has exited (with its status).
    pub fn exited(&mut self) -> Option<String> {
        match self {
            RelayHandle::Process { child, .. } => child.try_wait().ok().flatten().map(|s| s.to_string()),
            _ => None,
        }
    }

    /// Stops what this run started.
    ///
    /// # Errors
    /// When the in-process server stops with an error.
    pub async fn stop(self) -> Result<(), LoadError> {
        match self {
            RelayHandle::Process { mut child, .. } => {
                tokio::task::spawn_blocking(move || stop_child(&mut child))
                    .await
                    .map_err(|e| LoadError::Relay(format!("stopping the relay: {e}")))?;
                Ok(())
            }
            RelayHandle::InProc(server) => {
                server.shutdown().await.map_err(|e| LoadError::Relay(format!("in-process relay: {e}")))
            }
            RelayHandle::External { .. } => Ok(()),
        }
    }
}

fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling our own child by its pid.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(pid, "the relay did not stop after SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Settings of a child relay.
#[derive(Debug, Clone)]
pub struct ChildRelay<'a> {
    /// The executable.
    pub exe: &'a Path,
    /// The database URL it streams.
    pub database_url: &'a str,
    /// Its JWT secret.
    pub jwt_secret: &'a str,
    /// Its replication slot.
    pub slot: &'a str,
    /// `--max-connections`.
    pub max_connections: usize,
    /// Where its stdout/stderr go.
    pub log: &'a Path,
    /// More `walcast serve` flags (`--relay-arg`).
    pub extra_args: &'a [String],
}

/// Starts `walcast serve` as a child on a free loopback port and waits for
/// `/health` (retrying on another port when the port was taken meanwhile).
///
/// # Errors
/// When it cannot be spawned, exits, or does not answer in time.
pub async fn spawn_child(relay: &ChildRelay<'_>) -> Result<RelayHandle, LoadError> {
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port().map_err(|e| LoadError::Relay(format!("finding a free port: {e}")))?;
        if let Some(dir) = relay.log.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(relay.log)
            .map_err(|e| LoadError::Relay(format!("opening {}: {e}", relay.log.display())))?;
        let log_err = log.try_clone().map_err(|e| LoadError::Relay(format!("log file: {e}")))?;
        let mut command = Command::new(relay.exe);
        command
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--slot", relay.slot])
            .args(["--max-connections", &relay.max_connections.to_string()])
            .args(relay.extra_args)
            .env("DATABASE_URL", relay.database_url)
            .env("API_JWT_SECRET", relay.jwt_secret)
            .env_remove("API_JWT_JWKS")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // SAFETY: only async-signal-safe calls (getrlimit, setrlimit, prctl) between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur = limit.rlim_max;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child =
            command.spawn().map_err(|e| LoadError::Relay(format!("starting {} serve: {e}", relay.exe.display())))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                last = format!("the relay exited ({status}); its log: {}", tail(relay.log));
                break;
            }
            if health(addr).await {
                return Ok(RelayHandle::Process { child, addr, log: relay.log.to_owned() });
            }
            if Instant::now() > deadline {
                stop_child(&mut child);
                return Err(LoadError::Relay(format!(
                    "the relay did not answer /health within {HEALTH_TIMEOUT:?}; its log: {}",
                    tail(relay.log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !last.contains("already in use") && !last.contains("cannot listen") {
            break;
        }
    }
    Err(LoadError::Relay(last))
}

/// Whether `GET /health` answers 200.
pub async fn health(addr: SocketAddr) -> bool {
    tokio::task::spawn_blocking(move || {
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!("GET /health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = Vec::new();
        let _ = stream.take(4096).read_to_end(&mut response);
        response.starts_with(b"HTTP/1.1 200")
    })
    .await
    .unwrap_or(false)
}

/// `(addr, path)` of a `ws://host:port/path` URL on a loopback address.
///
/// # Errors
/// When the URL is not `ws://`, has no port, or is not loopback.
pub fn parse_relay_url(url: &str) -> Result<(SocketAddr, String), LoadError> {
    let bad = |why: &str| LoadError::Config(format!("--relay-url {url}: {why}"));
    let rest = url.strip_prefix("ws://").ok_or_else(|| bad("must start with ws://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/realtime/v1/websocket"),
    };
    let path = path.split('?').next().unwrap_or(path);
    let path = if path.is_empty() || path == "/" { "/realtime/v1/websocket" } else { path };
    let authority = authority.replace("localhost", "127.0.0.1");
    let addr: SocketAddr = authority.parse().map_err(|_| bad("needs a numeric loopback host and a port"))?;
    let loopback = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    };
    if !loopback {
        return Err(bad("load runs only against loopback addresses (127.0.0.0/8, ::1)"));
    }
    Ok((addr, path.to_owned()))
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// CPU and memory of a process from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime (clock ticks).
    pub ticks: u64,
    /// VmRSS (KiB).
    pub rss_kb: u64,
    /// VmHWM, peak RSS (KiB).
    pub hwm_kb: u64,
    /// Voluntary context switches of the threads alive now (summed over
    /// `/proc/<pid>/task/*/status`).
    pub voluntary_switches: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcSample { ticks, rss_kb: kb("VmRSS:"), hwm_kb: kb("VmHWM:"), voluntary_switches: voluntary_switches(pid) })
}

/// Voluntary context switches of every thread of `pid` alive now.
fn voluntary_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Clock ticks per second.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU % of one core between two samples `wall` apart.
pub fn cpu_pct(before: ProcSample, after: ProcSample, wall: Duration) -> f64 {
    let secs = after.ticks.saturating_sub(before.ticks) as f64 / ticks_per_second();
    100.0 * secs / wall.as_secs_f64().max(1e-9)
}

/// Busy and total clock ticks of the whole machine (`/proc/stat`, all CPUs).
pub fn system_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return (0, 0) };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (up to the
/// hard limit; as root, the hard limit too when allowed). Returns the soft
/// and hard limits in force afterwards.
pub fn raise_nofile(want: u64) -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return (0, 0);
        }
        if want > limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: want, rlim_max: want };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return (want, want);
            }
        }
        let soft = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return (limit.rlim_max, limit.rlim_max);
        }
        (limit.rlim_cur, limit.rlim_max)
    }
}

/// `Slab` and `SUnreclaim` of `/proc/meminfo` (KiB): kernel memory, which
/// grows with open sockets.
pub fn kernel_slab_kb() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (kb("Slab:"), kb("SUnreclaim:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_must_be_loopback() {
        let (addr, path) = parse_relay_url("ws://127.0.0.1:4000/realtime/v1/websocket?x=1").unwrap();
        assert_eq!((addr.port(), path.as_str()), (4000, "/realtime/v1/websocket"));
        assert_eq!(parse_relay_url("ws://localhost:9").unwrap().1, "/realtime/v1/websocket");
        assert!(parse_relay_url("ws://10.0.0.1:4000/").is_err());
        assert!(parse_relay_url("http://127.0.0.1:4000/").is_err());
        assert!(parse_relay_url("ws://127.0.0.1/").is_err());
    }

    #[test]
    fn proc_reads_this_process() {
        let s = proc_sample(std::process::id()).expect("/proc/self");
        assert!(s.rss_kb > 0 && s.hwm_kb >= s.rss_kb);
        assert!(cpu_pct(ProcSample::default(), ProcSample { ticks: 100, ..s }, Duration::from_secs(1)) > 0.0);
    }
}
