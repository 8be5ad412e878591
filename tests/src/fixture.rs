//! The fixture fleet: a flake in a git repository whose inventory of hosts a host factory turns
//! into `nixosConfigurations.<host>.config.system.build.toplevel`, as real fleets do, without
//! nixpkgs. Its files live in `tests/fixture-flake/`; the inventory is written per test.

use crate::nix::{nix, system};
use crate::run;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One inventory entry.
#[derive(Debug, Clone)]
pub struct Host {
    pub kind: String,
    pub version: String,
    /// "ok", "fail" (switch-to-configuration test fails), "hang" or "unbuildable" (its
    /// toplevel's builder fails, saying why in its log).
    pub behaviour: String,
    pub kernel: String,
    /// MiB of incompressible data in the system (a closure of realistic size).
    pub payload_mib: u32,
    /// `services.fleet-agent.tags`: what `fleet-sign` selects with `tag:NAME`.
    pub tags: Vec<String>,
}

/// A salt unique to this process and fleet, so no two tests share a store path.
fn unique_salt(dir: &Path) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    std::process::id().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// A fixture fleet flake in a git repository of its own.
pub struct FixtureFleet {
    pub dir: PathBuf,
    salt: String,
    pub hosts: BTreeMap<String, Host>,
}

fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .env("GIT_AUTHOR_NAME", "fleet test")
        .env("GIT_AUTHOR_EMAIL", "test@fleet.invalid")
        .env("GIT_COMMITTER_NAME", "fleet test")
        .env("GIT_COMMITTER_EMAIL", "test@fleet.invalid");
    command
}

impl FixtureFleet {
    /// Creates the flake at `dir` with `hosts` at version 1, committed.
    pub fn new(dir: PathBuf, hosts: &[&str]) -> Self {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixture-flake");
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        for file in [
            "flake.nix",
            "flake.lock",
            "lib/mk-system.nix",
            "lib/switch-to-configuration.sh",
        ] {
            std::fs::copy(source.join(file), dir.join(file)).unwrap();
        }
        let hosts = hosts
            .iter()
            .map(|name| {
                let host = Host {
                    kind: "server".into(),
                    version: "1".into(),
                    behaviour: "ok".into(),
                    kernel: "6.1.0".into(),
                    payload_mib: 0,
                    tags: Vec::new(),
                };
                (name.to_string(), host)
            })
            .collect();
        let salt = unique_salt(&dir);
        let fleet = Self { dir, salt, hosts };
        run({
            let mut c = git(&fleet.dir);
            c.args(["init", "--quiet", "--initial-branch=main"]);
            c
        })
        .ok();
        fleet.commit("initial fleet");
        fleet
    }

    fn write_inventory(&self) {
        let mut text = String::from("{\n");
        for (name, h) in &self.hosts {
            text += &format!(
                "  \"{name}\" = {{ type = \"{}\"; system = \"{}\"; version = \"{}\"; \
                 behaviour = \"{}\"; kernel = \"{}\"; salt = \"{}\"; payloadMiB = {}; \
                 tags = [ {}]; }};\n",
                h.kind,
                system(),
                h.version,
                h.behaviour,
                h.kernel,
                self.salt,
                h.payload_mib,
                h.tags
                    .iter()
                    .map(|t| format!("\"{t}\" "))
                    .collect::<String>()
            );
        }
        text += "}\n";
        std::fs::write(self.dir.join("inventory.nix"), text).unwrap();
    }

    /// Changes one host's inventory entry (call [`Self::commit`] afterwards).
    pub fn set(&mut self, host: &str, change: impl FnOnce(&mut Host)) {
        change(self.hosts.get_mut(host).expect("fixture host exists"));
        self.write_inventory();
    }

    /// Writes the inventory and commits everything.
    pub fn commit(&self, message: &str) {
        self.write_inventory();
        run({
            let mut c = git(&self.dir);
            c.args(["add", "-A"]);
            c
        })
        .ok();
        run({
            let mut c = git(&self.dir);
            c.args(["commit", "--quiet", "--allow-empty", "-m", message]);
            c
        })
        .ok();
    }

    /// The flake reference to give fleet-sign.
    pub fn flake_ref(&self) -> String {
        format!("git+file://{}", self.dir.display())
    }

    /// The current commit.
    pub fn head(&self) -> String {
        let mut c = git(&self.dir);
        c.args(["rev-parse", "HEAD"]);
        run(c).stdout.trim().to_owned()
    }

    /// Builds one host's toplevel directly with nix and returns its store path.
    pub fn build(&self, host: &str) -> String {
        let mut command = nix();
        command.args([
            "build",
            "--json",
            "--no-link",
            &format!(
                "{}#nixosConfigurations.{host}.config.system.build.toplevel",
                self.flake_ref()
            ),
        ]);
        let out = run(command);
        out.ok();
        let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        json[0]["outputs"]["out"].as_str().unwrap().to_owned()
    }
}
