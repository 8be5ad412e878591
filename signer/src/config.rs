//! The workstation config, `fleet.toml`: what `fleet-sign release` would otherwise need as flags.
//!
//! Parsed in two stages: [`RawConfig`] mirrors the file (unknown keys are errors), then
//! command-line flags override it. Relative paths are relative to the file's directory.
//!
//! ```toml
//! fleet = "home"
//! flake = "."
//! keys = ["keys/ops1.sec"]
//! threshold = 1
//! cache = "file:///srv/nix-cache"
//! cache_key = "keys/cache.sec"
//! substituters = ["https://cache.example.org"]
//! channels = ["git+ssh://git@git.example.org/fleet.git#fleet-release", "/srv/www/fleet"]
//! expires = "30d"
//! format = 2                                  # a Merkle root and a file per host
//!
//! [groups]
//! routers = ["router1", "router2"]
//!
//! [rollout]                                 # see docs/fleet-sign.md, "Rollouts in waves"
//! waves = [["tag:canary"], ["@routers"]]      # wave 0, wave 1: host names, @groups, tag:NAME
//! shares = [5, 25]                            # the hosts in none: 5 %, 25 %, the rest
//!
//! [collector]
//! url = "http://collector.example.org:9400"   # for fleet-sign status
//! listen = "0.0.0.0:9400"                     # for fleet-sign collect
//! database = "/var/lib/fleet-collector/fleet.db"
//!
//! [freshness]                               # see docs/fleet-sign.md, "Freshness"
//! keys = ["fresh-ci:base64…"]                # what hosts trust as freshness_keys
//! key = "keys/fresh.sec"                      # signs statements (refresh, release)
//! expires = "7d"                              # a statement's lifetime
//!
//! [hosts.router1]
//! report_key = "router1:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s="
//! wave = 0
//! ```

use crate::channel::Channel;
use crate::keyfile;
use anyhow::{Context as _, Result};
use fleet_agent::release::{PublicKey, SecretKey, TrustPolicy, MAX_FRESHNESS_LIFETIME};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A freshness statement's lifetime unless the config says otherwise: 7 days.
pub const DEFAULT_FRESHNESS_LIFETIME: u64 = 7 * 86_400;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The fleet (or channel) name every release is for.
    pub fleet: Option<String>,
    /// The flake holding `nixosConfigurations`; default: the config file's directory.
    pub flake: Option<String>,
    /// Secret release keys to sign with (files of mode 0600).
    #[serde(default)]
    pub keys: Vec<PathBuf>,
    /// Public keys the hosts trust, used to check the release already in a channel before
    /// building on it; default: the public halves of `keys`.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// How many trusted keys must sign a release; default 1.
    pub threshold: Option<usize>,
    /// The binary cache closures are copied to: anything `nix copy --to` takes.
    pub cache: Option<String>,
    /// The secret key the cache signs closures with (a file of mode 0600).
    pub cache_key: Option<PathBuf>,
    /// Substituter URLs written into the release as hints for hosts (never trust keys).
    #[serde(default)]
    pub substituters: Vec<String>,
    /// Channels to publish to: directories and `git+<url>[#<ref>]` remotes.
    #[serde(default)]
    pub channels: Vec<String>,
    /// How long a release stays valid, e.g. "30d" or "12h"; at most 366 days.
    pub expires: Option<String>,
    /// Named groups of hosts, used as `--on @name`.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Per-host settings.
    #[serde(default)]
    pub hosts: BTreeMap<String, RawHost>,
    /// How `--rollout` puts hosts into waves.
    #[serde(default)]
    pub rollout: RawRollout,
    /// The collector: where `fleet-sign status` reads and how `fleet-sign collect` runs.
    pub collector: Option<RawCollector>,
    /// PEM certificates to trust for HTTPS besides the system's trust store (https channels
    /// and the collector behind a private CA); `$FLEET_CA_FILE` when the file does not say.
    pub ca_file: Option<PathBuf>,
    /// Freshness statements: the keys hosts trust for them and the one that signs them.
    pub freshness: Option<RawFreshness>,
    /// The release format `fleet-sign release` writes: 1 (default) or 2 (a Merkle root and a
    /// file per host).
    pub format: Option<u32>,
}

/// `[freshness]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFreshness {
    /// Public freshness keys, as the hosts' `freshness_keys` list them.
    #[serde(default)]
    pub keys: Vec<String>,
    /// The secret freshness key `fleet-sign refresh` (and `release`) sign statements with.
    pub key: Option<PathBuf>,
    /// How long a statement stays valid, e.g. "7d"; at most 31 days. Default 7 days.
    pub expires: Option<String>,
}

/// `[rollout]`: waves for hosts without a `wave` of their own.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// Wave 0, 1, …: each a list of host names, `@groups` and `tag:NAME` (hosts whose
    /// `services.fleet-agent.tags` in the flake has NAME); a host in several is in the first.
    #[serde(default)]
    pub waves: Vec<Vec<String>>,
    /// Shares in percent that split the hosts in none of `waves` into the waves after them, by
    /// a stable hash (what `--waves` gives on the command line).
    #[serde(default)]
    pub shares: Vec<u32>,
}

/// `[collector]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCollector {
    /// The collector's URL, for `fleet-sign status`.
    pub url: Option<String>,
    /// Where `fleet-sign collect` listens, host:port.
    pub listen: Option<String>,
    /// `fleet-sign collect`'s SQLite database.
    pub database: Option<PathBuf>,
    /// The channel `fleet-sign collect` reads host keys from; default: the first of `channels`.
    pub channel: Option<String>,
}

/// Settings of one host.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    /// The host's report key, as `fleet-agent identity` prints it.
    pub report_key: Option<String>,
    /// The rollout wave: 0 goes first.
    pub wave: Option<u32>,
}

/// Where the config file sits; paths in it are relative to this.
pub struct Loaded {
    pub raw: RawConfig,
    pub base: PathBuf,
}

impl Loaded {
    /// Reads `path`, or `fleet.toml` in the current directory if it exists, or nothing.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let default = Path::new("fleet.toml");
        let path = match path {
            Some(path) => path,
            None if default.exists() => default,
            None => {
                return Ok(Self {
                    raw: RawConfig::default(),
                    base: PathBuf::from("."),
                })
            }
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read config file {}", path.display()))?;
        let raw: RawConfig = toml::from_str(&text)
            .map_err(|e| crate::usage(format!("config file {}: {e}", path.display())))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let loaded = Self { raw, base };
        if let Some(ca_file) = &loaded.raw.ca_file {
            set_ca_file(loaded.resolve(ca_file));
        }
        Ok(loaded)
    }

    /// A path from the file, made relative to the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base.join(path)
    }

    /// The signing keys: `--key` flags, else `keys` from the file; refuses none at all.
    pub fn signing_keys(&self, flags: &[PathBuf]) -> Result<Vec<SecretKey>> {
        let paths: Vec<PathBuf> = if flags.is_empty() {
            self.raw.keys.iter().map(|p| self.resolve(p)).collect()
        } else {
            flags.to_vec()
        };
        if paths.is_empty() {
            return Err(crate::usage(
                "no signing key: give --key or set keys in fleet.toml (make one with fleet-sign \
                 keygen)",
            ));
        }
        paths.iter().map(|p| keyfile::read_secret(p)).collect()
    }

    /// The freshness keys hosts trust, from `[freshness] keys`, else the public half of
    /// `[freshness] key`; `None` when the fleet uses no freshness statements.
    pub fn freshness_policy(&self) -> Result<Option<TrustPolicy>> {
        let Some(freshness) = &self.raw.freshness else {
            return Ok(None);
        };
        let mut keys: Vec<PublicKey> = freshness
            .keys
            .iter()
            .map(|k| keyfile::read_public(k))
            .collect::<Result<_>>()?;
        if keys.is_empty() {
            if let Some(secret) = self.freshness_key()? {
                keys.push(secret.public());
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        TrustPolicy::new(keys, 1)
            .map(Some)
            .map_err(|e| crate::usage(format!("[freshness] keys: {e}")))
    }

    /// The secret freshness key from `[freshness] key`, if set.
    pub fn freshness_key(&self) -> Result<Option<SecretKey>> {
        self.raw
            .freshness
            .as_ref()
            .and_then(|f| f.key.as_ref())
            .map(|path| keyfile::read_secret(&self.resolve(path)))
            .transpose()
    }

    /// A statement's lifetime: `flag`, else `[freshness] expires`, else 7 days.
    pub fn freshness_lifetime(&self, flag: Option<&str>) -> Result<u64> {
        let text = flag.or(self
            .raw
            .freshness
            .as_ref()
            .and_then(|f| f.expires.as_deref()));
        let Some(text) = text else {
            return Ok(DEFAULT_FRESHNESS_LIFETIME);
        };
        let seconds = humantime::parse_duration(text)
            .map_err(|e| crate::usage(format!("freshness lifetime '{text}': {e}")))?
            .as_secs();
        if seconds == 0 || seconds > MAX_FRESHNESS_LIFETIME {
            return Err(crate::usage(format!(
                "freshness lifetime '{text}' must be more than 0 and at most {} days",
                MAX_FRESHNESS_LIFETIME / 86_400
            )));
        }
        Ok(seconds)
    }

    /// The channels: `--channel` flags, else `channels` from the file; refuses none at all.
    pub fn channels(&self, flags: &[String]) -> Result<Vec<Channel>> {
        let texts = if flags.is_empty() {
            &self.raw.channels
        } else {
            flags
        };
        if texts.is_empty() {
            return Err(crate::usage(
                "no channel: give --channel or set channels in fleet.toml",
            ));
        }
        if flags.is_empty() {
            texts.iter().map(|c| self.channel(c)).collect()
        } else {
            texts.iter().map(|c| parse_channel(c)).collect()
        }
    }

    /// A channel written in the file: a relative directory is relative to the file.
    pub fn channel(&self, text: &str) -> Result<Channel> {
        Ok(parse_channel(text)?.relative_to(&self.base))
    }

    /// The flake: `--flake` (relative to the working directory), else `flake` from the file
    /// (relative to the file), else the file's directory.
    pub fn flake(&self, flag: Option<&str>) -> Result<String> {
        match (flag, &self.raw.flake) {
            (Some(flag), _) => flake_ref(flag, Path::new(".")),
            (None, Some(flake)) => flake_ref(flake, &self.base),
            (None, None) => flake_ref(".", &self.base),
        }
    }
}

/// A channel from a flag, relative to the working directory.
pub fn parse_channel(text: &str) -> Result<Channel> {
    Channel::parse(text).map_err(|e| crate::usage(format!("{e:#}")))
}

/// A flake reference for Nix. Text without a `:` is a path, made absolute against `base`: Nix
/// itself would read `flake` as the name of a registry entry and `./flake` relative to the
/// working directory. Anything else (`git+https://…`, `github:…`, `path:…`) goes to Nix as is.
pub fn flake_ref(text: &str, base: &Path) -> Result<String> {
    if text.contains(':') {
        return Ok(text.to_owned());
    }
    let path = base.join(text);
    let absolute = path.canonicalize().map_err(|e| {
        crate::usage(format!(
            "flake directory {} does not exist or cannot be read: {e}",
            path.display()
        ))
    })?;
    Ok(absolute.display().to_string())
}

static CA_FILE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Makes `path` the CA file of every HTTPS client fleet-sign builds from now on.
pub fn set_ca_file(path: PathBuf) {
    *CA_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
}

/// The TLS configuration of fleet-sign's HTTPS clients: the system's trust store plus
/// `ca_file` from fleet.toml, else `$FLEET_CA_FILE`.
pub fn tls() -> Result<rustls::ClientConfig> {
    fleet_agent::tls::client_config(ca_file().as_deref()).map_err(|e| anyhow::anyhow!(e))
}

/// The CA file fleet-sign trusts besides the system's store: `ca_file` from fleet.toml, else
/// `$FLEET_CA_FILE`.
pub fn ca_file() -> Option<PathBuf> {
    let configured = CA_FILE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    configured.or_else(|| std::env::var_os("FLEET_CA_FILE").map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every TOML example of fleet.toml in the docs parses (unknown keys are errors).
    #[test]
    fn the_documented_fleet_toml_parses() {
        let docs = include_str!("../../docs/fleet-sign.md");
        let mut examples = 0;
        for block in docs.split("```toml\n").skip(1) {
            let text = block.split("```").next().unwrap();
            let raw: RawConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            examples += 1;
            if let Some(fleet) = raw.fleet {
                assert_eq!(fleet, "home");
                assert_eq!(raw.rollout.shares, [5, 25]);
                assert_eq!(raw.rollout.waves[1], ["@routers"]);
            }
        }
        assert!(examples >= 2, "{examples}");
    }
}
