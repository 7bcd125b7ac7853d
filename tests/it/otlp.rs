//! OTLP traces on one node: a span is stored once, whatever sends it again.

use serde_json::json;

use crate::cluster::{collector_token, post_otlp};
use crate::support::Server;

/// An OTLP/JSON body: `chat` spans of the service `planner` with `span_ids`, in one
/// trace, ended at `now` (Unix nanoseconds).
pub(crate) fn planner_spans(now: i64, span_ids: &[&str]) -> Vec<u8> {
    let spans: Vec<serde_json::Value> = span_ids
        .iter()
        .map(|span_id| {
            json!({"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": span_id, "name": "chat", "kind": 3,
                "startTimeUnixNano": (now - 1000).to_string(), "endTimeUnixNano": now.to_string(),
                "attributes": [{"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}}]})
        })
        .collect();
    json!({"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "planner"}}]},
        "scopeSpans": [{"spans": spans}]}]})
    .to_string()
    .into_bytes()
}

/// A node on the store `data`, its admin token, and a collector token for realm `eng`.
fn collecting(data: &std::path::Path) -> (Server, String, String) {
    let server = Server::start(data);
    let admin = server.token();
    let collector = collector_token(&server.url, &admin, "eng");
    (server, admin, collector)
}

/// The span ids of the attested `llm_call` events, in log order.
fn spans(url: &str, token: &str) -> Vec<String> {
    crate::cluster::sql(
        url,
        token,
        "SELECT span_id FROM events WHERE kind = 'llm_call' ORDER BY log_index",
    )
    .iter()
    .map(|row| row["span_id"].as_str().unwrap().to_owned())
    .collect()
}

/// An exporter's retry of a whole request (its answer was lost), one span sent twice in
/// one request, and the same request after the node was killed with SIGKILL and
/// restarted: each span is in the log once, and the node answers every one a success
/// (`duplicate`, not a rejection, in `custos_otlp_spans_total`).
#[test]
fn a_span_sent_again_is_stored_once_even_across_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let (server, admin, collector) = collecting(&data);
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let request = |span_ids: &[&str]| planner_spans(now, span_ids);
    let send = |url: &str, span_ids: &[&str]| {
        let (status, answer) = post_otlp(url, Some(&collector), request(span_ids)).unwrap();
        assert_eq!(status, 200, "{answer}");
        assert!(
            answer["partialSuccess"].is_null() || answer["partialSuccess"]["rejectedSpans"] == 0,
            "{answer}"
        );
    };
    let first = ["00f067aa0ba90401", "00f067aa0ba90402"];
    send(&server.url, &first);
    send(&server.url, &first);
    send(
        &server.url,
        &["00f067aa0ba90402", "00f067aa0ba90403", "00f067aa0ba90403"],
    );
    assert_eq!(
        spans(&server.url, &admin),
        ["00f067aa0ba90401", "00f067aa0ba90402", "00f067aa0ba90403"]
    );
    let (_, metrics) = {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}/metrics", server.url))
            .bearer_auth(&admin)
            .send()
            .unwrap();
        (response.status(), response.text().unwrap())
    };
    assert!(
        metrics.contains("custos_otlp_spans_total{outcome=\"duplicate\"} 4"),
        "{}",
        metrics
            .lines()
            .filter(|line| line.starts_with("custos_otlp"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Killed without a chance to save anything, then started again on the same data.
    server.kill();
    let server = Server::start(&data);
    send(&server.url, &first);
    send(&server.url, &["00f067aa0ba90404"]);
    assert_eq!(
        spans(&server.url, &admin),
        [
            "00f067aa0ba90401",
            "00f067aa0ba90402",
            "00f067aa0ba90403",
            "00f067aa0ba90404"
        ]
    );
    server.stop();
    let output = crate::support::run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stderr(&output));
}

/// How many batches the node has verified and appended (`custos_ingest_verify_seconds`
/// counts one per batch).
fn appends(url: &str, token: &str) -> u64 {
    let metrics = reqwest::blocking::Client::new()
        .get(format!("{url}/metrics"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("custos_ingest_verify_seconds_count "))
        .map_or(0, |count| count.trim().parse().unwrap())
}

/// The agents a request names for the first time are enrolled together, one delegation
/// each from the collector's key, and every agent's spans of a request are appended as
/// one batch: a request naming many agents costs two appends, not one per agent. Once
/// that key is revoked, a request naming a new agent is refused `adapter_refused`,
/// naming the agent; nothing of it is stored.
#[test]
fn new_agents_are_enrolled_together_and_a_revoked_collector_enrolls_none() {
    let dir = tempfile::tempdir().unwrap();
    let (server, admin, collector) = collecting(&dir.path().join("store"));
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let request = |agents: &[&str]| {
        let spans: Vec<serde_json::Value> = agents
            .iter()
            .enumerate()
            .map(|(index, agent)| {
                json!({"traceId": "4bf92f3577b34da6a3ce929d0e0e4736", "spanId": format!("{:016x}", index + 1),
                    "name": "chat", "kind": 3, "startTimeUnixNano": (now - 1000).to_string(),
                    "endTimeUnixNano": now.to_string(), "attributes": [
                        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
                        {"key": "gen_ai.agent.id", "value": {"stringValue": agent}}]})
            })
            .collect();
        json!({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": spans}]}]})
            .to_string()
            .into_bytes()
    };
    let before = appends(&server.url, &admin);
    let (status, answer) = post_otlp(&server.url, Some(&collector), request(&["planner", "coder", "critic"])).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        appends(&server.url, &admin) - before,
        2,
        "the delegations first, then the spans: {answer}"
    );
    let rows = crate::cluster::sql(
        &server.url,
        &admin,
        "SELECT parent, count(*) AS n FROM agents WHERE parent IS NOT NULL GROUP BY parent",
    );
    assert_eq!(rows.len(), 1, "one collector key delegates to all three: {rows:?}");
    assert_eq!(rows[0]["n"], 3, "{rows:?}");
    let root = rows[0]["parent"].as_str().unwrap().to_owned();
    // The three delegations come before every span: they were appended as one batch,
    // not one before each agent's span.
    let order: Vec<String> = crate::cluster::sql(
        &server.url,
        &admin,
        &format!(
            "SELECT kind FROM events WHERE (agent = '{root}' AND kind = 'delegation') OR kind = 'llm_call' ORDER BY log_index"
        ),
    )
    .iter()
    .map(|row| row["kind"].as_str().unwrap().to_owned())
    .collect();
    assert_eq!(
        order,
        [
            "delegation",
            "delegation",
            "delegation",
            "llm_call",
            "llm_call",
            "llm_call"
        ]
    );

    // Known agents, one of them named twice in the request: one append, and its chain
    // runs through both of its spans.
    let before = appends(&server.url, &admin);
    let (status, answer) = post_otlp(
        &server.url,
        Some(&collector),
        request(&["critic", "planner", "coder", "planner", "reviewer"]),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        appends(&server.url, &admin) - before,
        2,
        "one new agent's delegation, then every span"
    );
    let before = appends(&server.url, &admin);
    let (status, answer) = post_otlp(&server.url, Some(&collector), request(&["coder", "critic", "planner"])).unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        appends(&server.url, &admin) - before,
        1,
        "known agents only: one append"
    );
    let mut counts: Vec<i64> = crate::cluster::sql(
        &server.url,
        &admin,
        "SELECT agent, count(*) AS n FROM events WHERE kind = 'llm_call' GROUP BY agent",
    )
    .iter()
    .map(|row| row["n"].as_i64().unwrap())
    .collect();
    counts.sort();
    assert_eq!(counts, [1, 3, 3, 4], "reviewer, coder, critic, planner");

    let revoked = reqwest::blocking::Client::new()
        .post(format!("{}/v1/agents/{root}/revoke", server.url))
        .bearer_auth(&admin)
        .json(&json!({"reason": "collector token leaked"}))
        .send()
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200);
    let before = crate::cluster::sql(&server.url, &admin, "SELECT count(*) AS n FROM agents")[0]["n"].clone();
    let (status, answer) = post_otlp(&server.url, Some(&collector), request(&["planner", "newcomer"])).unwrap();
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("adapter_refused")),
        "{answer}"
    );
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("`newcomer`") && message.contains(&root), "{answer}");
    assert_eq!(
        crate::cluster::sql(&server.url, &admin, "SELECT count(*) AS n FROM agents")[0]["n"],
        before,
        "no agent was enrolled"
    );
    server.stop();
    let data = dir.path().join("store");
    let output = crate::support::run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stderr(&output));
}

/// A request the node could not keep (its agent's pending file cannot be written) is
/// answered with an error, and the agent's chain does not run past what it signed for
/// it: the next request continues the chain from what was kept, without a gap.
#[test]
fn a_request_that_could_not_be_kept_leaves_no_gap_in_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let (server, admin, collector) = collecting(&data);
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let request = |span_id: &str| planner_spans(now, &[span_id]);
    let (status, answer) = post_otlp(&server.url, Some(&collector), request("00f067aa0ba90501")).unwrap();
    assert_eq!(status, 200, "{answer}");
    let agent =
        crate::cluster::sql(&server.url, &admin, "SELECT agent FROM events WHERE kind = 'llm_call'")[0]["agent"]
            .as_str()
            .unwrap()
            .to_owned();
    // Where the agent's pending envelopes are written first: a directory in the way
    // makes that write fail (as a full or failing disk would), whoever runs the test.
    let stem = agent.trim_start_matches("did:key:");
    let chain = walk(&data.join("attest"))
        .into_iter()
        .find(|path| path.file_name().and_then(|name| name.to_str()) == Some(&format!("{stem}.chain.json")))
        .expect("the agent's chain file");
    let blocker = chain.with_file_name(format!("{stem}.pending.ndjson.tmp"));
    std::fs::create_dir(&blocker).unwrap();
    let (status, answer) = post_otlp(&server.url, Some(&collector), request("00f067aa0ba90502")).unwrap();
    assert_eq!(status, 503, "{answer}");
    std::fs::remove_dir(&blocker).unwrap();
    for span_id in ["00f067aa0ba90503", "00f067aa0ba90502"] {
        let (status, answer) = post_otlp(&server.url, Some(&collector), request(span_id)).unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let rows = crate::cluster::sql(
        &server.url,
        &admin,
        "SELECT span_id, seq, gap_from FROM events WHERE kind = 'llm_call' ORDER BY log_index",
    );
    let found: Vec<(&str, u64)> = rows
        .iter()
        .map(|row| (row["span_id"].as_str().unwrap(), row["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        found,
        [
            ("00f067aa0ba90501", 0),
            ("00f067aa0ba90503", 1),
            ("00f067aa0ba90502", 2)
        ],
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|row| row["gap_from"].is_null()),
        "no chain gap: {rows:?}"
    );
    server.stop();
    let output = crate::support::run(&["verify", data.to_str().unwrap(), "--signatures"]);
    assert!(output.status.success(), "{}", crate::support::stderr(&output));
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        match path.is_dir() {
            true => found.extend(walk(&path)),
            false => found.push(path),
        }
    }
    found
}
