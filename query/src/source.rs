//! Where the query API reads from: one log, seen by whatever process holds it.
//!
//! ```text
//!  query routes ──▶ dyn Source ──┬─▶ the log writer (custos_ingest::Api, in the same process)
//!                                └─▶ a query node's replica (custos_ingest::replica: sealed
//!                                    segments from object storage, the tail from Kafka)
//! ```
//!
//! The query crate knows nothing of the writer: the binary hands it a [`Source`] and the
//! token table, so `custos-query` builds on `custos-http` and `custos-store` only.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use custos_event::Envelope;
use custos_event::agent::AgentRecord;
use custos_http::ApiError;
use custos_store::forensics::RejectedRecord;
use custos_store::{CheckpointView, EvidenceProofs, StoreView};

/// A source's answer, later.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// What the query routes read. Every method is a read; [`Source::sign`] signs a bundle
/// manifest with the node key and writes nothing to the log.
pub trait Source: Send + Sync + 'static {
    /// The node's data directory: the access log and the last verification live there,
    /// and a partitioned store is found from it.
    fn data(&self) -> &Path;
    /// The store on disk `POST /v1/integrity/verify` checks: the data directory itself
    /// on a writer, the local copy of the sealed store on a query node.
    fn store_dir(&self) -> &Path {
        self.data()
    }
    /// The sealed segments and the unsealed tail, at one instant.
    fn view(&self) -> Pending<'_, StoreView>;
    /// Every enrolled agent.
    fn agents(&self) -> Pending<'_, Vec<AgentRecord>>;
    /// Kept rejected inputs, newest first, at most `limit`, of `reason` when given.
    fn rejected(&self, reason: Option<String>, limit: usize) -> Pending<'_, Vec<RejectedRecord>>;
    /// The latest signed checkpoint.
    fn checkpoint(&self) -> Pending<'_, CheckpointView>;
    /// A consistency proof between two tree sizes (JSON as `GET /v1/proofs/consistency`).
    fn consistency(&self, from: u64, to: u64) -> Pending<'_, serde_json::Value>;
    /// Signs a checkpoint if needed and proves `indexes` against it.
    fn evidence_proofs(&self, indexes: Vec<u64>) -> Pending<'_, EvidenceProofs>;
    /// Signs `bytes` as `payload_type` with the node key.
    fn sign(&self, payload_type: &'static str, bytes: Vec<u8>) -> Pending<'_, Envelope>;
}
