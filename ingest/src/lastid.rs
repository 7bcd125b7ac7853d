//! The LastID adapter: LastID agents ship their signed, hash-chained audit records to
//! `POST /v1/adapters/lastid/audit`, and each verified record becomes a Custos event.
//!
//! ```text
//!  {"records":[…]} ── per record: parse ─ enrolled? ─ integrity_hash ─ signature ─ chain
//!        │                         (custos_event::lastid: LastID's own rules)
//!        ▼ verified
//!  event {kind from event_type, memory_id, attrs lastid.record = the record's exact bytes}
//!        │ signed by the agent's adapter key (attest::Attestor, source `lastid`, one per
//!        │ realm), its seq = the record's seq, its prev = the last event's digest:
//!        │ a resent record makes the same bytes, so the node answers `duplicate`
//!        ▼
//!  the node's verify + append path ─▶ one verdict per record, as POST /v1/events answers
//! ```
//!
//! Enrollment (`POST /v1/agents` with `"source":"lastid"`) records the LastID DID's realm
//! and ed25519 key in `DATA/attest/lastid/state.json`, and logs them in the adapter
//! root's delegation to the agent's key (so `custos verify` can check every stored
//! record again).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use custos_event::lastid::Record;
use custos_event::{ChainState, Reason, Rejection, Signer};
use custos_stage::{Status, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ApiError;
use crate::http::AppState;

/// Recent records kept per agent to tell a resend (duplicate) from a fork.
const RECENT: usize = 64;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Enrolled {
    realm: String,
    /// Hex of the 32-byte ed25519 public key.
    public_key: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Chain {
    next_seq: u64,
    /// The last stored record's `integrity_hash`.
    last_hash: Option<String>,
    /// blake3 hex of the last stored event's payload (the next event's `prev`).
    last_digest: Option<String>,
    /// (seq, integrity_hash, log index) of recent stored records.
    recent: VecDeque<(u64, String, Option<u64>)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    agents: BTreeMap<String, Enrolled>,
    chains: BTreeMap<String, Chain>,
}

/// The adapter's state: who is enrolled, and where each agent's chain stands.
pub(crate) struct LastId {
    path: PathBuf,
    table: tokio::sync::Mutex<Table>,
    /// Where each enrollment goes as a control-topic record (a writer bridged to Kafka).
    notes: Option<crate::registry::ControlNotes>,
    /// Records sent on `notes` so far (under `table`'s lock after the start): the
    /// published count ([`crate::registry::Published::notes`]) an answer waits for.
    sent: std::sync::atomic::AtomicU64,
}

fn io(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(503, "store_failed", format!("LastID adapter state: {error}"))
}

impl LastId {
    /// Opens the state under `data`; with `notes`, every enrollment it holds is sent
    /// there at once (again: the control topic keeps the latest per agent), so ingest
    /// nodes learn agents enrolled before, or whose record was lost in a crash.
    pub(crate) fn open(data: &std::path::Path, notes: Option<crate::registry::ControlNotes>) -> Self {
        let path = data.join("attest").join("lastid").join("state.json");
        let table: Table = fs_err::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let mut sent = 0;
        if let Some(notes) = &notes {
            for (did, enrolled) in &table.agents {
                let _ = notes.send(crate::registry::lastid_record(did, &enrolled.realm));
                sent += 1;
            }
        }
        Self {
            path,
            table: tokio::sync::Mutex::new(table),
            notes,
            sent: sent.into(),
        }
    }

    fn save(&self, table: &Table) -> Result<(), ApiError> {
        if let Some(parent) = self.path.parent() {
            fs_err::create_dir_all(parent).map_err(io)?;
        }
        custos_store::write_atomic(&self.path, &serde_json::to_vec(table).map_err(io)?).map_err(io)
    }
}

/// A public key as enrollment gives it: 64 hex digits or base64 of 32 bytes.
fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text).ok().or_else(|| {
        let trimmed = text.trim_end_matches('=');
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
            .ok()
    })?;
    let key = <[u8; 32]>::try_from(bytes.as_slice()).ok()?;
    ed25519_dalek::VerifyingKey::from_bytes(&key).ok()?;
    Some(key)
}

/// `POST /v1/agents` with `"source":"lastid"` (admin): maps a LastID DID to a realm and
/// its key, and enrolls the key the adapter signs its events with.
pub(crate) async fn enroll(
    state: &AppState,
    did: &str,
    realm: &str,
    public_key: Option<&str>,
) -> Result<Response, ApiError> {
    if !custos_event::lastid::valid_did(did) {
        return Err(ApiError::new(
            400,
            "bad_did",
            format!("`{did}` is not a LastID agent identifier (did:key:… or did:lastid:agent:…)"),
        ));
    }
    if !custos_event::payload::valid_realm(realm) {
        return Err(ApiError::new(
            400,
            "bad_realm",
            format!("realm `{realm}` must be 1-64 characters of [A-Za-z0-9._-]"),
        ));
    }
    let derived = custos_event::lastid::key_of(did);
    let key = match (public_key, derived) {
        (Some(text), derived) => {
            let key = parse_public_key(text).ok_or_else(|| {
                ApiError::new(
                    400,
                    "bad_public_key",
                    format!("public key `{text}` is not 64 hex digits or base64 of a 32-byte ed25519 key"),
                )
            })?;
            if derived.is_some_and(|derived| derived != key) {
                return Err(ApiError::new(
                    400,
                    "bad_public_key",
                    format!("`{did}` names its own key, and `{text}` is another"),
                ));
            }
            key
        }
        (None, Some(derived)) => derived,
        (None, None) => {
            return Err(ApiError::new(
                400,
                "bad_public_key",
                format!("`{did}` does not carry its key: give it with --public-key (public_key)"),
            ));
        }
    };
    let adapter = &state.lastid;
    let mut table = adapter.table.lock().await;
    if table.agents.contains_key(did) {
        return Err(ApiError::new(
            409,
            "agent_exists",
            format!("LastID agent `{did}` is already enrolled"),
        ));
    }
    let attestor = state.attestor("lastid", realm, realm)?;
    let extra: Map<String, Value> = [
        ("lastid.did".to_owned(), Value::from(did)),
        ("lastid.public_key".to_owned(), Value::from(hex::encode(key))),
    ]
    .into_iter()
    .collect();
    let custos_did = attestor.enroll(state, "enroll", did, extra).await?;
    table.agents.insert(
        did.to_owned(),
        Enrolled {
            realm: realm.to_owned(),
            public_key: hex::encode(key),
        },
    );
    adapter.save(&table)?;
    if let Some(notes) = &adapter.notes {
        // Sent on by the bridge's thread (a closed channel: the node is stopping, and
        // the next start sends every enrollment again).
        let _ = notes.send(crate::registry::lastid_record(did, realm));
        let number = adapter.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        drop(table);
        // Answered once ingest nodes can place the agent's records.
        state.published(|published| published.notes >= number).await;
    }
    Ok((
        axum::http::StatusCode::CREATED,
        Json(serde_json::json!({
            "did": did,
            "realm": realm,
            "source": "lastid",
            "public_key": hex::encode(key),
            "custos_did": custos_did,
            "attested_by": attestor.root_did(),
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct Batch {
    records: Vec<Box<serde_json::value::RawValue>>,
}

fn rejected(index: usize, rejection: &Rejection) -> Verdict {
    Verdict {
        index,
        status: Status::Rejected,
        reason: Some(rejection.reason.code().into()),
        message: Some(rejection.message.clone()),
        log_index: None,
        flags: Vec::new(),
        missing: None,
    }
}

/// The Custos event members for a verified record (without agent, seq, prev, realm).
fn event_of(record: &Record, raw: &str, root: &str) -> Map<String, Value> {
    let (kind, outcome) = record.kind().unwrap_or((custos_event::Kind::PolicyChange, None));
    let meta = |names: &[&str]| {
        names
            .iter()
            .find_map(|name| record.metadata.get(*name).and_then(Value::as_str))
            .map(str::to_owned)
    };
    let mut event = Map::new();
    event.insert("kind".into(), Value::from(kind.as_str()));
    let ts = match &record.timestamp {
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|ts| ts.with_timezone(&chrono::Utc)),
        Value::Number(number) => number.as_i64().and_then(|number| match number > 100_000_000_000 {
            true => chrono::DateTime::from_timestamp_millis(number),
            false => chrono::DateTime::from_timestamp(number, 0),
        }),
        _ => None,
    };
    // A timestamp the record does not give usably: the epoch, which the node refuses as
    // clock_skew with the record's own value in attrs (never a made-up time).
    let ts = ts.unwrap_or_default();
    event.insert(
        "ts".into(),
        Value::from(ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
    );
    let action = meta(&["tool", "tool_name", "action"]).unwrap_or_else(|| record.event_type.clone());
    event.insert(
        "action".into(),
        Value::from(action.chars().take(200).collect::<String>()),
    );
    let target = match kind {
        custos_event::Kind::Delegation => meta(&["child_did", "spawned_did", "sub_agent_did"]),
        _ => meta(&["target", "path", "url", "credential", "credential_id", "recipient"]),
    };
    if let Some(target) = target {
        event.insert(
            "target".into(),
            Value::from(target.chars().take(1000).collect::<String>()),
        );
    }
    if let Some(outcome) = outcome {
        event.insert("outcome".into(), Value::from(outcome));
    }
    if let Some(memory) = &record.memory_id {
        event.insert(
            "memory_id".into(),
            Value::from(memory.chars().take(200).collect::<String>()),
        );
    }
    let mut attrs = Map::new();
    attrs.insert("custos.source".into(), Value::from("lastid"));
    attrs.insert("custos.attested_by".into(), Value::from(root));
    attrs.insert("custos.attested_for".into(), Value::from(record.agent_did.clone()));
    attrs.insert("lastid.event_type".into(), Value::from(record.event_type.clone()));
    attrs.insert("lastid.record".into(), Value::from(raw));
    if record.kind().is_none() {
        attrs.insert("lastid.unmapped".into(), Value::from(true));
    }
    // Well-known attrs the detector reads, when the record's metadata has them.
    for name in ["source_trust", "sensitivity", "destination", "credential_owner"] {
        if let Some(value) = record.metadata.get(name) {
            attrs.insert(name.into(), value.clone());
        }
    }
    event.insert("attrs".into(), Value::Object(attrs));
    event
}

/// What the chain says of a verified record.
enum Step {
    Fresh,
    Duplicate(Option<u64>),
    Refused(Rejection),
}

fn step(chain: &Chain, record: &Record) -> Step {
    let did = &record.agent_did;
    if record.seq < chain.next_seq {
        return match chain.recent.iter().find(|(seq, _, _)| *seq == record.seq) {
            Some((_, hash, log_index)) if *hash == record.integrity_hash => Step::Duplicate(*log_index),
            Some((_, hash, _)) => Step::Refused(Rejection::new(
                Reason::ChainFork,
                format!(
                    "record seq {} of `{did}` was already stored with integrity_hash {hash}; this one has {}: the agent's key may be cloned or its history rewritten",
                    record.seq, record.integrity_hash
                ),
            )),
            None => Step::Refused(Rejection::new(
                Reason::Replay,
                format!(
                    "record seq {} of `{did}` is older than the {RECENT} most recent stored ones (next is {})",
                    record.seq, chain.next_seq
                ),
            )),
        };
    }
    if record.seq > chain.next_seq {
        return Step::Fresh;
    }
    if record.prev_hash != chain.last_hash {
        return Step::Refused(Rejection::new(
            Reason::ChainBroken,
            match &chain.last_hash {
                Some(last) => format!(
                    "record seq {} of `{did}` has prev_hash {}, not the integrity_hash of seq {} ({last})",
                    record.seq,
                    record.prev_hash.as_deref().unwrap_or("null"),
                    record.seq.saturating_sub(1)
                ),
                None => format!(
                    "record seq 0 of `{did}` must have prev_hash null, not {}",
                    record.prev_hash.as_deref().unwrap_or("null")
                ),
            },
        ));
    }
    Step::Fresh
}

/// `POST /v1/adapters/lastid/audit`: authenticated by each record's signature.
pub(crate) async fn post_audit(
    State(state): State<AppState>,
    ConnectInfo(remote): ConnectInfo<std::net::SocketAddr>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let source = remote.ip();
    let remote = remote.to_string();
    state.rejects.admit(source, "unverifiable records")?;
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(error) => {
            let rejection = Rejection::new(Reason::Malformed, format!("expected {{\"records\": [ … ]}}: {error}"));
            crate::http::keep_rejected(&state, &rejection, &body, &remote).await?;
            state.rejects.charge(source, 1);
            return Err(ApiError::new(400, "malformed", rejection.message));
        }
    };
    if batch.records.len() > state.config.max_events_per_request {
        return Err(ApiError::new(
            413,
            "too_many_events",
            format!(
                "request holds {} records; the limit is {}",
                batch.records.len(),
                state.config.max_events_per_request
            ),
        ));
    }
    let adapter = &state.lastid;
    let mut table = adapter.table.lock().await;
    let mut verdicts: Vec<Option<Verdict>> = vec![None; batch.records.len()];
    // Verified records to append, per agent in order: (request index, record, chain before).
    let mut fresh: Vec<(usize, Record, Chain)> = Vec::new();
    let mut working: BTreeMap<String, Chain> = BTreeMap::new();
    let mut unverified = 0;
    for (index, raw) in batch.records.iter().enumerate() {
        let bytes = raw.get().as_bytes();
        let checked = Record::parse(bytes).and_then(|record| {
            let enrolled = table.agents.get(&record.agent_did).ok_or_else(|| {
                Rejection::new(
                    Reason::UnknownAgent,
                    format!(
                        "LastID agent `{}` is not enrolled: custos agent enroll {} --source lastid --public-key KEY --realm R",
                        record.agent_did, record.agent_did
                    ),
                )
            })?;
            let key: [u8; 32] = hex::decode(&enrolled.public_key)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .ok_or_else(|| Rejection::new(Reason::BadKeyid, "the enrolled key is unreadable"))?;
            record.verify(&key)?;
            Ok(record)
        });
        let record = match checked {
            Ok(record) => record,
            Err(rejection) => {
                if matches!(
                    rejection.reason,
                    Reason::Malformed
                        | Reason::BadBase64
                        | Reason::UnknownAgent
                        | Reason::BadSignature
                        | Reason::IntegrityMismatch
                ) {
                    unverified += 1;
                }
                crate::http::keep_rejected(&state, &rejection, bytes, &remote).await?;
                verdicts[index] = Some(rejected(index, &rejection));
                continue;
            }
        };
        let chain = working
            .entry(record.agent_did.clone())
            .or_insert_with(|| table.chains.get(&record.agent_did).cloned().unwrap_or_default());
        match step(chain, &record) {
            Step::Duplicate(log_index) => {
                verdicts[index] = Some(Verdict {
                    index,
                    status: Status::Duplicate,
                    reason: None,
                    message: None,
                    log_index,
                    flags: Vec::new(),
                    missing: None,
                });
            }
            Step::Refused(rejection) => {
                crate::http::keep_rejected(&state, &rejection, bytes, &remote).await?;
                verdicts[index] = Some(rejected(index, &rejection));
            }
            Step::Fresh => {
                let before = chain.clone();
                chain.next_seq = record.seq + 1;
                chain.last_hash = Some(record.integrity_hash.clone());
                fresh.push((index, record, before));
            }
        }
    }
    state.rejects.charge(source, unverified);
    // Sign each verified record's event as its agent's adapter key, seq for seq.
    let mut raws = Vec::new();
    // Per event sent: its record's place in `fresh`, and the event's payload digest.
    let mut placed: Vec<(usize, Option<String>)> = Vec::new();
    let mut keys: BTreeMap<String, (std::sync::Arc<crate::attest::Attestor>, custos_event::AgentKey)> = BTreeMap::new();
    let mut digests: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (position, (index, record, before)) in fresh.iter().enumerate() {
        let realm = table.agents[&record.agent_did].realm.clone();
        if !keys.contains_key(&record.agent_did) {
            let attestor = state.attestor("lastid", &realm, &realm)?;
            attestor.enroll(&state, &remote, &record.agent_did, Map::new()).await?;
            let key = attestor.agent_key(&record.agent_did);
            keys.insert(record.agent_did.clone(), (attestor, key));
        }
        let (attestor, key) = &keys[&record.agent_did];
        let prev = digests
            .get(&record.agent_did)
            .cloned()
            .unwrap_or_else(|| before.last_digest.clone());
        let chain = ChainState {
            next_seq: record.seq,
            prev,
        };
        let mut signer = Signer::resume(key.clone(), realm, chain);
        let raw = batch.records[*index].get();
        match signer.sign_object(event_of(record, raw, attestor.root_did()), chrono::Utc::now()) {
            Ok(envelope) => {
                digests.insert(record.agent_did.clone(), signer.chain().prev.clone());
                placed.push((position, signer.chain().prev.clone()));
                raws.push(envelope.to_json().into_bytes());
            }
            Err(message) => {
                let rejection = Rejection::new(
                    Reason::BadPayload,
                    format!("the record makes no valid event: {message}"),
                );
                verdicts[*index] = Some(rejected(*index, &rejection));
            }
        }
    }
    let answers = match raws.is_empty() {
        true => Vec::new(),
        false => crate::http::ingest_raws(&state, raws, remote.clone()).await?,
    };
    // Only what the node stored moves an agent's chain on; a refused event leaves the
    // chain where it was before that record.
    let mut stopped: BTreeMap<String, Chain> = BTreeMap::new();
    for ((position, digest), answer) in placed.into_iter().zip(answers) {
        let (index, record, before) = &fresh[position];
        let mut verdict = answer;
        verdict.index = *index;
        let stored = verdict.status != Status::Rejected;
        let chain = table.chains.entry(record.agent_did.clone()).or_default();
        if stored && !stopped.contains_key(&record.agent_did) {
            chain.next_seq = record.seq + 1;
            chain.last_hash = Some(record.integrity_hash.clone());
            chain.last_digest = digest;
            chain
                .recent
                .push_back((record.seq, record.integrity_hash.clone(), verdict.log_index));
            while chain.recent.len() > RECENT {
                chain.recent.pop_front();
            }
        } else if !stored {
            stopped
                .entry(record.agent_did.clone())
                .or_insert_with(|| before.clone());
        }
        verdicts[*index] = Some(verdict);
    }
    for (did, before) in stopped {
        let recent = table
            .chains
            .get(&did)
            .map(|chain| chain.recent.clone())
            .unwrap_or_default();
        table.chains.insert(did, Chain { recent, ..before });
    }
    adapter.save(&table)?;
    let verdicts: Vec<Verdict> = verdicts
        .into_iter()
        .enumerate()
        .map(|(index, verdict)| {
            verdict.unwrap_or_else(|| rejected(index, &Rejection::new(Reason::BadPayload, "no verdict")))
        })
        .collect();
    Ok(Json(verdicts).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node bridged to Kafka sends every LastID enrollment it holds at start (the
    /// control topic keeps the latest per agent), so ingest nodes place agents enrolled
    /// before the bridge, or whose record a crash lost.
    #[test]
    fn every_enrollment_held_is_noted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = Table::default();
        for (did, realm) in [("did:lastid:agent:a", "ops"), ("did:lastid:agent:b", "eng")] {
            table.agents.insert(
                did.into(),
                Enrolled {
                    realm: realm.into(),
                    public_key: "00".repeat(32),
                },
            );
        }
        LastId::open(dir.path(), None).save(&table).unwrap();
        let (notes, noted) = std::sync::mpsc::channel();
        let opened = LastId::open(dir.path(), Some(notes));
        let sent: Vec<(String, Vec<u8>)> = noted.try_iter().collect();
        assert_eq!(
            sent,
            [
                crate::registry::lastid_record("did:lastid:agent:a", "ops"),
                crate::registry::lastid_record("did:lastid:agent:b", "eng"),
            ]
        );
        let record: serde_json::Value = serde_json::from_slice(&sent[0].1).unwrap();
        assert_eq!(
            record,
            serde_json::json!({"v": 1, "type": "lastid", "status": "enrolled",
                "agent": "did:lastid:agent:a", "realm": "ops"})
        );
        assert_eq!(sent[0].0, "lastid:did:lastid:agent:a");
        drop(opened);
    }
}
