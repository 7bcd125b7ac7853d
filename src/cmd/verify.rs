//! `custos verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use custos_store::verify::{Report, VerifyOptions, verify_store};

#[derive(Args)]
#[command(after_help = "\
Exits 0 when everything checks out, 1 on any mismatch (each printed with its file, row
and log index), 2 when the store cannot be read at all.

Examples:
  custos verify ./store
  custos verify ./store --signatures --log-key 'custos/…/0+1a2b3c4d+AR…'")]
pub(crate) struct VerifyArgs {
    /// The data directory of a store.
    pub(crate) data: PathBuf,
    /// Also verify every ed25519 signature (batched across all cores).
    #[arg(long)]
    pub(crate) signatures: bool,
    /// The checkpoint verifier key you trust, instead of the one published in the store.
    #[arg(long)]
    pub(crate) log_key: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// No progress bar.
    #[arg(long)]
    pub(crate) quiet: bool,
}

pub(crate) fn run(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let options = VerifyOptions {
        signatures: args.signatures,
        log_key: args.log_key.clone(),
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
