//! The Merkle tree kept on disk, so a restart reads it instead of rehashing every entry
//! of every segment.
//!
//! ```text
//!  logs/<log>/tree/level-00  leaf hashes          32 bytes each, appended
//!                  level-01  hashes of 2 leaves   ...
//!                  …
//!                  index.json  { size, per level: count and blake3 of each 1 Mi-hash
//!                                chunk, signature by the log key }
//! ```
//!
//! Written after each seal and at shutdown (level files appended, then the index
//! replaced; nothing is fsynced: it is a cache, and whatever a power cut loses fails its
//! checks at the next start, which then rebuilds the tree). Read at start: the index's signature, then every chunk's digest, are
//! checked before a hash is used; a missing or damaged cache means the tree is rebuilt
//! from the segments, as before. What the cache holds is checked again against every
//! signed checkpoint, and `custos verify` never uses it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::checkpoint::NoteKey;
use crate::merkle::{Hash, Tree};

/// Hashes per digested chunk of a level file (32 MiB).
const CHUNK: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    format: u32,
    size: u64,
    levels: Vec<LevelIndex>,
    /// base64 ed25519 signature by the log key over [`Index::signed_text`].
    sig: String,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelIndex {
    hashes: u64,
    /// blake3 (hex) of each chunk of `CHUNK` hashes, the last one possibly partial.
    chunks: Vec<String>,
}

impl Index {
    fn signed_text(&self, log_id: &str) -> String {
        let mut text = format!("custos/tree/v1\n{log_id}\n{}\n", self.size);
        for (level, index) in self.levels.iter().enumerate() {
            text.push_str(&format!("{level} {} {}\n", index.hashes, index.chunks.join(",")));
        }
        text
    }
}

/// The cache of one log's tree.
#[derive(Debug)]
pub(crate) struct TreeCache {
    dir: PathBuf,
    log_id: String,
    /// Hashes written so far, per level.
    written: Vec<usize>,
    /// Digests of complete chunks, per level (the partial last one is rehashed).
    digests: Vec<Vec<String>>,
}

fn level_path(dir: &Path, level: usize) -> PathBuf {
    dir.join(format!("level-{level:02}"))
}

fn digest(hashes: &[Hash]) -> String {
    blake3::hash(hashes.as_flattened()).to_hex().to_string()
}

impl TreeCache {
    pub(crate) fn new(dir: PathBuf, log_id: &str) -> Self {
        Self {
            dir,
            log_id: log_id.to_owned(),
            written: Vec::new(),
            digests: Vec::new(),
        }
    }

    /// Reads the cached tree, checking its signature and every chunk. `Ok(None)` when
    /// there is none; an error when there is one that does not check out.
    pub(crate) fn load(&mut self, key: &NoteKey) -> Result<Option<Tree>, String> {
        let index_path = self.dir.join("index.json");
        let text = match std::fs::read(&index_path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("reading `{}`: {error}", index_path.display())),
        };
        let index: Index =
            serde_json::from_slice(&text).map_err(|error| format!("`{}`: {error}", index_path.display()))?;
        if index.format != 1 {
            return Err(format!("tree cache format {} is not 1", index.format));
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(&index.sig)
            .ok()
            .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
            .ok_or("the tree cache's signature is not base64 of 64 bytes")?;
        let public = ed25519_dalek::VerifyingKey::from_bytes(&key.public).map_err(|error| error.to_string())?;
        use ed25519_dalek::Verifier as _;
        public
            .verify(
                index.signed_text(&self.log_id).as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&signature),
            )
            .map_err(|_| "the tree cache is not signed by the log key".to_owned())?;
        let mut levels = Vec::with_capacity(index.levels.len());
        for (level, entry) in index.levels.iter().enumerate() {
            let path = level_path(&self.dir, level);
            let count = usize::try_from(entry.hashes).map_err(|error| error.to_string())?;
            // Read straight into the hashes: no second copy of hundreds of megabytes.
            let mut hashes: Vec<Hash> = vec![[0u8; 32]; count];
            std::fs::File::open(&path)
                .and_then(|mut file| std::io::Read::read_exact(&mut file, hashes.as_flattened_mut()))
                .map_err(|error| format!("reading {count} hashes from `{}`: {error}", path.display()))?;
            let expected_chunks = count.div_ceil(CHUNK);
            if entry.chunks.len() != expected_chunks {
                return Err(format!(
                    "level {level}: {} chunk digests for {count} hashes",
                    entry.chunks.len()
                ));
            }
            {
                use rayon::prelude::*;
                let bad = hashes
                    .par_chunks(CHUNK)
                    .zip(entry.chunks.par_iter())
                    .position_any(|(chunk, expected)| digest(chunk) != *expected);
                if let Some(chunk) = bad {
                    return Err(format!("`{}` chunk {chunk} does not match its digest", path.display()));
                }
            }
            levels.push(hashes);
        }
        let tree = Tree::from_levels(levels, index.size)
            .ok_or_else(|| format!("the cached levels do not make a tree of {} leaves", index.size))?;
        self.written = tree.levels().iter().map(Vec::len).collect();
        self.digests = index
            .levels
            .iter()
            .zip(tree.levels())
            .map(|(entry, hashes)| {
                let complete = hashes.len() / CHUNK;
                entry.chunks[..complete].to_vec()
            })
            .collect();
        Ok(Some(tree))
    }

    /// Forgets what was written (before rewriting a cache that did not check out).
    pub(crate) fn reset(&mut self) -> std::io::Result<()> {
        self.written.clear();
        self.digests.clear();
        if self.dir.exists() {
            fs_err::remove_dir_all(&self.dir)?;
        }
        Ok(())
    }

    /// Appends what `tree` holds beyond what was written, fsyncs, and signs a new index.
    pub(crate) fn persist(&mut self, tree: &Tree, key: &custos_event::AgentKey) -> Result<(), StoreError> {
        fs_err::create_dir_all(&self.dir)?;
        let levels = tree.levels();
        for (level, hashes) in levels.iter().enumerate() {
            let done = self.written.get(level).copied().unwrap_or(0);
            if done > hashes.len() {
                return Err(StoreError::Internal(format!(
                    "tree cache level {level} has {done} hashes, the tree {}",
                    hashes.len()
                )));
            }
            let path = level_path(&self.dir, level);
            let mut file = fs_err::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)?;
            // Whatever a crash left past what was written is cut off first.
            file.set_len((done * 32) as u64)?;
            let mut bytes = Vec::with_capacity((hashes.len() - done) * 32);
            for hash in &hashes[done..] {
                bytes.extend_from_slice(hash);
            }
            use std::io::Seek as _;
            file.seek(std::io::SeekFrom::End(0))?;
            // No fsync: a cache. What a power cut loses fails its digest at the next start,
            // and the tree is rebuilt; a crashed process leaves it in the page cache.
            file.write_all(&bytes)?;
            if self.written.len() <= level {
                self.written.push(0);
                self.digests.push(Vec::new());
            }
            self.written[level] = hashes.len();
            let complete = hashes.len() / CHUNK;
            while self.digests[level].len() < complete {
                let chunk = self.digests[level].len();
                self.digests[level].push(digest(&hashes[chunk * CHUNK..(chunk + 1) * CHUNK]));
            }
        }
        let mut index = Index {
            format: 1,
            size: tree.size(),
            levels: levels
                .iter()
                .enumerate()
                .map(|(level, hashes)| {
                    let mut chunks = self.digests[level].clone();
                    let complete = chunks.len() * CHUNK;
                    if complete < hashes.len() {
                        chunks.push(digest(&hashes[complete..]));
                    }
                    LevelIndex {
                        hashes: hashes.len() as u64,
                        chunks,
                    }
                })
                .collect(),
            sig: String::new(),
        };
        index.sig =
            base64::engine::general_purpose::STANDARD.encode(key.sign_raw(index.signed_text(&self.log_id).as_bytes()));
        let bytes = serde_json::to_vec(&index).map_err(|error| StoreError::Internal(error.to_string()))?;
        let temporary = self.dir.join("index.json.tmp");
        fs_err::write(&temporary, &bytes)?;
        fs_err::rename(&temporary, self.dir.join("index.json"))?;
        Ok(())
    }
}
