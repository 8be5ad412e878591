//! A directory channel: a local path holding `release.json` and `release.json.sig` (tests,
//! air-gapped updates from a USB stick).

use super::{read_capped, ChannelError, Fetched, Polled, FILES};
use std::path::PathBuf;

pub struct DirChannel {
    dir: PathBuf,
}

impl DirChannel {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        let mut files = Vec::new();
        for (name, limit) in FILES {
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
                    return Ok(Polled::Empty);
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
        let signatures = files.pop().unwrap_or_default();
        let document = files.pop().unwrap_or_default();
        Ok(Polled::Release(Fetched {
            document,
            signatures,
        }))
    }
}
