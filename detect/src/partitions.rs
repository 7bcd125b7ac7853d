//! Detectors over a log per partition: each partition's state runs where its lock is.
//!
//! ```text
//!  detector process A (prefers 0,1)            detector process B (prefers 2)
//!   ├─ DIR/0/LOCK ─ DetectorStage(partition 0)    └─ DIR/2/LOCK ─ DetectorStage(partition 2)
//!   └─ DIR/1/LOCK ─ DetectorStage(partition 1)        ▲ takes 0 and 1 when A dies
//!        │ each: its own Detector restored from DIR/<p>/detector.snapshot, reading
//!        │ partition p of the committed topic from the offset acknowledged with that
//!        ▼ snapshot, signing on partition p's chain lane
//!   findings ──▶ Submitter (to partition p's log)
//! ```
//!
//! A realm lives in one partition (`custos_event::partition_of`), so one partition's
//! detector holds every baseline its realms need: realm and peer baselines are learned
//! from that partition's agents. The snapshot and its acknowledged offset move with the
//! lock: a process that takes a partition over resumes from the last snapshot its
//! previous owner wrote, rereads what came after it, and drops findings the log already
//! holds (by id), so a takeover neither doubles nor misses a finding.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use custos_event::AgentKey;
use custos_stage::claim::{Claims, try_lock};
use custos_stage::{Submitter, Subscription};

use crate::Detector;
use crate::runner::{DetectorStage, Report, Request};

/// The ends of one partition's stage: its subscription and a submitter.
pub type Ends = (Box<dyn Subscription>, Box<dyn Submitter>);

/// Where one stage's reports go.
pub type Reporter = Box<dyn FnMut(Report<'_>) + Send>;

/// What a process needs to run detectors for partitions.
pub struct Partitioned {
    /// `DIR/<p>/` holds partition p's lock, snapshot and chain.
    pub dir: PathBuf,
    pub partitions: u32,
    /// Taken at once when free; others after `custos_stage::claim::TAKEOVER_AFTER`.
    pub preferred: Vec<u32>,
    pub key: AgentKey,
    pub snapshot_every: Duration,
    /// A fresh detector (configured with `log_lanes = partitions`).
    pub detector: Box<dyn Fn() -> Result<Detector, String> + Send>,
    /// Connects partition p's subscription and a submitter.
    pub open: Box<dyn Fn(u32) -> Result<Ends, String> + Send>,
    /// What each stage reports through.
    pub report: Box<dyn Fn() -> Reporter + Send>,
}

struct Running {
    requests: Sender<Request>,
    thread: std::thread::JoinHandle<()>,
    _lock: std::fs::File,
}

impl Partitioned {
    /// Takes partitions as they become claimable, each stage on a thread of its own,
    /// until a [`Request::Stop`]: then every stage finishes (its findings sent, its
    /// snapshot written) and the call returns. A baseline request asks each stage.
    pub fn run(self, requests: Receiver<Request>) {
        let mut claims = Claims::new(self.preferred.clone());
        let mut running: std::collections::BTreeMap<u32, Running> = std::collections::BTreeMap::new();
        loop {
            running.retain(|partition, stage| {
                let alive = !stage.thread.is_finished();
                if !alive {
                    tracing::error!(partition, "detector: a partition's stage ended; it will be taken again");
                }
                alive
            });
            for partition in 0..self.partitions {
                if running.contains_key(&partition) {
                    continue;
                }
                match self.take(partition, &mut claims) {
                    Ok(Some(stage)) => {
                        eprintln!("detector: partition {partition} is detected here");
                        running.insert(partition, stage);
                    }
                    Ok(None) => {}
                    Err(error) => tracing::error!(partition, error, "detector: could not take a partition"),
                }
            }
            match requests.recv_timeout(Duration::from_secs(1)) {
                Ok(Request::Baseline(agent, reply)) => {
                    let found = running.values().find_map(|stage| {
                        let (ask, answer) = mpsc::channel();
                        stage.requests.send(Request::Baseline(agent.clone(), ask)).ok()?;
                        answer.recv_timeout(Duration::from_secs(10)).ok().flatten()
                    });
                    let _ = reply.send(found);
                }
                Ok(Request::Stop(done)) => {
                    for (_, stage) in std::mem::take(&mut running) {
                        let (stopped, wait) = mpsc::channel();
                        if stage.requests.send(Request::Stop(stopped)).is_ok() {
                            let _ = wait.recv();
                        }
                        let _ = stage.thread.join();
                    }
                    let _ = done.send(());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Starts partition `partition`'s stage when it is claimable and its lock is free.
    fn take(&self, partition: u32, claims: &mut Claims) -> Result<Option<Running>, String> {
        let dir = self.dir.join(partition.to_string());
        if !claims.ready(partition, &dir) {
            return Ok(None);
        }
        let Some(lock) = try_lock(&dir).map_err(|error| format!("{}: {error}", dir.display()))? else {
            return Ok(None);
        };
        claims.taken(partition);
        let snapshot = dir.join("detector.snapshot");
        let mut detector = (self.detector)()?;
        detector
            .restore(&snapshot)
            .map_err(|error| format!("{}: {error}", snapshot.display()))?;
        let stage = DetectorStage::new(
            detector,
            self.key.clone(),
            snapshot,
            self.snapshot_every,
            (self.report)(),
        )
        .with_lanes(self.partitions);
        let (mut subscription, submitter) = (self.open)(partition)?;
        let (requests, inbox) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("custos-detector-{partition}"))
            .spawn(move || stage.run(subscription.as_mut(), submitter.as_ref(), inbox))
            .map_err(|error| format!("cannot start a detector thread: {error}"))?;
        Ok(Some(Running {
            requests,
            thread,
            _lock: lock,
        }))
    }
}
