//! `custos simulate` and `custos eval`.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use custos_detect::{Detector, DetectorConfig, Rules};
use custos_event::{Envelope, Observation, Signal};
use custos_sim::{AnswerKey, Detected, Scenario, SimConfig};

use super::client::{Client, NodeArgs};

#[derive(Args)]
#[command(after_help = "\
Examples:
  custos simulate --agents 50 --hours 48 --seed 1 --out trace.ndjson --answers key.json
  custos simulate --agents 20 --hours 2 --send --data ./store      (to a running node)

The trace is NDJSON, one DSSE envelope per line, in time order (docs/evaluation.md).
Attacks start in the second half of the trace, one per scenario unless --attacks says more.")]
pub(crate) struct SimulateArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Only these scenarios (comma-separated names; default all).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Write the trace here (NDJSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the answer key here (JSON).
    #[arg(long)]
    answers: Option<PathBuf>,
    /// Enroll the agents on a running node and send the trace, shifted to end now.
    #[arg(long)]
    send: bool,
    #[command(flatten)]
    node: NodeArgs,
}

/// The simulated fleet's size and seed, shared by `simulate` and `eval`.
#[derive(Args)]
pub(crate) struct FleetArgs {
    #[arg(long, default_value_t = 50)]
    agents: usize,
    #[arg(long, default_value_t = 48)]
    hours: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Injections per scenario (into distinct agents).
    #[arg(long, default_value_t = 1)]
    attacks: usize,
}

pub(crate) fn config_from(fleet: &FleetArgs, names: &[String]) -> anyhow::Result<SimConfig> {
    let mut config = SimConfig::new(fleet.agents, fleet.hours, fleet.seed);
    config.attacks_per_scenario = fleet.attacks;
    if !names.is_empty() {
        config.scenarios = names
            .iter()
            .map(|name| {
                Scenario::parse(name).with_context(|| {
                    format!(
                        "unknown scenario `{name}`; known: {}",
                        Scenario::ALL.map(Scenario::name).join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(config)
}

pub(crate) async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    if args.out.is_none() && !args.send {
        bail!("say where the trace goes: --out FILE, or --send to a running node");
    }
    let mut config = config_from(&args.fleet, &args.scenarios)?;
    if args.send {
        // A node accepts events up to 7 days old and 5 minutes ahead: end the trace now.
        if config.hours > 24 * 7 {
            bail!("--send needs --hours of at most 168 (the node refuses older events)");
        }
        config.start = chrono::Utc::now() - chrono::Duration::hours(config.hours as i64);
    }
    eprintln!(
        "simulating {} agents for {} hours (seed {})...",
        config.agents, config.hours, config.seed
    );
    let simulation = custos_sim::simulate(&config);
    eprintln!(
        "{} events, {} attacks: {}",
        simulation.events.len(),
        simulation.answers.attacks.len(),
        simulation
            .answers
            .attacks
            .iter()
            .map(|attack| attack.scenario.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &args.out {
        let mut out = std::io::BufWriter::new(fs_err::File::create(path)?);
        for envelope in &simulation.events {
            writeln!(out, "{}", envelope.to_json())?;
        }
        out.flush()?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.answers {
        fs_err::write(path, serde_json::to_vec_pretty(&simulation.answers)?)?;
        eprintln!("wrote {}", path.display());
    }
    if args.send {
        let client = Client::from_args(&args.node)?;
        for agent in &simulation.answers.agents {
            let body = serde_json::json!({
                "did": agent.did, "realm": agent.realm, "labels": { "role": agent.role },
            });
            if let Err(error) = client.post_json("/v1/agents", &body).await
                && !error.to_string().contains("agent_exists")
            {
                return Err(error);
            }
        }
        let progress = indicatif::ProgressBar::new(simulation.events.len() as u64);
        let mut accepted = 0usize;
        let mut rejected: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for chunk in simulation.events.chunks(1000) {
            let body = chunk.iter().map(Envelope::to_json).collect::<Vec<_>>().join("\n");
            for result in client.send_events(body.into_bytes()).await? {
                if result.status == "rejected" {
                    *rejected.entry(result.reason.unwrap_or_default()).or_default() += 1;
                } else {
                    accepted += 1;
                }
            }
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
        eprintln!("sent: {accepted} accepted or duplicate; rejected by reason: {rejected:?}");
        eprintln!("(a cloned key's fork is `chain_fork`; agents the playbooks revoked get `revoked_agent`)");
    }
    Ok(())
}

#[derive(Args)]
#[command(after_help = "\
Examples:
  custos eval --agents 50 --hours 48 --seed 1            simulate and score in one go
  custos eval --events trace.ndjson --answers key.json   score any trace in the format
  custos eval --seed 3 --json > report.json

Replays the events through the detector in event time (days in seconds), applying
ingest's chain rules (duplicates dropped, forks refused and flagged, gaps flagged), and
scores the findings against the answer key (docs/evaluation.md).")]
pub(crate) struct EvalArgs {
    /// A trace (NDJSON of DSSE envelopes, time order); without it one is simulated.
    #[arg(long, requires = "answers")]
    events: Option<PathBuf>,
    /// The answer key for --events.
    #[arg(long)]
    answers: Option<PathBuf>,
    #[command(flatten)]
    fleet: FleetArgs,
    /// Extra Sigma rule directory (repeatable).
    #[arg(long = "rules", value_name = "DIR")]
    rules: Vec<PathBuf>,
    /// Print the report (and every finding) as JSON.
    #[arg(long)]
    json: bool,
}

/// Replays events through a fresh detector; returns the findings in order.
pub(crate) fn replay(
    events: impl Iterator<Item = anyhow::Result<Envelope>>,
    config: DetectorConfig,
    rules: &[PathBuf],
) -> anyhow::Result<(Vec<custos_detect::Finding>, Detector, usize)> {
    let dirs: Vec<&Path> = rules.iter().map(PathBuf::as_path).collect();
    let mut replayer = Replayer::new(Detector::new(config, Rules::load(&dirs)?));
    let mut admission = Admission::default();
    for envelope in events {
        replayer.step(admission.admit(envelope?)?);
    }
    let (findings, detector) = replayer.finish();
    Ok((findings, detector, admission.count))
}

/// One event after signature and chain checks: its time, and what ingest would feed the
/// detector (`None` for a duplicate, which ingest drops).
pub(crate) struct Admitted {
    pub(crate) ts: i64,
    pub(crate) observation: Option<Observation>,
}

/// What ingest does before the detector sees an event, without a store: signature check,
/// payload checks, chain rules.
#[derive(Default)]
pub(crate) struct Admission {
    keys: custos_event::KeyCache,
    chains: ChainEmulator,
    /// Events admitted so far (1-based position of the next error).
    pub(crate) count: usize,
}

impl Admission {
    pub(crate) fn admit(&mut self, envelope: Envelope) -> anyhow::Result<Admitted> {
        self.count += 1;
        let count = self.count;
        let key = self
            .keys
            .get(&envelope.keyid)
            .map_err(|error| anyhow::anyhow!("event {count}: {error}"))?;
        custos_event::verify::verify_one(&key, &envelope)
            .map_err(|rejection| anyhow::anyhow!("event {count}: {}", rejection.message))?;
        let digest = envelope.payload_digest();
        let verified = custos_event::verify::check_event(envelope)
            .map_err(|rejection| anyhow::anyhow!("event {count}: {}", rejection.message))?;
        let ts = verified.payload.ts.timestamp();
        let observation = self
            .chains
            .admit(&verified.payload, digest)
            .map(|(log_index, signal)| Observation {
                log_index,
                ingest_ts: verified.payload.ts,
                payload: verified.payload,
                signal,
            });
        Ok(Admitted { ts, observation })
    }
}

/// Drives a detector in event time: a tick at each new window, then the event.
pub(crate) struct Replayer {
    detector: Detector,
    width: i64,
    window: i64,
    last: i64,
    pub(crate) findings: Vec<custos_detect::Finding>,
}

impl Replayer {
    pub(crate) fn new(detector: Detector) -> Self {
        let width = detector.config.window_secs.max(1);
        Self {
            detector,
            width,
            window: i64::MIN,
            last: 0,
            findings: Vec::new(),
        }
    }

    pub(crate) fn step(&mut self, admitted: Admitted) {
        let ts = admitted.ts;
        if ts.div_euclid(self.width) != self.window {
            self.window = ts.div_euclid(self.width);
            self.findings.extend(self.detector.tick(ts));
        }
        self.last = self.last.max(ts);
        if let Some(observation) = admitted.observation {
            self.findings.extend(self.detector.observe(&observation));
        }
    }

    /// Closes the last windows. Not further: past the trace's end every agent is silent.
    pub(crate) fn finish(mut self) -> (Vec<custos_detect::Finding>, Detector) {
        self.findings.extend(self.detector.tick(self.last + self.width));
        (self.findings, self.detector)
    }
}

/// What ingest's chain checks would decide, without a store: the chain rule
/// ([`custos_event::chain::step`]) per agent, with every accepted (seq, digest) kept so
/// that a resend at any depth is a duplicate, as on a node.
#[derive(Default)]
pub(crate) struct ChainEmulator {
    heads: std::collections::HashMap<String, (custos_event::chain::Head, std::collections::HashMap<u64, [u8; 32]>)>,
    next_index: u64,
}

impl ChainEmulator {
    /// `None` for a duplicate (dropped); otherwise the log index (`None` when refused)
    /// and the signal.
    pub(crate) fn admit(&mut self, payload: &custos_event::Payload, digest: [u8; 32]) -> Option<(Option<u64>, Signal)> {
        use custos_event::chain::{Head, Step, step};
        let seq = payload.seq;
        let known = self.heads.get(&payload.agent);
        let refused = |reason: &str| {
            Some((
                None,
                Signal::Rejected {
                    reason: reason.to_owned(),
                },
            ))
        };
        let gap = match step(known.map(|(head, _)| head), seq, payload.prev_digest()) {
            Step::Behind => {
                let stored = known.and_then(|(_, all)| all.get(&seq));
                return match stored {
                    Some(stored) if *stored == digest => None,
                    Some(_) => refused("chain_fork"),
                    None => refused("replay"),
                };
            }
            Step::Broken => return refused("chain_broken"),
            step => step.gap(),
        };
        let (head, all) = self
            .heads
            .entry(payload.agent.clone())
            .or_insert_with(|| (Head { seq, digest }, std::collections::HashMap::new()));
        *head = Head { seq, digest };
        all.insert(seq, digest);
        let index = self.next_index;
        self.next_index += 1;
        Some((Some(index), Signal::Accepted { gap }))
    }
}

fn read_trace(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Envelope>>> {
    let file = fs_err::File::open(path)?;
    let name = path.display().to_string();
    Ok(std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, line)| line.as_ref().map_or(true, |line| !line.trim().is_empty()))
        .map(move |(number, line)| {
            let line = line.with_context(|| format!("reading {name}"))?;
            custos_event::decode_envelope(line.as_bytes(), 1 << 20, &[custos_event::EVENT_PAYLOAD_TYPE])
                .map(|decoded| decoded.envelope)
                .map_err(|rejection| {
                    anyhow::anyhow!(
                        "{name}:{}: {} ({})",
                        number + 1,
                        rejection.message,
                        rejection.reason.code()
                    )
                })
        }))
}

pub(crate) fn eval(args: &EvalArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = DetectorConfig::default();
    let window = config.window_secs;
    let started = std::time::Instant::now();
    let (answers, (findings, _, count)) = match (&args.events, &args.answers) {
        (Some(events), Some(answers)) => {
            let key: AnswerKey = serde_json::from_slice(&fs_err::read(answers)?)
                .with_context(|| format!("{} is not an answer key (docs/evaluation.md)", answers.display()))?;
            (key, replay(read_trace(events)?, config, &args.rules)?)
        }
        _ => {
            let sim = custos_sim::simulate(&config_from(&args.fleet, &[])?);
            eprintln!(
                "simulated {} agents for {} hours (seed {}): {} events",
                args.fleet.agents,
                args.fleet.hours,
                args.fleet.seed,
                sim.events.len()
            );
            let answers = sim.answers;
            (answers, replay(sim.events.into_iter().map(Ok), config, &args.rules)?)
        }
    };
    let detected: Vec<Detected> = findings
        .iter()
        .map(|finding| Detected {
            agent: finding.agent.clone(),
            finding_type: finding.finding_type.clone(),
            ts: finding.ts,
        })
        .collect();
    let report = custos_sim::score(&answers, &detected, window);
    let elapsed = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "report": report, "events": count, "findings": findings,
            }))?
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    println!(
        "{count} events replayed in {elapsed:.1} s ({:.0} events/s); {} findings\n",
        count as f64 / elapsed.max(1e-9),
        report.findings
    );
    println!(
        "{:<32} {:>7} {:>8} {:>9} {:>7} {:>6} {:>12}",
        "SCENARIO", "ATTACKS", "DETECTED", "PRECISION", "RECALL", "F1", "TTD p50 (s)"
    );
    for scenario in &report.scenarios {
        println!(
            "{:<32} {:>7} {:>8} {:>9.2} {:>7.2} {:>6.2} {:>12}",
            scenario.scenario,
            scenario.attacks,
            scenario.detected,
            scenario.precision,
            scenario.recall,
            scenario.f1,
            scenario
                .time_to_detect_p50_secs
                .map_or("-".to_owned(), |secs| format!("{secs:.0}")),
        );
    }
    println!(
        "\nfalse positives: {} over {:.0} agent-days = {:.2} per 100 agent-days (goal <= 1)",
        report.false_positives, report.agent_days, report.false_positives_per_100_agent_days
    );
    if !report.false_positives_by_type.is_empty() {
        println!("false positives by type: {:?}", report.false_positives_by_type);
    }
    let recall_ok = report.scenarios.iter().all(|scenario| scenario.recall >= 0.95);
    let fp_ok = report.false_positives_per_100_agent_days <= 1.0;
    println!(
        "goals: recall >= 0.95 on every scenario: {}; <= 1 FP per 100 agent-days: {}",
        if recall_ok { "met" } else { "NOT met" },
        if fp_ok { "met" } else { "NOT met" }
    );
    Ok(std::process::ExitCode::SUCCESS)
}
