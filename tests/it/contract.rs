//! The detector and the responder are separate stages joined only by the signed finding
//! payload in the log. This checks that the responder reads what the detector writes.

use custos_detect::{Contribution, Finding, Severity, Span};

#[test]
fn the_responder_reads_the_detectors_signed_finding_payload() {
    let ts = chrono::DateTime::parse_from_rfc3339("2026-11-22T09:00:00Z")
        .unwrap()
        .to_utc();
    let finding = Finding {
        id: "f-0123456789abcdef".into(),
        agent: "did:key:z6MkExample".into(),
        realm: "eng".into(),
        finding_type: "exfiltration".into(),
        score: 95,
        severity: Severity::Critical,
        confidence: 0.9,
        learning: false,
        window: Span { start: ts, end: ts },
        explanation: vec![Contribution {
            feature: "bytes_out".into(),
            observed: 9e6,
            expected: 1e4,
            deviation: 42.0,
        }],
        evidence: vec![7, 9],
        rule_id: Some("custos-exfil-after-injection".into()),
        title: "Sensitive read followed by an external send".into(),
        tags: vec!["attack.t1567".into()],
        dedup_key: "rule|x|y".into(),
        memories: vec!["mem-1".into()],
        ts,
    };
    let payload = finding.payload(&custos_event::ChainState::default()).unwrap();
    let read: custos_respond::Finding = serde_json::from_slice(&payload).unwrap();
    assert_eq!(read.id, finding.id);
    assert_eq!(read.finding_type, "exfiltration");
    assert_eq!(read.severity, Severity::Critical);
    assert_eq!(read.memories, ["mem-1"]);
    let mut responder = custos_respond::Responder::new(custos_respond::load_playbooks(true, None).unwrap());
    let records = responder.on_finding(&read, ts);
    assert_eq!(records[0].action, "revoke_agent");
}
