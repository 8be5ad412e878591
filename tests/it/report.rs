//! Reports home: hosts sign their state, queue it on disk and POST it to `fleet-sign collect`,
//! which checks it against the keys in the signed release and keeps the latest per host.

use crate::common::{Channel, Fleet};
use fleet_tests::collector::{report, test_key, Collector, PaperFleet};
use fleet_tests::host::SimHost;
use fleet_tests::netns::NatNetwork;
use fleet_tests::{command, free_port, run, run_measuring_peak, wait_until};
use std::path::{Path, PathBuf};

/// A fleet whose hosts made their identities, with a fleet.toml listing their report keys.
fn reporting_fleet(names: &[&str]) -> (Fleet, Vec<SimHost>, PathBuf) {
    reporting_fleet_with(Fleet::new(names), names, Channel::Directory)
}

fn reporting_fleet_with(
    mut fleet: Fleet,
    names: &[&str],
    channel: Channel,
) -> (Fleet, Vec<SimHost>, PathBuf) {
    let hosts: Vec<SimHost> = names.iter().map(|n| fleet.host(n, channel)).collect();
    let mut toml = String::new();
    for host in &hosts {
        let key = run(host.agent(&["identity"])).ok().stdout.trim().to_owned();
        assert!(key.starts_with(&format!("{}:", host.name)), "{key}");
        // The key is made once and kept.
        assert_eq!(run(host.agent(&["identity"])).stdout.trim(), key);
        toml += &format!("[hosts.{}]\nreport_key = \"{key}\"\n", host.name);
    }
    let config = fleet.dir.join("fleet.toml");
    std::fs::write(&config, toml).unwrap();
    (fleet, hosts, config)
}

/// Releases version `version` of every host (with `behaviour` for `bad`).
fn release(fleet: &mut Fleet, config: &Path, names: &[&str], version: &str, bad: &[&str]) {
    for name in names {
        fleet.fleet.set(name, |h| {
            h.version = version.into();
            h.behaviour = if bad.contains(name) { "fail" } else { "ok" }.into();
        });
    }
    fleet.fleet.commit(&format!("version {version}"));
    fleet.release(&["--config", config.to_str().unwrap()]).ok();
}

/// Points a host at the collector (and a metrics directory).
fn report_to(fleet: &Fleet, host: &SimHost, url: &str, extra: &str) -> PathBuf {
    report_to_with(fleet, host, Channel::Directory, url, extra)
}

fn report_to_with(
    fleet: &Fleet,
    host: &SimHost,
    channel: Channel,
    url: &str,
    extra: &str,
) -> PathBuf {
    report_to_with_top(fleet, host, channel, "", url, extra)
}

/// [`report_to_with`], with `top` added to the config's top level.
fn report_to_with_top(
    fleet: &Fleet,
    host: &SimHost,
    channel: Channel,
    top: &str,
    url: &str,
    extra: &str,
) -> PathBuf {
    let keys = [fleet.release_public_key()];
    let channel = fleet.channel_url(channel);
    let metrics = host.state_dir.parent().unwrap().join("metrics");
    host.write_config(
        &fleet.settings(&keys, 1, &channel),
        top,
        &format!(
            "metrics_dir = \"{}\"\n[report]\nurl = \"{url}\"\ntimeout = \"2s\"\n{extra}",
            metrics.display()
        ),
    );
    metrics.join("fleet-agent.prom")
}

/// A collector for a paper fleet, its database in `dir`.
fn paper_collector(dir: &fleet_tests::TestDir, paper: &PaperFleet) -> Collector {
    Collector::start(
        &dir.join("fleet.db"),
        &paper.channel_dir.display().to_string(),
        &paper.release_public_key(),
    )
}

fn events(history: &[serde_json::Value]) -> Vec<String> {
    history
        .iter()
        .map(|h| {
            let r = &h["report"];
            format!(
                "{} {}",
                r["event"].as_str().unwrap(),
                r["phase"].as_str().unwrap()
            )
        })
        .collect()
}

fn counters(history: &[serde_json::Value]) -> Vec<u64> {
    history
        .iter()
        .map(|h| h["counter"].as_u64().unwrap())
        .collect()
}

#[test]
fn reports_reach_the_collector_and_status_shows_the_fleet() {
    let names = ["a", "b"];
    let (mut fleet, hosts, config) = reporting_fleet(&names);
    release(&mut fleet, &config, &names, "2", &["b"]);
    let collector = Collector::start(
        &fleet.dir.join("collector/fleet.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    let metrics_a = report_to(&fleet, &hosts[0], &collector.url, "");
    report_to(&fleet, &hosts[1], &collector.url, "");
    let a2 = fleet.fleet.build("a");

    let (code, outcome) = hosts[0].once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed");
    let (code, outcome) = hosts[1].once_outcome();
    assert_eq!(code, Some(4), "{outcome}");

    // The collector holds each host's latest state.
    let a = collector.host("a");
    assert_eq!(a["health"], "ok", "{a}");
    assert_eq!(a["listed"], true);
    assert_eq!(
        a["peer"].as_str().unwrap().split(':').next(),
        Some("127.0.0.1")
    );
    assert_eq!(a["report"]["committed"], 1);
    assert_eq!(a["report"]["last_good"], a2.as_str());
    assert_eq!(a["report"]["current"], a2.as_str());
    assert_eq!(a["report"]["outcome"], "committed");
    let b = collector.host("b");
    assert_eq!(b["health"], "failing", "{b}");
    assert_eq!(b["report"]["error"]["code"], "switch_failed");
    assert_eq!(b["report"]["outcome"], "rolled-back");
    assert_eq!(b["report"]["committed"], serde_json::Value::Null);

    // Every phase change arrived, in order, with rising counters.
    let history = collector.history("a");
    assert_eq!(
        events(&history),
        [
            "phase realising",
            "phase trial",
            "phase health",
            "phase committing",
            "phase idle",
            "outcome idle"
        ]
    );
    let c = counters(&history);
    assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}");
    assert_eq!(
        events(&collector.history("b")),
        [
            "phase realising",
            "phase trial",
            "phase rolling-back",
            "outcome idle"
        ]
    );
    // Nothing stays queued on the hosts.
    for host in &hosts {
        let status = run(host.agent(&["status", "--json"])).ok().stdout.clone();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["reports_queued"], 0, "{status}");
    }

    // The operator's table.
    let mut c = command("fleet-sign");
    c.args(["status", "--collector", &collector.url]);
    let table = run(c).ok().stdout.clone();
    let line = |host: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{host} ")))
            .unwrap_or_else(|| panic!("no row for {host}:\n{table}"))
            .to_owned()
    };
    assert!(table.starts_with("fleet home: release 1"), "{table}");
    assert!(line("a").contains(" ok "), "{table}");
    assert!(line("a").contains("idle"), "{table}");
    assert!(line("b").contains("failing"), "{table}");
    assert!(line("b").contains("switch_failed"), "{table}");
    // RELEASE is the newest release a host verified, also when it rolled that release back.
    let column = |host: &str, n: usize| line(host).split_whitespace().nth(n).unwrap().to_owned();
    assert!(
        table.lines().nth(1).unwrap().starts_with("HOST  RELEASE "),
        "{table}"
    );
    assert_eq!(column("a", 1), "1", "{table}");
    assert_eq!(column("b", 1), "1", "{table}");
    assert!(!table.contains('\x1b'), "no colour when not on a terminal");
    let mut c = command("fleet-sign");
    c.args(["status", "--json", "--collector", &collector.url]);
    let view: serde_json::Value = serde_json::from_str(&run(c).ok().stdout).unwrap();
    assert_eq!(view["hosts"].as_array().unwrap().len(), 2);

    // Prometheus: the whole fleet from the collector.
    let (status, text) = collector.get("/metrics");
    assert_eq!(status, 200);
    for needle in [
        "fleet_release_serial 1",
        "fleet_host_up_to_date{host=\"a\"} 1",
        "fleet_host_up_to_date{host=\"b\"} 0",
        "fleet_host_healthy{host=\"b\"} 0",
        "fleet_host_failure{host=\"b\",code=\"switch_failed\"} 1",
        "fleet_host_phase{host=\"a\",phase=\"idle\"} 1",
        "fleet_host_release_serial{host=\"a\"} 1",
        "fleet_collector_reports_total{result=\"accepted\"} 10",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
    // And each host's own textfile for node_exporter.
    let text = std::fs::read_to_string(&metrics_a).unwrap();
    for needle in [
        "fleet_agent_release_serial{host=\"a\"} 1",
        "fleet_agent_accepted_serial{host=\"a\"} 1",
        "fleet_agent_phase{host=\"a\",phase=\"idle\"} 1",
        "fleet_agent_phase{host=\"a\",phase=\"trial\"} 0",
        "fleet_agent_failure{host=\"a\",code=\"\"} 0",
        "fleet_agent_reboot_needed{host=\"a\"} 0",
        "fleet_agent_step_duration_seconds{host=\"a\",step=\"realise\"}",
        "fleet_agent_reports_queued{host=\"a\"} ",
        "fleet_agent_last_success_timestamp_seconds{host=\"a\"}",
    ] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
}

#[test]
fn reports_wait_on_disk_while_the_collector_is_down_and_arrive_in_order() {
    let names = ["a"];
    let (mut fleet, hosts, config) = reporting_fleet(&names);
    let host = &hosts[0];
    release(&mut fleet, &config, &names, "2", &[]);
    let v2 = fleet.fleet.build("a");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    report_to(&fleet, host, &url, "heartbeat = \"3s\"\n");

    // The daemon deploys with nobody listening: its reports pile up on disk.
    let _agent = fleet_tests::KillOnDrop(host.agent(&["run"]).spawn().unwrap());
    wait_until("the release is committed", 60, || {
        host.generation().as_deref() == Some(v2.as_str())
    });
    let queue = host.state_dir.join("reports");
    wait_until("the outcome report is queued", 10, || {
        std::fs::read_dir(&queue).unwrap().count() >= 7
    });
    host.assert_on(&v2);

    // The collector comes up: the queue drains oldest first, then heartbeats follow.
    let collector = Collector::start_on(
        &format!("127.0.0.1:{port}"),
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    wait_until("the host's heartbeat arrives", 60, || {
        events(&collector.history("a"))
            .iter()
            .any(|e| e == "heartbeat idle")
    });
    let history = collector.history("a");
    let events = events(&history);
    assert_eq!(
        events[..7],
        [
            "start idle",
            "phase realising",
            "phase trial",
            "phase health",
            "phase committing",
            "phase idle",
            "outcome idle"
        ],
        "{events:?}"
    );
    assert_eq!(history[6]["report"]["outcome"], "committed");
    // After that only the next cycle's news (up to date) and heartbeats.
    assert!(
        events[7..]
            .iter()
            .all(|e| e == "heartbeat idle" || e == "outcome idle"),
        "{events:?}"
    );
    let c = counters(&history);
    assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}");
    assert_eq!(collector.host("a")["report"]["last_good"], v2.as_str());
    wait_until("the queue is empty", 10, || {
        std::fs::read_dir(&queue)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().len() == 20
            })
            .count()
            == 0
    });
}

#[test]
fn forged_replayed_cross_host_oversized_and_malformed_reports_change_nothing() {
    let dir = fleet_tests::TestDir::new();
    let paper = PaperFleet::new(dir.path(), 2);
    let collector = paper_collector(&dir, &paper);
    let (body, signature) = paper.report(0, 100);
    let (status, answer) = collector.post(&body, Some(&signature));
    assert_eq!(status, 200, "{answer}");
    let before = collector.fleet();
    let history_before = collector.history("host0");
    assert_eq!(history_before.len(), 1);

    let expect = |what: &str, (status, answer): (u16, String), want_status: u16, code: &str| {
        assert_eq!(status, want_status, "{what}: {answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["error"], code, "{what}: {answer}");
    };
    let host0 = &paper.hosts[0].1;
    let host1 = &paper.hosts[1].1;
    expect(
        "replay",
        collector.post(&body, Some(&signature)),
        409,
        "replay",
    );
    let (old, old_sig) = paper.report(0, 99);
    expect(
        "older counter",
        collector.post(&old, Some(&old_sig)),
        409,
        "replay",
    );
    let (forged, forged_sig) = report("host0", 200).sign(&test_key("host0", 666));
    expect(
        "forged",
        collector.post(&forged, Some(&forged_sig)),
        403,
        "forged",
    );
    let (cross, cross_sig) = report("host0", 201).sign(host1);
    expect(
        "cross-host",
        collector.post(&cross, Some(&cross_sig)),
        403,
        "cross_host",
    );
    // Valid bytes, but the signature header names host0's key over host1's body.
    let (stolen, _) = report("host1", 202).sign(host1);
    expect(
        "another host's body",
        collector.post(&stolen, Some(&signature)),
        403,
        "forged",
    );
    let (unknown, unknown_sig) = report("host9", 203).sign(&test_key("host9", 9));
    expect(
        "unknown host",
        collector.post(&unknown, Some(&unknown_sig)),
        403,
        "unknown_host",
    );
    let mut big = report("host0", 204);
    big.outcome = Some("x".repeat(70 << 10));
    let (big, big_sig) = big.sign(host0);
    expect(
        "oversized",
        collector.post(&big, Some(&big_sig)),
        413,
        "too_large",
    );
    let junk = b"{\"format\":1,\"not\":\"a report\"}";
    let junk_sig = fleet_agent::release::Signature {
        key_name: "host0".into(),
        bytes: host0.sign(&fleet_agent::report::wire::signed_message(junk)),
    }
    .to_line();
    expect(
        "malformed",
        collector.post(junk, Some(&junk_sig)),
        400,
        "malformed",
    );
    expect(
        "not JSON",
        collector.post(b"\xff\xfe garbage", Some(&junk_sig)),
        400,
        "malformed",
    );
    let (unsigned, _) = paper.report(0, 205);
    expect(
        "unsigned",
        collector.post(&unsigned, None),
        400,
        "no_signature",
    );
    let mut other_fleet = report("host0", 206);
    other_fleet.fleet = "work".into();
    let (other_fleet, other_sig) = other_fleet.sign(host0);
    expect(
        "wrong fleet",
        collector.post(&other_fleet, Some(&other_sig)),
        400,
        "wrong_fleet",
    );

    // Nothing changed: not the latest report, not the history, not another host.
    let mut after = collector.fleet();
    after["now"] = before["now"].clone();
    assert_eq!(after, before);
    assert_eq!(collector.history("host0"), history_before);
    assert!(collector.history("host1").is_empty());
    let (_, metrics) = collector.get("/metrics");
    for needle in [
        "result=\"replay\"} 2",
        "result=\"forged\"} 2",
        "result=\"cross_host\"} 1",
        "result=\"too_large\"} 1",
        "result=\"malformed\"} 2",
        "result=\"accepted\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in:\n{metrics}");
    }
    // A genuine, newer report still goes through.
    let (body, signature) = paper.report(0, 300);
    assert_eq!(collector.post(&body, Some(&signature)).0, 200);
}

#[test]
fn a_collector_killed_mid_write_keeps_every_report_it_acknowledged() {
    let dir = fleet_tests::TestDir::new();
    let paper = std::sync::Arc::new(PaperFleet::new(dir.path(), 8));
    let mut collector = Collector::start(
        &dir.join("fleet.db"),
        &paper.channel_dir.display().to_string(),
        &paper.release_public_key(),
    );
    let url = collector.url.clone();
    // Eight hosts post as fast as they can; the collector dies under them.
    let senders: Vec<_> = (0..paper.hosts.len())
        .map(|i| {
            let paper = paper.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                let mut acknowledged = Vec::new();
                for counter in 1..=50u64 {
                    let (body, signature) = paper.report(i, counter);
                    let sent = std::panic::catch_unwind(|| {
                        fleet_tests::collector::request(
                            &url,
                            "POST",
                            "/v1/report",
                            &[("Fleet-Signature", &signature)],
                            &body,
                        )
                    });
                    match sent {
                        Ok((200, _)) => acknowledged.push(counter),
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    wait_until("some reports are in", 30, || {
        collector.history("host0").len() >= 5
    });
    collector.kill();
    let acknowledged: Vec<Vec<u64>> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    assert!(
        acknowledged.iter().map(Vec::len).sum::<usize>() >= 5,
        "{acknowledged:?}"
    );

    collector.restart();
    for (i, acked) in acknowledged.iter().enumerate() {
        let name = &paper.hosts[i].0;
        let stored = counters(&collector.history(name));
        for counter in acked {
            assert!(
                stored.contains(counter),
                "{name}: report {counter} was acknowledged but is gone after kill -9 \
                 (stored {stored:?})"
            );
        }
    }
    // The replay floor survived too.
    let (body, signature) = paper.report(0, acknowledged[0].last().copied().unwrap_or(0).max(1));
    let (status, _) = collector.post(&body, Some(&signature));
    assert_ne!(
        status, 200,
        "an old counter was accepted again after the restart"
    );
}

#[test]
fn many_hosts_reporting_at_once_are_all_stored() {
    let dir = fleet_tests::TestDir::new();
    let hosts = 200;
    let paper = std::sync::Arc::new(PaperFleet::new(dir.path(), hosts));
    let collector = paper_collector(&dir, &paper);
    let threads = 16;
    let rounds = 5u64;
    let senders: Vec<_> = (0..threads)
        .map(|t| {
            let paper = paper.clone();
            let url = collector.url.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for round in 1..=rounds {
                    for i in (t..hosts).step_by(threads) {
                        let (body, signature) = paper.report(i, round);
                        let (status, _) = fleet_tests::collector::request(
                            &url,
                            "POST",
                            "/v1/report",
                            &[("Fleet-Signature", &signature)],
                            &body,
                        );
                        statuses.push(status);
                    }
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = senders
        .into_iter()
        .flat_map(|s| s.join().unwrap())
        .collect();
    assert_eq!(statuses.len(), hosts * rounds as usize);
    assert!(statuses.iter().all(|s| *s == 200), "not all accepted");
    let view = collector.fleet();
    let hosts_seen = view["hosts"].as_array().unwrap();
    assert_eq!(hosts_seen.len(), hosts);
    assert!(hosts_seen
        .iter()
        .all(|h| h["report"]["counter"] == rounds && h["health"] == "behind"));
    assert_eq!(counters(&collector.history("host7")), [1, 2, 3, 4, 5]);
}

#[test]
fn a_release_with_new_keys_is_adopted_and_an_older_one_is_not() {
    let dir = fleet_tests::TestDir::new();
    let paper = PaperFleet::new(dir.path(), 1);
    let collector = paper_collector(&dir, &paper);
    let (body, signature) = paper.report(0, 1);
    assert_eq!(collector.post(&body, Some(&signature)).0, 200);

    // The host was reinstalled: a new key in release 2. Its counters start over.
    let (document, _) = (
        std::fs::read(paper.channel_dir.join("release.json")).unwrap(),
        (),
    );
    let mut release: fleet_agent::release::Release = serde_json::from_slice(&document).unwrap();
    let old_document = document.clone();
    let old_signatures = std::fs::read(paper.channel_dir.join("release.json.sig")).unwrap();
    let new_key = test_key("host0", 4242);
    release.serial = 2;
    release.hosts.get_mut("host0").unwrap().report_key = Some(new_key.public().to_string());
    let document = serde_json::to_vec(&release).unwrap();
    let signatures =
        fleet_agent::release::SignatureFile::sign(&document, &[&paper.release_key]).render();
    std::fs::write(paper.channel_dir.join("release.json"), &document).unwrap();
    std::fs::write(paper.channel_dir.join("release.json.sig"), signatures).unwrap();
    wait_until("the collector adopts release 2", 20, || {
        collector.fleet()["release"]["serial"] == 2
    });
    let (body, signature) = report("host0", 1).sign(&new_key);
    assert_eq!(collector.post(&body, Some(&signature)).0, 200);
    let (body, signature) = paper.report(0, 500);
    assert_eq!(
        collector.post(&body, Some(&signature)).0,
        403,
        "old key still accepted"
    );

    // Someone puts release 1 back in the channel: the collector keeps release 2's keys.
    std::fs::write(paper.channel_dir.join("release.json"), old_document).unwrap();
    std::fs::write(paper.channel_dir.join("release.json.sig"), old_signatures).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(collector.fleet()["release"]["serial"], 2);
    let (body, signature) = paper.report(0, 501);
    assert_eq!(collector.post(&body, Some(&signature)).0, 403);
}

#[test]
fn hosts_behind_nat_reach_channel_cache_and_collector_and_nothing_reaches_them() {
    let net = NatNetwork::new(2);
    let names = ["a", "b"];
    let fleet = Fleet::new_on(&names, &net.server_ip());
    let (mut fleet, hosts, config) = reporting_fleet_with(fleet, &names, Channel::Http);
    release(&mut fleet, &config, &names, "2", &[]);
    let collector = Collector::start_on(
        &format!("{}:0", net.server_ip()),
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    let mut agents = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        report_to_with(&fleet, host, Channel::Http, &collector.url, "");
        agents.push(fleet_tests::KillOnDrop(
            host.agent_in_netns(&net.host(i), &["run"]).spawn().unwrap(),
        ));
    }
    let wanted: Vec<String> = names.iter().map(|n| fleet.fleet.build(n)).collect();
    wait_until("both hosts report the release committed", 90, || {
        names.iter().zip(&wanted).all(|(name, top)| {
            let host = collector.host(name);
            host["health"] == "ok" && host["report"]["last_good"] == top.as_str()
        })
    });
    for (host, top) in hosts.iter().zip(&wanted) {
        host.assert_on(top);
    }

    // Everything the hosts asked for came through the router's one WAN address.
    let router = net.router_wan_ip();
    for name in names {
        let peer = collector.host(name)["peer"].as_str().unwrap().to_owned();
        assert_eq!(peer.split(':').next(), Some(router.as_str()), "{name}");
    }
    let peers = |server: &fleet_tests::http::HttpServer| {
        let mut p: Vec<String> = server.peers().iter().map(ToString::to_string).collect();
        p.dedup();
        p
    };
    assert_eq!(peers(&fleet.www), std::slice::from_ref(&router));
    assert_eq!(peers(&fleet.cache_server), std::slice::from_ref(&router));

    // The agents listen on nothing.
    for i in 0..names.len() {
        assert_eq!(net.listening(i), Vec::<String>::new(), "host {i} listens");
    }
    // Nothing from the WAN side reaches a host, even with a route to it and a listener there.
    let _listener = fleet_tests::KillOnDrop(
        net.command_in(0, std::path::Path::new("python3"))
            .args(["-m", "http.server", "--bind", "0.0.0.0", "8000"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let connect = |mut command: std::process::Command| {
        command
            .args([
                "-c",
                &format!(
                    "import socket; socket.create_connection(('{}', 8000), timeout=2)",
                    net.host_ip(0)
                ),
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    wait_until("the listener is up (seen from the router)", 10, || {
        connect(net.command_in_router("python3"))
    });
    let lan = net.host_ip(0).rsplit_once('.').unwrap().0.to_owned() + ".0/24";
    let route = |action: &str| {
        std::process::Command::new("ip")
            .args(["route", action, &lan, "via", &router])
            .output()
            .unwrap()
    };
    assert!(route("add").status.success());
    let reached = connect(std::process::Command::new("python3"));
    route("del");
    assert!(
        !reached,
        "a connection from the WAN side reached a host behind the NAT"
    );

    // The operator's view.
    let mut c = command("fleet-sign");
    c.args(["status", "--collector", &collector.url]);
    let table = run(c).ok().stdout.clone();
    for name in names {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains(" ok ")),
            "{table}"
        );
    }
}

#[test]
fn a_host_in_safe_mode_says_so_instead_of_falling_silent() {
    let names = ["a"];
    let (mut fleet, hosts, config) = reporting_fleet(&names);
    let host = &hosts[0];
    let v1 = fleet.fleet.build("a");
    release(&mut fleet, &config, &names, "2", &[]);
    let collector = Collector::start(
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    report_to(&fleet, host, &collector.url, "");
    std::fs::create_dir_all(&host.state_dir).unwrap();
    std::fs::write(host.state_dir.join("state.json"), b"{ not json").unwrap();

    let _agent = fleet_tests::KillOnDrop(host.agent(&["run"]).spawn().unwrap());
    wait_until("the collector hears about safe mode", 30, || {
        collector.host("a")["report"]["error"]["code"] == "safe_mode"
    });
    let a = collector.host("a");
    assert_eq!(a["health"], "failing", "{a}");
    assert_eq!(a["report"]["current"], v1.as_str());
    host.assert_on(&v1);
}

#[test]
fn a_host_sending_too_fast_is_held_to_its_rate_and_others_are_not() {
    let dir = fleet_tests::TestDir::new();
    let paper = PaperFleet::new(dir.path(), 2);
    let collector = paper_collector(&dir, &paper);
    let mut accepted = 0;
    let mut limited = 0;
    for counter in 1..=90 {
        let (body, signature) = paper.report(0, counter);
        let (status, answer) = collector.post(&body, Some(&signature));
        match status {
            200 => accepted += 1,
            429 => {
                assert!(answer.contains("rate_limited"), "{answer}");
                limited += 1;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    // A burst of 60, then about one a second.
    assert!((60..=70).contains(&accepted), "accepted {accepted}");
    assert_eq!(accepted + limited, 90);
    assert_eq!(collector.history("host0").len(), accepted.min(100));
    // The other host's budget is its own.
    let (body, signature) = paper.report(1, 1);
    assert_eq!(collector.post(&body, Some(&signature)).0, 200);
}

#[test]
fn the_last_health_results_outlive_a_restart_of_the_agent() {
    let names = ["a"];
    let (mut fleet, hosts, config) = reporting_fleet(&names);
    let host = &hosts[0];
    release(&mut fleet, &config, &names, "2", &[]);
    let collector = Collector::start(
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    let metrics = report_to(&fleet, host, &collector.url, "");
    let (code, outcome) = host.once_outcome();
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    let checks = |text: &str| text.contains("fleet_agent_health_check_ok{");
    assert!(checks(&std::fs::read_to_string(&metrics).unwrap()));

    // Another process, nothing new to do: its report and metrics still carry the last window.
    let (code2, outcome) = host.once_outcome();
    assert_eq!((code, code2), (Some(0), Some(0)), "{outcome}");
    assert_eq!(outcome["outcome"], "up-to-date", "{outcome}");
    assert!(checks(&std::fs::read_to_string(&metrics).unwrap()));
    assert!(!host.state()["last_health"].as_array().unwrap().is_empty());
    wait_until("the collector has the restarted agent's report", 20, || {
        let report = &collector.host("a")["report"];
        report["outcome"] == "up-to-date"
            && report["health"].as_array().is_some_and(|h| !h.is_empty())
    });
}

#[test]
fn a_collector_answering_an_endless_refusal_costs_the_agent_nothing_more() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    fleet.release(&[]).ok();
    // The channel is a directory; the test server plays the collector.
    let url = fleet.www.url();
    report_to(&fleet, &host, &url, "");
    fleet.www.set_mode(fleet_tests::http::Mode::Status(500));
    let (plain, baseline) = run_measuring_peak(host.agent(&["once", "--json"]));
    assert_eq!(plain.code, Some(0), "{plain}");
    fleet.www.set_mode(fleet_tests::http::Mode::EndlessError);
    let started = std::time::Instant::now();
    let (out, peak) = run_measuring_peak(host.agent(&["once", "--json"]));
    assert_eq!(out.code, Some(0), "{out}");
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    assert!(
        peak < baseline + 8 * 1024,
        "peak RSS {peak} KiB, {baseline} KiB against a plain 500"
    );
    // What the collector did not take stays queued.
    let queued = std::fs::read_dir(host.state_dir.join("reports"))
        .unwrap()
        .count();
    assert!(queued >= 2, "{queued} reports queued");
}

/// Every file and directory below `dirs` with its size and modification and change times: what
/// any write, creation, rename or removal changes.
fn disk_snapshot(dirs: &[&Path]) -> Vec<(PathBuf, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt as _;
    fn walk(path: &Path, out: &mut Vec<(PathBuf, u64, i64, i64)>) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        out.push((
            path.to_path_buf(),
            meta.size(),
            meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
            meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
        ));
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for entry in entries {
                walk(&entry, out);
            }
        }
    }
    let mut out = Vec::new();
    for dir in dirs {
        walk(dir, &mut out);
    }
    out
}

#[test]
fn an_idle_daemon_writes_nothing_to_persistent_storage_while_it_polls_and_reports() {
    let names = ["a"];
    let (mut fleet, hosts, config) = reporting_fleet(&names);
    let host = &hosts[0];
    release(&mut fleet, &config, &names, "2", &[]);
    let v2 = fleet.fleet.build("a");
    let collector = Collector::start(
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    let metrics = report_to_with_top(
        &fleet,
        host,
        Channel::Directory,
        "poll_interval = \"1s\"",
        &collector.url,
        "heartbeat = \"2s\"\n",
    );
    let _agent = fleet_tests::KillOnDrop(host.agent(&["run"]).spawn().unwrap());
    wait_until("the release is committed and reported", 60, || {
        host.generation().as_deref() == Some(v2.as_str())
            && events(&collector.history("a"))
                .iter()
                .any(|e| e == "outcome idle")
    });
    // Let the deploy's last writes and reports settle, then watch an idle stretch.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let persistent = [host.state_dir.as_path(), metrics.parent().unwrap()];
    let before = disk_snapshot(&persistent);
    let heartbeats = |history: &[serde_json::Value]| {
        events(history)
            .iter()
            .filter(|e| *e == "heartbeat idle")
            .count()
    };
    let heard = heartbeats(&collector.history("a"));
    let runtime = host.runtime_dir.join("agent.json");
    let runtime_before = std::fs::metadata(&runtime).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(9));
    let after = disk_snapshot(&persistent);
    // It was busy: about nine polls (agent.json rewritten) and four heartbeats delivered.
    assert!(std::fs::metadata(&runtime).unwrap().modified().unwrap() > runtime_before);
    let heard_now = heartbeats(&collector.history("a"));
    assert!(
        heard_now >= heard + 3,
        "{heard} then {heard_now} heartbeats"
    );
    // And nothing in the state directory or the metrics directory changed.
    let changed: Vec<_> = after
        .iter()
        .filter(|entry| !before.contains(entry))
        .chain(before.iter().filter(|entry| !after.contains(entry)))
        .collect();
    assert!(changed.is_empty(), "changed while idle: {changed:#?}");
    host.assert_on(&v2);
}

#[test]
fn status_counts_each_wave_committed_pending_failed_and_silent() {
    let names = ["a", "b", "c"];
    let (mut fleet, hosts, config) = reporting_fleet(&names);
    let toml = std::fs::read_to_string(&config).unwrap();
    let toml = toml
        .replace("[hosts.a]\n", "[hosts.a]\nwave = 0\n")
        .replace("[hosts.b]\n", "[hosts.b]\nwave = 1\n")
        .replace("[hosts.c]\n", "[hosts.c]\nwave = 1\n");
    std::fs::write(&config, toml).unwrap();
    release(&mut fleet, &config, &names, "2", &["b"]);
    assert_eq!(fleet.published_json()["hosts"]["c"]["wave"], 1);
    let collector = Collector::start(
        &fleet.dir.join("collector/fleet.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    for host in &hosts {
        report_to(&fleet, host, &collector.url, "");
    }
    // a commits, b rolls back, c never polls.
    assert_eq!(hosts[0].once_outcome().1["outcome"], "committed");
    assert_eq!(hosts[1].once_outcome().1["outcome"], "rolled-back");

    let mut c = command("fleet-sign");
    c.args(["status", "--collector", &collector.url]);
    let table = run(c).ok().stdout.clone();
    assert!(
        table.contains("wave 0: 1 committed, 0 pending, 0 failed, 0 silent\n"),
        "{table}"
    );
    assert!(
        table.contains("wave 1: 0 committed, 0 pending, 1 failed, 1 silent\n"),
        "{table}"
    );
    let mut c = command("fleet-sign");
    c.args(["status", "--json", "--collector", &collector.url]);
    let view: serde_json::Value = serde_json::from_str(&run(c).ok().stdout).unwrap();
    assert_eq!(
        view["waves"],
        serde_json::json!([
            {"wave": 0, "committed": 1, "pending": 0, "failed": 0, "silent": 0},
            {"wave": 1, "committed": 0, "pending": 0, "failed": 1, "silent": 1},
        ])
    );
}
