//! The socket under walcast's own replication client: plain TCP, a Unix
//! socket, or TLS over TCP ([`PgStream`]), and the SSLRequest that starts TLS
//! ([`request_tls`]).
//!
//! The protocol (PostgreSQL "SSL Session Encryption"): before the startup
//! message the client sends the 8-byte SSLRequest (length 8, code 80877103);
//! the server answers one byte, `S` (go ahead with the TLS handshake) or `N`
//! (no TLS: continue in plain, or give up). A server that cannot even start a
//! backend may answer with an ErrorResponse instead, whose `E` tag is that
//! byte; the caller reads the rest of it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::tls::{self, TlsError};
use super::TlsSettings;

/// A connection's byte stream.
#[derive(Debug)]
pub enum PgStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// A Unix-domain socket (never TLS).
    Unix(UnixStream),
    /// TLS over TCP, with the channel-binding data of the server certificate.
    Tls {
        /// The TLS session.
        stream: Box<tokio_rustls::client::TlsStream<TcpStream>>,
        /// `tls-server-end-point` data, when the certificate's algorithm has one.
        end_point: Option<Vec<u8>>,
    },
}

impl PgStream {
    /// Whether the stream is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls { .. })
    }

    /// `tls-server-end-point` channel-binding data (TLS only).
    pub fn channel_binding(&self) -> Option<&[u8]> {
        match self {
            PgStream::Tls { end_point, .. } => end_point.as_deref(),
            _ => None,
        }
    }
}

/// The server's answer to an SSLRequest.
#[derive(Debug)]
pub enum TlsStart {
    /// `S`, and the handshake succeeded.
    Tls(PgStream),
    /// `N`: the server has no TLS; the stream is as it was.
    Refused(TcpStream),
    /// `E`: an ErrorResponse follows; its tag byte has been read.
    ErrorResponse(TcpStream),
}

/// Sends the SSLRequest on `tcp` and, when the server agrees, runs the
/// handshake for `host` with `settings` (see [`tls::handshake`]).
///
/// # Errors
/// I/O, an answer other than `S`, `N` or `E`, or a failed handshake (with the
/// fix in the message).
pub async fn request_tls(mut tcp: TcpStream, host: &str, settings: &TlsSettings) -> Result<TlsStart, TlsError> {
    // Read the CA file first: a bad one is a definite error whatever the server says.
    let config = tls::client_config(settings)?;
    let mut request = BytesMut::with_capacity(8);
    postgres_protocol::message::frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(TlsError::Io)?;
    let answer = tcp.read_u8().await.map_err(TlsError::Io)?;
    match answer {
        b'S' => {
            let stream = tls::handshake(tcp, config, host, settings).await?;
            let end_point = tls::session_end_point(&stream);
            Ok(TlsStart::Tls(PgStream::Tls { stream: Box::new(stream), end_point }))
        }
        b'N' => Ok(TlsStart::Refused(tcp)),
        b'E' => Ok(TlsStart::ErrorResponse(tcp)),
        other => Err(TlsError::Handshake(format!("unexpected answer {other:#04x} to the SSLRequest"))),
    }
}

impl AsyncRead for PgStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls { stream, .. } => Pin::new(&mut **stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls { stream, .. } => Pin::new(&mut **stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            PgStream::Unix(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls { stream, .. } => Pin::new(&mut **stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls { stream, .. } => Pin::new(&mut **stream).poll_shutdown(cx),
        }
    }
}
