//! The HTTP front: one listener for the WebSocket endpoints, the dashboard
//! and the small JSON endpoints.
//!
//! ```text
//!  TcpListener ──accept──▶ connection task: read one request head (≤ 16 KiB, 10 s)
//!     ├─ GET /realtime/v1/websocket | /socket/websocket  → apikey check → 101 → realtime session
//!     ├─ GET /            → dashboard (static page)
//!     ├─ GET /demo.json   → demo users and tokens (demo mode only)
//!     ├─ GET /demo/orders → the orders a bearer token's user may see, read through RLS (demo mode only)
//!     ├─ GET /health      → {"status":"ok"} (alive: the process serves)
//!     ├─ GET /ready       → 200 {"ready":true,…} | 503 {"ready":false,"reason":…} (see crate::monitor)
//!     ├─ GET /metrics     → Prometheus text exposition
//!     └─ anything else    → 404
//! ```
//!
//! Invariants: a refused upgrade is an HTTP response with a JSON body
//! `{"error": …}` (Supabase's texts), never a dropped connection; plain HTTP
//! responses are `Connection: close`; shutdown stops accepting first, then
//! sessions close their sockets with 1001 and the accept loop waits for them
//! (bounded by a deadline).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

mod demo_orders;

pub use demo_orders::{DemoEndpoints, Refusal};

use crate::monitor::{text, Monitor};
use crate::realtime::protocol::parse_vsn;
use crate::realtime::session::{self, now_unix, stopped};
use crate::realtime::SessionContext;

/// Largest request head.
const MAX_HEAD: usize = 16 << 10;
/// Time allowed for a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for sockets to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The dashboard page served at `/`.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// What the front serves.
#[derive(Debug)]
pub struct HttpContext {
    /// Realtime sessions.
    pub sessions: Arc<SessionContext>,
    /// `/demo.json` and `/demo/orders` (demo mode only).
    pub demo: Option<DemoEndpoints>,
    /// `/metrics` and `/ready`.
    pub monitor: Arc<Monitor>,
}

/// Accepts connections until `shutdown`, then waits for them to close.
pub async fn serve(listener: TcpListener, ctx: Arc<HttpContext>, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // 1. Shutdown: stop accepting.
            () = stopped(&mut shutdown) => break,
            // 2. Reap finished connections.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            // 3. Accept.
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let span = tracing::debug_span!("session", peer = %peer);
                    connections.spawn(connection(stream, peer, Arc::clone(&ctx), shutdown.clone()).instrument(span));
                }
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!(left = connections.len(), "sockets still open after the shutdown deadline; dropping them");
        connections.abort_all();
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads the head; returns it and any bytes read past it.
async fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), u16> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await.map_err(|_| 0u16)?;
        if n == 0 {
            return Err(0);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = request.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let head = Head {
                    method: request.method.unwrap_or("GET").to_owned(),
                    path: path.to_owned(),
                    query: parse_query(query),
                    headers: request
                        .headers
                        .iter()
                        .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect(),
                };
                return Ok((head, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(431),
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(high), Some(low)) => {
                    // Two hex digits make one byte.
                    out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(HEAD_TIMEOUT, write).await;
}

async fn respond_error(stream: &mut TcpStream, status: u16, message: &str) {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    respond(stream, status, "application/json", &body).await;
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, ctx: Arc<HttpContext>, shutdown: watch::Receiver<bool>) {
    let (head, leftover) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(0)) | Err(_) => return,
        Ok(Err(status)) => return respond_error(&mut stream, status, "malformed request").await,
    };
    let path = head.path.trim_end_matches('/');
    match (head.method.as_str(), path) {
        ("GET", "/realtime/v1/websocket" | "/socket/websocket") => {
            upgrade(stream, peer, head, leftover, ctx, shutdown).await
        }
        ("GET", "") => respond(&mut stream, 200, "text/html; charset=utf-8", DASHBOARD_HTML.as_bytes()).await,
        ("GET", "/demo.json") => match &ctx.demo {
            Some(demo) => respond(&mut stream, 200, "application/json", &demo.json).await,
            None => respond_error(&mut stream, 404, "not in demo mode").await,
        },
        ("GET", "/demo/orders") => match &ctx.demo {
            Some(demo) => match demo.orders(head.header("authorization"), &ctx.sessions.verifier).await {
                Ok(body) => respond(&mut stream, 200, "application/json", &body).await,
                Err(refusal) => respond_error(&mut stream, refusal.status, &refusal.message).await,
            },
            None => respond_error(&mut stream, 404, "not in demo mode").await,
        },
        ("GET", "/health") => respond(&mut stream, 200, "application/json", br#"{"status":"ok"}"#).await,
        ("GET", "/ready") => {
            let readiness = ctx.monitor.readiness();
            let status = if readiness.is_ready() { 200 } else { 503 };
            respond(&mut stream, status, "application/json", &readiness.to_json()).await
        }
        ("GET", "/metrics") => respond(&mut stream, 200, text::CONTENT_TYPE, ctx.monitor.render().as_bytes()).await,
        _ => respond_error(&mut stream, 404, "not found").await,
    }
}

async fn upgrade(
    mut stream: TcpStream,
    peer: SocketAddr,
    head: Head,
    leftover: Vec<u8>,
    ctx: Arc<HttpContext>,
    shutdown: watch::Receiver<bool>,
) {
    let is_upgrade = head.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = head.header("sec-websocket-key").map(str::to_owned);
    let (true, Some(key)) = (is_upgrade, key) else {
        return respond_error(&mut stream, 426, "expected a WebSocket upgrade").await;
    };
    if head.header("sec-websocket-version") != Some("13") {
        return respond_error(&mut stream, 426, "unsupported WebSocket version (13 required)").await;
    }
    let Some(vsn) = parse_vsn(head.param("vsn")) else {
        return respond_error(&mut stream, 400, "unsupported vsn: use 1.0.0 or 2.0.0").await;
    };
    let sessions = &ctx.sessions;
    let apikey = head
        .header("x-api-key")
        .or_else(|| head.header("apikey"))
        .or_else(|| head.param("apikey"))
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    let Some(apikey) = apikey else {
        return respond_error(&mut stream, 401, "API key is missing").await;
    };
    let claims = match sessions.verifier.verify(&apikey, now_unix()) {
        Ok(claims) => claims,
        Err(err) => {
            tracing::debug!(%peer, error = %err, "upgrade refused");
            return respond_error(&mut stream, 401, &err.to_string()).await;
        }
    };
    if sessions.stats.sockets_open.load(Ordering::Relaxed) >= sessions.limits.max_connections as u64 {
        return respond_error(&mut stream, 429, "Too many connected users").await;
    }
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let config = sessions.limits.websocket_config();
    let ws = WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await;
    session::run(ws, Arc::clone(sessions), vsn, apikey, claims, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_decoded() {
        let q = parse_query("apikey=a.b-c_d&vsn=2.0.0&x=%2F%zz&empty=&flag");
        assert_eq!(q[0], ("apikey".into(), "a.b-c_d".into()));
        assert_eq!(q[1], ("vsn".into(), "2.0.0".into()));
        assert_eq!(q[2], ("x".into(), "/%zz".into()));
        assert_eq!(q[3], ("empty".into(), String::new()));
        assert_eq!(q[4], ("flag".into(), String::new()));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("a%41"), "aA");
    }
}
