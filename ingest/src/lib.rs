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
//! ```
//!
//! Admin routes (`/v1/agents`, `/v1/rejected`, `/v1/checkpoints/latest`) go through the
//! same sequencer, so a revocation is ordered before any event queued after it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;

pub mod auth;
pub mod forensics;
mod http;
pub mod registry;
pub mod samples;
pub mod sequencer;

pub use auth::{Caller, Role, Secret, Tokens};
pub use registry::{AgentRecord, AgentStatus};
pub use sequencer::{ItemResult, ItemResultView, Status};

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

/// An error answer: HTTP status, stable code, sentence.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub error: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
        }
    }

    pub(crate) fn store(error: &custos_store::StoreError) -> Self {
        Self::new(503, "store_failed", format!("the store cannot accept writes: {error}"))
    }
}

/// A running node.
pub struct Running {
    pub addr: SocketAddr,
    /// The first admin token, when this start created the store.
    pub admin_token: Option<Secret>,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), NodeError>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests, seals the open segment and signs a
    /// final checkpoint.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.done.await.map_err(|error| NodeError::Stopped(error.to_string()))?
    }
}

/// Opens the store (recovering from the WAL), binds the listener and serves.
pub async fn start(config: NodeConfig) -> Result<Running, NodeError> {
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
    let (tokens, admin_token) = Tokens::open(&config.data)?;
    let ready = Arc::new(AtomicBool::new(false));
    let sequencer = {
        let config = config.clone();
        let ready = ready.clone();
        tokio::task::spawn_blocking(move || sequencer::Sequencer::open(config, node_key, ready))
            .await
            .map_err(|error| NodeError::Stopped(error.to_string()))??
    };
    let (commands, receiver) = std::sync::mpsc::channel();
    let writer = std::thread::Builder::new()
        .name("custos-sequencer".into())
        .spawn(move || sequencer.run(receiver))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr()?;
    // The store is recovered and the sequencer is taking commands.
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let state = http::AppState {
        commands: commands.clone(),
        tokens: Arc::new(tokens),
        config: Arc::new(config),
        ready,
        keys: Arc::new(custos_event::KeyCache::default()),
    };
    let router = http::router(state);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.await;
            })
            .await?;
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
    tracing::info!(%addr, "custos node listening");
    Ok(Running {
        addr,
        admin_token,
        shutdown: Some(shutdown_tx),
        done,
    })
}
