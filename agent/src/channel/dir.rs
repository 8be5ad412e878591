//! A directory channel: a local path holding `release.json` and `release.json.sig` (tests,
//! air-gapped updates from a USB stick), and `freshness.json` with its signatures when the host
//! trusts freshness keys.

use super::{
    read_capped, ChannelError, Fetched, FetchedFreshness, Polled, WantFreshness, FILES,
    FRESHNESS_FILES,
};
use std::path::PathBuf;

pub struct DirChannel {
    dir: PathBuf,
    want_freshness: WantFreshness,
}

impl DirChannel {
    pub fn new(dir: PathBuf, want_freshness: WantFreshness) -> Self {
        Self {
            dir,
            want_freshness,
        }
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
        let Some((document, signatures)) = self.read_pair(FILES).await? else {
            return Ok(Polled::Empty);
        };
        let freshness = match self.want_freshness {
            WantFreshness(true) => self.read_freshness().await?,
            WantFreshness(false) => None,
        };
        Ok(Polled::Release(Fetched {
            document,
            signatures,
            freshness,
        }))
    }
}
