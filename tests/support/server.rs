//! A walcast server on a scratch database, and a raw WebSocket client that
//! speaks both Phoenix serializers, for protocol tests.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_postgres::Client;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;
use walcast::cluster::ScratchDatabase;
use walcast::hub::Vsn;
use walcast::realtime::auth::{sign_hs256, AuthConfig};
use walcast::realtime::Limits;
use walcast::relay::RelayConfig;
use walcast::replication::{SlotOptions, SourceConfig};
use walcast::server::{ServeConfig, Server};

use super::migrated_db;

/// The HS256 secret test servers use.
pub const SECRET: &str = "walcast-test-secret-with-at-least-32-characters";

/// Seconds since the epoch.
pub fn now() -> i64 {
    walcast::realtime::session::now_unix()
}

/// A token for `role` (and `sub`), expiring in `ttl` seconds (negative: expired).
pub fn token(role: &str, sub: Option<Uuid>, ttl: i64) -> String {
    let mut claims = json!({"role": role, "exp": now() + ttl, "iat": now(), "aud": "authenticated"});
    if let Some(sub) = sub {
        claims["sub"] = json!(sub);
    }
    sign_hs256(SECRET.as_bytes(), &claims)
}

/// The anon key.
pub fn anon() -> String {
    token("anon", None, 3600)
}

/// A user's token.
pub fn user(id: Uuid) -> String {
    token("authenticated", Some(id), 3600)
}

/// A server on its own scratch database.
pub struct TestServer {
    /// The server.
    pub server: Server,
    /// Its database.
    pub db: ScratchDatabase,
    /// A superuser client.
    pub client: Client,
}

impl TestServer {
    /// Starts a server with default limits.
    pub async fn start() -> TestServer {
        TestServer::with_limits(Limits::default()).await
    }

    /// Starts a server with `limits`.
    pub async fn with_limits(limits: Limits) -> TestServer {
        TestServer::with_config(|config| config.limits = limits).await
    }

    /// Starts a server whose [`ServeConfig`] (defaults as in [`TestServer::start`]) `configure`
    /// adjusts first, e.g. to serve `demo_json`.
    pub async fn with_config(configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        TestServer::with_schema_and_config("", configure).await
    }

    /// Starts a server (defaults as in [`TestServer::start`]) after running
    /// `sql` on its freshly migrated database: walcast reads the policies,
    /// privileges and roles at start, so tables and policies a test relies on
    /// must exist before it.
    pub async fn with_schema(sql: &str) -> TestServer {
        TestServer::with_schema_and_config(sql, |_| {}).await
    }

    /// [`TestServer::with_schema`] after `walcast setup` (walcast's own
    /// migrations: the policy-change trigger, the `realtime` schema of
    /// Broadcast from Database and the `walcast_messages` publication).
    pub async fn with_setup(sql: &str) -> TestServer {
        TestServer::start_on(true, sql, |_| {}).await
    }

    /// [`TestServer::with_schema`] and [`TestServer::with_config`] together.
    pub async fn with_schema_and_config(sql: &str, configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        TestServer::start_on(false, sql, configure).await
    }

    async fn start_on(setup: bool, sql: &str, configure: impl FnOnce(&mut ServeConfig)) -> TestServer {
        let (db, mut client) = migrated_db().await;
        if setup {
            walcast::schema::migrate(&mut client, &walcast::schema::Migrations::walcast())
                .await
                .expect("walcast setup");
        }
        if !sql.is_empty() {
            client.batch_execute(sql).await.unwrap_or_else(|e| panic!("the test's schema: {e:?}"));
        }
        let slot = format!("ws_{}", Uuid::new_v4().simple());
        let source = SourceConfig::new(
            tokio_postgres::Config::from_str(db.url()).unwrap(),
            SlotOptions::new(slot, "supabase_realtime"),
        );
        let mut config = ServeConfig::new(
            RelayConfig::new(source),
            AuthConfig { jwt_secret: Some(SECRET.into()), jwks: None, audience: None },
        );
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        configure(&mut config);
        let server = Server::start(config).await.expect("server starts");
        TestServer { server, db, client }
    }

    /// Another walcast node on the same database (its own slot and port),
    /// configured by `configure`: a cluster peer.
    pub async fn peer(&self, configure: impl FnOnce(&mut ServeConfig)) -> Server {
        let slot = format!("ws_{}", Uuid::new_v4().simple());
        let source = SourceConfig::new(
            tokio_postgres::Config::from_str(self.db.url()).unwrap(),
            SlotOptions::new(slot, "supabase_realtime"),
        );
        let mut config = ServeConfig::new(
            RelayConfig::new(source),
            AuthConfig { jwt_secret: Some(SECRET.into()), jwks: None, audience: None },
        );
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        configure(&mut config);
        Server::start(config).await.expect("the peer starts")
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Connects to `/realtime/v1/websocket` with `apikey` and `vsn`.
    pub async fn connect(&self, apikey: &str, vsn: Vsn) -> Ws {
        Ws::connect(self.addr(), "/realtime/v1/websocket", apikey, Some(vsn)).await
    }
}

/// One decoded server frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// `join_ref` (always `None` for vsn 1.0.0).
    pub join_ref: Option<String>,
    /// `ref`.
    pub msg_ref: Option<String>,
    /// Topic.
    pub topic: String,
    /// Event.
    pub event: String,
    /// Payload.
    pub payload: Value,
    /// The frame as sent.
    pub raw: Value,
}

fn opt(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// A raw Phoenix client.
pub struct Ws {
    /// The socket.
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Its serializer.
    pub vsn: Vsn,
    next_ref: u64,
}

/// How long a test waits for an expected frame.
pub const WAIT: Duration = Duration::from_secs(15);

impl Ws {
    /// Connects (`vsn: None` omits the parameter).
    pub async fn connect(addr: SocketAddr, path: &str, apikey: &str, vsn: Option<Vsn>) -> Ws {
        let mut url = format!("ws://{addr}{path}?apikey={apikey}");
        if let Some(vsn) = vsn {
            url.push_str(match vsn {
                Vsn::V1 => "&vsn=1.0.0",
                Vsn::V2 => "&vsn=2.0.0",
            });
        }
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        Ws { ws, vsn: vsn.unwrap_or(Vsn::V1), next_ref: 0 }
    }

    /// As [`Ws::connect`] (vsn 2.0.0) over a socket whose receive buffer is
    /// `rcvbuf` bytes: setting it turns off the kernel's autotuning (up to
    /// `tcp_rmem`'s maximum, 32 MiB here), so a client that stops reading
    /// stalls the server's writes after a few kilobytes.
    pub async fn connect_small_window(addr: SocketAddr, path: &str, apikey: &str, rcvbuf: u32) -> Ws {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let stream = socket.connect(addr).await.expect("tcp connects");
        let url = format!("ws://{addr}{path}?apikey={apikey}&vsn=2.0.0");
        let (ws, _) =
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("websocket connects");
        Ws { ws, vsn: Vsn::V2, next_ref: 0 }
    }

    /// Upgrades `/realtime/v1/websocket` (vsn 2.0.0) by hand over a socket
    /// bound to `source` (any 127.0.0.x; `None`: the system's choice), with
    /// `headers` added: the open socket, or the refusal's status and body.
    pub async fn upgrade_from(
        addr: SocketAddr,
        source: Option<IpAddr>,
        apikey: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, (u16, String)> {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(source) = source {
            socket.bind(SocketAddr::new(source, 0)).unwrap();
        }
        let mut stream = socket.connect(addr).await.expect("tcp connects");
        let mut request = format!(
            "GET /realtime/v1/websocket?apikey={apikey}&vsn=2.0.0 HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\n\
             connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        // Byte by byte: nothing past the head may be taken from the socket.
        let mut head = Vec::new();
        let read_head = async {
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await?;
                head.push(byte[0]);
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(WAIT, read_head).await.expect("a response head in time").expect("a response head");
        let head = String::from_utf8_lossy(&head).into_owned();
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if status == 101 {
            let ws = WebSocketStream::from_raw_socket(MaybeTlsStream::Plain(stream), Role::Client, None).await;
            return Ok(Ws { ws, vsn: Vsn::V2, next_ref: 0 });
        }
        let mut body = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut body)).await.expect("a body in time").unwrap();
        Err((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// A fresh ref.
    pub fn make_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    /// Sends a message; returns its ref.
    pub async fn send(&mut self, join_ref: Option<&str>, topic: &str, event: &str, payload: Value) -> String {
        let msg_ref = self.make_ref();
        let frame = match self.vsn {
            Vsn::V1 => {
                let mut f = json!({"topic": topic, "event": event, "payload": payload, "ref": msg_ref});
                if let Some(j) = join_ref {
                    f["join_ref"] = json!(j);
                }
                f
            }
            Vsn::V2 => json!([join_ref, msg_ref, topic, event, payload]),
        };
        self.send_raw(Message::Text(frame.to_string().into())).await;
        msg_ref
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// Joins `topic` with `bindings` (and an access token); returns the join ref.
    pub async fn join(&mut self, topic: &str, bindings: Value, access_token: Option<&str>) -> String {
        let join_ref = (self.next_ref + 1).to_string();
        let mut payload = json!({
            "config": {"broadcast": {"ack": false, "self": false}, "presence": {"key": "", "enabled": false},
                       "postgres_changes": bindings, "private": false},
        });
        if let Some(token) = access_token {
            payload["access_token"] = json!(token);
        }
        let sent = self.send(Some(&join_ref), topic, "phx_join", payload).await;
        assert_eq!(sent, join_ref);
        join_ref
    }

    /// The next frame, or `None` when the socket closed.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a frame within the wait")?;
            match message.ok()? {
                Message::Text(text) => return Some(self.decode(text.as_str())),
                Message::Close(_) => return None,
                _ => {}
            }
        }
    }

    /// The next text or binary message as received (pings and pongs
    /// skipped), or `None` when the socket closed.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a message within the wait")?;
            match message.ok()? {
                Message::Close(_) => return None,
                message @ (Message::Text(_) | Message::Binary(_)) => return Some(message),
                _ => {}
            }
        }
    }

    /// The next frame, waiting at most `wait`; `None` on silence or close.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Frame> {
        tokio::time::timeout(wait, self.next()).await.ok().flatten()
    }

    /// Decodes a frame per vsn (and checks vsn 1.0.0 never carries `join_ref`).
    pub fn decode(&self, text: &str) -> Frame {
        let raw: Value = serde_json::from_str(text).expect("server frames are JSON");
        match self.vsn {
            Vsn::V1 => {
                let obj = raw.as_object().expect("vsn 1.0.0 frames are objects");
                assert!(!obj.contains_key("join_ref"), "vsn 1.0.0 server frames carry no join_ref: {text}");
                assert_eq!(obj.len(), 4, "topic, event, payload, ref: {text}");
                Frame {
                    join_ref: None,
                    msg_ref: opt(&raw["ref"]),
                    topic: raw["topic"].as_str().unwrap().to_owned(),
                    event: raw["event"].as_str().unwrap().to_owned(),
                    payload: raw["payload"].clone(),
                    raw,
                }
            }
            Vsn::V2 => {
                let arr = raw.as_array().expect("vsn 2.0.0 frames are arrays");
                assert_eq!(arr.len(), 5, "{text}");
                Frame {
                    join_ref: opt(&arr[0]),
                    msg_ref: opt(&arr[1]),
                    topic: arr[2].as_str().unwrap().to_owned(),
                    event: arr[3].as_str().unwrap().to_owned(),
                    payload: arr[4].clone(),
                    raw,
                }
            }
        }
    }

    /// Waits for the next frame with `event` on `topic`, skipping others.
    pub async fn expect(&mut self, topic: &str, event: &str) -> Frame {
        loop {
            let frame = self.next().await.unwrap_or_else(|| panic!("socket closed while waiting for {event}"));
            if frame.topic == topic && frame.event == event {
                return frame;
            }
        }
    }

    /// Joins and waits for the ok reply and "Subscribed to PostgreSQL".
    pub async fn subscribe(&mut self, topic: &str, bindings: Value, access_token: Option<&str>) -> Frame {
        self.join(topic, bindings, access_token).await;
        let reply = self.expect(topic, "phx_reply").await;
        assert_eq!(reply.payload["status"], "ok", "{:?}", reply.raw);
        let system = self.expect(topic, "system").await;
        assert_eq!(system.payload["message"], "Subscribed to PostgreSQL", "{:?}", system.raw);
        reply
    }

    /// The WebSocket close frame's code, reading until the socket closes.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("close within the wait") {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// A raw HTTP GET; returns (status, body).
pub async fn http_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {target} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await.expect("response in time").unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A raw HTTP request with `body` (a `content-length` is added unless
/// `headers` has one); returns (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {target} HTTP/1.1\r\nhost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-length")) {
        request.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await.expect("response in time").unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// [`http_request`] with `POST`.
pub async fn http_post(addr: SocketAddr, target: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    http_request(addr, "POST", target, headers, body).await
}

/// A WebSocket upgrade request by hand: (status, body).
pub async fn upgrade(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let mut headers = vec![
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ];
    headers.extend_from_slice(extra);
    http_get(addr, target, &headers).await
}
