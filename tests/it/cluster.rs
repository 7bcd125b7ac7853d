//! The distributed mode with real processes: a tansu broker, a `custos serve --roles
//! detector,responder` process and a `custos serve --roles writer` process exchanging
//! the contract's records over Kafka topics. An attack sent to the writer is found by the
//! detector process, and the responder process's revocation is applied by the writer.
//! The stage process is then killed with SIGKILL and restarted, and so is the broker:
//! no duplicate finding, the next attack is still caught, and nothing reconnects by hand.

use std::io::BufRead as _;
use std::process::{Child, Stdio};
use std::time::Duration;

use custos_event::{AgentKey, Signer};
use serde_json::json;

use crate::respond::{enroll, get, send, wait_for};
use crate::stages::Broker;
use crate::support::{Server, custos};

/// Starts the stage process; returns it and the two keys it printed.
fn stages(data: &std::path::Path, brokers: &str) -> (Child, String, String) {
    let mut child = custos()
        .args(["serve", "--data"])
        .arg(data)
        .args([
            "--kafka",
            brokers,
            "--kafka-prefix",
            "cluster-test",
            "--roles",
            "detector,responder",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, keys) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("start the writer with: ") {
                let words: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
                let _ = found.send((words[1].clone(), words[3].clone()));
            }
        }
    });
    let (detector, responder) = keys
        .recv_timeout(Duration::from_secs(60))
        .expect("the stage process started");
    (child, detector, responder)
}

fn attack(url: &str, token: &str, seed: u8, memory: &str) -> String {
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

/// Findings about `agent` in the writer's log (SQL over the store).
fn findings_about(url: &str, token: &str, agent: &str) -> usize {
    let query = format!("SELECT count(*) AS n FROM findings WHERE agent = '{agent}' AND type = 'memory_poisoning'");
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/sql"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(json!({ "sql": query }).to_string())
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let rows: serde_json::Value = response.json().unwrap();
    rows[0]["n"].as_u64().unwrap() as usize
}

#[test]
fn stage_and_writer_processes_work_through_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let stage_data = dir.path().join("stages");
    let (mut stage, detector, responder) = stages(&stage_data, &broker.addr);
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            "cluster-test",
            "--roles",
            "writer",
            "--trust-detector",
            &detector,
            "--trust-responder",
            &responder,
        ],
    );
    let token = writer.token();
    let url = writer.url.clone();

    let first = attack(&url, &token, 61, "mem-a");
    wait_for("the responder process's revocation, applied by the writer", || {
        get(&url, &format!("/v1/agents/{first}"), &token).1["status"] == "revoked"
    });
    assert_eq!(findings_about(&url, &token, &first), 1);
    // The compacted control topic says so, for ingest nodes and agent platforms.
    let mut kafka = custos_stage::kafka::KafkaConfig::new(broker.addr.clone());
    kafka.prefix = "cluster-test".into();
    let state = |key: &str| {
        let latest = custos_stage::kafka::read_control(&kafka, Duration::from_secs(20)).unwrap();
        latest
            .get(key)
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(bytes).ok())
            .unwrap_or_default()
    };
    wait_for("the revocation on the control topic", || {
        state(&format!("agent:{first}"))["status"] == "revoked"
    });
    // The quarantine is its own action record, logged after the revocation.
    wait_for("the memory quarantine on the control topic", || {
        state("memory:mem-a")["status"] == "quarantined"
    });
    let memory = state("memory:mem-a");
    assert_eq!(memory["agent"], first.as_str());

    // SIGKILL the stage process (no snapshot at exit) and start it again.
    stage.kill().unwrap();
    stage.wait().unwrap();
    let (mut stage, ..) = stages(&stage_data, &broker.addr);
    // And SIGKILL the broker (SQLite storage): the processes reconnect by themselves.
    broker.restart();
    let second = attack(&url, &token, 62, "mem-b");
    wait_for("the restarted stages to revoke the second agent", || {
        get(&url, &format!("/v1/agents/{second}"), &token).1["status"] == "revoked"
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        findings_about(&url, &token, &first),
        1,
        "no duplicate after the restart"
    );
    assert_eq!(findings_about(&url, &token, &second), 1);
    stage.kill().unwrap();
    let _ = stage.wait();
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");
    let output = crate::support::run(&["verify", dir.path().join("writer").to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
}
