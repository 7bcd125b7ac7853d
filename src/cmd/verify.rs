//! `custos verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use custos_store::verify::{Report, VerifyOptions, verify_store};

#[derive(Args, Clone)]
#[command(after_help = "\
Exits 0 when everything checks out, 1 on any mismatch (each printed with its file, row
and log index), 2 when the store cannot be read at all.

Examples:
  custos verify ./store
  custos verify ./store --signatures --log-key 'custos/…/0+1a2b3c4d+AR…'
  custos verify ./writers --signatures    (a partition set: every partition's log, then
                                           the cross-partition checkpoints)")]
pub(crate) struct VerifyArgs {
    /// The data directory of a store (or of a partition set), or a copy of one in object
    /// storage (`s3://bucket/prefix`, `file:///dir`, as `serve --object-store` wrote it),
    /// which is downloaded to a temporary directory first.
    pub(crate) data: PathBuf,
    /// Also verify every ed25519 signature (batched across all cores).
    #[arg(long)]
    pub(crate) signatures: bool,
    /// The checkpoint verifier key you trust, instead of the one published in the store
    /// (a single store; each partition of a set has its own).
    #[arg(long)]
    pub(crate) log_key: Option<String>,
    /// For a partition set (a writer's DATA with --log-per-partition): the verifier key
    /// of its cross-partition checkpoints you trust, instead of DATA/partitions.pub.
    #[arg(long)]
    pub(crate) partitions_key: Option<String>,
    /// A witness's verifier key (`custos witness` prints it): the store must hold at least
    /// what that witness cosigned, with the same root. The cosigned checkpoint comes from
    /// --witness-url (the witness itself), --witness-checkpoint (a saved note), or else
    /// from the largest one the node kept (`logs/0/cosignatures.ndjson`).
    #[arg(long)]
    pub(crate) witness: Option<String>,
    /// Fetch the witness's latest cosigned checkpoint of this log from this URL.
    #[arg(long, requires = "witness", conflicts_with = "witness_checkpoint")]
    pub(crate) witness_url: Option<String>,
    /// A checkpoint cosigned by the witness, saved earlier (offline audits).
    #[arg(long, requires = "witness")]
    pub(crate) witness_checkpoint: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

pub(crate) fn run(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let witnessed = match witnessed(args) {
        Ok(witnessed) => witnessed,
        Err(error) => {
            eprintln!("error: {error:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let options = VerifyOptions {
        signatures: args.signatures,
        log_key: args.log_key.clone(),
        partitions_key: args.partitions_key.clone(),
        witnessed,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let report = match verify_with_progress(args, &options) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: cannot verify `{}`: {error}", args.data.display());
            return Ok(ExitCode::from(2));
        }
    };
    let elapsed = started.elapsed();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, elapsed);
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) fn verify_with_progress(args: &VerifyArgs, options: &VerifyOptions) -> anyhow::Result<Report> {
    let text = args.data.to_string_lossy();
    if text.starts_with("s3://") || text.starts_with("file://") {
        let copy = tempfile::tempdir()?;
        // A thread of its own: the object store client runs its own runtime.
        let download = || -> anyhow::Result<usize> {
            let archive = custos_store::archive::Archive::open(&text)?;
            Ok(archive.download(copy.path())?)
        };
        let files = std::thread::scope(|scope| scope.spawn(download).join())
            .map_err(|_| anyhow::anyhow!("downloading `{text}` failed"))??;
        if !args.quiet && !args.json {
            eprintln!("downloaded {files} objects from {text}");
        }
        anyhow::ensure!(files > 0, "`{text}` holds no objects: nothing to verify");
        let local = VerifyArgs {
            data: copy.path().to_owned(),
            ..args.clone()
        };
        return verify_with_progress(&local, options);
    }
    let bar = if args.quiet || args.json {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let report = verify_store(&args.data, options, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    Ok(report)
}

pub(crate) fn print_report(report: &Report, elapsed: std::time::Duration) {
    for log in &report.logs {
        let rate = log.entries as f64 / elapsed.as_secs_f64().max(1e-9);
        println!(
            "log {}: {} entries ({} segments, {} in the WAL), {} checkpoints, root {}, {} signatures checked, {:.0} entries/s",
            log.log_id,
            log.entries,
            log.segments,
            log.wal_entries,
            log.checkpoints,
            log.root,
            log.signatures_checked,
            rate
        );
        println!("  checkpoint key: {}", log.verifier_key);
    }
    if let Some(set) = &report.partitions {
        println!(
            "partition set {}: {} partitions, {} cross-partition checkpoints checked",
            set.set_id, set.partitions, set.checkpoints
        );
        println!("  cross-partition checkpoint key: {}", set.verifier_key);
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for problem in &report.problems {
        println!("PROBLEM {problem}");
    }
    if report.ok() {
        println!("OK: every leaf, digest, chain, root and checkpoint checks out");
    } else {
        println!("FAILED: {} problems", report.problems.len());
    }
}

/// The witness's key and its cosigned checkpoint of this store's log, from the witness
/// itself or from a saved file.
fn witnessed(args: &VerifyArgs) -> anyhow::Result<Vec<(custos_store::witness::CosignerKey, String)>> {
    use anyhow::Context as _;
    let Some(key) = &args.witness else {
        return Ok(Vec::new());
    };
    let key = custos_store::witness::CosignerKey::parse(key)?;
    let note = match (&args.witness_url, &args.witness_checkpoint) {
        (_, Some(path)) => fs_err::read_to_string(path)?,
        (Some(url), None) => {
            let info = custos_store::StoreInfo::open(&args.data, false)?;
            let origin = format!("custos/{}/{}", info.store_id, custos_store::DEFAULT_LOG_ID);
            // A thread of its own: the blocking client may not run on the async runtime.
            let fetch = || -> anyhow::Result<(reqwest::StatusCode, String)> {
                let response = reqwest::blocking::Client::builder()
                    .timeout(std::time::Duration::from_secs(30))
                    .build()?
                    .get(format!("{}/checkpoints/latest", url.trim_end_matches('/')))
                    .query(&[("origin", &origin)])
                    .send()
                    .with_context(|| format!("asking the witness at `{url}`"))?;
                let status = response.status();
                Ok((status, response.text()?))
            };
            let (status, text) = std::thread::scope(|scope| scope.spawn(fetch).join())
                .map_err(|_| anyhow::anyhow!("the request to the witness failed"))??;
            anyhow::ensure!(
                status.is_success(),
                "the witness at `{url}` answered {status} for `{origin}`: {}",
                text.trim()
            );
            text
        }
        (None, None) => {
            // The largest checkpoint this witness cosigned, as the node kept it.
            let path = args
                .data
                .join("logs")
                .join(custos_store::DEFAULT_LOG_ID)
                .join("cosignatures.ndjson");
            let text = fs_err::read_to_string(&path).unwrap_or_default();
            let kept = text
                .lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .filter(|record| record["witness"] == key.name.as_str())
                .filter_map(|record| Some((record["size"].as_u64()?, record["note"].as_str()?.to_owned())))
                .max_by_key(|(size, _)| *size);
            match kept {
                Some((_, note)) => note,
                None => anyhow::bail!(
                    "`{}` holds no checkpoint cosigned by witness `{}`; give --witness-url or --witness-checkpoint",
                    path.display(),
                    key.name
                ),
            }
        }
    };
    Ok(vec![(key, note)])
}
