//! A seeded evaluation of the hard simulator, end to end through the CLI: simulate writes
//! a trace and an answer key, eval replays the trace through the detector, runs the
//! shipped playbooks in dry run and scores both against the detection goals. The seed
//! fixes the trace, so the findings are fixed too.

use crate::support::{run, stderr, stdout};

#[test]
fn a_seeded_evaluation_of_the_hard_fleet_meets_every_goal() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.ndjson");
    let key = dir.path().join("key.json");
    // Thirty agents over ten days: sessions, activity a factor of 100 apart, near misses
    // of every attack, a holiday and a fleet-wide deploy (docs/evaluation.md).
    let output = run(&[
        "simulate",
        "--agents",
        "30",
        "--hours",
        "240",
        "--seed",
        "3",
        "--out",
        trace.to_str().unwrap(),
        "--answers",
        key.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let answers: serde_json::Value = serde_json::from_slice(&std::fs::read(&key).unwrap()).unwrap();
    let mut scenarios: Vec<&str> = answers["attacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attack| attack["scenario"].as_str().unwrap())
        .collect();
    scenarios.sort_unstable();
    assert_eq!(
        scenarios,
        [
            "audit_disabled",
            "cloned_key",
            "credential_non_owner",
            "goes_silent",
            "mass_memory_delete",
            "memory_poisoning",
            "probing",
            "prompt_injection_exfiltration",
            "slow_drift",
            "subagent_escalation",
            "tool_rug_pull"
        ],
        "every scenario is injected"
    );

    let output = run(&[
        "eval",
        "--events",
        trace.to_str().unwrap(),
        "--answers",
        key.to_str().unwrap(),
        "--json",
    ]);
    let result: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let report = &result["report"];
    assert!(
        output.status.success(),
        "goals missed: {} {report}",
        result["goals_missed"]
    );
    assert_eq!(result["goals_missed"], serde_json::json!([]));
    assert!(report["recall"].as_f64().unwrap() >= 0.95, "{report}");
    for scenario in report["scenarios"].as_array().unwrap() {
        assert_eq!(scenario["recall"], 1.0, "{scenario}");
        // Every detection's evidence cites the attack's own events.
        assert_eq!(scenario["evidence_cited"], scenario["evidence_checked"], "{scenario}");
    }
    assert!(
        report["false_positives_per_100_agent_days"].as_f64().unwrap() <= 1.0,
        "{report}"
    );
    assert_eq!(result["wrongful_actions"], 0, "{result}");
    // Detections are typed by the attack they name; nothing counts as a detection
    // merely for being an anomaly on the right agent.
    let types: std::collections::BTreeSet<&str> = result["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|finding| finding["type"].as_str().unwrap())
        .collect();
    for wanted in [
        "exfiltration",
        "memory_poisoning",
        "rug_pull",
        "credential_misuse",
        "privilege_escalation",
        "drift",
        "chain_fork",
        "mass_delete",
        "silence",
        "probing",
        "audit_gap",
    ] {
        assert!(types.contains(wanted), "{wanted} missing from {types:?}");
    }

    // An answer key naming a scenario the scorer does not know is refused.
    let mut unknown = answers.clone();
    unknown["attacks"][0]["scenario"] = "made_up_attack".into();
    let unknown_key = dir.path().join("unknown.json");
    std::fs::write(&unknown_key, serde_json::to_vec(&unknown).unwrap()).unwrap();
    let output = run(&[
        "eval",
        "--events",
        trace.to_str().unwrap(),
        "--answers",
        unknown_key.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("made_up_attack"), "{}", stderr(&output));

    // A key whose attacks were never injected misses its goals: eval exits 1.
    let mut absent = answers.clone();
    absent["attacks"][0]["agent"] = "did:key:z6MkNobodyAtAll".into();
    let absent_key = dir.path().join("absent.json");
    std::fs::write(&absent_key, serde_json::to_vec(&absent).unwrap()).unwrap();
    let output = run(&[
        "eval",
        "--events",
        trace.to_str().unwrap(),
        "--answers",
        absent_key.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).contains("goals NOT met"), "{}", stdout(&output));

    // A tampered trace is refused with the line that failed.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let at = lines[4].find("\"sig\":\"").unwrap() + 7;
    let flipped = if &lines[4][at..=at] == "A" { "B" } else { "A" };
    lines[4].replace_range(at..=at, flipped);
    lines.truncate(50);
    std::fs::write(&trace, lines.join("\n")).unwrap();
    let output = run(&[
        "eval",
        "--events",
        trace.to_str().unwrap(),
        "--answers",
        key.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("event 5:"), "{}", stderr(&output));
    assert!(stderr(&output).contains("signature"), "{}", stderr(&output));
}
