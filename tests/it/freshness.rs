//! Freshness statements on real hosts (SPEC §3): a fleet kept fresh with `fleet-sign refresh`
//! alone, a host offline for longer than its release's lifetime, and what a host refuses.

use crate::common::{Channel, Fleet};
use fleet_agent::release::{StorePath, FRESHNESS_FILE};
use fleet_tests::host::SimHost;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Makes `host` trust the fleet's freshness key besides its release key.
fn trust_freshness(fleet: &Fleet, host: &SimHost, channel: Channel) {
    let keys = [fleet.release_public_key()];
    let url = fleet.channel_url(channel);
    let top = format!("freshness_keys = [\"{}\"]", fleet.freshness_key().1);
    host.write_config(&fleet.settings(&keys, 1, &url), &top, "");
}

/// The git remote's tip commit.
fn git_tip(fleet: &Fleet) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&fleet.git_remote)
        .args(["rev-parse", "refs/heads/fleet-release"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_fleet_left_alone_stays_fresh_with_refresh_alone() {
    let mut fleet = Fleet::new(&["a", "b"]);
    let a = fleet.host("a", Channel::Http);
    let b = fleet.host("b", Channel::GitFile);
    trust_freshness(&fleet, &a, Channel::Http);
    trust_freshness(&fleet, &b, Channel::GitFile);
    let (fresh_key, fresh_public) = fleet.freshness_key();

    // A release made with the freshness key carries its statement: both hosts take it.
    for host in ["a", "b"] {
        fleet.fleet.set(host, |h| h.version = "2".into());
    }
    fleet.fleet.commit("v2");
    let key_arg = fresh_key.display().to_string();
    fleet.release(&["--freshness-key", &key_arg]).ok();
    let v2 = [fleet.fleet.build("a"), fleet.fleet.build("b")];
    for (host, v2) in [(&a, &v2[0]), (&b, &v2[1])] {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{outcome}");
        assert_eq!(outcome["outcome"], "committed", "{outcome}");
        host.assert_on(v2);
    }
    let statement = std::fs::read(fleet.channel_dir.join(FRESHNESS_FILE)).unwrap();
    let issued = serde_json::from_slice::<serde_json::Value>(&statement).unwrap()["issued_at"]
        .as_u64()
        .unwrap();
    assert!(a.state()["time_floor"].as_u64().unwrap() >= issued);

    // Refreshing a young statement changes nothing: same bytes, same git tip.
    let tip = git_tip(&fleet);
    let out = fleet.refresh(&["--json"]);
    out.ok();
    let result: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for channel in result["channels"].as_array().unwrap() {
        assert_eq!(channel["refreshed"], false, "{result}");
    }
    assert_eq!(
        std::fs::read(fleet.channel_dir.join(FRESHNESS_FILE)).unwrap(),
        statement
    );
    assert_eq!(git_tip(&fleet), tip);

    // A release made without the freshness key (the key lives on another machine): hosts wait
    // for its statement and fetch nothing meanwhile.
    for host in ["a", "b"] {
        fleet.fleet.set(host, |h| h.version = "3".into());
    }
    fleet.fleet.commit("v3");
    fleet.release(&[]).ok();
    assert!(!fleet.channel_dir.join(FRESHNESS_FILE).exists());
    let cache_requests = fleet.cache_server.requests().len();
    for (host, v2) in [(&a, &v2[0]), (&b, &v2[1])] {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(3), "{outcome}");
        assert_eq!(outcome["code"], "freshness_missing", "{outcome}");
        host.assert_on(v2);
    }
    assert_eq!(fleet.cache_server.requests().len(), cache_requests);
    // `fleet-sign verify` sees the same with the freshness key, and the release alone without.
    fleet
        .verify(
            &fleet.channel_dir.display().to_string(),
            &["--freshness-key", &fresh_public],
        )
        .fails_with(3, "freshness_missing");
    fleet
        .verify(&fleet.channel_dir.display().to_string(), &[])
        .ok();

    // The cron job's refresh publishes the statement: both hosts move.
    let out = fleet.refresh(&["--json"]);
    out.ok();
    let result: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for channel in result["channels"].as_array().unwrap() {
        assert_eq!(channel["refreshed"], true, "{result}");
    }
    let v3 = [fleet.fleet.build("a"), fleet.fleet.build("b")];
    for (host, v3) in [(&a, &v3[0]), (&b, &v3[1])] {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{outcome}");
        assert_eq!(outcome["outcome"], "committed", "{outcome}");
        host.assert_on(v3);
    }
    let verified = fleet.verify(
        &fleet.git_channel(),
        &["--freshness-key", &fresh_public, "--json"],
    );
    verified.ok();
    let verified: serde_json::Value = serde_json::from_str(&verified.stdout).unwrap();
    assert!(verified["fresh_until"].as_u64().unwrap() > unix_now() + 6 * 86_400);

    // A forced refresh moves the git tip (a new statement); hosts stay where they are.
    fleet.refresh(&["--force"]).ok();
    assert_ne!(git_tip(&fleet), tip);
    for (host, v3) in [(&a, &v3[0]), (&b, &v3[1])] {
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{outcome}");
        assert_eq!(outcome["outcome"], "up-to-date", "{outcome}");
        host.assert_on(v3);
    }
}

#[test]
fn a_host_offline_longer_than_the_release_lifetime_moves_once_fresh() {
    let mut fleet = Fleet::new(&["a"]);
    let a = fleet.host("a", Channel::Directory);
    let v2 = fleet.release_change("a", |h| h.version = "2".into());
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    a.assert_on(&v2);
    trust_freshness(&fleet, &a, Channel::Directory);

    // While the host was away, v3 was released 40 days ago, valid for 30: by its own expiry
    // it is long stale, and the statement the channel holds expired two hours ago.
    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: 3");
    let v3 = fleet.fleet.build("a");
    fleet.release(&[]).ok();
    let (_, mut next) = fleet.published();
    next.serial += 1;
    next.issued_at = unix_now() - 40 * 86_400;
    next.expires = unix_now() - 10 * 86_400;
    next.hosts.get_mut("a").unwrap().toplevel = StorePath::parse(&v3).unwrap();
    let (doc, sigs) = Fleet::sign(&next, &[&fleet.secret_key()]);
    fleet.publish_raw(&doc, &sigs);
    let (statement, signatures) = Fleet::statement(
        &doc,
        next.serial,
        unix_now() - 9 * 86_400,
        unix_now() - 7200,
        &[&fleet.freshness_secret()],
    );
    fleet.publish_freshness_raw(&statement, &signatures);
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(3), "{outcome}");
    assert_eq!(outcome["code"], "expired", "{outcome}");
    let message = outcome["message"].as_str().unwrap();
    assert!(
        message.contains("freshness statement expired at") && message.contains("2h ago"),
        "{message}"
    );
    a.assert_on(&v2);
    assert_eq!(a.state()["last_error"]["code"], "expired");

    // The statement is renewed: the host moves to v3, whose own expiry passed ten days ago.
    let mut refresh = fleet_tests::command("fleet-sign");
    refresh
        .args(["refresh", "--fleet", "home", "--freshness-key"])
        .arg(fleet.freshness_key().0)
        .args(["--trusted-key", &fleet.release_public_key(), "--channel"])
        .arg(&fleet.channel_dir);
    fleet_tests::run(refresh).ok();
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed", "{outcome}");
    a.assert_on(&v3);
    assert!(a.state()["last_error"].is_null(), "{}", a.state());
}

#[test]
fn an_idle_daemon_asks_for_the_statement_only_once_it_aged() {
    let mut fleet = Fleet::new(&["a"]);
    let a = fleet.host("a", Channel::Http);
    let keys = [fleet.release_public_key()];
    let url = fleet.channel_url(Channel::Http);
    let top = format!(
        "freshness_keys = [\"{}\"]\npoll_interval = \"1s\"",
        fleet.freshness_key().1
    );
    a.write_config(&fleet.settings(&keys, 1, &url), &top, "");
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: 2");
    fleet.release(&[]).ok();
    let v2 = fleet.fleet.build("a");
    let (doc, release) = fleet.published();
    let fresh = fleet.freshness_secret();
    // A statement past half its life from the start: valid for 12 more seconds.
    let now = unix_now();
    let (statement, signatures) =
        Fleet::statement(&doc, release.serial, now - 100, now + 12, &[&fresh]);
    fleet.publish_freshness_raw(&statement, &signatures);

    let log = std::fs::File::create(a.root.join("agent.log")).unwrap();
    let _daemon = fleet_tests::KillOnDrop(a.agent(&["run"]).stderr(log).spawn().unwrap());
    let state_written = || a.state_dir.join("state.json").exists();
    fleet_tests::wait_until("the commit", 20, || {
        state_written() && a.state()["last_good"] == v2.as_str()
    });
    // Aging: every poll asks for the statement again, conditionally.
    let asked = |name: &str| fleet.www.requests_matching(name).len();
    let (polls, statements, not_modified) = (
        asked("release.json"),
        asked("freshness.json"),
        fleet.www.not_modified(),
    );
    fleet_tests::wait_until("three more polls", 15, || {
        asked("release.json") >= polls + 3
    });
    assert!(
        asked("freshness.json") >= statements + 3,
        "{:?}",
        fleet.www.requests()
    );
    assert!(fleet.www.not_modified() >= not_modified + 5);

    // Not renewed: once it expires the host refuses the release and stays where it is.
    fleet_tests::wait_until("the expiry", 20, || {
        a.state()["last_error"]["code"] == "expired"
    });
    a.assert_on(&v2);

    // Renewed for an hour: the next poll takes it, the error clears, and a young statement is
    // not asked for again.
    let now = unix_now();
    let (statement, signatures) =
        Fleet::statement(&doc, release.serial, now, now + 3600, &[&fresh]);
    fleet.publish_freshness_raw(&statement, &signatures);
    fleet_tests::wait_until("the renewal", 15, || a.state()["last_error"].is_null());
    let (polls, statements) = (asked("release.json"), asked("freshness.json"));
    fleet_tests::wait_until("three more polls", 15, || {
        asked("release.json") >= polls + 3
    });
    assert_eq!(
        asked("freshness.json"),
        statements,
        "{:?}",
        fleet.www.requests()
    );
    a.assert_on(&v2);
}

#[test]
fn the_collector_and_status_warn_before_the_statement_expires() {
    let mut fleet = Fleet::new(&["a"]);
    let _a = fleet.host("a", Channel::Directory);
    let (fresh_key, fresh_public) = fleet.freshness_key();
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: 2");
    fleet
        .release(&["--freshness-key", &fresh_key.display().to_string()])
        .ok();
    let (doc, release) = fleet.published();
    let collector = fleet_tests::collector::Collector::start_with(
        &fleet.dir.join("collector.db"),
        &fleet.channel_dir.display().to_string(),
        &fleet.release_public_key(),
        &["--freshness-key", &fresh_public],
    );
    let valid_until = || {
        let (status, body) = collector.get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix("fleet_release_valid_until_timestamp_seconds "))
            .map(|v| v.parse::<f64>().unwrap() as u64)
    };
    let status = || {
        let mut c = fleet_tests::command("fleet-sign");
        c.args(["status", "--collector", &collector.url]);
        c.env("NO_COLOR", "1");
        let out = fleet_tests::run(c);
        out.ok();
        out.stdout
    };
    // A week's statement: shown, nothing to warn about.
    let statement: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.channel_dir.join(FRESHNESS_FILE)).unwrap())
            .unwrap();
    let expires = statement["expires"].as_u64().unwrap();
    fleet_tests::wait_until("the statement read", 10, || valid_until() == Some(expires));
    let view = collector.fleet();
    assert_eq!(view["release"]["uses_freshness"], true);
    assert_eq!(view["release"]["fresh"]["expires"], expires);
    assert!(!status().contains("warning"), "{}", status());

    // Less than a quarter of its life left: status warns, with the remedy.
    let now = unix_now();
    let (s, g) = Fleet::statement(
        &doc,
        release.serial,
        now - 6 * 86_400,
        now + 3600,
        &[&fleet.freshness_secret()],
    );
    fleet.publish_freshness_raw(&s, &g);
    fleet_tests::wait_until("the short statement read", 10, || {
        valid_until() == Some(now + 3600)
    });
    let text = status();
    assert!(
        text.contains(&format!(
            "warning: the freshness statement of release {} expires at",
            release.serial
        )) && text.contains("(fleet-sign refresh)"),
        "{text}"
    );

    // None valid (it names another release): hosts refuse it, and both say so.
    let (s, g) = Fleet::statement(
        b"another release",
        release.serial,
        now,
        now + 3600,
        &[&fleet.freshness_secret()],
    );
    fleet.publish_freshness_raw(&s, &g);
    fleet_tests::wait_until("the mismatch read", 10, || valid_until() == Some(0));
    let text = status();
    assert!(
        text.contains("has no valid freshness statement: hosts refuse it"),
        "{text}"
    );
}
