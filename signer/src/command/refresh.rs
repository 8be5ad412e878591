//! `fleet-sign refresh`: keep the current release fresh with the freshness key alone.
//!
//! For each channel: read the release, verify it with the release keys (its own expiry does not
//! count: the statement replaces it), and publish a new freshness statement for exactly that
//! release unless the one there is still valid for more than half the lifetime asked for. Run it
//! from cron or CI as often as you like: an unchanged channel is left alone.

use super::{now, rfc3339};
use crate::channel::{Channel, Published};
use crate::config::Loaded;
use anyhow::{Context as _, Result};
use fleet_agent::release::{
    self, verify_freshness, Fresh, SecretKey, Statement, TrustPolicy, VerifiedRelease,
    VerifyContext,
};
use fleet_agent::release::{FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE};
use std::path::PathBuf;

/// Renew the freshness statement of the release in each channel (cron- and CI-friendly).
#[derive(clap::Args)]
pub struct Args {
    /// A channel to refresh (a directory or git+<url>[#<ref>]); repeat for several (default:
    /// channels from the config).
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// The secret freshness key (default: [freshness] key from the config).
    #[arg(long = "freshness-key")]
    freshness_key: Option<PathBuf>,
    /// How long the new statement stays valid, e.g. 7d (default: [freshness] expires, else 7d;
    /// at most 31d).
    #[arg(long)]
    expires: Option<String>,
    /// The fleet the release must be for (default: from the config, else the release's own).
    #[arg(long)]
    fleet: Option<String>,
    /// Publish a new statement even when the current one is still young.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    trust: TrustArgs,
    /// Config file (default: ./fleet.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The release keys hosts trust (to check the release before vouching for it).
#[derive(clap::Args)]
struct TrustArgs {
    /// A public release key hosts trust; repeat for several (default: trusted_keys from the
    /// config, else the public halves of its keys).
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<String>,
    /// How many trusted keys hosts require (default: from the config, else 1).
    #[arg(long)]
    threshold: Option<usize>,
}

/// A signed statement for `verified`, valid from `now` for `lifetime` seconds: the statement's
/// bytes and its signature file.
pub fn sign_statement(
    verified: &VerifiedRelease,
    key: &SecretKey,
    now: u64,
    lifetime: u64,
) -> (Vec<u8>, Vec<u8>) {
    Statement::for_release(verified, now, lifetime).sign(&[key])
}

/// What refreshing one channel did.
#[derive(serde::Serialize)]
struct Refreshed {
    channel: String,
    serial: u64,
    /// Whether a new statement was published.
    refreshed: bool,
    fresh_until: u64,
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.config.as_deref())?;
    let key = match &args.freshness_key {
        Some(path) => crate::keyfile::read_secret(path)?,
        None => config.freshness_key()?.ok_or_else(|| {
            crate::usage(
                "no freshness key: give --freshness-key or set [freshness] key in fleet.toml \
                 (make one with fleet-sign keygen)",
            )
        })?,
    };
    let lifetime = config.freshness_lifetime(args.expires.as_deref())?;
    let trust =
        super::verify::trust_policy(&args.trust.trusted_keys, args.trust.threshold, &config)?;
    if trust.keys().contains(&key.public()) {
        return Err(crate::usage(format!(
            "freshness key '{}' is a release key: the freshness role needs a key of its own",
            key.name()
        )));
    }
    let own = TrustPolicy::new(vec![key.public()], 1).map_err(crate::usage)?;
    let channels = config.channels(&args.channels)?;
    let mut results = Vec::new();
    for channel in &channels {
        let job = Job {
            fleet: args.fleet.clone().or(config.raw.fleet.clone()),
            trust: &trust,
            own: &own,
            key: &key,
            lifetime,
            force: args.force,
        };
        let result = job
            .run(channel)
            .with_context(|| format!("could not refresh {channel}"))?;
        if !args.json {
            let verb = if result.refreshed {
                "refreshed"
            } else {
                "still fresh, left alone:"
            };
            println!(
                "{channel}: release {} {verb} fresh until {}",
                result.serial,
                rfc3339(result.fresh_until)
            );
        }
        results.push(result);
    }
    if args.json {
        let out = serde_json::json!({"ok": true, "channels": results});
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// Refreshing one channel: what it is checked against and signed with.
struct Job<'a> {
    fleet: Option<String>,
    trust: &'a TrustPolicy,
    own: &'a TrustPolicy,
    key: &'a SecretKey,
    lifetime: u64,
    force: bool,
}

impl Job<'_> {
    fn run(&self, channel: &Channel) -> Result<Refreshed> {
        let Self {
            trust,
            own,
            key,
            lifetime,
            force,
            ..
        } = *self;
        let published = channel
            .read_for_update()?
            .ok_or_else(|| crate::usage(format!("{channel} holds no release to refresh")))?;
        let started = now();
        let verified = release::verify(
            &published.document,
            &published.signatures,
            trust,
            &VerifyContext {
                fleet: self.fleet.clone().unwrap_or_else(|| fleet_of(&published)),
                now: started,
                floor: None,
                own_expiry: false,
            },
        )
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
            "the release in {channel} does not verify: a freshness statement vouches only for a \
             valid release"
        ))
        })?;
        let current: Option<Fresh> =
            verify_freshness(published.freshness(), own, &verified, started).ok();
        if let Some(fresh) =
            current.filter(|f| !force && f.expires.saturating_sub(started) > lifetime / 2)
        {
            return Ok(Refreshed {
                channel: channel.to_string(),
                serial: verified.serial(),
                refreshed: false,
                fresh_until: fresh.expires,
            });
        }
        let (statement, signatures) = sign_statement(&verified, key, started, lifetime);
        let message = format!(
            "fleet {} release {}: fresh until {}\n",
            verified.release().fleet,
            verified.serial(),
            rfc3339(started + lifetime)
        );
        // The statement before its signatures: a reader between the two sees the new
        // statement with the old signatures, an untrusted statement until its next poll.
        channel.update(
            &published.document,
            &[
                (FRESHNESS_FILE, &statement),
                (FRESHNESS_SIGNATURE_FILE, &signatures),
            ],
            &message,
        )?;
        Ok(Refreshed {
            channel: channel.to_string(),
            serial: verified.serial(),
            refreshed: true,
            fresh_until: started + lifetime,
        })
    }
}

/// The fleet a release names, for the verification context when the config names none (the
/// signatures are still checked first).
pub fn fleet_of(published: &Published) -> String {
    serde_json::from_slice::<serde_json::Value>(&published.document)
        .ok()
        .and_then(|v| v.get("fleet")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Args {
    /// Whether the output (errors included) is JSON.
    pub fn json(&self) -> bool {
        self.json
    }
}
