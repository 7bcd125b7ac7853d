//! Enrollment, delegation, revocation cascade, and the admin API's guard rails.

use custos_event::{AgentKey, Kind, Signer};
use reqwest::Method;

use crate::support::{Node, event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_enrolls_children_and_revocation_cascades() {
    let node = Node::start().await;
    let mut parent = node.agent(1, "eng").await;
    let child_key = AgentKey::from_seed(&[2; 32]);
    let grandchild_key = AgentKey::from_seed(&[3; 32]);

    // An unenrolled agent cannot act, and cannot delegate.
    let mut child = Signer::new(child_key.clone(), "eng");
    assert_eq!(
        node.send_one(&child.clone().sign(event(Kind::ToolCall)))
            .await
            .reason
            .as_deref(),
        Some("unknown_agent")
    );

    let mut delegation = event(Kind::Delegation);
    delegation.target = Some(child_key.did().to_owned());
    let result = node.send_one(&parent.sign(delegation)).await;
    assert_eq!(result.status, "accepted");
    let delegation_index = result.log_index.unwrap();
    assert_eq!(
        node.send_one(&child.sign(event(Kind::ToolCall))).await.status,
        "accepted"
    );

    let mut grand = event(Kind::Delegation);
    grand.target = Some(grandchild_key.did().to_owned());
    assert_eq!(node.send_one(&child.sign(grand)).await.status, "accepted");
    let mut grandchild = Signer::new(grandchild_key.clone(), "eng");
    assert_eq!(
        node.send_one(&grandchild.sign(event(Kind::ToolCall))).await.status,
        "accepted"
    );

    let (status, record) = node
        .admin(Method::GET, &format!("/v1/agents/{}", child_key.did()), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(record["parent"], parent.did());
    assert_eq!(record["realm"], "eng");
    assert_eq!(record["enrolled_by"], "delegation");
    assert_eq!(record["enroll_log_index"], delegation_index + 1);
    assert_eq!(record["children"][0], grandchild_key.did());

    // A delegation target must be a did:key.
    let mut bad = event(Kind::Delegation);
    bad.target = Some("https://not-a-did".into());
    assert_eq!(
        node.send_one(&parent.sign(bad)).await.reason.as_deref(),
        Some("bad_payload")
    );

    let (status, revoked) = node
        .admin(
            Method::POST,
            &format!("/v1/agents/{}/revoke", parent.did()),
            Some(serde_json::json!({"reason": "test"})),
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    let revoked: Vec<&str> = revoked["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(revoked, vec![parent.did(), child_key.did(), grandchild_key.did()]);
    // Each is rejected from its very next event.
    for signer in [&mut parent, &mut child, &mut grandchild] {
        let result = node.send_one(&signer.sign(event(Kind::ToolCall))).await;
        assert_eq!(result.reason.as_deref(), Some("revoked_agent"), "{result:?}");
    }
    let (status, body) = node
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", child_key.did()), None)
        .await;
    assert_eq!((status, body["error"].as_str()), (409, Some("already_revoked")));
    let (_, list) = node.admin(Method::GET, "/v1/agents", None).await;
    let statuses: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["revoked"; 3]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_errors_name_the_bad_value() {
    let node = Node::start().await;
    let did = AgentKey::from_seed(&[1; 32]).did().to_owned();
    node.enroll(&did, "eng").await;
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/agents",
            Some(serde_json::json!({"did": did, "realm": "eng"})),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (409, Some("agent_exists")));
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/agents",
            Some(serde_json::json!({"did": "did:key:zNope", "realm": "eng"})),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_did")));
    assert!(body["message"].as_str().unwrap().contains("did:key:zNope"));
    let other = AgentKey::from_seed(&[2; 32]).did().to_owned();
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/agents",
            Some(serde_json::json!({"did": other, "realm": "no spaces"})),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_realm")));
    assert!(body["message"].as_str().unwrap().contains("no spaces"));
    let (status, _) = node
        .admin(
            Method::POST,
            "/v1/agents",
            Some(serde_json::json!({"did": other, "realm": "eng", "extra": 1})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, body) = node
        .admin(Method::POST, &format!("/v1/agents/{other}/revoke"), None)
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("unknown_agent")));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_checkpoint_verifies_with_the_published_key() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    for _ in 0..60 {
        node.send_one(&agent.sign(event(Kind::ToolCall))).await;
    }
    let (status, view) = node.admin(Method::GET, "/v1/checkpoints/latest", None).await;
    assert_eq!(status, 200, "{view}");
    let key = custos_store::checkpoint::NoteKey::parse_verifier(view["verifier_key"].as_str().unwrap()).unwrap();
    let published = std::fs::read_to_string(node.dir.path().join("logs/0/checkpoint.pub")).unwrap();
    assert_eq!(published.trim(), view["verifier_key"].as_str().unwrap());
    let checkpoint = custos_store::checkpoint::verify_checkpoint(view["note"].as_str().unwrap(), &key).unwrap();
    assert_eq!(checkpoint.size, view["size"].as_u64().unwrap());
    assert!(checkpoint.size >= 50, "a checkpoint every 50 entries");
    node.stop().await;
}
