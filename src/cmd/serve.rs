//! `custos serve`.

use std::sync::Arc;

use crate::pipeline::{Marks, Pipeline, PipelineConfig};

/// A node with its detector and responder wired in (or without, for `--no-detect`).
pub(crate) struct Node {
    pub(crate) running: custos_ingest::Running,
    pub(crate) pipeline: Option<Pipeline>,
}

impl Node {
    pub(crate) async fn start(
        config: custos_ingest::NodeConfig,
        pipeline: Option<PipelineConfig>,
        marks: Arc<Marks>,
        limits: custos_query::Limits,
    ) -> anyhow::Result<Self> {
        let routes = custos_query::http::routes(limits)?;
        let Some(pipeline_config) = pipeline else {
            let hooks = custos_ingest::Hooks {
                routes: Some(routes),
                ..Default::default()
            };
            return Ok(Self {
                running: custos_ingest::start_with(config, hooks).await?,
                pipeline: None,
            });
        };
        let (pipeline, mut hooks) = Pipeline::start(pipeline_config, marks)?;
        hooks.routes = Some(routes);
        let running = custos_ingest::start_with(config, hooks).await?;
        Ok(Self {
            running,
            pipeline: Some(pipeline),
        })
    }

    /// Stops HTTP, drains the detector and responder, seals and checkpoints.
    pub(crate) async fn shutdown(self) -> anyhow::Result<custos_ingest::Closed> {
        let closed = self.running.shutdown().await?;
        if let Some(pipeline) = self.pipeline {
            tokio::task::spawn_blocking(move || pipeline.join()).await?;
        }
        Ok(closed)
    }
}

pub(crate) async fn run(
    config: custos_ingest::NodeConfig,
    pipeline: Option<PipelineConfig>,
    limits: custos_query::Limits,
) -> anyhow::Result<()> {
    let data = config.data.clone();
    let node = Node::start(config, pipeline, Arc::new(Marks::default()), limits).await?;
    let running = &node.running;
    if let Some(token) = &running.admin_token {
        // Printed once, on the terminal only; it is stored hashed.
        eprintln!(
            "\nAdmin token (shown once; also saved owner-only in {}):\n\n  {}\n",
            custos_ingest::auth::admin_token_path(&data).display(),
            token.0
        );
    }
    eprintln!(
        "node key {} (signs control entries and the revocation list)",
        running.node_did
    );
    if let Some(pipeline) = &node.pipeline {
        eprintln!(
            "detector key {} (signs findings); responder key {} (signs actions)",
            pipeline.detector_did, pipeline.responder_did
        );
    }
    eprintln!("custos serving on http://{} (data {})", running.addr, data.display());
    wait_for_signal().await;
    eprintln!("stopping: draining requests, sealing the open segment, signing a final checkpoint");
    let closed = node.shutdown().await?;
    match closed.unsealed {
        None => eprintln!("stopped cleanly ({} entries, all sealed)", closed.entries),
        Some(unsealed) => {
            // Nothing acknowledged is lost: the entries are in the WAL, fsynced, and the
            // next start seals them. So this still exits 0, saying exactly what is left.
            eprintln!(
                "stopped; could not seal log indexes {}..{} ({} entries): {}",
                unsealed.from,
                unsealed.to,
                unsealed.to - unsealed.from,
                unsealed.error
            );
            eprintln!("they are durable in these WAL files, and the next start seals them:");
            for file in &unsealed.wal_files {
                eprintln!("  {}", file.display());
            }
        }
    }
    Ok(())
}

pub(crate) async fn wait_for_signal() {
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
