//! OTLP/HTTP trace ingest (`POST /v1/traces`) for agents that cannot sign.
//!
//! ```text
//!  collector token (role collector, one realm)
//!        │ body: protobuf or OTLP-JSON, gzip or plain (opentelemetry-proto types)
//!        ▼
//!  spans ─ map_span (the GenAI mapping; sdk/otel-mapping.json) ─▶ payload members
//!        │ grouped by the agent each span names
//!        ▼
//!  attest::Attestor (source `otlp`, one per collector token) ─▶ signed, verified, appended
//!        │
//!        ▼
//!  ExportTraceServiceResponse { partial_success: rejected spans, why }
//! ```
//!
//! A span that is not a GenAI operation is dropped and counted in the answer's message;
//! a span the node refuses (a revoked agent, a payload out of bounds) counts as rejected
//! and is kept for forensics, and never takes its neighbours with it.

use std::io::Read as _;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::{Map, Value};

use crate::ApiError;
use crate::http::AppState;
use custos_http::auth::Role;

/// One span, in the shape of `sdk/otel-mapping.json`'s cases.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SpanRecord {
    pub(crate) name: String,
    pub(crate) attributes: Map<String, Value>,
    /// `client`, `server`, `internal`, `producer` or `consumer`.
    pub(crate) kind: String,
    pub(crate) trace_id: Option<String>,
    pub(crate) span_id: Option<String>,
    pub(crate) parent_span_id: Option<String>,
    pub(crate) error: bool,
    /// RFC 3339.
    pub(crate) end_time: String,
}

/// `gen_ai.operation.name` → Custos kind.
const OPERATIONS: [(&str, &str); 10] = [
    ("chat", "llm_call"),
    ("text_completion", "llm_call"),
    ("generate_content", "llm_call"),
    ("embeddings", "llm_call"),
    ("execute_tool", "tool_call"),
    ("invoke_agent", "message_received"),
    ("create_memory", "memory_write"),
    ("update_memory", "memory_write"),
    ("delete_memory", "memory_delete"),
    ("search_memory", "memory_read"),
];
const LLM: [&str; 4] = ["chat", "text_completion", "generate_content", "embeddings"];

fn first<'a>(attributes: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names
        .iter()
        .filter_map(|name| attributes.get(*name))
        .find(|value| !value.is_null() && value.as_str() != Some(""))
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// At most `limit` bytes of `text`, cut at a character boundary.
fn bounded(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The GenAI operation: `gen_ai.operation.name`, else the span name's first word.
fn operation_of(span: &SpanRecord) -> Option<&'static str> {
    let named = span
        .attributes
        .get("gen_ai.operation.name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| span.name.split(' ').next().unwrap_or_default());
    OPERATIONS
        .iter()
        .find(|(operation, _)| *operation == named)
        .map(|(operation, _)| *operation)
}

/// The payload members (without agent, seq, prev, realm) for one span, or `None` for a
/// span that is not a GenAI operation. The SDK bridges apply the same mapping
/// (docs/integrations.md).
pub(crate) fn map_span(span: &SpanRecord) -> Option<Map<String, Value>> {
    let attributes = &span.attributes;
    let operation = operation_of(span)?;
    let mut kind = OPERATIONS
        .iter()
        .find(|(name, _)| *name == operation)
        .map(|(_, kind)| *kind)?;
    if operation == "invoke_agent" && span.kind == "client" {
        kind = "message_sent";
    }
    if let Some(claimed) = attributes.get("custos.kind").and_then(Value::as_str)
        && let Some(known) = custos_event::Kind::ALL.iter().find(|known| known.as_str() == claimed)
    {
        kind = known.as_str();
    }
    let mut event = Map::new();
    event.insert("kind".into(), Value::from(kind));
    event.insert("ts".into(), Value::from(span.end_time.clone()));
    let tool = match operation {
        "execute_tool" => first(attributes, &["gen_ai.tool.name"]).map(text),
        _ => None,
    };
    event.insert(
        "action".into(),
        Value::from(bounded(
            tool.unwrap_or_else(|| operation.to_owned()),
            custos_event::payload::MAX_SHORT,
        )),
    );
    let target = match attributes.get("custos.target") {
        Some(target) => Some(target),
        None if LLM.contains(&operation) => attributes.get("gen_ai.request.model"),
        None if operation == "invoke_agent" => first(attributes, &["gen_ai.agent.id", "gen_ai.agent.name"]),
        None => None,
    };
    if let Some(target) = target.filter(|target| !target.is_null()) {
        event.insert("target".into(), Value::from(bounded(text(target), 4096)));
    }
    event.insert("outcome".into(), Value::from(if span.error { "error" } else { "ok" }));
    for (field, names) in [
        ("tokens_in", ["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"]),
        (
            "tokens_out",
            ["gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"],
        ),
    ] {
        if let Some(count) = first(attributes, &names).and_then(Value::as_u64) {
            event.insert(field.into(), Value::from(count));
        }
    }
    if let Some(session) = first(attributes, &["gen_ai.conversation.id", "session.id"]) {
        event.insert("session".into(), Value::from(bounded(text(session), 256)));
    }
    for (field, value) in [
        ("trace_id", &span.trace_id),
        ("span_id", &span.span_id),
        ("parent", &span.parent_span_id),
    ] {
        if let Some(value) = value {
            event.insert(field.into(), Value::from(value.clone()));
        }
    }
    if let Some(memory) = first(attributes, &["gen_ai.memory.record.id"]) {
        event.insert("memory_id".into(), Value::from(bounded(text(memory), 256)));
    }
    let mut attrs = Map::new();
    for (name, value) in attributes {
        if name.starts_with("gen_ai.") {
            attrs.insert(name.clone(), value.clone());
        } else if let Some(name) = name.strip_prefix("custos.attrs.") {
            attrs.insert(name.to_owned(), value.clone());
        }
    }
    // Old and new names of the provider: both readable under the new one.
    if let Some(provider) = first(attributes, &["gen_ai.provider.name", "gen_ai.system"]).cloned() {
        attrs.insert("gen_ai.provider.name".into(), provider);
    }
    attrs.remove("gen_ai.system");
    if !attrs.is_empty() {
        event.insert("attrs".into(), Value::Object(attrs));
    }
    Some(event)
}

fn any_value(value: &AnyValue) -> Value {
    match &value.value {
        Some(any_value::Value::StringValue(text)) => Value::from(text.clone()),
        Some(any_value::Value::BoolValue(flag)) => Value::from(*flag),
        Some(any_value::Value::IntValue(number)) => Value::from(*number),
        Some(any_value::Value::DoubleValue(number)) => {
            serde_json::Number::from_f64(*number).map_or(Value::Null, Value::Number)
        }
        Some(any_value::Value::ArrayValue(array)) => Value::Array(array.values.iter().map(any_value).collect()),
        Some(any_value::Value::KvlistValue(list)) => Value::Object(attributes(&list.values)),
        Some(any_value::Value::BytesValue(bytes)) => {
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        None => Value::Null,
    }
}

fn attributes(pairs: &[KeyValue]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|pair| (pair.key.clone(), pair.value.as_ref().map_or(Value::Null, any_value)))
        .collect()
}

/// A W3C id as lowercase hex, when it has the right length and is not all zero.
fn id(bytes: &[u8], length: usize) -> Option<String> {
    (bytes.len() == length && bytes.iter().any(|byte| *byte != 0)).then(|| hex::encode(bytes))
}

fn span_record(span: &opentelemetry_proto::tonic::trace::v1::Span) -> SpanRecord {
    let kind = match span.kind {
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "internal",
    };
    let nanos = span.end_time_unix_nano.max(span.start_time_unix_nano);
    let end = i64::try_from(nanos)
        .ok()
        .map(chrono::DateTime::from_timestamp_nanos)
        .unwrap_or_else(chrono::Utc::now);
    SpanRecord {
        name: span.name.clone(),
        attributes: attributes(&span.attributes),
        kind: kind.into(),
        trace_id: id(&span.trace_id, 16),
        span_id: id(&span.span_id, 8),
        parent_span_id: id(&span.parent_span_id, 8),
        error: span.status.as_ref().is_some_and(|status| status.code == 2),
        end_time: end.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    }
}

/// The name of the agent a span reports for: its `gen_ai.agent.id` (unless it invokes
/// another agent), else the resource's `gen_ai.agent.id`, else its `service.name`.
fn agent_name(span: &SpanRecord, resource: &Map<String, Value>) -> String {
    let invokes_another = span.kind == "client" && operation_of(span) == Some("invoke_agent");
    let own = (!invokes_another)
        .then(|| first(&span.attributes, &["gen_ai.agent.id"]))
        .flatten();
    own.or_else(|| first(resource, &["gen_ai.agent.id", "service.name"]))
        .map(text)
        .map(|name| bounded(name, 256))
        .unwrap_or_else(|| "unknown_service".into())
}

/// Decodes an `ExportTraceServiceRequest` (protobuf or OTLP-JSON) and maps its spans:
/// the events grouped by the agent each names, in order, with how many spans there were
/// and how many were not GenAI operations. (The fuzz target `otlp` drives this.)
#[allow(clippy::type_complexity)]
pub fn events_of(bytes: &[u8], protobuf: bool) -> Result<(Vec<(String, Vec<Map<String, Value>>)>, i64, i64), String> {
    let request = match protobuf {
        true => ExportTraceServiceRequest::decode(bytes).map_err(|error| error.to_string())?,
        false => serde_json::from_slice::<ExportTraceServiceRequest>(bytes).map_err(|error| error.to_string())?,
    };
    let mut groups: Vec<(String, Vec<Map<String, Value>>)> = Vec::new();
    let (mut total, mut ignored) = (0_i64, 0_i64);
    for resource_spans in &request.resource_spans {
        let resource = resource_spans
            .resource
            .as_ref()
            .map(|resource| attributes(&resource.attributes))
            .unwrap_or_default();
        for scope in &resource_spans.scope_spans {
            for span in &scope.spans {
                total += 1;
                let record = span_record(span);
                let Some(event) = map_span(&record) else {
                    ignored += 1;
                    continue;
                };
                let name = agent_name(&record, &resource);
                match groups.iter_mut().find(|(group, _)| *group == name) {
                    Some((_, events)) => events.push(event),
                    None => groups.push((name, vec![event])),
                }
            }
        }
    }
    Ok((groups, total, ignored))
}

/// Whether the request body is protobuf (else OTLP-JSON).
fn is_protobuf(headers: &HeaderMap) -> Result<bool, ApiError> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(true),
        "application/json" => Ok(false),
        other => Err(ApiError::new(
            415,
            "unsupported_media_type",
            format!("Content-Type `{other}`: OTLP/HTTP bodies are application/x-protobuf or application/json"),
        )),
    }
}

/// The body, gunzipped when `Content-Encoding: gzip`, never past `limit` bytes.
fn decoded_body(headers: &HeaderMap, body: &[u8], limit: usize) -> Result<Vec<u8>, ApiError> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("identity")
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "identity" | "" => Ok(body.to_vec()),
        "gzip" => {
            let mut out = Vec::new();
            let mut reader = flate2::read::GzDecoder::new(body).take(limit as u64 + 1);
            reader.read_to_end(&mut out).map_err(|error| {
                ApiError::new(400, "bad_otlp", format!("the gzip body does not decompress: {error}"))
            })?;
            if out.len() > limit {
                return Err(ApiError::new(
                    413,
                    "too_large",
                    format!("the body decompresses to more than the {limit} bytes a request may hold"),
                ));
            }
            Ok(out)
        }
        other => Err(ApiError::new(
            415,
            "unsupported_media_type",
            format!("Content-Encoding `{other}`: use gzip or none"),
        )),
    }
}

fn answer(protobuf: bool, response: &ExportTraceServiceResponse) -> Response {
    if protobuf {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.encode_to_vec(),
        )
            .into_response()
    } else {
        (StatusCode::OK, axum::Json(response)).into_response()
    }
}

/// `POST /v1/traces`.
pub(crate) async fn post_traces(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = crate::http::authorize(&state, &headers, &[Role::Collector])?;
    traces(state, caller, remote.to_string(), &headers, &body).await
}

/// `POST /v1/traces` from `caller`, authenticated by its token here or by its token's
/// hash on the ingest node that passed the request on (`crate::forwarded`).
pub(crate) async fn traces(
    state: AppState,
    caller: custos_http::Caller,
    remote: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let [realm] = caller.realms.as_slice() else {
        return Err(ApiError::new(
            403,
            "realm_not_allowed",
            "a collector token is bound to exactly one realm; create one with `custos token create --role collector --realm R`",
        ));
    };
    let protobuf = is_protobuf(headers)?;
    let bytes = decoded_body(headers, body, state.config.max_request_bytes)?;
    let (groups, total, ignored) = match events_of(&bytes, protobuf) {
        Ok(events) => events,
        Err(error) => {
            let message = format!("the body is not an OTLP ExportTraceServiceRequest: {error}");
            let rejection = custos_event::Rejection::new(custos_event::Reason::Malformed, message.clone());
            crate::http::keep_rejected(&state, &rejection, &bytes, &remote).await?;
            return Err(ApiError::new(400, "bad_otlp", message));
        }
    };
    let attestor = state.attestor("otlp", &caller.token_id, realm)?;
    let verdicts = attestor.attest(&state, &remote, groups).await?;
    let refused: Vec<&custos_stage::Verdict> = verdicts
        .iter()
        .flatten()
        .filter(|verdict| verdict.status == custos_stage::Status::Rejected)
        .collect();
    // Spans attested before (an exporter's retry, an ingest node's resend): not stored again.
    let duplicates = verdicts
        .iter()
        .flatten()
        .filter(|verdict| verdict.status == custos_stage::Status::Duplicate)
        .count() as i64;
    custos_http::metrics::OTLP_SPANS
        .with_label_values(&["stored"])
        .inc_by((total - ignored - duplicates - refused.len() as i64).max(0) as u64);
    custos_http::metrics::OTLP_SPANS
        .with_label_values(&["duplicate"])
        .inc_by(duplicates as u64);
    custos_http::metrics::OTLP_SPANS
        .with_label_values(&["ignored"])
        .inc_by(ignored as u64);
    custos_http::metrics::OTLP_SPANS
        .with_label_values(&["rejected"])
        .inc_by(refused.len() as u64);
    let mut reasons: Vec<String> = Vec::new();
    if let Some(first) = refused.first() {
        reasons.push(format!(
            "{} spans rejected (first: {}: {})",
            refused.len(),
            first.reason.as_deref().unwrap_or("rejected"),
            first.message.as_deref().unwrap_or("")
        ));
    }
    if ignored > 0 {
        reasons.push(format!("{ignored} spans were not GenAI operations and were not kept"));
    }
    let response = ExportTraceServiceResponse {
        partial_success: (!reasons.is_empty()).then(|| ExportTracePartialSuccess {
            rejected_spans: refused.len() as i64,
            error_message: reasons.join("; "),
        }),
    };
    Ok(answer(protobuf, &response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases() -> Vec<Value> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk/otel-mapping.json");
        let text = std::fs::read_to_string(path).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["cases"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn record(span: &Value) -> SpanRecord {
        let hex = |name: &str| span[name].as_str().map(str::to_owned);
        SpanRecord {
            name: span["name"].as_str().unwrap().into(),
            attributes: span["attributes"].as_object().unwrap().clone(),
            kind: span["kind"].as_str().unwrap().into(),
            trace_id: hex("trace_id"),
            span_id: hex("span_id"),
            parent_span_id: hex("parent_span_id"),
            error: span["error"].as_bool().unwrap(),
            end_time: span["end_time"].as_str().unwrap().into(),
        }
    }

    #[test]
    fn the_node_maps_every_case_as_the_sdks_do() {
        for case in cases() {
            let mapped = map_span(&record(&case["span"])).map(Value::Object);
            assert_eq!(mapped.unwrap_or(Value::Null), case["event"], "{}", case["name"]);
        }
    }

    #[test]
    fn protobuf_spans_keep_their_ids_kind_status_and_attributes() {
        use opentelemetry_proto::tonic::trace::v1::{Span, Status, span::SpanKind};
        let span = Span {
            trace_id: vec![0x4b; 16],
            span_id: vec![1; 8],
            parent_span_id: Vec::new(),
            name: "execute_tool lookup".into(),
            kind: SpanKind::Client as i32,
            end_time_unix_nano: 1_768_469_400_250_000_000,
            attributes: vec![KeyValue {
                key: "gen_ai.tool.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("lookup".into())),
                }),
            }],
            status: Some(Status {
                message: String::new(),
                code: 2,
            }),
            ..Default::default()
        };
        let record = span_record(&span);
        assert_eq!(record.trace_id.as_deref(), Some("4b".repeat(16).as_str()));
        assert_eq!(record.parent_span_id, None, "an absent parent is not an id of zeros");
        assert_eq!(record.kind, "client");
        assert!(record.error);
        assert_eq!(record.end_time, "2026-01-15T09:30:00.250Z");
        let event = map_span(&record).unwrap();
        assert_eq!(event["action"], "lookup");
        assert_eq!(event["outcome"], "error");
    }

    #[test]
    fn oversized_values_are_cut_to_the_payload_bounds_not_refused() {
        let mut span = record(&cases()[1]["span"]);
        span.attributes
            .insert("gen_ai.tool.name".into(), Value::from("é".repeat(400)));
        let event = map_span(&span).unwrap();
        let action = event["action"].as_str().unwrap();
        assert!(action.len() <= 256 && action.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_request_limit() {
        use std::io::Write as _;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&vec![0u8; 1 << 20]).unwrap();
        let body = encoder.finish().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let error = decoded_body(&headers, &body, 64 * 1024).unwrap_err();
        assert_eq!((error.status, error.error), (413, "too_large"));
        assert_eq!(decoded_body(&headers, &body, 2 << 20).unwrap().len(), 1 << 20);
    }
}
