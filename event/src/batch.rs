//! Batch verification of ed25519 signatures that sums the terms of a repeated key.
//!
//! ```text
//!  (A₁,M₁,R₁,s₁) … (Aₙ,Mₙ,Rₙ,sₙ)
//!        │  hᵢ = SHA-512(Rᵢ ‖ Aᵢ ‖ Mᵢ) mod ℓ,  zᵢ random 128-bit
//!        ▼
//!  one multiscalar multiplication over  B, R₁…Rₙ, and each distinct key once
//!        │
//!        ▼
//!  [8]·( [−Σ zᵢsᵢ]B + Σᵢ [zᵢ]Rᵢ + Σ_A [Σ_{i: Aᵢ=A} zᵢhᵢ]A ) = identity ?
//! ```
//!
//! This is the textbook cofactored batch equation; the only change is that the `A` terms of
//! one key are added into one term before the multiplication. A store or a request holds
//! many events per agent, so a batch of 256 sorted by key needs far fewer points than the
//! 2n + 1 of the term-per-signature form, and the multiplication is most of the cost.
//!
//! [`verify_one`] is the same cofactored equation for one signature. So a batch that holds
//! accepts exactly the signatures that hold one by one (except with probability about
//! 2⁻¹²⁵ over the random `zᵢ`, which come from the operating system and cannot be steered
//! by whoever wrote the signatures), and ingest, offline verify and evidence verify agree
//! on every signature whichever path checked it.
//!
//! What is rejected, as `ed25519-dalek` does: an `s` that is not a canonical scalar
//! (`s ≥ ℓ`) and an `R` that does not decode to a curve point. Keys with a small order are
//! refused earlier, when a `did:key` is parsed (see `crate::did`), because under them any
//! signature would verify.

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha512};

/// One signature to check: the key, the signed message (the DSSE PAE) and the 64 bytes.
pub type Item<'a> = (&'a VerifyingKey, &'a [u8], &'a [u8; 64]);

/// The parts of one signature that both equations use.
struct Parts {
    r: EdwardsPoint,
    s: Scalar,
    h: Scalar,
}

fn parts((key, message, sig): &Item<'_>) -> Option<Parts> {
    let r_bytes: [u8; 32] = sig[..32].try_into().ok()?;
    let s_bytes: [u8; 32] = sig[32..].try_into().ok()?;
    let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes))?;
    let r = CompressedEdwardsY(r_bytes).decompress()?;
    let mut hasher = Sha512::new();
    hasher.update(r_bytes);
    hasher.update(key.as_bytes());
    hasher.update(message);
    let mut wide = [0u8; 64];
    wide.copy_from_slice(&hasher.finalize());
    let h = Scalar::from_bytes_mod_order_wide(&wide);
    Some(Parts { r, s, h })
}

/// `true` when one signature satisfies `[8]([s]B − R − [h]A) = identity`.
pub fn verify_one(item: &Item<'_>) -> bool {
    let Some(Parts { r, s, h }) = parts(item) else {
        return false;
    };
    let minus_a = -item.0.to_edwards();
    let recomputed = EdwardsPoint::vartime_double_scalar_mul_basepoint(&h, &minus_a, &s);
    (recomputed - r).mul_by_cofactor().is_identity()
}

/// `true` when the whole batch satisfies the batch equation, that is (see the module
/// documentation) when every signature in it verifies. An empty batch holds. `false` says
/// only that at least one signature fails: use [`verify_one`] to find which.
///
/// Items of one key need not be adjacent, but the caller gains most by batching them
/// together.
pub fn verify(items: &[Item<'_>]) -> bool {
    if items.is_empty() {
        return true;
    }
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut scratch) => verify_with(items, &mut scratch),
        // Only a re-entrant call (none today) finds the buffers taken.
        Err(_) => verify_with(items, &mut Scratch::default()),
    })
}

/// The buffers of one batch, kept per thread: a verify thread checks batch after batch of
/// the same size, and reusing them spares the allocator and the kernel fresh pages.
#[derive(Default)]
struct Scratch {
    randomness: Vec<u8>,
    scalars: Vec<Scalar>,
    points: Vec<EdwardsPoint>,
    /// The distinct keys of the batch, each with the sum of its zᵢhᵢ.
    keys: Vec<([u8; 32], Scalar, EdwardsPoint)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn verify_with(items: &[Item<'_>], scratch: &mut Scratch) -> bool {
    let Scratch {
        randomness,
        scalars,
        points,
        keys,
    } = scratch;
    randomness.clear();
    randomness.resize(16 * items.len(), 0);
    scalars.clear();
    points.clear();
    keys.clear();
    if getrandom::fill(randomness).is_err() {
        // Without unpredictable weights a batch proves nothing: check one by one.
        return items.iter().all(verify_one);
    }
    let mut b_coefficient = Scalar::ZERO;
    let mut last_key: Option<usize> = None;
    for (item, weight) in items.iter().zip(randomness.chunks_exact(16)) {
        let Some(Parts { r, s, h }) = parts(item) else {
            return false;
        };
        let z = Scalar::from(u128::from_le_bytes(weight.try_into().unwrap_or([1; 16])));
        b_coefficient += z * s;
        scalars.push(z);
        points.push(r);
        let key = item.0.as_bytes();
        // Sorted input makes the previous key the usual hit; otherwise search the few seen.
        let slot = match last_key {
            Some(slot) if &keys[slot].0 == key => slot,
            _ => match keys.iter().position(|(seen, _, _)| seen == key) {
                Some(slot) => slot,
                None => {
                    keys.push((*key, Scalar::ZERO, item.0.to_edwards()));
                    keys.len() - 1
                }
            },
        };
        keys[slot].1 += z * h;
        last_key = Some(slot);
    }
    for (_, coefficient, point) in keys.iter() {
        scalars.push(*coefficient);
        points.push(*point);
    }
    scalars.push(-b_coefficient);
    points.push(ED25519_BASEPOINT_POINT);
    EdwardsPoint::vartime_multiscalar_mul(scalars.iter(), points.iter())
        .mul_by_cofactor()
        .is_identity()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};
    use proptest::prelude::*;

    fn signed(count: usize, signers: u8) -> (Vec<VerifyingKey>, Vec<Vec<u8>>, Vec<[u8; 64]>) {
        let mut keys = Vec::new();
        let mut messages = Vec::new();
        let mut sigs = Vec::new();
        for index in 0..count {
            let signing = SigningKey::from_bytes(&[(index % signers as usize) as u8 + 1; 32]);
            let message = format!("DSSEv1 event {index}").into_bytes();
            sigs.push(signing.sign(&message).to_bytes());
            keys.push(signing.verifying_key());
            messages.push(message);
        }
        (keys, messages, sigs)
    }

    fn items<'a>(keys: &'a [VerifyingKey], messages: &'a [Vec<u8>], sigs: &'a [[u8; 64]]) -> Vec<Item<'a>> {
        keys.iter()
            .zip(messages)
            .zip(sigs)
            .map(|((key, message), sig)| (key, message.as_slice(), sig))
            .collect()
    }

    #[test]
    fn honest_batches_verify_whatever_the_key_mix() {
        for signers in [1, 3, 64] {
            let (keys, messages, sigs) = signed(64, signers);
            let batch = items(&keys, &messages, &sigs);
            assert!(verify(&batch), "{signers} signers");
            assert!(batch.iter().all(verify_one));
        }
        assert!(verify(&[]));
    }

    #[test]
    fn one_bad_signature_fails_the_batch_and_only_it_fails_alone() {
        let (keys, mut messages, sigs) = signed(40, 4);
        messages[17][0] ^= 1;
        let batch = items(&keys, &messages, &sigs);
        assert!(!verify(&batch));
        let failing: Vec<usize> = (0..batch.len()).filter(|&index| !verify_one(&batch[index])).collect();
        assert_eq!(failing, vec![17]);
    }

    #[test]
    fn a_signature_under_the_wrong_key_of_the_batch_fails() {
        // Swapping keys between two signers keeps the set of keys the same, so a merged
        // coefficient that ignored which signature belongs to which key would not notice.
        let (mut keys, messages, sigs) = signed(8, 2);
        keys.swap(0, 1);
        assert!(!verify(&items(&keys, &messages, &sigs)));
    }

    #[test]
    fn non_canonical_s_and_undecodable_r_are_rejected() {
        let (keys, messages, mut sigs) = signed(4, 2);
        // s + ℓ is the same scalar mod ℓ but not canonical: malleability, refused.
        let ell: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for (byte, add) in sigs[1][32..].iter_mut().zip(ell) {
            let sum = *byte as u16 + add as u16 + carry;
            *byte = sum as u8;
            carry = sum >> 8;
        }
        let batch = items(&keys, &messages, &sigs);
        assert!(!verify(&batch));
        assert!(!verify_one(&batch[1]));
        let dalek = ed25519_dalek::Signature::from_bytes(&sigs[1]);
        assert!(ed25519_dalek::Verifier::verify(&keys[1], &messages[1], &dalek).is_err());

        let (keys, messages, mut sigs) = signed(4, 2);
        // y = 2 is not the y of any curve point.
        sigs[2][..32].copy_from_slice(&{
            let mut r = [0u8; 32];
            r[0] = 2;
            r
        });
        let batch = items(&keys, &messages, &sigs);
        assert!(!verify(&batch));
        assert!(!verify_one(&batch[2]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The batch and the one-by-one check agree with ed25519-dalek's own verification on
        /// honest signatures and on any single flipped bit of a message or signature.
        #[test]
        fn agrees_with_ed25519_dalek(count in 1usize..24, signers in 1u8..5, flip in proptest::option::of((0usize..24, 0usize..64, 0u8..8, any::<bool>()))) {
            let (keys, mut messages, mut sigs) = signed(count, signers);
            if let Some((index, byte, bit, in_sig)) = flip {
                let index = index % count;
                if in_sig {
                    sigs[index][byte] ^= 1 << bit;
                } else {
                    let len = messages[index].len();
                    messages[index][byte % len] ^= 1 << bit;
                }
            }
            let batch = items(&keys, &messages, &sigs);
            let dalek: Vec<bool> = batch
                .iter()
                .map(|(key, message, sig)| {
                    ed25519_dalek::Verifier::verify(*key, message, &ed25519_dalek::Signature::from_bytes(sig)).is_ok()
                })
                .collect();
            let ours: Vec<bool> = batch.iter().map(verify_one).collect();
            prop_assert_eq!(&ours, &dalek);
            prop_assert_eq!(verify(&batch), dalek.iter().all(|ok| *ok));
        }
    }
}
