//! A TCP proxy of the test's own that can stop forwarding without closing
//! anything: the silent network path of a dead link (no FIN, no RST).
//!
//! Each accepted connection gets an upstream connection and two forwarding
//! loops. [`Proxy::pause`] makes every loop wait before its next read and
//! before its next write, so bytes already in flight stay in the proxy or in
//! the kernel's buffers and both sides see an open, silent socket; new
//! connections are still accepted (and their bytes held) as a router that
//! drops packets would let SYNs through a path that is only half dead.
//! [`Proxy::resume`] lets everything flow again, held bytes first. A side
//! that closed while paused is seen closing once forwarding resumes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running proxy; dropping it stops accepting (open connections end when
/// either side closes).
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    flowing: watch::Sender<bool>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let (flowing, flowing_rx) = watch::channel(true);
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = {
            let accepted = Arc::clone(&accepted);
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let flowing = flowing_rx.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            forward(client_read, server_write, flowing.clone()),
                            forward(server_read, client_write, flowing),
                        );
                    });
                }
            })
        };
        Proxy { addr, flowing, accepted, task }
    }

    /// Stops forwarding; every socket stays open.
    pub fn pause(&self) {
        self.flowing.send_replace(false);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.flowing.send_replace(true);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// `url` (`postgres://user@host:port/db…`) with its host and port
    /// replaced by the proxy's.
    pub fn url_via(&self, url: &str) -> String {
        let (scheme_user, rest) = url.split_once('@').expect("a URL with user@host");
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        format!("{scheme_user}@{}{path}", self.addr)
    }
}

/// The `host:port` of `url` (`postgres://user@host:port/db…`).
pub fn upstream_of(url: &str) -> SocketAddr {
    let (_, rest) = url.split_once('@').expect("a URL with user@host");
    let authority = rest.split('/').next().unwrap();
    authority.parse().unwrap_or_else(|e| panic!("{authority}: {e}"))
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until forwarding is on (forever once the proxy is gone: then the
/// connection just stays silent until its peer gives up).
async fn flowing(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|on| *on).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut on: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        flowing(&mut on).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        flowing(&mut on).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
