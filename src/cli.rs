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
    /// Serve realtime changes over WebSocket (the default command).
    ///
    /// With --database-url: stream that database's publication. Without it:
    /// start the embedded PostgreSQL in --data-dir, apply the schema, load
    /// demo data, run a demo writer, and serve the dashboard at /.
    Serve(ServeArgs),
    /// Apply the SQL schema (sql/) to a database.
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
    },
    /// Load-test the relay end to end and check every delivery against RLS.
    ///
    /// Starts PostgreSQL (or uses --database-url) and the relay (a child
    /// process by default), connects --clients WebSocket clients, writes
    /// --rate order changes/s, and checks completeness, order and leaks.
    Load(walcast::load::LoadArgs),
}

/// `walcast serve` flags.
#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// PostgreSQL URL or key=value connection string (a role with REPLICATION);
    /// without it, the embedded demo runs.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Replication slot (created when missing; kept across restarts).
    #[arg(long, env = "SLOT_NAME", default_value = "walcast")]
    slot: String,
    /// Publication to stream.
    #[arg(long, env = "PUBLICATION", default_value = "supabase_realtime")]
    publication: String,
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    host: std::net::IpAddr,
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    port: u16,
    /// HS256 secret of the JWTs (Supabase's JWT secret).
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// JWKS for RS256/ES256 tokens: a file path or the JSON itself.
    #[arg(long, env = "API_JWT_JWKS", hide_env_values = true)]
    jwks: Option<String>,
    /// Policy rules (JSON, see docs); default: the rules of sql/.
    #[arg(long, env = "WALCAST_POLICY")]
    policy: Option<PathBuf>,
    /// Most open sockets.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Most channels per socket.
    #[arg(long, env = "MAX_CHANNELS_PER_CLIENT", default_value_t = 100)]
    max_channels: usize,
    /// Data directory of the embedded PostgreSQL (demo mode).
    #[arg(long, default_value = ".walcast/postgres", env = "WALCAST_DATA_DIR")]
    data_dir: PathBuf,
    /// Seconds between demo writer steps; 0 turns the writer off (demo mode).
    #[arg(long, default_value_t = 2.0)]
    demo_writer_secs: f64,
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
        let connection = tokio_postgres::Config::from_str(&self.database_url)
            .map_err(|_| anyhow::anyhow!("--database-url is not a valid PostgreSQL URL or connection string"))?;
        let mut slot = walcast::replication::SlotOptions::new(&self.slot, &self.publication);
        slot.proto_version = self.proto_version;
        slot.streaming = self.streaming;
        Ok(walcast::replication::SourceConfig::new(connection, slot))
    }
}

/// Installs the global tracing subscriber (`RUST_LOG`, default `info`).
pub(crate) fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the parsed command.
pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve(cli.serve)) {
        Command::Serve(args) => serve(args).await,
        Command::Migrate { database_url, dir, data_dir } => {
            let migrations = match dir {
                Some(dir) => Migrations::from_dir(&dir)?,
                None => Migrations::embedded(),
            };
            match database_url {
                Some(url) => migrate(&url, &migrations).await,
                None => {
                    let dir = data_dir.clone();
                    let mut cluster =
                        tokio::task::spawn_blocking(move || Cluster::start(ClusterConfig::persistent(dir)))
                            .await?
                            .with_context(|| format!("starting the embedded PostgreSQL in {}", data_dir.display()))?;
                    println!(
                        "embedded PostgreSQL {} in {} (port {})",
                        cluster.version(),
                        data_dir.display(),
                        cluster.port()
                    );
                    ensure_database(&cluster.url("postgres"), "walcast").await?;
                    let result = migrate(&cluster.url("walcast"), &migrations).await;
                    tokio::task::spawn_blocking(move || cluster.stop()).await??;
                    result
                }
            }
        }
        Command::Record { source, out, max_transactions, duration_secs } => {
            record(source, out, max_transactions, duration_secs).await
        }
        Command::Replay { file, pace, json } => {
            let pace = match pace {
                PaceArg::Fastest => walcast::capture::Pace::Fastest,
                PaceArg::Recorded => walcast::capture::Pace::Recorded,
            };
            tokio::task::spawn_blocking(move || replay(&file, pace, json)).await?
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

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use std::str::FromStr;
    let policy = match &args.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing the policy file {}", path.display()))?
        }
        None => walcast::policy::PolicyConfig::default(),
    };
    let Some(url) = args.database_url.clone() else {
        return serve_demo(args, policy).await;
    };
    let connection = tokio_postgres::Config::from_str(&url)
        .map_err(|_| anyhow::anyhow!("--database-url is not a valid PostgreSQL URL or connection string"))?;
    let auth = walcast::realtime::auth::AuthConfig { jwt_secret: args.jwt_secret.clone(), jwks: args.jwks.clone() };
    let config = serve_config(&args, connection, policy, auth);
    let server = walcast::server::Server::start(config).await?;
    println!("walcast serving on ws://{}/realtime/v1/websocket", server.local_addr());
    server.run_until(shutdown_signal()).await?;
    Ok(())
}

fn serve_config(
    args: &ServeArgs,
    connection: tokio_postgres::Config,
    policy: walcast::policy::PolicyConfig,
    auth: walcast::realtime::auth::AuthConfig,
) -> walcast::server::ServeConfig {
    let slot = walcast::replication::SlotOptions::new(&args.slot, &args.publication);
    let mut relay = walcast::relay::RelayConfig::new(walcast::replication::SourceConfig::new(connection, slot));
    relay.policy = policy;
    let mut config = walcast::server::ServeConfig::new(relay, auth);
    config.listen = std::net::SocketAddr::new(args.host, args.port);
    config.limits.max_connections = args.max_connections;
    config.limits.max_channels = args.max_channels;
    config
}

/// The one-command demo: embedded PostgreSQL, schema, demo data, writer, dashboard.
async fn serve_demo(args: ServeArgs, policy: walcast::policy::PolicyConfig) -> anyhow::Result<()> {
    use std::str::FromStr;
    let writer_interval =
        (args.demo_writer_secs > 0.0).then(|| std::time::Duration::from_secs_f64(args.demo_writer_secs));
    let demo_config = walcast::demo::DemoConfig { data_dir: args.data_dir.clone(), writer_interval };
    println!("starting the embedded PostgreSQL in {} …", args.data_dir.display());
    let demo = walcast::demo::start(&demo_config).await?;
    println!(
        "embedded PostgreSQL {} on port {}; schema and demo data loaded",
        demo.cluster.version(),
        demo.cluster.port()
    );
    let connection = tokio_postgres::Config::from_str(&demo.database_url)
        .map_err(|_| anyhow::anyhow!("the embedded database URL is not valid"))?;
    let auth = walcast::realtime::auth::AuthConfig { jwt_secret: Some(demo.jwt_secret.clone()), jwks: None };
    let mut config = serve_config(&args, connection, policy, auth);
    config.demo_json = Some(serde_json::to_vec(&demo.info)?.into());
    let server = match walcast::server::Server::start(config).await {
        Ok(server) => server,
        Err(err) => {
            let _ = demo.stop().await;
            return Err(err.into());
        }
    };
    let (stop_writer, writer_shutdown) = tokio::sync::watch::channel(false);
    let writer = demo.spawn_writer(writer_shutdown);
    let port = server.local_addr().port();
    println!();
    println!("  dashboard:  http://127.0.0.1:{port}/");
    println!("  websocket:  ws://127.0.0.1:{port}/realtime/v1/websocket?apikey=<anon key>&vsn=2.0.0");
    println!("  supabase-js: createClient('http://127.0.0.1:{port}', '<anon key>')");
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
    let result = server.run_until(shutdown_signal()).await;
    let _ = stop_writer.send(true);
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
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
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "database connection ended");
        }
    });
    Ok(client)
}

async fn ensure_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let client = connect(admin_url).await?;
    let exists = client.query_opt("select 1 from pg_database where datname = $1", &[&name]).await?.is_some();
    if !exists {
        client.batch_execute(&format!("create database {name}")).await?;
    }
    Ok(())
}

async fn migrate(url: &str, migrations: &Migrations) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    let report = schema::migrate(&mut client, migrations).await?;
    for name in &report.applied {
        println!("applied   {name}");
    }
    println!("schema up to date: {} applied now, {} already applied", report.applied.len(), report.unchanged.len());
    Ok(())
}
