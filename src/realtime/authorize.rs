//! Realtime Authorization: private channels (`config.private: true`) judged
//! by the RLS policies on `realtime.messages`, the way Supabase checks them
//! (broadcast-presence.md §4): SELECT = receive, INSERT = send, for the
//! extensions `broadcast` and `presence`, probed as the user inside a
//! transaction that is always rolled back.
//!
//! ```text
//!  session (private join, access_token, first send/track) ─┐
//!  http (private REST broadcast)                           ─┴▶ Authorizer ──▶ PostgreSQL
//!                                                               (≤ 4 connections, 5 s per check)
//! ```
//!
//! Every probe sets, transaction-locally, `role` (the token's), the
//! `realtime.topic` the policies read with `realtime.topic()`, the claims
//! (`request.jwt.claims`, `…claim.sub`, `…claim.role`, so `auth.uid()`
//! works) and `request.headers` (the upgrade's `x-*` headers).
//!
//! Invariants: nothing a probe writes is ever committed; a check that fails
//! for any reason (a policy that raises, an unknown role, no partition for
//! today, PostgreSQL unreachable or slow) denies and says why in the log and
//! in `walcast_authorization_checks_total{result="error"}` — never an
//! unchecked grant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::auth::Claims;
use crate::pgconn::PgConfig;

/// Connections the authorizer keeps (and checks that run at once).
pub const MAX_CONNECTIONS: usize = 4;

/// The deadline of one check (PostgreSQL's `statement_timeout` is the same).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// An extension of `realtime.messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// Broadcast messages.
    Broadcast,
    /// Presence.
    Presence,
}

impl Extension {
    fn as_str(self) -> &'static str {
        match self {
            Extension::Broadcast => "broadcast",
            Extension::Presence => "presence",
        }
    }
}

/// What a private channel may receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadGrant {
    /// Broadcasts (the SELECT policy passes for `broadcast`).
    pub broadcast: bool,
    /// Presence (the SELECT policy passes for `presence`; only asked when
    /// the channel enabled presence).
    pub presence: bool,
}

impl ReadGrant {
    /// Whether the channel may join at all.
    pub fn any(self) -> bool {
        self.broadcast || self.presence
    }
}

/// Who asks: the token's claims and the request's `x-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// The verified claims.
    pub claims: &'a Claims,
    /// `request.headers`: a JSON object.
    pub headers: &'a Value,
}

/// Why a check could not decide (the caller denies).
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    /// No connection to PostgreSQL (transient).
    #[error("cannot connect to PostgreSQL for the authorization check: {}", crate::pgconn::cause(.0))]
    Connect(tokio_postgres::Error),
    /// The probe failed: a policy raised, the role does not exist, no
    /// partition of `realtime.messages` takes today's rows, … (definite
    /// until the database changes: the message names the cause).
    #[error("the authorization check failed ({code}): {message}")]
    Query {
        /// SQLSTATE.
        code: String,
        /// PostgreSQL's message.
        message: String,
    },
    /// The check took longer than [`CHECK_TIMEOUT`] (transient).
    #[error("the authorization check took longer than {0:?}")]
    Timeout(Duration),
}

impl AuthorizeError {
    fn query(err: &tokio_postgres::Error) -> AuthorizeError {
        match err.as_db_error() {
            Some(db) => AuthorizeError::Query { code: db.code().code().to_owned(), message: db.message().to_owned() },
            None => AuthorizeError::Query { code: "08000".into(), message: crate::pgconn::cause(err).to_string() },
        }
    }
}

/// Counters of the checks.
#[derive(Debug, Default)]
pub struct AuthorizeStats {
    /// Checks that granted.
    pub granted: AtomicU64,
    /// Checks that denied.
    pub denied: AtomicU64,
    /// Checks that failed (and so denied).
    pub errors: AtomicU64,
}

/// Runs the checks on a few connections of its own.
#[derive(Debug)]
pub struct Authorizer {
    config: PgConfig,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
    /// Counters.
    pub stats: AuthorizeStats,
}

impl Authorizer {
    /// An authorizer connecting with `config` (its SQL side).
    pub fn new(config: &PgConfig) -> Authorizer {
        Authorizer {
            config: config.with_statement_timeout(CHECK_TIMEOUT),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(MAX_CONNECTIONS),
            stats: AuthorizeStats::default(),
        }
    }

    /// The read check of a private join (or a token change): which
    /// extensions `asker` may receive on `topic` (the sub-topic, without
    /// `realtime:`). `presence` only when the channel enabled it.
    ///
    /// # Errors
    /// [`AuthorizeError`]; the caller denies.
    pub async fn read(&self, asker: Asker<'_>, topic: &str, presence: bool) -> Result<ReadGrant, AuthorizeError> {
        let check = async {
            let (_permit, mut client) = self.checkout().await?;
            let result = read(&mut client, asker, topic, presence).await;
            self.checkin(client, result.is_ok());
            result.map_err(|err| AuthorizeError::query(&err))
        };
        let result =
            tokio::time::timeout(CHECK_TIMEOUT * 2, check).await.unwrap_or(Err(AuthorizeError::Timeout(CHECK_TIMEOUT)));
        self.count(result.as_ref().map(|g| g.any()));
        result
    }

    /// The write check of a private channel's first send (or track): may
    /// `asker` insert `extension` messages on `topic`?
    ///
    /// # Errors
    /// [`AuthorizeError`]; the caller denies.
    pub async fn write(&self, asker: Asker<'_>, topic: &str, extension: Extension) -> Result<bool, AuthorizeError> {
        let check = async {
            let (_permit, mut client) = self.checkout().await?;
            let result = write(&mut client, asker, topic, extension).await;
            self.checkin(client, result.is_ok());
            result.map_err(|err| AuthorizeError::query(&err))
        };
        let result =
            tokio::time::timeout(CHECK_TIMEOUT * 2, check).await.unwrap_or(Err(AuthorizeError::Timeout(CHECK_TIMEOUT)));
        self.count(result.as_ref().copied());
        result
    }

    /// The newest stored private broadcasts of `topic` for a join's replay
    /// (read as walcast, on the checks' connections).
    ///
    /// # Errors
    /// The query failed or took too long.
    pub async fn replay(
        &self,
        topic: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<crate::realtime::messages::Replayed>, AuthorizeError> {
        let query = async {
            let (_permit, client) = self.checkout().await?;
            match crate::realtime::messages::replay(&client, topic, since_ms, limit).await {
                Ok(rows) => {
                    self.checkin(client, true);
                    Ok(rows)
                }
                Err(err) => Err(AuthorizeError::Query { code: "replay".into(), message: err.to_string() }),
            }
        };
        tokio::time::timeout(CHECK_TIMEOUT * 2, query).await.unwrap_or(Err(AuthorizeError::Timeout(CHECK_TIMEOUT)))
    }

    fn count(&self, result: Result<bool, &AuthorizeError>) {
        let counter = match result {
            Ok(true) => &self.stats.granted,
            Ok(false) => &self.stats.denied,
            Err(_) => &self.stats.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A permit and an idle connection (or a new one).
    async fn checkout(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, Client), AuthorizeError> {
        let permit = self.permits.acquire().await.map_err(|_| AuthorizeError::Timeout(CHECK_TIMEOUT))?;
        let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let client = match idle {
            Some(client) if !client.is_closed() => client,
            _ => crate::pgconn::connect(&self.config).await.map_err(AuthorizeError::Connect)?,
        };
        Ok((permit, client))
    }

    /// Keeps `client` for the next check, unless its check failed (it may
    /// be mid-transaction).
    fn checkin(&self, client: Client, clean: bool) {
        if clean {
            self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(client);
        }
    }
}

/// The transaction-local settings the policies read, as the user.
const SETTINGS: &str = "select set_config('role', $1, true), set_config('realtime.topic', $2, true), \
     set_config('request.jwt.claims', $3, true), set_config('request.jwt.claim.sub', $4, true), \
     set_config('request.jwt.claim.role', $1, true), set_config('request.headers', $5, true)";

async fn act_as(
    tx: &tokio_postgres::Transaction<'_>,
    asker: Asker<'_>,
    topic: &str,
) -> Result<(), tokio_postgres::Error> {
    let claims = serde_json::to_string(&*asker.claims.all).unwrap_or_else(|_| "{}".into());
    let headers = serde_json::to_string(asker.headers).unwrap_or_else(|_| "{}".into());
    let sub = asker.claims.sub.clone().unwrap_or_default();
    tx.execute(SETTINGS, &[&asker.claims.role, &topic, &claims, &sub, &headers]).await.map(drop)
}

async fn read(
    client: &mut Client,
    asker: Asker<'_>,
    topic: &str,
    presence: bool,
) -> Result<ReadGrant, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let broadcast_id = uuid::Uuid::new_v4();
    let presence_id = uuid::Uuid::new_v4();
    // Probe rows, inserted as walcast (which bypasses RLS on the table), then
    // read back as the user: the visible ones are the granted reads.
    let mut ids = vec![broadcast_id];
    tx.execute(
        "insert into realtime.messages (id, topic, extension, inserted_at, updated_at) \
         values ($1, $2, 'broadcast', now() at time zone 'utc', now() at time zone 'utc')",
        &[&broadcast_id, &topic],
    )
    .await?;
    if presence {
        ids.push(presence_id);
        tx.execute(
            "insert into realtime.messages (id, topic, extension, inserted_at, updated_at) \
             values ($1, $2, 'presence', now() at time zone 'utc', now() at time zone 'utc')",
            &[&presence_id, &topic],
        )
        .await?;
    }
    act_as(&tx, asker, topic).await?;
    let rows = tx.query("select id from realtime.messages where id = any($1)", &[&ids]).await?;
    let visible: Vec<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
    tx.rollback().await?;
    Ok(ReadGrant { broadcast: visible.contains(&broadcast_id), presence: visible.contains(&presence_id) })
}

async fn write(
    client: &mut Client,
    asker: Asker<'_>,
    topic: &str,
    extension: Extension,
) -> Result<bool, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    act_as(&tx, asker, topic).await?;
    let inserted = tx
        .execute(
            "insert into realtime.messages (topic, extension, inserted_at, updated_at) \
             values ($1, $2, now() at time zone 'utc', now() at time zone 'utc')",
            &[&topic, &extension.as_str()],
        )
        .await;
    let allowed = match inserted {
        Ok(_) => true,
        // RLS refused the row (or the role lacks INSERT): denied.
        Err(err) if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => false,
        Err(err) => return Err(err),
    };
    tx.rollback().await?;
    Ok(allowed)
}

/// The `x-*` headers of a request as the JSON object policies read from
/// `request.headers` (names lower-cased; values that are not UTF-8 are
/// left out).
pub fn x_headers<'a>(headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> Value {
    let mut out = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if name.starts_with("x-") {
            if let Ok(value) = std::str::from_utf8(value) {
                out.insert(name, Value::String(value.to_owned()));
            }
        }
    }
    Value::Object(out)
}
