//! Witnessing end to end: a real `custos witness` cosigns a real node's checkpoints, and
//! a log whose tail was deleted (WAL, checkpoint lines, caches: everything the node
//! itself could check) is caught by the witness, by `verify --witness` and at start.

use std::io::BufRead as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use custos_event::{AgentKey, Signer};
use serde_json::json;

use crate::respond::{enroll, get, send};
use crate::support::{Server, custos, run, stdout};

/// A `custos witness` child process, killed on drop.
struct Witness {
    child: Child,
    url: String,
    key: String,
}

impl Witness {
    fn start(data: &std::path::Path, log_key: &str) -> Self {
        let mut child = custos()
            .args([
                "witness",
                "--listen",
                "127.0.0.1:0",
                "--name",
                "witness.test/w1",
                "--data",
            ])
            .arg(data)
            .args(["--log", log_key])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (found, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = found.send(line);
            }
        });
        let (mut url, mut key) = (None, None);
        while url.is_none() || key.is_none() {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the witness did not start");
            if let Some(rest) = line.strip_prefix("witness key ") {
                key = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("custos witness on ") {
                url = Some(rest.split_whitespace().next().unwrap().to_owned());
            }
        }
        Self {
            child,
            url: url.unwrap(),
            key: key.unwrap(),
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_witness_catches_a_deleted_tail_that_the_files_alone_hide() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    // First start: the store and its log key exist.
    let server = Server::start_with(&data, &["--no-detect"]);
    let admin = server.token();
    let key = AgentKey::generate().unwrap();
    enroll(&server.url, &admin, key.did(), "eng");
    server.stop();
    let log_key = std::fs::read_to_string(data.join("logs/0/checkpoint.pub")).unwrap();
    let witness = Witness::start(&dir.path().join("witness"), log_key.trim());
    let target = format!("{}@{}", witness.key, witness.url);

    let server = Server::start_with(&data, &["--no-detect", "--witness", &target]);
    let mut signer = Signer::new(key, "eng");
    for _ in 0..24 {
        let objects: Vec<_> = (0..50)
            .map(|index| json!({"kind": "tool_call", "action": format!("a{index}")}))
            .collect();
        for result in send(&server.url, &mut signer, &objects) {
            assert_eq!(result["status"], "accepted");
        }
    }
    // 1 201 entries: segments up to 1 000 sealed, the rest in the WAL. Wait until the
    // witness has cosigned all of it, then crash the node.
    let started = Instant::now();
    loop {
        let (_, checkpoint) = get(&server.url, "/v1/checkpoints/latest", &admin);
        if checkpoint["size"] == 1201 && checkpoint["cosigned_by"] == 1 {
            assert!(
                checkpoint["note"]
                    .as_str()
                    .unwrap()
                    .contains("\u{2014} witness.test/w1 ")
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never cosigned: {checkpoint}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    server.kill();
    let cosignatures = std::fs::read_to_string(data.join("logs/0/cosignatures.ndjson")).unwrap();
    assert!(cosignatures.contains("witness.test/w1"));

    // Verified against the witness, the intact store checks out.
    let witnessed = |data: &std::path::Path| {
        run(&[
            "verify",
            data.to_str().unwrap(),
            "--witness",
            &witness.key,
            "--witness-url",
            &witness.url,
        ])
    };
    let output = witnessed(&data);
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        crate::support::stderr(&output)
    );

    // With the key alone, verify uses the largest cosigned checkpoint the node kept.
    let output = run(&["verify", data.to_str().unwrap(), "--witness", &witness.key]);
    assert!(output.status.success(), "{}", stdout(&output));

    // The attack: every WAL file, the checkpoint lines above the last sealed segment, and
    // the caches that would give it away, deleted.
    let log = data.join("logs/0");
    let manifest = std::fs::read_to_string(log.join("segments.ndjson")).unwrap();
    let sealed_end = manifest
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["end_index"]
                .as_u64()
                .unwrap()
        })
        .max()
        .unwrap();
    assert!(sealed_end < 1201);
    for entry in std::fs::read_dir(log.join("wal")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let checkpoints = std::fs::read_to_string(log.join("checkpoints.ndjson")).unwrap();
    let kept: Vec<&str> = checkpoints
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["size"]
                .as_u64()
                .unwrap()
                <= sealed_end
        })
        .collect();
    std::fs::write(log.join("checkpoints.ndjson"), kept.join("\n") + "\n").unwrap();
    std::fs::remove_dir_all(log.join("tree")).unwrap();
    std::fs::remove_file(data.join("state/registry.json")).unwrap();

    // The files alone look fine...
    let output = run(&["verify", data.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stdout(&output));
    // ...the witness does not.
    let output = witnessed(&data);
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stdout(&output).contains("behind_witness"), "{}", stdout(&output));
    // A saved cosigned checkpoint works offline too.
    let note = reqwest::blocking::get(format!(
        "{}/checkpoints/latest?origin={}",
        witness.url,
        urlencode(log_key.split('+').next().unwrap())
    ))
    .unwrap()
    .text()
    .unwrap();
    let saved = dir.path().join("witnessed.note");
    std::fs::write(&saved, note).unwrap();
    let output = run(&[
        "verify",
        data.to_str().unwrap(),
        "--witness",
        &witness.key,
        "--witness-checkpoint",
        saved.to_str().unwrap(),
    ]);
    assert!(stdout(&output).contains("behind_witness"), "{}", stdout(&output));

    // The cosignatures the node kept catch it too, while the attacker leaves them.
    let output = run(&["verify", data.to_str().unwrap(), "--witness", &witness.key]);
    assert!(stdout(&output).contains("behind_witness"), "{}", stdout(&output));

    // And a node told about the witness refuses to start on it.
    let output = custos()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-detect",
            "--witness",
            &target,
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("witness.test/w1") && stderr.contains("removed"),
        "{stderr}"
    );
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
