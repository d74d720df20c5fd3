//! `walcast load --broadcast`: client→client Broadcast under load, and the
//! check that every message reached exactly the other members of its room.
//!
//! ```text
//!  clients: N raw Phoenix clients in R public rooms (client i in room i mod R,
//!           `realtime:load-room-<r>`), joined with broadcast.self = false;
//!           1.0.0 and 2.0.0 alternate within each room
//!  sends:   message k (k < rate × duration) is sent by client k mod N at
//!           start + k/rate (open loop): 1.0.0 clients push text broadcasts,
//!           2.0.0 clients kind 3 binary pushes; the payload (~--payload-bytes
//!           of JSON) carries k, the send time, the room and the sender
//!  receive: 2.0.0 clients get kind 4 frames (from 2.0.0 senders) or text;
//!           1.0.0 clients text; each keeps (k, send→receive µs) per delivery
//!  check:   per (message, receiver) counts: missing, duplicates, misrouted
//!           (another room's message, or the sender's own), protocol errors
//! ```
//!
//! Where it sits: a mode of [`super::run`], after the database, the relay
//! and the probe are up; it only speaks the public WebSocket protocol.
//!
//! Invariants:
//! - the schedule is a pure function of (N, R, rate, duration), so the
//!   expected deliveries are computed without trusting anything the relay
//!   sent; what a frame claims (room, sender) is checked against it;
//! - every client must join before the first send, every send must go out,
//!   and any missing, duplicate or misrouted delivery, protocol error or
//!   early close fails the run;
//! - send→receive latency uses one monotonic clock (sender and receiver are
//!   in this process); every wait is bounded and every loop counted.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::client::{self, Endpoint, Shared, Socket};
use super::relay::{self, ProcSample};
use super::report::{Latencies, Quantiles, Report};
use super::{await_joins, Joined, Joining, LoadArgs, LoadError, Monitor, GRACE};
use crate::hub::Vsn;

/// How often a client sends a Phoenix heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(20);
/// The user event of every load broadcast.
const EVENT: &str = "load";
/// Most (message, receiver) pairs a run may expect: each is kept as 8 bytes
/// until the check.
const MAX_DELIVERIES: u64 = 50_000_000;

/// The schedule of a broadcast run: who is where, who sends what when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Clients.
    pub clients: u32,
    /// Rooms.
    pub rooms: u32,
    /// Messages per second, all senders together.
    pub rate: f64,
    /// Messages in all.
    pub messages: u32,
}

impl Schedule {
    /// The schedule of `clients` in `rooms` sending `rate`/s for `duration` s.
    pub fn new(clients: u32, rooms: u32, rate: f64, duration: f64) -> Schedule {
        let messages = (rate * duration).floor().clamp(0.0, f64::from(u32::MAX - 1)) as u32;
        Schedule { clients, rooms, rate, messages }
    }

    /// The room of client `i`.
    pub fn room(&self, client: u32) -> u32 {
        client % self.rooms
    }

    /// The serializer of client `i`: 1.0.0 and 2.0.0 alternate within a room.
    pub fn vsn(&self, client: u32) -> Vsn {
        if (client / self.rooms) % 2 == 0 {
            Vsn::V1
        } else {
            Vsn::V2
        }
    }

    /// The sender of message `k`.
    pub fn sender(&self, message: u32) -> u32 {
        message % self.clients
    }

    /// Members of room `r`.
    pub fn members(&self, room: u32) -> u32 {
        self.clients / self.rooms + u32::from(room < self.clients % self.rooms)
    }

    /// When message `k` is due, after the start.
    pub fn due(&self, message: u32) -> Duration {
        Duration::from_secs_f64(f64::from(message) / self.rate)
    }

    /// Deliveries a correct relay makes: each message to the other members
    /// of its sender's room.
    pub fn expected_deliveries(&self) -> u64 {
        (0..self.messages).map(|k| u64::from(self.members(self.room(self.sender(k))) - 1)).sum()
    }
}

/// The topic of room `r`.
fn topic(room: u32) -> String {
    format!("realtime:load-room-{room}")
}

/// The JSON payload of message `k` sent at `t_us`, padded to about `size` bytes.
fn body(k: u32, t_us: u64, room: u32, from: u32, size: usize) -> String {
    let mut out = format!(r#"{{"s":{k},"t":{t_us},"r":{room},"f":{from},"p":""#);
    let pad = size.saturating_sub(out.len() + 2);
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str("\"}");
    out
}

/// A kind 3 binary push (2.0.0 client → server): `3, join_ref_len,
/// ref_len, topic_len, event_len, meta_len, encoding`, then the fields.
fn kind3(join_ref: &str, msg_ref: &str, topic: &str, event: &str, payload: &[u8]) -> Vec<u8> {
    let len = |s: &str| u8::try_from(s.len()).unwrap_or(u8::MAX);
    let mut out = Vec::with_capacity(7 + join_ref.len() + msg_ref.len() + topic.len() + event.len() + payload.len());
    out.extend_from_slice(&[3, len(join_ref), len(msg_ref), len(topic), len(event), 0, 1]);
    for field in [join_ref, msg_ref, topic, event] {
        out.extend_from_slice(field.as_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// What a load payload claims.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
struct Body {
    s: u32,
    t: u64,
    r: u32,
    f: u32,
}

/// The broadcast map P of a text frame (either source's shape).
#[derive(Debug, Deserialize)]
struct Outer<'a> {
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(default)]
    payload: Option<Body>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: Outer<'a>,
}

type V2Frame<'a> = (Option<Cow<'a, str>>, Option<Cow<'a, str>>, Cow<'a, str>, Cow<'a, str>, Outer<'a>);

/// What a received frame is to the checker.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// A load broadcast on this client's topic.
    Broadcast(Body),
    /// Not for the checker (heartbeat replies).
    Other,
    /// Wrong: the text says what.
    Error(String),
}

/// Reads a text frame of a `vsn` socket joined to `topic`.
fn read_text(vsn: Vsn, topic: &str, text: &str) -> Frame {
    let parsed = match vsn {
        Vsn::V1 => serde_json::from_str::<V1Frame<'_>>(text).map(|f| (f.topic, f.event, f.payload)),
        Vsn::V2 => serde_json::from_str::<V2Frame<'_>>(text).map(|f| (f.2, f.3, f.4)),
    };
    let (frame_topic, event, outer) = match parsed {
        Ok(parts) => parts,
        Err(err) => return Frame::Error(format!("undecodable frame ({err}): {}", clip(text))),
    };
    if frame_topic == "phoenix" {
        return Frame::Other;
    }
    if frame_topic != topic {
        return Frame::Error(format!("a frame on another topic: {}", clip(text)));
    }
    match &*event {
        "broadcast" => match (outer.event.as_deref(), outer.payload) {
            (Some(EVENT), Some(body)) => Frame::Broadcast(body),
            _ => Frame::Error(format!("a broadcast that is not a load message: {}", clip(text))),
        },
        "phx_reply" if outer.status.as_deref() == Some("ok") => Frame::Other,
        _ => Frame::Error(format!("unexpected {event} on the channel: {}", clip(text))),
    }
}

/// Reads a binary frame (kind 4 `user_broadcast`) of a socket joined to `topic`.
fn read_binary(topic: &str, data: &[u8]) -> Frame {
    let bad = |why: &str| Frame::Error(format!("binary frame: {why} ({} bytes)", data.len()));
    let [kind, topic_len, event_len, meta_len, encoding, rest @ ..] = data else {
        return bad("shorter than its header");
    };
    if *kind != crate::realtime::protocol::USER_BROADCAST || *encoding != 1 {
        return bad("not kind 4 with a JSON payload");
    }
    let (t, e, m) = (usize::from(*topic_len), usize::from(*event_len), usize::from(*meta_len));
    if rest.len() < t + e + m {
        return bad("shorter than its lengths");
    }
    if &rest[..t] != topic.as_bytes() {
        return bad("on another topic");
    }
    if &rest[t..t + e] != EVENT.as_bytes() {
        return bad("not a load event");
    }
    match serde_json::from_slice::<Body>(&rest[t + e + m..]) {
        Ok(body) => Frame::Broadcast(body),
        Err(err) => bad(&format!("payload: {err}")),
    }
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// What a client ends with.
#[derive(Debug, Default)]
struct Outcome {
    /// (message, send→receive µs) of every delivery, in arrival order.
    received: Vec<(u32, u32)>,
    /// Messages sent.
    sent: u64,
    /// How late each send was against its schedule (µs).
    lateness_us: Vec<u32>,
    /// Frames whose claims (room, sender) disagree with the schedule.
    forged: u64,
    protocol_errors: u64,
    first_protocol_error: Option<String>,
    /// When the last delivery arrived (µs since the epoch).
    last_recv_us: u64,
}

impl Outcome {
    fn protocol(&mut self, what: String) {
        self.protocol_errors += 1;
        self.first_protocol_error.get_or_insert(what);
    }
}

/// A client of the run.
struct Client {
    index: u32,
    room: u32,
    vsn: Vsn,
    topic: String,
    ws: Socket,
    next_ref: u64,
}

impl Client {
    /// Connects and joins the room's public channel (self: false, ack: false).
    async fn join(
        endpoint: &Endpoint,
        source: Option<IpAddr>,
        schedule: &Schedule,
        index: u32,
        wait: Duration,
    ) -> Result<Client, String> {
        let deadline = tokio::time::Instant::now() + wait;
        let ws = tokio::time::timeout_at(deadline, client::open(endpoint, source))
            .await
            .map_err(|_| format!("connect timed out after {wait:?}"))??;
        let room = schedule.room(index);
        let mut c = Client { index, room, vsn: endpoint.vsn, topic: topic(room), ws, next_ref: 1 };
        let payload = json!({
            "config": {"broadcast": {"ack": false, "self": false}, "presence": {"key": "", "enabled": false},
                       "postgres_changes": [], "private": false},
        });
        let frame = match c.vsn {
            Vsn::V1 => json!({"topic": c.topic, "event": "phx_join", "payload": payload, "ref": "1", "join_ref": "1"}),
            Vsn::V2 => json!(["1", "1", c.topic, "phx_join", payload]),
        };
        c.ws.send(WsMessage::Text(frame.to_string().into())).await.map_err(|e| format!("join: {e}"))?;
        loop {
            let message = tokio::time::timeout_at(deadline, c.ws.next())
                .await
                .map_err(|_| format!("no join reply within {wait:?}"))?;
            let text = match message {
                Some(Ok(WsMessage::Text(text))) => text,
                Some(Ok(WsMessage::Close(frame))) => return Err(format!("closed while joining: {frame:?}")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("while joining: {e}")),
                None => return Err("closed while joining".into()),
            };
            let raw: Value = serde_json::from_str(&text).map_err(|e| format!("join reply is not JSON: {e}"))?;
            let (event, msg_ref, reply) = match c.vsn {
                Vsn::V1 => (raw["event"].clone(), raw["ref"].clone(), raw["payload"].clone()),
                Vsn::V2 => (raw[3].clone(), raw[1].clone(), raw[4].clone()),
            };
            if event == "phx_reply" && msg_ref == "1" {
                if reply["status"] != "ok" {
                    return Err(format!("join refused: {reply}"));
                }
                return Ok(c);
            }
            if event == "phx_close" || event == "phx_error" {
                return Err(format!("{event} while joining: {reply}"));
            }
        }
    }

    async fn send_text(&mut self, frame: String) -> Result<(), String> {
        self.ws.send(WsMessage::Text(frame.into())).await.map_err(|e| format!("send: {e}"))
    }

    /// Sends message `k` now.
    async fn send_message(&mut self, k: u32, t_us: u64, payload_bytes: usize) -> Result<(), String> {
        self.next_ref += 1;
        let msg_ref = self.next_ref.to_string();
        let payload = body(k, t_us, self.room, self.index, payload_bytes);
        match self.vsn {
            Vsn::V1 => {
                let frame = format!(
                    r#"{{"topic":"{}","event":"broadcast","payload":{{"type":"broadcast","event":"{EVENT}","payload":{payload}}},"ref":"{msg_ref}","join_ref":"1"}}"#,
                    self.topic
                );
                self.send_text(frame).await
            }
            Vsn::V2 => {
                let frame = kind3("1", &msg_ref, &self.topic, EVENT, payload.as_bytes());
                self.ws.send(WsMessage::Binary(frame.into())).await.map_err(|e| format!("send: {e}"))
            }
        }
    }

    async fn heartbeat(&mut self) -> Result<(), String> {
        self.next_ref += 1;
        let frame = match self.vsn {
            Vsn::V1 => format!(r#"{{"topic":"phoenix","event":"heartbeat","payload":{{}},"ref":"{}"}}"#, self.next_ref),
            Vsn::V2 => format!(r#"[null,"{}","phoenix","heartbeat",{{}}]"#, self.next_ref),
        };
        self.send_text(frame).await
    }

    fn deliver(&self, frame: Frame, shared: &Shared, schedule: &Schedule, outcome: &mut Outcome) {
        match frame {
            Frame::Broadcast(body) => {
                let now = shared.now_us();
                // The claims must be what the schedule says of message s.
                if body.s >= schedule.messages || body.f != schedule.sender(body.s) || body.r != schedule.room(body.f) {
                    outcome.forged += 1;
                    outcome.protocol(format!("a payload that disagrees with the schedule: {body:?}"));
                    return;
                }
                let latency = u32::try_from(now.saturating_sub(body.t)).unwrap_or(u32::MAX);
                outcome.received.push((body.s, latency));
                outcome.last_recv_us = now;
                shared.received.fetch_add(1, Ordering::Relaxed);
            }
            Frame::Other => {}
            Frame::Error(what) => outcome.protocol(format!("client {} (room {}): {what}", self.index, self.room)),
        }
    }

    /// Sends this client's messages on schedule from `start` and receives
    /// until told to stop.
    async fn run(
        mut self,
        shared: Arc<Shared>,
        schedule: Schedule,
        payload_bytes: usize,
        mut start: watch::Receiver<Option<tokio::time::Instant>>,
        mut stop: watch::Receiver<bool>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        let mut next = self.index;
        let mut started: Option<tokio::time::Instant> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        // One timer, reset per send (not one per received frame).
        let due = tokio::time::sleep_until(far);
        tokio::pin!(due);
        loop {
            let sending = started.is_some() && next < schedule.messages;
            tokio::select! {
                biased;
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                changed = start.changed(), if started.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                    if let Some(at) = *start.borrow() {
                        started = Some(at);
                        due.as_mut().reset(at + schedule.due(next));
                    }
                }
                () = &mut due, if sending => {
                    let Some(at) = started else { continue };
                    let scheduled = at + schedule.due(next);
                    let late = tokio::time::Instant::now().saturating_duration_since(scheduled);
                    outcome.lateness_us.push(u32::try_from(late.as_micros()).unwrap_or(u32::MAX));
                    if let Err(err) = self.send_message(next, shared.now_us(), payload_bytes).await {
                        outcome.protocol(format!("client {}: {err}", self.index));
                        break;
                    }
                    outcome.sent += 1;
                    next = next.saturating_add(schedule.clients);
                    due.as_mut().reset(if next < schedule.messages { at + schedule.due(next) } else { far });
                }
                _ = heartbeat.tick() => {
                    if let Err(err) = self.heartbeat().await {
                        outcome.protocol(format!("client {} heartbeat: {err}", self.index));
                        break;
                    }
                }
                message = self.ws.next() => match message {
                    Some(Ok(WsMessage::Text(text))) => {
                        let frame = read_text(self.vsn, &self.topic, text.as_str());
                        self.deliver(frame, &shared, &schedule, &mut outcome);
                    }
                    Some(Ok(WsMessage::Binary(data))) => {
                        let frame = if self.vsn == Vsn::V2 {
                            read_binary(&self.topic, &data)
                        } else {
                            Frame::Error("a binary frame on a 1.0.0 socket".into())
                        };
                        self.deliver(frame, &shared, &schedule, &mut outcome);
                    }
                    Some(Ok(WsMessage::Close(frame))) => {
                        let why = frame.map_or_else(|| "no close frame".to_owned(), |f| format!("{} {}", u16::from(f.code), f.reason));
                        outcome.protocol(format!("client {}: the relay closed the socket: {why}", self.index));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        outcome.protocol(format!("client {}: socket error: {err}", self.index));
                        break;
                    }
                    None => {
                        outcome.protocol(format!("client {}: the socket closed", self.index));
                        break;
                    }
                },
            }
        }
        outcome
    }
}

/// Per (message, receiver) verdict of a run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Deliveries a correct relay makes.
    pub expected: u64,
    /// Deliveries received.
    pub received: u64,
    /// (message, receiver) pairs received exactly once.
    pub correct: u64,
    /// Pairs that should have been delivered and were not.
    pub missing: u64,
    /// Extra copies of pairs delivered more than once.
    pub duplicates: u64,
    /// Deliveries to a client outside the message's room.
    pub other_room: u64,
    /// Deliveries of a client's own message back to it (`self: false`).
    pub to_sender: u64,
    /// The first failures, described.
    pub first: Vec<String>,
}

impl Verdict {
    /// Misrouted deliveries: to another room or to the sender.
    pub fn misrouted(&self) -> u64 {
        self.other_room + self.to_sender
    }

    /// Whether every message reached every other member of its room once and nobody else.
    pub fn passed(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.misrouted() == 0 && self.received == self.expected
    }
}

/// Judges what each client received (`received[i]`: the messages client `i`
/// got, any order) against the schedule; `sent` says which messages went out.
pub fn check(schedule: &Schedule, sent: &[bool], received: &mut [Vec<u32>]) -> Verdict {
    let mut v = Verdict::default();
    // Messages sent, by room, ascending.
    let mut by_room: Vec<Vec<u32>> = vec![Vec::new(); schedule.rooms as usize];
    for k in 0..schedule.messages {
        if sent.get(k as usize).copied().unwrap_or(false) {
            by_room[schedule.room(schedule.sender(k)) as usize].push(k);
        }
    }
    let mut note = |v: &mut Verdict, what: String| {
        if v.first.len() < 5 {
            v.first.push(what);
        }
    };
    for (client, got) in received.iter_mut().enumerate() {
        let client = client as u32;
        got.sort_unstable();
        v.received += got.len() as u64;
        let room = schedule.room(client);
        let want = by_room[room as usize].iter().copied().filter(|&k| schedule.sender(k) != client);
        // Merge the two ascending lists.
        let mut got_iter = got.iter().copied().peekable();
        for k in want {
            v.expected += 1;
            while let Some(&g) = got_iter.peek().filter(|&&g| g < k) {
                got_iter.next();
                misroute(schedule, client, g, &mut v, &mut note);
            }
            let mut copies = 0u64;
            while got_iter.peek() == Some(&k) {
                got_iter.next();
                copies += 1;
            }
            match copies {
                0 => {
                    v.missing += 1;
                    note(
                        &mut v,
                        format!("missing: message {k} (from client {}) at client {client}", schedule.sender(k)),
                    );
                }
                1 => v.correct += 1,
                n => {
                    v.duplicates += n - 1;
                    note(&mut v, format!("duplicate: message {k} reached client {client} {n} times"));
                }
            }
        }
        for g in got_iter {
            misroute(schedule, client, g, &mut v, &mut note);
        }
    }
    v
}

/// Counts a delivery of `k` to `client` that is not owed to it.
fn misroute(schedule: &Schedule, client: u32, k: u32, v: &mut Verdict, note: &mut impl FnMut(&mut Verdict, String)) {
    let from = schedule.sender(k);
    if from == client {
        v.to_sender += 1;
        note(v, format!("misrouted: client {client} got its own message {k} (self: false)"));
    } else if schedule.room(from) != schedule.room(client) {
        v.other_room += 1;
        note(
            v,
            format!(
                "misrouted: message {k} of room {} reached client {client} in room {}",
                schedule.room(from),
                schedule.room(client)
            ),
        );
    } else {
        // Same room, not the sender, not in the expected list: a message
        // that was never sent (its sender failed first) yet arrived.
        v.other_room += 1;
        note(v, format!("misrouted: message {k} arrived at client {client} but was never sent"));
    }
}

/// Checks the broadcast flags.
pub(super) fn check_args(args: &LoadArgs) -> Result<Schedule, LoadError> {
    let bad = |s: String| Err(LoadError::Config(s));
    if args.idle || args.record_out.is_some() || args.unique_topics || args.churn > 0.0 {
        return bad("--broadcast does not combine with --idle, --record-out, --unique-topics or --churn".into());
    }
    if args.rooms == 0 || args.clients < 2 * args.rooms {
        return bad(format!(
            "--broadcast needs at least 2 clients per room (--clients {} for --rooms {})",
            args.clients, args.rooms
        ));
    }
    if !(16..=65_536).contains(&args.payload_bytes) {
        return bad("--payload-bytes must be 16 to 65536".into());
    }
    let schedule = Schedule::new(args.clients, args.rooms, args.rate, args.duration);
    if schedule.messages == 0 {
        return bad("--rate × --duration sends no message".into());
    }
    let expected = schedule.expected_deliveries();
    if expected > MAX_DELIVERIES {
        return bad(format!(
            "{expected} deliveries expected: at most {MAX_DELIVERIES} are kept for the check (fewer clients per room, a lower --rate or a shorter --duration)"
        ));
    }
    Ok(schedule)
}

/// Where the relay is, for [`run`].
pub(super) struct Target<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub apikey: &'a str,
    pub relay_pid: Option<u32>,
    pub url: &'a str,
    pub slot: &'a str,
}

/// Runs the broadcast workload against a relay that is up, filling `report`.
/// Returns the first failure.
pub(super) async fn run(
    args: &LoadArgs,
    schedule: Schedule,
    target: &Target<'_>,
    shared: Arc<Shared>,
    report: &mut Report,
    notes: &mut Vec<String>,
) -> Result<Option<String>, LoadError> {
    let endpoints = [Vsn::V1, Vsn::V2].map(|vsn| Endpoint::new(target.addr, target.path, target.apikey, vsn));
    let (sources, _) = super::source_spread(args);
    let spread = target.addr.ip().is_loopback() && target.addr.is_ipv4();
    let (start_tx, start_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscribed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let semaphore = Arc::new(Semaphore::new(args.connect_parallel));
    let subscribe_deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.subscribe_timeout);
    let connect_start = Instant::now();
    let payload_bytes = args.payload_bytes;
    let mut tasks = Vec::with_capacity(args.clients as usize);
    for i in 0..args.clients {
        let endpoint = endpoints[usize::from(schedule.vsn(i) == Vsn::V2)].clone();
        let source = spread.then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)));
        let (shared, start_rx, stop_rx) = (Arc::clone(&shared), start_rx.clone(), stop_rx.clone());
        let (semaphore, subscribed, failed, first_failure) =
            (Arc::clone(&semaphore), Arc::clone(&subscribed), Arc::clone(&failed), Arc::clone(&first_failure));
        tasks.push(tokio::spawn(async move {
            let joined = async {
                let _permit = tokio::time::timeout_at(subscribe_deadline, semaphore.acquire_owned())
                    .await
                    .map_err(|_| "no connection slot before the subscribe deadline".to_owned())?
                    .map_err(|_| "closed".to_owned())?;
                let wait = subscribe_deadline.saturating_duration_since(tokio::time::Instant::now());
                Client::join(&endpoint, source, &schedule, i, wait.min(Duration::from_secs(60))).await
            };
            match joined.await {
                Ok(c) => {
                    subscribed.fetch_add(1, Ordering::Relaxed);
                    Some(c.run(shared, schedule, payload_bytes, start_rx, stop_rx).await)
                }
                Err(err) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = first_failure.lock() {
                        first.get_or_insert_with(|| format!("client {i}: {err}"));
                    }
                    None
                }
            }
        }));
    }
    let monitor = Monitor::start(
        target.relay_pid,
        target.url,
        target.slot,
        Arc::clone(&shared),
        [Arc::clone(&subscribed), Arc::clone(&failed)],
        args.clients,
        "sends",
    )
    .await;
    let Joined { n_failed, mut failure, .. } = await_joins(
        report,
        Joining {
            clients: args.clients,
            subscribed: &subscribed,
            failed: &failed,
            first_failure: &first_failure,
            deadline: subscribe_deadline,
            started: connect_start,
        },
        ["joined", "join"],
    )
    .await;

    // Sends. Without every member a room's expectations are void: the run
    // has failed already, so nothing is sent.
    let expected_total = schedule.expected_deliveries();
    let mut window = None;
    if failure.is_none() {
        // A moment for the last join replies' rooms to settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        monitor.phase("sending");
        let cpu0 = (Instant::now(), target.relay_pid.and_then(relay::proc_sample));
        let own0 = (relay::proc_sample(std::process::id()), relay::system_ticks());
        let start = tokio::time::Instant::now() + Duration::from_millis(50);
        shared.writes_start_us.store(shared.now_us() + 50_000, Ordering::Relaxed);
        let _ = start_tx.send(Some(start));
        let send_end = start + schedule.due(schedule.messages.saturating_sub(1));
        // The monitor's "sends" counter follows the schedule (the clients
        // count what they sent exactly).
        while tokio::time::Instant::now() < send_end {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let elapsed = tokio::time::Instant::now().saturating_duration_since(start).as_secs_f64();
            let due = ((elapsed * schedule.rate) as u64).min(u64::from(schedule.messages));
            monitor.writes.store(due, Ordering::Relaxed);
        }
        monitor.writes.store(u64::from(schedule.messages), Ordering::Relaxed);
        monitor.phase("draining");
        let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
        while shared.received.load(Ordering::Relaxed) < expected_total && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(GRACE).await;
        let cpu1 = (Instant::now(), target.relay_pid.and_then(relay::proc_sample));
        let own1 = (relay::proc_sample(std::process::id()), relay::system_ticks());
        window = Some((cpu0, cpu1, own0, own1));
    }

    monitor.phase("collecting");
    let _ = stop_tx.send(true);
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(outcome)) => outcome,
            _ => None,
        });
    }
    let samples = monitor.stop().await;

    // Checks.
    let start_us = shared.writes_start_us.load(Ordering::Relaxed);
    let mut sent = vec![false; schedule.messages as usize];
    let mut received: Vec<Vec<u32>> = Vec::with_capacity(outcomes.len());
    let mut latencies = Latencies::default();
    let mut lateness = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| LoadError::Config(format!("histogram: {e}")))?;
    let (mut protocol, mut forged, mut sends, mut last_recv_us) = (0u64, 0u64, 0u64, 0u64);
    let mut first_protocol = None;
    for (i, outcome) in outcomes.iter_mut().enumerate() {
        let Some(o) = outcome else {
            received.push(Vec::new());
            continue;
        };
        let i = i as u32;
        let mut k = i;
        for _ in 0..o.sent {
            if let Some(slot) = sent.get_mut(k as usize) {
                *slot = true;
            }
            k = k.saturating_add(schedule.clients);
        }
        sends += o.sent;
        for &late in &o.lateness_us {
            lateness.saturating_record(u64::from(late).max(1));
        }
        protocol += o.protocol_errors;
        forged += o.forged;
        if first_protocol.is_none() {
            first_protocol.clone_from(&o.first_protocol_error);
        }
        last_recv_us = last_recv_us.max(o.last_recv_us);
        for &(k, lat) in &o.received {
            let second = (f64::from(k) / schedule.rate) as usize;
            latencies.record(second, None, Some(u64::from(lat)));
        }
        received.push(o.received.iter().map(|&(k, _)| k).collect());
        o.received = Vec::new();
    }
    let unsent = if window.is_some() { u64::from(schedule.messages).saturating_sub(sends) } else { 0 };
    let verdict = check(&schedule, &sent, &mut received);
    let window_secs = last_recv_us.saturating_sub(start_us) as f64 / 1e6;
    let per_sec = verdict.received as f64 / window_secs.max(1e-3);
    report.result(
        "sends",
        json!({"sent": sends, "scheduled": schedule.messages, "rate_per_sec": schedule.rate, "lateness_p99_ms": Quantiles::of(&lateness).p99, "lateness_max_ms": Quantiles::of(&lateness).max}),
        format!(
            "sends\u{0}{sends} of {} at {}/s (late: p99 {:.1} ms, max {:.1} ms)",
            schedule.messages,
            schedule.rate,
            Quantiles::of(&lateness).p99,
            Quantiles::of(&lateness).max
        ),
    );
    if Quantiles::of(&lateness).p99 > 100.0 {
        notes.push(format!(
            "the senders fell behind the schedule (lateness p99 {:.0} ms): the load generator limited this run",
            Quantiles::of(&lateness).p99
        ));
    }
    report.result(
        "deliveries",
        json!({"expected": verdict.expected, "received": verdict.received, "correct": verdict.correct, "per_sec": per_sec, "window_secs": window_secs}),
        format!(
            "deliveries\u{0}{} received of {} expected ({} correct); {per_sec:.0}/s over {window_secs:.1} s",
            verdict.received, verdict.expected, verdict.correct
        ),
    );
    report.latency("send_to_receive", "send→receive", Quantiles::of(&latencies.write));
    report.set_seconds(&latencies);
    if let Some(((t0, Some(c0)), (t1, Some(c1)), own0, own1)) = window {
        let wall = t1 - t0;
        cpu_rows(report, c0, c1, wall, verdict.received);
        if let ((Some(a), s0), (Some(b), s1)) = (own0, own1) {
            let pct = relay::cpu_pct(a, b, wall);
            let busy = s1.0.saturating_sub(s0.0) as f64;
            let total = s1.1.saturating_sub(s0.1).max(1) as f64;
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let machine = 100.0 * busy / total * cpus;
            report.result(
                "cpu_breakdown",
                json!({"load_generator_pct": pct, "machine_busy_pct": machine, "cpus": cpus}),
                format!(
                    "load generator CPU\u{0}{pct:.0}% of one core (machine busy {machine:.0}% of {cpus:.0} cores = {:.0}% of capacity)",
                    machine / cpus
                ),
            );
        }
    }
    report.result(
        "checks",
        json!({"missing": verdict.missing, "duplicates": verdict.duplicates, "misrouted": verdict.misrouted(),
               "misrouted_other_room": verdict.other_room, "misrouted_to_sender": verdict.to_sender,
               "forged": forged, "unsent": unsent, "protocol_errors": protocol, "subscribe_failures": n_failed}),
        format!(
            "checks\u{0}missing {}, duplicates {}, misrouted {} ({} to another room, {} to the sender), unsent {unsent}, protocol errors {protocol}, join failures {n_failed}",
            verdict.missing,
            verdict.duplicates,
            verdict.misrouted(),
            verdict.other_room,
            verdict.to_sender
        ),
    );
    for f in &verdict.first {
        notes.push(format!("first: {f}"));
    }
    if failure.is_none() {
        failure = first_protocol.map(|p| format!("protocol: {p}"));
    }
    if failure.is_none() && unsent > 0 {
        failure = Some(format!("{unsent} scheduled messages were not sent"));
    }
    if failure.is_none() && !verdict.passed() {
        failure =
            Some(verdict.first.first().cloned().unwrap_or_else(|| {
                format!("{} deliveries received of {} expected", verdict.received, verdict.expected)
            }));
    }
    report.samples = samples;
    Ok(failure)
}

/// Relay CPU (per 1M deliveries) and RSS rows.
fn cpu_rows(report: &mut Report, c0: ProcSample, c1: ProcSample, wall: Duration, deliveries: u64) {
    let pct = relay::cpu_pct(c0, c1, wall);
    let cpu_secs = c1.ticks.saturating_sub(c0.ticks) as f64 / relay::ticks_per_second();
    let per_million = cpu_secs / (deliveries.max(1) as f64 / 1e6);
    report.result(
        "relay_cpu",
        json!({"pct_of_one_core": pct, "cpu_secs": cpu_secs, "cpu_secs_per_million_deliveries": per_million, "wall_secs": wall.as_secs_f64()}),
        format!(
            "relay CPU\u{0}{pct:.0}% of one core over {:.1} s ({cpu_secs:.2} CPU-s; {per_million:.2} CPU-s per 1M deliveries)",
            wall.as_secs_f64()
        ),
    );
    report.result(
        "relay_rss_kb",
        json!({"current": c1.rss_kb, "peak": c1.hwm_kb}),
        format!("relay RSS\u{0}{:.1} MB now, peak {:.1} MB", c1.rss_kb as f64 / 1024.0, c1.hwm_kb as f64 / 1024.0),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spreads_rooms_senders_and_versions() {
        let s = Schedule::new(40, 4, 100.0, 2.0);
        assert_eq!(s.messages, 200);
        assert_eq!((0..4).map(|r| s.members(r)).collect::<Vec<_>>(), [10, 10, 10, 10]);
        assert_eq!(s.expected_deliveries(), 200 * 9);
        // Half of each room speaks each version.
        for r in 0..4 {
            let v2 = (0..40).filter(|&i| s.room(i) == r && s.vsn(i) == Vsn::V2).count();
            assert_eq!(v2, 5);
        }
        let uneven = Schedule::new(10, 4, 1.0, 10.0);
        assert_eq!((0..4).map(|r| uneven.members(r)).sum::<u32>(), 10);
        assert_eq!(
            (0..4).map(|r| (0..10).filter(|&i| uneven.room(i) == r).count() as u32).collect::<Vec<_>>(),
            [3, 3, 2, 2]
        );
    }

    #[test]
    fn bodies_are_padded_and_parse() {
        let b = body(7, 123_456, 3, 11, 100);
        assert_eq!(b.len(), 100);
        let parsed: Body = serde_json::from_str(&b).unwrap();
        assert_eq!(parsed, Body { s: 7, t: 123_456, r: 3, f: 11 });
    }

    #[test]
    fn frames_of_both_sources_read_back() {
        let topic = "realtime:load-room-1";
        let b = body(5, 9, 1, 2, 100);
        let v1_push = format!(r#"{{"type":"broadcast","event":"load","payload":{b}}}"#);
        let want = Frame::Broadcast(Body { s: 5, t: 9, r: 1, f: 2 });
        // Text broadcast to a 1.0.0 and a 2.0.0 receiver.
        let v1 = format!(r#"{{"topic":"{topic}","event":"broadcast","payload":{v1_push},"ref":null}}"#);
        assert_eq!(read_text(Vsn::V1, topic, &v1), want);
        let v2 = format!(r#"[null,null,"{topic}","broadcast",{v1_push}]"#);
        assert_eq!(read_text(Vsn::V2, topic, &v2), want);
        // What the relay makes of a kind 3 push.
        let msg = crate::realtime::rooms::Message::Binary { event: EVENT, encoding: 1, payload: b.as_bytes() };
        let mut frames = crate::realtime::rooms::broadcast::Frames::new(topic, &msg);
        assert_eq!(read_binary(topic, frames.get(Vsn::V2).unwrap()), want);
        let text = String::from_utf8(frames.get(Vsn::V1).unwrap().to_vec()).unwrap();
        assert_eq!(read_text(Vsn::V1, topic, &text), want);
        assert!(matches!(read_binary("realtime:load-room-2", frames.get(Vsn::V2).unwrap()), Frame::Error(_)));
        assert!(matches!(read_text(Vsn::V2, "realtime:load-room-2", &v2), Frame::Error(_)));
        // The kind 3 push decodes as the relay reads it.
        let push = crate::realtime::protocol::decode_binary(&kind3("1", "9", topic, EVENT, b.as_bytes())).unwrap();
        assert_eq!((push.topic.as_str(), push.event.as_str(), push.encoding), (topic, EVENT, 1));
        assert_eq!(push.payload, b.as_bytes());
        // Heartbeat replies are not deliveries.
        let reply = r#"[null,"3","phoenix","phx_reply",{"status":"ok","response":{}}]"#;
        assert_eq!(read_text(Vsn::V2, topic, reply), Frame::Other);
    }

    #[test]
    fn the_check_counts_missing_duplicates_and_misrouted() {
        let s = Schedule::new(4, 2, 10.0, 0.4); // rooms {0,2} and {1,3}; messages 0..4 from clients 0..4
        let sent = vec![true; 4];
        let mut perfect = vec![vec![2], vec![3], vec![0], vec![1]];
        let v = check(&s, &sent, &mut perfect);
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.expected, v.correct), (4, 4));

        // Client 0 misses message 2, client 1 gets message 3 twice, client 2
        // gets its own message 2, client 3 gets room 0's message 0.
        let mut bad = vec![vec![], vec![3, 3], vec![0, 2], vec![1, 0]];
        let v = check(&s, &sent, &mut bad);
        assert!(!v.passed());
        assert_eq!((v.missing, v.duplicates, v.to_sender, v.other_room), (1, 1, 1, 1), "{v:?}");
        assert_eq!(v.correct, 2, "a duplicated pair is not correct");
    }
}
