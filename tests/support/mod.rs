//! Test support: scratch databases on a real PostgreSQL (see
//! `walcast::cluster::scratch_server`), and acting as a Supabase API role.

#![allow(dead_code)]

pub mod clients;
pub mod load;
pub mod nats;
pub mod pipeline;
pub mod proxy;
pub mod relay;
pub mod server;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};
use uuid::Uuid;
use walcast::cluster::{scratch_server, ScratchDatabase};

/// A fresh database with the walcast schema applied, and a superuser client.
pub async fn migrated_db() -> (ScratchDatabase, Client) {
    let db = scratch_server().expect("scratch server").migrated_database().await.expect("migrated database");
    let client = db.connect().await.expect("connect");
    (db, client)
}

/// A fresh, empty database and a superuser client.
pub async fn empty_db() -> (ScratchDatabase, Client) {
    let db = scratch_server().expect("scratch server").database().await.expect("database");
    let client = db.connect().await.expect("connect");
    (db, client)
}

/// Who a statement runs as, the way PostgREST/Supabase run API requests:
/// `SET ROLE` plus the JWT claims in `request.jwt.claims`.
#[derive(Debug, Clone, Copy)]
pub enum Who {
    /// The `anon` role, no user.
    Anon,
    /// `authenticated` with `sub` = this user.
    User(Uuid),
    /// `service_role` (BYPASSRLS).
    Service,
    /// Another role (a token whose `role` claim names it), no user.
    Role(&'static str),
}

impl Who {
    /// The PostgreSQL role its statements run as.
    pub fn role(&self) -> &'static str {
        match self {
            Who::Anon => "anon",
            Who::User(_) => "authenticated",
            Who::Service => "service_role",
            Who::Role(role) => role,
        }
    }

    fn claims(&self) -> String {
        match self {
            Who::User(id) => serde_json::json!({"sub": id, "role": "authenticated"}).to_string(),
            other => serde_json::json!({"role": other.role()}).to_string(),
        }
    }
}

/// Runs `sql` as `who` inside a transaction that is rolled back afterwards
/// (so every check starts from the same data). Returns the rows, or the error.
pub async fn query_as(
    client: &mut Client,
    who: Who,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let tx = client.transaction().await.expect("begin");
    tx.execute("select set_config('request.jwt.claims', $1, true)", &[&who.claims()]).await.expect("set claims");
    tx.batch_execute(&format!("set local role {}", who.role())).await.expect("set role");
    let result = tx.query(sql, params).await;
    tx.rollback().await.expect("rollback");
    result
}

/// Like [`query_as`] for a statement: the number of rows it affected.
pub async fn execute_as(
    client: &mut Client,
    who: Who,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await.expect("begin");
    tx.execute("select set_config('request.jwt.claims', $1, true)", &[&who.claims()]).await.expect("set claims");
    tx.batch_execute(&format!("set local role {}", who.role())).await.expect("set role");
    let result = tx.execute(sql, params).await;
    tx.rollback().await.expect("rollback");
    result
}

/// The first column of every row of `sql` (no parameters), as text.
pub async fn texts(client: &Client, sql: &str) -> Vec<String> {
    client.query(sql, &[]).await.expect(sql).iter().map(|r| r.get(0)).collect()
}

/// Creates `auth.users` + `profiles` rows for a new user; returns its id.
pub async fn create_user(client: &Client, email: &str) -> Uuid {
    let id = Uuid::new_v4();
    client.execute("insert into auth.users (id, email) values ($1, $2)", &[&id, &email]).await.expect("auth user");
    client
        .execute("insert into public.profiles (id, email, full_name) values ($1, $2, $2)", &[&id, &email])
        .await
        .expect("profile");
    id
}

/// Creates a dealership; returns its id.
pub async fn create_dealership(client: &Client, code: &str) -> Uuid {
    client
        .query_one("insert into public.dealerships (name, code) values ($1, $1) returning id", &[&code])
        .await
        .expect("dealership")
        .get(0)
}

/// Makes `user` a member of `dealership` with `role`.
pub async fn add_member(client: &Client, user: Uuid, dealership: Uuid, role: &str) {
    client
        .execute(
            "insert into public.dealer_memberships (user_id, dealership_id, role) values ($1, $2, $3)",
            &[&user, &dealership, &role],
        )
        .await
        .expect("membership");
}

/// Creates an order; returns its id.
pub async fn create_order(client: &Client, dealership: Uuid, created_by: Uuid, kind: &str, status: &str) -> Uuid {
    client
        .query_one(
            "insert into public.orders (dealership_id, type, status, customer_info, created_by) \
             values ($1, $2, $3, '{\"name\": \"Ada Lovelace\"}', $4) returning id",
            &[&dealership, &kind, &status, &created_by],
        )
        .await
        .expect("order")
        .get(0)
}

/// The SQLSTATE of an error, for assertions.
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    err.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no sqlstate: {err}"))
}

/// Waits (up to 10 s: the statistics are flushed lazily) until
/// `pg_stat_replication_slots` shows that the walsender of `slot` streamed a
/// transaction (protocol 2) rather than sending it after its commit.
pub async fn wait_until_streamed(client: &Client, slot: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let row = client
            .query_opt("select stream_txns from pg_stat_replication_slots where slot_name = $1", &[&slot])
            .await
            .unwrap();
        if row.is_some_and(|r| r.get::<_, i64>(0) > 0) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "pg_stat_replication_slots shows no streamed transaction");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
