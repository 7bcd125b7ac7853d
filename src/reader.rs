//! The query API's [`Source`](custos_query::Source)s: on a node that holds the log, the
//! writer's own reads through its command queue; on a query node, its replica.
//! `custos-query` knows nothing of either; this file is where they meet.
//!
//! ```text
//!  custos_query routes ─┬▶ WriterSource ──▶ custos_ingest::Api ──▶ sequencer thread
//!                       └▶ ReplicaSource ─▶ custos_ingest::replica::Replica (query nodes)
//! ```

use std::path::Path;
use std::sync::{Arc, Mutex};

use custos_http::ApiError;
use custos_ingest::replica::Replica;

use custos_event::Envelope;
use custos_event::agent::AgentRecord;
use custos_query::source::Pending;
use custos_store::forensics::RejectedRecord;
use custos_store::{CheckpointView, EvidenceProofs, StoreView};

/// The writer, as the query routes read it.
struct WriterSource(custos_ingest::Api);

impl custos_query::Source for WriterSource {
    fn data(&self) -> &Path {
        &self.0.data
    }

    fn view(&self) -> Pending<'_, StoreView> {
        Box::pin(self.0.view())
    }

    fn agents(&self) -> Pending<'_, Vec<AgentRecord>> {
        Box::pin(self.0.agents())
    }

    fn rejected(&self, reason: Option<String>, limit: usize) -> Pending<'_, Vec<RejectedRecord>> {
        Box::pin(self.0.rejected(reason, limit))
    }

    fn checkpoint(&self) -> Pending<'_, CheckpointView> {
        Box::pin(self.0.checkpoint())
    }

    fn consistency(&self, from: u64, to: u64) -> Pending<'_, serde_json::Value> {
        Box::pin(self.0.consistency(from, to))
    }

    fn evidence_proofs(&self, indexes: Vec<u64>) -> Pending<'_, EvidenceProofs> {
        Box::pin(self.0.evidence_proofs(indexes))
    }

    fn sign(&self, payload_type: &'static str, bytes: Vec<u8>) -> Pending<'_, Envelope> {
        Box::pin(self.0.sign(payload_type, bytes))
    }
}

/// The query API (with the console and `GET /openapi.json` describing every route) as a
/// [`custos_ingest::Hooks::routes`] builder over the writer. Starts the query runtime now.
pub(crate) fn query_routes(limits: custos_query::Limits) -> anyhow::Result<custos_ingest::RouteBuilder> {
    let routes = custos_query::http::routes(limits, custos_ingest::catalogue())?;
    Ok(Box::new(move |api: custos_ingest::Api| {
        let tokens = api.tokens();
        routes(custos_query::source::Logs::one(Arc::new(WriterSource(api))), tokens)
    }))
}

/// A query node's replica (of one log, or of one partition's log in a partition set),
/// as the query routes read it. It holds no key and no
/// forensics: evidence bundles (signed by the writer's node key) and rejected inputs are
/// the writer's to serve.
pub(crate) struct ReplicaSource {
    pub(crate) replica: Arc<Mutex<Replica>>,
    pub(crate) data: std::path::PathBuf,
    pub(crate) store: std::path::PathBuf,
}

impl ReplicaSource {
    fn with<T>(&self, read: impl FnOnce(&Replica) -> T) -> T {
        read(&self.replica.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// What only a writer can answer.
fn writer_only(what: &str) -> ApiError {
    ApiError::new(
        501,
        "writer_only",
        format!("{what} come from a log writer (its node key signs them); ask a node run with --roles writer"),
    )
}

impl custos_query::Source for ReplicaSource {
    fn data(&self) -> &Path {
        &self.data
    }

    fn store_dir(&self) -> &Path {
        &self.store
    }

    fn view(&self) -> Pending<'_, StoreView> {
        let view = self.with(Replica::view);
        Box::pin(async move { Ok(view) })
    }

    fn agents(&self) -> Pending<'_, Vec<AgentRecord>> {
        let agents = self.with(Replica::agents);
        Box::pin(async move { Ok(agents) })
    }

    fn rejected(&self, _reason: Option<String>, _limit: usize) -> Pending<'_, Vec<RejectedRecord>> {
        // Rejected inputs are kept where they were refused, on the writer.
        Box::pin(async move { Ok(Vec::new()) })
    }

    fn checkpoint(&self) -> Pending<'_, CheckpointView> {
        let checkpoint = self.with(Replica::checkpoint);
        Box::pin(async move {
            match checkpoint {
                Ok(Some(view)) => Ok(view),
                Ok(None) => Err(ApiError::new(
                    404,
                    "no_checkpoint",
                    "no checkpoint of the sealed log has reached the object store yet",
                )),
                Err(error) => Err(ApiError::new(500, "store_unreadable", error.to_string())),
            }
        })
    }

    fn consistency(&self, _from: u64, _to: u64) -> Pending<'_, serde_json::Value> {
        Box::pin(async move { Err(writer_only("consistency proofs")) })
    }

    fn evidence_proofs(&self, _indexes: Vec<u64>) -> Pending<'_, EvidenceProofs> {
        Box::pin(async move { Err(writer_only("evidence bundles")) })
    }

    fn sign(&self, _payload_type: &'static str, _bytes: Vec<u8>) -> Pending<'_, Envelope> {
        Box::pin(async move { Err(writer_only("signatures")) })
    }
}
