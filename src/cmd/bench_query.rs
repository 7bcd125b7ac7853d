//! `custos bench query`: typical SOC queries over a generated store, each beside DuckDB on
//! the same Parquet files in the same run, and inclusion-proof latency at that size.
//!
//! ```text
//!  1. generate  agents sign events (every core) ─▶ Log::append in time order ─▶ sealed
//!               Parquet segments + Merkle tree + checkpoints (plus detector findings)
//!  2. queries   custos: realm-scoped DataFusion views (the /v1/sql path), median of N
//!               baseline: DuckDB (scripts/bench-duckdb.py) over the same segment files
//!  3. proofs    inclusion proofs at the full tree size, p50/p99
//!               baseline: verifying those proofs (the client's side)
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{TimeZone as _, Utc};
use clap::Args;
use custos_event::{AgentKey, FINDING_PAYLOAD_TYPE, Kind, Outcome, Payload, Signer};
use custos_store::LogEntry;
use custos_store::log::{Log, LogConfig, OpenMode};
use rayon::prelude::*;
use serde_json::{Value, json};

use super::bench::percentile;

#[derive(Args)]
#[command(after_help = "\
Needs DuckDB for the baseline: `pip install duckdb` (the script is scripts/bench-duckdb.py).

Examples:
  cargo run --release -- bench query                      # 10M events, 5 runs per query
  cargo run --release -- bench query --events 1000000 --runs 3
  cargo run --release -- bench query --data /tmp/q10m          # build a store and keep it
  cargo run --release -- bench query --data /tmp/q10m          # again: reuses it
  cargo run --release -- bench query --data /tmp/q10m --explain  # plans with their metrics

A --data directory that already holds a store from an earlier run is reused as it is (the
store's own size is measured, whatever --events, --agents or --days say).

Each answer is compared with DuckDB's row by row; a difference is printed and fails the
command (the timings would not be comparable). Timings are not pass/fail; figures go to
docs/BENCHMARKS.md with the command.")]
pub(crate) struct QueryArgs {
    /// Events in the generated store.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Agents signing them.
    #[arg(long, default_value_t = 2_000)]
    agents: usize,
    /// Realms the agents are spread over.
    #[arg(long, default_value_t = 8)]
    realms: usize,
    /// Days of simulated time the events span.
    #[arg(long, default_value_t = 7)]
    days: i64,
    /// Timed runs per query (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where to build the store, which is kept (and reused by later runs). By default a
    /// temporary directory, removed at the end.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Python with the `duckdb` package.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The DuckDB baseline script (by default the one in the source tree this binary was
    /// built from).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-duckdb.py"))]
    script: PathBuf,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
    /// Run only this query (repeatable): agent_time_range, top_talkers,
    /// rare_tools_per_realm, findings_join_events, kinds_per_hour.
    #[arg(long = "only", value_name = "QUERY")]
    only: Vec<String>,
    /// Skip the DuckDB baseline (to profile Custos alone).
    #[arg(long)]
    no_duckdb: bool,
    /// Print each query's `EXPLAIN ANALYZE` (the plan with its operators' metrics) once.
    #[arg(long)]
    explain: bool,
}

/// The common tools; besides them, about one tool call in 2 000 uses one of
/// [`RARE_TOOLS`] tools only a few agents of each realm ever call.
const TOOLS: [&str; 12] = [
    "search",
    "read_doc",
    "write_doc",
    "http_get",
    "sql",
    "send_mail",
    "calendar",
    "shell",
    "summarise",
    "translate",
    "code_exec",
    "vector_lookup",
];

/// How many rarely used tools the fleet has, beside [`TOOLS`].
const RARE_TOOLS: u16 = 64;

/// The queries, in our dialect and in DuckDB's (the DuckDB ones run in the script).
fn queries(agent: &str, from: &str, to: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "agent_time_range",
            format!(
                "SELECT log_index, ts, kind, action, target FROM events WHERE agent = '{agent}' \
                 AND ts >= TIMESTAMP '{from}' AND ts < TIMESTAMP '{to}' ORDER BY log_index"
            ),
        ),
        (
            "top_talkers",
            "SELECT agent, sum(bytes_out) AS bytes FROM events GROUP BY agent ORDER BY bytes DESC LIMIT 10".into(),
        ),
        (
            "rare_tools_per_realm",
            "SELECT realm, action, count(*) AS n FROM events WHERE kind = 'tool_call' GROUP BY realm, action \
             HAVING count(*) < 100 ORDER BY realm, n, action"
                .into(),
        ),
        (
            "findings_join_events",
            "SELECT f.id, f.severity, count(e.log_index) AS events FROM findings f JOIN events e \
             ON e.agent = f.agent AND e.ts >= f.ts - INTERVAL '1' HOUR AND e.ts <= f.ts \
             GROUP BY f.id, f.severity ORDER BY events DESC, f.id LIMIT 20"
                .into(),
        ),
        (
            "kinds_per_hour",
            "SELECT date_trunc('hour', ts) AS hour, kind, count(*) AS n FROM events GROUP BY 1, 2 ORDER BY 1, 2".into(),
        ),
    ]
}

pub(crate) async fn query(args: QueryArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events >= 10_000,
        "--events {} is too few to measure anything; use at least 10000",
        args.events
    );
    anyhow::ensure!(
        args.agents >= 1 && args.realms >= 1,
        "--agents and --realms must be at least 1"
    );
    anyhow::ensure!(
        args.no_duckdb || args.script.is_file(),
        "the DuckDB baseline script {} does not exist; pass --script PATH (scripts/bench-duckdb.py \
         in the source tree) or --no-duckdb",
        args.script.display()
    );
    let temporary;
    let data = match &args.data {
        Some(data) => data.clone(),
        None => {
            temporary = tempfile::tempdir()?;
            temporary.path().to_owned()
        }
    };
    let started = Instant::now();
    let generated = tokio::task::block_in_place(|| generate(&args, &data))?;
    let generate_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} {} entries ({} findings) in {generate_secs:.0} s: {} segments, {:.1} MiB of Parquet",
        if generated.reused { "opened" } else { "generated" },
        generated.size,
        generated.findings,
        generated.view.segments.len(),
        directory_bytes(&generated.view.segment_dir) as f64 / (1024.0 * 1024.0)
    );

    let (from, to) = (
        generated
            .start
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .replace('T', " ")
            .replace('Z', ""),
        (generated.start + chrono::Duration::days(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            .replace('T', " ")
            .replace('Z', ""),
    );
    let mut queries = queries(&generated.sample_agent, &from, &to);
    for name in &args.only {
        anyhow::ensure!(
            queries.iter().any(|(known, _)| known == name),
            "--only {name}: no such query; the queries are {}",
            queries.iter().map(|(known, _)| *known).collect::<Vec<_>>().join(", ")
        );
    }
    if !args.only.is_empty() {
        queries.retain(|(name, _)| args.only.iter().any(|only| only == name));
    }
    let sources = custos_query::tables::Sources {
        partition: None,
        view: generated.view.clone(),
        agents: Vec::new(),
        rejected: Vec::new(),
        checkpoints: Vec::new(),
        tail_batch: None,
    };
    let scope = custos_query::tables::Scope {
        role: custos_http::Role::Admin,
        realms: Vec::new(),
    };
    let limits = custos_query::Limits {
        timeout: Duration::from_secs(600),
        memory_bytes: 4 << 30,
        max_rows: 10_000_000,
        ..Default::default()
    };
    if args.explain {
        for (name, sql) in &queries {
            let answer = custos_query::sql::run(
                &format!("EXPLAIN ANALYZE {sql}"),
                std::slice::from_ref(&sources),
                &scope,
                &limits,
            )
            .await
            .map_err(|error| anyhow::anyhow!("{name}: {}", error.message))?;
            eprintln!("== {name}");
            for batch in &answer.batches {
                let plans =
                    arrow::compute::cast(batch.column(batch.num_columns() - 1), &arrow::datatypes::DataType::Utf8)?;
                let plans = arrow::array::AsArray::as_string::<i32>(&plans);
                for plan in plans.iter().flatten() {
                    eprintln!("{plan}");
                }
            }
        }
    }
    let mut ours = Vec::new();
    let mut duck = json!({"version": "not run", "queries": {}});
    for (name, sql) in &queries {
        let mut times = Vec::new();
        let mut rows = 0;
        let mut plain = Vec::new();
        for run in 0..=args.runs {
            let started = Instant::now();
            let answer = custos_query::sql::run(sql, std::slice::from_ref(&sources), &scope, &limits)
                .await
                .map_err(|error| anyhow::anyhow!("{name}: {}", error.message))?;
            if run > 0 {
                times.push(started.elapsed());
            }
            rows = answer.rows;
            if run == 0 {
                plain = plain_rows(&answer.batches).with_context(|| format!("{name}: reading the answer"))?;
            }
        }
        times.sort();
        let median = percentile(&times, 0.5);
        eprintln!(
            "custos  {name:<22} {:>9.1} ms  ({rows} rows)",
            median.as_secs_f64() * 1e3
        );
        ours.push((*name, median, rows, plain));
        // DuckDB right after, query by query: both engines see the machine within
        // seconds of each other, so a load change moves both figures, not one ratio.
        if !args.no_duckdb {
            let mut theirs = duckdb_baseline(&args, &generated, &from, &to, name)?;
            let answer = theirs["queries"][*name].take();
            eprintln!(
                "duckdb  {name:<22} {:>9.1} ms  ({} rows)",
                answer["median_ms"].as_f64().unwrap_or(f64::NAN),
                answer["rows"]
            );
            duck["version"] = theirs["version"].take();
            duck["queries"][*name] = answer;
        }
    }

    let proofs = tokio::task::block_in_place(|| proof_latency(&generated.log, generated.size));

    println!(
        "custos bench query: {} entries ({} findings){}; median of {} runs (DuckDB {})",
        generated.size,
        generated.findings,
        if generated.reused {
            " in a reused store".to_owned()
        } else {
            format!(", {} agents, {} realms, {} days", args.agents, args.realms, args.days)
        },
        args.runs,
        duck["version"].as_str().unwrap_or("?")
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8} {:>10}",
        "query", "custos ms", "duckdb ms", "ratio", "rows"
    );
    let mut results = Vec::new();
    let mut disagreements = 0;
    for (name, median, rows, plain) in &ours {
        let ms = median.as_secs_f64() * 1e3;
        let answer = &duck["queries"][name];
        let Some(theirs) = answer["median_ms"].as_f64() else {
            // DuckDB was not run (--no-duckdb): Custos's figure alone.
            println!("{name:<22} {ms:>12.1} {:>12} {:>8} {rows:>10}", "-", "-");
            results.push(json!({"query": name, "custos_ms": ms, "rows": rows}));
            continue;
        };
        let their_plain: Vec<String> = answer["answer"]
            .as_array()
            .map(|rows| rows.iter().filter_map(|row| row.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let agree = their_plain == *plain;
        println!(
            "{name:<22} {ms:>12.1} {theirs:>12.1} {:>7.2}x {:>10}{}",
            ms / theirs,
            rows,
            if agree {
                String::new()
            } else {
                disagreements += 1;
                format!("  ANSWERS DIFFER: {}", first_difference(plain, &their_plain))
            }
        );
        results.push(json!({"query": name, "custos_ms": ms, "duckdb_ms": theirs, "ratio": ms / theirs, "rows": rows, "answers_agree": agree}));
    }
    println!(
        "inclusion proof at size {}: p50 {:.1} µs, p99 {:.1} µs (verifying one: p50 {:.1} µs; ratio {:.1}x)",
        generated.size,
        proofs.prove_p50.as_secs_f64() * 1e6,
        proofs.prove_p99.as_secs_f64() * 1e6,
        proofs.verify_p50.as_secs_f64() * 1e6,
        proofs.prove_p50.as_secs_f64() / proofs.verify_p50.as_secs_f64()
    );
    if !generated.reused {
        println!(
            "generation: {generate_secs:.0} s ({:.0} entries/s, signing included)",
            generated.size as f64 / generate_secs
        );
    }
    if args.json {
        println!(
            "{}",
            json!({
                "entries": generated.size, "findings": generated.findings, "reused": generated.reused,
                "agents": args.agents, "realms": args.realms, "runs": args.runs,
                "queries": results,
                "inclusion_proof_us": {"p50": proofs.prove_p50.as_secs_f64() * 1e6, "p99": proofs.prove_p99.as_secs_f64() * 1e6,
                                        "verify_p50": proofs.verify_p50.as_secs_f64() * 1e6},
                "duckdb_version": duck["version"],
            })
        );
    }
    if args.data.is_some() {
        eprintln!("store kept at {}", data.display());
    }
    anyhow::ensure!(
        disagreements == 0,
        "{disagreements} queries answered differently from DuckDB (above); the timings are not comparable"
    );
    Ok(())
}

/// An answer as sorted rows of plain JSON values, the form scripts/bench-duckdb.py gives
/// DuckDB's: numbers, text (dictionaries and views included), timestamps as microseconds
/// since the epoch, null.
fn plain_rows(batches: &[arrow::array::RecordBatch]) -> anyhow::Result<Vec<String>> {
    use arrow::array::AsArray as _;
    use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit};
    let mut rows = Vec::new();
    for batch in batches {
        let mut columns: Vec<Vec<Value>> = Vec::new();
        for column in batch.columns() {
            let values = match column.data_type() {
                DataType::Timestamp(_, _) => {
                    let micros = arrow::compute::cast(column, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
                    let micros = arrow::compute::cast(&micros, &DataType::Int64)?;
                    let micros = micros.as_primitive::<Int64Type>();
                    each(micros, |row| json!(micros.value(row)))
                }
                kind if kind.is_integer() => {
                    let numbers = arrow::compute::cast(column, &DataType::Int64)?;
                    let numbers = numbers.as_primitive::<Int64Type>();
                    each(numbers, |row| json!(numbers.value(row)))
                }
                kind if kind.is_floating() => {
                    let numbers = arrow::compute::cast(column, &DataType::Float64)?;
                    let numbers = numbers.as_primitive::<Float64Type>();
                    each(numbers, |row| json!(numbers.value(row)))
                }
                _ => {
                    let texts = arrow::compute::cast(column, &DataType::Utf8)?;
                    let texts = texts.as_string::<i32>();
                    each(texts, |row| json!(texts.value(row)))
                }
            };
            columns.push(values);
        }
        for row in 0..batch.num_rows() {
            let values: Vec<&Value> = columns.iter().map(|column| &column[row]).collect();
            rows.push(serde_json::to_string(&values)?);
        }
    }
    rows.sort();
    Ok(rows)
}

/// `value` of each row of `array`, null where the row is.
fn each(array: &dyn arrow::array::Array, value: impl Fn(usize) -> Value) -> Vec<Value> {
    (0..array.len())
        .map(|row| if array.is_valid(row) { value(row) } else { Value::Null })
        .collect()
}

/// The first row one answer has and the other lacks, for the mismatch message.
fn first_difference(ours: &[String], theirs: &[String]) -> String {
    let only_ours = ours.iter().find(|row| theirs.binary_search(row).is_err());
    let only_theirs = theirs.iter().find(|row| ours.binary_search(row).is_err());
    format!(
        "{} rows against DuckDB's {}; first only in Custos: {}; first only in DuckDB: {}",
        ours.len(),
        theirs.len(),
        only_ours.map_or("none", String::as_str),
        only_theirs.map_or("none", String::as_str)
    )
}

/// Runs scripts/bench-duckdb.py over the same segment files for one query: its JSON answer.
fn duckdb_baseline(
    args: &QueryArgs,
    generated: &Generated,
    from: &str,
    to: &str,
    query: &str,
) -> anyhow::Result<Value> {
    let script = &args.script;
    let mut command = Command::new(&args.python);
    command
        .arg(script)
        .arg("--segments")
        .arg(&generated.view.segment_dir)
        .args(["--runs", &args.runs.to_string()])
        .args(["--agent", &generated.sample_agent, "--from", from, "--to", to]);
    command.args(["--only", query]);
    let output = command
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the DuckDB baseline failed (pip install duckdb?): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).context("reading the DuckDB script's JSON")
}

struct Generated {
    log: Log,
    view: custos_store::StoreView,
    size: u64,
    findings: u64,
    start: chrono::DateTime<Utc>,
    sample_agent: String,
    /// An existing store was opened instead of generating one.
    reused: bool,
}

/// Signs `args.events` events from `args.agents` agents over `args.days`, in time slices
/// (every core signs; one thread appends), plus a finding every 10 000 events.
fn generate(args: &QueryArgs, data: &Path) -> anyhow::Result<Generated> {
    let config = LogConfig {
        segment_max_entries: 1_000_000,
        checkpoint_every: 100_000,
        checkpoint_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let start = Utc
        .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
        .single()
        .context("start time")?;
    let mut signers: Vec<Signer> = (0..args.agents)
        .map(|agent| {
            let seed = blake3::hash(format!("bench-query-agent-{agent}").as_bytes());
            let realm = format!("realm{}", agent % args.realms);
            Signer::new(AgentKey::from_seed(seed.as_bytes()), &realm)
        })
        .collect();
    let sample_agent = signers[0].did().to_owned();
    let mut findings = 0u64;
    let reusing = data.join("logs").is_dir();
    if reusing {
        eprintln!(
            "{} holds a store: reusing it (opening it rebuilds the tree)",
            data.display()
        );
    }
    let mut log = Log::open(data, "bench", "0", config, OpenMode::ReadWrite, &mut |entry| {
        findings += u64::from(entry.payload_type == FINDING_PAYLOAD_TYPE);
    })?;
    if reusing {
        anyhow::ensure!(
            log.next_index() > 0,
            "{} holds an empty store; remove it or give an empty --data",
            data.display()
        );
        return Ok(Generated::new(log, findings, start, sample_agent, true));
    }
    let span_us = args.days * 86_400 * 1_000_000;
    let detector = AgentKey::from_seed(blake3::hash(b"bench-query-detector").as_bytes());
    let slices = (args.events / 100_000).max(1);
    let per_slice = args.events / slices;
    let bar = indicatif::ProgressBar::new(args.events).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} events, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("signing and appending");
    for slice in 0..slices {
        let slice_start = span_us / slices as i64 * slice as i64;
        let slice_len = span_us / slices as i64;
        let agents = signers.len() as u64;
        // Each agent signs its share of this slice, in its own chain order.
        let mut signed: Vec<(i64, custos_event::Envelope)> = signers
            .par_iter_mut()
            .enumerate()
            .flat_map_iter(|(agent, signer)| {
                let share = per_slice / agents + u64::from((agent as u64) < per_slice % agents);
                let mut out = Vec::with_capacity(share as usize);
                for n in 0..share {
                    let mix = blake3::hash(format!("{slice}/{agent}/{n}").as_bytes());
                    let bytes = mix.as_bytes();
                    let offset = (slice_len / share.max(1) as i64) * n as i64 + i64::from(bytes[0]) * 1000;
                    let at_us = start.timestamp_micros() + slice_start + offset.min(slice_len - 1);
                    let ts = Utc.timestamp_micros(at_us).single().unwrap_or(start);
                    let kind = match bytes[1] % 10 {
                        0..=4 => Kind::ToolCall,
                        5 | 6 => Kind::LlmCall,
                        7 => Kind::FileRead,
                        8 => Kind::MessageSent,
                        _ => Kind::MemoryRead,
                    };
                    let mut payload = Payload::new(kind, ts);
                    // Tools skewed: a few common ones, a long tail of rare ones per realm.
                    let tool = if u16::from_le_bytes([bytes[11], bytes[12]]) < 32 {
                        format!("rare-{}", u16::from_le_bytes([bytes[13], bytes[14]]) % RARE_TOOLS)
                    } else {
                        TOOLS[(usize::from(bytes[2]) * usize::from(bytes[2]) / 5462).min(TOOLS.len() - 1)].to_owned()
                    };
                    payload.action = Some(tool);
                    payload.target = Some(format!("doc-{}", u16::from_le_bytes([bytes[3], bytes[4]]) % 5000));
                    payload.outcome = Some(if bytes[5] < 250 { Outcome::Ok } else { Outcome::Denied });
                    payload.bytes_in = Some(u64::from(u16::from_le_bytes([bytes[6], bytes[7]])));
                    payload.bytes_out =
                        Some(u64::from(u16::from_le_bytes([bytes[8], bytes[9]])) * (1 + agent as u64 % 7));
                    payload.tokens_in = Some(u64::from(bytes[10]) * 10);
                    payload.session = Some(format!("s{}", n / 50));
                    out.push((at_us, signer.sign(payload)));
                }
                out
            })
            .collect();
        signed.par_sort_by_key(|(at, _)| *at);
        let first = log.next_index();
        let mut entries: Vec<LogEntry> = Vec::with_capacity(signed.len() + 16);
        for (at, envelope) in signed {
            let index = first + entries.len() as u64;
            entries.push(LogEntry::from_envelope(envelope, index, at + 50_000, None));
            if index.is_multiple_of(10_000) && index > 0 {
                let victim = &entries[entries.len() - 1];
                let finding = json!({
                    "id": format!("f-{index}"),
                    "agent": victim.keyid,
                    "realm": format!("realm{}", index as usize % args.realms),
                    "ts": Utc.timestamp_micros(at).single().unwrap_or(start).to_rfc3339(),
                    "action": "anomaly",
                    "score": 50 + index % 50,
                    "severity": if index.is_multiple_of(3) { "high" } else { "medium" },
                    "title": "bench finding",
                    "evidence": [index],
                });
                let envelope = detector.sign_envelope(FINDING_PAYLOAD_TYPE, serde_json::to_vec(&finding)?);
                let index = first + entries.len() as u64;
                entries.push(LogEntry::from_envelope(envelope, index, at + 60_000, None));
                findings += 1;
            }
        }
        let appended = entries.len() as u64;
        log.append(entries)?;
        log.maintain()?;
        bar.inc(appended.min(per_slice));
    }
    bar.finish_and_clear();
    log.seal()?;
    log.checkpoint()?;
    Ok(Generated::new(log, findings, start, sample_agent, false))
}

impl Generated {
    /// The store in `log`, with what a query of it reads: its sealed segments and its tail.
    fn new(log: Log, findings: u64, start: chrono::DateTime<Utc>, sample_agent: String, reused: bool) -> Self {
        let paths = log.paths();
        let view = custos_store::StoreView {
            segment_dir: paths.segment_dir.clone(),
            segments: log.segments().to_vec(),
            tail: log.tail(),
            size: log.next_index(),
            checkpoints: paths.checkpoints.clone(),
        };
        Self {
            size: log.next_index(),
            view,
            log,
            findings,
            start,
            sample_agent,
            reused,
        }
    }
}

struct Proofs {
    prove_p50: Duration,
    prove_p99: Duration,
    verify_p50: Duration,
}

fn proof_latency(log: &Log, size: u64) -> Proofs {
    let root = log.tree().root();
    let mut prove = Vec::new();
    let mut verify = Vec::new();
    for sample in 0..10_000u64 {
        let index = u64::from_le_bytes(
            blake3::hash(&sample.to_le_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap_or_default(),
        ) % size;
        let started = Instant::now();
        let proof = log.inclusion_proof(index, size);
        prove.push(started.elapsed());
        if let (Ok(proof), Some(leaf)) = (proof, log.tree().leaf(index)) {
            let started = Instant::now();
            let ok = custos_store::merkle::verify_inclusion(&leaf, index, size, &proof, &root).is_ok();
            verify.push(started.elapsed());
            debug_assert!(ok);
        }
    }
    prove.sort();
    verify.sort();
    Proofs {
        prove_p50: percentile(&prove, 0.5),
        prove_p99: percentile(&prove, 0.99),
        verify_p50: percentile(&verify, 0.5),
    }
}

fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.len())
                .sum()
        })
        .unwrap_or(0)
}
