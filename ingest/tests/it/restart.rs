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
