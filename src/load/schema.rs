//! The sql/ schema's catalog as the policy compiler reads it, for the tools
//! that run without PostgreSQL (`walcast replay --subscribers`): the
//! published tables, roles, privileges, policies and helper of
//! `sql/0002`–`sql/0006`, with the policy text `pg_get_expr` gives for them.
//!
//! Sits beside the load tools; the plans come out of the same compiler as
//! any live schema. `tests/policies.rs` checks that this matches what a
//! migrated database's catalog reads.

use std::collections::{BTreeSet, HashMap};

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::change::{Change, ColumnInfo, Datum, Op, RelationInfo, Row};
use crate::lsn::Lsn;
use crate::pgoutput::ReplicaIdentity;
use crate::policy::catalog::{Catalog, ColumnCat, FunctionCat, PolicyCat, Privileges, RoleCat, TableCat};
use crate::policy::plan::Loaded;
use crate::policy::{Caches, LoadedAt, PolicySet};

/// The SELECT policy text of `orders` and `dealer_memberships`, as
/// `pg_get_expr` prints it under an empty search_path.
pub const MEMBER_POLICY: &str = "(dealership_id IN ( SELECT private.member_dealership_ids() AS member_dealership_ids))";

/// The body of `private.member_dealership_ids` (sql/0004).
pub const MEMBER_HELPER_BODY: &str = "
    select m.dealership_id
    from public.dealer_memberships m
    where m.user_id = (select auth.uid())
      and (p_roles is null or m.role = any (p_roles))
";

fn column(name: &str, type_name: &str, primary_key: bool) -> ColumnCat {
    ColumnCat { name: name.into(), type_name: type_name.into(), sql_type: type_name.into(), primary_key }
}

/// The catalog of sql/, with `orders` and `dealer_memberships` at the given
/// oids (those of the capture being replayed).
pub fn dealership_catalog(orders_oid: u32, memberships_oid: u32) -> Catalog {
    let policy = |name: &str| PolicyCat {
        name: name.into(),
        permissive: true,
        roles: vec!["authenticated".into()],
        using: Some(MEMBER_POLICY.into()),
    };
    let orders = TableCat {
        oid: orders_oid,
        schema: "public".into(),
        name: "orders".into(),
        rls: true,
        force_rls: false,
        replica_identity: 'f',
        published: true,
        columns: vec![
            column("id", "uuid", true),
            column("dealership_id", "uuid", false),
            column("order_number", "text", false),
            column("type", "text", false),
            column("status", "text", false),
            column("customer_info", "jsonb", false),
            column("vehicle_info", "jsonb", false),
            column("service_details", "jsonb", false),
            column("metadata", "jsonb", false),
            column("created_by", "uuid", false),
            column("assigned_to", "uuid", false),
            column("created_at", "timestamptz", false),
            column("updated_at", "timestamptz", false),
        ],
        policies: vec![policy("orders_select_member")],
    };
    let memberships = TableCat {
        oid: memberships_oid,
        schema: "public".into(),
        name: "dealer_memberships".into(),
        rls: true,
        force_rls: false,
        replica_identity: 'f',
        published: true,
        columns: vec![
            column("id", "uuid", true),
            column("user_id", "uuid", false),
            column("dealership_id", "uuid", false),
            column("role", "text", false),
            column("permissions", "jsonb", false),
            column("invited_by", "uuid", false),
            column("joined_at", "timestamptz", false),
        ],
        policies: vec![policy("dealer_memberships_select_member")],
    };
    let role = |name: &str, superuser: bool, bypass_rls: bool| RoleCat {
        name: name.into(),
        superuser,
        bypass_rls,
        member_of: BTreeSet::from([name.to_owned()]),
        settable: true,
    };
    let roles = HashMap::from([
        ("anon".to_owned(), role("anon", false, false)),
        ("authenticated".to_owned(), role("authenticated", false, false)),
        ("service_role".to_owned(), role("service_role", false, true)),
        ("postgres".to_owned(), role("postgres", true, true)),
    ]);
    let mut privileges = HashMap::new();
    for t in [&orders, &memberships] {
        for r in ["anon", "authenticated", "service_role", "postgres"] {
            let all = true;
            privileges.insert(
                (r.to_owned(), t.oid),
                Privileges { table: all, columns: vec![all; t.columns.len()], owner: r == "postgres" },
            );
        }
    }
    let helper = FunctionCat {
        schema: "private".into(),
        name: "member_dealership_ids".into(),
        language: "sql".into(),
        security_definer: true,
        volatility: 's',
        returns_set: true,
        returns: "uuid".into(),
        arg_names: vec!["p_roles".into()],
        arg_defaults: vec!["NULL::text[]".into()],
        config: vec!["search_path=\"\"".into()],
        owner: "postgres".into(),
        body: MEMBER_HELPER_BODY.into(),
    };
    Catalog {
        tables: HashMap::from([(orders.oid, orders), (memberships.oid, memberships)]),
        roles,
        privileges,
        functions: HashMap::from([("private.member_dealership_ids".to_owned(), helper)]),
        current_user: "postgres".into(),
    }
}

/// A `dealer_memberships` row granting `user` a membership of `dealership`,
/// as the WAL would carry it.
pub fn membership_insert(oid: u32, key: u32, user: Uuid, dealership: Uuid) -> Change {
    let col = |name: &str, type_oid: u32| ColumnInfo {
        name: name.into(),
        type_name: "uuid".into(),
        type_oid,
        is_key: name == "id",
        kind: crate::change::value::kind_of(type_oid),
    };
    let relation = Arc::new(RelationInfo {
        oid,
        schema: "public".into(),
        table: "dealer_memberships".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![col("id", 2950), col("user_id", 2950), col("dealership_id", 2950), col("role", 25)],
    });
    let text = |s: String| Datum::Text(Bytes::from(s));
    let row = Row(vec![
        text(Uuid::from_u128(0xfeed_0000_0000_4000_8000_0000_0000_0000 | u128::from(key)).to_string()),
        text(user.to_string()),
        text(dealership.to_string()),
        text("user".into()),
    ]);
    Change { relation, op: Op::Insert, record: Some(row), old_record: None, missing_toast: vec![] }
}

/// sql/'s plans with `memberships` ((user, dealership) pairs) in the cache,
/// loaded exactly at LSN 0: what the hub gets from a live load, for tools
/// and benchmarks without PostgreSQL.
pub fn dealership_loaded(orders_oid: u32, memberships_oid: u32, memberships: &[(Uuid, Uuid)]) -> Loaded {
    let catalog = dealership_catalog(orders_oid, memberships_oid);
    let (policies, specs, _) = PolicySet::compile(&catalog);
    let mut caches = Caches::new(specs);
    for (i, (user, dealership)) in memberships.iter().enumerate() {
        caches.apply(&membership_insert(memberships_oid, i as u32, *user, *dealership));
    }
    let rows = caches.rows();
    Loaded {
        policies: Arc::new(policies),
        caches,
        at: LoadedAt { lsn: Lsn::ZERO, exact: true, rows },
        catalog: Some(Arc::new(catalog)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Access, PolicySet};

    #[test]
    fn the_sql_schema_compiles_to_membership_in_memory() {
        let (set, caches, wanted) = PolicySet::compile(&dealership_catalog(1, 2));
        assert!(wanted.tables.is_empty() && wanted.functions.is_empty(), "{wanted:?}");
        assert_eq!(caches.len(), 1, "one cache: dealer_memberships(user_id → dealership_id)");
        assert_eq!(caches[0].describe(), "public.dealer_memberships(user_id → dealership_id)");
        let orders = set.table(1).expect("orders");
        assert!(matches!(orders.role("authenticated").unwrap().access, Access::Rows(_)));
        assert!(matches!(orders.role("anon").unwrap().access, Access::Nothing(_)), "no policy for anon");
        assert!(matches!(orders.role("service_role").unwrap().access, Access::Everything));
    }
}
