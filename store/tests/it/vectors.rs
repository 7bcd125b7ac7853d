//! The published test vectors in `docs/test-vectors.json` are reproduced exactly by the code.
//!
//! Regenerate after an intentional format change with
//! `CUSTOS_BLESS=1 cargo test -p custos-store --test it vectors`, then update the excerpt
//! in `docs/event-format.md` (this test checks it too).

use base64::Engine as _;
use custos_event::{AgentKey, EVENT_PAYLOAD_TYPE, Envelope, Payload, decode_envelope, pae, verify_signatures};
use custos_store::LogEntry;
use custos_store::checkpoint::{Checkpoint, NoteKey, sign_note, verify_checkpoint};
use custos_store::merkle::Tree;
use serde_json::{Value, json};

/// RFC 8032 §7.1 test 1 secret key.
const SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const LOG_KEY_SEED: [u8; 32] = [0x42; 32];
/// The package's directory as cargo gives it to the running test, so a test binary that
/// cargo reuses from another checkout of the same tree reads this checkout's files.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn docs() -> std::path::PathBuf {
    manifest_dir().join("../docs")
}

fn compute() -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let seed: [u8; 32] = hex::decode(SEED).unwrap().try_into().unwrap();
    let key = AgentKey::from_seed(&seed);
    let did = key.did().to_owned();
    let first = format!(
        r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-15T09:30:00Z","realm":"eng","kind":"tool_call","action":"http.get","target":"https://api.example.com/v1/orders","outcome":"ok","bytes_out":512}}"#
    );
    let second = format!(
        r#"{{"agent":"{did}","seq":1,"prev":"{}","ts":"2026-01-15T09:30:01.250Z","realm":"eng","kind":"llm_call","action":"chat","tokens_in":1200,"tokens_out":310,"attrs":{{"gen_ai.system":"anthropic","gen_ai.request.model":"claude"}}}}"#,
        blake3::hash(first.as_bytes()).to_hex()
    );
    let mut events = Vec::new();
    let mut entries = Vec::new();
    for (position, payload) in [first, second].into_iter().enumerate() {
        Payload::parse(payload.as_bytes()).unwrap();
        let pae_bytes = pae(EVENT_PAYLOAD_TYPE, payload.as_bytes());
        let envelope = key.sign_envelope(EVENT_PAYLOAD_TYPE, payload.clone().into_bytes());
        events.push(json!({
            "payload": payload,
            "payload_base64": b64.encode(payload.as_bytes()),
            "payload_blake3": blake3::hash(payload.as_bytes()).to_hex().to_string(),
            "pae_hex": hex::encode(&pae_bytes),
            "signature_base64": b64.encode(envelope.sig),
            "envelope": envelope.to_json(),
        }));
        entries.push(LogEntry::from_envelope(
            envelope,
            position as u64,
            1_768_469_400_123_456 + position as i64,
            None,
        ));
    }
    let mut tree = Tree::new();
    let leaves: Vec<Value> = entries
        .iter()
        .map(|entry| {
            tree.push(entry.leaf_hash());
            json!({
                "log_index": entry.log_index,
                "ingest_ts_us": entry.ingest_ts_us,
                "leaf_bytes_hex": hex::encode(entry.leaf_bytes()),
                "leaf_hash_hex": hex::encode(entry.leaf_hash()),
            })
        })
        .collect();
    let log_key = AgentKey::from_seed(&LOG_KEY_SEED);
    let checkpoint = Checkpoint {
        origin: "custos/0123456789abcdef/0".into(),
        size: tree.size(),
        root: tree.root(),
    };
    let note = sign_note(&checkpoint.body(), &checkpoint.origin, &log_key);
    let verifier = NoteKey {
        name: checkpoint.origin.clone(),
        public: log_key.public_key(),
    };
    json!({
        "description": "Custos test vectors: see docs/event-format.md and docs/store-format.md",
        "agent": {
            "seed_hex": SEED,
            "public_key_hex": hex::encode(key.public_key()),
            "did": did,
        },
        "payload_type": EVENT_PAYLOAD_TYPE,
        "events": events,
        "leaves": leaves,
        "tree": { "size": tree.size(), "root_hex": hex::encode(tree.root()) },
        "checkpoint": {
            "log_key_seed_hex": hex::encode(LOG_KEY_SEED),
            "verifier_key": verifier.verifier_string(),
            "note": note,
        },
    })
}

#[test]
fn published_vectors_match_the_code() {
    let computed = compute();
    let path = docs().join("test-vectors.json");
    if std::env::var_os("CUSTOS_BLESS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&computed).unwrap() + "\n").unwrap();
    }
    let published: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(published, computed, "docs/test-vectors.json is stale");

    // The vectors verify through the public APIs, as an independent client would use them.
    assert_eq!(
        published["agent"]["public_key_hex"], "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "RFC 8032 test 1 public key"
    );
    for event in published["events"].as_array().unwrap() {
        let decoded = decode_envelope(
            event["envelope"].as_str().unwrap().as_bytes(),
            65536,
            &[EVENT_PAYLOAD_TYPE],
        )
        .unwrap();
        assert_eq!(hex::encode(decoded.envelope.pae()), event["pae_hex"].as_str().unwrap());
        let envelope: &Envelope = &decoded.envelope;
        assert!(verify_signatures(&[(&decoded.key, envelope)])[0].is_ok());
    }
    let key = NoteKey::parse_verifier(published["checkpoint"]["verifier_key"].as_str().unwrap()).unwrap();
    let checkpoint = verify_checkpoint(published["checkpoint"]["note"].as_str().unwrap(), &key).unwrap();
    assert_eq!(
        hex::encode(checkpoint.root),
        published["tree"]["root_hex"].as_str().unwrap()
    );

    // The human-readable excerpt in the docs is the same data.
    let doc = std::fs::read_to_string(docs().join("event-format.md")).unwrap();
    let first = &published["events"][0];
    for field in ["payload", "pae_hex", "signature_base64", "envelope", "payload_blake3"] {
        let value = first[field].as_str().unwrap();
        assert!(
            doc.contains(value),
            "docs/event-format.md lacks event 0 `{field}`: {value}"
        );
    }
    assert!(doc.contains(published["agent"]["did"].as_str().unwrap()));
    assert!(doc.contains(published["leaves"][0]["leaf_hash_hex"].as_str().unwrap()));
}
