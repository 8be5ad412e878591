//! Release channels as the signer sees them: read the current release, publish a new one.
//!
//! A channel is written as:
//!
//! ```text
//! /srv/www/fleet            a directory (also file:///srv/www/fleet): read and publish
//! https://host/fleet        a static HTTP base URL: read only (publish to the directory it serves)
//! git+<url>[#<ref>]         a git remote, ref default `fleet-release`: read and publish
//!                           (git+file:///srv/fleet.git, git+ssh://git@host/fleet.git#prod, …)
//! ```

use crate::git;
use anyhow::{bail, Context as _, Result};
use fleet_agent::config::ChannelSpec;
use fleet_agent::release::{
    DOCUMENT_FILE, FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE, MAX_DOCUMENT_BYTES,
    MAX_FRESHNESS_BYTES, MAX_SIGNATURE_FILE_BYTES, SIGNATURE_FILE,
};
use std::fmt;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

/// A channel, in the syntax the agent reads too (`fleet_agent::config::ChannelSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel(ChannelSpec);

const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_TOTAL_TIMEOUT: Duration = Duration::from_secs(60);

/// A release as read from a channel, not yet verified.
#[derive(Debug, Clone)]
pub struct Published {
    pub document: Vec<u8>,
    pub signatures: Vec<u8>,
    /// The freshness statement and its signatures, when the channel holds one.
    pub freshness: Option<(Vec<u8>, Vec<u8>)>,
}

impl Published {
    /// The freshness statement in the form `verify_freshness` takes.
    pub fn freshness(&self) -> Option<(&[u8], &[u8])> {
        self.freshness
            .as_ref()
            .map(|(s, g)| (s.as_slice(), g.as_slice()))
    }
}

/// The four files of a channel, with their limits: the release's two, then the statement's.
const FILES: [(&str, usize); 4] = [
    (DOCUMENT_FILE, MAX_DOCUMENT_BYTES),
    (SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES),
    (FRESHNESS_FILE, MAX_FRESHNESS_BYTES),
    (FRESHNESS_SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES),
];

/// Which of [`FILES`] to read: the release's two, or all four.
#[derive(Clone, Copy)]
enum Files {
    Release = 2,
    WithFreshness = 4,
}

/// A channel's files as read (`None`: missing), in the order of [`FILES`], as a release.
fn assemble(files: [Option<Vec<u8>>; 4]) -> Option<Published> {
    let [document, signatures, statement, statement_signatures] = files;
    Some(Published {
        document: document?,
        signatures: signatures.unwrap_or_default(),
        freshness: statement.map(|s| (s, statement_signatures.unwrap_or_default())),
    })
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Channel {
    pub fn parse(text: &str) -> Result<Self> {
        ChannelSpec::parse(text)
            .map(Self)
            .map_err(anyhow::Error::msg)
    }

    /// The same channel with a relative directory taken as relative to `base`.
    pub fn relative_to(self, base: &Path) -> Self {
        match self.0 {
            ChannelSpec::Directory(dir) if dir.is_relative() => {
                Self(ChannelSpec::Directory(base.join(dir)))
            }
            spec => Self(spec),
        }
    }

    /// The release the channel holds now, or `None` when it holds none yet.
    pub fn read(&self) -> Result<Option<Published>> {
        self.read_files(Files::Release)
    }

    /// The release and its freshness statement, if the channel holds one.
    pub fn read_with_freshness(&self) -> Result<Option<Published>> {
        self.read_files(Files::WithFreshness)
    }

    fn read_files(&self, files: Files) -> Result<Option<Published>> {
        let files = &FILES[..files as usize];
        match &self.0 {
            ChannelSpec::Directory(dir) => read_directory(dir, files),
            ChannelSpec::Http(base) => read_http(base, files),
            ChannelSpec::Git { url, refname } => {
                let scratch = git::Scratch::new()?;
                let Some(tip) = scratch.fetch_tip(url, refname)? else {
                    return Ok(None);
                };
                Ok(Some(read_commit(&scratch, &tip, url, refname, files)?))
            }
        }
    }

    /// Publishes a signed release, with its freshness statement when it has one (a statement
    /// left from an earlier release is removed); returns where it went (a path or a commit).
    pub fn publish(&self, release: &Published, message: &str) -> Result<String> {
        match &self.0 {
            ChannelSpec::Directory(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("could not create directory {}", dir.display()))?;
                write_atomic(&dir.join(DOCUMENT_FILE), &release.document)?;
                write_atomic(&dir.join(SIGNATURE_FILE), &release.signatures)?;
                match &release.freshness {
                    Some(_) => write_freshness(dir, release)?,
                    None => {
                        for name in [FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE] {
                            remove_if_present(&dir.join(name))?;
                        }
                    }
                }
                Ok(dir.display().to_string())
            }
            ChannelSpec::Http(url) => bail!(
                "cannot publish to '{url}': fleet-sign publishes to a directory or a git remote; \
                 publish to the directory this URL serves"
            ),
            ChannelSpec::Git { url, refname } => {
                let scratch = git::Scratch::new()?;
                let parent = scratch.fetch_tip(url, refname)?;
                let commit = scratch.commit_and_push(
                    url,
                    refname,
                    parent.as_deref(),
                    &tree(release),
                    message,
                )?;
                Ok(format!("commit {commit}"))
            }
        }
    }

    /// Publishes a new freshness statement for the release the channel holds, which must still
    /// be `release.document` (else another release was published meanwhile: nothing is
    /// written). A directory gets the statement's two files alone, so the release's own stay
    /// untouched (an HTTP server keeps their validators); a git ref gets a commit.
    pub fn publish_freshness(&self, release: &Published, message: &str) -> Result<String> {
        let changed = || {
            anyhow::anyhow!(
                "the release in {self} changed while its freshness statement was made: run \
                 fleet-sign refresh again"
            )
        };
        match &self.0 {
            ChannelSpec::Directory(dir) => {
                let current = read_capped(&dir.join(DOCUMENT_FILE), MAX_DOCUMENT_BYTES)?;
                if current.as_deref() != Some(release.document.as_slice()) {
                    return Err(changed());
                }
                write_freshness(dir, release)?;
                Ok(dir.display().to_string())
            }
            ChannelSpec::Http(url) => bail!(
                "cannot publish to '{url}': fleet-sign publishes to a directory or a git remote; \
                 refresh the directory this URL serves"
            ),
            ChannelSpec::Git { url, refname } => {
                let scratch = git::Scratch::new()?;
                let tip = scratch.fetch_tip(url, refname)?.ok_or_else(changed)?;
                let current = scratch.read_file(&tip, DOCUMENT_FILE, MAX_DOCUMENT_BYTES)?;
                if current.as_deref() != Some(release.document.as_slice()) {
                    return Err(changed());
                }
                let commit =
                    scratch.commit_and_push(url, refname, Some(&tip), &tree(release), message)?;
                Ok(format!("commit {commit}"))
            }
        }
    }
}

/// The files of a release commit: the release's two, and the statement's when it has one.
fn tree(release: &Published) -> Vec<(&'static str, &[u8])> {
    let mut files = vec![
        (DOCUMENT_FILE, release.document.as_slice()),
        (SIGNATURE_FILE, release.signatures.as_slice()),
    ];
    if let Some((statement, signatures)) = &release.freshness {
        files.push((FRESHNESS_FILE, statement.as_slice()));
        files.push((FRESHNESS_SIGNATURE_FILE, signatures.as_slice()));
    }
    files
}

/// Writes the statement's signatures, then the statement: a reader between the two sees the old
/// statement with new signatures, which reads as an untrusted statement until the next poll.
fn write_freshness(dir: &Path, release: &Published) -> Result<()> {
    let Some((statement, signatures)) = &release.freshness else {
        return Ok(());
    };
    write_atomic(&dir.join(FRESHNESS_FILE), statement)?;
    write_atomic(&dir.join(FRESHNESS_SIGNATURE_FILE), signatures)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("could not remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The release files of a fetched commit.
fn read_commit(
    scratch: &git::Scratch,
    tip: &str,
    url: &str,
    refname: &str,
    names: &[(&str, usize)],
) -> Result<Published> {
    let mut files: [Option<Vec<u8>>; 4] = Default::default();
    for (slot, (name, limit)) in files.iter_mut().zip(names) {
        *slot = scratch.read_file(tip, name, *limit)?;
    }
    assemble(files).ok_or_else(|| {
        anyhow::anyhow!(
            "ref '{refname}' of '{url}' (commit {tip}) has no {DOCUMENT_FILE}: is this the \
             release ref?"
        )
    })
}

fn read_capped(path: &Path, limit: usize) -> Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("could not open {}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("could not read {}", path.display()))?;
    if bytes.len() > limit {
        return Err(too_large(&path.display().to_string(), limit));
    }
    Ok(Some(bytes))
}

fn read_directory(dir: &Path, names: &[(&str, usize)]) -> Result<Option<Published>> {
    let mut files: [Option<Vec<u8>>; 4] = Default::default();
    for (slot, (name, limit)) in files.iter_mut().zip(names) {
        *slot = read_capped(&dir.join(name), *limit)?;
    }
    Ok(assemble(files))
}

fn read_http(base: &str, names: &[(&str, usize)]) -> Result<Option<Published>> {
    let client = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(crate::config::tls()?)
        .connect_timeout(HTTP_CONNECT_TIMEOUT)
        .timeout(HTTP_TOTAL_TIMEOUT)
        .user_agent(concat!("fleet-sign/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("could not set up the HTTP client")?;
    let get = |name: &str, limit: usize| -> Result<Option<Vec<u8>>> {
        let url = format!("{base}/{name}");
        let response = client
            .get(&url)
            .send()
            .with_context(|| format!("could not fetch {url}"))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            bail!("fetching {url} failed: HTTP {}", response.status());
        }
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large(&url, limit));
        }
        let mut bytes = Vec::new();
        response
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("could not read {url}"))?;
        if bytes.len() > limit {
            return Err(too_large(&url, limit));
        }
        Ok(Some(bytes))
    };
    let mut files: [Option<Vec<u8>>; 4] = Default::default();
    for (slot, (name, limit)) in files.iter_mut().zip(names) {
        *slot = get(name, *limit)?;
        if slot.is_none() && *name == DOCUMENT_FILE {
            return Ok(None);
        }
    }
    Ok(assemble(files))
}

/// A file over its limit: refused with the code hosts report for it (`too_large`).
fn too_large(what: &str, limit: usize) -> anyhow::Error {
    crate::refusal(
        "too_large",
        format!("{what} is larger than the limit of {limit} bytes: refusing (too_large)"),
    )
}

/// Writes a file so readers see the old or the new bytes, never a mix: temp file, fsync,
/// rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("could not create a temporary file in {}", dir.display()))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .with_context(|| format!("could not write {}", path.display()))?;
    set_mode(temp.path(), 0o644)?;
    temp.persist(path)
        .with_context(|| format!("could not replace {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("could not sync directory {}", dir.display()))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("could not set the mode of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel_forms() {
        let git = |url: &str, r: &str| {
            Channel(ChannelSpec::Git {
                url: url.into(),
                refname: r.into(),
            })
        };
        assert_eq!(
            Channel::parse("git+file:///srv/f.git").unwrap(),
            git("file:///srv/f.git", "fleet-release")
        );
        assert_eq!(
            Channel::parse("git+ssh://git@h/f.git#prod").unwrap(),
            git("ssh://git@h/f.git", "prod")
        );
        assert_eq!(
            Channel::parse("git://127.0.0.1:9418/f.git").unwrap(),
            git("git://127.0.0.1:9418/f.git", "fleet-release")
        );
        assert_eq!(
            Channel::parse("https://h/fleet/").unwrap(),
            Channel(ChannelSpec::Http("https://h/fleet".into()))
        );
        assert_eq!(
            Channel::parse("file:///srv/www").unwrap(),
            Channel(ChannelSpec::Directory("/srv/www".into()))
        );
        assert_eq!(
            Channel::parse("www").unwrap(),
            Channel(ChannelSpec::Directory("www".into()))
        );
        assert!(Channel::parse("git+file:///x#--upload-pack=evil").is_err());
        assert!(Channel::parse("ftp://h/x").is_err());
    }
}
