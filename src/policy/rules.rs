//! Policy rules: which subscribers may see a row, as a declarative mirror of
//! the SELECT policies in `sql/0004_row_level_security.sql`.
//!
//! Sits between the membership cache and the hub: for each committed change
//! the hub asks [`Rules::judge`] for the dealership of the old and new row,
//! then [`Judgment::event_for`] per candidate viewer gives the event that
//! viewer gets — the *visibility transition*:
//!
//! | old row visible | new row visible | event |
//! |---|---|---|
//! | no  | yes | INSERT (with `record`) |
//! | yes | yes | UPDATE |
//! | yes | no  | DELETE (with `old_record`) |
//! | no  | no  | nothing |
//!
//! Roles, as in Supabase: `service_role` sees every published row (BYPASSRLS);
//! `anon` sees nothing (no policy grants it SELECT); `authenticated` with a
//! `sub` sees a row of a ruled table when a member of the row's dealership;
//! any other role, and any table without a rule, is seen by nobody but
//! `service_role` — deny by default, like RLS with no policy.
//!
//! Invariant: both sides are judged with the memberships as of the change's
//! commit (the hub applies the transaction's membership changes first). An
//! old row whose dealership is unknown (a key-only old row under REPLICA
//! IDENTITY DEFAULT) counts as not visible: a missed DELETE, never a leak.
//! The differential test in `tests/policy_differential.rs` checks these rules
//! against PostgreSQL's own RLS.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::membership::{MembershipCache, MembershipTable};
use crate::change::{Change, Datum, Op, Row};

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
}

/// Who is looking, from the channel's JWT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Viewer {
    /// `service_role`: sees everything published.
    Service,
    /// `anon`: sees nothing.
    Anon,
    /// `authenticated` with this `sub`.
    User(Uuid),
    /// Any other role, or `authenticated` without a UUID `sub`: sees nothing.
    Other,
}

impl Viewer {
    /// From the JWT's `role` and `sub` claims.
    pub fn from_claims(role: &str, sub: Option<&str>) -> Viewer {
        match role {
            "service_role" => Viewer::Service,
            "anon" => Viewer::Anon,
            "authenticated" => sub.and_then(|s| Uuid::parse_str(s).ok()).map_or(Viewer::Other, Viewer::User),
            _ => Viewer::Other,
        }
    }
}

/// Who may see the rows of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Visibility {
    /// Members of the dealership named by `column` (a uuid column).
    DealershipMembers {
        /// The row's dealership column.
        column: String,
    },
    /// Only `service_role`.
    ServiceRoleOnly,
}

/// One table's rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Who sees its rows.
    pub visible_to: Visibility,
}

/// The policy configuration (defaults match sql/).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Where memberships live.
    pub memberships: MembershipTable,
    /// Per-table rules; tables without one are `service_role` only.
    pub tables: Vec<TableRule>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let members = |table: &str| TableRule {
            schema: "public".into(),
            table: table.into(),
            visible_to: Visibility::DealershipMembers { column: "dealership_id".into() },
        };
        PolicyConfig {
            memberships: MembershipTable::default(),
            tables: vec![members("orders"), members("dealer_memberships")],
        }
    }
}

/// The rules, indexed for lookups per change.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Few rules: a linear probe per change, no key to build. A later rule
    /// for the same table wins.
    tables: Vec<TableRule>,
    memberships: MembershipTable,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::new(PolicyConfig::default())
    }
}

/// What [`Rules::judge`] found out about one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgment {
    /// The change's own event (INSERT/UPDATE/DELETE).
    pub event: EventType,
    /// Whether authenticated users are judged by dealership (else only
    /// `service_role` sees the change).
    pub by_dealership: bool,
    /// Dealership of the old row (UPDATE, DELETE), when known.
    pub old: Option<Uuid>,
    /// Dealership of the new row (INSERT, UPDATE), when known.
    pub new: Option<Uuid>,
}

impl Judgment {
    /// The event `viewer` gets, judged with `cache`; `None` when it may see
    /// neither side of the change.
    pub fn event_for(&self, viewer: Viewer, cache: &MembershipCache) -> Option<EventType> {
        match viewer {
            Viewer::Service => Some(self.event),
            Viewer::Anon | Viewer::Other => None,
            Viewer::User(user) => {
                if !self.by_dealership {
                    return None;
                }
                let sees = |d: Option<Uuid>| d.is_some_and(|d| cache.is_member(user, d));
                self.transition(sees(self.old), sees(self.new))
            }
        }
    }

    /// The event for a viewer who sees the old row (`old`) and/or the new
    /// row (`new`).
    pub fn transition(&self, old: bool, new: bool) -> Option<EventType> {
        match (self.event, old, new) {
            (EventType::Insert, _, true) => Some(EventType::Insert),
            (EventType::Delete, true, _) => Some(EventType::Delete),
            (EventType::Update, true, true) => Some(EventType::Update),
            (EventType::Update, false, true) => Some(EventType::Insert),
            (EventType::Update, true, false) => Some(EventType::Delete),
            _ => None,
        }
    }

    /// The dealerships whose members are candidates (old and new, deduplicated).
    pub fn dealerships(&self) -> impl Iterator<Item = Uuid> {
        let new = if self.new == self.old { None } else { self.new };
        self.old.into_iter().chain(new)
    }
}

impl Rules {
    /// Indexes a configuration.
    pub fn new(config: PolicyConfig) -> Rules {
        Rules { tables: config.tables, memberships: config.memberships }
    }

    /// The membership table.
    pub fn memberships(&self) -> &MembershipTable {
        &self.memberships
    }

    /// The rule for `schema.table`.
    pub fn visibility(&self, schema: &str, table: &str) -> Option<&Visibility> {
        self.tables.iter().rfind(|r| r.schema == schema && r.table == table).map(|r| &r.visible_to)
    }

    /// Every configured rule.
    pub fn tables(&self) -> impl Iterator<Item = (&str, &str, &Visibility)> {
        self.tables.iter().map(|r| (r.schema.as_str(), r.table.as_str(), &r.visible_to))
    }

    /// Judges one change; `None` for changes no subscriber receives (TRUNCATE).
    pub fn judge(&self, change: &Change) -> Option<Judgment> {
        let event = EventType::of(change.op)?;
        let relation = &change.relation;
        let column = match self.visibility(&relation.schema, &relation.table) {
            Some(Visibility::DealershipMembers { column }) => relation.column_index(column),
            Some(Visibility::ServiceRoleOnly) | None => {
                return Some(Judgment { event, by_dealership: false, old: None, new: None })
            }
        };
        let Some(column) = column else {
            // The table lost its dealership column: nobody but service_role.
            return Some(Judgment { event, by_dealership: false, old: None, new: None });
        };
        let dealership = |row: Option<&Row>| {
            row.and_then(|r| r.0.get(column)).and_then(Datum::as_str).and_then(|s| Uuid::parse_str(s).ok())
        };
        Some(Judgment {
            event,
            by_dealership: true,
            old: if event == EventType::Insert { None } else { dealership(change.old_record.as_ref()) },
            new: if event == EventType::Delete { None } else { dealership(change.record.as_ref()) },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ColumnInfo, RelationInfo};
    use crate::pgoutput::ReplicaIdentity;
    use bytes::Bytes;
    use std::sync::Arc;

    fn relation(table: &str) -> Arc<RelationInfo> {
        let col = |name: &str| ColumnInfo {
            name: name.into(),
            type_name: "uuid".into(),
            type_oid: 2950,
            is_key: name == "id",
            kind: crate::change::value::kind_of(2950),
        };
        Arc::new(RelationInfo {
            oid: 7,
            schema: "public".into(),
            table: table.into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![col("id"), col("dealership_id")],
        })
    }

    fn row(d: Option<Uuid>) -> Row {
        let id = Datum::Text(Bytes::from(Uuid::new_v4().to_string()));
        Row(vec![id, d.map_or(Datum::Null, |d| Datum::Text(Bytes::from(d.to_string())))])
    }

    fn change(table: &str, op: Op, old: Option<Option<Uuid>>, new: Option<Option<Uuid>>) -> Change {
        Change { relation: relation(table), op, record: new.map(row), old_record: old.map(row), missing_toast: vec![] }
    }

    struct World {
        cache: MembershipCache,
        a: Uuid,
        b: Uuid,
        in_a: Uuid,
        in_b: Uuid,
        in_both: Uuid,
        outsider: Uuid,
    }

    fn world() -> World {
        let cache = MembershipCache::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (in_a, in_b, in_both, outsider) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let grant = |key: &str, user, dealership| {
            cache.grant(key, super::super::membership::Membership { user, dealership, role: None })
        };
        grant("1", in_a, a);
        grant("2", in_b, b);
        grant("3", in_both, a);
        grant("4", in_both, b);
        World { cache, a, b, in_a, in_b, in_both, outsider }
    }

    #[test]
    fn the_transition_table() {
        let w = world();
        let rules = Rules::default();
        let ev = |c: &Change, v: Viewer| rules.judge(c).and_then(|j| j.event_for(v, &w.cache));
        use EventType::*;
        use Viewer::*;
        type Case = (Change, Vec<(Viewer, Option<EventType>)>);
        let cases: Vec<Case> = vec![
            (
                change("orders", Op::Insert, None, Some(Some(w.a))),
                vec![(User(w.in_a), Some(Insert)), (User(w.in_b), None), (User(w.in_both), Some(Insert))],
            ),
            (
                change("orders", Op::Update, Some(Some(w.a)), Some(Some(w.a))),
                vec![(User(w.in_a), Some(Update)), (User(w.in_b), None)],
            ),
            (
                // Moved from a to b.
                change("orders", Op::Update, Some(Some(w.a)), Some(Some(w.b))),
                vec![
                    (User(w.in_a), Some(Delete)),
                    (User(w.in_b), Some(Insert)),
                    (User(w.in_both), Some(Update)),
                    (User(w.outsider), None),
                    (Service, Some(Update)),
                    (Anon, None),
                    (Other, None),
                ],
            ),
            (
                change("orders", Op::Delete, Some(Some(w.b)), None),
                vec![(User(w.in_a), None), (User(w.in_b), Some(Delete)), (Service, Some(Delete))],
            ),
            (
                // Old dealership unknown (key-only old row): never a DELETE to anyone.
                change("orders", Op::Update, Some(None), Some(Some(w.b))),
                vec![(User(w.in_a), None), (User(w.in_b), Some(Insert))],
            ),
            (
                change("dealer_memberships", Op::Insert, None, Some(Some(w.b))),
                vec![(User(w.in_b), Some(Insert)), (User(w.in_a), None)],
            ),
            (
                // No rule: service_role only.
                change("profiles", Op::Insert, None, Some(Some(w.a))),
                vec![(User(w.in_a), None), (Service, Some(Insert)), (Anon, None)],
            ),
            (change("orders", Op::Insert, None, Some(None)), vec![(User(w.in_a), None), (Service, Some(Insert))]),
        ];
        for (i, (c, expectations)) in cases.iter().enumerate() {
            for (viewer, want) in expectations {
                assert_eq!(ev(c, *viewer), *want, "case {i}: {viewer:?}");
            }
        }
        assert_eq!(rules.judge(&change("orders", Op::Truncate, None, None)), None);
    }

    #[test]
    fn viewers_from_claims() {
        let u = Uuid::new_v4();
        assert_eq!(Viewer::from_claims("authenticated", Some(&u.to_string())), Viewer::User(u));
        assert_eq!(Viewer::from_claims("authenticated", None), Viewer::Other);
        assert_eq!(Viewer::from_claims("authenticated", Some("x")), Viewer::Other);
        assert_eq!(Viewer::from_claims("service_role", None), Viewer::Service);
        assert_eq!(Viewer::from_claims("anon", None), Viewer::Anon);
        assert_eq!(Viewer::from_claims("postgres", None), Viewer::Other);
    }

    #[test]
    fn config_round_trips_and_rejects_unknown_keys() {
        let config = PolicyConfig::default();
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<PolicyConfig>(&json).unwrap(), config);
        assert!(serde_json::from_str::<PolicyConfig>(r#"{"tables":[],"extra":1}"#).is_err());
        let custom: PolicyConfig = serde_json::from_str(
            r#"{"tables":[{"schema":"public","table":"leads","visible_to":{"kind":"dealership_members","column":"org"}}]}"#,
        )
        .unwrap();
        assert_eq!(custom.memberships, MembershipTable::default());
        assert!(Rules::new(custom).visibility("public", "leads").is_some());
    }
}
