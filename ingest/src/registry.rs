//! The agent registry and per-agent chain heads, folded from the log.
//!
//! Enrollment and revocation are control entries signed by the node key; the registry
//! is nothing but the fold of those entries, so it is rebuilt exactly at every start.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The payload of a control entry (`application/vnd.custos.control+json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ControlPayload {
    /// Always `control`, so SQL over `kind` separates control entries from events.
    pub kind: String,
    pub action: ControlAction,
    /// The node's own chain: the node key signs its control entries in order.
    pub seq: u64,
    pub prev: Option<String>,
    pub ts: DateTime<Utc>,
    /// The agent the entry is about.
    pub agent: String,
    pub realm: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The enrolling parent, for sub-agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Who did it: `token:<id>`, `delegation`, or `cascade`.
    pub by: String,
    /// The log index that caused it: the delegation event, or the revocation of an ancestor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What a memory or credential action is about: the memory id or the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Enroll,
    Revoke,
    /// The agent's events are still accepted and stored, flagged `quarantined`.
    Quarantine,
    /// Back to active, from quarantined or revoked (an approved undo).
    Reinstate,
    QuarantineMemory,
    RestoreMemory,
    RevokeCredential,
}

impl ControlAction {
    /// The status-change name on the control stream (`agent_revoked`, ...); `None` for
    /// enrollment.
    pub fn change_name(self) -> Option<&'static str> {
        Some(match self {
            ControlAction::Enroll => return None,
            ControlAction::Revoke => "agent_revoked",
            ControlAction::Quarantine => "agent_quarantined",
            ControlAction::Reinstate => "agent_reinstated",
            ControlAction::QuarantineMemory => "memory_quarantined",
            ControlAction::RestoreMemory => "memory_restored",
            ControlAction::RevokeCredential => "credential_revoked",
        })
    }
}

pub(crate) use custos_event::agent::{AgentRecord, AgentStatus, SubjectRecord};

/// The head of one agent's hash chain, with its recent (seq, digest, log index) triples
/// so that a resent event is recognised as a duplicate and a different one at the same
/// seq as a fork.
///
/// `recent` is a suffix of the agent's accepted events in seq order (accepted seqs only
/// grow): every event not yet in a sealed segment, and at least the last `window` ones.
/// Anything older is found through the segments' (agent, seq) indexes.
#[derive(Clone, Debug)]
pub struct ChainHead {
    pub seq: u64,
    pub digest: [u8; 32],
    pub recent: VecDeque<(u64, [u8; 32], u64)>,
}

/// The registry plus chain heads.
#[derive(Debug, Default)]
pub struct Registry {
    pub agents: BTreeMap<String, AgentRecord>,
    /// Memories that were ever quarantined, by id.
    pub memories: BTreeMap<String, SubjectRecord>,
    /// Revoked credentials, by id.
    pub credentials: BTreeMap<String, SubjectRecord>,
    pub heads: HashMap<String, ChainHead>,
    /// How many recent (seq, digest, log index) triples each chain head keeps at least.
    pub window: usize,
    /// Log indexes below this are in sealed segments: triples there may be dropped
    /// (beyond the window).
    pub sealed_end: u64,
}

impl Registry {
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            ..Self::default()
        }
    }

    /// Applies a control entry at `log_index`.
    pub fn apply_control(&mut self, control: &ControlPayload, log_index: u64) {
        match control.action {
            ControlAction::Enroll => {
                if let Some(parent) = control.parent.as_ref().and_then(|parent| self.agents.get_mut(parent))
                    && !parent.children.contains(&control.agent)
                {
                    parent.children.push(control.agent.clone());
                }
                self.agents.insert(
                    control.agent.clone(),
                    AgentRecord {
                        did: control.agent.clone(),
                        realm: control.realm.clone(),
                        labels: control.labels.clone(),
                        parent: control.parent.clone(),
                        children: Vec::new(),
                        status: AgentStatus::Active,
                        enrolled_at: control.ts,
                        enrolled_by: control.by.clone(),
                        enroll_log_index: log_index,
                        revoked_at: None,
                        revoke_log_index: None,
                        revoke_reason: None,
                        status_log_index: None,
                        events: 0,
                        last_seq: None,
                        last_log_index: None,
                        last_ts: None,
                    },
                );
            }
            ControlAction::Revoke => {
                if let Some(agent) = self.agents.get_mut(&control.agent) {
                    agent.status = AgentStatus::Revoked;
                    agent.revoked_at = Some(control.ts);
                    agent.revoke_log_index = Some(log_index);
                    agent.revoke_reason = control.reason.clone();
                }
            }
            ControlAction::Quarantine | ControlAction::Reinstate => {
                if let Some(agent) = self.agents.get_mut(&control.agent) {
                    agent.status = if control.action == ControlAction::Quarantine {
                        AgentStatus::Quarantined
                    } else {
                        AgentStatus::Active
                    };
                    agent.status_log_index = Some(log_index);
                }
            }
            ControlAction::QuarantineMemory | ControlAction::RestoreMemory | ControlAction::RevokeCredential => {
                let id = control.subject.clone().unwrap_or_default();
                let status = match control.action {
                    ControlAction::QuarantineMemory => "quarantined",
                    ControlAction::RestoreMemory => "active",
                    _ => "revoked",
                };
                let record = SubjectRecord {
                    id: id.clone(),
                    agent: control.agent.clone(),
                    realm: control.realm.clone(),
                    status: status.into(),
                    since: control.ts,
                    log_index,
                    reason: control.reason.clone(),
                };
                if control.action == ControlAction::RevokeCredential {
                    self.credentials.insert(id, record);
                } else {
                    self.memories.insert(id, record);
                }
            }
        }
    }

    /// Records an accepted event.
    pub fn apply_event(&mut self, agent: &str, seq: u64, digest: [u8; 32], log_index: u64, ts: DateTime<Utc>) {
        if let Some(record) = self.agents.get_mut(agent) {
            record.events += 1;
            record.last_seq = Some(record.last_seq.map_or(seq, |last| last.max(seq)));
            record.last_log_index = Some(log_index);
            record.last_ts = Some(ts);
        }
        let window = self.window;
        let head = self.heads.entry(agent.to_owned()).or_insert_with(|| ChainHead {
            seq,
            digest,
            recent: VecDeque::new(),
        });
        if seq >= head.seq {
            head.seq = seq;
            head.digest = digest;
        }
        head.recent.push_back((seq, digest, log_index));
        trim(&mut head.recent, window, self.sealed_end);
    }

    /// Entries below `sealed_end` are now in sealed segments: drop the triples there that
    /// are beyond each head's window.
    pub fn prune(&mut self, sealed_end: u64) {
        self.sealed_end = sealed_end;
        for head in self.heads.values_mut() {
            trim(&mut head.recent, self.window, sealed_end);
        }
    }

    /// `did` and every descendant not yet revoked, parents first.
    pub fn active_subtree(&self, did: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![did.to_owned()];
        while let Some(next) = stack.pop() {
            let Some(record) = self.agents.get(&next) else { continue };
            if out.contains(&next) {
                continue;
            }
            if record.status != AgentStatus::Revoked {
                out.push(next.clone());
            }
            stack.extend(record.children.iter().rev().cloned());
        }
        out
    }
}

fn trim(recent: &mut VecDeque<(u64, [u8; 32], u64)>, window: usize, sealed_end: u64) {
    while recent.len() > window && recent.front().is_some_and(|(_, _, log_index)| *log_index < sealed_end) {
        recent.pop_front();
    }
}

/// Control-topic records a writer's node adds beside those of its control entries,
/// (`key`, `value`): its LastID enrollments ([`lastid_record`]).
pub type ControlNotes = std::sync::mpsc::Sender<(String, Vec<u8>)>;

/// What a writer bridged to Kafka shares with its node about the control topic: the
/// records the node adds beside its control entries go out on `notes`, and `published`
/// says how far what the node changed has reached the brokers.
pub struct ControlLink {
    pub notes: ControlNotes,
    pub published: tokio::sync::watch::Receiver<Published>,
}

/// How far a writer's control records are on the brokers: those of every control entry
/// below log index `entries`, and the first `notes` records sent on [`ControlNotes`]
/// since the start. An answer that changed the registry (an enrollment, a revocation)
/// waits for it, at most [`PUBLISH_WAIT`], so that an ingest node that reads the control
/// topic to its end after the answer knows the change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub entries: u64,
    pub notes: u64,
}

/// The longest an answer waits for its control record to reach the brokers; later, it
/// is answered anyway (the change is durable in the log, and published when the brokers
/// take it), and `custos_writer_control_waits_total{outcome="late"}` counts it.
pub const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The control-topic record of a LastID agent enrolled on this writer's node, keyed
/// `lastid:<did>`: what places the agent's audit records on its realm's partition when
/// ingest nodes pass them on (`docs/architecture.md`).
pub fn lastid_record(did: &str, realm: &str) -> (String, Vec<u8>) {
    let value = serde_json::json!({
        "v": 1,
        "type": "lastid",
        "status": "enrolled",
        "agent": did,
        "realm": realm,
    });
    (format!("lastid:{did}"), value.to_string().into_bytes())
}

/// One record of the compacted control topic: the latest state of one subject (an agent,
/// a memory, a credential), keyed `agent:<did>`, `memory:<id>` or `credential:<value>`.
/// Built from a control entry's payload; `None` for a payload that is not one.
pub fn control_record(payload: &[u8], log_index: u64) -> Option<(String, serde_json::Value)> {
    let control: ControlPayload = serde_json::from_slice(payload).ok()?;
    let (key, kind, status) = match control.action {
        ControlAction::Enroll => (format!("agent:{}", control.agent), "agent", "active"),
        ControlAction::Revoke => (format!("agent:{}", control.agent), "agent", "revoked"),
        ControlAction::Quarantine => (format!("agent:{}", control.agent), "agent", "quarantined"),
        ControlAction::Reinstate => (format!("agent:{}", control.agent), "agent", "active"),
        ControlAction::QuarantineMemory => (
            format!("memory:{}", control.subject.as_deref()?),
            "memory",
            "quarantined",
        ),
        ControlAction::RestoreMemory => (format!("memory:{}", control.subject.as_deref()?), "memory", "restored"),
        ControlAction::RevokeCredential => (
            format!("credential:{}", control.subject.as_deref()?),
            "credential",
            "revoked",
        ),
    };
    let value = serde_json::json!({
        "v": 1,
        "type": kind,
        "status": status,
        "agent": control.agent,
        "realm": control.realm,
        "subject": control.subject,
        "parent": control.parent,
        "log_index": log_index,
        "ts": control.ts,
        "by": control.by,
        "reason": control.reason,
    });
    Some((key, value))
}
