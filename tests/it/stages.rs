//! One suite for the stage contract, run on both transports: the real log writer (a
//! node), the real detector and responder stages, and between them either in-process
//! channels or topics on a real Kafka-protocol broker (tansu, started here as a process).
//!
//! The scenario is memory poisoning: a finding is logged once, the responder's action
//! record carries the revocation and quarantine, and the writer applies them. On Kafka
//! the detector is then restarted as after a crash (no snapshot, no offset): it must not
//! log the finding again, must keep its signing chain, and must catch the next attack.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use custos_detect::runner::{self as detector_runner, DetectorStage};
use custos_detect::{Detector, DetectorConfig, Rules};
use custos_event::{ACTION_PAYLOAD_TYPE, AgentKey, FINDING_PAYLOAD_TYPE, Signer};
use custos_respond::runner::{self as responder_runner, ResponderStage};
use custos_stage::embedded::{self, Fanout};
use custos_stage::kafka::{self, KafkaConfig};
use custos_stage::{Submitter, Subscription};
use serde_json::json;

use crate::respond::{enroll, get, send, wait_for};

/// A tansu broker on a free loopback port, storing in SQLite under `dir`.
pub(crate) struct Broker {
    child: Child,
    pub(crate) addr: String,
    dir: PathBuf,
    /// Extra `tansu broker` arguments, kept for a restart.
    extra: Vec<String>,
}

/// Where `scripts/test` installs tansu (or `CUSTOS_TANSU`).
pub(crate) fn tansu() -> PathBuf {
    if let Ok(path) = std::env::var("CUSTOS_TANSU") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = Path::new(&home).join(".cache/custos-tools/tansu/bin/tansu");
    assert!(
        path.exists(),
        "no tansu broker at {}: run scripts/test (it installs one) or set CUSTOS_TANSU",
        path.display()
    );
    path
}

impl Broker {
    pub(crate) fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_at(dir, format!("127.0.0.1:{port}"), &[])
    }

    /// A broker that requires SASL/SCRAM-SHA-512: `user` is created on an open broker
    /// first (tansu keeps credentials in its storage), which is then restarted with
    /// `--authentication` on the same address and storage.
    pub(crate) fn start_authenticated(dir: &Path, user: &str, password: &str) -> Self {
        let mut open = Self::start(dir);
        let created = Command::new(tansu())
            .args(["user", "create", user, password, "--mechanism", "scram512", "--broker"])
            .arg(format!("tcp://{}", open.addr))
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "tansu user create: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let _ = open.child.kill();
        let _ = open.child.wait();
        let started = Self::start_at(dir, open.addr.clone(), &["--authentication".to_owned()]);
        std::mem::forget(open);
        started
    }

    /// A broker that listens on a port of its own but tells clients (in its metadata)
    /// to connect to `advertised`, where something else forwards to it: `addr` is its
    /// own listener.
    pub(crate) fn start_behind(dir: &Path, advertised: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_at(
            dir,
            format!("127.0.0.1:{port}"),
            &["--advertised-listener-url".to_owned(), format!("tcp://{advertised}")],
        )
    }

    /// SIGKILLs the broker and starts it again on the same address and storage.
    pub(crate) fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let started = Self::start_at(&self.dir.clone(), self.addr.clone(), &self.extra.clone());
        let old = std::mem::replace(self, started);
        std::mem::forget(old);
    }

    /// `extra` may name the advertised listener; without it clients are sent to `addr`.
    fn start_at(dir: &Path, addr: String, extra: &[String]) -> Self {
        let url = format!("tcp://{addr}");
        let mut command = Command::new(tansu());
        command.args(["broker", "--listener-url", &url]);
        if !extra.iter().any(|arg| arg == "--advertised-listener-url") {
            command.args(["--advertised-listener-url", &url]);
        }
        let child = command
            .args(extra)
            // tansu reads the SQLite path relative to its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            addr,
            dir: dir.to_owned(),
            extra: extra.to_vec(),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Transport {
    Embedded,
    Kafka(KafkaConfig),
}

/// What the stages reported.
#[derive(Default)]
struct Seen {
    /// (finding id, type, agent, live)
    findings: Mutex<Vec<(String, String, String, bool)>>,
    enforced: Mutex<Vec<(String, String)>>,
}

impl Seen {
    fn live_findings(&self, kind: &str) -> Vec<String> {
        self.findings
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, found, _, live)| found == kind && *live)
            .map(|(id, ..)| id.clone())
            .collect()
    }

    fn all_findings(&self, kind: &str, agent: &str) -> Vec<String> {
        self.findings
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, found, about, live)| found == kind && about == agent && *live)
            .map(|(id, ..)| id.clone())
            .collect()
    }

    /// Whether each report of a finding of `kind` about `agent` was live.
    fn findings_about(&self, kind: &str, agent: &str) -> Vec<bool> {
        self.findings
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, found, about, _)| found == kind && about == agent)
            .map(|(.., live)| *live)
            .collect()
    }
}

fn detector_stage(data: &Path, key: AgentKey, seen: Arc<Seen>) -> DetectorStage {
    let mut detector = Detector::new(DetectorConfig::default(), Rules::load(&[]).unwrap());
    let snapshot = data.join("detector.snapshot");
    detector.restore(&snapshot).unwrap();
    DetectorStage::new(
        detector,
        key,
        snapshot,
        Duration::from_secs(3600),
        Box::new(move |report| {
            if let detector_runner::Report::Logged { finding, live, .. } = report {
                seen.findings.lock().unwrap().push((
                    finding.id.clone(),
                    finding.finding_type.clone(),
                    finding.agent.clone(),
                    live,
                ));
            }
        }),
    )
}

fn start_detector(
    data: &Path,
    key: AgentKey,
    seen: Arc<Seen>,
    mut subscription: Box<dyn Subscription>,
    submit: Box<dyn Submitter>,
) -> (Sender<detector_runner::Request>, JoinHandle<()>) {
    let stage = detector_stage(data, key, seen);
    let (requests, inbox) = mpsc::channel();
    let thread = std::thread::spawn(move || stage.run(subscription.as_mut(), submit.as_ref(), inbox));
    (requests, thread)
}

fn stop_detector(requests: Sender<detector_runner::Request>, thread: JoinHandle<()>) {
    let (done, wait) = mpsc::channel();
    requests.send(detector_runner::Request::Stop(done)).unwrap();
    wait.recv_timeout(Duration::from_secs(60)).unwrap();
    thread.join().unwrap();
}

pub(crate) fn poison(url: &str, token: &str, seed: u8, memory: &str) -> String {
    let key = AgentKey::from_seed(&[seed; 32]);
    let did = key.did().to_owned();
    enroll(url, token, &did, "eng");
    let mut signer = Signer::new(key, "eng");
    let results = send(
        url,
        &mut signer,
        &[
            json!({"kind": "memory_write", "memory_id": memory, "attrs": {"source_trust": "untrusted"}}),
            json!({"kind": "memory_read", "memory_id": memory}),
            json!({"kind": "credential_use", "target": "cred-db", "attrs": {"credential_owner": did}}),
        ],
    );
    assert!(
        results.iter().all(|result| result["status"] == "accepted"),
        "{results:?}"
    );
    did
}

fn suite(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let stage_data = dir.path().join("stages");
    std::fs::create_dir_all(&stage_data).unwrap();
    let detector_key = AgentKey::from_seed(&[41; 32]);
    let responder_key = AgentKey::from_seed(&[42; 32]);
    let queue = custos_ingest::Queue::new();
    let fanout = Fanout::new();
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut bridges = Vec::new();

    // The stages' ends of the transport.
    type Ends = (Box<dyn Subscription>, Box<dyn Submitter>);
    // An ingest node's end: it submits verified events.
    let ingest: Box<dyn Submitter> = match &transport {
        Transport::Embedded => Box::new(queue.submitter()),
        Transport::Kafka(config) => {
            kafka::create_topics(config, 3).unwrap();
            Box::new(kafka::KafkaSubmitter::new(config).unwrap())
        }
    };
    let (detector_ends, responder_ends): (Ends, Ends) = match &transport {
        Transport::Embedded => (
            (
                Box::new(fanout.subscribe_bounded(1024, embedded::everything)),
                Box::new(queue.submitter()),
            ),
            (
                Box::new(fanout.subscribe(embedded::findings_and_actions)),
                Box::new(queue.submitter()),
            ),
        ),
        Transport::Kafka(config) => {
            // The writer's side: committed records out to the topic, submissions in.
            let mut from_writer = fanout.subscribe_bounded(1024, embedded::everything);
            let mut publisher = kafka::KafkaPublisher::new(config, None).unwrap();
            let flag = stop.clone();
            bridges.push(std::thread::spawn(move || {
                custos_stage::forward_committed(&mut from_writer, &mut publisher, 0, &mut |_| {}, &flag).unwrap();
            }));
            let mut intake = kafka::KafkaIntake::new(config).unwrap();
            let into_writer = queue.submitter();
            let flag = stop.clone();
            bridges.push(std::thread::spawn(move || {
                custos_stage::forward_submissions(&mut intake, &into_writer, 64, &flag).unwrap();
            }));
            let group = |role: &str| format!("{}.{role}", config.prefix);
            (
                (
                    Box::new(kafka::KafkaSubscription::new(config, &group("detector")).unwrap()),
                    Box::new(kafka::KafkaSubmitter::new(config).unwrap()),
                ),
                (
                    Box::new(kafka::KafkaSubscription::new(config, &group("responder")).unwrap()),
                    Box::new(kafka::KafkaSubmitter::new(config).unwrap()),
                ),
            )
        }
    };

    let mut signers = std::collections::BTreeMap::new();
    signers.insert(detector_key.did().to_owned(), FINDING_PAYLOAD_TYPE.to_owned());
    signers.insert(responder_key.did().to_owned(), ACTION_PAYLOAD_TYPE.to_owned());
    let hooks = custos_ingest::Hooks {
        publish: Some(fanout),
        queue: Some(queue),
        system_signers: signers,
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = custos_ingest::NodeConfig::new(data.clone(), "127.0.0.1:0".parse().unwrap());
    let running = runtime.block_on(custos_ingest::start_with(config, hooks)).unwrap();
    let url = format!("http://{}", running.addr);
    let token = running.admin_token.clone().unwrap().0;

    let (detector, detector_thread) = start_detector(
        &stage_data,
        detector_key.clone(),
        seen.clone(),
        detector_ends.0,
        detector_ends.1,
    );
    let (responder_requests, responder_inbox) = mpsc::channel();
    let responder_seen = seen.clone();
    let responder = ResponderStage::new(
        custos_respond::Responder::new(custos_respond::load_playbooks(true, None).unwrap()),
        responder_key,
        responder_requests.clone(),
        Box::new(move |report| {
            if let responder_runner::Report::Enforced { record } = report {
                responder_seen
                    .enforced
                    .lock()
                    .unwrap()
                    .push((record.action.clone(), record.agent.clone()));
            }
        }),
    );
    let (mut responder_subscription, responder_submit) = responder_ends;
    let responder_thread = std::thread::spawn(move || {
        responder.run(
            responder_subscription.as_mut(),
            responder_submit.as_ref(),
            responder_inbox,
        )
    });

    // 1. A finding, logged once; its action revokes and quarantines through the writer.
    let first = poison(&url, &token, 51, "mem-first");
    wait_for("the playbook to revoke the first agent", || {
        get(&url, &format!("/v1/agents/{first}"), &token).1["status"] == "revoked"
    });
    wait_for("the memory quarantine", || {
        get(&url, "/v1/memories/mem-first/status", &token).1["status"] == "quarantined"
    });
    assert_eq!(
        seen.live_findings("memory_poisoning").len(),
        1,
        "one finding, logged once"
    );
    assert!(
        seen.enforced
            .lock()
            .unwrap()
            .iter()
            .any(|(action, agent)| action == "revoke_agent" && *agent == first)
    );

    // 2. Events from an ingest node: a verdict per item, as `POST /v1/events` answers.
    events_from_an_ingest_node(ingest.as_ref(), &url, &token);

    if matches!(transport, Transport::Kafka(_)) {
        // 3. The detector restarts as after a crash before any snapshot: no snapshot, no
        // committed offset (a new group), so it reads the committed topic from the start,
        // finds the first attack again, and must see that it is already logged.
        stop_detector(detector, detector_thread);
        std::fs::remove_file(stage_data.join("detector.snapshot")).unwrap();
        std::fs::remove_file(stage_data.join("detector.chain")).unwrap();
        let Transport::Kafka(config) = &transport else {
            unreachable!()
        };
        let group = format!("{}.detector-after-crash", config.prefix);
        let (detector, detector_thread) = start_detector(
            &stage_data,
            detector_key,
            seen.clone(),
            Box::new(kafka::KafkaSubscription::new(config, &group).unwrap()),
            Box::new(kafka::KafkaSubmitter::new(config).unwrap()),
        );
        let second = poison(&url, &token, 52, "mem-second");
        wait_for("the second agent's revocation", || {
            get(&url, &format!("/v1/agents/{second}"), &token).1["status"] == "revoked"
        });
        // Give a duplicate every chance to appear before counting.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            seen.all_findings("memory_poisoning", &second).len(),
            1,
            "the restarted detector caught the next attack once"
        );
        // The restarted detector read the first finding back (not live); a duplicate
        // would be logged again and come back live.
        let about_first = seen.findings_about("memory_poisoning", &first);
        assert_eq!(
            about_first.iter().filter(|live| **live).count(),
            1,
            "the first attack was logged once: {about_first:?}"
        );
        assert!(
            about_first.contains(&false),
            "the restarted detector read the first finding back"
        );
        stop_detector(detector, detector_thread);
    } else {
        stop_detector(detector, detector_thread);
    }
    let (done, wait) = mpsc::channel();
    responder_requests.send(responder_runner::Request::Stop(done)).unwrap();
    wait.recv_timeout(Duration::from_secs(60)).unwrap();
    responder_thread.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(running.shutdown()).unwrap();
    for bridge in bridges {
        bridge.join().unwrap();
    }
    // The log with findings, action records and control entries verifies.
    let output = crate::support::run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(
        output.status.success(),
        "{}{}",
        crate::support::stdout(&output),
        crate::support::stderr(&output)
    );
}

fn events_from_an_ingest_node(ingest: &dyn Submitter, url: &str, token: &str) {
    use custos_stage::{EventBatch, EventItem, ItemCheck, Status, Submission};
    let key = AgentKey::from_seed(&[53; 32]);
    let did = key.did().to_owned();
    enroll(url, token, &did, "eng");
    let mut signer = Signer::new(key, "eng");
    let mut event = |kind: &str| {
        signer
            .sign_object(json!({"kind": kind}).as_object().unwrap().clone(), chrono::Utc::now())
            .unwrap()
            .to_json()
            .into_bytes()
    };
    let (first, second, third) = (event("tool_call"), event("tool_call"), event("tool_call"));
    let verified = |raw: &[u8]| EventItem {
        raw: raw.to_vec(),
        keyid: Some(did.clone()),
        check: ItemCheck::Verified,
    };
    let submit = |items: Vec<EventItem>| {
        let batch = EventBatch {
            remote: "192.0.2.7:5000".into(),
            realm: "eng".into(),
            items,
        };
        ingest
            .submit(Submission::Events(batch))
            .unwrap()
            .wait(Duration::from_secs(60))
            .unwrap()
    };
    let appended = submit(vec![
        verified(&first),
        verified(&first),
        EventItem {
            raw: vec![0xff, b'{', 0x00],
            keyid: None,
            check: ItemCheck::Refused {
                code: "malformed".into(),
                message: "not JSON".into(),
                signed: false,
                whole: None,
            },
        },
        EventItem {
            check: ItemCheck::Refused {
                code: "revoked_agent".into(),
                message: "the ingest node's view says revoked".into(),
                signed: true,
                whole: None,
            },
            ..verified(&second)
        },
        verified(&third),
    ]);
    let statuses: Vec<(Status, Option<&str>)> = appended
        .verdicts
        .iter()
        .map(|verdict| (verdict.status, verdict.reason.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        [
            (Status::Accepted, None),
            (Status::Duplicate, None),
            (Status::Rejected, Some("malformed")),
            (Status::Rejected, Some("revoked_agent")),
            (Status::Accepted, None),
        ],
        "{appended:?}"
    );
    let verdicts = &appended.verdicts;
    assert_eq!(
        verdicts[1].log_index, verdicts[0].log_index,
        "the duplicate names the first append"
    );
    assert_eq!(verdicts[4].flags, ["chain_gap"], "seq 1 never arrived: {verdicts:?}");
    assert_eq!(verdicts[4].missing, Some([1, 1]));
    assert_eq!(
        appended.log_indexes,
        [verdicts[0].log_index.unwrap(), verdicts[4].log_index.unwrap()]
    );
    // Resent as after a lost receipt: answered from the log, nothing appended twice.
    let again = submit(vec![verified(&first), verified(&third)]);
    assert!(
        again.verdicts.iter().all(|verdict| verdict.status == Status::Duplicate),
        "{again:?}"
    );
    assert!(again.log_indexes.is_empty());
    // Both refusals are kept for forensics, as the node's own ingest keeps them.
    let (status, rejected) = get(url, "/v1/rejected?limit=100", token);
    assert_eq!(status, 200);
    let reasons: Vec<&str> = rejected["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["remote"] == "192.0.2.7:5000")
        .filter_map(|item| item["reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 2, "{rejected}");
    assert!(
        reasons.contains(&"malformed") && reasons.contains(&"revoked_agent"),
        "{reasons:?}"
    );
}

#[test]
fn the_stages_work_on_the_embedded_transport() {
    suite(Transport::Embedded);
}

#[test]
fn the_stages_work_on_kafka_topics_of_a_real_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut config = KafkaConfig::new(broker.addr.clone());
    config.prefix = "custos-test".into();
    suite(Transport::Kafka(config));
}

/// A writer on `data` that trusts `key` to append `payload_type` entries, and a
/// submitter into its queue (the embedded transport).
fn queue_writer(
    runtime: &tokio::runtime::Runtime,
    data: &Path,
    key: &AgentKey,
    payload_type: &str,
) -> (custos_ingest::Running, custos_ingest::QueueSubmitter) {
    let queue = custos_ingest::Queue::new();
    let submit = queue.submitter();
    let mut signers = std::collections::BTreeMap::new();
    signers.insert(key.did().to_owned(), payload_type.to_owned());
    let hooks = custos_ingest::Hooks {
        publish: Some(Fanout::new()),
        queue: Some(queue),
        system_signers: signers,
        ..Default::default()
    };
    let config = custos_ingest::NodeConfig::new(data.to_owned(), "127.0.0.1:0".parse().unwrap());
    (
        runtime.block_on(custos_ingest::start_with(config, hooks)).unwrap(),
        submit,
    )
}

/// Kafka redelivers a submission after a crash: the writer answers it with the first
/// append, and refuses another payload at a seq already used (a fork), whatever the
/// transport.
#[test]
fn a_redelivered_submission_is_appended_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = AgentKey::from_seed(&[43; 32]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = dir.path().join("node");
    // The writer, trusting `key` for findings, and a submitter into its queue.
    let start = || queue_writer(&runtime, &data, &key, FINDING_PAYLOAD_TYPE);
    let (running, submit) = start();
    let bytes = |seq: u64, title: &str, prev: Option<String>| {
        serde_json::to_vec(&json!({"id": format!("f-{seq}"), "agent": "did:key:x", "realm": "eng",
            "type": "anomaly", "score": 50, "severity": "medium", "title": title, "ts": "2026-12-04T10:00:00Z",
            "kind": "finding", "seq": seq, "prev": prev}))
        .unwrap()
    };
    let first_bytes = bytes(0, "a", None);
    let first_digest = blake3::hash(&first_bytes).to_hex().to_string();
    let finding = |seq: u64, title: &str| {
        let payload = if seq == 0 && title == "a" {
            first_bytes.clone()
        } else {
            bytes(seq, title, (seq > 0).then(|| first_digest.clone()))
        };
        custos_stage::Submission::Finding(key.sign_envelope(FINDING_PAYLOAD_TYPE, payload))
    };
    let wait = |submission| submit.submit(submission).unwrap().wait(Duration::from_secs(30));
    let first = wait(finding(0, "a")).unwrap();
    let again = wait(finding(0, "a")).unwrap();
    assert_eq!(first, again, "the redelivery is answered with the first append");
    let fork = wait(finding(0, "b")).unwrap_err();
    assert_eq!(fork.code, "chain_fork", "{fork:?}");
    let next = wait(finding(1, "c")).unwrap();
    assert_eq!(
        next.log_indexes[0],
        first.log_indexes[0] + 1,
        "nothing was appended in between"
    );
    runtime.block_on(running.shutdown()).unwrap();
    // After a restart, the writer still knows what it appended.
    let (running, submit) = start();
    let replayed = submit
        .submit(finding(1, "c"))
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    assert_eq!(replayed, next);
    runtime.block_on(running.shutdown()).unwrap();
    let output = crate::support::run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
}

/// An action record made under an earlier responder lease tenure than one the writer
/// already appended an action from is refused `stale_responder` (a responder that lost
/// the lease while cut off, still acting): nothing is appended for it. The same tenure
/// goes on, a later one takes over, a redelivery of an action appended before is still
/// answered with its first append, and an action without a tenure (one process) is
/// never fenced.
#[test]
fn an_action_from_an_earlier_lease_tenure_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = AgentKey::from_seed(&[47; 32]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = dir.path().join("node");
    let start = || queue_writer(&runtime, &data, &key, ACTION_PAYLOAD_TYPE);
    let (running, submit) = start();
    let submit = std::cell::RefCell::new(submit);
    // The responder's chain: each action at the next seq, after the one before.
    let chain = std::cell::RefCell::new((0u64, None::<String>));
    let action = |lease_epoch: Option<u64>| {
        let (seq, prev) = chain.borrow().clone();
        let payload = serde_json::to_vec(&json!({"id": format!("a-{seq}"), "agent": "did:key:x", "realm": "eng",
            "status": "executed", "enforcement": {"op": "none"}, "by": "responder", "reason": "test",
            "kind": "action", "seq": seq, "prev": prev}))
        .unwrap();
        let submission = custos_stage::Submission::Action {
            envelope: key.sign_envelope(ACTION_PAYLOAD_TYPE, payload.clone()),
            lease_epoch,
        };
        (submission, (seq + 1, Some(blake3::hash(&payload).to_hex().to_string())))
    };
    let wait = |submission| {
        let receipt = submit.borrow().submit(submission).unwrap();
        receipt.wait(Duration::from_secs(30))
    };
    // Submits the next action; the chain moves on only when it was appended.
    let next = |lease_epoch: Option<u64>| {
        let (submission, after) = action(lease_epoch);
        let answer = wait(submission);
        if answer.is_ok() {
            *chain.borrow_mut() = after;
        }
        answer
    };
    let (first, _) = action(Some(10));
    let appended = next(Some(10)).unwrap();
    next(Some(10)).expect("the same tenure goes on");
    next(Some(14)).expect("a later tenure takes over");
    let stale = next(Some(10)).unwrap_err();
    assert_eq!(stale.code, "stale_responder", "{stale:?}");
    assert!(
        stale.message.contains("tenure 10") && stale.message.contains("14"),
        "{}",
        stale.message
    );
    assert_eq!(
        wait(first).unwrap(),
        appended,
        "a redelivery is answered with its first append, fenced or not"
    );
    // The refused action was not appended: the next one follows the one before it.
    let later = next(Some(14)).unwrap();
    assert_eq!(later.log_indexes[0], appended.log_indexes[0] + 3);
    next(None).expect("an action without a tenure is not fenced");
    runtime.block_on(running.shutdown()).unwrap();
    // A restarted writer still fences the earlier tenure.
    let (running, restarted) = start();
    *submit.borrow_mut() = restarted;
    let stale = next(Some(13)).unwrap_err();
    assert_eq!(stale.code, "stale_responder", "{stale:?}");
    next(Some(14)).expect("the latest tenure goes on");
    runtime.block_on(running.shutdown()).unwrap();
}

/// The writer takes an ingest node's word for each signature, unless it checks them
/// again (`--verify-submissions`, `custos_ingest::Reverified`): then an event a
/// compromised ingest node passes on as verified, signed by another key than its
/// agent's, is refused `bad_signature` and its good neighbours are appended.
#[test]
fn a_writer_that_checks_signatures_again_refuses_a_forged_event() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let system = AgentKey::from_seed(&[48; 32]);
    let (running, submit) = queue_writer(&runtime, &dir.path().join("node"), &system, FINDING_PAYLOAD_TYPE);
    let agent = AgentKey::from_seed(&[49; 32]);
    let enroll = custos_stage::Submission::Control(custos_stage::ControlOp::Enroll {
        agent: agent.did().to_owned(),
        realm: "eng".into(),
        labels: Default::default(),
        by: "test".into(),
    });
    submit.submit(enroll).unwrap().wait(Duration::from_secs(30)).unwrap();
    let honest = std::cell::RefCell::new(Signer::new(agent.clone(), "eng"));
    let did = agent.did().to_owned();
    let next = || {
        let object = json!({"kind": "tool_call", "action": "transfer"})
            .as_object()
            .unwrap()
            .clone();
        honest.borrow_mut().sign_object(object, chrono::Utc::now()).unwrap()
    };
    let good = || next().to_json().into_bytes();
    // The forger knows the agent's did and chain, not its key: the agent's next payload,
    // signed with the forger's own key under the agent's keyid.
    let forger = AgentKey::from_seed(&[50; 32]);
    let forged = || {
        let mut envelope: serde_json::Value = serde_json::from_str(
            &forger
                .sign_envelope(custos_event::EVENT_PAYLOAD_TYPE, next().payload)
                .to_json(),
        )
        .unwrap();
        envelope["signatures"][0]["keyid"] = json!(did);
        serde_json::to_vec(&envelope).unwrap()
    };
    let batch = |raws: Vec<Vec<u8>>| {
        custos_stage::Submission::Events(custos_stage::EventBatch {
            remote: "10.9.9.9:1".into(),
            realm: "eng".into(),
            items: raws
                .into_iter()
                .map(|raw| custos_stage::EventItem {
                    raw,
                    keyid: Some(did.clone()),
                    check: custos_stage::ItemCheck::Verified,
                })
                .collect(),
        })
    };
    let statuses = |appended: custos_stage::Appended| -> Vec<String> {
        appended
            .verdicts
            .iter()
            .map(|verdict| verdict.reason.clone().unwrap_or(format!("{:?}", verdict.status)))
            .collect()
    };
    // Taken on the ingest node's word, a forgery goes into the log under the agent's name
    // (what --verify-submissions closes; `custos verify --signatures` finds it later).
    let first = vec![good(), forged()];
    let trusted = submit
        .submit(batch(first))
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    assert_eq!(statuses(trusted), ["Accepted", "Accepted"]);
    // Checked again, it is refused and its neighbours go on.
    let checking = custos_ingest::Reverified::new(submit);
    let second = vec![good(), forged(), good()];
    let checked = checking
        .submit(batch(second))
        .unwrap()
        .wait(Duration::from_secs(30))
        .unwrap();
    let verdicts = statuses(checked);
    assert_eq!(verdicts[1], "bad_signature", "{verdicts:?}");
    assert_eq!(verdicts[0], "Accepted", "{verdicts:?}");
    runtime.block_on(running.shutdown()).unwrap();
    // The forgery taken on trust is found by the offline check, at its log index.
    let data = dir.path().join("node");
    let output = crate::support::run(&["verify", data.to_str().unwrap(), "--signatures"]);
    let text = crate::support::stdout(&output) + &crate::support::stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("PROBLEM [bad_signature]") && text.contains("log index 2:"),
        "{text}"
    );
}

/// A reader that starts from a time (a query node, after the sealed segments) gets what
/// was published from then on, then the end of its replay; what came before is left.
/// One partition can be read alone.
#[test]
fn a_reader_from_a_time_skips_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut config = KafkaConfig::new(broker.addr.clone());
    config.prefix = "from-time".into();
    kafka::create_topics(&config, 3).unwrap();
    // 0..9 on partition 0; 100..103 on partition 2; partition 1 stays empty.
    let mut publisher = kafka::KafkaPublisher::new(&config, Some(0)).unwrap();
    let mut publish = |indexes: std::ops::Range<u64>| {
        for log_index in indexes {
            custos_stage::Publish::publish(
                &mut publisher,
                custos_stage::Committed::Control {
                    log_index,
                    payload: b"{}".to_vec(),
                    entry: None,
                },
            )
            .unwrap();
        }
        custos_stage::Publish::flush(&mut publisher).unwrap();
    };
    publish(0..6);
    std::thread::sleep(Duration::from_millis(1500));
    let from = chrono::Utc::now().timestamp_millis();
    std::thread::sleep(Duration::from_millis(100));
    publish(6..9);
    // Partition 2 alone (a query node's replica of one partition's log): 100..103,
    // published after `from`.
    let mut on_two = kafka::KafkaPublisher::new(&config, Some(2)).unwrap();
    for log_index in 100..103 {
        custos_stage::Publish::publish(
            &mut on_two,
            custos_stage::Committed::Control {
                log_index,
                payload: b"{}".to_vec(),
                entry: None,
            },
        )
        .unwrap();
    }
    custos_stage::Publish::flush(&mut on_two).unwrap();

    let read = |mut reader: kafka::KafkaSubscription| {
        let mut indexes = Vec::new();
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no end of replay; read {indexes:?}"
            );
            match reader.recv(Duration::from_millis(200)).unwrap() {
                Some(custos_stage::Committed::Replayed { .. }) => break,
                Some(record) => indexes.push(record.log_index().unwrap()),
                None => {}
            }
        }
        indexes.sort_unstable();
        indexes
    };
    assert_eq!(
        read(kafka::KafkaSubscription::from_time(&config, from, None).unwrap()),
        vec![6, 7, 8, 100, 101, 102]
    );
    assert_eq!(
        read(kafka::KafkaSubscription::from_beginning(&config).unwrap()),
        (0..9).chain(100..103).collect::<Vec<u64>>()
    );
    // One partition: only its records, from the time or from its beginning.
    assert_eq!(
        read(kafka::KafkaSubscription::from_time(&config, from, Some(2)).unwrap()),
        vec![100, 101, 102]
    );
    assert_eq!(
        read(kafka::KafkaSubscription::from_time(&config, from, Some(0)).unwrap()),
        vec![6, 7, 8]
    );
    assert_eq!(
        read(kafka::KafkaSubscription::from_beginning_of(&config, Some(0)).unwrap()),
        (0..9).collect::<Vec<u64>>()
    );
    assert_eq!(
        read(kafka::KafkaSubscription::from_time(&config, from, Some(1)).unwrap()),
        Vec::<u64>::new(),
        "an empty partition ends its replay at once"
    );
    let missing = kafka::KafkaSubscription::from_beginning_of(&config, Some(3))
        .err()
        .expect("partition 3 of 3 is refused");
    assert!(missing.to_string().contains("no partition 3"), "{missing}");
}

/// An empty events batch: what the writer would answer with no verdicts.
fn empty_batch() -> custos_stage::Submission {
    custos_stage::Submission::Events(custos_stage::EventBatch {
        remote: "127.0.0.1".into(),
        realm: "eng".into(),
        items: Vec::new(),
    })
}

/// The writer's intake reading `config`'s submissions, the next one within `within`.
fn next_submission(
    intake: &mut kafka::KafkaIntake,
    within: Duration,
) -> Option<(custos_stage::Submission, custos_stage::Answer)> {
    use custos_stage::Intake as _;
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(taken) = intake.recv(Duration::from_millis(200)).unwrap() {
            return Some(taken);
        }
    }
    None
}

/// A submission whose receipt never comes is sent again after
/// `kafka::RESEND_AFTER[0]` (5 s), as it was: the ingest node waiting for it has its
/// answer then, not at its 30 s timeout. Here the writer loses its first answer.
#[test]
fn a_submission_without_a_receipt_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut config = KafkaConfig::new(broker.addr.clone());
    config.prefix = "resend".into();
    kafka::create_topics(&config, 3).unwrap();
    let mut intake = kafka::KafkaIntake::new(&config).unwrap();
    let submitter = kafka::KafkaSubmitter::new(&config).unwrap();
    let receipt = submitter.submit(empty_batch()).unwrap();
    let (first, lost) = next_submission(&mut intake, Duration::from_secs(30)).expect("the submission");
    assert!(matches!(first, custos_stage::Submission::Events(_)));
    drop(lost);
    let (again, answer) =
        next_submission(&mut intake, Duration::from_secs(20)).expect("the same submission, sent again");
    assert!(matches!(again, custos_stage::Submission::Events(ref batch) if batch.realm == "eng"));
    let appended = custos_stage::Appended::entries(vec![41]);
    answer.send(Ok(appended.clone()));
    assert_eq!(receipt.wait(Duration::from_secs(20)), Ok(appended));
    assert_eq!(
        submitter.resubmitted(),
        1,
        "counted for custos_ingest_resubmitted_total"
    );
    assert!(
        next_submission(&mut intake, Duration::from_secs(7)).is_none(),
        "an answered submission is not sent again"
    );
}

/// A submission that comes to the writer again after it was answered (its receipt lost
/// on the way) is answered with the same receipt, not handed to the log a second time;
/// one that comes again while the first copy is still being answered is left.
#[test]
fn a_submission_answered_before_gets_the_same_receipt() {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let mut config = KafkaConfig::new(broker.addr.clone());
    config.prefix = "answered".into();
    kafka::create_topics(&config, 3).unwrap();
    let mut intake = kafka::KafkaIntake::new(&config).unwrap();
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .create()
        .unwrap();
    let record = custos_stage::wire::encode_submission("someone", 7, &empty_batch()).unwrap();
    let send = || {
        producer
            .send(
                BaseRecord::to(&config.submissions())
                    .key("eng")
                    .partition(0)
                    .payload(&record),
            )
            .unwrap();
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    send();
    let (_, answer) = next_submission(&mut intake, Duration::from_secs(30)).expect("the submission");
    // A copy while the first is still being answered (an adapter request the writer's
    // node still serves when the ingest node resends it) is left: the first's receipt
    // answers it.
    send();
    assert!(
        next_submission(&mut intake, Duration::from_secs(5)).is_none(),
        "a copy of a submission in flight is not handed out again"
    );
    answer.send(Ok(custos_stage::Appended::entries(vec![5])));
    send();
    assert!(
        next_submission(&mut intake, Duration::from_secs(5)).is_none(),
        "the copy never reaches the log"
    );
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", "answered-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&config.receipts()]).unwrap();
    let mut receipts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while receipts.len() < 2 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200))
            && message.key() == Some(b"someone".as_slice())
        {
            receipts.push(message.payload().unwrap().to_vec());
        }
    }
    assert_eq!(receipts.len(), 2, "one receipt per copy");
    assert_eq!(receipts[0], receipts[1], "the same receipt");
    let decoded = custos_stage::wire::decode_receipt(&receipts[1]).unwrap();
    assert_eq!(decoded.ticket, 7);
    assert!(matches!(
        decoded.outcome,
        custos_stage::wire::Outcome::Appended(ref appended) if appended.log_indexes == [5]
    ));
}
