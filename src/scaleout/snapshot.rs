//! The hub's policy state ⇄ bytes, and the source node's mirror of it: what
//! an edge node installs before it consumes the transaction stream.
//!
//! ```text
//!  source: StageEvent… ──Mirror::apply──▶ Mirror::state() ──encode──▶ bytes ──▶ NATS
//!  edge:   bytes ──decode──▶ PolicyState (plans compiled here, caches as the source had them)
//! ```
//!
//! Plans are not shipped: the snapshot carries the [`Catalog`] they were
//! compiled from, and [`decode`] compiles it again with the same compiler.
//! The membership caches are shipped row by row with their flags.
//!
//! # Invariants
//!
//! - A decoded state answers every membership question as the encoded one:
//!   same rows, flags (`exact_from`, loaded, over budget), budget and
//!   [`LoadedAt`].
//! - Caches are matched by their [`CacheSpec`]'s value, never by position
//!   (cache ids follow the compiler's walk over hash maps, which differs
//!   between processes); a compiled cache the snapshot lacks, or a snapshot
//!   cache nothing compiled wants, is an error — the two builds disagree,
//!   and guessing would judge rows with the wrong memberships.
//! - [`Mirror`] changes its state exactly as the hub's `Core` does for the
//!   same [`StageEvent`]s: membership changes are applied at Commit, a
//!   transaction the hub would skip as already handled is skipped, and a
//!   Reset drops the open transaction; so at every transaction boundary
//!   both hold the same caches.
//! - Decoding never panics on bad bytes: it returns a [`SnapshotError`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::change::{Change, TxEvent};
use crate::hub::StageEvent;
use crate::lsn::Lsn;
use crate::policy::caches::{Caches, LoadedAt};
use crate::policy::catalog::Catalog;
use crate::policy::compile::CacheSpec;
use crate::policy::plan::Loaded;
use crate::policy::predicate::Scalar;
use crate::policy::PolicySet;

/// The version of the encoding; [`decode`] refuses any other.
const FORMAT: u32 = 1;

/// Errors of policy snapshots (none is transient: the same bytes give the
/// same answer).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The plans were built without a catalog (by hand): nothing to send.
    #[error("the policy state has no catalog (plans built by hand cannot be sent to another node)")]
    NoCatalog,
    /// The state could not be encoded.
    #[error("encoding the policy state: {0}")]
    Encode(#[source] postcard::Error),
    /// The bytes are not a policy snapshot.
    #[error("the policy snapshot does not decode: {0}")]
    Decode(#[source] postcard::Error),
    /// Bytes follow the snapshot.
    #[error("{0} bytes after the policy snapshot")]
    TrailingBytes(usize),
    /// Written by another version of walcast.
    #[error("policy snapshot format {found}, this walcast reads format {FORMAT}: run the same version on every node")]
    Format {
        /// The snapshot's format.
        found: u32,
    },
    /// A cache the catalog compiles to is not in the snapshot.
    #[error(
        "the catalog compiles to cache {0}, which the snapshot lacks: the nodes compile differently (run the same \
         version on every node)"
    )]
    MissingCache(String),
    /// A cache of the snapshot is not one the catalog compiles to.
    #[error("the snapshot holds cache {0}, which the catalog does not compile to: the nodes compile differently")]
    ExtraCache(String),
    /// A row does not fit its cache's spec.
    #[error("cache {cache}: {reason}")]
    BadRow {
        /// The cache's description.
        cache: String,
        /// What is wrong.
        reason: String,
    },
}

impl SnapshotError {
    /// Whether retrying may help: never.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The hub's policy state at a transaction boundary: what an edge installs.
#[derive(Debug, Clone)]
pub struct PolicyState {
    /// Plans (with their catalog), caches, when they were loaded.
    pub loaded: Loaded,
    /// The catalog was read ahead of the stream (hub's `policies_ahead`).
    pub ahead: bool,
    /// End LSN of the last transaction the caches include (Lsn::ZERO: none).
    pub handled: Lsn,
}

/// [`LoadedAt`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct WireAt {
    lsn: u64,
    exact: bool,
    rows: u64,
}

/// One cache, encoding side (borrowed).
#[derive(Serialize)]
struct CacheOut<'a> {
    spec: &'a CacheSpec,
    exact_from: u64,
    loaded: bool,
    over: bool,
    rows: Vec<(&'a str, Option<&'a Scalar>, &'a Scalar)>,
}

/// The snapshot, encoding side.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    format: u32,
    catalog: &'a Catalog,
    at: WireAt,
    ahead: bool,
    handled: u64,
    budget: u64,
    caches: Vec<CacheOut<'a>>,
}

/// One cache, decoding side: fields in [`CacheOut`]'s order.
#[derive(Deserialize)]
struct CacheIn {
    spec: CacheSpec,
    exact_from: u64,
    loaded: bool,
    over: bool,
    rows: Vec<(Box<str>, Option<Scalar>, Scalar)>,
}

/// The snapshot, decoding side: fields in [`SnapshotOut`]'s order.
#[derive(Deserialize)]
struct SnapshotIn {
    format: u32,
    catalog: Catalog,
    at: WireAt,
    ahead: bool,
    handled: u64,
    budget: u64,
    caches: Vec<CacheIn>,
}

/// Encodes `state` (errors if `loaded.catalog` is None).
///
/// # Errors
/// [`SnapshotError::NoCatalog`], or an encoding failure.
pub fn encode(state: &PolicyState) -> Result<Vec<u8>, SnapshotError> {
    encode_parts(&state.loaded, state.ahead, state.handled)
}

fn encode_parts(loaded: &Loaded, ahead: bool, handled: Lsn) -> Result<Vec<u8>, SnapshotError> {
    let catalog = loaded.catalog.as_deref().ok_or(SnapshotError::NoCatalog)?;
    let caches = &loaded.caches;
    let mut out = Vec::with_capacity(caches.specs().len());
    for (id, spec) in caches.specs().iter().enumerate() {
        let (exact_from, cache_loaded, over) = caches.flags(id).unwrap_or((Lsn::ZERO, false, false));
        let rows = caches.get(id).map(|c| c.entries().collect()).unwrap_or_default();
        out.push(CacheOut { spec, exact_from: exact_from.0, loaded: cache_loaded, over, rows });
    }
    let snapshot = SnapshotOut {
        format: FORMAT,
        catalog,
        at: WireAt { lsn: loaded.at.lsn.0, exact: loaded.at.exact, rows: loaded.at.rows as u64 },
        ahead,
        handled: handled.0,
        budget: caches.budget() as u64,
        caches: out,
    };
    postcard::to_stdvec(&snapshot).map_err(SnapshotError::Encode)
}

/// Decodes: compiles the plans again from the catalog (`PolicySet::compile`), then fills
/// each compiled cache from the encoded one with the EQUAL `CacheSpec` (match by value,
/// not by index: HashMap iteration order may differ between processes); a compiled cache
/// with no encoded match is an error (the two processes disagree: refuse, never guess).
///
/// # Errors
/// Bytes that are not a snapshot of this format, caches that do not match
/// what the catalog compiles to, rows whose values do not fit their cache.
pub fn decode(bytes: &[u8]) -> Result<PolicyState, SnapshotError> {
    let snapshot: SnapshotIn = match postcard::take_from_bytes(bytes).map_err(SnapshotError::Decode)? {
        (snapshot, []) => snapshot,
        (_, rest) => return Err(SnapshotError::TrailingBytes(rest.len())),
    };
    if snapshot.format != FORMAT {
        return Err(SnapshotError::Format { found: snapshot.format });
    }
    // The load's last compile also leaves out what it still wanted (see
    // `policy::plan::load_except`): the same catalog gives the same plans.
    let (set, specs, _) = PolicySet::compile(&snapshot.catalog);
    let mut encoded: Vec<Option<CacheIn>> = snapshot.caches.into_iter().map(Some).collect();
    let mut caches = Caches::new(specs);
    caches.set_budget(usize::try_from(snapshot.budget).unwrap_or(usize::MAX));
    for id in 0..caches.specs().len() {
        let spec = &caches.specs()[id];
        let Some(cache) =
            encoded.iter_mut().find(|c| c.as_ref().is_some_and(|c| c.spec == *spec)).and_then(Option::take)
        else {
            return Err(SnapshotError::MissingCache(spec.describe()));
        };
        check_rows(spec, &cache.rows)?;
        caches.restore(id, (Lsn(cache.exact_from), cache.loaded, cache.over), cache.rows);
    }
    if let Some(extra) = encoded.into_iter().flatten().next() {
        return Err(SnapshotError::ExtraCache(extra.spec.describe()));
    }
    let at = LoadedAt {
        lsn: Lsn(snapshot.at.lsn),
        exact: snapshot.at.exact,
        rows: usize::try_from(snapshot.at.rows).unwrap_or(usize::MAX),
    };
    Ok(PolicyState {
        loaded: Loaded { policies: Arc::new(set), caches, at, catalog: Some(Arc::new(snapshot.catalog)) },
        ahead: snapshot.ahead,
        handled: Lsn(snapshot.handled),
    })
}

/// Refuses rows whose values are not of the spec's types (the cache's
/// lookups compare typed values: a mistyped one would never match) or
/// whose group is missing or present against the spec.
fn check_rows(spec: &CacheSpec, rows: &[(Box<str>, Option<Scalar>, Scalar)]) -> Result<(), SnapshotError> {
    let bad = |reason: String| SnapshotError::BadRow { cache: spec.describe(), reason };
    for (key, group, user) in rows {
        if user.ty() != spec.user.1 {
            return Err(bad(format!(
                "row {key:?}: a {} user where the spec has {}",
                user.ty().as_str(),
                spec.user.1.as_str()
            )));
        }
        match (group, &spec.group) {
            (Some(g), Some((_, ty))) if g.ty() != *ty => {
                return Err(bad(format!("row {key:?}: a {} group where the spec has {}", g.ty().as_str(), ty.as_str())))
            }
            (Some(_), None) => return Err(bad(format!("row {key:?} has a group; the spec has none"))),
            _ => {}
        }
    }
    Ok(())
}

/// The source's copy of the hub's policy state, kept from the same StageEvents the hub gets.
#[derive(Debug, Default)]
pub struct Mirror {
    /// The plans and caches in force (`None` before the first policies).
    loaded: Option<Loaded>,
    /// The hub's `policies_ahead`.
    ahead: bool,
    /// End LSN of the last transaction applied.
    handled: Lsn,
    /// The open transaction's changes to followed tables (applied at its
    /// Commit, as the hub does).
    open: Option<Vec<Change>>,
    /// The open transaction was handled already (the hub skips it).
    skipping: bool,
}

impl Mirror {
    /// A mirror with no policies yet.
    pub fn new() -> Mirror {
        Mirror::default()
    }

    /// Applies one event exactly as the hub does to its policy state:
    /// `Policies` installs (the hub keeps its `ahead` flag), `PolicyUpdate`
    /// adopts the caches in force ([`Caches::adopt`]) and installs with its
    /// `ahead`, `Reset` drops the open transaction, changes to followed
    /// tables are applied at their Commit, which sets `handled`; a
    /// transaction committed before `handled` is skipped whole.
    pub fn apply(&mut self, event: &StageEvent) {
        match event {
            StageEvent::Policies(loaded) => self.loaded = Some((**loaded).clone()),
            StageEvent::PolicyUpdate { loaded, ahead } => {
                let mut loaded = (**loaded).clone();
                let old = self.loaded.take().map(|l| l.caches).unwrap_or_default();
                loaded.caches.adopt(old, loaded.at);
                self.loaded = Some(loaded);
                self.ahead = *ahead;
            }
            StageEvent::Restore { loaded, ahead, handled } => {
                self.loaded = Some((**loaded).clone());
                self.ahead = *ahead;
                self.handled = self.handled.max(*handled);
                self.open = None;
                self.skipping = false;
            }
            StageEvent::Reset => {
                self.open = None;
                self.skipping = false;
            }
            StageEvent::CloseAll(_) => {}
            StageEvent::Tx(TxEvent::Begin(begin)) => {
                self.skipping = begin.commit_lsn < self.handled;
                self.open = if self.skipping { None } else { Some(Vec::new()) };
            }
            StageEvent::Tx(TxEvent::Change(change)) => {
                if self.skipping {
                    return;
                }
                let follows = self.loaded.as_ref().is_some_and(|l| l.caches.follows(change.relation.oid));
                if let (Some(open), true) = (self.open.as_mut(), follows) {
                    open.push(change.clone());
                }
            }
            StageEvent::Tx(TxEvent::Message { .. }) => {}
            StageEvent::Tx(TxEvent::Commit(info)) => {
                if self.skipping {
                    self.skipping = false;
                    return;
                }
                let Some(changes) = self.open.take() else { return };
                if let Some(loaded) = self.loaded.as_mut() {
                    for change in &changes {
                        if loaded.caches.follows(change.relation.oid) {
                            loaded.caches.apply(change);
                        }
                    }
                }
                self.handled = info.end_lsn;
            }
        }
    }

    /// The state now (None before the first Policies): as of the last
    /// transaction boundary (an open transaction's changes are not in it).
    pub fn state(&self) -> Option<PolicyState> {
        let loaded = self.loaded.clone()?;
        Some(PolicyState { loaded, ahead: self.ahead, handled: self.handled })
    }

    /// [`encode`] of [`Mirror::state`] without copying the caches (`None`
    /// before the first Policies).
    ///
    /// # Errors
    /// As [`encode`].
    pub fn encode(&self) -> Option<Result<Vec<u8>, SnapshotError>> {
        let loaded = self.loaded.as_ref()?;
        Some(encode_parts(loaded, self.ahead, self.handled))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use uuid::Uuid;

    use super::*;
    use crate::change::{ColumnInfo, Datum, Op, RelationInfo, Row, TxBegin, TxInfo};
    use crate::load::schema::{dealership_catalog, membership_insert};
    use crate::pgoutput::{PgTimestamp, ReplicaIdentity};
    use crate::policy::catalog::{ColumnCat, PolicyCat, Privileges, TableCat};
    use crate::policy::predicate::CacheId;

    const ORDERS: u32 = 16_400;
    const MEMBERSHIPS: u32 = 16_401;
    const PROJECTS: u32 = 16_402;
    const TEAM_MEMBERS: u32 = 16_403;

    /// The dealership schema plus `projects`, visible to the accepted
    /// members of its team: two caches, one with a filter.
    fn catalog() -> Catalog {
        let mut cat = dealership_catalog(ORDERS, MEMBERSHIPS);
        let column = |name: &str, type_name: &str, primary_key: bool| ColumnCat {
            name: name.into(),
            type_name: type_name.into(),
            sql_type: type_name.into(),
            primary_key,
        };
        let projects = TableCat {
            oid: PROJECTS,
            schema: "public".into(),
            name: "projects".into(),
            rls: true,
            force_rls: false,
            replica_identity: 'd',
            published: true,
            columns: vec![column("id", "int8", true), column("team_id", "int8", false), column("name", "text", false)],
            policies: vec![PolicyCat {
                name: "projects_select_team".into(),
                permissive: true,
                roles: vec!["authenticated".into()],
                using: Some(
                    "(team_id IN ( SELECT tm.team_id FROM public.team_members tm WHERE ((tm.user_id = auth.uid()) \
                     AND tm.accepted)))"
                        .into(),
                ),
            }],
        };
        let team_members = TableCat {
            oid: TEAM_MEMBERS,
            schema: "public".into(),
            name: "team_members".into(),
            rls: false,
            force_rls: false,
            replica_identity: 'd',
            published: true,
            columns: vec![
                column("id", "int8", true),
                column("team_id", "int8", false),
                column("user_id", "uuid", false),
                column("accepted", "bool", false),
            ],
            policies: vec![],
        };
        for t in [&projects, &team_members] {
            for r in ["anon", "authenticated", "service_role", "postgres"] {
                cat.privileges.insert(
                    (r.to_owned(), t.oid),
                    Privileges { table: true, columns: vec![true; t.columns.len()], owner: r == "postgres" },
                );
            }
        }
        cat.tables.insert(PROJECTS, projects);
        cat.tables.insert(TEAM_MEMBERS, team_members);
        cat
    }

    fn user(i: u32) -> Uuid {
        Uuid::from_u128(0xaaaa_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
    }

    fn dealership(i: u32) -> Uuid {
        Uuid::from_u128(0xdddd_0000_0000_4000_8000_0000_0000_0000 | u128::from(i))
    }

    fn team_members() -> Arc<RelationInfo> {
        let col = |name: &str, type_oid: u32| ColumnInfo {
            name: name.into(),
            type_name: "x".into(),
            type_oid,
            is_key: name == "id",
            kind: crate::change::value::kind_of(type_oid),
        };
        Arc::new(RelationInfo {
            oid: TEAM_MEMBERS,
            schema: "public".into(),
            table: "team_members".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col("id", 20), col("team_id", 20), col("user_id", 2950), col("accepted", 16)],
        })
    }

    fn team_insert(key: u32, team: u32, user: Uuid, accepted: bool) -> Change {
        let t = |s: String| Datum::Text(Bytes::from(s));
        Change {
            relation: team_members(),
            op: Op::Insert,
            record: Some(Row(vec![
                t(key.to_string()),
                t(team.to_string()),
                t(user.to_string()),
                t(if accepted { "t" } else { "f" }.into()),
            ])),
            old_record: None,
            missing_toast: vec![],
        }
    }

    fn delete_of(insert: &Change) -> Change {
        Change { op: Op::Delete, old_record: insert.record.clone(), record: None, ..insert.clone() }
    }

    /// The membership changes of the test, in order.
    fn memberships() -> Vec<Change> {
        let mut out = Vec::new();
        for i in 0..300 {
            out.push(membership_insert(MEMBERSHIPS, i, user(i % 40), dealership(i % 7)));
        }
        for i in 0..200 {
            out.push(team_insert(i, i % 9, user(i % 50), i % 3 != 0));
        }
        out
    }

    fn loaded(at: LoadedAt) -> Loaded {
        let cat = catalog();
        let (set, specs, wanted) = PolicySet::compile(&cat);
        assert!(wanted.tables.is_empty() && wanted.functions.is_empty(), "{wanted:?}");
        Loaded { policies: Arc::new(set), caches: Caches::new(specs), at, catalog: Some(Arc::new(cat)) }
    }

    fn id_of(caches: &Caches, spec: &CacheSpec) -> CacheId {
        caches.specs().iter().position(|s| s == spec).expect("the same spec")
    }

    /// Every question a plan may ask of the caches, answered the same.
    fn assert_same(a: &PolicyState, b: &PolicyState) {
        let (ca, cb) = (&a.loaded.caches, &b.loaded.caches);
        assert_eq!(a.loaded.policies.describe(ca), b.loaded.policies.describe(cb));
        let mut sa = ca.summary();
        let mut sb = cb.summary();
        sa.sort_by(|x, y| x.0.cmp(&y.0));
        sb.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(sa, sb);
        assert_eq!((a.loaded.at, a.ahead, a.handled), (b.loaded.at, b.ahead, b.handled));
        assert_eq!(a.loaded.catalog, b.loaded.catalog);
        assert_eq!(ca.budget(), cb.budget());
        assert_eq!(ca.specs().len(), cb.specs().len());
        for (ia, spec) in ca.specs().iter().enumerate() {
            let ib = id_of(cb, spec);
            assert_eq!(ca.flags(ia), cb.flags(ib), "{}", spec.describe());
            let mut rows: Vec<_> = ca.get(ia).unwrap().entries().collect();
            let mut other: Vec<_> = cb.get(ib).unwrap().entries().collect();
            rows.sort_by_key(|r| r.0.to_owned());
            other.sort_by_key(|r| r.0.to_owned());
            assert_eq!(rows, other);
            for (_, group, user) in &rows {
                assert!(cb.member(ib, *group, user) && cb.member(ib, None, user));
                assert_eq!(ca.user_rows(ia, user), cb.user_rows(ib, user));
            }
            // Absent pairs: every user with every group of the other users.
            for (_, group, _) in &rows {
                for u in 0..60 {
                    let u = Scalar::Uuid(user(u));
                    assert_eq!(ca.member(ia, *group, &u), cb.member(ib, *group, &u));
                }
            }
            assert!(!cb.member(ib, None, &Scalar::Uuid(Uuid::nil())));
        }
    }

    fn filled() -> PolicyState {
        let mut l = loaded(LoadedAt { lsn: Lsn(0x16_0000), exact: false, rows: 7 });
        for c in memberships() {
            l.caches.apply(&c);
        }
        PolicyState { loaded: l, ahead: true, handled: Lsn(0x17_0042) }
    }

    #[test]
    fn a_state_survives_encode_and_decode() {
        let state = filled();
        assert_eq!(state.loaded.caches.specs().len(), 2, "{:?}", state.loaded.caches.summary());
        assert!(state.loaded.caches.rows() > 200, "{}", state.loaded.caches.rows());
        let bytes = encode(&state).unwrap();
        let back = decode(&bytes).unwrap();
        assert_same(&state, &back);
        // And again, from the decoded one.
        assert_eq!(decode(&encode(&back).unwrap()).unwrap().loaded.caches.rows(), state.loaded.caches.rows());
    }

    #[test]
    fn flags_and_budget_survive() {
        let mut state = filled();
        let team = state.loaded.caches.specs().iter().position(|s| s.table == TEAM_MEMBERS).unwrap();
        let rows: Vec<_> = state
            .loaded
            .caches
            .get(team)
            .unwrap()
            .entries()
            .map(|(k, g, u)| (Box::from(k), g.cloned(), u.clone()))
            .collect();
        state.loaded.caches.restore(team, (Lsn(99), true, false), rows);
        let other = 1 - team;
        state.loaded.caches.restore(other, (Lsn(u64::MAX), false, true), Vec::new());
        state.loaded.caches.set_budget(123_456_789);
        let back = decode(&encode(&state).unwrap()).unwrap();
        assert_same(&state, &back);
    }

    #[test]
    fn plans_without_a_catalog_are_not_encoded() {
        let mut state = filled();
        state.loaded.catalog = None;
        assert!(matches!(encode(&state), Err(SnapshotError::NoCatalog)));
    }

    #[test]
    fn garbage_and_truncated_bytes_are_errors() {
        let bytes = encode(&filled()).unwrap();
        for len in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
            assert!(decode(&bytes[..len]).is_err(), "{len} bytes");
        }
        let mut state = 3u64;
        for round in 0..200 {
            let mut b = bytes.clone();
            for _ in 0..1 + round % 5 {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let i = (state >> 33) as usize % b.len();
                b[i] ^= (state >> 13) as u8 | 1;
            }
            let _ = decode(&b);
            let junk: Vec<u8> = (0..round).map(|i| ((i as u64).wrapping_mul(state) >> 7) as u8).collect();
            let _ = decode(&junk);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(SnapshotError::TrailingBytes(1))));
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(matches!(decode(&other), Err(SnapshotError::Format { found: 9 })));
    }

    #[test]
    fn a_cache_the_snapshot_lacks_is_refused() {
        // The source compiled without the `projects` policy; this side's
        // catalog would compile `team_members` too.
        let state = filled();
        let mut without = state.clone();
        let team = without.loaded.caches.specs().iter().position(|s| s.table == TEAM_MEMBERS).unwrap();
        let specs: Vec<CacheSpec> = without
            .loaded
            .caches
            .specs()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != team)
            .map(|(_, s)| s.clone())
            .collect();
        without.loaded.caches = Caches::new(specs);
        let err = decode(&encode(&without).unwrap()).unwrap_err();
        assert!(matches!(&err, SnapshotError::MissingCache(d) if d.contains("team_members")), "{err}");

        // And a snapshot cache the catalog does not compile to.
        let mut extra = state;
        let mut specs = extra.loaded.caches.specs().to_vec();
        let mut odd = specs[0].clone();
        odd.table_name = "public.elsewhere".into();
        specs.push(odd);
        extra.loaded.caches = Caches::new(specs);
        let err = decode(&encode(&extra).unwrap()).unwrap_err();
        assert!(matches!(&err, SnapshotError::ExtraCache(d) if d.contains("elsewhere")), "{err}");
    }

    fn begin(lsn: u64) -> StageEvent {
        StageEvent::Tx(TxEvent::Begin(TxBegin {
            xid: lsn as u32,
            commit_lsn: Lsn(lsn),
            commit_timestamp: PgTimestamp(0),
        }))
    }

    fn commit(lsn: u64) -> StageEvent {
        StageEvent::Tx(TxEvent::Commit(TxInfo {
            xid: lsn as u32,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(lsn + 8),
            commit_timestamp: PgTimestamp(0),
        }))
    }

    fn change(c: &Change) -> StageEvent {
        StageEvent::Tx(TxEvent::Change(c.clone()))
    }

    #[test]
    fn a_mirror_follows_the_stage_events() {
        let at = LoadedAt { lsn: Lsn(100), exact: true, rows: 0 };
        let changes = memberships();
        let mut mirror = Mirror::new();
        assert!(mirror.state().is_none() && mirror.encode().is_none());
        // Changes before any policies change nothing.
        mirror.apply(&begin(50));
        mirror.apply(&change(&changes[0]));
        mirror.apply(&commit(50));
        mirror.apply(&StageEvent::Policies(Box::new(loaded(at))));
        let state = mirror.state().unwrap();
        assert_eq!((state.loaded.caches.rows(), state.ahead, state.handled), (0, false, Lsn(58)));

        // Inserts over three transactions; a Message and an unfollowed table in between.
        let orders = Change {
            relation: Arc::new(RelationInfo { oid: ORDERS, ..(*changes[0].relation).clone() }),
            ..changes[0].clone()
        };
        for (n, part) in changes.chunks(200).enumerate() {
            let lsn = 1_000 + n as u64 * 100;
            mirror.apply(&begin(lsn));
            part.iter().for_each(|c| mirror.apply(&change(c)));
            mirror.apply(&change(&orders));
            mirror.apply(&StageEvent::Tx(TxEvent::Message {
                prefix: "walcast".into(),
                content: Bytes::new(),
                lsn: Lsn(lsn),
            }));
            // Mid-transaction: the state is the last boundary's.
            assert_eq!(mirror.state().unwrap().handled, if n == 0 { Lsn(58) } else { Lsn(lsn - 92) });
            mirror.apply(&commit(lsn));
        }
        // Deletes of some memberships.
        mirror.apply(&begin(2_000));
        for c in changes.iter().step_by(5) {
            mirror.apply(&change(&delete_of(c)));
        }
        mirror.apply(&commit(2_000));
        // A transaction cut by a Reset is not applied; one already handled is skipped.
        mirror.apply(&begin(2_100));
        mirror.apply(&change(&delete_of(&changes[1])));
        mirror.apply(&StageEvent::Reset);
        mirror.apply(&commit(2_100));
        mirror.apply(&begin(1_500));
        mirror.apply(&change(&delete_of(&changes[2])));
        mirror.apply(&commit(1_500));
        // A policy update: both specs unchanged, so the data is kept.
        let update_at = LoadedAt { lsn: Lsn(3_000), exact: false, rows: 0 };
        mirror.apply(&StageEvent::PolicyUpdate { loaded: Box::new(loaded(update_at)), ahead: true });

        let mut expected = loaded(at);
        for c in &changes {
            expected.caches.apply(c);
        }
        for c in changes.iter().step_by(5) {
            expected.caches.apply(&delete_of(c));
        }
        let mut updated = loaded(update_at);
        updated.caches.adopt(expected.caches, update_at);
        let expected = PolicyState { loaded: updated, ahead: true, handled: Lsn(2_008) };
        let state = mirror.state().unwrap();
        assert_same(&expected, &state);
        assert!(state.loaded.caches.rows() < changes.len() && state.loaded.caches.rows() > 300);
        let id = state.loaded.caches.specs().iter().position(|s| s.table == MEMBERSHIPS).unwrap();
        assert!(state.loaded.caches.member(id, Some(&Scalar::Uuid(dealership(1))), &Scalar::Uuid(user(1))));
        // The mirror's own encoding is the state's.
        assert_same(&state, &decode(&mirror.encode().unwrap().unwrap()).unwrap());
    }
}
