//! The build fallback: a host that may build evaluates the signed source commit and accepts
//! the result only when it is the store path the release names.

use crate::common::{Channel, Fleet};
use fleet_agent::release::StorePath;
use fleet_tests::nix::nix;
use fleet_tests::run;

#[test]
fn build_fallback_accepts_the_same_path_and_refuses_another() {
    let mut fleet = Fleet::new(&["a"]);
    let host = fleet.host_on_machine_store(
        "a",
        Channel::Directory,
        "realise = \"substitute-or-build\"\nuse_release_substituters = false",
    );
    fleet.fleet.set("a", |h| h.version = "2".into());
    fleet.fleet.commit("a: v2");
    fleet.release(&[]).ok();
    let v2 = fleet.fleet.build("a");
    // Gone from this machine's store and no cache configured: only a build can produce it.
    let mut delete = nix();
    delete.args(["store", "delete", &v2]);
    run(delete).ok();
    assert!(!host.has(&v2));

    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(0), "{outcome}");
    assert_eq!(outcome["outcome"], "committed");
    host.assert_on(&v2);
    assert!(host.has(&v2));
    assert!(
        fleet.cache_server.requests().is_empty(),
        "the cache was asked"
    );

    // A release naming a path the signed commit does not build: evaluation mismatch.
    let (_, mut release) = fleet.published();
    release.serial += 1;
    let fake = format!("/nix/store/{}-nixos-system-a-9", "0".repeat(32));
    release.hosts.get_mut("a").unwrap().toplevel = StorePath::parse(&fake).unwrap();
    let (doc, sigs) = Fleet::sign(&release, &[&fleet.secret_key()]);
    fleet.publish_raw(&doc, &sigs);
    let (code, outcome) = host.once_outcome();
    assert_eq!(code, Some(1), "{outcome}");
    assert_eq!(outcome["code"], "evaluation_mismatch", "{outcome}");
    host.assert_on(&v2);
    assert_eq!(host.state()["bad"]["code"], "evaluation_mismatch");
    assert_eq!(
        host.switch_calls(),
        [format!("test {v2}"), format!("boot {v2}")]
    );
}
