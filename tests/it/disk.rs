//! Disk space before an update: a host whose store is on a small filesystem (a tmpfs with a size
//! limit) refuses an update that would not fit, before fetching any of it, and with
//! `collect_garbage` frees what nothing roots first.

use crate::common::{Channel, Fleet};
use fleet_tests::nix::nix;
use fleet_tests::run;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `mib` MiB mounted at `path` for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where this machine may not mount (a container without the right); said on stderr.
    fn mount(path: &Path, mib: u32) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let mut c = Command::new("mount");
        c.args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path);
        let out = run(c);
        if out.code != Some(0) {
            eprintln!("disk space tests skipped: cannot mount a tmpfs here: {out}");
            return None;
        }
        Some(Self(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_update_that_does_not_fit_is_refused_before_any_download_then_fits_after_garbage_collection() {
    let mut fleet = Fleet::new(&["a"]);
    // The host's store on 48 MiB, keeping 8 MiB free.
    let Some(_small) = Tmpfs::mount(&fleet.dir.join("hosts/a/store"), 48) else {
        return;
    };
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    let config = |fleet: &Fleet, extra: &str| {
        let keys = [fleet.release_public_key()];
        let url = fleet.channel_url(Channel::Directory);
        host.write_config(
            &fleet.settings(&keys, 1, &url),
            &format!("disk_reserve = \"8MiB\"\n{extra}"),
            "",
        )
    };
    config(&fleet, "");

    // A 48 MiB system cannot fit: refused with the numbers, at every poll, never given up.
    let v2 = fleet.release_change("a", |h| {
        h.version = "2".into();
        h.payload_mib = 48;
    });
    for _ in 0..4 {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(1), "{outcome}");
        assert_eq!(outcome["code"], "disk_space", "{outcome}");
        let message = outcome["message"].as_str().unwrap();
        assert!(
            message.contains("needs 48.0 MiB") && message.contains("must keep 8.0 MiB"),
            "{message}"
        );
    }
    assert!(!host.has(&v2), "part of the update was fetched");
    assert!(host.switch_calls().is_empty());
    host.assert_on(&v1);
    assert_eq!(host.state()["last_error"]["code"], "disk_space");

    // Garbage in the store: 24 MiB that nothing roots. A 16 MiB update fits only without it.
    fleet.fleet.set("a", |h| {
        h.version = "garbage".into();
        h.payload_mib = 24;
    });
    let garbage = fleet.fleet.build("a");
    let mut copy = nix();
    copy.args(["copy", "--no-check-sigs", "--to"])
        .arg(host.store.as_ref().unwrap())
        .arg(&garbage);
    run(copy).ok();
    let v3 = fleet.release_change("a", |h| {
        h.version = "3".into();
        h.payload_mib = 16;
    });
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(1), "{outcome}");
    assert_eq!(outcome["code"], "disk_space", "{outcome}");
    assert!(host.has(&garbage));

    // Allowed to collect garbage: the unrooted 24 MiB go, every system generation stays.
    config(&fleet, "collect_garbage = true");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&v3);
    assert!(!host.has(&garbage), "the garbage was not collected");
    assert!(
        host.has(&v1),
        "the generation to roll back to was collected"
    );
}
