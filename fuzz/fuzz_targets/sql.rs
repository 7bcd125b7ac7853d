#![no_main]
//! SQL text from any caller → the query path a query process runs: the shape bounds,
//! planning (DataFusion's parser, planner and optimiser with Custos's rules), and
//! execution within small limits over a realm-scoped view of two partitions' real logs
//! (as on a query node over a partition set). Must never panic, overflow its stack or
//! hang: an error answer is fine.
//!
//! Functions that only make big values (`repeat`, `lpad`, `rpad`, …) and table functions
//! that only make many rows (`generate_series`, `range`) are skipped: in a node, what they
//! allocate is bounded by the query process's memory cap, which this in-process target
//! does not have (libFuzzer would report the allocation, not a bug).
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    /// Two partitions' logs, one realm each (a query node over a partition set).
    logs: Vec<custos_query::Sources>,
    /// The did:key of the agent in realm `ops`.
    ops: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_stack_size(64 * 1024 * 1024)
            .enable_all()
            .build()
            .expect("a runtime");
        // Tails of real signed entries in two realms, one partition each: events of two
        // agents.
        let mut logs = Vec::new();
        for (partition, (seed, realm)) in [(1u8, "eng"), (2u8, "ops")].into_iter().enumerate() {
            let mut entries = Vec::new();
            let mut signer =
                custos_event::Signer::new(custos_event::AgentKey::from_seed(&[seed; 32]), realm);
            for index in 0..20u64 {
                let mut payload = custos_event::Payload::new(
                    custos_event::Kind::ALL[(index % 14) as usize],
                    chrono::DateTime::from_timestamp(1_800_000_000 + index as i64 * 60, 0).unwrap_or_default(),
                );
                payload.action = Some(format!("tool.{}", index % 3));
                payload.target = Some(format!("https://api.example.com/{index}"));
                payload.bytes_out = Some(index * 100);
                let envelope = signer.sign(payload);
                let position = entries.len() as u64;
                entries.push(custos_store::LogEntry::from_envelope(
                    envelope,
                    position,
                    1_800_000_000_000_000 + position as i64,
                    None,
                ));
            }
            logs.push(custos_query::Sources {
                partition: Some(partition as u32),
                view: custos_store::StoreView {
                    segment_dir: std::env::temp_dir(),
                    segments: Vec::new(),
                    size: entries.len() as u64,
                    tail: vec![std::sync::Arc::from(entries)],
                    checkpoints: std::env::temp_dir().join("no-checkpoints"),
                },
                agents: Vec::new(),
                rejected: Vec::new(),
                checkpoints: Vec::new(),
                tail_batch: None,
            });
        }
        Fixture {
            runtime,
            ops: custos_event::AgentKey::from_seed(&[2; 32]).did().to_owned(),
            logs,
        }
    })
}

const SKIPPED: [&str; 8] = ["repeat", "lpad", "rpad", "generate_series", "range", "overlay", "concat", "recursive"];

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let lower = sql.to_ascii_lowercase();
    if SKIPPED.iter().any(|name| lower.contains(name)) {
        return;
    }
    if custos_query::shape::check(sql).is_err() {
        return;
    }
    let fixture = fixture();
    let scope = custos_query::Scope {
        role: custos_http::Role::Analyst,
        realms: vec!["eng".to_owned()],
    };
    let limits = custos_query::Limits {
        timeout: std::time::Duration::from_millis(500),
        memory_bytes: 64 << 20,
        max_rows: 1_000,
        ..Default::default()
    };
    let sql = sql.to_owned();
    let logs = fixture.logs.as_slice();
    let ops = fixture.ops.as_str();
    let work = fixture.runtime.spawn(async move {
        let answer = custos_query::sql::run(&sql, logs, &scope, &limits).await;
        if let Ok(answer) = &answer {
            // The analyst's token sees realm `eng` only: the `ops` agent's did:key may
            // appear in no answer, in any format (dictionaries included).
            for format in [custos_query::Format::Json, custos_query::Format::Arrow, custos_query::Format::Parquet] {
                if let Ok(bytes) = custos_query::sql::encode(answer, format) {
                    let leaked = bytes.windows(ops.len()).any(|window| window == ops.as_bytes());
                    assert!(!leaked, "a query scoped to `eng` answered the `ops` agent");
                }
            }
        }
    });
    if let Err(error) = fixture.runtime.block_on(work)
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
});
