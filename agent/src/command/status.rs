//! `fleet-agent status [--json]` and `fleet-agent reset-state`.

use super::load_config;
use fleet_agent::nix::resolve_link;
use fleet_agent::report::queue::Queue;
use fleet_agent::state::{Runtime, StateFile};
use std::path::Path;

fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

pub fn run(path: &Path, json: bool) -> u8 {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let state_file = StateFile::new(&config.state_dir);
    let runtime = Runtime::load(&config.runtime_dir);
    let current = resolve_link(&config.current_system);
    let booted = resolve_link(&config.booted_system);
    let profile = resolve_link(&config.system_profile);
    let (state, safe_mode) = match state_file.load() {
        Ok(state) => (state, None),
        Err(e) => (None, Some(e.to_string())),
    };
    let candidate = state
        .as_ref()
        .and_then(|s| s.phase.about().map(|(_, toplevel)| toplevel.to_owned()));

    let queued = config.report.as_ref().map(|settings| {
        Queue::new(&config.state_dir, settings.queue_limit)
            .counters()
            .map_or(0, |c| c.len())
    });
    if json {
        let out = serde_json::json!({
            "collector": config.report.as_ref().map(|r| r.url.clone()),
            "reports_queued": queued,
            "host": config.host,
            "fleet": config.fleet,
            "safe_mode": safe_mode,
            "current": current,
            "booted": booted,
            "profile": profile,
            "candidate": candidate,
            "state": state,
            "next_poll": runtime.as_ref().and_then(|r| r.next_poll),
            "running_pid": runtime.as_ref().map(|r| r.pid),
            "last_outcome": runtime.as_ref().and_then(|r| r.last_outcome.clone()),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("status serializes")
        );
        return if safe_mode.is_some() { 5 } else { 0 };
    }
    println!("host {} in fleet {}", config.host, config.fleet);
    if let Some(reason) = &safe_mode {
        println!("SAFE MODE: {reason}");
    }
    let show = |p: &Option<String>| p.clone().unwrap_or_else(|| "(none)".into());
    println!("  current    {}", show(&current));
    if booted != current {
        println!("  booted     {}", show(&booted));
    }
    if let Some(state) = &state {
        println!("  last good  {}", show(&state.last_good));
        println!("  phase      {}", state.phase.name());
        if let Some(candidate) = &candidate {
            println!("  candidate  {candidate}");
        }
        if let Some(accepted) = &state.accepted {
            println!(
                "  release    {} (issued {})",
                accepted.serial,
                time(accepted.issued_at)
            );
        }
        if let Some(bad) = &state.bad {
            println!(
                "  bad        release {} ({}): {}",
                bad.serial, bad.code, bad.reason
            );
        }
        if let Some(error) = &state.last_error {
            println!(
                "  last error {} at {}: {}",
                error.code,
                time(error.at),
                error.message
            );
        }
        if let Some(at) = state.last_success {
            println!("  committed  {}", time(at));
        }
        if state.reboot_needed {
            println!("  reboot needed");
        }
    }
    match runtime.and_then(|r| r.next_poll) {
        Some(at) => println!("  next poll  {}", time(at)),
        None => println!("  next poll  (agent not running)"),
    }
    match (&config.report, queued) {
        (Some(report), Some(n)) => println!("  reports    to {}, {n} queued", report.url),
        _ => println!("  reports    none (no [report] url)"),
    }
    if safe_mode.is_some() {
        5
    } else {
        0
    }
}

pub fn reset(path: &Path) -> u8 {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let state_file = StateFile::new(&config.state_dir);
    match state_file.load() {
        Ok(_) => {
            println!(
                "{} is readable: nothing to reset",
                state_file.path().display()
            );
            0
        }
        Err(_) => match state_file.reset() {
            Ok(Some(aside)) => {
                println!(
                    "moved {} to {}; the agent starts over from the running system",
                    state_file.path().display(),
                    aside.display()
                );
                0
            }
            Ok(None) => 0,
            Err(e) => {
                eprintln!("fleet-agent: error: {e}");
                1
            }
        },
    }
}
