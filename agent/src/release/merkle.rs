//! The Merkle tree over a release's host entries (format 2): RFC 9162's tree hash and
//! inclusion proofs (as Certificate Transparency uses them), over SHA-256.
//!
//! A leaf is `SHA-256(0x00 || leaf bytes)`, an inner node `SHA-256(0x01 || left || right)`, so
//! a leaf can never pass as a node. The tree over `n` leaves splits at the largest power of two
//! below `n`. An inclusion proof is the list of sibling hashes from the leaf up; with the leaf's
//! index and the tree size it leads to the root, or does not.

use sha2::{Digest as _, Sha256};

/// A node or leaf hash.
pub type Hash = [u8; 32];

/// The hash of a leaf holding `bytes`.
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(bytes);
    hasher.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The largest power of two below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The root of the tree over `leaves` (leaf hashes, in order) and every leaf's inclusion proof,
/// in one pass: O(n log n). `None` for no leaves.
pub fn tree(leaves: &[Hash]) -> Option<(Hash, Vec<Vec<Hash>>)> {
    if leaves.is_empty() {
        return None;
    }
    let mut proofs = vec![Vec::new(); leaves.len()];
    let root = fill(leaves, &mut proofs);
    Some((root, proofs))
}

fn fill(leaves: &[Hash], proofs: &mut [Vec<Hash>]) -> Hash {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = split(leaves.len());
    let (left_proofs, right_proofs) = proofs.split_at_mut(k);
    let left = fill(&leaves[..k], left_proofs);
    let right = fill(&leaves[k..], right_proofs);
    // Bottom-up: a sibling higher in the tree comes after the ones below it.
    left_proofs.iter_mut().for_each(|p| p.push(right));
    right_proofs.iter_mut().for_each(|p| p.push(left));
    node_hash(&left, &right)
}

/// Whether `proof` leads from `leaf` at `index` in a tree of `size` leaves to `root`
/// (RFC 9162, 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree hash by the RFC's recursive definition, to check `tree` against.
    fn reference_root(leaves: &[Hash]) -> Hash {
        if leaves.len() == 1 {
            return leaves[0];
        }
        let k = split(leaves.len());
        node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
    }

    #[test]
    fn every_proof_of_every_size_verifies_and_nothing_else_does() {
        for n in 1..=70usize {
            let leaves: Vec<Hash> = (0..n)
                .map(|i| leaf_hash(format!("host-{i}").as_bytes()))
                .collect();
            let (root, proofs) = tree(&leaves).unwrap();
            assert_eq!(root, reference_root(&leaves), "n={n}");
            let size = n as u64;
            for (i, proof) in proofs.iter().enumerate() {
                let i = i as u64;
                assert!(
                    verify_inclusion(i, size, &leaves[i as usize], proof, &root),
                    "n={n} i={i}"
                );
                // Another leaf, another index, a changed sibling, a longer or shorter proof:
                // refused. (The size is not a secret of the proof: the signed root carries it.)
                let other = leaf_hash(b"another host");
                assert!(!verify_inclusion(i, size, &other, proof, &root));
                if n > 1 {
                    assert!(!verify_inclusion(
                        (i + 1) % size,
                        size,
                        &leaves[i as usize],
                        proof,
                        &root
                    ));
                    let mut bent = proof.clone();
                    bent[0][0] ^= 1;
                    assert!(!verify_inclusion(
                        i,
                        size,
                        &leaves[i as usize],
                        &bent,
                        &root
                    ));
                    assert!(!verify_inclusion(
                        i,
                        size,
                        &leaves[i as usize],
                        &proof[1..],
                        &root
                    ));
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(!verify_inclusion(
                    i,
                    size,
                    &leaves[i as usize],
                    &longer,
                    &root
                ));
                assert!(!verify_inclusion(
                    size,
                    size,
                    &leaves[i as usize],
                    proof,
                    &root
                ));
            }
        }
    }

    #[test]
    fn a_leaf_never_passes_as_a_node() {
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let (root, _) = tree(&[a, b]).unwrap();
        // The two children's hashes as one leaf's bytes: another hash than the node's.
        let mut joined = Vec::new();
        joined.extend_from_slice(&a);
        joined.extend_from_slice(&b);
        assert_ne!(leaf_hash(&joined), root);
        assert!(!verify_inclusion(0, 1, &root, &[], &leaf_hash(&joined)));
    }
}
