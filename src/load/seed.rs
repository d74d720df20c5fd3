//! The database of a load run: where it lives (an ephemeral cluster, a fresh
//! database on a given server, or an existing database an external relay
//! streams), the seed (dealerships, users, memberships, orders) and the
//! clean-up.
//!
//! Invariants:
//! - every row the run writes has an id of the run's [`Ids`] scheme and every
//!   dealership code is unique to the run, so rows of other runs or writers
//!   are never mistaken for ours;
//! - the seed is written before the relay's slot exists (child and in-process
//!   relays), so none of it is streamed; an external relay streams it, and the
//!   probe in [`super::run`] waits until the relay has handled it before any
//!   client subscribes;
//! - a fresh database is dropped at the end (after the run's slot) unless
//!   `--keep`; in an existing database only the run's own rows are deleted.

use tokio_postgres::{Client, NoTls};

use super::ids::{Ids, Rng, Tag};
use super::oracle::{Members, RowState, STATUSES};
use super::LoadError;
use crate::cluster::{Cluster, ClusterConfig};
use crate::schema::{self, Migrations};

/// Where the database is.
#[derive(Debug)]
pub enum Database {
    /// A temporary cluster this run started (removed at the end).
    Ephemeral {
        /// The cluster.
        cluster: Box<Cluster>,
        /// The database URL.
        url: String,
    },
    /// A fresh database on a server given by URL.
    Fresh {
        /// URL of the server's maintenance database (as given).
        admin_url: String,
        /// The database's name.
        name: String,
        /// The database URL.
        url: String,
    },
    /// An existing database (an external relay streams it).
    Existing {
        /// The database URL.
        url: String,
    },
}

impl Database {
    /// The database URL.
    pub fn url(&self) -> &str {
        match self {
            Database::Ephemeral { url, .. } | Database::Fresh { url, .. } | Database::Existing { url } => url,
        }
    }

    /// A short description for the report.
    pub fn describe(&self) -> String {
        match self {
            Database::Ephemeral { cluster, .. } => {
                format!("ephemeral PostgreSQL {} (fsync=off, synchronous_commit=on)", cluster.version())
            }
            Database::Fresh { name, .. } => format!("fresh database {name} on the given server"),
            Database::Existing { .. } => "the external relay's database (rows of this run only)".into(),
        }
    }
}

/// Connects with a task driving the connection.
///
/// # Errors
/// When the connection fails.
pub async fn connect(url: &str) -> Result<Client, LoadError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(LoadError::db("connect"))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "load connection ended");
        }
    });
    Ok(client)
}

/// Prepares the database: starts a cluster, or creates a fresh database on
/// `database_url`, or uses it as it is (`existing`); applies the schema
/// unless existing.
///
/// # Errors
/// Cluster, connection and migration failures.
pub async fn prepare(database_url: Option<&str>, existing: bool, ids: &Ids) -> Result<Database, LoadError> {
    let database = match database_url {
        None => {
            let cluster = tokio::task::spawn_blocking(|| {
                Cluster::start(
                    ClusterConfig::ephemeral()
                        .setting("max_connections", 300)
                        .setting("shared_buffers", "256MB")
                        .setting("wal_sender_timeout", "30s")
                        // The walsender sends only flushed WAL: with
                        // synchronous_commit=off a commit waits for the WAL
                        // writer (up to wal_writer_delay, 200 ms), which would
                        // dominate every latency. fsync=off keeps flushes cheap.
                        .setting("synchronous_commit", "on"),
                )
            })
            .await
            .map_err(|e| LoadError::Relay(format!("cluster task: {e}")))??;
            let admin = connect(&cluster.url("postgres")).await?;
            admin.batch_execute("create database walcast_load").await.map_err(LoadError::db("create database"))?;
            let url = cluster.url("walcast_load");
            Database::Ephemeral { cluster: Box::new(cluster), url }
        }
        Some(url) if existing => return Ok(Database::Existing { url: url.to_owned() }),
        Some(admin_url) => {
            let admin = connect(admin_url).await?;
            let level: String =
                admin.query_one("show wal_level", &[]).await.map_err(LoadError::db("show wal_level"))?.get(0);
            if level != "logical" {
                return Err(LoadError::Config(format!(
                    "the server's wal_level is {level}; logical replication needs wal_level=logical"
                )));
            }
            let name = format!("walcast_load_{}", ids.short());
            admin
                .batch_execute(&format!("create database {name}"))
                .await
                .map_err(LoadError::db("create the load database (a superuser URL is needed)"))?;
            let url = with_database(admin_url, &name)?;
            Database::Fresh { admin_url: admin_url.to_owned(), name, url }
        }
    };
    let mut client = connect(database.url()).await?;
    schema::migrate(&mut client, &Migrations::embedded())
        .await
        .map_err(|e| LoadError::Relay(format!("migrating: {e}")))?;
    Ok(database)
}

/// `url` with its database replaced by `name` (URL or key=value form).
fn with_database(url: &str, name: &str) -> Result<String, LoadError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url, String::new()),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let base = match base[scheme_end..].find('/') {
            Some(i) => &base[..scheme_end + i],
            None => base,
        };
        Ok(format!("{base}/{name}{query}"))
    } else if url.contains('=') {
        let kept: Vec<&str> = url.split_whitespace().filter(|kv| !kv.starts_with("dbname=")).collect();
        Ok(format!("{} dbname={name}", kept.join(" ")))
    } else {
        Err(LoadError::Config("--database-url is neither a postgres:// URL nor a key=value string".into()))
    }
}

/// The run's initial world.
#[derive(Debug, Clone)]
pub struct World {
    /// Dealerships clients' users belong to (the probe dealership is one more).
    pub dealerships: u32,
    /// Users.
    pub users: u32,
    /// Initial members per dealership.
    pub members: Members,
    /// Initial memberships: (membership index, user, dealership).
    pub memberships: Vec<(u32, u32, u32)>,
    /// Initial orders: index → state (all at sequence number 0).
    pub orders: Vec<RowState>,
}

impl World {
    /// Each user a member of 1–3 distinct dealerships (seeded), `orders`
    /// orders spread uniformly.
    pub fn generate(dealerships: u32, users: u32, orders: u32, seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let mut members = Members::new(dealerships as usize);
        let mut memberships = Vec::new();
        for user in 0..users {
            let count = (1 + rng.below(3)).min(dealerships);
            let mut mine: Vec<u32> = Vec::new();
            while (mine.len() as u32) < count {
                let d = rng.below(dealerships);
                if !mine.contains(&d) {
                    mine.push(d);
                }
            }
            for d in mine {
                memberships.push((memberships.len() as u32, user, d));
                members.grant(user, d);
            }
        }
        let orders = (0..orders)
            .map(|_| RowState { dealership: rng.below(dealerships), status: rng.below(STATUSES.len() as u32) as u8 })
            .collect();
        World { dealerships, users, members, memberships, orders }
    }

    /// The probe dealership (no members): the probe's marker order lives there.
    pub fn probe_dealership(&self) -> u32 {
        self.dealerships
    }

    /// The user orders are created by (no memberships).
    pub fn writer_user(&self) -> u32 {
        self.users
    }
}

/// Writes the world: dealerships, users (auth.users + profiles),
/// memberships, orders, in bulk.
///
/// # Errors
/// When a statement fails.
pub async fn seed(client: &Client, world: &World, ids: &Ids) -> Result<(), LoadError> {
    let dealership_ids: Vec<uuid::Uuid> = (0..=world.dealerships).map(|d| ids.uuid(Tag::Dealership, d)).collect();
    let codes: Vec<String> = (0..=world.dealerships).map(|d| ids.dealership_code(d)).collect();
    client
        .execute(
            "insert into public.dealerships (id, name, code) select * from unnest($1::uuid[], $2::text[], $2::text[])",
            &[&dealership_ids, &codes],
        )
        .await
        .map_err(LoadError::db("seed dealerships"))?;
    for chunk in (0..=world.users).collect::<Vec<_>>().chunks(10_000) {
        let user_ids: Vec<uuid::Uuid> = chunk.iter().map(|&u| ids.uuid(Tag::User, u)).collect();
        let emails: Vec<String> = chunk.iter().map(|u| format!("load-{}-{u}@walcast.invalid", ids.short())).collect();
        client
            .execute(
                "insert into auth.users (id, email) select * from unnest($1::uuid[], $2::text[])",
                &[&user_ids, &emails],
            )
            .await
            .map_err(LoadError::db("seed auth.users"))?;
        client
            .execute(
                "insert into public.profiles (id, email) select * from unnest($1::uuid[], $2::text[])",
                &[&user_ids, &emails],
            )
            .await
            .map_err(LoadError::db("seed profiles"))?;
    }
    for chunk in world.memberships.chunks(10_000) {
        let m: Vec<uuid::Uuid> = chunk.iter().map(|&(i, _, _)| ids.uuid(Tag::Membership, i)).collect();
        let u: Vec<uuid::Uuid> = chunk.iter().map(|&(_, u, _)| ids.uuid(Tag::User, u)).collect();
        let d: Vec<uuid::Uuid> = chunk.iter().map(|&(_, _, d)| ids.uuid(Tag::Dealership, d)).collect();
        client
            .execute(
                "insert into public.dealer_memberships (id, user_id, dealership_id, role) \
                 select m, u, d, 'user' from unnest($1::uuid[], $2::uuid[], $3::uuid[]) as t (m, u, d)",
                &[&m, &u, &d],
            )
            .await
            .map_err(LoadError::db("seed memberships"))?;
    }
    let creator = ids.uuid(Tag::User, world.writer_user());
    let indexes: Vec<u32> = (0..world.orders.len() as u32).collect();
    for chunk in indexes.chunks(10_000) {
        let o: Vec<uuid::Uuid> = chunk.iter().map(|&i| ids.uuid(Tag::Order, i)).collect();
        let d: Vec<uuid::Uuid> =
            chunk.iter().map(|&i| ids.uuid(Tag::Dealership, world.orders[i as usize].dealership)).collect();
        let s: Vec<&str> = chunk.iter().map(|&i| STATUSES[usize::from(world.orders[i as usize].status)]).collect();
        client
            .execute(
                "insert into public.orders (id, dealership_id, type, status, customer_info, created_by, metadata) \
                 select o, d, 'sales', s, '{\"name\": \"load\"}', $4, jsonb_build_object('load_t_us', 0, 'load_seq', 0) \
                 from unnest($1::uuid[], $2::uuid[], $3::text[]) as t (o, d, s)",
                &[&o, &d, &s, &creator],
            )
            .await
            .map_err(LoadError::db("seed orders"))?;
    }
    Ok(())
}

/// Drops the run's slot (if still there) and the fresh database, or deletes
/// the run's rows from an existing database; stops an ephemeral cluster.
///
/// # Errors
/// When a statement fails.
pub async fn cleanup(database: Database, slot: Option<&str>, keep: bool, ids: &Ids) -> Result<(), LoadError> {
    match database {
        Database::Ephemeral { cluster, .. } => {
            tokio::task::spawn_blocking(move || drop(cluster))
                .await
                .map_err(|e| LoadError::Relay(format!("stopping the cluster: {e}")))?;
            Ok(())
        }
        Database::Fresh { admin_url, name, url } => {
            if keep {
                println!("kept the load database {name} (slot {})", slot.unwrap_or("-"));
                return Ok(());
            }
            let admin = connect(&admin_url).await?;
            if let Some(slot) = slot {
                admin
                    .execute(
                        "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                         where slot_name = $1 and not active",
                        &[&slot],
                    )
                    .await
                    .map_err(LoadError::db("drop the load slot"))?;
            }
            drop(url);
            admin
                .batch_execute(&format!("drop database if exists {name} with (force)"))
                .await
                .map_err(LoadError::db("drop the load database"))?;
            Ok(())
        }
        Database::Existing { url } => {
            if keep {
                return Ok(());
            }
            let client = connect(&url).await?;
            let prefix = format!("load-{}-%", ids.short());
            client.batch_execute("begin").await.map_err(LoadError::db("begin the clean-up"))?;
            let codes = format!("L{}%", &ids.dealership_code(0)[1..9]);
            for sql in [
                "delete from public.orders where dealership_id in (select id from public.dealerships where code like $1)",
                "delete from public.dealer_memberships where dealership_id in (select id from public.dealerships where code like $1)",
                "delete from public.dealerships where code like $1",
            ] {
                client.execute(sql, &[&codes]).await.map_err(LoadError::db("delete the run's rows"))?;
            }
            client
                .execute("delete from auth.users where email like $1", &[&prefix])
                .await
                .map_err(LoadError::db("delete the run's users"))?;
            client.batch_execute("commit").await.map_err(LoadError::db("commit the clean-up"))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_database_swapped() {
        assert_eq!(with_database("postgres://u@h:5/postgres", "x").unwrap(), "postgres://u@h:5/x");
        assert_eq!(with_database("postgres://u@h:5", "x").unwrap(), "postgres://u@h:5/x");
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgresql://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("host=/tmp port=5 dbname=postgres", "x").unwrap(), "host=/tmp port=5 dbname=x");
    }

    #[test]
    fn worlds_are_seeded_and_bounded() {
        let w = World::generate(5, 20, 30, 7);
        let again = World::generate(5, 20, 30, 7);
        assert_eq!(w.memberships, again.memberships);
        for user in 0..20 {
            let n = (0..5).filter(|&d| w.members.is_member(user, d)).count();
            assert!((1..=3).contains(&n), "user {user}: {n}");
        }
        assert_eq!(w.orders.len(), 30);
        assert!(w.orders.iter().all(|o| o.dealership < 5));
    }
}
