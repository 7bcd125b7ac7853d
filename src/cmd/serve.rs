//! `custos serve`.

use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use custos_stage::kafka::KafkaConfig;

use crate::pipeline::{Marks, Pipeline, PipelineConfig, Transport};

/// The distributed mode of one process (`--kafka`).
#[derive(Clone, Debug)]
pub(crate) struct Cluster {
    pub(crate) kafka: KafkaConfig,
    /// Partitions of the topics this process creates when they are missing; for the
    /// writer of one partition of a set, the set's count as read from the topic.
    pub(crate) partitions: i32,
    /// Whether this process runs the log writer (with ingest and query).
    pub(crate) writer: bool,
    /// Whether this process runs a stateless ingest node (when it is not the writer).
    pub(crate) ingest: bool,
    /// Whether this process runs a stateless query node (when it is not the writer): the
    /// sealed store from `--object-store`, the tail from the committed topic.
    pub(crate) query: bool,
    /// How long an ingest node waits for the writer's answer.
    pub(crate) writer_timeout: std::time::Duration,
    /// One log per partition (`--log-per-partition`): the writer process writes the logs
    /// of the partitions whose store it can lock, under `DATA/partitions/<p>/`.
    pub(crate) log_per_partition: bool,
    /// The one partition a writer node reads and writes (set per node in that mode).
    pub(crate) partition: Option<i32>,
    /// The partitions this writer takes at once (`--prefer-partitions`; all when
    /// empty); others only once no writer has held them for [`TAKEOVER_AFTER`].
    pub(crate) preferred: Vec<i32>,
    /// System keys of stages in other processes: `did:key` → payload type.
    pub(crate) trust: std::collections::BTreeMap<String, String>,
    /// The writer checks the signature of every event an ingest node verified again
    /// (`--verify-submissions`).
    pub(crate) verify_submissions: bool,
    /// A query node's pinned checkpoint verifier keys (`--log-key`): the object store's
    /// segments must be signed by them. One for one log; one per partition, in partition
    /// order, over a partition set.
    pub(crate) log_key: Vec<custos_store::checkpoint::NoteKey>,
}

/// Where the writer records the highest log index it has published to Kafka.
fn published_path(data: &std::path::Path) -> std::path::PathBuf {
    data.join("kafka.published")
}

/// The writer's threads between its in-process transport and the topics.
pub(crate) struct Bridges {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Bridges {
    fn start(
        kafka: &KafkaConfig,
        partition: Option<i32>,
        partitions: i32,
        verify_submissions: bool,
        data: &std::path::Path,
        hooks: &mut custos_ingest::Hooks,
    ) -> anyhow::Result<Self> {
        let fanout = hooks
            .publish
            .get_or_insert_with(custos_stage::embedded::Fanout::new)
            .clone();
        let queue = hooks.queue.get_or_insert_with(custos_ingest::Queue::new);
        let published = std::fs::read_to_string(published_path(data))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok());
        let from = published.map_or(0, |index| index + 1);
        // Stages read Kafka, not this process's replay: only what was never published
        // needs replaying to the bridge (findings and actions always come, and are skipped
        // below `from`).
        hooks.replay_from = from;
        // Query nodes rebuild the unsealed tail's rows from the committed topic.
        hooks.publish_entries = true;
        let committed = fanout.subscribe_bounded(16_384, custos_stage::embedded::everything);
        let mut publisher =
            custos_stage::kafka::KafkaPublisher::new(kafka, partition).context("connecting to Kafka")?;
        let intake = match partition {
            Some(partition) => custos_stage::kafka::KafkaIntake::for_partition(kafka, partition)
                .with_context(|| format!("reading partition {partition} of the submissions topic"))?,
            None => custos_stage::kafka::KafkaIntake::new(kafka).context("joining the writer group on Kafka")?,
        };
        // Adapter requests ingest nodes pass on are served by this node's adapters (they
        // hold the keys and chains); over a partition set, only those of this partition's
        // realms (the others are answered with their partition).
        let mut intake = custos_ingest::AdapterIntake {
            inner: intake,
            desk: hooks
                .adapters
                .get_or_insert_with(custos_ingest::AdapterDesk::default)
                .clone(),
            set: partition.map(|partition| custos_ingest::SetPlace {
                partition: partition.unsigned_abs(),
                partitions: partitions.unsigned_abs(),
            }),
        };
        let into_writer: Box<dyn custos_stage::Submitter> = match verify_submissions {
            true => Box::new(custos_ingest::Reverified::new(queue.submitter())),
            false => Box::new(queue.submitter()),
        };
        let mut control_feed = fanout.subscribe(|record| matches!(record, custos_stage::Committed::Control { .. }));
        let control = Arc::new(custos_stage::kafka::ControlPublisher::new(kafka).context("connecting to Kafka")?);
        // The node's LastID enrollments, which place their agents' records over a set,
        // and how far the node's control records are on the brokers.
        let (notes, noted) = std::sync::mpsc::channel();
        let (reach, published) = tokio::sync::watch::channel(custos_ingest::registry::Published {
            entries: from,
            notes: 0,
        });
        let reach = Arc::new(reach);
        let control_out = reach.subscribe();
        hooks.control = Some(custos_ingest::registry::ControlLink { notes, published });
        let stop = Arc::new(AtomicBool::new(false));
        let path = published_path(data);
        let flag = stop.clone();
        let out = std::thread::Builder::new()
            .name("custos-publish".into())
            .spawn(move || {
                // The control records among those published, until the control topic
                // has them too: a restart resumes (replays) from the first of them, so
                // recording past it would lose it from the control topic.
                let pending = Arc::new(Mutex::new(std::collections::VecDeque::new()));
                let mut committed = NotingControl {
                    inner: committed,
                    pending: pending.clone(),
                };
                let mut record = |index: u64| {
                    let published = control_out.borrow().entries;
                    let pending = &mut *pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let Some(index) = recordable(index, pending, published) else {
                        return;
                    };
                    // Not fsynced: losing it only republishes a little, which readers dedupe.
                    if let Err(error) = std::fs::write(&path, index.to_string()) {
                        tracing::warn!(%error, "could not record the published log index");
                    }
                };
                if let Err(error) =
                    custos_stage::forward_committed(&mut committed, &mut publisher, from, &mut record, &flag)
                {
                    tracing::error!(%error, "publishing committed records to Kafka stopped");
                }
            })?;
        let flag = stop.clone();
        let inward = std::thread::Builder::new()
            .name("custos-intake".into())
            .spawn(move || {
                if let Err(error) = custos_stage::forward_submissions(&mut intake, &*into_writer, 256, &flag) {
                    tracing::error!(%error, "taking submissions from Kafka stopped");
                }
            })?;
        let flag = stop.clone();
        let publisher = control.clone();
        let reached = reach.clone();
        let states = std::thread::Builder::new()
            .name("custos-control".into())
            .spawn(move || {
                publish_control(&mut control_feed, &publisher, from, &reached, &flag);
            })?;
        let flag = stop.clone();
        let notices = std::thread::Builder::new()
            .name("custos-notes".into())
            .spawn(move || publish_notes(&noted, &control, &reach, &flag))?;
        Ok(Self {
            stop,
            threads: vec![out, inward, states, notices],
        })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// The writer's committed records on their way to Kafka, noting the log index of each
/// control record among them (see [`recordable`]).
struct NotingControl {
    inner: custos_stage::embedded::ChannelSubscription,
    pending: Arc<Mutex<std::collections::VecDeque<u64>>>,
}

impl custos_stage::Subscription for NotingControl {
    fn recv(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<custos_stage::Committed>, custos_stage::StageError> {
        let record = self.inner.recv(timeout)?;
        if let Some(custos_stage::Committed::Control { log_index, .. }) = &record {
            self.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_back(*log_index);
        }
        Ok(record)
    }
}

/// The log index the committed-record publisher may record as published (a restart
/// replays after it, to both publishers): `index`, unless a control record at or below
/// it is not on the control topic yet; then just below the first such one (`None`:
/// nothing). `pending` holds the control records forwarded so far, oldest first, and
/// loses those below `published` (the control topic has every control record below it).
fn recordable(index: u64, pending: &mut std::collections::VecDeque<u64>, published: u64) -> Option<u64> {
    while pending.front().is_some_and(|&control| control < published) {
        pending.pop_front();
    }
    match pending.front() {
        Some(&first) if first <= index => first.checked_sub(1),
        _ => Some(index),
    }
}

/// Keeps the compacted control topic up to date: each control entry becomes the latest
/// record of its subject (`agent:<did>`, `memory:<id>`, `credential:<value>`). `reach`
/// follows the entries whose records are on the brokers (answers wait on it).
fn publish_control(
    feed: &mut custos_stage::embedded::ChannelSubscription,
    control: &custos_stage::kafka::ControlPublisher,
    from: u64,
    reach: &tokio::sync::watch::Sender<custos_ingest::registry::Published>,
    stop: &AtomicBool,
) {
    use custos_stage::Subscription as _;
    while !stop.load(Ordering::Relaxed) {
        let first = match feed.recv(std::time::Duration::from_millis(100)) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(_) => return,
        };
        // What else is waiting goes with it (a burst of enrollments, a revocation's
        // cascade), then one flush: each answer waits for its record.
        let mut burst = vec![first];
        while burst.len() < 1024 {
            match feed.recv(std::time::Duration::ZERO) {
                Ok(Some(record)) => burst.push(record),
                _ => break,
            }
        }
        let mut last = None;
        for record in burst {
            let custos_stage::Committed::Control { log_index, payload, .. } = record else {
                continue;
            };
            if log_index < from {
                continue;
            }
            last = Some(log_index);
            let Some((key, value)) = custos_ingest::registry::control_record(&payload, log_index) else {
                continue;
            };
            let sent = serde_json::to_vec(&value)
                .map_err(|error| error.to_string())
                .and_then(|bytes| control.publish(&key, &bytes).map_err(|error| error.to_string()));
            if let Err(error) = sent {
                tracing::error!(key, error, "could not publish a control record");
            }
        }
        let Some(last) = last else {
            continue;
        };
        if !flushed(control, stop) {
            return;
        }
        reach.send_modify(|published| published.entries = published.entries.max(last + 1));
    }
}

/// Waits until the control records queued so far reached the brokers; `false` when the
/// process stops first.
fn flushed(control: &custos_stage::kafka::ControlPublisher, stop: &AtomicBool) -> bool {
    while let Err(error) = control.flush() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        tracing::warn!(%error, "publishing control records: waiting for the brokers");
    }
    true
}

/// Publishes the records the node adds to the control topic beside its control entries
/// (its LastID enrollments, `custos_ingest::registry::lastid_record`), as they come.
fn publish_notes(
    notes: &std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    control: &custos_stage::kafka::ControlPublisher,
    reach: &tokio::sync::watch::Sender<custos_ingest::registry::Published>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let first = match notes.recv_timeout(std::time::Duration::from_millis(100)) {
            Ok(note) => note,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        // What else is waiting goes with it (at most 1024 at a time, well within the
        // producer's queue), then one flush: at start every enrollment comes at once.
        let mut count = 0;
        for (key, value) in std::iter::once(first).chain(notes.try_iter().take(1023)) {
            if let Err(error) = control.publish(&key, &value) {
                tracing::error!(key, %error, "could not publish a control record");
            }
            count += 1;
        }
        if !flushed(control, stop) {
            return;
        }
        reach.send_modify(|published| published.notes += count);
    }
}

/// A node with its detector and responder wired in (or without, for `--no-detect`).
pub(crate) struct Node {
    pub(crate) running: custos_ingest::Running,
    pub(crate) pipeline: Option<Pipeline>,
    bridges: Option<Bridges>,
}

impl Node {
    pub(crate) async fn start(
        config: custos_ingest::NodeConfig,
        pipeline: Option<PipelineConfig>,
        marks: Arc<Marks>,
        limits: custos_query::Limits,
    ) -> anyhow::Result<Self> {
        Self::start_in(config, pipeline, marks, limits, None).await
    }

    /// [`Node::start`], in the distributed mode when `cluster` is given: the stages
    /// (when this process runs them) read and write Kafka topics, and the writer is
    /// bridged to them.
    pub(crate) async fn start_in(
        config: custos_ingest::NodeConfig,
        pipeline: Option<PipelineConfig>,
        marks: Arc<Marks>,
        limits: custos_query::Limits,
        cluster: Option<&Cluster>,
    ) -> anyhow::Result<Self> {
        let routes = crate::reader::query_routes(limits)?;
        let (pipeline, mut hooks) = match pipeline {
            Some(pipeline_config) => {
                let (pipeline, hooks) = Pipeline::start(pipeline_config, marks)?;
                (Some(pipeline), hooks)
            }
            None => (None, custos_ingest::Hooks::default()),
        };
        hooks.routes = Some(routes);
        let bridges = match cluster {
            Some(cluster) => {
                hooks.system_signers.extend(cluster.trust.clone());
                Some(Bridges::start(
                    &cluster.kafka,
                    cluster.partition,
                    cluster.partitions,
                    cluster.verify_submissions,
                    &config.data,
                    &mut hooks,
                )?)
            }
            None => None,
        };
        let running = match custos_ingest::start_with(config, hooks).await {
            Ok(running) => running,
            Err(error) => {
                if let Some(bridges) = bridges {
                    tokio::task::spawn_blocking(move || bridges.stop()).await?;
                }
                return Err(error.into());
            }
        };
        Ok(Self {
            running,
            pipeline,
            bridges,
        })
    }

    /// Stops HTTP, drains the detector and responder, seals and checkpoints.
    pub(crate) async fn shutdown(self) -> anyhow::Result<custos_ingest::Closed> {
        let closed = self.running.shutdown().await?;
        if let Some(pipeline) = self.pipeline {
            tokio::task::spawn_blocking(move || pipeline.join()).await?;
        }
        if let Some(bridges) = self.bridges {
            tokio::task::spawn_blocking(move || bridges.stop()).await?;
        }
        Ok(closed)
    }
}

/// Copies the sealed part of a store (or partition set) to object storage every few
/// seconds, and once more when stopped (`--object-store`).
pub(crate) struct Archiver {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// The partitions of a set a writer process holds, shared with its archiver.
type Held = Arc<std::sync::Mutex<std::collections::BTreeSet<u32>>>;

impl Archiver {
    /// Opens `url` at once (a bad URL stops the start) and starts copying `data`: of a
    /// partition set, with `held`, only the partitions this process writes
    /// (`Archive::sync_held`).
    pub(crate) fn start(url: &str, data: std::path::PathBuf, held: Option<Held>) -> anyhow::Result<Self> {
        let mut archive =
            custos_store::archive::Archive::open(url).with_context(|| format!("opening the object store `{url}`"))?;
        eprintln!("copying the sealed store to {url}");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("custos-archive".into())
            .spawn(move || {
                let sync = |archive: &mut custos_store::archive::Archive| {
                    let held = held
                        .as_ref()
                        .map(|held| held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone());
                    match archive.sync_held(&data, held.as_ref()) {
                        Ok(0) => {}
                        Ok(files) => tracing::debug!(files, "copied to the object store"),
                        Err(error) => tracing::warn!(%error, "copying to the object store failed; trying again"),
                    }
                };
                while !flag.load(Ordering::Relaxed) {
                    sync(&mut archive);
                    for _ in 0..20 {
                        if flag.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
                sync(&mut archive);
            })?;
        Ok(Self { stop, thread })
    }

    /// Copies what the stop sealed, then ends.
    pub(crate) async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

pub(crate) async fn run(
    config: custos_ingest::NodeConfig,
    mut pipeline: Option<PipelineConfig>,
    limits: custos_query::Limits,
    cluster: Option<Cluster>,
    archive: Option<String>,
    lastid_secret: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let data = config.data.clone();
    if let (Some(pipeline), Some(settings)) = (&mut pipeline, &config.vaultysclaw)
        && let (Some(url), Some(token_file)) = (&settings.url, &settings.token_file)
    {
        let token = custos_http::auth::read_secret_file(token_file)
            .map_err(|error| anyhow::anyhow!("--vaultysclaw-token-file `{}`: {error}", token_file.display()))?;
        pipeline.platforms.vaultysclaw = Some(custos_respond::platform::VaultysClawTarget {
            base_url: url.clone(),
            token: token.0,
            names: data.join("attest").join("vaultysclaw").join("vaultysclaw"),
            timeout: std::time::Duration::from_secs(5),
        });
    }
    if let Some(pipeline) = &mut pipeline
        && let Some(target) = &mut pipeline.platforms.lastid
        && let Some(path) = &lastid_secret
    {
        let secret = custos_http::auth::read_secret_file(path)
            .map_err(|error| anyhow::anyhow!("--lastid-webhook-secret-file `{}`: {error}", path.display()))?;
        target.secret = secret.0.into_bytes();
    }
    if let Some(cluster) = &cluster {
        let kafka = cluster.kafka.clone();
        let partitions = cluster.partitions;
        tokio::task::spawn_blocking(move || custos_stage::kafka::create_topics(&kafka, partitions))
            .await?
            .with_context(|| format!("creating the topics on {}", cluster.kafka.brokers))?;
        if let Some(pipeline) = &mut pipeline {
            pipeline.transport = Transport::Kafka(cluster.kafka.clone());
            if cluster.log_per_partition {
                let kafka = cluster.kafka.clone();
                let partitions =
                    tokio::task::spawn_blocking(move || custos_stage::kafka::submission_partitions(&kafka))
                        .await?
                        .context("reading the submissions topic's partitions")?;
                pipeline.chain_lanes = partitions.unsigned_abs();
                pipeline.detector_partitions = Some(
                    cluster
                        .preferred
                        .iter()
                        .map(|partition| partition.unsigned_abs())
                        .collect(),
                );
            }
        }
        if !cluster.writer || cluster.log_per_partition {
            return run_without_store(config, pipeline, limits, cluster, archive).await;
        }
    }
    let node = Node::start_in(config, pipeline, Arc::new(Marks::default()), limits, cluster.as_ref()).await?;
    let archiver = archive
        .map(|url| Archiver::start(&url, data.clone(), None))
        .transpose()?;
    let running = &node.running;
    if let Some(token) = &running.admin_token {
        // Printed once, on the terminal only; it is stored hashed.
        eprintln!(
            "\nAdmin token (shown once; also saved owner-only in {}):\n\n  {}\n",
            custos_http::auth::admin_token_path(&data).display(),
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
    if let Some(archiver) = archiver {
        archiver.stop().await;
    }
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

/// A process without one store of its own: an ingest node in front of the writers
/// (`--roles ingest`), stages that read and write the topics (`detector,responder`),
/// and with `--roles writer --log-per-partition`, the writers of the partitions whose
/// logs it can take (it then serves as an ingest node on `--listen` too).
async fn run_without_store(
    config: custos_ingest::NodeConfig,
    pipeline: Option<PipelineConfig>,
    limits: custos_query::Limits,
    cluster: &Cluster,
    archive: Option<String>,
) -> anyhow::Result<()> {
    let writers = cluster.writer && cluster.log_per_partition;
    if pipeline.is_none() && !cluster.ingest && !cluster.query && !writers {
        anyhow::bail!("--roles names no role this process can run (writer, ingest, query, detector or responder)");
    }
    let query = match (cluster.query, &archive) {
        (false, _) => None,
        (true, None) => anyhow::bail!(
            "--roles query reads the sealed store from object storage: give --object-store URL \
             (where the writers copy it with the same flag)"
        ),
        (true, Some(_)) if writers => anyhow::bail!(
            "--roles query and --log-per-partition writers run in separate processes (each partition's \
             writer serves its own log's API): start the query node alone with --roles query --log-per-partition"
        ),
        (true, Some(url)) => {
            let partitions = match cluster.log_per_partition {
                false => None,
                true => {
                    let kafka = cluster.kafka.clone();
                    let count = tokio::task::spawn_blocking(move || custos_stage::kafka::submission_partitions(&kafka))
                        .await?
                        .context("reading the submissions topic's partitions")?;
                    Some(count.unsigned_abs())
                }
            };
            pinned_keys(&cluster.log_key, partitions)?;
            Some(
                super::query_node::QueryNode::start(
                    config.data.clone(),
                    url,
                    &cluster.kafka,
                    config.chain_window,
                    cluster.log_key.clone(),
                    partitions,
                )
                .await?,
            )
        }
    };
    let data = config.data.clone();
    let config_for_query = config.clone();
    // The edge first: with partition writers, it opens the set's token table (and prints
    // a new one's admin token) before their nodes share it.
    let edge = match cluster.ingest || writers {
        true => {
            let mut config = config.clone();
            if writers {
                // The partition stores are under DATA; this node's token table beside them.
                config.data = config.data.join("edge");
            }
            let extra = query
                .as_ref()
                .map(|node| node.routes(limits.clone(), custos_ingest::edge::catalogue()))
                .transpose()?;
            Some(Edge::start(config, cluster, extra).await?)
        }
        false => None,
    };
    let partitions = match writers {
        true => Some(PartitionWriters::start(config, limits.clone(), cluster.clone()).await?),
        false => None,
    };
    let archiver = match (&partitions, archive.filter(|_| query.is_none())) {
        (Some(partitions), Some(url)) => Some(Archiver::start(&url, data.clone(), Some(partitions.held.clone()))?),
        _ => None,
    };
    let (query_stop, query_stop_wait) = tokio::sync::oneshot::channel::<()>();
    let query_server = match (&query, &edge) {
        (Some(node), None) => Some(
            node.serve(&config_for_query, limits.clone(), async move {
                let _ = query_stop_wait.await;
            })
            .await?,
        ),
        _ => None,
    };
    let stages = match pipeline {
        Some(config) => {
            let (pipeline, hooks) = Pipeline::start(config, Arc::new(Marks::default()))?;
            eprintln!(
                "stages on Kafka: detector key {} (signs findings), responder key {} (signs actions)",
                pipeline.detector_did, pipeline.responder_did
            );
            eprintln!(
                "start the writer with: --trust-detector {} --trust-responder {}",
                pipeline.detector_did, pipeline.responder_did
            );
            Some((pipeline, hooks))
        }
        None => None,
    };
    wait_for_signal().await;
    if let Some(edge) = edge {
        eprintln!("stopping: the ingest node answers what it holds");
        edge.stop().await;
    }
    let _ = query_stop.send(());
    if let Some(server) = query_server {
        let _ = server.await;
    }
    if let Some(node) = query {
        node.stop().await;
    }
    if let Some(partitions) = partitions {
        eprintln!("stopping: sealing and checkpointing each partition's log");
        partitions.stop(&data).await;
    }
    if let Some(archiver) = archiver {
        archiver.stop().await;
    }
    if let Some((pipeline, hooks)) = stages {
        eprintln!("stopping: the stages finish what they read and save their state");
        if let Some(drain) = hooks.drain {
            tokio::task::spawn_blocking(drain).await?;
        }
        tokio::task::spawn_blocking(move || pipeline.join()).await?;
    }
    Ok(())
}

/// Checks a query node's `--log-key` list against what it reads: at most one key for one
/// log; none or one per partition over a partition set of `partitions`, all different.
fn pinned_keys(keys: &[custos_store::checkpoint::NoteKey], partitions: Option<u32>) -> anyhow::Result<()> {
    match partitions {
        None if keys.len() > 1 => anyhow::bail!(
            "--log-key names {} keys, but a query node over one log takes one (a partition set, \
             --log-per-partition, takes one per partition)",
            keys.len()
        ),
        Some(count) if !keys.is_empty() && keys.len() != count as usize => anyhow::bail!(
            "--log-key names {} keys, but the set has {count} partitions: give one per partition, in \
             partition order (each DATA/partitions/<p>/logs/0/checkpoint.pub of the writers)",
            keys.len()
        ),
        _ => {}
    }
    for (position, key) in keys.iter().enumerate() {
        if keys[..position].contains(key) {
            anyhow::bail!(
                "--log-key names `{}` twice: every partition's log has its own key",
                key.name
            );
        }
    }
    Ok(())
}

/// Where partition `p`'s store lives in a writer's data directory.
pub(crate) fn partition_dir(data: &std::path::Path, partition: i32) -> std::path::PathBuf {
    data.join("partitions").join(partition.to_string())
}

/// The log writers of `--log-per-partition`: every second, each partition this process
/// may claim (`custos_stage::claim`: its store unlocked, and preferred here or left
/// without a writer for 5 s) is taken: opened, recovered from its WAL, and read from the
/// writer group's committed offset. So a surviving writer takes over a dead one's
/// partitions within seconds.
struct PartitionWriters {
    /// The partitions this process has written since it started (what its archiver
    /// copies to the object store).
    held: Held,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::collections::BTreeMap<i32, Node>>,
    set: custos_store::partitions::PartitionSet,
}

impl PartitionWriters {
    async fn start(
        base: custos_ingest::NodeConfig,
        limits: custos_query::Limits,
        cluster: Cluster,
    ) -> anyhow::Result<Self> {
        let partitions = {
            let kafka = cluster.kafka.clone();
            tokio::task::spawn_blocking(move || custos_stage::kafka::submission_partitions(&kafka))
                .await?
                .context("reading the submissions topic's partitions")?
        };
        eprintln!(
            "log writer: one log per partition ({partitions}), stores under {}",
            base.data.join("partitions").display()
        );
        let set = custos_store::partitions::PartitionSet::open_or_create(&base.data, partitions.unsigned_abs())
            .context("opening the partition set")?;
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let bound = set.clone();
        let held = Held::default();
        let holding = held.clone();
        let task = tokio::spawn(async move {
            let mut nodes = std::collections::BTreeMap::new();
            let mut claims = custos_stage::claim::Claims::new(
                cluster
                    .preferred
                    .iter()
                    .map(|partition| partition.unsigned_abs())
                    .collect(),
            );
            let mut signer = None;
            loop {
                if nodes.contains_key(&0) {
                    let (data, set, mut held) = (base.data.clone(), bound.clone(), signer.take());
                    signer = tokio::task::spawn_blocking(move || {
                        Self::bind(&data, &set, &mut held);
                        held
                    })
                    .await
                    .unwrap_or(None);
                }
                for partition in 0..partitions {
                    if nodes.contains_key(&partition) || *stopping.borrow() {
                        continue;
                    }
                    let dir = partition_dir(&base.data, partition);
                    if !claims.ready(partition.unsigned_abs(), &dir) {
                        continue;
                    }
                    let mut config = base.clone();
                    config.data = dir;
                    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                    // One token table for the set, the one the writers' ingest edges
                    // serve: a collector token made there is checked by its realm's writer.
                    config.tokens = Some(base.data.join("edge"));
                    let mut this = cluster.clone();
                    this.partition = Some(partition);
                    this.partitions = partitions;
                    match Node::start_in(config, None, Arc::new(Marks::default()), limits.clone(), Some(&this)).await {
                        Ok(node) => {
                            claims.taken(partition.unsigned_abs());
                            holding
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert(partition.unsigned_abs());
                            eprintln!(
                                "partition {partition}: this process writes its log (node key {}; its store's API on http://{})",
                                node.running.node_did, node.running.addr
                            );
                            nodes.insert(partition, node);
                        }
                        Err(error) => match error.downcast_ref::<custos_ingest::NodeError>() {
                            Some(custos_ingest::NodeError::Locked(_)) => {}
                            _ => tracing::error!(
                                partition,
                                error = format!("{error:#}"),
                                "could not open the partition's log"
                            ),
                        },
                    }
                }
                tokio::select! {
                    _ = stopping.changed() => break,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
            nodes
        });
        Ok(Self { held, stop, task, set })
    }

    /// Signs a cross-partition checkpoint when partition 0 is written here (one signer
    /// at a time) and a partition's head moved.
    fn bind(
        data: &std::path::Path,
        set: &custos_store::partitions::PartitionSet,
        signer: &mut Option<custos_store::partitions::CrossSigner>,
    ) {
        let signer = match signer {
            Some(signer) => signer,
            None => match custos_store::partitions::CrossSigner::open(data, set.clone()) {
                Ok(opened) => signer.insert(opened),
                Err(error) => {
                    tracing::error!(%error, "cannot open the partition set's key");
                    return;
                }
            },
        };
        match signer.tick() {
            Ok(Some(checkpoint)) => tracing::debug!(
                sizes = ?checkpoint.heads.iter().map(|head| head.size).collect::<Vec<_>>(),
                "signed a cross-partition checkpoint"
            ),
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "could not sign a cross-partition checkpoint"),
        }
    }

    async fn stop(self, data: &std::path::Path) {
        let _ = self.stop.send(true);
        let Ok(nodes) = self.task.await else {
            return;
        };
        let binds = nodes.contains_key(&0);
        for (partition, node) in nodes {
            match node.shutdown().await {
                Ok(closed) => eprintln!("partition {partition}: stopped ({} entries)", closed.entries),
                Err(error) => eprintln!("partition {partition}: stopping failed: {error:#}"),
            }
        }
        if binds {
            // Bind the final checkpoints the partitions signed as they stopped.
            let (data, set) = (data.to_owned(), self.set);
            let _ = tokio::task::spawn_blocking(move || Self::bind(&data, &set, &mut None)).await;
        }
    }
}

/// A stateless ingest node and the thread that keeps its registry view from the
/// control topic.
struct Edge {
    node: custos_ingest::edge::Edge,
    stop: Arc<AtomicBool>,
    follower: std::thread::JoinHandle<()>,
}

impl Edge {
    async fn start(
        config: custos_ingest::NodeConfig,
        cluster: &Cluster,
        extra: Option<custos_ingest::edge::ExtraRoutes>,
    ) -> anyhow::Result<Self> {
        let kafka = &cluster.kafka;
        let data = config.data.clone();
        let view = Arc::new(custos_ingest::edge::ControlView::new());
        let stop = Arc::new(AtomicBool::new(false));
        let follower = {
            let (kafka, view, stop) = (kafka.clone(), view.clone(), stop.clone());
            std::thread::Builder::new()
                .name("custos-control-view".into())
                .spawn(move || follow_control(&kafka, &view, &stop))?
        };
        let submitter = {
            let kafka = kafka.clone();
            tokio::task::spawn_blocking(move || custos_stage::kafka::KafkaSubmitter::new(&kafka))
                .await?
                .context("connecting to Kafka")?
        };
        let node =
            custos_ingest::edge::start_edge(config, Arc::new(submitter), view, cluster.writer_timeout, extra).await?;
        if let Some(token) = &node.admin_token {
            eprintln!(
                "\nAdmin token of this ingest node (shown once; also saved owner-only in {}):\n\n  {}\n",
                custos_http::auth::admin_token_path(&data).display(),
                token.0
            );
        }
        eprintln!(
            "custos serving on http://{} (an ingest node: events go to the writer over Kafka)",
            node.addr
        );
        Ok(Self { node, stop, follower })
    }

    async fn stop(self) {
        self.node.shutdown().await;
        self.stop.store(true, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || self.follower.join()).await;
    }
}

/// Reads the control topic from its beginning into `view`, then follows it; the view is
/// loaded (the node ready) once everything on the topic at the start has been read.
fn follow_control(kafka: &KafkaConfig, view: &custos_ingest::edge::ControlView, stop: &AtomicBool) {
    let mut feed = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match custos_stage::kafka::ControlFeed::open(kafka) {
            Ok(feed) => break feed,
            Err(error) => {
                tracing::warn!(%error, "opening the control topic; trying again");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    };
    // The last round of reading to the topic's end that was started, and finished
    // (`ControlView::catch_up`).
    let (mut started, mut finished) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        // Short: a round asked for starts within this.
        if let Some((key, value)) = feed.poll(std::time::Duration::from_millis(10)) {
            view.apply(&key, &value);
        }
        let asked = view.rounds_asked();
        if asked > started && view.loaded() {
            match feed.mark_end(std::time::Duration::from_secs(2)) {
                Ok(()) => started = asked,
                Err(error) => tracing::debug!(%error, "asking where the control topic ends; trying again"),
            }
        }
        if feed.caught_up() {
            if !view.loaded() {
                view.set_loaded();
                tracing::info!("registry view loaded from the control topic");
            }
            if started > finished {
                finished = started;
                view.rounds_done(finished);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use custos_store::checkpoint::NoteKey;

    fn key(name: &str, seed: u8) -> NoteKey {
        NoteKey {
            name: name.into(),
            public: custos_event::AgentKey::from_seed(&[seed; 32]).public_key(),
        }
    }

    /// A query node's pinned keys: one for one log; none or one per partition for a set,
    /// never one twice; each refusal names the count or the key.
    #[test]
    fn pinned_keys_match_the_logs_they_pin() {
        let (a, b, c) = (key("custos/a/0", 1), key("custos/b/0", 2), key("custos/c/0", 3));
        assert!(super::pinned_keys(&[], None).is_ok());
        assert!(super::pinned_keys(std::slice::from_ref(&a), None).is_ok());
        let two = super::pinned_keys(&[a.clone(), b.clone()], None)
            .unwrap_err()
            .to_string();
        assert!(two.contains("names 2 keys") && two.contains("takes one"), "{two}");
        assert!(super::pinned_keys(&[], Some(3)).is_ok());
        assert!(super::pinned_keys(&[a.clone(), b.clone(), c.clone()], Some(3)).is_ok());
        let short = super::pinned_keys(&[a.clone(), b.clone()], Some(3))
            .unwrap_err()
            .to_string();
        assert!(short.contains("3 partitions"), "{short}");
        let twice = super::pinned_keys(&[a.clone(), b, a], Some(3)).unwrap_err().to_string();
        assert!(twice.contains("custos/a/0") && twice.contains("twice"), "{twice}");
    }

    /// The committed-record publisher never records a log index at or past a control
    /// record the control topic does not have yet: a restart replays from after the
    /// recorded index, and would skip it for good.
    #[test]
    fn the_published_index_stays_below_an_unpublished_control_record() {
        let mut pending = std::collections::VecDeque::new();
        // No control record: whatever went out.
        assert_eq!(super::recordable(40, &mut pending, 0), Some(40));
        // Control records 41 and 45 went out as committed records; the control topic has
        // none of them yet.
        pending.extend([41, 45]);
        assert_eq!(super::recordable(50, &mut pending, 0), Some(40));
        // It has 41 (every control record below 42): held below 45.
        assert_eq!(super::recordable(50, &mut pending, 42), Some(44));
        assert_eq!(super::recordable(44, &mut pending, 42), Some(44));
        // It has 45 too: free again, and the queue is empty.
        assert_eq!(super::recordable(60, &mut pending, 46), Some(60));
        assert!(pending.is_empty());
        // A control record at index 0 not out yet: nothing may be recorded.
        pending.push_back(0);
        assert_eq!(super::recordable(3, &mut pending, 0), None);
    }
}
