//! Custos query: realm-scoped SQL and REST over everything the node has logged.
//!
//! ```text
//!  request (bearer token) ─▶ role + realms (+ X-Custos-Partition on a partition set)
//!        │
//!        ▼  one snapshot from each Source read (source.rs; on a node, the writer's
//!        │  sequencer; SQL over a partition set: every partition of the caller's realms):
//!        │  manifest + unsealed tail, agents, rejected
//!  DataFusion session per request (memory pool, timeout, row cap; DDL/DML/SET refused)
//!        │  tables = views over the log, each filtered on the caller's realms in its plan:
//!        │    events | findings | actions   ◀── Parquet segments ∪ tail (Arrow, in memory)
//!        │    agents | checkpoints | rejected ◀── built from already-scoped rows
//!        │  (several partitions: each table the union of theirs, with a `partition` column)
//!        ▼
//!  JSON | NDJSON | CSV | Arrow IPC | Parquet (Accept header) ─▶ access log (who, what, rows)
//! ```
//!
//! Nothing here writes to the store. Scope is enforced where the data enters the plan, not
//! by editing SQL text: the unfiltered log is never registered under any name.

pub mod access;
pub mod console;
mod decoding;
pub mod dictagg;
pub mod evidence;
pub mod http;
mod json;
mod morsels;
pub mod ocsf;
pub mod pool;
mod records;
pub mod shape;
pub mod source;
pub mod sql;
pub mod tables;
mod trunc;
pub mod worker;

pub use source::Source;
pub use sql::{Answer, Format, Limits};
pub use tables::{Scope, Sources};

/// A query that could not be answered: HTTP status, stable code, a sentence.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QueryError {
    #[serde(skip)]
    pub status: u16,
    pub error: &'static str,
    pub message: String,
}

impl QueryError {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "query_failed", message)
    }
}

/// Counts a query refused for want of a slot.
pub(crate) fn metrics_refused() {
    custos_http::metrics::QUERIES_REFUSED.inc();
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

impl std::error::Error for QueryError {}

impl From<datafusion::error::DataFusionError> for QueryError {
    fn from(error: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as E;
        let text = error.to_string();
        match error.find_root() {
            E::ResourcesExhausted(_) => QueryError::new(
                413,
                "query_memory",
                format!("the query needed more memory than its limit allows; add filters or aggregate sooner ({text})"),
            ),
            E::SQL(..) => QueryError::new(400, "bad_sql", text),
            E::Plan(message) if message.contains("not supported") => QueryError::new(
                403,
                "read_only",
                format!("only queries are allowed (no DDL, DML, COPY or SET): {message}"),
            ),
            E::Plan(_) | E::SchemaError(..) | E::NotImplemented(_) => QueryError::new(400, "bad_sql", text),
            _ => QueryError::new(500, "query_failed", text),
        }
    }
}

impl From<custos_http::ApiError> for QueryError {
    fn from(error: custos_http::ApiError) -> Self {
        QueryError::new(error.status, error.error, error.message)
    }
}
