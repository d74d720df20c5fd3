//! `date`, `timestamp` and `timestamptz` values in their ISO text forms, read without allocating.
//!
//! Accepted (filter values and row text alike):
//!
//! - `date`: `YYYY-MM-DD` (four to seven year digits, one or two month and day digits), an optional ` BC`/` AD`,
//!   and `infinity`, `+infinity`, `-infinity`, `epoch` (case-insensitive).
//! - `timestamp`/`timestamptz`: a date, then optionally ` ` or `T` and `HH:MM[:SS[.fraction]]`, then optionally a
//!   zone (`Z`, `UTC`, `GMT`, `±HH`, `±HH:MM`, `±HHMM`, `±HH:MM:SS`), then optionally ` BC`/` AD`; the same
//!   special words. The fraction is rounded to microseconds the way PostgreSQL does (`rint` of the fraction
//!   times 10⁶). For `timestamptz` a value without a zone is taken as UTC (the session time zone of the
//!   replication connection); for `timestamp` a zone is accepted and ignored, as PostgreSQL does.
//!
//! Not accepted, although PostgreSQL's date parser is: other date orders and separators (`11/25/2026`,
//! `Nov 25 2026`, `20261125`), two- or three-digit years, named time zones other than UTC/GMT, `now`, `today`
//! and friends (they depend on when they are read).
//!
//! A date is kept as days since 1970-01-01, a timestamp as microseconds since 2000-01-01 00:00 UTC (PostgreSQL's
//! own representation, so its whole range fits an `i64`); the infinities sort below and above every finite value.

/// Microseconds per second.
const USECS_PER_SEC: i128 = 1_000_000;
/// Microseconds per day.
const USECS_PER_DAY: i128 = 86_400 * USECS_PER_SEC;
/// Days from 1970-01-01 to 2000-01-01.
const DAYS_1970_TO_2000: i128 = 10_957;
/// PostgreSQL's `MIN_TIMESTAMP`: 4714-11-24 00:00 BC, in microseconds since 2000.
const MIN_TIMESTAMP: i128 = -211_813_488_000_000_000;
/// PostgreSQL's `END_TIMESTAMP` (exclusive): 294277-01-01 00:00, in microseconds since 2000.
const END_TIMESTAMP: i128 = 9_223_371_331_200_000_000;
/// Largest year of a `date` (5874897 AD).
const MAX_DATE_YEAR: i64 = 5_874_897;

/// A `date`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum DateVal {
    /// `-infinity`.
    NegInfinity,
    /// Days since 1970-01-01.
    Finite(i64),
    /// `infinity`.
    Infinity,
}

/// A `timestamp` or `timestamptz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TsVal {
    /// `-infinity`.
    NegInfinity,
    /// Microseconds since 2000-01-01 00:00 (UTC for `timestamptz`).
    Finite(i64),
    /// `infinity`.
    Infinity,
}

/// Reads a `date`.
pub(super) fn parse_date(text: &[u8]) -> Result<DateVal, &'static str> {
    let text = text.trim_ascii();
    match special(text) {
        Some(Special::NegInfinity) => return Ok(DateVal::NegInfinity),
        Some(Special::Infinity) => return Ok(DateVal::Infinity),
        Some(Special::Epoch) => return Ok(DateVal::Finite(0)),
        None => {}
    }
    let mut cursor = Cursor { text, pos: 0 };
    let (year, month, day) = cursor.date().ok_or(DATE_SYNTAX)?;
    let bc = cursor.era();
    if !cursor.at_end() {
        return Err(DATE_SYNTAX);
    }
    let days = civil_days(year, month, day, bc)?;
    // Julian day 0 (4714-11-24 BC) is the first date PostgreSQL holds.
    if days < days_from_civil(-4713, 11, 24) {
        return Err(DATE_RANGE);
    }
    Ok(DateVal::Finite(days))
}

/// Reads a `timestamp` (`with_zone` false: a zone is ignored) or `timestamptz` (`with_zone` true: the zone
/// is applied, none means UTC).
pub(super) fn parse_timestamp(text: &[u8], with_zone: bool) -> Result<TsVal, &'static str> {
    let text = text.trim_ascii();
    match special(text) {
        Some(Special::NegInfinity) => return Ok(TsVal::NegInfinity),
        Some(Special::Infinity) => return Ok(TsVal::Infinity),
        Some(Special::Epoch) => return Ok(TsVal::Finite(-(DAYS_1970_TO_2000 * USECS_PER_DAY) as i64)),
        None => {}
    }
    let mut cursor = Cursor { text, pos: 0 };
    let (year, month, day) = cursor.date().ok_or(TIMESTAMP_SYNTAX)?;
    let time_of_day = cursor.time()?;
    let offset = cursor.zone()?;
    let bc = cursor.era();
    if !cursor.at_end() {
        return Err(TIMESTAMP_SYNTAX);
    }
    let days = civil_days(year, month, day, bc)?;
    let mut usecs = (i128::from(days) - DAYS_1970_TO_2000) * USECS_PER_DAY + time_of_day;
    if with_zone {
        usecs -= i128::from(offset) * USECS_PER_SEC;
    }
    if !(MIN_TIMESTAMP..END_TIMESTAMP).contains(&usecs) {
        return Err(TIMESTAMP_RANGE);
    }
    Ok(TsVal::Finite(usecs as i64))
}

const DATE_SYNTAX: &str = "expected a date as YYYY-MM-DD (or infinity, -infinity)";
const DATE_RANGE: &str = "date out of range";
const TIMESTAMP_SYNTAX: &str =
    "expected an ISO timestamp such as 2026-11-25 10:00:00.123456+00 (or 2026-11-25T10:00:00Z, infinity, -infinity)";
const TIMESTAMP_RANGE: &str = "timestamp out of range";
const FIELD_RANGE: &str = "date/time field value out of range";
const ZONE_RANGE: &str = "time zone displacement out of range";

enum Special {
    NegInfinity,
    Infinity,
    Epoch,
}

fn special(text: &[u8]) -> Option<Special> {
    if text.eq_ignore_ascii_case(b"infinity") || text.eq_ignore_ascii_case(b"+infinity") {
        Some(Special::Infinity)
    } else if text.eq_ignore_ascii_case(b"-infinity") {
        Some(Special::NegInfinity)
    } else if text.eq_ignore_ascii_case(b"epoch") {
        Some(Special::Epoch)
    } else {
        None
    }
}

/// Days since 1970-01-01 of a validated calendar date (`year` as written, `bc` for years before Christ).
fn civil_days(year: i64, month: u32, day: u32, bc: bool) -> Result<i64, &'static str> {
    if year == 0 && bc {
        return Err(FIELD_RANGE);
    }
    if year > MAX_DATE_YEAR {
        return Err(DATE_RANGE);
    }
    // Astronomical numbering: 1 BC is year 0.
    let year = if bc { 1 - year } else { year };
    if year == 0 && !bc {
        // Year 0 AD does not exist; PostgreSQL rejects it too.
        return Err(FIELD_RANGE);
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(FIELD_RANGE);
    }
    Ok(days_from_civil(year, month, day))
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year numbering).
pub(super) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

struct Cursor<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos == self.text.len()
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

    /// Between `min` and `max` ASCII digits as a number.
    fn number(&mut self, min: usize, max: usize) -> Option<i64> {
        let len = self.text[self.pos..].iter().take_while(|b| b.is_ascii_digit()).count();
        if len < min || len > max {
            return None;
        }
        Some(self.fixed(len))
    }

    /// Exactly `len` bytes the caller knows are digits, as a number.
    fn fixed(&mut self, len: usize) -> i64 {
        let value = self.text[self.pos..self.pos + len].iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
        self.pos += len;
        value
    }

    /// `YYYY-MM-DD`.
    fn date(&mut self) -> Option<(i64, u32, u32)> {
        let year = self.number(4, 7)?;
        if !self.eat(b'-') {
            return None;
        }
        let month = self.number(1, 2)?;
        if !self.eat(b'-') {
            return None;
        }
        let day = self.number(1, 2)?;
        Some((year, month as u32, day as u32))
    }

    /// An optional ` HH:MM[:SS[.ffffff]]` or `THH:MM…`, as microseconds since midnight (0 when absent).
    fn time(&mut self) -> Result<i128, &'static str> {
        let start = self.pos;
        match self.peek() {
            Some(b'T' | b't') => self.pos += 1,
            Some(b) if b.is_ascii_whitespace() => self.skip_spaces(),
            _ => return Ok(0),
        }
        if !self.peek().is_some_and(|b| b.is_ascii_digit()) {
            // A zone or era after the date, not a time.
            self.pos = start;
            return Ok(0);
        }
        let hour = self.number(1, 2).ok_or(TIMESTAMP_SYNTAX)?;
        if !self.eat(b':') {
            return Err(TIMESTAMP_SYNTAX);
        }
        let minute = self.number(1, 2).ok_or(TIMESTAMP_SYNTAX)?;
        let mut second = 0;
        let mut fraction: i128 = 0;
        if self.eat(b':') {
            second = self.number(1, 2).ok_or(TIMESTAMP_SYNTAX)?;
            if self.peek() == Some(b'.') {
                let dot = self.pos;
                self.pos += 1;
                let len = self.text[self.pos..].iter().take_while(|b| b.is_ascii_digit()).count();
                if len == 0 {
                    return Err(TIMESTAMP_SYNTAX);
                }
                let digits = &self.text[self.pos..self.pos + len];
                self.pos += len;
                fraction = if len <= 6 {
                    let value = digits.iter().fold(0i128, |acc, d| acc * 10 + i128::from(d - b'0'));
                    value * 10i128.pow(6 - len as u32)
                } else {
                    // PostgreSQL: rint(strtod(".ddd…") * 1e6), ties to even.
                    let text = std::str::from_utf8(&self.text[dot..self.pos]).map_err(|_| TIMESTAMP_SYNTAX)?;
                    let value: f64 = text.parse().map_err(|_| TIMESTAMP_SYNTAX)?;
                    (value * 1e6).round_ties_even() as i128
                };
            }
        }
        let valid = (hour < 24 && minute < 60 && second < 60)
            || (hour < 24 && minute < 60 && second == 60 && fraction == 0)
            || (hour == 24 && minute == 0 && second == 0 && fraction == 0);
        if !valid {
            return Err(FIELD_RANGE);
        }
        Ok(i128::from(hour * 3600 + minute * 60 + second) * USECS_PER_SEC + fraction)
    }

    /// An optional zone, as seconds east of UTC (0 when absent).
    fn zone(&mut self) -> Result<i64, &'static str> {
        let start = self.pos;
        self.skip_spaces();
        let rest = &self.text[self.pos..];
        if rest.first().is_some_and(|b| b.eq_ignore_ascii_case(&b'z')) {
            self.pos += 1;
            return Ok(0);
        }
        if rest.len() >= 3 && (rest[..3].eq_ignore_ascii_case(b"utc") || rest[..3].eq_ignore_ascii_case(b"gmt")) {
            self.pos += 3;
            return Ok(0);
        }
        let sign = match rest.first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => {
                self.pos = start;
                return Ok(0);
            }
        };
        self.pos += 1;
        let digits = self.text[self.pos..].iter().take_while(|b| b.is_ascii_digit()).count();
        let (hours, mut minutes, mut seconds) = match digits {
            1 | 2 => (self.number(1, 2).ok_or(TIMESTAMP_SYNTAX)?, 0, 0),
            // `+0530`
            4 => {
                let hours = self.fixed(2);
                (hours, self.fixed(2), 0)
            }
            _ => return Err(TIMESTAMP_SYNTAX),
        };
        if digits <= 2 && self.eat(b':') {
            minutes = self.number(2, 2).ok_or(TIMESTAMP_SYNTAX)?;
            if self.eat(b':') {
                seconds = self.number(2, 2).ok_or(TIMESTAMP_SYNTAX)?;
            }
        }
        if hours > 15 || minutes > 59 || seconds > 59 {
            return Err(ZONE_RANGE);
        }
        Ok(sign * (hours * 3600 + minutes * 60 + seconds))
    }

    /// An optional ` BC` / ` AD`; true for BC.
    fn era(&mut self) -> bool {
        let start = self.pos;
        self.skip_spaces();
        let rest = &self.text[self.pos..];
        if rest.len() >= 2 {
            if rest[..2].eq_ignore_ascii_case(b"bc") {
                self.pos += 2;
                return true;
            }
            if rest[..2].eq_ignore_ascii_case(b"ad") {
                self.pos += 2;
                return false;
            }
        }
        self.pos = start;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> TsVal {
        parse_timestamp(text.as_bytes(), true).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn usecs(text: &str) -> i64 {
        match ts(text) {
            TsVal::Finite(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn civil_days_known_values() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(days_from_civil(2026, 11, 25), 20_782);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28), 2);
    }

    #[test]
    fn timestamps_in_many_spellings_agree() {
        let base = usecs("2026-11-25 10:00:00+00");
        for same in [
            "2026-11-25 10:00:00",
            "2026-11-25T10:00:00Z",
            "2026-11-25t10:00z",
            "2026-11-25 10:00:00.000000+00",
            "2026-11-25 15:30:00+05:30",
            "2026-11-25 15:30:00+0530",
            "2026-11-25 02:00:00-0800",
            "2026-11-25 02:00:00 -08",
            "2026-11-25 10:00 UTC",
            " 2026-11-25 10:00:00+00 ",
        ] {
            assert_eq!(usecs(same), base, "{same}");
        }
        assert_eq!(usecs("2026-11-25 10:00:00.123456+00") - base, 123_456);
        assert_eq!(usecs("2026-11-25 10:00:00.5+00") - base, 500_000);
        assert_eq!(usecs("2026-11-25 10:00:00.0000004+00") - base, 0);
        assert_eq!(usecs("2026-11-25 10:00:00.0000006+00") - base, 1);
        assert_eq!(usecs("2026-11-25 09:59:59.9999996+00") - base, 0);
        assert_eq!(usecs("2026-11-25 24:00:00") - base, 14 * 3600 * 1_000_000);
        assert_eq!(usecs("2026-11-25 09:59:60") - base, 0);
        assert_eq!(usecs("2026-11-25") - base, -10 * 3600 * 1_000_000);
        assert_eq!(usecs("2000-01-01 00:00:00+00"), 0);
        assert_eq!(usecs("epoch"), -946_684_800_000_000);
        assert!(ts("-infinity") < ts("4713-01-01 00:00:00+00 BC"));
        assert!(ts("0044-03-15 12:00:00+00 BC") < ts("0001-01-01 00:00:00+00"));
        assert!(ts("294276-12-31 23:59:59.999999+00") < ts("infinity"));
    }

    #[test]
    fn timestamp_without_zone_ignores_the_offset() {
        assert_eq!(parse_timestamp(b"2026-11-25 10:00:00+05", false), parse_timestamp(b"2026-11-25 10:00:00", false));
    }

    #[test]
    fn rejects_bad_timestamps() {
        for bad in [
            "",
            "2026-11-25 10",
            "2026-11-25 10:00:00.",
            "2026-13-01",
            "2026-02-29 00:00",
            "2026-11-25 24:00:01",
            "2026-11-25 10:60",
            "2026-11-25 10:00+16",
            "2026-11-25 10:00+1:0",
            "2026-11-25 10:00+123",
            "2026-11-25 10:00 PST",
            "26-11-25",
            "2026/11/25",
            "now",
            "294277-01-01 00:00:00+00",
            "4714-11-23 00:00:00+00 BC",
            "0000-01-01",
        ] {
            assert!(parse_timestamp(bad.as_bytes(), true).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date(b"2026-11-25"), Ok(DateVal::Finite(20_782)));
        assert_eq!(parse_date(b"2026-1-5"), Ok(DateVal::Finite(days_from_civil(2026, 1, 5))));
        assert_eq!(parse_date(b"0044-03-15 BC"), Ok(DateVal::Finite(days_from_civil(-43, 3, 15))));
        assert_eq!(parse_date(b"Infinity"), Ok(DateVal::Infinity));
        assert_eq!(parse_date(b"-infinity"), Ok(DateVal::NegInfinity));
        assert_eq!(parse_date(b"2024-02-29"), Ok(DateVal::Finite(days_from_civil(2024, 2, 29))));
        assert!(parse_date(b"2023-02-29").is_err());
        assert!(parse_date(b"2026-11-25 10:00").is_err());
        assert!(parse_date(b"4714-11-23 BC").is_err());
        assert!(parse_date(b"4714-11-24 BC").is_ok());
        assert!(parse_date(b"5874898-01-01").is_err());
    }
}
