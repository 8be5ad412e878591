//! The release document, `release.json`: what each host of one fleet should run.
//!
//! ```json
//! {
//!   "format": 1,
//!   "fleet": "home",
//!   "serial": 42,
//!   "issued_at": 1795313883,
//!   "expires": 1797905883,
//!   "source": { "repo": "git+https://example.org/fleet.git", "commit": "56697b09…" },
//!   "substituters": ["https://cache.example.org"],
//!   "hosts": {
//!     "router1": {
//!       "toplevel": "/nix/store/a1ps8nbkrhi4d52m2i2gzmv345rmsanm-nixos-system-router1-24.11",
//!       "wave": 0,
//!       "not_before": 1795400000,
//!       "report_key": "router1:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s="
//!     }
//!   }
//! }
//! ```
//!
//! Times are Unix seconds. Unknown fields and duplicate keys are errors, never ignored: a field an
//! agent does not understand could be one it must obey.

use super::keys::PublicKey;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// Format 1: the document names every host's entry.
pub const FORMAT_VERSION: u32 = 1;
/// Format 2: the document is a small root naming a Merkle tree over the host entries; each host
/// fetches its own entry with its inclusion proof (`hosts/<serial>/<host>.json`).
pub const FORMAT_TREE: u32 = 2;
/// The most hosts one format-1 release may name.
pub const MAX_HOSTS: usize = 50_000;
/// The most hosts one format-2 release may name.
pub const MAX_TREE_HOSTS: u64 = 1_000_000;
/// The most substituter hints one release may carry.
pub const MAX_SUBSTITUTERS: usize = 16;
const MAX_TEXT: usize = 1024;

/// The whole document, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub format: u32,
    pub fleet: String,
    pub serial: u64,
    pub issued_at: u64,
    pub expires: u64,
    pub source: Source,
    #[serde(default)]
    pub substituters: Vec<String>,
    /// Format 1: every host's entry. Format 2: absent from the document; after verification,
    /// the entries whose inclusion was proven (an agent's own, or all for the collector).
    #[serde(
        default,
        deserialize_with = "unique_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub hosts: BTreeMap<String, HostEntry>,
    /// Format 2: the Merkle tree over the host entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_tree: Option<HostTree>,
    /// A rollout in waves in progress (`fleet-sign release --rollout`, `promote`, `abort`).
    /// Hosts ignore it: each runs its entry's `toplevel`; it tells the workstation which wave
    /// is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// Where a rollout in waves stands: waves `0..=active` have their new systems, the rest
/// wait (their entries keep the system they run, the new one in `target`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub active: u32,
    /// How many waves there are (the last is `waves - 1`).
    pub waves: u32,
    /// `fleet-sign pause`: no wave is promoted until `resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// Most waves a rollout may have.
pub const MAX_WAVES: u32 = 100;

/// Format 2's commitment to the host entries: how many, and the Merkle root over their leaves
/// (`super::host_leaf`), sorted by host name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostTree {
    pub count: u64,
    /// 64 lowercase hex digits.
    pub root: String,
}

/// Where the release was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The flake reference the systems were built from.
    pub repo: String,
    /// The git commit, or `null` when built from an uncommitted tree.
    pub commit: Option<String>,
}

/// What one host should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub toplevel: StorePath,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_key: Option<String>,
    /// In a rollout, a host whose wave is not active yet: the system it moves to once its
    /// wave is promoted. The host runs `toplevel` meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<StorePath>,
    /// In a rollout, a host whose wave moved it: the system it ran before, which `fleet-sign
    /// abort` gives back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<StorePath>,
    /// A paused rollout holds the host where it is: one that runs `toplevel` already stays,
    /// one that does not waits (until `fleet-sign resume` publishes a release without it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

/// A syntactically valid top-level Nix store path: `/nix/store/<32 nix-base32>-<name>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

const STORE_DIR: &str = "/nix/store/";
const NIX_BASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

impl StorePath {
    /// Accepts exactly the paths Nix itself would create directly under `/nix/store`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix(STORE_DIR)
            .ok_or_else(|| format!("'{}' is not under {STORE_DIR}", printable(text)))?;
        let bad = || format!("'{}' is not a valid store path", printable(text));
        let (hash, name) = (
            rest.get(..32).ok_or_else(bad)?,
            rest.get(32..).ok_or_else(bad)?,
        );
        let name = name.strip_prefix('-').ok_or_else(bad)?;
        let name_ok = !name.is_empty()
            && name.len() <= 211
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
        if !hash.bytes().all(|b| NIX_BASE32.contains(&b)) || !name_ok {
            return Err(bad());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the hash, e.g. `nixos-system-router1-24.11`.
    pub fn name(&self) -> &str {
        &self.0[STORE_DIR.len() + 33..]
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for StorePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StorePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        StorePath::parse(&text).map_err(de::Error::custom)
    }
}

/// Shows at most 200 characters of untrusted text, with control characters escaped.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect()
}

/// Host and fleet names: 1 to 63 characters from `[A-Za-z0-9._-]`, starting with a letter or
/// digit (what a hostname and a `nixosConfigurations` attribute both allow).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Release {
    /// Checks everything the types alone do not: names, times, keys, limits.
    pub fn validate(&self) -> Result<(), String> {
        match (self.format, &self.host_tree) {
            (FORMAT_VERSION, None) => {}
            (FORMAT_TREE, Some(tree)) => {
                if !self.hosts.is_empty() {
                    return Err("a format 2 release names its hosts in its host tree only".into());
                }
                if tree.count == 0 || tree.count > MAX_TREE_HOSTS {
                    return Err(format!(
                        "host_tree.count {} is outside 1 to {MAX_TREE_HOSTS}",
                        tree.count
                    ));
                }
                if super::Digest::from_hex(&tree.root).is_none() {
                    return Err("host_tree.root is not 64 lowercase hex digits".into());
                }
            }
            (FORMAT_VERSION, Some(_)) => {
                return Err("host_tree is a format 2 field".into());
            }
            (FORMAT_TREE, None) => return Err("a format 2 release needs host_tree".into()),
            (format, _) => {
                return Err(format!(
                    "release format {format} is not supported (this build reads formats \
                     {FORMAT_VERSION} and {FORMAT_TREE}): upgrade fleet"
                ))
            }
        }
        if !is_valid_name(&self.fleet) {
            return Err(format!(
                "fleet name '{}' is invalid",
                printable(&self.fleet)
            ));
        }
        if self.expires <= self.issued_at {
            return Err(format!(
                "release expires ({}) before it is issued ({})",
                self.expires, self.issued_at
            ));
        }
        check_text("source.repo", &self.source.repo)?;
        if let Some(commit) = &self.source.commit {
            let hex = commit
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !(commit.len() == 40 || commit.len() == 64) || !hex {
                return Err(format!(
                    "source.commit '{}' is not a git commit id",
                    printable(commit)
                ));
            }
        }
        if self.substituters.len() > MAX_SUBSTITUTERS {
            return Err(format!(
                "release lists {} substituters, the limit is {MAX_SUBSTITUTERS}",
                self.substituters.len()
            ));
        }
        for url in &self.substituters {
            check_text("substituter", url)?;
            if !url.contains("://") {
                return Err(format!("substituter '{}' is not a URL", printable(url)));
            }
        }
        if self.format == FORMAT_VERSION {
            if self.hosts.is_empty() {
                return Err("release names no hosts".into());
            }
            if self.hosts.len() > MAX_HOSTS {
                return Err(format!(
                    "release names {} hosts, the limit is {MAX_HOSTS}",
                    self.hosts.len()
                ));
            }
        }
        for (name, entry) in &self.hosts {
            entry.validate(name)?;
        }
        if let Some(rollout) = &self.rollout {
            if rollout.waves == 0 || rollout.waves > MAX_WAVES || rollout.active >= rollout.waves {
                return Err(format!(
                    "rollout wave {} of {} is impossible (1 to {MAX_WAVES} waves)",
                    rollout.active, rollout.waves
                ));
            }
        }
        Ok(())
    }
}

impl HostEntry {
    /// Checks the host's name and the entry's values (the types check the store path).
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if !is_valid_name(name) {
            return Err(format!("host name '{}' is invalid", printable(name)));
        }
        if let Some(key) = &self.report_key {
            // Syntax only: decoding the curve point costs microseconds per host, and the
            // collector parses the key fully when it checks a report.
            PublicKey::check_syntax(key)
                .map_err(|e| format!("host '{name}' has an invalid report_key: {e}"))?;
        }
        Ok(())
    }
}

fn check_text(what: &str, text: &str) -> Result<(), String> {
    if text.is_empty() || text.len() > MAX_TEXT || text.chars().any(|c| c.is_control() || c == ' ')
    {
        return Err(format!(
            "{what} '{}' is empty, longer than {MAX_TEXT} bytes or holds white space",
            printable(text)
        ));
    }
    Ok(())
}

/// Deserializes a JSON object into a map, refusing a key that appears twice (serde_json would
/// silently keep the last one, so two readers could disagree about what was signed).
pub(super) fn unique_map<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct UniqueMap<V>(std::marker::PhantomData<V>);

    impl<'de, V: Deserialize<'de>> Visitor<'de> for UniqueMap<V> {
        type Value = BTreeMap<String, V>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of hosts")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = BTreeMap::new();
            while let Some((key, value)) = access.next_entry::<String, V>()? {
                if map.contains_key(&key) {
                    return Err(de::Error::custom(format!(
                        "host '{}' appears twice",
                        printable(&key)
                    )));
                }
                map.insert(key, value);
            }
            Ok(map)
        }
    }

    d.deserialize_map(UniqueMap(std::marker::PhantomData))
}
