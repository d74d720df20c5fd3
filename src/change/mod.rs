//! Typed changes (placeholder, being written).

pub mod value;
