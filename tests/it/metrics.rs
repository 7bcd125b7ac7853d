//! `GET /metrics` from a real node after real traffic, and the dashboards: every metric a
//! Grafana panel queries must exist in the exposition.

use std::collections::BTreeSet;

use custos_event::{AgentKey, Signer};
use serde_json::{Value, json};

use crate::respond::{enroll, send, wait_for};
use crate::support::{Server, manifest_dir, playbook_dir, post};

fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::blocking::Client::new().get(format!("{url}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

/// Metric names with at least one sample in a text exposition.
fn names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| line.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

/// Every `custos_*` identifier in the dashboards' queries, with where it is used.
fn queried() -> Vec<(String, String)> {
    let dir = manifest_dir().join("dashboards");
    let mut found = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "json") {
            continue;
        }
        files += 1;
        let dashboard: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{} has no panels", path.display());
        for panel in panels {
            let targets = panel["targets"].as_array().unwrap();
            assert!(
                !targets.is_empty(),
                "{}: panel {} queries nothing",
                path.display(),
                panel["title"]
            );
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                let mut rest = expr;
                let mut any = false;
                while let Some(start) = rest.find("custos_") {
                    let name: String = rest[start..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[start + name.len()..];
                    found.push((name, format!("{} / {}", path.display(), panel["title"])));
                    any = true;
                }
                assert!(any, "{}: `{expr}` queries no Custos metric", path.display());
            }
        }
    }
    assert_eq!(files, 3, "pipeline health, fleet risk, response activity");
    found
}

#[test]
fn every_metric_a_dashboard_queries_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let playbooks = playbook_dir(
        dir.path(),
        "revoke.yml",
        "name: revoke-misuse\nmatch:\n  types: [credential_misuse]\nactions:\n  - revoke_agent: {}\n",
    );
    let playbooks_arg = playbooks.to_str().unwrap();
    let server = Server::start_with(
        &dir.path().join("store"),
        &["--no-shipped-playbooks", "--playbooks", playbooks_arg],
    );
    let (url, admin) = (server.url.clone(), server.token());
    let (status, answer) = post(
        &url,
        "/v1/tokens",
        Some(&admin),
        json!({"role": "auditor"}).to_string().into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201);
    let scraper = answer["token"].as_str().unwrap().to_owned();
    assert_eq!(scrape(&url, None).0, 401, "metrics need a token");

    // Traffic that moves every metric: accepted events, a reject, a finding that a
    // playbook acts on, a query.
    let key = AgentKey::from_seed(&[61; 32]);
    enroll(&url, &admin, key.did(), "eng");
    let mut signer = Signer::new(key.clone(), "eng");
    let results = send(&url, &mut signer, &[json!({"kind": "tool_call", "action": "search"})]);
    assert_eq!(results[0]["status"], "accepted");
    let mut stranger = Signer::new(AgentKey::from_seed(&[62; 32]), "eng");
    let results = send(&url, &mut stranger, &[json!({"kind": "tool_call"})]);
    assert_eq!(results[0]["reason"], "unknown_agent");
    send(
        &url,
        &mut signer,
        &[json!({"kind": "credential_use", "target": "cred-prod", "attrs": {"credential_owner": "did:key:z6MkOwner"}})],
    );
    wait_for("the revocation", || {
        let (_, agent) = crate::respond::get(&url, &format!("/v1/agents/{}", key.did()), &admin);
        agent["status"] == "revoked"
    });
    // Without a JSON content type the body is the SQL itself.
    let (status, _) = post(
        &url,
        "/v1/sql",
        Some(&admin),
        b"SELECT count(*) AS n FROM events".to_vec(),
    )
    .unwrap();
    assert_eq!(status, 200);

    let mut exposition = String::new();
    wait_for("a checkpoint covering the traffic", || {
        exposition = scrape(&url, Some(&scraper)).1;
        exposition
            .lines()
            .any(|line| line.starts_with("custos_checkpoint_size ") && line != "custos_checkpoint_size 0")
    });
    let exported = names(&exposition);
    for (name, panel) in queried() {
        assert!(
            exported.contains(&name),
            "{panel} queries `{name}`, which /metrics does not export:\n{exposition}"
        );
    }
    // The values reflect the traffic.
    for expected in [
        "custos_ingest_events_total{status=\"accepted\"} ",
        "custos_ingest_rejects_total{reason=\"unknown_agent\"} 1",
        "custos_actions_total{action=\"revoke_agent\",status=\"executed\"} 1",
        "custos_query_seconds_count{route=\"/v1/sql\",status=\"200\"} 1",
        "custos_approvals_pending 0",
    ] {
        assert!(exposition.contains(expected), "missing `{expected}` in:\n{exposition}");
    }
    let findings: u64 = exposition
        .lines()
        .filter(|line| line.starts_with("custos_findings_total{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(findings >= 1, "{exposition}");
    // Labels come from closed sets: nothing an agent wrote becomes a label value.
    assert!(
        !exposition.contains("cred-prod") && !exposition.contains("did:key"),
        "{exposition}"
    );
}
