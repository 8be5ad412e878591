//! Test harness for fleet: real Nix, real git, real HTTP on loopback.
//!
//! Each test makes a [`TestDir`]; everything it creates (flakes, caches, chroot stores, git
//! remotes, channel directories) lives below it and goes with it. Child processes (servers,
//! daemons) sit behind [`KillOnDrop`] guards. Nix runs as root without a daemon, configured
//! only through the environment [`nix_env`] gives every child, so the machine's own Nix
//! configuration does not matter.

pub mod collector;
pub mod fixture;
pub mod git;
pub mod host;
pub mod http;
pub mod machine;
pub mod netns;
pub mod nix;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;

pub use nix::nix_env;

/// A fresh temporary directory for one test.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleet-test-")
            .tempdir()
            .expect("create test dir");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills and reaps a child process when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of one of the workspace's binaries, built (once per test run) by cargo.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "fleet-sign",
                "-p",
                "fleet-agent",
            ])
            .args(["--features", "fleet-agent/failpoints"])
            .current_dir(workspace)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        // The test binary lives in target/<profile>/deps; the binaries one level up.
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().to_path_buf()
    });
    dir.join(name)
}

/// The command line that runs the agent the tests exercise: the workspace's `fleet-agent`, or
/// `$FLEET_AGENT` (another build of it: the release build for benchmarks, the static aarch64
/// one from `scripts/build-aarch64`), behind `$FLEET_AGENT_RUNNER` when that is set (e.g.
/// `qemu-aarch64-static`).
pub fn agent_program() -> Vec<std::ffi::OsString> {
    let agent = std::env::var_os("FLEET_AGENT").unwrap_or_else(|| binary("fleet-agent").into());
    std::env::var_os("FLEET_AGENT_RUNNER")
        .into_iter()
        .chain([agent])
        .collect()
}

/// A command running [`agent_program`].
pub fn agent_command() -> Command {
    let program = agent_program();
    let mut command = Command::new(&program[0]);
    command.args(&program[1..]);
    command
}

/// A command for one of the workspace's binaries, with the test Nix environment.
pub fn command(name: &str) -> Command {
    let mut command = Command::new(binary(name));
    command.envs(nix_env());
    command
}

/// The result of a command, with its output decoded for assertions and messages.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "expected success:\n{self}");
        self
    }

    /// Asserts the exit code and that stderr contains `needle`.
    pub fn fails_with(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(self.code, Some(code), "expected exit code {code}:\n{self}");
        assert!(
            self.stderr.contains(needle),
            "expected stderr to contain {needle:?}:\n{self}"
        );
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion and captures its output.
pub fn run(mut command: Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("spawn command");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// [`run`], also returning the process's peak resident memory in KiB (its `VmHWM`, read until
/// it exits; stdout and stderr are read by threads meanwhile).
pub fn run_measuring_peak(mut command: Command) -> (Run, u64) {
    use std::io::Read as _;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn command");
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Ok(status) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            {
                peak = kib;
            }
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let run = Run {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    (run, peak)
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for test daemons).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`, up to ten seconds.
pub fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nothing listens on 127.0.0.1:{port} after 10 s");
}

/// Polls `done` every 100 ms for up to `seconds`; panics naming `what` if it never holds.
pub fn wait_until(what: &str, seconds: u64, done: impl Fn() -> bool) {
    for _ in 0..seconds * 10 {
        if done() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out after {seconds} s waiting for {what}");
}
