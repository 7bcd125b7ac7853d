//! The CLI as an operator uses it, against a real `custos serve`.

use std::io::Write as _;
use std::process::Stdio;

use crate::support::{Server, custos, post, run, stderr, stdout};

fn emit(key: &std::path::Path, url: &str, lines: &str) -> std::process::Output {
    let mut child = custos()
        .args(["emit", "--key"])
        .arg(key)
        .args(["--url", url, "--realm", "eng"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn an_operator_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let key = dir.path().join("agent.key");
    let key_arg = key.to_str().unwrap();

    let output = run(&["agent", "keygen", "--out", key_arg]);
    assert!(output.status.success(), "{}", stderr(&output));
    let did = stdout(&output).trim().to_owned();
    assert!(did.starts_with("did:key:z6Mk"), "{did}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again = run(&["agent", "keygen", "--out", key_arg]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("refusing to overwrite"), "{}", stderr(&again));

    let server = Server::start(&data);
    let url = server.url.clone();
    let data_arg = data.to_str().unwrap();
    let no_token = run(&["agent", "list", "--url", &url]);
    assert!(!no_token.status.success());
    assert!(stderr(&no_token).contains("--token"), "{}", stderr(&no_token));

    let output = run(&[
        "agent",
        "enroll",
        &did,
        "--realm",
        "eng",
        "--label",
        "team=payments",
        "--data",
        data_arg,
        "--url",
        &url,
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(&[
        "agent", "enroll", &did, "--realm", "eng", "--data", data_arg, "--url", &url,
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("agent_exists"), "{}", stderr(&output));

    let output = emit(
        &key,
        &url,
        "{\"kind\":\"tool_call\",\"action\":\"http.get\"}\n{\"kind\":\"llm_call\",\"tokens_in\":10}\n\n{\"kind\":\"file_read\",\"target\":\"/etc/hosts\"}\n",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("3 accepted"), "{}", stderr(&output));
    let chain: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{key_arg}.chain.json")).unwrap()).unwrap();
    assert_eq!(chain["next_seq"], 3);

    // A bad line is refused before anything is signed or sent.
    let output = emit(&key, &url, "{\"kind\":\"tool_call\"}\n{\"action\":\"no kind\"}\n");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("stdin line 2"), "{}", stderr(&output));
    let output = emit(&key, &url, "{\"kind\":\"tool_call\"}\n");
    assert!(stderr(&output).contains("1 accepted"), "{}", stderr(&output));

    let output = run(&["agent", "list", "--json", "--data", data_arg, "--url", &url]);
    let agents: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(agents[0]["events"], 4);
    assert_eq!(agents[0]["labels"]["team"], "payments");

    let (status, _) = post(&url, "/v1/events", None, b"{\"payloadType\":\"x\"}".to_vec()).unwrap();
    assert_eq!(status, 200);
    let output = run(&["rejected", "list", "--data", data_arg, "--url", &url]);
    assert!(stdout(&output).contains("malformed"), "{}", stdout(&output));

    let output = run(&[
        "agent", "revoke", &did, "--reason", "test", "--data", data_arg, "--url", &url,
    ]);
    assert!(stdout(&output).contains("revoked"), "{}", stderr(&output));
    let output = emit(&key, &url, "{\"kind\":\"tool_call\"}\n");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("revoked_agent"), "{}", stderr(&output));

    let log = server.stop();
    assert!(log.contains("stopped cleanly"), "{log}");

    let output = run(&["proof", "inclusion", "--data", data_arg, "--index", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let proof: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let hash =
        |value: &serde_json::Value| -> [u8; 32] { hex::decode(value.as_str().unwrap()).unwrap().try_into().unwrap() };
    let path: Vec<[u8; 32]> = proof["inclusion_path"].as_array().unwrap().iter().map(hash).collect();
    let size = proof["tree_size"].as_u64().unwrap();
    custos_store::merkle::verify_inclusion(&hash(&proof["leaf_hash"]), 2, size, &path, &hash(&proof["root_hash"]))
        .unwrap();
    let output = run(&[
        "proof",
        "consistency",
        "--data",
        data_arg,
        "--from",
        "2",
        "--to",
        &size.to_string(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(&["proof", "inclusion", "--data", data_arg, "--index", "999"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("999"), "{}", stderr(&output));

    let output = run(&["verify", data_arg, "--signatures"]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains("OK:"));

    let segment = std::fs::read_dir(data.join("logs/0/segments"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "parquet"))
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 3;
    bytes[middle] ^= 0x55;
    std::fs::write(&segment, bytes).unwrap();
    let output = run(&["verify", data_arg]);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(stdout(&output).contains(name), "{}", stdout(&output));
    assert!(stdout(&output).contains("FAILED"));

    let output = run(&["verify", dir.path().join("nowhere").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("not a Custos store"), "{}", stderr(&output));
}

/// With `--kafka` an envelope must fit one broker record: a larger `--max-event-bytes`
/// is refused at start, named, before any broker is contacted.
#[test]
fn a_cluster_node_refuses_an_event_limit_past_a_broker_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let output = run(&[
        "serve",
        "--data",
        data.to_str().unwrap(),
        "--kafka",
        "127.0.0.1:9",
        "--roles",
        "ingest",
        "--max-event-bytes",
        "300000",
    ]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("--max-event-bytes 300000") && text.contains("262144"),
        "{text}"
    );
}

#[test]
fn every_command_has_help_with_examples() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["agent", "keygen", "--help"],
        &["agent", "enroll", "--help"],
        &["agent", "revoke", "--help"],
        &["emit", "--help"],
        &["verify", "--help"],
        &["proof", "inclusion", "--help"],
        &["demo", "--help"],
        &["bench", "ingest", "--help"],
        &["bench", "detect", "--help"],
        &["simulate", "--help"],
        &["eval", "--help"],
        &["rejected", "list", "--help"],
    ] {
        let output = run(args);
        assert!(output.status.success(), "{args:?}");
        assert!(stdout(&output).contains("Example"), "{args:?} has no examples");
    }
}

/// The detection bench runs end to end at a toy size and reports every figure the issue
/// asks for. The figures themselves are not checked: timing is never a test condition.
#[test]
fn bench_detect_reports_every_figure() {
    let output = run(&[
        "bench",
        "detect",
        "--agents",
        "10",
        "--hours",
        "1",
        "--attacks",
        "3",
        "--background-rate",
        "200",
        "--memory-agents",
        "300,600",
        "--json",
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", stderr(&output));
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    assert!(json["throughput"]["detector_per_sec"].as_f64().unwrap() > 0.0);
    assert!(json["throughput"]["raw_batch_verify_per_sec"].as_f64().unwrap() > 0.0);
    for key in [
        "event_to_finding_p50_ms",
        "event_to_finding_p99_ms",
        "finding_to_enforced_p50_ms",
        "finding_to_enforced_p99_ms",
        "event_to_enforced_p99_ms",
        "ack_p50_ms",
    ] {
        assert!(json["latency"][key].is_number(), "{key}: {}", json["latency"]);
    }
    assert_eq!(json["latency"]["attacks"], 3);
    let memory = json["memory"].as_array().unwrap();
    assert_eq!(memory.len(), 2);
    assert_eq!(memory[1]["agents"], 600);
    assert!(memory[1]["snapshot_bytes_per_agent"].as_f64().unwrap() > 100.0);
    assert!(text.contains("event -> revocation enforced"), "{text}");
}

#[test]
fn the_demo_runs_clean() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(&[
        "demo",
        "--events",
        "2000",
        "--agents",
        "12",
        "--data",
        dir.path().join("demo").to_str().unwrap(),
    ]);
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", stderr(&output));
    // The adapters' own reasons come from their routes (tests/it/lastid.rs, vaultysclaw.rs).
    for reason in custos_event::Reason::ALL
        .into_iter()
        .filter(|reason| !custos_event::Reason::ADAPTERS.contains(reason))
    {
        assert!(
            text.contains(reason.code()),
            "the demo does not show `{}`",
            reason.code()
        );
    }
    assert!(text.contains("OK: every leaf"), "{text}");
    assert!(!text.contains("unexpected"), "{text}");
    // The detection and response loop.
    for shown in [
        "rule custos-memory-poisoning",
        "revoke_agent",
        "-> executed",
        "first malicious event -> enforced revocation:",
        "the agent's next event: rejected (revoked_agent)",
        "memory mem-runbook-poisoned: quarantined (serve: false)",
    ] {
        assert!(text.contains(shown), "the demo does not show `{shown}`:\n{text}");
    }
}

/// `serve` turns transparent huge pages off for itself (the allocator would otherwise ask
/// for them, and zeroing them costs ingest; docs/BENCHMARKS.md).
#[cfg(target_os = "linux")]
#[test]
fn serve_runs_without_transparent_huge_pages() {
    let directory = tempfile::tempdir().unwrap();
    let server = Server::start(directory.path());
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("THP_enabled:"))
        .map(str::to_owned);
    server.stop();
    // Kernels before 5.0 do not report the flag; there is nothing to check there.
    if let Some(line) = line {
        assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
    }
}
