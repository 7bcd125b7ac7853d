//! Wires the detector and the responder into a node.
//!
//! ```text
//!  sequencer (after fsync) ──Feed──▶ detector thread ──finding──▶ AppendSigned (detector.key)
//!                                        │                              │ durable
//!                                        │                              ▼
//!                                        │                       responder thread
//!                                        │                   playbooks ─▶ Enforce (control entries)
//!                                        │                             ─▶ webhook (own thread)
//!                                        ▼                             ─▶ AppendSigned (responder.key)
//!                               snapshot (data/detector.snapshot)
//! ```
//!
//! The stages never call each other's crates: the detector's signed payload is what the
//! responder reads, and the node only sees `Feed`, `AppendSigned` and `Enforce`.
//!
//! Restarts: the detector resumes from its snapshot and the node replays the events after
//! it, plus every finding and action record in the log. Findings produced during the
//! replay are held; one whose id is already in the log is dropped, the rest (a crash
//! between an event's commit and its finding's append) are written once the replay ends.
//! The snapshot is only written when every finding it accounts for is in the log.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use custos_detect::{Detector, DetectorConfig, Finding, Rules};
use custos_event::{ACTION_PAYLOAD_TYPE, AgentKey, ChainState, FINDING_PAYLOAD_TYPE, Feed};
use custos_ingest::metrics;
use custos_ingest::{ApiError, Control, Enforce, Hooks, Operations};
use custos_respond::{ActionRecord, ActionStatus, Approval, Enforcement, RespondError, Responder};
use serde_json::{Value, json};

/// How the detector and the responder run inside `custos serve`.
#[derive(Clone, Debug)]
pub(crate) struct PipelineConfig {
    pub(crate) data: PathBuf,
    pub(crate) detector: DetectorConfig,
    /// Extra rule directories (YAML), added to the shipped pack.
    pub(crate) rules: Vec<PathBuf>,
    /// Extra playbooks directory (YAML).
    pub(crate) playbooks: Option<PathBuf>,
    /// Load the shipped playbooks (`respond/playbooks`).
    pub(crate) shipped_playbooks: bool,
    pub(crate) snapshot_every: Duration,
    /// Messages (mostly events) that may wait for the detector; past it, the sequencer
    /// waits for the detector instead of holding more in memory.
    pub(crate) detector_queue: usize,
}

/// The default of [`PipelineConfig::detector_queue`].
pub(crate) const DETECTOR_QUEUE: usize = 16_384;

impl PipelineConfig {
    pub(crate) fn new(data: PathBuf) -> Self {
        Self {
            data,
            detector: DetectorConfig::default(),
            rules: Vec::new(),
            playbooks: None,
            shipped_playbooks: true,
            snapshot_every: Duration::from_secs(60),
            detector_queue: DETECTOR_QUEUE,
        }
    }
}

const KEEP: usize = 10_000;

/// What the HTTP routes read: recent findings and actions, pending approvals.
#[derive(Default)]
struct Views {
    findings: Mutex<VecDeque<Value>>,
    actions: Mutex<VecDeque<Value>>,
    pending: Mutex<Vec<Approval>>,
    /// Each playbook (name, caps, dry run) with the realms where a cap paused it.
    playbooks: Mutex<Vec<(Value, Vec<String>)>>,
}

fn push_capped(list: &Mutex<VecDeque<Value>>, value: Value) {
    let mut list = list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if list.len() >= KEEP {
        list.pop_front();
    }
    list.push_back(value);
}

fn visible(realms: &[String], realm: &str) -> bool {
    realms.is_empty() || realms.iter().any(|allowed| allowed == realm)
}

fn newest(list: &Mutex<VecDeque<Value>>, realms: &[String], limit: usize) -> Vec<Value> {
    let list = list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    list.iter()
        .rev()
        .filter(|value| visible(realms, value["realm"].as_str().unwrap_or_default()))
        .take(limit)
        .cloned()
        .collect()
}

enum DetectorMsg {
    Feed(Feed),
    /// A summary of one agent's baseline, for its page.
    Baseline(String, mpsc::Sender<Option<Value>>),
    Control(Control),
    Stop(mpsc::Sender<()>),
}

enum ResponderMsg {
    /// A finding now in the log at this index.
    Finding(custos_respond::Finding, u64),
    /// An action record read back from the log at start.
    Replayed(Vec<u8>),
    /// A record made outside the responder's own flow (a webhook's failure).
    Record(Box<ActionRecord>),
    Control(Control),
    Decide {
        id: String,
        approve: bool,
        by: String,
        realms: Vec<String>,
        reply: mpsc::Sender<Result<Value, ApiError>>,
    },
    Undo {
        id: String,
        by: String,
        realms: Vec<String>,
        reply: mpsc::Sender<Result<Value, ApiError>>,
    },
    Resume {
        playbook: String,
        realm: String,
        by: String,
        realms: Vec<String>,
        reply: mpsc::Sender<Result<Value, ApiError>>,
    },
    Stop(mpsc::Sender<()>),
}

/// The detector and responder of one node, ready to wire into `start_with`.
pub(crate) struct Pipeline {
    detector_tx: SyncSender<DetectorMsg>,
    responder_tx: Sender<ResponderMsg>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub(crate) detector_did: String,
    pub(crate) responder_did: String,
}

/// Timing marks the demo and `bench detect` read: when a finding was logged and when its
/// enforcement was durable.
#[derive(Default)]
pub(crate) struct Marks {
    pub(crate) findings: Mutex<Vec<(Instant, String, String)>>,
    pub(crate) enforced: Mutex<Vec<(Instant, String, String)>>,
}

impl Pipeline {
    /// Loads keys, rules, playbooks and the detector snapshot; starts both threads.
    /// Returns the pipeline and the hooks to pass to `custos_ingest::start_with`.
    pub(crate) fn start(config: PipelineConfig, marks: Arc<Marks>) -> anyhow::Result<(Self, Hooks)> {
        std::fs::create_dir_all(&config.data).with_context(|| format!("creating {}", config.data.display()))?;
        let detector_key = custos_store::keyfile::load_or_create(&config.data.join("detector.key"))
            .context("loading the detector key")?;
        let responder_key = custos_store::keyfile::load_or_create(&config.data.join("responder.key"))
            .context("loading the responder key")?;
        let dirs: Vec<&Path> = config.rules.iter().map(PathBuf::as_path).collect();
        let rules = Rules::load(&dirs).context("loading detection rules")?;
        let mut detector = Detector::new(config.detector.clone(), rules);
        let snapshot = config.data.join("detector.snapshot");
        let restored = detector
            .restore(&snapshot)
            .with_context(|| format!("reading {}", snapshot.display()))?;
        let replay_from = if restored {
            detector.last_log_index.map_or(0, |index| index + 1)
        } else {
            0
        };
        tracing::info!(
            restored,
            replay_from,
            agents = detector.agents(),
            rules = detector.rule_count(),
            "detector ready"
        );
        let playbooks = custos_respond::load_playbooks(config.shipped_playbooks, config.playbooks.as_deref())
            .context("loading playbooks")?;
        let responder = Responder::new(playbooks);
        let views = Arc::new(Views::default());
        // Bounded: a detector that falls behind slows the sequencer down (which waits to
        // hand it the next event) instead of growing this queue without limit, at start
        // (replaying the log) and under load alike.
        let (detector_tx, detector_rx) = mpsc::sync_channel(config.detector_queue.max(1));
        let (responder_tx, responder_rx) = mpsc::channel();
        let detector_did = detector_key.did().to_owned();
        let responder_did = responder_key.did().to_owned();

        let detector_thread = DetectorThread {
            detector,
            key: detector_key,
            chain: ChainState::default(),
            control: None,
            replayed: false,
            held: Vec::new(),
            inbox: detector_rx,
            backlog: VecDeque::new(),
            logged_during_replay: std::collections::HashSet::new(),
            clean: true,
            snapshot,
            snapshot_every: config.snapshot_every,
            responder: responder_tx.clone(),
            views: views.clone(),
            marks: marks.clone(),
        };
        let responder_thread = ResponderThread {
            responder,
            key: responder_key,
            chain: ChainState::default(),
            control: None,
            own: responder_tx.clone(),
            views: views.clone(),
            marks,
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("custos-detector".into())
                .spawn(move || detector_thread.run())?,
            std::thread::Builder::new()
                .name("custos-responder".into())
                .spawn(move || responder_thread.run(responder_rx))?,
        ];
        let feed_tx = detector_tx.clone();
        let drain_detector = detector_tx.clone();
        let drain_responder = responder_tx.clone();
        let mut signers = std::collections::BTreeMap::new();
        signers.insert(detector_did.clone(), FINDING_PAYLOAD_TYPE.to_owned());
        signers.insert(responder_did.clone(), ACTION_PAYLOAD_TYPE.to_owned());
        let hooks = Hooks {
            feed: Some(Box::new(move |feed| {
                let _ = feed_tx.send(DetectorMsg::Feed(feed));
            })),
            replay_from,
            system_signers: signers,
            operations: Some(Arc::new(Ops {
                views,
                responder: responder_tx.clone(),
                detector: Mutex::new(detector_tx.clone()),
            })),
            drain: Some(Box::new(move || {
                // Detector first (its last findings reach the responder), then the responder.
                let (done, wait) = mpsc::channel();
                if drain_detector.send(DetectorMsg::Stop(done)).is_ok() {
                    let _ = wait.recv();
                }
                let (done, wait) = mpsc::channel();
                if drain_responder.send(ResponderMsg::Stop(done)).is_ok() {
                    let _ = wait.recv();
                }
            })),
            routes: None,
        };
        Ok((
            Self {
                detector_tx,
                responder_tx,
                threads,
                detector_did,
                responder_did,
            },
            hooks,
        ))
    }

    /// Gives both threads the node's write handle once the node has started.
    pub(crate) fn connect(&self, control: &Control) {
        let _ = self.detector_tx.send(DetectorMsg::Control(control.clone()));
        let _ = self.responder_tx.send(ResponderMsg::Control(control.clone()));
    }

    /// Waits for both threads (after the node's shutdown has drained them).
    pub(crate) fn join(self) {
        drop(self.detector_tx);
        drop(self.responder_tx);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct Ops {
    views: Arc<Views>,
    responder: Sender<ResponderMsg>,
    /// Behind a mutex only because `Operations` must be `Sync` (std's `Sender` was not
    /// always); sends are rare (an agent page).
    detector: Mutex<SyncSender<DetectorMsg>>,
}

impl Ops {
    fn ask(&self, make: impl FnOnce(mpsc::Sender<Result<Value, ApiError>>) -> ResponderMsg) -> Result<Value, ApiError> {
        let (reply, answer) = mpsc::channel();
        self.responder
            .send(make(reply))
            .map_err(|_| ApiError::new(503, "stopping", "the responder has stopped"))?;
        answer
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| ApiError::new(503, "responder_busy", "the responder did not answer within 30 s"))?
    }
}

impl Operations for Ops {
    fn baseline(&self, agent: &str) -> Option<Value> {
        let (reply, answer) = mpsc::channel();
        self.detector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            // Never wait for room in a full queue from here: the page does without.
            .try_send(DetectorMsg::Baseline(agent.to_owned(), reply))
            .ok()?;
        // Behind queued events; an agent page does without rather than wait long.
        answer.recv_timeout(Duration::from_secs(5)).ok().flatten()
    }

    fn findings(&self, realms: &[String], limit: usize) -> Vec<Value> {
        newest(&self.views.findings, realms, limit)
    }

    fn actions(&self, realms: &[String], limit: usize) -> Vec<Value> {
        newest(&self.views.actions, realms, limit)
    }

    fn pending(&self, realms: &[String]) -> Vec<Value> {
        let pending = self
            .views
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending
            .iter()
            .filter(|approval| visible(realms, &approval.finding.realm))
            .map(|approval| serde_json::to_value(approval).unwrap_or(Value::Null))
            .collect()
    }

    fn decide(&self, approval: &str, approve: bool, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        self.ask(|reply| ResponderMsg::Decide {
            id: approval.to_owned(),
            approve,
            by: by.to_owned(),
            realms: realms.to_vec(),
            reply,
        })
    }

    fn undo(&self, action: &str, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        self.ask(|reply| ResponderMsg::Undo {
            id: action.to_owned(),
            by: by.to_owned(),
            realms: realms.to_vec(),
            reply,
        })
    }

    fn playbooks(&self, realms: &[String]) -> Vec<Value> {
        let playbooks = self
            .views
            .playbooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        playbooks
            .iter()
            .map(|(playbook, paused)| {
                let mut playbook = playbook.clone();
                let paused: Vec<&String> = paused.iter().filter(|realm| visible(realms, realm)).collect();
                playbook["paused_realms"] = json!(paused);
                playbook
            })
            .collect()
    }

    fn resume(&self, playbook: &str, realm: &str, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        self.ask(|reply| ResponderMsg::Resume {
            playbook: playbook.to_owned(),
            realm: realm.to_owned(),
            by: by.to_owned(),
            realms: realms.to_vec(),
            reply,
        })
    }
}

/// Advances a signer's chain past a payload read back from the log.
/// A serde enum's name (`critical`, `executed`, …) as a metric label.
fn label(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

fn follow_chain(chain: &mut ChainState, payload: &[u8]) {
    let seq = serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|value| value["seq"].as_u64());
    if let Some(seq) = seq
        && seq >= chain.next_seq
    {
        chain.next_seq = seq;
        chain.advance(payload);
    }
}

struct DetectorThread {
    detector: Detector,
    key: AgentKey,
    chain: ChainState,
    control: Option<Control>,
    replayed: bool,
    /// Findings made while replaying, written once the replay ends unless already logged.
    held: Vec<Finding>,
    /// Fed by the sequencer (bounded, see [`PipelineConfig::detector_queue`]).
    inbox: Receiver<DetectorMsg>,
    /// Messages taken from the inbox while a finding's append was pending, handled next.
    backlog: VecDeque<DetectorMsg>,
    logged_during_replay: std::collections::HashSet<String>,
    /// No finding is missing from the log: the state may be snapshotted.
    clean: bool,
    snapshot: PathBuf,
    snapshot_every: Duration,
    responder: Sender<ResponderMsg>,
    views: Arc<Views>,
    marks: Arc<Marks>,
}

impl DetectorThread {
    fn run(mut self) {
        let mut last_tick = Instant::now();
        let mut last_snapshot = Instant::now();
        loop {
            let next = match self.backlog.pop_front() {
                Some(message) => Ok(message),
                None => self.inbox.recv_timeout(Duration::from_millis(250)),
            };
            match next {
                Ok(DetectorMsg::Feed(feed)) => self.feed(feed),
                Ok(DetectorMsg::Baseline(agent, reply)) => {
                    let _ = reply.send(self.baseline(&agent));
                }
                Ok(DetectorMsg::Control(control)) => {
                    self.control = Some(control);
                    self.flush_held();
                }
                Ok(DetectorMsg::Stop(done)) => {
                    while let Some(message) = self.backlog.pop_front().or_else(|| self.inbox.try_recv().ok()) {
                        if let DetectorMsg::Feed(feed) = message {
                            self.feed(feed);
                        }
                    }
                    self.flush_held();
                    self.save();
                    let _ = done.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.replayed && self.control.is_some() && last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                for finding in self.detector.tick(Utc::now().timestamp()) {
                    self.publish(finding);
                }
            }
            if last_snapshot.elapsed() >= self.snapshot_every {
                last_snapshot = Instant::now();
                self.save();
            }
        }
    }

    fn feed(&mut self, feed: Feed) {
        match feed {
            Feed::Event(observation) => {
                if self.replayed {
                    let lag = (Utc::now() - observation.ingest_ts).num_microseconds().unwrap_or(0);
                    metrics::DETECTOR_LAG.set(lag.max(0) as f64 / 1e6);
                }
                for finding in self.detector.observe(&observation) {
                    if self.replayed && self.control.is_some() {
                        self.publish(finding);
                    } else {
                        self.held.push(finding);
                    }
                }
            }
            Feed::Finding { log_index, payload } => {
                follow_chain(&mut self.chain, &payload);
                if let Some((finding, _)) = Finding::from_payload(&payload) {
                    self.detector.remember(&finding);
                    self.logged_during_replay.insert(finding.id.clone());
                    self.view(&finding, log_index);
                }
            }
            Feed::Action { payload, .. } => {
                let _ = self.responder.send(ResponderMsg::Replayed(payload));
            }
            Feed::Replayed { next_index } => {
                tracing::info!(next_index, held = self.held.len(), "detector caught up with the log");
                self.replayed = true;
                self.flush_held();
            }
        }
    }

    fn baseline(&self, agent: &str) -> Option<Value> {
        let state = self.detector.agent(agent)?;
        let baseline = &state.baseline;
        let min_windows = self.detector.config.min_windows;
        let features: serde_json::Map<String, Value> = custos_detect::features::FEATURES
            .iter()
            .zip(&baseline.stats)
            .map(|(name, stat)| ((*name).to_owned(), json!({"expected": stat.mean, "spread": stat.dev})))
            .collect();
        let active_hours = baseline.profile.iter().filter(|count| **count > 0).count();
        Some(json!({
            "windows_learned": baseline.windows,
            "learning": baseline.windows < min_windows,
            "min_windows": min_windows,
            "last_seen": chrono::DateTime::from_timestamp(state.last_seen, 0).map(|at| at.to_rfc3339()),
            "active_hours_of_week": active_hours,
            "features": features,
        }))
    }

    fn flush_held(&mut self) {
        if !self.replayed || self.control.is_none() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        for finding in held {
            if !self.logged_during_replay.contains(&finding.id) {
                self.publish(finding);
            }
        }
        self.logged_during_replay.clear();
    }

    fn view(&self, finding: &Finding, log_index: u64) {
        let mut value = serde_json::to_value(finding).unwrap_or(Value::Null);
        value["log_index"] = json!(log_index);
        push_capped(&self.views.findings, value);
    }

    /// Signs the finding into the log, then hands it to the responder.
    fn publish(&mut self, finding: Finding) {
        let Some(control) = &self.control else {
            self.held.push(finding);
            return;
        };
        let before = self.chain.clone();
        let envelope = finding.sign(&self.key, &mut self.chain);
        let payload = envelope.payload.clone();
        let appended = control.append_signed_begin(envelope).and_then(|mut pending| {
            // The sequencer answers appends in order with everything else it does, and it
            // may be waiting for room in this thread's inbox to hand over an event: take
            // the inbox into the backlog meanwhile, or both would wait for ever.
            loop {
                if let Some(answer) = pending.try_take() {
                    return answer;
                }
                match self.inbox.recv_timeout(Duration::from_millis(1)) {
                    Ok(message) => self.backlog.push_back(message),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        match appended {
            Ok(log_index) => {
                metrics::FINDINGS
                    .with_label_values(&[label(&finding.severity).as_str()])
                    .inc();
                self.marks
                    .findings
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((Instant::now(), finding.agent.clone(), finding.finding_type.clone()));
                tracing::info!(
                    finding = finding.id,
                    r#type = finding.finding_type,
                    score = finding.score,
                    log_index,
                    "finding"
                );
                self.view(&finding, log_index);
                match serde_json::from_slice::<custos_respond::Finding>(&payload) {
                    Ok(read) => {
                        let _ = self.responder.send(ResponderMsg::Finding(read, log_index));
                    }
                    Err(error) => tracing::error!(%error, "the responder cannot read a finding payload"),
                }
            }
            Err(error) => {
                // Not in the log: keep the chain where it was, and do not snapshot past it,
                // so a restart replays the events and finds it again.
                self.chain = before;
                self.clean = false;
                tracing::error!(finding = finding.id, error = error.message, "could not log a finding");
            }
        }
    }

    fn save(&mut self) {
        if !self.clean || !self.replayed {
            return;
        }
        if let Err(error) = self.detector.snapshot(&self.snapshot) {
            tracing::error!(%error, path = %self.snapshot.display(), "detector snapshot failed");
        }
    }
}

struct ResponderThread {
    responder: Responder,
    key: AgentKey,
    chain: ChainState,
    control: Option<Control>,
    own: Sender<ResponderMsg>,
    views: Arc<Views>,
    marks: Arc<Marks>,
}

impl ResponderThread {
    fn run(mut self, inbox: Receiver<ResponderMsg>) {
        self.sync_views();
        let mut last_expire = Instant::now();
        loop {
            match inbox.recv_timeout(Duration::from_millis(500)) {
                Ok(ResponderMsg::Stop(done)) => {
                    while let Ok(message) = inbox.try_recv() {
                        self.handle(message);
                    }
                    let _ = done.send(());
                    return;
                }
                Ok(message) => self.handle(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.control.is_some() && last_expire.elapsed() >= Duration::from_secs(1) {
                last_expire = Instant::now();
                let expired = self.responder.expire(Utc::now());
                self.carry_out(expired, None);
            }
        }
    }

    fn handle(&mut self, message: ResponderMsg) {
        match message {
            ResponderMsg::Finding(finding, log_index) => {
                let records = self.responder.on_finding(&finding, Utc::now());
                self.carry_out(records, Some(log_index));
            }
            ResponderMsg::Replayed(payload) => {
                follow_chain(&mut self.chain, &payload);
                match serde_json::from_slice::<ActionRecord>(&payload) {
                    Ok(record) => {
                        self.responder.remember(&record);
                        self.view(&record, None);
                    }
                    Err(error) => tracing::warn!(%error, "unreadable action record in the log"),
                }
                self.sync_views();
            }
            ResponderMsg::Record(record) => {
                self.carry_out(vec![*record], None);
            }
            ResponderMsg::Control(control) => self.control = Some(control),
            ResponderMsg::Decide {
                id,
                approve,
                by,
                realms,
                reply,
            } => {
                let _ = reply.send(self.decide(&id, approve, &by, &realms));
            }
            ResponderMsg::Undo { id, by, realms, reply } => {
                let answer = self.undo(&id, &by, &realms);
                let _ = reply.send(answer);
            }
            ResponderMsg::Resume {
                playbook,
                realm,
                by,
                realms,
                reply,
            } => {
                let _ = reply.send(self.resume(&playbook, &realm, &by, &realms));
            }
            ResponderMsg::Stop(_) => {}
        }
    }

    fn decide(&mut self, id: &str, approve: bool, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        let missing = || ApiError::new(404, "unknown_approval", format!("no pending approval `{id}`"));
        let approval = self
            .responder
            .pending()
            .into_iter()
            .find(|approval| approval.id == id)
            .ok_or_else(missing)?;
        if !visible(realms, &approval.finding.realm) {
            return Err(missing());
        }
        let now = Utc::now();
        let records = if approve {
            self.responder.approve(id, by, now)
        } else {
            self.responder.deny(id, by, now).map(|record| vec![record])
        }
        .map_err(|error| ApiError::new(409, "approval_failed", error.to_string()))?;
        let records = self.carry_out(records, None);
        Ok(json!({ "approval": id, "decision": if approve { "approved" } else { "denied" }, "actions": records }))
    }

    fn undo(&mut self, id: &str, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        let visible_action = self
            .responder
            .history()
            .any(|record| record.id == id && visible(realms, &record.realm));
        if !visible_action {
            return Err(ApiError::new(
                404,
                "unknown_action",
                format!("no executed action `{id}`"),
            ));
        }
        let record = self
            .responder
            .request_undo(id, by, Utc::now())
            .map_err(|error| ApiError::new(409, "undo_refused", error.to_string()))?;
        let records = self.carry_out(vec![record], None);
        Ok(json!({ "actions": records }))
    }

    fn resume(&mut self, playbook: &str, realm: &str, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        if !visible(realms, realm) {
            return Err(ApiError::new(
                403,
                "realm_not_allowed",
                format!("this token is scoped to realms {realms:?}; it cannot resume playbooks in realm `{realm}`"),
            ));
        }
        let record = self
            .responder
            .resume_paused(playbook, realm, by, Utc::now())
            .map_err(|error| match error {
                RespondError::NoPlaybook(_) => ApiError::new(404, "unknown_playbook", error.to_string()),
                _ => ApiError::new(409, "not_paused", error.to_string()),
            })?;
        let records = self.carry_out(vec![record], None);
        Ok(json!({ "actions": records }))
    }

    fn view(&self, record: &ActionRecord, log_index: Option<u64>) {
        let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
        value["log_index"] = json!(log_index);
        push_capped(&self.views.actions, value);
    }

    fn sync_views(&self) {
        let pending = self.responder.pending();
        metrics::PENDING_APPROVALS.set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
        *self
            .views
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pending;
        let paused = self.responder.paused();
        let playbooks = self
            .responder
            .playbooks()
            .iter()
            .map(|playbook| {
                let summary = json!({
                    "name": playbook.name,
                    "description": playbook.description,
                    "dry_run": playbook.dry_run,
                    "caps": playbook.caps,
                });
                let realms = paused
                    .iter()
                    .filter(|(name, _)| *name == playbook.name)
                    .map(|(_, realm)| realm.clone())
                    .collect();
                (summary, realms)
            })
            .collect();
        *self
            .views
            .playbooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = playbooks;
    }

    /// Enforces executed records, then signs every record into the log. Returns the
    /// records as written.
    fn carry_out(&mut self, records: Vec<ActionRecord>, cause: Option<u64>) -> Vec<Value> {
        let mut written = Vec::new();
        for mut record in records {
            if record.status == ActionStatus::Executed
                && let Err(message) = self.enforce(&record, cause)
            {
                record.status = ActionStatus::Failed;
                record.reason = format!("{}; enforcement failed: {message}", record.reason);
            }
            let log_index = self.log(&record);
            metrics::ACTIONS
                .with_label_values(&[record.action.as_str(), label(&record.status).as_str()])
                .inc();
            self.view(&record, log_index);
            let mut value = serde_json::to_value(&record).unwrap_or(Value::Null);
            value["log_index"] = json!(log_index);
            written.push(value);
        }
        self.sync_views();
        written
    }

    fn enforce(&self, record: &ActionRecord, cause: Option<u64>) -> Result<(), String> {
        let Some(control) = &self.control else {
            return Err("the node is not connected yet".into());
        };
        let op = match &record.enforcement {
            Enforcement::RevokeAgent { agent } => Enforce::Revoke { agent: agent.clone() },
            Enforcement::QuarantineAgent { agent } => Enforce::Quarantine { agent: agent.clone() },
            Enforcement::ReinstateAgent { agent } => Enforce::Reinstate { agent: agent.clone() },
            Enforcement::QuarantineMemory { memory_id, agent } => Enforce::QuarantineMemory {
                memory: memory_id.clone(),
                agent: agent.clone(),
            },
            Enforcement::RestoreMemory { memory_id, agent } => Enforce::RestoreMemory {
                memory: memory_id.clone(),
                agent: agent.clone(),
            },
            Enforcement::RevokeCredential { credential, agent } => Enforce::RevokeCredential {
                credential: credential.clone(),
                agent: agent.clone(),
            },
            Enforcement::Webhook {
                url,
                secret_env,
                timeout_ms,
                retries,
            } => {
                self.webhook(record, url.clone(), secret_env.clone(), *timeout_ms, *retries);
                return Ok(());
            }
            Enforcement::None => return Ok(()),
        };
        control
            .enforce(op, &record.by, cause, Some(record.reason.clone()))
            .map_err(|error| error.message)?;
        self.marks
            .enforced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((Instant::now(), record.agent.clone(), record.action.clone()));
        Ok(())
    }

    /// Sends a webhook on its own thread so a slow receiver never delays a revocation;
    /// a final failure comes back as a `failed` record.
    fn webhook(&self, record: &ActionRecord, url: String, secret_env: String, timeout_ms: u64, retries: u32) {
        let own = self.own.clone();
        let record = record.clone();
        let spawned = std::thread::Builder::new()
            .name("custos-webhook".into())
            .spawn(move || {
                let secret = std::env::var(&secret_env).unwrap_or_default();
                let body = json!({ "action": record.ocsf(), "finding_id": record.finding_id });
                if let Err(message) = custos_respond::webhook::send(&url, secret.as_bytes(), &body, timeout_ms, retries)
                {
                    let mut failed = record;
                    failed.status = ActionStatus::Failed;
                    failed.idempotency_key = format!("{}|failed", failed.idempotency_key);
                    failed.reason = format!("webhook to {url} failed: {message}");
                    failed.enforcement = Enforcement::None;
                    let _ = own.send(ResponderMsg::Record(Box::new(failed)));
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start a webhook thread");
        }
    }

    /// Signs the record with the responder key into the log.
    fn log(&mut self, record: &ActionRecord) -> Option<u64> {
        let control = self.control.as_ref()?;
        let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
        value["kind"] = json!("action");
        value["seq"] = json!(self.chain.next_seq);
        value["prev"] = json!(self.chain.prev);
        value["ts"] = json!(record.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        let before = self.chain.clone();
        self.chain.advance(&bytes);
        let envelope = self.key.sign_envelope(ACTION_PAYLOAD_TYPE, bytes);
        match control.append_signed(envelope) {
            Ok(log_index) => Some(log_index),
            Err(error) => {
                self.chain = before;
                tracing::error!(
                    action = record.id,
                    error = error.message,
                    "could not log an action record"
                );
                None
            }
        }
    }
}
