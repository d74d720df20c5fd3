//! `postgres_changes` filters: the `filter` string of a Supabase Realtime subscription, parsed once at subscribe
//! time against the table's columns and evaluated against every committed change of that table.
//!
//! # Where it sits
//!
//! The realtime layer calls [`Filter::parse`] when a client joins a channel with a `postgres_changes` binding
//! (a [`FilterError`] is sent back to the client, so its messages are written for people). The policy stage
//! then calls [`Filter::matches`] once per change × subscriber binding, after the change stage has assembled
//! the change; this is the hot path, so the filter's values are cast to the column types at parse time and an
//! evaluation only reads the row's datum (or compares bytes directly), without allocating for `eq`, `neq`,
//! ordering, `in`, `is` and `isdistinct`.
//!
//! # Grammar (realtime-protocol.md §6)
//!
//! ```text
//! filter    = "" | condition { "," condition }          (whitespace-only = no filter)
//! condition = column "=" [ "not." ] op "." value
//! op        = eq | neq | lt | lte | gt | gte | in | like | ilike | match | imatch | is | isdistinct
//! value     = quoted | unquoted                          (for every op but `in`)
//!           | "(" [ item { "," item } ] ")"              (for `in`: at most 100 items)
//! quoted    = '"' { char | "\" char } '"'                (PostgREST quoting; `\` takes the next char as is)
//! ```
//!
//! The classic form (`column=op.value`, split at the first `=` and then the first `.`) is the one-condition case.
//! Conditions are separated by commas outside quotes, `in` lists and parentheses; an empty condition (`a=eq.1,`,
//! `,,`) is an error. Column names, operators and unquoted values are trimmed of surrounding whitespace (quote a
//! value to keep it: supabase-js's builder quotes values with `, ( ) " \` or edge whitespace). A `"` inside an
//! unquoted value is an ordinary character.
//!
//! # Semantics
//!
//! - All conditions must hold (AND; there is no OR).
//! - INSERT and UPDATE are judged on the new row (`record`), DELETE on the old row (`old_record`: the key
//!   columns unless the table has `REPLICA IDENTITY FULL`), TRUNCATE never passes a non-empty filter.
//! - A condition whose column is not in the change's relation, or whose datum is [`Datum::Absent`] (an unchanged
//!   TOASTed value, or a non-key column of a key-only old row), fails, whatever the operator (Supabase rejects
//!   the change because the column is missing from wal2json's column list).
//! - SQL NULL fails every operator except `is` and `isdistinct`, also under `not.`: `not.eq.5` is
//!   `NOT (c = 5)`, which is NULL, not true, for a NULL `c`. `is` and `isdistinct` are two-valued, so `not.`
//!   simply negates them: `not.is.null` is `IS NOT NULL`, `not.isdistinct.x` is `IS NOT DISTINCT FROM x`.
//! - `is.null` works on every column; `is.true`, `is.false`, `is.unknown` (= `IS NULL`) need a `bool` column.
//!
//! # Types
//!
//! The value is cast to the column's type at parse time (a value that does not cast is an error naming the
//! column, the type and the value), and compared with that type's order:
//!
//! - `int2`, `int4`, `int8`: integers, range-checked per width (`42`, ` -7 `, `+3`).
//! - `float4`, `float8`: PostgreSQL's float order (`NaN` equals `NaN` and sorts above `Infinity`, `-0` equals
//!   `0`); `float4` values are read as `f32`. Accepts decimal and exponent forms, `NaN`, `Infinity`,
//!   `-Infinity`.
//! - `numeric`: exact decimal comparison, never through `f64` (`NaN` above everything, `Infinity`,
//!   `-Infinity`, exponent forms such as `1.5e3`).
//! - `text`, `varchar`, `name`, `bpchar`, `citext`: byte order, i.e. the `C` collation.
//! - `uuid`: as 128-bit numbers (PostgreSQL's order); either case, with or without hyphens, in braces.
//! - `bool`: `false` < `true`; `t`/`true`/`yes`/`on`/`1`, `f`/`false`/`no`/`off`/`0` and their unique prefixes,
//!   in any case.
//! - `date`: `YYYY-MM-DD` (with ` BC` if need be), `infinity`, `-infinity`.
//! - `timestamptz`: microseconds since the epoch, the infinities at the ends; `2026-11-25 10:00:00.123456+00`,
//!   `2026-11-25T10:00:00Z`, offsets such as `+05:30`, `+0530`, `-08`; no offset means UTC.
//! - `timestamp`: the same without a zone (an offset is accepted and ignored, as PostgreSQL does).
//! - Anything else (`jsonb`, `json`, arrays, enums, `interval`, domains, …): only `eq`, `neq`, `in` and
//!   `isdistinct`, comparing the exact text with the column's PostgreSQL text output.
//!
//! String details: `bpchar` ignores trailing spaces when comparing (not in patterns), `name` values are cut to
//! 63 bytes as PostgreSQL does, `citext` compares lower-cased and makes `like`/`match` case-insensitive.
//!
//! `like`, `ilike`, `match`, `imatch` need a string column. `like`/`ilike` patterns use `%` (any run), `_` (one
//! character) and `\` (escape); `ilike` is case-insensitive. `match`/`imatch` are unanchored regular
//! expression searches (`~`, `~*`), `.` matching newlines as in PostgreSQL. Patterns are compiled once, with the
//! `regex` crate and a size limit; an invalid or oversized pattern is rejected at parse time.
//!
//! # Invariants
//!
//! - Parsing never panics, whatever the string (a property test checks it).
//! - A parsed [`Filter`] only holds values that cast; evaluation never fails, it answers `false` for a row
//!   datum that does not parse as the column's type (possible only if the column's type changed after the
//!   filter was parsed).
//! - `eq`, `neq`, ordering, `in`, `is`, `isdistinct` allocate nothing per evaluation: text and uuid equality
//!   compare bytes (the uuid value is canonicalised at parse time), other types read the row's text in place.
//!
//! # Deviations from Supabase
//!
//! - Strings compare in byte order (PostgreSQL's `C` collation), not the database's collation: `lt`/`gt` on text
//!   may differ from Supabase for non-ASCII text and mixed case under a linguistic collation.
//! - `match`/`imatch` use Rust `regex` syntax, close to but not exactly PostgreSQL's ARE: no backreferences or
//!   lookaround, no `\m`/`\M`/`\y` word anchors, no embedded-option letters beyond `i`, `m`, `s`, `x`, `U`;
//!   matching is always linear-time. `ilike`/`imatch` fold case with Unicode simple case folding, which agrees
//!   with PostgreSQL's `lower()` except for a handful of characters.
//! - Types without a known order compare their text exactly: a `jsonb` or array value must be written in
//!   PostgreSQL's output form (`{"a": 1}`, `{1,2}`) to match; ordering and pattern operators on them are
//!   rejected where PostgreSQL might accept them (`jsonb` has an order).
//! - Date/time values accept the ISO forms only (see `datetime`); PostgreSQL also takes `Nov 25 2026`, named
//!   zones and `now`. Integers and numerics do not take PostgreSQL 16's `0x…` and `1_000` forms.
//! - Unquoted values lose their surrounding whitespace (`eq. a ` is `eq.a`); operators are lower-case only;
//!   `*` is an ordinary character in `like` patterns (PostgREST's URL alias for `%` is not taken).
//! - Syntax errors anywhere in the string are reported before an unknown column or a bad value.
//! - The column must exist in the table; Supabase additionally requires the subscriber's role to be able to
//!   select it (checked elsewhere, if at all).

mod datetime;
mod numeric;
mod syntax;
mod types;

#[cfg(test)]
mod tests;

use std::cmp::Ordering;

use regex::bytes::{Regex, RegexBuilder};

use crate::change::{Change, Datum, Op, RelationInfo, Row};
use syntax::{Clause, OpName, RawValue};
use types::{ColType, TextKind, Value};

/// Most bytes a compiled pattern may take (the `regex` crate's size limit).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Most bytes of lazy-DFA cache per compiled pattern.
const REGEX_DFA_SIZE_LIMIT: usize = 1 << 20;

/// Longest value or condition quoted in an error message.
const MAX_QUOTED_CHARS: usize = 80;

/// A parsed `postgres_changes` filter: conditions that must all hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    conditions: Vec<Condition>,
    /// The columns read, each once, in order of first appearance.
    columns: Vec<Box<str>>,
}

impl Filter {
    /// Parses `spec` for a table whose column types are given by `columns` (column name → `pg_type.typname`:
    /// `int4`, `text`, `timestamptz`, `_int4`, an enum's name, …; `None` for no such column).
    ///
    /// An empty or whitespace-only `spec` is no filter: it matches everything.
    pub fn parse<'a>(spec: &str, columns: impl Fn(&str) -> Option<&'a str>) -> Result<Filter, FilterError> {
        let mut filter = Filter::default();
        for clause in syntax::clauses(spec)? {
            let type_name =
                columns(clause.column).ok_or_else(|| FilterError::UnknownColumn { column: shorten(clause.column) })?;
            if !filter.columns.iter().any(|c| &**c == clause.column) {
                filter.columns.push(clause.column.into());
            }
            filter.conditions.push(Condition::new(clause, type_name)?);
        }
        Ok(filter)
    }

    /// Parses `spec` against the columns of `relation` (see [`Filter::parse`]).
    pub fn for_relation(spec: &str, relation: &RelationInfo) -> Result<Filter, FilterError> {
        Filter::parse(spec, |name| relation.columns.iter().find(|c| c.name == name).map(|c| c.type_name.as_str()))
    }

    /// Whether `change` passes: INSERT and UPDATE are judged on `record`, DELETE on `old_record`; TRUNCATE
    /// (and a change missing the row it is judged on) passes only an empty filter.
    pub fn matches(&self, change: &Change) -> bool {
        if self.is_empty() {
            return true;
        }
        let row = match change.op {
            Op::Insert | Op::Update => change.record.as_ref(),
            Op::Delete => change.old_record.as_ref(),
            Op::Truncate => None,
        };
        row.is_some_and(|row| self.matches_row(&change.relation, row))
    }

    /// Whether one row of `relation` passes every condition.
    pub fn matches_row(&self, relation: &RelationInfo, row: &Row) -> bool {
        self.conditions.iter().all(|condition| {
            relation
                .column_index(&condition.column)
                .and_then(|index| row.0.get(index))
                .is_some_and(|datum| condition.holds(datum))
        })
    }

    /// Whether there are no conditions (everything matches).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// The columns the filter reads, each once.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| &**c)
    }
}

/// How a row's datum becomes an index key for one filter column: opaque, compared by the hub's filter index
/// (two filters on the same column of the same type share a kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyKind(ColType);

impl KeyKind {
    /// Writes the key of `datum` into `out`; `false` when the datum can equal no filter value (NULL, absent,
    /// unreadable, or a type that is not indexed).
    pub fn row_key(self, datum: &Datum, out: &mut Vec<u8>) -> bool {
        match datum {
            Datum::Text(text) => self.0.text_key(text, out),
            Datum::Null | Datum::Absent => false,
        }
    }
}

/// One `eq` or `in` condition of a filter as hash keys: a row passes the filter only if its `column` has one of
/// `keys` (a necessary condition, not a sufficient one: the filter still decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexKeys {
    /// The condition's column.
    pub column: Box<str>,
    /// How that column's datum becomes a key.
    pub kind: KeyKind,
    /// The condition's values as keys, each once (empty for `in.()`, which nothing passes).
    pub keys: Vec<Box<[u8]>>,
}

impl Filter {
    /// The condition an index can look this filter up by: the non-negated `eq` or `in` with the fewest values
    /// (over a type with a canonical key). `None` for no filter, or one without such a condition (`neq`, `lt`,
    /// `like`, `is`, any `not.`, `numeric` columns): such filters must be evaluated for every change of their
    /// table.
    pub fn index_keys(&self) -> Option<IndexKeys> {
        let mut best: Option<IndexKeys> = None;
        let mut buf = Vec::new();
        for condition in &self.conditions {
            if condition.negated {
                continue;
            }
            let values: &[Value] = match &condition.test {
                Test::Compare(CmpOp::Eq, value) => std::slice::from_ref(value),
                Test::In(values) => values,
                _ => continue,
            };
            let mut keys: Vec<Box<[u8]>> = Vec::with_capacity(values.len());
            let mut indexable = true;
            for value in values {
                if !condition.ty.value_key(value, &mut buf) {
                    indexable = false;
                    break;
                }
                keys.push(buf.as_slice().into());
            }
            // At most 100 values (the parser's limit): sorting is cheap.
            keys.sort_unstable();
            keys.dedup();
            if indexable && best.as_ref().is_none_or(|b| keys.len() < b.keys.len()) {
                best = Some(IndexKeys { column: condition.column.clone(), kind: KeyKind(condition.ty), keys });
            }
        }
        best
    }

    /// Whether the filter costs an evaluation for every change of its table: it has conditions but none an
    /// index can look up ([`Filter::index_keys`] is `None`).
    pub fn is_unindexed(&self) -> bool {
        !self.is_empty() && self.index_keys().is_none()
    }
}

/// Why a filter string was rejected; the message is sent to the subscribing client.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FilterError {
    /// A condition between commas is empty (`a=eq.1,`, `a=eq.1,,b=eq.2`).
    #[error("empty condition in filter: each comma-separated condition must be `column=operator.value`")]
    EmptyCondition,
    /// A condition has no `=`.
    #[error("invalid filter condition `{condition}`: expected `column=operator.value`, but there is no `=`")]
    MissingEquals {
        /// The condition, as written.
        condition: String,
    },
    /// Nothing before the `=`.
    #[error("invalid filter condition `{condition}`: missing column name before `=`")]
    MissingColumn {
        /// The condition, as written.
        condition: String,
    },
    /// No `.` after the operator.
    #[error("invalid filter condition `{condition}`: expected `.` after the operator, as in `{column}=eq.value`")]
    MissingDot {
        /// The condition, as written.
        condition: String,
        /// Its column.
        column: String,
    },
    /// The operator is not one of the supported ones.
    #[error(
        "unknown filter operator `{op}` for column {column}; supported operators: eq, neq, lt, lte, gt, gte, in, \
         like, ilike, match, imatch, is, isdistinct (each may be prefixed with `not.`)"
    )]
    UnknownOperator {
        /// The operator, as written.
        op: String,
        /// Its column.
        column: String,
    },
    /// The table has no such column.
    #[error("invalid column for filter {column}")]
    UnknownColumn {
        /// The column, as written.
        column: String,
    },
    /// The operator is not defined for the column's type.
    #[error("operator {op} is not supported for column {column} of type {type_name}")]
    UnsupportedOperator {
        /// The operator (without `not.`).
        op: String,
        /// The column.
        column: String,
        /// Its type.
        type_name: String,
    },
    /// The value does not cast to the column's type.
    #[error("invalid value {value:?} for column {column} of type {type_name}: {reason}")]
    InvalidValue {
        /// The column.
        column: String,
        /// Its type.
        type_name: String,
        /// The value, unquoted (shortened if long).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An `in` list has more than 100 values.
    #[error("too many values for `in` filter. Maximum 100")]
    TooManyValues,
    /// A quoted value has no closing `"`.
    #[error("unterminated quoted value for column {column}: missing closing `\"`")]
    UnterminatedQuote {
        /// The column.
        column: String,
    },
    /// Text follows a quoted value before the next comma.
    #[error("unexpected text {rest:?} after the quoted value for column {column}")]
    TextAfterQuote {
        /// The column.
        column: String,
        /// The text after the closing quote.
        rest: String,
    },
    /// An `in` list is not `(value, …)`.
    #[error("invalid `in` list for column {column}: {reason}; expected `in.(value,value,…)`")]
    InvalidInList {
        /// The column.
        column: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `like`/`ilike` pattern or `match`/`imatch` regular expression does not compile.
    #[error("invalid {op} pattern for column {column}: {reason}")]
    InvalidPattern {
        /// The operator.
        op: String,
        /// The column.
        column: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `is` with something other than `null`, `true`, `false`, `unknown`.
    #[error("invalid value {value:?} for `is` on column {column}: expected null, true, false or unknown")]
    InvalidIsValue {
        /// The column.
        column: String,
        /// The value, as written.
        value: String,
    },
    /// `is.true`, `is.false` or `is.unknown` on a column that is not `bool`.
    #[error("`is.{value}` needs a bool column, but column {column} is of type {type_name}; use `is.null` instead")]
    IsNeedsBool {
        /// The column.
        column: String,
        /// Its type.
        type_name: String,
        /// `true`, `false` or `unknown`.
        value: String,
    },
}

/// One condition, ready to evaluate.
#[derive(Debug, Clone)]
struct Condition {
    column: Box<str>,
    ty: ColType,
    negated: bool,
    test: Test,
}

/// What a condition checks of a non-null datum.
#[derive(Debug, Clone)]
enum Test {
    /// `eq`, `neq`, `lt`, `lte`, `gt`, `gte`.
    Compare(CmpOp, Value),
    /// `in`.
    In(Box<[Value]>),
    /// `like`, `ilike`, `match`, `imatch` (LIKE patterns translated to anchored regexes).
    Pattern(Regex),
    /// `is.null`, `is.unknown`.
    IsNull,
    /// `is.true`, `is.false`.
    IsBool(bool),
    /// `isdistinct`.
    Distinct(Value),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
}

impl CmpOp {
    fn accepts(self, order: Ordering) -> bool {
        match self {
            CmpOp::Eq => order.is_eq(),
            CmpOp::Neq => order.is_ne(),
            CmpOp::Lt => order.is_lt(),
            CmpOp::Lte => order.is_le(),
            CmpOp::Gt => order.is_gt(),
            CmpOp::Gte => order.is_ge(),
        }
    }
}

impl Condition {
    fn new(clause: Clause<'_>, type_name: &str) -> Result<Condition, FilterError> {
        let ty = ColType::of(type_name);
        let column = clause.column;
        let op = clause.op;
        let unsupported = || FilterError::UnsupportedOperator {
            op: op.as_str().to_owned(),
            column: column.to_owned(),
            type_name: type_name.to_owned(),
        };
        let cast = |text: &str| {
            ty.cast(text).map_err(|reason| FilterError::InvalidValue {
                column: column.to_owned(),
                type_name: type_name.to_owned(),
                value: shorten(text),
                reason,
            })
        };
        let test = match (op, clause.value) {
            (OpName::In, RawValue::List(values)) => Test::In(values.iter().map(|v| cast(v)).collect::<Result<_, _>>()?),
            (OpName::In, RawValue::One(_)) | (_, RawValue::List(_)) => {
                // The scanner reads a list exactly for `in`.
                return Err(FilterError::InvalidInList {
                    column: column.to_owned(),
                    reason: "a list goes with `in` only".to_owned(),
                });
            }
            (OpName::Eq | OpName::Neq | OpName::Lt | OpName::Lte | OpName::Gt | OpName::Gte, RawValue::One(value)) => {
                let cmp = match op {
                    OpName::Eq => CmpOp::Eq,
                    OpName::Neq => CmpOp::Neq,
                    OpName::Lt => CmpOp::Lt,
                    OpName::Lte => CmpOp::Lte,
                    OpName::Gt => CmpOp::Gt,
                    _ => CmpOp::Gte,
                };
                if !matches!(cmp, CmpOp::Eq | CmpOp::Neq) && !ty.is_ordered() {
                    return Err(unsupported());
                }
                Test::Compare(cmp, cast(&value)?)
            }
            (OpName::Like | OpName::Ilike | OpName::Match | OpName::Imatch, RawValue::One(pattern)) => {
                if !ty.is_textual() {
                    return Err(unsupported());
                }
                let invalid = |reason: String| FilterError::InvalidPattern {
                    op: op.as_str().to_owned(),
                    column: column.to_owned(),
                    reason,
                };
                let citext = ty == ColType::Text(TextKind::Citext);
                let regex = match op {
                    OpName::Like | OpName::Ilike => like_to_regex(&pattern).map_err(|r| invalid(r.to_owned()))?,
                    _ => pattern.into_owned(),
                };
                let case_insensitive = citext || matches!(op, OpName::Ilike | OpName::Imatch);
                Test::Pattern(compile(&regex, case_insensitive).map_err(invalid)?)
            }
            (OpName::Is, RawValue::One(value)) => {
                let word = value.to_ascii_lowercase();
                let needs_bool = |word: &str| {
                    if ty == ColType::Bool {
                        Ok(())
                    } else {
                        Err(FilterError::IsNeedsBool {
                            column: column.to_owned(),
                            type_name: type_name.to_owned(),
                            value: word.to_owned(),
                        })
                    }
                };
                match word.as_str() {
                    "null" => Test::IsNull,
                    "unknown" => needs_bool("unknown").map(|()| Test::IsNull)?,
                    "true" => needs_bool("true").map(|()| Test::IsBool(true))?,
                    "false" => needs_bool("false").map(|()| Test::IsBool(false))?,
                    _ => return Err(FilterError::InvalidIsValue { column: column.to_owned(), value: shorten(&value) }),
                }
            }
            (OpName::IsDistinct, RawValue::One(value)) => Test::Distinct(cast(&value)?),
        };
        Ok(Condition { column: column.into(), ty, negated: clause.negated, test })
    }

    /// Whether the condition holds for `datum`.
    fn holds(&self, datum: &Datum) -> bool {
        match datum {
            Datum::Absent => false,
            Datum::Null => match self.test {
                // Two-valued operators: `not.` negates them.
                Test::IsNull | Test::Distinct(_) => !self.negated,
                Test::IsBool(_) => self.negated,
                // NULL, and NOT NULL is NULL too: never true.
                Test::Compare(..) | Test::In(_) | Test::Pattern(_) => false,
            },
            Datum::Text(text) => self.test_text(text).is_some_and(|result| result != self.negated),
        }
    }

    /// The operator's result for a non-null value; `None` when the text does not read as the column's type.
    fn test_text(&self, text: &[u8]) -> Option<bool> {
        match &self.test {
            Test::Compare(op, value) => {
                let cell = self.ty.read(text)?;
                match op {
                    CmpOp::Eq => cell.equals(value),
                    CmpOp::Neq => cell.equals(value).map(|equal| !equal),
                    _ => cell.compare(value).map(|order| op.accepts(order)),
                }
            }
            Test::In(values) => {
                let cell = self.ty.read(text)?;
                for value in values.iter() {
                    if cell.equals(value)? {
                        return Some(true);
                    }
                }
                Some(false)
            }
            Test::Pattern(regex) => Some(regex.is_match(text)),
            Test::IsNull => Some(false),
            Test::IsBool(want) => Some(types::parse_bool(text)? == *want),
            Test::Distinct(value) => Some(!self.ty.read(text)?.equals(value)?),
        }
    }
}

/// Translates a LIKE pattern (`%`, `_`, `\` escape) into an anchored regular expression.
fn like_to_regex(pattern: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(pattern.len() + 8);
    out.push_str(r"\A");
    let mut chars = pattern.chars();
    let mut after_percent = false;
    while let Some(c) = chars.next() {
        match c {
            '%' => {
                if !after_percent {
                    out.push_str("(?:.*)");
                }
                after_percent = true;
                continue;
            }
            '_' => out.push('.'),
            '\\' => match chars.next() {
                Some(escaped) => out.push_str(&regex::escape(escaped.encode_utf8(&mut [0; 4]))),
                None => return Err("LIKE pattern must not end with escape character"),
            },
            c => out.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
        after_percent = false;
    }
    out.push_str(r"\z");
    Ok(out)
}

/// Compiles a regular expression with the filter's limits.
fn compile(pattern: &str, case_insensitive: bool) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .dot_matches_new_line(true)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
        .map_err(|error| match error {
            regex::Error::CompiledTooBig(limit) => {
                format!("the pattern is too large (it compiles to more than {limit} bytes)")
            }
            regex::Error::Syntax(message) => {
                // The crate's message spans lines (pattern, caret, `error: …`); keep the last part.
                let reason = message.lines().rev().find_map(|line| line.trim().strip_prefix("error: "));
                reason.map_or_else(|| message.split_whitespace().collect::<Vec<_>>().join(" "), str::to_owned)
            }
            other => other.to_string(),
        })
}

/// `text`, cut to [`MAX_QUOTED_CHARS`] characters for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
