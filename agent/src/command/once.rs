//! `fleet-agent once`: one full cycle now; the exit code tells the outcome.

use super::{load_config, runtime};
use fleet_agent::cycle::{Agent, Outcome};
use std::path::Path;
use tokio_util::sync::CancellationToken;

pub fn run(path: &Path, json: bool) -> u8 {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let cancel = CancellationToken::new();
    let mut agent = match Agent::open(config, cancel.clone()) {
        Ok(agent) => agent,
        Err(e) => {
            log::error!(code = "safe_mode"; "{e}");
            return 5;
        }
    };
    let outcome = runtime().block_on(async {
        let signals = super::run::cancel_on_signals(cancel.clone());
        let outcome = agent.cycle().await;
        signals.abort();
        // One delivery attempt; what the collector did not take stays queued for the daemon
        // (or the next `once`).
        if let Some(reporter) = agent.reporter() {
            match reporter.deliver().await {
                Ok(n) => log::debug!("delivered {n} reports"),
                Err(e) => log::warn!(code = "collector_unreachable"; "reports stay queued: {e}"),
            }
        }
        outcome
    });
    print_outcome(&outcome, json);
    outcome.exit_code()
}

pub fn print_outcome(outcome: &Outcome, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(outcome).expect("outcome serializes")
        );
        return;
    }
    match outcome {
        Outcome::NoRelease => println!("no release in the channel yet"),
        Outcome::UpToDate { serial } => match serial {
            Some(serial) => println!("up to date with release {serial}"),
            None => println!("up to date"),
        },
        Outcome::Refused { code, message } => println!("refused ({code}): {message}"),
        Outcome::KnownBad { serial } => {
            println!("release {serial} failed here before: waiting for a higher serial")
        }
        Outcome::Waiting { serial, not_before } => {
            println!("release {serial} waits until {not_before} for this host")
        }
        Outcome::Committed {
            serial,
            toplevel,
            reboot_needed,
        } => {
            println!("committed release {serial}: {toplevel}");
            if *reboot_needed {
                println!("reboot needed to run its kernel or initrd");
            }
        }
        Outcome::RolledBack {
            serial,
            code,
            message,
        } => {
            println!("release {serial} rolled back ({code}): {message}")
        }
        Outcome::Failed { code, message } => println!("failed ({code}): {message}"),
        Outcome::RollbackFailed { message } => println!("rollback failed: {message}"),
        Outcome::Stopped { message, .. } => println!("{message}"),
        Outcome::Rebooting { serial } => {
            println!("rebooting for release {serial}: it is checked after the boot")
        }
    }
}
