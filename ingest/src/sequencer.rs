//! The single writer of a log: registry and chain checks, index assignment, group commit.
//!
//! One OS thread owns the log. Requests queue on a channel; the thread takes everything
//! queued, checks each item against the registry and the chain heads (so a revocation
//! queued before an event is always seen by it), appends all resulting entries to the WAL
//! with one fsync, and only then answers every request in the group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_event::{
    AgentKey, CONTROL_PAYLOAD_TYPE, ChainState, EVENT_PAYLOAD_TYPE, Kind, Payload, Reason, Rejection, Verified,
};
use custos_store::{Log, LogEntry};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::forensics::{Forensics, RejectedRecord};
use crate::registry::{AgentRecord, AgentStatus, ControlAction, ControlPayload, Registry};
use crate::{ApiError, NodeConfig};

/// An input after decoding and signature verification.
#[derive(Debug)]
pub struct Item {
    pub raw: Vec<u8>,
    pub keyid: Option<String>,
    pub outcome: Result<Verified, Rejection>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Accepted,
    Duplicate,
    Rejected,
}

/// The answer for one input, in request order.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ItemResult {
    pub index: usize,
    pub status: Status,
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub log_index: Option<u64>,
    /// Flags on an accepted event, such as `chain_gap`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<&'static str>,
    /// For `chain_gap`: the inclusive range of missing `seq`s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<[u64; 2]>,
}

/// Result of a revocation: every agent revoked, parents first.
#[derive(Clone, Debug, Serialize)]
pub struct Revoked {
    pub revoked: Vec<String>,
    pub log_indexes: Vec<u64>,
}

type Answer<T> = oneshot::Sender<Result<T, ApiError>>;

/// Work for the sequencer.
pub enum Command {
    Ingest {
        items: Vec<Item>,
        remote: String,
        reply: Answer<Vec<ItemResult>>,
    },
    Enroll {
        did: String,
        realm: String,
        labels: BTreeMap<String, String>,
        by: String,
        reply: Answer<AgentRecord>,
    },
    Revoke {
        did: String,
        reason: Option<String>,
        by: String,
        reply: Answer<Revoked>,
    },
    Agents {
        reply: Answer<Vec<AgentRecord>>,
    },
    Rejected {
        reason: Option<String>,
        limit: usize,
        reply: Answer<Vec<RejectedRecord>>,
    },
    Checkpoint {
        reply: Answer<CheckpointView>,
    },
    Shutdown {
        reply: Answer<()>,
    },
}

/// The latest signed checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointView {
    pub log_id: String,
    pub origin: String,
    pub size: u64,
    pub root: String,
    pub note: String,
    pub verifier_key: String,
}

/// A deferred answer, sent once the group is durable (or failed).
type Deferred = Box<dyn FnOnce(Option<&ApiError>) + Send>;

fn defer<T: Send + 'static>(reply: Answer<T>, value: Result<T, ApiError>) -> Deferred {
    Box::new(move |failure: Option<&ApiError>| {
        let _ = reply.send(match failure {
            Some(error) => Err(error.clone()),
            None => value,
        });
    })
}

pub(crate) struct Sequencer {
    log: Log,
    registry: Registry,
    forensics: Forensics,
    node_key: AgentKey,
    node_chain: ChainState,
    config: NodeConfig,
    failed: Option<ApiError>,
    ready: Arc<AtomicBool>,
}

impl Sequencer {
    pub(crate) fn open(
        config: NodeConfig,
        node_key: AgentKey,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, crate::NodeError> {
        let info = custos_store::StoreInfo::open(&config.data, true)?;
        let mut registry = Registry::new(config.chain_window);
        let mut node_chain = ChainState::default();
        let node_did = node_key.did().to_owned();
        let mut fold = |entry: &LogEntry| fold_entry(entry, &node_did, &mut registry, &mut node_chain);
        let log = Log::open(
            &config.data,
            &info.store_id,
            custos_store::DEFAULT_LOG_ID,
            config.log.clone(),
            custos_store::OpenMode::ReadWrite,
            &mut fold,
        )?;
        let forensics = Forensics::open(
            &config.data.join("rejected"),
            config.rejected_max_records,
            config.rejected_max_bytes,
        )?;
        tracing::info!(
            entries = log.next_index(),
            agents = registry.agents.len(),
            "store recovered"
        );
        Ok(Self {
            log,
            registry,
            forensics,
            node_key,
            node_chain,
            config,
            failed: None,
            ready,
        })
    }

    /// Runs until a `Shutdown` command or until every sender is gone.
    pub(crate) fn run(mut self, commands: mpsc::Receiver<Command>) {
        loop {
            let first = match commands.recv_timeout(Duration::from_millis(200)) {
                Ok(command) => command,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.maintain();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut group = vec![first];
            while group.len() < 256 {
                match commands.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            let mut entries = Vec::new();
            let mut answers: Vec<Deferred> = Vec::new();
            let mut shutdown = None;
            for command in group {
                match command {
                    Command::Shutdown { reply } => shutdown = Some(reply),
                    command => answers.push(self.handle(command, &mut entries)),
                }
            }
            let failure = self.commit(entries);
            for answer in answers {
                answer(failure.as_ref());
            }
            if let Some(reply) = shutdown {
                self.ready.store(false, Ordering::SeqCst);
                let result = match self.failed.clone() {
                    Some(error) => Err(error),
                    None => self.log.seal().map_err(|error| ApiError::store(&error)),
                };
                let result = result.and_then(|()| {
                    self.log
                        .checkpoint()
                        .map(|_| ())
                        .map_err(|error| ApiError::store(&error))
                });
                tracing::info!(
                    entries = self.log.next_index(),
                    "log sealed and checkpointed for shutdown"
                );
                let _ = reply.send(result);
                return;
            }
            self.maintain();
        }
    }

    fn maintain(&mut self) {
        if self.failed.is_some() {
            return;
        }
        if let Err(error) = self.log.maintain() {
            self.fail(&error);
        }
    }

    fn fail(&mut self, error: &custos_store::StoreError) {
        tracing::error!(%error, "store write failed; refusing further writes until restart");
        self.failed = Some(ApiError::store(error));
        self.ready.store(false, Ordering::SeqCst);
    }

    /// Makes the group durable. Returns the error every request in it must get, if any.
    fn commit(&mut self, entries: Vec<LogEntry>) -> Option<ApiError> {
        if let Err(error) = self.forensics.flush() {
            tracing::error!(%error, "could not persist rejected input for forensics");
        }
        if let Some(error) = &self.failed {
            return Some(error.clone());
        }
        if entries.is_empty() {
            return None;
        }
        match self.log.append(entries) {
            Ok(()) => None,
            Err(error) => {
                self.fail(&error);
                self.failed.clone()
            }
        }
    }

    fn handle(&mut self, command: Command, entries: &mut Vec<LogEntry>) -> Deferred {
        if let Some(error) = self.failed.clone() {
            return match command {
                Command::Ingest { reply, .. } => defer(reply, Err(error)),
                Command::Enroll { reply, .. } => defer(reply, Err(error)),
                Command::Revoke { reply, .. } => defer(reply, Err(error)),
                Command::Agents { reply } => defer(reply, Err(error)),
                Command::Rejected { reply, .. } => defer(reply, Err(error)),
                Command::Checkpoint { reply } => defer(reply, Err(error)),
                Command::Shutdown { reply } => defer(reply, Err(error)),
            };
        }
        match command {
            Command::Ingest { items, remote, reply } => {
                let results = self.ingest(items, &remote, entries);
                defer(reply, Ok(results))
            }
            Command::Enroll {
                did,
                realm,
                labels,
                by,
                reply,
            } => {
                let result = self.enroll(did, realm, labels, by, entries);
                defer(reply, result)
            }
            Command::Revoke { did, reason, by, reply } => {
                let result = self.revoke(&did, reason, by, entries);
                defer(reply, result)
            }
            Command::Agents { reply } => defer(reply, Ok(self.registry.agents.values().cloned().collect())),
            Command::Rejected { reason, limit, reply } => {
                defer(reply, Ok(self.forensics.list(reason.as_deref(), limit)))
            }
            Command::Checkpoint { reply } => {
                let view = self.log.latest_checkpoint().map(|(checkpoint, note)| CheckpointView {
                    log_id: self.log.log_id().to_owned(),
                    origin: checkpoint.origin.clone(),
                    size: checkpoint.size,
                    root: hex::encode(checkpoint.root),
                    note: note.clone(),
                    verifier_key: self.log.note_key().verifier_string(),
                });
                defer(
                    reply,
                    view.ok_or_else(|| ApiError::new(404, "no_checkpoint", "no checkpoint has been signed yet")),
                )
            }
            Command::Shutdown { reply } => defer(reply, Ok(())),
        }
    }

    fn next_index(&self, entries: &[LogEntry]) -> u64 {
        self.log.next_index() + entries.len() as u64
    }

    fn ingest(&mut self, items: Vec<Item>, remote: &str, entries: &mut Vec<LogEntry>) -> Vec<ItemResult> {
        let now = Utc::now();
        let mut results = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let rejected = |rejection: &Rejection| ItemResult {
                index,
                status: Status::Rejected,
                reason: Some(rejection.reason.code()),
                message: Some(rejection.message.clone()),
                log_index: None,
                flags: Vec::new(),
                missing: None,
            };
            let verified = match item.outcome {
                Ok(verified) => verified,
                Err(rejection) => {
                    results.push(rejected(&rejection));
                    self.reject(&rejection, &item.raw, remote, index, item.keyid, None);
                    continue;
                }
            };
            match self.admit(verified, now, entries) {
                Ok(Admitted::Accepted { log_index, gap }) => results.push(ItemResult {
                    index,
                    status: Status::Accepted,
                    reason: None,
                    message: None,
                    log_index: Some(log_index),
                    flags: if gap.is_some() { vec!["chain_gap"] } else { Vec::new() },
                    missing: gap.map(|(from, to)| [from, to]),
                }),
                Ok(Admitted::Duplicate { log_index }) => results.push(ItemResult {
                    index,
                    status: Status::Duplicate,
                    reason: None,
                    message: None,
                    log_index: Some(log_index),
                    flags: Vec::new(),
                    missing: None,
                }),
                Err((rejection, evidence, keyid)) => {
                    results.push(rejected(&rejection));
                    self.reject(&rejection, &item.raw, remote, index, Some(keyid), evidence);
                }
            }
        }
        results
    }

    fn reject(
        &mut self,
        rejection: &Rejection,
        raw: &[u8],
        remote: &str,
        index: usize,
        keyid: Option<String>,
        evidence: Option<serde_json::Value>,
    ) {
        tracing::debug!(reason = rejection.reason.code(), index, "rejected input");
        self.forensics.record(RejectedRecord::new(
            rejection,
            raw,
            remote,
            Some(index),
            keyid,
            evidence,
        ));
    }

    /// Registry, clock and chain checks; on success, queues the entry (and any control
    /// entry a delegation implies).
    fn admit(
        &mut self,
        verified: Verified,
        now: DateTime<Utc>,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Admitted, (Rejection, Option<serde_json::Value>, String)> {
        let payload = &verified.payload;
        let did = payload.agent.clone();
        let fail = |reason: Reason, message: String| Err((Rejection::new(reason, message), None, did.clone()));
        let Some(record) = self.registry.agents.get(&did) else {
            return fail(Reason::UnknownAgent, format!("agent `{did}` is not enrolled"));
        };
        if record.status == AgentStatus::Revoked {
            return fail(
                Reason::RevokedAgent,
                format!(
                    "agent `{did}` was revoked (log index {})",
                    record.revoke_log_index.map_or("?".into(), |index| index.to_string())
                ),
            );
        }
        if payload.realm != record.realm {
            return fail(
                Reason::RealmMismatch,
                format!(
                    "`realm` is `{}` but agent `{did}` is enrolled in `{}`",
                    payload.realm, record.realm
                ),
            );
        }
        let realm = record.realm.clone();
        let future = chrono::Duration::from_std(self.config.max_future_skew).unwrap_or_default();
        let age = chrono::Duration::from_std(self.config.max_age).unwrap_or_default();
        if payload.ts > now + future {
            return fail(
                Reason::ClockSkew,
                format!(
                    "`ts` {} is {}s ahead of the node clock; the limit is {}s",
                    payload.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    (payload.ts - now).num_seconds(),
                    future.num_seconds()
                ),
            );
        }
        if payload.ts < now - age {
            return fail(
                Reason::ClockSkew,
                format!(
                    "`ts` {} is {}s old; the limit is {}s",
                    payload.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    (now - payload.ts).num_seconds(),
                    age.num_seconds()
                ),
            );
        }
        let seq = payload.seq;
        let mut gap = None;
        match self.registry.heads.get(&did) {
            None if seq > 0 => gap = Some((0, seq - 1)),
            None => {}
            Some(head) if seq == head.seq + 1 && payload.prev_digest() != Some(head.digest) => {
                return fail(
                    Reason::ChainBroken,
                    format!(
                        "`prev` at seq {seq} is `{}` but the payload at seq {} has blake3 `{}`",
                        payload.prev.as_deref().unwrap_or("null"),
                        head.seq,
                        hex::encode(head.digest)
                    ),
                );
            }
            Some(head) if seq == head.seq + 1 => {}
            Some(head) if seq > head.seq + 1 => gap = Some((head.seq + 1, seq - 1)),
            Some(head) => {
                let found = head
                    .recent
                    .iter()
                    .find(|(recent_seq, _, _)| *recent_seq == seq)
                    .copied();
                return match found {
                    Some((_, digest, log_index)) if digest == verified.digest => Ok(Admitted::Duplicate { log_index }),
                    Some((_, digest, log_index)) => Err((
                        Rejection::new(
                            Reason::ChainFork,
                            format!(
                                "seq {seq} of `{did}` was already accepted at log index {log_index} with a different payload: the key may be cloned"
                            ),
                        ),
                        Some(serde_json::json!({
                            "seq": seq,
                            "accepted_log_index": log_index,
                            "accepted_blake3": hex::encode(digest),
                            "rejected_blake3": hex::encode(verified.digest),
                        })),
                        did.clone(),
                    )),
                    None => fail(
                        Reason::Replay,
                        format!(
                            "seq {seq} is at or below the head seq {} of `{did}` and too old to compare",
                            head.seq
                        ),
                    ),
                };
            }
        }
        let child = if payload.kind == Kind::Delegation {
            let target = payload.target.clone().unwrap_or_default();
            if custos_event::public_key_from_did(&target).is_err() {
                return fail(
                    Reason::BadPayload,
                    format!("a `delegation` event needs the child's did:key as `target`, found `{target}`"),
                );
            }
            (!self.registry.agents.contains_key(&target)).then_some(target)
        } else {
            None
        };
        let log_index = self.next_index(entries);
        let ts = payload.ts;
        let digest = verified.digest;
        self.registry.apply_event(&did, seq, digest, log_index, ts);
        entries.push(LogEntry::from_digested(
            verified.envelope,
            digest,
            log_index,
            now.timestamp_micros(),
            gap,
        ));
        if let Some(child) = child {
            self.control(
                ControlAction::Enroll,
                child,
                realm,
                BTreeMap::new(),
                Some(did),
                "delegation".into(),
                Some(log_index),
                None,
                entries,
            );
        }
        Ok(Admitted::Accepted { log_index, gap })
    }

    #[expect(clippy::too_many_arguments, reason = "one field per control payload field")]
    fn control(
        &mut self,
        action: ControlAction,
        agent: String,
        realm: String,
        labels: BTreeMap<String, String>,
        parent: Option<String>,
        by: String,
        cause: Option<u64>,
        reason: Option<String>,
        entries: &mut Vec<LogEntry>,
    ) -> u64 {
        let payload = ControlPayload {
            kind: "control".into(),
            action,
            seq: self.node_chain.next_seq,
            prev: self.node_chain.prev.clone(),
            ts: Utc::now(),
            agent,
            realm,
            labels,
            parent,
            by,
            cause,
            reason,
        };
        let bytes = serde_json::to_vec(&payload).unwrap_or_default();
        self.node_chain.advance(&bytes);
        let envelope = self.node_key.sign_envelope(CONTROL_PAYLOAD_TYPE, bytes);
        let log_index = self.next_index(entries);
        self.registry.apply_control(&payload, log_index);
        entries.push(LogEntry::from_envelope(
            envelope,
            log_index,
            payload.ts.timestamp_micros(),
            None,
        ));
        log_index
    }

    fn enroll(
        &mut self,
        did: String,
        realm: String,
        labels: BTreeMap<String, String>,
        by: String,
        entries: &mut Vec<LogEntry>,
    ) -> Result<AgentRecord, ApiError> {
        custos_event::public_key_from_did(&did)
            .map_err(|error| ApiError::new(400, "bad_did", format!("cannot enroll: {error}")))?;
        if !custos_event::payload::valid_realm(&realm) {
            return Err(ApiError::new(
                400,
                "bad_realm",
                format!("realm `{realm}` must be 1-64 characters of [A-Za-z0-9._-]"),
            ));
        }
        if let Some(existing) = self.registry.agents.get(&did) {
            return Err(ApiError::new(
                409,
                "agent_exists",
                format!(
                    "agent `{did}` is already enrolled in realm `{}` (status {:?})",
                    existing.realm, existing.status
                ),
            ));
        }
        self.control(
            ControlAction::Enroll,
            did.clone(),
            realm,
            labels,
            None,
            by,
            None,
            None,
            entries,
        );
        self.registry
            .agents
            .get(&did)
            .cloned()
            .ok_or_else(|| ApiError::new(500, "internal", "enrolled agent vanished"))
    }

    fn revoke(
        &mut self,
        did: &str,
        reason: Option<String>,
        by: String,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Revoked, ApiError> {
        let Some(record) = self.registry.agents.get(did) else {
            return Err(ApiError::new(
                404,
                "unknown_agent",
                format!("agent `{did}` is not enrolled"),
            ));
        };
        if record.status == AgentStatus::Revoked {
            return Err(ApiError::new(
                409,
                "already_revoked",
                format!("agent `{did}` is already revoked"),
            ));
        }
        let subtree = self.registry.active_subtree(did);
        let mut revoked = Revoked {
            revoked: Vec::new(),
            log_indexes: Vec::new(),
        };
        let mut cause = None;
        for agent in subtree {
            let realm = self
                .registry
                .agents
                .get(&agent)
                .map(|record| record.realm.clone())
                .unwrap_or_default();
            let by = if cause.is_none() {
                by.clone()
            } else {
                "cascade".to_owned()
            };
            let log_index = self.control(
                ControlAction::Revoke,
                agent.clone(),
                realm,
                BTreeMap::new(),
                None,
                by,
                cause,
                reason.clone(),
                entries,
            );
            cause.get_or_insert(log_index);
            revoked.revoked.push(agent);
            revoked.log_indexes.push(log_index);
        }
        Ok(revoked)
    }
}

enum Admitted {
    Accepted { log_index: u64, gap: Option<(u64, u64)> },
    Duplicate { log_index: u64 },
}

/// Rebuilds state from one stored entry.
fn fold_entry(entry: &LogEntry, node_did: &str, registry: &mut Registry, node_chain: &mut ChainState) {
    if entry.payload_type == CONTROL_PAYLOAD_TYPE {
        if entry.keyid != node_did {
            tracing::warn!(
                log_index = entry.log_index,
                "ignoring a control entry not signed by this node's key"
            );
            return;
        }
        match serde_json::from_slice::<ControlPayload>(&entry.payload) {
            Ok(control) => {
                registry.apply_control(&control, entry.log_index);
                node_chain.next_seq = control.seq + 1;
                node_chain.prev = Some(custos_event::blake3_hex(&entry.payload));
            }
            Err(error) => tracing::warn!(log_index = entry.log_index, %error, "unreadable control entry"),
        }
    } else if entry.payload_type == EVENT_PAYLOAD_TYPE {
        match Payload::parse(&entry.payload) {
            Ok(payload) => registry.apply_event(
                &payload.agent,
                payload.seq,
                entry.payload_blake3,
                entry.log_index,
                payload.ts,
            ),
            Err(error) => tracing::warn!(log_index = entry.log_index, %error, "unreadable event entry"),
        }
    }
}

/// [`ItemResult`] as a client reads it back.
#[derive(Clone, Debug, serde::Deserialize, Serialize, PartialEq, Eq)]
pub struct ItemResultView {
    pub index: usize,
    pub status: String,
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    pub log_index: Option<u64>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub missing: Option<[u64; 2]>,
}
