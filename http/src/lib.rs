//! Custos HTTP edge: what every process that serves the API shares, and nothing of the
//! log. The writer (`custos-ingest`), ingest nodes and the query API (`custos-query`) build
//! their routes on it; none of them depends on another's HTTP code.
//!
//! ```text
//!  socket ─▶ serve (connection slots, timeouts, body budget)
//!        ─▶ json_errors (every error answer is {"error","message"})
//!        ─▶ guarded route: Bearer token ─▶ Tokens (SHA-256 at rest) ─▶ Role allowed? ─▶ Caller
//!        ─▶ handler ─▶ Result<_, ApiError> (status, stable code, sentence, Retry-After)
//!
//!  [(openapi::Endpoint, handler)] ─┬─▶ the router        metrics: one Prometheus registry,
//!                                  └─▶ /openapi.json      closed label sets, GET /metrics
//! ```
//!
//! HTTP statuses live here, at the edge: the stages' contract (`custos-stage`) answers
//! with `Refused { code, message, retryable }`, and a route maps that to a status.

use std::sync::{Arc, RwLock};

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde::Serialize;

pub mod auth;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod tokens;

pub use auth::{Caller, EVERYONE, READERS, Role, Secret, Tokens};

/// The token table as the routes share it (token creation and revocation write it).
pub type SharedTokens = Arc<RwLock<Tokens>>;

/// An error answer: HTTP status, stable code, sentence.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub error: &'static str,
    pub message: String,
    /// Seconds a client should wait before retrying (`Retry-After`); 503 and 429
    /// answers carry one (1 s unless set).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    /// This error with a `Retry-After` of `seconds`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after;
        let mut response = (status, Json(self)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
            response = serve::with_retry_after(response, retry_after.unwrap_or(1));
        }
        response
    }
}

/// Every error answer as `{"error","message"}` JSON, as the API promises: the framework's
/// own (an unknown route, a method a route does not take, a malformed path) included.
pub async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let (code, default) = match status {
        StatusCode::NOT_FOUND => ("not_found", "there is no such route; GET /openapi.json lists them"),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this route does not take this method"),
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "the request body is over its limit"),
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "the node cannot take this request now"),
        status if status.is_server_error() => ("internal", "the request failed inside the node"),
        _ => ("bad_request", "the request is malformed"),
    };
    let body = ApiError::new(
        status.as_u16(),
        code,
        if text.is_empty() { default.to_owned() } else { text },
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// `method` behind its endpoint's declared access: for a route with roles, the bearer
/// token is checked before anything else of the request is read (so a caller without a
/// valid token learns nothing from parameter or body errors), and the [`Caller`] is put
/// in the request's extensions.
pub fn guarded<S: Clone + Send + Sync + 'static>(
    endpoint: &openapi::Endpoint,
    method: MethodRouter<S>,
    tokens: &SharedTokens,
) -> MethodRouter<S> {
    let openapi::Access::Roles(roles) = endpoint.access else {
        return method;
    };
    let tokens = tokens.clone();
    method.layer(axum::middleware::from_fn(
        move |mut request: axum::extract::Request, next: axum::middleware::Next| {
            let tokens = tokens.clone();
            async move {
                match authorize(&tokens, request.headers(), roles) {
                    Ok(caller) => {
                        request.extensions_mut().insert(caller);
                        next.run(request).await
                    }
                    Err(error) => error.into_response(),
                }
            }
        },
    ))
}

/// Authenticates the bearer token in `headers` and checks its role is in `allowed`.
pub fn authorize(tokens: &RwLock<Tokens>, headers: &HeaderMap, allowed: &[Role]) -> Result<Caller, ApiError> {
    let digest = bearer_sha256(headers)
        .ok_or_else(|| ApiError::new(401, "unauthenticated", "send `Authorization: Bearer <token>`"))?;
    authorize_sha256(tokens, &digest, allowed)
}

/// The lowercase hex SHA-256 of the `Authorization: Bearer` token in `headers`, if any.
pub fn bearer_sha256(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer)
        .map(|secret| crate::auth::hash_token(secret.trim()))
}

/// [`authorize`] by the token's hash ([`bearer_sha256`]), as an ingest node passes it on.
pub fn authorize_sha256(tokens: &RwLock<Tokens>, digest: &str, allowed: &[Role]) -> Result<Caller, ApiError> {
    reload_if_changed(tokens);
    let lookup = || {
        tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .authenticate_sha256(digest)
    };
    let caller = lookup()
        .or_else(|| {
            // A token another process made just now (a partition set's writers share
            // one table): look at the file before refusing it.
            let changed = tokens
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .changed();
            if !changed {
                return None;
            }
            let mut table = tokens.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if table.changed() {
                table.reload().ok()?;
            }
            table.authenticate_sha256(digest)
        })
        .ok_or_else(|| {
            ApiError::new(
                401,
                "unauthenticated",
                "the bearer token is unknown, expired or revoked",
            )
        })?;
    if !allowed.contains(&caller.role) {
        return Err(ApiError::new(
            403,
            "forbidden",
            format!("role `{:?}` may not use this route", caller.role).to_lowercase(),
        ));
    }
    Ok(caller)
}

/// Reads the token table again when another process sharing its file changed it (at
/// most once per [`Tokens::RELOAD_EVERY`]); an unreadable file keeps the table as it was.
pub fn reload_if_changed(tokens: &RwLock<Tokens>) {
    let due = tokens
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .reload_due();
    if due
        && let Err(error) = tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .reload()
    {
        tracing::error!(error = %error, "could not read the token table again; keeping the one read before");
    }
}

/// The credentials of a `Bearer` authorization header; the scheme name is
/// case-insensitive (RFC 7235) and may be followed by any run of spaces.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
        .filter(|secret| !secret.is_empty())
}

/// `GET /metrics`: Prometheus text exposition, for any valid token (a scraper holds an
/// `auditor` token: metrics carry counts and latencies, never contents).
pub fn metrics_answer(tokens: &RwLock<Tokens>, headers: &HeaderMap) -> Result<Response, ApiError> {
    authorize(tokens, headers, &EVERYONE)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_credentials() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bEaReR    abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer    "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn errors_answer_json_with_their_status_and_retry_after() {
        let response = ApiError::new(503, "stopping", "the node is shutting down").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let response = ApiError::new(401, "unauthenticated", "no token").into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
