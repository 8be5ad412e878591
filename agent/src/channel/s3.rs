//! A binary cache in an S3(-compatible) bucket as the channel (`cache+s3://<bucket>?…`): the
//! release's files are objects under `fleet/`, read with signed requests through the
//! `object_store` crate (credentials from the usual AWS sources: `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`, web identity, the instance's metadata service).
//!
//! Like an HTTP channel, an idle poll is one conditional GET of `release.json` (If-None-Match
//! with the ETag last seen), answered `304 Not Modified`; the signatures come only with a
//! changed document.

use super::{
    ChannelError, Fetched, FetchedFreshness, FreshnessPolled, Polled, WantFreshness,
    CONNECT_TIMEOUT, FILES, FRESHNESS_FILES, STALL_TIMEOUT,
};
use crate::config::{S3Location, CACHE_FOLDER};
use futures_util::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, GetOptions, ObjectStore as _, RetryConfig};
use std::path::Path;
use std::time::Duration;

pub struct S3Channel {
    store: AmazonS3,
    /// `s3://<bucket>/fleet`, for messages.
    name: String,
    want_freshness: WantFreshness,
    /// The ETag of the document last fetched.
    etag: Option<String>,
    /// The ETag of the freshness statement last fetched.
    freshness_etag: Option<String>,
}

/// What a poll remembers (the two ETags), to be put back with [`S3Channel::restore`].
pub type Memory = (Option<String>, Option<String>);

/// An S3 client for `location` with the TLS configuration of the other HTTPS clients (the
/// system's store and `ca_file`: [`crate::tls::client_config`]) that retries at most once
/// within `timeout`: the caller's backoff does the rest. `fleet-sign` publishes through the
/// same client.
pub fn store(
    location: &S3Location,
    tls: rustls::ClientConfig,
    timeout: Duration,
) -> Result<AmazonS3, String> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&location.bucket)
        .with_region(location.region.as_deref().unwrap_or("us-east-1"))
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(timeout),
        )
        .with_retry(RetryConfig {
            max_retries: 1,
            retry_timeout: timeout,
            ..RetryConfig::default()
        })
        .with_http_connector(Connector { tls, timeout });
    if let Some(endpoint) = &location.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up the S3 client for {}: {e}", location.bucket))
}

/// Hands `object_store` a reqwest client with the given TLS configuration and timeouts.
#[derive(Debug)]
pub struct Connector {
    pub tls: rustls::ClientConfig,
    pub timeout: Duration,
}

impl object_store::client::HttpConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<object_store::client::HttpClient> {
        reqwest::Client::builder()
            .use_preconfigured_tls(self.tls.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT.min(self.timeout))
            .timeout(self.timeout)
            .user_agent(concat!("fleet-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map(object_store::client::HttpClient::new)
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })
    }
}

/// The object key of a file of the channel.
pub fn key(name: &str) -> ObjectPath {
    ObjectPath::from(format!("{CACHE_FOLDER}/{name}"))
}

impl S3Channel {
    pub fn new(
        location: &S3Location,
        ca_file: Option<&Path>,
        timeout: Duration,
        want_freshness: WantFreshness,
    ) -> Result<Self, ChannelError> {
        Ok(Self {
            store: crate::tls::client_config(ca_file)
                .and_then(|tls| store(location, tls, timeout))
                .map_err(ChannelError::Http)?,
            name: format!("s3://{}/{CACHE_FOLDER}", location.bucket),
            want_freshness,
            etag: None,
            freshness_etag: None,
        })
    }

    pub fn forget(&mut self) {
        self.etag = None;
        self.freshness_etag = None;
    }

    pub fn memory(&self) -> Memory {
        (self.etag.clone(), self.freshness_etag.clone())
    }

    pub fn restore(&mut self, (etag, freshness): Memory) {
        self.etag = etag;
        self.freshness_etag = freshness;
    }

    /// GETs `name`, capped; with `etag`, `Ok(None)` means unchanged (304). Inside, `None`:
    /// the object does not exist.
    async fn get(
        &self,
        name: &str,
        limit: usize,
        etag: Option<&str>,
    ) -> Result<Option<Option<(Vec<u8>, Option<String>)>>, ChannelError> {
        let what = format!("{}/{name}", self.name);
        let options = GetOptions {
            if_none_match: etag.map(str::to_owned),
            ..GetOptions::default()
        };
        let result = match self.store.get_opts(&key(name), options).await {
            Ok(result) => result,
            Err(object_store::Error::NotModified { .. }) => return Ok(None),
            Err(object_store::Error::NotFound { .. }) => return Ok(Some(None)),
            Err(e) => return Err(error(&what, e)),
        };
        if result.meta.size > limit as u64 {
            return Err(ChannelError::TooLarge { what, limit });
        }
        let etag = result.meta.e_tag.clone();
        let mut stream = result.into_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| error(&what, e))?;
            if bytes.len() + chunk.len() > limit {
                return Err(ChannelError::TooLarge { what, limit });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(Some((bytes, etag))))
    }

    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        let [(document, document_limit), (signatures, signatures_limit)] = FILES;
        let (document, etag) = match self
            .get(document, document_limit, self.etag.as_deref())
            .await?
        {
            None => return Ok(Polled::Unchanged),
            Some(None) => return Ok(Polled::Empty),
            Some(Some(found)) => found,
        };
        let signatures = self
            .fetch_file(signatures, signatures_limit)
            .await?
            .unwrap_or_default();
        let freshness = match self.want_freshness {
            WantFreshness(true) => match self.poll_freshness_with(None).await? {
                FreshnessPolled::Statement(statement) => statement,
                FreshnessPolled::Unchanged => None,
            },
            WantFreshness(false) => None,
        };
        self.etag = etag;
        Ok(Polled::Release(Fetched {
            document,
            signatures,
            freshness,
        }))
    }

    /// One object below `fleet/`, capped; `None` when it does not exist.
    pub async fn fetch_file(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, ChannelError> {
        Ok(self
            .get(path, limit, None)
            .await?
            .flatten()
            .map(|(bytes, _)| bytes))
    }

    /// The freshness statement, asked for with the ETag of the last one fetched.
    pub async fn poll_freshness(&mut self) -> Result<FreshnessPolled, ChannelError> {
        let etag = self.freshness_etag.clone();
        self.poll_freshness_with(etag).await
    }

    async fn poll_freshness_with(
        &mut self,
        etag: Option<String>,
    ) -> Result<FreshnessPolled, ChannelError> {
        let [(statement, statement_limit), (signatures, signatures_limit)] = FRESHNESS_FILES;
        Ok(
            match self
                .get(statement, statement_limit, etag.as_deref())
                .await?
            {
                None => FreshnessPolled::Unchanged,
                Some(None) => {
                    self.freshness_etag = None;
                    FreshnessPolled::Statement(None)
                }
                Some(Some((statement, etag))) => {
                    let signatures = self
                        .fetch_file(signatures, signatures_limit)
                        .await?
                        .unwrap_or_default();
                    self.freshness_etag = etag;
                    FreshnessPolled::Statement(Some(FetchedFreshness {
                        statement,
                        signatures,
                    }))
                }
            },
        )
    }
}

/// A failed request as a channel error, with the reason code an operator can act on.
fn error(what: &str, e: object_store::Error) -> ChannelError {
    let text = crate::process::error_chain(&e);
    match &e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => ChannelError::Credentials(format!(
            "{what}: access refused: {text} (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )),
        _ if crate::tls::is_certificate_error(&e) => ChannelError::Tls(format!(
            "{what}: the server's certificate is not trusted: {text} (the system's trust store \
             and ca_file)"
        )),
        _ => ChannelError::Http(format!("cannot fetch {what}: {text}")),
    }
}
