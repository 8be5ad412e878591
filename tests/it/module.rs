//! The NixOS modules evaluated by nixpkgs' real module system (`nixos-module/tests/eval.nix`,
//! with stub declarations of the NixOS options they touch): defaults, every assertion, the unit
//! they make, and settings rendered to TOML that `fleet-agent check-config` accepts.
//!
//! nixpkgs' `lib` comes from `$FLEET_NIXPKGS_LIB` (scripts/test unpacks the snapshot in
//! `../shared/nixpkgs-lib/` there). Without it these tests say so and pass, except under CI
//! (`CI` set), where they fail: CI never skips them.

use fleet_tests::nix::nix;
use fleet_tests::{binary, command, run, TestDir};
use std::path::{Path, PathBuf};

fn nixpkgs_lib() -> Option<PathBuf> {
    match std::env::var_os("FLEET_NIXPKGS_LIB") {
        Some(lib) => Some(PathBuf::from(lib)),
        None if std::env::var_os("CI").is_some() => {
            panic!("FLEET_NIXPKGS_LIB is not set: CI must evaluate the modules")
        }
        None => {
            eprintln!("module tests skipped: FLEET_NIXPKGS_LIB is not set (scripts/test sets it)");
            None
        }
    }
}

/// Evaluates the modules with `config` (a Nix expression for a module).
/// `fleet-agent check-config` on the settings a module rendered.
fn check_config(settings: &serde_json::Value) -> fleet_tests::Run {
    let dir = TestDir::new();
    let file = dir.join("config.toml");
    std::fs::write(&file, toml::to_string(settings).unwrap()).unwrap();
    let mut c = command("fleet-agent");
    c.arg("check-config").arg(&file);
    run(c)
}

fn eval(lib: &Path, config: &str) -> serde_json::Value {
    eval_with(lib, &format!("config = {config};"))
}

/// Evaluates the harness with `arguments` (`config = …; viaFlake = true; vmTest = "…";`).
fn eval_with(lib: &Path, arguments: &str) -> serde_json::Value {
    let out = eval_attribute(lib, arguments, "");
    out.ok();
    serde_json::from_str(&out.stdout).unwrap()
}

/// `nix eval` of the harness's `attribute` (`.tags`; empty: all of it), which may fail.
fn eval_attribute(lib: &Path, arguments: &str, attribute: &str) -> fleet_tests::Run {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nixos-module/tests/eval.nix");
    let mut c = nix();
    c.args(["eval", "--json", "--impure", "--expr"])
        .arg(format!(
            "(import {} {{ lib = import {}; {arguments} }}){attribute}",
            harness.display(),
            lib.display()
        ));
    run(c)
}

/// An agent config module with `settings` added to a minimal valid one.
fn agent(settings: &str) -> String {
    format!(
        r#"{{ services.fleet-agent = {{ enable = true; settings = {{
            fleet = "home";
            trusted_keys = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ];
            channel = "git+https://git.example.org/fleet.git#fleet-release";
            {settings}
        }}; }}; }}"#
    )
}

#[test]
fn the_agent_module_makes_a_unit_that_survives_its_own_switch() {
    let Some(lib) = nixpkgs_lib() else { return };
    let out = eval(&lib, &agent(""));
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    let unit = &out["agent"];
    let service = &unit["serviceConfig"];
    // The checked config by its store path, the same file /etc/fleet-agent/config.toml is.
    let exec = service["ExecStart"].as_str().unwrap();
    let config = out["etc"]["fleet-agent/config.toml"].as_str().unwrap();
    assert!(config.starts_with("/nix/store/"), "{config}");
    assert!(config.ends_with("-fleet-agent-checked.toml"), "{config}");
    assert!(
        exec.ends_with(&format!(
            "-fleet-gitops-agent/bin/fleet-agent --config {config} run"
        )),
        "{exec}"
    );
    // Never restarted or stopped by a switch; a stop waits for a direct-child switch.
    assert_eq!(unit["restartIfChanged"], false);
    assert_eq!(unit["stopIfChanged"], false);
    assert_eq!(unit["unitConfig"]["X-StopOnRemoval"], false);
    assert_eq!(service["KillMode"], "mixed");
    assert_eq!(service["Type"], "notify");
    assert_eq!(service["WatchdogSec"], "3min");
    assert_eq!(service["StateDirectory"], "fleet-agent");
    // SIGHUP is "poll now", not a reload: no ExecReload.
    assert!(service.get("ExecReload").is_none(), "{service:#}");
    // The agent alone on the host: no fleet-sign, no SQLite.
    assert_eq!(
        out["systemPackages"],
        serde_json::json!(["fleet-gitops-agent"])
    );
    let path: Vec<&str> = unit["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for needed in ["-nix", "-systemd", "-coreutils", "-openssh"] {
        assert!(path.iter().any(|p| p.ends_with(needed)), "{path:?}");
    }
    assert_eq!(out["collector"], serde_json::Value::Null);
}

#[test]
fn a_settings_change_changes_the_agents_command_line() {
    let Some(lib) = nixpkgs_lib() else { return };
    let exec = |settings: &str| {
        eval(&lib, &agent(settings))["agent"]["serviceConfig"]["ExecStart"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = exec("");
    assert_eq!(exec(""), before, "the same settings, the same unit");
    assert_ne!(exec("poll_interval = \"5m\";"), before);
    assert_ne!(exec("health.window = \"2m\";"), before);
}

#[test]
fn proxy_and_ssh_come_from_the_hosts_own_settings() {
    let Some(lib) = nixpkgs_lib() else { return };
    let config = agent("").replacen(
        "{ services.fleet-agent",
        r#"{ networking.proxy.envVars = { https_proxy = "http://proxy.example.org:3128"; };
             programs.ssh.package = { type = "derivation"; name = "openssh-hpn";
               outPath = "/nix/store/hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-openssh-hpn"; };
             services.fleet-agent"#,
        1,
    );
    let out = eval(&lib, &config);
    assert_eq!(
        out["agent"]["environment"]["https_proxy"],
        "http://proxy.example.org:3128"
    );
    assert!(out["agent"]["path"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p.as_str().unwrap().ends_with("-openssh-hpn")));
}

#[test]
fn every_assertion_of_the_agent_module_fires_and_says_how_to_fix_it() {
    let Some(lib) = nixpkgs_lib() else { return };
    let rows = [
        (
            r#"{ services.fleet-agent = { enable = true; settings = { fleet = "home"; trusted_keys = [ ]; channel = "/srv"; }; }; }"#.to_owned(),
            "trusted_keys is empty",
        ),
        (agent("threshold = 2;"), "threshold is above the number of trusted_keys"),
        (
            agent("token_file = \"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-token\";"),
            "must be paths outside the Nix store",
        ),
        (
            agent("").replacen("{ services", "{ nix.settings.require-sigs = false; services", 1),
            "needs nix.settings.require-sigs = true",
        ),
        (
            agent("paths.state_dir = \"/srv/fleet\";"),
            "state_dir must be below /var/lib",
        ),
        (
            agent("paths.runtime_dir = \"/var/lib/fleet-run\";"),
            "runtime_dir must be below /run",
        ),
    ];
    for (config, message) in rows {
        let failed = eval(&lib, &config)["failedAssertions"].clone();
        let failed: Vec<&str> = failed
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert!(
            failed.iter().any(|m| m.contains(message)),
            "{config}: {failed:?}"
        );
    }
    // A state directory of its own below /var/lib is the unit's StateDirectory.
    let out = eval(&lib, &agent("paths.state_dir = \"/var/lib/fleet\";"));
    assert_eq!(out["failedAssertions"], serde_json::json!([]));
    assert_eq!(out["agent"]["serviceConfig"]["StateDirectory"], "fleet");
    // The runtime directory (agent.json, rewritten after every poll) is on tmpfs.
    assert_eq!(
        out["agent"]["serviceConfig"]["RuntimeDirectory"],
        "fleet-agent"
    );
    let out = eval(&lib, &agent("paths.runtime_dir = \"/run/fleet\";"));
    assert_eq!(out["agent"]["serviceConfig"]["RuntimeDirectory"], "fleet");
}

#[test]
fn every_documented_setting_renders_to_toml_that_check_config_accepts() {
    let Some(lib) = nixpkgs_lib() else { return };
    let out = eval(
        &lib,
        &agent(
            r#"
            host = "router1";
            threshold = 1;
            realise = "substitute-or-build";
            token_file = "/run/secrets/fleet-channel";
            ca_file = "/etc/ssl/company-ca.pem";
            poll_interval = "5m";
            poll_splay = "30s";
            max_backoff = "1h";
            channel_timeout = "60s";
            realise_timeout = "1h";
            disk_reserve = "1GiB";
            collect_garbage = true;
            max_attempts = 3;
            activation = { mode = "systemd-run"; timeout = "10m"; reboot = "auto"; reboot_window = "02:00-05:00"; };
            health = {
              window = "2m"; interval = "10s"; no_failed_units = true; channel_reachable = true;
              checks = [
                { name = "dns"; type = "unit"; unit = "unbound.service"; }
                { name = "web"; type = "http"; url = "http://127.0.0.1:80/"; status = 200; required = false; timeout = "5s"; }
                { name = "ssh"; type = "tcp"; address = "127.0.0.1:22"; }
                { name = "ok"; type = "command"; command = [ "/run/current-system/sw/bin/true" ]; }
              ];
            };
            paths = { state_dir = "/var/lib/fleet-agent"; runtime_dir = "/run/fleet-agent"; metrics_dir = "/var/lib/prometheus-node-exporter"; boot_dir = "/boot"; };
            report = { url = "https://collector.example.org:9400"; heartbeat = "5m"; };
        "#,
        ),
    );
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    let checked = check_config(&out["settings"]);
    assert_eq!(checked.code, Some(0), "{}\n{checked}", out["settings"]);
    assert!(binary("fleet-agent").exists());
}

#[test]
fn the_collector_module_runs_fleet_sign_collect_as_a_dynamic_user() {
    let Some(lib) = nixpkgs_lib() else { return };
    let out = eval(
        &lib,
        r#"{ services.fleet-collector = {
            enable = true;
            fleet = "home";
            channel = "git+https://git.example.org/fleet.git#fleet-release";
            trustedKeys = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ];
            listen = "0.0.0.0:9400";
            openFirewall = true;
        }; }"#,
    );
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    let service = &out["collector"]["serviceConfig"];
    let exec = service["ExecStart"].as_str().unwrap();
    assert!(
        exec.contains("-fleet-gitops/bin/fleet-sign collect"),
        "{exec}"
    );
    assert!(exec.contains("--fleet home"), "{exec}");
    assert_eq!(service["DynamicUser"], true);
    assert_eq!(out["firewall"], serde_json::json!([9400]));
    assert_eq!(out["agent"], serde_json::Value::Null);
    assert!(out["collector"]["environment"]
        .get("FLEET_CA_FILE")
        .is_none());
    // A private CA for the channel: fleet-sign's FLEET_CA_FILE, for collect and refresh.
    let out = eval(
        &lib,
        r#"{ services.fleet-collector = {
            enable = true;
            fleet = "home";
            channel = "git+https://git.lan/fleet.git";
            trustedKeys = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ];
            caFile = "/etc/ssl/home-ca.pem";
            environmentFile = "/run/secrets/fleet-s3";
            freshness.keys = [ "fresh-ci:5SO5A/3oRhOc7Gu5S3hwoRPaJLNITTyEeM8zxnnkNbk=" ];
            freshness.keyFile = "/run/secrets/fresh.sec";
            freshness.channels = [ "git+https://git.lan/fleet.git" ];
        }; }"#,
    );
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    for unit in ["collector", "refresh"] {
        assert_eq!(
            out[unit]["environment"]["FLEET_CA_FILE"], "/etc/ssl/home-ca.pem",
            "{unit}"
        );
        assert_eq!(
            out[unit]["serviceConfig"]["EnvironmentFile"], "/run/secrets/fleet-s3",
            "{unit}"
        );
    }
    // No keys: refused with a reason.
    let failed = eval(
        &lib,
        r#"{ services.fleet-collector = { enable = true; fleet = "home"; channel = "/srv"; trustedKeys = [ ]; }; }"#,
    )["failedAssertions"]
        .clone();
    assert!(
        failed[0].as_str().unwrap().contains("trustedKeys"),
        "{failed}"
    );
}

#[test]
fn freshness_keys_reach_the_agent_and_a_timer_refreshes_the_channels() {
    let Some(lib) = nixpkgs_lib() else { return };
    const RELEASE: &str = "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=";
    const FRESH: &str = "fresh-ci:5SO5A/3oRhOc7Gu5S3hwoRPaJLNITTyEeM8zxnnkNbk=";
    let out = eval(
        &lib,
        &format!(
            r#"{{ services.fleet-collector = {{
                enable = true;
                fleet = "home";
                channel = "/srv/www/fleet";
                trustedKeys = [ "{RELEASE}" ];
                freshness.keys = [ "{FRESH}" ];
                freshness.keyFile = "/run/secrets/fresh.sec";
                freshness.channels = [ "/srv/www/fleet" "git+ssh://git@git.example.org/fleet.git" ];
            }};
            services.fleet-agent = {{
                enable = true;
                settings = {{ fleet = "home"; trusted_keys = [ "{RELEASE}" ];
                    freshness_keys = [ "{FRESH}" ]; channel = "https://example.org/fleet"; }};
            }}; }}"#
        ),
    );
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    assert_eq!(
        out["settings"]["freshness_keys"],
        serde_json::json!([FRESH])
    );
    let collect = out["collector"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(
        collect.contains(&format!("--freshness-key '{FRESH}'")),
        "{collect}"
    );
    let refresh = &out["refresh"]["serviceConfig"];
    let exec = refresh["ExecStart"].as_str().unwrap();
    for part in [
        "/bin/fleet-sign refresh --fleet home --freshness-key %d/freshness-key --expires 7d",
        &format!("--trusted-key '{RELEASE}'"),
        "--channel /srv/www/fleet --channel git+ssh://git@git.example.org/fleet.git",
    ] {
        assert!(exec.contains(part), "{part} in {exec}");
    }
    assert_eq!(
        refresh["LoadCredential"],
        serde_json::json!(["freshness-key:/run/secrets/fresh.sec"])
    );
    // It writes the directory channel, confined to it.
    assert_eq!(
        refresh["ReadWritePaths"],
        serde_json::json!(["/srv/www/fleet"])
    );
    assert_eq!(refresh["ProtectSystem"], "strict");
    assert_eq!(out["refreshTimer"]["timerConfig"]["OnCalendar"], "hourly");
    assert_eq!(
        out["refreshTimer"]["wantedBy"],
        serde_json::json!(["timers.target"])
    );
    // The agent's settings pass the agent's own check.
    let checked = check_config(&out["settings"]);
    assert_eq!(checked.code, Some(0), "{checked}");
    assert!(checked.stdout.contains("freshness"), "{checked}");

    // A release key as freshness key, and an http channel to refresh: refused with reasons.
    let failed = eval(
        &lib,
        &format!(
            r#"{{ services.fleet-collector = {{ enable = true; fleet = "home";
                channel = "https://example.org/fleet"; trustedKeys = [ "{RELEASE}" ];
                freshness.keyFile = "/run/secrets/fresh.sec"; }};
            services.fleet-agent = {{ enable = true; settings = {{ fleet = "home";
                trusted_keys = [ "{RELEASE}" ]; freshness_keys = [ "{}" ];
                channel = "https://example.org/fleet"; }}; }}; }}"#,
            RELEASE.replacen("ops-2026", "fresh", 1)
        ),
    )["failedAssertions"]
        .clone();
    let failed = failed.to_string();
    assert!(
        failed.contains("freshness_keys holds a release key"),
        "{failed}"
    );
    assert!(failed.contains("freshness.channels must be"), "{failed}");
    assert_eq!(
        eval(
            &lib,
            r#"{ services.fleet-collector = { enable = true; fleet = "home"; channel = "/srv";
                trustedKeys = [ "a:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ]; }; }"#
        )["refresh"],
        serde_json::Value::Null
    );
}

#[test]
fn the_collector_runs_under_its_modules_hardening_in_a_booted_machine() {
    use crate::common::Fleet;
    use fleet_tests::machine::Machine;
    let Some(lib) = nixpkgs_lib() else { return };
    let fleet = Fleet::new(&["a"]);
    fleet.release(&[]).ok();
    // The channel is git, served by `git daemon` in the machine: the collector runs git under
    // its sandbox (system call filter included).
    let out = eval(
        &lib,
        &format!(
            r#"{{ services.fleet-collector = {{ enable = true; fleet = "home";
                channel = "git://127.0.0.1/fleet.git"; trustedKeys = [ "{}" ];
                listen = "127.0.0.1:9400"; refresh = "1s"; }}; }}"#,
            fleet.release_public_key()
        ),
    );
    // The unit as NixOS would write it, with fleet-sign where the machine has it.
    let service = out["collector"]["serviceConfig"].as_object().unwrap();
    let mut unit = String::from("[Unit]\nDescription=fleet-collector\n\n[Service]\n");
    unit += "Environment=PATH=/usr/bin:/bin\n";
    for (key, value) in service {
        let values = match value {
            serde_json::Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for value in values {
            let text = match value {
                serde_json::Value::Bool(b) => if b { "yes" } else { "no" }.to_owned(),
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            let text = match text.find("-fleet-gitops/bin/") {
                Some(at) if key == "ExecStart" => {
                    let start = text[..at].rfind("/nix/store/").unwrap();
                    format!("{}/usr/local/bin/{}", &text[..start], &text[at + 18..])
                }
                _ => text,
            };
            unit += &format!("{key}={text}\n");
        }
    }
    let remotes = fleet.git_remote.parent().unwrap().to_owned();
    let mut machine = Machine::new(
        &fleet.dir.join("machines/c"),
        "c",
        &[(remotes.as_path(), "/srv/remotes")],
    );
    machine.link("/etc/systemd/system/fleet-agent.service", "/dev/null");
    machine.link("/etc/systemd/system/fleet-boot.service", "/dev/null");
    machine.write("/etc/systemd/system/fleet-collector.service", &unit);
    machine.boot();
    let daemon = machine.exec(&[
        "systemd-run",
        "--unit=git-daemon",
        "/usr/bin/git",
        "daemon",
        "--base-path=/srv/remotes",
        "--export-all",
        "--listen=127.0.0.1",
    ]);
    assert_eq!(daemon.code, Some(0), "{daemon}");
    let started = machine.exec(&["systemctl", "start", "fleet-collector.service"]);
    assert_eq!(started.code, Some(0), "{started}\n{unit}");
    let status = || {
        machine.exec(&[
            "fleet-sign",
            "status",
            "--collector",
            "http://127.0.0.1:9400",
        ])
    };
    let seen = (0..150).any(|_| {
        let up = status().stdout.starts_with("fleet home: release 1");
        if !up {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        up
    });
    assert!(
        seen,
        "{}\n{:#?}\n{unit}",
        status(),
        machine
            .journal(Some("fleet-collector.service"))
            .iter()
            .map(|e| e["MESSAGE"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    );
    // Not root: a user of its own, made for it.
    let pid = machine.unit_property("fleet-collector", "MainPID");
    let proc_status = machine.read(&format!("/proc/{pid}/status")).unwrap();
    let uid = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(uid, "0", "{proc_status}");
}

#[test]
fn the_collector_reads_a_private_git_channel_with_the_credentials_its_module_hands_it() {
    use crate::common::Fleet;
    use fleet_tests::git::{GitHttpServer, SshServer};
    let Some(lib) = nixpkgs_lib() else { return };
    let fleet = Fleet::new(&["a"]);
    fleet.release(&[]).ok();
    let secrets = fleet.dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("token"), "s3cret\n").unwrap();
    std::fs::write(secrets.join("wrong-token"), "guess\n").unwrap();
    let http = GitHttpServer::serve(&fleet.dir.join("remotes"), Some("s3cret"));
    let ssh = SshServer::start(&fleet.dir.join("sshd"));
    let empty_known_hosts = secrets.join("empty_known_hosts");
    std::fs::write(&empty_known_hosts, "").unwrap();

    // Reads the channel the way the collector's unit would: the module's environment, its
    // LoadCredential files in a credentials directory, `%d` expanded by "systemd".
    let read = |channel: &str, options: &str| {
        let out = eval(
            &lib,
            &format!(
                r#"{{ services.fleet-collector = {{ enable = true; fleet = "home";
                    channel = "{channel}"; trustedKeys = [ "{}" ]; {options} }}; }}"#,
                fleet.release_public_key()
            ),
        );
        assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
        let unit = &out["collector"];
        let credentials = TestDir::new();
        for entry in unit["serviceConfig"]["LoadCredential"].as_array().unwrap() {
            let (id, source) = entry.as_str().unwrap().split_once(':').unwrap();
            std::fs::copy(source, credentials.join(id)).unwrap();
        }
        let mut c = command("fleet-sign");
        c.args([
            "verify",
            "--from",
            channel,
            "--key",
            &fleet.release_public_key(),
        ]);
        c.env("CREDENTIALS_DIRECTORY", credentials.path());
        for (key, value) in unit["environment"].as_object().unwrap() {
            let value = value.as_str().unwrap();
            c.env(
                key,
                value.replace("%d", &credentials.path().display().to_string()),
            );
        }
        // No ssh-agent or user config of the test machine's root may help.
        c.env_remove("SSH_AUTH_SOCK")
            .env("HOME", credentials.path());
        run(c)
    };
    let http_url = format!("git+{}", http.url("fleet.git"));
    let ssh_url = format!("git+{}", ssh.url(&fleet.git_remote));
    let token = |name: &str| format!("tokenFile = \"{}\";", secrets.join(name).display());
    let deploy_key = |known_hosts: &std::path::Path| {
        format!(
            "sshKeyFile = \"{}\"; sshKnownHostsFile = \"{}\";",
            ssh.client_key.display(),
            known_hosts.display()
        )
    };
    let ok = read(&http_url, &token("token"));
    assert_eq!(ok.code, Some(0), "{ok}");
    assert!(ok.stdout.starts_with("release 1 of fleet 'home'"), "{ok}");
    assert_ne!(read(&http_url, &token("wrong-token")).code, Some(0));
    assert_ne!(read(&http_url, "").code, Some(0), "no token, no release");
    let ok = read(&ssh_url, &deploy_key(&ssh.known_hosts));
    assert_eq!(ok.code, Some(0), "{ok}");
    let unknown_host = read(&ssh_url, &deploy_key(&empty_known_hosts));
    assert_ne!(unknown_host.code, Some(0), "{unknown_host}");
}

#[test]
fn the_flakes_module_brings_the_flakes_own_packages_without_an_overlay() {
    let Some(lib) = nixpkgs_lib() else { return };
    let config = agent("").replacen(
        "{ services.fleet-agent",
        r#"{ services.fleet-collector = { enable = true; fleet = "home"; channel = "/srv";
               trustedKeys = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ]; };
             services.fleet-agent"#,
        1,
    );
    let out = eval_with(&lib, &format!("config = {config}; viaFlake = true;"));
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    // A git channel: the agent without S3 support (less idle memory).
    let agent = out["agent"]["serviceConfig"]["ExecStart"].as_str().unwrap();
    assert!(
        agent.contains("-flake-fleet-gitops-agent-no-s3/bin/fleet-agent "),
        "{agent}"
    );
    let collector = out["collector"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(
        collector.contains("-flake-fleet-gitops/bin/fleet-sign"),
        "{collector}"
    );
    assert_eq!(
        out["systemPackages"],
        serde_json::json!(["flake-fleet-gitops-agent-no-s3"])
    );
    // A channel in an S3 bucket: the agent with it.
    let s3 = config.replacen(
        "git+https://git.example.org/fleet.git#fleet-release",
        "cache+s3://nix-cache?region=eu-central-1",
        1,
    );
    let out = eval_with(&lib, &format!("config = {s3}; viaFlake = true;"));
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    let agent = out["agent"]["serviceConfig"]["ExecStart"].as_str().unwrap();
    assert!(
        agent.contains("-flake-fleet-gitops-agent/bin/fleet-agent "),
        "{agent}"
    );
}

#[test]
fn the_vm_tests_evaluate_with_the_flakes_module_and_their_scripts_parse() {
    let Some(lib) = nixpkgs_lib() else { return };
    let out = eval_with(&lib, r#"vmTest = "switch-and-rollback";"#);
    // The test's host: the flake's module, the agent enabled, the systems it releases.
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    assert!(out["agent"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap()
        .contains("-flake-fleet-gitops-agent-no-s3/bin/fleet-agent"));
    assert_eq!(
        out["specialisations"],
        serde_json::json!(["bad", "good", "sick", "slow"])
    );
    let key = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../vm-tests/keys/release.sec.pub"),
    )
    .unwrap();
    assert_eq!(
        out["settings"]["trusted_keys"],
        serde_json::json!([key.trim()])
    );
    // Its agent settings are a config the agent takes.
    let checked = check_config(&out["settings"]);
    assert_eq!(checked.code, Some(0), "{checked}");
    // Every test script is Python the test driver can load.
    let tests = out["vmTests"].as_object().unwrap();
    assert!(!tests.is_empty());
    let dir = TestDir::new();
    for (name, test) in tests {
        let file = dir.join(format!("{name}.py"));
        std::fs::write(&file, test["script"].as_str().unwrap()).unwrap();
        let mut c = std::process::Command::new("python3");
        c.args(["-m", "py_compile"]).arg(&file);
        let compiled = run(c);
        assert_eq!(compiled.code, Some(0), "{name}: {compiled}");
    }
}

#[test]
fn the_fleet_vm_test_releases_systems_its_hosts_do_not_have() {
    let Some(lib) = nixpkgs_lib() else { return };
    let node = |name: &str| eval_with(&lib, &format!(r#"vmTest = "fleet"; vmNode = "{name}";"#));
    let (server, host1, host2) = (node("server"), node("host1"), node("host2"));
    for out in [&server, &host1, &host2] {
        assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    }
    // The server: a collector reading the directory fleet-sign publishes to, open to the hosts.
    assert!(server["collector"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap()
        .contains("--from /srv/release"));
    assert_eq!(server["firewall"], serde_json::json!([9400, 80]));
    for (name, host) in [("host1", &host1), ("host2", &host2)] {
        // Each host's next system is another system than its own, built beside it.
        let next = &host["build"]["fleetNext"];
        assert_ne!(next["parts"], host["toplevel"], "{name}");
        assert_eq!(next["parts"]["etc"]["fleet-version"], "2", "{name}");
        assert_eq!(host["toplevel"]["etc"]["fleet-version"], "1", "{name}");
        assert!(next["path"]
            .as_str()
            .unwrap()
            .contains(&format!("-nixos-system-{name}-")));
        // Reached over git+ssh with a deploy key outside the store, substituted from the server.
        assert!(host["settings"]["channel"]
            .as_str()
            .unwrap()
            .starts_with("git+ssh://git@server/"));
        assert_eq!(
            host["settings"]["substituters"],
            serde_json::json!(["http://server"])
        );
        let checked = check_config(&host["settings"]);
        assert_eq!(checked.code, Some(0), "{name}: {checked}");
    }
    // host1's next system changes the agent's package and its config: the agent restarts into
    // them after the commit.
    let now = host1["toplevel"]["agentExecStart"].as_str().unwrap();
    let next = host1["build"]["fleetNext"]["parts"]["agentExecStart"]
        .as_str()
        .unwrap();
    assert!(next.contains("-fleet-gitops-agent-next-"), "{next}");
    assert_ne!(
        now.split(' ').nth(2),
        next.split(' ').nth(2),
        "a new config"
    );
    // host2's changes its initrd (a reboot), which it allows; its agent stays as it is.
    assert_eq!(host2["settings"]["activation"]["reboot"], "auto");
    let next2 = &host2["build"]["fleetNext"]["parts"];
    assert_eq!(
        next2["boot"]["initrd"]["kernelModules"],
        serde_json::json!(["dm-snapshot"])
    );
    assert_eq!(next2["agentExecStart"], host2["toplevel"]["agentExecStart"]);
    // The script names the next systems' store paths.
    let script = host1["vmTests"]["fleet"]["script"].as_str().unwrap();
    for name in ["host1", "host2"] {
        let path = node(name)["build"]["fleetNext"]["path"].clone();
        assert!(script.contains(path.as_str().unwrap()), "{name}");
    }
}

#[test]
fn a_cache_channel_in_a_bucket_gets_its_credentials_from_an_environment_file() {
    let Some(lib) = nixpkgs_lib() else { return };
    let module = |file: &str| {
        format!(
            r#"{{ services.fleet-agent = {{ enable = true; environmentFile = "{file}"; settings = {{
                fleet = "home";
                trusted_keys = [ "ops-2026:49SIOpjnGSp5r+SsncgIRf6j4OKvy4m67GEJc2oWQ3s=" ];
                channel = "cache+s3://nix-cache?region=eu-central-1";
            }}; }}; }}"#
        )
    };
    let out = eval(&lib, &module("/run/secrets/fleet-s3"));
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    assert_eq!(
        out["agent"]["serviceConfig"]["EnvironmentFile"],
        "/run/secrets/fleet-s3"
    );
    // Not from the world-readable store.
    let out = eval(
        &lib,
        &module("/nix/store/0000000000000000000000000000000a-creds"),
    );
    let failed = out["failedAssertions"].to_string();
    assert!(failed.contains("environmentFile"), "{failed}");
    // Without one, no EnvironmentFile line.
    let out = eval(&lib, &agent(""));
    assert!(out["agent"]["serviceConfig"]
        .get("EnvironmentFile")
        .is_none());
}

#[test]
fn tags_for_fleet_sign_are_an_option_of_the_agent_module() {
    let Some(lib) = nixpkgs_lib() else { return };
    // fleet-sign's `tag:NAME` reads config.services.fleet-agent.tags of each host.
    let out = eval(&lib, &agent(""));
    assert_eq!(out["tags"], serde_json::json!([]));
    let tagged = agent("").replacen(
        "enable = true;",
        r#"enable = true; tags = [ "canary" "pi" ];"#,
        1,
    );
    let out = eval(&lib, &tagged);
    assert_eq!(out["tags"], serde_json::json!(["canary", "pi"]));
    assert_eq!(out["failedAssertions"], serde_json::json!([]), "{out:#}");
    // A tag fleet.toml could not name is a type error at evaluation.
    let bad = agent("").replacen("enable = true;", r#"enable = true; tags = [ "a b" ];"#, 1);
    let out = eval_attribute(&lib, &format!("config = {bad};"), ".tags");
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("tags"), "{out}");
}
