//! Running `switch-to-configuration`: in a transient systemd unit when systemd is PID 1, so
//! restarting `fleet-agent.service` mid-switch kills nothing; as a direct child otherwise.
//!
//! NixOS itself (the bootloader, real activation) sits behind this one function; the tests use
//! fixture toplevels whose `switch-to-configuration` records its calls, and `vm-tests/` cover
//! the real thing.

use crate::config::{ActivationMode, Config};
use crate::process::{self, ProcessError};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// What `switch-to-configuration` is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Activate now, leave the boot default alone.
    Test,
    /// Make it the boot default, do not activate.
    Boot,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Boot => "boot",
        }
    }
}

/// Whether systemd is PID 1 here (what `sd_booted()` checks).
pub fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub struct Activator {
    use_systemd: bool,
    timeout: Duration,
    store_root: PathBuf,
}

impl Activator {
    pub fn new(config: &Config) -> Self {
        let use_systemd = match config.activation_mode {
            ActivationMode::Auto => systemd_booted(),
            ActivationMode::SystemdRun => true,
            ActivationMode::Direct => false,
        };
        Self {
            use_systemd,
            timeout: config.switch_timeout,
            store_root: config.store_root.clone(),
        }
    }

    /// Runs `<toplevel>/bin/switch-to-configuration <action>` to completion. It is not
    /// cancelled by shutdown: a switch is a critical section, bounded by its timeout.
    pub async fn switch(&self, toplevel: &str, action: Action) -> Result<(), ProcessError> {
        let program = self
            .store_root
            .join(toplevel.trim_start_matches('/'))
            .join("bin/switch-to-configuration");
        let command = if self.use_systemd {
            let unit = format!(
                "fleet-agent-switch-{}-{}",
                action.as_str(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            );
            let mut command = Command::new("systemd-run");
            command
                .args(["--collect", "--service-type=exec", "--wait", "--quiet"])
                .arg(format!("--unit={unit}"))
                .args(["--property=KillMode=mixed", "--"])
                .arg(&program)
                .arg(action.as_str());
            command
        } else {
            let mut command = Command::new(&program);
            command.arg(action.as_str());
            command
        };
        process::run(command, self.timeout, &CancellationToken::new())
            .await
            .map(drop)
    }
}

/// What decides whether a system needs a reboot to run: kernel, initrd, kernel modules.
fn boot_identity(dir: &Path) -> Vec<(String, Option<String>)> {
    ["kernel", "initrd", "kernel-modules"]
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let identity = std::fs::read_link(&path)
                .ok()
                .map(|t| t.display().to_string())
                .or_else(|| std::fs::read_to_string(&path).ok());
            (name.to_string(), identity)
        })
        .collect()
}

/// Whether `candidate` changes what only a reboot loads, compared with the booted system.
/// Returns the names of the parts that differ.
pub fn reboot_parts(candidate: &Path, booted: Option<&Path>) -> Vec<String> {
    let Some(booted) = booted else {
        return Vec::new();
    };
    boot_identity(candidate)
        .into_iter()
        .zip(boot_identity(booted))
        .filter(|((_, new), (_, old))| new != old)
        .map(|((name, _), _)| name)
        .collect()
}
