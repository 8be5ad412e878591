//! The release ref in a git remote, driven through the `git` CLI.
//!
//! The signer runs on the operator's workstation or in CI, where `git` with the operator's own
//! credentials (ssh-agent, credential helpers, `insteadOf` rules) is what they expect to be used;
//! so unlike the agent it does not use git2. Work happens in a throwaway bare repository: the
//! operator's checkout is never touched. Only the release ref is fetched, with depth 1.

use crate::process::{self, ProcessError};
use anyhow::{Context as _, Result};
use std::path::Path;
use std::process::Command;

/// A throwaway bare repository holding at most the tip of one remote ref.
pub struct Scratch {
    dir: tempfile::TempDir,
}

fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command.arg("-C").arg(dir);
    // Never prompt: a missing credential is an error, not a hang in CI.
    command.env("GIT_TERMINAL_PROMPT", "0");
    command
}

impl Scratch {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fleet-sign-git-")
            .tempdir()
            .context("could not create a temporary directory")?;
        let mut command = git(dir.path());
        command.args(["init", "--quiet", "--bare"]);
        process::run(command)?;
        Ok(Self { dir })
    }

    /// Fetches the tip of `refname` from `url`; `None` when the remote has no such ref.
    pub fn fetch_tip(&self, url: &str, refname: &str) -> Result<Option<String>> {
        let mut command = git(self.dir.path());
        command.args(["ls-remote", "--", url, &format!("refs/heads/{refname}")]);
        let listing =
            process::run(command).with_context(|| format!("could not reach git remote '{url}'"))?;
        if listing.is_empty() {
            return Ok(None);
        }
        let mut command = git(self.dir.path());
        command.args(["fetch", "--quiet", "--no-tags", "--depth", "1", "--", url]);
        command.arg(format!("+refs/heads/{refname}:refs/fleet/tip"));
        process::run(command)
            .with_context(|| format!("could not fetch ref '{refname}' from '{url}'"))?;
        let mut command = git(self.dir.path());
        command.args(["rev-parse", "--verify", "refs/fleet/tip^{commit}"]);
        let commit = String::from_utf8_lossy(&process::run(command)?)
            .trim()
            .to_owned();
        Ok(Some(commit))
    }

    /// Reads a file at the root of `commit`'s tree; `None` when it is not there.
    pub fn read_file(&self, commit: &str, name: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        let spec = format!("{commit}:{name}");
        let mut command = git(self.dir.path());
        command.args(["cat-file", "-s", &spec]);
        let size = match process::run(command) {
            Ok(out) => String::from_utf8_lossy(&out)
                .trim()
                .parse::<usize>()
                .unwrap_or(usize::MAX),
            Err(ProcessError::Failed { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if size > limit {
            return Err(crate::refusal(
                "too_large",
                format!(
                    "'{name}' in commit {commit} is {size} bytes, the limit is {limit}: refusing \
                     (too_large)"
                ),
            ));
        }
        let mut command = git(self.dir.path());
        command.args(["cat-file", "blob", &spec]);
        Ok(Some(process::run(command)?))
    }

    /// Commits `files` as the whole tree on top of `parent` and pushes it to `refname`.
    /// The push is not forced: if someone else moved the ref meanwhile, it fails.
    pub fn commit_and_push(
        &self,
        url: &str,
        refname: &str,
        parent: Option<&str>,
        files: &[(&str, &[u8])],
        message: &str,
    ) -> Result<String> {
        let mut tree = String::new();
        for (name, bytes) in files {
            let mut command = git(self.dir.path());
            command.args(["hash-object", "-w", "--stdin"]);
            let blob = process::run_with_input(command, bytes)?;
            tree += &format!(
                "100644 blob {}\t{name}\n",
                String::from_utf8_lossy(&blob).trim()
            );
        }
        let mut command = git(self.dir.path());
        command.arg("mktree");
        let tree = String::from_utf8_lossy(&process::run_with_input(command, tree.as_bytes())?)
            .trim()
            .to_owned();
        let mut command = git(self.dir.path());
        // Commits need an identity; fall back to one naming the tool when git has none.
        for (var, fallback) in [
            ("GIT_AUTHOR_NAME", "fleet-sign"),
            ("GIT_AUTHOR_EMAIL", "fleet-sign@localhost"),
        ] {
            if std::env::var_os(var).is_none() && !has_identity() {
                command.env(var, fallback);
                command.env(var.replace("AUTHOR", "COMMITTER"), fallback);
            }
        }
        command.args(["commit-tree", &tree, "-m", message]);
        if let Some(parent) = parent {
            command.args(["-p", parent]);
        }
        let commit = String::from_utf8_lossy(&process::run(command)?)
            .trim()
            .to_owned();
        let mut command = git(self.dir.path());
        command.args([
            "push",
            "--quiet",
            "--",
            url,
            &format!("{commit}:refs/heads/{refname}"),
        ]);
        process::run(command).with_context(|| {
            format!(
                "could not push the release to ref '{refname}' of '{url}' (if another release \
                 was published meanwhile, run fleet-sign release again)"
            )
        })?;
        Ok(commit)
    }
}

fn has_identity() -> bool {
    let mut command = Command::new("git");
    command.args(["config", "user.email"]);
    process::run(command).is_ok_and(|out| !out.is_empty())
}
