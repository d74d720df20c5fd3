//! The socket as the WebSocket library sees it: it reads the client's
//! frames from the read half, and what it writes itself (its pong and
//! close replies, already framed) goes into the connection's outbox, in
//! order with everything else. Data frames never pass through it: the
//! outbox writes them to the socket (see [`crate::outbox`]).
//!
//! Invariant: the library's writes always succeed at once while the outbox
//! is open (they are few, small and counted as replies), so it never holds
//! a half-written frame of its own.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

use crate::outbox::{socket, Outbox, Written};

/// The read half, with the library's writes routed to the outbox.
#[derive(Debug)]
pub(super) struct ControlIo {
    read: OwnedReadHalf,
    outbox: Arc<Outbox>,
}

impl ControlIo {
    /// Reads from `read`; writes queue into `outbox`.
    pub(super) fn new(read: OwnedReadHalf, outbox: Arc<Outbox>) -> ControlIo {
        ControlIo { read, outbox }
    }
}

impl AsyncRead for ControlIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for ControlIo {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(match self.outbox.push_raw(Bytes::copy_from_slice(buf)) {
            Ok(()) => Ok(buf.len()),
            Err(err) => Err(io::Error::new(io::ErrorKind::BrokenPipe, err)),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Ends the connection's writing: finishes a frame already partly on the
/// socket, sends a close frame with `code` and `reason` (unless the library
/// already answered the peer's close, or the code is 1006: the socket
/// failed, and RFC 6455 forbids sending that code) and shuts the write half
/// down. The
/// caller bounds it with the write timeout.
///
/// # Errors
/// The socket's error.
pub(super) async fn close(outbox: &Outbox, code: u16, reason: &str) -> io::Result<()> {
    let Some(half) = outbox.socket() else { return Ok(()) };
    loop {
        match outbox.write_now() {
            Written::All => break,
            Written::Blocked => half.writable().await?,
            Written::Failed => return Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
    if code == 1006 {
        return Err(io::ErrorKind::BrokenPipe.into());
    }
    if !outbox.close_queued() {
        let frame = socket::close_frame(code, reason);
        let mut at = 0;
        while at < frame.len() {
            match half.try_write(&frame[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => at += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => half.writable().await?,
                Err(err) => return Err(err),
            }
        }
    }
    socket2::SockRef::from(half.as_ref()).shutdown(std::net::Shutdown::Write)
}
