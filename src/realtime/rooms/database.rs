//! Broadcast from Database's delivery stage: takes the `realtime.messages`
//! rows the change stage hands on (see [`crate::relay::messages`]), in
//! commit order, and sends each to the room of its topic.
//!
//! ```text
//!  change stage ──DbMessage (bounded, 1024)──▶ run ──rooms.send(realtime:<topic>, private)──▶ outboxes
//! ```
//!
//! Each message goes to every member of `RoomKey::new("realtime:<topic>",
//! private)` as [`Message::Database`] (supabase-js 2.0.0: kind 4 with
//! `meta.id`; 1.0.0 and Python: text with `meta`; raw bytes only to 2.0.0),
//! from the server (`from = None`: no `self` rule applies). A payload over
//! the broadcast limit is dropped and counted, as Supabase drops it.
//!
//! Invariant: the stage never waits on a client — [`Rooms::send`] only
//! pushes to outboxes (a receiver that cannot keep up is closed as slow) —
//! so the change stage, which awaits room in the queue, is never held up
//! by a socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::Instrument;

use super::{Message, RoomKey, Rooms};
use crate::realtime::messages::{DbBroadcastStats, DbMessage, Dropped};

/// Delivers every message of `input` until it closes (the change stage
/// ended).
pub async fn run(
    mut input: mpsc::Receiver<DbMessage>,
    rooms: Arc<dyn Rooms>,
    stats: Arc<DbBroadcastStats>,
    max_bytes: usize,
) {
    async move {
        while let Some(message) = input.recv().await {
            deliver(rooms.as_ref(), &stats, max_bytes, &message);
        }
    }
    .instrument(tracing::info_span!("db_broadcast"))
    .await
}

/// Sends one message to its room; returns the frames queued.
pub fn deliver(rooms: &dyn Rooms, stats: &DbBroadcastStats, max_bytes: usize, message: &DbMessage) -> usize {
    if message.payload.len() > max_bytes {
        stats.dropped(Dropped::TooLarge);
        tracing::debug!(bytes = message.payload.len(), max_bytes, "realtime.messages payload over the limit; dropped");
        return 0;
    }
    let room = RoomKey::new(format!("realtime:{}", message.topic), message.private);
    let frames = rooms.send(
        &room,
        None,
        &Message::Database {
            event: &message.event,
            id: &message.id,
            encoding: message.encoding,
            payload: &message.payload,
        },
    );
    stats.delivered.fetch_add(1, Ordering::Relaxed);
    stats.frames.fetch_add(frames as u64, Ordering::Relaxed);
    frames
}
