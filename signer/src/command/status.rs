//! `fleet-sign status`: the fleet as the collector sees it, as a table or JSON.

use crate::collect::view::{FleetView, HostView};
use crate::config::Loaded;
use anyhow::{Context as _, Result};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

/// Show every host's release, phase, health and last report, from the collector.
#[derive(clap::Args)]
pub struct Args {
    /// The collector's URL (default: [collector] url from the config).
    #[arg(long)]
    collector: Option<String>,
    /// Print the collector's fleet view as JSON.
    #[arg(long)]
    json: bool,
    /// Redraw every INTERVAL until interrupted.
    #[arg(long, num_args = 0..=1, default_missing_value = "10s", value_parser = humantime::parse_duration)]
    watch: Option<Duration>,
    /// A host not heard from for this long is stale.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    stale: Duration,
    /// Config file (default: ./fleet.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let config = Loaded::load(args.config.as_deref())?;
    let url = args
        .collector
        .clone()
        .or(config.raw.collector.and_then(|c| c.url))
        .ok_or_else(|| {
            crate::usage("no collector: give --collector or set [collector] url in fleet.toml")
        })?;
    let reader = ViewReader::new(&url)?;
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    loop {
        let (view, text) = reader.read()?;
        let json = || -> Result<String> {
            // The collector's view, with the waves as this command counts them.
            let mut value: serde_json::Value = serde_json::from_str(&text)?;
            value["waves"] = serde_json::to_value(waves(&view, args.stale))?;
            Ok(serde_json::to_string_pretty(&value)?)
        };
        let Some(interval) = args.watch else {
            if args.json {
                println!("{}", json()?);
            } else {
                print!("{}", table(&view, args.stale, color));
            }
            return Ok(());
        };
        // Clear the screen and draw again.
        if color {
            print!("\x1b[2J\x1b[H");
        }
        if args.json {
            println!("{}", json()?);
        } else {
            print!("{}", table(&view, args.stale, color));
        }
        std::thread::sleep(interval);
    }
}

/// Reads the fleet view from a collector (`status`, `rollout`).
pub struct ViewReader {
    endpoint: String,
    client: reqwest::blocking::Client,
}

impl ViewReader {
    pub fn new(url: &str) -> Result<Self> {
        Ok(Self {
            endpoint: format!("{}/v1/fleet", url.trim_end_matches('/')),
            client: reqwest::blocking::Client::builder()
                .use_preconfigured_tls(crate::config::tls()?)
                .timeout(Duration::from_secs(30))
                .user_agent(concat!("fleet-sign/", env!("CARGO_PKG_VERSION")))
                .build()?,
        })
    }

    /// The view, and the collector's answer as it came.
    pub fn read(&self) -> Result<(FleetView, String)> {
        let endpoint = &self.endpoint;
        let text = self
            .client
            .get(endpoint)
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.text())
            .with_context(|| format!("cannot read the fleet from {endpoint}"))?;
        let view = serde_json::from_str(&text)
            .with_context(|| format!("{endpoint} did not answer with a fleet view"))?;
        Ok((view, text))
    }
}

fn age(seconds: u64) -> String {
    match seconds {
        0..=119 => format!("{seconds}s ago"),
        120..=7199 => format!("{}m ago", seconds / 60),
        7200..=172_799 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

/// One wave of the newest release, as its hosts report.
#[derive(Debug, Default, serde::Serialize)]
pub struct Wave {
    pub wave: u32,
    /// Healthy on what the release wants.
    pub committed: usize,
    /// Reporting, on their way (deploying, behind).
    pub pending: usize,
    /// An error stands or a required check fails.
    pub failed: usize,
    /// No report within `--stale` (or never).
    pub silent: usize,
}

/// The waves of the release's hosts, in order (none when no host has a wave).
pub fn waves(view: &FleetView, stale: Duration) -> Vec<Wave> {
    let mut waves: std::collections::BTreeMap<u32, Wave> = Default::default();
    for host in view.hosts.iter().filter(|h| h.listed) {
        let Some(number) = host.wave else { continue };
        let wave = waves.entry(number).or_insert_with(|| Wave {
            wave: number,
            ..Wave::default()
        });
        if host.health == "failing" {
            wave.failed += 1;
        } else if is_stale(host, view.now, stale) {
            wave.silent += 1;
        } else if host.health == "ok" {
            wave.committed += 1;
        } else {
            wave.pending += 1;
        }
    }
    waves.into_values().collect()
}

fn is_stale(host: &HostView, now: u64, stale: Duration) -> bool {
    host.last_seen
        .is_none_or(|seen| now.saturating_sub(seen) > stale.as_secs())
}

/// The table: one row per host, stale or failing rows marked (in color on a terminal).
pub fn table(view: &FleetView, stale: Duration, color: bool) -> String {
    let mut rows = vec![[
        "HOST".to_owned(),
        "RELEASE".to_owned(),
        "PHASE".to_owned(),
        "HEALTH".to_owned(),
        "LAST SEEN".to_owned(),
        "REBOOT".to_owned(),
        "ERROR".to_owned(),
    ]];
    let mut marks = vec![None];
    for host in &view.hosts {
        let report = host.report.as_ref();
        // The newest release the host verified (whether it runs what that release wants is
        // HEALTH), or `committed→target` while it deploys.
        let serial = match report {
            Some(r) => {
                let show = |s: Option<u64>| s.map_or("-".to_owned(), |s| s.to_string());
                match r.target {
                    Some(target) if r.phase != "idle" => {
                        format!("{}→{target}", show(r.committed))
                    }
                    _ => show(r.accepted.or(r.committed)),
                }
            }
            None => "-".into(),
        };
        let stale_host = is_stale(host, view.now, stale);
        let seen = match host.last_seen {
            Some(at) => {
                let text = age(view.now.saturating_sub(at));
                if stale_host {
                    format!("{text} STALE")
                } else {
                    text
                }
            }
            None => "never".into(),
        };
        let error = report
            .and_then(|r| r.error.as_ref())
            .map(|e| {
                let message: String = e.message.chars().take(60).collect();
                format!("{}: {message}", e.code)
            })
            .unwrap_or_default();
        let mut health = host.health.clone();
        if !host.listed {
            health += " (not in release)";
        }
        rows.push([
            host.host.clone(),
            serial,
            report.map_or("-".into(), |r| r.phase.clone()),
            health,
            seen,
            if report.is_some_and(|r| r.reboot_needed) {
                "yes".into()
            } else {
                String::new()
            },
            error,
        ]);
        marks.push(if host.health == "failing" {
            Some("\x1b[31m")
        } else if stale_host {
            Some("\x1b[33m")
        } else {
            None
        });
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    match &view.release {
        Some(release) => {
            out += &format!(
                "fleet {}: release {} (issued {})\n",
                view.fleet,
                release.serial,
                super::rfc3339(release.issued_at)
            );
            if let Some(warning) = expiry_warning(release, view.now) {
                out += &match color {
                    true => format!("\x1b[33m{warning}\x1b[0m\n"),
                    false => format!("{warning}\n"),
                };
            }
        }
        None => out += &format!("fleet {}: no release known to the collector\n", view.fleet),
    }
    for wave in waves(view, stale) {
        out += &format!(
            "wave {}: {} committed, {} pending, {} failed, {} silent\n",
            wave.wave, wave.committed, wave.pending, wave.failed, wave.silent
        );
    }
    for (row, mark) in rows.iter().zip(marks) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let line = line.join("  ").trim_end().to_owned();
        match mark.filter(|_| color) {
            Some(code) => out += &format!("{code}{line}\x1b[0m\n"),
            None => out += &format!("{line}\n"),
        }
    }
    out
}

impl Args {
    /// Whether the output (errors included) is JSON.
    pub fn json(&self) -> bool {
        self.json
    }
}

/// A line warning that hosts will soon refuse (or already refuse) the release as expired: when
/// less than a quarter of its validity (the freshness statement's, when the fleet uses them) is
/// left.
pub fn expiry_warning(release: &crate::collect::view::ReleaseView, now: u64) -> Option<String> {
    let what = if release.uses_freshness {
        "freshness statement"
    } else {
        "release"
    };
    let (issued, expires) = release.valid_window();
    if release.uses_freshness && release.fresh.is_none() {
        return Some(format!(
            "warning: release {} has no valid freshness statement: hosts refuse it (run \
             fleet-sign refresh)",
            release.serial
        ));
    }
    let left = expires.saturating_sub(now);
    if left > expires.saturating_sub(issued) / 4 {
        return None;
    }
    let remedy = if release.uses_freshness {
        "fleet-sign refresh"
    } else {
        "a new release"
    };
    Some(if left == 0 {
        format!(
            "warning: the {what} of release {} expired at {}: hosts refuse it ({remedy})",
            release.serial,
            super::rfc3339(expires)
        )
    } else {
        format!(
            "warning: the {what} of release {} expires at {}, in {}: hosts refuse it after \
             that ({remedy})",
            release.serial,
            super::rfc3339(expires),
            humantime::format_duration(std::time::Duration::from_secs(left - left % 60))
        )
    })
}
