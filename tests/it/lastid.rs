//! The LastID adapter through a real `custos serve`: records signed here exactly as a
//! LastID agent signs them (ed25519 over the canonical JSON of the core, blake3 integrity
//! hash, hash chain), verified, stored with their original bytes, refused with the
//! native reason codes, and checked again by `custos verify`.

use custos_event::lastid::sign_record;
use serde_json::{Map, Value, json};

use crate::respond::get;
use crate::support::{Server, custos, post, stderr};

/// A LastID agent as fixture generator: keeps its chain and signs each record.
pub(crate) struct LastIdAgent {
    pub(crate) did: String,
    seed: [u8; 32],
    seq: u64,
    prev: Option<String>,
}

impl LastIdAgent {
    pub(crate) fn new(did: &str, seed: [u8; 32]) -> Self {
        Self {
            did: did.to_owned(),
            seed,
            seq: 0,
            prev: None,
        }
    }

    pub(crate) fn public_key_hex(&self) -> String {
        hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&self.seed)
                .verifying_key()
                .to_bytes(),
        )
    }

    /// The core of the agent's next record (not yet signed).
    pub(crate) fn core(&self, event_type: &str, memory_id: Option<&str>, metadata: Value) -> Map<String, Value> {
        json!({
            "seq": self.seq,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "agent_did": self.did,
            "event_type": event_type,
            "memory_id": memory_id,
            "metadata": metadata,
            "prev_hash": self.prev,
        })
        .as_object()
        .unwrap()
        .clone()
    }

    /// Signs the next record and moves the chain past it.
    pub(crate) fn next(&mut self, event_type: &str, memory_id: Option<&str>, metadata: Value) -> Value {
        let record = sign_record(&self.core(event_type, memory_id, metadata), &self.seed);
        self.seq += 1;
        self.prev = Some(record["integrity_hash"].as_str().unwrap().to_owned());
        Value::Object(record)
    }
}

pub(crate) fn ship(url: &str, records: &[Value]) -> Vec<Value> {
    let body = json!({ "records": records }).to_string().into_bytes();
    let (status, answer) = post(url, "/v1/adapters/lastid/audit", None, body).unwrap();
    assert_eq!(status, 200, "{answer}");
    answer.as_array().unwrap().clone()
}

fn statuses(results: &[Value]) -> Vec<String> {
    results
        .iter()
        .map(|result| match result["reason"].as_str() {
            Some(reason) => reason.to_owned(),
            None => result["status"].as_str().unwrap().to_owned(),
        })
        .collect()
}

#[test]
fn lastid_records_are_verified_kept_and_checked_again_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let server = Server::start_with(&data, &["--no-detect"]);
    let url = server.url.clone();
    let token = server.token();

    // A did:lastid agent (its key given at enrollment, through the CLI) and a did:key one.
    let mut agent = LastIdAgent::new("did:lastid:agent:7f3a9c", [31; 32]);
    let output = custos()
        .args(["agent", "enroll", &agent.did, "--source", "lastid", "--public-key"])
        .arg(agent.public_key_hex())
        .args(["--realm", "ops", "--url", &url, "--token", &token])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let key_agent = custos_event::AgentKey::from_seed(&[32; 32]);
    let mut keyed = LastIdAgent::new(key_agent.did(), [32; 32]);
    let (status, enrolled) = post(
        &url,
        "/v1/agents",
        Some(&token),
        json!({"did": keyed.did, "realm": "ops", "source": "lastid"})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{enrolled}");
    assert_eq!(enrolled["source"], "lastid");
    // Enrollment errors name the bad value.
    for (body, code) in [
        (
            json!({"did": "did:lastid:agent:x", "realm": "ops", "source": "lastid"}),
            "bad_public_key",
        ),
        (
            json!({"did": "did:web:x", "realm": "ops", "source": "lastid", "public_key": agent.public_key_hex()}),
            "bad_did",
        ),
        (
            json!({"did": keyed.did, "realm": "ops", "source": "lastid"}),
            "agent_exists",
        ),
        (
            json!({"did": keyed.did, "realm": "ops", "source": "vaultys"}),
            "bad_source",
        ),
    ] {
        let (status, answer) = post(&url, "/v1/agents", Some(&token), body.to_string().into_bytes()).unwrap();
        assert!(status == 400 || status == 409, "{answer}");
        assert_eq!(answer["error"], code, "{answer}");
    }

    let records = vec![
        agent.next(
            "AgentToolInvoked",
            None,
            json!({"tool": "search", "target": "https://docs.example.com"}),
        ),
        agent.next("AgentToolSucceeded", None, json!({"tool": "search"})),
        agent.next(
            "AgentMemoryWritten",
            Some("mem-1"),
            json!({"source_trust": "untrusted", "note": "é ünïcode"}),
        ),
        keyed.next("AgentCredentialInjected", None, json!({"credential": "cred-db"})),
        agent.next("AgentMemoryRead", Some("mem-1"), json!({})),
        keyed.next("MessageSent", None, json!({"recipient": "did:lastid:agent:peer"})),
    ];
    let results = ship(&url, &records);
    assert_eq!(statuses(&results), vec!["accepted"; 6], "{results:?}");
    // A resend (the agent saw no answer) is a duplicate, with the same log index.
    let again = ship(&url, &records[..3]);
    assert_eq!(statuses(&again), vec!["duplicate"; 3], "{again:?}");
    assert_eq!(again[1]["log_index"], results[1]["log_index"]);

    // One bad record never drops its good neighbours; each gets its code.
    let mut altered = Value::Object(sign_record(
        &agent.core("AgentFileRead", None, json!({"path": "/etc/passwd"})),
        &[31; 32],
    ));
    altered["metadata"]["path"] = json!("/etc/hosts");
    let mut broken_core = agent.core("AgentFileRead", None, json!({"path": "/etc/passwd"}));
    broken_core.insert("prev_hash".into(), json!("00".repeat(32)));
    let broken = Value::Object(sign_record(&broken_core, &[31; 32]));
    let forged = Value::Object(sign_record(
        &agent.core("AgentFileRead", None, json!({"path": "/etc/passwd"})),
        &[99; 32],
    ));
    let good = agent.next("AgentFileRead", None, json!({"path": "/etc/passwd"}));
    let stranger = LastIdAgent::new("did:lastid:agent:stranger", [5; 32]).next("AgentToolInvoked", None, json!({}));
    let mixed = ship(
        &url,
        &[altered, broken, forged, good.clone(), stranger, json!({"seq": "one"})],
    );
    assert_eq!(
        statuses(&mixed),
        vec![
            "integrity_mismatch",
            "chain_broken",
            "bad_signature",
            "accepted",
            "unknown_agent",
            "bad_payload"
        ],
        "{mixed:?}"
    );
    assert!(
        mixed[0]["message"].as_str().unwrap().contains("altered"),
        "{}",
        mixed[0]
    );
    // Kept for forensics.
    let (_, kept) = get(&url, "/v1/rejected?reason=integrity_mismatch", &token);
    assert_eq!(kept["rejected"].as_array().unwrap().len(), 1, "{kept}");

    // Stored as attested events, mapped, with the original record's exact bytes.
    let (status, rows) = post(
        &url,
        "/v1/sql",
        Some(&token),
        b"SELECT kind, action, memory_id, outcome, attrs FROM events WHERE realm = 'ops' AND kind <> 'delegation' ORDER BY log_index".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200, "{rows}");
    let rows = rows.as_array().unwrap();
    let kinds: Vec<&str> = rows.iter().map(|row| row["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "tool_call",
            "tool_result",
            "memory_write",
            "credential_use",
            "memory_read",
            "message_sent",
            "file_read"
        ]
    );
    assert_eq!(rows[0]["action"], "search");
    assert_eq!(rows[1]["outcome"], "ok");
    assert_eq!(rows[2]["memory_id"], "mem-1");
    let attrs: Value = serde_json::from_str(rows[2]["attrs"].as_str().unwrap()).unwrap();
    assert_eq!(attrs["custos.source"], "lastid");
    assert_eq!(attrs["custos.attested_for"], agent.did.as_str());
    assert_eq!(attrs["source_trust"], "untrusted");
    assert_eq!(attrs["lastid.record"].as_str().unwrap(), records[2].to_string());

    // Someone holding the adapter's key forges a record into the log: the node takes the
    // envelope (the key is enrolled), and `custos verify` finds the record is not LastID's.
    let root = custos_store::keyfile::read_key(&data.join("attest/lastid/ops/root.key")).unwrap();
    let seed = blake3::keyed_hash(
        &root.seed(),
        format!("custos attested agent v1\0{}", agent.did).as_bytes(),
    );
    let adapter_key = custos_event::AgentKey::from_seed(seed.as_bytes());
    assert_eq!(adapter_key.did(), rows_agent(&url, &token, &agent.did));
    let mut genuine = LastIdAgent::new(&agent.did, [31; 32]);
    genuine.seq = 100;
    let mut record = genuine.next("AgentCredentialInjected", None, json!({"credential": "cred-db"}));
    record["metadata"]["credential"] = json!("cred-prod-root");
    let mut signer = custos_event::Signer::resume(
        adapter_key,
        "ops",
        custos_event::ChainState {
            next_seq: 100,
            prev: Some("00".repeat(32)),
        },
    );
    let forged_event = signer
        .sign_object(
            json!({"kind": "credential_use", "attrs": {"custos.source": "lastid", "custos.attested_for": agent.did, "lastid.record": record.to_string()}})
                .as_object()
                .unwrap()
                .clone(),
            chrono::Utc::now(),
        )
        .unwrap();
    let (status, answer) = post(&url, "/v1/events", None, forged_event.to_json().into_bytes()).unwrap();
    assert_eq!(
        (status, answer[0]["status"].as_str()),
        (200, Some("accepted")),
        "{answer}"
    );
    let forged_index = answer[0]["log_index"].as_u64().unwrap();
    server.stop();

    let output = custos()
        .arg("verify")
        .arg(&data)
        .args(["--signatures", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "verify passed a forged LastID record");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["code"], "lastid_record");
    assert_eq!(problems[0]["log_index"], forged_index);
    assert!(
        problems[0]["detail"].as_str().unwrap().contains("integrity_mismatch"),
        "{}",
        problems[0]
    );
}

/// The adapter key an agent's events are signed with, as the node reports it.
fn rows_agent(url: &str, token: &str, lastid_did: &str) -> String {
    let (_, rows) = post(
        url,
        "/v1/sql",
        Some(token),
        b"SELECT agent, attrs FROM events WHERE kind = 'tool_call' AND realm = 'ops'".to_vec(),
    )
    .unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|row| row["attrs"].as_str().unwrap().contains(lastid_did))
        .map(|row| row["agent"].as_str().unwrap().to_owned())
        .unwrap()
}

/// A stand-in for LastID's operator webhook: it keeps every request's signature header
/// and body (LastID's operator service cannot run here; the test says so).
/// Requests received: (the `X-Custos-Signature` header, the body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

fn operator_webhook() -> (String, Received) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/operator/recommendations", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Some(request) = crate::support::Request::read(&stream) else {
                continue;
            };
            let signature = request.header("x-custos-signature").unwrap_or_default().to_owned();
            sink.lock().unwrap().push((signature, request.body));
            crate::support::answer(stream, 202, r#"{"queued":"op-42"}"#);
        }
    });
    (url, seen)
}

#[test]
fn a_lastid_agent_is_recommended_for_revocation_after_approval() {
    let dir = tempfile::tempdir().unwrap();
    let (webhook, received) = operator_webhook();
    std::fs::write(dir.path().join("operator.secret"), "op-secret\n").unwrap();
    let playbooks = crate::support::playbook_dir(
        dir.path(),
        "lastid.yml",
        "name: lastid-operator\nmatch:\n  types: [credential_misuse]\nactions:\n  - require_approval: {}\n  - lastid.revoke_agent: {}\n",
    );
    let data = dir.path().join("store");
    let server = Server::start_with(
        &data,
        &[
            "--no-shipped-playbooks",
            "--playbooks",
            playbooks.to_str().unwrap(),
            "--lastid-webhook",
            &webhook,
            "--lastid-webhook-secret-file",
            dir.path().join("operator.secret").to_str().unwrap(),
        ],
    );
    let (url, token) = (server.url.clone(), server.token());
    let mut agent = LastIdAgent::new("did:lastid:agent:billing", [41; 32]);
    let body = json!({"did": agent.did, "realm": "fin", "source": "lastid", "public_key": agent.public_key_hex()});
    let (status, answer) = post(&url, "/v1/agents", Some(&token), body.to_string().into_bytes()).unwrap();
    assert_eq!(status, 201, "{answer}");
    let records = [
        agent.next("AgentToolInvoked", None, json!({"tool": "ledger.read"})),
        agent.next(
            "AgentCredentialInjected",
            None,
            json!({"credential": "cred-payroll", "credential_owner": "did:lastid:agent:payroll"}),
        ),
    ];
    assert_eq!(statuses(&ship(&url, &records)), ["accepted", "accepted"]);

    // The playbook asks first: LastID takes a revocation only when its operator signs it.
    let mut approval = None;
    let started = std::time::Instant::now();
    while approval.is_none() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "no approval was asked"
        );
        let (_, pending) = get(&url, "/v1/approvals", &token);
        approval = pending["pending"][0]["id"].as_str().map(str::to_owned);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(received.lock().unwrap().is_empty(), "nothing is sent before approval");
    let (status, answer) = post(
        &url,
        &format!("/v1/approvals/{}/approve", approval.unwrap()),
        Some(&token),
        Vec::new(),
    )
    .unwrap();
    assert!((200..300).contains(&status), "{answer}");
    let executed = answer["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|action| action["action"] == "lastid.revoke_agent")
        .cloned()
        .unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(executed["status"], "executed", "{executed}");
    assert_eq!(
        executed["platform"]["status"], 202,
        "the operator's answer is recorded: {executed}"
    );
    assert_eq!(executed["platform"]["response"]["queued"], "op-42");

    // What the operator got: an HMAC-signed POST holding a recommendation the responder
    // key signed, naming the LastID agent.
    let (signature, body) = received.lock().unwrap()[0].clone();
    assert_eq!(signature, custos_respond::webhook::signature(b"op-secret", &body));
    let body: Value = serde_json::from_slice(&body).unwrap();
    let envelope = body["recommendation"].to_string();
    let decoded = custos_event::verify::decode_envelope(
        envelope.as_bytes(),
        65_536,
        &[custos_event::dsse::RECOMMENDATION_PAYLOAD_TYPE],
    )
    .unwrap();
    custos_event::verify::verify_one(&decoded.key, &decoded.envelope).unwrap();
    let recommendation: Value = serde_json::from_slice(&decoded.envelope.payload).unwrap();
    assert_eq!(recommendation["recommendation"], "revoke_agent");
    assert_eq!(recommendation["agent_did"], agent.did.as_str());
    assert_eq!(recommendation["issuer"], decoded.envelope.keyid.as_str());
    server.stop();
}

#[test]
fn a_class_the_policy_records_that_stops_arriving_is_an_audit_disabled_finding() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-shipped-playbooks"]);
    let (url, token) = (server.url.clone(), server.token());
    let mut agent = LastIdAgent::new("did:lastid:agent:ops", [51; 32]);
    let body = json!({"did": agent.did, "realm": "ops", "source": "lastid", "public_key": agent.public_key_hex()});
    assert_eq!(
        post(&url, "/v1/agents", Some(&token), body.to_string().into_bytes())
            .unwrap()
            .0,
        201
    );
    // The operator-signed policy records tool calls and credential injections; file reads
    // are not in it.
    let mut records = vec![agent.next(
        "ChainCheckpoint",
        None,
        json!({"audit_policy": ["AgentToolInvoked", "AgentCredentialInjected", "ChainCheckpoint"]}),
    )];
    for round in 0..12 {
        records.push(agent.next("AgentToolInvoked", None, json!({"tool": "search"})));
        records.push(agent.next("AgentFileRead", None, json!({"path": format!("/srv/{round}")})));
        if round % 2 == 0 {
            records.push(agent.next("AgentCredentialInjected", None, json!({"credential": "cred-api"})));
        }
    }
    // File reads stop (not in the policy: nothing to say), and so do credential
    // injections (in the policy: switched off at the source) while tool calls go on.
    for _ in 0..40 {
        records.push(agent.next("AgentToolInvoked", None, json!({"tool": "search"})));
    }
    assert!(
        statuses(&ship(&url, &records))
            .iter()
            .all(|status| status == "accepted")
    );
    let started = std::time::Instant::now();
    let found = loop {
        let (_, answer) = get(&url, "/v1/findings?type=audit_disabled", &token);
        let found = answer["findings"].as_array().unwrap().clone();
        if !found.is_empty() || started.elapsed() > std::time::Duration::from_secs(30) {
            break found;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["rule_id"], "custos-lastid-audit-off");
    assert!(
        found[0]["title"].as_str().unwrap().contains("AgentCredentialInjected"),
        "{}",
        found[0]
    );
    assert!(found[0]["title"].as_str().unwrap().contains(&agent.did), "{}", found[0]);
    server.stop();
}
