//! The demo's endpoints: `/demo.json` (tokens for the demo users) and
//! `GET /demo/orders`, the orders a token's user may see now, read through
//! PostgreSQL's Row Level Security as that user. The dashboard reads the
//! latter after it has subscribed (see `dashboard.html`), so it starts from
//! the truth rather than from an empty board.
//!
//! ```text
//!  Authorization: Bearer <jwt> ─▶ Verifier::verify (signature, exp, nbf, aud)
//!    ─▶ role ∈ {anon, authenticated, service_role}, sub a UUID if present
//!    ─▶ one read-only transaction on a connection of its own:
//!         set local role <role>; set local timezone = 'UTC';
//!         set_config('request.jwt.claims', <claims of the verified token>, true);
//!         select … from public.orders            (RLS decides the rows)
//!    ─▶ 200 {"role": …, "orders": [<to_jsonb(order)>, …]}
//! ```
//!
//! Invariants:
//! - served only in demo mode (the same switch as `/demo.json`): the read
//!   connects as the relay's own database user, which in the demo is the
//!   embedded cluster's superuser, and only `set local role` narrows it;
//! - the claims put into `request.jwt.claims` are rebuilt from the verified
//!   token ([`Claims`]: `role`, `sub`, `exp`), never copied from its payload,
//!   and the role name is one of three fixed names, never text from the
//!   token spliced into SQL;
//! - tokens and row values are never logged; a failed read logs its SQLSTATE;
//! - at most [`READ_CONCURRENCY`] reads run at once, each within
//!   [`READ_TIMEOUT`]; a read returns at most [`MAX_ORDERS`] orders (the
//!   demo holds about 30).

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::pgconn::PgConfig;
use crate::realtime::auth::{Claims, Verifier};
use crate::realtime::session::now_unix;

/// Reads running at once; more wait for a permit.
const READ_CONCURRENCY: usize = 4;

/// Time allowed for one read, waiting for a permit and connecting included.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most orders one read returns (the most recently updated).
const MAX_ORDERS: i64 = 1000;

/// The roles a token may read as: Supabase's API roles.
const ROLES: [&str; 3] = ["anon", "authenticated", "service_role"];

/// What the demo serves beyond the relay.
#[derive(Debug)]
pub struct DemoEndpoints {
    /// The body of `/demo.json`.
    pub json: Bytes,
    /// The demo database, as the relay connects to it.
    database: PgConfig,
    /// Bounds the reads running at once.
    reads: Semaphore,
}

/// A refused or failed read: the status and the `{"error": …}` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The error text (no token, no row values).
    pub message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal { status, message: message.into() }
    }
}

impl DemoEndpoints {
    /// The demo's endpoints: `json` for `/demo.json`, orders read from
    /// `database`.
    pub fn new(json: Bytes, database: PgConfig) -> DemoEndpoints {
        DemoEndpoints { json, database, reads: Semaphore::new(READ_CONCURRENCY) }
    }

    /// `GET /demo/orders` with the request's `Authorization` header: the
    /// response body, or why not.
    ///
    /// # Errors
    /// 401 without a valid bearer token, 403 for a role other than Supabase's
    /// API roles or a `sub` that is not a UUID, 503 when the database read
    /// fails or takes longer than 5 s.
    pub async fn orders(&self, authorization: Option<&str>, verifier: &Verifier) -> Result<Vec<u8>, Refusal> {
        let token = bearer(authorization).ok_or_else(|| Refusal::new(401, "expected Authorization: Bearer <token>"))?;
        let claims = verifier.verify(token, now_unix()).map_err(|err| Refusal::new(401, err.to_string()))?;
        let role = ROLES
            .into_iter()
            .find(|role| *role == claims.role)
            .ok_or_else(|| Refusal::new(403, "the token's role is not anon, authenticated or service_role"))?;
        if claims.sub.as_deref().is_some_and(|sub| uuid::Uuid::parse_str(sub).is_err()) {
            return Err(Refusal::new(403, "the token's sub is not a user id (a UUID)"));
        }
        let read = async {
            let _permit = self.reads.acquire().await.map_err(|_| Refusal::new(503, "shutting down"))?;
            read_orders(&self.database, role, &claims).await.map_err(|err| {
                tracing::warn!(
                    sqlstate = err.code().map(|c| c.code()),
                    closed = err.is_closed(),
                    "reading the demo orders failed"
                );
                Refusal::new(503, "reading the orders failed")
            })
        };
        let orders = tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| Refusal::new(503, "reading the orders timed out"))??;
        let role = serde_json::to_string(role).unwrap_or_default();
        Ok(format!("{{\"role\":{role},\"orders\":{orders}}}").into_bytes())
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, token) = authorization?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The claims `auth.uid()` and `auth.role()` read, from the verified token.
fn claims_json(claims: &Claims) -> String {
    let mut json = serde_json::json!({ "role": claims.role, "exp": claims.exp });
    if let Some(sub) = &claims.sub {
        json["sub"] = serde_json::Value::String(sub.clone());
    }
    json.to_string()
}

/// `statement_timeout` of the dashboard's read (a bounded query on an
/// index; anything slower is a stuck database).
const DEMO_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The orders `role` with `claims` may see, as a JSON array (text).
async fn read_orders(
    database: &PgConfig,
    role: &'static str,
    claims: &Claims,
) -> Result<String, tokio_postgres::Error> {
    let mut client = crate::pgconn::connect(&database.with_statement_timeout(DEMO_STATEMENT_TIMEOUT)).await?;
    let tx = client.build_transaction().read_only(true).start().await?;
    // `role` is one of `ROLES`: fixed names, safe to splice.
    tx.batch_execute(&format!("set local role {role}; set local timezone = 'UTC'")).await?;
    tx.execute("select set_config('request.jwt.claims', $1, true)", &[&claims_json(claims)]).await?;
    let row = tx
        .query_one(
            "select coalesce(jsonb_agg(to_jsonb(o) order by o.updated_at, o.id), '[]'::jsonb)::text \
             from (select * from public.orders order by updated_at desc, id limit $1) o",
            &[&MAX_ORDERS],
        )
        .await?;
    let orders: String = row.get(0);
    tx.rollback().await?;
    Ok(orders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_taken_from_the_header() {
        assert_eq!(bearer(Some("Bearer a.b.c")), Some("a.b.c"));
        assert_eq!(bearer(Some("bearer  a.b.c ")), Some("a.b.c"));
        assert_eq!(bearer(Some("Basic a.b.c")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("a.b.c")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn claims_come_from_the_verified_token_only() {
        let claims = Claims { role: "authenticated".into(), sub: Some("u".into()), exp: 7, all: Default::default() };
        let json: serde_json::Value = serde_json::from_str(&claims_json(&claims)).unwrap();
        assert_eq!(json, serde_json::json!({"role": "authenticated", "sub": "u", "exp": 7}));
        let anon = Claims { role: "anon".into(), sub: None, exp: 7, all: Default::default() };
        assert_eq!(claims_json(&anon), r#"{"exp":7,"role":"anon"}"#);
    }
}
