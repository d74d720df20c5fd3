//! Compiled policy predicates: the in-memory form of a table's SELECT
//! policies, evaluated against a WAL row, a viewer's JWT claims and the
//! membership caches, with SQL's three-valued logic.
//!
//! Sits under [`super::compile`] (which builds these trees from the policies
//! PostgreSQL stores) and is evaluated by the hub once per (candidate viewer,
//! row image). Pure: no I/O, no allocation on the usual paths.
//!
//! # Semantics (PostgreSQL's)
//!
//! - A predicate is `true`, `false` or unknown (`None`, SQL NULL); a row is
//!   visible only when the whole predicate is `true`.
//! - A column the row image does not carry ([`Datum::Absent`]: an unchanged
//!   TOASTed value, a non-key column of a key-only old row) is *unknown*, like
//!   NULL but also for `IS NULL`: Kleene logic then gives `true` only when the
//!   result holds whatever its value, so an absent column never makes a row
//!   visible that might not be.
//! - A failed cast (a `sub` that is not a uuid cast to `uuid`, a non-numeric
//!   claim cast to an integer) is an error in PostgreSQL — the whole query
//!   fails — and here [`Eval::Error`]: the row is not visible (fail closed).
//! - Only types whose comparison walcast reproduces exactly are compiled:
//!   `bool`, `int2/4/8`, `text`/`varchar`/`name` (equality only: ordering
//!   depends on the collation), `uuid`. Anything else is database-evaluated.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use crate::change::Datum;

/// Column and value types compiled in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ColType {
    /// `bool`.
    Bool,
    /// `int2`, `int4`, `int8`.
    Int,
    /// `text`, `varchar`, `name`.
    Text,
    /// `uuid`.
    Uuid,
}

impl ColType {
    /// From a `pg_type.typname` (or a cast's type name); `None` when walcast
    /// does not compile comparisons of that type.
    pub fn from_type_name(name: &str) -> Option<ColType> {
        match name.trim_matches('"').to_ascii_lowercase().as_str() {
            "bool" | "boolean" => Some(ColType::Bool),
            "int2" | "int4" | "int8" | "smallint" | "integer" | "int" | "bigint" => Some(ColType::Int),
            "text" | "varchar" | "character varying" | "name" => Some(ColType::Text),
            "uuid" => Some(ColType::Uuid),
            _ => None,
        }
    }

    /// The type's name, for plans and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            ColType::Bool => "bool",
            ColType::Int => "int",
            ColType::Text => "text",
            ColType::Uuid => "uuid",
        }
    }
}

/// A non-NULL typed value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scalar {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A string.
    Text(Arc<str>),
    /// A uuid.
    Uuid(Uuid),
}

/// A value that does not convert to the wanted type (PostgreSQL raises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastError;

impl Scalar {
    /// Parses PostgreSQL's text form of a value of type `ty` (the WAL's text
    /// output, a literal, a claim string).
    ///
    /// # Errors
    /// When the text is not a value of that type.
    pub fn parse(ty: ColType, text: &str) -> Result<Scalar, CastError> {
        match ty {
            ColType::Text => Ok(Scalar::Text(Arc::from(text))),
            ColType::Uuid => Uuid::parse_str(text.trim()).map(Scalar::Uuid).map_err(|_| CastError),
            ColType::Int => text.trim().parse::<i64>().map(Scalar::Int).map_err(|_| CastError),
            ColType::Bool => parse_bool(text).map(Scalar::Bool).ok_or(CastError),
        }
    }

    /// The value's type.
    pub fn ty(&self) -> ColType {
        match self {
            Scalar::Bool(_) => ColType::Bool,
            Scalar::Int(_) => ColType::Int,
            Scalar::Text(_) => ColType::Text,
            Scalar::Uuid(_) => ColType::Uuid,
        }
    }

    /// `value::ty`, as PostgreSQL casts.
    ///
    /// # Errors
    /// When PostgreSQL's cast would fail.
    pub fn cast(&self, ty: ColType) -> Result<Scalar, CastError> {
        if self.ty() == ty {
            return Ok(self.clone());
        }
        match ty {
            ColType::Text => Ok(Scalar::Text(Arc::from(self.canonical().as_str()))),
            _ => match self {
                Scalar::Text(t) => Scalar::parse(ty, t),
                // int ↔ bool casts exist in PostgreSQL (int4 only); policies
                // that need them are rare enough to be database-evaluated.
                _ => Err(CastError),
            },
        }
    }

    /// PostgreSQL's text output of the value (`t`/`f` for booleans as the
    /// WAL carries them; `true`/`false` is what `::text` gives, see
    /// [`Scalar::cast`]).
    pub fn canonical(&self) -> String {
        match self {
            Scalar::Bool(b) => if *b { "true" } else { "false" }.to_owned(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Text(t) => t.to_string(),
            Scalar::Uuid(u) => u.hyphenated().to_string(),
        }
    }

    /// The key form the membership caches use for values of this type: the
    /// text PostgreSQL sends in the WAL for it.
    pub fn key(&self) -> Box<str> {
        match self {
            Scalar::Bool(b) => if *b { "t" } else { "f" }.into(),
            other => other.canonical().into_boxed_str(),
        }
    }

    /// Compares two values of the same type; `None` across types.
    pub fn compare(&self, other: &Scalar) -> Option<Ordering> {
        match (self, other) {
            (Scalar::Bool(a), Scalar::Bool(b)) => Some(a.cmp(b)),
            (Scalar::Int(a), Scalar::Int(b)) => Some(a.cmp(b)),
            (Scalar::Text(a), Scalar::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (Scalar::Uuid(a), Scalar::Uuid(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Text(t) => write!(f, "'{t}'"),
            other => write!(f, "{}", other.canonical()),
        }
    }
}

/// PostgreSQL's boolean input (`t`, `true`, `yes`, `on`, `1` and unique
/// prefixes, any case).
fn parse_bool(text: &str) -> Option<bool> {
    let t = text.trim().to_ascii_lowercase();
    if t.is_empty() {
        return None;
    }
    let prefix = |word: &str, min: usize| t.len() >= min && word.starts_with(t.as_str());
    if t == "1" || prefix("true", 1) || prefix("yes", 1) || prefix("on", 2) {
        Some(true)
    } else if t == "0" || prefix("false", 1) || prefix("no", 1) || prefix("off", 3) {
        Some(false)
    } else {
        None
    }
}

/// A path into the JWT claims: `auth.uid()` is `sub`, `auth.role()` is
/// `role`, `auth.jwt() -> 'app_metadata' ->> 'org_id'` is
/// `app_metadata.org_id`. The value is taken as text (`->>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ClaimPath(pub Vec<Arc<str>>);

impl ClaimPath {
    /// The `sub` claim.
    pub fn sub() -> ClaimPath {
        ClaimPath(vec![Arc::from("sub")])
    }

    /// The claim's value as `->>` gives it: strings as they are, integers
    /// and booleans as their JSON text, NULL when absent or JSON null.
    ///
    /// # Errors
    /// Objects, arrays and non-integer numbers, whose text form walcast
    /// does not reproduce byte for byte: treated as a failed evaluation.
    pub fn text<'a>(&self, claims: &'a Value) -> Result<Option<std::borrow::Cow<'a, str>>, CastError> {
        let mut at = claims;
        for step in &self.0 {
            match at.get(&**step) {
                Some(v) => at = v,
                None => return Ok(None),
            }
        }
        match at {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(std::borrow::Cow::Borrowed(s))),
            Value::Bool(b) => Ok(Some(std::borrow::Cow::Borrowed(if *b { "true" } else { "false" }))),
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Some(std::borrow::Cow::Owned(n.to_string()))),
            _ => Err(CastError),
        }
    }
}

impl ClaimPath {
    /// The claim cast to `ty` (`None` = NULL), as `(… ->> 'k')::ty` gives it.
    ///
    /// # Errors
    /// When the text is not a value of `ty`, or is not reproducible text.
    pub fn value(&self, claims: &Value, ty: ColType) -> Result<Option<Scalar>, CastError> {
        match self.text(claims)? {
            None => Ok(None),
            Some(text) => Scalar::parse(ty, &text).map(Some),
        }
    }
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] if &**one == "sub" => f.write_str("auth.uid()"),
            [one] if &**one == "role" => f.write_str("auth.role()"),
            steps => {
                f.write_str("auth.jwt()")?;
                for (i, s) in steps.iter().enumerate() {
                    let arrow = if i + 1 == steps.len() { "->>" } else { "->" };
                    write!(f, " {arrow} '{s}'")?;
                }
                Ok(())
            }
        }
    }
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Operand {
    /// A column of the judged row: its index among the plan's columns, its
    /// type, and a cast applied to it.
    Column {
        /// Index into the table's column list the plan was compiled with.
        index: usize,
        /// The column's type.
        ty: ColType,
        /// `col::cast`.
        cast: Option<ColType>,
    },
    /// A JWT claim (text), cast to `ty` (`auth.uid()` is `sub` cast to
    /// `uuid`).
    Claim {
        /// Where in the claims.
        path: ClaimPath,
        /// The type it is cast to (`Text` when not cast).
        ty: ColType,
    },
    /// A constant (`None` = NULL).
    Const(Option<Scalar>),
}

impl Operand {
    /// The type the operand evaluates to.
    pub fn ty(&self) -> Option<ColType> {
        match self {
            Operand::Column { ty, cast, .. } => Some(cast.unwrap_or(*ty)),
            Operand::Claim { ty, .. } => Some(*ty),
            Operand::Const(c) => c.as_ref().map(Scalar::ty),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CmpOp {
    /// `=`.
    Eq,
    /// `<>`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

impl CmpOp {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Ne => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Le => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Ge => ord != Ordering::Less,
        }
    }

    /// The operator with its operands swapped (`a < b` ⇔ `b > a`).
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            other => other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// Identifies a membership cache in a [`super::caches::Caches`].
pub type CacheId = usize;

/// A compiled predicate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Expr {
    /// `true`, `false` or NULL.
    Const(Option<bool>),
    /// `left op right`.
    Cmp(Operand, CmpOp, Operand),
    /// `operand [NOT] IN (list)`; `list_has_null` when the list holds a NULL.
    In {
        /// The tested value.
        operand: Operand,
        /// The non-NULL values.
        list: Vec<Scalar>,
        /// Whether the list also held NULL.
        list_has_null: bool,
        /// `NOT IN`.
        negated: bool,
    },
    /// `operand IS [NOT] NULL`.
    IsNull(Operand, bool),
    /// A boolean operand used as a predicate.
    Truth(Operand),
    /// `NOT`.
    Not(Box<Expr>),
    /// `(e) IS TRUE`: two-valued.
    IsTrue(Box<Expr>),
    /// `AND` of all.
    And(Vec<Expr>),
    /// `OR` of all.
    Or(Vec<Expr>),
    /// `(outer, user) ∈ cache` — or, without `outer`, `user ∈ cache`: the
    /// membership subquery (or helper) the policy names, with its own
    /// conditions already applied by the cache.
    Member {
        /// The cache.
        cache: CacheId,
        /// The judged row's value linked to the cache's group column.
        outer: Option<Operand>,
        /// The viewer's value linked to the cache's user column.
        user: Operand,
        /// `outer IN (SELECT …)` (three-valued: NULL when `outer` is NULL
        /// and the set is not empty, or when it is not found and the set
        /// holds a NULL) rather than `EXISTS` (two-valued).
        sql_in: bool,
    },
}

/// The result of evaluating a predicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eval {
    /// `true`, `false`, or unknown (`None`).
    Value(Option<bool>),
    /// The evaluation raised (a failed cast): not visible.
    Error,
}

impl Eval {
    /// Whether the row is visible: only a definite `true`.
    pub fn visible(self) -> bool {
        self == Eval::Value(Some(true))
    }
}

/// What an evaluation reads besides the predicate.
pub trait Context {
    /// The row's value of plan column `index` (`Datum::Absent` if not carried).
    fn column(&self, index: usize) -> &Datum;
    /// The viewer's claims.
    fn claims(&self) -> &Value;
    /// The viewer's claim at `path` cast to `ty` (`None` = NULL). The hub
    /// answers from values resolved once per subscription.
    ///
    /// # Errors
    /// When the cast fails.
    fn claim(&self, path: &ClaimPath, ty: ColType) -> Result<Option<Scalar>, CastError> {
        path.value(self.claims(), ty)
    }
    /// Whether `(outer, user)` is in the cache (`outer == None`: whether
    /// `user` is in it at all).
    fn member(&self, cache: CacheId, outer: Option<&Scalar>, user: &Scalar) -> bool;
    /// Whether `user` has any row in the cache, and any with a NULL group.
    fn user_rows(&self, cache: CacheId, user: &Scalar) -> (bool, bool);
}

/// An operand's value: NULL, unknown (absent column), or a value.
enum Val {
    Null,
    Unknown,
    Some(Scalar),
}

/// Errors stop an evaluation (PostgreSQL raises).
type Step<T> = Result<T, CastError>;

fn operand(op: &Operand, ctx: &dyn Context) -> Step<Val> {
    match op {
        Operand::Const(None) => Ok(Val::Null),
        Operand::Const(Some(v)) => Ok(Val::Some(v.clone())),
        Operand::Column { index, ty, cast } => match ctx.column(*index) {
            Datum::Null => Ok(Val::Null),
            Datum::Absent => Ok(Val::Unknown),
            Datum::Text(bytes) => {
                // The WAL's text of a value of the column's own type: it
                // parses unless the column's type changed under the plan,
                // which the plan's reload catches; until then, unknown.
                let Ok(text) = std::str::from_utf8(bytes) else { return Ok(Val::Unknown) };
                let Ok(value) = Scalar::parse(*ty, text) else { return Ok(Val::Unknown) };
                match cast {
                    Some(to) => value.cast(*to).map(Val::Some),
                    None => Ok(Val::Some(value)),
                }
            }
        },
        Operand::Claim { path, ty } => match ctx.claim(path, *ty)? {
            None => Ok(Val::Null),
            Some(v) => Ok(Val::Some(v)),
        },
    }
}

fn and(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(false), _) | (_, Some(false)) => Some(false),
        (Some(true), Some(true)) => Some(true),
        _ => None,
    }
}

fn or(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (Some(false), Some(false)) => Some(false),
        _ => None,
    }
}

impl Expr {
    /// Evaluates the predicate.
    pub fn eval(&self, ctx: &dyn Context) -> Eval {
        match self.step(ctx) {
            Ok(v) => Eval::Value(v),
            Err(CastError) => Eval::Error,
        }
    }

    fn step(&self, ctx: &dyn Context) -> Step<Option<bool>> {
        Ok(match self {
            Expr::Const(v) => *v,
            Expr::Cmp(l, op, r) => match (operand(l, ctx)?, operand(r, ctx)?) {
                (Val::Some(a), Val::Some(b)) => a.compare(&b).map(|o| op.holds(o)),
                _ => None,
            },
            Expr::In { operand: o, list, list_has_null, negated } => match operand(o, ctx)? {
                Val::Some(v) => {
                    let found = list.iter().any(|x| v.compare(x) == Some(Ordering::Equal));
                    let r = if found {
                        Some(true)
                    } else if *list_has_null {
                        None
                    } else {
                        Some(false)
                    };
                    if *negated {
                        r.map(|b| !b)
                    } else {
                        r
                    }
                }
                Val::Null if list.is_empty() && !list_has_null => Some(*negated),
                _ => None,
            },
            Expr::IsNull(o, negated) => match operand(o, ctx)? {
                Val::Null => Some(!negated),
                Val::Some(_) => Some(*negated),
                Val::Unknown => None,
            },
            Expr::Truth(o) => match operand(o, ctx)? {
                Val::Some(Scalar::Bool(b)) => Some(b),
                _ => None,
            },
            Expr::Not(e) => e.step(ctx)?.map(|b| !b),
            Expr::IsTrue(e) => Some(e.step(ctx)? == Some(true)),
            Expr::And(xs) => {
                let mut acc = Some(true);
                for x in xs {
                    acc = and(acc, x.step(ctx)?);
                    if acc == Some(false) {
                        break;
                    }
                }
                acc
            }
            Expr::Or(xs) => {
                let mut acc = Some(false);
                for x in xs {
                    acc = or(acc, x.step(ctx)?);
                    if acc == Some(true) {
                        break;
                    }
                }
                acc
            }
            Expr::Member { cache, outer, user, sql_in } => {
                let user = match operand(user, ctx)? {
                    Val::Some(v) => v,
                    // `… WHERE u = NULL` selects nothing: false (IN of an
                    // empty set, or EXISTS); an unknown key: unknown.
                    Val::Null => return Ok(Some(false)),
                    Val::Unknown => return Ok(None),
                };
                match outer {
                    None => Some(ctx.member(*cache, None, &user)),
                    Some(o) => match operand(o, ctx)? {
                        Val::Some(v) => {
                            if ctx.member(*cache, Some(&v), &user) {
                                Some(true)
                            } else if *sql_in && ctx.user_rows(*cache, &user).1 {
                                None
                            } else {
                                Some(false)
                            }
                        }
                        // NULL IN (non-empty set) is NULL, IN (empty set)
                        // false; EXISTS with `g = NULL` is false.
                        Val::Null if *sql_in && ctx.user_rows(*cache, &user).0 => None,
                        Val::Null => Some(false),
                        Val::Unknown => None,
                    },
                }
            }
        })
    }

    /// `AND` of two predicates, flattened.
    pub fn and(self, other: Expr) -> Expr {
        match (self, other) {
            (Expr::Const(Some(true)), e) | (e, Expr::Const(Some(true))) => e,
            (Expr::And(mut a), Expr::And(b)) => {
                a.extend(b);
                Expr::And(a)
            }
            (Expr::And(mut a), e) | (e, Expr::And(mut a)) => {
                a.push(e);
                Expr::And(a)
            }
            (a, b) => Expr::And(vec![a, b]),
        }
    }

    /// `OR` of predicates (`false` when empty).
    pub fn any(mut xs: Vec<Expr>) -> Expr {
        match xs.len() {
            0 => Expr::Const(Some(false)),
            1 => xs.pop().unwrap_or(Expr::Const(Some(false))),
            _ => Expr::Or(xs),
        }
    }

    /// `AND` of predicates (`true` when empty).
    pub fn all(mut xs: Vec<Expr>) -> Expr {
        match xs.len() {
            0 => Expr::Const(Some(true)),
            1 => xs.pop().unwrap_or(Expr::Const(Some(true))),
            _ => Expr::And(xs),
        }
    }

    /// Calls `f` on every membership leaf.
    pub fn for_each_member(&self, f: &mut impl FnMut(CacheId)) {
        match self {
            Expr::Member { cache, .. } => f(*cache),
            Expr::Not(e) | Expr::IsTrue(e) => e.for_each_member(f),
            Expr::And(xs) | Expr::Or(xs) => xs.iter().for_each(|x| x.for_each_member(f)),
            _ => {}
        }
    }

    /// Calls `f` with every row column the predicate reads.
    pub fn for_each_column(&self, f: &mut impl FnMut(usize)) {
        let mut op = |o: &Operand| {
            if let Operand::Column { index, .. } = o {
                f(*index)
            }
        };
        match self {
            Expr::Cmp(l, _, r) => {
                op(l);
                op(r);
            }
            Expr::In { operand, .. } | Expr::IsNull(operand, _) | Expr::Truth(operand) => op(operand),
            Expr::Member { outer, user, .. } => {
                if let Some(o) = outer {
                    op(o);
                }
                op(user);
            }
            Expr::Not(e) | Expr::IsTrue(e) => e.for_each_column(f),
            Expr::And(xs) | Expr::Or(xs) => xs.iter().for_each(|x| x.for_each_column(f)),
            Expr::Const(_) => {}
        }
    }

    /// Writes the predicate for plans and logs, with the table's column
    /// names and a namer for caches.
    pub fn describe(&self, columns: &[String], cache: &dyn Fn(CacheId) -> String) -> String {
        let mut out = String::new();
        self.write(&mut out, columns, cache);
        out
    }

    fn write(&self, out: &mut String, columns: &[String], cache: &dyn Fn(CacheId) -> String) {
        use std::fmt::Write;
        let op = |o: &Operand| match o {
            Operand::Column { index, cast, .. } => {
                let name = columns.get(*index).map_or("?", String::as_str);
                match cast {
                    Some(c) => format!("{name}::{}", c.as_str()),
                    None => name.to_owned(),
                }
            }
            Operand::Claim { path, ty } => match (path.0.as_slice(), ty) {
                ([s], ColType::Uuid) if &**s == "sub" => "auth.uid()".into(),
                (_, ColType::Text) => path.to_string(),
                (_, t) => format!("({path})::{}", t.as_str()),
            },
            Operand::Const(None) => "NULL".into(),
            Operand::Const(Some(v)) => v.to_string(),
        };
        match self {
            Expr::Const(None) => out.push_str("NULL"),
            Expr::Const(Some(b)) => out.push_str(if *b { "true" } else { "false" }),
            Expr::Cmp(l, o, r) => {
                let _ = write!(out, "{} {} {}", op(l), o.as_str(), op(r));
            }
            Expr::In { operand, list, list_has_null, negated } => {
                let mut items: Vec<String> = list.iter().map(ToString::to_string).collect();
                if *list_has_null {
                    items.push("NULL".into());
                }
                let not = if *negated { "NOT " } else { "" };
                let _ = write!(out, "{} {not}IN ({})", op(operand), items.join(", "));
            }
            Expr::IsNull(o, negated) => {
                let _ = write!(out, "{} IS {}NULL", op(o), if *negated { "NOT " } else { "" });
            }
            Expr::Truth(o) => out.push_str(&op(o)),
            Expr::Not(e) => {
                out.push_str("NOT (");
                e.write(out, columns, cache);
                out.push(')');
            }
            Expr::IsTrue(e) => {
                out.push('(');
                e.write(out, columns, cache);
                out.push_str(") IS TRUE");
            }
            Expr::And(xs) | Expr::Or(xs) => {
                let sep = if matches!(self, Expr::And(_)) { " AND " } else { " OR " };
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    let nested = matches!(x, Expr::And(_) | Expr::Or(_));
                    if nested {
                        out.push('(');
                    }
                    x.write(out, columns, cache);
                    if nested {
                        out.push(')');
                    }
                }
            }
            Expr::Member { cache: c, outer, user, .. } => match outer {
                Some(o) => {
                    let _ = write!(out, "member {} ({} → {})", cache(*c), op(user), op(o));
                }
                None => {
                    let _ = write!(out, "member {} ({})", cache(*c), op(user));
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    struct Ctx {
        row: Vec<Datum>,
        claims: Value,
        pairs: Vec<(Option<&'static str>, &'static str)>,
    }

    impl Context for Ctx {
        fn column(&self, index: usize) -> &Datum {
            self.row.get(index).unwrap_or(&Datum::Absent)
        }
        fn claims(&self) -> &Value {
            &self.claims
        }
        fn member(&self, _: CacheId, outer: Option<&Scalar>, user: &Scalar) -> bool {
            let (outer, user) = (outer.map(Scalar::canonical), user.canonical());
            self.pairs.iter().any(|(o, u)| *u == user && (outer.is_none() || o.map(str::to_owned) == outer))
        }
        fn user_rows(&self, _: CacheId, user: &Scalar) -> (bool, bool) {
            let user = user.canonical();
            (self.pairs.iter().any(|(_, u)| *u == user), self.pairs.iter().any(|(o, u)| *u == user && o.is_none()))
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    const U: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

    fn col(index: usize, ty: ColType) -> Operand {
        Operand::Column { index, ty, cast: None }
    }

    fn uid() -> Operand {
        Operand::Claim { path: ClaimPath::sub(), ty: ColType::Uuid }
    }

    #[test]
    fn owner_and_null_semantics() {
        let owner = Expr::Cmp(uid(), CmpOp::Eq, col(0, ColType::Uuid));
        let ctx = |row: Datum, claims: Value| Ctx { row: vec![row], claims, pairs: vec![] };
        assert!(owner.eval(&ctx(text(U), json!({"sub": U}))).visible());
        assert!(owner.eval(&ctx(text(&U.to_uppercase()), json!({"sub": U}))).visible());
        assert!(!owner.eval(&ctx(Datum::Null, json!({"sub": U}))).visible());
        assert!(!owner.eval(&ctx(text(U), json!({}))).visible());
        assert_eq!(owner.eval(&ctx(text(U), json!({"sub": "nope"}))), Eval::Error);
        // Absent is unknown even under NOT and IS NULL.
        let not = Expr::Not(Box::new(owner.clone()));
        assert_eq!(not.eval(&ctx(Datum::Absent, json!({"sub": U}))), Eval::Value(None));
        let is_null = Expr::IsNull(col(0, ColType::Uuid), false);
        assert_eq!(is_null.eval(&ctx(Datum::Absent, json!({}))), Eval::Value(None));
        assert_eq!(is_null.eval(&ctx(Datum::Null, json!({}))), Eval::Value(Some(true)));
        // OR with a true branch is true whatever the unknown.
        let either = Expr::Or(vec![owner, Expr::Const(Some(true))]);
        assert!(either.eval(&ctx(Datum::Absent, json!({}))).visible());
    }

    #[test]
    fn in_lists_follow_sql() {
        let e = |negated, list_has_null| Expr::In {
            operand: col(0, ColType::Text),
            list: vec![Scalar::Text("a".into())],
            list_has_null,
            negated,
        };
        let ctx = |v: Datum| Ctx { row: vec![v], claims: json!({}), pairs: vec![] };
        assert_eq!(e(false, false).eval(&ctx(text("a"))), Eval::Value(Some(true)));
        assert_eq!(e(false, false).eval(&ctx(text("b"))), Eval::Value(Some(false)));
        assert_eq!(e(false, true).eval(&ctx(text("b"))), Eval::Value(None));
        assert_eq!(e(true, true).eval(&ctx(text("b"))), Eval::Value(None));
        assert_eq!(e(true, false).eval(&ctx(text("b"))), Eval::Value(Some(true)));
        assert_eq!(e(true, false).eval(&ctx(Datum::Null)), Eval::Value(None));
    }

    #[test]
    fn claims_and_membership() {
        let org =
            Operand::Claim { path: ClaimPath(vec![Arc::from("app_metadata"), Arc::from("org_id")]), ty: ColType::Uuid };
        let tenant = Expr::Cmp(col(0, ColType::Uuid), CmpOp::Eq, org);
        let member = Expr::Member { cache: 0, outer: Some(col(0, ColType::Uuid)), user: uid(), sql_in: true };
        let ctx = Ctx {
            row: vec![text(U)],
            claims: json!({"sub": "11111111-1111-1111-1111-111111111111", "app_metadata": {"org_id": U}}),
            pairs: vec![(Some(U), "11111111-1111-1111-1111-111111111111")],
        };
        assert!(tenant.eval(&ctx).visible());
        assert!(member.eval(&ctx).visible());
        let stranger = Ctx { claims: json!({"sub": "22222222-2222-2222-2222-222222222222"}), ..ctx };
        assert!(!member.eval(&stranger).visible());
        assert!(!tenant.eval(&stranger).visible());
    }

    #[test]
    fn casts_and_bools() {
        assert_eq!(parse_bool("t"), Some(true));
        assert_eq!(parse_bool("OFF"), Some(false));
        assert_eq!(parse_bool("o"), None);
        assert_eq!(Scalar::Uuid(U.parse().unwrap()).cast(ColType::Text), Ok(Scalar::Text(U.into())));
        assert_eq!(Scalar::Text("x".into()).cast(ColType::Int), Err(CastError));
        assert_eq!(Scalar::Bool(true).key(), "t".into());
    }
}
