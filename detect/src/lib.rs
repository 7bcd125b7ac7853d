//! Custos detect: a streaming detector of agent behaviour.
//!
//! ```text
//!  ingest (after the WAL fsync) ──Feed──▶ Detector::observe
//!                                          │
//!          ┌───────────────────────────────┼──────────────────────────────┐
//!          ▼                               ▼                              ▼
//!   Sigma rules (rsigma-eval,       per-agent tumbling window      silence check (tick)
//!   correlations, filters)          ─▶ features ─▶ baselines
//!          │                           (own; while learning, its k-means peer
//!          │                            group; EWMA/MAD + hour-of-week; Page-Hinkley)
//!          └──────────────┬────────────────┘
//!                         ▼
//!          dedup (key, period) ─▶ Finding ─▶ signed by the detector key into the log
//!                                          ─▶ the responder's playbooks
//! ```
//!
//! The detector is a plain state machine: no threads, no clocks. Time is the events'
//! own timestamps, so `custos eval` can replay days of traffic in seconds and get the
//! same findings as the live node. State snapshots to JSON and resumes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use custos_event::{Kind, Observation, Outcome, Signal};
use serde::{Deserialize, Serialize};

pub mod baseline;
pub mod features;
pub mod finding;
pub mod peers;
pub mod rules;

pub use baseline::{Baseline, BaselineConfig, Contribution};
pub use finding::{Finding, Severity, Span};
pub use peers::PeerGroups;
pub use rules::{RuleError, RuleHit, Rules};

use features::{SeenSet, Window, host_of};

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
    /// A finding with the same dedup key is not reported again within this many seconds.
    pub dedup_secs: i64,
    /// The same for rule findings (per rule and agent): a day, the longest correlation
    /// window in the shipped pack, so one rug pull is one finding, not one an hour.
    #[serde(default = "default_rule_dedup")]
    pub rule_dedup_secs: i64,
    /// An agent active in most recent windows that sends nothing for this many windows
    /// is reported silent.
    pub silence_windows: i64,
    pub baseline: BaselineConfig,
    /// Realm-wide "seen targets" sets stop growing at this many entries.
    pub max_realm_targets: usize,
    /// Peer groups are refitted (k-means over mature agents' profiles) this often, in
    /// event-time seconds; every tenth of that while no fit has succeeded yet.
    #[serde(default = "default_peer_refit")]
    pub peer_refit_secs: i64,
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
        }
    }
}

fn default_rule_dedup() -> i64 {
    86_400
}

fn default_peer_refit() -> i64 {
    3600
}

/// One agent's detector state (a few KiB: see `custos bench detect`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentState {
    pub realm: String,
    pub window: Window,
    pub baseline: Baseline,
    tools: SeenSet,
    targets: SeenSet,
    hosts: SeenSet,
    /// Event time of the last event, seconds.
    pub last_seen: i64,
    /// One bit per recent window, newest lowest: was the agent active?
    activity: u64,
    silent: bool,
}

/// The detector's whole state, as snapshotted.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    config: DetectorConfig,
    agents: HashMap<String, AgentState>,
    peers: HashMap<String, Baseline>,
    #[serde(default)]
    groups: PeerGroups,
    realm_targets: HashMap<String, HashSet<u64>>,
    reported: HashMap<String, i64>,
    watermark: i64,
    last_log_index: Option<u64>,
    rules: serde_json::Value,
}

const SNAPSHOT_VERSION: u32 = 1;

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
    /// Dedup key → event time it was last reported.
    reported: HashMap<String, i64>,
    /// Latest event time seen, seconds.
    pub watermark: i64,
    /// Highest log index observed (the snapshot resumes after it).
    pub last_log_index: Option<u64>,
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

/// ATT&CK and OWASP Agentic tags for a baseline finding led by `feature`.
fn feature_tags(feature: &str) -> Vec<String> {
    let tags: &[&str] = match feature {
        "bytes_out" => &["attack.exfiltration", "attack.t1048", "owasp.agentic.t2"],
        "credential_use" => &["attack.t1078", "owasp.agentic.t3"],
        "new_tools" | "distinct_actions" => &["owasp.agentic.t2"],
        "new_targets" | "new_realm_targets" | "distinct_targets" => &["attack.discovery", "owasp.agentic.t2"],
        "memory_write" => &["owasp.agentic.t1"],
        "memory_delete" => &["attack.t1485", "owasp.agentic.t1"],
        "delegation" => &["attack.t1548", "owasp.agentic.t3"],
        "tokens" | "events" => &["owasp.agentic.t4"],
        "error_rate" | "denial_rate" => &["owasp.agentic.t2"],
        "off_hours_events" => &["attack.t1078"],
        _ => &[],
    };
    tags.iter().map(|tag| (*tag).to_owned()).collect()
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
            reported: HashMap::new(),
            watermark: 0,
            last_log_index: None,
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
    }

    /// Processes one observation; returns the findings it completes.
    pub fn observe(&mut self, observation: &Observation) -> Vec<Finding> {
        if let Some(index) = observation.log_index
            && self.last_log_index.is_some_and(|last| index <= last)
        {
            // Already processed before the snapshot.
            return Vec::new();
        }
        let payload = &observation.payload;
        let ts = payload.ts.timestamp();
        self.watermark = self.watermark.max(ts);
        self.refit_peers();
        if observation.log_index.is_some() {
            self.last_log_index = observation.log_index.max(self.last_log_index);
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
        let state = self.agents.entry(agent_did.clone()).or_insert_with(|| AgentState {
            realm: payload.realm.clone(),
            window: Window::new(start),
            baseline: Baseline::default(),
            tools: SeenSet::default(),
            targets: SeenSet::default(),
            hosts: SeenSet::default(),
            last_seen: ts,
            activity: 0,
            silent: false,
        });
        state.silent = false;
        if start > state.window.start {
            let closed = std::mem::replace(&mut state.window, Window::new(start));
            findings.extend(self.close(&agent_did, closed, start));
        }
        let max_realm = self.config.max_realm_targets;
        let Some(state) = self.agents.get_mut(&agent_did) else {
            return findings;
        };
        state.last_seen = state.last_seen.max(ts);
        let window = &mut state.window;
        window.events += 1;
        window.add_evidence(observation.log_index);
        if let Some(action) = &payload.action {
            window.add_action(action);
            if matches!(payload.kind, Kind::ToolCall) && state.tools.insert(action) && state.baseline.windows > 0 {
                window.new_tools += 1;
            }
        }
        if let Some(target) = &payload.target {
            window.add_target(target);
            let known = state.baseline.windows > 0;
            if state.targets.insert(target) && known {
                window.new_targets += 1;
            }
            if let Some(host) = host_of(target)
                && state.hosts.insert(&host)
                && known
            {
                window.new_targets += 1;
            }
            let realm_set = self.realm_targets.entry(state.realm.clone()).or_default();
            let hash = u64::from_le_bytes(
                blake3::hash(target.as_bytes()).as_bytes()[..8]
                    .try_into()
                    .unwrap_or([0; 8]),
            );
            if realm_set.len() < max_realm && realm_set.insert(hash) && known {
                window.new_realm_targets += 1;
            }
        }
        window.bytes_out += payload.bytes_out.unwrap_or(0);
        window.tokens += payload.tokens_in.unwrap_or(0) + payload.tokens_out.unwrap_or(0);
        if let Some(outcome) = payload.outcome {
            window.with_outcome += 1;
            match outcome {
                Outcome::Error => window.errors += 1,
                Outcome::Denied => window.denials += 1,
                Outcome::Ok => {}
            }
        }
        match payload.kind {
            Kind::CredentialUse => window.credential_use += 1,
            Kind::MemoryWrite => {
                window.memory_write += 1;
                if let Some(memory) = &payload.memory_id
                    && window.memories.len() < features::MAX_EVIDENCE
                    && !window.memories.contains(memory)
                {
                    window.memories.push(memory.clone());
                }
            }
            Kind::Delegation => window.delegation += 1,
            Kind::MemoryDelete => window.memory_delete += 1,
            _ => {}
        }
        if state.baseline.unusual_hour(baseline::hour_of_week(ts)) {
            window.off_hours += 1;
        }
        findings
    }

    /// Closes every window that ended before `now` (event time, seconds) and reports
    /// agents gone silent. Call it periodically; a live node passes its clock.
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
        let silence = self.config.silence_windows * width;
        let silent: Vec<(String, String, i64)> = self
            .agents
            .iter()
            .filter(|(_, state)| {
                !state.silent
                    && state.activity.count_ones() >= 48
                    && now - state.last_seen > silence
                    && state.baseline.usually_active(
                        baseline::hour_of_week(now) % 24,
                        baseline::hour_of_week(state.last_seen) % 24,
                    )
            })
            .map(|(did, state)| (did.clone(), state.realm.clone(), state.last_seen))
            .collect();
        for (did, realm, last_seen) in silent {
            if let Some(state) = self.agents.get_mut(&did) {
                state.silent = true;
            }
            let expected = self
                .agents
                .get(&did)
                .map_or(0.0, |state| f64::from(state.baseline.stats[0].mean));
            findings.extend(self.report(Finding {
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
                    expected,
                    deviation: ((now - last_seen) / width) as f64,
                }],
                evidence: Vec::new(),
                rule_id: Some("custos-agent-silent".into()),
                title: format!(
                    "Agent stopped reporting: nothing for {} minutes after steady activity (audit coverage drop)",
                    (now - last_seen) / 60
                ),
                tags: vec!["attack.t1562".into(), "owasp.agentic.t8".into()],
                dedup_key: format!("silence|{did}|{last_seen}"),
                memories: Vec::new(),
                ts: at(now),
            }));
        }
        self.watermark = self.watermark.max(now);
        findings
    }

    fn rule_finding(&mut self, observation: &Observation, hit: &RuleHit) -> Option<Finding> {
        let payload = &observation.payload;
        let finding_type = hit
            .tags
            .iter()
            .find_map(|tag| tag.strip_prefix("custos.type."))
            .unwrap_or("rule")
            .to_owned();
        let mut evidence: Vec<u64> = Vec::new();
        let mut memories = Vec::new();
        if let Some(state) = self.agents.get(&payload.agent) {
            if hit.correlation {
                evidence.extend(&state.window.evidence);
            }
            memories = state.window.memories.clone();
        }
        if let Some(memory) = &payload.memory_id
            && !memories.contains(memory)
        {
            memories.push(memory.clone());
        }
        evidence.extend(observation.log_index);
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
        self.report(Finding {
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
            evidence,
            rule_id: Some(hit.rule_id.clone()),
            title: hit.title.clone(),
            tags: hit
                .tags
                .iter()
                .filter(|tag| !tag.starts_with("custos."))
                .cloned()
                .collect(),
            dedup_key: format!("rule|{}|{}", hit.rule_id, payload.agent),
            memories,
            ts,
        })
    }

    /// Scores a closed window against the agent's baseline (or its peers'), learns it,
    /// and reports anomalies and drift.
    fn close(&mut self, did: &str, window: Window, next_start: i64) -> Vec<Finding> {
        let width = self.config.window_secs.max(1);
        let min_windows = self.config.min_windows;
        let threshold = self.config.threshold;
        let config = self.config.baseline.clone();
        let Some(state) = self.agents.get_mut(did) else {
            return Vec::new();
        };
        let shift = ((next_start - window.start) / width).clamp(1, 64) as u32;
        state.activity = state.activity.checked_shl(shift).unwrap_or(0) | 1;
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
        let drifted = state.baseline.learn(&vector, how, &config);
        state.baseline.count_hour(how, window.events);
        peer.learn(&vector, how, &config);
        let span = Span {
            start: at(window.start),
            end: at(window.start + width),
        };
        let mut findings = Vec::new();
        if let Some(top) = contributions.first() {
            let z = top.deviation;
            let score = if z > 3.0 {
                (100.0 * (1.0 - (-(z - 3.0) / 4.0).exp())).round().clamp(0.0, 100.0) as u8
            } else {
                0
            };
            if score >= threshold {
                let explanation: Vec<Contribution> = contributions
                    .iter()
                    .filter(|c| c.deviation > 2.0)
                    .take(3)
                    .cloned()
                    .collect();
                findings.push(Finding {
                    id: String::new(),
                    agent: did.to_owned(),
                    realm: realm.clone(),
                    finding_type: "anomaly".into(),
                    score,
                    severity: Severity::from_score(score),
                    confidence,
                    learning,
                    window: span.clone(),
                    title: format!(
                        "Unusual behaviour: {} is {:.0} where {:.0} is expected ({:.1} deviations){}",
                        top.feature, top.observed, top.expected, top.deviation, judged
                    ),
                    tags: feature_tags(&top.feature),
                    dedup_key: format!("anomaly|{did}|{}", top.feature),
                    explanation,
                    evidence: window.evidence.clone(),
                    rule_id: None,
                    memories: window.memories.clone(),
                    ts: span.end,
                });
            }
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
                    evidence: window.evidence.clone(),
                    rule_id: None,
                    memories: window.memories.clone(),
                    ts: span.end,
                });
            }
        }
        findings
            .into_iter()
            .filter_map(|finding| self.report(finding))
            .collect()
    }

    /// Applies dedup; fills in the id.
    fn report(&mut self, mut finding: Finding) -> Option<Finding> {
        let ts = finding.ts.timestamp();
        let period = if finding.dedup_key.starts_with("rule|") {
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
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            config: self.config.clone(),
            agents: self.agents.clone(),
            peers: self.peers.clone(),
            groups: self.groups.clone(),
            realm_targets: self.realm_targets.clone(),
            reported: self.reported.clone(),
            watermark: self.watermark,
            last_log_index: self.last_log_index,
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
        self.reported = snapshot.reported;
        self.watermark = snapshot.watermark;
        self.last_log_index = snapshot.last_log_index;
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
