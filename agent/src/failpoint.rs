//! Fail points for the crash tests: with the `failpoints` feature, reaching the point named by
//! `FLEET_AGENT_FAILPOINT` kills the agent with SIGKILL on the spot, as a power cut or the OOM
//! killer would; `name:hang` instead blocks the agent's thread for good (a hung agent, for the
//! watchdog). Without the feature, [`hit`] compiles to nothing.

/// Every fail point, so tests can iterate over them all.
pub const ALL: &[&str] = &[
    "state-before-rename",
    "state-after-rename",
    "after-realise",
    "after-trial-switch",
    "during-health",
    "after-profile-set",
    "after-boot-switch",
    "after-rollback-switch",
];

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "unknown fail point {name}");
    let wanted = std::env::var("FLEET_AGENT_FAILPOINT").unwrap_or_default();
    let (wanted, hang) = match wanted.strip_suffix(":hang") {
        Some(point) => (point.to_owned(), true),
        None => (wanted, false),
    };
    // "name" fires at the first hit; "name@N" at the N-th (state writes happen many times).
    let (point, nth) = match wanted.split_once('@') {
        Some((point, n)) => (point, n.parse::<usize>().unwrap_or(1)),
        None => (wanted.as_str(), 1),
    };
    if point != name {
        return;
    }
    static HITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if HITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 < nth {
        return;
    }
    if hang {
        eprintln!("fleet-agent: fail point {name} reached: hanging");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    eprintln!("fleet-agent: fail point {name} reached: killing myself");
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(std::process::id().to_string())
        .status();
    // SIGKILL cannot be caught; wait for it to land.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
