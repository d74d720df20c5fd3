//! Operating walcast: `/metrics` (Prometheus text), `/ready` (readiness with
//! a reason) and the slot watchdog.
//!
//! ```text
//!  RealtimeStats (sessions) ─┐
//!  HubStats (hub) ───────────┤
//!  ReplicationStatus (AckHandle: stream, source, hub) ─┼─▶ Monitor ──▶ GET /metrics  (text exposition)
//!  RelayQueues (weak senders) ┤                        └─▶ GET /ready    (200 | 503 {"ready":false,"reason":…})
//!  SlotWatch ◀── watchdog task (SQL, every interval) ┘
//! ```
//!
//! Invariants:
//! - Every figure is an atomic written where it happens and read here
//!   without locks; nothing on the replication or fan-out path allocates for
//!   metrics. Rendering (per scrape) allocates one `String`.
//! - Counters only go up (`_total`); gauges are read as they are now; units
//!   are in the names (`_bytes`, `_seconds`); every family has `# HELP` and
//!   `# TYPE`.
//! - `/ready` is 200 only when replication streams and has heard from the
//!   walsender within half the replication timeout, the memberships are
//!   loaded and the lag is within [`MonitorConfig::ready_max_lag`] and
//!   [`MonitorConfig::ready_max_lag_bytes`]; otherwise 503 with the first
//!   failing condition as the reason (a definite replication error carries
//!   its text). `/health` (in [`crate::http`]) only says the process serves.
//!
//! Lag is defined in [`crate::replication::status`].

pub use crate::hub::latency as histogram;
pub mod text;
pub mod watchdog;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::realtime::SessionContext;
use crate::relay::RelayQueues;
use crate::replication::status::unix_micros_now;
use crate::replication::{AckHandle, Lag, SourceState};
use text::{Kind, TextWriter};
use watchdog::{SlotWatch, WalStatus, WatchdogConfig};

/// Readiness thresholds and watchdog settings.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// `/ready` fails while the replication lag is above this (`None`: no limit).
    pub ready_max_lag: Option<Duration>,
    /// `/ready` fails while more than this many bytes of received WAL are
    /// unprocessed (`None`: no limit).
    pub ready_max_lag_bytes: Option<u64>,
    /// How often the slot watchdog polls `pg_replication_slots` (`None`: no watchdog).
    pub slot_poll_interval: Option<Duration>,
    /// Warn when the slot retains more than this fraction of
    /// `max_slot_wal_keep_size` (ignored when that is `-1`; `None`: never).
    pub slot_wal_warn_fraction: Option<f64>,
    /// Warn when the slot retains more than this many bytes of WAL (`None`: never).
    pub slot_wal_warn_bytes: Option<u64>,
}

impl Default for MonitorConfig {
    /// Ready within 10 s and 16 MiB of lag; the watchdog polls every 10 s and
    /// warns past half of `max_slot_wal_keep_size` or 1 GiB.
    fn default() -> Self {
        MonitorConfig {
            ready_max_lag: Some(Duration::from_secs(10)),
            ready_max_lag_bytes: Some(16 << 20),
            slot_poll_interval: Some(Duration::from_secs(10)),
            slot_wal_warn_fraction: Some(0.5),
            slot_wal_warn_bytes: Some(1 << 30),
        }
    }
}

impl MonitorConfig {
    /// The watchdog's settings, when it runs.
    pub fn watchdog(&self) -> Option<WatchdogConfig> {
        self.slot_poll_interval.map(|interval| WatchdogConfig {
            interval,
            warn_fraction: self.slot_wal_warn_fraction,
            warn_bytes: self.slot_wal_warn_bytes,
        })
    }
}

/// The answer of `/ready`.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    /// Why not ready (`None`: ready).
    pub reason: Option<String>,
    /// Replication state.
    pub state: SourceState,
    /// Current lag.
    pub lag: Lag,
}

impl Readiness {
    /// Ready to serve.
    pub fn is_ready(&self) -> bool {
        self.reason.is_none()
    }

    /// `{"ready":…,"reason":…,"replication":…,"lag_bytes":…,"lag_seconds":…}`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut body = json!({
            "ready": self.is_ready(),
            "replication": self.state.as_str(),
            "lag_bytes": self.lag.bytes,
            "lag_seconds": self.lag.seconds,
        });
        if let Some(reason) = &self.reason {
            body["reason"] = json!(reason);
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The first condition that makes walcast not ready, if any.
fn not_ready_reason(
    state: SourceState,
    error: Option<String>,
    memberships_loaded: bool,
    lag: Lag,
    silence: Option<Duration>,
    config: &MonitorConfig,
) -> Option<String> {
    match state {
        SourceState::Streaming => {}
        SourceState::Failed => return Some(error.unwrap_or_else(|| "replication failed".to_owned())),
        SourceState::Disconnected => {
            return Some(match error {
                Some(error) => format!("replication disconnected: {error}"),
                None => "replication disconnected".to_owned(),
            })
        }
        SourceState::Starting => return Some("replication is starting".to_owned()),
        SourceState::Stopped => return Some("replication stopped".to_owned()),
    }
    if let Some(silence) = silence {
        return Some(format!(
            "nothing received from the walsender for {:.1} s (a silent link, or a pipeline too busy to read); \
             a silent connection is made again at the replication timeout",
            silence.as_secs_f64()
        ));
    }
    if !memberships_loaded {
        return Some("memberships not loaded".to_owned());
    }
    if let Some(max) = config.ready_max_lag.filter(|max| lag.seconds > max.as_secs_f64()) {
        return Some(format!("replication lag of {:.1} s is over the {:.1} s limit", lag.seconds, max.as_secs_f64()));
    }
    if let Some(max) = config.ready_max_lag_bytes.filter(|max| lag.bytes > *max) {
        return Some(format!("replication is {} bytes behind the server's WAL end (limit {max})", lag.bytes));
    }
    None
}

/// Reads every figure for `/metrics` and `/ready`.
#[derive(Debug)]
pub struct Monitor {
    config: MonitorConfig,
    sessions: Arc<SessionContext>,
    ack: AckHandle,
    queues: RelayQueues,
    slot: String,
    slot_watch: Arc<SlotWatch>,
    start_micros: i64,
    cluster: Option<Arc<crate::scaleout::rooms::ClusterStats>>,
    node: Option<NodeStats>,
}

/// A cluster node's counters: its role and, per role, the source's and
/// the edge's.
#[derive(Debug, Clone)]
pub struct NodeStats {
    /// The role.
    pub role: crate::scaleout::NodeRole,
    /// The source role's counters.
    pub source: Option<Arc<crate::scaleout::source::SourceStats>>,
    /// The edge role's counters.
    pub edge: Option<Arc<crate::scaleout::edge::EdgeStats>>,
}

impl Monitor {
    /// A monitor over the running parts.
    pub fn new(
        config: MonitorConfig,
        sessions: Arc<SessionContext>,
        ack: AckHandle,
        queues: RelayQueues,
        slot: String,
        slot_watch: Arc<SlotWatch>,
    ) -> Monitor {
        Monitor {
            config,
            sessions,
            ack,
            queues,
            slot,
            slot_watch,
            start_micros: unix_micros_now(),
            cluster: None,
            node: None,
        }
    }

    /// Also reports the cluster link's counters.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::scaleout::rooms::ClusterStats>>) -> Monitor {
        self.cluster = cluster;
        self
    }

    /// Also reports the cluster node's roles.
    #[must_use]
    pub fn with_node(mut self, node: Option<NodeStats>) -> Monitor {
        self.node = node;
        self
    }

    /// The slot watchdog's findings.
    pub fn slot_watch(&self) -> &Arc<SlotWatch> {
        &self.slot_watch
    }

    /// Whether walcast is ready, and why not.
    pub fn readiness(&self) -> Readiness {
        let status = self.ack.status();
        let state = status.state();
        let now = unix_micros_now();
        let lag = status.lag(now);
        let loaded = self.sessions.hub.stats.memberships_loaded.load(Ordering::Relaxed);
        let reason = not_ready_reason(state, status.error(), loaded, lag, status.silence(now), &self.config);
        Readiness { reason, state, lag }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut w = TextWriter::new();
        let readiness = self.readiness();
        w.family("walcast_build_info", Kind::Gauge, "Always 1; the version as a label.");
        w.sample("walcast_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1u64);
        w.gauge("walcast_start_time_seconds", "When the server started, Unix seconds.", self.start_micros as f64 / 1e6);
        w.gauge("walcast_ready", "1 while /ready answers 200.", readiness.is_ready());

        let r = &self.sessions.stats;
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        w.gauge("walcast_sockets_open", "WebSocket connections open now.", load(&r.sockets_open));
        w.counter("walcast_sockets_opened_total", "WebSocket connections accepted.", load(&r.sockets_total));
        w.gauge("walcast_channels_open", "Channels joined now.", load(&r.channels_open));
        w.counter("walcast_joins_total", "Channel join requests handled.", load(&r.joins));
        w.counter(
            "walcast_joins_refused_total",
            "Join requests refused (token, limits, payload).",
            load(&r.joins_refused),
        );
        w.counter(
            "walcast_joins_refused_unindexed_filters_total",
            "Joins refused because the socket would hold more unindexed filters than --max-unindexed-filters.",
            load(&r.unindexed_refused),
        );
        w.counter(
            "walcast_joins_refused_user_total",
            "Joins refused (or channels closed on access_token) because the token's user holds \
             --max-sockets-per-user sockets already.",
            load(&r.user_refused),
        );
        w.counter("walcast_broadcasts_total", "Broadcasts received from clients and sent on.", load(&r.broadcasts));
        w.counter("walcast_broadcast_frames_total", "Broadcast frames queued to receivers.", load(&r.broadcast_frames));
        w.counter(
            "walcast_broadcasts_too_large_total",
            "Broadcasts not sent: payload larger than the broadcast limit (256 KiB).",
            load(&r.broadcasts_too_large),
        );
        let db = self.queues.db_broadcast();
        w.counter(
            "walcast_db_broadcasts_total",
            "realtime.messages rows (Broadcast from Database) handed to the rooms.",
            load(&db.delivered),
        );
        w.counter(
            "walcast_db_broadcast_frames_total",
            "Frames queued to receivers for realtime.messages rows.",
            load(&db.frames),
        );
        w.family(
            "walcast_db_broadcasts_dropped_total",
            Kind::Counter,
            "realtime.messages rows not broadcast, by reason: missing_column (id, topic, event, private, or a \
             payload), bad_binary (binary_payload not hex bytea text), too_large (over the broadcast limit).",
        );
        for (reason, count) in db.dropped_by_reason() {
            w.sample("walcast_db_broadcasts_dropped_total", &[("reason", reason)], count);
        }
        w.counter(
            "walcast_realtime_partitions_created_total",
            "Daily realtime.messages partitions walcast created.",
            load(&db.partitions_created),
        );
        w.counter(
            "walcast_realtime_partitions_dropped_total",
            "Daily realtime.messages partitions walcast dropped (range ended more than 72 h ago).",
            load(&db.partitions_dropped),
        );
        w.counter(
            "walcast_realtime_partition_failures_total",
            "realtime.messages partition maintenance runs that failed (see the log).",
            load(&db.maintenance_failures),
        );
        w.counter(
            "walcast_broadcasts_rate_limited_total",
            "Broadcasts not sent: the channel or the socket sent more than --channel-broadcasts-per-second / \
             --socket-broadcasts-per-second.",
            load(&r.broadcasts_rate_limited),
        );
        if let Some(node) = &self.node {
            w.family("walcast_node_role", Kind::Gauge, "Always 1; the cluster role as a label.");
            w.sample("walcast_node_role", &[("role", node.role.as_str())], 1u64);
            if let Some(s) = &node.source {
                w.gauge(
                    "walcast_source_leader",
                    "1 while this node holds the source lease and streams.",
                    s.leader.load(Ordering::Relaxed),
                );
                w.gauge(
                    "walcast_source_term",
                    "The current or last leader term (the lease's revision).",
                    load(&s.term),
                );
                w.counter("walcast_source_terms_total", "Terms this node led.", load(&s.terms));
                w.counter(
                    "walcast_source_transactions_total",
                    "Transactions published, every chunk acknowledged by JetStream.",
                    load(&s.transactions),
                );
                w.counter(
                    "walcast_source_messages_total",
                    "Stream messages published (chunks and policy state).",
                    load(&s.messages),
                );
                w.counter("walcast_source_bytes_total", "Payload bytes published.", load(&s.bytes));
                w.counter("walcast_source_snapshots_total", "Policy snapshots stored.", load(&s.snapshots));
                w.gauge(
                    "walcast_source_stream_sequence",
                    "Stream sequence of the last acknowledged publish.",
                    load(&s.last_sequence),
                );
                w.counter(
                    "walcast_source_leadership_lost_total",
                    "Terms that ended other than by shutdown (lease lost, fenced, replication failed).",
                    load(&s.lost),
                );
            }
            if let Some(e) = &node.edge {
                w.gauge(
                    "walcast_edge_stream_sequence",
                    "Stream sequence of the last message applied.",
                    load(&e.sequence),
                );
                w.gauge(
                    "walcast_edge_stream_pending",
                    "Messages the stream holds that this edge has not read.",
                    load(&e.pending),
                );
                w.counter(
                    "walcast_edge_transactions_total",
                    "Transactions read from the stream.",
                    load(&e.transactions),
                );
                w.counter(
                    "walcast_edge_discarded_total",
                    "Partial transactions discarded (a leader restarted or was replaced).",
                    load(&e.discarded),
                );
                w.counter(
                    "walcast_edge_policy_states_total",
                    "Policy states read from the stream.",
                    load(&e.policy_states),
                );
                w.counter(
                    "walcast_edge_consumers_total",
                    "Stream consumers made (the first, then one per reconnect).",
                    load(&e.consumers),
                );
                w.counter(
                    "walcast_edge_resyncs_total",
                    "Times the edge found messages it had not read removed by the stream's retention, closed its \
                     subscribed sockets and started again from a snapshot.",
                    load(&e.resyncs),
                );
                w.counter(
                    "walcast_edge_stale_total",
                    "Times the edge lost the stream past --edge-max-stale-secs and closed its sockets.",
                    load(&e.stale),
                );
            }
        }
        if let Some(c) = &self.cluster {
            w.gauge("walcast_cluster_nodes", "Other nodes heard from within the node timeout.", load(&c.nodes));
            w.counter("walcast_cluster_events_published_total", "Room events published to NATS.", load(&c.published));
            w.counter(
                "walcast_cluster_events_received_total",
                "Room events received from other nodes and applied.",
                load(&c.received),
            );
            w.counter(
                "walcast_cluster_events_dropped_total",
                "Room events not published: the queue to NATS was full, or the publish failed.",
                load(&c.dropped),
            );
            w.counter(
                "walcast_cluster_events_malformed_total",
                "Room events from other nodes that could not be read.",
                load(&c.malformed),
            );
            w.counter(
                "walcast_cluster_nodes_gone_total",
                "Nodes declared gone (silent past the node timeout, or said bye); their presences left.",
                load(&c.nodes_gone),
            );
        }
        let rooms = self.sessions.rooms.totals();
        w.gauge("walcast_rooms", "Rooms (topics with a joined channel or a presence) now.", rooms.rooms as u64);
        w.gauge("walcast_presences", "Presence entries tracked now, over every room.", rooms.presences as u64);
        w.counter(
            "walcast_presence_tracks_total",
            "Presence tracks that changed a room (joins and updates).",
            load(&r.presence_tracks),
        );
        w.counter("walcast_presence_untracks_total", "Presence untracks.", load(&r.presence_untracks));
        w.counter(
            "walcast_presence_refused_total",
            "Presence pushes answered with an error (payload not a map, unknown event).",
            load(&r.presence_refused),
        );
        w.counter(
            "walcast_presence_channels_closed_total",
            "Channels closed for more than 5 presence calls in 30 s or a track payload over the broadcast limit.",
            load(&r.presence_closed),
        );
        w.counter(
            "walcast_joins_refused_private_total",
            "Private-channel joins refused: no SELECT policy on realtime.messages lets the token read the topic, \
             or the check failed.",
            load(&r.private_refused),
        );
        w.counter(
            "walcast_private_channels_revoked_total",
            "Private channels closed because a new token lost a read right (or its check failed).",
            load(&r.private_revoked),
        );
        w.counter(
            "walcast_private_writes_denied_total",
            "Broadcasts (dropped without a reply, as Supabase) and tracks (answered error) on private channels \
             that no INSERT policy on realtime.messages allows.",
            load(&r.private_writes_denied),
        );
        if let Some(authorizer) = &self.sessions.authorizer {
            w.family(
                "walcast_authorization_checks_total",
                Kind::Counter,
                "Realtime Authorization checks (private channels) by result; an error denies.",
            );
            let a = &authorizer.stats;
            for (result, counter) in [("granted", &a.granted), ("denied", &a.denied), ("error", &a.errors)] {
                w.sample("walcast_authorization_checks_total", &[("result", result)], load(counter));
            }
        }
        w.family(
            "walcast_upgrades_refused_total",
            Kind::Counter,
            "WebSocket upgrades refused with HTTP 429, by budget: connections (--max-connections), user \
             (--max-sockets-per-user), address (--max-sockets-per-address).",
        );
        for (reason, counter) in [
            ("connections", &r.upgrades_refused_connections),
            ("user", &r.upgrades_refused_user),
            ("address", &r.upgrades_refused_address),
        ] {
            w.sample("walcast_upgrades_refused_total", &[("reason", reason)], load(counter));
        }
        w.counter(
            "walcast_http_broadcasts_total",
            "Broadcasts accepted over HTTP and sent on (batch items and single messages).",
            load(&r.http_broadcasts),
        );
        w.family(
            "walcast_http_broadcasts_refused_total",
            Kind::Counter,
            "HTTP broadcast requests refused, by reason (see docs/operations.md, Broadcast over HTTP).",
        );
        for (reason, counter) in crate::http::broadcast::REASONS.iter().zip(&r.http_broadcasts_refused) {
            w.sample("walcast_http_broadcasts_refused_total", &[("reason", reason)], load(counter));
        }
        w.counter(
            "walcast_http_broadcasts_private_denied_total",
            "Private HTTP broadcast messages not sent: Realtime Authorization did not allow the write.",
            load(&r.http_broadcasts_private_denied),
        );
        w.counter("walcast_bad_frames_total", "Client frames that could not be decoded.", load(&r.bad_frames));
        w.counter(
            "walcast_tokens_expired_total",
            "Channels closed because their token expired.",
            load(&r.tokens_expired),
        );

        let hub = &self.sessions.hub;
        let h = &hub.stats;
        w.gauge(
            "walcast_subscriptions",
            "postgres_changes subscriptions registered in the hub.",
            load(&h.subscriptions),
        );
        w.counter("walcast_transactions_total", "Committed transactions handled by the hub.", load(&h.transactions));
        w.counter(
            "walcast_changes_total",
            "Row changes judged by the hub (decode rate: rate() of this).",
            load(&h.changes),
        );
        w.counter("walcast_deliveries_total", "Frames queued to connections.", load(&h.deliveries));
        w.counter(
            "walcast_frames_built_total",
            "Distinct frames serialized (shared by their receivers).",
            load(&h.frames_built),
        );
        w.counter(
            "walcast_slow_consumer_closes_total",
            "Connections closed with 1013 as slow consumers, all reasons (the four counters below).",
            load(&h.slow_consumers) + load(&r.write_stalls) + load(&r.reply_floods),
        );
        w.counter(
            "walcast_write_stall_closes_total",
            "Sockets closed because a write made no progress within the write timeout (10 s).",
            load(&r.write_stalls),
        );
        w.counter(
            "walcast_reply_flood_closes_total",
            "Sockets closed because they sent requests without reading 1 MiB of replies.",
            load(&r.reply_floods),
        );
        w.counter(
            "walcast_reader_lag_closes_total",
            "Readers closed because their oldest unwritten message passed --max-reader-lag.",
            load(&h.lagging_readers_closed),
        );
        w.counter(
            "walcast_furthest_behind_closes_total",
            "Readers closed as the furthest behind after the fan-out paused for 10 s.",
            load(&h.furthest_behind_closed),
        );
        w.counter(
            "walcast_close_frames_dropped_total",
            "Slow consumers dropped without a close frame (their socket could not take it in time).",
            load(&r.close_frames_dropped),
        );
        w.gauge(
            "walcast_outbox_bytes",
            "Bytes held by all outboxes (queued and being written).",
            hub.budget.used() as u64,
        );
        w.gauge(
            "walcast_outbox_budget_bytes",
            "The global outbox budget (--outbox-budget).",
            hub.budget.limit() as u64,
        );
        w.counter(
            "walcast_fanout_pauses_total",
            "Times the fan-out paused because the outbox budget was full (back-pressure to the slot).",
            load(&h.pauses),
        );
        w.family(
            "walcast_fanout_paused_seconds_total",
            Kind::Counter,
            "Time the fan-out spent paused on the outbox budget (finished pauses).",
        );
        w.sample("walcast_fanout_paused_seconds_total", &[], load(&h.paused_micros) as f64 / 1e6);
        w.gauge(
            "walcast_fanout_paused",
            "1 while the fan-out is paused on the outbox budget.",
            h.paused.load(Ordering::Relaxed),
        );
        w.counter(
            "walcast_spilled_transactions_total",
            "Transactions larger than the hub's memory budget, spilled to disk and judged whole at commit.",
            load(&h.spilled_transactions),
        );
        let stage_spill = self.queues.stage_spill();
        for (name, kind, help, get) in [
            (
                "walcast_spill_bytes",
                Kind::Gauge,
                "Bytes in spill files now, by the stage that holds them.",
                (|s: &crate::spill::SpillStats| s.disk_bytes.load(Ordering::Relaxed)) as fn(&_) -> u64,
            ),
            ("walcast_spill_written_bytes_total", Kind::Counter, "Bytes written to spill files, by stage.", |s| {
                s.written_bytes.load(Ordering::Relaxed)
            }),
            (
                "walcast_spill_budget_waits_total",
                Kind::Counter,
                "Times a stage waited because its share of the spill disk budget (--spill-budget) was full.",
                |s| s.budget_waits.load(Ordering::Relaxed),
            ),
        ] {
            w.family(name, kind, help);
            w.sample(name, &[("stage", "hub")], get(&hub.spill));
            w.sample(name, &[("stage", "change")], get(stage_spill));
        }
        w.counter(
            "walcast_duplicate_transactions_total",
            "Transactions skipped as already handled after a reconnect.",
            load(&h.duplicate_transactions),
        );
        w.counter(
            "walcast_catch_up_transactions_total",
            "Transactions in the catch-up window after a restart (service_role only).",
            load(&h.catch_up_transactions),
        );
        w.counter(
            "walcast_policy_reloads_total",
            "Policies read again while running (a walcast-policy message or a poll that saw a change).",
            load(&h.policy_reloads),
        );
        w.histogram_seconds(
            "walcast_delivery_latency_seconds",
            "Commit (database clock) to frames queued (walcast clock), per transaction that queued frames.",
            &h.delivery_latency.snapshot(),
        );
        w.histogram_seconds(
            "walcast_walsender_latency_seconds",
            "Commit to the walsender sending the transaction's Begin (both on the database's clock): the database's share of the delivery latency.",
            &h.walsender_latency.snapshot(),
        );
        w.histogram_seconds(
            "walcast_intake_latency_seconds",
            "The walsender sending a transaction's Begin (database clock) to walcast's change stage decoding it (walcast clock).",
            &h.intake_latency.snapshot(),
        );
        w.gauge("walcast_memberships", "Rows in the membership caches.", h.cache_rows.load(Ordering::Relaxed));
        w.gauge(
            "walcast_membership_cache_bytes",
            "Approximate bytes of the membership caches.",
            h.cache_bytes.load(Ordering::Relaxed),
        );
        w.counter(
            "walcast_database_evaluated_denied_total",
            "Changes withheld from a role whose policies need the database but could not be checked (no SET ROLE, queue full).",
            h.database_denied.load(Ordering::Relaxed),
        );
        let caches = h.caches.lock().map(|c| c.clone()).unwrap_or_default();
        for (name, help, pick) in [
            ("walcast_membership_cache_rows", "Rows per membership cache.", 0usize),
            ("walcast_membership_cache_bytes_each", "Approximate bytes per membership cache.", 1),
            (
                "walcast_membership_cache_over_budget",
                "1 when a cache was dropped for the budget (its tables are database-evaluated).",
                2,
            ),
        ] {
            w.family(name, Kind::Gauge, help);
            for (cache, rows, bytes, over) in &caches {
                let value = match pick {
                    0 => *rows as u64,
                    1 => *bytes as u64,
                    _ => u64::from(*over),
                };
                w.sample(name, &[("cache", cache.as_str())], value);
            }
        }
        w.counter(
            "walcast_database_eval_checks_total",
            "Claim sets PostgreSQL evaluated for database-evaluated tables.",
            h.database.evaluated.load(Ordering::Relaxed),
        );
        w.counter(
            "walcast_database_eval_errors_total",
            "Database evaluations that failed or timed out (denied).",
            h.database.errors.load(Ordering::Relaxed),
        );
        w.counter(
            "walcast_database_eval_refused_total",
            "Checks refused because the database-evaluation queue was full (denied, with a system message).",
            h.database.refused.load(Ordering::Relaxed),
        );
        w.gauge(
            "walcast_database_eval_in_flight",
            "Claim sets queued or being evaluated.",
            h.database.in_flight.load(Ordering::Relaxed) as u64,
        );
        w.counter(
            "walcast_policy_candidates_total",
            "Candidate subscriptions judged by the fan-out (index hits).",
            h.candidates.load(Ordering::Relaxed),
        );
        w.counter(
            "walcast_filter_evaluations_total",
            "Row filters evaluated by the fan-out (eq/in filters only where a change's values match them).",
            h.filter_evaluations.load(Ordering::Relaxed),
        );
        w.gauge(
            "walcast_memberships_loaded",
            "1 once the membership cache was loaded.",
            h.memberships_loaded.load(Ordering::Relaxed),
        );
        w.gauge(
            "walcast_policy_catch_up",
            "1 while the catch-up window after a restart is replayed (membership tables database-evaluated).",
            h.in_catch_up.load(Ordering::Relaxed),
        );
        // The plan of every published table for the API roles.
        let plans = hub.policies();
        w.family("walcast_policy_plan", Kind::Gauge, "1 per table and API role, labelled with how it is decided.");
        for t in plans.tables() {
            let table = format!("{}.{}", t.schema, t.name);
            for role in ["anon", "authenticated", "service_role"] {
                let Some(plan) = t.role(role) else { continue };
                let mode = match plan.access {
                    crate::policy::Access::Nothing(_) => "nothing",
                    crate::policy::Access::Everything => "every_row",
                    crate::policy::Access::Rows(_) => "in_memory",
                    crate::policy::Access::Database(_) => "database",
                };
                w.sample("walcast_policy_plan", &[("table", &table), ("role", role), ("mode", mode)], 1u64);
            }
        }

        let status = self.ack.status();
        w.family("walcast_replication_state", Kind::Gauge, "1 for the replication source's current state.");
        for state in SourceState::ALL {
            w.sample("walcast_replication_state", &[("state", state.as_str())], state == readiness.state);
        }
        w.counter("walcast_replication_connects_total", "Times streaming started.", status.connects());
        w.counter(
            "walcast_replication_interruptions_total",
            "Transient replication errors (each followed by a reconnect).",
            status.interruptions(),
        );
        w.counter(
            "walcast_replication_messages_total",
            "CopyData messages received from the walsender.",
            status.messages(),
        );
        w.counter(
            "walcast_replication_received_bytes_total",
            "CopyData payload bytes received from the walsender.",
            status.bytes(),
        );
        w.gauge(
            "walcast_replication_received_position_bytes",
            "Highest WAL position (LSN) the server sent or reported.",
            status.received().0,
        );
        w.gauge(
            "walcast_replication_flushed_position_bytes",
            "WAL position (LSN) processed: what the slot may be told is flushed.",
            status.processed().0,
        );
        w.gauge(
            "walcast_replication_lag_bytes",
            "WAL the server sent or reported in a keepalive that walcast has not processed yet.",
            readiness.lag.bytes,
        );
        w.gauge(
            "walcast_replication_lag_seconds",
            "Age of the oldest unprocessed change (0 when caught up).",
            readiness.lag.seconds,
        );
        let keepalive = status.last_keepalive_micros();
        w.family(
            "walcast_replication_last_keepalive_timestamp_seconds",
            Kind::Gauge,
            "When the last walsender keepalive arrived, Unix seconds.",
        );
        if keepalive != 0 {
            w.sample("walcast_replication_last_keepalive_timestamp_seconds", &[], keepalive as f64 / 1e6);
        }
        let last_message = status.last_message_micros();
        w.family(
            "walcast_replication_last_message_timestamp_seconds",
            Kind::Gauge,
            "When the last message of any kind arrived from the walsender, Unix seconds.",
        );
        if last_message != 0 {
            w.sample("walcast_replication_last_message_timestamp_seconds", &[], last_message as f64 / 1e6);
        }
        w.counter(
            "walcast_replication_heartbeats_sent_total",
            "Heartbeats written with pg_logical_emit_message.",
            status.heartbeats_sent(),
        );
        w.counter(
            "walcast_replication_heartbeat_errors_total",
            "Heartbeats that failed or timed out (their connection is made again).",
            status.heartbeat_errors(),
        );
        w.counter(
            "walcast_replication_heartbeats_received_total",
            "Heartbeats received back through the slot.",
            status.heartbeats_received(),
        );

        let queue = |w: &mut TextWriter, name: &str, help: &str, figures: Option<(usize, usize)>| {
            w.family(name, Kind::Gauge, help);
            if let Some((queued, _)) = figures {
                w.sample(name, &[], queued as u64);
            }
            let capacity = format!("{name}_capacity");
            w.family(&capacity, Kind::Gauge, "Capacity of the queue above.");
            if let Some((_, cap)) = figures {
                w.sample(&capacity, &[], cap as u64);
            }
        };
        queue(
            &mut w,
            "walcast_source_queue_events",
            "Events (batches of WAL messages) queued between replication and the change stage.",
            self.queues.source(),
        );
        queue(
            &mut w,
            "walcast_stage_queue_batches",
            "Batches (up to 256 events) queued between the change stage and the hub.",
            self.queues.stage(),
        );
        queue(
            &mut w,
            "walcast_db_broadcast_queue_messages",
            "realtime.messages rows queued between the change stage and their delivery to the rooms.",
            self.queues.messages(),
        );
        queue(
            &mut w,
            "walcast_hub_control_queue_requests",
            "Join/leave/re-auth requests queued for the hub.",
            Some((hub.control_queue_len(), hub.control_queue_capacity())),
        );

        self.render_slot(&mut w);
        w.finish()
    }

    fn render_slot(&self, w: &mut TextWriter) {
        let s = &self.slot_watch;
        let slot = [("slot", self.slot.as_str())];
        w.counter("walcast_slot_polls_total", "Successful slot watchdog polls.", s.polls());
        w.counter("walcast_slot_poll_errors_total", "Failed slot watchdog polls.", s.poll_errors());
        w.family(
            "walcast_slot_last_poll_timestamp_seconds",
            Kind::Gauge,
            "When the slot watchdog last polled successfully, Unix seconds.",
        );
        if s.polls() > 0 {
            w.sample("walcast_slot_last_poll_timestamp_seconds", &[], s.last_poll_micros() as f64 / 1e6);
        }
        let polled = s.polls() > 0;
        let optional = |w: &mut TextWriter, name: &str, help: &str, value: Option<i64>| {
            w.family(name, Kind::Gauge, help);
            if let Some(value) = value.filter(|_| polled) {
                w.sample(name, &slot, value);
            }
        };
        optional(w, "walcast_slot_present", "1 while the replication slot exists.", Some(i64::from(s.present())));
        // The server keeps a walsender on a dead path "active" until its
        // wal_sender_timeout; only walcast's side knows the link is silent.
        let status = self.ack.status();
        let linked = status.state() == SourceState::Streaming && status.silence(unix_micros_now()).is_none();
        optional(
            w,
            "walcast_slot_active",
            "1 while a walsender streams from the slot (per the last watchdog poll) and walcast hears from it.",
            Some(i64::from(s.active() && linked)),
        );
        optional(
            w,
            "walcast_slot_retained_wal_bytes",
            "WAL the slot keeps on the server: pg_current_wal_lsn() - restart_lsn.",
            s.retained_bytes(),
        );
        optional(
            w,
            "walcast_slot_confirmed_lag_bytes",
            "The server's view of walcast's lag: pg_current_wal_lsn() - confirmed_flush_lsn.",
            s.confirmed_lag_bytes(),
        );
        optional(
            w,
            "walcast_slot_safe_wal_size_bytes",
            "WAL that can still be written before the slot is at risk (absent when unlimited).",
            s.safe_wal_size_bytes(),
        );
        optional(
            w,
            "walcast_slot_max_wal_keep_bytes",
            "max_slot_wal_keep_size in bytes (-1: unlimited).",
            s.max_keep_bytes(),
        );
        w.family("walcast_slot_wal_status", Kind::Gauge, "1 for the slot's wal_status.");
        if polled {
            let current = s.wal_status();
            for status in WalStatus::ALL {
                w.sample(
                    "walcast_slot_wal_status",
                    &[("slot", self.slot.as_str()), ("status", status.as_str())],
                    current == Some(status),
                );
            }
        }
        w.family(
            "walcast_slot_wal_warning",
            Kind::Gauge,
            "1 while the slot's retained WAL is over the warning limits or its WAL is unreserved/lost.",
        );
        w.sample("walcast_slot_wal_warning", &slot, s.warning());
        w.family("walcast_slot_wal_warnings_total", Kind::Counter, "Times the slot WAL warning came on.");
        w.sample("walcast_slot_wal_warnings_total", &slot, s.warnings());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(bytes: u64, seconds: f64) -> Lag {
        Lag { bytes, seconds }
    }

    #[test]
    fn readiness_rules_in_order() {
        let c = MonitorConfig::default();
        let ok = lag(0, 0.0);
        assert_eq!(not_ready_reason(SourceState::Streaming, None, true, ok, None, &c), None);
        let failed = not_ready_reason(
            SourceState::Failed,
            Some("replication failed: replication slot \"s\" was dropped".into()),
            true,
            ok,
            None,
            &c,
        );
        assert_eq!(failed.as_deref(), Some("replication failed: replication slot \"s\" was dropped"));
        let down = not_ready_reason(SourceState::Disconnected, Some("connection reset".into()), true, ok, None, &c);
        assert_eq!(down.as_deref(), Some("replication disconnected: connection reset"));
        assert!(not_ready_reason(SourceState::Starting, None, true, ok, None, &c).unwrap().contains("starting"));
        assert!(not_ready_reason(SourceState::Stopped, None, true, ok, None, &c).unwrap().contains("stopped"));
        assert_eq!(
            not_ready_reason(SourceState::Streaming, None, false, ok, None, &c).as_deref(),
            Some("memberships not loaded")
        );
        assert!(not_ready_reason(SourceState::Streaming, None, true, lag(10, 10.5), None, &c)
            .unwrap()
            .contains("10.5 s"));
        assert_eq!(not_ready_reason(SourceState::Streaming, None, true, lag(16 << 20, 9.9), None, &c), None);
        assert!(not_ready_reason(SourceState::Streaming, None, true, lag((16 << 20) + 1, 0.0), None, &c)
            .unwrap()
            .contains("bytes behind"));
        let silent = not_ready_reason(SourceState::Streaming, None, true, ok, Some(Duration::from_secs(16)), &c);
        assert!(silent.unwrap().contains("nothing received from the walsender for 16.0 s"));
        let unlimited = MonitorConfig { ready_max_lag: None, ready_max_lag_bytes: None, ..MonitorConfig::default() };
        assert_eq!(not_ready_reason(SourceState::Streaming, None, true, lag(u64::MAX, 1e9), None, &unlimited), None);
    }

    #[test]
    fn readiness_json() {
        let r = Readiness {
            reason: Some("replication disconnected: x".into()),
            state: SourceState::Disconnected,
            lag: lag(0, 0.0),
        };
        let v: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(v["reason"], "replication disconnected: x");
        assert_eq!(v["replication"], "disconnected");
        let ok = Readiness { reason: None, state: SourceState::Streaming, lag: lag(5, 0.25) };
        let v: serde_json::Value = serde_json::from_slice(&ok.to_json()).unwrap();
        assert_eq!(v, json!({"ready": true, "replication": "streaming", "lag_bytes": 5, "lag_seconds": 0.25}));
    }
}
