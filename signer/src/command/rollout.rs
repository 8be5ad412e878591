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
    /// How many hosts of the waves out may fail (roll back, report a standing error or a
    /// failing required check, or go silent) before the rollout stops: a count, or a share of
    /// the hosts out such as `5%`.
    #[arg(long, default_value = "0", value_parser = parse_limit)]
    max_failed: Limit,
    /// A host of the waves out not heard from for this long has gone silent (counted with the
    /// failed ones).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    silent_after: Duration,
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

/// How many hosts may fail before a rollout stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Count(usize),
    /// A share of the hosts out, in basis points.
    Share(u32),
}

impl Limit {
    /// Whether `failed` hosts of `out` are more than the limit allows.
    fn exceeded(self, failed: usize, out: usize) -> bool {
        match self {
            Limit::Count(count) => failed > count,
            Limit::Share(basis_points) => failed as u64 * 10_000 > basis_points as u64 * out as u64,
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Count(count) => write!(f, "{count}"),
            Limit::Share(bp) => write!(f, "{}.{:02} % of the hosts out", bp / 100, bp % 100),
        }
    }
}

/// `3` or `5%` (up to two decimals: `2.5%`).
fn parse_limit(text: &str) -> Result<Limit, String> {
    let bad = || format!("{text:?} is neither a count nor a share such as 5% (0 to 100)");
    let Some(percent) = text.trim().strip_suffix('%') else {
        return text.trim().parse().map(Limit::Count).map_err(|_| bad());
    };
    let (whole, fraction) = percent
        .trim()
        .split_once('.')
        .unwrap_or((percent.trim(), ""));
    if fraction.len() > 2 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u32 = whole.parse().map_err(|_| bad())?;
    let fraction: u32 = format!("{fraction:0<2}").parse().map_err(|_| bad())?;
    let basis_points = whole.checked_mul(100).and_then(|w| w.checked_add(fraction));
    match basis_points {
        Some(bp) if bp <= 10_000 => Ok(Limit::Share(bp)),
        _ => Err(bad()),
    }
}

/// How the hosts of the waves out are doing.
#[derive(Debug, Default)]
struct Tally {
    healthy: Vec<String>,
    /// Host, and why: its error as `code: message`, or how long it has been silent.
    failed: Vec<(String, String)>,
    pending: Vec<String>,
}

impl Tally {
    fn out(&self) -> usize {
        self.healthy.len() + self.failed.len() + self.pending.len()
    }
}

/// The hosts of waves `0..=active` (a host without a wave is in the last one). A host not heard
/// from within `silent_after` (or never) has gone silent and counts as failed. A failure counts
/// only once the host has taken release `since` (the one that started the rollout) or a later
/// one: a failure from before is what it did with an older release, and it is pending until it
/// polls.
fn tally(view: &FleetView, active: u32, silent_after: Duration, since: u64) -> Tally {
    let last = last_wave(&view.hosts);
    let mut tally = Tally::default();
    for host in view.hosts.iter().filter(|h| h.listed) {
        if host.wave.unwrap_or(last) > active {
            continue;
        }
        let name = host.host.clone();
        let silent = match host.last_seen {
            None => Some("went silent: never reported".to_owned()),
            Some(seen) if view.now.saturating_sub(seen) > silent_after.as_secs() => Some(format!(
                "went silent: no report for {}",
                humantime::format_duration(Duration::from_secs(view.now.saturating_sub(seen)))
            )),
            Some(_) => None,
        };
        if let Some(why) = silent {
            tally.failed.push((name, why));
            continue;
        }
        let taken = |h: &HostView| h.report.as_ref().and_then(|r| r.accepted) >= Some(since);
        match host.health.as_str() {
            "ok" => tally.healthy.push(name),
            "failing" if taken(host) => {
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
    let first = release::run_op(start, Op::Release)?;
    let mut serial = first;
    let mut active = 0;
    let mut wave_started = Instant::now();
    let mut healthy_since: Option<Instant> = None;
    let mut paused = false;
    loop {
        std::thread::sleep(args.interval);
        let (view, _) = reader.read()?;
        // The collector reads the channel on its own schedule: judge only the release this
        // command published last, or a later step of the same rollout by a person.
        let Some(release) = view.release.as_ref().filter(|r| r.serial >= serial) else {
            continue;
        };
        match &release.rollout {
            None => {
                return Err(crate::refusal(
                    "rollout_ended",
                    format!(
                        "release {} ends the rollout (fleet-sign abort, or a release without \
                         waves): stopping [code=rollout_ended]",
                        release.serial
                    ),
                ))
            }
            // Paused by a person: wait for resume; the wave's clock starts again then.
            Some(rollout) if rollout.paused => {
                if !paused {
                    eprintln!(
                        "rollout: paused (release {}): waiting for fleet-sign resume",
                        release.serial
                    );
                    paused = true;
                }
                wave_started = Instant::now();
                healthy_since = None;
                continue;
            }
            Some(rollout) => {
                if paused {
                    eprintln!("rollout: resumed (release {})", release.serial);
                    paused = false;
                }
                // A wave promoted by hand: follow it.
                if rollout.active > active {
                    active = rollout.active;
                    wave_started = Instant::now();
                    healthy_since = None;
                }
            }
        }
        let last = last_wave(&view.hosts);
        let tally = tally(&view, active, args.silent_after, first);
        if args.max_failed.exceeded(tally.failed.len(), tally.out()) {
            let failed: Vec<String> = tally
                .failed
                .iter()
                .map(|(host, why)| format!("{host} ({why})"))
                .collect();
            return Err(crate::refusal(
                "rollout_failed",
                format!(
                    "rollout stopped at wave {active} of {}, release {serial}: {} of {} host(s) \
                     out failed or went silent (at most {} allowed): {}; later waves keep their \
                     systems (fleet-sign abort gives the hosts moved their previous systems back) \
                     [code=rollout_failed]",
                    last + 1,
                    tally.failed.len(),
                    tally.out(),
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
                         after {}; pending: {} [code=rollout_stalled]",
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
        serial = match release::run_op(args.release.clone(), Op::Promote) {
            Ok(serial) => serial,
            // Paused since the collector last read the channel.
            Err(e) if crate::error_code(&e) == "rollout_paused" => continue,
            Err(e) => return Err(e),
        };
        active += 1;
        wave_started = Instant::now();
        healthy_since = None;
        if active == last && !args.wait_healthy {
            eprintln!("rollout: the last wave is out (release {serial}); not waiting for it");
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_counts_or_shares() {
        assert_eq!(parse_limit("3"), Ok(Limit::Count(3)));
        assert_eq!(parse_limit("5%"), Ok(Limit::Share(500)));
        assert_eq!(parse_limit("2.5%"), Ok(Limit::Share(250)));
        assert_eq!(parse_limit("100%"), Ok(Limit::Share(10_000)));
        for bad in ["", "-1", "x", "101%", "2.555%", "%", "1.x%"] {
            assert!(parse_limit(bad).is_err(), "{bad:?}");
        }
        assert!(!Limit::Count(1).exceeded(1, 10));
        assert!(Limit::Count(1).exceeded(2, 10));
        // More than 10 % of 20 hosts is three or more.
        assert!(!Limit::Share(1_000).exceeded(2, 20));
        assert!(Limit::Share(1_000).exceeded(3, 20));
        // A share of a small wave: 1 of 3 is more than 25 %.
        assert!(Limit::Share(2_500).exceeded(1, 3));
        assert!(!Limit::Share(0).exceeded(0, 3));
    }

    #[test]
    fn silent_hosts_count_with_the_failed_and_later_waves_are_not_judged() {
        let host = |name: &str, wave: u32, health: &str, last_seen: Option<u64>| HostView {
            host: name.into(),
            listed: true,
            wanted: None,
            wave: Some(wave),
            health: health.into(),
            last_seen,
            peer: None,
            report: None,
        };
        // Failing, with an error from a cycle on release `accepted`.
        let failing = |name: &str, accepted: u64| HostView {
            report: Some(
                serde_json::from_value(serde_json::json!({
                    "format": 1, "fleet": "home", "host": name, "counter": 1, "time": 9_990,
                    "agent_version": "0.1.0", "event": "outcome", "phase": "idle",
                    "accepted": accepted, "health": [], "reboot_needed": false,
                    "error": {"code": "switch_failed", "message": "no", "at": 9_990},
                }))
                .unwrap(),
            ),
            ..host(name, 0, "failing", Some(9_990))
        };
        let view = FleetView {
            fleet: "home".into(),
            release: None,
            now: 10_000,
            hosts: vec![
                host("ok", 0, "ok", Some(9_990)),
                host("quiet", 0, "ok", Some(9_000)),
                host("never", 0, "unknown", None),
                host("moving", 0, "deploying", Some(9_999)),
                failing("failed-before", 6),
                failing("failed-now", 7),
                host("later", 1, "failing", None),
            ],
        };
        // The rollout started with release 7: a failure on release 6 is not this rollout's.
        let tally = tally(&view, 0, Duration::from_secs(600), 7);
        assert_eq!(tally.healthy, ["ok"]);
        assert_eq!(tally.pending, ["moving", "failed-before"]);
        assert_eq!(
            tally.failed,
            [
                (
                    "quiet".to_owned(),
                    "went silent: no report for 16m 40s".to_owned()
                ),
                ("never".to_owned(), "went silent: never reported".to_owned()),
                ("failed-now".to_owned(), "switch_failed: no".to_owned()),
            ]
        );
        assert_eq!(tally.out(), 6);
    }
}
