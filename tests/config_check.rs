//! `walcast check` against real databases: a migrated one is ready; each
//! broken prerequisite is reported with its fix; the binary's exit code
//! follows.

use std::process::Command;
use std::str::FromStr;

use walcast::config::check::{self, Finding, Status};
use walcast::config::{FileConfig, Settings};

use crate::support::{empty_db, migrated_db};

fn settings(url: &str) -> Settings {
    let given = FileConfig {
        database_url: Some(url.to_owned()),
        jwt_secret: Some("secret".into()),
        slot_name: Some(format!("check_{}", uuid::Uuid::new_v4().simple())),
        ..FileConfig::default()
    };
    Settings::resolve(given, None).expect("valid settings")
}

async fn run(url: &str) -> Vec<Finding> {
    let settings = settings(url);
    check::run(&settings, &tokio_postgres::Config::from_str(url).unwrap()).await
}

fn find<'a>(findings: &'a [Finding], check: &str) -> &'a Finding {
    findings.iter().find(|f| f.check == check).unwrap_or_else(|| panic!("no {check} in {findings:#?}"))
}

#[tokio::test]
async fn a_migrated_database_is_ready_and_each_broken_prerequisite_is_reported() {
    let (db, client) = migrated_db().await;
    let findings = run(db.url()).await;
    assert!(check::ready(&findings), "{findings:#?}");
    for name in
        ["wal_level", "replication privilege", "replication heartbeat", "publication", "membership table", "JWT keys"]
    {
        assert_eq!(find(&findings, name).status, Status::Ok, "{name}: {findings:#?}");
    }
    assert_eq!(find(&findings, "replica identity public.orders").status, Status::Ok);
    let orders = find(&findings, "plan public.orders as authenticated");
    assert_eq!(orders.status, Status::Ok, "{findings:#?}");
    assert!(orders.detail.starts_with("in memory (member public.dealer_memberships"), "{orders}");
    let cache = find(&findings, "cache public.dealer_memberships(user_id → dealership_id)");
    assert_eq!(cache.status, Status::Ok, "{cache}");
    assert!(find(&findings, "streaming").detail.starts_with("off"));
    // --streaming on a server that can stream (the test clusters are 14+).
    let streaming = Settings { streaming: true, ..settings(db.url()) };
    let findings = check::run(&streaming, &tokio_postgres::Config::from_str(db.url()).unwrap()).await;
    let line = find(&findings, "streaming");
    assert_eq!(line.status, Status::Ok, "{line}");
    assert!(line.detail.starts_with("on"), "{line}");

    // Replica identity back to default: a warning with the exact fix.
    client.batch_execute("alter table public.orders replica identity default").await.unwrap();
    // RLS off on memberships: every row, as PostgreSQL would show them.
    client.batch_execute("alter table public.dealer_memberships disable row level security").await.unwrap();
    // A published table whose policy walcast cannot mirror (a self-join helper).
    client.batch_execute("alter publication supabase_realtime add table public.profiles").await.unwrap();
    let findings = run(db.url()).await;
    assert!(check::ready(&findings), "warnings only: {findings:#?}");
    let identity = find(&findings, "replica identity public.orders");
    assert_eq!(identity.status, Status::Warn);
    assert_eq!(identity.fix.as_deref(), Some(r#"alter table "public"."orders" replica identity full;"#));
    let members = find(&findings, "plan public.dealer_memberships as authenticated");
    assert_eq!((members.status, members.detail.as_str()), (Status::Ok, "every row"), "{members}");
    let profiles = find(&findings, "plan public.profiles as authenticated");
    assert_eq!(profiles.status, Status::Warn);
    assert!(profiles.detail.starts_with("database-evaluated"), "{profiles}");

    // A role without REPLICATION that cannot read memberships: failures.
    let role = format!("nopriv_{}", uuid::Uuid::new_v4().simple());
    client.batch_execute(&format!("create role {role} login password 'pw'")).await.unwrap();
    // …and may not write the heartbeat (revoked in this database only:
    // pg_proc is per database).
    client
        .batch_execute("revoke execute on function pg_catalog.pg_logical_emit_message(boolean, text, text) from public")
        .await
        .unwrap();
    let mut config = tokio_postgres::Config::from_str(db.url()).unwrap();
    config.user(&role).password("pw");
    let findings = check::run(&settings(db.url()), &config).await;
    let heartbeat = find(&findings, "replication heartbeat");
    assert_eq!(heartbeat.status, Status::Warn, "{heartbeat}");
    assert_eq!(
        heartbeat.fix.as_deref(),
        Some(
            format!("grant execute on function pg_catalog.pg_logical_emit_message(boolean, text, text) to \"{role}\";")
                .as_str()
        )
    );
    assert!(!check::ready(&findings));
    let privilege = find(&findings, "replication privilege");
    assert_eq!(privilege.status, Status::Fail);
    assert_eq!(privilege.fix.as_deref(), Some(format!("alter role \"{role}\" with replication;").as_str()));
    assert_eq!(find(&findings, "membership table").status, Status::Fail);
    client.batch_execute(&format!("drop owned by {role}; drop role {role}")).await.unwrap();
}

#[tokio::test]
async fn the_binary_exits_non_zero_when_not_ready() {
    let bin = env!("CARGO_BIN_EXE_walcast");
    let (empty, _client) = empty_db().await;
    let out = Command::new(bin)
        .args(["check", "--database-url", empty.url(), "--jwt-secret", "s"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("[FAIL] publication") && stdout.contains("fix: walcast migrate creates it"), "{stdout}");

    let (db, _client) = migrated_db().await;
    let out = Command::new(bin)
        .args(["check", "--database-url", db.url(), "--jwt-secret", "s"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ready: walcast can stream"), "{stdout}");
    assert!(!stdout.contains(db.url()), "never prints the connection string");

    // No JWT key with a database: a configuration error before connecting.
    let out = Command::new(bin)
        .args(["check", "--database-url", db.url()])
        .env_remove("API_JWT_SECRET")
        .env_remove("API_JWT_JWKS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no JWT key configured"));
}
