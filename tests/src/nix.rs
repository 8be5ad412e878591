//! Real Nix for tests: the environment, keys, binary caches and chroot stores.

use crate::{run, Run};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The project's own Nix settings (`scripts/nix/nix.conf`): single-user Nix as root without
/// build users, flakes on, no sandbox (fixtures build with `/bin/sh`), nothing reachable
/// configured, no registry. The demo uses the same file.
pub fn nix_conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/nix")
}

/// Environment for every Nix-using child: the project's Nix settings and none of the machine's
/// (`/etc/nix/nix.conf` and `~/.config/nix` are not read), plus `extra` settings in `NIX_CONFIG`.
pub fn nix_env_with(extra: &str) -> Vec<(&'static str, String)> {
    vec![
        ("NIX_CONF_DIR", nix_conf_dir().display().to_string()),
        ("NIX_USER_CONF_FILES", String::new()),
        ("NIX_CONFIG", extra.to_owned()),
    ]
}

/// [`nix_env_with`] nothing extra.
pub fn nix_env() -> Vec<(&'static str, String)> {
    nix_env_with("")
}

/// `nix` with the test environment.
pub fn nix() -> Command {
    let mut command = Command::new("nix");
    command.envs(nix_env());
    command
}

/// The Nix system of this machine, e.g. `x86_64-linux`.
pub fn system() -> &'static str {
    static SYSTEM: OnceLock<String> = OnceLock::new();
    SYSTEM.get_or_init(|| {
        let mut command = nix();
        command.args([
            "eval",
            "--impure",
            "--raw",
            "--expr",
            "builtins.currentSystem",
        ]);
        let out = run(command);
        out.ok();
        out.stdout.trim().to_owned()
    })
}

/// A key pair made by `nix-store --generate-binary-cache-key`.
pub struct NixKey {
    pub secret: PathBuf,
    pub public: PathBuf,
}

impl NixKey {
    pub fn generate(dir: &Path, name: &str) -> Self {
        let secret = dir.join(format!("{name}.sec"));
        let public = dir.join(format!("{name}.pub"));
        let mut command = Command::new("nix-store");
        command
            .envs(nix_env())
            .arg("--generate-binary-cache-key")
            .args([name.as_ref(), secret.as_os_str(), public.as_os_str()]);
        run(command).ok();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self { secret, public }
    }

    pub fn public_key(&self) -> String {
        std::fs::read_to_string(&self.public)
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// A chroot store standing in for one simulated host's `/nix/store`.
pub struct ChrootStore {
    pub root: PathBuf,
}

impl ChrootStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// `nix copy --from <cache> --to <root> <path>` trusting exactly `trusted_keys`.
    pub fn copy_from(&self, cache: &str, trusted_keys: &[String], path: &str) -> Run {
        let mut command = nix();
        command
            .args(["copy", "--from", cache, "--to"])
            .arg(&self.root)
            .args(["--option", "trusted-public-keys", &trusted_keys.join(" ")])
            .arg(path);
        run(command)
    }

    /// Whether `path` is valid in this store.
    pub fn has(&self, path: &str) -> bool {
        let mut command = nix();
        command
            .args(["path-info", "--store"])
            .arg(&self.root)
            .arg(path);
        run(command).code == Some(0)
    }
}
