//! SIGKILL under load: every acknowledged event is there exactly once, and verify passes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use custos_event::{AgentKey, Envelope, Kind, Payload, Signer};

use crate::support::{Server, post, run, stdout};

/// What the node acknowledged: payload digest → log index, plus each agent's last envelope.
#[derive(Default)]
struct Acked {
    by_digest: HashMap<[u8; 32], u64>,
    last: HashMap<String, (Envelope, u64)>,
}

fn load(url: String, mut signer: Signer, acked: Arc<Mutex<Acked>>, counter: Arc<AtomicUsize>) {
    loop {
        let batch: Vec<Envelope> = (0..25)
            .map(|n| {
                let mut payload = Payload::new(Kind::ToolCall, chrono::Utc::now());
                payload.action = Some("http.get".into());
                payload.target = Some(format!("https://api.example.com/{n}"));
                signer.sign(payload)
            })
            .collect();
        let body = batch
            .iter()
            .map(Envelope::to_json)
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes();
        let Ok((200, results)) = post(&url, "/v1/events", None, body) else {
            return; // the node is gone: this batch was never acknowledged
        };
        let mut acked = acked.lock().unwrap();
        for (envelope, result) in batch.iter().zip(results.as_array().unwrap()) {
            assert_eq!(result["status"], "accepted", "{result}");
            let index = result["log_index"].as_u64().unwrap();
            acked.by_digest.insert(envelope.payload_digest(), index);
            acked.last.insert(envelope.keyid.clone(), (envelope.clone(), index));
        }
        counter.fetch_add(batch.len(), Ordering::SeqCst);
    }
}

#[test]
fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let token = server.token();
    let acked = Arc::new(Mutex::new(Acked::default()));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for seed in 1..=4u8 {
        let key = AgentKey::from_seed(&[seed; 32]);
        let body = serde_json::json!({"did": key.did(), "realm": "eng"})
            .to_string()
            .into_bytes();
        assert_eq!(post(&server.url, "/v1/agents", Some(&token), body).unwrap().0, 201);
        let (url, acked, counter) = (server.url.clone(), acked.clone(), counter.clone());
        threads.push(std::thread::spawn(move || {
            load(url, Signer::new(key, "eng"), acked, counter)
        }));
    }
    // Kill it mid-stream, after a few segments have been sealed and more is in the WAL.
    let started = Instant::now();
    while counter.load(Ordering::SeqCst) < 1_800 && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill();
    for thread in threads {
        thread.join().unwrap();
    }
    let acked = Arc::into_inner(acked).unwrap().into_inner().unwrap();
    assert!(
        acked.by_digest.len() >= 1_000,
        "only {} acknowledged before the kill",
        acked.by_digest.len()
    );

    // Restart: recovery replays the WAL; resending each agent's last event is a duplicate.
    let server = Server::start(dir.path());
    for (envelope, index) in acked.last.values() {
        let (status, results) = post(&server.url, "/v1/events", None, envelope.to_json().into_bytes()).unwrap();
        assert_eq!(status, 200);
        assert_eq!(results[0]["status"], "duplicate", "{results}");
        assert_eq!(results[0]["log_index"], *index);
    }
    server.stop();

    // Every acknowledged event is in the store exactly once, at the index it was given.
    let info = custos_store::StoreInfo::open(dir.path(), false).unwrap();
    let mut seen: HashMap<[u8; 32], Vec<u64>> = HashMap::new();
    custos_store::Log::open(
        dir.path(),
        &info.store_id,
        "0",
        custos_store::LogConfig::default(),
        custos_store::OpenMode::ReadOnly,
        &mut |entry| seen.entry(entry.payload_blake3).or_default().push(entry.log_index),
    )
    .unwrap();
    for (digest, index) in &acked.by_digest {
        assert_eq!(
            seen.get(digest),
            Some(&vec![*index]),
            "acknowledged event at log index {index}"
        );
    }
    let output = run(&["verify", dir.path().to_str().unwrap(), "--signatures", "--quiet"]);
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).contains("OK:"));
}
