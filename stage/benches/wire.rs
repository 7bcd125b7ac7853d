//! What the distributed mode's records cost to encode and decode, beside the batch
//! signature check of the same 256 events (the work an ingest node and the embedded
//! node both do): a submission of 256 verified envelopes (ingest node → writer), and
//! the committed `events` record of the same 256 appended events (writer → stages).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use custos_event::verify::{KeyCache, check_event, decode_envelope_cached};
use custos_event::{AgentKey, EVENT_PAYLOAD_TYPE, Observation, Signal, SignedEntry, Signer, verify_signatures};
use custos_stage::{EventBatch, EventItem, ItemCheck, Submission, wire};

const EVENTS: usize = 256;

/// 256 envelopes of one agent as a client sends them, each about 700 bytes.
fn raws() -> Vec<Vec<u8>> {
    let key = AgentKey::from_seed(&[7; 32]);
    let mut signer = Signer::new(key, "eng");
    (0..EVENTS)
        .map(|n| {
            let event = serde_json::json!({"kind": "tool_call", "action": "web.search",
                "target": format!("https://intranet.example.com/finance/reports/{n}"),
                "attrs": {"query": "quarterly revenue by region", "tokens": 1234, "model": "gpt-x"}});
            signer
                .sign_object(event.as_object().unwrap().clone(), chrono::Utc::now())
                .unwrap()
                .to_json()
                .into_bytes()
        })
        .collect()
}

#[allow(clippy::print_stdout)] // prints the record sizes beside criterion's own output
fn bench(c: &mut Criterion) {
    let raws = raws();
    let keys = KeyCache::default();
    let submission = Submission::Events(EventBatch {
        remote: "192.0.2.1:40000".into(),
        realm: "eng".into(),
        items: raws
            .iter()
            .map(|raw| EventItem {
                raw: raw.clone(),
                keyid: None,
                check: ItemCheck::Verified,
            })
            .collect(),
    });
    let submitted = wire::encode_submission("origin", 1, &submission).unwrap();
    let now = chrono::Utc::now();
    let observations: Vec<Observation> = raws
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            let envelope = decode_envelope_cached(raw, usize::MAX, &[EVENT_PAYLOAD_TYPE], Some(&keys))
                .unwrap()
                .envelope;
            let entry = SignedEntry {
                keyid: envelope.keyid.clone(),
                sig: envelope.sig.to_vec(),
                payload: envelope.payload.clone(),
                ingest_ts_us: now.timestamp_micros(),
            };
            Observation {
                log_index: Some(index as u64),
                ingest_ts: now,
                payload: check_event(envelope).unwrap().payload,
                signal: Signal::Accepted { gap: None },
                entry: Some(Box::new(entry)),
            }
        })
        .collect();
    let committed = wire::encode_events(&observations).unwrap();

    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(EVENTS as u64));
    // The baseline: what every path does to each event.
    group.bench_function(BenchmarkId::new("decode_and_verify", EVENTS), |b| {
        b.iter(|| {
            let decoded: Vec<_> = raws
                .iter()
                .map(|raw| decode_envelope_cached(raw, usize::MAX, &[EVENT_PAYLOAD_TYPE], Some(&keys)).unwrap())
                .collect();
            let pairs: Vec<_> = decoded.iter().map(|d| (&d.key, &d.envelope)).collect();
            assert!(verify_signatures(&pairs).iter().all(Result::is_ok));
        })
    });
    group.bench_function(BenchmarkId::new("encode_submission", EVENTS), |b| {
        b.iter(|| wire::encode_submission("origin", 1, &submission).unwrap())
    });
    group.bench_function(BenchmarkId::new("decode_submission", EVENTS), |b| {
        b.iter(|| wire::decode_submission(&submitted).unwrap())
    });
    group.bench_function(BenchmarkId::new("encode_committed_events", EVENTS), |b| {
        b.iter(|| wire::encode_events(&observations).unwrap())
    });
    group.bench_function(BenchmarkId::new("decode_committed_events", EVENTS), |b| {
        b.iter(|| wire::decode_committed(&committed).unwrap())
    });
    group.finish();
    // The record sizes, for docs/BENCHMARKS.md (a bench's own output).
    println!(
        "sizes for {EVENTS} events: envelopes {} bytes, submission record {} bytes, committed record {} bytes",
        raws.iter().map(Vec::len).sum::<usize>(),
        submitted.len(),
        committed.len()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
