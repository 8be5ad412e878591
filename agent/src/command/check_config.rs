//! `fleet-agent check-config FILE`: validate and explain a config (the NixOS module runs it at
//! build time).

use fleet_agent::config::Config;
use std::path::Path;

pub fn run(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fleet-agent: error: {e}");
            return 2;
        }
    };
    let keys: Vec<&str> = config.trust.keys().iter().map(|k| k.name()).collect();
    println!("{}: valid", path.display());
    println!("  host {} in fleet {}", config.host, config.fleet);
    println!(
        "  trusts {} of {} key(s): {}",
        config.trust.threshold(),
        keys.len(),
        keys.join(", ")
    );
    if let Some(freshness) = &config.freshness {
        let keys: Vec<&str> = freshness.keys().iter().map(|k| k.name()).collect();
        println!(
            "  requires a freshness statement signed by one of: {} (its expiry replaces the \
             release's)",
            keys.join(", ")
        );
    }
    println!(
        "  polls {} every {} (+ up to {} splay)",
        config.channel,
        humantime::format_duration(config.poll_interval),
        humantime::format_duration(config.poll_splay)
    );
    println!(
        "  realise mode {:?}, at most {} attempt(s) per release",
        config.realise, config.max_attempts
    );
    println!(
        "  health window {} with {} configured check(s){}{}",
        humantime::format_duration(config.health_window),
        config.checks.len(),
        if config.no_failed_units {
            ", no failed units"
        } else {
            ""
        },
        if config.channel_reachable {
            ", channel reachable"
        } else {
            ""
        },
    );
    match &config.report {
        Some(report) => println!(
            "  reports to {} (heartbeat every {}, up to {} queued)",
            report.url,
            humantime::format_duration(report.heartbeat),
            report.queue_limit
        ),
        None => println!("  sends no reports (no [report] url)"),
    }
    if let Some(dir) = &config.metrics_dir {
        println!("  metrics in {}", dir.display());
    }
    println!("  state in {}", config.state_dir.display());
    0
}
