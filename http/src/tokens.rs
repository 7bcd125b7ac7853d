//! Token administration over HTTP (`/v1/tokens`, admin only), served by every process
//! with a token table: the writer and query nodes.
//!
//! ```text
//!  POST /v1/tokens {"role","realms","ttl"} ─▶ Tokens::create (secret shown once, SHA-256 kept)
//!  GET  /v1/tokens                         ─▶ ids, roles, realms, expiry (never secrets)
//!  POST /v1/tokens/{id}/revoke             ─▶ Tokens::revoke
//! ```

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;

use crate::openapi::Endpoint;
use crate::{ApiError, Role, SharedTokens};

const ADMIN: &[Role] = &[Role::Admin];

/// The token routes, declared once: served by [`router`], described by the catalogue.
fn endpoints() -> Vec<(Endpoint, MethodRouter<SharedTokens>)> {
    vec![
        (
            Endpoint::new(
                "POST",
                "/v1/tokens",
                "tokens",
                "Create an API token; the secret is shown once",
            )
            .returns("TokenCreated")
            .roles(ADMIN)
            .body("application/json", r#"{"role":"analyst","realms":["eng"],"ttl":"30d"}"#)
            .answer(201, "application/json"),
            post(create_token),
        ),
        (
            Endpoint::new(
                "GET",
                "/v1/tokens",
                "tokens",
                "Every token (ids, roles, realms; never secrets)",
            )
            .returns("Tokens")
            .roles(ADMIN),
            get(list_tokens),
        ),
        (
            Endpoint::new("POST", "/v1/tokens/{id}/revoke", "tokens", "Revoke a token")
                .returns("TokenRevoked")
                .roles(ADMIN),
            post(revoke_token),
        ),
    ]
}

/// The token routes' declarations, for an OpenAPI document.
pub fn catalogue() -> Vec<Endpoint> {
    endpoints().into_iter().map(|(endpoint, _)| endpoint).collect()
}

/// The token routes over `tokens`, each behind its declared roles.
pub fn router(tokens: &SharedTokens) -> Router {
    endpoints()
        .into_iter()
        .fold(Router::new(), |router, (endpoint, method)| {
            router.route(endpoint.path, crate::guarded(&endpoint, method, tokens))
        })
        .with_state(tokens.clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    role: String,
    #[serde(default)]
    realms: Vec<String>,
    /// A lifetime such as `30d`; none means no expiry.
    ttl: Option<String>,
}

async fn create_token(
    State(tokens): State<SharedTokens>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = crate::authorize(&tokens, &headers, &[Role::Admin])?;
    let request: TokenRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            400,
            "bad_request",
            format!("expected {{\"role\",\"realms\",\"ttl\"}}: {error}"),
        )
    })?;
    let role = Role::parse(&request.role).map_err(|message| ApiError::new(400, "bad_role", message))?;
    if let Some(realm) = request
        .realms
        .iter()
        .find(|realm| !custos_event::payload::valid_realm(realm))
    {
        return Err(ApiError::new(
            400,
            "bad_realm",
            format!(
                "realm `{}` must be 1-64 characters of [A-Za-z0-9._-]",
                realm.chars().take(80).collect::<String>()
            ),
        ));
    }
    if role == Role::Collector && request.realms.len() != 1 {
        return Err(ApiError::new(
            400,
            "bad_realm",
            format!(
                "a `collector` token is bound to exactly one realm (its attested agents are enrolled there); this request names {}",
                request.realms.len()
            ),
        ));
    }
    if matches!(role, Role::Admin | Role::Auditor) && !request.realms.is_empty() {
        return Err(ApiError::new(
            400,
            "bad_realm",
            format!(
                "a `{}` token is not scoped to realms (an admin manages every realm; an auditor reads checkpoints and proofs, which have none); use analyst, responder or compliance for realm-scoped access",
                role.name()
            ),
        ));
    }
    let expires_at = match &request.ttl {
        Some(ttl) => {
            let seconds = crate::auth::parse_ttl(ttl).map_err(|message| ApiError::new(400, "bad_ttl", message))?;
            let at = i64::try_from(seconds)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .and_then(|lifetime| chrono::Utc::now().checked_add_signed(lifetime))
                .ok_or_else(|| ApiError::new(400, "bad_ttl", format!("`{ttl}` is too long")))?;
            Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        }
        None => None,
    };
    let lock = change_lock(&tokens).await?;
    let mut table = tokens.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let secret = table
        .create_under(&lock, role, request.realms.clone(), expires_at.clone())
        .map_err(|error| ApiError::new(503, "store_failed", format!("saving the token table: {error}")))?;
    let id = crate::auth::hash_token(&secret.0)[..12].to_owned();
    tracing::info!(token = id, role = role.name(), by = caller.token_id, "token created");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "id": id,
            "token": secret.0,
            "role": role.name(),
            "realms": request.realms,
            "expires_at": expires_at,
        })),
    )
        .into_response())
}

/// The token file's change lock, waited for on a blocking thread and without holding
/// the table: other requests keep authenticating while another process changes the file.
async fn change_lock(tokens: &SharedTokens) -> Result<crate::auth::ChangeLock, ApiError> {
    let path = tokens
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .lock_path();
    tokio::task::spawn_blocking(move || crate::Tokens::change_lock(&path))
        .await
        .map_err(|error| ApiError::new(500, "internal", format!("the lock task failed: {error}")))?
        .map_err(|error| ApiError::new(503, "store_failed", format!("changing the token table: {error}")))
}

async fn list_tokens(State(tokens): State<SharedTokens>, headers: HeaderMap) -> Result<Response, ApiError> {
    crate::authorize(&tokens, &headers, &[Role::Admin])?;
    let tokens = tokens.read().unwrap_or_else(std::sync::PoisonError::into_inner).list();
    Ok(Json(serde_json::json!({ "tokens": tokens })).into_response())
}

async fn revoke_token(
    State(tokens): State<SharedTokens>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let caller = crate::authorize(&tokens, &headers, &[Role::Admin])?;
    let lock = change_lock(&tokens).await?;
    let mut table = tokens.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let found = table
        .revoke_under(&lock, &id)
        .map_err(|error| ApiError::new(503, "store_failed", format!("saving the token table: {error}")))?;
    if !found {
        return Err(ApiError::new(404, "no_such_token", format!("there is no token `{id}`")));
    }
    tracing::info!(token = id, by = caller.token_id, "token revoked");
    Ok(Json(serde_json::json!({ "id": id, "revoked": true })).into_response())
}
