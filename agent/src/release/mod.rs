//! The signed release: its document, keys, signature file and verifier (pure code, no I/O).
//!
//! A release is two files published side by side:
//!
//! ```text
//! release.json       the document: exact bytes, JSON, at most MAX_DOCUMENT_BYTES
//! release.json.sig   one line per signature: "<key name>:<base64 of 64 signature bytes>"
//! ```
//!
//! Each signature is ed25519 over `DOMAIN || document bytes`, where [`DOMAIN`] is
//! `b"fleet-release-v1\0"`. Nix's narinfo signatures sign a fingerprint starting `1;/nix/store/`,
//! so the two can never be confused even when an operator reuses a key by mistake.
//! `docs/release-format.md` is the full description; this module is its implementation.

mod document;
mod freshness;
mod hosts;
mod keys;
pub mod merkle;
mod signatures;
mod verify;

#[cfg(test)]
mod tests;

pub use document::{
    is_valid_name, HostEntry, HostTree, Release, Rollout, Source, StorePath, FORMAT_TREE,
    FORMAT_VERSION, MAX_HOSTS, MAX_TREE_HOSTS, MAX_WAVES,
};
pub use freshness::{
    freshness_message, verify_freshness, Fresh, Statement, FRESHNESS_DOMAIN, FRESHNESS_FILE,
    FRESHNESS_SIGNATURE_FILE, MAX_FRESHNESS_BYTES, MAX_FRESHNESS_LIFETIME,
};
pub use hosts::{
    host_files, host_leaf, host_piece_path, HostFiles, HostList, HostPiece, HOSTS_FILE,
    MAX_HOST_LIST_BYTES, MAX_HOST_PIECE_BYTES,
};
pub use keys::{KeyError, PublicKey, SecretKey};
pub use signatures::{Signature, SignatureFile};
pub use verify::{
    verify, Accepted, Digest, TrustPolicy, VerifiedRelease, VerifyContext, VerifyError,
};

/// Bytes prepended to the document before signing and verifying.
pub const DOMAIN: &[u8] = b"fleet-release-v1\0";
/// The largest document accepted: room for well over 10,000 hosts.
pub const MAX_DOCUMENT_BYTES: usize = 8 << 20;
/// The largest signature file accepted.
pub const MAX_SIGNATURE_FILE_BYTES: usize = 64 << 10;
/// The most signature lines a signature file may hold.
pub const MAX_SIGNATURES: usize = 64;
/// File name of the document in a channel.
pub const DOCUMENT_FILE: &str = "release.json";
/// File name of the signatures in a channel.
pub const SIGNATURE_FILE: &str = "release.json.sig";

/// The message an ed25519 signature covers: the domain prefix, then the document's exact bytes.
pub fn signed_message(document: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN.len() + document.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(document);
    message
}
