//! Custos respond: playbooks that turn findings into actions, with brakes.
//!
//! ```text
//!  finding (as signed into the log by the detector)
//!        │
//!        ▼
//!  playbooks: match type / severity / score / tags / realm
//!        │
//!        ▼
//!  brakes: idempotency key ─▶ rate + blast-radius caps (else pause + escalate)
//!        │                    ─▶ dry-run (record only)
//!        ▼
//!  ordered actions ─▶ require_approval parks the rest until approved, denied or expired
//!        │
//!        ▼
//!  ActionRecord (OCSF Remediation 7001) ─▶ signed by the responder key ─▶ Submission::Action
//!        (runner::ResponderStage)            the log writer appends it and applies the
//!                                            Enforcement it carries in the same group commit
//!        │ platform actions (vaultysclaw.*, lastid.*): platform::Platforms calls the
//!        ▼ platform first, and the record carries what it answered
//! ```
//!
//! [`Responder`] only decides: it returns [`ActionRecord`]s. [`runner::ResponderStage`]
//! reads findings as the writer committed them and submits the records; revocations and
//! quarantines are applied by the single writer, so they are ordered before the next
//! event. Nothing in [`Responder`] reads a clock: callers pass `now`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub mod platform;
pub mod runner;
pub mod webhook;

/// The finding the playbooks read: the detector's own type, read back from its signed
/// payload (one type, one severity ranking).
pub use custos_event::{Finding, Severity};

/// Which findings a playbook acts on. Every given criterion must hold.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub min_severity: Option<String>,
    #[serde(default)]
    pub min_score: Option<u8>,
    /// Any of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub realms: Vec<String>,
}

impl Match {
    pub fn matches(&self, finding: &Finding) -> bool {
        (self.types.is_empty() || self.types.contains(&finding.finding_type))
            && self
                .min_severity
                .as_deref()
                .is_none_or(|min| Severity::parse(min).is_none_or(|min| finding.severity >= min))
            && self.min_score.is_none_or(|min| finding.score >= min)
            && (self.tags.is_empty() || self.tags.iter().any(|tag| finding.tags.contains(tag)))
            && (self.realms.is_empty() || self.realms.contains(&finding.realm))
    }
}

/// Rate and blast-radius caps, per playbook and realm, over a sliding hour.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    #[serde(default = "default_rate")]
    pub max_actions_per_hour: usize,
    #[serde(default = "default_blast")]
    pub max_agents_per_hour: usize,
}

fn default_rate() -> usize {
    60
}

fn default_blast() -> usize {
    5
}

impl Default for Caps {
    fn default() -> Self {
        Self {
            max_actions_per_hour: default_rate(),
            max_agents_per_hour: default_blast(),
        }
    }
}

/// One step of a playbook.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionSpec {
    /// Revoke the agent; ingest cascades to its sub-agents.
    RevokeAgent {},
    /// Mark the agent quarantined: its events are still stored, the control feed says so.
    QuarantineAgent {},
    /// Quarantine `memory_id`, or every memory the agent wrote in the finding's window.
    QuarantineMemory {
        #[serde(default)]
        memory_id: Option<String>,
    },
    RevokeCredential {
        credential: String,
    },
    /// POST the finding as JSON, signed with HMAC-SHA256 of the body
    /// (`X-Custos-Signature: sha256=<hex>`), retried with backoff.
    Webhook {
        url: String,
        /// Name of the environment variable holding the HMAC secret (never the secret).
        secret_env: String,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        #[serde(default = "default_retries")]
        retries: u32,
    },
    /// Disconnect the finding's agent from VaultysClaw (`DELETE /api/agents/{did}`, its
    /// record read first so an undo can restore it).
    #[serde(rename = "vaultysclaw.disconnect_agent")]
    VaultysclawDisconnectAgent {},
    /// Delete a VaultysClaw policy (`DELETE /api/policies/{id}`, read first for undo).
    #[serde(rename = "vaultysclaw.revoke_policy")]
    VaultysclawRevokePolicy {
        policy_id: String,
    },
    /// Recommend that LastID's operator revoke the finding's agent: a recommendation
    /// signed by the responder key, POSTed to the operator webhook (LastID accepts a
    /// revocation only when its operator signs it, so put `require_approval` first).
    #[serde(rename = "lastid.revoke_agent")]
    LastidRevokeAgent {},
    /// The same for the memories the agent wrote in the finding's window (or `memory_id`).
    #[serde(rename = "lastid.quarantine_memory")]
    LastidQuarantineMemory {
        #[serde(default)]
        memory_id: Option<String>,
    },
    /// Park the remaining actions until a responder approves or denies them.
    RequireApproval {
        #[serde(default = "default_expiry")]
        expires_in_secs: i64,
    },
}

fn default_timeout_ms() -> u64 {
    2000
}

fn default_retries() -> u32 {
    3
}

fn default_expiry() -> i64 {
    3600
}

impl ActionSpec {
    pub fn name(&self) -> &'static str {
        match self {
            ActionSpec::RevokeAgent {} => "revoke_agent",
            ActionSpec::QuarantineAgent {} => "quarantine_agent",
            ActionSpec::QuarantineMemory { .. } => "quarantine_memory",
            ActionSpec::RevokeCredential { .. } => "revoke_credential",
            ActionSpec::Webhook { .. } => "webhook",
            ActionSpec::VaultysclawDisconnectAgent {} => "vaultysclaw.disconnect_agent",
            ActionSpec::VaultysclawRevokePolicy { .. } => "vaultysclaw.revoke_policy",
            ActionSpec::LastidRevokeAgent {} => "lastid.revoke_agent",
            ActionSpec::LastidQuarantineMemory { .. } => "lastid.quarantine_memory",
            ActionSpec::RequireApproval { .. } => "require_approval",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Playbook {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Record what would be done, do nothing.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(rename = "match")]
    pub matcher: Match,
    #[serde(default)]
    pub caps: Caps,
    pub actions: Vec<ActionSpec>,
}

impl Playbook {
    /// A playbook known only by name: records of approvals and undos whose playbook has
    /// since been removed still say where they came from.
    fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            description: String::new(),
            dry_run: false,
            matcher: Match::default(),
            caps: Caps::default(),
            actions: Vec::new(),
        }
    }
}

/// The playbooks shipped in `respond/playbooks/`.
pub const SHIPPED: [(&str, &str); 3] = [
    ("contain.yml", include_str!("../playbooks/contain.yml")),
    ("review.yml", include_str!("../playbooks/review.yml")),
    ("tool.yml", include_str!("../playbooks/tool.yml")),
];

#[derive(Debug, thiserror::Error)]
pub enum RespondError {
    #[error("playbook `{file}`: {message}")]
    Playbook { file: String, message: String },
    #[error("cannot read `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("no pending approval `{0}`")]
    NoApproval(String),
    #[error("no action `{0}`")]
    NoAction(String),
    #[error("action `{id}` ({action}) cannot be undone")]
    NotUndoable { id: String, action: String },
    #[error("no playbook `{0}`")]
    NoPlaybook(String),
    #[error("playbook `{playbook}` is not paused in realm `{realm}`")]
    NotPaused { playbook: String, realm: String },
}

/// The `action` of the record that a person's resume of a paused playbook writes.
pub const RESUME_ACTION: &str = "resume_playbook";

pub fn parse_playbook(file: &str, text: &str) -> Result<Playbook, RespondError> {
    let fail = |message: String| RespondError::Playbook {
        file: file.to_owned(),
        message,
    };
    // Through JSON: actions are written `- revoke_agent: {}`, a single-key map, which is
    // serde's externally tagged form.
    let value: Value = yaml_serde::from_str(text).map_err(|error| fail(error.to_string()))?;
    let playbook: Playbook = serde_json::from_value(value).map_err(|error| fail(error.to_string()))?;
    if playbook.actions.is_empty() {
        return Err(RespondError::Playbook {
            file: file.into(),
            message: "`actions` is empty".into(),
        });
    }
    check_name(&playbook.name).map_err(fail)?;
    if let Some(min) = &playbook.matcher.min_severity
        && Severity::parse(min).is_none()
    {
        return Err(fail(format!(
            "`min_severity: {min}` is not a severity; use low, medium, high or critical"
        )));
    }
    Ok(playbook)
}

/// The longest playbook name accepted.
pub const MAX_PLAYBOOK_NAME: usize = 64;

/// A playbook's name keys its caps and pauses and appears in URLs
/// (`/v1/playbooks/{name}/resume`), so it is kept to letters, digits, `.`, `_` and `-`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_PLAYBOOK_NAME {
        return Err(format!(
            "name `{name}` must be 1 to {MAX_PLAYBOOK_NAME} characters long (it is {})",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name `{name}` has `{}`; use only ASCII letters, digits, `.`, `_` and `-`",
            bad.escape_default()
        ));
    }
    Ok(())
}

/// The shipped playbooks (unless `shipped` is false) plus every YAML file in `dir`.
pub fn load_playbooks(shipped: bool, dir: Option<&Path>) -> Result<Vec<Playbook>, RespondError> {
    let mut out = Vec::new();
    if shipped {
        for (file, text) in SHIPPED {
            out.push(parse_playbook(file, text)?);
        }
    }
    if let Some(dir) = dir {
        let io = |source| RespondError::Io {
            path: dir.display().to_string(),
            source,
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "yml" || ext == "yaml"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| RespondError::Io {
                path: path.display().to_string(),
                source,
            })?;
            let file = path.display().to_string();
            let playbook = parse_playbook(&file, &text)?;
            // Caps, pauses and the action log know a playbook by its name: two with one
            // name would share a cap and resume together.
            if out.iter().any(|other: &Playbook| other.name == playbook.name) {
                return Err(RespondError::Playbook {
                    file,
                    message: format!(
                        "name `{}` is already taken by another playbook (a shipped one, or a file sorted earlier)",
                        playbook.name
                    ),
                });
            }
            out.push(playbook);
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Carried out (or to be carried out now by the node).
    Executed,
    DryRun,
    /// Waiting for approval.
    Pending,
    Denied,
    Expired,
    /// A cap was hit: the playbook is paused for the realm and a person must look.
    Escalated,
    Failed,
}

pub use custos_stage::Enforcement;

/// One action, in every state it passes through. Signed into the log by the responder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ActionRecord {
    pub id: String,
    pub idempotency_key: String,
    pub playbook: String,
    pub finding_id: String,
    pub agent: String,
    pub realm: String,
    /// `revoke_agent`, `quarantine_memory`, ..., `reinstate_agent`, `restore_memory`.
    pub action: String,
    /// What the action is about: the agent, memory id, credential or URL.
    pub target: String,
    pub status: ActionStatus,
    pub reason: String,
    /// `playbook:<name>`, or `token:<id>` for a person's decision.
    pub by: String,
    pub ts: DateTime<Utc>,
    pub approval_id: Option<String>,
    /// The action an undo reverses.
    pub undoes: Option<String>,
    pub enforcement: Enforcement,
    /// On a `pending` record: the approval itself, so a restarted responder still has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// For a platform action: what the platform answered, and the object as it was
    /// before (what an undo restores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Value>,
}

impl ActionRecord {
    /// OCSF Remediation Activity (class 7001).
    pub fn ocsf(&self) -> Value {
        let (status_id, status) = match self.status {
            ActionStatus::Executed => (1, "Success"),
            ActionStatus::Failed => (2, "Failure"),
            _ => (99, "Other"),
        };
        json!({
            "class_uid": 7001,
            "class_name": "Remediation Activity",
            "category_uid": 7,
            "category_name": "Remediation",
            "activity_id": if self.undoes.is_some() { 2 } else { 1 },
            "activity_name": if self.undoes.is_some() { "Restore" } else { "Isolate" },
            "type_uid": 700_100 + if self.undoes.is_some() { 2 } else { 1 },
            "time": self.ts.timestamp_millis(),
            "status_id": status_id,
            "status": status,
            "status_detail": format!("{:?}", self.status).to_ascii_lowercase(),
            "message": self.reason,
            "command_uid": self.id,
            "remediation": { "desc": self.action, "kb_articles": [] },
            "actor": { "user": { "uid": self.by } },
            "resources": [{ "uid": self.target, "type": self.action, "owner": { "uid": self.agent } }],
            "unmapped": { "custos": {
                "playbook": self.playbook, "finding_id": self.finding_id, "realm": self.realm,
                "idempotency_key": self.idempotency_key, "approval_id": self.approval_id, "undoes": self.undoes,
            } },
            "metadata": custos_event::ocsf_metadata(),
        })
    }
}

/// An approval waiting for a decision.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Approval {
    pub id: String,
    pub playbook: String,
    pub finding: Finding,
    /// The actions that run once approved (for an undo: the undo itself).
    pub remaining: Vec<ActionSpec>,
    pub undo_of: Option<String>,
    pub requested_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Default)]
struct CapState {
    actions: VecDeque<i64>,
    agents: VecDeque<(i64, String)>,
    paused: bool,
}

/// The responder's state: playbooks, approvals, caps, idempotency, recent history.
pub struct Responder {
    playbooks: Vec<Playbook>,
    pending: BTreeMap<String, Approval>,
    caps: HashMap<(String, String), CapState>,
    done: HashSet<String>,
    history: VecDeque<ActionRecord>,
    counter: u64,
}

const HISTORY: usize = 10_000;

impl Responder {
    pub fn new(playbooks: Vec<Playbook>) -> Self {
        Self {
            playbooks,
            pending: BTreeMap::new(),
            caps: HashMap::new(),
            done: HashSet::new(),
            history: VecDeque::new(),
            counter: 0,
        }
    }

    pub fn playbooks(&self) -> &[Playbook] {
        &self.playbooks
    }

    pub fn pending(&self) -> Vec<Approval> {
        self.pending.values().cloned().collect()
    }

    /// Recent action records, newest last.
    pub fn history(&self) -> impl Iterator<Item = &ActionRecord> {
        self.history.iter()
    }

    fn next_id(&mut self, prefix: &str, seed: &str) -> String {
        self.counter += 1;
        let hash = blake3::hash(format!("{seed}|{}", self.counter).as_bytes());
        format!("{prefix}-{}", &hash.to_hex()[..12])
    }

    /// Rebuilds idempotency, approvals, the brakes and history from a record read back
    /// from the log.
    pub fn remember(&mut self, record: &ActionRecord) {
        self.remember_caps(record);
        self.counter += 1;
        self.done.insert(record.idempotency_key.clone());
        if record.status == ActionStatus::Pending
            && let Some(approval) = &record.approval
        {
            self.pending.insert(approval.id.clone(), approval.clone());
        }
        if let Some(approval) = &record.approval_id
            && matches!(
                record.status,
                ActionStatus::Denied | ActionStatus::Expired | ActionStatus::Executed
            )
        {
            self.pending.remove(approval);
        }
        self.push(record.clone());
    }

    /// What `record` did to its playbook's caps in its realm, replayed: an action that
    /// counted against them (executed, or executed and then failed to enforce), a pause
    /// (escalated), or a person's resume. So a restart neither forgets a pause nor
    /// refills the hour's budget.
    fn remember_caps(&mut self, record: &ActionRecord) {
        let key = (record.playbook.clone(), record.realm.clone());
        if record.action == RESUME_ACTION {
            if record.status == ActionStatus::Executed
                && let Some(state) = self.caps.get_mut(&key)
            {
                state.paused = false;
            }
            return;
        }
        // An undo runs outside the caps; a webhook's failure is a second record of an
        // action already counted.
        let counted = record.undoes.is_none()
            && match record.status {
                ActionStatus::Executed => true,
                ActionStatus::Failed => !record.idempotency_key.ends_with("|failed"),
                _ => false,
            };
        if record.status == ActionStatus::Escalated {
            self.caps.entry(key).or_default().paused = true;
        } else if counted {
            let state = self.caps.entry(key).or_default();
            let at = record.ts.timestamp();
            state.actions.push_back(at);
            state.agents.push_back((at, record.agent.clone()));
            // Records come back in log order: keep the last hour only.
            let hour_ago = at - 3600;
            while state.actions.front().is_some_and(|ts| *ts < hour_ago) {
                state.actions.pop_front();
            }
            while state.agents.front().is_some_and(|(ts, _)| *ts < hour_ago) {
                state.agents.pop_front();
            }
        }
    }

    /// The (playbook, realm) pairs paused by a cap, waiting for a person.
    pub fn paused(&self) -> Vec<(String, String)> {
        let mut paused: Vec<(String, String)> = self
            .caps
            .iter()
            .filter(|(_, state)| state.paused)
            .map(|(key, _)| key.clone())
            .collect();
        paused.sort();
        paused
    }

    /// A person resumes `playbook` in `realm` after a cap paused it: the record to write
    /// to the log (which is what a restarted responder reads the resume from). The
    /// hour's counts stay: a resume lifts the pause, not the caps.
    pub fn resume_paused(
        &mut self,
        playbook: &str,
        realm: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<ActionRecord, RespondError> {
        let known = self
            .playbooks
            .iter()
            .find(|known| known.name == playbook)
            .cloned()
            .ok_or_else(|| RespondError::NoPlaybook(playbook.to_owned()))?;
        if !self.resume(playbook, realm) {
            return Err(RespondError::NotPaused {
                playbook: playbook.to_owned(),
                realm: realm.to_owned(),
            });
        }
        let id = self.next_id("resume", &format!("{playbook}|{realm}"));
        let occasion = Finding {
            id: id.clone(),
            agent: String::new(),
            realm: realm.to_owned(),
            finding_type: "resume".into(),
            score: 0,
            severity: Severity::Low,
            tags: Vec::new(),
            memories: Vec::new(),
            title: format!("resume playbook `{playbook}` in realm `{realm}`"),
            ts: now,
            ..Finding::default()
        };
        Ok(self.record(
            &known,
            &occasion,
            RESUME_ACTION,
            playbook.to_owned(),
            ActionStatus::Executed,
            format!("{by} resumed playbook `{playbook}` in realm `{realm}` after a cap paused it"),
            by,
            now,
            format!("resume|{id}"),
            None,
            Enforcement::None,
        ))
    }

    fn push(&mut self, record: ActionRecord) {
        if self.history.len() >= HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(record);
    }

    /// Runs every matching playbook on `finding`.
    pub fn on_finding(&mut self, finding: &Finding, now: DateTime<Utc>) -> Vec<ActionRecord> {
        let playbooks: Vec<Playbook> = self
            .playbooks
            .iter()
            .filter(|playbook| playbook.matcher.matches(finding))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for playbook in playbooks {
            out.extend(self.run(&playbook, finding, &playbook.actions, None, now, "playbook"));
        }
        out
    }

    /// Runs `actions` of `playbook` for `finding`, stopping at an approval gate.
    fn run(
        &mut self,
        playbook: &Playbook,
        finding: &Finding,
        actions: &[ActionSpec],
        approval_id: Option<&str>,
        now: DateTime<Utc>,
        by: &str,
    ) -> Vec<ActionRecord> {
        let by = if by == "playbook" {
            format!("playbook:{}", playbook.name)
        } else {
            by.to_owned()
        };
        let mut out = Vec::new();
        for (position, spec) in actions.iter().enumerate() {
            if let ActionSpec::RequireApproval { expires_in_secs } = spec {
                let id = self.next_id("appr", &finding.id);
                let key = format!("{}|{}|approval|{}", playbook.name, finding.id, actions.len() - position);
                if !self.done.insert(key.clone()) {
                    return out;
                }
                let approval = Approval {
                    id: id.clone(),
                    playbook: playbook.name.clone(),
                    finding: finding.clone(),
                    remaining: actions[position + 1..].to_vec(),
                    undo_of: None,
                    requested_at: now,
                    expires_at: now + chrono::Duration::seconds(*expires_in_secs),
                };
                let record = self.record(
                    playbook,
                    finding,
                    "require_approval",
                    finding.agent.clone(),
                    ActionStatus::Pending,
                    format!(
                        "waiting for a responder to approve {} until {}",
                        approval
                            .remaining
                            .iter()
                            .map(ActionSpec::name)
                            .collect::<Vec<_>>()
                            .join(", "),
                        approval.expires_at.to_rfc3339()
                    ),
                    &by,
                    now,
                    key,
                    Some(id.clone()),
                    Enforcement::None,
                );
                if playbook.dry_run {
                    let mut record = record;
                    record.status = ActionStatus::DryRun;
                    out.push(record);
                    continue;
                }
                let mut record = record;
                record.approval = Some(approval.clone());
                if let Some(last) = self.history.back_mut() {
                    last.approval = Some(approval.clone());
                }
                self.pending.insert(id, approval);
                out.push(record);
                return out;
            }
            for (target, enforcement) in targets(spec, finding) {
                let key = format!("{}|{}|{}|{}", playbook.name, finding.id, spec.name(), target);
                if !self.done.insert(key.clone()) {
                    tracing::debug!(key, "action already taken; idempotency key matched");
                    continue;
                }
                let (status, reason) = if playbook.dry_run {
                    (
                        ActionStatus::DryRun,
                        format!("dry run: would {} `{target}`", spec.name()),
                    )
                } else if let Some(reason) = self.over_cap(playbook, finding, now) {
                    (ActionStatus::Escalated, reason)
                } else {
                    (
                        ActionStatus::Executed,
                        format!("{} on finding {} ({})", spec.name(), finding.id, finding.title),
                    )
                };
                let enforcement = if status == ActionStatus::Executed {
                    enforcement
                } else {
                    Enforcement::None
                };
                out.push(self.record(
                    playbook,
                    finding,
                    spec.name(),
                    target,
                    status,
                    reason,
                    &by,
                    now,
                    key,
                    approval_id.map(str::to_owned),
                    enforcement,
                ));
            }
        }
        out
    }

    /// Counts an action against the caps; the reason when it must not run.
    fn over_cap(&mut self, playbook: &Playbook, finding: &Finding, now: DateTime<Utc>) -> Option<String> {
        let state = self
            .caps
            .entry((playbook.name.clone(), finding.realm.clone()))
            .or_default();
        let hour_ago = now.timestamp() - 3600;
        while state.actions.front().is_some_and(|ts| *ts < hour_ago) {
            state.actions.pop_front();
        }
        while state.agents.front().is_some_and(|(ts, _)| *ts < hour_ago) {
            state.agents.pop_front();
        }
        if state.paused {
            return Some(format!(
                "playbook `{}` is paused in realm `{}` after hitting a cap; resume it once reviewed",
                playbook.name, finding.realm
            ));
        }
        let new_agent = !state.agents.iter().any(|(_, agent)| *agent == finding.agent);
        let agents = state
            .agents
            .iter()
            .map(|(_, agent)| agent.as_str())
            .collect::<HashSet<_>>()
            .len()
            + usize::from(new_agent);
        if state.actions.len() >= playbook.caps.max_actions_per_hour {
            state.paused = true;
            return Some(format!(
                "rate cap: {} actions in the last hour in realm `{}` (max {}); playbook paused and escalated",
                state.actions.len(),
                finding.realm,
                playbook.caps.max_actions_per_hour
            ));
        }
        if agents > playbook.caps.max_agents_per_hour {
            state.paused = true;
            return Some(format!(
                "blast-radius cap: acting on agent {agents} in realm `{}` within an hour (max {}); playbook paused and escalated",
                finding.realm, playbook.caps.max_agents_per_hour
            ));
        }
        state.actions.push_back(now.timestamp());
        state.agents.push_back((now.timestamp(), finding.agent.clone()));
        None
    }

    /// Lifts a pause set by a cap (the node goes through [`Responder::resume_paused`],
    /// which records it).
    fn resume(&mut self, playbook: &str, realm: &str) -> bool {
        self.caps
            .get_mut(&(playbook.to_owned(), realm.to_owned()))
            .is_some_and(|state| std::mem::replace(&mut state.paused, false))
    }

    #[expect(clippy::too_many_arguments, reason = "one argument per record field")]
    fn record(
        &mut self,
        playbook: &Playbook,
        finding: &Finding,
        action: &str,
        target: String,
        status: ActionStatus,
        reason: String,
        by: &str,
        now: DateTime<Utc>,
        idempotency_key: String,
        approval_id: Option<String>,
        enforcement: Enforcement,
    ) -> ActionRecord {
        let record = ActionRecord {
            id: self.next_id("act", &idempotency_key),
            idempotency_key,
            playbook: playbook.name.clone(),
            finding_id: finding.id.clone(),
            agent: finding.agent.clone(),
            realm: finding.realm.clone(),
            action: action.to_owned(),
            target,
            status,
            reason,
            by: by.to_owned(),
            ts: now,
            approval_id,
            undoes: None,
            enforcement,
            approval: None,
            platform: None,
        };
        self.push(record.clone());
        record
    }

    /// Replaces the remembered record with the same id (a platform action, once the
    /// platform answered).
    pub fn amend(&mut self, record: &ActionRecord) {
        if let Some(known) = self.history.iter_mut().rev().find(|known| known.id == record.id) {
            *known = record.clone();
        }
    }

    /// Approves a pending approval: its remaining actions run now.
    pub fn approve(&mut self, id: &str, by: &str, now: DateTime<Utc>) -> Result<Vec<ActionRecord>, RespondError> {
        let approval = self.take_live(id, now)?;
        let playbook = self
            .playbooks
            .iter()
            .find(|playbook| playbook.name == approval.playbook)
            .cloned()
            .unwrap_or_else(|| Playbook::named(&approval.playbook));
        if let Some(action_id) = &approval.undo_of {
            return Ok(vec![self.undo_now(&playbook, &approval, action_id, by, now)?]);
        }
        Ok(self.run(&playbook, &approval.finding, &approval.remaining, Some(id), now, by))
    }

    /// Denies a pending approval; nothing runs, and the denial is recorded.
    pub fn deny(&mut self, id: &str, by: &str, now: DateTime<Utc>) -> Result<ActionRecord, RespondError> {
        let approval = self.take_live(id, now)?;
        Ok(self.closed(&approval, ActionStatus::Denied, format!("denied by {by}"), by, now))
    }

    /// Expires approvals past their deadline.
    pub fn expire(&mut self, now: DateTime<Utc>) -> Vec<ActionRecord> {
        let expired: Vec<Approval> = self
            .pending
            .values()
            .filter(|approval| approval.expires_at <= now)
            .cloned()
            .collect();
        expired
            .into_iter()
            .map(|approval| {
                self.pending.remove(&approval.id);
                self.closed(
                    &approval,
                    ActionStatus::Expired,
                    format!("no decision by {}", approval.expires_at.to_rfc3339()),
                    "custos",
                    now,
                )
            })
            .collect()
    }

    fn take_live(&mut self, id: &str, now: DateTime<Utc>) -> Result<Approval, RespondError> {
        let approval = self
            .pending
            .remove(id)
            .ok_or_else(|| RespondError::NoApproval(id.to_owned()))?;
        if approval.expires_at <= now {
            let record = self.closed(
                &approval,
                ActionStatus::Expired,
                "expired before the decision".into(),
                "custos",
                now,
            );
            tracing::info!(approval = id, record = record.id, "approval expired");
            return Err(RespondError::NoApproval(format!("{id} (expired)")));
        }
        Ok(approval)
    }

    fn closed(
        &mut self,
        approval: &Approval,
        status: ActionStatus,
        reason: String,
        by: &str,
        now: DateTime<Utc>,
    ) -> ActionRecord {
        let playbook = Playbook::named(&approval.playbook);
        let action = approval
            .undo_of
            .as_ref()
            .map_or("require_approval".to_owned(), |_| "undo".to_owned());
        let key = format!("{}|{:?}", approval.id, status);
        self.record(
            &playbook,
            &approval.finding,
            &action,
            approval.finding.agent.clone(),
            status,
            reason,
            by,
            now,
            key,
            Some(approval.id.clone()),
            Enforcement::None,
        )
    }

    /// Asks to undo an executed action (reinstate an agent, restore a memory). Undo always
    /// needs approval: this only creates the pending approval.
    pub fn request_undo(
        &mut self,
        action_id: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<ActionRecord, RespondError> {
        let record = self
            .history
            .iter()
            .find(|record| record.id == action_id && record.status == ActionStatus::Executed)
            .cloned()
            .ok_or_else(|| RespondError::NoAction(action_id.to_owned()))?;
        if !matches!(
            record.action.as_str(),
            "revoke_agent"
                | "quarantine_agent"
                | "quarantine_memory"
                | "vaultysclaw.disconnect_agent"
                | "vaultysclaw.revoke_policy"
        ) {
            return Err(RespondError::NotUndoable {
                id: record.id,
                action: record.action,
            });
        }
        let id = self.next_id("appr", action_id);
        let finding = Finding {
            id: record.finding_id.clone(),
            agent: record.agent.clone(),
            realm: record.realm.clone(),
            finding_type: "undo".into(),
            score: 0,
            severity: Severity::Low,
            tags: Vec::new(),
            memories: Vec::new(),
            title: format!("undo {} of `{}`", record.action, record.target),
            ts: now,
            ..Finding::default()
        };
        let approval = Approval {
            id: id.clone(),
            playbook: record.playbook.clone(),
            finding: finding.clone(),
            remaining: Vec::new(),
            undo_of: Some(action_id.to_owned()),
            requested_at: now,
            expires_at: now + chrono::Duration::hours(24),
        };
        self.pending.insert(id.clone(), approval.clone());
        let playbook = Playbook::named(&record.playbook);
        let undo_approval = approval;
        let mut pending = self.record(
            &playbook,
            &finding,
            "undo",
            record.target.clone(),
            ActionStatus::Pending,
            format!(
                "{by} asks to undo {} of `{}`; needs approval",
                record.action, record.target
            ),
            by,
            now,
            format!("undo-request|{action_id}|{id}"),
            Some(id),
            Enforcement::None,
        );
        pending.undoes = Some(action_id.to_owned());
        pending.approval = Some(undo_approval);
        if let Some(last) = self.history.back_mut() {
            last.undoes = Some(action_id.to_owned());
            last.approval = pending.approval.clone();
        }
        Ok(pending)
    }

    fn undo_now(
        &mut self,
        playbook: &Playbook,
        approval: &Approval,
        action_id: &str,
        by: &str,
        now: DateTime<Utc>,
    ) -> Result<ActionRecord, RespondError> {
        let original = self
            .history
            .iter()
            .find(|record| record.id == action_id)
            .cloned()
            .ok_or_else(|| RespondError::NoAction(action_id.to_owned()))?;
        let platform = |operation: &str| Enforcement::Platform {
            platform: "vaultysclaw".into(),
            operation: operation.into(),
            subject: original.target.clone(),
        };
        let (action, enforcement) = match original.action.as_str() {
            "vaultysclaw.disconnect_agent" => ("vaultysclaw.restore_agent", platform("restore_agent")),
            "vaultysclaw.revoke_policy" => ("vaultysclaw.restore_policy", platform("restore_policy")),
            "quarantine_memory" => (
                "restore_memory",
                Enforcement::RestoreMemory {
                    memory_id: original.target.clone(),
                    agent: original.agent.clone(),
                },
            ),
            _ => (
                "reinstate_agent",
                Enforcement::ReinstateAgent {
                    agent: original.agent.clone(),
                },
            ),
        };
        let mut record = self.record(
            playbook,
            &approval.finding,
            action,
            original.target.clone(),
            ActionStatus::Executed,
            format!("undo of {} approved by {by}", original.action),
            by,
            now,
            format!("undo|{action_id}"),
            Some(approval.id.clone()),
            enforcement,
        );
        record.undoes = Some(action_id.to_owned());
        // What the platform had before the original action: what the undo puts back.
        record.platform = original
            .platform
            .as_ref()
            .map(|answer| json!({ "snapshot": answer["snapshot"].clone() }));
        if let Some(last) = self.history.back_mut() {
            last.undoes = Some(action_id.to_owned());
            last.platform = record.platform.clone();
        }
        Ok(record)
    }
}

/// The targets one action spec applies to for a finding, with what enforcing means.
fn targets(spec: &ActionSpec, finding: &Finding) -> Vec<(String, Enforcement)> {
    let agent = finding.agent.clone();
    match spec {
        ActionSpec::RevokeAgent {} => vec![(agent.clone(), Enforcement::RevokeAgent { agent })],
        ActionSpec::QuarantineAgent {} => vec![(agent.clone(), Enforcement::QuarantineAgent { agent })],
        ActionSpec::QuarantineMemory { memory_id } => {
            let memories = match memory_id {
                Some(memory) => vec![memory.clone()],
                None => finding.memories.clone(),
            };
            memories
                .into_iter()
                .map(|memory_id| {
                    (
                        memory_id.clone(),
                        Enforcement::QuarantineMemory {
                            memory_id,
                            agent: agent.clone(),
                        },
                    )
                })
                .collect()
        }
        ActionSpec::RevokeCredential { credential } => vec![(
            credential.clone(),
            Enforcement::RevokeCredential {
                credential: credential.clone(),
                agent,
            },
        )],
        ActionSpec::Webhook {
            url,
            secret_env,
            timeout_ms,
            retries,
        } => vec![(
            url.clone(),
            Enforcement::Webhook {
                url: url.clone(),
                secret_env: secret_env.clone(),
                timeout_ms: *timeout_ms,
                retries: *retries,
            },
        )],
        ActionSpec::VaultysclawDisconnectAgent {} => vec![(
            agent.clone(),
            Enforcement::Platform {
                platform: "vaultysclaw".into(),
                operation: "disconnect_agent".into(),
                subject: agent,
            },
        )],
        ActionSpec::VaultysclawRevokePolicy { policy_id } => vec![(
            policy_id.clone(),
            Enforcement::Platform {
                platform: "vaultysclaw".into(),
                operation: "revoke_policy".into(),
                subject: policy_id.clone(),
            },
        )],
        ActionSpec::LastidRevokeAgent {} => vec![(
            agent.clone(),
            Enforcement::Platform {
                platform: "lastid".into(),
                operation: "revoke_agent".into(),
                subject: agent,
            },
        )],
        ActionSpec::LastidQuarantineMemory { memory_id } => {
            let memories = match memory_id {
                Some(memory) => vec![memory.clone()],
                None => finding.memories.clone(),
            };
            memories
                .into_iter()
                .map(|memory| {
                    (
                        memory.clone(),
                        Enforcement::Platform {
                            platform: "lastid".into(),
                            operation: "quarantine_memory".into(),
                            subject: memory,
                        },
                    )
                })
                .collect()
        }
        ActionSpec::RequireApproval { .. } => Vec::new(),
    }
}
