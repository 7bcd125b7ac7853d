//! The write-ahead log: checksummed records, appended in groups and fsynced before any
//! entry in the group is acknowledged.
//!
//! ```text
//! file   = "CWAL0001" record*
//! record = u32le(len body) ‖ u32le(crc32(body)) ‖ body
//! body   = u64le(log_index) ‖ i64le(ingest_ts_us) ‖ u16le(len) type ‖ u16le(len) keyid
//!          ‖ sig[64] ‖ u32le(len) payload ‖ u8(has_gap) [‖ u64le(from) ‖ u64le(to)]
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::entry::LogEntry;

pub const MAGIC: &[u8; 8] = b"CWAL0001";
/// Largest body a reader accepts; bounds allocation on a corrupted length.
const MAX_BODY: u32 = 16 * 1024 * 1024;

/// Appends to one WAL file.
#[derive(Debug)]
pub struct WalWriter {
    file: fs_err::File,
    path: PathBuf,
    buffer: Vec<u8>,
    /// The file's length after the last append that reached the disk.
    durable_len: u64,
}

impl WalWriter {
    /// Opens `path` for appending, writing the magic if the file is new.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = fs_err::OpenOptions::new().create(true).append(true).open(path)?;
        let mut durable_len = file.metadata()?.len();
        if durable_len == 0 {
            let written = file.write_all(MAGIC).and_then(|()| file.sync_all());
            if let Err(error) = written {
                // A new file that could not get its magic (a full disk) is removed, not
                // left for recovery to read as a corrupt WAL.
                drop(file);
                let _ = fs_err::remove_file(path);
                return Err(error);
            }
            if let Some(parent) = path.parent() {
                crate::fsync_dir(parent)?;
            }
            durable_len = MAGIC.len() as u64;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            buffer: Vec::new(),
            durable_len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every entry, then fsyncs once (group commit). Returns after data is durable.
    pub fn append(&mut self, entries: &[LogEntry]) -> std::io::Result<()> {
        self.buffer.clear();
        for entry in entries {
            encode_record(entry, &mut self.buffer);
        }
        let written = self.file.write_all(&self.buffer).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.durable_len += self.buffer.len() as u64;
                Ok(())
            }
            Err(error) => {
                // Nothing of this group was acknowledged: cut it off, so that no later
                // group can land behind records that may never reach the disk.
                if let Err(truncate) = self.rollback() {
                    tracing::error!(file = %self.path.display(), %truncate, "could not cut a failed WAL write off");
                }
                Err(error)
            }
        }
    }

    /// Cuts the file back to its last durable length.
    pub fn rollback(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.durable_len)?;
        self.file.sync_all()
    }
}

/// Encodes one record (header and body) onto `out`.
pub fn encode_record(entry: &LogEntry, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&entry.log_index.to_le_bytes());
    out.extend_from_slice(&entry.ingest_ts_us.to_le_bytes());
    put_str16(out, &entry.payload_type);
    put_str16(out, &entry.keyid);
    out.extend_from_slice(&entry.sig);
    out.extend_from_slice(&u32::try_from(entry.payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&entry.payload);
    match entry.gap {
        Some((from, to)) => {
            out.push(1);
            out.extend_from_slice(&from.to_le_bytes());
            out.extend_from_slice(&to.to_le_bytes());
        }
        None => out.push(0),
    }
    let body_len = out.len() - start - 8;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str16(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// What reading a WAL file found.
#[derive(Debug, Default)]
pub struct WalScan {
    pub entries: Vec<(u64, LogEntry)>,
    /// Byte offset just past the last good record.
    pub good_len: u64,
    pub problem: Option<WalProblem>,
}

/// A record that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalProblem {
    pub offset: u64,
    /// The record's log index, when its header and index could still be read.
    pub log_index: Option<u64>,
    /// True when the bad record is the last bytes of the file (a write torn by a crash).
    pub at_tail: bool,
    pub detail: String,
}

/// Reads every record of a WAL file, stopping at the first bad one.
pub fn scan(bytes: &[u8]) -> WalScan {
    let mut scan = WalScan::default();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        scan.problem = Some(WalProblem {
            offset: 0,
            log_index: None,
            at_tail: bytes.len() < MAGIC.len(),
            detail: "missing `CWAL0001` magic".into(),
        });
        return scan;
    }
    let mut offset = MAGIC.len();
    scan.good_len = offset as u64;
    while offset < bytes.len() {
        let problem = |detail: String, log_index: Option<u64>, at_tail: bool| WalProblem {
            offset: offset as u64,
            log_index,
            at_tail,
            detail,
        };
        if bytes.len() - offset < 8 {
            scan.problem = Some(problem("record header cut short".into(), None, true));
            return scan;
        }
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap_or_default());
        let body_start = offset + 8;
        let index_hint = bytes
            .get(body_start..body_start + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        if len > MAX_BODY {
            scan.problem = Some(problem(
                format!("record length `{len}` is implausible"),
                index_hint,
                false,
            ));
            return scan;
        }
        let body_end = body_start + len as usize;
        if body_end > bytes.len() {
            scan.problem = Some(problem("record cut short".into(), index_hint, true));
            return scan;
        }
        let body = &bytes[body_start..body_end];
        let at_tail = body_end == bytes.len();
        if crc32fast::hash(body) != crc {
            scan.problem = Some(problem("checksum mismatch".into(), index_hint, at_tail));
            return scan;
        }
        match decode_body(body) {
            Some(entry) => scan.entries.push((offset as u64, entry)),
            None => {
                scan.problem = Some(problem("record body does not decode".into(), index_hint, at_tail));
                return scan;
            }
        }
        offset = body_end;
        scan.good_len = offset as u64;
    }
    scan
}

fn decode_body(body: &[u8]) -> Option<LogEntry> {
    let mut cursor = Cursor { bytes: body, at: 0 };
    let log_index = u64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
    let ingest_ts_us = i64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
    let payload_type = cursor.str16()?;
    let keyid = cursor.str16()?;
    let sig: [u8; 64] = cursor.take(64)?.try_into().ok()?;
    let payload_len = u32::from_le_bytes(cursor.take(4)?.try_into().ok()?) as usize;
    let payload = cursor.take(payload_len)?.to_vec();
    let gap = match cursor.take(1)?[0] {
        0 => None,
        1 => {
            let from = u64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
            let to = u64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
            Some((from, to))
        }
        _ => return None,
    };
    if cursor.at != body.len() {
        return None;
    }
    let payload_blake3 = *blake3::hash(&payload).as_bytes();
    Some(LogEntry {
        log_index,
        ingest_ts_us,
        payload_type,
        keyid,
        sig,
        payload,
        payload_blake3,
        gap,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at.checked_add(count)?)?;
        self.at += count;
        Some(slice)
    }

    fn str16(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}
