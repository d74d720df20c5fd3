//! Exact `numeric` comparison, without going through `f64`.
//!
//! A finite value is kept as its significant decimal digits `d₁d₂…dₙ` (no leading or trailing zeros) and the
//! position `p` of the decimal point, meaning `0.d₁d₂…dₙ × 10^p`; zero has no digits. Two such values of the same
//! sign compare by `p` first and then digit by digit, a shorter digit string being the smaller when it is a prefix
//! of the other. The filter's value is parsed into an owned [`Numeric`] once; a row's text is read into a borrowed
//! [`NumRef`] that points into the text, so comparing allocates nothing.
//!
//! Order, as PostgreSQL's: `-Infinity` < every finite value < `Infinity` < `NaN`, and `NaN` equals `NaN`.

use std::cmp::Ordering;

/// Largest number of digits before the decimal point PostgreSQL's `numeric` accepts.
const MAX_INTEGER_DIGITS: i64 = 131_072;

/// Largest exponent magnitude read (`1e1000000`); beyond it the value is out of range for any `numeric`.
const MAX_EXPONENT: i64 = 1_000_000;

/// Why a text is not a `numeric`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NumericError {
    /// Not the syntax of a number.
    Syntax,
    /// A number, but outside what `numeric` holds.
    Range,
}

impl NumericError {
    /// The reason, for an error message.
    pub(super) fn reason(self) -> &'static str {
        match self {
            NumericError::Syntax => {
                "not a number (expected digits with an optional sign, `.`, exponent, or NaN/Infinity/-Infinity)"
            }
            NumericError::Range => "value overflows numeric format",
        }
    }
}

/// A normalised finite decimal whose digits are `hi` followed by `lo` (both ASCII digits).
#[derive(Debug, Clone, Copy)]
pub(super) struct DecRef<'a> {
    negative: bool,
    hi: &'a [u8],
    lo: &'a [u8],
    point: i64,
}

impl DecRef<'_> {
    fn is_zero(&self) -> bool {
        self.hi.is_empty() && self.lo.is_empty()
    }

    fn signum(&self) -> i8 {
        match (self.is_zero(), self.negative) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        }
    }

    fn digits(&self) -> impl Iterator<Item = &u8> {
        self.hi.iter().chain(self.lo)
    }
}

/// A `numeric` value borrowed from a text.
#[derive(Debug, Clone, Copy)]
pub(super) enum NumRef<'a> {
    /// `-Infinity`.
    NegInfinity,
    /// A finite value.
    Finite(DecRef<'a>),
    /// `Infinity`.
    Infinity,
    /// `NaN`.
    NaN,
}

impl NumRef<'_> {
    fn rank(&self) -> u8 {
        match self {
            NumRef::NegInfinity => 0,
            NumRef::Finite(_) => 1,
            NumRef::Infinity => 2,
            NumRef::NaN => 3,
        }
    }
}

/// PostgreSQL's `numeric` order.
pub(super) fn compare(a: &NumRef<'_>, b: &NumRef<'_>) -> Ordering {
    match (a, b) {
        (NumRef::Finite(x), NumRef::Finite(y)) => {
            let (sx, sy) = (x.signum(), y.signum());
            if sx != sy || sx == 0 {
                return sx.cmp(&sy);
            }
            let magnitude = x.point.cmp(&y.point).then_with(|| x.digits().cmp(y.digits()));
            if sx > 0 {
                magnitude
            } else {
                magnitude.reverse()
            }
        }
        _ => a.rank().cmp(&b.rank()),
    }
}

/// An owned `numeric` value (a filter's constant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Numeric {
    /// `-Infinity`.
    NegInfinity,
    /// A finite value: `0.digits × 10^point`, digits without leading or trailing zeros.
    Finite {
        /// Below zero (never set for zero).
        negative: bool,
        /// Significant ASCII digits.
        digits: Box<[u8]>,
        /// Position of the decimal point.
        point: i64,
    },
    /// `Infinity`.
    Infinity,
    /// `NaN`.
    NaN,
}

impl Numeric {
    /// Parses a `numeric` literal as PostgreSQL's `numeric_in` does (surrounding whitespace, sign, `.`,
    /// exponent, `NaN`, `Infinity`, `inf`, case-insensitive).
    pub(super) fn parse(text: &str) -> Result<Numeric, NumericError> {
        Ok(match parse(text.as_bytes())? {
            NumRef::NegInfinity => Numeric::NegInfinity,
            NumRef::Infinity => Numeric::Infinity,
            NumRef::NaN => Numeric::NaN,
            NumRef::Finite(d) => {
                Numeric::Finite { negative: d.negative, digits: d.digits().copied().collect(), point: d.point }
            }
        })
    }

    /// The value as a [`NumRef`], for [`compare`].
    pub(super) fn as_ref(&self) -> NumRef<'_> {
        match self {
            Numeric::NegInfinity => NumRef::NegInfinity,
            Numeric::Infinity => NumRef::Infinity,
            Numeric::NaN => NumRef::NaN,
            Numeric::Finite { negative, digits, point } => {
                NumRef::Finite(DecRef { negative: *negative, hi: digits, lo: &[], point: *point })
            }
        }
    }
}

/// Reads a `numeric` text without allocating.
pub(super) fn parse(text: &[u8]) -> Result<NumRef<'_>, NumericError> {
    let text = text.trim_ascii();
    let (negative, unsigned) = match text.first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if unsigned.eq_ignore_ascii_case(b"nan") {
        // PostgreSQL rejects a signed NaN.
        return if unsigned.len() == text.len() { Ok(NumRef::NaN) } else { Err(NumericError::Syntax) };
    }
    if unsigned.eq_ignore_ascii_case(b"infinity") || unsigned.eq_ignore_ascii_case(b"inf") {
        return Ok(if negative { NumRef::NegInfinity } else { NumRef::Infinity });
    }

    let int_len = unsigned.iter().take_while(|b| b.is_ascii_digit()).count();
    let int = &unsigned[..int_len];
    let mut rest = &unsigned[int_len..];
    let mut frac: &[u8] = &[];
    if let Some((b'.', after)) = rest.split_first() {
        let frac_len = after.iter().take_while(|b| b.is_ascii_digit()).count();
        frac = &after[..frac_len];
        rest = &after[frac_len..];
    }
    if int.is_empty() && frac.is_empty() {
        return Err(NumericError::Syntax);
    }
    let mut exponent: i64 = 0;
    if let Some((b'e' | b'E', after)) = rest.split_first() {
        let (exp_negative, digits) = match after.first() {
            Some(b'-') => (true, &after[1..]),
            Some(b'+') => (false, &after[1..]),
            _ => (false, after),
        };
        let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 {
            return Err(NumericError::Syntax);
        }
        for &d in &digits[..len] {
            exponent = exponent * 10 + i64::from(d - b'0');
            if exponent > MAX_EXPONENT {
                return Err(NumericError::Range);
            }
        }
        if exp_negative {
            exponent = -exponent;
        }
        rest = &digits[len..];
    }
    if !rest.is_empty() {
        return Err(NumericError::Syntax);
    }

    // Normalise: drop leading zeros (possibly running into the fraction) and trailing zeros.
    let mut hi = int;
    let mut lo = frac;
    let mut point = int.len() as i64 + exponent;
    let leading = hi.iter().take_while(|&&b| b == b'0').count();
    hi = &hi[leading..];
    point -= leading as i64;
    if hi.is_empty() {
        let leading = lo.iter().take_while(|&&b| b == b'0').count();
        lo = &lo[leading..];
        point -= leading as i64;
    }
    let trailing = lo.iter().rev().take_while(|&&b| b == b'0').count();
    lo = &lo[..lo.len() - trailing];
    if lo.is_empty() {
        let trailing = hi.iter().rev().take_while(|&&b| b == b'0').count();
        hi = &hi[..hi.len() - trailing];
    }
    if hi.is_empty() && lo.is_empty() {
        return Ok(NumRef::Finite(DecRef { negative: false, hi, lo, point: 0 }));
    }
    if point > MAX_INTEGER_DIGITS {
        return Err(NumericError::Range);
    }
    Ok(NumRef::Finite(DecRef { negative, hi, lo, point }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str) -> Ordering {
        let b = Numeric::parse(b).unwrap();
        compare(&parse(a.as_bytes()).unwrap(), &b.as_ref())
    }

    #[test]
    fn orders_like_postgresql() {
        use Ordering::*;
        let cases = [
            ("0", "-0", Equal),
            ("0.000", "0", Equal),
            ("1", "1.000", Equal),
            ("1e3", "1000", Equal),
            ("1.5E-2", "0.015", Equal),
            ("00012.3400", "12.34", Equal),
            ("12.34", "12.340001", Less),
            ("-12.34", "-12.340001", Greater),
            ("99", "100", Less),
            ("-99", "-100", Greater),
            ("0.1", "0.09999999999999999999999999", Greater),
            ("-0.5", "0", Less),
            ("0", "0.0000001", Less),
            ("123456789012345678901234567890", "123456789012345678901234567891", Less),
            ("Infinity", "99e999", Greater),
            ("-Infinity", "-99e999", Less),
            ("NaN", "Infinity", Greater),
            ("NaN", "nan", Equal),
            ("-inf", "-Infinity", Equal),
            (" 7 ", "7", Equal),
            ("+7.", ".7e1", Equal),
        ];
        for (a, b, want) in cases {
            assert_eq!(cmp(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn rejects_non_numbers() {
        for bad in ["", " ", ".", "-", "1e", "1e+", "1.2.3", "abc", "1 2", "--1", "-NaN", "0x10", "1e9999999"] {
            assert!(Numeric::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Numeric::parse("1e1000001"), Err(NumericError::Range));
        assert_eq!(Numeric::parse("1e131073"), Err(NumericError::Range));
        assert!(Numeric::parse("1e131071").is_ok());
        assert!(Numeric::parse("1e-131071").is_ok());
    }
}
