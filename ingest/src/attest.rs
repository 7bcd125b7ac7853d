//! Attested events: what an adapter reports for agents that cannot sign (OpenTelemetry
//! collectors, VaultysClaw), signed by keys the node holds for that adapter.
//!
//! ```text
//!  adapter (collector token / webhook)        DATA/attest/<source>/<name>/
//!        │ events grouped by the platform's       root.key  ── enrolled in the realm
//!        ▼ name for each agent                    <did>.chain.json, <did>.pending.ndjson
//!  root key ── delegation ─▶ agent key = blake3_keyed(root seed, name): a sub-agent
//!        │                    of the root, so revoking the adapter revokes them all
//!        ▼ signed envelopes (attrs custos.source, custos.attested_by)
//!  the same verify + append path as POST /v1/events (verdicts per event)
//! ```
//!
//! Each agent name gets its own key and hash chain, so baselines, findings and
//! revocations stay per agent, and one misbehaving agent is revoked without silencing
//! the adapter. The agents a request names for the first time are enrolled together:
//! the root signs their delegations as one batch. Then every agent's events of the
//! request go as one batch too: a request costs two appends at most, however many
//! agents it names. The signed envelopes are kept as pending, and then the chain state
//! saved, before anything is submitted; pending envelopes are resent first (answered
//! `duplicate` when already stored), so a crash never forks an attested chain.
//!
//! A span is attested once: each agent remembers the (trace id, span id) of its last
//! [`RECENT_SPANS`] spans (`<did>.spans`, written with the pending envelopes), so an
//! exporter's retry, or an ingest node's resend after a writer crash, is answered
//! `duplicate` instead of stored again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use custos_event::{AgentKey, ChainState, Signer};
use custos_stage::{Status, Verdict};
use serde_json::{Map, Value};

use crate::ApiError;
use crate::http::AppState;

/// The adapters' attestors by (source, adapter name), opened on first use.
pub(crate) type Attestors = Arc<std::sync::Mutex<HashMap<(String, String), Arc<Attestor>>>>;

/// Where an adapter's keys and chains live.
pub(crate) fn dir(data: &Path, source: &str, name: &str) -> PathBuf {
    data.join("attest").join(source).join(name)
}

/// One attested agent: its key and chain.
struct Lane {
    signer: Signer,
    /// The root's delegation to it was answered (it is enrolled).
    enrolled: bool,
    /// The spans it attested last.
    spans: RecentSpans,
    /// The request that named it last ([`Lanes::tick`]).
    used: u64,
}

/// How many attested agents' lanes an adapter keeps open in memory. A lane holds its
/// key, its chain and up to [`RECENT_SPANS`] span keys (about 50 KiB when full), so a
/// collector naming ever more agents must not keep them all: after a request, the
/// lanes named least recently beyond this are closed, and open again from their files
/// (chain, pending envelopes, span keys, enrollment marker) when next named.
pub(crate) const OPEN_LANES: usize = 4096;

/// How many spans each attested agent remembers, to answer a span sent again
/// `duplicate`: an exporter retries within seconds, and an ingest node resends after 5
/// and 15 s.
pub(crate) const RECENT_SPANS: usize = 1024;

/// The (trace id, span id) keys of an agent's last [`RECENT_SPANS`] spans, as the first
/// 16 bytes of their blake3; on disk one hex key per line, appended as they are signed
/// and rewritten when the file holds four times the window.
#[derive(Default)]
struct RecentSpans {
    keys: HashSet<u128>,
    order: VecDeque<u128>,
    /// Lines in the file.
    written: usize,
}

impl RecentSpans {
    /// The key of an event made from a span: its `trace_id` and `span_id` members.
    fn key(object: &Map<String, Value>) -> Option<u128> {
        let span = object.get("span_id")?.as_str()?;
        let trace = object.get("trace_id").and_then(Value::as_str).unwrap_or_default();
        let hash = blake3::hash(format!("{trace}/{span}").as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash.as_bytes()[..16]);
        Some(u128::from_le_bytes(first))
    }

    fn load(path: &Path) -> Result<Self, ApiError> {
        let text = match fs_err::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(io(error)),
        };
        let mut spans = Self::default();
        let mut damaged = 0;
        for line in text.lines().filter(|line| !line.is_empty()) {
            spans.written += 1;
            match u128::from_str_radix(line, 16) {
                Ok(key) if line.len() == 32 => spans.remember(key),
                // A line torn by a power loss: that one span may be stored again, nothing
                // else is lost, and the agent's spans are still taken.
                _ => damaged += 1,
            }
        }
        if !text.is_empty() && !text.ends_with('\n') {
            // A torn last line: the next keys go into a rewritten file, not after it.
            spans.written = 4 * RECENT_SPANS;
        }
        if damaged > 0 {
            tracing::warn!(
                file = %path.display(),
                damaged,
                "span keys that do not read were skipped; those spans may be stored again if sent again"
            );
        }
        Ok(spans)
    }

    fn remember(&mut self, key: u128) {
        if self.keys.insert(key) {
            self.order.push_back(key);
        }
        while self.order.len() > RECENT_SPANS {
            if let Some(oldest) = self.order.pop_front() {
                self.keys.remove(&oldest);
            }
        }
    }

    /// Remembers `keys`, durable in `path` first (so a key is never remembered that a
    /// restart would forget while its span is stored); the caller fsyncs the directory
    /// (the file may be new, or replaced).
    fn record(&mut self, path: &Path, keys: &[u128]) -> Result<(), ApiError> {
        if keys.is_empty() {
            return Ok(());
        }
        let line = |key: &u128| format!("{key:032x}\n");
        if self.written + keys.len() > 4 * RECENT_SPANS {
            let mut kept = self.order.clone();
            kept.extend(keys);
            let skip = kept.len().saturating_sub(RECENT_SPANS);
            let text: String = kept.iter().skip(skip).map(line).collect();
            custos_store::write_renamed(path, text.as_bytes()).map_err(io)?;
            self.written = kept.len() - skip;
        } else {
            use std::io::Write as _;
            let mut file = fs_err::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            let text: String = keys.iter().map(line).collect();
            file.write_all(text.as_bytes()).map_err(io)?;
            file.sync_data().map_err(io)?;
            self.written += keys.len();
        }
        for key in keys {
            self.remember(*key);
        }
        Ok(())
    }
}

/// One attested lane's share of a request.
struct Share {
    did: String,
    /// Its envelopes: those pending from before, then those signed now.
    raws: Vec<Vec<u8>>,
    /// Something was signed now (its pending file, chain and spans change).
    signed: bool,
    /// The spans signed now, in order, and as a set.
    new_spans: Vec<u128>,
    fresh: HashSet<u128>,
}

/// Per group, per object: its (share, place among the share's envelopes), or why it
/// was not signed.
type Places = Vec<Vec<Result<(usize, usize), Verdict>>>;

/// The keys of one adapter instance (a collector token, the VaultysClaw receiver).
pub(crate) struct Attestor {
    dir: PathBuf,
    source: &'static str,
    realm: String,
    root: AgentKey,
    state: tokio::sync::Mutex<Lanes>,
}

#[derive(Default)]
struct Lanes {
    root_enrolled: bool,
    lanes: HashMap<String, Lane>,
    /// Counts the requests that named lanes.
    tick: u64,
}

impl Lanes {
    /// Closes the lanes named least recently (never `root`'s) when more than `keep` are
    /// open, down to three quarters of it, so that a fleet just over `keep` does not
    /// sort them on every request. Every lane's state is in its files between requests.
    fn trim(&mut self, keep: usize, root: &str) {
        if self.lanes.len() <= keep {
            return;
        }
        let mut ages: Vec<(u64, String)> = self
            .lanes
            .iter()
            .filter(|(did, _)| did.as_str() != root)
            .map(|(did, lane)| (lane.used, did.clone()))
            .collect();
        ages.sort_unstable();
        let excess = self.lanes.len() - keep * 3 / 4;
        for (_, did) in ages.into_iter().take(excess) {
            self.lanes.remove(&did);
        }
    }
}

fn io(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(503, "store_failed", format!("attestation state: {error}"))
}

/// `chain`, taken past the last pending envelope (`pending`: their payloads' bytes) when
/// the process stopped after keeping it but before saving the chain (so its `seq` is
/// never signed again).
fn past_pending(chain: ChainState, pending: &[Vec<u8>], path: &Path) -> Result<ChainState, ApiError> {
    let Some(payload) = pending.last() else {
        return Ok(chain);
    };
    let seq = serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|payload| payload["seq"].as_u64())
        .ok_or_else(|| io(format!("`{}` holds an envelope without a seq", path.display())))?;
    if seq >= chain.next_seq {
        return Ok(ChainState {
            next_seq: seq + 1,
            prev: Some(custos_event::blake3_hex(payload)),
        });
    }
    Ok(chain)
}

/// The payload bytes of the envelopes kept pending in `path` (none when there is no file).
fn pending_payloads(path: &Path) -> Result<Vec<Vec<u8>>, ApiError> {
    use base64::Engine as _;
    let text = match fs_err::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io(error)),
    };
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|envelope| envelope["payload"].as_str().map(str::to_owned))
                .and_then(|payload| base64::engine::general_purpose::STANDARD.decode(payload).ok())
                .ok_or_else(|| io(format!("`{}` holds a line that is not an envelope", path.display())))
        })
        .collect()
}

impl Attestor {
    /// Opens (creating on first use) the adapter's root key under `DATA/attest/…`.
    pub(crate) fn open(data: &Path, source: &'static str, name: &str, realm: &str) -> Result<Self, ApiError> {
        let dir = dir(data, source, name);
        fs_err::create_dir_all(&dir).map_err(io)?;
        let path = dir.join("root.key");
        let root = match custos_store::keyfile::read_key(&path) {
            Ok(key) => key,
            Err(custos_store::keyfile::KeyFileError::Io(error)) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = AgentKey::generate().map_err(|error| io(format!("{error:?}")))?;
                custos_store::keyfile::write_key(&path, &key).map_err(io)?;
                key
            }
            Err(error) => return Err(io(error)),
        };
        Ok(Self {
            dir,
            source,
            realm: realm.to_owned(),
            root,
            state: tokio::sync::Mutex::new(Lanes::default()),
        })
    }

    /// The key the adapter signs `name`'s events with.
    pub(crate) fn agent_key(&self, name: &str) -> AgentKey {
        let seed = blake3::keyed_hash(
            &self.root.seed(),
            format!("custos attested agent v1\0{name}").as_bytes(),
        );
        AgentKey::from_seed(seed.as_bytes())
    }

    fn chain_path(&self, did: &str) -> PathBuf {
        self.dir
            .join(format!("{}.chain.json", did.trim_start_matches("did:key:")))
    }

    fn pending_path(&self, did: &str) -> PathBuf {
        self.dir
            .join(format!("{}.pending.ndjson", did.trim_start_matches("did:key:")))
    }

    /// Present once the root's delegation to `did` was answered (its content, the
    /// agent's name, is for people).
    fn enrolled_path(&self, did: &str) -> PathBuf {
        self.dir
            .join(format!("{}.enrolled", did.trim_start_matches("did:key:")))
    }

    fn spans_path(&self, did: &str) -> PathBuf {
        self.dir.join(format!("{}.spans", did.trim_start_matches("did:key:")))
    }

    fn lane(&self, key: AgentKey) -> Result<Lane, ApiError> {
        let did = key.did().to_owned();
        let chain = match fs_err::read_to_string(self.chain_path(&did)) {
            Ok(text) => serde_json::from_str::<ChainState>(&text).map_err(io)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => ChainState::default(),
            Err(error) => return Err(io(error)),
        };
        let pending_path = self.pending_path(&did);
        let pending = pending_payloads(&pending_path)?;
        let chain = past_pending(chain, &pending, &pending_path)?;
        let enrolled = self.enrolled_path(&did).exists();
        // Spans signed and kept pending before a stop that came before their keys were
        // written: they will be sent, so they count as attested.
        let mut spans = RecentSpans::load(&self.spans_path(&did))?;
        let pending: Vec<u128> = pending
            .iter()
            .filter_map(|payload| serde_json::from_slice::<Map<String, Value>>(payload).ok())
            .filter_map(|payload| RecentSpans::key(&payload))
            .filter(|key| !spans.keys.contains(key))
            .collect();
        if !pending.is_empty() {
            spans.record(&self.spans_path(&did), &pending)?;
            custos_store::fsync_dir(&self.dir).map_err(io)?;
        }
        Ok(Lane {
            spans,
            signer: Signer::resume(key, self.realm.clone(), chain),
            enrolled,
            used: 0,
        })
    }

    /// Signs each group's objects on its lane and keeps every lane's envelopes pending,
    /// then saves the lanes' chains and spans: the first half of [`Self::sign_and_submit`].
    async fn sign_and_keep(
        &self,
        state: &AppState,
        remote: &str,
        lanes: &mut Lanes,
        groups: Vec<(String, Vec<Map<String, Value>>)>,
    ) -> Result<(Vec<Share>, Places), ApiError> {
        let mut shares: Vec<Share> = Vec::new();
        let mut slots: HashMap<String, usize> = HashMap::new();
        let mut places: Places = Vec::with_capacity(groups.len());
        for (did, objects) in groups {
            let slot = match slots.get(&did) {
                Some(slot) => *slot,
                None => {
                    let raws = match fs_err::read_to_string(self.pending_path(&did)) {
                        Ok(text) => text
                            .lines()
                            .filter(|line| !line.is_empty())
                            .map(|line| line.as_bytes().to_vec())
                            .collect(),
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                        Err(error) => return Err(io(error)),
                    };
                    shares.push(Share {
                        did: did.clone(),
                        raws,
                        signed: false,
                        new_spans: Vec::new(),
                        fresh: HashSet::new(),
                    });
                    slots.insert(did.clone(), shares.len() - 1);
                    shares.len() - 1
                }
            };
            let share = &mut shares[slot];
            let lane = lanes
                .lanes
                .get_mut(&did)
                .ok_or_else(|| io(format!("no attested agent {did} is open")))?;
            let mut group = Vec::with_capacity(objects.len());
            for (index, mut object) in objects.into_iter().enumerate() {
                let span = RecentSpans::key(&object);
                if let Some(key) = span
                    && (lane.spans.keys.contains(&key) || share.fresh.contains(&key))
                {
                    group.push(Err(Verdict {
                        index,
                        status: Status::Duplicate,
                        reason: None,
                        message: Some("this span was attested already (the request was sent again)".into()),
                        log_index: None,
                        flags: Vec::new(),
                        missing: None,
                    }));
                    continue;
                }
                let attrs = object.entry("attrs").or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(attrs) = attrs {
                    attrs.insert("custos.source".into(), Value::from(self.source));
                    attrs.insert("custos.attested_by".into(), Value::from(self.root.did()));
                }
                let shown = serde_json::to_vec(&object).unwrap_or_default();
                match lane.signer.sign_object(object, chrono::Utc::now()) {
                    Ok(envelope) => {
                        group.push(Ok((slot, share.raws.len())));
                        share.raws.push(envelope.to_json().into_bytes());
                        share.signed = true;
                        if let Some(key) = span {
                            share.fresh.insert(key);
                            share.new_spans.push(key);
                        }
                    }
                    Err(message) => {
                        // Kept for forensics like any refused input; its neighbours go on.
                        let rejection = custos_event::Rejection::new(
                            custos_event::Reason::BadPayload,
                            format!("the adapter could not make an event of this input: {message}"),
                        );
                        crate::http::keep_rejected(state, &rejection, &shown, remote).await?;
                        group.push(Err(Verdict {
                            index,
                            status: Status::Rejected,
                            reason: Some("bad_payload".into()),
                            message: Some(rejection.message),
                            log_index: None,
                            flags: Vec::new(),
                            missing: None,
                        }));
                    }
                }
            }
            places.push(group);
        }
        // Durable before submitting: every lane's signed envelopes, then (never before
        // them, or a crash could leave a chain past envelopes that were never kept) the
        // chains past them and the spans' keys; the directory fsynced once after each.
        let signed: Vec<&Share> = shares.iter().filter(|share| share.signed).collect();
        if !signed.is_empty() {
            for share in &signed {
                let lines: Vec<&str> = share
                    .raws
                    .iter()
                    .map(|raw| std::str::from_utf8(raw).unwrap_or_default())
                    .collect();
                custos_store::write_renamed(&self.pending_path(&share.did), lines.join("\n").as_bytes()).map_err(io)?;
            }
            custos_store::fsync_dir(&self.dir).map_err(io)?;
            for share in &signed {
                let lane = lanes.lanes.get_mut(&share.did).expect("looked up above");
                let chain = serde_json::to_vec(lane.signer.chain()).map_err(io)?;
                custos_store::write_renamed(&self.chain_path(&share.did), &chain).map_err(io)?;
                lane.spans.record(&self.spans_path(&share.did), &share.new_spans)?;
            }
            custos_store::fsync_dir(&self.dir).map_err(io)?;
        }
        Ok((shares, places))
    }

    /// Signs each group's objects (payload members without agent, seq, prev, realm) as
    /// the key of the lane its did names (the root's or an agent's), keeps them pending,
    /// and submits every lane's envelopes as one batch, each lane's after whatever it had
    /// pending; answers each group's verdicts (the resent envelopes' are dropped). A lane
    /// may be named by several groups: its chain runs through them in order.
    async fn sign_and_submit(
        &self,
        state: &AppState,
        remote: &str,
        lanes: &mut Lanes,
        groups: Vec<(String, Vec<Map<String, Value>>)>,
    ) -> Result<Vec<Vec<Verdict>>, ApiError> {
        let touched: Vec<String> = groups.iter().map(|(did, _)| did.clone()).collect();
        let (mut shares, places) = match self.sign_and_keep(state, remote, lanes, groups).await {
            Ok(kept) => kept,
            Err(error) => {
                // Their signers may have signed what was never kept: each lane opens
                // again from its files next time, so its chain never runs past them.
                for did in touched {
                    lanes.lanes.remove(&did);
                }
                return Err(error);
            }
        };
        // One append for every lane: where each lane's envelopes start in it.
        let mut starts = Vec::with_capacity(shares.len());
        let mut raws = Vec::new();
        for share in &mut shares {
            starts.push(raws.len());
            raws.append(&mut share.raws);
        }
        let verdicts = match raws.is_empty() {
            true => Vec::new(),
            false => crate::http::ingest_raws(state, raws, remote.to_owned()).await?,
        };
        // Answered: a pending file left by a crash from here on is resent and answered
        // `duplicate`, so its removal needs no fsync.
        for share in &shares {
            fs_err::remove_file(self.pending_path(&share.did)).or_else(|error| match error.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(io(error)),
            })?;
        }
        Ok(places
            .into_iter()
            .map(|group| {
                group
                    .into_iter()
                    .enumerate()
                    .map(|(index, place)| match place {
                        Ok((slot, at)) => {
                            let mut verdict = verdicts.get(starts[slot] + at).cloned().unwrap_or_else(|| Verdict {
                                index,
                                status: Status::Rejected,
                                reason: Some("internal".into()),
                                message: Some("the writer gave no verdict for this event".into()),
                                log_index: None,
                                flags: Vec::new(),
                                missing: None,
                            });
                            verdict.index = index;
                            verdict
                        }
                        Err(verdict) => verdict,
                    })
                    .collect()
            })
            .collect())
    }

    /// Makes sure the root is enrolled and each name's key is its enrolled sub-agent;
    /// answers those keys' dids, in order. The names not enrolled yet are delegated
    /// together: the root signs one delegation per name (carrying that name's `extra`
    /// attrs) and submits them as one batch, so a request naming a thousand new agents
    /// costs one append, not a thousand.
    async fn ensure(
        &self,
        lanes: &mut Lanes,
        state: &AppState,
        remote: &str,
        names: Vec<(String, Map<String, Value>)>,
    ) -> Result<Vec<String>, ApiError> {
        if !lanes.root_enrolled {
            let labels = [
                ("custos.source".to_owned(), self.source.to_owned()),
                (
                    "custos.adapter".to_owned(),
                    self.dir.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                ),
            ]
            .into_iter()
            .collect();
            let enrolled = crate::http::ask(state, |reply| crate::sequencer::Command::Enroll {
                did: self.root.did().to_owned(),
                realm: self.realm.clone(),
                labels,
                by: format!("adapter:{}", self.source),
                reply,
            })
            .await;
            match enrolled {
                Ok(_) => {}
                Err(error) if error.error == "agent_exists" => {}
                Err(error) => return Err(error),
            }
            lanes.root_enrolled = true;
        }
        let root_did = self.root.did().to_owned();
        if !lanes.lanes.contains_key(&root_did) {
            let lane = self.lane(self.root.clone())?;
            lanes.lanes.insert(root_did.clone(), lane);
        }
        lanes.tick += 1;
        let tick = lanes.tick;
        let mut dids = Vec::with_capacity(names.len());
        let mut delegations = Vec::new();
        // Per delegation: the did and the name it enrolls.
        let mut delegated: Vec<(String, String)> = Vec::new();
        let mut delegating: HashSet<String> = HashSet::new();
        for (name, extra) in names {
            let key = self.agent_key(&name);
            let did = key.did().to_owned();
            if !lanes.lanes.contains_key(&did) {
                let lane = self.lane(key)?;
                lanes.lanes.insert(did.clone(), lane);
            }
            if let Some(lane) = lanes.lanes.get_mut(&did) {
                lane.used = tick;
            }
            dids.push(did.clone());
            if lanes.lanes[&did].enrolled || !delegating.insert(did.clone()) {
                continue;
            }
            // The root delegates to the agent key: the node enrolls it as the root's
            // sub-agent, in the root's realm.
            let mut attrs = extra;
            attrs.insert("custos.attested_for".into(), Value::from(name.clone()));
            let mut delegation = Map::new();
            delegation.insert("kind".into(), Value::from("delegation"));
            delegation.insert("target".into(), Value::from(did.clone()));
            delegation.insert("attrs".into(), Value::Object(attrs));
            delegations.push(delegation);
            delegated.push((did, name));
        }
        if delegations.is_empty() {
            return Ok(dids);
        }
        let verdicts = self
            .sign_and_submit(state, remote, lanes, vec![(root_did.clone(), delegations)])
            .await?
            .pop()
            .unwrap_or_default();
        let mut refused = None;
        let mut marked = false;
        for ((did, name), verdict) in delegated.iter().zip(&verdicts) {
            if verdict.status == Status::Rejected {
                refused.get_or_insert((did, name, verdict));
                continue;
            }
            // The marker's presence is what counts: its directory is fsynced once below.
            fs_err::write(self.enrolled_path(did), name.as_bytes()).map_err(io)?;
            marked = true;
            if let Some(lane) = lanes.lanes.get_mut(did) {
                lane.enrolled = true;
            }
        }
        if marked {
            custos_store::fsync_dir(&self.dir).map_err(io)?;
        }
        if let Some((did, name, verdict)) = refused {
            return Err(ApiError::new(
                403,
                "adapter_refused",
                format!(
                    "the adapter key {root_did} could not enroll the key {did} for `{name}`: {} ({})",
                    verdict.reason.as_deref().unwrap_or("rejected"),
                    verdict.message.as_deref().unwrap_or("")
                ),
            ));
        }
        Ok(dids)
    }

    /// Enrolls `name`'s key as the root's sub-agent now, the delegation carrying `extra`.
    pub(crate) async fn enroll(
        &self,
        state: &AppState,
        remote: &str,
        name: &str,
        extra: Map<String, Value>,
    ) -> Result<String, ApiError> {
        let mut lanes = self.state.lock().await;
        let dids = self
            .ensure(&mut lanes, state, remote, vec![(name.to_owned(), extra)])
            .await;
        lanes.trim(OPEN_LANES, self.root.did());
        Ok(dids?.into_iter().next().expect("one name, one did"))
    }

    /// The adapter's root key (`custos.attested_by`).
    pub(crate) fn root_did(&self) -> &str {
        self.root.did()
    }

    /// Attests each group's events as the agent its name derives; answers one verdict
    /// per event, groups in order. A group without events still sends what its agent
    /// had pending. The agents new to the request are enrolled first, together.
    pub(crate) async fn attest(
        &self,
        state: &AppState,
        remote: &str,
        groups: Vec<(String, Vec<Map<String, Value>>)>,
    ) -> Result<Vec<Vec<Verdict>>, ApiError> {
        let mut lanes = self.state.lock().await;
        let names = groups.iter().map(|(name, _)| (name.clone(), Map::new())).collect();
        let dids = match self.ensure(&mut lanes, state, remote, names).await {
            Ok(dids) => dids,
            Err(error) => {
                lanes.trim(OPEN_LANES, self.root.did());
                return Err(error);
            }
        };
        let groups = groups
            .into_iter()
            .zip(dids)
            .map(|((name, objects), did)| {
                let objects = objects
                    .into_iter()
                    .map(|mut object| {
                        if let Value::Object(attrs) = object.entry("attrs").or_insert_with(|| Value::Object(Map::new()))
                        {
                            attrs.insert("custos.attested_for".into(), Value::from(name.clone()));
                        }
                        object
                    })
                    .collect();
                (did, objects)
            })
            .collect();
        // Every agent's events in one append, not one per agent.
        let answers = self.sign_and_submit(state, remote, &mut lanes, groups).await;
        lanes.trim(OPEN_LANES, self.root.did());
        answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: &str, span: &str) -> Map<String, Value> {
        serde_json::json!({"kind": "llm_call", "trace_id": trace, "span_id": span})
            .as_object()
            .unwrap()
            .clone()
    }

    /// An agent's window keeps its last spans across reloads, forgets the oldest, and
    /// the file is rewritten to the window once it grows to four times it.
    #[test]
    fn recent_spans_survive_a_reload_and_keep_a_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.spans");
        let key = |n: usize| RecentSpans::key(&span("4bf92f3577b34da6a3ce929d0e0e4736", &format!("{n:016x}"))).unwrap();
        assert_ne!(
            RecentSpans::key(&span("a", "1")),
            RecentSpans::key(&span("b", "1")),
            "the trace is part of the key"
        );
        assert_eq!(
            RecentSpans::key(
                &span("a", "1")
                    .into_iter()
                    .filter(|(name, _)| name != "span_id")
                    .collect()
            ),
            None
        );
        let mut spans = RecentSpans::default();
        for batch in 0..5 {
            let keys: Vec<u128> = (batch * 1000..(batch + 1) * 1000).map(key).collect();
            spans.record(&path, &keys).unwrap();
        }
        assert_eq!(spans.order.len(), RECENT_SPANS);
        assert!(spans.keys.contains(&key(4999)) && !spans.keys.contains(&key(4999 - RECENT_SPANS)));
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= 4 * RECENT_SPANS, "{lines} lines");
        let again = RecentSpans::load(&path).unwrap();
        assert_eq!(again.order, spans.order);
        // A torn or damaged line is skipped; the others still count.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("not a key\n00ab\n\0\0\0");
        std::fs::write(&path, text).unwrap();
        let mut damaged = RecentSpans::load(&path).unwrap();
        assert_eq!(damaged.order, spans.order);
        // Keys recorded after a torn last line are not glued to it.
        damaged.record(&path, &[key(7777)]).unwrap();
        assert!(RecentSpans::load(&path).unwrap().keys.contains(&key(7777)));
    }

    /// Beyond the limit, the lanes named least recently are closed (down to three
    /// quarters of it), never the root's.
    #[test]
    fn the_lanes_named_least_recently_are_closed_beyond_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let attestor = Attestor::open(dir.path(), "otlp", "t1", "eng").unwrap();
        let mut lanes = Lanes::default();
        let root = attestor.root.did().to_owned();
        lanes
            .lanes
            .insert(root.clone(), attestor.lane(attestor.root.clone()).unwrap());
        let mut dids = Vec::new();
        // Named in the order 5, 4, 3, 2, 1, 0: agent 0 most recently.
        for (used, name) in (0..6).rev().enumerate() {
            let key = attestor.agent_key(&format!("agent-{name}"));
            let mut lane = attestor.lane(key.clone()).unwrap();
            lane.used = used as u64 + 1;
            dids.push(key.did().to_owned());
            lanes.lanes.insert(key.did().to_owned(), lane);
        }
        lanes.trim(8, &root);
        assert_eq!(lanes.lanes.len(), 7, "within the limit, nothing is closed");
        lanes.trim(4, &root);
        let mut open: Vec<&String> = lanes.lanes.keys().collect();
        open.sort();
        let mut expected = vec![&root, &dids[4], &dids[5]];
        expected.sort();
        assert_eq!(open, expected, "the root and the two named last");
    }

    /// A span signed and kept pending before the process stopped, with its key not yet
    /// written, counts as attested when the agent's lane opens again: it is sent from
    /// the pending file, so a resend of its request must not store it a second time.
    #[test]
    fn a_pending_span_counts_as_attested_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let attestor = Attestor::open(dir.path(), "otlp", "t1", "eng").unwrap();
        let key = attestor.agent_key("planner");
        let did = key.did().to_owned();
        let mut signer = Signer::new(key.clone(), "eng");
        let object = span("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let envelope = signer.sign_object(object.clone(), chrono::Utc::now()).unwrap();
        std::fs::write(attestor.pending_path(&did), envelope.to_json()).unwrap();
        let lane = attestor.lane(key).unwrap();
        assert!(lane.spans.keys.contains(&RecentSpans::key(&object).unwrap()));
        assert_eq!(lane.signer.chain().next_seq, 1, "past the pending envelope");
        // And it is written, so the next restart knows it without the pending file.
        std::fs::remove_file(attestor.pending_path(&did)).unwrap();
        let spans = RecentSpans::load(&attestor.spans_path(&did)).unwrap();
        assert!(spans.keys.contains(&RecentSpans::key(&object).unwrap()));
    }
}
