//! `custos finding ...` and `custos action ...`: findings, response actions and approvals
//! on a running node.

use anyhow::Context as _;

use super::client::{Client, NodeArgs};

pub(crate) async fn findings(node: &NodeArgs, limit: usize, json: bool) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let answer = client.get(&format!("/v1/findings?limit={limit}")).await?;
    let findings = answer["findings"]
        .as_array()
        .context("the node's answer has no `findings`")?;
    if json {
        println!("{}", serde_json::to_string_pretty(findings)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<20} {:>5} {:<9} {:>7}  agent / title",
        "ID", "TYPE", "SCORE", "SEVERITY", "LOG"
    );
    for finding in findings {
        println!(
            "{:<20} {:<20} {:>5} {:<9} {:>7}  {} / {}",
            finding["id"].as_str().unwrap_or("?"),
            finding["type"].as_str().unwrap_or("?"),
            finding["score"],
            finding["severity"].as_str().unwrap_or("?"),
            finding["log_index"],
            finding["agent"].as_str().unwrap_or("?"),
            finding["title"].as_str().unwrap_or(""),
        );
        for contribution in finding["explanation"].as_array().into_iter().flatten().take(3) {
            println!(
                "{:<20}   {} = {} (expected {}, deviation {:.1})",
                "",
                contribution["feature"].as_str().unwrap_or("?"),
                contribution["observed"],
                contribution["expected"],
                contribution["deviation"].as_f64().unwrap_or_default(),
            );
        }
    }
    println!("{} findings shown", findings.len());
    Ok(())
}

pub(crate) async fn actions(node: &NodeArgs, limit: usize, json: bool) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let answer = client.get(&format!("/v1/actions?limit={limit}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let pending = answer["pending"].as_array().cloned().unwrap_or_default();
    if !pending.is_empty() {
        println!("Waiting for approval:");
        for approval in &pending {
            let remaining: Vec<String> = approval["remaining"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|spec| spec.as_object()?.keys().next().cloned())
                .collect();
            println!(
                "  {}  playbook {}  agent {}  then: {}  expires {}",
                approval["id"].as_str().unwrap_or("?"),
                approval["playbook"].as_str().unwrap_or("?"),
                approval["finding"]["agent"].as_str().unwrap_or("?"),
                if approval["undo_of"].is_string() {
                    format!("undo {}", approval["undo_of"].as_str().unwrap_or("?"))
                } else {
                    remaining.join(", ")
                },
                approval["expires_at"].as_str().unwrap_or("?"),
            );
        }
        println!("  (custos action approve ID / custos action deny ID)\n");
    }
    let playbooks = client.get("/v1/playbooks").await?;
    let paused: Vec<String> = playbooks["playbooks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|playbook| {
            let name = playbook["name"].as_str().unwrap_or("?").to_owned();
            playbook["paused_realms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |realm| format!("  {name} in realm {}", realm.as_str().unwrap_or("?")))
        })
        .collect();
    if !paused.is_empty() {
        println!("Paused by a cap (their matches are escalated, not acted on):");
        for line in &paused {
            println!("{line}");
        }
        println!("  (custos action resume PLAYBOOK --realm REALM)\n");
    }
    let actions = answer["actions"].as_array().cloned().unwrap_or_default();
    println!(
        "{:<16} {:<18} {:<10} {:>7}  target / reason",
        "ID", "ACTION", "STATUS", "LOG"
    );
    for action in &actions {
        println!(
            "{:<16} {:<18} {:<10} {:>7}  {} / {}",
            action["id"].as_str().unwrap_or("?"),
            action["action"].as_str().unwrap_or("?"),
            action["status"].as_str().unwrap_or("?"),
            action["log_index"],
            action["target"].as_str().unwrap_or("?"),
            action["reason"].as_str().unwrap_or(""),
        );
    }
    println!("{} actions shown, {} pending approvals", actions.len(), pending.len());
    Ok(())
}

pub(crate) async fn decide(node: &NodeArgs, id: &str, approve: bool) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let verb = if approve { "approve" } else { "deny" };
    let answer = client
        .post_json(&format!("/v1/approvals/{id}/{verb}"), &serde_json::json!({}))
        .await?;
    println!("{} {id}", answer["decision"].as_str().unwrap_or(verb));
    print_records(&answer["actions"]);
    Ok(())
}

pub(crate) async fn undo(node: &NodeArgs, id: &str) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let answer = client
        .post_json(&format!("/v1/actions/{id}/undo"), &serde_json::json!({}))
        .await?;
    println!("undo of {id} requested; it runs once approved:");
    print_records(&answer["actions"]);
    Ok(())
}

pub(crate) async fn resume(node: &NodeArgs, playbook: &str, realm: &str) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let answer = client
        .post_json(
            &format!("/v1/playbooks/{playbook}/resume"),
            &serde_json::json!({ "realm": realm }),
        )
        .await?;
    println!("playbook {playbook} resumed in realm {realm}:");
    print_records(&answer["actions"]);
    Ok(())
}

fn print_records(records: &serde_json::Value) {
    for record in records.as_array().into_iter().flatten() {
        println!(
            "  {} {} {} `{}` (log index {}){}",
            record["id"].as_str().unwrap_or("?"),
            record["status"].as_str().unwrap_or("?"),
            record["action"].as_str().unwrap_or("?"),
            record["target"].as_str().unwrap_or("?"),
            record["log_index"],
            record["approval_id"]
                .as_str()
                .map(|id| format!(", approval {id}"))
                .unwrap_or_default(),
        );
    }
}
