//! The membership cache: who belongs to which dealership, mirrored in memory
//! from `dealer_memberships` in WAL order.
//!
//! Sits in the policy layer, owned (for writing) by the hub task, which
//! applies every membership change of a transaction before it judges that
//! transaction's row changes, so a change committed at LSN X is judged by the
//! memberships as of X. Other tasks may read it concurrently (`dashmap`).
//!
//! # How it is kept exact
//!
//! - **New slot.** The replication source creates the slot with an exported
//!   snapshot; [`load`] reads the table *inside that snapshot*, so the cache
//!   is exactly the state at the slot's consistent point, and the stream
//!   carries every later change. [`LoadedAt::exact`] is true.
//! - **Existing slot (restart).** That snapshot is gone. [`load`] reads the
//!   current state and the WAL insert position L right after it. Commits
//!   visible to the read lie before L; commits before L may or may not be
//!   visible. The stream resumes at the slot's `confirmed_flush_lsn` C ≤ L.
//!   For transactions committing in [C, L) — the *catch-up window* — the
//!   cache may be ahead of or behind the truth for pairs the window touches,
//!   so the hub delivers their row changes only to subscribers whose
//!   visibility does not depend on memberships (`service_role`); membership
//!   changes in the window are applied in order as usual. Applying is
//!   idempotent (set a pair to the row's new state, remove it on delete), so
//!   once the stream reaches L the cache equals the truth as of L and every
//!   later change is judged exactly. Users miss row changes committed while
//!   walcast was down or starting — as a disconnected Supabase client does —
//!   and never receive one they could not see.
//!
//! Memberships are tracked by the table's key column as well as by
//! (user, dealership), so a DELETE or UPDATE whose old row carries only the
//! key (REPLICA IDENTITY DEFAULT) still removes the right pair. A NULL or
//! non-UUID user or dealership is no membership.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::PolicyError;
use crate::change::{Change, Datum, Op, RelationInfo, Row};
use crate::lsn::Lsn;

/// Where memberships live and which columns matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MembershipTable {
    /// Schema of the table.
    pub schema: String,
    /// The table.
    pub table: String,
    /// Its primary key column (one column).
    pub key_column: String,
    /// The member's user id (uuid).
    pub user_column: String,
    /// The dealership (uuid).
    pub dealership_column: String,
    /// The member's role (text), if the table has one.
    pub role_column: Option<String>,
}

impl Default for MembershipTable {
    /// `public.dealer_memberships (id, user_id, dealership_id, role)` as in sql/.
    fn default() -> Self {
        MembershipTable {
            schema: "public".into(),
            table: "dealer_memberships".into(),
            key_column: "id".into(),
            user_column: "user_id".into(),
            dealership_column: "dealership_id".into(),
            role_column: Some("role".into()),
        }
    }
}

impl MembershipTable {
    /// Whether `relation` is this table.
    pub fn is(&self, relation: &RelationInfo) -> bool {
        relation.table == self.table && relation.schema == self.schema
    }
}

/// One membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The user.
    pub user: Uuid,
    /// The dealership.
    pub dealership: Uuid,
    /// The role, when the table has one.
    pub role: Option<Arc<str>>,
}

/// When the cache was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedAt {
    /// Transactions committing at or after this LSN are judged exactly.
    pub lsn: Lsn,
    /// Whether the load was the exact state at `lsn` (exported snapshot).
    pub exact: bool,
    /// Memberships loaded.
    pub rows: usize,
}

/// A membership as held per user: its row key and role.
type Held = (Box<str>, Option<Arc<str>>);

/// The cache. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct MembershipCache {
    /// Membership row key → (user, dealership).
    rows: DashMap<Box<str>, (Uuid, Uuid)>,
    /// user → dealership → (row key, role).
    by_user: DashMap<Uuid, HashMap<Uuid, Held>>,
    /// dealership → its members.
    by_dealership: DashMap<Uuid, HashSet<Uuid>>,
}

impl MembershipCache {
    /// An empty cache.
    pub fn new() -> Self {
        MembershipCache::default()
    }

    /// Number of memberships held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no memberships are held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.rows.clear();
        self.by_user.clear();
        self.by_dealership.clear();
    }

    /// Whether `user` is a member of `dealership`.
    pub fn is_member(&self, user: Uuid, dealership: Uuid) -> bool {
        self.by_user.get(&user).is_some_and(|d| d.contains_key(&dealership))
    }

    /// `user`'s role in `dealership`, if a member.
    pub fn role(&self, user: Uuid, dealership: Uuid) -> Option<Option<Arc<str>>> {
        self.by_user.get(&user).and_then(|d| d.get(&dealership).map(|(_, role)| role.clone()))
    }

    /// Calls `f` with every member of `dealership` (no particular order).
    /// `f` must not write to the cache.
    pub fn for_each_member(&self, dealership: Uuid, mut f: impl FnMut(Uuid)) {
        if let Some(members) = self.by_dealership.get(&dealership) {
            members.iter().copied().for_each(&mut f);
        }
    }

    /// Members of `dealership`, sorted.
    pub fn members(&self, dealership: Uuid) -> Vec<Uuid> {
        let mut out = Vec::new();
        self.for_each_member(dealership, |u| out.push(u));
        out.sort_unstable();
        out
    }

    /// Dealerships of `user`, sorted.
    pub fn dealerships(&self, user: Uuid) -> Vec<Uuid> {
        let mut out: Vec<Uuid> = self.by_user.get(&user).map(|d| d.keys().copied().collect()).unwrap_or_default();
        out.sort_unstable();
        out
    }

    /// Adds (or replaces) the membership stored in row `key`.
    pub fn grant(&self, key: &str, membership: Membership) {
        self.revoke(key);
        let Membership { user, dealership, role } = membership;
        // Another row for the same pair (a table without the unique key): the
        // latest row wins the pair.
        if let Some(previous) = self.by_user.get(&user).and_then(|d| d.get(&dealership).map(|(k, _)| k.clone())) {
            self.rows.remove(&previous);
        }
        self.rows.insert(key.into(), (user, dealership));
        self.by_user.entry(user).or_default().insert(dealership, (key.into(), role));
        self.by_dealership.entry(dealership).or_default().insert(user);
    }

    /// Removes the membership stored in row `key`, if any.
    pub fn revoke(&self, key: &str) {
        let Some((_, (user, dealership))) = self.rows.remove(key) else { return };
        let mut empty_user = false;
        if let Some(mut dealerships) = self.by_user.get_mut(&user) {
            if dealerships.get(&dealership).is_some_and(|(k, _)| &**k == key) {
                dealerships.remove(&dealership);
            }
            empty_user = dealerships.is_empty();
        }
        if empty_user {
            self.by_user.remove_if(&user, |_, d| d.is_empty());
        }
        if !self.is_member(user, dealership) {
            let mut empty = false;
            if let Some(mut members) = self.by_dealership.get_mut(&dealership) {
                members.remove(&user);
                empty = members.is_empty();
            }
            if empty {
                self.by_dealership.remove_if(&dealership, |_, m| m.is_empty());
            }
        }
    }

    /// Applies one committed change of the membership table.
    ///
    /// # Errors
    /// [`PolicyError::MembershipColumns`] when the relation lacks a configured
    /// column (the table no longer matches the configuration).
    pub fn apply(&self, table: &MembershipTable, change: &Change) -> Result<(), PolicyError> {
        let columns = Columns::resolve(table, &change.relation)?;
        match change.op {
            Op::Insert => {
                if let Some(row) = &change.record {
                    self.set_from_row(&columns, row);
                }
            }
            Op::Update => {
                if let Some(key) = change.old_record.as_ref().and_then(|old| columns.key(old)) {
                    self.revoke(&key);
                }
                if let Some(row) = &change.record {
                    self.set_from_row(&columns, row);
                }
            }
            Op::Delete => {
                if let Some(key) = change.old_record.as_ref().and_then(|old| columns.key(old)) {
                    self.revoke(&key);
                }
            }
            Op::Truncate => self.clear(),
        }
        Ok(())
    }

    fn set_from_row(&self, columns: &Columns, row: &Row) {
        let Some(key) = columns.key(row) else { return };
        match columns.membership(row) {
            Some(m) => self.grant(&key, m),
            // An unchanged TOASTed or NULL user/dealership: nothing to grant;
            // the row's previous pair (if any) is gone.
            None => self.revoke(&key),
        }
    }
}

/// Column positions of the membership table in one relation version.
struct Columns {
    key: usize,
    user: usize,
    dealership: usize,
    role: Option<usize>,
}

impl Columns {
    fn resolve(table: &MembershipTable, relation: &RelationInfo) -> Result<Columns, PolicyError> {
        let find = |name: &str| {
            relation.column_index(name).ok_or_else(|| PolicyError::MembershipColumns {
                table: format!("{}.{}", table.schema, table.table),
                column: name.to_owned(),
            })
        };
        Ok(Columns {
            key: find(&table.key_column)?,
            user: find(&table.user_column)?,
            dealership: find(&table.dealership_column)?,
            role: table.role_column.as_deref().map(find).transpose()?,
        })
    }

    fn key(&self, row: &Row) -> Option<String> {
        row.0.get(self.key).and_then(Datum::as_str).map(str::to_owned)
    }

    fn membership(&self, row: &Row) -> Option<Membership> {
        let uuid = |i: usize| row.0.get(i).and_then(Datum::as_str).and_then(|s| Uuid::parse_str(s).ok());
        Some(Membership {
            user: uuid(self.user)?,
            dealership: uuid(self.dealership)?,
            role: self.role.and_then(|i| row.0.get(i)).and_then(Datum::as_str).map(Arc::from),
        })
    }
}

/// The query [`load`] reads the table with.
fn select_sql(table: &MembershipTable) -> String {
    let ident = crate::replication::slot::quote_ident;
    let role = table.role_column.as_deref().map_or_else(|| "NULL".to_owned(), |r| format!("{}::text", ident(r)));
    format!(
        "SELECT {}::text, {}::text, {}::text, {role} FROM {}.{}",
        ident(&table.key_column),
        ident(&table.user_column),
        ident(&table.dealership_column),
        ident(&table.schema),
        ident(&table.table)
    )
}

/// Whether [`load`] would work, without reading a row: the same query under
/// the same settings with `LIMIT 0`. PostgreSQL checks the table, the
/// columns and row level security when it plans the query, so a role that
/// [`load`] would refuse is refused here — before a replication slot exists.
///
/// # Errors
/// As [`load`].
pub async fn check_readable(client: &mut tokio_postgres::Client, table: &MembershipTable) -> Result<(), PolicyError> {
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute("SET LOCAL row_security = off").await?;
    tx.query(&format!("{} LIMIT 0", select_sql(table)), &[]).await.map_err(|e| PolicyError::load(e, table))?;
    tx.rollback().await?;
    Ok(())
}

/// Loads the table into `cache` (which is cleared first).
///
/// With `snapshot` (the name a new slot exported, and its consistent point)
/// the read happens inside that snapshot and the result is exact as of that
/// point. Without, it reads the current state and reports the WAL insert
/// position after the read (see the module doc for what that means).
///
/// The connection's role must see every row (superuser, BYPASSRLS, or the
/// table's owner without FORCE ROW LEVEL SECURITY): the read runs with
/// `row_security = off`, so a role the table's RLS policies apply to gets an
/// error rather than a partial (usually empty) cache.
///
/// # Errors
/// SQL errors, with the fix when the table or a column is missing or row
/// level security hides rows from the role.
pub async fn load(
    client: &mut tokio_postgres::Client,
    table: &MembershipTable,
    cache: &MembershipCache,
    snapshot: Option<(&str, Lsn)>,
) -> Result<LoadedAt, PolicyError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    if let Some((name, _)) = snapshot {
        tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", crate::replication::slot::quote_literal(name)))
            .await?;
    }
    // A role subject to the table's row level security would read only the
    // rows its policies show it (usually none) and every user would silently
    // miss changes; with row_security off, PostgreSQL refuses such a read
    // instead (42501), and the error names the fix.
    tx.batch_execute("SET LOCAL row_security = off").await?;
    let rows = tx.query(&select_sql(table), &[]).await.map_err(|e| PolicyError::load(e, table))?;
    let lsn = match snapshot {
        Some((_, point)) => point,
        None => {
            let text: String = tx.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
            text.parse().map_err(|_| PolicyError::Load(format!("bad LSN {text:?}")))?
        }
    };
    tx.commit().await?;
    cache.clear();
    for row in &rows {
        let key: Option<String> = row.get(0);
        let user: Option<String> = row.get(1);
        let dealership: Option<String> = row.get(2);
        let role: Option<String> = row.get(3);
        let (Some(key), Some(user), Some(dealership)) = (key, user, dealership) else { continue };
        let (Ok(user), Ok(dealership)) = (Uuid::parse_str(&user), Uuid::parse_str(&dealership)) else { continue };
        cache.grant(&key, Membership { user, dealership, role: role.map(Arc::from) });
    }
    Ok(LoadedAt { lsn, exact: snapshot.is_some(), rows: cache.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ColumnInfo, RelationInfo};
    use crate::pgoutput::ReplicaIdentity;
    use bytes::Bytes;

    fn relation() -> Arc<RelationInfo> {
        let col = |name: &str, is_key| ColumnInfo {
            name: name.into(),
            type_name: "text".into(),
            type_oid: 25,
            is_key,
            kind: crate::change::value::kind_of(25),
        };
        Arc::new(RelationInfo {
            oid: 1,
            schema: "public".into(),
            table: "dealer_memberships".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", true), col("user_id", false), col("dealership_id", false), col("role", false)],
        })
    }

    fn row(id: &str, user: Uuid, dealer: Uuid, role: &str) -> Row {
        let t = |s: String| Datum::Text(Bytes::from(s));
        Row(vec![t(id.into()), t(user.to_string()), t(dealer.to_string()), t(role.into())])
    }

    fn key_only(id: &str) -> Row {
        Row(vec![Datum::Text(Bytes::from(id.to_owned())), Datum::Absent, Datum::Absent, Datum::Absent])
    }

    fn change(op: Op, record: Option<Row>, old_record: Option<Row>) -> Change {
        Change { relation: relation(), op, record, old_record, missing_toast: vec![] }
    }

    #[test]
    fn grants_moves_and_revokes_follow_the_rows() {
        let cache = MembershipCache::new();
        let t = MembershipTable::default();
        let (u1, u2, d1, d2) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        cache.apply(&t, &change(Op::Insert, Some(row("m1", u1, d1, "admin")), None)).unwrap();
        cache.apply(&t, &change(Op::Insert, Some(row("m2", u2, d1, "user")), None)).unwrap();
        assert_eq!(cache.members(d1), {
            let mut v = vec![u1, u2];
            v.sort();
            v
        });
        assert_eq!(cache.role(u1, d1), Some(Some(Arc::from("admin"))));
        // A key-only old row (REPLICA IDENTITY DEFAULT) still finds the pair.
        cache.apply(&t, &change(Op::Update, Some(row("m1", u1, d2, "user")), Some(key_only("m1")))).unwrap();
        assert!(!cache.is_member(u1, d1));
        assert!(cache.is_member(u1, d2));
        assert_eq!(cache.members(d1), vec![u2]);
        cache.apply(&t, &change(Op::Delete, None, Some(key_only("m2")))).unwrap();
        assert!(cache.members(d1).is_empty());
        assert_eq!(cache.dealerships(u1), vec![d2]);
        assert_eq!(cache.len(), 1);
        // Re-applying is idempotent.
        cache.apply(&t, &change(Op::Delete, None, Some(key_only("m2")))).unwrap();
        cache.apply(&t, &change(Op::Insert, Some(row("m1", u1, d2, "user")), None)).unwrap();
        assert_eq!(cache.len(), 1);
        cache.apply(&t, &change(Op::Truncate, None, None)).unwrap();
        assert!(cache.is_empty() && cache.members(d2).is_empty() && cache.dealerships(u1).is_empty());
    }

    #[test]
    fn null_or_invalid_ids_are_no_membership() {
        let cache = MembershipCache::new();
        let t = MembershipTable::default();
        let (u, d) = (Uuid::new_v4(), Uuid::new_v4());
        cache.apply(&t, &change(Op::Insert, Some(row("m1", u, d, "user")), None)).unwrap();
        let mut bad = row("m1", u, d, "user");
        bad.0[2] = Datum::Null;
        cache.apply(&t, &change(Op::Update, Some(bad), Some(key_only("m1")))).unwrap();
        assert!(!cache.is_member(u, d));
        let mut bad = row("m3", u, d, "user");
        bad.0[1] = Datum::Text(Bytes::from_static(b"not-a-uuid"));
        cache.apply(&t, &change(Op::Insert, Some(bad), None)).unwrap();
        assert!(cache.is_empty());
    }

    #[test]
    fn a_relation_without_the_configured_columns_is_an_error() {
        let cache = MembershipCache::new();
        let t = MembershipTable { user_column: "member".into(), ..MembershipTable::default() };
        let err = cache.apply(&t, &change(Op::Insert, None, None)).unwrap_err();
        assert!(err.to_string().contains("member"), "{err}");
    }
}
