//! git transports without OpenSSL, registered with libgit2 in place of its own: smart HTTP(S)
//! over reqwest (rustls), and SSH through the system's `ssh` client.
//!
//! libgit2's built-in HTTPS and SSH transports need OpenSSL and libssh2; leaving them out keeps
//! the agent's idle RSS small and its build static-friendly (docs/performance.md). Only fetching
//! is supported: the agent never pushes.
//!
//! - HTTP(S): the stateless smart protocol. `GET <url>/info/refs?service=git-upload-pack`, then
//!   `POST <url>/git-upload-pack` with what libgit2 wrote. `token_file` is sent as the HTTP
//!   basic-auth password (user from the URL, else `fleet`), which GitHub, GitLab, Gitea and
//!   Forgejo accept for access tokens. Bodies are capped at [`MAX_GIT_FETCH_BYTES`].
//! - SSH: `ssh -o BatchMode=yes [-i <ssh_key_file> -o IdentitiesOnly=yes] [-o
//!   UserKnownHostsFile=<ssh_known_hosts_file> -o StrictHostKeyChecking=yes] [-p <port>]
//!   <user@host> "git-upload-pack '<path>'"`, for `ssh://[user@]host[:port]/path` and
//!   `[user@]host:path`. The host key must be known: BatchMode never asks.
//! - `git://`: the git daemon protocol over a TCP connection of our own, in place of libgit2's,
//!   which keeps reading a ref advertisement for as long as the server sends one.
//!
//! Every answer is read as it streams and capped there: a ref advertisement at
//! [`MAX_REF_ADVERTISEMENT_BYTES`], a whole fetch at [`MAX_GIT_FETCH_BYTES`]. No answer may go
//! [`super::STALL_TIMEOUT`] without a byte, and a poll that gives up stops its fetch at the next
//! read. The stateful transports (SSH, `git://`) read their connection on a thread of its own,
//! so a read can wait with a deadline whatever the source.

use super::MAX_GIT_FETCH_BYTES;
use git2::transport::{Service, SmartSubtransport, SmartSubtransportStream, Transport};
use std::io::{Cursor, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// What the transports need from the channel's config; set before each fetch.
#[derive(Clone, Default)]
pub struct Settings {
    pub token: Option<String>,
    pub ssh_key: Option<PathBuf>,
    pub ssh_known_hosts: Option<PathBuf>,
    pub timeout: Duration,
    /// Certificates to trust for HTTPS besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The fetch's own runtime, to drive reqwest from the blocking fetch thread: not the
    /// agent's, which may shut down (the process ends) while a given-up fetch still reads.
    pub runtime: Option<Arc<tokio::runtime::Runtime>>,
    /// Set when the poll that started this fetch gave up: no further request is made, and
    /// libgit2 is told to stop.
    pub cancelled: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Settings {
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// How an answer over the cap is reported through libgit2, so the fetch can say `too_large`.
pub const TOO_LARGE: &str = "is over the size limit";
/// What was over which limit, from a transport's [`TOO_LARGE`] error as libgit2 passes it on:
/// the ref advertisement or the whole fetch.
pub fn too_large(message: &str) -> Option<(&'static str, usize)> {
    let (_, rest) = message.split_once(TOO_LARGE)?;
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    let limit = digits.parse().ok()?;
    let what = if limit == MAX_REF_ADVERTISEMENT_BYTES {
        "the git ref advertisement"
    } else {
        "the git fetch"
    };
    Some((what, limit))
}

/// How a refused server certificate is reported through libgit2, so the fetch can say
/// `tls_untrusted`.
pub const UNTRUSTED_CERTIFICATE: &str = "presented a certificate that is not trusted";

/// How a stalled answer is reported through libgit2, so the fetch can say `channel_timeout`.
pub const STALLED: &str = "stopped sending";

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

fn settings() -> Settings {
    SETTINGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Sets what the next fetches use.
pub fn configure(settings: Settings) {
    *SETTINGS.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
}

/// Registers the transports with libgit2, once per process.
pub fn register() -> Result<(), git2::Error> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let mut outcome = Ok(());
        for scheme in ["http", "https"] {
            // SAFETY: libgit2's transport registry is not thread-safe, which is why `register`
            // is unsafe. This runs once per process, guarded by the OnceLock, and every fetch
            // goes through `register` first, so no fetch can race with the registration.
            #[allow(unsafe_code)]
            let registered = unsafe {
                git2::transport::register(scheme, |remote| {
                    Transport::smart(remote, true, HttpTransport)
                })
            };
            outcome = outcome.and(registered);
        }
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let registered = unsafe {
            git2::transport::register("ssh", |remote| {
                Transport::smart(remote, false, Stateful::<SshConnection>::default())
            })
        };
        outcome = outcome.and(registered);
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let registered = unsafe {
            git2::transport::register("git", |remote| {
                Transport::smart(remote, false, Stateful::<DaemonConnection>::default())
            })
        };
        outcome = outcome.and(registered);
        // SAFETY: libgit2's global options are not thread-safe either: set here, once, before
        // any fetch (every fetch calls `register` first). They bound any socket libgit2 still
        // opens itself (none of the schemes above).
        let connect = super::CONNECT_TIMEOUT.as_millis() as i32;
        let stall = super::STALL_TIMEOUT.as_millis() as i32;
        #[allow(unsafe_code)]
        let timeouts = unsafe {
            git2::opts::set_server_connect_timeout_in_milliseconds(connect)
                .and_then(|()| git2::opts::set_server_timeout_in_milliseconds(stall))
        };
        outcome.and(timeouts).map_err(|e| e.message().to_owned())
    });
    result.clone().map_err(|e| git2::Error::from_str(&e))
}

fn error(message: impl Into<String>) -> std::io::Error {
    std::io::Error::other(message.into())
}

// ---- smart HTTP ----

/// The HTTP client for git requests.
fn http_client(settings: &Settings) -> Option<reqwest::Client> {
    let tls = match crate::tls::client_config(settings.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(e) => {
            log::error!("{e}");
            return None;
        }
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(super::CONNECT_TIMEOUT)
        .timeout(settings.timeout.max(Duration::from_secs(1)))
        .read_timeout(super::STALL_TIMEOUT.min(settings.timeout.max(Duration::from_secs(1))))
        .user_agent(concat!(
            "git/2.0 (fleet-agent/",
            env!("CARGO_PKG_VERSION"),
            ")"
        ))
        .build()
        .ok()
}

/// Adds the token as the basic-auth password (user from the URL, else `fleet`).
fn authorize(
    request: reqwest::RequestBuilder,
    url: &str,
    settings: &Settings,
) -> reqwest::RequestBuilder {
    match &settings.token {
        Some(token) => {
            let user = reqwest::Url::parse(url)
                .ok()
                .map(|u| u.username().to_owned())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "fleet".into());
            request.basic_auth(user, Some(token))
        }
        None => request,
    }
}

struct HttpTransport;

impl SmartSubtransport for HttpTransport {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        let url = url.trim_end_matches('/');
        let (method, url, content_type) = match action {
            Service::UploadPackLs => (
                reqwest::Method::GET,
                format!("{url}/info/refs?service=git-upload-pack"),
                None,
            ),
            Service::UploadPack => (
                reqwest::Method::POST,
                format!("{url}/git-upload-pack"),
                Some("application/x-git-upload-pack-request"),
            ),
            _ => {
                return Err(git2::Error::from_str(
                    "fleet-agent only fetches: pushing is not supported",
                ))
            }
        };
        Ok(Box::new(HttpStream {
            method,
            url,
            content_type,
            body: Vec::new(),
            response: None,
            chunk: Cursor::new(Vec::new()),
            received: 0,
            done: false,
        }))
    }

    fn close(&self) -> Result<(), git2::Error> {
        Ok(())
    }
}

struct HttpStream {
    method: reqwest::Method,
    url: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// The answer being read, once the request went out.
    response: Option<reqwest::Response>,
    /// The chunk being handed to libgit2.
    chunk: Cursor<Vec<u8>>,
    received: usize,
    done: bool,
}

/// The fetch's runtime to drive a request on, unless the poll gave up on this fetch.
fn runtime_for(settings: &Settings) -> std::io::Result<Arc<tokio::runtime::Runtime>> {
    if settings.is_cancelled() {
        return Err(error("the poll gave up on this fetch"));
    }
    settings
        .runtime
        .clone()
        .ok_or_else(|| error("git over HTTP needs the fetch's runtime"))
}

/// An HTTP failure of git's transport; a timeout says [`STALLED`], so the fetch reports
/// `channel_timeout`.
fn http_error(what: &str, url: &str, e: reqwest::Error) -> std::io::Error {
    if e.is_timeout() {
        error(format!("{url} {STALLED}: {e}"))
    } else if crate::tls::is_certificate_error(&e) {
        error(format!(
            "{url} {UNTRUSTED_CERTIFICATE}: {}",
            crate::process::error_chain(&e)
        ))
    } else {
        error(format!("{what} {url}: {e}"))
    }
}

/// The most a ref advertisement (`info/refs`) may take: thousands of refs fit in a fraction of
/// it, and libgit2 keeps every ref it parses in memory.
const MAX_REF_ADVERTISEMENT_BYTES: usize = 4 << 20;

impl HttpStream {
    /// The cap on this answer: the ref advertisement's, or a whole fetch's (the pack goes to
    /// disk through libgit2's indexer as it arrives).
    fn limit(&self) -> usize {
        if self.content_type.is_none() {
            MAX_REF_ADVERTISEMENT_BYTES
        } else {
            MAX_GIT_FETCH_BYTES
        }
    }

    /// Sends the request; the answer is then read chunk by chunk, as libgit2 asks for it.
    fn send(&mut self, settings: &Settings) -> std::io::Result<reqwest::Response> {
        let runtime = runtime_for(settings)?;
        let client = http_client(settings).ok_or_else(|| error("cannot set up the HTTP client"))?;
        let mut request = client.request(self.method.clone(), &self.url);
        if let Some(content_type) = self.content_type {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .header(
                    reqwest::header::ACCEPT,
                    "application/x-git-upload-pack-result",
                )
                .body(std::mem::take(&mut self.body));
        }
        let request = authorize(request, &self.url, settings);
        let url = self.url.clone();
        runtime.block_on(async move {
            let response = request
                .send()
                .await
                .map_err(|e| http_error("cannot fetch", &url, e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(error(format!("{url} answered HTTP {status}")));
            }
            Ok(response)
        })
    }

    /// The next chunk of the answer, or `None` at its end; capped, stall-bounded, cancellable.
    fn next_chunk(&mut self, settings: &Settings) -> std::io::Result<Option<Vec<u8>>> {
        let runtime = runtime_for(settings)?;
        let response = self.response.as_mut().expect("the request was sent");
        let url = &self.url;
        let chunk = runtime
            .block_on(response.chunk())
            .map_err(|e| http_error("cannot read", url, e))?;
        if let Some(chunk) = &chunk {
            self.received += chunk.len();
            if self.received > self.limit() {
                return Err(error(format!(
                    "the answer of {url} {TOO_LARGE} of {} bytes",
                    self.limit()
                )));
            }
        }
        Ok(chunk.map(|c| c.to_vec()))
    }
}

impl Read for HttpStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let settings = settings();
        if self.response.is_none() {
            self.response = Some(self.send(&settings)?);
        }
        loop {
            let n = self.chunk.read(buf)?;
            if n > 0 || buf.is_empty() || self.done {
                return Ok(n);
            }
            match self.next_chunk(&settings)? {
                Some(chunk) => self.chunk = Cursor::new(chunk),
                None => self.done = true,
            }
        }
    }
}

impl Write for HttpStream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.body.len() + data.len() > MAX_GIT_FETCH_BYTES {
            return Err(error("git request body too large"));
        }
        self.body.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---- stateful connections (SSH, git://) ----

/// The server's side of a stateful connection, read by a thread of its own into a small queue,
/// so that every read waits with a deadline: capped in bytes as it streams, a stall after
/// [`super::STALL_TIMEOUT`] without a byte, and a given-up poll noticed within a second.
struct Incoming {
    what: String,
    chunks: Mutex<Receiver<std::io::Result<Vec<u8>>>>,
    /// The chunk being handed to libgit2.
    pending: Mutex<Cursor<Vec<u8>>>,
    received: AtomicUsize,
    /// The cap on `received`: the ref advertisement's until the client first writes (its
    /// wants: the advertisement is over), a whole fetch's from then on. libgit2 reads both
    /// from the one stream of a stateful connection.
    limit: AtomicUsize,
}

impl Incoming {
    /// Reads `source` until it ends or the connection is dropped. At most a few chunks wait
    /// in the queue: a fast server is held back by the reader, not buffered.
    fn spawn(mut source: impl Read + Send + 'static, what: &str) -> Self {
        let (sender, chunks) = mpsc::sync_channel(4);
        std::thread::spawn(move || loop {
            let mut chunk = vec![0u8; 64 << 10];
            let chunk = match source.read(&mut chunk) {
                Ok(n) => {
                    chunk.truncate(n);
                    Ok(chunk)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let last = !matches!(&chunk, Ok(c) if !c.is_empty());
            if sender.send(chunk).is_err() || last {
                break;
            }
        });
        Self {
            what: what.to_owned(),
            chunks: Mutex::new(chunks),
            pending: Mutex::new(Cursor::new(Vec::new())),
            received: AtomicUsize::new(0),
            limit: AtomicUsize::new(MAX_REF_ADVERTISEMENT_BYTES),
        }
    }

    /// The client has written: what follows is the negotiation and the pack.
    fn advertisement_over(&self) {
        self.limit.store(MAX_GIT_FETCH_BYTES, Ordering::Relaxed);
    }

    /// Reads into `buf`, failing once the connection has received more than its limit in all;
    /// `Ok(0)` at the end of the answer.
    fn read(&self, buf: &mut [u8], settings: &Settings) -> std::io::Result<usize> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let mut waited = Duration::ZERO;
        loop {
            let n = pending.read(buf)?;
            if n > 0 || buf.is_empty() {
                let received = self.received.fetch_add(n, Ordering::Relaxed) + n;
                let limit = self.limit.load(Ordering::Relaxed);
                if received > limit {
                    return Err(error(format!(
                        "the answer of {} {TOO_LARGE} of {limit} bytes",
                        self.what
                    )));
                }
                return Ok(n);
            }
            if settings.is_cancelled() {
                return Err(error("the poll gave up on this fetch"));
            }
            let step = Duration::from_secs(1);
            match chunks.recv_timeout(step) {
                Ok(Ok(chunk)) if chunk.is_empty() => return Ok(0),
                Ok(Ok(chunk)) => *pending = Cursor::new(chunk),
                Ok(Err(e)) => return Err(e),
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => {
                    waited += step;
                    if waited >= super::STALL_TIMEOUT {
                        return Err(error(format!(
                            "{} {STALLED} for {}",
                            self.what,
                            humantime::format_duration(waited)
                        )));
                    }
                }
            }
        }
    }
}

/// A connection of a stateful protocol (SSH, `git://`): opened for the ref advertisement, then
/// serving the negotiation and the pack too.
trait Connection: Send + Sync + Sized + 'static {
    fn connect(url: &str) -> Result<Arc<Self>, git2::Error>;
    fn stream(self: Arc<Self>) -> Box<dyn SmartSubtransportStream>;
    /// Ends the connection (and with it the thread reading it).
    fn close(&self);
}

/// The transport of a stateful protocol: one connection per fetch, for both of its steps.
struct Stateful<C> {
    connection: Mutex<Option<Arc<C>>>,
}

impl<C> Default for Stateful<C> {
    fn default() -> Self {
        Self {
            connection: Mutex::new(None),
        }
    }
}

impl<C: Connection> SmartSubtransport for Stateful<C> {
    fn action(
        &self,
        url: &str,
        action: Service,
    ) -> Result<Box<dyn SmartSubtransportStream>, git2::Error> {
        if !matches!(action, Service::UploadPackLs | Service::UploadPack) {
            return Err(git2::Error::from_str(
                "fleet-agent only fetches: pushing is not supported",
            ));
        }
        let mut slot = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        let connection = match (action, slot.as_ref()) {
            (Service::UploadPack, Some(connection)) => connection.clone(),
            _ => {
                let connection = C::connect(url)?;
                *slot = Some(connection.clone());
                connection
            }
        };
        Ok(connection.stream())
    }

    fn close(&self) -> Result<(), git2::Error> {
        if let Some(connection) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            connection.close();
        }
        Ok(())
    }
}

// ---- git:// ----

/// One TCP connection to a git daemon.
struct DaemonConnection {
    socket: std::net::TcpStream,
    incoming: Incoming,
}

/// `(host:port, path)` of `git://host[:port]/path`.
fn parse_daemon_url(url: &str) -> Option<(String, String)> {
    let rest = url
        .strip_prefix("git://")
        .or_else(|| url.strip_prefix("git+git://"))?;
    let (authority, path) = rest.split_once('/')?;
    if authority.is_empty() || path.is_empty() {
        return None;
    }
    Some((authority.to_owned(), format!("/{path}")))
}

impl Connection for DaemonConnection {
    fn connect(url: &str) -> Result<Arc<Self>, git2::Error> {
        use std::net::ToSocketAddrs as _;
        let (authority, path) = parse_daemon_url(url)
            .ok_or_else(|| git2::Error::from_str(&format!("'{url}' is not a git:// URL")))?;
        let address =
            if authority.starts_with('[') && authority.ends_with(']') || !authority.contains(':') {
                format!("{authority}:9418")
            } else {
                authority.clone()
            };
        let addresses = address
            .to_socket_addrs()
            .map_err(|e| git2::Error::from_str(&format!("cannot resolve {address}: {e}")))?;
        let mut last = None;
        let mut socket = None;
        for address in addresses {
            match std::net::TcpStream::connect_timeout(&address, super::CONNECT_TIMEOUT) {
                Ok(s) => {
                    socket = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let socket = socket.ok_or_else(|| {
            git2::Error::from_str(&format!(
                "cannot connect to {address}: {}",
                last.map_or("no address".into(), |e| e.to_string())
            ))
        })?;
        let io = |e: std::io::Error| git2::Error::from_str(&format!("{address}: {e}"));
        socket
            .set_write_timeout(Some(super::STALL_TIMEOUT))
            .map_err(io)?;
        // The daemon's request: which service, which repository, for which host.
        let hello = format!("git-upload-pack {path}\0host={authority}\0");
        let mut request = format!("{:04x}", hello.len() + 4).into_bytes();
        request.extend_from_slice(hello.as_bytes());
        (&socket).write_all(&request).map_err(io)?;
        let reader = socket.try_clone().map_err(io)?;
        Ok(Arc::new(DaemonConnection {
            socket,
            incoming: Incoming::spawn(reader, url),
        }))
    }

    fn stream(self: Arc<Self>) -> Box<dyn SmartSubtransportStream> {
        Box::new(DaemonStream { connection: self })
    }

    fn close(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

struct DaemonStream {
    connection: Arc<DaemonConnection>,
}

impl Read for DaemonStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.connection.incoming.read(buf, &settings())
    }
}

impl Write for DaemonStream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if settings().is_cancelled() {
            return Err(error("the poll gave up on this fetch"));
        }
        self.connection.incoming.advertisement_over();
        (&self.connection.socket).write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&self.connection.socket).flush()
    }
}

impl Drop for DaemonConnection {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

// ---- SSH ----

/// One `ssh` child running `git-upload-pack` on the server.
struct SshConnection {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
    stdout: Incoming,
    stderr: Arc<Mutex<Vec<u8>>>,
}

/// `(destination, port, path)` of `ssh://[user@]host[:port]/path` or `[user@]host:path`.
pub fn parse_ssh_url(url: &str) -> Option<(String, Option<u16>, String)> {
    if let Some(rest) = url
        .strip_prefix("ssh://")
        .or_else(|| url.strip_prefix("git+ssh://"))
    {
        let (authority, path) = rest.split_once('/')?;
        let (destination, port) = match authority.rsplit_once(':') {
            Some((destination, port))
                if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                (destination.to_owned(), Some(port.parse().ok()?))
            }
            _ => (authority.to_owned(), None),
        };
        let path = format!("/{path}");
        // "ssh://host/~user/repo" means a path relative to the home directory.
        let path = path
            .strip_prefix("/~")
            .map_or(path.clone(), |p| format!("~{p}"));
        return (!destination.is_empty()).then_some((destination, port, path));
    }
    let (destination, path) = url.split_once(':')?;
    if destination.is_empty() || destination.contains('/') || path.is_empty() {
        return None;
    }
    Some((destination.to_owned(), None, path.to_owned()))
}

/// Quotes a path for the remote shell the way git does.
fn shell_quote(path: &str) -> String {
    format!("'{}'", path.replace('\'', r"'\''"))
}

impl Connection for SshConnection {
    fn connect(url: &str) -> Result<Arc<Self>, git2::Error> {
        let (destination, port, path) = parse_ssh_url(url)
            .ok_or_else(|| git2::Error::from_str(&format!("'{url}' is not an ssh URL")))?;
        if destination.starts_with('-') {
            return Err(git2::Error::from_str(&format!(
                "refusing ssh destination '{destination}'"
            )));
        }
        let settings = settings();
        let mut command = Command::new("ssh");
        command.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        if let Some(key) = &settings.ssh_key {
            command
                .arg("-i")
                .arg(key)
                .args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(known_hosts) = &settings.ssh_known_hosts {
            command
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
                .args(["-o", "StrictHostKeyChecking=yes"]);
        }
        if let Some(port) = port {
            command.arg("-p").arg(port.to_string());
        }
        command
            .arg("--")
            .arg(&destination)
            .arg(format!("git-upload-pack {}", shell_quote(&path)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| {
            git2::Error::from_str(&format!("cannot run ssh: {e} (is OpenSSH installed?)"))
        })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr_pipe = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
                if sink.len() < 16 << 10 {
                    sink.extend_from_slice(&buf[..n]);
                }
            }
        });
        Ok(Arc::new(SshConnection {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            stdout: Incoming::spawn(stdout, url),
            stderr,
        }))
    }

    fn stream(self: Arc<Self>) -> Box<dyn SmartSubtransportStream> {
        Box::new(SshStream { connection: self })
    }

    fn close(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

struct SshStream {
    connection: Arc<SshConnection>,
}

impl SshStream {
    fn failure(&self, e: std::io::Error) -> std::io::Error {
        // Give ssh a moment to explain itself (host key, permission) before reporting.
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self
            .connection
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&stderr);
        let text = text.trim();
        if text.is_empty() {
            e
        } else {
            error(format!("ssh: {}", text.replace('\n', " / ")))
        }
    }
}

impl Read for SshStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.connection.stdout.read(buf, &settings())?;
        if n == 0 && !buf.is_empty() {
            return Err(self.failure(error("ssh closed the connection")));
        }
        Ok(n)
    }
}

impl Write for SshStream {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.connection.stdout.advertisement_over();
        let result = self
            .connection
            .stdin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(data);
        result.map_err(|e| self.failure(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let result = self
            .connection
            .stdin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
        result.map_err(|e| self.failure(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ssh_url_forms() {
        let parse = |u| parse_ssh_url(u);
        assert_eq!(
            parse("ssh://git@git.example.org:2222/srv/fleet.git"),
            Some((
                "git@git.example.org".into(),
                Some(2222),
                "/srv/fleet.git".into()
            ))
        );
        assert_eq!(
            parse("ssh://git.example.org/~deploy/fleet.git"),
            Some(("git.example.org".into(), None, "~deploy/fleet.git".into()))
        );
        assert_eq!(
            parse("git@github.com:org/fleet.git"),
            Some(("git@github.com".into(), None, "org/fleet.git".into()))
        );
        assert_eq!(parse("ssh://:22/x"), None);
        assert_eq!(parse("/local/path"), None);
    }

    #[test]
    fn quotes_paths_like_git() {
        assert_eq!(shell_quote("/srv/it's.git"), r"'/srv/it'\''s.git'");
    }
}

// ---- protocol v2 ls-refs: the idle-poll shortcut ----

/// Encodes one pkt-line.
fn pkt(line: &str) -> Vec<u8> {
    let mut out = format!("{:04x}", line.len() + 4).into_bytes();
    out.extend_from_slice(line.as_bytes());
    out
}

/// The body of a protocol v2 `ls-refs` request for exactly one branch.
fn ls_refs_request(refname: &str) -> Vec<u8> {
    let mut body = pkt("command=ls-refs\n");
    body.extend_from_slice(b"0001");
    body.extend(pkt(&format!("ref-prefix refs/heads/{refname}\n")));
    body.extend_from_slice(b"0000");
    body
}

/// Reads pkt-lines up to a flush packet; `None` when the bytes are not pkt-lines.
fn parse_pkt_lines(mut bytes: &[u8]) -> Option<(Vec<String>, &[u8])> {
    let mut lines = Vec::new();
    loop {
        let len = usize::from_str_radix(std::str::from_utf8(bytes.get(..4)?).ok()?, 16).ok()?;
        if len == 0 {
            return Some((lines, &bytes[4..]));
        }
        if len < 4 {
            // A delimiter or response-end packet: not expected in an ls-refs answer.
            return None;
        }
        let line = std::str::from_utf8(bytes.get(4..len)?).ok()?;
        lines.push(line.trim_end_matches('\n').to_owned());
        bytes = &bytes[len..];
    }
}

/// The commit `refs/heads/<refname>` points at, from an ls-refs answer.
fn tip_from_ls_refs(lines: &[String], refname: &str) -> Option<String> {
    let wanted = format!("refs/heads/{refname}");
    lines.iter().find_map(|line| {
        let mut words = line.split(' ');
        let oid = words.next()?;
        (words.next()? == wanted && oid.len() >= 40).then(|| oid.to_owned())
    })
}

/// The most an `ls-refs` answer for one ref may take.
const MAX_LS_REFS_BYTES: usize = 64 << 10;

/// Asks the remote, with git protocol v2 `ls-refs` and a ref prefix, where one branch points:
/// a few hundred bytes whatever the number of refs the remote has. `None` when the remote or
/// its URL scheme does not support it (the caller then fetches with libgit2 as usual).
pub async fn remote_tip_v2(url: &str, refname: &str, settings: &Settings) -> Option<String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        let client = http_client(settings)?;
        let request = client
            .post(format!("{}/git-upload-pack", url.trim_end_matches('/')))
            .header("Git-Protocol", "version=2")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-git-upload-pack-request",
            )
            .header(
                reqwest::header::ACCEPT,
                "application/x-git-upload-pack-result",
            )
            .body(ls_refs_request(refname));
        let request = authorize(request, url, settings);
        let mut response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        // Capped while it streams: an endless answer costs at most the cap, not the memory
        // it would take to hold it all.
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.ok()? {
            if bytes.len() + chunk.len() > MAX_LS_REFS_BYTES {
                return None;
            }
            bytes.extend_from_slice(&chunk);
        }
        let (lines, _) = parse_pkt_lines(&bytes)?;
        return tip_from_ls_refs(&lines, refname);
    }
    if let Some(rest) = url.strip_prefix("git://") {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (authority, path) = rest.split_once('/')?;
        let work = async {
            let mut stream = tokio::net::TcpStream::connect(if authority.contains(':') {
                authority.to_owned()
            } else {
                format!("{authority}:9418")
            })
            .await
            .ok()?;
            // The git daemon request, asking for protocol v2 in its extra parameters.
            let mut hello = format!("git-upload-pack /{path}\0host={authority}\0").into_bytes();
            hello.extend_from_slice(b"\0version=2\0");
            let mut request = format!("{:04x}", hello.len() + 4).into_bytes();
            request.extend(hello);
            stream.write_all(&request).await.ok()?;
            // The v2 capability advertisement, up to its flush packet.
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            let rest = loop {
                let n = tokio::time::timeout(super::STALL_TIMEOUT, stream.read(&mut chunk))
                    .await
                    .ok()?
                    .ok()?;
                if n == 0 || buffer.len() > MAX_LS_REFS_BYTES {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
                if let Some((lines, rest)) = parse_pkt_lines(&buffer) {
                    if lines.first().map(String::as_str) != Some("version 2") {
                        return None;
                    }
                    break rest.to_vec();
                }
            };
            stream.write_all(&ls_refs_request(refname)).await.ok()?;
            let mut buffer = rest;
            loop {
                if let Some((lines, _)) = parse_pkt_lines(&buffer) {
                    return tip_from_ls_refs(&lines, refname);
                }
                let n = tokio::time::timeout(super::STALL_TIMEOUT, stream.read(&mut chunk))
                    .await
                    .ok()?
                    .ok()?;
                if n == 0 || buffer.len() > MAX_LS_REFS_BYTES {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
        };
        return tokio::time::timeout(settings.timeout, work)
            .await
            .ok()
            .flatten();
    }
    None
}

#[cfg(test)]
mod v2_tests {
    use super::*;

    #[test]
    fn encodes_an_ls_refs_request() {
        assert_eq!(
            String::from_utf8(ls_refs_request("fleet-release")).unwrap(),
            "0014command=ls-refs\n00010028ref-prefix refs/heads/fleet-release\n0000"
        );
    }

    #[test]
    fn reads_the_tip_from_an_answer() {
        let oid = "5b1c3e0f9a8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b";
        let mut answer = pkt(&format!("{oid} refs/heads/fleet-release\n"));
        answer.extend_from_slice(b"0000");
        let (lines, rest) = parse_pkt_lines(&answer).unwrap();
        assert!(rest.is_empty());
        assert_eq!(
            tip_from_ls_refs(&lines, "fleet-release").as_deref(),
            Some(oid)
        );
        assert_eq!(tip_from_ls_refs(&lines, "fleet"), None);
        assert_eq!(parse_pkt_lines(b"zz"), None);
        assert_eq!(parse_pkt_lines(b"0001"), None);
    }

    #[tokio::test]
    async fn an_endless_ls_refs_answer_is_cut_at_the_cap_while_it_streams() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-result\r\n\
                        Transfer-Encoding: chunked\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            // pkt-lines of refs, for ever (until the client hangs up).
            let line = pkt(&format!("{} refs/heads/x\n", "a".repeat(40)));
            let chunk = [
                format!("{:x}\r\n", line.len() * 64).into_bytes(),
                line.repeat(64),
                b"\r\n".to_vec(),
            ]
            .concat();
            while socket.write_all(&chunk).await.is_ok() {
                counter.fetch_add(chunk.len(), Ordering::Relaxed);
            }
        });
        let settings = Settings {
            token: None,
            ssh_key: None,
            ssh_known_hosts: None,
            timeout: Duration::from_secs(60),
            ca_file: None,
            runtime: None,
            cancelled: None,
        };
        let url = format!("http://{address}/fleet.git");
        let tip = tokio::time::timeout(
            Duration::from_secs(20),
            remote_tip_v2(&url, "fleet-release", &settings),
        )
        .await
        .expect("the answer is given up at its cap, not read to the channel timeout");
        assert_eq!(tip, None);
        // What the server got out before the client hung up: the cap plus socket buffers.
        let sent = sent.load(Ordering::Relaxed);
        assert!(sent < 16 << 20, "{sent} bytes");
    }
}
