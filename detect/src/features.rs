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
    "errors",
    "denials",
    "credential_use",
    "memory_write",
    "delegation",
    "memory_delete",
    "off_hours_events",
];

pub const N: usize = FEATURES.len();

/// Smallest spread assumed for each feature in absolute units, so a quiet baseline does
/// not turn one extra event into a huge deviation. The spread also never falls below
/// [`RELATIVE`] × the expected value, nor, for counts, below √expected (Poisson noise):
/// floors scale with the agent's own level (docs/detection.md).
pub const FLOORS: [f32; N] = [
    2.0, 1.5, 1.5, 0.5, 1.0, 1.0, 512.0, 500.0, 1.5, 1.5, 1.0, 1.5, 1.0, 2.0, 3.0,
];

/// Smallest spread relative to the expected value: a window must differ from normal by
/// more than this fraction of the agent's own level before the spread can be crossed.
pub const RELATIVE: [f32; N] = [
    0.25, 0.2, 0.2, 0.0, 0.0, 0.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25,
];

/// Whether a feature counts events (Poisson noise applies); bytes and tokens do not.
pub const COUNT: [bool; N] = [
    true, true, true, true, true, true, false, false, true, true, true, true, true, true, true,
];

/// Features expected in proportion to the window's activity (events): novelty, bytes,
/// failures, privilege and memory counts grow with how busy the window is.
pub const CONDITIONAL: [bool; N] = [
    false, false, false, true, true, true, true, false, true, true, true, true, true, true, false,
];

/// Independent signal groups. Features of one group move together (a busy window has
/// more events, more distinct actions and more tokens at once), so a group contributes
/// only its largest deviation when signals are added up.
pub const GROUPS: [(&str, &[usize]); 8] = [
    ("activity", &[0, 1, 2, 7]),
    ("tools", &[3]),
    ("destinations", &[4, 5]),
    ("egress", &[6]),
    ("failures", &[8, 9]),
    ("privilege", &[10, 12]),
    ("memory", &[11, 13]),
    ("timing", &[14]),
];

/// Features whose occurrence itself is rare for most agents: a first-ever credential
/// use or a never-used tool is scored by how rarely this agent's windows hold one
/// (see `Stat::presence`), not only by how many there are.
pub const RARE: [bool; N] = [
    false, false, false, true, true, true, false, false, false, false, true, false, true, true, false,
];

/// Fingerprints one generation of a [`SeenSet`] holds before it becomes the old one.
pub const SEEN_GENERATION: usize = 128;

/// "Seen before" per agent: 32-bit fingerprints in two generations of at most
/// [`SEEN_GENERATION`]. A lookup checks both; a hit in the old generation is copied into
/// the current one; when the current one fills, the old one is dropped. So the set holds
/// everything used within roughly the last [`SEEN_GENERATION`] distinct items, its size
/// never exceeds 2 × [`SEEN_GENERATION`] × 4 bytes, and its false "seen" rate stays
/// below 2 × [`SEEN_GENERATION`] / 2³² however long the agent lives (a Bloom filter of
/// fixed size saturates instead). Items unused for that long count as new again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeenSet {
    current: Vec<u32>,
    old: Vec<u32>,
}

impl SeenSet {
    /// Marks `item`; returns whether it was new.
    pub fn insert(&mut self, item: &str) -> bool {
        self.insert_print(small_hash(item))
    }

    /// Marks `prefix` + `item` (one set holding several kinds of item), without
    /// building the joined string.
    pub fn insert_tagged(&mut self, prefix: &str, item: &str) -> bool {
        self.insert_print(tagged_hash(prefix, item))
    }

    /// Whether `prefix` + `item` was seen, without marking it.
    pub fn contains_tagged(&self, prefix: &str, item: &str) -> bool {
        let print = tagged_hash(prefix, item);
        self.current.binary_search(&print).is_ok() || self.old.binary_search(&print).is_ok()
    }

    fn insert_print(&mut self, print: u32) -> bool {
        if let Err(at) = self.current.binary_search(&print) {
            let known = self.old.binary_search(&print).is_ok();
            if self.current.len() >= SEEN_GENERATION {
                self.old = std::mem::take(&mut self.current);
                self.current.push(print);
            } else {
                self.current.insert(at, print);
            }
            return !known;
        }
        false
    }

    /// Whether `item` was seen, without marking it.
    pub fn contains(&self, item: &str) -> bool {
        let print = small_hash(item);
        self.current.binary_search(&print).is_ok() || self.old.binary_search(&print).is_ok()
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serialised compactly: base64 of the little-endian fingerprints, current then old.
impl Serialize for SeenSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        let encode = |set: &[u32]| {
            let bytes: Vec<u8> = set.iter().flat_map(|print| print.to_le_bytes()).collect();
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
        };
        (encode(&self.current), encode(&self.old)).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SeenSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let (current, old) = <(String, String)>::deserialize(deserializer)?;
        let decode = |text: &str| -> Result<Vec<u32>, D::Error> {
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(text)
                .map_err(serde::de::Error::custom)?;
            let mut prints: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|chunk| u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                .collect();
            prints.sort_unstable();
            prints.dedup();
            prints.truncate(SEEN_GENERATION);
            Ok(prints)
        };
        Ok(Self {
            current: decode(&current)?,
            old: decode(&old)?,
        })
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
    pub credential_use: u32,
    pub memory_write: u32,
    pub delegation: u32,
    pub memory_delete: u32,
    pub off_hours: u32,
    /// Up to [`MAX_EVIDENCE`] log indexes of the window's events, each with the
    /// [`GROUPS`] it counted towards (bit g = group g). Events that count towards a
    /// group other than activity are kept in preference to plain ones, so a finding can
    /// cite the events that made its features deviate.
    pub evidence: Vec<(u64, u8)>,
    /// Memories written in the window (up to [`MAX_EVIDENCE`]), for `quarantine_memory`.
    pub memories: Vec<String>,
    /// Outward sends, and those to a destination the agent first sent to recently.
    #[serde(default)]
    pub outward: u32,
    #[serde(default)]
    pub outward_young: u32,
}

pub const MAX_EVIDENCE: usize = 32;
/// Distinct actions/targets counted per window (a cap keeps memory bounded).
const MAX_DISTINCT: usize = 64;

/// Bit of group `name` in an evidence mask.
pub fn group_bit(name: &str) -> u8 {
    GROUPS
        .iter()
        .position(|(group, _)| *group == name)
        .map_or(0, |position| 1 << position)
}

/// Group index of feature `f`.
pub fn group_of(f: usize) -> usize {
    GROUPS.iter().position(|(_, members)| members.contains(&f)).unwrap_or(0)
}

/// The 32-bit fingerprint of `prefix` followed by `item` (the same as of the joined
/// string).
pub fn tagged_hash(prefix: &str, item: &str) -> u32 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prefix.as_bytes());
    hasher.update(item.as_bytes());
    let hash = hasher.finalize();
    u32::from_le_bytes([
        hash.as_bytes()[0],
        hash.as_bytes()[1],
        hash.as_bytes()[2],
        hash.as_bytes()[3],
    ])
}

fn small_hash(text: &str) -> u32 {
    tagged_hash("", text)
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

    /// Cites an event with the groups (bit mask) it counted towards.
    pub fn add_evidence(&mut self, log_index: Option<u64>, groups: u8) {
        let Some(index) = log_index else { return };
        let notable = groups & !1 != 0;
        if self.evidence.len() < MAX_EVIDENCE {
            self.evidence.push((index, groups));
        } else if notable && let Some(plain) = self.evidence.iter().rposition(|(_, mask)| mask & !1 == 0) {
            self.evidence.remove(plain);
            self.evidence.push((index, groups));
        }
    }

    /// The cited events that counted towards any group in `groups` (all cited events
    /// when none did), in log order.
    pub fn cite(&self, groups: u8) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .evidence
            .iter()
            .filter(|(_, mask)| mask & groups != 0)
            .map(|(index, _)| *index)
            .collect();
        if out.is_empty() {
            out = self.evidence.iter().map(|(index, _)| *index).collect();
        }
        out.sort_unstable();
        out
    }

    /// The feature vector, in [`FEATURES`] order.
    pub fn vector(&self) -> [f32; N] {
        [
            self.events as f32,
            self.actions.len() as f32,
            self.targets.len() as f32,
            self.new_tools as f32,
            self.new_targets as f32,
            self.new_realm_targets as f32,
            self.bytes_out as f32,
            self.tokens as f32,
            self.errors as f32,
            self.denials as f32,
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

    /// Weakness 11: a fixed 2048-bit Bloom filter was nearly full after a few hundred
    /// distinct targets, and then nothing was ever new again. Here a long-lived agent
    /// that has touched 100 000 distinct targets still sees fresh ones as new, the set
    /// stays within its bound, and items in regular use stay known.
    #[test]
    fn seen_set_never_saturates_as_an_agent_ages() {
        let mut set = SeenSet::default();
        for n in 0..100_000 {
            set.insert(&format!("https://host-{n}.example.com/"));
            // A target in daily use is kept known throughout.
            if n % 50 == 0 {
                set.insert("https://api.internal/orders");
            }
        }
        assert!(set.len() <= 2 * SEEN_GENERATION);
        assert!(set.contains("https://api.internal/orders"));
        let fresh = (0..1000)
            .filter(|n| set.insert(&format!("https://never-seen-{n}.example.org/")))
            .count();
        assert!(fresh >= 995, "only {fresh} of 1000 fresh targets were new");
        let text = serde_json::to_string(&set).unwrap();
        assert!(text.len() < 1500, "{} bytes", text.len());
        let back: SeenSet = serde_json::from_str(&text).unwrap();
        assert_eq!(back, set);
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
