//! The load clients: raw Phoenix WebSocket clients (our own wire,
//! [`super::wire`], 4 KiB read buffers) that join one channel each, wait for
//! "Subscribed to PostgreSQL", then move to a receiver thread
//! ([`super::receiver`]) that records every postgres_changes delivery
//! compactly for the checker and its latencies into shared histograms.
//! [`open`] (tokio-tungstenite) stays for the Broadcast clients.
//!
//! Invariants:
//! - a frame is decoded into borrowed, typed structs (no `serde_json::Value`
//!   on the receive path) and reduced to a [`Delivery`]: row index (from the
//!   row's UUID, see [`super::ids`]), per-row sequence number (from the row's
//!   `metadata.load_seq`; a DELETE event is the write after the old row's
//!   version), event, and the judged row's dealership and status;
//! - anything the checker cannot attribute to this run (a foreign row or
//!   table) is a leak; anything malformed (wrong topic, wrong binding ids, an
//!   UPDATE whose old row is not the previous version, a socket closed by the
//!   server) is a protocol error; both fail the run;
//! - every wait is bounded by a timeout, and a client stops when told to.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use super::ids::{Ids, Tag};
use super::oracle::{self, Delivery, Event, Table, NO_STATUS, UNKNOWN};
use super::receiver::Handoff;
use super::report::Latencies;
use super::wire::{Conn, Message};
use crate::hub::Vsn;

/// How often a client sends a Phoenix heartbeat (the relay closes a socket
/// silent for 60 s).
pub const HEARTBEAT: Duration = Duration::from_secs(20);

/// The socket type of a client.
pub type Socket = WebSocketStream<TcpStream>;

/// Where and how clients connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The relay's address (loopback).
    pub addr: SocketAddr,
    /// The request path and query (`/realtime/v1/websocket?apikey=…&vsn=…`).
    pub path: String,
    /// The serializer.
    pub vsn: Vsn,
    /// `SO_RCVBUF` of the client sockets (`None`: the kernel's default and
    /// autotuning). A small one makes a client that stops reading fill its
    /// kernel buffers, and so stall the relay's writes, after a few KiB.
    pub recv_buffer: Option<u32>,
}

impl Endpoint {
    /// The endpoint of a relay at `addr` with the anon key `apikey`.
    pub fn new(addr: SocketAddr, path: &str, apikey: &str, vsn: Vsn) -> Endpoint {
        let vsn_text = match vsn {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        };
        Endpoint { addr, path: format!("{path}?apikey={apikey}&vsn={vsn_text}"), vsn, recv_buffer: None }
    }

    /// The same endpoint, its client sockets with `SO_RCVBUF` = `bytes`.
    pub fn with_recv_buffer(self, bytes: u32) -> Endpoint {
        Endpoint { recv_buffer: Some(bytes), ..self }
    }
}

/// What the receive path shares: the time base, id scheme and histograms.
#[derive(Debug)]
pub struct Shared {
    /// The run's time base (`t_us` and `recv_us` count from here).
    pub epoch: Instant,
    /// The run's ids.
    pub ids: Ids,
    /// Latency histograms (locked once per receiver poll).
    pub latencies: Mutex<Latencies>,
    /// Deliveries received by all clients.
    pub received: AtomicU64,
    /// µs since `epoch` when writes started (`u64::MAX` before).
    pub writes_start_us: AtomicU64,
}

impl Shared {
    /// µs since the epoch.
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// One client to open.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Client index.
    pub index: u32,
    /// User index.
    pub user: u32,
    /// Whether its orders binding has `status=eq.pending`.
    pub filtered: bool,
    /// The user's token (the join's `access_token`).
    pub token: String,
    /// Source address to bind before connecting (spreading many clients
    /// over 127.0.0.x).
    pub source: Option<IpAddr>,
}

/// What a client ends with.
#[derive(Debug, Default)]
pub struct ClientOutcome {
    /// Deliveries in arrival order.
    pub received: Vec<Delivery>,
    /// Frames the checker cannot attribute to this run (leaks).
    pub leaks: u64,
    /// The first such frame, described.
    pub first_leak: Option<String>,
    /// Malformed frames or an early close.
    pub protocol_errors: u64,
    /// The first protocol error.
    pub first_protocol_error: Option<String>,
}

impl ClientOutcome {
    pub(super) fn leak(&mut self, what: String) {
        self.leaks += 1;
        self.first_leak.get_or_insert(what);
    }

    pub(super) fn protocol(&mut self, what: String) {
        self.protocol_errors += 1;
        self.first_protocol_error.get_or_insert(what);
    }
}

/// The binding list of a load client: orders (filtered or not) and memberships.
pub fn load_bindings(filtered: bool) -> Value {
    let mut orders = json!({"event": "*", "schema": "public", "table": "orders"});
    if filtered {
        orders["filter"] = json!("status=eq.pending");
    }
    json!([orders, {"event": "*", "schema": "public", "table": "dealer_memberships"}])
}

/// Opens a TCP connection (bound to `source` when given) and upgrades it.
///
/// # Errors
/// Connect or handshake failures, as text.
pub async fn open(endpoint: &Endpoint, source: Option<IpAddr>) -> Result<Socket, String> {
    let stream = connect_tcp(endpoint, source).await?;
    let url = format!("ws://{}{}", endpoint.addr, endpoint.path);
    let config = WebSocketConfig::default().read_buffer_size(4 << 10).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

/// A TCP connection to `endpoint` (bound to `source` when given, with the
/// endpoint's `SO_RCVBUF`), `TCP_NODELAY` set: what both client kinds
/// ([`open`] and [`super::wire::Conn`]) upgrade.
///
/// # Errors
/// Socket, bind or connect failures, as text.
pub(super) async fn connect_tcp(endpoint: &Endpoint, source: Option<IpAddr>) -> Result<TcpStream, String> {
    let socket = match endpoint.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(bytes) = endpoint.recv_buffer {
        // Before connect, so the window scale fits it.
        socket.set_recv_buffer_size(bytes).map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    if let Some(source) = source {
        bind_no_port(&socket);
        socket.bind(SocketAddr::new(source, 0)).map_err(|e| format!("bind {source}: {e}"))?;
    }
    let stream = socket.connect(endpoint.addr).await.map_err(|e| format!("connect {}: {e}", endpoint.addr))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// `IP_BIND_ADDRESS_NO_PORT`: bind the source address now, pick the port at
/// connect time from the full 4-tuple (so each source address has its own
/// ephemeral port range towards the relay).
fn bind_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// What checks a client's frames: its serializer, topic and binding ids.
#[derive(Debug, Clone)]
pub struct Listener {
    vsn: Vsn,
    topic: String,
    /// Binding ids from the join reply: orders, memberships.
    ids: [u32; 2],
    next_ref: u64,
}

/// One delivery's latencies for the shared histograms.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Second of the run (since writes started).
    pub second: usize,
    /// commit→receive µs.
    pub commit_us: Option<u64>,
    /// write-call→receive µs.
    pub write_us: Option<u64>,
    /// commit→socket µs: until the frame reached the client's socket (the
    /// kernel's receive timestamp), i.e. the database's and the relay's
    /// share of commit→receive.
    pub socket_us: Option<u64>,
}

/// A receive time: µs since the run's epoch and since the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// µs since [`Shared::epoch`].
    pub now_us: u64,
    /// Wall-clock µs since the Unix epoch.
    pub wall_us: u64,
    /// Wall-clock µs (Unix epoch) at which the read's last bytes reached
    /// the socket (`SO_TIMESTAMP`), when the kernel gave it.
    pub socket_wall_us: Option<u64>,
}

impl Shared {
    /// The time now.
    pub fn clock(&self) -> Clock {
        Clock { now_us: self.now_us(), wall_us: wall_now_us(), socket_wall_us: None }
    }

    /// Records deliveries' latencies (one lock for the lot) and counts them.
    pub fn record(&self, samples: &[Sample]) {
        if let Ok(mut latencies) = self.latencies.lock() {
            for sample in samples {
                latencies.record(sample.second, sample.commit_us, sample.write_us);
                if let Some(us) = sample.socket_us {
                    latencies.socket.saturating_record(us.max(1));
                }
            }
        }
        self.received.fetch_add(samples.len() as u64, Ordering::Relaxed);
    }
}

/// A subscribed client, during and right after its join.
#[derive(Debug)]
pub struct Subscribed {
    conn: Conn,
    listener: Listener,
}

/// Mask seeds: distinct per connection.
static SEEDS: AtomicU64 = AtomicU64::new(0x5eed);

impl Subscribed {
    /// Connects, joins `topic` with `bindings` as `token`, and waits (at most
    /// `wait`) for the ok reply and "Subscribed to PostgreSQL".
    ///
    /// # Errors
    /// Connect, join or subscribe failures, as text.
    pub async fn connect(
        endpoint: &Endpoint,
        source: Option<IpAddr>,
        topic: String,
        bindings: Value,
        token: &str,
        wait: Duration,
    ) -> Result<Subscribed, String> {
        let deadline = tokio::time::Instant::now() + wait;
        let seed = SEEDS.fetch_add(1, Ordering::Relaxed) ^ wall_now_us();
        let conn = tokio::time::timeout_at(deadline, Conn::open(endpoint, source, seed))
            .await
            .map_err(|_| format!("connect timed out after {wait:?}"))??;
        let mut client = Subscribed { conn, listener: Listener { vsn: endpoint.vsn, topic, ids: [0, 0], next_ref: 0 } };
        let payload = json!({
            "config": {"broadcast": {"ack": false, "self": false}, "presence": {"key": "", "enabled": false},
                       "postgres_changes": bindings, "private": false},
            "access_token": token,
        });
        let topic = client.listener.topic.clone();
        let join_ref = client.send(true, &topic, "phx_join", payload).await?;
        let mut replied = false;
        loop {
            let message = tokio::time::timeout_at(deadline, client.conn.next_message())
                .await
                .map_err(|_| format!("no subscription within {wait:?} (join reply seen: {replied})"))?
                .map_err(|e| format!("while joining: {e}"))?;
            let text = match message {
                Message::Text(text) => text,
                Message::Closed(why) => return Err(format!("closed while joining: {why}")),
                Message::Other => continue,
            };
            let (msg_topic, event, msg_ref, payload) = decode_slow(client.listener.vsn, &text)?;
            if msg_topic != client.listener.topic {
                continue;
            }
            match event.as_str() {
                "phx_reply" if msg_ref.as_deref() == Some(join_ref.as_str()) => {
                    if payload["status"] != "ok" {
                        return Err(format!("join refused: {payload}"));
                    }
                    let ids: Vec<u32> = payload["response"]["postgres_changes"]
                        .as_array()
                        .map(|list| list.iter().filter_map(|b| b["id"].as_u64()).map(|id| id as u32).collect())
                        .unwrap_or_default();
                    for (slot, id) in client.listener.ids.iter_mut().zip(ids) {
                        *slot = id;
                    }
                    replied = true;
                }
                "system" => {
                    if payload["status"] == "ok" && payload["message"] == "Subscribed to PostgreSQL" {
                        if !replied {
                            return Err("subscribed before the join reply".into());
                        }
                        return Ok(client);
                    }
                    return Err(format!("subscription failed: {payload}"));
                }
                "phx_close" | "phx_error" => return Err(format!("{event} while joining: {payload}")),
                _ => {}
            }
        }
    }

    /// Waits (at most `wait`) for an INSERT of order `key` of this run,
    /// skipping everything else.
    ///
    /// # Errors
    /// Timeout, or the socket closing.
    pub async fn wait_for_order(&mut self, ids: &Ids, key: u32, wait: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.conn.next_message())
                .await
                .map_err(|_| format!("nothing within {wait:?}"))??;
            let text = match message {
                Message::Text(text) => text,
                Message::Other => continue,
                Message::Closed(why) => return Err(format!("the socket closed: {why}")),
            };
            let Ok(frame) = parse_frame(self.listener.vsn, &text) else { continue };
            let Some(data) = frame.payload.data.as_ref() else { continue };
            let hit = data.table == "orders"
                && data.kind == "INSERT"
                && data.record.as_ref().and_then(|r| r.id.as_deref()).and_then(|id| ids.index(Tag::Order, id))
                    == Some(key);
            if hit {
                return Ok(());
            }
        }
    }

    /// Counts postgres_changes deliveries on this channel until `expect` of
    /// them arrived or none came for `idle`, heartbeating meanwhile. Returns
    /// the count and the time of the last delivery.
    ///
    /// # Errors
    /// The socket closing (with the relay's close code and reason) or failing.
    pub async fn count_changes(&mut self, expect: u64, idle: Duration) -> Result<(u64, Option<Instant>), String> {
        let mut count = 0u64;
        let mut last = None;
        let mut beat = tokio::time::Instant::now() + HEARTBEAT;
        while count < expect {
            if tokio::time::Instant::now() >= beat {
                self.send(false, "phoenix", "heartbeat", json!({})).await?;
                beat = tokio::time::Instant::now() + HEARTBEAT;
            }
            let wait = idle.min(beat.saturating_duration_since(tokio::time::Instant::now()));
            let message = match tokio::time::timeout(wait, self.conn.next_message()).await {
                Ok(message) => message,
                Err(_) if wait < idle => continue,
                Err(_) => break,
            };
            match message {
                Ok(Message::Text(text)) => {
                    let is_change = parse_frame(self.listener.vsn, &text)
                        .is_ok_and(|f| f.event == "postgres_changes" && f.topic == self.listener.topic);
                    if is_change {
                        count += 1;
                        last = Some(Instant::now());
                    }
                }
                Ok(Message::Closed(why)) => {
                    return Err(format!("the relay closed the socket after {count} deliveries: {why}"));
                }
                Ok(Message::Other) => {}
                Err(err) => return Err(format!("socket error after {count} deliveries: {err}")),
            }
        }
        Ok((count, last))
    }

    /// The binding ids (orders, memberships) from the join reply.
    pub fn binding_ids(&self) -> [u32; 2] {
        self.listener.ids
    }

    /// Hands the subscribed socket over to a receiver thread as client
    /// `index`.
    ///
    /// # Errors
    /// Tokio failing to release the socket, as text.
    pub fn into_handoff(self, index: u32) -> Result<Handoff, String> {
        let (stream, pending, masks) = self.conn.into_parts()?;
        Ok(Handoff { index, stream, pending, masks, listener: self.listener })
    }

    async fn send(&mut self, join: bool, topic: &str, event: &str, payload: Value) -> Result<String, String> {
        let (text, msg_ref) = self.listener.frame(join, topic, event, payload);
        self.conn.send_text(&text).await?;
        Ok(msg_ref)
    }
}

/// (topic, event, ref, payload) of a frame, through `serde_json::Value`
/// (join time only).
fn decode_slow(vsn: Vsn, text: &str) -> Result<(String, String, Option<String>, Value), String> {
    let raw: Value = serde_json::from_str(text).map_err(|e| format!("frame is not JSON: {e}"))?;
    let s = |v: &Value| v.as_str().map(str::to_owned);
    match vsn {
        Vsn::V1 => Ok((
            s(&raw["topic"]).unwrap_or_default(),
            s(&raw["event"]).unwrap_or_default(),
            s(&raw["ref"]),
            raw["payload"].clone(),
        )),
        Vsn::V2 => {
            let a = raw.as_array().filter(|a| a.len() == 5).ok_or_else(|| format!("not a vsn 2 frame: {text}"))?;
            Ok((s(&a[2]).unwrap_or_default(), s(&a[3]).unwrap_or_default(), s(&a[1]), a[4].clone()))
        }
    }
}

impl Listener {
    /// A client frame (text) and its ref.
    fn frame(&mut self, join: bool, topic: &str, event: &str, payload: Value) -> (String, String) {
        self.next_ref += 1;
        let msg_ref = self.next_ref.to_string();
        let join_ref = join.then(|| msg_ref.clone());
        let frame = match self.vsn {
            Vsn::V1 => {
                let mut f = json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref});
                if let Some(j) = &join_ref {
                    f["join_ref"] = json!(j);
                }
                f
            }
            Vsn::V2 => json!([join_ref, msg_ref, topic, event, payload]),
        };
        (frame.to_string(), msg_ref)
    }

    /// A Phoenix heartbeat frame's text.
    pub fn heartbeat(&mut self) -> String {
        self.frame(false, "phoenix", "heartbeat", json!({})).0
    }

    /// Checks one text frame received at `now`: a delivery goes to
    /// `outcome` and its latencies to `samples`; anything else wrong is a
    /// leak or a protocol error.
    pub fn handle(
        &self,
        text: &str,
        shared: &Shared,
        now: Clock,
        outcome: &mut ClientOutcome,
        samples: &mut Vec<Sample>,
    ) {
        let frame = match parse_frame(self.vsn, text) {
            Ok(frame) => frame,
            Err(err) => return outcome.protocol(format!("undecodable frame ({err}): {}", clip(text))),
        };
        if frame.event != "postgres_changes" {
            if frame.topic == self.topic && matches!(&*frame.event, "phx_close" | "phx_error") {
                outcome.protocol(format!("{} on the channel: {}", frame.event, clip(text)));
            }
            if frame.event == "system" && frame.payload.status.as_deref() == Some("error") {
                outcome.protocol(format!("system error: {}", clip(text)));
            }
            return;
        }
        if frame.topic != self.topic {
            return outcome.protocol(format!("postgres_changes on another topic: {}", clip(text)));
        }
        let Some(data) = frame.payload.data.as_ref() else {
            return outcome.protocol(format!("postgres_changes without data: {}", clip(text)));
        };
        match reduce(data, &shared.ids) {
            Reduced::Delivery { delivery, write_t_us, commit_ms } => {
                let expected_ids = [self.ids[delivery.table as usize]];
                let ids = frame.payload.ids.as_deref().unwrap_or(&[]);
                if ids != expected_ids {
                    outcome.protocol(format!("binding ids {ids:?}, expected {expected_ids:?}: {}", clip(text)));
                }
                let mut delivery = delivery;
                delivery.recv_us = u32::try_from(now.now_us).unwrap_or(u32::MAX);
                let commit_us = commit_ms.map(|ms| now.wall_us.saturating_sub(ms.saturating_mul(1000)));
                let socket_us =
                    commit_ms.zip(now.socket_wall_us).map(|(ms, at)| at.saturating_sub(ms.saturating_mul(1000)));
                let write_us = write_t_us.map(|t| now.now_us.saturating_sub(t));
                let start = shared.writes_start_us.load(Ordering::Relaxed);
                let second = now.now_us.saturating_sub(start) / 1_000_000;
                samples.push(Sample { second: second as usize, commit_us, write_us, socket_us });
                outcome.received.push(delivery);
            }
            Reduced::Leak(why) => outcome.leak(format!("{why}: {}", clip(text))),
            Reduced::Malformed(why) => outcome.protocol(format!("{why}: {}", clip(text))),
        }
    }
}

/// The first 300 bytes of a frame, for messages.
fn clip(text: &str) -> &str {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Wall-clock µs since the Unix epoch.
pub fn wall_now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// A decoded server frame (borrowed where possible).
#[derive(Debug)]
pub struct Frame<'a> {
    /// Topic.
    pub topic: Cow<'a, str>,
    /// Event.
    pub event: Cow<'a, str>,
    /// Payload.
    pub payload: Payload<'a>,
}

#[derive(Deserialize)]
struct V1Frame<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    payload: Payload<'a>,
}

#[derive(Deserialize)]
struct V2Frame<'a>(
    serde::de::IgnoredAny,
    serde::de::IgnoredAny,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow)] Cow<'a, str>,
    #[serde(borrow, default)] Payload<'a>,
);

/// The payload fields the load clients read.
#[derive(Debug, Default, Deserialize)]
pub struct Payload<'a> {
    /// postgres_changes: matching binding ids.
    #[serde(default)]
    pub ids: Option<Vec<u32>>,
    /// postgres_changes: the change.
    #[serde(borrow, default)]
    pub data: Option<Data<'a>>,
    /// Replies and system messages: `ok` / `error`.
    #[serde(borrow, default)]
    pub status: Option<Cow<'a, str>>,
}

/// The `data` of a postgres_changes payload.
#[derive(Debug, Deserialize)]
pub struct Data<'a> {
    /// Schema.
    #[serde(borrow)]
    pub schema: Cow<'a, str>,
    /// Table.
    #[serde(borrow)]
    pub table: Cow<'a, str>,
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    #[serde(borrow)]
    pub commit_timestamp: Cow<'a, str>,
    /// INSERT, UPDATE, DELETE.
    #[serde(borrow, rename = "type")]
    pub kind: Cow<'a, str>,
    /// The new row.
    #[serde(borrow, default)]
    pub record: Option<Record<'a>>,
    /// The old row.
    #[serde(borrow, default)]
    pub old_record: Option<Record<'a>>,
}

/// The row fields the load clients read.
#[derive(Debug, Deserialize)]
pub struct Record<'a> {
    /// Row id.
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    /// Dealership.
    #[serde(borrow, default)]
    pub dealership_id: Option<Cow<'a, str>>,
    /// Order status.
    #[serde(borrow, default)]
    pub status: Option<Cow<'a, str>>,
    /// Order metadata with the writer's stamp.
    #[serde(default)]
    pub metadata: Option<Stamp>,
}

/// `metadata` of a load order: `{"load_t_us": …, "load_seq": …}`.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Stamp {
    /// When the write was issued (µs since the run's epoch).
    #[serde(default)]
    pub load_t_us: Option<u64>,
    /// Per-row sequence number of the write.
    #[serde(default)]
    pub load_seq: Option<u32>,
}

/// Decodes a server frame of either serializer.
///
/// # Errors
/// When the text is not a frame of that serializer.
pub fn parse_frame(vsn: Vsn, text: &str) -> Result<Frame<'_>, serde_json::Error> {
    match vsn {
        Vsn::V1 => serde_json::from_str::<V1Frame<'_>>(text).map(|f| Frame {
            topic: f.topic,
            event: f.event,
            payload: f.payload,
        }),
        Vsn::V2 => serde_json::from_str::<V2Frame<'_>>(text).map(|f| Frame { topic: f.2, event: f.3, payload: f.4 }),
    }
}

/// A postgres_changes `data` reduced for the checker.
#[derive(Debug)]
pub enum Reduced {
    /// A change of this run.
    Delivery {
        /// What the checker compares.
        delivery: Delivery,
        /// The version's write time from its `metadata` (INSERT/UPDATE of orders).
        write_t_us: Option<u64>,
        /// The commit timestamp in Unix ms.
        commit_ms: Option<u64>,
    },
    /// A row or table this run did not write.
    Leak(String),
    /// Not a well-formed change.
    Malformed(String),
}

/// Reduces a change to a [`Delivery`] (see the module docs).
pub fn reduce(data: &Data<'_>, ids: &Ids) -> Reduced {
    let table = match (&*data.schema, &*data.table) {
        ("public", "orders") => Table::Orders,
        ("public", "dealer_memberships") => Table::Memberships,
        (schema, table) => return Reduced::Leak(format!("a change of {schema}.{table}")),
    };
    let Some(event) = Event::parse(&data.kind) else {
        return Reduced::Malformed(format!("unknown type {}", data.kind));
    };
    let judged = match event {
        Event::Insert | Event::Update => data.record.as_ref(),
        Event::Delete => data.old_record.as_ref(),
    };
    let Some(judged) = judged else {
        return Reduced::Malformed(format!("{} without its row", event.as_str()));
    };
    let tag = match table {
        Table::Orders => Tag::Order,
        Table::Memberships => Tag::Membership,
    };
    let Some(key) = judged.id.as_deref().and_then(|id| ids.index(tag, id)) else {
        return Reduced::Leak(format!("a {} row of another writer ({:?})", data.table, judged.id));
    };
    let dealership = judged.dealership_id.as_deref().and_then(|d| ids.index(Tag::Dealership, d)).unwrap_or(UNKNOWN);
    let (seq, status, write_t_us) = match table {
        Table::Orders => {
            let Some(stamp) = judged.metadata else {
                return Reduced::Malformed("an order without its metadata stamp".into());
            };
            let Some(version) = stamp.load_seq else {
                return Reduced::Malformed("an order without metadata.load_seq".into());
            };
            let status = judged.status.as_deref().map_or(NO_STATUS, oracle::status_code);
            match event {
                Event::Delete => (version + 1, status, None),
                Event::Insert => (version, status, stamp.load_t_us),
                Event::Update => {
                    let previous = data.old_record.as_ref().and_then(|r| r.metadata).and_then(|m| m.load_seq);
                    if previous.map(|p| p + 1) != Some(version) {
                        return Reduced::Malformed(format!(
                            "UPDATE of version {version} whose old_record is version {previous:?}"
                        ));
                    }
                    (version, status, stamp.load_t_us)
                }
            }
        }
        // Memberships are granted (0) and revoked (1), never updated (2: unexpected).
        Table::Memberships => (
            match event {
                Event::Insert => 0,
                Event::Delete => 1,
                Event::Update => 2,
            },
            NO_STATUS,
            None,
        ),
    };
    let delivery = Delivery { key, seq, dealership, recv_us: 0, table, event, status };
    Reduced::Delivery { delivery, write_t_us, commit_ms: parse_commit_ms(&data.commit_timestamp) }
}

/// Unix ms of `YYYY-MM-DDTHH:MM:SS.mmmZ` (the relay's commit timestamp,
/// truncated to the millisecond).
pub fn parse_commit_ms(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        text.get(range)?.bytes().try_fold(0i64, |acc, c| c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0')))
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    let days = days_from_civil(y, m, d);
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + ms).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_timestamps_parse_to_unix_ms() {
        assert_eq!(parse_commit_ms("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(parse_commit_ms("2000-01-01T00:00:00.001Z"), Some(946_684_800_001));
        assert_eq!(parse_commit_ms("2026-11-26T12:35:30.123Z"), Some(1_795_696_530_123));
        assert_eq!(parse_commit_ms("2026-11-26 12:35:30.123Z"), None);
        assert_eq!(parse_commit_ms("2026-11-26T12:35:30Z"), None);
    }

    fn frame(vsn: Vsn, data: Value) -> String {
        let payload = json!({"ids": [5], "data": data});
        match vsn {
            Vsn::V1 => json!({"topic": "realtime:t", "event": "postgres_changes", "payload": payload, "ref": null}),
            Vsn::V2 => json!([null, null, "realtime:t", "postgres_changes", payload]),
        }
        .to_string()
    }

    #[test]
    fn frames_reduce_to_deliveries() {
        let ids = Ids::new(0xabcd_0000_0000_0000);
        let order = ids.uuid(Tag::Order, 3).to_string();
        let d1 = ids.uuid(Tag::Dealership, 1).to_string();
        let d2 = ids.uuid(Tag::Dealership, 2).to_string();
        let row = |d: &str, status: &str, seq: u32| json!({"id": order, "dealership_id": d, "status": status, "metadata": {"load_seq": seq, "load_t_us": 77 + seq}});
        let base = |kind: &str| json!({"schema": "public", "table": "orders", "commit_timestamp": "2026-01-01T00:00:00.000Z", "type": kind, "columns": [], "errors": null});
        for vsn in [Vsn::V1, Vsn::V2] {
            let mut update = base("UPDATE");
            update["record"] = row(&d2, "pending", 4);
            update["old_record"] = row(&d1, "draft", 3);
            let text = frame(vsn, update.clone());
            let f = parse_frame(vsn, &text).unwrap();
            assert_eq!(
                (&*f.topic, &*f.event, f.payload.ids.as_deref()),
                ("realtime:t", "postgres_changes", Some(&[5][..]))
            );
            let Reduced::Delivery { delivery, write_t_us, commit_ms } = reduce(f.payload.data.as_ref().unwrap(), &ids)
            else {
                panic!("not a delivery")
            };
            assert_eq!((delivery.key, delivery.seq, delivery.event, delivery.dealership), (3, 4, Event::Update, 2));
            assert_eq!((delivery.status, write_t_us, commit_ms), (oracle::PENDING, Some(81), Some(1_767_225_600_000)));

            let mut delete = base("DELETE");
            delete["old_record"] = row(&d1, "draft", 3);
            let text = frame(vsn, delete);
            let f = parse_frame(vsn, &text).unwrap();
            let Reduced::Delivery { delivery, write_t_us, .. } = reduce(f.payload.data.as_ref().unwrap(), &ids) else {
                panic!("not a delivery")
            };
            assert_eq!((delivery.seq, delivery.event, delivery.dealership, write_t_us), (4, Event::Delete, 1, None));

            // An UPDATE whose old row skips a version is malformed.
            update["old_record"] = row(&d1, "draft", 1);
            let text = frame(vsn, update);
            let f = parse_frame(vsn, &text).unwrap();
            assert!(matches!(reduce(f.payload.data.as_ref().unwrap(), &ids), Reduced::Malformed(_)));
        }
        // Another run's order is a leak.
        let other = Ids::new(0x1111_0000_0000_0000);
        let mut insert = base("INSERT");
        insert["record"] = json!({"id": other.uuid(Tag::Order, 3).to_string(), "metadata": {"load_seq": 0}});
        let text = frame(Vsn::V2, insert);
        let f = parse_frame(Vsn::V2, &text).unwrap();
        assert!(matches!(reduce(f.payload.data.as_ref().unwrap(), &ids), Reduced::Leak(_)));
    }
}
