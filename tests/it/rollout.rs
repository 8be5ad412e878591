//! Rollouts in waves, all in signed releases: `release --rollout` moves wave 0, `promote` the
//! next, `pause`/`resume` hold promotion, `abort` gives the hosts moved their previous systems.

use crate::common::{Channel, Fleet};
use fleet_tests::host::SimHost;
use fleet_tests::{command, run, Run};

/// `fleet-sign <op>` on the fleet's two channels with the release key.
fn step(fleet: &Fleet, op: &str) -> Run {
    let mut c = command("fleet-sign");
    c.env("XDG_STATE_HOME", fleet.workstation_state())
        .args([op, "--fleet", "home", "--key"])
        .arg(&fleet.release_key)
        .args(["--channel", &fleet.git_channel(), "--channel"])
        .arg(&fleet.channel_dir);
    run(c)
}

/// A host of the fleet for each name, reading the directory channel.
fn directory_hosts(fleet: &mut Fleet, names: &[&str]) -> Vec<SimHost> {
    names
        .iter()
        .map(|n| fleet.host(n, Channel::Directory))
        .collect()
}

/// Gives every host of `names` system `version` (the one named `failing` fails its switch),
/// commits the flake and returns the new systems, in the order of `names`.
fn new_version(
    fleet: &mut Fleet,
    names: &[impl AsRef<str>],
    version: &str,
    failing: Option<&str>,
) -> Vec<String> {
    for name in names.iter().map(AsRef::as_ref) {
        fleet.fleet.set(name, |h| {
            h.version = version.into();
            h.behaviour = if Some(name) == failing { "fail" } else { "ok" }.into();
        });
    }
    fleet.fleet.commit(&format!("v{version}"));
    names
        .iter()
        .map(|n| fleet.fleet.build(n.as_ref()))
        .collect()
}

#[test]
fn a_rollout_moves_wave_by_wave_holds_when_paused_and_aborts_back() {
    let names = ["a", "b", "c"];
    let mut fleet = Fleet::new(&names);
    let hosts = directory_hosts(&mut fleet, &names);
    let v1: Vec<String> = names.iter().map(|n| fleet.fleet.build(n)).collect();
    let config = fleet.dir.join("fleet.toml");
    std::fs::write(
        &config,
        "[hosts.a]\nwave = 0\n[hosts.b]\nwave = 1\n[hosts.c]\nwave = 2\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    fleet.release(&["--config", &config]).ok();
    let v2 = new_version(&mut fleet, &names, "2", None);

    fleet.release(&["--rollout", "--config", &config]).ok();
    let doc = fleet.published_json();
    assert_eq!(doc["rollout"], serde_json::json!({"active": 0, "waves": 3}));
    assert_eq!(doc["hosts"]["a"]["toplevel"], v2[0].as_str());
    assert_eq!(doc["hosts"]["a"]["previous"], v1[0].as_str());
    for i in [1, 2] {
        assert_eq!(doc["hosts"][names[i]]["toplevel"], v1[i].as_str());
        assert_eq!(doc["hosts"][names[i]]["target"], v2[i].as_str());
    }
    let outcomes = |expected: [&str; 3]| {
        for (host, want) in hosts.iter().zip(expected) {
            let (_, outcome) = host.once_outcome();
            assert_eq!(outcome["outcome"], want, "{}: {outcome}", host.name);
        }
    };
    outcomes(["committed", "up-to-date", "up-to-date"]);
    hosts[0].assert_on(&v2[0]);
    hosts[1].assert_on(&v1[1]);
    hosts[2].assert_on(&v1[2]);

    // No new release over a rollout in progress.
    fleet.release(&[]).fails_with(2, "rollout_active");

    // Wave 1 is promoted, then paused before its host polls: every host stays where it is
    // (b, not moved yet, waits; a, moved, stays), and nothing is promoted.
    step(&fleet, "promote").ok();
    let doc = fleet.published_json();
    assert_eq!(doc["rollout"], serde_json::json!({"active": 1, "waves": 3}));
    assert_eq!(doc["hosts"]["b"]["previous"], v1[1].as_str());
    assert_eq!(doc["hosts"]["b"]["toplevel"], v2[1].as_str());
    step(&fleet, "pause").ok();
    let doc = fleet.published_json();
    assert_eq!(doc["rollout"]["paused"], true);
    for (name, held) in [("a", true), ("b", true), ("c", false)] {
        assert_eq!(doc["hosts"][name].get("held").is_some(), held, "{doc}");
    }
    step(&fleet, "promote").fails_with(2, "rollout_paused");
    outcomes(["up-to-date", "waiting", "up-to-date"]);
    outcomes(["up-to-date", "waiting", "up-to-date"]);
    hosts[0].assert_on(&v2[0]);
    hosts[1].assert_on(&v1[1]);
    assert!(hosts[1].switch_calls().is_empty());

    // Resumed: b moves; wave 2 still waits.
    step(&fleet, "resume").ok();
    let doc = fleet.published_json();
    assert!(doc["hosts"]["b"].get("held").is_none(), "{doc}");
    outcomes(["up-to-date", "committed", "up-to-date"]);
    hosts[1].assert_on(&v2[1]);
    hosts[2].assert_on(&v1[2]);

    // Abort: the moved hosts go back to their previous systems, the waiting one never moved.
    step(&fleet, "abort").ok();
    let doc = fleet.published_json();
    assert!(doc.get("rollout").is_none(), "{doc}");
    for (i, name) in names.iter().enumerate() {
        assert_eq!(doc["hosts"][name]["toplevel"], v1[i].as_str());
        assert!(doc["hosts"][name].get("target").is_none(), "{doc}");
        assert!(doc["hosts"][name].get("previous").is_none(), "{doc}");
    }
    outcomes(["committed", "committed", "up-to-date"]);
    for (host, system) in hosts.iter().zip(&v1) {
        host.assert_on(system);
    }
    assert!(hosts[2].switch_calls().is_empty());
    step(&fleet, "promote").fails_with(2, "no_rollout");

    // A rollout promoted to its end: the next release is free to go.
    fleet.release(&["--rollout", "--config", &config]).ok();
    step(&fleet, "promote").ok();
    step(&fleet, "promote").ok();
    step(&fleet, "promote").fails_with(2, "rollout_complete");
    outcomes(["committed", "committed", "committed"]);
    for (host, system) in hosts.iter().zip(&v2) {
        host.assert_on(system);
    }
    fleet.release(&["--config", &config]).ok();
    let doc = fleet.published_json();
    assert!(doc.get("rollout").is_none(), "{doc}");
    assert!(doc["hosts"]["a"].get("previous").is_none(), "{doc}");
}

/// `fleet-sign rollout` on the fleet's two channels, gated on `collector` (soak 1 s unless
/// `extra` says otherwise).
pub fn rollout(fleet: &Fleet, config: &str, collector: &str, extra: &[&str]) -> Run {
    let defaults = [
        ("--soak", "1s"),
        ("--interval", "300ms"),
        ("--wave-timeout", "60s"),
    ]
    .into_iter()
    .filter(|(flag, _)| !extra.contains(flag))
    .flat_map(|(flag, value)| [flag, value]);
    let args: Vec<&str> = ["--config", config, "--collector", collector]
        .into_iter()
        .chain(defaults)
        .chain(extra.iter().copied())
        .collect();
    let channels = [fleet.git_channel(), fleet.channel_dir.display().to_string()];
    run(fleet.release_command("rollout", &[&fleet.release_key], &channels, &args))
}

#[test]
fn rollout_promotes_each_wave_once_healthy_and_stops_on_a_failed_canary_or_a_silent_host() {
    let names = ["a", "b", "c"];
    let mut fleet = Fleet::new(&names);
    let hosts = directory_hosts(&mut fleet, &names);
    let mut toml = String::new();
    for (wave, host) in hosts.iter().enumerate() {
        let key = run(host.agent(&["identity"])).ok().stdout.trim().to_owned();
        toml += &format!(
            "[hosts.{}]\nwave = {wave}\nreport_key = \"{key}\"\n",
            host.name
        );
    }
    let config = fleet.dir.join("fleet.toml");
    std::fs::write(&config, toml).unwrap();
    let config = config.to_str().unwrap().to_owned();
    fleet.release(&["--config", &config]).ok();
    // The test collector reads the channel every second.
    let collector = fleet_tests::collector::Collector::start(
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    let keys = [fleet.release_public_key()];
    let directory = fleet.channel_url(Channel::Directory);
    // A heartbeat every 2 s: a host that stops is silent at the collector within seconds.
    let mut daemons: Vec<_> = hosts
        .iter()
        .map(|host| {
            host.write_config(
                &fleet.settings(&keys, 1, &directory),
                "poll_interval = \"1s\"\n",
                &format!(
                    "[report]\nurl = \"{}\"\ntimeout = \"2s\"\nheartbeat = \"2s\"\n",
                    collector.url
                ),
            );
            let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
            fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap())
        })
        .collect();
    fleet_tests::wait_until("every host reporting healthy", 30, || {
        names.iter().all(|n| collector.host(n)["health"] == "ok")
    });

    // Every wave healthy in turn, and a person pauses it on the way: nothing is promoted
    // while paused, the rollout goes on after resume and exits 0 once the last wave is healthy
    // too.
    let v2 = new_version(&mut fleet, &names, "2", None);
    let serial = || fleet.published_json()["serial"].as_u64().unwrap();
    let out = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            let extra = ["--wait-healthy", "--soak", "5s"];
            rollout(&fleet, &config, &collector.url, &extra)
        });
        fleet_tests::wait_until("the rollout's first release", 60, || serial() == 2);
        step(&fleet, "pause").ok();
        assert_eq!(serial(), 3);
        std::thread::sleep(std::time::Duration::from_secs(10));
        assert_eq!(serial(), 3, "nothing is promoted while paused");
        assert_eq!(fleet.published_json()["rollout"]["active"], 0);
        step(&fleet, "resume").ok();
        running.join().unwrap()
    });
    out.ok();
    for said in [
        "paused (release 3): waiting for fleet-sign resume",
        "resumed (release 4)",
        "complete",
    ] {
        assert!(out.stderr.contains(said), "{said:?} in {out}");
    }
    for wave in 0..3 {
        assert!(
            out.stderr.contains(&format!("wave {wave} of 3: ")),
            "{wave}: {out}"
        );
    }
    for (host, system) in hosts.iter().zip(&v2) {
        host.assert_on(system);
    }
    // Five signed steps: the release, pause, resume and two promotions.
    assert_eq!(serial(), 6);
    assert_eq!(fleet.published_json()["rollout"]["active"], 2);

    // A canary that fails: the rollout stops and says who and why; later waves never move.
    let switches: Vec<usize> = hosts.iter().map(|h| h.switch_calls().len()).collect();
    new_version(&mut fleet, &names, "3", Some("a"));
    let out = rollout(&fleet, &config, &collector.url, &[]);
    assert_eq!(out.code, Some(2), "{out}");
    for said in ["rollout_failed", "wave 0 of 3", "a (switch_failed"] {
        assert!(out.stderr.contains(said), "{said:?} in {out}");
    }
    assert_eq!(fleet.published_json()["serial"], 7);
    std::thread::sleep(std::time::Duration::from_secs(3));
    for (i, host) in hosts.iter().enumerate().skip(1) {
        assert_eq!(host.switch_calls().len(), switches[i], "{}", host.name);
        host.assert_on(&v2[i]);
    }
    hosts[0].assert_on(&v2[0]);

    // Abort, then a host of the last wave goes quiet (its agent stops): the next rollout moves
    // the first two waves and stops at the last, naming the silent host.
    step(&fleet, "abort").ok();
    drop(daemons.remove(2));
    let v4 = new_version(&mut fleet, &names, "4", None);
    let out = rollout(
        &fleet,
        &config,
        &collector.url,
        &["--wait-healthy", "--silent-after", "6s"],
    );
    assert_eq!(out.code, Some(2), "{out}");
    for said in [
        "rollout_failed",
        "wave 2 of 3",
        "1 of 3 host(s) out failed or went silent",
        "c (went silent: no report for",
    ] {
        assert!(out.stderr.contains(said), "{said:?} in {out}");
    }
    hosts[0].assert_on(&v4[0]);
    hosts[1].assert_on(&v4[1]);
    hosts[2].assert_on(&v2[2]);
}

#[test]
fn twelve_agents_behind_nat_roll_out_in_three_waves_and_a_failed_canary_is_aborted() {
    // Two canaries, then four, then six; each agent polls every 2 s with up to 2 s of splay.
    let wave = |i: usize| {
        Some(if i < 2 {
            0
        } else if i < 6 {
            1
        } else {
            2
        })
    };
    let mut nat = crate::fleet_bench::NatFleet::start(12, 2, wave);
    let (fleet, collector, config) = (&mut nat.fleet, &nat.collector, nat.config.clone());
    fleet.release(&["--config", &config]).ok();
    let all_healthy = |serial: u64| {
        let view = collector.fleet();
        view["hosts"].as_array().is_some_and(|hosts| {
            hosts.iter().filter(|h| h["listed"] == true).count() == 12
                && hosts.iter().all(|h| {
                    h["health"] == "ok" && h["report"]["accepted"].as_u64() >= Some(serial)
                })
        })
    };
    fleet_tests::wait_until("every agent healthy on release 1", 90, || all_healthy(1));

    let v2 = new_version(fleet, &nat.names, "2", None);
    let out = rollout(fleet, &config, &collector.url, &["--wait-healthy"]);
    out.ok();
    for (host, system) in nat.hosts.iter().zip(&v2) {
        host.assert_on(system);
    }

    // The first canary fails release 3: the rollout stops at wave 0, names it and why.
    let switches: Vec<usize> = nat.hosts.iter().map(|h| h.switch_calls().len()).collect();
    let v3 = new_version(fleet, &nat.names, "3", Some("h000"));
    let out = rollout(fleet, &config, &collector.url, &["--wait-healthy"]);
    assert_eq!(out.code, Some(2), "{out}");
    for said in ["rollout_failed", "wave 0 of 3", "h000 (switch_failed"] {
        assert!(out.stderr.contains(said), "{said:?} in {out}");
    }
    nat.hosts[0].assert_on(&v2[0]);
    fleet_tests::wait_until("the other canary on release 3", 30, || {
        nat.hosts[1].state()["last_good"] == v3[1].as_str()
    });
    // Abort: the canary that moved goes back to its previous system; waves 1 and 2 never
    // switched at all.
    step(fleet, "abort").ok();
    fleet_tests::wait_until("the canary back on release 2's system", 30, || {
        nat.hosts[1].state()["last_good"] == v2[1].as_str()
    });
    for (i, host) in nat.hosts.iter().enumerate().skip(2) {
        assert_eq!(host.switch_calls().len(), switches[i], "{}", host.name);
        host.assert_on(&v2[i]);
    }
}

#[test]
fn waves_by_share_are_written_into_the_release_and_stay_with_their_hosts() {
    let names = ["a", "b", "c", "d", "e", "f"];
    let fleet = Fleet::new(&names);
    let config = fleet.dir.join("fleet.toml");
    std::fs::write(&config, "[hosts.a]\nwave = 0\n").unwrap();
    let config = config.to_str().unwrap().to_owned();
    fleet
        .release(&["--config", &config, "--waves", "60,40"])
        .fails_with(2, "together below 100");
    fleet
        .release(&["--config", &config, "--waves", "20,30"])
        .ok();
    let waves = |fleet: &Fleet| -> Vec<u64> {
        let doc = fleet.published_json();
        names
            .iter()
            .map(|n| doc["hosts"][n]["wave"].as_u64().unwrap())
            .collect()
    };
    let first = waves(&fleet);
    assert_eq!(first[0], 0, "fleet.toml's wave stands: {first:?}");
    assert!(first.iter().all(|w| *w <= 2), "{first:?}");
    // The next release puts every host in the same wave again.
    fleet
        .release(&["--config", &config, "--waves", "20,30"])
        .ok();
    assert_eq!(waves(&fleet), first);
}

#[test]
fn waves_from_groups_and_tags_in_the_flake() {
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut fleet = Fleet::new(&names);
    // Tags are services.fleet-agent.tags in each host's configuration.
    fleet.fleet.set("b", |h| h.tags = vec!["canary".into()]);
    for pi in ["c", "d"] {
        fleet
            .fleet
            .set(pi, |h| h.tags = vec!["pi".into(), "arm".into()]);
    }
    fleet.fleet.commit("tags");
    let config = fleet.dir.join("fleet.toml");
    let write = |rollout: &str| {
        std::fs::write(
            &config,
            format!(
                "[groups]\nrouters = [\"e\", \"b\"]\n\n[rollout]\n{rollout}\n\n\
                 [hosts.f]\nwave = 0\n"
            ),
        )
        .unwrap();
    };
    let config_arg = config.to_str().unwrap().to_owned();
    let waves = |fleet: &Fleet| -> Vec<Option<u64>> {
        let doc = fleet.published_json();
        names
            .iter()
            .map(|n| doc["hosts"][n]["wave"].as_u64())
            .collect()
    };

    // A tag no host has is a usage error before anything is built or published.
    write("waves = [[\"tag:canary\"], [\"tag:x86\"]]");
    let out = fleet.release(&["--config", &config_arg]);
    out.fails_with(
        2,
        "no host has the tag 'x86' named in [rollout] waves (wave 1)",
    );
    assert!(!out.stderr.contains("building"), "{out}");
    assert!(!fleet
        .channel_dir
        .join(fleet_agent::release::DOCUMENT_FILE)
        .exists());

    // b is a canary (and a router: the first wave naming it wins), c and d are Pis, e a router,
    // f has its own wave, a is in none: it goes last.
    write("waves = [[\"tag:canary\"], [\"@routers\", \"tag:pi\"]]");
    fleet.release(&["--config", &config_arg]).ok();
    assert_eq!(
        waves(&fleet),
        [None, Some(0), Some(1), Some(1), Some(1), Some(0)]
    );
    // Shares split the hosts in no wave into the waves after the listed ones.
    write("waves = [[\"tag:canary\"], [\"@routers\", \"tag:pi\"]]\nshares = [50]");
    fleet.release(&["--config", &config_arg]).ok();
    let with_shares = waves(&fleet);
    assert_eq!(
        with_shares[1..],
        [Some(0), Some(1), Some(1), Some(1), Some(0)]
    );
    assert!(
        matches!(with_shares[0], Some(2) | Some(3)),
        "{with_shares:?}"
    );

    // --on takes tags too: only the Pis are built, and a rollout holds back every wave after 0.
    for name in names {
        fleet.fleet.set(name, |h| h.version = "2".into());
    }
    fleet.fleet.commit("v2");
    let before = fleet.published_json();
    let out = fleet.release(&["--config", &config_arg, "--on", "tag:arm", "--rollout"]);
    out.ok();
    assert!(out.stderr.contains("building 2 host(s): c, d"), "{out}");
    let doc = fleet.published_json();
    assert_eq!(doc["rollout"]["active"], 0, "{doc}");
    for pi in ["c", "d"] {
        // Wave 1: the new system waits in `target`.
        assert_eq!(
            doc["hosts"][pi]["toplevel"],
            before["hosts"][pi]["toplevel"]
        );
        assert_eq!(doc["hosts"][pi]["target"], fleet.fleet.build(pi));
    }
}

#[test]
fn a_window_that_opens_moves_its_hosts_spread_over_their_splay_not_in_lockstep() {
    // Ten agents poll every second plus up to 10 s of splay. A release whose not_before opens
    // a window in the future: the hosts take it and wait, none moves before the window,
    // and they move spread over their splay (with none, all would move within about a second
    // of the opening: a wave in lockstep).
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fleet = Fleet::new(&refs);
    let hosts = directory_hosts(&mut fleet, &refs);
    fleet.release(&[]).ok();
    let keys = [fleet.release_public_key()];
    let directory = fleet.channel_url(Channel::Directory);
    let _daemons: Vec<_> = hosts
        .iter()
        .map(|host| {
            host.write_config(
                &fleet.settings(&keys, 1, &directory),
                "poll_interval = \"1s\"\npoll_splay = \"10s\"\n",
                "",
            );
            let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
            fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap())
        })
        .collect();
    let log = |i: usize| std::fs::read_to_string(hosts[i].root.join("agent.log")).unwrap();
    fleet_tests::wait_until("every host polling release 1", 60, || {
        (0..hosts.len()).all(|i| log(i).contains("accepted release 1"))
    });

    for name in &names {
        fleet.fleet.set(name, |h| h.version = "2".into());
    }
    fleet.fleet.commit("v2");
    fleet.release(&["--not-before", "+15s"]).ok();
    let opens = fleet.published_json()["hosts"]["s0"]["not_before"]
        .as_u64()
        .unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    // When each host was first seen moving (the log is read every 100 ms).
    let mut moved: Vec<Option<f64>> = vec![None; hosts.len()];
    let deadline = now() + 60.0;
    while moved.iter().any(Option::is_none) && now() < deadline {
        for (i, at) in moved.iter_mut().enumerate() {
            if at.is_none() && log(i).contains("phase idle -> realising (release 2)") {
                *at = Some(now());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let moved: Vec<f64> = moved
        .into_iter()
        .enumerate()
        .map(|(i, at)| at.unwrap_or_else(|| panic!("{} never moved:\n{}", names[i], log(i))))
        .collect();
    for (i, at) in moved.iter().enumerate() {
        assert!(*at >= opens as f64, "{} moved before the window", names[i]);
    }
    let first = moved.iter().cloned().fold(f64::MAX, f64::min);
    let last = moved.iter().cloned().fold(f64::MIN, f64::max);
    let offsets: Vec<String> = moved
        .iter()
        .map(|at| format!("{:.1}", at - opens as f64))
        .collect();
    assert!(
        last - first >= 2.5,
        "the hosts moved within {:.1} s of each other (seconds after the window opened: {})",
        last - first,
        offsets.join(", ")
    );
    eprintln!("seconds after the window opened: {}", offsets.join(", "));
}
