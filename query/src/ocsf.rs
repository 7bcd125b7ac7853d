//! OCSF renderings for SIEMs: agent events as API Activity (6003), findings as Detection
//! Finding (2004), action records as Remediation Activity (7001).

use custos_event::{ACTION_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE, FINDING_PAYLOAD_TYPE};
use custos_store::LogEntry;
use serde_json::{Value, json};

/// One OCSF object per entry, in log order. Entries of other types are skipped.
pub fn render(entries: &[LogEntry]) -> Vec<Value> {
    entries.iter().filter_map(render_one).collect()
}

fn render_one(entry: &LogEntry) -> Option<Value> {
    let mut value = match entry.payload_type.as_str() {
        EVENT_PAYLOAD_TYPE => event(&custos_event::Payload::parse(&entry.payload).ok()?),
        FINDING_PAYLOAD_TYPE => custos_detect::Finding::from_payload(&entry.payload)?.0.ocsf(),
        ACTION_PAYLOAD_TYPE => serde_json::from_slice::<custos_respond::ActionRecord>(&entry.payload)
            .ok()?
            .ocsf(),
        _ => return None,
    };
    if let Value::Object(object) = &mut value {
        let metadata = object.entry("metadata").or_insert_with(|| json!({}));
        metadata["log_index"] = json!(entry.log_index);
        metadata["signer"] = json!(entry.keyid);
    }
    Some(value)
}

/// An agent event as OCSF API Activity (class 6003).
pub fn event(payload: &custos_event::Payload) -> Value {
    use custos_event::{Kind, Outcome};
    let kind = payload.kind.as_str();
    let (activity_id, activity_name) = match payload.kind {
        Kind::FileRead | Kind::MemoryRead | Kind::ToolResult | Kind::MessageReceived => (2, "Read"),
        Kind::FileWrite | Kind::MemoryWrite | Kind::PolicyChange => (3, "Update"),
        Kind::MemoryDelete => (4, "Delete"),
        Kind::Delegation => (1, "Create"),
        _ => (99, "Other"),
    };
    let (status_id, status) = match payload.outcome {
        Some(Outcome::Ok) => (1, "Success"),
        Some(Outcome::Denied | Outcome::Error) => (2, "Failure"),
        None => (0, "Unknown"),
    };
    json!({
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": 600_300 + activity_id,
        "time": payload.ts.timestamp_millis(),
        "severity_id": 1,
        "status_id": status_id,
        "status": status,
        "actor": {"user": {"uid": payload.agent, "type": "AI agent"}, "session": {"uid": payload.session}},
        "api": {"operation": payload.action, "service": {"name": kind}},
        "resources": [{"uid": payload.target}],
        "metadata": custos_event::ocsf_metadata(),
        "unmapped": {
            "realm": payload.realm,
            "kind": kind,
            "seq": payload.seq,
            "memory_id": payload.memory_id,
            "bytes_in": payload.bytes_in,
            "bytes_out": payload.bytes_out,
            "tokens_in": payload.tokens_in,
            "tokens_out": payload.tokens_out,
            "trace_id": payload.trace_id,
            "span_id": payload.span_id,
        },
    })
}
