//! Shared by the benches: the `public.orders` table as sql/0002 publishes it.

#![allow(dead_code)] // each bench uses part of it

use std::sync::Arc;

use walcast::change::{value, ColumnInfo, RelationInfo};
use walcast::pgoutput::ReplicaIdentity;

/// The OID the benches give `public.orders`.
pub(crate) const ORDERS_OID: u32 = 16_500;

/// `public.orders` columns and type OIDs, in table order
/// (uuid 2950, text 25, jsonb 3802, timestamptz 1184).
pub(crate) const ORDER_COLUMNS: [(&str, u32); 13] = [
    ("id", 2950),
    ("dealership_id", 2950),
    ("order_number", 25),
    ("type", 25),
    ("status", 25),
    ("customer_info", 3802),
    ("vehicle_info", 3802),
    ("service_details", 3802),
    ("metadata", 3802),
    ("created_by", 2950),
    ("assigned_to", 2950),
    ("created_at", 1184),
    ("updated_at", 1184),
];

/// `public.orders` as the change stage describes it.
pub(crate) fn orders_relation(replica_identity: ReplicaIdentity) -> Arc<RelationInfo> {
    Arc::new(RelationInfo {
        oid: ORDERS_OID,
        schema: "public".into(),
        table: "orders".into(),
        replica_identity,
        columns: ORDER_COLUMNS
            .iter()
            .map(|&(name, oid)| ColumnInfo {
                name: name.into(),
                type_name: value::builtin_type_name(oid).expect("built-in type").into(),
                type_oid: oid,
                is_key: name == "id",
                kind: value::kind_of(oid),
            })
            .collect(),
    })
}

/// A numeric setting from the environment, or `default`.
pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The median (the upper one for an even count); sorts `values`.
pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The large-backlog cluster the end-to-end benches share: an ephemeral
/// cluster (4 GB `max_wal_size`, 256 MB `shared_buffers`) with a fresh
/// `bench` database, and a connection to it.
pub(crate) async fn bench_database() -> anyhow::Result<(walcast::cluster::Cluster, tokio_postgres::Client)> {
    use walcast::cluster::{Cluster, ClusterConfig};
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(ClusterConfig::ephemeral().setting("max_wal_size", "4GB").setting("shared_buffers", "256MB"))
    })
    .await??;
    let (admin, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin.batch_execute("create database bench").await?;
    let (client, conn) = tokio_postgres::connect(&cluster.url("bench"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok((cluster, client))
}

/// Wall time of `pg_recvlogical` reading `slot` of the `bench` database
/// (pgoutput protocol 1, `publication`) from its position up to `endpos`,
/// into `/dev/null`: the walsender's own time to send that WAL.
pub(crate) fn recvlogical_run(
    cluster: &walcast::cluster::Cluster,
    slot: &str,
    endpos: &str,
    publication: &str,
) -> anyhow::Result<std::time::Duration> {
    use anyhow::Context;
    let started = std::time::Instant::now();
    let status = std::process::Command::new(cluster.bindir().join("pg_recvlogical"))
        .args(["-d", &cluster.url("bench"), "--slot", slot, "--start", "--no-loop", "-f", "/dev/null"])
        .args(["--endpos", endpos, "-o", "proto_version=1"])
        .args(["-o", &format!("publication_names={publication}")])
        .status()
        .context("running pg_recvlogical")?;
    let elapsed = started.elapsed();
    if !status.success() {
        anyhow::bail!("pg_recvlogical failed: {status}");
    }
    Ok(elapsed)
}

/// The highest RSS of a process, sampled from `/proc` every `every` on a
/// task of its own until [`PeakRss::stop`].
pub(crate) struct PeakRss {
    stop: Arc<std::sync::atomic::AtomicBool>,
    peak: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    /// Starts sampling `pid`, from `initial_kb`.
    pub(crate) fn start(pid: u32, initial_kb: u64, every: std::time::Duration) -> PeakRss {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(initial_kb));
        let task = {
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(s) = walcast::load::relay::proc_sample(pid) {
                        peak.fetch_max(s.rss_kb, Ordering::Relaxed);
                    }
                    tokio::time::sleep(every).await;
                }
            })
        };
        PeakRss { stop, peak, task }
    }

    /// Stops sampling; the peak, KiB.
    pub(crate) async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}
