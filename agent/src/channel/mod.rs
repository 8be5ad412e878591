//! Release channels: where the agent finds the signed release (SPEC §4).
//!
//! Every fetch is capped in size ([`MAX_DOCUMENT_BYTES`], [`MAX_SIGNATURE_FILE_BYTES`]) and in
//! time; what comes back is unverified bytes, for [`crate::release::verify`] alone to judge.

mod dir;
mod git;
mod git_transport;
mod http;
#[cfg(feature = "s3")]
pub mod s3;

use crate::config::{CacheLocation, CacheSpec, ChannelSpec, Config};
use crate::release::{
    FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE, MAX_DOCUMENT_BYTES, MAX_FRESHNESS_BYTES,
    MAX_HOST_PIECE_BYTES, MAX_SIGNATURE_FILE_BYTES,
};
use std::path::PathBuf;
use std::time::Duration;

/// Longest a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the next bytes of a response (HTTP, git over HTTP) before it counts as
/// stalled, whatever time the whole poll has left.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes one git fetch may receive.
pub const MAX_GIT_FETCH_BYTES: usize = 64 << 20;

/// A release as fetched, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub document: Vec<u8>,
    pub signatures: Vec<u8>,
    /// The freshness statement beside it, when the host trusts freshness keys and the channel
    /// holds one.
    pub freshness: Option<FetchedFreshness>,
}

/// A freshness statement as fetched, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFreshness {
    pub statement: Vec<u8>,
    pub signatures: Vec<u8>,
}

impl FetchedFreshness {
    /// The form [`crate::release::verify_freshness`] takes.
    pub fn as_pair(this: &Option<Self>) -> Option<(&[u8], &[u8])> {
        this.as_ref()
            .map(|f| (f.statement.as_slice(), f.signatures.as_slice()))
    }
}

/// What a poll of the freshness statement alone found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreshnessPolled {
    /// The same statement as before.
    Unchanged,
    /// The channel's current statement, or `None` when it holds none.
    Statement(Option<FetchedFreshness>),
}

/// What a poll found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// Nothing changed since the last poll of this channel.
    Unchanged,
    /// The channel holds no release yet.
    Empty,
    /// The channel's current release.
    Release(Fetched),
}

/// Why a poll failed. All of these are worth retrying later, with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{what} is larger than the limit of {limit} bytes: refusing")]
    TooLarge { what: String, limit: usize },
    #[error("{what} did not arrive within {}", humantime::format_duration(*.after))]
    TimedOut { what: String, after: Duration },
    #[error("{0}")]
    Http(String),
    /// The server's certificate was refused (unknown issuer, wrong name, expired).
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Git(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Credentials(String),
}

impl ChannelError {
    /// A stable reason code for reports.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::TimedOut { .. } => "channel_timeout",
            Self::Credentials(_) => "channel_credentials",
            Self::Tls(_) => "tls_untrusted",
            _ => "channel_unreachable",
        }
    }
}

/// One channel with what it remembers between polls (HTTP validators, the last git tip).
pub struct Channel {
    kind: Kind,
    timeout: Duration,
}

/// Whether the channel fetches freshness statements too (the host trusts freshness keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WantFreshness(pub bool);

enum Kind {
    Directory(dir::DirChannel),
    Http(http::HttpChannel),
    Git(git::GitChannel),
    #[cfg(feature = "s3")]
    S3(s3::S3Channel),
}

fn read_secret(path: &Option<PathBuf>) -> Result<Option<String>, ChannelError> {
    path.as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .map_err(|e| ChannelError::Credentials(format!("cannot read {}: {e}", p.display())))
        })
        .transpose()
}

impl Channel {
    pub fn new(config: &Config) -> Result<Self, ChannelError> {
        let want = WantFreshness(config.freshness.is_some());
        let http = |url: &String| {
            http::HttpChannel::new(
                url.clone(),
                read_secret(&config.token_file)?,
                config.channel_timeout,
                config.ca_file.as_deref(),
                want,
            )
        };
        let kind = match &config.channel {
            ChannelSpec::Directory(path)
            | ChannelSpec::Cache(CacheSpec {
                location: CacheLocation::Directory(path),
                ..
            }) => Kind::Directory(dir::DirChannel::new(path.clone(), want)),
            ChannelSpec::Http(url)
            | ChannelSpec::Cache(CacheSpec {
                location: CacheLocation::Http(url),
                ..
            }) => Kind::Http(http(url)?),
            #[cfg(feature = "s3")]
            ChannelSpec::Cache(CacheSpec {
                location: CacheLocation::S3(location),
                ..
            }) => Kind::S3(s3::S3Channel::new(
                location,
                config.ca_file.as_deref(),
                config.channel_timeout,
                want,
            )?),
            #[cfg(not(feature = "s3"))]
            ChannelSpec::Cache(CacheSpec {
                location: CacheLocation::S3(_),
                ..
            }) => unreachable!("the config refuses cache+s3:// in an agent without the s3 feature"),
            ChannelSpec::Git { url, refname } => Kind::Git(git::GitChannel::new(
                url.clone(),
                refname.clone(),
                want,
                config.state_dir.join("git"),
                git_transport::Settings {
                    token: read_secret(&config.token_file)?,
                    ssh_key: config.ssh_key_file.clone(),
                    ssh_known_hosts: config.ssh_known_hosts_file.clone(),
                    timeout: config.channel_timeout,
                    ca_file: config.ca_file.clone(),
                    runtime: None,
                    cancelled: None,
                },
            )),
        };
        Ok(Self {
            kind,
            timeout: config.channel_timeout,
        })
    }

    /// Fetches the current release, or learns cheaply that it did not change.
    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        let work = async {
            match &mut self.kind {
                Kind::Directory(c) => c.poll().await,
                Kind::Http(c) => c.poll().await,
                Kind::Git(c) => c.poll().await,
                #[cfg(feature = "s3")]
                Kind::S3(c) => c.poll().await,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(ChannelError::TimedOut {
                what: "the release".into(),
                after: self.timeout,
            }))
    }

    /// Fetches this host's piece of a verified format-2 release (`hosts/<serial>/<host>.json`);
    /// `None` when the channel has none (the release has no entry for the host).
    pub async fn fetch_host_piece(
        &mut self,
        serial: u64,
        host: &str,
    ) -> Result<Option<Vec<u8>>, ChannelError> {
        let path = crate::release::host_piece_path(serial, host);
        let work = async {
            match &mut self.kind {
                Kind::Directory(c) => c.read_file(&path, MAX_HOST_PIECE_BYTES).await,
                Kind::Http(c) => c.fetch_file(&path, MAX_HOST_PIECE_BYTES).await,
                Kind::Git(c) => c.read_file(&path, MAX_HOST_PIECE_BYTES).await,
                #[cfg(feature = "s3")]
                Kind::S3(c) => c.fetch_file(&path, MAX_HOST_PIECE_BYTES).await,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(ChannelError::TimedOut {
                what: format!("this host's entry ({path})"),
                after: self.timeout,
            }))
    }

    /// Fetches the freshness statement alone, for a release that did not change. A directory
    /// is read again; a new statement in a git channel moves the ref, so the release poll
    /// already brought it; an HTTP channel asks with a conditional GET of its own.
    pub async fn poll_freshness(&mut self) -> Result<FreshnessPolled, ChannelError> {
        let work = async {
            match &mut self.kind {
                Kind::Directory(c) => c.read_freshness().await.map(FreshnessPolled::Statement),
                Kind::Http(c) => c.poll_freshness().await,
                Kind::Git(_) => Ok(FreshnessPolled::Unchanged),
                #[cfg(feature = "s3")]
                Kind::S3(c) => c.poll_freshness().await,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(ChannelError::TimedOut {
                what: "the freshness statement".into(),
                after: self.timeout,
            }))
    }

    /// Forgets what was seen, so the next poll fetches everything again (after a release
    /// that did not verify: it may have been caught between the writes of its two files).
    pub fn forget(&mut self) {
        match &mut self.kind {
            Kind::Directory(c) => c.forget(),
            Kind::Http(c) => c.forget(),
            Kind::Git(c) => c.forget(),
            #[cfg(feature = "s3")]
            Kind::S3(c) => c.forget(),
        }
    }

    /// Whether the channel can still be reached (a health check): a poll that must not fail.
    /// The channel's memory is put back afterwards, so a release published during the health
    /// window is still news to the next real poll.
    pub async fn reachable(&mut self) -> Result<(), ChannelError> {
        let memory = match &self.kind {
            Kind::Directory(c) => Memory::Directory(c.memory()),
            Kind::Http(c) => Memory::Http(c.memory()),
            Kind::Git(c) => Memory::Git(c.memory()),
            #[cfg(feature = "s3")]
            Kind::S3(c) => Memory::S3(c.memory()),
        };
        let result = self.poll().await.map(drop);
        match (&mut self.kind, memory) {
            (Kind::Directory(c), Memory::Directory(m)) => c.restore(m),
            (Kind::Http(c), Memory::Http(m)) => c.restore(m),
            (Kind::Git(c), Memory::Git(m)) => c.restore(m),
            #[cfg(feature = "s3")]
            (Kind::S3(c), Memory::S3(m)) => c.restore(m),
            _ => unreachable!("a channel keeps its kind"),
        }
        result
    }
}

/// What a channel remembers between polls.
enum Memory {
    Directory(dir::Memory),
    Http((http::Validators, http::Validators)),
    Git(Option<git2::Oid>),
    #[cfg(feature = "s3")]
    S3(s3::Memory),
}

/// Reads at most `limit` bytes from `reader`; more is an error.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    reader: R,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, ChannelError> {
    use tokio::io::AsyncReadExt as _;
    let mut bytes = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|source| ChannelError::Io {
            what: what.to_owned(),
            source,
        })?;
    if bytes.len() > limit {
        return Err(ChannelError::TooLarge {
            what: what.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// The two files' names and limits, in fetch order.
const FILES: [(&str, usize); 2] = [
    (crate::release::DOCUMENT_FILE, MAX_DOCUMENT_BYTES),
    (crate::release::SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES),
];

/// The freshness statement's two files' names and limits, in fetch order.
const FRESHNESS_FILES: [(&str, usize); 2] = [
    (FRESHNESS_FILE, MAX_FRESHNESS_BYTES),
    (FRESHNESS_SIGNATURE_FILE, MAX_SIGNATURE_FILE_BYTES),
];
