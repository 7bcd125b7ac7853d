//! DSSE envelopes and the pre-authentication encoding.
//!
//! `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, where `LEN` is
//! the ASCII decimal byte length and `SP` one space. The signature covers exactly these
//! bytes, so no JSON canonicalisation is involved and the stored payload bytes can be
//! re-verified forever.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `payloadType` of an agent event.
pub const EVENT_PAYLOAD_TYPE: &str = "application/vnd.custos.event+json";
/// `payloadType` of a control entry written by a Custos node (enrollment, revocation).
pub const CONTROL_PAYLOAD_TYPE: &str = "application/vnd.custos.control+json";
/// A detector finding, signed by the detector key.
pub const FINDING_PAYLOAD_TYPE: &str = "application/vnd.custos.finding+json";
/// A response action record (OCSF Remediation Activity), signed by the responder key.
pub const ACTION_PAYLOAD_TYPE: &str = "application/vnd.custos.action+json";
/// The signed revocation list served at `/v1/control/revocations` (not a log entry).
pub const REVOCATIONS_PAYLOAD_TYPE: &str = "application/vnd.custos.revocations+json";
/// A revocation the responder recommends to a platform whose operator must sign it
/// (LastID), signed by the responder key.
pub const RECOMMENDATION_PAYLOAD_TYPE: &str = "application/vnd.custos.recommendation+json";

/// The DSSE pre-authentication encoding of `(payload_type, payload)`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    pae_into(&mut out, payload_type, payload);
    out
}

/// [`pae`], appended to `out`: lets a batch build all its messages in one buffer.
pub fn pae_into(out: &mut Vec<u8>, payload_type: &str, payload: &[u8]) {
    use std::io::Write as _;
    out.extend_from_slice(b"DSSEv1 ");
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{} ", payload_type.len());
    out.extend_from_slice(payload_type.as_bytes());
    let _ = write!(out, " {} ", payload.len());
    out.extend_from_slice(payload);
}

/// A single-signature DSSE envelope with its payload and signature decoded.
///
/// DSSE allows several signatures; a Custos event carries exactly one, made by the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub payload_type: String,
    pub payload: Vec<u8>,
    pub keyid: String,
    pub sig: [u8; 64],
}

/// The JSON wire form, before base64 decoding.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireEnvelope {
    #[serde(rename = "payloadType")]
    pub(crate) payload_type: String,
    pub(crate) payload: String,
    pub(crate) signatures: Vec<WireSignature>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireSignature {
    pub(crate) keyid: String,
    pub(crate) sig: String,
}

impl Envelope {
    /// The bytes the signature covers.
    pub fn pae(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }

    /// blake3 of the payload bytes.
    pub fn payload_digest(&self) -> [u8; 32] {
        *blake3::hash(&self.payload).as_bytes()
    }

    /// The envelope as compact wire JSON (standard base64 with padding).
    pub fn to_json(&self) -> String {
        let engine = base64::engine::general_purpose::STANDARD;
        let wire = WireEnvelope {
            payload_type: self.payload_type.clone(),
            payload: engine.encode(&self.payload),
            signatures: vec![WireSignature {
                keyid: self.keyid.clone(),
                sig: engine.encode(self.sig),
            }],
        };
        // Serialising a struct of strings cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }
}

/// Decodes base64 as DSSE allows it: standard or URL-safe alphabet, padded or not.
pub(crate) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::DecodePaddingMode;
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    // Built at compile time: building an engine fills its decode tables, and both were
    // built on every call (twice per envelope), which showed in ingest profiles.
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    static STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CONFIG);
    static URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CONFIG);
    STANDARD.decode(text).ok().or_else(|| URL_SAFE.decode(text).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn base64_variants() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert_eq!(decode_base64("_-8").unwrap(), vec![0xff, 0xef]);
        assert!(decode_base64("not base64!").is_none());
    }
}
