//! git remotes for tests: bare repositories, served over loopback by `git daemon`.

use crate::{free_port, run, wait_for_port, KillOnDrop};
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
    _child: KillOnDrop,
    port: u16,
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
            .spawn()
            .expect("start git daemon");
        let daemon = Self {
            _child: KillOnDrop(child),
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

    /// The `ssh://` URL of a repository at an absolute path on this machine.
    pub fn url(&self, path: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, path.display())
    }
}
