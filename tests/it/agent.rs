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
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        for _ in 0..100 {
            if done() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}");
    };
    // The first poll happens at start and finds nothing.
    wait_for("the first poll", &|| {
        fleet.www.requests_matching("release.json").len() == 1
            && host.state_dir.join("agent.json").exists()
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
    wait_for("the commit", &|| {
        host.generation().as_deref() == Some(v2.as_str())
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
    assert!(!host.state_dir.join("agent.json").exists());
}
