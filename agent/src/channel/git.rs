//! A git channel: the tip of one ref in any git remote, fetched with git2.
//!
//! Only that ref is fetched, with depth 1, into a bare repository in the state directory; the
//! tip's tree holds the two release files. An idle poll is a ref negotiation that transfers no
//! objects. Moving the ref back to an older signed commit changes nothing: the serial decides.

use super::git_transport;
use super::{
    ChannelError, Fetched, FetchedFreshness, Polled, WantFreshness, FILES, FRESHNESS_FILES,
    MAX_GIT_FETCH_BYTES,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const TIP_REF: &str = "refs/fleet/tip";

pub struct GitChannel {
    url: String,
    refname: String,
    want_freshness: WantFreshness,
    repo_dir: PathBuf,
    transport: git_transport::Settings,
    last_tip: Option<git2::Oid>,
}

impl GitChannel {
    /// `transport`: the credentials, timeout and CA file its fetches use.
    pub fn new(
        url: String,
        refname: String,
        want_freshness: WantFreshness,
        repo_dir: PathBuf,
        transport: git_transport::Settings,
    ) -> Self {
        Self {
            url,
            refname,
            want_freshness,
            repo_dir,
            transport,
            last_tip: None,
        }
    }

    pub fn forget(&mut self) {
        self.last_tip = None;
    }

    /// What a poll remembers (the tip last seen), to be put back with [`Self::restore`].
    pub fn memory(&self) -> Option<git2::Oid> {
        self.last_tip
    }

    pub fn restore(&mut self, memory: Option<git2::Oid>) {
        self.last_tip = memory;
    }

    /// One file of the tip last fetched, capped; `None` when the tree has no such file.
    pub async fn read_file(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, ChannelError> {
        let Some(tip) = self.last_tip else {
            return Ok(None);
        };
        let (repo_dir, path) = (self.repo_dir.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            let repo = git2::Repository::open_bare(&repo_dir)
                .map_err(|e| git_error("cannot open the git cache", e))?;
            let tree = repo
                .find_commit(tip)
                .and_then(|c| c.tree())
                .map_err(|e| git_error(&format!("tree of commit {tip}"), e))?;
            let Ok(entry) = tree.get_path(std::path::Path::new(&path)) else {
                return Ok(None);
            };
            let blob = repo
                .find_blob(entry.id())
                .map_err(|e| git_error(&format!("{path} in commit {tip}"), e))?;
            if blob.size() > limit {
                return Err(ChannelError::TooLarge {
                    what: format!("{path} in commit {tip}"),
                    limit,
                });
            }
            Ok(Some(blob.content().to_vec()))
        })
        .await
        .map_err(|e| ChannelError::Git(format!("git read task failed: {e}")))?
    }

    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        // The shortcut for an idle poll: ask where the one branch points (protocol v2), and
        // skip the fetch, whose ref advertisement lists every ref of the remote, when it has
        // not moved.
        if let Some(last) = self.last_tip {
            if let Some(tip) =
                git_transport::remote_tip_v2(&self.url, &self.refname, &self.transport).await
            {
                if tip == last.to_string() {
                    return Ok(Polled::Unchanged);
                }
            }
        }
        let mut transport = self.transport.clone();
        // When this poll is given up (its timeout, shutdown), the fetch on the blocking thread
        // stops too: no request after that, libgit2 told to abort.
        let cancelled = Arc::new(AtomicBool::new(false));
        transport.cancelled = Some(cancelled.clone());
        let _cancel_on_drop = CancelOnDrop(cancelled);
        let job = Job {
            url: self.url.clone(),
            refname: self.refname.clone(),
            want_freshness: self.want_freshness,
            repo_dir: self.repo_dir.clone(),
            transport,
            last_tip: self.last_tip,
        };
        let (tip, polled) = tokio::task::spawn_blocking(move || job.run())
            .await
            .map_err(|e| ChannelError::Git(format!("git fetch task failed: {e}")))??;
        self.last_tip = tip;
        Ok(polled)
    }
}

/// Sets the flag when dropped: the poll's future is dropped when the poll gives up.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The blocking part, run on a blocking thread.
struct Job {
    url: String,
    refname: String,
    want_freshness: WantFreshness,
    repo_dir: PathBuf,
    transport: git_transport::Settings,
    last_tip: Option<git2::Oid>,
}

fn git_error(what: &str, error: git2::Error) -> ChannelError {
    ChannelError::Git(format!("{what}: {}", error.message()))
}

impl Job {
    fn run(self) -> Result<(Option<git2::Oid>, Polled), ChannelError> {
        // Only one fetch at a time may use the process-wide transport settings.
        static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = FETCH.lock().unwrap_or_else(|e| e.into_inner());
        let repo = match git2::Repository::open_bare(&self.repo_dir) {
            Ok(repo) => repo,
            Err(_) => {
                std::fs::create_dir_all(&self.repo_dir).map_err(|source| ChannelError::Io {
                    what: format!("git cache {}", self.repo_dir.display()),
                    source,
                })?;
                git2::Repository::init_bare(&self.repo_dir)
                    .map_err(|e| git_error("cannot create the git cache", e))?
            }
        };
        let mut remote = repo
            .remote_anonymous(&self.url)
            .map_err(|e| git_error(&format!("git remote '{}'", self.url), e))?;

        git_transport::register().map_err(|e| git_error("cannot set up git transports", e))?;
        // A runtime of the fetch's own for git over HTTP: when a given-up poll lets the process
        // end, this thread reads on in a runtime nobody shuts down, instead of panicking in the
        // agent's.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ChannelError::Io {
                what: "a runtime for the git fetch".into(),
                source,
            })?;
        let mut transport = self.transport.clone();
        transport.runtime = Some(Arc::new(runtime));
        git_transport::configure(transport);
        let mut callbacks = git2::RemoteCallbacks::new();
        let transport = self.transport.clone();
        callbacks.transfer_progress(move |progress| {
            progress.received_bytes() <= MAX_GIT_FETCH_BYTES && !transport.is_cancelled()
        });

        let refspec = format!("+refs/heads/{}:{TIP_REF}", self.refname);
        let mut options = git2::FetchOptions::new();
        options
            .remote_callbacks(callbacks)
            .download_tags(git2::AutotagOption::None)
            .update_fetchhead(false);
        // libgit2's local transport cannot fetch shallowly; a local fetch copies only the
        // objects of the one ref anyway.
        let local = self.url.starts_with("file://") || self.url.starts_with('/');
        if !local {
            options.depth(1);
        }
        if let Err(error) = remote.fetch(&[&refspec], Some(&mut options), None) {
            let stats = remote.stats();
            if let Some((what, limit)) = git_transport::too_large(error.message()) {
                return Err(ChannelError::TooLarge {
                    what: format!("{what} from '{}'", self.url),
                    limit,
                });
            }
            if stats.received_bytes() > MAX_GIT_FETCH_BYTES {
                return Err(ChannelError::TooLarge {
                    what: format!("git fetch from '{}'", self.url),
                    limit: MAX_GIT_FETCH_BYTES,
                });
            }
            if error.message().contains(git_transport::STALLED)
                || error.code() == git2::ErrorCode::Timeout
                || error.message().contains("timed out")
            {
                return Err(ChannelError::TimedOut {
                    what: format!(
                        "the next bytes of the git fetch from '{}' (the answer stalled)",
                        self.url
                    ),
                    after: super::STALL_TIMEOUT.min(self.transport.timeout),
                });
            }
            if error
                .message()
                .contains(git_transport::UNTRUSTED_CERTIFICATE)
            {
                return Err(ChannelError::Tls(format!(
                    "cannot fetch ref '{}' from '{}': {} (the system's trust store and ca_file)",
                    self.refname,
                    self.url,
                    error.message()
                )));
            }
            if error.message().contains("couldn't find remote ref") {
                return Ok((None, Polled::Empty));
            }
            let message = error.message();
            if message.contains("HTTP 401")
                || message.contains("HTTP 403")
                || message.contains("Permission denied")
                || message.contains("Host key verification failed")
            {
                return Err(ChannelError::Credentials(format!(
                    "cannot fetch ref '{}' from '{}': {message} (check token_file, ssh_key_file \
                     and ssh_known_hosts_file)",
                    self.refname, self.url
                )));
            }
            return Err(git_error(
                &format!("cannot fetch ref '{}' from '{}'", self.refname, self.url),
                error,
            ));
        }
        let tip = match repo.refname_to_id(TIP_REF) {
            Ok(oid) => oid,
            Err(_) => return Ok((None, Polled::Empty)),
        };
        if Some(tip) == self.last_tip {
            return Ok((Some(tip), Polled::Unchanged));
        }
        let commit = repo
            .find_commit(tip)
            .map_err(|e| git_error(&format!("tip {tip} of '{}'", self.refname), e))?;
        let tree = commit
            .tree()
            .map_err(|e| git_error(&format!("tree of commit {tip}"), e))?;
        let odb = repo
            .odb()
            .map_err(|e| git_error("git object database", e))?;
        let read = |name: &str, limit: usize| -> Result<Option<Vec<u8>>, ChannelError> {
            let Some(entry) = tree.get_name(name) else {
                return Ok(None);
            };
            let (size, kind) = odb
                .read_header(entry.id())
                .map_err(|e| git_error(&format!("{name} in commit {tip}"), e))?;
            if kind != git2::ObjectType::Blob {
                return Err(ChannelError::Git(format!(
                    "{name} in commit {tip} is not a file"
                )));
            }
            if size > limit {
                return Err(ChannelError::TooLarge {
                    what: format!("{name} in commit {tip}"),
                    limit,
                });
            }
            let blob = repo
                .find_blob(entry.id())
                .map_err(|e| git_error(&format!("{name} in commit {tip}"), e))?;
            Ok(Some(blob.content().to_vec()))
        };
        let [(document_name, document_limit), (signatures_name, signatures_limit)] = FILES;
        let Some(document) = read(document_name, document_limit)? else {
            return Err(ChannelError::Git(format!(
                "commit {tip} of ref '{}' has no {document_name}: is this the release ref?",
                self.refname
            )));
        };
        let signatures = read(signatures_name, signatures_limit)?.unwrap_or_default();
        let freshness = match self.want_freshness {
            WantFreshness(true) => {
                let [(statement_name, statement_limit), (fsig_name, fsig_limit)] = FRESHNESS_FILES;
                match read(statement_name, statement_limit)? {
                    Some(statement) => Some(FetchedFreshness {
                        statement,
                        signatures: read(fsig_name, fsig_limit)?.unwrap_or_default(),
                    }),
                    None => None,
                }
            }
            WantFreshness(false) => None,
        };
        Ok((
            Some(tip),
            Polled::Release(Fetched {
                document,
                signatures,
                freshness,
            }),
        ))
    }
}
