//! The agent's persisted state: the phase machine and what it must never forget.
//!
//! `state.json` in the state directory, written atomically at every transition: a temporary
//! file, fsync, rename over the old one, fsync of the directory. A missing file means a fresh
//! host; a file that does not parse means safe mode (the agent applies nothing and reports),
//! never a silent fresh start: trusting on first use would let whoever corrupted the file roll
//! the host back to an old release.

use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The state file's format version.
pub const STATE_FORMAT: u32 = 1;
/// The state file's name in the state directory.
pub const STATE_FILE: &str = "state.json";

/// Where the deploy cycle is. Each phase names the release and candidate it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Phase {
    /// Nothing in progress.
    Idle,
    /// Substituting or building the candidate; the running system is untouched.
    Realising { serial: u64, toplevel: String },
    /// `switch-to-configuration test` of the candidate started: it may be active.
    Trial {
        serial: u64,
        toplevel: String,
        /// The transient unit the switch runs in (systemd hosts), to find it after a restart.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
        /// Units failed before the trial: the built-in check ignores them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed_before: Vec<String>,
    },
    /// The candidate is active; health checks are running.
    Health {
        serial: u64,
        toplevel: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed_before: Vec<String>,
    },
    /// The candidate changes what only a reboot loads (`[activation] reboot = "auto"`): it is
    /// the boot default, and the machine reboots into it; checked after the boot.
    Booting { serial: u64, toplevel: String },
    /// The candidate proved healthy; the profile and boot entry are being set.
    Committing { serial: u64, toplevel: String },
    /// Going back to the last good system.
    RollingBack {
        serial: u64,
        toplevel: String,
        code: String,
        reason: String,
    },
}

/// Every phase's name, in cycle order (the metrics' phase state sets list them all).
pub const PHASES: [&str; 7] = [
    "idle",
    "realising",
    "trial",
    "health",
    "booting",
    "committing",
    "rolling-back",
];

impl Phase {
    /// The release and candidate the phase is about (none when idle).
    pub fn about(&self) -> Option<(u64, &str)> {
        match self {
            Self::Idle => None,
            Self::Realising { serial, toplevel }
            | Self::Trial {
                serial, toplevel, ..
            }
            | Self::Health {
                serial, toplevel, ..
            }
            | Self::Booting { serial, toplevel }
            | Self::Committing { serial, toplevel }
            | Self::RollingBack {
                serial, toplevel, ..
            } => Some((*serial, toplevel.as_str())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Realising { .. } => "realising",
            Self::Trial { .. } => "trial",
            Self::Health { .. } => "health",
            Self::Booting { .. } => "booting",
            Self::Committing { .. } => "committing",
            Self::RollingBack { .. } => "rolling-back",
        }
    }
}

/// The highest release this host verified: the serial floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptedRelease {
    pub serial: u64,
    /// SHA-256 of the document, hex.
    pub digest: String,
    pub issued_at: u64,
}

/// A release that failed on this host: not retried until a higher serial arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadRelease {
    pub serial: u64,
    pub toplevel: String,
    pub code: String,
    pub reason: String,
}

/// The result of one check in the last round of a health window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    pub name: String,
    pub required: bool,
    pub ok: bool,
    pub detail: String,
}

/// How often the current release was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attempts {
    pub serial: u64,
    pub toplevel: String,
    pub count: u32,
}

/// The last thing that went wrong, for `status` and reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastError {
    pub code: String,
    pub message: String,
    pub at: u64,
    pub serial: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    pub phase: Phase,
    /// The committed system: what the host returns to when a candidate fails.
    pub last_good: Option<String>,
    pub accepted: Option<AcceptedRelease>,
    /// The highest `issued_at` seen: the clock never goes below it.
    pub time_floor: u64,
    pub attempts: Option<Attempts>,
    pub bad: Option<BadRelease>,
    pub last_error: Option<LastError>,
    /// When a release was last committed (Unix seconds).
    pub last_success: Option<u64>,
    /// The committed system changes the kernel, initrd or modules: it takes a reboot to run.
    pub reboot_needed: bool,
    /// The serial of the release the committed system came from (unknown on a fresh host).
    #[serde(default)]
    pub committed_serial: Option<u64>,
    /// The boot (the kernel's boot id) during which `last_good` was committed or adopted: a
    /// later boot must run `last_good`, or the bootloader did not take the boot default.
    #[serde(default)]
    pub committed_boot: Option<String>,
    /// The last health window's results, kept across restarts for reports and metrics.
    #[serde(default)]
    pub last_health: Vec<CheckResult>,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`; a container booted by systemd-nspawn has
/// its own), or `None` where it cannot be read. Read once per process: it cannot change.
pub fn boot_id() -> Option<String> {
    static BOOT_ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|id| id.trim().to_owned())
                .filter(|id| !id.is_empty())
        })
        .clone()
}

impl State {
    /// The state of a host the agent has not touched yet.
    pub fn fresh(last_good: Option<String>) -> Self {
        Self {
            format: STATE_FORMAT,
            phase: Phase::Idle,
            last_good,
            accepted: None,
            time_floor: 0,
            attempts: None,
            bad: None,
            last_error: None,
            last_success: None,
            reboot_needed: false,
            committed_serial: None,
            committed_boot: boot_id(),
            last_health: Vec::new(),
        }
    }
}

/// Why the state could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state file {path} is corrupt ({detail}): entering safe mode, nothing will be applied \
         (inspect it, then run fleet-agent reset-state to start over from the running system)"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(STATE_FILE),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)` when there is no state yet; an error when it exists but cannot be trusted.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |detail: String| StateError::Corrupt {
            path: self.path.clone(),
            detail,
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if state.format != STATE_FORMAT {
            return Err(corrupt(format!(
                "format {} is not {STATE_FORMAT}",
                state.format
            )));
        }
        Ok(Some(state))
    }

    /// Writes atomically: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io)?;
        let temp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut file = std::fs::File::create(&temp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        crate::failpoint::hit("state-before-rename");
        std::fs::rename(&temp, &self.path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        crate::failpoint::hit("state-after-rename");
        Ok(())
    }

    /// Moves a corrupt state file aside (kept for inspection) so the agent can start over.
    pub fn reset(&self) -> Result<Option<PathBuf>, StateError> {
        if !self.path.exists() {
            return Ok(None);
        }
        let aside = self.path.with_extension(format!(
            "json.corrupt-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        std::fs::rename(&self.path, &aside).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(Some(aside))
    }
}

/// What the running daemon tells `status` and `poll-now`: `agent.json` in the runtime directory
/// (tmpfs), rewritten after every poll. Not needed for safety: losing it loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    pub pid: u32,
    /// Unix seconds of the next poll.
    pub next_poll: Option<u64>,
    /// The last cycle's outcome, as `fleet-agent once --json` prints it.
    pub last_outcome: Option<serde_json::Value>,
    /// Set when the state file could not be trusted.
    pub safe_mode: Option<String>,
}

impl Runtime {
    pub fn path(runtime_dir: &Path) -> PathBuf {
        runtime_dir.join("agent.json")
    }

    pub fn load(runtime_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::path(runtime_dir)).ok()?).ok()
    }

    /// Written with temp file + rename (no fsync: it is advisory), the directory made if
    /// missing.
    pub fn save(&self, runtime_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(runtime_dir)?;
        let path = Self::path(runtime_dir);
        let temp = path.with_extension("json.tmp");
        std::fs::write(
            &temp,
            serde_json::to_vec_pretty(self).expect("runtime serializes"),
        )?;
        std::fs::rename(temp, path)
    }
}
