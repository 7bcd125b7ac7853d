//! The writer's state, loaded from the store: at start, and again in place after a write
//! failed (the registry had already taken in the group that never reached the disk).
//!
//! ```text
//!  segments + WAL ──Log::open──▶ every entry in order ──fold──▶ registry, node chain
//!                                       └──▶ the detector feed (events from `replay_from`,
//!                                            every finding and action record)
//! ```

use chrono::Utc;
use custos_event::{
    ACTION_PAYLOAD_TYPE, AgentKey, CONTROL_PAYLOAD_TYPE, ChainState, EVENT_PAYLOAD_TYPE, FINDING_PAYLOAD_TYPE,
    Observation, Payload, Signal,
};
use custos_store::{Log, LogEntry};

use crate::registry::{ControlPayload, Registry};
use crate::{NodeConfig, NodeError};
use custos_stage::Committed;
use custos_stage::embedded::Fanout;

/// The log and what is folded from it.
pub(crate) struct Loaded {
    pub(crate) log: Log,
    pub(crate) registry: Registry,
    pub(crate) node_chain: ChainState,
    pub(crate) store_id: String,
    /// The latest entries of each system signer (detector, responder), when findings
    /// and actions were read (a publisher is wired in).
    pub(crate) system: SystemChains,
}

/// Per system key (`did:key`): its latest entries, (seq, payload digest, log index),
/// oldest first, so a submission delivered twice (Kafka redelivers after a crash) is
/// answered with the first append instead of being appended again.
#[derive(Default, Debug)]
pub(crate) struct SystemChains(std::collections::HashMap<String, std::collections::VecDeque<(u64, [u8; 32], u64)>>);

/// How many recent entries per system key are kept for that check.
const SYSTEM_WINDOW: usize = 256;

/// What a system key's new payload is, against its recent entries.
pub(crate) enum SystemStep {
    /// Not seen: append it.
    New,
    /// The same payload at the same seq is at this log index already.
    Duplicate(u64),
    /// Another payload already has this seq.
    Fork(u64),
}

impl SystemChains {
    pub(crate) fn step(&self, keyid: &str, seq: u64, digest: &[u8; 32]) -> SystemStep {
        let Some(recent) = self.0.get(keyid) else {
            return SystemStep::New;
        };
        match recent.iter().find(|(known, ..)| *known == seq) {
            Some((_, known, index)) if known == digest => SystemStep::Duplicate(*index),
            Some((_, _, index)) => SystemStep::Fork(*index),
            None => SystemStep::New,
        }
    }

    pub(crate) fn record(&mut self, keyid: &str, seq: u64, digest: [u8; 32], log_index: u64) {
        let recent = self.0.entry(keyid.to_owned()).or_default();
        if recent.len() >= SYSTEM_WINDOW {
            recent.pop_front();
        }
        recent.push_back((seq, digest, log_index));
    }
}

/// The `seq` of a system signer's payload.
pub(crate) fn payload_seq(payload: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: Option<u64>,
    }
    serde_json::from_slice::<Seq>(payload).ok().and_then(|head| head.seq)
}

/// Opens the log (recovering from the WAL) and folds the registry and the node's control
/// chain from it; hands `feed` the events from `replay_from` and every finding and action.
///
/// With a registry snapshot that checks out (signed by the node key, and its log size and
/// root those of the log), only the entries after it are folded, and the tree comes from
/// its cache: a restart reads no old segment but the rows of findings and actions.
pub(crate) fn load(
    config: &NodeConfig,
    node_key: &AgentKey,
    feed: Option<&Fanout>,
    replay_from: u64,
    with_entries: bool,
) -> Result<Loaded, NodeError> {
    let info = custos_store::StoreInfo::open(&config.data, true)?;
    let snapshot = match Snapshot::read(&config.data, &info.store_id, node_key) {
        Ok(snapshot) => snapshot,
        Err(reason) => {
            tracing::error!(%reason, "the registry snapshot does not check out; folding the whole log instead");
            None
        }
    };
    let (mut registry, mut node_chain, folded_from) = match &snapshot {
        Some(snapshot) => {
            let (registry, node_chain) = snapshot.body.restore(config.chain_window);
            (registry, node_chain, snapshot.body.log_size)
        }
        None => {
            let mut registry = Registry::new(config.chain_window);
            // Events in sealed segments need not stay in memory while the log is folded.
            let manifest = custos_store::LogPaths::new(&config.data, custos_store::DEFAULT_LOG_ID).manifest;
            registry.sealed_end = custos_store::log::read_ndjson::<custos_store::log::SegmentInfo>(&manifest)
                .ok()
                .and_then(|lines| lines.last().map(|line| line.end_index))
                .unwrap_or(0);
            (registry, ChainState::default(), 0)
        }
    };
    let node_did = node_key.did().to_owned();
    let visit_from = if feed.is_some() {
        folded_from.min(replay_from)
    } else {
        folded_from
    };
    let always: &[&str] = if feed.is_some() {
        &[FINDING_PAYLOAD_TYPE, ACTION_PAYLOAD_TYPE]
    } else {
        &[]
    };
    let mut system = SystemChains::default();
    let mut fold = |entry: &LogEntry| {
        if (entry.payload_type == FINDING_PAYLOAD_TYPE || entry.payload_type == ACTION_PAYLOAD_TYPE)
            && let Some(seq) = payload_seq(&entry.payload)
        {
            system.record(
                &entry.keyid,
                seq,
                *blake3::hash(&entry.payload).as_bytes(),
                entry.log_index,
            );
        }
        let payload = if entry.log_index >= folded_from {
            fold_entry(entry, &node_did, &mut registry, &mut node_chain)
        } else if entry.payload_type == EVENT_PAYLOAD_TYPE && entry.log_index >= replay_from {
            Payload::parse(&entry.payload).ok()
        } else {
            None
        };
        let Some(feed) = feed else { return };
        match (payload, entry.payload_type.as_str()) {
            (Some(payload), _) if entry.log_index >= replay_from => {
                feed.send(Committed::Event(Box::new(Observation {
                    log_index: Some(entry.log_index),
                    ingest_ts: chrono::TimeZone::timestamp_micros(&Utc, entry.ingest_ts_us)
                        .single()
                        .unwrap_or_default(),
                    payload,
                    signal: Signal::Accepted { gap: entry.gap },
                    entry: with_entries.then(|| signed_entry(entry)),
                })))
            }
            (None, FINDING_PAYLOAD_TYPE) => feed.send(Committed::Finding {
                log_index: entry.log_index,
                payload: entry.payload.clone(),
                entry: with_entries.then(|| signed_entry(entry)),
            }),
            (None, ACTION_PAYLOAD_TYPE) => feed.send(Committed::Action {
                log_index: entry.log_index,
                payload: entry.payload.clone(),
                entry: with_entries.then(|| signed_entry(entry)),
            }),
            // Readers of entries (query nodes) need every entry the bridge never published.
            (None, CONTROL_PAYLOAD_TYPE) if with_entries && entry.log_index >= replay_from => {
                feed.send(Committed::Control {
                    log_index: entry.log_index,
                    payload: entry.payload.clone(),
                    entry: Some(signed_entry(entry)),
                })
            }
            _ => {}
        }
    };
    let plan = custos_store::Recovery {
        visit_from,
        always,
        use_tree_cache: true,
    };
    let log = Log::open_with(
        &config.data,
        &info.store_id,
        custos_store::DEFAULT_LOG_ID,
        config.log.clone(),
        custos_store::OpenMode::ReadWrite,
        &plan,
        &mut fold,
    )?;
    if let Some(snapshot) = &snapshot {
        let size = snapshot.body.log_size;
        if size > log.next_index() {
            return Err(custos_store::StoreError::Tamper(format!(
                "the registry snapshot signed at log size {size} is ahead of the {} entries stored: acknowledged entries were deleted; run `custos verify`",
                log.next_index()
            ))
            .into());
        }
        let root = log.tree().root_at(size).map(hex::encode).unwrap_or_default();
        if root != snapshot.body.root {
            return Err(custos_store::StoreError::Tamper(format!(
                "the registry snapshot at log size {size} does not match the log's root there; run `custos verify`"
            ))
            .into());
        }
    }
    if let Some(feed) = feed {
        feed.send(Committed::Replayed {
            next_index: log.next_index(),
        });
    }
    registry.prune(log.sealed_end());
    tracing::info!(
        entries = log.next_index(),
        agents = registry.agents.len(),
        folded_from,
        "store recovered"
    );
    audit_segments(log.paths().segment_dir.clone(), log.segments().to_vec());
    Ok(Loaded {
        log,
        registry,
        node_chain,
        store_id: info.store_id,
        system,
    })
}

/// Checks every sealed segment's blake3 against its signed manifest line, in the
/// background: a restart that reads the tree from its cache does not read old segments,
/// so an edited segment file is reported here, seconds after the start, instead of at
/// the next `custos verify`.
fn audit_segments(segment_dir: std::path::PathBuf, segments: Vec<custos_store::log::SegmentInfo>) {
    if segments.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new().name("custos-audit".into()).spawn(move || {
        let started = std::time::Instant::now();
        let mut damaged = 0usize;
        for info in &segments {
            let problem = match custos_store::read_object(&segment_dir, &info.file) {
                Ok(bytes) if custos_store::segment::file_digest(&bytes) == info.blake3 => continue,
                Ok(_) => "does not match the blake3 its signed manifest line records".to_owned(),
                Err(error) => format!("cannot be read: {error}"),
            };
            damaged += 1;
            custos_http::metrics::STORE_ERRORS.with_label_values(&["audit"]).inc();
            tracing::error!(
                segment = info.file,
                first_index = info.first_index,
                problem,
                "a sealed segment was altered or lost since it was sealed; run `custos verify`"
            );
        }
        tracing::info!(
            segments = segments.len(),
            damaged,
            secs = started.elapsed().as_secs_f64(),
            "segment audit done"
        );
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the segment audit");
    }
}

/// The registry and the node's control chain as of a log size, signed by the node key.
///
/// `DATA/state/registry.json`: a header line `{"log_size","blake3","sig"}`, then the body
/// (JSON). The signature covers `custos/registry/v1\n<store id>\n<log size>\n<blake3 of
/// the body>\n`; the body names the tree root at that size, so it belongs to one log.
struct Snapshot {
    body: SnapshotBody,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotHeader {
    log_size: u64,
    blake3: String,
    sig: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotBody {
    format: u32,
    log_size: u64,
    /// Hex root of the tree at `log_size`.
    root: String,
    node_chain: ChainState,
    agents: Vec<crate::registry::AgentRecord>,
    memories: Vec<crate::registry::SubjectRecord>,
    credentials: Vec<crate::registry::SubjectRecord>,
    /// Per agent: head seq, head digest (hex), and the recent (seq, digest, log index)
    /// triples at or above the sealed end (with the head's own).
    heads: Vec<HeadSnapshot>,
}

/// One agent's chain head in a snapshot: agent, head seq, head digest (hex), and its
/// recent (seq, digest hex, log index) triples.
type HeadSnapshot = (String, u64, String, Vec<(u64, String, u64)>);

fn snapshot_path(data: &std::path::Path) -> std::path::PathBuf {
    data.join("state").join("registry.json")
}

fn signed_text(store_id: &str, log_size: u64, blake3: &str) -> String {
    format!("custos/registry/v1\n{store_id}\n{log_size}\n{blake3}\n")
}

impl SnapshotBody {
    /// The registry as it is now, at `log_size` entries with `root`.
    pub(crate) fn take(registry: &Registry, node_chain: &ChainState, log_size: u64, root: [u8; 32]) -> Self {
        let sealed_end = registry.sealed_end;
        Self {
            format: 1,
            log_size,
            root: hex::encode(root),
            node_chain: node_chain.clone(),
            agents: registry.agents.values().cloned().collect(),
            memories: registry.memories.values().cloned().collect(),
            credentials: registry.credentials.values().cloned().collect(),
            heads: registry
                .heads
                .iter()
                .map(|(agent, head)| {
                    let last = head.recent.len().saturating_sub(1);
                    let recent = head
                        .recent
                        .iter()
                        .enumerate()
                        .filter(|(position, (_, _, index))| *position == last || *index >= sealed_end)
                        .map(|(_, (seq, digest, index))| (*seq, hex::encode(digest), *index))
                        .collect();
                    (agent.clone(), head.seq, hex::encode(head.digest), recent)
                })
                .collect(),
        }
    }

    fn restore(&self, window: usize) -> (Registry, ChainState) {
        let digest = |text: &str| {
            let mut out = [0u8; 32];
            let _ = hex::decode_to_slice(text, &mut out);
            out
        };
        let mut registry = Registry::new(window);
        registry.agents = self
            .agents
            .iter()
            .map(|agent| (agent.did.clone(), agent.clone()))
            .collect();
        registry.memories = self
            .memories
            .iter()
            .map(|memory| (memory.id.clone(), memory.clone()))
            .collect();
        registry.credentials = self
            .credentials
            .iter()
            .map(|credential| (credential.id.clone(), credential.clone()))
            .collect();
        registry.heads = self
            .heads
            .iter()
            .map(|(agent, seq, head, recent)| {
                (
                    agent.clone(),
                    crate::registry::ChainHead {
                        seq: *seq,
                        digest: digest(head),
                        recent: recent
                            .iter()
                            .map(|(seq, text, index)| (*seq, digest(text), *index))
                            .collect(),
                    },
                )
            })
            .collect();
        (registry, self.node_chain.clone())
    }
}

impl Snapshot {
    /// Reads and checks the snapshot; `Ok(None)` when there is none.
    fn read(data: &std::path::Path, store_id: &str, node_key: &AgentKey) -> Result<Option<Self>, String> {
        let path = snapshot_path(data);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("reading `{}`: {error}", path.display())),
        };
        let split = bytes
            .iter()
            .position(|byte| *byte == b'\n')
            .ok_or_else(|| format!("`{}` has no header line", path.display()))?;
        let header: SnapshotHeader =
            serde_json::from_slice(&bytes[..split]).map_err(|error| format!("`{}` header: {error}", path.display()))?;
        let body = &bytes[split + 1..];
        let digest = blake3::hash(body).to_hex().to_string();
        if digest != header.blake3 {
            return Err(format!("`{}`: the body does not match its blake3", path.display()));
        }
        let signature = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &header.sig)
            .ok()
            .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
            .ok_or_else(|| format!("`{}`: the signature is not base64 of 64 bytes", path.display()))?;
        let key = custos_event::verifying_key_from_did(node_key.did()).map_err(|error| error.to_string())?;
        use ed25519_dalek::Verifier as _;
        key.verify(
            signed_text(store_id, header.log_size, &header.blake3).as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| format!("`{}` is not signed by this node's key", path.display()))?;
        let body: SnapshotBody =
            serde_json::from_slice(body).map_err(|error| format!("`{}` body: {error}", path.display()))?;
        if body.format != 1 || body.log_size != header.log_size {
            return Err(format!(
                "`{}`: format or size does not match its header",
                path.display()
            ));
        }
        Ok(Some(Self { body }))
    }
}

/// Writes `body` as the registry snapshot (temporary file, rename).
pub(crate) fn write_snapshot(
    data: &std::path::Path,
    store_id: &str,
    node_key: &AgentKey,
    body: &SnapshotBody,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let bytes = serde_json::to_vec(body).map_err(std::io::Error::other)?;
    let blake3 = blake3::hash(&bytes).to_hex().to_string();
    let sig = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        node_key.sign_raw(signed_text(store_id, body.log_size, &blake3).as_bytes()),
    );
    let header = serde_json::to_vec(&SnapshotHeader {
        log_size: body.log_size,
        blake3,
        sig,
    })
    .map_err(std::io::Error::other)?;
    let path = snapshot_path(data);
    let dir = path.parent().unwrap_or(data);
    fs_err::create_dir_all(dir)?;
    let temporary = path.with_extension("json.tmp");
    {
        // No fsync: a snapshot only saves time. One a power cut damages fails its checks
        // at the next start, which then folds the whole log.
        let mut file = fs_err::File::create(&temporary)?;
        file.write_all(&header)?;
        file.write_all(b"\n")?;
        file.write_all(&bytes)?;
    }
    fs_err::rename(&temporary, &path)
}

/// `entry` as the committed topic carries it for readers that rebuild rows.
pub(crate) fn signed_entry(entry: &LogEntry) -> Box<custos_event::SignedEntry> {
    Box::new(custos_event::SignedEntry {
        keyid: entry.keyid.clone(),
        sig: entry.sig.to_vec(),
        payload: entry.payload.clone(),
        ingest_ts_us: entry.ingest_ts_us,
    })
}

/// Rebuilds state from one stored entry; returns an event's parsed payload.
pub(crate) fn fold_entry(
    entry: &LogEntry,
    node_did: &str,
    registry: &mut Registry,
    node_chain: &mut ChainState,
) -> Option<Payload> {
    if entry.payload_type == CONTROL_PAYLOAD_TYPE {
        if entry.keyid != node_did {
            tracing::warn!(
                log_index = entry.log_index,
                "ignoring a control entry not signed by this node's key"
            );
            return None;
        }
        match serde_json::from_slice::<ControlPayload>(&entry.payload) {
            Ok(control) => {
                registry.apply_control(&control, entry.log_index);
                node_chain.next_seq = control.seq.saturating_add(1);
                node_chain.prev = Some(custos_event::blake3_hex(&entry.payload));
            }
            Err(error) => tracing::warn!(log_index = entry.log_index, %error, "unreadable control entry"),
        }
    } else if entry.payload_type == EVENT_PAYLOAD_TYPE {
        match Payload::parse(&entry.payload) {
            Ok(payload) => {
                registry.apply_event(
                    &payload.agent,
                    payload.seq,
                    entry.payload_blake3,
                    entry.log_index,
                    payload.ts,
                );
                return Some(payload);
            }
            Err(error) => tracing::warn!(log_index = entry.log_index, %error, "unreadable event entry"),
        }
    }
    None
}
