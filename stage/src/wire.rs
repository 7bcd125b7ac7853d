//! The contract's records as bytes, for transports that cross a process boundary.
//!
//! Every record is one JSON object with a format version `v` (1). Envelopes travel in
//! their DSSE JSON form and payloads as standard base64, so a record can be checked by
//! anyone who reads `docs/architecture.md`, without this crate.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use custos_event::{ACTION_PAYLOAD_TYPE, Envelope, FINDING_PAYLOAD_TYPE, Observation, SignedEntry};
use serde::{Deserialize, Serialize};

use crate::{Appended, Committed, ControlOp, EventBatch, EventItem, ItemCheck, Refused, Submission};

/// The format version written, and the only one read.
pub const VERSION: u32 = 1;

/// Envelopes larger than this are refused when read back (findings and action records
/// are small; this bounds a malformed record's cost).
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;

/// A submission with the ticket its receipt answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct SubmissionRecord {
    pub v: u32,
    /// The submitting process (its receipts come back keyed by it).
    pub origin: String,
    pub ticket: u64,
    pub submission: WireSubmission,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireSubmission {
    Events {
        remote: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        realm: String,
        items: Vec<WireEventItem>,
    },
    Finding {
        envelope: String,
    },
    Action {
        envelope: String,
        /// The responder lease tenure the action was made under, when responders contend.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_epoch: Option<u64>,
    },
    Control {
        op: ControlOp,
    },
    Adapter {
        route: String,
        remote: String,
        /// Header name (lowercase) → value, only [`crate::ADAPTER_HEADERS`].
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        headers: std::collections::BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_sha256: Option<String>,
        /// The request body in standard base64.
        body: String,
        /// The partition whose writer serves it (over a partition set, once routed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partition: Option<u32>,
        /// The realm the ingest node placed it by (the record's key), when it could tell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        realm: Option<String>,
    },
}

/// One envelope of an [`EventBatch`]: `raw` is the client's bytes in base64 (they need
/// not be UTF-8: a refused item is kept as sent).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireEventItem {
    pub raw: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyid: Option<String>,
    /// `verified`, or `refused` with `code`, `message` and `signed`.
    pub check: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub signed: bool,
    /// A refused item cut to fit the record: the whole input's size and blake3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// The writer's answer to a ticket.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReceiptRecord {
    pub v: u32,
    pub origin: String,
    pub ticket: u64,
    pub outcome: Outcome,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Appended(Appended),
    Refused(Refused),
}

/// A committed record.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommittedRecord {
    pub v: u32,
    pub record: WireCommitted,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WireCommitted {
    Event {
        observation: Box<Observation>,
    },
    /// Consecutive events of one agent from one group commit, in log order: one broker
    /// record instead of one per event.
    Events {
        observations: Vec<Observation>,
    },
    Finding {
        log_index: u64,
        payload: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<Box<SignedEntry>>,
    },
    Action {
        log_index: u64,
        payload: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<Box<SignedEntry>>,
    },
    Control {
        log_index: u64,
        payload: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entry: Option<Box<SignedEntry>>,
    },
    Replayed {
        next_index: u64,
    },
}

fn envelope(json: &str, allowed: &str) -> Result<Envelope, String> {
    custos_event::verify::decode_envelope(json.as_bytes(), MAX_ENVELOPE_BYTES, &[allowed])
        .map(|decoded| decoded.envelope)
        .map_err(|rejection| format!("{}: {}", rejection.reason.code(), rejection.message))
}

fn bytes(base64: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(base64)
        .map_err(|error| format!("payload is not base64: {error}"))
}

fn check_version(v: u32) -> Result<(), String> {
    if v == VERSION {
        Ok(())
    } else {
        Err(format!("record format version {v}; this build reads version {VERSION}"))
    }
}

/// Encodes a submission with its origin and ticket.
pub fn encode_submission(origin: &str, ticket: u64, submission: &Submission) -> Result<Vec<u8>, String> {
    let submission = match submission {
        Submission::Events(batch) => WireSubmission::Events {
            remote: batch.remote.clone(),
            realm: batch.realm.clone(),
            items: batch.items.iter().map(wire_item).collect(),
        },
        Submission::Finding(envelope) => WireSubmission::Finding {
            envelope: envelope.to_json(),
        },
        Submission::Action { envelope, lease_epoch } => WireSubmission::Action {
            envelope: envelope.to_json(),
            lease_epoch: *lease_epoch,
        },
        Submission::Control(op) => WireSubmission::Control { op: op.clone() },
        Submission::Adapter(request) => WireSubmission::Adapter {
            route: request.route.clone(),
            remote: request.remote.clone(),
            headers: request.headers.iter().cloned().collect(),
            token_sha256: request.token_sha256.clone(),
            body: STANDARD.encode(&request.body),
            partition: request.partition,
            realm: request.realm.clone(),
        },
    };
    serde_json::to_vec(&SubmissionRecord {
        v: VERSION,
        origin: origin.to_owned(),
        ticket,
        submission,
    })
    .map_err(|error| format!("cannot encode a submission: {error}"))
}

/// Decodes a submission record: (origin, ticket, submission).
pub fn decode_submission(bytes: &[u8]) -> Result<(String, u64, Submission), String> {
    let record: SubmissionRecord =
        serde_json::from_slice(bytes).map_err(|error| format!("not a submission record: {error}"))?;
    check_version(record.v)?;
    let submission = match record.submission {
        WireSubmission::Events { remote, realm, items } => Submission::Events(EventBatch {
            remote,
            realm,
            items: items.into_iter().map(event_item).collect::<Result<_, _>>()?,
        }),
        WireSubmission::Finding { envelope: json } => Submission::Finding(envelope(&json, FINDING_PAYLOAD_TYPE)?),
        WireSubmission::Action {
            envelope: json,
            lease_epoch,
        } => Submission::Action {
            envelope: envelope(&json, ACTION_PAYLOAD_TYPE)?,
            lease_epoch,
        },
        WireSubmission::Control { op } => Submission::Control(op),
        WireSubmission::Adapter {
            route,
            remote,
            headers,
            token_sha256,
            body,
            partition,
            realm,
        } => {
            if !crate::ADAPTER_ROUTES.contains(&route.as_str()) {
                return Err(format!("`{route}` is not an adapter route"));
            }
            if let Some(name) = headers
                .keys()
                .find(|name| !crate::ADAPTER_HEADERS.contains(&name.as_str()))
            {
                return Err(format!("header `{name}` is not one an adapter request carries"));
            }
            if token_sha256
                .as_deref()
                .is_some_and(|digest| digest.len() != 64 || !digest.bytes().all(|byte| byte.is_ascii_hexdigit()))
            {
                return Err("`token_sha256` is not 64 hex digits".into());
            }
            Submission::Adapter(crate::AdapterRequest {
                route,
                remote,
                headers: headers.into_iter().collect(),
                token_sha256,
                body: STANDARD
                    .decode(&body)
                    .map_err(|error| format!("the adapter request body is not base64: {error}"))?,
                partition,
                realm,
            })
        }
    };
    Ok((record.origin, record.ticket, submission))
}

fn wire_item(item: &EventItem) -> WireEventItem {
    let (check, code, message, signed, whole) = match &item.check {
        ItemCheck::Verified => ("verified", None, None, false, None),
        ItemCheck::Refused {
            code,
            message,
            signed,
            whole,
        } => (
            "refused",
            Some(code.clone()),
            Some(message.clone()),
            *signed,
            whole.as_ref(),
        ),
    };
    WireEventItem {
        raw: STANDARD.encode(&item.raw),
        keyid: item.keyid.clone(),
        check: check.to_owned(),
        code,
        message,
        signed,
        size: whole.map(|whole| whole.size),
        blake3: whole.map(|whole| whole.blake3.clone()),
    }
}

fn event_item(item: WireEventItem) -> Result<EventItem, String> {
    let check = match item.check.as_str() {
        "verified" => ItemCheck::Verified,
        "refused" => ItemCheck::Refused {
            code: item.code.ok_or("a refused item needs a `code`")?,
            message: item.message.unwrap_or_default(),
            signed: item.signed,
            whole: match (item.size, item.blake3) {
                (None, None) => None,
                (Some(size), Some(blake3))
                    if blake3.len() == 64 && blake3.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')) =>
                {
                    Some(crate::WholeInput { size, blake3 })
                }
                _ => return Err("a cut item needs both `size` and `blake3` (64 lowercase hex digits)".into()),
            },
        },
        other => return Err(format!("item check `{other}` is neither `verified` nor `refused`")),
    };
    Ok(EventItem {
        raw: bytes(&item.raw)?,
        keyid: item.keyid,
        check,
    })
}

pub fn encode_receipt(origin: &str, ticket: u64, outcome: Result<Appended, Refused>) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&ReceiptRecord {
        v: VERSION,
        origin: origin.to_owned(),
        ticket,
        outcome: match outcome {
            Ok(appended) => Outcome::Appended(appended),
            Err(refused) => Outcome::Refused(refused),
        },
    })
    .map_err(|error| format!("cannot encode a receipt: {error}"))
}

pub fn decode_receipt(bytes: &[u8]) -> Result<ReceiptRecord, String> {
    let record: ReceiptRecord =
        serde_json::from_slice(bytes).map_err(|error| format!("not a receipt record: {error}"))?;
    check_version(record.v)?;
    Ok(record)
}

pub fn encode_committed(record: &Committed) -> Result<Vec<u8>, String> {
    let record = match record {
        Committed::Event(observation) => WireCommitted::Event {
            observation: observation.clone(),
        },
        Committed::Finding {
            log_index,
            payload,
            entry,
        } => WireCommitted::Finding {
            log_index: *log_index,
            payload: STANDARD.encode(payload),
            entry: entry.clone(),
        },
        Committed::Action {
            log_index,
            payload,
            entry,
        } => WireCommitted::Action {
            log_index: *log_index,
            payload: STANDARD.encode(payload),
            entry: entry.clone(),
        },
        Committed::Control {
            log_index,
            payload,
            entry,
        } => WireCommitted::Control {
            log_index: *log_index,
            payload: STANDARD.encode(payload),
            entry: entry.clone(),
        },
        Committed::Replayed { next_index } => WireCommitted::Replayed {
            next_index: *next_index,
        },
    };
    serde_json::to_vec(&CommittedRecord { v: VERSION, record })
        .map_err(|error| format!("cannot encode a committed record: {error}"))
}

/// Encodes a run of one agent's consecutive events as one record.
pub fn encode_events(observations: &[Observation]) -> Result<Vec<u8>, String> {
    #[derive(Serialize)]
    struct Run<'a> {
        v: u32,
        record: RunBody<'a>,
    }
    #[derive(Serialize)]
    #[serde(tag = "type", rename = "events")]
    struct RunBody<'a> {
        observations: &'a [Observation],
    }
    serde_json::to_vec(&Run {
        v: VERSION,
        record: RunBody { observations },
    })
    .map_err(|error| format!("cannot encode committed events: {error}"))
}

/// Decodes a committed-topic record: one record, or the events of a run in order.
pub fn decode_committed(bytes: &[u8]) -> Result<Vec<Committed>, String> {
    let record: CommittedRecord =
        serde_json::from_slice(bytes).map_err(|error| format!("not a committed record: {error}"))?;
    check_version(record.v)?;
    Ok(vec![match record.record {
        WireCommitted::Events { observations } => {
            return Ok(observations
                .into_iter()
                .map(|observation| Committed::Event(Box::new(observation)))
                .collect());
        }
        WireCommitted::Event { observation } => Committed::Event(observation),
        WireCommitted::Finding {
            log_index,
            payload,
            entry,
        } => Committed::Finding {
            log_index,
            payload: self::bytes(&payload)?,
            entry,
        },
        WireCommitted::Action {
            log_index,
            payload,
            entry,
        } => Committed::Action {
            log_index,
            payload: self::bytes(&payload)?,
            entry,
        },
        WireCommitted::Control {
            log_index,
            payload,
            entry,
        } => Committed::Control {
            log_index,
            payload: self::bytes(&payload)?,
            entry,
        },
        WireCommitted::Replayed { next_index } => Committed::Replayed { next_index },
    }])
}

/// The agent a record is about: the Kafka key, so one agent's records stay in order on
/// one partition.
pub fn committed_key(record: &Committed) -> String {
    fn agent_of(payload: &[u8]) -> String {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            agent: String,
        }
        serde_json::from_slice::<Head>(payload)
            .map(|head| head.agent)
            .unwrap_or_default()
    }
    match record {
        Committed::Event(observation) => observation.payload.agent.clone(),
        Committed::Finding { payload, .. } | Committed::Action { payload, .. } | Committed::Control { payload, .. } => {
            agent_of(payload)
        }
        Committed::Replayed { .. } => String::new(),
    }
}

/// The key of a submission: the realm it is about. Every record of a realm goes to one
/// partition ([`partition_for`]), so one log holds a realm's agents, their sub-agents,
/// findings, actions and control entries, and a cascade never crosses logs.
pub fn submission_key(submission: &Submission) -> String {
    fn realm_of(payload: &[u8]) -> String {
        #[derive(Deserialize)]
        struct Head {
            #[serde(default)]
            realm: String,
        }
        serde_json::from_slice::<Head>(payload)
            .map(|head| head.realm)
            .unwrap_or_default()
    }
    match submission {
        Submission::Events(batch) => batch.realm.clone(),
        Submission::Finding(envelope) | Submission::Action { envelope, .. } => realm_of(&envelope.payload),
        Submission::Control(ControlOp::Enroll { realm, .. } | ControlOp::Revoke { realm, .. }) => realm.clone(),
        // The realm the ingest node could tell (a LastID enrollment's, its view of a
        // LastID batch's agents); otherwise only the writer's node knows it (the token's,
        // the adapter's configuration), and the empty key's partition takes it first.
        Submission::Adapter(request) => request.realm.clone().unwrap_or_default(),
    }
}

/// The partition a submission record goes to among `partitions`: its key's
/// ([`partition_for`]), or the one an adapter request was routed to
/// ([`crate::AdapterRequest::partition`]), refused when the topic has no such partition.
pub fn submission_partition(submission: &Submission, partitions: i32) -> Result<i32, String> {
    match submission {
        Submission::Adapter(crate::AdapterRequest {
            partition: Some(partition),
            ..
        }) => i32::try_from(*partition)
            .ok()
            .filter(|partition| *partition < partitions.max(1))
            .ok_or_else(|| format!("partition {partition} is not one of the topic's {partitions}")),
        other => Ok(partition_for(&submission_key(other), partitions)),
    }
}

/// The partition of `key` among `partitions`: the first four bytes of its blake3 hash,
/// little-endian, modulo the count. Every producer places records with this, not with a
/// client library's partitioner, so any implementation agrees.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    custos_event::partition_of(key, partitions.max(1).unsigned_abs()) as i32
}
