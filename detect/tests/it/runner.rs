//! The detector stage over the in-process transport, with the test as the log writer.

use std::time::Duration;

use chrono::Utc;
use custos_detect::runner::{DetectorStage, Request};
use custos_detect::{Detector, DetectorConfig, Rules};
use custos_event::{AgentKey, Kind, Observation, Payload, Signal};
use custos_stage::embedded::{self, Fanout};
use custos_stage::{Appended, Committed, Intake, Submission};

fn event(agent: &str, seq: u64, kind: Kind, index: u64, fill: impl FnOnce(&mut Payload)) -> Committed {
    let mut payload = Payload::new(kind, Utc::now());
    payload.agent = agent.into();
    payload.realm = "eng".into();
    payload.seq = seq;
    fill(&mut payload);
    Committed::Event(Box::new(Observation {
        log_index: Some(index),
        ingest_ts: Utc::now(),
        payload,
        signal: Signal::Accepted { gap: None },
        entry: None,
    }))
}

/// A receipt that never comes (the writer crashed after appending): the finding is sent
/// again, byte for byte, so the writer can answer it with the first append; and nothing
/// else is sent while it waits (the chain has no hole).
#[test]
fn a_finding_without_a_receipt_is_sent_again_identically() {
    let dir = tempfile::tempdir().unwrap();
    let fanout = Fanout::new();
    let mut subscription = fanout.subscribe_bounded(64, embedded::everything);
    let (submitter, mut intake) = embedded::queue();
    let stage = DetectorStage::new(
        Detector::new(DetectorConfig::default(), Rules::load(&[]).unwrap()),
        AgentKey::from_seed(&[9; 32]),
        dir.path().join("detector.snapshot"),
        Duration::from_secs(3600),
        Box::new(|_| {}),
    )
    .with_receipt_patience(Duration::from_millis(300));
    let (requests, inbox) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || stage.run(&mut subscription, &submitter, inbox));

    let agent = AgentKey::from_seed(&[10; 32]).did().to_owned();
    fanout.send(Committed::Replayed { next_index: 1 });
    for record in attack(&agent, "eng", 1) {
        fanout.send(record);
    }

    let take = |intake: &mut custos_stage::embedded::ChannelIntake| {
        intake
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("a submission from the detector")
    };
    let (first, held) = take(&mut intake);
    let Submission::Finding(first) = first else {
        panic!("not a finding: {first:?}")
    };
    // No answer: the detector must send the same finding again, and nothing else.
    let (again, answer) = take(&mut intake);
    let Submission::Finding(again) = again else {
        panic!("not a finding: {again:?}")
    };
    assert_eq!(again, first, "the same bytes and signature");
    answer.send(Ok(Appended::entries(vec![4])));
    drop(held);
    let (done, wait) = std::sync::mpsc::channel();
    requests.send(Request::Stop(done)).unwrap();
    wait.recv_timeout(Duration::from_secs(30)).unwrap();
    thread.join().unwrap();
}

/// Poisoning events of one agent: write untrusted, read, use a credential.
fn attack(agent: &str, realm: &str, first_index: u64) -> Vec<Committed> {
    let with_realm = |mut record: Committed| {
        if let Committed::Event(observation) = &mut record {
            observation.payload.realm = realm.into();
        }
        record
    };
    vec![
        with_realm(event(agent, 0, Kind::MemoryWrite, first_index, |payload| {
            payload.memory_id = Some(format!("mem-{realm}"));
            payload.attrs = Some(
                serde_json::json!({"source_trust": "untrusted"})
                    .as_object()
                    .unwrap()
                    .clone(),
            );
        })),
        with_realm(event(agent, 1, Kind::MemoryRead, first_index + 1, |payload| {
            payload.memory_id = Some(format!("mem-{realm}"));
        })),
        with_realm(event(agent, 2, Kind::CredentialUse, first_index + 2, |payload| {
            payload.target = Some("cred-db".into());
            payload.attrs = Some(
                serde_json::json!({"credential_owner": agent})
                    .as_object()
                    .unwrap()
                    .clone(),
            );
        })),
    ]
}

/// With one log per partition, log indexes repeat across logs: the detector keeps its
/// position per log (an attack at the same indexes in another realm's log is still
/// seen), and signs each log's findings on that log's own chain (each starts at seq 0).
#[test]
fn with_a_log_per_partition_positions_and_chains_are_per_log() {
    let lanes = 3;
    let mut realms = Vec::new();
    for n in 0.. {
        let realm = format!("realm-{n}");
        if !realms
            .iter()
            .any(|known: &String| custos_event::partition_of(known, lanes) == custos_event::partition_of(&realm, lanes))
        {
            realms.push(realm);
        }
        if realms.len() == 2 {
            break;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let fanout = Fanout::new();
    let mut subscription = fanout.subscribe_bounded(64, embedded::everything);
    let (submitter, mut intake) = embedded::queue();
    let config = DetectorConfig {
        log_lanes: lanes,
        ..DetectorConfig::default()
    };
    let stage = DetectorStage::new(
        Detector::new(config, Rules::load(&[]).unwrap()),
        AgentKey::from_seed(&[9; 32]),
        dir.path().join("detector.snapshot"),
        Duration::from_secs(3600),
        Box::new(|_| {}),
    )
    .with_lanes(lanes);
    let (requests, inbox) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || stage.run(&mut subscription, &submitter, inbox));
    fanout.send(Committed::Replayed { next_index: 0 });
    for (n, realm) in realms.iter().enumerate() {
        let agent = AgentKey::from_seed(&[20 + n as u8; 32]).did().to_owned();
        // The same log indexes (1, 2, 3) in each realm's log.
        for record in attack(&agent, realm, 1) {
            fanout.send(record);
        }
    }
    let mut seen = Vec::new();
    for _ in 0..realms.len() {
        let (submission, answer) = intake
            .recv(Duration::from_secs(10))
            .unwrap()
            .expect("a finding for each realm's attack");
        let Submission::Finding(envelope) = submission else {
            panic!("not a finding: {submission:?}")
        };
        let payload: serde_json::Value = serde_json::from_slice(&envelope.payload).unwrap();
        seen.push((
            payload["realm"].as_str().unwrap().to_owned(),
            payload["seq"].as_u64().unwrap(),
        ));
        answer.send(Ok(Appended::entries(vec![4])));
    }
    seen.sort();
    assert_eq!(seen, realms.iter().map(|realm| (realm.clone(), 0)).collect::<Vec<_>>());
    let (done, wait) = std::sync::mpsc::channel();
    requests.send(Request::Stop(done)).unwrap();
    wait.recv_timeout(Duration::from_secs(30)).unwrap();
    thread.join().unwrap();
}
