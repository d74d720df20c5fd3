//! Membership caches: for each membership subquery or helper a policy names
//! (table `T`, user column, group column, conditions), the `(group, user)`
//! pairs of `T`'s rows that pass the conditions, mirrored from the WAL in
//! commit order.
//!
//! Sits under the hub, which owns a [`Caches`] and is its only writer: it
//! applies every change of a transaction to the caches before judging that
//! transaction's rows, so a change committed at LSN X is judged by the
//! memberships as of X.
//!
//! # How it is kept exact
//!
//! - Rows are tracked by `T`'s key (primary key, or every column under
//!   REPLICA IDENTITY FULL), so an UPDATE or DELETE whose old row carries
//!   only the key still finds the pair. Pairs are counted, so two rows giving
//!   the same pair need both removed.
//! - A new slot: [`load`] reads `T` inside the slot's exported snapshot, so
//!   the caches are exact at the slot's consistent point. An existing slot
//!   (restart): the current state, then the WAL insert position L; commits
//!   before L are the catch-up window (see [`crate::hub`]), applied
//!   idempotently, and exact from L on.
//! - A row whose needed column is absent from the WAL image (an unchanged
//!   TOASTed value) is dropped from the cache: a possible miss, never a leak.
//! - Policies reloaded at run time ([`Caches::adopt`]): a cache whose spec
//!   is unchanged keeps its WAL-maintained data and its exactness; a new one
//!   is read now and, like a restart's load, is exact only from the WAL
//!   insert position read after it ([`Caches::exact_from`]). Until the
//!   stream passes that position, the tables whose predicates read it are
//!   judged as in the catch-up window — per cache, not globally.
//!
//! # Memory
//!
//! All caches together stay within a byte budget ([`DEFAULT_BUDGET`],
//! `--policy-cache-budget`). When a load or a change would pass it, the
//! largest cache is dropped and marked *over budget* for good (until the
//! next load): the hub then has PostgreSQL evaluate the tables whose plans
//! read it (see [`crate::policy::fallback`]), and `walcast check` and
//! `/metrics` say so.

use std::collections::HashMap;

use super::compile::CacheSpec;
use super::predicate::{CacheId, ColType, Context, Scalar};
use crate::change::{Change, Datum, Op, RelationInfo, Row};
use crate::lsn::Lsn;

/// Default byte budget of all caches together: 1 GiB.
pub const DEFAULT_BUDGET: usize = 1 << 30;

/// When the caches were loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedAt {
    /// Transactions committing at or after this LSN are judged exactly.
    pub lsn: Lsn,
    /// Whether the load was the exact state at `lsn` (exported snapshot).
    pub exact: bool,
    /// Rows loaded, all caches together.
    pub rows: usize,
}

#[derive(Debug, Default, Clone)]
struct UserRows {
    rows: u32,
    null_group: u32,
    groups: HashMap<Scalar, u32>,
}

/// A row's `(group, user)`, typed (a uuid is 16 bytes to hash, not a
/// string, and a lookup allocates nothing).
type Pair = (Option<Scalar>, Scalar);

/// One cache's data.
#[derive(Debug, Default, Clone)]
pub struct GroupCache {
    rows: HashMap<Box<str>, Pair>,
    by_group: HashMap<Scalar, HashMap<Scalar, u32>>,
    by_user: HashMap<Scalar, UserRows>,
    bytes: usize,
}

impl GroupCache {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Approximate bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn insert(&mut self, key: Box<str>, group: Option<Scalar>, user: Scalar) {
        self.remove(&key);
        self.bytes += entry_bytes(&key, group.as_ref(), &user);
        let u = self.by_user.entry(user.clone()).or_default();
        u.rows += 1;
        match &group {
            Some(g) => {
                *u.groups.entry(g.clone()).or_default() += 1;
                *self.by_group.entry(g.clone()).or_default().entry(user.clone()).or_default() += 1;
            }
            None => u.null_group += 1,
        }
        self.rows.insert(key, (group, user));
    }

    fn remove(&mut self, key: &str) {
        let Some((key, (group, user))) = self.rows.remove_entry(key) else { return };
        self.bytes = self.bytes.saturating_sub(entry_bytes(&key, group.as_ref(), &user));
        if let Some(u) = self.by_user.get_mut(&user) {
            u.rows -= 1;
            match &group {
                Some(g) => {
                    if let Some(n) = u.groups.get_mut(g) {
                        *n -= 1;
                        if *n == 0 {
                            u.groups.remove(g);
                        }
                    }
                }
                None => u.null_group -= 1,
            }
            if u.rows == 0 {
                self.by_user.remove(&user);
            }
        }
        if let Some(g) = &group {
            if let Some(members) = self.by_group.get_mut(g) {
                if let Some(n) = members.get_mut(&user) {
                    *n -= 1;
                    if *n == 0 {
                        members.remove(&user);
                    }
                }
                if members.is_empty() {
                    self.by_group.remove(g);
                }
            }
        }
    }

    /// Whether `(group, user)` is held (`group == None`: whether `user` has
    /// any row).
    pub fn contains(&self, group: Option<&Scalar>, user: &Scalar) -> bool {
        match group {
            None => self.by_user.contains_key(user),
            Some(g) => self.by_user.get(user).is_some_and(|u| u.groups.contains_key(g)),
        }
    }

    /// `(has any row, has a row with a NULL group)` for `user`.
    pub fn user_rows(&self, user: &Scalar) -> (bool, bool) {
        self.by_user.get(user).map_or((false, false), |u| (u.rows > 0, u.null_group > 0))
    }

    /// Calls `f` with every user of `group`.
    pub fn for_each_member(&self, group: &Scalar, mut f: impl FnMut(&Scalar)) {
        if let Some(m) = self.by_group.get(group) {
            m.keys().for_each(&mut f);
        }
    }

    /// Users of `group` as text, sorted (tests and tools).
    pub fn members(&self, group: &Scalar) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each_member(group, |u| out.push(u.canonical()));
        out.sort();
        out
    }

    fn clear(&mut self) {
        *self = GroupCache::default();
    }

    /// Every row as `(key, group, user)`, in no particular order (for
    /// [`crate::scaleout::snapshot`]).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, Option<&Scalar>, &Scalar)> + '_ {
        self.rows.iter().map(|(key, (group, user))| (&**key, group.as_ref(), user))
    }
}

fn entry_bytes(key: &str, group: Option<&Scalar>, user: &Scalar) -> usize {
    // Three maps' entries, the boxed key and hash overhead, roughly; text
    // values count their bytes where they are stored.
    let text = |v: &Scalar| if let Scalar::Text(t) = v { t.len() } else { 0 };
    200 + key.len() + 3 * group.map_or(0, text) + 3 * text(user)
}

/// All caches of a compiled policy set.
#[derive(Debug, Default, Clone)]
pub struct Caches {
    specs: Vec<CacheSpec>,
    data: Vec<GroupCache>,
    by_table: HashMap<u32, Vec<CacheId>>,
    /// Per cache: transactions committing before this LSN may find it ahead
    /// of or behind the truth (it was read at run time, not in a snapshot).
    exact_from: Vec<Lsn>,
    /// Per cache: whether [`load`] read it (false: left for
    /// [`Caches::adopt`] to take over from the caches in force).
    loaded: Vec<bool>,
    /// Caches dropped for the budget (no longer maintained).
    over: Vec<bool>,
    budget: usize,
}

/// A row image seen through a cache spec's column order.
struct RowCtx<'a> {
    datums: Vec<&'a Datum>,
    claims: serde_json::Value,
}

impl Context for RowCtx<'_> {
    fn column(&self, index: usize) -> &Datum {
        self.datums.get(index).copied().unwrap_or(&Datum::Absent)
    }
    fn claims(&self) -> &serde_json::Value {
        &self.claims
    }
    fn member(&self, _: CacheId, _: Option<&Scalar>, _: &Scalar) -> bool {
        false
    }
    fn user_rows(&self, _: CacheId, _: &Scalar) -> (bool, bool) {
        (false, false)
    }
}

const ABSENT: Datum = Datum::Absent;

impl Caches {
    /// Empty caches for `specs`.
    pub fn new(specs: Vec<CacheSpec>) -> Caches {
        let mut by_table: HashMap<u32, Vec<CacheId>> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            by_table.entry(s.table).or_default().push(i);
        }
        let data = vec![GroupCache::default(); specs.len()];
        let n = specs.len();
        Caches {
            specs,
            data,
            by_table,
            exact_from: vec![Lsn::ZERO; n],
            loaded: vec![false; n],
            over: vec![false; n],
            budget: DEFAULT_BUDGET,
        }
    }

    /// Transactions committing before the returned LSN must not be judged
    /// with cache `id` (see the module doc).
    pub fn exact_from(&self, id: CacheId) -> Lsn {
        self.exact_from.get(id).copied().unwrap_or(Lsn::ZERO)
    }

    /// Caches that are not exact for a transaction committing at `commit`.
    pub fn inexact_at(&self, commit: Lsn) -> Vec<CacheId> {
        (0..self.specs.len()).filter(|&id| self.exact_from[id] > commit).collect()
    }

    /// Takes over the data of `old` (the caches in force) for every cache
    /// whose spec is unchanged — data the hub kept exact from the WAL — and
    /// keeps what [`load`] read for the others (exact from `at` unless the
    /// load was `exact`). Returns `(kept, loaded)` counts.
    pub fn adopt(&mut self, mut old: Caches, at: LoadedAt) -> (usize, usize) {
        let (mut kept, mut fresh) = (0, 0);
        for id in 0..self.specs.len() {
            match old.specs.iter().position(|s| *s == self.specs[id]) {
                Some(from) => {
                    self.data[id] = std::mem::take(&mut old.data[from]);
                    self.exact_from[id] = old.exact_from[from];
                    self.over[id] = old.over[from];
                    kept += 1;
                }
                None if self.loaded[id] => {
                    self.exact_from[id] = if at.exact { Lsn::ZERO } else { at.lsn };
                    fresh += 1;
                }
                // Neither read nor in force (cannot happen while the change
                // stage is the only one loading): never exact.
                None => self.exact_from[id] = Lsn(u64::MAX),
            }
        }
        // Kept and new together may pass the budget.
        if self.bytes() > self.budget {
            self.enforce_budget();
        }
        (kept, fresh)
    }

    /// The same caches within `budget` bytes.
    pub fn with_budget(mut self, budget: usize) -> Caches {
        self.budget = budget;
        self.enforce_budget();
        self
    }

    /// Whether cache `id` was dropped for the budget.
    pub fn is_over(&self, id: CacheId) -> bool {
        self.over.get(id).copied().unwrap_or(false)
    }

    /// Per cache: description, rows, bytes, over budget.
    pub fn summary(&self) -> Vec<(String, usize, usize, bool)> {
        self.specs
            .iter()
            .zip(&self.data)
            .zip(&self.over)
            .map(|((s, d), o)| (s.describe(), d.len(), d.bytes(), *o))
            .collect()
    }

    /// The byte budget.
    pub(crate) fn budget(&self) -> usize {
        self.budget
    }

    /// Cache `id`'s `(exact_from, loaded, over)` flags (for
    /// [`crate::scaleout::snapshot`]).
    pub(crate) fn flags(&self, id: CacheId) -> Option<(Lsn, bool, bool)> {
        Some((*self.exact_from.get(id)?, *self.loaded.get(id)?, *self.over.get(id)?))
    }

    /// Puts back cache `id` exactly as a snapshot of it holds it: its flags
    /// and its rows (no budget check: the snapshot was within it, or the
    /// cache is marked over). Returns false for an unknown `id`.
    pub(crate) fn restore(
        &mut self,
        id: CacheId,
        (exact_from, loaded, over): (Lsn, bool, bool),
        rows: impl IntoIterator<Item = (Box<str>, Option<Scalar>, Scalar)>,
    ) -> bool {
        let Some(data) = self.data.get_mut(id) else { return false };
        data.clear();
        for (key, group, user) in rows {
            data.insert(key, group, user);
        }
        self.exact_from[id] = exact_from;
        self.loaded[id] = loaded;
        self.over[id] = over;
        true
    }

    /// Sets the byte budget without enforcing it (a restored snapshot).
    pub(crate) fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
    }

    /// Drops the largest caches until all fit the budget.
    fn enforce_budget(&mut self) {
        while self.bytes() > self.budget {
            let Some((id, _)) = self.data.iter().enumerate().max_by_key(|(_, d)| d.bytes()) else { return };
            tracing::warn!(
                cache = %self.specs[id].describe(),
                bytes = self.data[id].bytes(),
                budget = self.budget,
                "membership cache over the budget; its tables are evaluated by the database from now on"
            );
            self.data[id].clear();
            self.over[id] = true;
        }
    }

    /// The specs, by id.
    pub fn specs(&self) -> &[CacheSpec] {
        &self.specs
    }

    /// One cache.
    pub fn get(&self, id: CacheId) -> Option<&GroupCache> {
        self.data.get(id)
    }

    /// Rows held, all caches.
    pub fn rows(&self) -> usize {
        self.data.iter().map(GroupCache::len).sum()
    }

    /// Approximate bytes held, all caches.
    pub fn bytes(&self) -> usize {
        self.data.iter().map(GroupCache::bytes).sum()
    }

    /// Whether changes to table `oid` feed a cache.
    pub fn follows(&self, oid: u32) -> bool {
        self.by_table.contains_key(&oid)
    }

    /// Applies one committed change (idempotent: re-applying the same change
    /// leaves the same state).
    pub fn apply(&mut self, change: &Change) {
        let Some(ids) = self.by_table.get(&change.relation.oid) else { return };
        for &id in ids {
            if self.over[id] {
                continue;
            }
            let spec = &self.specs[id];
            let cache = &mut self.data[id];
            if change.op == Op::Truncate {
                cache.clear();
                continue;
            }
            let map: Vec<Option<usize>> = spec.columns.iter().map(|c| change.relation.column_index(c)).collect();
            let old_key = change.old_record.as_ref().and_then(|r| row_key(spec, &change.relation, r));
            let new_key = change.record.as_ref().and_then(|r| row_key(spec, &change.relation, r));
            match change.op {
                Op::Delete => {
                    if let Some(k) = old_key {
                        cache.remove(&k);
                    }
                }
                Op::Insert | Op::Update => {
                    if let Some(k) = old_key.as_deref().or(new_key.as_deref()) {
                        cache.remove(k);
                    }
                    if let (Some(k), Some(row)) = (new_key, change.record.as_ref()) {
                        if let Some((group, user)) = pair(spec, &map, row) {
                            cache.insert(k, group, user);
                        }
                    }
                }
                Op::Truncate => {}
            }
        }
        if self.bytes() > self.budget {
            self.enforce_budget();
        }
    }

    /// Inserts a row read by [`load`]: `values` in the spec's column order
    /// (`None` = NULL), unread columns [`Datum::Absent`].
    fn load_row(&mut self, id: CacheId, datums: &[Datum]) {
        if self.over[id] {
            return;
        }
        let spec = &self.specs[id];
        let refs: Vec<&Datum> = datums.iter().collect();
        let Some(key) = key_of(spec, |name| spec.columns.iter().position(|c| c == name).map(|i| refs[i])) else {
            return;
        };
        let map: Vec<Option<usize>> = (0..spec.columns.len()).map(Some).collect();
        if let Some((group, user)) = pair(spec, &map, &Row(datums.to_vec())) {
            self.data[id].insert(key, group, user);
            if self.bytes() > self.budget {
                self.enforce_budget();
            }
        }
    }
}

fn key_of<'a>(spec: &CacheSpec, get: impl Fn(&str) -> Option<&'a Datum>) -> Option<Box<str>> {
    let mut key = String::new();
    for (i, k) in spec.key.iter().enumerate() {
        if i > 0 {
            key.push('\0');
        }
        match get(k)? {
            Datum::Text(t) => key.push_str(std::str::from_utf8(t).ok()?),
            Datum::Null => key.push('\u{1}'),
            Datum::Absent => return None,
        }
    }
    Some(key.into_boxed_str())
}

fn row_key(spec: &CacheSpec, relation: &RelationInfo, row: &Row) -> Option<Box<str>> {
    key_of(spec, |name| relation.column_index(name).and_then(|i| row.0.get(i)))
}

/// The row's `(group, user)` if it passes the filter.
fn pair(spec: &CacheSpec, map: &[Option<usize>], row: &Row) -> Option<Pair> {
    let datums: Vec<&Datum> = map.iter().map(|i| i.and_then(|i| row.0.get(i)).unwrap_or(&ABSENT)).collect();
    if let Some(filter) = &spec.filter {
        let ctx = RowCtx { datums: datums.clone(), claims: serde_json::Value::Null };
        if !filter.eval(&ctx).visible() {
            return None;
        }
    }
    // A value of the column's own type always parses; one that does not
    // (the column's type changed under the plan) is no membership.
    let value = |name: &str, ty: ColType| -> Result<Option<Scalar>, ()> {
        let i = spec.columns.iter().position(|c| c == name).ok_or(())?;
        match datums[i] {
            Datum::Null => Ok(None),
            Datum::Absent => Err(()),
            Datum::Text(t) => {
                let text = std::str::from_utf8(t).map_err(|_| ())?;
                Scalar::parse(ty, text).map(Some).map_err(|_| ())
            }
        }
    };
    let user = value(&spec.user.0, spec.user.1).ok()??;
    let group = match &spec.group {
        Some((g, ty)) => value(g, *ty).ok()?,
        None => None,
    };
    Some((group, user))
}

/// Loads every cache from the database (row security off: walcast must
/// see every row), except those whose spec is in `known` (the caches in
/// force, which [`Caches::adopt`] takes over). With `snapshot` the read
/// happens in that snapshot.
///
/// # Errors
/// SQL errors.
pub async fn load(
    client: &impl tokio_postgres::GenericClient,
    caches: &mut Caches,
    lsn: Option<Lsn>,
    known: &[CacheSpec],
) -> Result<LoadedAt, tokio_postgres::Error> {
    let ident = crate::replication::slot::quote_ident;
    client.batch_execute("SET LOCAL row_security = off").await?;
    let mut total = 0;
    for id in 0..caches.specs.len() {
        let spec = caches.specs[id].clone();
        if known.contains(&spec) {
            continue;
        }
        caches.loaded[id] = true;
        let mut wanted: Vec<usize> = Vec::new();
        let mut want = |name: &str| {
            if let Some(i) = spec.columns.iter().position(|c| c == name) {
                if !wanted.contains(&i) {
                    wanted.push(i);
                }
            }
        };
        spec.key.iter().for_each(|k| want(k));
        want(&spec.user.0);
        if let Some((g, _)) = &spec.group {
            want(g);
        }
        if let Some(f) = &spec.filter {
            let mut cols = Vec::new();
            f.for_each_column(&mut |i| cols.push(i));
            for i in cols {
                want(&spec.columns[i].clone());
            }
        }
        let (schema, table) = spec.table_name.split_once('.').unwrap_or(("public", &spec.table_name));
        let select: Vec<String> = wanted.iter().map(|&i| format!("{}::text", ident(&spec.columns[i]))).collect();
        let sql = format!("SELECT {} FROM {}.{}", select.join(", "), ident(schema), ident(table));
        caches.data[id].clear();
        // Streamed, so a table larger than the budget is never held whole.
        let rows = client.query_raw(&sql, std::iter::empty::<i32>()).await?;
        futures::pin_mut!(rows);
        while let Some(row) = futures::StreamExt::next(&mut rows).await {
            let row = row?;
            let mut datums = vec![Datum::Absent; spec.columns.len()];
            for (j, &i) in wanted.iter().enumerate() {
                let v: Option<String> = row.get(j);
                datums[i] = v.map_or(Datum::Null, |s| Datum::Text(bytes::Bytes::from(s)));
            }
            caches.load_row(id, &datums);
            if caches.over[id] {
                break;
            }
        }
        total += caches.data[id].len();
    }
    let (lsn, exact) = match lsn {
        Some(l) => (l, true),
        None => {
            let text: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0);
            (text.parse().unwrap_or(Lsn::ZERO), false)
        }
    };
    Ok(LoadedAt { lsn, exact, rows: total })
}

/// Lookups the compiled predicates make (see [`super::predicate::Context`]).
impl Caches {
    /// Whether `(group, user)` is in cache `id`.
    pub fn member(&self, id: CacheId, group: Option<&Scalar>, user: &Scalar) -> bool {
        self.data.get(id).is_some_and(|c| c.contains(group, user))
    }

    /// See [`GroupCache::user_rows`].
    pub fn user_rows(&self, id: CacheId, user: &Scalar) -> (bool, bool) {
        self.data.get(id).map_or((false, false), |c| c.user_rows(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::ColumnInfo;
    use crate::pgoutput::ReplicaIdentity;
    use crate::policy::predicate::{ColType, Expr, Operand, Scalar};
    use bytes::Bytes;
    use std::sync::Arc;

    fn spec(filter: Option<Expr>) -> CacheSpec {
        CacheSpec {
            table: 9,
            table_name: "public.team_members".into(),
            group: Some(("team_id".into(), ColType::Text)),
            user: ("user_id".into(), ColType::Text),
            filter,
            columns: vec!["id".into(), "team_id".into(), "user_id".into(), "accepted".into()],
            key: vec!["id".into()],
        }
    }

    fn relation() -> Arc<RelationInfo> {
        let col = |name: &str, oid: u32| ColumnInfo {
            name: name.into(),
            type_name: "x".into(),
            type_oid: oid,
            is_key: name == "id",
            kind: crate::change::value::kind_of(oid),
        };
        Arc::new(RelationInfo {
            oid: 9,
            schema: "public".into(),
            table: "team_members".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", 25), col("team_id", 2950), col("user_id", 2950), col("accepted", 16)],
        })
    }

    fn v(s: &str) -> Scalar {
        Scalar::Text(s.into())
    }

    fn t(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(id: &str, team: &str, user: &str, accepted: bool) -> Row {
        Row(vec![t(id), t(team), t(user), t(if accepted { "t" } else { "f" })])
    }

    fn key_only(id: &str) -> Row {
        Row(vec![t(id), Datum::Absent, Datum::Absent, Datum::Absent])
    }

    fn change(op: Op, record: Option<Row>, old_record: Option<Row>) -> Change {
        Change { relation: relation(), op, record, old_record, missing_toast: vec![] }
    }

    #[test]
    fn pairs_follow_rows_and_filters() {
        let accepted = Expr::Truth(Operand::Column { index: 3, ty: ColType::Bool, cast: None });
        let mut c = Caches::new(vec![spec(Some(accepted))]);
        c.apply(&change(Op::Insert, Some(row("1", "g1", "u1", true)), None));
        c.apply(&change(Op::Insert, Some(row("2", "g1", "u2", false)), None));
        assert!(c.member(0, Some(&v("g1")), &v("u1")));
        assert!(!c.member(0, Some(&v("g1")), &v("u2")), "filtered out");
        c.apply(&change(Op::Update, Some(row("2", "g1", "u2", true)), Some(key_only("2"))));
        assert!(c.member(0, Some(&v("g1")), &v("u2")));
        // Moved to another group, old row key-only.
        c.apply(&change(Op::Update, Some(row("1", "g2", "u1", true)), Some(key_only("1"))));
        assert!(!c.member(0, Some(&v("g1")), &v("u1")) && c.member(0, Some(&v("g2")), &v("u1")));
        assert_eq!(c.get(0).unwrap().members(&v("g1")), vec!["u2".to_owned()]);
        c.apply(&change(Op::Delete, None, Some(key_only("2"))));
        c.apply(&change(Op::Delete, None, Some(key_only("2"))));
        assert!(c.get(0).unwrap().members(&v("g1")).is_empty());
        assert_eq!(c.rows(), 1);
        c.apply(&change(Op::Truncate, None, None));
        assert_eq!(c.rows(), 0);
        assert_eq!(c.bytes(), 0);
        let _ = Scalar::Bool(true);
    }

    #[test]
    fn a_reload_keeps_unchanged_caches_and_times_new_ones() {
        let mut old = Caches::new(vec![spec(None)]);
        old.apply(&change(Op::Insert, Some(row("1", "g", "u", true)), None));
        // The reload: the same spec (not read again) and a new one (read).
        let mut other = spec(None);
        other.user = ("team_id".into(), ColType::Uuid);
        let mut new = Caches::new(vec![other.clone(), spec(None)]);
        new.loaded[0] = true;
        new.data[0].insert("k".into(), None, v("g"));
        let at = LoadedAt { lsn: Lsn(500), exact: false, rows: 1 };
        assert_eq!(new.adopt(old, at), (1, 1));
        assert!(new.member(1, Some(&v("g")), &v("u")), "the WAL-maintained data moved over");
        assert_eq!(new.exact_from(1), Lsn::ZERO, "kept: exact as before");
        assert_eq!(new.exact_from(0), Lsn(500), "new: exact from its load");
        assert_eq!(new.inexact_at(Lsn(499)), vec![0]);
        assert!(new.inexact_at(Lsn(500)).is_empty());
        // A cache neither read nor in force is never trusted.
        let mut orphan = Caches::new(vec![other]);
        orphan.adopt(Caches::default(), at);
        assert_eq!(orphan.inexact_at(Lsn(u64::MAX - 1)), vec![0]);
    }

    #[test]
    fn a_cache_past_the_budget_is_dropped_for_good() {
        let mut c = Caches::new(vec![spec(None)]).with_budget(2_000);
        for i in 0..5 {
            c.apply(&change(Op::Insert, Some(row(&i.to_string(), "g", &format!("u{i}"), true)), None));
        }
        assert!(!c.is_over(0) && c.rows() == 5, "{} bytes", c.bytes());
        for i in 5..50 {
            c.apply(&change(Op::Insert, Some(row(&i.to_string(), "g", &format!("u{i}"), true)), None));
        }
        assert!(c.is_over(0), "past 2,000 bytes");
        assert_eq!((c.rows(), c.bytes()), (0, 0), "its memory is given back");
        c.apply(&change(Op::Insert, Some(row("99", "g", "u", true)), None));
        assert_eq!(c.rows(), 0, "no longer maintained");
        assert!(c.summary()[0].3);
    }

    #[test]
    fn duplicate_pairs_are_counted_and_null_groups_tracked() {
        let mut c = Caches::new(vec![spec(None)]);
        c.apply(&change(Op::Insert, Some(row("1", "g", "u", true)), None));
        c.apply(&change(Op::Insert, Some(row("2", "g", "u", true)), None));
        c.apply(&change(Op::Delete, None, Some(key_only("1"))));
        assert!(c.member(0, Some(&v("g")), &v("u")), "row 2 still grants it");
        let mut null_group = row("3", "x", "u", true);
        null_group.0[1] = Datum::Null;
        c.apply(&change(Op::Insert, Some(null_group), None));
        assert_eq!(c.user_rows(0, &v("u")), (true, true));
        assert_eq!(c.user_rows(0, &v("v")), (false, false));
    }
}
