//! The tables a caller may query, built per request and scoped to the caller's realms.
//!
//! Scope is part of each table's plan: `events`, `findings` and `actions` are views whose
//! logical plan filters the raw log on `realm` before anything the caller writes, and the
//! raw log itself is never registered, so no SQL (joins, subqueries, CTEs,
//! `information_schema`) can reach an unfiltered row. `agents` and `rejected` are built
//! from already-filtered rows.
//!
//! On a node over a partition set, one query may read several partitions' logs
//! ([`Sources`] per partition): each table is then the union of theirs, and every table
//! has a `partition` column saying whose log a row came from (a log index names an entry
//! only within its partition's log).

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use custos_event::{ACTION_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE, FINDING_PAYLOAD_TYPE};
use custos_http::Role;
use datafusion::catalog::MemTable;
use datafusion::catalog::view::ViewTable;
use datafusion::config::TableParquetOptions;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::datasource::provider_as_source;
use datafusion::functions::core::expr_fn::get_field;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, ScalarUDF, cast, col, lit};
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::QueryError;
use crate::records::RecordColumns;

/// Who is asking: the role decides which tables exist, the realms which rows.
#[derive(Clone, Debug)]
pub struct Scope {
    pub role: Role,
    /// Empty means every realm.
    pub realms: Vec<String>,
}

impl Scope {
    pub fn sees(&self, realm: &str) -> bool {
        self.realms.is_empty() || self.realms.iter().any(|allowed| allowed == realm)
    }

    /// The tables this role may query.
    pub fn tables(&self) -> &'static [&'static str] {
        match self.role {
            Role::Admin => &["events", "findings", "actions", "agents", "checkpoints", "rejected"],
            Role::Analyst | Role::Responder | Role::Compliance => {
                &["events", "findings", "actions", "agents", "checkpoints"]
            }
            Role::Auditor => &["checkpoints"],
            Role::Collector => &[],
        }
    }
}

/// Everything a query can read of one log, taken from the node at one instant.
pub struct Sources {
    /// On a node over a partition set: the partition whose log this is. Its rows then
    /// carry it in a `partition` column.
    pub partition: Option<u32>,
    pub view: custos_store::StoreView,
    pub agents: Vec<custos_event::agent::AgentRecord>,
    pub rejected: Vec<custos_store::forensics::RejectedRecord>,
    pub checkpoints: Vec<custos_store::log::CheckpointLine>,
    /// The unsealed tail already as rows of the segment schema (a query process gets it
    /// so); when absent, built from `view.tail`.
    pub tail_batch: Option<RecordBatch>,
}

impl Sources {
    /// The unsealed tail as one batch of the segment schema.
    pub fn tail_batch(&self) -> Result<RecordBatch, QueryError> {
        if let Some(batch) = &self.tail_batch {
            return Ok(batch.clone());
        }
        let batches = self
            .view
            .tail
            .iter()
            .filter(|chunk| !chunk.is_empty())
            .map(chunk_rows)
            .collect::<Result<Vec<_>, _>>()?;
        match batches.as_slice() {
            [] => custos_store::segment::batch(std::iter::empty())
                .map_err(|error| QueryError::internal(error.to_string())),
            [one] => Ok(one.clone()),
            [first, ..] => arrow::compute::concat_batches(&first.schema(), &batches)
                .map_err(|error| QueryError::internal(format!("joining the tail's chunks: {error}"))),
        }
    }
}

/// The rows of the unsealed tail's chunks, each made once. A chunk is immutable and
/// shared (`Arc<[LogEntry]>`), and making its rows decodes every payload: done for the
/// whole tail (up to two segments' worth of entries) on every query, it made each read
/// cost in proportion to the tail, and held back query-node freshness on a long log.
/// An entry lives while its chunk does: the `Weak` both keeps the chunk's address from
/// being reused and tells when the chunk is gone (its rows are then dropped).
type ChunkRows = std::collections::HashMap<usize, (std::sync::Weak<[custos_store::LogEntry]>, RecordBatch)>;

static CHUNK_ROWS: std::sync::LazyLock<std::sync::Mutex<ChunkRows>> = std::sync::LazyLock::new(Default::default);

fn chunk_rows(chunk: &Arc<[custos_store::LogEntry]>) -> Result<RecordBatch, QueryError> {
    let key = Arc::as_ptr(chunk).cast::<custos_store::LogEntry>() as usize;
    let lock = || CHUNK_ROWS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((kept, rows)) = lock().get(&key)
        && kept.upgrade().is_some_and(|alive| Arc::ptr_eq(&alive, chunk))
    {
        return Ok(rows.clone());
    }
    let rows = custos_store::segment::batch(chunk.iter()).map_err(|error| QueryError::internal(error.to_string()))?;
    let mut cache = lock();
    cache.retain(|_, (kept, _)| kept.strong_count() > 0);
    cache.insert(key, (Arc::downgrade(chunk), rows.clone()));
    Ok(rows)
}

/// Registers the caller's tables in `ctx`, over one log or the union of several
/// partitions' (`logs` in partition order).
pub async fn register(ctx: &SessionContext, logs: &[Sources], scope: &Scope) -> Result<(), QueryError> {
    let tables = scope.tables();
    // A partition column on every table as soon as one log is a partition's, so that a
    // set's tables have the same columns whichever partitions a query reads.
    let set = logs.iter().any(|log| log.partition.is_some());
    let columns = |mut columns: Vec<Expr>| {
        if set {
            columns.push(col(PARTITION));
        }
        columns
    };
    if tables.contains(&"events") {
        let log = union_plan(logs).await?;
        let realm = realm_filter(scope);
        let events = view(&log, EVENT_PAYLOAD_TYPE, realm.clone(), columns(event_columns()))?;
        ctx.register_table("events", Arc::new(ViewTable::new(events, None)))?;
        let findings = view(&log, FINDING_PAYLOAD_TYPE, realm.clone(), columns(finding_columns()))?;
        ctx.register_table("findings", Arc::new(ViewTable::new(findings, None)))?;
        let actions = view(&log, ACTION_PAYLOAD_TYPE, realm, columns(action_columns()))?;
        ctx.register_table("actions", Arc::new(ViewTable::new(actions, None)))?;
    }
    if tables.contains(&"agents") {
        let table = memory_table(agent_schema(), logs, set, |log| {
            log.agents
                .iter()
                .filter(|agent| scope.sees(&agent.realm))
                .map(AgentRow::from)
                .collect::<Vec<_>>()
        })?;
        ctx.register_table("agents", table)?;
    }
    if tables.contains(&"checkpoints") {
        let table = memory_table(checkpoint_schema(), logs, set, |log| {
            log.checkpoints.iter().map(CheckpointRow::from).collect::<Vec<_>>()
        })?;
        ctx.register_table("checkpoints", table)?;
    }
    if tables.contains(&"rejected") {
        // Rejected inputs are not verified, so their realm is unknown: only an unscoped
        // admin sees them.
        let table = memory_table(rejected_schema(), logs, set, |log| {
            if scope.realms.is_empty() {
                log.rejected.iter().map(RejectedRow::from).collect::<Vec<_>>()
            } else {
                Vec::new()
            }
        })?;
        ctx.register_table("rejected", table)?;
    }
    Ok(())
}

/// The column naming a row's partition, on a node over a partition set.
pub const PARTITION: &str = "partition";

/// Every log of `logs`, one after the other; each partition's rows with their
/// `partition` column.
async fn union_plan(logs: &[Sources]) -> Result<LogicalPlan, QueryError> {
    let mut builder: Option<LogicalPlanBuilder> = None;
    for log in logs {
        let mut plan = log_plan(log, true).await?;
        if let Some(partition) = log.partition {
            let mut columns: Vec<Expr> = plan.schema().columns().into_iter().map(Expr::Column).collect();
            columns.push(lit(partition).alias(PARTITION));
            plan = LogicalPlanBuilder::from(plan).project(columns)?.build()?;
        }
        builder = Some(match builder {
            None => LogicalPlanBuilder::from(plan),
            Some(builder) => builder.union(plan)?,
        });
    }
    Ok(builder.ok_or_else(|| QueryError::internal("no log to read"))?.build()?)
}

/// The whole log: sealed Parquet segments, then the unsealed tail from memory.
///
/// With `late`, the segment scans may evaluate filters while decoding (late
/// materialisation: only rows that pass have their other columns decoded); which filters
/// they take is decided in the SQL session's plan ([`crate::decoding`]). Without it,
/// filters prune row groups and pages by their statistics, then run on decoded batches.
pub(crate) async fn log_plan(sources: &Sources, late: bool) -> Result<LogicalPlan, QueryError> {
    let view = &sources.view;
    let schema = scan_schema();
    let mut plans = Vec::new();
    if !view.segments.is_empty() {
        let urls = view
            .segments
            .iter()
            .map(|segment| {
                let path = view.segment_dir.join(&segment.file);
                ListingTableUrl::parse(path.to_string_lossy().as_ref())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut parquet = TableParquetOptions::default();
        parquet.global.pushdown_filters = late;
        parquet.global.reorder_filters = late;
        let format = ParquetFormat::default().with_options(parquet);
        let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
        let config = ListingTableConfig::new_with_multi_paths(urls)
            .with_listing_options(options)
            .with_schema(schema.clone());
        let table = ListingTable::try_new(config)?;
        plans.push(LogicalPlanBuilder::scan("segments", provider_as_source(Arc::new(table)), None)?.build()?);
    }
    let batch = sources.tail_batch()?;
    if batch.num_rows() > 0 || plans.is_empty() {
        let batch = cast_to(&batch, &schema)?;
        let table = MemTable::try_new(schema, vec![vec![batch]])?;
        plans.push(LogicalPlanBuilder::scan("tail", provider_as_source(Arc::new(table)), None)?.build()?);
    }
    let mut plans = plans.into_iter();
    let first = plans.next().ok_or_else(|| QueryError::internal("no log plan"))?;
    let mut builder = LogicalPlanBuilder::from(first);
    for plan in plans {
        builder = builder.union(plan)?;
    }
    Ok(builder.build()?)
}

/// The segment schema as scanned: the file schema, with the text columns that are not
/// dictionaries as string views (Parquet dictionary pages then decode without copying
/// each row's string).
///
/// Text columns with far fewer distinct values than rows in a segment
/// ([`custos_store::segment::DICTIONARY_FIELDS`]) are read as Arrow dictionaries: the
/// segment files declare them so, so their dictionary pages are read as they are, keys
/// only. The views hand them on as dictionaries too (no cast in their projections): a
/// caller's `kind = 'tool_call'` then compares the few dictionary values once per batch
/// (the optimiser unwraps the comparison's cast onto the dictionary), filtering keeps
/// keys only, and grouping numbers groups by key ([`crate::dictagg`]). Answers carry them as
/// `Dictionary(Int32, Utf8)`: JSON, NDJSON and CSV show plain text, Arrow IPC and Parquet
/// keep the dictionary type.
fn scan_schema() -> SchemaRef {
    let segment = custos_store::segment::file_schema();
    let fields: Vec<Field> = segment
        .fields()
        .iter()
        .map(|field| match field.data_type() {
            DataType::Utf8 => field.as_ref().clone().with_data_type(DataType::Utf8View),
            _ => field.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, segment.metadata().clone()))
}

/// `batch` with each of `schema`'s columns, taken by name and cast to its type: between
/// the segment schema and the scan schema, either way.
pub(crate) fn cast_to(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, QueryError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| {
            let column = batch
                .column_by_name(field.name())
                .ok_or_else(|| QueryError::internal(format!("column {} missing", field.name())))?;
            arrow::compute::cast(column, field.data_type()).map_err(|error| QueryError::internal(error.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|error| QueryError::internal(error.to_string()))
}

fn realm_filter(scope: &Scope) -> Option<Expr> {
    if scope.realms.is_empty() {
        return None;
    }
    Some(col("realm").in_list(scope.realms.iter().map(|realm| lit(realm.clone())).collect(), false))
}

fn view(
    log: &LogicalPlan,
    payload_type: &str,
    realm: Option<Expr>,
    columns: Vec<Expr>,
) -> Result<LogicalPlan, QueryError> {
    let mut predicate = col("payload_type").eq(lit(payload_type));
    if let Some(realm) = realm {
        predicate = predicate.and(realm);
    }
    Ok(LogicalPlanBuilder::from(log.clone())
        .filter(predicate)?
        .project(columns)?
        .build()?)
}

fn event_columns() -> Vec<Expr> {
    [
        "log_index",
        "ingest_ts",
        "ts",
        "agent",
        "realm",
        "kind",
        "action",
        "target",
        "outcome",
        "session",
        "trace_id",
        "span_id",
        "parent",
        "memory_id",
        "attrs",
        "seq",
        "prev",
        "bytes_in",
        "bytes_out",
        "tokens_in",
        "tokens_out",
        "gap_from",
        "gap_to",
        "keyid",
        "payload",
        "sig",
        "payload_blake3",
    ]
    .into_iter()
    .map(col)
    .collect()
}

/// A view's record struct: one decode of `payload` per row through the record's type
/// (the planner computes the repeated expression once).
fn record(columns: RecordColumns) -> Expr {
    ScalarUDF::from(columns).call(vec![col("payload")])
}

/// One text field of a record struct, as a column of that name.
fn field(record: &Expr, name: &str) -> Expr {
    get_field(record.clone(), name).alias(name)
}

fn finding_columns() -> Vec<Expr> {
    let finding = record(RecordColumns::finding());
    let field = |name| field(&finding, name);
    vec![
        col("log_index"),
        col("ts"),
        field("id"),
        col("agent"),
        col("realm"),
        col("action").alias("type"),
        cast(get_field(finding.clone(), "score"), DataType::Int32).alias("score"),
        field("severity"),
        cast(get_field(finding.clone(), "confidence"), DataType::Float64).alias("confidence"),
        field("learning"),
        field("title"),
        field("rule_id"),
        field("tags"),
        field("evidence"),
        field("explanation"),
        field("window"),
        col("keyid"),
        col("payload"),
    ]
}

fn action_columns() -> Vec<Expr> {
    let action = record(RecordColumns::action());
    let field = |name| field(&action, name);
    vec![
        col("log_index"),
        col("ts"),
        field("id"),
        field("playbook"),
        field("finding_id"),
        col("agent"),
        col("realm"),
        col("action"),
        col("target"),
        field("status"),
        field("reason"),
        field("by"),
        field("approval_id"),
        field("undoes"),
        col("keyid"),
        col("payload"),
    ]
}

/// A table of `rows` from each log; with `set`, each log's rows carry its partition.
fn memory_table<T: Serialize>(
    schema: SchemaRef,
    logs: &[Sources],
    set: bool,
    rows: impl Fn(&Sources) -> Vec<T>,
) -> Result<Arc<MemTable>, QueryError> {
    let error = |error: arrow::error::ArrowError| QueryError::internal(error.to_string());
    let table_schema = if set {
        let mut fields: Vec<Field> = schema.fields().iter().map(|field| field.as_ref().clone()).collect();
        fields.push(Field::new(PARTITION, DataType::UInt32, false));
        Arc::new(Schema::new(fields))
    } else {
        schema.clone()
    };
    let mut batches = Vec::with_capacity(logs.len());
    for log in logs {
        let mut decoder = arrow::json::ReaderBuilder::new(schema.clone())
            .build_decoder()
            .map_err(error)?;
        decoder.serialize(&rows(log)).map_err(error)?;
        let batch = decoder
            .flush()
            .map_err(error)?
            .unwrap_or_else(|| RecordBatch::new_empty(schema.clone()));
        let batch = if set {
            let partition = arrow::array::UInt32Array::from(vec![log.partition.unwrap_or_default(); batch.num_rows()]);
            let mut columns = batch.columns().to_vec();
            columns.push(Arc::new(partition));
            RecordBatch::try_new(table_schema.clone(), columns).map_err(error)?
        } else {
            batch
        };
        batches.push(batch);
    }
    Ok(Arc::new(MemTable::try_new(table_schema, vec![batches])?))
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn agent_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("did", DataType::Utf8, false),
        Field::new("realm", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("parent", DataType::Utf8, true),
        Field::new("children", DataType::UInt64, false),
        Field::new("labels", DataType::Utf8, false),
        Field::new("enrolled_at", timestamp(), false),
        Field::new("enrolled_by", DataType::Utf8, false),
        Field::new("enroll_log_index", DataType::UInt64, false),
        Field::new("revoked_at", timestamp(), true),
        Field::new("revoke_reason", DataType::Utf8, true),
        Field::new("events", DataType::UInt64, false),
        Field::new("last_seq", DataType::UInt64, true),
        Field::new("last_log_index", DataType::UInt64, true),
        Field::new("last_ts", timestamp(), true),
    ]))
}

#[derive(Serialize)]
struct AgentRow {
    did: String,
    realm: String,
    status: String,
    parent: Option<String>,
    children: u64,
    labels: String,
    enrolled_at: String,
    enrolled_by: String,
    enroll_log_index: u64,
    revoked_at: Option<String>,
    revoke_reason: Option<String>,
    events: u64,
    last_seq: Option<u64>,
    last_log_index: Option<u64>,
    last_ts: Option<String>,
}

fn rfc3339(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl From<&custos_event::agent::AgentRecord> for AgentRow {
    fn from(agent: &custos_event::agent::AgentRecord) -> Self {
        Self {
            did: agent.did.clone(),
            realm: agent.realm.clone(),
            status: serde_json::to_value(agent.status)
                .ok()
                .and_then(|value| value.as_str().map(str::to_owned))
                .unwrap_or_default(),
            parent: agent.parent.clone(),
            children: agent.children.len() as u64,
            labels: serde_json::to_string(&agent.labels).unwrap_or_default(),
            enrolled_at: rfc3339(&agent.enrolled_at),
            enrolled_by: agent.enrolled_by.clone(),
            enroll_log_index: agent.enroll_log_index,
            revoked_at: agent.revoked_at.as_ref().map(rfc3339),
            revoke_reason: agent.revoke_reason.clone(),
            events: agent.events,
            last_seq: agent.last_seq,
            last_log_index: agent.last_log_index,
            last_ts: agent.last_ts.as_ref().map(rfc3339),
        }
    }
}

fn checkpoint_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("size", DataType::UInt64, false),
        Field::new("note", DataType::Utf8, false),
    ]))
}

#[derive(Serialize)]
struct CheckpointRow {
    size: u64,
    note: String,
}

impl From<&custos_store::log::CheckpointLine> for CheckpointRow {
    fn from(line: &custos_store::log::CheckpointLine) -> Self {
        Self {
            size: line.size,
            note: line.note.clone(),
        }
    }
}

fn rejected_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::UInt64, false),
        Field::new("received_at", timestamp(), false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new("remote", DataType::Utf8, false),
        Field::new("keyid", DataType::Utf8, true),
        Field::new("size", DataType::UInt64, false),
        Field::new("blake3", DataType::Utf8, false),
        Field::new("input", DataType::Utf8, false),
        Field::new("input_encoding", DataType::Utf8, false),
        Field::new("truncated", DataType::Boolean, false),
        Field::new("evidence", DataType::Utf8, true),
    ]))
}

#[derive(Serialize)]
struct RejectedRow {
    id: u64,
    received_at: String,
    reason: String,
    message: String,
    remote: String,
    keyid: Option<String>,
    size: u64,
    blake3: String,
    input: String,
    input_encoding: String,
    truncated: bool,
    evidence: Option<String>,
}

impl From<&custos_store::forensics::RejectedRecord> for RejectedRow {
    fn from(record: &custos_store::forensics::RejectedRecord) -> Self {
        Self {
            id: record.id,
            received_at: record.received_at.clone(),
            reason: record.reason.clone(),
            message: record.message.clone(),
            remote: record.remote.clone(),
            keyid: record.keyid.clone(),
            size: record.size as u64,
            blake3: record.blake3.clone(),
            input: record.input.clone(),
            input_encoding: record.input_encoding.clone(),
            truncated: record.truncated,
            evidence: record.evidence.as_ref().map(|value| value.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Tables over several partitions' logs: the union, the `partition` column, and realm
    //! scope across it. Real signed entries in each log's tail.

    use super::*;
    use crate::sql::{Limits, run};

    /// A log of `events` events by one agent of `realm`, as partition `partition`'s.
    fn log(partition: Option<u32>, realm: &str, seed: u8, events: u64) -> Sources {
        let key = custos_event::AgentKey::from_seed(&[seed; 32]);
        let did = key.did().to_owned();
        let mut signer = custos_event::Signer::new(key, realm);
        let entries: Vec<custos_store::LogEntry> = (0..events)
            .map(|index| {
                let payload = custos_event::Payload::new(
                    custos_event::Kind::ALL[0],
                    chrono::DateTime::from_timestamp(1_800_000_000 + index as i64, 0).unwrap(),
                );
                // Each log numbers its own entries from 0.
                custos_store::LogEntry::from_envelope(signer.sign(payload), index, 1_800_000_000_000_000, None)
            })
            .collect();
        let at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        Sources {
            partition,
            view: custos_store::StoreView {
                segment_dir: std::env::temp_dir(),
                segments: Vec::new(),
                tail: vec![Arc::from(entries)],
                size: events,
                checkpoints: std::env::temp_dir().join("no-checkpoints"),
            },
            agents: vec![custos_event::agent::AgentRecord {
                did,
                realm: realm.to_owned(),
                labels: Default::default(),
                parent: None,
                children: Vec::new(),
                status: custos_event::agent::AgentStatus::Active,
                enrolled_at: at,
                enrolled_by: "test".into(),
                enroll_log_index: 0,
                revoked_at: None,
                revoke_log_index: None,
                revoke_reason: None,
                status_log_index: None,
                events,
                last_seq: None,
                last_log_index: None,
                last_ts: None,
            }],
            rejected: Vec::new(),
            checkpoints: Vec::new(),
            tail_batch: None,
        }
    }

    async fn rows(sql: &str, logs: &[Sources], realms: &[&str]) -> Result<Vec<serde_json::Value>, String> {
        let scope = Scope {
            role: Role::Analyst,
            realms: realms.iter().map(|realm| (*realm).to_owned()).collect(),
        };
        let answer = run(sql, logs, &scope, &Limits::default())
            .await
            .map_err(|error| error.message)?;
        let json = crate::sql::encode(&answer, crate::sql::Format::Json).map_err(|error| error.message)?;
        Ok(serde_json::from_slice(&json).unwrap())
    }

    #[tokio::test]
    async fn a_set_reads_as_one_table_with_each_rows_partition() {
        let logs = [log(Some(0), "eng", 1, 3), log(Some(2), "ops", 2, 5)];
        let by_partition = "SELECT partition, realm, count(*) AS n, min(log_index) AS first FROM events \
                            GROUP BY partition, realm ORDER BY partition";
        assert_eq!(
            rows(by_partition, &logs, &[]).await.unwrap(),
            vec![
                serde_json::json!({"partition": 0, "realm": "eng", "n": 3, "first": 0}),
                serde_json::json!({"partition": 2, "realm": "ops", "n": 5, "first": 0}),
            ]
        );
        // Agents carry their partition too, so a join can name an entry by both.
        let joined = "SELECT a.partition, count(*) AS n FROM events e JOIN agents a \
                      ON e.agent = a.did AND e.partition = a.partition GROUP BY a.partition ORDER BY a.partition";
        assert_eq!(
            rows(joined, &logs, &[]).await.unwrap(),
            vec![
                serde_json::json!({"partition": 0, "n": 3}),
                serde_json::json!({"partition": 2, "n": 5}),
            ]
        );
        assert_eq!(
            rows("SELECT count(*) AS n FROM events WHERE partition = 2", &logs, &[])
                .await
                .unwrap(),
            vec![serde_json::json!({"n": 5})]
        );
        // The checkpoints table has the column even with no rows.
        assert_eq!(
            rows("SELECT count(partition) AS n FROM checkpoints", &logs, &[])
                .await
                .unwrap(),
            vec![serde_json::json!({"n": 0})]
        );
    }

    #[tokio::test]
    async fn realm_scope_holds_across_the_partitions_read() {
        let logs = [log(Some(0), "eng", 1, 3), log(Some(1), "ops", 2, 5)];
        for sql in [
            "SELECT realm, partition FROM events",
            "SELECT realm, partition FROM agents",
            "SELECT realm, partition FROM events UNION ALL SELECT realm, partition FROM agents",
        ] {
            let seen = rows(sql, &logs, &["eng"]).await.unwrap();
            assert!(!seen.is_empty(), "{sql}");
            assert!(
                seen.iter().all(|row| row["realm"] == "eng" && row["partition"] == 0),
                "{sql}: {seen:?}"
            );
        }
    }

    #[test]
    fn the_tails_rows_are_made_once_per_chunk_and_dropped_with_it() {
        let whole = log(None, "eng", 7, 6);
        let entries: Vec<custos_store::LogEntry> = whole.view.tail[0].to_vec();
        let first: Arc<[custos_store::LogEntry]> = Arc::from(&entries[..2]);
        let second: Arc<[custos_store::LogEntry]> = Arc::from(&entries[2..]);
        let key = |chunk: &Arc<[custos_store::LogEntry]>| Arc::as_ptr(chunk).cast::<custos_store::LogEntry>() as usize;
        let cached = |chunk: &Arc<[custos_store::LogEntry]>| CHUNK_ROWS.lock().unwrap().contains_key(&key(chunk));
        let split = Sources {
            view: custos_store::StoreView {
                tail: vec![first.clone(), Arc::from(Vec::new()), second.clone()],
                ..whole.view.clone()
            },
            ..log(None, "eng", 7, 0)
        };
        let expected = custos_store::segment::batch(entries.iter()).unwrap();
        assert_eq!(split.tail_batch().unwrap(), expected, "chunk by chunk, the same rows");
        assert!(cached(&first) && cached(&second));
        assert_eq!(split.tail_batch().unwrap(), expected, "and again, from the kept rows");
        let gone = key(&first);
        drop((split, first));
        let third: Arc<[custos_store::LogEntry]> = Arc::from(&entries[..1]);
        chunk_rows(&third).unwrap();
        assert!(
            !CHUNK_ROWS.lock().unwrap().contains_key(&gone),
            "a dropped chunk's rows are dropped"
        );
        assert!(cached(&second) && cached(&third));
    }

    #[tokio::test]
    async fn one_log_has_no_partition_column() {
        let logs = [log(None, "eng", 1, 3)];
        assert_eq!(
            rows("SELECT count(*) AS n FROM events", &logs, &[]).await.unwrap(),
            vec![serde_json::json!({"n": 3})]
        );
        for table in ["events", "agents", "checkpoints"] {
            let refused = rows(&format!("SELECT partition FROM {table}"), &logs, &[])
                .await
                .unwrap_err();
            assert!(refused.contains("partition"), "{table}: {refused}");
        }
    }
}
