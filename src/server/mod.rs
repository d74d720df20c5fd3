//! `walcast serve`: the whole relay — replication → change stage → hub →
//! WebSocket sessions — started and stopped in order.
//!
//! ```text
//!  Server::start: verifier (config errors first) → preflight (SQL: connect,
//!                 membership table readable, does the slot exist?) → catalog
//!                 (SQL) → Relay::start (slot created if missing, memberships
//!                 loaded, streaming) → bind → slot watchdog, monitor → accept
//!                 loop, Broadcast from Database's delivery stage and partition
//!                 keeper; a failure after the preflight drops the slot if this
//!                 start created it
//!  Server::shutdown: watchdog aborted → stop accepting → sockets closed with
//!                 1001 (queues drained, deadline) → replication stopped with
//!                 a final standby status update → hub and stages joined
//! ```
//!
//! One stop signal: the front and every session wait on one
//! `CancellationToken`, the relay's stages on another (cancelled after the
//! sockets closed); the front waits for its connections on a `TaskTracker`.
//! Nothing polls.
//!
//! The listener binds only after the relay streams, so a client that can
//! connect gets every change committed after its "Subscribed to PostgreSQL".
//!
//! A failed start leaves nothing behind: every check that needs no slot runs
//! before the relay creates one, and a slot this start created is dropped
//! when a later step fails (else it would hold WAL until someone drops it).
//! A slot that existed before the start is never dropped. "Created by this
//! start" means missing at the preflight; a second walcast creating the same
//! slot in between is not told apart, but its slot is active, and an active
//! slot is not dropped (the drop gives up after [`SLOT_DROP_WAIT`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::http::{self, HttpContext};
use crate::monitor::watchdog::{self, SlotWatch};
use crate::monitor::{Monitor, MonitorConfig};
use crate::pgconn::{ConnectError, PgConfig};
use crate::realtime::auth::{AuthConfig, Verifier};
use crate::realtime::authorize::Authorizer;
use crate::realtime::catalog::Catalog;
use crate::realtime::messages;
use crate::realtime::rooms::LocalRooms;
use crate::realtime::{Limits, RealtimeError, SessionContext};
use crate::relay::{Relay, RelayConfig, RelayError};
use crate::scaleout::rooms::ClusterRooms;

/// Everything `walcast serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Replication, policy and hub settings.
    pub relay: RelayConfig,
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// JWT keys.
    pub auth: AuthConfig,
    /// Socket limits.
    pub limits: Limits,
    /// `/demo.json`, served in demo mode; when set, `/demo/orders` is served
    /// too, reading as the relay's database user (see [`http::DemoEndpoints`]).
    pub demo_json: Option<Bytes>,
    /// `/ready` thresholds and the slot watchdog.
    pub monitoring: MonitorConfig,
    /// Cluster mode (`--nats-url`): Broadcast and Presence shared with the
    /// other nodes over NATS; `None`: this node alone.
    pub cluster: Option<crate::scaleout::ClusterSettings>,
}

impl ServeConfig {
    /// Defaults around a relay configuration: port 4000 on all interfaces.
    pub fn new(relay: RelayConfig, auth: AuthConfig) -> ServeConfig {
        ServeConfig {
            relay,
            listen: SocketAddr::from(([0, 0, 0, 0], 4000)),
            auth,
            limits: Limits::default(),
            demo_json: None,
            monitoring: MonitorConfig::default(),
            cluster: None,
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The relay failed.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// The realtime layer failed.
    #[error(transparent)]
    Realtime(#[from] RealtimeError),
    /// The first connection failed (names the server, the user and why).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Cluster mode could not start.
    #[error(transparent)]
    Scaleout(#[from] crate::scaleout::ScaleoutError),
    /// The source role stopped on a definite error (the message names the
    /// fix).
    #[error("{0}")]
    Source(String),
    /// A start-up query failed.
    #[error("{what} failed: {}", crate::pgconn::cause(.error))]
    Database {
        /// What was being done.
        what: &'static str,
        /// The error (its message is in ours, so it is no `source`).
        error: tokio_postgres::Error,
    },
}

/// How long a failed start waits for its own walsender to release the slot
/// it created before dropping it.
pub const SLOT_DROP_WAIT: Duration = Duration::from_secs(10);

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    /// The one stop signal of the front and every session.
    shutdown: CancellationToken,
    http: JoinHandle<()>,
    relay: Relay,
    /// Cluster mode: this node's roles.
    node: Option<ClusterNode>,
    sessions: Arc<SessionContext>,
    monitor: Arc<Monitor>,
    /// The slot watchdog (best effort: aborted at shutdown).
    watchdog: Option<JoinHandle<()>>,
    /// Broadcast from Database's delivery stage (ends when the relay's
    /// change stage does).
    db_broadcast: JoinHandle<()>,
    /// The `realtime.messages` partition keeper (ends at shutdown).
    partitions: JoinHandle<()>,
}

impl Server {
    /// Starts everything; returns once clients can connect. Broadcast from
    /// Database is always on: the `walcast_messages` publication is streamed
    /// when it exists (see [`crate::realtime::messages`]), its rows go to
    /// the rooms, and the `realtime.messages` partitions are kept.
    ///
    /// # Errors
    /// Bad auth configuration, PostgreSQL unreachable, replication errors,
    /// or the port in use.
    pub async fn start(mut config: ServeConfig) -> Result<Server, ServeError> {
        // Every connection the server makes (preflight, catalog, watchdog,
        // relay) gets the same kernel-level liveness settings.
        config.relay.source.apply_tcp_liveness();
        let verifier = Verifier::new(&config.auth).map_err(RealtimeError::from)?;
        let connection = config.relay.source.connection.clone();
        let slot = config.relay.source.slot.slot.clone();
        let slot_existed = preflight(&config).await?;
        let cluster = config.cluster.is_some();
        // Boxed: the start is a large future, and it runs once.
        let result = Box::pin(Server::start_checked(config, verifier)).await;
        // A cluster's slot belongs to whichever source leads: never dropped
        // by a node's failed start.
        if result.is_err() && !slot_existed && !cluster {
            drop_created_slot(&connection, &slot).await;
        }
        result
    }

    /// [`Server::start`] after the preflight.
    async fn start_checked(config: ServeConfig, verifier: Verifier) -> Result<Server, ServeError> {
        let catalog =
            Catalog::load(config.relay.source.connection.clone(), &config.relay.source.slot.publications).await?;
        let mut relay_config = config.relay.clone();
        let optional = &mut relay_config.source.slot.optional_publications;
        if !optional.iter().any(|p| p == messages::PUBLICATION) {
            optional.push(messages::PUBLICATION.to_owned());
        }
        let (messages_tx, messages_rx) = mpsc::channel(crate::relay::messages::QUEUE);
        let (relay, node) = match &config.cluster {
            None => {
                relay_config.messages = Some(messages_tx);
                (Relay::start(relay_config).await?, None)
            }
            Some(settings) => Box::pin(start_cluster_node(settings, relay_config, messages_tx)).await?,
        };
        let listener = match TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(source) => {
                let _ = relay.stop().await;
                return Err(RealtimeError::Bind { addr: config.listen, source }.into());
            }
        };
        let addr = listener.local_addr().map_err(|source| RealtimeError::Bind { addr: config.listen, source })?;
        let shutdown = CancellationToken::new();
        let authorizer = Arc::new(Authorizer::new(&config.relay.source.connection));
        let mut sessions = SessionContext::new(verifier, Arc::new(catalog), relay.hub.clone(), config.limits)
            .with_authorizer(authorizer);
        let mut cluster = None;
        // Broadcast from Database: on one node, through the rooms; in a
        // cluster every edge reads the rows from the stream, so only to its
        // own members.
        let mut db_rooms: Option<Arc<dyn crate::realtime::rooms::Rooms>> = None;
        if let Some(settings) = &config.cluster {
            // Boxed: connecting to NATS is a large future, and it runs once.
            let rooms = match Box::pin(ClusterRooms::start(LocalRooms::default(), settings, shutdown.clone())).await {
                Ok(rooms) => rooms,
                Err(err) => {
                    let _ = relay.stop().await;
                    if let Some(node) = node {
                        node.stop().await;
                    }
                    return Err(err.into());
                }
            };
            cluster = Some(Arc::clone(&rooms.stats));
            db_rooms = Some(rooms.local());
            sessions = sessions.with_rooms(rooms);
        }
        let sessions = Arc::new(sessions);
        let admission = http::Admission::new(&sessions.limits, sessions.users.clone());
        let slot = config.relay.source.slot.slot.clone();
        let slot_watch = Arc::new(SlotWatch::default());
        let watchdog = config.monitoring.watchdog().map(|settings| {
            let run =
                watchdog::run(config.relay.source.connection.clone(), slot.clone(), settings, Arc::clone(&slot_watch));
            tokio::spawn(run.instrument(tracing::info_span!("slot_watchdog", slot = %slot)))
        });
        let monitor = Arc::new(
            Monitor::new(
                config.monitoring.clone(),
                Arc::clone(&sessions),
                relay.ack().clone(),
                relay.queues(),
                slot,
                slot_watch,
            )
            .with_cluster(cluster)
            .with_node(node.as_ref().map(ClusterNode::stats)),
        );
        let db_stats = Arc::clone(relay.queues().db_broadcast());
        let db_broadcast = tokio::spawn(crate::realtime::rooms::database::run(
            messages_rx,
            db_rooms.unwrap_or_else(|| Arc::clone(&sessions.rooms)),
            Arc::clone(&db_stats),
            sessions.limits.max_broadcast_bytes,
        ));
        let partitions = tokio::spawn(
            messages::run_partitions(
                config.relay.source.connection.clone(),
                messages::MAINTENANCE_INTERVAL,
                db_stats,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("realtime_partitions")),
        );
        let shutdown_rx = shutdown.clone();
        let ctx = Arc::new(HttpContext {
            sessions: Arc::clone(&sessions),
            demo: config.demo_json.map(|json| http::DemoEndpoints::new(json, config.relay.source.connection.clone())),
            monitor: Arc::clone(&monitor),
            admission,
            broadcast: http::broadcast::RestBroadcast::default(),
            no_sockets: node.as_ref().filter(|n| !n.role.is_edge()).map(|_| {
                "this node is a cluster source (--node-role source) and serves no WebSockets: connect to an edge"
            }),
        });
        let http = tokio::spawn(http::serve(listener, ctx, shutdown_rx).instrument(tracing::info_span!("http", %addr)));
        tracing::info!(%addr, "serving realtime");
        Ok(Server { addr, shutdown, http, relay, node, sessions, monitor, watchdog, db_broadcast, partitions })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Shared session state (limits, counters).
    pub fn sessions(&self) -> &Arc<SessionContext> {
        &self.sessions
    }

    /// The relay (hub counters, memberships).
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Metrics and readiness.
    pub fn monitor(&self) -> &Arc<Monitor> {
        &self.monitor
    }

    /// Runs until `signal` resolves or a relay stage ends (awaited through
    /// [`Relay::stage_ended`], not polled), then shuts down.
    ///
    /// # Errors
    /// The error the relay stopped with.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
        let source = self.node.as_ref().and_then(|n| n.source.as_ref());
        let source_failed = async {
            match source {
                Some(source) => source.failed().await,
                None => std::future::pending().await,
            }
        };
        let failed = tokio::select! {
            () = signal => {
                tracing::info!("shutting down");
                None
            }
            () = self.relay.stage_ended() => {
                tracing::error!("the relay stopped; shutting down");
                None
            }
            () = source_failed => source.and_then(|s| s.error()),
        };
        let stopped = self.shutdown().await;
        match failed {
            Some(error) => Err(ServeError::Source(error)),
            None => stopped,
        }
    }

    /// Stops accepting, closes every socket (1001), then stops replication
    /// with a final status update.
    ///
    /// # Errors
    /// The first error a relay stage ended with.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
        self.shutdown.cancel();
        let _ = self.http.await;
        let _ = self.partitions.await;
        let stopped = self.relay.stop().await;
        if let Some(node) = self.node {
            node.stop().await;
        }
        // The change stage ended, so the delivery stage's queue is closed:
        // it delivers what is queued and ends.
        let _ = self.db_broadcast.await;
        stopped?;
        Ok(())
    }
}

/// A cluster node's roles (see [`crate::scaleout`]).
#[derive(Debug)]
struct ClusterNode {
    role: crate::scaleout::NodeRole,
    source: Option<crate::scaleout::source::SourceNode>,
    edge: Option<Arc<crate::scaleout::edge::EdgeStats>>,
}

impl ClusterNode {
    fn stats(&self) -> crate::monitor::NodeStats {
        crate::monitor::NodeStats {
            role: self.role,
            source: self.source.as_ref().map(|s| Arc::clone(&s.stats)),
            edge: self.edge.clone(),
        }
    }

    async fn stop(self) {
        if let Some(source) = self.source {
            source.stop().await;
        }
    }
}

/// Cluster mode: opens the change log, starts the source role (it leads
/// when it holds the lease) and the serving side — an edge fed from the
/// stream, or, on a source-only node, a hub nobody feeds.
async fn start_cluster_node(
    settings: &crate::scaleout::ClusterSettings,
    relay_config: crate::relay::RelayConfig,
    messages: mpsc::Sender<crate::realtime::messages::DbMessage>,
) -> Result<(Relay, Option<ClusterNode>), ServeError> {
    use crate::scaleout::{edge, log::Log, source::SourceNode};
    let node_name = format!("walcast-{}", uuid::Uuid::new_v4().simple());
    let slot = relay_config.source.slot.slot.clone();
    let log = Log::open(settings, &slot, &node_name).await?;
    tracing::info!(role = settings.role.as_str(), node = %node_name, stream = %log.names.stream, "cluster mode");
    let source = settings
        .role
        .is_source()
        .then(|| SourceNode::start(log.clone(), settings.clone(), relay_config.clone(), node_name.clone()));
    let fed = crate::relay::FedConfig {
        hub: relay_config.hub.clone(),
        database_eval: relay_config.database_eval.clone(),
        connection: relay_config.source.connection.clone(),
        spill: relay_config.spill.clone(),
        db_broadcast: Arc::default(),
    };
    let mut node = ClusterNode { role: settings.role, source, edge: None };
    if settings.role.is_edge() {
        let db_stats = Arc::clone(&fed.db_broadcast);
        match edge::start(log, settings, fed, Some(messages), db_stats, relay_config.start_timeout).await {
            Ok((relay, stats)) => {
                node.edge = Some(stats);
                Ok((relay, Some(node)))
            }
            Err(err) => {
                node.stop().await;
                Err(err.into())
            }
        }
    } else {
        drop(messages);
        let idle: crate::relay::Feed = Box::new(|output, ack, stop| {
            Box::pin(async move {
                // Held open: a closed input would end the hub.
                let _output = output;
                ack.status().set_streaming();
                stop.cancelled().await;
                Ok(())
            })
        });
        let relay = match Relay::start_fed(fed, idle) {
            Ok(relay) => relay,
            Err(err) => {
                node.stop().await;
                return Err(err.into());
            }
        };
        // Nothing to load: the node judges nothing (its readiness is the
        // process's; whether it leads is in /metrics).
        relay.hub.stats.memberships_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok((relay, Some(node)))
    }
}

/// The start-up checks that need no slot, run before anything is created:
/// the database accepts the connection, and the policies and membership
/// caches load (see [`crate::policy::plan::load`]). Returns
/// whether the slot exists already.
///
/// # Errors
/// The first check that failed.
async fn preflight(config: &ServeConfig) -> Result<bool, ServeError> {
    let mut client = crate::pgconn::connect_described(&config.relay.source.connection).await?;
    // The same read the relay does at start (policies, then every
    // membership cache with row security off), so a role that cannot read a
    // membership table in full fails here — before a slot exists.
    crate::policy::plan::load(&mut client, &config.relay.source.slot.publications, None)
        .await
        .map_err(|e| RelayError::from(crate::policy::PolicyError::from(e)))?;
    let row = client
        .query_one(
            "select exists (select 1 from pg_catalog.pg_replication_slots where slot_name = $1)",
            &[&config.relay.source.slot.slot],
        )
        .await
        .map_err(|error| ServeError::Database { what: "looking up the replication slot", error })?;
    Ok(row.get(0))
}

/// Drops `slot`, which the failed start created, so it holds no WAL. The
/// start's walsender may still be ending: an active slot is retried for up
/// to [`SLOT_DROP_WAIT`]. Failures are logged, not returned (the start's own
/// error is the one to report).
async fn drop_created_slot(connection: &PgConfig, slot: &str) {
    let client = match crate::pgconn::connect_described(connection).await {
        Ok(client) => client,
        Err(err) => {
            tracing::warn!(slot, error = %err, "the replication slot this failed start created may remain");
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + SLOT_DROP_WAIT;
    loop {
        let dropped = client
            .execute(
                "select pg_catalog.pg_drop_replication_slot(slot_name) from pg_catalog.pg_replication_slots \
                 where slot_name = $1",
                &[&slot],
            )
            .await;
        match dropped {
            Ok(0) => return,
            Ok(_) => {
                tracing::info!(slot, "dropped the replication slot this failed start created");
                return;
            }
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => {
                tracing::warn!(
                    slot,
                    error = %crate::pgconn::cause(&err),
                    "could not drop the replication slot this failed start created; it holds WAL until dropped"
                );
                return;
            }
        }
    }
}
