//! Release format 2 on real hosts: a signed root with a Merkle tree over the host entries, one
//! piece per host. Each host fetches the root and its own piece, nothing of the other hosts.

use crate::common::{Channel, Fleet};
use fleet_agent::release::{DOCUMENT_FILE, HOSTS_FILE};

fn json(out: &fleet_tests::Run) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn format_two_reaches_hosts_over_each_channel_with_their_own_piece_only() {
    for channel in [Channel::Directory, Channel::Http, Channel::Git] {
        let mut fleet = Fleet::new(&["a", "b"]);
        let a = fleet.host("a", channel);
        for host in ["a", "b"] {
            fleet.fleet.set(host, |h| h.version = "2".into());
        }
        fleet.fleet.commit("v2");
        fleet.release(&["--format", "2"]).ok();
        let v2 = fleet.fleet.build("a");

        // The root names no host; the pieces and the list sit beside it.
        let root: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fleet.channel_dir.join(DOCUMENT_FILE)).unwrap())
                .unwrap();
        assert_eq!(root["format"], 2);
        assert_eq!(root["host_tree"]["count"], 2);
        assert!(root.get("hosts").is_none(), "{root}");
        for file in ["hosts/1/a.json", "hosts/1/b.json", HOSTS_FILE] {
            assert!(fleet.channel_dir.join(file).exists(), "{file}");
        }

        let (code, outcome) = a.once_outcome();
        assert_eq!(code, Some(0), "{channel:?}: {outcome}");
        assert_eq!(outcome["outcome"], "committed", "{channel:?}: {outcome}");
        a.assert_on(&v2);
        if channel == Channel::Http {
            // The root, its signatures and host a's piece (the health window polls the root
            // again): nothing of host b, not the list.
            let mut asked = fleet.www.requests();
            asked.sort();
            asked.dedup();
            assert_eq!(
                asked,
                ["/hosts/1/a.json", "/release.json", "/release.json.sig"]
            );
        }
        let (code, outcome) = a.once_outcome();
        assert_eq!(code, Some(0));
        assert_eq!(outcome["outcome"], "up-to-date", "{channel:?}: {outcome}");
    }
}

#[test]
fn format_two_keeps_other_hosts_entries_verifies_and_refuses_a_foreign_piece() {
    let mut fleet = Fleet::new(&["a", "b"]);
    let a = fleet.host("a", Channel::Directory);
    for host in ["a", "b"] {
        fleet.fleet.set(host, |h| h.version = "2".into());
    }
    fleet.fleet.commit("v2");
    fleet.release(&["--format", "2"]).ok();
    let b2 = fleet.fleet.build("b");
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");

    // Only a changes in release 2: b keeps its entry, read from the list of release 1.
    fleet.fleet.set("a", |h| h.version = "3".into());
    fleet.fleet.commit("a: 3");
    fleet.release(&["--format", "2", "--on", "a"]).ok();
    let a3 = fleet.fleet.build("a");
    let dir = fleet.channel_dir.display().to_string();
    let verified = fleet.verify(&dir, &["--fleet", "home", "--host", "b", "--json"]);
    let verified = json(&verified);
    assert_eq!(verified["release"]["serial"], 2);
    assert_eq!(verified["release"]["hosts"]["b"]["toplevel"], b2.as_str());
    assert_eq!(verified["release"]["hosts"]["a"]["toplevel"], a3.as_str());
    // The previous release's pieces stay for hosts that read its root a moment ago.
    assert!(fleet.channel_dir.join("hosts/1/a.json").exists());
    assert!(fleet.channel_dir.join("hosts/2/a.json").exists());

    // b's piece where a's should be: a proof for another host, refused, nothing fetched.
    let own = fleet.channel_dir.join("hosts/2/a.json");
    let saved = std::fs::read(&own).unwrap();
    std::fs::copy(fleet.channel_dir.join("hosts/2/b.json"), &own).unwrap();
    let cache_requests = fleet.cache_server.requests().len();
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(3), "{outcome}");
    assert_eq!(outcome["code"], "host_proof_invalid", "{outcome}");
    assert_eq!(fleet.cache_server.requests().len(), cache_requests);
    // Release 1's piece of a (a stale piece): refused too.
    std::fs::copy(fleet.channel_dir.join("hosts/1/a.json"), &own).unwrap();
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(3), "{outcome}");
    assert_eq!(outcome["code"], "host_proof_invalid", "{outcome}");
    assert_ne!(a.generation().as_deref(), Some(a3.as_str()));

    // Its own piece back: taken.
    std::fs::write(&own, saved).unwrap();
    let (code, outcome) = a.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    a.assert_on(&a3);

    // A third release prunes release 1's pieces.
    fleet.fleet.set("a", |h| h.version = "4".into());
    fleet.fleet.commit("a: 4");
    fleet.release(&["--format", "2", "--on", "a"]).ok();
    assert!(!fleet.channel_dir.join("hosts/1").exists());
    assert!(fleet.channel_dir.join("hosts/2/a.json").exists());
    assert!(fleet.channel_dir.join("hosts/3/b.json").exists());

    // The collector reads every host's report key from the list, checked against the root.
    let collector = fleet_tests::collector::Collector::start(
        &fleet.dir.join("collector.db"),
        &dir,
        &fleet.release_public_key(),
    );
    fleet_tests::wait_until("the release adopted", 10, || {
        collector.fleet()["release"]["serial"] == 3
    });
    let hosts: Vec<String> = collector.fleet()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["listed"] == true)
        .map(|h| h["host"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hosts, ["a", "b"]);
}
