//! `custos bench ingest`: end-to-end ingest over loopback HTTP, as a ratio of the raw
//! ed25519 batch-verify rate measured in the same run on the same cores.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use custos_event::Envelope;

use super::client::Client;
use super::fleet::fleet;

#[derive(Args)]
#[command(after_help = "\
Example:
  cargo run --release -- bench ingest --agents 1000 --events 200000")]
pub(crate) struct IngestArgs {
    /// Distinct agents.
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Events in total.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Envelopes per HTTP request.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Concurrent client connections (each owns a disjoint set of agents).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Store directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
}

pub(crate) fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let position = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[position]
}

pub(crate) async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let temporary = super::scratch_dir("custos-bench")?;
    let data = args.data.clone().unwrap_or_else(|| temporary.clone());
    let connections = args.connections.max(1);
    eprintln!("signing {} events for {} agents…", args.events, args.agents);
    let (mut agents, mut rng) = fleet(args.agents.max(1), 42);
    let now = chrono::Utc::now();
    let mut per_connection: Vec<Vec<Envelope>> = vec![Vec::new(); connections];
    for position in 0..args.events {
        let agent = position % agents.len();
        per_connection[agent % connections].push(agents[agent].next(&mut rng, now));
    }

    eprintln!("measuring the raw ed25519 batch-verify rate on the same envelopes…");
    let raw_rate = tokio::task::block_in_place(|| raw_batch_verify_rate(&per_connection))?;

    let mut config = custos_ingest::NodeConfig::new(data.clone(), "127.0.0.1:0".parse()?);
    config.max_events_per_request = args.batch.max(1);
    let running = custos_ingest::start(config).await?;
    let token = running.admin_token.clone().map(|secret| secret.0).unwrap_or_default();
    let url = format!("http://{}", running.addr);
    let admin = Client::new(&url, Some(token));
    super::fleet::enroll(&admin, &agents).await?;
    agents.clear();

    eprintln!("driving the node over loopback HTTP with {connections} connections…");
    let bodies: Vec<Vec<Vec<u8>>> = per_connection
        .iter()
        .map(|envelopes| {
            envelopes
                .chunks(args.batch.max(1))
                .map(|chunk| {
                    let mut body = String::new();
                    for envelope in chunk {
                        body.push_str(&envelope.to_json());
                        body.push('\n');
                    }
                    body.into_bytes()
                })
                .collect()
        })
        .collect();
    let url = Arc::new(url);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for requests in bodies {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::new(&url, None);
            let mut latencies = Vec::with_capacity(requests.len());
            let mut accepted = 0usize;
            for body in requests {
                let sent = Instant::now();
                let results = client.send_events(body).await?;
                latencies.push(sent.elapsed());
                accepted += results.iter().filter(|result| result.status == "accepted").count();
            }
            anyhow::Ok((latencies, accepted))
        }));
    }
    let mut latencies = Vec::new();
    let mut accepted = 0;
    for task in tasks {
        let (mut more, count) = task.await??;
        latencies.append(&mut more);
        accepted += count;
    }
    let elapsed = started.elapsed();
    running.shutdown().await?;
    latencies.sort();
    let ingest_rate = accepted as f64 / elapsed.as_secs_f64();
    let bytes = directory_bytes(&data.join("logs"));

    eprintln!("verifying the store with --signatures…");
    let started = Instant::now();
    let report = tokio::task::block_in_place(|| {
        custos_store::verify::verify_store(
            &data,
            &custos_store::verify::VerifyOptions {
                signatures: true,
                log_key: None,
                ..Default::default()
            },
            &mut |_, _| {},
        )
    })?;
    let verify_rate = report.logs.iter().map(|log| log.entries).sum::<u64>() as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(report.ok(), "verify found problems: {:?}", report.problems);

    let result = serde_json::json!({
        "agents": args.agents,
        "events": args.events,
        "accepted": accepted,
        "batch": args.batch,
        "connections": connections,
        "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        "raw_batch_verify_per_sec": raw_rate.round(),
        "ingest_per_sec": ingest_rate.round(),
        "ingest_ratio": ingest_rate / raw_rate,
        "ack_latency_p50_ms": percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        "ack_latency_p99_ms": percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        "bytes_on_disk_per_event": bytes as f64 / accepted.max(1) as f64,
        "verify_signatures_per_sec": verify_rate.round(),
        "verify_ratio": verify_rate / raw_rate,
    });
    println!(
        "custos bench ingest: {} events from {} agents, batch {}, {connections} connections",
        args.events, args.agents, args.batch
    );
    println!("  raw ed25519 batch verify (baseline): {raw_rate:>10.0} sig/s");
    println!(
        "  end-to-end ingest (HTTP+verify+fsync): {ingest_rate:>8.0} events/s  = {:.2} x baseline (goal >= 0.50)",
        ingest_rate / raw_rate
    );
    println!(
        "  acknowledge latency per request of {}: p50 {:.1} ms, p99 {:.1} ms",
        args.batch,
        result["ack_latency_p50_ms"].as_f64().unwrap_or(0.0),
        result["ack_latency_p99_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  bytes on disk per event (Parquet + WAL + manifests): {:.0}",
        result["bytes_on_disk_per_event"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  verify --signatures: {verify_rate:>10.0} entries/s = {:.2} x baseline (goal >= 0.80)",
        verify_rate / raw_rate
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    if args.data.is_none() {
        fs_err::remove_dir_all(&temporary).ok();
    }
    Ok(())
}

fn directory_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = fs_err::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The primitive alone: `ed25519_dalek::verify_batch` over chunks of 256 on every core,
/// with keys already decompressed and messages already built. Best of three passes.
pub(crate) fn raw_batch_verify_rate(envelopes: &[Vec<Envelope>]) -> anyhow::Result<f64> {
    use rayon::prelude::*;
    let all: Vec<&Envelope> = envelopes.iter().flatten().collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = all
        .iter()
        .map(|envelope| custos_event::verifying_key_from_did(&envelope.keyid))
        .collect::<Result<_, _>>()?;
    let messages: Vec<Vec<u8>> = all.iter().map(|envelope| envelope.pae()).collect();
    let signatures: Vec<ed25519_dalek::Signature> = all
        .iter()
        .map(|envelope| ed25519_dalek::Signature::from_bytes(&envelope.sig))
        .collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let ok = (0..all.len().div_ceil(256)).into_par_iter().all(|chunk| {
            let range = chunk * 256..((chunk + 1) * 256).min(all.len());
            let refs: Vec<&[u8]> = messages[range.clone()].iter().map(Vec::as_slice).collect();
            ed25519_dalek::verify_batch(&refs, &signatures[range.clone()], &keys[range]).is_ok()
        });
        anyhow::ensure!(ok, "pre-signed events failed to verify");
        best = best.max(all.len() as f64 / started.elapsed().as_secs_f64());
    }
    Ok(best)
}
