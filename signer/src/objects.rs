//! A binary cache's object store as a channel to publish to: an S3(-compatible) bucket, or an
//! HTTP cache that accepts `PUT` (as Nix uploads to one), through the `object_store` crate.
//! The release's files are the objects under `fleet/`.

use anyhow::{Context as _, Result};
use fleet_agent::config::{S3Location, CACHE_FOLDER};
use futures_util::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};
use std::sync::Arc;
use std::time::Duration;

/// Longest one request may take.
const TIMEOUT: Duration = Duration::from_secs(120);
/// Requests in flight at once when writing or removing many objects (a format-2 release's
/// pieces).
const PARALLEL: usize = 16;

pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// The cache's URL, for messages.
    name: String,
    /// Whether the store can list objects (S3 can; a plain HTTP cache cannot, so the pieces of
    /// older format-2 releases stay there).
    lists: bool,
    runtime: tokio::runtime::Runtime,
}

impl Objects {
    pub fn s3(store_url: &str, location: &S3Location) -> Result<Self> {
        let store = fleet_agent::channel::s3::store(location, crate::config::tls()?, TIMEOUT)
            .map_err(anyhow::Error::msg)?;
        Self::new(Arc::new(store), store_url, true)
    }

    pub fn http(store_url: &str) -> Result<Self> {
        let store = object_store::http::HttpBuilder::new()
            .with_url(store_url)
            .with_http_connector(fleet_agent::channel::s3::Connector {
                tls: crate::config::tls()?,
                timeout: TIMEOUT,
            })
            .build()
            .with_context(|| format!("cannot set up the HTTP client for {store_url}"))?;
        Self::new(Arc::new(store), store_url, false)
    }

    fn new(store: Arc<dyn ObjectStore>, name: &str, lists: bool) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the I/O runtime")?;
        Ok(Self {
            store,
            name: name.to_owned(),
            lists,
            runtime,
        })
    }

    /// The folder of the cache holding the release, for messages.
    pub fn name(&self) -> String {
        format!("{}/{CACHE_FOLDER}", self.name)
    }

    fn key(name: &str) -> ObjectPath {
        ObjectPath::from(format!("{CACHE_FOLDER}/{name}"))
    }

    fn describe(&self, name: &str) -> String {
        format!("{}/{CACHE_FOLDER}/{name}", self.name)
    }

    /// One object, capped; `None` when it does not exist.
    pub fn read(&self, name: &str, limit: usize) -> Result<Option<Vec<u8>>> {
        let what = self.describe(name);
        self.runtime.block_on(async {
            let result = match self.store.get(&Self::key(name)).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("could not fetch {what}")),
            };
            if result.meta.size > limit as u64 {
                return Err(crate::channel::too_large(&what, limit));
            }
            let mut stream = result.into_stream();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                bytes.extend_from_slice(&chunk.with_context(|| format!("could not read {what}"))?);
                if bytes.len() > limit {
                    return Err(crate::channel::too_large(&what, limit));
                }
            }
            Ok(Some(bytes))
        })
    }

    /// Writes one object whole (an object store never shows a partial object).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let payload = PutPayload::from(bytes.to_vec());
        self.runtime
            .block_on(self.store.put(&Self::key(name), payload))
            .map(drop)
            .with_context(|| format!("could not upload {}", self.describe(name)))
    }

    /// Writes many objects, some at once.
    pub fn write_all(&self, files: &[(String, Vec<u8>)]) -> Result<()> {
        self.runtime.block_on(
            futures_util::stream::iter(files)
                .map(|(name, bytes)| async move {
                    self.store
                        .put(&Self::key(name), PutPayload::from(bytes.clone()))
                        .await
                        .with_context(|| format!("could not upload {}", self.describe(name)))
                })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<_>>(),
        )?;
        Ok(())
    }

    /// Removes one object; a missing one is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        match self.runtime.block_on(self.store.delete(&Self::key(name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("could not remove {}", self.describe(name))),
        }
    }

    /// The names of the folders right below `folder` (`hosts` → the serials with pieces);
    /// none where the store cannot list.
    pub fn folders(&self, folder: &str) -> Result<Vec<String>> {
        if !self.lists {
            return Ok(Vec::new());
        }
        let prefix = Self::key(folder);
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .with_context(|| format!("could not list {}", self.describe(folder)))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Removes every object below `folder`, some at once.
    pub fn remove_folder(&self, folder: &str) -> Result<()> {
        let prefix = Self::key(folder);
        self.runtime.block_on(async {
            let names: Vec<ObjectPath> = self
                .store
                .list(Some(&prefix))
                .map_ok(|meta| meta.location)
                .try_collect()
                .await
                .with_context(|| format!("could not list {}", self.describe(folder)))?;
            futures_util::stream::iter(names)
                .map(|name| async move {
                    match self.store.delete(&name).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(e).with_context(|| format!("could not remove {name}")),
                    }
                })
                .buffer_unordered(PARALLEL)
                .try_collect::<Vec<_>>()
                .await
                .map(drop)
        })
    }
}
