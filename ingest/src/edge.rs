//! An ingest node without a store: the distributed mode's `--roles ingest`.
//!
//! ```text
//!  POST /v1/events ─▶ per-source limit, split, batch signature check (as in one process)
//!        │                      ▼
//!        │            registry view (from the control topic): unknown ─▶ refused here
//!        │                      │                                revoked ─▶ refused here (signed)
//!        │                      ▼
//!        │            Submission::Events ──▶ log writer (chain checks, WAL fsync)
//!        │                                          │
//!        └──── verdict per item ◀── receipt ────────┘  (answered only once durable)
//!  POST /v1/agents/{did}/revoke ─▶ Submission::Control ─▶ log writer
//!  POST /v1/traces, /v1/adapters/… ─▶ Submission::Adapter (whole; token as SHA-256)
//!        ─▶ the writer's node serves it as its own API ─▶ its answer, given back as is
//!        (a LastID batch keyed by its agents' realm from the view's `lastid:` records,
//!        split when they are in several; a LastID enrollment keyed by its realm)
//!  /v1/tokens (admin): the node's own token table
//! ```
//!
//! The node keeps nothing that matters: refused items travel to the writer in the
//! submission and are kept there for forensics, and the registry view is rebuilt from
//! the compacted control topic at every start ([`ControlView`]). Answers are the same as
//! in one process: a [`Verdict`] per item with the same reason codes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use custos_event::{KeyCache, Reason};
use custos_stage::{ControlOp, EventBatch, EventItem, ItemCheck, Submission, Submitter, Verdict};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::http::{RevokeRequest, answer_verdicts, split_request, verify_request};
use crate::sequencer::Item;
use crate::{NodeConfig, NodeError};
use custos_http::auth::{Role, Secret, Tokens};
use custos_http::metrics_answer;
use custos_http::openapi::Endpoint;
use custos_http::{ApiError, serve};

/// The registry as the control topic tells it: each agent's latest status and realm,
/// and the realm of each LastID agent the writers enrolled.
#[derive(Default)]
pub struct ControlView {
    agents: std::sync::RwLock<HashMap<String, AgentView>>,
    lastid: std::sync::RwLock<HashMap<String, String>>,
    loaded: AtomicBool,
    rounds: Rounds,
}

/// Reading the control topic up to its end on demand ([`ControlView::catch_up`]): each
/// call asks for a round, and the follower reports the rounds it finished.
struct Rounds {
    asked: AtomicU64,
    done: tokio::sync::watch::Sender<u64>,
}

impl Default for Rounds {
    fn default() -> Self {
        Self {
            asked: AtomicU64::new(0),
            done: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// How long a request naming an agent this node does not know waits for the control
/// topic to be read to its end before the agent is refused `unknown_agent`.
pub const CATCH_UP: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq)]
struct AgentView {
    status: String,
    realm: String,
    log_index: Option<u64>,
}

/// The fields of a control-topic record this view reads (`registry::control_record`
/// writes them; `docs/architecture.md` documents the format).
#[derive(Deserialize)]
struct ControlValue {
    #[serde(rename = "type")]
    kind: String,
    status: String,
    agent: String,
    #[serde(default)]
    realm: String,
    #[serde(default)]
    log_index: Option<u64>,
}

impl ControlView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one control-topic record (`key`, `value`). Other subjects (memories,
    /// credentials) are not the ingest node's concern; a malformed value is skipped.
    pub fn apply(&self, key: &str, value: &[u8]) {
        let (kind, subject) = match key.split_once(':') {
            Some((kind @ ("agent" | "lastid"), subject)) => (kind, subject),
            _ => return,
        };
        let value: ControlValue = match serde_json::from_slice(value) {
            Ok(value) => value,
            Err(error) => {
                tracing::warn!(key, %error, "malformed control record skipped");
                return;
            }
        };
        if value.kind != kind || value.agent != subject {
            tracing::warn!(key, "control record skipped: its value is not about its key");
            return;
        }
        if kind == "lastid" {
            self.note_lastid(&value.agent, &value.realm);
            return;
        }
        self.agents
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                value.agent,
                AgentView {
                    status: value.status,
                    realm: value.realm,
                    log_index: value.log_index,
                },
            );
    }

    /// Everything on the topic at start has been read: the node may answer.
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::SeqCst);
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }

    /// Waits (at most `within`) until the view has read the control topic up to where
    /// it ended after this call began: an agent enrolled through another node before
    /// then is known afterwards. Concurrent calls share rounds. `false` when that did
    /// not happen in time (the brokers away, say).
    pub async fn catch_up(&self, within: Duration) -> bool {
        let round = self.rounds.asked.fetch_add(1, Ordering::SeqCst) + 1;
        crate::http::counted_wait(
            &mut self.rounds.done.subscribe(),
            within,
            |finished| *finished >= round,
            &custos_http::metrics::CATCH_UPS,
        )
        .await
    }

    /// For the reader of the control topic: the last round asked for. A round it starts
    /// after reading this (asking the brokers where the topic ends) serves every call
    /// up to it.
    pub fn rounds_asked(&self) -> u64 {
        self.rounds.asked.load(Ordering::SeqCst)
    }

    /// For the reader of the control topic: every round up to `round` is done (the
    /// topic was read to where it ended when that round started).
    pub fn rounds_done(&self, round: u64) {
        self.rounds.done.send_if_modified(|finished| {
            let newer = round > *finished;
            if newer {
                *finished = round;
            }
            newer
        });
    }

    /// Whether the view knows agent `did` (enrolled, whatever its status).
    fn knows(&self, did: &str) -> bool {
        self.agents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(did)
    }

    /// Records that LastID agent `did` is enrolled in `realm` (a control-topic record, or
    /// an enrollment this node passed on).
    pub fn note_lastid(&self, did: &str, realm: &str) {
        self.lastid
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(did.to_owned(), realm.to_owned());
    }

    /// The realm LastID agent `did` is enrolled in, as far as the control topic told.
    pub fn lastid_realm(&self, did: &str) -> Option<String> {
        self.lastid
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(did)
            .cloned()
    }

    /// The realm `did` is enrolled in, as far as the control topic told.
    pub fn realm_of(&self, did: &str) -> Option<String> {
        let agents = self.agents.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        agents.get(did).map(|agent| agent.realm.clone())
    }

    /// The ingest node's checks of one verified-or-rejected item, and the realm of its
    /// agent when it is enrolled (what places it on a partition).
    fn check(&self, item: Item) -> (EventItem, String) {
        let refused = |code: &str, message: String, signed: bool| ItemCheck::Refused {
            code: code.to_owned(),
            message,
            signed,
            whole: None,
        };
        let mut realm = String::new();
        let check = match &item.outcome {
            Err(rejection) => refused(rejection.reason.code(), rejection.message.clone(), false),
            Ok(verified) => {
                let did = &verified.payload.agent;
                let agents = self.agents.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                let agent = agents.get(did);
                if let Some(agent) = agent {
                    realm.clone_from(&agent.realm);
                }
                match agent {
                    None => refused(
                        Reason::UnknownAgent.code(),
                        format!("agent `{did}` is not enrolled"),
                        false,
                    ),
                    Some(agent) if agent.status == "revoked" => refused(
                        Reason::RevokedAgent.code(),
                        format!(
                            "agent `{did}` was revoked (log index {})",
                            agent.log_index.map_or("?".into(), |index| index.to_string())
                        ),
                        true,
                    ),
                    Some(_) => ItemCheck::Verified,
                }
            }
        };
        (
            EventItem {
                raw: item.raw,
                keyid: item.keyid,
                check,
            },
            realm,
        )
    }
}

#[derive(Clone)]
struct EdgeState {
    submitter: Arc<dyn Submitter>,
    view: Arc<ControlView>,
    tokens: Arc<std::sync::RwLock<Tokens>>,
    config: Arc<NodeConfig>,
    keys: Arc<KeyCache>,
    rejects: Arc<serve::RejectLimiter>,
    receipt_timeout: Duration,
    /// Submissions waiting for the writer's answer: bounded, so that a writer that stops
    /// answering makes new requests fail fast instead of piling up requests, bodies and
    /// connections.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Over a partition set: the partition the writers routed an adapter request to, by
    /// (route, token hash), so the next one goes there at once.
    adapter_routes: Arc<std::sync::Mutex<std::collections::HashMap<AdapterRoute, u32>>>,
    refused_tokens: Arc<RefusedTokens>,
}

/// Collector token hashes the writer refused (401, 403) lately, with its answer: given
/// again by the ingest node itself, without a broker round trip, for
/// [`REFUSED_TOKEN_FOR`].
#[derive(Default)]
struct RefusedTokens(std::sync::Mutex<std::collections::HashMap<String, (Instant, custos_stage::AdapterReply)>>);

impl RefusedTokens {
    fn answer(&self, digest: &str) -> Option<custos_stage::AdapterReply> {
        let mut refused = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match refused.get(digest) {
            Some((at, reply)) if at.elapsed() < REFUSED_TOKEN_FOR => Some(reply.clone()),
            Some(_) => {
                refused.remove(digest);
                None
            }
            None => None,
        }
    }

    fn keep(&self, digest: &str, reply: &custos_stage::AdapterReply) {
        let mut refused = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if refused.len() >= REFUSED_TOKENS_KEPT {
            refused.clear();
        }
        refused.insert(digest.to_owned(), (Instant::now(), reply.clone()));
    }
}

/// How long an ingest node answers a collector token the writer refused by itself. A
/// token is a random secret made on the writer, so one unknown now does not become
/// valid later; a revoked one stays revoked.
const REFUSED_TOKEN_FOR: Duration = Duration::from_secs(60);

/// The most refused token hashes an ingest node keeps (emptied when full).
const REFUSED_TOKENS_KEPT: usize = 4096;

/// What decides an adapter request's partition: its route, and for OTLP the token (its
/// realm), as (route, token SHA-256).
type AdapterRoute = (String, Option<String>);

/// The most adapter routes an ingest node remembers; the table is emptied when full (a
/// forgotten route costs one more round trip through the writers).
const ADAPTER_ROUTES_KEPT: usize = 4096;

/// How many times the writers may route one adapter request on before the ingest node
/// gives up (once is the rule: the first writer names the realm's partition; twice
/// covers a route remembered from before the set changed).
const ADAPTER_HOPS: usize = 2;

/// A request's checked items, (item, realm) in request order, as the submissions that
/// carry them: per realm (each goes to its realm's partition and log writer), its
/// batches in order, each with the request indexes of its items. A realm's batch is cut
/// at [`SUBMISSION_ITEMS`] items or [`SUBMISSION_RAW_BYTES`] of envelopes, so that every
/// submission and its receipt fit one broker record.
fn realm_batches(
    remote: &str,
    checked: impl Iterator<Item = (EventItem, String)>,
) -> Vec<Vec<(EventBatch, Vec<usize>)>> {
    let mut realms: Vec<Vec<(EventBatch, Vec<usize>, usize)>> = Vec::new();
    for (index, (mut item, realm)) in checked.enumerate() {
        if let ItemCheck::Refused { signed, whole, .. } = &mut item.check
            && item.raw.len() > REFUSED_RAW_BYTES
        {
            // The writer keeps 64 KiB of a refused input for forensics; the rest would
            // only make the record too large for the broker. Its size and blake3 travel.
            *whole = Some(custos_stage::WholeInput::of(&item.raw));
            // Cut, a signed event no longer verifies at the writer: its refusal stands.
            *signed = false;
            item.raw.truncate(REFUSED_RAW_BYTES);
        }
        let lane = match realms.iter().position(|lane| lane[0].0.realm == realm) {
            Some(lane) => lane,
            None => {
                realms.push(Vec::new());
                realms.len() - 1
            }
        };
        let lane = &mut realms[lane];
        let full = |(batch, _, size): &(EventBatch, Vec<usize>, usize)| {
            batch.items.len() >= SUBMISSION_ITEMS || (*size > 0 && size + item.raw.len() > SUBMISSION_RAW_BYTES)
        };
        if lane.last().is_none_or(full) {
            let batch = EventBatch {
                remote: remote.to_owned(),
                realm,
                items: Vec::new(),
            };
            lane.push((batch, Vec::new(), 0));
        }
        let (batch, indexes, size) = lane.last_mut().expect("a batch was pushed above");
        *size += item.raw.len();
        batch.items.push(item);
        indexes.push(index);
    }
    realms
        .into_iter()
        .map(|lane| lane.into_iter().map(|(batch, indexes, _)| (batch, indexes)).collect())
        .collect()
}

/// Submissions an ingest node waits on at once, at most: each holds its request's body
/// and connection until the writer answers.
const MAX_IN_FLIGHT: usize = 256;

/// The envelope bytes of one `Submission::Events` at most: in base64 with the record's
/// JSON, well under the 1 000 000 bytes a Kafka client sends in one record by default
/// (`message.max.bytes`). A larger request becomes several submissions.
const SUBMISSION_RAW_BYTES: usize = 384 * 1024;

/// The items of one `Submission::Events` at most: what bounds its receipt (a verdict per
/// item) and the refusal messages it carries, for a request of many tiny items.
const SUBMISSION_ITEMS: usize = 1024;

/// A refused item travels with at most this many of its bytes (the writer keeps 64 KiB
/// of it for forensics).
const REFUSED_RAW_BYTES: usize = 128 * 1024;

/// The largest adapter request body an ingest node passes on: it crosses as one
/// `Submission::Adapter` record, its body in base64, under the 1 000 000 bytes a Kafka
/// client sends in one record by default. A larger one is refused 413 before it is
/// copied or sent (a collector splits its batches; the writer's own API takes more).
pub const MAX_ADAPTER_BODY: usize = 640 * 1024;

/// A running ingest node.
pub struct Edge {
    pub addr: SocketAddr,
    /// The first admin token, when this start created the node's token table.
    pub admin_token: Option<Secret>,
    shutdown: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Edge {
    /// Stops accepting and lets open requests finish.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let _ = self.done.await;
    }
}

/// More routes for an ingest node, built over its token table (a query node's API, for
/// `--roles ingest,query`).
pub type ExtraRoutes = Box<dyn FnOnce(custos_http::SharedTokens) -> Router + Send>;

/// Serves `POST /v1/events` (and revocations, health, metrics, and `extra`) on
/// `config.listen`, handing every request to the writer through `submitter` and waiting
/// up to `receipt_timeout` for its answer. `config.data` holds the node's token table only.
pub async fn start_edge(
    config: NodeConfig,
    submitter: Arc<dyn Submitter>,
    view: Arc<ControlView>,
    receipt_timeout: Duration,
    extra: Option<ExtraRoutes>,
) -> Result<Edge, NodeError> {
    custos_http::metrics::init();
    fs_err::create_dir_all(&config.data)?;
    let (tokens, admin_token) = Tokens::open(&config.data)?;
    let (listener, addr) = crate::bind(config.listen).await?;
    let (limits, max_connections, _) = crate::front_door(&config);
    let state = EdgeState {
        submitter,
        view,
        tokens: Arc::new(std::sync::RwLock::new(tokens)),
        rejects: Arc::new(serve::RejectLimiter::new(
            config.reject_rate_per_sec,
            config.reject_burst,
        )),
        config: Arc::new(config),
        keys: Arc::new(KeyCache::default()),
        receipt_timeout,
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        adapter_routes: Arc::default(),
        refused_tokens: Arc::default(),
    };
    let bodies = Arc::new(serve::BodyBudget::new(limits.clone()));
    let tokens = state.tokens.clone();
    let mut router = endpoints()
        .into_iter()
        .fold(Router::new(), |router, (endpoint, method)| {
            // An adapter's token is checked by the writer's node, against its own table
            // (by the token's hash): this node's table does not hold collector tokens.
            let method = match custos_stage::ADAPTER_ROUTES.contains(&endpoint.path) {
                true => method,
                false => custos_http::guarded(&endpoint, method, &tokens),
            };
            router.route(endpoint.path, method)
        })
        .with_state(state)
        .merge(custos_http::tokens::router(&tokens));
    match extra {
        // The query routes bring `GET /openapi.json`, listing these routes too.
        Some(extra) => router = router.merge(extra(tokens)),
        None => {
            router = router.route(
                "/openapi.json",
                custos_http::openapi::route(&catalogue(), env!("CARGO_PKG_VERSION")),
            );
        }
    }
    let router = router
        .layer(axum::middleware::from_fn_with_state(bodies, serve::budget_bodies))
        .layer(axum::middleware::from_fn(custos_http::json_errors));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    tracing::info!(%addr, max_connections, "custos ingest node listening");
    let done = tokio::spawn(async move {
        serve::serve(listener, router, limits, max_connections, async move {
            let _ = shutdown_rx.await;
        })
        .await;
    });
    Ok(Edge {
        addr,
        admin_token,
        shutdown: Some(shutdown_tx),
        done,
    })
}

/// An ingest node's routes, declared once: served by [`start_edge`], described by
/// `GET /openapi.json`.
fn endpoints() -> Vec<(Endpoint, MethodRouter<EdgeState>)> {
    const ADMIN: &[Role] = &[Role::Admin];
    vec![
        (
            Endpoint::new("GET", "/healthz", "health", "Liveness: 200 while the process runs").answer(200, "text/plain"),
            get(|| async { "ok\n" }),
        ),
        (
            Endpoint::new(
                "GET",
                "/readyz",
                "health",
                "Readiness: 200 once the registry was read from the control topic, else 503",
            )
            .answer(200, "text/plain"),
            get(readyz),
        ),
        (
            Endpoint::new("GET", "/metrics", "operations", "Prometheus metrics (docs/metrics.md)")
                .roles(&custos_http::EVERYONE)
                .answer(200, "text/plain"),
            get(metrics),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/events",
                "ingest",
                "Ingest DSSE envelopes (JSON array or NDJSON), answered per item once the log writer made them durable",
            )
            .returns("ItemResults")
            .errors(&[429, 503]),
            post(post_events),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/agents",
                "registry",
                "Enroll a Custos agent (through the log writer); a LastID agent's enrollment (source, public_key) is passed on to the writer's node, which checks the admin token in its own table",
            )
            .returns("Record")
            .errors(&[409, 503])
                .roles(ADMIN)
                .body("application/json", r#"{"did":"did:key:z6Mk…","realm":"eng","labels":{}}"#),
            post(enroll),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/agents/{did}/revoke",
                "registry",
                "Revoke an agent (through the log writer); every ingest node refuses its events once the control topic says so",
            )
            .returns("Record")
            .errors(&[404, 503])
            .roles(ADMIN),
            post(revoke),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/traces",
                "ingest",
                "OTLP/HTTP traces from a collector, passed on whole to the writer's node, which attests them with the collector's keys and answers as its own API does (the token is passed on as its SHA-256 and must be one of the writer's collector tokens)",
            )
            .returns("Record")
            .errors(&[413, 415, 429, 501, 503])
            .roles(&[Role::Collector]),
            post(forward_adapter),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/adapters/lastid/audit",
                "adapters",
                "LastID audit records, passed on to the writer's node of their agents' realm (which holds the LastID enrollments and chains; a batch whose agents are in several partitions' realms is split and its verdicts put back in order) and answered as there",
            )
            .returns("ItemResults")
            .errors(&[413, 429, 503]),
            post(forward_adapter),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/adapters/vaultysclaw/webhook",
                "adapters",
                "VaultysClaw webhook deliveries, passed on whole to the writer's node (which holds the webhook secret and the deliveries seen) and answered as there",
            )
            .returns("Record")
            .errors(&[404, 429, 501, 503]),
            post(forward_adapter),
        ),
    ]
}

/// The ingest node's endpoints with the token routes, for `GET /openapi.json`.
pub fn catalogue() -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = endpoints().into_iter().map(|(endpoint, _)| endpoint).collect();
    endpoints.extend(custos_http::tokens::catalogue());
    endpoints
}

/// An adapter route: the request is passed on whole to the writer's node
/// (`Submission::Adapter`), which holds the adapters' keys, chains and tables, and its
/// answer is given back as it is. Only the adapters' own headers cross, and the bearer
/// token only as its SHA-256. A LastID batch goes to the partition of its agents' realm
/// as the control topic tells it ([`lastid_parts`]), in parts when they are in several.
async fn forward_adapter(
    State(state): State<EdgeState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let source = remote.ip();
    state.rejects.admit(source, "refused requests")?;
    let route = uri.path().to_owned();
    let token_sha256 = custos_http::bearer_sha256(&headers);
    let traces = route == "/v1/traces";
    if traces && token_sha256.is_none() {
        // Refused here: without a token the writer could only refuse it too.
        state.rejects.charge(source, 1);
        return Err(ApiError::new(
            401,
            "unauthenticated",
            "send `Authorization: Bearer <token>` (a collector token of the writer's node)",
        ));
    }
    // A token the writer refused lately is refused here as it was, without the brokers.
    let refused_before = token_sha256
        .as_deref()
        .filter(|_| traces)
        .and_then(|digest| state.refused_tokens.answer(digest));
    if let Some(reply) = refused_before {
        state.rejects.charge(source, 1);
        return adapter_answer(reply);
    }
    if body.len() > MAX_ADAPTER_BODY {
        return Err(ApiError::new(
            413,
            "too_large",
            format!(
                "the request holds {} bytes; through an ingest node an adapter request is at most \
                 {MAX_ADAPTER_BODY} (it crosses to the log writer as one broker record): send smaller batches",
                body.len()
            ),
        ));
    }
    let adapter_headers = custos_stage::ADAPTER_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect();
    let mut request = custos_stage::AdapterRequest {
        partition: None,
        route,
        remote: remote.to_string(),
        headers: adapter_headers,
        token_sha256,
        body: body.to_vec(),
        realm: None,
    };
    if request.route == LASTID_AUDIT {
        let partitions = state.submitter.partitions();
        let mut parts = lastid_parts(&state.view, &body, state.config.max_events_per_request, partitions);
        // Records of a LastID agent the view does not place yet (enrolled through
        // another node a moment ago, say): placed again after reading the control topic
        // to its end, as events of an unknown signer are.
        let unplaced = |parts: &Option<Vec<LastIdPart>>| {
            parts.as_ref().is_some_and(|parts| {
                parts
                    .iter()
                    .any(|part| part.realm.is_none() && !part.indexes.is_empty())
            })
        };
        if unplaced(&parts) && state.view.catch_up(CATCH_UP).await {
            parts = lastid_parts(&state.view, &body, state.config.max_events_per_request, partitions);
        }
        match parts {
            Some(parts) if parts.len() > 1 => return forward_lastid_parts(&state, request, parts, source).await,
            Some(mut parts) => request.realm = parts.pop().and_then(|part| part.realm),
            // Not a batch this node can read: the writer refuses it, and keeps it.
            None => {}
        }
    }
    adapter_answer(relay(&state, request, source).await?)
}

const LASTID_AUDIT: &str = "/v1/adapters/lastid/audit";

/// Hands an adapter request to the writers and waits for the answer of the one that
/// serves it: over a partition set the writer that takes it may name the realm's
/// partition instead, and the request is sent again there (remembered by route and
/// token, for requests this node could not place by realm).
async fn relay(
    state: &EdgeState,
    mut request: custos_stage::AdapterRequest,
    source: std::net::IpAddr,
) -> Result<custos_stage::AdapterReply, ApiError> {
    let traces = request.route == "/v1/traces";
    let known: AdapterRoute = (request.route.clone(), request.token_sha256.clone());
    let routes = || {
        state
            .adapter_routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if request.realm.is_none() {
        request.partition = routes().get(&known).copied();
    }
    let mut hops = 0;
    let appended = loop {
        let appended = submit(state, Submission::Adapter(request.clone())).await?;
        match appended.route_to {
            Some(partition) if hops < ADAPTER_HOPS => {
                hops += 1;
                let mut routes = routes();
                if routes.len() >= ADAPTER_ROUTES_KEPT {
                    routes.clear();
                }
                routes.insert(known.clone(), partition);
                request.partition = Some(partition);
            }
            Some(partition) => {
                return Err(ApiError::new(
                    502,
                    "bad_writer_reply",
                    format!(
                        "the log writers routed the adapter request {} times, the last to partition \
                         {partition}; the partition set may be changing: send it again",
                        hops + 1
                    ),
                ));
            }
            None => break appended,
        }
    };
    let reply = appended.reply.ok_or_else(|| {
        ApiError::new(
            500,
            "internal",
            "the log writer answered the adapter request without a reply",
        )
    })?;
    // A refused credential costs the source here too, so it cannot keep the brokers busy.
    if matches!(reply.status, 401 | 403) {
        state.rejects.charge(source, 1);
        if let Some(digest) = request.token_sha256.as_deref().filter(|_| traces) {
            state.refused_tokens.keep(digest, &reply);
        }
    }
    Ok(reply)
}

/// The records of a LastID batch that go to one partition: their places in the batch,
/// and the batch of them alone (each record's bytes as they came).
#[derive(Debug, PartialEq, Eq)]
struct LastIdPart {
    /// The realm of its first record's agent, which places the part (its other agents'
    /// realms are on the same partition). `None`: agents the control topic names no
    /// realm for (not enrolled, or records that do not say whose they are), sent where
    /// the writers find it themselves.
    realm: Option<String>,
    indexes: Vec<usize>,
    body: Vec<u8>,
}

/// Splits a LastID batch by the partition (of `partitions`) of the realm `view` gives
/// each record's `agent_did`, in batch order: at most one part per partition, however
/// many realms the batch names. `None` for a body that is not `{"records":[…]}` with at
/// most `max` records (passed on whole: the writer refuses it as it would from the
/// agent).
fn lastid_parts(view: &ControlView, body: &[u8], max: usize, partitions: u32) -> Option<Vec<LastIdPart>> {
    #[derive(Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        records: Vec<&'a serde_json::value::RawValue>,
    }
    #[derive(Deserialize)]
    struct Whose {
        agent_did: Option<String>,
    }
    let batch: Batch = serde_json::from_slice(body).ok()?;
    if batch.records.len() > max {
        return None;
    }
    // The partition of each part, and (the realm placing it, indexes, records).
    let mut keys: Vec<Option<u32>> = Vec::new();
    let mut parts: Vec<(Option<String>, Vec<usize>, Vec<&str>)> = Vec::new();
    for (index, record) in batch.records.iter().enumerate() {
        let realm = serde_json::from_str::<Whose>(record.get())
            .ok()
            .and_then(|whose| whose.agent_did)
            .and_then(|did| view.lastid_realm(&did));
        let partition = realm
            .as_deref()
            .map(|realm| custos_event::partition_of(realm, partitions.max(1)));
        let position = keys.iter().position(|known| *known == partition).unwrap_or_else(|| {
            keys.push(partition);
            parts.push((realm, Vec::new(), Vec::new()));
            parts.len() - 1
        });
        parts[position].1.push(index);
        parts[position].2.push(record.get());
    }
    if parts.is_empty() {
        parts.push((None, Vec::new(), Vec::new()));
    }
    Some(
        parts
            .into_iter()
            .map(|(realm, indexes, records)| LastIdPart {
                realm,
                indexes,
                body: format!("{{\"records\":[{}]}}", records.join(",")).into_bytes(),
            })
            .collect(),
    )
}

/// Sends each part of a LastID batch to its partition at once, and answers one verdict
/// per record in batch order. When a part is not answered 200 (or not answered), its
/// answer is the request's (the first such, in batch order): the client sends the batch
/// again, and what the other parts stored is then a `duplicate`.
async fn forward_lastid_parts(
    state: &EdgeState,
    request: custos_stage::AdapterRequest,
    parts: Vec<LastIdPart>,
    source: std::net::IpAddr,
) -> Result<Response, ApiError> {
    // Awaited together in this request's task: a client that goes away drops them all.
    let (indexes, sent): (Vec<_>, Vec<_>) = parts
        .into_iter()
        .map(|part| {
            let mut request = request.clone();
            request.body = part.body;
            request.realm = part.realm;
            (part.indexes, relay(state, request, source))
        })
        .unzip();
    let answers = futures::future::join_all(sent).await;
    match merge_lastid_answers(indexes.into_iter().zip(answers).collect())? {
        Ok(verdicts) => Ok(Json(verdicts).into_response()),
        Err(reply) => adapter_answer(reply),
    }
}

/// The answer to a split LastID batch from its parts' (record places, answer): their
/// verdicts in batch order, or the first part's answer that is not 200, as it is (or
/// the first part's error).
fn merge_lastid_answers(
    answers: Vec<(Vec<usize>, Result<custos_stage::AdapterReply, ApiError>)>,
) -> Result<Result<Vec<Verdict>, custos_stage::AdapterReply>, ApiError> {
    let mut verdicts = Vec::new();
    for (indexes, answer) in answers {
        let reply = answer?;
        if reply.status != 200 {
            return Ok(Err(reply));
        }
        let body = reply.body_bytes().map_err(|error| {
            ApiError::new(
                502,
                "bad_writer_reply",
                format!("the log writer's answer to a LastID part is malformed: {error}"),
            )
        })?;
        let answered: Vec<Verdict> = serde_json::from_slice(&body).map_err(|error| {
            ApiError::new(
                502,
                "bad_writer_reply",
                format!("the log writer's answer to a LastID part is not one verdict per record: {error}"),
            )
        })?;
        if answered.len() != indexes.len() {
            return Err(ApiError::new(
                502,
                "bad_writer_reply",
                format!(
                    "the log writer answered {} verdicts for a LastID part of {} records",
                    answered.len(),
                    indexes.len()
                ),
            ));
        }
        for mut verdict in answered {
            verdict.index = *indexes.get(verdict.index).ok_or_else(|| {
                ApiError::new(
                    502,
                    "bad_writer_reply",
                    format!(
                        "the log writer answered record {} of a LastID part of {} records",
                        verdict.index,
                        indexes.len()
                    ),
                )
            })?;
            verdicts.push(verdict);
        }
    }
    verdicts.sort_by_key(|verdict| verdict.index);
    Ok(Ok(verdicts))
}

/// The writer's node's answer to an adapter request, as an HTTP response.
fn adapter_answer(reply: custos_stage::AdapterReply) -> Result<Response, ApiError> {
    let malformed = |what: String| {
        ApiError::new(
            502,
            "bad_writer_reply",
            format!("the log writer's answer to the adapter request is malformed: {what}"),
        )
    };
    let status = StatusCode::from_u16(reply.status).map_err(|_| malformed(format!("status {}", reply.status)))?;
    let body = reply
        .body_bytes()
        .map_err(|error| malformed(format!("body: {error}")))?;
    let content_type = axum::http::HeaderValue::try_from(reply.content_type.as_str())
        .map_err(|_| malformed(format!("content type `{}`", reply.content_type)))?;
    let mut response = (status, [(axum::http::header::CONTENT_TYPE, content_type)], body).into_response();
    if let Some(seconds) = reply.retry_after {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, seconds.into());
    }
    Ok(response)
}

async fn readyz(State(state): State<EdgeState>) -> Response {
    if state.view.loaded() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: reading the control topic\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<EdgeState>, headers: HeaderMap) -> Result<Response, ApiError> {
    // Counted by the transport; brought up to date when scraped.
    let resubmitted = state.submitter.resubmitted();
    let shown = custos_http::metrics::RESUBMITTED.get();
    if resubmitted > shown {
        custos_http::metrics::RESUBMITTED.inc_by(resubmitted - shown);
    }
    metrics_answer(&state.tokens, &headers)
}

/// Hands `submission` to the writer and waits for its durable answer.
async fn submit(state: &EdgeState, submission: Submission) -> Result<custos_stage::Appended, ApiError> {
    let Ok(permit) = state.in_flight.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            503,
            "busy",
            format!("the ingest node already waits on {MAX_IN_FLIGHT} answers from the log writer; send it again"),
        )
        .retry_after(1));
    };
    let submitter = state.submitter.clone();
    let timeout = state.receipt_timeout;
    let steps = &custos_http::metrics::WRITER_SECONDS;
    // Handing over may block briefly (a full producer queue): on a blocking thread. The
    // wait for the writer's answer holds no thread.
    let started = std::time::Instant::now();
    let receipt = tokio::task::spawn_blocking(move || submitter.submit(submission))
        .await
        .map_err(|error| ApiError::new(500, "internal", format!("the submit task failed: {error}")))?;
    let submitted = std::time::Instant::now();
    steps
        .with_label_values(&["submit"])
        .observe((submitted - started).as_secs_f64());
    let outcome = match receipt {
        Ok(receipt) => {
            let answer = tokio::time::timeout(timeout, receipt.answered())
                .await
                .unwrap_or_else(|_| Err(custos_stage::timed_out(timeout)));
            steps
                .with_label_values(&["receipt"])
                .observe(submitted.elapsed().as_secs_f64());
            Ok(answer)
        }
        Err(error) => Err(error),
    };
    drop(permit);
    match outcome {
        Ok(Ok(appended)) => Ok(appended),
        Ok(Err(refused)) if refused.retryable => Err(ApiError::new(
            503,
            "writer_unavailable",
            format!(
                "the log writer could not take the request ({}: {}); send it again",
                refused.code, refused.message
            ),
        )
        .retry_after(1)),
        // The writer's refusals of a control operation keep their own codes.
        Ok(Err(refused)) => Err(match refused.code.as_str() {
            "agent_exists" => ApiError::new(409, "agent_exists", refused.message),
            "unknown_agent" => ApiError::new(404, "unknown_agent", refused.message),
            "bad_did" => ApiError::new(400, "bad_did", refused.message),
            "bad_realm" => ApiError::new(400, "bad_realm", refused.message),
            "writer_only" => ApiError::new(501, "writer_only", refused.message),
            _ => ApiError::new(
                422,
                "writer_refused",
                format!(
                    "the log writer refused the request: {}: {}",
                    refused.code, refused.message
                ),
            ),
        }),
        // Sending it again would fail again: the client must split it.
        Err(error @ custos_stage::StageError::TooLarge { .. }) => Err(ApiError::new(
            413,
            "too_large",
            format!("the request cannot cross to the log writer whole: {error}; send it in smaller requests"),
        )),
        Err(error) => Err(ApiError::new(
            503,
            "writer_unavailable",
            format!("the request could not reach the log writer ({error}); send it again"),
        )
        .retry_after(1)),
    }
}

async fn post_events(
    State(state): State<EdgeState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !state.view.loaded() {
        return Err(ApiError::new(
            503,
            "not_ready",
            "the ingest node is still reading the registry from the control topic",
        )
        .retry_after(1));
    }
    let source = remote.ip();
    let remote = remote.to_string();
    let raws = match split_request(&state.rejects, &state.config, source, &body)? {
        Ok(raws) => raws,
        Err(rejection) => {
            // Kept for forensics by the writer, as one refused item.
            let item = EventItem {
                raw: body[..body.len().min(REFUSED_RAW_BYTES)].to_vec(),
                keyid: None,
                check: ItemCheck::Refused {
                    code: rejection.reason.code().to_owned(),
                    message: rejection.message.clone(),
                    signed: false,
                    whole: (body.len() > REFUSED_RAW_BYTES).then(|| custos_stage::WholeInput::of(&body)),
                },
            };
            let _ = submit(
                &state,
                Submission::Events(EventBatch {
                    remote,
                    realm: String::new(),
                    items: vec![item],
                }),
            )
            .await;
            return Err(ApiError::new(400, rejection.reason.code(), rejection.message));
        }
    };
    let items = verify_request(raws, state.config.max_event_bytes, state.keys.clone()).await?;
    // An agent enrolled through another node a moment ago may not have reached this
    // node's view yet: before refusing it `unknown_agent`, read the control topic up to
    // its end (as the writer's own registry would already know it).
    let unknown = items.iter().any(|item| {
        item.outcome
            .as_ref()
            .is_ok_and(|verified| !state.view.knows(&verified.payload.agent))
    });
    if unknown {
        state.view.catch_up(CATCH_UP).await;
    }
    let count = items.len();
    let checked = items.into_iter().map(|item| state.view.check(item));
    let realms = realm_batches(&remote, checked);
    // Realms at once; a realm's batches one after another, each once the one before is
    // durable, so the writer takes an agent's events in request order.
    let answers = futures::future::join_all(realms.into_iter().map(|lane| async {
        let mut answers = Vec::with_capacity(lane.len());
        for (batch, indexes) in lane {
            let appended = submit(&state, Submission::Events(batch)).await;
            let failed = appended.is_err();
            answers.push((appended, indexes));
            if failed {
                break;
            }
        }
        answers
    }))
    .await;
    let mut verdicts: Vec<Option<Verdict>> = vec![None; count];
    for (appended, indexes) in answers.into_iter().flatten() {
        let appended = appended?;
        if appended.verdicts.len() != indexes.len() {
            return Err(ApiError::new(
                500,
                "internal",
                format!(
                    "the log writer answered {} verdicts for {} envelopes",
                    appended.verdicts.len(),
                    indexes.len()
                ),
            ));
        }
        for (mut verdict, index) in appended.verdicts.into_iter().zip(indexes) {
            verdict.index = index;
            verdicts[index] = Some(verdict);
        }
    }
    let verdicts: Vec<Verdict> = verdicts.into_iter().flatten().collect();
    for verdict in &verdicts {
        crate::sequencer::count(verdict);
    }
    Ok(answer_verdicts(&state.rejects, source, verdicts))
}

async fn revoke(
    State(state): State<EdgeState>,
    headers: HeaderMap,
    Path(did): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &[Role::Admin])?;
    let request = RevokeRequest::parse(&body)?;
    let realm = state
        .view
        .realm_of(&did)
        .ok_or_else(|| ApiError::new(404, "unknown_agent", format!("agent `{did}` is not enrolled")))?;
    let op = ControlOp::Revoke {
        agent: did.clone(),
        realm,
        by: format!("token:{}", caller.token_id),
        reason: request.reason,
    };
    let appended = submit(&state, Submission::Control(op)).await?;
    Ok(Json(serde_json::json!({ "agent": did, "log_indexes": appended.log_indexes })).into_response())
}

/// `POST /v1/agents` through an ingest node: the enrollment goes to the writer of the
/// realm's partition, which answers once it is durable. A platform agent's enrollment
/// (`source`) is passed on whole to that writer's node, which keeps the adapter's
/// enrollments and checks the admin token in its own table (as collector tokens are).
async fn enroll(
    State(state): State<EdgeState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Looks only at the two members, building nothing of the rest (the token is not
    // checked yet).
    #[derive(Deserialize)]
    struct Platform {
        source: Option<serde::de::IgnoredAny>,
        public_key: Option<serde::de::IgnoredAny>,
    }
    let platform =
        serde_json::from_slice::<Platform>(&body).is_ok_and(|peek| peek.source.is_some() || peek.public_key.is_some());
    if platform {
        return enroll_platform_agent(&state, remote, &headers, &body).await;
    }
    let caller = custos_http::authorize(&state.tokens, &headers, &[Role::Admin])?;
    let request = crate::http::EnrollRequest::parse(&body)?;
    // Read to the control topic's end first, so that an enrollment through another node
    // a moment ago (maybe in a realm of another partition, whose writer would not know
    // it) is refused here.
    state.view.catch_up(CATCH_UP).await;
    if let Some(realm) = state.view.realm_of(&request.did) {
        return Err(ApiError::new(
            409,
            "agent_exists",
            format!("agent `{}` is already enrolled in realm `{realm}`", request.did),
        ));
    }
    let op = ControlOp::Enroll {
        agent: request.did.clone(),
        realm: request.realm.clone(),
        labels: request.labels,
        by: format!("token:{}", caller.token_id),
    };
    let appended = submit(&state, Submission::Control(op)).await?;
    // Answered once this node's view has the agent too: its control record is on the
    // brokers then, so another ingest node that reads the topic to its end (as it does
    // before refusing an unknown signer) knows it as well.
    let deadline = Instant::now() + CATCH_UP;
    while !state.view.knows(&request.did) && Instant::now() < deadline {
        if !state
            .view
            .catch_up(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            break;
        }
        if !state.view.knows(&request.did) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "did": request.did,
            "realm": request.realm,
            "status": "active",
            "enroll_log_index": appended.log_indexes.first(),
        })),
    )
        .into_response())
}

/// The largest platform agent's enrollment an ingest node passes on (its token is
/// checked only by the writer's node).
const MAX_ENROLLMENT_BODY: usize = 16 << 10;

/// A platform agent's enrollment (`"source":"lastid"`), passed on to the writer of its
/// realm's partition; once it answers 201, this node places the agent's records there
/// at once (other ingest nodes learn it from the control topic).
async fn enroll_platform_agent(
    state: &EdgeState,
    remote: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let source = remote.ip();
    state.rejects.admit(source, "refused requests")?;
    if body.len() > MAX_ENROLLMENT_BODY {
        return Err(ApiError::new(
            413,
            "too_large",
            format!(
                "the enrollment holds {} bytes; a platform agent's enrollment (did, realm, source, \
                 public_key) is at most {MAX_ENROLLMENT_BODY}",
                body.len()
            ),
        ));
    }
    let Some(token_sha256) = custos_http::bearer_sha256(headers) else {
        state.rejects.charge(source, 1);
        return Err(ApiError::new(
            401,
            "unauthenticated",
            "send `Authorization: Bearer <token>` (an admin token of the log writer's node)",
        ));
    };
    let request = crate::http::EnrollRequest::parse(body)?;
    // Known in another realm (another partition's writer would not know it): refused
    // here, as a Custos agent the view knows is, so one LastID DID has one realm. The
    // view is read to the topic's end first: an enrollment through another node a
    // moment ago counts.
    state.view.catch_up(CATCH_UP).await;
    if let Some(realm) = state
        .view
        .lastid_realm(&request.did)
        .filter(|_| request.source.as_deref() == Some("lastid"))
    {
        return Err(ApiError::new(
            409,
            "agent_exists",
            format!("LastID agent `{}` is already enrolled in realm `{realm}`", request.did),
        ));
    }
    let reply = relay(
        state,
        custos_stage::AdapterRequest {
            route: "/v1/agents".into(),
            remote: remote.to_string(),
            headers: Vec::new(),
            token_sha256: Some(token_sha256),
            body: body.to_vec(),
            partition: None,
            realm: Some(request.realm.clone()),
        },
        source,
    )
    .await?;
    if reply.status == 201 && request.source.as_deref() == Some("lastid") {
        state.view.note_lastid(&request.did, &request.realm);
    }
    adapter_answer(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_event::{AgentKey, Signer};

    fn item(seed: u8) -> (String, Item) {
        let key = AgentKey::from_seed(&[seed; 32]);
        let did = key.did().to_owned();
        let mut signer = Signer::new(key, "eng");
        let envelope = signer
            .sign_object(
                serde_json::json!({"kind": "tool_call"}).as_object().unwrap().clone(),
                chrono::Utc::now(),
            )
            .unwrap();
        let raw = envelope.to_json().into_bytes();
        let outcome = custos_event::verify::check_event(envelope);
        let item = Item {
            raw,
            keyid: Some(did.clone()),
            outcome,
            refused: None,
            whole: None,
        };
        (did, item)
    }

    fn record(did: &str, status: &str, log_index: u64) -> Vec<u8> {
        serde_json::to_vec(
            &serde_json::json!({"v": 1, "type": "agent", "status": status, "agent": did,
            "realm": "eng", "log_index": log_index}),
        )
        .unwrap()
    }

    fn refused(code: &'static str, signed: bool) -> impl Fn(ItemCheck) -> bool {
        move |check| matches!(check, ItemCheck::Refused { code: c, signed: s, .. } if c == code && s == signed)
    }

    /// A catch-up is answered by a round asked for after it began, not by one already
    /// finished; without a reader it is not in time.
    #[tokio::test]
    async fn a_catch_up_waits_for_a_round_asked_after_it() {
        let view = Arc::new(ControlView::new());
        assert!(
            !view.catch_up(Duration::from_millis(20)).await,
            "no reader: not in time"
        );
        view.rounds_done(view.rounds_asked());
        let waiting = tokio::spawn({
            let view = view.clone();
            async move { view.catch_up(Duration::from_secs(30)).await }
        });
        while view.rounds_asked() < 2 {
            tokio::task::yield_now().await;
        }
        view.rounds_done(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "the round done before it was asked does not count"
        );
        view.rounds_done(2);
        assert!(waiting.await.unwrap());
    }

    #[test]
    fn the_view_follows_the_control_topic() {
        let view = ControlView::new();
        let (did, _) = item(1);
        let check = |seed| view.check(item(seed).1).0.check;
        assert!(refused("unknown_agent", false)(check(1)));
        view.apply(&format!("agent:{did}"), &record(&did, "active", 3));
        assert_eq!(check(1), ItemCheck::Verified);
        // A revocation: refused here, and marked signed so the writer shows the detector.
        view.apply(&format!("agent:{did}"), &record(&did, "revoked", 9));
        let revoked = check(1);
        assert!(refused("revoked_agent", true)(revoked.clone()), "{revoked:?}");
        assert!(matches!(revoked, ItemCheck::Refused { message, .. } if message.contains("log index 9")));
        // Other subjects and malformed values change nothing.
        view.apply(&format!("agent:{did}"), b"{not json");
        view.apply("memory:m-1", &record(&did, "active", 10));
        assert!(refused("revoked_agent", true)(check(1)));
        view.apply(&format!("agent:{did}"), &record(&did, "active", 11));
        assert_eq!(check(1), ItemCheck::Verified, "reinstated");
        // An item that failed its signature stays refused with its own reason.
        let (_, mut bad) = item(1);
        bad.outcome = Err(custos_event::Rejection::new(Reason::BadSignature, "bad"));
        assert!(refused("bad_signature", false)(view.check(bad).0.check));
    }

    /// Every submission a request becomes, and its receipt, fits one broker record (the
    /// 1 000 000 bytes a Kafka client sends by default), whatever the request holds:
    /// many tiny refused items with long messages, the largest envelopes a cluster node
    /// takes, or one huge refused line; and the request indexes come back in order.
    #[test]
    fn every_submission_and_its_receipt_fit_one_broker_record() {
        let refused = |raw: Vec<u8>| EventItem {
            raw,
            keyid: None,
            check: ItemCheck::Refused {
                code: "malformed".into(),
                message: "m".repeat(300),
                signed: false,
                whole: None,
            },
        };
        let verified = |raw: Vec<u8>| EventItem {
            raw,
            keyid: Some(format!("did:key:z6Mk{}", "a".repeat(44))),
            check: ItemCheck::Verified,
        };
        let mut checked: Vec<(EventItem, String)> = Vec::new();
        checked.extend((0..10_000).map(|_| (refused(b"x".to_vec()), String::new())));
        let largest = custos_stage::kafka::MAX_EVENT_BYTES;
        checked.extend((0..12).map(|_| (verified(vec![b'e'; largest]), "eng".to_owned())));
        checked.push((refused(vec![b'z'; 2 << 20]), String::new()));
        checked.extend((0..3000).map(|_| (verified(vec![b'o'; 300]), "ops".to_owned())));
        let total = checked.len();
        let realms = realm_batches("192.0.2.1:4000", checked.into_iter());
        assert_eq!(realms.len(), 3, "one lane per realm");
        let mut seen = Vec::new();
        for lane in &realms {
            let mut last = None;
            for (batch, indexes) in lane {
                assert_eq!(batch.items.len(), indexes.len());
                // A realm's items keep request order across its batches.
                assert!(indexes.windows(2).all(|pair| pair[0] < pair[1]));
                assert!(last < indexes.first().copied());
                last = indexes.last().copied();
                seen.extend(indexes.iter().copied());
                let bytes =
                    custos_stage::wire::encode_submission("origin", 1, &Submission::Events(batch.clone())).unwrap();
                assert!(bytes.len() < 1_000_000, "a submission of {} bytes", bytes.len());
                let verdicts = indexes
                    .iter()
                    .map(|&index| Verdict::rejected(index, "malformed", "m".repeat(300)))
                    .collect();
                let appended = custos_stage::Appended {
                    log_indexes: Vec::new(),
                    verdicts,
                    reply: None,
                    route_to: None,
                };
                let receipt = custos_stage::wire::encode_receipt("origin", 1, Ok(appended)).unwrap();
                assert!(receipt.len() < 1_000_000, "a receipt of {} bytes", receipt.len());
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..total).collect::<Vec<_>>(), "every item in exactly one batch");
        let huge = realms[0]
            .iter()
            .flat_map(|(batch, _)| &batch.items)
            .map(|item| item.raw.len())
            .max();
        assert_eq!(huge, Some(REFUSED_RAW_BYTES), "a huge refused line travels cut");
    }

    /// LastID agents' realms come from `lastid:` control records (a record about another
    /// subject than its key is skipped), and a batch is split by their partitions, each
    /// record's bytes kept as they came, batch order kept within each part.
    #[test]
    fn a_lastid_batch_is_split_by_its_agents_partitions() {
        let view = ControlView::new();
        let (key, value) = crate::registry::lastid_record("did:lastid:agent:a", "ops");
        view.apply(&key, &value);
        let (_, value) = crate::registry::lastid_record("did:lastid:agent:b", "eng");
        view.apply("lastid:did:lastid:agent:b", &value);
        view.apply("lastid:did:lastid:agent:c", &value);
        assert_eq!(view.lastid_realm("did:lastid:agent:a").as_deref(), Some("ops"));
        assert_eq!(view.lastid_realm("did:lastid:agent:b").as_deref(), Some("eng"));
        assert_eq!(view.lastid_realm("did:lastid:agent:c"), None, "key and value disagree");
        let body = br#"{"records":[{"agent_did":"did:lastid:agent:a","seq":0},
            {"agent_did":"did:lastid:agent:b" , "seq":0},{"agent_did":"did:lastid:agent:z"},[1],
            {"agent_did":"did:lastid:agent:a","seq":1}]}"#;
        // A count of partitions that puts the two realms on different ones.
        let partitions = (2..)
            .find(|count| custos_event::partition_of("ops", *count) != custos_event::partition_of("eng", *count))
            .unwrap();
        let parts = lastid_parts(&view, body, 10, partitions).unwrap();
        let shown: Vec<(Option<&str>, &[usize], &str)> = parts
            .iter()
            .map(|part| {
                (
                    part.realm.as_deref(),
                    part.indexes.as_slice(),
                    std::str::from_utf8(&part.body).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    Some("ops"),
                    &[0, 4][..],
                    r#"{"records":[{"agent_did":"did:lastid:agent:a","seq":0},{"agent_did":"did:lastid:agent:a","seq":1}]}"#
                ),
                (
                    Some("eng"),
                    &[1][..],
                    r#"{"records":[{"agent_did":"did:lastid:agent:b" , "seq":0}]}"#
                ),
                (
                    None,
                    &[2, 3][..],
                    r#"{"records":[{"agent_did":"did:lastid:agent:z"},[1]]}"#
                ),
            ]
        );
        // Realms of one partition make one part, placed by its first record's realm.
        let one = lastid_parts(&view, body, 10, 1).unwrap();
        let shown: Vec<(Option<&str>, &[usize])> = one
            .iter()
            .map(|part| (part.realm.as_deref(), part.indexes.as_slice()))
            .collect();
        assert_eq!(shown, [(Some("ops"), &[0, 1, 4][..]), (None, &[2, 3][..])]);
        // Passed on whole: more records than the limit, or not a batch at all.
        assert_eq!(lastid_parts(&view, body, 4, partitions), None);
        assert_eq!(lastid_parts(&view, b"{\"records\":{}}", 10, partitions), None);
        let empty = lastid_parts(&view, br#"{"records":[]}"#, 10, partitions).unwrap();
        assert_eq!((empty.len(), empty[0].realm.as_ref()), (1, None));
    }

    /// A split batch is answered in batch order from its parts' verdicts; a part not
    /// answered 200 answers the request as it is (the first such); a part answering
    /// other records than it holds is a bad writer reply.
    #[test]
    fn a_split_lastid_batch_is_answered_in_batch_order() {
        let verdicts = |statuses: &[&str]| {
            let verdicts: Vec<serde_json::Value> = statuses
                .iter()
                .enumerate()
                .map(|(index, status)| serde_json::json!({"index": index, "status": status, "log_index": null}))
                .collect();
            custos_stage::AdapterReply::new(
                200,
                "application/json".into(),
                &serde_json::to_vec(&verdicts).unwrap(),
                None,
            )
        };
        let busy = custos_stage::AdapterReply::new(503, "application/json".into(), b"{}", Some(1));
        let answered = merge_lastid_answers(vec![
            (vec![0, 3], Ok(verdicts(&["accepted", "duplicate"]))),
            (vec![1, 2], Ok(verdicts(&["rejected", "accepted"]))),
        ])
        .unwrap()
        .unwrap();
        let shown: Vec<(usize, custos_stage::Status)> =
            answered.iter().map(|verdict| (verdict.index, verdict.status)).collect();
        assert_eq!(
            shown,
            [
                (0, custos_stage::Status::Accepted),
                (1, custos_stage::Status::Rejected),
                (2, custos_stage::Status::Accepted),
                (3, custos_stage::Status::Duplicate)
            ]
        );
        let first_failure = merge_lastid_answers(vec![
            (vec![0], Ok(verdicts(&["accepted"]))),
            (vec![1], Ok(busy.clone())),
            (vec![2], Err(ApiError::new(503, "writer_unavailable", "away"))),
        ])
        .unwrap()
        .unwrap_err();
        assert_eq!(first_failure, busy);
        let error = merge_lastid_answers(vec![(vec![0, 1], Ok(verdicts(&["accepted"])))]).unwrap_err();
        assert_eq!(error.error, "bad_writer_reply");
    }
}
