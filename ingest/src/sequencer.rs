//! The single writer of a log: registry and chain checks, index assignment, group commit.
//!
//! One OS thread owns the log. Requests queue on a channel; the thread takes everything
//! queued, checks each item against the registry and the chain heads (so a revocation
//! queued before an event is always seen by it), appends all resulting entries to the WAL
//! with one fsync, and only then answers every request in the group.

use crate::metrics;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_event::chain::{self, Step};
use custos_event::{
    ACTION_PAYLOAD_TYPE, AgentKey, CONTROL_PAYLOAD_TYPE, ChainState, Envelope, FINDING_PAYLOAD_TYPE, Kind, Observation,
    Payload, REVOCATIONS_PAYLOAD_TYPE, Reason, Rejection, Signal, Verified,
};
use custos_stage::embedded::Fanout;
use custos_stage::{
    ActionHead, Answer, Appended, Committed, ControlOp, Enforcement, EventBatch, ItemCheck, Refused, Status,
    Submission, Verdict,
};
use custos_store::{CheckpointView, EvidenceProofs, Log, LogEntry, StoreView};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::NodeConfig;
use crate::registry::{AgentRecord, AgentStatus, ChainHead, ControlAction, ControlPayload, Registry, SubjectRecord};
use custos_store::forensics::{Forensics, RejectedRecord};

/// An input after decoding and signature verification.
#[derive(Debug)]
pub struct Item {
    pub raw: Vec<u8>,
    pub keyid: Option<String>,
    pub outcome: Result<Verified, Rejection>,
    /// Verified, but refused by an ingest node's registry view (a revoked agent): kept
    /// for forensics and shown to the detector like a refusal made here.
    pub refused: Option<Rejection>,
    /// When `raw` is only the first bytes of a refused input (one too large to pass on
    /// whole): the whole input's size and blake3, which its forensics record keeps.
    pub whole: Option<custos_stage::WholeInput>,
}

/// What an ingest command answers: a result per item, except items whose seq is older
/// than the chain state held in memory; those need a lookup in the sealed segments
/// ([`crate::lookup`]) and their result slot waits for it.
#[derive(Debug)]
pub struct Ingested {
    pub results: Vec<Verdict>,
    pub lookups: Vec<Lookup>,
}

/// An item at an old seq: is the stored event at that seq this one (duplicate), another
/// one (fork), or none (the seq was never stored)?
#[derive(Debug)]
pub struct Lookup {
    /// Position in the request (and in `results`).
    pub index: usize,
    pub raw: Vec<u8>,
    pub payload: Payload,
    pub digest: [u8; 32],
    pub head_seq: u64,
    /// The agent's enrollment: no segment ending at or before it can hold its events.
    pub not_before: u64,
    pub segment_dir: std::path::PathBuf,
    /// The sealed segments at the time of the check (every stored event of the agent at
    /// `seq` is in one of them, since the registry holds every unsealed one).
    pub segments: Arc<Vec<custos_store::log::SegmentInfo>>,
}

/// A refusal decided by a lookup.
#[derive(Debug)]
pub struct Refusal {
    pub index: usize,
    pub raw: Vec<u8>,
    pub rejection: Rejection,
    pub evidence: Option<serde_json::Value>,
    pub payload: Payload,
}

/// Result of a revocation: every agent revoked, parents first.
#[derive(Clone, Debug, Serialize)]
pub struct Revoked {
    pub revoked: Vec<String>,
    pub log_indexes: Vec<u64>,
}

type Reply<T> = oneshot::Sender<Result<T, WriterError>>;

/// What kind of failure a writer's answer is. The HTTP edge picks the status
/// (`impl From<WriterError> for custos_http::ApiError`); the stages see `Refused`, where
/// only [`ErrorKind::Unavailable`] is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a malformed DID, a bad realm, a bad proof request).
    Invalid,
    /// What it names does not exist (an agent, a log index, a checkpoint).
    NotFound,
    /// It contradicts the log's state (an agent already enrolled elsewhere, already revoked).
    Conflict,
    /// The writer cannot take it now (the store refuses writes, the node is stopping).
    Unavailable,
    /// A fault inside the writer.
    Internal,
}

/// A writer's refusal: its kind, a stable code and a sentence. No HTTP in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterError {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
}

impl WriterError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }

    /// The writer is stopping: its queue is closed.
    pub fn stopping() -> Self {
        Self::new(ErrorKind::Unavailable, "stopping", "the node is shutting down")
    }
}

impl std::fmt::Display for WriterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Work for the sequencer.
pub enum Command {
    Ingest {
        items: Vec<Item>,
        remote: String,
        reply: Reply<Ingested>,
    },
    /// Records refusals decided outside the sequencer (old-seq lookups): kept for
    /// forensics and shown to the detector, as if refused in the group.
    Refusals {
        refusals: Vec<Refusal>,
        remote: String,
        reply: Reply<()>,
    },
    Enroll {
        did: String,
        realm: String,
        labels: BTreeMap<String, String>,
        by: String,
        reply: Reply<AgentRecord>,
    },
    Revoke {
        did: String,
        reason: Option<String>,
        by: String,
        reply: Reply<Revoked>,
    },
    Agents {
        reply: Reply<Vec<AgentRecord>>,
    },
    /// The forensics files, with everything rejected so far in them (read them off this
    /// thread).
    Rejected {
        reply: Reply<[std::path::PathBuf; 2]>,
    },
    Checkpoint {
        reply: Reply<CheckpointView>,
    },
    /// A stage's submission (the contract of `custos-stage`): a finding, an action
    /// record with its enforcement, a control operation. Answered once durable.
    Submit {
        submission: Submission,
        answer: custos_stage::Answer,
    },
    /// The current revocation list, signed by the node key.
    Revocations {
        reply: Reply<Envelope>,
    },
    /// Signs `bytes` as a revocation list with the node key (for realm-scoped lists).
    Sign {
        bytes: Vec<u8>,
        reply: Reply<Envelope>,
    },
    /// What the registry knows of a memory id.
    Memory {
        id: String,
        reply: Reply<Option<SubjectRecord>>,
    },
    /// Signs a checkpoint of everything logged so far (if the last one does not cover
    /// it), then answers inclusion proofs of `indexes` against it: for evidence bundles.
    Evidence {
        indexes: Vec<u64>,
        reply: Reply<EvidenceProofs>,
    },
    /// Signs `bytes` as `payload_type` with the node key (evidence manifests).
    SignAs {
        payload_type: String,
        bytes: Vec<u8>,
        reply: Reply<Envelope>,
    },
    /// A consistent read view of the store for queries.
    View {
        reply: Reply<StoreView>,
    },
    /// An RFC 9162 inclusion proof (size: the latest checkpoint's when absent).
    Inclusion {
        index: u64,
        size: Option<u64>,
        reply: Reply<serde_json::Value>,
    },
    /// An RFC 9162 consistency proof between two tree sizes.
    Consistency {
        from: u64,
        to: u64,
        reply: Reply<serde_json::Value>,
    },
    Shutdown {
        reply: Reply<Closed>,
    },
}

/// How the log was left at shutdown.
#[derive(Clone, Debug)]
pub struct Closed {
    /// Entries in the log.
    pub entries: u64,
    /// What could not be sealed (a full disk, say), when something could not.
    pub unsealed: Option<Unsealed>,
}

/// Entries left in the WAL at shutdown: durable, and sealed at the next start.
#[derive(Clone, Debug)]
pub struct Unsealed {
    /// Log indexes `from..to`.
    pub from: u64,
    pub to: u64,
    pub wal_files: Vec<std::path::PathBuf>,
    pub error: String,
}

/// The store refused a write; writes are refused until it takes one again.
struct Failure {
    error: WriterError,
    since: std::time::Instant,
    next_try: std::time::Instant,
    attempts: u32,
}

/// Writes, fsyncs and removes a small file in `dir`: can the store take a write now?
fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = dir.join(".probe");
    let result = (|| {
        let mut file = fs_err::File::create(&path)?;
        file.write_all(&[0u8; 64 * 1024])?;
        file.sync_all()
    })();
    let _ = fs_err::remove_file(&path);
    result
}

impl Command {
    /// Whether the command appends to the log (or signs a checkpoint).
    fn writes(&self) -> bool {
        matches!(
            self,
            Command::Ingest { .. }
                | Command::Enroll { .. }
                | Command::Revoke { .. }
                | Command::Submit { .. }
                | Command::Evidence { .. }
        )
    }

    /// Answers the command with `error` without doing it.
    fn refuse(self, error: WriterError) -> Deferred {
        match self {
            Command::Ingest { reply, .. } => defer(reply, Err(error)),
            Command::Refusals { reply, .. } => defer(reply, Err(error)),
            Command::Enroll { reply, .. } => defer(reply, Err(error)),
            Command::Revoke { reply, .. } => defer(reply, Err(error)),
            Command::Agents { reply } => defer(reply, Err(error)),
            Command::Rejected { reply, .. } => defer(reply, Err(error)),
            Command::Checkpoint { reply } => defer(reply, Err(error)),
            Command::Submit { answer, .. } => defer_answer(answer, Err(refused(&error))),
            Command::Revocations { reply } => defer(reply, Err(error)),
            Command::Memory { reply, .. } => defer(reply, Err(error)),
            Command::Sign { reply, .. } => defer(reply, Err(error)),
            Command::View { reply } => defer(reply, Err(error)),
            Command::Evidence { reply, .. } => defer(reply, Err(error)),
            Command::SignAs { reply, .. } => defer(reply, Err(error)),
            Command::Inclusion { reply, .. } => defer(reply, Err(error)),
            Command::Consistency { reply, .. } => defer(reply, Err(error)),
            Command::Shutdown { reply } => defer(reply, Err(error)),
        }
    }
}

/// One status change on the control stream (`GET /v1/control/stream`).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct StatusChange {
    /// `agent_revoked`, `agent_quarantined`, `agent_reinstated`, `memory_quarantined`,
    /// `memory_restored` or `credential_revoked`.
    pub event: String,
    pub agent: String,
    pub realm: String,
    /// The memory id or credential, for those events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The control entry that made the change.
    pub log_index: u64,
    pub ts: DateTime<Utc>,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The signed revocation list's payload.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct RevocationList {
    pub issuer: String,
    pub issued_at: DateTime<Utc>,
    /// The log size when the list was made: every control entry below it is reflected.
    pub log_size: u64,
    pub revoked_agents: Vec<ListedAgent>,
    pub quarantined_agents: Vec<ListedAgent>,
    pub quarantined_memories: Vec<SubjectRecord>,
    pub revoked_credentials: Vec<SubjectRecord>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ListedAgent {
    pub did: String,
    pub realm: String,
    pub log_index: Option<u64>,
    pub reason: Option<String>,
}

/// What the sequencer does besides writing: feed the detector, accept system signers.
#[derive(Default)]
pub(crate) struct SequencerHooks {
    /// Where committed records go (the detector's and the responder's subscriptions).
    pub(crate) publish: Option<Fanout>,
    /// Events below this index are not replayed to the feed at start.
    pub(crate) replay_from: u64,
    /// `did:key` → the one payload type it may submit (findings, action records).
    pub(crate) signers: BTreeMap<String, String>,
    pub(crate) changes: Option<tokio::sync::broadcast::Sender<StatusChange>>,
    /// Committed records carry the entry as signed (for query nodes).
    pub(crate) entries: bool,
}

/// A deferred answer, sent once the group is durable (or failed).
type Deferred = Box<dyn FnOnce(Option<&WriterError>) + Send>;

fn defer<T: Send + 'static>(reply: Reply<T>, value: Result<T, WriterError>) -> Deferred {
    Box::new(move |failure: Option<&WriterError>| {
        let _ = reply.send(match failure {
            Some(error) => Err(error.clone()),
            None => value,
        });
    })
}

/// The agent an enforcement changes, for those that change the registry.
fn enforcement_agent(enforcement: &Enforcement) -> Option<&str> {
    match enforcement {
        Enforcement::RevokeAgent { agent }
        | Enforcement::QuarantineAgent { agent }
        | Enforcement::ReinstateAgent { agent }
        | Enforcement::QuarantineMemory { agent, .. }
        | Enforcement::RestoreMemory { agent, .. }
        | Enforcement::RevokeCredential { agent, .. } => Some(agent),
        Enforcement::Webhook { .. } | Enforcement::Platform { .. } | Enforcement::None => None,
    }
}

/// A stage's answer, deferred like the others; a failed group refuses it (retryable).
fn defer_answer(answer: Answer, value: Result<Appended, Refused>) -> Deferred {
    Box::new(move |failure: Option<&WriterError>| {
        answer.send(match failure {
            Some(error) => Err(refused(error)),
            None => value,
        });
    })
}

/// A writer error as the contract's refusal (the HTTP status stays at the edge; 503s are
/// the ones worth retrying).
/// No entry at `index` (a proof request beyond the log).
fn no_such_entry(index: u64) -> WriterError {
    WriterError::new(
        ErrorKind::NotFound,
        "no_such_entry",
        format!("there is no log index {index}"),
    )
}

fn refused(error: &WriterError) -> Refused {
    Refused {
        code: error.code.to_owned(),
        message: error.message.clone(),
        retryable: error.kind == ErrorKind::Unavailable,
    }
}

pub(crate) struct Sequencer {
    log: Log,
    registry: Registry,
    forensics: Forensics,
    node_key: AgentKey,
    node_chain: ChainState,
    config: NodeConfig,
    failed: Option<Failure>,
    /// When a maintenance error was last logged (they repeat every tick while they last).
    maintenance_error: Option<std::time::Instant>,
    ready: Arc<AtomicBool>,
    hooks: SequencerHooks,
    /// This group's observations for the feed, sent once the group is durable.
    observed: Vec<Committed>,
    /// This group's status changes for the control stream, sent once durable.
    changes: Vec<StatusChange>,
    /// The latest checkpoint's size and when this process first saw it, for the
    /// checkpoint-age metric.
    checkpoint_seen: (u64, std::time::Instant),
    /// The manifest as of the last maintenance, shared with old-seq lookups.
    segments: Arc<Vec<custos_store::log::SegmentInfo>>,
    store_id: String,
    /// Recent entries of the system signers, to answer a redelivered submission once.
    system: crate::state::SystemChains,
    /// Agents' keys as decoded from their did:key, for ingest nodes' batches: decoding
    /// an envelope decompresses its key's point, which costs more than the rest of the
    /// writer's work on an event.
    keys: custos_event::KeyCache,
    /// The latest responder lease tenure an action was appended under: an action made
    /// under an earlier one comes from a responder that lost the lease (kept in
    /// `DATA/responder-tenure` across restarts; see `docs/architecture.md`, "One active
    /// responder").
    lease_epoch: u64,
}

/// Where the writer keeps the latest responder lease tenure it appended an action under.
const TENURE_FILE: &str = "responder-tenure";

/// The tenure recorded at `path`; 0 when there is none (a file that does not read as a
/// number is said, and fences nothing until the next action).
fn read_tenure(path: &std::path::Path) -> u64 {
    match fs_err::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::error!(path = %path.display(), "the responder lease tenure file is not a number; ignored");
            0
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => {
            tracing::error!(%error, "could not read the responder lease tenure; ignored");
            0
        }
    }
}

/// Agents' keys the writer keeps decoded (about 100 bytes each).
const WRITER_KEY_CACHE: usize = 1 << 16;

impl Sequencer {
    pub(crate) fn open(
        config: NodeConfig,
        node_key: AgentKey,
        ready: Arc<AtomicBool>,
        hooks: SequencerHooks,
    ) -> Result<Self, crate::NodeError> {
        let crate::state::Loaded {
            log,
            registry,
            node_chain,
            store_id,
            system,
        } = crate::state::load(
            &config,
            &node_key,
            hooks.publish.as_ref(),
            hooks.replay_from,
            hooks.entries,
        )?;
        let lease_epoch = read_tenure(&config.data.join(TENURE_FILE));
        let forensics = Forensics::open(
            &config.data.join("rejected"),
            config.rejected_max_records,
            config.rejected_max_bytes,
        )?;
        let segments = Arc::new(log.segments().to_vec());
        Ok(Self {
            system,
            store_id,
            segments,
            log,
            registry,
            forensics,
            node_key,
            node_chain,
            config,
            failed: None,
            maintenance_error: None,
            ready,
            hooks,
            observed: Vec::new(),
            changes: Vec::new(),
            checkpoint_seen: (0, std::time::Instant::now()),
            keys: custos_event::KeyCache::new(WRITER_KEY_CACHE),
            lease_epoch,
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
            self.publish(failure.is_none());
            if let Some(reply) = shutdown {
                self.ready.store(false, Ordering::SeqCst);
                let _ = reply.send(Ok(self.close()));
                return;
            }
            self.maintain();
        }
    }

    /// After a group: hands the detector what became durable (and the refused signed
    /// events), and the control stream its status changes.
    fn publish(&mut self, durable: bool) {
        let changes = std::mem::take(&mut self.changes);
        if durable && let Some(sender) = &self.hooks.changes {
            for change in changes {
                // No subscribers is fine: the change is in the log either way.
                let _ = sender.send(change);
            }
        }
        if let Some(publish) = &self.hooks.publish {
            for record in self.observed.drain(..) {
                // A refused event was never going to be appended: the detector sees it
                // whether or not the group became durable. Everything else only if it did.
                if durable || record.log_index().is_none() {
                    publish.send(record);
                }
            }
        }
    }

    /// Seals what it can and signs a final checkpoint. What could not be sealed is still
    /// durable in the WAL (every acknowledged entry is); the report says which entries and
    /// files, and the next start seals them.
    fn close(&mut self) -> Closed {
        if self.failed.is_some() {
            self.recover();
        }
        let sealed = self.log.seal();
        let checkpointed = sealed.and_then(|()| self.log.checkpoint().map(|_| ()));
        let entries = self.log.next_index();
        self.log.persist();
        self.registry.prune(self.log.sealed_end());
        self.snapshot();
        match checkpointed {
            Ok(()) => {
                tracing::info!(entries, "log sealed and checkpointed for shutdown");
                Closed {
                    entries,
                    unsealed: None,
                }
            }
            Err(error) => {
                let unsealed = Unsealed {
                    from: self.log.sealed_end(),
                    to: entries,
                    wal_files: self.log.paths().wal_files(),
                    error: error.to_string(),
                };
                tracing::error!(
                    from = unsealed.from,
                    to = unsealed.to,
                    %error,
                    "could not seal or checkpoint at shutdown; the entries stay in the WAL"
                );
                Closed {
                    entries,
                    unsealed: Some(unsealed),
                }
            }
        }
    }

    /// Saves the registry as of now, so the next start folds only what follows. A
    /// failure only makes that start slower.
    fn snapshot(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let size = self.log.next_index();
        let Ok(root) = self.log.tree().root_at(size) else {
            return;
        };
        let body = crate::state::SnapshotBody::take(&self.registry, &self.node_chain, size, root);
        if let Err(error) = crate::state::write_snapshot(&self.config.data, &self.store_id, &self.node_key, &body) {
            tracing::warn!(%error, "could not save the registry snapshot; the next start folds more of the log");
        }
    }

    fn maintain(&mut self) {
        if self.failed.is_some() {
            self.recover();
            self.gauges();
            return;
        }
        if let Err(error) = self.log.maintain() {
            // The log is as it was before the step that failed (a seal or a checkpoint):
            // nothing is lost and the step runs again at the next maintenance.
            let now = std::time::Instant::now();
            if self
                .maintenance_error
                .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(10))
            {
                tracing::error!(%error, "store maintenance failed (seal or checkpoint); retrying");
                self.maintenance_error = Some(now);
            }
            metrics::STORE_ERRORS.with_label_values(&["maintenance"]).inc();
        }
        if self.log.segments().len() != self.segments.len() {
            self.segments = Arc::new(self.log.segments().to_vec());
            self.registry.prune(self.log.sealed_end());
            self.snapshot();
        }
        self.gauges();
    }

    fn gauges(&mut self) {
        metrics::TREE_SIZE.set(i64::try_from(self.log.next_index()).unwrap_or(i64::MAX));
        let size = self
            .log
            .latest_checkpoint()
            .map_or(0, |(checkpoint, _)| checkpoint.size);
        if size != self.checkpoint_seen.0 {
            self.checkpoint_seen = (size, std::time::Instant::now());
        }
        metrics::CHECKPOINT_SIZE.set(i64::try_from(size).unwrap_or(i64::MAX));
        metrics::CHECKPOINT_AGE.set(self.checkpoint_seen.1.elapsed().as_secs_f64());
    }

    fn fail(&mut self, error: &custos_store::StoreError) {
        tracing::error!(%error, "store write failed; refusing writes until the store can be written again");
        metrics::STORE_ERRORS.with_label_values(&["append"]).inc();
        self.failed = Some(Failure {
            error: crate::store_failed(error),
            since: std::time::Instant::now(),
            next_try: std::time::Instant::now() + Duration::from_millis(500),
            attempts: 0,
        });
        self.ready.store(false, Ordering::SeqCst);
    }

    /// After a failed append: once the disk takes a write again, reloads the writer's
    /// state from the store (the registry had taken in a group that was cut off the WAL)
    /// and accepts writes again. Retries with a growing pause, up to 10 s.
    fn recover(&mut self) {
        let Some(failure) = self.failed.as_mut() else { return };
        let now = std::time::Instant::now();
        if now < failure.next_try {
            return;
        }
        failure.attempts += 1;
        let pause = Duration::from_millis(500 * u64::from(failure.attempts.min(20))).min(Duration::from_secs(10));
        failure.next_try = now + pause;
        let since = failure.since;
        if let Err(error) = probe_writable(&self.log.paths().wal_dir) {
            tracing::debug!(%error, "store still not writable");
            return;
        }
        // A seal in flight finishes (or goes back to the open entries) before the log is
        // read again from disk.
        let _ = self.log.settle();
        match crate::state::load(&self.config, &self.node_key, None, 0, false) {
            Ok(loaded) => {
                self.log = loaded.log;
                self.registry = loaded.registry;
                self.node_chain = loaded.node_chain;
                self.store_id = loaded.store_id;
                self.system = loaded.system;
                self.segments = Arc::new(self.log.segments().to_vec());
                self.failed = None;
                self.ready.store(true, Ordering::SeqCst);
                tracing::warn!(
                    entries = self.log.next_index(),
                    after_secs = since.elapsed().as_secs_f64(),
                    "store writable again; accepting writes"
                );
            }
            Err(error) => tracing::error!(%error, "store not recovered yet; retrying"),
        }
    }

    /// Makes the group durable. Returns the error every request in it must get, if any.
    fn commit(&mut self, entries: Vec<LogEntry>) -> Option<WriterError> {
        if let Err(error) = self.forensics.flush() {
            tracing::error!(%error, "could not persist rejected input for forensics");
        }
        if let Some(failure) = &self.failed {
            return (!entries.is_empty()).then(|| failure.error.clone());
        }
        if entries.is_empty() {
            return None;
        }
        let started = std::time::Instant::now();
        let appended = self.log.append(entries);
        metrics::WAL_FSYNC_SECONDS.observe(started.elapsed().as_secs_f64());
        match appended {
            Ok(()) => None,
            Err(error) => {
                self.fail(&error);
                Some(crate::store_failed(&error))
            }
        }
    }

    fn handle(&mut self, command: Command, entries: &mut Vec<LogEntry>) -> Deferred {
        // While the store cannot be written, reads are still answered.
        if let Some(failure) = &self.failed
            && command.writes()
        {
            return command.refuse(failure.error.clone());
        }
        match command {
            Command::Ingest { items, remote, reply } => {
                let ingested = self.ingest(items, &remote, entries);
                defer(reply, Ok(ingested))
            }
            Command::Refusals {
                refusals,
                remote,
                reply,
            } => {
                for refusal in refusals {
                    self.refuse(refusal, &remote, Utc::now());
                }
                defer(reply, Ok(()))
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
            Command::Rejected { reply } => {
                if let Err(error) = self.forensics.flush() {
                    tracing::error!(%error, "could not persist rejected input for forensics");
                }
                defer(reply, Ok(self.forensics.files()))
            }
            Command::Checkpoint { reply } => {
                let view = self.log.latest_checkpoint().map(|(checkpoint, note)| CheckpointView {
                    log_id: self.log.log_id().to_owned(),
                    origin: checkpoint.origin.clone(),
                    size: checkpoint.size,
                    root: hex::encode(checkpoint.root),
                    note: note.clone(),
                    verifier_key: self.log.note_key().verifier_string(),
                    node_did: self.node_key.did().to_owned(),
                    cosigned_by: 0,
                });
                defer(
                    reply,
                    view.ok_or_else(|| {
                        WriterError::new(
                            ErrorKind::NotFound,
                            "no_checkpoint",
                            "no checkpoint has been signed yet",
                        )
                    }),
                )
            }
            Command::Submit { submission, answer } => {
                let result = self.submit(submission, entries);
                defer_answer(answer, result)
            }
            Command::Revocations { reply } => {
                let list = self.revocations(entries);
                defer(reply, list)
            }
            Command::Memory { id, reply } => defer(reply, Ok(self.registry.memories.get(&id).cloned())),
            Command::Sign { bytes, reply } => {
                defer(reply, Ok(self.node_key.sign_envelope(REVOCATIONS_PAYLOAD_TYPE, bytes)))
            }
            Command::Evidence { indexes, reply } => defer(reply, self.evidence(&indexes)),
            Command::SignAs {
                payload_type,
                bytes,
                reply,
            } => defer(reply, Ok(self.node_key.sign_envelope(&payload_type, bytes))),
            Command::View { reply } => defer(
                reply,
                Ok(StoreView {
                    segment_dir: self.log.paths().segment_dir.clone(),
                    segments: self.log.segments().to_vec(),
                    tail: self.log.tail(),
                    size: self.log.next_index(),
                    checkpoints: self.log.paths().checkpoints.clone(),
                }),
            ),
            Command::Inclusion { index, size, reply } => defer(reply, self.inclusion(index, size)),
            Command::Consistency { from, to, reply } => defer(reply, self.consistency(from, to)),
            Command::Shutdown { reply } => defer(
                reply,
                Err(WriterError::new(
                    ErrorKind::Internal,
                    "internal",
                    "shutdown is handled by the loop",
                )),
            ),
        }
    }

    /// One submission from a stage: checked, queued in this group, answered once durable.
    fn submit(&mut self, submission: Submission, entries: &mut Vec<LogEntry>) -> Result<Appended, Refused> {
        match submission {
            Submission::Events(batch) => Ok(self.ingest_submitted(batch, entries)),
            Submission::Finding(envelope) => {
                let (log_index, _) = self.append_signed(envelope, FINDING_PAYLOAD_TYPE, None, entries)?;
                Ok(Appended::entries(vec![log_index]))
            }
            Submission::Action { envelope, lease_epoch } => self.append_action(envelope, lease_epoch, entries),
            Submission::Control(ControlOp::Revoke { agent, by, reason, .. }) => self
                .revoke(&agent, reason, by, entries)
                .map(|revoked| Appended::entries(revoked.log_indexes))
                .map_err(|error| refused(&error)),
            Submission::Control(ControlOp::Enroll {
                agent,
                realm,
                labels,
                by,
            }) => self
                .enroll(agent, realm, labels, by, entries)
                .map(|record| Appended::entries(vec![record.enroll_log_index]))
                .map_err(|error| refused(&error)),
            // Served by the node's adapters (`crate::forwarded`), which append what they
            // attest through this queue; one that reaches the log itself was misrouted.
            Submission::Adapter(request) => Err(Refused::new(
                "writer_only",
                format!(
                    "the log takes no adapter request (`{}`) itself: the node holding it serves the adapters",
                    request.route
                ),
            )),
        }
    }

    /// An action record and the enforcement it carries, in one append: the record first,
    /// then the control entries, each naming the record's log index as its cause. An
    /// enforcement the registry cannot apply (an agent never enrolled) refuses the
    /// whole submission, so no record claims an effect that did not happen.
    fn append_action(
        &mut self,
        envelope: Envelope,
        lease_epoch: Option<u64>,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Appended, Refused> {
        let head = ActionHead::parse(&envelope.payload).map_err(|message| Refused::new("malformed_action", message))?;
        if let Some(enforcement) = head.to_apply()
            && let Some(agent) = enforcement_agent(enforcement)
            && !self.registry.agents.contains_key(agent)
        {
            return Err(Refused::new(
                "unknown_agent",
                format!("agent `{agent}` is not enrolled; the action's enforcement cannot be applied"),
            ));
        }
        let (log_index, fresh) = self.append_signed(envelope, ACTION_PAYLOAD_TYPE, lease_epoch, entries)?;
        let mut log_indexes = vec![log_index];
        // A redelivered record's enforcement was applied with its first append.
        if fresh && let Some(enforcement) = head.to_apply() {
            let applied = self
                .enforce(
                    enforcement,
                    head.by.clone(),
                    Some(log_index),
                    Some(head.reason.clone()),
                    entries,
                )
                .map_err(|error| refused(&error))?;
            log_indexes.extend(applied);
        }
        Ok(Appended::entries(log_indexes))
    }

    /// Queues an entry signed by a system key that may append `payload_type`. Answers its
    /// log index and whether it is new: a payload the key already appended at that `seq`
    /// (a redelivered submission) answers the first append's index and is not appended.
    /// A new entry made under a responder lease tenure (`lease_epoch`) earlier than one
    /// already appended under is refused `stale_responder`.
    fn append_signed(
        &mut self,
        envelope: Envelope,
        payload_type: &str,
        lease_epoch: Option<u64>,
        entries: &mut Vec<LogEntry>,
    ) -> Result<(u64, bool), Refused> {
        let allowed = self.hooks.signers.get(&envelope.keyid).ok_or_else(|| {
            Refused::new(
                "not_a_system_key",
                format!("`{}` is not one of this node's system keys", envelope.keyid),
            )
        })?;
        if *allowed != envelope.payload_type || envelope.payload_type != payload_type {
            return Err(Refused::new(
                "wrong_payload_type",
                format!(
                    "`{}` may append `{allowed}` entries, not `{}`",
                    envelope.keyid, envelope.payload_type
                ),
            ));
        }
        let key = custos_event::verifying_key_from_did(&envelope.keyid)
            .map_err(|error| Refused::new("bad_did", error.to_string()))?;
        custos_event::verify::verify_one(&key, &envelope)
            .map_err(|rejection| Refused::new(rejection.reason.code(), rejection.message))?;
        let seq = crate::state::payload_seq(&envelope.payload)
            .ok_or_else(|| Refused::new("bad_payload", format!("a `{payload_type}` payload needs a `seq`")))?;
        let digest = *blake3::hash(&envelope.payload).as_bytes();
        match self.system.step(&envelope.keyid, seq, &digest) {
            crate::state::SystemStep::New => {}
            crate::state::SystemStep::Duplicate(log_index) => return Ok((log_index, false)),
            crate::state::SystemStep::Fork(log_index) => {
                return Err(Refused::new(
                    "chain_fork",
                    format!(
                        "`{}` already appended another payload at seq {seq} (log index {log_index})",
                        envelope.keyid
                    ),
                ));
            }
        }
        if let Some(epoch) = lease_epoch {
            self.take_tenure(epoch)?;
        }
        let log_index = self.next_index(entries);
        self.system.record(&envelope.keyid, seq, digest, log_index);
        let payload = self.hooks.publish.is_some().then(|| envelope.payload.clone());
        entries.push(LogEntry::from_envelope(
            envelope,
            log_index,
            Utc::now().timestamp_micros(),
            None,
        ));
        if let Some(payload) = payload {
            let entry = self.entry_of(entries);
            self.observed.push(if payload_type == FINDING_PAYLOAD_TYPE {
                Committed::Finding {
                    log_index,
                    payload,
                    entry,
                }
            } else {
                Committed::Action {
                    log_index,
                    payload,
                    entry,
                }
            });
        }
        Ok((log_index, true))
    }

    /// Refuses a new action made under responder lease tenure `epoch` when an action of
    /// a later tenure was appended already (`stale_responder`); otherwise makes `epoch`
    /// the latest, recorded before the action is durable so a restarted writer still
    /// fences the tenure before it (a failure to record it is said; it is held in memory).
    fn take_tenure(&mut self, epoch: u64) -> Result<(), Refused> {
        if epoch < self.lease_epoch {
            return Err(Refused::new(
                "stale_responder",
                format!(
                    "this action was made under responder lease tenure {epoch}, and an action made under \
                     tenure {} was appended since: its responder no longer holds the lease",
                    self.lease_epoch
                ),
            ));
        }
        if epoch > self.lease_epoch {
            let path = self.config.data.join(TENURE_FILE);
            if let Err(error) = custos_store::write_atomic(&path, format!("{epoch}\n").as_bytes()) {
                tracing::error!(%error, "could not record the responder lease tenure");
            }
            self.lease_epoch = epoch;
        }
        Ok(())
    }

    fn enforce(
        &mut self,
        op: &Enforcement,
        by: String,
        cause: Option<u64>,
        reason: Option<String>,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Vec<u64>, WriterError> {
        let Some(agent) = enforcement_agent(op).map(str::to_owned) else {
            return Ok(Vec::new());
        };
        let Some(record) = self.registry.agents.get(&agent) else {
            return Err(WriterError::new(
                ErrorKind::NotFound,
                "unknown_agent",
                format!("agent `{agent}` is not enrolled"),
            ));
        };
        let realm = record.realm.clone();
        let status = record.status;
        let (action, subject) = match op {
            Enforcement::RevokeAgent { .. } => {
                if status == AgentStatus::Revoked {
                    return Ok(Vec::new());
                }
                return self
                    .revoke_with_cause(&agent, reason, by, cause, entries)
                    .map(|revoked| revoked.log_indexes);
            }
            Enforcement::QuarantineAgent { .. } if status != AgentStatus::Active => return Ok(Vec::new()),
            Enforcement::QuarantineAgent { .. } => (ControlAction::Quarantine, None),
            Enforcement::ReinstateAgent { .. } if status == AgentStatus::Active => return Ok(Vec::new()),
            Enforcement::ReinstateAgent { .. } => (ControlAction::Reinstate, None),
            Enforcement::QuarantineMemory { memory_id: memory, .. } => {
                if self
                    .registry
                    .memories
                    .get(memory)
                    .is_some_and(|m| m.status == "quarantined")
                {
                    return Ok(Vec::new());
                }
                (ControlAction::QuarantineMemory, Some(memory.clone()))
            }
            Enforcement::RestoreMemory { memory_id: memory, .. } => {
                if self
                    .registry
                    .memories
                    .get(memory)
                    .is_none_or(|m| m.status != "quarantined")
                {
                    return Ok(Vec::new());
                }
                (ControlAction::RestoreMemory, Some(memory.clone()))
            }
            Enforcement::RevokeCredential { credential, .. } => {
                if self.registry.credentials.contains_key(credential) {
                    return Ok(Vec::new());
                }
                (ControlAction::RevokeCredential, Some(credential.clone()))
            }
            Enforcement::Webhook { .. } | Enforcement::Platform { .. } | Enforcement::None => return Ok(Vec::new()),
        };
        let log_index = self.control(
            action,
            agent,
            realm,
            BTreeMap::new(),
            None,
            by,
            cause,
            reason,
            subject,
            entries,
        );
        Ok(vec![log_index])
    }

    /// The revocation list as of the entries queued so far, signed by the node key.
    fn revocations(&self, entries: &[LogEntry]) -> Result<Envelope, WriterError> {
        let listed = |status: AgentStatus| {
            self.registry
                .agents
                .values()
                .filter(|record| record.status == status)
                .map(|record| ListedAgent {
                    did: record.did.clone(),
                    realm: record.realm.clone(),
                    log_index: if status == AgentStatus::Revoked {
                        record.revoke_log_index
                    } else {
                        record.status_log_index
                    },
                    reason: if status == AgentStatus::Revoked {
                        record.revoke_reason.clone()
                    } else {
                        None
                    },
                })
                .collect::<Vec<_>>()
        };
        let list = RevocationList {
            issuer: self.node_key.did().to_owned(),
            issued_at: Utc::now(),
            log_size: self.next_index(entries),
            revoked_agents: listed(AgentStatus::Revoked),
            quarantined_agents: listed(AgentStatus::Quarantined),
            quarantined_memories: self
                .registry
                .memories
                .values()
                .filter(|memory| memory.status == "quarantined")
                .cloned()
                .collect(),
            revoked_credentials: self.registry.credentials.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec(&list).map_err(|error| {
            WriterError::new(
                ErrorKind::Internal,
                "internal",
                format!("cannot encode the revocation list: {error}"),
            )
        })?;
        Ok(self.node_key.sign_envelope(REVOCATIONS_PAYLOAD_TYPE, bytes))
    }

    fn next_index(&self, entries: &[LogEntry]) -> u64 {
        self.log.next_index() + entries.len() as u64
    }

    fn ingest(&mut self, items: Vec<Item>, remote: &str, entries: &mut Vec<LogEntry>) -> Ingested {
        let now = Utc::now();
        let mut results = Vec::with_capacity(items.len());
        let mut lookups = Vec::new();
        for (index, item) in items.into_iter().enumerate() {
            let verified = match item.outcome {
                Ok(verified) => verified,
                Err(rejection) => {
                    results.push(rejected_verdict(index, &rejection));
                    let record = RejectedRecord::new(&rejection, &item.raw, remote, Some(index), item.keyid, None);
                    self.reject(match item.whole {
                        Some(whole) => record.of_whole(whole.size, whole.blake3),
                        None => record,
                    });
                    continue;
                }
            };
            if let Some(rejection) = item.refused {
                results.push(rejected_verdict(index, &rejection));
                let refusal = Refusal {
                    index,
                    raw: item.raw,
                    rejection,
                    evidence: None,
                    payload: verified.payload,
                };
                self.refuse(refusal, remote, now);
                continue;
            }
            match self.admit(verified, now, entries) {
                Ok(Admitted::Accepted {
                    log_index,
                    gap,
                    quarantined,
                }) => {
                    let mut flags = Vec::new();
                    if gap.is_some() {
                        flags.push("chain_gap".to_owned());
                    }
                    if quarantined {
                        flags.push("quarantined".to_owned());
                    }
                    results.push(Verdict {
                        index,
                        status: Status::Accepted,
                        reason: None,
                        message: None,
                        log_index: Some(log_index),
                        flags,
                        missing: gap.map(|(from, to)| [from, to]),
                    })
                }
                Ok(Admitted::Duplicate { log_index }) => results.push(Verdict::duplicate(index, log_index)),
                Ok(Admitted::Lookup(mut lookup)) => {
                    lookup.index = index;
                    lookup.raw = item.raw;
                    // A placeholder the lookup replaces; never sent as it is.
                    results.push(Verdict::duplicate(index, 0));
                    lookups.push(*lookup);
                }
                Err(refused) => {
                    results.push(rejected_verdict(index, &refused.rejection));
                    self.refuse(
                        Refusal {
                            index,
                            raw: item.raw,
                            rejection: refused.rejection,
                            evidence: refused.evidence,
                            payload: *refused.payload,
                        },
                        remote,
                        now,
                    );
                }
            }
        }
        let waiting: Vec<usize> = lookups.iter().map(|lookup| lookup.index).collect();
        for result in &results {
            if !waiting.contains(&result.index) {
                count(result);
            }
        }
        Ingested { results, lookups }
    }

    /// An ingest node's batch: its checks are taken as they are (the submissions topic is
    /// written by Custos nodes only), the envelopes are decoded again here without a
    /// second signature check, and every item is answered, old-seq lookups included
    /// (resolved on this thread: they are rare, a client resending far behind its head).
    fn ingest_submitted(&mut self, batch: EventBatch, entries: &mut Vec<LogEntry>) -> Appended {
        let keys = &self.keys;
        let items = batch
            .items
            .into_iter()
            .map(|item| {
                let decode = |raw: &[u8]| {
                    custos_event::verify::decode_envelope_cached(
                        raw,
                        usize::MAX,
                        &[custos_event::EVENT_PAYLOAD_TYPE],
                        Some(keys),
                    )
                    .and_then(|decoded| custos_event::verify::check_event(decoded.envelope))
                };
                let (outcome, refused, whole) = match item.check {
                    ItemCheck::Verified => (decode(&item.raw), None, None),
                    ItemCheck::Refused {
                        code,
                        message,
                        signed,
                        whole,
                    } => {
                        let rejection = Rejection::new(Reason::from_code(&code).unwrap_or(Reason::Malformed), message);
                        match signed.then(|| decode(&item.raw)) {
                            Some(Ok(verified)) => (Ok(verified), Some(rejection), None),
                            _ => (Err(rejection), None, whole),
                        }
                    }
                };
                Item {
                    raw: item.raw,
                    keyid: item.keyid,
                    outcome,
                    refused,
                    whole,
                }
            })
            .collect();
        let Ingested { mut results, lookups } = self.ingest(items, &batch.remote, entries);
        let now = Utc::now();
        for lookup in lookups {
            let (result, refusal) = match crate::lookup::resolve(lookup) {
                Ok(resolved) => resolved,
                Err(error) => {
                    tracing::error!(error = error.message, "an old-seq lookup failed");
                    continue;
                }
            };
            count(&result);
            let index = result.index;
            if let Some(slot) = results.get_mut(index) {
                *slot = result;
            }
            if let Some(refusal) = refusal {
                self.refuse(refusal, &batch.remote, now);
            }
        }
        let log_indexes = results
            .iter()
            .filter(|result| result.status == Status::Accepted)
            .filter_map(|result| result.log_index)
            .collect();
        Appended {
            log_indexes,
            verdicts: results,
            reply: None,
            route_to: None,
        }
    }

    /// Keeps a signed event the registry or chain refused for forensics, and shows it to
    /// the detector (it sees refused events of agents it knows: revoked, forks, replays;
    /// never unknown keys).
    fn refuse(&mut self, refusal: Refusal, remote: &str, now: DateTime<Utc>) {
        let keyid = refusal.payload.agent.clone();
        if self.hooks.publish.is_some() && refusal.rejection.reason != Reason::UnknownAgent {
            self.observed.push(Committed::Event(Box::new(Observation {
                log_index: None,
                ingest_ts: now,
                payload: refusal.payload,
                signal: Signal::Rejected {
                    reason: refusal.rejection.reason.code().to_owned(),
                },
                entry: None,
            })));
        }
        self.reject(RejectedRecord::new(
            &refusal.rejection,
            &refusal.raw,
            remote,
            Some(refusal.index),
            Some(keyid),
            refusal.evidence,
        ));
    }

    /// Keeps a rejected input for forensics.
    fn reject(&mut self, record: RejectedRecord) {
        tracing::debug!(reason = record.reason, index = record.index, "rejected input");
        self.forensics.record(record);
    }

    /// Registry, clock and chain checks; on success, queues the entry (and any control
    /// entry a delegation implies). A refused event's payload comes back for the detector.
    fn admit(
        &mut self,
        verified: Verified,
        now: DateTime<Utc>,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Admitted, RefusedEvent> {
        let (gap, child, realm, quarantined) = match self.check(&verified, now) {
            Ok(Checked::Fresh {
                gap,
                child,
                realm,
                quarantined,
            }) => (gap, child, realm, quarantined),
            Ok(Checked::Duplicate { log_index }) => return Ok(Admitted::Duplicate { log_index }),
            Ok(Checked::Lookup { head_seq, not_before }) => {
                return Ok(Admitted::Lookup(Box::new(Lookup {
                    index: 0,
                    raw: Vec::new(),
                    digest: verified.digest,
                    payload: verified.payload,
                    head_seq,
                    not_before,
                    segment_dir: self.log.paths().segment_dir.clone(),
                    segments: self.segments.clone(),
                })));
            }
            Err((rejection, evidence)) => {
                return Err(RefusedEvent {
                    rejection,
                    evidence,
                    payload: Box::new(verified.payload),
                });
            }
        };
        let Verified {
            envelope,
            payload,
            digest,
        } = verified;
        let did = payload.agent.clone();
        let log_index = self.next_index(entries);
        self.registry
            .apply_event(&did, payload.seq, digest, log_index, payload.ts);
        entries.push(LogEntry::from_digested(
            envelope,
            digest,
            log_index,
            now.timestamp_micros(),
            gap,
        ));
        if self.hooks.publish.is_some() {
            let entry = self.entry_of(entries);
            self.observed.push(Committed::Event(Box::new(Observation {
                log_index: Some(log_index),
                ingest_ts: now,
                payload,
                signal: Signal::Accepted { gap },
                entry,
            })));
        }
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
                None,
                entries,
            );
        }
        Ok(Admitted::Accepted {
            log_index,
            gap,
            quarantined,
        })
    }

    /// The checks of [`Self::admit`], without side effects.
    fn check(
        &self,
        verified: &Verified,
        now: DateTime<Utc>,
    ) -> Result<Checked, (Rejection, Option<serde_json::Value>)> {
        let payload = &verified.payload;
        let did = payload.agent.clone();
        let fail = |reason: Reason, message: String| Err((Rejection::new(reason, message), None));
        let Some(record) = self.registry.agents.get(&did) else {
            return fail(Reason::UnknownAgent, format!("agent `{did}` is not enrolled"));
        };
        let record_status = record.status;
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
        let future = chrono::Duration::from_std(self.config.max_future_skew).unwrap_or(chrono::Duration::MAX);
        let age = chrono::Duration::from_std(self.config.max_age).unwrap_or(chrono::Duration::MAX);
        if now.checked_add_signed(future).is_some_and(|limit| payload.ts > limit) {
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
        if now.checked_sub_signed(age).is_some_and(|limit| payload.ts < limit) {
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
        let head = self.registry.heads.get(&did);
        let step = chain::step(
            head.map(|head| chain::Head {
                seq: head.seq,
                digest: head.digest,
            })
            .as_ref(),
            seq,
            payload.prev_digest(),
        );
        let gap = match (step, head) {
            (Step::Broken, Some(head)) => {
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
            (Step::Behind, Some(head)) => return self.behind(head, record.enroll_log_index, &did, seq, verified),
            (step, _) => step.gap(),
        };
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
        Ok(Checked::Fresh {
            gap,
            child,
            realm,
            quarantined: record_status == AgentStatus::Quarantined,
        })
    }

    /// An event at or below its agent's head: a resend, a fork, a seq that was never
    /// stored, or (older than the events held in memory) a question for the segments.
    fn behind(
        &self,
        head: &ChainHead,
        enrolled_at: u64,
        did: &str,
        seq: u64,
        verified: &Verified,
    ) -> Result<Checked, (Rejection, Option<serde_json::Value>)> {
        // `recent` is a suffix of the agent's accepted events, in seq order.
        let Some(oldest) = head.recent.front() else {
            return Ok(Checked::Lookup {
                head_seq: head.seq,
                not_before: enrolled_at,
            });
        };
        if seq < oldest.0 {
            return Ok(Checked::Lookup {
                head_seq: head.seq,
                not_before: enrolled_at,
            });
        }
        match head.recent.binary_search_by_key(&seq, |(recent_seq, _, _)| *recent_seq) {
            Ok(position) => {
                let (_, digest, log_index) = head.recent[position];
                if digest == verified.digest {
                    Ok(Checked::Duplicate { log_index })
                } else {
                    Err(fork(did, seq, log_index, digest, verified.digest))
                }
            }
            Err(_) => Err((never_stored(did, seq, head.seq), None)),
        }
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
        subject: Option<String>,
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
            subject,
        };
        // A struct of strings and numbers always serialises; were it ever not to, nothing
        // is signed (a default value must never be).
        let bytes = serde_json::to_vec(&payload).expect("a control payload serialises");
        self.node_chain.advance(&bytes);
        let log_index = self.next_index(entries);
        let published = self.hooks.publish.is_some().then(|| bytes.clone());
        let envelope = self.node_key.sign_envelope(CONTROL_PAYLOAD_TYPE, bytes);
        self.registry.apply_control(&payload, log_index);
        if let Some(event) = payload.action.change_name() {
            self.changes.push(StatusChange {
                event: event.to_owned(),
                agent: payload.agent.clone(),
                realm: payload.realm.clone(),
                subject: payload.subject.clone(),
                log_index,
                ts: payload.ts,
                by: payload.by.clone(),
                reason: payload.reason.clone(),
            });
        }
        entries.push(LogEntry::from_envelope(
            envelope,
            log_index,
            payload.ts.timestamp_micros(),
            None,
        ));
        if let Some(payload) = published {
            let entry = self.entry_of(entries);
            self.observed.push(Committed::Control {
                log_index,
                payload,
                entry,
            });
        }
        log_index
    }

    /// The entry just appended to `entries`, for the committed record, when the writer
    /// publishes entries (`Hooks::publish_entries`).
    fn entry_of(&self, entries: &[LogEntry]) -> Option<Box<custos_event::SignedEntry>> {
        if !self.hooks.entries {
            return None;
        }
        entries.last().map(crate::state::signed_entry)
    }

    fn enroll(
        &mut self,
        did: String,
        realm: String,
        labels: BTreeMap<String, String>,
        by: String,
        entries: &mut Vec<LogEntry>,
    ) -> Result<AgentRecord, WriterError> {
        custos_event::public_key_from_did(&did)
            .map_err(|error| WriterError::new(ErrorKind::Invalid, "bad_did", format!("cannot enroll: {error}")))?;
        if !custos_event::payload::valid_realm(&realm) {
            return Err(WriterError::new(
                ErrorKind::Invalid,
                "bad_realm",
                format!("realm `{realm}` must be 1-64 characters of [A-Za-z0-9._-]"),
            ));
        }
        if let Some(existing) = self.registry.agents.get(&did) {
            return Err(WriterError::new(
                ErrorKind::Conflict,
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
            None,
            entries,
        );
        self.registry
            .agents
            .get(&did)
            .cloned()
            .ok_or_else(|| WriterError::new(ErrorKind::Internal, "internal", "enrolled agent vanished"))
    }

    fn revoke(
        &mut self,
        did: &str,
        reason: Option<String>,
        by: String,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Revoked, WriterError> {
        self.revoke_with_cause(did, reason, by, None, entries)
    }

    /// Revokes `did` and its not-yet-revoked sub-agents, parents first. The root's entry
    /// names `root_cause` (a finding, say); each cascaded entry names the root's entry.
    fn evidence(&mut self, indexes: &[u64]) -> Result<EvidenceProofs, WriterError> {
        self.log.checkpoint().map_err(|error| crate::store_failed(&error))?;
        let (checkpoint, note) = self.log.latest_checkpoint().cloned().ok_or_else(|| {
            WriterError::new(
                ErrorKind::NotFound,
                "no_checkpoint",
                "the log is empty: nothing to prove",
            )
        })?;
        let tree = self.log.tree();
        let mut proofs = Vec::with_capacity(indexes.len());
        for &index in indexes {
            let leaf = tree.leaf(index).ok_or_else(|| no_such_entry(index))?;
            let path = self.log.inclusion_proof(index, checkpoint.size).map_err(|error| {
                WriterError::new(
                    ErrorKind::Invalid,
                    "bad_proof_request",
                    format!("log index {index} in a tree of size {}: {error}", checkpoint.size),
                )
            })?;
            proofs.push((index, leaf, path));
        }
        Ok(EvidenceProofs {
            log_id: self.log.log_id().to_owned(),
            origin: self.log.origin().to_owned(),
            size: checkpoint.size,
            note,
            verifier_key: self.log.note_key().verifier_string(),
            node_did: self.node_key.did().to_owned(),
            proofs,
        })
    }

    fn signed_size(&self) -> u64 {
        self.log
            .latest_checkpoint()
            .map_or(self.log.next_index(), |(checkpoint, _)| checkpoint.size)
    }

    fn inclusion(&self, index: u64, size: Option<u64>) -> Result<serde_json::Value, WriterError> {
        let size = size.unwrap_or_else(|| self.signed_size());
        let proof_error = |error: custos_store::merkle::ProofError| {
            WriterError::new(
                ErrorKind::Invalid,
                "bad_proof_request",
                format!("log index {index} in a tree of size {size}: {error}"),
            )
        };
        let proof = self.log.inclusion_proof(index, size).map_err(proof_error)?;
        let tree = self.log.tree();
        let leaf = tree.leaf(index).ok_or_else(|| no_such_entry(index))?;
        let root = tree.root_at(size).map_err(proof_error)?;
        Ok(serde_json::json!({
            "log_id": self.log.log_id(),
            "origin": self.log.origin(),
            "leaf_index": index,
            "tree_size": size,
            "leaf_hash": hex::encode(leaf),
            "root_hash": hex::encode(root),
            "inclusion_path": proof.iter().map(hex::encode).collect::<Vec<_>>(),
        }))
    }

    fn consistency(&self, from: u64, to: u64) -> Result<serde_json::Value, WriterError> {
        let proof_error = |error: custos_store::merkle::ProofError| {
            WriterError::new(
                ErrorKind::Invalid,
                "bad_proof_request",
                format!("sizes {from} to {to}: {error}"),
            )
        };
        let proof = self.log.consistency_proof(from, to).map_err(proof_error)?;
        let tree = self.log.tree();
        let (first, second) = (
            tree.root_at(from).map_err(proof_error)?,
            tree.root_at(to).map_err(proof_error)?,
        );
        Ok(serde_json::json!({
            "log_id": self.log.log_id(),
            "origin": self.log.origin(),
            "first_size": from,
            "second_size": to,
            "first_root": hex::encode(first),
            "second_root": hex::encode(second),
            "consistency_path": proof.iter().map(hex::encode).collect::<Vec<_>>(),
        }))
    }

    fn revoke_with_cause(
        &mut self,
        did: &str,
        reason: Option<String>,
        by: String,
        root_cause: Option<u64>,
        entries: &mut Vec<LogEntry>,
    ) -> Result<Revoked, WriterError> {
        let Some(record) = self.registry.agents.get(did) else {
            return Err(WriterError::new(
                ErrorKind::NotFound,
                "unknown_agent",
                format!("agent `{did}` is not enrolled"),
            ));
        };
        if record.status == AgentStatus::Revoked {
            return Err(WriterError::new(
                ErrorKind::Conflict,
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
        for (position, agent) in subtree.into_iter().enumerate() {
            let realm = self
                .registry
                .agents
                .get(&agent)
                .map(|record| record.realm.clone())
                .unwrap_or_default();
            let (by, entry_cause) = if position == 0 {
                (by.clone(), root_cause)
            } else {
                ("cascade".to_owned(), cause)
            };
            let log_index = self.control(
                ControlAction::Revoke,
                agent.clone(),
                realm,
                BTreeMap::new(),
                None,
                by,
                entry_cause,
                reason.clone(),
                None,
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
    Accepted {
        log_index: u64,
        gap: Option<(u64, u64)>,
        quarantined: bool,
    },
    Duplicate {
        log_index: u64,
    },
    Lookup(Box<Lookup>),
}

enum Checked {
    Fresh {
        gap: Option<(u64, u64)>,
        child: Option<String>,
        realm: String,
        quarantined: bool,
    },
    Duplicate {
        log_index: u64,
    },
    /// Older than the agent's events held in memory.
    Lookup {
        head_seq: u64,
        not_before: u64,
    },
}

/// The `chain_fork` rejection: `seq` was accepted at `log_index` with digest `accepted`.
pub(crate) fn fork(
    did: &str,
    seq: u64,
    log_index: u64,
    accepted: [u8; 32],
    rejected: [u8; 32],
) -> (Rejection, Option<serde_json::Value>) {
    (
        Rejection::new(
            Reason::ChainFork,
            format!(
                "seq {seq} of `{did}` was already accepted at log index {log_index} with a different payload: the key may be cloned"
            ),
        ),
        Some(serde_json::json!({
            "seq": seq,
            "accepted_log_index": log_index,
            "accepted_blake3": hex::encode(accepted),
            "rejected_blake3": hex::encode(rejected),
        })),
    )
}

/// The `replay` rejection of a seq below the head that no stored event has.
pub(crate) fn never_stored(did: &str, seq: u64, head: u64) -> Rejection {
    Rejection::new(
        Reason::Replay,
        format!(
            "seq {seq} of `{did}` is below its head seq {head} and no event was ever stored at it (it was reported missing in a chain gap); an event cannot be inserted into the past"
        ),
    )
}

/// Counts one answered item in the ingest metrics.
pub(crate) fn count(result: &Verdict) {
    let status = match result.status {
        Status::Accepted => "accepted",
        Status::Duplicate => "duplicate",
        Status::Rejected => "rejected",
    };
    metrics::EVENTS.with_label_values(&[status]).inc();
    if let Some(reason) = &result.reason {
        metrics::REJECTS.with_label_values(&[reason.as_str()]).inc();
    }
}

/// The verdict of a rejected item.
pub(crate) fn rejected_verdict(index: usize, rejection: &Rejection) -> Verdict {
    Verdict::rejected(index, rejection.reason.code(), rejection.message.clone())
}

/// A signed event the registry or chain checks refused.
struct RefusedEvent {
    rejection: Rejection,
    evidence: Option<serde_json::Value>,
    payload: Box<Payload>,
}

/// [`Verdict`] as a client reads it back (status as text).
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
