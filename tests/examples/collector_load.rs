//! Load on `fleet-sign collect`: many hosts reporting at once (bench/collector-load runs it).
//!
//!   collector_load FLEET_SIGN HOSTS REPORTS_PER_HOST THREADS
//!
//! A release on paper names HOSTS hosts with report keys; THREADS senders each take every
//! THREADS-th host and send its reports one after another, one TCP connection per report as
//! separate hosts would. Prints throughput, latency percentiles, refusals and the collector's
//! peak RSS.

use fleet_tests::collector::{request, Collector, PaperFleet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A sender's signed reports: (body, signature header) each.
type Signed = Vec<(Vec<u8>, String)>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, program, hosts, reports, threads] = &args[..] else {
        eprintln!("usage: collector_load FLEET_SIGN HOSTS REPORTS_PER_HOST THREADS");
        std::process::exit(2);
    };
    let (hosts, reports, threads): (usize, u64, usize) = (
        hosts.parse().unwrap(),
        reports.parse().unwrap(),
        threads.parse().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let paper = Arc::new(PaperFleet::new(dir.path(), hosts));
    let collector = Collector::start_program(
        Some(program.into()),
        "127.0.0.1:0",
        &dir.path().join("fleet.db"),
        &paper.channel_dir.display().to_string(),
        &paper.release_public_key(),
    );
    // Sign everything first: the benchmark measures the collector, not the senders' signing.
    let signed: Arc<Vec<Signed>> = Arc::new(
        (0..threads)
            .map(|t| {
                (1..=reports)
                    .flat_map(|round| {
                        let paper = &paper;
                        (t..hosts)
                            .step_by(threads)
                            .map(move |i| paper.report(i, round))
                    })
                    .collect()
            })
            .collect(),
    );
    let started = Instant::now();
    let senders: Vec<_> = (0..threads)
        .map(|t| {
            let signed = signed.clone();
            let url = collector.url.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut refused = 0usize;
                for (body, signature) in &signed[t] {
                    let sent = Instant::now();
                    let (status, _) = request(
                        &url,
                        "POST",
                        "/v1/report",
                        &[("Fleet-Signature", signature)],
                        body,
                    );
                    latencies.push(sent.elapsed());
                    if status != 200 {
                        refused += 1;
                    }
                }
                (latencies, refused)
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::new();
    let mut refused = 0;
    for sender in senders {
        let (l, r) = sender.join().unwrap();
        latencies.extend(l);
        refused += r;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    let total = latencies.len();
    let stored: usize = {
        let (status, body) = collector.get("/v1/fleet");
        assert_eq!(status, 200);
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        view["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["report"]["counter"] == reports)
            .count()
    };
    let hwm = collector
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        })
        .unwrap_or_default();
    let db_bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("fleet.db"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    println!("hosts {hosts}, {reports} reports each, {threads} senders");
    println!(
        "reports {total} in {:.2} s: {:.0} reports/s; refused {refused}; hosts with their last report stored {stored}/{hosts}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3
    );
    println!(
        "collector peak RSS {} KiB; database {} KiB",
        hwm,
        db_bytes / 1024
    );
}
