//! [`ClusterRooms`]: the rooms of one node, kept in step with every other
//! node's over NATS core subjects.
//!
//! ```text
//!  session / http ──▶ ClusterRooms ──▶ LocalRooms (this node's members)
//!                          │ try_send (bounded, never waits)
//!                          ▼
//!                     publisher task ──▶ NATS `walcast.rooms` ──▶ every other node's
//!                                                                 receiver task ──▶ its LocalRooms
//! ```
//!
//! What crosses: client and REST broadcasts (Broadcast from Database does
//! not: every edge reads those rows from the change stream itself), presence tracks
//! and untracks (with the origin's `phx_ref`, so every node shows the same
//! meta), and per node a heartbeat. A starting node asks for everyone's
//! presence (`hello`; each answers with its entries on the asker's sync
//! subject); a node that leaves cleanly says `bye`; a node silent for
//! [`ClusterSettings::node_timeout`] is gone and its presences leave.
//!
//! Invariants: a session or the HTTP front never waits on NATS (events go
//! through a bounded queue; when it is full the event is dropped, counted
//! and logged — presence then heals at the next `hello`/state exchange,
//! a dropped broadcast is lost as a NATS core message may be); events of
//! one node are applied on every other node in the order it published them
//! (one connection, one subject); a node never applies its own events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{redact, ClusterSettings, ScaleoutError};
use crate::hub::ConnId;
use crate::realtime::rooms::presence::Holder;
use crate::realtime::rooms::{LocalRooms, Member, Message, NodeId, RoomKey, RoomTotals, Rooms, Tracked};

/// The subject every node publishes its room events on.
pub const SUBJECT: &str = "walcast.rooms";

/// Events queued for NATS at most; more are dropped and counted.
pub const QUEUE: usize = 65_536;

/// The subject on which `node` receives the others' presence entries.
fn sync_subject(node: NodeId) -> String {
    format!("{SUBJECT}.sync.{node}")
}

/// One event on the wire (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The node that published it.
    node: NodeId,
    #[serde(flatten)]
    event: Event,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Event {
    Send { topic: String, private: bool, message: WireMessage },
    Track { topic: String, private: bool, conn: ConnId, key: String, payload: Map<String, Value>, phx_ref: String },
    Untrack { topic: String, private: bool, conn: ConnId },
    Hello,
    State { entries: Vec<WireEntry> },
    Heartbeat,
    Bye,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireEntry {
    topic: String,
    private: bool,
    conn: ConnId,
    key: String,
    payload: Map<String, Value>,
    phx_ref: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireMessage {
    /// A text broadcast map, its JSON as sent.
    Text { json: String },
    /// A binary-form broadcast; `payload` in base64.
    Binary { event: String, encoding: u8, payload: String },
}

impl WireMessage {
    fn from_message(message: &Message<'_>) -> Option<WireMessage> {
        match *message {
            Message::Text(json) => Some(WireMessage::Text { json: String::from_utf8(json.to_vec()).ok()? }),
            Message::Binary { event, encoding, payload } => Some(WireMessage::Binary {
                event: event.to_owned(),
                encoding,
                payload: base64::engine::general_purpose::STANDARD.encode(payload),
            }),
            // Every edge reads realtime.messages rows from the change stream.
            Message::Database { .. } => None,
        }
    }
}

/// Counters of the cluster link.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Events published.
    pub published: AtomicU64,
    /// Events received from other nodes and applied.
    pub received: AtomicU64,
    /// Events not published: the queue to NATS was full.
    pub dropped: AtomicU64,
    /// Events from other nodes that could not be read.
    pub malformed: AtomicU64,
    /// Nodes declared gone (silent past the timeout, or `bye`).
    pub nodes_gone: AtomicU64,
    /// Other nodes heard from within the timeout, now.
    pub nodes: AtomicU64,
}

/// This node's rooms, shared with the cluster's other nodes over NATS.
#[derive(Debug)]
pub struct ClusterRooms {
    local: Arc<LocalRooms>,
    node: NodeId,
    out: mpsc::Sender<(String, Bytes)>,
    /// Counters.
    pub stats: Arc<ClusterStats>,
}

impl ClusterRooms {
    /// Connects to NATS, subscribes, asks the other nodes for their
    /// presence, and starts the publisher, receiver and heartbeat tasks
    /// (they end with `shutdown`, after a `bye`).
    ///
    /// # Errors
    /// NATS unreachable, or the subscription refused.
    pub async fn start(
        local: LocalRooms,
        settings: &ClusterSettings,
        shutdown: CancellationToken,
    ) -> Result<Arc<ClusterRooms>, ScaleoutError> {
        let client = super::log::connect(settings, "walcast-rooms").await?;
        let local = Arc::new(local);
        let node = local.node();
        let events = client.subscribe(SUBJECT).await?;
        let sync = client.subscribe(sync_subject(node)).await?;
        let (out, queue) = mpsc::channel(QUEUE);
        let stats = Arc::new(ClusterStats::default());
        let rooms = Arc::new(ClusterRooms { local: Arc::clone(&local), node, out, stats: Arc::clone(&stats) });
        let span = tracing::info_span!("cluster_rooms", node);
        tokio::spawn(publish(client.clone(), queue, Arc::clone(&stats)).instrument(span.clone()));
        let receiver = Receiver {
            local,
            node,
            rooms: Arc::clone(&rooms),
            stats,
            seen: HashMap::new(),
            timeout: settings.node_timeout,
        };
        tokio::spawn(receiver.run(events, sync, settings.heartbeat, shutdown).instrument(span));
        rooms.publish(SUBJECT.to_owned(), Event::Hello);
        tracing::info!(node, nats = %redact(&settings.nats_url.0), "joined the cluster");
        Ok(rooms)
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// This node's rooms alone (what reaches them is not sent on to the
    /// other nodes: Broadcast from Database, which every edge reads from
    /// the stream itself).
    pub fn local(&self) -> Arc<LocalRooms> {
        Arc::clone(&self.local)
    }

    fn publish(&self, subject: String, event: Event) {
        let envelope = Envelope { node: self.node, event };
        let Ok(bytes) = serde_json::to_vec(&envelope) else { return };
        if self.out.try_send((subject, Bytes::from(bytes))).is_err() {
            let dropped = self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if dropped.is_power_of_two() {
                tracing::warn!(dropped = dropped + 1, "the queue to NATS is full; cluster events dropped");
            }
        }
    }
}

/// Sends queued events to NATS in order.
async fn publish(client: async_nats::Client, mut queue: mpsc::Receiver<(String, Bytes)>, stats: Arc<ClusterStats>) {
    while let Some((subject, bytes)) = queue.recv().await {
        match client.publish(subject, bytes).await {
            Ok(()) => {
                stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "publishing a cluster event failed");
            }
        }
    }
    let _ = client.flush().await;
}

struct Receiver {
    local: Arc<LocalRooms>,
    node: NodeId,
    rooms: Arc<ClusterRooms>,
    stats: Arc<ClusterStats>,
    /// Other nodes and when each was last heard from.
    seen: HashMap<NodeId, Instant>,
    timeout: std::time::Duration,
}

impl Receiver {
    async fn run(
        mut self,
        mut events: async_nats::Subscriber,
        mut sync: async_nats::Subscriber,
        heartbeat: std::time::Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.rooms.publish(SUBJECT.to_owned(), Event::Heartbeat);
                    self.expire();
                }
                Some(message) = events.next() => self.handle(&message.payload),
                Some(message) = sync.next() => self.handle(&message.payload),
                else => break,
            }
        }
        self.rooms.publish(SUBJECT.to_owned(), Event::Bye);
    }

    /// Nodes silent past the timeout are gone: their presences leave.
    fn expire(&mut self) {
        let now = Instant::now();
        let gone: Vec<NodeId> =
            self.seen.iter().filter(|(_, at)| now.duration_since(**at) > self.timeout).map(|(n, _)| *n).collect();
        for node in gone {
            tracing::warn!(node, timeout = ?self.timeout, "a node went silent; its presences leave");
            self.forget(node);
        }
    }

    fn forget(&mut self, node: NodeId) {
        self.seen.remove(&node);
        self.local.drop_node(node);
        self.stats.nodes_gone.fetch_add(1, Ordering::Relaxed);
        self.stats.nodes.store(self.seen.len() as u64, Ordering::Relaxed);
    }

    fn handle(&mut self, bytes: &[u8]) {
        let envelope: Envelope = match serde_json::from_slice(bytes) {
            Ok(envelope) => envelope,
            Err(err) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %err, "ignoring a cluster event that cannot be read");
                return;
            }
        };
        let node = envelope.node;
        if node == self.node {
            return;
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if matches!(envelope.event, Event::Bye) {
            if self.seen.contains_key(&node) {
                self.forget(node);
            }
            return;
        }
        let known = self.seen.insert(node, Instant::now()).is_some();
        self.stats.nodes.store(self.seen.len() as u64, Ordering::Relaxed);
        if !known && !matches!(envelope.event, Event::Hello | Event::State { .. }) {
            // A node we did not know (or had declared gone): ask for its presences.
            self.rooms.publish(SUBJECT.to_owned(), Event::Hello);
        }
        match envelope.event {
            Event::Send { topic, private, message } => {
                let room = RoomKey::new(topic, private);
                match message {
                    WireMessage::Text { json } => {
                        self.local.send(&room, None, &Message::Text(json.as_bytes()));
                    }
                    WireMessage::Binary { event, encoding, payload } => {
                        let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(payload) else {
                            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                            return;
                        };
                        self.local.send(&room, None, &Message::Binary { event: &event, encoding, payload: &payload });
                    }
                }
            }
            Event::Track { topic, private, conn, key, payload, phx_ref } => {
                self.local.track_held(&RoomKey::new(topic, private), Holder { node, conn }, &key, payload, phx_ref);
            }
            Event::Untrack { topic, private, conn } => {
                self.local.untrack_held(&RoomKey::new(topic, private), Holder { node, conn });
            }
            Event::Hello => {
                let entries = self
                    .local
                    .held_by(self.node)
                    .into_iter()
                    .map(|(room, holder, entry)| WireEntry {
                        topic: room.topic,
                        private: room.private,
                        conn: holder.conn,
                        key: entry.key,
                        payload: entry.payload,
                        phx_ref: entry.phx_ref,
                    })
                    .collect();
                self.rooms.publish(sync_subject(node), Event::State { entries });
            }
            Event::State { entries } => {
                for e in entries {
                    let holder = Holder { node, conn: e.conn };
                    self.local.track_held(&RoomKey::new(e.topic, e.private), holder, &e.key, e.payload, e.phx_ref);
                }
            }
            Event::Heartbeat | Event::Bye => {}
        }
    }
}

impl Rooms for ClusterRooms {
    fn join(&self, room: &RoomKey, member: Member) {
        self.local.join(room, member);
    }

    fn presence_state(&self, room: &RoomKey, conn: ConnId) {
        self.local.presence_state(room, conn);
    }

    fn leave(&self, room: &RoomKey, conn: ConnId) {
        if self.local.leave_tracked(room, conn) {
            self.publish(SUBJECT.to_owned(), Event::Untrack { topic: room.topic.clone(), private: room.private, conn });
        }
    }

    fn send(&self, room: &RoomKey, from: Option<ConnId>, message: &Message<'_>) -> usize {
        let queued = self.local.send(room, from, message);
        if let Some(message) = WireMessage::from_message(message) {
            let event = Event::Send { topic: room.topic.clone(), private: room.private, message };
            self.publish(SUBJECT.to_owned(), event);
        }
        queued
    }

    fn track(&self, room: &RoomKey, conn: ConnId, key: &str, payload: Map<String, Value>) -> Option<Tracked> {
        let tracked = self.local.track(room, conn, key, payload)?;
        if tracked != Tracked::Unchanged {
            if let Some(entry) = self.local.entry(room, conn) {
                let event = Event::Track {
                    topic: room.topic.clone(),
                    private: room.private,
                    conn,
                    key: entry.key,
                    payload: entry.payload,
                    phx_ref: entry.phx_ref,
                };
                self.publish(SUBJECT.to_owned(), event);
            }
        }
        Some(tracked)
    }

    fn untrack(&self, room: &RoomKey, conn: ConnId) {
        self.local.untrack(room, conn);
        self.publish(SUBJECT.to_owned(), Event::Untrack { topic: room.topic.clone(), private: room.private, conn });
    }

    fn members(&self, room: &RoomKey) -> usize {
        self.local.members(room)
    }

    fn totals(&self) -> RoomTotals {
        self.local.totals()
    }
}
