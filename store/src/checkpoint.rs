//! C2SP `tlog-checkpoint` bodies in C2SP `signed-note` form, signed with ed25519.
//!
//! ```text
//! <origin>\n<tree size>\n<base64 root hash>\n
//! \n
//! — <key name> <base64(key id[4] ‖ ed25519 signature[64])>\n
//! ```
//! The key id is the first four bytes of `SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)`, and
//! the verifier key is published as `<name>+<hex key id>+<base64(0x01 ‖ public key)>`.

use base64::Engine as _;
use ed25519_dalek::Verifier as _;
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Signature type byte for ed25519 in the signed-note format.
const ED25519_TYPE: u8 = 0x01;

/// The signed content of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// Why a checkpoint note was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("note is not `body`, blank line, signature lines: {0}")]
    Shape(String),
    #[error("checkpoint body is malformed: {0}")]
    Body(String),
    #[error("no signature by key `{0}` on the note")]
    NoSignature(String),
    #[error("the signature by `{0}` does not verify")]
    BadSignature(String),
    #[error("verifier key `{0}` is malformed")]
    BadVerifierKey(String),
}

impl Checkpoint {
    /// The note body, ending in a newline.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let lines: Vec<&str> = body.strip_suffix('\n').unwrap_or(body).split('\n').collect();
        let [origin, size, root, ..] = lines.as_slice() else {
            return Err(NoteError::Body("fewer than three lines".into()));
        };
        if origin.is_empty() {
            return Err(NoteError::Body("empty origin".into()));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| NoteError::Body(format!("tree size `{size}` is not a decimal integer")))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| NoteError::Body(format!("root `{root}` is not a base64 SHA-256 hash")))?;
        Ok(Checkpoint {
            origin: (*origin).to_owned(),
            size,
            root,
        })
    }
}

/// An ed25519 note signer/verifier identity: a key name and public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteKey {
    pub name: String,
    pub public: [u8; 32],
}

impl NoteKey {
    pub fn key_id(&self) -> [u8; 4] {
        let mut hasher = Sha256::new();
        hasher.update(self.name.as_bytes());
        hasher.update(b"\n");
        hasher.update([ED25519_TYPE]);
        hasher.update(self.public);
        let digest = hasher.finalize();
        [digest[0], digest[1], digest[2], digest[3]]
    }

    /// `<name>+<hex key id>+<base64(0x01 ‖ public key)>`.
    pub fn verifier_string(&self) -> String {
        let mut typed = vec![ED25519_TYPE];
        typed.extend_from_slice(&self.public);
        format!("{}+{}+{}", self.name, hex::encode(self.key_id()), B64.encode(typed))
    }

    pub fn parse_verifier(text: &str) -> Result<Self, NoteError> {
        let bad = || NoteError::BadVerifierKey(text.trim().to_owned());
        // Key names cannot contain `+`; the base64 key data can.
        let mut parts = text.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let typed = B64.decode(key).map_err(|_| bad())?;
        let [ED25519_TYPE, rest @ ..] = typed.as_slice() else {
            return Err(bad());
        };
        let public: [u8; 32] = rest.try_into().map_err(|_| bad())?;
        let note_key = NoteKey {
            name: name.to_owned(),
            public,
        };
        if hex::encode(note_key.key_id()) != id {
            return Err(bad());
        }
        Ok(note_key)
    }
}

/// Signs a note body (which must end in a newline) with `key`, named `name`.
pub fn sign_note(body: &str, name: &str, key: &custos_event::AgentKey) -> String {
    let note_key = NoteKey {
        name: name.to_owned(),
        public: key.public_key(),
    };
    let mut blob = note_key.key_id().to_vec();
    blob.extend_from_slice(&key.sign_raw(body.as_bytes()));
    format!("{body}\n\u{2014} {name} {}\n", B64.encode(blob))
}

/// Splits a signed note into its body and its signature lines.
fn split_note(note: &str) -> Result<(&str, Vec<&str>), NoteError> {
    let Some(split) = note.find("\n\n") else {
        return Err(NoteError::Shape("no blank line between body and signatures".into()));
    };
    let body = &note[..split + 1];
    let signatures = note[split + 2..]
        .strip_suffix('\n')
        .ok_or_else(|| NoteError::Shape("signature block does not end with a newline".into()))?;
    Ok((body, signatures.split('\n').collect()))
}

/// Verifies a checkpoint note against `key`, returning the checkpoint it signs.
/// Signatures by other keys are ignored, as the signed-note format prescribes.
pub fn verify_checkpoint(note: &str, key: &NoteKey) -> Result<Checkpoint, NoteError> {
    Checkpoint::parse_body(verify_note(note, key)?)
}

/// Verifies any signed note against `key`, returning its body (ending in a newline).
pub fn verify_note<'a>(note: &'a str, key: &NoteKey) -> Result<&'a str, NoteError> {
    let (body, lines) = split_note(note)?;
    let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key.public)
        .map_err(|_| NoteError::BadVerifierKey(key.name.clone()))?;
    let prefix = format!("\u{2014} {} ", key.name);
    let mut seen = false;
    for line in lines {
        let Some(encoded) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(blob) = B64.decode(encoded) else {
            continue;
        };
        if blob.len() != 68 || blob[..4] != key.key_id() {
            continue;
        }
        seen = true;
        let sig = ed25519_dalek::Signature::from_bytes(blob[4..].try_into().unwrap_or(&[0u8; 64]));
        if verifying.verify(body.as_bytes(), &sig).is_ok() {
            return Ok(body);
        }
    }
    if seen {
        Err(NoteError::BadSignature(key.name.clone()))
    } else {
        Err(NoteError::NoSignature(key.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let key = custos_event::AgentKey::from_seed(&[9u8; 32]);
        let checkpoint = Checkpoint {
            origin: "custos/abcd/0".into(),
            size: 42,
            root: [7u8; 32],
        };
        let note = sign_note(&checkpoint.body(), &checkpoint.origin, &key);
        let note_key = NoteKey {
            name: checkpoint.origin.clone(),
            public: key.public_key(),
        };
        assert_eq!(verify_checkpoint(&note, &note_key).unwrap(), checkpoint);
        let parsed = NoteKey::parse_verifier(&note_key.verifier_string()).unwrap();
        assert_eq!(parsed, note_key);
        let edited = note.replace("\n42\n", "\n43\n");
        assert_eq!(
            verify_checkpoint(&edited, &note_key),
            Err(NoteError::BadSignature(checkpoint.origin.clone()))
        );
        let other = NoteKey {
            name: checkpoint.origin.clone(),
            public: custos_event::AgentKey::from_seed(&[1u8; 32]).public_key(),
        };
        assert!(matches!(
            verify_checkpoint(&note, &other),
            Err(NoteError::NoSignature(_))
        ));
    }
}
