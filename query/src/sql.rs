//! Read-only SQL with limits, and the answer formats.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt as _;

use crate::QueryError;
use crate::tables::{Scope, Sources, register};

/// What one query may use, and how many may run. Documented in `docs/query.md` (Limits).
#[derive(Clone, Debug)]
pub struct Limits {
    pub timeout: Duration,
    /// Bytes the query's operators may hold (sorts, joins, aggregates); a SQL query's
    /// process is stopped when it holds more than this plus
    /// [`crate::pool::PROCESS_OVERHEAD_BYTES`] in all.
    pub memory_bytes: usize,
    /// Rows an answer may have.
    pub max_rows: usize,
    /// Queries (SQL and REST reads) running at once on the node.
    pub concurrency: usize,
    /// ... of which one token may run.
    pub per_token: usize,
    /// Threads of the in-process query runtime (REST reads, evidence selection).
    pub threads: usize,
    /// What starts a SQL query process; without one, `POST /v1/sql` answers 503.
    pub worker: Option<crate::pool::WorkerProgram>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            memory_bytes: 512 * 1024 * 1024,
            max_rows: 100_000,
            concurrency: 4,
            per_token: 2,
            threads: 2,
            worker: None,
        }
    }
}

/// An answer: its schema and batches.
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
}

/// A session holding only the caller's tables (over one log, or several partitions'),
/// with a memory pool of its own.
pub async fn session(logs: &[Sources], scope: &Scope, limits: &Limits) -> Result<SessionContext, QueryError> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(2)
        .with_default_catalog_and_schema("custos", "public");
    // Whether filters are evaluated while decoding (late materialisation) is decided per
    // table and per filter (`tables::Decoding`), not here: the session-wide switch would
    // turn it on for every table and every filter.

    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(limits.memory_bytes)))
        .build_arc()?;
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rules(physical_rules());
    let ctx = SessionContext::new_with_state(state.build());
    ctx.register_udf(datafusion::logical_expr::ScalarUDF::from(
        crate::trunc::DateTruncUtc::new(),
    ));
    ctx.register_udf(datafusion::logical_expr::ScalarUDF::from(crate::json::JsonGet::new()));
    register(&ctx, logs, scope).await?;
    Ok(ctx)
}

/// DataFusion's physical optimiser rules with Custos's own:
///
/// - right before the first `FilterPushdown` pass (which moves the filters above each
///   scan into it), the split between filters evaluated while decoding and after it
///   ([`crate::decoding`]);
/// - at the end, grouping by dictionary keys ([`crate::dictagg`]) and scans cut into
///   row-group-sized ranges ([`crate::morsels`]).
fn physical_rules() -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let mut rules = PhysicalOptimizer::default().rules;
    let pushdown = rules.iter().position(|rule| rule.name() == FIRST_PUSHDOWN).unwrap_or(0);
    rules.insert(pushdown, Arc::new(crate::decoding::SplitScanFilters));
    rules.push(Arc::new(crate::dictagg::DictionaryGroupBy));
    rules.push(Arc::new(crate::morsels::SplitFileRanges));
    rules
}

/// The name of DataFusion's first filter pushdown pass (the later one is
/// `FilterPushdown(Post)`).
const FIRST_PUSHDOWN: &str = "FilterPushdown";

/// Plans and runs `sql` as the caller: statements that define, change or copy data,
/// and `SET`, are refused before planning finishes. `logs`: one log, or the partitions'
/// a query over a partition set reads.
pub async fn run(sql: &str, logs: &[Sources], scope: &Scope, limits: &Limits) -> Result<Answer, QueryError> {
    if sql.trim().is_empty() {
        return Err(QueryError::new(400, "bad_sql", "the query is empty"));
    }
    let ctx = session(logs, scope, limits).await?;
    let options = datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let work = async {
        let frame = ctx.sql_with_options(sql, options).await?;
        collect(frame, limits.max_rows).await
    };
    match tokio::time::timeout(limits.timeout, work).await {
        Ok(answer) => answer,
        Err(_) => Err(QueryError::new(
            408,
            "query_timeout",
            format!(
                "the query ran longer than the {} s limit; narrow the time range or add filters",
                limits.timeout.as_secs_f64()
            ),
        )),
    }
}

/// Streams a frame's batches, stopping with `row_cap` past `max_rows`. A panic inside
/// the engine (the `parquet` decoder panics on some damaged pages, and a segment can be
/// damaged on disk after the node started) ends this query with `query_failed`, not the
/// caller's connection.
pub async fn collect(frame: datafusion::dataframe::DataFrame, max_rows: usize) -> Result<Answer, QueryError> {
    use futures::FutureExt as _;
    std::panic::AssertUnwindSafe(collect_unguarded(frame, max_rows))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let message = custos_store::segment::panic_message(panic.as_ref());
            Err(QueryError::internal(format!(
                "the query engine failed while reading stored data ({message}); a damaged segment is one cause: run `custos verify`"
            )))
        })
}

async fn collect_unguarded(frame: datafusion::dataframe::DataFrame, max_rows: usize) -> Result<Answer, QueryError> {
    let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
    let mut stream = frame.execute_stream().await?;
    let mut batches = Vec::new();
    let mut rows = 0usize;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows();
        if rows > max_rows {
            return Err(QueryError::new(
                413,
                "row_cap",
                format!("the answer has more than {max_rows} rows; add a LIMIT or narrow the query"),
            ));
        }
        batches.push(batch);
    }
    Ok(Answer { schema, batches, rows })
}

/// Answer formats, chosen by the `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Ndjson,
    Csv,
    Arrow,
    Parquet,
}

impl Format {
    /// The first format `accept` names; JSON for `*/*`, an absent header or none known.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let Some(accept) = accept else { return Format::Json };
        for part in accept.split(',') {
            let media = part.split(';').next().unwrap_or_default().trim();
            match media {
                "application/json" => return Format::Json,
                "application/x-ndjson" | "application/ndjson" => return Format::Ndjson,
                "text/csv" => return Format::Csv,
                "application/vnd.apache.arrow.stream" => return Format::Arrow,
                "application/vnd.apache.parquet" | "application/parquet" => return Format::Parquet,
                _ => {}
            }
        }
        Format::Json
    }

    /// The format's short name (`json`, `ndjson`, `csv`, `arrow`, `parquet`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Ndjson => "ndjson",
            Format::Csv => "csv",
            Format::Arrow => "arrow",
            Format::Parquet => "parquet",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Format::Json,
            Format::Ndjson,
            Format::Csv,
            Format::Arrow,
            Format::Parquet,
        ]
        .into_iter()
        .find(|format| format.name() == name)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv",
            Format::Arrow => "application/vnd.apache.arrow.stream",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// `batch` rebuilt so that its buffers hold only the values its rows use.
///
/// Columns read from a segment (or built for the tail) share buffers with the rows the
/// realm filter removed: a dictionary keeps the values of its whole page (other realms,
/// their agents, their actions), and a string view keeps the data buffers of its whole
/// batch (other rows' targets and keys). Formats that ship buffers as they are (Arrow
/// IPC, and Parquet for dictionaries) would hand those bytes to the caller. Each column
/// is cast to a plain type (views and dictionaries resolved, recursively), which copies
/// the values its rows use and nothing else; dictionary columns are then encoded again,
/// with a dictionary of their own values.
fn compact_buffers(batch: &RecordBatch) -> Result<RecordBatch, QueryError> {
    use arrow::datatypes::DataType;
    fn plain(data_type: &DataType) -> DataType {
        match data_type {
            DataType::Utf8View => DataType::Utf8,
            DataType::BinaryView => DataType::Binary,
            DataType::Dictionary(_, values) => plain(values),
            DataType::List(field) => DataType::List(std::sync::Arc::new(
                field.as_ref().clone().with_data_type(plain(field.data_type())),
            )),
            DataType::LargeList(field) => DataType::LargeList(std::sync::Arc::new(
                field.as_ref().clone().with_data_type(plain(field.data_type())),
            )),
            DataType::FixedSizeList(field, size) => DataType::FixedSizeList(
                std::sync::Arc::new(field.as_ref().clone().with_data_type(plain(field.data_type()))),
                *size,
            ),
            DataType::Struct(fields) => DataType::Struct(
                fields
                    .iter()
                    .map(|field| field.as_ref().clone().with_data_type(plain(field.data_type())))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    let error = |error: arrow::error::ArrowError| QueryError::internal(format!("encoding the answer: {error}"));
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let flat = arrow::compute::cast(column, &plain(column.data_type())).map_err(error)?;
        let column = match column.data_type() {
            // A dictionary again (the documented answer type), of its own values only.
            DataType::Dictionary(..) => arrow::compute::cast(&flat, column.data_type()).map_err(error)?,
            _ => flat,
        };
        fields.push(field.as_ref().clone().with_data_type(column.data_type().clone()));
        columns.push(column);
    }
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        batch.schema().metadata().clone(),
    ));
    RecordBatch::try_new(schema, columns).map_err(error)
}

/// Encodes an answer. JSON is an array of objects (binary columns as hex).
pub fn encode(answer: &Answer, format: Format) -> Result<Vec<u8>, QueryError> {
    let error = |error: &dyn std::fmt::Display| QueryError::internal(format!("encoding the answer: {error}"));
    let compacted;
    let answer = if matches!(format, Format::Arrow | Format::Parquet) {
        let batches = answer
            .batches
            .iter()
            .map(compact_buffers)
            .collect::<Result<Vec<_>, _>>()?;
        let schema = match batches.first() {
            Some(batch) => batch.schema(),
            None => compact_buffers(&RecordBatch::new_empty(answer.schema.clone()))?.schema(),
        };
        compacted = Answer {
            schema,
            batches,
            rows: answer.rows,
        };
        &compacted
    } else {
        answer
    };
    let mut out = Vec::new();
    match format {
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(&mut out);
            for batch in &answer.batches {
                writer.write(batch).map_err(|e| error(&e))?;
            }
            writer.finish().map_err(|e| error(&e))?;
            drop(writer);
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        Format::Ndjson => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            for batch in &answer.batches {
                writer.write(batch).map_err(|e| error(&e))?;
            }
            writer.finish().map_err(|e| error(&e))?;
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            if answer.batches.is_empty() {
                writer
                    .write(&RecordBatch::new_empty(answer.schema.clone()))
                    .map_err(|e| error(&e))?;
            }
            for batch in &answer.batches {
                writer.write(batch).map_err(|e| error(&e))?;
            }
        }
        Format::Arrow => {
            let mut writer =
                arrow::ipc::writer::StreamWriter::try_new(&mut out, &answer.schema).map_err(|e| error(&e))?;
            for batch in &answer.batches {
                writer.write(batch).map_err(|e| error(&e))?;
            }
            writer.finish().map_err(|e| error(&e))?;
        }
        Format::Parquet => {
            let mut writer =
                parquet::arrow::ArrowWriter::try_new(&mut out, answer.schema.clone(), None).map_err(|e| error(&e))?;
            for batch in &answer.batches {
                writer.write(batch).map_err(|e| error(&e))?;
            }
            writer.close().map_err(|e| error(&e))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filter split must run before DataFusion's first pushdown pass, or that pass has
    /// already moved every filter into the scans (a renamed pass would silently undo the
    /// split: this fails instead).
    #[test]
    fn the_filter_split_runs_right_before_the_first_pushdown() {
        let names: Vec<String> = physical_rules().iter().map(|rule| rule.name().to_owned()).collect();
        let split = names.iter().position(|name| name == "split_scan_filters").unwrap();
        assert_eq!(
            names.get(split + 1).map(String::as_str),
            Some(FIRST_PUSHDOWN),
            "{names:?}"
        );
        assert!(names.iter().any(|name| name == "FilterPushdown(Post)"), "{names:?}");
        assert_eq!(names.len(), PhysicalOptimizer::default().rules.len() + 3);
    }

    /// A panic while the answer streams (as the Parquet decoder's on a damaged page)
    /// becomes this query's `query_failed`; the next query on the same engine still runs.
    #[tokio::test]
    async fn a_panic_in_the_engine_fails_the_query_not_the_caller() {
        use datafusion::arrow::datatypes::DataType;
        use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_udf(create_udf(
            "boom",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Volatile,
            Arc::new(|_: &[ColumnarValue]| -> datafusion::error::Result<ColumnarValue> {
                panic!("Num of bytes exceed MAX_VLQ_BYTE_LEN (10)")
            }),
        ));
        let frame = ctx.sql("SELECT boom(CAST(1 AS BIGINT)) AS x").await.unwrap();
        let Err(error) = collect(frame, 10).await else {
            panic!("a panicking query answered")
        };
        assert_eq!((error.status, error.error), (500, "query_failed"));
        assert!(error.message.contains("MAX_VLQ_BYTE_LEN"), "{error}");
        assert!(error.message.contains("custos verify"), "{error}");
        let frame = ctx.sql("SELECT 1 AS x").await.unwrap();
        assert_eq!(collect(frame, 10).await.unwrap().rows, 1);
    }
}
