//! [`LocalRooms`]: the rooms of one node, in memory.
//!
//! Rooms are sharded by topic over a few mutexes. A broadcast takes its
//! room's member list (a shared, copy-on-write `Arc`) under the lock and
//! fans out after releasing it, so senders never serialize on receivers;
//! presence changes (and a member's `presence_state`) are queued under the
//! lock, so every member sees a room's diffs in the order its state
//! changed, and a `presence_state` holds every diff queued before it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use serde_json::{Map, Value};

use super::broadcast::{Frames, Message};
use super::presence::{Diff, Entry, Holder, NodeId, Presence, Refs, Tracked};
use super::{Member, RoomKey, RoomTotals, Rooms, MAX_BACKLOG};
use crate::hub::{CloseReason, ConnId, Outbox, Vsn};
use crate::realtime::protocol;

const SHARDS: usize = 16;

#[derive(Debug, Default)]
struct Room {
    members: Arc<Vec<Member>>,
    presence: Presence,
}

/// The rooms of this node.
#[derive(Debug)]
pub struct LocalRooms {
    shards: Vec<Mutex<HashMap<RoomKey, Room>>>,
    hasher: std::collections::hash_map::RandomState,
    refs: Refs,
}

impl LocalRooms {
    /// Rooms of node `node` (its id goes into every presence ref).
    pub fn new(node: NodeId) -> LocalRooms {
        LocalRooms {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            refs: Refs::new(node),
        }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.refs.node()
    }

    fn holder(&self, conn: ConnId) -> Holder {
        Holder { node: self.refs.node(), conn }
    }

    /// Removes `conn`'s channel from `room`; whether it was tracking (its
    /// presence left).
    pub fn leave_tracked(&self, room: &RoomKey, conn: ConnId) -> bool {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else { return false };
        if entry.members.iter().any(|m| m.conn == conn) {
            Arc::make_mut(&mut entry.members).retain(|m| m.conn != conn);
        }
        let diff = entry.presence.untrack(self.holder(conn));
        let tracked = !diff.is_empty();
        send_diff(&room.topic, &entry.members, &diff);
        if entry.members.is_empty() && entry.presence.is_empty() {
            shard.remove(room);
        }
        tracked
    }

    /// A presence entry held elsewhere (another node) joins or changes:
    /// the diff goes to this node's members.
    pub fn track_held(&self, room: &RoomKey, holder: Holder, key: &str, payload: Map<String, Value>, phx_ref: String) {
        let mut shard = self.shard(room);
        let entry = shard.entry(room.clone()).or_default();
        let (_, diff) = entry.presence.track(holder, key, payload, phx_ref);
        send_diff(&room.topic, &entry.members, &diff);
    }

    /// A presence entry held elsewhere leaves.
    pub fn untrack_held(&self, room: &RoomKey, holder: Holder) {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else { return };
        let diff = entry.presence.untrack(holder);
        send_diff(&room.topic, &entry.members, &diff);
        if entry.members.is_empty() && entry.presence.is_empty() {
            shard.remove(room);
        }
    }

    /// Every entry `node` holds leaves, in every room (a node gone).
    pub fn drop_node(&self, node: NodeId) -> usize {
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|room, entry| {
                let diff = entry.presence.drop_node(node);
                if !diff.is_empty() {
                    dropped += 1;
                    send_diff(&room.topic, &entry.members, &diff);
                }
                !(entry.members.is_empty() && entry.presence.is_empty())
            });
        }
        dropped
    }

    /// The entries `node` holds, per room (what a cluster peer is told).
    pub fn held_by(&self, node: NodeId) -> Vec<(RoomKey, Holder, Entry)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (room, entry) in shard.iter() {
                out.extend(entry.presence.held_by(node).map(|(h, e)| (room.clone(), *h, e.clone())));
            }
        }
        out
    }

    /// This node's entry of `conn` in `room`.
    pub fn entry(&self, room: &RoomKey, conn: ConnId) -> Option<Entry> {
        self.shard(room).get(room).and_then(|r| r.presence.get(self.holder(conn)).cloned())
    }

    fn shard(&self, room: &RoomKey) -> MutexGuard<'_, HashMap<RoomKey, Room>> {
        let i = usize::try_from(self.hasher.hash_one(room) % SHARDS as u64).unwrap_or(0);
        self.shards[i].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for LocalRooms {
    fn default() -> Self {
        LocalRooms::new(rand_node())
    }
}

/// A random node id (from the process's hasher seed and clock).
fn rand_node() -> NodeId {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::time::SystemTime::now().hash(&mut h);
    std::process::id().hash(&mut h);
    (h.finish() & u64::from(u32::MAX)) as NodeId
}

/// Queues `frame` to `member`, or closes it when it is too far behind.
fn deliver(outbox: &Outbox, frame: &Bytes) -> bool {
    if outbox.depth().1 > MAX_BACKLOG {
        // Never let one unread socket hold the memory every outbox shares
        // (the hub would pause for everyone).
        outbox.close_now(CloseReason {
            code: 1013,
            reason: format!("slow consumer: more than {MAX_BACKLOG} bytes unread"),
        });
        return false;
    }
    outbox.push(frame.clone()).is_ok()
}

/// Sends a presence diff to every member that receives presence (the
/// tracker's own channel included), one frame per format.
fn send_diff(topic: &str, members: &[Member], diff: &Diff) {
    if diff.is_empty() {
        return;
    }
    let payload = diff.payload();
    let mut frames: [Option<Bytes>; 2] = [None, None];
    for member in members.iter().filter(|m| m.presence) {
        let slot = usize::from(member.vsn == Vsn::V2);
        let frame = frames[slot]
            .get_or_insert_with(|| protocol::encode(member.vsn, None, None, topic, "presence_diff", &payload));
        deliver(&member.outbox, frame);
    }
}

impl Rooms for LocalRooms {
    fn join(&self, room: &RoomKey, member: Member) {
        let mut shard = self.shard(room);
        let entry = shard.entry(room.clone()).or_default();
        let members = Arc::make_mut(&mut entry.members);
        members.retain(|m| m.conn != member.conn);
        members.push(member);
    }

    fn presence_state(&self, room: &RoomKey, conn: ConnId) {
        let shard = self.shard(room);
        let Some(entry) = shard.get(room) else { return };
        let Some(member) = entry.members.iter().find(|m| m.conn == conn) else { return };
        let state = entry.presence.state();
        let frame =
            protocol::encode(member.vsn, member.join_ref.as_deref(), None, &room.topic, "presence_state", &state);
        deliver(&member.outbox, &frame);
    }

    fn leave(&self, room: &RoomKey, conn: ConnId) {
        self.leave_tracked(room, conn);
    }

    fn send(&self, room: &RoomKey, from: Option<ConnId>, message: &Message<'_>) -> usize {
        let members = match self.shard(room).get(room) {
            Some(entry) => Arc::clone(&entry.members),
            None => return 0,
        };
        let mut frames = Frames::new(&room.topic, message);
        let mut queued = 0;
        for member in members.iter() {
            if !member.broadcasts || (Some(member.conn) == from && !member.echo) {
                continue;
            }
            let Some(frame) = frames.get(member.vsn) else { continue };
            if let Some(gate) = &member.gate {
                match gate.pass(message.id(), frame) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(super::GateFull) => {
                        member.outbox.close_now(CloseReason {
                            code: 1013,
                            reason: format!(
                                "slow consumer: more than {} messages held during a replay",
                                super::MAX_HELD
                            ),
                        });
                        continue;
                    }
                }
            }
            if deliver(&member.outbox, frame) {
                queued += 1;
            }
        }
        queued
    }

    fn track(&self, room: &RoomKey, conn: ConnId, key: &str, payload: Map<String, Value>) -> Option<Tracked> {
        let mut shard = self.shard(room);
        let entry = shard.get_mut(room)?;
        if !entry.members.iter().any(|m| m.conn == conn) {
            return None;
        }
        let (tracked, diff) = entry.presence.track(self.holder(conn), key, payload, self.refs.mint());
        send_diff(&room.topic, &entry.members, &diff);
        Some(tracked)
    }

    fn untrack(&self, room: &RoomKey, conn: ConnId) {
        let mut shard = self.shard(room);
        let Some(entry) = shard.get_mut(room) else { return };
        let diff = entry.presence.untrack(self.holder(conn));
        send_diff(&room.topic, &entry.members, &diff);
    }

    fn members(&self, room: &RoomKey) -> usize {
        self.shard(room).get(room).map_or(0, |r| r.members.len())
    }

    fn totals(&self) -> RoomTotals {
        let mut totals = RoomTotals::default();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            totals.rooms += shard.len();
            for room in shard.values() {
                totals.members += room.members.len();
                totals.presences += room.presence.len();
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::OutboxLimits;
    use serde_json::json;

    fn member(conn: ConnId, vsn: Vsn, echo: bool) -> (Member, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new(OutboxLimits::default()));
        let m = Member {
            conn,
            vsn,
            outbox: Arc::clone(&outbox),
            join_ref: Some(conn.to_string()),
            echo,
            broadcasts: true,
            presence: true,
            gate: None,
        };
        (m, outbox)
    }

    fn drained(outbox: &Outbox) -> Vec<Bytes> {
        let mut out = Vec::new();
        outbox.try_drain(&mut out);
        out
    }

    fn json_frames(outbox: &Outbox) -> Vec<Value> {
        drained(outbox).iter().map(|f| serde_json::from_slice(f).unwrap()).collect()
    }

    #[test]
    fn broadcast_self_and_rooms_apart() {
        let rooms = LocalRooms::new(1);
        let public = RoomKey::new("realtime:r", false);
        let private = RoomKey::new("realtime:r", true);
        let (a, a_box) = member(1, Vsn::V2, false);
        let (b, b_box) = member(2, Vsn::V1, false);
        let (c, c_box) = member(3, Vsn::V2, true);
        let (p, p_box) = member(4, Vsn::V2, false);
        rooms.join(&public, a);
        rooms.join(&public, b);
        rooms.join(&public, c);
        rooms.join(&private, p);
        let json = br#"{"type":"broadcast","event":"e","payload":{}}"#;
        assert_eq!(rooms.send(&public, Some(1), &Message::Text(json)), 2, "not to the sender without self");
        assert!(drained(&a_box).is_empty());
        assert_eq!(drained(&b_box).len(), 1);
        assert_eq!(drained(&c_box).len(), 1);
        assert!(drained(&p_box).is_empty(), "a private room never gets a public room's messages");
        assert_eq!(rooms.send(&public, Some(3), &Message::Text(json)), 3, "self: the sender too");
        assert_eq!(rooms.send(&private, None, &Message::Text(json)), 1);
        for conn in 1..=3 {
            rooms.leave(&public, conn);
        }
        rooms.leave(&private, 4);
        assert_eq!(rooms.totals(), RoomTotals::default(), "empty rooms are dropped");
    }

    #[test]
    fn members_without_read_get_nothing() {
        let rooms = LocalRooms::new(1);
        let room = RoomKey::new("realtime:r", true);
        let (mut a, a_box) = member(1, Vsn::V2, false);
        a.broadcasts = false;
        a.presence = false;
        let (b, _b_box) = member(2, Vsn::V2, false);
        rooms.join(&room, a);
        rooms.join(&room, b);
        assert_eq!(rooms.send(&room, None, &Message::Text(b"{}")), 1);
        rooms.track(&room, 2, "k", Map::new());
        assert!(drained(&a_box).is_empty());
    }

    #[test]
    fn a_replay_gate_holds_live_traffic_and_skips_replayed_ids() {
        let rooms = LocalRooms::new(1);
        let room = RoomKey::new("realtime:r", true);
        let (mut a, a_box) = member(1, Vsn::V2, false);
        let gate = super::super::ReplayGate::new();
        a.gate = Some(Arc::clone(&gate));
        rooms.join(&room, a);
        let db = |id| Message::Database { event: "e", id, encoding: 1, payload: b"{}" };
        rooms.send(&room, None, &db("replayed"));
        rooms.send(&room, None, &Message::Text(b"{\"live\":1}"));
        assert!(drained(&a_box).is_empty(), "held while replaying");
        a_box.push(Bytes::from_static(b"[replayed frame]")).unwrap();
        gate.open(["replayed".to_owned()].into_iter().collect(), &a_box);
        let frames = drained(&a_box);
        assert_eq!(frames.len(), 2, "the replayed frame, then the held live one (its replayed copy skipped)");
        assert_eq!(&frames[0][..], b"[replayed frame]");
        assert!(frames[1].ends_with(b"{\"live\":1}]"));
        rooms.send(&room, None, &db("replayed"));
        rooms.send(&room, None, &db("new"));
        assert_eq!(drained(&a_box).len(), 1, "a later live copy of a replayed row is skipped too");
    }

    #[test]
    fn presence_state_then_diffs_in_order() {
        let rooms = LocalRooms::new(1);
        let room = RoomKey::new("realtime:r", false);
        let (a, a_box) = member(1, Vsn::V2, false);
        rooms.join(&room, a);
        rooms.presence_state(&room, 1);
        let frames = json_frames(&a_box);
        assert_eq!(frames, vec![json!(["1", null, "realtime:r", "presence_state", {}])]);
        assert_eq!(
            rooms.track(&room, 1, "u1", json!({"user": "u1"}).as_object().unwrap().clone()),
            Some(Tracked::Joined)
        );
        let (b, b_box) = member(2, Vsn::V1, false);
        rooms.join(&room, b);
        rooms.presence_state(&room, 2);
        let a_frames = json_frames(&a_box);
        assert_eq!(a_frames[0][3], "presence_diff");
        assert_eq!(a_frames[0][4]["joins"]["u1"]["metas"][0]["user"], "u1");
        let b_frames = json_frames(&b_box);
        assert_eq!(b_frames[0]["event"], "presence_state");
        assert_eq!(b_frames[0]["ref"], Value::Null);
        assert_eq!(b_frames[0]["payload"]["u1"]["metas"][0]["user"], "u1");
        // The tracker leaves: a leave diff to the rest.
        rooms.leave(&room, 1);
        let b_frames = json_frames(&b_box);
        assert_eq!(b_frames[0]["event"], "presence_diff");
        assert_eq!(b_frames[0]["payload"]["leaves"]["u1"]["metas"][0]["user"], "u1");
        assert_eq!(rooms.totals().presences, 0);
        assert_eq!(rooms.track(&room, 1, "u1", Map::new()), None, "not a member any more");
    }
}
