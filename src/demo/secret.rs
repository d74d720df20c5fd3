//! The demo's JWT secret: generated once, kept in `<data_dir>/jwt-secret`.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::DemoError;

/// Name of the secret file inside the data directory.
pub const SECRET_FILE: &str = "jwt-secret";

/// Random bytes in a new secret (written as twice as many hex digits).
const SECRET_BYTES: usize = 32;

/// The JWT secret kept in `dir` (created when missing): 64 lower-case hex
/// digits from 32 bytes of `/dev/urandom`.
///
/// A new secret is written to a temporary file with mode 0600 and renamed into
/// place, so a crash never leaves a partial secret. An existing file must hold
/// at least 32 hex digits (surrounding whitespace is ignored); if group or
/// others may read it, it is tightened to 0600.
///
/// # Errors
/// When the directory or file cannot be created, read or written, or the file
/// holds something else ([`DemoError::BadSecret`]: delete it to start over).
pub fn load_or_create_secret(dir: &Path) -> Result<String, DemoError> {
    let path = dir.join(SECRET_FILE);
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| DemoError::SecretIo { what, path, source }
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let secret = text.trim();
            if secret.len() < 2 * SECRET_BYTES || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DemoError::BadSecret(path));
            }
            let mode = fs::metadata(&path).map_err(io("reading the permissions of"))?.permissions().mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io("restricting"))?;
                tracing::warn!(path = %path.display(), "the JWT secret file was readable by others; now 0600");
            }
            Ok(secret.to_owned())
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
            let mut bytes = [0u8; SECRET_BYTES];
            fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(io("generating"))?;
            let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let temp = dir.join(format!(".{SECRET_FILE}.{}", std::process::id()));
            let written = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)
                .and_then(|mut f| {
                    // `mode` applies only to a new file: make sure of it.
                    f.set_permissions(fs::Permissions::from_mode(0o600))?;
                    f.write_all(secret.as_bytes())?;
                    f.write_all(b"\n")?;
                    f.sync_all()
                })
                .and_then(|()| fs::rename(&temp, &path));
            if let Err(source) = written {
                let _ = fs::remove_file(&temp);
                return Err(DemoError::SecretIo { what: "writing", path, source });
            }
            tracing::info!(path = %path.display(), "generated a new JWT secret");
            Ok(secret)
        }
        Err(source) => Err(DemoError::SecretIo { what: "reading", path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_with_mode_0600_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("nested");
        let first = load_or_create_secret(&sub).unwrap();
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        let mode = fs::metadata(sub.join(SECRET_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&sub).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_secret(other.path()).unwrap(), first);
    }

    #[test]
    fn loose_permissions_are_tightened_and_junk_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRET_FILE);
        fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), "ab".repeat(32));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, "short").unwrap();
        assert!(matches!(load_or_create_secret(dir.path()), Err(DemoError::BadSecret(_))));
    }
}
