//! The offline verifier: recomputes everything from the files and trusts none of them.
//!
//! For each log it checks, in order: segment manifest signatures, each segment's blake3,
//! footer metadata and row order; each row's `payload_blake3`, decoded columns and leaf;
//! each signer's hash chain; optionally every ed25519 signature (batched); the WAL tail's
//! checksums; every checkpoint's signature, its root against the recomputed tree, and
//! consistency between consecutive checkpoints. Every problem names the file, the row and
//! the log index where it can.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::checkpoint::{NoteKey, verify_checkpoint};
use crate::entry::EntryRef;
use crate::log::{CheckpointLine, SegmentInfo, read_ndjson};
use crate::merkle::{Hash, Tree, verify_consistency};
use crate::segment::{BatchView, DecodedRef};
use crate::{LogPaths, StoreError, StoreInfo, read_object};
use custos_event::chain::Step;

/// What to check beyond structure and hashes.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Verify every ed25519 signature too.
    pub signatures: bool,
    /// Expected checkpoint verifier key (`name+id+key`), pinned from a trusted source.
    pub log_key: Option<String>,
    /// Rows handed from the reader thread to the checks at a time (default
    /// [`CHUNK_ROWS`]). Only throughput depends on it; tests make it small to cross chunk
    /// boundaries often.
    pub chunk_rows: Option<usize>,
    /// Checkpoints cosigned by witnesses (the witness's key, the cosigned note): the log
    /// must hold at least as many entries, with the same root at that size.
    pub witnessed: Vec<(crate::witness::CosignerKey, String)>,
    /// For a partition set: the cross-partition checkpoints' verifier key you trust,
    /// instead of the published `partitions.pub`.
    pub partitions_key: Option<String>,
}

/// One thing that does not add up.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// Stable code, documented in `docs/store-format.md`.
    pub code: &'static str,
    pub log_id: String,
    pub file: String,
    pub row: Option<u64>,
    pub log_index: Option<u64>,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] log {} file {}", self.code, self.log_id, self.file)?;
        if let Some(row) = self.row {
            write!(f, " row {row}")?;
        }
        if let Some(index) = self.log_index {
            write!(f, " log index {index}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Summary of one verified log.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LogSummary {
    pub log_id: String,
    pub entries: u64,
    pub segments: usize,
    pub wal_entries: u64,
    pub checkpoints: usize,
    pub root: String,
    pub signatures_checked: u64,
    pub verifier_key: String,
}

/// The verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub logs: Vec<LogSummary>,
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not integrity failures (a torn, unacknowledged WAL tail).
    pub warnings: Vec<String>,
    /// For a partition set (`--log-per-partition`): the set and its cross-partition
    /// checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<PartitionsSummary>,
}

/// What was checked of a partition set.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PartitionsSummary {
    pub set_id: String,
    pub partitions: u32,
    /// Cross-partition checkpoints checked.
    pub checkpoints: usize,
    pub verifier_key: String,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Progress: bytes read so far out of the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Verifies every log of the store at `data`, or, when `data` is a partition set, every
/// partition's store and the cross-partition checkpoints that bind them.
pub fn verify_store(data: &Path, options: &VerifyOptions, progress: Progress<'_>) -> Result<Report, StoreError> {
    if !data.join("store.json").exists()
        && let Some(set) = crate::partitions::PartitionSet::open(data)?
    {
        return verify_partition_set(data, &set, options, progress);
    }
    let info = StoreInfo::open(data, false)?;
    let mut report = Report::default();
    let total: u64 = info
        .logs
        .iter()
        .map(|log_id| log_bytes(&LogPaths::new(data, log_id)))
        .sum();
    let mut done = 0u64;
    for log_id in &info.logs {
        let summary = LogVerifier::new(data, &info.store_id, log_id, options, &mut report).run(&mut |bytes| {
            done += bytes;
            progress(done, total);
        })?;
        report.logs.push(summary);
    }
    Ok(report)
}

/// [`verify_store`] of each partition's store (its logs named `<partition>/<log id>`),
/// then the cross-partition checkpoints against the partitions' own checkpoints.
fn verify_partition_set(
    data: &Path,
    set: &crate::partitions::PartitionSet,
    options: &VerifyOptions,
    progress: Progress<'_>,
) -> Result<Report, StoreError> {
    use crate::partitions::PartitionSet;
    let mut report = Report::default();
    for partition in 0..set.partitions {
        let dir = PartitionSet::store_dir(data, partition);
        if !dir.join("store.json").exists() {
            // Never written, or deleted: a deleted partition that any cross-partition
            // checkpoint bound as non-empty is a `cross_head` problem below.
            report.warnings.push(format!(
                "partition {partition} has no store (partitions/{partition}/store.json): no writer has taken it yet"
            ));
            continue;
        }
        let part = verify_store(&dir, options, &mut *progress)?;
        report.logs.extend(part.logs.into_iter().map(|mut log| {
            log.log_id = format!("{partition}/{}", log.log_id);
            log
        }));
        report.problems.extend(part.problems.into_iter().map(|mut problem| {
            problem.log_id = format!("{partition}/{}", problem.log_id);
            problem
        }));
        report.warnings.extend(
            part.warnings
                .into_iter()
                .map(|warning| format!("partition {partition}: {warning}")),
        );
    }
    let (problems, checkpoints) = crate::partitions::verify_cross(data, set, options.partitions_key.as_deref())?;
    report.problems.extend(problems);
    let verifier_key = match &options.partitions_key {
        Some(key) => key.clone(),
        None => fs_err::read_to_string(PartitionSet::public_key_path(data))
            .unwrap_or_default()
            .trim()
            .to_owned(),
    };
    if checkpoints == 0 {
        report
            .warnings
            .push("the set has no cross-partition checkpoint yet: nothing binds the partitions together".into());
    }
    report.partitions = Some(PartitionsSummary {
        set_id: set.set_id.clone(),
        partitions: set.partitions,
        checkpoints,
        verifier_key,
    });
    Ok(report)
}

fn log_bytes(paths: &LogPaths) -> u64 {
    let size = |dir: &Path| -> u64 {
        fs_err::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    size(&paths.segment_dir) + size(&paths.wal_dir)
}

struct ChainHead {
    seq: u64,
    digest: [u8; 32],
    log_index: u64,
}

struct LogVerifier<'a> {
    paths: LogPaths,
    store_id: String,
    options: &'a VerifyOptions,
    report: &'a mut Report,
    tree: Tree,
    chains: HashMap<String, ChainHead>,
    signatures_checked: u64,
    /// Checkpoints by size: (line number, root).
    expected_roots: BTreeMap<u64, Vec<(usize, Hash)>>,
    /// Once entries are missing, later roots cannot be compared.
    broken_at: Option<u64>,
    keys: std::sync::Arc<custos_event::KeyCache>,
    /// LastID agents' keys, from the enrollments logged before their records.
    lastid_keys: HashMap<String, [u8; 32]>,
}

/// Rows per chunk handed from the reader thread to the checks: small enough that the
/// pipeline fills at once, large enough that each chunk keeps both cores busy.
pub const CHUNK_ROWS: usize = 8192;

/// What the reader thread hands on, in order, for each segment of the manifest.
enum Feed {
    /// The file could not be read at all; nothing else follows for this segment.
    Missing(String),
    /// The file was read and hashed; the footer parsed or not. Chunks then `Done` follow.
    Opened {
        len: u64,
        digest: String,
        footer: Result<Vec<(String, String)>, String>,
    },
    /// Decoded rows with their order-independent checks already done.
    Rows(arrow::array::RecordBatch, Vec<Prepared>),
    /// Decoding failed part-way through the file.
    Damaged(String),
    Done,
}

/// Reads, hashes, decodes and prepares every segment of `manifest` in order, sending what
/// it finds down `sender`. Runs on its own thread beside the checks and signature batches.
fn feed(dir: &Path, manifest: &[SegmentInfo], chunk_rows: usize, sender: &std::sync::mpsc::SyncSender<Feed>) {
    for info in manifest {
        let bytes = match read_object(dir, &info.file) {
            Ok(bytes) => bytes,
            Err(error) => {
                if sender.send(Feed::Missing(error.to_string())).is_err() {
                    return;
                }
                continue;
            }
        };
        let len = bytes.len() as u64;
        let digest = crate::segment::file_digest(&bytes);
        let stream = crate::segment::open_stream(bytes, chunk_rows);
        let footer = match &stream {
            Ok(reader) => Ok(reader.metadata.clone()),
            Err(error) => Err(error.to_string()),
        };
        if sender.send(Feed::Opened { len, digest, footer }).is_err() {
            return;
        }
        for batch in stream.into_iter().flatten() {
            let message = match batch {
                Ok(batch) => match prepare_batch(&batch) {
                    Ok(prepared) => Feed::Rows(batch, prepared),
                    Err(error) => Feed::Damaged(error.to_string()),
                },
                Err(error) => Feed::Damaged(error.to_string()),
            };
            let stop = matches!(message, Feed::Damaged(_));
            if sender.send(message).is_err() {
                return;
            }
            if stop {
                break;
            }
        }
        if sender.send(Feed::Done).is_err() {
            return;
        }
    }
}

/// The per-row work that does not depend on order, done before the ordered checks: one
/// JSON parse, the digest, the decoded columns, the leaf.
struct Prepared {
    digest: [u8; 32],
    check: crate::segment::PayloadCheck,
    leaf: Hash,
}

fn prepare(entry: EntryRef<'_>, stored: Option<DecodedRef<'_>>) -> Prepared {
    Prepared {
        digest: *blake3::hash(entry.payload).as_bytes(),
        check: crate::segment::check_payload(entry.payload, stored),
        leaf: entry.leaf_hash(),
    }
}

/// The order-independent checks of every row of a batch, borrowed in place.
fn prepare_batch(batch: &arrow::array::RecordBatch) -> Result<Vec<Prepared>, crate::segment::SegmentError> {
    let view = BatchView::new(batch)?;
    (0..view.len())
        .map(|row| Ok(prepare(view.entry(row)?, Some(view.decoded(row)))))
        .collect()
}

fn entries_of(batch: &arrow::array::RecordBatch) -> Result<Vec<EntryRef<'_>>, crate::segment::SegmentError> {
    let view = BatchView::new(batch)?;
    (0..view.len()).map(|row| view.entry(row)).collect()
}

/// Checks the signatures of `entries` on every core, in batches of
/// [`custos_event::verify::BATCH`] with one agent's entries together (so each batch merges
/// the terms of a repeated key); returns the position and reason of each failure.
fn signatures_of(entries: &[EntryRef<'_>], keys: &custos_event::KeyCache) -> Vec<(usize, String)> {
    use rayon::prelude::*;
    let order = custos_event::verify::by_key(entries, |entry| entry.keyid);
    let sorted: Vec<EntryRef<'_>> = order.iter().map(|&index| entries[index]).collect();
    let mut failures: Vec<(usize, String)> = sorted
        .par_chunks(custos_event::verify::BATCH)
        .enumerate()
        .flat_map_iter(|(number, chunk)| {
            let order = &order;
            signature_batch(chunk, keys)
                .into_iter()
                .map(move |(position, detail)| (order[number * custos_event::verify::BATCH + position], detail))
        })
        .collect();
    failures.sort_by_key(|(position, _)| *position);
    failures
}

fn signature_batch(chunk: &[EntryRef<'_>], keys: &custos_event::KeyCache) -> Vec<(usize, String)> {
    let mut failures = Vec::new();
    // Every message of the batch goes into one buffer: (position, key, end offset).
    let mut messages = Vec::with_capacity(chunk.iter().map(|entry| entry.payload.len() + 64).sum());
    let mut keyed = Vec::with_capacity(chunk.len());
    for (position, entry) in chunk.iter().enumerate() {
        match keys.get(entry.keyid) {
            Ok(key) => {
                let start = messages.len();
                custos_event::pae_into(&mut messages, entry.payload_type, entry.payload);
                keyed.push((position, key, start..messages.len()));
            }
            Err(error) => failures.push((position, format!("bad keyid: {error}"))),
        }
    }
    let items: Vec<(&custos_event::VerifyingKey, &[u8], &[u8; 64])> = keyed
        .iter()
        .map(|(position, key, range)| (key, &messages[range.clone()], chunk[*position].sig))
        .collect();
    for ((position, _, _), ok) in keyed.iter().zip(custos_event::verify::verify_messages(&items)) {
        if !ok {
            failures.push((
                *position,
                format!(
                    "signature by `{}` does not verify over the DSSE PAE",
                    chunk[*position].keyid
                ),
            ));
        }
    }
    failures.sort_by_key(|(position, _)| *position);
    failures
}

impl<'a> LogVerifier<'a> {
    fn new(data: &Path, store_id: &str, log_id: &str, options: &'a VerifyOptions, report: &'a mut Report) -> Self {
        Self {
            paths: LogPaths::new(data, log_id),
            store_id: store_id.to_owned(),
            options,
            report,
            tree: Tree::new(),
            chains: HashMap::new(),
            signatures_checked: 0,
            expected_roots: BTreeMap::new(),
            broken_at: None,
            keys: std::sync::Arc::default(),
            lastid_keys: HashMap::new(),
        }
    }

    fn problem(&mut self, code: &'static str, file: &str, row: Option<u64>, log_index: Option<u64>, detail: String) {
        self.report.problems.push(Problem {
            code,
            log_id: self.paths.log_id.clone(),
            file: file.to_owned(),
            row,
            log_index,
            detail,
        });
    }

    fn run(mut self, progress: &mut dyn FnMut(u64)) -> Result<LogSummary, StoreError> {
        let origin = format!("custos/{}/{}", self.store_id, self.paths.log_id);
        let note_key = self.note_key(&origin)?;
        let checkpoints = self.load_checkpoints(&note_key, &origin)?;
        let manifest: Vec<SegmentInfo> = read_ndjson(&self.paths.manifest)?;
        let manifest_name = display(&self.paths.manifest);
        for (line, info) in manifest.iter().enumerate() {
            if !info.signature_valid(&self.paths.log_id, &note_key) {
                self.problem(
                    "manifest_signature",
                    &manifest_name,
                    Some(line as u64),
                    None,
                    format!("the entry for `{}` is not signed by the log key", info.file),
                );
            }
        }
        // A reader thread reads, hashes, decodes and prepares rows ahead of the ordered
        // checks; signature batches run on every core beside both.
        let segment_dir = self.paths.segment_dir.clone();
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(4);
            let infos = &manifest;
            let chunk_rows = self.options.chunk_rows.unwrap_or(CHUNK_ROWS);
            scope.spawn(move || feed(&segment_dir, infos, chunk_rows, &sender));
            for info in &manifest {
                self.segment(info, &receiver, progress);
            }
        });
        let sealed_end = manifest.last().map_or(0, |info| info.end_index);
        let wal_entries = self.wal(sealed_end, &checkpoints, progress)?;

        // Checkpoints beyond what the files hold, and consistency between neighbours.
        let size = self.tree.size();
        for (line, checkpoint_size, _) in &checkpoints {
            if *checkpoint_size > size {
                self.problem(
                    "checkpoint_beyond_log",
                    &display(&self.paths.checkpoints),
                    Some(*line as u64),
                    Some(size),
                    format!(
                        "the checkpoint signs {checkpoint_size} entries but the store holds {size}: entries from log index {size} on are missing"
                    ),
                );
            }
        }
        for pair in checkpoints.windows(2) {
            let ((_, from, from_root), (line, to, to_root)) = (&pair[0], &pair[1]);
            if *from == 0 || *to > size || self.broken_at.is_some_and(|broken| broken < *to) {
                continue;
            }
            let proof = self.tree.consistency_proof(*from, *to)?;
            if verify_consistency(*from, *to, &proof, from_root, to_root).is_err() {
                self.problem(
                    "checkpoint_inconsistent",
                    &display(&self.paths.checkpoints),
                    Some(*line as u64),
                    None,
                    format!("the checkpoint at size {to} is not consistent with the one at size {from}"),
                );
            }
        }
        self.witnessed(&note_key, size);
        Ok(LogSummary {
            log_id: self.paths.log_id.clone(),
            entries: size,
            segments: manifest.len(),
            wal_entries,
            checkpoints: checkpoints.len(),
            root: hex::encode(self.tree.root()),
            signatures_checked: self.signatures_checked,
            verifier_key: note_key.verifier_string(),
        })
    }

    /// Compares the log with what witnesses cosigned: a log behind a cosigned checkpoint
    /// lost entries from its tail, however consistent its own files are.
    fn witnessed(&mut self, note_key: &NoteKey, size: u64) {
        let witnessed = self.options.witnessed.clone();
        for (witness, note) in &witnessed {
            let at = format!("witness {}", witness.name);
            let checkpoint = match verify_checkpoint(note, note_key) {
                Ok(checkpoint) => checkpoint,
                Err(error) => {
                    self.problem(
                        "witness_checkpoint",
                        &at,
                        None,
                        None,
                        format!("the witnessed checkpoint is not this log's: {error}"),
                    );
                    continue;
                }
            };
            if let Err(error) = witness.verify(note) {
                self.problem("witness_checkpoint", &at, None, None, error.to_string());
                continue;
            }
            if checkpoint.size > size {
                self.problem(
                    "behind_witness",
                    &at,
                    None,
                    Some(size),
                    format!(
                        "the witness cosigned a checkpoint of {} entries but the store holds {size}: entries from log index {size} on were removed",
                        checkpoint.size
                    ),
                );
            } else if self.tree.root_at(checkpoint.size).ok() != Some(checkpoint.root) {
                self.problem(
                    "witness_mismatch",
                    &at,
                    None,
                    None,
                    format!(
                        "the root at size {} differs from the one the witness cosigned: the log was rewritten",
                        checkpoint.size
                    ),
                );
            }
        }
    }

    fn note_key(&mut self, origin: &str) -> Result<NoteKey, StoreError> {
        let published = fs_err::read_to_string(&self.paths.public_key)
            .map_err(StoreError::from)
            .and_then(|text| Ok(NoteKey::parse_verifier(&text)?));
        let key = match (&self.options.log_key, published) {
            (Some(pinned), published) => {
                let pinned = NoteKey::parse_verifier(pinned)?;
                if published.as_ref().ok() != Some(&pinned) {
                    self.problem(
                        "log_key_mismatch",
                        &display(&self.paths.public_key),
                        None,
                        None,
                        "the published checkpoint key differs from the pinned --log-key".into(),
                    );
                }
                pinned
            }
            (None, published) => published?,
        };
        if key.name != origin {
            self.problem(
                "checkpoint_origin",
                &display(&self.paths.public_key),
                None,
                None,
                format!("key name `{}` is not this log's origin `{origin}`", key.name),
            );
        }
        Ok(key)
    }

    fn load_checkpoints(&mut self, key: &NoteKey, origin: &str) -> Result<Vec<(usize, u64, Hash)>, StoreError> {
        let file = display(&self.paths.checkpoints);
        let lines: Vec<CheckpointLine> = read_ndjson(&self.paths.checkpoints)?;
        let mut out: Vec<(usize, u64, Hash)> = Vec::new();
        for (number, line) in lines.iter().enumerate() {
            match verify_checkpoint(&line.note, key) {
                Ok(checkpoint) => {
                    if checkpoint.origin != origin {
                        self.problem(
                            "checkpoint_origin",
                            &file,
                            Some(number as u64),
                            None,
                            format!("origin `{}` is not `{origin}`", checkpoint.origin),
                        );
                        continue;
                    }
                    if checkpoint.size != line.size {
                        self.problem(
                            "checkpoint_edited",
                            &file,
                            Some(number as u64),
                            None,
                            format!(
                                "line says size {} but the signed note says {}",
                                line.size, checkpoint.size
                            ),
                        );
                    }
                    if let Some((_, previous, _)) = out.last()
                        && checkpoint.size < *previous
                    {
                        self.problem(
                            "checkpoint_order",
                            &file,
                            Some(number as u64),
                            None,
                            format!("size {} follows a checkpoint of size {previous}", checkpoint.size),
                        );
                    }
                    self.expected_roots
                        .entry(checkpoint.size)
                        .or_default()
                        .push((number, checkpoint.root));
                    out.push((number, checkpoint.size, checkpoint.root));
                }
                Err(error) => self.problem(
                    "checkpoint_signature",
                    &file,
                    Some(number as u64),
                    None,
                    format!("checkpoint note rejected: {error}"),
                ),
            }
        }
        // The empty tree's checkpoint is checked here since no leaf push reaches it.
        if let Some(roots) = self.expected_roots.get(&0).cloned() {
            for (number, root) in roots {
                if root != crate::merkle::empty_root() {
                    self.problem(
                        "root_mismatch",
                        &file,
                        Some(number as u64),
                        Some(0),
                        "empty-tree root is wrong".into(),
                    );
                }
            }
        }
        Ok(out)
    }

    fn segment(&mut self, info: &SegmentInfo, feed: &std::sync::mpsc::Receiver<Feed>, progress: &mut dyn FnMut(u64)) {
        let file = info.file.clone();
        if info.first_index != self.tree.size() && self.broken_at.is_none() {
            self.problem(
                "segment_gap",
                &file,
                None,
                Some(self.tree.size()),
                format!(
                    "segment starts at log index {} but the previous data ends at {}",
                    info.first_index,
                    self.tree.size()
                ),
            );
            self.broken_at = Some(self.tree.size());
        }
        let next = || {
            feed.recv()
                .unwrap_or_else(|_| Feed::Missing("the segment reader stopped".into()))
        };
        let (len, digest, footer) = match next() {
            Feed::Opened { len, digest, footer } => (len, digest, footer),
            other => {
                let error = match other {
                    Feed::Missing(error) => error,
                    _ => "the segment reader is out of step".into(),
                };
                self.problem(
                    "segment_missing",
                    &file,
                    None,
                    Some(info.first_index),
                    format!(
                        "cannot read the segment holding log indexes {}..{}: {error}",
                        info.first_index, info.end_index
                    ),
                );
                self.broken_at.get_or_insert(info.first_index);
                return;
            }
        };
        progress(len);
        if digest != info.blake3 {
            self.problem(
                "segment_digest",
                &file,
                None,
                Some(info.first_index),
                format!("blake3 is {digest}, the signed manifest records {}", info.blake3),
            );
        }
        let mut whole = match footer {
            Ok(metadata) => {
                let meta = |key: &str| crate::segment::meta(&metadata, key);
                let mut wrong = Vec::new();
                for (key, expected) in [
                    (crate::segment::META_LOG_ID, self.paths.log_id.clone()),
                    (crate::segment::META_FIRST_INDEX, info.first_index.to_string()),
                    (crate::segment::META_END_INDEX, info.end_index.to_string()),
                ] {
                    if meta(key) != Some(expected.as_str()) {
                        wrong.push(format!("footer `{key}` is {:?}, expected `{expected}`", meta(key)));
                    }
                }
                for detail in wrong {
                    self.problem("segment_metadata", &file, None, Some(info.first_index), detail);
                }
                true
            }
            Err(error) => {
                self.problem(
                    "segment_unreadable",
                    &file,
                    None,
                    Some(info.first_index),
                    format!("not a readable segment (truncated or corrupted): {error}"),
                );
                self.broken_at.get_or_insert(info.first_index);
                false
            }
        };
        let mut row = 0u64;
        loop {
            match next() {
                Feed::Rows(rows, prepared) => {
                    self.rows(&file, row, &rows, prepared);
                    row += rows.num_rows() as u64;
                }
                Feed::Done => break,
                Feed::Damaged(error) | Feed::Missing(error) => {
                    self.problem(
                        "segment_unreadable",
                        &file,
                        Some(row),
                        Some(self.tree.size()),
                        format!("decoding stops at row {row} (truncated or corrupted): {error}"),
                    );
                    self.broken_at.get_or_insert(self.tree.size());
                    whole = false;
                    if matches!(next(), Feed::Done) {
                        break;
                    }
                    return;
                }
                Feed::Opened { .. } => {
                    self.problem(
                        "segment_unreadable",
                        &file,
                        Some(row),
                        None,
                        "the segment reader is out of step".into(),
                    );
                    return;
                }
            }
        }
        let expected_rows = info.end_index - info.first_index;
        if whole && row != expected_rows {
            self.problem(
                "segment_rows",
                &file,
                None,
                Some(info.first_index),
                format!("holds {row} rows, the manifest says {expected_rows}"),
            );
        }
    }

    /// One chunk of segment rows: their position and decoded columns, then the entry checks.
    fn rows(&mut self, file: &str, first_row: u64, batch: &arrow::array::RecordBatch, prepared: Vec<Prepared>) {
        // The reader thread checked the batch's columns; a failure here is reported, not assumed away.
        let entries = match entries_of(batch) {
            Ok(entries) => entries,
            Err(error) => {
                self.problem(
                    "segment_unreadable",
                    file,
                    Some(first_row),
                    Some(self.tree.size()),
                    format!("rows from {first_row} cannot be read: {error}"),
                );
                self.broken_at.get_or_insert(self.tree.size());
                return;
            }
        };
        self.checked(
            &entries,
            file,
            |position| first_row + position as u64,
            |this| {
                for (offset, (entry, prepared)) in entries.iter().zip(prepared).enumerate() {
                    let row = first_row + offset as u64;
                    let expected_index = this.tree.size();
                    if entry.log_index != expected_index {
                        this.problem(
                            "row_index",
                            file,
                            Some(row),
                            Some(entry.log_index),
                            format!(
                                "row holds log index {} where {expected_index} was expected: rows were deleted, added or reordered",
                                entry.log_index
                            ),
                        );
                    }
                    if !prepared.check.columns_match {
                        this.problem(
                            "decoded_column",
                            file,
                            Some(row),
                            Some(entry.log_index),
                            "a decoded column differs from the signed payload".into(),
                        );
                    }
                    this.entry(*entry, prepared, file, row);
                }
            },
        );
    }

    /// Runs the ordered checks on this thread while the signatures of `entries` (with
    /// `--signatures`) are batch-verified on every core, then reports each failure at its row.
    fn checked(
        &mut self,
        entries: &[EntryRef<'_>],
        file: &str,
        row_of: impl Fn(usize) -> u64,
        ordered: impl FnOnce(&mut Self) + Send,
    ) {
        let keys = std::sync::Arc::clone(&self.keys);
        let signatures = self.options.signatures;
        let (failures, ()) = rayon::join(
            || {
                if signatures {
                    signatures_of(entries, &keys)
                } else {
                    Vec::new()
                }
            },
            || ordered(self),
        );
        if signatures {
            self.signatures_checked += entries.len() as u64;
        }
        for (position, detail) in failures {
            let log_index = entries[position].log_index;
            self.problem("bad_signature", file, Some(row_of(position)), Some(log_index), detail);
        }
    }

    /// The ordered checks of one entry; appends its leaf.
    fn entry(&mut self, entry: EntryRef<'_>, prepared: Prepared, file: &str, row: u64) {
        if prepared.digest != *entry.payload_blake3 {
            self.problem(
                "payload_digest",
                file,
                Some(row),
                Some(entry.log_index),
                "payload bytes do not match payload_blake3".into(),
            );
        }
        self.chain(&entry, &prepared, file, row);
        if self.options.signatures && memchr_lastid(entry.payload) {
            self.lastid(&entry, file, row);
        }
        self.tree.push(prepared.leaf);
        let size = self.tree.size();
        if let Some(roots) = self.expected_roots.get(&size)
            && self.broken_at.is_none()
        {
            let root = self.tree.root();
            let mismatched: Vec<usize> = roots
                .iter()
                .filter(|(_, expected)| *expected != root)
                .map(|(line, _)| *line)
                .collect();
            for line in mismatched {
                let checkpoints = display(&self.paths.checkpoints);
                self.problem(
                    "root_mismatch",
                    &checkpoints,
                    Some(line as u64),
                    Some(size - 1),
                    format!(
                        "the recomputed root at size {size} differs from the signed checkpoint: entries below log index {size} were altered"
                    ),
                );
            }
        }
    }

    /// An event the LastID adapter made: its enrollment's key is remembered; a record it
    /// carries is checked again by LastID's rules (integrity hash, then signature), so a
    /// record altered or forged by whoever held the adapter key is found.
    fn lastid(&mut self, entry: &EntryRef<'_>, file: &str, row: u64) {
        let Ok(payload) = serde_json::from_slice::<serde_json::Value>(entry.payload) else {
            return;
        };
        let attrs = &payload["attrs"];
        if attrs["custos.source"] != "lastid" {
            return;
        }
        if let (Some(did), Some(key)) = (attrs["lastid.did"].as_str(), attrs["lastid.public_key"].as_str()) {
            if let Some(key) = hex::decode(key).ok().and_then(|key| <[u8; 32]>::try_from(key).ok()) {
                self.lastid_keys.insert(did.to_owned(), key);
            }
            return;
        }
        let Some(raw) = attrs["lastid.record"].as_str() else {
            return;
        };
        let problem = match custos_event::lastid::Record::parse(raw.as_bytes()) {
            Err(rejection) => Some(format!("the LastID record it carries does not parse: {rejection}")),
            Ok(record) => {
                let key = self
                    .lastid_keys
                    .get(&record.agent_did)
                    .copied()
                    .or_else(|| custos_event::lastid::key_of(&record.agent_did));
                match key {
                    None => Some(format!(
                        "no enrollment of LastID agent `{}` precedes its record",
                        record.agent_did
                    )),
                    Some(key) => match record.verify(&key) {
                        Err(rejection) => Some(format!("{}: {}", rejection.reason, rejection.message)),
                        Ok(()) if payload["seq"].as_u64() != Some(record.seq) => Some(format!(
                            "the event's seq {} is not its record's seq {}",
                            payload["seq"], record.seq
                        )),
                        Ok(()) if attrs["custos.attested_for"].as_str() != Some(record.agent_did.as_str()) => {
                            Some(format!(
                                "the event is attested for {} but its record is `{}`'s",
                                attrs["custos.attested_for"], record.agent_did
                            ))
                        }
                        Ok(()) => None,
                    },
                }
            }
        };
        if let Some(detail) = problem {
            self.problem("lastid_record", file, Some(row), Some(entry.log_index), detail);
        }
    }

    fn chain(&mut self, entry: &EntryRef<'_>, prepared: &Prepared, file: &str, row: u64) {
        if !prepared.check.json {
            self.problem(
                "bad_payload",
                file,
                Some(row),
                Some(entry.log_index),
                "payload is not JSON".into(),
            );
            return;
        }
        let Some(seq) = prepared.check.seq else {
            self.problem(
                "bad_payload",
                file,
                Some(row),
                Some(entry.log_index),
                "payload has no `seq`".into(),
            );
            return;
        };
        let digest = prepared.digest;
        let prev = prepared.check.prev;
        // The rule the node applied at ingest, applied again to what was stored.
        let head = self.chains.get(entry.keyid);
        let step = custos_event::chain::step(
            head.map(|head| custos_event::chain::Head {
                seq: head.seq,
                digest: head.digest,
            })
            .as_ref(),
            seq,
            prev,
        );
        let problem = match (step, head) {
            _ if seq > custos_event::chain::MAX_SEQ => Some((
                "bad_payload",
                format!("seq {seq} has no successor; the node never accepts it"),
            )),
            (Step::First | Step::Next, _) => None,
            (Step::FirstWithGap { .. }, _) if entry.gap == step.gap() => None,
            (Step::FirstWithGap { .. }, _) => Some((
                "chain_gap",
                format!("first entry of `{}` has seq {seq} without a recorded gap", entry.keyid),
            )),
            (Step::Broken, Some(head)) => Some((
                "chain_broken",
                format!(
                    "`prev` is not the blake3 of the payload at log index {} (seq {}): one of the two was altered",
                    head.log_index, head.seq
                ),
            )),
            (Step::Gap { .. }, _) if entry.gap == step.gap() => None,
            (Step::Gap { .. }, Some(head)) => Some((
                "chain_gap",
                format!(
                    "seq jumps from {} (log index {}) to {seq} with no gap recorded at ingest: entries were removed",
                    head.seq, head.log_index
                ),
            )),
            (_, head) => Some((
                "chain_fork",
                format!(
                    "seq {seq} does not follow seq {} at log index {}",
                    head.map_or(0, |head| head.seq),
                    head.map_or(0, |head| head.log_index)
                ),
            )),
        };
        if let Some((code, detail)) = problem {
            self.problem(code, file, Some(row), Some(entry.log_index), detail);
        }
        let head = ChainHead {
            seq,
            digest,
            log_index: entry.log_index,
        };
        match self.chains.get_mut(entry.keyid) {
            Some(existing) => *existing = head,
            None => {
                self.chains.insert(entry.keyid.to_owned(), head);
            }
        }
    }

    fn wal(
        &mut self,
        sealed_end: u64,
        checkpoints: &[(usize, u64, Hash)],
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let files = self.paths.wal_files();
        let signed_size = checkpoints.iter().map(|(_, size, _)| *size).max().unwrap_or(0);
        let mut count = 0;
        let last = files.len().saturating_sub(1);
        for (position, path) in files.iter().enumerate() {
            let bytes = fs_err::read(path)?;
            progress(bytes.len() as u64);
            let name = display(path);
            let scan = crate::wal::scan(&bytes);
            // Records the sealed segments already hold are skipped.
            let pending: Vec<(u64, EntryRef<'_>)> = scan
                .entries
                .iter()
                .enumerate()
                .filter(|(_, (_, entry))| entry.log_index >= sealed_end)
                .map(|(record, (_, entry))| (record as u64, entry.view()))
                .collect();
            let entries: Vec<EntryRef<'_>> = pending.iter().map(|(_, entry)| *entry).collect();
            let prepared: Vec<Prepared> = {
                use rayon::prelude::*;
                entries.par_iter().map(|entry| prepare(*entry, None)).collect()
            };
            self.checked(
                &entries,
                &name,
                |position| pending[position].0,
                |this| {
                    for ((record, entry), prepared) in pending.iter().zip(prepared) {
                        if entry.log_index != this.tree.size() {
                            this.problem(
                                "wal_index",
                                &name,
                                Some(*record),
                                Some(entry.log_index),
                                format!(
                                    "WAL record holds log index {} where {} was expected",
                                    entry.log_index,
                                    this.tree.size()
                                ),
                            );
                        }
                        this.entry(*entry, prepared, &name, *record);
                    }
                },
            );
            count += pending.len() as u64;
            if let Some(problem) = scan.problem {
                // A tear at the very end, with every checkpointed entry already read, is a
                // crash mid-write of something never acknowledged.
                let torn = problem.at_tail && position == last && self.tree.size() >= signed_size;
                if torn {
                    self.report.warnings.push(format!(
                        "log {} WAL {name}: torn tail at byte {} ({}); never acknowledged, dropped at next start",
                        self.paths.log_id, problem.offset, problem.detail
                    ));
                } else {
                    self.problem(
                        "wal_corrupt",
                        &name,
                        Some(scan.entries.len() as u64),
                        problem.log_index,
                        format!("record at byte {} is damaged: {}", problem.offset, problem.detail),
                    );
                    self.broken_at.get_or_insert(self.tree.size());
                }
            }
        }
        Ok(count)
    }
}

/// Whether a payload may carry a LastID record (a cheap test before parsing it).
fn memchr_lastid(payload: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"\"custos.source\":\"lastid\"";
    payload.windows(NEEDLE.len()).any(|window| window == NEEDLE)
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
