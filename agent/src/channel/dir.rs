//! A directory channel: a local path holding `release.json` and `release.json.sig` (tests,
//! air-gapped updates from a USB stick), and `freshness.json` with its signatures when the host
//! trusts freshness keys.
//!
//! An idle poll is a `stat` of each file: when none changed (device, inode, size, modification
//! and change times), nothing is read or parsed. Publishers replace files by rename (a new
//! inode), and an edit in place changes the times.

use super::{
    read_capped, ChannelError, Fetched, FetchedFreshness, Polled, WantFreshness, FILES,
    FRESHNESS_FILES,
};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

pub struct DirChannel {
    dir: PathBuf,
    want_freshness: WantFreshness,
    /// What the files looked like when last read.
    seen: Option<Vec<Option<FileId>>>,
}

/// What identifies one version of a file without reading it; `None` in a list: missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// What a poll remembers, to be put back with [`DirChannel::restore`].
pub type Memory = Option<Vec<Option<FileId>>>;

impl DirChannel {
    pub fn new(dir: PathBuf, want_freshness: WantFreshness) -> Self {
        Self {
            dir,
            want_freshness,
            seen: None,
        }
    }

    pub fn forget(&mut self) {
        self.seen = None;
    }

    pub fn memory(&self) -> Memory {
        self.seen.clone()
    }

    pub fn restore(&mut self, memory: Memory) {
        self.seen = memory;
    }

    /// The files a poll reads, in order.
    fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&str> = FILES.iter().map(|(name, _)| *name).collect();
        if self.want_freshness.0 {
            names.extend(FRESHNESS_FILES.iter().map(|(name, _)| *name));
        }
        names
    }

    async fn stat(&self) -> Vec<Option<FileId>> {
        let mut ids = Vec::new();
        for name in self.names() {
            let id = tokio::fs::metadata(self.dir.join(name))
                .await
                .ok()
                .map(|m| FileId {
                    dev: m.dev(),
                    ino: m.ino(),
                    size: m.size(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    ctime: (m.ctime(), m.ctime_nsec()),
                });
            ids.push(id);
        }
        ids
    }

    /// Reads the files in `names`: `None` when the first is missing, an empty second when only
    /// it is missing.
    async fn read_pair(
        &self,
        names: [(&str, usize); 2],
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, ChannelError> {
        let mut files = Vec::new();
        for (name, limit) in names {
            let path = self.dir.join(name);
            let file = match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && files.is_empty() => {
                    if tokio::fs::metadata(&self.dir).await.is_err() {
                        return Err(ChannelError::Io {
                            what: format!("channel directory {}", self.dir.display()),
                            source: e,
                        });
                    }
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    files.push(Vec::new());
                    continue;
                }
                Err(source) => {
                    return Err(ChannelError::Io {
                        what: path.display().to_string(),
                        source,
                    })
                }
            };
            files.push(read_capped(file, limit, &path.display().to_string()).await?);
        }
        let second = files.pop().unwrap_or_default();
        let first = files.pop().unwrap_or_default();
        Ok(Some((first, second)))
    }

    /// One file below the directory, capped; `None` when it does not exist.
    pub async fn read_file(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, ChannelError> {
        let path = self.dir.join(path);
        match tokio::fs::File::open(&path).await {
            Ok(file) => read_capped(file, limit, &path.display().to_string())
                .await
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChannelError::Io {
                what: path.display().to_string(),
                source,
            }),
        }
    }

    pub async fn read_freshness(&self) -> Result<Option<FetchedFreshness>, ChannelError> {
        Ok(self
            .read_pair(FRESHNESS_FILES)
            .await?
            .map(|(statement, signatures)| FetchedFreshness {
                statement,
                signatures,
            }))
    }

    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        // Taken before reading: a file replaced while it is read differs at the next poll.
        let ids = self.stat().await;
        if self.seen.as_ref() == Some(&ids) && ids[0].is_some() {
            return Ok(Polled::Unchanged);
        }
        let Some((document, signatures)) = self.read_pair(FILES).await? else {
            self.seen = None;
            return Ok(Polled::Empty);
        };
        let freshness = match self.want_freshness {
            WantFreshness(true) => self.read_freshness().await?,
            WantFreshness(false) => None,
        };
        self.seen = Some(ids);
        Ok(Polled::Release(Fetched {
            document,
            signatures,
            freshness,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unchanged_directory_is_only_stat_ed() {
        let dir = tempfile::tempdir().unwrap();
        let mut channel = DirChannel::new(dir.path().to_owned(), WantFreshness(true));
        assert_eq!(channel.poll().await.unwrap(), Polled::Empty);
        let write = |name: &str, bytes: &[u8]| {
            // As publishers do: a new file renamed into place.
            let temp = dir.path().join(".tmp");
            std::fs::write(&temp, bytes).unwrap();
            std::fs::rename(&temp, dir.path().join(name)).unwrap();
        };
        write("release.json", b"one");
        write("release.json.sig", b"sig");
        assert!(
            matches!(channel.poll().await.unwrap(), Polled::Release(f) if f.document == b"one")
        );
        assert_eq!(channel.poll().await.unwrap(), Polled::Unchanged);
        // Same size, replaced: read again.
        write("release.json", b"two");
        assert!(
            matches!(channel.poll().await.unwrap(), Polled::Release(f) if f.document == b"two")
        );
        assert_eq!(channel.poll().await.unwrap(), Polled::Unchanged);
        // A statement appearing is a change too.
        write("freshness.json", b"{}");
        assert!(matches!(
            channel.poll().await.unwrap(),
            Polled::Release(f) if f.freshness.as_ref().is_some_and(|s| s.statement == b"{}")
        ));
        // Edited in place (same inode): the times tell.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("release.json.sig"), b"SIG").unwrap();
        assert!(
            matches!(channel.poll().await.unwrap(), Polled::Release(f) if f.signatures == b"SIG")
        );
        channel.forget();
        assert!(matches!(channel.poll().await.unwrap(), Polled::Release(_)));
        std::fs::remove_file(dir.path().join("release.json")).unwrap();
        assert_eq!(channel.poll().await.unwrap(), Polled::Empty);
    }
}
