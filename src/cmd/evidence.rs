//! `custos evidence export|verify`: bundles a third party can check offline.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use super::client::NodeArgs;

pub(crate) async fn export(
    node: &NodeArgs,
    realm: &str,
    agent: Option<String>,
    from: &str,
    to: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let parse = |name: &str, text: &str| {
        chrono::DateTime::parse_from_rfc3339(text)
            .map(|at| at.with_timezone(&chrono::Utc))
            .with_context(|| format!("--{name} `{text}` is not an RFC 3339 time such as 2026-11-22T10:00:00Z"))
    };
    let (from, to) = (parse("from", from)?, parse("to", to)?);
    anyhow::ensure!(to > from, "--to ({to}) must be after --from ({from})");
    let token = node.token()?;
    eprintln!("exporting realm {realm} from {from} to {to}…");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/evidence", node.url.trim_end_matches('/')))
        .bearer_auth(token)
        .json(&serde_json::json!({"realm": realm, "agent": agent, "from": from, "to": to}))
        .send()
        .await
        .with_context(|| format!("cannot reach {}", node.url))?;
    let status = response.status();
    let rows = response
        .headers()
        .get("x-custos-rows")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let body = response.bytes().await?;
    if !status.is_success() {
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        anyhow::bail!(
            "{} {}: {}",
            status.as_u16(),
            error["error"].as_str().unwrap_or("error"),
            error["message"].as_str().unwrap_or_default()
        );
    }
    fs_err::write(out, &body)?;
    eprintln!("wrote {} ({} bytes, {rows} entries)", out.display(), body.len());
    eprintln!("check it anywhere with: custos evidence verify {}", out.display());
    Ok(())
}

pub(crate) fn verify(
    bundle: &Path,
    node_key: Option<&str>,
    partitions_key: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let bytes = fs_err::read(bundle)?;
    let report = custos_query::evidence::verify_pinned(&bytes, node_key, partitions_key);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(manifest) = &report.manifest {
            println!(
                "bundle: realm {}{} from {} to {}, exported {} by {}",
                manifest.query.realm,
                manifest
                    .query
                    .agent
                    .as_deref()
                    .map(|agent| format!(" agent {agent}"))
                    .unwrap_or_default(),
                manifest.query.from,
                manifest.query.to,
                manifest.created_at,
                manifest.created_by
            );
            println!("node key {} (manifest signer)", manifest.node_did);
        }
        for (file, rows) in &report.rows {
            println!("  {file}: {rows} rows checked (signature, digest, leaf, inclusion proof)");
        }
        println!("  checkpoints verified: {}", report.checkpoints);
        if let Some((partition, partitions)) = report.partition {
            println!(
                "  partition {partition} of a set of {partitions}: bound by a cross-partition checkpoint, and the realm's home partition"
            );
        }
        for problem in &report.problems {
            println!("FAIL: {problem}");
        }
        if report.ok() {
            println!("OK: every signature, digest, leaf hash, inclusion and consistency proof checks");
            if node_key.is_none() {
                println!("(pin the node key with --node-key to prove where the bundle came from)");
            }
        } else {
            println!("FAILED: {} problem(s)", report.problems.len());
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
