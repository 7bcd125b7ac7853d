//! A stateless query node (`--roles query`): the query API over a replica of the log,
//! rebuilt at every start from the object store and the committed topic.
//!
//! ```text
//!  --object-store URL ──every 500 ms──▶ Archive::refresh ─▶ DATA/replica/ ─▶ each new segment read
//!                                        (the replica not held), then Replica::take
//!  --kafka: committed topic, every partition from shortly before the last seal ─▶ Replica::apply
//!                                                                              │
//!  HTTP (own tokens in DATA/tokens.json, /v1/tokens): /v1/sql, /v1/events, /v1/ocsf, console ◀┘ ReplicaSource
//! ```
//!
//! With `--roles ingest,query` the query routes join the ingest node's listener.
//!
//! Over a partition set (`--log-per-partition`) there is one replica per partition:
//! `DATA/replica/partitions/<p>/`, its tail from partition `p` of the committed topic
//! alone (where that partition's writer publishes), and each request reads the one
//! partition `custos_query::source::Logs::pick` chooses.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// The replicas and the threads that keep them current.
pub(crate) struct QueryNode {
    /// One replica, or one per partition of a partition set (in partition order).
    parts: Vec<Arc<ReplicaSource>>,
    /// Whether the object store holds a partition set (`--log-per-partition`).
    set: bool,
    data: PathBuf,
    /// The local copy of the whole object store.
    store: PathBuf,
    /// How many replicas have read the committed topic up to its end at start (after
    /// the sealed part was read once): the node is ready when all have.
    caught_up: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl QueryNode {
    /// Reads the sealed store at `url` into `DATA/replica` (waiting for that first copy),
    /// then follows the object store and the committed topic. With `partitions`, the
    /// store is a partition set of that many logs, each followed on its own partition.
    pub(crate) async fn start(
        data: PathBuf,
        url: &str,
        kafka: &KafkaConfig,
        chain_window: usize,
        log_keys: Vec<custos_store::checkpoint::NoteKey>,
        partitions: Option<u32>,
    ) -> anyhow::Result<Self> {
        let store = data.join("replica");
        fs_err::create_dir_all(&store)?;
        let logs: Vec<(Option<i32>, PathBuf)> = match partitions {
            None => vec![(None, store.clone())],
            Some(count) => (0..count)
                .map(|partition| {
                    (
                        Some(partition as i32),
                        custos_store::partitions::PartitionSet::store_dir(&store, partition),
                    )
                })
                .collect(),
        };
        let mut replicas: Vec<Arc<Mutex<Replica>>> = Vec::with_capacity(logs.len());
        for (position, (_, dir)) in logs.iter().enumerate() {
            let mut replica = Replica::new(dir.clone(), chain_window);
            // One key per log, in partition order (serve checked the count); without
            // one, the key this node trusted before (`replica/` is disposable, what it
            // trusted is not).
            match log_keys.get(position) {
                Some(key) => {
                    remember_log_key(&data, position, key)?;
                    replica.pin_log_key(key.clone());
                }
                None => {
                    if let Some(key) = remembered_log_key(&data, position)? {
                        replica.pin_log_key(key);
                    }
                }
            }
            replicas.push(Arc::new(Mutex::new(replica)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let caught_up = Arc::new(AtomicUsize::new(0));
        let (first, loaded) = std::sync::mpsc::channel::<anyhow::Result<usize>>();
        let sealed = {
            let (url, store, replicas, stop) = (url.to_owned(), store.clone(), replicas.clone(), stop.clone());
            let data = data.clone();
            std::thread::Builder::new()
                .name("custos-replica-sealed".into())
                .spawn(move || follow_sealed(&url, &store, &data, partitions, &replicas, &stop, first))?
        };
        let segments = tokio::task::spawn_blocking(move || loaded.recv())
            .await?
            .context("the object store reader stopped")??;
        match partitions {
            None => eprintln!("query node: {segments} sealed segments read from {url}"),
            Some(count) => {
                eprintln!("query node: {segments} sealed segments of a partition set of {count} logs read from {url}")
            }
        }
        let mut threads = vec![sealed];
        for ((partition, _), replica) in logs.iter().zip(&replicas) {
            let (kafka, replica, stop, caught_up) = (kafka.clone(), replica.clone(), stop.clone(), caught_up.clone());
            let partition = *partition;
            threads.push(
                std::thread::Builder::new()
                    .name(match partition {
                        Some(partition) => format!("custos-replica-tail-{partition}"),
                        None => "custos-replica-tail".into(),
                    })
                    .spawn(move || follow_tail(&kafka, partition, &replica, &stop, &caught_up))?,
            );
        }
        let parts = logs
            .into_iter()
            .zip(replicas)
            .map(|((_, store), replica)| {
                Arc::new(ReplicaSource {
                    replica,
                    data: data.clone(),
                    store,
                })
            })
            .collect();
        Ok(Self {
            parts,
            set: partitions.is_some(),
            data,
            store,
            caught_up,
            stop,
            threads,
        })
    }

    /// What the query routes read: the replica, or the partitions' replicas.
    fn logs(&self) -> custos_query::source::Logs {
        use custos_query::source::Logs;
        let parts: Vec<Arc<dyn custos_query::Source>> = self
            .parts
            .iter()
            .map(|part| part.clone() as Arc<dyn custos_query::Source>)
            .collect();
        match self.set {
            false => Logs::one(parts[0].clone()),
            true => Logs::partitions(self.data.clone(), self.store.clone(), parts),
        }
    }

    /// The query routes over the replicas, to merge into a listener with its token
    /// table; `others` are the listener's other endpoints, for `GET /openapi.json`.
    pub(crate) fn routes(
        &self,
        limits: custos_query::Limits,
        others: Vec<custos_http::openapi::Endpoint>,
    ) -> anyhow::Result<custos_ingest::edge::ExtraRoutes> {
        let routes = custos_query::http::routes(limits, others)?;
        let logs = self.logs();
        Ok(Box::new(move |tokens| routes(logs, tokens)))
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
            .with_state((self.caught_up.clone(), self.parts.len(), tokens.clone()))
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

/// How many replicas caught up, of how many, and the token table.
type HealthState = (Arc<AtomicUsize>, usize, custos_http::SharedTokens);

async fn readyz(State((caught_up, of, _)): State<HealthState>) -> Response {
    if caught_up.load(Ordering::SeqCst) >= of {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: reading the committed topic\n",
        )
            .into_response()
    }
}

async fn metrics(State((_, _, tokens)): State<HealthState>, headers: HeaderMap) -> Response {
    match custos_http::metrics_answer(&tokens, &headers) {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// Copies new sealed files from the object store and hands them to the replicas: once
/// at once (answered on `first`), then every [`REFRESH_EVERY`]. `partitions` is the set's
/// size the node expects, or `None` for one log; a copy of the other kind is refused.
fn follow_sealed(
    url: &str,
    store: &std::path::Path,
    data: &std::path::Path,
    partitions: Option<u32>,
    replicas: &[Arc<Mutex<Replica>>],
    stop: &AtomicBool,
    first: std::sync::mpsc::Sender<anyhow::Result<usize>>,
) {
    let refresh = |archive: &custos_store::archive::Archive| -> anyhow::Result<usize> {
        archive.refresh(store)?;
        same_layout(store, partitions)?;
        let mut segments = 0;
        for (position, replica) in replicas.iter().enumerate() {
            segments += refresh_replica(replica)?;
            // The key read first is trusted from now on, across restarts too.
            let key = replica
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .trusted_log_key()
                .cloned();
            if let Some(key) = key
                && !remembered_path(data, position).exists()
            {
                remember_log_key(data, position, &key)?;
                tracing::warn!(
                    log = position,
                    key = %key.verifier_string(),
                    "trusting the log key read first from the object store (pin it with --log-key)"
                );
            }
        }
        Ok(segments)
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

/// Where a query node keeps the log key it trusts for log `position` (0 for one log, the
/// partition over a set), outside the disposable `replica/`.
fn remembered_path(data: &std::path::Path, position: usize) -> std::path::PathBuf {
    data.join("trusted-log-keys").join(format!("{position}.pub"))
}

/// Keeps `key` as the one trusted for log `position` (pinned with --log-key, or read
/// first), so a restart trusts it again instead of whatever the object store then holds.
fn remember_log_key(
    data: &std::path::Path,
    position: usize,
    key: &custos_store::checkpoint::NoteKey,
) -> anyhow::Result<()> {
    let path = remembered_path(data, position);
    let text = format!("{}\n", key.verifier_string());
    if fs_err::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    fs_err::create_dir_all(data.join("trusted-log-keys"))?;
    custos_store::write_atomic(&path, text.as_bytes())
        .with_context(|| format!("remembering the trusted log key in `{}`", path.display()))
}

/// The log key this node trusted before for log `position`, if it did.
fn remembered_log_key(
    data: &std::path::Path,
    position: usize,
) -> anyhow::Result<Option<custos_store::checkpoint::NoteKey>> {
    let path = remembered_path(data, position);
    let text = match fs_err::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    custos_store::checkpoint::NoteKey::parse_verifier(text.trim())
        .map(Some)
        .map_err(|error| {
            anyhow::anyhow!(
                "`{}` does not hold a checkpoint verifier key ({error}): give the writer's key with --log-key, \
                 or delete the file to trust the key the object store holds now",
                path.display()
            )
        })
}

/// Takes in `replica`'s new sealed segments, holding it only to plan and to take each
/// one: reading and checking a segment (its digest, leaves and entries, a second or so
/// for 100 000 entries) goes on while queries read it and the committed topic's tail
/// joins it, so a new segment does not hold back what the node shows.
fn refresh_replica(replica: &Mutex<Replica>) -> Result<usize, custos_store::StoreError> {
    let lock = || replica.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut taken = 0;
    loop {
        let next = lock().next_sealed()?;
        let Some(segment) = next else { break };
        let read = segment.read()?;
        lock().take(read)?;
        taken += 1;
    }
    lock().check_new_heads()?;
    Ok(taken)
}

/// Whether the copy at `store` is what the node was started for: a partition set of
/// `partitions` logs, or one log (`None`). An empty copy is either.
fn same_layout(store: &std::path::Path, partitions: Option<u32>) -> anyhow::Result<()> {
    let set = custos_store::partitions::PartitionSet::open(store)?;
    match (set, partitions) {
        (Some(set), None) => anyhow::bail!(
            "the object store holds a partition set of {} logs (partitions.json): start the query node with \
             --log-per-partition",
            set.partitions
        ),
        (Some(set), Some(count)) if set.partitions != count => anyhow::bail!(
            "the object store holds a partition set of {} logs, but the submissions topic has {count} partitions",
            set.partitions
        ),
        (None, Some(_)) if store.join("store.json").exists() => anyhow::bail!(
            "the object store holds one log (store.json), not a partition set: start the query node without \
             --log-per-partition"
        ),
        _ => Ok(()),
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

/// Reads the committed topic (its partition `partition` alone, for one partition's log)
/// into the replica from where the sealed segments leave off (or its beginning), then
/// follows it. Should a record stamped before the start belong after the sealed end
/// after all, the replica's view stops before it until the segment holding it is sealed
/// and read: late, never wrong. Counts itself in `caught_up` once it has read to the
/// ends it saw at start.
fn follow_tail(
    kafka: &KafkaConfig,
    partition: Option<i32>,
    replica: &Mutex<Replica>,
    stop: &AtomicBool,
    caught_up: &AtomicUsize,
) {
    let start = tail_start(replica);
    match start {
        Some(at_ms) => tracing::info!(
            ?partition,
            from = %chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default().to_rfc3339(),
            "reading the committed topic from shortly before the last sealed segment"
        ),
        None => tracing::info!(
            ?partition,
            "reading the committed topic from its beginning (nothing sealed yet)"
        ),
    }
    let mut subscription = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let opened = match start {
            Some(at_ms) => custos_stage::kafka::KafkaSubscription::from_time(kafka, at_ms, partition),
            None => custos_stage::kafka::KafkaSubscription::from_beginning_of(kafka, partition),
        };
        match opened {
            Ok(subscription) => break subscription,
            Err(error) => {
                tracing::warn!(%error, "opening the committed topic; trying again");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let mut counted = false;
    while !stop.load(Ordering::Relaxed) {
        match subscription.recv(Duration::from_millis(100)) {
            Ok(Some(custos_stage::Committed::Replayed { .. })) => {
                if !std::mem::replace(&mut counted, true) {
                    caught_up.fetch_add(1, Ordering::SeqCst);
                }
                tracing::info!(?partition, "query node caught up with the committed topic");
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
