//! # walcast
//!
//! A self-hosted realtime change-data-capture relay for PostgreSQL: it streams
//! the `supabase_realtime` publication (pgoutput) over its own replication
//! connection, decides in memory which users may see each change (mirroring the
//! database's Row Level Security from a WAL-ordered membership cache), and fans
//! the changes out over WebSockets speaking Supabase Realtime's Phoenix protocol,
//! so `@supabase/supabase-js` clients work unchanged.
//!
//! ## Pipeline
//!
//! Data flows one way; stages are joined by bounded channels, and no stage ever
//! waits on a WebSocket client.
//!
//! ```text
//!  PostgreSQL ──walsender (CopyBoth)──▶ replication ──XLogData──▶ pgoutput (sans-IO decode)
//!      ▲                                    │                            │
//!      │ standby status (flush = acked      │                            ▼
//!      │ Commit.end_lsn / idle keepalive)   │                 change (relation cache,
//!      └────────────────────────────────────┘                  txn assembly, value→JSON)
//!                                                                    │ realtime.messages INSERTs
//!                                                                    ├──────(Broadcast from Database,
//!                                                                    │       walcast_messages publication)
//!                                                                    │      ──▶ delivery stage ──▶ rooms
//!                                    ▲                               │ committed txns, in order
//!                                    │ ack end_lsn                   ▼ (handed on before their Commit)
//!                                    └─────────────────── hub: whole transaction held until
//!                                                          Commit (memory ≤ 16 MiB, rest in
//!                                                          spill/), memberships applied, then
//!                                                          policy (compiled RLS plans over
//!                                                          membership caches; PostgreSQL for
//!                                                          the rest) and the filter index,
//!                                                          serialize once ─▶
//!                                                          outboxes (one global byte budget;
//!                                                          full ⇒ the fan-out pauses), flushed
//!                                                          once per batch: one sendmsg per socket
//!                                                                     │ shared Bytes
//!                                                                     ▼
//!                                                    realtime (Phoenix vsn 1/2, JWT) ◀─▶ clients
//!                                                       ▲ sockets admitted by http (hyper:
//!                                                         connection permit, per-address
//!                                                         and per-user budgets)
//!
//!  clients' broadcasts and presence ──▶ session ──▶ rooms (topic + privacy; one frame per format,
//!  REST broadcasts (http) ────────────────────────▶   shared; presence state and diffs) ──▶ outboxes
//!  private channels: session/http ──▶ authorize (RLS on realtime.messages, as the user,
//!                                                rolled back) ──▶ PostgreSQL
//!  cluster mode (scaleout, NATS JetStream):
//!   source (lease holder): replication → change stage ──▶ publisher ──chunks, PubAck──▶ stream
//!                          (ack end_lsn only after PubAck)   └─ policy snapshots ──▶ object store
//!   edge: snapshot + stream (ordered consumer) ──▶ hub (as above) ──▶ realtime ◀─▶ clients
//!   rooms ◀──▶ NATS `walcast.rooms` (broadcasts, presence, heartbeats) ◀──▶ the other nodes' rooms
//! ```
//!
//! Back-pressure runs the other way: a full outbox budget pauses the hub, the
//! bounded channels fill, the replication source stops reading (while still
//! answering the walsender's keepalives), and PostgreSQL keeps the WAL.

//! ## Modules
//!
//! - [`schema`]: the SQL schema walcast serves (`sql/`) and its migration runner.
//! - [`cluster`]: a local PostgreSQL cluster walcast starts itself (tests,
//!   benchmarks, the embedded default run).
//! - [`lsn`]: WAL positions.
//! - [`capture`]: record/replay files of the raw replication stream.
//! - [`pgoutput`]: the pure, sans-IO decoder of the pgoutput wire format.
//! - [`change`]: typed changes; PostgreSQL text values to Supabase-style JSON.
//! - [`policy`]: who may see a change — the database's RLS policies and
//!   privileges compiled to plans over WAL-ordered membership caches, the
//!   database-evaluated fallback, postgres_changes filters (and their index
//!   keys).
//! - [`pgconn`]: connection strings with their TLS settings (`sslmode`,
//!   `sslrootcert`), rustls for both kinds of connection, and the one SQL
//!   connect everything uses.
//! - [`replication`]: our own logical-replication client (walsender protocol,
//!   slots, the copy-both stream with standby status updates).
//!
//! - [`spill`]: transaction bodies that outgrow memory, on disk under a
//!   shared disk budget.
//! - [`hub`]: holds each transaction until its commit, judges each change
//!   against memberships, rules and bindings; serializes each distinct frame
//!   once into the connections' outboxes and flushes them once per batch.
//! - [`outbox`]: per-connection frame queues under one global budget, and
//!   their writes to the sockets (WebSocket framing, one non-blocking
//!   `sendmsg` per socket per batch; flusher tasks for large batches).
//! - [`relay`]: wires replication → change stage → hub with bounded channels.
//! - [`realtime`]: Supabase Realtime's Phoenix protocol (vsn 1.0.0 and
//!   2.0.0), JWT verification, per-socket sessions and their writers; rooms
//!   (Broadcast, Presence), private channels' authorization, Broadcast from
//!   Database.
//! - [`http`]: the listener (hyper): WebSocket upgrades admitted against the
//!   connection, per-address and per-user budgets, REST broadcasts, the
//!   dashboard, `/health`, `/ready`, `/metrics`.
//! - [`scaleout`]: cluster mode over NATS JetStream — a source node holds
//!   the slot and publishes committed transactions; edge nodes serve sockets
//!   from the stream; standbys take over; Broadcast and Presence shared
//!   between nodes.
//! - [`monitor`]: Prometheus metrics, readiness, and the slot watchdog.
//! - [`demo`]: the one-command demo: embedded PostgreSQL, demo data and tokens,
//!   a demo writer.
//! - [`config`]: settings (flags > environment > TOML file > defaults) and
//!   `walcast check`.
//! - [`server`]: `walcast serve` — everything above started and stopped in order.
//! - [`load`]: `walcast load` — end-to-end load generator and RLS-exactness
//!   checker (latency, throughput, CPU, RSS).

pub mod capture;
pub mod change;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod http;
pub mod hub;
pub mod load;
pub mod lsn;
pub mod monitor;
pub mod outbox;
pub mod pgconn;
pub mod pgoutput;
pub mod policy;
pub mod realtime;
pub mod relay;
pub mod replication;
pub mod scaleout;
pub mod schema;
pub mod server;
pub mod spill;

#[cfg(test)]
mod fuzz_tests;
