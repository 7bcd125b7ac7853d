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

/// The metric line `custos_writer_control_waits_total{outcome="…"}` of the node.
async fn control_waits(node: &Node, outcome: &str) -> u64 {
    let (status, body) = node.admin(Method::GET, "/metrics", None).await;
    assert_eq!(status, 200);
    let text = body.as_str().unwrap().to_owned();
    let prefix = format!("custos_writer_control_waits_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// On a writer bridged to Kafka, an enrollment, a revocation and a LastID enrollment are
/// answered only once their control record is on the brokers (as the bridge reports),
/// so an ingest node reading the control topic after the answer knows the change; when
/// the brokers do not take it within a second, they are answered anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_are_answered_once_their_control_record_is_published() {
    use custos_ingest::registry::{ControlLink, Published};
    let (notes, noted) = std::sync::mpsc::channel();
    let (reach, published) = tokio::sync::watch::channel(Published::default());
    let hooks = custos_ingest::Hooks {
        control: Some(ControlLink { notes, published }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::config(dir.path());
    let node = std::sync::Arc::new(Node::start_hooked(dir, config, hooks).await);
    let enroll = |seed: u8| {
        let node = node.clone();
        tokio::spawn(async move {
            let did = AgentKey::from_seed(&[seed; 32]).did().to_owned();
            let body = serde_json::json!({"did": did, "realm": "eng"});
            node.admin(Method::POST, "/v1/agents", Some(body)).await
        })
    };
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(300));

    // Not answered while its record is not out; answered once the bridge says it is.
    let first = enroll(1);
    settle().await;
    assert!(
        !first.is_finished(),
        "an enrollment was answered before its control record was published"
    );
    reach.send_modify(|published| published.entries = u64::MAX);
    let (status, record) = first.await.unwrap();
    assert_eq!(status, 201, "{record}");
    let index = record["enroll_log_index"].as_u64().unwrap();

    // Records published up to, but not including, the new entry do not answer it.
    reach.send_modify(|published| published.entries = index + 1);
    let second = enroll(2);
    settle().await;
    assert!(!second.is_finished(), "answered on an earlier entry's publication");
    reach.send_modify(|published| published.entries = index + 2);
    let (status, record) = second.await.unwrap();
    assert_eq!(status, 201, "{record}");
    assert_eq!(record["enroll_log_index"].as_u64(), Some(index + 1));

    // A revocation, likewise.
    let did = AgentKey::from_seed(&[2; 32]).did().to_owned();
    let revoke = {
        let node = node.clone();
        tokio::spawn(async move {
            node.admin(Method::POST, &format!("/v1/agents/{did}/revoke"), None)
                .await
        })
    };
    settle().await;
    assert!(
        !revoke.is_finished(),
        "a revocation was answered before its control record was published"
    );
    reach.send_modify(|published| published.entries = u64::MAX);
    let (status, revoked) = revoke.await.unwrap();
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(control_waits(&node, "in_time").await, 3);

    // A LastID enrollment waits for its note.
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    let lastid = {
        let node = node.clone();
        let body = serde_json::json!({"did": "did:lastid:agent:ops-bot", "realm": "ops",
            "source": "lastid", "public_key": hex::encode(key.as_bytes())});
        tokio::spawn(async move { node.admin(Method::POST, "/v1/agents", Some(body)).await })
    };
    settle().await;
    assert!(
        !lastid.is_finished(),
        "a LastID enrollment was answered before its record was published"
    );
    let (key_name, _) = noted.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(key_name, "lastid:did:lastid:agent:ops-bot");
    reach.send_modify(|published| published.notes = 1);
    let (status, answer) = lastid.await.unwrap();
    assert_eq!(status, 201, "{answer}");

    // Brokers that do not take it: answered anyway after the wait, and counted late.
    reach.send_modify(|published| published.entries = 0);
    let late = enroll(3);
    let (status, record) = late.await.unwrap();
    assert_eq!(status, 201, "{record}");
    assert_eq!(control_waits(&node, "late").await, 1);
    assert_eq!(control_waits(&node, "in_time").await, 4);
}
