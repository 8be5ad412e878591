//! `fleet-agent` on simulated hosts: real chroot stores, a real binary cache over loopback HTTP,
//! real channels, the fixture's `switch-to-configuration`.

use crate::common::{Channel, Fleet};

#[test]
fn happy_path_over_each_channel() {
    for channel in [
        Channel::Directory,
        Channel::Http,
        Channel::Git,
        Channel::GitFile,
    ] {
        let mut fleet = Fleet::new(&["a"]);
        let host = fleet.host("a", channel);
        let v1 = fleet.fleet.build("a");
        host.assert_on(&v1);

        fleet.fleet.set("a", |h| h.version = "2".into());
        fleet.fleet.commit("a: version 2");
        fleet.release(&[]).ok();
        let v2 = fleet.fleet.build("a");
        assert_ne!(v1, v2);

        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0), "{channel:?}: {outcome}");
        assert_eq!(outcome["outcome"], "committed", "{channel:?}: {outcome}");
        assert_eq!(outcome["toplevel"], v2.as_str());
        host.assert_on(&v2);
        assert_eq!(
            host.switch_calls(),
            [format!("test {v2}"), format!("boot {v2}")],
            "{channel:?}"
        );
        assert_eq!(host.generation_count(), 2);
        assert!(host.has(&v2));
        // The closure came from the cache over HTTP.
        assert!(!fleet.cache_server.requests_matching(".narinfo").is_empty());
        assert!(!fleet.cache_server.requests_matching("/nar/").is_empty());

        // Polling again changes nothing.
        let (code, outcome) = host.once_outcome();
        assert_eq!(code, Some(0));
        assert_eq!(outcome["outcome"], "up-to-date", "{channel:?}: {outcome}");
        assert_eq!(host.switch_calls().len(), 2);
        let state = host.state();
        assert_eq!(state["last_good"], v2.as_str());
        assert_eq!(state["accepted"]["serial"], 1);
        assert_eq!(state["phase"]["phase"], "idle");
    }
}
