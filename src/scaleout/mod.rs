//! Scale-out over NATS JetStream: several walcast nodes behind one load
//! balancer act as one Supabase Realtime, reading the database's WAL once.
//!
//! ```text
//!  PostgreSQL ─slot─▶ source (leader: KV lease) ─publish, PubAck─▶ JetStream stream WALCAST_<slot>
//!                      │ relay: replication → change stage → publisher       │ (file storage, ordered)
//!                      │ ack slot only after PubAck                          │
//!                      └─ snapshots of the policy state ─▶ object store      ▼
//!  standby sources: wait for the lease                  edge: snapshot, then ordered consumer
//!                                                         → hub (same code as one node) → sockets
//!  Broadcast and Presence: rooms ◀──▶ NATS core `walcast.rooms` ◀──▶ the other nodes' rooms
//! ```
//!
//! - [`log`]: names, connection, stream/bucket set-up, `walcast check`'s view.
//! - [`source`]: the leader lease and the publisher (the relay's sink).
//! - [`edge`]: the stream consumer that feeds an edge's hub.
//! - [`wire`]: transactions ⇄ chunked stream payloads.
//! - [`snapshot`]: the policy state ⇄ bytes, and the source's mirror of it.
//! - [`rooms`]: Broadcast and Presence across nodes.
//!
//! Invariants: the slot is acknowledged only up to the last transaction
//! whose every chunk JetStream acknowledged; one leader publishes at a time
//! (lease, PostgreSQL's one walsender per slot, and expected-last-sequence
//! fencing); an edge applies transactions in stream order and only whole
//! (a partial one of a superseded leader is discarded), and drops a
//! transaction already handled (by commit LSN), so a republished one is not
//! delivered twice. Budgets and rate limits stay per node.

pub mod edge;
pub mod log;
pub mod rooms;
pub mod snapshot;
pub mod source;
pub mod wire;

use std::time::Duration;

/// A NATS URL; its userinfo (credentials) never shows in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsUrl(pub String);

impl std::fmt::Debug for NatsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// What a node does in a cluster (`--node-role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Holds the slot when it holds the lease, and publishes; serves no
    /// WebSockets (`/health`, `/ready`, `/metrics` only).
    Source,
    /// Serves WebSockets from the stream; no replication connection.
    Edge,
    /// Both.
    #[default]
    All,
}

impl NodeRole {
    /// Whether the node may hold the slot.
    pub fn is_source(self) -> bool {
        matches!(self, NodeRole::Source | NodeRole::All)
    }

    /// Whether the node serves WebSockets.
    pub fn is_edge(self) -> bool {
        matches!(self, NodeRole::Edge | NodeRole::All)
    }

    /// `source`, `edge` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Source => "source",
            NodeRole::Edge => "edge",
            NodeRole::All => "all",
        }
    }
}

/// The JetStream stream's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Replicas (1, or 3/5 in a NATS cluster; `--stream-replicas`).
    pub replicas: usize,
    /// Most bytes kept (`--stream-max-bytes`); the oldest go first. Must
    /// hold the largest transaction plus a snapshot interval of traffic.
    pub max_bytes: i64,
    /// Longest a message is kept.
    pub max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> StreamSettings {
        StreamSettings { replicas: 1, max_bytes: 1 << 30, max_age: Duration::from_secs(24 * 3600) }
    }
}

/// Settings of a node in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `nats://host:port` (`--nats-url`).
    pub nats_url: NatsUrl,
    /// How often a node tells the others it is alive.
    pub heartbeat: Duration,
    /// A node not heard from for this long is gone: its presences leave.
    pub node_timeout: Duration,
    /// What this node does.
    pub role: NodeRole,
    /// The change stream.
    pub stream: StreamSettings,
    /// The source lease's time to live (renewed every third of it).
    pub lease_ttl: Duration,
    /// Least time between two snapshots of the policy state.
    pub snapshot_interval: Duration,
    /// How long an edge keeps serving without its stream
    /// (`--edge-max-stale-secs`) before it goes not ready and closes its
    /// sockets.
    pub edge_max_stale: Duration,
}

impl ClusterSettings {
    /// Defaults around `nats_url`: role `all`, a heartbeat every 2 s, a node
    /// gone after 30 s of silence, a 10 s lease, a snapshot at most every
    /// 30 s, edges stale after 10 s without the stream.
    pub fn new(nats_url: impl Into<String>) -> ClusterSettings {
        ClusterSettings {
            nats_url: NatsUrl(nats_url.into()),
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(30),
            role: NodeRole::All,
            stream: StreamSettings::default(),
            lease_ttl: Duration::from_secs(10),
            snapshot_interval: Duration::from_secs(30),
            edge_max_stale: Duration::from_secs(10),
        }
    }
}

/// Errors of the scale-out layer.
#[derive(Debug, thiserror::Error)]
pub enum ScaleoutError {
    /// NATS could not be reached (transient: the server is down or the URL
    /// points nowhere).
    #[error("cannot connect to NATS at {url}: {source}; check --nats-url and that nats-server runs")]
    Connect {
        /// The URL (no credentials are logged: NATS URLs carry them in the userinfo).
        url: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
    },
    /// `--nats-url` does not parse (definite).
    #[error("--nats-url {url} is not a NATS URL ({why}): give nats://host:port, or several separated by commas")]
    BadUrl {
        /// The URL, without credentials.
        url: String,
        /// Why.
        why: String,
    },
    /// Subscribing failed (transient).
    #[error("subscribing to the cluster's subjects failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// A JetStream request failed (transient: the server is restarting, or
    /// the stream's leader is being elected).
    #[error("JetStream: {what}: {error}")]
    JetStream {
        /// What was being done.
        what: &'static str,
        /// The error, as async-nats tells it.
        error: String,
    },
    /// JetStream is not enabled on the server (definite).
    #[error("JetStream is not enabled on the NATS server at {0}: start nats-server with -js (or `jetstream {{}}` in its config)")]
    NoJetStream(String),
    /// The server is older than walcast supports (definite).
    #[error("nats-server {found} is too old: walcast needs {MIN_SERVER_VERSION} or newer")]
    ServerTooOld {
        /// The version it reports.
        found: String,
    },
    /// The stream exists with settings walcast cannot use (definite).
    #[error("the JetStream stream {stream} exists with {what}; delete it (nats stream rm {stream}) or fix it")]
    StreamSettings {
        /// The stream.
        stream: String,
        /// What is wrong.
        what: String,
    },
    /// Another source published to the stream: this one lost the lease
    /// (it stops publishing and waits to lead again).
    #[error(
        "another source published to the stream (expected last sequence {expected}): this node is no longer the leader"
    )]
    Fenced {
        /// The sequence this node expected last.
        expected: u64,
    },
    /// The lease was lost (not renewed in time).
    #[error("the source lease was lost: {0}")]
    LeaseLost(String),
    /// A transaction is larger than the stream may hold (definite: the
    /// source stops rather than skip it or evict its own beginning).
    #[error(
        "a transaction of over {bytes} bytes does not fit the stream (--stream-max-bytes {max}); raise \
         --stream-max-bytes (and the JetStream account's storage) above the largest transaction plus a snapshot \
         interval of changes, then restart the source"
    )]
    TransactionTooLarge {
        /// Bytes published of it when it was refused.
        bytes: u64,
        /// The stream's limit.
        max: u64,
    },
    /// The source's replication could not start, definitely (the message
    /// names the fix: a missing publication, a revoked privilege, …).
    #[error("{0}")]
    Replication(String),
    /// A policy state in the stream grew past what an edge gathers without
    /// its last chunk (definite: the stream was written by something else,
    /// or the caches outgrew the limit).
    #[error("a policy state in the stream is over {max} bytes; refusing it")]
    PolicyStateTooLarge {
        /// The limit.
        max: usize,
    },
    /// The edge's hub could not start (its message names the fix).
    #[error("starting the edge's hub: {0}")]
    Hub(String),
    /// A transaction or snapshot could not be encoded or decoded.
    #[error("stream payload: {0}")]
    Wire(#[from] wire::WireError),
    /// A policy snapshot could not be encoded or decoded (definite: the
    /// nodes run different versions, or the stream was written by
    /// something else).
    #[error("policy snapshot: {0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    /// An edge found no snapshot to start from in time (definite for this
    /// start: no source has published yet).
    #[error("no policy snapshot in {bucket} after {waited:?}: start a source node (--node-role source or all) first")]
    NoSnapshot {
        /// The object store bucket.
        bucket: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The stream no longer holds what an edge needs (retention removed
    /// it): it starts again from the latest snapshot.
    #[error("the stream no longer holds sequence {wanted} (first kept: {first}); raise --stream-max-bytes")]
    Evicted {
        /// The sequence wanted.
        wanted: u64,
        /// The first sequence the stream holds.
        first: u64,
    },
}

/// The oldest nats-server walcast supports (async-nats 0.52's JetStream
/// KV needs 2.10's account info).
pub const MIN_SERVER_VERSION: &str = "2.10.0";

impl ScaleoutError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ScaleoutError::Connect { .. }
                | ScaleoutError::Subscribe(_)
                | ScaleoutError::JetStream { .. }
                | ScaleoutError::Fenced { .. }
                | ScaleoutError::LeaseLost(_)
                | ScaleoutError::Evicted { .. }
        )
    }

    /// A JetStream error.
    pub(crate) fn js(what: &'static str, error: impl std::fmt::Display) -> ScaleoutError {
        ScaleoutError::JetStream { what, error: error.to_string() }
    }
}

/// `url` without its userinfo (for logs and errors).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}
