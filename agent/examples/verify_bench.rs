//! Benchmark: verify a signed release for 10,000 hosts (SPEC §10 target: under 50 ms).
//!
//! `cargo run --release -p fleet-agent --example verify_bench [HOSTS] [ROUNDS]`

#[path = "support/mod.rs"]
mod support;

use fleet_agent::release::{
    verify, HostEntry, SecretKey, SignatureFile, StorePath, TrustPolicy, VerifyContext,
    FORMAT_VERSION,
};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let hosts: usize = args.next().map_or(10_000, |a| a.parse().expect("HOSTS"));
    let rounds: usize = args.next().map_or(20, |a| a.parse().expect("ROUNDS"));
    let key = SecretKey::from_seed("ops1", [1; 32]).unwrap();
    let report_key = SecretKey::from_seed("host", [2; 32])
        .unwrap()
        .public()
        .to_string();
    let mut entries = BTreeMap::new();
    for i in 0..hosts {
        let toplevel = format!(
            "/nix/store/{:0>32}-nixos-system-host-{i:05}-24.11.20241122.abcdef0",
            format!("{i:x}").replace(['e'], "f")
        );
        entries.insert(
            format!("host-{i:05}"),
            HostEntry {
                toplevel: StorePath::parse(&toplevel).unwrap(),
                wave: Some((i % 3) as u32),
                not_before: None,
                target: None,
                previous: None,
                held: false,
                report_key: Some(report_key.clone()),
            },
        );
    }
    let release = support::release(FORMAT_VERSION, 1, entries);
    let document = serde_json::to_vec_pretty(&release).unwrap();
    let signatures = SignatureFile::sign(&document, &[&key])
        .render()
        .into_bytes();
    let trust = TrustPolicy::new(vec![key.public()], 1).unwrap();
    let context = VerifyContext {
        fleet: "bench".into(),
        now: 1_850_000_000,
        floor: None,
        own_expiry: true,
    };
    let mut times = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let verified = verify(&document, &signatures, &trust, &context).unwrap();
        let entry = verified.host("host-04242").unwrap();
        std::hint::black_box(entry);
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "verify {hosts} hosts ({} KiB document): median {:.2} ms, max {:.2} ms over {rounds} rounds",
        document.len() / 1024,
        times[rounds / 2].as_secs_f64() * 1000.0,
        times[rounds - 1].as_secs_f64() * 1000.0
    );
}
