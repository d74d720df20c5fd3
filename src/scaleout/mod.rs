//! Scale-out over NATS: several walcast nodes behind one load balancer act as
//! one Supabase Realtime.
//!
//! Today: Broadcast and Presence across nodes ([`rooms::ClusterRooms`]) —
//! a message sent on one node reaches the room's members on every node,
//! presence state converges across nodes, and a node that goes silent has
//! its presences leave after [`ClusterSettings::node_timeout`]. Each node
//! still streams its own replication slot for Postgres Changes and
//! Broadcast from Database (the JetStream change log is the next step).
//!
//! Budgets and rate limits stay per node.

pub mod rooms;
pub mod snapshot;
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

/// Settings of a node in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `nats://host:port` (`--nats-url`).
    pub nats_url: NatsUrl,
    /// How often a node tells the others it is alive.
    pub heartbeat: Duration,
    /// A node not heard from for this long is gone: its presences leave.
    pub node_timeout: Duration,
}

impl ClusterSettings {
    /// Defaults around `nats_url`: a heartbeat every 2 s, a node gone after
    /// 30 s of silence.
    pub fn new(nats_url: impl Into<String>) -> ClusterSettings {
        ClusterSettings {
            nats_url: NatsUrl(nats_url.into()),
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(30),
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
    /// Subscribing failed (transient).
    #[error("subscribing to the cluster's subjects failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

impl ScaleoutError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// `url` without its userinfo (for logs and errors).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}
