//! Connecting to PostgreSQL: the connection string with its TLS settings
//! ([`PgConfig`]), the one SQL connect every module uses ([`connect`]), and
//! TLS (rustls, `ring` provider) for both tokio-postgres and walcast's own
//! replication client ([`tls`], [`stream`]).
//!
//! # Connection strings
//!
//! A `postgres://` / `postgresql://` URL or a libpq key=value string, as
//! tokio-postgres reads them, plus two libpq settings tokio-postgres does not
//! know, which [`PgConfig::from_str`](std::str::FromStr) takes out before
//! handing the rest over:
//!
//! | `sslmode=`            | TLS                                   | certificate checked |
//! |-----------------------|---------------------------------------|---------------------|
//! | `disable`             | never                                 | —                   |
//! | `prefer` (default)    | when the server accepts the SSLRequest; plain when it answers `N` | only with `sslrootcert` (chain, not host name) |
//! | `require`             | always; the server answering `N` is an error | only with `sslrootcert` (chain, not host name) |
//! | `verify-ca`           | always                                | chain against `sslrootcert` |
//! | `verify-full`         | always                                | chain against `sslrootcert`, and the host name (DNS name or IP address in the certificate) |
//!
//! - `sslrootcert=<path>`: a PEM file with the CA certificate(s) to trust. It
//!   is required by `verify-ca` and `verify-full` (there is no implicit
//!   `~/.postgresql/root.crt` and no system store: name the file). As in libpq,
//!   giving it with `prefer` or `require` makes the chain checked too; unlike
//!   libpq, a given file that cannot be read is always an error, never silently
//!   skipped. The file is read at each connection, so a rotated CA is picked up
//!   without a restart. A certificate that fails a check is an error in every
//!   mode, `prefer` included (no retry in plain).
//! - Unix-domain sockets never use TLS (libpq's rule): the replication client
//!   connects in plain over a socket host whatever the mode; the SQL connection
//!   does so when every host is a socket.
//! - Not supported, rejected with a message: `sslmode=allow`, client
//!   certificates (`sslcert`, `sslkey`, `sslpassword`), CRLs (`sslcrl`,
//!   `sslcrldir`), `sslrootcert=system`, `sslnegotiation=direct`. libpq's
//!   `PGSSLMODE`/`PGSSLROOTCERT` environment variables are not read.
//! - `channel_binding=disable|prefer|require` (tokio-postgres' own setting) is
//!   honoured by both connections: over TLS, SCRAM uses
//!   `SCRAM-SHA-256-PLUS` with `tls-server-end-point` binding when the server
//!   offers it (see [`tls`] for the certificate hash).
//!
//! Errors never quote the connection string or the password; they name the
//! setting and the fix.

pub mod stream;
pub mod tls;

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;

pub use tls::TlsError;

/// How TLS is negotiated and what is checked (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server supports it, plain otherwise.
    Prefer,
    /// TLS or fail; the certificate is checked only when a root certificate is given.
    Require,
    /// TLS; the server certificate must chain to `sslrootcert`.
    VerifyCa,
    /// TLS; the chain as `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The `sslmode=` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is an error.
    pub fn requires_tls(self) -> bool {
        matches!(self, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<SslMode, ConfigError> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(ConfigError::Unsupported {
                setting: "sslmode=allow",
                fix: "use sslmode=prefer (TLS when the server offers it) or sslmode=disable",
            }),
            other => Err(ConfigError::BadSslMode(other.to_owned())),
        }
    }
}

/// The TLS part of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: PEM file of trusted CA certificates.
    pub root_cert: Option<PathBuf>,
}

impl TlsSettings {
    /// Mode `mode`, no root certificate.
    pub fn new(mode: SslMode) -> TlsSettings {
        TlsSettings { mode, root_cert: None }
    }

    /// Whether the server certificate's chain is checked.
    pub fn verifies_chain(&self) -> bool {
        self.root_cert.is_some() || matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none() {
            return Err(ConfigError::NoRootCert(self.mode));
        }
        Ok(())
    }
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings::new(SslMode::Prefer)
    }
}

/// Why a connection string was refused. Definite: the operator must change
/// the string. Never quotes the string itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// tokio-postgres refused the rest of the string.
    #[error("invalid PostgreSQL connection string: {}", describe(.0))]
    Invalid(#[source] tokio_postgres::Error),
    /// An unknown `sslmode`.
    #[error("sslmode={0:?} is not one of disable, prefer, require, verify-ca, verify-full")]
    BadSslMode(String),
    /// `verify-ca` / `verify-full` without `sslrootcert`.
    #[error(
        "sslmode={0} needs sslrootcert=<path of a PEM file with the CA certificate that signed the server's \
         certificate> in the connection string (walcast has no default root certificate); or use sslmode=require \
         for TLS without certificate checks"
    )]
    NoRootCert(SslMode),
    /// A libpq setting walcast does not implement.
    #[error("{setting} is not supported by walcast: {fix}")]
    Unsupported {
        /// The setting.
        setting: &'static str,
        /// What to do instead.
        fix: &'static str,
    },
    /// A URL query value that is not valid percent-encoded UTF-8.
    #[error("the value of {0} in the connection URL is not valid percent-encoded UTF-8")]
    BadEncoding(&'static str),
}

/// A tokio-postgres error and its causes, for messages (tokio-postgres'
/// `Display` omits the cause, e.g. the [`TlsError`] behind "error performing
/// TLS handshake"; its parse errors never quote values).
pub fn describe(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why a tokio-postgres call failed, once: the server's message for a
/// database error (`password authentication failed for user "walcast"`),
/// else the direct cause (`Connection refused (os error 111)`, a
/// [`TlsError`] naming the fix), else the error itself. For messages that
/// must not repeat themselves (unlike [`describe`], which lists the chain).
pub fn cause(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return db.message().to_owned();
    }
    match std::error::Error::source(err) {
        Some(source) => source.to_string(),
        None => err.to_string(),
    }
}

/// Where `config` connects: `host:port` per host, comma-separated (a Unix
/// socket host as its directory). Never the user's password.
pub fn target(config: &PgConfig) -> String {
    let pg = &config.postgres;
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or_else(|| ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}:{port}", dir.display()),
            }
        })
        .collect();
    if hosts.is_empty() {
        "(no host)".to_owned()
    } else {
        hosts.join(", ")
    }
}

/// A connection attempt failed: where, as whom and why, in one message and
/// without a `source` (so printing the error chain does not repeat the
/// cause). Never the password or the connection string.
#[derive(Debug, thiserror::Error)]
#[error("connecting to PostgreSQL at {target} as {user} failed: {cause}")]
pub struct ConnectError {
    /// `host:port` ([`target`]).
    pub target: String,
    /// The user.
    pub user: String,
    /// Why ([`cause`]).
    pub cause: String,
    /// The error itself, for its kind and SQLSTATE.
    error: tokio_postgres::Error,
}

impl ConnectError {
    /// The underlying error.
    pub fn pg_error(&self) -> &tokio_postgres::Error {
        &self.error
    }

    /// Whether retrying may help: the server was unreachable, as opposed to
    /// refusing the connection (authentication, a missing database or role).
    pub fn is_transient(&self) -> bool {
        self.error.as_db_error().is_none()
    }
}

/// [`connect`], with an error that names the server, the user and the
/// reason ([`ConnectError`]): for a first connection, whose failure the
/// operator reads.
///
/// # Errors
/// [`ConnectError`].
pub async fn connect_described(config: &PgConfig) -> Result<tokio_postgres::Client, ConnectError> {
    connect(config).await.map_err(|error| ConnectError {
        target: target(config),
        user: config.postgres.get_user().unwrap_or("(no user)").to_owned(),
        cause: cause(&error),
        error,
    })
}

/// A connection string: everything tokio-postgres understands, plus the TLS
/// settings (see the module doc).
#[derive(Clone)]
pub struct PgConfig {
    postgres: tokio_postgres::Config,
    tls: TlsSettings,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres' Debug redacts the password.
        f.debug_struct("PgConfig").field("postgres", &self.postgres).field("tls", &self.tls).finish()
    }
}

impl PgConfig {
    /// `postgres` with explicit TLS settings.
    ///
    /// # Errors
    /// `verify-ca`/`verify-full` without a root certificate.
    pub fn new(mut postgres: tokio_postgres::Config, tls: TlsSettings) -> Result<PgConfig, ConfigError> {
        tls.validate()?;
        postgres.ssl_mode(postgres_ssl_mode(tls.mode));
        Ok(PgConfig { postgres, tls })
    }

    /// Host, port, user, database and the other settings tokio-postgres reads.
    pub fn postgres(&self) -> &tokio_postgres::Config {
        &self.postgres
    }

    /// The TLS settings.
    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// Sets TCP keepalive and `TCP_USER_TIMEOUT` so that a connection whose
    /// network path silently died fails within about `deadline` instead of
    /// the kernel's defaults (two hours of idle before the first keepalive
    /// probe, about fifteen minutes of retransmissions). Both the SQL
    /// connections (tokio-postgres reads these settings) and the replication
    /// connection ([`crate::replication::WalConnection`] applies them to its
    /// socket) follow them.
    ///
    /// Keepalive probes start after a third of `deadline` of idle and repeat
    /// every sixth, three times, so an idle dead peer is found within
    /// `deadline`; `TCP_USER_TIMEOUT` bounds how long sent data may stay
    /// unacknowledged, which covers a busy connection (keepalives only probe
    /// idle ones).
    pub fn set_tcp_liveness(&mut self, deadline: Duration) {
        let deadline = deadline.max(Duration::from_secs(1));
        self.postgres
            .keepalives(true)
            .keepalives_idle((deadline / 3).max(Duration::from_secs(1)))
            .keepalives_interval((deadline / 6).max(Duration::from_secs(1)))
            .keepalives_retries(3)
            .tcp_user_timeout(deadline);
    }

    /// A copy whose sessions run every statement under `statement_timeout`
    /// (PostgreSQL cancels a longer one; `0` would mean none, so at least
    /// 1 ms) and whose connect gives up after the same time. The setting
    /// goes in the startup packet's `options` (after any the connection
    /// string gives, so it wins), so no statement of the session escapes it.
    pub fn with_statement_timeout(&self, statement_timeout: Duration) -> PgConfig {
        let ms = statement_timeout.as_millis().clamp(1, i32::MAX as u128);
        let mut copy = self.clone();
        let options = match self.postgres.get_options() {
            Some(given) if !given.trim().is_empty() => format!("{given} -c statement_timeout={ms}"),
            _ => format!("-c statement_timeout={ms}"),
        };
        copy.postgres.options(&options).connect_timeout(statement_timeout.max(Duration::from_secs(1)));
        copy
    }

    /// The tokio-postgres configuration to connect with: its `ssl_mode`
    /// follows [`TlsSettings::mode`] (verify-* are `Require`; the checks are
    /// the connector's), and is `Disable` when every host is a Unix socket.
    fn for_sql(&self) -> Cow<'_, tokio_postgres::Config> {
        let hosts = self.postgres.get_hosts();
        let unix_only = !hosts.is_empty() && hosts.iter().all(|h| matches!(h, Host::Unix(_)));
        if unix_only && self.postgres.get_ssl_mode() != tokio_postgres::config::SslMode::Disable {
            let mut config = self.postgres.clone();
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            Cow::Owned(config)
        } else {
            Cow::Borrowed(&self.postgres)
        }
    }
}

/// tokio-postgres' mode for ours: it negotiates, our connector checks.
fn postgres_ssl_mode(mode: SslMode) -> tokio_postgres::config::SslMode {
    match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    }
}

impl From<tokio_postgres::Config> for PgConfig {
    /// Keeps the config's `sslmode` (disable, prefer or require), with no root
    /// certificate.
    fn from(postgres: tokio_postgres::Config) -> PgConfig {
        let mode = match postgres.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Prefer => SslMode::Prefer,
            // Require, and any mode a later tokio-postgres adds: the strict side.
            _ => SslMode::Require,
        };
        PgConfig { postgres, tls: TlsSettings::new(mode) }
    }
}

impl From<&tokio_postgres::Config> for PgConfig {
    fn from(postgres: &tokio_postgres::Config) -> PgConfig {
        PgConfig::from(postgres.clone())
    }
}

impl From<&PgConfig> for PgConfig {
    fn from(config: &PgConfig) -> PgConfig {
        config.clone()
    }
}

/// Settings taken out of the string before tokio-postgres parses the rest.
#[derive(Debug, Default)]
struct Extracted {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

impl Extracted {
    /// Takes `key` if it is ours; `Ok(false)` leaves it to tokio-postgres.
    fn take(&mut self, key: &str, value: String) -> Result<bool, ConfigError> {
        match key {
            "sslmode" => self.sslmode = Some(value),
            "sslrootcert" => self.sslrootcert = Some(value),
            "sslcert" | "sslkey" | "sslpassword" | "sslcertmode" => {
                return Err(ConfigError::Unsupported {
                    setting: "client certificate authentication (sslcert/sslkey/sslpassword)",
                    fix: "authenticate with a password (scram-sha-256) and remove these settings",
                })
            }
            "sslcrl" | "sslcrldir" => {
                return Err(ConfigError::Unsupported {
                    setting: "certificate revocation lists (sslcrl/sslcrldir)",
                    fix: "remove the setting",
                })
            }
            "sslnegotiation" if value != "postgres" => {
                return Err(ConfigError::Unsupported {
                    setting: "sslnegotiation=direct",
                    fix: "remove it: walcast negotiates TLS with an SSLRequest, which every PostgreSQL accepts",
                })
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn into_settings(self) -> Result<TlsSettings, ConfigError> {
        let mode = match &self.sslmode {
            Some(text) => text.parse()?,
            None => SslMode::Prefer,
        };
        let root_cert =
            match self.sslrootcert {
                Some(path) if path == "system" => return Err(ConfigError::Unsupported {
                    setting: "sslrootcert=system",
                    fix: "give the path of a PEM file with the CA certificate(s) that signed the server's certificate",
                }),
                Some(path) if path.is_empty() => None,
                Some(path) => Some(PathBuf::from(path)),
                None => None,
            };
        let settings = TlsSettings { mode, root_cert };
        settings.validate()?;
        Ok(settings)
    }
}

impl FromStr for PgConfig {
    type Err = ConfigError;

    /// Parses a URL or key=value string (see the module doc).
    fn from_str(s: &str) -> Result<PgConfig, ConfigError> {
        let mut extracted = Extracted::default();
        let rest = match strip_url_prefix(s) {
            Some(_) => extract_url(s, &mut extracted)?,
            None => extract_keyword_value(s, &mut extracted)?,
        };
        let postgres = tokio_postgres::Config::from_str(&rest).map_err(ConfigError::Invalid)?;
        PgConfig::new(postgres, extracted.into_settings()?)
    }
}

fn strip_url_prefix(s: &str) -> Option<&str> {
    s.strip_prefix("postgres://").or_else(|| s.strip_prefix("postgresql://"))
}

/// Takes our settings out of a URL's query string. The query starts at the
/// first `?` after the user info (up to the first `@`), as tokio-postgres
/// reads it.
fn extract_url(s: &str, extracted: &mut Extracted) -> Result<String, ConfigError> {
    let after_creds = s.find('@').map_or(0, |at| at + 1);
    let Some(q) = s[after_creds..].find('?').map(|i| after_creds + i) else {
        return Ok(s.to_owned());
    };
    let (head, query) = (&s[..q], &s[q + 1..]);
    let mut kept = Vec::new();
    for pair in query.split('&') {
        // A pair without `=` is left for tokio-postgres to report.
        let Some((key, value)) = pair.split_once('=') else {
            kept.push(pair);
            continue;
        };
        let decoded_key = percent_decode(key).ok_or(ConfigError::BadEncoding("a parameter name"))?;
        let name = match decoded_key.as_str() {
            "sslmode" => "sslmode",
            "sslrootcert" => "sslrootcert",
            _ => "a parameter",
        };
        let value = percent_decode(value).ok_or(ConfigError::BadEncoding(name))?;
        if !extracted.take(&decoded_key, value)? {
            kept.push(pair);
        }
    }
    if kept.is_empty() {
        Ok(head.to_owned())
    } else {
        Ok(format!("{head}?{}", kept.join("&")))
    }
}

/// Decodes `%XX` escapes; `None` when malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Takes our settings out of a key=value string, tokenizing it the way
/// tokio-postgres does (`key = value`, values quoted with `'`, `\` escaping
/// the next character), and returns the rest with the taken pairs removed.
fn extract_keyword_value(s: &str, extracted: &mut Extracted) -> Result<String, ConfigError> {
    let mut rest = String::with_capacity(s.len());
    let mut copied_to = 0;
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else { break };
        while chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=').is_some() {}
        let key_end = chars.peek().map_or(s.len(), |(i, _)| *i);
        let key = &s[start..key_end];
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Malformed: leave everything to tokio-postgres' parser and its error.
            return Ok(s.to_owned());
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = !quoted;
        while let Some((_, c)) = chars.next_if(|(_, c)| quoted || !c.is_whitespace()) {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '\'' if quoted => {
                    closed = true;
                    break;
                }
                c => value.push(c),
            }
        }
        if !closed {
            return Ok(s.to_owned());
        }
        let end = chars.peek().map_or(s.len(), |(i, _)| *i);
        if extracted.take(key, value)? {
            rest.push_str(&s[copied_to..start]);
            copied_to = end;
        }
    }
    rest.push_str(&s[copied_to..]);
    Ok(rest)
}

/// Connects a SQL client with `config`'s TLS settings and drives the
/// connection on the current runtime until the client is dropped. Every SQL
/// connection walcast makes (memberships, catalog, migrations, demo) goes
/// through here.
///
/// # Errors
/// tokio-postgres' error; TLS failures are its `Tls` kind with a
/// [`TlsError`] as the source, whose message names the fix.
pub async fn connect(config: &PgConfig) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let connector = tls::MakeRustls::new(config.tls.clone());
    let (client, connection) = config.for_sql().connect(connector).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "database connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> PgConfig {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn statement_timeout_is_appended_to_the_given_options() {
        let c = parse("postgres://u@h/db?options=-c%20search_path%3Dapp");
        let bounded = c.with_statement_timeout(Duration::from_millis(2500));
        assert_eq!(bounded.postgres().get_options(), Some("-c search_path=app -c statement_timeout=2500"));
        assert_eq!(bounded.postgres().get_connect_timeout(), Some(&Duration::from_millis(2500)));
        let plain = parse("postgres://u@h/db").with_statement_timeout(Duration::from_secs(30));
        assert_eq!(plain.postgres().get_options(), Some("-c statement_timeout=30000"));
        assert_eq!(c.postgres().get_options(), Some("-c search_path=app"), "the original is unchanged");
    }

    #[test]
    fn url_modes_and_root_cert() {
        let c = parse("postgres://u:p%3Fw@db.example.com:6543/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem");
        assert_eq!(c.tls().mode, SslMode::VerifyFull);
        assert_eq!(c.tls().root_cert.as_deref(), Some(std::path::Path::new("/etc/ca.pem")));
        assert_eq!(c.postgres().get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(c.postgres().get_password(), Some(&b"p?w"[..]));
        assert_eq!(c.postgres().get_ports(), [6543]);
        assert_eq!(c.postgres().get_dbname(), Some("app"));

        let c = parse("postgresql://u@h/db?application_name=x&sslmode=require&connect_timeout=3");
        assert_eq!(c.tls(), &TlsSettings::new(SslMode::Require));
        assert_eq!(c.postgres().get_application_name(), Some("x"));
        assert_eq!(c.postgres().get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));

        let c = parse("postgres://u@h/db");
        assert_eq!(c.tls().mode, SslMode::Prefer);
        assert_eq!(parse("postgres://u@h/db?sslmode=disable").tls().mode, SslMode::Disable);
        // A `?` inside the user info is not the query.
        let c = parse("postgres://u:a?b@h/db?sslmode=require");
        assert_eq!(c.postgres().get_password(), Some(&b"a?b"[..]));
        assert_eq!(c.tls().mode, SslMode::Require);
    }

    #[test]
    fn keyword_value_modes_and_root_cert() {
        let c =
            parse("host=localhost port=5433 user=postgres sslmode = verify-ca sslrootcert='/tmp/my ca.pem' dbname=x");
        assert_eq!(c.tls().mode, SslMode::VerifyCa);
        assert_eq!(c.tls().root_cert.as_deref(), Some(std::path::Path::new("/tmp/my ca.pem")));
        assert_eq!(c.postgres().get_dbname(), Some("x"));
        assert_eq!(c.postgres().get_ports(), [5433]);
        let c = parse(r"sslrootcert=/a\ b.pem host=h sslmode=require password='it\'s'");
        assert_eq!(c.tls().root_cert.as_deref(), Some(std::path::Path::new("/a b.pem")));
        assert_eq!(c.postgres().get_password(), Some(&b"it's"[..]));
        assert_eq!(c.tls().mode, SslMode::Require);
        assert!(c.tls().verifies_chain());
    }

    #[test]
    fn refusals_name_the_fix_and_never_quote_secrets() {
        let err = "postgres://u:secret@h/db?sslmode=verify-full".parse::<PgConfig>().unwrap_err();
        assert!(matches!(err, ConfigError::NoRootCert(SslMode::VerifyFull)), "{err}");
        assert!(err.to_string().contains("sslrootcert="), "{err}");
        let err = "host=h password=secret sslmode=verify-ca".parse::<PgConfig>().unwrap_err();
        assert!(matches!(err, ConfigError::NoRootCert(SslMode::VerifyCa)), "{err}");
        let err = "postgres://u:secret@h/db?sslmode=bogus".parse::<PgConfig>().unwrap_err();
        assert!(matches!(err, ConfigError::BadSslMode(_)), "{err}");
        for s in [
            "postgres://u:secret@h/db?sslmode=allow",
            "postgres://u:secret@h/db?sslcert=/c.pem",
            "postgres://u:secret@h/db?sslrootcert=system&sslmode=verify-full",
            "host=h password=secret sslnegotiation=direct",
        ] {
            let err = s.parse::<PgConfig>().unwrap_err();
            assert!(matches!(err, ConfigError::Unsupported { .. }), "{s}: {err}");
        }
        let err = "postgres://u:secret@h:notaport/db".parse::<PgConfig>().unwrap_err();
        assert!(matches!(err, ConfigError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("port"), "{err}");
        for s in ["postgres://u:secret@h/db?sslmode=bogus", "postgres://u:secret@h:notaport/db"] {
            let text = s.parse::<PgConfig>().unwrap_err().to_string();
            assert!(!text.contains("secret"), "{text}");
        }
        let debug = format!("{:?}", parse("postgres://u:secret@h/db"));
        assert!(!debug.contains("secret"), "{debug}");
    }

    #[test]
    fn from_tokio_postgres_config_keeps_its_mode() {
        let pg = tokio_postgres::Config::from_str("host=h sslmode=require").unwrap();
        assert_eq!(PgConfig::from(pg).tls(), &TlsSettings::new(SslMode::Require));
        let pg = tokio_postgres::Config::from_str("host=h").unwrap();
        assert_eq!(PgConfig::from(&pg).tls().mode, SslMode::Prefer);
    }

    #[test]
    fn unix_socket_hosts_never_use_tls_for_sql() {
        let c = parse("host=/run/postgresql user=u sslmode=require");
        assert_eq!(c.for_sql().get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let c = parse("host=localhost user=u sslmode=require");
        assert_eq!(c.for_sql().get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
    }
}
