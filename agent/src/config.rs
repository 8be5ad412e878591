//! The agent's config file (TOML), in two stages: [`RawConfig`] mirrors the file with a doc
//! comment per field and refuses unknown keys; [`Config::from_raw`] validates it into typed
//! config. `fleet-agent check-config FILE` runs both and explains the result.
//!
//! ```toml
//! fleet = "home"
//! host = "router1"                      # default: the machine's hostname
//! trusted_keys = ["ops-2026:base64…"]
//! threshold = 1
//! channel = "git+https://git.example.org/fleet.git#fleet-release"
//! poll_interval = "5m"
//! realise = "substitute"                # or "substitute-or-build"
//!
//! [health]
//! window = "60s"
//! [[health.checks]]
//! type = "tcp"
//! address = "127.0.0.1:22"
//! ```

use crate::release::{is_valid_name, PublicKey, TrustPolicy};
use crate::report::ReportSettings;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file as written. Every field is documented in `docs/fleet-agent.md` too.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The fleet (or channel) this host belongs to; releases for another fleet are refused.
    pub fleet: String,
    /// This host's name in releases; default: the kernel's hostname.
    pub host: Option<String>,
    /// Release keys this host trusts, `name:base64` as `fleet-sign keygen` prints them.
    pub trusted_keys: Vec<String>,
    /// How many distinct trusted keys must have signed a release; default 1.
    #[serde(default = "one")]
    pub threshold: usize,
    /// Freshness keys (`name:base64`): when set, a release also needs a freshness statement
    /// for exactly that release signed by one of them, and the statement's expiry replaces the
    /// release's own. Never the same keys as `trusted_keys`.
    #[serde(default)]
    pub freshness_keys: Vec<String>,
    /// Where releases come from: a directory, an http(s) base URL, or git+<url>[#<ref>].
    pub channel: String,
    /// A file whose content is a bearer token (http) or an HTTPS password/token (git).
    pub token_file: Option<PathBuf>,
    /// PEM certificates to trust for HTTPS besides the system's trust store (a private CA),
    /// for the channel, the collector and HTTP health checks.
    pub ca_file: Option<PathBuf>,
    /// An SSH private key file for git+ssh channels.
    pub ssh_key_file: Option<PathBuf>,
    /// A known_hosts file holding the git server's host key (git+ssh channels); default: the
    /// ssh client's own known_hosts files. Unknown host keys are never accepted.
    pub ssh_known_hosts_file: Option<PathBuf>,
    /// Time between polls when idle; default 5m.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Random extra delay added to each poll, so a fleet does not poll in lockstep; default 30s.
    #[serde(default = "default_splay", with = "humantime_serde")]
    pub poll_splay: Duration,
    /// Longest one poll of the channel may take, stalls included; default 60s.
    #[serde(default = "default_channel_timeout", with = "humantime_serde")]
    pub channel_timeout: Duration,
    /// Longest wait between polls after repeated errors; default 1h.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// "substitute" (default): fetch the closure from binary caches only, never build;
    /// "substitute-or-build": build from the signed source commit when no cache has it.
    #[serde(default)]
    pub realise: RealiseMode,
    /// Extra substituters to try besides the host's Nix config and the release's hints.
    #[serde(default)]
    pub substituters: Vec<String>,
    /// Whether to use the substituter hints the release carries; default true. Trust stays
    /// with the host's Nix `trusted-public-keys`.
    #[serde(default = "yes")]
    pub use_release_substituters: bool,
    /// Longest time to realise (substitute or build) a closure; default 1h.
    #[serde(default = "default_realise_timeout", with = "humantime_serde")]
    pub realise_timeout: Duration,
    /// Free space the store's filesystem must keep after an update is unpacked ("512MiB",
    /// "1GiB"); an update that would leave less is refused before anything is fetched;
    /// default 512MiB.
    #[serde(default = "default_disk_reserve", deserialize_with = "de_size")]
    pub disk_reserve: u64,
    /// Collect the store's garbage (only what nothing roots: every system generation stays)
    /// when an update would not fit otherwise; default false.
    #[serde(default)]
    pub collect_garbage: bool,
    /// How often one release may be tried before the agent stops and asks for a person;
    /// default 3.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// How switch-to-configuration runs.
    #[serde(default)]
    pub activation: RawActivation,
    /// Health checks after the trial switch.
    #[serde(default)]
    pub health: RawHealth,
    /// Reports to the collector.
    #[serde(default)]
    pub report: RawReport,
    /// Fixed paths of a NixOS host; tests point them elsewhere to run many hosts on one machine.
    #[serde(default)]
    pub paths: RawPaths,
}

/// `[report]`: where this host's signed reports go. Without `url`, no reports are sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    /// The collector's base URL (`fleet-sign collect`), http or https.
    pub url: Option<String>,
    /// Longest silence before the agent repeats its state as a heartbeat; default 5m.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Longest one delivery may take; default 10s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most reports kept while the collector cannot be reached (the oldest go first); default
    /// 256.
    #[serde(default = "default_queue_limit")]
    pub queue_limit: usize,
}

impl Default for RawReport {
    fn default() -> Self {
        Self {
            url: None,
            heartbeat: default_poll_interval(),
            timeout: default_check_timeout(),
            queue_limit: default_queue_limit(),
        }
    }
}

fn default_queue_limit() -> usize {
    256
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RealiseMode {
    #[default]
    Substitute,
    SubstituteOrBuild,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationMode {
    /// systemd-run when systemd is PID 1, else a direct child.
    #[default]
    Auto,
    SystemdRun,
    Direct,
}

/// `[activation]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActivation {
    /// "auto" (default), "systemd-run" or "direct".
    #[serde(default)]
    pub mode: ActivationMode,
    /// Longest a switch-to-configuration run may take before it counts as failed; default 10m.
    #[serde(default = "default_switch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// "never" (default): a release that changes the kernel, initrd or modules is tried live
    /// and committed with "reboot needed"; "auto": it becomes the boot default, the machine
    /// reboots into it, and it is checked after the boot (rolled back and rebooted again when
    /// unhealthy).
    #[serde(default)]
    pub reboot: RebootPolicy,
    /// With reboot = "auto": when such reboots may happen, "HH:MM-HH:MM" in UTC (it may wrap
    /// midnight); default: any time.
    pub reboot_window: Option<String>,
}

/// A daily window in UTC, `[start, end)` in seconds of the day; it wraps midnight when start is
/// after end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyWindow {
    pub start: u32,
    pub end: u32,
}

impl DailyWindow {
    /// Parses "HH:MM-HH:MM".
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("'{text}' is not a window of the form \"HH:MM-HH:MM\" (UTC)");
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 3600 + m * 60)
        };
        let (start, end) = text.split_once('-').ok_or_else(bad)?;
        let (start, end) = (
            minutes(start).ok_or_else(bad)?,
            minutes(end).ok_or_else(bad)?,
        );
        if start == end {
            return Err(format!("window '{text}' is empty"));
        }
        Ok(Self { start, end })
    }

    /// Whether the Unix time `now` falls in the window.
    pub fn contains(&self, now: u64) -> bool {
        let t = (now % 86_400) as u32;
        if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        }
    }

    /// When the window next opens after `now` (Unix time).
    pub fn next_open(&self, now: u64) -> u64 {
        let opens = now - now % 86_400 + u64::from(self.start);
        if opens > now {
            opens
        } else {
            opens + 86_400
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    #[default]
    Never,
    Auto,
}

impl Default for RawActivation {
    fn default() -> Self {
        Self {
            mode: ActivationMode::Auto,
            timeout: default_switch_timeout(),
            reboot: RebootPolicy::Never,
            reboot_window: None,
        }
    }
}

/// `[health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// How long checks run after the trial switch before the agent decides; default 60s.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// Time between rounds of checks; default 5s.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Built in: no failed systemd units (only where systemd runs); default true.
    #[serde(default = "yes")]
    pub no_failed_units: bool,
    /// Built in: the release channel is still reachable; default true.
    #[serde(default = "yes")]
    pub channel_reachable: bool,
    /// Configured checks.
    #[serde(default)]
    pub checks: Vec<RawCheck>,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            window: default_window(),
            interval: default_check_interval(),
            no_failed_units: true,
            channel_reachable: true,
            checks: Vec::new(),
        }
    }
}

/// One configured check: `type` says which, and which other fields it takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// "unit", "http", "tcp" or "command".
    #[serde(rename = "type")]
    pub kind: CheckType,
    /// A name for logs and reports; default: derived from the check.
    pub name: Option<String>,
    /// type = "unit": the systemd unit that must be active.
    pub unit: Option<String>,
    /// type = "http": the URL to GET.
    pub url: Option<String>,
    /// type = "http": the status it must answer with; default 200.
    pub status: Option<u16>,
    /// type = "tcp": host:port that must accept a connection.
    pub address: Option<String>,
    /// type = "command": argv of a command that must exit 0.
    pub command: Option<Vec<String>>,
    /// Whether failure rolls back (true, default) or is only reported (false).
    #[serde(default = "yes")]
    pub required: bool,
    /// Longest one run of the check may take; default 10s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckType {
    Unit,
    Http,
    Tcp,
    Command,
}

/// What a validated check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// A systemd unit that must be active.
    Unit { unit: String },
    /// An HTTP URL that must answer with `status`.
    Http { url: String, status: u16 },
    /// A TCP address that must accept connections.
    Tcp { address: String },
    /// A command (argv) that must exit 0.
    Command { command: Vec<String> },
}

impl RawCheck {
    /// The check's kind, or what is wrong with its fields.
    fn validate(&self) -> Result<CheckKind, String> {
        let given = [
            ("unit", self.unit.is_some()),
            ("url", self.url.is_some()),
            ("status", self.status.is_some()),
            ("address", self.address.is_some()),
            ("command", self.command.is_some()),
        ];
        let (kind, allowed): (Result<CheckKind, String>, &[&str]) = match self.kind {
            CheckType::Unit => (
                match &self.unit {
                    Some(unit) if !unit.is_empty() && !unit.contains('/') => {
                        Ok(CheckKind::Unit { unit: unit.clone() })
                    }
                    Some(unit) => Err(format!("unit '{unit}' is invalid")),
                    None => Err("type \"unit\" needs unit = \"name.service\"".into()),
                },
                &["unit"],
            ),
            CheckType::Http => (
                match &self.url {
                    Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                        Ok(CheckKind::Http {
                            url: url.clone(),
                            status: self.status.unwrap_or(200),
                        })
                    }
                    Some(url) => Err(format!("'{url}' is not an http(s) URL")),
                    None => Err("type \"http\" needs url = \"http://…\"".into()),
                },
                &["url", "status"],
            ),
            CheckType::Tcp => (
                match &self.address {
                    Some(address)
                        if address
                            .rsplit_once(':')
                            .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
                    {
                        Ok(CheckKind::Tcp {
                            address: address.clone(),
                        })
                    }
                    Some(address) => Err(format!("address '{address}' is not host:port")),
                    None => Err("type \"tcp\" needs address = \"host:port\"".into()),
                },
                &["address"],
            ),
            CheckType::Command => (
                match &self.command {
                    Some(command) if !command.is_empty() && !command[0].is_empty() => {
                        Ok(CheckKind::Command {
                            command: command.clone(),
                        })
                    }
                    _ => Err("type \"command\" needs command = [\"program\", \"arg\", …]".into()),
                },
                &["command"],
            ),
        };
        if let Some((field, _)) = given.iter().find(|(f, set)| *set && !allowed.contains(f)) {
            return Err(format!("{field} does not apply to this type of check"));
        }
        kind
    }
}

/// `[paths]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    /// The agent's state: state file, GC roots, git cache; default /var/lib/fleet-agent.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// What the running daemon tells `status` and `poll-now` (`agent.json`), rewritten after
    /// every poll: on tmpfs, so an idle agent writes nothing to persistent storage; default
    /// /run/fleet-agent.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// The system profile; default /nix/var/nix/profiles/system.
    #[serde(default = "default_profile")]
    pub system_profile: PathBuf,
    /// The running system's link; default /run/current-system.
    #[serde(default = "default_current")]
    pub current_system: PathBuf,
    /// The booted system's link; default /run/booted-system.
    #[serde(default = "default_booted")]
    pub booted_system: PathBuf,
    /// A Nix store URL for `--store` (a chroot store directory in tests); default: the
    /// machine's store.
    pub store: Option<String>,
    /// Where `/nix/store` physically is, for running programs from a chroot store; default /.
    #[serde(default = "default_root")]
    pub store_root: PathBuf,
    /// Where node_exporter's textfile collector reads metrics; default: none.
    pub metrics_dir: Option<PathBuf>,
    /// The boot partition, where NixOS's bootloader writes its config (systemd-boot's
    /// `loader/`, `extlinux/`): a commit checks that the boot default boots the new system;
    /// default /boot.
    #[serde(default = "default_boot_dir")]
    pub boot_dir: PathBuf,
}

impl Default for RawPaths {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            runtime_dir: default_runtime_dir(),
            system_profile: default_profile(),
            current_system: default_current(),
            booted_system: default_booted(),
            store: None,
            store_root: default_root(),
            metrics_dir: None,
            boot_dir: default_boot_dir(),
        }
    }
}

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_splay() -> Duration {
    Duration::from_secs(30)
}
fn default_channel_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(3600)
}
fn default_realise_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_disk_reserve() -> u64 {
    512 << 20
}

/// A size: a number of bytes with an optional unit, binary (KiB, MiB, GiB, TiB; K, M, G, T)
/// or decimal (KB, MB, GB, TB).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. \"512MiB\", \"2GiB\")"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit '{other}' in '{text}'")),
    };
    Ok((number * factor as f64) as u64)
}

fn de_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_size(&text).map_err(serde::de::Error::custom)
}
fn default_max_attempts() -> u32 {
    3
}
fn default_switch_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_window() -> Duration {
    Duration::from_secs(60)
}
fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_state_dir() -> PathBuf {
    "/var/lib/fleet-agent".into()
}
fn default_runtime_dir() -> PathBuf {
    "/run/fleet-agent".into()
}
fn default_profile() -> PathBuf {
    "/nix/var/nix/profiles/system".into()
}
fn default_current() -> PathBuf {
    "/run/current-system".into()
}
fn default_booted() -> PathBuf {
    "/run/booted-system".into()
}
fn default_root() -> PathBuf {
    "/".into()
}
fn default_boot_dir() -> PathBuf {
    "/boot".into()
}

/// Durations written as "30s", "5m", "1h 30m".
mod humantime_serde {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("'{text}' is not a duration: {e}")))
    }
}

/// A release channel as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSpec {
    Directory(PathBuf),
    Http(String),
    Git {
        url: String,
        refname: String,
    },
    /// A binary cache that holds the release under `fleet/` beside its closures
    /// (`cache+<store URL>`): the one URL a host needs for both.
    Cache(CacheSpec),
}

/// A binary cache as a channel: the Nix store URL it is substituted from, and where the
/// release's files lie in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// The store URL as Nix takes it: `file:///srv/cache`, `https://cache.example.org`,
    /// `s3://bucket?region=…&endpoint=…`.
    pub store: String,
    pub location: CacheLocation,
}

/// Where a cache channel's files lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// `<dir>/fleet` of a `file://` cache.
    Directory(PathBuf),
    /// `<url>/fleet` of an HTTP cache.
    Http(String),
    /// Objects under `fleet/` in an S3(-compatible) bucket.
    S3(S3Location),
}

/// An S3 bucket named the way Nix names it: `s3://<bucket>?region=<r>&endpoint=<host[:port] or
/// URL>&scheme=<http|https>` (other parameters, such as Nix's `profile`, are ignored here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub region: Option<String>,
    /// The endpoint URL of an S3-compatible service; `None`: AWS itself.
    pub endpoint: Option<String>,
}

/// The folder of a binary cache that holds the release.
pub const CACHE_FOLDER: &str = "fleet";

impl CacheSpec {
    fn parse(text: &str, store: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("cache channel '{text}': {why}");
        let store = match store.strip_prefix("s3://") {
            Some(_) => store.to_owned(),
            None => store.trim_end_matches('/').to_owned(),
        };
        let location = if let Some(path) = store.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// cache needs an absolute path"));
            }
            CacheLocation::Directory(Path::new(path).join(CACHE_FOLDER))
        } else if store.starts_with("http://") || store.starts_with("https://") {
            CacheLocation::Http(format!("{store}/{CACHE_FOLDER}"))
        } else if store.starts_with("s3://") {
            let location = S3Location::parse(&store).map_err(|why| bad(&why))?;
            if cfg!(not(feature = "s3")) {
                return Err(bad(
                    "this fleet-agent is built without S3 support (cargo feature `s3`, on by \
                     default; the NixOS package: fleet-gitops-agent with s3 = true)",
                ));
            }
            CacheLocation::S3(location)
        } else {
            return Err(bad(
                "use cache+file:///…, cache+http(s)://… or cache+s3://<bucket>?…",
            ));
        };
        Ok(Self { store, location })
    }
}

impl S3Location {
    fn parse(store: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(store).map_err(|e| format!("not a URL: {e}"))?;
        let bucket = url.host_str().unwrap_or_default().to_owned();
        if bucket.is_empty() || !url.path().trim_matches('/').is_empty() {
            return Err("name a bucket alone: s3://<bucket>?region=…".into());
        }
        let mut region = None;
        let mut endpoint = None;
        let mut scheme = "https".to_owned();
        for (key, value) in url.query_pairs() {
            match &*key {
                "region" => region = Some(value.into_owned()),
                "endpoint" => endpoint = Some(value.into_owned()),
                "scheme" if value == "http" || value == "https" => scheme = value.into_owned(),
                "scheme" => return Err(format!("scheme '{value}' is neither http nor https")),
                _ => {}
            }
        }
        let endpoint = endpoint.map(|e| match e.contains("://") {
            true => e.trim_end_matches('/').to_owned(),
            false => format!("{scheme}://{}", e.trim_end_matches('/')),
        });
        Ok(Self {
            bucket,
            region,
            endpoint,
        })
    }
}

/// The ref a git channel uses when none is given.
pub const DEFAULT_GIT_REF: &str = "fleet-release";

impl ChannelSpec {
    /// Parses the channel syntax shared with `fleet-sign` (see docs/fleet-sign.md).
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(store) = text.strip_prefix("cache+") {
            return CacheSpec::parse(text, store).map(Self::Cache);
        }
        if let Some(rest) = text.strip_prefix("git+") {
            let (url, refname) = rest.rsplit_once('#').unwrap_or((rest, DEFAULT_GIT_REF));
            let valid_ref = !refname.is_empty()
                && !refname.starts_with(['-', '/'])
                && !refname.contains("..")
                && refname
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
            if url.is_empty() || !valid_ref {
                return Err(format!(
                    "git channel '{text}' is not of the form git+<url>[#<ref>]"
                ));
            }
            return Ok(Self::Git {
                url: url.to_owned(),
                refname: refname.to_owned(),
            });
        }
        if text.starts_with("git://") {
            return Self::parse(&format!("git+{text}"));
        }
        if text.starts_with("http://") || text.starts_with("https://") {
            return Ok(Self::Http(text.trim_end_matches('/').to_owned()));
        }
        if let Some(path) = text.strip_prefix("file://") {
            return Ok(Self::Directory(PathBuf::from(path)));
        }
        if text.contains("://") {
            return Err(format!(
                "channel '{text}' has an unknown scheme: use a directory, http(s)://…, \
                 git+<url> or cache+<binary cache URL>"
            ));
        }
        Ok(Self::Directory(PathBuf::from(text)))
    }
}

impl std::fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory(path) => write!(f, "{}", path.display()),
            Self::Http(url) => f.write_str(url),
            Self::Git { url, refname } => write!(f, "git+{url}#{refname}"),
            Self::Cache(cache) => write!(f, "cache+{}", cache.store),
        }
    }
}

/// A validated health check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
    pub required: bool,
    pub timeout: Duration,
}

/// The validated config the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub fleet: String,
    pub host: String,
    pub trust: TrustPolicy,
    /// The freshness keys, threshold 1, when configured.
    pub freshness: Option<TrustPolicy>,
    pub channel: ChannelSpec,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub ssh_key_file: Option<PathBuf>,
    pub ssh_known_hosts_file: Option<PathBuf>,
    pub poll_interval: Duration,
    pub poll_splay: Duration,
    pub channel_timeout: Duration,
    pub max_backoff: Duration,
    pub realise: RealiseMode,
    pub substituters: Vec<String>,
    pub use_release_substituters: bool,
    pub realise_timeout: Duration,
    pub disk_reserve: u64,
    pub collect_garbage: bool,
    pub max_attempts: u32,
    pub activation_mode: ActivationMode,
    pub switch_timeout: Duration,
    pub reboot: RebootPolicy,
    pub reboot_window: Option<DailyWindow>,
    pub health_window: Duration,
    pub health_interval: Duration,
    pub no_failed_units: bool,
    pub channel_reachable: bool,
    pub checks: Vec<Check>,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub system_profile: PathBuf,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
    pub store: Option<String>,
    pub store_root: PathBuf,
    pub metrics_dir: Option<PathBuf>,
    pub boot_dir: PathBuf,
    pub report: Option<ReportSettings>,
}

/// A config file that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {problems}")]
pub struct ConfigError {
    pub path: String,
    pub problems: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let error = |problems: String| ConfigError {
            path: path.display().to_string(),
            problems,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
        Self::from_raw(raw).map_err(|problems| error(problems.join("; ")))
    }

    /// Validates the raw config, collecting every problem rather than stopping at the first.
    pub fn from_raw(raw: RawConfig) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if !is_valid_name(&raw.fleet) {
            problems.push(format!("fleet '{}' is not a valid name", raw.fleet));
        }
        let host = raw.host.clone().unwrap_or_else(hostname);
        if !is_valid_name(&host) {
            problems.push(format!(
                "host '{host}' is not a valid name: set host = \"…\" to this machine's name in \
                 the release"
            ));
        }
        let mut keys = Vec::new();
        for key in &raw.trusted_keys {
            match PublicKey::parse(key) {
                Ok(k) => keys.push(k),
                Err(e) => problems.push(format!("trusted_keys: {e}")),
            }
        }
        let trust = if keys.is_empty() {
            problems.push("trusted_keys is empty: list the release keys this host trusts".into());
            None
        } else {
            TrustPolicy::new(keys, raw.threshold)
                .map_err(|e| problems.push(e))
                .ok()
        };
        let freshness = freshness_policy(&raw, trust.as_ref(), &mut problems);
        let channel = ChannelSpec::parse(&raw.channel)
            .map_err(|e| problems.push(e))
            .ok();
        if let Some(ChannelSpec::Directory(dir)) = &channel {
            if !dir.is_absolute() {
                problems.push(format!(
                    "channel directory '{}' must be absolute",
                    dir.display()
                ));
            }
        }
        for (name, path) in [
            ("token_file", &raw.token_file),
            ("ssh_key_file", &raw.ssh_key_file),
        ] {
            if let Some(path) = path {
                if path.starts_with("/nix/store") {
                    problems.push(format!(
                        "{name} {} is in the Nix store, which every user can read: keep \
                         secrets outside it",
                        path.display()
                    ));
                }
            }
        }
        if raw.poll_interval < Duration::from_secs(1) {
            problems.push("poll_interval must be at least 1s".into());
        }
        if raw.channel_timeout < Duration::from_secs(1) {
            problems.push("channel_timeout must be at least 1s".into());
        }
        if raw.max_attempts == 0 {
            problems.push("max_attempts must be at least 1".into());
        }
        if raw.health.interval.is_zero() {
            problems.push("health.interval must be above 0".into());
        }
        let mut checks = Vec::new();
        for (i, check) in raw.health.checks.iter().enumerate() {
            match check.validate() {
                Ok(kind) => {
                    let default_name = match &kind {
                        CheckKind::Unit { unit } => format!("unit {unit}"),
                        CheckKind::Http { url, .. } => format!("http {url}"),
                        CheckKind::Tcp { address } => format!("tcp {address}"),
                        CheckKind::Command { command } => format!("command {}", command[0]),
                    };
                    checks.push(Check {
                        name: check.name.clone().unwrap_or(default_name),
                        kind,
                        required: check.required,
                        timeout: check.timeout,
                    });
                }
                Err(problem) => problems.push(format!("health.checks[{i}]: {problem}")),
            }
        }
        for (name, path) in [
            ("paths.state_dir", &raw.paths.state_dir),
            ("paths.runtime_dir", &raw.paths.runtime_dir),
            ("paths.system_profile", &raw.paths.system_profile),
            ("paths.current_system", &raw.paths.current_system),
            ("paths.booted_system", &raw.paths.booted_system),
            ("paths.store_root", &raw.paths.store_root),
            ("paths.boot_dir", &raw.paths.boot_dir),
        ] {
            if !path.is_absolute() {
                problems.push(format!("{name} '{}' must be absolute", path.display()));
            }
        }
        let report = match &raw.report.url {
            None => None,
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                Some(ReportSettings {
                    url: url.trim_end_matches('/').to_owned(),
                    heartbeat: raw.report.heartbeat,
                    timeout: raw.report.timeout,
                    queue_limit: raw.report.queue_limit,
                    ca_file: raw.ca_file.clone(),
                })
            }
            Some(url) => {
                problems.push(format!("report.url '{url}' is not an http(s) URL"));
                None
            }
        };
        if raw.report.heartbeat < Duration::from_secs(1) || raw.report.timeout.is_zero() {
            problems.push("report.heartbeat must be at least 1s and report.timeout above 0".into());
        }
        if raw.report.queue_limit == 0 {
            problems.push("report.queue_limit must be at least 1".into());
        }
        let reboot_window = match &raw.activation.reboot_window {
            Some(text) => match DailyWindow::parse(text) {
                Ok(window) => Some(window),
                Err(e) => {
                    problems.push(format!("activation.reboot_window: {e}"));
                    None
                }
            },
            None => None,
        };
        if reboot_window.is_some() && raw.activation.reboot != RebootPolicy::Auto {
            problems.push(
                "activation.reboot_window applies only with activation.reboot = \"auto\"".into(),
            );
        }
        if let Some(file) = raw.ca_file.as_ref().filter(|f| !f.is_absolute()) {
            problems.push(format!("ca_file '{}' must be absolute", file.display()));
        }
        if let Some(dir) = raw.paths.metrics_dir.as_ref().filter(|d| !d.is_absolute()) {
            problems.push(format!(
                "paths.metrics_dir '{}' must be absolute",
                dir.display()
            ));
        }
        let (Some(trust), Some(channel), true) = (trust, channel, problems.is_empty()) else {
            return Err(problems);
        };
        Ok(Self {
            fleet: raw.fleet,
            host,
            trust,
            freshness,
            channel,
            token_file: raw.token_file,
            ca_file: raw.ca_file,
            ssh_key_file: raw.ssh_key_file,
            ssh_known_hosts_file: raw.ssh_known_hosts_file,
            poll_interval: raw.poll_interval,
            poll_splay: raw.poll_splay,
            channel_timeout: raw.channel_timeout,
            max_backoff: raw.max_backoff.max(raw.poll_interval),
            realise: raw.realise,
            substituters: raw.substituters,
            use_release_substituters: raw.use_release_substituters,
            realise_timeout: raw.realise_timeout,
            disk_reserve: raw.disk_reserve,
            collect_garbage: raw.collect_garbage,
            max_attempts: raw.max_attempts,
            activation_mode: raw.activation.mode,
            switch_timeout: raw.activation.timeout,
            reboot: raw.activation.reboot,
            reboot_window,
            health_window: raw.health.window,
            health_interval: raw.health.interval,
            no_failed_units: raw.health.no_failed_units,
            channel_reachable: raw.health.channel_reachable,
            checks,
            state_dir: raw.paths.state_dir,
            runtime_dir: raw.paths.runtime_dir,
            system_profile: raw.paths.system_profile,
            current_system: raw.paths.current_system,
            booted_system: raw.paths.booted_system,
            store: raw.paths.store,
            store_root: raw.paths.store_root,
            metrics_dir: raw.paths.metrics_dir,
            boot_dir: raw.paths.boot_dir,
            report,
        })
    }

    /// Where a logical store path (`/nix/store/…`) physically is on this machine.
    pub fn physical(&self, logical: &str) -> PathBuf {
        self.store_root.join(logical.trim_start_matches('/'))
    }
}

/// The freshness keys as a policy of threshold 1; a release key among them is a problem: it
/// would give the freshness role, meant for a less guarded machine, the power to release.
fn freshness_policy(
    raw: &RawConfig,
    trust: Option<&TrustPolicy>,
    problems: &mut Vec<String>,
) -> Option<TrustPolicy> {
    let mut keys = Vec::new();
    for key in &raw.freshness_keys {
        match PublicKey::parse(key) {
            Ok(k) => keys.push(k),
            Err(e) => problems.push(format!("freshness_keys: {e}")),
        }
    }
    if keys.is_empty() {
        return None;
    }
    for key in &keys {
        let release_key = trust
            .into_iter()
            .flat_map(|t| t.keys())
            .any(|k| k.as_bytes() == key.as_bytes());
        if release_key {
            problems.push(format!(
                "freshness key '{}' is also a release key (trusted_keys): the freshness role \
                 needs a key of its own",
                key.name()
            ));
        }
    }
    TrustPolicy::new(keys, 1)
        .map_err(|e| problems.push(format!("freshness_keys: {e}")))
        .ok()
}

/// The kernel's hostname, or "" when unreadable (then the config must name the host).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
