//! A small seeded evaluation, end to end through the CLI: simulate writes a trace and an
//! answer key, eval replays the trace through the detector and scores it. The seed fixes
//! the trace, so the findings are fixed too.

use crate::support::{run, stderr, stdout};

#[test]
fn a_seeded_evaluation_finds_every_attack_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.ndjson");
    let key = dir.path().join("key.json");
    let output = run(&[
        "simulate",
        "--agents",
        "20",
        "--hours",
        "26",
        "--seed",
        "3",
        "--out",
        trace.to_str().unwrap(),
        "--answers",
        key.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let answers: serde_json::Value = serde_json::from_slice(&std::fs::read(&key).unwrap()).unwrap();
    assert_eq!(
        answers["attacks"].as_array().unwrap().len(),
        9,
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
    assert!(output.status.success(), "{}", stderr(&output));
    let result: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let report = &result["report"];
    assert_eq!(report["false_positives"], 0, "{report}");
    for scenario in report["scenarios"].as_array().unwrap() {
        assert_eq!(scenario["recall"], 1.0, "{scenario}");
    }
    let mut types: Vec<&str> = result["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|finding| finding["type"].as_str().unwrap())
        .collect();
    types.sort_unstable();
    assert_eq!(
        types,
        [
            "anomaly",
            "anomaly",
            "chain_fork",
            "credential_misuse",
            "drift",
            "drift",
            "drift",
            "exfiltration",
            "mass_delete",
            "memory_poisoning",
            "privilege_escalation",
            "rug_pull",
            "silence"
        ]
    );

    // A tampered trace is refused with the line that failed.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let at = lines[4].find("\"sig\":\"").unwrap() + 7;
    let flipped = if &lines[4][at..=at] == "A" { "B" } else { "A" };
    lines[4].replace_range(at..=at, flipped);
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
