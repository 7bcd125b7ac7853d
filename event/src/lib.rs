//! The Custos event: what an agent signs, and how anyone checks it.
//!
//! This crate has no I/O and no async runtime, so every other crate (and any
//! third-party verifier written in Rust) can depend on it.
//!
//! ```text
//!  payload JSON ──▶ Signer ──(seq, prev, PAE, ed25519)──▶ DSSE Envelope ──▶ wire
//!                                                             │
//!  wire bytes ──▶ decode_envelope ──▶ verify_signatures (batch, fallback to single)
//!                                            │
//!                                            ▼
//!                               Payload::parse + keyid check ──▶ Verified
//! ```
//!
//! - [`did`]: `did:key` identifiers for ed25519 keys (multicodec `0xed01`, base58btc).
//! - [`dsse`]: the DSSE envelope and its pre-authentication encoding (PAE).
//! - [`payload`]: the event payload model and its validation rules.
//! - [`sign`]: keys and the chain-keeping [`sign::Signer`].
//! - [`verify`]: decoding, and signature verification in batches grouped by key.
//! - [`chain`]: the per-agent hash chain rule (seq, prev), shared by ingest and verify.
//! - [`batch`]: the cofactored batch equation with one term per distinct key.
//! - [`reason`]: stable reason codes for every rejection.
//!
//! The formats are specified in `docs/event-format.md`; the test vectors there are checked
//! by this crate's tests.

pub mod agent;
pub mod batch;
pub mod chain;
pub mod did;
pub mod dsse;
pub mod finding;
pub mod lastid;
pub mod observe;
pub mod payload;
pub mod reason;
pub mod sign;
pub mod verify;

pub use did::{did_from_public_key, public_key_from_did};
pub use dsse::{
    ACTION_PAYLOAD_TYPE, CONTROL_PAYLOAD_TYPE, EVENT_PAYLOAD_TYPE, Envelope, FINDING_PAYLOAD_TYPE,
    REVOCATIONS_PAYLOAD_TYPE, pae, pae_into,
};
pub use ed25519_dalek::VerifyingKey;
pub use finding::{Contribution, Finding, Severity, Span};

/// The OCSF schema version of every OCSF record Custos writes (events, findings, actions).
pub const OCSF_VERSION: &str = "1.3.0";

/// The OCSF `metadata` object of a Custos record.
pub fn ocsf_metadata() -> serde_json::Value {
    serde_json::json!({ "product": { "name": "Custos", "vendor_name": "Custos" }, "version": OCSF_VERSION })
}
pub use observe::{Observation, Signal, SignedEntry};
pub use payload::{Kind, Outcome, Payload};
pub use reason::{Reason, Rejection};
pub use sign::{AgentKey, ChainLanes, ChainState, Signer, partition_of};
pub use verify::{Decoded, KeyCache, Verified, decode_envelope, verify_signatures, verifying_key_from_did};

/// blake3 of some bytes, as the lowercase hex used in `prev` and in the docs.
pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}
