//! Reading key files: secret keys must not be readable by anyone but their owner.

use anyhow::{Context as _, Result};
use fleet_agent::release::{PublicKey, SecretKey};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Reads a secret key in Nix's format, refusing a file that group or others can read.
pub fn read_secret(path: &Path) -> Result<SecretKey> {
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("could not read secret key {}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(crate::usage(format!(
            "secret key {} is readable by group or others (mode {mode:o}): refusing to use it \
             (run chmod 600 {} and consider the key leaked if others could read it)",
            path.display(),
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read secret key {}", path.display()))?;
    SecretKey::parse(&text).map_err(|e| crate::usage(format!("secret key {}: {e}", path.display())))
}

/// Reads a public key given inline (`name:base64`) or as a file holding one.
pub fn read_public(text_or_path: &str) -> Result<PublicKey> {
    if let Ok(key) = PublicKey::parse(text_or_path) {
        return Ok(key);
    }
    let path = Path::new(text_or_path);
    if !path.exists() {
        return Err(crate::usage(format!(
            "'{text_or_path}' is neither a public key ('<name>:<base64>') nor a file"
        )));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read public key {}", path.display()))?;
    PublicKey::parse(&text).map_err(|e| crate::usage(format!("public key {}: {e}", path.display())))
}
