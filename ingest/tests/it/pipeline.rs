//! Batches: one bad input never fails its neighbours; both body forms; limits; concurrency.

use custos_event::Kind;

use crate::support::{Node, event, ndjson};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_event_never_fails_its_batch() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let first = agent.sign(event(Kind::ToolCall));
    let mut forged = agent.sign(event(Kind::LlmCall));
    forged.sig[0] ^= 1;
    let third = agent.sign(event(Kind::ToolResult));
    // NDJSON with a garbage line in the middle too.
    let mut body = ndjson(&[first.clone(), forged]);
    body.extend_from_slice(b"\nnot json at all\n");
    body.extend_from_slice(third.to_json().as_bytes());
    let results = node.send(body).await;
    let statuses: Vec<(&str, Option<&str>)> = results
        .iter()
        .map(|r| (r.status.as_str(), r.reason.as_deref()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("accepted", None),
            ("rejected", Some("bad_signature")),
            ("rejected", Some("malformed")),
            // The forged seq 1 never landed, so seq 2 arrives as a gap.
            ("accepted", None),
        ]
    );
    assert_eq!(results[3].flags, vec!["chain_gap".to_owned()]);
    assert_eq!(results[3].missing, Some([1, 1]));
    assert_eq!(results.iter().map(|r| r.index).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_arrays_url_safe_base64_and_whole_request_errors() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let envelopes: Vec<_> = (0..3).map(|_| agent.sign(event(Kind::ToolCall))).collect();
    let mut array: Vec<serde_json::Value> = envelopes
        .iter()
        .map(|e| serde_json::from_str(&e.to_json()).unwrap())
        .collect();
    // DSSE allows URL-safe unpadded base64: re-encode the second one that way.
    {
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&envelopes[1].payload);
        array[1]["payload"] = payload.into();
    }
    let results = node.send(serde_json::to_vec(&array).unwrap()).await;
    assert!(results.iter().all(|r| r.status == "accepted"), "{results:?}");
    let indexes: Vec<u64> = results.iter().map(|r| r.log_index.unwrap()).collect();
    assert_eq!(indexes[1], indexes[0] + 1);
    assert_eq!(indexes[2], indexes[1] + 1);

    let (status, body) = node.request(reqwest::Method::POST, "/v1/events", None, None).await;
    assert_eq!(status, 200, "an empty body is an empty batch: {body}");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/events", node.url))
        .body("[{\"payloadType\": 1},")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "malformed");
    let (_, kept) = node
        .admin(reqwest::Method::GET, "/v1/rejected?reason=malformed", None)
        .await;
    assert_eq!(kept["rejected"].as_array().unwrap().len(), 1);
    // A body that is not UTF-8 and longer than a record keeps: the record names the
    // whole body (its size and blake3) and keeps its first 64 KiB as base64.
    let mut binary = b"[".to_vec();
    binary.extend((0..100 * 1024).map(|n| 0x80 | (n % 128) as u8));
    let response = reqwest::Client::new()
        .post(format!("{}/v1/events", node.url))
        .body(binary.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let (_, kept) = node
        .admin(reqwest::Method::GET, "/v1/rejected?reason=malformed", None)
        .await;
    let record = kept["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|record| record["input_encoding"] == "base64")
        .unwrap_or_else(|| panic!("the binary body is kept: {kept}"))
        .clone();
    assert_eq!(record["size"], binary.len(), "{record}");
    assert_eq!(record["blake3"], blake3::hash(&binary).to_hex().as_str(), "{record}");
    assert_eq!(record["truncated"], true);
    let input = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(record["input"].as_str().unwrap())
            .unwrap()
    };
    assert_eq!(input, binary[..custos_store::forensics::MAX_KEPT_BYTES]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_events_in_one_request_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::config(dir.path());
    config.max_events_per_request = 5;
    let node = Node::start_in(dir, config).await;
    let mut agent = node.agent(1, "eng").await;
    let envelopes: Vec<_> = (0..6).map(|_| agent.sign(event(Kind::ToolCall))).collect();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/events", node.url))
        .body(ndjson(&envelopes))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "too_many_events");
    assert!(body["message"].as_str().unwrap().contains('6'));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_unique_contiguous_indexes() {
    let node = std::sync::Arc::new(Node::start().await);
    let mut agents = Vec::new();
    for seed in 1..=6u8 {
        agents.push(node.agent(seed, "eng").await);
    }
    let mut tasks = Vec::new();
    for mut agent in agents {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut indexes = Vec::new();
            for _ in 0..5 {
                let batch: Vec<_> = (0..20).map(|_| agent.sign(event(Kind::ToolCall))).collect();
                for result in node.send(ndjson(&batch)).await {
                    assert_eq!(result.status, "accepted", "{result:?}");
                    indexes.push(result.log_index.unwrap());
                }
            }
            indexes
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    // Six enrollments come first (indexes 0..6), then 600 events with no hole or repeat.
    assert_eq!(all, (6..606).collect::<Vec<u64>>());
    let node = std::sync::Arc::into_inner(node).unwrap();
    let (dir, _) = node.stop().await;
    let report = custos_store::verify::verify_store(
        dir.path(),
        &custos_store::verify::VerifyOptions {
            signatures: true,
            log_key: None,
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.logs[0].entries, 606);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_everything_else_needs_a_token() {
    let node = Node::start().await;
    assert_eq!(node.request(reqwest::Method::GET, "/healthz", None, None).await.0, 200);
    assert_eq!(node.request(reqwest::Method::GET, "/readyz", None, None).await.0, 200);
    for (method, path) in [
        (reqwest::Method::GET, "/v1/agents"),
        (reqwest::Method::POST, "/v1/agents"),
        (reqwest::Method::GET, "/v1/rejected"),
        (reqwest::Method::GET, "/v1/checkpoints/latest"),
        (reqwest::Method::POST, "/v1/agents/did:key:z6Mkx/revoke"),
    ] {
        let (status, body) = node.request(method.clone(), path, None, None).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        let (status, _) = node
            .request(method.clone(), path, Some("cus_not-a-real-token"), None)
            .await;
        assert_eq!(status, 401, "{method} {path} with a bad token");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forensics_stay_bounded_in_records_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::config(dir.path());
    config.rejected_max_records = 10;
    config.rejected_max_bytes = 1 << 20;
    let node = Node::start_in(dir, config).await;
    // 30 rejected inputs in 30 requests: only the newest 10 or fewer are kept.
    for n in 0..30 {
        node.send(format!("{{\"junk\": {n}}}")).await;
    }
    let (_, body) = node.admin(reqwest::Method::GET, "/v1/rejected?limit=1000", None).await;
    let kept = body["rejected"].as_array().unwrap();
    assert!(kept.len() <= 10 && kept.len() >= 5, "{}", kept.len());
    assert!(kept[0]["input"].as_str().unwrap().contains("29"), "newest first");
    // Large inputs are cut at 64 KiB each, and the byte bound rotates files early.
    let big = format!("{{\"junk\": \"{}\"}}", "x".repeat(300_000));
    for _ in 0..20 {
        node.send(big.clone()).await;
    }
    let total: u64 = std::fs::read_dir(node.dir.path().join("rejected"))
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= (1 << 20) + 2 * 65_536 * 2, "{total} bytes kept");
    let (_, body) = node.admin(reqwest::Method::GET, "/v1/rejected?limit=1", None).await;
    assert_eq!(body["rejected"][0]["truncated"], true);
    assert_eq!(body["rejected"][0]["reason"], "too_large");
    node.stop().await;
}
