//! The cluster's change log on JetStream: names, the connection, and the
//! stream, lease bucket and snapshot store every node opens the same way.
//!
//! One deployment is one replication slot: every name carries the slot's
//! name, so two deployments can share a NATS server without meeting.
//!
//! ```text
//!  stream  WALCAST_<slot>        subjects walcast.<slot>.tx (transaction chunks)
//!                                         walcast.<slot>.policy (policy state chunks)
//!  KV      walcast_<slot>_lease  key "leader": the source holding the slot
//!  objects walcast_<slot>_snap   object "latest": the newest policy snapshot
//! ```
//!
//! Headers of every stream message: `Nats-Msg-Id` (`<term>:<commit
//! LSN>:<chunk>`, or `<term>:p<n>:<chunk>` for policy state),
//! `walcast-term` (the leader's lease revision), `walcast-chunk` (0, 1, …),
//! and on a transaction's last chunk `walcast-end-lsn` (policy state:
//! `walcast-last` and `walcast-kind`).

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};

use super::{redact, ClusterSettings, ScaleoutError, MIN_SERVER_VERSION};

/// Header: the publishing leader's term.
pub const TERM: &str = "walcast-term";
/// Header: the chunk's index within its transaction or policy state.
pub const CHUNK: &str = "walcast-chunk";
/// Header: a transaction's end LSN, on its last chunk.
pub const END_LSN: &str = "walcast-end-lsn";
/// Header: on a policy state's last chunk.
pub const LAST: &str = "walcast-last";
/// Header: `policies` (a load) or `update` / `update-ahead` (a reload).
pub const KIND: &str = "walcast-kind";

/// The names of one deployment's stream, subjects and buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The stream.
    pub stream: String,
    /// Transaction chunks.
    pub tx_subject: String,
    /// Policy state chunks.
    pub policy_subject: String,
    /// Both.
    pub all_subjects: String,
    /// The lease bucket.
    pub lease_bucket: String,
    /// The snapshot bucket.
    pub snapshot_bucket: String,
}

impl Names {
    /// The names for `slot` (slot names are `[a-z0-9_]`, valid in every
    /// NATS name).
    pub fn for_slot(slot: &str) -> Names {
        Names {
            stream: format!("WALCAST_{slot}"),
            tx_subject: format!("walcast.{slot}.tx"),
            policy_subject: format!("walcast.{slot}.policy"),
            all_subjects: format!("walcast.{slot}.>"),
            lease_bucket: format!("walcast_{slot}_lease"),
            snapshot_bucket: format!("walcast_{slot}_snap"),
        }
    }
}

/// An open change log: the connection and its handles.
#[derive(Clone)]
pub struct Log {
    /// The NATS connection.
    pub client: async_nats::Client,
    /// Its JetStream context.
    pub js: jetstream::Context,
    /// The names.
    pub names: Names,
    /// The stream's settings as configured.
    pub settings: super::StreamSettings,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("names", &self.names).finish_non_exhaustive()
    }
}

/// Connects (retrying in the background after the first connection; a
/// first connection that fails is an error).
///
/// # Errors
/// [`ScaleoutError::Connect`].
pub async fn connect(settings: &ClusterSettings, name: &str) -> Result<async_nats::Client, ScaleoutError> {
    let url = &settings.nats_url.0;
    let addrs = server_addrs(url).map_err(|e| ScaleoutError::BadUrl { url: redact(url), why: e.to_string() })?;
    async_nats::ConnectOptions::new()
        .name(name)
        // Reconnect forever: a restarting nats-server must not stop the node.
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(addrs.as_slice())
        .await
        .map_err(|source| ScaleoutError::Connect { url: redact(url), source })
}

/// The servers of `--nats-url`: one URL, or several separated by commas
/// (the members of a NATS cluster; the client also learns the others from
/// the server it reaches).
///
/// # Errors
/// A URL that does not parse.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, std::io::Error> {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::parse).collect()
}

/// How long [`Log::open`] retries a JetStream that does not answer yet.
pub const OPEN_RETRY: Duration = Duration::from_secs(30);

/// Whether `version` (`2.10.4`, `2.15.1-beta`) is at least
/// [`MIN_SERVER_VERSION`].
pub fn version_supported(version: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> {
        v.split(['.', '-']).take(3).map(|p| p.trim_start_matches('v').parse().unwrap_or(0)).collect()
    };
    parse(version) >= parse(MIN_SERVER_VERSION)
}

impl Log {
    /// Opens the deployment's stream, creating it if missing; a source
    /// role updates an existing stream's replicas and limits to its
    /// settings, an edge leaves them.
    ///
    /// # Errors
    /// Connection, version, JetStream off, or settings it cannot use.
    pub async fn open(settings: &ClusterSettings, slot: &str, name: &str) -> Result<Log, ScaleoutError> {
        let client = connect(settings, name).await?;
        let version = client.server_info().version;
        if !version_supported(&version) {
            return Err(ScaleoutError::ServerTooOld { found: version });
        }
        let js = jetstream::new(client.clone());
        let names = Names::for_slot(slot);
        let log = Log { client, js, names, settings: settings.stream.clone() };
        // A NATS cluster that is starting has no JetStream leader for a few
        // seconds: its requests time out. Retry those, within a bound.
        let started = tokio::time::Instant::now();
        loop {
            match log.ensure_stream(settings.role.is_source()).await {
                Ok(()) => return Ok(log),
                Err(err) if err.is_transient() && started.elapsed() < OPEN_RETRY => {
                    tracing::warn!(error = %err, "JetStream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.names.stream.clone(),
            subjects: vec![self.names.all_subjects.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_bytes: self.settings.max_bytes,
            max_age: self.settings.max_age,
            num_replicas: self.settings.replicas,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        }
    }

    /// Creates the stream if missing; with `manage` (a source role) also
    /// brings its limits to this node's settings — an edge never changes
    /// them, so nodes configured apart do not undo each other's limits.
    async fn ensure_stream(&self, manage: bool) -> Result<(), ScaleoutError> {
        let wanted = self.stream_config();
        match self.js.get_stream(&self.names.stream).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| ScaleoutError::js("reading the stream", e))?;
                let config = &info.config;
                if config.storage != stream::StorageType::File || config.retention != stream::RetentionPolicy::Limits {
                    return Err(ScaleoutError::StreamSettings {
                        stream: self.names.stream.clone(),
                        what: format!(
                            "storage {:?} and retention {:?} (walcast needs File and Limits)",
                            config.storage, config.retention
                        ),
                    });
                }
                if manage
                    && (config.max_bytes != wanted.max_bytes
                        || config.num_replicas != wanted.num_replicas
                        || config.max_age != wanted.max_age)
                {
                    self.js.update_stream(&wanted).await.map_err(|e| ScaleoutError::js("updating the stream", e))?;
                }
                Ok(())
            }
            Err(err) if matches!(err.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => {
                let text = err.to_string();
                if text.contains("not enabled") {
                    return Err(ScaleoutError::NoJetStream(text));
                }
                self.create_stream(wanted).await
            }
            Err(err) => {
                let text = err.to_string();
                if text.contains("no responders") || text.contains("not enabled") {
                    return Err(ScaleoutError::NoJetStream(text));
                }
                Err(ScaleoutError::js("looking up the stream", err))
            }
        }
    }

    async fn create_stream(&self, wanted: stream::Config) -> Result<(), ScaleoutError> {
        match self.js.create_stream(wanted).await {
            Ok(_) => Ok(()),
            // Another node created it first.
            Err(err) if err.to_string().contains("already in use") => Ok(()),
            Err(err) => Err(ScaleoutError::js("creating the stream", err)),
        }
    }

    /// The stream.
    ///
    /// # Errors
    /// Transient JetStream errors.
    pub async fn stream(&self) -> Result<stream::Stream, ScaleoutError> {
        self.js.get_stream(&self.names.stream).await.map_err(|e| ScaleoutError::js("opening the stream", e))
    }

    /// The lease bucket (entries expire after `ttl`).
    ///
    /// # Errors
    /// Transient JetStream errors.
    pub async fn lease_bucket(&self, ttl: Duration) -> Result<kv::Store, ScaleoutError> {
        if let Ok(store) = self.js.get_key_value(&self.names.lease_bucket).await {
            return Ok(store);
        }
        self.js
            .create_key_value(kv::Config {
                bucket: self.names.lease_bucket.clone(),
                history: 1,
                max_age: ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ScaleoutError::js("creating the lease bucket", e))
    }

    /// The snapshot store.
    ///
    /// # Errors
    /// Transient JetStream errors.
    pub async fn snapshots(&self) -> Result<object_store::ObjectStore, ScaleoutError> {
        if let Ok(store) = self.js.get_object_store(&self.names.snapshot_bucket).await {
            return Ok(store);
        }
        self.js
            .create_object_store(object_store::Config {
                bucket: self.names.snapshot_bucket.clone(),
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ScaleoutError::js("creating the snapshot store", e))
    }
}

/// The name of the snapshot object.
pub const SNAPSHOT_OBJECT: &str = "latest";

/// A snapshot blob: the stream sequence it is consistent at (every message
/// up to it included, none after), then the encoded policy state.
pub fn snapshot_blob(sequence: u64, state: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(8 + state.len());
    blob.extend_from_slice(&sequence.to_le_bytes());
    blob.extend_from_slice(state);
    blob
}

/// Splits a snapshot blob; `None` if too short.
pub fn split_snapshot(blob: &[u8]) -> Option<(u64, &[u8])> {
    let (seq, rest) = blob.split_at_checked(8)?;
    Some((u64::from_le_bytes(seq.try_into().ok()?), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_names() {
        assert!(version_supported("2.10.0"));
        assert!(version_supported("2.15.1"));
        assert!(version_supported("v2.11.3-RC.1"));
        assert!(!version_supported("2.9.10"));
        assert!(!version_supported("1.4"));
        let names = Names::for_slot("walcast_x");
        assert_eq!(names.stream, "WALCAST_walcast_x");
        assert_eq!(names.all_subjects, "walcast.walcast_x.>");
        assert_eq!(split_snapshot(&snapshot_blob(42, b"abc")), Some((42, &b"abc"[..])));
        assert_eq!(split_snapshot(b"short"), None);
    }
}
