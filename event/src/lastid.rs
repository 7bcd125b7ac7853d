//! LastID audit records: the format LastID agents keep (a per-agent hash chain) and
//! ship to `POST /v1/adapters/lastid/audit`, checked by LastID's own rules.
//!
//! ```text
//!  record {seq, timestamp, agent_did, event_type, memory_id, metadata, prev_hash,
//!          integrity_hash, signature}
//!     core  = those first seven members, as the record has them
//!     bytes = canonical JSON of core (keys sorted, no whitespace, UTF-8)
//!     integrity_hash = blake3_hex(bytes)        ── checked first: integrity_mismatch
//!     signature      = base64 ed25519(bytes)    ── then:          bad_signature
//!     prev_hash      = the previous record's integrity_hash (null at seq 0)
//! ```
//!
//! The canonical form is compact. A record hashed over Python's
//! `json.dumps(core, sort_keys=True)` default spelling (`", "` and `": "`, non-ASCII as
//! `\uXXXX`) is recognised too: the signature must then verify over those same bytes.
//! Numbers are written as serde_json writes them, so a float in `metadata` whose
//! producer spells it otherwise (`1.0` vs `1`) does not verify; keep metadata to
//! strings, integers, booleans and nesting.
//!
//! The node and `custos verify` share this code: the node checks a record at ingest,
//! `custos verify --signatures` checks every stored one again.

use base64::Engine as _;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use serde_json::{Map, Value};

use crate::{Kind, Reason, Rejection};

/// The signed members of a record, in no particular order (the canonical form sorts).
pub const CORE: [&str; 7] = [
    "seq",
    "timestamp",
    "agent_did",
    "event_type",
    "memory_id",
    "metadata",
    "prev_hash",
];

/// LastID event types → Custos kind and outcome (docs/integrations.md has the table).
pub const EVENT_TYPES: [(&str, Kind, Option<&str>); 15] = [
    ("AgentToolInvoked", Kind::ToolCall, None),
    ("AgentToolSucceeded", Kind::ToolResult, Some("ok")),
    ("AgentToolFailed", Kind::ToolResult, Some("error")),
    ("AgentMemoryWritten", Kind::MemoryWrite, None),
    ("AgentMemoryUpdated", Kind::MemoryWrite, None),
    ("AgentMemoryForgotten", Kind::MemoryDelete, None),
    ("AgentMemoryRead", Kind::MemoryRead, None),
    ("AgentCredentialInjected", Kind::CredentialUse, None),
    ("AgentRuleFired", Kind::PolicyChange, None),
    ("AgentFileRead", Kind::FileRead, None),
    ("AgentFileWritten", Kind::FileWrite, None),
    ("MessageSent", Kind::MessageSent, None),
    ("MessageReceived", Kind::MessageReceived, None),
    ("AgentSpawned", Kind::Delegation, None),
    ("ChainCheckpoint", Kind::PolicyChange, None),
];

/// A record, parsed; `raw` is its exact bytes as received.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u64,
    pub agent_did: String,
    pub event_type: String,
    pub memory_id: Option<String>,
    pub metadata: Value,
    pub timestamp: Value,
    pub prev_hash: Option<String>,
    pub integrity_hash: String,
    pub signature: Vec<u8>,
    /// The signed core, an object of the `CORE` members the record has.
    core: Value,
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::new(Reason::BadPayload, message)
}

impl Record {
    /// Parses a record's JSON; `bad_payload` names what is missing or mistyped.
    pub fn parse(raw: &[u8]) -> Result<Record, Rejection> {
        let value: Value = serde_json::from_slice(raw)
            .map_err(|error| Rejection::new(Reason::Malformed, format!("the record is not JSON: {error}")))?;
        let Value::Object(object) = value else {
            return Err(Rejection::new(Reason::Malformed, "a record is a JSON object"));
        };
        let seq = object
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`seq` must be an unsigned integer"))?;
        let text = |name: &str| -> Result<String, Rejection> {
            object
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("`{name}` must be a string")))
        };
        let agent_did = text("agent_did")?;
        let event_type = text("event_type")?;
        let integrity_hash = text("integrity_hash")?;
        let signature = text("signature")?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(signature.trim_end_matches('=')))
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature.trim_end_matches('=')))
            .map_err(|_| Rejection::new(Reason::BadBase64, "`signature` is not base64"))?;
        let prev_hash = match object.get("prev_hash") {
            Some(Value::Null) => None,
            Some(Value::String(hash)) => Some(hash.clone()),
            Some(_) => return Err(bad("`prev_hash` must be a string or null")),
            None => return Err(bad("`prev_hash` is missing (null at seq 0)")),
        };
        if !object.contains_key("timestamp") {
            return Err(bad("`timestamp` is missing"));
        }
        let memory_id = match object.get("memory_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(_) => return Err(bad("`memory_id` must be a string or null")),
        };
        let core = Value::Object(
            CORE.iter()
                .filter_map(|name| object.get(*name).map(|value| ((*name).to_owned(), value.clone())))
                .collect(),
        );
        Ok(Record {
            seq,
            agent_did,
            event_type,
            memory_id,
            metadata: object.get("metadata").cloned().unwrap_or(Value::Null),
            timestamp: object["timestamp"].clone(),
            prev_hash,
            integrity_hash,
            signature,
            core,
        })
    }

    /// The core's canonical bytes: compact, keys sorted, UTF-8.
    pub fn canonical(&self) -> Vec<u8> {
        let mut out = String::new();
        write_canonical(&self.core, Style::COMPACT, &mut out);
        out.into_bytes()
    }

    /// LastID's checks of one record against the agent's ed25519 key: the integrity
    /// hash over the canonical core first, then the signature over the same bytes.
    pub fn verify(&self, public_key: &[u8; 32]) -> Result<(), Rejection> {
        let mut matched = None;
        for style in Style::ALL {
            let mut text = String::new();
            write_canonical(&self.core, style, &mut text);
            if blake3::hash(text.as_bytes()).to_hex().as_str() == self.integrity_hash.to_ascii_lowercase() {
                matched = Some(text);
                break;
            }
        }
        let Some(bytes) = matched else {
            return Err(Rejection::new(
                Reason::IntegrityMismatch,
                format!(
                    "record seq {} of `{}`: integrity_hash {} is not the blake3 of its signed core: the record was altered",
                    self.seq, self.agent_did, self.integrity_hash
                ),
            ));
        };
        let signature = <[u8; 64]>::try_from(self.signature.as_slice()).map_err(|_| {
            Rejection::new(
                Reason::BadSignature,
                format!(
                    "record seq {}: the signature has {} bytes, not 64",
                    self.seq,
                    self.signature.len()
                ),
            )
        })?;
        let key = VerifyingKey::from_bytes(public_key).map_err(|_| {
            Rejection::new(
                Reason::BadKeyid,
                format!("`{}`'s public key is not an ed25519 point", self.agent_did),
            )
        })?;
        key.verify(bytes.as_bytes(), &Signature::from_bytes(&signature))
            .map_err(|_| {
                Rejection::new(
                    Reason::BadSignature,
                    format!(
                        "record seq {} of `{}`: the signature does not verify with the enrolled key",
                        self.seq, self.agent_did
                    ),
                )
            })
    }

    /// The Custos kind and outcome of this record's event type (`None` for a type
    /// this build does not know; the adapter then reports it as a `policy_change`).
    pub fn kind(&self) -> Option<(Kind, Option<&'static str>)> {
        EVENT_TYPES
            .iter()
            .find(|(name, _, _)| *name == self.event_type)
            .map(|(_, kind, outcome)| (*kind, *outcome))
    }
}

/// The public key of a LastID agent identifier that carries one (`did:key`).
pub fn key_of(did: &str) -> Option<[u8; 32]> {
    crate::public_key_from_did(did).ok()
}

/// Whether `did` is an identifier LastID agents use (`did:key:…` or `did:lastid:agent:…`).
pub fn valid_did(did: &str) -> bool {
    did.len() <= 256
        && (did.starts_with("did:key:")
            || did
                .strip_prefix("did:lastid:agent:")
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|byte| byte.is_ascii_graphic())))
}

#[derive(Clone, Copy)]
struct Style {
    spaced: bool,
    ascii: bool,
}

impl Style {
    const COMPACT: Style = Style {
        spaced: false,
        ascii: false,
    };
    const ALL: [Style; 4] = [
        Style::COMPACT,
        Style {
            spaced: true,
            ascii: true,
        },
        Style {
            spaced: false,
            ascii: true,
        },
        Style {
            spaced: true,
            ascii: false,
        },
    ];
}

fn write_string(text: &str, ascii: bool, out: &mut String) {
    let quoted = serde_json::to_string(text).unwrap_or_default();
    if !ascii {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

fn write_canonical(value: &Value, style: Style, out: &mut String) {
    let (comma, colon) = if style.spaced { (", ", ": ") } else { (",", ":") };
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (position, key) in keys.into_iter().enumerate() {
                if position > 0 {
                    out.push_str(comma);
                }
                write_string(key, style.ascii, out);
                out.push_str(colon);
                write_canonical(&map[key], style, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push_str(comma);
                }
                write_canonical(item, style, out);
            }
            out.push(']');
        }
        Value::String(text) => write_string(text, style.ascii, out),
        other => out.push_str(&other.to_string()),
    }
}

/// Signs a record as a LastID agent would (for fixtures and tests): fills
/// `integrity_hash` and `signature` from the other members.
pub fn sign_record(core: &Map<String, Value>, seed: &[u8; 32]) -> Map<String, Value> {
    let mut text = String::new();
    write_canonical(&Value::Object(core.clone()), Style::COMPACT, &mut text);
    seal(core, text.as_bytes(), seed)
}

/// `core` with the integrity hash and signature of `bytes` (its serialisation).
fn seal(core: &Map<String, Value>, bytes: &[u8], seed: &[u8; 32]) -> Map<String, Value> {
    use ed25519_dalek::Signer as _;
    let key = ed25519_dalek::SigningKey::from_bytes(seed);
    let mut record = core.clone();
    record.insert(
        "integrity_hash".into(),
        Value::from(blake3::hash(bytes).to_hex().to_string()),
    );
    record.insert(
        "signature".into(),
        Value::from(base64::engine::general_purpose::STANDARD.encode(key.sign(bytes).to_bytes())),
    );
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(seq: u64, prev: Option<&str>) -> Map<String, Value> {
        serde_json::json!({
            "seq": seq, "timestamp": "2026-12-04T10:00:00Z", "agent_did": "did:lastid:agent:a1",
            "event_type": "AgentMemoryWritten", "memory_id": "mem-é", "metadata": {"z": 1, "a": [true, null]},
            "prev_hash": prev,
        })
        .as_object()
        .unwrap()
        .clone()
    }

    const SEED: [u8; 32] = [9; 32];

    fn public() -> [u8; 32] {
        ed25519_dalek::SigningKey::from_bytes(&SEED).verifying_key().to_bytes()
    }

    #[test]
    fn the_canonical_form_sorts_keys_and_has_no_whitespace() {
        let record = Record::parse(&serde_json::to_vec(&sign_record(&core(0, None), &SEED)).unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(record.canonical()).unwrap(),
            r#"{"agent_did":"did:lastid:agent:a1","event_type":"AgentMemoryWritten","memory_id":"mem-é","metadata":{"a":[true,null],"z":1},"prev_hash":null,"seq":0,"timestamp":"2026-12-04T10:00:00Z"}"#
        );
        record.verify(&public()).unwrap();
    }

    #[test]
    fn altered_content_is_an_integrity_mismatch_before_any_signature_check() {
        let mut record = sign_record(&core(0, None), &SEED);
        record["metadata"] = serde_json::json!({"z": 2, "a": [true, null]});
        let parsed = Record::parse(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(parsed.verify(&public()).unwrap_err().reason, Reason::IntegrityMismatch);
    }

    #[test]
    fn a_signature_by_another_key_is_a_bad_signature() {
        let record = sign_record(&core(1, Some("ab")), &[8; 32]);
        let parsed = Record::parse(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(parsed.verify(&public()).unwrap_err().reason, Reason::BadSignature);
    }

    #[test]
    fn pythons_default_spelling_is_recognised() {
        // json.dumps(core, sort_keys=True): ", " and ": ", non-ASCII escaped.
        let text = r#"{"agent_did": "did:lastid:agent:a1", "event_type": "AgentMemoryWritten", "memory_id": "mem-\u00e9", "metadata": {"a": [true, null], "z": 1}, "prev_hash": null, "seq": 0, "timestamp": "2026-12-04T10:00:00Z"}"#;
        let record = seal(&core(0, None), text.as_bytes(), &SEED);
        let parsed = Record::parse(&serde_json::to_vec(&record).unwrap()).unwrap();
        parsed.verify(&public()).unwrap();
    }

    #[test]
    fn identifiers() {
        assert!(valid_did("did:lastid:agent:7f3a"));
        assert!(!valid_did("did:lastid:agent:"));
        assert!(!valid_did("did:web:example.com"));
        assert!(key_of("did:lastid:agent:7f3a").is_none());
    }
}
