//! Grows the release in a directory channel to HOSTS hosts for benchmarks (`bench/idle-poll`
//! with `HOSTS=N`): the hosts already there keep their entries, made-up hosts fill the rest,
//! and the result is signed again with KEY in FORMAT (1: every entry in the document; 2: a
//! Merkle root, `hosts/<serial>/<host>.json` pieces and `hosts.json`).
//!
//! `cargo run --release -p fleet-agent --example pad_release DIR HOSTS FORMAT KEY`

#[path = "support/mod.rs"]
mod support;

use fleet_agent::release::{
    host_files, HostEntry, Release, SecretKey, SignatureFile, StorePath, DOCUMENT_FILE,
    FORMAT_TREE, HOSTS_FILE, SIGNATURE_FILE,
};
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, hosts, format, key] = &args[..] else {
        panic!("usage: pad_release DIR HOSTS FORMAT KEY");
    };
    let dir = PathBuf::from(dir);
    let hosts: usize = hosts.parse().expect("HOSTS");
    let format: u32 = format.parse().expect("FORMAT");
    let key = SecretKey::parse(&std::fs::read_to_string(key).expect("KEY")).expect("a secret key");
    let mut release: Release =
        serde_json::from_slice(&std::fs::read(dir.join(DOCUMENT_FILE)).expect("release.json"))
            .expect("a format-1 release");
    let template = release.hosts.values().next().expect("a host").clone();
    let mut i = 0;
    while release.hosts.len() < hosts {
        i += 1;
        let hash = support::store_hash(i);
        let entry = HostEntry {
            toplevel: StorePath::parse(&format!("/nix/store/{hash}-nixos-system-pad-{i:06}"))
                .unwrap(),
            ..template.clone()
        };
        release.hosts.insert(format!("pad-{i:06}"), entry);
    }
    if format == FORMAT_TREE {
        let files = host_files(&release.fleet, release.serial, &release.hosts);
        for (path, bytes) in &files.pieces {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        std::fs::write(dir.join(HOSTS_FILE), &files.list).unwrap();
        release.hosts.clear();
        release.format = FORMAT_TREE;
        release.host_tree = Some(files.tree);
    }
    let mut document = serde_json::to_vec_pretty(&release).unwrap();
    document.push(b'\n');
    let signatures = SignatureFile::sign(&document, &[&key]).render();
    std::fs::write(dir.join(DOCUMENT_FILE), &document).unwrap();
    std::fs::write(dir.join(SIGNATURE_FILE), signatures).unwrap();
    println!(
        "{}: {hosts} hosts, format {format}, {} bytes",
        dir.join(DOCUMENT_FILE).display(),
        document.len()
    );
}
