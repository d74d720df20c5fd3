//! The realtime layer: Supabase Realtime's Phoenix protocol over WebSocket
//! (vsn 1.0.0 and 2.0.0), JWT auth, and the per-socket session that turns
//! joins into hub subscriptions.
//!
//! ```text
//!  http (upgrade, apikey) ──▶ session per socket ──Control──▶ hub
//!                               │ join: auth + catalog → bindings
//!                               └──▶ Outbox ──▶ writer ──▶ socket
//! ```
//!
//! - [`protocol`]: sans-IO framing of both serializers.
//! - [`auth`]: JWT verification (HS256 secret, JWKS).
//! - [`authorize`]: private channels judged by the policies on `realtime.messages`.
//! - [`rooms`]: the channels of each topic: Broadcast and Presence.
//! - [`join`]: join payloads → bindings with deterministic ids.
//! - [`messages`]: Broadcast from Database — `realtime.messages` rows,
//!   their partitions, replay.
//! - [`catalog`]: published tables and column types, for join validation.
//! - [`session`]: the per-connection loop and writer.
//! - [`users`]: sockets per user (`--max-sockets-per-user`).

pub mod auth;
pub mod authorize;
pub mod catalog;
pub mod join;
pub mod messages;
pub mod protocol;
pub mod rooms;
pub mod session;
pub mod users;

use std::time::Duration;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::hub::OutboxLimits;

pub use session::{RealtimeStats, SessionContext};

/// Per-socket and server limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Channels per socket (Supabase: 100).
    pub max_channels: usize,
    /// Bindings per socket whose filter has no `eq`/`in` condition (such
    /// filters are evaluated for every change of their table; the filter
    /// index narrows the rest). A join past it is refused.
    pub max_unindexed_filters: usize,
    /// Largest join message (bytes); a larger join is refused.
    pub max_join_bytes: usize,
    /// Largest broadcast payload (bytes of its JSON, or of a binary
    /// payload); a larger one is not sent (`payload_size_exceeded` with
    /// `ack`). Below `max_message_bytes` by at least 64 KiB.
    pub max_broadcast_bytes: usize,
    /// Broadcasts per second one channel may send (a bucket of one
    /// second's worth); more are refused at the sender.
    pub channel_broadcasts_per_second: u32,
    /// Broadcasts per second one socket may send over all its channels.
    pub socket_broadcasts_per_second: u32,
    /// Most bytes of join messages a socket's channels hold together (what
    /// its subscriptions keep in memory follows them); a join past it is
    /// refused.
    pub max_socket_join_bytes: usize,
    /// Largest client message (bytes); larger closes the socket with 1009.
    pub max_message_bytes: usize,
    /// Sustained joins per second per socket.
    pub joins_per_second: u32,
    /// Joins allowed in a burst (a reconnect rejoins every channel at once).
    pub join_burst: u32,
    /// A socket silent this long is closed (Phoenix: 60 s).
    pub idle_timeout: Duration,
    /// Longest a batch write (or the upgrade handshake) may take.
    pub write_timeout: Duration,
    /// Sockets open at once; more get HTTP 429.
    pub max_connections: usize,
    /// The outbox of each socket.
    pub outbox: OutboxLimits,
    /// tokio-tungstenite's read buffer per socket (allocated at the upgrade,
    /// kept for the socket's life) and the most bytes one `read` takes. A
    /// larger frame still fits: the buffer grows to the frame's length and
    /// is filled this many bytes per read.
    pub ws_read_buffer: usize,
    /// Frames are buffered until this many bytes or the batch's flush.
    pub ws_write_buffer: usize,
    /// Sockets open at once per user (`sub` of the upgrade's token; tokens
    /// without `sub` are not counted); more get HTTP 429.
    pub max_sockets_per_user: usize,
    /// Sockets open at once per client address; more get HTTP 429.
    pub max_sockets_per_address: usize,
    /// Peers whose `X-Forwarded-For` names the client address (reverse
    /// proxies); empty: the TCP peer is always the client.
    pub trusted_proxies: Vec<crate::http::Cidr>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_channels: 100,
            max_unindexed_filters: 20,
            max_join_bytes: 64 << 10,
            max_broadcast_bytes: 256 << 10,
            channel_broadcasts_per_second: 100,
            socket_broadcasts_per_second: 500,
            max_socket_join_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            joins_per_second: 20,
            join_burst: 100,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            outbox: OutboxLimits::default(),
            // Client frames are small (heartbeats, joins, tokens): 2 KiB
            // holds them in one read; 8 KiB cost 6 KiB more per idle
            // socket (docs/benchmarks.md, E3), 1 KiB no less than 2 KiB.
            ws_read_buffer: 2 << 10,
            ws_write_buffer: 32 << 10,
            max_sockets_per_user: 100,
            max_sockets_per_address: 1_000,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Limits {
    /// tokio-tungstenite settings for many connections: a small read buffer,
    /// writes buffered until the batch's flush, bounded write buffer and
    /// message size.
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(self.ws_read_buffer)
            .write_buffer_size(self.ws_write_buffer)
            .max_write_buffer_size((self.outbox.max_reply_bytes.max(1 << 20) + self.ws_write_buffer) * 2)
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes))
    }
}

/// Errors of the realtime layer.
#[derive(Debug, thiserror::Error)]
pub enum RealtimeError {
    /// The published tables could not be read (transient: PostgreSQL unreachable).
    #[error("reading the published tables failed: {}", crate::pgconn::cause(.0))]
    Catalog(tokio_postgres::Error),
    /// The published tables were not read within the deadline (transient:
    /// PostgreSQL or the network is stuck).
    #[error("reading the published tables took longer than {0:?}")]
    CatalogTimeout(Duration),
    /// The listener could not be bound (definite: pick a free port).
    #[error("cannot listen on {addr}: {source}; choose another --port or free this one")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Auth configuration (definite).
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
}

impl RealtimeError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RealtimeError::Catalog(_) | RealtimeError::CatalogTimeout(_))
    }
}
