//! Per-segment index of agent events by (agent, seq), so the node can answer a resend
//! of any stored event `duplicate` (and a different payload at an old seq `chain_fork`)
//! however old it is, without holding every event's digest in memory.
//!
//! ```text
//! seal: entries ──▶ (blake3(keyid)[..8], seq, row) sorted ──▶ <segment>.seqs (beside it)
//! lookup(agent, seq): binary search in each candidate segment's .seqs, newest first
//!        └─▶ candidate rows ──▶ read keyid, seq, payload_blake3 from the Parquet row itself
//! ```
//!
//! The index is derived data and not signed: a hit is only a hint, confirmed against the
//! segment row (whose file `custos verify` checks against the signed manifest). A missing
//! or unreadable index is rebuilt from the segment's `keyid` and `seq` columns.
//!
//! File: `"CSEQ0001" ‖ u64le(count) ‖ count × (u64le(agent) ‖ u64le(seq) ‖ u32le(row))`,
//! records sorted by (agent, seq, row).

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use arrow::array::{Array, FixedSizeBinaryArray, StringArray, UInt64Array};
use custos_event::EVENT_PAYLOAD_TYPE;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};

use crate::StoreError;
use crate::entry::LogEntry;
use crate::log::SegmentInfo;

const MAGIC: &[u8; 8] = b"CSEQ0001";
const HEADER: u64 = 16;
const RECORD: u64 = 20;

/// The 64-bit agent key the index sorts by: the first 8 bytes of blake3(did).
pub fn agent_key(did: &str) -> u64 {
    let hash = blake3::hash(did.as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(key)
}

/// The index file of a segment file name.
pub fn path_for(segment_dir: &Path, segment_file: &str) -> PathBuf {
    segment_dir.join(format!("{segment_file}.seqs"))
}

/// One indexed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub agent: u64,
    pub seq: u64,
    pub row: u32,
}

/// Records for the agent events among `entries` (rows in order), sorted.
pub fn records<'a>(entries: impl IntoIterator<Item = (&'a LogEntry, Option<u64>)>) -> Vec<Record> {
    let mut out: Vec<Record> = entries
        .into_iter()
        .enumerate()
        .filter(|(_, (entry, _))| entry.payload_type == EVENT_PAYLOAD_TYPE)
        .filter_map(|(row, (entry, seq))| {
            Some(Record {
                agent: agent_key(&entry.keyid),
                seq: seq?,
                row: u32::try_from(row).ok()?,
            })
        })
        .collect();
    out.sort_unstable();
    out
}

/// Writes an index file: temporary name, fsync, rename (the caller fsyncs the directory).
pub fn write(path: &Path, records: &[Record]) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(HEADER as usize + records.len() * RECORD as usize);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for record in records {
        bytes.extend_from_slice(&record.agent.to_le_bytes());
        bytes.extend_from_slice(&record.seq.to_le_bytes());
        bytes.extend_from_slice(&record.row.to_le_bytes());
    }
    let temporary = path.with_extension("seqs.tmp");
    {
        let mut file = fs_err::File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs_err::rename(&temporary, path)?;
    Ok(())
}

/// Builds the index of a sealed segment from its `payload_type`, `keyid` and `seq`
/// columns (for segments sealed before indexes existed, or whose index is damaged).
pub fn rebuild(segment_dir: &Path, info: &SegmentInfo) -> Result<Vec<Record>, StoreError> {
    let path = segment_dir.join(&info.file);
    let segment = |source: crate::segment::SegmentError| StoreError::Segment {
        file: info.file.clone(),
        source,
    };
    let file = fs_err::File::open(&path)?;
    let mut out = Vec::new();
    crate::segment::contain(|| {
        let builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(file.into_parts().0, crate::segment::read_options())?;
        let schema = builder.parquet_schema();
        let mask = ProjectionMask::columns(schema, ["payload_type", "keyid", "seq"]);
        let reader = builder.with_projection(mask).with_batch_size(8192).build()?;
        let mut row = 0u32;
        for batch in reader {
            let batch = batch?;
            let types = string_column(&batch, "payload_type")?;
            let keyids = string_column(&batch, "keyid")?;
            let seqs = batch
                .column_by_name("seq")
                .and_then(|column| column.as_any().downcast_ref::<UInt64Array>())
                .ok_or_else(|| crate::segment::SegmentError::Damaged("no `seq` column".into()))?;
            for position in 0..batch.num_rows() {
                if types.value(position) == EVENT_PAYLOAD_TYPE && seqs.is_valid(position) {
                    out.push(Record {
                        agent: agent_key(keyids.value(position)),
                        seq: seqs.value(position),
                        row,
                    });
                }
                row = row.saturating_add(1);
            }
        }
        Ok(())
    })
    .map_err(segment)?;
    out.sort_unstable();
    Ok(out)
}

fn string_column<'a>(
    batch: &'a arrow::array::RecordBatch,
    name: &str,
) -> Result<&'a StringArray, crate::segment::SegmentError> {
    batch
        .column_by_name(name)
        .and_then(|column| column.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| crate::segment::SegmentError::Damaged(format!("no `{name}` text column")))
}

/// What one segment's index says about (agent, seq).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Rows holding an event of an agent with this key at this seq (usually one; more
    /// only on a 64-bit key collision between two agents).
    Rows(Vec<u32>),
    /// The agent has events here, all at seqs above `seq`: look in older segments.
    Older,
    /// The agent has events here, but none at `seq`, and some below it: since an agent's
    /// accepted seqs only grow with the log index, `seq` was never stored.
    Never,
    /// The agent has no event in this segment.
    Absent,
}

/// An open index file, searched with positioned reads (the file is not loaded).
pub struct IndexFile {
    file: fs_err::File,
    count: u64,
}

impl IndexFile {
    /// Opens and checks an index file; `None` when it is missing or not well-formed.
    pub fn open(path: &Path) -> Option<Self> {
        let mut file = fs_err::File::open(path).ok()?;
        let mut header = [0u8; HEADER as usize];
        file.read_exact(&mut header).ok()?;
        if &header[..8] != MAGIC {
            return None;
        }
        let count = u64::from_le_bytes(header[8..16].try_into().ok()?);
        let length = file.metadata().ok()?.len();
        if HEADER.checked_add(count.checked_mul(RECORD)?)? != length {
            return None;
        }
        Some(Self { file, count })
    }

    fn record(&mut self, position: u64) -> std::io::Result<Record> {
        let mut bytes = [0u8; RECORD as usize];
        self.file.seek(SeekFrom::Start(HEADER + position * RECORD))?;
        self.file.read_exact(&mut bytes)?;
        let word = |range: std::ops::Range<usize>| {
            let mut out = [0u8; 8];
            out.copy_from_slice(&bytes[range]);
            u64::from_le_bytes(out)
        };
        let mut row = [0u8; 4];
        row.copy_from_slice(&bytes[16..20]);
        Ok(Record {
            agent: word(0..8),
            seq: word(8..16),
            row: u32::from_le_bytes(row),
        })
    }

    /// The first position whose record is not below `key`.
    fn lower_bound(&mut self, key: (u64, u64)) -> std::io::Result<u64> {
        let (mut low, mut high) = (0u64, self.count);
        while low < high {
            let middle = low + (high - low) / 2;
            let record = self.record(middle)?;
            if (record.agent, record.seq) < key {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        Ok(low)
    }

    /// Looks up (agent key, seq).
    pub fn probe(&mut self, agent: u64, seq: u64) -> std::io::Result<Probe> {
        let at = self.lower_bound((agent, seq))?;
        let mut rows = Vec::new();
        let mut position = at;
        while position < self.count {
            let record = self.record(position)?;
            if (record.agent, record.seq) != (agent, seq) {
                break;
            }
            rows.push(record.row);
            position += 1;
        }
        if !rows.is_empty() {
            return Ok(Probe::Rows(rows));
        }
        let below = at > 0 && self.record(at - 1)?.agent == agent;
        let above = at < self.count && self.record(at)?.agent == agent;
        Ok(match (below, above) {
            (true, _) => Probe::Never,
            (false, true) => Probe::Older,
            (false, false) => Probe::Absent,
        })
    }
}

/// An event found in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub log_index: u64,
    pub payload_blake3: [u8; 32],
}

/// Finds the stored event of `did` at `seq` among `segments` (in log order), searching
/// newest first. Segments ending at or before `not_before` are not searched (the agent
/// was enrolled after them). `Ok(None)`: no such event is stored in these segments.
pub fn find(
    segment_dir: &Path,
    segments: &[SegmentInfo],
    did: &str,
    seq: u64,
    not_before: u64,
) -> Result<Option<Found>, StoreError> {
    let agent = agent_key(did);
    for info in segments.iter().rev() {
        if info.end_index <= not_before {
            break;
        }
        let path = path_for(segment_dir, &info.file);
        let probe = match IndexFile::open(&path) {
            Some(mut index) => index.probe(agent, seq)?,
            None => {
                tracing::warn!(segment = info.file, "sequence index missing or damaged; rebuilding it");
                let records = rebuild(segment_dir, info)?;
                write(&path, &records)?;
                let mut index = IndexFile::open(&path)
                    .ok_or_else(|| StoreError::Internal(format!("rebuilt index `{}` unreadable", path.display())))?;
                index.probe(agent, seq)?
            }
        };
        match probe {
            Probe::Rows(rows) => {
                if let Some(found) = confirm(segment_dir, info, &rows, did, seq)? {
                    return Ok(Some(found));
                }
                // A key collision with another agent: this agent may still be older.
            }
            Probe::Older | Probe::Absent => {}
            Probe::Never => return Ok(None),
        }
    }
    Ok(None)
}

/// Reads candidate rows from the segment itself and keeps the one that really is `did`'s
/// event at `seq`.
fn confirm(
    segment_dir: &Path,
    info: &SegmentInfo,
    rows: &[u32],
    did: &str,
    seq: u64,
) -> Result<Option<Found>, StoreError> {
    let mut sorted: Vec<u32> = rows.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut selectors = Vec::new();
    let mut next = 0usize;
    for row in &sorted {
        let row = *row as usize;
        if row > next {
            selectors.push(RowSelector::skip(row - next));
        }
        selectors.push(RowSelector::select(1));
        next = row + 1;
    }
    let file = fs_err::File::open(segment_dir.join(&info.file))?;
    let segment = |source: crate::segment::SegmentError| StoreError::Segment {
        file: info.file.clone(),
        source,
    };
    let mut found = None;
    crate::segment::contain(|| {
        let builder =
            ParquetRecordBatchReaderBuilder::try_new_with_options(file.into_parts().0, crate::segment::read_options())?;
        let mask = ProjectionMask::columns(
            builder.parquet_schema(),
            ["log_index", "keyid", "seq", "payload_blake3"],
        );
        let reader = builder
            .with_projection(mask)
            .with_row_selection(RowSelection::from(selectors))
            .build()?;
        for batch in reader {
            let batch = batch?;
            let keyids = string_column(&batch, "keyid")?;
            let numbers = |name: &str| {
                batch
                    .column_by_name(name)
                    .and_then(|column| column.as_any().downcast_ref::<UInt64Array>())
                    .ok_or_else(|| crate::segment::SegmentError::Damaged(format!("no `{name}` column")))
            };
            let (indexes, seqs) = (numbers("log_index")?, numbers("seq")?);
            let digests = batch
                .column_by_name("payload_blake3")
                .and_then(|column| column.as_any().downcast_ref::<FixedSizeBinaryArray>())
                .ok_or_else(|| crate::segment::SegmentError::Damaged("no `payload_blake3` column".into()))?;
            for position in 0..batch.num_rows() {
                if keyids.value(position) == did && seqs.is_valid(position) && seqs.value(position) == seq {
                    let mut digest = [0u8; 32];
                    if digests.value(position).len() == 32 {
                        digest.copy_from_slice(digests.value(position));
                        found = Some(Found {
                            log_index: indexes.value(position),
                            payload_blake3: digest,
                        });
                    }
                }
            }
        }
        Ok(())
    })
    .map_err(segment)?;
    Ok(found)
}
