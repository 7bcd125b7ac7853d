//! Serving HTTP with limits, so that no socket or body can freeze a node or take the
//! descriptors and memory the store needs.
//!
//! ```text
//!  accept ─▶ connection slot? ──no──▶ 503 + Retry-After, closed at once
//!              │ yes (at most `max_connections`, below the descriptor limit minus a
//!              ▼        reserve kept for the store)
//!  hyper HTTP/1: the whole request head within `header_timeout`, measured from the
//!              │ connection's start and again from each idle moment between requests
//!              │ (slowloris and idle keep-alive sockets are closed)
//!              ▼
//!  a connection that moves no byte either way for `idle_timeout` is closed (a client
//!              │ that never reads its answer, a stalled upload)
//!              ▼
//!  body budget: every request body is read here, within `body_timeout`, against one
//!              │ budget of bytes shared by all requests in flight; beyond it: 503 +
//!              ▼ Retry-After
//!  the router (routes with roles authenticate first)
//! ```
//!
//! On shutdown the listener closes, open connections finish their request and close,
//! and after `shutdown_grace` whatever is left is dropped, so SIGTERM always completes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ApiError;

/// The limits of the HTTP front door. Documented in `docs/api.md` (Limits).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Open connections at most; `0` takes the descriptor limit minus
    /// `reserved_descriptors`. A larger value is lowered to that too.
    pub max_connections: usize,
    /// Descriptors kept for the store (WAL, segments, checkpoints), query workers and
    /// outgoing calls: connections never use them.
    pub reserved_descriptors: u64,
    /// Time to send a whole request head, from the connection's start and from each
    /// idle moment between requests.
    pub header_timeout: Duration,
    /// A connection that moves no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// Time to send a whole request body.
    pub body_timeout: Duration,
    /// Bytes of request bodies held in memory at once, across all requests.
    pub body_budget_bytes: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long open connections may take to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 0,
            reserved_descriptors: 256,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(60),
            body_budget_bytes: 256 * 1024 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Raises this process's soft descriptor limit to its hard limit (where allowed) and
/// returns the soft limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        let mut raised = limit;
        if let Some(maximum) = limit.maximum {
            raised.current = Some(maximum);
        }
        if raised.current != limit.current && setrlimit(Resource::Nofile, raised).is_ok() {
            return getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        }
        limit.current.unwrap_or(u64::MAX)
    }
    #[cfg(not(target_os = "linux"))]
    {
        u64::MAX
    }
}

/// How many connections may be open: the configured number, at most the descriptor
/// limit minus the reserve (and at least 16).
pub fn connection_limit(limits: &HttpLimits, descriptors: u64) -> usize {
    let available = descriptors.saturating_sub(limits.reserved_descriptors).max(16);
    let available = usize::try_from(available).unwrap_or(usize::MAX);
    match limits.max_connections {
        0 => available.min(100_000),
        wanted => wanted.min(available),
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    tokio::pin!(shutdown);
    let mut accept_errors = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors (or another transient error): wait a little
                // rather than spin; connections closing free descriptors again.
                accept_errors += 1;
                if accept_errors.is_power_of_two() {
                    tracing::warn!(%error, count = accept_errors, "accept failed");
                }
                crate::metrics::HTTP_CONNECTIONS_REFUSED
                    .with_label_values(&["accept_error"])
                    .inc();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::metrics::HTTP_CONNECTIONS_REFUSED
                .with_label_values(&["limit"])
                .inc();
            tokio::spawn(refuse(stream, max_connections));
            continue;
        };
        let activity = Arc::new(Activity::new());
        let io = hyper_util::rt::TokioIo::new(Watched {
            inner: stream,
            activity: activity.clone(),
        });
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(remote));
            let mut router = router.clone();
            async move {
                let request = request.map(Body::new);
                tower::Service::call(&mut router, request).await
            }
        });
        let connection = graceful.watch(builder.serve_connection(io, service));
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            let _slot: OwnedSemaphorePermit = slot;
            crate::metrics::HTTP_CONNECTIONS.inc();
            tokio::select! {
                _ = connection => {}
                () = activity.idle_for(idle) => {
                    crate::metrics::HTTP_CONNECTIONS_CLOSED.with_label_values(&["idle"]).inc();
                }
            }
            crate::metrics::HTTP_CONNECTIONS.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = limits.shutdown_grace.as_secs_f64(),
            "connections still open after the shutdown grace period are dropped"
        );
    }
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, limit: usize) {
    let body = format!(
        "{{\"error\":\"too_many_connections\",\"message\":\"the node has its {limit} connections open; retry shortly\"}}"
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
}

/// When a connection last moved a byte.
struct Activity {
    started: Instant,
    /// Milliseconds after `started`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A stream that records when bytes move.
struct Watched {
    inner: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One budget of request-body bytes for the whole node, in KiB permits.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    limits: HttpLimits,
}

impl BodyBudget {
    pub fn new(limits: HttpLimits) -> Self {
        let kib = (limits.body_budget_bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(kib)),
            limits,
        }
    }

    fn busy(&self) -> Response {
        crate::metrics::HTTP_BODIES_REFUSED.inc();
        ApiError::new(
            503,
            "busy",
            format!(
                "request bodies in flight already fill the node's {} MiB budget; retry shortly",
                self.limits.body_budget_bytes / (1024 * 1024)
            ),
        )
        .retry_after(1)
        .into_response()
    }

    fn too_large(&self) -> Response {
        ApiError::new(
            413,
            "too_large",
            format!("the request body is larger than {} bytes", self.limits.max_body_bytes),
        )
        .into_response()
    }

    /// Takes `kib` more permits into `held`, without waiting.
    fn grow(&self, held: &mut Option<OwnedSemaphorePermit>, kib: u32) -> bool {
        if kib == 0 {
            return true;
        }
        match self.permits.clone().try_acquire_many_owned(kib) {
            Ok(more) => {
                match held {
                    Some(held) => held.merge(more),
                    None => *held = Some(more),
                }
                true
            }
            Err(_) => false,
        }
    }
}

fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Middleware: reads the request body within its time limit against the shared budget,
/// holding the budget until the answer is ready.
pub async fn budget_bodies(
    axum::extract::State(budget): axum::extract::State<Arc<BodyBudget>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let chunked = request.headers().contains_key(header::TRANSFER_ENCODING);
    if declared.unwrap_or(0) == 0 && !chunked {
        return next.run(request).await;
    }
    let max = budget.limits.max_body_bytes as u64;
    if declared.is_some_and(|declared| declared > max) {
        return budget.too_large();
    }
    let mut held = None;
    if !budget.grow(&mut held, kib(declared.unwrap_or(0))) {
        return budget.busy();
    }
    let (parts, body) = request.into_parts();
    let read = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::with_capacity(usize::try_from(declared.unwrap_or(0)).unwrap_or(0));
        let mut granted = u64::from(kib(declared.unwrap_or(0))) * 1024;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| {
                ApiError::new(400, "bad_request", format!("reading the request body failed: {error}")).into_response()
            })?;
            let total = bytes.len() as u64 + chunk.len() as u64;
            if total > max {
                return Err(budget.too_large());
            }
            if total > granted {
                let more = kib(total - granted);
                if !budget.grow(&mut held, more) {
                    return Err(budget.busy());
                }
                granted += u64::from(more) * 1024;
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    let bytes = match tokio::time::timeout(budget.limits.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(response)) => return response,
        Err(_) => {
            crate::metrics::HTTP_CONNECTIONS_CLOSED
                .with_label_values(&["slow_body"])
                .inc();
            let mut response = ApiError::new(
                408,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    budget.limits.body_timeout.as_secs_f64()
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    drop(held);
    response
}

/// Answers `status` with `Retry-After` (seconds) on an error response.
pub fn with_retry_after(mut response: Response, seconds: u64) -> Response {
    if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Per-source budget for inputs rejected before any enrolled key vouched for them
/// (malformed, bad signatures, unknown keys, ...): a token bucket per IP address. Junk
/// from one source cannot fill the forensics store or crowd out others.
pub struct RejectLimiter {
    rate: f64,
    burst: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, Instant)>>,
}

/// Sources tracked at once; beyond it, the fullest (oldest) buckets are forgotten.
const MAX_SOURCES: usize = 65_536;

impl RejectLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: burst.max(1.0),
            buckets: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn level(&self, tokens: f64, since: Instant, now: Instant) -> f64 {
        (tokens + now.duration_since(since).as_secs_f64() * self.rate).min(self.burst)
    }

    /// [`RejectLimiter::check`] as the API answers it: 429 `rate_limited` with
    /// `Retry-After`, naming the source and what it sent too much of (`what`).
    pub fn admit(&self, source: std::net::IpAddr, what: &str) -> Result<(), crate::ApiError> {
        self.check(source).map_err(|seconds| {
            crate::metrics::RATE_LIMITED.inc();
            crate::ApiError::new(
                429,
                "rate_limited",
                format!("{source} sent too many {what}; retry in {seconds} s"),
            )
            .retry_after(seconds)
        })
    }

    /// `Err(seconds)` when `source` has spent its budget: the request is refused whole.
    pub fn check(&self, source: std::net::IpAddr) -> Result<(), u64> {
        let buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((tokens, since)) = buckets.get(&source) else {
            return Ok(());
        };
        let level = self.level(*tokens, *since, Instant::now());
        if level >= 1.0 {
            return Ok(());
        }
        let wait = if self.rate > 0.0 {
            (1.0 - level) / self.rate
        } else {
            60.0
        };
        Err(wait.ceil().clamp(1.0, 3600.0) as u64)
    }

    /// Charges `count` unauthenticated rejections to `source`.
    pub fn charge(&self, source: std::net::IpAddr, count: usize) {
        if count == 0 {
            return;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&source) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, since)| (*tokens + now.duration_since(*since).as_secs_f64() * rate) < burst);
            if buckets.len() >= MAX_SOURCES {
                buckets.clear();
            }
        }
        let (tokens, since) = buckets.get(&source).copied().unwrap_or((self.burst, now));
        let level = self.level(tokens, since, now) - count as f64;
        buckets.insert(source, (level, now));
    }
}
