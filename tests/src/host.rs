//! Simulated hosts: one `fleet-agent` each, with its own chroot store, system profile,
//! current/booted system links, state directory and switch log, all below one directory.
//!
//! Generation 1 is copied into the host's store and set as its profile and current system, as
//! if the host had been installed with it.

use crate::nix::{nix, nix_env, nix_env_with};
use crate::{run, Run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One simulated host.
pub struct SimHost {
    pub name: String,
    pub root: PathBuf,
    /// The chroot store (`--store`): the host's `/nix/store` is `<store>/nix/store`; `None`
    /// for a host that uses the machine's own store (needed to build: builds in a chroot
    /// store need a sandbox holding `/bin/sh`).
    pub store: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The daemon's `agent.json` (tmpfs on a real host).
    pub runtime_dir: PathBuf,
    pub profile: PathBuf,
    pub current: PathBuf,
    pub booted: PathBuf,
    /// The boot default that `switch-to-configuration boot` sets.
    pub boot_default: PathBuf,
    /// Every `switch-to-configuration` call: "<action> <toplevel>".
    pub switch_log: PathBuf,
    /// Files here steer the fixture (`fail-test`, …); `network-cut` appears when cut off.
    pub control: PathBuf,
    pub config_path: PathBuf,
    /// Nix keys this host's Nix trusts for substitution.
    pub cache_keys: Vec<String>,
}

/// What a host's agent is told besides its paths.
pub struct HostSettings<'a> {
    pub fleet: &'a str,
    pub trusted_keys: &'a [String],
    pub threshold: usize,
    pub channel: &'a str,
    pub cache_keys: &'a [String],
}

impl SimHost {
    /// Creates the host below `root`, installed with `initial` (a path in the machine's store).
    pub fn install(root: &Path, name: &str, initial: &str, settings: &HostSettings) -> Self {
        Self::install_with_store(root, name, initial, settings, true)
    }

    /// Like [`Self::install`]; `chroot = false` makes the host use the machine's store.
    pub fn install_with_store(
        root: &Path,
        name: &str,
        initial: &str,
        settings: &HostSettings,
        chroot: bool,
    ) -> Self {
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(root.join("control")).unwrap();
        std::fs::create_dir_all(root.join("profiles")).unwrap();
        let host = Self {
            name: name.to_owned(),
            root: root.to_path_buf(),
            store: chroot.then(|| root.join("store")),
            state_dir: root.join("state"),
            runtime_dir: root.join("run/fleet-agent"),
            profile: root.join("profiles/system"),
            current: root.join("run/current-system"),
            booted: root.join("run/booted-system"),
            boot_default: root.join("boot-default"),
            switch_log: root.join("switch.log"),
            control: root.join("control"),
            config_path: root.join("agent.toml"),
            cache_keys: settings.cache_keys.to_vec(),
        };
        if let Some(store) = &host.store {
            let mut copy = nix();
            copy.args(["copy", "--no-check-sigs", "--to"])
                .arg(store)
                .arg(initial);
            run(copy).ok();
        }
        host.set_profile(initial);
        for link in [&host.current, &host.booted, &host.boot_default] {
            std::os::unix::fs::symlink(initial, link).unwrap();
        }
        host.write_config(settings, "", "");
        host
    }

    fn set_profile(&self, path: &str) {
        let mut command = Command::new("nix-env");
        command.envs(nix_env());
        if let Some(store) = &self.store {
            command.arg("--store").arg(store);
        }
        command.arg("-p").arg(&self.profile).args(["--set", path]);
        run(command).ok();
    }

    /// Writes the agent's config; `top` is added to the top-level settings and `health` to the
    /// `[health]` table (e.g. `[[health.checks]]` entries, which must come last).
    pub fn write_config(&self, settings: &HostSettings, top: &str, health: &str) {
        let keys: Vec<String> = settings
            .trusted_keys
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect();
        let text = format!(
            r#"fleet = "{fleet}"
host = "{name}"
trusted_keys = [{keys}]
threshold = {threshold}
channel = "{channel}"
{poll_splay}{poll_interval}{top}
[activation]
mode = "direct"
timeout = "20s"

[health]
window = "1s"
interval = "200ms"

[paths]
state_dir = "{state}"
runtime_dir = "{runtime}"
system_profile = "{profile}"
current_system = "{current}"
booted_system = "{booted}"
boot_dir = "{boot_dir}"
{store}
{health}
"#,
            fleet = settings.fleet,
            name = self.name,
            keys = keys.join(", "),
            threshold = settings.threshold,
            channel = settings.channel,
            // None unless the caller sets its own.
            poll_splay = if top.contains("poll_splay") {
                ""
            } else {
                "poll_splay = \"0s\"\n"
            },
            // Short unless the caller sets its own.
            poll_interval = if top.contains("poll_interval") {
                ""
            } else {
                "poll_interval = \"2s\"\n"
            },
            state = self.state_dir.display(),
            runtime = self.runtime_dir.display(),
            profile = self.profile.display(),
            current = self.current.display(),
            booted = self.booted.display(),
            boot_dir = self.boot_dir().display(),
            store = match &self.store {
                Some(store) => format!(
                    "store = \"{}\"\nstore_root = \"{}\"",
                    store.display(),
                    store.display()
                ),
                None => String::new(),
            },
        );
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// The environment the agent runs with: the test Nix config trusting this host's cache
    /// keys, and the fixture's links and log.
    pub fn env(&self) -> Vec<(String, String)> {
        let trust = format!("trusted-public-keys = {}", self.cache_keys.join(" "));
        let mut env: Vec<(String, String)> = nix_env_with(&trust)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        env.extend([
            (
                "FLEET_FIXTURE_LOG".into(),
                self.switch_log.display().to_string(),
            ),
            (
                "FLEET_FIXTURE_CURRENT".into(),
                self.current.display().to_string(),
            ),
            (
                "FLEET_FIXTURE_BOOT".into(),
                self.boot_default.display().to_string(),
            ),
            (
                "FLEET_FIXTURE_CONTROL".into(),
                self.control.display().to_string(),
            ),
            (
                "FLEET_FIXTURE_BOOT_DIR".into(),
                self.boot_dir().display().to_string(),
            ),
        ]);
        // What `set_env` added (the credentials of an S3 channel, as a unit's environment).
        if let Ok(text) = std::fs::read_to_string(self.root.join("agent.env")) {
            env.extend(text.lines().filter_map(|line| {
                let (key, value) = line.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            }));
        }
        env
    }

    /// Adds a variable to the agent's environment from now on.
    pub fn set_env(&self, key: &str, value: &str) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("agent.env"))
            .unwrap();
        writeln!(file, "{key}={value}").unwrap();
    }

    /// The host's boot partition: the fixture's `boot` writes `extlinux/extlinux.conf` there.
    pub fn boot_dir(&self) -> PathBuf {
        self.root.join("boot")
    }

    /// A `fleet-agent` command for this host.
    pub fn agent(&self, args: &[&str]) -> Command {
        let mut command = crate::agent_command();
        command
            .envs(self.env())
            .arg("--config")
            .arg(&self.config_path)
            .args(args);
        command
    }

    /// A `fleet-agent` command for this host, run inside network namespace `netns`.
    pub fn agent_in_netns(&self, netns: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .args(crate::agent_program())
            .envs(self.env())
            .arg("--config")
            .arg(&self.config_path)
            .args(args);
        command
    }

    /// `fleet-agent once --json`.
    pub fn once(&self) -> Run {
        run(self.agent(&["once", "--json"]))
    }

    /// The outcome of `once --json` as JSON.
    pub fn once_outcome(&self) -> (Option<i32>, serde_json::Value) {
        let out = self.once();
        let value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("once printed no JSON ({e}):\n{out}"));
        (out.code, value)
    }

    /// Where a link points, as a logical store path. Deliberately not the agent's own
    /// `resolve_link`: the tests must not judge the agent with its own code.
    fn link(path: &Path) -> Option<String> {
        let mut current = path.to_path_buf();
        for _ in 0..8 {
            let target = std::fs::read_link(&current).ok()?;
            let target = if target.is_absolute() {
                target
            } else {
                current.parent()?.join(target)
            };
            if target.starts_with("/nix/store") {
                return Some(target.display().to_string());
            }
            current = target;
        }
        None
    }

    /// The store path the system profile points at.
    pub fn generation(&self) -> Option<String> {
        Self::link(&self.profile)
    }

    /// How many generations the profile has.
    pub fn generation_count(&self) -> usize {
        std::fs::read_dir(self.profile.parent().unwrap())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("system-") && name.ends_with("-link")
            })
            .count()
    }

    pub fn current_system(&self) -> Option<String> {
        Self::link(&self.current)
    }

    pub fn boot_default(&self) -> Option<String> {
        Self::link(&self.boot_default)
    }

    /// The `switch-to-configuration` calls so far.
    pub fn switch_calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.switch_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The agent's state file, parsed.
    pub fn state(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.state_dir.join("state.json")).expect("state file");
        serde_json::from_slice(&bytes).expect("state file parses")
    }

    /// Whether `path` is valid in this host's store.
    pub fn has(&self, path: &str) -> bool {
        let mut command = nix();
        command.arg("path-info");
        if let Some(store) = &self.store {
            command.arg("--store").arg(store);
        }
        command.arg(path);
        run(command).code == Some(0)
    }

    /// Asserts the host runs `toplevel` committed: profile, current system and boot default.
    pub fn assert_on(&self, toplevel: &str) {
        assert_eq!(
            self.generation().as_deref(),
            Some(toplevel),
            "profile of {}",
            self.name
        );
        assert_eq!(
            self.current_system().as_deref(),
            Some(toplevel),
            "current system of {}",
            self.name
        );
        assert_eq!(
            self.boot_default().as_deref(),
            Some(toplevel),
            "boot default of {}",
            self.name
        );
    }
}
