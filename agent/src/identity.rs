//! The host's own key: it signs the reports this host sends to the collector.
//!
//! `identity.key` in the state directory, in Nix's secret key format and named after the host,
//! created with mode 0600 the first time the agent starts (or `fleet-agent identity` runs). The
//! operator lists its public half as the host's `report_key` in `fleet.toml`; `fleet-sign
//! release` puts it into the signed release, where the collector looks it up.

use crate::release::{PublicKey, SecretKey};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The key file's name in the state directory.
pub const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("host key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("host key {path} is not a secret key in Nix's format: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "host key {path} is readable by group or others (mode {mode:o}): fix it with chmod 600 \
         and consider the key leaked"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("cannot make a host key: no randomness from the operating system: {0}")]
    Random(String),
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(IDENTITY_FILE)
}

/// Reads the host key, making one named `host` when there is none yet.
pub fn load_or_create(state_dir: &Path, host: &str) -> Result<SecretKey, IdentityError> {
    let path = path(state_dir);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::metadata(&path) {
        Ok(metadata) => {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::Exposed { path, mode });
            }
            let text = std::fs::read_to_string(&path).map_err(io)?;
            SecretKey::parse(&text).map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                detail: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(state_dir, &path, host),
        Err(e) => Err(io(e)),
    }
}

fn create(state_dir: &Path, path: &Path, host: &str) -> Result<SecretKey, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
    let key = SecretKey::from_seed(host, seed).map_err(|e| IdentityError::Invalid {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    std::fs::create_dir_all(state_dir).map_err(io)?;
    // Written whole under a temporary name, then linked into place: two agents starting at once
    // cannot both win, and a crash never leaves half a key behind.
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    let written = file
        .write_all(format!("{}\n", key.to_nix_string()).as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    match written {
        Ok(()) => {
            let _ = std::fs::File::open(state_dir).and_then(|d| d.sync_all());
            log::info!(
                "made this host's report key {}: list it as report_key of host '{host}' in \
                 fleet.toml",
                key.public()
            );
            Ok(key)
        }
        // Someone else made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(state_dir, host),
        Err(e) => Err(io(e)),
    }
}

/// The public half, as `fleet-agent identity` prints it.
pub fn public(state_dir: &Path, host: &str) -> Result<PublicKey, IdentityError> {
    load_or_create(state_dir, host).map(|key| key.public())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_made_once_private_and_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path(), "router1").unwrap();
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(first.name(), "router1");
        let again = load_or_create(dir.path(), "router1").unwrap();
        assert_eq!(first.public(), again.public());
    }

    #[test]
    fn refuses_a_key_others_can_read_or_that_does_not_parse() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), "h").unwrap();
        let file = path(dir.path());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(dir.path(), "h"),
            Err(IdentityError::Exposed { mode: 0o644, .. })
        ));
        std::fs::write(&file, "h:bm90IGEga2V5").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(dir.path(), "h"),
            Err(IdentityError::Invalid { .. })
        ));
    }
}
