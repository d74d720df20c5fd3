//! Broadcast: client-to-client messages on public channels, fanned out to
//! every socket joined to the same topic, as Supabase Realtime serves them
//! (broadcast-presence.md §2).
//!
//! ```text
//!  session (text `broadcast` push, or kind 3) ──▶ Broadcasts::send(topic, from)
//!      └─ one frame per receiving format, built once: v2 text / v1 text /
//!         v2 kind 4 ──▶ each member's outbox (the sender's own channel only
//!         with `self`)
//! ```
//!
//! Frames by source and receiver: a text push reaches 2.0.0 sockets as
//! `[null,null,topic,"broadcast",P]` and 1.0.0 sockets as
//! `{"topic","event":"broadcast","payload":P,"ref":null}` (P verbatim); a
//! kind 3 push reaches 2.0.0 sockets as kind 4 and 1.0.0 sockets as text with
//! `P = {"event","payload","type":"broadcast"}` when its payload is JSON
//! (raw bytes are not sent to 1.0.0 sockets, as Supabase drops them).
//!
//! Invariants: a member is (connection, topic), at most once; members are
//! removed when the channel leaves, is replaced or closes, and when the
//! socket ends; a send never waits on a receiver (outbox pushes only; a full
//! outbox closes that receiver as a slow consumer, as for database changes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value;

use super::protocol;
use crate::hub::{CloseReason, ConnId, Outbox, Vsn};

/// Most bytes a receiver may leave unread before a broadcast closes it as a
/// slow consumer.
pub const MAX_BACKLOG: usize = 8 << 20;

/// One joined channel that receives broadcasts.
#[derive(Debug, Clone)]
pub struct Member {
    /// The socket.
    pub conn: ConnId,
    /// Its serializer.
    pub vsn: Vsn,
    /// Its outbox.
    pub outbox: Arc<Outbox>,
    /// `config.broadcast.self`: receive its own broadcasts.
    pub echo: bool,
}

/// What a client broadcast.
#[derive(Debug)]
pub enum Message<'a> {
    /// A text push: the map, serialized once, sent on verbatim.
    Text(&'a [u8]),
    /// A kind 3 push.
    Binary {
        /// The user event.
        event: &'a str,
        /// 1 JSON, 0 raw bytes.
        encoding: u8,
        /// The payload.
        payload: &'a [u8],
    },
}

impl Message<'_> {
    /// Bytes of the payload, for the size limit.
    pub fn size(&self) -> usize {
        match self {
            Message::Text(json) => json.len(),
            Message::Binary { payload, .. } => payload.len(),
        }
    }
}

/// The members of every topic.
#[derive(Debug, Default)]
pub struct Broadcasts {
    topics: Mutex<HashMap<String, Vec<Member>>>,
}

impl Broadcasts {
    /// Adds `member` to `topic` (replacing its connection's earlier one).
    pub fn join(&self, topic: &str, member: Member) {
        let mut topics = self.topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let members = topics.entry(topic.to_owned()).or_default();
        members.retain(|m| m.conn != member.conn);
        members.push(member);
    }

    /// Removes `conn`'s channel on `topic`.
    pub fn leave(&self, topic: &str, conn: ConnId) {
        let mut topics = self.topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(members) = topics.get_mut(topic) {
            members.retain(|m| m.conn != conn);
            if members.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// Members of `topic` now.
    pub fn members(&self, topic: &str) -> usize {
        self.topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(topic).map_or(0, Vec::len)
    }

    /// Sends `message` from `from`'s channel on `topic` to every member
    /// (`from` itself only with `self`); returns how many frames were
    /// queued. A member with more than [`MAX_BACKLOG`] bytes unread is
    /// closed as a slow consumer instead.
    pub fn send(&self, topic: &str, from: ConnId, message: &Message<'_>) -> usize {
        let members: Vec<Member> = {
            let topics = self.topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match topics.get(topic) {
                Some(members) => members.iter().filter(|m| m.conn != from || m.echo).cloned().collect(),
                None => return 0,
            }
        };
        let mut frames: [Option<Option<Bytes>>; 2] = [None, None];
        let mut queued = 0;
        for member in members {
            let slot = usize::from(member.vsn == Vsn::V2);
            let frame = frames[slot].get_or_insert_with(|| frame(member.vsn, topic, message));
            let Some(frame) = frame else { continue };
            if member.outbox.depth().1 > MAX_BACKLOG {
                // Never let one unread socket hold the memory every outbox
                // shares (the hub would pause for everyone).
                member.outbox.close_now(CloseReason {
                    code: 1013,
                    reason: format!("slow consumer: more than {MAX_BACKLOG} bytes unread"),
                });
                continue;
            }
            if member.outbox.push(frame.clone()).is_ok() {
                queued += 1;
            }
        }
        queued
    }
}

/// A `broadcast` push around an already serialized payload (no second
/// serialization per format).
fn text_frame(vsn: Vsn, topic: &str, payload: &[u8]) -> Bytes {
    let topic = serde_json::to_string(topic).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + topic.len() + 64);
    match vsn {
        Vsn::V1 => {
            out.extend_from_slice(b"{\"topic\":");
            out.extend_from_slice(topic.as_bytes());
            out.extend_from_slice(b",\"event\":\"broadcast\",\"payload\":");
            out.extend_from_slice(payload);
            out.extend_from_slice(b",\"ref\":null}");
        }
        Vsn::V2 => {
            out.extend_from_slice(b"[null,null,");
            out.extend_from_slice(topic.as_bytes());
            out.extend_from_slice(b",\"broadcast\",");
            out.extend_from_slice(payload);
            out.push(b']');
        }
    }
    Bytes::from(out)
}

/// The frame `message` takes to a `vsn` socket (`None`: not sent to it).
fn frame(vsn: Vsn, topic: &str, message: &Message<'_>) -> Option<Bytes> {
    match (message, vsn) {
        (Message::Text(json), _) => Some(text_frame(vsn, topic, json)),
        (Message::Binary { event, encoding, payload }, Vsn::V2) => {
            protocol::user_broadcast(topic, event, *encoding, payload)
        }
        (Message::Binary { event, encoding: 1, payload }, Vsn::V1) => {
            let payload: Value = serde_json::from_slice(payload).ok()?;
            let value = serde_json::json!({"event": event, "payload": payload, "type": "broadcast"});
            Some(protocol::encode(vsn, None, None, topic, "broadcast", &value))
        }
        (Message::Binary { .. }, Vsn::V1) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::OutboxLimits;
    use serde_json::json;

    fn member(conn: ConnId, vsn: Vsn, echo: bool) -> (Member, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(OutboxLimits::default()));
        (Member { conn, vsn, outbox: Arc::clone(&outbox), echo }, outbox)
    }

    fn drained(outbox: &Outbox) -> Vec<Bytes> {
        let mut out = Vec::new();
        outbox.try_drain(&mut out);
        out
    }

    #[test]
    fn frames_per_receiver_and_self() {
        let b = Broadcasts::default();
        let (a, a_box) = member(1, Vsn::V2, false);
        let (c, c_box) = member(2, Vsn::V1, false);
        let (d, d_box) = member(3, Vsn::V2, true);
        b.join("realtime:r", a);
        b.join("realtime:r", c);
        b.join("realtime:r", d);
        let p = json!({"type": "broadcast", "event": "e", "payload": {"x": 1}});
        let json = serde_json::to_vec(&p).unwrap();
        assert_eq!(b.send("realtime:r", 1, &Message::Text(&json)), 2, "not to the sender without self");
        assert!(drained(&a_box).is_empty());
        let v1: Value = serde_json::from_slice(&drained(&c_box)[0]).unwrap();
        assert_eq!(v1, json!({"topic": "realtime:r", "event": "broadcast", "payload": p, "ref": null}));
        let v2: Value = serde_json::from_slice(&drained(&d_box)[0]).unwrap();
        assert_eq!(v2, json!([null, null, "realtime:r", "broadcast", p]));
        // Kind 3 from the `self` member: kind 4 to 2.0.0 (itself included), text to 1.0.0.
        let bin = Message::Binary { event: "e", encoding: 1, payload: b"{\"x\":2}" };
        assert_eq!(b.send("realtime:r", 3, &bin), 3);
        assert_eq!(drained(&a_box)[0][0], protocol::USER_BROADCAST);
        assert_eq!(drained(&d_box)[0][0], protocol::USER_BROADCAST);
        let v1: Value = serde_json::from_slice(&drained(&c_box)[0]).unwrap();
        assert_eq!(v1["payload"], json!({"event": "e", "payload": {"x": 2}, "type": "broadcast"}));
        // Raw bytes: not to 1.0.0.
        let raw = Message::Binary { event: "e", encoding: 0, payload: &[0xff, 0] };
        assert_eq!(b.send("realtime:r", 3, &raw), 2);
        assert!(drained(&c_box).is_empty());
        b.leave("realtime:r", 1);
        b.leave("realtime:r", 2);
        b.leave("realtime:r", 3);
        assert_eq!(b.members("realtime:r"), 0);
        assert!(b.topics.lock().unwrap().is_empty());
    }
}
