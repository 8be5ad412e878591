//! Booted machines: the agent as a real systemd service in a Debian container with systemd as
//! PID 1, its switch in a transient unit, the journal, failed units and power cuts.

use crate::common::Fleet;
use fleet_tests::collector::Collector;
use fleet_tests::machine::Machine;

/// A one-host fleet whose host `a` is a booted machine installed with version 1.
fn booted(extra: &str) -> (Machine, Fleet, String) {
    let fleet = Fleet::new(&["a"]);
    let v1 = fleet.fleet.build("a");
    let mut machine = Machine::new(
        &fleet.dir.join("machines/a"),
        "a",
        &[(fleet.channel_dir.as_path(), "/srv/channel")],
    );
    machine.install(&v1);
    machine.write(
        "/etc/fleet-agent/config.toml",
        &format!(
            r#"fleet = "home"
host = "a"
trusted_keys = ["{key}"]
channel = "/srv/channel"
poll_interval = "2s"
poll_splay = "0s"
{extra}
[health]
window = "3s"
interval = "500ms"

[paths]
system_profile = "/var/lib/fleet-system/profile"
"#,
            key = fleet.release_public_key()
        ),
    );
    machine.boot();
    (machine, fleet, v1)
}

/// Releases version `version` of host `a` with `behaviour`; returns its toplevel.
fn release(fleet: &mut Fleet, version: &str, behaviour: &str) -> String {
    fleet.fleet.set("a", |h| {
        h.version = version.into();
        h.behaviour = behaviour.into();
    });
    fleet.fleet.commit(&format!("a: {version} {behaviour}"));
    fleet.release(&[]).ok();
    fleet.fleet.build("a")
}

/// Waits until `done`, or fails showing the agent's state and journal.
fn wait(machine: &Machine, what: &str, seconds: u64, done: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed().as_secs() < seconds {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let journal: Vec<String> = machine
        .journal(None)
        .iter()
        .map(|e| format!("{}: {}", field(e, "_SYSTEMD_UNIT"), field(e, "MESSAGE")))
        .filter(|l| l.contains("fleet") || l.contains("switch"))
        .collect();
    panic!(
        "timed out after {seconds} s waiting for {what}\nstate: {:#}\nswitch calls: {:?}\njournal:\n{}",
        machine.state(),
        machine.switch_calls(),
        journal.join("\n")
    );
}

/// Waits for `toplevel` (release 1) to be committed after one trial switch and one boot
/// switch, with nothing recorded as bad.
fn committed_after_one_trial(machine: &Machine, toplevel: &str) {
    wait(machine, "release 1 is committed", 60, || {
        machine.state()["last_good"] == toplevel
    });
    assert_eq!(
        machine.switch_calls(),
        [format!("test {toplevel}"), format!("boot {toplevel}")]
    );
    assert_eq!(machine.state()["bad"], serde_json::Value::Null);
    let expected = Some(toplevel.to_owned());
    assert_eq!(machine.committed(), (expected.clone(), expected));
}

fn field<'a>(entry: &'a serde_json::Value, name: &str) -> &'a str {
    entry[name].as_str().unwrap_or("")
}

#[test]
fn the_agent_runs_as_a_service_and_logs_each_phase_to_the_journal_with_fields() {
    let (machine, mut fleet, v1) = booted("");
    assert_eq!(
        machine.readlink("/run/current-system").as_deref(),
        Some(v1.as_str())
    );
    assert_eq!(
        machine
            .exec(&["systemctl", "is-active", "fleet-agent.service"])
            .stdout
            .trim(),
        "active"
    );
    let v2 = release(&mut fleet, "2", "ok");
    wait(&machine, "release 1 is committed", 60, || {
        machine.state()["last_good"] == v2.as_str()
    });
    assert_eq!(machine.committed(), (Some(v2.clone()), Some(v2.clone())));
    assert_eq!(
        machine.readlink("/run/current-system").as_deref(),
        Some(v2.as_str())
    );
    assert_eq!(
        machine.switch_calls(),
        [format!("test {v2}"), format!("boot {v2}")]
    );

    let journal = machine.journal(Some("fleet-agent.service"));
    let phases: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|e| !field(e, "PHASE").is_empty())
        .collect();
    let names: Vec<&str> = phases.iter().map(|e| field(e, "PHASE")).collect();
    assert_eq!(
        names,
        ["realising", "trial", "health", "committing", "idle"],
        "{journal:#?}"
    );
    for entry in &phases[..4] {
        assert_eq!(field(entry, "SERIAL"), "1");
        assert_eq!(field(entry, "STORE_PATH"), v2);
        // The log crate's info is journald's notice (5); warnings are 4, errors 3.
        assert_eq!(field(entry, "PRIORITY"), "5", "notice");
        assert_eq!(field(entry, "SYSLOG_IDENTIFIER"), "fleet-agent");
    }
    // The switch ran in a transient unit of its own, not in fleet-agent.service.
    let all = machine.journal(None);
    assert!(
        all.iter()
            .any(|e| field(e, "UNIT").starts_with("fleet-agent-switch-test-1-")),
        "no transient switch unit in the journal"
    );

    // A failure is logged as an error with its reason code.
    release(&mut fleet, "3", "fail");
    wait(&machine, "release 2 is rolled back", 60, || {
        machine.state()["bad"]["serial"] == 2
    });
    let journal = machine.journal(Some("fleet-agent.service"));
    let failure = journal
        .iter()
        .find(|e| field(e, "CODE") == "switch_failed")
        .expect("a switch_failed entry");
    assert_eq!(field(failure, "PRIORITY"), "3", "error: {failure}");
    assert_eq!(field(failure, "SERIAL"), "2");
    // The switch's own output, which went to its unit's journal, is in the reason.
    let state = machine.state();
    let reason = state["bad"]["reason"].as_str().unwrap();
    assert!(reason.contains("this system fails to activate"), "{state}");
    // The rollback's switch (under NixOS's unit PATH, after a daemon-reload) succeeded: the host
    // says it is back on its last good system, not that it needs a person.
    assert_eq!(state["bad"]["code"], "switch_failed", "{state}");
    assert_eq!(state["last_error"]["code"], "switch_failed", "{state}");
    assert_eq!(machine.committed(), (Some(v2.clone()), Some(v2.clone())));
    assert_eq!(
        machine.readlink("/run/current-system").as_deref(),
        Some(v2.as_str())
    );
    // Every switch ran in a transient unit the agent's journal entries name.
    let units: Vec<&str> = journal
        .iter()
        .map(|e| field(e, "SWITCH_UNIT"))
        .filter(|u| !u.is_empty())
        .collect();
    assert!(
        units
            .iter()
            .any(|u| u.starts_with("fleet-agent-switch-test-2-")),
        "{units:?}"
    );
}

#[test]
fn a_direct_switch_outlives_a_restart_of_the_agent_and_its_release_is_committed() {
    // activation.mode = "direct": the switch is the agent's own child, in the agent's cgroup.
    // KillMode=mixed sends the stop's SIGTERM to the agent alone, which waits for its switch.
    let (machine, mut fleet, _v1) = booted("[activation]\nmode = \"direct\"\n");
    let v2 = release(&mut fleet, "2", "slow");
    wait(&machine, "the trial switch is running", 60, || {
        machine.switch_calls().contains(&format!("test {v2}"))
    });
    let restarted = machine.exec(&["systemctl", "restart", "fleet-agent.service"]);
    assert_eq!(restarted.code, Some(0), "{restarted}");
    committed_after_one_trial(&machine, &v2);
}

#[test]
fn restarting_the_agent_mid_trial_kills_no_switch_and_the_new_agent_finishes_the_cycle() {
    let (machine, mut fleet, _v1) = booted("");
    let v2 = release(&mut fleet, "2", "slow");
    wait(&machine, "the trial switch is running", 60, || {
        machine.state()["phase"]["phase"] == "trial"
    });
    let restarted = machine.exec(&["systemctl", "restart", "fleet-agent.service"]);
    assert_eq!(restarted.code, Some(0), "{restarted}");
    // One trial switch, run to its end: not killed by the restart, not started again.
    committed_after_one_trial(&machine, &v2);
    // The first agent left the trial to the second, which took it over (waiting for the switch
    // when it still ran, reading its recorded result otherwise) and ran the health window.
    let journal = machine.journal(Some("fleet-agent.service"));
    let messages: Vec<&str> = journal.iter().map(|e| field(e, "MESSAGE")).collect();
    let said = |needle: &str| messages.iter().any(|m| m.contains(needle));
    assert!(
        said("stopped while release 1 is switched in fleet-agent-switch-test-1-"),
        "{messages:#?}"
    );
    assert!(said("resuming: release 1 is active"), "{messages:#?}");
    assert!(!said("rolling back"), "{messages:#?}");
}

#[test]
fn a_release_that_leaves_a_unit_failed_is_rolled_back_by_the_built_in_check() {
    let (machine, mut fleet, v1) = booted("");
    let v2 = release(&mut fleet, "2", "fail-unit");
    wait(&machine, "release 1 is rolled back", 60, || {
        machine.state()["bad"]["serial"] == 1
    });
    let state = machine.state();
    assert_eq!(state["bad"]["code"], "health_failed", "{state}");
    assert!(
        state["bad"]["reason"]
            .as_str()
            .unwrap()
            .contains("fleet-fixture-broken.service"),
        "{state}"
    );
    assert_eq!(
        machine.switch_calls(),
        [format!("test {v2}"), format!("test {v1}")]
    );
    assert_eq!(machine.committed(), (Some(v1.clone()), Some(v1.clone())));
    assert_eq!(
        machine.readlink("/run/current-system").as_deref(),
        Some(v1.as_str())
    );
}

#[test]
fn a_power_cut_during_the_trial_boots_the_last_committed_system_and_is_not_retried() {
    let (mut machine, mut fleet, v1) = booted("[report]\nurl = \"http://127.0.0.1:9400\"\n");
    // A collector on the machine's own loopback, and the machine's report key in the release.
    let collector = Collector::start_in_netns(
        machine.netns(),
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
    );
    assert_eq!(collector.url, "http://127.0.0.1:9400");
    let key = machine
        .exec(&[
            "fleet-agent",
            "--config",
            "/etc/fleet-agent/config.toml",
            "identity",
        ])
        .stdout
        .trim()
        .to_owned();
    let config = fleet.dir.join("fleet.toml");
    std::fs::write(&config, format!("[hosts.a]\nreport_key = \"{key}\"\n")).unwrap();
    fleet.fleet.set("a", |h| {
        h.version = "2".into();
        h.behaviour = "hang".into();
    });
    fleet.fleet.commit("a: 2 hang");
    fleet.release(&["--config", config.to_str().unwrap()]).ok();
    let v2 = fleet.fleet.build("a");

    wait(&machine, "the trial switch hangs", 60, || {
        machine.switch_calls().contains(&format!("test {v2}"))
    });
    machine.power_cut();
    machine.boot();
    // The boot default was never touched: the machine came back on version 1.
    let boots = machine.read("/var/log/fleet-boots.log").unwrap();
    assert_eq!(
        boots.lines().collect::<Vec<_>>(),
        [format!("booted {v1}"), format!("booted {v1}")]
    );
    wait(
        &machine,
        "the interrupted release is recorded as bad",
        60,
        || machine.state()["bad"]["serial"] == 1,
    );
    let state = machine.state();
    assert_eq!(state["bad"]["code"], "interrupted", "{state}");
    assert_eq!(state["last_error"]["code"], "interrupted", "{state}");
    // The collector heard about it.
    wait(
        &machine,
        "the collector shows the interrupted release",
        30,
        || {
            let host = collector.host("a");
            host["report"]["error"]["code"] == "interrupted" && host["health"] == "failing"
        },
    );
    // Several polls later it has not been tried again.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let trials = machine
        .switch_calls()
        .iter()
        .filter(|c| **c == format!("test {v2}"))
        .count();
    assert_eq!(trials, 1, "{:?}", machine.switch_calls());
    assert_eq!(machine.committed(), (Some(v1.clone()), Some(v1.clone())));
    assert_eq!(
        machine.readlink("/run/current-system").as_deref(),
        Some(v1.as_str())
    );
}

#[test]
fn a_new_kernel_is_booted_into_checked_after_the_boot_and_rolled_back_with_another_reboot() {
    // Healthy unless the machine runs kernel 6.9.
    let (mut machine, mut fleet, v1) = booted(
        r#"
[activation]
reboot = "auto"

[[health.checks]]
name = "not kernel 6.9"
type = "command"
command = ["/bin/sh", "-c", "! grep -q 6.9 /run/current-system/kernel"]
"#,
    );
    let release_kernel = |fleet: &mut Fleet, version: &str, kernel: &str| {
        fleet.fleet.set("a", |h| {
            h.version = version.into();
            h.kernel = kernel.into();
        });
        fleet.fleet.commit(&format!("a: {version} kernel {kernel}"));
        fleet.release(&[]).ok();
        fleet.fleet.build("a")
    };

    // A new kernel: made the boot default, booted into, checked, committed.
    let v2 = release_kernel(&mut fleet, "2", "6.2.0");
    machine.wait_for_reboot(60);
    wait(
        &machine,
        "release 1 is committed after the boot",
        60,
        || machine.state()["last_good"] == v2.as_str(),
    );
    assert_eq!(
        machine.readlink("/run/booted-system").as_deref(),
        Some(v2.as_str())
    );
    assert_eq!(machine.committed(), (Some(v2.clone()), Some(v2.clone())));
    assert_eq!(machine.state()["reboot_needed"], false);
    // Never tried live: its first activation was the boot.
    assert!(!machine.switch_calls().contains(&format!("test {v2}")));

    // A kernel the health check rejects: booted into, rolled back, and booted out of again.
    let v3 = release_kernel(&mut fleet, "3", "6.9.0");
    machine.wait_for_reboot(60);
    machine.wait_for_reboot(60);
    wait(&machine, "release 2 is recorded as bad", 60, || {
        machine.state()["bad"]["serial"] == 2
    });
    let state = machine.state();
    assert_eq!(state["bad"]["code"], "health_failed", "{state}");
    assert_eq!(state["last_good"], v2.as_str());
    assert_eq!(
        machine.readlink("/run/booted-system").as_deref(),
        Some(v2.as_str())
    );
    assert_eq!(
        machine.readlink("/run/current-system").as_deref(),
        Some(v2.as_str())
    );
    assert_eq!(machine.committed(), (Some(v2.clone()), Some(v2.clone())));
    let boots = machine.read("/var/log/fleet-boots.log").unwrap();
    assert_eq!(
        boots.lines().collect::<Vec<_>>(),
        [
            format!("booted {v1}"),
            format!("booted {v2}"),
            format!("booted {v3}"),
            format!("booted {v2}")
        ]
    );
}

#[test]
fn a_release_that_changes_the_agents_own_unit_restarts_the_agent_only_after_the_commit() {
    let (machine, mut fleet, _v1) = booted("");
    let main_pid = || machine.unit_property("fleet-agent.service", "MainPID");
    let first = main_pid();
    let v2 = release(&mut fleet, "2", "new-agent");
    wait(&machine, "release 1 is committed", 60, || {
        machine.state()["last_good"] == v2.as_str()
    });
    wait(&machine, "the agent restarts into its new unit", 30, || {
        let pid = main_pid();
        pid != first && pid != "0"
    });
    // The new agent runs with what the release put into its unit.
    let environ = machine
        .read(&format!("/proc/{}/environ", main_pid()))
        .unwrap_or_default();
    assert!(
        environ.contains(&format!("FLEET_FIXTURE_SYSTEM={v2}")),
        "{environ:?}"
    );
    // ... and the settings the release gave it: its config by a path of its own.
    let cmdline = machine
        .read(&format!("/proc/{}/cmdline", main_pid()))
        .unwrap_or_default();
    let name = v2.rsplit('/').next().unwrap();
    assert!(
        cmdline.contains(&format!("/etc/fleet-agent/config-{name}.toml")),
        "{cmdline:?}"
    );
    // One start before the release, the next only after its commit.
    let messages: Vec<String> = machine
        .journal(Some("fleet-agent.service"))
        .iter()
        .map(|e| field(e, "MESSAGE").to_owned())
        .collect();
    let at = |needle: &str| -> Vec<usize> {
        messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.contains(needle))
            .map(|(i, _)| i)
            .collect()
    };
    let starts = at("fleet-agent 0.1.0 started");
    let trial = at("phase realising -> trial (release 1)");
    let committed = at("release 1 committed");
    assert_eq!(starts.len(), 2, "{messages:#?}");
    assert_eq!((trial.len(), committed.len()), (1, 1), "{messages:#?}");
    assert!(
        starts[0] < trial[0] && committed[0] < starts[1],
        "{messages:#?}"
    );
    assert!(!at("restarting into it now that it is committed").is_empty());
}

#[test]
fn a_hung_agent_is_restarted_by_its_watchdog_and_finishes_the_trial() {
    let (machine, mut fleet, _v1) = booted("");
    // Type=notify: the agent said it is ready, and says what it does.
    let status = || machine.unit_property("fleet-agent", "StatusText");
    assert!(
        status().starts_with("idle: committed release"),
        "{}",
        status()
    );
    // The agent's thread will hang in the health window; its watchdog is 3 s.
    let dropin = "/etc/systemd/system/fleet-agent.service.d/test.conf";
    machine.write(
        dropin,
        "[Service]\nWatchdogSec=3s\nEnvironment=FLEET_AGENT_FAILPOINT=during-health:hang\n",
    );
    assert_eq!(machine.exec(&["systemctl", "daemon-reload"]).code, Some(0));
    let restarted = machine.exec(&["systemctl", "restart", "fleet-agent.service"]);
    assert_eq!(restarted.code, Some(0), "{restarted}");
    let v2 = release(&mut fleet, "2", "ok");
    let said = |needle: &str| {
        machine
            .journal(None)
            .iter()
            .any(|e| field(e, "MESSAGE").contains(needle))
    };
    wait(&machine, "the agent hangs in its health window", 60, || {
        said("fail point during-health reached: hanging")
    });
    assert!(status().starts_with("health release 1"), "{}", status());
    // The next start must not hang again.
    machine.write(dropin, "[Service]\nWatchdogSec=3s\n");
    assert_eq!(machine.exec(&["systemctl", "daemon-reload"]).code, Some(0));
    committed_after_one_trial(&machine, &v2);
    assert!(said("Watchdog timeout"), "systemd killed the agent");
    assert!(said("resuming: release 1 is active"));
}

#[test]
fn a_boot_that_does_not_run_the_committed_system_is_reported_and_the_boot_default_set_again() {
    let (mut machine, mut fleet, v1) = booted("");
    let v2 = release(&mut fleet, "2", "ok");
    wait(&machine, "release 1 is committed", 60, || {
        machine.state()["last_good"] == v2.as_str()
    });
    // A bootloader that boots its old entry whatever its config says.
    machine.link("/boot/fleet-default", &v1);
    machine.reboot();
    assert_eq!(
        machine.readlink("/run/booted-system").as_deref(),
        Some(v1.as_str())
    );
    wait(&machine, "the boot drift is reported", 60, || {
        machine.state()["last_error"]["code"] == "boot_drift"
    });
    let state = machine.state();
    let message = state["last_error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "this boot runs {v1}, not the committed system {v2}"
        )),
        "{state}"
    );
    assert!(
        message.contains("made it the boot default again"),
        "{state}"
    );
    assert_eq!(state["last_good"], v2.as_str(), "the commit stands");
    // Made the boot default again, once: the next boot runs the committed system.
    assert_eq!(
        machine.switch_calls(),
        [
            format!("test {v2}"),
            format!("boot {v2}"),
            format!("boot {v2}")
        ]
    );
    assert_eq!(
        machine.readlink("/boot/fleet-default").as_deref(),
        Some(v2.as_str())
    );
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(machine.switch_calls().len(), 3, "repaired once per boot");
    machine.reboot();
    wait(
        &machine,
        "the drift clears after a boot into release 1",
        60,
        || machine.state()["last_error"].is_null(),
    );
    assert_eq!(
        machine.readlink("/run/booted-system").as_deref(),
        Some(v2.as_str())
    );
}
