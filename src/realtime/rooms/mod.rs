//! Rooms: the channels joined to each topic, and what flows between them —
//! Broadcast and Presence (broadcast-presence.md §2, §3).
//!
//! ```text
//!  session (broadcast push, kind 3)  ─┐
//!  http (REST broadcast)             ─┼─▶ Rooms::send ──▶ one frame per receiving
//!  database stage (realtime.messages)─┘                  format, built once ──▶ outboxes
//!  session (track/untrack/leave)     ───▶ Rooms::track … ──▶ presence_diff to the room
//! ```
//!
//! A room is a topic plus its privacy: a public and a private channel of the
//! same name never see each other's messages or presence. [`Rooms`] is the
//! one interface to membership, fan-out and presence state; [`LocalRooms`]
//! serves one node (a cluster implementation can sit behind the same trait:
//! presence entries already carry their node).
//!
//! Invariants: a member is (connection, room), at most once; it is removed
//! when its channel leaves, is replaced or closes, and when its socket ends,
//! and its presence leaves with it; nothing here waits on a receiver
//! (outbox pushes only; a receiver too far behind is closed as a slow
//! consumer); a room's presence frames reach each member in the order the
//! room's state changed, and a member's `presence_state` is built and
//! queued under the same lock as the diffs, so it reflects every diff
//! queued before it.

pub mod broadcast;
pub mod database;
mod local;
pub mod presence;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::hub::{ConnId, Outbox, Vsn};

pub use broadcast::Message;
pub use local::LocalRooms;
pub use presence::{NodeId, Tracked};

/// Most bytes a receiver may leave unread before a broadcast or a presence
/// diff closes it as a slow consumer.
pub const MAX_BACKLOG: usize = 8 << 20;

/// A room: the topic as joined (`realtime:room-1`) and whether its channels
/// are private.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomKey {
    /// The topic, with its `realtime:` prefix.
    pub topic: String,
    /// `config.private`.
    pub private: bool,
}

impl RoomKey {
    /// The room of `topic`.
    pub fn new(topic: impl Into<String>, private: bool) -> RoomKey {
        RoomKey { topic: topic.into(), private }
    }
}

/// One joined channel of a room.
#[derive(Debug, Clone)]
pub struct Member {
    /// The socket.
    pub conn: ConnId,
    /// Its serializer.
    pub vsn: Vsn,
    /// Its outbox.
    pub outbox: Arc<Outbox>,
    /// The channel's `join_ref` (for its `presence_state`).
    pub join_ref: Option<String>,
    /// `config.broadcast.self`: receives its own broadcasts.
    pub echo: bool,
    /// Receives broadcasts (a private channel: the read policy allows
    /// `broadcast`).
    pub broadcasts: bool,
    /// Receives presence diffs (a private channel: the read policy allows
    /// `presence`; public channels always do).
    pub presence: bool,
    /// While its join replays stored messages: broadcasts are held here,
    /// then sent after the replayed ones, without the replayed ids.
    pub gate: Option<Arc<ReplayGate>>,
}

/// Holds a member's broadcasts while its join replays stored messages
/// (broadcast-presence.md §5.3): live traffic follows the replayed
/// messages, and a live copy of a replayed message is skipped.
#[derive(Debug, Default)]
pub struct ReplayGate {
    state: std::sync::Mutex<GateState>,
}

#[derive(Debug)]
enum GateState {
    /// Replaying: frames held (with the database row id, if any).
    Holding(Vec<(Option<String>, bytes::Bytes)>),
    /// Replayed: live frames pass, except database rows with these ids.
    Open(std::collections::HashSet<String>),
}

impl Default for GateState {
    fn default() -> Self {
        GateState::Holding(Vec::new())
    }
}

/// A [`ReplayGate`] holds [`MAX_HELD`] frames already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateFull;

/// Most frames a gate holds; past it the member is closed as a slow
/// consumer (the replay query is bounded by its own deadline).
pub const MAX_HELD: usize = 10_000;

impl ReplayGate {
    /// A closed gate.
    pub fn new() -> Arc<ReplayGate> {
        Arc::new(ReplayGate::default())
    }

    /// Whether `frame` (of database row `id`) goes to the outbox now; held
    /// or skipped otherwise.
    ///
    /// # Errors
    /// [`GateFull`] when [`MAX_HELD`] frames are held already.
    pub fn pass(&self, id: Option<&str>, frame: &bytes::Bytes) -> Result<bool, GateFull> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *state {
            GateState::Holding(held) if held.len() >= MAX_HELD => Err(GateFull),
            GateState::Holding(held) => {
                held.push((id.map(str::to_owned), frame.clone()));
                Ok(false)
            }
            GateState::Open(replayed) => Ok(id.is_none_or(|id| !replayed.contains(id))),
        }
    }

    /// Opens the gate once the `replayed` frames are queued to `outbox`:
    /// queues the held frames (without replayed ids) and lets live ones
    /// pass from now on.
    pub fn open(&self, replayed: std::collections::HashSet<String>, outbox: &Outbox) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let GateState::Holding(held) = std::mem::take(&mut *state) {
            for (id, frame) in held {
                if id.as_ref().is_none_or(|id| !replayed.contains(id)) {
                    let _ = outbox.push(frame);
                }
            }
        }
        *state = GateState::Open(replayed);
    }
}

/// Membership, fan-out and presence of every room.
pub trait Rooms: Send + Sync + std::fmt::Debug {
    /// Adds `member` to `room` (replacing its connection's earlier one).
    /// Called before the join is answered, as Supabase subscribes before it
    /// replies: a message sent once the client holds the reply reaches it.
    fn join(&self, room: &RoomKey, member: Member);

    /// Queues the room's `presence_state` to `conn`'s channel (after its
    /// join reply). Diffs queued between the join and this are already in
    /// the state too; clients apply them idempotently (by `phx_ref`).
    fn presence_state(&self, room: &RoomKey, conn: ConnId);

    /// Removes `conn`'s channel from `room`; its presence leaves (a diff to
    /// the rest).
    fn leave(&self, room: &RoomKey, conn: ConnId);

    /// Sends `message` to every member of `room` that receives broadcasts
    /// (`from`'s own channel only with `self`; `None`: from the server, to
    /// everyone). Returns the frames queued.
    fn send(&self, room: &RoomKey, from: Option<ConnId>, message: &Message<'_>) -> usize;

    /// `conn`'s channel tracks `payload` under `key`: a diff to every
    /// member that receives presence. `None` when `conn` is not a member.
    fn track(&self, room: &RoomKey, conn: ConnId, key: &str, payload: Map<String, Value>) -> Option<Tracked>;

    /// `conn`'s channel stops tracking (a leave diff if it tracked).
    fn untrack(&self, room: &RoomKey, conn: ConnId);

    /// Members of `room` now.
    fn members(&self, room: &RoomKey) -> usize;

    /// Presence entries of every room, and rooms, now (for /metrics).
    fn totals(&self) -> RoomTotals;
}

/// Counts over every room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomTotals {
    /// Rooms with a member or a presence.
    pub rooms: usize,
    /// Members of every room.
    pub members: usize,
    /// Presence entries of every room.
    pub presences: usize,
}
