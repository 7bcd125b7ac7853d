//! The detector stage: reads committed records, submits signed findings.
//!
//! ```text
//!  Subscription ──Committed::Event──▶ Detector::observe ─▶ outbox ─▶ sign ─▶ Submitter
//!               ──Committed::Finding─▶ remember (replay), view          (one in flight;
//!               ──Committed::Replayed▶ live: held findings go out         the receipt
//!  requests (baseline page, stop) ◀── the node's HTTP edge                 frees the next)
//! ```
//!
//! The stage never waits for the writer while the writer may be waiting for it: a
//! finding goes into an outbox, at most one is in flight, and its receipt is checked
//! between records. Signing happens when the finding is sent, so the detector's own
//! chain (seq/prev) never has a hole, and a refused finding is signed again later.
//!
//! Restarts: the detector resumes from its snapshot; the log replays the events after it
//! and every finding. Findings made during the replay are held; at the end of the replay
//! those already in the log (by id) are dropped and the rest are sent. The snapshot is
//! written only when every finding it accounts for is in the log.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use chrono::Utc;
use custos_event::{AgentKey, ChainLanes, ChainState};
use custos_stage::{Committed, Receipt, Refused, Submission, Submitter, Subscription};
use serde_json::{Value, json};

use crate::{Detector, Finding};

/// How long a finding's receipt may take before the finding is sent again.
const RECEIPT_PATIENCE: Duration = Duration::from_secs(60);

/// Requests from outside the stream (the node's HTTP edge).
pub enum Request {
    /// A summary of one agent's baseline, for its page.
    Baseline(String, Sender<Option<Value>>),
    /// Handle everything already committed, send what is held, snapshot, and stop.
    Stop(Sender<()>),
}

/// What the stage reports, for metrics and the node's views.
pub enum Report<'a> {
    /// A finding is in the log (read back at replay, or committed live).
    Logged {
        finding: &'a Finding,
        log_index: u64,
        live: bool,
    },
    /// Seconds between an event's ingest and its detection.
    Lag(f64),
    /// A finding could not be logged.
    Failed { finding: &'a Finding, refused: &'a Refused },
}

/// The detector stage's state.
pub struct DetectorStage {
    detector: Detector,
    key: AgentKey,
    /// The signing chain, one per lane (one per partition log, see [`ChainLanes`]).
    chains: ChainLanes,
    replayed: bool,
    /// Findings made while replaying, sent once the replay ends unless already logged.
    held: Vec<Finding>,
    logged_during_replay: HashSet<String>,
    /// Findings waiting to be signed and sent, oldest first.
    outbox: VecDeque<Finding>,
    /// The finding sent and not yet answered, with the chain before it was signed and
    /// when it was sent.
    inflight: Option<(Finding, ChainState, Receipt, Instant)>,
    /// When a retryable refusal last happened (the outbox waits a little).
    backoff_until: Option<Instant>,
    /// No finding is missing from the log: the state may be snapshotted.
    clean: bool,
    snapshot: PathBuf,
    snapshot_every: Duration,
    /// How long a receipt may take before the finding is sent again.
    patience: Duration,
    report: Box<dyn FnMut(Report<'_>) + Send>,
}

impl DetectorStage {
    /// A stage around `detector` (already restored from `snapshot` when it exists).
    pub fn new(
        detector: Detector,
        key: AgentKey,
        snapshot: PathBuf,
        snapshot_every: Duration,
        report: Box<dyn FnMut(Report<'_>) + Send>,
    ) -> Self {
        // The chain as of the snapshot: a subscription that resumes after it (a Kafka
        // consumer offset) never shows the detector its older findings again.
        let chains = restore_chains(&snapshot, 1);
        Self {
            detector,
            key,
            chains,
            replayed: false,
            held: Vec::new(),
            logged_during_replay: HashSet::new(),
            outbox: VecDeque::new(),
            inflight: None,
            backoff_until: None,
            clean: true,
            snapshot,
            snapshot_every,
            patience: RECEIPT_PATIENCE,
            report,
        }
    }

    /// Keeps one signing chain per partition of `lanes` (by the finding's realm), for
    /// writers that keep one log per partition.
    pub fn with_lanes(mut self, lanes: u32) -> Self {
        self.chains = restore_chains(&self.snapshot, lanes);
        self
    }

    /// How long a receipt may take before the finding is sent again (60 s by default).
    pub fn with_receipt_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The detector's signing key as a `did:key` (the writer's system signer).
    pub fn did(&self) -> &str {
        self.key.did()
    }

    /// Runs until a [`Request::Stop`], or until the subscription closes.
    pub fn run(mut self, subscription: &mut dyn Subscription, submit: &dyn Submitter, requests: Receiver<Request>) {
        let mut last_tick = Instant::now();
        let mut last_snapshot = Instant::now();
        loop {
            match subscription.recv(Duration::from_millis(20)) {
                Ok(Some(record)) => {
                    self.committed(record);
                    // Take what is queued before looking at requests and receipts.
                    for _ in 0..1024 {
                        match subscription.recv(Duration::ZERO) {
                            Ok(Some(record)) => self.committed(record),
                            _ => break,
                        }
                    }
                }
                Ok(None) => {}
                Err(custos_stage::StageError::Closed) => {
                    self.finish(submit);
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "detector: reading committed records failed; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            while let Ok(request) = requests.try_recv() {
                match request {
                    Request::Baseline(agent, reply) => {
                        let _ = reply.send(self.baseline(&agent));
                    }
                    Request::Stop(done) => {
                        while let Ok(Some(record)) = subscription.recv(Duration::ZERO) {
                            self.committed(record);
                        }
                        self.finish(submit);
                        if self.clean
                            && let Err(error) = subscription.ack()
                        {
                            tracing::warn!(%error, "detector: could not acknowledge its position");
                        }
                        let _ = done.send(());
                        return;
                    }
                }
            }
            self.pump(submit);
            if self.replayed && last_tick.elapsed() >= Duration::from_secs(1) {
                last_tick = Instant::now();
                let found = self.detector.tick(Utc::now().timestamp());
                self.outbox.extend(found);
                self.pump(submit);
            }
            if last_snapshot.elapsed() >= self.snapshot_every {
                last_snapshot = Instant::now();
                if self.save()
                    && let Err(error) = subscription.ack()
                {
                    tracing::warn!(%error, "detector: could not acknowledge its position");
                }
            }
        }
    }

    /// Sends what is held and waits for the last receipts, then snapshots.
    fn finish(&mut self, submit: &dyn Submitter) {
        self.release_held();
        let deadline = Instant::now() + Duration::from_secs(30);
        while (self.inflight.is_some() || !self.outbox.is_empty()) && Instant::now() < deadline {
            self.backoff_until = None;
            self.pump(submit);
            let answer = match &self.inflight {
                Some((_, _, receipt, _)) => receipt.wait(Duration::from_millis(100)),
                None => continue,
            };
            match answer {
                Err(refused) if refused.code == "writer_timeout" => {}
                answer => self.settle(answer),
            }
        }
        if self.inflight.is_some() || !self.outbox.is_empty() {
            self.clean = false;
            tracing::error!(
                waiting = self.outbox.len() + usize::from(self.inflight.is_some()),
                "detector stopped with findings not logged; the next start finds them again"
            );
        }
        self.save();
    }

    /// Handles one committed record.
    pub fn committed(&mut self, record: Committed) {
        match record {
            Committed::Event(observation) => {
                if self.replayed {
                    let lag = (Utc::now() - observation.ingest_ts).num_microseconds().unwrap_or(0);
                    (self.report)(Report::Lag(lag.max(0) as f64 / 1e6));
                }
                let found = self.detector.observe(&observation);
                if self.replayed {
                    self.outbox.extend(found);
                } else {
                    self.held.extend(found);
                }
            }
            Committed::Finding { log_index, payload, .. } => {
                self.chains.follow(&payload);
                if let Some((finding, _)) = Finding::from_payload(&payload) {
                    if !self.replayed {
                        self.detector.remember(&finding);
                        self.logged_during_replay.insert(finding.id.clone());
                    }
                    (self.report)(Report::Logged {
                        finding: &finding,
                        log_index,
                        live: self.replayed,
                    });
                }
            }
            Committed::Replayed { next_index } => {
                tracing::info!(next_index, held = self.held.len(), "detector caught up with the log");
                self.replayed = true;
                self.release_held();
            }
            Committed::Action { .. } | Committed::Control { .. } => {}
        }
    }

    fn release_held(&mut self) {
        if !self.replayed {
            return;
        }
        let held = std::mem::take(&mut self.held);
        for finding in held {
            if !self.logged_during_replay.contains(&finding.id) {
                self.outbox.push_back(finding);
            }
        }
        self.logged_during_replay.clear();
    }

    /// Checks the receipt in flight; sends the next finding when there is none.
    fn pump(&mut self, submit: &dyn Submitter) {
        if let Some((_, _, receipt, sent)) = &self.inflight {
            match receipt.try_take() {
                Some(answer) => self.settle(answer),
                // A receipt lost on the way (the writer crashed after appending, say):
                // send the finding again. Signed from the same chain it is the same bytes,
                // which the writer answers with the first append.
                None if sent.elapsed() >= self.patience => {
                    let waited = self.patience.as_millis();
                    self.settle(Err(Refused::retryable(
                        "writer_timeout",
                        format!("no receipt within {waited} ms"),
                    )));
                }
                None => return,
            }
        }
        if self.backoff_until.is_some_and(|until| Instant::now() < until) {
            return;
        }
        let Some(finding) = self.outbox.pop_front() else {
            return;
        };
        let chain = self.chains.chain_mut(&finding.realm);
        let before = chain.clone();
        let envelope = match finding.sign(&self.key, chain) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::error!(finding = finding.id, %error, "cannot encode a finding; dropped");
                self.clean = false;
                return;
            }
        };
        match submit.submit(Submission::Finding(envelope)) {
            Ok(receipt) => self.inflight = Some((finding, before, receipt, Instant::now())),
            Err(error) => {
                tracing::warn!(%error, "detector: the transport refused a finding; retrying");
                *self.chains.chain_mut(&finding.realm) = before;
                self.outbox.push_front(finding);
                self.backoff_until = Some(Instant::now() + Duration::from_millis(500));
            }
        }
    }

    fn settle(&mut self, answer: Result<custos_stage::Appended, Refused>) {
        let Some((finding, before, ..)) = self.inflight.take() else {
            return;
        };
        match answer {
            Ok(appended) => {
                tracing::info!(
                    finding = finding.id,
                    r#type = finding.finding_type,
                    score = finding.score,
                    log_index = appended.log_indexes.first(),
                    "finding"
                );
            }
            Err(refused) => {
                // Not in the log: the chain goes back to where it was.
                *self.chains.chain_mut(&finding.realm) = before;
                (self.report)(Report::Failed {
                    finding: &finding,
                    refused: &refused,
                });
                if refused.retryable {
                    self.outbox.push_front(finding);
                    self.backoff_until = Some(Instant::now() + Duration::from_millis(500).min(self.patience));
                } else {
                    // Never logged: do not snapshot past it, so a restart finds it again.
                    self.clean = false;
                    tracing::error!(finding = finding.id, error = %refused, "could not log a finding");
                }
            }
        }
    }

    fn baseline(&self, agent: &str) -> Option<Value> {
        let state = self.detector.agent(agent)?;
        let baseline = &state.baseline;
        let min_windows = self.detector.config.min_windows;
        let features: serde_json::Map<String, Value> = crate::features::FEATURES
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

    /// Snapshots when nothing is owed to the log; says whether it did.
    fn save(&mut self) -> bool {
        if !self.clean || !self.replayed || self.inflight.is_some() || !self.outbox.is_empty() {
            return false;
        }
        let chain = serde_json::to_vec(&self.chains).map_err(std::io::Error::other);
        let saved = self.detector.snapshot(&self.snapshot).and_then(|()| {
            let path = chain_path(&self.snapshot);
            let temporary = path.with_extension("chain.tmp");
            std::fs::write(&temporary, chain?)?;
            std::fs::rename(&temporary, &path)
        });
        match saved {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, path = %self.snapshot.display(), "detector snapshot failed");
                false
            }
        }
    }
}

/// The chains saved beside `snapshot` (a new chain when there are none, or when they
/// were kept with another lane count: the log's own findings then carry it forward).
fn restore_chains(snapshot: &std::path::Path, lanes: u32) -> ChainLanes {
    std::fs::read(chain_path(snapshot))
        .ok()
        .and_then(|bytes| ChainLanes::restore(&bytes, lanes))
        .unwrap_or_else(|| ChainLanes::new(lanes))
}

/// Where the detector's signing chain is saved beside its snapshot.
fn chain_path(snapshot: &std::path::Path) -> PathBuf {
    snapshot.with_extension("chain")
}
