//! Everything the agent asks of Nix. Only this module runs `nix`, `nix-store` and `nix-env`.
//!
//! Realising is substitution only by default: `nix-store --realise` of an output path can fetch
//! it from a substituter but never build it, so a path missing from every trusted cache is an
//! error ("not in any trusted cache"), never a surprise build of a whole system on a Pi. Every
//! command passes `--option require-sigs true`, so Nix's signature checks apply to whatever the
//! agent brings in even on a misconfigured host, and the agent refuses to activate anything on a
//! host whose Nix config turns them off. Works from Nix 2.8 on: `nix build --json`, never `--print-out-paths`.

use crate::config::Config;
use crate::process::{self, ProcessError};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const QUICK: Duration = Duration::from_secs(120);

/// Why realising or profile handling failed, with a stable reason code.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error(
        "{path} is not in any trusted cache (substituters tried: {substituters}): refusing to \
         build it here (push it with fleet-sign release, or enable realise = \
         \"substitute-or-build\")"
    )]
    NotInCache { path: String, substituters: String },
    #[error(
        "{path} (or part of its closure) is not signed by a key in this host's Nix \
         trusted-public-keys: refusing it"
    )]
    Untrusted { path: String },
    #[error(
        "this host's Nix config has require-sigs = false: fleet-agent refuses to run without \
         Nix's signature checks (remove that setting)"
    )]
    SignaturesDisabled,
    #[error(
        "evaluation mismatch: building {attr} from the signed source gave {built}, but the \
         release names {expected}: refusing"
    )]
    EvaluationMismatch {
        attr: String,
        built: String,
        expected: String,
    },
    #[error("cannot build {path}: the release names no source commit to build from")]
    NoSourceCommit { path: String },
    #[error("{path} does not look like a NixOS system: {missing} is missing")]
    NotAToplevel { path: String, missing: String },
    #[error(
        "the update needs {} in the store ({paths} paths, {} to download), but {} has {} \
         free and must keep {}: refusing before fetching anything (free space in the store, \
         lower disk_reserve, or set collect_garbage = true)",
        mib(*needed), mib(*download), store.display(), mib(*free), mib(*reserve)
    )]
    DiskSpace {
        paths: u64,
        needed: u64,
        download: u64,
        free: u64,
        reserve: u64,
        store: PathBuf,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("cannot read the output of `{command}`: {detail}")]
    Output { command: String, detail: String },
}

impl NixError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotInCache { .. } => "not_in_cache",
            Self::Untrusted { .. } => "closure_untrusted",
            Self::SignaturesDisabled => "signatures_disabled",
            Self::EvaluationMismatch { .. } => "evaluation_mismatch",
            Self::NoSourceCommit { .. } => "no_source_commit",
            Self::NotAToplevel { .. } => "not_a_toplevel",
            Self::DiskSpace { .. } => "disk_space",
            Self::Process(ProcessError::TimedOut { .. }) => "realise_timeout",
            Self::Process(ProcessError::Cancelled { .. }) => "cancelled",
            Self::Process(_) | Self::Output { .. } => "nix_failed",
        }
    }
}

/// Bytes as MiB with one decimal, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// What realising a path would fetch, from the caches' narinfos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FetchPlan {
    pub paths: u64,
    pub download: u64,
    pub unpacked: u64,
}

/// Reads `nix-store --realise --dry-run`'s summary line: "this path will be fetched (0.00 MiB
/// download, 0.43 MiB unpacked):" or "these 12 paths will be fetched (…)"; nothing to fetch
/// prints no such line.
pub fn parse_fetch_plan(stderr: &str) -> FetchPlan {
    fn bytes(number: &str, unit: &str) -> Option<u64> {
        crate::config::parse_size(&format!("{number}{unit}")).ok()
    }
    for line in stderr.lines() {
        let Some((head, rest)) = line.split_once(" will be fetched (") else {
            continue;
        };
        let paths = if head.trim() == "this path" {
            1
        } else {
            head.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        // "0.00 MiB download, 0.43 MiB unpacked):"
        let words: Vec<&str> = rest
            .split([' ', ',', ')'])
            .filter(|w| !w.is_empty())
            .collect();
        let mut plan = FetchPlan {
            paths,
            ..FetchPlan::default()
        };
        for pair in words.windows(3) {
            match pair[2] {
                "download" => plan.download = bytes(pair[0], pair[1]).unwrap_or(0),
                "unpacked" => plan.unpacked = bytes(pair[0], pair[1]).unwrap_or(0),
                _ => {}
            }
        }
        return plan;
    }
    FetchPlan::default()
}

/// Nix as this host is configured: which store, where it physically is.
pub struct Nix {
    store: Option<String>,
    store_root: PathBuf,
}

impl Nix {
    pub fn new(config: &Config) -> Self {
        Self {
            store: config.store.clone(),
            store_root: config.store_root.clone(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        if program == "nix" {
            command.args(["--extra-experimental-features", "nix-command flakes"]);
        }
        // Whatever the host's config says, nothing unsigned enters the store through the agent.
        command.args(["--option", "require-sigs", "true"]);
        if let Some(store) = &self.store {
            command.args(["--store", store]);
        }
        command
    }

    /// Where a logical store path physically is.
    pub fn physical(&self, logical: &str) -> PathBuf {
        self.store_root.join(logical.trim_start_matches('/'))
    }

    /// Refuses to go on when Nix's signature checks are off.
    pub async fn check_require_sigs(&self, cancel: &CancellationToken) -> Result<(), NixError> {
        let mut command = Command::new("nix");
        command.args([
            "--extra-experimental-features",
            "nix-command",
            "show-config",
            "--json",
        ]);
        let stdout = process::run(command, QUICK, cancel).await?;
        let config: serde_json::Value =
            serde_json::from_slice(&stdout).map_err(|e| NixError::Output {
                command: "nix show-config --json".into(),
                detail: e.to_string(),
            })?;
        match config.pointer("/require-sigs/value") {
            Some(serde_json::Value::Bool(false)) => Err(NixError::SignaturesDisabled),
            _ => Ok(()),
        }
    }

    /// The store's directory on disk, whose filesystem an update fills.
    pub fn store_dir(&self) -> PathBuf {
        self.physical("/nix/store")
    }

    /// Bytes free for unprivileged use on the store's filesystem.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let stat = rustix::fs::statvfs(self.store_dir())?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// What realising `path` would fetch with these substituters (`--dry-run`: narinfos only).
    pub async fn fetch_plan(
        &self,
        path: &str,
        substituters: &[String],
        cancel: &CancellationToken,
    ) -> Result<FetchPlan, NixError> {
        let mut command = self.command("nix-store");
        command.args(["--realise", "--dry-run", path]);
        if !substituters.is_empty() {
            command.args(["--option", "extra-substituters", &substituters.join(" ")]);
        }
        command.args(["--option", "narinfo-cache-negative-ttl", "0"]);
        let (_, stderr) = process::run_output(command, QUICK, cancel).await?;
        Ok(parse_fetch_plan(&stderr))
    }

    /// Deletes store paths nothing roots, until `bytes` are freed (every profile generation and
    /// the agent's own roots stay).
    pub async fn collect_garbage(
        &self,
        bytes: u64,
        cancel: &CancellationToken,
    ) -> Result<(), NixError> {
        let mut command = self.command("nix-store");
        command.args(["--gc", "--max-freed", &bytes.to_string()]);
        process::run(command, Duration::from_secs(1800), cancel).await?;
        Ok(())
    }

    /// Substitutes `path` (and its closure) and roots it at `root`; never builds.
    pub async fn substitute(
        &self,
        path: &str,
        substituters: &[String],
        root: &Path,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), NixError> {
        let mut command = self.command("nix-store");
        command
            .arg("--realise")
            .arg(path)
            .arg("--add-root")
            .arg(root);
        if !substituters.is_empty() {
            command.args(["--option", "extra-substituters", &substituters.join(" ")]);
        }
        command.args(["--option", "stalled-download-timeout", "60"]);
        // Nix remembers a path a cache did not have for an hour by default: a host that polled
        // before CI finished pushing the closure would then fail for that hour. Ask again.
        command.args(["--option", "narinfo-cache-negative-ttl", "0"]);
        match process::run(command, timeout, cancel).await {
            Ok(_) => Ok(()),
            Err(error) => {
                let stderr = error.stderr();
                Err(
                    if stderr.contains("lacks a valid signature")
                        || stderr.contains("is not signed by any of the keys")
                    {
                        NixError::Untrusted { path: path.into() }
                    } else if stderr.contains("don't know how to build")
                        || stderr.contains("cannot build")
                    {
                        NixError::NotInCache {
                            path: path.into(),
                            substituters: if substituters.is_empty() {
                                "the host's Nix config only".into()
                            } else {
                                format!("{} and the host's Nix config", substituters.join(" "))
                            },
                        }
                    } else {
                        error.into()
                    },
                )
            }
        }
    }

    /// Builds `host`'s toplevel from the signed source and checks it is `expected`.
    pub async fn build_from_source(
        &self,
        source: &crate::release::Source,
        host: &str,
        expected: &str,
        root: &Path,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), NixError> {
        let repo = &source.repo;
        let commit = source
            .commit
            .as_deref()
            .ok_or_else(|| NixError::NoSourceCommit {
                path: expected.into(),
            })?;
        let separator = if repo.contains('?') { '&' } else { '?' };
        let attr = format!(
            "{repo}{separator}rev={commit}#nixosConfigurations.\"{host}\".config.system.build.toplevel"
        );
        let mut command = self.command("nix");
        command
            .args(["build", "--json", "--out-link"])
            .arg(root)
            .arg(&attr);
        let stdout = process::run(command, timeout, cancel).await?;
        let built: serde_json::Value =
            serde_json::from_slice(&stdout).map_err(|e| NixError::Output {
                command: "nix build --json".into(),
                detail: e.to_string(),
            })?;
        let out = built
            .pointer("/0/outputs/out")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if out != expected {
            // Drop the root of the wrong system so it can be collected.
            let _ = std::fs::remove_file(root);
            return Err(NixError::EvaluationMismatch {
                attr,
                built: out,
                expected: expected.into(),
            });
        }
        Ok(())
    }

    /// Checks that `path` looks like a NixOS toplevel.
    pub fn check_toplevel(&self, path: &str) -> Result<(), NixError> {
        let dir = self.physical(path);
        for needed in ["bin/switch-to-configuration", "nixos-version"] {
            if !dir.join(needed).exists() {
                return Err(NixError::NotAToplevel {
                    path: path.into(),
                    missing: needed.into(),
                });
            }
        }
        Ok(())
    }

    /// Points the system profile at `path` (a new generation), unless it already does.
    pub async fn set_profile(
        &self,
        profile: &Path,
        path: &str,
        cancel: &CancellationToken,
    ) -> Result<(), NixError> {
        if resolve_link(profile).as_deref() == Some(path) {
            return Ok(());
        }
        let mut command = self.command("nix-env");
        command.arg("-p").arg(profile).args(["--set", path]);
        process::run(command, QUICK, cancel).await?;
        Ok(())
    }
}

/// Follows a chain of symlinks (profile -> generation link -> store path) to the store path,
/// without touching the store itself (it may be a chroot store elsewhere).
pub fn resolve_link(path: &Path) -> Option<String> {
    let mut current = path.to_path_buf();
    for _ in 0..8 {
        let target = std::fs::read_link(&current).ok()?;
        let target = if target.is_absolute() {
            target
        } else {
            current.parent()?.join(target)
        };
        let text = target.to_str()?;
        if let Some(rest) = text.strip_prefix("/nix/store/") {
            let top = rest.split('/').next()?;
            return Some(format!("/nix/store/{top}"));
        }
        // A link to a physical path inside a chroot store: keep only the logical part.
        if let Some(index) = text.find("/nix/store/") {
            let rest = &text[index + "/nix/store/".len()..];
            let top = rest.split('/').next()?;
            return Some(format!("/nix/store/{top}"));
        }
        current = target;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_a_dry_run_would_fetch() {
        let one = "this path will be fetched (0.00 MiB download, 0.43 MiB unpacked):\n  /nix/store/a-blob\n";
        let plan = parse_fetch_plan(one);
        assert_eq!(plan.paths, 1);
        assert_eq!(plan.download, 0);
        assert_eq!(plan.unpacked, (0.43 * (1u64 << 20) as f64) as u64);
        let many = "these 12 paths will be fetched (30.50 MiB download, 120.00 MiB unpacked):\n";
        assert_eq!(
            parse_fetch_plan(many),
            FetchPlan {
                paths: 12,
                download: (30.5 * (1u64 << 20) as f64) as u64,
                unpacked: 120 << 20,
            }
        );
        // Later Nix versions may choose another unit.
        let kib = "these 2 paths will be fetched (12.0 KiB download, 1.5 GiB unpacked):";
        assert_eq!(
            parse_fetch_plan(kib).unpacked,
            (1.5 * (1u64 << 30) as f64) as u64
        );
        // Nothing to fetch, or only paths no cache has.
        assert_eq!(parse_fetch_plan(""), FetchPlan::default());
        assert_eq!(
            parse_fetch_plan("don't know how to build these paths:\n  /nix/store/x\n"),
            FetchPlan::default()
        );
    }
}
