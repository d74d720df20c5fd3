//! Errors from decoding a pgoutput message.
//!
//! Every error is definite: the same bytes always fail the same way, so the
//! replication stage must not retry them (see [`DecodeError::is_transient`]).
//! The variants are cheap (no heap allocation) because they are built on the
//! hot path, and each names the message and field involved so a log line is
//! enough to locate the bad byte.

use std::fmt;

/// Why a pgoutput message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload had no bytes at all.
    #[error("empty pgoutput message")]
    Empty,

    /// The first byte is not a known pgoutput message tag.
    #[error("unknown pgoutput message tag {}", TagByte(*.tag))]
    UnknownTag {
        /// The tag byte.
        tag: u8,
    },

    /// The payload ended before a field was complete.
    #[error("truncated {message} message: {field} needs {needed} bytes but {remaining} remain")]
    Truncated {
        /// Message being decoded (lower case, e.g. `relation`).
        message: &'static str,
        /// Field being read.
        field: &'static str,
        /// Bytes that field needs (for counts, the minimum for all items).
        needed: usize,
        /// Bytes left in the payload.
        remaining: usize,
    },

    /// A length field was negative.
    #[error("negative {field} {length} in {message} message")]
    NegativeLength {
        /// Message being decoded.
        message: &'static str,
        /// The length or count field.
        field: &'static str,
        /// The value sent.
        length: i32,
    },

    /// A TupleData column had a kind other than `n`, `u`, `t` or `b`.
    #[error("unknown tuple value kind {} for column {column} in {message} message", TagByte(*.kind))]
    UnknownTupleKind {
        /// Message being decoded.
        message: &'static str,
        /// Zero-based column index within the tuple.
        column: usize,
        /// The kind byte.
        kind: u8,
    },

    /// A string had no NUL terminator before the end of the payload.
    #[error("{field} in {message} message has no nul terminator")]
    UnterminatedString {
        /// Message being decoded.
        message: &'static str,
        /// The string field.
        field: &'static str,
    },

    /// A string was not valid UTF-8 (walcast connects with
    /// `client_encoding=UTF8`, so this means corruption).
    #[error("{field} in {message} message is not valid utf-8")]
    InvalidUtf8 {
        /// Message being decoded.
        message: &'static str,
        /// The string field.
        field: &'static str,
    },

    /// A Relation message had an unknown replica identity byte.
    #[error("unknown replica identity {} in relation message", TagByte(*.byte))]
    UnknownReplicaIdentity {
        /// The byte sent.
        byte: u8,
    },

    /// A sub-message byte was not one allowed at its position (e.g. an
    /// Update whose new tuple is not introduced by `N`).
    #[error("unexpected byte {} in {message} message, expected {expected}", TagByte(*.byte))]
    UnexpectedSubmessage {
        /// Message being decoded.
        message: &'static str,
        /// The byte found.
        byte: u8,
        /// What was allowed there.
        expected: &'static str,
    },

    /// Bytes were left after a complete message.
    #[error("{count} trailing bytes after complete {message} message")]
    TrailingBytes {
        /// Message decoded.
        message: &'static str,
        /// Number of extra bytes.
        count: usize,
    },

    /// A Stream Start arrived inside a stream block (PostgreSQL never nests
    /// them, so messages were lost or misframed).
    #[error("stream start inside a stream block")]
    NestedStreamStart,

    /// A Stream Stop arrived outside a stream block.
    #[error("stream stop outside a stream block")]
    StreamStopOutsideBlock,
}

impl DecodeError {
    /// Always `false`: decoding is a pure function of the bytes, so retrying
    /// the same payload cannot succeed. The replication supervisor treats
    /// these errors as definite.
    pub const fn is_transient(&self) -> bool {
        false
    }
}

/// Shows a wire byte as a quoted character and in hex, e.g. `'X' (0x58)`.
struct TagByte(u8);

impl fmt::Display for TagByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} (0x{:02x})", char::from(self.0), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_texts() {
        assert_eq!(DecodeError::UnknownTag { tag: b'X' }.to_string(), "unknown pgoutput message tag 'X' (0x58)");
        assert_eq!(DecodeError::UnknownTag { tag: 0 }.to_string(), "unknown pgoutput message tag '\\0' (0x00)");
        assert_eq!(
            DecodeError::Truncated { message: "insert", field: "text value", needed: 10, remaining: 3 }.to_string(),
            "truncated insert message: text value needs 10 bytes but 3 remain"
        );
        assert_eq!(
            DecodeError::TrailingBytes { message: "commit", count: 2 }.to_string(),
            "2 trailing bytes after complete commit message"
        );
    }

    #[test]
    fn display_is_lower_case_without_period() {
        let errors = [
            DecodeError::Empty,
            DecodeError::UnknownTag { tag: 0xff },
            DecodeError::NegativeLength { message: "insert", field: "text value length", length: -2 },
            DecodeError::UnknownTupleKind { message: "update", column: 3, kind: b'z' },
            DecodeError::UnterminatedString { message: "relation", field: "namespace" },
            DecodeError::InvalidUtf8 { message: "relation", field: "column name" },
            DecodeError::UnknownReplicaIdentity { byte: b'x' },
            DecodeError::UnexpectedSubmessage { message: "update", byte: b'Q', expected: "'N'" },
            DecodeError::NestedStreamStart,
            DecodeError::StreamStopOutsideBlock,
        ];
        for err in errors {
            let text = err.to_string();
            let first = text.chars().next().unwrap();
            assert!(!first.is_uppercase(), "{text}");
            assert!(!text.ends_with('.'), "{text}");
            assert!(!err.is_transient());
        }
    }
}
