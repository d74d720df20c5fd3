//! Value encoding (placeholder, being written).
