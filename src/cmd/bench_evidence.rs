//! `custos bench evidence`: evidence export (over HTTP, from a live node) and offline
//! verification rates, beside the raw ed25519 batch-verify rate of the same envelopes.
//!
//! ```text
//!  sign events ─▶ baseline: raw batch verify ─▶ node (ingest + query routes) ◀─POST─ events
//!  POST /v1/evidence (one realm, all time) ─▶ bundle.tar ─▶ evidence::verify (timed)
//! ```

use std::time::Instant;

use clap::Args;
use custos_event::Envelope;

use super::bench::raw_batch_verify_rate;
use super::client::Client;
use super::fleet::fleet;

#[derive(Args)]
#[command(after_help = "\
Examples:
  cargo run --release -- bench evidence
  cargo run --release -- bench evidence --events 1000000 --agents 200

Nothing here is a pass/fail test; figures go to docs/BENCHMARKS.md with the command.")]
pub(crate) struct EvidenceArgs {
    /// Events sent to the node.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Agents sending them (spread over the simulator's realms).
    #[arg(long, default_value_t = 50)]
    agents: usize,
}

pub(crate) async fn evidence(args: EvidenceArgs) -> anyhow::Result<()> {
    let data = super::scratch_dir("custos-bench-evidence")?;
    eprintln!("signing {} events for {} agents…", args.events, args.agents);
    let (mut agents, mut rng) = fleet(args.agents.max(1), 7);
    let now = chrono::Utc::now();
    let realm = agents[0].role.realm.to_owned();
    let mut envelopes: Vec<Envelope> = Vec::with_capacity(args.events);
    for position in 0..args.events {
        let agent = position % agents.len();
        envelopes.push(agents[agent].next(&mut rng, now));
    }
    let in_realm = envelopes
        .iter()
        .zip((0..args.events).map(|position| position % agents.len()))
        .filter(|(_, agent)| agents[*agent].role.realm == realm)
        .count();
    eprintln!("measuring the raw ed25519 batch-verify rate on the same envelopes…");
    let raw_rate = tokio::task::block_in_place(|| raw_batch_verify_rate(std::slice::from_ref(&envelopes)))?;

    let config = custos_ingest::NodeConfig::new(data.clone(), "127.0.0.1:0".parse()?);
    let hooks = custos_ingest::Hooks {
        routes: Some(crate::reader::query_routes(custos_query::Limits {
            max_rows: 10_000_000,
            ..Default::default()
        })?),
        ..Default::default()
    };
    let running = custos_ingest::start_with(config, hooks).await?;
    let token = running.admin_token.clone().map(|secret| secret.0).unwrap_or_default();
    let url = format!("http://{}", running.addr);
    let admin = Client::new(&url, Some(token.clone()));
    super::fleet::enroll(&admin, &agents).await?;
    agents.clear();
    eprintln!("sending them…");
    let client = Client::new(&url, None);
    for chunk in envelopes.chunks(5_000) {
        let mut body = String::new();
        for envelope in chunk {
            body.push_str(&envelope.to_json());
            body.push('\n');
        }
        client.send_events(body.into_bytes()).await?;
    }

    eprintln!("exporting realm {realm} ({in_realm} events)…");
    let from = (now - chrono::Duration::days(1)).to_rfc3339();
    let to = (now + chrono::Duration::days(1)).to_rfc3339();
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/evidence"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"realm": realm, "from": from, "to": to}))
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "export failed: {}",
        response.text().await?
    );
    let bundle = response.bytes().await?;
    let export_secs = started.elapsed().as_secs_f64();
    running.shutdown().await?;

    eprintln!("verifying the bundle offline…");
    let started = Instant::now();
    let report = tokio::task::block_in_place(|| custos_query::evidence::verify(&bundle, None));
    let verify_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(report.ok(), "the bundle did not verify: {:?}", report.problems.first());
    let rows: u64 = report.rows.values().sum();
    let _ = std::fs::remove_dir_all(&data);

    println!(
        "custos bench evidence: {} events from {} agents; realm {realm}: {rows} entries, {:.1} MiB bundle",
        args.events,
        args.agents,
        bundle.len() as f64 / (1024.0 * 1024.0)
    );
    println!(
        "export (POST /v1/evidence): {:.2} s, {:.0} entries/s",
        export_secs,
        rows as f64 / export_secs
    );
    println!(
        "verify (offline, every check): {:.2} s, {:.0} entries/s = {:.2}x the raw batch-verify rate ({:.0}/s)",
        verify_secs,
        rows as f64 / verify_secs,
        rows as f64 / verify_secs / raw_rate,
        raw_rate
    );
    Ok(())
}
