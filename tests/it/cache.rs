//! The binary cache as the channel (`cache+<store URL>`): `fleet-sign release` publishes the
//! signed release under `fleet/` in the cache it pushes closures to, and a host whose only
//! channel is that cache finds both there: a `file://` cache, an S3-compatible bucket (a real
//! S3 server on loopback: `fleet-test-s3`, s3s-fs) and an HTTP cache that accepts PUT.

use crate::common::{with_credentials, Fleet, S3Server, ACCESS_KEY, SECRET_KEY};
use fleet_tests::{run, Run};

/// Host config: substitute from the channel's cache alone (never the release's hints).
const CACHE_ONLY: &str = "use_release_substituters = false\n";

/// `fleet-sign release` publishing to `channel` alone (closures to the file cache).
fn release_to(fleet: &Fleet, channel: &str, extra: &[&str]) -> Run {
    let cache = format!("file://{}", fleet.cache_dir.display());
    release_with_cache(fleet, channel, Some(&cache), extra)
}

/// [`release_to`] with `--cache` given or not.
fn release_with_cache(fleet: &Fleet, channel: &str, cache: Option<&str>, extra: &[&str]) -> Run {
    let mut c = fleet_tests::command("fleet-sign");
    c.env("XDG_STATE_HOME", fleet.workstation_state())
        .arg("release")
        .args(["--fleet", "home", "--flake", &fleet.fleet.flake_ref()]);
    if let Some(cache) = cache {
        c.args(["--cache", cache]);
    }
    c.arg("--cache-key")
        .arg(&fleet.cache_key.secret)
        .args(["--channel", channel, "--key"])
        .arg(&fleet.release_key)
        .args(extra);
    run(with_credentials(c))
}

fn verify(fleet: &Fleet, channel: &str) -> serde_json::Value {
    let mut c = fleet_tests::command("fleet-sign");
    c.args(["verify", "--json", "--from", channel, "--key"])
        .arg(fleet.release_public_key());
    let out = run(with_credentials(c));
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn a_host_whose_only_channel_is_its_file_cache_moves_from_it() {
    let mut fleet = Fleet::new(&["a"]);
    let channel = format!("cache+file://{}", fleet.cache_dir.display());
    let host = fleet.host_on("a", &channel, CACHE_ONLY);
    let v1 = fleet.fleet.build("a");
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: 2");
    // No --cache: the cache channel is the cache the closures go to.
    release_with_cache(&fleet, &channel, None, &[]).ok();
    let v2 = fleet.fleet.build("a");

    // The release lies beside the cache's own files, under fleet/.
    let folder = fleet.cache_dir.join("fleet");
    assert!(fleet.cache_dir.join("nix-cache-info").exists());
    assert!(folder.join("release.json").exists() && folder.join("release.json.sig").exists());
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    host.assert_on(&v2);
    assert_ne!(v1, v2);
    // Substituted from the file cache itself: the HTTP one was never asked.
    assert!(
        fleet.cache_server.requests().is_empty(),
        "{:?}",
        fleet.cache_server.requests()
    );
}

#[test]
fn a_host_whose_only_channel_is_an_s3_bucket_moves_and_idles_on_304() {
    let s3 = S3Server::start();
    let mut fleet = Fleet::new(&["a", "b"]);
    let channel = s3.channel();
    // Debian's Nix cannot read s3:// caches: the closures come from the file cache here, the
    // release from the bucket (with current Nix, the bucket serves both).
    let top = format!(
        "{CACHE_ONLY}substituters = [\"file://{}\"]\n",
        fleet.cache_dir.display()
    );
    let host = fleet.host_on("a", &channel, &format!("{top}poll_interval = \"1s\"\n"));
    host.set_env("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    host.set_env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);

    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: 2");
    release_to(&fleet, &channel, &[]).ok();
    let v2 = fleet.fleet.build("a");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    host.assert_on(&v2);

    // An idle daemon: after its first poll, one conditional GET per poll answered 304.
    s3.clear_log();
    {
        let log = std::fs::File::create(host.root.join("agent.log")).unwrap();
        let _daemon = fleet_tests::KillOnDrop(host.agent(&["run"]).stderr(log).spawn().unwrap());
        let polls = || {
            s3.requests()
                .iter()
                .filter(|r| r.contains("release.json "))
                .count()
        };
        fleet_tests::wait_until("four polls", 20, || polls() >= 4);
    }
    let requests = s3.requests();
    let idle = &requests[requests.len().min(2)..];
    assert!(idle.len() >= 2, "{requests:?}");
    assert!(
        idle.iter().all(|r| r == "GET fleet/release.json 304"),
        "{requests:?}"
    );
    host.assert_on(&v2);

    // A bucket that refuses the document: the channel still serves release 1 whole (the
    // signature file holds both releases' signatures), fleet-sign fails and says so.
    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: 3");
    s3.refuse(&["fleet/release.json"]);
    let out = release_to(&fleet, &channel, &[]);
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("fleet/release.json"), "{out}");
    let held = verify(&fleet, &channel);
    assert_eq!(held["release"]["serial"], 1, "{held}");
    let (_, outcome) = host.once_outcome();
    assert_eq!(outcome["outcome"], "up-to-date", "{outcome}");
    host.assert_on(&v2);

    // A bucket that refuses everything: nothing is written at all.
    s3.refuse(&["fleet/"]);
    s3.clear_log();
    let out = release_to(&fleet, &channel, &[]);
    assert_ne!(out.code, Some(0), "{out}");
    let puts: Vec<String> = s3
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PUT"))
        .collect();
    assert!(puts.iter().all(|r| r.ends_with(" 403")), "{puts:?}");
    assert_eq!(verify(&fleet, &channel)["release"]["serial"], 1);

    // Taking uploads again: a format-2 release, the host fetches its own piece from the bucket.
    s3.refuse(&[]);
    s3.clear_log();
    release_to(&fleet, &channel, &["--format", "2"]).ok();
    let v3 = fleet.fleet.build("a");
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    host.assert_on(&v3);
    let serial = verify(&fleet, &channel)["release"]["serial"]
        .as_u64()
        .unwrap();
    let requests = s3.requests();
    assert!(
        requests.contains(&format!("GET fleet/hosts/{serial}/a.json 200")),
        "{requests:?}"
    );
    assert!(!requests
        .iter()
        .any(|r| r.starts_with("GET fleet/hosts/") && r.contains("/b.json")));
}

#[test]
fn an_http_cache_that_accepts_put_is_a_channel() {
    let mut fleet = Fleet::new(&["a"]);
    fleet.cache_server.accept_uploads();
    let channel = format!("cache+{}", fleet.cache_server.url());
    let host = fleet.host_on("a", &channel, CACHE_ONLY);
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: 2");
    release_to(&fleet, &channel, &[]).ok();
    let v2 = fleet.fleet.build("a");
    let puts = fleet.cache_server.requests_matching("PUT /fleet/");
    assert!(
        puts.contains(&"PUT /fleet/release.json".to_owned())
            && puts.contains(&"PUT /fleet/release.json.sig".to_owned()),
        "{puts:?}"
    );
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    host.assert_on(&v2);
    // One URL for both: the release and the closure came from the same server.
    assert!(!fleet
        .cache_server
        .requests_matching("/fleet/release.json")
        .is_empty());
    assert!(!fleet.cache_server.requests_matching(".narinfo").is_empty());
}
