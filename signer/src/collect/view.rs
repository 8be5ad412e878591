//! What the collector serves: the fleet view (JSON, read by `fleet-sign status`) and the whole
//! fleet as Prometheus metrics.

use super::Collector;
use anyhow::Result;
use fleet_agent::report::Report;
use fleet_agent::state::PHASES;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One host in the fleet view.
#[derive(Debug, Serialize, Deserialize)]
pub struct HostView {
    pub host: String,
    /// Whether the newest release lists the host.
    pub listed: bool,
    /// The system the newest release wants on the host.
    pub wanted: Option<String>,
    /// The host's rollout wave in the newest release, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    /// ok, deploying, behind, failing, unknown: see [`health`].
    pub health: String,
    pub last_seen: Option<u64>,
    pub peer: Option<String>,
    pub report: Option<Report>,
}

/// The fleet view.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetView {
    pub fleet: String,
    pub release: Option<ReleaseView>,
    /// The collector's clock, to judge `last_seen` by.
    pub now: u64,
    pub hosts: Vec<HostView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReleaseView {
    pub serial: u64,
    pub issued_at: u64,
    pub expires: u64,
    /// Whether hosts need a freshness statement (whose expiry then replaces `expires`).
    #[serde(default)]
    pub uses_freshness: bool,
    /// The valid freshness statement's times, when there is one.
    #[serde(default)]
    pub fresh: Option<FreshView>,
    /// The rollout in waves the release is in, if any (`fleet-sign rollout` follows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<fleet_agent::release::Rollout>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FreshView {
    pub issued_at: u64,
    pub expires: u64,
}

impl ReleaseView {
    /// When hosts start refusing the release: the statement's expiry when freshness is used
    /// (none valid: already), else the release's own. Returns (issued, expires).
    pub fn valid_window(&self) -> (u64, u64) {
        match (self.uses_freshness, self.fresh) {
            (false, _) => (self.issued_at, self.expires),
            (true, Some(fresh)) => (fresh.issued_at, fresh.expires),
            (true, None) => (0, 0),
        }
    }
}

/// How a host is doing, from its latest report and what the release wants:
/// `failing` (an error stands or a required check failed), `deploying` (mid-cycle), `behind`
/// (runs something other than what the release wants), `ok`, or `unknown` (never reported).
pub fn health(report: Option<&Report>, wanted: Option<&str>) -> &'static str {
    let Some(report) = report else {
        return "unknown";
    };
    if report.error.is_some() || report.health.iter().any(|c| c.required && !c.ok) {
        "failing"
    } else if report.phase != "idle" {
        "deploying"
    } else if wanted.is_some_and(|w| report.last_good.as_deref() != Some(w)) {
        "behind"
    } else {
        "ok"
    }
}

pub fn fleet_view(collector: &Collector, now: u64) -> Result<FleetView> {
    let known = collector.known();
    let mut hosts: BTreeMap<String, HostView> = BTreeMap::new();
    if let Some(known) = &known {
        for (host, entry) in &known.verified.release().hosts {
            hosts.insert(
                host.clone(),
                HostView {
                    host: host.clone(),
                    listed: true,
                    wanted: Some(entry.toplevel.as_str().to_owned()),
                    wave: entry.wave,
                    health: String::new(),
                    last_seen: None,
                    peer: None,
                    report: None,
                },
            );
        }
    }
    for latest in collector.latest()? {
        let view = hosts.entry(latest.host.clone()).or_insert(HostView {
            host: latest.host.clone(),
            listed: false,
            wanted: None,
            wave: None,
            health: String::new(),
            last_seen: None,
            peer: None,
            report: None,
        });
        view.last_seen = Some(latest.received_at);
        view.peer = Some(latest.peer);
        view.report = serde_json::from_str(&latest.report).ok();
    }
    for view in hosts.values_mut() {
        view.health = health(view.report.as_ref(), view.wanted.as_deref()).to_owned();
    }
    Ok(FleetView {
        fleet: collector.fleet().to_owned(),
        release: known.map(|k| {
            let release = k.verified.release();
            ReleaseView {
                serial: release.serial,
                issued_at: release.issued_at,
                expires: release.expires,
                uses_freshness: collector.uses_freshness(),
                fresh: collector.fresh().map(|f| FreshView {
                    issued_at: f.issued_at,
                    expires: f.expires,
                }),
                rollout: release.rollout.clone(),
            }
        }),
        now,
        hosts: hosts.into_values().collect(),
    })
}

fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The fleet in Prometheus' text format.
pub fn metrics(collector: &Collector, now: u64) -> Result<String> {
    let view = fleet_view(collector, now)?;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    if let Some(release) = &view.release {
        family(
            "fleet_release_serial",
            "gauge",
            "Serial of the newest verified release.",
            vec![(String::new(), release.serial as f64)],
        );
        family(
            "fleet_release_valid_until_timestamp_seconds",
            "gauge",
            "When hosts start refusing the newest release as expired: its freshness statement's \
             expiry when the fleet uses freshness keys (0: no valid statement), else its own.",
            vec![(String::new(), release.valid_window().1 as f64)],
        );
    }
    let per_host = |f: &dyn Fn(&HostView) -> Option<f64>| -> Vec<(String, f64)> {
        view.hosts
            .iter()
            .filter_map(|h| Some((format!("{{host=\"{}\"}}", label(&h.host)), f(h)?)))
            .collect()
    };
    let flag = |b: bool| f64::from(u8::from(b));
    family(
        "fleet_host_reported",
        "gauge",
        "1 once the host's report arrived (0: listed in the release, never heard from).",
        per_host(&|h| Some(flag(h.report.is_some()))),
    );
    family(
        "fleet_host_last_seen_timestamp_seconds",
        "gauge",
        "When the host's latest report arrived.",
        per_host(&|h| h.last_seen.map(|t| t as f64)),
    );
    family(
        "fleet_host_release_serial",
        "gauge",
        "Serial of the release the host's committed system came from.",
        per_host(&|h| h.report.as_ref()?.committed.map(|s| s as f64)),
    );
    family(
        "fleet_host_up_to_date",
        "gauge",
        "1 when the host's committed system is the one the newest release wants.",
        per_host(&|h| {
            let wanted = h.wanted.as_deref()?;
            Some(flag(
                h.report.as_ref()?.last_good.as_deref() == Some(wanted),
            ))
        }),
    );
    family(
        "fleet_host_healthy",
        "gauge",
        "1 when no error stands on the host and no required check failed.",
        per_host(&|h| h.report.as_ref().map(|_| flag(h.health != "failing"))),
    );
    family(
        "fleet_host_reboot_needed",
        "gauge",
        "1 when the host's committed system runs fully only after a reboot.",
        per_host(&|h| Some(flag(h.report.as_ref()?.reboot_needed))),
    );
    let mut phases = Vec::new();
    let mut failures = Vec::new();
    for h in &view.hosts {
        let Some(report) = &h.report else { continue };
        for phase in PHASES {
            phases.push((
                format!("{{host=\"{}\",phase=\"{phase}\"}}", label(&h.host)),
                flag(report.phase == phase),
            ));
        }
        if let Some(error) = &report.error {
            failures.push((
                format!(
                    "{{host=\"{}\",code=\"{}\"}}",
                    label(&h.host),
                    label(&error.code)
                ),
                1.0,
            ));
        }
    }
    family(
        "fleet_host_phase",
        "gauge",
        "The host's deploy phase (1 for the current one).",
        phases,
    );
    family(
        "fleet_host_failure",
        "gauge",
        "1 for the reason code of the error standing on a host.",
        failures,
    );
    family(
        "fleet_collector_reports_total",
        "counter",
        "Reports received since the collector started, by result.",
        collector
            .counts()
            .into_iter()
            .map(|(result, n)| (format!("{{result=\"{result}\"}}"), n as f64))
            .collect(),
    );
    Ok(out)
}
