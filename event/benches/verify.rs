//! Single vs batch ed25519 verification of Custos envelopes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use custos_event::{AgentKey, Kind, Payload, Signer, verify_signatures};

fn envelopes(count: usize) -> (Vec<ed25519_dalek::VerifyingKey>, Vec<custos_event::Envelope>) {
    let ts = chrono::Utc::now();
    let mut keys = Vec::new();
    let mut out = Vec::new();
    for agent in 0..16u8 {
        let key = AgentKey::from_seed(&[agent + 1; 32]);
        let public = custos_event::verifying_key_from_did(key.did()).unwrap();
        let mut signer = Signer::new(key, "bench");
        for _ in 0..count / 16 {
            let mut payload = Payload::new(Kind::ToolCall, ts);
            payload.action = Some("http.get".into());
            payload.target = Some("https://api.example.com/v1/items".into());
            out.push(signer.sign(payload));
            keys.push(public);
        }
    }
    (keys, out)
}

fn bench(c: &mut Criterion) {
    let (keys, envelopes) = envelopes(1024);
    let items: Vec<_> = keys.iter().zip(envelopes.iter()).collect();
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(items.len() as u64));
    group.bench_function(BenchmarkId::new("single", items.len()), |b| {
        b.iter(|| {
            for (key, envelope) in &items {
                custos_event::verify::verify_one(key, envelope).unwrap();
            }
        })
    });
    group.bench_function(BenchmarkId::new("batch_parallel", items.len()), |b| {
        b.iter(|| assert!(verify_signatures(&items).iter().all(Result::is_ok)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
