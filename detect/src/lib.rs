//! Custos detect: a streaming detector of agent behaviour.
//!
//! ```text
//!  log writer ──Committed──▶ runner::DetectorStage ──▶ Detector::observe
//!                                          │
//!          ┌───────────────────────────────┼──────────────────────────────┐
//!          ▼                               ▼                              ▼
//!   Sigma rules (rsigma-eval,       per-agent tumbling window      silence check (tick)
//!   correlations, filters)          ─▶ features ─▶ baselines
//!          │                           (own; while learning, its k-means peer
//!          │                            group; EWMA/MAD + hour-of-week; Page-Hinkley)
//!          └──────────────┬────────────────┘
//!                         ▼
//!          dedup (key, period) ─▶ Finding ─▶ signed by the detector key ─▶ Submission
//!                                            (the writer logs it; the responder reads it
//!                                             back as Committed::Finding)
//! ```
//!
//! The detector is a plain state machine: no threads, no clocks. Time is the events'
//! own timestamps, so `custos eval` can replay days of traffic in seconds and get the
//! same findings as the live node. State snapshots to JSON and resumes. With one log per
//! partition, [`partitions`] runs one stage per partition a process holds, each with its
//! own state, snapshot and signing chain, so a partition's state moves between processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use custos_event::{Kind, Observation, Outcome, Signal};
use serde::{Deserialize, Serialize};

pub mod baseline;
pub mod features;
pub mod flows;
pub mod partitions;
pub mod peers;
pub mod rules;
pub mod runner;

pub use baseline::{Baseline, BaselineConfig, Contribution};
pub use custos_event::finding::{self, Finding, Severity, Span};
pub use peers::PeerGroups;
pub use rules::{RuleError, RuleHit, Rules};

use features::{GROUPS, SeenSet, Window, group_bit, host_of};
use flows::{AgentFlows, TaintedMemories};

/// Tuning; defaults in `docs/detection.md`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Tumbling window width in seconds.
    pub window_secs: i64,
    /// Windows an agent needs before its own baseline is trusted; until then it is
    /// `learning` and judged against its peer group (or, before the first peer-group
    /// fit, its realm's peers).
    pub min_windows: u32,
    /// Baseline findings below this score are not reported.
    pub threshold: u8,
    /// An anomaly with the same dedup key (agent, type, leading group) is not reported
    /// again within this many seconds.
    pub dedup_secs: i64,
    /// How long a rule finding's matched events stay cited: a correlation that fires
    /// again on events an earlier finding of the same rule and agent already cited is a
    /// repeat; one on new events is a new finding.
    #[serde(default = "default_rule_dedup")]
    pub rule_dedup_secs: i64,
    /// An agent must be quiet at least this many windows before silence is considered.
    pub silence_windows: i64,
    pub baseline: BaselineConfig,
    /// Realm-wide "seen targets" sets stop growing at this many entries.
    pub max_realm_targets: usize,
    /// Peer groups are refitted (k-means over mature agents' profiles) this often, in
    /// event-time seconds; every tenth of that while no fit has succeeded yet.
    #[serde(default = "default_peer_refit")]
    pub peer_refit_secs: i64,
    /// Domains (and their subdomains) that are inside the organisation: sends there are
    /// never exfiltration.
    #[serde(default)]
    pub internal_domains: Vec<String>,
    /// How many logs the events come from, one per partition of the realm rule
    /// (`custos_event::partition_of`): log indexes are per log, so the position the
    /// detector resumes after is kept per log. 1 for one log.
    #[serde(default = "one_lane")]
    pub log_lanes: u32,
}

fn one_lane() -> u32 {
    1
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            window_secs: 60,
            min_windows: 30,
            threshold: 50,
            dedup_secs: 3600,
            rule_dedup_secs: 86_400,
            silence_windows: 15,
            baseline: BaselineConfig::default(),
            max_realm_targets: 200_000,
            peer_refit_secs: 3600,
            internal_domains: Vec::new(),
            log_lanes: 1,
        }
    }
}

fn default_rule_dedup() -> i64 {
    86_400
}

fn default_peer_refit() -> i64 {
    3600
}

/// A destination counts as young (for concentration) this long after the first send.
pub const YOUNG_SECS: i64 = 3 * 86_400;
/// Young destinations remembered per agent.
pub const MAX_YOUNG: usize = 8;
/// Tools whose definition hash an agent pins (the first ones it calls with a hash).
pub const MAX_PINNED_TOOLS: usize = 32;
/// Longest stretch a burst counts as one in the silence test, seconds: an agent busy
/// without pause is judged in chunks of this much activity, not as one endless burst.
pub const MAX_BURST_SECS: f32 = 600.0;
/// Seconds untrusted content keeps a session tainted.
pub const TAINT_SECS: i64 = 1800;
/// Seconds a read-back of a tainted memory keeps its session poisoned.
pub const POISON_SECS: i64 = 3600;
/// Seconds a memory written from untrusted content stays tainted.
pub const MEMORY_TAINT_SECS: i64 = 7 * 86_400;
/// A realm must have been observed this long before a destination is "new to the realm".
pub const REALM_WARMUP_SECS: i64 = 24 * 3600;
/// Expected bursts of activity that must have failed to arrive before silence is
/// reported: with bursts arriving at random, none in eight expected happens by chance
/// with probability e⁻⁸ (about 1 in 3 000). The agent's own longest pause raises the bar
/// ([`PAUSE_MARGIN`]).
pub const SILENCE_BURSTS: f32 = 8.0;
/// Silence must exceed the longest pause (in expected bursts) the agent ever came back
/// from by this factor.
pub const PAUSE_MARGIN: f32 = 1.25;
/// A pause of this many seconds ends a burst of activity.
pub const BURST_GAP_SECS: i64 = 300;
/// Expected events of a kind that must have failed to arrive, among the agent's other
/// events, before an audit gap is reported.
pub const GAP_EXPECTED: f32 = 40.0;
/// An audit gap must also be this many times the longest gap the agent ever had.
pub const GAP_FACTOR: u32 = 3;
/// A group contributes only when its deviation reaches this.
pub const GROUP_MIN: f64 = 1.5;
/// While an agent is judged against peers (learning), no group counts for more than
/// this: the peers' spread is not the agent's own, so one feature cannot decide.
pub const LEARNING_CAP: f64 = 4.0;
/// A realm whose agents sent less than this share of what their rhythms expect over the
/// last hours is in a lull (a holiday, an outage): its agents' silences are not news.
pub const LULL_SHARE: f32 = 0.3;
/// Expected events a realm needs over those hours before a lull can be told.
pub const LULL_MIN_EXPECTED: f32 = 50.0;
/// Time constant of the recent-activity averages, seconds.
pub const RECENT_SECS: f32 = 2.0 * 3600.0;
/// Timing alone never makes a finding: its deviation is capped here.
pub const TIMING_CAP: f64 = 4.0;
/// Denials and errors after a policy change within this many seconds are expected.
pub const POLICY_GRACE_SECS: i64 = 3600;
/// Failures a window needs before it can be called probing.
pub const PROBING_MIN: u32 = 5;
/// Deviation a group needs to name the finding's type (mass delete).
pub const STRONG: f64 = 4.0;
/// Deviation the failures group needs to name a finding probing (with at least
/// [`PROBING_MIN`] failures in the window).
pub const PROBING_Z: f64 = 3.0;
/// Above this, an activity deviation is compressed logarithmically: session-based agents
/// have heavy-tailed busy minutes, so activity alone needs a far larger excess.
pub const ACTIVITY_KNEE: f64 = 3.0;
/// Memory deletes a window needs before it can be called a mass delete.
pub const MASS_DELETE_MIN: u32 = 10;
/// A held finding is suppressed when at least this many agents of its realm, and this
/// share of the realm, raised the same type around the same time: a holiday, an outage or
/// a fleet-wide deploy, not an attack on one agent.
pub const CROWD_MIN: usize = 3;
pub const CROWD_SHARE: f32 = 0.2;

/// Per type: seconds a finding is held for the crowd check, and the span (either side)
/// in which other agents' candidates count as the same crowd.
fn hold_of(finding_type: &str) -> Option<(i64, i64)> {
    match finding_type {
        "anomaly" | "probing" | "mass_delete" => Some((300, 900)),
        "audit_gap" => Some((1800, 4 * 3600)),
        "drift" => Some((24 * 3600, 48 * 3600)),
        _ => None,
    }
}

/// LastID records of other classes that must arrive after a class's last one before its
/// silence is reported, and how many times its longest earlier silence that must be.
pub const LASTID_SILENT_MIN: u32 = 25;
pub const LASTID_SILENT_FACTOR: u32 = 3;
/// Records of a class seen before its silence can count.
pub const LASTID_SEEN_MIN: u32 = 2;

/// One LastID agent's audit classes (`event_type`s).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LastIdClasses {
    /// The classes its latest `ChainCheckpoint` said the policy records; `None` until one
    /// says (every class seen then counts as on).
    policy: Option<std::collections::BTreeSet<String>>,
    classes: BTreeMap<String, ClassStat>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ClassStat {
    seen: u32,
    /// Records of other classes since this class's last one.
    since: u32,
    longest: u32,
    last_index: Option<u64>,
    reported: bool,
}

/// Per-kind arrival statistics, for audit gaps (a class of events that stops while the
/// rest continues).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KindStats {
    /// Events of each kind ([`Kind::ALL`] order), halved together when one saturates.
    counts: Vec<u32>,
    /// Events of other kinds since the last one of this kind.
    since: Vec<u32>,
    /// The longest such run ever seen before this kind arrived again.
    longest: Vec<u32>,
    /// Log index of the last event of this kind.
    last: Vec<Option<u64>>,
    /// Kinds already reported missing (bit per kind), until they arrive again.
    reported: u16,
}

/// One agent's detector state (a few KiB: see `custos bench detect`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentState {
    pub realm: String,
    pub window: Window,
    pub baseline: Baseline,
    /// Tools (`t:`), targets (`g:`) and hosts (`h:`) used recently.
    seen: SeenSet,
    /// Destinations this agent sent data to.
    sent: SeenSet,
    /// Event time of the first and the last event, seconds.
    pub first_seen: i64,
    pub last_seen: i64,
    silent: bool,
    /// Events expected (hour-of-week profile) since the last event, counted up to
    /// `expected_at`.
    expected_missing: f32,
    expected_at: i64,
    /// The most bursts ever expected during a pause that ended with the agent coming
    /// back: its own record of normal quiet.
    longest_pause: f32,
    /// Events in the current burst and when it began; the typical burst size and
    /// length in seconds (EWMAs).
    burst: u32,
    burst_size: f32,
    #[serde(default)]
    burst_start: i64,
    #[serde(default)]
    burst_secs: f32,
    /// Outward destinations first sent to within [`YOUNG_SECS`]: (hash, first send), at
    /// most [`MAX_YOUNG`].
    #[serde(default)]
    young: Vec<(u32, i64)>,
    /// Tool definitions pinned at first use: (action hash, definition hash, log index of
    /// the call that pinned it), at most [`MAX_PINNED_TOOLS`].
    #[serde(default)]
    pins: Vec<(u32, u32, Option<u64>)>,
    /// For a LastID agent: its audit policy and each event class's arrivals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lastid: Option<LastIdClasses>,
    /// The last few (seq, log index) pairs, so a fork of a recent seq cites the stored one.
    recent: Vec<(u64, u64)>,
    /// Events since the last tick, and exponentially decayed recent events and recent
    /// expected events (time constant [`RECENT_SECS`]), for the realm's lull check.
    tick_events: u32,
    recent_actual: f32,
    recent_expected: f32,
    #[serde(default)]
    recent_at: i64,
    flows: AgentFlows,
    kinds: KindStats,
    last_policy_change: i64,
}

impl AgentState {
    /// Events one independent arrival stands for in the silence test: the typical burst,
    /// but no more than [`MAX_BURST_SECS`] of activity at the pace inside a burst.
    fn burst_unit(&self) -> f32 {
        let size = self.burst_size.max(1.0);
        let pace = size / self.burst_secs.max(60.0);
        size.min(pace * MAX_BURST_SECS).max(1.0)
    }
}

/// A flow finding before it is built: type, evidence, what happened, the poisoned memory.
type Raised = (&'static str, Vec<Option<u64>>, String, Option<String>);

/// A finding held back for the crowd check.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Held {
    finding: Finding,
    due: i64,
}

/// A candidate finding of a held type, remembered for the crowd check.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Candidate {
    realm: String,
    finding_type: String,
    agent: String,
    ts: i64,
}

/// The detector's whole state, as snapshotted.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    config: DetectorConfig,
    agents: HashMap<String, AgentState>,
    peers: HashMap<String, Baseline>,
    groups: PeerGroups,
    realm_targets: HashMap<String, HashSet<u64>>,
    realm_sends: HashMap<String, HashSet<u64>>,
    realm_first: HashMap<String, i64>,
    realm_agents: HashMap<String, u32>,
    tainted_memories: HashMap<String, TaintedMemories>,
    policy_changes: HashMap<String, i64>,
    reported: HashMap<String, i64>,
    cited: HashMap<String, (i64, Vec<u64>)>,
    held: Vec<Held>,
    candidates: Vec<Candidate>,
    watermark: i64,
    last_log_index: Option<u64>,
    /// The same for logs 1.. when events come from several (`log_lanes`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    last_log_indexes: BTreeMap<u32, u64>,
    rules: serde_json::Value,
}

const SNAPSHOT_VERSION: u32 = 2;

pub struct Detector {
    pub config: DetectorConfig,
    rules: Rules,
    agents: HashMap<String, AgentState>,
    /// Per-realm peer baselines, learned from every agent's windows: the fallback
    /// until the fleet has enough mature agents for peer groups.
    peers: HashMap<String, Baseline>,
    /// Peer groups clustered over agent profiles (see [`peers`]).
    groups: PeerGroups,
    realm_targets: HashMap<String, HashSet<u64>>,
    /// Destinations any agent of the realm sent data to.
    realm_sends: HashMap<String, HashSet<u64>>,
    /// Event time of each realm's first event.
    realm_first: HashMap<String, i64>,
    /// Agents seen per realm.
    realm_agents: HashMap<String, u32>,
    tainted_memories: HashMap<String, TaintedMemories>,
    /// Event time of each realm's last `policy_change`.
    policy_changes: HashMap<String, i64>,
    /// Dedup key → event time it was last reported.
    reported: HashMap<String, i64>,
    /// Rule and agent → (time, matched events already cited).
    cited: HashMap<String, (i64, Vec<u64>)>,
    held: Vec<Held>,
    candidates: Vec<Candidate>,
    /// Latest event time seen, seconds.
    pub watermark: i64,
    /// Highest log index observed (the snapshot resumes after it); of log 0 when there
    /// are several.
    pub last_log_index: Option<u64>,
    /// The same for logs 1.. (`DetectorConfig::log_lanes`).
    last_log_indexes: BTreeMap<u32, u64>,
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

fn level_score(level: &str) -> u8 {
    match level {
        "critical" => 95,
        "high" => 80,
        "medium" => 60,
        _ => 40,
    }
}

fn hash64(text: &str) -> u64 {
    u64::from_le_bytes(
        blake3::hash(text.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap_or([0; 8]),
    )
}

/// ATT&CK and OWASP Agentic tags for a baseline finding led by `feature`.
fn feature_tags(feature: &str) -> Vec<String> {
    let tags: &[&str] = match feature {
        "bytes_out" | "bytes_per_event" => &["attack.exfiltration", "attack.t1048", "owasp.agentic.t2"],
        "credential_use" => &["attack.t1078", "owasp.agentic.t3"],
        "new_tools" | "distinct_actions" => &["owasp.agentic.t2"],
        "new_targets" | "new_realm_targets" | "distinct_targets" => &["attack.discovery", "owasp.agentic.t2"],
        "memory_write" => &["owasp.agentic.t1"],
        "memory_delete" => &["attack.t1485", "owasp.agentic.t1"],
        "delegation" => &["attack.t1548", "owasp.agentic.t3"],
        "tokens" | "events" => &["owasp.agentic.t4"],
        "errors" | "denials" => &["attack.discovery", "attack.t1046", "owasp.agentic.t2"],
        "off_hours_events" => &["attack.t1078"],
        _ => &[],
    };
    tags.iter().map(|tag| (*tag).to_owned()).collect()
}

fn kind_index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl KindStats {
    /// Counts one event; returns kinds that now look switched off: (kind index, events
    /// since its last one, events of it expected among them).
    fn count(&mut self, kind: usize, index: Option<u64>) -> Vec<(usize, u32, f32)> {
        let n = Kind::ALL.len();
        if self.counts.len() != n {
            self.counts = vec![0; n];
            self.since = vec![0; n];
            self.longest = vec![0; n];
            self.last = vec![None; n];
        }
        if self.counts[kind] > 0 {
            self.longest[kind] = self.longest[kind].max(self.since[kind]);
        }
        self.counts[kind] += 1;
        if self.counts[kind] >= 60_000 {
            for count in &mut self.counts {
                *count /= 2;
            }
        }
        self.since[kind] = 0;
        self.last[kind] = index;
        self.reported &= !(1 << kind);
        let total: u32 = self.counts.iter().sum();
        let mut gone = Vec::new();
        for k in 0..n {
            if k == kind {
                continue;
            }
            self.since[k] = self.since[k].saturating_add(1);
            if total < 500 || self.counts[k] < 50 || self.reported & (1 << k) != 0 {
                continue;
            }
            let expected = self.counts[k] as f32 / total as f32 * self.since[k] as f32;
            if expected >= GAP_EXPECTED && self.since[k] > GAP_FACTOR * self.longest[k].max(1) {
                self.reported |= 1 << k;
                gone.push((k, self.since[k], expected));
            }
        }
        gone
    }
}

impl Detector {
    pub fn new(config: DetectorConfig, rules: Rules) -> Self {
        Self {
            config,
            rules,
            agents: HashMap::new(),
            peers: HashMap::new(),
            groups: PeerGroups::default(),
            realm_targets: HashMap::new(),
            realm_sends: HashMap::new(),
            realm_first: HashMap::new(),
            realm_agents: HashMap::new(),
            tainted_memories: HashMap::new(),
            policy_changes: HashMap::new(),
            reported: HashMap::new(),
            cited: HashMap::new(),
            held: Vec::new(),
            candidates: Vec::new(),
            watermark: 0,
            last_log_index: None,
            last_log_indexes: BTreeMap::new(),
        }
    }

    pub fn agents(&self) -> usize {
        self.agents.len()
    }

    pub fn agent(&self, did: &str) -> Option<&AgentState> {
        self.agents.get(did)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.count
    }

    /// The current peer groups (empty before the first fit).
    pub fn peer_groups(&self) -> &PeerGroups {
        &self.groups
    }

    /// Refits the peer groups when they are due: hourly (event time) by default, and
    /// sooner while no fit has succeeded. Agents are taken in DID order so the fit is
    /// the same on every run.
    fn refit_peers(&mut self) {
        let period = self.config.peer_refit_secs.max(60);
        let due = if self.groups.is_empty() { period / 10 } else { period };
        if self.watermark < self.groups.fitted_at + due {
            return;
        }
        let min_windows = self.config.min_windows;
        let mut mature: Vec<(&String, &Baseline)> = self
            .agents
            .iter()
            .filter(|(_, state)| state.baseline.windows >= min_windows)
            .map(|(did, state)| (did, &state.baseline))
            .collect();
        mature.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let members: Vec<&Baseline> = mature.into_iter().map(|(_, baseline)| baseline).collect();
        match PeerGroups::fit(&members, self.watermark) {
            Some(groups) => {
                tracing::debug!(
                    groups = groups.len(),
                    agents = members.len(),
                    silhouette = groups.silhouette,
                    "peer groups refitted"
                );
                self.groups = groups;
            }
            None => self.groups.fitted_at = self.watermark,
        }
    }

    /// Notes a finding already in the log, so it is not reported again.
    pub fn remember(&mut self, finding: &Finding) {
        let ts = finding.ts.timestamp();
        let entry = self.reported.entry(finding.dedup_key.clone()).or_insert(ts);
        *entry = (*entry).max(ts);
        if let Some(rule) = &finding.rule_id {
            let cited = self
                .cited
                .entry(format!("{rule}|{}", finding.agent))
                .or_insert((ts, Vec::new()));
            cited.0 = cited.0.max(ts);
            cited.1.extend(&finding.evidence);
        }
    }

    /// Processes one observation; returns the findings it completes.
    pub fn observe(&mut self, observation: &Observation) -> Vec<Finding> {
        let lane = match self.config.log_lanes {
            0 | 1 => 0,
            lanes => custos_event::partition_of(&observation.payload.realm, lanes),
        };
        let last = match lane {
            0 => self.last_log_index,
            lane => self.last_log_indexes.get(&lane).copied(),
        };
        if let Some(index) = observation.log_index
            && last.is_some_and(|last| index <= last)
        {
            // Already processed before the snapshot.
            return Vec::new();
        }
        let payload = &observation.payload;
        let ts = payload.ts.timestamp();
        self.watermark = self.watermark.max(ts);
        self.refit_peers();
        if let Some(index) = observation.log_index {
            match lane {
                0 => self.last_log_index = Some(index).max(self.last_log_index),
                lane => {
                    let last = self.last_log_indexes.entry(lane).or_insert(index);
                    *last = index.max(*last);
                }
            }
        }
        let mut findings = Vec::new();
        for hit in self.rules.process(observation) {
            findings.extend(self.rule_finding(observation, &hit));
        }
        if !matches!(observation.signal, Signal::Accepted { .. }) {
            return findings;
        }
        let width = self.config.window_secs.max(1);
        let start = ts.div_euclid(width) * width;
        let agent_did = payload.agent.clone();
        if !self.agents.contains_key(&agent_did) {
            *self.realm_agents.entry(payload.realm.clone()).or_default() += 1;
            self.agents.insert(
                agent_did.clone(),
                AgentState {
                    realm: payload.realm.clone(),
                    window: Window::new(start),
                    baseline: Baseline::default(),
                    seen: SeenSet::default(),
                    sent: SeenSet::default(),
                    first_seen: ts,
                    last_seen: ts,
                    silent: false,
                    expected_missing: 0.0,
                    expected_at: ts,
                    longest_pause: 0.0,
                    burst: 0,
                    burst_size: 0.0,
                    burst_start: ts,
                    burst_secs: 0.0,
                    recent: Vec::new(),
                    pins: Vec::new(),
                    lastid: None,
                    young: Vec::new(),
                    tick_events: 0,
                    recent_actual: 0.0,
                    recent_expected: 0.0,
                    recent_at: ts,
                    flows: AgentFlows::default(),
                    kinds: KindStats::default(),
                    last_policy_change: i64::MIN,
                },
            );
        }
        self.realm_first.entry(payload.realm.clone()).or_insert(ts);
        if let Some(state) = self.agents.get_mut(&agent_did) {
            if !state.silent {
                // A pause that ended by itself: it was normal for this agent.
                let bursts = state.expected_missing / state.burst_unit();
                state.longest_pause = state.longest_pause.max(bursts);
            }
            if ts - state.last_seen >= BURST_GAP_SECS && state.burst > 0 {
                let size = state.burst as f32;
                let secs = (state.last_seen - state.burst_start).max(0) as f32;
                if state.burst_size == 0.0 {
                    (state.burst_size, state.burst_secs) = (size, secs);
                } else {
                    state.burst_size += 0.05 * (size - state.burst_size);
                    state.burst_secs += 0.05 * (secs - state.burst_secs);
                }
                state.burst = 0;
                state.burst_start = ts;
            }
            state.burst += 1;
            state.silent = false;
            state.expected_missing = 0.0;
            state.expected_at = state.expected_at.max(ts);
            if start > state.window.start {
                let closed = std::mem::replace(&mut state.window, Window::new(start));
                findings.extend(self.close(&agent_did, closed, start));
            }
        }
        if matches!(payload.kind, Kind::PolicyChange) {
            self.policy_changes.insert(payload.realm.clone(), ts);
            if let Some(state) = self.agents.get_mut(&agent_did) {
                state.last_policy_change = ts;
            }
        }
        findings.extend(self.flow(&agent_did, observation));
        findings.extend(self.pin(&agent_did, observation));
        findings.extend(self.lastid_classes(&agent_did, observation));
        findings.extend(self.count(&agent_did, observation));
        findings
    }

    /// Adds an accepted event to its agent's window and kind statistics.
    fn count(&mut self, did: &str, observation: &Observation) -> Vec<Finding> {
        let payload = &observation.payload;
        let ts = payload.ts.timestamp();
        let max_realm = self.config.max_realm_targets;
        let Some(state) = self.agents.get_mut(did) else {
            return Vec::new();
        };
        let elapsed = (ts - state.last_seen).max(0) as f32 / 3600.0;
        state.last_seen = state.last_seen.max(ts);
        state.tick_events += 1;
        let known = state.baseline.windows > 0;
        let mut mask = group_bit("activity");
        let window = &mut state.window;
        window.events += 1;
        if let Some(action) = &payload.action {
            window.add_action(action);
            if matches!(payload.kind, Kind::ToolCall) && state.seen.insert_tagged("t:", action) && known {
                window.new_tools += 1;
                mask |= group_bit("tools");
            }
        }
        if let Some(target) = &payload.target {
            window.add_target(target);
            if state.seen.insert_tagged("g:", target) && known {
                window.new_targets += 1;
                mask |= group_bit("destinations");
            }
            if let Some(host) = host_of(target)
                && state.seen.insert_tagged("h:", &host)
                && known
            {
                window.new_targets += 1;
                mask |= group_bit("destinations");
            }
            let realm_set = self.realm_targets.entry(state.realm.clone()).or_default();
            if realm_set.len() < max_realm && realm_set.insert(hash64(target)) && known {
                window.new_realm_targets += 1;
                mask |= group_bit("destinations");
            }
        }
        let bytes = payload.bytes_out.unwrap_or(0);
        window.bytes_out += bytes;
        let typical = state.baseline.stats.get(6).map_or(0.0, |stat| stat.mean)
            / state.baseline.stats.first().map_or(1.0, |stat| stat.mean.max(1.0));
        if bytes > 0 && bytes as f32 >= 2.0 * typical.max(256.0) {
            mask |= group_bit("egress");
        }
        window.tokens += payload.tokens_in.unwrap_or(0) + payload.tokens_out.unwrap_or(0);
        match payload.outcome {
            Some(Outcome::Error) => {
                window.errors += 1;
                mask |= group_bit("failures");
            }
            Some(Outcome::Denied) => {
                window.denials += 1;
                mask |= group_bit("failures");
            }
            _ => {}
        }
        match payload.kind {
            Kind::CredentialUse => {
                window.credential_use += 1;
                mask |= group_bit("privilege");
            }
            Kind::MemoryWrite => {
                window.memory_write += 1;
                mask |= group_bit("memory");
                if let Some(memory) = &payload.memory_id
                    && window.memories.len() < features::MAX_EVIDENCE
                    && !window.memories.contains(memory)
                {
                    window.memories.push(memory.clone());
                }
            }
            Kind::Delegation => {
                window.delegation += 1;
                mask |= group_bit("privilege");
            }
            Kind::MemoryDelete => {
                window.memory_delete += 1;
                mask |= group_bit("memory");
            }
            _ => {}
        }
        let how = baseline::hour_of_week(ts);
        if state.baseline.unusual_hour(how) {
            window.off_hours += 1;
            mask |= group_bit("timing");
        }
        window.add_evidence(observation.log_index, mask);
        if let Some(index) = observation.log_index {
            if state.recent.len() >= 8 {
                state.recent.remove(0);
            }
            state.recent.push((payload.seq, index));
        }
        state.baseline.count_hour(ts, 1, elapsed);
        let gone = state.kinds.count(kind_index(payload.kind), observation.log_index);
        let realm = state.realm.clone();
        let mut findings = Vec::new();
        for (kind, since, expected) in gone {
            let kind_name = Kind::ALL[kind].as_str();
            let mut evidence: Vec<u64> = state.kinds.last[kind].into_iter().collect();
            evidence.extend(observation.log_index);
            findings.push(Finding {
                id: String::new(),
                agent: did.to_owned(),
                realm: realm.clone(),
                finding_type: "audit_gap".into(),
                score: 72,
                severity: Severity::High,
                confidence: 0.75,
                learning: false,
                window: Span {
                    start: payload.ts,
                    end: payload.ts,
                },
                explanation: vec![Contribution {
                    feature: format!("kind:{kind_name}"),
                    observed: 0.0,
                    expected: f64::from(expected),
                    deviation: f64::from(since) / f64::from(state.kinds.longest[kind].max(1)),
                }],
                evidence,
                rule_id: Some("custos-audit-gap".into()),
                title: format!(
                    "Agent stopped reporting {kind_name} events while its other events continue: none in its last {since} events, about {expected:.0} expected (audit switched off at the source?)"
                ),
                tags: vec!["attack.t1562".into(), "owasp.agentic.t8".into()],
                dedup_key: format!("audit_gap|{did}|{kind_name}|{}", state.kinds.last[kind].unwrap_or(0)),
                memories: Vec::new(),
                ts: payload.ts,
            });
        }
        findings.into_iter().filter_map(|finding| self.hold(finding)).collect()
    }

    /// LastID audit classes: an event class the agent's signed audit policy switched on
    /// (a `ChainCheckpoint` record's `metadata.audit_policy`, or else every class it has
    /// reported) that stops while its other records keep arriving was switched off at
    /// the source. Reported once per silence, as `audit_disabled`.
    fn lastid_classes(&mut self, did: &str, observation: &Observation) -> Option<Finding> {
        let payload = &observation.payload;
        let attrs = payload.attrs.as_ref()?;
        if attrs.get("custos.source").and_then(serde_json::Value::as_str) != Some("lastid") {
            return None;
        }
        let class = attrs.get("lastid.event_type")?.as_str()?.to_owned();
        let policy = (class == "ChainCheckpoint")
            .then(|| attrs.get("lastid.record")?.as_str())
            .flatten()
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok())
            .and_then(|record| {
                let policy = &record["metadata"]["audit_policy"];
                let listed = policy.as_array().or_else(|| policy["event_types"].as_array())?;
                Some(
                    listed
                        .iter()
                        .filter_map(|name| name.as_str().map(str::to_owned))
                        .collect::<std::collections::BTreeSet<_>>(),
                )
            });
        let state = self.agents.get_mut(did)?;
        let classes = state.lastid.get_or_insert_with(LastIdClasses::default);
        if let Some(policy) = policy {
            classes.policy = Some(policy);
        }
        let mut silenced = None;
        for (name, stat) in classes.classes.iter_mut() {
            if *name == class {
                continue;
            }
            stat.since = stat.since.saturating_add(1);
            let on = classes.policy.as_ref().is_none_or(|policy| policy.contains(name));
            let quiet = stat.since >= LASTID_SILENT_MIN.max(LASTID_SILENT_FACTOR * stat.longest);
            if on && !stat.reported && stat.seen >= LASTID_SEEN_MIN && quiet && silenced.is_none() {
                stat.reported = true;
                silenced = Some((name.clone(), stat.since, stat.last_index));
            }
        }
        let stat = classes.classes.entry(class).or_default();
        if stat.seen > 0 {
            stat.longest = stat.longest.max(stat.since);
        }
        stat.seen = stat.seen.saturating_add(1);
        stat.since = 0;
        stat.reported = false;
        stat.last_index = observation.log_index;
        let (name, since, last_index) = silenced?;
        let lastid_did = attrs
            .get("custos.attested_for")
            .and_then(serde_json::Value::as_str)
            .unwrap_or(did)
            .to_owned();
        Some(Finding {
            id: String::new(),
            agent: did.to_owned(),
            realm: state.realm.clone(),
            finding_type: "audit_disabled".into(),
            score: 80,
            severity: Severity::High,
            confidence: 0.8,
            learning: false,
            window: Span {
                start: payload.ts,
                end: payload.ts,
            },
            explanation: vec![Contribution {
                feature: format!("lastid:{name}"),
                observed: 0.0,
                expected: f64::from(since),
                deviation: f64::from(since),
            }],
            evidence: last_index.into_iter().chain(observation.log_index).collect(),
            rule_id: Some("custos-lastid-audit-off".into()),
            title: format!(
                "LastID agent {lastid_did} stopped recording {name} while its audit policy has it on: none in its last {since} records (audit switched off at the source?)"
            ),
            tags: vec!["attack.t1562".into(), "owasp.agentic.t8".into()],
            dedup_key: format!("audit_disabled|{did}|{name}|{}", last_index.unwrap_or(0)),
            memories: Vec::new(),
            ts: payload.ts,
        })
    }

    /// Tool pinning: the definition hash (`attrs.tool_hash`) a tool first reports is
    /// pinned per agent; a call reporting another one is a rug pull (reported once per
    /// change; the new definition is pinned after it).
    fn pin(&mut self, did: &str, observation: &Observation) -> Option<Finding> {
        let payload = &observation.payload;
        let hash = payload
            .attrs
            .as_ref()
            .and_then(|attrs| attrs.get("tool_hash"))
            .and_then(serde_json::Value::as_str)?;
        let action = payload.action.as_deref().or(payload.target.as_deref())?;
        let state = self.agents.get_mut(did)?;
        let (tool, definition) = (hash64(action) as u32, hash64(hash) as u32);
        let Some(pin) = state.pins.iter_mut().find(|(pinned, _, _)| *pinned == tool) else {
            if state.pins.len() < MAX_PINNED_TOOLS {
                state.pins.push((tool, definition, observation.log_index));
            }
            return None;
        };
        if pin.1 == definition {
            return None;
        }
        let first = pin.2;
        *pin = (tool, definition, observation.log_index);
        let mut evidence: Vec<u64> = first.into_iter().chain(observation.log_index).collect();
        evidence.sort_unstable();
        let finding = Finding {
            id: String::new(),
            agent: did.to_owned(),
            realm: payload.realm.clone(),
            finding_type: "rug_pull".into(),
            score: 80,
            severity: Severity::High,
            confidence: 0.9,
            learning: false,
            window: Span {
                start: payload.ts,
                end: payload.ts,
            },
            explanation: vec![Contribution {
                feature: "rule:custos-tool-rug-pull".into(),
                observed: 1.0,
                expected: 0.0,
                deviation: 8.0,
            }],
            dedup_key: format!("rug_pull|{did}|{action}|{hash}"),
            evidence,
            rule_id: Some("custos-tool-rug-pull".into()),
            title: format!("Tool definition changed after first use (rug pull): {action} now reports {hash}"),
            tags: vec!["attack.t1195".into(), "owasp.agentic.t6".into()],
            memories: Vec::new(),
            ts: payload.ts,
        };
        self.report(finding)
    }

    /// Follows untrusted content through sessions, spans and memories (see [`flows`]).
    fn flow(&mut self, did: &str, observation: &Observation) -> Vec<Finding> {
        // Borrowed out of the config for the call, so no event copies the list.
        let internal = std::mem::take(&mut self.config.internal_domains);
        let raised = self.flow_marks(did, observation, &internal);
        self.config.internal_domains = internal;
        raised
    }

    fn flow_marks(&mut self, did: &str, observation: &Observation, internal: &[String]) -> Vec<Finding> {
        let payload = &observation.payload;
        let ts = payload.ts.timestamp();
        let index = observation.log_index;
        let max_realm = self.config.max_realm_targets;
        let Some(state) = self.agents.get_mut(did) else {
            return Vec::new();
        };
        let realm = state.realm.clone();
        let realm_mature = self
            .realm_first
            .get(&realm)
            .is_some_and(|first| ts - first >= REALM_WARMUP_SECS);
        let mut raised: Vec<Raised> = Vec::new();
        if let Some(destination) = flows::outward_destination(payload, internal) {
            let agent_new = !state.sent.contains_tagged("d:", &destination);
            let realm_set = self.realm_sends.entry(realm.clone()).or_default();
            let realm_new = !realm_set.contains(&hash64(&destination));
            if agent_new
                && realm_new
                && realm_mature
                && let Some(mark) = state.flows.tainted_by(payload, ts, TAINT_SECS)
            {
                raised.push((
                    "exfiltration",
                    vec![mark.cause[0], mark.cause[1], index],
                    format!("sent to {destination}, a destination neither this agent nor its realm ever sent to, after untrusted content in the same session"),
                    None,
                ));
            }
            if agent_new && let Some(mark) = state.flows.poisoned_by(payload, ts, POISON_SECS) {
                raised.push((
                    "memory_poisoning",
                    vec![mark.cause[0], mark.cause[1], index],
                    format!("sent to {destination} (new for this agent) after reading back a memory written from untrusted content"),
                    mark.memory.clone(),
                ));
            }
            state.sent.insert_tagged("d:", &destination);
            // Concentration: how much of what the agent sends goes to recent newcomers.
            let print = features::tagged_hash("d:", &destination);
            state.young.retain(|(_, first)| ts - first <= YOUNG_SECS);
            if agent_new && !state.young.iter().any(|(young, _)| *young == print) {
                if state.young.len() >= MAX_YOUNG {
                    state.young.remove(0);
                }
                state.young.push((print, ts));
            }
            state.window.outward += 1;
            if state.young.iter().any(|(young, _)| *young == print) {
                state.window.outward_young += 1;
            }
            if realm_set.len() < max_realm {
                realm_set.insert(hash64(&destination));
            }
        }
        if matches!(payload.kind, Kind::CredentialUse)
            && let Some(mark) = state.flows.poisoned_by(payload, ts, POISON_SECS)
        {
            raised.push((
                "memory_poisoning",
                vec![mark.cause[0], mark.cause[1], index],
                format!(
                    "used credential {} after reading back a memory written from untrusted content",
                    payload.target.as_deref().unwrap_or("(unnamed)")
                ),
                mark.memory.clone(),
            ));
        }
        match payload.kind {
            Kind::MemoryWrite => {
                let memories = self.tainted_memories.entry(realm.clone()).or_default();
                if let Some(key) = flows::memory_key(payload) {
                    let declared = payload
                        .attrs
                        .as_ref()
                        .and_then(|attrs| attrs.get("source_trust"))
                        .and_then(serde_json::Value::as_str);
                    if declared == Some("untrusted") || state.flows.tainted_by(payload, ts, TAINT_SECS).is_some() {
                        memories.insert(key, ts, index);
                    } else if declared == Some("trusted") {
                        memories.clear(key);
                    }
                }
            }
            Kind::MemoryRead => {
                if let Some(key) = flows::memory_key(payload)
                    && let Some((written, write_index)) =
                        self.tainted_memories.get(&realm).and_then(|memories| memories.get(key))
                    && ts - written <= MEMORY_TAINT_SECS
                {
                    state.flows.poison(payload, ts, [write_index, index]);
                    state.flows.taint(payload, ts, [write_index, index]);
                }
            }
            _ => {}
        }
        if flows::is_untrusted_input(payload, internal) {
            state.flows.taint(payload, ts, [index, None]);
        }
        if raised.is_empty() {
            return Vec::new();
        }
        let memories_written = state.window.memories.clone();
        let mut findings = Vec::new();
        for (finding_type, causes, what, poisoned) in raised {
            let mut evidence: Vec<u64> = causes.into_iter().flatten().collect();
            evidence.sort_unstable();
            evidence.dedup();
            let (rule, tags, title) = if finding_type == "exfiltration" {
                (
                    "custos-untrusted-flow-exfiltration",
                    vec!["attack.exfiltration", "attack.t1567", "owasp.agentic.t2"],
                    "Untrusted content followed by a send to a new destination (injection, then exfiltration)",
                )
            } else {
                (
                    "custos-memory-poisoning",
                    vec!["attack.t1565", "owasp.agentic.t1"],
                    "Memory written from untrusted content was read back, then a credential or an outward send followed (memory poisoning)",
                )
            };
            // The poisoned memory first: it is what quarantine_memory must take out.
            let mut memories: Vec<String> = poisoned.into_iter().collect();
            for memory in memories_written.iter().chain(&payload.memory_id) {
                if !memories.contains(memory) {
                    memories.push(memory.clone());
                }
            }
            findings.push(Finding {
                id: String::new(),
                agent: did.to_owned(),
                realm: realm.clone(),
                finding_type: finding_type.into(),
                score: 88,
                severity: Severity::Critical,
                confidence: 0.8,
                learning: false,
                window: Span {
                    start: payload.ts,
                    end: payload.ts,
                },
                explanation: vec![Contribution {
                    feature: format!("flow:{finding_type}"),
                    observed: evidence.len() as f64,
                    expected: 0.0,
                    deviation: 8.8,
                }],
                dedup_key: format!(
                    "{finding_type}|{did}|{}",
                    evidence
                        .iter()
                        .take(evidence.len().saturating_sub(1).max(1))
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                evidence,
                rule_id: Some(rule.into()),
                title: format!("{title}: {what}"),
                tags: tags.into_iter().map(str::to_owned).collect(),
                memories,
                ts: payload.ts,
            });
        }
        findings
            .into_iter()
            .filter_map(|finding| self.report(finding))
            .collect()
    }

    /// Closes every window that ended before `now` (event time, seconds), reports
    /// agents gone silent, and releases held findings that are due. Call it
    /// periodically; a live node passes its clock.
    pub fn tick(&mut self, now: i64) -> Vec<Finding> {
        let width = self.config.window_secs.max(1);
        let now_start = now.div_euclid(width) * width;
        let ended: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, state)| state.window.events > 0 && state.window.start < now_start)
            .map(|(did, _)| did.clone())
            .collect();
        let mut findings = Vec::new();
        for did in ended {
            if let Some(state) = self.agents.get_mut(&did) {
                let closed = std::mem::replace(&mut state.window, Window::new(now_start));
                findings.extend(self.close(&did, closed, now_start));
            }
        }
        let quiet = self.config.silence_windows * width;
        let mut silent = Vec::new();
        let mut realms: HashMap<&str, (f32, f32)> = HashMap::new();
        for state in self.agents.values_mut() {
            // Recent activity against the rhythm, decayed: the realm's lull check.
            let from = state.expected_at.max(state.last_seen);
            let dt = (now - state.recent_at).max(0) as f32;
            state.recent_at = state.recent_at.max(now);
            let decay = (-dt / RECENT_SECS).exp();
            let expected = if now > from {
                expected_between(&state.baseline, from, now)
            } else {
                0.0
            };
            state.recent_actual = state.recent_actual * decay + state.tick_events as f32;
            state.recent_expected = state.recent_expected * decay + expected;
            state.tick_events = 0;
            let realm = realms.entry(state.realm.as_str()).or_default();
            realm.0 += state.recent_actual;
            realm.1 += state.recent_expected;
            if !state.silent {
                state.expected_missing += expected;
            }
            state.expected_at = state.expected_at.max(now);
        }
        let lull: HashSet<String> = realms
            .into_iter()
            .filter(|(_, (actual, expected))| *expected >= LULL_MIN_EXPECTED && *actual < LULL_SHARE * expected)
            .map(|(realm, _)| realm.to_owned())
            .collect();
        for (did, state) in &mut self.agents {
            if state.silent {
                continue;
            }
            let bursts = state.expected_missing / state.burst_unit();
            if now - state.last_seen > quiet.max(BURST_GAP_SECS)
                && bursts >= SILENCE_BURSTS.max(PAUSE_MARGIN * state.longest_pause)
            {
                state.silent = true;
                if lull.contains(&state.realm) {
                    tracing::debug!(agent = %did, realm = %state.realm, "silence not reported: the realm is in a lull");
                    continue;
                }
                silent.push((
                    did.clone(),
                    state.realm.clone(),
                    state.last_seen,
                    state.expected_missing,
                ));
            }
        }
        for (did, realm, last_seen, expected) in silent {
            let finding = Finding {
                id: String::new(),
                agent: did.clone(),
                realm,
                finding_type: "silence".into(),
                score: 75,
                severity: Severity::High,
                confidence: 0.8,
                learning: false,
                window: Span {
                    start: at(last_seen),
                    end: at(now),
                },
                explanation: vec![Contribution {
                    feature: "events".into(),
                    observed: 0.0,
                    expected: f64::from(expected),
                    deviation: f64::from(expected.sqrt()),
                }],
                evidence: self
                    .agents
                    .get(&did)
                    .and_then(|state| state.kinds.last.iter().flatten().max().copied())
                    .into_iter()
                    .collect(),
                rule_id: Some("custos-agent-silent".into()),
                title: format!(
                    "Agent stopped reporting: nothing for {} minutes where its weekly rhythm expects about {expected:.0} events (audit coverage drop)",
                    (now - last_seen) / 60
                ),
                tags: vec!["attack.t1562".into(), "owasp.agentic.t8".into()],
                dedup_key: format!("silence|{did}|{last_seen}"),
                memories: Vec::new(),
                ts: at(now),
            };
            findings.extend(self.report(finding));
        }
        self.watermark = self.watermark.max(now);
        findings.extend(self.release(now, false));
        findings
    }

    /// Releases every held finding now (end of a replay), after the crowd check.
    pub fn flush(&mut self) -> Vec<Finding> {
        self.release(i64::MAX, true)
    }

    fn rule_finding(&mut self, observation: &Observation, hit: &RuleHit) -> Option<Finding> {
        let payload = &observation.payload;
        let finding_type = hit
            .tags
            .iter()
            .find_map(|tag| tag.strip_prefix("custos.type."))
            .unwrap_or("rule")
            .to_owned();
        let mut memories = Vec::new();
        if let Some(state) = self.agents.get(&payload.agent) {
            memories = state.window.memories.clone();
        }
        if let Some(memory) = &payload.memory_id
            && !memories.contains(memory)
        {
            memories.push(memory.clone());
        }
        // Exactly the matched events: a correlation's building-block hits, or the event;
        // for a refused fork or replay, the stored event at that seq when it is recent.
        let mut evidence: Vec<u64> = hit.events.clone();
        evidence.extend(observation.log_index);
        if observation.log_index.is_none()
            && let Some(state) = self.agents.get(&payload.agent)
            && let Some((_, index)) = state.recent.iter().find(|(seq, _)| *seq == payload.seq)
        {
            evidence.push(*index);
        }
        evidence.sort_unstable();
        evidence.dedup();
        let score = level_score(&hit.level);
        let ts = payload.ts;
        let width = self.config.window_secs.max(1);
        let start = ts.timestamp().div_euclid(width) * width;
        let explanation = vec![Contribution {
            feature: format!("rule:{}", hit.rule_id),
            observed: 1.0,
            expected: 0.0,
            deviation: f64::from(score) / 10.0,
        }];
        // A repeat is one whose matched events were already cited (a correlation firing
        // again on the same window) or, for a single-event rule, the same event subject.
        let cited_key = format!("{}|{}", hit.rule_id, payload.agent);
        let now = ts.timestamp();
        if hit.correlation
            && let Some((when, cited)) = self.cited.get(&cited_key)
            && now - when < self.config.rule_dedup_secs
            && evidence.iter().any(|index| cited.contains(index))
        {
            return None;
        }
        let subject = payload
            .target
            .clone()
            .or_else(|| payload.action.clone())
            .unwrap_or_else(|| payload.kind.as_str().to_owned());
        let dedup_key = if hit.correlation {
            format!(
                "rule|{}|{}|{}",
                hit.rule_id,
                payload.agent,
                evidence.first().copied().unwrap_or(0)
            )
        } else {
            format!("rule|{}|{}|{subject}", hit.rule_id, payload.agent)
        };
        let finding = self.report(Finding {
            id: String::new(),
            agent: payload.agent.clone(),
            realm: payload.realm.clone(),
            finding_type,
            score,
            severity: Severity::from_score(score),
            confidence: 0.9,
            learning: false,
            window: Span {
                start: at(start),
                end: at(start + width),
            },
            explanation,
            evidence: evidence.clone(),
            rule_id: Some(hit.rule_id.clone()),
            title: hit.title.clone(),
            tags: hit
                .tags
                .iter()
                .filter(|tag| !tag.starts_with("custos."))
                .cloned()
                .collect(),
            dedup_key,
            memories,
            ts,
        })?;
        let entry = self.cited.entry(cited_key).or_insert((now, Vec::new()));
        if now - entry.0 >= self.config.rule_dedup_secs {
            entry.1.clear();
        }
        entry.0 = now;
        entry.1.extend(&evidence);
        if entry.1.len() > 4 * rules::MAX_CORRELATION_EVENTS {
            let excess = entry.1.len() - 4 * rules::MAX_CORRELATION_EVENTS;
            entry.1.drain(..excess);
        }
        Some(finding)
    }

    /// Scores a closed window against the agent's baseline (or its peers'), learns it,
    /// and reports anomalies and drift.
    fn close(&mut self, did: &str, window: Window, _next_start: i64) -> Vec<Finding> {
        let width = self.config.window_secs.max(1);
        let min_windows = self.config.min_windows;
        let threshold = self.config.threshold;
        let config = self.config.baseline.clone();
        let Some(state) = self.agents.get_mut(did) else {
            return Vec::new();
        };
        let how = baseline::hour_of_week(window.start);
        let vector = window.vector();
        let realm = state.realm.clone();
        let learning = state.baseline.windows < min_windows;
        let peer = self.peers.entry(realm.clone()).or_default();
        let group = if learning {
            self.groups.nearest(&peers::profile(&state.baseline, &vector))
        } else {
            None
        };
        let (contributions, confidence, judged) = if !learning {
            (state.baseline.score(&vector, how), 0.85, String::new())
        } else if let Some((index, size)) = group {
            (
                self.groups.baselines[index].score(&vector, how),
                0.5,
                format!(", judged against peer group {index} ({size} agents) while learning"),
            )
        } else if peer.windows >= min_windows {
            (
                peer.score(&vector, how),
                0.5,
                ", judged against realm peers while learning".to_owned(),
            )
        } else {
            (Vec::new(), 0.0, String::new())
        };
        let young_share = (window.outward > 0).then(|| window.outward_young as f32 / window.outward as f32);
        let drifted = state.baseline.learn_with(&vector, how, &config, young_share);
        peer.learn(&vector, how, &config);
        let policy_changed = window.start
            - self
                .policy_changes
                .get(&realm)
                .copied()
                .unwrap_or(i64::MIN / 2)
                .max(state.last_policy_change)
            <= POLICY_GRACE_SECS;
        let span = Span {
            start: at(window.start),
            end: at(window.start + width),
        };
        let mut findings = Vec::new();
        if !contributions.is_empty() {
            // Signals add up across independent groups: each group gives its largest
            // deviation, groups below GROUP_MIN give nothing, timing is capped, and
            // failures right after a policy change are expected.
            let mut leaders: Vec<(usize, &Contribution, f64)> = GROUPS
                .iter()
                .enumerate()
                .filter_map(|(g, (name, members))| {
                    let top = members
                        .iter()
                        .map(|f| &contributions[*f])
                        .max_by(|a, b| a.deviation.total_cmp(&b.deviation))?;
                    let mut z = top.deviation;
                    if *name == "activity" && z > ACTIVITY_KNEE {
                        z = ACTIVITY_KNEE + 2.0 * (1.0 + (z - ACTIVITY_KNEE) / 2.0).ln();
                    }
                    if learning {
                        z = z.min(LEARNING_CAP);
                    }
                    if *name == "timing" {
                        z = z.min(TIMING_CAP);
                    }
                    // A new agent's tools and targets are all new: novelty says nothing
                    // while it learns.
                    if learning && matches!(*name, "tools" | "destinations") {
                        z = 0.0;
                    }
                    if *name == "failures" && policy_changed {
                        z = 0.0;
                    }
                    (z >= GROUP_MIN).then_some((g, top, z))
                })
                .collect();
            leaders.sort_by(|a, b| b.2.total_cmp(&a.2));
            let combined = leaders.iter().map(|(_, _, z)| z * z).sum::<f64>().sqrt();
            let score = if combined > 3.0 {
                (100.0 * (1.0 - (-(combined - 3.0) / 4.0).exp()))
                    .round()
                    .clamp(0.0, 100.0) as u8
            } else {
                0
            };
            if score >= threshold
                && let Some((lead, top, _)) = leaders.first()
            {
                let lead_name = GROUPS[*lead].0;
                // A type names the attack when its own signal is strong, whichever leads.
                let strong = |name: &str, feature: Option<&str>, at_least: f64| {
                    leaders.iter().any(|(g, c, z)| {
                        GROUPS[*g].0 == name && *z >= at_least && feature.is_none_or(|feature| c.feature == feature)
                    })
                };
                let finding_type = if window.errors + window.denials >= PROBING_MIN
                    && strong("failures", None, PROBING_Z)
                {
                    "probing"
                } else if window.memory_delete >= MASS_DELETE_MIN && strong("memory", Some("memory_delete"), STRONG) {
                    "mass_delete"
                } else {
                    "anomaly"
                };
                let mask = leaders.iter().fold(0u8, |mask, (g, _, _)| mask | (1 << g));
                let explanation: Vec<Contribution> = leaders.iter().map(|(_, c, _)| (*c).clone()).collect();
                let others = leaders.len() - 1;
                findings.push(Finding {
                    id: String::new(),
                    agent: did.to_owned(),
                    realm: realm.clone(),
                    finding_type: finding_type.into(),
                    score,
                    severity: Severity::from_score(score),
                    confidence,
                    learning,
                    window: span.clone(),
                    title: format!(
                        "Unusual behaviour: {} is {:.0} where {:.0} is expected ({:.1} deviations){}{}",
                        top.feature,
                        top.observed,
                        top.expected,
                        top.deviation,
                        if others > 0 {
                            format!(
                                ", with {others} more signal{} (combined {combined:.1})",
                                if others == 1 { "" } else { "s" }
                            )
                        } else {
                            String::new()
                        },
                        judged
                    ),
                    tags: feature_tags(&top.feature),
                    dedup_key: format!("{finding_type}|{did}|{lead_name}"),
                    explanation,
                    evidence: window.cite(mask),
                    rule_id: None,
                    memories: window.memories.clone(),
                    ts: span.end,
                });
            }
        }
        if !drifted.is_empty() {
            tracing::debug!(agent = %did, learning, features = ?drifted.iter().map(|d| d.feature.as_str()).collect::<Vec<_>>(), "drift test fired");
        }
        if !learning {
            for drift in drifted {
                findings.push(Finding {
                    id: String::new(),
                    agent: did.to_owned(),
                    realm: realm.clone(),
                    finding_type: "drift".into(),
                    score: 65,
                    severity: Severity::Medium,
                    confidence: 0.7,
                    learning: false,
                    window: span.clone(),
                    title: format!(
                        "Slow drift: {} has moved from about {:.1} to {:.1} per window",
                        drift.feature, drift.expected, drift.observed
                    ),
                    tags: feature_tags(&drift.feature),
                    dedup_key: format!("drift|{did}|{}", drift.feature),
                    explanation: vec![drift],
                    evidence: window.cite(group_bit("egress") | group_bit("activity")),
                    rule_id: None,
                    memories: window.memories.clone(),
                    ts: span.end,
                });
            }
        }
        findings.into_iter().filter_map(|finding| self.hold(finding)).collect()
    }

    /// Findings of the behavioural types wait for the crowd check (see [`hold_of`]);
    /// the rest are reported at once.
    fn hold(&mut self, finding: Finding) -> Option<Finding> {
        let Some((hold, _)) = hold_of(&finding.finding_type) else {
            return self.report(finding);
        };
        let ts = finding.ts.timestamp();
        self.candidates.push(Candidate {
            realm: finding.realm.clone(),
            finding_type: finding.finding_type.clone(),
            agent: finding.agent.clone(),
            ts,
        });
        self.held.push(Held {
            finding,
            due: ts + hold,
        });
        None
    }

    /// Reports held findings that are due, unless a crowd of their realm raised the
    /// same type around the same time.
    fn release(&mut self, now: i64, all: bool) -> Vec<Finding> {
        if self.held.is_empty() {
            return Vec::new();
        }
        let horizon = self.watermark - 2 * 86_400;
        self.candidates.retain(|candidate| candidate.ts >= horizon);
        let (due, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|held| all || held.due <= now);
        self.held = kept;
        let mut out = Vec::new();
        for held in due {
            let finding = held.finding;
            let span = hold_of(&finding.finding_type).map_or(0, |(_, span)| span);
            let ts = finding.ts.timestamp();
            let mut crowd: Vec<&str> = self
                .candidates
                .iter()
                .filter(|candidate| {
                    candidate.realm == finding.realm
                        && candidate.finding_type == finding.finding_type
                        && (candidate.ts - ts).abs() <= span
                })
                .map(|candidate| candidate.agent.as_str())
                .collect();
            crowd.sort_unstable();
            crowd.dedup();
            let realm_size = self.realm_agents.get(&finding.realm).copied().unwrap_or(1) as f32;
            if crowd.len() >= CROWD_MIN && crowd.len() as f32 >= CROWD_SHARE * realm_size {
                tracing::debug!(
                    realm = %finding.realm,
                    finding_type = %finding.finding_type,
                    agents = crowd.len(),
                    "finding suppressed: much of the realm changed at once"
                );
                continue;
            }
            out.extend(self.report(finding));
        }
        out
    }

    /// Applies dedup; fills in the id.
    fn report(&mut self, mut finding: Finding) -> Option<Finding> {
        let ts = finding.ts.timestamp();
        let period = if finding.rule_id.is_some() && finding.finding_type != "silence" {
            self.config.rule_dedup_secs
        } else {
            self.config.dedup_secs
        };
        if let Some(last) = self.reported.get(&finding.dedup_key)
            && ts - last < period
        {
            return None;
        }
        self.reported.insert(finding.dedup_key.clone(), ts);
        finding.id = finding::finding_id(&finding.dedup_key, finding.window.start.timestamp());
        Some(finding)
    }

    /// Writes the state to `path` atomically (temporary file, fsync, rename).
    pub fn snapshot(&mut self, path: &Path) -> std::io::Result<()> {
        // Old dedup entries can go: they no longer suppress anything.
        let horizon = self.watermark - self.config.dedup_secs.max(self.config.rule_dedup_secs).max(86_400);
        self.reported.retain(|_, ts| *ts >= horizon);
        self.cited.retain(|_, (ts, _)| *ts >= horizon);
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            config: self.config.clone(),
            agents: self.agents.clone(),
            peers: self.peers.clone(),
            groups: self.groups.clone(),
            realm_targets: self.realm_targets.clone(),
            realm_sends: self.realm_sends.clone(),
            realm_first: self.realm_first.clone(),
            realm_agents: self.realm_agents.clone(),
            tainted_memories: self.tainted_memories.clone(),
            policy_changes: self.policy_changes.clone(),
            cited: self.cited.clone(),
            held: self.held.clone(),
            candidates: self.candidates.clone(),
            reported: self.reported.clone(),
            watermark: self.watermark,
            last_log_index: self.last_log_index,
            last_log_indexes: self.last_log_indexes.clone(),
            rules: self.rules.export_state(),
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
        let temporary = path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)
    }

    /// Resumes from a snapshot written by [`Detector::snapshot`]; `Ok(false)` when there
    /// is none. The configuration given to [`Detector::new`] is kept.
    pub fn restore(&mut self, path: &Path) -> std::io::Result<bool> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error),
        };
        let snapshot: Snapshot = serde_json::from_slice(&bytes)
            .map_err(|error| std::io::Error::other(format!("{}: {error}", path.display())))?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(std::io::Error::other(format!(
                "{}: snapshot version {} is not {SNAPSHOT_VERSION}",
                path.display(),
                snapshot.version
            )));
        }
        self.agents = snapshot.agents;
        self.peers = snapshot.peers;
        self.groups = snapshot.groups;
        self.realm_targets = snapshot.realm_targets;
        self.realm_sends = snapshot.realm_sends;
        self.realm_first = snapshot.realm_first;
        self.realm_agents = snapshot.realm_agents;
        self.tainted_memories = snapshot.tainted_memories;
        self.policy_changes = snapshot.policy_changes;
        self.cited = snapshot.cited;
        self.held = snapshot.held;
        self.candidates = snapshot.candidates;
        self.reported = snapshot.reported;
        self.watermark = snapshot.watermark;
        self.last_log_index = snapshot.last_log_index;
        self.last_log_indexes = snapshot.last_log_indexes;
        if !self.rules.import_state(snapshot.rules) {
            tracing::warn!("rule correlation state did not match the loaded rules; starting those windows empty");
        }
        Ok(true)
    }

    /// Approximate bytes of detector state per agent (serialized size), for the bench.
    pub fn state_bytes_per_agent(&self) -> usize {
        if self.agents.is_empty() {
            return 0;
        }
        let total: usize = self
            .agents
            .iter()
            .map(|(did, state)| did.len() + serde_json::to_vec(state).map_or(0, |bytes| bytes.len()))
            .sum();
        total / self.agents.len()
    }
}

/// Events an agent's profile expects between two times (seconds), hour by hour
/// ([`Baseline::expected_rate`]).
fn expected_between(baseline: &Baseline, from: i64, to: i64) -> f32 {
    let mut total = 0.0;
    let mut t = from;
    let end = to.min(from + 14 * 86_400);
    while t < end {
        let hour_end = (t.div_euclid(3600) + 1) * 3600;
        let slice = (hour_end.min(end) - t) as f32 / 3600.0;
        let how = baseline::hour_of_week(t);
        let rate = baseline.expected_rate(how, t).unwrap_or(0.0);
        total += rate * slice;
        t = hour_end;
    }
    total
}
