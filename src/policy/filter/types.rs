//! Column types as the filter sees them: casting a filter value once, reading a row's text per evaluation, and
//! comparing the two with the type's semantics.

use std::cmp::Ordering;

use super::datetime::{self, DateVal, TsVal};
use super::numeric::{self, NumRef, Numeric};

/// PostgreSQL's `NAMEDATALEN - 1`: a `name` holds at most this many bytes.
const NAME_MAX_BYTES: usize = 63;

/// How a column's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum ColType {
    /// `int2`, `int4`, `int8`: integers in `min..=max`.
    Int {
        /// Smallest value of the type.
        min: i64,
        /// Largest value of the type.
        max: i64,
    },
    /// `float4` (`single`) or `float8`.
    Float {
        /// `float4`: values are read as `f32`.
        single: bool,
    },
    /// `numeric`, compared exactly.
    Numeric,
    /// A string type, compared bytewise.
    Text(TextKind),
    /// `uuid`, compared as a 128-bit number.
    Uuid,
    /// `bool` (`false` < `true`).
    Bool,
    /// `date`.
    Date,
    /// `timestamptz` (`zone`) or `timestamp`.
    Timestamp {
        /// `timestamptz`.
        zone: bool,
    },
    /// Anything else: only equality, on the exact text.
    Other,
}

/// The string types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum TextKind {
    /// `text`, `varchar`.
    Plain,
    /// `name`: a plain string cut to 63 bytes.
    Name,
    /// `bpchar` (`char(n)`): trailing spaces do not count in comparisons (they do for patterns).
    Bpchar,
    /// `citext`: case-insensitive everywhere (lower-cased comparisons and patterns).
    Citext,
}

impl ColType {
    /// The type of a column whose `pg_type.typname` (or SQL spelling) is `name`.
    pub(super) fn of(name: &str) -> ColType {
        match name {
            "int2" | "smallint" => ColType::Int { min: i16::MIN.into(), max: i16::MAX.into() },
            "int4" | "integer" | "int" => ColType::Int { min: i32::MIN.into(), max: i32::MAX.into() },
            "int8" | "bigint" => ColType::Int { min: i64::MIN, max: i64::MAX },
            "float4" | "real" => ColType::Float { single: true },
            "float8" | "double precision" => ColType::Float { single: false },
            "numeric" | "decimal" => ColType::Numeric,
            "text" | "varchar" | "character varying" => ColType::Text(TextKind::Plain),
            "name" => ColType::Text(TextKind::Name),
            "bpchar" | "character" => ColType::Text(TextKind::Bpchar),
            "citext" => ColType::Text(TextKind::Citext),
            "uuid" => ColType::Uuid,
            "bool" | "boolean" => ColType::Bool,
            "date" => ColType::Date,
            "timestamptz" | "timestamp with time zone" => ColType::Timestamp { zone: true },
            "timestamp" | "timestamp without time zone" => ColType::Timestamp { zone: false },
            _ => ColType::Other,
        }
    }

    /// Whether `lt`, `lte`, `gt`, `gte` are defined.
    pub(super) fn is_ordered(self) -> bool {
        self != ColType::Other
    }

    /// Whether `like`, `ilike`, `match`, `imatch` are defined.
    pub(super) fn is_textual(self) -> bool {
        matches!(self, ColType::Text(_))
    }

    /// Casts a filter value; the error is the reason, for a message.
    pub(super) fn cast(self, text: &str) -> Result<Value, String> {
        let bytes = text.as_bytes();
        Ok(match self {
            ColType::Int { min, max } => match parse_int(bytes) {
                Some(Ok(v)) if (min..=max).contains(&v) => Value::Int(v),
                Some(_) => return Err("value out of range for the type".into()),
                None => return Err("invalid input syntax for an integer".into()),
            },
            ColType::Float { single } => {
                match parse_float(bytes, single) {
                    Ok(v) => Value::Float(v),
                    Err(FloatError::Range) => return Err("value out of range for the type".into()),
                    Err(FloatError::Syntax) => return Err(
                        "invalid input syntax for a floating-point number (NaN, Infinity and -Infinity are allowed)"
                            .into(),
                    ),
                }
            }
            ColType::Numeric => Value::Numeric(Numeric::parse(text).map_err(|e| e.reason().to_owned())?),
            ColType::Text(TextKind::Plain) => Value::Text(text.into()),
            ColType::Text(TextKind::Name) => Value::Text(clip(text, NAME_MAX_BYTES).into()),
            ColType::Text(TextKind::Bpchar) => Value::Text(text.trim_end_matches(' ').into()),
            ColType::Text(TextKind::Citext) => Value::Text(text.chars().flat_map(char::to_lowercase).collect()),
            ColType::Uuid => {
                match parse_uuid(bytes) {
                    Some(bits) => Value::Uuid { bits, canonical: canonical_uuid(bits) },
                    None => return Err(
                        "invalid input syntax for a uuid (expected 32 hex digits, optionally hyphenated or in braces)"
                            .into(),
                    ),
                }
            }
            ColType::Bool => match parse_bool(bytes) {
                Some(b) => Value::Bool(b),
                None => {
                    return Err("invalid input syntax for a bool (expected true/false, t/f, yes/no, on/off, 1/0)".into())
                }
            },
            ColType::Date => Value::Date(datetime::parse_date(bytes).map_err(str::to_owned)?),
            ColType::Timestamp { zone } => {
                Value::Timestamp(datetime::parse_timestamp(bytes, zone).map_err(str::to_owned)?)
            }
            ColType::Other => Value::Exact(bytes.into()),
        })
    }

    /// Reads a row's text as this type; `None` when it does not parse (which PostgreSQL's output never causes
    /// unless the column's type changed since the filter was parsed).
    pub(super) fn read(self, text: &[u8]) -> Option<Cell<'_>> {
        Some(match self {
            ColType::Int { .. } => Cell::Int(parse_int(text)?.ok()?),
            ColType::Float { single } => Cell::Float(parse_float(text, single).ok()?),
            ColType::Numeric => Cell::Numeric(numeric::parse(text).ok()?),
            ColType::Text(TextKind::Plain | TextKind::Name) => Cell::Text(text),
            ColType::Text(TextKind::Bpchar) => Cell::Text(trim_trailing_spaces(text)),
            ColType::Text(TextKind::Citext) => Cell::Citext(std::str::from_utf8(text).ok()?),
            ColType::Uuid => Cell::Uuid(text),
            ColType::Bool => Cell::Bool(parse_bool(text)?),
            ColType::Date => Cell::Date(datetime::parse_date(text).ok()?),
            ColType::Timestamp { zone } => Cell::Timestamp(datetime::parse_timestamp(text, zone).ok()?),
            ColType::Other => Cell::Exact(text),
        })
    }
}

impl ColType {
    /// Writes the hash key of a filter value into `out` (cleared first): two values whose keys differ are
    /// never equal under this type. `false` for types not indexed (`numeric`, whose equal values have many
    /// spellings).
    pub(super) fn value_key(self, value: &Value, out: &mut Vec<u8>) -> bool {
        out.clear();
        match (self, value) {
            (ColType::Int { .. }, Value::Int(v)) => out.extend_from_slice(&v.to_be_bytes()),
            (ColType::Float { .. }, Value::Float(v)) => out.extend_from_slice(&float_key(*v).to_be_bytes()),
            (ColType::Text(_), Value::Text(t)) => out.extend_from_slice(t.as_bytes()),
            (ColType::Uuid, Value::Uuid { canonical, .. }) => out.extend_from_slice(canonical),
            (ColType::Bool, Value::Bool(b)) => out.push(u8::from(*b)),
            (ColType::Date, Value::Date(d)) => date_key(*d, out),
            (ColType::Timestamp { .. }, Value::Timestamp(t)) => ts_key(*t, out),
            (ColType::Other, Value::Exact(bytes)) => out.extend_from_slice(bytes),
            _ => return false,
        }
        true
    }

    /// Writes the hash key of a row's text into `out` (cleared first), such that whenever the row's value
    /// [`Cell::equals`] a filter value, the two keys are the same bytes. `false` when the text does not read
    /// as the type (it then equals nothing) or the type is not indexed.
    pub(super) fn text_key(self, text: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        match self {
            ColType::Int { .. } => match parse_int(text) {
                Some(Ok(v)) => out.extend_from_slice(&v.to_be_bytes()),
                _ => return false,
            },
            ColType::Float { single } => match parse_float(text, single) {
                Ok(v) => out.extend_from_slice(&float_key(v).to_be_bytes()),
                Err(_) => return false,
            },
            ColType::Numeric => return false,
            ColType::Text(TextKind::Plain | TextKind::Name) | ColType::Uuid | ColType::Other => {
                // A uuid equals a filter value only as its exact (canonical) text.
                out.extend_from_slice(text)
            }
            ColType::Text(TextKind::Bpchar) => out.extend_from_slice(trim_trailing_spaces(text)),
            ColType::Text(TextKind::Citext) => {
                let Ok(text) = std::str::from_utf8(text) else { return false };
                let mut buf = [0u8; 4];
                for c in text.chars().flat_map(char::to_lowercase) {
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            ColType::Bool => match parse_bool(text) {
                Some(b) => out.push(u8::from(b)),
                None => return false,
            },
            ColType::Date => match datetime::parse_date(text) {
                Ok(d) => date_key(d, out),
                Err(_) => return false,
            },
            ColType::Timestamp { zone } => match datetime::parse_timestamp(text, zone) {
                Ok(t) => ts_key(t, out),
                Err(_) => return false,
            },
        }
        true
    }
}

/// A float's key: equal under [`float_cmp`] iff equal bits (`-0` is `0`, every `NaN` one `NaN`).
fn float_key(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

fn date_key(d: DateVal, out: &mut Vec<u8>) {
    match d {
        DateVal::NegInfinity => out.push(0),
        DateVal::Finite(days) => {
            out.push(1);
            out.extend_from_slice(&days.to_be_bytes());
        }
        DateVal::Infinity => out.push(2),
    }
}

fn ts_key(t: TsVal, out: &mut Vec<u8>) {
    match t {
        TsVal::NegInfinity => out.push(0),
        TsVal::Finite(micros) => {
            out.push(1);
            out.extend_from_slice(&micros.to_be_bytes());
        }
        TsVal::Infinity => out.push(2),
    }
}

/// A filter value cast to its column's type (built once, at parse time).
#[derive(Debug, Clone)]
pub(super) enum Value {
    /// An integer.
    Int(i64),
    /// A float (a `float4` widened exactly).
    Float(f64),
    /// A `numeric`.
    Numeric(Numeric),
    /// A string: for `bpchar` without trailing spaces, for `citext` lower-cased, for `name` cut to 63 bytes.
    Text(Box<str>),
    /// A uuid and its canonical text (lower-case, hyphenated), which PostgreSQL's output always is.
    Uuid {
        /// The 128 bits, big-endian (the order PostgreSQL sorts by).
        bits: u128,
        /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
        canonical: [u8; 36],
    },
    /// A bool.
    Bool(bool),
    /// A date.
    Date(DateVal),
    /// A timestamp (UTC for `timestamptz`).
    Timestamp(TsVal),
    /// The exact text, for types compared by their text.
    Exact(Box<[u8]>),
}

/// A row's value read as its column's type, borrowing the row's text.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cell<'a> {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `numeric`.
    Numeric(NumRef<'a>),
    /// A string (`bpchar` without trailing spaces).
    Text(&'a [u8]),
    /// A `citext` string, compared lower-cased.
    Citext(&'a str),
    /// A uuid's text, parsed only when ordering asks for it.
    Uuid(&'a [u8]),
    /// A bool.
    Bool(bool),
    /// A date.
    Date(DateVal),
    /// A timestamp.
    Timestamp(TsVal),
    /// Exact text.
    Exact(&'a [u8]),
}

impl Cell<'_> {
    /// The order of the row's value against the filter's; `None` when they cannot be compared (a type mix-up
    /// or an unparsable uuid).
    pub(super) fn compare(&self, value: &Value) -> Option<Ordering> {
        Some(match (self, value) {
            (Cell::Int(a), Value::Int(b)) => a.cmp(b),
            (Cell::Float(a), Value::Float(b)) => float_cmp(*a, *b),
            (Cell::Numeric(a), Value::Numeric(b)) => numeric::compare(a, &b.as_ref()),
            (Cell::Text(a), Value::Text(b)) => (*a).cmp(b.as_bytes()),
            (Cell::Citext(a), Value::Text(b)) => a.chars().flat_map(char::to_lowercase).cmp(b.chars()),
            (Cell::Uuid(a), Value::Uuid { bits, .. }) => parse_uuid(a)?.cmp(bits),
            (Cell::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Cell::Date(a), Value::Date(b)) => a.cmp(b),
            (Cell::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
            (Cell::Exact(a), Value::Exact(b)) => (*a).cmp(&**b),
            _ => return None,
        })
    }

    /// Whether the row's value equals the filter's (a uuid is compared as canonical text, without parsing).
    pub(super) fn equals(&self, value: &Value) -> Option<bool> {
        match (self, value) {
            (Cell::Uuid(a), Value::Uuid { canonical, .. }) => Some(*a == canonical),
            (Cell::Text(a), Value::Text(b)) => Some(*a == b.as_bytes()),
            (Cell::Exact(a), Value::Exact(b)) => Some(*a == &**b),
            _ => self.compare(value).map(Ordering::is_eq),
        }
    }
}

/// PostgreSQL's float order: `NaN` equals `NaN` and sorts above everything, `-0` equals `0`.
pub(super) fn float_cmp(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// An integer with optional surrounding whitespace and sign: `None` for bad syntax, `Some(Err(()))` beyond
/// `i64`.
pub(super) fn parse_int(text: &[u8]) -> Option<Result<i64, ()>> {
    let text = text.trim_ascii();
    let (negative, digits) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Accumulate negatively so that i64::MIN fits.
    let mut value: i64 = 0;
    for &d in digits {
        match value.checked_mul(10).and_then(|v| v.checked_sub(i64::from(d - b'0'))) {
            Some(v) => value = v,
            None => return Some(Err(())),
        }
    }
    Some(if negative { Ok(value) } else { value.checked_neg().ok_or(()) })
}

/// Why a text is not a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FloatError {
    /// Not a number.
    Syntax,
    /// Overflows or underflows the type.
    Range,
}

/// A float as `float4in`/`float8in` read it: surrounding whitespace, `NaN`, `Infinity`, `inf` (signed,
/// case-insensitive), decimal and exponent notation. A `float4` is read as `f32` and widened exactly.
pub(super) fn parse_float(text: &[u8], single: bool) -> Result<f64, FloatError> {
    let text = text.trim_ascii();
    let unsigned = text.strip_prefix(b"-").or_else(|| text.strip_prefix(b"+")).unwrap_or(text);
    if unsigned.eq_ignore_ascii_case(b"nan") {
        return Ok(f64::NAN);
    }
    if unsigned.eq_ignore_ascii_case(b"infinity") || unsigned.eq_ignore_ascii_case(b"inf") {
        return Ok(if text[0] == b'-' { f64::NEG_INFINITY } else { f64::INFINITY });
    }
    if !unsigned.iter().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) {
        return Err(FloatError::Syntax);
    }
    // All ASCII by the check above.
    let text = std::str::from_utf8(text).map_err(|_| FloatError::Syntax)?;
    let value = if single {
        f64::from(text.parse::<f32>().map_err(|_| FloatError::Syntax)?)
    } else {
        text.parse::<f64>().map_err(|_| FloatError::Syntax)?
    };
    if value.is_infinite() {
        return Err(FloatError::Range);
    }
    if value == 0.0 {
        let mantissa = unsigned.split(|b| matches!(b, b'e' | b'E')).next().unwrap_or_default();
        if mantissa.iter().any(|b| (b'1'..=b'9').contains(b)) {
            return Err(FloatError::Range);
        }
    }
    Ok(value)
}

/// A uuid as `uuid_in` reads it: 32 hex digits in either case, a `-` allowed after any group of four, the whole
/// optionally in braces.
pub(super) fn parse_uuid(text: &[u8]) -> Option<u128> {
    let inner = match text {
        [b'{', inner @ .., b'}'] => inner,
        _ => text,
    };
    let mut bits: u128 = 0;
    let mut count = 0;
    let mut after_hyphen = false;
    for &b in inner {
        if b == b'-' {
            if after_hyphen || count == 0 || count % 4 != 0 || count == 32 {
                return None;
            }
            after_hyphen = true;
            continue;
        }
        let digit = (b as char).to_digit(16)?;
        if count == 32 {
            return None;
        }
        bits = bits << 4 | u128::from(digit);
        count += 1;
        after_hyphen = false;
    }
    (count == 32 && !after_hyphen).then_some(bits)
}

/// The canonical text of a uuid.
pub(super) fn canonical_uuid(bits: u128) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut nibble = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        *slot = HEX[((bits >> (124 - 4 * nibble)) & 0xf) as usize];
        nibble += 1;
    }
    out
}

/// A bool as `boolin` reads it: surrounding whitespace, any unique prefix of `true`, `false`, `yes`, `no`,
/// `on`, `off` (case-insensitive), `1`, `0`.
pub(super) fn parse_bool(text: &[u8]) -> Option<bool> {
    let text = text.trim_ascii();
    let prefix_of = |word: &[u8]| text.len() <= word.len() && word[..text.len()].eq_ignore_ascii_case(text);
    match text.first()?.to_ascii_lowercase() {
        b't' if prefix_of(b"true") => Some(true),
        b'y' if prefix_of(b"yes") => Some(true),
        b'f' if prefix_of(b"false") => Some(false),
        b'n' if prefix_of(b"no") => Some(false),
        b'o' if text.len() >= 2 && prefix_of(b"on") => Some(true),
        b'o' if text.len() >= 2 && prefix_of(b"off") => Some(false),
        b'1' if text.len() == 1 => Some(true),
        b'0' if text.len() == 1 => Some(false),
        _ => None,
    }
}

fn trim_trailing_spaces(text: &[u8]) -> &[u8] {
    let end = text.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    &text[..end]
}

/// `text` cut to at most `max` bytes on a character boundary.
fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        let want = 0xa0ee_bc99_9c0b_4ef8_bb6d_6bb9_bd38_0a11_u128;
        for text in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
            "{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11}",
        ] {
            assert_eq!(parse_uuid(text.as_bytes()), Some(want), "{text}");
        }
        for bad in [
            "",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eeb-c99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        ] {
            assert_eq!(parse_uuid(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(&canonical_uuid(want), b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }

    #[test]
    fn bools() {
        for t in ["t", "TRUE", "tr", "y", "Yes", "on", "ON", "1", " true "] {
            assert_eq!(parse_bool(t.as_bytes()), Some(true), "{t}");
        }
        for f in ["f", "False", "fal", "n", "NO", "of", "off", "0"] {
            assert_eq!(parse_bool(f.as_bytes()), Some(false), "{f}");
        }
        for bad in ["", "o", "2", "truee", "yess", "onn", "offf", "10", "nope"] {
            assert_eq!(parse_bool(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn ints_and_floats() {
        assert_eq!(parse_int(b"-9223372036854775808"), Some(Ok(i64::MIN)));
        assert_eq!(parse_int(b"9223372036854775807"), Some(Ok(i64::MAX)));
        assert_eq!(parse_int(b"9223372036854775808"), Some(Err(())));
        assert_eq!(parse_int(b" +42 "), Some(Ok(42)));
        assert_eq!(parse_int(b"4 2"), None);
        assert_eq!(parse_int(b"-"), None);
        assert_eq!(parse_float(b"1e-400", false), Err(FloatError::Range));
        assert_eq!(parse_float(b"1e400", false), Err(FloatError::Range));
        assert_eq!(parse_float(b"1e39", true), Err(FloatError::Range));
        assert_eq!(parse_float(b"0e-400", false), Ok(0.0));
        assert_eq!(parse_float(b"-Infinity", false), Ok(f64::NEG_INFINITY));
        assert_eq!(parse_float(b"0.1", true), Ok(f64::from(0.1f32)));
        assert!(parse_float(b"nan", false).unwrap().is_nan());
        assert_eq!(parse_float(b"1,5", false), Err(FloatError::Syntax));
        assert_eq!(float_cmp(f64::NAN, f64::INFINITY), Ordering::Greater);
        assert_eq!(float_cmp(-0.0, 0.0), Ordering::Equal);
    }

    #[test]
    fn name_values_are_clipped() {
        let long = "é".repeat(40);
        match ColType::Text(TextKind::Name).cast(&long).unwrap() {
            Value::Text(t) => assert_eq!(t.len(), 62),
            other => panic!("{other:?}"),
        }
    }
}
