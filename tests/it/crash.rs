//! Killed at every fail point (SIGKILL, as a power cut or the OOM killer would), the agent
//! restarts into the last good system or the committed candidate, never in between, and its
//! state file always parses. A corrupt state file means safe mode, not a fresh start.

use crate::common::{Channel, Fleet};
use fleet_tests::host::SimHost;
use fleet_tests::run;

/// Runs `once` with a fail point armed; returns whether the agent died there.
fn once_killed_at(host: &SimHost, point: &str) -> bool {
    let mut command = host.agent(&["once", "--json"]);
    command.env("FLEET_AGENT_FAILPOINT", point);
    let out = run(command);
    let died = out.stderr.contains("fail point") && out.code.is_none();
    assert!(died || out.code.is_some(), "{point}: {out}");
    died
}

/// The one invariant: profile, current system and boot default agree, on `v1` or `v2`.
fn assert_consistent(host: &SimHost, v1: &str, v2: &str, what: &str) -> String {
    let generation = host.generation().expect("profile");
    assert!(
        generation == v1 || generation == v2,
        "{what}: profile on {generation}"
    );
    assert_eq!(
        host.current_system().as_deref(),
        Some(generation.as_str()),
        "{what}: current"
    );
    assert_eq!(
        host.boot_default().as_deref(),
        Some(generation.as_str()),
        "{what}: boot default"
    );
    assert_eq!(host.state()["phase"]["phase"], "idle", "{what}");
    generation
}

/// Kills a fresh host at each point while it applies the fleet's current release, restarts it,
/// and checks where it ends; `expect` says which system each point must end on.
fn kill_at_points(fleet: &mut Fleet, v1: &str, v2: &str, points: &[(&str, Option<&str>)]) {
    for (i, (point, expect)) in points.iter().enumerate() {
        let host = fleet.host_in("a", Channel::Directory, &format!("a-{i}"));
        let died = once_killed_at(&host, point);
        assert!(died, "fail point {point} was never reached");
        // Whatever was on disk when it died parses (killed before the very first rename,
        // there is none yet: the restart starts fresh, as on a new host).
        if host.state_dir.join("state.json").exists() {
            let _ = host.state();
        }
        let (code, outcome) = host.once_outcome();
        assert!(matches!(code, Some(0) | Some(4)), "{point}: {outcome}");
        let on = assert_consistent(&host, v1, v2, point);
        if let Some(expect) = expect {
            assert_eq!(on, *expect, "{point}: {outcome}");
        }
        // And it stays there: a further cycle does not loop on the release.
        let switches = host.switch_calls().len();
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{point}: {outcome}");
        assert_consistent(&host, v1, v2, point);
        assert_eq!(
            host.switch_calls().len(),
            switches,
            "{point}: switched again"
        );
    }
}

fn fleet_with_release(behaviour: &str) -> (Fleet, String, String) {
    let mut fleet = Fleet::new(&["a"]);
    let v1 = fleet.fleet.build("a");
    fleet.fleet.set("a", |h| {
        h.version = "2".into();
        h.behaviour = behaviour.into();
    });
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    // Hosts are installed with v1, the release names v2.
    fleet.fleet.set("a", |h| {
        h.version = "1".into();
        h.behaviour = "ok".into();
    });
    let v2 = fleet.published().1.hosts["a"].toplevel.to_string();
    (fleet, v1, v2)
}

#[test]
fn killed_at_each_phase_point_resumes_or_rolls_back() {
    let (mut fleet, v1, v2) = fleet_with_release("ok");
    let (v1s, v2s) = (v1.as_str(), v2.as_str());
    kill_at_points(
        &mut fleet,
        &v1,
        &v2,
        &[
            // Before the trial nothing changed: the restart applies the release.
            ("after-realise", Some(v2s)),
            // The switch ran as the agent's own child: its result died with the agent, so the
            // candidate is unproven: roll back, do not retry.
            ("after-trial-switch", Some(v1s)),
            // The switch had succeeded and the candidate is still active: the restarted agent
            // runs the health window again and commits.
            ("during-health", Some(v2s)),
            // Proven healthy: the restart finishes the commit.
            ("after-profile-set", Some(v2s)),
            ("after-boot-switch", Some(v2s)),
        ],
    );
}

#[test]
fn killed_at_every_state_write_ends_consistent() {
    let (mut fleet, v1, v2) = fleet_with_release("ok");
    // A cycle that commits writes the state seven times: first start, accept, realising,
    // trial, health, committing, idle.
    let mut points = Vec::new();
    for n in 1..=7 {
        points.push(format!("state-before-rename@{n}"));
        points.push(format!("state-after-rename@{n}"));
    }
    let rows: Vec<(&str, Option<&str>)> = points.iter().map(|p| (p.as_str(), None)).collect();
    kill_at_points(&mut fleet, &v1, &v2, &rows);
}

#[test]
fn killed_during_rollback_finishes_the_rollback() {
    let (mut fleet, v1, v2) = fleet_with_release("fail");
    kill_at_points(
        &mut fleet,
        &v1,
        &v2,
        &[("after-rollback-switch", Some(v1.as_str()))],
    );
}

#[test]
fn corrupt_state_means_safe_mode_until_reset() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    host.once_outcome();
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let state_path = host.state_dir.join("state.json");
    std::fs::write(&state_path, b"{\"format\": 1, \"phase\": ").unwrap();

    let out = run(host.agent(&["once", "--json"]));
    assert_eq!(out.code, Some(5), "{out}");
    assert!(out.stderr.contains("safe mode"), "{out}");
    host.assert_on(&v1);
    assert!(host.switch_calls().is_empty());
    // The corrupt file is kept as it was for a person to look at.
    assert_eq!(
        std::fs::read(&state_path).unwrap(),
        b"{\"format\": 1, \"phase\": "
    );
    let status = run(host.agent(&["status"]));
    assert_eq!(status.code, Some(5), "{status}");
    assert!(status.stdout.contains("SAFE MODE"), "{status}");

    let reset = run(host.agent(&["reset-state"]));
    assert_eq!(reset.code, Some(0), "{reset}");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed");
}

#[test]
fn a_deploy_of_a_newer_release_does_not_carry_the_last_ones_error() {
    // Release 1 fails on the host; release 2 is good. While release 2 deploys (here: the agent
    // stops right after realising it), the host's state and reports must not say it fails:
    // a rollout reading the collector would stop on an error that is not about release 2.
    let (mut fleet, v1, v2) = fleet_with_release("fail");
    let host = fleet.host("a", Channel::Directory);
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(4), "{outcome}");
    host.assert_on(&v1);
    assert_eq!(host.state()["last_error"]["code"], "switch_failed");
    assert_eq!(host.state()["last_error"]["serial"], 1);

    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: v3");
    fleet.release(&[]).ok();
    let v3 = fleet.published().1.hosts["a"].toplevel.to_string();
    assert!(once_killed_at(&host, "after-realise"));
    let state = host.state();
    assert_eq!(state["phase"]["phase"], "realising", "{state}");
    assert_eq!(state["phase"]["serial"], 2, "{state}");
    assert!(state["last_error"].is_null(), "{state}");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&v3);
    assert_ne!(v2, v3);
}
