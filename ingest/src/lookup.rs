//! Answers for events at seqs older than the chain state the sequencer holds in memory.
//!
//! ```text
//!  sequencer: seq below every in-memory triple of the agent ─▶ Lookup (slot reserved)
//!        │
//!        ▼  blocking pool, off the writer thread
//!  store::seqindex::find(agent, seq) over the sealed segments, newest first
//!        ├─ same blake3  ─▶ duplicate (the stored event's log index)
//!        ├─ other blake3 ─▶ chain_fork, both digests kept ─┐
//!        └─ none stored  ─▶ replay (the seq was a gap) ────┴─▶ Refusals ─▶ sequencer
//!                                                        (forensics + the detector)
//! ```
//!
//! Neither outcome appends to the log, so the writer does not wait for the disk reads.

use custos_store::seqindex;

use crate::ApiError;
use crate::sequencer::{Lookup, Refusal, fork, never_stored, rejected_verdict};
use custos_stage::Verdict;

/// The answer to one lookup, and the refusal to record when it is one.
pub(crate) fn resolve(lookup: Lookup) -> Result<(Verdict, Option<Refusal>), ApiError> {
    let did = lookup.payload.agent.clone();
    let seq = lookup.payload.seq;
    let found =
        seqindex::find(&lookup.segment_dir, &lookup.segments, &did, seq, lookup.not_before).map_err(|error| {
            ApiError::new(
                503,
                "store_failed",
                format!("could not look up seq {seq} of `{did}` in the sealed segments: {error}; resend the request"),
            )
        })?;
    let (rejection, evidence) = match found {
        Some(found) if found.payload_blake3 == lookup.digest => {
            return Ok((Verdict::duplicate(lookup.index, found.log_index), None));
        }
        Some(found) => fork(&did, seq, found.log_index, found.payload_blake3, lookup.digest),
        None => (never_stored(&did, seq, lookup.head_seq), None),
    };
    let result = rejected_verdict(lookup.index, &rejection);
    Ok((
        result,
        Some(Refusal {
            index: lookup.index,
            raw: lookup.raw,
            rejection,
            evidence,
            payload: lookup.payload,
        }),
    ))
}
