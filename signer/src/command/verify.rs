//! `fleet-sign verify`: check a published release as a host would, and show what it holds.

use super::{now, rfc3339};
use crate::channel::Channel;
use crate::config::Loaded;
use crate::keyfile;
use anyhow::{Context as _, Result};
use fleet_agent::release::{self, Fresh, PublicKey, TrustPolicy, VerifiedRelease, VerifyContext};
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
    /// A freshness key hosts trust, inline ('name:base64') or a file; repeat for several.
    /// Default: [freshness] keys from the config. With one, the release also needs a valid
    /// freshness statement for exactly it, and its own expiry no longer counts.
    #[arg(long = "freshness-key")]
    freshness_keys: Vec<String>,
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

/// The freshness keys hosts trust, from flags, else from the config; `None`: none.
pub fn freshness_policy(keys: &[String], config: &Loaded) -> Result<Option<TrustPolicy>> {
    if keys.is_empty() {
        return config.freshness_policy();
    }
    let keys = keys
        .iter()
        .map(|k| keyfile::read_public(k))
        .collect::<Result<_>>()?;
    Ok(Some(TrustPolicy::new(keys, 1).map_err(crate::usage)?))
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.config.as_deref())?;
    let trust = trust_policy(&args.keys, args.threshold, &config)?;
    let channel = crate::config::parse_channel(&args.from)?;
    let freshness = freshness_policy(&args.freshness_keys, &config)?;
    let published = match freshness {
        Some(_) => channel.read_with_freshness(),
        None => channel.read(),
    }
    .with_context(|| format!("could not read the release from {channel}"))?
    .ok_or_else(|| crate::usage(format!("{channel} holds no release")))?;
    let fleet = match args.fleet.or(config.raw.fleet.clone()) {
        Some(fleet) => fleet,
        // Only for naming the fleet in the context: the signatures are still checked first.
        None => super::refresh::fleet_of(&published),
    };
    let now = now();
    let context = VerifyContext {
        fleet,
        now,
        floor: None,
        own_expiry: freshness.is_none(),
    };
    let mut fresh = None;
    let result = published
        .verify(&trust, &context)
        .and_then(|verified| match &freshness {
            Some(keys) => {
                fresh = Some(release::verify_freshness(
                    published.freshness(),
                    keys,
                    &verified,
                    now,
                )?);
                Ok(verified)
            }
            None => Ok(verified),
        })
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
                println!(
                    "{}",
                    serde_json::to_string_pretty(&to_json(&verified, fresh))?
                );
            } else {
                print_text(&channel, &verified, fresh);
            }
            Ok(())
        }
        // With --json, main prints the error as JSON with its reason code.
        Err(error) => {
            Err(anyhow::Error::new(error).context(format!("release in {channel} is refused")))
        }
    }
}

fn to_json(verified: &VerifiedRelease, fresh: Option<Fresh>) -> serde_json::Value {
    serde_json::json!({
        "ok": true,
        "digest": verified.digest().to_string(),
        "signed_by": verified.signed_by(),
        "fresh_until": fresh.map(|f| f.expires),
        "release": verified.release(),
    })
}

fn print_text(channel: &Channel, verified: &VerifiedRelease, fresh: Option<Fresh>) {
    let r = verified.release();
    println!(
        "release {} of fleet '{}' from {channel}: valid",
        r.serial, r.fleet
    );
    println!("  signed by   {}", verified.signed_by().join(", "));
    println!("  issued      {}", rfc3339(r.issued_at));
    match fresh {
        Some(fresh) => println!(
            "  fresh until {} (freshness statement; the release's own expiry {} does not count)",
            rfc3339(fresh.expires),
            rfc3339(r.expires)
        ),
        None => println!("  expires     {}", rfc3339(r.expires)),
    }
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
