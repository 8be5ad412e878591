//! Benchmark: one host's cost per release as the fleet grows (SPEC §10: under 4 KB of release
//! data and under 5 ms to verify at any fleet size up to 100,000 hosts), format 1 against
//! format 2, and what signing and writing a format-2 release costs the workstation.
//!
//! `cargo run --release -p fleet-agent --example scale_bench [SIZES]` (default 1,1000,10000,100000)
//!
//! For each fleet size: the bytes a host fetches (document, one signature, and for format 2 its
//! piece), the time to verify them and pick its entry (median of rounds), and for format 2 the
//! time to build the tree and every piece, sign the root and write all pieces to a directory
//! (what `fleet-sign release` does after its builds, minus `hosts.json` and fsyncs).

#[path = "support/mod.rs"]
mod support;

use fleet_agent::release::{
    host_files, verify, HostEntry, SecretKey, SignatureFile, StorePath, TrustPolicy, VerifyContext,
    FORMAT_TREE, FORMAT_VERSION,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn entries(hosts: usize) -> BTreeMap<String, HostEntry> {
    let report_key = SecretKey::from_seed("host", [2; 32])
        .unwrap()
        .public()
        .to_string();
    (0..hosts)
        .map(|i| {
            let hash = support::store_hash(i);
            let entry = HostEntry {
                toplevel: StorePath::parse(&format!(
                    "/nix/store/{hash}-nixos-system-host-{i:06}-24.11.20241122.abcdef0"
                ))
                .unwrap(),
                wave: Some((i % 3) as u32),
                not_before: None,
                target: None,
                previous: None,
                held: false,
                report_key: Some(report_key.clone()),
            };
            (format!("host-{i:06}"), entry)
        })
        .collect()
}

fn median(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .nth(1)
        .map_or(vec![1, 1_000, 10_000, 100_000], |a| {
            a.split(',').map(|s| s.parse().expect("SIZES")).collect()
        });
    let key = SecretKey::from_seed("ops1", [1; 32]).unwrap();
    let trust = TrustPolicy::new(vec![key.public()], 1).unwrap();
    let context = VerifyContext {
        fleet: "bench".into(),
        now: 1_850_000_000,
        floor: None,
        own_expiry: true,
    };
    println!(
        "{:>8}  {:>12} {:>11}  {:>12} {:>11}  {:>12}",
        "hosts", "f1 fetched", "f1 verify", "f2 fetched", "f2 verify", "f2 sign+write"
    );
    for hosts in sizes {
        let all = entries(hosts);
        let me = all.keys().nth(hosts / 2).unwrap().clone();
        let rounds = if hosts >= 100_000 { 5 } else { 21 };

        // Format 1: the whole document. Past its 8 MiB limit it cannot be published at all.
        let document =
            serde_json::to_vec_pretty(&support::release(FORMAT_VERSION, 7, all.clone())).unwrap();
        let signatures = SignatureFile::sign(&document, &[&key])
            .render()
            .into_bytes();
        let f1_bytes = document.len() + signatures.len();
        let f1 = match verify(&document, &signatures, &trust, &context) {
            Ok(_) => {
                let times = (0..rounds)
                    .map(|_| {
                        let started = Instant::now();
                        let verified = verify(&document, &signatures, &trust, &context).unwrap();
                        std::hint::black_box(verified.only_host(&me));
                        started.elapsed()
                    })
                    .collect();
                format!("{:.2} ms", median(times))
            }
            Err(e) => format!("({})", e.code()),
        };

        // Format 2: the root, its signature, this host's piece.
        let started = Instant::now();
        let files = host_files("bench", 7, &all);
        let mut root = support::release(FORMAT_TREE, 7, BTreeMap::new());
        root.host_tree = Some(files.tree.clone());
        let mut root_bytes = serde_json::to_vec_pretty(&root).unwrap();
        root_bytes.push(b'\n');
        let root_signatures = SignatureFile::sign(&root_bytes, &[&key])
            .render()
            .into_bytes();
        let dir = tempfile::tempdir().unwrap();
        for (path, bytes) in &files.pieces {
            let path = dir.path().join(path);
            if hosts == 0 || !path.parent().unwrap().exists() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            }
            std::fs::write(path, bytes).unwrap();
        }
        let publish = started.elapsed();
        let piece = &files
            .pieces
            .iter()
            .find(|(p, _)| p.ends_with(&format!("/{me}.json")))
            .unwrap()
            .1;
        let f2_bytes = root_bytes.len() + root_signatures.len() + piece.len();
        let times = (0..rounds)
            .map(|_| {
                let started = Instant::now();
                let verified = verify(&root_bytes, &root_signatures, &trust, &context)
                    .and_then(|v| v.with_host_piece(&me, Some(piece)))
                    .unwrap();
                std::hint::black_box(verified.host(&me).unwrap());
                started.elapsed()
            })
            .collect();
        println!(
            "{hosts:>8}  {:>9} KB {f1:>11}  {:>9} KB {:>8.3} ms  {:>9.2} s",
            format!("{:.1}", f1_bytes as f64 / 1000.0),
            format!("{:.2}", f2_bytes as f64 / 1000.0),
            median(times),
            publish.as_secs_f64()
        );
    }
}
