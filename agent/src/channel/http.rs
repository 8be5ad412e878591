//! An HTTP channel: `<base>/release.json` and `<base>/release.json.sig` on any static host.
//!
//! The document is fetched with a conditional GET (If-None-Match / If-Modified-Since), so an
//! idle poll is one small request answered `304 Not Modified`; the signatures only when the
//! document changed.

use super::{ChannelError, Fetched, Polled, CONNECT_TIMEOUT, FILES, STALL_TIMEOUT};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::StatusCode;
use std::time::Duration;

pub struct HttpChannel {
    base: String,
    client: reqwest::Client,
    timeout: Duration,
    /// ETag and Last-Modified of the document last fetched.
    validators: Validators,
}

/// ETag and Last-Modified of the document last fetched, if any.
pub type Validators = Option<(Option<HeaderValue>, Option<HeaderValue>)>;

impl HttpChannel {
    pub fn new(
        base: String,
        token: Option<String>,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, ChannelError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ChannelError::Credentials(
                    "the token file holds characters not allowed in HTTP".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let tls = crate::tls::client_config(ca_file).map_err(ChannelError::Http)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT.min(timeout))
            .timeout(timeout)
            .user_agent(concat!("fleet-agent/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| ChannelError::Http(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Self {
            base,
            client,
            timeout,
            validators: None,
        })
    }

    pub fn forget(&mut self) {
        self.validators = None;
    }

    /// What a poll remembers (the document's validators), to be put back with [`Self::restore`].
    pub fn memory(&self) -> Validators {
        self.validators.clone()
    }

    pub fn restore(&mut self, memory: Validators) {
        self.validators = memory;
    }

    async fn get(
        &self,
        name: &str,
        limit: usize,
        conditional: bool,
    ) -> Result<Option<(reqwest::Response, String)>, ChannelError> {
        let url = format!("{}/{name}", self.base);
        let mut request = self.client.get(&url);
        if let (true, Some((etag, modified))) = (conditional, &self.validators) {
            if let Some(etag) = etag {
                request = request.header(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(modified) = modified {
                request = request.header(header::IF_MODIFIED_SINCE, modified.clone());
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| http_error(&url, e, self.timeout))?;
        match response.status() {
            StatusCode::NOT_MODIFIED if conditional => Ok(None),
            status if status.is_success() => {
                if response.content_length().is_some_and(|n| n > limit as u64) {
                    return Err(ChannelError::TooLarge { what: url, limit });
                }
                Ok(Some((response, url)))
            }
            StatusCode::NOT_FOUND => Ok(Some((response, url))),
            status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                Err(ChannelError::Credentials(format!(
                    "{url} answered HTTP {status}: check token_file"
                )))
            }
            status => Err(ChannelError::Http(format!("{url} answered HTTP {status}"))),
        }
    }

    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        let (name, limit) = FILES[0];
        let Some((response, url)) = self.get(name, limit, true).await? else {
            return Ok(Polled::Unchanged);
        };
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(Polled::Empty);
        }
        let validators = (
            response.headers().get(header::ETAG).cloned(),
            response.headers().get(header::LAST_MODIFIED).cloned(),
        );
        let document = body(response, limit, &url, self.timeout).await?;
        let (name, limit) = FILES[1];
        let signatures = match self.get(name, limit, false).await? {
            Some((response, _)) if response.status() == StatusCode::NOT_FOUND => Vec::new(),
            Some((response, url)) => body(response, limit, &url, self.timeout).await?,
            None => Vec::new(),
        };
        self.validators = Some(validators);
        Ok(Polled::Release(Fetched {
            document,
            signatures,
        }))
    }
}

fn http_error(url: &str, error: reqwest::Error, after: Duration) -> ChannelError {
    if error.is_timeout() {
        ChannelError::TimedOut {
            what: url.to_owned(),
            after,
        }
    } else if crate::tls::is_certificate_error(&error) {
        ChannelError::Tls(format!(
            "{url}: the server's certificate is not trusted: {} (the system's trust store and \
             ca_file)",
            crate::process::error_chain(&error)
        ))
    } else {
        ChannelError::Http(format!(
            "cannot fetch {url}: {}",
            crate::process::error_chain(&error)
        ))
    }
}

/// Reads a body chunk by chunk, stopping as soon as it passes `limit`.
async fn body(
    mut response: reqwest::Response,
    limit: usize,
    url: &str,
    timeout: Duration,
) -> Result<Vec<u8>, ChannelError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| http_error(url, e, timeout))?
    {
        if bytes.len() + chunk.len() > limit {
            return Err(ChannelError::TooLarge {
                what: url.to_owned(),
                limit,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}
