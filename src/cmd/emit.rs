//! `custos emit`: sign payload lines with an agent key and send them.
//!
//! The chain state (`next_seq`, `prev`) lives in `<key>.chain.json`. It is saved before
//! anything is sent, and signed envelopes that were not acknowledged are kept in
//! `<key>.pending.ndjson` and sent first next time, so a failed send never forks the chain.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use custos_event::{ChainState, Signer};

use super::client::Client;

#[derive(Args)]
#[command(after_help = "\
Each stdin line is a JSON object with at least `kind`; `agent`, `seq` and `prev` are
filled in, and `ts` (now) and `realm` (--realm) when missing.

Example:
  echo '{\"kind\":\"tool_call\",\"action\":\"http.get\",\"target\":\"https://example.com\"}' \\
    | custos emit --key agent.key --realm eng")]
pub(crate) struct EmitArgs {
    /// The agent's key file (from `custos agent keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The node's URL.
    #[arg(long, default_value = "http://127.0.0.1:7600", env = "CUSTOS_URL")]
    url: String,
    /// Realm for lines that do not name one.
    #[arg(long, default_value = "")]
    realm: String,
    /// Envelopes per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Print every result as JSON.
    #[arg(long)]
    json: bool,
}

fn sidecar(key: &Path, suffix: &str) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

pub(crate) async fn run(args: EmitArgs) -> anyhow::Result<ExitCode> {
    let key = custos_store::keyfile::read_key(&args.key)?;
    let chain_path = sidecar(&args.key, ".chain.json");
    let pending_path = sidecar(&args.key, ".pending.ndjson");
    let chain: ChainState = match fs_err::read_to_string(&chain_path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("`{}` is not chain state", chain_path.display()))?
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => ChainState::default(),
        Err(error) => return Err(error.into()),
    };
    let mut signer = Signer::resume(key, args.realm.clone(), chain);
    let mut lines: Vec<String> = fs_err::read_to_string(&pending_path)
        .map(|text| text.lines().map(str::to_owned).collect())
        .unwrap_or_default();
    let resent = lines.len();
    let stdin = std::io::stdin();
    for (number, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&line).with_context(|| format!("stdin line {} is not a JSON object", number + 1))?;
        let envelope = signer
            .sign_object(object, chrono::Utc::now())
            .map_err(|error| anyhow::anyhow!("stdin line {}: {error}", number + 1))?;
        lines.push(envelope.to_json());
    }
    // Durable before sending: chain state first, then everything not yet acknowledged.
    write_atomic(&chain_path, serde_json::to_string(signer.chain())?.as_bytes())?;
    write_atomic(&pending_path, lines.join("\n").as_bytes())?;
    if resent > 0 {
        eprintln!("resending {resent} envelopes left over from an earlier run");
    }
    let client = Client::new(&args.url, None);
    let (mut accepted, mut duplicate, mut rejected) = (0usize, 0usize, 0usize);
    let mut sent = 0;
    for chunk in lines.chunks(args.batch.max(1)) {
        let body = chunk.join("\n").into_bytes();
        let results = client.send_events(body).await?;
        for result in &results {
            match result.status.as_str() {
                "accepted" => accepted += 1,
                "duplicate" => duplicate += 1,
                _ => {
                    rejected += 1;
                    if !args.json {
                        eprintln!(
                            "line {}: rejected {}: {}",
                            sent + result.index + 1,
                            result.reason.as_deref().unwrap_or("?"),
                            result.message.as_deref().unwrap_or("")
                        );
                    }
                }
            }
            if args.json {
                println!("{}", serde_json::to_string(result)?);
            }
        }
        sent += chunk.len();
        // Everything up to here has an answer; only the rest stays pending.
        write_atomic(&pending_path, lines[sent..].join("\n").as_bytes())?;
    }
    fs_err::remove_file(&pending_path).ok();
    eprintln!("{accepted} accepted, {duplicate} duplicate, {rejected} rejected");
    if rejected > 0 {
        bail!("{rejected} envelopes were rejected; see `custos rejected list`");
    }
    Ok(ExitCode::SUCCESS)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = sidecar(path, ".tmp");
    fs_err::write(&temporary, bytes)?;
    fs_err::File::open(&temporary)?.sync_all()?;
    fs_err::rename(&temporary, path)?;
    Ok(())
}
