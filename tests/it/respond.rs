//! The detection and response loop inside a real `custos serve`: a finding is signed into
//! the log, a playbook revokes the agent (and its sub-agent) and quarantines the memory it
//! poisoned, the control feed says so, and the store still verifies.

use std::io::BufRead as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custos_event::{AgentKey, Envelope, REVOCATIONS_PAYLOAD_TYPE, Signer};
use serde_json::{Value, json};

use crate::support::{Server, playbook_dir, post, run, stderr, stdout};

pub(crate) fn get(url: &str, path: &str, token: &str) -> (u16, Value) {
    let response = reqwest::blocking::Client::new()
        .get(format!("{url}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub(crate) fn enroll(url: &str, token: &str, did: &str, realm: &str) {
    let body = json!({ "did": did, "realm": realm }).to_string().into_bytes();
    let (status, answer) = post(url, "/v1/agents", Some(token), body).unwrap();
    assert_eq!(status, 201, "{answer}");
}

/// Payload objects signed (ts = now), one envelope per line: a `POST /v1/events` body.
pub(crate) fn signed_body(signer: &mut Signer, objects: &[Value]) -> Vec<u8> {
    objects
        .iter()
        .map(|object| {
            signer
                .sign_object(object.as_object().unwrap().clone(), chrono::Utc::now())
                .unwrap()
                .to_json()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Signs and sends payload objects (ts = now); returns one result per object.
pub(crate) fn send(url: &str, signer: &mut Signer, objects: &[Value]) -> Vec<Value> {
    let body = signed_body(signer, objects);
    let (status, results) = post(url, "/v1/events", None, body).unwrap();
    assert_eq!(status, 200, "{results}");
    results.as_array().unwrap().clone()
}

pub(crate) fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads `/v1/control/stream` on a thread, collecting event names.
fn subscribe(url: &str, token: &str) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let (ready, opened) = std::sync::mpsc::channel();
    let url = format!("{url}/v1/control/stream");
    let token = token.to_owned();
    std::thread::spawn(move || {
        let response = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .unwrap()
            .get(url)
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let _ = ready.send(());
        for line in std::io::BufReader::new(response).lines() {
            let Ok(line) = line else { break };
            if let Some(event) = line.strip_prefix("event: ") {
                sink.lock().unwrap().push(event.to_owned());
            }
        }
    });
    opened.recv_timeout(Duration::from_secs(30)).unwrap();
    seen
}

fn findings(url: &str, token: &str) -> Vec<Value> {
    let (status, answer) = get(url, "/v1/findings?limit=1000", token);
    assert_eq!(status, 200, "{answer}");
    answer["findings"].as_array().unwrap().clone()
}

fn status_of(url: &str, token: &str, did: &str) -> String {
    let (_, agent) = get(url, &format!("/v1/agents/{did}"), token);
    agent["status"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn memory_poisoning_is_contained_and_the_revocation_list_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let url = server.url.clone();
    let parent_key = AgentKey::from_seed(&[21; 32]);
    let child_key = AgentKey::from_seed(&[22; 32]);
    let bystander_key = AgentKey::from_seed(&[23; 32]);
    let (parent, child, bystander) = (
        parent_key.did().to_owned(),
        child_key.did().to_owned(),
        bystander_key.did().to_owned(),
    );
    enroll(&url, &token, &parent, "eng");
    enroll(&url, &token, &bystander, "eng");
    let stream = subscribe(&url, &token);
    let mut parent_signer = Signer::new(parent_key, "eng");
    let mut child_signer = Signer::new(child_key, "eng");
    let mut bystander_signer = Signer::new(bystander_key, "eng");

    // The bystander writes a memory from untrusted content too, but never uses a credential.
    let results = send(
        &url,
        &mut bystander_signer,
        &[json!({"kind": "memory_write", "memory_id": "mem-bystander", "attrs": {"source_trust": "untrusted"}})],
    );
    assert_eq!(results[0]["status"], "accepted");
    let results = send(
        &url,
        &mut parent_signer,
        &[
            json!({"kind": "memory_write", "memory_id": "mem-poisoned", "attrs": {"source_trust": "untrusted"}}),
            json!({"kind": "delegation", "target": child, "attrs": {"granted_scopes": ["read"], "holder_scopes": ["read", "write"]}}),
        ],
    );
    assert!(
        results.iter().all(|result| result["status"] == "accepted"),
        "{results:?}"
    );
    let results = send(
        &url,
        &mut child_signer,
        &[json!({"kind": "tool_call", "action": "search"})],
    );
    assert_eq!(results[0]["status"], "accepted", "the delegation enrolled the child");
    // The poisoned memory is read back, then a credential is used: provenance, not just
    // an untrusted write followed by a credential (the bystander's pattern).
    let trigger = send(
        &url,
        &mut parent_signer,
        &[
            json!({"kind": "memory_read", "memory_id": "mem-poisoned"}),
            json!({"kind": "credential_use", "target": "cred-db", "attrs": {"credential_owner": parent}}),
        ],
    );
    let trigger_index = trigger[1]["log_index"].as_u64().unwrap();

    wait_for("the playbook to revoke the parent", || {
        status_of(&url, &token, &parent) == "revoked"
    });
    assert_eq!(status_of(&url, &token, &child), "revoked", "revocation cascades");
    assert_eq!(status_of(&url, &token, &bystander), "active");

    let found = findings(&url, &token);
    let poisoning = found
        .iter()
        .find(|finding| finding["type"] == "memory_poisoning")
        .unwrap_or_else(|| panic!("no memory_poisoning finding in {found:?}"));
    assert_eq!(poisoning["agent"], parent.as_str());
    assert_eq!(poisoning["rule_id"], "custos-memory-poisoning");
    assert!(
        poisoning["evidence"]
            .as_array()
            .unwrap()
            .contains(&json!(trigger_index))
    );
    assert!(poisoning["log_index"].as_u64().unwrap() > trigger_index);
    assert!(
        poisoning["tags"]
            .as_array()
            .unwrap()
            .contains(&json!("owasp.agentic.t1"))
    );

    // The parent's next event is refused.
    let refused = send(
        &url,
        &mut parent_signer,
        &[json!({"kind": "tool_call", "action": "search"})],
    );
    assert_eq!(refused[0]["reason"], "revoked_agent", "{refused:?}");

    // The poisoned memory is quarantined; the bystander's is not.
    wait_for("the memory quarantine", || {
        get(&url, "/v1/memories/mem-poisoned/status", &token).1["status"] == "quarantined"
    });
    let (_, memory) = get(&url, "/v1/memories/mem-poisoned/status", &token);
    assert_eq!(memory["serve"], false, "{memory}");
    assert_eq!(memory["agent"], parent.as_str());
    let (_, other) = get(&url, "/v1/memories/mem-bystander/status", &token);
    assert_eq!(other["serve"], true, "{other}");

    // Actions are recorded, with their log indexes (signed just after being enforced).
    wait_for("the action records", || {
        let (_, actions) = get(&url, "/v1/actions", &token);
        actions["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|action| action["log_index"].is_u64())
            .count()
            >= 2
    });
    let (_, actions) = get(&url, "/v1/actions", &token);
    let executed: Vec<&str> = actions["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|action| action["status"] == "executed" && action["log_index"].is_u64())
        .map(|action| action["action"].as_str().unwrap())
        .collect();
    assert!(executed.contains(&"revoke_agent"), "{actions}");
    assert!(executed.contains(&"quarantine_memory"), "{actions}");

    // The signed revocation list verifies with the node's published key.
    wait_for("a checkpoint", || get(&url, "/v1/checkpoints/latest", &token).0 == 200);
    let (_, checkpoint) = get(&url, "/v1/checkpoints/latest", &token);
    let node_did = checkpoint["node_did"].as_str().unwrap().to_owned();
    let published = custos_event::verifying_key_from_did(&node_did).unwrap();
    assert!(
        server.log.lock().unwrap().contains(&node_did),
        "serve prints the node key it publishes"
    );
    let raw = reqwest::blocking::Client::new()
        .get(format!("{url}/v1/control/revocations"))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .to_vec();
    let decoded = custos_event::decode_envelope(&raw, 1 << 20, &[REVOCATIONS_PAYLOAD_TYPE]).unwrap();
    assert_eq!(decoded.envelope.keyid, node_did);
    custos_event::verify::verify_one(&published, &decoded.envelope).unwrap();
    let list: Value = serde_json::from_slice(&decoded.envelope.payload).unwrap();
    let revoked: Vec<&str> = list["revoked_agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|agent| agent["did"].as_str().unwrap())
        .collect();
    assert!(
        revoked.contains(&parent.as_str()) && revoked.contains(&child.as_str()),
        "{list}"
    );
    assert_eq!(list["quarantined_memories"][0]["id"], "mem-poisoned");
    let mut forged: Envelope = decoded.envelope.clone();
    forged.payload = forged
        .payload
        .iter()
        .map(|byte| if *byte == b'1' { b'2' } else { *byte })
        .collect();
    assert!(custos_event::verify::verify_one(&published, &forged).is_err());

    // The control stream announced both revocations and the quarantine.
    wait_for("the control stream", || {
        let seen = stream.lock().unwrap();
        seen.iter().filter(|event| *event == "agent_revoked").count() == 2
            && seen.iter().any(|event| event == "memory_quarantined")
    });

    // The CLI shows the finding and the actions.
    let data = dir.path().to_str().unwrap();
    let output = run(&["finding", "list", "--url", &url, "--data", data]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("memory_poisoning"), "{}", stdout(&output));
    let output = run(&["action", "list", "--json", "--url", &url, "--data", data]);
    assert!(output.status.success(), "{}", stderr(&output));
    let listed: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert!(!listed["actions"].as_array().unwrap().is_empty());

    let count = findings(&url, &token).len();
    server.stop();

    // Findings and action records are signed entries on their own chains.
    let output = run(&["verify", data, "--signatures"]);
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));

    // A restart without the detector snapshot replays every event, and reports nothing twice.
    std::fs::remove_file(dir.path().join("detector.snapshot")).unwrap();
    let server = Server::start(dir.path());
    wait_for("the replayed findings", || {
        findings(&url_of(&server), &token).len() >= count
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        findings(&url_of(&server), &token).len(),
        count,
        "no finding is reported twice"
    );
    assert_eq!(status_of(&url_of(&server), &token, &parent), "revoked");
    server.stop();
    let output = run(&["verify", data, "--signatures"]);
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
}

fn url_of(server: &Server) -> String {
    server.url.clone()
}

fn pending_approval(url: &str, token: &str, agent: &str) -> Option<String> {
    let (_, answer) = get(url, "/v1/approvals", token);
    answer["pending"]
        .as_array()?
        .iter()
        .find(|approval| approval["finding"]["agent"] == agent)
        .and_then(|approval| approval["id"].as_str().map(str::to_owned))
}

#[test]
fn approvals_and_undo_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "gate.yml",
        "name: gated-revoke\nmatch:\n  types: [credential_misuse]\nactions:\n  - require_approval:\n      expires_in_secs: 600\n  - revoke_agent: {}\n",
    );
    let data = dir.path().join("store");
    let server = Server::start_with(
        &data,
        &["--no-shipped-playbooks", "--playbooks", playbooks.to_str().unwrap()],
    );
    let (url, token) = (server.url.clone(), server.token());
    let node = ["--url", url.as_str(), "--data", data.to_str().unwrap()];
    let keys = [AgentKey::from_seed(&[31; 32]), AgentKey::from_seed(&[32; 32])];
    let mut signers = Vec::new();
    for key in &keys {
        enroll(&url, &token, key.did(), "ops");
        signers.push(Signer::new(key.clone(), "ops"));
    }
    // Both agents use a credential someone else owns.
    for signer in &mut signers {
        let results = send(
            &url,
            signer,
            &[
                json!({"kind": "credential_use", "target": "cred-prod", "attrs": {"credential_owner": "did:key:z6MkOwner"}}),
            ],
        );
        assert_eq!(results[0]["status"], "accepted");
    }
    let (approve_did, deny_did) = (keys[0].did().to_owned(), keys[1].did().to_owned());
    wait_for("two pending approvals", || {
        pending_approval(&url, &token, &approve_did).is_some() && pending_approval(&url, &token, &deny_did).is_some()
    });
    assert_eq!(
        status_of(&url, &token, &approve_did),
        "active",
        "nothing runs before approval"
    );
    let output = run(&[&["action", "list"][..], &node[..]].concat());
    assert!(stdout(&output).contains("Waiting for approval"), "{}", stdout(&output));

    let approval = pending_approval(&url, &token, &approve_did).unwrap();
    let output = run(&[&["action", "approve", approval.as_str()][..], &node[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("executed revoke_agent"), "{}", stdout(&output));
    assert_eq!(status_of(&url, &token, &approve_did), "revoked");

    let denied = pending_approval(&url, &token, &deny_did).unwrap();
    let output = run(&[&["action", "deny", denied.as_str()][..], &node[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("denied"), "{}", stdout(&output));
    assert_eq!(status_of(&url, &token, &deny_did), "active", "a denial runs nothing");
    let again = run(&[&["action", "deny", denied.as_str()][..], &node[..]].concat());
    assert!(!again.status.success());
    assert!(stderr(&again).contains("unknown_approval"), "{}", stderr(&again));

    // Undo the revocation: it waits for approval, then reinstates the agent.
    let (_, actions) = get(&url, "/v1/actions", &token);
    let revoke = actions["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|action| action["action"] == "revoke_agent" && action["status"] == "executed")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let output = run(&[&["action", "undo", revoke.as_str()][..], &node[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(status_of(&url, &token, &approve_did), "revoked", "undo needs approval");
    let undo_approval = pending_approval(&url, &token, &approve_did).unwrap();
    let output = run(&[&["action", "approve", undo_approval.as_str()][..], &node[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("reinstate_agent"), "{}", stdout(&output));
    assert_eq!(status_of(&url, &token, &approve_did), "active");
    let results = send(
        &url,
        &mut signers[0],
        &[json!({"kind": "tool_call", "action": "search"})],
    );
    assert_eq!(results[0]["status"], "accepted", "a reinstated agent is accepted again");

    server.stop();
    let output = run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
}

/// The brakes hold across a restart: a playbook a cap paused stays paused, its hour's
/// count still applies, and only a person's resume (through the CLI, recorded in the log)
/// lifts the pause.
#[test]
fn a_cap_pause_survives_a_restart_until_a_person_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "capped.yml",
        "name: capped-quarantine\nmatch:\n  types: [credential_misuse]\ncaps:\n  max_actions_per_hour: 1\n\
         actions:\n  - quarantine_agent: {}\n",
    );
    let data = dir.path().join("store");
    let args = ["--no-shipped-playbooks", "--playbooks", playbooks.to_str().unwrap()];
    let keys: Vec<AgentKey> = (41..45).map(|seed| AgentKey::from_seed(&[seed; 32])).collect();
    let misuse = |url: &str, key: &AgentKey| {
        let mut signer = Signer::new(key.clone(), "ops");
        let results = send(
            url,
            &mut signer,
            &[
                json!({"kind": "credential_use", "target": "cred-prod", "attrs": {"credential_owner": "did:key:z6MkOwner"}}),
            ],
        );
        assert_eq!(results[0]["status"], "accepted");
    };
    let action_for = |url: &str, token: &str, did: &str| -> Option<Value> {
        let (_, answer) = get(url, "/v1/actions", token);
        answer["actions"]
            .as_array()?
            .iter()
            .find(|action| action["agent"] == did && action["action"] == "quarantine_agent")
            .cloned()
    };
    let paused = |url: &str, token: &str| -> Value {
        let (status, answer) = get(url, "/v1/playbooks", token);
        assert_eq!(status, 200, "{answer}");
        answer["playbooks"][0]["paused_realms"].clone()
    };

    let server = Server::start_with(&data, &args);
    let (url, token) = (server.url.clone(), server.token());
    for key in &keys {
        enroll(&url, &token, key.did(), "ops");
    }
    assert_eq!(paused(&url, &token), json!([]));
    // The first agent is quarantined; the second hits the rate cap, which pauses the
    // playbook in the realm.
    misuse(&url, &keys[0]);
    wait_for("the first quarantine", || {
        action_for(&url, &token, keys[0].did()).is_some()
    });
    misuse(&url, &keys[1]);
    wait_for("the escalation", || action_for(&url, &token, keys[1].did()).is_some());
    assert_eq!(action_for(&url, &token, keys[1].did()).unwrap()["status"], "escalated");
    assert_eq!(status_of(&url, &token, keys[1].did()), "active");
    assert_eq!(paused(&url, &token), json!(["ops"]));
    server.stop();

    // After a restart the pause holds: the third agent's finding is escalated too.
    let server = Server::start_with(&data, &args);
    let (url, token) = (server.url.clone(), server.token());
    assert_eq!(paused(&url, &token), json!(["ops"]));
    misuse(&url, &keys[2]);
    wait_for("the third escalation", || {
        action_for(&url, &token, keys[2].did()).is_some()
    });
    let third = action_for(&url, &token, keys[2].did()).unwrap();
    assert_eq!(third["status"], "escalated", "{third}");
    assert!(third["reason"].as_str().unwrap().contains("paused"), "{third}");
    assert_eq!(status_of(&url, &token, keys[2].did()), "active");

    // A person resumes it through the CLI, in the realm where it is paused.
    let node = ["--url", url.as_str(), "--data", data.to_str().unwrap()];
    let listed = run(&[&["action", "list"][..], &node[..]].concat());
    assert!(
        stdout(&listed).contains("capped-quarantine in realm ops"),
        "{}",
        stdout(&listed)
    );
    let wrong = run(&[
        &["action", "resume", "capped-quarantine", "--realm", "eng"][..],
        &node[..],
    ]
    .concat());
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("not_paused"), "{}", stderr(&wrong));
    let resumed = run(&[
        &["action", "resume", "capped-quarantine", "--realm", "ops"][..],
        &node[..],
    ]
    .concat());
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stdout(&resumed).contains("executed resume_playbook"),
        "{}",
        stdout(&resumed)
    );
    assert_eq!(paused(&url, &token), json!([]));
    server.stop();

    // The resume is in the log: after another restart the playbook is not paused, but
    // the hour's one action still counts, so the next match pauses it again.
    let server = Server::start_with(&data, &args);
    let (url, token) = (server.url.clone(), server.token());
    assert_eq!(paused(&url, &token), json!([]));
    misuse(&url, &keys[3]);
    wait_for("the fourth escalation", || {
        action_for(&url, &token, keys[3].did()).is_some()
    });
    let fourth = action_for(&url, &token, keys[3].did()).unwrap();
    assert_eq!(fourth["status"], "escalated", "{fourth}");
    assert!(fourth["reason"].as_str().unwrap().contains("rate cap"), "{fourth}");
    server.stop();
    let output = run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
}

/// With the detector's queue at one message, the sequencer waits for the detector at
/// nearly every event, while the detector waits for the sequencer to log each finding:
/// both must still make progress (no deadlock), and nothing is lost.
#[test]
fn a_full_detector_queue_slows_ingest_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "quarantine.yml",
        "name: quarantine-misuse\nmatch:\n  types: [credential_misuse]\nactions:\n  - quarantine_agent: {}\n",
    );
    let data = dir.path().join("store");
    let server = Server::start_with(
        &data,
        &[
            "--detector-queue",
            "1",
            "--no-shipped-playbooks",
            "--playbooks",
            playbooks.to_str().unwrap(),
        ],
    );
    let (url, token) = (server.url.clone(), server.token());
    let benign: Vec<AgentKey> = (51..55).map(|seed| AgentKey::from_seed(&[seed; 32])).collect();
    let misusers: Vec<AgentKey> = (61..64).map(|seed| AgentKey::from_seed(&[seed; 32])).collect();
    for key in benign.iter().chain(&misusers) {
        enroll(&url, &token, key.did(), "ops");
    }
    // Benign traffic on four connections while the misuse findings are logged.
    let senders: Vec<_> = benign
        .iter()
        .map(|key| {
            let (url, key) = (url.clone(), key.clone());
            std::thread::spawn(move || {
                let mut signer = Signer::new(key, "ops");
                let mut accepted = 0;
                for batch in 0..15 {
                    let objects: Vec<Value> = (0..100)
                        .map(|i| json!({"kind": "tool_call", "action": "search", "target": format!("doc-{batch}-{i}")}))
                        .collect();
                    accepted += send(&url, &mut signer, &objects)
                        .iter()
                        .filter(|result| result["status"] == "accepted")
                        .count();
                }
                accepted
            })
        })
        .collect();
    for key in &misusers {
        let mut signer = Signer::new(key.clone(), "ops");
        let results = send(
            &url,
            &mut signer,
            &[
                json!({"kind": "credential_use", "target": "cred-prod", "attrs": {"credential_owner": "did:key:z6MkOwner"}}),
            ],
        );
        assert_eq!(results[0]["status"], "accepted");
    }
    for sender in senders {
        assert_eq!(sender.join().unwrap(), 1_500, "every benign event is accepted");
    }
    for key in &misusers {
        wait_for("each misuser quarantined", || {
            status_of(&url, &token, key.did()) == "quarantined"
        });
    }
    let (_, answer) = get(&url, "/v1/findings?type=credential_misuse", &token);
    assert_eq!(answer["findings"].as_array().unwrap().len(), misusers.len(), "{answer}");
    server.stop();
    let output = run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
}

/// `GET /v1/findings`, `/v1/actions` and `/v1/agents`: filters, cursors, and an agent's
/// page with its recent findings, actions and baseline.
#[test]
fn rest_lists_filter_and_page() {
    let dir = tempfile::tempdir().unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "revoke.yml",
        "name: revoke-misuse\nmatch:\n  types: [credential_misuse]\nactions:\n  - revoke_agent: {}\n",
    );
    let server = Server::start_with(
        &dir.path().join("store"),
        &["--no-shipped-playbooks", "--playbooks", playbooks.to_str().unwrap()],
    );
    let (url, token) = (server.url.clone(), server.token());
    let mut culprits = Vec::new();
    for (seed, realm) in [(71u8, "eng"), (72, "eng"), (73, "ops")] {
        let key = AgentKey::from_seed(&[seed; 32]);
        enroll(&url, &token, key.did(), realm);
        let mut signer = Signer::new(key.clone(), realm);
        send(&url, &mut signer, &[json!({"kind": "tool_call", "action": "search"})]);
        send(
            &url,
            &mut signer,
            &[
                json!({"kind": "credential_use", "target": "cred-prod", "attrs": {"credential_owner": "did:key:z6MkOwner"}}),
            ],
        );
        culprits.push(key.did().to_owned());
    }
    let bystander = AgentKey::from_seed(&[74; 32]);
    enroll(&url, &token, bystander.did(), "eng");
    wait_for("three revocations", || {
        let (_, answer) = get(&url, "/v1/agents?status=revoked", &token);
        answer["agents"].as_array().is_some_and(|agents| agents.len() == 3)
    });

    // Findings: by agent, by realm, by severity; a page of one and its cursor.
    let (_, answer) = get(&url, &format!("/v1/findings?agent={}", culprits[0]), &token);
    let findings = answer["findings"].as_array().unwrap();
    assert!(!findings.is_empty() && findings.iter().all(|f| f["agent"] == culprits[0].as_str()));
    let (_, answer) = get(&url, "/v1/findings?realm=ops", &token);
    assert!(
        answer["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["realm"] == "ops")
    );
    let (_, all) = get(&url, "/v1/findings?type=credential_misuse", &token);
    let all: Vec<u64> = all["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["log_index"].as_u64().unwrap())
        .collect();
    assert!(all.len() >= 3, "{all:?}");
    assert!(all.windows(2).all(|pair| pair[0] > pair[1]), "newest first: {all:?}");
    let mut paged = Vec::new();
    let mut cursor: Option<u64> = None;
    loop {
        let path = match cursor {
            Some(before) => format!("/v1/findings?type=credential_misuse&limit=1&before={before}"),
            None => "/v1/findings?type=credential_misuse&limit=1".to_owned(),
        };
        let (status, answer) = get(&url, &path, &token);
        assert_eq!(status, 200, "{answer}");
        paged.extend(
            answer["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["log_index"].as_u64().unwrap()),
        );
        match answer["next"].as_u64() {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, all, "paging one at a time yields the same list");
    let (_, answer) = get(
        &url,
        &format!("/v1/findings?type=credential_misuse&after={}", all[all.len() - 1]),
        &token,
    );
    let ascending: Vec<u64> = answer["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["log_index"].as_u64().unwrap())
        .collect();
    assert!(
        ascending.windows(2).all(|pair| pair[0] < pair[1]),
        "after= is oldest first: {ascending:?}"
    );
    assert_eq!(ascending.len(), all.len() - 1);
    let (_, answer) = get(&url, "/v1/findings?severity=low", &token);
    assert!(
        answer["findings"].as_array().unwrap().len() >= all.len(),
        "low and above includes everything"
    );
    for (path, named) in [
        ("/v1/findings?severity=urgent", "`severity=urgent`"),
        ("/v1/findings?from=yesterday", "`from=yesterday`"),
        ("/v1/findings?colour=red", "colour"),
        ("/v1/findings?before=9&after=1", "not both"),
        ("/v1/agents?limit=many", "limit"),
    ] {
        let (status, answer) = get(&url, path, &token);
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(named), "{path}: {answer}");
    }
    let (_, answer) = get(&url, "/v1/findings?from=2099-01-01T00:00:00Z", &token);
    assert!(answer["findings"].as_array().unwrap().is_empty());

    // Actions: by status and action, by agent.
    let (_, answer) = get(&url, "/v1/actions?status=executed&action=revoke_agent", &token);
    let actions = answer["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 3, "{answer}");
    let (_, answer) = get(&url, &format!("/v1/actions?agent={}", culprits[2]), &token);
    assert!(
        answer["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["agent"] == culprits[2].as_str())
    );

    // The SQL views read the same records: each finding's and action's columns equal
    // what the REST lists (the records' own readers) say.
    let rows = |query: &str| -> Vec<Value> {
        let response = reqwest::blocking::Client::new()
            .post(format!("{url}/v1/sql"))
            .bearer_auth(&token)
            .header("accept", "application/json")
            .json(&json!({ "sql": query }))
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{query}");
        response.json().unwrap()
    };
    let (_, listed) = get(&url, "/v1/findings?type=credential_misuse", &token);
    let listed = listed["findings"].as_array().unwrap();
    let viewed = rows(
        "SELECT id, score, severity, title, rule_id, evidence, tags, learning, confidence FROM findings \
         WHERE type = 'credential_misuse' ORDER BY log_index",
    );
    assert_eq!(viewed.len(), listed.len(), "{viewed:?}");
    for row in &viewed {
        let finding = listed
            .iter()
            .find(|finding| finding["id"] == row["id"])
            .unwrap_or_else(|| panic!("{row} is not listed"));
        assert_eq!(row["score"], finding["score"], "{row}");
        assert_eq!(
            row["confidence"].as_f64().map(|c| c as f32),
            finding["confidence"].as_f64().map(|c| c as f32)
        );
        for text in ["severity", "title", "rule_id"] {
            assert_eq!(row[text], finding[text], "{text}: {row}");
        }
        for json in ["evidence", "tags"] {
            let column: Value = serde_json::from_str(row[json].as_str().unwrap()).unwrap();
            assert_eq!(column, finding[json], "{json}: {row}");
        }
        assert_eq!(row["learning"], finding["learning"].to_string(), "{row}");
    }
    let viewed = rows(
        "SELECT id, playbook, status, \"by\", agent FROM actions WHERE action = 'revoke_agent' ORDER BY log_index",
    );
    assert_eq!(viewed.len(), 3, "{viewed:?}");
    for row in &viewed {
        assert_eq!(row["playbook"], "revoke-misuse", "{row}");
        assert_eq!(row["status"], "executed", "{row}");
        assert_eq!(row["by"], "playbook:revoke-misuse", "{row}");
        assert!(culprits.iter().any(|culprit| row["agent"] == culprit.as_str()), "{row}");
    }

    // Agents: by realm and status, paged by enrollment.
    let (_, answer) = get(&url, "/v1/agents?realm=eng&status=active", &token);
    let active: Vec<&str> = answer["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["did"].as_str().unwrap())
        .collect();
    assert_eq!(active, [bystander.did()]);
    let (_, first) = get(&url, "/v1/agents?limit=2", &token);
    assert_eq!(first["agents"].as_array().unwrap().len(), 2);
    let next = first["next"].as_u64().expect("a cursor when the page is full");
    let (_, second) = get(&url, &format!("/v1/agents?limit=2&after={next}"), &token);
    let mut seen: Vec<String> = first["agents"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["agents"].as_array().unwrap())
        .map(|a| a["did"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "two pages cover the four agents once each");

    // An agent's page.
    let (_, page) = get(&url, &format!("/v1/agents/{}", culprits[0]), &token);
    assert_eq!(page["status"], "revoked");
    assert!(
        page["recent_findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["type"] == "credential_misuse"),
        "{page}"
    );
    assert!(
        page["recent_actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "revoke_agent"),
        "{page}"
    );
    assert_eq!(page["baseline"]["learning"], true, "{page}");
    assert!(
        page["baseline"]["features"]
            .as_object()
            .is_some_and(|features| !features.is_empty()),
        "{page}"
    );
}
