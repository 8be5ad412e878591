//! One module per subcommand.

pub mod collect;
pub mod keygen;
pub mod refresh;
pub mod release;
pub mod rollout;
pub mod sign;
pub mod status;
pub mod verify;

use crate::config::Loaded;
use anyhow::Result;
use fleet_agent::release::{SecretKey, TrustPolicy};
use std::path::PathBuf;

/// The keys a signing command signs with, and the trust hosts apply: shared by `release` and
/// `sign`.
#[derive(clap::Args, Clone)]
pub struct SigningArgs {
    /// A secret release key to sign with; repeat for several (default: keys from the config).
    #[arg(long = "key")]
    keys: Vec<PathBuf>,
    /// A public key hosts trust; repeat for several (default: trusted_keys from the config,
    /// else the public halves of the signing keys).
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// How many trusted keys hosts require (default: from the config, else 1).
    #[arg(long)]
    threshold: Option<usize>,
}

impl SigningArgs {
    /// The signing keys, and the trust policy hosts apply.
    pub fn resolve(&self, config: &Loaded) -> Result<(Vec<SecretKey>, TrustPolicy)> {
        let keys = config.signing_keys(&self.keys)?;
        let mut trusted = self.trusted_keys.clone();
        if trusted.is_empty() && config.raw.trusted_keys.is_empty() {
            trusted = keys.iter().map(|k| k.public().to_string()).collect();
        }
        let trust = verify::trust_policy(&trusted, self.threshold, config)?;
        Ok((keys, trust))
    }
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn rfc3339(unix: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The current time in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
