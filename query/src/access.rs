//! The audit of the auditors: every read or export through the query API is recorded
//! (who, which route, what was asked, how many rows, the outcome) in `DATA/access.ndjson`.
//! Query text is kept (cut at 2 KiB); answers never are.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// One recorded call.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub ts: String,
    pub token: &'a str,
    pub role: &'a str,
    pub realms: &'a [String],
    pub route: &'a str,
    /// The SQL, or the REST query string.
    pub query: &'a str,
    pub rows: usize,
    /// `ok`, or the error code.
    pub outcome: &'a str,
    /// On a node over a partition set: the partition whose log was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// ... or the partitions, when a SQL query read several.
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    pub partitions: &'a [u32],
}

/// An append-only NDJSON file, one line per call, flushed per line.
#[derive(Debug)]
pub struct AccessLog {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

const MAX_QUERY_CHARS: usize = 2048;

impl AccessLog {
    pub fn new(data: &Path) -> Self {
        Self {
            path: data.join("access.ndjson"),
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record. A failure is logged, never hidden, but does not fail the read.
    pub fn record(&self, record: AccessRecord<'_>) {
        let cut;
        let record = if record.query.chars().count() > MAX_QUERY_CHARS {
            cut = record.query.chars().take(MAX_QUERY_CHARS).collect::<String>() + "…";
            AccessRecord { query: &cut, ..record }
        } else {
            record
        };
        let mut line = match serde_json::to_vec(&record) {
            Ok(line) => line,
            Err(error) => {
                tracing::error!(%error, "access record not serialisable");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if file.is_none() {
            match std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(opened) => *file = Some(opened),
                Err(error) => {
                    tracing::error!(%error, path = %self.path.display(), "cannot open the access log");
                    return;
                }
            }
        }
        if let Some(open) = file.as_mut()
            && let Err(error) = open.write_all(&line)
        {
            tracing::error!(%error, path = %self.path.display(), "cannot append to the access log");
        }
    }
}
