//! Keys and signing.

use ed25519_dalek::Signer as _;
use serde::{Deserialize, Serialize};

use crate::did::did_from_public_key;
use crate::dsse::{EVENT_PAYLOAD_TYPE, Envelope, pae};
use crate::payload::Payload;

/// An ed25519 key with its `did:key`.
///
/// `Debug` never prints the secret.
#[derive(Clone)]
pub struct AgentKey {
    signing: ed25519_dalek::SigningKey,
    did: String,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentKey")
            .field("did", &self.did)
            .field("secret", &"**REDACTED**")
            .finish()
    }
}

/// Why a fresh key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed: {0}")]
pub struct RandomError(String);

impl AgentKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, RandomError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|error| RandomError(error.to_string()))?;
        Ok(Self::from_seed(&seed))
    }

    /// The key whose 32-byte secret seed is `seed` (RFC 8032).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = ed25519_dalek::SigningKey::from_bytes(seed);
        let did = did_from_public_key(&signing.verifying_key().to_bytes());
        Self { signing, did }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn did(&self) -> &str {
        &self.did
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Signs raw bytes (no PAE); used for checkpoints and other notes.
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// Signs `payload` as a DSSE envelope of `payload_type`.
    pub fn sign_envelope(&self, payload_type: &str, payload: Vec<u8>) -> Envelope {
        let sig = self.sign_raw(&pae(payload_type, &payload));
        Envelope {
            payload_type: payload_type.to_owned(),
            payload,
            keyid: self.did.clone(),
            sig,
        }
    }
}

/// Where an agent's hash chain stands: the next `seq` and the digest of the last payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    pub next_seq: u64,
    /// Lowercase hex blake3 of the last signed payload; `None` before the first.
    pub prev: Option<String>,
}

impl ChainState {
    /// Advances past a signed payload.
    pub fn advance(&mut self, payload: &[u8]) {
        // Past `chain::MAX_SEQ` nothing is accepted anyway; never wrap back to 0.
        self.next_seq = self.next_seq.saturating_add(1);
        self.prev = Some(crate::blake3_hex(payload));
    }

    /// Moves past a payload of this signer's read back from the log (its `seq` is at or
    /// after the next one expected), so a restarted system signer (detector, responder)
    /// continues its chain. Payloads without a `seq`, or behind the chain, change nothing.
    pub fn follow(&mut self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Seq {
            seq: Option<u64>,
        }
        let seq = serde_json::from_slice::<Seq>(payload).ok().and_then(|head| head.seq);
        if let Some(seq) = seq
            && seq >= self.next_seq
        {
            self.next_seq = seq;
            self.advance(payload);
        }
    }
}

/// The partition of `key` among `partitions`: `u32_le(blake3(key)[0..4]) mod partitions`.
/// Every Kafka producer of submissions places records with it (the key being the realm),
/// and system signers pick their chain lane with it.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    let hash = blake3::hash(key.as_bytes());
    let bytes = hash.as_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) % partitions.max(1)
}

/// A system signer's chains, one per lane. With one log for the whole cluster there is
/// one lane; with one log per partition (`--log-per-partition`) there is one per
/// partition, the lane of a payload being the partition of its `realm`, so that each
/// partition's log holds one unbroken chain of the signer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLanes {
    pub lanes: u32,
    pub chains: std::collections::BTreeMap<u32, ChainState>,
}

impl Default for ChainLanes {
    fn default() -> Self {
        Self::new(1)
    }
}

impl ChainLanes {
    pub fn new(lanes: u32) -> Self {
        Self {
            lanes: lanes.max(1),
            chains: std::collections::BTreeMap::new(),
        }
    }

    /// The lane of a payload about `realm`.
    pub fn lane(&self, realm: &str) -> u32 {
        match self.lanes {
            1 => 0,
            lanes => partition_of(realm, lanes),
        }
    }

    /// The chain a payload about `realm` is signed on.
    pub fn chain_mut(&mut self, realm: &str) -> &mut ChainState {
        let lane = self.lane(realm);
        self.chains.entry(lane).or_default()
    }

    /// [`ChainState::follow`] on the lane of the payload's `realm`.
    pub fn follow(&mut self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Realm {
            #[serde(default)]
            realm: String,
        }
        let realm = serde_json::from_slice::<Realm>(payload)
            .map(|head| head.realm)
            .unwrap_or_default();
        self.chain_mut(&realm).follow(payload);
    }

    /// Reads lanes saved by [`serde_json`], or a single chain saved before lanes existed
    /// (lane 0). `None` when `bytes` is neither, or was saved with another lane count.
    pub fn restore(bytes: &[u8], lanes: u32) -> Option<Self> {
        if let Ok(saved) = serde_json::from_slice::<Self>(bytes) {
            return (saved.lanes == lanes.max(1)).then_some(saved);
        }
        let single: ChainState = serde_json::from_slice(bytes).ok()?;
        (lanes <= 1).then(|| Self {
            lanes: 1,
            chains: [(0, single)].into(),
        })
    }
}

/// Signs an agent's events in order, keeping its `seq` / `prev` chain.
#[derive(Clone, Debug)]
pub struct Signer {
    key: AgentKey,
    realm: String,
    chain: ChainState,
}

impl Signer {
    /// A signer at the start of a chain.
    pub fn new(key: AgentKey, realm: impl Into<String>) -> Self {
        Self::resume(key, realm, ChainState::default())
    }

    /// A signer that continues an existing chain.
    pub fn resume(key: AgentKey, realm: impl Into<String>, chain: ChainState) -> Self {
        Self {
            key,
            realm: realm.into(),
            chain,
        }
    }

    pub fn key(&self) -> &AgentKey {
        &self.key
    }

    pub fn did(&self) -> &str {
        self.key.did()
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn chain(&self) -> &ChainState {
        &self.chain
    }

    /// Fills `agent`, `seq`, `prev` and (when empty) `realm`, then signs the payload.
    pub fn sign(&mut self, mut payload: Payload) -> Envelope {
        payload.agent = self.key.did().to_owned();
        payload.seq = self.chain.next_seq;
        payload.prev = self.chain.prev.clone();
        if payload.realm.is_empty() {
            payload.realm = self.realm.clone();
        }
        // A Payload of strings, numbers and a JSON map always serialises; were it ever not
        // to, this stops rather than sign a default value.
        let bytes = serde_json::to_vec(&payload).expect("a payload serialises");
        self.sign_bytes(bytes)
    }

    /// Fills the chain fields of a JSON object (keeping every other field as given),
    /// validates it as a payload, and signs it.
    pub fn sign_object(
        &mut self,
        mut object: serde_json::Map<String, serde_json::Value>,
        default_ts: chrono::DateTime<chrono::Utc>,
    ) -> Result<Envelope, String> {
        use serde_json::Value;
        object.insert("agent".into(), Value::String(self.key.did().to_owned()));
        object.insert("seq".into(), Value::from(self.chain.next_seq));
        object.insert(
            "prev".into(),
            self.chain.prev.clone().map_or(Value::Null, Value::String),
        );
        object
            .entry("realm")
            .or_insert_with(|| Value::String(self.realm.clone()));
        object
            .entry("ts")
            .or_insert_with(|| Value::String(default_ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)));
        let bytes = serde_json::to_vec(&object).map_err(|error| error.to_string())?;
        Payload::parse(&bytes)?;
        Ok(self.sign_bytes(bytes))
    }

    /// Signs payload bytes as they are and advances the chain past them. The caller is
    /// responsible for their `seq` and `prev` being this signer's.
    pub fn sign_bytes(&mut self, bytes: Vec<u8>) -> Envelope {
        self.chain.advance(&bytes);
        self.key.sign_envelope(EVENT_PAYLOAD_TYPE, bytes)
    }
}

#[cfg(test)]
mod lane_tests {
    use super::*;

    #[test]
    fn lanes_follow_the_realm_and_restore_old_single_chains() {
        let mut lanes = ChainLanes::new(3);
        let payload = br#"{"realm":"eng","seq":4}"#;
        lanes.follow(payload);
        let lane = partition_of("eng", 3);
        assert_eq!(lanes.chains[&lane].next_seq, 5);
        assert_eq!(lanes.chain_mut("eng").next_seq, 5);
        // A realm in another lane starts its own chain.
        let other = (0..)
            .map(|n| format!("r{n}"))
            .find(|realm| partition_of(realm, 3) != lane)
            .unwrap();
        assert_eq!(lanes.chain_mut(&other).next_seq, 0);
        // Saved lanes restore with the same count only; a chain saved before lanes is lane 0.
        let saved = serde_json::to_vec(&lanes).unwrap();
        assert_eq!(ChainLanes::restore(&saved, 3), Some(lanes.clone()));
        assert_eq!(ChainLanes::restore(&saved, 2), None);
        let single = serde_json::to_vec(&ChainState {
            next_seq: 7,
            prev: None,
        })
        .unwrap();
        assert_eq!(ChainLanes::restore(&single, 1).unwrap().chain_mut("any").next_seq, 7);
        assert_eq!(ChainLanes::restore(&single, 3), None);
    }
}
