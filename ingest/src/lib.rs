//! Custos ingest: the node's front door and its single writer.
//!
//! ```text
//!  POST /v1/events (JSON array or NDJSON)
//!        │ split, one item per envelope (a bad item never fails its neighbours)
//!        ▼
//!  decode ─▶ size limit ─▶ batch ed25519 verify (fallback: one by one) ─▶ parse payload
//!        │                                   (blocking pool, all cores)
//!        ▼
//!  sequencer thread: registry (enrolled? revoked? realm?) ─▶ clock ─▶ chain (seq/prev)
//!        │  accepted + control entries           rejected ─▶ forensics (bounded NDJSON)
//!        ▼
//!  store: WAL group commit (fsync) ─▶ answer every request in the group
//!        │
//!        ▼
//!  Committed records (custos-stage) ─▶ Hooks::publish (detector, responder, Kafka bridge)
//!
//!  stages ── Submission (findings; action records with their enforcement; control ops)
//!         ──▶ Queue (the same command queue) ─▶ sequencer thread ─▶ receipts
//!
//!  platform adapters: POST /v1/traces (otlp), /v1/adapters/lastid/audit (lastid),
//!  /v1/adapters/vaultysclaw/webhook + audit pull (vaultysclaw)
//!        │ checked by the platform's own rules, mapped to event members
//!        ▼
//!  attest: signed by the adapter's per-agent keys ─▶ the same decode/verify/sequencer path
//!        ▲
//!  Submission::Adapter from ingest nodes (forwarded: the same handlers, the token by its hash)
//! ```
//!
//! Admin routes (`/v1/agents`, `/v1/rejected`, `/v1/checkpoints/latest`) and the stages'
//! submissions go through the same sequencer, so a revocation is ordered before any event
//! queued after it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::oneshot;

pub(crate) mod attest;
pub mod edge;
mod forwarded;
pub use forwarded::{AdapterDesk, AdapterIntake, MAX_SERVING as MAX_ADAPTER_REQUESTS, SetPlace};
mod http;
mod lastid;
mod lookup;
pub mod otlp;
pub mod vaultysclaw;
pub use http::catalogue;
pub mod registry;
pub mod replica;
mod reverify;
pub use reverify::Reverified;
pub mod samples;
pub mod sequencer;
mod state;
pub mod witness;

pub use custos_http::ApiError;
use custos_http::{Secret, Tokens, metrics, serve};
pub use custos_stage::{Status, Verdict};
use custos_store::forensics;
use custos_store::{EvidenceProofs, StoreView};
pub use sequencer::{Closed, ItemResultView, ListedAgent, RevocationList, StatusChange, Unsealed};

/// The writer's command queue, made before the node starts so that stages can hold a
/// [`Submitter`](custos_stage::Submitter) from the beginning; what they submit waits in
/// it until the writer runs.
pub struct Queue {
    sender: std::sync::mpsc::Sender<sequencer::Command>,
    receiver: std::sync::mpsc::Receiver<sequencer::Command>,
}

/// A submitter into the writer's queue (the embedded transport's stage end).
pub type QueueSubmitter = custos_stage::embedded::ChannelSubmitter<sequencer::Command>;

impl Queue {
    pub fn new() -> Self {
        let (sender, receiver) = std::sync::mpsc::channel();
        Self { sender, receiver }
    }

    /// A submitter for a stage: its submissions are ordered with intake and admin
    /// commands in the writer's one queue.
    pub fn submitter(&self) -> QueueSubmitter {
        custos_stage::embedded::ChannelSubmitter::new(self.sender.clone(), |submission, answer| {
            sequencer::Command::Submit { submission, answer }
        })
    }
}

impl Default for Queue {
    fn default() -> Self {
        Self::new()
    }
}

/// What the node serves about findings and response actions. Implemented by the binary,
/// which owns the detector and the responder (ingest does not depend on them).
pub trait Operations: Send + Sync {
    /// Newest first, at most `limit`, only in `realms` (all when empty).
    fn findings(&self, realms: &[String], limit: usize) -> Vec<serde_json::Value>;
    /// Action records, newest first, at most `limit`, only in `realms` (all when empty).
    fn actions(&self, realms: &[String], limit: usize) -> Vec<serde_json::Value>;
    /// Approvals waiting for a decision, in `realms` (all when empty).
    fn pending(&self, realms: &[String]) -> Vec<serde_json::Value>;
    /// Approves or denies a pending approval; blocks until the responder has acted.
    /// `realms` limits which approvals the caller may decide (all when empty).
    fn decide(&self, approval: &str, approve: bool, by: &str, realms: &[String])
    -> Result<serde_json::Value, ApiError>;
    /// Asks to undo an executed action; the undo itself waits for approval.
    fn undo(&self, action: &str, by: &str, realms: &[String]) -> Result<serde_json::Value, ApiError>;
    /// The playbooks, their caps, and the realms (of `realms`, all when empty) where a cap
    /// paused them.
    fn playbooks(&self, realms: &[String]) -> Vec<serde_json::Value>;
    /// Resumes `playbook` in `realm` after a cap paused it; blocks until the responder has
    /// recorded the resume in the log. `realms` limits where the caller may (all when empty).
    fn resume(&self, playbook: &str, realm: &str, by: &str, realms: &[String]) -> Result<serde_json::Value, ApiError>;
    /// A summary of the agent's learned baseline (windows learned, whether it is still
    /// learning, expected values per feature), when the detector knows the agent.
    fn baseline(&self, agent: &str) -> Option<serde_json::Value> {
        let _ = agent;
        None
    }
}

/// Everything `start_with` wires in besides the store. The default is a plain node.
#[derive(Default)]
pub struct Hooks {
    /// Receives every committed record (and refused signed events), after the fsync, in
    /// log order: the embedded transport's publisher.
    pub publish: Option<custos_stage::embedded::Fanout>,
    /// At start, events from this log index on are replayed to `publish` (findings and
    /// action records always are). Use the detector snapshot's next index.
    pub replay_from: u64,
    /// Committed records carry each appended entry as signed (keyid, signature, payload
    /// bytes, ingest time), so a reader of the committed topic can rebuild the log's rows
    /// (query nodes). Off in the embedded mode, where nothing reads them.
    pub publish_entries: bool,
    /// The writer's queue, when stages were given submitters into it before the start.
    pub queue: Option<Queue>,
    /// System keys (`did:key` → the one payload type each may append), such as the
    /// detector's (findings) and the responder's (action records).
    pub system_signers: std::collections::BTreeMap<String, String>,
    pub operations: Option<Arc<dyn Operations>>,
    /// Runs after HTTP has stopped and before the log is sealed: drain the detector and
    /// the responder so their last findings and actions are written.
    pub drain: Option<Box<dyn FnOnce() + Send>>,
    /// More routes (the query API, the console), built once the node is open and served
    /// beside ingest's own.
    pub routes: Option<RouteBuilder>,
    /// Serves the adapter requests ingest nodes pass on ([`AdapterDesk`]) once the node
    /// is open: given to the writer's Kafka bridge before the start.
    pub adapters: Option<AdapterDesk>,
    /// The writer's Kafka bridge: where the node's LastID enrollments go as control-topic
    /// records (all of them at start, then each new one), and how far the node's control
    /// records have reached the brokers, which enrollments and revocations are answered
    /// after.
    pub control: Option<registry::ControlLink>,
}

/// Builds extra routes once the node is open (see [`Hooks::routes`]).
pub type RouteBuilder = Box<dyn FnOnce(Api) -> axum::Router + Send>;

/// What other stages' HTTP routes need from the node: authentication and reads through
/// the sequencer. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    commands: std::sync::mpsc::Sender<sequencer::Command>,
    tokens: Arc<std::sync::RwLock<Tokens>>,
    pub data: PathBuf,
    /// Status changes, as the control stream sends them.
    pub changes: tokio::sync::broadcast::Sender<StatusChange>,
}

impl Api {
    /// The token table, for routes built outside this crate (the query API).
    pub fn tokens(&self) -> custos_http::SharedTokens {
        self.tokens.clone()
    }

    /// Whether the token `id` still authenticates (it exists, is not revoked, and has not
    /// expired): long-lived answers such as the control stream end when it stops.
    pub fn token_valid(&self, id: &str) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .valid(id)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, sequencer::WriterError>>) -> sequencer::Command,
    ) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .map_err(|_| sequencer::WriterError::stopping())?;
        Ok(answer.await.map_err(|_| sequencer::WriterError::stopping())??)
    }

    /// The sealed segments and the unsealed tail, at one instant.
    pub async fn view(&self) -> Result<StoreView, ApiError> {
        self.ask(|reply| sequencer::Command::View { reply }).await
    }

    /// The latest signed checkpoint.
    pub async fn checkpoint(&self) -> Result<custos_store::CheckpointView, ApiError> {
        self.ask(|reply| sequencer::Command::Checkpoint { reply }).await
    }

    /// Every enrolled agent.
    pub async fn agents(&self) -> Result<Vec<custos_event::agent::AgentRecord>, ApiError> {
        self.ask(|reply| sequencer::Command::Agents { reply }).await
    }

    /// Signs a checkpoint if needed and proves `indexes` against it.
    pub async fn evidence_proofs(&self, indexes: Vec<u64>) -> Result<EvidenceProofs, ApiError> {
        self.ask(|reply| sequencer::Command::Evidence { indexes, reply }).await
    }

    /// A consistency proof between two tree sizes (JSON as `GET /v1/proofs/consistency`).
    pub async fn consistency(&self, from: u64, to: u64) -> Result<serde_json::Value, ApiError> {
        self.ask(|reply| sequencer::Command::Consistency { from, to, reply })
            .await
    }

    /// Signs `bytes` as `payload_type` with the node key.
    pub async fn sign(&self, payload_type: &str, bytes: Vec<u8>) -> Result<custos_event::Envelope, ApiError> {
        let payload_type = payload_type.to_owned();
        self.ask(|reply| sequencer::Command::SignAs {
            payload_type,
            bytes,
            reply,
        })
        .await
    }

    /// Kept rejected inputs, newest first (read off the writer's thread).
    pub async fn rejected(
        &self,
        reason: Option<String>,
        limit: usize,
    ) -> Result<Vec<forensics::RejectedRecord>, ApiError> {
        let files = self.ask(|reply| sequencer::Command::Rejected { reply }).await?;
        tokio::task::spawn_blocking(move || forensics::read_recent(&files, reason.as_deref(), limit))
            .await
            .map_err(|error| ApiError::new(500, "internal", error.to_string()))
    }
}

/// Everything `custos serve` can be told.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    /// Largest single envelope accepted.
    pub max_event_bytes: usize,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Most envelopes in one request.
    pub max_events_per_request: usize,
    /// How far ahead of the node clock `ts` may be.
    pub max_future_skew: Duration,
    /// How far behind the node clock `ts` may be.
    pub max_age: Duration,
    /// How many rejected inputs are kept for forensics.
    pub rejected_max_records: usize,
    /// How many bytes of rejected input are kept for forensics (about).
    pub rejected_max_bytes: u64,
    /// Recent (seq, digest) pairs kept per agent to tell duplicates from forks.
    pub chain_window: usize,
    pub log: custos_store::LogConfig,
    /// Connections, timeouts and the body budget of the HTTP front door.
    pub http: serve::HttpLimits,
    /// Unauthenticated rejections (bad signatures, unknown keys, malformed input) a
    /// source may cause per second, sustained; beyond it, its requests get 429.
    pub reject_rate_per_sec: f64,
    /// ... and in a burst.
    pub reject_burst: f64,
    /// Witnesses to submit checkpoints to (C2SP tlog-witness).
    pub witnesses: Vec<witness::WitnessTarget>,
    /// The VaultysClaw adapter (webhook receiver, audit pull).
    pub vaultysclaw: Option<vaultysclaw::VaultysClawConfig>,
    /// Where the token table lives, when not in `data`: the writers of a partition set
    /// share one, `DATA/edge/`, which their ingest edges serve too.
    pub tokens: Option<PathBuf>,
}

impl NodeConfig {
    pub fn new(data: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data,
            listen,
            max_event_bytes: 64 * 1024,
            max_request_bytes: 32 * 1024 * 1024,
            max_events_per_request: 10_000,
            max_future_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(7 * 24 * 3600),
            rejected_max_records: 100_000,
            rejected_max_bytes: 256 * 1024 * 1024,
            chain_window: 32,
            log: custos_store::LogConfig::default(),
            http: serve::HttpLimits::default(),
            reject_rate_per_sec: 100.0,
            reject_burst: 2_000.0,
            witnesses: Vec::new(),
            vaultysclaw: None,
            tokens: None,
        }
    }
}

/// Why the node could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] custos_store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("cannot listen on `{addr}`: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the node stopped: {0}")]
    Stopped(String),
    #[error("`{0}` is in use by another running `custos serve`; one node per data directory")]
    Locked(String),
}

/// The writer's store could not take the write.
pub(crate) fn store_failed(error: &custos_store::StoreError) -> sequencer::WriterError {
    sequencer::WriterError::new(
        sequencer::ErrorKind::Unavailable,
        "store_failed",
        format!("the store cannot accept writes: {error}"),
    )
}

/// A running node.
pub struct Running {
    pub addr: SocketAddr,
    /// The first admin token, when this start created the store.
    pub admin_token: Option<Secret>,
    /// The node key (`did:key`): it signs control entries and the revocation list.
    pub node_did: String,
    /// Submits to the writer, for in-process stages.
    pub submitter: Arc<QueueSubmitter>,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<Closed, NodeError>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests, seals the open segment and signs a
    /// final checkpoint.
    pub async fn shutdown(mut self) -> Result<Closed, NodeError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.done.await.map_err(|error| NodeError::Stopped(error.to_string()))?
    }
}

/// Binds the listener.
pub(crate) async fn bind(listen: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), NodeError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| NodeError::Listen { addr: listen, source })?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// The HTTP limits in force and the connection slots (below the descriptor limit, less
/// the store's reserve), and the descriptor limit.
pub(crate) fn front_door(config: &NodeConfig) -> (serve::HttpLimits, usize, u64) {
    let descriptors = serve::raise_descriptor_limit();
    let mut http_limits = config.http.clone();
    http_limits.max_body_bytes = config.max_request_bytes;
    let max_connections = serve::connection_limit(&http_limits, descriptors);
    if config.http.max_connections > max_connections {
        tracing::warn!(
            wanted = config.http.max_connections,
            allowed = max_connections,
            descriptors,
            reserved = http_limits.reserved_descriptors,
            "fewer connections than asked: the descriptor limit, less the store's reserve, allows no more"
        );
    }
    (http_limits, max_connections, descriptors)
}

/// Opens the store (recovering from the WAL), binds the listener and serves.
pub async fn start(config: NodeConfig) -> Result<Running, NodeError> {
    start_with(config, Hooks::default()).await
}

/// [`start`] with the detector feed, system signers and operations wired in.
pub async fn start_with(config: NodeConfig, hooks: Hooks) -> Result<Running, NodeError> {
    metrics::init();
    let Hooks {
        publish,
        replay_from,
        publish_entries,
        queue,
        system_signers,
        operations,
        drain,
        routes,
        adapters,
        control,
    } = hooks;
    let (changes, _) = tokio::sync::broadcast::channel(4096);
    // Ends long-lived responses (the control stream) so a graceful shutdown can finish.
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let sequencer_hooks = sequencer::SequencerHooks {
        publish,
        replay_from,
        signers: system_signers,
        changes: Some(changes.clone()),
        entries: publish_entries,
    };
    fs_err::create_dir_all(&config.data)?;
    // One writer per store: an OS lock, released by the kernel if the process dies.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(config.data.join("LOCK"))?;
    lock.try_lock().map_err(|error| match error {
        std::fs::TryLockError::WouldBlock => NodeError::Locked(config.data.display().to_string()),
        std::fs::TryLockError::Error(error) => NodeError::Io(error),
    })?;
    let node_key =
        custos_store::keyfile::load_or_create(&config.data.join("node.key")).map_err(custos_store::StoreError::from)?;
    let tokens_dir = config.tokens.clone().unwrap_or_else(|| config.data.clone());
    fs_err::create_dir_all(&tokens_dir)?;
    let (tokens, admin_token) = Tokens::open(&tokens_dir)?;
    let ready = Arc::new(AtomicBool::new(false));
    let node_did = node_key.did().to_owned();
    let sequencer = {
        let config = config.clone();
        let ready = ready.clone();
        tokio::task::spawn_blocking(move || sequencer::Sequencer::open(config, node_key, ready, sequencer_hooks))
            .await
            .map_err(|error| NodeError::Stopped(error.to_string()))??
    };
    let queue = queue.unwrap_or_default();
    let submitter = Arc::new(queue.submitter());
    let Queue {
        sender: commands,
        receiver,
    } = queue;
    let writer = std::thread::Builder::new()
        .name("custos-sequencer".into())
        .spawn(move || sequencer.run(receiver))?;
    let (listener, addr) = bind(config.listen).await?;
    // The store is recovered and the sequencer is taking commands.
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let tokens = Arc::new(std::sync::RwLock::new(tokens));
    let api = Api {
        commands: commands.clone(),
        tokens: tokens.clone(),
        data: config.data.clone(),
        changes: changes.clone(),
    };
    let (http_limits, max_connections, descriptors) = front_door(&config);
    let rejects = Arc::new(serve::RejectLimiter::new(
        config.reject_rate_per_sec,
        config.reject_burst,
    ));
    let cosigned = witness::Cosigned::default();
    if !config.witnesses.is_empty() {
        witness::check_at_start(&api, &config.witnesses, &cosigned)
            .await
            .map_err(|reason| NodeError::Store(custos_store::StoreError::Tamper(reason)))?;
        tokio::spawn(witness::run(
            api.clone(),
            config.witnesses.clone(),
            cosigned.clone(),
            stopping_rx.clone(),
        ));
    }
    let (notes, published) = match control {
        Some(registry::ControlLink { notes, published }) => (Some(notes), Some(published)),
        None => (None, None),
    };
    let lastid = Arc::new(lastid::LastId::open(&config.data, notes));
    let (vaultysclaw, vaultysclaw_token) = match &config.vaultysclaw {
        Some(settings) => {
            let adapter = vaultysclaw::VaultysClaw::open(&config.data, settings.clone())
                .map_err(|error| NodeError::Stopped(format!("VaultysClaw settings: {error}")))?;
            let token = match &settings.token_file {
                Some(path) => Some(custos_http::auth::read_secret_file(path).map_err(|error| {
                    NodeError::Stopped(format!("VaultysClaw token file `{}`: {error}", path.display()))
                })?),
                None => None,
            };
            (Some(Arc::new(adapter)), token)
        }
        None => (None, None),
    };
    let state = http::AppState {
        commands: commands.clone(),
        tokens,
        config: Arc::new(config),
        ready,
        keys: Arc::new(custos_event::KeyCache::default()),
        changes,
        operations,
        stopping: stopping_rx,
        rejects,
        cosigned,
        attestors: Arc::default(),
        lastid,
        vaultysclaw: vaultysclaw.clone(),
        published,
    };
    if let (Some(adapter), Some(token)) = (vaultysclaw, vaultysclaw_token) {
        tokio::spawn(vaultysclaw::pull(state.clone(), adapter, token));
    }
    if let Some(desk) = adapters {
        desk.open(state.clone(), tokio::runtime::Handle::current());
    }
    let mut router = http::router(state);
    if let Some(routes) = routes {
        router = router.merge(routes(api));
    }
    let bodies = Arc::new(serve::BodyBudget::new(http_limits.clone()));
    let router = router
        .layer(axum::middleware::from_fn_with_state(bodies, serve::budget_bodies))
        .layer(axum::middleware::from_fn(custos_http::json_errors));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    tracing::info!(%addr, max_connections, descriptors, "custos node listening");
    let done = tokio::spawn(async move {
        serve::serve(listener, router, http_limits, max_connections, async move {
            let _ = shutdown_rx.await;
            let _ = stopping_tx.send(true);
        })
        .await;
        if let Some(drain) = drain {
            tokio::task::spawn_blocking(drain)
                .await
                .map_err(|error| NodeError::Stopped(error.to_string()))?;
        }
        // Every request has been answered; now seal and checkpoint.
        let (reply, answer) = oneshot::channel();
        commands
            .send(sequencer::Command::Shutdown { reply })
            .map_err(|_| NodeError::Stopped("the sequencer is gone".into()))?;
        let result = answer
            .await
            .map_err(|_| NodeError::Stopped("the sequencer is gone".into()))?;
        drop(commands);
        let _lock = lock;
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .map_err(|error| NodeError::Stopped(error.to_string()))?
            .map_err(|_| NodeError::Stopped("the sequencer panicked".into()))?;
        result.map_err(|error| NodeError::Stopped(error.message))
    });
    Ok(Running {
        addr,
        admin_token,
        node_did,
        submitter,
        shutdown: Some(shutdown_tx),
        done,
    })
}
