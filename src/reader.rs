//! The query API's [`Source`](custos_query::Source) on a node that holds the log: the
//! writer's own reads, through its command queue. `custos-query` knows nothing of the
//! writer; this file is where the two meet.
//!
//! ```text
//!  custos_query routes ──▶ WriterSource ──▶ custos_ingest::Api ──▶ sequencer thread
//! ```

use std::path::Path;
use std::sync::Arc;

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
        routes(Arc::new(WriterSource(api)), tokens)
    }))
}
