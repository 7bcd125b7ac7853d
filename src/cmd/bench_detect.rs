//! `custos bench detect`: detector throughput, the live loop's latencies, and detector
//! memory per agent, each beside a baseline measured in the same run.
//!
//! ```text
//!  1. throughput  simulate ─▶ verify + chain rules (untimed) ─▶ Detector (timed, one thread)
//!                 baseline: raw ed25519 batch verify of the same envelopes, every core
//!  2. latency     node in-process (detector + responder) ◀─ background fleet traffic
//!                 attack event ─POST─▶ ack ─▶ finding signed ─▶ revocation enforced
//!                 baseline: the acknowledgement latency of that same POST (WAL fsync)
//!  3. memory      a child process per size: RSS before and after 10k / 100k agents
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{TimeZone as _, Utc};
use clap::Args;
use custos_detect::{Detector, DetectorConfig, Rules};
use custos_event::{Kind, Observation, Outcome, Payload, Signal};

use super::bench::{percentile, raw_batch_verify_rate};
use super::client::Client;
use super::fleet::fleet;
use super::sim::{Admission, Replayer};

#[derive(Args)]
#[command(after_help = "\
Examples:
  cargo run --release -- bench detect
  cargo run --release -- bench detect --agents 100 --hours 24 --attacks 200
  cargo run --release -- bench detect --memory-agents 10000,100000,200000 --json

Nothing here is a pass/fail test; figures go to docs/BENCHMARKS.md with the command.")]
pub(crate) struct DetectArgs {
    /// Agents in the simulated fleet for the throughput run.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Hours of simulated traffic for the throughput run.
    #[arg(long, default_value_t = 12)]
    hours: u64,
    /// Seed for the simulation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Attacks driven through the live node, one agent each, for the latency figures.
    #[arg(long, default_value_t = 100)]
    attacks: usize,
    /// Background fleet traffic while the attacks run, events per second.
    #[arg(long, default_value_t = 2_000)]
    background_rate: usize,
    /// Fleet sizes for the memory figure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000])]
    memory_agents: Vec<usize>,
    /// Print the results as JSON too.
    #[arg(long)]
    json: bool,
    /// Internal: measure detector memory for this many agents in this process and print
    /// JSON (the parent runs one child per size so sizes do not share a heap).
    #[arg(long, hide = true)]
    memory_child: Option<usize>,
}

pub(crate) async fn detect(args: DetectArgs) -> anyhow::Result<()> {
    if let Some(agents) = args.memory_child {
        let result = tokio::task::block_in_place(|| memory_in_this_process(agents))?;
        println!("{result}");
        return Ok(());
    }
    let throughput = tokio::task::block_in_place(|| throughput(&args))?;
    let latency = latency(&args).await?;
    let mut memory = Vec::new();
    for agents in &args.memory_agents {
        eprintln!("memory: {agents} agents in a child process…");
        memory.push(memory_child(*agents)?);
    }

    println!(
        "custos bench detect: {} agents x {} h simulated (seed {}, {} events), {} attacks live",
        args.agents, args.hours, args.seed, throughput["events"], args.attacks
    );
    println!(
        "  raw ed25519 batch verify, all cores (baseline): {:>10.0} events/s",
        throughput["raw_batch_verify_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  detector, one thread (rules + windows + baselines): {:>7.0} events/s = {:.2} x baseline (>= 1: keeps up with the fastest ingest)",
        throughput["detector_per_sec"].as_f64().unwrap_or(0.0),
        throughput["ratio"].as_f64().unwrap_or(0.0)
    );
    let ms = |key: &str| latency[key].as_f64().unwrap_or(0.0);
    println!(
        "  live node: {} attacks while the fleet sent {} events/s of background traffic",
        latency["attacks"], latency["background_per_sec"]
    );
    println!(
        "  ingest acknowledgement of the attack event (baseline): p50 {:.1} ms, p99 {:.1} ms",
        ms("ack_p50_ms"),
        ms("ack_p99_ms")
    );
    println!(
        "  event -> finding signed into the log:      p50 {:.1} ms, p99 {:.1} ms",
        ms("event_to_finding_p50_ms"),
        ms("event_to_finding_p99_ms")
    );
    println!(
        "  finding -> revocation enforced:            p50 {:.1} ms, p99 {:.1} ms",
        ms("finding_to_enforced_p50_ms"),
        ms("finding_to_enforced_p99_ms")
    );
    println!(
        "  event -> revocation enforced:              p50 {:.1} ms, p99 {:.1} ms = {:.1} x the ack p50 (goal: p99 < 1000 ms)",
        ms("event_to_enforced_p50_ms"),
        ms("event_to_enforced_p99_ms"),
        latency["event_to_enforced_p50_over_ack_p50"].as_f64().unwrap_or(0.0)
    );
    for entry in &memory {
        println!(
            "  detector memory at {:>7} agents: {:>5.0} B/agent resident ({:.2} x the 4 KiB goal), {:>5.0} B/agent snapshotted",
            entry["agents"],
            entry["rss_bytes_per_agent"].as_f64().unwrap_or(0.0),
            entry["rss_bytes_per_agent"].as_f64().unwrap_or(0.0) / 4096.0,
            entry["snapshot_bytes_per_agent"].as_f64().unwrap_or(0.0),
        );
    }
    if args.json {
        let all = serde_json::json!({"throughput": throughput, "latency": latency, "memory": memory});
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

/// Part 1: the detector alone over a simulated trace, against the raw verify rate.
fn throughput(args: &DetectArgs) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "throughput: simulating {} agents x {} h (seed {})…",
        args.agents, args.hours, args.seed
    );
    let simulation = custos_sim::simulate(&custos_sim::SimConfig::new(args.agents.max(1), args.hours, args.seed));
    let events = simulation.events.len();
    eprintln!("throughput: measuring the raw ed25519 batch-verify rate on the {events} envelopes…");
    let raw_rate = raw_batch_verify_rate(std::slice::from_ref(&simulation.events))?;
    eprintln!("throughput: verifying and chain-checking (untimed), then the detector (timed)…");
    let mut admission = Admission::default();
    let admitted = simulation
        .events
        .into_iter()
        .map(|envelope| admission.admit(envelope))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut best = 0f64;
    let mut findings = 0;
    for _ in 0..2 {
        let detector = Detector::new(DetectorConfig::default(), Rules::load(&[])?);
        let mut replayer = Replayer::new(detector);
        let started = Instant::now();
        for item in &admitted {
            replayer.step(super::sim::Admitted {
                ts: item.ts,
                observation: item.observation.clone(),
            });
        }
        let (found, _) = replayer.finish();
        best = best.max(events as f64 / started.elapsed().as_secs_f64());
        findings = found.len();
    }
    Ok(serde_json::json!({
        "agents": args.agents,
        "hours": args.hours,
        "events": events,
        "findings": findings,
        "raw_batch_verify_per_sec": raw_rate.round(),
        "detector_per_sec": best.round(),
        "ratio": best / raw_rate,
    }))
}

/// The bench's playbook: the shipped containment with its brakes lifted, since the
/// bench revokes a hundred agents an hour on purpose (the shipped caps would pause it
/// after five, as they should in production).
const BENCH_PLAYBOOK: &str = "\
name: bench-contain
description: Revoke on credential misuse; caps lifted for the benchmark.
match:
  types: [credential_misuse]
caps:
  max_actions_per_hour: 1000000
  max_agents_per_hour: 1000000
actions:
  - revoke_agent: {}
";

/// Part 2: the live loop on a node in this process.
async fn latency(args: &DetectArgs) -> anyhow::Result<serde_json::Value> {
    let data = super::scratch_dir("custos-bench-detect")?;
    let playbooks = data.join("bench-playbooks");
    fs_err::create_dir_all(&playbooks)?;
    fs_err::write(playbooks.join("contain.yml"), BENCH_PLAYBOOK)?;
    let mut pipeline = crate::pipeline::PipelineConfig::new(data.clone());
    pipeline.shipped_playbooks = false;
    pipeline.playbooks = Some(playbooks);
    let marks = Arc::new(crate::pipeline::Marks::default());
    let config = custos_ingest::NodeConfig::new(data.clone(), "127.0.0.1:0".parse()?);
    let node =
        super::serve::Node::start(config, Some(pipeline), marks.clone(), custos_query::Limits::default()).await?;
    let token = node
        .running
        .admin_token
        .clone()
        .map(|secret| secret.0)
        .context("a new store prints its admin token")?;
    let url = format!("http://{}", node.running.addr);
    let admin = Client::new(&url, Some(token));

    let attacks = args.attacks.max(1);
    let background = 50usize;
    eprintln!("latency: enrolling {background} background agents and {attacks} attack agents…");
    let (mut agents, mut rng) = fleet(background + attacks, 11);
    super::fleet::enroll(&admin, &agents).await?;
    let victims: Vec<_> = agents.split_off(background);

    // Background traffic: the fleet keeps talking while the attacks happen.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let url = url.clone();
        let rate = args.background_rate.max(1);
        tokio::spawn(async move {
            let client = Client::new(&url, None);
            let per_tick = rate.div_ceil(20);
            let mut sent = 0usize;
            let mut position = 0usize;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                let mut body = String::new();
                for _ in 0..per_tick {
                    let agent = position % agents.len();
                    position += 1;
                    body.push_str(&agents[agent].next(&mut rng, Utc::now()).to_json());
                    body.push('\n');
                }
                client.send_events(body.into_bytes()).await?;
                sent += per_tick;
                tokio::time::sleep(Duration::from_millis(50).saturating_sub(tick.elapsed())).await;
            }
            anyhow::Ok((sent, started.elapsed()))
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!("latency: {attacks} attacks (a credential used by an agent that does not own it)…");
    let client = Client::new(&url, None);
    let progress = indicatif::ProgressBar::new(attacks as u64);
    let mut ack = Vec::new();
    let mut to_finding = Vec::new();
    let mut to_enforced = Vec::new();
    let mut finding_to_enforced = Vec::new();
    for mut victim in victims {
        let did = victim.did().to_owned();
        let mut misuse = Payload::new(Kind::CredentialUse, Utc::now());
        misuse.action = Some("vault.read".into());
        misuse.target = Some("vault://ops/prod-db-admin".into());
        misuse.attrs = Some(serde_json::Map::from_iter([(
            "credential_owner".to_owned(),
            serde_json::json!("did:key:z6MkSomeoneElseEntirely"),
        )]));
        let body = victim.signer.sign(misuse).to_json().into_bytes();
        let sent = Instant::now();
        let result = client.send_events(body).await?;
        ack.push(sent.elapsed());
        anyhow::ensure!(
            result.first().is_some_and(|item| item.status == "accepted"),
            "the attack event was not accepted: {result:?}"
        );
        let (found, enforced) = loop {
            let found = mark(&marks.findings, &did, "credential_misuse");
            let enforced = mark(&marks.enforced, &did, "revoke_agent");
            if let (Some(found), Some(enforced)) = (found, enforced) {
                break (found, enforced);
            }
            anyhow::ensure!(
                sent.elapsed() < Duration::from_secs(20),
                "no finding and revocation for {did} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        to_finding.push(found.saturating_duration_since(sent));
        to_enforced.push(enforced.saturating_duration_since(sent));
        finding_to_enforced.push(enforced.saturating_duration_since(found));
        progress.inc(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.finish_and_clear();
    stop.store(true, Ordering::Relaxed);
    let (background_sent, background_time) = traffic.await??;
    node.shutdown().await?;
    fs_err::remove_dir_all(&data).ok();

    for list in [&mut ack, &mut to_finding, &mut to_enforced, &mut finding_to_enforced] {
        list.sort();
    }
    let ms = |list: &[Duration], fraction: f64| percentile(list, fraction).as_secs_f64() * 1e3;
    Ok(serde_json::json!({
        "attacks": attacks,
        "background_events": background_sent,
        "background_target_per_sec": args.background_rate,
        "background_per_sec": (background_sent as f64 / background_time.as_secs_f64()).round() as u64,
        "ack_p50_ms": ms(&ack, 0.5),
        "ack_p99_ms": ms(&ack, 0.99),
        "event_to_finding_p50_ms": ms(&to_finding, 0.5),
        "event_to_finding_p99_ms": ms(&to_finding, 0.99),
        "finding_to_enforced_p50_ms": ms(&finding_to_enforced, 0.5),
        "finding_to_enforced_p99_ms": ms(&finding_to_enforced, 0.99),
        "event_to_enforced_p50_ms": ms(&to_enforced, 0.5),
        "event_to_enforced_p99_ms": ms(&to_enforced, 0.99),
        "event_to_enforced_p50_over_ack_p50": ms(&to_enforced, 0.5) / ms(&ack, 0.5).max(1e-6),
    }))
}

fn mark(marks: &std::sync::Mutex<Vec<(Instant, String, String)>>, did: &str, what: &str) -> Option<Instant> {
    marks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .find(|(_, agent, kind)| agent == did && kind == what)
        .map(|(at, _, _)| *at)
}

/// Part 3, in the parent: runs this binary as a child for one fleet size.
fn memory_child(agents: usize) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("locating the custos binary")?;
    let output = std::process::Command::new(exe)
        .args(["bench", "detect", "--memory-child", &agents.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the memory child")?;
    anyhow::ensure!(output.status.success(), "the memory child failed: {}", output.status);
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("reading the memory child's answer {line:?}"))
}

/// Resident set size of this process, from /proc (Linux).
fn resident_bytes() -> anyhow::Result<u64> {
    let statm = fs_err::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("/proc/self/statm has no resident field")?
        .parse()?;
    // The page size is 4 KiB on the machines this runs on (x86-64 and aarch64 Linux
    // defaults); /proc/self/smaps would say otherwise on a 64 KiB-page kernel.
    Ok(pages * 4096)
}

/// Part 3, in the child: feeds `agents` agents three windows each of mixed traffic
/// (tool calls to a few targets, memory writes, credential uses, messages, in sessions),
/// so every per-agent structure is populated: window, baseline, seen-sets, rule
/// correlation state. Reports the resident growth and the snapshot size per agent.
fn memory_in_this_process(agents: usize) -> anyhow::Result<serde_json::Value> {
    let mut detector = Detector::new(DetectorConfig::default(), Rules::load(&[])?);
    let dids: Vec<String> = (0..agents).map(|i| format!("did:key:z6Mkbench{i:0>40}")).collect();
    let before = resident_bytes()?;
    let t0 = Utc
        .with_ymd_and_hms(2026, 11, 17, 10, 0, 0)
        .single()
        .context("a fixed start time")?;
    let mut index = 0u64;
    let progress = indicatif::ProgressBar::new(3 * agents as u64);
    for window in 0..3i64 {
        for (i, did) in dids.iter().enumerate() {
            for step in 0..8i64 {
                let at = t0 + chrono::Duration::seconds(window * 60 + step * 7);
                let kind = [
                    Kind::ToolCall,
                    Kind::ToolResult,
                    Kind::MemoryWrite,
                    Kind::ToolCall,
                    Kind::CredentialUse,
                    Kind::MessageSent,
                    Kind::LlmCall,
                    Kind::ToolCall,
                ][step as usize];
                let mut payload = Payload::new(kind, at);
                payload.agent = did.clone();
                payload.realm = format!("realm{}", i % 20);
                payload.seq = (window * 8 + step) as u64;
                payload.session = Some(format!("s{i}-{window}"));
                payload.action = Some(format!("tool{}", step % 5));
                payload.target = Some(format!("https://host{}.example.org/{}", i % 50, step));
                payload.outcome = Some(Outcome::Ok);
                payload.bytes_out = Some(2_000);
                payload.tokens_in = Some(300);
                if kind == Kind::MemoryWrite {
                    payload.memory_id = Some(format!("mem-{i}-{window}"));
                }
                if kind == Kind::CredentialUse {
                    payload.attrs = Some(serde_json::Map::from_iter([(
                        "credential_owner".to_owned(),
                        serde_json::json!(did),
                    )]));
                }
                index += 1;
                detector.observe(&Observation {
                    log_index: Some(index),
                    ingest_ts: at,
                    payload,
                    signal: Signal::Accepted { gap: None },
                    entry: None,
                });
            }
            progress.inc(1);
        }
    }
    detector.tick((t0 + chrono::Duration::minutes(3)).timestamp());
    progress.finish_and_clear();
    let after = resident_bytes()?;
    let scratch = super::scratch_dir("custos-bench-memory")?;
    fs_err::create_dir_all(&scratch)?;
    let snapshot = scratch.join("detector.snapshot");
    detector.snapshot(&snapshot)?;
    let snapshot_bytes = fs_err::metadata(&snapshot)?.len();
    fs_err::remove_dir_all(&scratch).ok();
    anyhow::ensure!(
        detector.agents() == agents,
        "the detector holds {} agents",
        detector.agents()
    );
    Ok(serde_json::json!({
        "agents": agents,
        "events": index,
        "rss_bytes_per_agent": after.saturating_sub(before) as f64 / agents as f64,
        "snapshot_bytes_per_agent": snapshot_bytes as f64 / agents as f64,
        "state_bytes_per_agent_serialized": detector.state_bytes_per_agent(),
    }))
}
