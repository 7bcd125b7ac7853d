//! The OpenAPI document against the real node, by an OpenAPI-driven fuzzer (Schemathesis,
//! installed from PyPI by `scripts/test`): no 5xx, and every answer in the schema the
//! document declares for its status, as an unscoped admin and as a realm-scoped analyst.

use std::path::PathBuf;
use std::process::Command;

use custos_event::{AgentKey, Signer};
use serde_json::json;

use crate::respond::{enroll, send};
use crate::support::{Server, post};

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("CUSTOS_SCHEMATHESIS").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/custos-tools/venv/bin/schemathesis")
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: scripts/test installs Schemathesis (pip, into ~/.cache/custos-tools/venv)",
        path.display()
    );
    path
}

fn fuzz(url: &str, token: &str, who: &str) {
    fuzz_except(url, token, who, &[]);
}

/// [`fuzz`], leaving out `paths` too.
fn fuzz_except(url: &str, token: &str, who: &str, paths: &[&str]) {
    let excluded = paths.iter().flat_map(|path| ["--exclude-path", path]);
    let output = Command::new(schemathesis())
        .current_dir(std::env::temp_dir())
        .args(["run", &format!("{url}/openapi.json")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        // A stream that never ends, and revoking the fuzzer's own token (which would
        // leave every later request a 401) are tested elsewhere.
        .args(["--exclude-path", "/v1/control/stream"])
        .args(["--exclude-path", "/v1/tokens/{id}/revoke"])
        .args(excluded)
        .args(["--max-examples", "25", "--request-timeout", "60", "--seed", "20261204"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "Schemathesis found problems as {who}:\n{text}");
    assert!(text.contains("passed"), "{text}");
}

#[test]
fn an_openapi_fuzzer_finds_no_server_error_and_no_answer_off_schema() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("store"));
    let admin = server.token();
    let url = server.url.clone();
    // Some data, so the reads have rows to return.
    let key = AgentKey::generate().unwrap();
    enroll(&url, &admin, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let objects: Vec<_> = (0..40)
        .map(|index| json!({"kind": "tool_call", "action": "http.get", "target": format!("https://api.example.com/{index}")}))
        .collect();
    send(&url, &mut signer, &objects);
    let (status, created) = post(
        &url,
        "/v1/tokens",
        Some(&admin),
        json!({"role": "analyst", "realms": ["eng"]}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201, "{created}");
    let analyst = created["token"].as_str().unwrap().to_owned();

    fuzz(&url, &admin, "admin");
    fuzz(&url, &analyst, "a realm-scoped analyst");

    let response = reqwest::blocking::get(format!("{url}/healthz")).unwrap();
    assert_eq!(response.status(), 200);
    let log = server.stop();
    assert!(!log.contains("panicked"), "{log}");
}

/// The same fuzzer against a stateless ingest node (`--roles ingest`) in front of a
/// writer, through a real broker: what it declares is what it answers, and nothing it is
/// sent makes it fail, its adapter routes too (passed on to the writer's node, whose
/// answers come back as they are; their flows are checked in `cluster.rs`).
#[test]
fn an_openapi_fuzzer_finds_nothing_on_an_ingest_node() {
    let dir = tempfile::tempdir().unwrap();
    let broker = crate::stages::Broker::start(dir.path());
    let cluster = ["--kafka", broker.addr.as_str(), "--kafka-prefix", "fuzz-edge"];
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[&cluster[..], &["--roles", "writer"]].concat(),
    );
    let edge = Server::start_with(
        &dir.path().join("edge"),
        &[&cluster[..], &["--roles", "ingest"]].concat(),
    );
    let key = AgentKey::generate().unwrap();
    enroll(&writer.url, &writer.token(), key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let probe = crate::hardening::signed_lines(&mut signer, 1);
    crate::respond::wait_for("the ingest node to learn the agent", || {
        crate::cluster::post_events(&edge.url, &probe).is_some_and(|results| results[0]["status"] == "accepted")
    });

    fuzz_except(&edge.url, &edge.token(), "the admin of an ingest node", &[]);

    let response = reqwest::blocking::get(format!("{}/healthz", edge.url)).unwrap();
    assert_eq!(response.status(), 200);
    let log = edge.stop();
    assert!(!log.contains("panicked"), "{log}");
    drop(writer);
    drop(broker);
}

/// And against a stateless query node (`--roles query`: sealed segments from the object
/// store, the tail from the committed topic). Its evidence route answers 501
/// `writer_only` by design (bundles are signed by the writer's node key; checked in
/// `query_node.rs`).
#[test]
fn an_openapi_fuzzer_finds_nothing_on_a_query_node() {
    let dir = tempfile::tempdir().unwrap();
    let broker = crate::stages::Broker::start(dir.path());
    let archive = format!("file://{}", dir.path().join("archive").display());
    let cluster = ["--kafka", broker.addr.as_str(), "--kafka-prefix", "fuzz-query"];
    let writer = Server::start_with(
        &dir.path().join("writer"),
        &[&cluster[..], &["--roles", "writer", "--object-store", &archive]].concat(),
    );
    let key = AgentKey::generate().unwrap();
    enroll(&writer.url, &writer.token(), key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let objects: Vec<_> = (0..40)
        .map(|index| json!({"kind": "tool_call", "action": "http.get", "target": format!("https://api.example.com/{index}")}))
        .collect();
    send(&writer.url, &mut signer, &objects);
    let query = Server::start_with(
        &dir.path().join("query"),
        &[&cluster[..], &["--roles", "query", "--object-store", &archive]].concat(),
    );
    let token = query.token();
    crate::respond::wait_for("the query node to list the events", || {
        reqwest::blocking::Client::new()
            .get(format!("{}/v1/events?limit=100", query.url))
            .bearer_auth(&token)
            .send()
            .ok()
            .and_then(|response| response.json::<serde_json::Value>().ok())
            .and_then(|page| page["events"].as_array().map(Vec::len))
            .is_some_and(|count| count >= 40)
    });

    fuzz_except(&query.url, &token, "the admin of a query node", &["/v1/evidence"]);

    let response = reqwest::blocking::get(format!("{}/healthz", query.url)).unwrap();
    assert_eq!(response.status(), 200);
    let log = query.stop();
    assert!(!log.contains("panicked"), "{log}");
    drop(writer);
    drop(broker);
}

/// The document is complete: every JSON answer has a schema, every route declares the
/// errors it may answer, and the list routes declare their filters.
#[test]
fn the_document_declares_answers_errors_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let document: serde_json::Value = reqwest::blocking::get(format!("{}/openapi.json", server.url))
        .unwrap()
        .json()
        .unwrap();
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            let (status, success) = responses
                .iter()
                .find(|(status, _)| status.starts_with('2'))
                .unwrap_or_else(|| panic!("{method} {path}: no 2xx answer"));
            if let Some(json) = success["content"].get("application/json") {
                let reference = json["schema"]["$ref"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{method} {path} {status}: no schema"));
                let name = reference.trim_start_matches("#/components/schemas/");
                assert!(schemas.contains_key(name), "{method} {path}: unknown schema {name}");
            }
            for error in ["400", "404", "405", "408", "413", "503"] {
                assert_eq!(
                    responses[error]["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                    "{method} {path}: {error} undeclared"
                );
            }
            if operation.get("x-custos-roles").is_some() {
                assert!(
                    responses.contains_key("401") && responses.contains_key("403"),
                    "{method} {path}"
                );
            }
        }
    }
    let parameters = |path: &str| -> Vec<String> {
        document["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|parameter| parameter["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for (path, wanted) in [
        (
            "/v1/findings",
            &[
                "agent", "realm", "severity", "type", "from", "to", "before", "after", "limit",
            ][..],
        ),
        (
            "/v1/actions",
            &[
                "agent", "realm", "action", "status", "from", "to", "before", "after", "limit",
            ][..],
        ),
        ("/v1/agents", &["realm", "status", "parent", "after", "limit"][..]),
    ] {
        let declared = parameters(path);
        for name in wanted {
            assert!(
                declared.iter().any(|declared| declared == name),
                "{path} lacks `{name}`: {declared:?}"
            );
        }
    }
    for path in ["/v1/events", "/v1/sql", "/v1/ocsf/{class}"] {
        let operation = document["paths"][path]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        assert!(operation["responses"].get("429").is_some(), "{path} lacks 429");
    }
    server.stop();
}
