//! The RFC 9162 Merkle tree (SHA-256, `0x00` leaf and `0x01` node prefixes), with
//! inclusion and consistency proofs and their verification.
//!
//! The tree keeps every complete subtree hash (`levels[l][k]` is the root of leaves
//! `k·2^l .. (k+1)·2^l`), so a root or proof for any size costs O(log n) hashes.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// `SHA-256(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(leaf);
    hasher.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// `SHA-256("")`, the root of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Why a proof request or a proof is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProofError {
    #[error("leaf index `{index}` is not below tree size `{size}`")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("tree size `{size}` exceeds the `{have}` leaves in the log")]
    SizeOutOfRange { size: u64, have: u64 },
    #[error("consistency needs 0 < from <= to, got from `{from}` to `{to}`")]
    BadRange { from: u64, to: u64 },
    #[error("proof has the wrong number of hashes")]
    WrongLength,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
}

/// The right edge of a Merkle tree: the roots of its perfect subtrees, largest (leftmost)
/// first. Enough to append leaves and compute the RFC 9162 root in O(log n) memory, for a
/// reader that checks roots as it goes and never proves an inclusion.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash (not the leaf bytes).
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut size = self.size;
        // Each trailing 1 bit of the size is a perfect subtree the new leaf completes.
        while size & 1 == 1 {
            if let Some(left) = self.peaks.pop() {
                node = node_hash(&left, &node);
            }
            size >>= 1;
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The tree head's root: the peaks folded from the right, `H(p0, H(p1, … p_last))`.
    pub fn root(&self) -> Hash {
        match self.peaks.split_last() {
            None => empty_root(),
            Some((last, rest)) => rest.iter().rev().fold(*last, |right, left| node_hash(left, &right)),
        }
    }
}

/// An append-only Merkle tree over leaf hashes.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |leaves| leaves.len() as u64)
    }

    /// Appends a leaf hash (not the leaf bytes).
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut level = 0;
        while self.levels[level].len().is_multiple_of(2) {
            let nodes = &self.levels[level];
            let parent = node_hash(&nodes[nodes.len() - 2], &nodes[nodes.len() - 1]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
        }
    }

    /// Every complete subtree hash, by level: `levels()[l][k]` is the root of leaves
    /// `k·2^l .. (k+1)·2^l`.
    pub fn levels(&self) -> &[Vec<Hash>] {
        &self.levels
    }

    /// The tree of `size` leaves whose complete subtree hashes are `levels` (as
    /// [`Tree::levels`] gives them). `None` when a level has too few hashes; extra ones
    /// are dropped. The hashes are taken as they are: the caller vouches for them (a
    /// signed cache), and roots are checked against signed checkpoints after.
    pub fn from_levels(mut levels: Vec<Vec<Hash>>, size: u64) -> Option<Tree> {
        let mut kept = Vec::new();
        for (level, mut hashes) in levels.drain(..).enumerate() {
            let want = usize::try_from(size.checked_shr(u32::try_from(level).ok()?)?).ok()?;
            if want == 0 {
                break;
            }
            if hashes.len() < want {
                return None;
            }
            hashes.truncate(want);
            kept.push(hashes);
        }
        let levels_needed = if size == 0 {
            0
        } else {
            64 - size.leading_zeros() as usize
        };
        if kept.len() != levels_needed {
            return None;
        }
        Some(Tree { levels: kept })
    }

    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.levels.first()?.get(usize::try_from(index).ok()?).copied()
    }

    /// Root of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        if size == 0 {
            return Ok(empty_root());
        }
        Ok(self.subtree(0, size))
    }

    pub fn root(&self) -> Hash {
        self.root_at(self.size()).unwrap_or_else(|_| empty_root())
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.size() {
            return Err(ProofError::SizeOutOfRange {
                size,
                have: self.size(),
            });
        }
        Ok(())
    }

    /// MTH of leaves `start .. end` (non-empty, inside the tree).
    fn subtree(&self, start: u64, end: u64) -> Hash {
        let count = end - start;
        if count.is_power_of_two() && start.is_multiple_of(count) {
            let level = count.trailing_zeros() as usize;
            return self.levels[level][(start >> level) as usize];
        }
        let split = largest_power_of_two_below(count);
        node_hash(&self.subtree(start, start + split), &self.subtree(start + split, end))
    }

    /// RFC 9162 §2.1.3.1 inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        if index >= size {
            return Err(ProofError::IndexOutOfRange { index, size });
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    fn path(&self, index: u64, start: u64, end: u64, proof: &mut Vec<Hash>) {
        let count = end - start;
        if count == 1 {
            return;
        }
        let split = largest_power_of_two_below(count);
        if index - start < split {
            self.path(index, start, start + split, proof);
            proof.push(self.subtree(start + split, end));
        } else {
            self.path(index, start + split, end, proof);
            proof.push(self.subtree(start, start + split));
        }
    }

    /// RFC 9162 §2.1.4.1 consistency proof between sizes `from` and `to`.
    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(to)?;
        if from == 0 || from > to {
            return Err(ProofError::BadRange { from, to });
        }
        let mut proof = Vec::new();
        if from < to {
            self.subproof(from, 0, to, true, &mut proof);
        }
        Ok(proof)
    }

    fn subproof(&self, m: u64, start: u64, end: u64, complete: bool, proof: &mut Vec<Hash>) {
        let n = end - start;
        if m == n {
            if !complete {
                proof.push(self.subtree(start, end));
            }
            return;
        }
        let k = largest_power_of_two_below(n);
        if m <= k {
            self.subproof(m, start, start + k, complete, proof);
            proof.push(self.subtree(start + k, end));
        } else {
            self.subproof(m - k, start + k, end, false, proof);
            proof.push(self.subtree(start, start + k));
        }
    }
}

/// The largest power of two strictly below `n` (n > 1).
fn largest_power_of_two_below(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// RFC 9162 §2.1.3.2: checks that `leaf` is at `index` in the tree of `size` with `root`.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: checks that the tree of `size1` with `root1` is a prefix of the tree
/// of `size2` with `root2`.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> Result<(), ProofError> {
    if size1 == 0 || size1 > size2 {
        return Err(ProofError::BadRange { from: size1, to: size2 });
    }
    if size1 == size2 {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if root1 == root2 {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(*root1);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::WrongLength);
    };
    let (mut fn_, mut sn) = (size1 - 1, size2 - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != root1 || &sr != root2 {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}
