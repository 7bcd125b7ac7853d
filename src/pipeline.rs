//! Wires the detector and responder stages into a node, on the embedded transport.
//!
//! ```text
//!  log writer (ingest) ──publish──▶ Fanout ──bounded──▶ DetectorStage (custos-detect)
//!        ▲                                 ──findings,─▶ ResponderStage (custos-respond)
//!        │                                   actions
//!        └──── Submission (findings, action records with their enforcement) ◀──┘
//! ```
//!
//! The stages live in their crates and speak only the `custos-stage` contract; this file
//! starts their threads, and turns their reports into metrics and the views the HTTP
//! routes read (recent findings and actions, pending approvals, playbooks).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use custos_detect::runner::{self as detector_runner, DetectorStage};
use custos_detect::{Detector, DetectorConfig, Rules};
use custos_event::{ACTION_PAYLOAD_TYPE, FINDING_PAYLOAD_TYPE};
use custos_http::ApiError;
use custos_http::metrics;
use custos_ingest::{Hooks, Operations};
use custos_respond::runner::{self as responder_runner, OpError, OpErrorKind, ResponderStage};
use custos_respond::{Approval, Responder};
use custos_stage::embedded::{self, Fanout};
use custos_stage::{Submitter, Subscription};
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
    /// Committed records (mostly events) that may wait for the detector; past it, the
    /// writer waits for the detector instead of holding more in memory.
    pub(crate) detector_queue: usize,
    pub(crate) transport: Transport,
    pub(crate) stages: Stages,
    /// With one log per partition on Kafka: the detector runs one stage per partition it
    /// can claim (`custos_detect::partitions`), preferring these (all when empty).
    pub(crate) detector_partitions: Option<Vec<u32>>,
    /// Signing chains per system key, and logs the detector keeps its position in: 1, or
    /// the partition count when the writers keep one log per partition (each log then
    /// holds one unbroken chain per key, and log indexes are per log).
    pub(crate) chain_lanes: u32,
    /// Agent platforms the responder's platform actions call (VaultysClaw).
    pub(crate) platforms: custos_respond::platform::Platforms,
}

/// How the stages reach the log writer.
#[derive(Clone, Debug, Default)]
pub(crate) enum Transport {
    /// In-process channels to this process's writer (the default).
    #[default]
    Embedded,
    /// Topics on a Kafka cluster; the writer may be in another process.
    Kafka(custos_stage::kafka::KafkaConfig),
}

/// Which stages a process runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stages {
    pub(crate) detector: bool,
    pub(crate) responder: bool,
}

impl Stages {
    pub(crate) const ALL: Stages = Stages {
        detector: true,
        responder: true,
    };
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
            transport: Transport::Embedded,
            stages: Stages::ALL,
            detector_partitions: None,
            chain_lanes: 1,
            platforms: custos_respond::platform::Platforms::default(),
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

/// Waits until this process holds the responder lease (true), or is asked to stop
/// first (false). Requests that come meanwhile are dropped: their callers hear that no
/// responder answered, since another process is the active one.
fn wait_for_lease(lease: &mut custos_stage::kafka::Lease, inbox: &mpsc::Receiver<responder_runner::Request>) -> bool {
    eprintln!("responder: standby, waiting for the lease (one active responder per cluster)");
    loop {
        if lease.state(Duration::from_millis(200)) == custos_stage::kafka::LeaseState::Held {
            eprintln!(
                "responder: active (holds the lease, tenure {})",
                lease.epoch().map_or_else(|| "?".to_owned(), |epoch| epoch.to_string())
            );
            return true;
        }
        match inbox.try_recv() {
            Ok(responder_runner::Request::Stop(done)) => {
                let _ = done.send(());
                return false;
            }
            Ok(_) | Err(mpsc::TryRecvError::Empty) => {}
            Err(mpsc::TryRecvError::Disconnected) => return false,
        }
    }
}

/// Keeps renewing the responder lease; the moment the lease log shows another holder
/// (this process was cut off for longer than the lease lasts, and a standby took over),
/// the process exits so that its supervisor restarts it as a standby, which rebuilds
/// its state from the log. While the brokers are away it keeps the lease: nobody can
/// take it, and nothing can be submitted without them.
fn keep_lease(mut lease: custos_stage::kafka::Lease) {
    let spawned = std::thread::Builder::new().name("custos-lease".into()).spawn(move || {
        while lease.state(Duration::from_millis(500)) != custos_stage::kafka::LeaseState::Other {}
        eprintln!("responder: another responder holds the lease now; exiting so that a supervisor restarts this process as a standby");
        std::process::exit(75);
    });
    if let Err(error) = spawned {
        eprintln!("responder: cannot keep the lease ({error}); exiting");
        std::process::exit(75);
    }
}

/// Shows a logged finding or action record, with its log index, in a capped view.
fn push_logged(view: &Mutex<VecDeque<Value>>, logged: &impl serde::Serialize, log_index: impl serde::Serialize) {
    let mut value = serde_json::to_value(logged).unwrap_or(Value::Null);
    value["log_index"] = json!(log_index);
    push_capped(view, value);
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

/// What a detector stage reports goes to the node's views, metrics and marks.
fn detector_report(views: Arc<Views>, marks: Arc<Marks>) -> Box<dyn FnMut(detector_runner::Report<'_>) + Send> {
    Box::new(move |report| match report {
        detector_runner::Report::Logged {
            finding,
            log_index,
            live,
        } => {
            push_logged(&views.findings, finding, log_index);
            if live {
                metrics::FINDINGS
                    .with_label_values(&[label(&finding.severity).as_str()])
                    .inc();
                mark(&marks.findings, &finding.agent, &finding.finding_type);
            }
        }
        detector_runner::Report::Lag(seconds) => metrics::DETECTOR_LAG.set(seconds),
        detector_runner::Report::Failed { .. } => {}
    })
}

/// The detector and responder of one node, ready to wire into `start_with`.
pub(crate) struct Pipeline {
    detector: Sender<detector_runner::Request>,
    responder: Sender<responder_runner::Request>,
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

fn mark(list: &Mutex<Vec<(Instant, String, String)>>, agent: &str, what: &str) {
    list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((
        Instant::now(),
        agent.to_owned(),
        what.to_owned(),
    ));
}

/// A serde enum's name (`critical`, `executed`, …) as a metric label.
fn label(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

impl Pipeline {
    /// Loads keys, rules, playbooks and the detector snapshot; starts both stages on the
    /// embedded transport. Returns the pipeline and the hooks to pass to
    /// `custos_ingest::start_with`.
    pub(crate) fn start(config: PipelineConfig, marks: Arc<Marks>) -> anyhow::Result<(Self, Hooks)> {
        std::fs::create_dir_all(&config.data).with_context(|| format!("creating {}", config.data.display()))?;
        let detector_key = custos_store::keyfile::load_or_create(&config.data.join("detector.key"))
            .context("loading the detector key")?;
        let responder_key = custos_store::keyfile::load_or_create(&config.data.join("responder.key"))
            .context("loading the responder key")?;
        let dirs: Vec<&Path> = config.rules.iter().map(PathBuf::as_path).collect();
        let rules = Rules::load(&dirs).context("loading detection rules")?;
        let mut detector_config = config.detector.clone();
        detector_config.log_lanes = config.chain_lanes;
        let rule_dirs: Vec<PathBuf> = config.rules.clone();
        let mut detector = Detector::new(detector_config.clone(), rules);
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
        let views = Arc::new(Views::default());
        let queue = custos_ingest::Queue::new();
        let fanout = Fanout::new();
        // Bounded: a detector that falls behind slows the writer down (which waits to hand
        // it the next record) instead of growing this queue without limit. The responder
        // sees only findings and actions, unbounded, so the writer never waits for it.
        type Ends = (Box<dyn Subscription>, Box<dyn Submitter>);
        let ends = |role: &str| -> anyhow::Result<Ends> {
            Ok(match &config.transport {
                Transport::Embedded => (
                    if role == "detector" {
                        Box::new(fanout.subscribe_bounded(config.detector_queue, embedded::everything))
                    } else {
                        Box::new(fanout.subscribe(embedded::findings_and_actions))
                    },
                    Box::new(queue.submitter()),
                ),
                Transport::Kafka(kafka) => (
                    Box::new(
                        custos_stage::kafka::KafkaSubscription::new(kafka, &format!("{}.{role}", kafka.prefix))
                            .with_context(|| format!("joining the {role} group on Kafka"))?,
                    ),
                    Box::new(custos_stage::kafka::KafkaSubmitter::new(kafka).context("connecting to Kafka")?),
                ),
            })
        };

        let detector_stage = DetectorStage::new(
            detector,
            detector_key.clone(),
            snapshot,
            config.snapshot_every,
            detector_report(views.clone(), marks.clone()),
        )
        .with_lanes(config.chain_lanes);
        let (responder_requests, responder_inbox) = mpsc::channel();
        let responder_views = views.clone();
        let responder_marks = marks.clone();
        let responder_stage = ResponderStage::new(
            Responder::new(playbooks),
            responder_key,
            responder_requests.clone(),
            Box::new(move |report| match report {
                responder_runner::Report::Logged {
                    record,
                    log_index,
                    live,
                } => {
                    push_logged(&responder_views.actions, record, log_index);
                    if live {
                        metrics::ACTIONS
                            .with_label_values(&[record.action.as_str(), label(&record.status).as_str()])
                            .inc();
                    }
                }
                responder_runner::Report::Enforced { record } => {
                    mark(&responder_marks.enforced, &record.agent, &record.action)
                }
                responder_runner::Report::State { pending, playbooks } => {
                    metrics::PENDING_APPROVALS.set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
                    *responder_views
                        .pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = pending;
                    *responder_views
                        .playbooks
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = playbooks;
                }
            }),
        )
        .with_lanes(config.chain_lanes)
        .with_platforms(config.platforms.clone());
        let detector_did = detector_stage.did().to_owned();
        let responder_did = responder_stage.did().to_owned();
        let (detector_requests, detector_inbox) = mpsc::channel();
        let mut threads = Vec::new();
        match (&config.transport, &config.detector_partitions) {
            _ if !config.stages.detector => {}
            // One log per partition: a stage per partition this process holds.
            (Transport::Kafka(kafka), Some(preferred)) => {
                let (kafka, views, marks) = (kafka.clone(), views.clone(), marks.clone());
                let group = format!("{}.detector", kafka.prefix);
                let partitioned = custos_detect::partitions::Partitioned {
                    dir: config.data.join("detector").join("partitions"),
                    partitions: config.chain_lanes,
                    preferred: preferred.clone(),
                    key: detector_key,
                    snapshot_every: config.snapshot_every,
                    detector: Box::new(move || {
                        let dirs: Vec<&Path> = rule_dirs.iter().map(PathBuf::as_path).collect();
                        let rules = Rules::load(&dirs).map_err(|error| format!("loading detection rules: {error}"))?;
                        Ok(Detector::new(detector_config.clone(), rules))
                    }),
                    open: Box::new(move |partition| {
                        let partition = i32::try_from(partition).map_err(|error| error.to_string())?;
                        let feed = custos_stage::kafka::KafkaSubscription::for_partition(&kafka, &group, partition)
                            .map_err(|error| error.to_string())?;
                        let submit =
                            custos_stage::kafka::KafkaSubmitter::new(&kafka).map_err(|error| error.to_string())?;
                        Ok((
                            Box::new(feed) as Box<dyn Subscription>,
                            Box::new(submit) as Box<dyn Submitter>,
                        ))
                    }),
                    report: Box::new(move || detector_report(views.clone(), marks.clone())),
                };
                drop(detector_stage);
                threads.push(
                    std::thread::Builder::new()
                        .name("custos-detectors".into())
                        .spawn(move || partitioned.run(detector_inbox))?,
                );
            }
            _ => {
                let (mut feed, submit) = ends("detector")?;
                threads.push(
                    std::thread::Builder::new()
                        .name("custos-detector".into())
                        .spawn(move || detector_stage.run(feed.as_mut(), submit.as_ref(), detector_inbox))?,
                );
            }
        }
        if config.stages.responder {
            let thread = std::thread::Builder::new().name("custos-responder".into());
            threads.push(match &config.transport {
                Transport::Embedded => {
                    let (mut feed, submit) = ends("responder")?;
                    thread.spawn(move || responder_stage.run(feed.as_mut(), submit.as_ref(), responder_inbox))?
                }
                // On Kafka exactly one responder acts at a time, so that caps and approvals
                // hold cluster-wide: the others wait for the lease.
                Transport::Kafka(kafka) => {
                    let mut lease =
                        custos_stage::kafka::Lease::join(kafka, "responder").context("joining the responder lease")?;
                    let kafka = kafka.clone();
                    thread.spawn(move || {
                        if !wait_for_lease(&mut lease, &responder_inbox) {
                            return;
                        }
                        // The brokers may be away just now: keep the lease while retrying.
                        let (mut feed, submit) = loop {
                            let connected = custos_stage::kafka::KafkaSubscription::from_beginning(&kafka)
                                .and_then(|feed| Ok((feed, custos_stage::kafka::KafkaSubmitter::new(&kafka)?)));
                            match connected {
                                Ok(ends) => break ends,
                                Err(error) => {
                                    tracing::warn!(%error, "responder: connecting to Kafka; trying again");
                                    if lease.state(Duration::from_secs(1)) == custos_stage::kafka::LeaseState::Other {
                                        eprintln!("responder: lost the lease while connecting; exiting");
                                        std::process::exit(75);
                                    }
                                }
                            }
                        };
                        // Every action record carries this tenure: once a standby took over
                        // and acted, the writer refuses what this process still sends.
                        let Some(lease_epoch) = lease.epoch() else {
                            eprintln!("responder: lost the lease while connecting; exiting");
                            std::process::exit(75);
                        };
                        keep_lease(lease);
                        let submit = custos_stage::Fenced {
                            inner: submit,
                            lease_epoch,
                        };
                        responder_stage.run(&mut feed, &submit, responder_inbox)
                    })?
                }
            });
        }
        let mut signers = std::collections::BTreeMap::new();
        signers.insert(detector_did.clone(), FINDING_PAYLOAD_TYPE.to_owned());
        signers.insert(responder_did.clone(), ACTION_PAYLOAD_TYPE.to_owned());
        let drain_detector = detector_requests.clone();
        let drain_responder = responder_requests.clone();
        let hooks = Hooks {
            publish: Some(fanout),
            replay_from,
            publish_entries: false,
            adapters: None,
            control: None,
            queue: Some(queue),
            system_signers: signers,
            operations: Some(Arc::new(Ops {
                views,
                responder: responder_requests.clone(),
                detector: Mutex::new(detector_requests.clone()),
            })),
            drain: Some(Box::new(move || {
                // Detector first (its last findings reach the responder), then the responder.
                let (done, wait) = mpsc::channel();
                if drain_detector.send(detector_runner::Request::Stop(done)).is_ok() {
                    let _ = wait.recv();
                }
                let (done, wait) = mpsc::channel();
                if drain_responder.send(responder_runner::Request::Stop(done)).is_ok() {
                    let _ = wait.recv();
                }
            })),
            routes: None,
        };
        Ok((
            Self {
                detector: detector_requests,
                responder: responder_requests,
                threads,
                detector_did,
                responder_did,
            },
            hooks,
        ))
    }

    /// Waits for both threads (after the node's shutdown has drained them).
    pub(crate) fn join(self) {
        drop(self.detector);
        drop(self.responder);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// The responder's refusal as an HTTP error (statuses belong here, at the edge).
fn api_error(error: OpError) -> ApiError {
    let status = match error.kind {
        OpErrorKind::NotFound => 404,
        OpErrorKind::Conflict => 409,
        OpErrorKind::Forbidden => 403,
        OpErrorKind::Unavailable => 503,
    };
    ApiError::new(status, error.code, error.message)
}

struct Ops {
    views: Arc<Views>,
    responder: Sender<responder_runner::Request>,
    /// Behind a mutex only because `Operations` must be `Sync` (std's `Sender` was not
    /// always); sends are rare (an agent page).
    detector: Mutex<Sender<detector_runner::Request>>,
}

impl Ops {
    fn ask(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<Value, OpError>>) -> responder_runner::Request,
    ) -> Result<Value, ApiError> {
        let (reply, answer) = mpsc::channel();
        self.responder
            .send(make(reply))
            .map_err(|_| ApiError::new(503, "stopping", "the responder has stopped"))?;
        answer
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| ApiError::new(503, "responder_busy", "the responder did not answer within 30 s"))?
            .map_err(api_error)
    }
}

impl Operations for Ops {
    fn baseline(&self, agent: &str) -> Option<Value> {
        let (reply, answer) = mpsc::channel();
        self.detector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(detector_runner::Request::Baseline(agent.to_owned(), reply))
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
        self.ask(|reply| responder_runner::Request::Decide {
            id: approval.to_owned(),
            approve,
            by: by.to_owned(),
            realms: realms.to_vec(),
            reply,
        })
    }

    fn undo(&self, action: &str, by: &str, realms: &[String]) -> Result<Value, ApiError> {
        self.ask(|reply| responder_runner::Request::Undo {
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
        self.ask(|reply| responder_runner::Request::Resume {
            playbook: playbook.to_owned(),
            realm: realm.to_owned(),
            by: by.to_owned(),
            realms: realms.to_vec(),
            reply,
        })
    }
}
