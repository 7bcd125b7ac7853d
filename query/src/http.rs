//! Routes: `POST /v1/sql` and `GET /v1/events`, authenticated through the node, scoped
//! to the caller's realms, and recorded in the access log.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use custos_http::openapi::Endpoint;
use custos_http::{Caller, EVERYONE, READERS, Role, SharedTokens};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{col, lit};
use serde::Deserialize;

use crate::QueryError;
use crate::access::{AccessLog, AccessRecord};
use crate::pool::QueryPool;
use crate::source::{Logs, PARTITION_HEADER, Source};
use crate::sql::{Format, Limits, collect, encode};
use crate::tables::{Scope, Sources};

#[derive(Clone)]
struct QueryState {
    logs: Arc<Logs>,
    tokens: SharedTokens,
    limits: Limits,
    access: Arc<AccessLog>,
    /// Held while a store verification runs: one at a time.
    verifying: Arc<tokio::sync::Mutex<()>>,
    /// Slots, the query runtime and the query processes.
    pool: Arc<QueryPool>,
}

/// Builds the query routes once the node's source is open (see [`routes`]).
pub type Routes = Box<dyn FnOnce(Logs, SharedTokens) -> Router + Send>;

/// The query routes, to be built over a [`Source`] and the token table once the node is
/// open; `others` are the node's other endpoints, for `GET /openapi.json`. Starts the
/// query runtime (its own threads) now.
pub fn routes(limits: Limits, others: Vec<Endpoint>) -> Result<Routes, QueryError> {
    let pool = QueryPool::new(&limits)?;
    Ok(Box::new(move |api, tokens| router(api, tokens, limits, pool, others)))
}

/// The header of every route that reads one log: which partition's, on a node over a
/// partition set ([`Logs::pick`]).
const PARTITION: &[(&str, &str)] = &[(
    PARTITION_HEADER,
    "on a node over a partition set (--log-per-partition): the partition whose log to read; by default the partition of the realm asked about, or of the caller's realms (ignored on a node with one log); the answer names it in the same header",
)];

/// The same header on `POST /v1/sql`, which may read several partitions ([`Logs::spanned`]).
const SQL_PARTITION: &[(&str, &str)] = &[(
    PARTITION_HEADER,
    "on a node over a partition set (--log-per-partition): the one partition to read; by default every partition of the caller's realms, each row saying its own in a `partition` column (ignored on a node with one log); the answer names the partitions read, comma-separated, in the same header",
)];

/// The query API's routes, declared once: served by [`router`], described by
/// `GET /openapi.json`.
fn endpoints() -> Vec<(Endpoint, MethodRouter<QueryState>)> {
    vec![
        (
            Endpoint::new("POST", "/v1/sql", "query", "Read-only SQL over events, findings, actions, agents, checkpoints, rejected (docs/query.md); the Accept header picks JSON, NDJSON, CSV, Arrow IPC or Parquet")
                .returns("Rows")
                .errors(&[429])
                .roles(&SQL_ROLES)
                .headers(SQL_PARTITION)
                .body("application/json", r#"{"sql":"SELECT kind, count(*) FROM events GROUP BY kind"}"#),
            post(sql),
        ),
        (
            Endpoint::new("GET", "/v1/events", "query", "Events with filters, ascending log_index, cursor paging (`after`, `next`)")
                .returns("EventPage")
                .errors(&[429])
                .roles(&READERS)
                .headers(PARTITION)
                .query(&[
                    ("agent", "the signer's did:key"),
                    ("realm", "realm name"),
                    ("kind", "event kind"),
                    ("action", "action"),
                    ("outcome", "ok, denied or error"),
                    ("from", "RFC 3339, inclusive"),
                    ("to", "RFC 3339, exclusive"),
                    ("after", "cursor: log indexes after this one"),
                    ("limit", "at most 10000 (default 100)"),
                ]),
            get(events),
        ),
        (
            Endpoint::new("GET", "/v1/ocsf/{class}", "query", "Events, findings or actions (`class` = events, findings, actions) as OCSF 1.x JSON for a SIEM: API Activity 6003, Detection Finding 2004, Remediation Activity 7001; oldest first with an `after` cursor")
                .returns("Rows")
                .errors(&[429])
                .roles(&READERS)
                .headers(PARTITION)
                .query(&[
                    ("realm", "realm name"),
                    ("agent", "the agent's did:key"),
                    ("from", "RFC 3339, inclusive"),
                    ("to", "RFC 3339, exclusive"),
                    ("after", "cursor: log indexes after this one"),
                    ("limit", "at most 10000 (default 1000)"),
                    ("format", "json (an array, the default) or ndjson"),
                ]),
            get(ocsf),
        ),
        (
            Endpoint::new("POST", "/v1/evidence", "evidence", "Export an evidence bundle (docs/evidence-format.md)")
                .errors(&[429])
                .roles(&[Role::Admin, Role::Compliance])
                .headers(PARTITION)
                .body("application/json", r#"{"realm":"eng","agent":null,"from":"2026-11-01T00:00:00Z","to":"2026-11-22T00:00:00Z"}"#)
                .answer(200, "application/x-tar"),
            post(evidence),
        ),
        (
            Endpoint::new("GET", "/v1/integrity", "proofs", "The latest checkpoint and the last store verification")
                .returns("Integrity").roles(&SQL_ROLES).headers(PARTITION),
            get(integrity),
        ),
        (
            Endpoint::new("POST", "/v1/integrity/verify", "proofs", "Verify the store on disk now (as `custos verify`) and record the outcome")
                .returns("Verified")
                .errors(&[409])
                .roles(&[Role::Admin])
                .query(&[("signatures", "true to check every ed25519 signature too")]),
            post(verify_now),
        ),
    ]
}

/// Every endpoint the node serves: `others` (ingest's), the query API's, the console's
/// and the OpenAPI document's own.
pub fn catalogue(others: Vec<Endpoint>) -> Vec<Endpoint> {
    let mut all = others;
    all.extend(endpoints().into_iter().map(|(endpoint, _)| endpoint));
    all.extend(crate::console::endpoints());
    all.push(openapi_endpoint());
    all
}

fn openapi_endpoint() -> Endpoint {
    Endpoint::new(
        "GET",
        "/openapi.json",
        "meta",
        "This document, generated from the route declarations",
    )
    .returns("Record")
}

/// The query routes, to merge into the node's router.
fn router(logs: Logs, tokens: SharedTokens, limits: Limits, pool: Arc<QueryPool>, others: Vec<Endpoint>) -> Router {
    let access = Arc::new(AccessLog::new(logs.data()));
    let document = custos_http::openapi::route(&catalogue(others), env!("CARGO_PKG_VERSION"));
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, (endpoint, method)| {
            router.route(endpoint.path, custos_http::guarded(&endpoint, method, &tokens))
        })
        .with_state(QueryState {
            logs: Arc::new(logs),
            tokens,
            limits,
            access,
            verifying: Arc::new(tokio::sync::Mutex::new(())),
            pool,
        })
        .layer(axum::middleware::from_fn(timed))
        .merge(crate::console::router())
        .route(openapi_endpoint().path, document)
}

/// Records each query route's latency by route pattern and HTTP status (both closed sets).
async fn timed(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "other".to_owned(), |path| path.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    custos_http::metrics::QUERY_SECONDS
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(&self)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Every role may run SQL: what it sees is scoped by its role and realms.
const SQL_ROLES: [Role; 5] = EVERYONE;

/// The log `caller`'s request reads ([`Logs::pick`]): the partition named in the
/// request's headers, or that of `realm`, or of the caller's realms.
fn pick(
    state: &QueryState,
    caller: &Caller,
    headers: &HeaderMap,
    realm: Option<&str>,
) -> Result<(Option<u32>, Arc<dyn Source>), QueryError> {
    Ok(state
        .logs
        .pick(named_partition(headers).as_deref(), realm, &caller.realms)?)
}

/// The partition a request names in its [`PARTITION_HEADER`], as sent.
fn named_partition(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    headers
        .get(PARTITION_HEADER)
        .map(|value| String::from_utf8_lossy(value.as_bytes()))
}

/// `response`, saying which partitions' logs answered (on a node over a partition set;
/// several, comma-separated, only for SQL).
fn answered_by(partitions: &[u32], mut response: Response) -> Response {
    if !partitions.is_empty() {
        let named = partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        if let Ok(value) = header::HeaderValue::from_str(&named) {
            response.headers_mut().insert(PARTITION_HEADER, value);
        }
    }
    response
}

fn scope(caller: &Caller) -> Scope {
    Scope {
        role: caller.role,
        realms: caller.realms.clone(),
    }
}

/// What `scope` may read, taken from the node at one instant. Rejected inputs are read
/// only for the callers that see them (unscoped admins).
async fn sources(api: &dyn Source, scope: &Scope, partition: Option<u32>) -> Result<Sources, QueryError> {
    let view = api.view().await?;
    let agents = api.agents().await?;
    let rejected = if scope.tables().contains(&"rejected") && scope.realms.is_empty() {
        api.rejected(None, 10_000).await?
    } else {
        Vec::new()
    };
    let path = view.checkpoints.clone();
    let checkpoints = tokio::task::spawn_blocking(move || {
        if path.exists() {
            custos_store::log::read_ndjson::<custos_store::log::CheckpointLine>(&path)
        } else {
            Ok(Vec::new())
        }
    })
    .await
    .map_err(|error| QueryError::internal(error.to_string()))?
    .map_err(|error| QueryError::internal(format!("reading checkpoints: {error}")))?;
    Ok(Sources {
        partition,
        view,
        agents,
        rejected,
        checkpoints,
        tail_batch: None,
    })
}

fn record(
    state: &QueryState,
    caller: &Caller,
    (route, partitions): (&str, &[u32]),
    query: &str,
    result: &Result<usize, QueryError>,
) {
    let (rows, outcome) = match result {
        Ok(rows) => (*rows, "ok"),
        Err(error) => (0, error.error),
    };
    state.access.record(AccessRecord {
        ts: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        token: &caller.token_id,
        role: caller.role.name(),
        realms: &caller.realms,
        route,
        query,
        rows,
        outcome,
        partition: (partitions.len() == 1).then(|| partitions[0]),
        partitions: if partitions.len() > 1 { partitions } else { &[] },
    });
    tracing::info!(token = caller.token_id, route, rows, outcome, "query");
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlRequest {
    sql: String,
}

/// `POST /v1/sql` with `{"sql": "..."}` (or the SQL as `text/plain`).
async fn sql(State(state): State<QueryState>, headers: HeaderMap, body: Bytes) -> Result<Response, QueryError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &SQL_ROLES)?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    let text = if json {
        serde_json::from_slice::<SqlRequest>(&body)
            .map_err(|error| QueryError::new(400, "bad_request", format!("expected {{\"sql\": \"...\"}}: {error}")))?
            .sql
    } else {
        String::from_utf8(body.to_vec()).map_err(|_| QueryError::new(400, "bad_request", "the SQL is not UTF-8"))?
    };
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()));
    if text.len() > crate::shape::MAX_SQL_BYTES {
        return Err(QueryError::new(
            400,
            "bad_sql",
            format!(
                "the query is {} bytes long; the limit is {}",
                text.len(),
                crate::shape::MAX_SQL_BYTES
            ),
        ));
    }
    let logs = state
        .logs
        .spanned(named_partition(&headers).as_deref(), &caller.realms)?;
    let partitions: Vec<u32> = logs.iter().filter_map(|(partition, _)| *partition).collect();
    let slot = state.pool.admit(&caller.token_id)?;
    let answer = run_sql(&state, &logs, &caller, &text, format).await;
    drop(slot);
    record(
        &state,
        &caller,
        ("/v1/sql", &partitions),
        &text,
        &answer.as_ref().map(|(rows, _, _)| *rows).map_err(Clone::clone),
    );
    let (rows, content_type, body) = answer?;
    Ok(answered_by(
        &partitions,
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::HeaderName::from_static("x-custos-rows"), rows.to_string()),
            ],
            body,
        )
            .into_response(),
    ))
}

/// Runs SQL in a query process: the node hands it the caller's scope and what it may
/// read of each log in `logs`, and relays its answer.
async fn run_sql(
    state: &QueryState,
    logs: &[crate::source::PartitionLog],
    caller: &Caller,
    text: &str,
    format: Format,
) -> Result<(usize, String, Vec<u8>), QueryError> {
    let program = state.limits.worker.clone().ok_or_else(|| {
        QueryError::new(
            503,
            "query_unavailable",
            "this node has no query process to run SQL in (`custos query-worker`)",
        )
    })?;
    let mut read = Vec::with_capacity(logs.len());
    for (partition, api) in logs {
        read.push(sources(api.as_ref(), &scope(caller), *partition).await?);
    }
    let scope = scope(caller);
    let limits = state.limits.clone();
    let sql = text.to_owned();
    // The tails become Arrow IPC on the query runtime, not on the one serving ingest.
    let (request, tails) = state
        .pool
        .read(limits.timeout, async move {
            let mut tails = Vec::with_capacity(read.len());
            let mut logs = Vec::with_capacity(read.len());
            for sources in read {
                tails.push(crate::worker::tail_ipc(&sources.tail_batch()?)?);
                logs.push(crate::worker::LogRequest {
                    partition: sources.partition,
                    segment_dir: sources.view.segment_dir.clone(),
                    segments: sources.view.segments.clone(),
                    size: sources.view.size,
                    checkpoints_path: sources.view.checkpoints.clone(),
                    // Scoped here too: a query process never receives rows its caller may
                    // not see.
                    agents: sources
                        .agents
                        .into_iter()
                        .filter(|agent| scope.sees(&agent.realm))
                        .collect(),
                    rejected: if scope.tables().contains(&"rejected") && scope.realms.is_empty() {
                        sources.rejected
                    } else {
                        Vec::new()
                    },
                    checkpoints: sources.checkpoints,
                });
            }
            let request = crate::worker::Request {
                sql,
                role: scope.role,
                realms: scope.realms.clone(),
                format: format.name().to_owned(),
                timeout_ms: u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX),
                memory_bytes: limits.memory_bytes,
                max_rows: limits.max_rows,
                logs,
            };
            Ok((request, tails))
        })
        .await?;
    let (reply, body) = state.pool.sql(&program, &request, tails, &state.limits).await?;
    if reply.status != 200 {
        return Err(QueryError::new(reply.status, stable_code(&reply.error), reply.message));
    }
    Ok((reply.rows, reply.content_type, body))
}

/// A query process's error code as one of the stable codes (docs/query.md).
fn stable_code(code: &str) -> &'static str {
    [
        "bad_sql",
        "bad_request",
        "read_only",
        "query_memory",
        "row_cap",
        "query_timeout",
        "query_failed",
    ]
    .into_iter()
    .find(|known| *known == code)
    .unwrap_or("query_failed")
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    agent: Option<String>,
    realm: Option<String>,
    kind: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    /// RFC 3339; events at or after.
    from: Option<String>,
    /// RFC 3339; events before.
    to: Option<String>,
    /// Cursor: log indexes after this one.
    after: Option<u64>,
    limit: Option<usize>,
}

fn timestamp(name: &str, text: &str) -> Result<ScalarValue, QueryError> {
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|error| {
        QueryError::new(
            400,
            "bad_request",
            format!("`{name}={text}` is not an RFC 3339 time such as 2026-11-22T10:00:00Z: {error}"),
        )
    })?;
    Ok(ScalarValue::TimestampMicrosecond(
        Some(at.timestamp_micros()),
        Some("UTC".into()),
    ))
}

/// `GET /v1/events`: filters, ascending `log_index`, cursor pagination (`after`, `next`).
async fn events(
    State(state): State<QueryState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, QueryError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &READERS)?;
    let Query(query) = query.map_err(|error| {
        QueryError::new(
            400,
            "bad_request",
            format!("{error}; filters are agent, realm, kind, action, outcome, from, to, after, limit"),
        )
    })?;
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let text = headers_free_query(&query);
    let (partition, api) = pick(&state, &caller, &headers, query.realm.as_deref())?;
    let slot = state.pool.admit(&caller.token_id)?;
    let answer = async {
        let sources = sources(api.as_ref(), &scope(&caller), None).await?;
        let scope = scope(&caller);
        let limits = state.limits.clone();
        state
            .pool
            .read(state.limits.timeout, async move {
                filtered_events(sources, scope, limits, query, limit).await
            })
            .await
    }
    .await;
    drop(slot);
    record(
        &state,
        &caller,
        ("/v1/events", partition.as_slice()),
        &text,
        &answer.as_ref().map(|answer| answer.rows).map_err(Clone::clone),
    );
    let answer = answer?;
    let body = encode(&answer, Format::Json)?;
    let rows: serde_json::Value =
        serde_json::from_slice(&body).map_err(|error| QueryError::internal(error.to_string()))?;
    let next = if answer.rows == limit {
        rows.as_array()
            .and_then(|rows| rows.last())
            .and_then(|row| row["log_index"].as_u64())
    } else {
        None
    };
    Ok(answered_by(
        partition.as_slice(),
        Json(serde_json::json!({ "events": rows, "next": next })).into_response(),
    ))
}

/// The plan and run of `GET /v1/events`, on the query runtime.
async fn filtered_events(
    sources: Sources,
    scope: Scope,
    limits: Limits,
    query: EventsQuery,
    limit: usize,
) -> Result<crate::sql::Answer, QueryError> {
    {
        let ctx = crate::sql::session(std::slice::from_ref(&sources), &scope, &limits).await?;
        let mut frame = ctx.table("events").await?;
        for (name, value) in [
            ("agent", &query.agent),
            ("realm", &query.realm),
            ("kind", &query.kind),
            ("action", &query.action),
            ("outcome", &query.outcome),
        ] {
            if let Some(value) = value {
                frame = frame.filter(col(name).eq(lit(value.clone())))?;
            }
        }
        if let Some(from) = &query.from {
            frame = frame.filter(col("ts").gt_eq(lit(timestamp("from", from)?)))?;
        }
        if let Some(to) = &query.to {
            frame = frame.filter(col("ts").lt(lit(timestamp("to", to)?)))?;
        }
        if let Some(after) = query.after {
            frame = frame.filter(col("log_index").gt(lit(after)))?;
        }
        let frame = frame
            .sort(vec![col("log_index").sort(true, false)])?
            .limit(0, Some(limit))?
            .select_columns(&[
                "log_index",
                "ts",
                "ingest_ts",
                "agent",
                "realm",
                "kind",
                "action",
                "target",
                "outcome",
                "session",
                "memory_id",
                "seq",
                "bytes_in",
                "bytes_out",
                "tokens_in",
                "tokens_out",
                "attrs",
                "gap_from",
                "gap_to",
            ])?;
        collect(frame, limit).await
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OcsfQuery {
    realm: Option<String>,
    agent: Option<String>,
    from: Option<String>,
    to: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
    format: Option<String>,
}

/// `GET /v1/ocsf/{class}`: the log's events, findings or actions as OCSF objects, scoped
/// to the caller's realms. The cursor for the next page is in `X-Custos-Next`.
async fn ocsf(
    State(state): State<QueryState>,
    headers: HeaderMap,
    axum::extract::Path(class): axum::extract::Path<String>,
    query: Result<Query<OcsfQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, QueryError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &READERS)?;
    let Query(query) = query.map_err(|error| {
        QueryError::new(
            400,
            "bad_request",
            format!("{error}; filters are realm, agent, from, to, after, limit, format"),
        )
    })?;
    let kind = match class.as_str() {
        "events" => custos_event::EVENT_PAYLOAD_TYPE,
        "findings" => custos_event::FINDING_PAYLOAD_TYPE,
        "actions" => custos_event::ACTION_PAYLOAD_TYPE,
        other => {
            return Err(QueryError::new(
                404,
                "unknown_class",
                format!("`{other}` is not one of events, findings, actions"),
            ));
        }
    };
    let ndjson = match query.format.as_deref() {
        None | Some("json") => false,
        Some("ndjson") => true,
        Some(other) => {
            return Err(QueryError::new(
                400,
                "bad_request",
                format!("`format={other}` is not json or ndjson"),
            ));
        }
    };
    let time = |name: &str, text: &Option<String>| -> Result<Option<chrono::DateTime<chrono::Utc>>, QueryError> {
        text.as_deref()
            .map(|text| {
                chrono::DateTime::parse_from_rfc3339(text)
                    .map(|at| at.with_timezone(&chrono::Utc))
                    .map_err(|error| {
                        QueryError::new(
                            400,
                            "bad_request",
                            format!("`{name}={text}` is not an RFC 3339 time such as 2026-11-22T10:00:00Z: {error}"),
                        )
                    })
            })
            .transpose()
    };
    // The caller's realms, narrowed to the one asked for (which must be among them).
    let realms = match (&query.realm, caller.realms.is_empty()) {
        (Some(realm), _) if !caller.realms.is_empty() && !caller.realms.contains(realm) => {
            return Err(QueryError::new(
                403,
                "forbidden",
                format!("this token may not read realm `{realm}`"),
            ));
        }
        (Some(realm), _) => Some(vec![realm.clone()]),
        (None, true) => None,
        (None, false) => Some(caller.realms.clone()),
    };
    let limit = query.limit.unwrap_or(1_000).clamp(1, 10_000);
    let selection = crate::evidence::Selection {
        kinds: vec![kind],
        realms,
        agent: query.agent.clone(),
        from: time("from", &query.from)?,
        to: time("to", &query.to)?,
        after: query.after,
        limit,
        strict: false,
    };
    let text = format!(
        "class={class} realm={:?} agent={:?} after={:?}",
        query.realm, query.agent, query.after
    );
    let (partition, api) = pick(&state, &caller, &headers, query.realm.as_deref())?;
    let slot = state.pool.admit(&caller.token_id)?;
    let entries = async {
        let sources = sources(api.as_ref(), &scope(&caller), None).await?;
        state
            .pool
            .read(state.limits.timeout, async move {
                crate::evidence::select(&sources, &selection).await
            })
            .await
    }
    .await;
    drop(slot);
    record(
        &state,
        &caller,
        ("/v1/ocsf", partition.as_slice()),
        &text,
        &entries.as_ref().map(Vec::len).map_err(Clone::clone),
    );
    let entries = entries?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|entry| entry.log_index))
        .flatten();
    let objects = crate::ocsf::render(&entries);
    let (kind, body) = if ndjson {
        let mut body = Vec::new();
        for object in &objects {
            body.extend(serde_json::to_vec(object).map_err(|error| QueryError::internal(error.to_string()))?);
            body.push(b'\n');
        }
        ("application/x-ndjson", body)
    } else {
        (
            "application/json",
            serde_json::to_vec(&objects).map_err(|error| QueryError::internal(error.to_string()))?,
        )
    };
    let mut response = answered_by(
        partition.as_slice(),
        ([(header::CONTENT_TYPE, kind)], body).into_response(),
    );
    if let Some(next) = next
        && let Ok(value) = header::HeaderValue::from_str(&next.to_string())
    {
        response.headers_mut().insert("x-custos-next", value);
    }
    Ok(response)
}

/// The REST filters as a query string, for the access log.
fn headers_free_query(query: &EventsQuery) -> String {
    let mut parts = Vec::new();
    for (name, value) in [
        ("agent", &query.agent),
        ("realm", &query.realm),
        ("kind", &query.kind),
        ("action", &query.action),
        ("outcome", &query.outcome),
        ("from", &query.from),
        ("to", &query.to),
    ] {
        if let Some(value) = value {
            parts.push(format!("{name}={value}"));
        }
    }
    if let Some(after) = query.after {
        parts.push(format!("after={after}"));
    }
    if let Some(limit) = query.limit {
        parts.push(format!("limit={limit}"));
    }
    parts.join("&")
}

/// `POST /v1/evidence` (compliance, admin): `{"realm","agent","from","to"}` → a bundle
/// (`application/x-tar`).
async fn evidence(State(state): State<QueryState>, headers: HeaderMap, body: Bytes) -> Result<Response, QueryError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &[Role::Admin, Role::Compliance])?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let slot = state.pool.admit(&caller.token_id)?;
    let mut partition = None;
    let bundle = async {
        let request: crate::evidence::ExportRequest = serde_json::from_slice(&body).map_err(|error| {
            QueryError::new(
                400,
                "bad_request",
                format!("expected {{\"realm\",\"agent\",\"from\",\"to\"}} with RFC 3339 times: {error}"),
            )
        })?;
        let api;
        (partition, api) = pick(&state, &caller, &headers, Some(&request.realm))?;
        let sources = sources(api.as_ref(), &scope(&caller), None).await?;
        let by = format!("token:{} ({})", caller.token_id, caller.role.name());
        let scope = scope(&caller);
        // An export may be long; it runs on the query runtime, never past ten minutes
        // (or the query timeout, when that is longer).
        let limit = state.limits.timeout.max(std::time::Duration::from_secs(600));
        state
            .pool
            .read(limit, async move {
                crate::evidence::export(api.as_ref(), &sources, &scope, &by, request).await
            })
            .await
    }
    .await;
    drop(slot);
    let rows = bundle
        .as_ref()
        .map(|bundle| bundle.manifest.counts.values().sum::<u64>() as usize)
        .map_err(Clone::clone);
    record(&state, &caller, ("/v1/evidence", partition.as_slice()), &text, &rows);
    let bundle = bundle?;
    Ok(answered_by(
        partition.as_slice(),
        (
            [
                (header::CONTENT_TYPE, "application/x-tar".to_owned()),
                (
                    header::HeaderName::from_static("x-custos-rows"),
                    rows.unwrap_or(0).to_string(),
                ),
            ],
            bundle.tar,
        )
            .into_response(),
    ))
}

/// The outcome of the last store verification run through the API, kept in
/// `DATA/verify-last.json`.
#[derive(Clone, Debug, serde::Serialize, Deserialize)]
pub struct LastVerify {
    pub at: String,
    pub ok: bool,
    pub entries: u64,
    pub signatures_checked: u64,
    pub problems: usize,
    pub first_problem: Option<String>,
    pub by: String,
    pub millis: u64,
}

fn last_verify_path(logs: &Logs) -> std::path::PathBuf {
    logs.data().join("verify-last.json")
}

/// `GET /v1/integrity` (every role): the latest checkpoint and the last verification.
async fn integrity(State(state): State<QueryState>, headers: HeaderMap) -> Result<Response, QueryError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &SQL_ROLES)?;
    let (partition, api) = pick(&state, &caller, &headers, None)?;
    let checkpoint = api.checkpoint().await?;
    let path = last_verify_path(&state.logs);
    let last: Option<LastVerify> = tokio::task::spawn_blocking(move || {
        std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    })
    .await
    .map_err(|error| QueryError::internal(error.to_string()))?;
    Ok(answered_by(
        partition.as_slice(),
        Json(serde_json::json!({ "checkpoint": checkpoint, "last_verify": last })).into_response(),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VerifyQuery {
    /// Also check every ed25519 signature (slower).
    #[serde(default)]
    signatures: bool,
}

/// `POST /v1/integrity/verify[?signatures=true]` (admin): recomputes every leaf, root and
/// checkpoint of the store on disk, as `custos verify` does, and records the outcome.
async fn verify_now(
    State(state): State<QueryState>,
    headers: HeaderMap,
    query: Result<Query<VerifyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, QueryError> {
    let caller = custos_http::authorize(&state.tokens, &headers, &[Role::Admin])?;
    let Query(query) = query
        .map_err(|error| QueryError::new(400, "bad_request", format!("{error}; the only option is signatures")))?;
    let Ok(_running) = state.verifying.clone().try_lock_owned() else {
        return Err(QueryError::new(
            409,
            "verify_running",
            "a verification is already running; read GET /v1/integrity when it ends",
        ));
    };
    let data = state.logs.store_dir().to_path_buf();
    let path = last_verify_path(&state.logs);
    let by = format!("token:{} ({})", caller.token_id, caller.role.name());
    let outcome = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let options = custos_store::verify::VerifyOptions {
            signatures: query.signatures,
            ..Default::default()
        };
        let report = custos_store::verify::verify_store(&data, &options, &mut |_, _| {})
            .map_err(|error| QueryError::new(500, "verify_failed", format!("the store cannot be read: {error}")))?;
        let last = LastVerify {
            at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ok: report.ok(),
            entries: report.logs.iter().map(|log| log.entries).sum(),
            signatures_checked: report.logs.iter().map(|log| log.signatures_checked).sum(),
            problems: report.problems.len(),
            first_problem: report.problems.first().map(|problem| {
                format!(
                    "{} in {} (log index {}): {}",
                    problem.code,
                    problem.file,
                    problem.log_index.map_or("?".into(), |index| index.to_string()),
                    problem.detail
                )
            }),
            by,
            millis: started.elapsed().as_millis() as u64,
        };
        let bytes = serde_json::to_vec_pretty(&last).map_err(|error| QueryError::internal(error.to_string()))?;
        std::fs::write(&path, bytes)
            .map_err(|error| QueryError::internal(format!("writing {}: {error}", path.display())))?;
        Ok::<_, QueryError>(last)
    })
    .await
    .map_err(|error| QueryError::internal(error.to_string()))??;
    tracing::info!(
        ok = outcome.ok,
        entries = outcome.entries,
        problems = outcome.problems,
        "store verified through the API"
    );
    Ok(Json(outcome).into_response())
}
