//! `fleet-sign verify`: check a published release as a host would, and show what it holds.

use super::{now, rfc3339};
use crate::channel::Channel;
use crate::config::Loaded;
use crate::keyfile;
use anyhow::{Context as _, Result};
use fleet_agent::release::{self, PublicKey, TrustPolicy, VerifiedRelease, VerifyContext};
use std::path::PathBuf;

/// Check a published release against trusted keys and show what it holds.
#[derive(clap::Args)]
pub struct Args {
    /// The channel: a directory, an http(s) base URL or git+<url>[#<ref>].
    #[arg(long)]
    from: String,
    /// A trusted public key, inline ('name:base64') or a file; repeat for several.
    /// Default: trusted_keys (or the public halves of keys) from the config file.
    #[arg(long = "key")]
    keys: Vec<String>,
    /// How many of the trusted keys must have signed (default: from the config, else 1).
    #[arg(long)]
    threshold: Option<usize>,
    /// The fleet the release must be for (default: from the config, else the release's own).
    #[arg(long)]
    fleet: Option<String>,
    /// Also require an entry for this host.
    #[arg(long)]
    host: Option<String>,
    /// Refuse a release below this serial (`serial_too_low`), as a host that accepted it would:
    /// a channel replaying an old release shows from the workstation too.
    #[arg(long)]
    min_serial: Option<u64>,
    /// Config file (default: ./fleet.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The trust policy from flags, else from the config file.
pub fn trust_policy(
    keys: &[String],
    threshold: Option<usize>,
    config: &Loaded,
) -> Result<TrustPolicy> {
    let mut public: Vec<PublicKey> = keys
        .iter()
        .map(|k| keyfile::read_public(k))
        .collect::<Result<_>>()?;
    if public.is_empty() {
        public = config
            .raw
            .trusted_keys
            .iter()
            .map(|k| keyfile::read_public(k))
            .collect::<Result<_>>()?;
    }
    if public.is_empty() {
        for path in &config.raw.keys {
            public.push(keyfile::read_secret(&config.resolve(path))?.public());
        }
    }
    if public.is_empty() {
        return Err(crate::usage(
            "no trusted keys: give --key (or trusted_keys in fleet.toml)",
        ));
    }
    let threshold = threshold.or(config.raw.threshold).unwrap_or(1);
    TrustPolicy::new(public, threshold).map_err(crate::usage)
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.config.as_deref())?;
    let trust = trust_policy(&args.keys, args.threshold, &config)?;
    let channel = crate::config::parse_channel(&args.from)?;
    let published = channel
        .read()
        .with_context(|| format!("could not read the release from {channel}"))?
        .ok_or_else(|| crate::usage(format!("{channel} holds no release")))?;
    let fleet = match args.fleet.or(config.raw.fleet.clone()) {
        Some(fleet) => fleet,
        // Only for naming the fleet in the context: the signatures are still checked first.
        None => serde_json::from_slice::<serde_json::Value>(&published.document)
            .ok()
            .and_then(|v| v.get("fleet")?.as_str().map(str::to_owned))
            .unwrap_or_default(),
    };
    let context = VerifyContext {
        fleet,
        now: now(),
        floor: None,
    };
    let result = release::verify(&published.document, &published.signatures, &trust, &context)
        .and_then(|verified| match &args.host {
            Some(host) => verified.host(host).map(|_| verified.clone()),
            None => Ok(verified),
        })
        .and_then(|verified| match args.min_serial {
            Some(min) if verified.serial() < min => Err(release::VerifyError::SerialTooLow {
                serial: verified.serial(),
                accepted: min,
            }),
            _ => Ok(verified),
        });
    match result {
        Ok(verified) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&to_json(&verified))?);
            } else {
                print_text(&channel, &verified);
            }
            Ok(())
        }
        // With --json, main prints the error as JSON with its reason code.
        Err(error) => {
            Err(anyhow::Error::new(error).context(format!("release in {channel} is refused")))
        }
    }
}

fn to_json(verified: &VerifiedRelease) -> serde_json::Value {
    serde_json::json!({
        "ok": true,
        "digest": verified.digest().to_string(),
        "signed_by": verified.signed_by(),
        "release": verified.release(),
    })
}

fn print_text(channel: &Channel, verified: &VerifiedRelease) {
    let r = verified.release();
    println!(
        "release {} of fleet '{}' from {channel}: valid",
        r.serial, r.fleet
    );
    println!("  signed by   {}", verified.signed_by().join(", "));
    println!("  issued      {}", rfc3339(r.issued_at));
    println!("  expires     {}", rfc3339(r.expires));
    let commit = r.source.commit.as_deref().unwrap_or("(uncommitted tree)");
    println!("  source      {} at {commit}", r.source.repo);
    println!("  digest      sha256:{}", verified.digest());
    for url in &r.substituters {
        println!("  substituter {url}");
    }
    println!("  hosts       {}", r.hosts.len());
    for (name, entry) in &r.hosts {
        let wave = entry.wave.map(|w| format!(" wave {w}")).unwrap_or_default();
        println!("    {name:<20} {}{wave}", entry.toplevel);
    }
}

impl Args {
    /// Whether the output (errors included) is JSON.
    pub fn json(&self) -> bool {
        self.json
    }
}
