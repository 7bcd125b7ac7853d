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

use crate::hardening::signed_lines;
use crate::lastid::{LastIdAgent, ship};
use crate::respond::{enroll, get, wait_for};
use crate::stages::{Broker, poison};
use crate::support::{Server, custos, post};

/// Starts the stage process; returns it and the two keys it printed.
fn stages(data: &std::path::Path, brokers: &str) -> (Child, String, String) {
    let (child, detector, responder, _) = stage_process(data, brokers, "cluster-test", "detector,responder");
    (child, detector, responder)
}

/// A `custos serve --roles ROLES` stage process: it, the detector and responder keys it
/// printed, and its log so far.
fn stage_process(
    data: &std::path::Path,
    brokers: &str,
    prefix: &str,
    roles: &str,
) -> (Child, String, String, std::sync::Arc<std::sync::Mutex<String>>) {
    stage_process_with(data, brokers, prefix, roles, &[])
}

/// [`stage_process`] with extra `serve` arguments.
fn stage_process_with(
    data: &std::path::Path,
    brokers: &str,
    prefix: &str,
    roles: &str,
    extra: &[&str],
) -> (Child, String, String, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut child = custos()
        .args(["serve", "--data"])
        .arg(data)
        .args(["--kafka", brokers, "--kafka-prefix", prefix, "--roles", roles])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (found, keys) = std::sync::mpsc::channel();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("start the writer with: ") {
                let words: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
                let _ = found.send((words[1].clone(), words[3].clone()));
            }
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    let (detector, responder) = keys
        .recv_timeout(Duration::from_secs(60))
        .expect("the stage process started");
    (child, detector, responder, log)
}

/// Findings about `agent` in the writer's log (SQL over the store).
fn findings_about(url: &str, token: &str, agent: &str) -> usize {
    let query = format!("SELECT count(*) AS n FROM findings WHERE agent = '{agent}' AND type = 'memory_poisoning'");
    sql(url, token, &query)[0]["n"].as_u64().unwrap() as usize
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

    let first = poison(&url, &token, 61, "mem-a");
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
    let (mut stage, _, _, stage_log) = stage_process(&stage_data, &broker.addr, "cluster-test", "detector,responder");
    // And SIGKILL the broker (SQLite storage): the processes reconnect by themselves.
    broker.restart();
    let second = poison(&url, &token, 62, "mem-b");
    let started = std::time::Instant::now();
    while get(&url, &format!("/v1/agents/{second}"), &token).1["status"] != "revoked" {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the restarted stages did not revoke the second agent: {}",
            stage_log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// SQL over the writer's store: rows as JSON.
pub(crate) fn sql(url: &str, token: &str, query: &str) -> Vec<serde_json::Value> {
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
    response.json::<Vec<serde_json::Value>>().unwrap()
}

/// POSTs `body` to `/v1/events`; `None` when the node could not be reached or answered
/// anything but 200 (a client resends).
pub(crate) fn post_events(url: &str, body: &[u8]) -> Option<Vec<serde_json::Value>> {
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/events"))
        .header("content-type", "application/x-ndjson")
        .body(body.to_vec())
        .timeout(Duration::from_secs(60))
        .send()
        .ok()?;
    if response.status().as_u16() != 200 {
        return None;
    }
    response.json().ok()
}

fn ingest_node(dir: &std::path::Path, name: &str, brokers: &str) -> Server {
    Server::start_with(
        &dir.join(name),
        &["--kafka", brokers, "--kafka-prefix", "edge-test", "--roles", "ingest"],
    )
}

/// Two stateless ingest processes in front of one writer. Each answers per item as one
/// node does; one is killed with SIGKILL mid-stream and its client moves to the other,
/// resending what was not acknowledged: every acknowledged event is stored exactly once.
/// A revocation made through one ingest node is enforced there at once, and on events
/// sent through another running ingest node within a second. The broker
/// is killed too, and ingest resumes by itself.
#[test]
fn stateless_ingest_nodes_in_front_of_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let webhook_secret = dir.path().join("vaultysclaw-secret");
    std::fs::write(&webhook_secret, VAULTYSCLAW_SECRET).unwrap();
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            "edge-test",
            "--roles",
            "writer",
            "--vaultysclaw-secret-file",
            webhook_secret.to_str().unwrap(),
            "--vaultysclaw-realm",
            "vc",
            // Every event the ingest nodes verified is checked again: none is refused
            // for it (a forgery is, `stages.rs`).
            "--verify-submissions",
        ],
    );
    let token = writer.token();
    let url = writer.url.clone();
    let first = ingest_node(dir.path(), "ingest-1", &broker.addr);
    let second = ingest_node(dir.path(), "ingest-2", &broker.addr);

    // Six agents, three per client; each ingest node learns them from the control topic.
    let mut signers: Vec<Signer> = (0..6u8)
        .map(|n| {
            let key = AgentKey::from_seed(&[80 + n; 32]);
            enroll(&url, &token, key.did(), "eng");
            Signer::new(key, "eng")
        })
        .collect();
    let dids: Vec<String> = signers.iter().map(|signer| signer.did().to_owned()).collect();
    let batch = signed_lines;
    // The control topic has partitions: each agent's enrollment arrives on its own.
    let probes: Vec<Vec<u8>> = signers.iter_mut().map(|signer| batch(signer, 1)).collect();
    for node in [&first, &second] {
        for probe in &probes {
            wait_for("the ingest node to know the enrolled agents", || {
                post_events(&node.url, probe).is_some_and(|results| results[0]["reason"] != "unknown_agent")
            });
        }
    }
    let probe = probes[0].clone();
    // An agent enrolled through one ingest node is taken at once by the other, as by
    // one node: the first answers once the agent's control record is on the brokers,
    // and a node that does not know a signer reads the control topic to its end before
    // refusing it `unknown_agent`.
    for n in 0..10u8 {
        let key = AgentKey::from_seed(&[120 + n; 32]);
        enroll(&first.url, &first.token(), key.did(), "eng");
        let mut signer = Signer::new(key, "eng");
        let results = post_events(&second.url, &batch(&mut signer, 1)).expect("events answered");
        assert_eq!(results[0]["status"], "accepted", "{results:?}");
    }
    // Likewise an agent enrolled through the writer's own API: it answers once the
    // agent's control record is on the brokers, and every such wait ended in time.
    for n in 0..10u8 {
        let key = AgentKey::from_seed(&[140 + n; 32]);
        enroll(&url, &token, key.did(), "eng");
        let mut signer = Signer::new(key, "eng");
        let results = post_events(&second.url, &batch(&mut signer, 1)).expect("events answered");
        assert_eq!(results[0]["status"], "accepted", "{results:?}");
    }
    let (in_time, late) = (
        metric(&writer, "custos_writer_control_waits_total{outcome=\"in_time\"}"),
        metric(&writer, "custos_writer_control_waits_total{outcome=\"late\"}"),
    );
    assert!(
        in_time >= 16 && late == 0,
        "the writer answered {in_time} enrollments once published in time, {late} late"
    );
    // Every read of the topic to its end finished in time (none waited out its second):
    // the first node's, one or more per enrollment, and the second's, for the signers
    // it did not know yet when their events came.
    for (node, least) in [(&first, 10), (&second, 0)] {
        let (in_time, late) = (
            metric(node, "custos_ingest_catch_ups_total{outcome=\"in_time\"}"),
            metric(node, "custos_ingest_catch_ups_total{outcome=\"late\"}"),
        );
        assert!(
            in_time >= least && late == 0,
            "{} read the topic to its end {in_time} times in time, {late} late",
            node.url
        );
    }

    // The node describes its own routes.
    let document: serde_json::Value = reqwest::blocking::get(format!("{}/openapi.json", first.url))
        .unwrap()
        .json()
        .unwrap();
    for path in ["/v1/events", "/v1/agents/{did}/revoke", "/v1/tokens", "/v1/traces"] {
        assert!(document["paths"][path].is_object(), "{path} not in {document}");
    }
    let collector = adapters_through_ingest_nodes(&url, &token, [&first.url, &second.url]);
    // A collector token the writer refused is refused again by the ingest node itself for
    // a while, as the writer answered, without a broker round trip (the node hands the
    // writer nothing more).
    let handed_over = submissions_handed_over;
    let before = handed_over(&second);
    assert!(before > 0, "the node hands the writer its submissions");
    for _ in 0..3 {
        let (status, answer) =
            post_otlp(&second.url, Some(&format!("cus_{}", "A".repeat(43))), b"{}".to_vec()).unwrap();
        assert_eq!(
            (status, answer["error"].as_str()),
            (401, Some("unauthenticated")),
            "{answer}"
        );
    }
    assert_eq!(handed_over(&second), before, "refused by the ingest node itself");

    // An adapter request naming 500 agents the collector never named before costs the
    // writer two appends, not one per agent: the agents' delegations, then their spans.
    // Events sent through the other ingest node meanwhile are answered as usual.
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    const FLEET: u64 = 500;
    let spans: Vec<serde_json::Value> = (0..FLEET)
        .map(|index| {
            json!({"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": format!("{index:016x}"),
                "name": "chat", "kind": 3, "startTimeUnixNano": (now - 1000).to_string(),
                "endTimeUnixNano": now.to_string(), "attributes": [
                    {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                    {"key": "gen_ai.agent.id", "value": {"stringValue": format!("fleet-{index}")}}]})
        })
        .collect();
    let body = json!({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": spans}]}]});
    let agents = || {
        sql(&url, &token, "SELECT count(*) AS n FROM agents")[0]["n"]
            .as_u64()
            .unwrap()
    };
    // The collector's agents that have events.
    let attested = || {
        sql(
            &url,
            &token,
            "SELECT count(*) AS n FROM agents WHERE parent IS NOT NULL AND events > 0",
        )[0]["n"]
            .as_u64()
            .unwrap()
    };
    // The writer verifies and appends an adapter's batches itself (one count each).
    let appends = || metric(&writer, "custos_ingest_verify_seconds_count");
    let (before, attested_before, appends_before) = (agents(), attested(), appends());
    let large = {
        let (node, collector) = (second.url.clone(), collector.clone());
        std::thread::spawn(move || post_otlp(&node, Some(&collector), body.to_string().into_bytes()).unwrap())
    };
    let mut enrolled = 0;
    wait_for("the adapter request to enroll its agents", || {
        enrolled = agents() - before;
        enrolled > 0
    });
    assert_eq!(enrolled, FLEET, "the new agents are enrolled as one batch");
    let results = post_events(&first.url, &batch(&mut signers[2], 5)).expect("events answered");
    assert!(
        results.iter().all(|result| result["status"] == "accepted"),
        "{results:?}"
    );
    let (status, answer) = large.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(agents() - before, FLEET, "the adapter request enrolled its agents");
    assert_eq!(attested() - attested_before, FLEET, "and appended each one's span");
    assert_eq!(
        appends() - appends_before,
        2,
        "the delegations, then every agent's span, each as one append"
    );

    // One ingest node answers a mixed request item by item, as the writer's own API does.
    let unknown = Signer::new(AgentKey::from_seed(&[99; 32]), "eng").sign_object(
        json!({"kind": "tool_call"}).as_object().unwrap().clone(),
        chrono::Utc::now(),
    );
    let fresh = batch(&mut signers[0], 1);
    let mut mixed = probe.clone();
    for line in [&b"{not an envelope"[..], unknown.unwrap().to_json().as_bytes(), &fresh] {
        mixed.push(b'\n');
        mixed.extend_from_slice(line);
    }
    let results = post_events(&first.url, &mixed).expect("an answer");
    let summary: Vec<(String, String)> = results
        .iter()
        .map(|result| {
            (
                result["status"].as_str().unwrap().to_owned(),
                result["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("duplicate", ""),
        ("rejected", "malformed"),
        ("rejected", "unknown_agent"),
        ("accepted", ""),
    ];
    assert_eq!(
        summary,
        expected.map(|(status, reason)| (status.to_owned(), reason.to_owned())),
        "{results:?}"
    );
    // A request larger than one broker record crosses as several submissions and is
    // answered as one: 3 000 events and a line far too large to be an event.
    let mut large = batch(&mut signers[1], 3000);
    large.push(b'\n');
    large.extend(std::iter::repeat_n(b'x', 300 * 1024));
    assert!(large.len() > 1_500_000, "{} bytes", large.len());
    let results = post_events(&first.url, &large).expect("an answer to a large request");
    assert_eq!(results.len(), 3001);
    let accepted = results.iter().filter(|result| result["status"] == "accepted").count();
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for result in &results {
        *tally
            .entry(format!("{} {}", result["status"], result["reason"]))
            .or_default() += 1;
    }
    assert_eq!(accepted, 3000, "{tally:?} {:?}", &results[..3]);
    assert_eq!(results[3000]["status"], "rejected", "{}", results[3000]);
    // A refusal made by the ingest node is kept for forensics by the writer.
    let (_, rejected) = get(&url, "/v1/rejected?reason=unknown_agent", &token);
    assert!(!rejected["rejected"].as_array().unwrap().is_empty(), "{rejected}");
    // The huge line crossed cut to fit a broker record; its record still names the
    // whole line: its size and blake3.
    let line = vec![b'x'; 300 * 1024];
    let reason = results[3000]["reason"].as_str().unwrap();
    let (_, rejected) = get(&url, &format!("/v1/rejected?reason={reason}"), &token);
    let record = rejected["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|record| record["size"] == line.len())
        .unwrap_or_else(|| {
            let sizes: Vec<&serde_json::Value> = rejected["rejected"]
                .as_array()
                .unwrap()
                .iter()
                .map(|record| &record["size"])
                .collect();
            panic!("no record of the whole {} byte line; sizes kept: {sizes:?}", line.len())
        });
    assert_eq!(record["blake3"], blake3::hash(&line).to_hex().as_str(), "{record}");
    assert_eq!(record["truncated"], true);

    // Two clients stream through the two ingest nodes; the second node is killed mid-way.
    let (left, right) = signers.split_at_mut(3);
    let acknowledged = std::sync::Mutex::new(Vec::<(String, u64)>::new());
    let urls = [first.url.clone(), second.url.clone()];
    let second_pid = second.pid();
    std::thread::scope(|scope| {
        for (client, signers) in [(0usize, left), (1, right)] {
            let (urls, acknowledged) = (&urls, &acknowledged);
            scope.spawn(move || {
                let mut target = client;
                for round in 0..30 {
                    for signer in signers.iter_mut() {
                        let body = batch(signer, 5);
                        // Resend the same bytes until some node answers.
                        deliver(urls, &mut target, &body, round, acknowledged);
                    }
                }
            });
        }
        // A third of the stream acknowledged, then SIGKILL the second ingest node.
        wait_for("a third of the stream", || acknowledged.lock().unwrap().len() >= 300);
        let _ = std::process::Command::new("kill")
            .args(["-9", &second_pid.to_string()])
            .status();
    });
    second.kill();
    let acknowledged = acknowledged.into_inner().unwrap();
    assert_eq!(acknowledged.len(), 6 * 30 * 5);
    let twice = sql(
        &url,
        &token,
        "SELECT agent, seq, count(*) AS n FROM events GROUP BY agent, seq HAVING count(*) > 1",
    );
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    for did in &dids {
        let stored = sql(&url, &token, &format!("SELECT seq FROM events WHERE agent = '{did}'"));
        let stored: std::collections::BTreeSet<u64> = stored.iter().map(|row| row["seq"].as_u64().unwrap()).collect();
        for (_, seq) in acknowledged.iter().filter(|(agent, _)| agent == did) {
            assert!(stored.contains(seq), "acknowledged seq {seq} of {did} is not stored");
        }
    }

    // A revocation through the surviving ingest node; both answers that follow it refuse.
    revoke_through(&first, &dids[0], "cluster test");
    // A node started after it learns the revocation from the control topic.
    let third = ingest_node(dir.path(), "ingest-3", &broker.addr);
    wait_for("the new ingest node to read the control topic", || {
        reqwest::blocking::get(format!("{}/readyz", third.url)).is_ok_and(|response| response.status().is_success())
    });
    for node in [&first, &third] {
        let results = post_events(&node.url, &batch(&mut signers[0], 1)).expect("an answer");
        assert_eq!(results[0]["reason"], "revoked_agent", "{results:?}");
    }
    // A revocation through one running ingest node is enforced on events sent through
    // the other within a second of the answer: refused `revoked_agent`, by that node's
    // view of the control topic or by the writer, whichever has it first (the refused
    // events go to the writer for forensics either way, so the two look alike here).
    revoke_through(&third, &dids[5], "cluster test, the other node");
    let answered = std::time::Instant::now();
    let refused_after = loop {
        let results = post_events(&first.url, &batch(&mut signers[5], 1)).expect("an answer");
        if results[0]["reason"] == "revoked_agent" {
            break answered.elapsed();
        }
        assert!(
            answered.elapsed() < Duration::from_secs(10),
            "the other ingest node never enforced the revocation: {results:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        refused_after < Duration::from_secs(1),
        "the other ingest node enforced the revocation only after {refused_after:?}"
    );

    // The broker dies and comes back: ingest resumes by itself, nothing acknowledged lost.
    broker.restart();
    let body = batch(&mut signers[1], 3);
    wait_for("ingest to resume after the broker restart", || {
        post_events(&first.url, &body)
            .is_some_and(|results| results.iter().all(|result| result["status"] != "rejected"))
    });
    let stored = sql(&url, &token, "SELECT count(*) AS n FROM events");
    assert!(stored[0]["n"].as_u64().unwrap() >= acknowledged.len() as u64);
    first.kill();
    third.kill();
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");
    let output = crate::support::run(&["verify", dir.path().join("writer").to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
}

const VAULTYSCLAW_SECRET: &str = "edge-webhook-secret";

/// The adapters through both ingest nodes: each request is passed on whole to the
/// writer's node and answered as its own API answers. A collector token of the writer
/// is one attesting identity whichever ingest node it reaches (the token itself never
/// crosses: only its hash), and the LastID chains and VaultysClaw deliveries the writer
/// keeps make a resend through the other node a duplicate. A LastID agent may be
/// enrolled through an ingest node with the writer's admin token.
fn adapters_through_ingest_nodes(url: &str, admin: &str, nodes: [&str; 2]) -> String {
    let collector = collector_token(url, admin, "eng");
    let collector = collector.as_str();
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let spans = |span_id: &str| crate::otlp::planner_spans(now, &[span_id]);
    let span_ids = ["00f067aa0ba90201", "00f067aa0ba90202"];
    for (node, span_id) in nodes.iter().zip(span_ids) {
        let (status, answer) = post_otlp(node, Some(collector), spans(span_id)).unwrap();
        assert_eq!(status, 200, "{node}: {answer}");
    }
    let rows = sql(
        url,
        admin,
        "SELECT agent, span_id, attrs FROM events WHERE kind = 'llm_call' ORDER BY log_index",
    );
    let found: Vec<&str> = rows.iter().map(|row| row["span_id"].as_str().unwrap()).collect();
    assert_eq!(found, span_ids, "{rows:?}");
    assert_eq!(
        rows[0]["agent"], rows[1]["agent"],
        "one attested agent whichever node: {rows:?}"
    );
    let attrs: serde_json::Value = serde_json::from_str(rows[0]["attrs"].as_str().unwrap()).unwrap();
    assert_eq!(
        (attrs["custos.source"].as_str(), attrs["custos.attested_for"].as_str()),
        (Some("otlp"), Some("planner"))
    );
    // Who may send: checked by the writer against its own tokens, and without a token
    // by the ingest node itself.
    let (status, answer) = post_otlp(nodes[0], None, spans("00f067aa0ba90203")).unwrap();
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated")),
        "{answer}"
    );
    let (status, answer) = post_otlp(
        nodes[1],
        Some(&format!("cus_{}", "A".repeat(43))),
        spans("00f067aa0ba90203"),
    )
    .unwrap();
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated")),
        "{answer}"
    );
    let (status, answer) = post_otlp(nodes[0], Some(admin), spans("00f067aa0ba90203")).unwrap();
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")), "{answer}");
    let (status, answer) = post_otlp(nodes[0], Some(collector), b"{\"resourceSpans\": 7}".to_vec()).unwrap();
    assert_eq!((status, answer["error"].as_str()), (400, Some("bad_otlp")), "{answer}");
    // A body too large for one broker record is refused by name, not answered 503 for
    // ever (a client would resend it in vain).
    let mut padded = spans("00f067aa0ba90204");
    padded.extend(std::iter::repeat_n(b' ', 900 * 1024));
    let (status, answer) = post_otlp(nodes[1], Some(collector), padded).unwrap();
    assert_eq!((status, answer["error"].as_str()), (413, Some("too_large")), "{answer}");
    let limit = custos_ingest::edge::MAX_ADAPTER_BODY.to_string();
    assert!(answer["message"].as_str().unwrap().contains(&limit), "{answer}");

    // LastID: enrolled on the writer; records through one node, again through the other.
    let mut agent = crate::lastid::LastIdAgent::new("did:lastid:agent:edge", [33; 32]);
    let (status, enrolled) = post(
        url,
        "/v1/agents",
        Some(admin),
        json!({"did": agent.did, "realm": "eng", "source": "lastid", "public_key": agent.public_key_hex()})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{enrolled}");
    let records = [
        agent.next("AgentToolInvoked", None, json!({"tool": "search"})),
        agent.next("AgentToolInvoked", None, json!({"tool": "fetch"})),
    ];
    let statuses = |results: Vec<serde_json::Value>| -> Vec<String> {
        results
            .iter()
            .map(|result| result["status"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        statuses(crate::lastid::ship(nodes[0], &records)),
        ["accepted", "accepted"]
    );
    assert_eq!(
        statuses(crate::lastid::ship(nodes[1], &records)),
        ["duplicate", "duplicate"]
    );
    let mut forged = records[1].clone();
    forged["metadata"] = json!({"tool": "exfiltrate"});
    let results = crate::lastid::ship(nodes[1], &[forged]);
    assert_eq!(results[0]["reason"], "integrity_mismatch", "{results:?}");
    // Enrolled through an ingest node too, with the writer's admin token (its node
    // keeps LastID enrollments and checks the token); its records then go through the
    // other node.
    let mut second = crate::lastid::LastIdAgent::new("did:lastid:agent:edge-2", [34; 32]);
    let (status, enrolled) = post(
        nodes[1],
        "/v1/agents",
        Some(admin),
        json!({"did": second.did, "realm": "eng", "source": "lastid", "public_key": second.public_key_hex()})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(
        (status, enrolled["source"].as_str()),
        (201, Some("lastid")),
        "{enrolled}"
    );
    let record = second.next("AgentToolInvoked", None, json!({"tool": "search"}));
    wait_for("the other ingest node to place the new LastID agent", || {
        crate::lastid::ship(nodes[0], std::slice::from_ref(&record))[0]["status"] == "accepted"
    });

    // VaultysClaw: the webhook secret and the deliveries seen are the writer's.
    let delivery = json!({"event": "intent.completed", "occurredAt": chrono::Utc::now().to_rfc3339(), "data": {
        "intentId": "i-edge", "agentDid": "did:vc:agent:edge", "action": "http.get",
        "params": {"url": "https://api.example.com"}, "status": "completed"}});
    let at = chrono::Utc::now().timestamp_millis();
    let (status, answer) = crate::vaultysclaw::deliver(nodes[1], "d-edge", at, VAULTYSCLAW_SECRET, &delivery);
    assert_eq!((status, answer["status"].as_str()), (200, Some("accepted")), "{answer}");
    let (status, answer) = crate::vaultysclaw::deliver(nodes[0], "d-edge", at, VAULTYSCLAW_SECRET, &delivery);
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("duplicate")),
        "{answer}"
    );
    let (status, answer) = crate::vaultysclaw::deliver(nodes[0], "d-edge-2", at, "not-the-secret", &delivery);
    assert_eq!((status, answer["error"].as_str()), (401, Some("bad_hmac")), "{answer}");
    collector.to_owned()
}

/// Revokes agent `did` through ingest node `node`, with its admin token: answered 200.
fn revoke_through(node: &Server, did: &str, reason: &str) {
    let revoked = reqwest::blocking::Client::new()
        .post(format!("{}/v1/agents/{did}/revoke", node.url))
        .bearer_auth(node.token())
        .json(&json!({ "reason": reason }))
        .send()
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200, "{:?}", revoked.text());
}

/// The value of `series` (a metric's name and labels) on `node`'s `/metrics`; 0 before
/// its first count.
fn metric(node: &Server, series: &str) -> u64 {
    let text = reqwest::blocking::Client::new()
        .get(format!("{}/metrics", node.url))
        .bearer_auth(node.token())
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// How many submissions ingest node `node` has handed the writers (its
/// `custos_ingest_writer_seconds` count for the `submit` step).
fn submissions_handed_over(node: &Server) -> u64 {
    metric(node, "custos_ingest_writer_seconds_count{step=\"submit\"}")
}

/// A new collector token for `realm`, made at `url` with the `admin` token.
pub(crate) fn collector_token(url: &str, admin: &str, realm: &str) -> String {
    let (status, created) = post(
        url,
        "/v1/tokens",
        Some(admin),
        json!({"role": "collector", "realms": [realm]}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    created["token"].as_str().unwrap().to_owned()
}

/// `POST /v1/traces` with an OTLP/JSON body.
pub(crate) fn post_otlp(url: &str, token: Option<&str>, body: Vec<u8>) -> reqwest::Result<(u16, serde_json::Value)> {
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/traces"))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(30))
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send()?;
    let status = response.status().as_u16();
    Ok((status, response.json().unwrap_or(serde_json::Value::Null)))
}

/// Sends `body` (signed envelopes, one per line) to `urls[target]` until some ingest
/// node answers, moving to the first node when one does not (a client's resend of the
/// same bytes), and records every (agent, seq) it acknowledged, each `accepted` or
/// `duplicate`.
fn deliver(
    urls: &[String],
    target: &mut usize,
    body: &[u8],
    round: usize,
    acknowledged: &std::sync::Mutex<Vec<(String, u64)>>,
) {
    let started = std::time::Instant::now();
    let results = loop {
        if let Some(results) = post_events(&urls[*target], body) {
            break results;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "round {round}: no ingest node answered for two minutes"
        );
        *target = 0;
        std::thread::sleep(Duration::from_millis(100));
    };
    for (line, result) in body.split(|byte| *byte == b'\n').zip(&results) {
        assert!(
            result["status"] == "accepted" || result["status"] == "duplicate",
            "round {round}: {result}"
        );
        let envelope: serde_json::Value = serde_json::from_slice(line).unwrap();
        let payload = base64_decode(envelope["payload"].as_str().unwrap());
        let payload: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        acknowledged.lock().unwrap().push((
            payload["agent"].as_str().unwrap().to_owned(),
            payload["seq"].as_u64().unwrap(),
        ));
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

/// With the writer down, an ingest node answers 503 `writer_unavailable` once its wait
/// is over (it does not hang); the submission waits in the topic, the restarted writer
/// appends it, and the client's resend of the same bytes is answered `duplicate`.
#[test]
fn an_ingest_node_without_a_writer_answers_and_nothing_is_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let writer_args = [
        "--kafka",
        &broker.addr,
        "--kafka-prefix",
        "edge-down",
        "--roles",
        "writer",
    ];
    let writer = Server::start_with(&dir.path().join("writer"), &writer_args);
    let token = writer.token();
    let key = AgentKey::from_seed(&[77; 32]);
    enroll(&writer.url, &token, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let ingest = Server::start_with(
        &dir.path().join("ingest"),
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            "edge-down",
            "--roles",
            "ingest",
            "--writer-timeout-secs",
            "2",
        ],
    );
    let first = signed_lines(&mut signer, 1);
    wait_for("the ingest node to know the agent", || {
        post_events(&ingest.url, &first).is_some_and(|results| results[0]["status"] == "accepted")
    });
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");

    let body = signed_lines(&mut signer, 3);
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/v1/events", ingest.url))
        .body(body.clone())
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let answer: serde_json::Value = response.json().unwrap();
    assert_eq!(answer["error"], "writer_unavailable", "{answer}");

    let writer = Server::start_with(&dir.path().join("writer"), &writer_args);
    let mut results = Vec::new();
    wait_for("the restarted writer to answer the resend", || {
        results = post_events(&ingest.url, &body).unwrap_or_default();
        !results.is_empty()
    });
    assert!(
        results.iter().all(|result| result["status"] == "duplicate"),
        "the first send was appended from the topic; the resend is a duplicate: {results:?}"
    );
    let stored = sql(
        &writer.url,
        &token,
        &format!("SELECT count(*) AS n FROM events WHERE agent = '{}'", signer.did()),
    );
    assert_eq!(stored[0]["n"].as_u64(), Some(4), "{stored:?}");
    ingest.kill();
    writer.stop();
}

/// Exactly one responder acts: a second responder process waits for the lease while the
/// first is alive, and takes over when the first is killed with SIGKILL. Each attack
/// gets one action, however many responders there are.
#[test]
fn one_responder_acts_and_a_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let prefix = "lease-test";
    let (mut detector, detector_key, ..) =
        stage_process(&dir.path().join("detector"), &broker.addr, prefix, "detector");
    let (mut first, _, first_key, first_log) =
        stage_process(&dir.path().join("responder-1"), &broker.addr, prefix, "responder");
    wait_for("the first responder to take the lease", || {
        first_log.lock().unwrap().contains("responder: active")
    });
    let (mut second, _, second_key, second_log) =
        stage_process(&dir.path().join("responder-2"), &broker.addr, prefix, "responder");
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[
            "--kafka",
            &broker.addr,
            "--kafka-prefix",
            prefix,
            "--roles",
            "writer",
            "--trust-detector",
            &detector_key,
            "--trust-responder",
            &format!("{first_key},{second_key}"),
        ],
    );
    let (url, token) = (writer.url.clone(), writer.token());
    let actions = |agent: &str| {
        sql(
            &url,
            &token,
            &format!("SELECT keyid FROM actions WHERE agent = '{agent}' AND action = 'revoke_agent'"),
        )
    };

    let one = poison(&url, &token, 71, "mem-lease-1");
    wait_for("the active responder's revocation", || {
        get(&url, &format!("/v1/agents/{one}"), &token).1["status"] == "revoked"
    });
    assert!(second_log.lock().unwrap().contains("responder: standby"));
    assert!(
        !second_log.lock().unwrap().contains("responder: active"),
        "two active responders"
    );
    let by_first = actions(&one);
    assert_eq!(by_first.len(), 1, "{by_first:?}");
    assert_eq!(by_first[0]["keyid"], first_key.as_str());

    first.kill().unwrap();
    first.wait().unwrap();
    let started = std::time::Instant::now();
    while !second_log.lock().unwrap().contains("responder: active") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the standby did not take the lease: {}",
            second_log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let two = poison(&url, &token, 72, "mem-lease-2");
    wait_for("the new active responder's revocation", || {
        get(&url, &format!("/v1/agents/{two}"), &token).1["status"] == "revoked"
    });
    let by_second = actions(&two);
    assert_eq!(by_second.len(), 1, "{by_second:?}");
    assert_eq!(by_second[0]["keyid"], second_key.as_str());
    // The new responder read the first attack's action back and did not act again.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(actions(&one).len(), 1);

    // The first responder, had it only been cut off, would still send what it made under
    // its tenure: the writer refuses it now that the second has acted under a later one.
    let tenure = |log: &std::sync::Arc<std::sync::Mutex<String>>| -> u64 {
        let log = log.lock().unwrap();
        let at = log.find("holds the lease, tenure ").expect("the tenure is said") + "holds the lease, tenure ".len();
        log[at..].split(')').next().unwrap().parse().unwrap()
    };
    let (old, new) = (tenure(&first_log), tenure(&second_log));
    assert!(new > old, "tenures {old} then {new}");
    let key = custos_store::keyfile::read_key(&dir.path().join("responder-1").join("responder.key")).unwrap();
    let payload = serde_json::to_vec(&serde_json::json!({"id": "late", "agent": two, "realm": "eng",
        "status": "executed", "enforcement": {"op": "reinstate_agent", "agent": two}, "by": "responder",
        "reason": "made before the lease was lost", "kind": "action", "seq": 1_000_000}))
    .unwrap();
    let mut kafka = custos_stage::kafka::KafkaConfig::new(broker.addr.clone());
    kafka.prefix = prefix.to_owned();
    let submitter = custos_stage::kafka::KafkaSubmitter::new(&kafka).unwrap();
    let late = custos_stage::Submitter::submit(
        &submitter,
        custos_stage::Submission::Action {
            envelope: key.sign_envelope(custos_event::ACTION_PAYLOAD_TYPE, payload),
            lease_epoch: Some(old),
        },
    )
    .unwrap()
    .wait(Duration::from_secs(60))
    .unwrap_err();
    assert_eq!(late.code, "stale_responder", "{late:?}");
    assert_eq!(
        get(&url, &format!("/v1/agents/{two}"), &token).1["status"],
        "revoked",
        "the late reinstatement was not applied"
    );
    drop(submitter);
    for child in [&mut second, &mut detector] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    writer.stop();
}

/// `custos bench cluster` drives real processes and a real broker end to end (small
/// sizes: this checks the bench works and reports every figure, not the figures).
#[test]
fn bench_cluster_reports_every_phase() {
    let tansu = crate::stages::tansu();
    let output = crate::support::custos()
        .args(["bench", "cluster", "--agents", "10", "--events", "400", "--batch", "40"])
        .args(["--connections", "2", "--json", "--tansu"])
        .arg(&tansu)
        .output()
        .unwrap();
    let stdout = crate::support::stdout(&output);
    assert!(output.status.success(), "{stdout}{}", crate::support::stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    for phase in ["embedded", "one_ingest", "two_ingest", "half_load"] {
        assert!(json[phase]["events_per_sec"].as_f64().unwrap() > 0.0, "{json}");
        assert!(json[phase]["ack_latency_p99_ms"].as_f64().unwrap() > 0.0, "{json}");
    }
    let ratio = json["two_ingest_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio.is_finite(), "{json}");
    // The ingest node's own account of where its hand-over time went (its metrics).
    for phase in ["one_ingest", "half_load"] {
        for step in ["submit", "receipt"] {
            let mean = json["writer_handover_ms"][phase][step].as_f64().unwrap();
            assert!(mean > 0.0 && mean.is_finite(), "{phase} {step}: {json}");
        }
    }
    let fresh = &json["query_node_freshness_ms"];
    assert_eq!(fresh["probes"], 50, "{json}");
    assert!(fresh["p50"].as_f64().unwrap() > 0.0, "{json}");
    assert!(
        fresh["max"].as_f64().unwrap() >= fresh["p99"].as_f64().unwrap(),
        "{json}"
    );
}

/// A realm on each of `count` partitions, in partition order (`realm-<n>` names).
pub(crate) fn realms_per_partition(count: i32) -> Vec<String> {
    (0..count)
        .map(|partition| {
            (0..)
                .map(|n| format!("realm-{n}"))
                .find(|realm| custos_stage::wire::partition_for(realm, count) == partition)
                .unwrap()
        })
        .collect()
}

/// An ingest process on topics with `prefix`.
fn ingest_on(dir: &std::path::Path, name: &str, brokers: &str, prefix: &str) -> Server {
    Server::start_with(
        &dir.join(name),
        &["--kafka", brokers, "--kafka-prefix", prefix, "--roles", "ingest"],
    )
}

/// A `--log-per-partition` writer process on the shared `store`, preferring `prefer`,
/// trusting the stage keys `trust` (detector, responder).
fn partition_writer(
    store: &std::path::Path,
    brokers: &str,
    prefix: &str,
    prefer: &str,
    trust: &(String, String),
) -> Server {
    partition_writer_with(
        store,
        brokers,
        prefix,
        prefer,
        &["--trust-detector", &trust.0, "--trust-responder", &trust.1],
    )
}

/// [`partition_writer`] with other `serve` arguments in place of the stage keys.
pub(crate) fn partition_writer_with(
    store: &std::path::Path,
    brokers: &str,
    prefix: &str,
    prefer: &str,
    extra: &[&str],
) -> Server {
    let mut args = vec![
        "--kafka",
        brokers,
        "--kafka-prefix",
        prefix,
        "--roles",
        "writer",
        "--log-per-partition",
        "--prefer-partitions",
        prefer,
    ];
    args.extend_from_slice(extra);
    Server::start_with(store, &args)
}

/// Enrolls a new agent in `realm` through an ingest node and has it poison a memory and
/// use a credential (the detector's `memory_poisoning`); answers its DID.
fn poison_through(url: &str, token: &str, realm: &str, seed: u8) -> String {
    let mut signer = Signer::new(AgentKey::from_seed(&[seed; 32]), realm);
    let did = signer.did().to_owned();
    let enrolled = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/agents"))
        .bearer_auth(token)
        .json(&json!({"did": did, "realm": realm}))
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(enrolled.status().as_u16(), 201, "{:?}", enrolled.text());
    let memory = format!("mem-{seed}");
    let attack = crate::respond::signed_body(
        &mut signer,
        &[
            json!({"kind": "memory_write", "memory_id": memory, "attrs": {"source_trust": "untrusted"}}),
            json!({"kind": "memory_read", "memory_id": memory}),
            json!({"kind": "credential_use", "target": "cred-db", "attrs": {"credential_owner": did}}),
        ],
    );
    wait_for("the ingest node to take the attack", || {
        post_events(url, &attack).is_some_and(|results| results.iter().all(|result| result["status"] != "rejected"))
    });
    did
}

/// Waits until the control topic says `did` is revoked (the responder acted on a finding).
fn wait_revoked(
    kafka: &custos_stage::kafka::KafkaConfig,
    did: &str,
    logs: &[&std::sync::Arc<std::sync::Mutex<String>>],
) {
    let started = std::time::Instant::now();
    loop {
        let latest = custos_stage::kafka::read_control(kafka, Duration::from_secs(20)).unwrap();
        let revoked = latest
            .get(&format!("agent:{did}"))
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(bytes).ok())
            .is_some_and(|state| state["status"] == "revoked");
        if revoked {
            return;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let logs: Vec<String> = logs.iter().map(|log| log.lock().unwrap().clone()).collect();
            panic!("{did} was not revoked; logs:\n{}", logs.join("\n-----\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An evidence bundle of `realm`, exported from its partition's store (the API each
/// partition's node serves, as the writer's log names it), carries the cross-partition
/// checkpoint binding that partition; `custos evidence verify --partitions-key` checks
/// it, and refuses another set's key.
fn evidence_from_a_partition(store: &std::path::Path, writer: &Server, realm: &str) {
    use custos_store::partitions::{PartitionSet, latest_binding};
    let partition = custos_stage::wire::partition_for(realm, 3).unsigned_abs();
    wait_for("a cross-partition checkpoint binding the realm's partition", || {
        latest_binding(store, partition, u64::MAX).unwrap().is_some()
    });
    let log = writer.log.lock().unwrap().clone();
    let prefix = format!("partition {partition}: this process writes its log");
    let line = log
        .lines()
        .rfind(|line| line.starts_with(&prefix))
        .expect("the partition's node");
    let url = line.rsplit("API on ").next().unwrap().trim_end_matches(')').to_owned();
    // The partitions' nodes share the set's token table with the writers' edge.
    let token = std::fs::read_to_string(store.join("edge/admin.token")).unwrap();
    let bundle = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/evidence"))
        .bearer_auth(token.trim())
        .json(&json!({"realm": realm, "from": "2020-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}))
        .timeout(Duration::from_secs(60))
        .send()
        .unwrap();
    assert_eq!(bundle.status().as_u16(), 200);
    let path = store.join("bundle.tar");
    std::fs::write(&path, bundle.bytes().unwrap()).unwrap();
    let key = std::fs::read_to_string(PartitionSet::public_key_path(store)).unwrap();
    let output = crate::support::run(&[
        "evidence",
        "verify",
        path.to_str().unwrap(),
        "--partitions-key",
        key.trim(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{report:#}");
    assert_eq!(report["partition"], json!([partition, 3]));
    assert!(report["rows"]["findings.parquet"].as_u64().unwrap() >= 1, "{report:#}");
    // Another key of the same name: the cross-partition checkpoint does not verify.
    let set = PartitionSet::open(store).unwrap().unwrap();
    let other = custos_store::checkpoint::NoteKey {
        name: set.origin(),
        public: AgentKey::from_seed(&[7; 32]).public_key(),
    }
    .verifier_string();
    let output = crate::support::run(&["evidence", "verify", path.to_str().unwrap(), "--partitions-key", &other]);
    assert_eq!(output.status.code(), Some(1), "{}", crate::support::stdout(&output));
    assert!(crate::support::stdout(&output).contains("partitions.json"));
}

/// Every entry of `payload_type` in every partition's store: (partition, keyid, payload).
fn stored(store: &std::path::Path, payload_type: &str) -> Vec<(u32, String, serde_json::Value)> {
    let mut rows = Vec::new();
    for partition in 0..3u32 {
        let segments = custos_store::partitions::PartitionSet::store_dir(store, partition).join("logs/0/segments");
        let Ok(files) = std::fs::read_dir(&segments) else {
            continue;
        };
        for file in files {
            let path = file.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "parquet") {
                continue;
            }
            let segment = custos_store::segment::decode(std::fs::read(&path).unwrap().into()).unwrap();
            for row in segment.rows {
                if row.entry.payload_type != payload_type {
                    continue;
                }
                let payload: serde_json::Value = serde_json::from_slice(&row.entry.payload).unwrap();
                rows.push((partition, row.entry.keyid.clone(), payload));
            }
        }
    }
    rows
}

/// The cluster test: three partitions, each one Merkle log; two writer processes
/// share the partitions' stores and two ingest processes take the traffic. Requests mix
/// agents of three realms (one per partition). One writer (holding two partitions) and
/// one ingest process are SIGKILLed mid-stream; the other writer takes the partitions
/// over and clients resend. Every acknowledged event is stored exactly once, in its
/// realm's partition. Then two attacks in each realm: the detector and responder process
/// (one signing chain per partition) find and revoke each, and every partition's log,
/// its chains included, and the cross-partition checkpoints verify.
#[test]
fn one_log_per_partition_survives_losing_a_writer_and_an_ingest_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path());
    let prefix = "parts-test";
    let store = dir.path().join("writers");
    let (mut stage, detector, responder, stage_log) = stage_process_with(
        &dir.path().join("stages"),
        &broker.addr,
        prefix,
        "detector,responder",
        &["--log-per-partition"],
    );
    let trust = (detector.clone(), responder);
    let first = partition_writer(&store, &broker.addr, prefix, "0,1", &trust);
    wait_for("the first writer to take partitions 0 and 1", || {
        let log = first.log.lock().unwrap();
        log.contains("partition 0: this process writes") && log.contains("partition 1: this process writes")
    });
    let second = partition_writer(&store, &broker.addr, prefix, "2", &trust);
    wait_for("the second writer to take partition 2", || {
        second.log.lock().unwrap().contains("partition 2: this process writes")
    });
    let edges = [
        ingest_on(dir.path(), "ingest-1", &broker.addr, prefix),
        ingest_on(dir.path(), "ingest-2", &broker.addr, prefix),
    ];

    // One realm per partition, two agents per realm, enrolled through an ingest node.
    let mut realms: Vec<Option<String>> = vec![None; 3];
    for n in 0.. {
        let realm = format!("realm-{n}");
        let partition = custos_stage::wire::partition_for(&realm, 3) as usize;
        realms[partition].get_or_insert(realm);
        if realms.iter().all(Option::is_some) {
            break;
        }
    }
    let realms: Vec<String> = realms.into_iter().map(Option::unwrap).collect();
    let edge_token = edges[0].token();
    let mut signers: Vec<Signer> = (0..6u8)
        .map(|n| {
            let key = AgentKey::from_seed(&[120 + n; 32]);
            let realm = &realms[usize::from(n % 3)];
            let response = reqwest::blocking::Client::new()
                .post(format!("{}/v1/agents", edges[0].url))
                .bearer_auth(&edge_token)
                .json(&json!({"did": key.did(), "realm": realm}))
                .timeout(Duration::from_secs(60))
                .send()
                .unwrap();
            assert_eq!(response.status().as_u16(), 201, "{:?}", response.text());
            Signer::new(key, realm)
        })
        .collect();
    // Enrolling twice is refused as in one process.
    let again = reqwest::blocking::Client::new()
        .post(format!("{}/v1/agents", edges[0].url))
        .bearer_auth(&edge_token)
        .json(&json!({"did": signers[0].did(), "realm": realms[0]}))
        .send()
        .unwrap();
    assert_eq!(again.status().as_u16(), 409);
    let probes: Vec<Vec<u8>> = signers.iter_mut().map(|signer| signed_lines(signer, 1)).collect();
    for edge in &edges {
        for probe in &probes {
            wait_for("the ingest node to know the enrolled agents", || {
                post_events(&edge.url, probe).is_some_and(|results| results[0]["reason"] != "unknown_agent")
            });
        }
    }

    // Two clients, each sending requests that mix its three agents (three realms, so three
    // partitions and both writers); a third of the way, SIGKILL the first writer and the
    // second ingest node.
    let (left, right) = signers.split_at_mut(3);
    let acknowledged = std::sync::Mutex::new(Vec::<(String, u64)>::new());
    let urls = [edges[0].url.clone(), edges[1].url.clone()];
    let (first_pid, edge_pid) = (first.pid(), edges[1].pid());
    std::thread::scope(|scope| {
        for (client, signers) in [(0usize, left), (1, right)] {
            let (urls, acknowledged) = (&urls, &acknowledged);
            scope.spawn(move || {
                let mut target = client;
                for round in 0..20 {
                    let mut body = Vec::new();
                    for signer in signers.iter_mut() {
                        if !body.is_empty() {
                            body.push(b'\n');
                        }
                        body.extend_from_slice(&signed_lines(signer, 3));
                    }
                    deliver(urls, &mut target, &body, round, acknowledged);
                }
            });
        }
        wait_for("a third of the stream", || acknowledged.lock().unwrap().len() >= 120);
        for pid in [first_pid, edge_pid] {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    });
    first.kill();
    let [survivor, dead] = edges;
    dead.kill();
    let acknowledged = acknowledged.into_inner().unwrap();
    assert_eq!(acknowledged.len(), 2 * 20 * 3 * 3);
    assert!(
        second.log.lock().unwrap().contains("partition 0: this process writes"),
        "the surviving writer took the dead one's partitions"
    );

    // The broker dies and comes back: the partition writers and the ingest node resume by
    // themselves (a request mixing the three realms is answered).
    broker.restart();
    let mut body = Vec::new();
    for signer in [0, 2, 4] {
        if !body.is_empty() {
            body.push(b'\n');
        }
        body.extend_from_slice(&signed_lines(&mut signers[signer], 1));
    }
    wait_for("ingest to resume after the broker restart", || {
        post_events(&survivor.url, &body).is_some_and(|results| {
            results
                .iter()
                .all(|result| result["status"] == "accepted" || result["status"] == "duplicate")
        })
    });

    // A revocation through an ingest node goes to the agent's partition and is enforced.
    revoke_through(&survivor, signers[1].did(), "partition test");
    let results = post_events(&survivor.url, &signed_lines(&mut signers[1], 1)).expect("an answer");
    assert_eq!(results[0]["reason"], "revoked_agent", "{results:?}");

    // Two memory-poisoning attacks per realm, through the ingest node: each is found, and
    // the responder revokes the agent (the control topic says so).
    let mut kafka = custos_stage::kafka::KafkaConfig::new(broker.addr.clone());
    kafka.prefix = prefix.into();
    let attackers: Vec<String> = realms
        .iter()
        .chain(realms.iter())
        .enumerate()
        .map(|(n, realm)| poison_through(&survivor.url, &edge_token, realm, 140 + n as u8))
        .collect();
    for did in &attackers {
        wait_revoked(&kafka, did, &[&stage_log, &second.log]);
    }
    stage.kill().unwrap();
    let _ = stage.wait();
    survivor.kill();
    let log = second.stop();
    assert!(!log.contains("panicked"), "{log}");

    // Each finding is in its realm's partition, and each partition holds findings.
    let findings = stored(&store, custos_event::FINDING_PAYLOAD_TYPE);
    for (partition, keyid, finding) in &findings {
        assert_eq!(keyid, &detector);
        let realm = finding["realm"].as_str().unwrap();
        assert_eq!(
            *partition as i32,
            custos_stage::wire::partition_for(realm, 3),
            "{finding}"
        );
    }
    let partitions: std::collections::BTreeSet<u32> = findings.iter().map(|(partition, ..)| *partition).collect();
    assert_eq!(partitions, [0, 1, 2].into(), "{findings:?}");

    // Exactly once, each agent in its realm's partition.
    let stored: Vec<(u32, String, u64)> = stored(&store, custos_event::EVENT_PAYLOAD_TYPE)
        .into_iter()
        .filter(|(_, agent, _)| !attackers.contains(agent))
        .map(|(partition, agent, payload)| (partition, agent, payload["seq"].as_u64().unwrap()))
        .collect();
    let mut seen = std::collections::BTreeMap::new();
    for (partition, agent, seq) in &stored {
        let signer = signers
            .iter()
            .find(|signer| signer.did() == agent)
            .expect("a known agent");
        let realm = &realms[signers.iter().position(|other| other.did() == agent).unwrap() % 3];
        assert_eq!(signer.did(), agent);
        assert_eq!(
            *partition as i32,
            custos_stage::wire::partition_for(realm, 3),
            "{agent} in partition {partition}"
        );
        assert!(
            seen.insert((agent.clone(), *seq), *partition).is_none(),
            "({agent}, {seq}) stored twice"
        );
    }
    for (agent, seq) in &acknowledged {
        assert!(
            seen.contains_key(&(agent.clone(), *seq)),
            "acknowledged ({agent}, {seq}) is not stored"
        );
    }
    // Every partition's log and the cross-partition checkpoints verify.
    let output = crate::support::run(&["verify", store.to_str().unwrap(), "--signatures", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{report:#}");
    assert_eq!(report["logs"].as_array().unwrap().len(), 3, "{report:#}");
    assert_eq!(report["partitions"]["partitions"], 3);
    assert!(report["partitions"]["checkpoints"].as_u64().unwrap() >= 1, "{report:#}");
    // The last cross-partition checkpoint binds every partition's final head.
    let last = std::fs::read_to_string(custos_store::partitions::PartitionSet::checkpoints_path(&store)).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    let body = last["note"].as_str().unwrap().split("\n\n").next().unwrap().to_owned();
    let bound = custos_store::partitions::CrossCheckpoint::parse_body(&format!("{body}\n")).unwrap();
    for head in &bound.heads {
        let own = custos_store::partitions::latest_head(&store, head.partition).unwrap();
        assert_eq!(*head, own, "partition {}", head.partition);
    }
}

/// Over a partition set, OTLP traces and VaultysClaw deliveries through an ingest node
/// are served by the writer of their realm's partition: the writer that takes a request
/// (on the empty key's partition) answers one of another partition's realm with that
/// partition, and the ingest node sends it there. Collector tokens are made on one
/// writer process's edge (the set's one token table) and checked by the realm's writer
/// in the other process, which sees a revocation made there within a second (as do two
/// ingest nodes given one `--data`). LastID agents are enrolled through either edge and
/// their records placed by the `lastid:` records of the control topic, a batch spanning
/// two partitions split and answered in order.
#[test]
fn adapters_through_ingest_nodes_over_a_partition_set() {
    use custos_stage::wire::partition_for;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let prefix = "parts-adapters";
    let realms = realms_per_partition(3);
    // Where an ingest node sends an adapter request first, and the realms of the other
    // two partitions (routed) and of that one (served where it lands).
    let first = partition_for("", 3) as usize;
    let (routed, vc_realm, direct) = (
        realms[(first + 1) % 3].clone(),
        realms[(first + 2) % 3].clone(),
        realms[first].clone(),
    );
    let webhook_secret = dir.path().join("vaultysclaw-secret");
    std::fs::write(&webhook_secret, VAULTYSCLAW_SECRET).unwrap();
    let store = dir.path().join("writers");
    // Two writer processes on the shared store: `writer` holds the partition requests
    // land on first, `other` the two they are routed to, so a collector token made on
    // `writer`'s edge is checked by the other process (the set's one token table).
    let writer_of = |prefer: &str| {
        partition_writer_with(
            &store,
            &broker.addr,
            prefix,
            prefer,
            &[
                "--vaultysclaw-secret-file",
                webhook_secret.to_str().unwrap(),
                "--vaultysclaw-realm",
                &vc_realm,
            ],
        )
    };
    let holds = |server: &Server, partitions: &[usize]| {
        let log = server.log.lock().unwrap();
        partitions
            .iter()
            .all(|partition| log.contains(&format!("partition {partition}: this process writes")))
    };
    let writer = writer_of(&first.to_string());
    wait_for("the first writer to take its partition", || holds(&writer, &[first]));
    let others = [(first + 1) % 3, (first + 2) % 3];
    let other = writer_of(&format!("{},{}", others[0], others[1]));
    wait_for("the other writer to take its partitions", || holds(&other, &others));
    let node = ingest_on(dir.path(), "ingest-1", &broker.addr, prefix);
    let admin = std::fs::read_to_string(store.join("edge/admin.token")).unwrap();
    let admin = admin.trim();
    let collector = |realm: &str| {
        let (status, created) = post(
            &writer.url,
            "/v1/tokens",
            Some(admin),
            json!({"role": "collector", "realms": [realm]}).to_string().into_bytes(),
        )
        .unwrap();
        assert_eq!(status, 201, "{created}");
        (
            created["token"].as_str().unwrap().to_owned(),
            created["id"].as_str().unwrap().to_owned(),
        )
    };
    let (routed_token, routed_id) = collector(&routed);
    let (direct_token, _) = collector(&direct);
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let spans = |service: &str, span_id: &str| {
        json!({"resourceSpans": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{"spans": [{"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": span_id,
                "name": "chat", "kind": 3, "startTimeUnixNano": (now - 1000).to_string(),
                "endTimeUnixNano": now.to_string(),
                "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}]}]}]}]})
        .to_string()
        .into_bytes()
    };
    // Routed once (two submissions), then sent straight to the partition the node learnt
    // (one); the writers' own edge routes the same way.
    let mut submissions = Vec::new();
    for (url, span_id) in [
        (&node.url, "00f067aa0ba90301"),
        (&node.url, "00f067aa0ba90302"),
        (&writer.url, "00f067aa0ba90303"),
    ] {
        let before = submissions_handed_over(&node);
        let (status, answer) = post_otlp(url, Some(&routed_token), spans("planner", span_id)).unwrap();
        assert_eq!(status, 200, "{url}: {answer}");
        submissions.push(submissions_handed_over(&node) - before);
    }
    assert_eq!(submissions, [2, 1, 0], "submissions per request from the ingest node");
    let (status, answer) = post_otlp(&node.url, Some(&direct_token), spans("indexer", "00f067aa0ba90304")).unwrap();
    assert_eq!(status, 200, "{answer}");
    // Refused alike wherever the request lands.
    let (status, answer) = post_otlp(&node.url, Some(admin), spans("planner", "00f067aa0ba90305")).unwrap();
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")), "{answer}");
    let (status, answer) = post_otlp(
        &node.url,
        Some(&format!("cus_{}", "B".repeat(43))),
        spans("planner", "00f067aa0ba90305"),
    )
    .unwrap();
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated")),
        "{answer}"
    );

    // VaultysClaw: served by the writer of the configured realm's partition, which keeps
    // the deliveries it saw.
    let delivery = json!({"event": "intent.completed", "occurredAt": chrono::Utc::now().to_rfc3339(), "data": {
        "intentId": "i-set", "agentDid": "did:vc:agent:set", "action": "http.get",
        "params": {"url": "https://api.example.com"}, "status": "completed"}});
    let at = chrono::Utc::now().timestamp_millis();
    let (status, answer) = crate::vaultysclaw::deliver(&node.url, "d-set", at, VAULTYSCLAW_SECRET, &delivery);
    assert_eq!((status, answer["status"].as_str()), (200, Some("accepted")), "{answer}");
    let (status, answer) = crate::vaultysclaw::deliver(&writer.url, "d-set", at, VAULTYSCLAW_SECRET, &delivery);
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("duplicate")),
        "{answer}"
    );

    // LastID: enrolled through an ingest node (passed on to the writer of the realm's
    // partition, the admin token checked in the set's table); the agent's records go
    // there, by the `lastid:` control record its writer publishes.
    let mut routed_agent = LastIdAgent::new("did:lastid:agent:set-routed", [41; 32]);
    let mut direct_agent = LastIdAgent::new("did:lastid:agent:set-direct", [42; 32]);
    let enroll_lastid = |url: &str, token: Option<&str>, agent: &LastIdAgent, realm: &str| {
        post(
            url,
            "/v1/agents",
            token,
            json!({"did": agent.did, "realm": realm, "source": "lastid", "public_key": agent.public_key_hex()})
                .to_string()
                .into_bytes(),
        )
        .unwrap()
    };
    let (status, answer) = enroll_lastid(&node.url, None, &routed_agent, &routed);
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated")),
        "{answer}"
    );
    let padded =
        json!({"did": routed_agent.did, "realm": routed, "source": "lastid", "public_key": "0".repeat(20_000)});
    let (status, answer) = post(&node.url, "/v1/agents", Some(admin), padded.to_string().into_bytes()).unwrap();
    assert_eq!((status, answer["error"].as_str()), (413, Some("too_large")), "{answer}");
    // Made on the other process's edge, so `node` learns it from the control topic only.
    let (status, answer) = enroll_lastid(&writer.url, Some(admin), &routed_agent, &routed);
    assert_eq!(
        (status, answer["realm"].as_str()),
        (201, Some(routed.as_str())),
        "{answer}"
    );
    let (status, answer) = enroll_lastid(&node.url, Some(admin), &routed_agent, &routed);
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("agent_exists")),
        "{answer}"
    );
    let (status, answer) = enroll_lastid(&node.url, Some(admin), &direct_agent, &direct);
    assert_eq!(status, 201, "{answer}");
    let mut kafka = custos_stage::kafka::KafkaConfig::new(broker.addr.clone());
    kafka.prefix = prefix.into();
    let key = format!("lastid:{}", routed_agent.did);
    let mut published = None;
    wait_for("the writer to publish the LastID enrollment", || {
        published = custos_stage::kafka::read_control(&kafka, Duration::from_secs(20))
            .unwrap()
            .remove(&key);
        published.is_some()
    });
    let record: serde_json::Value = serde_json::from_slice(&published.unwrap()).unwrap();
    assert_eq!(
        (record["type"].as_str(), record["realm"].as_str()),
        (Some("lastid"), Some(routed.as_str())),
        "{record}"
    );
    // On the brokers, so the node places the agent's records at once: it reads the
    // control topic to its end before leaving a LastID agent unplaced.
    let first_record = routed_agent.next("tool_call", None, json!({"tool": "search"}));
    let answer = ship(&node.url, std::slice::from_ref(&first_record));
    assert_eq!(answer[0]["status"], "accepted", "{answer:?}");
    // One realm per LastID agent: enrolling it again in a realm of another partition
    // (whose writer does not know it) is refused by the node's view.
    let (status, answer) = enroll_lastid(&node.url, Some(admin), &routed_agent, &direct);
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("agent_exists")),
        "{answer}"
    );
    // So for a Custos agent, even at once: enrolled through the writer's edge, then
    // through the ingest node in a realm of another partition (whose writer does not
    // know it), it is refused, as the node reads the control topic to its end first.
    for seed in 50..55u8 {
        let key = AgentKey::from_seed(&[seed; 32]);
        let body = |realm: &str| json!({"did": key.did(), "realm": realm}).to_string().into_bytes();
        let (status, answer) = post(&writer.url, "/v1/agents", Some(admin), body(&routed)).unwrap();
        assert_eq!(status, 201, "{answer}");
        let (status, answer) = post(&node.url, "/v1/agents", Some(&node.token()), body(&direct)).unwrap();
        assert_eq!(
            (status, answer["error"].as_str()),
            (409, Some("agent_exists")),
            "{answer}"
        );
    }
    // A batch of agents of two partitions (and one nobody enrolled) is split, each part
    // served by its writer, and answered in batch order.
    let batch = [
        direct_agent.next("tool_call", None, json!({"tool": "fetch"})),
        routed_agent.next("memory_write", Some("mem-1"), json!({})),
        LastIdAgent::new("did:lastid:agent:nobody", [43; 32]).next("tool_call", None, json!({})),
        routed_agent.next("tool_call", None, json!({"tool": "search"})),
        direct_agent.next("tool_call", None, json!({"tool": "fetch"})),
    ];
    let answers = ship(&node.url, &batch);
    let shown: Vec<(u64, &str, Option<&str>)> = answers
        .iter()
        .map(|answer| {
            (
                answer["index"].as_u64().unwrap(),
                answer["status"].as_str().unwrap(),
                answer["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (0, "accepted", None),
            (1, "accepted", None),
            (2, "rejected", Some("unknown_agent")),
            (3, "accepted", None),
            (4, "accepted", None),
        ],
        "{answers:?}"
    );
    // The same records through the other process's edge: duplicates, by the same chains.
    let again: Vec<String> = ship(&writer.url, &[first_record, batch[1].clone(), batch[4].clone()])
        .iter()
        .map(|answer| answer["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(again, ["duplicate"; 3]);

    // A collector token revoked on the writers' edge is refused by the partition's writer
    // (its own copy of the shared table reads the file again within a second).
    let (status, answer) = post(
        &writer.url,
        &format!("/v1/tokens/{routed_id}/revoke"),
        Some(admin),
        b"{}".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    std::thread::sleep(custos_http::Tokens::RELOAD_EVERY + Duration::from_millis(500));
    let (status, answer) = post_otlp(&node.url, Some(&routed_token), spans("planner", "00f067aa0ba90306")).unwrap();
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("unauthenticated")),
        "{answer}"
    );

    // Two ingest nodes given one `--data` share one token table: a token made on one
    // works on the other at once, and one revoked there is refused here within a second.
    let twin = ingest_on(dir.path(), "ingest-1", &broker.addr, prefix);
    let node_admin = node.token();
    let (status, created) = post(
        &node.url,
        "/v1/tokens",
        Some(&node_admin),
        json!({"role": "auditor"}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    let auditor = created["token"].as_str().unwrap();
    let metrics = |url: &str| {
        reqwest::blocking::Client::new()
            .get(format!("{url}/metrics"))
            .bearer_auth(auditor)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(metrics(&twin.url), 200, "made on the other node");
    let id = created["id"].as_str().unwrap();
    let (status, answer) = post(
        &twin.url,
        &format!("/v1/tokens/{id}/revoke"),
        Some(&node_admin),
        b"{}".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    std::thread::sleep(custos_http::Tokens::RELOAD_EVERY + Duration::from_millis(500));
    assert_eq!(metrics(&node.url), 401, "revoked on the other node");
    twin.kill();
    node.kill();
    for server in [writer, other] {
        let log = server.stop();
        assert!(!log.contains("panicked"), "{log}");
    }

    // Each attested event is in its realm's partition.
    let mut spans_seen = Vec::new();
    let mut deliveries = 0;
    let mut lastid_records = Vec::new();
    for (partition, _, payload) in stored(&store, custos_event::EVENT_PAYLOAD_TYPE) {
        let realm = payload["realm"].as_str().unwrap();
        assert_eq!(partition as i32, partition_for(realm, 3), "{payload}");
        match (payload["attrs"]["custos.source"].as_str(), payload["span_id"].as_str()) {
            (Some("otlp"), Some(span)) => spans_seen.push((realm.to_owned(), span.to_owned())),
            (Some("vaultysclaw"), _) => {
                assert_eq!(realm, vc_realm, "{payload}");
                deliveries += 1;
            }
            // The attestors' own entries (an attested agent's delegation).
            (Some("otlp"), None) => assert!(realm == routed || realm == direct, "{payload}"),
            // LastID records (and their agents' delegations) in their agent's realm.
            (Some("lastid"), _) => {
                let did = payload["attrs"]["custos.attested_for"].as_str().unwrap();
                let expected = match did == routed_agent.did {
                    true => &routed,
                    false => &direct,
                };
                assert_eq!(realm, expected, "{payload}");
                if payload["attrs"]["lastid.record"].is_string() {
                    lastid_records.push(did.to_owned());
                }
            }
            other => panic!("{other:?}: {payload}"),
        }
    }
    spans_seen.sort();
    let mut expected: Vec<(String, String)> = ["00f067aa0ba90301", "00f067aa0ba90302", "00f067aa0ba90303"]
        .into_iter()
        .map(|span| (routed.clone(), span.to_owned()))
        .chain([(direct.clone(), "00f067aa0ba90304".to_owned())])
        .collect();
    expected.sort();
    assert_eq!(spans_seen, expected);
    assert!(deliveries >= 1, "the delivery is stored");
    lastid_records.sort();
    assert_eq!(
        lastid_records,
        [
            direct_agent.did.clone(),
            direct_agent.did.clone(),
            routed_agent.did.clone(),
            routed_agent.did.clone(),
            routed_agent.did.clone()
        ],
        "each LastID record stored once"
    );
    let output = crate::support::run(&["verify", store.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Detectors over a log per partition: two detector processes share one data directory
/// and each detects its preferred partitions (its own state, snapshot and chain per
/// partition). One is SIGKILLed: the other takes its partitions over within seconds.
/// Attacks before and after in every realm are each found exactly once: the takeover
/// neither doubles a finding nor misses an attack.
#[test]
fn a_dead_detectors_partitions_move_to_the_other_detector() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let prefix = "detect-test";
    let shared = dir.path().join("detectors");
    let (mut first, detector, _, first_log) = stage_process_with(
        &shared,
        &broker.addr,
        prefix,
        "detector",
        &["--log-per-partition", "--prefer-partitions", "0,1"],
    );
    let (mut second, _, _, second_log) = stage_process_with(
        &shared,
        &broker.addr,
        prefix,
        "detector",
        &["--log-per-partition", "--prefer-partitions", "2"],
    );
    let (mut responder_process, _, responder, responder_log) = stage_process_with(
        &dir.path().join("responder"),
        &broker.addr,
        prefix,
        "responder",
        &["--log-per-partition"],
    );
    let store = dir.path().join("writers");
    let writer = partition_writer(&store, &broker.addr, prefix, "0,1,2", &(detector.clone(), responder));
    let token = std::fs::read_to_string(store.join("edge/admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    wait_for("each detector to take its partitions", || {
        let (first, second) = (first_log.lock().unwrap(), second_log.lock().unwrap());
        first.contains("partition 0 is detected here")
            && first.contains("partition 1 is detected here")
            && second.contains("partition 2 is detected here")
            && !second.contains("partition 0 is detected here")
    });
    let realms = realms_per_partition(3);
    let mut kafka = custos_stage::kafka::KafkaConfig::new(broker.addr.clone());
    kafka.prefix = prefix.into();
    let logs = [&first_log, &second_log, &responder_log, &writer.log];
    let before: Vec<String> = realms
        .iter()
        .enumerate()
        .map(|(n, realm)| poison_through(&writer.url, &token, realm, 160 + n as u8))
        .collect();
    for did in &before {
        wait_revoked(&kafka, did, &logs);
    }

    // SIGKILL the detector of partitions 0 and 1 (no snapshot at exit).
    first.kill().unwrap();
    first.wait().unwrap();
    wait_for("the other detector to take partitions 0 and 1", || {
        let log = second_log.lock().unwrap();
        log.contains("partition 0 is detected here") && log.contains("partition 1 is detected here")
    });
    let after: Vec<String> = realms
        .iter()
        .enumerate()
        .map(|(n, realm)| poison_through(&writer.url, &token, realm, 170 + n as u8))
        .collect();
    for did in &after {
        wait_revoked(&kafka, did, &logs);
    }
    // Time for a doubled finding to show up, were there one.
    std::thread::sleep(Duration::from_secs(3));
    evidence_from_a_partition(&store, &writer, &realms[1]);
    second.kill().unwrap();
    let _ = second.wait();
    responder_process.kill().unwrap();
    let _ = responder_process.wait();
    let log = writer.stop();
    assert!(!log.contains("panicked"), "{log}");

    let findings = stored(&store, custos_event::FINDING_PAYLOAD_TYPE);
    for did in before.iter().chain(&after) {
        let found = findings
            .iter()
            .filter(|(_, _, finding)| finding["agent"] == did.as_str() && finding["type"] == "memory_poisoning")
            .count();
        assert_eq!(found, 1, "memory_poisoning findings about {did}: {findings:?}");
    }
    let output = crate::support::run(&["verify", store.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
}

/// A writer that stops answering (SIGSTOP): an ingest node waits on at most 256 answers
/// at once, refuses what comes beyond at once with 503 `busy` instead of queueing it,
/// answers the ones it waited on 503 `writer_unavailable` at its timeout, stays healthy
/// throughout, and takes events again as soon as the writer is back.
#[test]
fn an_ingest_node_bounds_what_it_waits_on_from_a_stalled_writer() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let cluster = ["--kafka", broker.addr.as_str(), "--kafka-prefix", "stall-test"];
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[&cluster[..], &["--roles", "writer"]].concat(),
    );
    let edge = Server::start_with(
        &dir.path().join("edge"),
        &[&cluster[..], &["--roles", "ingest", "--writer-timeout-secs", "10"]].concat(),
    );
    let key = AgentKey::from_seed(&[77; 32]);
    enroll(&writer.url, &writer.token(), key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let probe = signed_lines(&mut signer, 1);
    wait_for("the ingest node to take the agent's events", || {
        post_events(&edge.url, &probe).is_some_and(|results| results[0]["status"] != "rejected")
    });

    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &writer.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let start = std::sync::Arc::new(std::sync::Barrier::new(300));
    let requests: Vec<_> = (0..300)
        .map(|_| {
            let (url, start) = (edge.url.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let (status, answer) = crate::support::post(&url, "/v1/events", None, b"{x".to_vec()).unwrap();
                (status, answer["error"].as_str().unwrap_or_default().to_owned())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let health = reqwest::blocking::Client::new()
        .get(format!("{}/healthz", edge.url))
        .timeout(Duration::from_secs(2))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);
    let answers: Vec<(u16, String)> = requests.into_iter().map(|thread| thread.join().unwrap()).collect();
    let count = |code: &str| {
        answers
            .iter()
            .filter(|(status, error)| *status == 503 && error == code)
            .count()
    };
    assert_eq!(count("busy") + count("writer_unavailable"), 300, "{answers:?}");
    assert!(count("busy") >= 300 - 256, "{answers:?}");
    assert!(count("writer_unavailable") > 0, "{answers:?}");

    signal("-CONT");
    let fresh = signed_lines(&mut signer, 1);
    wait_for("the ingest node to take events again", || {
        post_events(&edge.url, &fresh).is_some_and(|results| results[0]["status"] == "accepted")
    });
    drop(writer);
    drop(broker);
}
