//! `custos demo`: the embedded node, a fleet, every kind of bad input, and a verify.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use custos_event::{AgentKey, Kind, Payload};
use custos_ingest::samples::{Actors, Expect, cases};
use rand::Rng as _;

use super::client::Client;
use super::fleet::{FleetAgent, fleet};

#[derive(Args)]
#[command(after_help = "\
Examples:
  custos demo
  custos demo --agents 100 --events 100000 --data ./demo-store")]
pub(crate) struct DemoArgs {
    /// Agents in the simulated fleet.
    #[arg(long, default_value_t = 36)]
    agents: usize,
    /// Events to stream.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Store directory (default: a new directory under the system temp dir, kept afterwards).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seed for the fleet's keys and behaviour.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn section(title: &str) {
    println!("\n== {title}");
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let data = match args.data.clone() {
        Some(data) => data,
        None => super::scratch_dir("custos-demo")?,
    };
    let mut config = custos_ingest::NodeConfig::new(data.clone(), "127.0.0.1:0".parse()?);
    config.log.segment_max_entries = 5_000;
    let marks = std::sync::Arc::new(crate::pipeline::Marks::default());
    let node = super::serve::Node::start(
        config.clone(),
        Some(crate::pipeline::PipelineConfig::new(data.clone())),
        marks.clone(),
        custos_query::Limits {
            worker: custos_query::pool::WorkerProgram::current(),
            ..Default::default()
        },
    )
    .await?;
    let running = &node.running;
    let token = running
        .admin_token
        .clone()
        .map(|secret| secret.0)
        .or_else(|| fs_err::read_to_string(custos_http::auth::admin_token_path(&data)).ok())
        .context("no admin token for the demo store")?;
    let url = format!("http://{}", running.addr);
    let admin = Client::new(&url, Some(token.trim().to_owned()));
    let agents_client = Client::new(&url, None);
    println!("Custos demo: node on {url}, store in {}", data.display());
    println!("the detector and the responder run inside the node, with the shipped rules and playbooks");

    section("Enroll a fleet (zero trust: only enrolled agents are accepted)");
    let (mut agents, mut rng) = fleet(args.agents.max(6), args.seed);
    for agent in &agents {
        admin
            .post_json(
                "/v1/agents",
                &serde_json::json!({"did": agent.did(), "realm": agent.role.realm, "labels": {"role": agent.role.name}}),
            )
            .await?;
    }
    let realms: std::collections::BTreeSet<_> = agents.iter().map(|agent| agent.role.realm).collect();
    println!("enrolled {} agents in realms {:?}", agents.len(), realms);

    section("A coding agent spawns a sub-agent with a signed delegation event");
    let child_key = AgentKey::generate()?;
    let mut delegation = Payload::new(Kind::Delegation, chrono::Utc::now());
    delegation.action = Some("spawn".into());
    delegation.target = Some(child_key.did().to_owned());
    let envelope = agents[0].signer.sign(delegation);
    agents[0].remember(&envelope);
    let result = agents_client.send_events(envelope.to_json().into_bytes()).await?;
    println!(
        "delegation accepted at log index {}; the child inherits realm `{}`",
        index(result[0].log_index),
        agents[0].role.realm
    );
    let mut child = FleetAgent::new(child_key, agents[0].role);

    section(&format!("Stream {} signed events", args.events));
    let bar = indicatif::ProgressBar::new(args.events as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let (mut accepted, mut other) = (0usize, 0usize);
    let mut sent = 0;
    while sent < args.events {
        let batch = (args.events - sent).min(500);
        let mut body = String::new();
        for _ in 0..batch {
            let position = rng.gen_range(0..agents.len() + 1);
            let ts = chrono::Utc::now() - chrono::Duration::milliseconds(rng.gen_range(0..2_000));
            let agent = if position == agents.len() {
                &mut child
            } else {
                &mut agents[position]
            };
            body.push_str(&agent.next(&mut rng, ts).to_json());
            body.push('\n');
        }
        for result in agents_client.send_events(body.into_bytes()).await? {
            if result.status == "accepted" {
                accepted += 1;
            } else {
                other += 1;
            }
        }
        sent += batch;
        bar.set_position(sent as u64);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{accepted} accepted, {other} not, in {seconds:.1}s ({:.0} events/s over loopback HTTP, each acknowledged only after fsync)",
        sent as f64 / seconds
    );

    attack(&admin, &agents_client, &mut agents[3], &mut rng, &marks).await?;

    section("Bad input: one of each kind (every rejection is kept for forensics)");
    let mut compromised = FleetAgent::new(AgentKey::generate()?, agents[1].role);
    admin
        .post_json(
            "/v1/agents",
            &serde_json::json!({"did": compromised.did(), "realm": compromised.role.realm}),
        )
        .await?;
    let envelope = compromised.next(&mut rng, chrono::Utc::now());
    agents_client.send_events(envelope.to_json().into_bytes()).await?;
    admin
        .post_json(
            &format!("/v1/agents/{}/revoke", compromised.did()),
            &serde_json::json!({"reason": "demo"}),
        )
        .await?;
    let stranger = AgentKey::generate()?;
    let target = &mut agents[1];
    // Make sure the target has a long enough history for the replay case.
    let mut body = String::new();
    for _ in 0..40 {
        body.push_str(&target.next(&mut rng, chrono::Utc::now()).to_json());
        body.push('\n');
    }
    agents_client.send_events(body.into_bytes()).await?;
    let (first, last) = (
        target.first.clone().context("no first event")?,
        target.last.clone().context("no last event")?,
    );
    let crafted = cases(
        Actors {
            agent: &mut target.signer,
            first: &first,
            last: &last,
            stranger: &stranger,
            revoked: &mut compromised.signer,
            max_event_bytes: config.max_event_bytes,
        },
        chrono::Utc::now(),
    );
    println!("{:<34} {:<10} {:<20} message", "case", "status", "reason");
    let mut surprises = 0;
    for case in &crafted {
        let result = agents_client.send_events(case.body.clone()).await?;
        let result = result.first().context("no result")?;
        let as_expected = match case.expect {
            Expect::Rejected(reason) => result.reason.as_deref() == Some(reason.code()),
            Expect::Duplicate => result.status == "duplicate",
            Expect::Gap => result.flags.iter().any(|flag| flag == "chain_gap"),
        };
        if !as_expected {
            surprises += 1;
        }
        let detail = match (&result.message, result.missing) {
            (Some(message), _) => message.chars().take(90).collect::<String>(),
            (None, Some([from, to])) => format!(
                "accepted at log index {}; seqs {from}..={to} missing",
                index(result.log_index)
            ),
            (None, None) => format!("the original is at log index {}", index(result.log_index)),
        };
        println!(
            "{:<34} {:<10} {:<20} {detail}{}",
            case.name,
            result.status,
            result
                .reason
                .as_deref()
                .or(result.flags.first().map(String::as_str))
                .unwrap_or("-"),
            if as_expected { "" } else { "  <-- unexpected" }
        );
    }

    section("Revocation cascades to sub-agents and takes effect before the next event");
    let revoked = admin
        .post_json(
            &format!("/v1/agents/{}/revoke", agents[0].did()),
            &serde_json::json!({"reason": "demo"}),
        )
        .await?;
    for did in revoked["revoked"].as_array().cloned().unwrap_or_default() {
        println!("revoked {}", did.as_str().unwrap_or("?"));
    }
    let after = child.next(&mut rng, chrono::Utc::now());
    let result = agents_client.send_events(after.to_json().into_bytes()).await?;
    println!(
        "the sub-agent's next event: {} ({})",
        result[0].status,
        result[0].reason.as_deref().unwrap_or("-")
    );

    println!("(the cloned-key case above was a critical finding too: the playbook revoked that agent)");

    section("Shut down: drain, seal the open segment, sign a final checkpoint");
    node.shutdown().await?;
    println!("sealed");

    section("Verify the store from its files alone, signatures included");
    let verify = super::verify::VerifyArgs {
        data: data.clone(),
        signatures: true,
        log_key: None,
        partitions_key: None,
        witness: None,
        witness_url: None,
        witness_checkpoint: None,
        json: false,
        quiet: false,
    };
    let started = Instant::now();
    let report = super::verify::verify_with_progress(
        &verify,
        &custos_store::verify::VerifyOptions {
            signatures: true,
            log_key: None,
            ..Default::default()
        },
    )?;
    super::verify::print_report(&report, started.elapsed());

    section("Try next");
    let shown = data.display();
    println!(
        "  custos serve --data {shown}                     # restart this node (admin token in {shown}/admin.token)"
    );
    println!("  custos agent list --data {shown}                # with the node running");
    println!("  custos rejected list --data {shown}             # the bad inputs above, kept with their reasons");
    println!("  custos finding list --data {shown}              # the findings, with explanations");
    println!("  custos action list --data {shown}               # what the playbooks did");
    println!("  custos eval --agents 50 --seed 1                # detection quality on a hard simulated fleet");
    println!("  custos proof inclusion --data {shown} --index 42");
    println!("  custos verify {shown} --signatures              # then flip a byte in a segment and run it again");
    if surprises > 0 || !report.ok() {
        println!(
            "\nthe demo saw {surprises} unexpected answers and {} integrity problems",
            report.problems.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// An ops agent's memory is poisoned from untrusted content, read back, and the agent
/// then uses a credential: the detector's provenance tracking fires, the shipped playbook revokes the agent and
/// quarantines the memory. Times the loop from sending the first malicious event to the
/// revocation being durable in the log.
async fn attack(
    admin: &Client,
    agents_client: &Client,
    victim: &mut FleetAgent,
    rng: &mut rand::rngs::StdRng,
    marks: &crate::pipeline::Marks,
) -> anyhow::Result<()> {
    section(&format!(
        "An attack: {} ({}) stores untrusted content in memory, reads it back, then uses a credential",
        short(victim.did()),
        victim.role.name
    ));
    let now = chrono::Utc::now();
    let mut poison = Payload::new(Kind::MemoryWrite, now);
    poison.action = Some("memory.store".into());
    poison.memory_id = Some("mem-runbook-poisoned".into());
    poison.attrs = Some(serde_json::Map::from_iter([(
        "source_trust".to_owned(),
        serde_json::json!("untrusted"),
    )]));
    let mut recall = Payload::new(Kind::MemoryRead, now + chrono::Duration::milliseconds(200));
    recall.action = Some("memory.recall".into());
    recall.memory_id = Some("mem-runbook-poisoned".into());
    let mut misuse = Payload::new(Kind::CredentialUse, now + chrono::Duration::milliseconds(400));
    misuse.action = Some("vault.read".into());
    misuse.target = Some("vault://ops/prod-db-admin".into());
    let did = victim.did().to_owned();
    misuse.attrs = Some(serde_json::Map::from_iter([(
        "credential_owner".to_owned(),
        serde_json::json!(did),
    )]));
    let body = format!(
        "{}\n{}\n{}\n",
        victim.signer.sign(poison).to_json(),
        victim.signer.sign(recall).to_json(),
        victim.signer.sign(misuse).to_json()
    );
    let sent = Instant::now();
    let results = agents_client.send_events(body.into_bytes()).await?;
    println!(
        "the three events accepted (log indexes {}, {} and {}); the agent is still active",
        index(results[0].log_index),
        index(results.get(1).and_then(|result| result.log_index)),
        index(results.get(2).and_then(|result| result.log_index))
    );
    let enforced = loop {
        let found = marks
            .enforced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(_, agent, action)| *agent == did && action == "revoke_agent")
            .map(|(at, _, _)| *at);
        if let Some(at) = found {
            break at;
        }
        anyhow::ensure!(
            sent.elapsed() < std::time::Duration::from_secs(20),
            "no revocation within 20 s of the attack"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    };
    let findings = admin.get("/v1/findings?limit=50").await?;
    if let Some(finding) = findings["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|finding| finding["agent"] == did.as_str() && finding["type"] == "memory_poisoning")
    {
        println!(
            "finding {} at log index {}: {} (score {}, {}, rule {})",
            finding["id"].as_str().unwrap_or("?"),
            finding["log_index"],
            finding["title"].as_str().unwrap_or("?"),
            finding["score"],
            finding["severity"].as_str().unwrap_or("?"),
            finding["rule_id"].as_str().unwrap_or("-"),
        );
        println!(
            "  evidence: log indexes {}; tags {}",
            finding["evidence"], finding["tags"]
        );
    }
    // The actions are signed into the log just after they are enforced.
    let mut actions = admin.get("/v1/actions?limit=20").await?;
    for _ in 0..500 {
        let logged = actions["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|action| action["agent"] == did.as_str() && action["log_index"].is_u64())
            .count();
        if logged >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        actions = admin.get("/v1/actions?limit=20").await?;
    }
    for action in actions["actions"].as_array().into_iter().flatten().rev() {
        if action["agent"] == did.as_str() {
            println!(
                "playbook {}: {} `{}` -> {} (log index {})",
                action["playbook"].as_str().unwrap_or("?"),
                action["action"].as_str().unwrap_or("?"),
                short(action["target"].as_str().unwrap_or("?")),
                action["status"].as_str().unwrap_or("?"),
                action["log_index"],
            );
        }
    }
    println!(
        "\n  first malicious event -> enforced revocation: {:.1} ms (measured on this run)\n",
        enforced.duration_since(sent).as_secs_f64() * 1000.0
    );
    let next = victim.next(rng, chrono::Utc::now());
    let result = agents_client.send_events(next.to_json().into_bytes()).await?;
    println!(
        "the agent's next event: {} ({})",
        result[0].status,
        result[0].reason.as_deref().unwrap_or("-")
    );
    let memory = admin.get("/v1/memories/mem-runbook-poisoned/status").await?;
    println!(
        "memory mem-runbook-poisoned: {} (serve: {})",
        memory["status"].as_str().unwrap_or("?"),
        memory["serve"]
    );
    Ok(())
}

fn short(text: &str) -> String {
    if text.len() > 24 {
        format!("{}…{}", &text[..14], &text[text.len() - 6..])
    } else {
        text.to_owned()
    }
}

fn index(log_index: Option<u64>) -> String {
    log_index.map_or_else(|| "-".to_owned(), |index| index.to_string())
}
