//! Finding the PostgreSQL server binaries on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding `initdb`, `pg_ctl` and `postgres`, searched in order:
/// `PG_BINDIR`, `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`,
/// then `PATH`. `None` when none of them has the three programs, or when
/// `WALCAST_PG_SEARCH=off` (which simulates a machine without PostgreSQL, for
/// testing the fetch).
pub fn find_bindir() -> Option<PathBuf> {
    if std::env::var("WALCAST_PG_SEARCH").is_ok_and(|v| v == "off") {
        return None;
    }
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        let dir = PathBuf::from(dir);
        return is_bindir(&dir).then_some(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if is_bindir(&dir) {
                return Some(dir);
            }
        }
    }
    if let Some(dir) = newest_debian_bindir(Path::new("/usr/lib/postgresql")) {
        return Some(dir);
    }
    std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).find(|dir| is_bindir(dir)))
}

fn is_bindir(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|p| dir.join(p).is_file())
}

/// `/usr/lib/postgresql/<major>/bin` with the highest major version.
fn newest_debian_bindir(base: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(base)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            is_bindir(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

/// Whether the server's library directory next to `bindir` has `name.so`.
pub(super) fn has_library(bindir: &Path, name: &str) -> bool {
    let file = format!("{name}.so");
    let Some(prefix) = bindir.parent() else {
        return false;
    };
    [prefix.join("lib").join(&file), prefix.join("lib/postgresql").join(&file)].iter().any(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_debian_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["9", "15", "13"] {
            let bin = dir.path().join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for p in ["initdb", "pg_ctl", "postgres"] {
                std::fs::write(bin.join(p), b"").unwrap();
            }
        }
        // An incomplete newer install is skipped.
        std::fs::create_dir_all(dir.path().join("16/bin")).unwrap();
        assert_eq!(newest_debian_bindir(dir.path()), Some(dir.path().join("15/bin")));
    }
}
