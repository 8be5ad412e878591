//! `fleet-sign rollout`: one command a CI pipeline runs to the end. It publishes a release in
//! waves (`release --rollout`), then watches the collector and promotes the next wave (a new
//! signed release) only once every host of the waves out reports healthy on what the release
//! wants, for the soak time; it stops and says why when hosts fail or a wave takes too long.
//! Hosts never trust the collector: it only tells this command when to sign the next step.

use super::release::{self, Op};
use super::status::ViewReader;
use crate::collect::view::{FleetView, HostView};
use crate::config::Loaded;
use anyhow::Result;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[group(id = "rollout_args")]
pub struct Args {
    #[command(flatten)]
    release: release::Args,
    /// The collector whose reports gate each wave (default: [collector] url in fleet.toml).
    #[arg(long)]
    collector: Option<String>,
    /// How long the waves out must stay healthy before the next is promoted.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    soak: Duration,
    /// How many hosts of the waves out may fail (roll back, or report a standing error or a
    /// failing required check) before the rollout stops.
    #[arg(long, default_value_t = 0)]
    max_failed: usize,
    /// How long a wave may take to become healthy before the rollout stops (hosts pending or
    /// silent).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    wave_timeout: Duration,
    /// After promoting the last wave, wait until it is healthy for the soak time too: exit 0
    /// only when every wave is committed and healthy.
    #[arg(long)]
    wait_healthy: bool,
    /// How often the collector is asked.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

impl Args {
    pub fn json(&self) -> bool {
        self.release.json()
    }
}

/// How the hosts of the waves out are doing.
#[derive(Debug, Default)]
struct Tally {
    healthy: Vec<String>,
    /// Host, and its error as `code: message`.
    failed: Vec<(String, String)>,
    pending: Vec<String>,
}

/// The hosts of waves `0..=active` (a host without a wave is in the last one).
fn tally(view: &FleetView, active: u32) -> Tally {
    let last = last_wave(&view.hosts);
    let mut tally = Tally::default();
    for host in view.hosts.iter().filter(|h| h.listed) {
        if host.wave.unwrap_or(last) > active {
            continue;
        }
        let name = host.host.clone();
        match host.health.as_str() {
            "ok" => tally.healthy.push(name),
            "failing" => {
                let why = host
                    .report
                    .as_ref()
                    .and_then(|r| r.error.as_ref())
                    .map(|e| format!("{}: {}", e.code, e.message))
                    .unwrap_or_else(|| "a required health check fails".into());
                tally.failed.push((name, why));
            }
            _ => tally.pending.push(name),
        }
    }
    tally
}

fn last_wave(hosts: &[HostView]) -> u32 {
    let listed = || hosts.iter().filter(|h| h.listed);
    listed().filter_map(|h| h.wave).max().unwrap_or(0)
        + u32::from(listed().any(|h| h.wave.is_none()))
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.release.config().as_deref())?;
    let url = args
        .collector
        .clone()
        .or(config.raw.collector.and_then(|c| c.url))
        .ok_or_else(|| {
            crate::usage(
                "no collector to gate the waves on: give --collector or set [collector] url \
                 in fleet.toml",
            )
        })?;
    let reader = ViewReader::new(&url)?;
    let mut start = args.release.clone();
    start.rollout = true;
    let mut serial = release::run_op(start, Op::Release)?;
    let mut active = 0;
    let mut wave_started = Instant::now();
    let mut healthy_since: Option<Instant> = None;
    loop {
        std::thread::sleep(args.interval);
        let (view, _) = reader.read()?;
        // The collector reads the channel on its own schedule: judge only the release this
        // command published last.
        if view.release.as_ref().map(|r| r.serial) != Some(serial) {
            continue;
        }
        let last = last_wave(&view.hosts);
        let tally = tally(&view, active);
        if tally.failed.len() > args.max_failed {
            let failed: Vec<String> = tally
                .failed
                .iter()
                .map(|(host, why)| format!("{host} ({why})"))
                .collect();
            return Err(crate::refusal(
                "rollout_failed",
                format!(
                    "rollout stopped at wave {active} of {}, release {serial}: {} host(s) failed \
                     (at most {} allowed): {}; later waves keep their systems (fleet-sign abort \
                     gives the hosts moved their previous systems back) [code=rollout_failed]",
                    last + 1,
                    tally.failed.len(),
                    args.max_failed,
                    failed.join(", ")
                ),
            ));
        }
        if !tally.pending.is_empty() {
            healthy_since = None;
            if wave_started.elapsed() > args.wave_timeout {
                return Err(crate::refusal(
                    "rollout_stalled",
                    format!(
                        "rollout stopped at wave {active} of {}, release {serial}: not healthy \
                         after {}; pending or silent: {} [code=rollout_stalled]",
                        last + 1,
                        humantime::format_duration(args.wave_timeout),
                        tally.pending.join(", ")
                    ),
                ));
            }
            continue;
        }
        let since = *healthy_since.get_or_insert_with(Instant::now);
        if since.elapsed() < args.soak {
            continue;
        }
        eprintln!(
            "wave {active} of {}: {} host(s) healthy on release {serial}",
            last + 1,
            tally.healthy.len()
        );
        if active == last {
            eprintln!("rollout of release {serial} complete: every wave is out and healthy");
            return Ok(());
        }
        serial = release::run_op(args.release.clone(), Op::Promote)?;
        active += 1;
        wave_started = Instant::now();
        healthy_since = None;
        if active == last && !args.wait_healthy {
            eprintln!("rollout: the last wave is out (release {serial}); not waiting for it");
            return Ok(());
        }
    }
}
