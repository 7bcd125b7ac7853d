//! The sealed part of a store, copied to object storage, and read back to verify it.
//!
//! ```text
//!  DATA/ (one store, or a partition set) ──sync every few seconds──▶ <url>/
//!    store.json, partitions.json/.pub/.ndjson      as they are
//!    logs/<id>/checkpoint.pub                      as it is
//!    logs/<id>/segments/*.parquet(.seqs)           once each (sealed files never change)
//!    logs/<id>/segments.ndjson                     after its segments
//!    logs/<id>/checkpoints.ndjson                  lines up to the sealed size only
//!  never copied: keys, tokens, the WAL, LOCK, caches, forensics
//! ```
//!
//! The copy is a store without a WAL: `custos verify <url>` downloads it and checks it
//! like any store. Uploads are ordered so that a reader never finds a manifest line
//! whose segment is missing, nor a checkpoint beyond the sealed entries. `url` is
//! `file:///dir` or `s3://bucket/prefix`; S3 settings (endpoint, region, credentials)
//! come from the usual `AWS_*` environment variables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _};

use crate::log::{CheckpointLine, SegmentInfo, read_ndjson};
use crate::partitions::CrossCheckpoint;
use crate::{LogPaths, StoreError};

/// A file's length and modification time, and the basis its copy was cut at.
type Stamp = (u64, Option<std::time::SystemTime>, u64);

/// An object store and the prefix the store's files go under.
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    /// What was uploaded, by relative path: its length and modification time then, and
    /// the basis its copy was cut at (see [`Archive::sync_file`]).
    uploaded: HashMap<String, Stamp>,
    /// The sealed files (segments, seq indexes) already in the object store when this
    /// process first synced, by relative path, with their sizes: a restarted writer
    /// does not upload them again.
    present: Option<HashMap<String, u64>>,
    /// How many lines of `partitions.ndjson` the copy holds.
    cross_lines: usize,
}

impl Archive {
    /// Opens `url` (`file:///dir`, `s3://bucket/prefix`).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, &[])
    }

    /// [`Archive::open`], with S3 settings given as `AWS_*` names and values on top of
    /// the environment's.
    pub fn open_with(url: &str, settings: &[(&str, &str)]) -> Result<Self, StoreError> {
        let parsed =
            url::Url::parse(url).map_err(|error| StoreError::Internal(format!("`{url}` is not a URL: {error}")))?;
        let (store, prefix): (Arc<dyn ObjectStore>, ObjectPath) = match parsed.scheme() {
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| StoreError::Internal(format!("`{url}` is not a local path")))?;
                fs_err::create_dir_all(&dir)?;
                (
                    Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?),
                    ObjectPath::default(),
                )
            }
            "s3" => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                for (name, value) in settings {
                    let key: object_store::aws::AmazonS3ConfigKey = name.to_ascii_lowercase().parse()?;
                    builder = builder.with_config(key, *value);
                }
                let store = builder.build()?;
                (Arc::new(store), ObjectPath::from(parsed.path().trim_start_matches('/')))
            }
            other => {
                return Err(StoreError::Internal(format!(
                    "object store `{url}`: the scheme `{other}` is not supported (use file:// or s3://)"
                )));
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| StoreError::Internal(format!("cannot start the upload runtime: {error}")))?;
        Ok(Self {
            store,
            prefix,
            runtime,
            uploaded: HashMap::new(),
            present: None,
            cross_lines: 0,
        })
    }

    fn location(&self, relative: &str) -> ObjectPath {
        relative
            .split('/')
            .fold(self.prefix.clone(), |path, part| path.clone().join(part))
    }

    /// Writes one object at `relative` under the prefix.
    pub fn put(&mut self, relative: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let location = self.location(relative);
        let store = self.store.clone();
        self.runtime
            .block_on(async move { store.put(&location, bytes.into()).await })?;
        Ok(())
    }

    /// Uploads `file` (at `relative` under the prefix) if it changed since its last
    /// upload, or if `basis` did; `contents` turns its bytes into what is uploaded.
    /// Answers whether it did.
    ///
    /// `basis` is what `contents` cuts the file at (the segments read, the end of the
    /// last sealed one): a file copied cut at an older basis is copied again once the
    /// basis moves, even if the file itself did not change since. (Without it, a
    /// checkpoint list read just after a seal was copied without the seal's checkpoint,
    /// and never again, as the file did not change after.)
    fn sync_file(
        &mut self,
        file: &Path,
        relative: &str,
        basis: u64,
        contents: impl FnOnce(Vec<u8>) -> Vec<u8>,
    ) -> Result<bool, StoreError> {
        let Ok(metadata) = fs_err::metadata(file) else {
            return Ok(false);
        };
        let stamp = (metadata.len(), metadata.modified().ok(), basis);
        if self.uploaded.get(relative) == Some(&stamp) {
            return Ok(false);
        }
        let bytes = fs_err::read(file)?;
        self.put(relative, contents(bytes))?;
        self.uploaded.insert(relative.to_owned(), stamp);
        Ok(true)
    }

    /// Copies what changed in the store (or partition set) at `data`; answers how many
    /// files were uploaded.
    pub fn sync(&mut self, data: &Path) -> Result<usize, StoreError> {
        self.sync_held(data, None)
    }

    /// As [`Archive::sync`]; of a partition set, with `held`, only the partitions in it
    /// (those this process writes), and the set's own files only with partition 0 (whose
    /// writer signs the cross-partition checkpoints). So writer processes sharing a set
    /// never upload one file from two states: a stale manifest or checkpoint list can
    /// never replace a newer one.
    pub fn sync_held(
        &mut self,
        data: &Path,
        held: Option<&std::collections::BTreeSet<u32>>,
    ) -> Result<usize, StoreError> {
        let mut count = 0;
        let binds = held.is_none_or(|held| held.contains(&0));
        if binds {
            for name in ["partitions.json", "partitions.pub"] {
                count += usize::from(self.sync_file(&data.join(name), name, 0, |bytes| bytes)?);
            }
        }
        for (store, relative, partition) in stores(data) {
            if partition.is_some_and(|partition| held.is_some_and(|held| !held.contains(&partition))) {
                continue;
            }
            count += self.sync_store(&store, &relative)?;
        }
        if binds {
            count += usize::from(self.sync_cross_checkpoints(data)?);
        }
        Ok(count)
    }

    /// Copies the cross-partition checkpoints (`partitions.ndjson`) whose every bound
    /// head is in the copy already: its partition's checkpoint of that size (whoever
    /// copies that partition). So a copy never binds a head it does not hold, and
    /// `custos verify` of the copy finds nothing missing that is merely not copied yet.
    /// Answers whether it uploaded.
    fn sync_cross_checkpoints(&mut self, data: &Path) -> Result<bool, StoreError> {
        use crate::partitions::{CrossLine, PartitionSet, verify_cross_checkpoint};
        let path = PartitionSet::checkpoints_path(data);
        let Ok(bytes) = fs_err::read(&path) else {
            return Ok(false);
        };
        let key_text = fs_err::read_to_string(PartitionSet::public_key_path(data))?;
        let key = crate::checkpoint::NoteKey::parse_verifier(key_text.trim())
            .map_err(|error| StoreError::Tamper(format!("`partitions.pub`: {error}")))?;
        // Only the lines after those already copied are read (and their signatures
        // checked): the file grows by a line a second while heads move.
        let lines: Vec<CrossCheckpoint> = bytes
            .split_inclusive(|byte| *byte == b'\n')
            .filter(|line| line.ends_with(b"\n"))
            .skip(self.cross_lines)
            .map_while(|line| {
                let line: CrossLine = serde_json::from_slice(line).ok()?;
                verify_cross_checkpoint(&line.note, &key).ok()
            })
            .collect();
        if lines.is_empty() {
            return Ok(false);
        }
        // What the copy holds of each partition: its largest copied checkpoint.
        let partitions = lines.iter().map(|line| line.heads.len()).max().unwrap_or(0);
        let copied = (0..partitions)
            .map(|partition| self.copied_checkpoint_size(partition))
            .collect::<Result<Vec<u64>, StoreError>>()?;
        let newly = lines
            .iter()
            .take_while(|line| {
                line.heads.iter().all(|head| {
                    head.size == 0
                        || copied
                            .get(head.partition as usize)
                            .is_some_and(|size| head.size <= *size)
                })
            })
            .count();
        if newly == 0 {
            return Ok(false);
        }
        let covered = self.cross_lines + newly;
        self.put("partitions.ndjson", keep_lines(&bytes, covered, |_| true))?;
        self.cross_lines = covered;
        Ok(true)
    }

    /// The largest checkpoint size of partition `partition` in the copy (0 for none).
    fn copied_checkpoint_size(&self, partition: usize) -> Result<u64, StoreError> {
        let location = self.location(&format!("partitions/{partition}/logs/0/checkpoints.ndjson"));
        let store = self.store.clone();
        let fetched = self
            .runtime
            .block_on(async move { store.get(&location).await?.bytes().await });
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(object_store::Error::NotFound { .. }) => return Ok(0),
            Err(error) => return Err(error.into()),
        };
        Ok(bytes
            .split(|byte| *byte == b'\n')
            .filter_map(|line| serde_json::from_slice::<CheckpointLine>(line).ok())
            .map(|line| line.size)
            .max()
            .unwrap_or(0))
    }

    fn sync_store(&mut self, store: &Path, relative: &str) -> Result<usize, StoreError> {
        let join = |name: &str| match relative.is_empty() {
            true => name.to_owned(),
            false => format!("{relative}/{name}"),
        };
        let mut count = usize::from(self.sync_file(&store.join("store.json"), &join("store.json"), 0, |bytes| bytes)?);
        let Ok(info) = crate::StoreInfo::open(store, false) else {
            return Ok(count);
        };
        for log_id in &info.logs {
            let paths = LogPaths::new(store, log_id);
            let base = join(&format!("logs/{log_id}"));
            count +=
                usize::from(self.sync_file(&paths.public_key, &format!("{base}/checkpoint.pub"), 0, |bytes| bytes)?);
            // Segments first (each once: sealed files never change), then the manifest.
            let segments: Vec<SegmentInfo> = match paths.manifest.exists() {
                true => read_ndjson(&paths.manifest)?,
                false => Vec::new(),
            };
            for segment in &segments {
                for file in [segment.file.clone(), format!("{}.seqs", segment.file)] {
                    let relative = format!("{base}/segments/{file}");
                    if self.uploaded.contains_key(&relative) {
                        continue;
                    }
                    let local = paths.segment_dir.join(&file);
                    if self.already_there(&relative, &local)? {
                        let stamp =
                            fs_err::metadata(&local).map(|metadata| (metadata.len(), metadata.modified().ok(), 0))?;
                        self.uploaded.insert(relative, stamp);
                        continue;
                    }
                    count += usize::from(self.sync_file(&local, &relative, 0, |bytes| bytes)?);
                }
            }
            let manifest_lines = segments.len();
            count += usize::from(self.sync_file(
                &paths.manifest,
                &format!("{base}/segments.ndjson"),
                manifest_lines as u64,
                |bytes| {
                    // Only the lines whose segments were read above (one may have been sealed since).
                    keep_lines(&bytes, manifest_lines, |_| true)
                },
            )?);
            let sealed = segments.last().map_or(0, |segment| segment.end_index);
            count += usize::from(self.sync_file(
                &paths.checkpoints,
                &format!("{base}/checkpoints.ndjson"),
                sealed,
                |bytes| {
                    keep_lines(&bytes, usize::MAX, |line| {
                        serde_json::from_slice::<CheckpointLine>(line).is_ok_and(|line| line.size <= sealed)
                    })
                },
            )?);
        }
        Ok(count)
    }

    /// Whether the sealed file `local` is in the object store at `relative` already, whole
    /// (an upload is atomic, and a sealed file never changes: the same size is the same
    /// file; should it not be, a reader finds its blake3 differs from the signed
    /// manifest line). The store is listed once, at the first sync.
    fn already_there(&mut self, relative: &str, local: &Path) -> Result<bool, StoreError> {
        if self.present.is_none() {
            let skip = self.prefix.as_ref().split('/').filter(|part| !part.is_empty()).count();
            let present = self
                .list()?
                .into_iter()
                .filter(|object| sealed(object.location.as_ref()))
                .map(|object| {
                    let relative: Vec<&str> = object.location.as_ref().split('/').skip(skip).collect();
                    (relative.join("/"), object.size)
                })
                .collect();
            self.present = Some(present);
        }
        let Some(size) = self.present.as_ref().and_then(|present| present.get(relative)) else {
            return Ok(false);
        };
        Ok(fs_err::metadata(local).is_ok_and(|metadata| metadata.len() == *size))
    }

    /// Every object under the prefix.
    fn list(&self) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        use futures::TryStreamExt as _;
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        Ok(self
            .runtime
            .block_on(async { store.list(Some(&prefix)).try_collect().await })?)
    }

    /// Every object under the prefix, with where it goes under `dir`: sealed files
    /// (segments and their seq indexes) first.
    fn listing(&self, dir: &Path) -> Result<Vec<(object_store::ObjectMeta, PathBuf)>, StoreError> {
        let mut objects = self.list()?;
        objects.sort_by_key(|object| !sealed(object.location.as_ref()));
        let skip = self.prefix.as_ref().split('/').filter(|part| !part.is_empty()).count();
        Ok(objects
            .into_iter()
            .map(|object| {
                let relative: PathBuf = object.location.as_ref().split('/').skip(skip).collect();
                let target = dir.join(relative);
                (object, target)
            })
            .collect())
    }

    /// Copies one object to `target`, replacing it whole (written aside, then renamed).
    fn fetch(&self, object: &object_store::ObjectMeta, target: &Path) -> Result<(), StoreError> {
        if let Some(parent) = target.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let store = self.store.clone();
        let location = object.location.clone();
        let bytes = self
            .runtime
            .block_on(async move { store.get(&location).await?.bytes().await })?;
        crate::write_atomic(target, &bytes)?;
        Ok(())
    }

    /// Brings `dir` up to date with the copy (for a query node): segment files once (they
    /// never change), other files whenever their size changed; segments before the
    /// manifests that list them, so a reader never sees a torn file or a listed segment
    /// that is missing. Answers how many files it wrote.
    pub fn refresh(&self, dir: &Path) -> Result<usize, StoreError> {
        let mut written = 0;
        for (object, target) in self.listing(dir)? {
            let here = fs_err::metadata(&target).ok().map(|metadata| metadata.len());
            if here == Some(object.size) {
                continue;
            }
            if here.is_some() && sealed(object.location.as_ref()) {
                return Err(StoreError::Tamper(format!(
                    "`{}` changed size in the object store; sealed files never change",
                    object.location
                )));
            }
            self.fetch(&object, &target)?;
            written += 1;
        }
        Ok(written)
    }

    /// Downloads everything under the prefix into `dir` (for `custos verify <url>`).
    pub fn download(&self, dir: &Path) -> Result<usize, StoreError> {
        let listing = self.listing(dir)?;
        for (object, target) in &listing {
            self.fetch(object, target)?;
        }
        Ok(listing.len())
    }
}

/// A sealed file (a segment or its seq index): written once, never changed.
fn sealed(name: &str) -> bool {
    name.ends_with(".parquet") || name.ends_with(".parquet.seqs")
}

/// The first `limit` lines of `bytes` that `keep` accepts (each with its newline); a
/// torn last line is dropped.
fn keep_lines(bytes: &[u8], limit: usize, keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    for line in bytes.split_inclusive(|byte| *byte == b'\n').take(limit) {
        if line.ends_with(b"\n") && keep(&line[..line.len() - 1]) {
            out.extend_from_slice(line);
        }
    }
    out
}

/// The stores under `data`: itself, or each partition's store, with their paths
/// relative to `data`.
fn stores(data: &Path) -> Vec<(PathBuf, String, Option<u32>)> {
    if data.join("store.json").exists() {
        return vec![(data.to_owned(), String::new(), None)];
    }
    let Ok(Some(set)) = crate::partitions::PartitionSet::open(data) else {
        return Vec::new();
    };
    (0..set.partitions)
        .map(|partition| {
            (
                crate::partitions::PartitionSet::store_dir(data, partition),
                format!("partitions/{partition}"),
                Some(partition),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Of a partition set, a writer uploads only the partitions it holds, and the set's
    /// own files only with partition 0.
    #[test]
    fn a_writer_uploads_only_the_partitions_it_holds() {
        let data = tempfile::tempdir().unwrap();
        let bucket = tempfile::tempdir().unwrap();
        crate::partitions::PartitionSet::open_or_create(data.path(), 2).unwrap();
        for partition in 0..2 {
            let store = crate::partitions::PartitionSet::store_dir(data.path(), partition);
            fs_err::create_dir_all(&store).unwrap();
            fs_err::write(store.join("store.json"), format!("partition {partition}")).unwrap();
        }
        let url = format!("file://{}", bucket.path().display());
        let mut second = Archive::open(&url).unwrap();
        assert_eq!(second.sync_held(data.path(), Some(&[1].into())).unwrap(), 1);
        assert!(bucket.path().join("partitions/1/store.json").exists());
        assert!(!bucket.path().join("partitions/0/store.json").exists());
        assert!(!bucket.path().join("partitions.json").exists());
        let mut first = Archive::open(&url).unwrap();
        assert_eq!(first.sync_held(data.path(), Some(&[0].into())).unwrap(), 2);
        assert!(bucket.path().join("partitions.json").exists());
        assert!(bucket.path().join("partitions/0/store.json").exists());
        // Without a held set (one process writes them all): everything.
        let mut all = Archive::open(&format!("file://{}", bucket.path().join("all").display())).unwrap();
        assert_eq!(all.sync(data.path()).unwrap(), 3);
    }

    /// A checkpoint list read just after a seal holds the seal's checkpoint before the
    /// manifest read a moment earlier holds its segment: the copy leaves the checkpoint
    /// out (it would name entries not copied). Once the segment is copied, the list is
    /// copied again with it, though the list itself did not change since.
    #[test]
    fn a_checkpoint_left_out_for_its_segment_is_copied_with_it() {
        let data = tempfile::tempdir().unwrap();
        let bucket = tempfile::tempdir().unwrap();
        let paths = LogPaths::new(data.path(), crate::DEFAULT_LOG_ID);
        fs_err::create_dir_all(&paths.segment_dir).unwrap();
        let info = serde_json::json!({"format": 1, "store_id": "s", "logs": [crate::DEFAULT_LOG_ID]});
        fs_err::write(data.path().join("store.json"), info.to_string()).unwrap();
        let segment = |file: &str, first: u64, end: u64| {
            fs_err::write(paths.segment_dir.join(file), file).unwrap();
            let line = SegmentInfo {
                file: file.into(),
                first_index: first,
                end_index: end,
                bytes: 1,
                blake3: String::new(),
                sealed_at: String::new(),
                sig: String::new(),
            };
            format!("{}\n", serde_json::to_string(&line).unwrap())
        };
        let first = segment("a.parquet", 0, 10);
        fs_err::write(&paths.manifest, &first).unwrap();
        let checkpoints = [10, 20]
            .map(|size| format!("{}\n", serde_json::json!({"size": size, "note": format!("n{size}")})))
            .concat();
        fs_err::write(&paths.checkpoints, checkpoints).unwrap();
        let copied = || {
            let text = fs_err::read_to_string(bucket.path().join("logs/0/checkpoints.ndjson")).unwrap();
            text.lines()
                .map(|line| serde_json::from_str::<CheckpointLine>(line).unwrap().size)
                .collect::<Vec<u64>>()
        };
        let mut archive = Archive::open(&format!("file://{}", bucket.path().display())).unwrap();
        archive.sync(data.path()).unwrap();
        assert_eq!(copied(), [10], "a checkpoint past the copied segments is left out");
        // The seal's manifest line lands; the checkpoint list stays as it was.
        let second = segment("b.parquet", 10, 20);
        fs_err::write(&paths.manifest, format!("{first}{second}")).unwrap();
        archive.sync(data.path()).unwrap();
        assert_eq!(copied(), [10, 20], "copied with its segment");
        assert!(bucket.path().join("logs/0/segments/b.parquet").exists());
    }

    #[test]
    fn refresh_copies_what_changed_and_refuses_a_changed_segment() {
        let source = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let segments = source.path().join("logs/0/segments");
        fs_err::create_dir_all(&segments).unwrap();
        fs_err::write(segments.join("000.parquet"), b"segment").unwrap();
        fs_err::write(source.path().join("logs/0/segments.ndjson"), b"{}\n").unwrap();
        let archive = Archive::open(&format!("file://{}", source.path().display())).unwrap();
        assert_eq!(archive.refresh(copy.path()).unwrap(), 2);
        assert_eq!(
            fs_err::read(copy.path().join("logs/0/segments/000.parquet")).unwrap(),
            b"segment"
        );
        // Nothing changed: nothing is copied again.
        assert_eq!(archive.refresh(copy.path()).unwrap(), 0);
        // The manifest grew: it alone is copied.
        fs_err::write(source.path().join("logs/0/segments.ndjson"), b"{}\n{}\n").unwrap();
        assert_eq!(archive.refresh(copy.path()).unwrap(), 1);
        // A sealed file that changed is tampering, named.
        fs_err::write(segments.join("000.parquet"), b"segment, rewritten").unwrap();
        let error = archive.refresh(copy.path()).unwrap_err().to_string();
        assert!(
            error.contains("000.parquet") && error.contains("never change"),
            "{error}"
        );
    }
}
