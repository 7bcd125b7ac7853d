//! A read-only copy of one log, for a stateless query node (`--roles query`).
//!
//! ```text
//!  object store ──Archive::refresh──▶ DATA/replica/ (a store without WAL: sealed segments,
//!        │                              manifest, checkpoints; disposable)
//!        ▼
//!  Replica::refresh_sealed: new segments ─▶ manifest signature (log key) + blake3 checked
//!                                         ─▶ leaves into a Merkle frontier; every checkpoint
//!                                            up to the sealed end: signature + root checked
//!                                         ─▶ registry fold (entries not folded from the tail)
//!                                         ─▶ tail entries below the sealed end dropped
//!  committed topic (every partition, from its start) ─▶ Replica::apply
//!        └─▶ entries as signed (the writer publishes them) ─▶ tail, by log index ─▶ fold
//!
//!  view(): the sealed segments + the tail's unbroken run after them
//! ```
//!
//! The view is always a prefix of the log: an entry that has not arrived yet (the topic's
//! partitions are read independently) hides the entries after it until it does, so a
//! cursor (`after=`) never skips an entry that comes late. Nothing here writes to the
//! log; the node holds no key, and its state is rebuilt from the object store and the
//! topic at every start.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use custos_event::agent::AgentRecord;
use custos_event::{
    ACTION_PAYLOAD_TYPE, CONTROL_PAYLOAD_TYPE, ChainState, EVENT_PAYLOAD_TYPE, FINDING_PAYLOAD_TYPE, Signal,
    SignedEntry,
};
use custos_stage::Committed;
use custos_store::log::{CheckpointLine, SegmentInfo, read_ndjson};
use custos_store::merkle::Frontier;
use custos_store::{CheckpointView, LogEntry, LogPaths, StoreError, StoreView};

use crate::registry::Registry;

/// One log as a query node sees it.
pub struct Replica {
    /// The local copy of the sealed store.
    store: PathBuf,
    paths: LogPaths,
    registry: Registry,
    node_chain: ChainState,
    /// The key that signs control entries: the first control entry's signer.
    node_did: Option<String>,
    segments: Vec<SegmentInfo>,
    sealed_end: u64,
    tail: BTreeMap<u64, LogEntry>,
    /// Tail entries already folded into the registry.
    folded: BTreeSet<u64>,
    /// Committed records without their entry (a writer that does not publish them).
    bare: u64,
    /// The log key, as pinned or as first read from the copy (`checkpoint.pub`); it may
    /// never change.
    log_key: Option<custos_store::checkpoint::NoteKey>,
    /// The tree over the sealed segments' leaves (its size is `sealed_end`), and as it was
    /// at each taken segment's start (parallel to `segments`): what checkpoint roots are
    /// checked against, in O(log n) memory each.
    frontier: Frontier,
    starts: Vec<Frontier>,
    /// The size of the latest checkpoint in the copy whose signature and root were
    /// checked against the segments: the one served.
    checked: u64,
    /// The copy's checkpoints beyond `checked`, as last read, and the length of
    /// `checkpoints.ndjson` then: the file is read again only once it changed.
    heads: Vec<CheckpointLine>,
    heads_len: u64,
    /// The view's tail as shared immutable chunks, from `sealed_end` on: each view adds
    /// only what came since the last one, so a view costs no copy of the tail and the
    /// query side keeps each chunk's rows (`custos_query::tables`) instead of making
    /// them for the whole tail on every read.
    chunks: std::sync::Mutex<Vec<Arc<[LogEntry]>>>,
}

/// Past this many chunks the view's tail is joined into one (a copy of the tail, once).
const MAX_CHUNKS: usize = 64;

impl Replica {
    /// A replica of the store copied into `store` (the default log).
    pub fn new(store: PathBuf, chain_window: usize) -> Self {
        let paths = LogPaths::new(&store, custos_store::DEFAULT_LOG_ID);
        Self {
            store,
            paths,
            registry: Registry::new(chain_window),
            node_chain: ChainState::default(),
            node_did: None,
            segments: Vec::new(),
            sealed_end: 0,
            tail: BTreeMap::new(),
            folded: BTreeSet::new(),
            bare: 0,
            log_key: None,
            frontier: Frontier::default(),
            starts: Vec::new(),
            checked: 0,
            heads: Vec::new(),
            heads_len: 0,
            chunks: std::sync::Mutex::default(),
        }
    }

    /// Trusts `key` as the log key instead of the first one read from the copy: a copy
    /// whose `checkpoint.pub` differs, or whose segments another key signed, is refused.
    pub fn pin_log_key(&mut self, key: custos_store::checkpoint::NoteKey) {
        self.log_key = Some(key);
    }

    /// The log key this replica trusts: pinned, or the one it read first; `None` before
    /// the copy held one.
    pub fn trusted_log_key(&self) -> Option<&custos_store::checkpoint::NoteKey> {
        self.log_key.as_ref()
    }

    /// When the last segment taken in was sealed (RFC 3339), if any was.
    pub fn last_sealed_at(&self) -> Option<&str> {
        self.segments.last().map(|segment| segment.sealed_at.as_str())
    }

    /// The local copy.
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Takes in the segments the local copy's manifest lists beyond those already taken
    /// (only lines whose files are all here: a manifest may arrive before a segment), then
    /// checks the copy's checkpoints up to the sealed end against them. Answers how many
    /// segments were new. A reader that shares the replica does the same in steps
    /// instead, holding it only for the cheap ones: [`Replica::next_sealed`], then
    /// [`SealedSegment::read`] on its own, then [`Replica::take`]; and
    /// [`Replica::check_new_heads`] once no segment is left.
    pub fn refresh_sealed(&mut self) -> Result<usize, StoreError> {
        let mut taken = 0;
        while let Some(segment) = self.next_sealed()? {
            self.take(segment.read()?)?;
            taken += 1;
        }
        self.check_new_heads()?;
        Ok(taken)
    }

    /// The next segment to take in, when the copy's manifest lists one whose file is
    /// here: what reading it needs, with the tree as it stands before it.
    pub fn next_sealed(&mut self) -> Result<Option<SealedSegment>, StoreError> {
        let lines: Vec<SegmentInfo> = match self.paths.manifest.exists() {
            true => read_ndjson(&self.paths.manifest)?,
            false => return Ok(None),
        };
        let Some(line) = lines.into_iter().nth(self.segments.len()) else {
            return Ok(None);
        };
        let file = self.paths.segment_dir.join(&line.file);
        if !file.exists() {
            return Ok(None);
        }
        Ok(Some(SealedSegment {
            key: self.log_key()?,
            log_id: self.paths.log_id.clone(),
            position: self.segments.len(),
            sealed_end: self.sealed_end,
            frontier: self.frontier.clone(),
            file,
            line,
        }))
    }

    /// Takes in a segment read by [`SealedSegment::read`]: its entries folded, its tree
    /// joined, the checkpoints inside it checked, the tail below it dropped. A segment
    /// planned before another was taken (the replica moved on) is left for the next plan.
    pub fn take(&mut self, segment: ReadSegment) -> Result<(), StoreError> {
        if segment.position != self.segments.len() {
            return Ok(());
        }
        self.read_heads()?;
        let heads = std::mem::take(&mut self.heads);
        self.starts
            .push(std::mem::replace(&mut self.frontier, segment.frontier));
        for entry in &segment.entries {
            if !self.folded.contains(&entry.log_index) {
                self.fold(entry);
            }
        }
        self.sealed_end = segment.line.end_index;
        self.segments.push(segment.line);
        let checked = self.check_heads(&heads, Some(&segment.leaves));
        self.keep_unchecked(heads);
        let sealed_end = self.sealed_end;
        self.tail = self.tail.split_off(&sealed_end);
        self.folded = self.folded.split_off(&sealed_end);
        self.registry.sealed_end = sealed_end;
        self.registry.prune(sealed_end);
        checked
    }

    /// Checks the copy's checkpoints that came after their segment was taken.
    pub fn check_new_heads(&mut self) -> Result<(), StoreError> {
        self.read_heads()?;
        let heads = std::mem::take(&mut self.heads);
        let checked = self.check_heads(&heads, None);
        self.keep_unchecked(heads);
        checked
    }

    /// Keeps the checkpoints still unchecked (beyond the sealed end, or refused) for
    /// next time.
    fn keep_unchecked(&mut self, heads: Vec<CheckpointLine>) {
        let checked = self.checked;
        self.heads = heads.into_iter().filter(|line| line.size > checked).collect();
    }

    /// Reads the copy's checkpoints beyond the last one checked into `heads`, when the
    /// file changed since it was last read.
    fn read_heads(&mut self) -> Result<(), StoreError> {
        let len = fs_err::metadata(&self.paths.checkpoints).map_or(0, |metadata| metadata.len());
        if len == self.heads_len {
            return Ok(());
        }
        let checked = self.checked;
        self.heads = match len {
            0 => Vec::new(),
            _ => read_ndjson::<CheckpointLine>(&self.paths.checkpoints)?
                .into_iter()
                .filter(|line| line.size > checked)
                .collect(),
        };
        self.heads_len = len;
        Ok(())
    }

    /// Checks the checkpoints of `heads` beyond the last one checked, up to the sealed
    /// end: signed by the log key, and its root the one the segments' leaves give at its
    /// size. `last` holds the last taken segment's leaves, when at hand; another
    /// segment is read again. A checkpoint whose root differs is tampering (or a writer
    /// that signed a head its own segments do not make), named with its size and segment.
    fn check_heads(
        &mut self,
        heads: &[CheckpointLine],
        last: Option<&[custos_store::merkle::Hash]>,
    ) -> Result<(), StoreError> {
        let mut pending: Vec<&CheckpointLine> = heads
            .iter()
            .filter(|line| line.size > self.checked && line.size <= self.sealed_end)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        pending.sort_by_key(|line| line.size);
        let key = self.log_key()?;
        // The leaves of the segment the checkpoints inside it are checked with: (its
        // position, its leaves).
        let mut read: Option<(usize, std::borrow::Cow<'_, [custos_store::merkle::Hash]>)> =
            last.map(|leaves| (self.segments.len() - 1, std::borrow::Cow::Borrowed(leaves)));
        // The tree grown through a segment for the checkpoints inside it, in size order:
        // (the segment's position, the tree, how many of its leaves it holds). Each
        // checkpoint adds the leaves since the one before, so a segment with a checkpoint
        // every thousand entries costs one pass over its leaves, not one per checkpoint.
        let mut growing: Option<(usize, Frontier, usize)> = None;
        for line in pending {
            let checkpoint = custos_store::checkpoint::verify_checkpoint(&line.note, &key).map_err(|error| {
                StoreError::Tamper(format!(
                    "the checkpoint of size {} in the object store does not verify with the log key: {error}",
                    line.size
                ))
            })?;
            if checkpoint.size != line.size {
                return Err(StoreError::Tamper(format!(
                    "a checkpoints line says size {}, its signed note {}",
                    line.size, checkpoint.size
                )));
            }
            // The segment holding the checkpoint's last entry, and the tree at its start.
            let position = self
                .segments
                .partition_point(|segment| segment.end_index < checkpoint.size);
            let segment = &self.segments[position];
            let root = if checkpoint.size == segment.end_index {
                self.starts.get(position + 1).unwrap_or(&self.frontier).root()
            } else {
                if read.as_ref().is_none_or(|(at, _)| *at != position) {
                    let bytes = fs_err::read(self.paths.segment_dir.join(&segment.file))?;
                    read = Some((position, std::borrow::Cow::Owned(leaves_of(segment, bytes)?)));
                }
                let leaves = read.as_ref().map_or(&[][..], |(_, leaves)| leaves.as_ref());
                let upto = (checkpoint.size - segment.first_index) as usize;
                let (mut tree, pushed) = match growing.take() {
                    Some((at, tree, pushed)) if at == position && pushed <= upto => (tree, pushed),
                    _ => (self.starts[position].clone(), 0),
                };
                for leaf in &leaves[pushed..upto] {
                    tree.push(*leaf);
                }
                let root = tree.root();
                growing = Some((position, tree, upto));
                root
            };
            if root != checkpoint.root {
                return Err(StoreError::Tamper(format!(
                    "the checkpoint of size {} in the object store has root {}, but the sealed segments give {} \
                     (segment `{}`)",
                    checkpoint.size,
                    hex::encode(checkpoint.root),
                    hex::encode(root),
                    segment.file
                )));
            }
            self.checked = checkpoint.size;
        }
        Ok(())
    }

    /// The log key in the copy (`checkpoint.pub`): the one first read, which may never
    /// change.
    fn log_key(&mut self) -> Result<custos_store::checkpoint::NoteKey, StoreError> {
        let key = self.copy_key()?;
        match &self.log_key {
            Some(known) if *known != key => Err(StoreError::Tamper(
                "`checkpoint.pub` in the object store is not the log key this node trusts (pinned with --log-key, or the one it read first)".into(),
            )),
            Some(_) => Ok(key),
            None => Ok(self.log_key.insert(key).clone()),
        }
    }

    /// The key the copy's `checkpoint.pub` names.
    fn copy_key(&self) -> Result<custos_store::checkpoint::NoteKey, StoreError> {
        let text = fs_err::read_to_string(&self.paths.public_key)?;
        custos_store::checkpoint::NoteKey::parse_verifier(&text)
            .map_err(|error| StoreError::Tamper(format!("`checkpoint.pub` in the copy: {error}")))
    }

    /// Takes one committed record: its entry joins the tail (once: a record read again
    /// after a rebalance or a writer's replay changes nothing).
    pub fn apply(&mut self, record: &Committed) {
        let (log_index, payload_type, entry, gap) = match record {
            Committed::Event(observation) => {
                let Some(log_index) = observation.log_index else {
                    return;
                };
                let gap = match &observation.signal {
                    Signal::Accepted { gap } => *gap,
                    Signal::Rejected { .. } => return,
                };
                (log_index, EVENT_PAYLOAD_TYPE, observation.entry.as_deref(), gap)
            }
            Committed::Finding { log_index, entry, .. } => (*log_index, FINDING_PAYLOAD_TYPE, entry.as_deref(), None),
            Committed::Action { log_index, entry, .. } => (*log_index, ACTION_PAYLOAD_TYPE, entry.as_deref(), None),
            Committed::Control { log_index, entry, .. } => (*log_index, CONTROL_PAYLOAD_TYPE, entry.as_deref(), None),
            Committed::Replayed { .. } => return,
        };
        let Some(entry) = entry else {
            self.bare += 1;
            if self.bare == 1 {
                tracing::warn!(
                    log_index,
                    "a committed record without its entry: the writer does not publish entries (it needs --kafka); \
                     this node shows such entries once their segment is sealed"
                );
            }
            return;
        };
        if log_index < self.sealed_end || self.tail.contains_key(&log_index) {
            return;
        }
        let Some(entry) = log_entry(entry, log_index, payload_type, gap) else {
            tracing::warn!(log_index, "a committed entry whose signature is not 64 bytes; skipped");
            return;
        };
        self.fold(&entry);
        self.folded.insert(log_index);
        self.tail.insert(log_index, entry);
    }

    fn fold(&mut self, entry: &LogEntry) {
        if entry.payload_type == CONTROL_PAYLOAD_TYPE && self.node_did.is_none() {
            self.node_did = Some(entry.keyid.clone());
        }
        let node_did = self.node_did.clone().unwrap_or_default();
        crate::state::fold_entry(entry, &node_did, &mut self.registry, &mut self.node_chain);
    }

    /// The sealed segments and the tail's unbroken run after them.
    pub fn view(&self) -> StoreView {
        let end = self.view_end();
        StoreView {
            segment_dir: self.paths.segment_dir.clone(),
            segments: self.segments.clone(),
            tail: self.tail_chunks(end),
            size: end,
            checkpoints: self.paths.checkpoints.clone(),
        }
    }

    /// The tail from `sealed_end` to `end` as chunks: those of the last view still above
    /// the sealed end (one cut by it is made again), then one of what came since. Entries
    /// in the unbroken run never change, so a chunk made once stays right.
    fn tail_chunks(&self, end: u64) -> Vec<Arc<[LogEntry]>> {
        let mut chunks = self.chunks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sealed = self.sealed_end;
        chunks.retain(|chunk| chunk.last().is_some_and(|entry| entry.log_index >= sealed));
        if let Some(first) = chunks.first_mut()
            && first.first().is_some_and(|entry| entry.log_index < sealed)
        {
            *first = first
                .iter()
                .filter(|entry| entry.log_index >= sealed)
                .cloned()
                .collect();
        }
        let starts_right = chunks
            .first()
            .and_then(|chunk| chunk.first())
            .is_none_or(|entry| entry.log_index == sealed);
        let mut covered = chunks
            .last()
            .and_then(|chunk| chunk.last())
            .map_or(sealed, |entry| entry.log_index + 1);
        if !starts_right || covered > end {
            chunks.clear();
            covered = sealed;
        }
        if end > covered {
            chunks.push(self.tail.range(covered..end).map(|(_, entry)| entry.clone()).collect());
        }
        if chunks.len() > MAX_CHUNKS {
            let joined: Arc<[LogEntry]> = chunks.iter().flat_map(|chunk| chunk.iter().cloned()).collect();
            *chunks = vec![joined];
        }
        chunks.clone()
    }

    /// Entries waiting for one before them (not in the view yet).
    pub fn waiting(&self) -> usize {
        self.tail.range(self.view_end()..).count()
    }

    /// The end of the sealed segments and the tail's unbroken run after them.
    fn view_end(&self) -> u64 {
        let mut next = self.sealed_end;
        for index in self.tail.range(self.sealed_end..).map(|(index, _)| *index) {
            if index != next {
                break;
            }
            next += 1;
        }
        next
    }

    /// Every agent the log enrolled, as folded so far.
    pub fn agents(&self) -> Vec<AgentRecord> {
        self.registry.agents.values().cloned().collect()
    }

    /// The latest checkpoint in the copy (it covers sealed entries only).
    pub fn checkpoint(&self) -> Result<Option<CheckpointView>, StoreError> {
        if !self.paths.checkpoints.exists() || self.checked == 0 {
            return Ok(None);
        }
        // The latest checkpoint whose root was checked against the segments.
        let Some(line) = read_ndjson::<CheckpointLine>(&self.paths.checkpoints)?
            .into_iter()
            .rfind(|line| line.size == self.checked)
        else {
            return Ok(None);
        };
        // Served only once it verifies with the log key this node trusts (pinned, or the
        // one it read first), and with that key: never the copy's word for either.
        let key = match &self.log_key {
            Some(key) => key.clone(),
            None => self.copy_key()?,
        };
        let checkpoint = custos_store::checkpoint::verify_checkpoint(&line.note, &key).map_err(|error| {
            StoreError::Tamper(format!(
                "the latest checkpoint in the object store (size {}) does not verify with the log key: {error}",
                line.size
            ))
        })?;
        let verifier_key = key.verifier_string();
        Ok(Some(CheckpointView {
            log_id: self.paths.log_id.clone(),
            origin: checkpoint.origin,
            size: checkpoint.size,
            root: hex::encode(checkpoint.root),
            note: line.note,
            verifier_key,
            node_did: self.node_did.clone().unwrap_or_default(),
            cosigned_by: 0,
        }))
    }
}

/// A sealed segment to take in, as [`Replica::next_sealed`] planned it: reading and
/// checking it needs no access to the replica.
pub struct SealedSegment {
    key: custos_store::checkpoint::NoteKey,
    log_id: String,
    /// How many segments were taken before it, and where they end.
    position: usize,
    sealed_end: u64,
    /// The tree over the leaves before it.
    frontier: Frontier,
    file: PathBuf,
    line: SegmentInfo,
}

/// A segment read and checked: its manifest line's signature by the log key, its
/// blake3, its place after the segments before it and its leaves.
pub struct ReadSegment {
    position: usize,
    line: SegmentInfo,
    leaves: Vec<custos_store::merkle::Hash>,
    /// The tree with its leaves added.
    frontier: Frontier,
    entries: Vec<LogEntry>,
}

impl SealedSegment {
    /// Reads the file and checks it (the costly part of taking a segment in: the file's
    /// digest, its leaves, its entries).
    pub fn read(self) -> Result<ReadSegment, StoreError> {
        let bytes = fs_err::read(&self.file)?;
        check(&self.log_id, &self.key, &self.line, &bytes)?;
        if self.line.first_index != self.sealed_end {
            return Err(StoreError::Tamper(format!(
                "segment `{}` starts at log index {}, but the segments before it end at {}",
                self.line.file, self.line.first_index, self.sealed_end
            )));
        }
        let leaves = leaves_of(&self.line, bytes)?;
        let mut frontier = self.frontier;
        for leaf in &leaves {
            frontier.push(*leaf);
        }
        let entries = custos_store::segment::read_types(&self.file, &[CONTROL_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE])
            .map_err(|error| StoreError::Tamper(format!("segment `{}`: {error}", self.line.file)))?;
        Ok(ReadSegment {
            position: self.position,
            line: self.line,
            leaves,
            frontier,
            entries,
        })
    }
}

/// A manifest line is signed by the log key and names its segment's blake3; a copy that
/// fails either is tampered with.
fn check(
    log_id: &str,
    key: &custos_store::checkpoint::NoteKey,
    line: &SegmentInfo,
    bytes: &[u8],
) -> Result<(), StoreError> {
    if !line.signature_valid(log_id, key) {
        return Err(StoreError::Tamper(format!(
            "the manifest line for segment `{}` is not signed by the log key",
            line.file
        )));
    }
    let digest = blake3::hash(bytes).to_hex().to_string();
    if digest != line.blake3 {
        return Err(StoreError::Tamper(format!(
            "segment `{}` has blake3 {digest}, its signed manifest line says {}",
            line.file, line.blake3
        )));
    }
    Ok(())
}

/// The Merkle leaves of a segment's rows, as many as its manifest line says it holds.
fn leaves_of(line: &SegmentInfo, bytes: Vec<u8>) -> Result<Vec<custos_store::merkle::Hash>, StoreError> {
    let leaves = custos_store::segment::leaf_hashes(bytes)
        .map_err(|error| StoreError::Tamper(format!("segment `{}`: {error}", line.file)))?;
    if leaves.len() as u64 != line.end_index - line.first_index {
        return Err(StoreError::Tamper(format!(
            "segment `{}` holds {} entries, its signed manifest line says log indexes {} to {}",
            line.file,
            leaves.len(),
            line.first_index,
            line.end_index
        )));
    }
    Ok(leaves)
}

/// A committed entry as the log's row.
fn log_entry(entry: &SignedEntry, log_index: u64, payload_type: &str, gap: Option<(u64, u64)>) -> Option<LogEntry> {
    Some(LogEntry {
        log_index,
        ingest_ts_us: entry.ingest_ts_us,
        payload_type: payload_type.to_owned(),
        keyid: entry.keyid.clone(),
        sig: entry.sig.as_slice().try_into().ok()?,
        payload_blake3: *blake3::hash(&entry.payload).as_bytes(),
        payload: entry.payload.clone(),
        gap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_event::{AgentKey, Observation, Payload};

    /// A committed event at `log_index`, signed by `key`, with its entry.
    fn event(key: &AgentKey, log_index: u64, seq: u64) -> Committed {
        let prev = (seq > 0).then(|| "ab".repeat(32));
        let payload_json = serde_json::json!({
            "agent": key.did(), "seq": seq, "prev": prev, "ts": "2026-12-04T10:00:00Z", "realm": "eng",
            "kind": "tool_call", "action": "search"
        });
        let bytes = serde_json::to_vec(&payload_json).unwrap();
        let envelope = key.sign_envelope(EVENT_PAYLOAD_TYPE, bytes.clone());
        Committed::Event(Box::new(Observation {
            log_index: Some(log_index),
            ingest_ts: chrono::Utc::now(),
            payload: Payload::parse(&bytes).unwrap(),
            signal: Signal::Accepted { gap: None },
            entry: Some(Box::new(SignedEntry {
                keyid: envelope.keyid.clone(),
                sig: envelope.sig.to_vec(),
                payload: bytes,
                ingest_ts_us: 1_796_000_000_000_000 + log_index as i64,
            })),
        }))
    }

    fn indexes(replica: &Replica) -> Vec<u64> {
        replica
            .view()
            .tail
            .iter()
            .flat_map(|chunk| chunk.iter().map(|entry| entry.log_index))
            .collect()
    }

    /// A closed store of `count` events: segments of 10 entries, a checkpoint every 4.
    fn sealed_store(dir: &Path, count: usize) {
        let info = custos_store::StoreInfo::open(dir, true).unwrap();
        let config = custos_store::LogConfig {
            segment_max_entries: 10,
            checkpoint_every: 4,
            checkpoint_interval: std::time::Duration::from_secs(3600),
            seal_retry: std::time::Duration::ZERO,
            seal_after: None,
        };
        let mut log = custos_store::Log::open(
            dir,
            &info.store_id,
            custos_store::DEFAULT_LOG_ID,
            config,
            custos_store::OpenMode::ReadWrite,
            &mut |_| {},
        )
        .unwrap();
        let mut signer = custos_event::Signer::new(AgentKey::from_seed(&[5; 32]), "eng");
        for position in 0..count {
            let mut payload = Payload::new(custos_event::Kind::ToolCall, chrono::Utc::now());
            payload.action = Some("search".into());
            let entry = LogEntry::from_envelope(
                signer.sign(payload),
                log.next_index(),
                1_700_000_000_000_000 + position as i64,
                None,
            );
            log.append(vec![entry]).unwrap();
            log.maintain().unwrap();
        }
        log.close().unwrap();
    }

    /// The store's checkpoints, with the one of `size` replaced by `note`.
    fn replace_checkpoint(paths: &LogPaths, size: u64, note: &str) {
        let lines: Vec<CheckpointLine> = read_ndjson(&paths.checkpoints).unwrap();
        assert!(
            lines.iter().any(|line| line.size == size),
            "no checkpoint of size {size}"
        );
        let text: String = lines
            .into_iter()
            .map(|line| {
                let line = match line.size == size {
                    true => CheckpointLine {
                        size,
                        note: note.to_owned(),
                    },
                    false => line,
                };
                serde_json::to_string(&line).unwrap() + "\n"
            })
            .collect();
        fs_err::write(&paths.checkpoints, text).unwrap();
    }

    /// Every checkpoint up to the sealed end is checked against the segments' leaves; the
    /// latest is served, only while it verifies with the trusted log key.
    #[test]
    fn checkpoints_are_checked_against_the_segments_and_served_signed() {
        let dir = tempfile::tempdir().unwrap();
        sealed_store(dir.path(), 25);
        let paths = LogPaths::new(dir.path(), custos_store::DEFAULT_LOG_ID);
        let trusted = custos_store::checkpoint::NoteKey::parse_verifier(
            fs_err::read_to_string(&paths.public_key).unwrap().trim(),
        )
        .unwrap();
        let mut replica = Replica::new(dir.path().to_owned(), 64);
        assert_eq!(replica.refresh_sealed().unwrap(), 3);
        let view = replica.checkpoint().unwrap().unwrap();
        assert_eq!(
            (view.size, view.verifier_key.as_str()),
            (25, trusted.verifier_string().as_str())
        );

        // The served note changed after signing (its size): refused, named.
        let lines: Vec<CheckpointLine> = read_ndjson(&paths.checkpoints).unwrap();
        let last = lines.last().unwrap().note.clone();
        replace_checkpoint(&paths, 25, &last.replacen("\n25\n", "\n9\n", 1));
        let error = replica.checkpoint().unwrap_err().to_string();
        assert!(error.contains("does not verify"), "{error}");
        // Signed by another key: refused too (the node keeps the key it read first).
        let stranger = AgentKey::from_seed(&[22; 32]);
        let body = custos_store::checkpoint::verify_checkpoint(&last, &trusted)
            .unwrap()
            .body();
        replace_checkpoint(
            &paths,
            25,
            &custos_store::checkpoint::sign_note(&body, &trusted.name, &stranger),
        );
        let error = replica.checkpoint().unwrap_err().to_string();
        assert!(error.contains("does not verify"), "{error}");
    }

    /// A checkpoint signed by the log key itself (a writer that lies, or its stolen key)
    /// whose root the segments do not give: refused, naming its size and segment, in the
    /// middle of a segment and at a segment's end.
    #[test]
    fn a_signed_checkpoint_whose_root_the_segments_do_not_give_is_found() {
        let dir = tempfile::tempdir().unwrap();
        sealed_store(dir.path(), 25);
        let paths = LogPaths::new(dir.path(), custos_store::DEFAULT_LOG_ID);
        let log_key = custos_store::keyfile::read_key(&paths.key).unwrap();
        let trusted = custos_store::checkpoint::NoteKey::parse_verifier(
            fs_err::read_to_string(&paths.public_key).unwrap().trim(),
        )
        .unwrap();
        let original = fs_err::read(&paths.checkpoints).unwrap();
        let segments: Vec<SegmentInfo> = read_ndjson(&paths.manifest).unwrap();
        // Every checkpoint but the empty tree's, forged in turn: inside a segment, and at
        // a segment's end (the last one is at the log's end).
        let sizes: Vec<u64> = read_ndjson::<CheckpointLine>(&paths.checkpoints)
            .unwrap()
            .into_iter()
            .map(|line| line.size)
            .filter(|size| *size > 0)
            .collect();
        assert!(sizes.iter().any(|size| size % 10 != 0), "{sizes:?}");
        assert_eq!(sizes.last(), Some(&25));
        for size in sizes {
            let segment = &segments
                .iter()
                .find(|segment| segment.first_index < size && size <= segment.end_index)
                .unwrap()
                .file;
            fs_err::write(&paths.checkpoints, &original).unwrap();
            let forged = custos_store::checkpoint::Checkpoint {
                origin: trusted.name.clone(),
                size,
                root: [9; 32],
            };
            replace_checkpoint(
                &paths,
                size,
                &custos_store::checkpoint::sign_note(&forged.body(), &trusted.name, &log_key),
            );
            let mut replica = Replica::new(dir.path().to_owned(), 64);
            let error = replica.refresh_sealed().unwrap_err().to_string();
            assert!(
                error.contains(&format!("checkpoint of size {size}")) && error.contains(segment.as_str()),
                "{error}"
            );
            // What was checked before it is still served; nothing after it.
            assert!(replica.checkpoint().unwrap().is_none_or(|view| view.size < size));
        }
    }

    /// A segment read while the replica is not held (the query node's refresh): taken in
    /// once, with the tail applied meanwhile; a second plan of the same segment, taken
    /// after the first, changes nothing.
    #[test]
    fn a_segment_read_apart_is_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        sealed_store(dir.path(), 25);
        let mut replica = Replica::new(dir.path().to_owned(), 64);
        let first = replica.next_sealed().unwrap().unwrap();
        let again = replica.next_sealed().unwrap().unwrap();
        let read = first.read().unwrap();
        // Meanwhile an entry of that segment arrives on the committed topic.
        replica.apply(&event(&AgentKey::from_seed(&[7; 32]), 3, 0));
        replica.take(read).unwrap();
        assert_eq!((replica.segments.len(), replica.view().size), (1, 10));
        assert!(replica.tail.is_empty(), "the tail below the sealed end is dropped");
        replica.take(again.read().unwrap()).unwrap();
        assert_eq!((replica.segments.len(), replica.sealed_end), (1, 10), "taken once");
        assert_eq!(replica.refresh_sealed().unwrap(), 2);
        assert_eq!(replica.view().size, 25);
        assert_eq!(replica.checkpoint().unwrap().unwrap().size, 25);
        assert!(replica.next_sealed().unwrap().is_none());
    }

    #[test]
    fn the_view_is_a_prefix_of_the_log_whatever_order_entries_arrive_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::new(dir.path().to_owned(), 8);
        let key = AgentKey::from_seed(&[7; 32]);
        // 1 and 2 arrive before 0 (another partition of the topic is behind).
        replica.apply(&event(&key, 1, 1));
        replica.apply(&event(&key, 2, 2));
        assert!(indexes(&replica).is_empty(), "nothing after a missing entry shows");
        assert_eq!(replica.view().size, 0);
        assert_eq!(replica.waiting(), 2);
        replica.apply(&event(&key, 0, 0));
        assert_eq!(indexes(&replica), [0, 1, 2]);
        assert_eq!(replica.view().size, 3);
        // Read again (a rebalance, a writer's replay): nothing changes.
        replica.apply(&event(&key, 1, 1));
        assert_eq!(indexes(&replica), [0, 1, 2]);
    }

    #[test]
    fn each_view_adds_only_what_came_since_and_drops_what_was_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::new(dir.path().to_owned(), 64);
        let key = AgentKey::from_seed(&[9; 32]);
        for index in 0..27 {
            replica.apply(&event(&key, index, index));
        }
        let before = replica.view().tail;
        assert_eq!(before.len(), 1);
        replica.apply(&event(&key, 27, 27));
        let after = replica.view().tail;
        assert_eq!(after.len(), 2);
        assert!(
            Arc::ptr_eq(&before[0], &after[0]),
            "the chunk made before is shared, not copied"
        );
        assert_eq!(indexes(&replica), (0..28).collect::<Vec<_>>());
        // Sealed segments now cover 0..25: the chunk they cut is made again from 25 on,
        // the one above them kept.
        sealed_store(dir.path(), 25);
        assert_eq!(replica.refresh_sealed().unwrap(), 3);
        assert_eq!(indexes(&replica), [25, 26, 27]);
        let sealed = replica.view().tail;
        assert!(Arc::ptr_eq(&sealed[1], &after[1]));
        // A view after every new entry: past MAX_CHUNKS chunks they are joined.
        let end = 28 + MAX_CHUNKS as u64 + 5;
        for index in 28..end {
            replica.apply(&event(&key, index, index));
            assert!(replica.view().tail.len() <= MAX_CHUNKS);
        }
        assert_eq!(indexes(&replica), (25..end).collect::<Vec<_>>());
    }

    #[test]
    fn rows_are_rebuilt_byte_for_byte_and_bad_or_bare_records_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::new(dir.path().to_owned(), 8);
        let key = AgentKey::from_seed(&[8; 32]);
        let record = event(&key, 0, 0);
        replica.apply(&record);
        let Committed::Event(observation) = &record else {
            unreachable!()
        };
        let signed = observation.entry.as_ref().unwrap();
        let row = replica.view().tail[0][0].clone();
        assert_eq!(row.payload, signed.payload);
        assert_eq!(row.sig.to_vec(), signed.sig);
        assert_eq!(row.keyid, key.did());
        assert_eq!(row.payload_blake3, *blake3::hash(&signed.payload).as_bytes());
        assert_eq!(row.ingest_ts_us, signed.ingest_ts_us);
        assert_eq!(row.payload_type, EVENT_PAYLOAD_TYPE);
        // A signature of the wrong length, a record without its entry, a refused event:
        // none becomes a row.
        let mut short = event(&key, 1, 1);
        if let Committed::Event(observation) = &mut short {
            observation.entry.as_mut().unwrap().sig.truncate(10);
        }
        replica.apply(&short);
        let mut bare = event(&key, 1, 1);
        if let Committed::Event(observation) = &mut bare {
            observation.entry = None;
        }
        replica.apply(&bare);
        let mut refused = event(&key, 1, 1);
        if let Committed::Event(observation) = &mut refused {
            observation.log_index = None;
            observation.signal = Signal::Rejected {
                reason: "replay".into(),
            };
        }
        replica.apply(&refused);
        assert_eq!(indexes(&replica), [0]);
        // The right one still lands.
        replica.apply(&event(&key, 1, 1));
        assert_eq!(indexes(&replica), [0, 1]);
    }

    #[test]
    fn control_entries_fold_into_the_agents_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = Replica::new(dir.path().to_owned(), 8);
        let node = AgentKey::from_seed(&[9; 32]);
        let agent = AgentKey::from_seed(&[10; 32]);
        let control = |action: &str, seq: u64| {
            let payload = serde_json::to_vec(&serde_json::json!({
                "kind": "control", "action": action, "seq": seq, "prev": null,
                "ts": "2026-12-04T10:00:00Z", "agent": agent.did(), "realm": "eng", "by": "token:t"
            }))
            .unwrap();
            let envelope = node.sign_envelope(CONTROL_PAYLOAD_TYPE, payload.clone());
            Committed::Control {
                log_index: seq,
                payload: payload.clone(),
                entry: Some(Box::new(SignedEntry {
                    keyid: envelope.keyid,
                    sig: envelope.sig.to_vec(),
                    payload,
                    ingest_ts_us: 0,
                })),
            }
        };
        replica.apply(&control("enroll", 0));
        assert_eq!(replica.agents()[0].status, custos_event::agent::AgentStatus::Active);
        replica.apply(&control("revoke", 1));
        let agents = replica.agents();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].status, custos_event::agent::AgentStatus::Revoked);
        assert_eq!(agents[0].realm, "eng");
    }
}
