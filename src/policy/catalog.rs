//! What PostgreSQL enforces, read from its catalogs: the published tables
//! with their row level security flags, SELECT policies, columns and
//! replica identity; the roles (superuser, BYPASSRLS, memberships); table
//! and column SELECT privileges per role; and the SQL functions policies
//! call.
//!
//! Sits at the bottom of the policy layer: [`load`] is the only I/O, and its
//! result is plain data [`super::compile`] turns into plans. Expressions
//! are read with `pg_get_expr` under an empty `search_path`, so every name
//! in them is schema-qualified and unambiguous (rls-policies.md §2.1).
//!
//! Invariant: a [`Catalog`] is one consistent read (one transaction, in the
//! slot's exported snapshot when there is one).

use std::collections::{BTreeSet, HashMap};

use tokio_postgres::GenericClient;

/// One column.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ColumnCat {
    /// Name.
    pub name: String,
    /// `pg_type.typname`.
    pub type_name: String,
    /// The type as SQL spells it (`format_type`: `text[]`, `numeric(10,2)`).
    pub sql_type: String,
    /// Part of the primary key.
    pub primary_key: bool,
}

/// One SELECT (or ALL) policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyCat {
    /// `polname`.
    pub name: String,
    /// Permissive (OR-ed) or restrictive (AND-ed).
    pub permissive: bool,
    /// Roles it applies to; empty = PUBLIC.
    pub roles: Vec<String>,
    /// Its `USING` expression (`None`: no USING, which for SELECT is `true`
    /// only via WITH CHECK-less ALL policies — PostgreSQL treats a missing
    /// USING as the WITH CHECK's; walcast reads it as given).
    pub using: Option<String>,
}

/// One table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableCat {
    /// `pg_class.oid`.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `relrowsecurity`.
    pub rls: bool,
    /// `relforcerowsecurity`.
    pub force_rls: bool,
    /// `relreplident`: `d`, `f`, `i` or `n`.
    pub replica_identity: char,
    /// In the publication.
    pub published: bool,
    /// Columns, in attribute order (dropped ones left out).
    pub columns: Vec<ColumnCat>,
    /// SELECT and ALL policies, by name.
    pub policies: Vec<PolicyCat>,
}

impl TableCat {
    /// `schema.name`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Index of column `name`.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One role.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleCat {
    /// Name.
    pub name: String,
    /// `rolsuper`.
    pub superuser: bool,
    /// `rolbypassrls`.
    pub bypass_rls: bool,
    /// Roles it is a member of (transitively, itself included).
    pub member_of: BTreeSet<String>,
    /// Whether walcast's own role may `SET ROLE` to it.
    pub settable: bool,
}

/// One role's rights on one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Privileges {
    /// SELECT on the table (all columns).
    pub table: bool,
    /// SELECT per column, in [`TableCat::columns`] order.
    pub columns: Vec<bool>,
    /// The role has the owner's privileges (owners bypass RLS unless forced).
    pub owner: bool,
}

/// One SQL or PL/pgSQL function a policy may call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionCat {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `sql`, `plpgsql`, `c`, `internal`, ….
    pub language: String,
    /// SECURITY DEFINER.
    pub security_definer: bool,
    /// `i`, `s` or `v`.
    pub volatility: char,
    /// Returns a set.
    pub returns_set: bool,
    /// Return type name.
    pub returns: String,
    /// Argument names (empty strings for unnamed ones).
    pub arg_names: Vec<String>,
    /// Argument defaults, deparsed, for the trailing arguments.
    pub arg_defaults: Vec<String>,
    /// `proconfig` (e.g. `search_path=""`).
    pub config: Vec<String>,
    /// Owner role.
    pub owner: String,
    /// The body: `prosrc`, or the SQL-standard body deparsed.
    pub body: String,
}

/// Everything [`super::compile`] needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Catalog {
    /// Published tables and the tables their policies read, by oid.
    pub tables: HashMap<u32, TableCat>,
    /// Roles by name (`pg_*` left out).
    pub roles: HashMap<String, RoleCat>,
    /// (role, table oid) → rights.
    pub privileges: HashMap<(String, u32), Privileges>,
    /// Functions by `schema.name` (overloads: the first read).
    pub functions: HashMap<String, FunctionCat>,
    /// The role walcast connects as.
    pub current_user: String,
}

impl Catalog {
    /// The table `schema.name`.
    pub fn table(&self, schema: &str, name: &str) -> Option<&TableCat> {
        self.tables.values().find(|t| t.schema == schema && t.name == name)
    }

    /// Published tables, sorted by name.
    pub fn published(&self) -> Vec<&TableCat> {
        let mut out: Vec<&TableCat> = self.tables.values().filter(|t| t.published).collect();
        out.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        out
    }
}

/// Tables of the `realtime` schema are never published for Postgres
/// Changes, whatever the publication holds: `realtime.messages` carries
/// Broadcast from Database (see [`crate::realtime::messages`]).
const TABLES_SQL: &str = "
SELECT c.oid, n.nspname::text, c.relname::text, c.relrowsecurity, c.relforcerowsecurity, c.relreplident::text,
       n.nspname <> 'realtime' AND EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt
               WHERE pt.pubname = ANY ($2) AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND (c.oid = ANY ($1) OR n.nspname <> 'realtime' AND EXISTS (
    SELECT 1 FROM pg_catalog.pg_publication_tables pt
    WHERE pt.pubname = ANY ($2) AND pt.schemaname = n.nspname AND pt.tablename = c.relname))";

const COLUMNS_SQL: &str = "
SELECT a.attrelid, a.attname::text, t.typname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
       EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid AND i.indisprimary
               AND a.attnum = ANY (i.indkey))
FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = ANY ($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum";

const POLICIES_SQL: &str = "
SELECT p.polrelid, p.polname::text, p.polpermissive,
       ARRAY(SELECT r.rolname::text FROM pg_catalog.pg_roles r WHERE r.oid = ANY (p.polroles) ORDER BY 1),
       pg_catalog.pg_get_expr(p.polqual, p.polrelid)
FROM pg_catalog.pg_policy p
WHERE p.polrelid = ANY ($1) AND p.polcmd IN ('r', '*')
ORDER BY p.polrelid, p.polname";

const ROLES_SQL: &str = "
SELECT r.rolname::text, r.rolsuper, r.rolbypassrls,
       ARRAY(SELECT b.rolname::text FROM pg_catalog.pg_roles b
             WHERE b.rolname !~ '^pg_' AND pg_catalog.pg_has_role(r.oid, b.oid, 'USAGE')),
       pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')
FROM pg_catalog.pg_roles r
WHERE r.rolname !~ '^pg_'";

const PRIVILEGES_SQL: &str = "
SELECT r.rolname::text, c.oid,
       pg_catalog.has_table_privilege(r.oid, c.oid, 'SELECT'),
       ARRAY(SELECT pg_catalog.has_column_privilege(r.oid, c.oid, a.attnum, 'SELECT')
             FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE')
FROM pg_catalog.pg_roles r CROSS JOIN pg_catalog.pg_class c
WHERE r.rolname !~ '^pg_' AND c.oid = ANY ($1)";

const FUNCTIONS_SQL: &str = "
SELECT n.nspname::text, p.proname::text, l.lanname::text, p.prosecdef, p.provolatile::text, p.proretset,
       pg_catalog.format_type(p.prorettype, NULL),
       coalesce(p.proargnames::text[], '{}'),
       coalesce(pg_catalog.pg_get_expr(p.proargdefaults, 0), ''),
       coalesce(p.proconfig, '{}'),
       pg_catalog.pg_get_userbyid(p.proowner)::text,
       CASE WHEN p.prosrc = '' OR p.prosrc IS NULL
            THEN coalesce(pg_catalog.pg_get_function_sqlbody(p.oid), '') ELSE p.prosrc END
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname || '.' || p.proname = ANY ($1) AND p.prokind = 'f'
ORDER BY p.oid";

/// PostgreSQL 14 added `pg_get_function_sqlbody`; 13 and older have no SQL
/// standard bodies.
const FUNCTIONS_SQL_PRE14: &str = "
SELECT n.nspname::text, p.proname::text, l.lanname::text, p.prosecdef, p.provolatile::text, p.proretset,
       pg_catalog.format_type(p.prorettype, NULL),
       coalesce(p.proargnames::text[], '{}'),
       coalesce(pg_catalog.pg_get_expr(p.proargdefaults, 0), ''),
       coalesce(p.proconfig, '{}'),
       pg_catalog.pg_get_userbyid(p.proowner)::text,
       coalesce(p.prosrc, '')
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname || '.' || p.proname = ANY ($1) AND p.prokind = 'f'
ORDER BY p.oid";

/// Reads the catalog for `publications`, plus the tables and functions named
/// in `extra_tables` (`schema.name`) and `functions` (`schema.name`). Runs
/// inside the caller's transaction (so a snapshot applies); sets
/// `search_path` to empty for the transaction.
///
/// # Errors
/// SQL errors.
pub async fn load(
    client: &impl GenericClient,
    publications: &[String],
    extra_tables: &[String],
    functions: &[String],
) -> Result<Catalog, tokio_postgres::Error> {
    client.batch_execute("SELECT pg_catalog.set_config('search_path', '', true)").await?;
    let mut extra_oids: Vec<u32> = Vec::new();
    for name in extra_tables {
        let row = client.query_one("SELECT pg_catalog.to_regclass($1)::oid", &[name]).await?;
        if let Some(oid) = row.get::<_, Option<u32>>(0) {
            extra_oids.push(oid);
        }
    }
    let mut tables: HashMap<u32, TableCat> = HashMap::new();
    for row in client.query(TABLES_SQL, &[&extra_oids, &publications]).await? {
        let oid: u32 = row.get(0);
        let replident: String = row.get(5);
        tables.insert(
            oid,
            TableCat {
                oid,
                schema: row.get(1),
                name: row.get(2),
                rls: row.get(3),
                force_rls: row.get(4),
                replica_identity: replident.chars().next().unwrap_or('d'),
                published: row.get(6),
                columns: Vec::new(),
                policies: Vec::new(),
            },
        );
    }
    let oids: Vec<u32> = tables.keys().copied().collect();
    for row in client.query(COLUMNS_SQL, &[&oids]).await? {
        let oid: u32 = row.get(0);
        if let Some(t) = tables.get_mut(&oid) {
            t.columns.push(ColumnCat {
                name: row.get(1),
                type_name: row.get(2),
                sql_type: row.get(3),
                primary_key: row.get(4),
            });
        }
    }
    for row in client.query(POLICIES_SQL, &[&oids]).await? {
        let oid: u32 = row.get(0);
        if let Some(t) = tables.get_mut(&oid) {
            t.policies.push(PolicyCat {
                name: row.get(1),
                permissive: row.get(2),
                roles: row.get::<_, Vec<String>>(3),
                using: row.get(4),
            });
        }
    }
    let mut roles = HashMap::new();
    for row in client.query(ROLES_SQL, &[]).await? {
        let name: String = row.get(0);
        let member_of: Vec<String> = row.get(3);
        roles.insert(
            name.clone(),
            RoleCat {
                name,
                superuser: row.get(1),
                bypass_rls: row.get(2),
                member_of: member_of.into_iter().collect(),
                settable: row.get(4),
            },
        );
    }
    let mut privileges = HashMap::new();
    for row in client.query(PRIVILEGES_SQL, &[&oids]).await? {
        let role: String = row.get(0);
        let oid: u32 = row.get(1);
        privileges.insert((role, oid), Privileges { table: row.get(2), columns: row.get(3), owner: row.get(4) });
    }
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    let sql = if version >= 140_000 { FUNCTIONS_SQL } else { FUNCTIONS_SQL_PRE14 };
    let mut funcs = HashMap::new();
    for row in client.query(sql, &[&functions]).await? {
        let schema: String = row.get(0);
        let name: String = row.get(1);
        let defaults: String = row.get(8);
        let volatility: String = row.get(4);
        funcs.entry(format!("{schema}.{name}")).or_insert(FunctionCat {
            schema,
            name,
            language: row.get(2),
            security_definer: row.get(3),
            volatility: volatility.chars().next().unwrap_or('v'),
            returns_set: row.get(5),
            returns: row.get(6),
            arg_names: row.get(7),
            arg_defaults: split_defaults(&defaults),
            config: row.get(9),
            owner: row.get(10),
            body: row.get(11),
        });
    }
    let current_user: String = client.query_one("SELECT current_user::text", &[]).await?.get(0);
    Ok(Catalog { tables, roles, privileges, functions: funcs, current_user })
}

/// Splits `pg_get_expr(proargdefaults)` output (`NULL::text[], 'x'::text`)
/// at top-level commas.
fn split_defaults(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    for (i, ch) in text.char_indices() {
        match ch {
            '\'' => quoted = !quoted,
            '(' | '[' if !quoted => depth += 1,
            ')' | ']' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(text[start..i].trim().to_owned());
                start = i + 1;
            }
            _ => {}
        }
    }
    if !text[start..].trim().is_empty() {
        out.push(text[start..].trim().to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split_defaults;

    #[test]
    fn defaults_split_at_top_level_commas() {
        assert_eq!(split_defaults(""), Vec::<String>::new());
        assert_eq!(split_defaults("NULL::text[]"), vec!["NULL::text[]"]);
        assert_eq!(split_defaults("ARRAY['a'::text, 'b,c'::text], 1"), vec!["ARRAY['a'::text, 'b,c'::text]", "1"]);
    }
}
