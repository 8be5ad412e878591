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
    /// Where a transient switch unit writes its result (`<state_dir>/switch`).
    results: PathBuf,
}

/// What became of a switch that ran in a transient unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitResult {
    /// Still running.
    Running,
    /// Ended: `success`, or systemd's result (`exit-code`, `signal`, `timeout`, …) and status.
    Ended { success: bool, detail: String },
    /// Neither running nor a result on record: it never started, or the machine went down.
    Unknown,
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
            results: config.state_dir.join("switch"),
        }
    }

    /// The name of the transient unit a switch will run in, when switches run in units.
    pub fn unit_name(&self, action: Action, serial: u64) -> Option<String> {
        self.use_systemd.then(|| {
            format!(
                "fleet-agent-switch-{}-{serial}-{}",
                action.as_str(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            )
        })
    }

    fn result_file(&self, unit: &str) -> PathBuf {
        self.results.join(format!("{unit}.result"))
    }

    /// What became of the switch in `unit`: its recorded result, or whether it still runs.
    pub async fn unit_result(&self, unit: &str) -> UnitResult {
        if let Ok(text) = std::fs::read_to_string(self.result_file(unit)) {
            let text = text.trim().to_owned();
            return UnitResult::Ended {
                success: text.split_whitespace().next() == Some("success"),
                detail: text,
            };
        }
        let mut command = Command::new("systemctl");
        command.args(["is-active", "--", unit]);
        // `is-active` exits non-zero for inactive units: read what it printed either way.
        let state = match command.output().await {
            Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            Err(_) => String::new(),
        };
        match state.as_str() {
            "active" | "activating" | "deactivating" | "reloading" => UnitResult::Running,
            _ => UnitResult::Unknown,
        }
    }

    /// Asks systemd to reboot the machine. It only queues the job (`--no-block`): a client that
    /// waited would be stopped with the agent's own unit on the way down.
    pub async fn reboot(&self) -> Result<(), ProcessError> {
        if !self.use_systemd {
            // Never reboot a machine the agent does not run under systemd on (a test machine).
            return Err(ProcessError::Spawn {
                command: "systemctl reboot".into(),
                source: std::io::Error::other(
                    "reboots need systemd as PID 1 and activation.mode \"auto\" or \"systemd-run\"",
                ),
            });
        }
        let mut command = Command::new("systemctl");
        command.args(["reboot", "--no-block"]);
        process::run(command, Duration::from_secs(60), &CancellationToken::new())
            .await
            .map(drop)
    }

    /// Forgets the recorded results of finished switches.
    pub fn clear_results(&self) {
        let _ = std::fs::remove_dir_all(&self.results);
    }

    /// Runs `<toplevel>/bin/switch-to-configuration <action>` to completion. It is not
    /// cancelled by shutdown: a switch is a critical section, bounded by its timeout.
    pub async fn switch(&self, toplevel: &str, action: Action) -> Result<(), ProcessError> {
        let unit = self.unit_name(action, 0);
        self.switch_in(toplevel, action, unit.as_deref()).await
    }

    /// Like [`Self::switch`], in the transient unit `unit` when switches run in units (the
    /// caller records the name first, so a restarted agent can find the switch and its result:
    /// the unit writes `<state_dir>/switch/<unit>.result` when it ends).
    pub async fn switch_in(
        &self,
        toplevel: &str,
        action: Action,
        unit: Option<&str>,
    ) -> Result<(), ProcessError> {
        let program = self
            .store_root
            .join(toplevel.trim_start_matches('/'))
            .join("bin/switch-to-configuration");
        let Some(unit) = unit.filter(|_| self.use_systemd) else {
            let mut command = Command::new(&program);
            command.arg(action.as_str());
            return process::run(command, self.timeout, &CancellationToken::new())
                .await
                .map(drop);
        };
        let result = self.result_file(unit);
        let recorder = std::env::current_exe().map_err(|source| ProcessError::Spawn {
            command: "fleet-agent switch-result".into(),
            source,
        })?;
        for path in [&recorder, &result] {
            if !is_plain(path) {
                return Err(ProcessError::Spawn {
                    command: "systemd-run".into(),
                    source: std::io::Error::other(format!(
                        "{} has characters a unit's command line would change: use a path of \
                         letters, digits and ._+-/",
                        path.display()
                    )),
                });
            }
        }
        log::info!(switch_unit = unit; "switch-to-configuration {} runs in {unit}.service", action.as_str());
        let mut command = Command::new("systemd-run");
        command
            .args(["--collect", "--service-type=exec", "--wait", "--quiet"])
            .arg(format!("--unit={unit}"))
            .arg("--property=KillMode=mixed")
            // The unit records its own result when it ends, so a restarted agent finds it: the
            // agent's binary, by absolute path, reading SERVICE_RESULT, EXIT_CODE and
            // EXIT_STATUS from the environment systemd gives ExecStopPost. No shell, no PATH
            // (NixOS gives units only systemd's bin), no `$` or `%` for systemd to expand when
            // a daemon-reload re-reads the stored unit. `-`: a failure to record never fails
            // the switch itself.
            .arg(format!(
                "--property=ExecStopPost=-{} switch-result {}",
                recorder.display(),
                result.display()
            ))
            .arg("--")
            .arg(&program)
            .arg(action.as_str());
        match process::run(command, self.timeout, &CancellationToken::new()).await {
            Ok(_) => Ok(()),
            // systemd-run --quiet prints nothing of the switch: its output is in the unit's
            // journal. Carry the tail into the error.
            Err(ProcessError::Failed {
                command, status, ..
            }) => Err(ProcessError::Failed {
                command,
                status,
                stderr: unit_output(unit).await,
            }),
            Err(e) => Err(e),
        }
    }
}

/// Whether a path passes through a unit's command line unchanged.
fn is_plain(path: &Path) -> bool {
    path.to_str().is_some_and(|p| {
        p.starts_with('/')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-/".contains(&b))
    })
}

/// The last lines a unit wrote to the journal (its stdout and stderr), oldest first.
pub async fn unit_output(unit: &str) -> String {
    let mut command = Command::new("journalctl");
    command.args(["--no-pager", "--quiet", "-o", "cat", "-n", "30"]);
    command.arg(format!("_SYSTEMD_UNIT={unit}.service"));
    match process::run(command, Duration::from_secs(30), &CancellationToken::new()).await {
        Ok(out) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) => format!("(its output could not be read from the journal: {e})"),
    }
}

/// `fleet-agent switch-result FILE`, run by systemd as a switch unit's `ExecStopPost`: writes
/// `SERVICE_RESULT EXIT_CODE EXIT_STATUS` from its environment to `file`, durably.
pub fn record_result(file: &Path) -> std::io::Result<String> {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| "-".into());
    let line = format!(
        "{} {} {}",
        var("SERVICE_RESULT"),
        var("EXIT_CODE"),
        var("EXIT_STATUS")
    );
    crate::durable::write(file, format!("{line}\n").as_bytes())?;
    Ok(line)
}

/// The systemd service this process runs in, from its cgroup (`…/fleet-agent.service`).
pub fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let unit = path.rsplit('/').next()?;
    unit.ends_with(".service").then(|| unit.to_owned())
}

/// What the unit would run if started now: its command lines and environment, as systemd has
/// them loaded (a release's switch reloads systemd; the agent's own unit is not restarted by
/// it). Runtime details (pids, times) are left out, so the text changes only with the unit.
pub async fn unit_definition(unit: &str) -> Option<String> {
    let mut command = Command::new("systemctl");
    command.args([
        "show",
        unit,
        "-p",
        "ExecStart",
        "-p",
        "Environment",
        "-p",
        "FragmentPath",
    ]);
    let out = process::run(command, Duration::from_secs(30), &CancellationToken::new())
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    Some(
        text.lines()
            .map(|line| match line.split_once("argv[]=") {
                Some((_, rest)) => rest.split(" ;").next().unwrap_or(rest).to_owned(),
                None => line.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Asks systemd to restart `unit` (queued: the restart stops this very process).
pub async fn restart_unit(unit: &str) -> Result<(), ProcessError> {
    let mut command = Command::new("systemctl");
    command.args(["restart", "--no-block", unit]);
    process::run(command, Duration::from_secs(60), &CancellationToken::new())
        .await
        .map(drop)
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
