//! The fleet benchmark (`bench/fleet`, ignored by the test run): N real agent daemons, each in
//! its own network namespace behind one NAT router and with its own chroot store, against the
//! HTTP channel, the binary cache over HTTP, a collector and release format 2; a sequence of
//! releases, each changing every host. Per release: release-to-committed per host (median, p95,
//! max) against the poll interval, until the collector shows every host healthy on it, bytes the
//! channel and the cache served, and the agents' and the collector's RSS and CPU.
//!
//! Settings from the environment: FLEET_BENCH_HOSTS (50), FLEET_BENCH_RELEASES (3),
//! FLEET_BENCH_POLL (poll interval and splay, 10s); FLEET_AGENT to run another agent build (bench/fleet
//! passes the release build). Prints a table on stderr and JSON on stdout.

use crate::common::{Channel, Fleet};
use fleet_tests::collector::Collector;
use fleet_tests::netns::NatNetwork;
use fleet_tests::{run, KillOnDrop};
use std::time::{Duration, Instant};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect(name))
}

/// (resident KiB, CPU seconds) of a process.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    (rss, ticks as f64 / 100.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// N agent daemons behind a NAT router, each in its own namespace with its own chroot store,
/// following the HTTP channel and reporting to a collector; every host's report key (and
/// `wave(i)`, when given) in fleet.toml. Polls every `poll` seconds with as much splay.
pub struct NatFleet {
    pub fleet: Fleet,
    pub names: Vec<String>,
    pub hosts: Vec<fleet_tests::host::SimHost>,
    pub collector: Collector,
    /// fleet.toml
    pub config: String,
    pub agents: Vec<KillOnDrop>,
    // Last: the namespaces go after the agents in them.
    pub net: NatNetwork,
}

impl NatFleet {
    pub fn start(n: usize, poll: u64, wave: impl Fn(usize) -> Option<u32>) -> Self {
        let net = NatNetwork::new(n);
        let names: Vec<String> = (0..n).map(|i| format!("h{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut fleet = Fleet::new_on(&refs, &net.server_ip());
        let started = Instant::now();
        let hosts: Vec<_> = names
            .iter()
            .map(|name| fleet.host(name, Channel::Http))
            .collect();
        let keys = [fleet.release_public_key()];
        let url = fleet.channel_url(Channel::Http);
        let collector = Collector::start_on(
            &format!("{}:0", net.server_ip()),
            &fleet.dir.join("collector.db"),
            &fleet.channel_dir.display().to_string(),
            &fleet.release_public_key(),
        );
        // Every host's report key goes into the release (fleet.toml), as an operator's would.
        let mut toml = String::new();
        for (i, host) in hosts.iter().enumerate() {
            let key = run(host.agent(&["identity"])).ok().stdout.trim().to_owned();
            toml += &format!("[hosts.{}]\nreport_key = \"{key}\"\n", host.name);
            if let Some(wave) = wave(i) {
                toml += &format!("wave = {wave}\n");
            }
            host.write_config(
                &fleet.settings(&keys, 1, &url),
                // A splay as long as the interval, as a real fleet would have: no lockstep.
                &format!("poll_interval = \"{poll}s\"\npoll_splay = \"{poll}s\""),
                &format!("[report]\nurl = \"{}\"\n", collector.url),
            );
        }
        let config = fleet.dir.join("fleet.toml");
        std::fs::write(&config, toml).unwrap();
        let config = config.display().to_string();
        eprintln!(
            "{n} hosts set up in {:.0} s",
            started.elapsed().as_secs_f64()
        );
        let agents: Vec<KillOnDrop> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
                KillOnDrop(
                    host.agent_in_netns(&net.host(i), &["run"])
                        .stderr(log)
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        Self {
            fleet,
            names,
            hosts,
            collector,
            config,
            agents,
            net,
        }
    }
}

#[test]
#[ignore = "a benchmark: bench/fleet runs it"]
fn fleet_benchmark() {
    let n = setting("FLEET_BENCH_HOSTS", 50) as usize;
    let releases = setting("FLEET_BENCH_RELEASES", 3);
    let poll = setting("FLEET_BENCH_POLL", 10);
    // The namespaces first, so they are dropped last, after the agents in them.
    let NatFleet {
        net: _net,
        mut fleet,
        names,
        hosts,
        collector,
        config,
        agents,
    } = NatFleet::start(n, poll, |i| {
        // For the rollout at the end: 10 % canaries, then 30 %, then the rest.
        Some(if i * 10 < n {
            0
        } else if i * 10 < n * 4 {
            1
        } else {
            2
        })
    });
    // Let every agent make its first poll (an empty channel) and settle.
    std::thread::sleep(Duration::from_secs(poll + 2));
    let idle: Vec<(u64, f64)> = agents.iter().map(|a| usage(a.0.id())).collect();

    let mut rows = Vec::new();
    for release in 1..=releases {
        for name in &names {
            fleet
                .fleet
                .set(name, |h| h.version = format!("bench-{release}"));
        }
        fleet.fleet.commit(&format!("release {release}"));
        let (www, cache) = (fleet.www.bytes_served(), fleet.cache_server.bytes_served());
        let built = Instant::now();
        fleet.release(&["--format", "2", "--config", &config]).ok();
        let published = Instant::now();
        let build_seconds = (published - built).as_secs_f64();
        let list: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fleet.channel_dir.join(fleet_agent::release::HOSTS_FILE)).unwrap(),
        )
        .unwrap();
        let wanted: Vec<String> = names
            .iter()
            .map(|n| list["hosts"][n]["toplevel"].as_str().unwrap().to_owned())
            .collect();
        let mut done: Vec<Option<f64>> = vec![None; n];
        let deadline = published + Duration::from_secs(poll * 3 + 120 + n as u64);
        while done.iter().any(Option::is_none) && Instant::now() < deadline {
            for (i, host) in hosts.iter().enumerate() {
                if done[i].is_none() {
                    let path = host.state_dir.join("state.json");
                    let committed = std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_some_and(|s| s["last_good"] == wanted[i].as_str());
                    if committed {
                        done[i] = Some(published.elapsed().as_secs_f64());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut times: Vec<f64> = done.iter().flatten().copied().collect();
        times.sort_by(f64::total_cmp);
        assert_eq!(
            times.len(),
            n,
            "release {release}: not every host committed in time"
        );
        // What the operator sees: every host healthy on the new release at the collector.
        let all_reported = || {
            let view = collector.fleet();
            let listed: Vec<&serde_json::Value> = view["hosts"]
                .as_array()
                .map(|hosts| hosts.iter().filter(|h| h["listed"] == true).collect())
                .unwrap_or_default();
            listed.len() == n
                && listed
                    .iter()
                    .all(|h| h["health"] == "ok" && h["report"]["committed"] == release)
        };
        while !all_reported() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(
            all_reported(),
            "release {release}: the collector does not show every host healthy"
        );
        let reported = published.elapsed().as_secs_f64();
        let usage: Vec<(u64, f64)> = agents.iter().map(|a| usage(a.0.id())).collect();
        rows.push(serde_json::json!({
            "release": release,
            "hosts": n,
            "poll_interval_s": poll,
            "fleet_sign_release_s": build_seconds,
            "committed_s": {
                "median": percentile(&times, 0.5),
                "p95": percentile(&times, 0.95),
                "max": times[n - 1],
            },
            "all_healthy_at_collector_s": reported,
            "channel_bytes": fleet.www.bytes_served() - www,
            "cache_bytes": fleet.cache_server.bytes_served() - cache,
            "agent_rss_kib_max": usage.iter().map(|u| u.0).max(),
            "agent_cpu_s_total": usage.iter().map(|u| u.1).sum::<f64>(),
            "collector_rss_kib": collector.pid().map(|pid| self::usage(pid).0),
        }));
    }
    // A rollout in three waves, each promoted once the collector shows the waves out healthy
    // for a soak as long as the poll interval: from `fleet-sign rollout` to every wave healthy.
    for name in &names {
        fleet
            .fleet
            .set(name, |h| h.version = "bench-rollout".into());
    }
    fleet.fleet.commit("rollout");
    let soak = format!("{poll}s");
    let started = Instant::now();
    let out = crate::rollout::rollout(
        &fleet,
        &config,
        &collector.url,
        &[
            "--wait-healthy",
            "--soak",
            &soak,
            "--interval",
            "1s",
            "--format",
            "2",
        ],
    );
    out.ok();
    let rollout_s = started.elapsed().as_secs_f64();
    let waves: Vec<String> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("wave "))
        .map(str::to_owned)
        .collect();
    eprintln!(
        "rollout in 3 waves, soak {poll} s: every wave healthy {rollout_s:.1} s after fleet-sign \
         rollout started ({})",
        waves.join("; ")
    );
    let idle_rss: Vec<u64> = idle.iter().map(|u| u.0).collect();
    eprintln!(
        "\n{n} agents, poll interval {poll} s, idle RSS {}..{} KiB",
        idle_rss.iter().min().unwrap(),
        idle_rss.iter().max().unwrap()
    );
    eprintln!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12} {:>11} {:>10}",
        "release",
        "sign (s)",
        "median",
        "p95",
        "max",
        "all ok",
        "channel B",
        "cache B",
        "max RSS KiB",
        "CPU s"
    );
    for row in &rows {
        eprintln!(
            "{:>7} {:>9.1} {:>8.1}s {:>8.1}s {:>8.1}s {:>8.1}s {:>12} {:>12} {:>11} {:>10.1}",
            row["release"],
            row["fleet_sign_release_s"].as_f64().unwrap(),
            row["committed_s"]["median"].as_f64().unwrap(),
            row["committed_s"]["p95"].as_f64().unwrap(),
            row["committed_s"]["max"].as_f64().unwrap(),
            row["all_healthy_at_collector_s"].as_f64().unwrap(),
            row["channel_bytes"],
            row["cache_bytes"],
            row["agent_rss_kib_max"],
            row["agent_cpu_s_total"].as_f64().unwrap()
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "hosts": n,
            "poll_interval_s": poll,
            "idle_rss_kib_max": idle_rss.iter().max(),
            "releases": rows,
            "rollout_three_waves_s": rollout_s,
            "rollout_soak_s": poll,
        }))
        .unwrap()
    );
}
