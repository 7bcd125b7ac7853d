//! Adapter requests that ingest nodes pass on whole ([`Submission::Adapter`]), served by
//! the writer's node with the same handlers as its own API.
//!
//! ```text
//!  collector / LastID / VaultysClaw ─▶ ingest node (limits; the bearer token → SHA-256)
//!        │ Submission::Adapter { route, remote, adapter headers, token_sha256, body }
//!        ▼ submissions topic
//!  writer's Kafka bridge ─▶ AdapterDesk::serve ─▶ otlp / lastid / vaultysclaw handler
//!        │ (token looked up by its hash in this node's table; the remote kept for limits)
//!        ▼ attest ─▶ sequencer (the same appends as a request to this node's API)
//!  Appended::reply { status, content type, body } ─▶ receipt ─▶ the ingest node answers it
//! ```
//!
//! The adapters' keys, chains, LastID table and webhook deliveries stay in this node's
//! store, so a collector is one attesting identity whichever ingest node it reaches. A
//! LastID enrollment (route `/v1/agents`) is served here too; the node then publishes
//! the agent's realm on the control topic (`registry::lastid_record`), which is how
//! ingest nodes place its records.
//!
//! Over a partition set (`--log-per-partition`) a realm's log is one partition's, so an
//! adapter request is served by the writer of its realm's partition:
//!
//! ```text
//!  ingest node ─▶ partition of the request's realm when it can tell (LastID), else of the
//!                 empty key (or the one it learnt for this token/route)
//!        ▼
//!  that writer: the request's realm (the collector token's, the webhook's configured one)
//!        ├─ its own partition ─▶ served here, as above
//!        └─ partition q ─▶ Appended::route_to(q) ─▶ the ingest node sends it again with
//!                          AdapterRequest::partition = q, and remembers q
//! ```
//!
//! [`Submission::Adapter`]: custos_stage::Submission::Adapter

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use custos_http::Role;
use custos_stage::{AdapterReply, AdapterRequest, Answer, Appended, Intake, Refused, StageError, Submission};

use crate::ApiError;
use crate::http::AppState;

/// Answers bodies up to this size (an adapter's answer is a verdict list: a few KiB per
/// hundred items).
const MAX_REPLY_BYTES: usize = 16 << 20;

/// The most adapter requests a writer serves at once; more are refused as retryable
/// (`busy`: the ingest node answers 503 with Retry-After), so a flood from a valid
/// collector token or webhook secret cannot grow the writer's tasks and memory without
/// bound beside its intake.
pub const MAX_SERVING: usize = 64;

/// Where the writer's Kafka bridge hands adapter requests: empty until the node is open
/// (then they are refused as retryable), and served on the node's runtime after, at most
/// [`MAX_SERVING`] at once.
#[derive(Clone)]
pub struct AdapterDesk {
    node: Arc<OnceLock<(AppState, tokio::runtime::Handle)>>,
    serving: Arc<tokio::sync::Semaphore>,
}

impl Default for AdapterDesk {
    fn default() -> Self {
        Self {
            node: Arc::default(),
            serving: Arc::new(tokio::sync::Semaphore::new(MAX_SERVING)),
        }
    }
}

/// The log a writer of a partition set writes: partition `partition` of `partitions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetPlace {
    pub partition: u32,
    pub partitions: u32,
}

/// Where an adapter request is served over a partition set.
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    /// By this writer: its realm is this partition's, or it has none the writer can
    /// tell (an unknown token, a webhook not configured), which any writer refuses alike.
    Here,
    /// By the writer of this partition.
    There(u32),
}

impl AdapterDesk {
    pub(crate) fn open(&self, state: AppState, runtime: tokio::runtime::Handle) {
        let _ = self.node.set((state, runtime));
    }

    /// Serves `request` as this node's API serves the route, on the node's runtime;
    /// `answer` gets the reply once the handler has finished (its appends durable).
    /// Returns at once.
    ///
    /// Over a partition set (`set`), a request whose realm another partition's log
    /// writes is answered [`Appended::route_to`] that partition instead.
    pub fn serve(&self, request: AdapterRequest, answer: Answer, set: Option<SetPlace>) {
        let Ok(permit) = self.serving.clone().try_acquire_owned() else {
            return answer.send(Err(Refused::retryable(
                "busy",
                format!("the writer is already serving {MAX_SERVING} adapter requests; send it again"),
            )));
        };
        let Some((state, runtime)) = self.node.get() else {
            answer.send(Err(Refused::retryable(
                "not_ready",
                "the writer's node is still starting; the adapter request can be sent again",
            )));
            return;
        };
        if let Some(set) = set {
            match place(state, &request, set) {
                Ok(Placement::Here) => {}
                Ok(Placement::There(partition)) => return answer.send(Ok(Appended::route_to(partition))),
                Err(refused) => return answer.send(Err(refused)),
            }
        }
        let state = state.clone();
        runtime.spawn(async move {
            let response = match serve(state, request).await {
                Ok(response) => response,
                Err(error) => error.into_response(),
            };
            answer.send(reply(response).await);
            drop(permit);
        });
    }
}

/// Which partition's writer serves `request` over a partition set: the one of its realm.
fn place(state: &AppState, request: &AdapterRequest, set: SetPlace) -> Result<Placement, Refused> {
    let realm = match request.route.as_str() {
        "/v1/traces" => request.token_sha256.as_deref().and_then(|digest| {
            // The collector's one realm; any other caller is refused alike by every writer.
            custos_http::authorize_sha256(&state.tokens, digest, &[Role::Collector])
                .ok()
                .and_then(|caller| match caller.realms.as_slice() {
                    [realm] => Some(realm.clone()),
                    _ => None,
                })
        }),
        "/v1/adapters/vaultysclaw/webhook" => state.config.vaultysclaw.as_ref().map(|config| config.realm.clone()),
        // The realm of a platform agent's enrollment is in its body; any other body is
        // refused alike by every writer.
        "/v1/agents" => serde_json::from_slice::<crate::http::EnrollRequest>(&request.body)
            .ok()
            .map(|enrollment| enrollment.realm),
        // The ingest node placed the batch by the realm its view gives the agents: each
        // writer checks records against the LastID agents enrolled on its partition.
        "/v1/adapters/lastid/audit" => None,
        _ => None,
    };
    let Some(realm) = realm else {
        return Ok(Placement::Here);
    };
    let partition = custos_event::partition_of(&realm, set.partitions.max(1));
    Ok(match partition == set.partition {
        true => Placement::Here,
        false => Placement::There(partition),
    })
}

async fn serve(state: AppState, request: AdapterRequest) -> Result<Response, ApiError> {
    if request.body.len() > state.config.max_request_bytes {
        return Err(ApiError::new(
            413,
            "too_large",
            format!(
                "the request holds {} bytes; the limit is {}",
                request.body.len(),
                state.config.max_request_bytes
            ),
        ));
    }
    // The ingest node sends the client's address as it saw it; one that does not parse
    // counts as one unknown source for the limits.
    let remote: SocketAddr = request
        .remote
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.insert(name, value);
        }
    }
    let body = Bytes::from(request.body);
    match request.route.as_str() {
        "/v1/traces" => {
            let digest = request
                .token_sha256
                .ok_or_else(|| ApiError::new(401, "unauthenticated", "send `Authorization: Bearer <token>`"))?;
            let caller = custos_http::authorize_sha256(&state.tokens, &digest, &[Role::Collector])?;
            crate::otlp::traces(state, caller, remote.to_string(), &headers, &body).await
        }
        "/v1/agents" => {
            let digest = request
                .token_sha256
                .ok_or_else(|| ApiError::new(401, "unauthenticated", "send `Authorization: Bearer <token>`"))?;
            let caller = custos_http::authorize_sha256(&state.tokens, &digest, &[Role::Admin])?;
            let enrollment = crate::http::EnrollRequest::parse(&body)?;
            if enrollment.source.is_none() {
                // An ingest node enrolls a Custos agent as a control submission.
                return Err(ApiError::new(
                    400,
                    "bad_source",
                    "an ingest node passes on only platform agents' enrollments (source lastid)",
                ));
            }
            crate::http::enroll_as(&state, &caller, enrollment).await
        }
        "/v1/adapters/lastid/audit" => crate::lastid::post_audit(State(state), ConnectInfo(remote), body).await,
        "/v1/adapters/vaultysclaw/webhook" => {
            crate::vaultysclaw::post_webhook(State(state), ConnectInfo(remote), headers, body).await
        }
        other => Err(ApiError::new(
            404,
            "not_found",
            format!("`{other}` is not an adapter route"),
        )),
    }
}

/// The handler's answer as the contract carries it.
async fn reply(response: Response) -> Result<Appended, Refused> {
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = text(header::CONTENT_TYPE).unwrap_or_else(|| "application/json".into());
    let retry_after = text(header::RETRY_AFTER).and_then(|seconds| seconds.parse().ok());
    let body = axum::body::to_bytes(body, MAX_REPLY_BYTES)
        .await
        .map_err(|error| Refused::new("internal", format!("reading the adapter's answer: {error}")))?;
    Ok(Appended {
        log_indexes: Vec::new(),
        verdicts: Vec::new(),
        reply: Some(AdapterReply::new(status, content_type, &body, retry_after)),
        route_to: None,
    })
}

/// What the writer's Kafka bridge reads submissions through: adapter requests go to
/// `desk` and are answered from there when their handler finishes, while the intake
/// reads on, so a slow adapter request (one that enrolls many new agents) never holds
/// the events queued behind it. A writer of one partition of a set (`set`) serves only
/// the requests of its own realms, and answers the others with their partition.
///
/// Their offsets are acknowledged with the batch around them, possibly before they are
/// answered: a writer that stops meanwhile loses the request, and the ingest node sends
/// it again for want of a receipt (`custos_stage::kafka::RESEND_AFTER`); a copy that
/// comes while the first is still being answered is left by the intake.
pub struct AdapterIntake<I> {
    pub inner: I,
    pub desk: AdapterDesk,
    pub set: Option<SetPlace>,
}

impl<I: Intake> Intake for AdapterIntake<I> {
    fn recv(&mut self, timeout: Duration) -> Result<Option<(Submission, Answer)>, StageError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.inner.recv(left)? {
                Some((Submission::Adapter(request), answer)) => {
                    self.desk.serve(request, answer, self.set);
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                other => return Ok(other),
            }
        }
    }

    fn ack(&mut self) -> Result<(), StageError> {
        self.inner.ack()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> AdapterRequest {
        AdapterRequest {
            route: "/v1/traces".into(),
            remote: "192.0.2.1:4000".into(),
            headers: Vec::new(),
            token_sha256: None,
            body: Vec::new(),
            partition: None,
            realm: None,
        }
    }

    /// A writer serving its most adapter requests refuses the next as retryable `busy`
    /// at once, and takes requests again once one finishes.
    #[test]
    fn a_desk_serving_its_most_refuses_more_as_busy() {
        let desk = AdapterDesk::default();
        let held: Vec<_> = (0..MAX_SERVING)
            .map(|_| desk.serving.clone().try_acquire_owned().unwrap())
            .collect();
        let (answer, receipt) = custos_stage::receipt();
        desk.serve(request(), answer, None);
        let refused = receipt.try_take().expect("answered at once").unwrap_err();
        assert_eq!((refused.code.as_str(), refused.retryable), ("busy", true));
        assert!(
            refused.message.contains(&MAX_SERVING.to_string()),
            "{}",
            refused.message
        );
        drop(held);
        // Not busy any more; this desk's node is not open, which is the next refusal.
        let (answer, receipt) = custos_stage::receipt();
        desk.serve(request(), answer, None);
        let refused = receipt.try_take().expect("answered at once").unwrap_err();
        assert_eq!((refused.code.as_str(), refused.retryable), ("not_ready", true));
    }
}
