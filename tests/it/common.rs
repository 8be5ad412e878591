//! What the integration tests share: an operator with a fleet, keys, a cache and channels, and
//! simulated hosts following it.

use fleet_agent::release::{self, Release, SecretKey, SignatureFile};
use fleet_tests::fixture::{FixtureFleet, Host};
use fleet_tests::git::{bare_repo, GitDaemon};
use fleet_tests::host::{HostSettings, SimHost};
use fleet_tests::http::HttpServer;
use fleet_tests::nix::NixKey;
use fleet_tests::{command, run, Run, TestDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Which channel a host follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Directory,
    Http,
    /// git over `git daemon` on loopback (shallow fetch).
    Git,
    /// git from a local bare repository (libgit2's local transport: no shallow fetch).
    GitFile,
}

/// An operator's whole setup, with the servers running.
pub struct Fleet {
    pub dir: TestDir,
    pub fleet: FixtureFleet,
    pub release_key: PathBuf,
    pub cache_key: NixKey,
    pub cache_public_key: String,
    pub cache_dir: PathBuf,
    pub channel_dir: PathBuf,
    pub git_remote: PathBuf,
    pub cache_server: HttpServer,
    pub www: HttpServer,
    pub git_daemon: GitDaemon,
}

impl Fleet {
    pub fn new(hosts: &[&str]) -> Self {
        Self::new_on(hosts, "127.0.0.1")
    }

    /// A fleet whose cache and HTTP channel listen on `ip` (a test namespace's link address).
    pub fn new_on(hosts: &[&str], ip: &str) -> Self {
        let dir = TestDir::new();
        let fleet = FixtureFleet::new(dir.join("fleet"), hosts);
        let release_key = dir.join("ops1.sec");
        let mut keygen = command("fleet-sign");
        keygen.args(["keygen", "ops1", "--out"]).arg(&release_key);
        run(keygen).ok();
        let cache_key = NixKey::generate(dir.path(), "cache-1");
        let git_remote = bare_repo(&dir.join("remotes/fleet.git"));
        let cache_dir = dir.join("cache");
        let channel_dir = dir.join("www");
        std::fs::create_dir_all(&cache_dir).unwrap();
        std::fs::create_dir_all(&channel_dir).unwrap();
        Self {
            cache_server: HttpServer::serve_on(&cache_dir, ip),
            www: HttpServer::serve_on(&channel_dir, ip),
            git_daemon: GitDaemon::serve(&dir.join("remotes")),
            cache_dir,
            channel_dir,
            release_key,
            cache_public_key: cache_key.public_key(),
            cache_key,
            git_remote,
            fleet,
            dir,
        }
    }

    pub fn release_public_key(&self) -> String {
        std::fs::read_to_string(self.release_key.with_extension("sec.pub"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn secret_key(&self) -> SecretKey {
        SecretKey::parse(&std::fs::read_to_string(&self.release_key).unwrap()).unwrap()
    }

    /// `fleet-sign release` to the git remote and the directory, with the cache over HTTP as
    /// the substituter hint.
    pub fn release(&self, extra: &[&str]) -> Run {
        let channels = [self.git_channel(), self.channel_dir.display().to_string()];
        self.release_with(&[&self.release_key], &channels, extra)
    }

    /// Changes `host` in the flake, commits and releases (every channel, the next serial);
    /// returns the host's new toplevel.
    pub fn release_change(&mut self, host: &str, change: impl FnOnce(&mut Host)) -> String {
        self.fleet.set(host, change);
        let version = self.fleet.hosts[host].version.clone();
        self.fleet.commit(&format!("{host}: {version}"));
        self.release(&[]).ok();
        self.fleet.build(host)
    }

    /// `fleet-sign release` signed by `keys`, publishing to `channels`.
    pub fn release_with(&self, keys: &[&Path], channels: &[String], extra: &[&str]) -> Run {
        run(self.release_command("release", keys, channels, extra))
    }

    /// A `fleet-sign` command that builds and publishes (`release`, `rollout`): this fleet's
    /// flake, cache and workstation record, signed by `keys`, publishing to `channels`.
    pub fn release_command(
        &self,
        subcommand: &str,
        keys: &[&Path],
        channels: &[String],
        extra: &[&str],
    ) -> Command {
        let mut c = command("fleet-sign");
        // The workstation's record of issued serials, this fleet's own.
        c.env("XDG_STATE_HOME", self.workstation_state());
        c.arg(subcommand)
            .args(["--fleet", "home", "--flake", &self.fleet.flake_ref()])
            .arg("--cache")
            .arg(format!("file://{}", self.cache_dir.display()))
            .arg("--cache-key")
            .arg(&self.cache_key.secret)
            .args(["--substituter", &self.cache_server.url()]);
        for channel in channels {
            c.args(["--channel", channel]);
        }
        for key in keys {
            c.arg("--key").arg(key);
        }
        c.args(extra);
        c
    }

    /// Where `fleet-sign release` keeps its record of the serials it issued (XDG_STATE_HOME).
    pub fn workstation_state(&self) -> PathBuf {
        self.dir.join("workstation-state")
    }

    /// The git remote as a channel, by path.
    pub fn git_channel(&self) -> String {
        format!("git+file://{}", self.git_remote.display())
    }

    /// A freshness key made with `fleet-sign keygen fresh`: its secret file and public key.
    pub fn freshness_key(&self) -> (PathBuf, String) {
        let secret = self.dir.join("fresh.sec");
        if !secret.exists() {
            let mut keygen = command("fleet-sign");
            keygen.args(["keygen", "fresh", "--out"]).arg(&secret);
            run(keygen).ok();
        }
        let public = std::fs::read_to_string(secret.with_extension("sec.pub")).unwrap();
        (secret, public.trim().to_owned())
    }

    /// `fleet-sign refresh` of the git remote and the directory with the freshness key, trusting
    /// the release key.
    pub fn refresh(&self, extra: &[&str]) -> Run {
        let mut c = command("fleet-sign");
        c.arg("refresh")
            .args(["--fleet", "home", "--freshness-key"])
            .arg(self.freshness_key().0)
            .args(["--trusted-key", &self.release_public_key()])
            .args(["--channel", &self.git_channel()])
            .arg("--channel")
            .arg(&self.channel_dir)
            .args(extra);
        run(c)
    }

    /// A freshness statement for `document` (its serial `serial`), valid from `issued` to
    /// `expires`, signed by `keys`: what `fleet-sign refresh` writes, with any times.
    pub fn statement(
        document: &[u8],
        serial: u64,
        issued: u64,
        expires: u64,
        keys: &[&SecretKey],
    ) -> (Vec<u8>, Vec<u8>) {
        release::Statement::new(
            "home",
            serial,
            release::Digest::of(document),
            issued,
            expires,
        )
        .sign(keys)
    }

    /// Writes a freshness statement and its signatures to the directory channel as they are.
    pub fn publish_freshness_raw(&self, statement: &[u8], signatures: &[u8]) {
        std::fs::write(self.channel_dir.join(release::FRESHNESS_FILE), statement).unwrap();
        std::fs::write(
            self.channel_dir.join(release::FRESHNESS_SIGNATURE_FILE),
            signatures,
        )
        .unwrap();
    }

    /// The freshness key as the agent library reads it.
    pub fn freshness_secret(&self) -> SecretKey {
        SecretKey::parse(&std::fs::read_to_string(self.freshness_key().0).unwrap()).unwrap()
    }

    /// `fleet-sign verify --from <from>` trusting the release key.
    pub fn verify(&self, from: &str, extra: &[&str]) -> Run {
        let mut c = command("fleet-sign");
        c.args([
            "verify",
            "--from",
            from,
            "--key",
            &self.release_public_key(),
        ])
        .args(extra);
        run(c)
    }

    /// The document the directory channel holds, as JSON.
    pub fn published_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.published().0).unwrap()
    }

    /// The channel URL a host uses.
    pub fn channel_url(&self, channel: Channel) -> String {
        match channel {
            Channel::Directory => self.channel_dir.display().to_string(),
            Channel::Http => self.www.url(),
            Channel::Git => format!("git+{}", self.git_daemon.url("fleet.git")),
            Channel::GitFile => format!("git+file://{}", self.git_remote.display()),
        }
    }

    /// Host settings trusting `keys` with `threshold`, following `channel`.
    pub fn settings<'a>(
        &'a self,
        keys: &'a [String],
        threshold: usize,
        channel: &'a str,
    ) -> HostSettings<'a> {
        HostSettings {
            fleet: "home",
            trusted_keys: keys,
            threshold,
            channel,
            cache_keys: std::slice::from_ref(&self.cache_public_key),
        }
    }

    /// A simulated host installed with its current fixture system, following `channel`.
    pub fn host(&mut self, name: &str, channel: Channel) -> SimHost {
        self.host_in(name, channel, name)
    }

    /// A host on the machine's own store (it can build), with `top` added to its config.
    pub fn host_on_machine_store(&mut self, name: &str, channel: Channel, top: &str) -> SimHost {
        let initial = self.fleet.build(name);
        let keys = [self.release_public_key()];
        let url = self.channel_url(channel);
        let settings = self.settings(&keys, 1, &url);
        let root = self.dir.join(format!("hosts/{name}"));
        let host = SimHost::install_with_store(&root, name, &initial, &settings, false);
        host.write_config(&settings, top, "");
        host
    }

    /// Like [`Self::host`], in `hosts/<dir>`: several simulated machines can then play the
    /// same host of the release.
    pub fn host_in(&mut self, name: &str, channel: Channel, dir: &str) -> SimHost {
        let initial = self.fleet.build(name);
        let keys = [self.release_public_key()];
        let url = self.channel_url(channel);
        let settings = self.settings(&keys, 1, &url);
        let root = self.dir.join(format!("hosts/{dir}"));
        SimHost::install(&root, name, &initial, &settings)
    }

    /// A host installed with its current fixture system following the channel `url`, with
    /// `top` added to its config.
    pub fn host_on(&mut self, name: &str, url: &str, top: &str) -> SimHost {
        let initial = self.fleet.build(name);
        let keys = [self.release_public_key()];
        let settings = self.settings(&keys, 1, url);
        let host = SimHost::install(
            &self.dir.join(format!("hosts/{name}")),
            name,
            &initial,
            &settings,
        );
        host.write_config(&settings, top, "");
        host
    }

    /// The release the directory channel holds now.
    pub fn published(&self) -> (Vec<u8>, Release) {
        let bytes = std::fs::read(self.channel_dir.join(release::DOCUMENT_FILE)).unwrap();
        let parsed = serde_json::from_slice(&bytes).unwrap();
        (bytes, parsed)
    }

    /// Writes `document` and `signatures` to the directory channel as they are.
    pub fn publish_raw(&self, document: &[u8], signatures: &[u8]) {
        std::fs::write(self.channel_dir.join(release::DOCUMENT_FILE), document).unwrap();
        std::fs::write(self.channel_dir.join(release::SIGNATURE_FILE), signatures).unwrap();
    }

    /// Serializes `release` and signs it with `keys`, as fleet-sign would.
    pub fn sign(release: &Release, keys: &[&SecretKey]) -> (Vec<u8>, Vec<u8>) {
        let mut document = serde_json::to_vec_pretty(release).unwrap();
        document.push(b'\n');
        let signatures = Self::sign_bytes(&document, keys);
        (document, signatures)
    }

    /// A signature file over exactly `document`.
    pub fn sign_bytes(document: &[u8], keys: &[&SecretKey]) -> Vec<u8> {
        SignatureFile::sign(document, keys).render().into_bytes()
    }
}

/// The credentials `fleet-test-s3` takes.
pub const ACCESS_KEY: &str = "fleet-test";
pub const SECRET_KEY: &str = "fleet-test-secret";

/// `fleet-test-s3` on a free loopback port, one bucket (`cache`), requests logged.
pub struct S3Server {
    _child: fleet_tests::KillOnDrop,
    _dir: TestDir,
    pub port: u16,
    log: PathBuf,
    refuse: PathBuf,
}

impl S3Server {
    pub fn start() -> Self {
        let dir = TestDir::new();
        std::fs::create_dir_all(dir.join("root/cache")).unwrap();
        let (log, refuse) = (dir.join("requests.log"), dir.join("refuse"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-test-s3"))
            .arg("--root")
            .arg(dir.join("root"))
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg("--log")
            .arg(&log)
            .arg("--refuse")
            .arg(&refuse)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("fleet-test-s3 said {line:?}"));
        Self {
            _child: fleet_tests::KillOnDrop(child),
            _dir: dir,
            port,
            log,
            refuse,
        }
    }

    /// The bucket as Nix names it, with the endpoint in Nix's form (host:port and a scheme).
    pub fn channel(&self) -> String {
        format!(
            "cache+s3://cache?region=us-east-1&endpoint=127.0.0.1:{}&scheme=http",
            self.port
        )
    }

    /// Every request so far: `<operation> <key> <status>`.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn clear_log(&self) {
        std::fs::write(&self.log, "").unwrap();
    }

    /// Refuses uploads to these keys (a key ending in `/`: everything below it) from now on;
    /// none: takes uploads again.
    pub fn refuse(&self, keys: &[&str]) {
        match keys {
            [] => std::fs::remove_file(&self.refuse).unwrap(),
            _ => std::fs::write(&self.refuse, keys.join("\n")).unwrap(),
        }
    }
}

pub fn with_credentials(mut command: Command) -> Command {
    command
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    command
}
