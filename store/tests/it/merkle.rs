//! The tree against the RFC 6962 reference vectors, and proofs for random sizes.

use custos_store::merkle::{Tree, empty_root, leaf_hash, verify_consistency, verify_inclusion};
use proptest::prelude::*;

fn hex32(text: &str) -> [u8; 32] {
    hex::decode(text).unwrap().try_into().unwrap()
}

const LEAVES: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];
const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

fn reference_tree() -> Tree {
    let mut tree = Tree::new();
    for leaf in LEAVES {
        tree.push(leaf_hash(&hex::decode(leaf).unwrap()));
    }
    tree
}

#[test]
fn roots_match_rfc6962_vectors() {
    assert_eq!(
        hex::encode(empty_root()),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let tree = reference_tree();
    for (size, root) in ROOTS.iter().enumerate() {
        assert_eq!(
            hex::encode(tree.root_at(size as u64 + 1).unwrap()),
            *root,
            "size {}",
            size + 1
        );
    }
}

#[test]
fn inclusion_proofs_match_rfc6962_vectors() {
    let tree = reference_tree();
    let cases: [(u64, &[&str]); 2] = [
        (
            0,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    for (index, expected) in cases {
        let proof = tree.inclusion_proof(index, 8).unwrap();
        let proof_hex: Vec<String> = proof.iter().map(hex::encode).collect();
        assert_eq!(proof_hex, expected, "leaf {index}");
        let leaf = leaf_hash(&hex::decode(LEAVES[index as usize]).unwrap());
        verify_inclusion(&leaf, index, 8, &proof, &hex32(ROOTS[7])).unwrap();
    }
}

#[test]
fn consistency_proofs_match_rfc6962_vectors() {
    let tree = reference_tree();
    let cases: [(u64, u64, &[&str]); 4] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    for (from, to, expected) in cases {
        let proof = tree.consistency_proof(from, to).unwrap();
        let proof_hex: Vec<String> = proof.iter().map(hex::encode).collect();
        assert_eq!(proof_hex, expected, "{from} -> {to}");
        let (first, second) = (tree.root_at(from).unwrap(), tree.root_at(to).unwrap());
        verify_consistency(from, to, &proof, &first, &second).unwrap();
    }
}

fn random_tree(leaves: &[Vec<u8>]) -> Tree {
    let mut tree = Tree::new();
    for leaf in leaves {
        tree.push(leaf_hash(leaf));
    }
    tree
}

/// The RFC 6962 definition of MTH, computed naively, as an independent reference.
fn naive_root(leaves: &[Vec<u8>]) -> [u8; 32] {
    match leaves.len() {
        0 => empty_root(),
        1 => leaf_hash(&leaves[0]),
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            custos_store::merkle::node_hash(&naive_root(&leaves[..k]), &naive_root(&leaves[k..]))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn inclusion_proofs_verify_for_random_sizes(
        leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 1..300),
        picks in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..8),
    ) {
        let tree = random_tree(&leaves);
        let n = leaves.len();
        prop_assert_eq!(tree.root(), naive_root(&leaves));
        for (size_pick, index_pick) in picks {
            let size = size_pick.index(n) as u64 + 1;
            let index = index_pick.index(size as usize) as u64;
            let proof = tree.inclusion_proof(index, size).unwrap();
            let root = tree.root_at(size).unwrap();
            prop_assert_eq!(root, naive_root(&leaves[..size as usize]));
            let leaf = leaf_hash(&leaves[index as usize]);
            prop_assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_ok());
            // Any altered hash, a wrong index or a wrong leaf must fail.
            if let Some(first) = proof.first() {
                let mut bad = proof.clone();
                bad[0] = { let mut h = *first; h[0] ^= 1; h };
                prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
            }
            let mut other = leaf;
            other[31] ^= 0x80;
            prop_assert!(verify_inclusion(&other, index, size, &proof, &root).is_err());
            if size > 1 {
                let wrong = (index + 1) % size;
                prop_assert!(verify_inclusion(&leaf, wrong, size, &proof, &root).is_err()
                    || leaves[wrong as usize] == leaves[index as usize]);
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_for_random_sizes(
        leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 1..300),
        picks in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..8),
    ) {
        let tree = random_tree(&leaves);
        let n = leaves.len();
        for (a, b) in picks {
            let to = a.index(n) as u64 + 1;
            let from = b.index(to as usize) as u64 + 1;
            let proof = tree.consistency_proof(from, to).unwrap();
            let (first, second) = (tree.root_at(from).unwrap(), tree.root_at(to).unwrap());
            prop_assert!(verify_consistency(from, to, &proof, &first, &second).is_ok());
            let mut forged = second;
            forged[0] ^= 1;
            prop_assert!(verify_consistency(from, to, &proof, &first, &forged).is_err());
            if from < to {
                let mut forged_first = first;
                forged_first[5] ^= 1;
                prop_assert!(verify_consistency(from, to, &proof, &forged_first, &second).is_err());
            }
        }
    }
}

/// The frontier (O(log n) memory) gives the same root as the full tree and the RFC 9162
/// definition at every size, including 0 and the powers of two and their neighbours.
#[test]
fn the_frontier_root_is_the_tree_root_at_every_size() {
    let leaves: Vec<Vec<u8>> = (0..300u32).map(|n| n.to_le_bytes().to_vec()).collect();
    let mut tree = Tree::new();
    let mut frontier = custos_store::merkle::Frontier::default();
    assert_eq!(frontier.root(), empty_root());
    for (count, leaf) in leaves.iter().enumerate() {
        tree.push(leaf_hash(leaf));
        frontier.push(leaf_hash(leaf));
        let size = count as u64 + 1;
        assert_eq!(frontier.size(), size);
        assert_eq!(frontier.root(), tree.root(), "size {size}");
        if size <= 70 {
            assert_eq!(frontier.root(), naive_root(&leaves[..count + 1]), "size {size}");
        }
    }
}
