//! What a session does with rooms: client broadcasts (rate and size
//! limits, private writes), presence pushes (the per-channel call window,
//! the map rule), the private channels' read and write checks, and a
//! join's replay of stored messages.
//!
//! Invariants: nothing is sent on a private channel before its write check
//! said yes (a denied broadcast is dropped without a reply, as Supabase
//! does; a denied track is answered `error`); every refusal is counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use super::{Channel, End, Session};
use crate::hub::Vsn;
use crate::realtime::auth::Claims;
use crate::realtime::authorize::{Asker, Extension, ReadGrant};
use crate::realtime::messages;
use crate::realtime::protocol::{self, Message};
use crate::realtime::rooms::{self, Tracked};

/// A replayed message as Supabase sends it: a channel push (`join_ref` set)
/// of `{"type","event","payload","meta":{"replayed":true,"id"}}`, or for raw
/// bytes a kind 4 frame with that meta (2.0.0 only).
pub(super) fn replayed_frame(vsn: Vsn, join_ref: Option<&str>, topic: &str, row: &messages::Replayed) -> Option<Bytes> {
    let meta = json!({"replayed": true, "id": row.id});
    if row.encoding == 0 {
        let meta = serde_json::to_vec(&meta).ok()?;
        return (vsn == Vsn::V2).then(|| protocol::user_broadcast(topic, &row.event, &meta, 0, &row.payload)).flatten();
    }
    let payload: serde_json::Value = serde_json::from_slice(&row.payload).ok()?;
    let body = json!({"type": "broadcast", "event": row.event, "payload": payload, "meta": meta});
    Some(protocol::encode(vsn, join_ref, None, topic, "broadcast", &body))
}

/// Presence calls (`track`, `untrack`) a channel may make per
/// [`PRESENCE_WINDOW`] (Supabase: 5 per 30 s; the 6th closes the channel).
pub const PRESENCE_CALLS: u32 = 5;

/// The window of [`PRESENCE_CALLS`], opened by the first call.
pub const PRESENCE_WINDOW: Duration = Duration::from_secs(30);

/// The `ack` reply's `response` (a bare string, as Supabase's) for a
/// broadcast over the send rate.
const RATE_LIMITED: &str = "rate_limit_exceeded";
/// …and for one over the payload limit.
const TOO_LARGE: &str = "payload_size_exceeded";

impl Session {
    /// A client's broadcast on `topic`: sent on to the channel's other
    /// members (and itself with `self`), answered when the channel asked
    /// for `ack` — after the frames are queued, or `payload_size_exceeded`.
    pub(super) async fn broadcast(
        &mut self,
        topic: &str,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        message: &rooms::Message<'_>,
    ) {
        let Some(channel) = self.channels.get(topic) else {
            self.push(protocol::reply_to(
                self.vsn,
                join_ref,
                msg_ref,
                topic,
                "error",
                json!({"reason": "unmatched topic"}),
            ));
            return;
        };
        let (ack, room) = (channel.broadcast_ack, channel.room.clone());
        // Boxed: the write check's query is rare (once per channel) and large.
        if room.private && !Box::pin(self.may_write(topic, Extension::Broadcast)).await {
            // As Supabase: dropped without a reply, even with `ack` (the
            // client's push times out); counted and logged.
            return;
        }
        if !self.take_send(topic) {
            self.ctx.stats.broadcasts_rate_limited.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.conn, topic, "broadcast over the send rate; not sent");
            if ack {
                self.push(protocol::reply_to(self.vsn, join_ref, msg_ref, topic, "error", json!(RATE_LIMITED)));
            }
            return;
        }
        if message.size() > self.ctx.limits.max_broadcast_bytes {
            self.ctx.stats.broadcasts_too_large.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.conn, topic, bytes = message.size(), "broadcast over the size limit; not sent");
            if ack {
                self.push(protocol::reply_to(self.vsn, join_ref, msg_ref, topic, "error", json!(TOO_LARGE)));
            }
            return;
        }
        let queued = self.ctx.rooms.send(&room, Some(self.conn), message);
        self.ctx.stats.broadcasts.fetch_add(1, Ordering::Relaxed);
        self.ctx.stats.broadcast_frames.fetch_add(queued as u64, Ordering::Relaxed);
        if ack {
            self.push(protocol::reply_to(self.vsn, join_ref, msg_ref, topic, "ok", json!({})));
        }
    }

    /// A `presence` push: `track` (a map payload; the same payload again
    /// changes nothing) or `untrack`, answered `ok`; a push without `event`
    /// is answered `ok` and does nothing (as Supabase). More than
    /// [`PRESENCE_CALLS`] calls in [`PRESENCE_WINDOW`], or a payload over
    /// the broadcast size limit, close the channel with Supabase's texts.
    pub(super) async fn presence(&mut self, msg: &Message) -> Option<End> {
        let event = msg.payload.get("event").and_then(|e| e.as_str()).map(str::to_ascii_lowercase);
        let channel = self.channels.get_mut(&msg.topic)?;
        let now = Instant::now();
        if now.duration_since(channel.presence_calls.0) >= PRESENCE_WINDOW {
            channel.presence_calls = (now, 0);
        }
        channel.presence_calls.1 += 1;
        if channel.presence_calls.1 > PRESENCE_CALLS {
            self.ctx.stats.presence_closed.fetch_add(1, Ordering::Relaxed);
            self.close_channel(&msg.topic, "Client presence rate limit exceeded").await;
            return None;
        }
        let (room, key) = (channel.room.clone(), channel.presence_key.clone());
        match event.as_deref() {
            None => self.push(protocol::reply(self.vsn, msg, "ok", json!({}))),
            Some("track") => {
                let payload = match msg.payload.get("payload") {
                    None | Some(serde_json::Value::Null) => serde_json::Map::new(),
                    Some(serde_json::Value::Object(map)) => map.clone(),
                    Some(_) => {
                        self.ctx.stats.presence_refused.fetch_add(1, Ordering::Relaxed);
                        let reason = "Presence track payload must be a map";
                        self.push(protocol::reply(self.vsn, msg, "error", json!({ "reason": reason })));
                        return None;
                    }
                };
                let size = serde_json::to_vec(&payload).map_or(usize::MAX, |b| b.len());
                if size > self.ctx.limits.max_broadcast_bytes {
                    self.ctx.stats.presence_closed.fetch_add(1, Ordering::Relaxed);
                    self.close_channel(&msg.topic, "Track message size exceeded").await;
                    return None;
                }
                if room.private && !self.may_write(&msg.topic, Extension::Presence).await {
                    self.push(protocol::reply(self.vsn, msg, "error", json!({})));
                    return None;
                }
                if let Some(Tracked::Joined | Tracked::Updated) = self.ctx.rooms.track(&room, self.conn, &key, payload)
                {
                    self.ctx.stats.presence_tracks.fetch_add(1, Ordering::Relaxed);
                }
                self.push(protocol::reply(self.vsn, msg, "ok", json!({})));
            }
            Some("untrack") => {
                self.ctx.rooms.untrack(&room, self.conn);
                self.ctx.stats.presence_untracks.fetch_add(1, Ordering::Relaxed);
                self.push(protocol::reply(self.vsn, msg, "ok", json!({})));
            }
            Some(_) => {
                self.ctx.stats.presence_refused.fetch_add(1, Ordering::Relaxed);
                self.push(protocol::reply(self.vsn, msg, "error", json!({})));
            }
        }
        None
    }

    /// Takes a send from the channel's and the socket's buckets; when
    /// either is empty the channel gets (at most once a second) a `system`
    /// error "Too many messages per second" — refused at the sender, the
    /// channel stays joined.
    pub(super) fn take_send(&mut self, topic: &str) -> bool {
        let limits = &self.ctx.limits;
        let Some(channel) = self.channels.get_mut(topic) else { return false };
        let (channel_rate, socket_rate) = (limits.channel_broadcasts_per_second, limits.socket_broadcasts_per_second);
        // The channel's bucket first: a refused send takes nothing from the socket's.
        if channel.sends.take(channel_rate, channel_rate) && self.sends.take(socket_rate, socket_rate) {
            return true;
        }
        let now = Instant::now();
        if channel.rate_notice.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            channel.rate_notice = Some(now);
            let join_ref = channel.join_ref.clone();
            self.push(protocol::system(
                self.vsn,
                join_ref.as_deref(),
                topic,
                "system",
                "error",
                "Too many messages per second",
            ));
        }
        false
    }

    /// The write check of a private channel, made once per extension (and
    /// again after a token change); a failed check denies.
    pub(super) async fn may_write(&mut self, topic: &str, extension: Extension) -> bool {
        let slot = usize::from(extension == Extension::Presence);
        let Some(channel) = self.channels.get(topic) else { return false };
        if let Some(known) = channel.writes[slot] {
            if !known {
                self.ctx.stats.private_writes_denied.fetch_add(1, Ordering::Relaxed);
            }
            return known;
        }
        let sub_topic = topic.strip_prefix("realtime:").unwrap_or(topic);
        let allowed = match &self.ctx.authorizer {
            None => false,
            Some(authorizer) => {
                let asker = Asker { claims: &channel.claims, headers: &self.headers };
                match authorizer.write(asker, sub_topic, extension).await {
                    Ok(allowed) => allowed,
                    Err(err) => {
                        tracing::warn!(conn = self.conn, topic = sub_topic, error = %err, "write check failed; denied");
                        false
                    }
                }
            }
        };
        if !allowed {
            self.ctx.stats.private_writes_denied.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(conn = self.conn, topic = sub_topic, ?extension, "private write denied");
        }
        if let Some(channel) = self.channels.get_mut(topic) {
            channel.writes[slot] = Some(allowed);
        }
        allowed
    }

    /// The stored messages a private join replays; `Err` after logging.
    pub(super) async fn replay(&self, sub_topic: &str, since: i64, limit: i64) -> Result<Vec<messages::Replayed>, ()> {
        let Some(authorizer) = &self.ctx.authorizer else { return Err(()) };
        authorizer.replay(sub_topic, since, limit).await.map_err(|err| {
            tracing::warn!(conn = self.conn, topic = sub_topic, error = %err, "replay failed; join refused");
        })
    }

    /// The read check of a private channel: `Err` carries the refusal.
    pub(super) async fn read_check(
        &self,
        claims: &Claims,
        sub_topic: &str,
        presence: bool,
    ) -> Result<ReadGrant, String> {
        let denied =
            || format!("Unauthorized: You do not have permissions to read from this Channel topic: {sub_topic}");
        let Some(authorizer) = &self.ctx.authorizer else { return Err(denied()) };
        match authorizer.read(Asker { claims, headers: &self.headers }, sub_topic, presence).await {
            Ok(grant) if grant.any() => Ok(grant),
            Ok(_) => Err(denied()),
            Err(err) => {
                tracing::warn!(conn = self.conn, topic = sub_topic, error = %err, "read check failed; denied");
                Err(denied())
            }
        }
    }

    /// `channel` as a member of its room.
    pub(super) fn member(&self, channel: &Channel) -> rooms::Member {
        rooms::Member {
            conn: self.conn,
            vsn: self.vsn,
            outbox: Arc::clone(&self.outbox),
            join_ref: channel.join_ref.clone(),
            echo: channel.echo,
            broadcasts: channel.read.broadcast,
            presence: channel.read.presence,
            gate: channel.gate.clone(),
        }
    }
}
