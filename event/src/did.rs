//! `did:key` identifiers for ed25519 public keys.
//!
//! `did:key:z` + base58btc( `0xed 0x01` ‖ 32-byte public key ). The `z` is the multibase
//! prefix for base58btc and `0xed01` is the unsigned-varint multicodec for `ed25519-pub`.

/// Prefix shared by every ed25519 `did:key`.
pub const DID_KEY_PREFIX: &str = "did:key:z";
const ED25519_PUB_MULTICODEC: [u8; 2] = [0xed, 0x01];

/// Why a string is not an ed25519 `did:key`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DidError {
    #[error("`{0}` does not start with `did:key:z`")]
    Prefix(String),
    #[error("`{0}` is not valid base58btc")]
    Base58(String),
    #[error("`{0}` is not an ed25519 key (expected multicodec 0xed01 and 32 key bytes)")]
    NotEd25519(String),
    #[error("`{0}` is not a valid ed25519 point")]
    BadPoint(String),
    #[error("`{0}` is a small-order ed25519 point, under which any signature would verify")]
    WeakKey(String),
}

/// Renders a 32-byte ed25519 public key as a `did:key`.
pub fn did_from_public_key(public: &[u8; 32]) -> String {
    let mut bytes = Vec::with_capacity(34);
    bytes.extend_from_slice(&ED25519_PUB_MULTICODEC);
    bytes.extend_from_slice(public);
    format!("{DID_KEY_PREFIX}{}", bs58::encode(bytes).into_string())
}

/// Parses a `did:key` back into the 32-byte ed25519 public key it names.
///
/// The key must also be a valid curve point of large order, so a DID that parses can
/// verify signatures and nobody can sign for it without the private key.
pub fn public_key_from_did(did: &str) -> Result<[u8; 32], DidError> {
    verifying_key(did).map(|key| key.to_bytes())
}

/// The decompressed key a `did:key` names, refusing small-order points.
pub(crate) fn verifying_key(did: &str) -> Result<ed25519_dalek::VerifyingKey, DidError> {
    let bytes = key_bytes_from_did(did)?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| DidError::BadPoint(truncate(did)))?;
    if key.is_weak() {
        return Err(DidError::WeakKey(truncate(did)));
    }
    Ok(key)
}

/// The 32 key bytes a `did:key` encodes, without checking they are a curve point.
/// Cheap; use it for syntax, and [`public_key_from_did`] before verifying with the key.
pub fn key_bytes_from_did(did: &str) -> Result<[u8; 32], DidError> {
    let shown = || truncate(did);
    let encoded = did
        .strip_prefix(DID_KEY_PREFIX)
        .ok_or_else(|| DidError::Prefix(shown()))?;
    // 34 bytes in base58 is at most 47 characters; refuse anything longer before decoding.
    if encoded.len() > 48 {
        return Err(DidError::NotEd25519(shown()));
    }
    let bytes = bs58::decode(encoded)
        .into_vec()
        .map_err(|_| DidError::Base58(shown()))?;
    if bytes.len() != 34 || bytes[..2] != ED25519_PUB_MULTICODEC {
        return Err(DidError::NotEd25519(shown()));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[2..]);
    Ok(key)
}

/// Bounds how much of an attacker-supplied string ends up in an error message.
pub(crate) fn truncate(value: &str) -> String {
    const MAX: usize = 80;
    if value.len() <= MAX {
        return value.to_owned();
    }
    let mut end = MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = key.verifying_key().to_bytes();
        let did = did_from_public_key(&public);
        assert!(did.starts_with("did:key:z6Mk"), "{did}");
        assert_eq!(public_key_from_did(&did).unwrap(), public);
    }

    #[test]
    fn rejects_other_codecs_and_garbage() {
        assert!(matches!(
            public_key_from_did("did:web:example.com"),
            Err(DidError::Prefix(_))
        ));
        assert!(matches!(public_key_from_did("did:key:z0OIl"), Err(DidError::Base58(_))));
        // secp256k1 did:key (multicodec 0xe7) is refused.
        let mut other = vec![0xe7, 0x01];
        other.extend_from_slice(&[2u8; 33]);
        let did = format!("did:key:z{}", bs58::encode(other).into_string());
        assert!(matches!(public_key_from_did(&did), Err(DidError::NotEd25519(_))));
    }

    #[test]
    fn refuses_small_order_keys() {
        // The identity (y = 1) and the point of order 2 (y = −1): any signature "verifies"
        // under them, so they cannot name a signer.
        let identity = {
            let mut y = [0u8; 32];
            y[0] = 1;
            y
        };
        let mut minus_one = [0xffu8; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        for public in [identity, minus_one] {
            let did = did_from_public_key(&public);
            assert!(matches!(public_key_from_did(&did), Err(DidError::WeakKey(_))), "{did}");
            assert!(crate::verifying_key_from_did(&did).is_err());
        }
    }
}
