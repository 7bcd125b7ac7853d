//! What ingest hands the detector: one [`Observation`] per durable entry or per rejected
//! input whose signature verified, in log order.
//!
//! Defined here, in the crate every stage shares, so the detector's core does not depend
//! on ingest; `custos-stage` carries it as `Committed::Event`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Payload;

/// One verified event as ingest saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Where the event is in the log; `None` when it was rejected (and so not appended).
    pub log_index: Option<u64>,
    /// When the node received it.
    pub ingest_ts: DateTime<Utc>,
    pub payload: Payload,
    pub signal: Signal,
    /// The appended entry as signed, when the writer publishes entries for readers that
    /// rebuild the log's rows (query nodes on the committed topic); `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<Box<SignedEntry>>,
}

/// An appended entry as its signer sent it and as the writer stamped it: with its log
/// index and payload type, everything a row of the log holds (`custos_store::LogEntry`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    /// The signer's `did:key`.
    pub keyid: String,
    /// The ed25519 signature over the DSSE pre-authentication encoding (base64 on the wire).
    #[serde(with = "base64_bytes")]
    pub sig: Vec<u8>,
    /// The signed payload bytes, exactly (base64 on the wire).
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
    /// Microseconds since the Unix epoch at which the writer accepted the entry.
    pub ingest_ts_us: i64,
}

/// Bytes as standard base64 in JSON.
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// What ingest decided about the event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Signal {
    /// Appended; `gap` is the missing seq range when the chain skipped ahead.
    Accepted { gap: Option<(u64, u64)> },
    /// Signed by an enrolled (or once enrolled) key but refused: `reason` is the stable
    /// reason code (`revoked_agent`, `chain_fork`, `replay`, ...).
    Rejected { reason: String },
}

impl Observation {
    /// The agent's status flag Sigma rules see as `custos.signal`: `accepted`,
    /// `chain_gap`, or the rejection reason.
    pub fn signal_name(&self) -> &str {
        match &self.signal {
            Signal::Accepted { gap: None } => "accepted",
            Signal::Accepted { gap: Some(_) } => "chain_gap",
            Signal::Rejected { reason } => reason,
        }
    }
}
