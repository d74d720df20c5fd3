//! Broadcast over HTTP: Supabase Realtime's REST broadcast API
//! (broadcast-presence.md §2.5), which realtime-js `send()` falls back to on
//! a channel that is not joined, and `httpSend()` / Python `http_send()` use.
//!
//! ```text
//!  POST [/realtime/v1]/api/broadcast                          batch: {"messages":[{topic,event,payload,private?,id?}]}
//!  POST [/realtime/v1]/api/broadcast/:topic/events/:event     single: JSON value or raw bytes, ?private=true
//!    ├─ Content-Length over --max-message-bytes → 413; more than 64 bodies being read → 429
//!    ├─ token (Authorization: Bearer, else apikey) verified as for the WebSocket upgrade → else 401
//!    ├─ single: Content-Type json | octet-stream | none (json) → else 415
//!    ├─ body read, at most --max-message-bytes, within 10 s → 413 | 408
//!    ├─ validated: batch 422 {"errors":{"messages":[…]}}, single 422 {"error":…}; > --max-broadcast-bytes → 422
//!    ├─ private: Realtime Authorization write check ([`may_send_private`]) → batch: item skipped; single: 403
//!    └─ delivered to every member of `realtime:<topic>` (public and private rooms apart) → 202, empty body
//! ```
//!
//! What receivers get (§2.2): a batch item is a text `broadcast` whose
//! payload is `{"type":"broadcast","event":E,"payload":P}` (plus
//! `"meta":{"id":…}` when the item had `id`); a single JSON message is a
//! kind 4 frame with encoding 1 on 2.0.0 sockets (1.0.0: text), raw bytes
//! kind 4 with encoding 0 (not sent to 1.0.0 sockets). Messages come from
//! the server: every member receives, whatever its `self`.
//!
//! Invariants:
//! - Bounded: a request body is never buffered past `max_message_bytes`
//!   (refused from its `Content-Length` when it announces more); at most
//!   [`MAX_BODIES_IN_FLIGHT`] bodies are read at once, so the buffers of
//!   all requests together stay under that many times the limit; a batch
//!   holds at most [`MAX_BATCH`] messages; a body must arrive within
//!   [`BODY_TIMEOUT`].
//! - A batch is all or nothing for validation (any invalid item refuses the
//!   request, nothing is sent); private items the caller may not write are
//!   skipped silently, as Supabase does, and counted.
//! - No private message is ever sent without [`may_send_private`] saying
//!   yes (the INSERT policies on `realtime.messages`, as the caller).
//! - Every refusal is a JSON body with its reason and is counted by reason
//!   in `walcast_http_broadcasts_refused_total`. A refusal that comes before
//!   the body is read first discards the body (up to the limit, briefly),
//!   so the client reads the answer instead of a reset connection.
//! - Tokens and payloads are never logged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use super::{param, parse_query, percent_decode_bytes, respond, HttpContext};
use crate::realtime::auth::Claims;
use crate::realtime::authorize::{Asker, Extension};
use crate::realtime::rooms::{Message, RoomKey};
use crate::realtime::session::now_unix;
use crate::realtime::SessionContext;

/// Most messages in one batch request; more is refused with 429 and
/// Supabase's text (Supabase's own bound is the tenant's events per second,
/// 100 by default).
pub const MAX_BATCH: usize = 100;

/// Most request bodies read at once; one more is refused with 429
/// `{"message":"Too many requests"}`. With `--max-message-bytes` (1 MiB)
/// this bounds what broadcast bodies hold to 64 MiB.
pub const MAX_BODIES_IN_FLIGHT: usize = 64;

/// Time a request body has to arrive once the head is read.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a refused request's unread body is read and thrown away
/// before the answer (see the module invariants).
const DISCARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The refusal reasons, as labels of `walcast_http_broadcasts_refused_total`
/// (in the order of [`Refused::index`]).
pub const REASONS: [&str; 10] = [
    "unauthorized",
    "unsupported_media_type",
    "body_too_large",
    "body_timeout",
    "bad_body",
    "invalid",
    "payload_too_large",
    "too_many_messages",
    "busy",
    "forbidden",
];

/// The HTTP broadcast API's shared state.
#[derive(Debug)]
pub struct RestBroadcast {
    /// Permits to read a body ([`MAX_BODIES_IN_FLIGHT`]).
    bodies: Semaphore,
}

impl Default for RestBroadcast {
    fn default() -> Self {
        RestBroadcast { bodies: Semaphore::new(MAX_BODIES_IN_FLIGHT) }
    }
}

/// Which endpoint a request path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// `/api/broadcast`.
    Batch,
    /// `/api/broadcast/:topic/events/:event`, segments decoded.
    Single {
        /// The sub-topic (no `realtime:`).
        topic: String,
        /// The user event.
        event: String,
    },
}

impl Target {
    /// The endpoint `path` (as received: percent-encoded) names, under
    /// `/realtime/v1` or not; `None` for any other path (404 as before).
    pub(super) fn parse(path: &str) -> Option<Target> {
        let rest = path.strip_prefix("/realtime/v1").unwrap_or(path);
        let rest = rest.strip_prefix("/api/broadcast")?.trim_end_matches('/');
        if rest.is_empty() {
            return Some(Target::Batch);
        }
        let mut parts = rest.strip_prefix('/')?.split('/');
        let (Some(topic), Some("events"), Some(event), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let decode = |segment: &str| {
            // A path segment: `+` is itself, only `%XX` is decoded.
            String::from_utf8(percent_decode_bytes(segment, false)).ok().filter(|s| !s.is_empty())
        };
        Some(Target::Single { topic: decode(topic)?, event: decode(event)? })
    }

    fn is_batch(&self) -> bool {
        matches!(self, Target::Batch)
    }
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// No token, or it does not verify.
    #[error("Unauthorized")]
    Unauthorized,
    /// A single message with a content type other than JSON or bytes.
    #[error("Unsupported Media Type. Send application/json or application/octet-stream")]
    UnsupportedMediaType,
    /// The body is larger than `--max-message-bytes`.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The body did not arrive within [`BODY_TIMEOUT`].
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    /// The body is not JSON (or could not be read).
    #[error("bad request body: {0}")]
    BadBody(String),
    /// Batch items that are not valid, each with its reason.
    #[error("invalid messages: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A payload over `--max-broadcast-bytes`.
    #[error("Payload size exceeds tenant limit")]
    PayloadTooLarge,
    /// More than [`MAX_BATCH`] messages in a batch.
    #[error("Too many messages to broadcast, please reduce the batch size")]
    TooManyMessages,
    /// [`MAX_BODIES_IN_FLIGHT`] bodies are being read already.
    #[error("Too many requests")]
    Busy,
    /// A private single message the caller may not write.
    #[error("Unauthorized")]
    Forbidden,
}

impl Refused {
    /// Its place in [`REASONS`].
    pub fn index(&self) -> usize {
        match self {
            Refused::Unauthorized => 0,
            Refused::UnsupportedMediaType => 1,
            Refused::BodyTooLarge(_) => 2,
            Refused::BodyTimeout(_) => 3,
            Refused::BadBody(_) => 4,
            Refused::Invalid(_) => 5,
            Refused::PayloadTooLarge => 6,
            Refused::TooManyMessages => 7,
            Refused::Busy => 8,
            Refused::Forbidden => 9,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::Unauthorized => StatusCode::UNAUTHORIZED,
            Refused::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refused::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refused::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Refused::BadBody(_) => StatusCode::BAD_REQUEST,
            Refused::Invalid(_) | Refused::PayloadTooLarge => StatusCode::UNPROCESSABLE_ENTITY,
            Refused::TooManyMessages | Refused::Busy => StatusCode::TOO_MANY_REQUESTS,
            Refused::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    /// The JSON body, in Supabase's shapes: `{"message":…}` for the auth
    /// and rate refusals, `{"errors":{"messages":[…]}}` for a batch's 422,
    /// `{"error":…}` otherwise (what the clients show).
    fn body(&self, batch: bool) -> Value {
        match self {
            Refused::Unauthorized | Refused::Forbidden | Refused::TooManyMessages | Refused::Busy => {
                json!({ "message": self.to_string() })
            }
            Refused::Invalid(reasons) if batch => json!({ "errors": { "messages": reasons } }),
            Refused::PayloadTooLarge if batch => json!({ "errors": { "messages": [self.to_string()] } }),
            _ => json!({ "error": self.to_string() }),
        }
    }
}

/// Realtime Authorization's write check for HTTP: may the caller (`claims`,
/// with the request's `headers` for `request.headers`) send to the private
/// channel `sub_topic` (no `realtime:`)? Supabase runs the INSERT probe on
/// `realtime.messages` as the caller (broadcast-presence.md §4.3) once per
/// topic and request; REST requests expose all their headers to the
/// policies. A failed check (or a server without an authorizer) denies.
pub async fn may_send_private(ctx: &SessionContext, claims: &Claims, headers: &HeaderMap, sub_topic: &str) -> bool {
    let Some(authorizer) = &ctx.authorizer else { return false };
    let mut exposed = Map::new();
    for (name, value) in headers {
        if let Ok(value) = value.to_str() {
            exposed.insert(name.as_str().to_owned(), Value::String(value.to_owned()));
        }
    }
    let exposed = Value::Object(exposed);
    let asker = Asker { claims, headers: &exposed };
    match authorizer.write(asker, sub_topic, Extension::Broadcast).await {
        Ok(allowed) => allowed,
        Err(err) => {
            tracing::warn!(topic = sub_topic, error = %err, "write check of a REST broadcast failed; denied");
            false
        }
    }
}

/// Serves one broadcast request for `target`.
pub(super) async fn serve(request: Request<Incoming>, target: Target, ctx: &HttpContext) -> Response<Full<Bytes>> {
    let batch = target.is_batch();
    let (parts, body) = request.into_parts();
    let stats = &ctx.sessions.stats;
    match handle(&parts.headers, parts.uri.query(), body, target, ctx).await {
        Ok(sent) => {
            stats.http_broadcasts.fetch_add(sent.messages, Ordering::Relaxed);
            stats.broadcast_frames.fetch_add(sent.frames, Ordering::Relaxed);
            stats.http_broadcasts_private_denied.fetch_add(sent.denied, Ordering::Relaxed);
            accepted()
        }
        Err(refused) => {
            stats.http_broadcasts_refused[refused.index()].fetch_add(1, Ordering::Relaxed);
            if matches!(refused, Refused::Forbidden) {
                stats.http_broadcasts_private_denied.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(reason = %refused, "http broadcast refused");
            let body = serde_json::to_vec(&refused.body(batch)).unwrap_or_default();
            respond(refused.status(), "application/json", Bytes::from(body))
        }
    }
}

/// What a served request did.
#[derive(Debug, Default)]
struct Sent {
    /// Messages sent on.
    messages: u64,
    /// Frames queued to receivers.
    frames: u64,
    /// Private messages skipped: not allowed.
    denied: u64,
}

async fn handle(
    headers: &HeaderMap,
    query: Option<&str>,
    body: Incoming,
    target: Target,
    ctx: &HttpContext,
) -> Result<Sent, Refused> {
    let limit = ctx.sessions.limits.max_message_bytes;
    if content_length(headers).is_some_and(|len| len > limit) {
        // Nothing is read: a client that announced this much is answered at
        // once (it may see a reset if it keeps sending).
        return Err(Refused::BodyTooLarge(limit));
    }
    let Ok(_permit) = ctx.broadcast.bodies.try_acquire() else {
        discard(body, limit).await;
        return Err(Refused::Busy);
    };
    let claims = match verify(headers, &ctx.sessions) {
        Ok(claims) => claims,
        Err(refused) => {
            discard(body, limit).await;
            return Err(refused);
        }
    };
    match target {
        Target::Batch => {
            let body = read_body(body, limit).await?;
            batch(&body, &claims, headers, &ctx.sessions).await
        }
        Target::Single { topic, event } => {
            let query = parse_query(query.unwrap_or(""));
            let private = param(&query, "private") == Some("true");
            // `persist` (realtime-js 2.119) asks Supabase's unreleased
            // storage to keep the message; accepted and ignored, as there.
            let Some(encoding) = media_encoding(headers) else {
                discard(body, limit).await;
                return Err(Refused::UnsupportedMediaType);
            };
            let body = read_body(body, limit).await?;
            single(&body, encoding, &topic, &event, private, &claims, headers, &ctx.sessions).await
        }
    }
}

/// The caller's claims: `Authorization: Bearer <jwt>` if present, else the
/// `apikey` header, verified as the WebSocket upgrade's apikey is.
fn verify(headers: &HeaderMap, sessions: &SessionContext) -> Result<Claims, Refused> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = text(header::AUTHORIZATION).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let token = bearer.or_else(|| text(header::HeaderName::from_static("apikey"))).filter(|t| !t.is_empty());
    let Some(token) = token else { return Err(Refused::Unauthorized) };
    sessions.verifier.verify(token, now_unix()).map_err(|err| {
        tracing::debug!(error = %err, "http broadcast token refused");
        Refused::Unauthorized
    })
}

/// The payload encoding a single message's content type asks for: 1 JSON
/// (also when there is none, as Supabase lets that through), 0 raw bytes;
/// `None` for any other type.
fn media_encoding(headers: &HeaderMap) -> Option<u8> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else { return Some(1) };
    let media = value.to_str().ok()?.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case("application/json") {
        Some(1)
    } else if media.eq_ignore_ascii_case("application/octet-stream") {
        Some(0)
    } else {
        None
    }
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The whole body: at most `limit` bytes, within [`BODY_TIMEOUT`].
async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, Refused>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Err(_) => Err(Refused::BodyTimeout(BODY_TIMEOUT)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => Err(Refused::BodyTooLarge(limit)),
        Ok(Err(err)) => Err(Refused::BadBody(err.to_string())),
    }
}

/// Reads and drops up to `limit` bytes of a body that will not be used
/// (briefly), so the refusal is read by the client instead of a reset.
async fn discard<B: Body<Data = Bytes> + Unpin>(mut body: B, limit: usize) {
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
}

/// One valid batch item.
#[derive(Debug)]
struct Item {
    topic: String,
    private: bool,
    /// The text broadcast's payload, serialized.
    frame: Vec<u8>,
}

/// A batch: validated whole, then each item sent (private ones only if allowed).
async fn batch(body: &[u8], claims: &Claims, headers: &HeaderMap, ctx: &SessionContext) -> Result<Sent, Refused> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Refused::BadBody(format!("not JSON: {e}")))?;
    let items = parse_batch(&value, ctx.limits.max_broadcast_bytes)?;
    let mut sent = Sent::default();
    // Supabase checks each private topic once per request.
    let mut allowed: Vec<(&str, bool)> = Vec::new();
    for item in &items {
        if item.private {
            let known = allowed.iter().find(|(t, _)| *t == item.topic).map(|(_, ok)| *ok);
            let ok = match known {
                Some(ok) => ok,
                None => {
                    let ok = may_send_private(ctx, claims, headers, &item.topic).await;
                    allowed.push((&item.topic, ok));
                    ok
                }
            };
            if !ok {
                sent.denied += 1;
                continue;
            }
        }
        sent.frames += deliver(ctx, &item.topic, item.private, &Message::Text(&item.frame)) as u64;
        sent.messages += 1;
    }
    Ok(sent)
}

/// The batch's items, or every reason it is not valid.
fn parse_batch(value: &Value, max_payload: usize) -> Result<Vec<Item>, Refused> {
    let Some(messages) = value.get("messages") else {
        return Err(Refused::Invalid(vec!["messages: can't be blank".to_owned()]));
    };
    let Some(messages) = messages.as_array() else {
        return Err(Refused::Invalid(vec!["messages: must be an array".to_owned()]));
    };
    if messages.is_empty() {
        return Err(Refused::Invalid(vec!["messages: can't be blank".to_owned()]));
    }
    if messages.len() > MAX_BATCH {
        return Err(Refused::TooManyMessages);
    }
    let mut reasons = Vec::new();
    let mut items = Vec::with_capacity(messages.len());
    let mut too_large = false;
    for (i, message) in messages.iter().enumerate() {
        match parse_item(message, max_payload) {
            Ok(item) => items.push(item),
            Err(ItemError::TooLarge) => too_large = true,
            Err(ItemError::Invalid(why)) => reasons.extend(why.into_iter().map(|w| format!("messages[{i}].{w}"))),
        }
    }
    if !reasons.is_empty() {
        return Err(Refused::Invalid(reasons));
    }
    if too_large {
        return Err(Refused::PayloadTooLarge);
    }
    Ok(items)
}

enum ItemError {
    Invalid(Vec<String>),
    TooLarge,
}

fn parse_item(message: &Value, max_payload: usize) -> Result<Item, ItemError> {
    let Some(fields) = message.as_object() else {
        return Err(ItemError::Invalid(vec!["message: must be an object".to_owned()]));
    };
    let mut why = Vec::new();
    let mut string = |name: &str| match fields.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        None | Some(Value::Null) => {
            why.push(format!("{name}: can't be blank"));
            None
        }
        Some(Value::String(_)) => {
            why.push(format!("{name}: can't be blank"));
            None
        }
        Some(_) => {
            why.push(format!("{name}: must be a string"));
            None
        }
    };
    let topic = string("topic");
    let event = string("event");
    let payload = match fields.get("payload") {
        Some(Value::Object(payload)) => Some(payload),
        None | Some(Value::Null) => {
            why.push("payload: can't be blank".to_owned());
            None
        }
        Some(_) => {
            why.push("payload: must be an object".to_owned());
            None
        }
    };
    let private = match fields.get("private") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        // Ecto's boolean cast, as Supabase reads it.
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(_) => {
            why.push("private: must be a boolean".to_owned());
            false
        }
    };
    let id = match fields.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => {
            why.push("id: must be a string".to_owned());
            None
        }
    };
    let (Some(topic), Some(event), Some(payload), true) = (topic, event, payload, why.is_empty()) else {
        return Err(ItemError::Invalid(why));
    };
    let mut map = Map::new();
    map.insert("type".into(), Value::from("broadcast"));
    map.insert("event".into(), Value::from(event));
    map.insert("payload".into(), Value::Object(payload.clone()));
    if let Some(id) = id {
        map.insert("meta".into(), json!({ "id": id }));
    }
    let frame = serde_json::to_vec(&map).unwrap_or_default();
    if frame.len() > max_payload {
        return Err(ItemError::TooLarge);
    }
    Ok(Item { topic, private, frame })
}

/// A single message: JSON (encoding 1, any JSON value) or raw bytes (0).
#[allow(clippy::too_many_arguments)]
async fn single(
    body: &[u8],
    encoding: u8,
    topic: &str,
    event: &str,
    private: bool,
    claims: &Claims,
    headers: &HeaderMap,
    ctx: &SessionContext,
) -> Result<Sent, Refused> {
    let compacted;
    let body = if encoding == 1 {
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| Refused::BadBody(format!("not JSON: {e}")))?;
        // Receivers get compact JSON, as from Supabase (which re-encodes it).
        compacted = compact_json(body);
        &compacted[..]
    } else {
        body
    };
    if body.len() > ctx.limits.max_broadcast_bytes {
        return Err(Refused::PayloadTooLarge);
    }
    if private && !may_send_private(ctx, claims, headers, topic).await {
        return Err(Refused::Forbidden);
    }
    let frames = deliver(ctx, topic, private, &Message::Binary { event, encoding, payload: body });
    Ok(Sent { messages: 1, frames: frames as u64, denied: 0 })
}

/// Valid JSON without the whitespace between its tokens (key order and
/// string contents untouched).
fn compact_json(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        } else if b == b'"' {
            in_string = true;
        }
        out.push(b);
    }
    out
}

/// Sends `message` from the server to every member of the room
/// `realtime:<topic>` (public or private); returns the frames queued.
fn deliver(ctx: &SessionContext, topic: &str, private: bool, message: &Message<'_>) -> usize {
    // `None`: from the server, so every member receives, whatever its `self`.
    ctx.rooms.send(&RoomKey::new(format!("realtime:{topic}"), private), None, message)
}

/// 202 with an empty body: what both clients take as success.
fn accepted() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_endpoints() {
        assert_eq!(Target::parse("/api/broadcast"), Some(Target::Batch));
        assert_eq!(Target::parse("/realtime/v1/api/broadcast/"), Some(Target::Batch));
        let single = |t: &str, e: &str| Some(Target::Single { topic: t.into(), event: e.into() });
        assert_eq!(Target::parse("/api/broadcast/room-1/events/cursor"), single("room-1", "cursor"));
        assert_eq!(Target::parse("/realtime/v1/api/broadcast/a%20b%2Fc/events/x+y%C3%A9"), single("a b/c", "x+yé"));
        for other in [
            "/api/broadcastx",
            "/api/broadcast/room",
            "/api/broadcast/room/events",
            "/api/broadcast/room/events/",
            "/api/broadcast/room/event/e",
            "/api/broadcast/room/events/e/more",
            "/api/broadcast//events/e",
            "/api/broadcast/%FF/events/e",
            "/realtime/v1api/broadcast",
            "/realtime/v2/api/broadcast",
        ] {
            assert_eq!(Target::parse(other), None, "{other}");
        }
    }

    #[test]
    fn batch_items_are_validated_whole() {
        let ok = parse_batch(
            &json!({"messages": [
                {"topic": "r", "event": "e", "payload": {"x": 1}},
                {"topic": "r", "event": "e", "payload": {}, "private": "true", "id": "m1"},
            ]}),
            1000,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let frame: Value = serde_json::from_slice(&ok[0].frame).unwrap();
        assert_eq!(frame, json!({"type": "broadcast", "event": "e", "payload": {"x": 1}}));
        let frame: Value = serde_json::from_slice(&ok[1].frame).unwrap();
        assert_eq!(frame["meta"], json!({"id": "m1"}));
        assert!(ok[1].private && !ok[0].private);

        let bad = parse_batch(
            &json!({"messages": [{"topic": "r", "event": "e", "payload": {}}, {"event": 1, "payload": [1], "private": 2}]}),
            1000,
        );
        let Err(Refused::Invalid(reasons)) = bad else { panic!("{bad:?}") };
        assert_eq!(
            reasons,
            [
                "messages[1].topic: can't be blank",
                "messages[1].event: must be a string",
                "messages[1].payload: must be an object",
                "messages[1].private: must be a boolean"
            ]
        );
        assert!(matches!(parse_batch(&json!({}), 1000), Err(Refused::Invalid(_))));
        assert!(matches!(parse_batch(&json!({"messages": []}), 1000), Err(Refused::Invalid(_))));
        assert!(matches!(parse_batch(&json!({"messages": {}}), 1000), Err(Refused::Invalid(_))));
        assert!(matches!(parse_batch(&json!({"messages": [7]}), 1000), Err(Refused::Invalid(_))));
        let big = json!({"messages": [{"topic": "r", "event": "e", "payload": {"pad": "x".repeat(2000)}}]});
        assert!(matches!(parse_batch(&big, 1000), Err(Refused::PayloadTooLarge)));
        let many: Vec<Value> = (0..=MAX_BATCH).map(|_| json!({"topic": "r", "event": "e", "payload": {}})).collect();
        assert!(matches!(parse_batch(&json!({ "messages": many }), 1000), Err(Refused::TooManyMessages)));
    }

    #[test]
    fn refusals_carry_supabase_shapes() {
        assert_eq!(Refused::Unauthorized.body(true), json!({"message": "Unauthorized"}));
        assert_eq!(Refused::Forbidden.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            Refused::PayloadTooLarge.body(true),
            json!({"errors": {"messages": ["Payload size exceeds tenant limit"]}})
        );
        assert_eq!(Refused::PayloadTooLarge.body(false), json!({"error": "Payload size exceeds tenant limit"}));
        let all = [
            Refused::Unauthorized,
            Refused::UnsupportedMediaType,
            Refused::BodyTooLarge(1),
            Refused::BodyTimeout(BODY_TIMEOUT),
            Refused::BadBody(String::new()),
            Refused::Invalid(Vec::new()),
            Refused::PayloadTooLarge,
            Refused::TooManyMessages,
            Refused::Busy,
            Refused::Forbidden,
        ];
        for (i, refused) in all.iter().enumerate() {
            assert_eq!(refused.index(), i, "{refused:?} is {}", REASONS[i]);
        }
    }

    #[test]
    fn json_is_compacted_outside_strings() {
        let json = br#" { "a" : [1, 2],
 "b": "x y \" z\\", "c" :{} } "#;
        assert_eq!(String::from_utf8(compact_json(json)).unwrap(), r#"{"a":[1,2],"b":"x y \" z\\","c":{}}"#);
    }

    #[test]
    fn media_types() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            media_encoding(&h)
        };
        assert_eq!(media_encoding(&HeaderMap::new()), Some(1));
        assert_eq!(with("application/json"), Some(1));
        assert_eq!(with("Application/JSON; charset=utf-8"), Some(1));
        assert_eq!(with("application/octet-stream"), Some(0));
        assert_eq!(with("text/plain"), None);
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit() {
        let body = |n: usize| Full::new(Bytes::from(vec![b'x'; n]));
        assert_eq!(read_body(body(10), 10).await.map(|b| b.len()).ok(), Some(10));
        assert!(matches!(read_body(body(11), 10).await, Err(Refused::BodyTooLarge(10))));
    }

    #[test]
    fn the_bodies_in_flight_are_bounded() {
        let rest = RestBroadcast::default();
        let held: Vec<_> = (0..MAX_BODIES_IN_FLIGHT).map(|_| rest.bodies.try_acquire().unwrap()).collect();
        assert!(rest.bodies.try_acquire().is_err());
        drop(held);
        assert!(rest.bodies.try_acquire().is_ok());
    }
}
