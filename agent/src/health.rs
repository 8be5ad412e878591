//! Health checks after the trial switch (SPEC §7).
//!
//! Built in: no systemd unit failed that had not failed before the trial (only where systemd
//! runs), and the release channel is still reachable (a release that cuts the host off from its
//! control plane is rolled back). Configured: units active, HTTP status, TCP connect, commands.
//!
//! The window: rounds of checks run every `interval` until `window` has passed. The candidate
//! is healthy when some round passed every required check and no required check failed in any
//! round after that one. A failure after a passing round ends the window at once.

use crate::activate::systemd_booted;
use crate::channel::Channel;
use crate::config::{Check, CheckKind, Config};
use crate::process;
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub use crate::state::CheckResult;

/// The verdict of a health window.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub healthy: bool,
    pub results: Vec<CheckResult>,
    pub cancelled: bool,
}

impl Verdict {
    /// The failed required checks, for the rollback reason.
    pub fn failures(&self) -> String {
        self.results
            .iter()
            .filter(|r| r.required && !r.ok)
            .map(|r| format!("{}: {}", r.name, r.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Units failed right now (empty where systemd does not run).
pub async fn failed_units() -> Vec<String> {
    if !systemd_booted() {
        return Vec::new();
    }
    let mut command = Command::new("systemctl");
    command.args(["list-units", "--failed", "--no-legend", "--plain", "--full"]);
    match process::run(command, Duration::from_secs(30), &CancellationToken::new()).await {
        Ok(out) => String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect(),
        Err(e) => vec![format!("(systemctl failed: {e})")],
    }
}

pub struct Health<'a> {
    pub config: &'a Config,
    /// Units already failed before the trial: not the candidate's fault.
    pub failed_before: Vec<String>,
}

impl Health<'_> {
    async fn run_check(&self, check: &Check) -> Result<(), String> {
        let cancel = CancellationToken::new();
        let work = async {
            match &check.kind {
                CheckKind::Unit { unit } => {
                    let mut command = Command::new("systemctl");
                    command.args(["is-active", "--quiet", unit]);
                    process::run(command, check.timeout, &cancel)
                        .await
                        .map(drop)
                        .map_err(|_| format!("unit {unit} is not active"))
                }
                CheckKind::Http { url, status } => {
                    let tls = crate::tls::client_config(self.config.ca_file.as_deref())?;
                    let client = reqwest::Client::builder()
                        .use_preconfigured_tls(tls)
                        .timeout(check.timeout)
                        .build()
                        .map_err(|e| e.to_string())?;
                    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
                    if response.status().as_u16() == *status {
                        Ok(())
                    } else {
                        Err(format!(
                            "HTTP {} (expected {status})",
                            response.status().as_u16()
                        ))
                    }
                }
                CheckKind::Tcp { address } => tokio::net::TcpStream::connect(address.as_str())
                    .await
                    .map(drop)
                    .map_err(|e| format!("cannot connect: {e}")),
                CheckKind::Command { command: argv } => {
                    let mut command = Command::new(&argv[0]);
                    command.args(&argv[1..]);
                    process::run(command, check.timeout, &cancel)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            }
        };
        tokio::time::timeout(check.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {}",
                    humantime::format_duration(check.timeout)
                ))
            })
    }

    /// One round of every check.
    async fn round(&self, channel: &mut Channel) -> Vec<CheckResult> {
        let mut results = Vec::new();
        if self.config.no_failed_units && systemd_booted() {
            let new: Vec<String> = failed_units()
                .await
                .into_iter()
                .filter(|u| !self.failed_before.contains(u))
                .collect();
            results.push(CheckResult {
                name: "no failed units".into(),
                required: true,
                ok: new.is_empty(),
                detail: if new.is_empty() {
                    "none".into()
                } else {
                    format!("failed: {}", new.join(", "))
                },
            });
        }
        if self.config.channel_reachable {
            let outcome = channel.reachable().await;
            results.push(CheckResult {
                name: "release channel reachable".into(),
                required: true,
                ok: outcome.is_ok(),
                detail: outcome.err().map_or("ok".into(), |e| e.to_string()),
            });
        }
        for check in &self.config.checks {
            let outcome = self.run_check(check).await;
            results.push(CheckResult {
                name: check.name.clone(),
                required: check.required,
                ok: outcome.is_ok(),
                detail: outcome.err().unwrap_or_else(|| "ok".into()),
            });
        }
        results
    }

    /// Runs rounds for the configured window and decides.
    pub async fn window(&self, channel: &mut Channel, cancel: &CancellationToken) -> Verdict {
        let deadline = tokio::time::Instant::now() + self.config.health_window;
        let mut passed_once = false;
        loop {
            let results = self.round(channel).await;
            let all_required_ok = results.iter().all(|r| r.ok || !r.required);
            for r in results.iter().filter(|r| !r.ok) {
                log::warn!(check = r.name.as_str(), required = r.required; "health check {} failed: {}", r.name, r.detail);
            }
            crate::failpoint::hit("during-health");
            if passed_once && !all_required_ok {
                return Verdict {
                    healthy: false,
                    results,
                    cancelled: false,
                };
            }
            passed_once |= all_required_ok;
            if tokio::time::Instant::now() >= deadline {
                return Verdict {
                    healthy: passed_once,
                    results,
                    cancelled: false,
                };
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + self.config.health_interval)) => {}
                () = cancel.cancelled() => return Verdict { healthy: false, results, cancelled: true },
            }
        }
    }
}
