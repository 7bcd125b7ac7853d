//! What the registry knows of an agent and of the memories and credentials control
//! entries acted on: the fold of the log's control entries, as the writer, ingest nodes
//! and the query API all show it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Active,
    Quarantined,
    Revoked,
}

/// A memory or credential that a control entry acted on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SubjectRecord {
    pub id: String,
    /// The agent that wrote the memory or owns the credential.
    pub agent: String,
    pub realm: String,
    /// `quarantined` or `active` (restored) for memories; `revoked` for credentials.
    pub status: String,
    pub since: DateTime<Utc>,
    pub log_index: u64,
    pub reason: Option<String>,
}

/// What the registry knows of one agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    pub did: String,
    pub realm: String,
    pub labels: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub children: Vec<String>,
    pub status: AgentStatus,
    pub enrolled_at: DateTime<Utc>,
    pub enrolled_by: String,
    pub enroll_log_index: u64,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoke_log_index: Option<u64>,
    pub revoke_reason: Option<String>,
    /// The control entry that last quarantined or reinstated the agent.
    #[serde(default)]
    pub status_log_index: Option<u64>,
    /// Accepted events so far.
    pub events: u64,
    pub last_seq: Option<u64>,
    pub last_log_index: Option<u64>,
    pub last_ts: Option<DateTime<Utc>>,
}
