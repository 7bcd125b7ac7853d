//! Access control through a real `custos serve`: tokens made with the CLI, every role
//! against the routes it may and may not use, realm scope, and RFC 9162 proofs over HTTP.

use custos_event::{AgentKey, Signer};
use serde_json::{Value, json};

use crate::respond::{enroll, get, send};
use crate::support::{Server, post, run, stderr, stdout};

fn create_token(server: &Server, args: &[&str]) -> String {
    let mut all = vec!["token", "create", "--url", &server.url, "--data"];
    let data = server.data.to_str().unwrap();
    all.push(data);
    all.extend_from_slice(args);
    let output = run(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("shown once"), "{}", stderr(&output));
    stdout(&output).trim().to_owned()
}

#[test]
fn roles_realm_scope_token_lifecycle_and_proofs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let admin = server.token();
    let url = server.url.clone();

    let analyst = create_token(&server, &["--role", "analyst", "--realm", "eng", "--ttl", "30d"]);
    let responder = create_token(&server, &["--role", "responder"]);
    let compliance = create_token(&server, &["--role", "compliance", "--realm", "ops"]);
    let auditor = create_token(&server, &["--role", "auditor", "--ttl", "12h"]);

    // Bad values are named before anything is sent.
    for (args, named) in [
        (&["--role", "king"][..], "`king`"),
        (&["--role", "analyst", "--ttl", "3y"][..], "`y`"),
        (&["--role", "analyst", "--ttl", "soon"][..], "`soon`"),
    ] {
        let mut all = vec!["token", "create", "--url", &url, "--token", &admin];
        all.extend_from_slice(args);
        let output = run(&all);
        assert!(!output.status.success());
        assert!(stderr(&output).contains(named), "{}", stderr(&output));
    }

    let eng = AgentKey::generate().unwrap();
    let ops = AgentKey::generate().unwrap();
    enroll(&url, &admin, eng.did(), "eng");
    enroll(&url, &admin, ops.did(), "ops");
    let mut signer = Signer::new(eng, "eng");
    let results = send(&url, &mut signer, &[json!({"kind": "tool_call", "action": "search"})]);
    assert_eq!(results[0]["status"], "accepted", "{results:?}");

    // The role matrix: (method, path, body) against the roles allowed to use it.
    let routes: Vec<(&str, &str, &[&str])> = vec![
        ("GET", "/v1/agents", &["admin", "analyst", "responder", "compliance"]),
        (
            "GET",
            "/v1/control/revocations",
            &["admin", "analyst", "responder", "compliance"],
        ),
        (
            "GET",
            "/v1/checkpoints/latest",
            &["admin", "analyst", "responder", "compliance", "auditor"],
        ),
        (
            "GET",
            "/v1/proofs/inclusion?log_index=0&size=1",
            &["admin", "analyst", "responder", "compliance", "auditor"],
        ),
        (
            "GET",
            "/v1/proofs/consistency?from=1&to=2",
            &["admin", "analyst", "responder", "compliance", "auditor"],
        ),
        ("GET", "/v1/rejected", &["admin"]),
        ("GET", "/v1/tokens", &["admin"]),
        ("POST", "/v1/tokens", &["admin"]),
        ("POST", "/v1/agents", &["admin"]),
    ];
    let tokens = [
        ("admin", admin.as_str()),
        ("analyst", analyst.as_str()),
        ("responder", responder.as_str()),
        ("compliance", compliance.as_str()),
        ("auditor", auditor.as_str()),
    ];
    let call = |method: &str, path: &str, token: Option<&str>| -> u16 {
        if method == "GET" {
            match token {
                Some(token) => get(&url, path, token).0,
                None => reqwest::blocking::get(format!("{url}{path}"))
                    .unwrap()
                    .status()
                    .as_u16(),
            }
        } else {
            let body = if path == "/v1/tokens" {
                json!({"role": "auditor", "ttl": "1h"})
            } else {
                json!({"did": AgentKey::generate().unwrap().did(), "realm": "eng"})
            };
            post(&url, path, token, body.to_string().into_bytes()).unwrap().0
        }
    };
    for (method, path, allowed) in &routes {
        assert_eq!(call(method, path, None), 401, "{method} {path} without a token");
        assert_eq!(call(method, path, Some("cus_not-a-real-token")), 401, "{method} {path}");
        for (role, token) in tokens {
            let status = call(method, path, Some(token));
            if allowed.contains(&role) {
                assert!((200..300).contains(&status), "{role} may {method} {path}: got {status}");
            } else {
                assert_eq!(status, 403, "{role} may not {method} {path}");
            }
        }
    }
    assert_eq!(reqwest::blocking::get(format!("{url}/healthz")).unwrap().status(), 200);

    // Realm scope: the eng analyst sees the eng agent only; compliance (ops) the ops one.
    let (_, agents) = get(&url, "/v1/agents", &analyst);
    let realms: Vec<&str> = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|agent| agent["realm"].as_str().unwrap())
        .collect();
    assert!(
        !realms.is_empty() && realms.iter().all(|realm| *realm == "eng"),
        "{agents}"
    );
    let (_, agents) = get(&url, "/v1/agents", &compliance);
    assert!(
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|agent| agent["realm"] == "ops")
    );

    // Proofs over HTTP verify against the checkpoint's root.
    let (status, proof) = get(&url, "/v1/proofs/inclusion?log_index=1&size=3", &auditor);
    assert_eq!(status, 200, "{proof}");
    let hash = |value: &Value| -> [u8; 32] { hex::decode(value.as_str().unwrap()).unwrap().try_into().unwrap() };
    let path: Vec<[u8; 32]> = proof["inclusion_path"].as_array().unwrap().iter().map(hash).collect();
    custos_store::merkle::verify_inclusion(&hash(&proof["leaf_hash"]), 1, 3, &path, &hash(&proof["root_hash"]))
        .unwrap();
    let (status, proof) = get(&url, "/v1/proofs/consistency?from=1&to=3", &auditor);
    assert_eq!(status, 200, "{proof}");
    let path: Vec<[u8; 32]> = proof["consistency_path"].as_array().unwrap().iter().map(hash).collect();
    custos_store::merkle::verify_consistency(1, 3, &path, &hash(&proof["first_root"]), &hash(&proof["second_root"]))
        .unwrap();
    let (status, error) = get(&url, "/v1/proofs/inclusion?log_index=999999", &auditor);
    assert_eq!(status, 400, "{error}");
    assert!(error["message"].as_str().unwrap().contains("999999"), "{error}");

    // The token table shows no secret and no hash; a revoked token stops at once.
    let output = run(&["token", "list", "--url", &url, "--token", &admin, "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let listed: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let text = listed.to_string();
    assert!(!text.contains("sha256") && !text.contains(&analyst), "{text}");
    let analyst_id = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|token| token["role"] == "analyst" && token["realms"] == json!(["eng"]))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(get(&url, "/v1/agents", &analyst).0, 200);
    let output = run(&["token", "revoke", &analyst_id, "--url", &url, "--token", &admin]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(get(&url, "/v1/agents", &analyst).0, 401);
    let output = run(&["token", "revoke", "nosuchtoken", "--url", &url, "--token", &admin]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("nosuchtoken"), "{}", stderr(&output));
    server.stop();
}

/// Every operation of `/openapi.json`, called without a token, with a bad one, and with a
/// token of each role: the roles it lists get through, the others get 403, and nothing
/// but the public routes answers without a token. The document is generated from the
/// same declarations the router is built from.
#[test]
fn every_documented_route_enforces_its_roles() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let url = server.url.clone();
    let admin = server.token();
    let key = AgentKey::generate().unwrap();
    enroll(&url, &admin, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    send(
        &url,
        &mut signer,
        &[json!({"kind": "tool_call"}), json!({"kind": "tool_call"})],
    );

    let response = reqwest::blocking::get(format!("{url}/openapi.json")).unwrap();
    assert_eq!(response.status(), 200);
    let document: Value = response.json().unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let roles = ["admin", "analyst", "responder", "compliance", "auditor", "collector"];
    let tokens: Vec<(&str, String)> = roles
        .iter()
        .map(|role| {
            // A collector token is bound to one realm.
            let request = match *role {
                "collector" => json!({"role": role, "realms": ["eng"]}),
                _ => json!({"role": role}),
            };
            let (status, answer) = post(&url, "/v1/tokens", Some(&admin), request.to_string().into_bytes()).unwrap();
            assert_eq!(status, 201, "{answer}");
            (*role, answer["token"].as_str().unwrap().to_owned())
        })
        .collect();
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .unwrap();
    let mut operations = 0;
    let mut seen_paths = Vec::new();
    for (path, methods) in document["paths"].as_object().unwrap() {
        seen_paths.push(path.clone());
        for (method, operation) in methods.as_object().unwrap() {
            operations += 1;
            let mut concrete = path
                .replace("{did}", "did:key:z6MkNotEnrolled")
                .replace("{id}", "no-such-id")
                .replace("{name}", "no-such-playbook");
            concrete = match path.as_str() {
                "/v1/proofs/inclusion" => format!("{concrete}?log_index=0&size=1"),
                "/v1/proofs/consistency" => format!("{concrete}?from=1&to=2"),
                _ => concrete,
            };
            let body = operation["requestBody"]["content"]
                .as_object()
                .and_then(|content| content.values().next())
                .map(|media| media["example"].to_string());
            let call = |token: Option<&str>| -> (u16, String) {
                let mut request = match method.as_str() {
                    "get" => client.get(format!("{url}{concrete}")),
                    "post" => client
                        .post(format!("{url}{concrete}"))
                        .header("content-type", "application/json")
                        .body(body.clone().unwrap_or_default()),
                    other => panic!("undocumented method {other}"),
                };
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().unwrap();
                let status = response.status().as_u16();
                // The control stream never ends: read the body of everything else only.
                let text = if path == "/v1/control/stream" {
                    String::new()
                } else {
                    response.text().unwrap_or_default()
                };
                (status, text)
            };
            let label = format!("{} {path}", method.to_uppercase());
            let allowed: Vec<&str> = operation["x-custos-roles"]
                .as_array()
                .map(|roles| roles.iter().map(|role| role.as_str().unwrap()).collect())
                .unwrap_or_default();
            let served = |status: u16, text: &str, who: &str| {
                assert!(
                    ![401, 403, 405].contains(&status),
                    "{who} may use {label}: got {status} {text}"
                );
                // A 404 must be the handler's own (a JSON error naming the thing), not a
                // route the router does not know.
                if status == 404 {
                    assert!(text.contains("\"error\""), "{label} is documented but not routed");
                }
            };
            if allowed.is_empty() {
                assert_eq!(
                    operation["security"],
                    json!([]),
                    "{label} has no roles but is not public"
                );
                let (status, text) = call(None);
                served(status, &text, "anyone");
                continue;
            }
            assert_eq!(call(None).0, 401, "{label} without a token");
            assert_eq!(call(Some("cus_not-a-real-token")).0, 401, "{label} with a bad token");
            for (role, token) in &tokens {
                let (status, text) = call(Some(token));
                if allowed.contains(role) {
                    served(status, &text, role);
                } else {
                    assert_eq!(status, 403, "{role} may not use {label}: {text}");
                }
            }
        }
    }
    // The routes the issue names are all there.
    for path in [
        "/v1/events",
        "/v1/findings",
        "/v1/actions",
        "/v1/agents",
        "/v1/agents/{did}",
        "/v1/sql",
        "/v1/checkpoints/latest",
        "/v1/proofs/inclusion",
        "/v1/proofs/consistency",
        "/v1/evidence",
        "/metrics",
        "/openapi.json",
        "/",
    ] {
        assert!(
            seen_paths.iter().any(|seen| seen == path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(operations >= 30, "only {operations} operations documented");
}

/// A request with a raw `Authorization` header value (or none).
fn raw_get(url: &str, path: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::blocking::Client::new()
        .get(format!("{url}{path}"))
        .timeout(std::time::Duration::from_secs(30));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Reads a control stream until it ends; returns what it sent. Fails if it is still open
/// after `limit`.
fn read_stream(url: &str, token: &str, limit: std::time::Duration, started: impl FnOnce()) -> String {
    use std::io::Read as _;
    let mut response = reqwest::blocking::Client::new()
        .get(format!("{url}/v1/control/stream"))
        .bearer_auth(token)
        .timeout(limit)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    started();
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    loop {
        match response.read(&mut buffer) {
            Ok(0) => return seen,
            Ok(read) => seen.push_str(&String::from_utf8_lossy(&buffer[..read])),
            Err(error) => panic!("the stream did not end within {limit:?} ({error}); it sent: {seen}"),
        }
    }
}

/// The small access rules: a case-insensitive `Bearer`, authentication before any
/// parameter is read, realm syntax and role rules for tokens, bounded lifetimes, control
/// streams that end with their token, and `json_get` as documented.
#[test]
fn tokens_are_checked_first_and_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let admin = server.token();
    let url = server.url.clone();

    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let (status, body) = raw_get(&url, "/v1/agents", Some(&format!("{scheme} {admin}")));
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    assert_eq!(raw_get(&url, "/v1/agents", Some(&format!("Basic {admin}"))).0, 401);
    assert_eq!(raw_get(&url, "/v1/agents", Some("Bearer")).0, 401);

    // 401 before 400: a caller without a token learns nothing from parameter errors.
    for path in [
        "/v1/rejected?limit=lots",
        "/v1/events?limit=-1",
        "/v1/findings?severity=apocalyptic",
        "/v1/agents?frobnicate=1",
        "/v1/proofs/inclusion?log_index=x",
        "/v1/ocsf/events?after=no",
    ] {
        let (status, body) = raw_get(&url, path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(body["error"], "unauthenticated", "{path}");
        let (status, _) = raw_get(&url, path, Some(&format!("Bearer {admin}")));
        assert!(status == 400 || status == 404, "{path}: {status}");
    }
    let (status, _) = post(&url, "/v1/tokens", None, b"not json".to_vec()).unwrap();
    assert_eq!(status, 401);

    // Token realms follow the realm syntax; admin and auditor tokens take none; a
    // lifetime is bounded and a huge one is a 400, not a dropped connection.
    for (body, code, named) in [
        (json!({"role": "analyst", "realms": ["../x"]}), "bad_realm", "`../x`"),
        (json!({"role": "analyst", "realms": [""]}), "bad_realm", "``"),
        (json!({"role": "analyst", "realms": ["a b"]}), "bad_realm", "`a b`"),
        (json!({"role": "auditor", "realms": ["eng"]}), "bad_realm", "auditor"),
        (json!({"role": "admin", "realms": ["eng"]}), "bad_realm", "admin"),
        (
            json!({"role": "analyst", "ttl": "99999999999999d"}),
            "bad_ttl",
            "`99999999999999d`",
        ),
        (json!({"role": "analyst", "ttl": "3651d"}), "bad_ttl", "3650 days"),
    ] {
        let (status, answer) = post(&url, "/v1/tokens", Some(&admin), body.to_string().into_bytes()).unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], code, "{body}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(named), "{body}: {answer}");
    }
    let (status, answer) = post(
        &url,
        "/v1/tokens",
        Some(&admin),
        json!({"role": "analyst", "realms": ["eng.prod-1_a"], "ttl": "3650d"})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{answer}");

    // A control stream ends once its token is revoked...
    let reader = create_token(&server, &["--role", "analyst", "--realm", "eng"]);
    let (_, listed) = get(&url, "/v1/tokens", &admin);
    let id = listed["tokens"].as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // (read_stream fails the test when the stream does not end by itself.)
    let sent = read_stream(&url, &reader, std::time::Duration::from_secs(20), || {
        let (status, answer) = post(&url, &format!("/v1/tokens/{id}/revoke"), Some(&admin), Vec::new()).unwrap();
        assert_eq!(status, 200, "{answer}");
    });
    assert!(sent.contains("event: token_invalid"), "{sent}");
    assert_eq!(get(&url, "/v1/agents", &reader).0, 401);
    // ...and once it expires.
    let short = create_token(&server, &["--role", "analyst", "--ttl", "2s"]);
    let started = std::time::Instant::now();
    let sent = read_stream(&url, &short, std::time::Duration::from_secs(20), || {});
    assert!(sent.contains("event: token_invalid"), "{sent}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // json_get, as docs/query.md says.
    let eng = AgentKey::generate().unwrap();
    enroll(&url, &admin, eng.did(), "eng");
    let mut signer = Signer::new(eng, "eng");
    send(
        &url,
        &mut signer,
        &[json!({"kind": "tool_call", "action": "search", "attrs": {"n": 3}})],
    );
    let (status, rows) = post(
        &url,
        "/v1/sql",
        Some(&admin),
        b"SELECT json_get(payload, 'kind') AS kind, json_get(attrs, 'n') AS n FROM events".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows, json!([{"kind": "tool_call", "n": "3"}]));
    server.stop();
}

/// A token change waits for another process holding the token file's lock (the writer
/// processes of a partition set share one table) without holding the node: requests
/// keep being authenticated meanwhile, and the change is made once the lock is free.
#[test]
fn a_token_change_waiting_on_another_process_holds_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let admin = server.token();
    let url = server.url.clone();
    // Another process's change in progress.
    let held = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(server.data.join("tokens.lock"))
        .unwrap();
    held.lock().unwrap();
    let creating = {
        let (url, admin) = (url.clone(), admin.clone());
        std::thread::spawn(move || {
            post(
                &url,
                "/v1/tokens",
                Some(&admin),
                json!({"role": "analyst", "realms": ["eng"]}).to_string().into_bytes(),
            )
            .unwrap()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (status, _) = get(&url, "/v1/agents", &admin);
    assert_eq!(status, 200);
    assert!(
        !creating.is_finished(),
        "the read was answered only after the token change gave up waiting"
    );
    drop(held);
    let (status, answer) = creating.join().unwrap();
    assert_eq!(status, 201, "{answer}");
}
