//! Booted machines: a debootstrapped Debian 12 with systemd as PID 1 under `systemd-nspawn
//! --boot`, for what plain processes cannot show: the agent as a systemd service, its switch in
//! a transient unit, `systemctl --failed`, the journal, reboots and power cuts (SPEC §12).
//!
//! The image is built once (`debootstrap`, about a minute) into a cache directory the harness
//! owns (`$FLEET_MACHINE_CACHE`, default `/var/cache/fleet-tests`) and shared read-only by every
//! machine through an overlay: each machine's writes go to its own upper directory, which
//! survives its reboots like a disk, while `/run` is a fresh tmpfs at every boot. `/nix` is bound
//! in from the test machine (one store, as the tests build into it); each machine has its own
//! system profile, state directory and network namespace (loopback only).
//!
//! The image carries a tiny simulated bootloader: `/boot/fleet-default` is the boot entry that
//! `switch-to-configuration boot` sets (the fixture's script, told where by
//! `/etc/fleet-fixture.env`), and `fleet-boot.service` turns it into `/run/booted-system` and
//! `/run/current-system` at every boot, as NixOS's stage 2 does.

use crate::{binary, run, wait_until, Run};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Bump when the image recipe changes: the cache keys on it.
const IMAGE_VERSION: &str = "bookworm-v5";
const PACKAGES: &str = "systemd,systemd-sysv,dbus,libdbi-perl,nix-bin,iproute2,procps,git";

const FIXTURE_ENV: &str = "FLEET_FIXTURE_LOG=/var/log/fleet-switch.log
FLEET_FIXTURE_CURRENT=/run/current-system
FLEET_FIXTURE_BOOT=/boot/fleet-default
FLEET_FIXTURE_CONTROL=/etc/fleet-fixture-control
FLEET_FIXTURE_AGENT_DROPIN=/etc/systemd/system/fleet-agent.service.d/fixture.conf
FLEET_FIXTURE_NIXOS=1
FLEET_FIXTURE_BOOT_DIR=/boot
";

const BOOT_SCRIPT: &str = "#!/bin/sh
# The simulated bootloader and stage 2: boot the default entry.
set -e
PATH=/usr/bin:/bin
entry=$(readlink /boot/fleet-default)
ln -sfn \"$entry\" /run/booted-system
ln -sfn \"$entry\" /run/current-system
echo \"booted $entry\" >> /var/log/fleet-boots.log
";

const BOOT_UNIT: &str = "[Unit]
Description=Simulated bootloader: boot the default system
DefaultDependencies=no
After=local-fs.target
Before=fleet-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/fleet-boot

[Install]
WantedBy=sysinit.target
";

/// fleet-agent.service as the NixOS module renders it: restartIfChanged = false and
/// X-StopOnRemoval = false in [Unit], the module's `path` as the unit's PATH (the agent needs
/// nix, systemd and coreutils; other units get only systemd's bin), KillMode=mixed,
/// Type=notify with a watchdog.
const AGENT_UNIT: &str = "[Unit]
Description=fleet-agent: pull, verify and apply signed NixOS releases
After=fleet-boot.service
Requires=fleet-boot.service
X-RestartIfChanged=false
X-StopOnRemoval=false

[Service]
Type=notify
NotifyAccess=main
WatchdogSec=3min
Environment=PATH=/usr/local/bin:/usr/bin:/bin
ExecStart=/usr/local/bin/fleet-agent --config /etc/fleet-agent/config.toml run
ExecReload=/bin/kill -HUP $MAINPID
KillMode=mixed
Restart=always
RestartSec=1s
StateDirectory=fleet-agent
TimeoutStopSec=60s

[Install]
WantedBy=multi-user.target
";

/// The machines' `/etc/nix/nix.conf`: the project's Nix settings, with signature checks stated.
const NIX_CONF: &str = concat!(
    include_str!("../../scripts/nix/nix.conf"),
    "require-sigs = true\n"
);

fn cache_dir() -> PathBuf {
    std::env::var_os("FLEET_MACHINE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/fleet-tests"))
}

fn must(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's root directory, built on first use and cached.
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = cache_dir().join(IMAGE_VERSION);
        let root = dir.join("root");
        if root.join("etc/fleet-image-ready").exists() {
            return root;
        }
        std::fs::create_dir_all(cache_dir()).unwrap();
        let building = cache_dir().join(format!(".build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building).unwrap();
        let mirror = std::env::var("FLEET_DEBIAN_MIRROR")
            .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
        eprintln!(
            "machine: building the Debian image in {} (about a minute)",
            dir.display()
        );
        must(
            Command::new("debootstrap")
                .args(["--variant=minbase", &format!("--include={PACKAGES}")])
                .args(["bookworm"])
                .arg(building.join("root"))
                .arg(&mirror),
            "debootstrap (scripts/setup installs it)",
        );
        customise(&building.join("root"));
        std::fs::write(building.join("root/etc/fleet-image-ready"), IMAGE_VERSION).unwrap();
        // Another test run may have finished first: keep theirs.
        if std::fs::rename(&building, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        root
    })
}

fn write(root: &Path, path: &str, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let file = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn link(root: &Path, path: &str, target: &str) {
    let file = root.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&file);
    std::os::unix::fs::symlink(target, file).unwrap();
}

/// Where the machines' units find programs unless they set PATH: systemd's own binaries only,
/// as NixOS builds systemd (its default PATH is the systemd package's `bin/`).
const NIXOS_UNIT_PATH: &str = "/usr/lib/fleet-nixos/systemd/bin";

/// NixOS's unit PATH: a directory of links to the programs of Debian's systemd packages, made
/// every unit's default PATH.
fn nixos_unit_path(root: &Path) {
    let bin = root.join(NIXOS_UNIT_PATH.trim_start_matches('/'));
    std::fs::create_dir_all(&bin).unwrap();
    for dir in ["usr/bin", "bin"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let systemd = name.starts_with("systemd")
                || [
                    "busctl",
                    "hostnamectl",
                    "journalctl",
                    "localectl",
                    "loginctl",
                    "networkctl",
                    "systemctl",
                    "timedatectl",
                    "udevadm",
                    "kernel-install",
                ]
                .contains(&name.as_str());
            if systemd && !bin.join(&name).exists() {
                std::os::unix::fs::symlink(format!("/{dir}/{name}"), bin.join(&name)).unwrap();
            }
        }
    }
    write(
        root,
        "/etc/systemd/system.conf.d/nixos-path.conf",
        &format!("[Manager]\nDefaultEnvironment=PATH={NIXOS_UNIT_PATH}\n"),
        0o644,
    );
}

fn customise(root: &Path) {
    nixos_unit_path(root);
    write(root, "/etc/fleet-fixture.env", FIXTURE_ENV, 0o644);
    write(root, "/usr/local/sbin/fleet-boot", BOOT_SCRIPT, 0o755);
    write(
        root,
        "/etc/systemd/system/fleet-boot.service",
        BOOT_UNIT,
        0o644,
    );
    write(
        root,
        "/etc/systemd/system/fleet-agent.service",
        AGENT_UNIT,
        0o644,
    );
    link(
        root,
        "/etc/systemd/system/sysinit.target.wants/fleet-boot.service",
        "/etc/systemd/system/fleet-boot.service",
    );
    link(
        root,
        "/etc/systemd/system/multi-user.target.wants/fleet-agent.service",
        "/etc/systemd/system/fleet-agent.service",
    );
    write(root, "/etc/nix/nix.conf", NIX_CONF, 0o644);
    // No logins on a test machine's console.
    link(
        root,
        "/etc/systemd/system/console-getty.service",
        "/dev/null",
    );
    link(root, "/etc/systemd/system/getty@.service", "/dev/null");
    std::fs::create_dir_all(root.join("etc/fleet-fixture-control")).unwrap();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::write(root.join("usr/local/bin/fleet-agent"), b"").unwrap();
    std::fs::write(root.join("usr/local/bin/fleet-sign"), b"").unwrap();
    std::fs::create_dir_all(root.join("srv/channel")).unwrap();
}

/// One booted (or bootable) machine.
pub struct Machine {
    pub name: String,
    dir: PathBuf,
    /// The machine's root as the test machine sees it (the overlay).
    pub root: PathBuf,
    netns: String,
    binds: Vec<(PathBuf, String)>,
    nspawn: Option<Child>,
    init: Option<u32>,
    boots: u32,
}

impl Machine {
    /// Prepares a machine in `dir` (not booted yet). `binds` are read-only bind mounts
    /// (test machine path, path inside).
    pub fn new(dir: &Path, name: &str, binds: &[(&Path, &str)]) -> Self {
        let image = image();
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Unique per machine: tests boot machines of the same name side by side.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let netns = format!(
            "fm{:x}m{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        must(
            Command::new("ip").args(["netns", "add", &netns]),
            "ip netns add",
        );
        must(
            Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]),
            "loopback up",
        );
        // Mounted last: a setup that fails before leaves no mount behind (Drop never runs then).
        let root = dir.join("root");
        must(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    image.display(),
                    dir.join("upper").display(),
                    dir.join("work").display()
                ))
                .arg(&root),
            "mount the machine's overlay",
        );
        write(&root, "/etc/hostname", &format!("{name}\n"), 0o644);
        // Per machine, so the fixture's settings can change without rebuilding the image.
        write(&root, "/etc/fleet-fixture.env", FIXTURE_ENV, 0o644);
        Self {
            name: name.to_owned(),
            dir: dir.to_owned(),
            root,
            netns,
            binds: binds
                .iter()
                .map(|(host, inside)| (host.to_path_buf(), (*inside).to_owned()))
                .collect(),
            nspawn: None,
            init: None,
            boots: 0,
        }
    }

    /// The machine's network namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Writes a file into the machine's disk (works booted or not; not for `/run`).
    pub fn write(&self, path: &str, text: &str) {
        write(&self.root, path, text, 0o644);
    }

    /// A symlink on the machine's disk.
    pub fn link(&self, path: &str, target: &str) {
        link(&self.root, path, target);
    }

    /// Installs `toplevel` as the committed system: the profile's first generation and the
    /// boot default.
    pub fn install(&self, toplevel: &str) {
        self.link("/var/lib/fleet-system/profile-1-link", toplevel);
        self.link("/var/lib/fleet-system/profile", "profile-1-link");
        self.link("/boot/fleet-default", toplevel);
        self.write(
            "/boot/extlinux/extlinux.conf",
            &format!("DEFAULT nixos-default\nLABEL nixos-default\n  APPEND init={toplevel}/init\n"),
        );
    }

    /// Boots the machine and waits until systemd says it is up.
    pub fn boot(&mut self) {
        assert!(self.nspawn.is_none(), "{} is already running", self.name);
        self.boots += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("console-{}.log", self.boots))).unwrap();
        let mut command = Command::new("systemd-nspawn");
        command
            .args(["--boot", "--register=no", "--keep-unit", "--quiet"])
            .arg(format!("--directory={}", self.root.display()))
            .arg(format!("--machine={}", self.name))
            .arg("--bind=/nix")
            .arg(format!(
                "--bind-ro={}:/usr/local/bin/fleet-agent",
                binary("fleet-agent").display()
            ))
            .arg(format!(
                "--bind-ro={}:/usr/local/bin/fleet-sign",
                binary("fleet-sign").display()
            ))
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                self.netns
            ))
            .arg("--console=read-only");
        for (host, inside) in &self.binds {
            command.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn runs (scripts/setup installs systemd-container)");
        let nspawn = child.id();
        self.nspawn = Some(child);
        wait_until("the machine's init starts", 30, || {
            !children(nspawn).is_empty()
        });
        self.init = children(nspawn).into_iter().next();
        wait_until("systemd finishes booting", 60, || {
            let out = self.exec(&["systemctl", "is-system-running"]);
            matches!(out.stdout.trim(), "running" | "degraded")
        });
    }

    /// Runs a command inside the booted machine (all of its namespaces).
    pub fn exec(&self, args: &[&str]) -> Run {
        let init = self.init.expect("the machine is booted");
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &init.to_string(), "-a", "--"])
            .args(args);
        run(command)
    }

    /// Reads a file inside the booted machine (also `/run`).
    pub fn read(&self, path: &str) -> Option<String> {
        let out = self.exec(&["cat", path]);
        (out.code == Some(0)).then_some(out.stdout)
    }

    /// Where a link inside the booted machine points.
    /// A property of a unit as systemd has it loaded (`systemctl show -p NAME --value UNIT`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.exec(&["systemctl", "show", "-p", property, "--value", unit])
            .stdout
            .trim()
            .to_owned()
    }

    pub fn readlink(&self, path: &str) -> Option<String> {
        let out = self.exec(&["readlink", path]);
        (out.code == Some(0)).then(|| out.stdout.trim().to_owned())
    }

    /// `systemctl reboot` inside; the container ends, and it is booted again.
    pub fn reboot(&mut self) {
        let _ = self.exec(&["systemctl", "reboot"]);
        self.wait_for_exit(Duration::from_secs(60));
        self.boot();
    }

    /// Waits until the machine reboots by itself (the container ends), then boots it again, as
    /// its firmware would.
    pub fn wait_for_reboot(&mut self, seconds: u64) {
        let child = self.nspawn.as_mut().expect("the machine is running");
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed().as_secs() < seconds,
                "{} did not reboot within {seconds} s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.nspawn = None;
        self.init = None;
        self.boot();
    }

    /// Power cut: SIGKILL to the machine's init, no shutdown at all. Not booted again.
    pub fn power_cut(&mut self) {
        if let Some(init) = self.init.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &init.to_string()])
                .output();
        }
        self.wait_for_exit(Duration::from_secs(30));
    }

    fn wait_for_exit(&mut self, limit: Duration) {
        if let Some(mut child) = self.nspawn.take() {
            let start = std::time::Instant::now();
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if start.elapsed() > limit {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.init = None;
    }

    /// The journal of `unit` (or all of it), one JSON object per entry.
    pub fn journal(&self, unit: Option<&str>) -> Vec<serde_json::Value> {
        let mut args = vec!["journalctl", "--no-pager", "-o", "json"];
        if let Some(unit) = unit {
            args.extend(["-u", unit]);
        }
        self.exec(&args)
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The agent's state file.
    pub fn state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.root.join("var/lib/fleet-agent/state.json"))
            .expect("state file");
        serde_json::from_str(&text).expect("state parses")
    }

    /// The fixture's switch log: "<action> <toplevel>" per call.
    pub fn switch_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("var/log/fleet-switch.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Where the committed profile and the boot default point (on disk).
    pub fn committed(&self) -> (Option<String>, Option<String>) {
        let read = |p: &str| {
            let mut path = self.root.join(p);
            for _ in 0..4 {
                let target = std::fs::read_link(&path).ok()?;
                if target.starts_with("/nix/store") {
                    return Some(target.display().to_string());
                }
                path = path.parent()?.join(target);
            }
            None
        };
        (
            read("var/lib/fleet-system/profile"),
            read("boot/fleet-default"),
        )
    }
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_cut();
        let _ = Command::new("umount").arg("-l").arg(&self.root).output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}
