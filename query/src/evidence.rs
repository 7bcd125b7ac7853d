//! Evidence bundles: export a realm's (or an agent's) entries over a time range with
//! everything a third party needs to check them offline, and the offline check itself.
//! The format is the contract in `docs/evidence-format.md`.
//!
//! ```text
//!  export: scoped select (events, findings, actions in [from, to)) ─▶ checkpoint signed now
//!          ─▶ inclusion proof per entry ─▶ consistency proof from the first covering
//!          checkpoint ─▶ Parquet + JSON files ─▶ manifest (blake3 of every file) signed by
//!          the node key ─▶ tar
//!  verify: tar ─▶ manifest signature ─▶ file set and digests ─▶ checkpoint signatures and
//!          consistency ─▶ per row: agent signature, payload digest, leaf hash, inclusion
//!          proof, realm and time range ─▶ counts ─▶ verdict, every problem named
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;

use chrono::{DateTime, Utc};
use custos_event::{ACTION_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE, Envelope, FINDING_PAYLOAD_TYPE};
use custos_store::LogEntry;
use custos_store::checkpoint::{NoteKey, verify_checkpoint};
use custos_store::merkle::{Hash, verify_consistency, verify_inclusion};
use datafusion::logical_expr::{col, lit};
use serde::{Deserialize, Serialize};

use crate::QueryError;
use crate::source::Source;
use crate::tables::{Scope, Sources};

/// DSSE payload type of a bundle manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.custos.evidence-manifest+json";
/// The format this code writes and reads.
pub const FORMAT: &str = "custos-evidence/1";
/// Most entries one bundle holds.
pub const MAX_ENTRIES: usize = 1_000_000;

const FILES: [(&str, &str); 3] = [
    ("events.parquet", EVENT_PAYLOAD_TYPE),
    ("findings.parquet", FINDING_PAYLOAD_TYPE),
    ("actions.parquet", ACTION_PAYLOAD_TYPE),
];

/// What to export.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    pub realm: String,
    #[serde(default)]
    pub agent: Option<String>,
    /// RFC 3339, inclusive, on each entry's `ts`.
    pub from: DateTime<Utc>,
    /// RFC 3339, exclusive.
    pub to: DateTime<Utc>,
}

/// The signed manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub created_at: String,
    /// Token id and role of whoever exported it.
    pub created_by: String,
    pub query: ExportRequest,
    pub log_id: String,
    pub origin: String,
    pub node_did: String,
    /// The checkpoint every inclusion proof is against.
    pub tree_size: u64,
    /// Rows per file.
    pub counts: BTreeMap<String, u64>,
    /// blake3 (lowercase hex) of every other file in the bundle.
    pub files: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointFile {
    pub size: u64,
    pub note: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InclusionLine {
    pub log_index: u64,
    pub tree_size: u64,
    pub leaf_hash: String,
    pub inclusion_path: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConsistencyFile {
    pub first_size: u64,
    pub second_size: u64,
    pub consistency_path: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Keys {
    pub node_did: String,
    pub log_verifier_key: String,
    pub log_id: String,
    pub origin: String,
    /// Every signer of an exported entry (its `did:key` is its public key).
    pub signers: Vec<String>,
}

/// `partitions.json`, in a bundle exported from partition `partition` of a partition set
/// (`--log-per-partition`): a cross-partition checkpoint binding this partition's head,
/// and a consistency proof from that head to the bundle's checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionsFile {
    pub set_id: String,
    pub partitions: u32,
    pub partition: u32,
    /// The set's verifier key (`custos/<set id>/partitions+<id>+<key>`).
    pub verifier_key: String,
    /// The cross-partition checkpoint, a signed note.
    pub note: String,
    /// This partition's size in that note.
    pub bound_size: u64,
    /// From `bound_size` to the manifest's `tree_size` (empty when they are equal).
    pub consistency_path: Vec<String>,
}

/// What an export produced.
pub struct Bundle {
    pub tar: Vec<u8>,
    pub manifest: Manifest,
}

const README: &str = "\
Custos evidence bundle (format custos-evidence/1)

Check it offline, without the server or its store:

    custos evidence verify bundle.tar --node-key did:key:z6Mk...

Pin --node-key to the node key you got out of band (custos serve prints it; so does
GET /v1/checkpoints/latest as node_did). Without it the bundle is checked against the key
it names itself, which proves integrity but not origin.

What is checked, and in what order:
1. manifest.json is a DSSE envelope signed by the node key; its payload lists the
   blake3 of every other file. A file missing, added or changed is named.
2. checkpoints.json: every note is signed by the log key in keys.json; consecutive
   checkpoints are consistent (proofs/consistency.json).
3. events.parquet, findings.parquet, actions.parquet: for every row, the ed25519
   signature by its keyid over the DSSE PAE, the payload's blake3, the RFC 9162 leaf
   hash, and its inclusion proof (proofs/inclusion.ndjson) against the last checkpoint.
   Every row lies in the exported realm and time range; counts match the manifest; every
   proof has its row.
4. ocsf.json is a rendering for SIEMs, covered by the manifest digest only.
5. partitions.json (a bundle from one partition of a partition set): the cross-partition
   checkpoint binding this partition is signed by the set's key (pin it with
   --partitions-key), its head is consistent with the bundle's checkpoint, and the realm
   belongs to this partition.

The byte-level format is docs/evidence-format.md in the Custos repository.
";

/// Which log entries to read: payload types, realms, agent, time range, cursor.
pub struct Selection {
    pub kinds: Vec<&'static str>,
    /// The realms allowed; every realm when `None`.
    pub realms: Option<Vec<String>>,
    pub agent: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Only entries after this log index.
    pub after: Option<u64>,
    /// Most entries; more is an error (`row_cap`) when `strict`, else a cut.
    pub limit: usize,
    pub strict: bool,
}

/// Reads the entries `selection` names from segments and the tail, oldest first.
pub async fn select(sources: &Sources, selection: &Selection) -> Result<Vec<LogEntry>, QueryError> {
    let ctx = datafusion::prelude::SessionContext::new();
    let plan = crate::tables::log_plan(sources, false).await?;
    let mut frame = datafusion::dataframe::DataFrame::new(ctx.state(), plan);
    let types = selection.kinds.iter().map(|kind| lit(*kind)).collect();
    frame = frame.filter(col("payload_type").in_list(types, false))?;
    if let Some(realms) = &selection.realms {
        let realms = realms.iter().map(|realm| lit(realm.clone())).collect();
        frame = frame.filter(col("realm").in_list(realms, false))?;
    }
    if let Some(agent) = &selection.agent {
        frame = frame.filter(col("agent").eq(lit(agent.clone())))?;
    }
    let micros = |at: &DateTime<Utc>| {
        lit(datafusion::common::ScalarValue::TimestampMicrosecond(
            Some(at.timestamp_micros()),
            Some("UTC".into()),
        ))
    };
    if let Some(from) = &selection.from {
        frame = frame.filter(col("ts").gt_eq(micros(from)))?;
    }
    if let Some(to) = &selection.to {
        frame = frame.filter(col("ts").lt(micros(to)))?;
    }
    if let Some(after) = selection.after {
        frame = frame.filter(col("log_index").gt(lit(after)))?;
    }
    frame = frame.sort(vec![col("log_index").sort(true, false)])?;
    if !selection.strict {
        frame = frame.limit(0, Some(selection.limit))?;
    }
    let answer = crate::sql::collect(frame, selection.limit).await?;
    let mut entries = Vec::with_capacity(answer.rows);
    for batch in &answer.batches {
        // The engine hands strings back as views; the row reader wants the segment schema.
        let batch = crate::tables::cast_to(batch, &custos_store::segment::schema())?;
        let view = custos_store::segment::BatchView::new(&batch)
            .map_err(|error| QueryError::internal(format!("reading log rows: {error}")))?;
        for row in 0..view.len() {
            let entry = view
                .entry(row)
                .map_err(|error| QueryError::internal(format!("reading log rows: {error}")))?;
            entries.push(entry.to_owned_entry());
        }
    }
    Ok(entries)
}

fn hex32(hash: &Hash) -> String {
    hex::encode(hash)
}

/// For a store that is one partition of a set: the latest cross-partition checkpoint
/// binding its head at or below `size`, with the consistency proof up to `size`.
async fn partitions_file(api: &dyn Source, size: u64) -> Result<Option<PartitionsFile>, QueryError> {
    use custos_store::partitions::{PartitionSet, latest_binding};
    let Some((data, set, partition)) = PartitionSet::of_store(api.data()) else {
        return Ok(None);
    };
    let binding = latest_binding(&data, partition, size)
        .map_err(|error| QueryError::internal(format!("reading the cross-partition checkpoints: {error}")))?;
    let Some((note, head)) = binding else {
        return Ok(None);
    };
    let verifier_key = std::fs::read_to_string(PartitionSet::public_key_path(&data))
        .map_err(|error| QueryError::internal(format!("reading partitions.pub: {error}")))?;
    let consistency_path = match head.size < size {
        true => api.consistency(head.size, size).await?["consistency_path"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|hash| hash.as_str().map(str::to_owned))
            .collect(),
        false => Vec::new(),
    };
    Ok(Some(PartitionsFile {
        set_id: set.set_id,
        partitions: set.partitions,
        partition,
        verifier_key: verifier_key.trim().to_owned(),
        note,
        bound_size: head.size,
        consistency_path,
    }))
}

/// Builds a bundle for `request` as `caller` sees it.
pub async fn export(
    api: &dyn Source,
    sources: &Sources,
    scope: &Scope,
    created_by: &str,
    request: ExportRequest,
) -> Result<Bundle, QueryError> {
    if !scope.sees(&request.realm) {
        return Err(QueryError::new(
            403,
            "forbidden",
            format!("this token may not read realm `{}`", request.realm),
        ));
    }
    if request.to <= request.from {
        return Err(QueryError::new(
            400,
            "bad_request",
            format!("`to` ({}) must be after `from` ({})", request.to, request.from),
        ));
    }
    let selection = Selection {
        kinds: FILES.iter().map(|(_, kind)| *kind).collect(),
        realms: Some(vec![request.realm.clone()]),
        agent: request.agent.clone(),
        from: Some(request.from),
        to: Some(request.to),
        after: None,
        limit: MAX_ENTRIES,
        strict: true,
    };
    let entries = select(sources, &selection).await?;
    let indexes: Vec<u64> = entries.iter().map(|entry| entry.log_index).collect();
    let proofs = api.evidence_proofs(indexes).await?;
    let log_id = proofs.log_id.clone();

    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for (name, kind) in FILES {
        let selected: Vec<&LogEntry> = entries.iter().filter(|entry| entry.payload_type == kind).collect();
        counts.insert(name.to_owned(), selected.len() as u64);
        let bytes = custos_store::segment::encode(&log_id, selected)
            .map_err(|error| QueryError::internal(format!("writing {name}: {error}")))?;
        files.insert(name.to_owned(), bytes);
    }

    // The first checkpoint already covering every exported entry, then the one just signed.
    let last = entries.last().map_or(0, |entry| entry.log_index + 1);
    let mut checkpoints = Vec::new();
    if let Some(covering) = sources
        .checkpoints
        .iter()
        .find(|line| line.size >= last && line.size > 0 && line.size < proofs.size)
    {
        checkpoints.push(CheckpointFile {
            size: covering.size,
            note: covering.note.clone(),
        });
    }
    checkpoints.push(CheckpointFile {
        size: proofs.size,
        note: proofs.note.clone(),
    });
    let mut consistency = Vec::new();
    for pair in checkpoints.windows(2) {
        let proof = api.consistency(pair[0].size, pair[1].size).await?;
        consistency.push(ConsistencyFile {
            first_size: pair[0].size,
            second_size: pair[1].size,
            consistency_path: proof["consistency_path"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|hash| hash.as_str().map(str::to_owned))
                .collect(),
        });
    }
    let mut inclusion = Vec::new();
    for (index, leaf, path) in &proofs.proofs {
        let line = InclusionLine {
            log_index: *index,
            tree_size: proofs.size,
            leaf_hash: hex32(leaf),
            inclusion_path: path.iter().map(hex32).collect(),
        };
        inclusion.extend(serde_json::to_vec(&line).map_err(|error| QueryError::internal(error.to_string()))?);
        inclusion.push(b'\n');
    }
    let signers: BTreeSet<String> = entries.iter().map(|entry| entry.keyid.clone()).collect();
    let keys = Keys {
        node_did: proofs.node_did.clone(),
        log_verifier_key: proofs.verifier_key.clone(),
        log_id: log_id.clone(),
        origin: proofs.origin.clone(),
        signers: signers.into_iter().collect(),
    };
    let json = |value: &dyn erased::Json| value.pretty();
    if let Some(partitions) = partitions_file(api, proofs.size).await? {
        files.insert("partitions.json".into(), json(&partitions)?);
    }
    files.insert("checkpoints.json".into(), json(&checkpoints)?);
    files.insert("proofs/inclusion.ndjson".into(), inclusion);
    files.insert("proofs/consistency.json".into(), json(&consistency)?);
    files.insert("keys.json".into(), json(&keys)?);
    files.insert("ocsf.json".into(), json(&crate::ocsf::render(&entries))?);
    files.insert("README.txt".into(), README.as_bytes().to_vec());

    let manifest = Manifest {
        format: FORMAT.into(),
        created_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        created_by: created_by.to_owned(),
        query: request,
        log_id,
        origin: proofs.origin.clone(),
        node_did: proofs.node_did.clone(),
        tree_size: proofs.size,
        counts,
        files: files
            .iter()
            .map(|(name, bytes)| (name.clone(), blake3::hash(bytes).to_hex().to_string()))
            .collect(),
    };
    let payload = serde_json::to_vec_pretty(&manifest).map_err(|error| QueryError::internal(error.to_string()))?;
    let envelope = api.sign(MANIFEST_PAYLOAD_TYPE, payload).await?;
    files.insert("manifest.json".into(), envelope.to_json().into_bytes());

    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in &files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, name, bytes.as_slice())
            .map_err(|error| QueryError::internal(format!("writing the bundle: {error}")))?;
    }
    let tar = builder
        .into_inner()
        .map_err(|error| QueryError::internal(format!("writing the bundle: {error}")))?;
    Ok(Bundle { tar, manifest })
}

mod erased {
    pub(super) trait Json {
        fn pretty(&self) -> Result<Vec<u8>, crate::QueryError>;
    }

    impl<T: serde::Serialize> Json for T {
        fn pretty(&self) -> Result<Vec<u8>, crate::QueryError> {
            serde_json::to_vec_pretty(self).map_err(|error| crate::QueryError::internal(error.to_string()))
        }
    }
}

/// The outcome of checking a bundle.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub manifest: Option<Manifest>,
    /// Rows checked per file.
    pub rows: BTreeMap<String, u64>,
    pub checkpoints: usize,
    /// For a bundle from a partition set: (its partition, the set's partition count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<(u32, u32)>,
    /// Every problem found, each naming its file and row or log index.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.manifest.is_some()
    }
}

/// `partitions.json` against the manifest: the set's signature on the cross-partition
/// checkpoint, this partition's bound head (same origin, consistent with the bundle's
/// checkpoint), and that the exported realm belongs to this partition by the realm rule
/// (so no other partition can hold its entries).
fn check_partitions(
    file: &PartitionsFile,
    manifest: &Manifest,
    root: Option<Hash>,
    pinned: Option<&str>,
    problems: &mut Vec<String>,
) {
    use custos_store::partitions::verify_cross_checkpoint;
    let key_text = pinned.unwrap_or(&file.verifier_key);
    if let Some(pinned) = pinned
        && pinned.trim() != file.verifier_key.trim()
    {
        problems.push(format!(
            "partitions.json: names set key {} but the pinned one is {pinned}",
            file.verifier_key
        ));
    }
    let key = match NoteKey::parse_verifier(key_text) {
        Ok(key) => key,
        Err(error) => {
            problems.push(format!("partitions.json: verifier_key: {error}"));
            return;
        }
    };
    let origin = format!("custos/{}/partitions", file.set_id);
    if key.name != origin {
        problems.push(format!(
            "partitions.json: the key is named `{}`, not `{origin}`",
            key.name
        ));
    }
    let checkpoint = match verify_cross_checkpoint(&file.note, &key) {
        Ok(checkpoint) => checkpoint,
        Err(error) => {
            problems.push(format!("partitions.json: the cross-partition checkpoint: {error}"));
            return;
        }
    };
    if checkpoint.origin != origin || checkpoint.heads.len() != file.partitions as usize {
        problems.push(format!(
            "partitions.json: the checkpoint is `{}` over {} partitions, not `{origin}` over {}",
            checkpoint.origin,
            checkpoint.heads.len(),
            file.partitions
        ));
        return;
    }
    let home = custos_event::partition_of(&manifest.query.realm, file.partitions);
    if home != file.partition {
        problems.push(format!(
            "partitions.json: realm `{}` belongs to partition {home}, but the bundle is from partition {}",
            manifest.query.realm, file.partition
        ));
    }
    let Some(head) = checkpoint.heads.get(file.partition as usize) else {
        problems.push(format!("partitions.json: no partition {}", file.partition));
        return;
    };
    if head.origin != manifest.origin || head.size != file.bound_size {
        problems.push(format!(
            "partitions.json: partition {} is bound as `{}` at size {}, the bundle is `{}` (bound size {})",
            file.partition, head.origin, head.size, manifest.origin, file.bound_size
        ));
        return;
    }
    let Some(root) = root else {
        return;
    };
    let path: Option<Vec<Hash>> = file.consistency_path.iter().map(|hash| decode_hash(hash)).collect();
    let consistent = match path {
        None => Err("a hash is not hex".to_owned()),
        Some(_) if head.size == manifest.tree_size => match head.root == root {
            true => Ok(()),
            false => Err("the bound root differs from the bundle's checkpoint at the same size".to_owned()),
        },
        Some(path) => verify_consistency(head.size, manifest.tree_size, &path, &head.root, &root)
            .map_err(|error| error.to_string()),
    };
    if let Err(error) = consistent {
        problems.push(format!(
            "partitions.json: the bound head (size {}) -> the bundle's checkpoint (size {}): {error}",
            head.size, manifest.tree_size
        ));
    }
}

fn decode_hash(text: &str) -> Option<Hash> {
    hex::decode(text).ok()?.try_into().ok()
}

/// Rows proven but missing that a report names one by one; the rest are counted.
const MISSING_NAMED: usize = 20;

/// Checks a bundle offline. `node_key`, when given, pins the key the manifest must be
/// signed by.
pub fn verify(bytes: &[u8], node_key: Option<&str>) -> Report {
    verify_pinned(bytes, node_key, None)
}

/// [`verify`], and for a bundle from a partition set, `partitions_key` pins the key its
/// cross-partition checkpoint must be signed by (the bundle must then carry one).
pub fn verify_pinned(bytes: &[u8], node_key: Option<&str>, partitions_key: Option<&str>) -> Report {
    let mut report = Report::default();
    let problems = &mut report.problems;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(bytes);
    match archive.entries() {
        Ok(entries) => {
            for entry in entries {
                let mut entry = match entry {
                    Ok(entry) => entry,
                    Err(error) => {
                        problems.push(format!("the tar archive is damaged: {error}"));
                        break;
                    }
                };
                let name = entry
                    .path()
                    .map(|path| path.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut content = Vec::new();
                if let Err(error) = entry.read_to_end(&mut content) {
                    problems.push(format!("{name}: unreadable: {error}"));
                    continue;
                }
                if files.insert(name.clone(), content).is_some() {
                    problems.push(format!("{name}: appears twice in the archive"));
                }
            }
        }
        Err(error) => problems.push(format!("not a tar archive: {error}")),
    }

    // 1. The manifest and its signature.
    let Some(raw) = files.get("manifest.json") else {
        problems.push("manifest.json: missing".into());
        return report;
    };
    let decoded = match custos_event::verify::decode_envelope(raw, 16 * 1024 * 1024, &[MANIFEST_PAYLOAD_TYPE]) {
        Ok(decoded) => decoded,
        Err(rejection) => {
            problems.push(format!("manifest.json: {}", rejection.message));
            return report;
        }
    };
    if let Err(rejection) = custos_event::verify::verify_one(&decoded.key, &decoded.envelope) {
        problems.push(format!("manifest.json: {}", rejection.message));
    }
    let manifest: Manifest = match serde_json::from_slice(&decoded.envelope.payload) {
        Ok(manifest) => manifest,
        Err(error) => {
            problems.push(format!("manifest.json: the payload is not a manifest: {error}"));
            return report;
        }
    };
    if manifest.format != FORMAT {
        problems.push(format!("manifest: format `{}` is not {FORMAT}", manifest.format));
    }
    if decoded.envelope.keyid != manifest.node_did {
        problems.push(format!(
            "manifest: signed by {} but names node {}",
            decoded.envelope.keyid, manifest.node_did
        ));
    }
    if let Some(pinned) = node_key
        && pinned != decoded.envelope.keyid
    {
        problems.push(format!(
            "manifest: signed by {}, not by the pinned node key {pinned}",
            decoded.envelope.keyid
        ));
    }

    // 2. The file set and digests.
    for (name, digest) in &manifest.files {
        match files.get(name) {
            None => problems.push(format!("{name}: listed in the manifest but missing from the bundle")),
            Some(bytes) if blake3::hash(bytes).to_hex().as_str() != digest => {
                problems.push(format!("{name}: altered (its blake3 does not match the manifest)"));
            }
            Some(_) => {}
        }
    }
    for name in files.keys() {
        if name != "manifest.json" && !manifest.files.contains_key(name) {
            problems.push(format!("{name}: not listed in the manifest (added)"));
        }
    }

    // 3. Keys, checkpoints, consistency.
    let keys: Option<Keys> = files.get("keys.json").and_then(|bytes| {
        serde_json::from_slice(bytes)
            .map_err(|error| problems.push(format!("keys.json: {error}")))
            .ok()
    });
    if let Some(keys) = &keys
        && keys.node_did != manifest.node_did
    {
        problems.push(format!(
            "keys.json: node {} is not the manifest's {}",
            keys.node_did, manifest.node_did
        ));
    }
    let note_key = keys.as_ref().and_then(|keys| {
        NoteKey::parse_verifier(&keys.log_verifier_key)
            .map_err(|error| problems.push(format!("keys.json: log_verifier_key: {error}")))
            .ok()
    });
    let checkpoints: Vec<CheckpointFile> = files
        .get("checkpoints.json")
        .and_then(|bytes| {
            serde_json::from_slice(bytes)
                .map_err(|error| problems.push(format!("checkpoints.json: {error}")))
                .ok()
        })
        .unwrap_or_default();
    let mut roots: BTreeMap<u64, Hash> = BTreeMap::new();
    if let Some(note_key) = &note_key {
        for (position, line) in checkpoints.iter().enumerate() {
            match verify_checkpoint(&line.note, note_key) {
                Ok(checkpoint) if checkpoint.size == line.size => {
                    roots.insert(checkpoint.size, checkpoint.root);
                }
                Ok(checkpoint) => problems.push(format!(
                    "checkpoints.json[{position}]: lists size {} but the signed note says {}",
                    line.size, checkpoint.size
                )),
                Err(error) => problems.push(format!("checkpoints.json[{position}] (size {}): {error}", line.size)),
            }
        }
    }
    report.checkpoints = roots.len();
    let consistency: Vec<ConsistencyFile> = files
        .get("proofs/consistency.json")
        .and_then(|bytes| {
            serde_json::from_slice(bytes)
                .map_err(|error| problems.push(format!("proofs/consistency.json: {error}")))
                .ok()
        })
        .unwrap_or_default();
    for pair in checkpoints.windows(2) {
        let (first, second) = (pair[0].size, pair[1].size);
        let Some(proof) = consistency
            .iter()
            .find(|proof| proof.first_size == first && proof.second_size == second)
        else {
            problems.push(format!(
                "proofs/consistency.json: no proof from size {first} to {second}"
            ));
            continue;
        };
        let path: Option<Vec<Hash>> = proof.consistency_path.iter().map(|hash| decode_hash(hash)).collect();
        match (path, roots.get(&first), roots.get(&second)) {
            (Some(path), Some(a), Some(b)) => {
                if let Err(error) = verify_consistency(first, second, &path, a, b) {
                    problems.push(format!("proofs/consistency.json: {first} -> {second}: {error}"));
                }
            }
            (None, ..) => problems.push(format!(
                "proofs/consistency.json: {first} -> {second}: a hash is not hex"
            )),
            _ => {}
        }
    }
    let tree_size = manifest.tree_size;
    let root = roots.get(&tree_size).copied();
    if root.is_none() {
        problems.push(format!(
            "checkpoints.json: no verified checkpoint of size {tree_size}, which the proofs are against"
        ));
    }
    match files.get("partitions.json") {
        Some(bytes) => match serde_json::from_slice::<PartitionsFile>(bytes) {
            Ok(file) => {
                report.partition = Some((file.partition, file.partitions));
                check_partitions(&file, &manifest, root, partitions_key, problems);
            }
            Err(error) => problems.push(format!("partitions.json: {error}")),
        },
        None if partitions_key.is_some() => problems.push(
            "partitions.json: missing, but a partition set's key was given: the bundle does not show which partition it is"
                .into(),
        ),
        None => {}
    }

    // 4. Inclusion proofs.
    let mut inclusion: BTreeMap<u64, InclusionLine> = BTreeMap::new();
    if let Some(bytes) = files.get("proofs/inclusion.ndjson") {
        for (number, line) in bytes.split(|byte| *byte == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<InclusionLine>(line) {
                Ok(proof) => {
                    if inclusion.insert(proof.log_index, proof).is_some() {
                        problems.push(format!("proofs/inclusion.ndjson line {}: a second proof", number + 1));
                    }
                }
                Err(error) => problems.push(format!("proofs/inclusion.ndjson line {}: {error}", number + 1)),
            }
        }
    }

    // 5. Every row.
    let mut proven = BTreeSet::new();
    let mut unreadable = false;
    for (name, kind) in FILES {
        let Some(bytes) = files.get(name) else { continue };
        let segment = match custos_store::segment::decode(bytes::Bytes::from(bytes.clone())) {
            Ok(segment) => segment,
            Err(error) => {
                problems.push(format!("{name}: not a readable Parquet file: {error}"));
                unreadable = true;
                continue;
            }
        };
        let count = segment.rows.len() as u64;
        report.rows.insert(name.to_owned(), count);
        if manifest.counts.get(name).copied() != Some(count) {
            problems.push(format!(
                "{name}: {count} rows where the manifest says {}",
                manifest.counts.get(name).copied().unwrap_or(0)
            ));
        }
        // Signatures first, batched across every core; each failure is then named by row.
        let mut keys: BTreeMap<&str, Result<custos_event::VerifyingKey, String>> = BTreeMap::new();
        for stored in &segment.rows {
            keys.entry(stored.entry.keyid.as_str()).or_insert_with(|| {
                custos_event::verifying_key_from_did(&stored.entry.keyid).map_err(|error| error.to_string())
            });
        }
        let envelopes: Vec<Envelope> = segment.rows.iter().map(|stored| stored.entry.envelope()).collect();
        let mut checkable = Vec::new();
        let mut positions = Vec::new();
        for (row, envelope) in envelopes.iter().enumerate() {
            if let Some(Ok(key)) = keys.get(envelope.keyid.as_str()) {
                checkable.push((key, envelope));
                positions.push(row);
            }
        }
        let mut signature_problems: BTreeMap<usize, String> = BTreeMap::new();
        for (result, row) in custos_event::verify_signatures(&checkable).into_iter().zip(positions) {
            if let Err(rejection) = result {
                signature_problems.insert(row, rejection.message);
            }
        }
        for (row, stored) in segment.rows.iter().enumerate() {
            let entry = &stored.entry;
            let at = format!("{name} row {row} (log index {})", entry.log_index);
            if entry.payload_type != kind {
                problems.push(format!(
                    "{at}: payload type {} does not belong in this file",
                    entry.payload_type
                ));
            }
            if *blake3::hash(&entry.payload).as_bytes() != entry.payload_blake3 {
                problems.push(format!("{at}: the payload does not match its blake3"));
            }
            if let Some(Err(error)) = keys.get(entry.keyid.as_str()) {
                problems.push(format!("{at}: keyid: {error}"));
            }
            if let Some(message) = signature_problems.remove(&row) {
                problems.push(format!("{at}: {message}"));
            }
            // From the signed payload, not the stored columns.
            let decoded = custos_store::segment::Decoded::from_payload(&entry.payload);
            let field = |name: &str| {
                custos_store::segment::STRING_FIELDS
                    .iter()
                    .position(|field| *field == name)
                    .and_then(|slot| decoded.strings[slot].clone())
            };
            if let Some(agent) = &manifest.query.agent
                && field("agent").as_deref() != Some(agent.as_str())
            {
                problems.push(format!(
                    "{at}: agent {} is not the exported agent {agent}",
                    field("agent").unwrap_or_default()
                ));
            }
            let realm = field("realm");
            if realm.as_deref() != Some(manifest.query.realm.as_str()) {
                problems.push(format!(
                    "{at}: realm {} is outside the exported realm {}",
                    realm.unwrap_or_default(),
                    manifest.query.realm
                ));
            }
            let ts = decoded.ts_us;
            let (from, to) = (
                manifest.query.from.timestamp_micros(),
                manifest.query.to.timestamp_micros(),
            );
            if ts.is_none_or(|ts| ts < from || ts >= to) {
                problems.push(format!("{at}: its time is outside the exported range"));
            }
            let leaf = entry.leaf_hash();
            match inclusion.get(&entry.log_index) {
                None => problems.push(format!("{at}: no inclusion proof")),
                Some(proof) => {
                    proven.insert(entry.log_index);
                    let path: Option<Vec<Hash>> = proof.inclusion_path.iter().map(|hash| decode_hash(hash)).collect();
                    if decode_hash(&proof.leaf_hash) != Some(leaf) {
                        problems.push(format!("{at}: its leaf hash is not the one proven"));
                    }
                    match (path, root) {
                        (Some(path), Some(root)) => {
                            if proof.tree_size != tree_size {
                                problems.push(format!("{at}: proof against size {}, not {tree_size}", proof.tree_size));
                            } else if let Err(error) = verify_inclusion(&leaf, entry.log_index, tree_size, &path, &root)
                            {
                                problems.push(format!("{at}: inclusion proof fails: {error}"));
                            }
                        }
                        (None, _) => problems.push(format!("{at}: a proof hash is not hex")),
                        _ => {}
                    }
                }
            }
        }
    }
    // Each missing row is named; past a screenful, the rest are counted (an unreadable
    // or emptied file would otherwise bury the verdict under one line per row).
    let missing: Vec<u64> = inclusion
        .keys()
        .filter(|index| !proven.contains(*index))
        .copied()
        .collect();
    let why = if unreadable {
        "a row was removed, or its file is unreadable"
    } else {
        "a row was removed"
    };
    for index in missing.iter().take(MISSING_NAMED) {
        problems.push(format!(
            "proofs/inclusion.ndjson: log index {index} is proven but has no row ({why})"
        ));
    }
    if missing.len() > MISSING_NAMED {
        problems.push(format!(
            "proofs/inclusion.ndjson: {} more log indexes are proven but have no row, up to log index {} ({why})",
            missing.len() - MISSING_NAMED,
            missing[missing.len() - 1]
        ));
    }
    report.manifest = Some(manifest);
    report
}
