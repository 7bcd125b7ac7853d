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
