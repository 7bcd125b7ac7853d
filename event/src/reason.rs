//! Stable reason codes for rejected input.
//!
//! Codes are part of the API: they never change meaning and are documented in
//! `docs/reason-codes.md` (a test checks that every code is documented there).

use serde::{Deserialize, Serialize};

/// Why an envelope was not appended to the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The input is not a JSON DSSE envelope with exactly one signature.
    Malformed,
    /// `payload` or `sig` is not base64.
    BadBase64,
    /// `payloadType` is not `application/vnd.custos.event+json`.
    WrongPayloadType,
    /// `keyid` is not an ed25519 `did:key`.
    BadKeyid,
    /// The envelope or its payload exceeds the configured size limit.
    TooLarge,
    /// The ed25519 signature does not verify over the PAE.
    BadSignature,
    /// The signed payload is not a valid Custos event.
    BadPayload,
    /// The payload's `agent` differs from the signature's `keyid`.
    KeyidMismatch,
    /// The signer is not enrolled.
    UnknownAgent,
    /// The signer has been revoked.
    RevokedAgent,
    /// The payload's `realm` is not the realm the agent was enrolled in.
    RealmMismatch,
    /// `ts` is too far in the future or the past.
    ClockSkew,
    /// Same `seq` as an accepted event, different payload: a cloned key or a rewritten history.
    ChainFork,
    /// `seq` follows the head but `prev` is not the digest of the head's payload.
    ChainBroken,
    /// A `seq` at or below the head that is too old to compare with what was accepted.
    Replay,
    /// A LastID record whose `integrity_hash` is not the blake3 of its signed core: its
    /// content was altered (checked before the signature).
    IntegrityMismatch,
    /// A webhook delivery whose HMAC does not verify with the shared secret.
    BadHmac,
    /// A webhook delivery whose timestamp is outside the replay window.
    StaleTimestamp,
}

impl Reason {
    /// Every reason, in documentation order.
    pub const ALL: [Reason; 18] = [
        Reason::Malformed,
        Reason::BadBase64,
        Reason::WrongPayloadType,
        Reason::BadKeyid,
        Reason::TooLarge,
        Reason::BadSignature,
        Reason::BadPayload,
        Reason::KeyidMismatch,
        Reason::UnknownAgent,
        Reason::RevokedAgent,
        Reason::RealmMismatch,
        Reason::ClockSkew,
        Reason::ChainFork,
        Reason::ChainBroken,
        Reason::Replay,
        Reason::IntegrityMismatch,
        Reason::BadHmac,
        Reason::StaleTimestamp,
    ];

    /// Reasons only the platform adapters give (LastID records, VaultysClaw webhooks);
    /// `POST /v1/events` gives every other one.
    pub const ADAPTERS: [Reason; 3] = [Reason::IntegrityMismatch, Reason::BadHmac, Reason::StaleTimestamp];

    /// The stable machine-readable code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::BadBase64 => "bad_base64",
            Reason::WrongPayloadType => "wrong_payload_type",
            Reason::BadKeyid => "bad_keyid",
            Reason::TooLarge => "too_large",
            Reason::BadSignature => "bad_signature",
            Reason::BadPayload => "bad_payload",
            Reason::KeyidMismatch => "keyid_mismatch",
            Reason::UnknownAgent => "unknown_agent",
            Reason::RevokedAgent => "revoked_agent",
            Reason::RealmMismatch => "realm_mismatch",
            Reason::ClockSkew => "clock_skew",
            Reason::ChainFork => "chain_fork",
            Reason::ChainBroken => "chain_broken",
            Reason::Replay => "replay",
            Reason::IntegrityMismatch => "integrity_mismatch",
            Reason::BadHmac => "bad_hmac",
            Reason::StaleTimestamp => "stale_timestamp",
        }
    }

    /// Parses a code back into a reason.
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|reason| reason.code() == code)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// A rejection: a stable code plus a sentence for humans that names the bad value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Rejection {}
