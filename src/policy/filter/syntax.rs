//! The filter's syntax: a string becomes `column=[not.]operator.value` clauses, values unquoted.
//!
//! The scanner walks the string once, left to right; all delimiters are ASCII, so byte positions are always
//! character boundaries. A clause ends at the first comma that is not inside a quoted value, an `in` list, or
//! (for unquoted values) parentheses.

use std::borrow::Cow;

use super::{shorten, FilterError};

/// Most values an `in` list may hold (as on Supabase).
pub(super) const MAX_IN_VALUES: usize = 100;

/// A filter operator (without `not.`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpName {
    /// `=`.
    Eq,
    /// `<>`.
    Neq,
    /// `<`.
    Lt,
    /// `<=`.
    Lte,
    /// `>`.
    Gt,
    /// `>=`.
    Gte,
    /// `= ANY(list)`.
    In,
    /// `LIKE`.
    Like,
    /// `ILIKE`.
    Ilike,
    /// `~`.
    Match,
    /// `~*`.
    Imatch,
    /// `IS NULL`, `IS TRUE`, `IS FALSE`, `IS UNKNOWN`.
    Is,
    /// `IS DISTINCT FROM`.
    IsDistinct,
}

impl OpName {
    const ALL: [OpName; 13] = [
        OpName::Eq,
        OpName::Neq,
        OpName::Lt,
        OpName::Lte,
        OpName::Gt,
        OpName::Gte,
        OpName::In,
        OpName::Like,
        OpName::Ilike,
        OpName::Match,
        OpName::Imatch,
        OpName::Is,
        OpName::IsDistinct,
    ];

    /// The name used in filters.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            OpName::Eq => "eq",
            OpName::Neq => "neq",
            OpName::Lt => "lt",
            OpName::Lte => "lte",
            OpName::Gt => "gt",
            OpName::Gte => "gte",
            OpName::In => "in",
            OpName::Like => "like",
            OpName::Ilike => "ilike",
            OpName::Match => "match",
            OpName::Imatch => "imatch",
            OpName::Is => "is",
            OpName::IsDistinct => "isdistinct",
        }
    }

    fn from_name(name: &str) -> Option<OpName> {
        OpName::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

/// A clause's value, unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RawValue<'s> {
    /// A single value.
    One(Cow<'s, str>),
    /// The values of an `in` list.
    List(Vec<Cow<'s, str>>),
}

/// One `column=[not.]operator.value` condition, before its column and value are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Clause<'s> {
    /// The column name, trimmed.
    pub(super) column: &'s str,
    /// Prefixed with `not.`.
    pub(super) negated: bool,
    /// The operator.
    pub(super) op: OpName,
    /// The value (a list exactly when `op` is `in`).
    pub(super) value: RawValue<'s>,
}

/// Splits `spec` into clauses; an empty or whitespace-only `spec` has none.
pub(super) fn clauses(spec: &str) -> Result<Vec<Clause<'_>>, FilterError> {
    let mut out = Vec::new();
    if spec.trim().is_empty() {
        return Ok(out);
    }
    let mut scanner = Scanner { text: spec, pos: 0 };
    loop {
        out.push(scanner.clause()?);
        // A clause ends at the end of the text or at its separating comma.
        if !scanner.eat(b',') {
            return Ok(out);
        }
    }
}

struct Scanner<'s> {
    text: &'s str,
    pos: usize,
}

impl<'s> Scanner<'s> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn rest(&self) -> &'s str {
        &self.text[self.pos..]
    }

    /// The text from `start` to the next comma, for error messages.
    fn condition_from(&self, start: usize) -> String {
        let rest = &self.text[start..];
        shorten(rest[..rest.find(',').unwrap_or(rest.len())].trim())
    }

    /// Reads up to (not including) the next `stop`; `None` when a comma or the end comes first.
    fn until(&mut self, stop: u8) -> Option<&'s str> {
        let rest = self.rest();
        let at = rest.bytes().position(|b| b == stop || b == b',')?;
        if rest.as_bytes()[at] != stop {
            return None;
        }
        self.pos += at + 1;
        Some(&rest[..at])
    }

    fn clause(&mut self) -> Result<Clause<'s>, FilterError> {
        let start = self.pos;
        let Some(column) = self.until(b'=') else {
            if self.condition_from(start).is_empty() {
                return Err(FilterError::EmptyCondition);
            }
            return Err(FilterError::MissingEquals { condition: self.condition_from(start) });
        };
        let column = column.trim();
        if column.is_empty() {
            return Err(FilterError::MissingColumn { condition: self.condition_from(start) });
        }
        let mut op = self.operator(start, column)?;
        let negated = op == "not";
        if negated {
            op = self.operator(start, column)?;
        }
        let op = OpName::from_name(op)
            .ok_or_else(|| FilterError::UnknownOperator { op: shorten(op), column: column.to_owned() })?;
        let value =
            if op == OpName::In { RawValue::List(self.list(column)?) } else { RawValue::One(self.scalar(column)?) };
        Ok(Clause { column, negated, op, value })
    }

    /// An operator name and its `.` (the clause began at `start`).
    fn operator(&mut self, start: usize, column: &str) -> Result<&'s str, FilterError> {
        match self.until(b'.') {
            Some(op) => Ok(op.trim()),
            None => Err(FilterError::MissingDot { condition: self.condition_from(start), column: column.to_owned() }),
        }
    }

    /// A single value: quoted, or everything up to the next comma outside parentheses (trimmed).
    fn scalar(&mut self, column: &str) -> Result<Cow<'s, str>, FilterError> {
        let start = self.pos;
        self.skip_spaces();
        if self.peek() == Some(b'"') {
            let value = self.quoted(column)?;
            self.skip_spaces();
            if !matches!(self.peek(), None | Some(b',')) {
                let rest = self.rest();
                return Err(FilterError::TextAfterQuote {
                    column: column.to_owned(),
                    rest: shorten(&rest[..rest.find(',').unwrap_or(rest.len())]),
                });
            }
            return Ok(Cow::Owned(value));
        }
        self.pos = start;
        let mut depth = 0usize;
        let bytes = self.text.as_bytes();
        while let Some(&b) = bytes.get(self.pos) {
            match b {
                b'(' => depth += 1,
                b')' => depth = depth.saturating_sub(1),
                b',' if depth == 0 => break,
                _ => {}
            }
            self.pos += 1;
        }
        Ok(Cow::Borrowed(self.text[start..self.pos].trim()))
    }

    /// A double-quoted value; `\` takes the next character literally.
    fn quoted(&mut self, column: &str) -> Result<String, FilterError> {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, escaped)) => out.push(escaped),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(FilterError::UnterminatedQuote { column: column.to_owned() })
    }

    /// `(a, "b,c", d)`: at most [`MAX_IN_VALUES`] values; `()` is an empty list.
    fn list(&mut self, column: &str) -> Result<Vec<Cow<'s, str>>, FilterError> {
        let bad = |reason: &str| FilterError::InvalidInList { column: column.to_owned(), reason: reason.to_owned() };
        self.skip_spaces();
        if !self.eat(b'(') {
            return Err(bad("expected `(` after `in.`"));
        }
        let mut values = Vec::new();
        self.skip_spaces();
        if !self.eat(b')') {
            loop {
                self.skip_spaces();
                let value = if self.peek() == Some(b'"') {
                    Cow::Owned(self.quoted(column)?)
                } else {
                    let rest = self.rest();
                    let len = rest.bytes().position(|b| b == b',' || b == b')').unwrap_or(rest.len());
                    self.pos += len;
                    let value = rest[..len].trim();
                    if value.is_empty() {
                        return Err(bad(if len == rest.len() {
                            "missing `)`"
                        } else {
                            "empty value in the list (quote it as \"\" for an empty string)"
                        }));
                    }
                    Cow::Borrowed(value)
                };
                values.push(value);
                if values.len() > MAX_IN_VALUES {
                    return Err(FilterError::TooManyValues);
                }
                self.skip_spaces();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b')') => {
                        self.pos += 1;
                        break;
                    }
                    None => return Err(bad("missing `)`")),
                    Some(_) => return Err(bad("expected `,` or `)` after a quoted value")),
                }
            }
        }
        self.skip_spaces();
        if !matches!(self.peek(), None | Some(b',')) {
            return Err(bad("unexpected text after `)`"));
        }
        Ok(values)
    }
}
