//! A log entry and its exact leaf bytes.

use custos_event::Envelope;

/// One entry of a log: an agent event or a control entry, as signed, plus what the node
/// added (its position and ingest time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub log_index: u64,
    /// Microseconds since the Unix epoch at which the node accepted the entry.
    pub ingest_ts_us: i64,
    pub payload_type: String,
    /// The signer's `did:key`.
    pub keyid: String,
    pub sig: [u8; 64],
    pub payload: Vec<u8>,
    /// blake3 of `payload`.
    pub payload_blake3: [u8; 32],
    /// A `chain_gap` seen at ingest: the inclusive range of missing `seq`s.
    pub gap: Option<(u64, u64)>,
}

/// Domain separator at the start of every leaf.
pub const LEAF_PREFIX: &[u8; 14] = b"custos/leaf/v1";

impl LogEntry {
    pub fn from_envelope(envelope: Envelope, log_index: u64, ingest_ts_us: i64, gap: Option<(u64, u64)>) -> Self {
        let payload_blake3 = envelope.payload_digest();
        Self::from_digested(envelope, payload_blake3, log_index, ingest_ts_us, gap)
    }

    /// [`LogEntry::from_envelope`] for an envelope whose payload blake3 is already known
    /// (ingest computes it while verifying).
    pub fn from_digested(
        envelope: Envelope,
        payload_blake3: [u8; 32],
        log_index: u64,
        ingest_ts_us: i64,
        gap: Option<(u64, u64)>,
    ) -> Self {
        Self {
            log_index,
            ingest_ts_us,
            payload_type: envelope.payload_type,
            keyid: envelope.keyid,
            sig: envelope.sig,
            payload: envelope.payload,
            payload_blake3,
            gap,
        }
    }

    pub fn envelope(&self) -> Envelope {
        Envelope {
            payload_type: self.payload_type.clone(),
            payload: self.payload.clone(),
            keyid: self.keyid.clone(),
            sig: self.sig,
        }
    }

    /// The leaf bytes hashed into the Merkle tree (see `docs/store-format.md`):
    ///
    /// ```text
    /// "custos/leaf/v1" ‖ u16be(len type) ‖ payloadType ‖ u16be(len keyid) ‖ keyid
    ///                  ‖ sig[64] ‖ payload_blake3[32] ‖ i64be(ingest_ts_us)
    /// ```
    pub fn leaf_bytes(&self) -> Vec<u8> {
        leaf_bytes(
            &self.payload_type,
            &self.keyid,
            &self.sig,
            &self.payload_blake3,
            self.ingest_ts_us,
        )
    }

    /// `SHA-256(0x00 ‖ leaf_bytes)`, hashed from the parts without building the leaf.
    pub fn leaf_hash(&self) -> crate::merkle::Hash {
        self.view().leaf_hash()
    }

    /// A borrowed view of this entry.
    pub fn view(&self) -> EntryRef<'_> {
        EntryRef {
            log_index: self.log_index,
            ingest_ts_us: self.ingest_ts_us,
            payload_type: &self.payload_type,
            keyid: &self.keyid,
            sig: &self.sig,
            payload: &self.payload,
            payload_blake3: &self.payload_blake3,
            gap: self.gap,
        }
    }
}

/// A [`LogEntry`] borrowed from wherever it lies (an Arrow batch, a WAL buffer), so the
/// verifier can check rows without copying them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub log_index: u64,
    pub ingest_ts_us: i64,
    pub payload_type: &'a str,
    pub keyid: &'a str,
    pub sig: &'a [u8; 64],
    pub payload: &'a [u8],
    pub payload_blake3: &'a [u8; 32],
    pub gap: Option<(u64, u64)>,
}

impl EntryRef<'_> {
    /// The RFC 9162 leaf hash: SHA-256 of 0x00 then the leaf bytes, streamed (no buffer).
    pub fn leaf_hash(&self) -> crate::merkle::Hash {
        use sha2::Digest as _;
        let mut hasher = sha2::Sha256::new();
        hasher.update([0u8]);
        hasher.update(LEAF_PREFIX);
        hasher.update(u16::try_from(self.payload_type.len()).unwrap_or(u16::MAX).to_be_bytes());
        hasher.update(self.payload_type.as_bytes());
        hasher.update(u16::try_from(self.keyid.len()).unwrap_or(u16::MAX).to_be_bytes());
        hasher.update(self.keyid.as_bytes());
        hasher.update(self.sig);
        hasher.update(self.payload_blake3);
        hasher.update(self.ingest_ts_us.to_be_bytes());
        hasher.finalize().into()
    }

    pub fn to_owned_entry(&self) -> LogEntry {
        LogEntry {
            log_index: self.log_index,
            ingest_ts_us: self.ingest_ts_us,
            payload_type: self.payload_type.to_owned(),
            keyid: self.keyid.to_owned(),
            sig: *self.sig,
            payload: self.payload.to_vec(),
            payload_blake3: *self.payload_blake3,
            gap: self.gap,
        }
    }
}

/// See [`LogEntry::leaf_bytes`].
pub fn leaf_bytes(
    payload_type: &str,
    keyid: &str,
    sig: &[u8; 64],
    payload_blake3: &[u8; 32],
    ingest_ts_us: i64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 4 + payload_type.len() + keyid.len() + 64 + 32 + 8);
    out.extend_from_slice(LEAF_PREFIX);
    // Lengths are bounded far below u16::MAX by ingest; clamp rather than wrap.
    out.extend_from_slice(&u16::try_from(payload_type.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(payload_type.as_bytes());
    out.extend_from_slice(&u16::try_from(keyid.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(keyid.as_bytes());
    out.extend_from_slice(sig);
    out.extend_from_slice(payload_blake3);
    out.extend_from_slice(&ingest_ts_us.to_be_bytes());
    out
}
