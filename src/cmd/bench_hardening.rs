//! `custos bench storm` and `custos bench restart`: what the hardening costs and buys,
//! each as a ratio against a baseline measured in the same run.
//!
//! - storm: acknowledgement latency of ingest with 8 heavy SQL queries running beside it,
//!   against the same ingest with none;
//! - restart: the time a node takes to start on a large store with its signed caches
//!   (tree, registry), against the same start rebuilding them from every segment; and
//!   the answer to a resend of an old event (looked up in the sealed segments) against a
//!   resend of a recent one (in memory).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use custos_event::Envelope;

use super::bench::percentile;
use super::client::Client;
use super::fleet::{FleetAgent, fleet};

#[derive(Args)]
#[command(after_help = "\
Example:
  custos bench storm
  custos bench storm --events 100000 --queries 8 --json")]
pub(crate) struct StormArgs {
    /// Distinct agents.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Events per phase (one without queries, one with).
    #[arg(long, default_value_t = 40_000)]
    events: usize,
    /// Envelopes per request.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Concurrent ingest connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Heavy SQL queries kept running during the second phase.
    #[arg(long, default_value_t = 8)]
    queries: usize,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = "\
Example:
  custos bench restart --events 10000000 --data /tmp/r10m   # builds the store once, then reuses it
  custos bench restart --events 200000")]
pub(crate) struct RestartArgs {
    /// Events in the store.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Distinct agents.
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Store directory: built when empty, reused when it holds a store (default: a
    /// temporary directory, removed afterwards).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Restarts timed (the median is reported).
    #[arg(long, default_value_t = 3)]
    restarts: usize,
    /// Old and recent events resent, one request each.
    #[arg(long, default_value_t = 500)]
    resends: usize,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
}

const CROSS_JOIN: &str =
    "SELECT count(*) FROM generate_series(1, 20000) a, generate_series(1, 20000) b, generate_series(1, 20000) c";

async fn node(data: &std::path::Path, queries: usize) -> anyhow::Result<(custos_ingest::Running, String, String)> {
    let config = custos_ingest::NodeConfig::new(data.to_owned(), "127.0.0.1:0".parse()?);
    let limits = custos_query::Limits {
        timeout: Duration::from_secs(20),
        concurrency: queries.max(1) + 2,
        per_token: queries.max(1) + 2,
        worker: custos_query::pool::WorkerProgram::current(),
        ..Default::default()
    };
    let hooks = custos_ingest::Hooks {
        routes: Some(crate::reader::query_routes(limits)?),
        ..Default::default()
    };
    let running = custos_ingest::start_with(config, hooks).await?;
    let token = match &running.admin_token {
        Some(secret) => secret.0.clone(),
        None => fs_err::read_to_string(custos_http::auth::admin_token_path(data))?
            .trim()
            .to_owned(),
    };
    let url = format!("http://{}", running.addr);
    Ok((running, url, token))
}

fn ndjson(envelopes: &[Envelope]) -> Vec<u8> {
    let mut body = String::new();
    for envelope in envelopes {
        body.push_str(&envelope.to_json());
        body.push('\n');
    }
    body.into_bytes()
}

/// Sends `bodies` over `connections` clients; returns each request's acknowledgement time.
async fn drive(url: &str, bodies: Vec<Vec<Vec<u8>>>) -> anyhow::Result<(Vec<Duration>, Duration)> {
    super::bench_cluster::drive(&[url.to_owned()], bodies, None).await
}

pub(crate) fn phase_bodies(
    agents: &mut [FleetAgent],
    rng: &mut rand::rngs::StdRng,
    events: usize,
    batch: usize,
    connections: usize,
) -> Vec<Vec<Vec<u8>>> {
    let now = chrono::Utc::now();
    let mut per_connection: Vec<Vec<Envelope>> = vec![Vec::new(); connections];
    for position in 0..events {
        let agent = position % agents.len();
        per_connection[agent % connections].push(agents[agent].next(rng, now));
    }
    per_connection
        .iter()
        .map(|envelopes| envelopes.chunks(batch.max(1)).map(ndjson).collect())
        .collect()
}

pub(crate) async fn storm(args: StormArgs) -> anyhow::Result<()> {
    let data = super::scratch_dir("custos-storm")?;
    let connections = args.connections.max(1);
    eprintln!("signing 2 x {} events for {} agents…", args.events, args.agents);
    let (mut agents, mut rng) = fleet(args.agents.max(1), 7);
    let quiet = phase_bodies(&mut agents, &mut rng, args.events, args.batch, connections);
    let stormy = phase_bodies(&mut agents, &mut rng, args.events, args.batch, connections);
    let (running, url, token) = node(&data, args.queries).await?;
    let admin = Client::new(&url, Some(token.clone()));
    super::fleet::enroll(&admin, &agents).await?;

    eprintln!("phase 1: ingest alone…");
    let (alone, alone_time) = drive(&url, quiet).await?;

    eprintln!("phase 2: ingest beside {} heavy queries…", args.queries);
    let stop = Arc::new(AtomicBool::new(false));
    let mut storm = Vec::new();
    for _ in 0..args.queries {
        let (url, token, stop) = (url.clone(), token.clone(), stop.clone());
        storm.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut ran = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let answer = http
                    .post(format!("{url}/v1/sql"))
                    .bearer_auth(&token)
                    .body(CROSS_JOIN)
                    .send()
                    .await;
                if answer.is_ok() {
                    ran += 1;
                }
            }
            ran
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let health = {
        let url = url.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut latencies = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let sent = Instant::now();
                if http.get(format!("{url}/healthz")).send().await.is_ok() {
                    latencies.push(sent.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            latencies
        })
    };
    let (stormed, stormed_time) = drive(&url, stormy).await?;
    stop.store(true, Ordering::SeqCst);
    let mut health = health.await?;
    health.sort();
    let queries: usize = futures_join(storm).await;
    running.shutdown().await?;
    fs_err::remove_dir_all(&data).ok();

    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let (alone_p99, stormed_p99) = (percentile(&alone, 0.99), percentile(&stormed, 0.99));
    let result = serde_json::json!({
        "events_per_phase": args.events,
        "batch": args.batch,
        "connections": connections,
        "heavy_queries": args.queries,
        "queries_answered": queries,
        "alone_p50_ms": ms(percentile(&alone, 0.50)),
        "alone_p99_ms": ms(alone_p99),
        "alone_events_per_sec": (args.events as f64 / alone_time.as_secs_f64()).round(),
        "storm_p50_ms": ms(percentile(&stormed, 0.50)),
        "storm_p99_ms": ms(stormed_p99),
        "storm_events_per_sec": (args.events as f64 / stormed_time.as_secs_f64()).round(),
        "p99_ratio": ms(stormed_p99) / ms(alone_p99).max(1e-9),
        "healthz_p99_ms": ms(percentile(&health, 0.99)),
    });
    println!(
        "custos bench storm: {} events per phase, batch {}, {connections} connections; {} heavy queries in phase 2",
        args.events, args.batch, args.queries
    );
    println!(
        "  ingest alone (baseline):   p50 {:>7.1} ms  p99 {:>7.1} ms  {:>7.0} events/s",
        result["alone_p50_ms"].as_f64().unwrap_or(0.0),
        result["alone_p99_ms"].as_f64().unwrap_or(0.0),
        result["alone_events_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  ingest beside the storm:   p50 {:>7.1} ms  p99 {:>7.1} ms  {:>7.0} events/s  = p99 {:.2} x baseline",
        result["storm_p50_ms"].as_f64().unwrap_or(0.0),
        result["storm_p99_ms"].as_f64().unwrap_or(0.0),
        result["storm_events_per_sec"].as_f64().unwrap_or(0.0),
        result["p99_ratio"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  /healthz during the storm: p99 {:.1} ms ({} queries answered, each stopped at its timeout)",
        result["healthz_p99_ms"].as_f64().unwrap_or(0.0),
        queries
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap_or(0);
    }
    total
}

pub(crate) async fn restart(args: RestartArgs) -> anyhow::Result<()> {
    let temporary = super::scratch_dir("custos-restart")?;
    let data = args.data.clone().unwrap_or_else(|| temporary.clone());
    let samples = data.join("bench-resends.json");
    if !data.join("store.json").exists() || !samples.exists() {
        build(&data, &samples, &args).await?;
    } else {
        eprintln!("{} holds a store: reusing it", data.display());
    }
    let resends: serde_json::Value = serde_json::from_slice(&fs_err::read(&samples)?)?;
    let decode = |key: &str| -> anyhow::Result<Vec<Vec<u8>>> {
        Ok(resends[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str().map(|text| text.as_bytes().to_vec()))
                    .collect()
            })
            .unwrap_or_default())
    };
    let (old, recent) = (decode("old")?, decode("recent")?);

    eprintln!("timing {} restarts with the signed caches…", args.restarts);
    let mut cached = Vec::new();
    for _ in 0..args.restarts.max(1) {
        let started = Instant::now();
        let (running, _, _) = node(&data, 1).await?;
        cached.push(started.elapsed());
        running.shutdown().await?;
    }
    cached.sort();

    eprintln!("timing resends: old events (looked up in the segments) and recent ones (in memory)…");
    let (running, url, _) = node(&data, 1).await?;
    let client = Client::new(&url, None);
    let times = |bodies: Vec<Vec<u8>>| {
        let client = &client;
        async move {
            let mut latencies = Vec::new();
            for body in bodies {
                let sent = Instant::now();
                let results = client.send_events(body).await?;
                latencies.push(sent.elapsed());
                anyhow::ensure!(
                    results.iter().all(|result| result.status == "duplicate"),
                    "a resend was not a duplicate: {results:?}"
                );
            }
            latencies.sort();
            anyhow::Ok(latencies)
        }
    };
    let recent_times = times(recent).await?;
    let old_times = times(old).await?;
    running.shutdown().await?;

    eprintln!("timing a restart without the caches (the tree and the registry rebuilt from every segment)…");
    let log = data.join("logs").join(custos_store::DEFAULT_LOG_ID);
    fs_err::remove_dir_all(log.join("tree")).ok();
    fs_err::remove_file(data.join("state").join("registry.json")).ok();
    let started = Instant::now();
    let (running, _, _) = node(&data, 1).await?;
    let rebuilt = started.elapsed();
    running.shutdown().await?;
    let entries = custos_store::log::read_ndjson::<custos_store::log::SegmentInfo>(&log.join("segments.ndjson"))?
        .last()
        .map_or(0, |segment| segment.end_index);

    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    let median = cached[cached.len() / 2];
    let result = serde_json::json!({
        "entries": entries,
        "restart_cached_median_ms": ms(median),
        "restart_cached_all_ms": cached.iter().map(|duration| ms(*duration)).collect::<Vec<_>>(),
        "restart_rebuilt_ms": ms(rebuilt),
        "restart_ratio": ms(median) / ms(rebuilt).max(1e-9),
        "resend_recent_p50_ms": ms(percentile(&recent_times, 0.50)),
        "resend_recent_p99_ms": ms(percentile(&recent_times, 0.99)),
        "resend_old_p50_ms": ms(percentile(&old_times, 0.50)),
        "resend_old_p99_ms": ms(percentile(&old_times, 0.99)),
        "resend_p50_ratio": ms(percentile(&old_times, 0.50)) / ms(percentile(&recent_times, 0.50)).max(1e-9),
    });
    println!("custos bench restart: {entries} entries in the store");
    println!(
        "  restart, tree and registry rebuilt from every segment (baseline): {:>9.0} ms",
        ms(rebuilt)
    );
    println!(
        "  restart with the signed caches (median of {}):                 {:>9.0} ms = {:.3} x baseline (goal < 2 s at 10M)",
        cached.len(),
        ms(median),
        result["restart_ratio"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  resend of a recent event (in memory, baseline): p50 {:.2} ms, p99 {:.2} ms",
        result["resend_recent_p50_ms"].as_f64().unwrap_or(0.0),
        result["resend_recent_p99_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  resend of an old event (segment lookup):        p50 {:.2} ms, p99 {:.2} ms = p50 {:.2} x baseline",
        result["resend_old_p50_ms"].as_f64().unwrap_or(0.0),
        result["resend_old_p99_ms"].as_f64().unwrap_or(0.0),
        result["resend_p50_ratio"].as_f64().unwrap_or(0.0)
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    if args.data.is_none() {
        fs_err::remove_dir_all(&temporary).ok();
    }
    Ok(())
}

/// Builds a store of `args.events` events over HTTP, signing as it goes; keeps some early
/// and some last envelopes to resend.
async fn build(data: &std::path::Path, samples: &std::path::Path, args: &RestartArgs) -> anyhow::Result<()> {
    let (mut agents, mut rng) = fleet(args.agents.max(1), 11);
    let (running, url, token) = node(data, 1).await?;
    let admin = Client::new(&url, Some(token));
    super::fleet::enroll(&admin, &agents).await?;
    let progress = indicatif::ProgressBar::new(args.events as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("building the store {bar:40} {pos}/{len} events ({per_sec}, {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut old = Vec::new();
    let mut sent = 0usize;
    let batch = 1_000;
    let mut inflight = Vec::new();
    while sent < args.events {
        let now = chrono::Utc::now();
        let count = batch.min(args.events - sent);
        let envelopes: Vec<Envelope> = (0..count)
            .map(|offset| {
                let agent = (sent + offset) % agents.len();
                agents[agent].next(&mut rng, now)
            })
            .collect();
        // Early events, across agents, to resend later.
        if sent < args.events / 10 && old.len() < args.resends {
            old.extend(envelopes.iter().step_by(97).map(|envelope| envelope.to_json()));
        }
        let body = ndjson(&envelopes);
        let client = Client::new(&url, None);
        inflight.push(tokio::spawn(async move { client.send_events(body).await }));
        if inflight.len() >= 4 {
            let results = inflight.remove(0).await??;
            anyhow::ensure!(
                results.iter().all(|result| result.status == "accepted"),
                "not accepted: {results:?}"
            );
        }
        sent += count;
        progress.set_position(sent as u64);
    }
    for task in inflight {
        let results = task.await??;
        anyhow::ensure!(
            results.iter().all(|result| result.status == "accepted"),
            "not accepted: {results:?}"
        );
    }
    progress.finish();
    old.truncate(args.resends);
    let recent: Vec<String> = agents
        .iter()
        .filter_map(|agent| agent.last.as_ref().map(Envelope::to_json))
        .take(args.resends)
        .collect();
    running.shutdown().await?;
    fs_err::write(
        samples,
        serde_json::to_vec(&serde_json::json!({"old": old, "recent": recent}))?,
    )?;
    Ok(())
}
