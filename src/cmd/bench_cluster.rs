//! `custos bench cluster`: the distributed ingest path on one machine, with real
//! processes and a real Kafka-protocol broker, against the embedded mode measured in the
//! same run.
//!
//! ```text
//!  phase      processes                                   driven at
//!  embedded   custos serve (one process, no Kafka)        the node
//!  1 ingest   broker + writer + 1 ingest node             the ingest node
//!  2 ingest   broker + writer + 2 ingest nodes            both, half the connections each
//!  half load  the same, paced at half the 2-ingest peak   both (p99 acknowledgement)
//!  freshness  + a query node (object store + committed     the writer; the query node is
//!             topic)                                      polled until each event shows
//! ```
//!
//! Every phase signs fresh agents' events up front and checks each answer is
//! `accepted`, so a rate is of durable events only.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use super::bench::percentile;
use super::bench_hardening::phase_bodies;
use super::client::Client;
use super::fleet::fleet;

#[derive(Args)]
#[command(after_help = "\
Examples:
  custos bench cluster                      # starts tansu from ~/.cache/custos-tools (scripts/test installs it)
  custos bench cluster --kafka 127.0.0.1:9092 --events 100000 --json
  custos bench cluster --broker-storage memory   # a broker that acknowledges without writing to disk
  custos bench cluster --events 200000 --keep    # keep every process's log and data afterwards
  CUSTOS_TANSU=/opt/tansu/bin/tansu custos bench cluster --agents 500")]
pub(crate) struct ClusterArgs {
    /// Distinct agents per phase.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Events per phase.
    #[arg(long, default_value_t = 40_000)]
    events: usize,
    /// Envelopes per request.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// A running Kafka-protocol broker to use (default: start tansu on a free port, with
    /// its SQLite storage in a temporary directory).
    #[arg(long, value_name = "BROKERS")]
    kafka: Option<String>,
    /// The tansu binary, when --kafka is not given.
    #[arg(long, env = "CUSTOS_TANSU")]
    tansu: Option<PathBuf>,
    /// The started tansu's storage: `sqlite` (a file, committed on every produce; what
    /// the tests use, as it survives a broker restart) or `memory` (nothing written to
    /// disk; closer to a Kafka broker, which acknowledges from the page cache).
    #[arg(long, value_enum, default_value_t = BrokerStorage::Sqlite)]
    broker_storage: BrokerStorage,
    /// Print the result as JSON too.
    #[arg(long)]
    json: bool,
    /// Keep the scratch directory (every process's log and data, the path printed)
    /// after a run that succeeded too; a failed run always keeps it.
    #[arg(long)]
    keep: bool,
    /// Start the writer with --verify-submissions (it checks every event's signature
    /// again): what that check costs.
    #[arg(long)]
    verify_submissions: bool,
}

/// The storage engine of the tansu broker the bench starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BrokerStorage {
    Sqlite,
    Memory,
}

impl BrokerStorage {
    fn engine(self) -> &'static str {
        match self {
            // tansu reads the SQLite path relative to its working directory.
            Self::Sqlite => "sqlite://tansu.db",
            Self::Memory => "memory://tansu/",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Sqlite => "tansu (SQLite storage)",
            Self::Memory => "tansu (in-memory storage)",
        }
    }
}

/// A `custos serve` child process, killed when dropped.
struct Process {
    child: Child,
    url: String,
    data: PathBuf,
}

impl Process {
    /// Starts `custos serve --data DATA ARGS...` and waits for its address. Its log goes
    /// to `DATA.log` beside its data directory (kept when the bench fails).
    fn serve(data: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting custos serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        if let Some(parent) = data.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let mut log = fs_err::File::create(data.with_extension("log"))?;
        let (found, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write as _;
            // Read it all, so a full pipe never blocks the child.
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("custos serving on ") {
                    let _ = found.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
                }
                let _ = writeln!(log, "{line}");
            }
        });
        let url = address
            .recv_timeout(Duration::from_secs(120))
            .with_context(|| format!("custos serve {} did not start", args.join(" ")))?;
        Ok(Self {
            child,
            url,
            data: data.to_owned(),
        })
    }

    fn token(&self) -> anyhow::Result<String> {
        Ok(fs_err::read_to_string(custos_http::auth::admin_token_path(&self.data))?
            .trim()
            .to_owned())
    }

    /// The sum and count of `custos_ingest_writer_seconds` per step (`submit`,
    /// `receipt`) on this ingest node so far.
    async fn writer_steps(&self) -> anyhow::Result<Steps> {
        let text = reqwest::Client::new()
            .get(format!("{}/metrics", self.url))
            .bearer_auth(self.token()?)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let mut steps = Steps::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("custos_ingest_writer_seconds_") else {
                continue;
            };
            let Some((name, value)) = rest.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or_default();
            match name {
                r#"sum{step="submit"}"# => steps.submit.0 = value,
                r#"count{step="submit"}"# => steps.submit.1 = value,
                r#"sum{step="receipt"}"# => steps.receipt.0 = value,
                r#"count{step="receipt"}"# => steps.receipt.1 = value,
                _ => {}
            }
        }
        Ok(steps)
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let ready = reqwest::get(format!("{}/readyz", self.url))
                .await
                .is_ok_and(|response| response.status().is_success());
            if ready {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(120),
                "{} never became ready",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker: one started here (tansu), or the one given.
struct Broker {
    addr: String,
    child: Option<Child>,
}

impl Broker {
    fn start(args: &ClusterArgs, dir: &Path) -> anyhow::Result<Self> {
        if let Some(addr) = &args.kafka {
            return Ok(Self {
                addr: addr.clone(),
                child: None,
            });
        }
        let tansu = args.tansu.clone().unwrap_or_else(|| {
            let home = std::env::var("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/custos-tools/tansu/bin/tansu")
        });
        anyhow::ensure!(
            tansu.exists(),
            "no tansu broker at {} (scripts/test installs one; or pass --tansu PATH or --kafka BROKERS)",
            tansu.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let url = format!("tcp://{addr}");
        fs_err::create_dir_all(dir)?;
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", args.broker_storage.engine()])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", tansu.display()))?;
        let started = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "tansu did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            addr,
            child: Some(child),
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An ingest node's hand-over to the writer: (seconds, submissions) per step.
#[derive(Clone, Copy, Default)]
struct Steps {
    submit: (f64, f64),
    receipt: (f64, f64),
}

impl Steps {
    /// The mean milliseconds of each step between `before` and `self`.
    fn mean_since(&self, before: &Steps) -> (f64, f64) {
        let mean = |now: (f64, f64), then: (f64, f64)| {
            let count = now.1 - then.1;
            if count > 0.0 {
                (now.0 - then.0) / count * 1e3
            } else {
                0.0
            }
        };
        (mean(self.submit, before.submit), mean(self.receipt, before.receipt))
    }
}

/// What one phase measured.
struct Phase {
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// CPU seconds (user and system) process `pid` has used so far, from `/proc`; `None`
/// where there is no `/proc` or the process is gone.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The fields after the command name (which may hold spaces, in parentheses): state
    // is field 3, utime 14 and stime 15, in clock ticks.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Where a phase's CPU time went: CPU seconds per process, read before and after.
struct CpuUse {
    names: Vec<&'static str>,
    pids: Vec<Option<u32>>,
    start: Vec<Option<f64>>,
}

impl CpuUse {
    /// `pids`: `None` is this process (the bench's client).
    fn start(processes: &[(&'static str, Option<u32>)]) -> Self {
        Self {
            names: processes.iter().map(|(name, _)| *name).collect(),
            pids: processes.iter().map(|(_, pid)| *pid).collect(),
            start: processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect(),
        }
    }

    /// CPU seconds per 10 000 events of `events`, per process, since [`CpuUse::start`].
    fn per_10k(&self, events: usize) -> Vec<(&'static str, f64)> {
        self.names
            .iter()
            .zip(&self.pids)
            .zip(&self.start)
            .filter_map(|((name, pid), start)| {
                let used = cpu_seconds(*pid)? - (*start)?;
                Some((*name, used * 10_000.0 / events.max(1) as f64))
            })
            .collect()
    }
}

fn cpu_line(shares: &[(&'static str, f64)]) -> String {
    let total: f64 = shares.iter().map(|(_, seconds)| seconds).sum();
    let parts: Vec<String> = shares
        .iter()
        .map(|(name, seconds)| format!("{name} {seconds:.2}"))
        .collect();
    format!("{} = {total:.2} s", parts.join(" + "))
}

impl Phase {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "events_per_sec": self.rate().round(),
            "ack_latency_p50_ms": percentile(&self.latencies, 0.50).as_secs_f64() * 1e3,
            "ack_latency_p99_ms": percentile(&self.latencies, 0.99).as_secs_f64() * 1e3,
        })
    }
}

/// Sends each connection's requests in order, connection `i` to `urls[i % len]`, each
/// request `pace` after the previous one started when given; every event must be
/// `accepted`. Answers each request's acknowledgement time (sorted) and the wall time.
pub(crate) async fn drive(
    urls: &[String],
    bodies: Vec<Vec<Vec<u8>>>,
    pace: Option<Duration>,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (connection, requests) in bodies.into_iter().enumerate() {
        let url = urls[connection % urls.len()].clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::new(&url, None);
            let mut latencies = Vec::with_capacity(requests.len());
            let mut next = Instant::now();
            for body in requests {
                if let Some(pace) = pace {
                    tokio::time::sleep_until(next.into()).await;
                    next += pace;
                }
                let sent = Instant::now();
                let results = client.send_events(body).await?;
                anyhow::ensure!(
                    results.iter().all(|result| result.status == "accepted"),
                    "an event was not accepted: {:?}",
                    results.iter().find(|result| result.status != "accepted")
                );
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.append(&mut task.await??);
    }
    latencies.sort();
    Ok((latencies, started.elapsed()))
}

/// Events sent one at a time for the freshness phase.
const FRESHNESS_PROBES: usize = 50;

/// For each of `probes` events (one agent, sent one at a time to the writer): the time
/// from the writer's acknowledgement until the query node lists it.
async fn freshness(admin: &Client, query: &Process, probes: usize) -> anyhow::Result<Vec<Duration>> {
    let key = custos_event::AgentKey::from_seed(&[0xf5; 32]);
    admin
        .post_json("/v1/agents", &serde_json::json!({ "did": key.did(), "realm": "fresh" }))
        .await
        .context("enrolling the freshness agent")?;
    let mut signer = custos_event::Signer::new(key, "fresh");
    let reader = Client::new(&query.url, Some(query.token()?));
    let mut measured = Vec::with_capacity(probes);
    for probe in 0..probes {
        let object = serde_json::json!({"kind": "tool_call", "action": format!("probe-{probe}")});
        let envelope = signer
            .sign_object(object.as_object().cloned().unwrap_or_default(), chrono::Utc::now())
            .map_err(|error| anyhow::anyhow!("signing a probe: {error}"))?;
        let answer = admin.send_events(envelope.to_json().into_bytes()).await?;
        let acknowledged = Instant::now();
        let index = answer
            .first()
            .and_then(|result| result.log_index)
            .context("the writer did not accept a freshness probe")?;
        loop {
            let page = reader
                .get(&format!(
                    "/v1/events?realm=fresh&after={}&limit=1",
                    index.saturating_sub(1)
                ))
                .await?;
            if page["events"][0]["log_index"] == index {
                break;
            }
            anyhow::ensure!(
                acknowledged.elapsed() < Duration::from_secs(60),
                "log index {index} never showed on the query node"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        measured.push(acknowledged.elapsed());
    }
    Ok(measured)
}

/// A phase's events from `agents` fresh agents (seed `seed`), enrolled at `admin`.
async fn prepare(args: &ClusterArgs, seed: u64, admin: &Client) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    let (mut agents, mut rng) = fleet(args.agents.max(1), seed);
    super::fleet::enroll(admin, &agents).await?;
    Ok(phase_bodies(
        &mut agents,
        &mut rng,
        args.events,
        args.batch,
        args.connections.max(1),
    ))
}

/// Waits until the control topic holds every agent enrolled so far (`count`), so an
/// ingest node started now knows them all once ready.
async fn control_holds(kafka: &custos_stage::kafka::KafkaConfig, count: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let config = kafka.clone();
        let latest =
            tokio::task::spawn_blocking(move || custos_stage::kafka::read_control(&config, Duration::from_secs(30)))
                .await??;
        let agents = latest.keys().filter(|key| key.starts_with("agent:")).count();
        if agents >= count {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the control topic holds {agents} agents of {count} after 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let scratch = super::scratch_dir("custos-bench-cluster")?;
    let result = run(&args, &scratch).await;
    match &result {
        Ok(()) if args.keep => eprintln!(
            "the processes' logs are kept in {}/*.log (and their data beside them)",
            scratch.display()
        ),
        Ok(()) => {
            fs_err::remove_dir_all(&scratch).ok();
        }
        // What the processes said is what explains a failure: kept.
        Err(_) => eprintln!(
            "the processes' logs are kept in {}/*.log (and their data beside them)",
            scratch.display()
        ),
    }
    result
}

async fn run(args: &ClusterArgs, scratch: &Path) -> anyhow::Result<()> {
    let connections = args.connections.max(1);
    // 1. Embedded: one process, no Kafka.
    eprintln!("[1/5] embedded: one `custos serve` process, {} events…", args.events);
    let embedded = {
        let node = Process::serve(&scratch.join("embedded"), &["--no-detect"])?;
        let admin = Client::new(&node.url, Some(node.token()?));
        let bodies = prepare(args, 101, &admin).await?;
        let cpu = CpuUse::start(&[("node", Some(node.child.id())), ("client", None)]);
        let (latencies, elapsed) = drive(std::slice::from_ref(&node.url), bodies, None).await?;
        (
            Phase {
                events: args.events,
                elapsed,
                latencies,
            },
            cpu.per_10k(args.events),
        )
    };
    let (embedded, embedded_cpu) = embedded;

    let broker = Broker::start(args, &scratch.join("broker"))?;
    let prefix = format!(
        "bench-{}",
        scratch.file_name().and_then(|name| name.to_str()).unwrap_or("x")
    );
    let mut kafka = custos_stage::kafka::KafkaConfig::new(broker.addr.clone());
    kafka.prefix = prefix.clone();
    let cluster_args = ["--kafka", &broker.addr, "--kafka-prefix", &prefix];
    let archive = format!("file://{}", scratch.join("archive").display());
    let verify: &[&str] = match args.verify_submissions {
        true => &["--verify-submissions"],
        false => &[],
    };
    let writer = Process::serve(
        &scratch.join("writer"),
        &[
            &cluster_args[..],
            &["--roles", "writer", "--object-store", &archive],
            verify,
        ]
        .concat(),
    )?;
    let admin = Client::new(&writer.url, Some(writer.token()?));
    // Every phase's agents are enrolled before the ingest nodes start.
    let one = prepare(args, 102, &admin).await?;
    let two = prepare(args, 103, &admin).await?;
    let half = prepare(args, 104, &admin).await?;
    control_holds(&kafka, 3 * args.agents.max(1)).await?;
    let ingest_args = [&cluster_args[..], &["--roles", "ingest"]].concat();
    let first = Process::serve(&scratch.join("ingest-1"), &ingest_args)?;
    let second = Process::serve(&scratch.join("ingest-2"), &ingest_args)?;
    first.ready().await?;
    second.ready().await?;

    eprintln!("[2/5] broker + writer + 1 ingest node…");
    let before = first.writer_steps().await?;
    // A broker given with --kafka is not ours to measure.
    let mut processes = vec![
        ("writer", Some(writer.child.id())),
        ("ingest", Some(first.child.id())),
        ("client", None),
    ];
    if let Some(child) = &broker.child {
        processes.insert(0, ("broker", Some(child.id())));
    }
    let cpu = CpuUse::start(&processes);
    let (latencies, elapsed) = drive(std::slice::from_ref(&first.url), one, None).await?;
    let one_cpu = cpu.per_10k(args.events);
    let one_steps = first.writer_steps().await?.mean_since(&before);
    let one = Phase {
        events: args.events,
        elapsed,
        latencies,
    };
    eprintln!("[3/5] broker + writer + 2 ingest nodes…");
    let urls = [first.url.clone(), second.url.clone()];
    let (latencies, elapsed) = drive(&urls, two, None).await?;
    let two = Phase {
        events: args.events,
        elapsed,
        latencies,
    };
    // Half of the better peak, spread evenly over the connections.
    let peak = one.rate().max(two.rate());
    let requests_per_sec = peak / 2.0 / args.batch.max(1) as f64;
    let pace = Duration::from_secs_f64(connections as f64 / requests_per_sec.max(1e-3));
    eprintln!(
        "[4/5] half of the peak ({:.0} events/s): one request per connection every {:.1} ms…",
        peak / 2.0,
        pace.as_secs_f64() * 1e3
    );
    let before = first.writer_steps().await?;
    let (latencies, elapsed) = drive(&urls, half, Some(pace)).await?;
    let half_steps = first.writer_steps().await?.mean_since(&before);
    let half = Phase {
        events: args.events,
        elapsed,
        latencies,
    };
    drop((first, second));
    eprintln!("[5/5] a query node: how long until an acknowledged event shows there…");
    let query = Process::serve(
        &scratch.join("query"),
        &[&cluster_args[..], &["--roles", "query", "--object-store", &archive]].concat(),
    )?;
    query.ready().await?;
    let mut fresh = freshness(&admin, &query, FRESHNESS_PROBES).await?;
    fresh.sort();
    drop((query, writer, broker));

    let result = serde_json::json!({
        "agents": args.agents,
        "events_per_phase": args.events,
        "batch": args.batch,
        "connections": connections,
        "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        "broker": if args.kafka.is_some() { "given" } else { args.broker_storage.describe() },
        "embedded": embedded.json(),
        "one_ingest": one.json(),
        "two_ingest": two.json(),
        "half_load": half.json(),
        "writer_handover_ms": {
            "one_ingest": {"submit": one_steps.0, "receipt": one_steps.1},
            "half_load": {"submit": half_steps.0, "receipt": half_steps.1},
        },
        "cpu_seconds_per_10k_events": {
            "embedded": embedded_cpu.iter().map(|(name, seconds)| (name.to_string(), serde_json::json!(seconds))).collect::<serde_json::Map<_, _>>(),
            "one_ingest": one_cpu.iter().map(|(name, seconds)| (name.to_string(), serde_json::json!(seconds))).collect::<serde_json::Map<_, _>>(),
        },
        "one_ingest_ratio": one.rate() / embedded.rate(),
        "two_ingest_ratio": two.rate() / embedded.rate(),
        "query_node_freshness_ms": {
            "probes": fresh.len(),
            "p50": percentile(&fresh, 0.50).as_secs_f64() * 1e3,
            "p99": percentile(&fresh, 0.99).as_secs_f64() * 1e3,
            "max": fresh.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        },
    });
    println!(
        "custos bench cluster: {} events per phase from {} agents, batch {}, {connections} connections, broker {}",
        args.events,
        args.agents,
        args.batch,
        result["broker"].as_str().unwrap_or_default()
    );
    let line = |name: &str, phase: &Phase| {
        println!(
            "  {name:<34} {:>8.0} events/s   ack p50 {:>6.1} ms  p99 {:>6.1} ms",
            phase.rate(),
            percentile(&phase.latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&phase.latencies, 0.99).as_secs_f64() * 1e3
        );
    };
    line("embedded (baseline)", &embedded);
    line("Kafka, 1 ingest node", &one);
    line("Kafka, 2 ingest nodes", &two);
    line("Kafka, 2 ingest nodes, half load", &half);
    println!(
        "  distributed / embedded: {:.2} (1 ingest), {:.2} (2 ingest)   goal >= 0.50; p99 at half load goal < 50 ms",
        one.rate() / embedded.rate(),
        two.rate() / embedded.rate()
    );
    println!(
        "  hand-over to the writer, mean per submission (first ingest node): submit {:.1} ms + receipt {:.1} ms; at half load {:.1} + {:.1} ms",
        one_steps.0, one_steps.1, half_steps.0, half_steps.1
    );
    println!(
        "  CPU seconds per 10 000 events: embedded {}; Kafka, 1 ingest node {}",
        cpu_line(&embedded_cpu),
        cpu_line(&one_cpu)
    );
    println!(
        "  query node freshness ({} events): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms   goal < 1000 ms",
        fresh.len(),
        percentile(&fresh, 0.50).as_secs_f64() * 1e3,
        percentile(&fresh, 0.99).as_secs_f64() * 1e3,
        fresh.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    // A late receipt is survived by sending the submission again; say how often.
    let resent: usize = ["ingest-1", "ingest-2"]
        .iter()
        .filter_map(|name| std::fs::read_to_string(scratch.join(name).with_extension("log")).ok())
        .map(|log| log.matches("the submission is sent again").count())
        .sum();
    // ... and of those, how many the writer had answered already (their receipt was
    // lost between the writer and the ingest node; the others never reached the writer,
    // or its answer was never sent).
    // ... and how often the broker handed the writer a record past offsets not read yet
    // (tansu's in-memory storage does; see `custos_stage::kafka`), which it then read
    // again, or gave up.
    let writer_log = std::fs::read_to_string(scratch.join("writer").with_extension("log")).unwrap_or_default();
    let answered_before = writer_log
        .matches("a submission came again after it was answered")
        .count();
    let gaps = writer_log.matches("reading the partition again").count();
    let skipped = writer_log.matches("offsets skipped").count();
    println!(
        "  submissions sent again by the ingest nodes for a late receipt: {resent} ({answered_before} of them answered before by the writer)"
    );
    println!("  offset gaps the broker handed the writer: {gaps}, of which given up: {skipped}");
    if args.json {
        let mut result = result;
        result["submissions_sent_again"] = serde_json::json!(resent);
        result["submissions_answered_before"] = serde_json::json!(answered_before);
        result["submission_offset_gaps"] = serde_json::json!(gaps);
        result["submission_offset_gaps_given_up"] = serde_json::json!(skipped);
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}
