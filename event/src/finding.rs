//! Findings: what the detector reports, how it is signed into the log, and its OCSF form.
//!
//! One type for every stage: the detector makes it, the responder's playbooks match on it,
//! query and evidence read it back. Fields the detector always writes but a reader may
//! not need (`confidence`, `window`, `explanation`, ...) default when absent, so records
//! that carry a finding's summary (a pending approval) read back as the same type.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{AgentKey, ChainState, Envelope, FINDING_PAYLOAD_TYPE};

/// A deviation of one feature in one window.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Contribution {
    pub feature: String,
    pub observed: f64,
    pub expected: f64,
    /// (observed − expected) / spread: how many robust deviations above normal. For a
    /// rare feature it is at least √(2 ln(1/p)), p the share of windows holding it.
    pub deviation: f64,
}

/// The one severity ranking: `low` < `medium` < `high` < `critical`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn from_score(score: u8) -> Self {
        match score {
            85.. => Severity::Critical,
            70..=84 => Severity::High,
            50..=69 => Severity::Medium,
            _ => Severity::Low,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "low" => Some(Severity::Low),
            "medium" => Some(Severity::Medium),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }

    /// OCSF `severity_id`.
    pub fn ocsf_id(self) -> u8 {
        match self {
            Severity::Low => 2,
            Severity::Medium => 3,
            Severity::High => 4,
            Severity::Critical => 5,
        }
    }
}

/// The window a finding is about.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Span {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// One finding.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Finding {
    pub id: String,
    pub agent: String,
    pub realm: String,
    /// `anomaly`, `drift`, `silence`, or the rule's `custos.type.*` tag (`exfiltration`, ...).
    #[serde(rename = "type")]
    pub finding_type: String,
    /// 0-100.
    pub score: u8,
    pub severity: Severity,
    /// 0-1: lower while the agent is judged against its peers (`learning`).
    #[serde(default)]
    pub confidence: f32,
    #[serde(default)]
    pub learning: bool,
    #[serde(default)]
    pub window: Span,
    /// Top contributing features, largest deviation first.
    #[serde(default)]
    pub explanation: Vec<Contribution>,
    /// Log indexes of the evidence events.
    #[serde(default)]
    pub evidence: Vec<u64>,
    #[serde(default)]
    pub rule_id: Option<String>,
    #[serde(default)]
    pub title: String,
    /// ATT&CK (`attack.t1567`) and OWASP Agentic (`owasp.agentic.t2`) tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Findings with one key are reported once per dedup period.
    #[serde(default)]
    pub dedup_key: String,
    /// Memories the agent wrote in the window (for `quarantine_memory`).
    #[serde(default)]
    pub memories: Vec<String>,
    /// When the detector reported it (event time, so replays are reproducible).
    pub ts: DateTime<Utc>,
}

impl Finding {
    /// The signed payload: the finding plus the fields every log entry carries
    /// (`kind: finding`, `action` = type, the detector's chain `seq`/`prev`).
    pub fn payload(&self, chain: &ChainState) -> Result<Vec<u8>, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        if let Value::Object(object) = &mut value {
            object.insert("kind".into(), json!("finding"));
            object.insert("action".into(), json!(self.finding_type));
            object.insert("seq".into(), json!(chain.next_seq));
            object.insert("prev".into(), json!(chain.prev));
            object.insert(
                "ts".into(),
                json!(self.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            );
        }
        serde_json::to_vec(&value)
    }

    /// Signs the finding with the detector key, advancing its chain. A finding that does
    /// not encode (a non-finite number, say) is an error, never an empty signed payload.
    pub fn sign(&self, key: &AgentKey, chain: &mut ChainState) -> Result<Envelope, serde_json::Error> {
        let bytes = self.payload(chain)?;
        chain.advance(&bytes);
        Ok(key.sign_envelope(FINDING_PAYLOAD_TYPE, bytes))
    }

    /// Reads a finding back from a signed payload.
    pub fn from_payload(bytes: &[u8]) -> Option<(Finding, u64)> {
        let value: Value = serde_json::from_slice(bytes).ok()?;
        let seq = value.get("seq")?.as_u64()?;
        Some((serde_json::from_value(value).ok()?, seq))
    }

    /// OCSF Detection Finding (class 2004).
    pub fn ocsf(&self) -> Value {
        json!({
            "class_uid": 2004,
            "class_name": "Detection Finding",
            "category_uid": 2,
            "category_name": "Findings",
            "activity_id": 1,
            "activity_name": "Create",
            "type_uid": 200_401,
            "time": self.ts.timestamp_millis(),
            "severity_id": self.severity.ocsf_id(),
            "severity": self.severity.as_str(),
            "status_id": 1,
            "confidence_score": (self.confidence * 100.0).round() as u32,
            "risk_score": self.score,
            "message": self.title,
            "finding_info": {
                "uid": self.id,
                "title": self.title,
                "types": [self.finding_type],
                "first_seen_time": self.window.start.timestamp_millis(),
                "last_seen_time": self.window.end.timestamp_millis(),
                "analytic": {
                    "name": self.rule_id.clone().unwrap_or_else(|| "custos-baseline".into()),
                    "uid": self.rule_id,
                    "type_id": if self.rule_id.is_some() { 1 } else { 4 },
                    "type": if self.rule_id.is_some() { "Rule" } else { "Behavioral" },
                },
                "attacks": self.tags.iter().filter(|tag| tag.starts_with("attack.t")).map(|tag| json!({
                    "technique": { "uid": tag.trim_start_matches("attack.").to_ascii_uppercase() }
                })).collect::<Vec<_>>(),
            },
            "actor": { "user": { "uid": self.agent, "type": "AI Agent" }, "realm": self.realm },
            "evidences": self.explanation.iter().map(|c| json!({
                "name": c.feature, "observed": c.observed, "expected": c.expected, "deviation": c.deviation
            })).collect::<Vec<_>>(),
            "unmapped": { "custos": { "evidence_log_indexes": self.evidence, "tags": self.tags, "learning": self.learning } },
            "metadata": crate::ocsf_metadata(),
        })
    }
}

/// Finding id: stable for a dedup key and window, so a replay names it the same.
pub fn finding_id(dedup_key: &str, window_start: i64) -> String {
    let hash = blake3::hash(format!("{dedup_key}|{window_start}").as_bytes());
    format!("f-{}", &hash.to_hex()[..16])
}
