//! The VaultysClaw adapter: its governance audit, pulled and pushed, as attested events.
//!
//! ```text
//!  push: POST /v1/adapters/vaultysclaw/webhook {event, occurredAt, data}
//!        X-VaultysClaw-Signature = sha256=HMAC-SHA256(secret, "<timestamp>.<raw body>")
//!        ── HMAC (constant time) ── timestamp within 5 min ── delivery id not seen yet
//!  pull: GET <url>/api/admin/governance/audit?limit=500 every --vaultysclaw-poll-secs
//!        (no cursor: records deduplicated by id and status)
//!        │ IntentLog {intentId, agentDid, action, params, status, …}
//!        │ ActivityLog {id, event, agentDid, agentName, details, createdAt}
//!        ▼ map (docs/integrations.md)
//!  attest::Attestor (source `vaultysclaw`): one key per agentDid, sub-agents of the
//!  adapter's enrolled key ─▶ the node's verify + append path
//! ```
//!
//! Delivery ids and record ids already taken are kept in `DATA/attest/vaultysclaw/seen.json`
//! (the newest 100 000), written before the events are submitted: a delivery retried
//! after a crash at that point is answered `duplicate_delivery` while its events go out
//! from the attestor's pending file.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use custos_event::{Reason, Rejection};
use custos_stage::Status;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ApiError;
use crate::http::AppState;

/// Deliveries older or newer than this (by `X-VaultysClaw-Timestamp`) are refused.
pub const REPLAY_WINDOW_MS: i64 = 5 * 60 * 1000;
/// Ids remembered for deduplication.
const SEEN: usize = 100_000;

/// How the node talks to VaultysClaw (`custos serve --vaultysclaw-…`).
#[derive(Clone, Debug, Default)]
pub struct VaultysClawConfig {
    /// The realm its agents are enrolled in.
    pub realm: String,
    /// The webhook's shared secret (`--vaultysclaw-secret-file`): the push receiver is
    /// served only with one.
    pub secret_file: Option<PathBuf>,
    /// VaultysClaw's base URL (`--vaultysclaw-url`): the audit is pulled from it.
    pub url: Option<String>,
    /// The bearer token for its API (`--vaultysclaw-token-file`).
    pub token_file: Option<PathBuf>,
    pub poll: Duration,
}

/// What the running adapter holds.
pub(crate) struct VaultysClaw {
    pub(crate) config: VaultysClawConfig,
    secret: Option<custos_http::auth::Secret>,
    seen: tokio::sync::Mutex<Seen>,
    path: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct Seen {
    ids: VecDeque<String>,
    #[serde(skip)]
    index: std::collections::HashSet<String>,
}

impl Seen {
    fn contains(&self, id: &str) -> bool {
        self.index.contains(id)
    }

    fn insert(&mut self, id: String) {
        if self.index.insert(id.clone()) {
            self.ids.push_back(id);
            while self.ids.len() > SEEN {
                if let Some(old) = self.ids.pop_front() {
                    self.index.remove(&old);
                }
            }
        }
    }
}

fn io(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(503, "store_failed", format!("VaultysClaw adapter state: {error}"))
}

impl VaultysClaw {
    pub(crate) fn open(data: &std::path::Path, config: VaultysClawConfig) -> Result<Self, String> {
        let secret = config
            .secret_file
            .as_deref()
            .map(custos_http::auth::read_secret_file)
            .transpose()?;
        let path = data.join("attest").join("vaultysclaw").join("seen.json");
        let mut seen: Seen = fs_err::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        seen.index = seen.ids.iter().cloned().collect();
        Ok(Self {
            config,
            secret,
            seen: tokio::sync::Mutex::new(seen),
            path,
        })
    }

    fn save(&self, seen: &Seen) -> Result<(), ApiError> {
        if let Some(parent) = self.path.parent() {
            fs_err::create_dir_all(parent).map_err(io)?;
        }
        custos_store::write_atomic(&self.path, &serde_json::to_vec(seen).map_err(io)?).map_err(io)
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn text(value: &Value, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| match value.get(*name) {
        Some(Value::String(text)) if !text.is_empty() => Some(text.clone()),
        Some(Value::Number(number)) => Some(number.to_string()),
        _ => None,
    })
}

/// A time as VaultysClaw gives it (RFC 3339, or milliseconds since the epoch).
fn time(value: Option<&Value>) -> Option<chrono::DateTime<chrono::Utc>> {
    match value? {
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|ts| ts.with_timezone(&chrono::Utc))
            .or_else(|| {
                text.parse::<i64>()
                    .ok()
                    .and_then(chrono::DateTime::from_timestamp_millis)
            }),
        Value::Number(number) => number.as_i64().and_then(chrono::DateTime::from_timestamp_millis),
        _ => None,
    }
}

/// An intent's `action` → Custos kind (docs/integrations.md).
fn intent_kind(action: &str) -> &'static str {
    let action = action.to_ascii_lowercase();
    let head = |prefixes: &[&str]| prefixes.iter().any(|prefix| action.starts_with(prefix));
    if head(&["memory.read", "memory.search", "memory.get"]) {
        "memory_read"
    } else if head(&["memory.delete", "memory.forget"]) {
        "memory_delete"
    } else if head(&["memory."]) {
        "memory_write"
    } else if head(&["file.read"]) {
        "file_read"
    } else if head(&["file.write", "file.delete"]) {
        "file_write"
    } else if head(&["credential.", "secret.", "vault."]) {
        "credential_use"
    } else if head(&["message.", "email.", "chat.send", "notify."]) {
        "message_sent"
    } else if head(&["policy."]) {
        "policy_change"
    } else {
        "tool_call"
    }
}

fn outcome(status: &str) -> Option<&'static str> {
    match status.to_ascii_lowercase().as_str() {
        "completed" | "complete" | "success" | "succeeded" | "done" | "ok" => Some("ok"),
        "failed" | "error" | "errored" => Some("error"),
        "denied" | "rejected" | "blocked" | "refused" => Some("denied"),
        _ => None,
    }
}

fn bounded(text: String, limit: usize) -> String {
    text.chars().take(limit).collect()
}

/// An audit record (IntentLog or ActivityLog) as (agent, dedup id, event members).
pub(crate) fn map_record(record: &Value, event_name: Option<&str>) -> Option<(String, String, Map<String, Value>)> {
    let agent = text(record, &["agentDid"])?;
    let mut event = Map::new();
    let mut attrs = Map::new();
    let id;
    if let Some(intent) = text(record, &["intentId"]) {
        let action = text(record, &["action"]).unwrap_or_else(|| "intent".into());
        let status = text(record, &["status"]).unwrap_or_default();
        id = format!("intent:{intent}:{status}");
        event.insert("kind".into(), Value::from(intent_kind(&action)));
        event.insert("action".into(), Value::from(bounded(action, 200)));
        let params = record.get("params").cloned().unwrap_or(Value::Null);
        if let Some(target) = text(
            &params,
            &[
                "target",
                "url",
                "path",
                "credential",
                "credentialId",
                "memoryId",
                "recipient",
            ],
        ) {
            event.insert("target".into(), Value::from(bounded(target, 1000)));
        }
        if let Some(memory) = text(&params, &["memoryId", "memory_id"]) {
            event.insert("memory_id".into(), Value::from(bounded(memory, 200)));
        }
        if let Some(outcome) = outcome(&status) {
            event.insert("outcome".into(), Value::from(outcome));
        }
        let ts = time(record.get("completedAt")).or_else(|| time(record.get("sentAt")));
        event.insert(
            "ts".into(),
            Value::from(ts.unwrap_or_else(chrono::Utc::now).to_rfc3339()),
        );
        attrs.insert("vaultysclaw.intent_id".into(), Value::from(intent));
        attrs.insert("vaultysclaw.status".into(), Value::from(status));
        for (from, to) in [
            ("credentialOwner", "credential_owner"),
            ("credential_owner", "credential_owner"),
            ("sensitivity", "sensitivity"),
            ("destination", "destination"),
            ("sourceTrust", "source_trust"),
        ] {
            if let Some(value) = params.get(from) {
                attrs.insert(to.into(), value.clone());
            }
        }
        if let Some(error) = text(record, &["error"]) {
            attrs.insert("vaultysclaw.error".into(), Value::from(bounded(error, 500)));
        }
    } else {
        let activity = text(record, &["id"]).unwrap_or_default();
        let name = text(record, &["event"])
            .or_else(|| event_name.map(str::to_owned))
            .unwrap_or_else(|| "activity".into());
        id = format!("activity:{activity}:{name}");
        let kind = if name.starts_with("agent.") {
            "auth"
        } else {
            "policy_change"
        };
        event.insert("kind".into(), Value::from(kind));
        event.insert("action".into(), Value::from(bounded(name, 200)));
        let ts = time(record.get("createdAt"));
        event.insert(
            "ts".into(),
            Value::from(ts.unwrap_or_else(chrono::Utc::now).to_rfc3339()),
        );
        attrs.insert("vaultysclaw.activity_id".into(), Value::from(activity));
        if let Some(name) = text(record, &["agentName"]) {
            attrs.insert("vaultysclaw.agent_name".into(), Value::from(bounded(name, 200)));
        }
        if let Some(details) = record.get("details") {
            attrs.insert("vaultysclaw.details".into(), details.clone());
        }
    }
    event.insert("attrs".into(), Value::Object(attrs));
    Some((agent, id, event))
}

fn refuse(reason: Reason, message: String) -> ApiError {
    ApiError::new(401, reason.code(), message)
}

/// `POST /v1/adapters/vaultysclaw/webhook`.
pub(crate) async fn post_webhook(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(adapter) = state.vaultysclaw.clone() else {
        return Err(ApiError::new(
            404,
            "not_configured",
            "this node has no VaultysClaw webhook: start it with --vaultysclaw-secret-file PATH --vaultysclaw-realm R",
        ));
    };
    let Some(secret) = &adapter.secret else {
        return Err(ApiError::new(
            404,
            "not_configured",
            "this node pulls VaultysClaw's audit but has no webhook secret (--vaultysclaw-secret-file)",
        ));
    };
    let source = remote.ip();
    let remote = remote.to_string();
    state.rejects.admit(source, "refused deliveries")?;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    let refusal = {
        let timestamp = header("x-vaultysclaw-timestamp").unwrap_or_default();
        let given = header("x-vaultysclaw-signature").unwrap_or_default();
        let expected = signature(secret.0.as_bytes(), timestamp, &body);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), given.as_bytes())) {
            Some(Rejection::new(
                Reason::BadHmac,
                "X-VaultysClaw-Signature is not sha256=HMAC-SHA256(secret, \"<timestamp>.<body>\") for this body",
            ))
        } else {
            match timestamp.parse::<i64>() {
                Ok(ms) if (chrono::Utc::now().timestamp_millis() - ms).abs() <= REPLAY_WINDOW_MS => None,
                Ok(ms) => Some(Rejection::new(
                    Reason::StaleTimestamp,
                    format!(
                        "X-VaultysClaw-Timestamp {ms} is {} s from the node clock; deliveries are taken within 300 s",
                        (chrono::Utc::now().timestamp_millis() - ms) / 1000
                    ),
                )),
                Err(_) => Some(Rejection::new(
                    Reason::StaleTimestamp,
                    format!("X-VaultysClaw-Timestamp `{timestamp}` is not milliseconds since the epoch"),
                )),
            }
        }
    };
    if let Some(rejection) = refusal {
        crate::http::keep_rejected(&state, &rejection, &body, &remote).await?;
        state.rejects.charge(source, 1);
        return Err(refuse(rejection.reason, rejection.message));
    }
    let delivery = header("x-vaultysclaw-delivery").unwrap_or_default().to_owned();
    if delivery.is_empty() || delivery.len() > 256 {
        return Err(ApiError::new(
            400,
            "bad_request",
            "X-VaultysClaw-Delivery must name the delivery (1-256 bytes)",
        ));
    }
    let envelope: Value = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            400,
            "malformed",
            format!("the delivery is not JSON {{event, occurredAt, data}}: {error}"),
        )
    })?;
    let event_name = text(&envelope, &["event"]).or_else(|| header("x-vaultysclaw-event").map(str::to_owned));
    let data = envelope.get("data").cloned().unwrap_or(Value::Null);
    let mut seen = adapter.seen.lock().await;
    if seen.contains(&format!("delivery:{delivery}")) {
        return Ok(Json(serde_json::json!({
            "status": "duplicate", "reason": "duplicate_delivery",
            "message": format!("delivery `{delivery}` was already received; nothing is stored twice"),
        }))
        .into_response());
    }
    let mut record = data.clone();
    if record.get("occurredAt").is_none()
        && let (Some(object), Some(at)) = (record.as_object_mut(), envelope.get("occurredAt"))
        && !object.contains_key("createdAt")
        && !object.contains_key("completedAt")
    {
        object.insert("createdAt".into(), at.clone());
    }
    let mapped = map_record(&record, event_name.as_deref());
    seen.insert(format!("delivery:{delivery}"));
    let fresh = match &mapped {
        Some((_, id, _)) if seen.contains(id) => false,
        Some((_, id, _)) => {
            seen.insert(id.clone());
            true
        }
        None => false,
    };
    adapter.save(&seen)?;
    drop(seen);
    let Some((agent, _, event)) = mapped.filter(|_| fresh) else {
        return Ok(Json(serde_json::json!({
            "status": if fresh { "ignored" } else { "duplicate" },
            "message": "nothing new to store (no agentDid, or a record already taken by the audit pull)",
        }))
        .into_response());
    };
    let mut event = event;
    if let Some(Value::Object(attrs)) = event.get_mut("attrs") {
        attrs.insert("vaultysclaw.delivery".into(), Value::from(delivery));
        if let Some(name) = &event_name {
            attrs.insert("vaultysclaw.event".into(), Value::from(bounded(name.clone(), 200)));
        }
    }
    let attestor = state.attestor("vaultysclaw", "vaultysclaw", &adapter.config.realm)?;
    let verdicts = attestor.attest(&state, &remote, vec![(agent, vec![event])]).await?;
    let verdict = verdicts.into_iter().flatten().next();
    Ok(Json(verdict).into_response())
}

/// Pulls the governance audit every `poll` and attests what is new; runs until the
/// node stops.
pub(crate) async fn pull(state: AppState, adapter: std::sync::Arc<VaultysClaw>, token: custos_http::auth::Secret) {
    let Some(url) = adapter.config.url.clone() else {
        return;
    };
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot make the VaultysClaw client");
            return;
        }
    };
    let mut stopping = state.stopping.clone();
    loop {
        if let Err(error) = pull_once(&state, &adapter, &client, &url, &token).await {
            tracing::warn!(error = %error, "VaultysClaw audit pull failed; retrying");
            custos_http::metrics::ADAPTER_ERRORS
                .with_label_values(&["vaultysclaw"])
                .inc();
        }
        tokio::select! {
            _ = tokio::time::sleep(adapter.config.poll) => {}
            _ = stopping.changed() => return,
        }
    }
}

async fn pull_once(
    state: &AppState,
    adapter: &VaultysClaw,
    client: &reqwest::Client,
    url: &str,
    token: &custos_http::auth::Secret,
) -> Result<usize, String> {
    let response = client
        .get(format!("{}/api/admin/governance/audit", url.trim_end_matches('/')))
        .query(&[("limit", "500")])
        .bearer_auth(&token.0)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    if !response.status().is_success() {
        return Err(format!(
            "GET /api/admin/governance/audit answered {}",
            response.status()
        ));
    }
    let answer: Value = response.json().await.map_err(|error| error.to_string())?;
    // A list, or an object holding lists (intents, activities, …): every record in them.
    let records: Vec<Value> = match answer {
        Value::Array(items) => items,
        Value::Object(map) => map
            .into_values()
            .filter_map(|value| match value {
                Value::Array(items) => Some(items),
                _ => None,
            })
            .flatten()
            .collect(),
        _ => Vec::new(),
    };
    let mut groups: BTreeMap<String, Vec<Map<String, Value>>> = BTreeMap::new();
    {
        let mut seen = adapter.seen.lock().await;
        // Oldest first, so each agent's events go in the order they happened.
        let mut mapped: Vec<(String, String, Map<String, Value>)> =
            records.iter().filter_map(|record| map_record(record, None)).collect();
        mapped.sort_by(|a, b| a.2["ts"].as_str().cmp(&b.2["ts"].as_str()));
        for (agent, id, event) in mapped {
            if seen.contains(&id) {
                continue;
            }
            seen.insert(id);
            groups.entry(agent).or_default().push(event);
        }
        if groups.is_empty() {
            return Ok(0);
        }
        adapter.save(&seen).map_err(|error| error.message)?;
    }
    let count = groups.values().map(Vec::len).sum();
    let attestor = state
        .attestor("vaultysclaw", "vaultysclaw", &adapter.config.realm)
        .map_err(|error| error.message)?;
    let verdicts = attestor
        .attest(state, "vaultysclaw-pull", groups.into_iter().collect())
        .await
        .map_err(|error| error.message)?;
    let refused = verdicts
        .iter()
        .flatten()
        .filter(|verdict| verdict.status == Status::Rejected)
        .count();
    if refused > 0 {
        tracing::warn!(refused, "VaultysClaw audit records refused by the node");
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_over_timestamp_dot_body() {
        // Computed independently (Python's hmac module) over b"1700000000000.{}".
        assert_eq!(
            signature(b"s3cret", "1700000000000", b"{}"),
            "sha256=e8eb128e84214464aec85474d15f930c60fb75e2076edab5c557f8f406ab4899"
        );
    }

    #[test]
    fn intents_and_activities_map_to_kinds() {
        let intent = serde_json::json!({"intentId": "i-1", "agentDid": "did:vc:a", "action": "vault.read",
            "params": {"credential": "db", "credentialOwner": "did:vc:b"}, "status": "completed",
            "completedAt": "2026-12-04T10:00:00Z"});
        let (agent, id, event) = map_record(&intent, None).unwrap();
        assert_eq!((agent.as_str(), id.as_str()), ("did:vc:a", "intent:i-1:completed"));
        assert_eq!(event["kind"], "credential_use");
        assert_eq!(event["outcome"], "ok");
        assert_eq!(event["target"], "db");
        assert_eq!(event["attrs"]["credential_owner"], "did:vc:b");
        let activity = serde_json::json!({"id": 7, "event": "agent.connected", "agentDid": "did:vc:a",
            "agentName": "ops-bot", "details": {"ip": "10.0.0.1"}, "createdAt": 1_764_842_400_000_i64});
        let (_, id, event) = map_record(&activity, None).unwrap();
        assert_eq!(id, "activity:7:agent.connected");
        assert_eq!(event["kind"], "auth");
        assert!(map_record(&serde_json::json!({"id": 1}), None).is_none());
    }
}
