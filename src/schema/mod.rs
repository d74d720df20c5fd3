//! The database schema walcast serves, and the migration runner that applies it.
//!
//! The SQL lives in `sql/NNNN_name.sql` at the top of the repository and is
//! compiled into the binary ([`Migrations::embedded`]); [`Migrations::from_dir`]
//! reads the same files from disk instead. `walcast migrate` and the test
//! harness both go through [`migrate`].
//!
//! Two sets share the runner and `walcast.schema_migrations`: the demo
//! schema (`sql/`, names `NNNN_name.sql`) and walcast's own objects
//! (`sql/walcast/`, [`Migrations::walcast`], recorded as
//! `walcast/NNNN_name.sql`): the event trigger that reports policy changes,
//! and the `realtime` objects of Broadcast from Database (created only where
//! absent) with walcast's own `walcast_messages` publication.
//! `walcast setup` applies the second to any database; `walcast migrate`
//! applies both. Each run checks only the rows of its own set.
//!
//! Invariants:
//! - files apply in name order, each in its own transaction together with its
//!   row in `walcast.schema_migrations` (name, SHA-256 of the file, time, role):
//!   a file is either applied and recorded, or neither;
//! - an applied file is never applied again, so running `migrate` twice changes
//!   nothing;
//! - an applied file whose checksum differs from the file now shipped is refused
//!   before anything is applied, naming the file (edit history by adding a new
//!   file, never by editing an applied one); so is an applied file this walcast
//!   does not know (the database was migrated by a newer walcast);
//! - concurrent runners against one database serialize on an advisory lock.
//!
//! Each file is also written to be idempotent on its own (`if not exists`,
//! catalog checks), because the auth shim and the publication may already exist
//! on a Supabase database.

use std::path::Path;

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

/// Advisory lock key serializing migration runs ("walcast" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x0077_616c_6361_7374;

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// File name, e.g. `0002_tables.sql`; also its identity in the database.
    pub name: String,
    /// The SQL text.
    pub sql: String,
}

impl Migration {
    /// Hex SHA-256 of the file's bytes.
    pub fn checksum(&self) -> String {
        let digest = Sha256::digest(self.sql.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/", $name)))),*]
    };
}

/// The migrations compiled into this binary, in order. A unit test checks that
/// this list and the `sql/` directory agree.
const EMBEDDED: &[(&str, &str)] = embedded![
    "0001_auth_shim.sql",
    "0002_tables.sql",
    "0003_order_numbers.sql",
    "0004_row_level_security.sql",
    "0005_indexes.sql",
    "0006_realtime_publication.sql",
    "0007_order_numbers_bulk.sql",
    "0008_search_document_inline.sql",
];

/// walcast's own migrations (`sql/walcast/`), in order; recorded under
/// [`WALCAST_PREFIX`].
const WALCAST: &[(&str, &str)] = &[
    (
        "0001_policy_changes.sql",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/walcast/0001_policy_changes.sql")),
    ),
    (
        "0002_realtime_messages.sql",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/walcast/0002_realtime_messages.sql")),
    ),
];

/// The name prefix of walcast's own migrations in `walcast.schema_migrations`.
pub const WALCAST_PREFIX: &str = "walcast/";

/// An ordered set of migrations.
#[derive(Debug, Clone)]
pub struct Migrations {
    items: Vec<Migration>,
    /// The prefix of this set's names (`""` for the demo schema).
    prefix: &'static str,
}

impl Migrations {
    /// The migrations shipped inside this binary.
    pub fn embedded() -> Self {
        Migrations {
            items: EMBEDDED
                .iter()
                .map(|(name, sql)| Migration { name: (*name).to_owned(), sql: (*sql).to_owned() })
                .collect(),
            prefix: "",
        }
    }

    /// walcast's own objects (`sql/walcast/`): the event trigger reporting
    /// policy changes, and the `realtime` schema of Broadcast from Database
    /// where absent. Needs a superuser; applies to any database.
    pub fn walcast() -> Self {
        Migrations {
            items: WALCAST
                .iter()
                .map(|(name, sql)| Migration { name: format!("{WALCAST_PREFIX}{name}"), sql: (*sql).to_owned() })
                .collect(),
            prefix: WALCAST_PREFIX,
        }
    }

    /// Whether a name recorded in `walcast.schema_migrations` belongs to
    /// this set.
    fn owns(&self, name: &str) -> bool {
        if self.prefix.is_empty() {
            !name.contains('/')
        } else {
            name.starts_with(self.prefix)
        }
    }

    /// Every `NNNN_*.sql` file directly in `dir`, in name order.
    ///
    /// # Errors
    /// When the directory or a file cannot be read.
    pub fn from_dir(dir: &Path) -> Result<Self, SchemaError> {
        let io = |source| SchemaError::Io { path: dir.display().to_string(), source };
        let mut items = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if !is_migration_name(name) {
                continue;
            }
            let sql = std::fs::read_to_string(&path)
                .map_err(|source| SchemaError::Io { path: path.display().to_string(), source })?;
            items.push(Migration { name: name.to_owned(), sql });
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Migrations { items, prefix: "" })
    }

    /// The migrations in order.
    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.items.iter()
    }
}

/// `NNNN_name.sql`: four digits, an underscore, a name.
fn is_migration_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    name.len() > 9 && name.ends_with(".sql") && bytes[..4].iter().all(u8::is_ascii_digit) && bytes[4] == b'_'
}

/// What a migration run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Files applied by this run, in order.
    pub applied: Vec<String>,
    /// Files that were already applied (checksums verified).
    pub unchanged: Vec<String>,
}

/// Errors of the schema layer.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// An applied migration differs from the file shipped now.
    #[error(
        "migration {name} was applied with checksum {applied} but the file now has checksum {current}: \
         applied migrations must never be edited; restore the original file and put the change in a new migration"
    )]
    ChecksumMismatch {
        /// The file.
        name: String,
        /// Checksum recorded when it was applied.
        applied: String,
        /// Checksum of the file now.
        current: String,
    },
    /// The database has an applied migration this walcast does not ship.
    #[error(
        "the database has migration {name} applied, which this walcast does not know: \
         it was migrated by a newer walcast; upgrade walcast instead of migrating with this one"
    )]
    UnknownApplied {
        /// The unknown file.
        name: String,
    },
    /// A migration's SQL failed; the transaction was rolled back.
    #[error("migration {name} failed: {source}")]
    Apply {
        /// The file.
        name: String,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Bookkeeping SQL (lock, `walcast.schema_migrations`) failed.
    #[error("could not {what}: {source}")]
    Database {
        /// What was being done.
        what: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A migration file could not be read.
    #[error("could not read {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl SchemaError {
    /// Whether retrying may succeed (a connection problem) rather than needing
    /// an operator's fix.
    pub fn is_transient(&self) -> bool {
        match self {
            SchemaError::Database { source, .. } | SchemaError::Apply { source, .. } => source.is_closed(),
            _ => false,
        }
    }
}

/// Creates database `name` through `admin` (a connection to another database
/// of the same server) unless it exists; returns whether it was created.
///
/// # Errors
/// SQL errors (e.g. the role may not create databases).
pub async fn ensure_database(admin: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    let exists = admin.query_opt("select 1 from pg_catalog.pg_database where datname = $1", &[&name]).await?.is_some();
    if !exists {
        admin.batch_execute(&format!("create database {}", crate::replication::slot::quote_ident(name))).await?;
    }
    Ok(!exists)
}

/// Applies every migration of `migrations` not yet applied to the database
/// behind `client`, after verifying the checksums of those already applied.
///
/// # Errors
/// [`SchemaError::ChecksumMismatch`] / [`SchemaError::UnknownApplied`] before
/// anything is applied; [`SchemaError::Apply`] when a file's SQL fails (that
/// file is rolled back, earlier files of this run stay applied).
pub async fn migrate(client: &mut Client, migrations: &Migrations) -> Result<MigrationReport, SchemaError> {
    let db = |what| move |source| SchemaError::Database { what, source };
    // `drop policy if exists`, `create … if not exists` and friends send a
    // NOTICE for each thing they skip; the operator only needs warnings.
    client.batch_execute("set client_min_messages = warning").await.map_err(db("set client_min_messages"))?;
    client
        .batch_execute(
            "create schema if not exists walcast;
             create table if not exists walcast.schema_migrations (
                 name text primary key,
                 checksum text not null,
                 applied_at timestamptz not null default now(),
                 applied_by name not null default current_user
             );",
        )
        .await
        .map_err(db("create walcast.schema_migrations"))?;
    client
        .execute("select pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(db("take the migration lock"))?;
    let result = apply_pending(client, migrations).await;
    let unlock = client
        .execute("select pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(db("release the migration lock"));
    let report = result?;
    unlock?;
    client.batch_execute("reset client_min_messages").await.map_err(db("reset client_min_messages"))?;
    Ok(report)
}

async fn apply_pending(client: &mut Client, migrations: &Migrations) -> Result<MigrationReport, SchemaError> {
    let rows = client
        .query("select name, checksum from walcast.schema_migrations order by name", &[])
        .await
        .map_err(|source| SchemaError::Database { what: "read walcast.schema_migrations", source })?;
    let applied: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .filter(|(name, _): &(String, String)| migrations.owns(name))
        .collect();

    // Verify everything before applying anything.
    for (name, checksum) in &applied {
        match migrations.iter().find(|m| &m.name == name) {
            None => return Err(SchemaError::UnknownApplied { name: name.clone() }),
            Some(m) if &m.checksum() != checksum => {
                return Err(SchemaError::ChecksumMismatch {
                    name: name.clone(),
                    applied: checksum.clone(),
                    current: m.checksum(),
                })
            }
            Some(_) => {}
        }
    }

    let mut report = MigrationReport::default();
    for migration in migrations.iter() {
        if applied.iter().any(|(name, _)| name == &migration.name) {
            report.unchanged.push(migration.name.clone());
            continue;
        }
        let apply_err = |source| SchemaError::Apply { name: migration.name.clone(), source };
        let tx = client.transaction().await.map_err(apply_err)?;
        tx.batch_execute(&migration.sql).await.map_err(apply_err)?;
        tx.execute(
            "insert into walcast.schema_migrations (name, checksum) values ($1, $2)",
            &[&migration.name, &migration.checksum()],
        )
        .await
        .map_err(apply_err)?;
        tx.commit().await.map_err(apply_err)?;
        tracing::info!(migration = %migration.name, "applied migration");
        report.applied.push(migration.name.clone());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_list_matches_sql_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql");
        let on_disk = Migrations::from_dir(&dir).unwrap();
        let embedded = Migrations::embedded();
        let names = |m: &Migrations| m.iter().map(|x| x.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&embedded), names(&on_disk), "update EMBEDDED in src/schema/mod.rs");
        for (a, b) in embedded.iter().zip(on_disk.iter()) {
            assert_eq!(a.checksum(), b.checksum(), "{}", a.name);
        }
    }

    #[test]
    fn walcast_list_matches_its_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/walcast");
        let on_disk = Migrations::from_dir(&dir).unwrap();
        let ours = Migrations::walcast();
        let names: Vec<String> = on_disk.iter().map(|m| format!("{WALCAST_PREFIX}{}", m.name)).collect();
        assert_eq!(ours.iter().map(|m| m.name.clone()).collect::<Vec<_>>(), names, "update WALCAST");
        assert!(ours.owns("walcast/0001_x.sql") && !ours.owns("0001_x.sql"));
        assert!(Migrations::embedded().owns("0001_x.sql") && !Migrations::embedded().owns("walcast/0001_x.sql"));
    }

    #[test]
    fn migration_names() {
        assert!(is_migration_name("0001_auth_shim.sql"));
        assert!(!is_migration_name("README.md"));
        assert!(!is_migration_name("001_x.sql"));
        assert!(!is_migration_name("abcd_x.sql"));
        assert!(!is_migration_name("0001_.sq"));
    }

    #[test]
    fn checksum_is_sha256_hex() {
        let m = Migration { name: "0001_x.sql".into(), sql: "abc".into() };
        assert_eq!(m.checksum(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
