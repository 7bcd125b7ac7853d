//! C2SP `tlog-witness` and `tlog-cosignature` (Ed25519, `cosignature/v1`), without I/O:
//! what a witness decides on an `add-checkpoint` request, how it cosigns, and how a log
//! or a verifier checks a cosignature.
//!
//! ```text
//!  log ── POST add-checkpoint: "old N\n" proof lines "\n" checkpoint note ──▶ witness
//!        ◀── 200: "— <witness> base64(key id ‖ u64be time ‖ sig)\n"   (cosigned)
//!        ◀── 409 text/x.tlog.size: "<latest size>\n"                  (old ≠ latest)
//!        ◀── 400 / 403 / 404 / 422                                    (bad, unsigned,
//!                                                                      unknown, inconsistent)
//!  signed message: "cosignature/v1\ntime <t>\n" ‖ checkpoint body
//! ```
//!
//! A witness remembers the latest checkpoint it cosigned per origin and only cosigns
//! checkpoints consistent with it, so a log cannot later show a shorter or different
//! history to anyone who checks with the witness (`custos verify --witness`).

use base64::Engine as _;
use ed25519_dalek::Verifier as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{NoteKey, verify_checkpoint};
use crate::merkle::{Hash, verify_consistency};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// The signature type byte of Ed25519 cosignatures (`cosignature/v1`).
pub const COSIGNATURE_TYPE: u8 = 0x04;
/// Most consistency proof lines a request may carry.
pub const MAX_PROOF_LINES: usize = 63;
/// Largest request body a witness reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A cosigner's public identity: its name and Ed25519 key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CosignerKey {
    pub name: String,
    pub public: [u8; 32],
}

/// Why a witness key or cosignature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WitnessError {
    #[error("witness key `{0}` is not `<name>+<hex key id>+<base64(0x04 ‖ key)>`")]
    BadKey(String),
    #[error("no cosignature by `{0}` on the checkpoint")]
    NoCosignature(String),
    #[error("the cosignature by `{0}` does not verify")]
    BadCosignature(String),
}

impl CosignerKey {
    /// `SHA-256(name ‖ "\n" ‖ 0x04 ‖ public key)[:4]`.
    pub fn key_id(&self) -> [u8; 4] {
        let mut hasher = Sha256::new();
        hasher.update(self.name.as_bytes());
        hasher.update(b"\n");
        hasher.update([COSIGNATURE_TYPE]);
        hasher.update(self.public);
        let digest = hasher.finalize();
        [digest[0], digest[1], digest[2], digest[3]]
    }

    /// The verifier key: `<name>+<hex key id>+<base64(0x04 ‖ public key)>`.
    pub fn vkey(&self) -> String {
        let mut typed = vec![COSIGNATURE_TYPE];
        typed.extend_from_slice(&self.public);
        format!("{}+{}+{}", self.name, hex::encode(self.key_id()), B64.encode(typed))
    }

    pub fn parse(text: &str) -> Result<Self, WitnessError> {
        let text = text.trim();
        let bad = || WitnessError::BadKey(text.to_owned());
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let typed = B64.decode(key).map_err(|_| bad())?;
        let [COSIGNATURE_TYPE, rest @ ..] = typed.as_slice() else {
            return Err(bad());
        };
        let key = CosignerKey {
            name: name.to_owned(),
            public: rest.try_into().map_err(|_| bad())?,
        };
        if name.is_empty() || hex::encode(key.key_id()) != id {
            return Err(bad());
        }
        Ok(key)
    }

    /// Checks that `note` carries a valid cosignature by this key; returns its time.
    pub fn verify(&self, note: &str) -> Result<u64, WitnessError> {
        let Some((body, signatures)) = split_note(note) else {
            return Err(WitnessError::NoCosignature(self.name.clone()));
        };
        let verifying =
            ed25519_dalek::VerifyingKey::from_bytes(&self.public).map_err(|_| WitnessError::BadKey(self.vkey()))?;
        let prefix = format!("\u{2014} {} ", self.name);
        let mut seen = false;
        for line in signatures {
            let Some(blob) = line.strip_prefix(&prefix).and_then(|encoded| B64.decode(encoded).ok()) else {
                continue;
            };
            if blob.len() != 4 + 8 + 64 || blob[..4] != self.key_id() {
                continue;
            }
            seen = true;
            let mut time = [0u8; 8];
            time.copy_from_slice(&blob[4..12]);
            let time = u64::from_be_bytes(time);
            let mut signature = [0u8; 64];
            signature.copy_from_slice(&blob[12..]);
            let message = signed_message(time, body);
            if verifying
                .verify(message.as_bytes(), &ed25519_dalek::Signature::from_bytes(&signature))
                .is_ok()
            {
                return Ok(time);
            }
        }
        Err(if seen {
            WitnessError::BadCosignature(self.name.clone())
        } else {
            WitnessError::NoCosignature(self.name.clone())
        })
    }
}

/// `cosignature/v1\ntime <t>\n` followed by the checkpoint body.
fn signed_message(time: u64, body: &str) -> String {
    format!("cosignature/v1\ntime {time}\n{body}")
}

/// A note's body (through its final newline) and its signature lines.
fn split_note(note: &str) -> Option<(&str, Vec<&str>)> {
    let split = note.find("\n\n")?;
    let body = &note[..split + 1];
    let signatures = note[split + 2..].strip_suffix('\n')?;
    Some((body, signatures.split('\n').collect()))
}

/// A witness's signing key and name.
pub struct Cosigner {
    pub key: CosignerKey,
    signing: custos_event::AgentKey,
}

impl Cosigner {
    pub fn new(name: &str, signing: custos_event::AgentKey) -> Self {
        Self {
            key: CosignerKey {
                name: name.to_owned(),
                public: signing.public_key(),
            },
            signing,
        }
    }

    /// The cosignature line (ending in a newline) on checkpoint `body` at `time`.
    pub fn cosign(&self, body: &str, time: u64) -> String {
        let signature = self.signing.sign_raw(signed_message(time, body).as_bytes());
        let mut blob = self.key.key_id().to_vec();
        blob.extend_from_slice(&time.to_be_bytes());
        blob.extend_from_slice(&signature);
        format!("\u{2014} {} {}\n", self.key.name, B64.encode(blob))
    }
}

/// A parsed `add-checkpoint` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddCheckpoint {
    pub old: u64,
    pub proof: Vec<Hash>,
    /// The checkpoint note, signatures included.
    pub note: String,
}

impl AddCheckpoint {
    /// The request body.
    pub fn encode(&self) -> String {
        let mut body = format!("old {}\n", self.old);
        for hash in &self.proof {
            body.push_str(&B64.encode(hash));
            body.push('\n');
        }
        body.push('\n');
        body.push_str(&self.note);
        body
    }

    /// Parses a request body; the error is the reason for a 400.
    pub fn parse(body: &str) -> Result<Self, String> {
        let (head, note) = body
            .split_once("\n\n")
            .ok_or("the body has no empty line before the checkpoint")?;
        let mut lines = head.split('\n');
        let old_line = lines.next().unwrap_or_default();
        let old = old_line
            .strip_prefix("old ")
            .filter(|size| *size == "0" || (!size.starts_with('0') && size.bytes().all(|byte| byte.is_ascii_digit())))
            .and_then(|size| size.parse::<u64>().ok())
            .ok_or_else(|| format!("`{old_line}` is not an old size line (`old <decimal>`)"))?;
        let mut proof = Vec::new();
        for line in lines {
            if proof.len() == MAX_PROOF_LINES {
                return Err(format!("more than {MAX_PROOF_LINES} consistency proof lines"));
            }
            let hash: Hash = B64
                .decode(line)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| format!("`{line}` is not a base64 SHA-256 hash"))?;
            proof.push(hash);
        }
        if !note.ends_with('\n') {
            return Err("the checkpoint does not end with a newline".into());
        }
        Ok(Self {
            old,
            proof,
            note: note.to_owned(),
        })
    }
}

/// The latest checkpoint a witness cosigned for one origin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    pub size: u64,
    /// base64 root hash.
    pub root: String,
    /// The checkpoint note as submitted, with the witness's cosignature appended.
    pub note: String,
}

/// What a witness answers to `add-checkpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// 200: cosigned; the new latest to persist before answering.
    Cosign { latest: Latest, line: String },
    /// 409 with `text/x.tlog.size`: the witness's latest size.
    Conflict(u64),
    /// 400, 403, 404, 422 with a reason.
    Refuse(u16, String),
}

/// Decides a request against the trusted log keys and the latest cosigned checkpoint of
/// its origin (`None`: never cosigned). `now` is the cosignature time.
pub fn decide(
    request: &AddCheckpoint,
    logs: &[NoteKey],
    latest: Option<&Latest>,
    cosigner: &Cosigner,
    now: u64,
) -> Decision {
    let origin = request.note.split('\n').next().unwrap_or_default();
    let trusted: Vec<&NoteKey> = logs.iter().filter(|key| key.name == origin).collect();
    if trusted.is_empty() {
        return Decision::Refuse(404, format!("this witness does not know the log `{origin}`"));
    }
    let Some(checkpoint) = trusted
        .iter()
        .find_map(|key| verify_checkpoint(&request.note, key).ok())
    else {
        return Decision::Refuse(
            403,
            format!("the checkpoint is not signed by a key trusted for `{origin}`"),
        );
    };
    if request.old > checkpoint.size {
        return Decision::Refuse(
            400,
            format!(
                "old size {} is above the checkpoint size {}",
                request.old, checkpoint.size
            ),
        );
    }
    let latest_size = latest.map_or(0, |latest| latest.size);
    if request.old != latest_size {
        return Decision::Conflict(latest_size);
    }
    let root = B64.encode(checkpoint.root);
    match latest {
        Some(latest) if latest.size == checkpoint.size && latest.root != root => {
            return Decision::Conflict(latest_size);
        }
        Some(latest) if latest.size == checkpoint.size => {}
        Some(latest) => {
            let Some(old_root) = B64
                .decode(&latest.root)
                .ok()
                .and_then(|bytes| <Hash>::try_from(bytes).ok())
            else {
                return Decision::Refuse(422, "the witness's own record of this log is unreadable".into());
            };
            if verify_consistency(
                latest.size,
                checkpoint.size,
                &request.proof,
                &old_root,
                &checkpoint.root,
            )
            .is_err()
            {
                return Decision::Refuse(
                    422,
                    format!(
                        "the consistency proof from size {} to {} does not verify",
                        latest.size, checkpoint.size
                    ),
                );
            }
        }
        None if !request.proof.is_empty() => {
            return Decision::Refuse(422, "the proof must be empty when the old size is 0".into());
        }
        None => {}
    }
    // The cosigned message holds the note's whole body, extension lines included.
    let Some((body, _)) = split_note(&request.note) else {
        return Decision::Refuse(400, "the checkpoint is not a signed note".into());
    };
    let line = cosigner.cosign(body, now);
    Decision::Cosign {
        latest: Latest {
            size: checkpoint.size,
            root,
            note: format!("{}{line}", request.note),
        },
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Checkpoint, sign_note};
    use crate::merkle::{Tree, leaf_hash};

    fn log(size: u64, tree: &mut Tree, key: &custos_event::AgentKey) -> (NoteKey, String) {
        while tree.size() < size {
            tree.push(leaf_hash(&tree.size().to_le_bytes()));
        }
        let origin = "custos/test/0".to_owned();
        let checkpoint = Checkpoint {
            origin: origin.clone(),
            size,
            root: tree.root_at(size).unwrap(),
        };
        (
            NoteKey {
                name: origin.clone(),
                public: key.public_key(),
            },
            sign_note(&checkpoint.body(), &origin, key),
        )
    }

    #[test]
    fn a_witness_cosigns_only_what_extends_what_it_saw() {
        let log_key = custos_event::AgentKey::from_seed(&[1; 32]);
        let cosigner = Cosigner::new("witness.test/w1", custos_event::AgentKey::from_seed(&[2; 32]));
        let vkey = CosignerKey::parse(&cosigner.key.vkey()).unwrap();
        let mut tree = Tree::new();
        let (trusted, first) = log(10, &mut tree, &log_key);
        let request = AddCheckpoint {
            old: 0,
            proof: Vec::new(),
            note: first.clone(),
        };
        assert_eq!(AddCheckpoint::parse(&request.encode()).unwrap(), request);
        let Decision::Cosign { latest, line } =
            decide(&request, std::slice::from_ref(&trusted), None, &cosigner, 1_700_000_000)
        else {
            panic!("not cosigned")
        };
        assert_eq!(vkey.verify(&latest.note), Ok(1_700_000_000));
        assert!(line.starts_with("\u{2014} witness.test/w1 "));
        // The same size again is fine; an old size that is not the latest is a conflict.
        assert!(matches!(
            decide(
                &AddCheckpoint {
                    old: 10,
                    proof: vec![],
                    note: first.clone()
                },
                std::slice::from_ref(&trusted),
                Some(&latest),
                &cosigner,
                1
            ),
            Decision::Cosign { .. }
        ));
        let (_, second) = log(25, &mut tree, &log_key);
        assert_eq!(
            decide(
                &AddCheckpoint {
                    old: 0,
                    proof: vec![],
                    note: second.clone()
                },
                std::slice::from_ref(&trusted),
                Some(&latest),
                &cosigner,
                2
            ),
            Decision::Conflict(10)
        );
        let proof = tree.consistency_proof(10, 25).unwrap();
        let good = AddCheckpoint {
            old: 10,
            proof: proof.clone(),
            note: second.clone(),
        };
        assert!(matches!(
            decide(&good, std::slice::from_ref(&trusted), Some(&latest), &cosigner, 3),
            Decision::Cosign { .. }
        ));
        let mut wrong = proof;
        wrong[0][0] ^= 1;
        assert!(matches!(
            decide(
                &AddCheckpoint {
                    old: 10,
                    proof: wrong,
                    note: second.clone()
                },
                std::slice::from_ref(&trusted),
                Some(&latest),
                &cosigner,
                3
            ),
            Decision::Refuse(422, _)
        ));
        // A rewritten log of the same size: conflict.
        let other_key = custos_event::AgentKey::from_seed(&[1; 32]);
        let mut forked = Tree::new();
        forked.push(leaf_hash(b"something else"));
        let (_, fork) = log(10, &mut forked, &other_key);
        assert_eq!(
            decide(
                &AddCheckpoint {
                    old: 10,
                    proof: vec![],
                    note: fork
                },
                std::slice::from_ref(&trusted),
                Some(&latest),
                &cosigner,
                4
            ),
            Decision::Conflict(10)
        );
        // Unknown log, unsigned, old above size.
        assert!(matches!(
            decide(&request, &[], None, &cosigner, 5),
            Decision::Refuse(404, _)
        ));
        let stranger = NoteKey {
            name: trusted.name.clone(),
            public: custos_event::AgentKey::from_seed(&[9; 32]).public_key(),
        };
        assert!(matches!(
            decide(&request, &[stranger], None, &cosigner, 5),
            Decision::Refuse(403, _)
        ));
        assert!(matches!(
            decide(
                &AddCheckpoint {
                    old: 11,
                    proof: vec![],
                    note: first
                },
                &[trusted],
                None,
                &cosigner,
                5
            ),
            Decision::Refuse(400, _)
        ));
        // Parsing is strict.
        for bad in [
            "old 01\n\nx\n",
            "old -1\n\nx\n",
            "new 1\n\nx\n",
            "old 1\nnot base64!\n\nx\n",
            "old 1\nx\n",
        ] {
            assert!(AddCheckpoint::parse(bad).is_err(), "{bad:?}");
        }
        let many = format!("old 1\n{}\nx\n", vec![B64.encode([0u8; 32]); 64].join("\n") + "\n");
        assert!(AddCheckpoint::parse(&many).unwrap_err().contains("63"));
    }
}
