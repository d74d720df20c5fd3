//! The policy layer: mirrors the database's own row level security and
//! column privileges in memory, so the hub can decide who may see each
//! committed change without a query per subscriber.
//!
//! ```text
//!  catalog (pg_policy, pg_class, pg_roles, privileges, pg_proc)
//!     └─▶ compile (sqlparser → predicates, membership caches)
//!           └─▶ plan (per table × role: nothing | every row | in memory | database) ──▶ hub
//!  WAL rows of membership tables ──▶ caches (hub is the only writer, commit order)
//! ```
//!
//! Sits between the change stage (which loads a [`plan::Loaded`] at start,
//! and again when [`watch`] notices a policy change) and the hub. Pure except for [`plan::load`], [`catalog::load`] and
//! [`caches::load`]. Plus postgres_changes filters ([`filter`]).
//!
//! Invariant: when walcast cannot mirror a policy exactly it denies and says
//! so (the plan's warnings go to subscribers as `system` messages) — it never
//! delivers a row it is unsure of.

pub mod caches;
pub mod catalog;
pub mod compile;
pub mod fallback;
pub mod filter;
pub mod plan;
pub mod predicate;
pub mod watch;

use std::sync::Arc;

pub use caches::{Caches, LoadedAt};
pub use filter::{Filter, FilterError, IndexKeys, KeyKind};
pub use plan::{Access, Index, PolicySet, RolePlan, TablePlan};

use crate::change::Op;

/// The event a subscriber receives (after visibility transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// `INSERT`: carries `record`.
    Insert,
    /// `UPDATE`: carries `record` and `old_record`.
    Update,
    /// `DELETE`: carries `old_record`.
    Delete,
}

impl EventType {
    /// `INSERT`, `UPDATE`, `DELETE`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Insert => "INSERT",
            EventType::Update => "UPDATE",
            EventType::Delete => "DELETE",
        }
    }

    /// The event a change is without any transition (`None` for TRUNCATE,
    /// which postgres_changes does not carry).
    pub fn of(op: Op) -> Option<EventType> {
        match op {
            Op::Insert => Some(EventType::Insert),
            Op::Update => Some(EventType::Update),
            Op::Delete => Some(EventType::Delete),
            Op::Truncate => None,
        }
    }

    /// The event for a viewer who sees the old row (`old`) and/or the new
    /// row (`new`) of a change that is `self` — the visibility transition:
    ///
    /// | old row visible | new row visible | event |
    /// |---|---|---|
    /// | no  | yes | INSERT (with `record`) |
    /// | yes | yes | UPDATE |
    /// | yes | no  | DELETE (with `old_record`) |
    /// | no  | no  | nothing |
    pub fn transition(self, old: bool, new: bool) -> Option<EventType> {
        match (self, old, new) {
            (EventType::Insert, _, true) => Some(EventType::Insert),
            (EventType::Delete, true, _) => Some(EventType::Delete),
            (EventType::Update, true, true) => Some(EventType::Update),
            (EventType::Update, false, true) => Some(EventType::Insert),
            (EventType::Update, true, false) => Some(EventType::Delete),
            _ => None,
        }
    }
}

/// Who is looking: the channel token's role and its whole claims (what
/// `auth.uid()`, `auth.role()` and `auth.jwt()` read).
#[derive(Debug, Clone, PartialEq)]
pub struct Viewer {
    /// The PostgreSQL role (`role` claim).
    pub role: Arc<str>,
    /// The JWT claims.
    pub claims: Arc<serde_json::Value>,
    /// The claims as JSON text, serialized once (database evaluation sends
    /// it, and groups viewers by it).
    pub claims_json: Arc<str>,
}

impl Viewer {
    /// A viewer with `role` and these claims.
    pub fn new(role: &str, claims: serde_json::Value) -> Viewer {
        Viewer::shared(role, Arc::new(claims))
    }

    /// A viewer with `role` and already shared claims.
    pub fn shared(role: &str, claims: Arc<serde_json::Value>) -> Viewer {
        let claims_json = Arc::from(serde_json::to_string(&*claims).unwrap_or_default().as_str());
        Viewer { role: Arc::from(role), claims, claims_json }
    }

    /// `authenticated` with `sub` = `user` (tests, tools).
    pub fn user(user: uuid::Uuid) -> Viewer {
        Viewer::new("authenticated", serde_json::json!({"role": "authenticated", "sub": user.to_string()}))
    }

    /// `service_role` (tests, tools).
    pub fn service() -> Viewer {
        Viewer::new("service_role", serde_json::json!({"role": "service_role"}))
    }

    /// `anon` (tests, tools).
    pub fn anon() -> Viewer {
        Viewer::new("anon", serde_json::json!({"role": "anon"}))
    }

    /// The `sub` claim, if a string.
    pub fn sub(&self) -> Option<&str> {
        self.claims.get("sub").and_then(|s| s.as_str())
    }
}

/// Errors of the policy layer.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Reading the catalog or the caches failed.
    #[error(transparent)]
    Load(#[from] plan::LoadError),
    /// A database error (transient unless it names a missing object).
    #[error("reading policies: {0}")]
    Database(#[from] tokio_postgres::Error),
}

impl PolicyError {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        let db = match self {
            PolicyError::Load(plan::LoadError::Database(e)) | PolicyError::Database(e) => e,
            PolicyError::Load(plan::LoadError::Hidden(_)) => return false,
        };
        db.as_db_error().is_none() || db.is_closed()
    }
}
