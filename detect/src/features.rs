//! Per-agent features over tumbling windows.

use serde::{Deserialize, Serialize};

/// The features baselined per agent, in order. Counts are per window.
pub const FEATURES: [&str; 15] = [
    "events",
    "distinct_actions",
    "distinct_targets",
    "new_tools",
    "new_targets",
    "new_realm_targets",
    "bytes_out",
    "tokens",
    "error_rate",
    "denial_rate",
    "credential_use",
    "memory_write",
    "delegation",
    "memory_delete",
    "off_hours_events",
];

pub const N: usize = FEATURES.len();

/// Smallest spread assumed for each feature, so a quiet baseline does not turn one extra
/// event into a huge deviation.
pub const FLOORS: [f32; N] = [
    4.0, 2.0, 2.0, 1.0, 2.0, 2.0, 50_000.0, 4_000.0, 0.2, 0.2, 1.5, 2.0, 1.0, 2.0, 3.0,
];

/// A 2048-bit set of hashed strings: "seen before" at a fixed 256 bytes per agent, with
/// a small false "seen" rate once thousands of items are in it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenSet(Vec<u64>);

impl Default for SeenSet {
    fn default() -> Self {
        Self(vec![0; 32])
    }
}

impl SeenSet {
    /// Marks `item`; returns whether it was new.
    pub fn insert(&mut self, item: &str) -> bool {
        let hash = blake3::hash(item.as_bytes());
        let bytes = hash.as_bytes();
        let mut new = false;
        // A snapshot could hold a short vector; keep the width fixed.
        self.0.resize(32, 0);
        // Two probes: a Bloom filter with k = 2.
        for pair in [[bytes[0], bytes[1]], [bytes[2], bytes[3]]] {
            let bit = (u16::from_le_bytes(pair) & 2047) as usize;
            let (word, mask) = (bit / 64, 1u64 << (bit % 64));
            if self.0[word] & mask == 0 {
                new = true;
                self.0[word] |= mask;
            }
        }
        new
    }
}

/// What accumulates in one agent's open window.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Window {
    /// Start, seconds since the epoch, aligned to the window width.
    pub start: i64,
    pub events: u32,
    pub actions: Vec<u32>,
    pub targets: Vec<u32>,
    pub new_tools: u32,
    pub new_targets: u32,
    pub new_realm_targets: u32,
    pub bytes_out: u64,
    pub tokens: u64,
    pub errors: u32,
    pub denials: u32,
    pub with_outcome: u32,
    pub credential_use: u32,
    pub memory_write: u32,
    pub delegation: u32,
    pub memory_delete: u32,
    pub off_hours: u32,
    /// Up to [`MAX_EVIDENCE`] log indexes of the window's events.
    pub evidence: Vec<u64>,
    /// Memories written in the window (up to [`MAX_EVIDENCE`]), for `quarantine_memory`.
    pub memories: Vec<String>,
}

pub const MAX_EVIDENCE: usize = 16;
/// Distinct actions/targets counted per window (a cap keeps memory bounded).
const MAX_DISTINCT: usize = 64;

fn small_hash(text: &str) -> u32 {
    let hash = blake3::hash(text.as_bytes());
    u32::from_le_bytes([
        hash.as_bytes()[0],
        hash.as_bytes()[1],
        hash.as_bytes()[2],
        hash.as_bytes()[3],
    ])
}

fn add_distinct(set: &mut Vec<u32>, text: &str) {
    let hash = small_hash(text);
    if set.len() < MAX_DISTINCT && !set.contains(&hash) {
        set.push(hash);
    }
}

impl Window {
    pub fn new(start: i64) -> Self {
        Self {
            start,
            ..Self::default()
        }
    }

    pub fn add_action(&mut self, action: &str) {
        add_distinct(&mut self.actions, action);
    }

    pub fn add_target(&mut self, target: &str) {
        add_distinct(&mut self.targets, target);
    }

    pub fn add_evidence(&mut self, log_index: Option<u64>) {
        if let Some(index) = log_index
            && self.evidence.len() < MAX_EVIDENCE
        {
            self.evidence.push(index);
        }
    }

    /// The feature vector, in [`FEATURES`] order.
    pub fn vector(&self) -> [f32; N] {
        let rate = |count: u32| {
            if self.with_outcome == 0 {
                0.0
            } else {
                count as f32 / self.with_outcome as f32
            }
        };
        [
            self.events as f32,
            self.actions.len() as f32,
            self.targets.len() as f32,
            self.new_tools as f32,
            self.new_targets as f32,
            self.new_realm_targets as f32,
            self.bytes_out as f32,
            self.tokens as f32,
            rate(self.errors),
            rate(self.denials),
            self.credential_use as f32,
            self.memory_write as f32,
            self.delegation as f32,
            self.memory_delete as f32,
            self.off_hours as f32,
        ]
    }
}

/// The host of a URL-like target (`https://host/...`, `host:port`), lowercased.
pub fn host_of(target: &str) -> Option<String> {
    let rest = target.split_once("://").map_or(target, |(_, rest)| rest);
    let host = rest.split(['/', '?', '#']).next()?.rsplit('@').next()?;
    let host = host.split(':').next()?;
    (host.contains('.') && !host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_set_reports_new_items_once() {
        let mut set = SeenSet::default();
        assert!(set.insert("tool.a"));
        assert!(!set.insert("tool.a"));
        assert!(set.insert("tool.b"));
    }

    #[test]
    fn hosts_are_extracted_from_urls() {
        assert_eq!(
            host_of("https://Evil.example.com/x?y").as_deref(),
            Some("evil.example.com")
        );
        assert_eq!(host_of("user@db.internal:5432").as_deref(), Some("db.internal"));
        assert_eq!(host_of("/etc/passwd"), None);
    }
}
