//! Decoding and signature verification of envelopes.
//!
//! The order is fixed and documented in `docs/reason-codes.md`: size, envelope structure,
//! base64, payload type, key id, then the signature (batched), and only then is the signed
//! payload parsed. Nothing from an unverified payload is trusted or interpreted.

use ed25519_dalek::VerifyingKey;
use rayon::prelude::*;

use crate::did::truncate;
use crate::dsse::{CONTROL_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE, Envelope, WireEnvelope, decode_base64};
use crate::payload::Payload;
use crate::reason::{Reason, Rejection};

/// An envelope that passed structural checks, with its key parsed (and decompressed).
#[derive(Clone, Debug)]
pub struct Decoded {
    pub envelope: Envelope,
    pub key: VerifyingKey,
}

/// Parsed `did:key`s, so a busy agent's key is decoded and decompressed once, not per event.
///
/// Bounded: when it holds `capacity` keys it starts over.
#[derive(Debug)]
pub struct KeyCache {
    keys: std::sync::RwLock<std::collections::HashMap<String, VerifyingKey>>,
    capacity: usize,
}

impl KeyCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            keys: std::sync::RwLock::new(std::collections::HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The verifying key a `did:key` names.
    pub fn get(&self, did: &str) -> Result<VerifyingKey, crate::did::DidError> {
        if let Some(key) = self.keys.read().ok().and_then(|keys| keys.get(did).copied()) {
            return Ok(key);
        }
        let key = verifying_key_from_did(did)?;
        if let Ok(mut keys) = self.keys.write() {
            if keys.len() >= self.capacity {
                keys.clear();
            }
            keys.insert(did.to_owned(), key);
        }
        Ok(key)
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        Self::new(1 << 20)
    }
}

/// The verifying key a `did:key` names.
pub fn verifying_key_from_did(did: &str) -> Result<VerifyingKey, crate::did::DidError> {
    crate::did::verifying_key(did)
}

/// An envelope whose signature verified and whose payload is a valid event by its signer.
#[derive(Clone, Debug)]
pub struct Verified {
    pub envelope: Envelope,
    pub payload: Payload,
    /// blake3 of the payload bytes.
    pub digest: [u8; 32],
}

/// How many signatures go into one `verify_batch` call.
pub const BATCH: usize = 256;

/// Decodes one wire envelope. `max_bytes` bounds the whole envelope as received.
///
/// `allowed_types` lists the accepted `payloadType`s (ingest accepts only events).
pub fn decode_envelope(raw: &[u8], max_bytes: usize, allowed_types: &[&str]) -> Result<Decoded, Rejection> {
    decode_envelope_cached(raw, max_bytes, allowed_types, None)
}

/// [`decode_envelope`], looking keys up in `cache` when given.
pub fn decode_envelope_cached(
    raw: &[u8],
    max_bytes: usize,
    allowed_types: &[&str],
    cache: Option<&KeyCache>,
) -> Result<Decoded, Rejection> {
    if raw.len() > max_bytes {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("envelope is {} bytes; the limit is {max_bytes}", raw.len()),
        ));
    }
    let wire: WireEnvelope = serde_json::from_slice(raw)
        .map_err(|error| Rejection::new(Reason::Malformed, format!("not a DSSE envelope: {error}")))?;
    let [signature] = wire.signatures.as_slice() else {
        return Err(Rejection::new(
            Reason::Malformed,
            format!("expected exactly one signature, found {}", wire.signatures.len()),
        ));
    };
    let payload =
        decode_base64(&wire.payload).ok_or_else(|| Rejection::new(Reason::BadBase64, "`payload` is not base64"))?;
    let sig_bytes = decode_base64(&signature.sig).ok_or_else(|| {
        Rejection::new(
            Reason::BadBase64,
            format!("`sig` `{}` is not base64", truncate(&signature.sig)),
        )
    })?;
    let sig: [u8; 64] = sig_bytes.as_slice().try_into().map_err(|_| {
        Rejection::new(
            Reason::BadSignature,
            format!("`sig` decodes to {} bytes; an ed25519 signature is 64", sig_bytes.len()),
        )
    })?;
    if !allowed_types.contains(&wire.payload_type.as_str()) {
        return Err(Rejection::new(
            Reason::WrongPayloadType,
            format!(
                "`payloadType` is `{}`; expected `{}`",
                truncate(&wire.payload_type),
                allowed_types.join("` or `")
            ),
        ));
    }
    let key = match cache {
        Some(cache) => cache.get(&signature.keyid),
        None => verifying_key_from_did(&signature.keyid),
    }
    .map_err(|error| Rejection::new(Reason::BadKeyid, format!("`keyid`: {error}")))?;
    Ok(Decoded {
        envelope: Envelope {
            payload_type: wire.payload_type,
            payload,
            keyid: signature.keyid.clone(),
            sig,
        },
        key,
    })
}

/// The payload types a Custos log holds.
pub const LOG_PAYLOAD_TYPES: [&str; 2] = [EVENT_PAYLOAD_TYPE, CONTROL_PAYLOAD_TYPE];

/// Verifies many signatures: batches of [`BATCH`] across all cores, and any batch that
/// fails is re-checked one by one so only the culprits are rejected.
///
/// Signatures of one key are batched together ([`by_key`]), so each batch's key terms
/// are merged (see [`crate::batch`]). The result is in input order. A batch and its
/// signatures one by one accept the same set; see `docs/event-format.md`.
pub fn verify_signatures(items: &[(&VerifyingKey, &Envelope)]) -> Vec<Result<(), Rejection>> {
    let order = by_key(items, |(key, _)| key.as_bytes());
    let sorted: Vec<(&VerifyingKey, &Envelope)> = order.iter().map(|&index| items[index]).collect();
    let checked: Vec<Result<(), Rejection>> = sorted.par_chunks(BATCH).flat_map_iter(verify_chunk).collect();
    unsort(&order, checked)
}

/// The positions of `items` ordered by `key` (stable), so one key's items are adjacent.
pub fn by_key<T, K: Ord + ?Sized>(items: &[T], key: impl Fn(&T) -> &K) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| key(&items[a]).cmp(key(&items[b])));
    order
}

/// Puts results computed in `order` (from [`by_key`]) back in input order.
fn unsort<R>(order: &[usize], results: Vec<R>) -> Vec<R> {
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(order.len()).collect();
    for (&position, result) in order.iter().zip(results) {
        slots[position] = Some(result);
    }
    slots.into_iter().flatten().collect()
}

fn verify_chunk(chunk: &[(&VerifyingKey, &Envelope)]) -> Vec<Result<(), Rejection>> {
    // Every message of the batch goes into one buffer, ended at the recorded offsets.
    let mut messages = Vec::with_capacity(
        chunk
            .iter()
            .map(|(_, envelope)| envelope.payload_type.len() + envelope.payload.len() + 32)
            .sum(),
    );
    let mut ends = Vec::with_capacity(chunk.len());
    for (_, envelope) in chunk {
        crate::dsse::pae_into(&mut messages, &envelope.payload_type, &envelope.payload);
        ends.push(messages.len());
    }
    let starts = std::iter::once(0).chain(ends.iter().copied());
    let items: Vec<(&VerifyingKey, &[u8], &[u8; 64])> = chunk
        .iter()
        .zip(starts.zip(&ends))
        .map(|((key, envelope), (start, &end))| (*key, &messages[start..end], &envelope.sig))
        .collect();
    verify_messages(&items)
        .into_iter()
        .zip(chunk)
        .map(|(ok, (_, envelope))| {
            ok.then_some(()).ok_or_else(|| {
                Rejection::new(
                    Reason::BadSignature,
                    format!(
                        "signature by `{}` does not verify over the DSSE PAE",
                        truncate(&envelope.keyid)
                    ),
                )
            })
        })
        .collect()
}

/// Verifies signatures over already-built messages (PAE bytes) as one batch, re-checking
/// one by one only if the batch fails. `true` where the signature verifies.
///
/// For callers that hold the parts of many envelopes and can build the PAE without
/// copying them into [`Envelope`]s (the store verifier). Items of one key should be
/// adjacent (see [`by_key`]): that is what makes the batch cheap.
pub fn verify_messages(items: &[crate::batch::Item<'_>]) -> Vec<bool> {
    if crate::batch::verify(items) {
        return vec![true; items.len()];
    }
    items.iter().map(crate::batch::verify_one).collect()
}

/// Verifies one envelope's signature (no batching).
pub fn verify_one(key: &VerifyingKey, envelope: &Envelope) -> Result<(), Rejection> {
    verify_chunk(&[(key, envelope)]).pop().unwrap_or(Ok(()))
}

/// Parses the signed payload of an event envelope and checks it names its signer.
pub fn check_event(envelope: Envelope) -> Result<Verified, Rejection> {
    let payload = Payload::parse_signed(&envelope.payload, Some(&envelope.keyid))
        .map_err(|message| Rejection::new(Reason::BadPayload, message))?;
    if payload.agent != envelope.keyid {
        return Err(Rejection::new(
            Reason::KeyidMismatch,
            format!(
                "payload `agent` `{}` differs from signature `keyid` `{}`",
                truncate(&payload.agent),
                truncate(&envelope.keyid)
            ),
        ));
    }
    let digest = envelope.payload_digest();
    Ok(Verified {
        envelope,
        payload,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentKey, Kind, Signer};

    fn signed(count: usize) -> (Vec<VerifyingKey>, Vec<Envelope>) {
        let key = AgentKey::from_seed(&[3u8; 32]);
        let public = verifying_key_from_did(key.did()).unwrap();
        let mut signer = Signer::new(key, "test");
        let ts = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let envelopes: Vec<Envelope> = (0..count)
            .map(|_| signer.sign(crate::Payload::new(Kind::ToolCall, ts)))
            .collect();
        (vec![public; count], envelopes)
    }

    #[test]
    fn batch_finds_exactly_the_culprits() {
        let (keys, mut envelopes) = signed(600);
        envelopes[5].sig[0] ^= 1;
        envelopes[300].payload.push(b' ');
        envelopes[599].sig[63] ^= 0x10;
        let items: Vec<_> = keys.iter().zip(envelopes.iter()).collect();
        let results = verify_signatures(&items);
        let bad: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_err())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(bad, vec![5, 300, 599]);
        assert!(results[5].as_ref().unwrap_err().reason == Reason::BadSignature);
    }

    #[test]
    fn decode_rejections_name_their_reason() {
        let (_, envelopes) = signed(1);
        let good = envelopes[0].to_json();
        let types = [EVENT_PAYLOAD_TYPE];
        assert!(decode_envelope(good.as_bytes(), 65536, &types).is_ok());
        let reason = |raw: &str| decode_envelope(raw.as_bytes(), 65536, &types).unwrap_err().reason;
        assert_eq!(reason("{"), Reason::Malformed);
        assert_eq!(
            reason(&good.replace("\"payload\":\"", "\"payload\":\"!!")),
            Reason::BadBase64
        );
        assert_eq!(
            reason(&good.replace("custos.event", "custos.other")),
            Reason::WrongPayloadType
        );
        assert_eq!(reason(&good.replace("did:key:z6Mk", "did:key:z6Mx")), Reason::BadKeyid);
        assert_eq!(
            decode_envelope(good.as_bytes(), 10, &types).unwrap_err().reason,
            Reason::TooLarge
        );
    }
}
