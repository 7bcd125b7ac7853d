//! Chain rules at their edges: seqs with no successor, resends and forks at any depth,
//! duplicate keys, and a property test that whatever the node accepts verifies.

use custos_event::{AgentKey, ChainState, Envelope, Kind, Signer};
use reqwest::Method;

use crate::support::{Node, event, ndjson};

fn verify(dir: &std::path::Path) {
    let report = custos_store::verify::verify_store(dir, &Default::default(), &mut |_, _| {}).unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
}

/// A signer for `key` positioned at `next_seq` after `prev`.
fn at(key: &AgentKey, next_seq: u64, prev: Option<String>) -> Signer {
    Signer::resume(key.clone(), "eng", ChainState { next_seq, prev })
}

fn prev_of(envelope: &Envelope) -> Option<String> {
    Some(custos_event::blake3_hex(&envelope.payload))
}

/// `seq = 2^64 - 1` would leave the head with no successor: the node refuses it as a bad
/// payload, and the agent's chain checks keep working after the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_with_no_successor_is_refused_and_the_chain_still_holds() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let first = agent.sign(event(Kind::ToolCall));
    assert_eq!(node.send_one(&first).await.status, "accepted");

    let last = at(agent.key(), u64::MAX, prev_of(&first)).sign(event(Kind::ToolCall));
    let result = node.send_one(&last).await;
    assert_eq!(result.reason.as_deref(), Some("bad_payload"), "{result:?}");
    assert!(result.message.unwrap().contains("no successor"));

    // The largest seq that has a successor is accepted (a recorded gap)...
    let mut high = at(agent.key(), u64::MAX - 1, prev_of(&first));
    let near_end = high.sign(event(Kind::ToolCall));
    let result = node.send_one(&near_end).await;
    assert_eq!(result.status, "accepted", "{result:?}");
    assert_eq!(result.missing, Some([1, u64::MAX - 2]));
    // ...and then nothing can follow it, nor be stored twice, nor go backwards.
    let result = node.send_one(&high.sign(event(Kind::ToolCall))).await;
    assert_eq!(result.reason.as_deref(), Some("bad_payload"), "{result:?}");
    assert_eq!(node.send_one(&near_end).await.status, "duplicate");
    let mut other = event(Kind::FileRead);
    other.target = Some("/etc/shadow".into());
    let fork = at(agent.key(), u64::MAX - 1, prev_of(&first)).sign(other);
    assert_eq!(node.send_one(&fork).await.reason.as_deref(), Some("chain_fork"));
    let backwards = at(agent.key(), 1, prev_of(&first)).sign(event(Kind::ToolCall));
    assert_eq!(node.send_one(&backwards).await.reason.as_deref(), Some("replay"));
    assert_eq!(node.send_one(&first).await.status, "duplicate");

    let (dir, _) = node.stop().await;
    verify(dir.path());
}

/// A resend of any stored event is `duplicate` with the original's log index, however
/// old; a different payload at an old seq is `chain_fork` with both digests kept; a seq
/// that was never stored (a recorded gap) is `replay`. The same after a restart, when
/// nothing of the old chain is in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_and_forks_are_told_apart_at_any_depth() {
    let node = Node::start().await;
    let mut agent = node.agent(1, "eng").await;
    let mut neighbour = node.agent(2, "eng").await;
    let mut envelopes = Vec::new();
    let mut indexes = Vec::new();
    // 600 events, interleaved with another agent's, so several segments are sealed.
    for round in 0..12 {
        let mine: Vec<_> = (0..50).map(|_| agent.sign(event(Kind::ToolCall))).collect();
        let theirs: Vec<_> = (0..20).map(|_| neighbour.sign(event(Kind::LlmCall))).collect();
        let mut body = mine.clone();
        body.extend(theirs);
        let results = node.send(ndjson(&body)).await;
        for result in &results[..50] {
            assert_eq!(result.status, "accepted", "round {round}: {result:?}");
            indexes.push(result.log_index.unwrap());
        }
        envelopes.extend(mine);
        if round == 2 {
            // A gap early on: seqs 151..=152 never arrive.
            let state = agent.chain().clone();
            agent = at(agent.key(), state.next_seq + 2, state.prev.clone());
            let skipped = agent.sign(event(Kind::ToolCall));
            let result = node.send_one(&skipped).await;
            assert_eq!(result.missing, Some([150, 151]), "{result:?}");
            indexes.push(result.log_index.unwrap());
            envelopes.push(skipped);
        }
    }
    let segments = std::fs::read_dir(node.dir.path().join("logs/0/segments"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|ext| ext == "parquet")
        })
        .count();
    assert!(segments >= 3, "{segments} segments");

    check(&node, &envelopes, &indexes, agent.key()).await;
    let (_, forks) = node.admin(Method::GET, "/v1/rejected?reason=chain_fork", None).await;
    let evidence = &forks["rejected"][0]["evidence"];
    assert_eq!(evidence["seq"], 5);
    assert_eq!(evidence["accepted_log_index"], indexes[5]);
    assert_eq!(
        evidence["accepted_blake3"],
        custos_event::blake3_hex(&envelopes[5].payload)
    );
    assert_ne!(evidence["accepted_blake3"], evidence["rejected_blake3"]);

    let (dir, config) = node.stop().await;
    let node = Node::start_in(dir, config).await;
    check(&node, &envelopes, &indexes, agent.key()).await;
    // An index damaged or deleted is rebuilt from the segment, and answers the same.
    let segment_dir = node.dir.path().join("logs/0/segments");
    for entry in std::fs::read_dir(&segment_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "seqs") {
            std::fs::write(&path, b"garbage").unwrap();
        }
    }
    check(&node, &envelopes, &indexes, agent.key()).await;
    let (dir, _) = node.stop().await;
    verify(dir.path());
}

/// The old-seq answers `resends_and_forks_are_told_apart_at_any_depth` expects.
async fn check(node: &Node, envelopes: &[Envelope], indexes: &[u64], key: &AgentKey) {
    for position in [0usize, 1, 77, 149, 150, 300, 599] {
        let result = node.send_one(&envelopes[position]).await;
        assert_eq!(result.status, "duplicate", "position {position}: {result:?}");
        assert_eq!(result.log_index, Some(indexes[position]), "position {position}");
    }
    // A cloned key writing into the past.
    let mut forged = event(Kind::CredentialUse);
    forged.target = Some("vault://prod/root".into());
    let fork = at(key, 5, prev_of(&envelopes[4])).sign(forged);
    let result = node.send_one(&fork).await;
    assert_eq!(result.reason.as_deref(), Some("chain_fork"), "{result:?}");
    assert!(result.message.unwrap().contains(&format!("log index {}", indexes[5])));
    // A seq in the early gap turning up late.
    let late = at(key, 150, prev_of(&envelopes[149])).sign(event(Kind::ToolCall));
    let result = node.send_one(&late).await;
    assert_eq!(result.reason.as_deref(), Some("replay"), "{result:?}");
}

/// One key twice in `attrs`, at any depth: the signed bytes would hold both values and
/// two readers could see two different events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_attribute_keys_are_refused() {
    let node = Node::start().await;
    let agent = node.agent(1, "eng").await;
    let did = agent.did().to_owned();
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for attrs in [r#"{"role":"reader","role":"admin"}"#, r#"{"a":{"b":[{"c":1,"c":2}]}}"#] {
        let text = format!(
            r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"{ts}","realm":"eng","kind":"tool_call","attrs":{attrs}}}"#
        );
        let envelope = agent
            .key()
            .sign_envelope(custos_event::EVENT_PAYLOAD_TYPE, text.into_bytes());
        let result = node.send_one(&envelope).await;
        assert_eq!(result.reason.as_deref(), Some("bad_payload"), "{attrs}: {result:?}");
        assert!(result.message.unwrap().contains("twice"));
    }
    node.stop().await;
}

mod property {
    //! Random chains (next, gaps, resends, forks, broken prevs, the largest seqs) of two
    //! agents through a real node: every answer is the one the chain rule gives, and the
    //! stored log always verifies.

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        Next,
        Skip(u64),
        Resend(usize),
        Fork(usize),
        BrokenPrev,
        Huge(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => Just(Step::Next),
            1 => (1u64..4).prop_map(Step::Skip),
            2 => any::<usize>().prop_map(Step::Resend),
            1 => any::<usize>().prop_map(Step::Fork),
            1 => Just(Step::BrokenPrev),
            1 => (0u64..3).prop_map(Step::Huge),
        ]
    }

    fn seq_of(envelope: &Envelope) -> u64 {
        serde_json::from_slice::<serde_json::Value>(&envelope.payload).unwrap()["seq"]
            .as_u64()
            .unwrap()
    }

    /// What the node must answer for `envelope`, given what it stored for the agent.
    fn expected(stored: &[Envelope], envelope: &Envelope) -> &'static str {
        let seq = seq_of(envelope);
        if seq > custos_event::chain::MAX_SEQ {
            return "rejected";
        }
        let Some(head) = stored.last() else { return "accepted" };
        let head_seq = seq_of(head);
        if seq <= head_seq {
            let same = stored
                .iter()
                .any(|old| seq_of(old) == seq && old.payload == envelope.payload);
            return if same { "duplicate" } else { "rejected" };
        }
        let prev: Option<String> = serde_json::from_slice::<serde_json::Value>(&envelope.payload).unwrap()["prev"]
            .as_str()
            .map(str::to_owned);
        if seq == head_seq + 1 && prev != prev_of(head) {
            return "rejected";
        }
        "accepted"
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
        #[test]
        fn whatever_the_node_accepts_verifies(steps in prop::collection::vec((0usize..2, step()), 1..60)) {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let mut config = crate::support::config(dir.path());
                config.log.segment_max_entries = 16;
                let node = Node::start_in(dir, config).await;
                let keys = [node.agent(1, "eng").await.key().clone(), node.agent(2, "eng").await.key().clone()];
                let mut stored: [Vec<Envelope>; 2] = [Vec::new(), Vec::new()];
                for (who, step) in steps {
                    let key = &keys[who];
                    let head = stored[who].last().cloned();
                    let next = head.as_ref().map_or(0, |head| seq_of(head).saturating_add(1));
                    let prev = head.as_ref().and_then(prev_of);
                    let envelope = match step {
                        Step::Next => at(key, next, prev).sign(event(Kind::ToolCall)),
                        Step::Skip(count) => {
                            let prev = prev.or_else(|| Some(custos_event::blake3_hex(b"before")));
                            at(key, next.saturating_add(count), prev).sign(event(Kind::ToolCall))
                        }
                        Step::Resend(pick) if !stored[who].is_empty() => stored[who][pick % stored[who].len()].clone(),
                        Step::Fork(pick) if !stored[who].is_empty() => {
                            let old = &stored[who][pick % stored[who].len()];
                            let seq = seq_of(old);
                            let mut payload = event(Kind::FileWrite);
                            payload.target = Some(format!("/tmp/fork-{pick}"));
                            let prev = (seq > 0).then(|| custos_event::blake3_hex(b"whatever"));
                            at(key, seq, prev).sign(payload)
                        }
                        Step::BrokenPrev if head.is_some() => {
                            at(key, next, Some(custos_event::blake3_hex(b"not the head"))).sign(event(Kind::ToolCall))
                        }
                        Step::Huge(below) => {
                            let prev = prev.or_else(|| Some(custos_event::blake3_hex(b"before")));
                            at(key, u64::MAX - below, prev).sign(event(Kind::ToolCall))
                        }
                        _ => at(key, next, prev).sign(event(Kind::ToolCall)),
                    };
                    let want = expected(&stored[who], &envelope);
                    let result = node.send_one(&envelope).await;
                    prop_assert_eq!(result.status.as_str(), want, "seq {}: {:?}", seq_of(&envelope), result);
                    if want == "accepted" {
                        stored[who].push(envelope);
                    }
                }
                let (dir, _) = node.stop().await;
                let report = custos_store::verify::verify_store(dir.path(), &Default::default(), &mut |_, _| {}).unwrap();
                prop_assert!(report.ok(), "{:#?}", report.problems);
                Ok(())
            })?;
        }
    }
}
