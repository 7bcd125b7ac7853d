//! A stateless query node (`--roles query`): the query API over a replica of the log,
//! rebuilt at every start from the object store and the committed topic.
//!
//! ```text
//!  --object-store URL ──every 500 ms──▶ Archive::refresh ─▶ DATA/replica/ ─▶ Replica::refresh_sealed
//!  --kafka: committed topic, every partition from shortly before the last seal ─▶ Replica::apply
//!                                                                              │
//!  HTTP (own tokens in DATA/tokens.json, /v1/tokens): /v1/sql, /v1/events, /v1/ocsf, console ◀┘ ReplicaSource
//! ```
//!
//! With `--roles ingest,query` the query routes join the ingest node's listener.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use custos_ingest::replica::Replica;
use custos_stage::Subscription as _;
use custos_stage::kafka::KafkaConfig;

use crate::reader::ReplicaSource;

/// How often the object store is read for new segments and checkpoints.
const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// The replica and the threads that keep it current.
pub(crate) struct QueryNode {
    source: Arc<ReplicaSource>,
    /// The sealed part was read once and the committed topic up to its end at start.
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl QueryNode {
    /// Reads the sealed store at `url` into `DATA/replica` (waiting for that first copy),
    /// then follows the object store and the committed topic.
    pub(crate) async fn start(
        data: PathBuf,
        url: &str,
        kafka: &KafkaConfig,
        chain_window: usize,
        log_key: Option<custos_store::checkpoint::NoteKey>,
    ) -> anyhow::Result<Self> {
        let store = data.join("replica");
        fs_err::create_dir_all(&store)?;
        let mut replica = Replica::new(store.clone(), chain_window);
        if let Some(key) = log_key {
            replica.pin_log_key(key);
        }
        let replica = Arc::new(Mutex::new(replica));
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let (first, loaded) = std::sync::mpsc::channel::<anyhow::Result<usize>>();
        let sealed = {
            let (url, store, replica, stop) = (url.to_owned(), store.clone(), replica.clone(), stop.clone());
            std::thread::Builder::new()
                .name("custos-replica-sealed".into())
                .spawn(move || follow_sealed(&url, &store, &replica, &stop, first))?
        };
        let segments = tokio::task::spawn_blocking(move || loaded.recv())
            .await?
            .context("the object store reader stopped")??;
        eprintln!("query node: {segments} sealed segments read from {url}");
        let tail = {
            let (kafka, replica, stop, ready) = (kafka.clone(), replica.clone(), stop.clone(), ready.clone());
            std::thread::Builder::new()
                .name("custos-replica-tail".into())
                .spawn(move || follow_tail(&kafka, &replica, &stop, &ready))?
        };
        Ok(Self {
            source: Arc::new(ReplicaSource { replica, data, store }),
            ready,
            stop,
            threads: vec![sealed, tail],
        })
    }

    /// The query routes over the replica, to merge into a listener with its token table;
    /// `others` are the listener's other endpoints, for `GET /openapi.json`.
    pub(crate) fn routes(
        &self,
        limits: custos_query::Limits,
        others: Vec<custos_http::openapi::Endpoint>,
    ) -> anyhow::Result<custos_ingest::edge::ExtraRoutes> {
        let routes = custos_query::http::routes(limits, others)?;
        let source = self.source.clone();
        Ok(Box::new(move |tokens| routes(source, tokens)))
    }

    /// Serves the query API alone on `listen` (`--roles query` without `ingest`), with
    /// its own token table in `data`, until `shutdown` resolves.
    pub(crate) async fn serve(
        &self,
        config: &custos_ingest::NodeConfig,
        limits: custos_query::Limits,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        custos_http::metrics::init();
        let (tokens, admin_token) = custos_http::Tokens::open(&config.data)?;
        if let Some(token) = admin_token {
            eprintln!(
                "\nAdmin token of this query node (shown once; also saved owner-only in {}):\n\n  {}\n",
                custos_http::auth::admin_token_path(&config.data).display(),
                token.0
            );
        }
        let tokens: custos_http::SharedTokens = Arc::new(std::sync::RwLock::new(tokens));
        let mut others = health_endpoints();
        others.extend(custos_http::tokens::catalogue());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on `{}`", config.listen))?;
        let addr = listener.local_addr()?;
        let mut limits_http = config.http.clone();
        limits_http.max_body_bytes = config.max_request_bytes;
        let descriptors = custos_http::serve::raise_descriptor_limit();
        let connections = custos_http::serve::connection_limit(&limits_http, descriptors);
        let bodies = Arc::new(custos_http::serve::BodyBudget::new(limits_http.clone()));
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state((self.ready.clone(), tokens.clone()))
            .merge(custos_http::tokens::router(&tokens))
            .merge(self.routes(limits, others)?(tokens))
            .layer(axum::middleware::from_fn_with_state(
                bodies,
                custos_http::serve::budget_bodies,
            ))
            .layer(axum::middleware::from_fn(custos_http::json_errors));
        eprintln!(
            "custos serving on http://{addr} (a query node: sealed segments from object storage, the tail from Kafka)"
        );
        Ok(tokio::spawn(async move {
            custos_http::serve::serve(listener, router, limits_http, connections, shutdown).await;
        }))
    }

    pub(crate) async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// The query node's own routes besides the query API, for `GET /openapi.json`.
fn health_endpoints() -> Vec<custos_http::openapi::Endpoint> {
    use custos_http::openapi::Endpoint;
    vec![
        Endpoint::new("GET", "/healthz", "meta", "Liveness: the process answers"),
        Endpoint::new(
            "GET",
            "/readyz",
            "meta",
            "Readiness: the sealed store was read and the committed topic up to its end at start",
        ),
        Endpoint::new("GET", "/metrics", "meta", "Prometheus metrics (any token)").roles(&custos_http::EVERYONE),
    ]
}

type HealthState = (Arc<AtomicBool>, custos_http::SharedTokens);

async fn readyz(State((ready, _)): State<HealthState>) -> Response {
    if ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: reading the committed topic\n",
        )
            .into_response()
    }
}

async fn metrics(State((_, tokens)): State<HealthState>, headers: HeaderMap) -> Response {
    match custos_http::metrics_answer(&tokens, &headers) {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Copies new sealed files from the object store and hands them to the replica: once
/// at once (answered on `first`), then every [`REFRESH_EVERY`].
fn follow_sealed(
    url: &str,
    store: &std::path::Path,
    replica: &Mutex<Replica>,
    stop: &AtomicBool,
    first: std::sync::mpsc::Sender<anyhow::Result<usize>>,
) {
    let refresh = |archive: &custos_store::archive::Archive| -> anyhow::Result<usize> {
        archive.refresh(store)?;
        Ok(replica
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .refresh_sealed()?)
    };
    let archive = match custos_store::archive::Archive::open(url) {
        Ok(archive) => archive,
        Err(error) => {
            let _ = first.send(Err(anyhow::anyhow!("opening the object store `{url}`: {error}")));
            return;
        }
    };
    let started = refresh(&archive).with_context(|| format!("reading the sealed store at `{url}`"));
    let failed = started.is_err();
    let _ = first.send(started);
    if failed {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(REFRESH_EVERY);
        match refresh(&archive) {
            Ok(0) => {}
            Ok(segments) => tracing::debug!(segments, "new sealed segments"),
            Err(error) => tracing::warn!(%error, "reading the object store failed; trying again"),
        }
    }
}

/// How long before the last sealed segment was sealed the committed topic is read from:
/// the entries after that segment were all published later than its last entry's
/// append, and a segment seals within seconds of its last entry.
const TAIL_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Where a query node starts reading the committed topic: [`TAIL_MARGIN`] before its
/// last sealed segment was sealed (what comes earlier is in the segments), or the
/// topic's beginning when nothing is sealed yet.
fn tail_start(replica: &Mutex<Replica>) -> Option<i64> {
    let replica = replica.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let sealed_at = chrono::DateTime::parse_from_rfc3339(replica.last_sealed_at()?).ok()?;
    Some((sealed_at.with_timezone(&chrono::Utc) - TAIL_MARGIN).timestamp_millis())
}

/// Reads the committed topic into the replica from where the sealed segments leave off
/// (or its beginning), then follows it. Should a record stamped before the start belong
/// after the sealed end after all, the replica's view stops before it until the segment
/// holding it is sealed and read: late, never wrong.
fn follow_tail(kafka: &KafkaConfig, replica: &Mutex<Replica>, stop: &AtomicBool, ready: &AtomicBool) {
    let start = tail_start(replica);
    match start {
        Some(at_ms) => tracing::info!(
            from = %chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default().to_rfc3339(),
            "reading the committed topic from shortly before the last sealed segment"
        ),
        None => tracing::info!("reading the committed topic from its beginning (nothing sealed yet)"),
    }
    let mut subscription = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let opened = match start {
            Some(at_ms) => custos_stage::kafka::KafkaSubscription::from_time(kafka, at_ms),
            None => custos_stage::kafka::KafkaSubscription::from_beginning(kafka),
        };
        match opened {
            Ok(subscription) => break subscription,
            Err(error) => {
                tracing::warn!(%error, "opening the committed topic; trying again");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match subscription.recv(Duration::from_millis(100)) {
            Ok(Some(custos_stage::Committed::Replayed { .. })) => {
                ready.store(true, Ordering::SeqCst);
                tracing::info!("query node caught up with the committed topic");
            }
            Ok(Some(record)) => replica
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .apply(&record),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "reading the committed topic; trying again");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
