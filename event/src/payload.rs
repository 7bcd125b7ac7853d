//! The event payload: a small JSON object, signed as raw bytes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::did::{key_bytes_from_did, truncate};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ToolCall,
    ToolResult,
    LlmCall,
    MemoryRead,
    MemoryWrite,
    MemoryDelete,
    CredentialUse,
    Delegation,
    MessageSent,
    MessageReceived,
    FileRead,
    FileWrite,
    PolicyChange,
    Auth,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::ToolCall,
        Kind::ToolResult,
        Kind::LlmCall,
        Kind::MemoryRead,
        Kind::MemoryWrite,
        Kind::MemoryDelete,
        Kind::CredentialUse,
        Kind::Delegation,
        Kind::MessageSent,
        Kind::MessageReceived,
        Kind::FileRead,
        Kind::FileWrite,
        Kind::PolicyChange,
        Kind::Auth,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ToolCall => "tool_call",
            Kind::ToolResult => "tool_result",
            Kind::LlmCall => "llm_call",
            Kind::MemoryRead => "memory_read",
            Kind::MemoryWrite => "memory_write",
            Kind::MemoryDelete => "memory_delete",
            Kind::CredentialUse => "credential_use",
            Kind::Delegation => "delegation",
            Kind::MessageSent => "message_sent",
            Kind::MessageReceived => "message_received",
            Kind::FileRead => "file_read",
            Kind::FileWrite => "file_write",
            Kind::PolicyChange => "policy_change",
            Kind::Auth => "auth",
        }
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Denied,
    Error,
}

/// A Custos event payload. Field names are the wire names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// The signer's `did:key`; must equal the envelope `keyid`.
    pub agent: String,
    /// Per-agent sequence number, starting at 0 and increasing by one.
    pub seq: u64,
    /// Lowercase hex blake3 of the previous payload's bytes; null only at `seq` 0.
    pub prev: Option<String>,
    /// When it happened, RFC 3339 in UTC (`Z` or `+00:00`).
    #[serde(deserialize_with = "utc_rfc3339")]
    pub ts: DateTime<Utc>,
    pub realm: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_out: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// W3C trace id: 32 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C span id: 16 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_id: Option<String>,
    /// Free-form attributes. A key may appear once per object, at any depth: with two,
    /// two JSON readers could see two different events behind one signature.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "unique_keys")]
    pub attrs: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Longest accepted `realm`, `action`, `session` and similar short strings.
pub const MAX_SHORT: usize = 256;
/// Longest accepted `target`.
pub const MAX_TARGET: usize = 4096;

impl Payload {
    /// A minimal payload; the [`crate::Signer`] fills `agent`, `seq`, `prev` and `realm`.
    pub fn new(kind: Kind, ts: DateTime<Utc>) -> Self {
        Payload {
            agent: String::new(),
            seq: 0,
            prev: None,
            ts,
            realm: String::new(),
            kind,
            action: None,
            target: None,
            outcome: None,
            bytes_in: None,
            bytes_out: None,
            tokens_in: None,
            tokens_out: None,
            session: None,
            trace_id: None,
            span_id: None,
            parent: None,
            memory_id: None,
            attrs: None,
        }
    }

    /// Parses and validates payload bytes. The error names the offending field and value.
    pub fn parse(bytes: &[u8]) -> Result<Payload, String> {
        Self::parse_signed(bytes, None)
    }

    /// [`Payload::parse`] for a payload whose signature by `signer` (an already checked
    /// did:key) verified: an `agent` equal to it needs no second look.
    pub fn parse_signed(bytes: &[u8], signer: Option<&str>) -> Result<Payload, String> {
        let payload: Payload =
            serde_json::from_slice(bytes).map_err(|error| format!("payload is not a valid event: {error}"))?;
        if signer != Some(payload.agent.as_str()) {
            key_bytes_from_did(&payload.agent).map_err(|error| format!("`agent`: {error}"))?;
        }
        payload.validate_fields()?;
        Ok(payload)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        key_bytes_from_did(&self.agent).map_err(|error| format!("`agent`: {error}"))?;
        self.validate_fields()
    }

    fn validate_fields(&self) -> Result<(), String> {
        if self.seq > crate::chain::MAX_SEQ {
            return Err(format!(
                "`seq` {} has no successor; the largest accepted seq is {}",
                self.seq,
                crate::chain::MAX_SEQ
            ));
        }
        match (&self.prev, self.seq) {
            (None, 0) => {}
            (Some(prev), 0) => return Err(format!("`prev` must be null at seq 0, found `{}`", truncate(prev))),
            (None, seq) => {
                return Err(format!(
                    "`prev` is null at seq {seq}; only seq 0 may have no predecessor"
                ));
            }
            (Some(prev), _) => {
                if !is_lower_hex(prev, 64) {
                    return Err(format!(
                        "`prev` must be 64 lowercase hex digits, found `{}`",
                        truncate(prev)
                    ));
                }
            }
        }
        if !valid_realm(&self.realm) {
            return Err(format!(
                "`realm` must be 1-64 characters of [A-Za-z0-9._-], found `{}`",
                truncate(&self.realm)
            ));
        }
        for (name, value, max) in [
            ("action", &self.action, MAX_SHORT),
            ("session", &self.session, MAX_SHORT),
            ("parent", &self.parent, MAX_SHORT),
            ("memory_id", &self.memory_id, MAX_SHORT),
            ("target", &self.target, MAX_TARGET),
        ] {
            if let Some(value) = value
                && value.len() > max
            {
                return Err(format!("`{name}` is {} bytes long; the limit is {max}", value.len()));
            }
        }
        if let Some(trace) = &self.trace_id
            && !is_lower_hex(trace, 32)
        {
            return Err(format!(
                "`trace_id` must be 32 lowercase hex digits, found `{}`",
                truncate(trace)
            ));
        }
        if let Some(span) = &self.span_id
            && !is_lower_hex(span, 16)
        {
            return Err(format!(
                "`span_id` must be 16 lowercase hex digits, found `{}`",
                truncate(span)
            ));
        }
        Ok(())
    }

    /// `prev` decoded to bytes, if present and well-formed.
    pub fn prev_digest(&self) -> Option<[u8; 32]> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(self.prev.as_deref()?, &mut out).ok()?;
        Some(out)
    }
}

/// A realm name: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn valid_realm(realm: &str) -> bool {
    (1..=64).contains(&realm.len())
        && realm
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

fn is_lower_hex(value: &str, len: usize) -> bool {
    value.len() == len && value.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

fn utc_rfc3339<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = String::deserialize(deserializer)?;
    let parsed = DateTime::parse_from_rfc3339(&text)
        .map_err(|error| serde::de::Error::custom(format!("`ts` `{}` is not RFC 3339: {error}", truncate(&text))))?;
    if parsed.offset().local_minus_utc() != 0 {
        return Err(serde::de::Error::custom(format!(
            "`ts` `{}` must be in UTC (`Z` or `+00:00`)",
            truncate(&text)
        )));
    }
    Ok(parsed.with_timezone(&Utc))
}

/// `attrs`, refusing an object that names one key twice at any depth (serde_json's own
/// map keeps the last value silently).
fn unique_keys<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, D::Error> {
    match UniqueKeys::deserialize(deserializer)?.0 {
        serde_json::Value::Object(map) => Ok(Some(map)),
        serde_json::Value::Null => Ok(None),
        other => Err(serde::de::Error::custom(format!(
            "`attrs` must be an object, found {}",
            json_type(&other)
        ))),
    }
}

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A JSON value whose objects each name a key at most once.
struct UniqueKeys(serde_json::Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, serde_json::Value::Number))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(UniqueKeys(item)) = items.next_element()? {
            out.push(item);
        }
        Ok(serde_json::Value::Array(out))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = entries.next_key::<String>()? {
            let UniqueKeys(value) = entries.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "`attrs` names the key `{}` twice in one object; each key may appear once",
                    truncate(&key)
                )));
            }
            out.insert(key, value);
        }
        Ok(serde_json::Value::Object(out))
    }
}
