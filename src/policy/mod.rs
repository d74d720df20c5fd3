//! The policy layer: decides, in memory, who may see each committed change —
//! the membership cache (mirrored from the WAL), the rules that mirror the
//! database's SELECT policies, and postgres_changes filters.
//!
//! Sits between the change stage and the hub; pure except for
//! [`membership::load`], which reads the membership table once at start.

pub mod filter;
pub mod membership;
pub mod rules;

pub use filter::{Filter, FilterError};
pub use membership::{LoadedAt, Membership, MembershipCache, MembershipTable};
pub use rules::{EventType, Judgment, PolicyConfig, Rules, TableRule, Viewer, Visibility};

/// Errors of the policy layer.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The membership table lacks a configured column (definite).
    #[error(
        "membership table {table} has no column {column:?}; fix the policy configuration (memberships.*_column) \
         or the table"
    )]
    MembershipColumns {
        /// `schema.table`.
        table: String,
        /// The missing column.
        column: String,
    },
    /// Loading memberships failed.
    #[error("loading memberships: {0}")]
    Load(String),
    /// A database error while loading (transient unless the table is missing).
    #[error("loading memberships: {0}")]
    Database(#[from] tokio_postgres::Error),
}

impl PolicyError {
    fn load(err: tokio_postgres::Error, table: &MembershipTable) -> PolicyError {
        match err.as_db_error() {
            Some(db) if matches!(db.code().code(), "42P01" | "42703" | "3F000") => PolicyError::Load(format!(
                "{} — the membership table {}.{} or one of its configured columns is missing; run `walcast migrate` \
                 or fix the policy configuration",
                db.message(),
                table.schema,
                table.table
            )),
            Some(db) if db.code().code() == "42501" && db.message().contains("row-level security") => {
                PolicyError::Load(format!(
                    "{} — row level security would hide memberships from the role walcast connects as, and \
                     walcast must see every one: give the role BYPASSRLS (ALTER ROLE <walcast role> BYPASSRLS), \
                     or connect as a superuser or the owner of {}.{}",
                    db.message(),
                    table.schema,
                    table.table
                ))
            }
            _ => PolicyError::Database(err),
        }
    }

    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        match self {
            PolicyError::Database(e) => e.as_db_error().is_none() || e.is_closed(),
            PolicyError::MembershipColumns { .. } | PolicyError::Load(_) => false,
        }
    }
}
