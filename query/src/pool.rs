//! Where queries run: never on the runtime that serves ingest and health.
//!
//! ```text
//!  request ─▶ admit: a slot of `concurrency` overall and of `per_token` for the token,
//!                    else 429 too_many_queries (Retry-After)
//!     ├─ SQL ─▶ its own process (`custos query-worker`, niced), watched:
//!     │         RSS over the memory limit ─▶ killed, 413; past the timeout ─▶ killed, 408;
//!     │         a crash (stack overflow, abort) ends that process only
//!     └─ REST reads, evidence selection ─▶ the query runtime: its own threads (niced),
//!               timeout ─▶ the task is aborted, 408
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::QueryError;
use crate::sql::Limits;
use crate::worker::{Reply, Request};

/// The program and arguments that start a query process.
#[derive(Clone, Debug)]
pub struct WorkerProgram {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl WorkerProgram {
    /// This executable's `query-worker` subcommand (the `custos` binary).
    pub fn current() -> Option<Self> {
        Some(Self {
            program: std::env::current_exe().ok()?,
            args: vec!["query-worker".into()],
        })
    }
}

/// Memory a query process may use beyond the query's own limit: its program, threads and
/// runtime.
pub const PROCESS_OVERHEAD_BYTES: usize = 256 * 1024 * 1024;

/// Admission and execution of queries.
pub struct QueryPool {
    slots: Arc<Semaphore>,
    concurrency: usize,
    per_token: usize,
    running: Mutex<HashMap<String, usize>>,
    runtime: QueryRuntime,
}

/// A slot held while a query runs.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    token: String,
    pool: Arc<QueryPool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut running = self
            .pool
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = running.get_mut(&self.token) {
            *count -= 1;
            if *count == 0 {
                running.remove(&self.token);
            }
        }
    }
}

fn too_many(message: String) -> QueryError {
    crate::metrics_refused();
    QueryError::new(429, "too_many_queries", message)
}

impl QueryPool {
    pub fn new(limits: &Limits) -> Result<Arc<Self>, QueryError> {
        Ok(Arc::new(Self {
            slots: Arc::new(Semaphore::new(limits.concurrency.max(1))),
            concurrency: limits.concurrency.max(1),
            per_token: limits.per_token.max(1),
            running: Mutex::new(HashMap::new()),
            runtime: QueryRuntime::new(limits.threads.max(1))?,
        }))
    }

    /// A slot for one query by `token`, or 429.
    pub fn admit(self: &Arc<Self>, token: &str) -> Result<Slot, QueryError> {
        let mut running = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = running.get(token).copied().unwrap_or(0);
        if mine >= self.per_token {
            return Err(too_many(format!(
                "this token already has {mine} queries running, its limit; wait for one to finish"
            )));
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            return Err(too_many(format!(
                "the node is running its {} queries at once; retry shortly",
                self.concurrency
            )));
        };
        *running.entry(token.to_owned()).or_insert(0) += 1;
        Ok(Slot {
            _permit: permit,
            token: token.to_owned(),
            pool: self.clone(),
        })
    }

    /// Runs `work` on the query runtime, aborting it after `timeout`.
    pub async fn read<T: Send + 'static>(
        &self,
        timeout: Duration,
        work: impl std::future::Future<Output = Result<T, QueryError>> + Send + 'static,
    ) -> Result<T, QueryError> {
        let handle = self.runtime.spawn(work)?;
        let abort = handle.abort_handle();
        match tokio::time::timeout(timeout, handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) if error.is_panic() => Err(QueryError::internal(format!(
                "the query failed: {}",
                custos_store::segment::panic_message(error.into_panic().as_ref())
            ))),
            Ok(Err(error)) => Err(QueryError::internal(format!("the query task ended: {error}"))),
            Err(_) => {
                abort.abort();
                Err(timed_out(timeout))
            }
        }
    }

    /// Runs one SQL request in a query process; `tails`: each of its logs' unsealed
    /// tail, in the order of `request.logs`.
    pub(crate) async fn sql(
        &self,
        program: &WorkerProgram,
        request: &Request,
        tails: Vec<Vec<u8>>,
        limits: &Limits,
    ) -> Result<(Reply, Vec<u8>), QueryError> {
        let request = serde_json::to_vec(request).map_err(|error| QueryError::internal(error.to_string()))?;
        let mut child = tokio::process::Command::new(&program.program)
            .args(&program.args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                QueryError::new(
                    503,
                    "query_unavailable",
                    format!(
                        "could not start a query process (`{}`): {error}",
                        program.program.display()
                    ),
                )
            })?;
        let pid = child.id();
        let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(QueryError::internal("a query process without pipes"));
        };
        let cap = limits.memory_bytes.saturating_add(PROCESS_OVERHEAD_BYTES);
        let write = async move {
            let mut frames =
                Vec::with_capacity(8 * (1 + tails.len()) + request.len() + tails.iter().map(Vec::len).sum::<usize>());
            crate::worker::write_frame(&mut frames, &request)?;
            for tail in &tails {
                crate::worker::write_frame(&mut frames, tail)?;
            }
            stdin.write_all(&frames).await?;
            stdin.shutdown().await
        };
        let read = async move {
            let reply = read_frame(&mut stdout, 1 << 20).await?;
            let body = read_frame(&mut stdout, cap as u64).await?;
            Ok::<_, std::io::Error>((reply, body))
        };
        let diagnostics = async move {
            let mut kept = Vec::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut kept).await;
            kept
        };
        let exchange = async {
            let (written, read, diagnostics) = tokio::join!(write, read, diagnostics);
            (written, read, diagnostics)
        };
        let deadline = limits.timeout + Duration::from_secs(1);
        let outcome = tokio::select! {
            exchange = exchange => Ok(exchange),
            rss = watch_memory(pid, cap) => Err(QueryError::new(
                413,
                "query_memory",
                format!(
                    "the query needed more memory than its limit allows ({} MiB reached, the limit is {} MiB plus {} MiB for the query process); add filters, aggregate sooner, or select fewer or smaller values",
                    rss / (1024 * 1024),
                    limits.memory_bytes / (1024 * 1024),
                    PROCESS_OVERHEAD_BYTES / (1024 * 1024)
                ),
            )),
            () = tokio::time::sleep(deadline) => Err(timed_out(limits.timeout)),
        };
        let (written, read, diagnostics) = match outcome {
            Ok(exchange) => exchange,
            Err(error) => {
                let _ = child.kill().await;
                return Err(error);
            }
        };
        let status = child.wait().await.ok();
        match (read, written) {
            (Ok((reply, body)), _) => {
                let reply: Reply = serde_json::from_slice(&reply).map_err(|error| {
                    QueryError::internal(format!("an unreadable answer from the query process: {error}"))
                })?;
                Ok((reply, body))
            }
            (Err(_), _) => Err(crashed(status, &diagnostics)),
        }
    }
}

fn timed_out(limit: Duration) -> QueryError {
    QueryError::new(
        408,
        "query_timeout",
        format!(
            "the query ran longer than the {} s limit and was stopped; narrow the time range or add filters",
            limit.as_secs_f64()
        ),
    )
}

/// What a query process that ended without answering says about why.
fn crashed(status: Option<std::process::ExitStatus>, diagnostics: &[u8]) -> QueryError {
    let text = String::from_utf8_lossy(diagnostics);
    if text.contains("has overflowed its stack") {
        return QueryError::new(
            400,
            "bad_sql",
            "the query is nested too deeply to plan (its query process ran out of stack); simplify it",
        );
    }
    if text.contains("memory allocation of") {
        return QueryError::new(
            413,
            "query_memory",
            "the query asked for more memory than the machine can give; add filters or select smaller values",
        );
    }
    let how = status.map_or_else(|| "unknown".to_owned(), describe);
    let first = text
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no message");
    QueryError::internal(format!(
        "the query process ended without an answer ({how}): {first}; the node is unaffected"
    ))
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}

async fn read_frame(input: &mut (impl AsyncRead + Unpin), max: u64) -> std::io::Result<Vec<u8>> {
    let mut length = [0u8; 8];
    input.read_exact(&mut length).await?;
    let length = u64::from_le_bytes(length);
    if length > max {
        return Err(std::io::Error::other(format!(
            "an answer of {length} bytes, above the {max} allowed"
        )));
    }
    let mut bytes = vec![0u8; usize::try_from(length).map_err(std::io::Error::other)?];
    input.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// Resolves (with the resident size seen) once process `pid` holds more than `cap` bytes.
async fn watch_memory(pid: Option<u32>, cap: usize) -> usize {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    let page = page_size();
    let path = format!("/proc/{pid}/statm");
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let Ok(text) = tokio::fs::read_to_string(&path).await else {
            // Gone: the exchange ends on its own.
            return std::future::pending().await;
        };
        let resident = text
            .split_whitespace()
            .nth(1)
            .and_then(|pages| pages.parse::<usize>().ok())
            .unwrap_or(0)
            .saturating_mul(page);
        if resident > cap {
            return resident;
        }
    }
}

fn page_size() -> usize {
    #[cfg(target_os = "linux")]
    {
        rustix::param::page_size()
    }
    #[cfg(not(target_os = "linux"))]
    {
        4096
    }
}

/// A tokio runtime of its own for in-process reads (REST filters, OCSF, evidence
/// selection), on threads that give way to ingest.
pub(crate) struct QueryRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl QueryRuntime {
    fn new(threads: usize) -> Result<Self, QueryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("custos-query")
            .thread_stack_size(16 * 1024 * 1024)
            .on_thread_start(lower_thread_priority)
            .enable_all()
            .build()
            .map_err(|error| QueryError::internal(format!("starting the query runtime: {error}")))?;
        Ok(Self { runtime: Some(runtime) })
    }

    fn spawn<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<T>, QueryError> {
        self.runtime
            .as_ref()
            .map(|runtime| runtime.spawn(work))
            .ok_or_else(|| QueryError::new(503, "stopping", "the node is shutting down"))
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // Dropped from async code at shutdown: do not block on the query threads.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The calling thread gives way to the node's other threads (Linux: nice 10 for it).
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        let _ = rustix::process::setpriority_process(Some(thread), 10);
    }
}

#[cfg(test)]
mod tests {
    //! The supervision of query processes, against stand-ins that misbehave on purpose
    //! (a shell or Python process that crashes, grows or hangs: a real query cannot be
    //! made to do each of these on demand). The real query process is tested end to end
    //! in `tests/it/hardening.rs`.

    use super::*;

    fn request() -> Request {
        Request {
            sql: "SELECT 1".into(),
            role: custos_http::Role::Admin,
            realms: Vec::new(),
            format: "json".into(),
            timeout_ms: 1_000,
            memory_bytes: 16 << 20,
            max_rows: 10,
            logs: vec![crate::worker::LogRequest {
                partition: None,
                segment_dir: PathBuf::new(),
                segments: Vec::new(),
                size: 0,
                checkpoints_path: PathBuf::new(),
                agents: Vec::new(),
                rejected: Vec::new(),
                checkpoints: Vec::new(),
            }],
        }
    }

    fn stand_in(program: &str, script: &str) -> WorkerProgram {
        WorkerProgram {
            program: program.into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crashes_growth_and_hangs_end_the_process_not_the_node() {
        let limits = Limits {
            timeout: Duration::from_secs(2),
            memory_bytes: 16 << 20,
            ..Limits::default()
        };
        let pool = QueryPool::new(&limits).unwrap();
        let run = |program: WorkerProgram| {
            let (pool, limits) = (pool.clone(), limits.clone());
            async move { pool.sql(&program, &request(), Vec::new(), &limits).await }
        };

        let overflow = stand_in(
            "sh",
            "cat >/dev/null; echo \"thread 'custos-query' has overflowed its stack\" >&2; kill -ABRT $$",
        );
        let error = run(overflow).await.unwrap_err();
        assert_eq!((error.status, error.error), (400, "bad_sql"), "{error}");

        let error = run(stand_in("sh", "cat >/dev/null; kill -SEGV $$")).await.unwrap_err();
        assert_eq!((error.status, error.error), (500, "query_failed"), "{error}");
        assert!(error.message.contains("signal 11"), "{error}");

        let started = std::time::Instant::now();
        let error = run(stand_in(
            "python3",
            "import sys, time; sys.stdin.buffer.read(); grown = bytearray(600 * 1024 * 1024); time.sleep(30)",
        ))
        .await
        .unwrap_err();
        assert_eq!((error.status, error.error), (413, "query_memory"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(20));

        let started = std::time::Instant::now();
        let error = run(stand_in("sh", "cat >/dev/null; sleep 60")).await.unwrap_err();
        assert_eq!((error.status, error.error), (408, "query_timeout"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

        let missing = WorkerProgram {
            program: "/nonexistent/custos".into(),
            args: Vec::new(),
        };
        let error = run(missing).await.unwrap_err();
        assert_eq!((error.status, error.error), (503, "query_unavailable"), "{error}");
    }

    #[test]
    fn slots_are_counted_per_token_and_overall() {
        let limits = Limits {
            concurrency: 3,
            per_token: 2,
            ..Limits::default()
        };
        let pool = QueryPool::new(&limits).unwrap();
        let first = pool.admit("a").unwrap();
        let _second = pool.admit("a").unwrap();
        let error = pool.admit("a").err().unwrap();
        assert_eq!((error.status, error.error), (429, "too_many_queries"));
        let _third = pool.admit("b").unwrap();
        assert!(pool.admit("c").err().unwrap().message.contains("3 queries"));
        drop(first);
        let _again = pool.admit("c").unwrap();
    }
}
