//! Integration tests against a real PostgreSQL (one binary; see support/).

mod support;
