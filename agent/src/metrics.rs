//! Prometheus metrics for node_exporter's textfile collector (SPEC §8).
//!
//! `<metrics_dir>/fleet-agent.prom`, rewritten whole at every phase change and cycle end: a
//! temporary file that does not end in `.prom` (the collector skips it), then a rename, so a
//! scrape never reads half a file.

use crate::report::Report;
use crate::state::PHASES;
use std::fmt::Write as _;
use std::path::Path;

/// The metrics file's name.
pub const METRICS_FILE: &str = "fleet-agent.prom";

/// How long the steps of the last deploy took, in seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durations {
    pub steps: Vec<(&'static str, f64)>,
}

impl Durations {
    /// Records how long a step took since `started`.
    pub fn record(&mut self, step: &'static str, started: std::time::Instant) {
        self.steps.retain(|(s, _)| *s != step);
        self.steps.push((step, started.elapsed().as_secs_f64()));
    }
}

/// Escapes a label value as the text format asks.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics for a host's state.
pub fn render(report: &Report, durations: &Durations, queued: Option<usize>) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let host = format!("host=\"{}\"", label(&report.host));
    let plain = |value: f64| vec![(format!("{{{host}}}"), value)];
    gauge(
        "fleet_agent_info",
        "The agent's version and fleet.",
        &[(
            format!(
                "{{{host},fleet=\"{}\",version=\"{}\"}}",
                label(&report.fleet),
                label(&report.agent_version)
            ),
            1.0,
        )],
    );
    if let Some(serial) = report.committed {
        gauge(
            "fleet_agent_release_serial",
            "Serial of the release the committed system came from.",
            &plain(serial as f64),
        );
    }
    if let Some(serial) = report.accepted {
        gauge(
            "fleet_agent_accepted_serial",
            "Highest release serial this host verified.",
            &plain(serial as f64),
        );
    }
    let phases: Vec<(String, f64)> = PHASES
        .iter()
        .map(|p| {
            (
                format!("{{{host},phase=\"{p}\"}}"),
                f64::from(u8::from(report.phase == *p)),
            )
        })
        .collect();
    gauge(
        "fleet_agent_phase",
        "The deploy phase (1 for the current one).",
        &phases,
    );
    if let Some(at) = report.last_success {
        gauge(
            "fleet_agent_last_success_timestamp_seconds",
            "When a release was last committed.",
            &plain(at as f64),
        );
    }
    let failure = report
        .error
        .as_ref()
        .map_or(String::new(), |e| e.code.clone());
    gauge(
        "fleet_agent_failure",
        "1 while an error stands, with its reason code.",
        &[(
            format!("{{{host},code=\"{}\"}}", label(&failure)),
            f64::from(u8::from(report.error.is_some())),
        )],
    );
    if let Some(at) = report.error.as_ref().map(|e| e.at) {
        gauge(
            "fleet_agent_last_failure_timestamp_seconds",
            "When the standing error happened.",
            &plain(at as f64),
        );
    }
    gauge(
        "fleet_agent_reboot_needed",
        "1 when the committed system runs fully only after a reboot.",
        &plain(f64::from(u8::from(report.reboot_needed))),
    );
    if !report.health.is_empty() {
        let checks: Vec<(String, f64)> = report
            .health
            .iter()
            .map(|c| {
                (
                    format!("{{{host},check=\"{}\"}}", label(&c.name)),
                    f64::from(u8::from(c.ok)),
                )
            })
            .collect();
        gauge(
            "fleet_agent_health_check_ok",
            "Result of each check in the last health window.",
            &checks,
        );
    }
    if !durations.steps.is_empty() {
        let steps: Vec<(String, f64)> = durations
            .steps
            .iter()
            .map(|(step, seconds)| (format!("{{{host},step=\"{step}\"}}"), *seconds))
            .collect();
        gauge(
            "fleet_agent_step_duration_seconds",
            "How long each step of the last deploy took.",
            &steps,
        );
    }
    if let Some(queued) = queued {
        gauge(
            "fleet_agent_reports_queued",
            "Reports waiting for the collector.",
            &plain(queued as f64),
        );
    }
    out
}

/// Writes the metrics file atomically.
pub fn write(dir: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".{METRICS_FILE}.tmp"));
    std::fs::write(&temp, text)?;
    std::fs::rename(&temp, dir.join(METRICS_FILE))
}
