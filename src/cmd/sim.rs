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
Attacks start in the second half of the trace, one per scenario unless --attacks says more.
The fleet is deliberately hard: sessions, activity levels a factor of 100 apart, benign
new tools, at least 20 near misses of every attack, a holiday and a fleet-wide deploy.")]
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
    /// Length of the trace; two weeks by default (a week of history before attacks).
    #[arg(long, default_value_t = 336)]
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
  custos eval --agents 50 --seed 1                       simulate two weeks and score them
  custos eval --events trace.ndjson --answers key.json   score any trace in the format
  custos eval --seed 3 --json > report.json

Replays the events through the detector in event time (days in seconds), applying
ingest's chain rules (duplicates dropped, forks refused and flagged, gaps flagged), runs
the shipped playbooks in dry run over the findings, and scores both against the answer
key (docs/evaluation.md). Exits 0 when every goal is met; 1 when one is missed (listed
under `goals NOT met`) or the input is refused (the error names it).")]
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
    /// A domain inside the organisation (repeatable): sends there are never exfiltration.
    #[arg(long = "internal-domain", value_name = "DOMAIN")]
    internal_domains: Vec<String>,
}

/// Replays events through a fresh detector; returns the findings in order, the
/// detector, the events read, and each log index's event id (blake3 hex of the payload).
pub(crate) fn replay_with_ids(
    events: impl Iterator<Item = anyhow::Result<Envelope>>,
    config: DetectorConfig,
    rules: &[PathBuf],
) -> anyhow::Result<(Vec<custos_detect::Finding>, Detector, usize, Vec<String>)> {
    let dirs: Vec<&Path> = rules.iter().map(PathBuf::as_path).collect();
    let mut replayer = Replayer::new(Detector::new(config, Rules::load(&dirs)?));
    let mut admission = Admission::default();
    let mut ids = Vec::new();
    for envelope in events {
        let envelope = envelope?;
        let id = custos_event::blake3_hex(&envelope.payload);
        let admitted = admission.admit(envelope)?;
        if let Some(observation) = &admitted.observation
            && !matches!(observation.signal, Signal::Accepted { .. })
        {
            tracing::debug!(agent = %observation.payload.agent, seq = observation.payload.seq, signal = observation.signal_name(), "refused by the chain rules");
        }
        if admitted
            .observation
            .as_ref()
            .is_some_and(|observation| observation.log_index.is_some())
        {
            ids.push(id);
        }
        replayer.step(admitted);
    }
    let (findings, detector) = replayer.finish();
    Ok((findings, detector, admission.count, ids))
}

/// Runs the shipped playbooks in dry run over the findings, in order, and counts the
/// automatic enforcement actions (those before any approval) on agents no attack was
/// about: wrongful automatic actions.
fn wrongful_actions(findings: &[custos_detect::Finding], answers: &AnswerKey) -> anyhow::Result<(usize, usize)> {
    let mut playbooks = custos_respond::load_playbooks(true, None)?;
    for playbook in &mut playbooks {
        playbook.dry_run = true;
    }
    let mut responder = custos_respond::Responder::new(playbooks);
    let attacked: std::collections::HashSet<&str> =
        answers.attacks.iter().map(|attack| attack.agent.as_str()).collect();
    let (mut automatic, mut wrongful) = (0, 0);
    for finding in findings {
        let mut gated = std::collections::HashSet::new();
        for record in responder.on_finding(finding, finding.ts) {
            if record.action == "require_approval" {
                gated.insert(record.playbook.clone());
                continue;
            }
            let enforcing = matches!(
                record.action.as_str(),
                "revoke_agent" | "quarantine_agent" | "quarantine_memory" | "revoke_credential"
            );
            if enforcing && record.status == custos_respond::ActionStatus::DryRun && !gated.contains(&record.playbook) {
                automatic += 1;
                if !attacked.contains(record.agent.as_str()) {
                    wrongful += 1;
                }
            }
        }
    }
    Ok((automatic, wrongful))
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
                entry: None,
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
        // Findings still held for the crowd check are decided with what is known.
        self.findings.extend(self.detector.flush());
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
    let config = DetectorConfig {
        internal_domains: args.internal_domains.clone(),
        ..DetectorConfig::default()
    };
    let window = config.window_secs;
    let started = std::time::Instant::now();
    let (answers, (findings, _, count, ids)) = match (&args.events, &args.answers) {
        (Some(events), Some(answers)) => {
            let key: AnswerKey = serde_json::from_slice(&fs_err::read(answers)?)
                .with_context(|| format!("{} is not an answer key (docs/evaluation.md)", answers.display()))?;
            let unknown = custos_sim::unknown_scenarios(&key);
            if !unknown.is_empty() {
                bail!(
                    "{}: unknown scenario {} in the answer key; known: {}",
                    answers.display(),
                    unknown
                        .iter()
                        .map(|name| format!("`{name}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Scenario::ALL.map(Scenario::name).join(", ")
                );
            }
            (key, replay_with_ids(read_trace(events)?, config, &args.rules)?)
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
            (
                answers,
                replay_with_ids(sim.events.into_iter().map(Ok), config, &args.rules)?,
            )
        }
    };
    let detected: Vec<Detected> = findings
        .iter()
        .map(|finding| Detected {
            agent: finding.agent.clone(),
            finding_type: finding.finding_type.clone(),
            ts: finding.ts,
            evidence: finding
                .evidence
                .iter()
                .filter_map(|index| ids.get(usize::try_from(*index).ok()?).cloned())
                .collect(),
        })
        .collect();
    let report = custos_sim::score(&answers, &detected, window);
    let (automatic, wrongful) = wrongful_actions(&findings, &answers)?;
    let wrongful_rate = wrongful as f64 * 100.0 / report.agent_days.max(1e-9);
    let missed = custos_sim::missed_goals(&report, wrongful_rate);
    let code = if missed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    };
    let elapsed = started.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "report": report, "events": count, "findings": findings,
                "automatic_actions": automatic, "wrongful_actions": wrongful,
                "wrongful_actions_per_100_agent_days": wrongful_rate,
                "goals_missed": missed,
            }))?
        );
        return Ok(code);
    }
    println!(
        "{count} events replayed in {elapsed:.1} s ({:.0} events/s); {} findings\n",
        count as f64 / elapsed.max(1e-9),
        report.findings
    );
    println!(
        "{:<32} {:>7} {:>8} {:>9} {:>7} {:>6} {:>12} {:>12} {:>9}",
        "SCENARIO", "ATTACKS", "DETECTED", "PRECISION", "RECALL", "F1", "TTD p50 (s)", "TTD max (s)", "EVIDENCE"
    );
    for scenario in &report.scenarios {
        let ttd = |secs: Option<f64>| secs.map_or("-".to_owned(), |secs| format!("{secs:.0}"));
        println!(
            "{:<32} {:>7} {:>8} {:>9.2} {:>7.2} {:>6.2} {:>12} {:>12} {:>9}",
            scenario.scenario,
            scenario.attacks,
            scenario.detected,
            scenario.precision,
            scenario.recall,
            scenario.f1,
            ttd(scenario.time_to_detect_p50_secs),
            ttd(scenario.time_to_detect_max_secs),
            format!("{}/{}", scenario.evidence_cited, scenario.evidence_checked),
        );
    }
    println!(
        "\nrecall {:.3} ({} of {} attacks); {} related findings (right agent and time, type not naming the attack)",
        report.recall, report.detected, report.attacks, report.related
    );
    println!(
        "false positives: {} over {:.0} agent-days = {:.2} per 100 agent-days (goal <= {})",
        report.false_positives,
        report.agent_days,
        report.false_positives_per_100_agent_days,
        custos_sim::goals::FALSE_POSITIVES
    );
    if !report.false_positives_by_type.is_empty() {
        println!("false positives by type: {:?}", report.false_positives_by_type);
    }
    println!(
        "automatic actions (shipped playbooks, dry run): {automatic}; wrongful (agents not attacked): {wrongful} = {wrongful_rate:.2} per 100 agent-days (goal <= {})",
        custos_sim::goals::WRONGFUL_ACTIONS
    );
    if missed.is_empty() {
        println!("goals: all met");
    } else {
        println!("goals NOT met:");
        for line in &missed {
            println!("  - {line}");
        }
    }
    Ok(code)
}
