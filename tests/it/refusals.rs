//! SPEC §11 on a real host: every refusal keeps the current generation, reports its reason
//! code, and fetches nothing from the cache.

use crate::common::{Channel, Fleet};
use fleet_agent::release::{
    Release, SecretKey, StorePath, FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE,
};
use fleet_tests::fixture::FixtureFleet;
use fleet_tests::git::{DaemonMode, HostileGitDaemon};
use fleet_tests::host::SimHost;
use fleet_tests::http::Mode;
use fleet_tests::nix::{nix, NixKey};
use fleet_tests::{run, run_measuring_peak};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A fleet whose host `a` runs v2 from a hand-signed release with serial 5, and has v3 in the
/// cache, signed, ready to be named by the rows.
struct Setup {
    fleet: Fleet,
    host: SimHost,
    key: SecretKey,
    base: Release,
    v2: String,
    v3: StorePath,
}

fn copy_to_cache(fleet: &Fleet, path: &str, key: &NixKey) {
    let mut c = nix();
    c.args(["copy", "--to"])
        .arg(format!(
            "file://{}?secret-key={}",
            fleet.cache_dir.display(),
            key.secret.display()
        ))
        .arg(path);
    run(c).ok();
}

fn setup(channel: Channel) -> Setup {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", channel);
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let (_, mut base) = fleet.published();
    let v2 = fleet.fleet.build("a");
    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: v3");
    let v3 = fleet.fleet.build("a");
    copy_to_cache(&fleet, &v3, &fleet.cache_key);
    let key = fleet.secret_key();
    base.serial = 5;
    base.issued_at = unix_now() - 60;
    base.expires = unix_now() + 3600;
    let (doc, sigs) = Fleet::sign(&base, &[&key]);
    fleet.publish_raw(&doc, &sigs);
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&v2);
    Setup {
        v3: StorePath::parse(&v3).unwrap(),
        fleet,
        host,
        key,
        base,
        v2,
    }
}

impl Setup {
    /// The base release moved to serial 6, naming v3: what a valid next release looks like.
    fn next(&self) -> Release {
        let mut next = self.base.clone();
        next.serial = 6;
        next.hosts.get_mut("a").unwrap().toplevel = self.v3.clone();
        next
    }

    /// Runs one cycle and checks that nothing changed and nothing was fetched from the cache.
    fn assert_refused(&self, what: &str, exit: i32, code: &str) {
        let cache_requests = self.fleet.cache_server.requests().len();
        let switches = self.host.switch_calls().len();
        let (status, outcome) = self.host.once_outcome();
        assert_eq!(status, Some(exit), "{what}: {outcome}");
        assert_eq!(outcome["code"], code, "{what}: {outcome}");
        self.host.assert_on(&self.v2);
        assert_eq!(self.host.switch_calls().len(), switches, "{what}: switched");
        assert_eq!(
            self.fleet.cache_server.requests().len(),
            cache_requests,
            "{what}: fetched from the cache: {:?}",
            self.fleet.cache_server.requests()
        );
        let state = self.host.state();
        assert_eq!(state["last_error"]["code"], code, "{what}");
        assert_eq!(state["accepted"]["serial"], 5, "{what}: the floor moved");
    }
}

#[test]
fn refusals_keep_the_generation_and_fetch_nothing() {
    let s = setup(Channel::Directory);
    let stranger = SecretKey::from_seed("ops1", [7; 32]).unwrap();
    let other = SecretKey::from_seed("evil", [8; 32]).unwrap();
    let next = s.next();
    let sign = |r: &Release| Fleet::sign(r, &[&s.key]);

    // Signatures.
    let (doc, _) = sign(&next);
    let rows: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        (
            "missing signature",
            doc.clone(),
            Vec::new(),
            "signature_missing",
        ),
        (
            "foreign key",
            doc.clone(),
            Fleet::sign(&next, &[&other]).1,
            "signature_untrusted",
        ),
        (
            "impostor key with a trusted name",
            doc.clone(),
            Fleet::sign(&next, &[&stranger]).1,
            "signature_invalid",
        ),
        (
            "corrupted signature",
            doc.clone(),
            {
                let mut sig = sign(&next).1;
                sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
                sig
            },
            "signature_invalid",
        ),
        (
            "tampered document",
            {
                let mut d = doc.clone();
                let at = d.len() / 2;
                d[at] ^= 1;
                d
            },
            sign(&next).1,
            "signature_invalid",
        ),
    ];
    for (what, doc, sigs, code) in rows {
        s.fleet.publish_raw(&doc, &sigs);
        s.assert_refused(what, 3, code);
    }

    // Contents, each properly signed.
    let mut rows: Vec<(&str, Release, &str)> = Vec::new();
    let mut lower = next.clone();
    lower.serial = 4;
    rows.push(("lower serial", lower, "serial_too_low"));
    let mut same = next.clone();
    same.serial = 5;
    rows.push(("same serial, other bytes", same, "serial_reused"));
    let mut expired = next.clone();
    expired.issued_at = unix_now() - 7200;
    expired.expires = unix_now() - 3600;
    rows.push(("expired", expired, "expired"));
    let mut lab = next.clone();
    lab.fleet = "lab".into();
    rows.push(("wrong fleet", lab, "wrong_fleet"));
    for (what, release, code) in rows {
        let (doc, sigs) = sign(&release);
        s.fleet.publish_raw(&doc, &sigs);
        s.assert_refused(what, 3, code);
    }

    // Bytes no serializer would write, signed all the same.
    let good = String::from_utf8(sign(&next).0).unwrap();
    let raw_rows: Vec<(&str, String, &str)> = vec![
        ("not JSON", "{ not json".into(), "malformed"),
        (
            "not a store path",
            good.replace(s.v3.as_str(), "/etc/passwd"),
            "malformed",
        ),
        (
            "store path escaping the store",
            good.replace(s.v3.as_str(), &format!("{}/../../../etc", s.v3)),
            "malformed",
        ),
        (
            "unknown field",
            good.replacen(
                "\"format\": 1,",
                "\"format\": 1, \"activate_anyway\": true,",
                1,
            ),
            "malformed",
        ),
    ];
    for (what, doc, code) in raw_rows {
        let doc = doc.into_bytes();
        let sigs = Fleet::sign_bytes(&doc, &[&s.key]);
        s.fleet.publish_raw(&doc, &sigs);
        s.assert_refused(what, 3, code);
    }

    // Oversized: refused by the channel before the verifier sees it.
    let huge = vec![b' '; fleet_agent::release::MAX_DOCUMENT_BYTES + 1];
    s.fleet
        .publish_raw(&huge, &Fleet::sign_bytes(&huge, &[&s.key]));
    s.assert_refused("oversized document", 1, "too_large");

    // Duplicated signature below a threshold of two.
    let second = SecretKey::from_seed("ops2", [9; 32]).unwrap();
    let keys = [s.fleet.release_public_key(), second.public().to_string()];
    s.host.write_config(
        &s.fleet
            .settings(&keys, 2, &s.fleet.channel_url(Channel::Directory)),
        "",
        "",
    );
    let (doc, _) = sign(&next);
    let doubled = [sign(&next).1, sign(&next).1].concat();
    s.fleet.publish_raw(&doc, &doubled);
    s.assert_refused(
        "one key signing twice towards a threshold of two",
        3,
        "below_threshold",
    );
    // Both keys: accepted, v3 applied.
    s.fleet
        .publish_raw(&doc, &Fleet::sign(&next, &[&s.key, &second]).1);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    s.host.assert_on(s.v3.as_str());

    // A genuine release without an entry for this host: refused, nothing changes, but its
    // serial is the fleet's newest and becomes the floor (it is authentic).
    let mut other_host = next.clone();
    other_host.serial = 7;
    let entry = other_host.hosts.remove("a").unwrap();
    other_host.hosts.insert("b".into(), entry);
    let (doc, sigs) = Fleet::sign(&other_host, &[&s.key, &second]);
    s.fleet.publish_raw(&doc, &sigs);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(3), "{outcome}");
    assert_eq!(outcome["code"], "no_host_entry");
    s.host.assert_on(s.v3.as_str());
    assert_eq!(s.host.state()["accepted"]["serial"], 7);
}

#[test]
fn freshness_refusals_keep_the_generation_and_fetch_nothing() {
    let s = setup(Channel::Directory);
    let (_, fresh_public) = s.fleet.freshness_key();
    let fresh = s.fleet.freshness_secret();
    let keys = [s.fleet.release_public_key()];
    let url = s.fleet.channel_url(Channel::Directory);
    s.host.write_config(
        &s.fleet.settings(&keys, 1, &url),
        &format!("freshness_keys = [\"{fresh_public}\"]"),
        "",
    );
    let now = unix_now();
    let (base_doc, base_sigs) = Fleet::sign(&s.base, &[&s.key]);
    let (doc, sigs) = Fleet::sign(&s.next(), &[&s.key]);
    let statement = |document: &[u8], serial, issued, expires, key| {
        Fleet::statement(document, serial, issued, expires, &[key])
    };
    let rows = [
        ("no statement", None, "freshness_missing"),
        (
            "the statement of the release before",
            Some(statement(&base_doc, 5, now - 60, now + 3600, &fresh)),
            "freshness_mismatch",
        ),
        (
            "a statement naming the serial with other bytes",
            Some(statement(&base_doc, 6, now - 60, now + 3600, &fresh)),
            "freshness_mismatch",
        ),
        (
            "an expired statement",
            Some(statement(&doc, 6, now - 7200, now - 3600, &fresh)),
            "expired",
        ),
        (
            "a statement signed by the release key",
            Some(statement(&doc, 6, now - 60, now + 3600, &s.key)),
            "freshness_untrusted",
        ),
    ];
    for (what, freshness, code) in rows {
        s.fleet.publish_raw(&doc, &sigs);
        match freshness {
            Some((statement, signatures)) => s.fleet.publish_freshness_raw(&statement, &signatures),
            None => {
                for name in [FRESHNESS_FILE, FRESHNESS_SIGNATURE_FILE] {
                    std::fs::remove_file(s.fleet.channel_dir.join(name)).ok();
                }
            }
        }
        s.assert_refused(what, 3, code);
    }
    // The freshness key cannot move the host: a release it signed, with its own statement.
    let (_, forged_sigs) = Fleet::sign(&s.next(), &[&fresh]);
    s.fleet.publish_raw(&doc, &forged_sigs);
    let (statement_bytes, signatures) = statement(&doc, 6, now - 60, now + 3600, &fresh);
    s.fleet.publish_freshness_raw(&statement_bytes, &signatures);
    s.assert_refused(
        "a release signed by the freshness key",
        3,
        "signature_untrusted",
    );
    // The current release with a valid statement: nothing refused, the host stays.
    s.fleet.publish_raw(&base_doc, &base_sigs);
    let (statement_bytes, signatures) = statement(&base_doc, 5, now - 60, now + 3600, &fresh);
    s.fleet.publish_freshness_raw(&statement_bytes, &signatures);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "up-to-date", "{outcome}");
    // And the next release with its statement moves it.
    s.fleet.publish_raw(&doc, &sigs);
    let (statement_bytes, signatures) = statement(&doc, 6, now - 60, now + 3600, &fresh);
    s.fleet.publish_freshness_raw(&statement_bytes, &signatures);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    s.host.assert_on(s.v3.as_str());
}

#[test]
fn clock_behind_the_time_floor_still_refuses_an_expired_release() {
    let s = setup(Channel::Directory);
    // A release issued "in the future" raises the host's time floor when accepted.
    let mut future = s.next();
    future.issued_at = unix_now() + 10_000;
    future.expires = future.issued_at + 10_000;
    future.hosts.get_mut("a").unwrap().toplevel = StorePath::parse(&s.v2).unwrap();
    let (doc, sigs) = Fleet::sign(&future, &[&s.key]);
    s.fleet.publish_raw(&doc, &sigs);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(s.host.state()["time_floor"], future.issued_at);
    // By this machine's clock the next release is valid; by the floor it expired long ago.
    let mut next = s.next();
    next.serial = 7;
    next.issued_at = unix_now();
    next.expires = unix_now() + 3600;
    let (doc, sigs) = Fleet::sign(&next, &[&s.key]);
    s.fleet.publish_raw(&doc, &sigs);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(3), "{outcome}");
    assert_eq!(outcome["code"], "expired");
    s.host.assert_on(&s.v2);
}

#[test]
fn hostile_http_channel_is_bounded_and_changes_nothing() {
    let s = setup(Channel::Http);
    s.host.write_config(
        &s.fleet
            .settings(&[s.fleet.release_public_key()], 1, &s.fleet.www.url()),
        "channel_timeout = \"3s\"",
        "",
    );
    let (doc, sigs) = Fleet::sign(&s.next(), &[&s.key]);
    s.fleet.publish_raw(&doc, &sigs);
    for (mode, exit, code) in [
        (Mode::Status(500), 1, "channel_unreachable"),
        (Mode::Endless, 1, "too_large"),
        (Mode::Stall, 1, "channel_timeout"),
        (Mode::Trickle, 1, "channel_timeout"),
        (Mode::RedirectLoop, 1, "channel_unreachable"),
        (Mode::Truncate, 3, "signature_invalid"),
        (Mode::Tamper, 3, "signature_invalid"),
    ] {
        s.fleet.www.set_mode(mode.clone());
        let started = std::time::Instant::now();
        s.assert_refused(&format!("{mode:?}"), exit, code);
        // Bounded in time: the 3 s channel timeout plus process start-up, not minutes.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{mode:?} took {:?}",
            started.elapsed()
        );
    }
    s.fleet.www.set_mode(Mode::Normal);
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    s.host.assert_on(s.v3.as_str());
}

#[test]
fn closures_unsigned_or_signed_by_an_untrusted_key_are_never_activated() {
    let s = setup(Channel::Directory);
    let rogue = NixKey::generate(s.fleet.dir.path(), "rogue-cache");
    let rows = [("untrusted cache key", Some(&rogue)), ("unsigned", None)];
    for (i, (what, signer)) in rows.into_iter().enumerate() {
        // A v4 that only a rogue key (or none) signed, in a cache of its own.
        let cache = s.fleet.dir.join(format!("rogue-cache-{i}"));
        let mut fixture = FixtureFleet::new(s.fleet.dir.join(format!("rogue-{i}")), &["a"]);
        fixture.set("a", |h| h.version = format!("4-{i}"));
        fixture.commit("rogue");
        let v4 = fixture.build("a");
        let mut c = nix();
        let url = match signer {
            Some(key) => format!(
                "file://{}?secret-key={}",
                cache.display(),
                key.secret.display()
            ),
            None => format!("file://{}", cache.display()),
        };
        c.args(["copy", "--to", &url, &v4]);
        run(c).ok();
        let mut release = s.next();
        release.serial = 10 + i as u64;
        release.substituters = vec![format!("file://{}", cache.display())];
        release.hosts.get_mut("a").unwrap().toplevel = StorePath::parse(&v4).unwrap();
        let (doc, sigs) = Fleet::sign(&release, &[&s.key]);
        s.fleet.publish_raw(&doc, &sigs);
        let switches = s.host.switch_calls().len();
        let (code, outcome) = s.host.once_outcome();
        assert_eq!(code, Some(1), "{what}: {outcome}");
        assert_eq!(outcome["code"], "closure_untrusted", "{what}: {outcome}");
        s.host.assert_on(&s.v2);
        assert!(
            !s.host.has(&v4),
            "{what}: the closure entered the host's store"
        );
        assert_eq!(s.host.switch_calls().len(), switches);
    }
}

#[test]
fn a_host_whose_nix_config_turns_signature_checks_off_activates_nothing() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host("a", Channel::Directory);
    let v1 = fleet.fleet.build("a");
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let mut command = host.agent(&["once", "--json"]);
    let nix_config = host
        .env()
        .into_iter()
        .find(|(k, _)| k == "NIX_CONFIG")
        .unwrap()
        .1;
    command.env("NIX_CONFIG", nix_config + "\nrequire-sigs = false");
    let out = run(command);
    assert_eq!(out.code, Some(1), "{out}");
    let outcome: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(outcome["code"], "signatures_disabled", "{outcome}");
    assert!(outcome["message"]
        .as_str()
        .unwrap()
        .contains("require-sigs = false"));
    host.assert_on(&v1);
    assert!(host.switch_calls().is_empty());
    assert!(!host.state_dir.join("gcroots/candidate").exists());
}

#[test]
fn hostile_git_over_http_is_bounded_and_changes_nothing() {
    let s = setup(Channel::Http);
    // A git channel on the hostile server, with a channel timeout longer than the stall rule.
    let channel = format!("git+{}/fleet.git", s.fleet.www.url());
    // (answer, channel_timeout, reason code, must end within seconds)
    let mut baseline = None;
    for (mode, timeout, code, within) in [
        (Mode::Status(500), "40s", "channel_unreachable", 15),
        // Garbage: refused as soon as it is not git.
        (Mode::Endless, "40s", "channel_unreachable", 15),
        // A valid ref advertisement that never ends: cut at its cap while it streams.
        (Mode::EndlessRefs, "40s", "too_large", 30),
        // An answer that stops arriving fails after the 20 s stall rule, not the 40 s timeout.
        (Mode::Stall, "40s", "channel_timeout", 35),
        // One byte a second is no stall: the poll's own timeout ends it.
        (Mode::Trickle, "8s", "channel_timeout", 20),
        (Mode::RedirectLoop, "40s", "channel_unreachable", 15),
    ] {
        s.host.write_config(
            &s.fleet
                .settings(&[s.fleet.release_public_key()], 1, &channel),
            &format!("channel_timeout = \"{timeout}\""),
            "",
        );
        s.fleet.www.set_mode(mode.clone());
        let started = std::time::Instant::now();
        let (out, peak) = run_measuring_peak(s.host.agent(&["once", "--json"]));
        let elapsed = started.elapsed();
        // The first row (an HTTP 500, nothing read) is the figure the others are held to.
        let baseline = *baseline.get_or_insert(peak);
        assert!(
            peak < baseline + 32 * 1024,
            "{mode:?}: peak RSS {peak} KiB, {baseline} KiB for a plain refusal"
        );
        let outcome: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(out.code, Some(1), "{mode:?}: {out}");
        assert_eq!(outcome["code"], code, "{mode:?}: {outcome}");
        assert!(elapsed.as_secs() < within, "{mode:?} took {elapsed:?}");
        // The fetch ended with the poll: nothing ran on into a runtime that was gone.
        assert!(
            !out.stderr.contains("panicked") && !out.stderr.contains("being shutdown"),
            "{mode:?}: {out}"
        );
        s.host.assert_on(&s.v2);
        assert_eq!(s.host.state()["last_error"]["code"], code, "{mode:?}");
    }
}

/// A host on v2 following a git channel through a hostile proxy in front of the real daemon
/// (answering normally until told otherwise), with `top` in its config.
fn behind_a_hostile_git_daemon(top: &str) -> (Setup, HostileGitDaemon) {
    let s = setup(Channel::Git);
    let hostile = HostileGitDaemon::in_front_of(&s.fleet.git_daemon);
    let channel = format!("git+{}", hostile.url("fleet.git"));
    s.host.write_config(
        &s.fleet
            .settings(&[s.fleet.release_public_key()], 1, &channel),
        top,
        "",
    );
    (s, hostile)
}

#[test]
fn hostile_git_daemons_are_bounded_and_the_next_good_answer_is_taken() {
    let (s, hostile) = behind_a_hostile_git_daemon("channel_timeout = \"40s\"");
    let channel = format!("git+{}", hostile.url("fleet.git"));
    // The peak memory of a `once` that fetched the release (in setup) without hostility, the
    // figure every hostile row is held to, plus 32 MiB.
    let (quiet, baseline) = run_measuring_peak(s.host.agent(&["once", "--json"]));
    assert_eq!(quiet.code, Some(0), "{quiet}");
    // (answer, channel_timeout, reason code, must end within seconds, the message says)
    for (mode, timeout, code, within, says) in [
        // A valid ref advertisement that never ends: cut at its 4 MiB cap while it streams.
        (
            DaemonMode::EndlessRefs,
            "40s",
            "too_large",
            30,
            "limit of 4194304 bytes",
        ),
        // Nothing after the request, or nothing after the first bytes of the pack: the 20 s
        // stall rule, not the 40 s poll timeout.
        (DaemonMode::Stall, "40s", "channel_timeout", 35, "stalled"),
        (
            DaemonMode::StallMidPack,
            "40s",
            "channel_timeout",
            35,
            "stalled",
        ),
        // A valid pack that never ends: cut at the fetch's 64 MiB cap.
        (
            DaemonMode::EndlessPack,
            "40s",
            "too_large",
            35,
            "limit of 67108864 bytes",
        ),
        // One byte a second is no stall: the poll's own timeout ends it.
        (
            DaemonMode::Trickle,
            "8s",
            "channel_timeout",
            20,
            "within 8s",
        ),
        (
            DaemonMode::HugePktLine,
            "40s",
            "channel_unreachable",
            15,
            "pkt-line",
        ),
        (
            DaemonMode::Garbage,
            "40s",
            "channel_unreachable",
            15,
            "packet length",
        ),
    ] {
        s.host.write_config(
            &s.fleet
                .settings(&[s.fleet.release_public_key()], 1, &channel),
            &format!("channel_timeout = \"{timeout}\""),
            "",
        );
        hostile.set_mode(mode);
        let started = std::time::Instant::now();
        let (out, peak) = run_measuring_peak(s.host.agent(&["once", "--json"]));
        let elapsed = started.elapsed();
        let outcome: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(out.code, Some(1), "{mode:?}: {out}");
        assert_eq!(outcome["code"], code, "{mode:?}: {outcome}");
        assert!(elapsed.as_secs() < within, "{mode:?} took {elapsed:?}");
        assert!(
            peak < baseline + 32 * 1024,
            "{mode:?}: peak RSS {peak} KiB, {baseline} KiB without hostility"
        );
        assert!(
            outcome["message"].as_str().unwrap().contains(says),
            "{mode:?}: {outcome}"
        );
        eprintln!(
            "{mode:?}: {code} after {elapsed:?}, peak RSS {peak} KiB (baseline {baseline} KiB)"
        );
        s.host.assert_on(&s.v2);
        assert_eq!(s.host.state()["last_error"]["code"], code, "{mode:?}");
    }
    // The server behaves again, with a new release (v3, pushed by fleet-sign): the host takes it.
    hostile.set_mode(DaemonMode::Normal);
    // (Above serial 5, which setup put in the directory channel only.)
    s.fleet.release(&["--serial", "6"]).ok();
    let (code, outcome) = s.host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    s.host.assert_on(s.v3.as_str());
    assert!(s.host.state().get("last_error").is_none_or(|e| e.is_null()));
}

#[test]
fn a_git_daemon_that_stops_answering_is_given_up_after_the_stall_rule() {
    let s = setup(Channel::Http);
    // A git:// server that takes the request and then sends nothing (for at most a minute).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 1024];
            let _ = std::io::Read::read(&mut stream, &mut request);
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    });
    let channel = format!("git://127.0.0.1:{port}/fleet.git");
    s.host.write_config(
        &s.fleet
            .settings(&[s.fleet.release_public_key()], 1, &channel),
        "channel_timeout = \"40s\"",
        "",
    );
    let started = std::time::Instant::now();
    let out = run(s.host.agent(&["once", "--json"]));
    let elapsed = started.elapsed();
    let outcome: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert_eq!(outcome["code"], "channel_timeout", "{outcome}");
    // The 20 s stall rule, not the 40 s poll timeout.
    assert!(elapsed.as_secs() < 35, "took {elapsed:?}: {outcome}");
    s.host.assert_on(&s.v2);
}

#[test]
fn a_daemon_polling_a_hostile_git_daemon_stays_bounded_and_takes_the_next_good_release() {
    let (s, hostile) =
        behind_a_hostile_git_daemon("poll_interval = \"1s\"\nchannel_timeout = \"10s\"");
    let log = std::fs::File::create(s.host.root.join("agent.log")).unwrap();
    let daemon = fleet_tests::KillOnDrop(s.host.agent(&["run"]).stderr(log).spawn().unwrap());
    let peak = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(s.host.root.join("agent.log"));
                panic!("the agent is not running: {log:?}")
            })
    };
    let error_code = || {
        s.host
            .state_dir
            .join("state.json")
            .exists()
            .then(|| {
                s.host.state()["last_error"]["code"]
                    .as_str()
                    .map(str::to_owned)
            })
            .flatten()
    };
    // Idle on v2 through the proxy: the daemon's own figure.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(error_code(), None);
    let baseline = peak();

    // An endless ref advertisement at every idle poll: the v2 shortcut gets no answer it can
    // read, the fetch is cut at the advertisement's cap, poll after poll.
    hostile.set_mode(DaemonMode::EndlessRefs);
    fleet_tests::wait_until("too_large from the endless advertisement", 20, || {
        error_code().as_deref() == Some("too_large")
    });
    std::thread::sleep(std::time::Duration::from_secs(5));
    // A new release behind an endless pack: cut at the fetch's cap.
    hostile.set_mode(DaemonMode::EndlessPack);
    s.fleet.release(&["--serial", "6"]).ok();
    fleet_tests::wait_until("too_large from the endless pack", 20, || {
        s.host.state()["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("67108864"))
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    s.host.assert_on(&s.v2);
    let hostile_peak = peak();
    assert!(
        hostile_peak < baseline + 32 * 1024,
        "peak RSS {hostile_peak} KiB, {baseline} KiB idle"
    );
    eprintln!("daemon peak RSS: {baseline} KiB idle, {hostile_peak} KiB under the hostile server");

    // The server behaves again: the release is taken, the error cleared.
    hostile.set_mode(DaemonMode::Normal);
    fleet_tests::wait_until("the commit of v3", 30, || {
        s.host.state()["last_good"] == s.v3.as_str()
    });
    s.host.assert_on(s.v3.as_str());
    assert_eq!(error_code(), None);
}

#[test]
fn hostile_ssh_git_servers_are_bounded_and_change_nothing() {
    let s = setup(Channel::Git);
    let ssh = fleet_tests::git::SshServer::start(&s.fleet.dir.join("sshd"));
    let channel = format!("git+{}", ssh.url(&s.fleet.git_remote));
    let credentials = format!(
        "channel_timeout = \"40s\"\nssh_key_file = \"{}\"\nssh_known_hosts_file = \"{}\"",
        ssh.client_key.display(),
        ssh.known_hosts.display()
    );
    s.host.write_config(
        &s.fleet
            .settings(&[s.fleet.release_public_key()], 1, &channel),
        &credentials,
        "",
    );
    let (quiet, baseline) = run_measuring_peak(s.host.agent(&["once", "--json"]));
    assert_eq!(quiet.code, Some(0), "{quiet}");
    // (the server's command, reason code, must end within seconds, the message says)
    for (command, code, within, says) in [
        // One valid ref pkt-line after another, forever.
        (
            "yes 003d0000000000000000000000000000000000000001 refs/heads/xxxx",
            "too_large",
            30,
            "limit of 4194304 bytes",
        ),
        // Logged in, then silent: the stall rule, not the 40 s poll timeout.
        ("sleep 60", "channel_timeout", 35, "stalled"),
        ("echo this is not git", "channel_unreachable", 15, ""),
    ] {
        ssh.force_command(Some(command));
        let started = std::time::Instant::now();
        let (out, peak) = run_measuring_peak(s.host.agent(&["once", "--json"]));
        let elapsed = started.elapsed();
        let outcome: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(out.code, Some(1), "{command}: {out}");
        assert_eq!(outcome["code"], code, "{command}: {outcome}");
        assert!(
            outcome["message"].as_str().unwrap().contains(says),
            "{command}: {outcome}"
        );
        assert!(elapsed.as_secs() < within, "{command} took {elapsed:?}");
        assert!(
            peak < baseline + 32 * 1024,
            "{command}: peak RSS {peak} KiB, {baseline} KiB without hostility"
        );
        eprintln!(
            "{command}: {code} after {elapsed:?}, peak RSS {peak} KiB (baseline {baseline} KiB)"
        );
        s.host.assert_on(&s.v2);
    }
}
