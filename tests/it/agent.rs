//! `fleet-agent` on simulated hosts: real chroot stores, a real binary cache over loopback HTTP,
//! real channels, the fixture's `switch-to-configuration`.

use crate::common::{Channel, Fleet};
use fleet_tests::run;

#[test]
fn happy_path_over_each_channel() {
    for channel in [
        Channel::Directory,
        Channel::Http,
        Channel::Git,
        Channel::GitFile,
    ] {
        let mut fleet = Fleet::new(&["a"]);
        let host = fleet.host("a", channel);
        let v1 = fleet.fleet.build("a");
        host.assert_on(&v1);

        fleet.fleet.set("a", |h| h.version = "2".into());
        fleet.fleet.commit("a: version 2");
        fleet.release(&[]).ok();
        let v2 = fleet.fleet.build("a");
        assert_ne!(v1, v2);

        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{channel:?}: {outcome}");
        assert_eq!(outcome["outcome"], "committed", "{channel:?}: {outcome}");
        assert_eq!(outcome["toplevel"], v2.as_str());
        host.assert_on(&v2);
        assert_eq!(
            host.switch_calls(),
            [format!("test {v2}"), format!("boot {v2}")],
            "{channel:?}"
        );
        assert_eq!(host.generation_count(), 2);
        assert!(host.has(&v2));
        // The closure came from the cache over HTTP.
        assert!(!fleet.cache_server.requests_matching(".narinfo").is_empty());
        assert!(!fleet.cache_server.requests_matching("/nar/").is_empty());

        // Polling again changes nothing.
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0));
        assert_eq!(outcome["outcome"], "up-to-date", "{channel:?}: {outcome}");
        assert_eq!(host.switch_calls().len(), 2);
        let state = host.state();
        assert_eq!(state["last_good"], v2.as_str());
        assert_eq!(state["accepted"]["serial"], 1);
        assert_eq!(state["phase"]["phase"], "idle");
    }
}

#[test]
fn a_new_kernel_is_committed_and_flagged_as_needing_a_reboot() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    fleet.fleet.set("a", |h| {
        h.version = "2".into();
        h.kernel = "6.6.1".into();
    });
    fleet.fleet.commit("a: new kernel");
    fleet.release(&[]).ok();
    let v2 = fleet.fleet.build("a");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["reboot_needed"], true, "{outcome}");
    host.assert_on(&v2);
    assert_eq!(host.state()["reboot_needed"], true);
    let status = run(host.agent(&["status"]));
    assert!(status.stdout.contains("reboot needed"), "{status}");

    // Same kernel as the booted system: no reboot needed.
    fleet.fleet.set("a", |h| {
        h.version = "3".into();
        h.kernel = "6.1.0".into();
    });
    fleet.fleet.commit("a: back to the booted kernel");
    fleet.release(&[]).ok();
    let (_, outcome) = host.once_outcome();
    assert_eq!(outcome["reboot_needed"], false, "{outcome}");
}

#[test]
fn a_new_kernel_with_reboot_auto_waits_for_its_window_and_never_reboots_without_systemd() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    fleet.fleet.set("a", |h| {
        h.version = "2".into();
        h.kernel = "6.6.1".into();
    });
    fleet.fleet.commit("a: new kernel");
    fleet.release(&[]).ok();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hhmm = |t: u64| format!("{:02}:{:02}", t % 86_400 / 3600, t % 3600 / 60);
    let with_window = |window: &str| {
        let text = std::fs::read_to_string(&host.config_path).unwrap();
        let text = text.replacen(
            "mode = \"direct\"",
            &format!("mode = \"direct\"\nreboot = \"auto\"\nreboot_window = \"{window}\""),
            1,
        );
        std::fs::write(&host.config_path, text).unwrap();
    };
    // A window that opens in two hours: the release waits, untouched, poll after poll.
    let opens = now + 7200;
    with_window(&format!("{}-{}", hhmm(opens), hhmm(opens + 3600)));
    for _ in 0..4 {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{outcome}");
        assert_eq!(outcome["outcome"], "waiting", "{outcome}");
        assert_eq!(outcome["not_before"], opens - opens % 60, "{outcome}");
    }
    host.assert_on(&v1);
    assert!(host.switch_calls().is_empty(), "{:?}", host.switch_calls());
    let state = host.state();
    assert_eq!(state["phase"]["phase"], "idle");
    assert_eq!(state["bad"], serde_json::Value::Null, "{state}");

    // The window is open, but this host has no systemd: the agent refuses to reboot it and goes
    // back to where it was.
    let text = std::fs::read_to_string(&host.config_path).unwrap();
    let start = text.find("reboot_window").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!(
        "{}reboot_window = \"{}-{}\"{}",
        &text[..start],
        hhmm(now + 86_400 - 3600),
        hhmm(now + 3600),
        &text[end..]
    );
    std::fs::write(&host.config_path, text).unwrap();
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    assert_eq!(outcome["code"], "reboot_failed", "{outcome}");
    host.assert_on(&v1);
}

#[test]
fn the_daemon_polls_at_once_on_poll_now_and_stops_on_sigterm() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Http);
    let keys = [fleet.release_public_key()];
    let url = fleet.channel_url(Channel::Http);
    // An hour between polls: only poll-now can make it pick the release up within the test.
    host.write_config(
        &fleet.settings(&keys, 1, &url),
        "poll_interval = \"1h\"",
        "",
    );
    let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
    let mut daemon = fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap());
    // The first poll happens at start and finds nothing.
    fleet_tests::wait_until("the first poll", 15, || {
        fleet.www.requests_matching("release.json").len() == 1
            && host.runtime_dir.join("agent.json").exists()
    });
    let status = run(host.agent(&["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["running_pid"], daemon.0.id());
    assert!(status["next_poll"].as_u64().is_some());

    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let v2 = fleet.fleet.build("a");
    run(host.agent(&["poll-now"])).ok();
    // Committed: last_good is written after the profile and the boot default are set (the
    // profile alone is set first, so waiting for it raced the boot switch).
    fleet_tests::wait_until("the commit", 15, || {
        host.state()["last_good"] == v2.as_str()
    });
    host.assert_on(&v2);

    let pid = daemon.0.id().to_string();
    run({
        let mut kill = std::process::Command::new("kill");
        kill.args(["-TERM", &pid]);
        kill
    })
    .ok();
    let status = daemon.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!host.runtime_dir.join("agent.json").exists());
}

#[test]
fn git_over_smart_http_with_a_token_and_over_ssh_with_a_deploy_key() {
    use fleet_tests::git::{GitHttpServer, SshServer};
    let mut fleet = Fleet::new(&["a"]);
    fleet.fleet.set("a", |h| h.version = "1".into());
    let token_file = fleet.dir.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let wrong_token = fleet.dir.join("wrong-token");
    std::fs::write(&wrong_token, "guess").unwrap();
    let http = GitHttpServer::serve(&fleet.dir.join("remotes"), Some("s3cret"));
    let ssh = SshServer::start(&fleet.dir.join("sshd"));
    let empty_known_hosts = fleet.dir.join("empty_known_hosts");
    std::fs::write(&empty_known_hosts, "").unwrap();
    let keys = [fleet.release_public_key()];

    let http_url = format!("git+{}", http.url("fleet.git"));
    let ssh_url = format!("git+{}", ssh.url(&fleet.git_remote));
    // (name, channel, credentials, expected error code or None for success)
    let rows: Vec<(&str, &str, String, Option<&str>)> = vec![
        (
            "http, wrong token",
            &http_url,
            format!("token_file = \"{}\"", wrong_token.display()),
            Some("channel_credentials"),
        ),
        (
            "http, token",
            &http_url,
            format!("token_file = \"{}\"", token_file.display()),
            None,
        ),
        (
            "ssh, unknown host key",
            &ssh_url,
            format!(
                "ssh_key_file = \"{}\"\nssh_known_hosts_file = \"{}\"",
                ssh.client_key.display(),
                empty_known_hosts.display()
            ),
            Some("channel_credentials"),
        ),
        (
            "ssh, deploy key",
            &ssh_url,
            format!(
                "ssh_key_file = \"{}\"\nssh_known_hosts_file = \"{}\"",
                ssh.client_key.display(),
                ssh.known_hosts.display()
            ),
            None,
        ),
    ];
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let v2 = fleet.fleet.build("a");
    let v1 = {
        fleet.fleet.set("a", |h| h.version = "1".into());
        fleet.fleet.build("a")
    };
    for (i, (what, channel, credentials, error)) in rows.into_iter().enumerate() {
        let host = fleet.host_in("a", Channel::Directory, &format!("a-{i}"));
        host.write_config(&fleet.settings(&keys, 1, channel), &credentials, "");
        let (code, outcome) = host.once_outcome();
        match error {
            Some(expected) => {
                assert_eq!(code, Some(1), "{what}: {outcome}");
                assert_eq!(outcome["code"], expected, "{what}: {outcome}");
                eprintln!("{what}: {}", outcome["message"]);
                host.assert_on(&v1);
            }
            None => {
                assert_eq!(code, Some(0), "{what}: {outcome}");
                host.assert_on(&v2);
            }
        }
    }
    // Smart HTTP: ref discovery, then one upload-pack round.
    let requests = http.requests();
    assert!(
        requests
            .iter()
            .any(|r| r == "GET /fleet.git/info/refs?service=git-upload-pack"),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r == "POST /fleet.git/git-upload-pack"),
        "{requests:?}"
    );
}

#[test]
fn check_config_explains_a_good_config_and_names_every_problem_of_a_bad_one() {
    let dir = fleet_tests::TestDir::new();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "fleet = \"home\"\nhost = \"router1\"\n\
         trusted_keys = [\"ops1:kQrJ0Q2bTIw7r8pQw3dKsyWyHc8M2oLPtY1r0Qy0mTE=\"]\n\
         channel = \"https://releases.example.org/home\"\n",
    )
    .unwrap();
    let mut c = std::process::Command::new(fleet_tests::binary("fleet-agent"));
    c.arg("check-config").arg(&good);
    let out = run(c);
    out.ok();
    assert!(out.stdout.contains("host router1 in fleet home"), "{out}");
    assert!(out.stdout.contains("trusts 1 of 1 key(s): ops1"), "{out}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "fleet = \"home\"\nhost = \"router1\"\ntrusted_keys = []\nchannel = \"ftp://x\"\n",
    )
    .unwrap();
    let mut c = std::process::Command::new(fleet_tests::binary("fleet-agent"));
    c.arg("check-config").arg(&bad);
    let out = run(c);
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("trusted_keys is empty"), "{out}");
    assert!(out.stderr.contains("unknown scheme"), "{out}");
}

#[test]
fn idle_git_polls_ask_for_the_one_ref_with_protocol_v2_and_still_see_new_releases() {
    use fleet_tests::git::GitHttpServer;
    let mut fleet = Fleet::new(&["a"]);
    let http = GitHttpServer::serve(&fleet.dir.join("remotes"), None);
    let host = fleet.host("a", Channel::Directory);
    let keys = [fleet.release_public_key()];
    let url = format!("git+{}", http.url("fleet.git"));
    host.write_config(
        &fleet.settings(&keys, 1, &url),
        "poll_interval = \"1s\"",
        "",
    );
    let release = |fleet: &mut Fleet, version: &str| {
        fleet.fleet.set("a", |h| h.version = version.into());
        fleet.fleet.commit(version);
        fleet.release(&[]).ok();
        fleet.fleet.build("a")
    };
    let v2 = release(&mut fleet, "2");
    let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
    let _daemon = fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap());
    let wait_for_commit = |toplevel: &str| {
        fleet_tests::wait_until(&format!("the commit of {toplevel}"), 15, || {
            host.state_dir.join("state.json").exists() && host.state()["last_good"] == toplevel
        })
    };
    wait_for_commit(&v2);
    let before = http.requests().len();
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let idle: Vec<String> = http.requests()[before..].to_vec();
    let v2_asks = idle
        .iter()
        .filter(|r| *r == "Git-Protocol: version=2")
        .count();
    assert!(v2_asks >= 2, "idle polls did not use protocol v2: {idle:?}");
    assert!(
        !idle.iter().any(|r| r.contains("info/refs")),
        "idle polls fetched: {idle:?}"
    );

    let v3 = release(&mut fleet, "3");
    wait_for_commit(&v3);
    host.assert_on(&v3);
}

#[test]
fn a_release_published_during_a_health_window_is_still_picked_up() {
    // Each channel remembers what it saw (HTTP validators, a directory's file identities): the
    // health check's poll must not make the next real poll miss what appeared meanwhile.
    for channel in [Channel::Http, Channel::Directory] {
        release_during_health_window(channel);
    }
}

fn release_during_health_window(channel: Channel) {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", channel);
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let v2 = fleet.fleet.build("a");
    // Release 2 (v3) is signed now but kept aside; the health check of v2 publishes it, so it
    // appears while the agent's own channel-reachable check is polling.
    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: v3");
    let staging = fleet.dir.join("staging");
    let channels = [staging.display().to_string()];
    fleet
        .release_with(&[&fleet.release_key], &channels, &["--serial", "2"])
        .ok();
    let v3 = fleet.fleet.build("a");
    // Published once, in the first round: the window's later rounds poll the channel after it.
    let publish = format!(
        "[ -e {0}/published ] || {{ cp {0}/release.json {0}/release.json.sig {1}/ && touch {0}/published; }}",
        staging.display(),
        fleet.channel_dir.display()
    );
    let keys = [fleet.release_public_key()];
    let url = fleet.channel_url(channel);
    let check = format!(
        "[[health.checks]]\ntype = \"command\"\ncommand = [\"sh\", \"-c\", \"{publish}\"]\n"
    );
    host.write_config(
        &fleet.settings(&keys, 1, &url),
        "poll_interval = \"1s\"",
        &check,
    );
    let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
    let _daemon = fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap());
    fleet_tests::wait_until(&format!("the commit of v3 ({channel:?})"), 20, || {
        host.state_dir.join("state.json").exists() && host.state()["last_good"] == v3.as_str()
    });
    host.assert_on(&v3);
    let calls = host.switch_calls();
    assert_eq!(&calls[..2], [format!("test {v2}"), format!("boot {v2}")]);
}

#[test]
fn a_host_released_with_not_before_waits_then_moves() {
    let mut fleet = Fleet::new(&["a", "b"]);
    let a = fleet.host("a", Channel::Directory);
    let b = fleet.host("b", Channel::Directory);
    let (a1, b1) = (fleet.fleet.build("a"), fleet.fleet.build("b"));
    for host in ["a", "b"] {
        fleet.fleet.set(host, |h| h.version = "2".into());
    }
    fleet.fleet.commit("v2");
    // Bad values are refused before anything is built or published.
    for (bad, says) in [("tomorrow", "give a time"), ("+400d", "never move")] {
        fleet
            .release(&["--on", "a", "--not-before", bad])
            .fails_with(2, says);
    }
    // a waits 8 s (a maintenance window); b is released after it without one.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    fleet.release(&["--on", "a", "--not-before", "+8s"]).ok();
    fleet.release(&["--on", "b"]).ok();
    let entry = &fleet.published_json()["hosts"]["a"];
    let at = entry["not_before"].as_u64().unwrap();
    assert!((started + 8..=started + 12).contains(&at), "{entry}");
    assert!(fleet.published_json()["hosts"]["b"]
        .get("not_before")
        .is_none());

    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "waiting", "{outcome}");
    assert_eq!(outcome["not_before"], at, "{outcome}");
    a.assert_on(&a1);
    assert!(a.switch_calls().is_empty());
    let (_, outcome) = b.once_outcome();
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    assert_ne!(fleet.fleet.build("b"), b1);

    fleet_tests::wait_until("the window opens", 15, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            >= at
    });
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    a.assert_on(&fleet.fleet.build("a"));
}
