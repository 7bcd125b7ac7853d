//! Builds real stores for the tests: real keys, real Parquet, real fsyncs.

use std::path::{Path, PathBuf};

use custos_event::{AgentKey, Kind, Payload, Signer};
use custos_store::verify::{Problem, Report, VerifyOptions, verify_store};
use custos_store::{Log, LogConfig, LogEntry, OpenMode, StoreInfo};

pub(crate) struct Built {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) entries: Vec<LogEntry>,
    /// The signers, positioned after the last entry.
    pub(crate) signers: Vec<Signer>,
}

impl Built {
    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn segment_dir(&self) -> PathBuf {
        self.path().join("logs/0/segments")
    }

    pub(crate) fn segments(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.segment_dir())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "parquet"))
            .collect();
        files.sort();
        files
    }

    pub(crate) fn wal_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.path().join("logs/0/wal"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        files
    }
}

pub(crate) fn config(segment_max_entries: usize) -> LogConfig {
    LogConfig {
        segment_max_entries,
        checkpoint_every: 10,
        checkpoint_interval: std::time::Duration::from_secs(3600),
        // Tests run maintenance by hand: a failed seal may be tried again at once.
        seal_retry: std::time::Duration::ZERO,
        seal_after: None,
    }
}

pub(crate) fn open(dir: &Path, segment_max_entries: usize) -> Log {
    let info = StoreInfo::open(dir, true).unwrap();
    Log::open(
        dir,
        &info.store_id,
        "0",
        config(segment_max_entries),
        OpenMode::ReadWrite,
        &mut |_| {},
    )
    .unwrap()
}

/// Appends `count` events from three agents, one entry per append, maintaining as a node does.
pub(crate) fn append_events(log: &mut Log, signers: &mut [Signer], count: usize) -> Vec<LogEntry> {
    let mut out = Vec::new();
    for position in 0..count {
        let signer = &mut signers[position % 3];
        let mut payload = Payload::new(Kind::ToolCall, chrono::Utc::now());
        payload.action = Some("http.get".into());
        payload.target = Some(format!("https://api.example.com/item/{position}"));
        let entry = LogEntry::from_envelope(
            signer.sign(payload),
            log.next_index(),
            1_700_000_000_000_000 + position as i64,
            None,
        );
        out.push(entry.clone());
        log.append(vec![entry]).unwrap();
        log.maintain().unwrap();
    }
    out
}

pub(crate) fn signers() -> Vec<Signer> {
    (1..=3u8)
        .map(|seed| Signer::new(AgentKey::from_seed(&[seed; 32]), "test"))
        .collect()
}

/// A closed store of `count` events in segments of `segment_max_entries`.
pub(crate) fn build_sealed(count: usize, segment_max_entries: usize) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), segment_max_entries);
    let mut signers = signers();
    let entries = append_events(&mut log, &mut signers, count);
    log.close().unwrap();
    Built { dir, entries, signers }
}

/// A store whose last entries are only in the WAL (the node was not shut down).
pub(crate) fn build_with_wal_tail(sealed: usize, in_wal: usize) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), usize::MAX);
    let mut signers = signers();
    let mut entries = append_events(&mut log, &mut signers, sealed);
    log.seal().unwrap();
    entries.extend(append_events(&mut log, &mut signers, in_wal));
    drop(log);
    Built { dir, entries, signers }
}

pub(crate) fn verify(dir: &Path) -> Report {
    verify_store(
        dir,
        &VerifyOptions {
            signatures: true,
            log_key: None,
            // Small chunks, so problems are located across the verifier's chunk boundaries.
            chunk_rows: Some(7),
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .unwrap()
}

/// The problems with `code`, failing with the whole report when there are none.
pub(crate) fn find<'a>(report: &'a Report, code: &str) -> Vec<&'a Problem> {
    let found: Vec<&Problem> = report.problems.iter().filter(|problem| problem.code == code).collect();
    assert!(!found.is_empty(), "no `{code}` problem in {:#?}", report.problems);
    found
}
