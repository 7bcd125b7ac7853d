//! The sealed store copied to object storage: a real S3-compatible server (moto's
//! server, installed from PyPI by scripts/test) on loopback, a real node copying to it,
//! and `custos verify s3://…` checking the copy, and finding it tampered with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use custos_event::{AgentKey, Signer};

use crate::hardening::signed_lines;
use crate::respond::enroll;
use crate::support::{Server, custos};

/// moto's S3-compatible server (`CUSTOS_MOTO`, or where scripts/test installs it).
fn moto() -> PathBuf {
    if let Ok(path) = std::env::var("CUSTOS_MOTO") {
        return PathBuf::from(path);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = Path::new(&home).join(".cache/custos-tools/venv/bin/moto_server");
    assert!(
        path.exists(),
        "no moto_server at {}: run scripts/test (it installs one) or set CUSTOS_MOTO",
        path.display()
    );
    path
}

struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(moto())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto_server did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The environment an S3 client of this server needs.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ]
    }

    /// moto takes an unsigned request to make a bucket.
    fn bucket(&self, path: &str, body: Vec<u8>) {
        let response = reqwest::blocking::Client::new()
            .put(format!("{}/{path}", self.endpoint))
            .body(body)
            .send()
            .unwrap();
        assert!(response.status().is_success(), "PUT {path}: {}", response.status());
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn verify_copy(s3: &S3, url: &str) -> (bool, serde_json::Value) {
    let output = custos()
        .args(["verify", url, "--signatures", "--json"])
        .envs(s3.env())
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
    (output.status.success(), report)
}

/// A node copies its sealed segments, manifest and checkpoints to S3 as it seals; the
/// copy verifies on its own (`custos verify s3://…`, every signature), holds what the
/// local store holds once stopped, never a key; a segment changed in the bucket is found.
#[test]
fn the_sealed_store_is_copied_to_s3_and_the_copy_verifies() {
    let s3 = S3::start();
    s3.bucket("custos-archive", Vec::new());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let url = "s3://custos-archive/eng-store";
    let mut command = custos();
    command
        .args(["serve", "--data"])
        .arg(&data)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--segment-max-entries",
            "50",
            "--checkpoint-every",
            "10",
        ])
        .args(["--no-detect", "--object-store", url])
        .envs(s3.env());
    let node = Server::spawn(command, &data);
    let token = node.token();
    let mut signer = Signer::new(AgentKey::from_seed(&[77; 32]), "eng");
    enroll(&node.url, &token, signer.did(), "eng");
    for _ in 0..6 {
        let response = reqwest::blocking::Client::new()
            .post(format!("{}/v1/events", node.url))
            .body(signed_lines(&mut signer, 20))
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    // While it runs, the sealed part (two segments of 50) is copied.
    let started = Instant::now();
    loop {
        let (ok, report) = verify_copy(&s3, url);
        if ok && report["logs"][0]["entries"].as_u64() >= Some(100) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the copy did not catch up: {report:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = node.stop();
    assert!(
        log.contains("copying the sealed store to s3://custos-archive/eng-store"),
        "{log}"
    );

    // Stopped (everything sealed): the copy holds every entry the store holds.
    let local = crate::support::run(&["verify", data.to_str().unwrap(), "--json"]);
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).unwrap();
    let (ok, report) = verify_copy(&s3, url);
    assert!(ok, "{report:#}");
    assert_eq!(report["logs"][0]["entries"], local["logs"][0]["entries"]);
    assert_eq!(report["logs"][0]["root"], local["logs"][0]["root"]);

    // Keys and the WAL never leave the node.
    let listed = reqwest::blocking::get(format!("{}/custos-archive?list-type=2", s3.endpoint))
        .unwrap()
        .text()
        .unwrap();
    assert!(listed.contains("segments.ndjson"), "{listed}");
    for secret in ["checkpoint.key", "node.key", "admin.token", "tokens.json", ".wal"] {
        assert!(!listed.contains(secret), "{secret} was copied: {listed}");
    }

    // A segment rewritten in the bucket: the copy no longer verifies, and says where.
    let segment = std::fs::read_dir(data.join("logs/0/segments"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .find(|name| name.ends_with(".parquet"))
        .unwrap();
    let mut bytes = std::fs::read(data.join("logs/0/segments").join(&segment)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    let env = s3.env();
    let settings: Vec<(&str, &str)> = env.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let mut archive = custos_store::archive::Archive::open_with(url, &settings).unwrap();
    archive.put(&format!("logs/0/segments/{segment}"), bytes).unwrap();
    drop(archive);
    let (ok, report) = verify_copy(&s3, url);
    assert!(!ok);
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|problem| problem["code"] == "segment_digest"
            && problem["file"].as_str().unwrap_or_default().contains(&segment)),
        "{report:#}"
    );
}

/// A writer restarted on its data directory does not upload its sealed segments again:
/// they are in the object store already (listed once at its first sync), so only the
/// files that grow (manifest, checkpoints) are copied.
#[test]
fn a_restarted_writer_does_not_upload_its_sealed_segments_again() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let archive_dir = dir.path().join("archive");
    let archive = format!("file://{}", archive_dir.display());
    let data = dir.path().join("store");
    let start = || Server::start_with(&data, &["--object-store", &archive]);
    let node = start();
    let token = node.token();
    let key = AgentKey::from_seed(&[77; 32]);
    enroll(&node.url, &token, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    for _ in 0..6 {
        let (status, answer) =
            crate::support::post(&node.url, "/v1/events", None, signed_lines(&mut signer, 100)).unwrap();
        assert_eq!(status, 200, "{answer}");
    }
    let manifest = archive_dir.join("logs/0/segments.ndjson");
    crate::respond::wait_for("a sealed segment in the object store", || manifest.exists());
    node.stop();
    let segments: Vec<(PathBuf, u64)> = std::fs::read_dir(archive_dir.join("logs/0/segments"))
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let inode = std::fs::metadata(&path).unwrap().ino();
            (path, inode)
        })
        .collect();
    assert!(segments.len() >= 2, "a segment and its seq index: {segments:?}");
    let manifest_inode = std::fs::metadata(&manifest).unwrap().ino();

    let node = start();
    // The restarted archiver copies the manifest again (it does not know it is there)...
    crate::respond::wait_for("the restarted archiver's first copy", || {
        std::fs::metadata(&manifest).is_ok_and(|metadata| metadata.ino() != manifest_inode)
    });
    // ...but no sealed file: each is the same file as before the restart.
    for (path, inode) in &segments {
        assert_eq!(
            std::fs::metadata(path).unwrap().ino(),
            *inode,
            "{} was uploaded again",
            path.display()
        );
    }
    node.stop();
}

/// `--seal-after-secs`: a quiet log (ten events, far below `--segment-max-entries`)
/// seals within seconds, so its entries reach the object store, and the copy verifies.
#[test]
fn a_quiet_log_reaches_the_object_store_after_seal_after_secs() {
    let dir = tempfile::tempdir().unwrap();
    let archive_dir = dir.path().join("archive");
    let archive = format!("file://{}", archive_dir.display());
    let node = Server::start_with(
        &dir.path().join("store"),
        &["--object-store", &archive, "--seal-after-secs", "1"],
    );
    let token = node.token();
    let key = AgentKey::from_seed(&[78; 32]);
    enroll(&node.url, &token, key.did(), "eng");
    let mut signer = Signer::new(key, "eng");
    let (status, answer) = crate::support::post(&node.url, "/v1/events", None, signed_lines(&mut signer, 10)).unwrap();
    assert_eq!(status, 200, "{answer}");
    let manifest = archive_dir.join("logs/0/segments.ndjson");
    crate::respond::wait_for("the quiet log's segment in the object store", || {
        std::fs::read_to_string(&manifest).is_ok_and(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .any(|line| line["end_index"].as_u64().is_some_and(|end| end >= 11))
        })
    });
    let output = custos().args(["verify", &archive]).output().unwrap();
    assert!(output.status.success(), "{}", crate::support::stdout(&output));
    node.stop();
}
