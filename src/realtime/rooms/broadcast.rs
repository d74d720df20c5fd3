//! Broadcast frames: what a broadcast looks like to each receiver, by its
//! source and the receiver's protocol version (broadcast-presence.md §2.2).
//!
//! - A text push (or a REST batch item) reaches 2.0.0 sockets as
//!   `[null,null,topic,"broadcast",P]` and 1.0.0 sockets as
//!   `{"topic","event":"broadcast","payload":P,"ref":null}`, P verbatim.
//! - A kind 3 push (or a REST single message) reaches 2.0.0 sockets as kind
//!   4 and 1.0.0 sockets as text with `P = {"event","payload","type"}` when
//!   its payload is JSON; raw bytes are not sent to 1.0.0 sockets (Supabase
//!   drops them).
//! - A `realtime.messages` row is the same with `meta: {"id": …}`.
//!
//! Each frame is built once per receiving format and shared ([`Frames`]);
//! the payload is never parsed again for a 2.0.0 receiver.

use bytes::Bytes;
use serde_json::Value;

use crate::hub::Vsn;
use crate::realtime::protocol;

/// What is broadcast.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// A text `broadcast` map, serialized once, sent on verbatim as P.
    Text(&'a [u8]),
    /// A kind 3 push or a REST single message.
    Binary {
        /// The user event.
        event: &'a str,
        /// 1 JSON, 0 raw bytes.
        encoding: u8,
        /// The payload.
        payload: &'a [u8],
    },
    /// A committed `realtime.messages` row (Broadcast from Database).
    Database {
        /// The row's `event`.
        event: &'a str,
        /// The row's `id` (`meta.id`).
        id: &'a str,
        /// 1: `payload` (JSON); 0: `binary_payload` (raw bytes).
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
            Message::Binary { payload, .. } | Message::Database { payload, .. } => payload.len(),
        }
    }

    /// The row id of a database message.
    pub fn id(&self) -> Option<&str> {
        match self {
            Message::Database { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// The frames of one message, built on first use per receiving format.
#[derive(Debug)]
pub struct Frames<'a> {
    topic: &'a str,
    message: &'a Message<'a>,
    /// `[v1, v2]`; `Some(None)`: that format receives nothing.
    built: [Option<Option<Bytes>>; 2],
}

impl<'a> Frames<'a> {
    /// Frames of `message` on `topic`.
    pub fn new(topic: &'a str, message: &'a Message<'a>) -> Frames<'a> {
        Frames { topic, message, built: [None, None] }
    }

    /// The frame for a `vsn` receiver (`None`: not sent to it).
    pub fn get(&mut self, vsn: Vsn) -> Option<&Bytes> {
        let slot = usize::from(vsn == Vsn::V2);
        let (topic, message) = (self.topic, self.message);
        self.built[slot].get_or_insert_with(|| frame(vsn, topic, message)).as_ref()
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
    match (*message, vsn) {
        (Message::Text(json), _) => Some(text_frame(vsn, topic, json)),
        (Message::Binary { event, encoding, payload }, Vsn::V2) => {
            protocol::user_broadcast(topic, event, b"", encoding, payload)
        }
        (Message::Database { event, id, encoding, payload }, Vsn::V2) => {
            let meta = serde_json::to_vec(&serde_json::json!({ "id": id })).ok()?;
            protocol::user_broadcast(topic, event, &meta, encoding, payload)
        }
        (Message::Binary { event, encoding: 1, payload }, Vsn::V1) => {
            let payload: Value = serde_json::from_slice(payload).ok()?;
            let value = serde_json::json!({"event": event, "payload": payload, "type": "broadcast"});
            Some(protocol::encode(vsn, None, None, topic, "broadcast", &value))
        }
        (Message::Database { event, id, encoding: 1, payload }, Vsn::V1) => {
            let payload: Value = serde_json::from_slice(payload).ok()?;
            let value =
                serde_json::json!({"event": event, "meta": {"id": id}, "payload": payload, "type": "broadcast"});
            Some(protocol::encode(vsn, None, None, topic, "broadcast", &value))
        }
        (Message::Binary { .. } | Message::Database { .. }, Vsn::V1) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn get(message: &Message<'_>, vsn: Vsn) -> Option<Bytes> {
        Frames::new("realtime:r", message).get(vsn).cloned()
    }

    #[test]
    fn frames_per_source_and_receiver() {
        let p = json!({"type": "broadcast", "event": "e", "payload": {"x": 1}});
        let json = serde_json::to_vec(&p).unwrap();
        let text = Message::Text(&json);
        let v1: Value = serde_json::from_slice(&get(&text, Vsn::V1).unwrap()).unwrap();
        assert_eq!(v1, json!({"topic": "realtime:r", "event": "broadcast", "payload": p, "ref": null}));
        let v2: Value = serde_json::from_slice(&get(&text, Vsn::V2).unwrap()).unwrap();
        assert_eq!(v2, json!([null, null, "realtime:r", "broadcast", p]));

        let bin = Message::Binary { event: "e", encoding: 1, payload: b"{\"x\":2}" };
        assert_eq!(get(&bin, Vsn::V2).unwrap()[0], protocol::USER_BROADCAST);
        let v1: Value = serde_json::from_slice(&get(&bin, Vsn::V1).unwrap()).unwrap();
        assert_eq!(v1["payload"], json!({"event": "e", "payload": {"x": 2}, "type": "broadcast"}));
        let raw = Message::Binary { event: "e", encoding: 0, payload: &[0xff, 0] };
        assert!(get(&raw, Vsn::V1).is_none(), "raw bytes are not sent to 1.0.0");

        let db = Message::Database { event: "ev", id: "6b0c", encoding: 1, payload: b"{\"a\":1}" };
        let v2 = get(&db, Vsn::V2).unwrap();
        let mut want = vec![4, 10, 2, 13, 1];
        want.extend_from_slice(b"realtime:rev{\"id\":\"6b0c\"}{\"a\":1}");
        assert_eq!(&v2[..], &want[..]);
        let v1: Value = serde_json::from_slice(&get(&db, Vsn::V1).unwrap()).unwrap();
        assert_eq!(
            v1["payload"],
            json!({"event": "ev", "meta": {"id": "6b0c"}, "payload": {"a": 1}, "type": "broadcast"})
        );
    }
}
