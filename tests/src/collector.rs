//! A real `fleet-sign collect` on loopback (or in a test namespace), and a plain HTTP/1.1
//! client for talking to it, hostile requests included.

use crate::{command, KillOnDrop};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A running collector.
pub struct Collector {
    /// The `fleet-sign` binary; default: the workspace's test build.
    program: Option<PathBuf>,
    /// A network namespace to run in (a booted machine's, to be its loopback collector).
    netns: Option<String>,
    pub url: String,
    pub listen: String,
    pub database: PathBuf,
    from: String,
    key: String,
    /// More `fleet-sign collect` arguments.
    extra: Vec<String>,
    process: Option<KillOnDrop>,
}

impl Collector {
    /// Starts a collector for fleet "home" on a free loopback port.
    pub fn start(database: &Path, from: &str, key: &str) -> Self {
        Self::start_on("127.0.0.1:0", database, from, key)
    }

    /// Starts a collector on a free loopback port with more `fleet-sign collect` arguments.
    pub fn start_with(database: &Path, from: &str, key: &str, extra: &[&str]) -> Self {
        Self::launch(None, None, "127.0.0.1:0", database, (from, key), extra)
    }

    /// Starts a collector listening on `listen`.
    pub fn start_on(listen: &str, database: &Path, from: &str, key: &str) -> Self {
        Self::start_program(None, listen, database, from, key)
    }

    /// Starts `program` (a `fleet-sign` binary, e.g. the release build for benchmarks).
    pub fn start_program(
        program: Option<PathBuf>,
        listen: &str,
        database: &Path,
        from: &str,
        key: &str,
    ) -> Self {
        Self::launch(program, None, listen, database, (from, key), &[])
    }

    /// Starts `fleet-sign collect` with `extra` arguments.
    fn launch(
        program: Option<PathBuf>,
        netns: Option<&str>,
        listen: &str,
        database: &Path,
        (from, key): (&str, &str),
        extra: &[&str],
    ) -> Self {
        let mut collector = Self {
            program,
            netns: netns.map(str::to_owned),
            url: String::new(),
            listen: listen.to_owned(),
            database: database.to_owned(),
            from: from.to_owned(),
            key: key.to_owned(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            process: None,
        };
        collector.restart();
        collector
    }

    /// Starts a collector inside network namespace `netns`, on its loopback port 9400. Only
    /// [`Self::fleet`] reaches it from outside (through `fleet-sign status` run in there).
    pub fn start_in_netns(netns: &str, database: &Path, from: &str, key: &str) -> Self {
        Self::launch(
            None,
            Some(netns),
            "127.0.0.1:9400",
            database,
            (from, key),
            &[],
        )
    }

    /// Starts the process again (on the same address once it had one).
    pub fn restart(&mut self) {
        let mut c = match &self.program {
            Some(program) => std::process::Command::new(program),
            None => command("fleet-sign"),
        };
        if let Some(netns) = &self.netns {
            let inner = c;
            c = std::process::Command::new("ip");
            c.args(["netns", "exec", netns])
                .arg(inner.get_program())
                .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
        }
        c.args(["collect", "--fleet", "home", "--listen", &self.listen])
            .arg("--database")
            .arg(&self.database)
            .args(["--from", &self.from, "--key", &self.key, "--refresh", "1s"])
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("fleet-sign collect starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("collector did not start: {line:?}"))
            .to_owned();
        self.listen = url.trim_start_matches("http://").to_owned();
        self.url = url;
        self.process = Some(KillOnDrop(child));
    }

    /// The collector's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.0.id())
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.0.kill();
            let _ = process.0.wait();
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        request(&self.url, "GET", path, &[], b"")
    }

    /// The fleet view as JSON (from inside the namespace through `fleet-sign status --json`
    /// when the collector runs in one).
    pub fn fleet(&self) -> serde_json::Value {
        if let Some(netns) = &self.netns {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", netns])
                .arg(crate::binary("fleet-sign"))
                .args(["status", "--json", "--collector", &self.url]);
            let out = crate::run(c);
            return serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
        }
        let (status, body) = self.get("/v1/fleet");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A host's entry in the fleet view.
    pub fn host(&self, name: &str) -> serde_json::Value {
        self.fleet()["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// A host's stored reports, oldest first.
    pub fn history(&self, name: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.get(&format!("/v1/hosts/{name}/history"));
        assert_eq!(status, 200, "{body}");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        value["reports"].as_array().unwrap().clone()
    }

    /// POSTs a report as given.
    pub fn post(&self, body: &[u8], signature: Option<&str>) -> (u16, String) {
        let headers: Vec<(&str, &str)> = signature
            .map(|s| vec![("Fleet-Signature", s), ("Content-Type", "application/json")])
            .unwrap_or_default();
        request(&self.url, "POST", "/v1/report", &headers, body)
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and body.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let address = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body and close: that is fine.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out += &rest[..size];
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A fleet that exists only on paper: a signed release naming `n` hosts with report keys (and
/// made-up toplevels), for driving the collector without building anything.
pub struct PaperFleet {
    pub channel_dir: PathBuf,
    pub release_key: fleet_agent::release::SecretKey,
    pub hosts: Vec<(String, fleet_agent::release::SecretKey)>,
}

/// A deterministic ed25519 key (tests only).
pub fn test_key(name: &str, seed: u64) -> fleet_agent::release::SecretKey {
    let mut bytes = [7u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8] = name.len() as u8;
    fleet_agent::release::SecretKey::from_seed(name, bytes).unwrap()
}

impl PaperFleet {
    pub fn new(dir: &Path, n: usize) -> Self {
        use fleet_agent::release::{HostEntry, Release, SignatureFile, Source, StorePath};
        let release_key = test_key("ops1", 1);
        let hosts: Vec<_> = (0..n)
            .map(|i| {
                let name = format!("host{i}");
                let key = test_key(&name, 1000 + i as u64);
                (name, key)
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let release = Release {
            format: fleet_agent::release::FORMAT_VERSION,
            fleet: "home".into(),
            serial: 1,
            issued_at: now - 10,
            expires: now + 86_400,
            source: Source {
                repo: "git+file:///srv/fleet".into(),
                commit: None,
            },
            substituters: Vec::new(),
            hosts: hosts
                .iter()
                .map(|(name, key)| {
                    let entry = HostEntry {
                        toplevel: StorePath::parse(&format!(
                            "/nix/store/{}-nixos-system-{name}",
                            "0123456789abcdfghijklmnpqrsvwxy".to_owned() + "z"
                        ))
                        .unwrap(),
                        wave: None,
                        not_before: None,
                        target: None,
                        previous: None,
                        held: false,
                        report_key: Some(key.public().to_string()),
                    };
                    (name.clone(), entry)
                })
                .collect(),
            host_tree: None,
            rollout: None,
        };
        let channel_dir = dir.join("paper-channel");
        std::fs::create_dir_all(&channel_dir).unwrap();
        let document = serde_json::to_vec_pretty(&release).unwrap();
        let signatures = SignatureFile::sign(&document, &[&release_key]).render();
        std::fs::write(channel_dir.join("release.json"), &document).unwrap();
        std::fs::write(channel_dir.join("release.json.sig"), signatures).unwrap();
        Self {
            channel_dir,
            release_key,
            hosts,
        }
    }

    pub fn release_public_key(&self) -> String {
        self.release_key.public().to_string()
    }

    /// A report of host `i` with `counter`, signed by its key: (body, signature header).
    pub fn report(&self, i: usize, counter: u64) -> (Vec<u8>, String) {
        let (name, key) = &self.hosts[i];
        report(name, counter).sign(key)
    }
}

/// An idle host's report, unsigned.
pub fn report(host: &str, counter: u64) -> fleet_agent::report::Report {
    fleet_agent::report::Report {
        format: fleet_agent::report::wire::REPORT_FORMAT,
        fleet: "home".into(),
        host: host.into(),
        counter,
        time: 1_790_000_000,
        agent_version: "test".into(),
        event: fleet_agent::report::Event::Heartbeat,
        phase: "idle".into(),
        target: None,
        committed: Some(1),
        accepted: Some(1),
        outcome: Some("up-to-date".into()),
        error: None,
        current: None,
        candidate: None,
        last_good: None,
        health: Vec::new(),
        reboot_needed: false,
        last_success: None,
    }
}
