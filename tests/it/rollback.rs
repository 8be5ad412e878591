//! Trial, health and rollback on simulated hosts: a bad candidate never stays.

use crate::common::{Channel, Fleet};

fn bump(fleet: &mut Fleet, version: &str, behaviour: &str) -> String {
    fleet.fleet.set("a", |h| {
        h.version = version.into();
        h.behaviour = behaviour.into();
    });
    fleet.fleet.commit(&format!("a: {version} {behaviour}"));
    fleet.release(&[]).ok();
    fleet.fleet.build("a")
}

#[test]
fn failing_switch_rolls_back_and_is_not_retried_until_a_higher_serial() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    let bad = bump(&mut fleet, "2", "fail");

    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    assert_eq!(outcome["outcome"], "rolled-back");
    assert_eq!(outcome["code"], "switch_failed");
    host.assert_on(&v1);
    assert_eq!(
        host.switch_calls(),
        [format!("test {bad}"), format!("test {v1}")]
    );
    let state = host.state();
    assert_eq!(state["bad"]["serial"], 1);
    assert_eq!(state["bad"]["code"], "switch_failed");
    assert_eq!(state["last_good"], v1.as_str());
    assert_eq!(host.generation_count(), 1, "the profile got a generation");

    // Not retried: the same release is known bad.
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "known-bad");
    assert_eq!(host.switch_calls().len(), 2);

    // A higher serial with a fixed system is taken.
    let good = bump(&mut fleet, "3", "ok");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed");
    host.assert_on(&good);
}

#[test]
fn failing_required_check_rolls_back_and_a_wanted_one_only_reports() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    let healthy_flag = host.control.join("healthy");
    let keys = [fleet.release_public_key()];
    let url = fleet.channel_url(Channel::Directory);
    let checks = format!(
        r#"
[[health.checks]]
name = "app answers"
type = "command"
command = ["test", "-e", "{}"]

[[health.checks]]
name = "nice to have"
type = "tcp"
address = "127.0.0.1:1"
required = false
timeout = "1s"
"#,
        healthy_flag.display()
    );
    host.write_config(&fleet.settings(&keys, 1, &url), "", &checks);

    let v2 = bump(&mut fleet, "2", "ok");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    assert_eq!(outcome["code"], "health_failed");
    assert!(
        outcome["message"].as_str().unwrap().contains("app answers"),
        "{outcome}"
    );
    assert!(
        !outcome["message"]
            .as_str()
            .unwrap()
            .contains("nice to have"),
        "{outcome}"
    );
    host.assert_on(&v1);
    assert_eq!(
        host.switch_calls(),
        [format!("test {v2}"), format!("test {v1}")]
    );

    // Not retried, even once the check would pass.
    std::fs::write(&healthy_flag, "").unwrap();
    let (_, outcome) = host.once_outcome();
    assert_eq!(outcome["outcome"], "known-bad");
    host.assert_on(&v1);

    // The next serial passes its required check; the failing wanted check does not matter.
    let v3 = bump(&mut fleet, "3", "ok");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&v3);
}

#[test]
fn a_release_that_cuts_the_host_off_its_channel_is_rolled_back() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Http);
    fleet.www.cut_off_while(&host.control.join("network-cut"));
    let v1 = fleet.fleet.build("a");
    let cutting = bump(&mut fleet, "2", "cut-network");

    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    assert_eq!(outcome["code"], "health_failed");
    assert!(
        outcome["message"]
            .as_str()
            .unwrap()
            .contains("release channel reachable"),
        "{outcome}"
    );
    host.assert_on(&v1);
    assert_eq!(
        host.switch_calls(),
        [format!("test {cutting}"), format!("test {v1}")]
    );
    // Back on v1, the host reaches its channel again.
    assert!(!host.control.join("network-cut").exists());
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
}

#[test]
fn realise_failures_are_retried_up_to_the_attempt_cap_then_left_for_a_person() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    bump(&mut fleet, "2", "ok");
    // The cache loses everything: substitution fails with a clear reason, no build happens.
    std::fs::remove_dir_all(&fleet.cache_dir).unwrap();
    std::fs::create_dir_all(&fleet.cache_dir).unwrap();
    for attempt in 1..=3 {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(1), "attempt {attempt}: {outcome}");
        assert_eq!(
            outcome["code"], "not_in_cache",
            "attempt {attempt}: {outcome}"
        );
        assert!(outcome["message"]
            .as_str()
            .unwrap()
            .contains("not in any trusted cache"));
        host.assert_on(&v1);
    }
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(1), "{outcome}");
    assert_eq!(outcome["code"], "attempts_exhausted");
    let (_, outcome) = host.once_outcome();
    assert_eq!(outcome["outcome"], "known-bad");
    assert!(host.switch_calls().is_empty());
    host.assert_on(&v1);
}

#[test]
fn a_failed_realise_is_retried_although_the_channel_did_not_change() {
    let mut fleet = Fleet::new(&["a"]);
    // HTTP with ETags: after the first fetch, every poll is answered 304 Not Modified.
    let host = fleet.host("a", Channel::Http);
    let v1 = fleet.fleet.build("a");
    let v2 = bump(&mut fleet, "2", "ok");
    let cache = fleet.cache_dir.clone();
    let hidden = fleet.dir.join("cache-away");
    std::fs::rename(&cache, &hidden).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let keys = [fleet.release_public_key()];
    let url = fleet.channel_url(Channel::Http);
    host.write_config(
        &fleet.settings(&keys, 1, &url),
        // Enough attempts that a slow machine cannot use them all up before the cache is back.
        "poll_interval = \"1s\"\nmax_backoff = \"1s\"\nmax_attempts = 1000",
        "",
    );
    let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
    let _daemon = fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap());
    fleet_tests::wait_until("the failed realise", 15, || {
        host.state_dir.join("state.json").exists()
            && host.state()["last_error"]["code"] == "not_in_cache"
    });
    host.assert_on(&v1);
    // The cache comes back; the release does not change.
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::rename(&hidden, &cache).unwrap();
    fleet_tests::wait_until("the commit", 15, || {
        let state = host.state();
        state["last_good"] == v2.as_str() && state["phase"]["phase"] == "idle"
    });
    host.assert_on(&v2);
    assert!(fleet.www.not_modified() >= 1, "no poll was answered 304");
    assert_eq!(fleet.www.requests_matching("release.json.sig").len(), 1);
}

#[test]
fn a_boot_step_that_leaves_the_boot_default_alone_is_not_a_commit() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v2 = bump(&mut fleet, "2", "ok");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    let extlinux = host.boot_dir().join("extlinux/extlinux.conf");
    let boots = || std::fs::read_to_string(&extlinux).unwrap();
    assert!(boots().contains(&format!("init={v2}/init")), "{}", boots());

    // `switch-to-configuration boot` exits 0 without a boot loader: the boot default is still
    // version 2, so version 3 is not committed but rolled back.
    let noop = bump(&mut fleet, "3", "boot-noop");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    assert_eq!(outcome["code"], "boot_default_unchanged", "{outcome}");
    assert!(
        outcome["message"]
            .as_str()
            .unwrap()
            .contains(&format!("still boots {v2}")),
        "{outcome}"
    );
    host.assert_on(&v2);
    assert!(boots().contains(&format!("init={v2}/init")), "{}", boots());
    assert_eq!(host.state()["last_good"], v2.as_str());
    assert_eq!(
        host.switch_calls()[2..],
        [
            format!("test {noop}"),
            format!("boot {noop}"),
            format!("test {v2}"),
            format!("boot {v2}")
        ]
    );
}

#[test]
fn the_standing_error_names_the_cause_that_stands_now() {
    use fleet_tests::http::Mode;
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Http);
    let v1 = fleet.fleet.build("a");
    bump(&mut fleet, "2", "fail");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    let error = |host: &fleet_tests::host::SimHost| host.state()["last_error"]["code"].clone();
    assert_eq!(error(&host), "switch_failed");

    // A burst of server errors: the channel is the cause now.
    fleet.www.set_mode(Mode::Status(500));
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(1), "{outcome}");
    assert_eq!(error(&host), "channel_unreachable");

    // The channel answers again: the release that failed here is what stands, not the channel.
    fleet.www.set_mode(Mode::Normal);
    let (code, outcome) = host.once_outcome();
    assert_eq!(
        (code, outcome["outcome"].as_str()),
        (Some(0), Some("known-bad"))
    );
    assert_eq!(error(&host), "switch_failed");
    let status = fleet_tests::run(host.agent(&["status", "--json"]))
        .ok()
        .stdout
        .clone();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        status["state"]["last_error"]["code"], "switch_failed",
        "{status}"
    );
    host.assert_on(&v1);

    // A fixed release clears it.
    let v3 = bump(&mut fleet, "3", "ok");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&v3);
    assert!(host.state()["last_error"].is_null(), "{}", host.state());
}
