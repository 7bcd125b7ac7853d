//! Rejected input, kept for forensics: bounded, append-only NDJSON files.
//!
//! Two files rotate: when the current one holds `max_records / 2` records or
//! `max_bytes / 2` bytes it becomes the previous one (replacing the older), so at most
//! `max_records` records and about `max_bytes` bytes are kept, whoever sends them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use custos_event::Rejection;
use serde::{Deserialize, Serialize};

/// Largest part of a rejected input kept verbatim.
pub const MAX_KEPT_BYTES: usize = 64 * 1024;

/// One rejected input.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RejectedRecord {
    pub id: u64,
    pub received_at: String,
    pub reason: String,
    pub message: String,
    /// The peer that sent it.
    pub remote: String,
    /// Position in its request, when it came in one.
    pub index: Option<usize>,
    /// Signer or agent, when it could be read.
    pub keyid: Option<String>,
    pub size: usize,
    /// blake3 of the whole input as received.
    pub blake3: String,
    /// The input as text when it is UTF-8, else base64; cut at [`MAX_KEPT_BYTES`].
    pub input: String,
    pub input_encoding: String,
    pub truncated: bool,
    /// Extra evidence: for `chain_fork`, both digests and the log index of the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

impl RejectedRecord {
    pub fn new(
        rejection: &Rejection,
        raw: &[u8],
        remote: &str,
        index: Option<usize>,
        keyid: Option<String>,
        evidence: Option<serde_json::Value>,
    ) -> Self {
        let kept = &raw[..raw.len().min(MAX_KEPT_BYTES)];
        let (input, input_encoding) = match std::str::from_utf8(kept) {
            Ok(text) => (text.to_owned(), "utf-8"),
            Err(_) => (base64::engine::general_purpose::STANDARD.encode(kept), "base64"),
        };
        Self {
            id: 0,
            received_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            reason: rejection.reason.code().to_owned(),
            message: rejection.message.clone(),
            remote: remote.to_owned(),
            index,
            keyid,
            size: raw.len(),
            blake3: blake3::hash(raw).to_hex().to_string(),
            input,
            input_encoding: input_encoding.to_owned(),
            truncated: kept.len() < raw.len(),
            evidence,
        }
    }
}

impl RejectedRecord {
    /// Describes the whole input when `raw` was only its first bytes: its size and
    /// blake3 are the whole input's, and the record says it is cut.
    pub fn of_whole(mut self, size: u64, blake3: String) -> Self {
        self.size = usize::try_from(size).unwrap_or(usize::MAX);
        self.blake3 = blake3;
        self.truncated = true;
        self
    }
}

/// The bounded store of rejected input.
#[derive(Debug)]
pub struct Forensics {
    dir: PathBuf,
    max_records: usize,
    max_bytes: u64,
    current_count: usize,
    next_id: u64,
    pending: Vec<u8>,
}

impl Forensics {
    pub fn open(dir: &Path, max_records: usize, max_bytes: u64) -> std::io::Result<Self> {
        fs_err::create_dir_all(dir)?;
        let mut forensics = Self {
            dir: dir.to_owned(),
            max_records: max_records.max(2),
            max_bytes: max_bytes.max(2 * MAX_KEPT_BYTES as u64),
            current_count: 0,
            next_id: 0,
            pending: Vec::new(),
        };
        // Ids only grow: the newest record is the last line of the current file (or of the
        // previous one when the current is empty). Nothing else is parsed at start.
        let current = fs_err::read(forensics.current_path()).unwrap_or_default();
        forensics.current_count = current.iter().filter(|byte| **byte == b'\n').count();
        let newest =
            last_record(&current).or_else(|| last_record(&fs_err::read(forensics.previous_path()).unwrap_or_default()));
        forensics.next_id = newest.map_or(0, |record| record.id + 1);
        Ok(forensics)
    }

    /// The two files, newest last, for [`read_recent`] (off the writer's thread).
    pub fn files(&self) -> [PathBuf; 2] {
        [self.previous_path(), self.current_path()]
    }

    fn current_path(&self) -> PathBuf {
        self.dir.join("rejected.ndjson")
    }

    fn previous_path(&self) -> PathBuf {
        self.dir.join("rejected.1.ndjson")
    }

    /// Queues a record; [`Forensics::flush`] makes it durable.
    pub fn record(&mut self, mut record: RejectedRecord) {
        record.id = self.next_id;
        self.next_id += 1;
        if let Ok(line) = serde_json::to_vec(&record) {
            self.pending.extend_from_slice(&line);
            self.pending.push(b'\n');
            self.current_count += 1;
        }
    }

    /// Writes queued records and fsyncs, rotating when the current file is full.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.current_path())?;
        file.write_all(&self.pending)?;
        file.sync_data()?;
        self.pending.clear();
        let bytes = file.metadata()?.len();
        if self.current_count >= self.max_records / 2 || bytes >= self.max_bytes / 2 {
            fs_err::rename(self.current_path(), self.previous_path())?;
            self.current_count = 0;
        }
        Ok(())
    }
}

/// The last well-formed record of an NDJSON file's bytes.
fn last_record(bytes: &[u8]) -> Option<RejectedRecord> {
    bytes
        .split(|byte| *byte == b'\n')
        .rev()
        .find_map(|line| serde_json::from_slice(line).ok())
}

/// The newest records of `files` (oldest file first) first, optionally only those with
/// `reason`. Reads files: call it off the writer's thread.
pub fn read_recent(files: &[PathBuf], reason: Option<&str>, limit: usize) -> Vec<RejectedRecord> {
    let mut records: Vec<RejectedRecord> = Vec::new();
    for path in files {
        records.extend(
            fs_err::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok()),
        );
    }
    records
        .into_iter()
        .rev()
        .filter(|record| reason.is_none_or(|reason| record.reason == reason))
        .take(limit)
        .collect()
}
