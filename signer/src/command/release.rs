//! `fleet-sign release`: build every chosen host, push closures to the cache, sign, publish.
//!
//! Steps, each refusing with a reason before anything is published:
//! 1. read the release each channel holds now and verify it with the trusted keys (its entries
//!    are carried over for hosts not rebuilt, so a tampered channel must not leak into a new
//!    signature);
//! 2. list the flake's `nixosConfigurations`, resolve `--on` (names and `@group`s);
//! 3. build each chosen host's `config.system.build.toplevel` from the locked flake;
//! 4. `nix copy` the closures to the cache (signed with the cache key) and check that the whole
//!    closure is there, signed;
//! 5. write the document with the next serial, sign it with every key, verify it as a host
//!    would, and publish it to every channel.

use super::{now, rfc3339, SigningArgs};
use crate::channel::{Channel, Published};
use crate::config::{Loaded, RawHost, RawRollout};
use crate::progress::{human_size, NixProgress};
use crate::record::Record;
use crate::{keyfile, nix};
use anyhow::{bail, Context as _, Result};
use fleet_agent::release::{
    self, Accepted, HostEntry, PublicKey, Release, Rollout, SecretKey, SignatureFile, Source,
    StorePath, TrustPolicy, VerifyContext, FORMAT_TREE, FORMAT_VERSION,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// The longest a release may stay valid: longer would let a frozen channel go unnoticed.
const MAX_VALIDITY: Duration = Duration::from_secs(366 * 24 * 3600);
const DEFAULT_VALIDITY: &str = "30d";

/// Build the chosen hosts, push their closures to the cache, sign and publish a release.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// Hosts to build: comma-separated names and @groups (default: every host in the flake).
    /// Hosts not named keep their entry from the current release.
    #[arg(long, value_delimiter = ',')]
    on: Vec<String>,
    /// Release systems built beforehand (by CI, Hydra, nix-fast-build) instead of building:
    /// HOST=/nix/store/…-nixos-system-…, comma-separated or repeated. Only these hosts change;
    /// each closure is copied to the cache when it is in the local store, and must be in the
    /// cache, signed by the cache key, in any case.
    #[arg(long, value_delimiter = ',', conflicts_with = "on")]
    paths: Vec<String>,
    /// Like --paths, from a JSON file: {"HOST": "/nix/store/…", …}.
    #[arg(long, conflicts_with_all = ["on", "paths"])]
    paths_from: Option<PathBuf>,
    /// The flake holding nixosConfigurations (default: from the config, else ".").
    #[arg(long)]
    flake: Option<String>,
    /// The fleet name the release is for (default: from the config).
    #[arg(long)]
    fleet: Option<String>,
    #[command(flatten)]
    signing: SigningArgs,
    /// The binary cache to copy closures to (anything `nix copy --to` takes).
    #[arg(long)]
    cache: Option<String>,
    /// The secret key the cache signs closures with.
    #[arg(long)]
    cache_key: Option<PathBuf>,
    /// A substituter URL to list in the release as a hint to hosts; repeat for several.
    #[arg(long = "substituter")]
    substituters: Vec<String>,
    /// A channel to publish to (a directory or git+<url>[#<ref>]); repeat for several.
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// The serial to use; must be above every channel's current serial (default: next).
    #[arg(long)]
    serial: Option<u64>,
    /// How long the release stays valid, e.g. 30d, 12h (default 30d, at most 366d).
    #[arg(long)]
    expires: Option<String>,
    /// The hosts built (or given) in this release wait until then before they move: an RFC
    /// 3339 time (2026-12-01T03:00:00Z) or a delay from now (+2h). With --on, a maintenance
    /// window for some hosts or groups.
    #[arg(long)]
    not_before: Option<String>,
    /// Roll the new systems out in waves (`wave` of each host in fleet.toml; hosts without one
    /// go last): wave 0 moves with this release, the others keep their system (the new one
    /// waits in their entry) until `fleet-sign promote` moves the next wave.
    #[arg(long)]
    pub rollout: bool,
    /// Put the hosts without a `wave` in fleet.toml into waves by share, with a stable hash of
    /// fleet and host name: `--waves 5,25` puts about 5 % in wave 0, 25 % in wave 1 and the
    /// rest in wave 2 (the same hosts every time).
    #[arg(long, value_delimiter = ',')]
    waves: Vec<u32>,
    /// Release from a flake with uncommitted changes (the release then names no commit).
    #[arg(long)]
    allow_dirty: bool,
    /// Publish with fewer signatures than hosts need: the other key holders add theirs with
    /// `fleet-sign sign`, and hosts take the release once it reaches their threshold.
    #[arg(long)]
    cosign: bool,
    /// The release format: 1, every host's entry in the document (what every agent reads), or
    /// 2, a small signed root with a Merkle tree and one file per host, so a host's cost does
    /// not grow with the fleet (agents from this version on). Default: `format` from the config,
    /// else 1.
    #[arg(long)]
    format: Option<u32>,
    /// The secret freshness key: a freshness statement for the new release is published with
    /// it (default: [freshness] key from the config).
    #[arg(long)]
    freshness_key: Option<PathBuf>,
    /// Config file (default: ./fleet.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Everything the release needs, from flags over the config file.
struct Settings {
    fleet: String,
    flake: String,
    keys: Vec<SecretKey>,
    trust: TrustPolicy,
    /// What the new release is checked against before publishing: `trust`, with the threshold
    /// lowered to the signing keys when co-signing.
    self_check: TrustPolicy,
    /// Where closures go; a release needs one, a rollout step builds nothing.
    cache: Option<String>,
    cache_key: Option<(PathBuf, PublicKey)>,
    substituters: Vec<String>,
    channels: Vec<Channel>,
    validity: Duration,
    groups: BTreeMap<String, Vec<String>>,
    hosts: BTreeMap<String, RawHost>,
    rollout: RawRollout,
    freshness: Freshness,
    /// 1 (every entry in the document) or 2 (a Merkle root; a file per host).
    format: u32,
}

/// What the release does about freshness statements.
enum Freshness {
    /// The fleet uses none.
    Unused,
    /// Sign one with this key and lifetime, published with the release.
    Sign(Box<SecretKey>, u64),
    /// Hosts need one, but the key is elsewhere (a CI job's `fleet-sign refresh`).
    Elsewhere,
}

fn settings(args: &Args, config: Loaded) -> Result<Settings> {
    let fleet = args
        .fleet
        .clone()
        .or(config.raw.fleet.clone())
        .ok_or_else(|| crate::usage("no fleet name: give --fleet or set fleet in fleet.toml"))?;
    if !release::is_valid_name(&fleet) {
        return Err(crate::usage(format!("fleet name '{fleet}' is invalid")));
    }
    let flake = config.flake(args.flake.as_deref())?;
    let (keys, trust) = args.signing.resolve(&config)?;
    let signing_trusted = keys
        .iter()
        .filter(|k| trust.keys().contains(&k.public()))
        .count();
    if signing_trusted == 0 || (signing_trusted < trust.threshold() && !args.cosign) {
        return Err(crate::usage(format!(
            "hosts need {} signatures from trusted keys but only {signing_trusted} of the \
             signing keys are trusted: add --key for more keys, or publish with --cosign and \
             have the other key holders run fleet-sign sign",
            trust.threshold()
        )));
    }
    let self_check = TrustPolicy::new(
        trust.keys().to_vec(),
        trust.threshold().min(signing_trusted),
    )
    .map_err(crate::usage)?;
    let channels = config.channels(&args.channels)?;
    // A cache channel is the cache too when none is named: one URL for both.
    let mut cache_channels = channels.iter().filter_map(Channel::cache_store);
    let cache_channel = match (cache_channels.next(), cache_channels.next()) {
        (Some(store), None) => Some(store.to_owned()),
        _ => None,
    };
    let cache = args
        .cache
        .clone()
        .or(config.raw.cache.clone())
        .or(cache_channel);
    let cache_key_path =
        args.cache_key
            .clone()
            .or(config.raw.cache_key.as_ref().map(|p| config.resolve(p)));
    let cache_key = match cache_key_path {
        Some(path) => {
            let public = keyfile::read_secret(&path)?.public();
            Some((path, public))
        }
        None => None,
    };
    let expires = args
        .expires
        .clone()
        .or(config.raw.expires.clone())
        .unwrap_or_else(|| DEFAULT_VALIDITY.into());
    let validity = humantime::parse_duration(&expires)
        .map_err(|e| crate::usage(format!("expiry '{expires}' is not a duration: {e}")))?;
    if validity > MAX_VALIDITY || validity < Duration::from_secs(60) {
        return Err(crate::usage(format!(
            "expiry '{expires}' is outside 1m to 366d: a release valid longer lets a frozen \
             channel go unnoticed (re-sign regularly instead)"
        )));
    }
    let substituters = if args.substituters.is_empty() {
        config.raw.substituters.clone()
    } else {
        args.substituters.clone()
    };
    let freshness_key = match &args.freshness_key {
        Some(path) => Some(keyfile::read_secret(path)?),
        None => config.freshness_key()?,
    };
    let freshness = match (freshness_key, config.freshness_policy()?) {
        (Some(key), _) => {
            if trust.keys().contains(&key.public()) {
                return Err(crate::usage(format!(
                    "freshness key '{}' is a release key: the freshness role needs a key of its \
                     own",
                    key.name()
                )));
            }
            Freshness::Sign(Box::new(key), config.freshness_lifetime(None)?)
        }
        (None, Some(_)) => Freshness::Elsewhere,
        (None, None) => Freshness::Unused,
    };
    let format = args.format.or(config.raw.format).unwrap_or(FORMAT_VERSION);
    if format != FORMAT_VERSION && format != FORMAT_TREE {
        return Err(crate::usage(format!(
            "release format {format} does not exist: 1 (every host's entry in the document) or \
             2 (a Merkle root, one file per host)"
        )));
    }
    Ok(Settings {
        format,
        freshness,
        fleet,
        flake,
        keys,
        trust,
        self_check,
        cache,
        cache_key,
        substituters,
        channels,
        validity,
        groups: config.raw.groups,
        hosts: config.raw.hosts,
        rollout: config.raw.rollout,
    })
}

/// The systems given with `--paths` or `--paths-from`, checked against the flake's hosts; `None`
/// when the hosts are to be built.
fn prebuilt_paths(args: &Args, all_hosts: &Hosts) -> Result<Option<BTreeMap<String, String>>> {
    let pairs: Vec<(String, String)> = if let Some(file) = &args.paths_from {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("could not read {}", file.display()))?;
        let map: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| {
            crate::usage(format!(
                "{} is not a JSON object of host names to store paths: {e}",
                file.display()
            ))
        })?;
        map.into_iter().collect()
    } else if !args.paths.is_empty() {
        args.paths
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(h, p)| (h.trim().to_owned(), p.trim().to_owned()))
                    .ok_or_else(|| {
                        crate::usage(format!("--paths '{pair}' is not HOST=/nix/store/…"))
                    })
            })
            .collect::<Result<_>>()?
    } else {
        return Ok(None);
    };
    let mut given = BTreeMap::new();
    for (host, path) in pairs {
        if !all_hosts.set.contains(host.as_str()) {
            return Err(crate::usage(format!(
                "unknown host '{host}' in --paths: the flake's nixosConfigurations are {}",
                all_hosts.listed()
            )));
        }
        StorePath::parse(&path)
            .map_err(|e| crate::usage(format!("--paths for host '{host}': {e}")))?;
        if given.insert(host.clone(), path).is_some() {
            return Err(crate::usage(format!(
                "host '{host}' is given twice in --paths"
            )));
        }
    }
    if given.is_empty() {
        return Err(crate::usage("--paths-from names no host"));
    }
    Ok(Some(given))
}

/// The flake's hosts, in order and as a set: a fleet can have 100,000, so membership is never a
/// scan of the list.
struct Hosts<'a> {
    list: &'a [String],
    set: BTreeSet<&'a str>,
}

impl<'a> Hosts<'a> {
    fn new(list: &'a [String]) -> Self {
        Self {
            list,
            set: list.iter().map(String::as_str).collect(),
        }
    }

    /// The names for an error message: the first 20, and how many more.
    fn listed(&self) -> String {
        let mut text = self
            .list
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if self.list.len() > 20 {
            text += &format!(" and {} more", self.list.len() - 20);
        }
        text
    }
}

/// Turns selectors (host names, `@group`, `tag:NAME`) into hosts of the flake. The hosts' tags
/// are evaluated once, and only when a `tag:` selector asks.
struct Selectors<'a> {
    all: &'a Hosts<'a>,
    groups: &'a BTreeMap<String, Vec<String>>,
    /// Reads each host's tags (from the flake).
    read_tags: &'a dyn Fn() -> Result<BTreeMap<String, Vec<String>>>,
    tags: std::cell::OnceCell<BTreeMap<String, Vec<String>>>,
}

impl<'a> Selectors<'a> {
    fn new(
        all: &'a Hosts<'a>,
        groups: &'a BTreeMap<String, Vec<String>>,
        read_tags: &'a dyn Fn() -> Result<BTreeMap<String, Vec<String>>>,
    ) -> Self {
        Self {
            all,
            groups,
            read_tags,
            tags: std::cell::OnceCell::new(),
        }
    }

    /// The hosts `item` names; `whence` (`--on`, `[rollout] waves`) is for the errors.
    fn resolve(&self, item: &str, whence: &str) -> Result<Vec<String>> {
        let names: Vec<String> = if let Some(group) = item.strip_prefix('@') {
            self.groups.get(group).cloned().ok_or_else(|| {
                let known: Vec<&str> = self.groups.keys().map(String::as_str).collect();
                crate::usage(format!(
                    "unknown group '@{group}' in {whence} (groups in fleet.toml: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ))
            })?
        } else if let Some(tag) = item.strip_prefix("tag:") {
            if self.tags.get().is_none() {
                let _ = self.tags.set((self.read_tags)()?);
            }
            let tags = self.tags.get().expect("just read");
            let tagged: Vec<String> = tags
                .iter()
                .filter(|(_, tags)| tags.iter().any(|t| t == tag))
                .map(|(host, _)| host.clone())
                .collect();
            if tagged.is_empty() {
                return Err(crate::usage(format!(
                    "no host has the tag '{tag}' named in {whence} (tags are                      services.fleet-agent.tags in each host's configuration)"
                )));
            }
            tagged
        } else {
            vec![item.to_owned()]
        };
        for name in &names {
            if !self.all.set.contains(name.as_str()) {
                return Err(crate::usage(format!(
                    "unknown host '{name}' in {whence}: the flake's nixosConfigurations are {}",
                    self.all.listed()
                )));
            }
        }
        Ok(names)
    }

    /// The hosts of a list of selectors; every host when it is empty.
    fn select(&self, on: &[String], whence: &str) -> Result<Vec<String>> {
        if on.is_empty() {
            return Ok(self.all.list.to_vec());
        }
        let mut chosen = BTreeSet::new();
        for item in on.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            chosen.extend(self.resolve(item, whence)?);
        }
        Ok(chosen.into_iter().collect())
    }
}

/// What the channels hold: the newest verified release, if any, and each channel's serial.
type Current = (Option<(Release, Accepted)>, Vec<(String, Option<u64>)>);

/// The newest verified release among the channels, and the serial each channel holds.
fn current_release(settings: &Settings) -> Result<Current> {
    let mut newest: Option<(Release, Accepted)> = None;
    let mut held = Vec::new();
    for channel in &settings.channels {
        let Some(published) = channel
            .read()
            .with_context(|| format!("could not read the current release from {channel}"))?
        else {
            held.push((channel.to_string(), None));
            continue;
        };
        // Expiry does not matter for a release about to be replaced: check at time 0.
        let context = VerifyContext {
            fleet: settings.fleet.clone(),
            now: 0,
            floor: None,
            own_expiry: false,
        };
        let verified = published
            .verify(&settings.trust, &context)
            .with_context(|| {
                format!(
                "the release now in {channel} does not verify with the trusted keys: refusing to \
                 build on it (inspect it with fleet-sign verify --from {channel}; a --cosign \
                 release still waiting for signatures is finished with fleet-sign sign)"
            )
            })?;
        let accepted = Accepted {
            serial: verified.serial(),
            digest: verified.digest(),
        };
        held.push((channel.to_string(), Some(accepted.serial)));
        if newest
            .as_ref()
            .is_none_or(|(_, a)| a.serial < accepted.serial)
        {
            newest = Some((verified.release().clone(), accepted));
        }
    }
    Ok((newest, held))
}

/// The serial of the new release: above every serial any channel holds and this workstation
/// issued. Refuses (`channel_behind`) when a channel holds an older release than that: it was
/// rolled back or missed a publish, and hosts polling it may have passed serials it does not
/// know; `--serial` above the highest known one publishes anyway, moving every channel past it.
fn next_serial(
    requested: Option<u64>,
    held: &[(String, Option<u64>)],
    recorded: Option<u64>,
    record: &std::path::Path,
) -> Result<u64> {
    let in_channels = held.iter().filter_map(|(_, s)| *s).max();
    let highest = in_channels.max(recorded);
    let source = |serial: u64| {
        if in_channels.is_some_and(|c| c >= serial) {
            "a channel holds".to_owned()
        } else {
            format!("this workstation issued (recorded in {})", record.display())
        }
    };
    match (requested, highest) {
        (Some(0), _) => Err(crate::usage("serial must be at least 1")),
        (Some(serial), Some(highest)) if serial <= highest => Err(crate::refusal(
            "serial_too_low",
            format!(
                "serial {serial} does not grow (serial_too_low): {} serial {highest}, and hosts \
             refuse anything not above what they accepted",
                source(highest)
            ),
        )),
        (Some(serial), _) => Ok(serial),
        (None, None) => Ok(1),
        (None, Some(highest)) => {
            let behind: Vec<String> = held
                .iter()
                .filter_map(|(channel, serial)| match serial {
                    Some(s) if *s < highest => Some(format!("{channel} holds serial {s}")),
                    _ => None,
                })
                .collect();
            if behind.is_empty() {
                return Ok(highest + 1);
            }
            Err(crate::refusal(
                "channel_behind",
                format!(
                "a channel is behind (channel_behind): {}, but {} serial {highest}. It was rolled \
                 back or missed a publish, and hosts may already have passed the serials it would \
                 get next. Find out why; then publish with --serial {} to move every channel past \
                 it",
                behind.join(", "),
                source(highest),
                highest + 1
            ),
            ))
        }
    }
}

/// `--not-before`: an RFC 3339 time, or `+<duration>` from `now`.
fn not_before(text: &str, now: u64) -> Result<u64> {
    let bad = |why: String| {
        crate::usage(format!(
            "--not-before '{text}': {why}; give a time (2026-12-01T03:00:00Z) or a delay (+2h)"
        ))
    };
    match text.strip_prefix('+') {
        Some(delay) => humantime::parse_duration(delay)
            .map(|d| now + d.as_secs())
            .map_err(|e| bad(e.to_string())),
        None => humantime::parse_rfc3339_weak(text)
            .map_err(|e| bad(e.to_string()))
            .and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .map_err(|_| bad("before 1970".into()))
            }),
    }
}

fn with_secret_key(cache: &str, key: &std::path::Path) -> String {
    let separator = if cache.contains('?') { '&' } else { '?' };
    format!("{cache}{separator}secret-key={}", key.display())
}

/// What the new release's entries are, and what was built for them.
struct Step {
    hosts: BTreeMap<String, HostEntry>,
    source: Source,
    /// host -> store path of the systems built or given (none for a rollout step).
    built: BTreeMap<String, String>,
    sizes: BTreeMap<String, nix::PathInfo>,
    /// The hints: a release's from its settings, a rollout step's those of the release it
    /// changes.
    substituters: Vec<String>,
    rollout: Option<Rollout>,
}

/// Builds the chosen hosts, pushes their closures, and makes the entries of the new release
/// (`release`).
fn build_step(
    args: &Args,
    settings: &Settings,
    previous: &Option<(Release, Accepted)>,
    started: u64,
) -> Result<Step> {
    if let Some((release, _)) = previous {
        if let Some(r) = release.rollout.as_ref().filter(|r| r.active + 1 < r.waves) {
            return Err(crate::refusal(
                "rollout_active",
                format!(
                    "release {} is rolling out in waves (wave {} of {} out): fleet-sign promote \
                     it to the end or fleet-sign abort it before releasing again",
                    release.serial,
                    r.active + 1,
                    r.waves
                ),
            ));
        }
    }
    let cache = settings.cache.as_deref().ok_or_else(|| {
        crate::usage(
            "no binary cache: give --cache, set cache in fleet.toml, or publish to one \
             cache+<store URL> channel",
        )
    })?;
    let source = nix::flake_source(&settings.flake)
        .with_context(|| format!("could not read flake '{}'", settings.flake))?;
    if source.revision.is_none() && !args.allow_dirty {
        return Err(crate::usage(format!(
            "flake '{}' has uncommitted changes or is not in git: commit them, or pass \
             --allow-dirty to release without a source commit",
            settings.flake
        )));
    }
    let host_list = nix::list_hosts(&source.locked_url)?;
    let all_hosts = Hosts::new(&host_list);
    let read_tags = || nix::host_tags(&source.locked_url);
    let selectors = Selectors::new(&all_hosts, &settings.groups, &read_tags);
    let chosen = selectors.select(&args.on, "--on")?;
    // The waves of [rollout] waves, checked before anything is built.
    let mut listed_waves: Vec<BTreeSet<String>> = Vec::new();
    for (i, wave) in settings.rollout.waves.iter().enumerate() {
        if wave.is_empty() {
            return Err(crate::usage(format!("[rollout] waves: wave {i} is empty")));
        }
        listed_waves.push(
            selectors
                .select(wave, &format!("[rollout] waves (wave {i})"))?
                .into_iter()
                .collect(),
        );
    }
    let shares = if args.waves.is_empty() {
        &settings.rollout.shares
    } else {
        &args.waves
    };
    let shares = match shares.is_empty() {
        true => None,
        false => Some(wave_shares(shares)?),
    };
    if chosen.is_empty() {
        return Err(crate::usage(format!(
            "flake '{}' has no nixosConfigurations",
            settings.flake
        )));
    }
    for host in &host_list {
        if !release::is_valid_name(host) {
            return Err(crate::usage(format!(
                "host name '{host}' cannot be used in a release: use letters, digits and '.-_'"
            )));
        }
    }

    let prebuilt = prebuilt_paths(args, &all_hosts)?;
    let built = match &prebuilt {
        Some(given) => {
            for (host, path) in given {
                eprintln!("  given {host:<20} {path}");
            }
            given.clone()
        }
        None => {
            eprintln!("building {} host(s): {}", chosen.len(), chosen.join(", "));
            let mut progress = NixProgress::new();
            let built = nix::build_toplevels(&source.locked_url, &chosen, &mut progress);
            let summary = progress.finish();
            let built = built?;
            eprintln!("  {}", summary.as_deref().unwrap_or("nothing to build"));
            for (host, path) in &built {
                eprintln!("  built {host:<20} {path}");
            }
            built
        }
    };
    let paths: Vec<String> = built.values().cloned().collect();

    // What is in the local store goes to the cache; systems given by path may be there already.
    let local: Vec<String> = if prebuilt.is_some() {
        let found = nix::path_info(None, &paths).unwrap_or_default();
        paths
            .iter()
            .filter(|p| found.contains_key(*p))
            .cloned()
            .collect()
    } else {
        paths.clone()
    };
    let upload = match &settings.cache_key {
        Some((key, _)) => with_secret_key(cache, key),
        None => cache.to_owned(),
    };
    if !local.is_empty() {
        eprintln!("copying {} closure(s) to {}", local.len(), cache);
        let mut progress = NixProgress::new();
        let copied = nix::copy_to(&upload, &local, &mut progress);
        let summary = progress.finish();
        copied.with_context(|| format!("could not copy the closures to {}", cache))?;
        eprintln!("  {}", summary.as_deref().unwrap_or("already there"));
    }
    match &settings.cache_key {
        Some((_, public)) => nix::verify_in_store(cache, &[public.to_string()], &paths)
            .with_context(|| {
                format!(
                    "after the copy, {} does not hold every closure signed by cache key \
                         '{}': refusing to publish a release hosts cannot substitute",
                    cache,
                    public.name()
                )
            })?,
        None => {
            let found = nix::path_info(Some(cache), &paths)?;
            if let Some(missing) = paths.iter().find(|p| !found.contains_key(*p)) {
                bail!(
                    "after the copy, {missing} is not in {}: refusing to publish",
                    cache
                );
            }
            eprintln!(
                "warning: no cache_key set: fleet-sign checked that the closures are in the \
                 cache, not that they are signed"
            );
        }
    }
    let sizes = nix::path_info(Some(cache), &paths)?;

    let mut hosts: BTreeMap<String, HostEntry> = BTreeMap::new();
    if let Some((release, _)) = &previous {
        for (name, entry) in &release.hosts {
            if all_hosts.set.contains(name.as_str()) {
                // A finished rollout's notes end with it.
                let mut entry = entry.clone();
                entry.target = None;
                entry.previous = None;
                entry.held = false;
                hosts.insert(name.clone(), entry);
            } else {
                eprintln!(
                    "note: host '{name}' is no longer in the flake: dropped from the release"
                );
            }
        }
    }
    let not_before = args
        .not_before
        .as_deref()
        .map(|text| not_before(text, started))
        .transpose()?;
    if let Some(at) = not_before {
        let expires = started + settings.validity.as_secs();
        if at >= expires {
            return Err(crate::usage(format!(
                "--not-before {} is not before the release expires ({}): the hosts would never \
                 move",
                rfc3339(at),
                rfc3339(expires)
            )));
        }
    }
    for (name, path) in &built {
        let toplevel = StorePath::parse(path)
            .map_err(|e| anyhow::anyhow!("nix built something unexpected for '{name}': {e}"))?;
        let old = hosts.remove(name);
        hosts.insert(
            name.clone(),
            HostEntry {
                toplevel,
                wave: old.as_ref().and_then(|o| o.wave),
                not_before,
                target: None,
                previous: None,
                held: false,
                report_key: old.and_then(|o| o.report_key),
            },
        );
    }
    for (name, entry) in hosts.iter_mut() {
        if let Some(config) = settings.hosts.get(name) {
            if let Some(key) = &config.report_key {
                PublicKey::parse(key).map_err(|e| {
                    crate::usage(format!("report_key of host '{name}' in fleet.toml: {e}"))
                })?;
                entry.report_key = Some(key.clone());
            }
        }
        // A host's own `wave`, else the first of [rollout] waves naming it, else its wave by
        // share after those, else the wave it had.
        let own = settings.hosts.get(name).and_then(|c| c.wave);
        let listed = || {
            listed_waves
                .iter()
                .position(|wave| wave.contains(name))
                .map(|i| i as u32)
        };
        let by_share = || {
            shares
                .as_ref()
                .map(|s| listed_waves.len() as u32 + hashed_wave(&settings.fleet, name, s))
        };
        entry.wave = own.or_else(listed).or_else(by_share).or(entry.wave);
    }
    if hosts.len() < host_list.len() {
        let missing: Vec<&str> = host_list
            .iter()
            .filter(|h| !hosts.contains_key(*h))
            .map(String::as_str)
            .collect();
        let shown = missing
            .iter()
            .take(20)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "note: {} host(s) have no entry yet and will refuse this release: {shown}{}",
            missing.len(),
            if missing.len() > 20 { ", …" } else { "" }
        );
    }

    let rollout = match args.rollout {
        true => start_rollout(&mut hosts, previous.as_ref().map(|(r, _)| r))?,
        false => None,
    };
    Ok(Step {
        hosts,
        source: Source {
            repo: source.url.clone(),
            commit: source.revision.clone(),
        },
        built,
        sizes,
        substituters: settings.substituters.clone(),
        rollout,
    })
}

pub fn run(args: Args) -> Result<()> {
    run_op(args, Op::Release).map(drop)
}

/// `--waves`: the cumulative shares in basis points of the waves before the last; refuses
/// shares that are zero or add up to 100 % or more (the last wave would be empty).
fn wave_shares(percents: &[u32]) -> Result<Vec<u32>> {
    let mut total = 0;
    let mut cumulative = Vec::new();
    for percent in percents {
        total += percent;
        if *percent == 0 || total >= 100 {
            return Err(crate::usage(format!(
                "--waves {}: each share must be above 0 and together below 100 (the rest is \
                 the last wave)",
                percents
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )));
        }
        cumulative.push(total * 100);
    }
    Ok(cumulative)
}

/// A host's wave by share: a stable hash of fleet and host name, in basis points, against the
/// cumulative shares (`wave_shares`).
fn hashed_wave(fleet: &str, host: &str, cumulative: &[u32]) -> u32 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(b"fleet-wave\0")
        .chain_update(fleet.as_bytes())
        .chain_update(b"\0")
        .chain_update(host.as_bytes())
        .finalize();
    let point = (u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 10_000) as u32;
    cumulative
        .iter()
        .position(|limit| point < *limit)
        .unwrap_or(cumulative.len()) as u32
}

/// `release --rollout`: the hosts whose system changes in a wave after 0 keep their old
/// system, the new one in `target`; those in wave 0 move and keep their old one in `previous`.
fn start_rollout(
    hosts: &mut BTreeMap<String, HostEntry>,
    previous: Option<&Release>,
) -> Result<Option<Rollout>> {
    let last = hosts.values().filter_map(|e| e.wave).max().unwrap_or(0)
        + u32::from(hosts.values().any(|e| e.wave.is_none()));
    if last == 0 {
        return Err(crate::usage(
            "--rollout needs hosts in more than one wave: set wave = 0 (canaries), 1, … for hosts \
             in fleet.toml",
        ));
    }
    if last >= release::MAX_WAVES {
        return Err(crate::usage(format!(
            "a rollout has at most {} waves",
            release::MAX_WAVES
        )));
    }
    for (name, entry) in hosts.iter_mut() {
        let Some(old) = previous.and_then(|r| r.hosts.get(name)) else {
            continue; // a new host has nothing to keep
        };
        if old.toplevel == entry.toplevel {
            continue;
        }
        match entry.wave.unwrap_or(last) {
            0 => entry.previous = Some(old.toplevel.clone()),
            _ => entry.target = Some(std::mem::replace(&mut entry.toplevel, old.toplevel.clone())),
        }
    }
    Ok(Some(Rollout {
        active: 0,
        waves: last + 1,
        paused: false,
    }))
}

/// `promote`, `pause`, `resume`, `abort`: the entries of the release in the channels, changed
/// for that step; nothing is built.
fn rollout_step(op: Op, previous: Option<&Release>) -> Result<Step> {
    let refuse = |why: String| crate::refusal("no_rollout", why);
    let Some(release) = previous else {
        return Err(refuse(
            "the channels hold no release: nothing to roll out".into(),
        ));
    };
    let Some(mut rollout) = release.rollout.clone() else {
        return Err(refuse(format!(
            "release {} is not rolling out in waves (fleet-sign release --rollout starts one)",
            release.serial
        )));
    };
    let mut hosts = release.hosts.clone();
    let last = rollout.waves - 1;
    match op {
        Op::Promote if rollout.paused => {
            return Err(crate::refusal(
                "rollout_paused",
                format!(
                    "the rollout of release {} is paused: fleet-sign resume first",
                    release.serial
                ),
            ))
        }
        Op::Promote if rollout.active == last => {
            return Err(crate::refusal(
                "rollout_complete",
                format!(
                    "every wave of release {} is out already ({} of {})",
                    release.serial,
                    last + 1,
                    last + 1
                ),
            ))
        }
        Op::Promote => {
            rollout.active += 1;
            for entry in hosts.values_mut() {
                if entry.wave.unwrap_or(last) <= rollout.active {
                    if let Some(target) = entry.target.take() {
                        entry.previous = Some(std::mem::replace(&mut entry.toplevel, target));
                    }
                }
            }
            eprintln!("promoting wave {} of {}", rollout.active, rollout.waves);
        }
        Op::Pause | Op::Resume => {
            rollout.paused = op == Op::Pause;
            // The hosts this rollout gave a new system are held: those that run it stay, those
            // that have not moved yet wait until resume.
            for entry in hosts.values_mut() {
                entry.held = rollout.paused && entry.previous.is_some();
            }
        }
        Op::Abort => {
            for entry in hosts.values_mut() {
                entry.held = false;
                entry.target = None;
                if let Some(previous) = entry.previous.take() {
                    entry.toplevel = previous;
                }
            }
        }
        Op::Release => unreachable!("a release builds"),
    }
    Ok(Step {
        hosts,
        source: release.source.clone(),
        built: BTreeMap::new(),
        sizes: BTreeMap::new(),
        substituters: release.substituters.clone(),
        rollout: (op != Op::Abort).then_some(rollout),
    })
}

/// What `run_op` does: a new release, or a step of the rollout in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Release,
    Promote,
    Pause,
    Resume,
    Abort,
}

/// Publishes a release or a rollout step; returns its serial.
pub fn run_op(args: Args, op: Op) -> Result<u64> {
    let config = Loaded::load(args.config.as_deref())?;
    let settings = settings(&args, config)?;
    let started = now();

    eprintln!(
        "reading the current release from {} channel(s)",
        settings.channels.len()
    );
    let (previous, held) = current_release(&settings)?;
    let record = Record::open(&settings.fleet, &settings.trust);
    let serial = next_serial(args.serial, &held, record.highest(), record.path())?;
    if let Some((release, _)) = &previous {
        if started < release.issued_at {
            return Err(crate::usage(format!(
                "this machine's clock ({}) is behind the current release's issue time ({}): \
                 fix the clock first, hosts would see the new release as expired",
                rfc3339(started),
                rfc3339(release.issued_at)
            )));
        }
    }

    let step = match op {
        Op::Release => build_step(&args, &settings, &previous, started)?,
        op => rollout_step(op, previous.as_ref().map(|(r, _)| r))?,
    };
    let Step {
        hosts,
        source,
        built,
        sizes,
        substituters,
        rollout,
    } = step;
    let mut document = Release {
        format: settings.format,
        fleet: settings.fleet.clone(),
        serial,
        issued_at: started,
        expires: started + settings.validity.as_secs(),
        source,
        substituters,
        hosts,
        host_tree: None,
        rollout,
    };
    // Format 2: the entries move into a Merkle tree; the document keeps its root.
    let host_files = (settings.format == FORMAT_TREE).then(|| {
        let files = release::host_files(&document.fleet, serial, &document.hosts);
        (std::mem::take(&mut document.hosts), files)
    });
    if let Some((_, files)) = &host_files {
        document.host_tree = Some(files.tree.clone());
    }
    document
        .validate()
        .map_err(|e| crate::usage(format!("the release would be invalid: {e}")))?;
    let mut bytes = serde_json::to_vec_pretty(&document)?;
    bytes.push(b'\n');
    let keys: Vec<&SecretKey> = settings.keys.iter().collect();
    let signatures = SignatureFile::sign(&bytes, &keys);
    let (hosts_list, pieces) = match host_files {
        Some((_, files)) => (Some(files.list), files.pieces),
        None => (None, Vec::new()),
    };
    let mut published = Published {
        document: bytes,
        signatures: signatures.render().into_bytes(),
        freshness: None,
        hosts: hosts_list,
        pieces,
    };
    // Check the result exactly as a host would before anyone can see it (every entry, and a
    // format-2 release's list against its root; one host's piece against it too).
    let verified = published
        .verify(
            &settings.self_check,
            &VerifyContext {
                fleet: settings.fleet.clone(),
                now: started,
                floor: previous.as_ref().map(|(_, a)| *a),
                own_expiry: true,
            },
        )
        .context("the new release does not verify: nothing was published")?;
    if let Some((path, piece)) = published.pieces.first() {
        let host = path
            .rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".json"))
            .unwrap_or_default();
        verified
            .clone()
            .with_host_piece(host, Some(piece))
            .context("the new release's host entries do not verify: nothing was published")?;
    }
    let mut fresh_until = None;
    match &settings.freshness {
        Freshness::Sign(key, lifetime) => {
            published.freshness = Some(super::refresh::sign_statement(
                &verified, key, started, *lifetime,
            ));
            fresh_until = Some(started + lifetime);
        }
        Freshness::Elsewhere => eprintln!(
            "note: hosts that trust freshness keys take release {serial} once `fleet-sign \
             refresh` publishes a freshness statement for it ([freshness] key is not set here)"
        ),
        Freshness::Unused => {}
    }

    let commit_message = format!(
        "fleet {} release {serial}\n\nsource: {} at {}\nhosts: {}\n",
        settings.fleet,
        document.source.repo,
        document
            .source
            .commit
            .as_deref()
            .unwrap_or("(uncommitted tree)"),
        built.keys().cloned().collect::<Vec<_>>().join(", "),
    );
    if settings.format == FORMAT_TREE && settings.channels.iter().any(Channel::is_git) {
        eprintln!(
            "note: over a git channel every host fetches every host's piece of a format-2 \
             release (7.4 MB per host per release at 10,000 hosts): keep format 1 for git \
             channels, format 2 for http and directory channels (docs/release-format.md)"
        );
    }
    let mut published_to = Vec::new();
    for channel in &settings.channels {
        let place = channel
            .publish(&published, &commit_message)
            .with_context(|| format!("could not publish to {channel}"))?;
        eprintln!("published release {serial} to {channel} ({place})");
        published_to.push(channel.to_string());
        // Hosts may see it from now on: the workstation never issues it again.
        if let Err(e) = record.raise(serial) {
            eprintln!("warning: {e:#}");
        }
    }

    let rows: Vec<(String, String, u64)> = built
        .iter()
        .map(|(host, path)| {
            let size = sizes.get(path).and_then(|i| i.closure_size).unwrap_or(0);
            (host.clone(), path.clone(), size)
        })
        .collect();
    if args.json {
        let hosts: Vec<_> = rows
            .iter()
            .map(|(host, path, size)| {
                serde_json::json!({"host": host, "toplevel": path, "closure_size": size})
            })
            .collect();
        let out = serde_json::json!({
            "fleet": settings.fleet,
            "serial": serial,
            "expires": document.expires,
            "fresh_until": fresh_until,
            "digest": release::Digest::of(&published.document).to_string(),
            "channels": published_to,
            "built": hosts,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        match fresh_until {
            Some(until) => println!(
                "release {serial} of fleet '{}', fresh until {} (renew with fleet-sign refresh)",
                settings.fleet,
                rfc3339(until)
            ),
            None => println!(
                "release {serial} of fleet '{}', valid until {}",
                settings.fleet,
                rfc3339(document.expires)
            ),
        }
        println!("{:<20} {:<72} {:>10}", "HOST", "STORE PATH", "CLOSURE");
        for (host, path, size) in &rows {
            println!("{host:<20} {path:<72} {:>10}", human_size(*size));
        }
    }
    Ok(serial)
}

impl Args {
    /// Whether the output (errors included) is JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// The config file given, if any.
    pub fn config(&self) -> Option<PathBuf> {
        self.config.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_by_share_are_stable_and_near_their_shares() {
        assert!(wave_shares(&[0, 10]).is_err());
        assert!(wave_shares(&[60, 40]).is_err());
        let shares = wave_shares(&[10, 30]).unwrap();
        assert_eq!(shares, [1000, 4000]);
        let mut counts = [0i32; 3];
        for i in 0..10_000 {
            let host = format!("host{i}");
            let wave = hashed_wave("home", &host, &shares);
            assert_eq!(wave, hashed_wave("home", &host, &shares), "stable");
            counts[wave as usize] += 1;
        }
        // 1,000 / 3,000 / 6,000 expected; a hash is within a few percent of that.
        for (count, expected) in counts.iter().zip([1000, 3000, 6000]) {
            assert!((count - expected).abs() < 250, "{counts:?}");
        }
        // Another fleet puts the same names elsewhere: canaries are not always the same boards.
        let moved = (0..1000)
            .filter(|i| {
                let host = format!("host{i}");
                hashed_wave("home", &host, &shares) != hashed_wave("lab", &host, &shares)
            })
            .count();
        assert!(moved > 300, "{moved}");
    }

    #[test]
    fn a_rollout_needs_waves_and_holds_back_later_waves() {
        let path = |c: char| {
            StorePath::parse(&format!("/nix/store/{}-s", c.to_string().repeat(32))).unwrap()
        };
        let entry = |toplevel: StorePath, wave: Option<u32>| HostEntry {
            toplevel,
            wave,
            not_before: None,
            report_key: None,
            target: None,
            previous: None,
            held: false,
        };
        let old = Release {
            format: FORMAT_VERSION,
            fleet: "home".into(),
            serial: 1,
            issued_at: 1,
            expires: 2,
            source: Source {
                repo: "r".into(),
                commit: None,
            },
            substituters: Vec::new(),
            hosts: BTreeMap::from([
                ("a".into(), entry(path('a'), Some(0))),
                ("b".into(), entry(path('b'), None)),
                ("n".into(), entry(path('n'), Some(1))),
            ]),
            host_tree: None,
            rollout: None,
        };
        // No host in a later wave: nothing to roll out.
        let mut one = BTreeMap::from([("a".to_owned(), entry(path('c'), Some(0)))]);
        let e = start_rollout(&mut one, Some(&old)).unwrap_err();
        assert!(e.to_string().contains("more than one wave"), "{e}");
        // A host without a wave goes last; an unchanged host keeps its entry as it is.
        let mut hosts = BTreeMap::from([
            ("a".to_owned(), entry(path('c'), Some(0))),
            ("b".to_owned(), entry(path('d'), None)),
            ("n".to_owned(), entry(path('n'), Some(1))),
        ]);
        let rollout = start_rollout(&mut hosts, Some(&old)).unwrap().unwrap();
        assert_eq!((rollout.active, rollout.waves), (0, 3));
        assert_eq!(
            (&hosts["a"].toplevel, &hosts["a"].previous),
            (&path('c'), &Some(path('a')))
        );
        assert_eq!(
            (&hosts["b"].toplevel, &hosts["b"].target),
            (&path('b'), &Some(path('d')))
        );
        assert_eq!(hosts["n"], entry(path('n'), Some(1)));
    }

    #[test]
    fn selects_names_groups_and_tags() {
        let list: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let all = Hosts::new(&list);
        let groups = BTreeMap::from([("pair".to_owned(), vec!["a".to_owned(), "c".to_owned()])]);
        let reads = std::cell::Cell::new(0);
        let read_tags = || {
            reads.set(reads.get() + 1);
            Ok(BTreeMap::from([
                ("a".to_owned(), vec!["pi".to_owned()]),
                ("b".to_owned(), vec!["pi".to_owned(), "canary".to_owned()]),
                ("c".to_owned(), vec![]),
            ]))
        };
        let selectors = Selectors::new(&all, &groups, &read_tags);
        let on = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(selectors.select(&[], "--on").unwrap(), list);
        assert_eq!(
            selectors.select(&on(&["@pair", "a"]), "--on").unwrap(),
            on(&["a", "c"])
        );
        assert_eq!(reads.get(), 0, "tags are read only when asked for");
        assert_eq!(
            selectors.select(&on(&["tag:pi"]), "--on").unwrap(),
            on(&["a", "b"])
        );
        assert_eq!(
            selectors.select(&on(&["tag:canary", "c"]), "--on").unwrap(),
            on(&["b", "c"])
        );
        assert_eq!(reads.get(), 1, "and once");
        let err = selectors
            .select(&on(&["tag:x86"]), "[rollout] waves")
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no host has the tag 'x86' named in [rollout] waves"),
            "{err}"
        );
        let err = selectors.select(&on(&["d"]), "--on").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown host 'd' in --on: the flake's nixosConfigurations are a, b, c"
        );
        assert!(selectors.select(&on(&["@nope"]), "--on").is_err());
        // A large fleet's error names the first 20 hosts, not all of them.
        let many: Vec<String> = (0..1000).map(|i| format!("h{i:04}")).collect();
        let many = Hosts::new(&many);
        let err = Selectors::new(&many, &groups, &read_tags)
            .select(&on(&["d"]), "--on")
            .unwrap_err();
        assert!(
            err.to_string().ends_with("h0018, h0019 and 980 more"),
            "{err}"
        );
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human_size(656), "656 B");
        assert_eq!(human_size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
