//! Phoenix framing, sans-IO: client frames in, server frames out, for both
//! serializers Supabase Realtime speaks.
//!
//! | vsn | text frame |
//! |---|---|
//! | 1.0.0 | `{"topic","event","payload","ref","join_ref"?}`; the server never sends `join_ref` |
//! | 2.0.0 | `[join_ref, ref, topic, event, payload]`; extra trailing elements are tolerated |
//!
//! 2.0.0 clients send Broadcast pushes as binary frames (kind 3, see
//! `realtime-protocol.md` §2); [`decode_binary`] reads their header without
//! trusting any length, so a malformed frame is an error value, never a panic.
//! Server frames are plain text: realtime-js cannot decode binary kinds 0–2.

use bytes::Bytes;
use serde_json::Value;

use crate::hub::Vsn;

/// Longest event or ref accepted (bytes); longer ones make the frame
/// undecodable.
const MAX_FIELD_LEN: usize = 1024;

/// Longest topic a channel may have (bytes). Longer topics still decode (the
/// frame is bounded by the message size limit) so that the session can
/// answer them with an error reply instead of dropping the frame silently,
/// which would leave the client's join waiting for its timeout.
pub const MAX_TOPIC_LEN: usize = 1024;

/// One client message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The channel's join ref (`None` for heartbeats and vsn 1.0.0 clients that omit it).
    pub join_ref: Option<String>,
    /// The message ref, echoed in the reply.
    pub msg_ref: Option<String>,
    /// `realtime:<name>` or `phoenix`.
    pub topic: String,
    /// `phx_join`, `heartbeat`, `access_token`, …
    pub event: String,
    /// The payload (an object for every event walcast handles).
    pub payload: Value,
}

/// A frame the server could not read. The connection stays open: Phoenix
/// logs and ignores such frames, and so do we.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not JSON.
    #[error("frame is not valid JSON: {0}")]
    Json(String),
    /// JSON of the wrong shape for the socket's serializer.
    #[error("frame does not match the {vsn} serializer: {what}")]
    Shape {
        /// `1.0.0` or `2.0.0`.
        vsn: &'static str,
        /// What is wrong.
        what: &'static str,
    },
    /// A binary frame that is truncated or of an unknown kind.
    #[error("malformed binary frame: {0}")]
    Binary(&'static str),
}

/// The version string of a serializer.
pub fn vsn_str(vsn: Vsn) -> &'static str {
    match vsn {
        Vsn::V1 => "1.0.0",
        Vsn::V2 => "2.0.0",
    }
}

/// The serializer for a `vsn` query parameter (`None` = missing = 1.0.0).
pub fn parse_vsn(vsn: Option<&str>) -> Option<Vsn> {
    match vsn {
        None | Some("1.0.0") => Some(Vsn::V1),
        Some("2.0.0") => Some(Vsn::V2),
        Some(_) => None,
    }
}

/// Decodes a text frame.
///
/// # Errors
/// [`ProtocolError::Json`] or [`ProtocolError::Shape`].
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Message, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|e| ProtocolError::Json(e.to_string()))?;
    match vsn {
        Vsn::V1 => decode_v1(value),
        Vsn::V2 => decode_v2(value),
    }
}

fn shape(vsn: Vsn, what: &'static str) -> ProtocolError {
    ProtocolError::Shape { vsn: vsn_str(vsn), what }
}

/// A ref as sent: a string, or (leniently) a number; `null` or absent = none.
fn opt_ref(vsn: Vsn, value: Option<Value>) -> Result<Option<String>, ProtocolError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_FIELD_LEN => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(shape(vsn, "a ref must be a string or null")),
    }
}

fn string(vsn: Vsn, value: Option<Value>, what: &'static str) -> Result<String, ProtocolError> {
    match value {
        Some(Value::String(s)) if s.len() <= MAX_FIELD_LEN => Ok(s),
        _ => Err(shape(vsn, what)),
    }
}

/// A topic of any length (see [`MAX_TOPIC_LEN`]).
fn topic(vsn: Vsn, value: Option<Value>, what: &'static str) -> Result<String, ProtocolError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        _ => Err(shape(vsn, what)),
    }
}

fn decode_v1(value: Value) -> Result<Message, ProtocolError> {
    let Value::Object(mut map) = value else {
        return Err(shape(Vsn::V1, "expected a JSON object"));
    };
    let topic = topic(Vsn::V1, map.remove("topic"), "`topic` must be a string")?;
    let event = string(Vsn::V1, map.remove("event"), "`event` must be a string")?;
    let payload = map.remove("payload").ok_or_else(|| shape(Vsn::V1, "`payload` is missing"))?;
    let msg_ref = opt_ref(Vsn::V1, map.remove("ref"))?;
    let join_ref = opt_ref(Vsn::V1, map.remove("join_ref"))?;
    Ok(Message { join_ref, msg_ref, topic, event, payload })
}

fn decode_v2(value: Value) -> Result<Message, ProtocolError> {
    let Value::Array(items) = value else {
        return Err(shape(Vsn::V2, "expected a JSON array [join_ref, ref, topic, event, payload]"));
    };
    if items.len() < 5 {
        return Err(shape(Vsn::V2, "expected 5 elements [join_ref, ref, topic, event, payload]"));
    }
    let mut items = items.into_iter();
    let join_ref = opt_ref(Vsn::V2, items.next())?;
    let msg_ref = opt_ref(Vsn::V2, items.next())?;
    let topic = topic(Vsn::V2, items.next(), "the topic must be a string")?;
    let event = string(Vsn::V2, items.next(), "the event must be a string")?;
    let payload = items.next().unwrap_or(Value::Null);
    Ok(Message { join_ref, msg_ref, topic, event, payload })
}

/// The header of a 2.0.0 binary Broadcast push (kind 3); the payload is not
/// interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryPush {
    /// The channel's join ref.
    pub join_ref: Option<String>,
    /// The push's ref.
    pub msg_ref: Option<String>,
    /// The topic.
    pub topic: String,
    /// The user event name.
    pub event: String,
    /// The payload's encoding: 1 JSON, 0 raw bytes.
    pub encoding: u8,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Reads a binary frame (kind 3 `user_broadcast_push`).
///
/// # Errors
/// [`ProtocolError::Binary`] when the frame is not kind 3, is shorter than
/// its lengths claim, or holds invalid UTF-8.
pub fn decode_binary(frame: &[u8]) -> Result<BinaryPush, ProtocolError> {
    const HEADER: usize = 7;
    let Some((&kind, rest)) = frame.split_first() else {
        return Err(ProtocolError::Binary("empty frame"));
    };
    if kind != 3 {
        return Err(ProtocolError::Binary("only kind 3 (user broadcast push) is accepted from clients"));
    }
    if frame.len() < HEADER {
        return Err(ProtocolError::Binary("header shorter than 7 bytes"));
    }
    let lens = [rest[0], rest[1], rest[2], rest[3], rest[4]].map(usize::from);
    let mut body = &frame[HEADER..];
    let mut take = |len: usize| -> Result<&[u8], ProtocolError> {
        if body.len() < len {
            return Err(ProtocolError::Binary("a field is longer than what remains of the frame"));
        }
        let (field, remaining) = body.split_at(len);
        body = remaining;
        Ok(field)
    };
    let text = |bytes: &[u8]| -> Result<String, ProtocolError> {
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| ProtocolError::Binary("a field is not UTF-8"))
    };
    let join_ref = text(take(lens[0])?)?;
    let msg_ref = text(take(lens[1])?)?;
    let topic = text(take(lens[2])?)?;
    let event = text(take(lens[3])?)?;
    take(lens[4])?; // meta
    let encoding = rest[5];
    if encoding > 1 {
        return Err(ProtocolError::Binary("payload encoding is neither 0 (binary) nor 1 (JSON)"));
    }
    let payload = body.to_vec();
    let opt = |s: String| if s.is_empty() { None } else { Some(s) };
    Ok(BinaryPush { join_ref: opt(join_ref), msg_ref: opt(msg_ref), topic, event, encoding, payload })
}

/// A kind 4 `user_broadcast` frame (server → 2.0.0 client): `kind,
/// topic_len, event_len, meta_len, encoding`, topic, event, meta (JSON, or
/// empty), payload. `None` when the topic, event or meta is longer than 255
/// bytes (the frame's lengths are one byte).
pub fn user_broadcast(topic: &str, event: &str, meta: &[u8], encoding: u8, payload: &[u8]) -> Option<Bytes> {
    let topic_len = u8::try_from(topic.len()).ok()?;
    let event_len = u8::try_from(event.len()).ok()?;
    let meta_len = u8::try_from(meta.len()).ok()?;
    let mut out = Vec::with_capacity(5 + topic.len() + event.len() + meta.len() + payload.len());
    out.extend_from_slice(&[USER_BROADCAST, topic_len, event_len, meta_len, encoding]);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(payload);
    Some(Bytes::from(out))
}

/// The first byte of a kind 4 frame. Every text frame walcast sends starts
/// with `[` or `{`, so the writer tells binary frames by this byte.
pub const USER_BROADCAST: u8 = 4;

/// Encodes a server frame. `join_ref` is dropped for vsn 1.0.0, as Supabase's
/// V1 serializer does.
pub fn encode(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> Bytes {
    let value = match vsn {
        Vsn::V1 => serde_json::json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref}),
        Vsn::V2 => serde_json::json!([join_ref, msg_ref, topic, event, payload]),
    };
    Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
}

/// `phx_reply` with `{"status": status, "response": response}`.
pub fn reply(vsn: Vsn, msg: &Message, status: &str, response: Value) -> Bytes {
    reply_to(vsn, msg.join_ref.as_deref(), msg.msg_ref.as_deref(), &msg.topic, status, response)
}

/// `phx_reply` for explicit refs.
pub fn reply_to(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    status: &str,
    response: Value,
) -> Bytes {
    encode(vsn, join_ref, msg_ref, topic, "phx_reply", &serde_json::json!({"status": status, "response": response}))
}

/// An error reply `{"reason": reason}`.
pub fn error_reply(vsn: Vsn, join_ref: Option<&str>, msg_ref: Option<&str>, topic: &str, reason: &str) -> Bytes {
    reply_to(vsn, join_ref, msg_ref, topic, "error", serde_json::json!({ "reason": reason }))
}

/// `phx_close` of a channel (`ref` = `join_ref`, so realtime-js accepts it).
pub fn phx_close(vsn: Vsn, join_ref: Option<&str>, topic: &str) -> Bytes {
    encode(vsn, join_ref, join_ref, topic, "phx_close", &serde_json::json!({}))
}

/// A `system` push of a channel.
pub fn system(vsn: Vsn, join_ref: Option<&str>, topic: &str, extension: &str, status: &str, message: &str) -> Bytes {
    let channel = topic.strip_prefix("realtime:").unwrap_or(topic);
    let payload = serde_json::json!({
        "extension": extension,
        "status": status,
        "message": message,
        "channel": channel,
    });
    encode(vsn, join_ref, None, topic, "system", &payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_objects_with_and_without_join_ref() {
        let m = decode_text(Vsn::V1, r#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"7"}"#).unwrap();
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref.as_deref(), Some("7"));
        assert_eq!(m.topic, "phoenix");
        let m = decode_text(
            Vsn::V1,
            r#"{"topic":"realtime:a","event":"phx_join","payload":{"config":{}},"ref":"1","join_ref":"1"}"#,
        )
        .unwrap();
        assert_eq!(m.join_ref.as_deref(), Some("1"));
        assert_eq!(m.payload, json!({"config":{}}));
    }

    #[test]
    fn v2_arrays_with_nulls_numbers_and_extra_elements() {
        let m = decode_text(Vsn::V2, r#"[null,"7","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!((m.join_ref, m.msg_ref.as_deref()), (None, Some("7")));
        let m = decode_text(Vsn::V2, r#"[1,2,"realtime:x","phx_leave",{},"extra"]"#).unwrap();
        assert_eq!((m.join_ref.as_deref(), m.msg_ref.as_deref()), (Some("1"), Some("2")));
    }

    #[test]
    fn malformed_frames_are_errors() {
        for (vsn, text) in [
            (Vsn::V1, "not json"),
            (Vsn::V1, "[null,null,\"a\",\"b\",{}]"),
            (Vsn::V1, r#"{"topic":"a","event":"b"}"#),
            (Vsn::V1, r#"{"topic":1,"event":"b","payload":{}}"#),
            (Vsn::V2, r#"{"topic":"a","event":"b","payload":{}}"#),
            (Vsn::V2, r#"[null,null,"a","b"]"#),
            (Vsn::V2, r#"[null,null,5,"b",{}]"#),
            (Vsn::V2, r#"[{},null,"a","b",{}]"#),
            (Vsn::V2, ""),
        ] {
            assert!(decode_text(vsn, text).is_err(), "{text}");
        }
        let long = "x".repeat(MAX_FIELD_LEN + 1);
        assert!(decode_text(Vsn::V2, &format!(r#"[null,null,"a","{long}",{{}}]"#)).is_err(), "a long event");
        // A long topic decodes: the session answers it with an error reply.
        let message = decode_text(Vsn::V2, &format!(r#"[null,"1","{long}","phx_join",{{}}]"#)).unwrap();
        assert_eq!(message.topic.len(), MAX_FIELD_LEN + 1);
    }

    #[test]
    fn server_frames_per_vsn() {
        let payload = json!({"status":"ok","response":{}});
        let v1 = encode(Vsn::V1, Some("1"), Some("2"), "realtime:a", "phx_reply", &payload);
        let v1: Value = serde_json::from_slice(&v1).unwrap();
        assert_eq!(v1, json!({"topic":"realtime:a","event":"phx_reply","payload":payload,"ref":"2"}));
        let v2 = encode(Vsn::V2, Some("1"), Some("2"), "realtime:a", "phx_reply", &payload);
        let v2: Value = serde_json::from_slice(&v2).unwrap();
        assert_eq!(v2, json!(["1", "2", "realtime:a", "phx_reply", payload]));
        let close: Value = serde_json::from_slice(&phx_close(Vsn::V2, Some("3"), "realtime:a")).unwrap();
        assert_eq!(close, json!(["3", "3", "realtime:a", "phx_close", {}]));
        let system: Value =
            serde_json::from_slice(&system(Vsn::V2, Some("3"), "realtime:a", "postgres_changes", "ok", "hi")).unwrap();
        assert_eq!(
            system,
            json!(["3", null, "realtime:a", "system", {"extension":"postgres_changes","status":"ok","message":"hi","channel":"a"}])
        );
    }

    #[test]
    fn binary_kind_3_header() {
        let mut frame = vec![3, 1, 1, 13, 6, 0, 1];
        frame.extend_from_slice(b"15realtime:roomcursor{\"x\":1}");
        let push = decode_binary(&frame).unwrap();
        assert_eq!(push.join_ref.as_deref(), Some("1"));
        assert_eq!(push.msg_ref.as_deref(), Some("5"));
        assert_eq!(push.topic, "realtime:room");
        assert_eq!(push.event, "cursor");
        assert_eq!((push.encoding, push.payload.as_slice()), (1, &b"{\"x\":1}"[..]));
        for bad in [
            &[][..],
            &[4, 0, 0, 0, 0, 0, 0],
            &[3, 1, 1],
            &[3, 9, 0, 0, 0, 0, 0, b'1'],
            &[3, 1, 0, 0, 0, 0, 0, 0xff],
            &[3, 0, 0, 0, 0, 0, 2],
        ] {
            assert!(decode_binary(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn binary_kind_4() {
        let frame = user_broadcast("realtime:room", "cursor", b"", 1, b"{\"x\":1}").unwrap();
        let mut want = vec![4, 13, 6, 0, 1];
        want.extend_from_slice(b"realtime:roomcursor{\"x\":1}");
        assert_eq!(&frame[..], &want[..]);
        assert!(user_broadcast(&"x".repeat(256), "e", b"", 1, b"").is_none());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_binary(&bytes);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = decode_text(Vsn::V1, text);
                let _ = decode_text(Vsn::V2, text);
            }
        }
    }
}
