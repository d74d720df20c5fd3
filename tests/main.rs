//! Integration tests against a real PostgreSQL (one binary; see support/).

#![allow(unreachable_pub)]

mod support;

mod big_transactions;
mod broadcast;
mod broadcast_database;
mod broadcast_http;
mod changes;
mod cli_migrate;
mod client_compat;
mod cluster;
mod config_check;
mod dashboard;
mod demo;
mod faults;
mod fetch;
mod first_start;
mod hostile;
mod hub;
mod large_transactions;
mod load;
mod memory;
mod metrics;
mod policies;
mod policy_clients;
mod policy_differential;
mod policy_random;
mod policy_runtime;
mod presence;
mod private_channels;
mod readme;
mod realtime;
mod replay;
mod replication;
mod scaleout;
mod schema_migrations;
mod schema_orders;
mod schema_realtime;
mod schema_rls;
mod tls;
mod versions;
