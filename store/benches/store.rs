//! WAL group append (with fsync), Merkle append, proof generation, and sealing (a
//! segment's Parquet encoding).

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use custos_event::{AgentKey, Kind, Payload, Signer};
use custos_store::LogEntry;
use custos_store::merkle::{Tree, leaf_hash};
use custos_store::wal::WalWriter;

fn entries(count: usize) -> Vec<LogEntry> {
    let mut signer = Signer::new(AgentKey::from_seed(&[1; 32]), "bench");
    (0..count)
        .map(|index| {
            let mut payload = Payload::new(Kind::ToolCall, chrono::Utc::now());
            payload.action = Some("http.get".into());
            payload.target = Some("https://api.example.com/v1/items".into());
            LogEntry::from_envelope(signer.sign(payload), index as u64, 0, None)
        })
        .collect()
}

fn wal(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("wal_append_fsync");
    for batch in [1usize, 64, 256] {
        let entries = entries(batch);
        let mut writer = WalWriter::open(&dir.path().join(format!("bench-{batch}.wal"))).unwrap();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &entries, |b, entries| {
            b.iter(|| writer.append(entries).unwrap())
        });
    }
    group.finish();
}

fn merkle(c: &mut Criterion) {
    let leaves: Vec<[u8; 32]> = (0..100_000u32).map(|n| leaf_hash(&n.to_le_bytes())).collect();
    let mut group = c.benchmark_group("merkle");
    group.throughput(Throughput::Elements(leaves.len() as u64));
    group.bench_function("append_100k", |b| {
        b.iter_batched(
            Tree::new,
            |mut tree| {
                for leaf in &leaves {
                    tree.push(*leaf);
                }
                tree
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();

    let mut tree = Tree::new();
    for n in 0..1_000_000u32 {
        tree.push(leaf_hash(&n.to_le_bytes()));
    }
    let mut group = c.benchmark_group("proofs_1m");
    group.bench_function("inclusion", |b| {
        let mut index = 0u64;
        b.iter(|| {
            index = (index + 7_919) % 999_999;
            tree.inclusion_proof(index, 999_999).unwrap()
        })
    });
    group.bench_function("consistency", |b| {
        let mut from = 1u64;
        b.iter(|| {
            from = (from + 7_919) % 999_998 + 1;
            tree.consistency_proof(from, 999_999).unwrap()
        })
    });
    group.finish();
}

/// What the seal thread does to the open entries (a segment's Parquet file and its seqs),
/// for 20 000 small events.
fn seal(c: &mut Criterion) {
    let entries = entries(20_000);
    let mut group = c.benchmark_group("seal_20k");
    group.throughput(Throughput::Elements(entries.len() as u64));
    group.sample_size(10);
    group.bench_function("encode_segment", |b| {
        b.iter(|| custos_store::segment::encode_with_seqs("bench", &entries).unwrap())
    });
    group.finish();
}

criterion_group!(benches, wal, merkle, seal);
criterion_main!(benches);
