//! `custos agent …` and `custos rejected list`.

use std::path::Path;

use anyhow::Context as _;

use super::client::{Client, NodeArgs};

pub(crate) fn keygen(out: &Path) -> anyhow::Result<()> {
    let key = custos_event::AgentKey::generate()?;
    custos_store::keyfile::write_key(out, &key)?;
    eprintln!("wrote {} (mode 0600)", out.display());
    println!("{}", key.did());
    Ok(())
}

pub(crate) async fn enroll(
    node: &NodeArgs,
    did: &str,
    realm: &str,
    labels: Vec<(String, String)>,
    source: Option<String>,
    public_key: Option<String>,
) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let labels: serde_json::Map<String, serde_json::Value> =
        labels.into_iter().map(|(key, value)| (key, value.into())).collect();
    let mut body = serde_json::json!({ "did": did, "realm": realm, "labels": labels });
    if let Some(source) = source {
        body["source"] = source.into();
    }
    if let Some(key) = public_key {
        body["public_key"] = key.into();
    }
    let record = client.post_json("/v1/agents", &body).await?;
    match record["source"].as_str() {
        Some(source) => println!(
            "enrolled {source} agent {did} in realm {realm}: its events are signed by {} (attested by {})",
            record["custos_did"].as_str().unwrap_or("?"),
            record["attested_by"].as_str().unwrap_or("?")
        ),
        None => println!(
            "enrolled {did} in realm {realm} (log index {})",
            record["enroll_log_index"]
        ),
    }
    Ok(())
}

pub(crate) async fn revoke(node: &NodeArgs, did: &str, reason: Option<String>) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let path = format!("/v1/agents/{did}/revoke");
    let answer = client
        .post_json(&path, &serde_json::json!({ "reason": reason }))
        .await?;
    let revoked = answer["revoked"].as_array().cloned().unwrap_or_default();
    for (position, agent) in revoked.iter().enumerate() {
        let how = if position == 0 { "revoked" } else { "revoked (cascade)" };
        println!(
            "{how} {} at log index {}",
            agent.as_str().unwrap_or("?"),
            answer["log_indexes"][position]
        );
    }
    Ok(())
}

pub(crate) async fn list(node: &NodeArgs, json: bool) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let answer = client.get("/v1/agents").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer["agents"])?);
        return Ok(());
    }
    let agents = answer["agents"]
        .as_array()
        .context("the node's answer has no `agents`")?;
    println!("{:<58} {:<12} {:<8} {:>8}  parent", "DID", "REALM", "STATUS", "EVENTS");
    for agent in agents {
        println!(
            "{:<58} {:<12} {:<8} {:>8}  {}",
            agent["did"].as_str().unwrap_or("?"),
            agent["realm"].as_str().unwrap_or("?"),
            agent["status"].as_str().unwrap_or("?"),
            agent["events"],
            agent["parent"].as_str().unwrap_or("-"),
        );
    }
    println!("{} agents", agents.len());
    Ok(())
}

pub(crate) async fn rejected(node: &NodeArgs, reason: Option<String>, limit: usize, json: bool) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let mut path = format!("/v1/rejected?limit={limit}");
    if let Some(reason) = &reason {
        path.push_str(&format!("&reason={reason}"));
    }
    let answer = client.get(&path).await?;
    let records = answer["rejected"].as_array().cloned().unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    for record in &records {
        println!(
            "#{:<6} {} {:<20} from {:<21} {}",
            record["id"],
            record["received_at"].as_str().unwrap_or("?"),
            record["reason"].as_str().unwrap_or("?"),
            record["remote"].as_str().unwrap_or("?"),
            record["message"].as_str().unwrap_or(""),
        );
    }
    println!("{} rejected inputs shown", records.len());
    Ok(())
}
