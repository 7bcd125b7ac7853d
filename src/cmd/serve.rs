//! `custos serve`.

pub(crate) async fn run(config: custos_ingest::NodeConfig) -> anyhow::Result<()> {
    let data = config.data.clone();
    let running = custos_ingest::start(config).await?;
    if let Some(token) = &running.admin_token {
        // Printed once, on the terminal only; it is stored hashed.
        eprintln!(
            "\nAdmin token (shown once; also saved owner-only in {}):\n\n  {}\n",
            custos_ingest::auth::admin_token_path(&data).display(),
            token.0
        );
    }
    eprintln!("custos serving on http://{} (data {})", running.addr, data.display());
    wait_for_signal().await;
    eprintln!("stopping: draining requests, sealing the open segment, signing a final checkpoint");
    running.shutdown().await?;
    eprintln!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
