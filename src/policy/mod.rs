//! The policy stage: decides which subscribers may see each committed change — the membership cache, the
//! access rules mirrored from Row Level Security, and the `postgres_changes` filters.
//!
//! - [`filter`]: the subscription `filter` string, parsed once and evaluated per change.

pub mod filter;
