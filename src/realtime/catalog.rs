//! The published tables and their columns, read over SQL, so a join can be
//! validated (table published? filter column exists? value casts to its
//! type?) before any change of that table has streamed.
//!
//! Sits beside the hub: sessions read it at join time; nothing on the
//! replication path touches it. A lookup that misses triggers a refresh, at
//! most once per [`MIN_REFRESH_INTERVAL`], so a table added to the
//! publication after start is found on its first join.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::RealtimeError;
use crate::pgconn::PgConfig;

/// Shortest time between two refreshes caused by lookups that missed.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// One published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Columns in `attnum` order: (name, `pg_type.typname`).
    pub columns: Vec<(String, String)>,
}

impl TableInfo {
    /// The type name of a column.
    pub fn column_type(&self, name: &str) -> Option<&str> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }
}

type Tables = HashMap<(String, String), Arc<TableInfo>>;

/// The catalog.
#[derive(Debug)]
pub struct Catalog {
    connection: PgConfig,
    publications: Vec<String>,
    tables: RwLock<Arc<Tables>>,
    /// Serializes refreshes; holds the time of the last one.
    refresh: tokio::sync::Mutex<Instant>,
}

const TABLES_SQL: &str = "
select distinct pt.schemaname::text, pt.tablename::text, a.attnum, a.attname::text, t.typname::text
from pg_catalog.pg_publication_tables pt
join pg_catalog.pg_namespace n on n.nspname = pt.schemaname
join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
join pg_catalog.pg_type t on t.oid = a.atttypid
where pt.pubname = any($1) and pt.schemaname <> 'realtime' -- Broadcast from Database's, never Postgres Changes
order by 1, 2, 3";

/// Longest a catalog read may take (connect and query).
const CATALOG_TIMEOUT: Duration = Duration::from_secs(10);

impl Catalog {
    /// Loads the tables of `publications`.
    ///
    /// # Errors
    /// When PostgreSQL cannot be reached or queried.
    pub async fn load(connection: PgConfig, publications: &[String]) -> Result<Catalog, RealtimeError> {
        let catalog = Catalog {
            connection,
            publications: publications.to_vec(),
            tables: RwLock::new(Arc::default()),
            refresh: tokio::sync::Mutex::new(Instant::now()),
        };
        catalog.reload().await?;
        Ok(catalog)
    }

    async fn reload(&self) -> Result<(), RealtimeError> {
        // Bounded on both sides: PostgreSQL cancels a stuck statement, and a
        // join waiting on a hung connection gives up at the same deadline.
        let query = async {
            let connection = self.connection.with_statement_timeout(CATALOG_TIMEOUT);
            let client = crate::pgconn::connect(&connection).await?;
            client.query(TABLES_SQL, &[&self.publications]).await
        };
        let rows = match tokio::time::timeout(CATALOG_TIMEOUT, query).await {
            Ok(rows) => rows.map_err(RealtimeError::Catalog)?,
            Err(_) => return Err(RealtimeError::CatalogTimeout(CATALOG_TIMEOUT)),
        };
        let mut tables: HashMap<(String, String), TableInfo> = HashMap::new();
        for row in rows {
            let (schema, table, column, type_name): (String, String, String, String) =
                (row.get(0), row.get(1), row.get(3), row.get(4));
            tables
                .entry((schema.clone(), table.clone()))
                .or_insert_with(|| TableInfo { schema, table, columns: Vec::new() })
                .columns
                .push((column, type_name));
        }
        let tables: Tables = tables.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        tracing::debug!(tables = tables.len(), "published tables loaded");
        *self.tables.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(tables);
        Ok(())
    }

    fn snapshot(&self) -> Arc<Tables> {
        Arc::clone(&self.tables.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A published table, as last loaded.
    pub fn get(&self, schema: &str, table: &str) -> Option<Arc<TableInfo>> {
        self.snapshot().get(&(schema.to_owned(), table.to_owned())).cloned()
    }

    /// Every published table, as last loaded.
    pub fn tables(&self) -> Vec<Arc<TableInfo>> {
        self.snapshot().values().cloned().collect()
    }

    /// Reloads unless a reload happened within [`MIN_REFRESH_INTERVAL`].
    ///
    /// # Errors
    /// When PostgreSQL cannot be queried.
    pub async fn refresh_if_stale(&self) -> Result<(), RealtimeError> {
        let mut last = self.refresh.lock().await;
        if last.elapsed() < MIN_REFRESH_INTERVAL {
            return Ok(());
        }
        let result = self.reload().await;
        *last = Instant::now();
        result
    }

    /// [`Catalog::get`], refreshing once on a miss.
    pub async fn lookup(&self, schema: &str, table: &str) -> Option<Arc<TableInfo>> {
        if let Some(info) = self.get(schema, table) {
            return Some(info);
        }
        if let Err(err) = self.refresh_if_stale().await {
            tracing::warn!(error = %err, "refreshing the published tables failed");
        }
        self.get(schema, table)
    }
}
