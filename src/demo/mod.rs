//! The one-command demo: `walcast` with no database URL.
//!
//! What it does, in order ([`start`]):
//! 1. starts an embedded PostgreSQL ([`crate::cluster`]) whose files live in
//!    [`DemoConfig::data_dir`] (the same layout `walcast migrate` uses without a
//!    URL: `data/`, `socket/`, `postgres.log`), reused on the next start;
//! 2. creates the database [`DEMO_DATABASE`] when missing and applies the
//!    embedded `sql/` migrations ([`crate::schema::migrate`]);
//! 3. loads a small data set ([`seed`]): three dealerships, four users with
//!    their profiles and memberships, ten orders;
//! 4. loads the JWT secret from `<data_dir>/jwt-secret`, generating it on the
//!    first start ([`load_or_create_secret`]), and signs demo tokens with it
//!    ([`demo_info`]): the anon key, one `authenticated` token per demo user and
//!    a `service_role` token, the JSON the dashboard reads from `/demo.json`.
//!
//! A [`Writer`] ([`run_writer`]) then keeps the orders moving — inserts, status
//! changes, cancellations, deletes — on a connection of its own, so the
//! replication stream, the policy stage and the dashboard always have
//! something to show.
//!
//! Where it sits: beside the pipeline, not in it. The demo only prepares a
//! database and writes to it as an application would; walcast then streams it
//! like any other database.
//!
//! Invariants:
//! - the seed is idempotent: every row has a fixed id and is inserted with
//!   `on conflict do nothing` in one transaction under an advisory lock, and
//!   the seed orders are only added while the demo dealerships have no orders
//!   at all, so a restart neither duplicates nor resurrects anything;
//! - ids are fixed ([`DemoDealership::id`], [`DemoUser::id`]), so tokens stay
//!   valid across restarts (they carry only the user id, email and role);
//! - the secret file is written once, atomically, with mode 0600, and reused;
//!   a file others can read is tightened to 0600 on start;
//! - no row values, tokens, secrets or connection strings are logged.

mod data;
mod secret;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::cluster::{Cluster, ClusterConfig, ClusterError};
use crate::schema::{self, Migrations, SchemaError};

pub use data::seed;
pub use secret::{load_or_create_secret, SECRET_FILE};
pub use writer::{run_writer, Writer, WriterStep, MAX_ORDERS, MIN_ORDERS};

/// The database the demo creates and uses in its embedded PostgreSQL.
pub const DEMO_DATABASE: &str = "walcast";

/// How often the demo writer changes something by default.
pub const DEFAULT_WRITER_INTERVAL: Duration = Duration::from_secs(2);

/// How long demo tokens stay valid (30 days).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// Errors of the demo. Definite ones say what to change; see
/// [`DemoError::is_transient`].
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded PostgreSQL could not be started (its message names the fix,
    /// e.g. installing the server binaries or setting `PG_BINDIR`).
    #[error("starting the embedded PostgreSQL in {dir}: {source}")]
    Cluster {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: ClusterError,
    },
    /// A blocking task (cluster start or stop) panicked or was cancelled.
    #[error("the embedded PostgreSQL task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Applying the schema failed.
    #[error("applying the schema to the demo database: {0}")]
    Schema(#[from] SchemaError),
    /// A database statement failed.
    #[error("could not {what}: {source}")]
    Database {
        /// What was being done.
        what: &'static str,
        /// The database error (its `Display` holds no row values; its source
        /// may).
        #[source]
        source: tokio_postgres::Error,
    },
    /// The JWT secret file could not be read or written.
    #[error("{what} the JWT secret file {path}: {source}")]
    SecretIo {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The JWT secret file holds something other than a generated secret.
    #[error(
        "the JWT secret file {0} does not hold a secret of at least 32 hex digits: \
         delete it to have a new one generated (tokens signed with the old secret stop working)"
    )]
    BadSecret(PathBuf),
    /// The writer found no demo dealerships.
    #[error(
        "the demo dealerships are missing from the database: the demo writer only writes to a \
         database loaded with the demo data (`walcast::demo::seed`)"
    )]
    NotSeeded,
}

impl DemoError {
    fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DemoError {
        move |source| DemoError::Database { what, source }
    }

    /// Whether retrying may succeed (the database connection was lost) rather
    /// than needing an operator's fix.
    pub fn is_transient(&self) -> bool {
        match self {
            DemoError::Database { source, .. } => source.is_closed(),
            DemoError::Schema(err) => err.is_transient(),
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, for logs (never the message, which
    /// may quote row values).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DemoError::Database { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Directory of the embedded cluster (created when missing, reused when it
    /// holds one) and of the `jwt-secret` file.
    pub data_dir: PathBuf,
    /// How often the writer changes something; `None`: no writer.
    pub writer_interval: Option<Duration>,
    /// Without installed PostgreSQL binaries, fetch a pinned PostgreSQL into
    /// `data_dir` (see [`crate::cluster::fetch`]); `false`: fail instead.
    pub fetch: bool,
}

impl DemoConfig {
    /// The demo in `data_dir`, with a writer every [`DEFAULT_WRITER_INTERVAL`].
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        DemoConfig { data_dir: data_dir.into(), writer_interval: Some(DEFAULT_WRITER_INTERVAL), fetch: true }
    }
}

/// A running demo: the cluster (stopped on drop or by [`Demo::stop`]) and what
/// the server needs to serve it.
pub struct Demo {
    /// The embedded PostgreSQL; owns the server process.
    pub cluster: Cluster,
    /// Superuser URL of [`DEMO_DATABASE`] (loopback only, trust auth).
    pub database_url: String,
    /// The JWT secret (64 hex digits). The HMAC key is this text's bytes, as
    /// Supabase uses its `JWT_SECRET` string, not the decoded bytes.
    pub jwt_secret: String,
    /// Tokens, users and dealerships, served as `/demo.json`.
    pub info: DemoInfo,
    /// The configured writer interval (`None`: no writer).
    pub writer_interval: Option<Duration>,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keep the secret and the tokens out of debug output.
        f.debug_struct("Demo").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl Demo {
    /// Spawns [`run_writer`] on the current runtime when a writer interval is
    /// configured; it stops when `shutdown` is cancelled.
    pub fn spawn_writer(&self, shutdown: tokio_util::sync::CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.writer_interval?;
        Some(tokio::spawn(run_writer(self.database_url.clone(), interval, shutdown)))
    }

    /// Stops the embedded PostgreSQL ("fast" shutdown) off the async runtime.
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub async fn stop(self) -> Result<(), DemoError> {
        let dir = self.cluster.root().to_owned();
        let mut cluster = self.cluster;
        tokio::task::spawn_blocking(move || cluster.stop()).await?.map_err(|source| DemoError::Cluster { dir, source })
    }
}

/// Starts the demo: embedded cluster, schema, seed, secret and tokens (see the
/// module docs). Safe to call on a directory a previous run used.
///
/// # Errors
/// When the cluster cannot start (e.g. no PostgreSQL binaries and the fetch is
/// off or failed: install them or set `PG_BINDIR`), the secret file is unreadable, or migrating or seeding
/// fails. The cluster is stopped again on error.
pub async fn start(config: &DemoConfig) -> Result<Demo, DemoError> {
    let dir = config.data_dir.clone();
    let cluster_config =
        if config.fetch { ClusterConfig::persistent(&dir) } else { ClusterConfig::persistent(&dir).no_fetch() };
    let (cluster, secret) = tokio::task::spawn_blocking(move || {
        // The cluster module already runs the server with wal_level=logical
        // and room for replication slots and senders.
        let cluster =
            Cluster::start(cluster_config).map_err(|source| DemoError::Cluster { dir: dir.clone(), source })?;
        // On error the cluster drops (and stops) here, on a blocking thread.
        let secret = load_or_create_secret(&dir)?;
        Ok::<_, DemoError>((cluster, secret))
    })
    .await??;
    tracing::info!(version = cluster.version(), port = cluster.port(), "embedded PostgreSQL started");
    match prepare(&cluster).await {
        Ok(database_url) => {
            let info = demo_info(secret.as_bytes(), unix_now());
            Ok(Demo { cluster, database_url, jwt_secret: secret, info, writer_interval: config.writer_interval })
        }
        Err(err) => {
            tokio::task::spawn_blocking(move || drop(cluster)).await?;
            Err(err)
        }
    }
}

/// Database, schema and seed on a started cluster; the demo database's URL.
async fn prepare(cluster: &Cluster) -> Result<String, DemoError> {
    let admin = connect(&cluster.url("postgres")).await?;
    schema::ensure_database(&admin, DEMO_DATABASE).await.map_err(DemoError::db("create the demo database"))?;
    drop(admin);
    let url = cluster.url(DEMO_DATABASE);
    let mut client = connect(&url).await?;
    let report = schema::migrate(&mut client, &Migrations::embedded()).await?;
    tracing::info!(applied = report.applied.len(), unchanged = report.unchanged.len(), "demo schema up to date");
    seed(&mut client).await?;
    Ok(url)
}

/// Connects to `url`, driving the connection on the current runtime.
pub(crate) async fn connect(url: &str) -> Result<Client, DemoError> {
    let config: tokio_postgres::Config = url.parse().map_err(DemoError::db("connect"))?;
    crate::pgconn::connect(&config.into()).await.map_err(DemoError::db("connect"))
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Everything the dashboard needs to act as the demo users (`/demo.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoInfo {
    /// The anon key (`role: anon`): the `apikey` of the WebSocket URL.
    pub anon_key: String,
    /// A `service_role` token (sees every row).
    pub service_role_key: String,
    /// The demo users with their `authenticated` tokens.
    pub users: Vec<DemoUser>,
    /// The demo dealerships.
    pub dealerships: Vec<DemoDealership>,
}

/// A demo user and a token to act as them.
#[derive(Debug, Clone, Serialize)]
pub struct DemoUser {
    /// Short name, e.g. `alice`.
    pub name: String,
    /// Email (also in the token).
    pub email: String,
    /// `auth.users.id` = `profiles.id` = the token's `sub`.
    pub id: Uuid,
    /// What the user may see, e.g. `admin of NORTH, user of SOUTH`.
    pub description: String,
    /// An `authenticated` JWT for this user.
    pub token: String,
    /// The dealerships the user is a member of.
    pub dealerships: Vec<Uuid>,
}

/// A demo dealership.
#[derive(Debug, Clone, Serialize)]
pub struct DemoDealership {
    /// `dealerships.id`.
    pub id: Uuid,
    /// `dealerships.code`, e.g. `NORTH` (starts its order numbers).
    pub code: String,
    /// Display name.
    pub name: String,
}

/// Signs the demo tokens with `secret`, issued at `now_unix` and valid for
/// [`TOKEN_LIFETIME`]; pure, so tests can check the claims.
///
/// Claims: anon `{iss, role: "anon", iat, exp}`; users `{iss, sub, email,
/// role: "authenticated", aud: "authenticated", iat, exp}`; service
/// `{iss, role: "service_role", iat, exp}`.
pub fn demo_info(secret: &[u8], now_unix: i64) -> DemoInfo {
    let exp = now_unix.saturating_add(i64::try_from(TOKEN_LIFETIME.as_secs()).unwrap_or(i64::MAX));
    let sign = |claims: serde_json::Value| crate::realtime::auth::sign_hs256(secret, &claims);
    let role_token =
        |role: &str| sign(serde_json::json!({"iss": "walcast", "role": role, "iat": now_unix, "exp": exp}));
    let code = |id: Uuid| data::DEALERSHIPS.iter().find(|d| d.id == id).map_or("?", |d| d.code);
    let users = data::USERS
        .iter()
        .map(|user| {
            let memberships: Vec<_> = data::MEMBERSHIPS.iter().filter(|m| m.user_id == user.id).collect();
            let description = if memberships.is_empty() {
                "no memberships".to_owned()
            } else {
                memberships
                    .iter()
                    .map(|m| format!("{} of {}", m.role, code(m.dealership_id)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            DemoUser {
                name: user.name.to_owned(),
                email: user.email.to_owned(),
                id: user.id,
                description,
                token: sign(serde_json::json!({
                    "iss": "walcast",
                    "sub": user.id,
                    "email": user.email,
                    "role": "authenticated",
                    "aud": "authenticated",
                    "iat": now_unix,
                    "exp": exp,
                })),
                dealerships: memberships.iter().map(|m| m.dealership_id).collect(),
            }
        })
        .collect();
    DemoInfo {
        anon_key: role_token("anon"),
        service_role_key: role_token("service_role"),
        users,
        dealerships: data::DEALERSHIPS
            .iter()
            .map(|d| DemoDealership { id: d.id, code: d.code.to_owned(), name: d.name.to_owned() })
            .collect(),
    }
}
