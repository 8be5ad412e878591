//! What the release benchmarks share (`#[path]`-included: cargo builds no example from it).

#![allow(dead_code)] // each example uses part of it

use fleet_agent::release::{Digest, HostEntry, Release, Source};
use std::collections::BTreeMap;

/// A made-up store path hash for host `i`: 32 nix-base32 characters that look random, as real
/// ones are (so nothing compresses better than it would in a real fleet).
pub fn store_hash(i: usize) -> String {
    Digest::of(format!("{i}").as_bytes())
        .to_string()
        .bytes()
        .take(32)
        .map(|b| b"0123456789abcdfghijklmnpqrsvwxyz"[usize::from(b) % 32] as char)
        .collect()
}

/// A release of fleet "bench" with `hosts`, signed-for times in 2027–2030.
pub fn release(format: u32, serial: u64, hosts: BTreeMap<String, HostEntry>) -> Release {
    Release {
        format,
        fleet: "bench".into(),
        serial,
        issued_at: 1_800_000_000,
        expires: 1_900_000_000,
        source: Source {
            repo: "git+https://example.org/fleet.git".into(),
            commit: Some("56697b0912ba35bff5f5d74e6c61a31052c3f1fc".into()),
        },
        substituters: vec!["https://cache.example.org".into()],
        hosts,
        host_tree: None,
        rollout: None,
    }
}
