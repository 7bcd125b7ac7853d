//! One module per subcommand.

pub(crate) mod agent;
pub(crate) mod bench;
pub(crate) mod bench_cluster;
pub(crate) mod bench_detect;
pub(crate) mod bench_evidence;
pub(crate) mod bench_hardening;
pub(crate) mod bench_query;
pub(crate) mod client;
pub(crate) mod demo;
pub(crate) mod emit;
pub(crate) mod evidence;
pub(crate) mod fleet;
pub(crate) mod proof;
pub(crate) mod query_node;
pub(crate) mod respond;
pub(crate) mod serve;
pub(crate) mod sim;
pub(crate) mod token;
pub(crate) mod verify;
pub(crate) mod witness;

/// A new, uniquely named directory path under the system temp dir (not yet created).
pub(crate) fn scratch_dir(prefix: &str) -> anyhow::Result<std::path::PathBuf> {
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(|error| anyhow::anyhow!("random source: {error}"))?;
    Ok(std::env::temp_dir().join(format!("{prefix}-{}", hex::encode(suffix))))
}
