//! `custos token create|list|revoke`: bearer tokens for people and tools, managed on a
//! running node over HTTP (admin role).

use super::client::{Client, NodeArgs};

pub(crate) async fn create(
    node: &NodeArgs,
    role: &str,
    realms: Vec<String>,
    ttl: Option<String>,
) -> anyhow::Result<()> {
    // Check locally first so a typo is named before anything is sent.
    custos_http::Role::parse(role).map_err(anyhow::Error::msg)?;
    if let Some(ttl) = &ttl {
        custos_http::auth::parse_ttl(ttl).map_err(anyhow::Error::msg)?;
    }
    let client = Client::from_args(node)?;
    let answer = client
        .post_json(
            "/v1/tokens",
            &serde_json::json!({ "role": role, "realms": realms, "ttl": ttl }),
        )
        .await?;
    let scope = if realms.is_empty() {
        "all realms".to_owned()
    } else {
        format!("realms {}", realms.join(", "))
    };
    eprintln!(
        "token {} created: role {role}, {scope}, expires {} (shown once; only its hash is stored)",
        answer["id"].as_str().unwrap_or("?"),
        answer["expires_at"].as_str().unwrap_or("never"),
    );
    println!("{}", answer["token"].as_str().unwrap_or_default());
    Ok(())
}

pub(crate) async fn list(node: &NodeArgs, json: bool) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    let answer = client.get("/v1/tokens").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer["tokens"])?);
        return Ok(());
    }
    println!("{:<14} {:<11} {:<24} {:<22} STATUS", "ID", "ROLE", "REALMS", "EXPIRES");
    for token in answer["tokens"].as_array().into_iter().flatten() {
        let realms: Vec<&str> = token["realms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|realm| realm.as_str())
            .collect();
        let expired = token["expires_at"]
            .as_str()
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
            .is_some_and(|at| at < chrono::Utc::now());
        let status = if token["revoked"] == true {
            "revoked"
        } else if expired {
            "expired"
        } else {
            "active"
        };
        println!(
            "{:<14} {:<11} {:<24} {:<22} {status}",
            token["id"].as_str().unwrap_or("?"),
            token["role"].as_str().unwrap_or("?"),
            if realms.is_empty() {
                "*".to_owned()
            } else {
                realms.join(",")
            },
            token["expires_at"].as_str().unwrap_or("never"),
        );
    }
    Ok(())
}

pub(crate) async fn revoke(node: &NodeArgs, id: &str) -> anyhow::Result<()> {
    let client = Client::from_args(node)?;
    client
        .post_json(&format!("/v1/tokens/{id}/revoke"), &serde_json::json!({}))
        .await?;
    println!("token {id} revoked");
    Ok(())
}
