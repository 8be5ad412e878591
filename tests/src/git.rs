//! git remotes for tests: bare repositories, served over loopback by `git daemon`.

use crate::{free_port, run, wait_for_port, KillOnDrop};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Creates a bare repository at `path`.
pub fn bare_repo(path: &Path) -> PathBuf {
    let mut command = Command::new("git");
    command.args(["init", "--quiet", "--bare"]).arg(path);
    run(command).ok();
    path.to_path_buf()
}

/// `git daemon` serving every repository below a directory, pushes allowed.
pub struct GitDaemon {
    child: KillOnDrop,
    pub port: u16,
}

impl Drop for GitDaemon {
    /// `git daemon` forks a child per connection: the whole process group goes, not only the
    /// daemon (killing it alone left its children serving, or waiting as zombies).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.0.id())])
            .stderr(Stdio::null())
            .status();
    }
}

impl GitDaemon {
    pub fn serve(base: &Path) -> Self {
        let port = free_port();
        let child = Command::new("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start git daemon");
        let daemon = Self {
            child: KillOnDrop(child),
            port,
        };
        wait_for_port(port);
        daemon
    }

    /// The `git://` URL of a repository below the base directory.
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

/// Smart HTTP git, served by the real `git http-backend` (CGI) behind a loopback server.
pub struct GitHttpServer {
    server: std::sync::Arc<tiny_http::Server>,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GitHttpServer {
    /// Serves every repository below `base`; with `token`, requests must carry it as the
    /// basic-auth password.
    pub fn serve(base: &Path, token: Option<&str>) -> Self {
        use base64::Engine as _;
        let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (srv, log2, base) = (server.clone(), log.clone(), base.to_path_buf());
        let token = token.map(str::to_owned);
        let thread = std::thread::spawn(move || {
            for mut request in srv.incoming_requests() {
                let url = request.url().to_owned();
                log2.lock()
                    .unwrap()
                    .push(format!("{} {url}", request.method()));
                if let Some(token) = &token {
                    let authorized = request.headers().iter().any(|h| {
                        h.field.equiv("Authorization")
                            && h.value.as_str().strip_prefix("Basic ").is_some_and(|b| {
                                base64::engine::general_purpose::STANDARD
                                    .decode(b)
                                    .ok()
                                    .and_then(|d| String::from_utf8(d).ok())
                                    .is_some_and(|up| up.ends_with(&format!(":{token}")))
                            })
                    });
                    if !authorized {
                        // As a real forge answers: the challenge that makes git (curl) ask its
                        // credential helpers.
                        let challenge = tiny_http::Header::from_bytes(
                            "WWW-Authenticate",
                            "Basic realm=\"git\"",
                        )
                        .unwrap();
                        let _ =
                            request.respond(tiny_http::Response::empty(401).with_header(challenge));
                        continue;
                    }
                }
                let (path, query) = url.split_once('?').unwrap_or((&url, ""));
                let mut body = Vec::new();
                let _ = std::io::Read::read_to_end(request.as_reader(), &mut body);
                let header = |name: &'static str| {
                    request
                        .headers()
                        .iter()
                        .find(|h| h.field.equiv(name))
                        .map(|h| h.value.as_str().to_owned())
                        .unwrap_or_default()
                };
                let content_type = header("Content-Type");
                // What a web server in front of git http-backend does for protocol v2.
                let protocol = header("Git-Protocol");
                if !protocol.is_empty() {
                    log2.lock()
                        .unwrap()
                        .push(format!("Git-Protocol: {protocol}"));
                }
                let mut child = Command::new("git")
                    .arg("http-backend")
                    .env("GIT_PROJECT_ROOT", &base)
                    .env("GIT_HTTP_EXPORT_ALL", "1")
                    .env("PATH_INFO", path)
                    .env("QUERY_STRING", query)
                    .env("REQUEST_METHOD", request.method().as_str())
                    .env("CONTENT_TYPE", content_type)
                    .env("CONTENT_LENGTH", body.len().to_string())
                    .env("REMOTE_ADDR", "127.0.0.1")
                    .env("GIT_PROTOCOL", &protocol)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("git http-backend");
                let mut stdin = child.stdin.take().unwrap();
                let writer = std::thread::spawn(move || {
                    let _ = std::io::Write::write_all(&mut stdin, &body);
                });
                let output = child.wait_with_output().unwrap();
                let _ = writer.join();
                // A CGI response: headers, a blank line, the body.
                let text = output.stdout;
                let split = text
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| (i, 4))
                    .or_else(|| text.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
                let Some((at, gap)) = split else {
                    let _ = request.respond(tiny_http::Response::empty(500));
                    continue;
                };
                let mut status = 200;
                let mut headers = Vec::new();
                for line in String::from_utf8_lossy(&text[..at]).lines() {
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("Status") {
                            status = value.trim()[..3].parse().unwrap_or(500);
                        } else if let Ok(h) =
                            tiny_http::Header::from_bytes(name.trim(), value.trim())
                        {
                            headers.push(h);
                        }
                    }
                }
                let body = text[at + gap..].to_vec();
                let mut response = tiny_http::Response::from_data(body).with_status_code(status);
                for h in headers {
                    response.add_header(h);
                }
                let _ = request.respond(response);
            }
        });
        Self {
            server,
            port,
            log,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, repo: &str) -> String {
        format!("http://127.0.0.1:{}/{repo}", self.port)
    }

    /// "METHOD /path?query" of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A real OpenSSH server on loopback that lets one key in, for git+ssh channels.
pub struct SshServer {
    _child: KillOnDrop,
    pub port: u16,
    /// The client key that may log in.
    pub client_key: PathBuf,
    /// A known_hosts file with this server's host key.
    pub known_hosts: PathBuf,
}

impl SshServer {
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let keygen = |path: &Path| {
            let mut c = Command::new("ssh-keygen");
            c.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path);
            run(c).ok();
        };
        let host_key = dir.join("host_key");
        let client_key = dir.join("client_key");
        keygen(&host_key);
        keygen(&client_key);
        let authorized = dir.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized).unwrap();
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PidFile {}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
                host_key.display(),
                authorized.display(),
                dir.join("sshd.pid").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd (is openssh-server installed? scripts/setup installs it)");
        let server = Self {
            _child: KillOnDrop(child),
            port,
            known_hosts: dir.join("known_hosts"),
            client_key,
        };
        wait_for_port(port);
        let host_pub = std::fs::read_to_string(host_key.with_extension("pub")).unwrap();
        std::fs::write(
            &server.known_hosts,
            format!("[127.0.0.1]:{port} {host_pub}"),
        )
        .unwrap();
        server
    }

    /// Runs `command` (through the login shell) for every login of the client key, whatever
    /// the client asked for: a hostile git server. `None` restores git.
    pub fn force_command(&self, command: Option<&str>) {
        let key = std::fs::read_to_string(self.client_key.with_extension("pub")).unwrap();
        let line = match command {
            Some(command) => format!("command=\"{command}\" {key}"),
            None => key,
        };
        let authorized = self.client_key.parent().unwrap().join("authorized_keys");
        std::fs::write(authorized, line).unwrap();
    }

    /// The `ssh://` URL of a repository at an absolute path on this machine.
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, path.display())
    }
}

/// How a [`HostileGitDaemon`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonMode {
    /// Passes everything to and from the real daemon.
    Normal,
    /// A valid ref advertisement that never ends.
    EndlessRefs,
    /// Takes the request and sends nothing.
    Stall,
    /// The real advertisement and negotiation; then, once the client is done, a few bytes of
    /// the pack and nothing more.
    StallMidPack,
    /// The real advertisement and negotiation; then a valid pack (side band) of ever more
    /// objects, never ending.
    EndlessPack,
    /// The endless advertisement at one byte a second: never a stall, never an end.
    Trickle,
    /// A pkt-line announcing the largest length there is, followed by that much junk.
    HugePktLine,
    /// Bytes that are not pkt-lines at all.
    Garbage,
}

/// A `git://` server in front of a real `git daemon`, answering as its mode says. Each
/// connection is held at most a minute.
pub struct HostileGitDaemon {
    port: u16,
    mode: std::sync::Arc<std::sync::Mutex<DaemonMode>>,
}

impl HostileGitDaemon {
    pub fn in_front_of(daemon: &GitDaemon) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::Mutex::new(DaemonMode::Normal));
        let (upstream, shared) = (daemon.port, mode.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let mode = *shared.lock().unwrap();
                std::thread::spawn(move || serve_hostile(client, upstream, mode));
            }
        });
        Self { port, mode }
    }

    pub fn set_mode(&self, mode: DaemonMode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// The `git://` URL of a repository of the daemon behind.
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}", self.port)
    }
}

fn pkt_line(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:04x}", data.len() + 4).into_bytes();
    out.extend_from_slice(data);
    out
}

/// The endless advertisement: the first ref with capabilities, then a branch after another.
fn endless_refs() -> impl Iterator<Item = Vec<u8>> {
    (1u64..).map(|n| {
        if n == 1 {
            pkt_line(format!("{n:040x} HEAD\0side-band-64k shallow\n").as_bytes())
        } else {
            pkt_line(format!("{n:040x} refs/heads/branch-{n}\n").as_bytes())
        }
    })
}

/// A zlib stream of `data` in one stored (uncompressed) deflate block.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    assert!(data.len() <= 0xffff);
    let len = data.len() as u16;
    let mut out = vec![0x78, 0x01, 0x01];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// Pack entry `n`: a blob of about 60 KB, different from every other.
fn pack_blob(n: u64) -> Vec<u8> {
    let mut data = format!("blob {n}\n").into_bytes();
    data.resize(60_000, b'x');
    let size = data.len();
    // Type 3 (blob) and the size, four bits then seven at a time.
    let mut out = vec![0x80 | (3 << 4) | (size & 0x0f) as u8];
    let mut rest = size >> 4;
    while rest > 0 {
        let more = if rest >> 7 > 0 { 0x80 } else { 0 };
        out.push(more | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.extend(zlib_stored(&data));
    out
}

fn serve_hostile(client: std::net::TcpStream, upstream: u16, mode: DaemonMode) {
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::{AtomicBool, Ordering};
    let hold = || std::thread::sleep(std::time::Duration::from_secs(60));
    let _ = client.set_write_timeout(Some(std::time::Duration::from_secs(60)));
    let mut writer = client.try_clone().unwrap();
    let mut request = [0u8; 1024];
    let endless = |writer: &mut std::net::TcpStream, trickle: bool| {
        for line in endless_refs().take(10_000_000) {
            if trickle {
                for byte in line {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    if writer.write_all(&[byte]).is_err() {
                        return;
                    }
                }
            } else if writer.write_all(&line).is_err() {
                return;
            }
        }
    };
    match mode {
        DaemonMode::EndlessRefs | DaemonMode::Trickle => {
            let _ = (&client).read(&mut request);
            endless(&mut writer, mode == DaemonMode::Trickle);
        }
        DaemonMode::Stall => {
            let _ = (&client).read(&mut request);
            hold();
        }
        DaemonMode::HugePktLine => {
            let _ = (&client).read(&mut request);
            let mut junk = b"ffff".to_vec();
            junk.resize(0xffff, b'a');
            let _ = writer.write_all(&junk);
            hold();
        }
        DaemonMode::Garbage => {
            let _ = (&client).read(&mut request);
            let _ = writer.write_all(b"this is not git at all\n");
            hold();
        }
        DaemonMode::Normal | DaemonMode::StallMidPack | DaemonMode::EndlessPack => {
            let server = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
            let done = std::sync::Arc::new(AtomicBool::new(false));
            // Client to server, noting the end of the negotiation before passing it on.
            let (mut from_client, mut to_server, seen) = (
                client.try_clone().unwrap(),
                server.try_clone().unwrap(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = from_client.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if buf[..n].windows(9).any(|w| w == b"0009done\n") {
                        seen.store(true, Ordering::SeqCst);
                    }
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(std::net::Shutdown::Write);
            });
            // Server to client, until the client is done and the mode takes over.
            let mut from_server = server;
            let mut buf = [0u8; 8192];
            loop {
                let Ok(n) = from_server.read(&mut buf) else {
                    return;
                };
                if n == 0 {
                    return;
                }
                if mode != DaemonMode::Normal && done.load(Ordering::SeqCst) {
                    break;
                }
                if writer.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            match mode {
                DaemonMode::StallMidPack => {
                    let _ = writer.write_all(&pkt_line(b"NAK\n"));
                    let _ = writer.write_all(&pkt_line(b"\x01PACK\0\0\0\x02\0\0\0\x05"));
                    hold();
                }
                DaemonMode::EndlessPack => {
                    let _ = writer.write_all(&pkt_line(b"NAK\n"));
                    // A million objects announced; the cap must end it long before.
                    let mut header = b"\x01PACK\0\0\0\x02".to_vec();
                    header.extend_from_slice(&1_000_000u32.to_be_bytes());
                    let _ = writer.write_all(&pkt_line(&header));
                    for n in 0..1_000_000u64 {
                        for part in pack_blob(n).chunks(60_000) {
                            let mut band = vec![1u8];
                            band.extend_from_slice(part);
                            if writer.write_all(&pkt_line(&band)).is_err() {
                                return;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
