//! An HTTP channel: `<base>/release.json` and `<base>/release.json.sig` on any static host.
//!
//! The document is fetched with a conditional GET (If-None-Match / If-Modified-Since), so an
//! idle poll is one small request answered `304 Not Modified`; the signatures only when the
//! document changed. A freshness statement (when the host trusts freshness keys) comes with a
//! changed document, and otherwise only when the agent asks for it ([`HttpChannel::poll_freshness`],
//! a conditional GET of its own).

use super::{
    ChannelError, Fetched, FetchedFreshness, FreshnessPolled, Polled, WantFreshness,
    CONNECT_TIMEOUT, FILES, FRESHNESS_FILES, STALL_TIMEOUT,
};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::StatusCode;
use std::time::Duration;

pub struct HttpChannel {
    base: String,
    client: reqwest::Client,
    timeout: Duration,
    /// ETag and Last-Modified of the document last fetched.
    validators: Validators,
    want_freshness: WantFreshness,
    /// ETag and Last-Modified of the freshness statement last fetched.
    freshness_validators: Validators,
}

/// ETag and Last-Modified of the document last fetched, if any.
pub type Validators = Option<(Option<HeaderValue>, Option<HeaderValue>)>;

impl HttpChannel {
    pub fn new(
        base: String,
        token: Option<String>,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
        want_freshness: WantFreshness,
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
            want_freshness,
            freshness_validators: None,
        })
    }

    pub fn forget(&mut self) {
        self.validators = None;
        self.freshness_validators = None;
    }

    /// What a poll remembers (the validators of the document and of the freshness statement),
    /// to be put back with [`Self::restore`].
    pub fn memory(&self) -> (Validators, Validators) {
        (self.validators.clone(), self.freshness_validators.clone())
    }

    pub fn restore(&mut self, (validators, freshness): (Validators, Validators)) {
        self.validators = validators;
        self.freshness_validators = freshness;
    }

    /// GETs `name`; with `conditional` validators, `None` means unchanged (304).
    async fn get(
        &self,
        name: &str,
        limit: usize,
        conditional: Option<&Validators>,
    ) -> Result<Option<(reqwest::Response, String)>, ChannelError> {
        let url = format!("{}/{name}", self.base);
        let mut request = self.client.get(&url);
        if let Some(Some((etag, modified))) = conditional {
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
            StatusCode::NOT_MODIFIED if conditional.is_some() => Ok(None),
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

    /// Fetches a pair of files (document and signatures); `Unchanged` when the first answered
    /// 304 to `conditional`, `None` inside when it is missing. Returns the first's validators.
    async fn get_pair(
        &self,
        [(first, first_limit), (second, second_limit)]: [(&str, usize); 2],
        conditional: Option<&Validators>,
    ) -> Result<Option<Option<Pair>>, ChannelError> {
        let Some((response, url)) = self.get(first, first_limit, conditional).await? else {
            return Ok(None);
        };
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(Some(None));
        }
        let validators = Some((
            response.headers().get(header::ETAG).cloned(),
            response.headers().get(header::LAST_MODIFIED).cloned(),
        ));
        let first = body(response, first_limit, &url, self.timeout).await?;
        let second = match self.get(second, second_limit, None).await? {
            Some((response, _)) if response.status() == StatusCode::NOT_FOUND => Vec::new(),
            Some((response, url)) => body(response, second_limit, &url, self.timeout).await?,
            None => Vec::new(),
        };
        Ok(Some(Some(Pair {
            first,
            second,
            validators,
        })))
    }

    pub async fn poll(&mut self) -> Result<Polled, ChannelError> {
        let document = match self.get_pair(FILES, Some(&self.validators)).await? {
            None => return Ok(Polled::Unchanged),
            Some(None) => return Ok(Polled::Empty),
            Some(Some(pair)) => pair,
        };
        let freshness = match self.want_freshness {
            WantFreshness(true) => match self.poll_freshness_with(None).await? {
                FreshnessPolled::Statement(statement) => statement,
                FreshnessPolled::Unchanged => None,
            },
            WantFreshness(false) => None,
        };
        self.validators = document.validators;
        Ok(Polled::Release(Fetched {
            document: document.first,
            signatures: document.second,
            freshness,
        }))
    }

    /// One file below the base URL, capped; `None` when the server answers 404.
    pub async fn fetch_file(
        &self,
        path: &str,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, ChannelError> {
        match self.get(path, limit, None).await? {
            Some((response, _)) if response.status() == StatusCode::NOT_FOUND => Ok(None),
            Some((response, url)) => body(response, limit, &url, self.timeout).await.map(Some),
            None => Ok(None),
        }
    }

    /// The freshness statement, asked for with the validators of the last one fetched.
    pub async fn poll_freshness(&mut self) -> Result<FreshnessPolled, ChannelError> {
        let validators = self.freshness_validators.clone();
        self.poll_freshness_with(Some(&validators)).await
    }

    async fn poll_freshness_with(
        &mut self,
        conditional: Option<&Validators>,
    ) -> Result<FreshnessPolled, ChannelError> {
        Ok(match self.get_pair(FRESHNESS_FILES, conditional).await? {
            None => FreshnessPolled::Unchanged,
            Some(None) => {
                self.freshness_validators = None;
                FreshnessPolled::Statement(None)
            }
            Some(Some(pair)) => {
                self.freshness_validators = pair.validators;
                FreshnessPolled::Statement(Some(FetchedFreshness {
                    statement: pair.first,
                    signatures: pair.second,
                }))
            }
        })
    }
}

/// Two files fetched together, and the first one's validators.
struct Pair {
    first: Vec<u8>,
    second: Vec<u8>,
    validators: Validators,
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
