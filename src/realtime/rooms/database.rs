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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use serde_json::{json, Value};

    use super::super::{LocalRooms, Member};
    use super::*;
    use crate::hub::{ConnId, Outbox, OutboxLimits, Vsn};

    fn join(rooms: &LocalRooms, room: &RoomKey, conn: ConnId, vsn: Vsn) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(OutboxLimits::default()));
        let member = Member {
            conn,
            vsn,
            outbox: Arc::clone(&outbox),
            join_ref: None,
            echo: false,
            broadcasts: true,
            presence: true,
            gate: None,
        };
        rooms.join(room, member);
        outbox
    }

    fn frames(outbox: &Outbox) -> Vec<Bytes> {
        let mut out = Vec::new();
        outbox.try_drain(&mut out);
        out
    }

    fn message(topic: &str, private: bool, payload: &'static [u8]) -> DbMessage {
        DbMessage {
            id: "6b0c8e4e-6f7a-4d2e-9a55-0c1c3b1e2f10".into(),
            topic: topic.into(),
            event: "ev".into(),
            private,
            encoding: 1,
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn each_message_reaches_the_room_of_its_topic_and_privacy() {
        let rooms = LocalRooms::new(1);
        let stats = DbBroadcastStats::default();
        let public = join(&rooms, &RoomKey::new("realtime:room-1", false), 1, Vsn::V1);
        let private = join(&rooms, &RoomKey::new("realtime:room-1", true), 2, Vsn::V1);
        let v2 = join(&rooms, &RoomKey::new("realtime:room-1", false), 3, Vsn::V2);
        assert_eq!(deliver(&rooms, &stats, 64, &message("room-1", false, br#"{"a":1}"#)), 2);
        assert!(frames(&private).is_empty(), "a private room never gets a public row");
        let text: Value = serde_json::from_slice(&frames(&public)[0]).unwrap();
        assert_eq!(
            text,
            json!({"topic": "realtime:room-1", "event": "broadcast", "ref": null, "payload": {
                "type": "broadcast", "event": "ev", "meta": {"id": "6b0c8e4e-6f7a-4d2e-9a55-0c1c3b1e2f10"},
                "payload": {"a": 1}}})
        );
        // 2.0.0: kind 4 with the meta: 04, topic/event/meta lengths, encoding 1.
        let binary = &frames(&v2)[0];
        let meta = br#"{"id":"6b0c8e4e-6f7a-4d2e-9a55-0c1c3b1e2f10"}"#;
        assert_eq!(binary[..5], [4, 15, 2, meta.len() as u8, 1]);
        assert!(binary.ends_with(br#"{"a":1}"#));
        assert_eq!(deliver(&rooms, &stats, 64, &message("room-1", true, b"{}")), 1);
        assert_eq!(frames(&private).len(), 1);
        assert!(frames(&public).is_empty() && frames(&v2).is_empty());
        assert_eq!(deliver(&rooms, &stats, 64, &message("nobody", false, b"{}")), 0);
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 3);
        assert_eq!(stats.frames.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_payload_over_the_limit_is_dropped_and_counted() {
        let rooms = LocalRooms::new(1);
        let stats = DbBroadcastStats::default();
        let outbox = join(&rooms, &RoomKey::new("realtime:room-1", false), 1, Vsn::V2);
        assert_eq!(deliver(&rooms, &stats, 4, &message("room-1", false, br#"{"a":1}"#)), 0);
        assert!(frames(&outbox).is_empty());
        assert_eq!(stats.dropped_by_reason()[2], ("too_large", 1));
        assert_eq!(stats.delivered.load(Ordering::Relaxed), 0);
        assert_eq!(deliver(&rooms, &stats, 7, &message("room-1", false, br#"{"a":1}"#)), 1, "at the limit: sent");
    }
}
