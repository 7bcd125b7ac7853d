//! The query process: one per SQL query, so that no query can crash, freeze or exhaust
//! the node that serves ingest and health.
//!
//! ```text
//!  node (pool.rs)                                  `custos query-worker` (this file)
//!  ─ admit: overall and per-token slots, else 429
//!  ─ spawn, nice 19 ───── request (JSON) ────────▶ read request, tail (Arrow IPC)
//!                  ────── tail (Arrow IPC) ──────▶ shape bounds ─▶ plan ─▶ run ─▶ encode
//!  ─ watch: RSS above the limit ─▶ SIGKILL, 413     (64 MiB stacks, its own memory pool)
//!  ─ timeout ─▶ SIGKILL, 408      ◀── status (JSON) + answer bytes ──
//!  ─ crash (stack overflow, abort) ─▶ 400/500, the node untouched
//! ```
//!
//! Frames on both pipes are `u64le(length) ‖ bytes`. The request carries everything the
//! query may read, already scoped by the node: the caller's role and realms and, for each
//! log it reads (one, or several partitions' on a node over a partition set), the sealed
//! segments and (for the roles that see them) agents, checkpoints and rejected inputs.
//! Each log's unsealed tail follows as a frame of its own, in the same order. The process
//! reads the segment files itself and writes nothing.

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::QueryError;
use crate::sql::{Format, Limits};
use crate::tables::{Scope, Sources};

/// What the node sends a query process (then each log's tail, a frame each).
#[derive(Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) sql: String,
    pub(crate) role: custos_http::Role,
    pub(crate) realms: Vec<String>,
    pub(crate) format: String,
    pub(crate) timeout_ms: u64,
    pub(crate) memory_bytes: usize,
    pub(crate) max_rows: usize,
    pub(crate) logs: Vec<LogRequest>,
}

/// One log a query reads: all but its tail.
#[derive(Serialize, Deserialize)]
pub(crate) struct LogRequest {
    pub(crate) partition: Option<u32>,
    pub(crate) segment_dir: PathBuf,
    pub(crate) segments: Vec<custos_store::log::SegmentInfo>,
    pub(crate) size: u64,
    pub(crate) checkpoints_path: PathBuf,
    pub(crate) agents: Vec<custos_event::agent::AgentRecord>,
    pub(crate) rejected: Vec<custos_store::forensics::RejectedRecord>,
    pub(crate) checkpoints: Vec<custos_store::log::CheckpointLine>,
}

/// What a query process answers (then the encoded answer as a second frame).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    /// `ok`, or the error code.
    pub(crate) error: String,
    pub(crate) message: String,
    pub(crate) rows: usize,
    pub(crate) content_type: String,
}

/// Longest frame a reader accepts.
const MAX_FRAME: u64 = 8 << 30;

pub(crate) fn write_frame(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
    out.write_all(bytes)
}

pub(crate) fn read_frame(input: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut length = [0u8; 8];
    input.read_exact(&mut length)?;
    let length = u64::from_le_bytes(length);
    if length > MAX_FRAME {
        return Err(std::io::Error::other(format!("a frame of {length} bytes")));
    }
    let mut bytes = vec![0u8; usize::try_from(length).map_err(std::io::Error::other)?];
    input.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// The tail batch as an Arrow IPC stream (empty when there is no tail).
pub(crate) fn tail_ipc(batch: &arrow::array::RecordBatch) -> Result<Vec<u8>, QueryError> {
    if batch.num_rows() == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let error = |error: arrow::error::ArrowError| QueryError::internal(format!("encoding the tail: {error}"));
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).map_err(error)?;
    writer.write(batch).map_err(error)?;
    writer.finish().map_err(error)?;
    drop(writer);
    Ok(out)
}

fn tail_from_ipc(bytes: &[u8]) -> Result<Option<arrow::array::RecordBatch>, QueryError> {
    if bytes.is_empty() {
        return Ok(Some(arrow::array::RecordBatch::new_empty(
            custos_store::segment::schema(),
        )));
    }
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|error| QueryError::internal(format!("reading the tail: {error}")))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| QueryError::internal(format!("reading the tail: {error}")))?;
    let schema = batches
        .first()
        .map_or_else(custos_store::segment::schema, |batch| batch.schema());
    arrow::compute::concat_batches(&schema, &batches)
        .map(Some)
        .map_err(|error| QueryError::internal(format!("reading the tail: {error}")))
}

/// Stack of the query process's threads: generous, so that what the shape bounds let
/// through plans with room to spare (untouched stack pages cost no memory).
const STACK_BYTES: usize = 64 * 1024 * 1024;

/// `custos query-worker`: answers one query from stdin on stdout, then exits.
pub fn main() -> std::process::ExitCode {
    lower_priority();
    let mut input = std::io::stdin().lock();
    let (reply, body) = match read_request(&mut input) {
        Ok((request, tails)) => answer(request, &tails),
        Err(error) => failure(error),
    };
    let mut output = std::io::stdout().lock();
    let written = serde_json::to_vec(&reply)
        .map_err(std::io::Error::other)
        .and_then(|reply| write_frame(&mut output, &reply))
        .and_then(|()| write_frame(&mut output, &body))
        .and_then(|()| output.flush());
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

fn failure(error: QueryError) -> (Reply, Vec<u8>) {
    (
        Reply {
            status: error.status,
            error: error.error.to_owned(),
            message: error.message,
            rows: 0,
            content_type: String::new(),
        },
        Vec::new(),
    )
}

/// The request, then its logs' tails.
fn read_request(input: &mut impl Read) -> Result<(Request, Vec<Vec<u8>>), QueryError> {
    let reading = |error: std::io::Error| QueryError::internal(format!("reading the request: {error}"));
    let request: Request = serde_json::from_slice(&read_frame(input).map_err(reading)?)
        .map_err(|error| QueryError::internal(format!("an unreadable request: {error}")))?;
    let tails = (0..request.logs.len())
        .map(|_| read_frame(input))
        .collect::<Result<Vec<_>, _>>()
        .map_err(reading)?;
    Ok((request, tails))
}

fn answer(request: Request, tails: &[Vec<u8>]) -> (Reply, Vec<u8>) {
    let tails = match tails
        .iter()
        .map(|tail| tail_from_ipc(tail))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(tails) => tails,
        Err(error) => return failure(error),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("custos-query")
        .thread_stack_size(STACK_BYTES)
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => return failure(QueryError::internal(format!("starting the query runtime: {error}"))),
    };
    // Spawned, so planning runs on a worker thread with the large stack.
    let work = runtime.spawn(async move { run(request, tails).await });
    let outcome = runtime
        .block_on(work)
        .unwrap_or_else(|error| Err(QueryError::internal(format!("the query task failed: {error}"))));
    runtime.shutdown_background();
    match outcome {
        Ok((rows, content_type, body)) => (
            Reply {
                status: 200,
                error: "ok".into(),
                message: String::new(),
                rows,
                content_type: content_type.into(),
            },
            body,
        ),
        Err(error) => failure(error),
    }
}

async fn run(
    request: Request,
    tails: Vec<Option<arrow::array::RecordBatch>>,
) -> Result<(usize, &'static str, Vec<u8>), QueryError> {
    crate::shape::check(&request.sql)?;
    let format = Format::from_name(&request.format)
        .ok_or_else(|| QueryError::internal(format!("an unknown format `{}`", request.format)))?;
    let logs: Vec<Sources> = request
        .logs
        .into_iter()
        .zip(tails)
        .map(|(log, tail)| Sources {
            partition: log.partition,
            view: custos_store::StoreView {
                segment_dir: log.segment_dir,
                segments: log.segments,
                tail: Vec::new(),
                size: log.size,
                checkpoints: log.checkpoints_path,
            },
            agents: log.agents,
            rejected: log.rejected,
            checkpoints: log.checkpoints,
            tail_batch: tail,
        })
        .collect();
    let scope = Scope {
        role: request.role,
        realms: request.realms,
    };
    let limits = Limits {
        timeout: std::time::Duration::from_millis(request.timeout_ms),
        memory_bytes: request.memory_bytes,
        max_rows: request.max_rows,
        ..Limits::default()
    };
    let answer = crate::sql::run(&request.sql, &logs, &scope, &limits).await?;
    let body = crate::sql::encode(&answer, format)?;
    Ok((answer.rows, format.content_type(), body))
}

/// A query process gives way to the node: ingest and health checks come first.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let _ = rustix::process::setpriority_process(None, 19);
    }
}
