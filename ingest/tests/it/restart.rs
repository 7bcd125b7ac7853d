//! State survives a clean restart: registry, chains, duplicates, tokens.

use custos_event::Kind;
use reqwest::Method;

use crate::support::{Node, event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_chains_survive_a_restart() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let mut revoked = node.agent(2, "ops").await;
    let envelopes: Vec<_> = (0..250).map(|_| agent.sign(event(Kind::ToolCall))).collect();
    for chunk in envelopes.chunks(50) {
        node.send(crate::support::ndjson(chunk)).await;
    }
    node.send_one(&revoked.sign(event(Kind::ToolCall))).await;
    node.admin(Method::POST, &format!("/v1/agents/{}/revoke", revoked.did()), None)
        .await;
    let (dir, config) = node.stop().await;
    assert!(dir.path().join("logs/0/segments").read_dir().unwrap().next().is_some());

    let node = Node::start_in(dir, config).await;
    assert!(
        node.running.as_ref().unwrap().admin_token.is_none(),
        "the admin token is created once"
    );
    let last = envelopes.last().unwrap();
    let result = node.send_one(last).await;
    assert_eq!(result.status, "duplicate", "{result:?}");
    assert_eq!(result.log_index, Some(251));
    assert_eq!(
        node.send_one(&agent.sign(event(Kind::ToolCall))).await.status,
        "accepted"
    );
    let result = node.send_one(&revoked.sign(event(Kind::ToolCall))).await;
    assert_eq!(result.reason.as_deref(), Some("revoked_agent"));
    let (_, record) = node
        .admin(Method::GET, &format!("/v1/agents/{}", agent.did()), None)
        .await;
    assert_eq!(record["events"], 251);
    let (dir, _) = node.stop().await;
    let report = custos_store::verify::verify_store(dir.path(), &Default::default(), &mut |_, _| {}).unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_the_same_store_is_refused() {
    let node = Node::start().await;
    let second = custos_ingest::start(crate::support::config(node.dir.path())).await;
    let error = second.err().expect("a second writer must be refused");
    assert!(error.to_string().contains("in use by another running"), "{error}");
    let (dir, config) = node.stop().await;
    // Once the first has stopped, the store opens again.
    let node = Node::start_in(dir, config).await;
    node.stop().await;
}

/// A node refuses to start on a manifest or checkpoint file edited after the fact, naming
/// the file and line, as `custos verify` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_edited_manifest_and_checkpoint_lines() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let envelopes: Vec<_> = (0..450).map(|_| agent.sign(event(Kind::ToolCall))).collect();
    for chunk in envelopes.chunks(50) {
        node.send(crate::support::ndjson(chunk)).await;
    }
    let (dir, config) = node.stop().await;
    let log = dir.path().join("logs/0");
    let manifest = log.join("segments.ndjson");
    let checkpoints = log.join("checkpoints.ndjson");
    let original_manifest = std::fs::read_to_string(&manifest).unwrap();
    let original_checkpoints = std::fs::read_to_string(&checkpoints).unwrap();

    let refused = |config: custos_ingest::NodeConfig| async move {
        match custos_ingest::start(config).await {
            Ok(_) => panic!("the node started on an edited store"),
            Err(error) => error.to_string(),
        }
    };
    // A segment's end moved (signed, and not otherwise cross-checked at start).
    let first_line = original_manifest.lines().next().unwrap();
    let info: serde_json::Value = serde_json::from_str(first_line).unwrap();
    let end = info["end_index"].as_u64().unwrap();
    let edited = original_manifest.replacen(
        &format!("\"end_index\":{end}"),
        &format!("\"end_index\":{}", end + 1),
        1,
    );
    assert_ne!(edited, original_manifest);
    std::fs::write(&manifest, edited).unwrap();
    let error = refused(config.clone()).await;
    assert!(error.contains("segments.ndjson") && error.contains("line 1"), "{error}");
    assert!(error.contains("not signed by the log key"), "{error}");
    std::fs::write(&manifest, &original_manifest).unwrap();

    // An earlier checkpoint line's size edited (its signed note unchanged).
    let lines: Vec<&str> = original_checkpoints.lines().collect();
    let line: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    let size = line["size"].as_u64().unwrap();
    let edited = original_checkpoints.replacen(&format!("{{\"size\":{size},"), &format!("{{\"size\":{},", size + 7), 1);
    assert_ne!(edited, original_checkpoints);
    std::fs::write(&checkpoints, edited).unwrap();
    let error = refused(config.clone()).await;
    assert!(
        error.contains("checkpoints.ndjson") && error.contains("line 2"),
        "{error}"
    );
    assert!(error.contains(&format!("says size {}", size + 7)), "{error}");
    std::fs::write(&checkpoints, &original_checkpoints).unwrap();

    // Put back, it starts.
    let node = Node::start_in(dir, config).await;
    node.stop().await;
}

/// A restart reads the tree and the registry from their signed caches; damaged caches
/// are rebuilt from the log (the answers do not change), and a log shorter than the
/// caches say is refused: entries were deleted from its tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_speed_the_restart_and_catch_a_shortened_log() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let envelopes: Vec<_> = (0..650).map(|_| agent.sign(event(Kind::ToolCall))).collect();
    for chunk in envelopes.chunks(50) {
        node.send(crate::support::ndjson(chunk)).await;
    }
    let (dir, config) = node.stop().await;
    let log = dir.path().join("logs/0");
    assert!(log.join("tree/index.json").exists());
    assert!(dir.path().join("state/registry.json").exists());

    let node = Node::start_in(dir, config).await;
    let root = expect_state(&node, agent.did(), envelopes.last().unwrap()).await;
    let (dir, config) = node.stop().await;

    // Damaged caches: a flipped hash, a snapshot byte changed. Rebuilt; same answers.
    let level = log.join("tree/level-00");
    let mut bytes = std::fs::read(&level).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&level, bytes).unwrap();
    let snapshot = dir.path().join("state/registry.json");
    let text = std::fs::read_to_string(&snapshot).unwrap();
    std::fs::write(&snapshot, text.replacen("\"events\":650", "\"events\":999", 1)).unwrap();
    let node = Node::start_in(dir, config).await;
    assert_eq!(expect_state(&node, agent.did(), envelopes.last().unwrap()).await, root);
    let (dir, config) = node.stop().await;
    let report = custos_store::verify::verify_store(dir.path(), &Default::default(), &mut |_, _| {}).unwrap();
    assert!(report.ok(), "{:#?}", report.problems);

    // A sealed segment edited: the start does not read it (the caches cover it), the
    // background audit reports it.
    let manifest = std::fs::read_to_string(log.join("segments.ndjson")).unwrap();
    let first: serde_json::Value = serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
    let segment = log.join("segments").join(first["file"].as_str().unwrap());
    let original = std::fs::read(&segment).unwrap();
    let mut edited = original.clone();
    let middle = edited.len() / 2;
    edited[middle] ^= 0x20;
    std::fs::write(&segment, &edited).unwrap();
    let before = custos_http::metrics::STORE_ERRORS.with_label_values(&["audit"]).get();
    let node = Node::start_in(dir, config).await;
    let started = std::time::Instant::now();
    while custos_http::metrics::STORE_ERRORS.with_label_values(&["audit"]).get() == before {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the audit never reported the edit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_dir, config) = node.stop().await;
    std::fs::write(&segment, &original).unwrap();

    // The tail deleted: the last segment, its manifest line, the checkpoints past it.
    let manifest = std::fs::read_to_string(log.join("segments.ndjson")).unwrap();
    let mut lines: Vec<&str> = manifest.lines().collect();
    let last: serde_json::Value = serde_json::from_str(lines.pop().unwrap()).unwrap();
    std::fs::remove_file(log.join("segments").join(last["file"].as_str().unwrap())).unwrap();
    std::fs::write(log.join("segments.ndjson"), lines.join("\n") + "\n").unwrap();
    let kept_end = last["first_index"].as_u64().unwrap();
    let checkpoints = std::fs::read_to_string(log.join("checkpoints.ndjson")).unwrap();
    let kept: Vec<&str> = checkpoints
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["size"]
                .as_u64()
                .unwrap()
                <= kept_end
        })
        .collect();
    std::fs::write(log.join("checkpoints.ndjson"), kept.join("\n") + "\n").unwrap();
    let error = match custos_ingest::start(config).await {
        Ok(_) => panic!("the node started on a log whose tail was deleted"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("deleted"), "{error}");
}

/// What `caches_speed_the_restart_and_catch_a_shortened_log` expects after each start;
/// returns the latest checkpoint's root.
async fn expect_state(node: &Node, did: &str, last: &custos_event::Envelope) -> String {
    let (status, record) = node.admin(Method::GET, &format!("/v1/agents/{did}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(record["events"], 650);
    assert_eq!(node.send_one(last).await.status, "duplicate");
    let (_, checkpoint) = node.admin(Method::GET, "/v1/checkpoints/latest", None).await;
    checkpoint["root"].as_str().unwrap().to_owned()
}
