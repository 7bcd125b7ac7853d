//! Evidence bundles: exported through the CLI from a real node, verified offline, and
//! every tamper case (a changed, removed or added file or row) detected and named.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use custos_event::{AgentKey, Signer};
use serde_json::{Value, json};

use crate::respond::{enroll, get, send};
use crate::support::{Server, post, run, stderr, stdout};

fn read_tar(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut files = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        files.insert(name, content);
    }
    files
}

fn write_tar(path: &Path, files: &BTreeMap<String, Vec<u8>>) {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
    }
    std::fs::write(path, builder.into_inner().unwrap()).unwrap();
}

/// Runs `custos evidence verify`; returns (success, stdout).
fn verify(path: &Path, node_key: &str) -> (bool, String) {
    let output = run(&["evidence", "verify", path.to_str().unwrap(), "--node-key", node_key]);
    (output.status.success(), stdout(&output))
}

#[test]
fn bundles_verify_offline_and_every_tamper_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("store"), &["--no-detect"]);
    let admin = server.token();
    let url = server.url.clone();
    let start = chrono::Utc::now() - chrono::Duration::minutes(1);
    let mut signers = Vec::new();
    for realm in ["eng", "ops"] {
        let key = AgentKey::generate().unwrap();
        enroll(&url, &admin, key.did(), realm);
        let mut signer = Signer::new(key, realm);
        // 600 entries with 500-entry segments: the bundle spans a segment and the tail.
        let objects: Vec<Value> = (0..300)
            .map(|i| json!({"kind": "tool_call", "action": "search", "target": format!("{realm}/doc{i}")}))
            .collect();
        assert!(
            send(&url, &mut signer, &objects)
                .iter()
                .all(|result| result["status"] == "accepted")
        );
        signers.push(signer);
    }
    let end = chrono::Utc::now() + chrono::Duration::minutes(1);
    let (_, checkpoint) = get(&url, "/v1/checkpoints/latest", &admin);
    let node_key = checkpoint["node_did"].as_str().unwrap().to_owned();
    let (status, answer) = post(
        &url,
        "/v1/tokens",
        Some(&admin),
        json!({"role": "compliance", "realms": ["eng"]})
            .to_string()
            .into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 201);
    let compliance = answer["token"].as_str().unwrap().to_owned();

    let bundle = dir.path().join("eng.tar");
    let (from, to) = (start.to_rfc3339(), end.to_rfc3339());
    let export = |realm: &str, out: &Path| {
        run(&[
            "evidence",
            "export",
            "--realm",
            realm,
            "--from",
            &from,
            "--to",
            &to,
            "--out",
            out.to_str().unwrap(),
            "--url",
            &url,
            "--token",
            &compliance,
        ])
    };
    let output = export("eng", &bundle);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("300 entries"), "{}", stderr(&output));
    // A compliance token for eng may not export ops.
    let output = export("ops", &dir.path().join("ops.tar"));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("`ops`"), "{}", stderr(&output));
    // One agent: its own rows only; an agent of another realm yields nothing from eng.
    let agent_bundle = dir.path().join("agent.tar");
    let export_agent = |agent: &str, out: &Path| {
        run(&[
            "evidence",
            "export",
            "--realm",
            "eng",
            "--agent",
            agent,
            "--from",
            &from,
            "--to",
            &to,
            "--out",
            out.to_str().unwrap(),
            "--url",
            &url,
            "--token",
            &compliance,
        ])
    };
    let output = export_agent(signers[0].did(), &agent_bundle);
    assert!(stderr(&output).contains("300 entries"), "{}", stderr(&output));
    let output = export_agent(signers[1].did(), &dir.path().join("none.tar"));
    assert!(stderr(&output).contains(" 0 entries"), "{}", stderr(&output));
    server.stop();

    let (ok, text) = verify(&agent_bundle, &node_key);
    assert!(ok && text.contains(&format!("agent {}", signers[0].did())), "{text}");
    // Offline: the server is gone.
    let (ok, text) = verify(&bundle, &node_key);
    assert!(ok, "{text}");
    assert!(text.contains("events.parquet: 300 rows checked"), "{text}");
    let files = read_tar(&bundle);
    for name in [
        "manifest.json",
        "events.parquet",
        "findings.parquet",
        "actions.parquet",
        "checkpoints.json",
        "proofs/inclusion.ndjson",
        "proofs/consistency.json",
        "keys.json",
        "ocsf.json",
        "README.txt",
    ] {
        assert!(files.contains_key(name), "{name} missing from {:?}", files.keys());
    }
    let ocsf: Value = serde_json::from_slice(&files["ocsf.json"]).unwrap();
    assert_eq!(ocsf.as_array().unwrap().len(), 300);
    assert_eq!(ocsf[0]["class_uid"], 6003);
    assert!(!String::from_utf8_lossy(&files["events.parquet"]).contains("ops/doc"));

    // Someone else's key is not the node's.
    let other = AgentKey::generate().unwrap();
    let (ok, text) = verify(&bundle, other.did());
    assert!(!ok && text.contains("pinned node key"), "{text}");

    let tampered = dir.path().join("tampered.tar");
    let check = |files: &BTreeMap<String, Vec<u8>>, expect: &[&str]| {
        write_tar(&tampered, files);
        let (ok, text) = verify(&tampered, &node_key);
        assert!(!ok, "tampering passed: {text}");
        for needle in expect {
            assert!(text.contains(needle), "expected `{needle}` in:\n{text}");
        }
    };
    // A file altered, removed, added.
    let mut altered = files.clone();
    altered.get_mut("keys.json").unwrap().push(b' ');
    check(&altered, &["keys.json: altered"]);
    let mut removed = files.clone();
    removed.remove("proofs/inclusion.ndjson");
    check(
        &removed,
        &[
            "proofs/inclusion.ndjson: listed in the manifest but missing",
            "no inclusion proof",
        ],
    );
    let mut added = files.clone();
    added.insert("extra.csv".into(), b"a,b\n".to_vec());
    check(&added, &["extra.csv: not listed in the manifest (added)"]);
    let mut unsigned = files.clone();
    unsigned.remove("manifest.json");
    check(&unsigned, &["manifest.json: missing"]);

    // Rows: removed, added, changed. The file digest changes (named), and each row-level
    // check names what it found even with the manifest's digest set aside.
    let segment = custos_store::segment::decode(bytes::Bytes::from(files["events.parquet"].clone())).unwrap();
    let entries: Vec<custos_store::LogEntry> = segment.rows.iter().map(|row| row.entry.clone()).collect();
    let rewrite = |entries: &[custos_store::LogEntry]| {
        let mut copy = files.clone();
        copy.insert(
            "events.parquet".into(),
            custos_store::segment::encode("0", entries).unwrap(),
        );
        copy
    };
    let removed_index = entries[7].log_index;
    let mut fewer = entries.clone();
    fewer.remove(7);
    check(
        &rewrite(&fewer),
        &[
            "events.parquet: altered",
            "events.parquet: 299 rows where the manifest says 300",
            &format!("log index {removed_index} is proven but has no row"),
        ],
    );
    let mut more = entries.clone();
    let mut forged = signers[0]
        .sign_object(
            json!({"kind": "tool_call", "action": "forged"})
                .as_object()
                .unwrap()
                .clone(),
            chrono::Utc::now(),
        )
        .unwrap();
    forged.payload_type = custos_event::EVENT_PAYLOAD_TYPE.into();
    more.push(custos_store::LogEntry::from_envelope(forged, 99_999, 0, None));
    check(&rewrite(&more), &["301 rows", "log index 99999): no inclusion proof"]);
    let mut changed = entries.clone();
    let text = String::from_utf8(changed[3].payload.clone())
        .unwrap()
        .replace("search", "delete");
    changed[3].payload = text.into_bytes();
    changed[3].payload_blake3 = *blake3::hash(&changed[3].payload).as_bytes();
    check(
        &rewrite(&changed),
        &[&format!("log index {})", entries[3].log_index), "signature"],
    );
}
