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

/// What a commit's tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Exactly the files given.
    Exactly,
    /// The parent's tree with the files given replaced or added.
    KeepOthers,
}

/// A throwaway bare repository holding at most the tip of one remote ref.
pub struct Scratch {
    dir: tempfile::TempDir,
    /// The system's roots and the CA file together, for git over HTTPS behind a private CA.
    ca_bundle: Option<std::path::PathBuf>,
}

fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command.arg("-C").arg(dir);
    // Never prompt: a missing credential is an error, not a hang in CI.
    command.env("GIT_TERMINAL_PROMPT", "0");
    command
}

/// The system's trusted roots as PEM, followed by the certificates of `ca_file`.
fn ca_bundle(ca_file: &Path) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let mut bundle = Vec::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        let text = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in text.as_bytes().chunks(64) {
            bundle.extend_from_slice(line);
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    let own = std::fs::read(ca_file)
        .with_context(|| format!("could not read the CA file {}", ca_file.display()))?;
    bundle.extend_from_slice(&own);
    Ok(bundle)
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
        // git over HTTPS behind a private CA: git (curl) takes one bundle in place of the
        // system's (GIT_SSL_CAINFO; git 2.47 here ignored a repository's http.sslCAInfo), so it
        // gets the system's roots and the CA file together.
        let ca_bundle = match crate::config::ca_file() {
            Some(ca_file) => {
                let bundle = dir.path().join("ca-bundle.pem");
                std::fs::write(&bundle, ca_bundle(&ca_file)?)
                    .with_context(|| format!("could not write {}", bundle.display()))?;
                Some(bundle)
            }
            None => None,
        };
        Ok(Self { dir, ca_bundle })
    }

    /// A git command in the scratch repository.
    fn git(&self) -> Command {
        let mut command = git(self.dir.path());
        if let Some(bundle) = &self.ca_bundle {
            command.env("GIT_SSL_CAINFO", bundle);
        }
        command
    }

    /// Fetches the tip of `refname` from `url`; `None` when the remote has no such ref.
    pub fn fetch_tip(&self, url: &str, refname: &str) -> Result<Option<String>> {
        let mut command = self.git();
        command.args(["ls-remote", "--", url, &format!("refs/heads/{refname}")]);
        let listing =
            process::run(command).with_context(|| format!("could not reach git remote '{url}'"))?;
        if listing.is_empty() {
            return Ok(None);
        }
        let mut command = self.git();
        command.args(["fetch", "--quiet", "--no-tags", "--depth", "1", "--", url]);
        command.arg(format!("+refs/heads/{refname}:refs/fleet/tip"));
        process::run(command)
            .with_context(|| format!("could not fetch ref '{refname}' from '{url}'"))?;
        let mut command = self.git();
        command.args(["rev-parse", "--verify", "refs/fleet/tip^{commit}"]);
        let commit = String::from_utf8_lossy(&process::run(command)?)
            .trim()
            .to_owned();
        Ok(Some(commit))
    }

    /// Reads a file at the root of `commit`'s tree; `None` when it is not there.
    pub fn read_file(&self, commit: &str, name: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        let spec = format!("{commit}:{name}");
        let mut command = self.git();
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
        let mut command = self.git();
        command.args(["cat-file", "blob", &spec]);
        Ok(Some(process::run(command)?))
    }

    /// Commits `files` (paths relative to the root, `a/b.json` makes directories) as the whole
    /// tree (or over the parent's, see [`Tree`]) on top of `parent` and pushes it to `refname`. One `git fast-import` writes every
    /// blob and the commit, however many files (a format-2 release has one per host). The push
    /// is not forced: if someone else moved the ref meanwhile, it fails.
    pub fn commit_and_push(
        &self,
        url: &str,
        refname: &str,
        parent: Option<&str>,
        files: &[(&str, &[u8])],
        tree: Tree,
        message: &str,
    ) -> Result<String> {
        let mut stream = Vec::new();
        let ident = committer_ident();
        stream.extend_from_slice(b"commit refs/fleet/new\n");
        stream.extend_from_slice(format!("committer {ident}\n").as_bytes());
        stream.extend_from_slice(format!("data {}\n{message}\n", message.len()).as_bytes());
        if let Some(parent) = parent {
            stream.extend_from_slice(format!("from {parent}\n").as_bytes());
        }
        if tree == Tree::Exactly {
            stream.extend_from_slice(b"deleteall\n");
        }
        for (path, bytes) in files {
            stream.extend_from_slice(
                format!("M 100644 inline {path}\ndata {}\n", bytes.len()).as_bytes(),
            );
            stream.extend_from_slice(bytes);
            stream.push(b'\n');
        }
        stream.extend_from_slice(b"done\n");
        let mut command = self.git();
        command.args(["fast-import", "--quiet", "--done", "--force"]);
        process::run_with_input(command, &stream).context("could not write the release commit")?;
        let mut command = self.git();
        command.args(["rev-parse", "--verify", "refs/fleet/new^{commit}"]);
        let commit = String::from_utf8_lossy(&process::run(command)?)
            .trim()
            .to_owned();
        let mut command = self.git();
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

/// The committer for release commits: git's own (config, `GIT_COMMITTER_*`), else one naming
/// the tool.
fn committer_ident() -> String {
    let mut command = Command::new("git");
    command.args(["var", "GIT_COMMITTER_IDENT"]);
    match process::run(command) {
        Ok(out) if !out.is_empty() && has_identity_or_env() => {
            String::from_utf8_lossy(&out).trim().to_owned()
        }
        _ => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("fleet-sign <fleet-sign@localhost> {now} +0000")
        }
    }
}

fn has_identity_or_env() -> bool {
    std::env::var_os("GIT_COMMITTER_EMAIL").is_some() || has_identity()
}

fn has_identity() -> bool {
    let mut command = Command::new("git");
    command.args(["config", "user.email"]);
    process::run(command).is_ok_and(|out| !out.is_empty())
}
