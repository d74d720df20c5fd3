//! WAL positions (log sequence numbers).
//!
//! An [`Lsn`] is a byte position in PostgreSQL's write-ahead log. walcast sees
//! them in XLogData headers, keepalives and pgoutput messages (Begin's final
//! LSN, Commit's `end_lsn`), and sends them back in standby status updates to
//! move the replication slot forward.
//!
//! Invariants:
//! - The text form is exactly PostgreSQL's `pg_lsn`: the high and low 32 bits
//!   as upper-case hexadecimal without leading zeros, separated by `/`
//!   (`0/1541DC0`). Parsing accepts either case and 1 to 8 digits per half, as
//!   `pg_lsn_in` does, so every string PostgreSQL prints parses back to the
//!   same value.
//! - Serde uses the text form, so JSON carries `"0/1541DC0"` rather than a
//!   64-bit integer that JavaScript would round.
//! - Ordering is the numeric order of WAL positions.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log, as PostgreSQL's `pg_lsn`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position (`0/0`), which PostgreSQL uses as "invalid" or "none".
    pub const ZERO: Lsn = Lsn(0);

    /// Whether this is `0/0`; pgoutput sends it for writes that are not the
    /// last of a change, so it never means progress.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error returned when a string is not a valid `X/X` LSN.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid lsn {input:?}: expected two hexadecimal numbers of 1 to 8 digits separated by '/'")]
pub struct ParseLsnError {
    input: String,
}

impl ParseLsnError {
    /// The string that failed to parse.
    pub fn input(&self) -> &str {
        &self.input
    }
}

/// Parses one half of an LSN: 1 to 8 hex digits, nothing else. Checked by
/// hand because `u32::from_str_radix` also accepts a leading `+`.
fn parse_half(half: &str) -> Option<u64> {
    if half.is_empty() || half.len() > 8 || !half.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(half, 16).ok().map(u64::from)
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s.split_once('/').and_then(|(high, low)| Some((parse_half(high)?, parse_half(low)?)));
        match parsed {
            Some((high, low)) => Ok(Lsn((high << 32) | low)),
            None => Err(ParseLsnError { input: s.to_owned() }),
        }
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LsnVisitor;

        impl serde::de::Visitor<'_> for LsnVisitor {
            type Value = Lsn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an LSN string such as \"0/1541DC0\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Lsn, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(LsnVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x1541DC0).to_string(), "0/1541DC0");
        assert_eq!(Lsn(0x0000_0001_0000_0000).to_string(), "1/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parses_postgres_forms() {
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
        assert_eq!("0/1541DC0".parse::<Lsn>(), Ok(Lsn(0x1541DC0)));
        assert_eq!("16/b374d848".parse::<Lsn>(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("00000016/0000000A".parse::<Lsn>(), Ok(Lsn(0x16_0000_000A)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>(), Ok(Lsn(u64::MAX)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "/",
            "0",
            "0/",
            "/0",
            "0/0/0",
            "+1/0",
            "0/+1",
            "-1/0",
            " 0/0",
            "0/0 ",
            "123456789/0",
            "0/123456789",
            "g/0",
            "0x1/0",
            "é/0",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(err.input(), bad);
        }
    }

    #[test]
    fn error_display_is_lower_case_without_period() {
        let msg = "x".parse::<Lsn>().unwrap_err().to_string();
        assert!(msg.starts_with("invalid lsn \"x\""), "{msg}");
        assert!(!msg.ends_with('.'));
    }

    #[test]
    fn display_parse_round_trip() {
        for v in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0xDEAD_BEEF_0BAD_F00D, u64::MAX] {
            assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }
    }

    #[test]
    fn ordering_and_defaults() {
        assert!(Lsn(1) < Lsn(0x1_0000_0000));
        assert_eq!(Lsn::default(), Lsn::ZERO);
        assert!(Lsn::ZERO.is_zero());
        assert!(!Lsn(1).is_zero());
        assert_eq!(u64::from(Lsn::from(7)), 7);
    }

    #[test]
    fn serde_uses_text_form() {
        let json = serde_json::to_string(&Lsn(0x1541DC0)).unwrap();
        assert_eq!(json, "\"0/1541DC0\"");
        let back: Lsn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Lsn(0x1541DC0));
        // Owned strings (e.g. from a `Value`) deserialize too.
        let value = serde_json::Value::String("1/A".to_owned());
        assert_eq!(serde_json::from_value::<Lsn>(value).unwrap(), Lsn(0x1_0000_000A));
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        assert!(serde_json::from_str::<Lsn>("12").is_err());
    }
}
