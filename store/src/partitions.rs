//! A set of partition logs, and the signed checkpoint that binds their tree heads.
//!
//! ```text
//! DATA/partitions/<p>/            one store per partition, one log each (`--log-per-partition`)
//!        └─ logs/0/checkpoints.ndjson ──┐ latest signed checkpoint of each
//!                                       ▼
//! DATA/partitions.ndjson ◀── sign_note( custos/<set id>/partitions
//!                                       <partition count>
//!                                       <p> <size> <base64 root> <origin>   (one per partition)
//!                                     ) with DATA/partitions.key
//! ```
//!
//! Each partition's log is verified on its own ([`crate::verify`]); the cross-partition
//! checkpoint then says which partitions exist and how far each had grown when it was
//! signed. A verifier checks that every bound head is a checkpoint the partition's own
//! log reproduces, so a deleted partition, or a partition cut back below a bound size,
//! is found, and an evidence bundle can prove that it names every partition.
//! The format is specified in `docs/store-format.md` (Partitions).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, NoteError, NoteKey, sign_note, verify_checkpoint, verify_note};
use crate::log::{CheckpointLine, append_ndjson, read_ndjson};
use crate::merkle::Hash;
use crate::{LogPaths, StoreError, StoreInfo};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `DATA/partitions.json`: the partition set's id and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSet {
    pub format: u32,
    /// Random id naming the set in its checkpoints' origin.
    pub set_id: String,
    pub partitions: u32,
}

impl PartitionSet {
    pub fn path(data: &Path) -> PathBuf {
        data.join("partitions.json")
    }

    /// Reads `partitions.json`, or creates it for `partitions` partitions. Two writers
    /// starting at once agree: the file is created exclusively and the loser reads it.
    pub fn open_or_create(data: &Path, partitions: u32) -> Result<Self, StoreError> {
        if let Some(set) = Self::open(data)? {
            if set.partitions != partitions {
                return Err(StoreError::Tamper(format!(
                    "`{}` is a set of {} partitions, but the topic has {partitions}; partitions cannot be added to a set",
                    Self::path(data).display(),
                    set.partitions
                )));
            }
            return Ok(set);
        }
        fs_err::create_dir_all(data)?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|error| StoreError::Internal(format!("random source: {error}")))?;
        let set = PartitionSet {
            format: 1,
            set_id: hex::encode(id),
            partitions,
        };
        let text = serde_json::to_string_pretty(&set).map_err(|error| StoreError::Internal(error.to_string()))?;
        let temporary = data.join(format!("partitions.json.{}", hex::encode(id)));
        fs_err::write(&temporary, text)?;
        fs_err::File::open(&temporary)?.sync_all()?;
        // hard_link fails when the name exists: exactly one creator wins.
        let linked = std::fs::hard_link(&temporary, Self::path(data));
        let _ = fs_err::remove_file(&temporary);
        match linked {
            Ok(()) => {
                crate::fsync_dir(data)?;
                Ok(set)
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::open(data)?.ok_or_else(|| StoreError::Internal("partitions.json vanished".into()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Reads `partitions.json`; `None` when `data` is not a partition set.
    pub fn open(data: &Path) -> Result<Option<Self>, StoreError> {
        let path = Self::path(data);
        if !path.exists() {
            return Ok(None);
        }
        let text = fs_err::read_to_string(&path)?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| StoreError::Tamper(format!("`{}`: {error}", path.display())))
    }

    /// The origin (and note key name) of the set's checkpoints.
    pub fn origin(&self) -> String {
        format!("custos/{}/partitions", self.set_id)
    }

    /// The set a store belongs to when it is laid out as partition `p` of one
    /// (`DATA/partitions/<p>/` beside `DATA/partitions.json`): (DATA, the set, p).
    pub fn of_store(store: &Path) -> Option<(PathBuf, Self, u32)> {
        let partition: u32 = store.file_name()?.to_str()?.parse().ok()?;
        let parent = store.parent()?;
        if parent.file_name()? != "partitions" {
            return None;
        }
        let data = parent.parent()?;
        let set = Self::open(data).ok()??;
        (partition < set.partitions).then(|| (data.to_owned(), set, partition))
    }

    pub fn store_dir(data: &Path, partition: u32) -> PathBuf {
        data.join("partitions").join(partition.to_string())
    }

    pub fn key_path(data: &Path) -> PathBuf {
        data.join("partitions.key")
    }

    pub fn public_key_path(data: &Path) -> PathBuf {
        data.join("partitions.pub")
    }

    pub fn checkpoints_path(data: &Path) -> PathBuf {
        data.join("partitions.ndjson")
    }
}

/// One partition's tree head, as a cross-partition checkpoint binds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionHead {
    pub partition: u32,
    pub size: u64,
    pub root: Hash,
    /// The partition log's own checkpoint origin (`-` while the partition has no store).
    pub origin: String,
}

/// The signed content of a cross-partition checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossCheckpoint {
    pub origin: String,
    /// One per partition, in partition order.
    pub heads: Vec<PartitionHead>,
}

impl CrossCheckpoint {
    /// The note body, ending in a newline.
    pub fn body(&self) -> String {
        let mut body = format!("{}\n{}\n", self.origin, self.heads.len());
        for head in &self.heads {
            body.push_str(&format!(
                "{} {} {} {}\n",
                head.partition,
                head.size,
                B64.encode(head.root),
                head.origin
            ));
        }
        body
    }

    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let bad = |what: String| NoteError::Body(what);
        let mut lines = body.strip_suffix('\n').unwrap_or(body).split('\n');
        let origin = lines
            .next()
            .filter(|origin| !origin.is_empty())
            .ok_or_else(|| bad("empty origin".into()))?;
        let count: usize = lines
            .next()
            .and_then(|count| count.parse().ok())
            .ok_or_else(|| bad("the second line is not the partition count".into()))?;
        let mut heads = Vec::new();
        for (position, line) in lines.enumerate() {
            let fields: Vec<&str> = line.split(' ').collect();
            let [partition, size, root, origin] = fields.as_slice() else {
                return Err(bad(format!(
                    "head line `{line}` is not `<partition> <size> <root> <origin>`"
                )));
            };
            let partition: u32 = partition
                .parse()
                .map_err(|_| bad(format!("partition `{partition}` is not a number")))?;
            if partition as usize != position {
                return Err(bad(format!("head line {position} names partition {partition}")));
            }
            heads.push(PartitionHead {
                partition,
                size: size
                    .parse()
                    .map_err(|_| bad(format!("size `{size}` is not a number")))?,
                root: B64
                    .decode(root)
                    .ok()
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| bad(format!("root `{root}` is not a base64 SHA-256 hash")))?,
                origin: (*origin).to_owned(),
            });
        }
        if heads.len() != count {
            return Err(bad(format!(
                "{count} partitions announced, {} heads listed",
                heads.len()
            )));
        }
        Ok(Self {
            origin: origin.to_owned(),
            heads,
        })
    }
}

/// Verifies a cross-partition checkpoint note against `key`.
pub fn verify_cross_checkpoint(note: &str, key: &NoteKey) -> Result<CrossCheckpoint, NoteError> {
    CrossCheckpoint::parse_body(verify_note(note, key)?)
}

/// One line of `partitions.ndjson`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossLine {
    pub note: String,
}

/// The latest checkpoint of partition `partition`'s log, checked against its published
/// key; an empty head when the partition has no store or no checkpoint yet.
pub fn latest_head(data: &Path, partition: u32) -> Result<PartitionHead, StoreError> {
    let dir = PartitionSet::store_dir(data, partition);
    let info = match StoreInfo::open(&dir, false) {
        Ok(info) => info,
        Err(StoreError::NotAStore(_)) => {
            return Ok(PartitionHead {
                partition,
                size: 0,
                root: crate::merkle::empty_root(),
                origin: "-".into(),
            });
        }
        Err(error) => return Err(error),
    };
    let paths = LogPaths::new(&dir, crate::DEFAULT_LOG_ID);
    let origin = format!("custos/{}/{}", info.store_id, crate::DEFAULT_LOG_ID);
    let empty = PartitionHead {
        partition,
        size: 0,
        root: crate::merkle::empty_root(),
        origin: origin.clone(),
    };
    if !paths.public_key.exists() {
        return Ok(empty);
    }
    let key = NoteKey::parse_verifier(&fs_err::read_to_string(&paths.public_key)?)?;
    // The writer may be appending a line as this reads: a torn last line is skipped.
    let text = fs_err::read_to_string(&paths.checkpoints).unwrap_or_default();
    let Some(line) = text
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<CheckpointLine>(line).ok())
    else {
        return Ok(empty);
    };
    let checkpoint = verify_checkpoint(&line.note, &key)?;
    if checkpoint.origin != origin {
        return Err(StoreError::Tamper(format!(
            "partition {partition}'s checkpoint names origin `{}`, not `{origin}`",
            checkpoint.origin
        )));
    }
    Ok(PartitionHead {
        partition,
        size: checkpoint.size,
        root: checkpoint.root,
        origin,
    })
}

/// Signs cross-partition checkpoints for the set at `data`: one whenever a partition's
/// latest checkpoint changed. One process signs at a time (the writer of partition 0).
pub struct CrossSigner {
    data: PathBuf,
    set: PartitionSet,
    key: custos_event::AgentKey,
    last: Option<Vec<PartitionHead>>,
}

impl CrossSigner {
    /// Opens the set's key (creating it and `partitions.pub` on first use).
    pub fn open(data: &Path, set: PartitionSet) -> Result<Self, StoreError> {
        let key = crate::keyfile::load_or_create(&PartitionSet::key_path(data))?;
        let note_key = NoteKey {
            name: set.origin(),
            public: key.public_key(),
        };
        let public = PartitionSet::public_key_path(data);
        if !public.exists() {
            fs_err::write(&public, format!("{}\n", note_key.verifier_string()))?;
        }
        let last = read_ndjson::<CrossLine>(&PartitionSet::checkpoints_path(data))
            .ok()
            .and_then(|lines| lines.last().cloned())
            .and_then(|line| verify_cross_checkpoint(&line.note, &note_key).ok())
            .map(|checkpoint| checkpoint.heads);
        Ok(Self {
            data: data.to_owned(),
            set,
            key,
            last,
        })
    }

    /// Reads every partition's latest checkpoint; when any moved, signs and appends a
    /// cross-partition checkpoint (fsynced) and answers it.
    pub fn tick(&mut self) -> Result<Option<CrossCheckpoint>, StoreError> {
        let heads = (0..self.set.partitions)
            .map(|partition| latest_head(&self.data, partition))
            .collect::<Result<Vec<_>, _>>()?;
        if self.last.as_ref() == Some(&heads) {
            return Ok(None);
        }
        // Never bind a head smaller than one bound before (a partition being recovered
        // shows its older checkpoint until it signs a new one).
        if let Some(last) = &self.last
            && heads.iter().zip(last).any(|(head, old)| head.size < old.size)
        {
            return Ok(None);
        }
        let checkpoint = CrossCheckpoint {
            origin: self.set.origin(),
            heads,
        };
        let note = sign_note(&checkpoint.body(), &checkpoint.origin, &self.key);
        append_ndjson(&PartitionSet::checkpoints_path(&self.data), &CrossLine { note })?;
        self.last = Some(checkpoint.heads.clone());
        Ok(Some(checkpoint))
    }
}

/// The latest cross-partition checkpoint that binds a non-empty head of `partition` no
/// larger than `size`: (its note, the bound head). `None` when there is none yet.
pub fn latest_binding(data: &Path, partition: u32, size: u64) -> Result<Option<(String, PartitionHead)>, StoreError> {
    let path = PartitionSet::checkpoints_path(data);
    if !path.exists() {
        return Ok(None);
    }
    let key = NoteKey::parse_verifier(&fs_err::read_to_string(PartitionSet::public_key_path(data))?)?;
    // The signer may be appending as this reads: a torn last line is skipped.
    let text = fs_err::read_to_string(&path)?;
    for line in text.lines().rev() {
        let Ok(line) = serde_json::from_str::<CrossLine>(line) else {
            continue;
        };
        let Ok(checkpoint) = verify_cross_checkpoint(&line.note, &key) else {
            continue;
        };
        if let Some(head) = checkpoint.heads.get(partition as usize)
            && head.size > 0
            && head.size <= size
        {
            return Ok(Some((line.note, head.clone())));
        }
    }
    Ok(None)
}

/// One problem with the partition set, in the shape of [`crate::verify::Problem`].
fn problem(code: &'static str, row: Option<u64>, detail: String) -> crate::verify::Problem {
    crate::verify::Problem {
        code,
        log_id: "partitions".into(),
        file: "partitions.ndjson".into(),
        row,
        log_index: None,
        detail,
    }
}

/// Checks the cross-partition checkpoints of the set at `data` against the partitions'
/// own checkpoints (each partition's log verified separately, with its checkpoints
/// against its recomputed tree). `key` pins the set's verifier key; otherwise the
/// published `partitions.pub` is used. Answers the problems and the number of
/// checkpoints checked.
pub fn verify_cross(
    data: &Path,
    set: &PartitionSet,
    key: Option<&str>,
) -> Result<(Vec<crate::verify::Problem>, usize), StoreError> {
    let published = PartitionSet::public_key_path(data);
    let key_text = match key {
        Some(key) => key.to_owned(),
        None if !published.exists() && !PartitionSet::checkpoints_path(data).exists() => return Ok((Vec::new(), 0)),
        None => fs_err::read_to_string(&published)?,
    };
    let key = NoteKey::parse_verifier(&key_text)?;
    let mut problems = Vec::new();
    if key.name != set.origin() {
        problems.push(problem(
            "cross_origin",
            None,
            format!(
                "the verifier key is named `{}`, the set's origin is `{}`",
                key.name,
                set.origin()
            ),
        ));
    }
    // Each partition's checkpoints, by size, as its own key signed them.
    let mut signed: Vec<BTreeMap<u64, Hash>> = Vec::new();
    let mut origins = Vec::new();
    for partition in 0..set.partitions {
        let dir = PartitionSet::store_dir(data, partition);
        let mut sizes = BTreeMap::new();
        let mut origin = String::new();
        if let Ok(info) = StoreInfo::open(&dir, false) {
            origin = format!("custos/{}/{}", info.store_id, crate::DEFAULT_LOG_ID);
            let paths = LogPaths::new(&dir, crate::DEFAULT_LOG_ID);
            if let Ok(text) = fs_err::read_to_string(&paths.public_key)
                && let Ok(log_key) = NoteKey::parse_verifier(&text)
            {
                for line in read_ndjson::<CheckpointLine>(&paths.checkpoints).unwrap_or_default() {
                    if let Ok(Checkpoint { size, root, .. }) = verify_checkpoint(&line.note, &log_key) {
                        sizes.insert(size, root);
                    }
                }
            }
        }
        signed.push(sizes);
        origins.push(origin);
    }
    let path = PartitionSet::checkpoints_path(data);
    let lines = match path.exists() {
        true => read_ndjson::<CrossLine>(&path)?,
        false => Vec::new(),
    };
    let mut previous: Option<Vec<u64>> = None;
    for (row, line) in lines.iter().enumerate() {
        let row = Some(row as u64);
        let checkpoint = match verify_cross_checkpoint(&line.note, &key) {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                problems.push(problem("cross_signature", row, error.to_string()));
                continue;
            }
        };
        if checkpoint.origin != set.origin() {
            problems.push(problem(
                "cross_origin",
                row,
                format!("origin `{}`, expected `{}`", checkpoint.origin, set.origin()),
            ));
        }
        if checkpoint.heads.len() != set.partitions as usize {
            problems.push(problem(
                "cross_partitions",
                row,
                format!(
                    "binds {} partitions; the set has {}",
                    checkpoint.heads.len(),
                    set.partitions
                ),
            ));
            continue;
        }
        for head in &checkpoint.heads {
            let partition = head.partition as usize;
            if head.size == 0 {
                continue;
            }
            if head.origin != origins[partition] {
                problems.push(problem(
                    "cross_head",
                    row,
                    format!(
                        "partition {} is bound with origin `{}`; its store's is `{}`",
                        head.partition, head.origin, origins[partition]
                    ),
                ));
                continue;
            }
            match signed[partition].get(&head.size) {
                Some(root) if *root == head.root => {}
                Some(_) => problems.push(problem(
                    "cross_head",
                    row,
                    format!(
                        "partition {}'s checkpoint at size {} has another root than the one bound",
                        head.partition, head.size
                    ),
                )),
                None => problems.push(problem(
                    "cross_head",
                    row,
                    format!(
                        "partition {}'s log has no checkpoint at the bound size {} (its largest is {}): entries or checkpoints were removed",
                        head.partition,
                        head.size,
                        signed[partition].keys().next_back().copied().unwrap_or(0)
                    ),
                )),
            }
        }
        let sizes: Vec<u64> = checkpoint.heads.iter().map(|head| head.size).collect();
        if let Some(previous) = &previous
            && let Some((partition, _)) = sizes
                .iter()
                .zip(previous)
                .enumerate()
                .find(|(_, (now, before))| now < before)
        {
            problems.push(problem(
                "cross_order",
                row,
                format!("partition {partition}'s bound size goes back from the previous line's"),
            ));
        }
        previous = Some(sizes);
    }
    Ok((problems, lines.len()))
}
