//! The Custos store: durable, tamper-evident, and readable by any Parquet engine.
//!
//! ```text
//!                 ┌──────────────── one log per partition (`logs/<log id>/`) ────────────────┐
//! entries ──▶ WAL (checksummed, group fsync) ──▶ open segment ──seal──▶ zstd Parquet segment
//!                 │                                                   segments.ndjson (signed)
//!                 └─▶ RFC 9162 Merkle tree ──▶ C2SP checkpoints (signed notes) ──▶ proofs
//!
//! verify: segments + WAL ──▶ leaves, digests, chains, signatures ──▶ roots vs checkpoints
//! ```
//!
//! - [`merkle`]: the tree, inclusion and consistency proofs and their verification.
//! - [`entry`]: a log entry and its exact leaf bytes.
//! - [`wal`]: the write-ahead log format.
//! - [`segment`]: the Parquet segment schema.
//! - [`seqindex`]: per-segment (agent, seq) index, for duplicates and forks at any depth.
//! - [`witness`]: C2SP witness protocol and cosignatures (no I/O).
//! - [`checkpoint`]: checkpoints as C2SP signed notes.
//! - [`log`]: one log, tying the above together with recovery.
//! - [`verify`]: the offline verifier behind `custos verify`.
//! - [`partitions`]: a set of partition logs and the checkpoint that binds their heads.
//! - [`keyfile`]: owner-only key files.
//! - [`archive`]: the sealed part copied to object storage (a directory, S3), and back.
//!
//! The layout on disk is specified in `docs/store-format.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod archive;
pub mod checkpoint;
pub mod entry;
pub mod forensics;
pub mod keyfile;
pub mod log;
pub mod merkle;
pub mod partitions;
pub mod segment;
pub mod seqindex;
mod treecache;
pub mod verify;
pub mod view;
pub mod wal;
pub mod witness;

pub use entry::LogEntry;
pub use log::{Log, LogConfig, OpenMode, Recovery};
pub use view::{CheckpointView, EvidenceProofs, StoreView};

/// The id of the one log the embedded mode runs.
pub const DEFAULT_LOG_ID: &str = "0";

/// Errors of the store. `Tamper` means the files disagree with what was signed: an
/// operator must run `custos verify` and investigate.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("segment `{file}`: {source}")]
    Segment {
        file: String,
        source: segment::SegmentError,
    },
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error(transparent)]
    KeyFile(#[from] keyfile::KeyFileError),
    #[error("checkpoint: {0}")]
    Note(#[from] checkpoint::NoteError),
    #[error("proof: {0}")]
    Proof(#[from] merkle::ProofError),
    #[error("store integrity: {0}")]
    Tamper(String),
    #[error("`{0}` is not a Custos store (no store.json); start `custos serve --data` on it first")]
    NotAStore(String),
    #[error("the log is open read-only")]
    ReadOnly,
    #[error("internal error (a bug): {0}")]
    Internal(String),
}

/// `store.json` at the root of a data directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreInfo {
    pub format: u32,
    /// Random id naming this store in checkpoint origins.
    pub store_id: String,
    pub logs: Vec<String>,
}

impl StoreInfo {
    /// Reads `store.json`, creating it (with a fresh store id) when `create` is set.
    pub fn open(data: &Path, create: bool) -> Result<Self, StoreError> {
        let path = data.join("store.json");
        if path.exists() {
            let text = fs_err::read_to_string(&path)?;
            return serde_json::from_str(&text)
                .map_err(|error| StoreError::Tamper(format!("`{}`: {error}", path.display())));
        }
        if !create {
            return Err(StoreError::NotAStore(data.display().to_string()));
        }
        fs_err::create_dir_all(data)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|error| StoreError::Internal(format!("random source: {error}")))?;
        let info = StoreInfo {
            format: 1,
            store_id: hex::encode(id),
            logs: vec![DEFAULT_LOG_ID.to_owned()],
        };
        let text = serde_json::to_string_pretty(&info).map_err(|error| StoreError::Internal(error.to_string()))?;
        let temporary = data.join("store.json.tmp");
        fs_err::write(&temporary, text)?;
        fs_err::File::open(&temporary)?.sync_all()?;
        fs_err::rename(&temporary, &path)?;
        fsync_dir(data)?;
        Ok(info)
    }
}

/// Where one log's files live. The log id is in every path and file name.
#[derive(Clone, Debug)]
pub struct LogPaths {
    pub log_id: String,
    pub dir: PathBuf,
    pub wal_dir: PathBuf,
    pub segment_dir: PathBuf,
    pub manifest: PathBuf,
    pub checkpoints: PathBuf,
    pub key: PathBuf,
    pub public_key: PathBuf,
}

impl LogPaths {
    pub fn new(data: &Path, log_id: &str) -> Self {
        let dir = data.join("logs").join(log_id);
        Self {
            log_id: log_id.to_owned(),
            wal_dir: dir.join("wal"),
            segment_dir: dir.join("segments"),
            manifest: dir.join("segments.ndjson"),
            checkpoints: dir.join("checkpoints.ndjson"),
            key: dir.join("checkpoint.key"),
            public_key: dir.join("checkpoint.pub"),
            dir,
        }
    }

    pub fn wal_file(&self, first_index: u64) -> PathBuf {
        self.wal_dir.join(format!("{}-{first_index:020}.wal", self.log_id))
    }

    /// The WAL files present, oldest first (names sort by first index).
    pub fn wal_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs_err::read_dir(&self.wal_dir)
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|entry| entry.path())
                    .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    pub fn segment_name(&self, first_index: u64, end_index: u64) -> String {
        format!("{}-{first_index:020}-{end_index:020}.parquet", self.log_id)
    }
}

/// Replaces `path` with `bytes` durably: a temporary file beside it, fsynced, renamed
/// over it, and the directory fsynced (a crash leaves the old file or the new one).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_renamed(path, bytes)?;
    fsync_dir(
        path.parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
}

/// [`write_atomic`] without the directory's fsync, for a caller that replaces several
/// files of one directory and then fsyncs it once with [`fsync_dir`]: until then a crash
/// may leave the old file.
pub fn write_renamed(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let temporary = PathBuf::from(name);
    fs_err::write(&temporary, bytes)?;
    fs_err::File::open(&temporary)?.sync_all()?;
    fs_err::rename(&temporary, path)
}

/// fsyncs a directory so a create, rename or delete inside it is durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    fs_err::File::open(dir)?.sync_all()
}

/// Reads a whole object through `object_store` (local disk by default; the same call
/// works against S3-compatible stores).
pub fn read_object(root: &Path, relative: &str) -> Result<bytes::Bytes, StoreError> {
    use object_store::ObjectStoreExt as _;
    let store = object_store::local::LocalFileSystem::new_with_prefix(root)?;
    let location = object_store::path::Path::from(relative);
    let bytes = futures::executor::block_on(async { store.get(&location).await?.bytes().await })?;
    Ok(bytes)
}
