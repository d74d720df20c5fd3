//! `walcast load`: an end-to-end load generator and correctness checker for
//! the relay — PostgreSQL writes in, WebSocket deliveries out — that measures
//! latency, throughput, CPU and memory while proving that every client got
//! exactly what Row Level Security entitles it to.
//!
//! ```text
//!  prepare: ephemeral cluster | fresh database on --database-url | the external relay's database
//!     → schema → seed (dealerships, users, memberships, orders; before the slot exists)
//!  relay:   `walcast serve` child (default) | in-process Server | --relay-url
//!     → /health → probe: a service_role subscription sees a marker insert
//!  clients: N raw Phoenix clients (one channel each: orders, 20% with
//!           status=eq.pending, and dealer_memberships), connected in bounded waves
//!  writes:  open-loop order changes at --rate from --writers connections;
//!           --churn membership changes as barriers; every commit in a ledger
//!  drain:   until every expected delivery arrived (bounded), then a short grace
//!  check:   oracle (ledger + memberships → per-user expected changes) vs what
//!           each client received: leaks, duplicates, missing, order
//!  report:  table on stdout, JSON (--json-out), SVG of latency per second (--svg-out)
//! ```
//!
//! `--broadcast` keeps prepare, relay and probe, and replaces clients,
//! writes, drain and check with client→client Broadcast in rooms
//! ([`broadcast`]): every message counted at every receiver.
//!
//! Where it sits: outside the pipeline, like any application and its users.
//! It talks to the relay only over the public WebSocket protocol, and to
//! PostgreSQL only with ordinary SQL.
//!
//! Invariants:
//! - a false pass is the worst outcome: any leak, duplicate, missing or
//!   reordered delivery, undecodable frame, server-side close, failed
//!   subscription or write makes the run fail (non-zero exit) with the first
//!   offending case; the oracle is independent of the relay's code
//!   ([`oracle`]);
//! - only loopback addresses are ever connected to (an external relay URL
//!   elsewhere is refused); every wait is bounded in time and every loop in
//!   count;
//! - the run cleans up what it started (relay child, cluster, fresh database
//!   and slot) on success and on error.
//!
//! Measurements: commit→receive latency from the frame's `commit_timestamp`
//! (millisecond resolution: 0–1 ms high), write-call→receive latency from the
//! timestamp the writer stores in the row's `metadata.load_t_us` (DELETE
//! events, which carry only the old row, use the ledger's time of the same
//! write), deliveries/s, relay CPU% and RSS from `/proc/<pid>` (a child
//! relay's own; in-process they include the load generator), walsender CPU,
//! and the slot's lag sampled every second. `--idle` opens and subscribes the
//! clients, writes nothing, and reports the relay's RSS per connection.
//!
//! File descriptors: the load process raises its soft `RLIMIT_NOFILE` to the
//! hard limit at start and the child relay does the same before `exec`; each
//! side needs one descriptor per connection (both sides in-process), so the
//! hard limit (`ulimit -Hn`) bounds the connection count. Towards a relay on
//! 127.0.0.1 the clients' sockets are spread round-robin over source
//! addresses 127.0.0.2–127.0.0.K (K ≤ 250), at most the relay's default
//! per-address budget (`--max-sockets-per-address`, 1,000) on each, so a load
//! test stays within it and each source address has its own ephemeral port
//! range; beyond 249 × 1,000 clients the child relay is given a larger
//! per-address budget. The clients' apikey has no `sub`, so the per-user
//! budget does not apply to them.

pub mod broadcast;
pub mod client;
pub mod fanout;
pub mod ids;
pub mod oracle;
pub mod receiver;
pub mod relay;
pub mod report;
pub mod schema;
pub mod seed;
pub mod wire;
pub mod writer;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{watch, Semaphore};

use self::client::{ClientOutcome, ClientSpec, Endpoint, Shared, Subscribed};
use self::ids::{Ids, Rng, Tag};
use self::oracle::{ClientRecord, Event, Expectations, Table};
use self::receiver::Receivers;
use self::relay::{ProcSample, RelayHandle, RelayMode};
use self::report::{Latencies, Quantiles, Report, Sample};
use self::seed::{Database, World};
use crate::hub::Vsn;

/// Most source addresses the clients are spread over (127.0.0.2–127.0.0.250).
const MAX_SOURCES: u32 = 249;
/// How long the probe may take to see its marker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// Extra wait after every expected delivery arrived (late duplicates/leaks).
const GRACE: Duration = Duration::from_millis(500);

/// The source addresses the clients are spread over (`--source-addrs`, else
/// enough for the relay's default per-address budget, at most
/// [`MAX_SOURCES`]) and the most clients one of them carries.
fn source_spread(args: &LoadArgs) -> (u32, usize) {
    let budget = u32::try_from(crate::realtime::Limits::default().max_sockets_per_address).unwrap_or(u32::MAX).max(1);
    let sources =
        if args.source_addrs > 0 { args.source_addrs } else { args.clients.div_ceil(budget) }.clamp(1, MAX_SOURCES);
    (sources, args.clients.div_ceil(sources) as usize)
}

/// Errors of a load run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad flags or an unusable environment (definite; the text says what to change).
    #[error("{0}")]
    Config(String),
    /// A database statement failed.
    #[error("could not {what}: {}", db_text(source))]
    Database {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The ephemeral cluster could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The relay could not be started, probed or stopped.
    #[error("relay: {0}")]
    Relay(String),
    /// A write failed or did not do what the ledger says.
    #[error("writer: {0}")]
    Write(String),
    /// An output file could not be written.
    #[error("{0}")]
    Io(String),
    /// The checks failed (the first offending case).
    #[error("the load checks failed: {0}")]
    Failed(String),
}

fn db_text(err: &tokio_postgres::Error) -> String {
    err.as_db_error().map_or_else(|| err.to_string(), |db| format!("{} ({})", db.message(), db.code().code()))
}

impl LoadError {
    fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> LoadError {
        move |source| LoadError::Database { what, source }
    }
}

/// Where the relay runs (`--relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayArg {
    /// A `walcast serve` child process: the relay's own CPU and RSS.
    Process,
    /// In this process: CPU and RSS include the load generator.
    Inproc,
}

/// `walcast load` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Superuser URL of a wal_level=logical server: a fresh database
    /// `walcast_load_<random>` is created there (dropped at the end unless
    /// --keep). Without it an ephemeral cluster is started. With --relay-url:
    /// the database that relay streams (only this run's rows are written and
    /// deleted).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Keep the fresh database (and slot) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Where the relay runs.
    #[arg(long, value_enum, default_value = "process")]
    pub relay: RelayArg,
    /// Drive a running relay at this ws:// URL (loopback only; needs
    /// --jwt-secret and --database-url). Several URLs separated by commas
    /// (the edges of a cluster): client i connects to URL i mod n, and each
    /// is probed before the run.
    #[arg(long)]
    pub relay_url: Option<String>,
    /// The external relay's HS256 secret (generated for a relay this run starts).
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// One more flag for the child relay's `walcast serve` (repeatable; e.g.
    /// `--relay-arg=--ws-read-buffer=131072`).
    #[arg(long = "relay-arg", allow_hyphen_values = true)]
    pub relay_args: Vec<String>,
    /// The `walcast` executable for the child relay (default: this one).
    #[arg(long, hide = true)]
    pub relay_exe: Option<PathBuf>,
    /// Dealerships.
    #[arg(long, default_value_t = 100)]
    pub dealerships: u32,
    /// Users, each a member of 1–3 dealerships.
    #[arg(long, default_value_t = 1_000)]
    pub users: u32,
    /// WebSocket clients, one user each (round robin).
    #[arg(long, default_value_t = 1_000)]
    pub clients: u32,
    /// Seed of memberships, filters and writes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Phoenix serializer: 1.0.0 or 2.0.0.
    #[arg(long, default_value = "2.0.0")]
    pub vsn: String,
    /// Fraction of clients whose orders binding has `status=eq.pending`.
    #[arg(long, default_value_t = 0.2)]
    pub filtered: f64,
    /// Order changes per second (open loop).
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// PostgreSQL connections writing.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Most order writes per transaction: a writer takes whatever is queued,
    /// up to this many, into one transaction (group commit). 1 = one write
    /// per transaction.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Membership changes (grant/revoke) per second, each a barrier.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Live orders to keep (seeded at start).
    #[arg(long, default_value_t = 1_000)]
    pub live_orders: u32,
    /// Open and subscribe the clients, write nothing, report RSS per connection.
    #[arg(long)]
    pub idle: bool,
    /// Seconds to hold idle connections before measuring.
    #[arg(long, default_value_t = 5.0)]
    pub idle_secs: f64,
    /// Connections opened in parallel.
    #[arg(long, default_value_t = 200)]
    pub connect_parallel: usize,
    /// Seconds allowed for every client to subscribe.
    #[arg(long, default_value_t = 120.0)]
    pub subscribe_timeout: f64,
    /// Seconds allowed after the writes for the last deliveries.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// One channel topic per client (`realtime:load-<i>`) instead of the
    /// shared `realtime:load` most applications use: the relay then cannot
    /// share a serialized frame between clients (worst case).
    #[arg(long)]
    pub unique_topics: bool,
    /// Source addresses 127.0.0.2..=127.0.0.(K+1), round robin (0: one per
    /// 1,000 clients, the relay's default per-address budget; at most 249).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u32,
    /// The JSON report (default `target/load/<timestamp>.json`).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// The latency plot (default: the JSON path with .svg).
    #[arg(long)]
    pub svg_out: Option<PathBuf>,
    /// Also record the writes' replication stream (a slot of its own, from
    /// just before the first write to the end of the drain) into this
    /// capture file, for `walcast replay --subscribers N`. Its walsender
    /// shares the machine with the run.
    #[arg(long)]
    pub record_out: Option<PathBuf>,
    /// Load-test client→client Broadcast instead of postgres_changes:
    /// --clients in --rooms public rooms (`self: false`, half 1.0.0 text,
    /// half 2.0.0 binary), sending --rate messages/s in all for --duration;
    /// every message must reach every other member of its room exactly
    /// once and nobody else.
    #[arg(long)]
    pub broadcast: bool,
    /// Rooms of --broadcast (clients are spread round robin).
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// Bytes of each --broadcast message's JSON payload.
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
}

impl LoadArgs {
    fn check(&self) -> Result<Vsn, LoadError> {
        let bad = |s: &str| Err(LoadError::Config(s.to_owned()));
        if self.clients == 0 || self.users == 0 || self.dealerships == 0 {
            return bad("--clients, --users and --dealerships must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.filtered) {
            return bad("--filtered is a fraction between 0 and 1");
        }
        if !(self.rate > 0.0 && self.duration >= 0.0 && self.churn >= 0.0) {
            return bad("--rate must be positive; --duration and --churn not negative");
        }
        if self.relay_url.is_some() && (self.jwt_secret.is_none() || self.database_url.is_none()) {
            return bad("--relay-url needs --jwt-secret (the relay's) and --database-url (the database it streams)");
        }
        if self.batch == 0 || self.batch > 10_000 {
            return bad("--batch must be 1 to 10000");
        }
        if self.writers == 0 || self.connect_parallel == 0 {
            return bad("--writers and --connect-parallel must be at least 1");
        }
        match self.vsn.as_str() {
            "1.0.0" => Ok(Vsn::V1),
            "2.0.0" => Ok(Vsn::V2),
            _ => bad("--vsn is 1.0.0 or 2.0.0"),
        }
    }

    fn mode(&self) -> Result<RelayMode, LoadError> {
        if let Some(url) = &self.relay_url {
            return Ok(RelayMode::External { url: url.clone() });
        }
        Ok(match self.relay {
            RelayArg::Inproc => RelayMode::InProc,
            RelayArg::Process => RelayMode::Process {
                exe: match &self.relay_exe {
                    Some(exe) => exe.clone(),
                    None => std::env::current_exe()
                        .map_err(|e| LoadError::Config(format!("cannot find the walcast executable: {e}")))?,
                },
            },
        })
    }
}

/// Runs `walcast load`: the run, the table on stdout, the JSON and SVG
/// files; an error when any check failed.
///
/// # Errors
/// Setup failures, or [`LoadError::Failed`] with the first offending case.
pub async fn main(args: LoadArgs) -> Result<(), LoadError> {
    let started = std::time::SystemTime::now();
    let (report, failure) = run(&args).await?;
    print!("{}", report.table());
    let json_out = args
        .json_out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target").join("load").join(format!("{}.json", utc_stamp(started))));
    let svg_out = args.svg_out.clone().unwrap_or_else(|| json_out.with_extension("svg"));
    report.write_json(&json_out).map_err(|e| LoadError::Io(format!("writing {}: {e}", json_out.display())))?;
    let title = if args.broadcast {
        format!(
            "walcast load --broadcast: {} clients in {} rooms, {} messages/s — send→receive latency by send second",
            args.clients, args.rooms, args.rate
        )
    } else {
        format!(
            "walcast load: {} clients, {} changes/s, {} dealerships — latency per second",
            args.clients, args.rate, args.dealerships
        )
    };
    if !args.idle {
        report.write_svg(&svg_out, &title).map_err(|e| LoadError::Io(format!("writing {}: {e}", svg_out.display())))?;
        println!("  json: {}  svg: {}", json_out.display(), svg_out.display());
    } else {
        println!("  json: {}", json_out.display());
    }
    match failure {
        Some(first) => Err(LoadError::Failed(first)),
        None => Ok(()),
    }
}

/// `YYYYMMDDTHHMMSSZ` of a time.
fn utc_stamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// `--record-out`: a capture of the writes, from a slot of its own.
struct Recording {
    slot: String,
    path: PathBuf,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<crate::capture::RecordReport, crate::capture::RecordError>>,
}

impl Recording {
    /// Creates the slot (so every later write is in it) and starts recording.
    async fn start(
        db: &tokio_postgres::Client,
        url: &str,
        slot: &str,
        path: &std::path::Path,
    ) -> Result<Recording, LoadError> {
        db.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
            .await
            .map_err(LoadError::db("create the capture's replication slot"))?;
        let connection =
            tokio_postgres::Config::from_str(url).map_err(|e| LoadError::Config(format!("database URL: {e}")))?;
        let config = crate::replication::SourceConfig::new(
            connection,
            crate::replication::SlotOptions::new(slot, "supabase_realtime"),
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LoadError::Io(format!("creating {}: {e}", dir.display())))?;
        }
        let file =
            std::fs::File::create(path).map_err(|e| LoadError::Io(format!("creating {}: {e}", path.display())))?;
        let writer = std::io::BufWriter::with_capacity(1 << 20, file);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task =
            tokio::spawn(crate::capture::record(config, writer, crate::capture::RecordLimits::default(), stopped));
        Ok(Recording { slot: slot.to_owned(), path: path.to_owned(), stop, task })
    }

    /// Stops once the recorder has the last commit, then drops the slot.
    async fn stop(self, db: &tokio_postgres::Client) -> Result<(PathBuf, crate::capture::RecordReport), LoadError> {
        // The recorder acknowledges each commit it wrote: wait (bounded)
        // until it has acknowledged everything written so far.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let behind: Option<bool> = db
                .query_opt(
                    "select confirmed_flush_lsn < pg_current_wal_insert_lsn() - 4096 \
                     from pg_replication_slots where slot_name = $1",
                    &[&self.slot],
                )
                .await
                .ok()
                .flatten()
                .and_then(|row| row.get(0));
            if behind != Some(true) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.cancel();
        let report = match self.task.await {
            Ok(Ok(report)) => report,
            Ok(Err(err)) => return Err(LoadError::Io(format!("recording {}: {err}", self.path.display()))),
            Err(err) => return Err(LoadError::Io(format!("recording {}: {err}", self.path.display()))),
        };
        // The walsender lets go of the slot a moment after the stream ends.
        for _ in 0..100 {
            if db.execute("select pg_drop_replication_slot($1)", &[&self.slot]).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok((self.path, report))
    }
}

/// Everything a run holds that must be cleaned up.
struct Held {
    database: Option<Database>,
    relay: Option<RelayHandle>,
    slot: String,
}

/// Runs a load and returns its report and, when a check failed, the first
/// offending case. Cleans up on every path.
///
/// # Errors
/// Setup failures (database, relay, writes) — the checks' failures are in
/// the returned report instead.
pub async fn run(args: &LoadArgs) -> Result<(Report, Option<String>), LoadError> {
    let vsn = args.check()?;
    let mode = args.mode()?;
    let ids = Ids::random();
    let mut held = Held { database: None, relay: None, slot: format!("walcast_load_{}", ids.short()) };
    let result = run_held(args, vsn, &mode, ids, &mut held).await;
    if let Some(relay) = held.relay.take() {
        if let Err(err) = relay.stop().await {
            tracing::warn!(error = %err, "stopping the relay");
        }
    }
    if let Some(database) = held.database.take() {
        let slot = (!matches!(mode, RelayMode::External { .. })).then_some(held.slot.as_str());
        if let Err(err) = seed::cleanup(database, slot, args.keep, &ids).await {
            eprintln!("walcast load: clean-up: {err}");
        }
    }
    result
}

async fn run_held(
    args: &LoadArgs,
    vsn: Vsn,
    mode: &RelayMode,
    ids: Ids,
    held: &mut Held,
) -> Result<(Report, Option<String>), LoadError> {
    let mut report = Report::default();
    let mut notes = Vec::new();
    let schedule = if args.broadcast { Some(broadcast::check_args(args)?) } else { None };
    // 1. File descriptors: one per client here (and one per connection in
    // the relay, which is this process too when in-process).
    let per_side = u64::from(args.clients) + 256;
    let want = if *mode == RelayMode::InProc { 2 * per_side } else { per_side };
    let (soft, hard) = relay::raise_nofile(want);
    if soft < want {
        return Err(LoadError::Config(format!(
            "{} clients need about {want} file descriptors here, but RLIMIT_NOFILE is {soft} (hard {hard}): \
             raise the hard limit (`ulimit -Hn`, /etc/security/limits.conf, or run as root) or use fewer clients",
            args.clients
        )));
    }
    let secret =
        args.jwt_secret.clone().unwrap_or_else(|| format!("{:016x}{:016x}", ids::random_u64(), ids::random_u64()));
    let epoch = Instant::now();

    // 2. Database and seed.
    progress_note("preparing the database");
    let database = seed::prepare(args.database_url.as_deref(), args.relay_url.is_some(), &ids).await?;
    let url = database.url().to_owned();
    report.config.push(("database".into(), json!(database.describe())));
    held.database = Some(database);
    let world = World::generate(args.dealerships, args.users, args.live_orders, args.seed);
    let db = seed::connect(&url).await?;
    for setting in ["server_version", "synchronous_commit", "fsync", "wal_writer_delay"] {
        if let Ok(row) = db.query_one(&format!("show {setting}"), &[]).await {
            report.config.push((format!("pg_{setting}"), json!(row.get::<_, String>(0))));
        }
    }
    seed::seed(&db, &world, &ids).await?;

    // 3. Relay.
    progress_note("starting the relay");
    let relay_log = PathBuf::from("target").join("load").join(format!("relay-{}.log", ids.short()));
    // More clients than the default budgets of 249 addresses take: the relay
    // this run starts gets a per-address budget that fits them.
    let (_, per_source) = source_spread(args);
    let default_per_address = crate::realtime::Limits::default().max_sockets_per_address;
    let mut relay_args = args.relay_args.clone();
    if per_source > default_per_address {
        relay_args.push(format!("--max-sockets-per-address={per_source}"));
    }
    let relay = match mode {
        RelayMode::Process { exe } => {
            relay::spawn_child(&relay::ChildRelay {
                exe,
                database_url: &url,
                jwt_secret: &secret,
                slot: &held.slot,
                max_connections: args.clients as usize + 64,
                log: &relay_log,
                extra_args: &relay_args,
            })
            .await?
        }
        RelayMode::InProc => {
            let connection =
                tokio_postgres::Config::from_str(&url).map_err(|e| LoadError::Config(format!("database URL: {e}")))?;
            let slot = crate::replication::SlotOptions::new(&held.slot, "supabase_realtime");
            let relay = crate::relay::RelayConfig::new(crate::replication::SourceConfig::new(connection, slot));
            let auth =
                crate::realtime::auth::AuthConfig { jwt_secret: Some(secret.clone()), jwks: None, audience: None };
            let mut config = crate::server::ServeConfig::new(relay, auth);
            config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            config.limits.max_connections = args.clients as usize + 64;
            config.limits.max_sockets_per_address = per_source.max(default_per_address);
            let server = crate::server::Server::start(config).await.map_err(|e| LoadError::Relay(e.to_string()))?;
            RelayHandle::InProc(Box::new(server))
        }
        RelayMode::External { url } => {
            let (addr, path) = relay::parse_relay_url(url.split(',').next().unwrap_or(url).trim())?;
            RelayHandle::External { addr, path }
        }
    };
    let relay_pid = relay.pid();
    let (relay_addr, relay_path) = (relay.addr(), relay.path().to_owned());
    held.relay = Some(relay);
    report.config.push((
        "relay".into(),
        json!(match mode {
            RelayMode::Process { .. } =>
                format!("child process (pid {}), log {}", relay_pid.unwrap_or(0), relay_log.display()),
            RelayMode::InProc => "in-process".to_owned(),
            RelayMode::External { url } => format!("external {url}"),
        }),
    ));
    match mode {
        RelayMode::InProc => notes.push(
            "relay in-process: CPU and RSS are the whole load process's (relay + clients + writers), not separable"
                .to_owned(),
        ),
        RelayMode::External { .. } => notes.push("external relay: its CPU and RSS are not measured".to_owned()),
        RelayMode::Process { .. } => {}
    }
    let now = crate::realtime::session::now_unix();
    let token = |role: &str, sub: Option<uuid::Uuid>| {
        let mut claims = json!({"role": role, "iat": now, "exp": now + 6 * 3600, "aud": "authenticated"});
        if let Some(sub) = sub {
            claims["sub"] = json!(sub);
        }
        crate::realtime::auth::sign_hs256(secret.as_bytes(), &claims)
    };
    let endpoint = Endpoint::new(relay_addr, &relay_path, &token("anon", None), vsn);
    // Every relay the clients are spread over (one unless --relay-url
    // lists several).
    let endpoints: Vec<Endpoint> = match &mode {
        RelayMode::External { url } if url.contains(',') => url
            .split(',')
            .map(|u| relay::parse_relay_url(u.trim()).map(|(a, p)| Endpoint::new(a, &p, &token("anon", None), vsn)))
            .collect::<Result<_, _>>()?,
        _ => vec![endpoint.clone()],
    };

    // 4. Probe: each relay is streaming and has handled everything before.
    progress_note("probing the relay");
    for (k, endpoint) in endpoints.iter().enumerate() {
        let marker = u32::MAX - 1 - k as u32;
        let mut probe = Subscribed::connect(
            endpoint,
            None,
            "realtime:load-probe".into(),
            json!([{"event": "INSERT", "schema": "public", "table": "orders"}]),
            &token("service_role", None),
            PROBE_TIMEOUT,
        )
        .await
        .map_err(|e| LoadError::Relay(format!("probe subscription: {e}")))?;
        db.execute(
            "insert into public.orders (id, dealership_id, type, status, customer_info, created_by, metadata) \
             values ($1, $2, 'sales', 'draft', '{\"name\": \"probe\"}', $3, '{}')",
            &[
                &ids.uuid(Tag::Order, marker),
                &ids.uuid(Tag::Dealership, world.probe_dealership()),
                &ids.uuid(Tag::User, world.writer_user()),
            ],
        )
        .await
        .map_err(LoadError::db("insert the probe's marker order"))?;
        probe
            .wait_for_order(&ids, marker, PROBE_TIMEOUT)
            .await
            .map_err(|e| LoadError::Relay(format!("probe: the marker insert was not delivered: {e}")))?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = relay_pid.and_then(relay::proc_sample);
    let slab_before = relay::kernel_slab_kb();
    let self_before = relay::proc_sample(std::process::id());

    // 5. Clients.
    let shared = Arc::new(Shared {
        epoch,
        ids,
        latencies: Mutex::new(Latencies::default()),
        received: AtomicU64::new(0),
        writes_start_us: AtomicU64::new(u64::MAX),
    });
    if let Some(schedule) = schedule {
        // 5–8 of the broadcast mode: its own clients, sends and checks.
        let anon = token("anon", None);
        let target = broadcast::Target {
            addr: relay_addr,
            path: &relay_path,
            apikey: &anon,
            relay_pid,
            url: &url,
            slot: &held.slot,
        };
        let failure = broadcast::run(args, schedule, &target, shared, &mut report, &mut notes).await?;
        if let Some(f) = &failure {
            notes.push(format!("FAILED: {f}"));
        }
        report.passed = failure.is_none();
        report.notes = notes;
        report.config.extend([
            ("mode".to_owned(), json!("broadcast")),
            ("clients".to_owned(), json!(args.clients)),
            ("rooms".to_owned(), json!(args.rooms)),
            ("members_per_room".to_owned(), json!(f64::from(args.clients) / f64::from(args.rooms))),
            ("vsn".to_owned(), json!("half 1.0.0 (text pushes), half 2.0.0 (kind 3 binary pushes)")),
            ("broadcast_config".to_owned(), json!({"self": false, "ack": false, "private": false})),
            ("rate".to_owned(), json!(args.rate)),
            ("duration_secs".to_owned(), json!(args.duration)),
            ("messages".to_owned(), json!(schedule.messages)),
            ("payload_bytes".to_owned(), json!(args.payload_bytes)),
            ("source_addrs".to_owned(), json!(source_spread(args).0)),
            ("relay_args".to_owned(), json!(args.relay_args.join(" "))),
            ("nofile_limit".to_owned(), json!(soft)),
            ("cpus".to_owned(), json!(std::thread::available_parallelism().map_or(0, |n| n.get()))),
            ("walcast_version".to_owned(), json!(env!("CARGO_PKG_VERSION"))),
        ]);
        return Ok((report, failure));
    }
    let tokens: Vec<Arc<str>> =
        (0..args.users).map(|u| Arc::from(token("authenticated", Some(ids.uuid(Tag::User, u))).as_str())).collect();
    let (sources, _) = source_spread(args);
    let spread = relay_addr.ip().is_loopback() && relay_addr.is_ipv4();
    let mut rng = Rng::new(args.seed ^ 0xf1_17e5);
    let specs: Vec<ClientSpec> = (0..args.clients)
        .map(|i| ClientSpec {
            index: i,
            user: i % args.users,
            filtered: rng.unit() < args.filtered,
            token: tokens[(i % args.users) as usize].to_string(),
            source: spread.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8))),
        })
        .collect();
    // Subscribed sockets move to receiver threads (one per core): see
    // [`receiver`] for why not a task per client.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4);
    let receivers = Arc::new(
        Receivers::start(threads, &shared).map_err(|e| LoadError::Io(format!("start the receiver threads: {e}")))?,
    );
    let subscribed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let semaphore = Arc::new(Semaphore::new(args.connect_parallel));
    let subscribe_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.subscribe_timeout);
    let connect_start = Instant::now();
    let mut tasks = Vec::with_capacity(specs.len());
    let unique_topics = args.unique_topics;
    for spec in specs.iter().cloned() {
        let endpoint = endpoints[spec.index as usize % endpoints.len()].clone();
        let receivers = Arc::clone(&receivers);
        let (semaphore, subscribed, failed, first_failure) =
            (Arc::clone(&semaphore), Arc::clone(&subscribed), Arc::clone(&failed), Arc::clone(&first_failure));
        tasks.push(tokio::spawn(async move {
            let connected = async {
                let _permit = tokio::time::timeout_at(subscribe_deadline, semaphore.acquire_owned())
                    .await
                    .map_err(|_| "no connection slot before the subscribe deadline".to_owned())?
                    .map_err(|_| "closed".to_owned())?;
                let wait = subscribe_deadline.saturating_duration_since(tokio::time::Instant::now());
                Subscribed::connect(
                    &endpoint,
                    spec.source,
                    if unique_topics { format!("realtime:load-{}", spec.index) } else { "realtime:load".to_owned() },
                    client::load_bindings(spec.filtered),
                    &spec.token,
                    wait.min(Duration::from_secs(60)),
                )
                .await
            };
            match connected.await.and_then(|sub| receivers.add(sub.into_handoff(spec.index)?)) {
                Ok(()) => {
                    subscribed.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = first_failure.lock() {
                        first.get_or_insert_with(|| format!("client {} (user {}): {err}", spec.index, spec.user));
                    }
                }
            }
        }));
    }
    let monitor = Monitor::start(
        relay_pid,
        &url,
        &held.slot,
        Arc::clone(&shared),
        [Arc::clone(&subscribed), Arc::clone(&failed)],
        args.clients,
        "writes",
    )
    .await;
    let Joined { n_subscribed, n_failed, mut failure } = await_joins(
        &mut report,
        Joining {
            clients: args.clients,
            subscribed: &subscribed,
            failed: &failed,
            first_failure: &first_failure,
            deadline: subscribe_deadline,
            started: connect_start,
        },
        ["subscribed", "subscribe"],
    )
    .await;

    // 6a. Idle: RSS per connection.
    let mut ledger_outcome = None;
    let mut cpu_window = None;
    let mut own_window = None;
    if args.idle {
        monitor.phase("idle");
        tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
        let rss_after = relay_pid.and_then(relay::proc_sample);
        let slab_after = relay::kernel_slab_kb();
        let self_after = relay::proc_sample(std::process::id());
        let n = n_subscribed.max(1) as f64;
        if let (Some(b), Some(a)) = (rss_before, rss_after) {
            let per = (a.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / n;
            report.result(
                "relay_rss_before_kb",
                json!(b.rss_kb),
                format!("relay RSS before\u{0}{:.1} MB", b.rss_kb as f64 / 1024.0),
            );
            report.result(
                "relay_rss_after_kb",
                json!(a.rss_kb),
                format!(
                    "relay RSS after\u{0}{:.1} MB (peak {:.1} MB)",
                    a.rss_kb as f64 / 1024.0,
                    a.hwm_kb as f64 / 1024.0
                ),
            );
            report.result(
                "relay_rss_per_connection_bytes",
                json!(per),
                format!("relay RSS per connection\u{0}{per:.0} B ({:.2} KiB)", per / 1024.0),
            );
        }
        let slab = (slab_after.1 as f64 - slab_before.1 as f64) * 1024.0 / n;
        report.result(
            "kernel_sunreclaim_per_connection_bytes",
            json!(slab),
            format!("kernel SUnreclaim per conn\u{0}{slab:.0} B (system-wide: both socket ends, noisy)"),
        );
        if let (Some(b), Some(a)) = (self_before, self_after) {
            let per = (a.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / n;
            report.result(
                "loadgen_rss_per_connection_bytes",
                json!(per),
                format!("load generator RSS per conn\u{0}{per:.0} B"),
            );
        }
    } else {
        // 6b. Writes.
        monitor.phase("writing");
        let plan = writer::WritePlan {
            rate: args.rate,
            duration: Duration::from_secs_f64(args.duration),
            writers: args.writers,
            batch: args.batch,
            churn: args.churn,
            live_orders: args.live_orders,
            seed: args.seed,
        };
        let cpu0 = (Instant::now(), relay_pid.and_then(relay::proc_sample));
        let own0 = (relay::proc_sample(std::process::id()), relay::system_ticks());
        let walsender_pid = walsender_pid(&db, &held.slot).await;
        let wal0 = walsender_pid.and_then(relay::proc_sample);
        let recording = match &args.record_out {
            Some(path) => Some(Recording::start(&db, &url, &format!("{}_rec", held.slot), path).await?),
            None => None,
        };
        let outcome = writer::run(&url, &world, ids, &plan, &shared, &monitor.writes).await?;
        // Drain until every expected delivery arrived.
        monitor.phase("draining");
        let expectations = Expectations::compute(&world.members, &outcome.ledger, args.users as usize);
        let expected_total: u64 = specs.iter().map(|s| expectations.count(s.user, s.filtered) as u64).sum();
        let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
        while shared.received.load(Ordering::Relaxed) < expected_total && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(GRACE).await;
        if let Some(recording) = recording {
            let recorded = recording.stop(&db).await?;
            report.result(
                "recorded",
                json!({"file": recorded.0.display().to_string(), "transactions": recorded.1.transactions, "payload_bytes": recorded.1.bytes}),
                format!(
                    "capture\u{0}{} transactions, {:.1} MB in {}",
                    recorded.1.transactions,
                    recorded.1.bytes as f64 / 1e6,
                    recorded.0.display()
                ),
            );
        }
        let cpu1 = (Instant::now(), relay_pid.and_then(relay::proc_sample));
        let own1 = (relay::proc_sample(std::process::id()), relay::system_ticks());
        own_window = Some((cpu1.0 - cpu0.0, own0, own1));
        let wal1 = walsender_pid.and_then(relay::proc_sample);
        cpu_window = Some((cpu0, cpu1, wal0, wal1));
        ledger_outcome = Some((outcome, expectations));
    }

    // 7. Stop the clients and collect.
    monitor.phase("collecting");
    // The join tasks ended at their subscription (or its deadline).
    for mut task in tasks {
        if tokio::time::timeout(Duration::from_secs(30), &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
    let mut by_index: HashMap<u32, ClientOutcome> =
        tokio::task::spawn_blocking(move || receivers.stop()).await.unwrap_or_default().into_iter().collect();
    let mut outcomes: Vec<(ClientSpec, ClientOutcome)> =
        specs.into_iter().filter_map(|spec| by_index.remove(&spec.index).map(|o| (spec, o))).collect();
    let samples = monitor.stop().await;

    // 8. Checks.
    let leaks: u64 = outcomes.iter().map(|(_, o)| o.leaks).sum();
    let protocol: u64 = outcomes.iter().map(|(_, o)| o.protocol_errors).sum();
    let first_leak = outcomes
        .iter()
        .find_map(|(s, o)| o.first_leak.as_ref().map(|l| format!("client {} (user {}): {l}", s.index, s.user)));
    let first_protocol = outcomes.iter().find_map(|(s, o)| {
        o.first_protocol_error.as_ref().map(|l| format!("client {} (user {}): {l}", s.index, s.user))
    });
    let mut passed = n_failed == 0 && leaks == 0 && protocol == 0;
    if let Some((outcome, expectations)) = ledger_outcome {
        let writes: u64 = outcome.counts.iter().sum();
        let elapsed = outcome.elapsed.as_secs_f64().max(1e-9);
        report.result(
            "writes",
            json!({"total": writes, "inserts": outcome.counts[0], "status_updates": outcome.counts[1], "moves": outcome.counts[2], "deletes": outcome.counts[3], "grants": outcome.churn[0], "revokes": outcome.churn[1], "skipped_ticks": outcome.skipped, "rate_per_sec": writes as f64 / elapsed, "transactions": outcome.transactions}),
            format!(
                "writes\u{0}{writes} in {} transactions in {elapsed:.1} s ({:.0}/s): {} inserts, {} status, {} moves, {} deletes; churn {} grants, {} revokes",
                outcome.transactions,
                writes as f64 / elapsed,
                outcome.counts[0],
                outcome.counts[1],
                outcome.counts[2],
                outcome.counts[3],
                outcome.churn[0],
                outcome.churn[1]
            ),
        );
        let lag = Quantiles::of(&outcome.schedule_lag);
        report.result(
            "schedule_lag",
            json!({"p99_ms": lag.p99, "max_ms": lag.max}),
            format!(
                "writer schedule lag\u{0}p99 {:.1} ms, max {:.1} ms (open loop: how late writes were issued)",
                lag.p99, lag.max
            ),
        );
        if lag.p99 > 100.0 {
            notes.push(format!(
                "the writers fell behind the offered rate (schedule lag p99 {:.0} ms): the database side limited this run",
                lag.p99
            ));
        }
        // DELETE events: write→receive from the ledger's time of that write.
        let start_us = shared.writes_start_us.load(Ordering::Relaxed);
        let mut last_recv_us = 0u64;
        if let Ok(mut latencies) = shared.latencies.lock() {
            for (_, o) in &outcomes {
                for d in &o.received {
                    last_recv_us = last_recv_us.max(u64::from(d.recv_us));
                    if d.table == Table::Orders && d.event == Event::Delete {
                        if let Some(&t) = expectations.write_time.get(&(d.key, d.seq)) {
                            let recv = u64::from(d.recv_us);
                            let second = recv.saturating_sub(start_us) / 1_000_000;
                            latencies.record_write(second as usize, recv.saturating_sub(t));
                        }
                    }
                }
            }
        }
        let records: Vec<ClientRecord> = outcomes
            .iter_mut()
            .map(|(s, o)| ClientRecord {
                client: s.index,
                user: s.user,
                filtered: s.filtered,
                received: std::mem::take(&mut o.received),
            })
            .collect();
        // Clients that never subscribed are not judged (they already fail the run).
        let verdict = oracle::check(&expectations, &records);
        let window = (last_recv_us.saturating_sub(start_us)) as f64 / 1e6;
        let rate = verdict.received as f64 / window.max(1e-3);
        report.result(
            "deliveries",
            json!({"expected": verdict.expected, "received": verdict.received, "correct": verdict.correct, "per_sec": rate, "window_secs": window}),
            format!(
                "deliveries\u{0}{} received of {} expected ({} correct); {rate:.0}/s over {window:.1} s",
                verdict.received, verdict.expected, verdict.correct
            ),
        );
        if let Ok(latencies) = shared.latencies.lock() {
            report.latency("commit_to_receive", "commit→receive", Quantiles::of(&latencies.commit));
            report.latency("write_to_receive", "write-call→receive", Quantiles::of(&latencies.write));
            if !latencies.socket.is_empty() {
                report.latency(
                    "commit_to_socket",
                    "commit→socket (until the frame reached the client's socket: the database's and the relay's part)",
                    Quantiles::of(&latencies.socket),
                );
            }
            report.set_seconds(&latencies);
        }
        notes.push("commit→receive uses commit_timestamp truncated to the ms: each value is 0–1 ms high".into());
        if let Some(((t0, Some(c0)), (t1, Some(c1)), w0, w1)) = cpu_window {
            let wall = t1 - t0;
            let pct = relay::cpu_pct(c0, c1, wall);
            let cpu_secs = (c1.ticks - c0.ticks) as f64 / relay::ticks_per_second();
            let millions = verdict.received.max(1) as f64 / 1e6;
            let per_million = cpu_secs / millions;
            let switches = c1.voluntary_switches.saturating_sub(c0.voluntary_switches) as f64 / millions;
            report.result(
                "relay_cpu",
                json!({"pct_of_one_core": pct, "cpu_secs": cpu_secs, "cpu_secs_per_million_deliveries": per_million, "voluntary_switches_per_million_deliveries": switches, "wall_secs": wall.as_secs_f64()}),
                format!("relay CPU\u{0}{pct:.0}% of one core over {:.1} s ({cpu_secs:.2} CPU-s; {per_million:.1} CPU-s and {switches:.0} voluntary context switches per 1M deliveries)", wall.as_secs_f64()),
            );
            report.result(
                "relay_rss_kb",
                json!({"current": c1.rss_kb, "peak": c1.hwm_kb}),
                format!(
                    "relay RSS\u{0}{:.1} MB now, peak {:.1} MB",
                    c1.rss_kb as f64 / 1024.0,
                    c1.hwm_kb as f64 / 1024.0
                ),
            );
            if let (Some(w0), Some(w1)) = (w0, w1) {
                let pct = relay::cpu_pct(w0, w1, wall);
                report.result("walsender_cpu_pct", json!(pct), format!("walsender CPU\u{0}{pct:.0}% of one core"));
            }
        }
        if let Some((wall, (Some(a), s0), (Some(b), s1))) = own_window {
            let pct = relay::cpu_pct(a, b, wall);
            let busy = s1.0.saturating_sub(s0.0) as f64;
            let total = s1.1.saturating_sub(s0.1).max(1) as f64;
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let machine = 100.0 * busy / total * cpus;
            let millions = verdict.received.max(1) as f64 / 1e6;
            let own_per_million = b.ticks.saturating_sub(a.ticks) as f64 / relay::ticks_per_second() / millions;
            report.result(
                "cpu_breakdown",
                json!({"load_generator_pct": pct, "load_generator_cpu_secs_per_million_deliveries": own_per_million, "machine_busy_pct": machine, "cpus": cpus}),
                format!(
                    "load generator CPU\u{0}{pct:.0}% of one core, {own_per_million:.1} CPU-s per 1M deliveries (machine busy {machine:.0}% of {cpus:.0} cores = {:.0}% of capacity)",
                    machine / cpus
                ),
            );
        }
        let lags: Vec<i64> = samples.iter().filter_map(|s| s.slot_lag_bytes).collect();
        if let Some(max) = lags.iter().max() {
            report.result(
                "slot_lag_bytes",
                json!({"max": max, "last": lags.last()}),
                format!("slot lag (1 s samples)\u{0}max {} B, last {} B", max, lags.last().copied().unwrap_or(0)),
            );
        }
        report.result(
            "checks",
            json!({"leaks": verdict.leaks + leaks, "duplicates": verdict.duplicates, "missing": verdict.missing, "out_of_order": verdict.out_of_order, "protocol_errors": protocol, "subscribe_failures": n_failed}),
            format!(
                "checks\u{0}leaks {}, duplicates {}, missing {}, out of order {}, protocol errors {protocol}, subscribe failures {n_failed}",
                verdict.leaks + leaks,
                verdict.duplicates,
                verdict.missing,
                verdict.out_of_order
            ),
        );
        passed &= verdict.passed();
        if failure.is_none() {
            failure = verdict.first.first().map(|f| describe(f, &ids));
        }
        for f in &verdict.first {
            notes.push(format!("first {}: {}", f.kind.as_str(), describe(f, &ids)));
        }
    } else {
        report.result(
            "checks",
            json!({"leaks": leaks, "protocol_errors": protocol, "subscribe_failures": n_failed}),
            format!("checks\u{0}leaks {leaks}, protocol errors {protocol}, subscribe failures {n_failed}"),
        );
    }
    if failure.is_none() {
        failure = first_leak.map(|l| format!("leak: {l}")).or_else(|| first_protocol.map(|p| format!("protocol: {p}")));
    }
    if let Some(f) = &failure {
        notes.push(format!("FAILED: {f}"));
    }
    report.passed = passed && failure.is_none();
    report.samples = samples;
    report.notes = notes;
    report.config.extend([
        ("clients".to_owned(), json!(args.clients)),
        ("users".to_owned(), json!(args.users)),
        ("dealerships".to_owned(), json!(args.dealerships)),
        ("vsn".to_owned(), json!(args.vsn)),
        ("filtered_fraction".to_owned(), json!(args.filtered)),
        ("mode".to_owned(), json!(if args.idle { "idle" } else { "writes" })),
        ("rate".to_owned(), json!(args.rate)),
        ("duration_secs".to_owned(), json!(args.duration)),
        ("writers".to_owned(), json!(args.writers)),
        ("batch".to_owned(), json!(args.batch)),
        ("churn_per_sec".to_owned(), json!(args.churn)),
        ("live_orders".to_owned(), json!(args.live_orders)),
        ("seed".to_owned(), json!(args.seed)),
        ("source_addrs".to_owned(), json!(sources)),
        ("unique_topics".to_owned(), json!(args.unique_topics)),
        ("relay_args".to_owned(), json!(args.relay_args.join(" "))),
        ("nofile_limit".to_owned(), json!(soft)),
        ("cpus".to_owned(), json!(std::thread::available_parallelism().map_or(0, |n| n.get()))),
        ("walcast_version".to_owned(), json!(env!("CARGO_PKG_VERSION"))),
    ]);
    let failure = if report.passed { None } else { Some(failure.unwrap_or_else(|| "a check failed".into())) };
    Ok((report, failure))
}

/// One failure, for people.
fn describe(f: &oracle::Failure, ids: &Ids) -> String {
    let row = match f.table {
        Table::Orders => format!("order {} ({})", f.key, ids.uuid(Tag::Order, f.key)),
        Table::Memberships => format!("membership {} ({})", f.key, ids.uuid(Tag::Membership, f.key)),
    };
    let shown = |d: Option<oracle::Delivery>| d.map_or_else(|| "nothing".to_owned(), |d| d.to_string());
    format!(
        "{}: client {} (user {} = {}), {row}: expected {}, got {}",
        f.kind.as_str(),
        f.client,
        f.user,
        ids.uuid(Tag::User, f.user),
        shown(f.expected),
        shown(f.got)
    )
}

async fn walsender_pid(db: &tokio_postgres::Client, slot: &str) -> Option<u32> {
    let row = db
        .query_opt("select active_pid from pg_replication_slots where slot_name = $1", &[&slot])
        .await
        .ok()
        .flatten()?;
    row.get::<_, Option<i32>>(0).and_then(|p| u32::try_from(p).ok())
}

fn progress_note(what: &str) {
    eprintln!("walcast load: {what} …");
}

/// Samples every second and prints the progress line.
struct Monitor {
    writes: Arc<AtomicU64>,
    phase: watch::Sender<&'static str>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Monitor {
    /// Starts sampling; `joined` counts the clients subscribed and failed,
    /// `sends_label` names what [`Monitor::writes`] counts on the progress line.
    async fn start(
        pid: Option<u32>,
        url: &str,
        slot: &str,
        shared: Arc<Shared>,
        joined: [Arc<AtomicU64>; 2],
        clients: u32,
        sends_label: &'static str,
    ) -> Monitor {
        let [subscribed, failed] = joined;
        let writes = Arc::new(AtomicU64::new(0));
        let (phase, mut phase_rx) = watch::channel("connecting");
        let db = seed::connect(url).await.ok();
        let slot = slot.to_owned();
        let counter = Arc::clone(&writes);
        let task = tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            let mut last = (Instant::now(), pid.and_then(relay::proc_sample), 0u64, 0u64);
            let mut walsender: Option<u32> = None;
            let mut wal_last: Option<ProcSample> = None;
            let mut n = 0u64;
            loop {
                tokio::select! {
                    biased;
                    changed = phase_rx.changed() => {
                        if changed.is_err() || *phase_rx.borrow() == "stop" {
                            break;
                        }
                        continue;
                    }
                    _ = ticker.tick() => {}
                }
                n += 1;
                let now = Instant::now();
                let proc_now = pid.and_then(relay::proc_sample);
                let wall = now - last.0;
                let cpu = match (last.1, proc_now) {
                    (Some(a), Some(b)) => Some(relay::cpu_pct(a, b, wall)),
                    _ => None,
                };
                let (mut lag, mut wal_cpu) = (None, None);
                if let Some(db) = &db {
                    if let Ok(Some(row)) = db
                        .query_opt(
                            "select pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8, active_pid \
                             from pg_replication_slots where slot_name = $1",
                            &[&slot],
                        )
                        .await
                    {
                        lag = row.get::<_, Option<i64>>(0);
                        walsender = row.get::<_, Option<i32>>(1).and_then(|p| u32::try_from(p).ok());
                    }
                    let wal_now = walsender.and_then(relay::proc_sample);
                    if let (Some(a), Some(b)) = (wal_last, wal_now) {
                        wal_cpu = Some(relay::cpu_pct(a, b, wall));
                    }
                    wal_last = wal_now;
                }
                let writes = counter.load(Ordering::Relaxed);
                let deliveries = shared.received.load(Ordering::Relaxed);
                let start = shared.writes_start_us.load(Ordering::Relaxed);
                let now_us = shared.now_us();
                let t_s = if start == u64::MAX { -0.0 } else { (now_us as f64 - start as f64) / 1e6 };
                let p99 = if start == u64::MAX {
                    None
                } else {
                    let second = (now_us.saturating_sub(start) / 1_000_000) as usize;
                    shared.latencies.lock().ok().and_then(|l| {
                        second.checked_sub(1).and_then(|s| l.seconds.get(s)).map(|s| Quantiles::of(&s.commit).p99)
                    })
                };
                let secs = wall.as_secs_f64().max(1e-3);
                let phase_name = *phase_rx.borrow();
                let line = format!(
                    "[{phase_name} {t_s:.0}s] subscribed {}/{clients}{}  {sends_label} {writes} ({:.0}/s)  deliveries {deliveries} ({:.0}/s){}{}{}",
                    subscribed.load(Ordering::Relaxed),
                    match failed.load(Ordering::Relaxed) { 0 => String::new(), f => format!(" ({f} failed)") },
                    (writes - last.2) as f64 / secs,
                    (deliveries - last.3) as f64 / secs,
                    p99.map_or(String::new(), |p| format!("  commit→recv p99 {p:.1} ms")),
                    match (cpu, proc_now) {
                        (Some(c), Some(p)) => format!("  relay cpu {c:.0}% rss {:.0} MB", p.rss_kb as f64 / 1024.0),
                        _ => String::new(),
                    },
                    lag.map_or(String::new(), |l| format!("  slot lag {l} B")),
                );
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else if n % 5 == 0 {
                    eprintln!("{line}");
                }
                samples.push(Sample {
                    t_s,
                    writes,
                    deliveries,
                    relay_cpu_pct: cpu,
                    relay_rss_kb: proc_now.map(|p| p.rss_kb),
                    walsender_cpu_pct: wal_cpu,
                    slot_lag_bytes: lag,
                });
                last = (now, proc_now, writes, deliveries);
            }
            if tty {
                eprintln!();
            }
            samples
        });
        Monitor { writes, phase, task }
    }

    fn phase(&self, phase: &'static str) {
        let _ = self.phase.send(phase);
    }

    async fn stop(self) -> Vec<Sample> {
        let _ = self.phase.send("stop");
        self.task.await.unwrap_or_default()
    }
}

/// The clients' joins under way: what [`await_joins`] watches.
pub(crate) struct Joining<'a> {
    clients: u32,
    subscribed: &'a AtomicU64,
    failed: &'a AtomicU64,
    first_failure: &'a Mutex<Option<String>>,
    deadline: tokio::time::Instant,
    started: Instant,
}

/// How the joins ended.
pub(crate) struct Joined {
    n_subscribed: u64,
    n_failed: u64,
    /// Why the run fails (some clients did not join), if it does.
    failure: Option<String>,
}

/// Waits until every client joined or failed (or the deadline), then
/// reports the count and the time; `words` are the participle and the
/// verb of the report (`["subscribed", "subscribe"]`, `["joined", "join"]`).
pub(crate) async fn await_joins(report: &mut Report, j: Joining<'_>, words: [&str; 2]) -> Joined {
    let [done_word, verb] = words;
    loop {
        let done = j.subscribed.load(Ordering::Relaxed) + j.failed.load(Ordering::Relaxed);
        if done >= u64::from(j.clients) || tokio::time::Instant::now() >= j.deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = j.started.elapsed().as_secs_f64();
    let n_subscribed = j.subscribed.load(Ordering::Relaxed);
    let n_failed = u64::from(j.clients) - n_subscribed;
    report.result(
        "clients_subscribed",
        json!(n_subscribed),
        format!(
            "clients {done_word}\u{0}{n_subscribed} of {} in {secs:.1} s ({:.0}/s){}",
            j.clients,
            n_subscribed as f64 / secs.max(1e-3),
            if n_failed > 0 { format!("; {n_failed} failed") } else { String::new() }
        ),
    );
    report.result("subscribe_secs", json!(secs), format!("{verb} time\u{0}{secs:.2} s"));
    let failure = (n_failed > 0).then(|| {
        let first = j.first_failure.lock().ok().and_then(|f| f.clone()).unwrap_or_else(|| "timed out".into());
        format!("{n_failed} of {} clients did not {verb}; first: {first}", j.clients)
    });
    Joined { n_subscribed, n_failed, failure }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_696_530);
        assert_eq!(utc_stamp(t), "20261126T123530Z");
        assert_eq!(utc_stamp(std::time::UNIX_EPOCH), "19700101T000000Z");
    }

    #[test]
    fn clients_are_spread_within_the_default_per_address_budget() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadArgs,
        }
        let spread = |flags: &[&str]| {
            let cli = <Cli as clap::Parser>::parse_from(std::iter::once("load").chain(flags.iter().copied()));
            source_spread(&cli.args)
        };
        let budget = crate::realtime::Limits::default().max_sockets_per_address;
        assert_eq!(spread(&["--clients", "10"]), (1, 10));
        assert_eq!(spread(&["--clients", "2000"]), (2, 1000));
        assert_eq!(spread(&["--clients", "19700"]), (20, 985));
        assert!(spread(&["--clients", "200000"]).1 <= budget);
        // Past 249 addresses the relay needs a larger budget (the run gives it one).
        assert_eq!(spread(&["--clients", "300000"]), (249, 1205));
        assert_eq!(spread(&["--clients", "100", "--source-addrs", "7"]), (7, 15));
    }
}
