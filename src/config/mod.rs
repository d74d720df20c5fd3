//! Configuration of `walcast serve` and `walcast check`: flags, environment
//! variables and an optional TOML file, merged with one precedence and
//! validated before anything starts.
//!
//! **Precedence: flag > environment variable > TOML file > default.** Flags
//! and variables are read by the binary (clap); what they leave unset is
//! taken from the file ([`FileConfig`], `--config` / `WALCAST_CONFIG`), then
//! from the defaults here. The database is `DATABASE_URL`, or — the names
//! Supabase Realtime uses — `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD`,
//! `DB_NAME`, `DB_SSL`; when both are given the URL wins.
//!
//! Invariants: secrets (passwords, JWT secrets, the URL) are never part of an
//! error message, a log line or `Debug` output; a configuration that passes
//! [`Settings::resolve`] starts (or fails only on the database itself).

pub mod check;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::pgconn::PgConfig;
use crate::realtime::auth::AuthConfig;
use crate::relay::RelayConfig;
use crate::replication::{SlotOptions, SourceConfig};
use crate::server::ServeConfig;

/// Default port (Supabase Realtime's).
pub const DEFAULT_PORT: u16 = 4000;
/// Default slot.
pub const DEFAULT_SLOT: &str = "walcast";
/// Default publication.
pub const DEFAULT_PUBLICATION: &str = "supabase_realtime";
/// Default data directory of the embedded PostgreSQL.
pub const DEFAULT_DATA_DIR: &str = ".walcast/postgres";
/// Where spilled transactions go unless configured: a directory per slot
/// under this one.
pub const DEFAULT_SPILL_DIR: &str = ".walcast/spill";

/// Values from flags or the environment (`None` = not given). The binary
/// fills this from clap; [`Settings::resolve`] completes it.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// PostgreSQL URL or key=value connection string.
    pub database_url: Option<String>,
    /// Host (Supabase Realtime's `DB_HOST`).
    pub db_host: Option<String>,
    /// Port (`DB_PORT`).
    pub db_port: Option<u16>,
    /// User (`DB_USER`).
    pub db_user: Option<String>,
    /// Password (`DB_PASSWORD`).
    pub db_password: Option<String>,
    /// Database (`DB_NAME`).
    pub db_name: Option<String>,
    /// TLS (`DB_SSL`): `true`/`false`, or an sslmode (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`).
    /// `verify-ca`/`verify-full` need `sslrootcert`, which only `DATABASE_URL` can give (see [`crate::pgconn`]).
    pub db_ssl: Option<String>,
    /// Replication slot.
    pub slot_name: Option<String>,
    /// Publication.
    pub publication: Option<String>,
    /// Listen address.
    pub host: Option<IpAddr>,
    /// Listen port.
    pub port: Option<u16>,
    /// HS256 secret.
    pub jwt_secret: Option<String>,
    /// JWKS (path or JSON).
    pub jwt_jwks: Option<String>,
    /// Required `aud` of tokens (off by default, as on Supabase).
    pub jwt_audience: Option<String>,
    /// The removed policy rules file (`--policy`, `WALCAST_POLICY`): refused
    /// at start, pointing to docs/policies.md.
    pub policy_file: Option<PathBuf>,
    /// The removed `[policy]` table of the TOML file: refused likewise.
    pub policy: Option<toml::Value>,
    /// Most open sockets.
    pub max_connections: Option<usize>,
    /// Most channels per socket.
    pub max_channels_per_client: Option<usize>,
    /// Most filters without an `eq`/`in` condition per socket.
    pub max_unindexed_filters_per_client: Option<usize>,
    /// Largest join message, bytes.
    pub max_join_bytes: Option<usize>,
    /// Most bytes of join messages per socket.
    pub max_socket_join_bytes: Option<usize>,
    /// Largest broadcast payload, bytes.
    pub max_broadcast_bytes: Option<usize>,
    /// Broadcasts per second one channel may send.
    pub channel_broadcasts_per_second: Option<u32>,
    /// Broadcasts per second one socket may send over all its channels.
    pub socket_broadcasts_per_second: Option<u32>,
    /// WebSocket read buffer per socket, bytes.
    pub ws_read_buffer_bytes: Option<usize>,
    /// WebSocket write buffer (flush threshold) per socket, bytes.
    pub ws_write_buffer_bytes: Option<usize>,
    /// Data directory of the embedded PostgreSQL (demo mode).
    pub data_dir: Option<PathBuf>,
    /// Directory for spilled transactions.
    pub spill_dir: Option<PathBuf>,
    /// Most bytes all outboxes together hold.
    pub outbox_budget_bytes: Option<usize>,
    /// A reader whose oldest unwritten message is older is closed (seconds).
    pub max_reader_lag_secs: Option<f64>,
    /// Most bytes of spilled transactions on disk.
    pub spill_budget_bytes: Option<u64>,
    /// Most bytes of the policies' membership caches, all together.
    pub policy_cache_budget_bytes: Option<usize>,
    /// Seconds between demo writer steps (0 = off).
    pub demo_writer_secs: Option<f64>,
    /// Slot watchdog: warn when retained WAL passes this many bytes (0 = off).
    pub slot_wal_warn_bytes: Option<u64>,
    /// Slot watchdog: warn past this fraction of `max_slot_wal_keep_size` (0 = off).
    pub slot_wal_warn_fraction: Option<f64>,
    /// `/ready` is false beyond this replication lag in seconds (0 = no limit).
    pub ready_max_lag_secs: Option<f64>,
    /// Stream large in-progress transactions (pgoutput protocol 2, PostgreSQL 14+).
    pub streaming: Option<bool>,
    /// Make the replication slot a failover slot (PostgreSQL 17+).
    pub slot_failover: Option<bool>,
    /// A replication link silent this long (seconds) is dropped and made again (0 = never).
    pub replication_timeout_secs: Option<f64>,
    /// Seconds between end-to-end heartbeats through the slot (0 = off).
    pub heartbeat_interval_secs: Option<f64>,
    /// Seconds between polls of roles (and, without the event trigger, policies).
    pub policy_poll_interval_secs: Option<f64>,
    /// Most open sockets per user (`sub` of the upgrade's token).
    pub max_sockets_per_user: Option<usize>,
    /// Most open sockets per client address.
    pub max_sockets_per_address: Option<usize>,
    /// Comma-separated CIDRs of reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Option<String>,
    /// NATS server of a cluster (`nats://host:4222`): cluster mode.
    pub nats_url: Option<String>,
    /// Cluster mode: `source`, `edge` or `all`.
    pub node_role: Option<crate::scaleout::NodeRole>,
    /// Cluster mode: seconds an edge serves without its stream.
    pub edge_max_stale_secs: Option<f64>,
    /// Cluster mode: replicas of the change stream.
    pub stream_replicas: Option<usize>,
    /// Cluster mode: most bytes the change stream keeps.
    pub stream_max_bytes: Option<i64>,
    /// Cluster mode: seconds the change stream keeps a message.
    pub stream_max_age_secs: Option<f64>,
    /// Cluster mode: the source lease's time to live, seconds.
    pub lease_ttl_secs: Option<f64>,
    /// Cluster mode: least seconds between two policy snapshots.
    pub snapshot_interval_secs: Option<f64>,
}

impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| "[redacted]");
        f.debug_struct("FileConfig")
            .field("database_url", &secret(&self.database_url))
            .field("db_host", &self.db_host)
            .field("db_port", &self.db_port)
            .field("db_user", &self.db_user)
            .field("db_password", &secret(&self.db_password))
            .field("db_name", &self.db_name)
            .field("db_ssl", &self.db_ssl)
            .field("slot_name", &self.slot_name)
            .field("publication", &self.publication)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("jwt_secret", &secret(&self.jwt_secret))
            .field("jwt_jwks", &self.jwt_jwks.as_ref().map(|_| "[given]"))
            .field("policy_file", &self.policy_file)
            .field("max_connections", &self.max_connections)
            .field("max_channels_per_client", &self.max_channels_per_client)
            .field("max_unindexed_filters_per_client", &self.max_unindexed_filters_per_client)
            .field("max_join_bytes", &self.max_join_bytes)
            .field("max_socket_join_bytes", &self.max_socket_join_bytes)
            .field("max_broadcast_bytes", &self.max_broadcast_bytes)
            .field("channel_broadcasts_per_second", &self.channel_broadcasts_per_second)
            .field("socket_broadcasts_per_second", &self.socket_broadcasts_per_second)
            .field("ws_read_buffer_bytes", &self.ws_read_buffer_bytes)
            .field("ws_write_buffer_bytes", &self.ws_write_buffer_bytes)
            .field("outbox_budget_bytes", &self.outbox_budget_bytes)
            .field("max_reader_lag_secs", &self.max_reader_lag_secs)
            .field("spill_budget_bytes", &self.spill_budget_bytes)
            .field("policy_cache_budget_bytes", &self.policy_cache_budget_bytes)
            .field("spill_dir", &self.spill_dir)
            .field("streaming", &self.streaming)
            .field("slot_failover", &self.slot_failover)
            .field("replication_timeout_secs", &self.replication_timeout_secs)
            .field("heartbeat_interval_secs", &self.heartbeat_interval_secs)
            .field("policy_poll_interval_secs", &self.policy_poll_interval_secs)
            .field("max_sockets_per_user", &self.max_sockets_per_user)
            .field("max_sockets_per_address", &self.max_sockets_per_address)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("nats_url", &self.nats_url.as_deref().map(crate::scaleout::redact))
            .finish_non_exhaustive()
    }
}

impl FileConfig {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::ReadFile`] or [`ConfigError::ParseFile`] (with the
    /// line and key, never the values).
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|err| ConfigError::ParseFile { path: path.to_owned(), detail: toml_detail(&err) })
    }

    /// Fills every unset field of `self` from `lower` (for precedence).
    pub fn or(self, lower: FileConfig) -> FileConfig {
        FileConfig {
            database_url: self.database_url.or(lower.database_url),
            db_host: self.db_host.or(lower.db_host),
            db_port: self.db_port.or(lower.db_port),
            db_user: self.db_user.or(lower.db_user),
            db_password: self.db_password.or(lower.db_password),
            db_name: self.db_name.or(lower.db_name),
            db_ssl: self.db_ssl.or(lower.db_ssl),
            slot_name: self.slot_name.or(lower.slot_name),
            publication: self.publication.or(lower.publication),
            host: self.host.or(lower.host),
            port: self.port.or(lower.port),
            jwt_secret: self.jwt_secret.or(lower.jwt_secret),
            jwt_jwks: self.jwt_jwks.or(lower.jwt_jwks),
            jwt_audience: self.jwt_audience.or(lower.jwt_audience),
            policy_file: self.policy_file.or(lower.policy_file),
            policy: self.policy.or(lower.policy),
            max_connections: self.max_connections.or(lower.max_connections),
            max_channels_per_client: self.max_channels_per_client.or(lower.max_channels_per_client),
            max_unindexed_filters_per_client: self
                .max_unindexed_filters_per_client
                .or(lower.max_unindexed_filters_per_client),
            max_join_bytes: self.max_join_bytes.or(lower.max_join_bytes),
            max_socket_join_bytes: self.max_socket_join_bytes.or(lower.max_socket_join_bytes),
            max_broadcast_bytes: self.max_broadcast_bytes.or(lower.max_broadcast_bytes),
            channel_broadcasts_per_second: self.channel_broadcasts_per_second.or(lower.channel_broadcasts_per_second),
            socket_broadcasts_per_second: self.socket_broadcasts_per_second.or(lower.socket_broadcasts_per_second),
            ws_read_buffer_bytes: self.ws_read_buffer_bytes.or(lower.ws_read_buffer_bytes),
            ws_write_buffer_bytes: self.ws_write_buffer_bytes.or(lower.ws_write_buffer_bytes),
            data_dir: self.data_dir.or(lower.data_dir),
            outbox_budget_bytes: self.outbox_budget_bytes.or(lower.outbox_budget_bytes),
            max_reader_lag_secs: self.max_reader_lag_secs.or(lower.max_reader_lag_secs),
            spill_budget_bytes: self.spill_budget_bytes.or(lower.spill_budget_bytes),
            policy_cache_budget_bytes: self.policy_cache_budget_bytes.or(lower.policy_cache_budget_bytes),
            spill_dir: self.spill_dir.or(lower.spill_dir),
            demo_writer_secs: self.demo_writer_secs.or(lower.demo_writer_secs),
            slot_wal_warn_bytes: self.slot_wal_warn_bytes.or(lower.slot_wal_warn_bytes),
            slot_wal_warn_fraction: self.slot_wal_warn_fraction.or(lower.slot_wal_warn_fraction),
            ready_max_lag_secs: self.ready_max_lag_secs.or(lower.ready_max_lag_secs),
            streaming: self.streaming.or(lower.streaming),
            slot_failover: self.slot_failover.or(lower.slot_failover),
            replication_timeout_secs: self.replication_timeout_secs.or(lower.replication_timeout_secs),
            heartbeat_interval_secs: self.heartbeat_interval_secs.or(lower.heartbeat_interval_secs),
            policy_poll_interval_secs: self.policy_poll_interval_secs.or(lower.policy_poll_interval_secs),
            max_sockets_per_user: self.max_sockets_per_user.or(lower.max_sockets_per_user),
            max_sockets_per_address: self.max_sockets_per_address.or(lower.max_sockets_per_address),
            trusted_proxies: self.trusted_proxies.or(lower.trusted_proxies),
            nats_url: self.nats_url.or(lower.nats_url),
            node_role: self.node_role.or(lower.node_role),
            edge_max_stale_secs: self.edge_max_stale_secs.or(lower.edge_max_stale_secs),
            stream_replicas: self.stream_replicas.or(lower.stream_replicas),
            stream_max_bytes: self.stream_max_bytes.or(lower.stream_max_bytes),
            stream_max_age_secs: self.stream_max_age_secs.or(lower.stream_max_age_secs),
            lease_ttl_secs: self.lease_ttl_secs.or(lower.lease_ttl_secs),
            snapshot_interval_secs: self.snapshot_interval_secs.or(lower.snapshot_interval_secs),
        }
    }
}

/// The message of a TOML error without quoting the file's values.
fn toml_detail(err: &toml::de::Error) -> String {
    // The message names the key and what was expected; the span gives the place.
    let message = err.message().lines().next().unwrap_or("invalid TOML").to_owned();
    match err.span() {
        Some(span) => format!("{message} (at byte {})", span.start),
        None => message,
    }
}

/// A configuration problem (always definite: the operator must change it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key.
    #[error("configuration file {path}: {detail}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What is wrong (no values quoted).
        detail: String,
    },
    /// The database URL does not parse, or its TLS settings are unusable
    /// (the cause never quotes the URL).
    #[error("DATABASE_URL (--database-url): {0}")]
    DatabaseUrl(#[source] crate::pgconn::ConfigError),
    /// `DB_SSL` has an unknown value.
    #[error("DB_SSL must be true, false or an sslmode (disable, prefer, require, verify-ca, verify-full)")]
    DbSsl,
    /// No way to verify tokens.
    #[error(
        "no JWT key configured: pass --jwt-secret (API_JWT_SECRET, the project's JWT secret) and/or --jwks \
         (API_JWT_JWKS, a JWKS file or JSON)"
    )]
    NoJwtKey,
    /// A number out of range.
    #[error("{name} must be between {min} and {max}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// An empty name.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// A trusted proxy that is not an address block.
    #[error("TRUSTED_PROXIES (--trusted-proxies): {0}")]
    TrustedProxies(#[source] crate::http::CidrError),
    /// `walcast serve` (or `check`) without a database.
    #[error(
        "no database configured: set DATABASE_URL (--database-url), or DB_HOST with DB_PORT, DB_USER, \
         DB_PASSWORD, DB_NAME (--db-host …), or database_url / db_host in a --config file; \
         `walcast` without a subcommand and without a database runs the demo"
    )]
    NoDatabase,
    /// A JWT key given to the demo, which signs its own tokens.
    #[error(
        "--jwt-secret / --jwks (API_JWT_SECRET, API_JWT_JWKS) need a database: the demo (no DATABASE_URL, DB_HOST \
         or --config database) signs its tokens with its own secret; configure a database, or drop the key"
    )]
    DemoJwtKey,
    /// `--policy`, `WALCAST_POLICY` or a `[policy]` table: the rule files
    /// are gone, walcast reads the database's own policies (definite).
    #[error(
        "{0}: walcast no longer takes policy rules; it reads the database's own row level security policies and          column privileges (see docs/policies.md). Remove the setting."
    )]
    PolicyRemoved(&'static str),
}

/// Where the database is.
#[derive(Clone)]
pub enum Database {
    /// A configured server.
    Url(Box<PgConfig>),
    /// None configured (no `DATABASE_URL`, `DB_HOST` or database in the
    /// file): only bare `walcast` turns this into the embedded demo
    /// ([`Settings::demo`]); everything else refuses it
    /// ([`Settings::require_database`]).
    Embedded,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Url(config) => {
                let (pg, tls) = (config.postgres(), config.tls());
                write!(f, "Url(hosts: {:?}, dbname: {:?}, sslmode: {})", pg.get_hosts(), pg.get_dbname(), tls.mode)
            }
            Database::Embedded => f.write_str("Embedded"),
        }
    }
}

/// The resolved, validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The database.
    pub database: Database,
    /// Slot.
    pub slot: String,
    /// Publication.
    pub publication: String,
    /// Listen address: as given, else `0.0.0.0` with a database and
    /// `127.0.0.1` without (the demo).
    pub host: IpAddr,
    /// Listen port.
    pub port: u16,
    /// JWT keys.
    pub auth: AuthConfig,
    /// Most sockets.
    pub max_connections: usize,
    /// Most channels per socket.
    pub max_channels: usize,
    /// Most unindexed filters per socket.
    pub max_unindexed_filters: usize,
    /// Largest join message (bytes).
    pub max_join_bytes: usize,
    /// Most bytes of join messages per socket.
    pub max_socket_join_bytes: usize,
    /// Largest broadcast payload (bytes).
    pub max_broadcast_bytes: usize,
    /// Broadcasts per second per channel.
    pub channel_broadcasts_per_second: u32,
    /// Broadcasts per second per socket.
    pub socket_broadcasts_per_second: u32,
    /// Most sockets per user (`sub`).
    pub max_sockets_per_user: usize,
    /// Most sockets per client address.
    pub max_sockets_per_address: usize,
    /// Reverse proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<crate::http::Cidr>,
    /// Cluster mode: the NATS server the nodes share.
    pub nats_url: Option<crate::scaleout::NatsUrl>,
    /// Cluster mode: the node's settings (role, stream, lease, staleness)
    /// around `nats_url`.
    pub cluster: Option<crate::scaleout::ClusterSettings>,
    /// WebSocket read buffer per socket (bytes).
    pub ws_read_buffer: usize,
    /// WebSocket write buffer per socket (bytes).
    pub ws_write_buffer: usize,
    /// Embedded PostgreSQL directory.
    pub data_dir: PathBuf,
    /// Spill directory (leftover spill files are removed at start).
    pub spill_dir: PathBuf,
    /// Global outbox budget, bytes.
    pub outbox_budget: usize,
    /// Reader lag limit.
    pub max_reader_lag: Duration,
    /// Spill disk budget, bytes.
    pub spill_budget: u64,
    /// Membership caches' memory budget, bytes.
    pub policy_cache_budget: usize,
    /// Demo writer interval (`None` = off).
    pub demo_writer: Option<Duration>,
    /// `/ready` and slot watchdog thresholds.
    pub monitoring: crate::monitor::MonitorConfig,
    /// Stream large in-progress transactions (pgoutput protocol 2 with
    /// `streaming 'on'`; PostgreSQL 14+). Off: protocol 1, PostgreSQL sends
    /// each transaction after its commit.
    pub streaming: bool,
    /// Create the replication slot as a failover slot, or make an existing
    /// one a failover slot (PostgreSQL 17+; refused before). A physical
    /// standby with `sync_replication_slots = on` keeps a copy of it, and
    /// walcast pointed at the promoted standby resumes from that copy.
    pub slot_failover: bool,
    /// A replication link that receives nothing for this long is dropped and
    /// made again (`None`: never); also the TCP keepalive and
    /// `TCP_USER_TIMEOUT` budget of every connection.
    pub replication_timeout: Option<Duration>,
    /// Time between end-to-end heartbeats (`None`: off).
    pub heartbeat_interval: Option<Duration>,
    /// Time between polls of roles (and, without the event trigger, of
    /// policies, privileges and functions).
    pub policy_poll_interval: Duration,
}

fn range(name: &'static str, value: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::OutOfRange { name, min: min as u64, max: max as u64 })
    }
}

/// A key=value conninfo value, quoted as libpq wants.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl Settings {
    /// Merges `given` (flags and environment, already merged by the binary)
    /// over the TOML file (if any) and the defaults, and validates.
    ///
    /// # Errors
    /// The first problem found.
    pub fn resolve(given: FileConfig, file: Option<&Path>) -> Result<Settings, ConfigError> {
        let merged = match file {
            Some(path) => given.or(FileConfig::load(path)?),
            None => given,
        };
        let database = Settings::database(&merged)?;
        let cluster_given = ClusterGiven {
            node_role: merged.node_role,
            edge_max_stale_secs: merged.edge_max_stale_secs,
            stream_replicas: merged.stream_replicas,
            stream_max_bytes: merged.stream_max_bytes,
            stream_max_age_secs: merged.stream_max_age_secs,
            lease_ttl_secs: merged.lease_ttl_secs,
            snapshot_interval_secs: merged.snapshot_interval_secs,
        };
        let slot = merged.slot_name.unwrap_or_else(|| DEFAULT_SLOT.to_owned());
        let spill_default = PathBuf::from(DEFAULT_SPILL_DIR).join(&slot);
        let publication = merged.publication.unwrap_or_else(|| DEFAULT_PUBLICATION.to_owned());
        if slot.trim().is_empty() {
            return Err(ConfigError::Empty("SLOT_NAME (--slot)"));
        }
        if publication.trim().is_empty() {
            return Err(ConfigError::Empty("PUBLICATION (--publication)"));
        }
        let auth = AuthConfig {
            jwt_secret: merged.jwt_secret.filter(|s| !s.is_empty()),
            jwks: merged.jwt_jwks.filter(|s| !s.is_empty()),
            audience: merged.jwt_audience.filter(|s| !s.is_empty()),
        };
        if matches!(database, Database::Url(_)) && auth.jwt_secret.is_none() && auth.jwks.is_none() {
            return Err(ConfigError::NoJwtKey);
        }
        if merged.policy_file.is_some() {
            return Err(ConfigError::PolicyRemoved("--policy (WALCAST_POLICY)"));
        }
        if merged.policy.is_some() {
            return Err(ConfigError::PolicyRemoved("the [policy] table of the configuration file"));
        }
        // Defaults come from the layers that use them (Limits, HubConfig),
        // so the binary, the tests and the benches cannot drift apart.
        let limits = crate::realtime::Limits::default();
        let hub = crate::hub::HubConfig::default();
        let max_connections = range(
            "MAX_CONNECTIONS (--max-connections)",
            merged.max_connections.unwrap_or(limits.max_connections),
            1,
            10_000_000,
        )?;
        let max_channels = range(
            "MAX_CHANNELS_PER_CLIENT (--max-channels)",
            merged.max_channels_per_client.unwrap_or(limits.max_channels),
            1,
            10_000,
        )?;
        let max_unindexed_filters = range(
            "MAX_UNINDEXED_FILTERS_PER_CLIENT (--max-unindexed-filters)",
            merged.max_unindexed_filters_per_client.unwrap_or(limits.max_unindexed_filters),
            0,
            10_000,
        )?;
        let max_join_bytes = range(
            "MAX_JOIN_BYTES (--max-join-bytes)",
            merged.max_join_bytes.unwrap_or(limits.max_join_bytes),
            1 << 10,
            16 << 20,
        )?;
        let max_socket_join_bytes = range(
            "MAX_SOCKET_JOIN_BYTES (--max-socket-join-bytes)",
            merged.max_socket_join_bytes.unwrap_or(limits.max_socket_join_bytes),
            max_join_bytes,
            1 << 30,
        )?;
        let max_sockets_per_user = range(
            "MAX_SOCKETS_PER_USER (--max-sockets-per-user)",
            merged.max_sockets_per_user.unwrap_or(limits.max_sockets_per_user),
            1,
            10_000_000,
        )?;
        let max_sockets_per_address = range(
            "MAX_SOCKETS_PER_ADDRESS (--max-sockets-per-address)",
            merged.max_sockets_per_address.unwrap_or(limits.max_sockets_per_address),
            1,
            10_000_000,
        )?;
        let trusted_proxies = match &merged.trusted_proxies {
            Some(list) => crate::http::Cidr::parse_list(list).map_err(ConfigError::TrustedProxies)?,
            None => limits.trusted_proxies.clone(),
        };
        // A payload past the limit must reach the session (to be refused with
        // `payload_size_exceeded`), not close the socket as too large.
        let max_broadcast_bytes = range(
            "MAX_BROADCAST_BYTES (--max-broadcast-bytes)",
            merged.max_broadcast_bytes.unwrap_or(limits.max_broadcast_bytes),
            1 << 10,
            limits.max_message_bytes - (64 << 10),
        )?;
        let channel_broadcasts_per_second = range(
            "CHANNEL_BROADCASTS_PER_SECOND (--channel-broadcasts-per-second)",
            merged.channel_broadcasts_per_second.unwrap_or(limits.channel_broadcasts_per_second) as usize,
            1,
            1_000_000,
        )? as u32;
        let socket_broadcasts_per_second = range(
            "SOCKET_BROADCASTS_PER_SECOND (--socket-broadcasts-per-second)",
            merged.socket_broadcasts_per_second.unwrap_or(limits.socket_broadcasts_per_second) as usize,
            1,
            1_000_000,
        )? as u32;
        let ws_read_buffer = range(
            "WS_READ_BUFFER_BYTES (--ws-read-buffer)",
            merged.ws_read_buffer_bytes.unwrap_or(limits.ws_read_buffer),
            1 << 10,
            1 << 20,
        )?;
        let ws_write_buffer = range(
            "WS_WRITE_BUFFER_BYTES (--ws-write-buffer)",
            merged.ws_write_buffer_bytes.unwrap_or(limits.ws_write_buffer),
            0,
            1 << 20,
        )?;
        let outbox_budget = range(
            "OUTBOX_BUDGET_BYTES (--outbox-budget)",
            merged.outbox_budget_bytes.unwrap_or(hub.outbox_budget),
            1 << 20,
            1 << 40,
        )?;
        let lag_secs = merged.max_reader_lag_secs.unwrap_or(hub.max_reader_lag.as_secs_f64());
        if !(1.0..=3600.0).contains(&lag_secs) {
            return Err(ConfigError::OutOfRange { name: "MAX_READER_LAG_SECS (--max-reader-lag)", min: 1, max: 3600 });
        }
        let spill_budget = merged.spill_budget_bytes.unwrap_or(crate::spill::DEFAULT_DISK_BUDGET);
        if !((16 << 20)..=(1 << 50)).contains(&spill_budget) {
            return Err(ConfigError::OutOfRange {
                name: "SPILL_BUDGET_BYTES (--spill-budget)",
                min: 16 << 20,
                max: 1 << 50,
            });
        }
        let policy_cache_budget = merged.policy_cache_budget_bytes.unwrap_or(crate::policy::caches::DEFAULT_BUDGET);
        if !((1 << 20)..=(1 << 44)).contains(&policy_cache_budget) {
            return Err(ConfigError::OutOfRange {
                name: "POLICY_CACHE_BUDGET_BYTES (--policy-cache-budget)",
                min: 1 << 20,
                max: 1 << 44,
            });
        }
        let writer_secs = merged.demo_writer_secs.unwrap_or(2.0);
        if !(0.0..=3600.0).contains(&writer_secs) {
            return Err(ConfigError::OutOfRange { name: "--demo-writer-secs", min: 0, max: 3600 });
        }
        let mut monitoring = crate::monitor::MonitorConfig::default();
        if let Some(bytes) = merged.slot_wal_warn_bytes {
            monitoring.slot_wal_warn_bytes = (bytes > 0).then_some(bytes);
        }
        if let Some(fraction) = merged.slot_wal_warn_fraction {
            if !(0.0..=1.0).contains(&fraction) {
                return Err(ConfigError::OutOfRange { name: "--slot-wal-warn-fraction", min: 0, max: 1 });
            }
            monitoring.slot_wal_warn_fraction = (fraction > 0.0).then_some(fraction);
        }
        if let Some(secs) = merged.ready_max_lag_secs {
            if !(0.0..=86_400.0).contains(&secs) {
                return Err(ConfigError::OutOfRange { name: "--ready-max-lag-secs", min: 0, max: 86_400 });
            }
            monitoring.ready_max_lag = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
        }
        let timeout_secs = merged
            .replication_timeout_secs
            .unwrap_or(crate::replication::stream::DEFAULT_SILENCE_TIMEOUT.as_secs_f64());
        if timeout_secs != 0.0 && !(2.0..=3600.0).contains(&timeout_secs) {
            return Err(ConfigError::OutOfRange {
                name: "REPLICATION_TIMEOUT_SECS (--replication-timeout; 0 = never)",
                min: 2,
                max: 3600,
            });
        }
        let heartbeat_secs = merged
            .heartbeat_interval_secs
            .unwrap_or(crate::replication::heartbeat::DEFAULT_HEARTBEAT_INTERVAL.as_secs_f64());
        // A heartbeat must fit in the deadline at least twice, or an idle
        // healthy link would be judged dead between two of them.
        let heartbeat_max = if timeout_secs > 0.0 { timeout_secs / 2.0 } else { 3600.0 };
        if heartbeat_secs != 0.0 && !(0.1..=heartbeat_max).contains(&heartbeat_secs) {
            return Err(ConfigError::OutOfRange {
                name: "HEARTBEAT_INTERVAL_SECS (--heartbeat-interval; 0 = off; at most half the replication timeout)",
                min: 0,
                max: heartbeat_max as u64,
            });
        }
        let nats_url = merged.nats_url.clone().filter(|url| !url.trim().is_empty()).map(crate::scaleout::NatsUrl);
        let cluster = match &nats_url {
            None => None,
            Some(url) => Some(cluster_settings(url, &cluster_given)?),
        };
        let poll_secs =
            merged.policy_poll_interval_secs.unwrap_or(crate::policy::watch::DEFAULT_POLL_INTERVAL.as_secs_f64());
        if !(0.1..=10.0).contains(&poll_secs) {
            return Err(ConfigError::OutOfRange {
                name: "POLICY_POLL_INTERVAL_SECS (--policy-poll-interval; 0.1 to 10)",
                min: 0,
                max: 10,
            });
        }
        // The demo serves tokens and data anyone could use: loopback
        // unless an address is asked for.
        let host = merged.host.unwrap_or(match database {
            Database::Embedded => IpAddr::from([127, 0, 0, 1]),
            Database::Url(_) => IpAddr::from([0, 0, 0, 0]),
        });
        Ok(Settings {
            monitoring,
            database,
            slot,
            publication,
            host,
            port: merged.port.unwrap_or(DEFAULT_PORT),
            auth,
            max_connections,
            max_channels,
            max_unindexed_filters,
            max_join_bytes,
            max_socket_join_bytes,
            max_broadcast_bytes,
            channel_broadcasts_per_second,
            socket_broadcasts_per_second,
            max_sockets_per_user,
            max_sockets_per_address,
            trusted_proxies,
            nats_url: nats_url.clone(),
            cluster,
            ws_read_buffer,
            ws_write_buffer,
            data_dir: merged.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            spill_dir: merged.spill_dir.unwrap_or(spill_default),
            outbox_budget,
            max_reader_lag: Duration::from_secs_f64(lag_secs),
            spill_budget,
            policy_cache_budget,
            demo_writer: (writer_secs > 0.0).then(|| Duration::from_secs_f64(writer_secs)),
            streaming: merged.streaming.unwrap_or(false),
            slot_failover: merged.slot_failover.unwrap_or(false),
            replication_timeout: (timeout_secs > 0.0).then(|| Duration::from_secs_f64(timeout_secs)),
            heartbeat_interval: (heartbeat_secs > 0.0).then(|| Duration::from_secs_f64(heartbeat_secs)),
            policy_poll_interval: Duration::from_secs_f64(poll_secs),
        })
    }

    fn database(merged: &FileConfig) -> Result<Database, ConfigError> {
        if let Some(url) = merged.database_url.as_deref().filter(|u| !u.is_empty()) {
            if merged.db_host.is_some() {
                tracing::info!("DATABASE_URL is set; DB_HOST and the other DB_* settings are ignored");
            }
            return PgConfig::from_str(url).map(|c| Database::Url(Box::new(c))).map_err(ConfigError::DatabaseUrl);
        }
        let Some(host) = merged.db_host.as_deref().filter(|h| !h.is_empty()) else {
            return Ok(Database::Embedded);
        };
        let mut conninfo = format!("host={}", conninfo_value(host));
        conninfo.push_str(&format!(" port={}", merged.db_port.unwrap_or(5432)));
        conninfo.push_str(&format!(" user={}", conninfo_value(merged.db_user.as_deref().unwrap_or("postgres"))));
        if let Some(password) = &merged.db_password {
            conninfo.push_str(&format!(" password={}", conninfo_value(password)));
        }
        conninfo.push_str(&format!(" dbname={}", conninfo_value(merged.db_name.as_deref().unwrap_or("postgres"))));
        if let Some(ssl) = &merged.db_ssl {
            let lower = ssl.to_ascii_lowercase();
            let mode = match lower.as_str() {
                "true" | "1" | "on" => "require",
                "false" | "0" | "off" => "disable",
                mode @ ("disable" | "prefer" | "require" | "verify-ca" | "verify-full") => mode,
                _ => return Err(ConfigError::DbSsl),
            };
            conninfo.push_str(&format!(" sslmode={mode}"));
        }
        PgConfig::from_str(&conninfo).map(|c| Database::Url(Box::new(c))).map_err(ConfigError::DatabaseUrl)
    }

    /// The configured database, for everything but the demo.
    ///
    /// # Errors
    /// [`ConfigError::NoDatabase`] (naming `DATABASE_URL`, `DB_HOST` and
    /// `--config`) when none is configured.
    pub fn require_database(&self) -> Result<&PgConfig, ConfigError> {
        match &self.database {
            Database::Url(config) => Ok(config),
            Database::Embedded => Err(ConfigError::NoDatabase),
        }
    }

    /// Whether these settings run the demo (bare `walcast`): `Ok(true)` when
    /// no database is configured, `Ok(false)` when one is.
    ///
    /// # Errors
    /// [`ConfigError::DemoJwtKey`] when no database is configured but a JWT
    /// key is: the demo signs its own tokens, and a key given for
    /// production must not silently start a demo.
    pub fn demo(&self) -> Result<bool, ConfigError> {
        match self.database {
            Database::Url(_) => Ok(false),
            Database::Embedded if self.auth.jwt_secret.is_some() || self.auth.jwks.is_some() => {
                Err(ConfigError::DemoJwtKey)
            }
            Database::Embedded => Ok(true),
        }
    }

    /// The server configuration for a database connection.
    pub fn serve_config(&self, connection: PgConfig) -> ServeConfig {
        let mut slot = SlotOptions::new(&self.slot, &self.publication);
        if self.streaming {
            slot.proto_version = 2;
            slot.streaming = true;
        }
        slot.failover = self.slot_failover;
        let mut source = SourceConfig::new(connection, slot);
        source.stream.silence_timeout = self.replication_timeout;
        source.heartbeat =
            self.heartbeat_interval.map(|interval| crate::replication::heartbeat::HeartbeatConfig { interval });
        let mut relay = RelayConfig::new(source);
        relay.hub.outbox_budget = self.outbox_budget;
        relay.hub.max_reader_lag = self.max_reader_lag;
        relay.policy_cache_budget = self.policy_cache_budget;
        relay.spill = crate::spill::SpillConfig { dir: self.spill_dir.clone(), disk_budget: self.spill_budget };
        relay.policy_poll = self.policy_poll_interval;
        let mut config = ServeConfig::new(relay, self.auth.clone());
        config.listen = std::net::SocketAddr::new(self.host, self.port);
        config.limits.max_connections = self.max_connections;
        config.limits.max_channels = self.max_channels;
        config.limits.max_unindexed_filters = self.max_unindexed_filters;
        config.limits.max_join_bytes = self.max_join_bytes;
        config.limits.max_socket_join_bytes = self.max_socket_join_bytes;
        config.limits.max_broadcast_bytes = self.max_broadcast_bytes;
        config.limits.channel_broadcasts_per_second = self.channel_broadcasts_per_second;
        config.limits.socket_broadcasts_per_second = self.socket_broadcasts_per_second;
        config.limits.max_sockets_per_user = self.max_sockets_per_user;
        config.limits.max_sockets_per_address = self.max_sockets_per_address;
        config.limits.trusted_proxies = self.trusted_proxies.clone();
        config.cluster = self.cluster.clone();
        config.limits.ws_read_buffer = self.ws_read_buffer;
        config.limits.ws_write_buffer = self.ws_write_buffer;
        config.monitoring = self.monitoring.clone();
        config
    }
}

/// The cluster settings as given (flags > environment > file).
struct ClusterGiven {
    node_role: Option<crate::scaleout::NodeRole>,
    edge_max_stale_secs: Option<f64>,
    stream_replicas: Option<usize>,
    stream_max_bytes: Option<i64>,
    stream_max_age_secs: Option<f64>,
    lease_ttl_secs: Option<f64>,
    snapshot_interval_secs: Option<f64>,
}

/// The cluster settings around `url` (`--nats-url`), checked.
fn cluster_settings(
    url: &crate::scaleout::NatsUrl,
    merged: &ClusterGiven,
) -> Result<crate::scaleout::ClusterSettings, ConfigError> {
    let mut cluster = crate::scaleout::ClusterSettings::new(url.0.clone());
    cluster.role = merged.node_role.unwrap_or_default();
    let stale = merged.edge_max_stale_secs.unwrap_or(cluster.edge_max_stale.as_secs_f64());
    if !(1.0..=3600.0).contains(&stale) {
        return Err(ConfigError::OutOfRange {
            name: "WALCAST_EDGE_MAX_STALE_SECS (--edge-max-stale-secs)",
            min: 1,
            max: 3600,
        });
    }
    cluster.edge_max_stale = Duration::from_secs_f64(stale);
    let replicas = merged.stream_replicas.unwrap_or(cluster.stream.replicas);
    if !matches!(replicas, 1 | 3 | 5) {
        return Err(ConfigError::OutOfRange {
            name: "WALCAST_STREAM_REPLICAS (--stream-replicas: 1, 3 or 5)",
            min: 1,
            max: 5,
        });
    }
    cluster.stream.replicas = replicas;
    let max_bytes = merged.stream_max_bytes.unwrap_or(cluster.stream.max_bytes);
    if max_bytes < 1 << 20 {
        return Err(ConfigError::OutOfRange {
            name: "WALCAST_STREAM_MAX_BYTES (--stream-max-bytes: at least 1 MiB)",
            min: 1 << 20,
            max: i64::MAX as u64,
        });
    }
    cluster.stream.max_bytes = max_bytes;
    let max_age = merged.stream_max_age_secs.unwrap_or(cluster.stream.max_age.as_secs_f64());
    if !(60.0..=365.0 * 86400.0).contains(&max_age) {
        return Err(ConfigError::OutOfRange {
            name: "WALCAST_STREAM_MAX_AGE_SECS (--stream-max-age-secs)",
            min: 60,
            max: 365 * 86400,
        });
    }
    cluster.stream.max_age = Duration::from_secs_f64(max_age);
    let ttl = merged.lease_ttl_secs.unwrap_or(cluster.lease_ttl.as_secs_f64());
    if !(1.0..=300.0).contains(&ttl) {
        return Err(ConfigError::OutOfRange { name: "WALCAST_LEASE_TTL_SECS (--lease-ttl-secs)", min: 1, max: 300 });
    }
    cluster.lease_ttl = Duration::from_secs_f64(ttl);
    let interval = merged.snapshot_interval_secs.unwrap_or(cluster.snapshot_interval.as_secs_f64());
    if !(0.1..=3600.0).contains(&interval) {
        return Err(ConfigError::OutOfRange {
            name: "WALCAST_SNAPSHOT_INTERVAL_SECS (--snapshot-interval-secs)",
            min: 0,
            max: 3600,
        });
    }
    cluster.snapshot_interval = Duration::from_secs_f64(interval);
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given() -> FileConfig {
        FileConfig { jwt_secret: Some("s".into()), ..FileConfig::default() }
    }

    #[test]
    fn defaults_and_embedded_without_a_database() {
        let settings = Settings::resolve(FileConfig::default(), None).unwrap();
        assert!(matches!(settings.database, Database::Embedded));
        assert_eq!((settings.port, settings.slot.as_str()), (DEFAULT_PORT, DEFAULT_SLOT));
        assert_eq!(settings.demo_writer, Some(Duration::from_secs(2)));
    }

    #[test]
    fn defaults_are_the_layers_own() {
        let settings = Settings::resolve(FileConfig::default(), None).unwrap();
        let serve = settings.serve_config(PgConfig::from_str("postgres://u@h/db").unwrap());
        let limits = crate::realtime::Limits::default();
        let got = (serve.limits.max_connections, serve.limits.max_channels, serve.limits.ws_read_buffer);
        assert_eq!(got, (limits.max_connections, limits.max_channels, limits.ws_read_buffer));
        let got = (serve.limits.max_unindexed_filters, serve.limits.max_join_bytes, serve.limits.max_socket_join_bytes);
        assert_eq!(got, (limits.max_unindexed_filters, limits.max_join_bytes, limits.max_socket_join_bytes));
        assert_eq!(serve.limits.ws_write_buffer, limits.ws_write_buffer);
        let hub = crate::hub::HubConfig::default();
        assert_eq!(
            (serve.relay.hub.outbox_budget, serve.relay.hub.max_reader_lag),
            (hub.outbox_budget, hub.max_reader_lag)
        );
        let source = &serve.relay.source;
        assert_eq!(source.stream.silence_timeout, Some(crate::replication::stream::DEFAULT_SILENCE_TIMEOUT));
        let heartbeat = source.heartbeat.as_ref().map(|h| h.interval);
        assert_eq!(heartbeat, Some(crate::replication::heartbeat::DEFAULT_HEARTBEAT_INTERVAL));
    }

    #[test]
    fn liveness_settings_are_checked() {
        let with = |timeout: Option<f64>, heartbeat: Option<f64>| {
            let given = FileConfig { replication_timeout_secs: timeout, heartbeat_interval_secs: heartbeat, ..given() };
            Settings::resolve(given, None)
        };
        let s = with(Some(3.0), Some(0.5)).unwrap();
        assert_eq!(
            (s.replication_timeout, s.heartbeat_interval),
            (Some(Duration::from_secs(3)), Some(Duration::from_millis(500)))
        );
        let off = with(Some(0.0), Some(0.0)).unwrap();
        assert_eq!((off.replication_timeout, off.heartbeat_interval), (None, None));
        // A heartbeat must fit twice in the deadline; a deadline under 2 s is refused.
        assert!(with(Some(4.0), Some(3.0)).unwrap_err().to_string().contains("HEARTBEAT_INTERVAL_SECS"));
        assert!(with(Some(1.0), None).unwrap_err().to_string().contains("REPLICATION_TIMEOUT_SECS"));
        assert!(with(Some(0.0), Some(120.0)).is_ok(), "no deadline: any heartbeat up to an hour");
    }

    #[test]
    fn the_demo_only_without_a_database_on_loopback_and_without_keys() {
        // No database: the demo, on 127.0.0.1 unless a host is given.
        let demo = Settings::resolve(FileConfig::default(), None).unwrap();
        assert!(demo.demo().unwrap());
        assert_eq!(demo.host, IpAddr::from([127, 0, 0, 1]));
        let err = demo.require_database().unwrap_err().to_string();
        for name in ["DATABASE_URL", "DB_HOST", "--config"] {
            assert!(err.contains(name), "{err}");
        }
        let everywhere = FileConfig { host: Some(IpAddr::from([0, 0, 0, 0])), ..FileConfig::default() };
        assert_eq!(Settings::resolve(everywhere, None).unwrap().host, IpAddr::from([0, 0, 0, 0]));
        // A JWT key without a database is a mistake, not a demo.
        for keyed in [
            FileConfig { jwt_secret: Some("s".into()), ..FileConfig::default() },
            FileConfig { jwt_jwks: Some("{}".into()), ..FileConfig::default() },
        ] {
            let settings = Settings::resolve(keyed, None).unwrap();
            assert!(matches!(settings.demo(), Err(ConfigError::DemoJwtKey)));
            assert!(matches!(settings.require_database(), Err(ConfigError::NoDatabase)));
        }
        // A database from the URL, DB_HOST or the file: no demo, all interfaces.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(&path, "db_host = \"db.example.com\"\n").unwrap();
        for (given, file) in [
            (FileConfig { database_url: Some("postgres://u@h/db".into()), ..given() }, None),
            (FileConfig { db_host: Some("h".into()), ..given() }, None),
            (given(), Some(path.as_path())),
        ] {
            let settings = Settings::resolve(given, file).unwrap();
            assert!(!settings.demo().unwrap());
            assert!(settings.require_database().is_ok());
            assert_eq!(settings.host, IpAddr::from([0, 0, 0, 0]));
        }
    }

    #[test]
    fn precedence_given_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://u:p@h/db\"\nport = 5000\nslot_name = \"from_file\"\njwt_secret = \"f\"\n\
             max_channels_per_client = 7\nmax_unindexed_filters_per_client = 3\nmax_join_bytes = 4096\n",
        )
        .unwrap();
        let given = FileConfig { port: Some(6000), max_join_bytes: Some(8192), ..FileConfig::default() };
        let settings = Settings::resolve(given, Some(&path)).unwrap();
        assert_eq!(settings.port, 6000, "flag/env beats the file");
        assert_eq!(settings.slot, "from_file", "the file beats the default");
        assert_eq!(settings.max_channels, 7);
        assert_eq!(settings.max_unindexed_filters, 3);
        assert_eq!(settings.max_join_bytes, 8192);
        assert_eq!(settings.max_broadcast_bytes, crate::realtime::Limits::default().max_broadcast_bytes);
        let over =
            FileConfig { jwt_secret: Some("s".into()), max_broadcast_bytes: Some(1 << 20), ..FileConfig::default() };
        assert!(Settings::resolve(over, None).is_err(), "the socket's message limit must hold the payload limit");
        let serve = settings.serve_config(PgConfig::from_str("postgres://u@h/db").unwrap());
        assert_eq!((serve.limits.max_unindexed_filters, serve.limits.max_join_bytes), (3, 8192));
        assert_eq!(settings.auth.jwt_secret.as_deref(), Some("f"));
        assert!(matches!(settings.database, Database::Url(_)));
    }

    #[test]
    fn socket_budgets_and_trusted_proxies_from_flags_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://u:p@h/db\"\njwt_secret = \"f\"\nmax_sockets_per_user = 7\n\
             max_sockets_per_address = 70\ntrusted_proxies = \"10.0.0.0/8, 127.0.0.1\"\n",
        )
        .unwrap();
        let settings = Settings::resolve(FileConfig::default(), Some(&path)).unwrap();
        assert_eq!((settings.max_sockets_per_user, settings.max_sockets_per_address), (7, 70));
        assert_eq!(settings.trusted_proxies.len(), 2);
        let limits = settings.serve_config(settings.require_database().unwrap().clone()).limits;
        assert_eq!((limits.max_sockets_per_user, limits.max_sockets_per_address), (7, 70));
        assert!(limits.trusted_proxies[1].contains(IpAddr::from([127, 0, 0, 1])));
        // Flags beat the file; defaults come from Limits.
        let given = FileConfig { max_sockets_per_user: Some(3), trusted_proxies: Some(String::new()), ..given() };
        let settings = Settings::resolve(given, Some(&path)).unwrap();
        assert_eq!(settings.max_sockets_per_user, 3);
        assert!(settings.trusted_proxies.is_empty());
        let settings = Settings::resolve(given_url(), None).unwrap();
        let defaults = crate::realtime::Limits::default();
        assert_eq!(settings.max_sockets_per_user, defaults.max_sockets_per_user);
        assert_eq!(settings.max_sockets_per_address, defaults.max_sockets_per_address);
        // Refusals name the setting.
        let bad = FileConfig { trusted_proxies: Some("10.0.0.0/8,nope".into()), ..given_url() };
        let err = Settings::resolve(bad, None).unwrap_err().to_string();
        assert!(err.starts_with("TRUSTED_PROXIES (--trusted-proxies): \"nope\""), "{err}");
        let zero = FileConfig { max_sockets_per_address: Some(0), ..given_url() };
        assert!(Settings::resolve(zero, None).unwrap_err().to_string().contains("MAX_SOCKETS_PER_ADDRESS"));
    }

    #[test]
    fn cluster_roles_stream_lease_and_staleness_from_the_file_flags_and_defaults() {
        use crate::scaleout::NodeRole;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://u:p@h/db\"\njwt_secret = \"f\"\nnats_url = \"nats://a:4222,nats://b:4222\"\n\
             node_role = \"edge\"\nedge_max_stale_secs = 4\nstream_replicas = 3\nstream_max_bytes = 2097152\n\
             stream_max_age_secs = 7200\n\
             lease_ttl_secs = 6\nsnapshot_interval_secs = 2.5\n",
        )
        .unwrap();
        let settings = Settings::resolve(FileConfig::default(), Some(&path)).unwrap();
        let cluster = settings.serve_config(settings.require_database().unwrap().clone()).cluster.expect("cluster");
        assert_eq!(cluster.role, NodeRole::Edge);
        assert_eq!(cluster.edge_max_stale, Duration::from_secs(4));
        assert_eq!((cluster.stream.replicas, cluster.stream.max_bytes), (3, 2 << 20));
        assert_eq!(cluster.stream.max_age, Duration::from_secs(7200));
        assert_eq!(cluster.lease_ttl, Duration::from_secs(6));
        assert_eq!(cluster.snapshot_interval, Duration::from_millis(2500));
        assert_eq!(crate::scaleout::log::server_addrs(&cluster.nats_url.0).unwrap().len(), 2);
        // Flags beat the file.
        let given = FileConfig { node_role: Some(NodeRole::Source), ..given() };
        let settings = Settings::resolve(given, Some(&path)).unwrap();
        assert_eq!(settings.cluster.unwrap().role, NodeRole::Source);
        // Defaults.
        let settings =
            Settings::resolve(FileConfig { nats_url: Some("nats://n:4222".into()), ..given_url() }, None).unwrap();
        let cluster = settings.cluster.unwrap();
        assert_eq!(cluster.role, NodeRole::All);
        assert_eq!(cluster.edge_max_stale, Duration::from_secs(10));
        assert_eq!((cluster.stream.replicas, cluster.stream.max_bytes), (1, 1 << 30));
        assert_eq!(cluster.stream.max_age, Duration::from_secs(24 * 3600));
        assert_eq!(cluster.lease_ttl, Duration::from_secs(10));
        // Out of range: each refused with the setting's name.
        for (bad, name) in [
            (FileConfig { stream_replicas: Some(2), ..given_url() }, "STREAM_REPLICAS"),
            (FileConfig { edge_max_stale_secs: Some(0.0), ..given_url() }, "EDGE_MAX_STALE_SECS"),
            (FileConfig { stream_max_bytes: Some(1000), ..given_url() }, "STREAM_MAX_BYTES"),
            (FileConfig { stream_max_age_secs: Some(1.0), ..given_url() }, "STREAM_MAX_AGE_SECS"),
            (FileConfig { lease_ttl_secs: Some(0.1), ..given_url() }, "LEASE_TTL_SECS"),
            (FileConfig { snapshot_interval_secs: Some(0.0), ..given_url() }, "SNAPSHOT_INTERVAL_SECS"),
        ] {
            let bad = FileConfig { nats_url: Some("nats://n:4222".into()), ..bad };
            assert!(Settings::resolve(bad, None).unwrap_err().to_string().contains(name), "{name}");
        }
    }

    #[test]
    fn broadcast_rates_and_the_nats_url_from_the_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://u:p@h/db\"\njwt_secret = \"f\"\nchannel_broadcasts_per_second = 7\n\
             socket_broadcasts_per_second = 70\nnats_url = \"nats://user:hunter2@n1:4222\"\n",
        )
        .unwrap();
        let settings = Settings::resolve(FileConfig::default(), Some(&path)).unwrap();
        let config = settings.serve_config(settings.require_database().unwrap().clone());
        assert_eq!((config.limits.channel_broadcasts_per_second, config.limits.socket_broadcasts_per_second), (7, 70));
        let cluster = config.cluster.expect("cluster mode");
        assert_eq!(cluster.nats_url.0, "nats://user:hunter2@n1:4222");
        assert!(!format!("{settings:?} {cluster:?}").contains("hunter2"), "the NATS password is never shown");
        // Flags beat the file; defaults come from Limits; no URL, one node.
        let given = FileConfig { channel_broadcasts_per_second: Some(3), ..given() };
        assert_eq!(Settings::resolve(given, Some(&path)).unwrap().channel_broadcasts_per_second, 3);
        let settings = Settings::resolve(given_url(), None).unwrap();
        let defaults = crate::realtime::Limits::default();
        assert_eq!(settings.channel_broadcasts_per_second, defaults.channel_broadcasts_per_second);
        assert_eq!(settings.socket_broadcasts_per_second, defaults.socket_broadcasts_per_second);
        assert!(settings.serve_config(settings.require_database().unwrap().clone()).cluster.is_none());
        let zero = FileConfig { socket_broadcasts_per_second: Some(0), ..given_url() };
        assert!(Settings::resolve(zero, None).unwrap_err().to_string().contains("SOCKET_BROADCASTS_PER_SECOND"));
    }

    fn given_url() -> FileConfig {
        FileConfig { database_url: Some("postgres://u:p@h/db".into()), ..given() }
    }

    #[test]
    fn supabase_db_variables_build_the_connection() {
        let given = FileConfig {
            db_host: Some("db.example.com".into()),
            db_port: Some(6543),
            db_user: Some("supabase_admin".into()),
            db_password: Some("it's secret".into()),
            db_name: Some("postgres".into()),
            db_ssl: Some("true".into()),
            ..given()
        };
        let settings = Settings::resolve(given, None).unwrap();
        let Database::Url(config) = &settings.database else { panic!("a database") };
        assert_eq!(config.postgres().get_ports(), [6543]);
        assert_eq!(config.postgres().get_user(), Some("supabase_admin"));
        assert_eq!(config.postgres().get_password(), Some(&b"it's secret"[..]));
        assert_eq!(config.tls().mode, crate::pgconn::SslMode::Require);
        let debug = format!("{settings:?}");
        assert!(!debug.contains("it's secret") && !debug.contains("\"s\""), "Debug never shows secrets: {debug}");
        let bad = FileConfig { db_host: Some("h".into()), db_ssl: Some("maybe".into()), ..self::tests::given() };
        assert!(matches!(Settings::resolve(bad, None), Err(ConfigError::DbSsl)));
    }

    #[test]
    fn database_url_tls_settings() {
        let url = "postgres://u:hunter2@db.example.com/db?sslmode=verify-full&sslrootcert=/etc/walcast/ca.pem";
        let settings = Settings::resolve(FileConfig { database_url: Some(url.into()), ..given() }, None).unwrap();
        let Database::Url(config) = &settings.database else { panic!("a database") };
        assert_eq!(config.tls().mode, crate::pgconn::SslMode::VerifyFull);
        assert!(format!("{settings:?}").contains("sslmode: verify-full"));
        let no_root =
            FileConfig { database_url: Some("postgres://u:hunter2@h/db?sslmode=verify-ca".into()), ..given() };
        let err = Settings::resolve(no_root, None).unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL") && err.contains("sslrootcert") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn monitoring_thresholds_come_from_the_settings() {
        let thresholds = FileConfig {
            slot_wal_warn_bytes: Some(4096),
            slot_wal_warn_fraction: Some(0.0),
            ready_max_lag_secs: Some(2.5),
            ..given()
        };
        let settings = Settings::resolve(thresholds, None).unwrap();
        assert_eq!(settings.monitoring.slot_wal_warn_bytes, Some(4096));
        assert_eq!(settings.monitoring.slot_wal_warn_fraction, None, "0 turns it off");
        assert_eq!(settings.monitoring.ready_max_lag, Some(Duration::from_millis(2500)));
        let bad = FileConfig { slot_wal_warn_fraction: Some(1.5), ..given() };
        assert!(Settings::resolve(bad, None).unwrap_err().to_string().contains("--slot-wal-warn-fraction"));
    }

    #[test]
    fn memory_settings_come_from_the_settings_and_reach_the_relay() {
        let settings = Settings::resolve(given(), None).unwrap();
        assert_eq!(settings.outbox_budget, crate::hub::DEFAULT_OUTBOX_BUDGET);
        assert_eq!(settings.max_reader_lag, Duration::from_secs(30));
        assert_eq!(settings.spill_budget, crate::spill::DEFAULT_DISK_BUDGET);
        assert_eq!(settings.spill_dir, PathBuf::from(DEFAULT_SPILL_DIR).join(&settings.slot));
        let set = FileConfig {
            outbox_budget_bytes: Some(64 << 20),
            max_reader_lag_secs: Some(5.0),
            spill_budget_bytes: Some(1 << 30),
            spill_dir: Some("/tmp/x".into()),
            ..given()
        };
        let settings = Settings::resolve(set, None).unwrap();
        let config = settings.serve_config(PgConfig::from_str("host=localhost").unwrap());
        assert_eq!(config.relay.hub.outbox_budget, 64 << 20);
        assert_eq!(config.relay.hub.max_reader_lag, Duration::from_secs(5));
        assert_eq!(config.relay.spill.disk_budget, 1 << 30);
        assert_eq!(config.relay.spill.dir, PathBuf::from("/tmp/x"));
        let bad = FileConfig { outbox_budget_bytes: Some(1000), ..given() };
        assert!(Settings::resolve(bad, None).unwrap_err().to_string().contains("--outbox-budget"));
        let bad = FileConfig { max_reader_lag_secs: Some(0.0), ..given() };
        assert!(Settings::resolve(bad, None).unwrap_err().to_string().contains("--max-reader-lag"));
        let bad = FileConfig { spill_budget_bytes: Some(1), ..given() };
        assert!(Settings::resolve(bad, None).unwrap_err().to_string().contains("--spill-budget"));
    }

    #[test]
    fn websocket_buffers_come_from_the_settings() {
        let settings = Settings::resolve(given(), None).unwrap();
        assert_eq!((settings.ws_read_buffer, settings.ws_write_buffer), (2 << 10, 32 << 10));
        let sized = FileConfig { ws_read_buffer_bytes: Some(4096), ws_write_buffer_bytes: Some(0), ..given() };
        let settings = Settings::resolve(sized, None).unwrap();
        let limits = settings.serve_config(PgConfig::from_str("postgres://u@h/db").unwrap()).limits;
        assert_eq!((limits.ws_read_buffer, limits.ws_write_buffer), (4096, 0));
        let bad = FileConfig { ws_read_buffer_bytes: Some(16), ..given() };
        assert!(Settings::resolve(bad, None).unwrap_err().to_string().contains("--ws-read-buffer"));
    }

    #[test]
    fn slot_failover_is_off_by_default_and_reaches_the_slot_options() {
        let settings = Settings::resolve(given(), None).unwrap();
        assert!(!settings.slot_failover);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(&path, "jwt_secret = \"f\"\nslot_failover = true\n").unwrap();
        let settings = Settings::resolve(FileConfig::default(), Some(&path)).unwrap();
        assert!(settings.slot_failover, "from the file");
        let url = PgConfig::from_str("postgres://u@h/db").unwrap();
        assert!(settings.serve_config(url).relay.source.slot.failover);
        let off = FileConfig { slot_failover: Some(false), ..FileConfig::default() };
        assert!(!Settings::resolve(off, Some(&path)).unwrap().slot_failover, "a flag or variable beats the file");
    }

    #[test]
    fn streaming_is_off_by_default_and_turns_on_protocol_2() {
        let connection = || PgConfig::from_str("postgres://u@h/db").unwrap();
        let settings = Settings::resolve(given(), None).unwrap();
        assert!(!settings.streaming);
        let slot = settings.serve_config(connection()).relay.source.slot;
        assert_eq!((slot.proto_version, slot.streaming), (1, false));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walcast.toml");
        std::fs::write(&path, "jwt_secret = \"f\"\nstreaming = true\n").unwrap();
        let settings = Settings::resolve(FileConfig::default(), Some(&path)).unwrap();
        assert!(settings.streaming, "from the file");
        let slot = settings.serve_config(connection()).relay.source.slot;
        assert_eq!((slot.proto_version, slot.streaming), (2, true));
        let off = FileConfig { streaming: Some(false), ..FileConfig::default() };
        assert!(!Settings::resolve(off, Some(&path)).unwrap().streaming, "a flag or variable beats the file");

        std::fs::write(&path, "streaming = \"yes\"\n").unwrap();
        let err = Settings::resolve(FileConfig::default(), Some(&path)).unwrap_err().to_string();
        assert!(err.contains("streaming") || err.contains("bool"), "{err}");
    }

    #[test]
    fn validation_errors_are_precise_and_never_quote_secrets() {
        let no_key = FileConfig { database_url: Some("postgres://u:hunter2@h/db".into()), ..FileConfig::default() };
        let err = Settings::resolve(no_key, None).unwrap_err();
        assert!(matches!(err, ConfigError::NoJwtKey));
        let bad_url = FileConfig { database_url: Some("postgres://u:hunter2@h:notaport/db".into()), ..given() };
        let err = Settings::resolve(bad_url, None).unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL") && !err.contains("hunter2"), "{err}");
        let zero = FileConfig { max_channels_per_client: Some(0), ..given() };
        assert!(Settings::resolve(zero, None).unwrap_err().to_string().contains("between 1 and 10000"));
        let empty = FileConfig { slot_name: Some(" ".into()), ..given() };
        assert!(matches!(Settings::resolve(empty, None), Err(ConfigError::Empty(_))));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "jwt_secret = \"topsecret\"\nunknown_key = 1\n").unwrap();
        let err = Settings::resolve(FileConfig::default(), Some(&path)).unwrap_err().to_string();
        assert!(err.contains("unknown_key") && !err.contains("topsecret"), "{err}");
    }
}
