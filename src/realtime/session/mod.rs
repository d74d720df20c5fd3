//! One WebSocket connection: reads Phoenix messages, keeps the socket's
//! channels, turns joins into hub subscriptions, and writes the connection's
//! outbox to the socket.
//!
//! ```text
//!  socket ──frames──▶ reader loop (this task) ──Control──▶ hub
//!                        │ replies, system, phx_close            │ postgres_changes frames
//!                        ▼                                        ▼
//!                      Outbox (bounded, shared) ◀─────────────────┘
//!                        │
//!                        ▼ writer task: drain everything queued, one flush
//!                      socket
//! ```
//!
//! Invariants:
//! - Everything sent goes through the outbox, so a join reply always precedes
//!   the hub's "Subscribed to PostgreSQL" and nothing waits on the socket
//!   except the writer.
//! - A channel's viewer comes only from a verified token (the join's
//!   `access_token`, else the socket's `apikey`); an expired token closes the
//!   channel at `exp` and removes its subscription before anything else.
//! - On exit the hub is told (`Disconnect`) before the task ends, so no
//!   subscription outlives its socket.
//!
//! Broadcast, presence and the private channels' checks are in
//! `session/channels.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::realtime::auth::{Claims, Verifier};
use crate::realtime::authorize::{Authorizer, ReadGrant};
use crate::realtime::catalog::Catalog;
use crate::realtime::join::{self, JoinRequest};
use crate::realtime::protocol::{self, Message};
use crate::realtime::rooms::{self, LocalRooms, RoomKey, Rooms};
use crate::realtime::Limits;

mod channels;
mod io;

use crate::hub::{CloseReason, ConnId, Control, HubHandle, Outbox, PushError, Subscription, Vsn};
use crate::outbox::Written;
pub use channels::{PRESENCE_CALLS, PRESENCE_WINDOW};

/// What every session shares.
#[derive(Debug)]
pub struct SessionContext {
    /// Token verification.
    pub verifier: Verifier,
    /// Published tables.
    pub catalog: Arc<Catalog>,
    /// The hub.
    pub hub: HubHandle,
    /// Limits.
    pub limits: Limits,
    /// Counters.
    pub stats: RealtimeStats,
    /// Sockets per user (the upgrade's and every join's token).
    pub users: super::users::UserSockets,
    /// The channels of every topic: Broadcast and Presence.
    pub rooms: Arc<dyn Rooms>,
    /// Realtime Authorization of private channels (`None`: private joins
    /// are refused).
    pub authorizer: Option<Arc<Authorizer>>,
    next_conn: AtomicU64,
}

impl SessionContext {
    /// A context around the shared parts.
    pub fn new(verifier: Verifier, catalog: Arc<Catalog>, hub: HubHandle, limits: Limits) -> SessionContext {
        let users = super::users::UserSockets::new(limits.max_sockets_per_user);
        SessionContext {
            verifier,
            catalog,
            hub,
            limits,
            stats: RealtimeStats::default(),
            users,
            rooms: Arc::new(LocalRooms::default()),
            authorizer: None,
            next_conn: AtomicU64::new(1),
        }
    }
}

impl SessionContext {
    /// Rooms other than this node's alone (a cluster's).
    #[must_use]
    pub fn with_rooms(mut self, rooms: Arc<dyn Rooms>) -> SessionContext {
        self.rooms = rooms;
        self
    }

    /// Private channels judged by `authorizer`.
    #[must_use]
    pub fn with_authorizer(mut self, authorizer: Arc<Authorizer>) -> SessionContext {
        self.authorizer = Some(authorizer);
        self
    }
}

/// Counters of the realtime layer.
#[derive(Debug, Default)]
pub struct RealtimeStats {
    /// Sockets open now.
    pub sockets_open: AtomicU64,
    /// Sockets accepted in all.
    pub sockets_total: AtomicU64,
    /// Channels joined now.
    pub channels_open: AtomicU64,
    /// Join requests handled.
    pub joins: AtomicU64,
    /// Joins refused (token, limits).
    pub joins_refused: AtomicU64,
    /// Of those, joins refused for the socket's unindexed-filter budget.
    pub unindexed_refused: AtomicU64,
    /// Of those, joins whose token's user holds `max_sockets_per_user`
    /// sockets already.
    pub user_refused: AtomicU64,
    /// Of those, private-channel joins the read policies (or a failed
    /// check) refused.
    pub private_refused: AtomicU64,
    /// Private channels closed because a new token lost a read right.
    pub private_revoked: AtomicU64,
    /// Broadcasts and tracks on private channels the write policies (or a
    /// failed check) refused; broadcasts are dropped without a reply, as
    /// Supabase does.
    pub private_writes_denied: AtomicU64,
    /// Broadcasts received from clients and sent on.
    pub broadcasts: AtomicU64,
    /// Broadcast frames queued to receivers.
    pub broadcast_frames: AtomicU64,
    /// Broadcasts not sent: payload over `max_broadcast_bytes`.
    pub broadcasts_too_large: AtomicU64,
    /// Broadcasts not sent: the channel or the socket sent more than its
    /// rate.
    pub broadcasts_rate_limited: AtomicU64,
    /// Presence `track`s that changed a room's state (joins and updates).
    pub presence_tracks: AtomicU64,
    /// Presence `untrack`s.
    pub presence_untracks: AtomicU64,
    /// Presence pushes refused (not a map, unknown event).
    pub presence_refused: AtomicU64,
    /// Channels closed for too many presence calls, or a track payload
    /// over the size limit.
    pub presence_closed: AtomicU64,
    /// Frames that could not be decoded.
    pub bad_frames: AtomicU64,
    /// Channels closed because their token expired.
    pub tokens_expired: AtomicU64,
    /// Slow consumers whose close frame the socket could not take in time
    /// (the connection was dropped without it).
    pub close_frames_dropped: AtomicU64,
    /// Sockets closed because a write made no progress within the write
    /// timeout (1013).
    pub write_stalls: AtomicU64,
    /// Sockets closed because they sent requests without reading the
    /// replies (1013).
    pub reply_floods: AtomicU64,
    /// Upgrades refused (HTTP 429): the server holds `max_connections` sockets.
    pub upgrades_refused_connections: AtomicU64,
    /// Upgrades refused (HTTP 429): the user holds `max_sockets_per_user` sockets.
    pub upgrades_refused_user: AtomicU64,
    /// Upgrades refused (HTTP 429): the address holds `max_sockets_per_address` sockets.
    pub upgrades_refused_address: AtomicU64,
    /// Broadcasts sent on from the HTTP API (batch items and single messages).
    pub http_broadcasts: AtomicU64,
    /// HTTP broadcast requests refused, by reason (as in [`crate::http::broadcast::REASONS`]).
    pub http_broadcasts_refused: [AtomicU64; crate::http::broadcast::REASONS.len()],
    /// Private HTTP broadcast messages not sent (batch items skipped, single
    /// messages refused with 403): Realtime Authorization did not allow the write.
    pub http_broadcasts_private_denied: AtomicU64,
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The tokio instant at which a Unix time `exp` (seconds) is reached.
fn instant_at(exp: i64) -> Instant {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let exp = Duration::from_secs(u64::try_from(exp).unwrap_or(0));
    Instant::now() + exp.saturating_sub(now)
}

/// One joined channel.
#[derive(Debug)]
struct Channel {
    join_ref: Option<String>,
    /// The token in force (to ignore an unchanged `access_token`).
    token: String,
    claims: Claims,
    /// Whether the hub holds a subscription for it.
    subscribed: bool,
    /// Its bindings whose filter no index can look up (charged to the
    /// socket's [`Limits::max_unindexed_filters`]).
    unindexed: usize,
    /// Bytes of its join message (charged to the socket's
    /// [`Limits::max_socket_join_bytes`]).
    join_bytes: usize,
    /// `config.broadcast.ack`: broadcast pushes are answered.
    broadcast_ack: bool,
    /// Its room (topic and privacy).
    room: RoomKey,
    /// Its presence key (`config.presence.key`, else a UUID of this join).
    presence_key: String,
    /// Presence calls in the current window (Supabase: 5 per 30 s per
    /// channel; the 6th closes the channel).
    presence_calls: (Instant, u32),
    /// `config.presence.enabled`.
    presence_enabled: bool,
    /// `config.broadcast.self`.
    echo: bool,
    /// What it may receive (public channels: everything).
    read: ReadGrant,
    /// Write checks of a private channel, once made: `[broadcast, presence]`.
    writes: [Option<bool>; 2],
    /// Broadcasts it may still send.
    sends: Bucket,
    /// When it was last told it sends too fast (one notice per second).
    rate_notice: Option<Instant>,
    /// A replaying join's gate (kept open afterwards: it skips late live
    /// copies of the replayed messages).
    gate: Option<Arc<rooms::ReplayGate>>,
}

/// A token bucket (joins, broadcasts).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `burst` tokens.
    fn full(burst: u32) -> Bucket {
        Bucket { tokens: f64::from(burst), last: Instant::now() }
    }

    /// Takes a token, refilled at `rate` per second up to `burst`.
    fn take(&mut self, rate: u32, burst: u32) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why the reader loop ended.
enum End {
    /// Closed by the peer or the network.
    Peer,
    /// The server closes with this reason.
    Close(CloseReason),
}

struct Session {
    ctx: Arc<SessionContext>,
    conn: ConnId,
    vsn: Vsn,
    apikey: String,
    apikey_claims: Claims,
    /// The upgrade's `x-*` headers (`request.headers` for the policies).
    headers: Arc<serde_json::Value>,
    outbox: Arc<Outbox>,
    /// Boxed: a map's buckets hold 4 entries or more, so unboxed a
    /// socket with one channel would carry room for three more Channels
    /// (~800 bytes; docs/benchmarks.md, E3).
    channels: HashMap<String, Box<Channel>>,
    joins: Bucket,
    /// Broadcasts this socket may still send (over all its channels).
    sends: Bucket,
    /// Bytes of the text frame being handled (a join's size budget).
    frame_len: usize,
    /// The users (other than the upgrade token's, counted with the socket's
    /// admission) whose tokens this socket presented: it counts for each
    /// against `--max-sockets-per-user` until it closes.
    users: Vec<super::users::UserSlot>,
}

/// Runs a connection until it closes. `socket` is the upgraded connection
/// and the bytes read past its request; `apikey` was verified at the
/// upgrade.
pub async fn run(
    socket: (TcpStream, Vec<u8>),
    ctx: Arc<SessionContext>,
    vsn: Vsn,
    apikey: String,
    apikey_claims: Claims,
    headers: Arc<serde_json::Value>,
    shutdown: CancellationToken,
) {
    let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    ctx.stats.sockets_open.fetch_add(1, Ordering::Relaxed);
    ctx.stats.sockets_total.fetch_add(1, Ordering::Relaxed);
    // The outbox owns the write half: the hub writes frames straight to
    // the socket, the writer task only when the socket is full; the
    // WebSocket library reads, and its control replies (pong, close) go
    // through the outbox in order with everything else.
    let (stream, read_buf) = socket;
    let (read, write) = stream.into_split();
    let outbox = Arc::new(Outbox::with_socket(ctx.limits.outbox, Arc::clone(&ctx.hub.budget), write));
    let io = io::ControlIo::new(read, Arc::clone(&outbox));
    // Boxed: the library's state is as big as it was inside the split
    // halves' shared allocation, but stays out of this long-lived future.
    let mut stream = Box::new(
        WebSocketStream::from_partially_read(io, read_buf, Role::Server, Some(ctx.limits.websocket_config())).await,
    );
    let mut writer = tokio::spawn(write_loop(Arc::clone(&outbox), Arc::clone(&ctx)));
    let mut session = Session {
        joins: Bucket::full(ctx.limits.join_burst),
        sends: Bucket::full(ctx.limits.socket_broadcasts_per_second),
        ctx,
        conn,
        vsn,
        apikey,
        apikey_claims,
        headers,
        outbox: Arc::clone(&outbox),
        channels: HashMap::new(),
        frame_len: 0,
        users: Vec::new(),
    };
    tracing::debug!(conn, vsn = protocol::vsn_str(vsn), "socket open");
    let idle = session.ctx.limits.idle_timeout;
    let mut idle_deadline = Instant::now() + idle;
    // A JoinHandle must not be polled again once it completed (tokio panics).
    let mut writer_done = false;
    let end = loop {
        let expiry = session.next_expiry();
        // Requests wait while the client has not read half a reply cap of
        // answers (TCP then slows the sender): never closed for its own
        // replies as long as it reads.
        let backlogged = session.outbox.replies_backlogged();
        // One timer for the three deadlines (a token's expiry, the idle
        // timeout, the backlog recheck): each `Sleep` is ~100 bytes of the
        // connection's future. The branch below tells them apart, in the
        // order separate branches would have had.
        let recheck = backlogged.then(|| Instant::now() + REPLY_BACKLOG_RECHECK);
        let wake = [expiry, recheck].into_iter().flatten().fold(idle_deadline, Instant::min);
        tokio::select! {
            biased;
            // 1. Server shutdown.
            () = shutdown.cancelled() => break End::Close(CloseReason::shutdown()),
            // 2. The writer stopped (socket broken, or a close was sent).
            _ = &mut writer => {
                writer_done = true;
                break End::Peer;
            }
            // 3–5. A deadline.
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if expiry.is_some_and(|at| at <= now) {
                    // 3. A channel's token expired.
                    Box::pin(session.expire_channels()).await;
                } else if idle_deadline <= now {
                    // 4. Silence for the idle timeout.
                    break End::Close(CloseReason { code: 1000, reason: format!("no message for {}s (heartbeat timeout)", idle.as_secs()) });
                } else if backlogged {
                    // 5. Replies backlogged: look again shortly (the writer drains).
                    idle_deadline = now + idle;
                }
            }
            // 6. A frame from the client.
            frame = stream.next(), if !backlogged => {
                idle_deadline = Instant::now() + idle;
                match frame {
                    None => break End::Peer,
                    Some(Ok(frame)) => {
                        // Boxed: handling a frame takes a few hundred bytes
                        // of await state for a moment; inline, every idle
                        // socket would hold them for its whole life. One
                        // allocation per client message, next to the
                        // message's own decoding.
                        if let Some(end) = Box::pin(session.frame(frame)).await {
                            break end;
                        }
                    }
                    Some(Err(err)) => break session.read_error(&err),
                }
            }
        }
    };
    Box::pin(session.finish(end, (!writer_done).then_some(writer))).await;
}

/// How often a session with backlogged replies looks whether the writer
/// drained them.
const REPLY_BACKLOG_RECHECK: std::time::Duration = std::time::Duration::from_millis(5);

impl Session {
    fn next_expiry(&self) -> Option<Instant> {
        self.channels.values().map(|c| c.claims.exp).min().map(instant_at)
    }

    fn push(&self, frame: Bytes) {
        // Too many unread replies close the connection; the writer then
        // ends the session.
        if self.outbox.push_reply(frame) == Err(PushError::Full) {
            self.ctx.stats.reply_floods.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read_error(&self, err: &tungstenite::Error) -> End {
        match err {
            tungstenite::Error::Capacity(_) => {
                tracing::debug!(conn = self.conn, error = %err, "frame over the size limit");
                End::Close(CloseReason {
                    code: 1009,
                    reason: format!("message too big: at most {} bytes", self.ctx.limits.max_message_bytes),
                })
            }
            tungstenite::Error::Utf8(_) => {
                tracing::debug!(conn = self.conn, error = %err, "text frame is not UTF-8");
                End::Close(CloseReason { code: 1007, reason: "text frame is not valid UTF-8".into() })
            }
            tungstenite::Error::Protocol(_) => {
                tracing::debug!(conn = self.conn, error = %err, "websocket protocol error");
                End::Close(CloseReason { code: 1002, reason: format!("websocket protocol error: {err}") })
            }
            _ => End::Peer,
        }
    }

    async fn frame(&mut self, frame: WsMessage) -> Option<End> {
        match frame {
            WsMessage::Text(text) => match protocol::decode_text(self.vsn, text.as_str()) {
                Ok(message) => {
                    self.frame_len = text.len();
                    self.message(message).await
                }
                Err(err) => {
                    self.ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = self.conn, error = %err, "ignoring an undecodable frame");
                    None
                }
            },
            WsMessage::Binary(data) => {
                self.binary(&data).await;
                None
            }
            WsMessage::Close(_) => Some(End::Peer),
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => None,
        }
    }

    async fn binary(&mut self, data: &[u8]) {
        if self.vsn == Vsn::V1 {
            self.ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.conn, "ignoring a binary frame on a 1.0.0 socket");
            return;
        }
        match protocol::decode_binary(data) {
            Ok(push) => {
                let message =
                    rooms::Message::Binary { event: &push.event, encoding: push.encoding, payload: &push.payload };
                self.broadcast(&push.topic, push.join_ref.as_deref(), push.msg_ref.as_deref(), &message).await;
            }
            Err(err) => {
                self.ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(conn = self.conn, error = %err, "ignoring a binary frame");
            }
        }
    }

    async fn message(&mut self, msg: Message) -> Option<End> {
        if msg.topic.len() > protocol::MAX_TOPIC_LEN {
            // Answered, so the client's push fails at once instead of timing out.
            let reason = format!("TopicNameTooLong: a topic is at most {} bytes", protocol::MAX_TOPIC_LEN);
            if msg.event == "phx_join" {
                self.ctx.stats.joins.fetch_add(1, Ordering::Relaxed);
                self.refuse(&msg, &reason);
            } else {
                self.push(protocol::reply(self.vsn, &msg, "error", json!({ "reason": reason })));
            }
            return None;
        }
        if msg.topic == "phoenix" {
            let reply = if msg.event == "heartbeat" {
                protocol::reply(self.vsn, &msg, "ok", json!({}))
            } else {
                protocol::reply(self.vsn, &msg, "error", json!({"reason": "unknown event"}))
            };
            self.push(reply);
            return None;
        }
        // The join, leave, access_token and presence paths are boxed: their
        // awaits (authorization and replay queries, the hub's queue) are
        // large and rare, and inline they would size every connection's
        // future, which lives as long as the socket (docs/benchmarks.md, E3).
        match msg.event.as_str() {
            "phx_join" => return Box::pin(self.join(msg)).await,
            "phx_leave" => Box::pin(self.leave(&msg)).await,
            "access_token" => Box::pin(self.access_token(&msg)).await,
            _ if !self.channels.contains_key(&msg.topic) => {
                self.push(protocol::reply(self.vsn, &msg, "error", json!({"reason": "unmatched topic"})));
            }
            "broadcast" => {
                // Serialized once: its size is the limit's measure, its bytes
                // go into every receiver's frame.
                let json = serde_json::to_vec(&msg.payload).unwrap_or_default();
                let message = rooms::Message::Text(&json);
                self.broadcast(&msg.topic, msg.join_ref.as_deref(), msg.msg_ref.as_deref(), &message).await;
            }
            "presence" => return Box::pin(self.presence(&msg)).await,
            _ => self.push(protocol::reply(self.vsn, &msg, "error", json!({"reason": "unknown event"}))),
        }
        None
    }

    /// Counts this socket for `sub` (once per socket); `false` when the user
    /// holds `--max-sockets-per-user` sockets already.
    fn count_user(&mut self, sub: Option<&str>) -> bool {
        let Some(sub) = sub else { return true };
        if self.apikey_claims.sub.as_deref() == Some(sub) || self.users.iter().any(|slot| slot.key() == sub) {
            return true;
        }
        match self.ctx.users.take(sub.to_owned()) {
            Some(slot) => {
                self.users.push(slot);
                true
            }
            None => {
                self.ctx.stats.user_refused.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    fn user_budget_reason(&self) -> String {
        format!("too many sockets for this user (limit {})", self.ctx.users.limit())
    }

    fn refuse(&self, msg: &Message, reason: &str) {
        self.ctx.stats.joins_refused.fetch_add(1, Ordering::Relaxed);
        self.push(protocol::reply(self.vsn, msg, "error", json!({ "reason": reason })));
    }

    async fn join(&mut self, msg: Message) -> Option<End> {
        self.ctx.stats.joins.fetch_add(1, Ordering::Relaxed);
        if !self.joins.take(self.ctx.limits.joins_per_second, self.ctx.limits.join_burst) {
            // As Supabase: this join is refused; the socket and its other
            // channels carry on.
            self.refuse(&msg, "ClientJoinRateLimitReached: Too many joins per second");
            return None;
        }
        let Some(sub_topic) = msg.topic.strip_prefix("realtime:") else {
            self.refuse(&msg, "unmatched topic");
            return None;
        };
        if sub_topic.is_empty() {
            self.refuse(&msg, "TopicNameRequired: You must provide a topic name");
            return None;
        }
        if !self.channels.contains_key(&msg.topic) && self.channels.len() >= self.ctx.limits.max_channels {
            self.refuse(&msg, "ChannelRateLimitReached: Too many channels");
            return None;
        }
        if self.frame_len > self.ctx.limits.max_join_bytes {
            let reason = format!(
                "InvalidJoinPayload: the join message is {} bytes; at most {} are accepted",
                self.frame_len, self.ctx.limits.max_join_bytes
            );
            self.refuse(&msg, &reason);
            return None;
        }
        let request = match join::parse_join(&msg.payload) {
            Ok(request) => request,
            Err(err) => {
                self.refuse(&msg, &format!("InvalidJoinPayload: {err}"));
                return None;
            }
        };
        let JoinRequest {
            bindings,
            access_token,
            private,
            broadcast_self,
            broadcast_ack,
            presence_key,
            presence_enabled,
            replay,
        } = request;
        match replay {
            Some(_) if !private => {
                self.refuse(&msg, "UnableToReplayMessages: Replay is not allowed for public channels");
                return None;
            }
            Some(Err(_)) => {
                self.refuse(&msg, "UnableToReplayMessages: Replay params are not valid");
                return None;
            }
            _ => {}
        }
        let (token, claims) = match access_token {
            Some(token) => match self.ctx.verifier.verify(&token, now_unix()) {
                Ok(claims) => (token, claims),
                Err(err) => {
                    self.refuse(&msg, &format!("{}: {err}", err.code()));
                    return None;
                }
            },
            None => (self.apikey.clone(), self.apikey_claims.clone()),
        };
        // supabase-js sends the user's token here, not at the upgrade: the
        // per-user socket budget counts it now.
        if !self.count_user(claims.sub.as_deref()) {
            let reason = self.user_budget_reason();
            self.refuse(&msg, &reason);
            return None;
        }
        let read = if private {
            match self.read_check(&claims, sub_topic, presence_enabled).await {
                Ok(grant) => grant,
                Err(reason) => {
                    self.ctx.stats.private_refused.fetch_add(1, Ordering::Relaxed);
                    self.refuse(&msg, &reason);
                    return None;
                }
            }
        } else {
            ReadGrant { broadcast: true, presence: true }
        };
        if replay.is_some() && !read.broadcast {
            self.ctx.stats.private_refused.fetch_add(1, Ordering::Relaxed);
            let reason =
                format!("Unauthorized: You do not have permissions to read from this Channel topic: {sub_topic}");
            self.refuse(&msg, &reason);
            return None;
        }
        let resolved =
            if bindings.is_empty() { Ok(Vec::new()) } else { join::resolve(&bindings, &self.ctx.catalog).await };
        // Filters no index can look up are evaluated for every change of
        // their table: the socket pays for them from its own budget.
        let unindexed = resolved.as_ref().map_or(0, |b| b.iter().filter(|b| b.filter.is_unindexed()).count());
        // What the socket's other channels hold (a rejoin replaces its own):
        // unindexed filters, and join bytes — a socket's subscriptions' memory
        // follows the size of its joins (docs/operations.md).
        let (held, held_bytes) = self
            .channels
            .iter()
            .filter(|(topic, _)| **topic != msg.topic)
            .fold((0, 0), |(n, bytes), (_, c)| (n + c.unindexed, bytes + c.join_bytes));
        if held_bytes + self.frame_len > self.ctx.limits.max_socket_join_bytes {
            let reason = format!(
                "InvalidJoinPayload: this socket's channels would hold {} bytes of join messages; at most {} per \
                 socket",
                held_bytes + self.frame_len,
                self.ctx.limits.max_socket_join_bytes
            );
            self.refuse(&msg, &reason);
            return None;
        }
        if unindexed > 0 && held + unindexed > self.ctx.limits.max_unindexed_filters {
            self.ctx.stats.unindexed_refused.fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "TooManyUnindexedFilters: this join adds {unindexed} filters without an eq or in condition to the \
                 {held} this socket holds; at most {} per socket (such filters are evaluated for every change of \
                 their table; add an eq or in condition, or use fewer)",
                self.ctx.limits.max_unindexed_filters
            );
            self.refuse(&msg, &reason);
            return None;
        }
        // A second join on a topic replaces the first: close the old channel.
        if let Some(old) = self.channels.remove(&msg.topic) {
            self.ctx.stats.channels_open.fetch_sub(1, Ordering::Relaxed);
            self.ctx.rooms.leave(&old.room, self.conn);
            self.push(protocol::phx_close(self.vsn, old.join_ref.as_deref(), &msg.topic));
            if old.subscribed {
                self.control(Control::Leave { conn: self.conn, topic: msg.topic.clone() }).await;
            }
        }
        let join_ref = msg.join_ref.clone().or_else(|| msg.msg_ref.clone());
        let join_bytes = self.frame_len;
        let mut channel = Channel {
            join_ref,
            token,
            claims,
            subscribed: false,
            unindexed,
            join_bytes,
            broadcast_ack,
            room: RoomKey::new(msg.topic.clone(), private),
            presence_key: presence_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            presence_calls: (Instant::now(), 0),
            presence_enabled,
            echo: broadcast_self,
            read,
            writes: [None, None],
            sends: Bucket::full(self.ctx.limits.channel_broadcasts_per_second),
            rate_notice: None,
            gate: replay.map(|_| rooms::ReplayGate::new()),
        };
        // In the room before the reply (as Supabase subscribes before it
        // replies): whatever is sent once the client holds the reply
        // reaches it. A replaying join holds live traffic until the stored
        // messages are queued.
        self.ctx.rooms.join(&channel.room, self.member(&channel));
        let replayed = match replay {
            Some(Ok((since, limit))) => match self.replay(sub_topic, since, limit).await {
                Ok(rows) => rows,
                Err(()) => {
                    self.ctx.rooms.leave(&channel.room, self.conn);
                    self.refuse(&msg, "UnableToReplayMessages: Realtime was unable to replay messages");
                    return None;
                }
            },
            _ => Vec::new(),
        };
        let response = json!({ "postgres_changes": join::reply_bindings(&bindings) });
        self.push(protocol::reply(self.vsn, &msg, "ok", response));
        if let Some(gate) = &channel.gate {
            let mut ids = std::collections::HashSet::new();
            for row in replayed {
                if let Some(frame) = channels::replayed_frame(self.vsn, channel.join_ref.as_deref(), &msg.topic, &row) {
                    let _ = self.outbox.push(frame);
                }
                ids.insert(row.id);
            }
            gate.open(ids, &self.outbox);
        }
        match resolved {
            Ok(hub_bindings) if !hub_bindings.is_empty() => {
                // Say what will not arrive and why (never silence): an
                // unknown role, or a plan's warnings for these tables.
                for message in plan_notices(&self.ctx.hub.policies(), &channel.claims.role, &hub_bindings) {
                    self.push(protocol::system(
                        self.vsn,
                        channel.join_ref.as_deref(),
                        &msg.topic,
                        "postgres_changes",
                        "error",
                        &message,
                    ));
                }
                let on_live = self.subscribed_frame(&msg.topic, channel.join_ref.as_deref());
                let subscription = Subscription {
                    conn: self.conn,
                    topic: msg.topic.clone(),
                    vsn: self.vsn,
                    viewer: channel.claims.viewer(),
                    bindings: hub_bindings,
                    outbox: Arc::clone(&self.outbox),
                    on_live: Some(on_live),
                    on_withheld: Some(protocol::system(
                        self.vsn,
                        channel.join_ref.as_deref(),
                        &msg.topic,
                        "postgres_changes",
                        "error",
                        WITHHELD,
                    )),
                };
                channel.subscribed = true;
                self.control(Control::Join(subscription)).await;
            }
            Ok(_) => {}
            Err(message) => self.push(protocol::system(
                self.vsn,
                channel.join_ref.as_deref(),
                &msg.topic,
                "postgres_changes",
                "error",
                &message,
            )),
        }
        if presence_enabled && read.presence {
            self.ctx.rooms.presence_state(&channel.room, self.conn);
        }
        self.channels.insert(msg.topic, Box::new(channel));
        self.ctx.stats.channels_open.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn subscribed_frame(&self, topic: &str, join_ref: Option<&str>) -> Bytes {
        protocol::system(self.vsn, join_ref, topic, "postgres_changes", "ok", "Subscribed to PostgreSQL")
    }

    async fn control(&self, control: Control) {
        if self.ctx.hub.send(control).await.is_err() {
            // The hub stopped: the server is going down; the session ends with it.
            self.outbox.close(CloseReason::shutdown());
        }
    }

    async fn leave(&mut self, msg: &Message) {
        self.push(protocol::reply(self.vsn, msg, "ok", json!({})));
        let join_ref = msg.join_ref.as_deref().or(msg.msg_ref.as_deref());
        match self.channels.remove(&msg.topic) {
            Some(channel) => {
                self.ctx.stats.channels_open.fetch_sub(1, Ordering::Relaxed);
                self.ctx.rooms.leave(&channel.room, self.conn);
                self.push(protocol::phx_close(self.vsn, channel.join_ref.as_deref().or(join_ref), &msg.topic));
                if channel.subscribed {
                    self.control(Control::Leave { conn: self.conn, topic: msg.topic.clone() }).await;
                }
            }
            None => self.push(protocol::phx_close(self.vsn, join_ref, &msg.topic)),
        }
    }

    /// Closes a channel with a system error (token problems).
    async fn close_channel(&mut self, topic: &str, message: &str) {
        let Some(channel) = self.channels.remove(topic) else { return };
        self.ctx.stats.channels_open.fetch_sub(1, Ordering::Relaxed);
        self.ctx.rooms.leave(&channel.room, self.conn);
        if channel.subscribed {
            // Remove the subscription first: nothing may reach the channel after this.
            self.control(Control::Leave { conn: self.conn, topic: topic.to_owned() }).await;
        }
        self.push(protocol::system(self.vsn, channel.join_ref.as_deref(), topic, "system", "error", message));
        self.push(protocol::phx_close(self.vsn, channel.join_ref.as_deref(), topic));
    }

    async fn access_token(&mut self, msg: &Message) {
        let Some(channel) = self.channels.get(&msg.topic) else {
            self.push(protocol::reply(self.vsn, msg, "error", json!({"reason": "unmatched topic"})));
            return;
        };
        let Some(token) = join::usable_token(msg.payload.get("access_token")) else { return };
        if token == channel.token {
            return;
        }
        let (private, presence, old_read) = (channel.room.private, channel.presence_enabled, channel.read);
        match self.ctx.verifier.verify(&token, now_unix()) {
            Ok(claims) => {
                if !self.count_user(claims.sub.as_deref()) {
                    let reason = self.user_budget_reason();
                    self.close_channel(&msg.topic, &reason).await;
                    return;
                }
                let viewer = claims.viewer();
                let sub_topic = msg.topic.strip_prefix("realtime:").unwrap_or(&msg.topic).to_owned();
                let read = if private {
                    // Re-run the read check as the new token; losing a right closes the channel.
                    match self.read_check(&claims, &sub_topic, presence).await {
                        Ok(grant) if grant.broadcast >= old_read.broadcast && grant.presence >= old_read.presence => {
                            grant
                        }
                        Ok(_) => {
                            self.ctx.stats.private_revoked.fetch_add(1, Ordering::Relaxed);
                            let reason =
                                format!("You no longer have permission to read from this Channel topic: {sub_topic}");
                            self.close_channel(&msg.topic, &reason).await;
                            return;
                        }
                        Err(reason) => {
                            // Supabase's text here has no `Unauthorized: ` prefix.
                            self.ctx.stats.private_revoked.fetch_add(1, Ordering::Relaxed);
                            let reason = reason.trim_start_matches("Unauthorized: ");
                            self.close_channel(&msg.topic, reason).await;
                            return;
                        }
                    }
                } else {
                    old_read
                };
                let Some(channel) = self.channels.get_mut(&msg.topic) else { return };
                channel.read = read;
                channel.writes = [None, None];
                if read != old_read {
                    let member = self.member(&self.channels[&msg.topic]);
                    let room = self.channels[&msg.topic].room.clone();
                    self.ctx.rooms.join(&room, member);
                }
                let Some(channel) = self.channels.get_mut(&msg.topic) else { return };
                channel.token = token;
                channel.claims = claims;
                let (subscribed, join_ref) = (channel.subscribed, channel.join_ref.clone());
                if subscribed {
                    let on_live = self.subscribed_frame(&msg.topic, join_ref.as_deref());
                    self.control(Control::Reauth {
                        conn: self.conn,
                        topic: msg.topic.clone(),
                        viewer,
                        on_live: Some(on_live),
                    })
                    .await;
                }
            }
            Err(err) => {
                tracing::debug!(conn = self.conn, error = %err, "access_token refused; closing the channel");
                self.close_channel(&msg.topic, &err.to_string()).await;
            }
        }
    }

    async fn expire_channels(&mut self) {
        let now = now_unix();
        let expired: Vec<(String, i64)> = self
            .channels
            .iter()
            .filter(|(_, c)| c.claims.exp <= now)
            .map(|(topic, c)| (topic.clone(), now - c.claims.exp))
            .collect();
        for (topic, ago) in expired {
            self.ctx.stats.tokens_expired.fetch_add(1, Ordering::Relaxed);
            self.close_channel(&topic, &format!("Token has expired {ago} seconds ago")).await;
        }
    }

    /// Ends the session; `writer` is the writer task unless it already ended.
    async fn finish(self, end: End, writer: Option<tokio::task::JoinHandle<()>>) {
        // Subscriptions go first, so the hub stops queueing for this socket.
        let _ = self.ctx.hub.send(Control::Disconnect { conn: self.conn }).await;
        for channel in self.channels.values() {
            self.ctx.rooms.leave(&channel.room, self.conn);
        }
        self.ctx.stats.channels_open.fetch_sub(self.channels.len() as u64, Ordering::Relaxed);
        self.ctx.stats.sockets_open.fetch_sub(1, Ordering::Relaxed);
        let reason = match end {
            End::Close(reason) => reason,
            End::Peer => CloseReason { code: 1000, reason: String::new() },
        };
        self.outbox.close(reason);
        let Some(writer) = writer else {
            tracing::debug!(conn = self.conn, "socket closed");
            return;
        };
        let mut writer = writer;
        if tokio::time::timeout(self.ctx.limits.write_timeout, &mut writer).await.is_err() {
            // Stop it, or it would hold the socket (and its outbox) on.
            writer.abort();
            tracing::debug!(conn = self.conn, "writer did not finish in time; dropping the socket");
        }
        tracing::debug!(conn = self.conn, "socket closed");
    }
}

/// Writes the outbox to the socket when the hub's own writes could not
/// (the connection's replies, a full socket), then the close frame. Waiting
/// for a full socket is bounded by the write timeout: no progress within it
/// closes the outbox as a slow consumer (1013, counted in `write_stalls`)
/// and the writer goes on to the close frame (a large backlog on a slow
/// link is fine while it moves). A close frame the socket cannot take
/// within the write timeout is dropped with the socket and counted in
/// `close_frames_dropped`.
async fn write_loop(outbox: Arc<Outbox>, ctx: Arc<SessionContext>) {
    let write_timeout = ctx.limits.write_timeout;
    let Some(socket) = outbox.socket() else { return };
    let reason = loop {
        match outbox.wait_work().await {
            Err(reason) => break reason,
            Ok(()) => match outbox.write_now() {
                Written::All => {}
                Written::Failed => return,
                Written::Blocked => {
                    tokio::select! {
                        biased;
                        // Closed as a slow consumer while the socket is full:
                        // the rest was dropped; on to the close frame.
                        () = outbox.discarded() => {
                            if let Some(reason) = outbox.close_reason() {
                                break reason;
                            }
                        }
                        ready = tokio::time::timeout(write_timeout, socket.writable()) => match ready {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return,
                            Err(_) => {
                                if outbox.close_now(CloseReason::write_stalled(write_timeout)) {
                                    ctx.stats.write_stalls.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        },
                    }
                }
            },
        }
    };
    // Boxed: once per socket, and not part of the idle writer's size.
    let sent = Box::pin(tokio::time::timeout(write_timeout, io::close(&outbox, reason.code, &reason.reason))).await;
    if !matches!(sent, Ok(Ok(()))) && reason.code == 1013 {
        ctx.stats.close_frames_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sent once to a channel that missed changes because the database could
/// not keep up with the checks of tables it evaluates.
const WITHHELD: &str = "some changes were not delivered to this channel: the database-evaluation queue of \
                        walcast was full (walcast_database_eval_refused_total)";

/// The `system` notices a join gets from the policy plans: the role does not
/// exist, or the plan of a bound table withholds rows or columns (deduplicated).
fn plan_notices(policies: &crate::policy::PolicySet, role: &str, bindings: &[crate::hub::Binding]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if policies.tables().is_empty() {
        return out;
    }
    if policies.role(role).is_none() {
        out.push(format!(
            "the token's role {role:?} does not exist in the database: no changes will be delivered to this channel"
        ));
        return out;
    }
    let tables = policies.tables();
    for b in bindings {
        for t in &tables {
            if b.schema.as_deref().is_some_and(|s| s != t.schema) || b.table.as_deref().is_some_and(|x| x != t.name) {
                continue;
            }
            if let Some(plan) = t.role(role) {
                for w in &plan.warnings {
                    if !out.contains(w) {
                        out.push(w.clone());
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of seven arguments returns,
    /// without calling it.
    fn future_size7<A, B, C, D, E, G, H, F>(_: &impl FnOnce(A, B, C, D, E, G, H) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The same for two arguments.
    fn future_size2<A, B, F>(_: &impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open socket holds a `run` future and a `write_loop` future for
    /// its whole life, sized for their largest await state: a large await
    /// added inline (a query, the hub's queue, a timer) must be boxed, or
    /// every idle socket pays for it (docs/benchmarks.md, E3: `run` was
    /// 5,592 bytes before the join, token and frame paths were boxed). The
    /// bounds are the unoptimized build's sizes plus ~20 %.
    #[test]
    fn connection_futures_stay_small() {
        let (run, write) = (future_size7(&run), future_size2(&write_loop));
        eprintln!("run: {run} B, write_loop: {write} B");
        assert!(run <= RUN_FUTURE_MAX, "session::run's future is {run} bytes (bound {RUN_FUTURE_MAX})");
        assert!(write <= WRITE_FUTURE_MAX, "write_loop's future is {write} bytes (bound {WRITE_FUTURE_MAX})");
    }

    /// Bound of [`run`]'s future (unoptimized: 1,072 bytes).
    const RUN_FUTURE_MAX: usize = 1280;
    /// Bound of [`write_loop`]'s future (unoptimized: 664 bytes).
    const WRITE_FUTURE_MAX: usize = 800;
}
