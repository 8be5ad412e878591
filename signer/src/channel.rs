//! Release channels as the signer sees them: read the current release, publish a new one.
//!
//! A channel is written as:
//!
//! ```text
//! /srv/www/fleet            a directory (also file:///srv/www/fleet): read and publish
//! https://host/fleet        a static HTTP base URL: read only (publish to the directory it serves)
//! git+<url>[#<ref>]         a git remote, ref default `fleet-release`: read and publish
//!                           (git+file:///srv/fleet.git, git+ssh://git@host/fleet.git#prod, …)
//! cache+<store URL>         the binary cache the closures go to, the release under `fleet/`:
//!                           read and publish (cache+file:///srv/cache, cache+https://…
//!                           accepting PUT, cache+s3://bucket?region=…&endpoint=…)
//! ```
//!
//! Directories and caches get one file at a time, in an order that lets a reader at any moment
//! see the old release or the new one, each with valid signatures ([`switch_signed`]).

use crate::git;
use anyhow::{bail, Context as _, Result};
use fleet_agent::config::{CacheLocation, CacheSpec, ChannelSpec};
use fleet_agent::release::{
    self, TrustPolicy, VerifiedRelease, VerifyContext, VerifyError, DOCUMENT_FILE, FORMAT_TREE,
    FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE, HOSTS_FILE, MAX_DOCUMENT_BYTES, MAX_FRESHNESS_BYTES,
    MAX_HOST_LIST_BYTES, MAX_SIGNATURE_FILE_BYTES, SIGNATURE_FILE,
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
    /// Format 2: `hosts.json`, every entry (read for a format-2 release; written with one).
    pub hosts: Option<Vec<u8>>,
    /// Format 2: each host's piece, (path relative to the channel, bytes); written, never read.
    pub pieces: Vec<(String, Vec<u8>)>,
}

impl Published {
    /// Verifies the release as a host would, with every host entry (a format-2 release's from
    /// `hosts.json`, checked against its signed root): what the workstation and the collector
    /// work with.
    pub fn verify(
        &self,
        trust: &TrustPolicy,
        context: &VerifyContext,
    ) -> std::result::Result<VerifiedRelease, VerifyError> {
        release::verify(&self.document, &self.signatures, trust, context)?
            .with_all_hosts(self.hosts.as_deref())
    }

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

/// Whether a format-2 release's `hosts.json` is read (every entry: megabytes in a large fleet).
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostList {
    Read,
    Skip,
}

/// A channel's files as read (`None`: missing), in the order of [`FILES`], as a release.
fn assemble(files: [Option<Vec<u8>>; 4]) -> Option<Published> {
    let [document, signatures, statement, statement_signatures] = files;
    Some(Published {
        document: document?,
        signatures: signatures.unwrap_or_default(),
        freshness: statement.map(|s| (s, statement_signatures.unwrap_or_default())),
        hosts: None,
        pieces: Vec::new(),
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

    /// The Nix store URL of a cache channel (`cache+<store URL>`).
    pub fn cache_store(&self) -> Option<&str> {
        match &self.0 {
            ChannelSpec::Cache(cache) => Some(&cache.store),
            _ => None,
        }
    }

    /// Whether this is a git remote.
    pub fn is_git(&self) -> bool {
        matches!(self.0, ChannelSpec::Git { .. })
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

    /// Where the channel's files are read and written one by one: a directory, a cache's
    /// folder or its object store; `None` for a static HTTP URL and git.
    fn file_store(&self) -> Result<Option<Box<dyn FileStore>>> {
        Ok(match &self.0 {
            ChannelSpec::Directory(dir)
            | ChannelSpec::Cache(CacheSpec {
                location: CacheLocation::Directory(dir),
                ..
            }) => Some(Box::new(DirStore(dir.clone()))),
            ChannelSpec::Cache(CacheSpec {
                store,
                location: CacheLocation::Http(_),
            }) => Some(Box::new(crate::objects::Objects::http(store)?)),
            ChannelSpec::Cache(CacheSpec {
                store,
                location: CacheLocation::S3(location),
            }) => Some(Box::new(crate::objects::Objects::s3(store, location)?)),
            ChannelSpec::Http(_) | ChannelSpec::Git { .. } => None,
        })
    }

    /// The release the channel holds now, or `None` when it holds none yet.
    pub fn read(&self) -> Result<Option<Published>> {
        self.read_files(Files::Release, HostList::Read)
    }

    /// The release and its freshness statement, if the channel holds one.
    pub fn read_with_freshness(&self) -> Result<Option<Published>> {
        self.read_files(Files::WithFreshness, HostList::Read)
    }

    /// The release and its freshness statement without a format-2 release's host list: for
    /// [`Self::update`], which changes files beside a release and never needs every entry.
    pub fn read_for_update(&self) -> Result<Option<Published>> {
        self.read_files(Files::WithFreshness, HostList::Skip)
    }

    fn read_files(&self, files: Files, host_list: HostList) -> Result<Option<Published>> {
        let mut names = FILES[..files as usize].to_vec();
        // A format-2 root names its hosts in hosts.json: read it too (the verifier checks it
        // against the signed root). Known only after reading the root, so it comes last.
        names.push((HOSTS_FILE, MAX_HOST_LIST_BYTES));
        let wants_hosts = |document: &[u8]| {
            #[derive(serde::Deserialize)]
            struct Probe {
                format: u32,
            }
            host_list == HostList::Read
                && serde_json::from_slice::<Probe>(document).is_ok_and(|p| p.format == FORMAT_TREE)
        };
        if let Some(store) = self.file_store()? {
            return read_each(&names, wants_hosts, |name, limit| store.read(name, limit));
        }
        match &self.0 {
            ChannelSpec::Directory(_) | ChannelSpec::Cache(_) => unreachable!("a file store"),
            ChannelSpec::Http(base) => read_http(base, &names, wants_hosts),
            ChannelSpec::Git { url, refname } => {
                let scratch = git::Scratch::new()?;
                let Some(tip) = scratch.fetch_tip(url, refname)? else {
                    return Ok(None);
                };
                Ok(Some(read_commit(
                    &scratch,
                    &tip,
                    url,
                    refname,
                    &names,
                    wants_hosts,
                )?))
            }
        }
    }

    /// Publishes a signed release, with its freshness statement when it has one (a statement
    /// left from an earlier release is removed); returns where it went (a path or a commit).
    pub fn publish(&self, release: &Published, message: &str) -> Result<String> {
        if let Some(store) = self.file_store()? {
            publish_files(&*store, release)?;
            return Ok(store.describe());
        }
        match &self.0 {
            ChannelSpec::Directory(_) | ChannelSpec::Cache(_) => unreachable!("a file store"),
            ChannelSpec::Http(url) => Err(read_only(url)),
            ChannelSpec::Git { url, refname } => {
                let scratch = git::Scratch::new()?;
                let parent = scratch.fetch_tip(url, refname)?;
                let commit = scratch.commit_and_push(
                    url,
                    refname,
                    parent.as_deref(),
                    &tree(release),
                    git::Tree::Exactly,
                    message,
                )?;
                Ok(format!("commit {commit}"))
            }
        }
    }

    /// Replaces some files beside the release the channel holds, which must still be
    /// `document` (else another release was published meanwhile: nothing is written): a new
    /// freshness statement, a signature file with one more signature. A directory gets those
    /// files alone, so the others stay untouched (an HTTP server keeps their validators); a git
    /// ref gets a commit on top of its tip changing only those files.
    pub fn update(
        &self,
        document: &[u8],
        files: &[(&str, &[u8])],
        message: &str,
    ) -> Result<String> {
        let changed = || {
            anyhow::anyhow!(
                "the release in {self} changed meanwhile: nothing written, run this again"
            )
        };
        if let Some(store) = self.file_store()? {
            let current = store.read(DOCUMENT_FILE, MAX_DOCUMENT_BYTES)?;
            if current.as_deref() != Some(document) {
                return Err(changed());
            }
            update_files(&*store, files)?;
            return Ok(store.describe());
        }
        match &self.0 {
            ChannelSpec::Directory(_) | ChannelSpec::Cache(_) => unreachable!("a file store"),
            ChannelSpec::Http(url) => Err(read_only(url)),
            ChannelSpec::Git { url, refname } => {
                let scratch = git::Scratch::new()?;
                let tip = scratch.fetch_tip(url, refname)?.ok_or_else(changed)?;
                let current = scratch.read_file(&tip, DOCUMENT_FILE, MAX_DOCUMENT_BYTES)?;
                if current.as_deref() != Some(document) {
                    return Err(changed());
                }
                let commit = scratch.commit_and_push(
                    url,
                    refname,
                    Some(&tip),
                    files,
                    git::Tree::KeepOthers,
                    message,
                )?;
                Ok(format!("commit {commit}"))
            }
        }
    }
}

/// Why nothing can be published to an HTTP channel.
fn read_only(url: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot publish to '{url}': fleet-sign publishes to a directory or a git remote; publish \
         to the directory this URL serves"
    )
}

/// The files of a release commit: the release's two, the statement's when it has one, and a
/// format-2 release's list and pieces.
fn tree(release: &Published) -> Vec<(&str, &[u8])> {
    let mut files = vec![
        (DOCUMENT_FILE, release.document.as_slice()),
        (SIGNATURE_FILE, release.signatures.as_slice()),
    ];
    if let Some((statement, signatures)) = &release.freshness {
        files.push((FRESHNESS_FILE, statement.as_slice()));
        files.push((FRESHNESS_SIGNATURE_FILE, signatures.as_slice()));
    }
    if let Some(list) = &release.hosts {
        files.push((HOSTS_FILE, list.as_slice()));
    }
    files.extend(
        release
            .pieces
            .iter()
            .map(|(path, bytes)| (path.as_str(), bytes.as_slice())),
    );
    files
}

/// A channel written one file at a time: a directory, or a cache's object store.
trait FileStore {
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// One file, capped; `None` when missing.
    fn read(&self, name: &str, limit: usize) -> Result<Option<Vec<u8>>>;
    /// Replaces one file whole: a reader sees the old bytes or the new ones.
    fn write(&self, name: &str, bytes: &[u8]) -> Result<()>;
    fn remove(&self, name: &str) -> Result<()>;
    /// Writes a format-2 release's pieces (`hosts/<serial>/<host>.json`).
    fn write_pieces(&self, pieces: &[(String, Vec<u8>)]) -> Result<()>;
    /// The serials with pieces (the folders below `hosts/`).
    fn piece_serials(&self) -> Result<Vec<u64>>;
    /// Removes one serial's pieces.
    fn remove_pieces(&self, serial: u64) -> Result<()>;
}

/// Publishes a release file by file: the pieces first (a host that sees the new root finds its
/// piece), the host list, the document with its signatures ([`switch_signed`]), the freshness
/// statement (a statement left from an earlier release is removed), then the pieces of older
/// releases are pruned. Until the document is replaced, the channel serves the old release
/// whole; a failure after it says the release is out.
fn publish_files(store: &dyn FileStore, release: &Published) -> Result<()> {
    store.write_pieces(&release.pieces)?;
    match &release.hosts {
        Some(list) => store.write(HOSTS_FILE, list)?,
        None => store.remove(HOSTS_FILE)?,
    }
    switch_signed(
        store,
        (DOCUMENT_FILE, &release.document),
        (SIGNATURE_FILE, &release.signatures),
    )?;
    let published = || format!("the release is published in {}, but", store.describe());
    match &release.freshness {
        Some((statement, signatures)) => switch_signed(
            store,
            (FRESHNESS_FILE, statement),
            (FRESHNESS_SIGNATURE_FILE, signatures),
        ),
        None => [FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE]
            .into_iter()
            .try_for_each(|name| store.remove(name)),
    }
    .with_context(|| format!("{} its freshness statement is not", published()))?;
    prune_pieces(store, &release.pieces)
        .with_context(|| format!("{} older pieces were not pruned", published()))
}

/// Replaces files beside the current release (`update`): a statement and its signatures
/// together through [`switch_signed`], any other file alone.
fn update_files(store: &dyn FileStore, files: &[(&str, &[u8])]) -> Result<()> {
    let find = |name: &str| files.iter().find(|(n, _)| *n == name).map(|(_, b)| *b);
    for (name, bytes) in files {
        match (*name, find(FRESHNESS_SIGNATURE_FILE)) {
            (FRESHNESS_FILE, Some(signatures)) => switch_signed(
                store,
                (FRESHNESS_FILE, bytes),
                (FRESHNESS_SIGNATURE_FILE, signatures),
            )?,
            (FRESHNESS_SIGNATURE_FILE, _) if find(FRESHNESS_FILE).is_some() => {}
            _ => store.write(name, bytes)?,
        }
    }
    Ok(())
}

/// Replaces a signed file and its signature file so that a reader, whenever it reads the
/// pair, finds the old file or the new one with signatures valid for it: first a signature
/// file holding both files' signatures (a signature that does not fit the file read never
/// spoils the others), then the file, then its own signatures alone.
fn switch_signed(
    store: &dyn FileStore,
    (name, bytes): (&str, &[u8]),
    (signatures_name, signatures): (&str, &[u8]),
) -> Result<()> {
    let old = store.read(signatures_name, MAX_SIGNATURE_FILE_BYTES)?;
    if let Some(both) = old.and_then(|old| both_signatures(signatures, &old)) {
        store.write(signatures_name, &both)?;
    }
    store.write(name, bytes)?;
    store.write(signatures_name, signatures)
}

/// The lines of `new` followed by those of `old` not in it, when that fits in a signature
/// file; `None` when nothing is to be added or it does not fit.
fn both_signatures(new: &[u8], old: &[u8]) -> Option<Vec<u8>> {
    let lines = |b: &'_ [u8]| -> Vec<Vec<u8>> {
        b.split(|c| *c == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let mut all = lines(new);
    let added: Vec<_> = lines(old)
        .into_iter()
        .filter(|l| !all.contains(l))
        .collect();
    if added.is_empty() {
        return None;
    }
    all.extend(added);
    let mut both = all.join(&b'\n');
    both.push(b'\n');
    (all.len() <= release::MAX_SIGNATURES && both.len() <= MAX_SIGNATURE_FILE_BYTES).then_some(both)
}

/// A directory channel (or a `file://` cache's folder): files replaced by rename.
struct DirStore(std::path::PathBuf);

impl FileStore for DirStore {
    fn describe(&self) -> String {
        self.0.display().to_string()
    }

    fn read(&self, name: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        read_capped(&self.0.join(name), limit)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        std::fs::create_dir_all(&self.0)
            .with_context(|| format!("could not create directory {}", self.0.display()))?;
        write_atomic(&self.0.join(name), bytes)
    }

    fn remove(&self, name: &str) -> Result<()> {
        remove_if_present(&self.0.join(name))
    }

    /// Each file written whole, then the directory fsynced once (a file per host; one fsync
    /// each would cost seconds).
    fn write_pieces(&self, pieces: &[(String, Vec<u8>)]) -> Result<()> {
        let dir = &self.0;
        let mut dirs = std::collections::BTreeSet::new();
        for (path, bytes) in pieces {
            let path = dir.join(path);
            let parent = path.parent().unwrap_or(dir).to_path_buf();
            if dirs.insert(parent.clone()) {
                std::fs::create_dir_all(&parent)
                    .with_context(|| format!("could not create directory {}", parent.display()))?;
            }
            // Readable by the web server whatever the umask; set on the open file.
            std::fs::File::create(&path)
                .and_then(|mut file| {
                    file.write_all(bytes)?;
                    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
                })
                .with_context(|| format!("could not write {}", path.display()))?;
        }
        // The files' data and the directories' entries, in one call for the file system.
        if let Some(parent) = dirs.first() {
            fleet_agent::durable::sync_file_system(parent)
                .with_context(|| format!("could not sync {}", parent.display()))?;
        }
        Ok(())
    }

    fn piece_serials(&self) -> Result<Vec<u64>> {
        let Ok(entries) = std::fs::read_dir(self.0.join("hosts")) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect())
    }

    fn remove_pieces(&self, serial: u64) -> Result<()> {
        let path = self.0.join("hosts").join(serial.to_string());
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("could not remove {}", path.display()))
    }
}

impl FileStore for crate::objects::Objects {
    fn describe(&self) -> String {
        self.name()
    }

    fn read(&self, name: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        self.read(name, limit)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write(name, bytes)
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.remove(name)
    }

    fn write_pieces(&self, pieces: &[(String, Vec<u8>)]) -> Result<()> {
        self.write_all(pieces)
    }

    fn piece_serials(&self) -> Result<Vec<u64>> {
        Ok(self
            .folders("hosts")?
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect())
    }

    fn remove_pieces(&self, serial: u64) -> Result<()> {
        self.remove_folder(&format!("hosts/{serial}"))
    }
}

/// Removes the pieces of releases before the one just published and the one before it (a host
/// that read the previous root a moment ago still finds its piece).
fn prune_pieces(store: &dyn FileStore, pieces: &[(String, Vec<u8>)]) -> Result<()> {
    let current: Option<u64> = pieces
        .first()
        .and_then(|(path, _)| path.split('/').nth(1)?.parse().ok());
    let mut serials = store.piece_serials()?;
    serials.sort_unstable();
    let keep: Vec<u64> = match current {
        // The new one and the newest before it.
        Some(current) => {
            let before = serials.iter().rev().find(|s| **s < current).copied();
            [Some(current), before].into_iter().flatten().collect()
        }
        // A format-1 release: the newest pieces stay one release longer.
        None => serials.last().copied().into_iter().collect(),
    };
    for serial in serials.into_iter().filter(|s| !keep.contains(s)) {
        store.remove_pieces(serial)?;
    }
    Ok(())
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
    wants_hosts: impl Fn(&[u8]) -> bool,
) -> Result<Published> {
    read_each(names, wants_hosts, |name, limit| {
        scratch.read_file(tip, name, limit)
    })?
    .ok_or_else(|| {
        anyhow::anyhow!(
            "ref '{refname}' of '{url}' (commit {tip}) has no {DOCUMENT_FILE}: is this the \
                 release ref?"
        )
    })
}

/// Reads `names` (the release's files, then `hosts.json`) with `read`: `None` when the channel
/// has no document; `hosts.json` only for a document `wants_hosts`.
fn read_each(
    names: &[(&str, usize)],
    wants_hosts: impl Fn(&[u8]) -> bool,
    mut read: impl FnMut(&str, usize) -> Result<Option<Vec<u8>>>,
) -> Result<Option<Published>> {
    let (hosts_name, hosts_limit) = names[names.len() - 1];
    let mut files: [Option<Vec<u8>>; 4] = Default::default();
    for (slot, (name, limit)) in files.iter_mut().zip(&names[..names.len() - 1]) {
        *slot = read(name, *limit)?;
        if slot.is_none() && *name == DOCUMENT_FILE {
            return Ok(None);
        }
    }
    let Some(mut published) = assemble(files) else {
        return Ok(None);
    };
    if wants_hosts(&published.document) {
        published.hosts = read(hosts_name, hosts_limit)?;
    }
    Ok(Some(published))
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

fn read_http(
    base: &str,
    names: &[(&str, usize)],
    wants_hosts: impl Fn(&[u8]) -> bool,
) -> Result<Option<Published>> {
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
    read_each(names, wants_hosts, get)
}

/// A file over its limit: refused with the code hosts report for it (`too_large`).
pub fn too_large(what: &str, limit: usize) -> anyhow::Error {
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

    #[test]
    fn both_signatures_hold_the_old_and_the_new_lines_while_they_fit() {
        assert_eq!(
            both_signatures(b"a:new\n", b"a:old\nb:old\n").as_deref(),
            Some(&b"a:new\na:old\nb:old\n"[..])
        );
        // Nothing to add: the new file alone.
        assert_eq!(both_signatures(b"a:x\n", b"a:x\n"), None);
        // Too many lines for one file: the new file alone.
        let many: Vec<u8> = (0..release::MAX_SIGNATURES)
            .flat_map(|i| format!("k{i}:old\n").into_bytes())
            .collect();
        assert_eq!(both_signatures(b"a:new\n", &many), None);
    }
}
