//! Every reason code, through the real HTTP path, and kept for forensics.

use std::collections::BTreeSet;

use custos_event::{AgentKey, Kind, Reason};
use custos_ingest::samples::{Actors, Expect, cases};

use crate::support::{Node, event, ndjson};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_code_is_produced_and_kept() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let history: Vec<_> = (0..40).map(|_| agent.sign(event(Kind::ToolCall))).collect();
    for result in node.send(ndjson(&history)).await {
        assert_eq!(result.status, "accepted", "{result:?}");
    }
    let mut revoked = node.agent(2, "eng").await;
    node.send_one(&revoked.sign(event(Kind::ToolCall))).await;
    let (status, _) = node
        .admin(
            reqwest::Method::POST,
            &format!("/v1/agents/{}/revoke", revoked.did()),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let stranger = AgentKey::from_seed(&[3; 32]);

    let crafted = cases(
        Actors {
            agent: &mut agent,
            first: &history[0],
            last: history.last().unwrap(),
            stranger: &stranger,
            revoked: &mut revoked,
            max_event_bytes: node.config.max_event_bytes,
        },
        chrono::Utc::now(),
    );
    let mut produced = BTreeSet::new();
    for case in &crafted {
        let result = node.send(case.body.clone()).await.remove(0);
        match case.expect {
            Expect::Rejected(reason) => {
                assert_eq!(result.status, "rejected", "{}: {result:?}", case.name);
                assert_eq!(
                    result.reason.as_deref(),
                    Some(reason.code()),
                    "{}: {result:?}",
                    case.name
                );
                assert!(result.message.as_ref().is_some_and(|m| !m.is_empty()), "{}", case.name);
                assert_eq!(result.log_index, None);
                produced.insert(reason);
            }
            Expect::Duplicate => {
                assert_eq!(result.status, "duplicate", "{}: {result:?}", case.name);
                // The original's index: 40 events after the two enrollments... found by seq.
                assert!(result.log_index.is_some());
            }
            Expect::Gap => {
                assert_eq!(result.status, "accepted", "{}: {result:?}", case.name);
                assert_eq!(result.flags, vec!["chain_gap".to_owned()]);
                let [from, to] = result.missing.unwrap();
                assert_eq!(to - from, 4, "{result:?}");
            }
        }
    }
    // The adapters' own reasons are produced by their tests (tests/it/lastid.rs,
    // tests/it/vaultysclaw.rs).
    let all: BTreeSet<Reason> = Reason::ALL
        .into_iter()
        .filter(|reason| !Reason::ADAPTERS.contains(reason))
        .collect();
    assert_eq!(produced, all, "every reason code must have a case");

    // Every rejection is kept, with its reason, and fork evidence holds both digests.
    let (status, body) = node.admin(reqwest::Method::GET, "/v1/rejected?limit=1000", None).await;
    assert_eq!(status, 200);
    let kept: BTreeSet<String> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["reason"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = all.iter().map(|reason| reason.code().to_owned()).collect();
    assert_eq!(kept, expected);
    let (_, forks) = node
        .admin(reqwest::Method::GET, "/v1/rejected?reason=chain_fork", None)
        .await;
    let evidence = &forks["rejected"][0]["evidence"];
    assert_eq!(evidence["seq"], 39);
    assert_ne!(evidence["accepted_blake3"], evidence["rejected_blake3"]);
    assert_eq!(evidence["accepted_blake3"].as_str().unwrap().len(), 64);
    let (status, _) = node
        .admin(reqwest::Method::GET, "/v1/rejected?reason=nonsense", None)
        .await;
    assert_eq!(status, 400);
    node.stop().await;
}

/// The package's directory as cargo gives it to the running test, so a test binary that
/// cargo reuses from another checkout of the same tree reads this checkout's files.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

#[test]
fn every_reason_code_is_documented() {
    let docs = std::fs::read_to_string(manifest_dir().join("../docs/reason-codes.md")).unwrap();
    for reason in Reason::ALL {
        assert!(
            docs.contains(&format!("| `{}` |", reason.code())),
            "`{}` is not in docs/reason-codes.md",
            reason.code()
        );
    }
}
