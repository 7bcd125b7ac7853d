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
use crate::entry::LogEntry;
use crate::log::{CheckpointLine, SegmentInfo, read_ndjson};
use crate::merkle::{Hash, Tree, verify_consistency};
use crate::segment::Decoded;
use crate::{LogPaths, StoreError, StoreInfo, read_object};

/// What to check beyond structure and hashes.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Verify every ed25519 signature too.
    pub signatures: bool,
    /// Expected checkpoint verifier key (`name+id+key`), pinned from a trusted source.
    pub log_key: Option<String>,
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
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Progress: bytes read so far out of the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Verifies every log of the store at `data`.
pub fn verify_store(data: &Path, options: &VerifyOptions, progress: Progress<'_>) -> Result<Report, StoreError> {
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
    keys: custos_event::KeyCache,
}

/// A segment file as read and decoded by the reader thread.
enum Loaded {
    Missing(String),
    Read {
        len: u64,
        digest: String,
        segment: Result<crate::segment::Segment, String>,
    },
}

fn load(dir: &Path, info: &SegmentInfo) -> Loaded {
    match read_object(dir, &info.file) {
        Err(error) => Loaded::Missing(error.to_string()),
        Ok(bytes) => Loaded::Read {
            len: bytes.len() as u64,
            digest: crate::segment::file_digest(&bytes),
            segment: crate::segment::decode(bytes).map_err(|error| error.to_string()),
        },
    }
}

/// The per-row work that does not depend on order, done in parallel before the ordered
/// checks: one JSON parse, the digest, the decoded columns, the leaf, the key.
struct Prepared {
    digest: [u8; 32],
    check: crate::segment::PayloadCheck,
    leaf: Hash,
    /// With `--signatures`: the signature check's outcome.
    signature: Option<Result<(), String>>,
}

fn prepare(entry: &LogEntry, stored: Option<&Decoded>) -> Prepared {
    Prepared {
        digest: *blake3::hash(&entry.payload).as_bytes(),
        check: crate::segment::check_payload(&entry.payload, stored),
        leaf: entry.leaf_hash(),
        signature: None,
    }
}

/// Prepares entries on every core, in chunks of [`custos_event::verify::BATCH`], each
/// chunk's signatures checked with one batch verification.
fn prepare_all(
    entries: &[(&LogEntry, Option<&Decoded>)],
    keys: &custos_event::KeyCache,
    signatures: bool,
) -> Vec<Prepared> {
    use rayon::prelude::*;
    let mut prepared: Vec<Prepared> = entries
        .par_iter()
        .map(|(entry, stored)| prepare(entry, *stored))
        .collect();
    if signatures {
        // A separate pass, so the curve arithmetic runs without the parsing and hashing
        // above evicting its tables from the caches.
        let outcomes: Vec<Result<(), String>> = entries
            .par_chunks(custos_event::verify::BATCH)
            .flat_map_iter(|chunk| signature_batch(chunk, keys))
            .collect();
        for (prepared, outcome) in prepared.iter_mut().zip(outcomes) {
            prepared.signature = Some(outcome);
        }
    }
    prepared
}

fn signature_batch(chunk: &[(&LogEntry, Option<&Decoded>)], keys: &custos_event::KeyCache) -> Vec<Result<(), String>> {
    let mut outcomes = vec![Ok(()); chunk.len()];
    let mut keyed = Vec::with_capacity(chunk.len());
    for (position, (entry, _)) in chunk.iter().enumerate() {
        match keys.get(&entry.keyid) {
            Ok(key) => keyed.push((position, key, custos_event::pae(&entry.payload_type, &entry.payload))),
            Err(error) => outcomes[position] = Err(format!("bad keyid: {error}")),
        }
    }
    let items: Vec<(&custos_event::VerifyingKey, &[u8], &[u8; 64])> = keyed
        .iter()
        .map(|(position, key, message)| (key, message.as_slice(), &chunk[*position].0.sig))
        .collect();
    for ((position, _, _), ok) in keyed.iter().zip(custos_event::verify::verify_messages(&items)) {
        if !ok {
            outcomes[*position] = Err(format!(
                "signature by `{}` does not verify over the DSSE PAE",
                chunk[*position].0.keyid
            ));
        }
    }
    outcomes
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
            keys: custos_event::KeyCache::default(),
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
            let signed = info.signed_text(&self.paths.log_id);
            let valid = base64_sig(&info.sig)
                .and_then(|sig| {
                    let key = ed25519_dalek::VerifyingKey::from_bytes(&note_key.public).ok()?;
                    use ed25519_dalek::Verifier as _;
                    key.verify(signed.as_bytes(), &ed25519_dalek::Signature::from_bytes(&sig))
                        .ok()
                })
                .is_some();
            if !valid {
                self.problem(
                    "manifest_signature",
                    &manifest_name,
                    Some(line as u64),
                    None,
                    format!("the entry for `{}` is not signed by the log key", info.file),
                );
            }
        }
        // A reader thread reads, hashes and decodes the next segment while this one is checked.
        let segment_dir = self.paths.segment_dir.clone();
        std::thread::scope(|scope| {
            let (sender, receiver) = std::sync::mpsc::sync_channel(1);
            let infos = &manifest;
            scope.spawn(move || {
                for info in infos {
                    if sender.send(load(&segment_dir, info)).is_err() {
                        break;
                    }
                }
            });
            for info in &manifest {
                let loaded = receiver
                    .recv()
                    .unwrap_or_else(|_| Loaded::Missing("the segment reader stopped".into()));
                self.segment(info, loaded, progress);
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

    fn segment(&mut self, info: &SegmentInfo, loaded: Loaded, progress: &mut dyn FnMut(u64)) {
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
        let (len, digest, segment) = match loaded {
            Loaded::Read { len, digest, segment } => (len, digest, segment),
            Loaded::Missing(error) => {
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
        let segment = match segment {
            Ok(segment) => segment,
            Err(error) => {
                self.problem(
                    "segment_unreadable",
                    &file,
                    None,
                    Some(info.first_index),
                    format!("not a readable segment (truncated or corrupted): {error}"),
                );
                self.broken_at.get_or_insert(info.first_index);
                return;
            }
        };
        for (key, expected) in [
            (crate::segment::META_LOG_ID, self.paths.log_id.clone()),
            (crate::segment::META_FIRST_INDEX, info.first_index.to_string()),
            (crate::segment::META_END_INDEX, info.end_index.to_string()),
        ] {
            if segment.meta(key) != Some(expected.as_str()) {
                self.problem(
                    "segment_metadata",
                    &file,
                    None,
                    Some(info.first_index),
                    format!("footer `{key}` is {:?}, expected `{expected}`", segment.meta(key)),
                );
            }
        }
        let expected_rows = info.end_index - info.first_index;
        if segment.rows.len() as u64 != expected_rows {
            self.problem(
                "segment_rows",
                &file,
                None,
                Some(info.first_index),
                format!("holds {} rows, the manifest says {expected_rows}", segment.rows.len()),
            );
        }
        let rows: Vec<(&LogEntry, Option<&Decoded>)> = segment
            .rows
            .iter()
            .map(|row| (&row.entry, Some(&row.decoded)))
            .collect();
        let prepared = prepare_all(&rows, &self.keys, self.options.signatures);
        for (row, (stored, prepared)) in segment.rows.iter().zip(prepared).enumerate() {
            let expected_index = self.tree.size();
            if stored.entry.log_index != expected_index {
                self.problem(
                    "row_index",
                    &file,
                    Some(row as u64),
                    Some(stored.entry.log_index),
                    format!(
                        "row holds log index {} where {expected_index} was expected: rows were deleted, added or reordered",
                        stored.entry.log_index
                    ),
                );
            }
            if !prepared.check.columns_match {
                self.problem(
                    "decoded_column",
                    &file,
                    Some(row as u64),
                    Some(stored.entry.log_index),
                    "a decoded column differs from the signed payload".into(),
                );
            }
            self.entry(&stored.entry, prepared, &file, row as u64);
        }
    }

    /// The ordered checks of one entry; appends its leaf.
    fn entry(&mut self, entry: &LogEntry, prepared: Prepared, file: &str, row: u64) {
        if prepared.digest != entry.payload_blake3 {
            self.problem(
                "payload_digest",
                file,
                Some(row),
                Some(entry.log_index),
                "payload bytes do not match payload_blake3".into(),
            );
        }
        self.chain(entry, &prepared, file, row);
        if let Some(Err(detail)) = &prepared.signature {
            self.problem("bad_signature", file, Some(row), Some(entry.log_index), detail.clone());
        }
        if prepared.signature.is_some() {
            self.signatures_checked += 1;
        }
        self.tree.push(prepared.leaf);
        let size = self.tree.size();
        if let Some(roots) = self.expected_roots.get(&size).cloned()
            && self.broken_at.is_none()
        {
            let root = self.tree.root();
            for (line, expected) in roots {
                if expected != root {
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
    }

    fn chain(&mut self, entry: &LogEntry, prepared: &Prepared, file: &str, row: u64) {
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
        let problem = match self.chains.get(&entry.keyid) {
            None if seq == 0 || entry.gap == Some((0, seq - 1)) => None,
            None => Some(("chain_gap", format!("first entry of `{}` has seq {seq} without a recorded gap", entry.keyid))),
            Some(head) if seq == head.seq + 1 => (prev != Some(head.digest)).then(|| {
                (
                    "chain_broken",
                    format!(
                        "`prev` is not the blake3 of the payload at log index {} (seq {}): one of the two was altered",
                        head.log_index, head.seq
                    ),
                )
            }),
            Some(head) if seq > head.seq + 1 => (entry.gap != Some((head.seq + 1, seq - 1))).then(|| {
                (
                    "chain_gap",
                    format!(
                        "seq jumps from {} (log index {}) to {seq} with no gap recorded at ingest: entries were removed",
                        head.seq, head.log_index
                    ),
                )
            }),
            Some(head) => Some((
                "chain_fork",
                format!("seq {seq} does not follow seq {} at log index {}", head.seq, head.log_index),
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
        match self.chains.get_mut(&entry.keyid) {
            Some(existing) => *existing = head,
            None => {
                self.chains.insert(entry.keyid.clone(), head);
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
            let entries: Vec<(&LogEntry, Option<&Decoded>)> =
                scan.entries.iter().map(|(_, entry)| (entry, None)).collect();
            let prepared = prepare_all(&entries, &self.keys, self.options.signatures);
            for (record, ((_, entry), prepared)) in scan.entries.iter().zip(prepared).enumerate() {
                if entry.log_index < sealed_end {
                    continue;
                }
                if entry.log_index != self.tree.size() {
                    self.problem(
                        "wal_index",
                        &name,
                        Some(record as u64),
                        Some(entry.log_index),
                        format!(
                            "WAL record holds log index {} where {} was expected",
                            entry.log_index,
                            self.tree.size()
                        ),
                    );
                }
                self.entry(entry, prepared, &name, record as u64);
                count += 1;
            }
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

fn base64_sig(text: &str) -> Option<[u8; 64]> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?
        .try_into()
        .ok()
}

fn display(path: &Path) -> String {
    path.display().to_string()
}
