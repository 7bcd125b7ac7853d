//! `custos proof inclusion|consistency`: RFC 9162 proofs from a store, checked before printing.

use std::path::Path;

use anyhow::Context as _;
use custos_store::merkle::{verify_consistency, verify_inclusion};
use custos_store::{Log, LogConfig, OpenMode, StoreInfo};

fn open(data: &Path, log_id: &str) -> anyhow::Result<Log> {
    let info = StoreInfo::open(data, false)?;
    Log::open(
        data,
        &info.store_id,
        log_id,
        LogConfig::default(),
        OpenMode::ReadOnly,
        &mut |_| {},
    )
    .with_context(|| format!("opening log `{log_id}` of `{}`", data.display()))
}

fn signed_size(log: &Log) -> u64 {
    log.latest_checkpoint()
        .map_or(log.next_index(), |(checkpoint, _)| checkpoint.size)
}

pub(crate) fn inclusion(data: &Path, log_id: &str, index: u64, size: Option<u64>) -> anyhow::Result<()> {
    let log = open(data, log_id)?;
    let size = size.unwrap_or_else(|| signed_size(&log));
    let proof = log.inclusion_proof(index, size)?;
    let leaf = log.tree().leaf(index).context("no such leaf")?;
    let root = log.tree().root_at(size)?;
    verify_inclusion(&leaf, index, size, &proof, &root)?;
    let output = serde_json::json!({
        "log_id": log_id,
        "origin": log.origin(),
        "leaf_index": index,
        "tree_size": size,
        "leaf_hash": hex::encode(leaf),
        "root_hash": hex::encode(root),
        "inclusion_path": proof.iter().map(hex::encode).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}

pub(crate) fn consistency(data: &Path, log_id: &str, from: u64, to: u64) -> anyhow::Result<()> {
    let log = open(data, log_id)?;
    let proof = log.consistency_proof(from, to)?;
    let (first, second) = (log.tree().root_at(from)?, log.tree().root_at(to)?);
    verify_consistency(from, to, &proof, &first, &second)?;
    let output = serde_json::json!({
        "log_id": log_id,
        "origin": log.origin(),
        "first_size": from,
        "second_size": to,
        "first_root": hex::encode(first),
        "second_root": hex::encode(second),
        "consistency_path": proof.iter().map(hex::encode).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}
