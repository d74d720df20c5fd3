//! `phx_join` payloads: the channel's token and its `postgres_changes`
//! bindings, resolved against the published tables into hub bindings.
//!
//! Invariants (what realtime-js checks, `realtime-protocol.md` §4.1):
//! - the join reply echoes each client binding object verbatim, in order,
//!   plus `id`, and nothing else (no `filter: null`);
//! - `id` is a deterministic hash of the binding's parameters in
//!   `[1, 2^27)` (never 0: clients treat 0 as no id), so a rejoin gets the
//!   same ids; equal bindings share one.
//!
//! Resolution follows Supabase: `table` without `schema` means `public`, `*`
//! is a wildcard, a filter needs a concrete schema and table, the table must
//! be published, and one bad binding fails the channel's whole
//! postgres_changes subscription (reported as a `system` error; the channel
//! stays joined). A binding on the `realtime` schema is refused with its
//! reason: `realtime.messages` carries Broadcast from Database, never
//! Postgres Changes.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::catalog::Catalog;
use crate::hub::{Binding, EventMatch};
use crate::policy::{EventType, Filter};

/// Most bindings per channel.
pub const MAX_BINDINGS: usize = 100;

/// What a join asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    /// `config.postgres_changes`, as sent.
    pub bindings: Vec<Map<String, Value>>,
    /// `access_token` (or the legacy `user_token`), unless absent, not a
    /// string, or an `sb_…` key (which Supabase ignores too).
    pub access_token: Option<String>,
    /// `config.private`: a channel under Realtime Authorization (policies
    /// on `realtime.messages`), which this server does not evaluate yet.
    pub private: bool,
    /// `config.broadcast.self`: the channel receives its own broadcasts.
    pub broadcast_self: bool,
    /// `config.broadcast.ack`: each broadcast push is answered.
    pub broadcast_ack: bool,
    /// `config.presence.key` (`None`: a fresh UUID for this join).
    pub presence_key: Option<String>,
    /// `config.presence.enabled`: the channel gets `presence_state` after
    /// the join.
    pub presence_enabled: bool,
    /// `config.broadcast.replay`: `None` when absent, `Some(Err(()))`
    /// when its `since` is not an integer or its `limit` is present and not
    /// an integer, else `(since ms, limit)` (default and clamp 1…25).
    pub replay: Option<Result<(i64, i64), InvalidReplay>>,
}

/// `config.broadcast.replay` that is not `{since: integer, limit?: integer}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidReplay;

/// Reads `config.broadcast.replay` (Supabase: `since` required, `limit`
/// 25 by default, clamped to 1…25).
fn parse_replay(value: Option<&Value>) -> Option<Result<(i64, i64), InvalidReplay>> {
    let replay = match value {
        None | Some(Value::Null) => return None,
        Some(Value::Object(map)) => map,
        Some(_) => return Some(Err(InvalidReplay)),
    };
    let Some(since) = replay.get("since").and_then(Value::as_i64) else { return Some(Err(InvalidReplay)) };
    let limit = match replay.get("limit") {
        None | Some(Value::Null) => crate::realtime::messages::MAX_REPLAY,
        Some(limit) => match limit.as_i64() {
            Some(limit) => limit.clamp(1, crate::realtime::messages::MAX_REPLAY),
            None => return Some(Err(InvalidReplay)),
        },
    };
    Some(Ok((since, limit)))
}

/// A join config flag: a bool, or the strings `"true"`/`"false"` (as
/// Supabase accepts); anything else is `false`.
fn flag(value: Option<&Value>) -> bool {
    match value {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

/// A join payload that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// `config.postgres_changes` is not a list of objects.
    #[error("config.postgres_changes must be a list of objects")]
    BindingsShape,
    /// Too many bindings.
    #[error("too many postgres_changes bindings: at most {MAX_BINDINGS} per channel")]
    TooManyBindings,
}

/// The token to use from an `access_token` value.
pub fn usable_token(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) if !s.is_empty() && !s.starts_with("sb_") => Some(s.clone()),
        _ => None,
    }
}

/// Reads a join payload. Unknown keys are ignored, as Supabase does.
///
/// # Errors
/// See [`JoinError`].
pub fn parse_join(payload: &Value) -> Result<JoinRequest, JoinError> {
    let access_token = usable_token(payload.get("access_token")).or_else(|| usable_token(payload.get("user_token")));
    let bindings = match payload.get("config").and_then(|c| c.get("postgres_changes")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_BINDINGS {
                return Err(JoinError::TooManyBindings);
            }
            items
                .iter()
                .map(|item| item.as_object().cloned().ok_or(JoinError::BindingsShape))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(JoinError::BindingsShape),
    };
    let config = payload.get("config");
    let private = flag(config.and_then(|c| c.get("private")));
    let broadcast = config.and_then(|c| c.get("broadcast"));
    let broadcast_self = flag(broadcast.and_then(|b| b.get("self")));
    let broadcast_ack = flag(broadcast.and_then(|b| b.get("ack")));
    let presence = config.and_then(|c| c.get("presence"));
    let presence_key = super::rooms::presence::key_from_config(presence.and_then(|p| p.get("key")));
    let presence_enabled = flag(presence.and_then(|p| p.get("enabled")));
    let replay = parse_replay(broadcast.and_then(|b| b.get("replay")));
    Ok(JoinRequest {
        bindings,
        access_token,
        private,
        broadcast_self,
        broadcast_ack,
        presence_key,
        presence_enabled,
        replay,
    })
}

/// The binding's id: a hash of its parameters (keys sorted) in `[1, 2^27)`.
pub fn binding_id(params: &Map<String, Value>) -> u32 {
    // serde_json's Map is ordered by key, so equal bindings serialize equally.
    let canonical = serde_json::to_vec(params).unwrap_or_default();
    let digest = Sha256::digest(&canonical);
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & ((1 << 27) - 1);
    // Every client tests `bindId && …`: an id of 0 would never be delivered.
    id.max(1)
}

/// The join reply's `postgres_changes`: each binding with its `id`.
pub fn reply_bindings(bindings: &[Map<String, Value>]) -> Value {
    Value::Array(
        bindings
            .iter()
            .map(|params| {
                let mut echoed = params.clone();
                echoed.insert("id".into(), Value::from(binding_id(params)));
                Value::Object(echoed)
            })
            .collect(),
    )
}

fn text<'a>(params: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    params.get(key).and_then(Value::as_str)
}

/// Supabase's message for a binding that names nothing published.
fn unable(params: &Map<String, Value>) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given \
         connect parameters: [event: {}, schema: {}, table: {}, filters: [{}]]",
        text(params, "event").unwrap_or("*"),
        text(params, "schema").unwrap_or("public"),
        text(params, "table").unwrap_or("*"),
        text(params, "filter").unwrap_or(""),
    )
}

/// Why a binding on the `realtime` schema is refused: its tables carry
/// Broadcast from Database and Realtime Authorization, never Postgres
/// Changes.
fn realtime_schema(params: &Map<String, Value>) -> String {
    format!(
        "Unable to subscribe to changes with given parameters: Postgres Changes on the realtime schema are not \
         supported (table: {}); realtime.messages carries Broadcast from Database: listen with \
         .on('broadcast', …) on the message's topic instead",
        text(params, "table").unwrap_or("*"),
    )
}

/// Resolves every binding; the first failure is the `system` error message.
///
/// # Errors
/// The message to send in a `system` push with `status: "error"`.
pub async fn resolve(bindings: &[Map<String, Value>], catalog: &Catalog) -> Result<Vec<Binding>, String> {
    let mut out = Vec::with_capacity(bindings.len());
    for params in bindings {
        out.push(resolve_one(params, catalog).await?);
    }
    Ok(out)
}

async fn resolve_one(params: &Map<String, Value>, catalog: &Catalog) -> Result<Binding, String> {
    let event = match text(params, "event").map(str::to_ascii_uppercase).as_deref() {
        Some("INSERT") => EventMatch::Only(EventType::Insert),
        Some("UPDATE") => EventMatch::Only(EventType::Update),
        Some("DELETE") => EventMatch::Only(EventType::Delete),
        _ => EventMatch::All,
    };
    let wildcard = |v: Option<&str>| v.filter(|s| *s != "*").map(str::to_owned);
    let (schema, table) = match (text(params, "schema"), text(params, "table")) {
        (None, None) => return Err(unable(params)),
        (None, table) => (Some("public".to_owned()), wildcard(table)),
        (schema, table) => (wildcard(schema), wildcard(table)),
    };
    if schema.as_deref() == Some(super::messages::SCHEMA) {
        return Err(realtime_schema(params));
    }
    let spec = text(params, "filter").map(str::trim).filter(|s| !s.is_empty());
    // `select`: the columns wanted (`[]` or absent: all).
    let select: Option<Vec<String>> = match params.get("select") {
        Some(Value::Array(items)) if !items.is_empty() => Some(
            items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| unable(params)))
                .collect::<Result<_, _>>()?,
        ),
        _ => None,
    };
    if select.is_some() && (schema.is_none() || table.is_none()) {
        return Err(unable(params));
    }
    let filter = match (&schema, &table) {
        (Some(s), Some(t)) => {
            let info = catalog.lookup(s, t).await.ok_or_else(|| unable(params))?;
            if let Some(cols) = &select {
                if cols.iter().any(|c| info.column_type(c).is_none()) {
                    return Err(unable(params));
                }
            }
            match spec {
                Some(spec) => Filter::parse(spec, |column| info.column_type(column))
                    .map_err(|err| format!("Error parsing `filter` params: {err}"))?,
                None => Filter::default(),
            }
        }
        _ => {
            if spec.is_some() {
                return Err("Error parsing `filter` params: a filter needs a concrete schema and table".into());
            }
            let mut tables = catalog.tables();
            if tables.is_empty() {
                let _ = catalog.refresh_if_stale().await;
                tables = catalog.tables();
            }
            let any = tables.iter().any(|info| {
                schema.as_deref().is_none_or(|s| s == info.schema) && table.as_deref().is_none_or(|t| t == info.table)
            });
            if !any {
                return Err(unable(params));
            }
            Filter::default()
        }
    };
    Ok(Binding { id: binding_id(params), schema, table, event, filter, select })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_tokens_and_bindings() {
        let payload = json!({
            "config": {"broadcast": {"ack": false}, "postgres_changes": [
                {"event": "*", "schema": "public", "table": "orders", "filter": "status=eq.pending"},
                {"event": "INSERT", "schema": "public", "table": "dealer_memberships"}
            ], "private": false},
            "access_token": "eyJ.x.y",
            "version": "realtime-js/2.0.0"
        });
        let join = parse_join(&payload).unwrap();
        assert_eq!(join.bindings.len(), 2);
        assert_eq!(join.access_token.as_deref(), Some("eyJ.x.y"));
        assert_eq!(parse_join(&json!({"user_token": "t"})).unwrap().access_token.as_deref(), Some("t"));
        assert_eq!(parse_join(&json!({"access_token": "sb_publishable_x"})).unwrap().access_token, None);
        assert_eq!(parse_join(&json!({"access_token": null})).unwrap().access_token, None);
        assert!(parse_join(&json!({})).unwrap().bindings.is_empty());
        assert!(!join.private);
        assert!(parse_join(&json!({"config": {"private": true}})).unwrap().private);
        assert!(!parse_join(&json!({"config": {"private": "yes"}})).unwrap().private);
        let b = parse_join(&json!({"config": {"broadcast": {"self": true, "ack": "true"}}})).unwrap();
        assert!(b.broadcast_self && b.broadcast_ack);
        assert!(!join.broadcast_self && !join.broadcast_ack);
        assert_eq!(parse_join(&json!({"config": {"postgres_changes": {}}})), Err(JoinError::BindingsShape));
        assert_eq!(parse_join(&json!({"config": {"postgres_changes": [1]}})), Err(JoinError::BindingsShape));
        let many: Vec<Value> = (0..=MAX_BINDINGS).map(|_| json!({"schema": "public"})).collect();
        assert_eq!(parse_join(&json!({"config": {"postgres_changes": many}})), Err(JoinError::TooManyBindings));
    }

    #[test]
    fn reply_echoes_verbatim_with_deterministic_ids() {
        let a = json!({"event": "*", "schema": "public", "table": "orders", "select": ["id"]});
        let b = json!({"event": "INSERT", "schema": "public", "table": "orders"});
        let bindings: Vec<Map<String, Value>> = [&a, &b, &a].iter().map(|v| v.as_object().unwrap().clone()).collect();
        let reply = reply_bindings(&bindings);
        let items = reply.as_array().unwrap();
        assert_eq!(items.len(), 3);
        for (item, sent) in items.iter().zip([&a, &b, &a]) {
            let mut item = item.as_object().unwrap().clone();
            let id = item.remove("id").unwrap().as_u64().unwrap();
            assert!(id < 1 << 27);
            assert_eq!(&Value::Object(item), sent, "echoed verbatim, no keys added");
        }
        assert_eq!(items[0]["id"], items[2]["id"], "equal bindings share an id");
        assert_ne!(items[0]["id"], items[1]["id"]);
        // Key order of the client's object does not change the id.
        let reordered: Map<String, Value> =
            serde_json::from_str(r#"{"table":"orders","select":["id"],"schema":"public","event":"*"}"#).unwrap();
        assert_eq!(binding_id(&reordered), binding_id(a.as_object().unwrap()));
    }
}
