//! A loopback HTTP server over a directory, with a request log and hostile modes.
//!
//! It serves binary caches and release directories to the code under test. The request log
//! lets a test assert what was (and was not) fetched; [`Mode`] turns the server hostile for
//! security tests: errors, endless or stalled bodies, truncated or tampered bytes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Serve files as they are.
    Normal,
    /// Answer every request with this status and no body.
    Status(u16),
    /// Answer 200 with a body that never ends.
    Endless,
    /// Answer 500 with a body that never ends.
    EndlessError,
    /// Answer 200 with a git ref advertisement (smart HTTP) that never ends: valid pkt-lines,
    /// one ref after another.
    EndlessRefs,
    /// Answer 200 with that endless advertisement at one byte a second: never a stall, never
    /// an end.
    Trickle,
    /// Answer every request with a redirect to itself.
    RedirectLoop,
    /// Answer 200, send a few bytes, then nothing for as long as the client waits.
    Stall,
    /// Serve only the first half of each file.
    Truncate,
    /// Flip one byte in the middle of each file.
    Tamper,
}

struct Shared {
    root: PathBuf,
    /// While this file exists the server answers 503 to everything: the host is "cut off".
    cut_file: Mutex<Option<PathBuf>>,
    mode: Mutex<Mode>,
    log: Mutex<Vec<String>>,
    /// The addresses requests came from.
    peers: Mutex<Vec<std::net::IpAddr>>,
    /// How many requests were answered 304 Not Modified.
    not_modified: std::sync::atomic::AtomicUsize,
    /// Body bytes of the files served.
    served: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
    /// Whether PUT writes and DELETE removes files (an HTTP binary cache that takes uploads).
    uploads: AtomicBool,
}

/// A running server; stops when dropped.
pub struct HttpServer {
    shared: Arc<Shared>,
    server: Arc<tiny_http::Server>,
    ip: String,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves `root` on 127.0.0.1 at a free port.
    pub fn serve(root: &Path) -> Self {
        Self::serve_on(root, "127.0.0.1")
    }

    /// Serves `root` on `ip` (loopback, or an address of a test namespace's link).
    pub fn serve_on(root: &Path, ip: &str) -> Self {
        let server = Arc::new(
            tiny_http::Server::http(format!("{ip}:0"))
                .unwrap_or_else(|e| panic!("cannot bind {ip}: {e}")),
        );
        let port = server.server_addr().to_ip().unwrap().port();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            cut_file: Mutex::new(None),
            mode: Mutex::new(Mode::Normal),
            log: Mutex::new(Vec::new()),
            peers: Mutex::new(Vec::new()),
            not_modified: std::sync::atomic::AtomicUsize::new(0),
            served: std::sync::atomic::AtomicU64::new(0),
            stop: AtomicBool::new(false),
            uploads: AtomicBool::new(false),
        });
        let thread = {
            let (server, shared) = (server.clone(), shared.clone());
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(peer) = request.remote_addr() {
                        shared.peers.lock().unwrap().push(peer.ip());
                    }
                    let shared = shared.clone();
                    std::thread::spawn(move || respond(&shared, request));
                }
            })
        };
        Self {
            shared,
            server,
            ip: ip.to_owned(),
            port,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.port)
    }

    /// The addresses requests came from, in order.
    pub fn peers(&self) -> Vec<std::net::IpAddr> {
        self.shared.peers.lock().unwrap().clone()
    }

    /// Takes uploads from now on: PUT writes a file (whole), DELETE removes one.
    pub fn accept_uploads(&self) {
        self.shared.uploads.store(true, Ordering::Relaxed);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Answers 503 to everything while `path` exists (the fixture's "cut-network" creates it).
    pub fn cut_off_while(&self, path: &Path) {
        *self.shared.cut_file.lock().unwrap() = Some(path.to_path_buf());
    }

    /// Paths requested so far, in order (e.g. `/release.json`, `/nar/…`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Body bytes of the files served so far (normal mode).
    pub fn bytes_served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// How many requests were answered 304 Not Modified (files carry an ETag in normal mode).
    pub fn not_modified(&self) -> usize {
        self.shared.not_modified.load(Ordering::Relaxed)
    }

    /// Requests whose path contains `needle`.
    pub fn requests_matching(&self, needle: &str) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|p| p.contains(needle))
            .collect()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A body that never ends.
struct Endless;

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        buf.fill(b'x');
        Ok(buf.len())
    }
}

/// A smart-HTTP ref advertisement that never ends.
struct EndlessRefs {
    pending: Vec<u8>,
    next: u64,
}

impl Read for EndlessRefs {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pending.len() < buf.len() {
            let line = if self.next == 0 {
                "# service=git-upload-pack\n".to_owned()
            } else {
                format!("{:040x} refs/heads/branch-{}\n", self.next, self.next)
            };
            self.pending
                .extend(format!("{:04x}{line}", line.len() + 4).into_bytes());
            if self.next == 0 {
                self.pending.extend(b"0000");
            }
            self.next += 1;
        }
        let n = buf.len();
        buf.copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

/// A body that sends one byte a second until the server stops (at most five minutes).
struct Trickle {
    refs: EndlessRefs,
    shared: Arc<Shared>,
    sent: u32,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() || self.sent >= 300 || self.shared.stop.load(Ordering::Relaxed) {
            return Ok(0);
        }
        if self.sent > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        self.sent += 1;
        self.refs.read(&mut buf[..1])
    }
}

/// A body that sends a few bytes, then stalls until the server stops.
struct Stalled {
    sent: bool,
    shared: Arc<Shared>,
}

impl Read for Stalled {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.sent {
            self.sent = true;
            buf[0] = b'{';
            return Ok(1);
        }
        // Bounded: give up after five minutes even if nobody stops the server.
        for _ in 0..3000 {
            if self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(0)
    }
}

fn respond(shared: &Arc<Shared>, mut request: tiny_http::Request) {
    let path = request.url().split('?').next().unwrap_or("/").to_owned();
    let method = request.method().clone();
    shared.log.lock().unwrap().push(match method {
        tiny_http::Method::Get => path.clone(),
        _ => format!("{method} {path}"),
    });
    if matches!(method, tiny_http::Method::Put | tiny_http::Method::Delete) {
        let relative = path.trim_start_matches('/');
        let file = shared.root.join(relative);
        let status = if !shared.uploads.load(Ordering::Relaxed) {
            405
        } else if relative.is_empty() || relative.split('/').any(|part| part == "..") {
            400
        } else if method == tiny_http::Method::Delete {
            match std::fs::remove_file(&file) {
                Ok(()) => 204,
                Err(_) => 404,
            }
        } else {
            let mut body = Vec::new();
            let written = request.as_reader().read_to_end(&mut body).and_then(|_| {
                std::fs::create_dir_all(file.parent().unwrap())?;
                // Whole or not at all, as a real server would.
                let temp = file.with_extension("upload");
                std::fs::write(&temp, &body)?;
                std::fs::rename(&temp, &file)
            });
            if written.is_ok() {
                201
            } else {
                500
            }
        };
        let _ = request.respond(tiny_http::Response::empty(status));
        return;
    }
    let mut mode = shared.mode.lock().unwrap().clone();
    if shared
        .cut_file
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|f| f.exists())
    {
        mode = Mode::Status(503);
    }
    let result = match mode {
        Mode::Status(code) => request.respond(tiny_http::Response::empty(code)),
        Mode::EndlessError => request.respond(tiny_http::Response::new(
            500.into(),
            Vec::new(),
            Endless,
            None,
            None,
        )),
        Mode::Endless => request.respond(tiny_http::Response::new(
            200.into(),
            Vec::new(),
            Endless,
            None,
            None,
        )),
        Mode::EndlessRefs => request.respond(tiny_http::Response::new(
            200.into(),
            vec![tiny_http::Header::from_bytes(
                "Content-Type",
                "application/x-git-upload-pack-advertisement",
            )
            .unwrap()],
            EndlessRefs {
                pending: Vec::new(),
                next: 0,
            },
            None,
            None,
        )),
        Mode::Trickle => request.respond(tiny_http::Response::new(
            200.into(),
            Vec::new(),
            Trickle {
                refs: EndlessRefs {
                    pending: Vec::new(),
                    next: 0,
                },
                shared: shared.clone(),
                sent: 0,
            },
            None,
            None,
        )),
        Mode::RedirectLoop => {
            let location = request.url().to_owned();
            let header = tiny_http::Header::from_bytes("Location", location).unwrap();
            request.respond(tiny_http::Response::empty(302).with_header(header))
        }
        Mode::Stall => request.respond(tiny_http::Response::new(
            200.into(),
            Vec::new(),
            Stalled {
                sent: false,
                shared: shared.clone(),
            },
            None,
            None,
        )),
        Mode::Normal | Mode::Truncate | Mode::Tamper => {
            let relative = path.trim_start_matches('/');
            if relative.split('/').any(|part| part == "..") {
                request.respond(tiny_http::Response::empty(400))
            } else {
                match std::fs::read(shared.root.join(relative)) {
                    Ok(bytes) if mode == Mode::Normal => {
                        use std::hash::{Hash as _, Hasher as _};
                        let mut hasher = std::collections::hash_map::DefaultHasher::new();
                        bytes.hash(&mut hasher);
                        let etag = format!("\"{:016x}\"", hasher.finish());
                        let matches = request
                            .headers()
                            .iter()
                            .any(|h| h.field.equiv("If-None-Match") && h.value.as_str() == etag);
                        if matches {
                            shared.not_modified.fetch_add(1, Ordering::Relaxed);
                            request.respond(tiny_http::Response::empty(304))
                        } else {
                            shared
                                .served
                                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            let header = tiny_http::Header::from_bytes("ETag", etag).unwrap();
                            request
                                .respond(tiny_http::Response::from_data(bytes).with_header(header))
                        }
                    }
                    Ok(mut bytes) => {
                        if mode == Mode::Truncate {
                            bytes.truncate(bytes.len() / 2);
                        } else if mode == Mode::Tamper && !bytes.is_empty() {
                            let middle = bytes.len() / 2;
                            bytes[middle] ^= 0x01;
                        }
                        request.respond(tiny_http::Response::from_data(bytes))
                    }
                    Err(_) => request.respond(tiny_http::Response::empty(404)),
                }
            }
        }
    };
    // The client may hang up first (that is what several tests do): nothing to report.
    let _ = result;
}

/// Files of a directory over HTTPS (Python's http.server behind `ssl`), with a certificate and
/// key given in PEM; requests are logged to a file.
pub struct TlsFileServer {
    _child: crate::KillOnDrop,
    pub port: u16,
    log: PathBuf,
}

impl TlsFileServer {
    pub fn serve(
        dir: &std::path::Path,
        cert_pem: &str,
        key_pem: &str,
        work: &std::path::Path,
    ) -> Self {
        std::fs::create_dir_all(work).unwrap();
        let (cert, key, log) = (
            work.join("cert.pem"),
            work.join("key.pem"),
            work.join("requests.log"),
        );
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let script = "import functools, http.server, ssl, sys\n\
            port, directory, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]\n\
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)\n\
            server = http.server.ThreadingHTTPServer(('127.0.0.1', port), handler)\n\
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
            context.load_cert_chain(cert, key)\n\
            server.socket = context.wrap_socket(server.socket, server_side=True)\n\
            server.serve_forever()\n";
        let port = crate::free_port();
        let child = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(port.to_string())
            .arg(dir)
            .arg(&cert)
            .arg(&key)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 (scripts/setup installs it)");
        let server = Self {
            _child: crate::KillOnDrop(child),
            port,
            log,
        };
        crate::wait_for_port(port);
        server
    }

    /// The request lines the server answered (`GET /release.json`…).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET ") || l.contains("\"HEAD "))
            .map(str::to_owned)
            .collect()
    }
}

/// TLS in front of any loopback TCP server (Python's `ssl`): terminates TLS with the given
/// certificate and key and relays the bytes to `127.0.0.1:<backend>`, so the smart git server,
/// the S3 server and the collector can be reached over HTTPS behind a private CA. A connection
/// whose handshake fails is never relayed; the log has one line per connection (`forwarded` or
/// `refused <why>`).
pub struct TlsProxy {
    _child: crate::KillOnDrop,
    pub port: u16,
    log: PathBuf,
}

impl TlsProxy {
    pub fn start(backend: u16, cert_pem: &str, key_pem: &str, work: &Path) -> Self {
        std::fs::create_dir_all(work).unwrap();
        let (cert, key, log) = (
            work.join("cert.pem"),
            work.join("key.pem"),
            work.join("connections.log"),
        );
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        std::fs::write(&log, "").unwrap();
        let script = r#"
import socket, ssl, sys, threading
port, backend, cert, key, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
lock = threading.Lock()
def note(line):
    with lock, open(log, 'a') as f:
        f.write(line + '\n')
def relay(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    for s in (source, sink):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def handle(client):
    try:
        secure = context.wrap_socket(client, server_side=True)
    except (OSError, ssl.SSLError) as e:
        note('refused ' + str(e).replace('\n', ' '))
        client.close()
        return
    note('forwarded')
    upstream = socket.create_connection(('127.0.0.1', backend))
    threading.Thread(target=relay, args=(secure, upstream), daemon=True).start()
    relay(upstream, secure)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(('127.0.0.1', port))
server.listen(64)
while True:
    client, _ = server.accept()
    threading.Thread(target=handle, args=(client,), daemon=True).start()
"#;
        let port = crate::free_port();
        let child = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(port.to_string())
            .arg(backend.to_string())
            .arg(&cert)
            .arg(&key)
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("python3 (scripts/setup installs it)");
        let proxy = Self {
            _child: crate::KillOnDrop(child),
            port,
            log,
        };
        crate::wait_for_port(port);
        proxy
    }

    /// How many connections were relayed to the backend (their handshake succeeded).
    pub fn forwarded(&self) -> usize {
        self.connections()
            .iter()
            .filter(|l| *l == "forwarded")
            .count()
    }

    /// One line per connection: `forwarded` or `refused <why>`.
    pub fn connections(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
