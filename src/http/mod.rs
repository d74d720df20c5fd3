//! The HTTP front: one listener for the WebSocket endpoints, the dashboard
//! and the small JSON endpoints, served by hyper (HTTP/1.1).
//!
//! ```text
//!  TcpListener ──accept──▶ connection task: hyper reads one request head (≤ 16 KiB, 10 s)
//!     ├─ GET /realtime/v1/websocket | /socket/websocket  → apikey check → admission
//!     │       (connection permit, per-address and per-user budgets) → 101 → realtime session
//!     ├─ GET /            → dashboard (static page)
//!     ├─ GET /demo.json   → demo users and tokens (demo mode only)
//!     ├─ GET /demo/orders → the orders a bearer token's user may see, read through RLS (demo mode only)
//!     ├─ GET /health      → {"status":"ok"} (alive: the process serves)
//!     ├─ GET /ready       → 200 {"ready":true,…} | 503 {"ready":false,"reason":…} (see crate::monitor)
//!     ├─ GET /metrics     → Prometheus text exposition
//!     ├─ POST [/realtime/v1]/api/broadcast[/:topic/events/:event] → broadcast over HTTP (see [`broadcast`])
//!     └─ anything else    → 404
//! ```
//!
//! Invariants:
//! - A refused upgrade is an HTTP response with a JSON body `{"error": …}`
//!   (Supabase's texts where it has them), never a dropped connection. A
//!   request hyper cannot parse gets hyper's bare 400 (or 431 for a head over
//!   16 KiB), a head not complete within 10 s a closed connection.
//! - Plain HTTP responses are `Connection: close`: one request per connection.
//! - Every socket holds an [`admission::Ticket`] (taken before the 101) for
//!   its whole life, in the same task that runs its session: the connection
//!   cap and the budgets cannot be overshot, and they come back when the
//!   session ends however it ends.
//! - After the upgrade, hyper's connection state and buffers are gone: the
//!   session runs on the bare `TcpStream` (hyper's
//!   [`hyper::upgrade::Upgraded`] is unwrapped, its unread bytes handed to
//!   tungstenite), so a socket costs what it cost before hyper.
//! - Shutdown stops accepting first; a connection still in its HTTP request
//!   is finished gracefully, sessions close their sockets with 1001, and the
//!   accept loop waits for them (bounded by a deadline).
//!
//! hyper without axum: a handful of fixed GET routes need no router, and
//! the upgrade needs hyper's own `OnUpgrade`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub mod admission;
pub mod broadcast;
mod demo_orders;

pub use admission::{Admission, Cidr, CidrError, Ticket};
pub use demo_orders::{DemoEndpoints, Refusal};

use crate::hub::Vsn;
use crate::monitor::{text, Monitor};
use crate::realtime::auth::Claims;
use crate::realtime::protocol::parse_vsn;
use crate::realtime::session::{self, now_unix};
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
    /// The connection cap and the socket budgets.
    pub admission: Admission,
    /// Broadcast over HTTP: its bound on bodies being read.
    pub broadcast: broadcast::RestBroadcast,
    /// `Some(why)`: this node serves no WebSockets (a cluster's source-only
    /// node); upgrades get 503 with the reason.
    pub no_sockets: Option<&'static str>,
}

/// Accepts connections until `shutdown`, then waits for them to close (each
/// session sees the same token and closes its socket with 1001); those still
/// open after the drain deadline (5 s) are dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<HttpContext>, shutdown: CancellationToken) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT).max_header_size(MAX_HEAD).keep_alive(false);
    let http = Arc::new(http);
    let connections = TaskTracker::new();
    // Cancelled at the drain deadline: the connections still running end.
    let dropped = CancellationToken::new();
    loop {
        tokio::select! {
            biased;
            // 1. Shutdown: stop accepting.
            () = shutdown.cancelled() => break,
            // 2. Accept.
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let span = tracing::debug_span!("session", peer = %peer);
                    let run = connection(stream, peer, Arc::clone(&http), Arc::clone(&ctx), shutdown.clone());
                    let dropped = dropped.clone();
                    connections.spawn(
                        async move {
                            tokio::select! {
                                () = run => {}
                                () = dropped.cancelled() => {}
                            }
                        }
                        .instrument(span),
                    );
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
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait()).await.is_err() {
        tracing::warn!(left = connections.len(), "sockets still open after the shutdown deadline; dropping them");
        dropped.cancel();
        connections.wait().await;
    }
}

/// An upgrade answered with 101: what its session needs once hyper hands
/// the connection over.
struct Accepted {
    vsn: Vsn,
    apikey: String,
    claims: Claims,
    /// The request's `x-*` headers (`request.headers` for private
    /// channels' policies).
    headers: Arc<serde_json::Value>,
    /// Held for the session's life.
    ticket: Ticket,
}

/// Where the request handler leaves an accepted upgrade for the connection
/// task (one request per connection).
type Handoff = Arc<Mutex<Option<(OnUpgrade, Accepted)>>>;

/// One connection: its HTTP request, then — if it was an accepted upgrade —
/// its realtime session, in this task.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    http: Arc<http1::Builder>,
    ctx: Arc<HttpContext>,
    shutdown: CancellationToken,
) {
    // Boxed: hyper's state is freed once the request is answered, and does
    // not add to the size of this future, which lives as long as the socket.
    let exchange = Box::pin(exchange(stream, peer, http, Arc::clone(&ctx), &shutdown)).await;
    let Some((Accepted { vsn, apikey, claims, headers, ticket }, stream, read_buf)) = exchange else { return };
    let sessions = Arc::clone(&ctx.sessions);
    drop(ctx);
    session::run((stream, read_buf), sessions, vsn, apikey, claims, headers, shutdown).await;
    drop(ticket);
}

/// The HTTP part of a connection: serves its one request; for an accepted
/// upgrade, returns the session's parameters and the bare socket with the
/// bytes hyper read past the request.
async fn exchange(
    stream: TcpStream,
    peer: SocketAddr,
    http: Arc<http1::Builder>,
    ctx: Arc<HttpContext>,
    shutdown: &CancellationToken,
) -> Option<(Accepted, TcpStream, Vec<u8>)> {
    let handoff: Handoff = Arc::new(Mutex::new(None));
    let service = {
        let handoff = Arc::clone(&handoff);
        service_fn(move |request| {
            let (ctx, handoff) = (Arc::clone(&ctx), Arc::clone(&handoff));
            async move { Ok::<_, Infallible>(route(request, peer, &ctx, &handoff).await) }
        })
    };
    let conn = http.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = shutdown.cancelled() => {
            // A request in progress is answered; an idle connection closes.
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(err) = served {
        tracing::debug!(error = %err, "http connection ended");
    }
    let (on_upgrade, accepted) = handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()?;
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade failed");
            return None;
        }
    };
    // The bare socket: no hyper layer (or its buffers) under the session.
    // The connection above serves a `TokioIo<TcpStream>`, so this cannot fail.
    let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
        tracing::warn!("an upgraded connection is not the socket it was served on; dropping it");
        return None;
    };
    Some((accepted, parts.io.into_inner(), parts.read_buf.to_vec()))
}

/// A request's query parameter.
fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// A request header as text (the first of its name).
fn header<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn route(
    request: Request<Incoming>,
    peer: SocketAddr,
    ctx: &HttpContext,
    handoff: &Handoff,
) -> Response<Full<Bytes>> {
    if request.method() == Method::POST {
        if let Some(target) = broadcast::Target::parse(request.uri().path()) {
            return broadcast::serve(request, target, ctx).await;
        }
    }
    if request.method() != Method::GET {
        return respond_error(StatusCode::NOT_FOUND, "not found");
    }
    let path = request.uri().path().trim_end_matches('/');
    match path {
        "/realtime/v1/websocket" | "/socket/websocket" => match ctx.no_sockets {
            Some(why) => respond_error(StatusCode::SERVICE_UNAVAILABLE, why),
            None => upgrade(request, peer, ctx, handoff),
        },
        "" => respond(StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(DASHBOARD_HTML.as_bytes())),
        "/demo.json" => match &ctx.demo {
            Some(demo) => respond(StatusCode::OK, "application/json", demo.json.clone()),
            None => respond_error(StatusCode::NOT_FOUND, "not in demo mode"),
        },
        "/demo/orders" => match &ctx.demo {
            Some(demo) => match demo.orders(header(&request, "authorization"), &ctx.sessions.verifier).await {
                Ok(body) => respond(StatusCode::OK, "application/json", Bytes::from(body)),
                Err(refusal) => respond_error(
                    StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &refusal.message,
                ),
            },
            None => respond_error(StatusCode::NOT_FOUND, "not in demo mode"),
        },
        "/health" => respond(StatusCode::OK, "application/json", Bytes::from_static(br#"{"status":"ok"}"#)),
        "/ready" => {
            let readiness = ctx.monitor.readiness();
            let status = if readiness.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            respond(status, "application/json", Bytes::from(readiness.to_json()))
        }
        "/metrics" => respond(StatusCode::OK, text::CONTENT_TYPE, Bytes::from(ctx.monitor.render())),
        _ => respond_error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn respond_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    respond(status, "application/json", Bytes::from(body))
}

fn upgrade(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    ctx: &HttpContext,
    handoff: &Handoff,
) -> Response<Full<Bytes>> {
    let is_upgrade = header(&request, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = header(&request, "sec-websocket-key").map(|key| derive_accept_key(key.as_bytes()));
    let (true, Some(accept)) = (is_upgrade, key) else {
        return respond_error(StatusCode::UPGRADE_REQUIRED, "expected a WebSocket upgrade");
    };
    if header(&request, "sec-websocket-version") != Some("13") {
        return respond_error(StatusCode::UPGRADE_REQUIRED, "unsupported WebSocket version (13 required)");
    }
    let query = parse_query(request.uri().query().unwrap_or(""));
    let Some(vsn) = parse_vsn(param(&query, "vsn")) else {
        return respond_error(StatusCode::BAD_REQUEST, "unsupported vsn: use 1.0.0 or 2.0.0");
    };
    let sessions = &ctx.sessions;
    let apikey = header(&request, "x-api-key")
        .or_else(|| header(&request, "apikey"))
        .or_else(|| param(&query, "apikey"))
        .filter(|k| !k.is_empty())
        .map(str::to_owned);
    let Some(apikey) = apikey else {
        return respond_error(StatusCode::UNAUTHORIZED, "API key is missing");
    };
    let claims = match sessions.verifier.verify(&apikey, now_unix()) {
        Ok(claims) => claims,
        Err(err) => {
            tracing::debug!(%peer, error = %err, "upgrade refused");
            return respond_error(StatusCode::UNAUTHORIZED, &err.to_string());
        }
    };
    let forwarded = request.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok());
    let forwarded: Vec<&str> = forwarded.collect();
    let client = ctx.admission.client_address(peer.ip(), forwarded.into_iter());
    let ticket = match ctx.admission.admit(client, claims.sub.as_deref(), &sessions.stats) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            tracing::debug!(%peer, %client, reason = %refusal.message(), "upgrade refused");
            return respond_error(StatusCode::TOO_MANY_REQUESTS, &refusal.message());
        }
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        // Not an HTTP/1.1 upgrade request as hyper sees it (no `upgrade` header would have failed above).
        return respond_error(StatusCode::UPGRADE_REQUIRED, "expected a WebSocket upgrade");
    };
    let headers = crate::realtime::authorize::x_headers(
        request.headers().iter().map(|(name, value)| (name.as_str(), value.as_bytes())),
    );
    let headers = Arc::new(headers);
    *handoff.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
        Some((on_upgrade, Accepted { vsn, apikey, claims, headers, ticket }));
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
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

/// Percent-decodes a query component (`+` is a space).
fn percent_decode(text: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(text, true)).into_owned()
}

/// The bytes `%XX` escapes stand for (a `%` without two hex digits is
/// kept); `+` is a space only in query components (`plus_is_space`), itself
/// in path segments.
fn percent_decode_bytes(text: &str, plus_is_space: bool) -> Vec<u8> {
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
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of five arguments returns,
    /// without calling it.
    fn future_size5<A, B, C, D, E, F>(_: &impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The connection task's future lives as long as its socket: hyper's
    /// exchange is boxed (freed after the upgrade) and the session's large
    /// awaits are boxed, so an idle socket holds little more than its
    /// session (docs/benchmarks.md, E3). Unoptimized: 1,536 bytes; the
    /// bound adds ~20 %.
    #[test]
    fn connection_future_stays_small() {
        let size = future_size5(&connection);
        eprintln!("connection: {size} B");
        assert!(size <= 1850, "the connection future is {size} bytes (bound 1,850)");
    }

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
