//! The VaultysClaw adapter in both directions through a real `custos serve`.
//!
//! VaultysClaw cannot run on this machine, so the test runs a small fake of its HTTP API
//! (a test double, and the only one here): the governance audit the node pulls, and the
//! agents API the `vaultysclaw.disconnect_agent` action calls and its undo restores.
//! Everything on the Custos side is real: the webhook receiver, the HMAC, the detector,
//! the playbook, the action records in the log.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::respond::{get, wait_for};
use crate::support::{Request, Server, answer, playbook_dir, post};

const TOKEN: &str = "vc-api-token";
const SECRET: &str = "webhook-shared-secret";

/// The fake's state: its agents, the audit it serves, and every call it received.
#[derive(Default)]
struct Fake {
    agents: BTreeMap<String, Value>,
    audit: Value,
    calls: Vec<String>,
}

fn start_fake(state: Arc<Mutex<Fake>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Some(request) = Request::read(&stream) else {
                continue;
            };
            let authorized = request.header("authorization") == Some(format!("Bearer {TOKEN}").as_str());
            let (method, path) = (request.method.as_str(), request.path.as_str());
            let (status, body) = {
                let mut fake = state.lock().unwrap();
                fake.calls.push(format!("{method} {path}"));
                let agent_path = path.strip_prefix("/api/agents/").map(|did| did.replace("%3A", ":"));
                match (authorized, method, agent_path) {
                    (false, _, _) => (401, json!({"error": "unauthorized"})),
                    (true, "GET", _) if path.starts_with("/api/admin/governance/audit") => (200, fake.audit.clone()),
                    (true, "GET", Some(did)) => match fake.agents.get(&did) {
                        Some(agent) => (200, agent.clone()),
                        None => (404, json!({"error": "not found"})),
                    },
                    (true, "DELETE", Some(did)) => match fake.agents.remove(&did) {
                        Some(_) => (200, json!({"deleted": did})),
                        None => (404, json!({"error": "not found"})),
                    },
                    (true, "POST", None) if path == "/api/agents" => {
                        let agent: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                        let did = agent["did"].as_str().unwrap_or_default().to_owned();
                        fake.agents.insert(did, agent.clone());
                        (201, agent)
                    }
                    _ => (404, json!({"error": "no route"})),
                }
            };
            answer(stream, status, &body.to_string());
        }
    });
    url
}

pub(crate) fn deliver(url: &str, delivery: &str, timestamp: i64, secret: &str, body: &Value) -> (u16, Value) {
    let raw = body.to_string();
    let signature = custos_ingest::vaultysclaw::signature(secret.as_bytes(), &timestamp.to_string(), raw.as_bytes());
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/adapters/vaultysclaw/webhook"))
        .header("content-type", "application/json")
        .header("x-vaultysclaw-event", body["event"].as_str().unwrap_or(""))
        .header("x-vaultysclaw-delivery", delivery)
        .header("x-vaultysclaw-timestamp", timestamp.to_string())
        .header("x-vaultysclaw-signature", signature)
        .body(raw)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn sql(url: &str, token: &str, text: &str) -> Vec<Value> {
    let (status, rows) = post(url, "/v1/sql", Some(token), text.as_bytes().to_vec()).unwrap();
    assert_eq!(status, 200, "{rows}");
    rows.as_array().unwrap().clone()
}

fn action(url: &str, token: &str, name: &str) -> Option<Value> {
    let (_, actions) = get(url, "/v1/actions", token);
    actions["actions"]
        .as_array()?
        .iter()
        .find(|action| action["action"] == name)
        .cloned()
}

#[test]
fn webhooks_pulls_and_a_revoke_action_with_undo_against_a_fake_vaultysclaw() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let suspect = "did:vc:agent:billing";
    fake.lock().unwrap().agents.insert(
        suspect.into(),
        json!({"did": suspect, "name": "billing-bot", "policies": ["p-read"]}),
    );
    fake.lock().unwrap().audit = json!({
        "intents": [{"intentId": "i-100", "agentDid": "did:vc:agent:ops", "action": "http.get",
            "params": {"url": "https://status.example.com"}, "status": "completed", "output": "ok",
            "error": null, "signature": "sig", "sentAt": chrono::Utc::now().to_rfc3339(),
            "completedAt": chrono::Utc::now().to_rfc3339()}],
        "activities": [{"id": "a-7", "event": "agent.connected", "agentDid": "did:vc:agent:ops",
            "agentName": "ops-bot", "details": {"ip": "10.0.0.4"}, "createdAt": chrono::Utc::now().timestamp_millis()}],
    });
    let fake_url = start_fake(fake.clone());
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "vaultysclaw.yml",
        "name: cut-off-vaultysclaw-agent\nmatch:\n  types: [credential_misuse]\nactions:\n  - vaultysclaw.disconnect_agent: {}\n",
    );
    let data = dir.path().join("store");
    let server = Server::start_with(
        &data,
        &[
            "--no-shipped-playbooks",
            "--playbooks",
            playbooks.to_str().unwrap(),
            "--vaultysclaw-secret-file",
            dir.path().join("secret").to_str().unwrap(),
            "--vaultysclaw-realm",
            "vc",
            "--vaultysclaw-url",
            &fake_url,
            "--vaultysclaw-token-file",
            dir.path().join("token").to_str().unwrap(),
            "--vaultysclaw-poll-secs",
            "1",
        ],
    );
    let (url, token) = (server.url.clone(), server.token());
    let now = || chrono::Utc::now().timestamp_millis();

    // Push: a good delivery is attested; its repeat, a bad HMAC and a stale one are not.
    let intent = |id: &str, action: &str, params: Value| {
        json!({"event": "intent.completed", "occurredAt": chrono::Utc::now().to_rfc3339(), "data": {
            "intentId": id, "agentDid": suspect, "action": action, "params": params, "status": "completed",
            "output": null, "error": null, "signature": "s", "sentAt": chrono::Utc::now().to_rfc3339(),
            "completedAt": chrono::Utc::now().to_rfc3339()}})
    };
    let first = intent("i-1", "http.get", json!({"url": "https://api.example.com/invoices"}));
    let (status, answer) = deliver(&url, "d-1", now(), SECRET, &first);
    assert_eq!((status, answer["status"].as_str()), (200, Some("accepted")), "{answer}");
    let (status, answer) = deliver(&url, "d-1", now(), SECRET, &first);
    assert_eq!(status, 200);
    assert_eq!(answer["reason"], "duplicate_delivery", "{answer}");
    let (status, answer) = deliver(&url, "d-2", now(), "not-the-secret", &first);
    assert_eq!((status, answer["error"].as_str()), (401, Some("bad_hmac")), "{answer}");
    let (status, answer) = deliver(&url, "d-3", now() - 6 * 60 * 1000, SECRET, &first);
    assert_eq!(
        (status, answer["error"].as_str()),
        (401, Some("stale_timestamp")),
        "{answer}"
    );
    let (_, kept) = get(&url, "/v1/rejected?reason=bad_hmac", &token);
    assert_eq!(
        kept["rejected"].as_array().unwrap().len(),
        1,
        "refused deliveries are kept: {kept}"
    );

    // Pull: the audit's records arrive once, however often it is polled.
    wait_for("the pulled audit", || {
        sql(
            &url,
            &token,
            "SELECT kind FROM events WHERE realm = 'vc' AND action = 'agent.connected'",
        )
        .len()
            == 1
    });
    std::thread::sleep(Duration::from_secs(3));
    let pulled = sql(
        &url,
        &token,
        "SELECT kind, action, target, outcome, attrs FROM events WHERE realm = 'vc' AND kind <> 'delegation' ORDER BY log_index",
    );
    assert_eq!(
        pulled.len(),
        3,
        "the delivery plus two pulled records, each once: {pulled:?}"
    );
    let ops = pulled
        .iter()
        .find(|row| row["action"] == "http.get" && row["target"] == "https://status.example.com")
        .unwrap();
    let attrs: Value = serde_json::from_str(ops["attrs"].as_str().unwrap()).unwrap();
    assert_eq!(attrs["custos.source"], "vaultysclaw");
    assert_eq!(attrs["custos.attested_for"], "did:vc:agent:ops");
    assert!(
        attrs["custos.attested_by"]
            .as_str()
            .unwrap()
            .starts_with("did:key:z6Mk")
    );
    assert!(
        fake.lock()
            .unwrap()
            .calls
            .iter()
            .any(|call| call.starts_with("GET /api/admin/governance/audit?limit=500"))
    );

    // A finding on the VaultysClaw agent: a credential of another agent used.
    let misuse = intent(
        "i-2",
        "vault.read",
        json!({"credential": "cred-prod-db", "credentialOwner": "did:vc:agent:dba"}),
    );
    let (status, answer) = deliver(&url, "d-4", now(), SECRET, &misuse);
    assert_eq!((status, answer["status"].as_str()), (200, Some("accepted")), "{answer}");
    wait_for("the disconnect action", || {
        action(&url, &token, "vaultysclaw.disconnect_agent").is_some_and(|action| action["status"] == "executed")
    });
    assert!(
        !fake.lock().unwrap().agents.contains_key(suspect),
        "the agent was disconnected"
    );
    let disconnect = action(&url, &token, "vaultysclaw.disconnect_agent").unwrap();
    assert!(
        disconnect["reason"]
            .as_str()
            .unwrap()
            .contains("vaultysclaw answered 200"),
        "{disconnect}"
    );
    assert!(
        fake.lock()
            .unwrap()
            .calls
            .contains(&format!("DELETE /api/agents/{suspect}")),
        "{:?}",
        fake.lock().unwrap().calls
    );

    // Undo: asked, approved, and the agent is back as it was.
    let (status, answer) = post(
        &url,
        &format!("/v1/actions/{}/undo", disconnect["id"].as_str().unwrap()),
        Some(&token),
        Vec::new(),
    )
    .unwrap();
    assert!((200..300).contains(&status), "{answer}");
    let (_, approvals) = get(&url, "/v1/approvals", &token);
    let approval = approvals["pending"][0]["id"].as_str().unwrap().to_owned();
    assert!(
        !fake.lock().unwrap().agents.contains_key(suspect),
        "an undo waits for approval"
    );
    let (status, answer) = post(
        &url,
        &format!("/v1/approvals/{approval}/approve"),
        Some(&token),
        Vec::new(),
    )
    .unwrap();
    assert!((200..300).contains(&status), "{answer}");
    wait_for("the restore", || {
        action(&url, &token, "vaultysclaw.restore_agent").is_some_and(|action| action["status"] == "executed")
    });
    assert_eq!(
        fake.lock().unwrap().agents.get(suspect),
        Some(&json!({"did": suspect, "name": "billing-bot", "policies": ["p-read"]}))
    );
    server.stop();
}
