//! Detector tests: every rule in the pack fires on its attack and stays quiet on a near
//! miss; baselines flag spikes and silence; a restart from a snapshot does not re-alert.

use chrono::{DateTime, Duration, TimeZone, Utc};
use custos_detect::{Detector, DetectorConfig, Finding, Rules};
use custos_event::{Kind, Observation, Outcome, Payload, Signal};
use serde_json::json;

mod runner;
mod weaknesses;

const AGENT: &str = "did:key:z6MkagentAAAA";
const OTHER: &str = "did:key:z6MkagentBBBB";

fn t0() -> DateTime<Utc> {
    // A Tuesday, 10:00 UTC.
    Utc.with_ymd_and_hms(2026, 11, 17, 10, 0, 0).unwrap()
}

struct Feed {
    detector: Detector,
    index: u64,
    seqs: std::collections::HashMap<String, u64>,
}

impl Feed {
    fn new() -> Self {
        Self::with(DetectorConfig::default())
    }

    fn with(config: DetectorConfig) -> Self {
        Self {
            detector: Detector::new(config, Rules::load(&[]).unwrap()),
            index: 0,
            seqs: Default::default(),
        }
    }

    fn event(&mut self, agent: &str, kind: Kind, at: DateTime<Utc>, fill: impl FnOnce(&mut Payload)) -> Vec<Finding> {
        let seq = self.seqs.entry(agent.into()).or_default();
        let mut payload = Payload::new(kind, at);
        payload.agent = agent.into();
        payload.realm = "eng".into();
        payload.seq = *seq;
        *seq += 1;
        fill(&mut payload);
        self.index += 1;
        self.detector.observe(&Observation {
            log_index: Some(self.index),
            ingest_ts: at,
            payload,
            signal: Signal::Accepted { gap: None },
            entry: None,
        })
    }

    fn signal(&mut self, agent: &str, signal: Signal, at: DateTime<Utc>) -> Vec<Finding> {
        let mut payload = Payload::new(Kind::ToolCall, at);
        payload.agent = agent.into();
        payload.realm = "eng".into();
        let accepted = matches!(signal, Signal::Accepted { .. });
        if accepted {
            self.index += 1;
        }
        self.detector.observe(&Observation {
            log_index: accepted.then_some(self.index),
            ingest_ts: at,
            payload,
            signal,
            entry: None,
        })
    }
}

/// Ticks at `at`, then past the hold of behavioural findings (the crowd check), and
/// returns everything reported.
fn settle(feed: &mut Feed, at: DateTime<Utc>) -> Vec<Finding> {
    let mut found = feed.detector.tick(at.timestamp());
    found.extend(feed.detector.tick((at + Duration::minutes(6)).timestamp()));
    found
}

fn attrs(value: serde_json::Value) -> Option<serde_json::Map<String, serde_json::Value>> {
    value.as_object().cloned()
}

fn rule_ids(findings: &[Finding]) -> Vec<String> {
    findings.iter().filter_map(|finding| finding.rule_id.clone()).collect()
}

#[test]
fn exfiltration_after_a_sensitive_read_in_the_same_session() {
    let mut feed = Feed::new();
    let read = |p: &mut Payload| {
        p.session = Some("s1".into());
        p.target = Some("/secrets/customers.csv".into());
        p.attrs = attrs(json!({"sensitivity": "secret"}));
    };
    assert!(feed.event(AGENT, Kind::FileRead, t0(), read).is_empty());
    let found = feed.event(AGENT, Kind::MessageSent, t0() + Duration::seconds(30), |p| {
        p.session = Some("s1".into());
        p.target = Some("https://paste.example.net/x".into());
        p.attrs = attrs(json!({"destination": "external"}));
    });
    assert_eq!(rule_ids(&found), ["custos-exfil-after-injection"]);
    let finding = &found[0];
    assert_eq!(finding.finding_type, "exfiltration");
    assert_eq!(finding.severity.as_str(), "critical");
    assert!(finding.tags.contains(&"attack.t1567".to_string()), "{:?}", finding.tags);
    assert_eq!(finding.evidence, [1, 2]);

    // Near miss: the external send is in another session.
    let mut feed = Feed::new();
    feed.event(AGENT, Kind::FileRead, t0(), read);
    let found = feed.event(AGENT, Kind::MessageSent, t0() + Duration::seconds(30), |p| {
        p.session = Some("s2".into());
        p.attrs = attrs(json!({"destination": "external"}));
    });
    assert!(rule_ids(&found).is_empty(), "{found:?}");
}

#[test]
fn tool_definition_changing_after_first_use() {
    let call = |hash: &'static str| {
        move |p: &mut Payload| {
            p.action = Some("search".into());
            p.attrs = attrs(json!({"tool_hash": hash}));
        }
    };
    let mut feed = Feed::new();
    assert!(feed.event(AGENT, Kind::ToolCall, t0(), call("aaaa")).is_empty());
    assert!(
        feed.event(AGENT, Kind::ToolCall, t0() + Duration::minutes(5), call("aaaa"))
            .is_empty()
    );
    let found = feed.event(AGENT, Kind::ToolCall, t0() + Duration::minutes(10), call("bbbb"));
    assert_eq!(rule_ids(&found), ["custos-tool-rug-pull"]);
    assert_eq!(found[0].finding_type, "rug_pull");

    // Near miss: two different tools, each with its own single hash.
    let mut feed = Feed::new();
    feed.event(AGENT, Kind::ToolCall, t0(), call("aaaa"));
    let found = feed.event(AGENT, Kind::ToolCall, t0() + Duration::minutes(1), |p| {
        p.action = Some("fetch".into());
        p.attrs = attrs(json!({"tool_hash": "bbbb"}));
    });
    assert!(rule_ids(&found).is_empty(), "{found:?}");
}

#[test]
fn credential_used_by_a_non_owner() {
    let mut feed = Feed::new();
    let found = feed.event(AGENT, Kind::CredentialUse, t0(), |p| {
        p.target = Some("aws:prod-admin".into());
        p.attrs = attrs(json!({"credential_owner": OTHER}));
    });
    assert_eq!(rule_ids(&found), ["custos-credential-non-owner"]);
    let found = feed.event(AGENT, Kind::CredentialUse, t0() + Duration::seconds(1), |p| {
        p.target = Some("aws:own".into());
        p.attrs = attrs(json!({"credential_owner": AGENT}));
    });
    assert!(rule_ids(&found).is_empty(), "{found:?}");
}

#[test]
fn delegation_granting_more_than_the_parent_holds() {
    let mut feed = Feed::new();
    let found = feed.event(AGENT, Kind::Delegation, t0(), |p| {
        p.target = Some(OTHER.into());
        p.attrs = attrs(json!({"holder_scopes": ["repo:read"], "granted_scopes": ["repo:read", "repo:admin"]}));
    });
    assert_eq!(rule_ids(&found), ["custos-delegation-escalation"]);
    let found = feed.event(AGENT, Kind::Delegation, t0() + Duration::seconds(5), |p| {
        p.target = Some(OTHER.into());
        p.attrs = attrs(json!({"holder_scopes": ["repo:read", "repo:write"], "granted_scopes": ["repo:read"]}));
    });
    assert!(rule_ids(&found).is_empty(), "{found:?}");
}

#[test]
fn integrity_signals_from_ingest() {
    let mut feed = Feed::new();
    let cases = [
        ("revoked_agent", "custos-revoked-activity"),
        ("chain_fork", "custos-chain-fork"),
    ];
    for (reason, rule) in cases {
        let found = feed.signal(AGENT, Signal::Rejected { reason: reason.into() }, t0());
        assert_eq!(rule_ids(&found), [rule], "{reason}");
    }
    let found = feed.signal(AGENT, Signal::Accepted { gap: Some((3, 9)) }, t0());
    assert_eq!(rule_ids(&found), ["custos-chain-gap"]);
    // Negative: a plain accepted event and an unrelated rejection.
    assert!(rule_ids(&feed.signal(OTHER, Signal::Accepted { gap: None }, t0())).is_empty());
    assert!(
        rule_ids(&feed.signal(
            OTHER,
            Signal::Rejected {
                reason: "clock_skew".into()
            },
            t0()
        ))
        .is_empty()
    );
}

#[test]
fn burst_of_memory_deletes() {
    let mut feed = Feed::new();
    let mut found = Vec::new();
    for i in 0..20 {
        found.extend(feed.event(AGENT, Kind::MemoryDelete, t0() + Duration::seconds(i), |p| {
            p.memory_id = Some(format!("m{i}"));
        }));
    }
    assert!(
        rule_ids(&found).contains(&"custos-memory-delete-burst".to_string()),
        "{found:?}"
    );
    // Near miss: 19 deletes, spread over more than a minute.
    let mut feed = Feed::new();
    let mut found = Vec::new();
    for i in 0..19 {
        found.extend(feed.event(AGENT, Kind::MemoryDelete, t0() + Duration::seconds(i * 4), |_| {}));
    }
    assert!(!rule_ids(&found).contains(&"custos-memory-delete-burst".to_string()));
}

/// A steady agent: 10 tool calls a minute to a few known targets.
fn steady_minutes(feed: &mut Feed, agent: &str, from: DateTime<Utc>, minutes: i64) -> Vec<Finding> {
    let mut found = Vec::new();
    for minute in 0..minutes {
        for i in 0..10 {
            let at = from + Duration::minutes(minute) + Duration::seconds(i * 5);
            found.extend(feed.event(agent, Kind::ToolCall, at, |p| {
                p.action = Some(format!("tool{}", i % 3));
                p.target = Some(format!("repo/{}", i % 4));
                p.outcome = Some(Outcome::Ok);
                p.bytes_out = Some(1000);
            }));
        }
    }
    found
}

#[test]
fn a_spike_against_the_agents_own_baseline_is_explained() {
    let mut feed = Feed::new();
    assert!(steady_minutes(&mut feed, AGENT, t0(), 60).is_empty());
    let spike_start = t0() + Duration::minutes(60);
    for i in 0..40 {
        feed.event(AGENT, Kind::MessageSent, spike_start + Duration::seconds(i), |p| {
            p.target = Some(format!("https://drop{i}.example.org/u"));
            p.bytes_out = Some(5_000_000);
        });
    }
    let found = settle(&mut feed, spike_start + Duration::minutes(2));
    let anomaly = found
        .iter()
        .find(|f| f.finding_type == "anomaly")
        .expect("anomaly finding");
    assert!(!anomaly.learning);
    assert!(anomaly.score >= 50, "{anomaly:?}");
    let top = &anomaly.explanation[0];
    assert!(top.observed > top.expected && top.deviation > 3.0, "{top:?}");
    assert!(!anomaly.evidence.is_empty());
}

#[test]
fn a_new_agent_is_judged_against_its_peers_while_learning() {
    let mut feed = Feed::new();
    // Two established agents teach the realm's peer baseline.
    steady_minutes(&mut feed, AGENT, t0(), 40);
    steady_minutes(&mut feed, OTHER, t0(), 40);
    let newcomer = "did:key:z6MknewcomerCCCC";
    let at = t0() + Duration::minutes(41);
    // While it learns, no single signal decides (each counts for at most 4 deviations):
    // this one uses credentials, deletes memories and is denied, all at once.
    for i in 0..30 {
        feed.event(newcomer, Kind::CredentialUse, at + Duration::seconds(i), |p| {
            p.attrs = attrs(json!({"credential_owner": newcomer}));
            p.outcome = Some(Outcome::Denied);
        });
        feed.event(newcomer, Kind::MemoryDelete, at + Duration::seconds(i), |p| {
            p.memory_id = Some(format!("m{i}"));
        });
    }
    let found = settle(&mut feed, at + Duration::minutes(2));
    let anomaly = found
        .iter()
        .find(|f| f.agent == newcomer && f.rule_id.is_none())
        .unwrap_or_else(|| panic!("the newcomer is flagged from its first minute: {found:?}"));
    assert!(anomaly.learning);
    assert!(anomaly.confidence < 0.85);
}

/// A busy agent of another kind: 100 calls a minute, each to its own target, 50 kB out.
fn busy_minutes(feed: &mut Feed, agent: &str, from: DateTime<Utc>, minutes: i64) {
    for minute in 0..minutes {
        for i in 0..100 {
            let at = from + Duration::minutes(minute) + Duration::milliseconds(i * 590);
            feed.event(agent, Kind::ToolCall, at, |p| {
                p.action = Some(format!("query{}", i % 7));
                p.target = Some(format!("db/table{}", i % 20));
                p.outcome = Some(Outcome::Ok);
                p.bytes_out = Some(50_000);
            });
        }
    }
}

#[test]
fn peer_groups_are_clustered_so_a_newcomer_is_judged_against_its_own_kind() {
    let mut feed = Feed::new();
    // One realm, two kinds of agent: realm-wide peers would blur them together.
    let quiet: Vec<String> = (0..6).map(|i| format!("did:key:z6Mkquiet{i}")).collect();
    let busy: Vec<String> = (0..6).map(|i| format!("did:key:z6Mkbusy{i}")).collect();
    for minute in 0..45 {
        let from = t0() + Duration::minutes(minute);
        for agent in &quiet {
            steady_minutes(&mut feed, agent, from, 1);
        }
        for agent in &busy {
            busy_minutes(&mut feed, agent, from, 1);
        }
    }
    let groups = feed.detector.peer_groups();
    assert_eq!(groups.len(), 2, "k-means separates the two kinds: {:?}", groups.sizes);
    assert_eq!(groups.sizes, vec![6, 6]);

    // A newcomer doing what busy agents do is not news...
    let at = t0() + Duration::minutes(45);
    busy_minutes(&mut feed, "did:key:z6MknewbusyDDDD", at, 1);
    // ...but one that looks like a quiet agent at four times the pace is, though it
    // would pass against the realm's blended average.
    // (While learning no single signal decides, so it also sends ten times the bytes
    // and is denied throughout.)
    let newcomer = "did:key:z6MknewquietEEEE";
    for i in 0..40 {
        feed.event(newcomer, Kind::ToolCall, at + Duration::milliseconds(i * 1400), |p| {
            p.action = Some(format!("tool{}", i % 3));
            p.target = Some(format!("repo/{}", i % 4));
            p.outcome = Some(Outcome::Denied);
            p.bytes_out = Some(10_000);
        });
    }
    let found = settle(&mut feed, at + Duration::minutes(1));
    assert!(
        found.iter().all(|finding| finding.agent != "did:key:z6MknewbusyDDDD"),
        "{found:?}"
    );
    let anomaly = found
        .iter()
        .find(|finding| finding.agent == newcomer && finding.rule_id.is_none())
        .unwrap_or_else(|| panic!("the quiet-kind newcomer is flagged: {found:?}"));
    assert!(anomaly.learning);
    assert!(anomaly.title.contains("peer group"), "{}", anomaly.title);
    let events = anomaly
        .explanation
        .iter()
        .find(|c| c.feature == "events")
        .unwrap_or_else(|| panic!("{:?}", anomaly.explanation));
    assert!(
        events.expected < 20.0,
        "judged against the quiet kind: {:?}",
        anomaly.explanation
    );
}

#[test]
fn restart_from_a_snapshot_does_not_re_alert() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("detector.json");
    let mut feed = Feed::new();
    steady_minutes(&mut feed, AGENT, t0(), 40);
    let found = feed.event(AGENT, Kind::CredentialUse, t0() + Duration::minutes(41), |p| {
        p.attrs = attrs(json!({"credential_owner": OTHER}));
    });
    assert_eq!(found.len(), 1);
    feed.detector.snapshot(&path).unwrap();
    let replay_from = feed.index;

    let mut restarted = Feed::new();
    assert!(restarted.detector.restore(&path).unwrap());
    restarted.index = replay_from - 1;
    restarted.seqs = feed.seqs.clone();
    // The same event replayed after the restart (at-least-once delivery) is skipped by
    // its log index; a repeat of the same misuse minutes later is within the dedup period.
    let again = restarted.event(AGENT, Kind::CredentialUse, t0() + Duration::minutes(41), |p| {
        p.attrs = attrs(json!({"credential_owner": OTHER}));
    });
    assert!(again.is_empty(), "{again:?}");
    let later = restarted.event(AGENT, Kind::CredentialUse, t0() + Duration::minutes(45), |p| {
        p.attrs = attrs(json!({"credential_owner": OTHER}));
    });
    assert!(later.is_empty(), "re-alerted after restart: {later:?}");
    // The baseline came back too: steady traffic stays quiet, no cold start.
    let quiet = steady_minutes(&mut restarted, AGENT, t0() + Duration::minutes(46), 5);
    assert!(quiet.iter().all(|f| f.finding_type != "anomaly"), "{quiet:?}");
    assert!(restarted.detector.agent(AGENT).unwrap().baseline.windows >= 40);
}

#[test]
fn operators_add_exceptions_with_a_filter_without_editing_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("exceptions.yml"),
        r#"
title: The vault broker may use any credential
filter:
    rules:
        - custos-credential-non-owner
    selection:
        agent: did:key:z6MkagentAAAA
    condition: not selection
logsource:
    product: ai_agent
"#,
    )
    .unwrap();
    let rules = Rules::load(&[dir.path()]);
    let mut feed = Feed::new();
    if let Ok(rules) = rules {
        feed.detector = Detector::new(DetectorConfig::default(), rules);
    } else {
        panic!("filter did not load: {:?}", rules.err());
    }
    let found = feed.event(AGENT, Kind::CredentialUse, t0(), |p| {
        p.attrs = attrs(json!({"credential_owner": OTHER}));
    });
    assert!(rule_ids(&found).is_empty(), "{found:?}");
    let found = feed.event(OTHER, Kind::CredentialUse, t0(), |p| {
        p.attrs = attrs(json!({"credential_owner": AGENT}));
    });
    assert_eq!(rule_ids(&found), ["custos-credential-non-owner"]);
}

#[test]
fn findings_sign_into_a_verifiable_payload_and_export_as_ocsf() {
    let mut feed = Feed::new();
    let found = feed.event(AGENT, Kind::CredentialUse, t0(), |p| {
        p.attrs = attrs(json!({"credential_owner": OTHER}));
    });
    let finding = &found[0];
    let key = custos_event::AgentKey::from_seed(&[9; 32]);
    let mut chain = custos_event::ChainState::default();
    let envelope = finding.sign(&key, &mut chain).unwrap();
    assert_eq!(envelope.payload_type, custos_event::FINDING_PAYLOAD_TYPE);
    let verifying = custos_event::verifying_key_from_did(key.did()).unwrap();
    assert!(custos_event::verify_signatures(&[(&verifying, &envelope)])[0].is_ok());
    let (back, seq) = Finding::from_payload(&envelope.payload).unwrap();
    assert_eq!((&back, seq), (finding, 0));
    let ocsf = finding.ocsf();
    assert_eq!(ocsf["class_uid"], 2004);
    assert_eq!(ocsf["finding_info"]["uid"], finding.id.as_str());
    assert_eq!(ocsf["severity_id"], 4);
}
