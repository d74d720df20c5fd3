//! Starting walcast, and failing to: the demo only when asked (bare
//! `walcast` without a database: loopback, a DEMO banner, no `--jwt-secret`),
//! `walcast serve` without a database refused, a failed start that leaves no
//! slot behind but never drops one it did not create, and start-up output
//! without NOTICE noise, colours in a pipe, or a cause said twice.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_postgres::Client;
use uuid::Uuid;
use walcast::pgconn::PgConfig;
use walcast::realtime::auth::AuthConfig;
use walcast::relay::RelayConfig;
use walcast::replication::{SlotOptions, SourceConfig};
use walcast::server::{ServeConfig, Server};

use crate::support::server::SECRET;
use crate::support::{empty_db, migrated_db};

/// How long a command may take.
const WAIT: Duration = Duration::from_secs(60);

/// `walcast ARGS` in `dir` with only `PATH` set (and `env`).
fn walcast(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_walcast"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn output(mut command: tokio::process::Command) -> (Output, String) {
    let out = tokio::time::timeout(WAIT, command.output()).await.expect("walcast finishes").expect("run walcast");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

#[tokio::test]
async fn serve_without_a_database_is_refused_and_the_demo_takes_no_key() {
    let dir = tempfile::tempdir().unwrap();
    for (args, env) in [
        (&["serve"][..], &[][..]),
        (&["serve", "--jwt-secret", SECRET][..], &[][..]),
        (&["serve"][..], &[("API_JWT_SECRET", SECRET), ("PORT", "0")][..]),
        (&["check", "--jwt-secret", SECRET][..], &[][..]),
    ] {
        let (out, text) = output(walcast(dir.path(), args, env)).await;
        assert!(!out.status.success(), "{args:?}: {text}");
        for name in ["DATABASE_URL", "DB_HOST", "--config"] {
            assert!(text.contains(name), "{args:?}: the error names {name}: {text}");
        }
        assert!(!text.contains(SECRET), "{text}");
    }
    // Bare `walcast` with a key but no database: a mistake, not a demo.
    for (args, env) in [(&["--jwt-secret", SECRET][..], &[][..]), (&[][..], &[("API_JWT_SECRET", SECRET)][..])] {
        let (out, text) = output(walcast(dir.path(), args, env)).await;
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains("--jwt-secret") && text.contains("demo"), "{text}");
        assert!(!text.contains(SECRET), "{text}");
    }
    assert!(!dir.path().join(".walcast").exists(), "nothing was started or created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_walcast_runs_the_demo_on_loopback_with_a_banner() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("pg");
    let data_arg = data_dir.display().to_string();
    let mut child = walcast(dir.path(), &["--data-dir", &data_arg, "--port", "0", "--demo-writer-secs", "0"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walcast");
    let stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = Vec::new();
    let addr: SocketAddr = loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the demo serves within {WAIT:?}: {stdout:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the demo exited: {stdout:?}"));
        stdout.push(line.clone());
        if let Some(rest) = line.strip_prefix("walcast serving on ws://") {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    assert!(stdout[0].starts_with("=== DEMO ==="), "the banner comes first: {stdout:?}");
    assert!(addr.ip().is_loopback(), "the demo binds 127.0.0.1 unless --host is given: {addr}");
    // SIGTERM: a clean stop, embedded PostgreSQL included.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(WAIT, child.wait()).await.expect("the demo stops").unwrap();
    let stderr = stderr.await.unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(!data_dir.join("data/postmaster.pid").exists(), "the embedded server is stopped");
    // A fresh demo database was migrated: no NOTICE lines, and no colours in a pipe.
    assert!(!stderr.contains("NOTICE"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes in a pipe: {stderr}");
}

/// A [`ServeConfig`] for `url` and `slot`, listening on `listen`.
fn serve_config(url: &str, slot: &str, listen: SocketAddr) -> ServeConfig {
    let source = SourceConfig::new(PgConfig::from_str(url).unwrap(), SlotOptions::new(slot, "supabase_realtime"));
    let auth = AuthConfig { jwt_secret: Some(SECRET.into()), jwks: None, audience: None };
    let mut config = ServeConfig::new(RelayConfig::new(source), auth);
    config.listen = listen;
    config
}

async fn slot_exists(client: &Client, slot: &str) -> bool {
    client
        .query_one("select exists (select 1 from pg_replication_slots where slot_name = $1)", &[&slot])
        .await
        .unwrap()
        .get(0)
}

/// Watches `slot` every 5 ms until dropped; whether it was ever seen.
fn watch_slot(client: Arc<Client>, slot: String) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            if slot_exists(&client, &slot).await {
                flag.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_drops_the_slot_it_created_and_never_an_existing_one() {
    let (db, client) = migrated_db().await;
    let client = Arc::new(client);
    // The port is taken: the start fails at its last step, after the relay
    // created the slot and streamed from it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap();

    let slot = format!("fs_{}", Uuid::new_v4().simple());
    let (seen, watcher) = watch_slot(Arc::clone(&client), slot.clone());
    let err = Server::start(serve_config(db.url(), &slot, listen)).await.unwrap_err().to_string();
    watcher.abort();
    assert!(err.contains("cannot listen"), "{err}");
    assert!(seen.load(Ordering::Relaxed), "the start got as far as creating the slot");
    assert!(!slot_exists(&client, &slot).await, "the slot this start created is dropped");

    // A slot that was there before the start stays, at its position.
    let kept = format!("fs_{}", Uuid::new_v4().simple());
    client.execute("select pg_create_logical_replication_slot($1, 'pgoutput')", &[&kept]).await.unwrap();
    let err = Server::start(serve_config(db.url(), &kept, listen)).await.unwrap_err().to_string();
    assert!(err.contains("cannot listen"), "{err}");
    assert!(slot_exists(&client, &kept).await, "an existing slot is never dropped");
    client.execute("select pg_drop_replication_slot($1)", &[&kept]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_bypassrls_fails_before_any_slot_exists() {
    let (db, client) = migrated_db().await;
    let client = Arc::new(client);
    let role = format!("walcast_nb_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let password = "first-start-pw";
    client
        .batch_execute(&format!(
            "create role {role} with login replication password '{password}'; \
             grant select on public.dealer_memberships to {role};"
        ))
        .await
        .unwrap();
    let url = format!("postgres://{role}:{password}@{}", db.url().split_once('@').expect("user@host").1);
    let slot = format!("fs_{}", Uuid::new_v4().simple());
    let (seen, watcher) = watch_slot(Arc::clone(&client), slot.clone());
    let err = Server::start(serve_config(&url, &slot, SocketAddr::from(([127, 0, 0, 1], 0)))).await.unwrap_err();
    watcher.abort();
    let err = err.to_string();
    for needle in ["row-level security", "dealer_memberships", "BYPASSRLS"] {
        assert!(err.contains(needle), "{needle:?}: {err}");
    }
    assert!(!err.contains(password), "{err}");
    assert!(!seen.load(Ordering::Relaxed), "the check ran before the slot was created");
    let _ = client.batch_execute(&format!("drop owned by {role}; drop role {role}")).await;
}

#[tokio::test]
async fn start_up_errors_name_the_failed_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _client) = empty_db().await;
    // Migrating a fresh database: quiet (no NOTICE for what `if exists` skips), no colours.
    let (out, text) = output(walcast(dir.path(), &["migrate", "--database-url", db.url()], &[])).await;
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("NOTICE") && !text.contains('\u{1b}'), "{text}");

    // A role the server refuses; the password never shows.
    let host = db.url().split_once('@').expect("user@host").1;
    let url = format!("postgres://walcast_nobody:hunter2-pw@{host}");
    let target = walcast::pgconn::target(&PgConfig::from_str(&url).unwrap());
    let args = ["serve", "--database-url", &url, "--jwt-secret", SECRET, "--port", "0"];
    let (out, text) = output(walcast(dir.path(), &args, &[])).await;
    assert!(!out.status.success(), "{text}");
    let last = text.lines().rfind(|l| l.starts_with("walcast: ")).unwrap_or_else(|| panic!("{text}"));
    let expected = format!("walcast: connecting to PostgreSQL at {target} as walcast_nobody failed: ");
    assert!(last.starts_with(&expected), "{last}");
    let cause = &last[expected.len()..];
    assert!(!cause.is_empty() && !cause.contains("db error"), "{last}");
    assert_eq!(last.matches(cause).count(), 1, "{last}");
    assert!(!text.contains("hunter2-pw") && !text.contains(SECRET), "{text}");

    // Nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("postgres://walcast:hunter2-pw@127.0.0.1:{port}/postgres");
    let args = ["serve", "--database-url", &url, "--jwt-secret", SECRET, "--port", "0"];
    let (out, text) = output(walcast(dir.path(), &args, &[])).await;
    assert!(!out.status.success(), "{text}");
    let last = text.lines().rfind(|l| l.starts_with("walcast: ")).unwrap_or_else(|| panic!("{text}"));
    assert!(
        last.starts_with(&format!("walcast: connecting to PostgreSQL at 127.0.0.1:{port} as walcast failed: ")),
        "{last}"
    );
    assert_eq!(last.matches("refused").count(), 1, "{last}");
    assert!(!text.contains("hunter2-pw"), "{text}");
}
