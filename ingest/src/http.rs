//! HTTP routes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use custos_event::verify::{check_event, decode_envelope_cached};
use custos_event::{EVENT_PAYLOAD_TYPE, KeyCache, Reason, Rejection, verify_signatures};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::NodeConfig;
use crate::sequencer::{Command, ErrorKind, Item, WriterError};
use custos_http::openapi::Endpoint;
use custos_http::{ApiError, EVERYONE, READERS, guarded, metrics_answer};
use custos_http::{Caller, Role, Tokens};

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) tokens: Arc<std::sync::RwLock<Tokens>>,
    pub(crate) config: Arc<NodeConfig>,
    pub(crate) ready: Arc<AtomicBool>,
    pub(crate) keys: Arc<KeyCache>,
    pub(crate) changes: tokio::sync::broadcast::Sender<crate::StatusChange>,
    pub(crate) operations: Option<Arc<dyn crate::Operations>>,
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    pub(crate) rejects: Arc<custos_http::serve::RejectLimiter>,
    /// The witnesses' latest cosignatures.
    pub(crate) cosigned: crate::witness::Cosigned,
    /// The adapters' keys, by (source, adapter name), opened on first use.
    pub(crate) attestors: crate::attest::Attestors,
    /// The LastID adapter's enrollments and chains.
    pub(crate) lastid: Arc<crate::lastid::LastId>,
    /// The VaultysClaw adapter, when configured.
    pub(crate) vaultysclaw: Option<Arc<crate::vaultysclaw::VaultysClaw>>,
    /// On a writer bridged to Kafka: how far its control records are on the brokers.
    pub(crate) published: Option<tokio::sync::watch::Receiver<crate::registry::Published>>,
}

/// Waits at most `within` until `reached` holds of what `watch` holds, and counts the
/// wait in `outcomes` as `in_time` or `late`; `true` when in time.
pub(crate) async fn counted_wait<T>(
    watch: &mut tokio::sync::watch::Receiver<T>,
    within: std::time::Duration,
    reached: impl FnMut(&T) -> bool,
    outcomes: &prometheus::IntCounterVec,
) -> bool {
    let in_time = matches!(tokio::time::timeout(within, watch.wait_for(reached)).await, Ok(Ok(_)));
    outcomes
        .with_label_values(&[if in_time { "in_time" } else { "late" }])
        .inc();
    in_time
}

impl AppState {
    /// On a writer bridged to Kafka, waits (at most [`crate::registry::PUBLISH_WAIT`])
    /// until `reached` holds of its published control records: until a change this
    /// request made is on the control topic, where ingest nodes read it. At once
    /// elsewhere.
    pub(crate) async fn published(&self, reached: impl Fn(&crate::registry::Published) -> bool) {
        let Some(published) = &self.published else {
            return;
        };
        let in_time = counted_wait(
            &mut published.clone(),
            crate::registry::PUBLISH_WAIT,
            reached,
            &custos_http::metrics::CONTROL_WAITS,
        )
        .await;
        if !in_time {
            tracing::warn!("a control record did not reach the brokers in time; answering anyway");
        }
    }

    /// The attestor of adapter `name` of `source`, opened (its root key made) on first use.
    pub(crate) fn attestor(
        &self,
        source: &'static str,
        name: &str,
        realm: &str,
    ) -> Result<Arc<crate::attest::Attestor>, ApiError> {
        let mut attestors = self.attestors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(attestor) = attestors.get(&(source.to_owned(), name.to_owned())) {
            return Ok(attestor.clone());
        }
        let attestor = Arc::new(crate::attest::Attestor::open(&self.config.data, source, name, realm)?);
        attestors.insert((source.to_owned(), name.to_owned()), attestor.clone());
        Ok(attestor)
    }
}

/// Every route of the node's own API, declared once: served by [`router`] and described
/// by `GET /openapi.json`.
pub(crate) fn endpoints() -> Vec<(Endpoint, MethodRouter<AppState>)> {
    const ADMIN: &[Role] = &[Role::Admin];
    const DECIDERS: &[Role] = &[Role::Admin, Role::Responder];
    const REJECTED: &[(&str, &str)] = &[
        ("reason", "only this reason code (docs/reason-codes.md)"),
        ("limit", "most items to return (default 100, at most 10000)"),
    ];
    const AGENTS: &[(&str, &str)] = &[
        ("realm", "realm name"),
        ("status", "active, quarantined or revoked"),
        ("parent", "sub-agents of this did:key"),
        ("after", "cursor: agents enrolled at a larger log index"),
        ("limit", "most agents to return (default 1000, at most 100000)"),
    ];
    const FINDINGS: &[(&str, &str)] = &[
        ("agent", "the agent's did:key"),
        ("realm", "realm name"),
        ("severity", "low, medium, high or critical: that severity or above"),
        ("type", "the finding type"),
        ("from", "RFC 3339, inclusive"),
        ("to", "RFC 3339, exclusive"),
        ("before", "cursor, newest first: items with a smaller log index"),
        ("after", "cursor, oldest first: items with a larger log index"),
        ("limit", "most items to return (default 100, at most 10000)"),
    ];
    const ACTIONS: &[(&str, &str)] = &[
        ("agent", "the agent's did:key"),
        ("realm", "realm name"),
        ("action", "the action name"),
        ("status", "executed, pending, denied, …"),
        ("from", "RFC 3339, inclusive"),
        ("to", "RFC 3339, exclusive"),
        ("before", "cursor, newest first: items with a smaller log index"),
        ("after", "cursor, oldest first: items with a larger log index"),
        ("limit", "most items to return (default 100, at most 10000)"),
    ];
    let agent_example = r#"{"did":"did:key:z6Mk…","realm":"eng","labels":{"team":"payments"},"parent":null}"#;
    vec![
        (
            Endpoint::new("GET", "/healthz", "health", "Liveness: 200 while the process runs").answer(200, "text/plain"),
            get(|| async { "ok\n" }),
        ),
        (
            Endpoint::new("GET", "/readyz", "health", "Readiness: 200 once the store is recovered and writable, else 503")
                .answer(200, "text/plain"),
            get(readyz),
        ),
        (
            Endpoint::new("GET", "/metrics", "operations", "Prometheus metrics (docs/metrics.md)")
                .roles(&EVERYONE)
                .answer(200, "text/plain"),
            get(metrics),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/events",
                "ingest",
                "Ingest DSSE envelopes (JSON array or NDJSON); authenticated by each envelope's signature",
            )
                .returns("ItemResults")
                .errors(&[429])
            .body("application/json", r#"[{"payloadType":"application/vnd.custos.event+json","payload":"<base64>","signatures":[{"keyid":"did:key:z6Mk…","sig":"<base64>"}]}]"#),
            post(post_events),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/traces",
                "ingest",
                "OTLP/HTTP traces (protobuf or JSON, gzip or plain) from a collector: GenAI spans become events attested by the collector's enrolled key (docs/integrations.md)",
            )
                .returns("Record")
                .errors(&[413, 415])
                .roles(&[Role::Collector])
                .body("application/json", r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"planner"}}]},"scopeSpans":[{"spans":[{"traceId":"4bf92f3577b34da6a3ce929d0e0e4736","spanId":"00f067aa0ba902b7","name":"chat","kind":3,"startTimeUnixNano":"1768469400000000000","endTimeUnixNano":"1768469400250000000","attributes":[{"key":"gen_ai.operation.name","value":{"stringValue":"chat"}}]}]}]}]}"#),
            post(crate::otlp::post_traces),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/adapters/lastid/audit",
                "ingest",
                "LastID audit records ({\"records\":[…]}): each verified by LastID's rules (integrity hash, signature, chain) and kept as an attested event; authenticated by each record's signature",
            )
                .returns("ItemResults")
                .errors(&[413, 429])
                .body("application/json", r#"{"records":[{"seq":0,"timestamp":"2026-12-04T10:00:00Z","agent_did":"did:lastid:agent:7f3a","event_type":"AgentToolInvoked","memory_id":null,"metadata":{"tool":"search"},"prev_hash":null,"integrity_hash":"<blake3 hex>","signature":"<base64>"}]}"#),
            post(crate::lastid::post_audit),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/adapters/vaultysclaw/webhook",
                "ingest",
                "VaultysClaw webhook deliveries ({event, occurredAt, data}); authenticated by X-VaultysClaw-Signature (HMAC-SHA256 of timestamp.body), refused outside a 5-minute window, deduplicated by X-VaultysClaw-Delivery",
            )
                .returns("Record")
                .errors(&[404, 429])
                .body("application/json", r#"{"event":"intent.completed","occurredAt":"2026-12-04T10:00:00Z","data":{"intentId":"i-1","agentDid":"did:vc:agent:1","action":"http.get","params":{"url":"https://example.com"},"status":"completed"}}"#),
            post(crate::vaultysclaw::post_webhook),
        ),
        (
            Endpoint::new("POST", "/v1/agents", "agents", "Enroll an agent key in a realm")
                .returns("Agent")
                .errors(&[409])
                .roles(ADMIN)
                .body("application/json", agent_example)
                .answer(201, "application/json"),
            post(enroll),
        ),
        (
            Endpoint::new("GET", "/v1/agents", "agents", "Every enrolled agent the token's realms include")
                .returns("AgentPage")
                .roles(&READERS)
                .query(AGENTS),
            get(list_agents),
        ),
        (
            Endpoint::new("GET", "/v1/agents/{did}", "agents", "One agent: status, parent, children, activity")
                .returns("Agent").roles(&READERS),
            get(get_agent),
        ),
        (
            Endpoint::new("POST", "/v1/agents/{did}/revoke", "agents", "Revoke an agent and its sub-agents")
                .returns("Revoked")
                .errors(&[409])
                .roles(ADMIN)
                .body("application/json", r#"{"reason":"key leaked"}"#),
            post(revoke),
        ),
        (
            Endpoint::new("GET", "/v1/rejected", "ingest", "Rejected inputs kept for forensics")
                .returns("Rejected")
                .roles(ADMIN)
                .query(REJECTED),
            get(rejected),
        ),
        (
            Endpoint::new("GET", "/v1/checkpoints/latest", "proofs", "The latest signed C2SP checkpoint")
                .returns("Checkpoint").roles(&EVERYONE),
            get(checkpoint),
        ),
        (
            Endpoint::new("GET", "/v1/proofs/inclusion", "proofs", "RFC 9162 inclusion proof of a log entry")
                .returns("InclusionProof")
                .roles(&EVERYONE)
                .query(&[("log_index", "the entry"), ("size", "tree size (default: the latest checkpoint)")]),
            get(inclusion),
        ),
        (
            Endpoint::new("GET", "/v1/proofs/consistency", "proofs", "RFC 9162 consistency proof between two tree sizes")
                .returns("ConsistencyProof")
                .roles(&EVERYONE)
                .query(&[("from", "the smaller tree size"), ("to", "the larger tree size")]),
            get(consistency),
        ),
        (
            Endpoint::new(
                "GET",
                "/v1/control/revocations",
                "control",
                "The signed revocation and quarantine list (DSSE), for agent platforms",
            )
                .returns("Envelope")
            .roles(&READERS),
            get(revocations),
        ),
        (
            Endpoint::new("GET", "/v1/control/stream", "control", "Server-sent status changes (revoked, quarantined, …)")
                .roles(&READERS)
                .answer(200, "text/event-stream"),
            get(control_stream),
        ),
        (
            Endpoint::new("GET", "/v1/memories/{id}/status", "control", "Whether a memory is quarantined")
                .returns("MemoryStatus").roles(&READERS),
            get(memory_status),
        ),
        (
            Endpoint::new("GET", "/v1/findings", "response", "Recent findings")
                .returns("FindingPage")
                .roles(&READERS)
                .query(FINDINGS),
            get(findings),
        ),
        (
            Endpoint::new("GET", "/v1/actions", "response", "Recent response actions and pending approvals")
                .returns("ActionPage")
                .roles(&READERS)
                .query(ACTIONS),
            get(actions),
        ),
        (
            Endpoint::new("POST", "/v1/actions/{id}/undo", "response", "Undo an action (through approval when the playbook says so)")
                .returns("Record")
                .errors(&[409])
                .roles(DECIDERS)
                .answer(202, "application/json"),
            post(undo),
        ),
        (
            Endpoint::new("GET", "/v1/approvals", "response", "Approvals waiting for a decision")
                .returns("Approvals").roles(&READERS),
            get(approvals),
        ),
        (
            Endpoint::new("POST", "/v1/approvals/{id}/approve", "response", "Approve: the playbook's remaining actions run")
                .returns("Record")
                .errors(&[409])
                .roles(DECIDERS),
            post(approve),
        ),
        (
            Endpoint::new("POST", "/v1/approvals/{id}/deny", "response", "Deny: nothing more runs")
                .returns("Record")
                .errors(&[409]).roles(DECIDERS),
            post(deny),
        ),
        (
            Endpoint::new("GET", "/v1/playbooks", "response", "Playbooks, their caps, and the realms where a cap paused them")
                .returns("Playbooks")
                .roles(&READERS),
            get(playbooks),
        ),
        (
            Endpoint::new(
                "POST",
                "/v1/playbooks/{name}/resume",
                "response",
                "Resume a playbook a cap paused in a realm; the resume is recorded in the log",
            )
                .returns("Record")
                .errors(&[409])
            .roles(DECIDERS)
            .body("application/json", r#"{"realm":"eng"}"#),
            post(resume_playbook),
        ),
    ]
}

/// The node's own endpoints, for the OpenAPI document.
pub fn catalogue() -> Vec<Endpoint> {
    let mut all: Vec<Endpoint> = endpoints().into_iter().map(|(endpoint, _)| endpoint).collect();
    all.extend(custos_http::tokens::catalogue());
    all
}

pub(crate) fn router(state: AppState) -> Router {
    let limit = state.config.max_request_bytes;
    let tokens = state.tokens.clone();
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, (endpoint, method)| {
            router.route(endpoint.path, guarded(&endpoint, method, &tokens))
        })
        .with_state(state)
        .merge(custos_http::tokens::router(&tokens))
        .layer(DefaultBodyLimit::max(limit))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// Authenticates the bearer token and checks its role.
pub(crate) fn authorize(state: &AppState, headers: &HeaderMap, allowed: &[Role]) -> Result<Caller, ApiError> {
    custos_http::authorize(&state.tokens, headers, allowed)
}

pub(crate) async fn ask<T>(
    state: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, WriterError>>) -> Command,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    state.commands.send(make(reply)).map_err(|_| WriterError::stopping())?;
    Ok(answer.await.map_err(|_| WriterError::stopping())??)
}

/// The writer's refusals as HTTP answers: the status is chosen here, at the edge.
impl From<WriterError> for ApiError {
    fn from(error: WriterError) -> Self {
        let status = match error.kind {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        };
        ApiError::new(status, error.code, error.message)
    }
}

/// Splits a body into envelopes: a JSON array, or NDJSON (one envelope per line).
fn split_body(body: &[u8]) -> Result<Vec<Vec<u8>>, Rejection> {
    let trimmed = body.trim_ascii_start();
    if trimmed.first() == Some(&b'[') {
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(trimmed).map_err(|error| {
            Rejection::new(
                Reason::Malformed,
                format!("body starts with `[` but is not a JSON array: {error}"),
            )
        })?;
        return Ok(items.into_iter().map(|item| item.get().as_bytes().to_vec()).collect());
    }
    Ok(body
        .split(|byte| *byte == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Decode, size limit, batch signature check, payload parse: the CPU-bound part.
fn prestage(raws: Vec<Vec<u8>>, max_event_bytes: usize, keys: &KeyCache) -> Vec<Item> {
    let decoded: Vec<_> = raws
        .iter()
        .map(|raw| decode_envelope_cached(raw, max_event_bytes, &[EVENT_PAYLOAD_TYPE], Some(keys)))
        .collect();
    let to_check: Vec<(&custos_event::VerifyingKey, &custos_event::Envelope)> = decoded
        .iter()
        .filter_map(|result| result.as_ref().ok())
        .map(|decoded| (&decoded.key, &decoded.envelope))
        .collect();
    let mut signatures = verify_signatures(&to_check).into_iter();
    raws.into_iter()
        .zip(decoded)
        .map(|(raw, decoded)| {
            let keyid = decoded.as_ref().ok().map(|decoded| decoded.envelope.keyid.clone());
            let outcome = decoded.and_then(|decoded| {
                signatures.next().unwrap_or(Ok(()))?;
                check_event(decoded.envelope)
            });
            Item {
                raw,
                keyid,
                outcome,
                refused: None,
                whole: None,
            }
        })
        .collect()
}

/// The checks of `POST /v1/events` before any envelope is decoded: the per-source limit
/// on unauthenticated input (429), the split into envelopes, their count (413). A body
/// that cannot be split is answered as `Ok(Err(rejection))`: the caller keeps it for
/// forensics and answers 400.
pub(crate) fn split_request(
    rejects: &custos_http::serve::RejectLimiter,
    config: &NodeConfig,
    source: std::net::IpAddr,
    body: &[u8],
) -> Result<Result<Vec<Vec<u8>>, Rejection>, ApiError> {
    if let Err(seconds) = rejects.check(source) {
        custos_http::metrics::RATE_LIMITED.inc();
        return Err(ApiError::new(
            429,
            "rate_limited",
            format!(
                "{source} sent more unauthenticated input (bad signatures, unknown keys, malformed envelopes) than the {} per second allowed; retry in {seconds} s",
                config.reject_rate_per_sec
            ),
        )
        .retry_after(seconds));
    }
    let raws = match split_body(body) {
        Ok(raws) => raws,
        Err(rejection) => {
            rejects.charge(source, 1);
            return Ok(Err(rejection));
        }
    };
    if raws.len() > config.max_events_per_request {
        return Err(ApiError::new(
            413,
            "too_many_events",
            format!(
                "request holds {} envelopes; the limit is {}",
                raws.len(),
                config.max_events_per_request
            ),
        ));
    }
    Ok(Ok(raws))
}

/// Decodes and verifies a request's envelopes (one batch signature check).
pub(crate) async fn verify_request(
    raws: Vec<Vec<u8>>,
    max_event_bytes: usize,
    keys: Arc<KeyCache>,
) -> Result<Vec<Item>, ApiError> {
    // On the rayon pool rather than tokio's blocking pool: a fixed thread per core does
    // all the decoding and verifying, so its allocator keeps reusing warm memory instead
    // of each of a changing set of blocking threads faulting in fresh pages.
    let (sender, receiver) = oneshot::channel();
    rayon::spawn(move || {
        let _timer = custos_http::metrics::VERIFY_SECONDS.start_timer();
        // A panic on a rayon thread would abort the process; caught, it drops `sender` and
        // the request fails alone.
        let staged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prestage(raws, max_event_bytes, &keys)));
        if let Ok(items) = staged {
            let _ = sender.send(items);
        }
    });
    receiver
        .await
        .map_err(|_| ApiError::new(500, "internal", "the verify task ended without an answer"))
}

async fn post_events(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let source = remote.ip();
    let remote = remote.to_string();
    let raws = match split_request(&state.rejects, &state.config, source, &body)? {
        Ok(raws) => raws,
        Err(rejection) => {
            let _ = keep_rejected(&state, &rejection, &body, &remote).await;
            return Err(ApiError::new(400, rejection.reason.code(), rejection.message));
        }
    };
    let results = ingest_raws(&state, raws, remote).await?;
    Ok(answer_verdicts(&state.rejects, source, results))
}

/// Verifies envelopes and hands them to the writer: one verdict per envelope, in order
/// (`POST /v1/events`, and the adapters' attested events).
pub(crate) async fn ingest_raws(
    state: &AppState,
    raws: Vec<Vec<u8>>,
    remote: String,
) -> Result<Vec<custos_stage::Verdict>, ApiError> {
    let items = verify_request(raws, state.config.max_event_bytes, state.keys.clone()).await?;
    let remote_for_refusals = remote.clone();
    let ingested = ask(state, |reply| Command::Ingest { items, remote, reply }).await?;
    let mut results = ingested.results;
    if !ingested.lookups.is_empty() {
        let resolved = tokio::task::spawn_blocking(move || {
            ingested
                .lookups
                .into_iter()
                .map(crate::lookup::resolve)
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await
        .map_err(|error| ApiError::new(500, "internal", format!("the lookup task failed: {error}")))??;
        let mut refusals = Vec::new();
        for (result, refusal) in resolved {
            crate::sequencer::count(&result);
            if let Some(slot) = results.get_mut(result.index) {
                *slot = result;
            }
            refusals.extend(refusal);
        }
        if !refusals.is_empty() {
            ask(state, |reply| Command::Refusals {
                refusals,
                remote: remote_for_refusals,
                reply,
            })
            .await?;
        }
    }
    Ok(results)
}

/// The answer to `POST /v1/events`: charges the sender for the items no enrolled key
/// vouched for, and lists the verdicts.
pub(crate) fn answer_verdicts(
    rejects: &custos_http::serve::RejectLimiter,
    source: std::net::IpAddr,
    verdicts: Vec<custos_stage::Verdict>,
) -> Response {
    let unauthenticated = verdicts
        .iter()
        .filter(|verdict| verdict.reason.as_deref().is_some_and(unauthenticated))
        .count();
    rejects.charge(source, unauthenticated);
    Json(verdicts).into_response()
}

/// Rejections of input that no enrolled agent's key vouched for: what an anonymous
/// sender can produce, and what the per-source limit counts.
fn unauthenticated(reason: &str) -> bool {
    !matches!(
        reason,
        "revoked_agent" | "realm_mismatch" | "clock_skew" | "chain_fork" | "chain_broken" | "replay"
    )
}

/// Keeps a refused input for forensics, with its reason: a request body that cannot
/// be split, or what an adapter refused (a LastID record, a webhook delivery, an OTLP
/// body). The sequencer gets at most the bytes a record keeps, with the whole input's
/// size and blake3 when that is less than all of it.
pub(crate) async fn keep_rejected(
    state: &AppState,
    rejection: &Rejection,
    raw: &[u8],
    remote: &str,
) -> Result<(), ApiError> {
    let kept = raw.len().min(custos_store::forensics::MAX_KEPT_BYTES);
    let item = Item {
        raw: raw[..kept].to_vec(),
        keyid: None,
        outcome: Err(rejection.clone()),
        refused: None,
        whole: (kept < raw.len()).then(|| custos_stage::WholeInput::of(raw)),
    };
    let remote = remote.to_owned();
    ask(state, |reply| Command::Ingest {
        items: vec![item],
        remote,
        reply,
    })
    .await
    .map(|_| ())
}

/// The body of `POST /v1/agents`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnrollRequest {
    pub did: String,
    pub realm: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `lastid`: a LastID agent, whose records the LastID adapter verifies.
    #[serde(default)]
    pub source: Option<String>,
    /// The agent's ed25519 key (hex or base64), for identifiers that do not carry it.
    #[serde(default)]
    pub public_key: Option<String>,
}

impl EnrollRequest {
    pub(crate) fn parse(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|error| {
            ApiError::new(
                400,
                "bad_request",
                format!("expected {{\"did\",\"realm\",\"labels\"}}: {error}"),
            )
        })
    }
}

async fn enroll(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &[Role::Admin])?;
    let request = EnrollRequest::parse(&body)?;
    enroll_as(&state, &caller, request).await
}

/// `POST /v1/agents` for an admin `caller` (authenticated here, or by its token's hash
/// when an ingest node passed a platform agent's enrollment on).
pub(crate) async fn enroll_as(state: &AppState, caller: &Caller, request: EnrollRequest) -> Result<Response, ApiError> {
    match request.source.as_deref() {
        Some("lastid") if !request.labels.is_empty() => {
            return Err(ApiError::new(
                400,
                "bad_request",
                "labels go on Custos agents; a LastID agent's enrollment takes did, realm, source and public_key",
            ));
        }
        Some("lastid") => {
            return crate::lastid::enroll(state, &request.did, &request.realm, request.public_key.as_deref()).await;
        }
        Some(other) => {
            return Err(ApiError::new(
                400,
                "bad_source",
                format!(
                    "source `{other}` is not one Custos verifies records of (lastid); omit it for a Custos agent key"
                ),
            ));
        }
        None if request.public_key.is_some() => {
            return Err(ApiError::new(
                400,
                "bad_public_key",
                "a Custos agent's key is its did:key; public_key goes with a source (lastid)",
            ));
        }
        None => {}
    }
    let by = format!("token:{}", caller.token_id);
    let record = ask(state, |reply| Command::Enroll {
        did: request.did,
        realm: request.realm,
        labels: request.labels,
        by,
        reply,
    })
    .await?;
    // Answered once ingest nodes can learn the agent: its first events may go to any.
    let index = record.enroll_log_index;
    state.published(|published| published.entries > index).await;
    Ok((StatusCode::CREATED, Json(record)).into_response())
}

fn visible(caller: &Caller, realm: &str) -> bool {
    caller.realms.is_empty() || caller.realms.iter().any(|allowed| allowed == realm)
}

/// Filters and cursor of `GET /v1/agents`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AgentsQuery {
    realm: Option<String>,
    /// active, quarantined, revoked.
    status: Option<String>,
    /// Sub-agents of this `did:key`.
    parent: Option<String>,
    /// Cursor: agents enrolled at a larger log index.
    after: Option<u64>,
    limit: Option<usize>,
}

async fn list_agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<AgentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let Query(query) = query.map_err(|error| {
        ApiError::new(
            400,
            "bad_request",
            format!("{error}; filters are realm, status, parent, after, limit"),
        )
    })?;
    let limit = query.limit.unwrap_or(1_000).clamp(1, 100_000);
    let mut agents: Vec<_> = ask(&state, |reply| Command::Agents { reply })
        .await?
        .into_iter()
        .filter(|agent| visible(&caller, &agent.realm))
        .filter(|agent| query.realm.as_ref().is_none_or(|realm| &agent.realm == realm))
        .filter(|agent| {
            query
                .parent
                .as_ref()
                .is_none_or(|parent| agent.parent.as_ref() == Some(parent))
        })
        .filter(|agent| query.after.is_none_or(|after| agent.enroll_log_index > after))
        .map(|agent| serde_json::to_value(agent).unwrap_or_default())
        .filter(|agent| {
            query
                .status
                .as_ref()
                .is_none_or(|status| agent["status"] == status.as_str())
        })
        .collect();
    agents.sort_by_key(|agent| agent["enroll_log_index"].as_u64());
    let full = agents.len() > limit;
    agents.truncate(limit);
    let next = if full {
        agents.last().and_then(|agent| agent["enroll_log_index"].as_u64())
    } else {
        None
    };
    Ok(Json(serde_json::json!({ "agents": agents, "next": next })).into_response())
}

/// One agent, with its recent findings and actions when the node runs the detector.
async fn get_agent(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(did): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let agents = ask(&state, |reply| Command::Agents { reply }).await?;
    let agent = agents
        .into_iter()
        .find(|agent| agent.did == did && visible(&caller, &agent.realm))
        .ok_or_else(|| ApiError::new(404, "unknown_agent", format!("agent `{did}` is not enrolled")))?;
    let mut page = serde_json::to_value(&agent).map_err(|error| ApiError::new(500, "internal", error.to_string()))?;
    if let Some(operations) = state.operations.as_ref() {
        let mine = |items: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
            items
                .into_iter()
                .filter(|item| item["agent"] == did.as_str())
                .take(20)
                .collect()
        };
        page["recent_findings"] = serde_json::json!(mine(operations.findings(&caller.realms, ALL)));
        page["recent_actions"] = serde_json::json!(mine(operations.actions(&caller.realms, ALL)));
        page["baseline"] = operations.baseline(&did).unwrap_or(serde_json::Value::Null);
    }
    Ok(Json(page).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeRequest {
    pub(crate) reason: Option<String>,
}

impl RevokeRequest {
    /// `{"reason"}`, or an empty body.
    pub(crate) fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.trim_ascii().is_empty() {
            return Ok(Self::default());
        }
        serde_json::from_slice(body)
            .map_err(|error| ApiError::new(400, "bad_request", format!("expected {{\"reason\"}}: {error}")))
    }
}

async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(did): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &[Role::Admin])?;
    let request = RevokeRequest::parse(&body)?;
    let by = format!("token:{}", caller.token_id);
    let revoked = ask(&state, |reply| Command::Revoke {
        did,
        reason: request.reason,
        by,
        reply,
    })
    .await?;
    if let Some(last) = revoked.log_indexes.iter().max().copied() {
        state.published(|published| published.entries > last).await;
    }
    Ok(Json(revoked).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectedQuery {
    reason: Option<String>,
    limit: Option<usize>,
}

async fn rejected(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<RejectedQuery>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &[Role::Admin])?;
    if let Some(reason) = &query.reason
        && Reason::from_code(reason).is_none()
    {
        return Err(ApiError::new(
            400,
            "bad_request",
            format!("unknown reason code `{reason}`"),
        ));
    }
    let limit = query.limit.unwrap_or(100).min(10_000);
    let files = ask(&state, |reply| Command::Rejected { reply }).await?;
    let reason = query.reason;
    let records =
        tokio::task::spawn_blocking(move || custos_store::forensics::read_recent(&files, reason.as_deref(), limit))
            .await
            .map_err(|error| ApiError::new(500, "internal", error.to_string()))?;
    Ok(Json(serde_json::json!({ "rejected": records })).into_response())
}

/// `GET /metrics`: Prometheus text exposition, for any valid token (a scraper holds an
/// `auditor` token: metrics carry counts and latencies, never contents).
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    metrics_answer(&state.tokens, &headers)
}

async fn checkpoint(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers, &EVERYONE)?;
    let mut view = ask(&state, |reply| Command::Checkpoint { reply }).await?;
    // Witnesses' cosignatures of this very checkpoint join its note.
    for (_, size, line) in state
        .cosigned
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        if *size == view.size {
            view.note.push_str(line);
            view.cosigned_by += 1;
        }
    }
    Ok(Json(view).into_response())
}

async fn revocations(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let envelope = ask(&state, |reply| Command::Revocations { reply }).await?;
    if caller.realms.is_empty() {
        return Ok(envelope_response(&envelope));
    }
    // A realm-scoped caller gets a list of its realms only, signed afresh.
    let mut list: crate::RevocationList =
        serde_json::from_slice(&envelope.payload).map_err(|error| ApiError::new(500, "internal", error.to_string()))?;
    list.revoked_agents.retain(|agent| visible(&caller, &agent.realm));
    list.quarantined_agents.retain(|agent| visible(&caller, &agent.realm));
    list.quarantined_memories
        .retain(|memory| visible(&caller, &memory.realm));
    list.revoked_credentials
        .retain(|credential| visible(&caller, &credential.realm));
    let bytes = serde_json::to_vec(&list).map_err(|error| ApiError::new(500, "internal", error.to_string()))?;
    let resigned = ask(&state, |reply| Command::Sign { bytes, reply }).await?;
    Ok(envelope_response(&resigned))
}

/// A DSSE envelope in its wire JSON form.
fn envelope_response(envelope: &custos_event::Envelope) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], envelope.to_json()).into_response()
}

async fn control_stream(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let caller = authorize(&state, &headers, &READERS)?;
    let receiver = state.changes.subscribe();
    let stopping = state.stopping.clone();
    let tokens = state.tokens.clone();
    // The token is checked again every second: the stream ends once it is revoked or
    // expires, as any other request with it would then be refused.
    let mut recheck = tokio::time::interval(std::time::Duration::from_secs(1));
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures::stream::unfold(
        (receiver, caller, stopping, Some(recheck)),
        move |(mut receiver, caller, mut stopping, recheck)| {
            let tokens = tokens.clone();
            async move {
                let mut recheck = recheck?;
                loop {
                    let next = tokio::select! {
                        next = receiver.recv() => Some(next),
                        _ = stopping.wait_for(|stop| *stop) => return None,
                        _ = recheck.tick() => None,
                    };
                    let Some(next) = next else {
                        let valid = tokens
                            .read()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .valid(&caller.token_id);
                        if valid {
                            continue;
                        }
                        // Say why, then end: the client must authenticate again.
                        let event = Event::default().event("token_invalid").data(
                            "{\"error\":\"unauthenticated\",\"message\":\"the bearer token was revoked or expired\"}",
                        );
                        return Some((
                            Ok::<_, std::convert::Infallible>(event),
                            (receiver, caller, stopping, None),
                        ));
                    };
                    match next {
                        Ok(change) if visible(&caller, &change.realm) => {
                            let event = Event::default()
                                .event(change.event.clone())
                                .id(change.log_index.to_string())
                                .json_data(&change)
                                .unwrap_or_else(|_| Event::default().comment("unserialisable change"));
                            return Some((Ok(event), (receiver, caller, stopping, Some(recheck))));
                        }
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            // Say so rather than skip silently: the client should re-read the list.
                            let event = Event::default().event("lagged").data(format!(
                                "{{\"missed\":{missed},\"resync\":\"/v1/control/revocations\"}}"
                            ));
                            return Some((Ok(event), (receiver, caller, stopping, Some(recheck))));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn memory_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let record = ask(&state, |reply| Command::Memory { id: id.clone(), reply }).await?;
    let body = match record {
        Some(record) if visible(&caller, &record.realm) => serde_json::json!({
            "memory_id": id,
            "status": record.status,
            "serve": record.status != "quarantined",
            "agent": record.agent,
            "realm": record.realm,
            "since": record.since,
            "log_index": record.log_index,
            "reason": record.reason,
        }),
        // Unknown, or outside the caller's realms: nothing is known against it.
        _ => serde_json::json!({ "memory_id": id, "status": "unknown", "serve": true }),
    };
    Ok(Json(body).into_response())
}

fn operations(state: &AppState) -> Result<Arc<dyn crate::Operations>, ApiError> {
    state
        .operations
        .clone()
        .ok_or_else(|| ApiError::new(404, "no_detector", "this node runs without the detector and responder"))
}

/// Filters and cursors of `GET /v1/findings` and `/v1/actions`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    agent: Option<String>,
    realm: Option<String>,
    /// Findings: low, medium, high, critical (that severity or above).
    severity: Option<String>,
    /// Findings: the finding type.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Actions: the action name.
    action: Option<String>,
    /// Actions: executed, pending, denied, …
    status: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
    /// Cursor, newest first: items with a smaller log index.
    before: Option<u64>,
    /// Cursor, oldest first: items with a larger log index.
    after: Option<u64>,
}

const LIST_FILTERS: &str = "filters are agent, realm, severity, type, action, status, from, to, before, after, limit";

fn list_query(
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ListQuery, ApiError> {
    let Query(query) = query.map_err(|error| ApiError::new(400, "bad_request", format!("{error}; {LIST_FILTERS}")))?;
    if query.before.is_some() && query.after.is_some() {
        return Err(ApiError::new(400, "bad_request", "give `before` or `after`, not both"));
    }
    Ok(query)
}

fn severity_rank(name: &str) -> Option<u8> {
    ["low", "medium", "high", "critical"]
        .iter()
        .position(|known| *known == name)
        .map(|rank| rank as u8)
}

/// Applies `query` to items (newest first, as the views give them). Returns the page and
/// the cursor for the next one.
fn page(items: Vec<serde_json::Value>, query: &ListQuery) -> Result<(Vec<serde_json::Value>, Option<u64>), ApiError> {
    let time = |name: &str, text: &Option<String>| -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
        text.as_deref()
            .map(|text| {
                chrono::DateTime::parse_from_rfc3339(text)
                    .map(|at| at.with_timezone(&chrono::Utc))
                    .map_err(|error| {
                        ApiError::new(
                            400,
                            "bad_request",
                            format!("`{name}={text}` is not an RFC 3339 time such as 2026-11-22T10:00:00Z: {error}"),
                        )
                    })
            })
            .transpose()
    };
    let (from, to) = (time("from", &query.from)?, time("to", &query.to)?);
    let minimum = match &query.severity {
        Some(name) => Some(severity_rank(name).ok_or_else(|| {
            ApiError::new(
                400,
                "bad_request",
                format!("`severity={name}` is not one of low, medium, high, critical"),
            )
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let text = |item: &serde_json::Value, field: &str| item[field].as_str().map(str::to_owned);
    let keep = |item: &serde_json::Value| -> bool {
        let equals = |field: &str, wanted: &Option<String>| {
            wanted
                .as_ref()
                .is_none_or(|wanted| text(item, field).as_ref() == Some(wanted))
        };
        let index = item["log_index"].as_u64();
        let ts = text(item, "ts").and_then(|ts| chrono::DateTime::parse_from_rfc3339(&ts).ok());
        equals("agent", &query.agent)
            && equals("realm", &query.realm)
            && equals("type", &query.kind)
            && equals("action", &query.action)
            && equals("status", &query.status)
            && minimum.is_none_or(|minimum| {
                text(item, "severity")
                    .and_then(|name| severity_rank(&name))
                    .is_some_and(|rank| rank >= minimum)
            })
            && from.is_none_or(|from| ts.is_some_and(|ts| ts >= from))
            && to.is_none_or(|to| ts.is_some_and(|ts| ts < to))
            && query
                .before
                .is_none_or(|before| index.is_some_and(|index| index < before))
            && query.after.is_none_or(|after| index.is_some_and(|index| index > after))
    };
    let mut selected: Vec<serde_json::Value> = items.into_iter().filter(keep).collect();
    if query.after.is_some() {
        selected.reverse();
    }
    let full = selected.len() > limit;
    selected.truncate(limit);
    let next = if full {
        selected.last().and_then(|item| item["log_index"].as_u64())
    } else {
        None
    };
    Ok((selected, next))
}

/// Everything the views hold, so filters see all of it.
const ALL: usize = usize::MAX;

async fn findings(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let query = list_query(query)?;
    let operations = operations(&state)?;
    let (findings, next) = page(operations.findings(&caller.realms, ALL), &query)?;
    Ok(Json(serde_json::json!({ "findings": findings, "next": next })).into_response())
}

async fn actions(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let query = list_query(query)?;
    let operations = operations(&state)?;
    let (actions, next) = page(operations.actions(&caller.realms, ALL), &query)?;
    Ok(Json(serde_json::json!({
        "actions": actions,
        "next": next,
        "pending": operations.pending(&caller.realms),
    }))
    .into_response())
}

async fn approvals(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let operations = operations(&state)?;
    Ok(Json(serde_json::json!({ "pending": operations.pending(&caller.realms) })).into_response())
}

async fn decide(state: AppState, headers: HeaderMap, id: String, approve: bool) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &[Role::Admin, Role::Responder])?;
    let operations = operations(&state)?;
    let by = format!("token:{}", caller.token_id);
    let record = tokio::task::spawn_blocking(move || operations.decide(&id, approve, &by, &caller.realms))
        .await
        .map_err(|error| ApiError::new(500, "internal", error.to_string()))??;
    Ok(Json(record).into_response())
}

async fn approve(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    decide(state, headers, id, true).await
}

async fn deny(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    decide(state, headers, id, false).await
}

async fn undo(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &[Role::Admin, Role::Responder])?;
    let operations = operations(&state)?;
    let by = format!("token:{}", caller.token_id);
    let record = tokio::task::spawn_blocking(move || operations.undo(&id, &by, &caller.realms))
        .await
        .map_err(|error| ApiError::new(500, "internal", error.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(record)).into_response())
}

async fn playbooks(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &READERS)?;
    let operations = operations(&state)?;
    Ok(Json(serde_json::json!({ "playbooks": operations.playbooks(&caller.realms) })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeRequest {
    realm: String,
}

async fn resume_playbook(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = authorize(&state, &headers, &[Role::Admin, Role::Responder])?;
    let request: ResumeRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            400,
            "bad_request",
            format!("expected {{\"realm\": \"…\"}}, the realm where the playbook is paused: {error}"),
        )
    })?;
    let operations = operations(&state)?;
    let by = format!("token:{}", caller.token_id);
    let record = tokio::task::spawn_blocking(move || operations.resume(&name, &request.realm, &by, &caller.realms))
        .await
        .map_err(|error| ApiError::new(500, "internal", error.to_string()))??;
    Ok(Json(record).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_arrays_and_ndjson() {
        assert_eq!(
            split_body(b" [{\"a\":1}, {\"b\":[2]}]").unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{\"b\":[2]}".to_vec()]
        );
        assert_eq!(
            split_body(b"{\"a\":1}\r\n\n{oops\n").unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{oops".to_vec()]
        );
        assert_eq!(split_body(b"[{\"a\":1},").unwrap_err().reason, Reason::Malformed);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionQuery {
    log_index: u64,
    size: Option<u64>,
}

async fn inclusion(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<InclusionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &EVERYONE)?;
    let Query(query) =
        query.map_err(|error| ApiError::new(400, "bad_request", format!("expected ?log_index=N[&size=M]: {error}")))?;
    let proof = ask(&state, |reply| Command::Inclusion {
        index: query.log_index,
        size: query.size,
        reply,
    })
    .await?;
    Ok(Json(proof).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    from: u64,
    to: u64,
}

async fn consistency(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ConsistencyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &EVERYONE)?;
    let Query(query) =
        query.map_err(|error| ApiError::new(400, "bad_request", format!("expected ?from=N&to=M: {error}")))?;
    let proof = ask(&state, |reply| Command::Consistency {
        from: query.from,
        to: query.to,
        reply,
    })
    .await?;
    Ok(Json(proof).into_response())
}
