//! A walsender connection on `postgres-protocol`: startup in logical
//! replication mode, authentication, simple queries, and CopyBoth framing.
//!
//! tokio-postgres cannot open a replication connection nor speak CopyBoth, so
//! this is our own small client. It reads backend messages itself: the frame
//! header (tag + length) is checked here, `CopyData` (`d`) and
//! `CopyBothResponse` (`W`, unknown to `postgres-protocol`) are handled by
//! hand, and every other message is delegated to
//! [`postgres_protocol::message::backend::Message::parse`].
//!
//! Invariants: a frame larger than [`MAX_FRAME`] is an error before any
//! allocation for it; only the simple query protocol is used (the walsender
//! accepts nothing else); while streaming, only CopyData, CopyDone and
//! Terminate are sent.
//!
//! # TLS
//!
//! Over TCP, unless `sslmode=disable`, the connection first sends an
//! SSLRequest and, when the server answers `S`, runs the rustls handshake
//! before the startup message ([`crate::pgconn::stream::request_tls`]); the
//! rules per `sslmode` are in [`crate::pgconn`]. Unix sockets are always
//! plain. Over TLS, SCRAM uses `SCRAM-SHA-256-PLUS` with
//! `tls-server-end-point` channel binding when the server offers it and
//! `channel_binding` is not `disable`; `channel_binding=require` refuses any
//! other authentication.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding as ChannelBindingMode, Host};

use super::{PgError, ReplicationError};
use crate::pgconn::stream::{request_tls, PgStream, TlsStart};
use crate::pgconn::{PgConfig, SslMode, TlsError, TlsSettings};

/// Largest backend frame accepted (a row of 1 GB TOASTed values plus headroom).
pub const MAX_FRAME: usize = 1 << 30;

/// Server settings pinned at startup so text values never depend on server
/// defaults (see pgoutput.md §4.9). `IntervalStyle=postgres` is PostgreSQL's
/// default and what Supabase sends (`"1 day 02:00:00"`); it is pinned so a
/// server or role configured otherwise (`iso_8601`: `P1DT2H`) does not change
/// the payloads.
pub const PINNED_OPTIONS: &str =
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex";

/// Longest ErrorResponse accepted in answer to the SSLRequest.
const MAX_SSL_ERROR: usize = 64 * 1024;

/// A message from the server, as far as this client cares.
pub(crate) enum Backend {
    /// `CopyData` payload.
    CopyData(Bytes),
    /// `CopyBothResponse`.
    CopyBoth,
    /// `CopyDone`.
    CopyDone,
    /// Any other message, parsed by `postgres-protocol`.
    Other(backend::Message),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use backend::Message as M;
        let name = match self {
            Backend::CopyData(data) => return write!(f, "CopyData({} bytes)", data.len()),
            Backend::CopyBoth => "CopyBothResponse",
            Backend::CopyDone => "CopyDone",
            Backend::Other(M::AuthenticationGss | M::AuthenticationGssContinue(_)) => "AuthenticationGSS",
            Backend::Other(M::AuthenticationKerberosV5) => "AuthenticationKerberosV5",
            Backend::Other(M::AuthenticationSspi) => "AuthenticationSSPI",
            Backend::Other(M::AuthenticationScmCredential) => "AuthenticationSCMCredential",
            Backend::Other(M::CommandComplete(_)) => "CommandComplete",
            Backend::Other(M::CopyInResponse(_)) => "CopyInResponse",
            Backend::Other(M::CopyOutResponse(_)) => "CopyOutResponse",
            Backend::Other(M::DataRow(_)) => "DataRow",
            Backend::Other(M::RowDescription(_)) => "RowDescription",
            Backend::Other(M::ReadyForQuery(_)) => "ReadyForQuery",
            Backend::Other(M::ErrorResponse(_)) => "ErrorResponse",
            Backend::Other(M::NoticeResponse(_)) => "NoticeResponse",
            Backend::Other(_) => "another backend message",
        };
        f.write_str(name)
    }
}

/// One result set of a simple query: column names and text values.
#[derive(Debug, Default, Clone)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows of text values (`None` = NULL).
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(idx)?.as_deref()
    }
}

/// A connection to a walsender in logical replication mode.
pub struct WalConnection {
    socket: PgStream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Backend process id (for `pg_terminate_backend` in tests and logs).
    pid: i32,
    server_version: String,
}

impl std::fmt::Debug for WalConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalConnection")
            .field("pid", &self.pid)
            .field("tls", &self.socket.is_tls())
            .finish_non_exhaustive()
    }
}

impl WalConnection {
    /// Connects with the parameters of `config` (a [`PgConfig`] parsed from a
    /// URL or key=value string, or a tokio-postgres config, whose `sslmode`
    /// is then disable, prefer or require), trying each host in turn,
    /// negotiating TLS, and authenticates.
    ///
    /// # Errors
    /// Transient for I/O problems, definite for authentication, TLS (e.g. the
    /// server certificate fails verification) and configuration problems.
    pub async fn connect(config: impl Into<PgConfig>, connect_timeout: Duration) -> Result<Self, ReplicationError> {
        let config: PgConfig = config.into();
        let tls = config.tls();
        let config = config.postgres();
        let hosts = config.get_hosts();
        if hosts.is_empty() {
            return Err(ReplicationError::Config("the database URL names no host".into()));
        }
        let ports = config.get_ports();
        let mut last = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = ports.get(i).or_else(|| ports.first()).copied().unwrap_or(5432);
            let attempt = tokio::time::timeout(connect_timeout, Self::open(host, port, tls, config)).await;
            let socket = match attempt {
                Ok(Ok(socket)) => socket,
                Ok(Err(err)) => {
                    last = Some(err);
                    continue;
                }
                Err(_) => {
                    last = Some(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting timed out after {connect_timeout:?}"),
                    )));
                    continue;
                }
            };
            let mut conn = WalConnection {
                socket,
                read_buf: BytesMut::with_capacity(64 * 1024),
                write_buf: BytesMut::with_capacity(1024),
                pid: 0,
                server_version: String::new(),
            };
            // The startup is bounded too: a path that accepts the TCP
            // connection and then goes quiet would otherwise hang it forever.
            match tokio::time::timeout(connect_timeout, conn.startup(config)).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the server did not complete the startup within {connect_timeout:?}"),
                    )))
                }
            }
            return Ok(conn);
        }
        Err(last.unwrap_or_else(|| ReplicationError::Config("no host to connect to".into())))
    }

    /// Opens the socket and negotiates TLS as `tls` says.
    async fn open(
        host: &Host,
        port: u16,
        tls: &TlsSettings,
        config: &tokio_postgres::Config,
    ) -> Result<PgStream, ReplicationError> {
        let name = match host {
            Host::Tcp(name) => name,
            Host::Unix(dir) => {
                // libpq's rule: no TLS over a Unix socket, whatever the mode.
                let path = dir.join(format!(".s.PGSQL.{port}"));
                return Ok(PgStream::Unix(tokio::net::UnixStream::connect(path).await?));
            }
        };
        let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
        stream.set_nodelay(true)?;
        set_tcp_liveness(&stream, config)?;
        if tls.mode == SslMode::Disable {
            return Ok(PgStream::Tcp(stream));
        }
        match request_tls(stream, name, tls).await? {
            TlsStart::Tls(stream) => Ok(stream),
            TlsStart::Refused(_) if tls.mode.requires_tls() => Err(TlsError::NotSupported(tls.mode).into()),
            TlsStart::Refused(stream) => Ok(PgStream::Tcp(stream)),
            TlsStart::ErrorResponse(mut stream) => {
                // The server could not start a backend (e.g. too many
                // connections): the rest of its ErrorResponse follows the tag.
                let len = stream.read_i32().await?;
                let body = usize::try_from(len).ok().filter(|l| (4..=MAX_SSL_ERROR).contains(l)).ok_or_else(|| {
                    ReplicationError::Protocol(format!("invalid length {len} of the answer to the SSLRequest"))
                })? - 4;
                let mut frame = BytesMut::with_capacity(5 + body);
                frame.put_u8(b'E');
                frame.put_i32(len);
                frame.resize(5 + body, 0);
                stream.read_exact(&mut frame[5..]).await?;
                match backend::Message::parse(&mut frame)? {
                    Some(backend::Message::ErrorResponse(body)) => Err(PgError::from_body(&body)?.into()),
                    _ => Err(ReplicationError::Protocol("malformed ErrorResponse to the SSLRequest".into())),
                }
            }
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.socket.is_tls()
    }

    async fn startup(&mut self, config: &tokio_postgres::Config) -> Result<(), ReplicationError> {
        let user = config
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| ReplicationError::Config("the database URL names no user".into()))?;
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        // The operator's own options first: ours come last so they win, since
        // value encoding depends on them.
        let options = match config.get_options() {
            Some(extra) => format!("{extra} {PINNED_OPTIONS}"),
            None => PINNED_OPTIONS.to_owned(),
        };
        let params = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", config.get_application_name().unwrap_or("walcast")),
            ("client_encoding", "UTF8"),
            ("options", options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;
        self.authenticate(&user, config.get_password(), config.get_channel_binding()).await?;
        // Parameter status, backend key data, then ReadyForQuery.
        loop {
            match self.read().await? {
                Backend::Other(backend::Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Other(backend::Message::BackendKeyData(body)) => self.pid = body.process_id(),
                Backend::Other(backend::Message::ParameterStatus(body)) => {
                    if body.name()? == "server_version" {
                        self.server_version = body.value()?.to_owned();
                    }
                }
                Backend::Other(backend::Message::NoticeResponse(_)) => {}
                Backend::Other(backend::Message::ErrorResponse(body)) => return Err(PgError::from_body(&body)?.into()),
                other => {
                    return Err(ReplicationError::Protocol(format!("unexpected message during startup: {other:?}")))
                }
            }
        }
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
        binding: ChannelBindingMode,
    ) -> Result<(), ReplicationError> {
        let need_password =
            || ReplicationError::Auth("the server asks for a password and the database URL has none".into());
        let require_binding = matches!(binding, ChannelBindingMode::Require);
        let unbound = || {
            ReplicationError::Auth(
                "channel_binding=require, but the server did not authenticate with SCRAM channel binding \
                 (it needs TLS and a scram-sha-256 pg_hba.conf entry); remove channel_binding=require or fix the \
                 server"
                    .into(),
            )
        };
        let mut bound = false;
        loop {
            match self.read().await? {
                Backend::Other(backend::Message::AuthenticationOk) if require_binding && !bound => {
                    return Err(unbound())
                }
                Backend::Other(backend::Message::AuthenticationOk) => return Ok(()),
                Backend::Other(
                    backend::Message::AuthenticationCleartextPassword | backend::Message::AuthenticationMd5Password(_),
                ) if require_binding => return Err(unbound()),
                Backend::Other(backend::Message::AuthenticationCleartextPassword) => {
                    let password = password.ok_or_else(need_password)?;
                    frontend::password_message(password, &mut self.write_buf)?;
                    self.flush().await?;
                }
                Backend::Other(backend::Message::AuthenticationMd5Password(body)) => {
                    let password = password.ok_or_else(need_password)?;
                    let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), password, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Backend::Other(backend::Message::AuthenticationSasl(body)) => {
                    let password = password.ok_or_else(need_password)?;
                    bound = self.scram(body, password, binding).await?;
                    if require_binding && !bound {
                        return Err(unbound());
                    }
                }
                Backend::Other(backend::Message::ErrorResponse(body)) => {
                    let err = PgError::from_body(&body)?;
                    return Err(if err.code.starts_with("28") {
                        ReplicationError::Auth(err.to_string())
                    } else {
                        err.into()
                    });
                }
                other => {
                    return Err(ReplicationError::Auth(format!(
                        "unsupported authentication request from the server: {other:?} \
                         (walcast supports trust, password, md5 and scram-sha-256)"
                    )))
                }
            }
        }
    }

    /// SCRAM-SHA-256, with channel binding when possible (see the module
    /// doc); returns whether the exchange was channel-bound.
    async fn scram(
        &mut self,
        body: backend::AuthenticationSaslBody,
        password: &[u8],
        binding: ChannelBindingMode,
    ) -> Result<bool, ReplicationError> {
        let mut mechanisms = body.mechanisms();
        let (mut has_scram, mut has_plus) = (false, false);
        while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechanisms)? {
            has_scram |= m == sasl::SCRAM_SHA_256;
            has_plus |= m == sasl::SCRAM_SHA_256_PLUS;
        }
        let end_point = self.socket.channel_binding().filter(|_| !matches!(binding, ChannelBindingMode::Disable));
        // As libpq: bind when both sides can; "y" (client could, server did
        // not offer) only when the server offers no PLUS, else the server
        // takes it for a downgrade; "n" without TLS binding data.
        let (channel_binding, mechanism) = match (has_plus, end_point) {
            (true, Some(data)) => (ChannelBinding::tls_server_end_point(data.to_vec()), sasl::SCRAM_SHA_256_PLUS),
            (false, Some(_)) => (ChannelBinding::unrequested(), sasl::SCRAM_SHA_256),
            (_, None) => (ChannelBinding::unsupported(), sasl::SCRAM_SHA_256),
        };
        if mechanism == sasl::SCRAM_SHA_256 && !has_scram {
            return Err(ReplicationError::Auth(
                "the server offers no SASL mechanism walcast supports (SCRAM-SHA-256)".into(),
            ));
        }
        let bound = mechanism == sasl::SCRAM_SHA_256_PLUS;
        let mut scram = ScramSha256::new(password, channel_binding);
        frontend::sasl_initial_response(mechanism, scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read().await? {
            Backend::Other(backend::Message::AuthenticationSaslContinue(body)) => {
                scram.update(body.data()).map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
            }
            Backend::Other(backend::Message::ErrorResponse(body)) => {
                return Err(ReplicationError::Auth(PgError::from_body(&body)?.to_string()))
            }
            other => return Err(ReplicationError::Protocol(format!("unexpected message during SCRAM: {other:?}"))),
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read().await? {
            Backend::Other(backend::Message::AuthenticationSaslFinal(body)) => {
                scram.finish(body.data()).map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                Ok(bound)
            }
            Backend::Other(backend::Message::ErrorResponse(body)) => {
                Err(ReplicationError::Auth(PgError::from_body(&body)?.to_string()))
            }
            other => Err(ReplicationError::Protocol(format!("unexpected message during SCRAM: {other:?}"))),
        }
    }

    /// The backend's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The server's `server_version`.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// Runs one simple-protocol command and returns its last result set.
    ///
    /// # Errors
    /// The server's error (with SQLSTATE), or I/O.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            match self.read().await? {
                Backend::Other(backend::Message::RowDescription(body)) => {
                    result = QueryResult::default();
                    let mut fields = body.fields();
                    while let Some(field) = fallible_iterator::FallibleIterator::next(&mut fields)? {
                        result.columns.push(field.name().to_owned());
                    }
                }
                Backend::Other(backend::Message::DataRow(body)) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::with_capacity(result.columns.len());
                    while let Some(range) = fallible_iterator::FallibleIterator::next(&mut ranges)? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    result.rows.push(row);
                }
                Backend::Other(backend::Message::ErrorResponse(body)) => error = Some(PgError::from_body(&body)?),
                Backend::Other(backend::Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(err) => Err(err.into()),
                        None => Ok(result),
                    }
                }
                Backend::CopyBoth => {
                    return Err(ReplicationError::Protocol(
                        "simple_query got CopyBothResponse: use start_copy_both for START_REPLICATION".into(),
                    ))
                }
                _ => {}
            }
        }
    }

    /// Sends a command that answers with CopyBothResponse (START_REPLICATION)
    /// and waits for that response.
    ///
    /// # Errors
    /// The server's error (e.g. slot missing, publication missing), or I/O.
    pub async fn start_copy_both(&mut self, sql: &str) -> Result<(), ReplicationError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut error = None;
        loop {
            match self.read().await? {
                Backend::CopyBoth => return Ok(()),
                Backend::Other(backend::Message::ErrorResponse(body)) => error = Some(PgError::from_body(&body)?),
                Backend::Other(backend::Message::ReadyForQuery(_)) => {
                    return Err(match error {
                        Some(err) => err.into(),
                        None => ReplicationError::Protocol(format!("{sql:?} did not start a copy stream")),
                    })
                }
                _ => {}
            }
        }
    }

    /// Reads the next message while streaming.
    ///
    /// # Errors
    /// I/O, EOF, or a malformed frame.
    pub(crate) async fn read(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(msg) = self.try_parse()? {
                return Ok(msg);
            }
            self.read_buf.reserve(64 * 1024);
            let n = self.socket.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return Err(ReplicationError::Eof);
            }
        }
    }

    /// The next message if it can be had without waiting: a complete frame
    /// already buffered, or one that a single read the socket answers at
    /// once completes. `None` when the socket has nothing ready (the bytes a
    /// read did bring stay buffered for the next call).
    ///
    /// # Errors
    /// I/O, EOF, or a malformed frame.
    pub(crate) fn read_ready(&mut self) -> Result<Option<Backend>, ReplicationError> {
        if let Some(msg) = self.try_parse()? {
            return Ok(Some(msg));
        }
        self.read_buf.reserve(64 * 1024);
        // `read_buf` is cancel-safe: polled once and dropped when pending, it
        // has read nothing.
        match futures::FutureExt::now_or_never(self.socket.read_buf(&mut self.read_buf)) {
            None => Ok(None),
            Some(Ok(0)) => Err(ReplicationError::Eof),
            Some(Ok(_)) => self.try_parse(),
            Some(Err(err)) => Err(err.into()),
        }
    }

    /// Parses one complete frame from the read buffer, if there is one.
    fn try_parse(&mut self) -> Result<Option<Backend>, ReplicationError> {
        if self.read_buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.read_buf[0];
        let len = i32::from_be_bytes([self.read_buf[1], self.read_buf[2], self.read_buf[3], self.read_buf[4]]);
        let len = usize::try_from(len).ok().filter(|l| *l >= 4).ok_or_else(|| {
            ReplicationError::Protocol(format!("invalid frame length {len} for tag {:?}", tag as char))
        })?;
        if len > MAX_FRAME {
            return Err(ReplicationError::Protocol(format!(
                "frame of {len} bytes (tag {:?}) exceeds the {MAX_FRAME}-byte limit",
                tag as char
            )));
        }
        let total = len + 1;
        if self.read_buf.len() < total {
            // Grow towards the frame in steps of at most 1 MiB: the announced
            // length is checked against MAX_FRAME, but memory follows the bytes
            // that actually arrive, not what a peer claims.
            self.read_buf.reserve((total - self.read_buf.len()).min(1 << 20));
            return Ok(None);
        }
        match tag {
            b'd' => {
                let mut frame = self.read_buf.split_to(total);
                frame.advance(5);
                Ok(Some(Backend::CopyData(frame.freeze())))
            }
            b'W' => {
                self.read_buf.advance(total);
                Ok(Some(Backend::CopyBoth))
            }
            b'c' => {
                self.read_buf.advance(total);
                Ok(Some(Backend::CopyDone))
            }
            _ => match backend::Message::parse(&mut self.read_buf)? {
                Some(msg) => Ok(Some(Backend::Other(msg))),
                None => Err(ReplicationError::Protocol("a complete frame failed to parse".into())),
            },
        }
    }

    /// Queues a CopyData message with `payload` (sent on the next flush).
    pub(crate) fn queue_copy_data(&mut self, payload: &[u8]) -> Result<(), ReplicationError> {
        frontend::CopyData::new(payload)?.write(&mut self.write_buf);
        Ok(())
    }

    /// Queues CopyDone.
    pub(crate) fn queue_copy_done(&mut self) {
        frontend::copy_done(&mut self.write_buf);
    }

    /// Sends everything queued.
    ///
    /// Cancel-safe: `write_all_buf` advances the buffer past each write as
    /// it completes, so when this future is dropped mid-way (the stream's
    /// `next()` is raced against shutdown) the bytes already sent are gone
    /// from the buffer and the next flush sends only the rest; no message
    /// goes out twice or torn.
    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.socket.write_all_buf(&mut self.write_buf).await?;
        self.socket.flush().await?;
        Ok(())
    }

    /// Sends Terminate and closes the socket.
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.socket.shutdown().await;
    }
}

/// Applies the keepalive and `TCP_USER_TIMEOUT` settings of `config` (see
/// [`PgConfig::set_tcp_liveness`]) to the replication socket, as
/// tokio-postgres does for its own connections.
fn set_tcp_liveness(stream: &tokio::net::TcpStream, config: &tokio_postgres::Config) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    if config.get_keepalives() {
        let mut keepalive = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        socket.set_tcp_keepalive(&keepalive)?;
    }
    #[cfg(target_os = "linux")]
    if let Some(timeout) = config.get_tcp_user_timeout() {
        socket.set_tcp_user_timeout(Some(*timeout))?;
    }
    Ok(())
}
