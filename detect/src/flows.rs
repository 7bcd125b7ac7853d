//! Information flow: where untrusted content goes inside an agent, followed through
//! `session`, `parent` (span ids) and `memory_id`.
//!
//! ```text
//!  untrusted input (message_received, tool_result from an external host,
//!                   or attrs.source_trust = untrusted)
//!        │ taints its session (and its span)
//!        ├──▶ outward send, same session, to a destination neither the agent nor its
//!        │    realm ever sent to ────────────────────────────────▶ exfiltration
//!        └──▶ memory_write in a tainted session ─▶ tainted memory (realm-wide)
//!                  memory_read of a tainted memory ─▶ poisoned session (and span)
//!                        └──▶ credential_use, or an outward send to a destination
//!                             new to the agent ──────────────────▶ memory_poisoning
//! ```
//!
//! State is bounded: a few marks per agent, a capped map of tainted memories per realm.

use std::collections::HashMap;

use custos_event::{Kind, Payload};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::features::host_of;

/// Marks kept per agent and per kind (tainted sessions, poisoned sessions).
pub const MAX_MARKS: usize = 8;
/// Tainted memories remembered per realm; past it the older half is forgotten.
pub const MAX_TAINTED_MEMORIES: usize = 50_000;

/// A session (or span) that holds untrusted content, and the events that made it so.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub key: u32,
    pub ts: i64,
    /// Log indexes of the events that caused the mark (untrusted input; or the tainted
    /// memory's write and its read-back).
    pub cause: [Option<u64>; 2],
    /// The tainted memory read back, for a poisoned mark (what to quarantine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// One agent's flow marks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentFlows {
    pub tainted: Vec<Mark>,
    pub poisoned: Vec<Mark>,
}

/// The keys an event belongs to: its session (or trace, or the agent as a whole when it
/// names neither) and its own span.
pub fn own_keys(payload: &Payload) -> Vec<u32> {
    let mut keys = vec![session_key(payload)];
    if let Some(span) = &payload.span_id {
        keys.push(crate::features::tagged_hash("span:", span));
    }
    keys
}

/// The keys an event inherits from: its session and its parent span.
pub fn parent_keys(payload: &Payload) -> Vec<u32> {
    let mut keys = vec![session_key(payload)];
    if let Some(parent) = &payload.parent {
        keys.push(crate::features::tagged_hash("span:", parent));
    }
    keys
}

fn session_key(payload: &Payload) -> u32 {
    match (&payload.session, &payload.trace_id) {
        (Some(session), _) => crate::features::tagged_hash("session:", session),
        (None, Some(trace)) => crate::features::tagged_hash("trace:", trace),
        (None, None) => crate::features::tagged_hash("agent", ""),
    }
}

fn add_mark(marks: &mut Vec<Mark>, mark: Mark) {
    if let Some(existing) = marks.iter_mut().find(|existing| existing.key == mark.key) {
        // Keep the first cause (the event that started it), refresh the time.
        existing.ts = mark.ts;
        return;
    }
    if marks.len() >= MAX_MARKS {
        // Drop the stalest.
        if let Some(stalest) = marks
            .iter()
            .enumerate()
            .min_by_key(|(_, mark)| mark.ts)
            .map(|(at, _)| at)
        {
            marks.remove(stalest);
        }
    }
    marks.push(mark);
}

fn find(marks: &[Mark], keys: &[u32], now: i64, horizon: i64) -> Option<Mark> {
    marks
        .iter()
        .filter(|mark| keys.contains(&mark.key) && now - mark.ts <= horizon && now >= mark.ts - 60)
        .min_by_key(|mark| mark.ts)
        .cloned()
}

impl AgentFlows {
    pub fn taint(&mut self, payload: &Payload, ts: i64, cause: [Option<u64>; 2]) {
        for key in own_keys(payload) {
            add_mark(
                &mut self.tainted,
                Mark {
                    key,
                    ts,
                    cause,
                    memory: None,
                },
            );
        }
    }

    pub fn poison(&mut self, payload: &Payload, ts: i64, cause: [Option<u64>; 2]) {
        let memory = payload.memory_id.clone().or_else(|| payload.target.clone());
        for key in own_keys(payload) {
            add_mark(
                &mut self.poisoned,
                Mark {
                    key,
                    ts,
                    cause,
                    memory: memory.clone(),
                },
            );
        }
    }

    /// The taint mark an event falls under, if its session or parent span holds
    /// untrusted content seen within `horizon` seconds.
    pub fn tainted_by(&self, payload: &Payload, ts: i64, horizon: i64) -> Option<Mark> {
        find(&self.tainted, &parent_keys(payload), ts, horizon)
    }

    /// The poisoned mark an event falls under: same session (or trace; or, for events
    /// naming neither, the agent as a whole) or parent span, within `horizon`.
    pub fn poisoned_by(&self, payload: &Payload, ts: i64, horizon: i64) -> Option<Mark> {
        find(&self.poisoned, &parent_keys(payload), ts, horizon)
    }
}

/// Realm-wide memories that hold untrusted content: memory key hash → (time written,
/// log index of the write).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TaintedMemories(HashMap<u64, (i64, Option<u64>)>);

/// The memory an event touches: `memory_id`, else its target.
pub fn memory_key(payload: &Payload) -> Option<u64> {
    let name = payload.memory_id.as_ref().or(payload.target.as_ref())?;
    Some(crate::hash64(name))
}

impl TaintedMemories {
    pub fn insert(&mut self, key: u64, ts: i64, index: Option<u64>) {
        if self.0.len() >= MAX_TAINTED_MEMORIES {
            let mut times: Vec<i64> = self.0.values().map(|(ts, _)| *ts).collect();
            times.sort_unstable();
            let median = times[times.len() / 2];
            self.0.retain(|_, (ts, _)| *ts > median);
        }
        self.0.insert(key, (ts, index));
    }

    /// A trusted overwrite clears the mark.
    pub fn clear(&mut self, key: u64) {
        self.0.remove(&key);
    }

    pub fn get(&self, key: u64) -> Option<(i64, Option<u64>)> {
        self.0.get(&key).copied()
    }
}

/// `attrs.source_trust`, when given.
fn declared_trust(payload: &Payload) -> Option<&str> {
    payload
        .attrs
        .as_ref()
        .and_then(|attrs| attrs.get("source_trust"))
        .and_then(Value::as_str)
}

/// Internal destinations: hosts under a configured internal domain, single-label hosts,
/// `localhost`, the reserved internal suffixes and private IPv4 ranges.
pub fn is_internal(host: &str, internal_domains: &[String]) -> bool {
    const SUFFIXES: [&str; 6] = [".internal", ".local", ".corp", ".lan", ".intranet", ".home.arpa"];
    if host == "localhost" || !host.contains('.') || SUFFIXES.iter().any(|suffix| host.ends_with(suffix)) {
        return true;
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return ip.is_private() || ip.is_loopback() || ip.is_link_local();
    }
    internal_domains.iter().any(|domain| {
        let domain = domain.trim_start_matches('.').to_ascii_lowercase();
        host == domain || host.ends_with(&format!(".{domain}"))
    })
}

/// Whether an event brings content from outside into the agent: an inbound message, a
/// tool result from an external host, or anything declared `source_trust: untrusted`.
/// `source_trust: trusted` overrides.
pub fn is_untrusted_input(payload: &Payload, internal_domains: &[String]) -> bool {
    match declared_trust(payload) {
        Some("untrusted") => return true,
        Some("trusted") => return false,
        _ => {}
    }
    let external = || {
        payload
            .target
            .as_deref()
            .and_then(host_of)
            .is_some_and(|host| !is_internal(&host, internal_domains))
    };
    match payload.kind {
        Kind::MessageReceived => payload.target.as_deref().and_then(host_of).is_none() || external(),
        Kind::ToolResult => external(),
        _ => false,
    }
}

/// Action words that move data out, and ones that only fetch.
const SENDS: [&str; 16] = [
    "post", "put", "patch", "send", "upload", "mail", "publish", "share", "webhook", "push", "export", "transfer",
    "submit", "forward", "notify", "reply",
];
const FETCHES: [&str; 10] = [
    "get", "fetch", "read", "search", "query", "list", "browse", "download", "lookup", "head",
];

/// The external destination (a host) an event sends data to, if it does: a
/// `message_sent`, or a `tool_call`/`file_write` whose action sends (or, when the
/// action says neither, that sends more bytes than it receives).
pub fn outward_destination(payload: &Payload, internal_domains: &[String]) -> Option<String> {
    let host = host_of(payload.target.as_deref()?)?;
    if is_internal(&host, internal_domains) {
        return None;
    }
    let sends = match payload.kind {
        Kind::MessageSent => true,
        Kind::ToolCall | Kind::FileWrite => {
            let action = payload.action.as_deref().unwrap_or("").to_ascii_lowercase();
            let words: Vec<&str> = action.split(|c: char| !c.is_ascii_alphanumeric()).collect();
            let has = |list: &[&str]| words.iter().any(|word| list.contains(word));
            if has(&SENDS) {
                true
            } else if has(&FETCHES) {
                false
            } else {
                payload.bytes_out.unwrap_or(0) > payload.bytes_in.unwrap_or(0).max(1024)
                    || matches!(payload.kind, Kind::FileWrite)
            }
        }
        _ => false,
    };
    sends.then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(kind: Kind, action: &str, target: &str) -> Payload {
        let mut payload = Payload::new(kind, chrono::Utc::now());
        payload.action = Some(action.into());
        payload.target = Some(target.into());
        payload
    }

    #[test]
    fn sends_and_fetches_are_told_apart() {
        let none: &[String] = &[];
        assert_eq!(
            outward_destination(&payload(Kind::ToolCall, "http.post", "https://paste.evil.net/u"), none).as_deref(),
            Some("paste.evil.net")
        );
        assert_eq!(
            outward_destination(
                &payload(Kind::ToolCall, "web.fetch", "https://docs.example.org/a"),
                none
            ),
            None
        );
        assert_eq!(
            outward_destination(&payload(Kind::MessageSent, "email", "mailto:bob@partner.example"), none).as_deref(),
            Some("partner.example")
        );
        assert_eq!(
            outward_destination(&payload(Kind::MessageSent, "chat.reply", "ticket://42"), none),
            None
        );
        let internal = vec!["acme.com".to_owned()];
        assert_eq!(
            outward_destination(
                &payload(Kind::ToolCall, "http.post", "https://api.acme.com/x"),
                &internal
            ),
            None
        );
        assert!(is_internal("10.1.2.3", none));
        assert!(is_internal("db.internal", none));
    }

    #[test]
    fn inbound_content_is_untrusted_unless_declared_trusted() {
        let none: &[String] = &[];
        assert!(is_untrusted_input(
            &payload(Kind::MessageReceived, "chat.inbound", "ticket://1"),
            none
        ));
        assert!(is_untrusted_input(
            &payload(Kind::ToolResult, "web.fetch", "https://evil.example/x"),
            none
        ));
        assert!(!is_untrusted_input(
            &payload(Kind::ToolResult, "crm.lookup", "crm://customers/1"),
            none
        ));
        let mut trusted = payload(Kind::MessageReceived, "chat.inbound", "ticket://1");
        trusted.attrs = serde_json::json!({"source_trust": "trusted"}).as_object().cloned();
        assert!(!is_untrusted_input(&trusted, none));
    }
}
