//! The one contract between Custos's stages, and the transports that carry it.
//!
//! ```text
//!  intake ── verified events ─┐                              ┌──▶ detector ── findings ──┐
//!  admin  ── control ops ─────┤                              │                            │
//!  detector ─ findings ───────┼── Submission ──▶ log writer ─┼── Committed ──▶ responder ─┤
//!  responder ─ action records ┘   (registry, chain,          │   (entry, log     actions  │
//!       ▲                          WAL fsync, enforcement)   │    index, verdict)          │
//!       │                                                    └──▶ query tail, control view │
//!       └────────────────────────────── Submission ───────────────────────────────────────┘
//!  intake ── adapter requests (OTLP, LastID, VaultysClaw: passed on whole) ──▶ the writer's
//!            node serves them with its own API's handlers and answers `Appended::reply`
//! ```
//!
//! A stage never calls another stage. It reads [`Committed`] records through a
//! [`Subscription`] and sends [`Submission`]s through a [`Submitter`]; the log writer is
//! the only component that appends. A finding reaches the responder because the writer
//! committed it, and an action's enforcement is carried by the signed action record
//! itself (its [`Enforcement`]): the writer applies it in the same group commit as the
//! record, so a record and its effect are never split by a crash.
//!
//! Two transports implement the interface:
//! - [`embedded`]: in-process channels (the default, one process);
//! - [`kafka`]: topics on a Kafka-protocol broker (the distributed mode).
//!
//! The same stage code runs on both; `tests/it` runs one suite against each. With one
//! log per partition, [`claim`] decides which process runs a partition's stateful
//! stage (its writer, its detector): the holder of the partition's lock.

use std::sync::Arc;
use std::time::Duration;

use custos_event::{Envelope, Observation};
use serde::{Deserialize, Serialize};

pub mod claim;
pub mod embedded;
pub mod kafka;
pub mod wire;

/// What a stage asks the log writer to append.
#[derive(Clone, Debug, PartialEq)]
pub enum Submission {
    /// Agent events from an ingest node, in request order: the writer applies the
    /// registry and chain checks to each verified one and answers a [`Verdict`] per item
    /// in [`Appended::verdicts`] (the answer `POST /v1/events` gives).
    Events(EventBatch),
    /// A finding, signed by the detector's system key.
    Finding(Envelope),
    /// A responder action record, signed by the responder's system key. When its status
    /// is `executed` and it carries an enforcement, the writer applies the enforcement in
    /// the same append (see [`ActionHead`]).
    Action {
        envelope: Envelope,
        /// The responder lease tenure it was made under (`kafka::Lease::epoch`), when
        /// responders contend for one: the writer refuses an action from an earlier
        /// tenure than one it already appended an action from (`stale_responder`).
        lease_epoch: Option<u64>,
    },
    /// A control operation asked by an operator or another stage.
    Control(ControlOp),
    /// An adapter's HTTP request (OTLP traces, LastID audit records, a VaultysClaw
    /// webhook) that an ingest node passes on whole: the adapters sign what they take
    /// with keys and hash chains kept in the writer's store. The writer's node serves it
    /// as its own API would, and answers [`Appended::reply`].
    Adapter(AdapterRequest),
}

/// An adapter request as an ingest node took it. It never carries the bearer token,
/// only the token's SHA-256, which the writer's node looks up in its own token table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterRequest {
    /// The route, one of [`ADAPTER_ROUTES`].
    pub route: String,
    /// The client's address (per-source limits, forensics).
    pub remote: String,
    /// The request headers the adapters read ([`ADAPTER_HEADERS`]), names in lowercase.
    pub headers: Vec<(String, String)>,
    /// Lowercase hex SHA-256 of the `Authorization: Bearer` token, when one was sent.
    pub token_sha256: Option<String>,
    pub body: Vec<u8>,
    /// Over a partition set (`--log-per-partition`): the partition whose writer serves
    /// it, once the writer that first took it answered [`Appended::route_to`]. The
    /// record goes to that partition, and its writer serves it without routing it again.
    /// `None`: the record goes to the partition of [`AdapterRequest::realm`].
    pub partition: Option<u32>,
    /// The realm an ingest node places the request by, when it can tell it (a LastID
    /// enrollment's realm; the realm its registry view gives a LastID batch's agents):
    /// the record is keyed by it, so it lands on that realm's partition. `None`: the
    /// empty key's partition, whose writer finds the realm itself.
    pub realm: Option<String>,
}

/// The routes an ingest node passes on as [`Submission::Adapter`] (all `POST`).
/// `/v1/agents` only for a platform agent's enrollment (`"source":"lastid"`), which the
/// adapter's tables on the writer's node hold.
pub const ADAPTER_ROUTES: [&str; 4] = [
    "/v1/traces",
    "/v1/agents",
    "/v1/adapters/lastid/audit",
    "/v1/adapters/vaultysclaw/webhook",
];

/// The request headers an [`AdapterRequest`] carries; no other header crosses.
pub const ADAPTER_HEADERS: [&str; 6] = [
    "content-type",
    "content-encoding",
    "x-vaultysclaw-timestamp",
    "x-vaultysclaw-signature",
    "x-vaultysclaw-delivery",
    "x-vaultysclaw-event",
];

/// The writer's node's answer to an [`AdapterRequest`], given back to the client as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterReply {
    /// The HTTP status the writer's own API answered.
    pub status: u16,
    pub content_type: String,
    /// The answer's body in standard base64 (an OTLP protobuf answer is binary).
    pub body: String,
    /// Seconds, when the answer says when to send again (429, 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl AdapterReply {
    pub fn new(status: u16, content_type: String, body: &[u8], retry_after: Option<u64>) -> Self {
        use base64::Engine as _;
        Self {
            status,
            content_type,
            body: base64::engine::general_purpose::STANDARD.encode(body),
            retry_after,
        }
    }

    /// The answer's body bytes.
    pub fn body_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(&self.body)
    }
}

/// One request's envelopes, as an ingest node checked them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBatch {
    /// The client's address, kept with refused items for forensics.
    pub remote: String,
    /// The realm of the batch's agents: what places it on a partition (an ingest node
    /// sends one batch per realm; empty when unknown, as for a batch of refused items).
    pub realm: String,
    pub items: Vec<EventItem>,
}

/// One envelope of a request, byte for byte as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventItem {
    pub raw: Vec<u8>,
    /// The envelope's `keyid`, when it could be read.
    pub keyid: Option<String>,
    pub check: ItemCheck,
}

/// What the ingest node found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemCheck {
    /// The signature verifies and the payload parses: the writer decides the rest.
    Verified,
    /// Refused by the ingest node with a reason code (`docs/reason-codes.md`). `signed`:
    /// the signature of an enrolled agent verified (a revoked agent's event), so the
    /// writer shows the refusal to the detector, as in one process.
    Refused {
        code: String,
        message: String,
        signed: bool,
        /// When the ingest node cut `raw` to fit a broker record: the size and blake3 of
        /// the whole input as it was received, which its forensics record keeps.
        whole: Option<WholeInput>,
    },
}

/// The size and blake3 (lowercase hex) of an input an ingest node cut before passing
/// it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WholeInput {
    pub size: u64,
    pub blake3: String,
}

impl WholeInput {
    pub fn of(raw: &[u8]) -> Self {
        Self {
            size: raw.len() as u64,
            blake3: blake3::hash(raw).to_hex().to_string(),
        }
    }
}

/// What happened to one item of an [`EventBatch`]: the JSON `POST /v1/events` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The item's position in the request.
    pub index: usize,
    pub status: Status,
    /// The reason code of a rejection.
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub log_index: Option<u64>,
    /// Flags on an accepted event, such as `chain_gap` or `quarantined`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// For `chain_gap`: the inclusive range of missing `seq`s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<[u64; 2]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Appended to the log (durable).
    Accepted,
    /// Already in the log at `log_index`: nothing appended.
    Duplicate,
    Rejected,
}

impl Verdict {
    pub fn rejected(index: usize, code: &str, message: impl Into<String>) -> Self {
        Self {
            index,
            status: Status::Rejected,
            reason: Some(code.to_owned()),
            message: Some(message.into()),
            log_index: None,
            flags: Vec::new(),
            missing: None,
        }
    }

    pub fn duplicate(index: usize, log_index: u64) -> Self {
        Self {
            index,
            status: Status::Duplicate,
            reason: None,
            message: None,
            log_index: Some(log_index),
            flags: Vec::new(),
            missing: None,
        }
    }
}

/// A control operation: the writer turns it into control entries signed by the node key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlOp {
    /// Enrolls an agent key in a realm (refused `agent_exists`, `bad_did`, `bad_realm`).
    Enroll {
        agent: String,
        realm: String,
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        labels: std::collections::BTreeMap<String, String>,
        by: String,
    },
    /// Revokes the agent and all its sub-agents.
    Revoke {
        agent: String,
        /// The agent's realm, which places the operation on the agent's partition (empty
        /// when the sender does not know it).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        realm: String,
        by: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

/// What the node must do for an executed action. Carried inside the signed action record,
/// so the log holds the order and its cause together.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Enforcement {
    RevokeAgent {
        agent: String,
    },
    QuarantineAgent {
        agent: String,
    },
    ReinstateAgent {
        agent: String,
    },
    QuarantineMemory {
        memory_id: String,
        agent: String,
    },
    RestoreMemory {
        memory_id: String,
        agent: String,
    },
    RevokeCredential {
        credential: String,
        agent: String,
    },
    /// A call to an agent platform's API (`vaultysclaw`: `disconnect_agent`,
    /// `revoke_policy`, and their undos `restore_agent`, `restore_policy`), carried out by
    /// the responder before it logs the record with the platform's answer; the writer
    /// only logs it.
    Platform {
        platform: String,
        operation: String,
        /// The agent (its Custos did:key) or the platform object (a policy id).
        subject: String,
    },
    /// Carried out by the responder itself (an HTTP call); the writer only logs it.
    Webhook {
        url: String,
        secret_env: String,
        timeout_ms: u64,
        retries: u32,
    },
    None,
}

impl Enforcement {
    /// Whether the writer changes registry state for it (everything but webhooks and none).
    pub fn is_registry_change(&self) -> bool {
        !matches!(
            self,
            Enforcement::Webhook { .. } | Enforcement::Platform { .. } | Enforcement::None
        )
    }
}

/// The fields of a signed action record the writer reads to apply its enforcement. The
/// full record (playbook, approval, ...) belongs to the responder; these are the part of
/// it that is contract.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ActionHead {
    /// `executed`, `pending`, `failed`, ...: only `executed` records are enforced.
    pub status: String,
    pub enforcement: Enforcement,
    pub by: String,
    pub reason: String,
    /// The log index of the finding that caused the action, when there is one.
    #[serde(default)]
    pub cause: Option<u64>,
}

impl ActionHead {
    /// Reads the head of an action record's payload.
    pub fn parse(payload: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(payload).map_err(|error| format!("not an action record: {error}"))
    }

    /// The enforcement the writer must apply, if any.
    pub fn to_apply(&self) -> Option<&Enforcement> {
        (self.status == "executed" && self.enforcement.is_registry_change()).then_some(&self.enforcement)
    }
}

/// What the writer publishes after a durable append (or a refusal of a signed event by an
/// enrolled key, which the detector must see), in log order.
#[derive(Clone, Debug, PartialEq)]
pub enum Committed {
    /// An agent event: appended (its `log_index` is set and `signal` says `accepted`,
    /// with any chain gap), or refused by the registry or chain checks (`log_index` is
    /// `None` and `signal` names the reason).
    Event(Box<Observation>),
    /// A finding entry.
    Finding {
        log_index: u64,
        payload: Vec<u8>,
        /// The entry as signed, when the writer publishes entries (query nodes).
        entry: Option<Box<custos_event::SignedEntry>>,
    },
    /// A responder action record.
    Action {
        log_index: u64,
        payload: Vec<u8>,
        entry: Option<Box<custos_event::SignedEntry>>,
    },
    /// A control entry (node-signed: enrollment, revocation, quarantine, ...).
    Control {
        log_index: u64,
        payload: Vec<u8>,
        entry: Option<Box<custos_event::SignedEntry>>,
    },
    /// Start-up replay of the log has reached `next_index`; live records follow.
    Replayed { next_index: u64 },
}

impl Committed {
    /// The log index of the entry, when it was appended.
    pub fn log_index(&self) -> Option<u64> {
        match self {
            Committed::Event(observation) => observation.log_index,
            Committed::Finding { log_index, .. }
            | Committed::Action { log_index, .. }
            | Committed::Control { log_index, .. } => Some(*log_index),
            Committed::Replayed { .. } => None,
        }
    }
}

/// The writer's answer to one submission, once it is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// The submission's own entry first, then any control entries it caused (an action's
    /// enforcement, a revocation's sub-agents). Empty when nothing had to change (the
    /// subject already was in that state).
    pub log_indexes: Vec<u64>,
    /// For [`Submission::Events`]: one verdict per item, in request order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<Verdict>,
    /// For [`Submission::Adapter`]: the answer to give the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<AdapterReply>,
    /// For [`Submission::Adapter`] over a partition set: the request's realm is written
    /// by partition `route_to`'s log; send it again there ([`AdapterRequest::partition`]).
    /// Nothing was appended and no `reply` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_to: Option<u32>,
}

impl Appended {
    /// The answer to a submission that made these entries.
    pub fn entries(log_indexes: Vec<u64>) -> Self {
        Self {
            log_indexes,
            verdicts: Vec::new(),
            reply: None,
            route_to: None,
        }
    }

    /// The answer to an adapter request that belongs to partition `partition`'s log.
    pub fn route_to(partition: u32) -> Self {
        Self {
            route_to: Some(partition),
            ..Self::entries(Vec::new())
        }
    }
}

/// Why the writer refused a submission: a stable code and a sentence naming the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    pub code: String,
    pub message: String,
    /// Whether the same submission may succeed later (the store was full, the writer
    /// was failing over): the submitter should retry rather than give up.
    #[serde(default)]
    pub retryable: bool,
}

impl Refused {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }

    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            ..Self::new(code, message)
        }
    }
}

/// The writer's eventual answer to a submission: waited for by a thread
/// ([`Receipt::wait`]) or by a task ([`Receipt::answered`]), which then holds no thread.
pub struct Receipt(Arc<Slot>);

/// Where an [`Answer`] leaves the writer's answer for its [`Receipt`].
#[derive(Default)]
struct Slot {
    state: std::sync::Mutex<SlotState>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct SlotState {
    answer: Option<Result<Appended, Refused>>,
    /// The answer can no longer come (the writer dropped it unanswered).
    closed: bool,
    /// The task waiting in [`Receipt::answered`].
    waker: Option<std::task::Waker>,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the answer (or, with `None`, closes the slot) once, waking whoever waits.
    fn settle(&self, answer: Option<Result<Appended, Refused>>) {
        let waker = {
            let mut state = self.lock();
            if state.answer.is_some() || state.closed {
                return;
            }
            match answer {
                Some(answer) => state.answer = Some(answer),
                None => state.closed = true,
            }
            state.waker.take()
        };
        self.ready.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The answer if it came; `Some(Err(stopped))` once it never can.
    fn take(state: &mut SlotState) -> Option<Result<Appended, Refused>> {
        match state.answer.take() {
            Some(answer) => Some(answer),
            None if state.closed => Some(Err(stopped())),
            None => None,
        }
    }
}

/// Closes the slot when an answer is dropped without being sent.
struct Unanswered(Arc<Slot>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.settle(None);
    }
}

/// How the writer answers one submission: in process, a channel; over Kafka, a record on
/// the receipts topic.
pub struct Answer(Box<dyn FnOnce(Result<Appended, Refused>) + Send>);

impl Answer {
    /// An answer that calls `send` once.
    pub fn new(send: impl FnOnce(Result<Appended, Refused>) + Send + 'static) -> Self {
        Self(Box::new(send))
    }

    pub fn send(self, answer: Result<Appended, Refused>) {
        (self.0)(answer)
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Answer")
    }
}

/// A receipt and the answer that resolves it.
pub fn receipt() -> (Answer, Receipt) {
    let slot = Arc::new(Slot::default());
    let guard = Unanswered(slot.clone());
    let answer = Answer::new(move |answer| {
        // The submitter may have stopped waiting; the entry is in the log either way.
        guard.0.settle(Some(answer));
    });
    (answer, Receipt(slot))
}

impl Receipt {
    /// Waits up to `timeout` for the answer, holding the calling thread.
    pub fn wait(&self, timeout: Duration) -> Result<Appended, Refused> {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.0.lock();
        loop {
            if let Some(answer) = Slot::take(&mut state) {
                return answer;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(timed_out(timeout));
            }
            state = self
                .0
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// The answer, for a task to await: it holds no thread while it waits. Bound it
    /// with the runtime's timer; [`timed_out`] is the refusal to answer then.
    pub fn answered(self) -> impl std::future::Future<Output = Result<Appended, Refused>> + Send {
        std::future::poll_fn(move |context| {
            let mut state = self.0.lock();
            match Slot::take(&mut state) {
                Some(answer) => std::task::Poll::Ready(answer),
                None => {
                    state.waker = Some(context.waker().clone());
                    std::task::Poll::Pending
                }
            }
        })
    }

    /// The answer if it has come, without waiting.
    pub fn try_take(&self) -> Option<Result<Appended, Refused>> {
        Slot::take(&mut self.0.lock())
    }
}

/// The refusal of a submission whose answer did not come within `timeout`: retryable,
/// since the writer may still append it (a resend is answered `duplicate`).
pub fn timed_out(timeout: Duration) -> Refused {
    Refused::retryable(
        "writer_timeout",
        format!("the log writer did not answer within {} ms", timeout.as_millis()),
    )
}

fn stopped() -> Refused {
    Refused::retryable("stopping", "the log writer has stopped")
}

/// A transport failure (not a writer's refusal).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("the transport is closed")]
    Closed,
    #[error("kafka: {0}")]
    Kafka(String),
    /// The record is larger than the Kafka client takes (`message.max.bytes`, 1 000 000
    /// unless the settings file raises it, with the brokers' and topic's limits).
    #[error(
        "a record of {bytes} bytes is larger than the Kafka client's message.max.bytes (the brokers' message size limit)"
    )]
    TooLarge { bytes: usize },
    #[error("malformed record on `{topic}` at offset {offset}: {message}")]
    Malformed {
        topic: String,
        offset: i64,
        message: String,
    },
}

/// Sends submissions to the log writer. Cheap to share between threads.
pub trait Submitter: Send + Sync {
    /// Hands `submission` to the writer; the receipt answers once it is durable or
    /// refused. Returns when the transport has taken it (queued in process, or
    /// acknowledged by the broker).
    fn submit(&self, submission: Submission) -> Result<Receipt, StageError>;

    /// Submissions sent again so far because their receipt was late (a transport that
    /// cannot lose one sends none).
    fn resubmitted(&self) -> u64 {
        0
    }

    /// How many partitions submissions are spread over (by realm,
    /// [`wire::partition_for`]): 1 in one process.
    fn partitions(&self) -> u32 {
        1
    }
}

/// A submitter that stamps the action records it passes on with the responder lease
/// tenure they are made under: what fences a responder that lost the lease.
pub struct Fenced<S> {
    pub inner: S,
    pub lease_epoch: u64,
}

impl<S: Submitter> Submitter for Fenced<S> {
    fn submit(&self, submission: Submission) -> Result<Receipt, StageError> {
        self.inner.submit(match submission {
            Submission::Action { envelope, .. } => Submission::Action {
                envelope,
                lease_epoch: Some(self.lease_epoch),
            },
            other => other,
        })
    }

    fn resubmitted(&self) -> u64 {
        self.inner.resubmitted()
    }

    fn partitions(&self) -> u32 {
        self.inner.partitions()
    }
}

/// Where a stage reads what the writer committed, in log order.
pub trait Subscription: Send {
    /// The next record, waiting up to `timeout`; `Ok(None)` when none came.
    fn recv(&mut self, timeout: Duration) -> Result<Option<Committed>, StageError>;

    /// Everything received so far is handled and saved (the detector's snapshot holds
    /// it): a restart may resume after it. Kafka commits the consumer offsets; in process
    /// the log replays from the snapshot's index instead, so there is nothing to do.
    fn ack(&mut self) -> Result<(), StageError> {
        Ok(())
    }
}

/// The log writer's end: the submissions to append, in order.
pub trait Intake: Send {
    /// The next submission and how to answer it, waiting up to `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Option<(Submission, Answer)>, StageError>;

    /// Everything received so far is durable in the log: it must not be delivered again
    /// (Kafka commits the consumer offsets only now).
    fn ack(&mut self) -> Result<(), StageError> {
        Ok(())
    }
}

/// The log writer's end: publishes what became durable, in log order.
pub trait Publish: Send {
    fn publish(&mut self, record: Committed) -> Result<(), StageError>;

    /// Makes everything published so far visible to subscribers (Kafka: waits for the
    /// broker's acknowledgement).
    fn flush(&mut self) -> Result<(), StageError> {
        Ok(())
    }
}

/// Carries submissions from `intake` (another transport) to the writer's own queue, in
/// order: takes what is waiting (up to `batch`), submits it, waits for every receipt,
/// answers each, and only then acknowledges the intake, so an acknowledged offset is
/// always durable in the log. Returns when `stop` is set or a side closes.
pub fn forward_submissions(
    intake: &mut dyn Intake,
    writer: &dyn Submitter,
    batch: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), StageError> {
    ended(forward_submissions_until_closed(intake, writer, batch, stop))
}

/// A bridge's result: the other side going away is its normal end.
fn ended(result: Result<(), StageError>) -> Result<(), StageError> {
    match result {
        Err(StageError::Closed) => Ok(()),
        other => other,
    }
}

fn forward_submissions_until_closed(
    intake: &mut dyn Intake,
    writer: &dyn Submitter,
    batch: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), StageError> {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut taken = Vec::new();
        let mut wait = Duration::from_millis(100);
        while taken.len() < batch.max(1) {
            match intake.recv(wait)? {
                Some(item) => taken.push(item),
                None => break,
            }
            wait = Duration::ZERO;
        }
        if taken.is_empty() {
            continue;
        }
        let mut pending = Vec::with_capacity(taken.len());
        for (submission, answer) in taken {
            pending.push((writer.submit(submission)?, answer));
        }
        for (receipt, answer) in pending {
            // A retryable refusal is answered as such: the submitter sends it again.
            answer.send(receipt.wait(Duration::from_secs(60)));
        }
        // Not acknowledged (brokers away): the batch is delivered again later, and the
        // writer's dedupe answers it `duplicate`-style without a second append.
        if let Err(error) = intake.ack() {
            tracing::warn!(%error, "could not acknowledge submissions; they will be redelivered");
        }
    }
    Ok(())
}

/// Carries committed records from the writer's own subscription to `publish` (another
/// transport), flushing after each burst; entries below log index `from` (already
/// published before a restart) are skipped, refused events always go. After each flush,
/// `published` hears the highest log index now out. Returns when `stop` is set or a side
/// closes.
pub fn forward_committed(
    subscription: &mut dyn Subscription,
    publish: &mut dyn Publish,
    from: u64,
    published: &mut dyn FnMut(u64),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), StageError> {
    ended(forward_committed_until_closed(
        subscription,
        publish,
        from,
        published,
        stop,
    ))
}

fn forward_committed_until_closed(
    subscription: &mut dyn Subscription,
    publish: &mut dyn Publish,
    from: u64,
    published: &mut dyn FnMut(u64),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), StageError> {
    let mut highest = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(record) = subscription.recv(Duration::from_millis(100))? else {
            continue;
        };
        let mut next = Some(record);
        while let Some(record) = next {
            // The writer's start-up replay marker is for in-process readers; a Kafka
            // subscription makes its own from the topic's ends.
            if !matches!(record, Committed::Replayed { .. }) && record.log_index().is_none_or(|index| index >= from) {
                if let Some(index) = record.log_index() {
                    highest = highest.max(Some(index));
                }
                publish.publish(record)?;
            }
            next = subscription.recv(Duration::ZERO)?;
        }
        // While the brokers are away the flush times out: keep flushing (nothing is
        // dropped, see `KafkaPublisher`) until they are back or the writer stops.
        while let Err(error) = publish.flush() {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(error);
            }
            tracing::warn!(%error, "publishing committed records: waiting for the brokers");
        }
        if let Some(index) = highest {
            published(index);
        }
    }
    Ok(())
}
