//! `fleet-sign keygen`: make a release key in Nix's `name:base64` format.

use anyhow::{Context as _, Result};
use fleet_agent::release::SecretKey;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;

/// Create a release signing key: the secret goes to a file of mode 0600, the public key to
/// stdout and to <FILE>.pub.
#[derive(clap::Args)]
pub struct Args {
    /// The key's name, e.g. ops-2026 (letters, digits, '.-_+').
    name: String,
    /// Where to write the secret key.
    #[arg(long, short)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow::anyhow!("could not get randomness from the OS: {e}"))?;
    let key = SecretKey::from_seed(&args.name, seed).map_err(|e| crate::usage(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.out)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                crate::usage(format!(
                    "{} already exists: refusing to overwrite a key (remove it first if you \
                     mean to)",
                    args.out.display()
                ))
            } else {
                anyhow::Error::new(e).context(format!("could not create {}", args.out.display()))
            }
        })?;
    file.write_all(key.to_nix_string().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("could not write {}", args.out.display()))?;
    let public = key.public().to_string();
    let mut public_path = args.out.clone().into_os_string();
    public_path.push(".pub");
    std::fs::write(&public_path, &public)
        .with_context(|| format!("could not write {}", PathBuf::from(&public_path).display()))?;
    println!("{public}");
    Ok(())
}
