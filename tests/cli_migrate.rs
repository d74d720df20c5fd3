//! `walcast migrate` as a user runs it: against a given database, and against
//! the embedded PostgreSQL when no URL is given.

use std::process::Command;

use crate::support::empty_db;

fn walcast(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run walcast");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn migrate_applies_then_reports_up_to_date() {
    let (db, client) = empty_db().await;
    let url = db.url().to_owned();
    let (ok, out) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || walcast(&["migrate", "--database-url", &url])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("applied   0001_auth_shim.sql"), "{out}");
    assert!(out.contains("8 applied now, 0 already applied"), "{out}");
    let (ok, out) = tokio::task::spawn_blocking(move || walcast(&["migrate", "--database-url", &url])).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("0 applied now, 8 already applied"), "{out}");
    let n: i64 = client.query_one("select count(*) from walcast.schema_migrations", &[]).await.unwrap().get(0);
    assert_eq!(n, 10, "the demo schema and walcast's own objects (trigger, Broadcast from Database)");
}

#[tokio::test]
async fn migrate_reports_a_bad_url_without_echoing_it() {
    let (ok, out) = tokio::task::spawn_blocking(|| {
        walcast(&["migrate", "--database-url", "postgres://walcast:s3cret@127.0.0.1:1/nowhere"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(out.contains("connecting to PostgreSQL"), "{out}");
    assert!(!out.contains("s3cret"), "the password must not be printed: {out}");
}

#[tokio::test]
async fn migrate_without_a_url_uses_the_embedded_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("pg");
    let data_arg = data_dir.display().to_string();
    let (ok, out) = tokio::task::spawn_blocking({
        let data_arg = data_arg.clone();
        move || walcast(&["migrate", "--data-dir", &data_arg])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("embedded PostgreSQL"), "{out}");
    assert!(out.contains("8 applied now"), "{out}");
    // The data directory is kept and reused.
    let (ok, out) = tokio::task::spawn_blocking(move || walcast(&["migrate", "--data-dir", &data_arg])).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("0 applied now, 8 already applied"), "{out}");
    assert!(!data_dir.join("data/postmaster.pid").exists(), "the embedded server is stopped again");
}
