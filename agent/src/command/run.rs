//! `fleet-agent run`: the daemon. Polls with splay, faster right after a change, backing off
//! exponentially on errors; polls at once on SIGHUP (`fleet-agent poll-now`); stops on SIGTERM
//! or SIGINT after finishing (or rolling back) what it was doing.

use super::{load_config, runtime};
use fleet_agent::activate;
use fleet_agent::config::Config;
use fleet_agent::cycle::{Agent, Outcome};
use fleet_agent::identity;
use fleet_agent::notify;
use fleet_agent::report::{wire, Event, Report, ReportError, Reporter};
use fleet_agent::state::Runtime;
use std::path::Path;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `cancel` on SIGTERM or SIGINT.
pub fn cancel_on_signals(cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM: stopping after the current step"),
            _ = int.recv() => log::info!("SIGINT: stopping after the current step"),
        }
        cancel.cancel();
    })
}

/// Tells the collector that this host is in safe mode (it would otherwise just fall silent).
async fn report_safe_mode(config: &Config, reporter: &mut Option<Reporter>, reason: &str) {
    let Some(settings) = &config.report else {
        return;
    };
    if reporter.is_none() {
        let made = identity::load_or_create(&config.state_dir, &config.host)
            .map_err(|e| e.to_string())
            .and_then(|key| Reporter::new(settings, key, &config.state_dir));
        match made {
            Ok(made) => *reporter = Some(made),
            Err(e) => {
                log::error!(code = "report_setup"; "cannot report safe mode: {e}");
                return;
            }
        }
    }
    let Some(reporter) = reporter else { return };
    let now = unix_now();
    reporter.push(Report {
        format: wire::REPORT_FORMAT,
        fleet: config.fleet.clone(),
        host: config.host.clone(),
        counter: 0,
        time: now,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        event: Event::Heartbeat,
        phase: "idle".into(),
        target: None,
        committed: None,
        accepted: None,
        outcome: None,
        error: Some(ReportError {
            code: "safe_mode".into(),
            message: wire::clip(reason, wire::MAX_MESSAGE),
            at: now,
        }),
        current: fleet_agent::nix::resolve_link(&config.current_system)
            .filter(|p| fleet_agent::release::StorePath::parse(p).is_ok()),
        candidate: None,
        last_good: None,
        health: Vec::new(),
        reboot_needed: false,
        last_success: None,
    });
    if let Err(e) = reporter.deliver().await {
        log::warn!(code = "collector_unreachable"; "reports stay queued: {e}");
    }
}

/// How long to wait before the next poll.
pub fn next_delay(config: &Config, errors: u32, fast_polls_left: u32) -> Duration {
    let base = if errors > 0 {
        let factor = 2u32.saturating_pow(errors.min(16));
        config
            .poll_interval
            .saturating_mul(factor)
            .min(config.max_backoff)
    } else if fast_polls_left > 0 {
        (config.poll_interval / 4).max(Duration::from_secs(1))
    } else {
        config.poll_interval
    };
    let splay_ms = config.poll_splay.as_millis().min(u64::MAX as u128) as u64;
    base + Duration::from_millis(if splay_ms == 0 {
        0
    } else {
        fastrand::u64(0..=splay_ms)
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn run(path: &Path) -> u8 {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    runtime().block_on(daemon(config))
}

async fn daemon(config: Config) -> u8 {
    let cancel = CancellationToken::new();
    let _signals = cancel_on_signals(cancel.clone());
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        log::error!("cannot listen for SIGHUP");
        return 1;
    };
    // systemd restarts an agent whose runtime thread stops (WatchdogSec= in its unit).
    let watchdog =
        notify::watchdog_interval().map(|every| tokio::spawn(notify::feed_watchdog(every)));
    let runtime_dir = config.runtime_dir.clone();
    let interval = config.poll_interval;
    let mut safe_mode_reporter = None;
    let mut agent = loop {
        match Agent::open(config.clone(), cancel.clone()) {
            Ok(agent) => break agent,
            Err(e) => {
                // Safe mode: apply nothing, keep saying why, until a person resets the state.
                log::error!(code = "safe_mode"; "{e}");
                notify::ready(&format!("safe mode, nothing is applied: {e}"));
                report_safe_mode(&config, &mut safe_mode_reporter, &e.to_string()).await;
                let runtime = Runtime {
                    pid: std::process::id(),
                    next_poll: Some(unix_now() + interval.as_secs()),
                    last_outcome: None,
                    safe_mode: Some(e.to_string()),
                };
                let _ = runtime.save(&runtime_dir);
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    _ = hup.recv() => {}
                    () = cancel.cancelled() => return 0,
                }
            }
        }
    };
    log::info!(
        "fleet-agent {} started: host {} in fleet {}, channel {}",
        env!("CARGO_PKG_VERSION"),
        config.host,
        config.fleet,
        config.channel
    );
    agent.publish(Event::Start);
    notify::ready(&agent.status_line());
    // What our own unit runs: a committed release that changes it restarts the agent (its unit
    // is never restarted by a switch, so a trial cannot kill the agent that judges it).
    let own_unit = match activate::own_unit() {
        Some(unit) if activate::systemd_booted() => {
            let definition = activate::unit_definition(&unit).await;
            Some((unit, definition))
        }
        _ => None,
    };
    let sender = agent
        .reporter()
        .map(|reporter| tokio::spawn(reporter.run(cancel.clone())));
    // A fleet that boots together (a power cut ends) must not poll in lockstep.
    let splay_ms = config.poll_splay.as_millis().min(u64::MAX as u128) as u64;
    if splay_ms > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=splay_ms))) => {}
            _ = hup.recv() => log::info!("SIGHUP: polling now"),
            () = cancel.cancelled() => return 0,
        }
    }
    let mut errors = 0u32;
    let mut fast_polls_left = 0u32;
    loop {
        let outcome = agent.cycle().await;
        if cancel.is_cancelled() {
            break;
        }
        if outcome.is_error() {
            errors += 1;
        } else {
            errors = 0;
        }
        if outcome.is_change() || matches!(outcome, Outcome::Refused { .. }) {
            fast_polls_left = 3;
        } else {
            fast_polls_left = fast_polls_left.saturating_sub(1);
        }
        if let (Outcome::Committed { serial, .. }, Some((unit, definition))) = (&outcome, &own_unit)
        {
            let now = activate::unit_definition(unit).await;
            if now.is_some() && now != *definition {
                log::info!(serial = serial.to_string().as_str(); "release {serial} changed {unit}: restarting into it now that it is committed");
                match activate::restart_unit(unit).await {
                    Ok(()) => {
                        cancel.cancelled().await;
                        break;
                    }
                    Err(e) => log::error!("cannot restart {unit}: {e}"),
                }
            }
        }
        if let Outcome::Rebooting { serial } = outcome {
            // systemd stops the agent on the way down; the next start checks the boot.
            log::info!(serial = serial.to_string().as_str(); "waiting for the reboot");
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(300)) => {
                    log::error!("the machine did not reboot within 5 minutes");
                }
            }
        }
        notify::status(&agent.status_line());
        let delay = next_delay(&config, errors, fast_polls_left);
        let runtime = Runtime {
            pid: std::process::id(),
            next_poll: Some(unix_now() + delay.as_secs()),
            last_outcome: serde_json::to_value(&outcome).ok(),
            safe_mode: None,
        };
        if let Err(e) = runtime.save(&runtime_dir) {
            log::warn!(
                "cannot write {}: {e}",
                Runtime::path(&runtime_dir).display()
            );
        }
        log::debug!("next poll in {}", humantime::format_duration(delay));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = hup.recv() => log::info!("SIGHUP: polling now"),
            () = cancel.cancelled() => break,
        }
    }
    notify::stopping();
    let _ = std::fs::remove_file(Runtime::path(&runtime_dir));
    if let Some(sender) = sender {
        sender.abort();
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    log::info!("fleet-agent stopped");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(splay: &str) -> Config {
        let text = format!(
            "fleet = \"home\"\nhost = \"h\"\ntrusted_keys = \
             [\"ops1:kQrJ0Q2bTIw7r8pQw3dKsyWyHc8M2oLPtY1r0Qy0mTE=\"]\nchannel = \"/srv/r\"\n\
             poll_interval = \"60s\"\npoll_splay = \"{splay}\"\nmax_backoff = \"10m\""
        );
        Config::from_raw(toml::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn delays_speed_up_after_changes_and_back_off_on_errors() {
        let c = config("0s");
        assert_eq!(next_delay(&c, 0, 0), Duration::from_secs(60));
        assert_eq!(next_delay(&c, 0, 2), Duration::from_secs(15));
        assert_eq!(next_delay(&c, 1, 0), Duration::from_secs(120));
        assert_eq!(next_delay(&c, 3, 0), Duration::from_secs(480));
        assert_eq!(next_delay(&c, 30, 0), Duration::from_secs(600));
    }

    #[test]
    fn splay_spreads_polls_within_its_bound() {
        let c = config("30s");
        let delays: Vec<Duration> = (0..200).map(|_| next_delay(&c, 0, 0)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_secs(60) && *d <= Duration::from_secs(90)));
        assert!(delays.iter().any(|d| *d != delays[0]), "no spread at all");
    }
}
