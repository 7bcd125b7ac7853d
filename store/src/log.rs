//! One log: WAL, open segment, sealed Parquet segments, Merkle tree and checkpoints.
//!
//! ```text
//! append(entries) ─▶ WAL (group write + fsync) ─▶ tree.push ─▶ open segment (memory)
//!                                                                 │ every N entries / close
//!                                                                 ▼
//!                       segments/<log>-<first>-<end>.parquet ─▶ segments.ndjson (signed line)
//! checkpoint() ─▶ consistency with the last signed checkpoint ─▶ checkpoints.ndjson
//! ```
//! Files are only ever created, appended to, or (WAL files, once sealed) deleted.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use custos_event::AgentKey;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, NoteKey, sign_note, verify_checkpoint};
use crate::entry::LogEntry;
use crate::merkle::{Hash, ProofError, Tree};
use crate::wal::{WalWriter, scan};
use crate::{LogPaths, StoreError, fsync_dir, read_object};

/// Tuning for one log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Seal the open segment once it holds this many entries.
    pub segment_max_entries: usize,
    /// Sign a checkpoint after this many new entries.
    pub checkpoint_every: u64,
    /// Sign a checkpoint at least this often while entries arrive.
    pub checkpoint_interval: Duration,
    /// After a seal failed (a full disk, no descriptor left), the pause before the next
    /// try: a try rewrites a whole segment.
    pub seal_retry: Duration,
    /// Seal the open segment once its first entry is this old, however few entries it
    /// holds (`None`: by size only), so a quiet log's entries still reach a sealed
    /// segment (object storage, the Kafka retention a query node relies on).
    pub seal_after: Option<Duration>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_max_entries: 100_000,
            checkpoint_every: 1_000,
            checkpoint_interval: Duration::from_secs(1),
            seal_retry: Duration::from_secs(5),
            seal_after: None,
        }
    }
}

/// One line of `segments.ndjson`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentInfo {
    pub file: String,
    pub first_index: u64,
    pub end_index: u64,
    pub bytes: u64,
    /// Lowercase hex blake3 of the whole file.
    pub blake3: String,
    pub sealed_at: String,
    /// base64 ed25519 signature by the log key over [`SegmentInfo::signed_text`].
    pub sig: String,
}

impl SegmentInfo {
    /// `custos/segment/v1\n<log id>\n<file>\n<first>\n<end>\n<blake3>\n`
    pub fn signed_text(&self, log_id: &str) -> String {
        format!(
            "custos/segment/v1\n{log_id}\n{}\n{}\n{}\n{}\n",
            self.file, self.first_index, self.end_index, self.blake3
        )
    }

    /// Whether `sig` is the log key's signature over [`SegmentInfo::signed_text`].
    pub fn signature_valid(&self, log_id: &str, key: &NoteKey) -> bool {
        use base64::Engine as _;
        use ed25519_dalek::Verifier as _;
        let Some(sig) = base64::engine::general_purpose::STANDARD
            .decode(&self.sig)
            .ok()
            .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        else {
            return false;
        };
        let Ok(public) = ed25519_dalek::VerifyingKey::from_bytes(&key.public) else {
            return false;
        };
        public
            .verify(
                self.signed_text(log_id).as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
            .is_ok()
    }
}

/// One line of `checkpoints.ndjson`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointLine {
    pub size: u64,
    pub note: String,
}

/// What opening a log visits, and whether it may use the tree cache.
#[derive(Clone, Debug)]
pub struct Recovery<'a> {
    /// Entries from this log index on are visited.
    pub visit_from: u64,
    /// Entries of these payload types are visited wherever they are.
    pub always: &'a [&'a str],
    /// Read the tree from its signed cache (when one checks out) instead of rehashing.
    pub use_tree_cache: bool,
}

impl Default for Recovery<'_> {
    /// Every entry visited; the tree rebuilt from the entries.
    fn default() -> Self {
        Self {
            visit_from: 0,
            always: &[],
            use_tree_cache: false,
        }
    }
}

/// How to open a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Recover, truncate a torn WAL tail, and accept appends.
    ReadWrite,
    /// Read what is there without changing any file.
    ReadOnly,
}

/// An open log.
#[derive(Debug)]
pub struct Log {
    paths: LogPaths,
    origin: String,
    key: Option<AgentKey>,
    note_key: NoteKey,
    config: LogConfig,
    tree: Tree,
    sealed_end: u64,
    /// Entries not yet handed to a seal, in append-sized shared chunks so a reader can
    /// take a snapshot of the tail without copying it.
    open: Vec<Arc<[LogEntry]>>,
    open_len: usize,
    /// When the oldest open entry came (or was recovered): for `seal_after`.
    open_since: Option<Instant>,
    wal: Option<WalWriter>,
    wal_files: Vec<PathBuf>,
    manifest: Vec<SegmentInfo>,
    last_checkpoint: Option<(Checkpoint, String)>,
    last_checkpoint_time: Instant,
    sealing: Option<Sealing>,
    /// After a seal failed (a full disk, no descriptor), the next one waits until then.
    seal_retry_at: Option<Instant>,
    tree_cache: crate::treecache::TreeCache,
}

/// A segment being written in the background.
#[derive(Debug)]
struct Sealing {
    handle: std::thread::JoinHandle<Result<(String, u64, String), StoreError>>,
    /// The entries being written, still served to readers until the manifest has them.
    entries: Vec<Arc<[LogEntry]>>,
    first: u64,
    end: u64,
    /// WAL files holding the sealed entries, deleted once the manifest records them.
    old_wal: Vec<PathBuf>,
}

/// Encodes entries as a segment file: temporary name, fsync, rename, fsync the directory.
/// Returns the file name, its size and its blake3.
fn write_segment(
    paths: &LogPaths,
    entries: &[Arc<[LogEntry]>],
    first: u64,
    end: u64,
) -> Result<(String, u64, String), StoreError> {
    let rows = || entries.iter().flat_map(|chunk| chunk.iter());
    let (bytes, seqs) =
        crate::segment::encode_with_seqs(&paths.log_id, rows()).map_err(|source| StoreError::Segment {
            file: "(new segment)".into(),
            source,
        })?;
    let file = paths.segment_name(first, end);
    let path = paths.segment_dir.join(&file);
    let temporary = paths.segment_dir.join(format!("{file}.tmp"));
    {
        let mut out = fs_err::File::create(&temporary)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
    }
    fs_err::rename(&temporary, &path)?;
    // The (agent, seq) index is in place before the manifest names the segment, so a
    // lookup never meets a recorded segment without one.
    let records = crate::seqindex::records(rows().zip(seqs));
    crate::seqindex::write(&crate::seqindex::path_for(&paths.segment_dir, &file), &records)?;
    fsync_dir(&paths.segment_dir)?;
    Ok((file, bytes.len() as u64, crate::segment::file_digest(&bytes)))
}

impl Log {
    /// Opens (or creates) the log `log_id` under `data`, calling `visit` on every entry in
    /// index order so the caller can rebuild its state.
    pub fn open(
        data: &Path,
        store_id: &str,
        log_id: &str,
        config: LogConfig,
        mode: OpenMode,
        visit: &mut dyn FnMut(&LogEntry),
    ) -> Result<Self, StoreError> {
        Self::open_with(data, store_id, log_id, config, mode, &Recovery::default(), visit)
    }

    /// [`Log::open`] that visits only what `plan` asks for, and reads the tree from its
    /// cache where it can: a restart then touches the files of no old segment but the
    /// rows of the types it always visits.
    pub fn open_with(
        data: &Path,
        store_id: &str,
        log_id: &str,
        config: LogConfig,
        mode: OpenMode,
        plan: &Recovery<'_>,
        visit: &mut dyn FnMut(&LogEntry),
    ) -> Result<Self, StoreError> {
        let paths = LogPaths::new(data, log_id);
        let paths_tree = paths.dir.join("tree");
        let origin = format!("custos/{store_id}/{log_id}");
        let key = match mode {
            OpenMode::ReadWrite => {
                fs_err::create_dir_all(&paths.wal_dir)?;
                fs_err::create_dir_all(&paths.segment_dir)?;
                let key = crate::keyfile::load_or_create(&paths.key)?;
                let public = NoteKey {
                    name: origin.clone(),
                    public: key.public_key(),
                };
                let verifier = format!("{}\n", public.verifier_string());
                if fs_err::read_to_string(&paths.public_key).ok().as_deref() != Some(verifier.as_str()) {
                    fs_err::write(&paths.public_key, verifier)?;
                }
                Some(key)
            }
            OpenMode::ReadOnly => None,
        };
        let note_key = match &key {
            Some(key) => NoteKey {
                name: origin.clone(),
                public: key.public_key(),
            },
            None => NoteKey::parse_verifier(&fs_err::read_to_string(&paths.public_key)?)?,
        };
        let mut log = Log {
            paths,
            origin,
            key,
            note_key,
            config,
            tree: Tree::new(),
            sealed_end: 0,
            open: Vec::new(),
            open_len: 0,
            open_since: None,
            wal: None,
            wal_files: Vec::new(),
            manifest: Vec::new(),
            last_checkpoint: None,
            last_checkpoint_time: Instant::now(),
            sealing: None,
            seal_retry_at: None,
            tree_cache: crate::treecache::TreeCache::new(paths_tree, log_id),
        };
        log.recover(mode, plan, visit)?;
        Ok(log)
    }

    fn recover(
        &mut self,
        mode: OpenMode,
        plan: &Recovery<'_>,
        visit: &mut dyn FnMut(&LogEntry),
    ) -> Result<(), StoreError> {
        // Sealed segments, in manifest order, each line signed by the log key.
        self.manifest = read_ndjson(&self.paths.manifest)?;
        {
            use rayon::prelude::*;
            let (log_id, key) = (&self.paths.log_id, &self.note_key);
            if let Some((line, info)) = self
                .manifest
                .par_iter()
                .enumerate()
                .find_first(|(_, info)| !info.signature_valid(log_id, key))
            {
                return Err(StoreError::Tamper(format!(
                    "`{}` line {}: the entry for `{}` is not signed by the log key; run `custos verify`",
                    self.paths.manifest.display(),
                    line + 1,
                    info.file
                )));
            }
        }
        // The tree as last persisted (signed by the log key, every chunk checked): the
        // entries it covers are not hashed again.
        let cached = if plan.use_tree_cache {
            match self.tree_cache.load(&self.note_key) {
                Ok(cached) => cached,
                Err(reason) => {
                    tracing::warn!(%reason, "the tree cache does not check out; rebuilding the tree from the segments");
                    None
                }
            }
        } else {
            None
        };
        let cached_size = cached.as_ref().map_or(0, Tree::size);
        if let Some(tree) = cached {
            self.tree = tree;
        }
        let mut expected = 0u64;
        for info in &self.manifest {
            if info.first_index != expected || info.end_index <= info.first_index {
                return Err(StoreError::Tamper(format!(
                    "segment `{}` covers log indexes {}..{} but {expected} entries precede it; run `custos verify`",
                    info.file, info.first_index, info.end_index
                )));
            }
            expected = info.end_index;
            let hashed = info.end_index <= cached_size;
            if hashed && info.end_index <= plan.visit_from {
                // Nothing to hash or fold: only the rows of the types always visited.
                if !plan.always.is_empty() {
                    let path = self.paths.segment_dir.join(&info.file);
                    let rows =
                        crate::segment::read_types(&path, plan.always).map_err(|source| StoreError::Segment {
                            file: info.file.clone(),
                            source,
                        })?;
                    for entry in &rows {
                        visit(entry);
                    }
                }
                continue;
            }
            let bytes = read_object(&self.paths.segment_dir, &info.file)?;
            if crate::segment::file_digest(&bytes) != info.blake3 {
                return Err(StoreError::Tamper(format!(
                    "segment `{}` does not match its recorded blake3; run `custos verify`",
                    info.file
                )));
            }
            let segment = crate::segment::decode(bytes).map_err(|source| StoreError::Segment {
                file: info.file.clone(),
                source,
            })?;
            let mut index = info.first_index;
            for row in &segment.rows {
                if row.entry.log_index != index {
                    return Err(StoreError::Tamper(format!(
                        "segment `{}` holds log index {} where {index} was expected; run `custos verify`",
                        info.file, row.entry.log_index,
                    )));
                }
                if index >= plan.visit_from || plan.always.contains(&row.entry.payload_type.as_str()) {
                    visit(&row.entry);
                }
                if index >= self.tree.size() {
                    self.tree.push(row.entry.leaf_hash());
                } else if self.tree.leaf(index) != Some(row.entry.leaf_hash()) {
                    return Err(StoreError::Tamper(format!(
                        "segment `{}` row {} (log index {index}) differs from the signed tree cache; run `custos verify`",
                        info.file,
                        index - info.first_index
                    )));
                }
                index += 1;
            }
            if index != info.end_index {
                return Err(StoreError::Tamper(format!(
                    "segment `{}` holds {} entries where its manifest line says {}; run `custos verify`",
                    info.file,
                    index - info.first_index,
                    info.end_index - info.first_index
                )));
            }
        }
        self.sealed_end = expected;

        // The WAL tail, oldest file first.
        let mut wal_files = self.paths.wal_files();
        let last_file = wal_files.len().saturating_sub(1);
        for (position, path) in wal_files.iter().enumerate() {
            let bytes = fs_err::read(path)?;
            let found = scan(&bytes);
            let mut recovered = Vec::new();
            for (_, entry) in found.entries {
                if entry.log_index < self.sealed_end {
                    continue;
                }
                let next = self.sealed_end + self.open_len as u64 + recovered.len() as u64;
                if entry.log_index != next {
                    return Err(StoreError::Tamper(format!(
                        "WAL `{}` holds log index {} where {next} was expected",
                        path.display(),
                        entry.log_index,
                    )));
                }
                if entry.log_index >= plan.visit_from || plan.always.contains(&entry.payload_type.as_str()) {
                    visit(&entry);
                }
                if entry.log_index >= self.tree.size() {
                    self.tree.push(entry.leaf_hash());
                } else if self.tree.leaf(entry.log_index) != Some(entry.leaf_hash()) {
                    return Err(StoreError::Tamper(format!(
                        "WAL `{}` log index {} differs from the signed tree cache; run `custos verify`",
                        path.display(),
                        entry.log_index
                    )));
                }
                recovered.push(entry);
            }
            if !recovered.is_empty() {
                self.open_len += recovered.len();
                self.open.push(Arc::from(recovered));
                self.open_since.get_or_insert_with(Instant::now);
            }
            if let Some(problem) = found.problem {
                if !(problem.at_tail && position == last_file) {
                    return Err(StoreError::Tamper(format!(
                        "WAL `{}` is corrupt at byte {} (log index {}): {}; run `custos verify`",
                        path.display(),
                        problem.offset,
                        problem.log_index.map_or("unknown".into(), |index| index.to_string()),
                        problem.detail
                    )));
                }
                // A torn write from a crash: never acknowledged, so it is dropped.
                if mode == OpenMode::ReadWrite {
                    tracing::warn!(
                        file = %path.display(),
                        offset = found.good_len,
                        "dropping a torn, unacknowledged WAL tail"
                    );
                    let file = fs_err::OpenOptions::new().write(true).open(path)?;
                    file.set_len(found.good_len)?;
                    file.sync_all()?;
                }
            }
        }

        let stored = self.sealed_end + self.open_len as u64;
        if cached_size > stored {
            return Err(StoreError::Tamper(format!(
                "the signed tree cache covers {cached_size} entries but only {stored} are stored: acknowledged entries were deleted; run `custos verify`"
            )));
        }

        // Checkpoints: every line signed, its size the signed one, sizes never shrinking,
        // and each a prefix of what we hold.
        let lines: Vec<CheckpointLine> = read_ndjson(&self.paths.checkpoints)?;
        let checkpoints = self.check_checkpoints(&lines)?;
        if let (Some(line), Some(checkpoint)) = (lines.last(), checkpoints.last()) {
            self.last_checkpoint = Some((checkpoint.clone(), line.note.clone()));
        }

        if mode == OpenMode::ReadWrite {
            let path = match wal_files.last() {
                Some(path) => path.clone(),
                None => self.paths.wal_file(self.tree.size()),
            };
            self.wal = Some(WalWriter::open(&path)?);
            if wal_files.is_empty() {
                wal_files.push(path);
            }
            self.wal_files = wal_files;
            if self.last_checkpoint.is_none() {
                self.checkpoint()?;
            }
            if cached_size != self.tree.size() {
                if cached_size == 0 {
                    self.tree_cache.reset()?;
                }
                self.persist_tree();
            }
        }
        Ok(())
    }

    /// Writes the tree cache; a failure only costs the next start some time.
    fn persist_tree(&mut self) {
        let Some(key) = self.key.as_ref() else { return };
        if let Err(error) = self.tree_cache.persist(&self.tree, key) {
            tracing::warn!(%error, "could not write the tree cache; the next start rebuilds the tree");
            let _ = self.tree_cache.reset();
        }
    }

    /// Verifies every checkpoint line against the log key and the tree.
    fn check_checkpoints(&self, lines: &[CheckpointLine]) -> Result<Vec<Checkpoint>, StoreError> {
        use rayon::prelude::*;
        let file = self.paths.checkpoints.display().to_string();
        let checkpoints = lines
            .par_iter()
            .enumerate()
            .map(|(number, line)| {
                let at = |detail: String| {
                    StoreError::Tamper(format!("`{file}` line {}: {detail}; run `custos verify`", number + 1))
                };
                let checkpoint =
                    verify_checkpoint(&line.note, &self.note_key).map_err(|error| at(error.to_string()))?;
                if checkpoint.origin != self.origin {
                    return Err(at(format!("origin `{}` is not `{}`", checkpoint.origin, self.origin)));
                }
                if checkpoint.size != line.size {
                    return Err(at(format!(
                        "the line says size {} but its signed note says {}",
                        line.size, checkpoint.size
                    )));
                }
                Ok(checkpoint)
            })
            .collect::<Result<Vec<Checkpoint>, StoreError>>()?;
        let mut previous = 0;
        for (number, checkpoint) in checkpoints.iter().enumerate() {
            if checkpoint.size < previous {
                return Err(StoreError::Tamper(format!(
                    "`{file}` line {}: size {} follows a checkpoint of size {previous}; run `custos verify`",
                    number + 1,
                    checkpoint.size
                )));
            }
            previous = checkpoint.size;
        }
        if let Some(checkpoint) = checkpoints.last()
            && checkpoint.size > self.tree.size()
        {
            return Err(StoreError::Tamper(format!(
                "the latest signed checkpoint covers {} entries but only {} are stored; acknowledged entries are missing; run `custos verify`",
                checkpoint.size,
                self.tree.size()
            )));
        }
        if let Some(checkpoint) = checkpoints
            .par_iter()
            .find_first(|checkpoint| self.tree.root_at(checkpoint.size).ok() != Some(checkpoint.root))
        {
            return Err(StoreError::Tamper(format!(
                "the stored entries do not match the signed checkpoint at size {}; run `custos verify`",
                checkpoint.size
            )));
        }
        Ok(checkpoints)
    }

    pub fn log_id(&self) -> &str {
        &self.paths.log_id
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn note_key(&self) -> &NoteKey {
        &self.note_key
    }

    pub fn paths(&self) -> &LogPaths {
        &self.paths
    }

    /// The index the next appended entry gets.
    pub fn next_index(&self) -> u64 {
        self.tree.size()
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn segments(&self) -> &[SegmentInfo] {
        &self.manifest
    }

    /// Entries below this index are in segments recorded in the manifest.
    pub fn sealed_end(&self) -> u64 {
        self.sealed_end
    }

    /// How many entries are not yet handed to a seal.
    pub fn open_len(&self) -> usize {
        self.open_len
    }

    /// Every entry not yet recorded in the manifest (a segment being sealed, then the
    /// open entries), in log order, as shared chunks: cheap to take on every query.
    pub fn tail(&self) -> Vec<Arc<[LogEntry]>> {
        let sealing = self.sealing.iter().flat_map(|sealing| sealing.entries.iter());
        sealing.chain(self.open.iter()).cloned().collect()
    }

    pub fn latest_checkpoint(&self) -> Option<&(Checkpoint, String)> {
        self.last_checkpoint.as_ref()
    }

    /// Appends entries whose `log_index` continue the log. Returns once they are durable.
    pub fn append(&mut self, entries: Vec<LogEntry>) -> Result<(), StoreError> {
        let Some(wal) = self.wal.as_mut() else {
            return Err(StoreError::ReadOnly);
        };
        for (offset, entry) in entries.iter().enumerate() {
            let expected = self.tree.size() + offset as u64;
            if entry.log_index != expected {
                return Err(StoreError::Internal(format!(
                    "append of log index {} where {expected} was next",
                    entry.log_index
                )));
            }
        }
        wal.append(&entries)?;
        for entry in &entries {
            self.tree.push(entry.leaf_hash());
        }
        self.open_len += entries.len();
        if !entries.is_empty() {
            self.open_since.get_or_insert_with(Instant::now);
        }
        self.open.push(Arc::from(entries));
        Ok(())
    }

    /// Seals and checkpoints when the configured thresholds are reached.
    pub fn maintain(&mut self) -> Result<(), StoreError> {
        self.finish_seal(false)?;
        let waiting = self.seal_retry_at.is_some_and(|at| Instant::now() < at);
        let old = self.open_len > 0
            && self
                .config
                .seal_after
                .zip(self.open_since)
                .is_some_and(|(after, since)| since.elapsed() >= after);
        if (self.open_len >= self.config.segment_max_entries || old) && !waiting {
            // A failed seal is retried, but not at every tick: it rewrites a whole segment.
            self.seal_retry_at = Some(Instant::now() + self.config.seal_retry);
            self.start_seal()?;
            self.seal_retry_at = None;
        }
        let signed = self
            .last_checkpoint
            .as_ref()
            .map_or(0, |(checkpoint, _)| checkpoint.size);
        let fresh = self.tree.size() - signed;
        if fresh >= self.config.checkpoint_every
            || (fresh > 0 && self.last_checkpoint_time.elapsed() >= self.config.checkpoint_interval)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Waits for a seal in flight and records it (or, when it failed, hands its entries
    /// back to the open segment).
    pub fn settle(&mut self) -> Result<(), StoreError> {
        self.finish_seal(true)
    }

    /// Seals the open entries now and waits until the segment is in the manifest.
    pub fn seal(&mut self) -> Result<(), StoreError> {
        self.start_seal()?;
        self.finish_seal(true)
    }

    /// Hands the open entries to a background thread that writes the Parquet file, and
    /// starts a new WAL file. Appends continue meanwhile; the entries stay in the old WAL
    /// files until the segment is recorded in the manifest.
    fn start_seal(&mut self) -> Result<(), StoreError> {
        if self.open.is_empty() {
            return Ok(());
        }
        self.finish_seal(true)?;
        if self.key.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let (Some(first), Some(last)) = (
            self.open.iter().find_map(|chunk| chunk.first()),
            self.open.iter().rev().find_map(|chunk| chunk.last()),
        ) else {
            return Ok(());
        };
        let (first, end) = (first.log_index, last.log_index + 1);
        // Everything that can fail (a descriptor or disk space for the next WAL file, a
        // thread) comes before the open entries are handed over: on failure the log is
        // as it was and the seal is tried again at the next maintenance.
        let next = self.paths.wal_file(end);
        let writer = WalWriter::open(&next)?;
        let paths = self.paths.clone();
        let shared = self.open.clone();
        let handle = std::thread::Builder::new()
            .name("custos-seal".into())
            .spawn(move || write_segment(&paths, &shared, first, end));
        let handle = match handle {
            Ok(handle) => handle,
            Err(error) => {
                drop(writer);
                let _ = fs_err::remove_file(&next);
                return Err(error.into());
            }
        };
        self.wal = Some(writer);
        let entries = std::mem::take(&mut self.open);
        self.open_len = 0;
        self.open_since = None;
        let old_wal = std::mem::replace(&mut self.wal_files, vec![next]);
        self.sealing = Some(Sealing {
            handle,
            entries,
            first,
            end,
            old_wal,
        });
        Ok(())
    }

    /// Records a finished (or, with `wait`, any) background seal: signed manifest line,
    /// WAL files deleted, checkpoint.
    fn finish_seal(&mut self, wait: bool) -> Result<(), StoreError> {
        let Some(sealing) = self.sealing.take() else {
            return Ok(());
        };
        if !wait && !sealing.handle.is_finished() {
            self.sealing = Some(sealing);
            return Ok(());
        }
        let Sealing {
            handle,
            entries,
            first,
            end,
            old_wal,
        } = sealing;
        let written = handle
            .join()
            .map_err(|_| StoreError::Internal("the seal thread panicked".into()))
            .and_then(|written| written);
        let recorded = written.and_then(|(file, bytes, blake3)| {
            let Some(key) = self.key.as_ref() else {
                return Err(StoreError::ReadOnly);
            };
            let mut info = SegmentInfo {
                file,
                first_index: first,
                end_index: end,
                bytes,
                blake3,
                sealed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                sig: String::new(),
            };
            info.sig = base64::engine::general_purpose::STANDARD
                .encode(key.sign_raw(info.signed_text(&self.paths.log_id).as_bytes()));
            append_ndjson(&self.paths.manifest, &info)?;
            Ok(info)
        });
        let info = match recorded {
            Ok(info) => info,
            Err(error) => {
                // Not in the manifest: the entries go back to the open segment (they are
                // still in their WAL files), to be sealed again after a pause.
                self.seal_retry_at = Some(Instant::now() + self.config.seal_retry);
                let mut open = entries;
                open.append(&mut self.open);
                self.open_len = open.iter().map(|chunk| chunk.len()).sum();
                self.open = open;
                self.open_since.get_or_insert_with(Instant::now);
                let mut wal_files = old_wal;
                wal_files.append(&mut self.wal_files);
                self.wal_files = wal_files;
                let _ = fs_err::remove_file(
                    self.paths
                        .segment_dir
                        .join(format!("{}.tmp", self.paths.segment_name(first, end))),
                );
                return Err(error);
            }
        };
        self.manifest.push(info);
        self.sealed_end = end;
        self.persist_tree();
        // The segment is recorded: failing to delete a WAL file below it loses nothing
        // (recovery skips entries the manifest already holds), so it is only reported.
        for old in old_wal {
            if let Err(error) = fs_err::remove_file(&old) {
                tracing::warn!(%error, "could not delete a sealed WAL file; recovery will skip it");
            }
        }
        if let Err(error) = fsync_dir(&self.paths.wal_dir) {
            tracing::warn!(%error, "could not fsync the WAL directory after deleting sealed files");
        }
        self.checkpoint()?;
        Ok(())
    }

    /// Signs a checkpoint of the current tree, unless the last one already covers it.
    /// Refuses to sign anything inconsistent with the previous checkpoint.
    pub fn checkpoint(&mut self) -> Result<Option<Checkpoint>, StoreError> {
        let size = self.tree.size();
        if let Some((last, _)) = &self.last_checkpoint {
            if last.size == size {
                self.last_checkpoint_time = Instant::now();
                return Ok(None);
            }
            if size < last.size || self.tree.root_at(last.size)? != last.root {
                return Err(StoreError::Internal(format!(
                    "refusing to sign size {size}: inconsistent with the checkpoint at size {}",
                    last.size
                )));
            }
        }
        let Some(key) = self.key.as_ref() else {
            return Err(StoreError::ReadOnly);
        };
        let checkpoint = Checkpoint {
            origin: self.origin.clone(),
            size,
            root: self.tree.root(),
        };
        let note = sign_note(&checkpoint.body(), &self.origin, key);
        append_ndjson(
            &self.paths.checkpoints,
            &CheckpointLine {
                size,
                note: note.clone(),
            },
        )?;
        self.last_checkpoint = Some((checkpoint.clone(), note));
        self.last_checkpoint_time = Instant::now();
        Ok(Some(checkpoint))
    }

    /// Seals the open segment and signs a final checkpoint.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.seal()?;
        self.checkpoint()?;
        self.persist_tree();
        Ok(())
    }

    /// Writes the tree cache now (a shutdown that could not seal still leaves it).
    pub fn persist(&mut self) {
        self.persist_tree();
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.tree.inclusion_proof(index, size)
    }

    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, ProofError> {
        self.tree.consistency_proof(from, to)
    }
}

/// Reads an NDJSON file of `T`; a missing file is empty.
pub fn read_ndjson<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StoreError> {
    let text = match fs_err::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line)
                .map_err(|error| StoreError::Tamper(format!("`{}` line {}: {error}", path.display(), number + 1)))
        })
        .collect()
}

/// Appends one JSON line and fsyncs. A line that could not be written whole (a full
/// disk) is cut off again, so the file never ends in a torn line.
pub fn append_ndjson<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut line = serde_json::to_vec(value).map_err(|error| StoreError::Internal(error.to_string()))?;
    line.push(b'\n');
    let mut file = fs_err::OpenOptions::new().create(true).append(true).open(path)?;
    let before = file.metadata()?.len();
    if let Err(error) = file.write_all(&line).and_then(|()| file.sync_data()) {
        if let Err(truncate) = file.set_len(before).and_then(|()| file.sync_all()) {
            tracing::error!(file = %path.display(), %truncate, "could not cut a torn line off");
        }
        return Err(error.into());
    }
    Ok(())
}
