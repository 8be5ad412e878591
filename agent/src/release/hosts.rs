//! Format 2's host entries: the signed root commits to them with a Merkle tree
//! ([`super::merkle`]); each host fetches only its own entry with its inclusion proof, so what
//! a host fetches, parses and keeps does not grow with the fleet.
//!
//! ```text
//! release.json                    the root: fleet, serial, times, source, host_tree {count, root}
//! hosts/<serial>/<host>.json      one host's piece: its entry, its leaf index, the proof
//! hosts.json                      every entry (for the collector and fleet-sign, never hosts)
//! ```
//!
//! A leaf commits to the fleet, the serial, the host's name and its entry ([`host_leaf`]), so a
//! piece from another release or for another host never proves anything under this root.

use super::document::{printable, unique_map, HostEntry, HostTree, FORMAT_TREE};
use super::merkle::{self, Hash};
use super::verify::{Digest, VerifiedRelease, VerifyError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The full list's file name in a channel.
pub const HOSTS_FILE: &str = "hosts.json";
/// The largest host piece accepted (an entry and a proof of at most 64 hashes).
pub const MAX_HOST_PIECE_BYTES: usize = 16 << 10;
/// The largest full list accepted (a million hosts).
pub const MAX_HOST_LIST_BYTES: usize = 512 << 20;

/// Where a host's piece of release `serial` is, relative to the channel.
pub fn host_piece_path(serial: u64, host: &str) -> String {
    format!("hosts/{serial}/{host}.json")
}

/// The bytes a host's leaf commits to: a fixed header, then the entry as compact JSON (written
/// by this code from validated values, so every reader computes the same bytes).
pub fn host_leaf(fleet: &str, serial: u64, host: &str, entry: &HostEntry) -> Vec<u8> {
    let mut bytes = format!("fleet-host-v1\n{fleet}\n{serial}\n{host}\n").into_bytes();
    bytes.extend(serde_json::to_vec(entry).expect("a host entry serializes"));
    bytes
}

/// One host's piece of a format-2 release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPiece {
    pub format: u32,
    pub fleet: String,
    pub serial: u64,
    pub host: String,
    pub entry: HostEntry,
    /// The leaf's position among the entries sorted by host name.
    pub index: u64,
    /// Sibling hashes from the leaf up, 64 lowercase hex digits each.
    pub proof: Vec<String>,
}

/// Every entry of a format-2 release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostList {
    pub format: u32,
    pub fleet: String,
    pub serial: u64,
    #[serde(deserialize_with = "unique_map")]
    pub hosts: BTreeMap<String, HostEntry>,
}

/// What `fleet-sign` publishes beside a format-2 root.
pub struct HostFiles {
    pub tree: HostTree,
    /// (path relative to the channel, bytes) for every host.
    pub pieces: Vec<(String, Vec<u8>)>,
    /// `hosts.json`.
    pub list: Vec<u8>,
}

fn leaves(fleet: &str, serial: u64, hosts: &BTreeMap<String, HostEntry>) -> Vec<Hash> {
    hosts
        .iter()
        .map(|(name, entry)| merkle::leaf_hash(&host_leaf(fleet, serial, name, entry)))
        .collect()
}

fn hex(hash: &Hash) -> String {
    Digest(*hash).to_string()
}

/// The tree, pieces and list for `hosts` (at least one) of release `serial` of `fleet`.
pub fn host_files(fleet: &str, serial: u64, hosts: &BTreeMap<String, HostEntry>) -> HostFiles {
    let (root, proofs) = merkle::tree(&leaves(fleet, serial, hosts)).expect("at least one host");
    let pieces = hosts
        .iter()
        .zip(proofs)
        .enumerate()
        .map(|(index, ((name, entry), proof))| {
            let piece = HostPiece {
                format: FORMAT_TREE,
                fleet: fleet.to_owned(),
                serial,
                host: name.clone(),
                entry: entry.clone(),
                index: index as u64,
                proof: proof.iter().map(hex).collect(),
            };
            let mut bytes = serde_json::to_vec(&piece).expect("a piece serializes");
            bytes.push(b'\n');
            (host_piece_path(serial, name), bytes)
        })
        .collect();
    let list = HostList {
        format: FORMAT_TREE,
        fleet: fleet.to_owned(),
        serial,
        hosts: hosts.clone(),
    };
    let mut list = serde_json::to_vec(&list).expect("a host list serializes");
    list.push(b'\n');
    HostFiles {
        tree: HostTree {
            count: hosts.len() as u64,
            root: hex(&root),
        },
        pieces,
        list,
    }
}

impl VerifiedRelease {
    /// A format-2 release with `host`'s entry, proven by its piece. `None`: the channel has no
    /// piece for the host, so the release (still authentic: its serial and time count) has no
    /// entry for it, and [`VerifiedRelease::host`] says so. A format-1 release is returned as
    /// it is: its document named every host.
    pub fn with_host_piece(
        mut self,
        host: &str,
        piece: Option<&[u8]>,
    ) -> Result<Self, VerifyError> {
        let Some(tree) = self.release.host_tree.clone() else {
            return Ok(self);
        };
        let serial = self.release.serial;
        let invalid = |why: String| VerifyError::HostProofInvalid {
            host: host.to_owned(),
            serial,
            why,
        };
        let Some(bytes) = piece else {
            return Ok(self);
        };
        if bytes.len() > MAX_HOST_PIECE_BYTES {
            return Err(invalid(format!(
                "it is {} bytes, the limit is {MAX_HOST_PIECE_BYTES}",
                bytes.len()
            )));
        }
        let piece: HostPiece = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if piece.format != FORMAT_TREE
            || piece.fleet != self.release.fleet
            || piece.serial != serial
        {
            return Err(invalid(format!(
                "it is from format {} release {} of fleet '{}'",
                piece.format,
                piece.serial,
                printable(&piece.fleet)
            )));
        }
        if piece.host != host {
            return Err(invalid(format!(
                "it is the entry of host '{}'",
                printable(&piece.host)
            )));
        }
        piece.entry.validate(host).map_err(invalid)?;
        let proof: Vec<Hash> = piece
            .proof
            .iter()
            .map(|h| Digest::from_hex(h).map(|d| d.0))
            .collect::<Option<_>>()
            .ok_or_else(|| invalid("a proof hash is not 64 lowercase hex digits".into()))?;
        let root = Digest::from_hex(&tree.root).expect("validated").0;
        let leaf = merkle::leaf_hash(&host_leaf(&self.release.fleet, serial, host, &piece.entry));
        if !merkle::verify_inclusion(piece.index, tree.count, &leaf, &proof, &root) {
            return Err(invalid(
                "its proof does not lead to the signed host tree root".into(),
            ));
        }
        self.release.hosts.insert(host.to_owned(), piece.entry);
        Ok(self)
    }

    /// A format-2 release with every entry, from `hosts.json`, checked against the signed root
    /// (for the collector and fleet-sign, which need them all). Format 1: returned as it is.
    pub fn with_all_hosts(mut self, list: Option<&[u8]>) -> Result<Self, VerifyError> {
        let Some(tree) = self.release.host_tree.clone() else {
            return Ok(self);
        };
        let invalid = |why: String| VerifyError::HostListInvalid(why);
        let list = list.ok_or_else(|| invalid(format!("the channel has no {HOSTS_FILE}")))?;
        if list.len() > MAX_HOST_LIST_BYTES {
            return Err(invalid(format!(
                "{HOSTS_FILE} is {} bytes, the limit is {MAX_HOST_LIST_BYTES}",
                list.len()
            )));
        }
        let list: HostList = serde_json::from_slice(list).map_err(|e| invalid(e.to_string()))?;
        if list.format != FORMAT_TREE
            || list.fleet != self.release.fleet
            || list.serial != self.release.serial
        {
            return Err(invalid(format!(
                "{HOSTS_FILE} is from format {} release {} of fleet '{}'",
                list.format,
                list.serial,
                printable(&list.fleet)
            )));
        }
        for (name, entry) in &list.hosts {
            entry.validate(name).map_err(invalid)?;
        }
        let root =
            merkle::tree(&leaves(&list.fleet, list.serial, &list.hosts)).map(|(r, _)| hex(&r));
        if list.hosts.len() as u64 != tree.count || root.as_deref() != Some(tree.root.as_str()) {
            return Err(invalid(format!(
                "its {} entries do not make the signed host tree",
                list.hosts.len()
            )));
        }
        self.release.hosts = list.hosts;
        Ok(self)
    }

    /// Whether this release names its hosts in a host tree (format 2).
    pub fn has_host_tree(&self) -> bool {
        self.release.host_tree.is_some()
    }
}
