//! `fleet-sign keygen / release / verify` end to end against real Nix, git and HTTP.

use crate::common::Fleet;
use fleet_tests::git::GitDaemon;
use fleet_tests::http::{HttpServer, Mode};
use fleet_tests::nix::{ChrootStore, NixKey};
use fleet_tests::{command, run, Run, TestDir};
use std::os::unix::fs::PermissionsExt as _;

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{run}"))
}

#[test]
fn release_round_trip_through_git_daemon_and_http_directory() {
    let op = Fleet::new(&["router1", "pi1", "vps1"]);
    let out = op.release(&["--json"]);
    out.ok();
    let summary = json(&out);
    assert_eq!(summary["serial"], 1);
    assert_eq!(summary["built"].as_array().unwrap().len(), 3);

    // The document names each host's real toplevel and the commit it was built from.
    let doc = op.published_json();
    for host in ["router1", "pi1", "vps1"] {
        assert_eq!(
            doc["hosts"][host]["toplevel"],
            op.fleet.build(host),
            "{host}"
        );
    }
    assert_eq!(doc["source"]["commit"], op.fleet.head());
    assert_eq!(doc["fleet"], "home");

    // Served over loopback HTTP: verify fetches exactly the two files.
    let www = HttpServer::serve(&op.channel_dir);
    let out = op.verify(&www.url(), &["--fleet", "home", "--host", "pi1", "--json"]);
    out.ok();
    let verified = json(&out);
    assert_eq!(verified["ok"], true);
    assert_eq!(verified["signed_by"], serde_json::json!(["ops1"]));
    assert_eq!(verified["release"]["serial"], 1);
    assert_eq!(www.requests(), ["/release.json", "/release.json.sig"]);

    // The same release through git daemon over loopback.
    let daemon = GitDaemon::serve(&op.dir.join("remotes"));
    let out = op.verify(&format!("git+{}", daemon.url("fleet.git")), &["--json"]);
    out.ok();
    assert_eq!(json(&out)["digest"], verified["digest"]);

    // A second release, pushed through git daemon this time, takes the next serial.
    let daemon_channel = format!("git+{}", daemon.url("fleet.git"));
    op.release_with(&[&op.release_key], &[daemon_channel], &[])
        .ok();
    let out = op.verify(&op.git_channel(), &["--json"]);
    out.ok();
    assert_eq!(json(&out)["release"]["serial"], 2);
}

#[test]
fn key_from_nix_store_generate_binary_cache_key_signs_and_verifies() {
    let op = Fleet::new(&["a"]);
    let nix_key = NixKey::generate(op.dir.path(), "ops-nix-1");
    let channels = [op.channel_dir.display().to_string()];
    op.release_with(&[&nix_key.secret], &channels, &[]).ok();
    let mut c = command("fleet-sign");
    c.args(["verify", "--from"])
        .arg(&op.channel_dir)
        .arg("--key")
        .arg(&nix_key.public);
    run(c).ok();
    // The fleet-sign key alone was not used this time: it must not verify the release.
    op.verify(op.channel_dir.to_str().unwrap(), &[])
        .fails_with(3, "not a trusted key");
}

#[test]
fn closures_land_in_the_cache_and_substitute_only_with_the_right_key() {
    let op = Fleet::new(&["a", "b"]);
    op.release(&[]).ok();
    let cache = HttpServer::serve(&op.cache_dir);
    let wrong = NixKey::generate(op.dir.path(), "other-cache");
    for host in ["a", "b"] {
        let toplevel = op.fleet.build(host);
        let hash = &toplevel["/nix/store/".len()..][..32];
        let narinfo = std::fs::read_to_string(op.cache_dir.join(format!("{hash}.narinfo")))
            .unwrap_or_else(|_| panic!("no narinfo for {host} in the cache"));
        assert!(narinfo.contains("Sig: cache-1:"), "{narinfo}");

        let store = ChrootStore::new(op.dir.join(format!("host-{host}-wrong")));
        store
            .copy_from(&cache.url(), &[wrong.public_key()], &toplevel)
            .fails_with(1, "lacks a valid signature");
        assert!(!store.has(&toplevel));

        let store = ChrootStore::new(op.dir.join(format!("host-{host}")));
        store
            .copy_from(&cache.url(), &[op.cache_key.public_key()], &toplevel)
            .ok();
        assert!(store.has(&toplevel));
    }
    assert!(!cache.requests_matching(".narinfo").is_empty());
}

#[test]
fn partial_release_carries_other_hosts_and_takes_next_serial() {
    let mut op = Fleet::new(&["a", "b"]);
    op.release(&[]).ok();
    let first = op.published_json();
    op.fleet.set("b", |h| h.version = "2".into());
    op.fleet.commit("b: version 2");
    op.release(&["--on", "b"]).ok();
    let second = op.published_json();
    assert_eq!(second["serial"], 2);
    assert_eq!(second["hosts"]["a"], first["hosts"]["a"]);
    assert_ne!(second["hosts"]["b"], first["hosts"]["b"]);
    assert_eq!(second["hosts"]["b"]["toplevel"], op.fleet.build("b"));
    assert_eq!(second["source"]["commit"], op.fleet.head());
    // The git channel got the same bytes.
    op.verify(&op.git_channel(), &["--json"]).ok();
    let git_doc = json(&op.verify(&op.git_channel(), &["--json"]));
    assert_eq!(git_doc["release"], second);
}

#[test]
fn refusals_publish_nothing() {
    let op = Fleet::new(&["a"]);
    op.release(&[]).ok();
    let before = std::fs::read(op.channel_dir.join("release.json")).unwrap();

    op.release(&["--serial", "1"])
        .fails_with(2, "serial 1 does not grow");
    op.release(&["--on", "nope"])
        .fails_with(2, "unknown host 'nope' in --on");
    op.release(&["--on", "@routers"])
        .fails_with(2, "unknown group '@routers'");
    op.release(&["--expires", "400d"])
        .fails_with(2, "outside 1m to 366d");

    std::fs::set_permissions(&op.release_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    op.release(&[]).fails_with(2, "readable by group or others");
    std::fs::set_permissions(&op.release_key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let inventory = op.fleet.dir.join("inventory.nix");
    let committed = std::fs::read_to_string(&inventory).unwrap();
    std::fs::write(&inventory, format!("{committed}# an uncommitted edit\n")).unwrap();
    op.release(&[]).fails_with(2, "uncommitted changes");
    std::fs::write(&inventory, committed).unwrap();

    assert_eq!(
        std::fs::read(op.channel_dir.join("release.json")).unwrap(),
        before
    );
    op.verify(&op.git_channel(), &["--json"]).ok();
    assert_eq!(
        json(&op.verify(&op.git_channel(), &["--json"]))["release"]["serial"],
        1
    );
}

#[test]
fn closure_not_signed_by_the_cache_key_after_the_push_is_refused() {
    let op = Fleet::new(&["a"]);
    // The cache already holds the closure, signed by another key: nix copy skips it, so the
    // cache never gets a signature by cache-1.
    let other = NixKey::generate(op.dir.path(), "old-cache");
    let mut c = fleet_tests::nix::nix();
    c.args(["copy", "--to"])
        .arg(format!(
            "file://{}?secret-key={}",
            op.cache_dir.display(),
            other.secret.display()
        ))
        .arg(op.fleet.build("a"));
    run(c).ok();
    op.release(&[]).fails_with(
        1,
        "does not hold every closure signed by cache key 'cache-1'",
    );
    assert!(!op.channel_dir.join("release.json").exists());
}

#[test]
fn tampered_channel_is_refused_by_verify_and_by_the_next_release() {
    let op = Fleet::new(&["a"]);
    op.release(&[]).ok();
    let doc_path = op.channel_dir.join("release.json");
    let original = std::fs::read(&doc_path).unwrap();
    let tampered = String::from_utf8(original.clone())
        .unwrap()
        .replace("\"serial\": 1", "\"serial\": 9");
    std::fs::write(&doc_path, tampered).unwrap();

    let out = op.verify(op.channel_dir.to_str().unwrap(), &["--json"]);
    out.fails_with(3, "signature does not match");
    assert_eq!(json(&out)["code"], "signature_invalid");
    op.release(&[])
        .fails_with(3, "does not verify with the trusted keys");
    std::fs::write(&doc_path, &original).unwrap();

    // The same checks against a hostile HTTP server.
    let www = HttpServer::serve(&op.channel_dir);
    www.set_mode(Mode::Tamper);
    op.verify(&www.url(), &[]).fails_with(3, "refused");
    www.set_mode(Mode::Truncate);
    op.verify(&www.url(), &[]).fails_with(3, "refused");
    www.set_mode(Mode::Status(500));
    op.verify(&www.url(), &[]).fails_with(1, "HTTP 500");
    www.set_mode(Mode::Endless);
    op.verify(&www.url(), &[])
        .fails_with(2, "larger than the limit");
    let out = op.verify(&www.url(), &["--json"]);
    assert_eq!(json(&out)["code"], "too_large", "{out}");
    www.set_mode(Mode::Normal);
    op.verify(&www.url(), &[]).ok();
}

#[test]
fn wrong_fleet_and_foreign_keys_are_refused_with_reason_codes() {
    let op = Fleet::new(&["a"]);
    op.release(&[]).ok();
    let from = op.channel_dir.to_str().unwrap().to_owned();
    let out = op.verify(&from, &["--fleet", "lab", "--json"]);
    out.fails_with(3, "fleet 'home'");
    assert_eq!(json(&out)["code"], "wrong_fleet");
    let out = op.verify(&from, &["--host", "ghost", "--json"]);
    out.fails_with(3, "no entry for host 'ghost'");

    let stranger = op.dir.join("stranger.sec");
    let mut keygen = command("fleet-sign");
    keygen.args(["keygen", "stranger", "--out"]).arg(&stranger);
    let stranger_pub = run(keygen).stdout.trim().to_owned();
    let mut c = command("fleet-sign");
    c.args(["verify", "--from", &from, "--key", &stranger_pub, "--json"]);
    let out = run(c);
    out.fails_with(3, "not a trusted key");
    assert_eq!(json(&out)["code"], "signature_untrusted");

    // Two keys required, one signed.
    let mut c = command("fleet-sign");
    c.args(["verify", "--from", &from, "--key", &op.release_public_key()])
        .args(["--key", &stranger_pub, "--threshold", "2", "--json"]);
    let out = run(c);
    out.fails_with(3, "2 needed");
    assert_eq!(json(&out)["code"], "below_threshold");
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = TestDir::new();
    let path = dir.join("k.sec");
    let mut c = command("fleet-sign");
    c.args(["keygen", "ops-2026", "--out"]).arg(&path);
    let out = run(c);
    out.ok();
    assert!(out.stdout.starts_with("ops-2026:"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let secret = std::fs::read_to_string(&path).unwrap();
    assert!(secret.starts_with("ops-2026:"));
    let mut c = command("fleet-sign");
    c.args(["keygen", "ops-2026", "--out"]).arg(&path);
    run(c).fails_with(2, "already exists");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);
}

#[test]
fn a_cosigned_release_reaches_hosts_only_when_the_second_key_holder_signs() {
    use crate::common::Channel;
    let mut op = Fleet::new(&["a"]);
    // A second operator with a key of their own; hosts need both.
    let second = op.dir.join("ops2.sec");
    let mut keygen = command("fleet-sign");
    keygen.args(["keygen", "ops2", "--out"]).arg(&second);
    let second_pub = run(keygen).stdout.trim().to_owned();
    let keys = [op.release_public_key(), second_pub.clone()];
    let host = op.host("a", Channel::Directory);
    let url = op.channel_url(Channel::Directory);
    host.write_config(&op.settings(&keys, 2, &url), "", "");
    let v1 = op.fleet.build("a");
    op.fleet.set("a", |h| h.version = "2".into());
    op.fleet.commit("a: v2");
    let trust = [
        "--trusted-key",
        &keys[0],
        "--trusted-key",
        &keys[1],
        "--threshold",
        "2",
    ];

    // One key holder alone cannot release without saying so...
    op.release(&trust).fails_with(2, "--cosign");
    // ...and with --cosign the release is published but not yet good enough for hosts.
    op.release(&[&trust[..], &["--cosign"]].concat()).ok();
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(3), "{outcome}");
    assert_eq!(outcome["code"], "below_threshold");
    host.assert_on(&v1);

    // A key the hosts do not trust: refused, nothing published.
    let stranger = op.dir.join("stranger.sec");
    let mut keygen = command("fleet-sign");
    keygen.args(["keygen", "stranger", "--out"]).arg(&stranger);
    run(keygen).ok();
    let signatures_before = std::fs::read(op.channel_dir.join("release.json.sig")).unwrap();
    let mut sign = command("fleet-sign");
    sign.args(["sign", "--channel", &url])
        .arg("--key")
        .arg(&stranger)
        .args(trust);
    let out = run(sign);
    out.fails_with(
        2,
        "signature_untrusted: stranger not among the keys hosts trust",
    );
    assert_eq!(
        std::fs::read(op.channel_dir.join("release.json.sig")).unwrap(),
        signatures_before
    );

    // The second key holder adds a signature to both channels.
    let mut sign = command("fleet-sign");
    sign.args(["sign", "--channel", &op.git_channel(), "--channel", &url])
        .arg("--key")
        .arg(&second)
        .args(trust);
    let out = run(sign);
    out.ok();
    assert!(
        out.stdout.contains("is complete: signed by ops1, ops2"),
        "{out}"
    );
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    host.assert_on(&op.fleet.build("a"));
    // The git channel carries the same two signatures.
    let verified = json(&op.verify(
        &op.git_channel(),
        &["--key", &second_pub, "--threshold", "2", "--json"],
    ));
    assert_eq!(verified["signed_by"], serde_json::json!(["ops1", "ops2"]));
}

#[test]
fn fleet_toml_paths_are_relative_to_the_file_wherever_fleet_sign_runs() {
    let op = Fleet::new(&["a"]);
    // Everything named as a path relative to fleet.toml: the flake as a bare directory name
    // (which Nix alone would take for a registry entry), keys and a directory channel.
    let config = op.dir.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "fleet = \"home\"\nflake = \"fleet\"\nkeys = [\"ops1.sec\"]\n\
             cache = \"file://{}\"\ncache_key = \"cache-1.sec\"\nchannels = [\"www\"]\n",
            op.cache_dir.display()
        ),
    )
    .unwrap();
    // Run from elsewhere: nothing may be taken relative to the working directory.
    let release_from_root = || {
        let mut c = command("fleet-sign");
        c.current_dir("/")
            .arg("release")
            .arg("--config")
            .arg(&config);
        run(c)
    };
    release_from_root().ok();
    let doc = op.published_json();
    assert_eq!(doc["serial"], 1);
    assert_eq!(doc["hosts"]["a"]["toplevel"], op.fleet.build("a"));

    // A flake directory that does not exist is a usage error naming it, before any build.
    std::fs::write(
        &config,
        "fleet = \"home\"\nflake = \"nowhere\"\nkeys = [\"ops1.sec\"]\ncache = \"file:///x\"\n\
         channels = [\"www\"]\n",
    )
    .unwrap();
    let out = release_from_root();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "flake directory {} does not exist",
            op.dir.join("nowhere").display()
        )),
        "{out}"
    );
    assert_eq!(op.published_json()["serial"], 1, "nothing was published");
}

#[test]
fn printing_commands_end_quietly_when_their_reader_goes() {
    use std::os::unix::process::ExitStatusExt as _;
    let op = Fleet::new(&["a"]);
    op.release(&[]).ok();
    let channel = op.channel_dir.display().to_string();
    let key = op.release_public_key();
    // The reader is gone before the command writes a byte: `fleet-sign verify … | head` where
    // head has already exited. Its end is closed before the command starts (closing it after
    // the spawn raced the command's first write, which a pipe's buffer then took whole).
    let (stdout, reader) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(reader);
    let mut c = command("fleet-sign");
    c.args(["verify", "--from", &channel, "--key", &key])
        .stdout(std::os::fd::OwnedFd::from(stdout))
        .stderr(std::process::Stdio::piped());
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(13),
        "ended by SIGPIPE ({}): {stderr}",
        out.status
    );
}

#[test]
fn systems_built_beforehand_are_released_by_path_and_still_checked_in_the_cache() {
    let mut op = Fleet::new(&["a", "b"]);
    op.release(&[]).ok();
    let b1 = op.fleet.build("b");
    // CI built a new system for a (here: the fixture build; nix build by fleet-sign is not
    // needed).
    op.fleet.set("a", |h| h.version = "2".into());
    op.fleet.commit("a: 2");
    let a2 = op.fleet.build("a");
    let out = op.release(&["--paths", &format!("a={a2}"), "--json"]);
    out.ok();
    let doc = op.published_json();
    assert_eq!(doc["serial"], 2);
    assert_eq!(doc["hosts"]["a"]["toplevel"], a2.as_str());
    assert_eq!(
        doc["hosts"]["b"]["toplevel"],
        b1.as_str(),
        "b keeps its entry"
    );
    assert_eq!(json(&out)["built"][0]["host"], "a");
    assert!(json(&out)["built"][0]["closure_size"].as_u64().unwrap() > 0);

    // Refusals publish nothing: an unknown host, a path that is no store path, the same host
    // twice, and a system in neither the local store nor the cache.
    let refusals = [
        (
            vec!["--paths".to_owned(), format!("zz={a2}")],
            Some(2),
            "unknown host 'zz'",
        ),
        (
            vec!["--paths".to_owned(), "a=/etc/passwd".to_owned()],
            Some(2),
            "--paths for host 'a'",
        ),
        (
            vec!["--paths".to_owned(), format!("a={a2},a={b1}")],
            Some(2),
            "given twice",
        ),
        (
            vec![
                "--paths".to_owned(),
                "a=/nix/store/00000000000000000000000000000000-nixos-system-a-9".to_owned(),
            ],
            Some(1),
            "refusing to publish",
        ),
        (
            vec![
                "--paths".to_owned(),
                format!("a={a2}"),
                "--on".to_owned(),
                "a".to_owned(),
            ],
            Some(2),
            "cannot be used with",
        ),
    ];
    for (extra, code, needle) in refusals {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = op.release(&extra);
        assert_eq!(out.code, code, "{extra:?}: {out}");
        assert!(out.stderr.contains(needle), "{extra:?}: {out}");
        assert_eq!(
            op.published_json()["serial"],
            2,
            "{extra:?} published nothing"
        );
    }

    // The same from a JSON file.
    op.fleet.set("b", |h| h.version = "2".into());
    op.fleet.commit("b: 2");
    let b2 = op.fleet.build("b");
    let file = op.dir.join("paths.json");
    std::fs::write(&file, format!("{{\"b\": \"{b2}\"}}")).unwrap();
    op.release(&["--paths-from", file.to_str().unwrap()]).ok();
    let doc = op.published_json();
    assert_eq!(doc["serial"], 3);
    assert_eq!(doc["hosts"]["a"]["toplevel"], a2.as_str());
    assert_eq!(doc["hosts"]["b"]["toplevel"], b2.as_str());
}

#[test]
fn a_channel_rolled_back_is_named_and_no_serial_is_issued_twice() {
    let mut op = Fleet::new(&["a"]);
    op.release(&[]).ok();
    let files = ["release.json", "release.json.sig"];
    let old: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(op.channel_dir.join(f)).unwrap())
        .collect();
    op.fleet.set("a", |h| h.version = "2".into());
    op.fleet.commit("a: v2");
    op.release(&[]).ok();
    assert_eq!(op.published_json()["serial"], 2);
    // The directory channel is restored from an old backup: it holds release 1 again.
    let roll_back = |op: &Fleet| {
        for (file, bytes) in files.iter().zip(&old) {
            std::fs::write(op.channel_dir.join(file), bytes).unwrap();
        }
    };
    roll_back(&op);
    op.fleet.set("a", |h| h.version = "3".into());
    op.fleet.commit("a: v3");
    let dir = op.channel_dir.display().to_string();
    let refused = op.release(&[]);
    refused.fails_with(2, "channel_behind");
    refused.fails_with(2, &format!("{dir} holds serial 1"));
    assert!(refused.stderr.contains("--serial 3"), "{refused}");
    // With --json, the refusal is JSON with its reason code.
    let refused = op.release(&["--json"]);
    assert_eq!(refused.code, Some(2), "{refused}");
    assert_eq!(json(&refused)["code"], "channel_behind", "{refused}");
    assert_eq!(json(&refused)["ok"], false);
    assert_eq!(op.published_json()["serial"], 1, "nothing was published");
    // Without the workstation's record, the other channel still tells.
    std::fs::remove_dir_all(op.workstation_state()).unwrap();
    op.release(&[]).fails_with(2, "channel_behind");
    // An explicit serial above every channel moves them all past it, and is recorded.
    op.release(&["--serial", "3"]).ok();
    assert_eq!(op.published_json()["serial"], 3);
    // With only the rolled-back channel to read, the workstation's record tells.
    roll_back(&op);
    let only_dir = [dir.clone()];
    op.release_with(&[&op.release_key], &only_dir, &[])
        .fails_with(2, "this workstation issued");
    assert_eq!(op.published_json()["serial"], 1, "nothing was published");
    // An explicit serial above everything known moves every channel past it.
    op.release_with(&[&op.release_key], &only_dir, &["--serial", "4"])
        .ok();
    assert_eq!(op.published_json()["serial"], 4);
    // A replay is visible from the workstation: the directory channel rolled back again.
    roll_back(&op);
    let replayed = op.verify(&dir, &["--min-serial", "4", "--json"]);
    assert_eq!(replayed.code, Some(3), "{replayed}");
    assert_eq!(json(&replayed)["code"], "serial_too_low");
    op.verify(&op.git_channel(), &["--min-serial", "3"]).ok();
    let recorded: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(op.workstation_state().join("fleet-sign/serials.json")).unwrap(),
    )
    .unwrap();
    assert!(
        recorded.as_object().unwrap().values().any(|v| v == 4),
        "{recorded}"
    );
}

#[test]
fn a_release_shows_its_progress_and_a_failing_build_shows_nix_s_output() {
    let mut op = Fleet::new(&["a", "b"]);
    op.fleet.set("b", |h| h.payload_mib = 1);
    op.fleet.commit("b: a payload");
    // Not a terminal (captured): a plain line per step, then a summary per stage.
    let out = op.release(&[]);
    out.ok();
    for host in ["a", "b"] {
        for step in ["building", "built"] {
            let line = format!("  {step} nixos-system-{host}-1\n");
            assert!(out.stderr.contains(&line), "{line:?} in\n{out}");
        }
        assert!(
            out.stderr
                .contains(&format!("  copied nixos-system-{host}-1")),
            "{out}"
        );
    }
    assert!(out.stderr.contains("  2 derivation(s) built\n"), "{out}");
    assert!(out.stderr.contains("  2 path(s) copied"), "{out}");
    let serial = op.published_json()["serial"].clone();

    // A host whose system does not build: its builder's own words and Nix's error, nothing
    // published.
    op.fleet.set("a", |h| h.behaviour = "unbuildable".into());
    op.fleet.commit("a: broken");
    let out = op.release(&[]);
    assert_ne!(out.code, Some(0), "{out}");
    for said in [
        "log line(s) of /nix/store/",
        "> evaluating the configuration of a",
        "> error: the option services.broken.enable does not exist",
        "builder for '/nix/store/",
    ] {
        assert!(out.stderr.contains(said), "{said:?} in\n{out}");
    }
    assert!(!out.stderr.contains("@nix {"), "{out}");
    assert!(
        out.stderr.contains("  failed to build nixos-system-a-1\n"),
        "{out}"
    );
    assert!(!out.stderr.contains("  built nixos-system-a-1\n"), "{out}");
    assert_eq!(op.published_json()["serial"], serial);
}
