//! Plans: for every published table and every role, what a viewer of that
//! role may see — nothing, everything, the rows an in-memory predicate
//! accepts, or rows PostgreSQL must judge — which columns, and how the hub
//! finds the viewers a change may reach without visiting every subscriber.
//!
//! Sits on top of [`super::compile`]; the hub holds one [`PolicySet`] and
//! reads it per change. [`load`] reads the catalog, compiles, and loads the
//! caches, in one transaction (the slot's snapshot when there is one).

use std::collections::HashMap;
use std::sync::Arc;

use super::caches::{self, Caches, LoadedAt};
use super::catalog::{self, Catalog, RoleCat, TableCat};
use super::compile::{Compiled, Compiler};
use super::fallback::DatabaseCheck;
use super::predicate::{CacheId, ClaimPath, CmpOp, ColType, Expr, Operand};
use crate::lsn::Lsn;

/// What a role may see of a table.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    /// No row, with the reason (no SELECT privilege, no policy).
    Nothing(String),
    /// Every row (no RLS, or the role bypasses it).
    Everything,
    /// The rows the predicate accepts.
    Rows(Expr),
    /// PostgreSQL must judge each row; the reason it is not in memory.
    Database(String),
}

/// How the hub finds the viewers a change may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Index {
    /// Nobody can see the row.
    Nobody,
    /// Every subscriber of the role (the predicate then decides).
    Everyone,
    /// Viewers whose claim equals the row's column.
    Claim {
        /// The claim.
        path: ClaimPath,
        /// Its type.
        ty: ColType,
        /// The plan column.
        column: usize,
    },
    /// Viewers whose claim is a member of the row column's group.
    Member {
        /// The cache.
        cache: CacheId,
        /// The plan column holding the group.
        column: usize,
        /// The viewer's claim linked to the cache's user column.
        path: ClaimPath,
        /// Its type.
        ty: ColType,
    },
    /// All of these.
    Union(Vec<Index>),
}

impl Index {
    /// The index for a predicate: any conjunct's candidates cover an AND,
    /// all disjuncts' an OR.
    pub fn of(e: &Expr) -> Index {
        match e {
            Expr::Const(Some(true)) => Index::Everyone,
            Expr::Const(_) => Index::Nobody,
            Expr::Cmp(a, CmpOp::Eq, b) => match (a, b) {
                (Operand::Column { index, ty, cast: None }, Operand::Claim { path, ty: t })
                | (Operand::Claim { path, ty: t }, Operand::Column { index, ty, cast: None })
                    if ty == t =>
                {
                    Index::Claim { path: path.clone(), ty: *ty, column: *index }
                }
                _ => Index::Everyone,
            },
            Expr::Member {
                cache,
                outer: Some(Operand::Column { index, cast: None, .. }),
                user: Operand::Claim { path, ty },
                ..
            } => Index::Member { cache: *cache, column: *index, path: path.clone(), ty: *ty },
            Expr::And(xs) => {
                let mut best = Index::Everyone;
                for x in xs {
                    match Index::of(x) {
                        Index::Nobody => return Index::Nobody,
                        Index::Everyone => {}
                        i @ (Index::Claim { .. } | Index::Member { .. }) => return i,
                        u @ Index::Union(_) => best = u,
                    }
                }
                best
            }
            Expr::Or(xs) => {
                let mut parts = Vec::new();
                for x in xs {
                    match Index::of(x) {
                        Index::Everyone => return Index::Everyone,
                        Index::Nobody => {}
                        Index::Union(inner) => parts.extend(inner),
                        other => parts.push(other),
                    }
                }
                match parts.len() {
                    0 => Index::Nobody,
                    1 => parts.pop().unwrap_or(Index::Nobody),
                    _ => Index::Union(parts),
                }
            }
            _ => Index::Everyone,
        }
    }

    /// Calls `f` with every claim the index looks viewers up by.
    pub fn for_each_claim(&self, f: &mut impl FnMut(&ClaimPath, ColType)) {
        match self {
            Index::Claim { path, ty, .. } | Index::Member { path, ty, .. } => f(path, *ty),
            Index::Union(xs) => xs.iter().for_each(|x| x.for_each_claim(f)),
            Index::Nobody | Index::Everyone => {}
        }
    }
}

/// One role's plan for one table.
#[derive(Debug, Clone, PartialEq)]
pub struct RolePlan {
    /// Which rows.
    pub access: Access,
    /// Which columns (plan column order); `None` = all.
    pub columns: Option<Arc<[bool]>>,
    /// How to find candidate viewers.
    pub index: Index,
    /// What will not arrive and why (sent to subscribers at join).
    pub warnings: Vec<String>,
    /// How PostgreSQL evaluates it — for [`Access::Database`], and for
    /// [`Access::Rows`] whose caches went over budget (`None` when it
    /// cannot, e.g. walcast may not `SET ROLE` to the role).
    pub database: Option<Arc<DatabaseCheck>>,
    /// The membership caches an [`Access::Rows`] predicate reads.
    pub caches: Vec<CacheId>,
}

impl RolePlan {
    fn nothing(why: String) -> RolePlan {
        RolePlan {
            access: Access::Nothing(why),
            columns: None,
            index: Index::Nobody,
            warnings: Vec::new(),
            database: None,
            caches: Vec::new(),
        }
    }

    /// One line: `in memory (auth.uid() = user_id)`, `everything`, ….
    pub fn describe(&self, columns: &[String], caches: &Caches) -> String {
        let name = |id: CacheId| caches.specs().get(id).map_or_else(|| "?".to_owned(), |s| s.describe());
        let cols = match &self.columns {
            Some(mask) => {
                let names: Vec<&str> =
                    columns.iter().zip(mask.iter()).filter(|(_, m)| **m).map(|(c, _)| c.as_str()).collect();
                format!("; columns {}", names.join(", "))
            }
            None => String::new(),
        };
        match &self.access {
            Access::Nothing(why) => format!("nothing ({why})"),
            Access::Everything => format!("every row{cols}"),
            Access::Rows(e) => format!("in memory ({}){cols}", e.describe(columns, &name)),
            Access::Database(why) => format!("database-evaluated ({why}){cols}"),
        }
    }
}

/// One published table's plans.
#[derive(Debug, Clone)]
pub struct TablePlan {
    /// Oid.
    pub oid: u32,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// Column names as compiled.
    pub columns: Vec<String>,
    /// Which of them form the primary key.
    pub primary_key: Vec<bool>,
    /// Plans by role name.
    pub roles: HashMap<String, Arc<RolePlan>>,
}

impl TablePlan {
    /// The plan for `role`; an unknown role sees nothing.
    pub fn role(&self, role: &str) -> Option<&Arc<RolePlan>> {
        self.roles.get(role)
    }
}

/// Every table's plans, the roles, and the caches' specs.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    tables: HashMap<u32, TablePlan>,
    names: HashMap<(String, String), u32>,
    roles: HashMap<String, RoleCat>,
    claims: Vec<(ClaimPath, ColType)>,
}

/// Roles listed first in plans and logs.
const API_ROLES: [&str; 3] = ["anon", "authenticated", "service_role"];

impl PolicySet {
    /// Compiles every published table of `catalog` for every role. The
    /// second value lists names the catalog lacked (read them and compile
    /// again).
    pub fn compile(catalog: &Catalog) -> (PolicySet, Vec<super::compile::CacheSpec>, super::compile::Wanted) {
        let mut compiler = Compiler::new(catalog);
        let mut set = PolicySet { roles: catalog.roles.clone(), ..PolicySet::default() };
        for table in catalog.published() {
            let mut roles = HashMap::new();
            for role in catalog.roles.values() {
                roles.insert(role.name.clone(), Arc::new(plan_for(&mut compiler, catalog, table, role)));
            }
            set.names.insert((table.schema.clone(), table.name.clone()), table.oid);
            set.tables.insert(
                table.oid,
                TablePlan {
                    oid: table.oid,
                    schema: table.schema.clone(),
                    name: table.name.clone(),
                    columns: table.columns.iter().map(|c| c.name.clone()).collect(),
                    primary_key: table.columns.iter().map(|c| c.primary_key).collect(),
                    roles,
                },
            );
        }
        let mut claims = Vec::new();
        for t in set.tables.values() {
            for p in t.roles.values() {
                p.index.for_each_claim(&mut |path, ty| {
                    if !claims.iter().any(|(p, t)| p == path && *t == ty) {
                        claims.push((path.clone(), ty));
                    }
                });
            }
        }
        claims.sort();
        set.claims = claims;
        (set, compiler.caches, compiler.wanted)
    }

    /// The plans of table `oid`.
    pub fn table(&self, oid: u32) -> Option<&TablePlan> {
        self.tables.get(&oid)
    }

    /// The plans of `schema.name`.
    pub fn table_by_name(&self, schema: &str, name: &str) -> Option<&TablePlan> {
        self.names.get(&(schema.to_owned(), name.to_owned())).and_then(|oid| self.tables.get(oid))
    }

    /// Every table, sorted by name.
    pub fn tables(&self) -> Vec<&TablePlan> {
        let mut out: Vec<&TablePlan> = self.tables.values().collect();
        out.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        out
    }

    /// The role `name`, if it exists.
    pub fn role(&self, name: &str) -> Option<&RoleCat> {
        self.roles.get(name)
    }

    /// The claims viewers are indexed by.
    pub fn indexed_claims(&self) -> &[(ClaimPath, ColType)] {
        &self.claims
    }

    /// One line per table and API role, for logs and `walcast check`.
    pub fn describe(&self, caches: &Caches) -> Vec<String> {
        let mut out = Vec::new();
        for t in self.tables() {
            let mut roles: Vec<&String> = t.roles.keys().filter(|r| API_ROLES.contains(&r.as_str())).collect();
            roles.sort();
            for r in roles {
                out.push(format!("{}.{} as {r}: {}", t.schema, t.name, t.roles[r].describe(&t.columns, caches)));
            }
        }
        out
    }
}

fn plan_for(compiler: &mut Compiler<'_>, catalog: &Catalog, table: &TableCat, role: &RoleCat) -> RolePlan {
    let privileges = catalog.privileges.get(&(role.name.clone(), table.oid));
    let columns: Option<Arc<[bool]>> = if role.superuser {
        None
    } else {
        match privileges {
            Some(p) if p.table => None,
            Some(p) if p.columns.iter().any(|c| *c) => Some(p.columns.clone().into()),
            _ => return RolePlan::nothing(format!("{} has no SELECT on {}", role.name, table.qualified())),
        }
    };
    let owner = privileges.is_some_and(|p| p.owner);
    let bypass = role.superuser || role.bypass_rls || !table.rls || (owner && !table.force_rls);
    let mut warnings = Vec::new();
    let mut database = None;
    let mut caches = Vec::new();
    let (access, index) = if bypass {
        (Access::Everything, Index::Everyone)
    } else {
        match compiler.compile(table, role) {
            Compiled::Memory(Expr::Const(Some(false))) | Compiled::Memory(Expr::Const(None)) => {
                return RolePlan::nothing(if table.policies.is_empty() {
                    format!("row level security is on and no SELECT policy applies to {}", role.name)
                } else {
                    format!("no SELECT policy of {} lets {} see a row", table.qualified(), role.name)
                });
            }
            // Policies that hold for every row: as if RLS were off.
            Compiled::Memory(Expr::Const(Some(true))) => (Access::Everything, Index::Everyone),
            Compiled::Memory(e) => {
                let index = Index::of(&e);
                e.for_each_member(&mut |c| {
                    if !caches.contains(&c) {
                        caches.push(c)
                    }
                });
                // Kept for when a cache outgrows its budget.
                database = database_check(catalog, table, role).ok().map(Arc::new);
                // Columns the predicate reads that an old row may lack.
                if table.replica_identity != 'f' {
                    let mut needs = Vec::new();
                    e.for_each_column(&mut |i| {
                        if !table.columns[i].primary_key && !needs.contains(&table.columns[i].name) {
                            needs.push(table.columns[i].name.clone());
                        }
                    });
                    if !needs.is_empty() {
                        warnings.push(format!(
                            "DELETE events of {t} are not delivered to {r}: its policy reads {c}, which the old row \
                             carries only with REPLICA IDENTITY FULL (ALTER TABLE {t} REPLICA IDENTITY FULL)",
                            t = table.qualified(),
                            r = role.name,
                            c = needs.join(", ")
                        ));
                    }
                }
                (Access::Rows(e), index)
            }
            Compiled::Database(why) => {
                match database_check(catalog, table, role) {
                    Ok(check) => database = Some(Arc::new(check)),
                    Err(cannot) => warnings.push(format!(
                        "changes of {} are not delivered to {}: its policies need the database ({why}), and {cannot}",
                        table.qualified(),
                        role.name
                    )),
                }
                (Access::Database(why), Index::Everyone)
            }
        }
    };
    if let Some(mask) = &columns {
        let hidden: Vec<&str> =
            table.columns.iter().zip(mask.iter()).filter(|(_, m)| !**m).map(|(c, _)| c.name.as_str()).collect();
        if !hidden.is_empty() {
            warnings.push(format!(
                "{} may not SELECT {} of {}: left out of record and old_record",
                role.name,
                hidden.join(", "),
                table.qualified()
            ));
        }
    }
    RolePlan { access, columns, index, warnings, database, caches }
}

/// The SQL form of `role`'s policies on `table`, for PostgreSQL to evaluate.
fn database_check(catalog: &Catalog, table: &TableCat, role: &RoleCat) -> Result<DatabaseCheck, String> {
    if !role.settable {
        return Err(format!(
            "walcast's role {u} may not SET ROLE {r} to ask PostgreSQL (GRANT {r} TO {u})",
            u = catalog.current_user,
            r = role.name
        ));
    }
    let applies = |roles: &[String]| roles.is_empty() || roles.iter().any(|r| role.member_of.contains(r));
    let mut permissive = Vec::new();
    let mut restrictive = Vec::new();
    let mut names = Vec::new();
    for p in table.policies.iter().filter(|p| applies(&p.roles)) {
        let Some(using) = &p.using else {
            return Err(format!("policy {} has no USING expression", p.name));
        };
        names.push(p.name.clone());
        if p.permissive {
            permissive.push(format!("({using})"));
        } else {
            restrictive.push(format!("({using})"));
        }
    }
    if permissive.is_empty() {
        return Err("no permissive policy applies".into());
    }
    let mut predicate = format!("({})", permissive.join(" OR "));
    for r in restrictive {
        predicate.push_str(" AND ");
        predicate.push_str(&r);
    }
    Ok(DatabaseCheck {
        table: table.oid,
        alias: table.name.clone(),
        qualified: table.qualified(),
        policies: names,
        predicate,
        columns: table.columns.iter().map(|c| (c.name.clone(), c.sql_type.clone())).collect(),
        role: role.name.clone(),
    })
}

/// Errors reading policies.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A database error (transient unless it names a missing object).
    #[error("reading policies: {}", crate::pgconn::cause(.0))]
    Database(#[from] tokio_postgres::Error),
    /// Row level security (or a missing privilege) hides membership rows
    /// from walcast's role (definite).
    #[error(
        "{0} — walcast must read every row of the membership tables its caches mirror, and row-level security or \
         privileges stop its role: give the role BYPASSRLS (ALTER ROLE <walcast role> BYPASSRLS) and SELECT, or \
         connect as a superuser"
    )]
    Hidden(String),
}

/// A loaded policy state: plans, caches and when they were loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The plans.
    pub policies: Arc<PolicySet>,
    /// The caches, filled.
    pub caches: Caches,
    /// When.
    pub at: LoadedAt,
    /// The catalog the plans were compiled from (what a snapshot carries to
    /// compile the same plans elsewhere, see [`crate::scaleout::snapshot`]);
    /// `None` for plans built by hand (tests, benchmarks).
    pub catalog: Option<Arc<Catalog>>,
}

/// Reads the catalog, compiles and loads the caches in one transaction
/// (inside `snapshot` — the exported snapshot's name and consistent point —
/// when given), with the default cache budget.
///
/// # Errors
/// SQL errors.
pub async fn load(
    client: &mut tokio_postgres::Client,
    publications: &[String],
    snapshot: Option<(&str, Lsn)>,
) -> Result<Loaded, LoadError> {
    load_with_budget(client, publications, snapshot, caches::DEFAULT_BUDGET).await
}

/// As [`load`], the caches within `budget` bytes.
///
/// # Errors
/// SQL errors.
pub async fn load_with_budget(
    client: &mut tokio_postgres::Client,
    publications: &[String],
    snapshot: Option<(&str, Lsn)>,
    budget: usize,
) -> Result<Loaded, LoadError> {
    load_except(client, publications, snapshot, &[], budget).await.map(|(loaded, _)| loaded)
}

/// A reload while walcast runs (the policies changed): reads the catalog
/// now and compiles; caches whose spec is in `known` (those in force) are
/// not read — the hub keeps their WAL-maintained data
/// ([`Caches::adopt`]); the others are read now (within `budget`), exact
/// from the returned [`LoadedAt::lsn`]. Also returns the count of policy
/// DDL the event trigger reported (`walcast.policy_epoch`, read with the
/// catalog; `None` without the trigger's table).
///
/// # Errors
/// SQL errors.
pub async fn reload(
    client: &mut tokio_postgres::Client,
    publications: &[String],
    known: &[super::compile::CacheSpec],
    budget: usize,
) -> Result<(Loaded, Option<i64>), LoadError> {
    load_except(client, publications, None, known, budget).await
}

async fn load_except(
    client: &mut tokio_postgres::Client,
    publications: &[String],
    snapshot: Option<(&str, Lsn)>,
    known: &[super::compile::CacheSpec],
    budget: usize,
) -> Result<(Loaded, Option<i64>), LoadError> {
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
    // The event trigger's count of policy DDL, read with the catalog (a
    // failed query would abort the transaction: ask first).
    let has_epoch: bool = tx
        .query_one(
            // In this order (CASE evaluates in order): `to_regclass` raises
            // for a schema the role may not use (the migration runner's own
            // `walcast` schema exists without the event trigger's grants).
            "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'walcast') THEN false
                    WHEN NOT pg_catalog.has_schema_privilege('walcast', 'USAGE') THEN false
                    WHEN pg_catalog.to_regclass('walcast.policy_epoch') IS NULL THEN false
                    ELSE pg_catalog.has_table_privilege('walcast.policy_epoch', 'SELECT') END",
            &[],
        )
        .await?
        .get(0);
    let epoch: Option<i64> = if has_epoch {
        tx.query_opt("SELECT epoch FROM walcast.policy_epoch", &[]).await?.map(|r| r.get(0))
    } else {
        None
    };
    let mut tables: Vec<String> = Vec::new();
    let mut functions: Vec<String> = Vec::new();
    let mut round = 0;
    let (set, specs, cat) = loop {
        let cat = catalog::load(&tx, publications, &tables, &functions).await?;
        let (set, specs, wanted) = PolicySet::compile(&cat);
        let new_tables: Vec<String> = wanted.tables.into_iter().filter(|t| !tables.contains(t)).collect();
        let new_functions: Vec<String> = wanted.functions.into_iter().filter(|f| !functions.contains(f)).collect();
        round += 1;
        if (new_tables.is_empty() && new_functions.is_empty()) || round >= 6 {
            break (set, specs, cat);
        }
        tables.extend(new_tables);
        functions.extend(new_functions);
    };
    let mut caches = Caches::new(specs).with_budget(budget);
    let at = caches::load(&tx, &mut caches, snapshot.map(|(_, lsn)| lsn), known).await.map_err(|e| {
        match e.as_db_error() {
            Some(db) if db.code().code() == "42501" => {
                let tables: Vec<&str> = caches.specs().iter().map(|s| s.table_name.as_str()).collect();
                LoadError::Hidden(format!("{} (reading {})", db.message(), tables.join(", ")))
            }
            _ => LoadError::Database(e),
        }
    })?;
    tx.commit().await?;
    Ok((Loaded { policies: Arc::new(set), caches, at, catalog: Some(Arc::new(cat)) }, epoch))
}
