//! Scratch databases for tests and benchmarks: one server per process, a fresh
//! database per test.
//!
//! The server is either a temporary [`Cluster`] started on first use (stopped
//! and removed when the process exits), or an existing server named by
//! `TEST_DATABASE_URL` (a superuser URL; its `wal_level` must be `logical` for
//! replication tests). Each [`ScratchDatabase`] is a new database with a unique
//! name, dropped when the value is dropped; [`ScratchServer::migrated_database`]
//! clones a template that has the walcast schema applied once per process, which
//! is far cheaper than migrating every test's database.
//!
//! A test process that is killed cannot stop its cluster; the next process
//! that starts a scratch server stops and removes clusters whose owner process
//! is gone.

use std::sync::{Mutex, OnceLock};

use tokio_postgres::{Client, NoTls};

use super::{Cluster, ClusterConfig, ClusterError};
use crate::schema::{self, Migrations};

/// Errors of the scratch-database helper.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// The local cluster could not be started.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A database operation failed.
    #[error("scratch database: {what}: {source}")]
    Database {
        /// What was being done.
        what: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Applying the schema to the template failed.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    /// An earlier attempt to start the server failed.
    #[error("the scratch server could not be started earlier in this process: {0}")]
    Failed(String),
}

enum Backend {
    /// A cluster this process owns; `None` once stopped at exit.
    Local(Mutex<Option<Cluster>>),
    /// An existing server.
    External,
}

/// The process-wide server scratch databases live on.
pub struct ScratchServer {
    backend: Backend,
    /// `postgres://user[:password]@host:port` without a database.
    base_url: String,
    /// Connection parameters after the database name (`?…`), if any.
    params: String,
    version: String,
}

impl std::fmt::Debug for ScratchServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: keep it out of debug output.
        f.debug_struct("ScratchServer").field("version", &self.version).finish_non_exhaustive()
    }
}

static SERVER: OnceLock<Result<ScratchServer, String>> = OnceLock::new();
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

/// The process-wide scratch server, started on first use.
///
/// # Errors
/// When the cluster cannot be started (every later call reports the same).
pub fn scratch_server() -> Result<&'static ScratchServer, ScratchError> {
    SERVER
        .get_or_init(|| ScratchServer::start().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| ScratchError::Failed(e.clone()))
}

extern "C" fn stop_local_cluster_at_exit() {
    if let Some(Ok(server)) = SERVER.get() {
        if let Backend::Local(cluster) = &server.backend {
            let taken = match cluster.lock() {
                Ok(mut guard) => guard.take(),
                Err(poisoned) => poisoned.into_inner().take(),
            };
            drop(taken);
        }
    }
}

impl ScratchServer {
    fn start() -> Result<ScratchServer, ScratchError> {
        if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
            let (base_url, params) = split_url(&url);
            return Ok(ScratchServer { backend: Backend::External, base_url, params, version: String::new() });
        }
        reap_orphans();
        let cluster = Cluster::start(ClusterConfig::ephemeral().setting("wal_sender_timeout", "10s"))?;
        std::fs::write(cluster.root().join("owner.pid"), std::process::id().to_string()).ok();
        let base_url = format!("postgres://postgres@127.0.0.1:{}", cluster.port());
        let version = cluster.version().to_owned();
        // SAFETY: registering a plain `extern "C" fn` with atexit has no preconditions.
        unsafe {
            libc::atexit(stop_local_cluster_at_exit);
        }
        Ok(ScratchServer {
            backend: Backend::Local(Mutex::new(Some(cluster))),
            base_url,
            params: String::new(),
            version,
        })
    }

    /// A URL for `database` on this server, as a superuser.
    pub fn url(&self, database: &str) -> String {
        format!("{}/{database}{}", self.base_url, self.params)
    }

    /// The server's major version for a local cluster (empty for an external one).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs `f` with the local cluster (e.g. to restart it); `None` for an
    /// external server.
    pub fn with_cluster<T>(&self, f: impl FnOnce(&mut Cluster) -> T) -> Option<T> {
        match &self.backend {
            Backend::Local(cluster) => {
                let mut guard = cluster.lock().unwrap_or_else(|p| p.into_inner());
                guard.as_mut().map(f)
            }
            Backend::External => None,
        }
    }

    /// A new, empty database.
    ///
    /// # Errors
    /// When the server refuses the connection or the `CREATE DATABASE`.
    pub async fn database(&'static self) -> Result<ScratchDatabase, ScratchError> {
        self.create(None).await
    }

    /// A new database with the walcast schema (`sql/`) already applied.
    ///
    /// # Errors
    /// When the template cannot be built or cloned.
    pub async fn migrated_database(&'static self) -> Result<ScratchDatabase, ScratchError> {
        let template = TEMPLATE
            .get_or_try_init(|| async {
                let name = format!("walcast_template_{}", std::process::id());
                let admin = self.connect("postgres").await?;
                for sql in [format!("drop database if exists {name}"), format!("create database {name}")] {
                    admin
                        .batch_execute(&sql)
                        .await
                        .map_err(|source| ScratchError::Database { what: "create the template database", source })?;
                }
                let mut client = self.connect(&name).await?;
                schema::migrate(&mut client, &Migrations::embedded()).await?;
                drop(client);
                Ok::<_, ScratchError>(name)
            })
            .await?;
        self.create(Some(template)).await
    }

    async fn create(&'static self, template: Option<&str>) -> Result<ScratchDatabase, ScratchError> {
        let name = unique_name();
        let admin = self.connect("postgres").await?;
        let sql = match template {
            Some(t) => format!("create database {name} template {t}"),
            None => format!("create database {name}"),
        };
        // Cloning a template fails while anyone else is connected to it; the
        // template's own connections close asynchronously, so retry briefly.
        let mut attempt = 0;
        loop {
            match admin.batch_execute(&sql).await {
                Ok(()) => break,
                Err(err) if attempt < 50 && err.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(source) => return Err(ScratchError::Database { what: "create a scratch database", source }),
            }
        }
        Ok(ScratchDatabase { server: self, url: self.url(&name), name })
    }

    /// Connects to `database` as a superuser, driving the connection on the
    /// current runtime.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn connect(&self, database: &str) -> Result<Client, ScratchError> {
        connect(&self.url(database)).await
    }
}

/// Connects to `url`, driving the connection on the current runtime.
async fn connect(url: &str) -> Result<Client, ScratchError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| ScratchError::Database { what: "connect", source })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A database of its own for one test; dropped with this value.
pub struct ScratchDatabase {
    server: &'static ScratchServer,
    name: String,
    url: String,
}

impl std::fmt::Debug for ScratchDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchDatabase").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ScratchDatabase {
    /// The database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A superuser URL for this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server this database lives on.
    pub fn server(&self) -> &'static ScratchServer {
        self.server
    }

    /// A new superuser connection to this database.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn connect(&self) -> Result<Client, ScratchError> {
        connect(&self.url).await
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        // Drop runs in sync context, possibly inside a runtime that is shutting
        // down: do the async cleanup on a thread of its own, and wait for it so
        // databases do not pile up while the suite runs.
        let admin_url = self.server.url("postgres");
        let name = std::mem::take(&mut self.name);
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let Ok(admin) = connect(&admin_url).await else {
                    return;
                };
                // Slots pin a database; drop the inactive ones first.
                let _ = admin
                    .execute(
                        "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                         where database = $1 and not active",
                        &[&name],
                    )
                    .await;
                let _ = admin.batch_execute(&format!("drop database if exists {name} with (force)")).await;
            });
        });
        let _ = cleanup.join();
    }
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("walcast_test_{}_{n}_{nanos:x}", std::process::id())
}

/// Splits `postgres://user@host:port/db?params` into base (without the
/// database) and `?params`.
fn split_url(url: &str) -> (String, String) {
    let (main, params) = match url.find('?') {
        Some(i) => (&url[..i], url[i..].to_owned()),
        None => (url, String::new()),
    };
    let scheme_end = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[scheme_end..].find('/') {
        Some(i) => &main[..scheme_end + i],
        None => main,
    };
    (base.to_owned(), params)
}

/// Stops and removes temporary clusters left behind by killed processes.
fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("walcast-pg-"));
        if !is_ours {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(path.join("owner.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        super::stop_orphan(&path);
        let _ = std::fs::remove_dir_all(&path);
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("postgres://u:p@h:5432/db?sslmode=disable"),
            ("postgres://u:p@h:5432".to_owned(), "?sslmode=disable".to_owned())
        );
        assert_eq!(split_url("postgres://u@h"), ("postgres://u@h".to_owned(), String::new()));
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name(), unique_name());
    }
}
