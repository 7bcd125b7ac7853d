//! What a reader of one log sees, taken at one instant by the log's writer: the sealed
//! segments, the unsealed tail, the latest checkpoint, and proofs for an evidence bundle.
//! The query API reads these, whichever process produced them.

use std::sync::Arc;

use serde::Serialize;

use crate::LogEntry;

/// The latest signed checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointView {
    pub log_id: String,
    pub origin: String,
    pub size: u64,
    pub root: String,
    pub note: String,
    pub verifier_key: String,
    /// The node key as a `did:key`: it signs control entries and the revocation list.
    /// (`verifier_key` is the log key, which signs checkpoints.)
    pub node_did: String,
    /// Witnesses whose cosignature of this checkpoint is appended to `note`.
    pub cosigned_by: usize,
}

/// What a query sees: the sealed segments in the manifest and every entry not yet in
/// it, taken at one instant on the sequencer thread (so nothing is missed or doubled).
#[derive(Clone, Debug)]
pub struct StoreView {
    pub segment_dir: std::path::PathBuf,
    pub segments: Vec<crate::log::SegmentInfo>,
    pub tail: Vec<Arc<[LogEntry]>>,
    /// Entries in the log (the next log index).
    pub size: u64,
    pub checkpoints: std::path::PathBuf,
}

/// Inclusion proofs for an evidence bundle, against one freshly signed checkpoint.
#[derive(Clone, Debug)]
pub struct EvidenceProofs {
    pub log_id: String,
    pub origin: String,
    /// The checkpoint every proof is against: its size and signed note.
    pub size: u64,
    pub note: String,
    /// The log key's verifier string (it signs checkpoints).
    pub verifier_key: String,
    /// The node key (it signs control entries, revocation lists and bundle manifests).
    pub node_did: String,
    /// Per requested index, in order: the leaf hash and the inclusion path.
    pub proofs: Vec<(u64, [u8; 32], Vec<[u8; 32]>)>,
}
