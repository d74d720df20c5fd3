//! WAL positions (placeholder, being written).
