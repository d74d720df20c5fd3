//! The policy compiler: turns the SELECT policies PostgreSQL stores (read by
//! [`super::catalog`]) into in-memory [`Expr`]s per (table, role), or says
//! why a table must be database-evaluated.
//!
//! Sits between the catalog and the plans ([`super::plan`]). Expressions
//! are parsed with the `sqlparser` crate's PostgreSQL dialect: it parses
//! every `pg_get_expr` output of the shapes in rls-policies.md §1 and the
//! bodies of SQL helper functions, in pure Rust (PostgreSQL's own parser,
//! `pg_query`, would add a libclang build dependency for no gain on this
//! subset). Unknown syntax is never partially compiled: the policy — and so
//! the table, for that role — is database-evaluated, with the reason.
//!
//! # What compiles
//!
//! - Constants, row columns, `=`/`<>` (and ordering for integers and uuids),
//!   `IN (...)`, `= ANY (ARRAY[...])`, `IS [NOT] NULL`, boolean columns,
//!   `NOT`/`AND`/`OR`, casts between text, uuid, int and bool.
//! - `auth.uid()`, `auth.role()` (folded: a viewer's role *is* its `role`
//!   claim), `auth.jwt() -> … ->> 'k'`, the
//!   `current_setting('request.jwt.claims', true)::jsonb` forms, each bare or
//!   wrapped in `(select …)`.
//! - Membership: `col IN (SELECT t.g FROM T t WHERE t.u = <claim> AND …)`,
//!   `EXISTS (SELECT … FROM T t WHERE t.g = <row>.col AND t.u = <claim> AND
//!   …)`, and SQL helper functions (STABLE/IMMUTABLE, one `SELECT`) whose
//!   body is such a set or boolean, inlined with their arguments and
//!   defaults. The remaining conditions on `T` must be constant; they become
//!   the cache's filter. A subquery written in a policy runs under the
//!   viewer's RLS and privileges on `T`, so it compiles only when `T` has no
//!   RLS the viewer is subject to and the viewer may SELECT the columns used;
//!   inside a SECURITY DEFINER helper the helper's owner is checked instead.
//!   `T` must have a primary key (REPLICA IDENTITY DEFAULT) or REPLICA
//!   IDENTITY FULL, so every change to it can be applied.

use std::collections::HashMap;

use sqlparser::ast::{
    BinaryOperator, CastKind, DataType, Expr as Sql, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName,
    ObjectNamePart, Query, SelectItem, SetExpr, Statement, TableFactor, UnaryOperator, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::catalog::{Catalog, FunctionCat, RoleCat, TableCat};
use super::predicate::{CacheId, ClaimPath, CmpOp, ColType, Expr, Operand, Scalar};

/// A membership cache the compiled predicates read: the pairs
/// `(group, user)` of table `T`'s rows that pass `filter`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CacheSpec {
    /// `T`'s oid.
    pub table: u32,
    /// `schema.name`.
    pub table_name: String,
    /// Group column (linked to the judged row); `None` for "the user has a
    /// row at all".
    pub group: Option<(String, ColType)>,
    /// User column (linked to the viewer's claim).
    pub user: (String, ColType),
    /// Conditions on `T`'s own columns (indexes into `columns`).
    pub filter: Option<Expr>,
    /// `T`'s columns as compiled (names).
    pub columns: Vec<String>,
    /// Key columns (primary key, or all under REPLICA IDENTITY FULL).
    pub key: Vec<String>,
}

impl CacheSpec {
    /// `public.team_members(user_id → team_id)`, for plans.
    pub fn describe(&self) -> String {
        let filter = self
            .filter
            .as_ref()
            .map(|f| format!(" where {}", f.describe(&self.columns, &|_| "?".into())))
            .unwrap_or_default();
        match &self.group {
            Some((g, _)) => format!("{}({} → {}){filter}", self.table_name, self.user.0, g),
            None => format!("{}({}){filter}", self.table_name, self.user.0),
        }
    }
}

/// Why a policy did not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

type R<T> = Result<T, Unsupported>;

fn no<T>(why: impl Into<String>) -> R<T> {
    Err(Unsupported(why.into()))
}

/// Names a compile needs that the catalog did not have yet.
#[derive(Debug, Default, Clone)]
pub struct Wanted {
    /// Tables (`schema.name`).
    pub tables: Vec<String>,
    /// Functions (`schema.name`).
    pub functions: Vec<String>,
}

/// The compiler's output for one (table, role) policy set.
#[derive(Debug, Clone)]
pub enum Compiled {
    /// An in-memory predicate.
    Memory(Expr),
    /// Database-evaluated, with the reason.
    Database(String),
}

/// Compiles policies against one catalog; collects caches.
#[derive(Debug)]
pub struct Compiler<'c> {
    catalog: &'c Catalog,
    /// Caches created so far (ids are indexes).
    pub caches: Vec<CacheSpec>,
    /// Names missing from the catalog (load them and compile again).
    pub wanted: Wanted,
}

/// What a name in the expression may refer to.
#[derive(Clone)]
struct Scope<'a> {
    /// The judged table (columns become row operands).
    outer: &'a TableCat,
    /// Another name the judged table goes by (a subquery's alias, when its
    /// own conditions are compiled as a cache filter).
    outer_alias: Option<String>,
    /// The table of a membership subquery and its alias.
    inner: Option<(&'a TableCat, String)>,
    /// Bound parameters of an inlined function.
    params: HashMap<String, Bound>,
    /// The role the subquery's privileges and RLS are checked for.
    acting: &'a RoleCat,
    /// The viewer's role (for `auth.role()`).
    role: &'a RoleCat,
    /// Schemas to resolve unqualified table names in (an inlined function's
    /// `search_path`); `None` = unknown, unqualified names do not compile.
    search_path: Option<Vec<String>>,
    depth: u8,
}

/// An inlined function's argument.
#[derive(Clone, Debug)]
enum Bound {
    Op(Operand),
    Pred(Expr),
    List(Option<Vec<Scalar>>),
}

/// A translated scalar: a typed operand, an untyped string literal, the
/// claims as JSON, or an array.
#[derive(Clone, Debug)]
enum Term {
    Op(Operand),
    Literal(String),
    Json(Vec<std::sync::Arc<str>>),
    List(Option<Vec<Scalar>>),
    /// A column of the subquery's table.
    Inner(usize, ColType),
    Pred(Expr),
}

fn ident(id: &sqlparser::ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

fn object_name(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => ident(i),
            ObjectNamePart::Function(f) => ident(&f.name),
        })
        .collect()
}

fn data_type(dt: &DataType) -> R<ColType> {
    let name = dt.to_string();
    ColType::from_type_name(&name).map_or_else(|| no(format!("a cast to {name}")), Ok)
}

fn unwrap_query(q: &Query) -> R<&sqlparser::ast::Select> {
    if q.with.is_some() || q.order_by.is_some() || q.limit_clause.is_some() || q.fetch.is_some() {
        return no("a subquery with WITH, ORDER BY or LIMIT");
    }
    match &*q.body {
        SetExpr::Select(s) => Ok(s),
        SetExpr::Query(q) => unwrap_query(q),
        _ => no("a set operation in a subquery"),
    }
}

fn conjuncts(e: &Sql, out: &mut Vec<Sql>) {
    match e {
        Sql::BinaryOp { left, op: BinaryOperator::And, right } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        Sql::Nested(inner) => {
            if matches!(&**inner, Sql::BinaryOp { op: BinaryOperator::And, .. }) {
                conjuncts(inner, out)
            } else {
                out.push(e.clone())
            }
        }
        other => out.push(other.clone()),
    }
}

/// Parses a policy expression (`pg_get_expr` output).
///
/// # Errors
/// When it does not parse.
pub fn parse_expr(text: &str) -> R<Sql> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(text)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| Unsupported(format!("the expression does not parse ({e})")))
}

impl<'c> Compiler<'c> {
    /// A compiler over `catalog`.
    pub fn new(catalog: &'c Catalog) -> Self {
        Compiler { catalog, caches: Vec::new(), wanted: Wanted::default() }
    }

    /// Compiles the permissive (OR-ed) and restrictive (AND-ed) policies of
    /// `table` that apply to `role`.
    pub fn compile(&mut self, table: &TableCat, role: &RoleCat) -> Compiled {
        let applies = |roles: &[String]| roles.is_empty() || roles.iter().any(|r| role.member_of.contains(r));
        let mut permissive = Vec::new();
        let mut restrictive = Vec::new();
        for policy in table.policies.iter().filter(|p| applies(&p.roles)) {
            let Some(using) = &policy.using else {
                return Compiled::Database(format!("policy {} has no USING expression", policy.name));
            };
            let scope = Scope {
                outer: table,
                outer_alias: None,
                inner: None,
                params: HashMap::new(),
                acting: role,
                role,
                search_path: Some(Vec::new()),
                depth: 0,
            };
            let expr = match parse_expr(using).and_then(|e| self.pred(&e, &scope)) {
                Ok(e) => e,
                Err(Unsupported(why)) => return Compiled::Database(format!("policy {}: {why}", policy.name)),
            };
            if policy.permissive {
                permissive.push(expr);
            } else {
                restrictive.push(expr);
            }
        }
        let mut all = vec![Expr::any(permissive)];
        all.extend(restrictive);
        Compiled::Memory(simplify(Expr::all(all)))
    }

    fn want_table(&mut self, name: String) {
        if !self.wanted.tables.contains(&name) {
            self.wanted.tables.push(name);
        }
    }

    fn want_function(&mut self, name: String) {
        if !self.wanted.functions.contains(&name) {
            self.wanted.functions.push(name);
        }
    }

    /// A boolean expression.
    fn pred(&mut self, e: &Sql, s: &Scope<'_>) -> R<Expr> {
        match e {
            Sql::Nested(inner) => self.pred(inner, s),
            Sql::BinaryOp { left, op: BinaryOperator::And, right } => Ok(self.pred(left, s)?.and(self.pred(right, s)?)),
            Sql::BinaryOp { left, op: BinaryOperator::Or, right } => {
                Ok(Expr::Or(vec![self.pred(left, s)?, self.pred(right, s)?]))
            }
            Sql::UnaryOp { op: UnaryOperator::Not, expr } => Ok(Expr::Not(Box::new(self.pred(expr, s)?))),
            Sql::BinaryOp { left, op, right } => {
                let op = match op {
                    BinaryOperator::Eq => CmpOp::Eq,
                    BinaryOperator::NotEq => CmpOp::Ne,
                    BinaryOperator::Lt => CmpOp::Lt,
                    BinaryOperator::LtEq => CmpOp::Le,
                    BinaryOperator::Gt => CmpOp::Gt,
                    BinaryOperator::GtEq => CmpOp::Ge,
                    other => return no(format!("the operator {other}")),
                };
                let (l, r) = (self.term(left, s)?, self.term(right, s)?);
                compare(l, op, r)
            }
            Sql::IsNull(x) | Sql::IsNotNull(x) => {
                let negated = matches!(e, Sql::IsNotNull(_));
                match self.term(x, s)? {
                    Term::Op(o) => Ok(Expr::IsNull(o, negated)),
                    Term::Inner(..) => no("an inner column outside a membership subquery"),
                    Term::List(l) => Ok(Expr::Const(Some(l.is_none() != negated))),
                    Term::Literal(_) => Ok(Expr::Const(Some(negated))),
                    _ => no("IS NULL on an expression"),
                }
            }
            Sql::InList { expr, list, negated } => {
                let operand = as_operand(self.term(expr, s)?)?;
                let ty = operand.ty().map_or_else(|| no("IN on a NULL"), Ok)?;
                let mut values = Vec::new();
                let mut has_null = false;
                for item in list {
                    match self.term(item, s)? {
                        Term::Literal(text) => values.push(literal(ty, &text)?),
                        Term::Op(Operand::Const(None)) => has_null = true,
                        Term::Op(Operand::Const(Some(v))) => values.push(v.cast(ty).map_err(|_| cast_err(ty))?),
                        _ => return no("IN with a non-constant list"),
                    }
                }
                Ok(Expr::In { operand, list: values, list_has_null: has_null, negated: *negated })
            }
            Sql::AnyOp { left, compare_op: BinaryOperator::Eq, right, .. } => {
                let operand = as_operand(self.term(left, s)?)?;
                let ty = operand.ty().map_or_else(|| no("ANY on a NULL"), Ok)?;
                match self.term(right, s)? {
                    Term::List(None) => Ok(Expr::Const(None)),
                    Term::List(Some(items)) => {
                        let list = items.iter().map(|v| v.cast(ty).map_err(|_| cast_err(ty))).collect::<R<_>>()?;
                        Ok(Expr::In { operand, list, list_has_null: false, negated: false })
                    }
                    _ => no("= ANY over a non-constant array"),
                }
            }
            Sql::InSubquery { expr, subquery, negated } => {
                let outer = self.term(expr, s)?;
                let member = self.membership_in(outer, subquery, s)?;
                Ok(if *negated { Expr::Not(Box::new(member)) } else { member })
            }
            Sql::Exists { subquery, negated } => {
                let member = self.exists(subquery, s)?;
                Ok(if *negated { Expr::Not(Box::new(member)) } else { member })
            }
            Sql::Value(v) if matches!(v.value, Value::Boolean(_) | Value::Null) => match &v.value {
                Value::Boolean(b) => Ok(Expr::Const(Some(*b))),
                _ => Ok(Expr::Const(None)),
            },
            _ => match self.term(e, s)? {
                Term::Pred(p) => Ok(p),
                Term::Op(o) if o.ty() == Some(ColType::Bool) => Ok(Expr::Truth(o)),
                Term::Op(Operand::Const(None)) => Ok(Expr::Const(None)),
                other => no(format!("a non-boolean expression used as a condition ({})", describe_term(&other))),
            },
        }
    }

    /// A scalar expression.
    fn term(&mut self, e: &Sql, s: &Scope<'_>) -> R<Term> {
        match e {
            Sql::Nested(inner) => self.term(inner, s),
            Sql::Value(v) => match &v.value {
                Value::SingleQuotedString(t) => Ok(Term::Literal(t.clone())),
                Value::Number(n, _) => n
                    .parse::<i64>()
                    .map(|i| Term::Op(Operand::Const(Some(Scalar::Int(i)))))
                    .map_err(|_| Unsupported(format!("the number {n}"))),
                Value::Boolean(b) => Ok(Term::Op(Operand::Const(Some(Scalar::Bool(*b))))),
                Value::Null => Ok(Term::Op(Operand::Const(None))),
                other => no(format!("the value {other}")),
            },
            Sql::Identifier(id) => self.column(&[ident(id)], s),
            Sql::CompoundIdentifier(ids) => {
                let parts: Vec<String> = ids.iter().map(ident).collect();
                self.column(&parts, s)
            }
            Sql::Cast { kind: CastKind::DoubleColon | CastKind::Cast, expr, data_type: dt, .. } => {
                let inner = self.term(expr, s)?;
                if let DataType::Array(_) = dt {
                    return match inner {
                        Term::List(l) => Ok(Term::List(l)),
                        Term::Op(Operand::Const(None)) => Ok(Term::List(None)),
                        _ => no(format!("a cast to {dt}")),
                    };
                }
                if matches!(dt, DataType::JSONB | DataType::JSON) {
                    return match inner {
                        Term::Json(p) => Ok(Term::Json(p)),
                        _ => no(format!("a cast to {dt}")),
                    };
                }
                let ty = data_type(dt)?;
                cast(inner, ty)
            }
            Sql::BinaryOp { left, op: op @ (BinaryOperator::Arrow | BinaryOperator::LongArrow), right } => {
                let Term::Json(mut path) = self.term(left, s)? else { return no("-> on something other than the JWT") };
                let key = match self.term(right, s)? {
                    Term::Literal(k) => k,
                    Term::Op(Operand::Const(Some(Scalar::Text(k)))) => k.to_string(),
                    _ => return no("-> with a non-constant key"),
                };
                path.push(std::sync::Arc::from(key.as_str()));
                if matches!(op, BinaryOperator::Arrow) {
                    Ok(Term::Json(path))
                } else {
                    Ok(Term::Op(Operand::Claim { path: ClaimPath(path), ty: ColType::Text }))
                }
            }
            Sql::Array(arr) => {
                let mut items = Vec::new();
                for x in &arr.elem {
                    match self.term(x, s)? {
                        Term::Literal(t) => items.push(Scalar::Text(t.into())),
                        Term::Op(Operand::Const(Some(v))) => items.push(v),
                        _ => return no("an array with non-constant items"),
                    }
                }
                Ok(Term::List(Some(items)))
            }
            Sql::Subquery(q) => {
                let select = unwrap_query(q)?;
                if !select.from.is_empty() || select.selection.is_some() || select.projection.len() != 1 {
                    return no("a scalar subquery reading a table");
                }
                match &select.projection[0] {
                    SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. } => match self.term(x, s) {
                        Ok(t) => Ok(t),
                        Err(_) => self.pred(x, s).map(Term::Pred),
                    },
                    _ => no("a wildcard"),
                }
            }
            Sql::Exists { .. } | Sql::InSubquery { .. } | Sql::InList { .. } | Sql::AnyOp { .. } => {
                self.pred(e, s).map(Term::Pred)
            }
            Sql::BinaryOp { op: BinaryOperator::And | BinaryOperator::Or, .. } | Sql::UnaryOp { .. } => {
                self.pred(e, s).map(Term::Pred)
            }
            Sql::BinaryOp {
                op:
                    BinaryOperator::Eq
                    | BinaryOperator::NotEq
                    | BinaryOperator::Lt
                    | BinaryOperator::LtEq
                    | BinaryOperator::Gt
                    | BinaryOperator::GtEq,
                ..
            } => self.pred(e, s).map(Term::Pred),
            Sql::IsNull(_) | Sql::IsNotNull(_) => self.pred(e, s).map(Term::Pred),
            Sql::Function(f) => self.function(f, s),
            other => no(format!("the expression {}", shorten(&other.to_string()))),
        }
    }

    fn column(&mut self, parts: &[String], s: &Scope<'_>) -> R<Term> {
        let (qualifier, name) = match parts {
            [name] => (None, name.as_str()),
            [q, name] => (Some(q.as_str()), name.as_str()),
            [schema, table, name] => {
                if *schema == s.outer.schema && *table == s.outer.name {
                    return self.outer_column(s.outer, name);
                }
                return no(format!("the column {}", parts.join(".")));
            }
            _ => return no(format!("the name {}", parts.join("."))),
        };
        if qualifier.is_none() {
            if let Some(b) = s.params.get(name) {
                return Ok(match b {
                    Bound::Op(o) => Term::Op(o.clone()),
                    Bound::Pred(p) => Term::Pred(p.clone()),
                    Bound::List(l) => Term::List(l.clone()),
                });
            }
        }
        if let Some((inner, alias)) = &s.inner {
            if qualifier.is_none_or(|q| q == alias) {
                if let Some(i) = inner.column(name) {
                    let ty = ColType::from_type_name(&inner.columns[i].type_name)
                        .map_or_else(|| no(format!("the column {name} of type {}", inner.columns[i].type_name)), Ok)?;
                    return Ok(Term::Inner(i, ty));
                }
                if qualifier.is_some() {
                    return no(format!("the column {alias}.{name}"));
                }
            }
        }
        if qualifier.is_none_or(|q| q == s.outer.name || s.outer_alias.as_deref() == Some(q)) {
            return self.outer_column(s.outer, name);
        }
        no(format!("the name {}", parts.join(".")))
    }

    fn outer_column(&self, table: &TableCat, name: &str) -> R<Term> {
        let Some(i) = table.column(name) else { return no(format!("the column {name}")) };
        let tn = &table.columns[i].type_name;
        let ty = ColType::from_type_name(tn).map_or_else(|| no(format!("the column {name} of type {tn}")), Ok)?;
        Ok(Term::Op(Operand::Column { index: i, ty, cast: None }))
    }

    fn function(&mut self, f: &sqlparser::ast::Function, s: &Scope<'_>) -> R<Term> {
        let name = object_name(&f.name);
        let args: Vec<&Sql> = match &f.args {
            FunctionArguments::None => Vec::new(),
            FunctionArguments::List(list) => {
                if !list.clauses.is_empty() || list.duplicate_treatment.is_some() {
                    return no("a function call with clauses");
                }
                list.args
                    .iter()
                    .map(|a| match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
                        _ => no("a named or wildcard function argument"),
                    })
                    .collect::<R<_>>()?
            }
            FunctionArguments::Subquery(_) => return no("a function over a subquery"),
        };
        if f.filter.is_some() || f.over.is_some() {
            return no("an aggregate or window function");
        }
        let qualified: Vec<&str> = name.iter().map(String::as_str).collect();
        match (qualified.as_slice(), args.len()) {
            (["auth", "uid"], 0) => {
                return Ok(Term::Op(Operand::Claim { path: ClaimPath::sub(), ty: ColType::Uuid }));
            }
            (["auth", "role"], 0) => {
                return Ok(Term::Op(Operand::Const(Some(Scalar::Text(s.role.name.as_str().into())))));
            }
            (["auth", "jwt"], 0) => return Ok(Term::Json(Vec::new())),
            (["current_setting"] | ["pg_catalog", "current_setting"], 1 | 2) => {
                let Term::Literal(setting) = self.term(args[0], s)? else {
                    return no("current_setting of a computed name");
                };
                // Without `missing_ok` an unset setting raises; walcast sets
                // `request.jwt.claims` for every viewer, so only that one.
                return match setting.as_str() {
                    "request.jwt.claims" => Ok(Term::Json(Vec::new())),
                    _ => no(format!("current_setting('{setting}')")),
                };
            }
            _ => {}
        }
        let key = match qualified.as_slice() {
            [schema, name] => format!("{schema}.{name}"),
            [name] => match &s.search_path {
                Some(path) if !path.is_empty() => {
                    let found =
                        path.iter().map(|p| format!("{p}.{name}")).find(|k| self.catalog.functions.contains_key(k));
                    match found {
                        Some(k) => k,
                        None => return no(format!("the function {name}()")),
                    }
                }
                _ => return no(format!("the function {name}() (volatile, built-in or unqualified)")),
            },
            _ => return no(format!("the function {}", name.join("."))),
        };
        let Some(func) = self.catalog.functions.get(&key).cloned() else {
            self.want_function(key.clone());
            return no(format!("the function {key}() (not read yet)"));
        };
        let bound = self.bind_args(&func, &args, s)?;
        self.inline(&func, bound, s)
    }

    fn bind_args(&mut self, func: &FunctionCat, args: &[&Sql], s: &Scope<'_>) -> R<Vec<Bound>> {
        let total = func.arg_names.len().max(args.len());
        let first_default = total.saturating_sub(func.arg_defaults.len());
        let mut bound = Vec::with_capacity(total);
        for i in 0..total {
            let term = match args.get(i) {
                Some(a) => self.term(a, s)?,
                None if i >= first_default => {
                    let text = &func.arg_defaults[i - first_default];
                    self.term(&parse_expr(text)?, s)?
                }
                None => return no(format!("a call of {}.{} with too few arguments", func.schema, func.name)),
            };
            bound.push(match term {
                Term::Op(o) => Bound::Op(o),
                Term::List(l) => Bound::List(l),
                Term::Pred(p) => Bound::Pred(p),
                Term::Literal(t) => Bound::Op(Operand::Const(Some(Scalar::Text(t.into())))),
                _ => return no("a function argument walcast does not compile"),
            });
        }
        Ok(bound)
    }

    /// Inlines a SQL helper: the result is a predicate (boolean helpers), or
    /// a membership set (set-returning helpers, only under `IN`).
    fn inline(&mut self, func: &FunctionCat, bound: Vec<Bound>, s: &Scope<'_>) -> R<Term> {
        if s.depth >= 4 {
            return no("helper functions nested more than 4 deep");
        }
        let label = format!("{}.{}()", func.schema, func.name);
        if func.language != "sql" {
            return no(format!("the {} function {label}", func.language));
        }
        if func.volatility == 'v' {
            return no(format!("the volatile function {label}"));
        }
        if func.returns_set {
            // Only meaningful as `x IN (SELECT f(...))`: handled there.
            return no(format!("the set-returning function {label} outside IN (SELECT …)"));
        }
        let select = self.body_select(func)?;
        if !select.from.is_empty() || select.selection.is_some() || select.projection.len() != 1 {
            return no(format!("the body of {label}"));
        }
        let (SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. }) = &select.projection[0] else {
            return no(format!("the body of {label}"));
        };
        let x = x.clone();
        let acting = self.acting_for(func, s)?;
        let inner = Scope {
            outer: s.outer,
            outer_alias: None,
            inner: None,
            params: params(func, bound),
            acting,
            role: s.role,
            search_path: function_search_path(func),
            depth: s.depth + 1,
        };
        match self.pred(&x, &inner) {
            Ok(p) => Ok(Term::Pred(p)),
            Err(Unsupported(why)) => no(format!("{label}: {why}")),
        }
    }

    fn acting_for<'a>(&self, func: &FunctionCat, s: &Scope<'a>) -> R<&'a RoleCat>
    where
        'c: 'a,
    {
        if func.security_definer {
            self.catalog
                .roles
                .get(&func.owner)
                .map_or_else(|| no(format!("the owner {} of {}.{}", func.owner, func.schema, func.name)), Ok)
        } else {
            Ok(s.acting)
        }
    }

    fn body_select(&self, func: &FunctionCat) -> R<sqlparser::ast::Select> {
        let label = format!("{}.{}()", func.schema, func.name);
        let body = func.body.trim();
        let body = body
            .strip_prefix("BEGIN ATOMIC")
            .and_then(|b| b.trim_end().strip_suffix("END"))
            .map(|b| b.trim().trim_end_matches(';'))
            .unwrap_or(body);
        let body = body.strip_prefix("RETURN ").map(|e| format!("SELECT {e}")).unwrap_or_else(|| body.to_owned());
        let statements = Parser::parse_sql(&PostgreSqlDialect {}, &body)
            .map_err(|e| Unsupported(format!("the body of {label} does not parse ({e})")))?;
        match statements.as_slice() {
            [Statement::Query(q)] => unwrap_query(q).cloned(),
            _ => no(format!("the body of {label} (not a single SELECT)")),
        }
    }

    /// `outer IN (subquery)`.
    fn membership_in(&mut self, outer: Term, q: &Query, s: &Scope<'_>) -> R<Expr> {
        let outer = as_operand(outer)?;
        let select = unwrap_query(q)?;
        if select.projection.len() != 1 {
            return no("IN over a subquery of several columns");
        }
        let (SelectItem::UnnamedExpr(x) | SelectItem::ExprWithAlias { expr: x, .. }) = &select.projection[0] else {
            return no("IN over a wildcard");
        };
        if select.from.is_empty() {
            // `x IN (SELECT helper(args))`: a set-returning helper.
            let Sql::Function(f) = x else { return no("IN over a computed value") };
            let name = object_name(&f.name).join(".");
            let Some(func) = self.catalog.functions.get(&name).cloned() else {
                self.want_function(name.clone());
                return no(format!("the function {name}() (not read yet)"));
            };
            if !func.returns_set || func.language != "sql" || func.volatility == 'v' {
                return no(format!("IN (SELECT {name}(…)): only STABLE SQL set-returning helpers compile"));
            }
            let args: Vec<&Sql> = match &f.args {
                FunctionArguments::List(l) => l
                    .args
                    .iter()
                    .map(|a| match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e),
                        _ => no("a named function argument"),
                    })
                    .collect::<R<_>>()?,
                FunctionArguments::None => Vec::new(),
                FunctionArguments::Subquery(_) => return no("a function over a subquery"),
            };
            let bound = self.bind_args(&func, &args, s)?;
            let body = self.body_select(&func)?;
            let acting = self.acting_for(&func, s)?;
            let inner = Scope {
                outer: s.outer,
                outer_alias: None,
                inner: None,
                params: params(&func, bound),
                acting,
                role: s.role,
                search_path: function_search_path(&func),
                depth: s.depth + 1,
            };
            let q = Query {
                with: None,
                body: Box::new(SetExpr::Select(Box::new(body))),
                order_by: None,
                limit_clause: None,
                fetch: None,
                locks: vec![],
                for_clause: None,
                settings: None,
                format_clause: None,
                pipe_operators: vec![],
            };
            return self
                .membership_in(Term::Op(outer), &q, &inner)
                .map_err(|Unsupported(w)| Unsupported(format!("{}.{}(): {w}", func.schema, func.name)));
        }
        let (table, alias) = self.single_table(select, s)?;
        let scope = Scope { inner: Some((table, alias)), ..s.clone() };
        let group = match self.term(x, &scope)? {
            Term::Inner(i, ty) => (i, ty),
            _ => return no("IN over a subquery that does not select a column"),
        };
        if outer.ty() != Some(group.1) {
            return no("IN comparing different types");
        }
        let mut conds = Vec::new();
        if let Some(w) = &select.selection {
            conjuncts(w, &mut conds);
        }
        let (user, user_col, filter, pulled) = self.split_conditions(&conds, table, &scope, None)?;
        if !pulled.is_empty() {
            return no("conditions on the row or the viewer inside IN (SELECT …)");
        }
        let cache = self.cache(table, Some(group.0), user_col, filter, &scope)?;
        Ok(Expr::Member { cache, outer: Some(outer), user, sql_in: true })
    }

    /// `EXISTS (subquery)`.
    fn exists(&mut self, q: &Query, s: &Scope<'_>) -> R<Expr> {
        let select = unwrap_query(q)?;
        let (table, alias) = self.single_table(select, s)?;
        let scope = Scope { inner: Some((table, alias)), ..s.clone() };
        let mut conds = Vec::new();
        if let Some(w) = &select.selection {
            conjuncts(w, &mut conds);
        }
        let mut group: Option<(usize, Operand)> = None;
        let (user, user_col, filter, pulled) = self.split_conditions(&conds, table, &scope, Some(&mut group))?;
        let group_col = group.as_ref().map(|g| g.0);
        let cache = self.cache(table, group_col, user_col, filter, &scope)?;
        let member = Expr::Member { cache, outer: group.map(|g| g.1), user, sql_in: false };
        // Conditions that read only the row or the viewer: EXISTS is
        // two-valued, so they count only when true.
        Ok(pulled.into_iter().fold(member, |acc, p| acc.and(Expr::IsTrue(Box::new(p)))))
    }

    fn single_table<'a>(&mut self, select: &sqlparser::ast::Select, s: &Scope<'a>) -> R<(&'a TableCat, String)>
    where
        'c: 'a,
    {
        if select.from.len() != 1 || !select.from[0].joins.is_empty() {
            return no("a subquery over several tables");
        }
        if select.having.is_some() {
            return no("HAVING in a subquery");
        }
        let TableFactor::Table { name, alias, args: None, .. } = &select.from[0].relation else {
            return no("a subquery over something other than a table");
        };
        let parts = object_name(name);
        let candidates: Vec<String> = match parts.as_slice() {
            [schema, table] => vec![format!("{schema}.{table}")],
            [table] => match &s.search_path {
                Some(path) if !path.is_empty() => path.iter().map(|p| format!("{p}.{table}")).collect(),
                _ => return no(format!("the unqualified table {table}")),
            },
            _ => return no(format!("the table {}", parts.join("."))),
        };
        let catalog: &'a Catalog = self.catalog;
        for c in &candidates {
            let (schema, table) = c.split_once('.').unwrap_or(("", c));
            if let Some(t) = catalog.table(schema, table) {
                let alias = alias.as_ref().map_or_else(|| t.name.clone(), |a| ident(&a.name));
                return Ok((t, alias));
            }
        }
        for c in candidates {
            self.want_table(c);
        }
        no(format!("the table {} (not read yet)", parts.join(".")))
    }

    /// Splits a membership subquery's conditions into: the one linking a
    /// column of `T` to the viewer (`t.u = auth.uid()`), optionally the one
    /// linking a column of `T` to the judged row (EXISTS form, into
    /// `group`), conditions on `T` alone (the filter), and conditions on the
    /// row or viewer alone (`pulled`).
    #[allow(clippy::type_complexity)]
    fn split_conditions(
        &mut self,
        conds: &[Sql],
        table: &TableCat,
        s: &Scope<'_>,
        mut group: Option<&mut Option<(usize, Operand)>>,
    ) -> R<(Operand, usize, Option<Expr>, Vec<Expr>)> {
        let mut user: Option<(Operand, usize)> = None;
        let mut filters = Vec::new();
        let mut pulled = Vec::new();
        for c in conds {
            if let Sql::BinaryOp { left, op: BinaryOperator::Eq, right } = strip(c) {
                let (l, r) = (self.term(left, s)?, self.term(right, s)?);
                let link = match (&l, &r) {
                    (Term::Inner(i, ty), Term::Op(o)) | (Term::Op(o), Term::Inner(i, ty))
                        if !matches!(o, Operand::Const(_)) =>
                    {
                        if o.ty() != Some(*ty) {
                            return no(format!(
                                "a link between {} and a value of another type",
                                table.columns[*i].name
                            ));
                        }
                        Some((*i, o.clone()))
                    }
                    _ => None,
                };
                if let Some((i, o)) = link {
                    match &o {
                        Operand::Claim { .. } if user.is_none() => {
                            user = Some((o, i));
                            continue;
                        }
                        Operand::Column { .. } => match group.as_deref_mut() {
                            Some(slot @ None) => {
                                *slot = Some((i, o));
                                continue;
                            }
                            _ => return no("a subquery linked to the row twice"),
                        },
                        _ => return no("a subquery linked to the viewer twice"),
                    }
                }
            }
            // Not a link: a condition on T alone, or on the row/viewer alone.
            let (reads_inner, reads_outer) = self.reads(c, s)?;
            let alias = s.inner.as_ref().map(|(_, a)| a.clone());
            let inner_only = Scope { outer: table, outer_alias: alias, inner: None, ..s.clone() };
            if reads_inner && !reads_outer {
                // Compile against T as if it were the outer table, so
                // column indexes are T's.
                let f = self.pred(c, &inner_only)?;
                if has_claims(&f) {
                    return no("a subquery condition mixing the table and the viewer");
                }
                filters.push(f);
            } else if !reads_inner {
                pulled.push(self.pred(c, s)?);
            } else {
                return no("a subquery condition reading both tables");
            }
        }
        let Some((user, user_col)) = user else {
            return no(format!("a subquery on {} not linked to the viewer (t.col = auth.uid())", table.qualified()));
        };
        let filter = match simplify(Expr::all(filters)) {
            Expr::Const(Some(true)) => None,
            f => Some(f),
        };
        Ok((user, user_col, filter, pulled))
    }

    /// Which tables a condition reads: (the subquery's, the judged row's).
    fn reads(&mut self, c: &Sql, s: &Scope<'_>) -> R<(bool, bool)> {
        let mut inner = false;
        let mut outer = false;
        let mut bad = None;
        let _ = sqlparser::ast::visit_expressions(c, |e: &Sql| {
            let parts: Option<Vec<String>> = match e {
                Sql::Identifier(i) => Some(vec![ident(i)]),
                Sql::CompoundIdentifier(ids) => Some(ids.iter().map(ident).collect()),
                Sql::Subquery(_) | Sql::Exists { .. } | Sql::InSubquery { .. } => {
                    // (select auth.uid()) reads neither; anything else is rejected below.
                    None
                }
                _ => None,
            };
            if let Some(parts) = parts {
                match self.column(&parts, s) {
                    Ok(Term::Inner(..)) => inner = true,
                    Ok(Term::Op(Operand::Column { .. })) => outer = true,
                    Ok(_) => {}
                    Err(e) => bad = Some(e),
                }
            }
            std::ops::ControlFlow::<()>::Continue(())
        });
        if let Some(e) = bad {
            return Err(e);
        }
        Ok((inner, outer))
    }

    /// Registers (or finds) the cache for `T` with these columns.
    fn cache(
        &mut self,
        table: &TableCat,
        group: Option<usize>,
        user: usize,
        filter: Option<Expr>,
        s: &Scope<'_>,
    ) -> R<CacheId> {
        let name = table.qualified();
        // Who runs the subquery: its RLS and privileges decide what it sees.
        let acting = s.acting;
        let bypass = acting.superuser
            || acting.bypass_rls
            || !table.rls
            || (!table.force_rls
                && self.catalog.privileges.get(&(acting.name.clone(), table.oid)).is_some_and(|p| p.owner));
        if !bypass {
            return no(format!(
                "the subquery on {name} runs under {}'s row level security on it (read it through a SECURITY \
                 DEFINER helper to mirror it in memory)",
                acting.name
            ));
        }
        let mut used = vec![user];
        used.extend(group);
        if let Some(f) = &filter {
            f.for_each_column(&mut |i| used.push(i));
        }
        if !acting.superuser {
            let Some(p) = self.catalog.privileges.get(&(acting.name.clone(), table.oid)) else {
                return no(format!("{}'s privileges on {name} are unknown", acting.name));
            };
            if let Some(&i) = used.iter().find(|&&i| !p.table && !p.columns.get(i).copied().unwrap_or(false)) {
                return no(format!("{} may not SELECT {name}.{}", acting.name, table.columns[i].name));
            }
        }
        // The primary key when there is one (every old row carries it under
        // DEFAULT and FULL); without one, FULL's whole row.
        let primary: Vec<String> = table.columns.iter().filter(|c| c.primary_key).map(|c| c.name.clone()).collect();
        let key: Vec<String> = match table.replica_identity {
            'd' | 'f' if !primary.is_empty() => primary,
            'f' => table.columns.iter().map(|c| c.name.clone()).collect(),
            _ => Vec::new(),
        };
        if key.is_empty() {
            return no(format!(
                "{name} has no primary key and not REPLICA IDENTITY FULL, so its deletes cannot be followed \
                 (ALTER TABLE {name} REPLICA IDENTITY FULL)"
            ));
        }
        if !table.published {
            return no(format!(
                "{name} is not in the publication, so its changes cannot be followed \
                 (ALTER PUBLICATION supabase_realtime ADD TABLE {name})"
            ));
        }
        let ty = |i: usize| ColType::from_type_name(&table.columns[i].type_name).unwrap_or(ColType::Text);
        let spec = CacheSpec {
            table: table.oid,
            table_name: name,
            group: group.map(|g| (table.columns[g].name.clone(), ty(g))),
            user: (table.columns[user].name.clone(), ty(user)),
            filter,
            columns: table.columns.iter().map(|c| c.name.clone()).collect(),
            key,
        };
        if let Some(i) = self.caches.iter().position(|c| *c == spec) {
            return Ok(i);
        }
        self.caches.push(spec);
        Ok(self.caches.len() - 1)
    }
}

fn strip(e: &Sql) -> &Sql {
    match e {
        Sql::Nested(inner) => strip(inner),
        other => other,
    }
}

fn has_claims(e: &Expr) -> bool {
    let op = |o: &Operand| matches!(o, Operand::Claim { .. });
    match e {
        Expr::Cmp(l, _, r) => op(l) || op(r),
        Expr::In { operand, .. } | Expr::IsNull(operand, _) | Expr::Truth(operand) => op(operand),
        Expr::Not(x) | Expr::IsTrue(x) => has_claims(x),
        Expr::And(xs) | Expr::Or(xs) => xs.iter().any(has_claims),
        Expr::Member { .. } => true,
        Expr::Const(_) => false,
    }
}

fn params(func: &FunctionCat, bound: Vec<Bound>) -> HashMap<String, Bound> {
    let mut map = HashMap::new();
    for (i, b) in bound.into_iter().enumerate() {
        if let Some(name) = func.arg_names.get(i).filter(|n| !n.is_empty()) {
            map.insert(name.clone(), b.clone());
        }
        map.insert(format!("${}", i + 1), b);
    }
    map
}

fn function_search_path(func: &FunctionCat) -> Option<Vec<String>> {
    let setting = func.config.iter().find_map(|c| c.strip_prefix("search_path="))?;
    Some(
        setting
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_owned())
            .filter(|s| !s.is_empty() && s != "$user")
            .collect(),
    )
}

fn shorten(s: &str) -> String {
    if s.len() > 80 {
        let mut end = 77;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.to_owned()
    }
}

fn describe_term(t: &Term) -> &'static str {
    match t {
        Term::Op(_) => "a value",
        Term::Literal(_) => "a string",
        Term::Json(_) => "JSON",
        Term::List(_) => "an array",
        Term::Inner(..) => "a subquery column",
        Term::Pred(_) => "a condition",
    }
}

fn cast_err(ty: ColType) -> Unsupported {
    Unsupported(format!("a constant that is not a valid {}", ty.as_str()))
}

fn literal(ty: ColType, text: &str) -> R<Scalar> {
    Scalar::parse(ty, text).map_err(|_| cast_err(ty))
}

fn as_operand(t: Term) -> R<Operand> {
    match t {
        Term::Op(o) => Ok(o),
        Term::Literal(s) => Ok(Operand::Const(Some(Scalar::Text(s.into())))),
        _ => no(format!("{} where a value was expected", describe_term(&t))),
    }
}

fn cast(t: Term, ty: ColType) -> R<Term> {
    match t {
        Term::Literal(s) => Ok(Term::Op(Operand::Const(Some(literal(ty, &s)?)))),
        Term::Op(Operand::Const(None)) => Ok(Term::Op(Operand::Const(None))),
        Term::Op(Operand::Const(Some(v))) => Ok(Term::Op(Operand::Const(Some(v.cast(ty).map_err(|_| cast_err(ty))?)))),
        Term::Op(Operand::Claim { path, ty: from }) if from == ColType::Text || from == ty => {
            Ok(Term::Op(Operand::Claim { path, ty }))
        }
        Term::Op(Operand::Column { index, ty: col, cast: None }) => {
            if col == ty {
                return Ok(Term::Op(Operand::Column { index, ty: col, cast: None }));
            }
            // Casts walcast reproduces exactly: anything to text (PostgreSQL's
            // output), text to anything (its input).
            if ty == ColType::Text || col == ColType::Text {
                Ok(Term::Op(Operand::Column { index, ty: col, cast: Some(ty) }))
            } else {
                no(format!("a cast from {} to {}", col.as_str(), ty.as_str()))
            }
        }
        Term::Inner(i, col) if col == ty => Ok(Term::Inner(i, col)),
        other => no(format!("a cast of {} to {}", describe_term(&other), ty.as_str())),
    }
}

/// `l op r` with literals typed by the other side.
fn compare(l: Term, op: CmpOp, r: Term) -> R<Expr> {
    let (l, r) = match (l, r) {
        (Term::Literal(a), Term::Literal(b)) => {
            (Operand::Const(Some(Scalar::Text(a.into()))), Operand::Const(Some(Scalar::Text(b.into()))))
        }
        (Term::Literal(a), Term::Op(o)) => {
            let ty = o.ty().unwrap_or(ColType::Text);
            (Operand::Const(Some(literal(ty, &a)?)), o)
        }
        (Term::Op(o), Term::Literal(b)) => {
            let ty = o.ty().unwrap_or(ColType::Text);
            (o, Operand::Const(Some(literal(ty, &b)?)))
        }
        (Term::Op(a), Term::Op(b)) => (a, b),
        (Term::Pred(p), Term::Op(Operand::Const(Some(Scalar::Bool(b)))))
        | (Term::Op(Operand::Const(Some(Scalar::Bool(b)))), Term::Pred(p)) => {
            return match op {
                CmpOp::Eq if b => Ok(p),
                CmpOp::Eq | CmpOp::Ne if !b || op == CmpOp::Ne => {
                    Ok(if (op == CmpOp::Eq) != b { Expr::Not(Box::new(p)) } else { p })
                }
                _ => no("ordering of a condition"),
            };
        }
        (a, b) => return no(format!("a comparison of {} with {}", describe_term(&a), describe_term(&b))),
    };
    let (lt, rt) = (l.ty(), r.ty());
    if let (Some(a), Some(b)) = (lt, rt) {
        if a != b {
            return no(format!("a comparison of {} with {}", a.as_str(), b.as_str()));
        }
        if a == ColType::Text && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
            return no("ordering of text (it depends on the collation)");
        }
    }
    Ok(Expr::Cmp(l, op, r))
}

/// Folds constants (`'authenticated' = 'authenticated'`) and flattens.
pub fn simplify(e: Expr) -> Expr {
    match e {
        Expr::Cmp(Operand::Const(a), op, Operand::Const(b)) => match (a, b) {
            (Some(a), Some(b)) => Expr::Const(a.compare(&b).map(|o| match op {
                CmpOp::Eq => o.is_eq(),
                CmpOp::Ne => o.is_ne(),
                CmpOp::Lt => o.is_lt(),
                CmpOp::Le => o.is_le(),
                CmpOp::Gt => o.is_gt(),
                CmpOp::Ge => o.is_ge(),
            })),
            _ => Expr::Const(None),
        },
        Expr::In { operand: Operand::Const(None), .. } => Expr::Const(None),
        Expr::IsNull(Operand::Const(c), negated) => Expr::Const(Some(c.is_none() != negated)),
        Expr::Not(x) => match simplify(*x) {
            Expr::Const(c) => Expr::Const(c.map(|b| !b)),
            x => Expr::Not(Box::new(x)),
        },
        Expr::IsTrue(x) => match simplify(*x) {
            Expr::Const(c) => Expr::Const(Some(c == Some(true))),
            x => Expr::IsTrue(Box::new(x)),
        },
        Expr::And(xs) => {
            let mut out = Vec::new();
            for x in xs.into_iter().map(simplify) {
                match x {
                    Expr::Const(Some(true)) => {}
                    Expr::Const(Some(false)) => return Expr::Const(Some(false)),
                    Expr::And(inner) => out.extend(inner),
                    other => out.push(other),
                }
            }
            Expr::all(out)
        }
        Expr::Or(xs) => {
            let mut out = Vec::new();
            for x in xs.into_iter().map(simplify) {
                match x {
                    Expr::Const(Some(false)) => {}
                    Expr::Const(Some(true)) => return Expr::Const(Some(true)),
                    Expr::Or(inner) => out.extend(inner),
                    other => out.push(other),
                }
            }
            Expr::any(out)
        }
        other => other,
    }
}
