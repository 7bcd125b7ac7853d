//! Responder tests: every action kind, the approval gate (approve, deny, expiry), dry-run,
//! the rate and blast-radius caps, idempotency, undo, and a real webhook over loopback.

use chrono::{DateTime, Duration, TimeZone, Utc};
use custos_respond::{
    ActionStatus, Enforcement, Finding, RESUME_ACTION, RespondError, Responder, load_playbooks, parse_playbook,
};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0).unwrap()
}

fn finding(id: &str, agent: &str, kind: &str, severity: &str, score: u8) -> Finding {
    Finding {
        id: id.into(),
        agent: agent.into(),
        realm: "eng".into(),
        finding_type: kind.into(),
        score,
        severity: custos_respond::Severity::parse(severity).unwrap(),
        tags: vec!["attack.t1567".into()],
        memories: vec!["mem-1".into(), "mem-2".into()],
        title: "test finding".into(),
        ts: now(),
        ..Finding::default()
    }
}

fn playbook(yaml: &str) -> Responder {
    Responder::new(vec![parse_playbook("test.yml", yaml).unwrap()])
}

#[test]
fn shipped_playbooks_contain_a_critical_exfiltration() {
    let mut responder = Responder::new(load_playbooks(true, None).unwrap());
    let records = responder.on_finding(&finding("f1", "did:a", "exfiltration", "critical", 95), now());
    let done: Vec<(&str, &str, ActionStatus)> = records
        .iter()
        .map(|r| (r.action.as_str(), r.target.as_str(), r.status))
        .collect();
    assert_eq!(
        done,
        [
            ("revoke_agent", "did:a", ActionStatus::Executed),
            ("quarantine_memory", "mem-1", ActionStatus::Executed),
            ("quarantine_memory", "mem-2", ActionStatus::Executed),
        ]
    );
    assert_eq!(
        records[0].enforcement,
        Enforcement::RevokeAgent { agent: "did:a".into() }
    );
    assert_eq!(records[0].ocsf()["class_uid"], 7001);
    // A low-severity finding of the same type matches nothing.
    assert!(
        responder
            .on_finding(&finding("f2", "did:b", "exfiltration", "medium", 60), now())
            .is_empty()
    );
}

#[test]
fn every_action_kind_produces_its_enforcement() {
    let mut responder = playbook(
        r#"
name: all
match: { types: [anomaly] }
actions:
  - quarantine_agent: {}
  - quarantine_memory: { memory_id: mem-9 }
  - revoke_credential: { credential: "aws:prod" }
  - revoke_agent: {}
"#,
    );
    let records = responder.on_finding(&finding("f1", "did:a", "anomaly", "high", 80), now());
    let enforcement: Vec<Enforcement> = records.into_iter().map(|r| r.enforcement).collect();
    assert_eq!(
        enforcement,
        [
            Enforcement::QuarantineAgent { agent: "did:a".into() },
            Enforcement::QuarantineMemory {
                memory_id: "mem-9".into(),
                agent: "did:a".into()
            },
            Enforcement::RevokeCredential {
                credential: "aws:prod".into(),
                agent: "did:a".into()
            },
            Enforcement::RevokeAgent { agent: "did:a".into() },
        ]
    );
}

#[test]
fn the_same_finding_twice_acts_once() {
    let mut responder = Responder::new(load_playbooks(true, None).unwrap());
    let first = finding("f1", "did:a", "chain_fork", "critical", 95);
    assert!(!responder.on_finding(&first, now()).is_empty());
    assert!(
        responder.on_finding(&first, now()).is_empty(),
        "idempotency key matched"
    );
}

#[test]
fn dry_run_records_and_enforces_nothing() {
    let mut responder = playbook(
        r#"
name: rehearse
dry_run: true
match: { types: [anomaly] }
actions: [ { revoke_agent: {} } ]
"#,
    );
    let records = responder.on_finding(&finding("f1", "did:a", "anomaly", "high", 80), now());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, ActionStatus::DryRun);
    assert_eq!(records[0].enforcement, Enforcement::None);
}

const GATED: &str = r#"
name: gated
match: { types: [anomaly] }
actions:
  - quarantine_agent: {}
  - require_approval: { expires_in_secs: 600 }
  - revoke_agent: {}
"#;

#[test]
fn approval_runs_the_parked_actions() {
    let mut responder = playbook(GATED);
    let records = responder.on_finding(&finding("f1", "did:a", "anomaly", "high", 80), now());
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].action, "quarantine_agent");
    assert_eq!(records[1].status, ActionStatus::Pending);
    let approval = responder.pending().pop().unwrap();
    assert_eq!(Some(approval.id.clone()), records[1].approval_id);
    let approved = responder
        .approve(&approval.id, "token:alice", now() + Duration::minutes(5))
        .unwrap();
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0].action, "revoke_agent");
    assert_eq!(approved[0].status, ActionStatus::Executed);
    assert_eq!(approved[0].by, "token:alice");
    assert!(responder.pending().is_empty());
    assert!(
        responder.approve(&approval.id, "token:alice", now()).is_err(),
        "decided once"
    );
}

#[test]
fn denial_is_recorded_and_nothing_runs() {
    let mut responder = playbook(GATED);
    responder.on_finding(&finding("f1", "did:a", "anomaly", "high", 80), now());
    let approval = responder.pending().pop().unwrap();
    let denied = responder.deny(&approval.id, "token:bob", now()).unwrap();
    assert_eq!(denied.status, ActionStatus::Denied);
    assert_eq!(denied.enforcement, Enforcement::None);
    assert!(responder.pending().is_empty());
}

#[test]
fn approvals_expire() {
    let mut responder = playbook(GATED);
    responder.on_finding(&finding("f1", "did:a", "anomaly", "high", 80), now());
    let approval = responder.pending().pop().unwrap();
    assert!(responder.expire(now() + Duration::minutes(9)).is_empty());
    let expired = responder.expire(now() + Duration::minutes(11));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].status, ActionStatus::Expired);
    assert!(
        responder
            .approve(&approval.id, "token:alice", now() + Duration::minutes(12))
            .is_err()
    );
}

#[test]
fn blast_radius_cap_pauses_and_escalates() {
    let mut responder = playbook(
        r#"
name: capped
match: { types: [anomaly] }
caps: { max_actions_per_hour: 100, max_agents_per_hour: 3 }
actions: [ { quarantine_agent: {} } ]
"#,
    );
    let mut statuses = Vec::new();
    for i in 0..5 {
        let records = responder.on_finding(
            &finding(&format!("f{i}"), &format!("did:{i}"), "anomaly", "high", 80),
            now(),
        );
        statuses.push(records[0].status);
    }
    assert_eq!(
        statuses,
        [
            ActionStatus::Executed,
            ActionStatus::Executed,
            ActionStatus::Executed,
            ActionStatus::Escalated,
            ActionStatus::Escalated,
        ]
    );
    // Another realm has its own budget.
    let mut other = finding("g1", "did:x", "anomaly", "high", 80);
    other.realm = "ops".into();
    assert_eq!(responder.on_finding(&other, now())[0].status, ActionStatus::Executed);
    // Resuming lifts the pause, and says so in a record; the hour has passed, so the
    // budget is back.
    assert_eq!(responder.paused(), vec![("capped".to_owned(), "eng".to_owned())]);
    let resumed = responder.resume_paused("capped", "eng", "token:t1", now()).unwrap();
    assert_eq!(
        (resumed.action.as_str(), resumed.status, resumed.target.as_str()),
        (RESUME_ACTION, ActionStatus::Executed, "capped")
    );
    assert!(responder.paused().is_empty());
    assert!(matches!(
        responder.resume_paused("capped", "eng", "token:t1", now()),
        Err(RespondError::NotPaused { .. })
    ));
    assert!(matches!(
        responder.resume_paused("nope", "eng", "token:t1", now()),
        Err(RespondError::NoPlaybook(_))
    ));
    let later = now() + Duration::hours(2);
    let records = responder.on_finding(&finding("f9", "did:9", "anomaly", "high", 80), later);
    assert_eq!(records[0].status, ActionStatus::Executed);
}

/// A restarted responder rebuilds its brakes from the records it reads back: the pause,
/// the hour's count of actions, and a person's resume. (Before, a restart lifted every
/// pause and refilled every budget.)
#[test]
fn caps_and_pauses_survive_a_restart() {
    let yaml = r#"
name: rate
match: { types: [anomaly] }
caps: { max_actions_per_hour: 2, max_agents_per_hour: 100 }
actions: [ { quarantine_agent: {} } ]
"#;
    let mut live = playbook(yaml);
    let mut written = Vec::new();
    for i in 0..3 {
        written.extend(live.on_finding(&finding(&format!("f{i}"), "did:a", "anomaly", "high", 80), now()));
    }
    let statuses: Vec<ActionStatus> = written.iter().map(|record| record.status).collect();
    assert_eq!(
        statuses,
        [ActionStatus::Executed, ActionStatus::Executed, ActionStatus::Escalated]
    );

    // Restart: a fresh responder reads the records back from the log.
    let mut restarted = playbook(yaml);
    for record in &written {
        restarted.remember(record);
    }
    assert_eq!(restarted.paused(), vec![("rate".to_owned(), "eng".to_owned())]);
    let next = restarted.on_finding(&finding("f3", "did:b", "anomaly", "high", 80), now());
    assert_eq!(next[0].status, ActionStatus::Escalated, "the pause survived");
    written.extend(next);

    // A person resumes; that record, read back after another restart, lifts the pause,
    // but the hour's two actions still count, so the next one pauses it again.
    written.push(restarted.resume_paused("rate", "eng", "token:t1", now()).unwrap());
    let mut again = playbook(yaml);
    for record in &written {
        again.remember(record);
    }
    assert!(again.paused().is_empty(), "{:?}", again.paused());
    let next = again.on_finding(&finding("f4", "did:c", "anomaly", "high", 80), now());
    assert_eq!(next[0].status, ActionStatus::Escalated, "the hour's count survived");
    assert!(next[0].reason.contains("rate cap: 2 actions"), "{}", next[0].reason);
    // An hour later the budget is back.
    assert!(again.resume_paused("rate", "eng", "token:t1", now()).is_ok());
    let later = again.on_finding(
        &finding("f5", "did:d", "anomaly", "high", 80),
        now() + Duration::minutes(61),
    );
    assert_eq!(later[0].status, ActionStatus::Executed);
}

#[test]
fn rate_cap_counts_actions() {
    let mut responder = playbook(
        r#"
name: rate
match: { types: [anomaly] }
caps: { max_actions_per_hour: 2, max_agents_per_hour: 100 }
actions: [ { quarantine_agent: {} } ]
"#,
    );
    let statuses: Vec<ActionStatus> = (0..3)
        .map(|i| responder.on_finding(&finding(&format!("f{i}"), "did:a", "anomaly", "high", 80), now())[0].status)
        .collect();
    assert_eq!(
        statuses,
        [ActionStatus::Executed, ActionStatus::Executed, ActionStatus::Escalated]
    );
}

#[test]
fn undo_needs_approval() {
    let mut responder = Responder::new(load_playbooks(true, None).unwrap());
    let records = responder.on_finding(&finding("f1", "did:a", "exfiltration", "critical", 95), now());
    let memory = records
        .iter()
        .find(|r| r.action == "quarantine_memory")
        .unwrap()
        .clone();
    let request = responder.request_undo(&memory.id, "token:carol", now()).unwrap();
    assert_eq!(request.status, ActionStatus::Pending);
    assert_eq!(
        request.enforcement,
        Enforcement::None,
        "nothing happens before approval"
    );
    let approval = request.approval_id.unwrap();
    let undone = responder.approve(&approval, "token:dave", now()).unwrap();
    assert_eq!(undone.len(), 1);
    assert_eq!(undone[0].action, "restore_memory");
    assert_eq!(undone[0].undoes.as_deref(), Some(memory.id.as_str()));
    assert_eq!(
        undone[0].enforcement,
        Enforcement::RestoreMemory {
            memory_id: "mem-1".into(),
            agent: "did:a".into()
        }
    );
    let revoke = records.iter().find(|r| r.action == "revoke_agent").unwrap();
    let request = responder.request_undo(&revoke.id, "token:carol", now()).unwrap();
    let undone = responder
        .approve(&request.approval_id.unwrap(), "token:dave", now())
        .unwrap();
    assert_eq!(
        undone[0].enforcement,
        Enforcement::ReinstateAgent { agent: "did:a".into() }
    );
}

#[test]
fn bad_playbooks_are_refused_with_the_file_named() {
    let error = parse_playbook("broken.yml", "name: x\nmatch: {}\nactions: [ { nuke_everything: {} } ]").unwrap_err();
    assert!(error.to_string().contains("broken.yml"), "{error}");
    let error = parse_playbook("empty.yml", "name: x\nmatch: {}\nactions: []").unwrap_err();
    assert!(error.to_string().contains("empty"), "{error}");
}

/// A name goes into `/v1/playbooks/{name}/resume` and keys caps and pauses.
#[test]
fn playbook_names_are_url_safe_and_unique() {
    let yaml = |name: &str| format!("name: '{name}'\nmatch: {{}}\nactions: [ {{ revoke_agent: {{}} }} ]");
    for bad in ["", "a/b", "stop here", "x?y", "caf\u{e9}", &"n".repeat(65)] {
        let error = parse_playbook("bad.yml", &yaml(bad)).unwrap_err();
        assert!(
            error.to_string().contains("bad.yml") && error.to_string().contains("name `"),
            "{bad:?}: {error}"
        );
    }
    for good in ["contain-2", "review_v1.2", &"n".repeat(64)] {
        parse_playbook("good.yml", &yaml(good)).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yml"), yaml("mine")).unwrap();
    assert_eq!(
        load_playbooks(true, Some(dir.path())).unwrap().len(),
        custos_respond::SHIPPED.len() + 1
    );
    std::fs::write(dir.path().join("b.yml"), yaml("mine")).unwrap();
    let error = load_playbooks(true, Some(dir.path())).unwrap_err();
    assert!(
        error.to_string().contains("b.yml") && error.to_string().contains("`mine` is already taken"),
        "{error}"
    );
    // A local file may not take a shipped playbook's name either.
    std::fs::write(dir.path().join("b.yml"), yaml("review-anomaly")).unwrap();
    let error = load_playbooks(true, Some(dir.path())).unwrap_err();
    assert!(
        error.to_string().contains("`review-anomaly` is already taken"),
        "{error}"
    );
    // Without the shipped ones, that name is free.
    assert_eq!(load_playbooks(false, Some(dir.path())).unwrap().len(), 2);
}

/// A real HTTP server on loopback: fails the first request with 503, then checks the
/// HMAC of the second and answers 200.
#[test]
fn webhook_is_signed_and_retried() {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for attempt in 0..2 {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                headers.push(line.trim().to_ascii_lowercase());
            }
            let length: usize = headers
                .iter()
                .find_map(|h| h.strip_prefix("content-length: ").map(|v| v.parse().unwrap()))
                .unwrap();
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let signature = headers
                .iter()
                .find_map(|h| h.strip_prefix("x-custos-signature: ").map(str::to_owned))
                .unwrap();
            seen.push((signature, body));
            let status = if attempt == 0 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .unwrap();
        }
        seen
    });
    let body = serde_json::json!({"finding": "f1"});
    let attempts = custos_respond::webhook::send(&url, b"s3cret", &body, 2000, 3).unwrap();
    assert_eq!(attempts, 2);
    let seen = server.join().unwrap();
    for (signature, bytes) in seen {
        assert_eq!(signature, custos_respond::webhook::signature(b"s3cret", &bytes));
        assert_ne!(signature, custos_respond::webhook::signature(b"wrong", &bytes));
    }
}

#[test]
fn a_playbook_with_an_unknown_min_severity_is_refused_naming_it() {
    let error = parse_playbook(
        "bad.yml",
        "name: bad\nmatch:\n  min_severity: severe\nactions:\n  - revoke_agent: {}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("min_severity: severe") && error.contains("bad.yml"),
        "{error}"
    );
}
