//! Everything the signer asks of Nix: list hosts, build toplevels, copy and check closures.
//!
//! Only this module runs `nix`. It uses CLI features present from Nix 2.8 (Debian 12) to
//! current releases: `nix build --json` (never `--print-out-paths`), and
//! `--extra-experimental-features` on every call so no global Nix configuration is needed.
//! `nix path-info --json` printed a list before Nix 2.19 and an object keyed by path since;
//! both are read.

use crate::process::{self, ProcessError};
use crate::progress::NixProgress;
use anyhow::{bail, Context as _, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::process::Command;

fn nix() -> Command {
    let mut command = Command::new("nix");
    command.args(["--extra-experimental-features", "nix-command flakes"]);
    command
}

fn json<T: for<'de> Deserialize<'de>>(command: Command, what: &str) -> Result<T> {
    let stdout = process::run(command)?;
    serde_json::from_slice(&stdout).with_context(|| format!("could not read the output of {what}"))
}

/// Where a flake came from, as `nix flake metadata` reports it.
#[derive(Debug, Clone)]
pub struct FlakeSource {
    /// The resolved flake URL without a revision, e.g. `git+file:///srv/fleet`.
    pub url: String,
    /// The locked URL to build from, pinned to the commit when there is one.
    pub locked_url: String,
    /// The git commit, or `None` for a dirty tree or a non-git flake.
    pub revision: Option<String>,
}

/// Resolves a flake reference to its source and commit.
pub fn flake_source(flake: &str) -> Result<FlakeSource> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Metadata {
        resolved_url: Option<String>,
        original_url: Option<String>,
        url: String,
        revision: Option<String>,
    }
    let mut command = nix();
    command.args(["flake", "metadata", "--json", flake]);
    let metadata: Metadata = json(command, "nix flake metadata")?;
    Ok(FlakeSource {
        url: metadata
            .resolved_url
            .or(metadata.original_url)
            .unwrap_or_else(|| metadata.url.clone()),
        locked_url: metadata.url,
        revision: metadata.revision,
    })
}

/// `nix eval --json` of the flake's `nixosConfigurations` with `apply` (a Nix function).
fn eval_hosts<T: for<'de> Deserialize<'de>>(flake: &str, apply: &str, what: &str) -> Result<T> {
    let mut command = nix();
    command.args([
        "eval",
        "--json",
        &format!("{flake}#nixosConfigurations"),
        "--apply",
        apply,
    ]);
    json(command, &format!("nix eval of {what}"))
        .with_context(|| format!("could not read {what} of flake '{flake}'"))
}

/// Names of the flake's `nixosConfigurations`.
pub fn list_hosts(flake: &str) -> Result<Vec<String>> {
    eval_hosts(flake, "builtins.attrNames", "nixosConfigurations")
}

/// Each host's `services.fleet-agent.tags` (none for a host without the option). Evaluates that
/// option of every host, so it is asked only when a `tag:` selector is used.
pub fn host_tags(flake: &str) -> Result<BTreeMap<String, Vec<String>>> {
    eval_hosts(
        flake,
        "builtins.mapAttrs (name: host: host.config.services.fleet-agent.tags or [ ])",
        "the hosts' services.fleet-agent.tags",
    )
}

/// The installable of one host's system.
pub fn toplevel_attr(flake: &str, host: &str) -> String {
    format!("{flake}#nixosConfigurations.\"{host}\".config.system.build.toplevel")
}

/// Arguments per command: a fleet's store paths or attributes on one command line would pass
/// Linux's limit on arguments (2 MiB) from about 20,000 hosts.
const BATCH: usize = 2_000;

/// Builds (or substitutes) each host's toplevel, showing `progress`; returns host -> store
/// path.
pub fn build_toplevels(
    flake: &str,
    hosts: &[String],
    progress: &mut NixProgress,
) -> Result<BTreeMap<String, String>> {
    #[derive(Deserialize)]
    struct Built {
        outputs: BTreeMap<String, String>,
    }
    let mut built: Vec<Built> = Vec::new();
    for batch in hosts.chunks(BATCH) {
        let mut command = nix();
        command.args([
            "build",
            "--json",
            "--no-link",
            "--log-format",
            "internal-json",
        ]);
        command.args(batch.iter().map(|h| toplevel_attr(flake, h)));
        let stdout = process::run_nix(command, progress)?;
        built.extend(
            serde_json::from_slice::<Vec<Built>>(&stdout)
                .context("could not read the output of nix build")?,
        );
    }
    if built.len() != hosts.len() {
        bail!(
            "nix build returned {} results for {} hosts",
            built.len(),
            hosts.len()
        );
    }
    hosts
        .iter()
        .zip(built)
        .map(|(host, b)| {
            let out = b
                .outputs
                .get("out")
                .with_context(|| format!("nix build gave no 'out' output for host '{host}'"))?;
            Ok((host.clone(), out.clone()))
        })
        .collect()
}

/// What `nix path-info --json` says of one path.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub closure_size: Option<u64>,
    /// Nix 2.8 lists a path it does not have with `"valid": false`.
    #[serde(default)]
    pub valid: Option<bool>,
}

/// Path info from `store` (None: the local store), with closure sizes.
pub fn path_info(store: Option<&str>, paths: &[String]) -> Result<BTreeMap<String, PathInfo>> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Listing {
        List(Vec<PathInfo>),
        Map(BTreeMap<String, Option<PathInfo>>),
    }
    let mut infos = BTreeMap::new();
    for batch in unique(paths).chunks(BATCH) {
        let mut command = nix();
        command.args(["path-info", "--json", "--closure-size"]);
        if let Some(store) = store {
            command.args(["--store", store]);
        }
        command.args(batch);
        match json::<Listing>(command, "nix path-info")? {
            Listing::List(list) => infos.extend(
                list.into_iter()
                    .filter(|i| i.valid != Some(false))
                    .filter_map(|i| Some((i.path.clone()?, i))),
            ),
            Listing::Map(map) => infos.extend(
                map.into_iter()
                    .filter_map(|(path, info)| Some((path, info?))),
            ),
        }
    }
    Ok(infos)
}

/// Each path once, in order: many hosts may share a system.
fn unique(paths: &[String]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    paths
        .iter()
        .filter(|p| seen.insert(p.as_str()))
        .cloned()
        .collect()
}

/// Copies the closures of `paths` to the binary cache at `to` (anything `nix copy --to` takes),
/// showing `progress`.
pub fn copy_to(to: &str, paths: &[String], progress: &mut NixProgress) -> Result<(), ProcessError> {
    for batch in unique(paths).chunks(BATCH) {
        let mut command = nix();
        command.args(["copy", "--log-format", "internal-json", "--to", to]);
        command.args(batch);
        process::run_nix(command, progress)?;
    }
    Ok(())
}

/// Checks that the whole closure of each path is in `store` and signed by one of `keys`.
pub fn verify_in_store(store: &str, keys: &[String], paths: &[String]) -> Result<(), ProcessError> {
    for batch in unique(paths).chunks(BATCH) {
        let mut command = nix();
        command.args([
            "store",
            "verify",
            "--recursive",
            "--no-contents",
            "--store",
            store,
        ]);
        command.args(["--trusted-public-keys", &keys.join(" ")]);
        command.args(batch);
        process::run(command)?;
    }
    Ok(())
}
