//! `custos`: one binary for every role. This file and `cmd/` only wire the crates to a CLI.
#![expect(clippy::print_stdout, reason = "standard output is the CLI's interface")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod cmd;
mod pipeline;
mod reader;

// Ingest and verify allocate many small buffers per event on every core; glibc malloc
// spends a measurable share of CPU and page faults on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Audit, anomaly detection and automated response for fleets of AI agents.
///
/// Agents send ed25519-signed DSSE events; `custos serve` verifies every signature and
/// appends accepted events to a tamper-evident store (WAL, Parquet segments, RFC 9162
/// Merkle log with signed C2SP checkpoints). `custos verify` proves the store intact or
/// names where it was altered.
#[derive(Parser)]
#[command(
    name = "custos",
    version,
    propagate_version = true,
    after_help = "\
Examples:
  custos demo                                   run the whole loop on a temporary store
  custos serve --data ./store                   run a node on 127.0.0.1:7600
  custos agent keygen --out agent.key           make an agent key, print its DID
  custos agent enroll did:key:z6Mk… --realm eng --data ./store
  custos emit --key agent.key --realm eng < events.jsonl
  custos verify ./store --signatures            recompute and check everything"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: ingest over HTTP, store, checkpoints.
    Serve(Box<ServeArgs>),
    /// Make agent keys; enroll, revoke and list agents on a running node.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Evidence bundles: export from a node; verify offline, anywhere.
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// Bearer tokens: create (shown once), list, revoke. Admin only.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List rejected inputs kept for forensics.
    #[command(subcommand)]
    Rejected(RejectedCommand),
    /// Findings from the detector (signed into the log).
    #[command(subcommand)]
    Finding(FindingCommand),
    /// Response actions: list them, approve or deny pending ones, undo executed ones.
    #[command(subcommand)]
    Action(ActionCommand),
    /// Sign unsigned payload lines (JSON objects) from stdin and send them.
    Emit(cmd::emit::EmitArgs),
    /// Print RFC 9162 inclusion and consistency proofs from a store.
    #[command(subcommand)]
    Proof(ProofCommand),
    /// Recompute every leaf, digest, root, checkpoint signature and agent chain.
    Verify(cmd::verify::VerifyArgs),
    /// Generate a signed fleet with rhythms and injected attacks, plus an answer key.
    Simulate(cmd::sim::SimulateArgs),
    /// Replay a trace through the detector in event time and score it against an answer key.
    Eval(cmd::sim::EvalArgs),
    /// Run a node on a temporary store with a simulated fleet, bad inputs and a verify.
    Demo(cmd::demo::DemoArgs),
    /// Benchmarks that report ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run a C2SP witness: cosign checkpoints of the logs it trusts, remember how far
    /// each grew, so a log cannot later show a shorter history.
    Witness(cmd::witness::WitnessArgs),
    /// Runs one SQL query sent on stdin by a node (internal: each query runs in a
    /// process of its own).
    #[command(hide = true)]
    QueryWorker,
}

#[derive(Args)]
#[command(after_help = "\
Examples:
  custos serve --data ./store
  custos serve --data /var/lib/custos --listen 127.0.0.1:7600 --segment-max-entries 500000

Distributed (stages on Kafka topics; see docs/architecture.md):
  custos serve --data ./stages --kafka 127.0.0.1:9092 --roles detector,responder
  custos serve --data ./edge1 --kafka 127.0.0.1:9092 --roles ingest --listen 127.0.0.1:7610
  custos serve --data ./query1 --kafka 127.0.0.1:9092 --roles query --listen 127.0.0.1:7620 \
      --object-store file:///srv/custos-archive
  custos serve --data ./store --kafka 127.0.0.1:9092 --roles writer \
      --trust-detector did:key:z6Mk… --trust-responder did:key:z6Mk…
  custos serve --data ./edge1 --kafka broker-1:9093 --roles ingest \
      --kafka-config-file /etc/custos/kafka.properties    # TLS / SASL settings

On first start the node creates the store, prints an admin token once, and writes it
owner-only to DATA/admin.token for CLI use on this host. SIGTERM or Ctrl-C stops
accepting, drains, seals the open segment and signs a final checkpoint.")]
struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long, env = "CUSTOS_DATA")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7600")]
    listen: SocketAddr,
    /// Seal a Parquet segment after this many entries.
    #[arg(long, default_value_t = 100_000)]
    segment_max_entries: usize,
    /// Seal the open segment once its oldest entry is this many seconds old, however
    /// few entries it holds (0: by --segment-max-entries only). A quiet log's entries
    /// then reach object storage, and a query node's tail on Kafka stays short.
    #[arg(long, default_value_t = 600)]
    seal_after_secs: u64,
    /// Sign a checkpoint after this many new entries.
    #[arg(long, default_value_t = 1_000)]
    checkpoint_every: u64,
    /// Sign a checkpoint at least this often (milliseconds) while entries arrive.
    #[arg(long, default_value_t = 1_000)]
    checkpoint_interval_ms: u64,
    /// Largest accepted envelope, in bytes.
    #[arg(long, default_value_t = 65_536)]
    max_event_bytes: usize,
    /// How far ahead of this node's clock an event's `ts` may be, in seconds.
    #[arg(long, default_value_t = 300)]
    max_future_skew_secs: u64,
    /// How old an event's `ts` may be, in seconds (default 7 days).
    #[arg(long, default_value_t = 604_800)]
    max_age_secs: u64,
    /// Run without the detector and the responder (ingest and store only).
    #[arg(long)]
    no_detect: bool,
    /// Copy the sealed part of the store (segments, manifests, checkpoints up to the
    /// sealed size; never keys or the WAL) to object storage every few seconds and at
    /// stop: `file:///dir` or `s3://bucket/prefix` (S3 settings from the AWS_*
    /// environment variables, such as AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ALLOW_HTTP). `custos verify URL` checks the copy.
    /// With --roles query: where the query node reads the sealed store from.
    #[arg(long, value_name = "URL", env = "CUSTOS_OBJECT_STORE")]
    object_store: Option<String>,
    /// With --roles query: the writer's checkpoint verifier key you trust (the text of its
    /// DATA/logs/0/checkpoint.pub, as `custos verify --log-key` takes it). The node then
    /// refuses an object store signed by any other key, instead of trusting the key it
    /// reads there first. Either key is kept in DATA/trusted-log-keys/ and trusted at
    /// every later start. With --log-per-partition: one key per partition, in partition
    /// order, comma-separated or the flag repeated (each DATA/partitions/<p>/logs/0/
    /// checkpoint.pub of the writers' DATA).
    #[arg(
        long,
        value_name = "KEY",
        env = "CUSTOS_LOG_KEY",
        requires = "kafka",
        value_delimiter = ','
    )]
    log_key: Vec<String>,
    /// Kafka bootstrap servers (`host:port,...`): the stages exchange the contract's
    /// records over topics instead of in-process channels.
    #[arg(long, value_name = "BROKERS", env = "CUSTOS_KAFKA")]
    kafka: Option<String>,
    /// Topic name prefix (`PREFIX.submissions`, `PREFIX.committed`, ...).
    #[arg(long, default_value = "custos", requires = "kafka")]
    kafka_prefix: String,
    /// A connection setting for the Kafka clients, `KEY=VALUE`, repeatable: TLS
    /// (`security.protocol=ssl`, `ssl.ca.location=/etc/custos/ca.pem`, client certificates
    /// with `ssl.certificate.location` and `ssl.key.location`) and SASL
    /// (`security.protocol=sasl_ssl`, `sasl.mechanism=SCRAM-SHA-512`, `sasl.username=...`).
    /// Only security.protocol, ssl.*, sasl.*, enable.ssl.certificate.verification and
    /// client.id are taken. Put passwords in --kafka-config-file instead: a command line
    /// is visible to every local user.
    #[arg(long = "kafka-config", value_name = "KEY=VALUE", requires = "kafka")]
    kafka_settings: Vec<String>,
    /// A file of the same settings, one `key=value` per line (`#` comments), read before
    /// --kafka-config: the place for `sasl.password` and `ssl.key.password`. Keep it
    /// owner-only (the node warns when others may read it).
    #[arg(long, value_name = "PATH", env = "CUSTOS_KAFKA_CONFIG_FILE", requires = "kafka")]
    kafka_config_file: Option<PathBuf>,
    /// Partitions of the topics when this process creates them.
    #[arg(long, default_value_t = 3, requires = "kafka", value_parser = clap::value_parser!(i32).range(1..=1024))]
    kafka_partitions: i32,
    /// With --roles ingest: how long an ingest node waits for the log writer's durable
    /// answer before it answers 503 `writer_unavailable` (the client resends the same
    /// bytes; what was stored meanwhile is answered `duplicate`).
    #[arg(long, default_value_t = 30, requires = "kafka", value_parser = clap::value_parser!(u64).range(1..=3600))]
    writer_timeout_secs: u64,
    /// With --roles writer: check the signature of every event an ingest node passed on
    /// as verified again, refusing (bad_signature) and logging any that does not verify.
    /// Whoever may write the submissions topic (a compromised ingest node, a leaked broker
    /// credential) then cannot append events in an agent's name. Costs one more batch
    /// verification per event on the writer (docs/BENCHMARKS.md).
    #[arg(long, requires = "kafka")]
    verify_submissions: bool,
    /// The writers keep one Merkle log per partition of the submissions topic. Give it to
    /// every writer, detector and responder process of the cluster. A writer keeps each
    /// partition's log in its own store under DATA/partitions/<p>/, takes the partitions
    /// whose store no other writer holds (a dead writer's within seconds), and serves as
    /// an ingest node on --listen; a detector or responder keeps one signing chain per
    /// partition. Without it, one writer keeps one log for every partition.
    #[arg(long, requires = "kafka")]
    log_per_partition: bool,
    /// With --log-per-partition: the partitions whose log (writer) or detector state
    /// (detector) this process takes at once, for example its StatefulSet ordinal's
    /// share; it takes any other partition only after no process has held it for 5 s.
    /// Writers share their --data, and so do detectors. Default: every partition.
    #[arg(long, value_delimiter = ',', requires = "log_per_partition")]
    prefer_partitions: Vec<i32>,
    /// With --kafka, the roles this process runs: writer (the log writer with ingest and
    /// query), ingest (a stateless ingest node in front of the writer), query (a
    /// stateless query node; needs --object-store), detector, responder. Without
    /// --kafka, one process runs them all.
    #[arg(
        long,
        value_delimiter = ',',
        requires = "kafka",
        default_value = "writer,detector,responder"
    )]
    roles: Vec<Role>,
    /// The detector key of a detector process (its `did:key`, printed at its start) whose
    /// findings this writer appends (repeatable).
    #[arg(
        long = "trust-detector",
        value_name = "DID",
        requires = "kafka",
        env = "CUSTOS_TRUST_DETECTOR",
        value_delimiter = ','
    )]
    trust_detector: Vec<String>,
    /// The responder key of a responder process whose action records this writer appends.
    #[arg(
        long = "trust-responder",
        value_name = "DID",
        requires = "kafka",
        env = "CUSTOS_TRUST_RESPONDER",
        value_delimiter = ','
    )]
    trust_responder: Vec<String>,
    /// Extra Sigma rule directory, added to the shipped pack (repeatable).
    #[arg(long = "rules", value_name = "DIR")]
    rules: Vec<PathBuf>,
    /// Extra playbook directory (YAML), added to the shipped playbooks.
    #[arg(long, value_name = "DIR")]
    playbooks: Option<PathBuf>,
    /// Do not load the shipped playbooks (only `--playbooks`).
    #[arg(long)]
    no_shipped_playbooks: bool,
    /// Detector window width, in seconds.
    #[arg(long, default_value_t = 60)]
    window_secs: i64,
    /// Messages (mostly acknowledged events) that may wait for the detector. When the
    /// detector falls this far behind, ingest waits for it rather than hold more in memory.
    #[arg(long, default_value_t = pipeline::DETECTOR_QUEUE as u64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    detector_queue: u64,
    /// Open HTTP connections at most (0: the descriptor limit, raised to its hard limit
    /// at start, less a reserve of 256 for the store). Beyond it: 503 and closed.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Seconds a client has to send a whole request head, counted from the connection's
    /// start and from each idle moment between requests (slowloris and idle sockets).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_timeout_secs: u64,
    /// A connection that moves no byte either way for this many seconds is closed (keep
    /// it above --query-timeout-secs: a query's connection is quiet while it runs).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout_secs: u64,
    /// Seconds a client has to send a whole request body.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    body_timeout_secs: u64,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_request_mib: u64,
    /// MiB of request bodies held in memory at once, across all requests; beyond it,
    /// requests get 503 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    body_budget_mib: u64,
    /// Unauthenticated rejections (bad signatures, unknown keys, malformed input) one
    /// source address may cause per second, sustained; beyond it, 429 with Retry-After.
    #[arg(long, default_value_t = 100.0)]
    reject_rate: f64,
    /// ... and in a burst.
    #[arg(long, default_value_t = 2_000.0)]
    reject_burst: f64,
    /// A witness to submit every checkpoint to, `<verifier key>@<url>` (what `custos
    /// witness` prints, and where it listens); repeat for more. At start, a witness that
    /// cosigned more than this store holds stops the node: entries were removed.
    #[arg(long = "witness", value_name = "KEY@URL", value_parser = parse_witness)]
    witnesses: Vec<custos_ingest::witness::WitnessTarget>,
    /// VaultysClaw webhook: the file holding the shared HMAC secret. Serves
    /// POST /v1/adapters/vaultysclaw/webhook (docs/integrations.md).
    #[arg(long, value_name = "PATH", requires = "vaultysclaw_realm")]
    vaultysclaw_secret_file: Option<PathBuf>,
    /// The realm VaultysClaw's agents are enrolled in (their events are attested by the
    /// adapter's key, enrolled there).
    #[arg(long, value_name = "REALM")]
    vaultysclaw_realm: Option<String>,
    /// VaultysClaw's base URL: its governance audit is pulled from it, and the
    /// vaultysclaw.* playbook actions call it.
    #[arg(long, value_name = "URL", requires_all = ["vaultysclaw_realm", "vaultysclaw_token_file"])]
    vaultysclaw_url: Option<String>,
    /// The file holding the bearer token for VaultysClaw's API.
    #[arg(long, value_name = "PATH", requires = "vaultysclaw_url")]
    vaultysclaw_token_file: Option<PathBuf>,
    /// LastID's operator webhook: the lastid.* playbook actions POST their signed
    /// revocation recommendations to it (after approval), and record its answer.
    #[arg(long, value_name = "URL")]
    lastid_webhook: Option<String>,
    /// The file holding the HMAC secret that signs those POSTs (`X-Custos-Signature`).
    #[arg(long, value_name = "PATH", requires = "lastid_webhook")]
    lastid_webhook_secret_file: Option<PathBuf>,
    /// Seconds between two pulls of VaultysClaw's audit.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    vaultysclaw_poll_secs: u64,
    /// A SQL query (or REST read) running longer than this many seconds is stopped.
    #[arg(long, default_value_t = 30)]
    query_timeout_secs: u64,
    /// Memory a query's operators may hold (sorts, joins, aggregates), in MiB.
    #[arg(long, default_value_t = 512)]
    query_memory_mib: usize,
    /// Most rows a query answer may have.
    #[arg(long, default_value_t = 100_000)]
    query_max_rows: usize,
    /// Queries (SQL and REST reads) running at once; beyond it, 429 with Retry-After.
    /// Each SQL query runs in a process of its own.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    query_concurrency: u64,
    /// Queries one token may run at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
    query_concurrency_per_token: u64,
    /// Threads of the in-process query runtime (REST reads, evidence selection), apart
    /// from those that serve ingest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    query_threads: u64,
}

impl ServeArgs {
    fn config(&self) -> custos_ingest::NodeConfig {
        let mut config = custos_ingest::NodeConfig::new(self.data.clone(), self.listen);
        config.max_event_bytes = self.max_event_bytes;
        config.max_future_skew = std::time::Duration::from_secs(self.max_future_skew_secs);
        config.max_age = std::time::Duration::from_secs(self.max_age_secs);
        config.log.segment_max_entries = self.segment_max_entries;
        config.log.seal_after =
            (self.seal_after_secs > 0).then(|| std::time::Duration::from_secs(self.seal_after_secs));
        config.log.checkpoint_every = self.checkpoint_every;
        config.log.checkpoint_interval = std::time::Duration::from_millis(self.checkpoint_interval_ms);
        config.max_request_bytes = usize::try_from(self.max_request_mib * 1024 * 1024).unwrap_or(usize::MAX);
        config.http.max_connections = self.max_connections;
        config.http.header_timeout = std::time::Duration::from_secs(self.header_timeout_secs);
        config.http.idle_timeout = std::time::Duration::from_secs(self.idle_timeout_secs);
        config.http.body_timeout = std::time::Duration::from_secs(self.body_timeout_secs);
        config.http.body_budget_bytes = usize::try_from(self.body_budget_mib * 1024 * 1024).unwrap_or(usize::MAX);
        config.reject_rate_per_sec = self.reject_rate.max(0.0);
        config.reject_burst = self.reject_burst.max(1.0);
        config.witnesses = self.witnesses.clone();
        config.vaultysclaw =
            self.vaultysclaw_realm
                .as_ref()
                .map(|realm| custos_ingest::vaultysclaw::VaultysClawConfig {
                    realm: realm.clone(),
                    secret_file: self.vaultysclaw_secret_file.clone(),
                    url: self.vaultysclaw_url.clone(),
                    token_file: self.vaultysclaw_token_file.clone(),
                    poll: std::time::Duration::from_secs(self.vaultysclaw_poll_secs),
                });
        config
    }

    fn limits(&self) -> custos_query::Limits {
        custos_query::Limits {
            timeout: std::time::Duration::from_secs(self.query_timeout_secs.max(1)),
            memory_bytes: self.query_memory_mib.max(1) * 1024 * 1024,
            max_rows: self.query_max_rows.max(1),
            concurrency: usize::try_from(self.query_concurrency).unwrap_or(1),
            per_token: usize::try_from(self.query_concurrency_per_token).unwrap_or(1),
            threads: usize::try_from(self.query_threads).unwrap_or(1),
            worker: custos_query::pool::WorkerProgram::current(),
        }
    }

    fn cluster(&self) -> anyhow::Result<Option<cmd::serve::Cluster>> {
        let Some(brokers) = self.kafka.clone() else {
            return Ok(None);
        };
        if self.max_event_bytes > custos_stage::kafka::MAX_EVENT_BYTES {
            anyhow::bail!(
                "--max-event-bytes {}: with --kafka an envelope must fit one broker record with its committed form; \
                 the most is {}",
                self.max_event_bytes,
                custos_stage::kafka::MAX_EVENT_BYTES
            );
        }
        let mut kafka = custos_stage::kafka::KafkaConfig::new(brokers);
        kafka.prefix = self.kafka_prefix.clone();
        if let Some(path) = &self.kafka_config_file {
            let text = fs_err::read_to_string(path)?;
            warn_if_others_read(path);
            kafka
                .set_properties(&text, &path.display().to_string())
                .map_err(anyhow::Error::msg)?;
        }
        for setting in &self.kafka_settings {
            let Some((key, value)) = setting.split_once('=') else {
                anyhow::bail!("--kafka-config `{setting}` is not KEY=VALUE");
            };
            kafka
                .set(key, value)
                .map_err(|error| anyhow::anyhow!("--kafka-config: {error}"))?;
        }
        kafka.check()?;
        let log_key = self
            .log_key
            .iter()
            .map(|text| {
                custos_store::checkpoint::NoteKey::parse_verifier(text.trim())
                    .map_err(|error| anyhow::anyhow!("--log-key `{}`: {error}", text.trim()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut trust = std::collections::BTreeMap::new();
        for did in &self.trust_detector {
            trust.insert(did.clone(), custos_event::FINDING_PAYLOAD_TYPE.to_owned());
        }
        for did in &self.trust_responder {
            trust.insert(did.clone(), custos_event::ACTION_PAYLOAD_TYPE.to_owned());
        }
        Ok(Some(cmd::serve::Cluster {
            kafka,
            partitions: self.kafka_partitions,
            writer: self.roles.contains(&Role::Writer),
            ingest: self.roles.contains(&Role::Ingest),
            query: self.roles.contains(&Role::Query),
            writer_timeout: std::time::Duration::from_secs(self.writer_timeout_secs),
            log_per_partition: self.log_per_partition,
            verify_submissions: self.verify_submissions,
            partition: None,
            preferred: self.prefer_partitions.clone(),
            trust,
            log_key,
        }))
    }

    fn pipeline(&self) -> Option<pipeline::PipelineConfig> {
        let stages = pipeline::Stages {
            detector: self.kafka.is_none() || self.roles.contains(&Role::Detector),
            responder: self.kafka.is_none() || self.roles.contains(&Role::Responder),
        };
        if self.no_detect || !(stages.detector || stages.responder) {
            return None;
        }
        let mut config = pipeline::PipelineConfig::new(self.data.clone());
        config.rules = self.rules.clone();
        config.playbooks = self.playbooks.clone();
        config.shipped_playbooks = !self.no_shipped_playbooks;
        config.detector.window_secs = self.window_secs.max(1);
        config.detector_queue = usize::try_from(self.detector_queue).unwrap_or(usize::MAX);
        config.stages = stages;
        if let Some(url) = &self.lastid_webhook {
            config.platforms.lastid = Some(custos_respond::platform::LastIdTarget {
                url: url.clone(),
                secret: Vec::new(),
                names: self.data.join("attest").join("lastid"),
                timeout: std::time::Duration::from_secs(5),
            });
        }
        Some(config)
    }
}

/// A role of a process in the distributed mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// The log writer, with the ingest and query HTTP API.
    Writer,
    /// A stateless ingest node: verifies signatures, checks the registry from the
    /// control topic, and hands events to the writer (`POST /v1/events`, revocations).
    Ingest,
    /// A stateless query node: the query API over the sealed store read from
    /// --object-store and the unsealed tail read from the committed topic.
    Query,
    Detector,
    Responder,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Write a new ed25519 key file (mode 0600) and print its did:key.
    #[command(after_help = "Example:\n  custos agent keygen --out agent.key")]
    Keygen {
        /// Where to write the key; refuses to overwrite.
        #[arg(long, default_value = "agent.key")]
        out: PathBuf,
    },
    /// Enroll an agent in a realm.
    #[command(
        after_help = "Examples:\n  custos agent enroll did:key:z6Mk… --realm eng --label team=payments --data ./store\n  custos agent enroll did:lastid:agent:7f3a --source lastid --public-key <hex> --realm ops --data ./store"
    )]
    Enroll {
        /// The agent's did:key, or with --source lastid a LastID agent identifier.
        did: String,
        #[arg(long)]
        realm: String,
        /// A label, `key=value`; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// `lastid`: a LastID agent whose audit records the node verifies
        /// (POST /v1/adapters/lastid/audit).
        #[arg(long)]
        source: Option<String>,
        /// The LastID agent's ed25519 key (64 hex digits or base64), for a did:lastid
        /// identifier, which does not carry it.
        #[arg(long, requires = "source")]
        public_key: Option<String>,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Revoke an agent and every sub-agent it enrolled.
    #[command(after_help = "Example:\n  custos agent revoke did:key:z6Mk… --reason 'key leaked' --data ./store")]
    Revoke {
        did: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// List every agent with its status.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
}

#[derive(Subcommand)]
enum RejectedCommand {
    /// Newest first.
    #[command(after_help = "Example:\n  custos rejected list --reason bad_signature --data ./store")]
    List {
        /// Only this reason code (see docs/reason-codes.md).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
}

#[derive(Subcommand)]
enum FindingCommand {
    /// Newest first, with the top contributing features.
    #[command(after_help = "\
Examples:
  custos finding list --data ./store
  custos finding list --json --limit 500 --url http://10.0.0.5:7600 --token $TOKEN")]
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
}

#[derive(Subcommand)]
enum ActionCommand {
    /// Pending approvals, then action records, newest first.
    #[command(after_help = "Example:\n  custos action list --data ./store")]
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Approve a pending approval: the playbook's remaining actions run now.
    #[command(after_help = "Example:\n  custos action approve appr-1a2b3c4d5e6f --data ./store")]
    Approve {
        /// The approval id (`custos action list`).
        id: String,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Deny a pending approval: nothing runs, and the denial is recorded.
    #[command(after_help = "Example:\n  custos action deny appr-1a2b3c4d5e6f --data ./store")]
    Deny {
        id: String,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Ask to undo an executed action (reinstate an agent, restore a memory); the undo
    /// waits for approval.
    #[command(after_help = "Example:\n  custos action undo act-0f1e2d3c4b5a --data ./store")]
    Undo {
        /// The action id (`custos action list`).
        id: String,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Resume a playbook that a rate or blast-radius cap paused in a realm. The resume is
    /// recorded in the log; the hour's count of actions still applies.
    #[command(
        after_help = "Example:\n  custos action resume contain-compromised-agent --realm eng --data ./store\n\n\
`custos action list` shows which playbooks are paused, and where."
    )]
    Resume {
        /// The playbook's name.
        playbook: String,
        /// The realm where it is paused.
        #[arg(long)]
        realm: String,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
}

#[derive(Subcommand)]
enum ProofCommand {
    /// Proof that the entry at INDEX is in the tree of SIZE entries.
    #[command(after_help = "Example:\n  custos proof inclusion --data ./store --index 42")]
    Inclusion {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = custos_store::DEFAULT_LOG_ID)]
        log: String,
        #[arg(long)]
        index: u64,
        /// Tree size; defaults to the latest signed checkpoint.
        #[arg(long)]
        size: Option<u64>,
    },
    /// Proof that the tree of FROM entries is a prefix of the tree of TO entries.
    #[command(after_help = "Example:\n  custos proof consistency --data ./store --from 1000 --to 2000")]
    Consistency {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = custos_store::DEFAULT_LOG_ID)]
        log: String,
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
    },
}

#[derive(Subcommand)]
enum EvidenceCommand {
    /// Export a realm's (or one agent's) events, findings and actions in a time range,
    /// with proofs, checkpoints and keys, as a tar bundle signed by the node key.
    #[command(after_help = "\
Examples:
  custos evidence export --realm eng --from 2026-11-01T00:00:00Z --to 2026-12-01T00:00:00Z --out eng-nov.tar
  custos evidence export --realm eng --agent did:key:z6Mk… --from … --to … --out agent.tar --token $CUSTOS_TOKEN

Needs a compliance or admin token (--token, CUSTOS_TOKEN, or --data on the node's host).
The bundle format is docs/evidence-format.md.")]
    Export {
        #[arg(long)]
        realm: String,
        #[arg(long)]
        agent: Option<String>,
        /// Start, RFC 3339, inclusive.
        #[arg(long)]
        from: String,
        /// End, RFC 3339, exclusive.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "bundle.tar")]
        out: PathBuf,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Check a bundle offline (no server, no store): signatures, digests, leaf hashes,
    /// inclusion and consistency proofs, checkpoint and manifest signatures. Exits 1 on
    /// any problem, naming each.
    #[command(after_help = "\
Examples:
  custos evidence verify eng-nov.tar --node-key did:key:z6Mk…
  custos evidence verify eng-nov.tar --json
  custos evidence verify eng-nov.tar --partitions-key \"$(cat DATA/partitions.pub)\"")]
    Verify {
        bundle: PathBuf,
        /// The node key (did:key) the manifest must be signed by, obtained out of band.
        #[arg(long)]
        node_key: Option<String>,
        /// For a bundle exported from one partition of a partition set: the set's
        /// cross-partition checkpoint key (DATA/partitions.pub), obtained out of band. The
        /// bundle must then carry the checkpoint binding its partition.
        #[arg(long)]
        partitions_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints the secret once (only its hash is stored).
    #[command(after_help = "\
Examples:
  custos token create --role analyst --realm eng --ttl 30d --data ./store
  custos token create --role auditor --ttl 7d
  CUSTOS_TOKEN=$(custos token create --role responder --realm eng --realm ops)
  custos token create --role collector --realm eng     # an OpenTelemetry collector

Roles: admin (agents, tokens, everything), analyst (reads events, findings, actions),
responder (an analyst who may approve, deny and undo), compliance (reads and exports
evidence), auditor (checkpoints and proofs only), collector (sends OTLP traces to
POST /v1/traces; exactly one realm, reads nothing). Realms limit every read; none means all.")]
    Create {
        #[arg(long)]
        role: String,
        /// Limit the token to this realm; repeat for more.
        #[arg(long = "realm")]
        realms: Vec<String>,
        /// Lifetime: 30d, 12h, 90m, 3600s; none means no expiry.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// List tokens (ids, roles, realms, expiry; never secrets or hashes).
    #[command(after_help = "Example:\n  custos token list --data ./store [--json]")]
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
    /// Revoke a token by id; it stops working at once.
    #[command(after_help = "Example:\n  custos token revoke 3f2a9c01d4e5 --data ./store")]
    Revoke {
        id: String,
        #[command(flatten)]
        node: cmd::client::NodeArgs,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Drive an in-process node over loopback HTTP with pre-signed events.
    Ingest(cmd::bench::IngestArgs),
    /// Detector throughput, event-to-revocation latency on a live node, memory per agent.
    Detect(cmd::bench_detect::DetectArgs),
    /// SOC queries over a generated store against DuckDB on the same Parquet files, and
    /// inclusion-proof latency.
    Query(cmd::bench_query::QueryArgs),
    /// Evidence export from a live node and offline verification rates.
    Evidence(cmd::bench_evidence::EvidenceArgs),
    /// Ingest acknowledgement latency beside heavy SQL queries, against ingest alone.
    Storm(cmd::bench_hardening::StormArgs),
    /// Restart time on a large store with the signed caches, against rebuilding them; old
    /// resends (segment lookups) against recent ones.
    Restart(cmd::bench_hardening::RestartArgs),
    /// The distributed ingest path (a real broker, writer and ingest processes) against
    /// one embedded process, in the same run: events/s and acknowledgement latency.
    Cluster(cmd::bench_cluster::ClusterArgs),
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label `{text}` is not `key=value`"))?;
    if key.is_empty() {
        return Err(format!("label `{text}` has an empty key"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// mimalloc asks for transparent huge pages on its arenas. Under ingest that makes the
/// kernel zero whole 2 MiB pages that are then only partly used and purged again: in
/// `bench ingest` it cost about a third of the system time and 5-10% of throughput
/// (docs/BENCHMARKS.md). Operators who want them back set `MIMALLOC_ALLOW_THP=1`.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none()
        && let Err(error) = rustix::thread::disable_transparent_huge_pages(true)
    {
        eprintln!("warning: cannot turn transparent huge pages off: {error}");
    }
}

fn parse_witness(text: &str) -> Result<custos_ingest::witness::WitnessTarget, String> {
    custos_ingest::witness::WitnessTarget::parse(text)
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    if let Command::QueryWorker = cli.command {
        // Its own runtime, with large stacks: not inside this one.
        return custos_query::worker::main();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A settings file with secrets in it should be owner-only; say so when it is not.
fn warn_if_others_read(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o044 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "the Kafka settings file may be read by other users; make it owner-only (chmod 600) if it holds a password"
        );
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            init_tracing("info");
            let archive = args.object_store.clone();
            let lastid_secret = args.lastid_webhook_secret_file.clone();
            cmd::serve::run(
                args.config(),
                args.pipeline(),
                args.limits(),
                args.cluster()?,
                archive,
                lastid_secret,
            )
            .await?;
        }
        Command::Agent(command) => {
            init_tracing("warn");
            match command {
                AgentCommand::Keygen { out } => cmd::agent::keygen(&out)?,
                AgentCommand::Enroll {
                    did,
                    realm,
                    labels,
                    source,
                    public_key,
                    node,
                } => cmd::agent::enroll(&node, &did, &realm, labels, source, public_key).await?,
                AgentCommand::Revoke { did, reason, node } => cmd::agent::revoke(&node, &did, reason).await?,
                AgentCommand::List { json, node } => cmd::agent::list(&node, json).await?,
            }
        }
        Command::Evidence(EvidenceCommand::Export {
            realm,
            agent,
            from,
            to,
            out,
            node,
        }) => {
            init_tracing("warn");
            cmd::evidence::export(&node, &realm, agent, &from, &to, &out).await?;
        }
        Command::Evidence(EvidenceCommand::Verify {
            bundle,
            node_key,
            partitions_key,
            json,
        }) => {
            init_tracing("warn");
            return cmd::evidence::verify(&bundle, node_key.as_deref(), partitions_key.as_deref(), json);
        }
        Command::Token(command) => {
            init_tracing("warn");
            match command {
                TokenCommand::Create {
                    role,
                    realms,
                    ttl,
                    node,
                } => cmd::token::create(&node, &role, realms, ttl).await?,
                TokenCommand::List { json, node } => cmd::token::list(&node, json).await?,
                TokenCommand::Revoke { id, node } => cmd::token::revoke(&node, &id).await?,
            }
        }
        Command::Rejected(RejectedCommand::List {
            reason,
            limit,
            json,
            node,
        }) => {
            init_tracing("warn");
            cmd::agent::rejected(&node, reason, limit, json).await?;
        }
        Command::Finding(FindingCommand::List { limit, json, node }) => {
            init_tracing("warn");
            cmd::respond::findings(&node, limit, json).await?;
        }
        Command::Action(command) => {
            init_tracing("warn");
            match command {
                ActionCommand::List { limit, json, node } => cmd::respond::actions(&node, limit, json).await?,
                ActionCommand::Approve { id, node } => cmd::respond::decide(&node, &id, true).await?,
                ActionCommand::Deny { id, node } => cmd::respond::decide(&node, &id, false).await?,
                ActionCommand::Undo { id, node } => cmd::respond::undo(&node, &id).await?,
                ActionCommand::Resume { playbook, realm, node } => {
                    cmd::respond::resume(&node, &playbook, &realm).await?
                }
            }
        }
        Command::Emit(args) => {
            init_tracing("warn");
            return cmd::emit::run(args).await;
        }
        Command::Proof(command) => {
            init_tracing("warn");
            match command {
                ProofCommand::Inclusion { data, log, index, size } => cmd::proof::inclusion(&data, &log, index, size)?,
                ProofCommand::Consistency { data, log, from, to } => cmd::proof::consistency(&data, &log, from, to)?,
            }
        }
        Command::Verify(args) => {
            init_tracing("warn");
            return cmd::verify::run(&args);
        }
        Command::Simulate(args) => {
            init_tracing("warn");
            cmd::sim::simulate(args).await?;
        }
        Command::Eval(args) => {
            init_tracing("warn");
            return cmd::sim::eval(&args);
        }
        Command::Demo(args) => {
            init_tracing("warn");
            return cmd::demo::run(args).await;
        }
        Command::Bench(BenchCommand::Ingest(args)) => {
            init_tracing("warn");
            cmd::bench::ingest(args).await?;
        }
        Command::Bench(BenchCommand::Evidence(args)) => {
            init_tracing("warn");
            cmd::bench_evidence::evidence(args).await?;
        }
        Command::Bench(BenchCommand::Query(args)) => {
            init_tracing("warn");
            cmd::bench_query::query(args).await?;
        }
        Command::QueryWorker => return Ok(custos_query::worker::main()),
        Command::Witness(args) => {
            init_tracing("info");
            cmd::witness::run(args).await?;
        }
        Command::Bench(BenchCommand::Storm(args)) => {
            init_tracing("warn");
            cmd::bench_hardening::storm(args).await?;
        }
        Command::Bench(BenchCommand::Restart(args)) => {
            init_tracing("warn");
            cmd::bench_hardening::restart(args).await?;
        }
        Command::Bench(BenchCommand::Cluster(args)) => {
            init_tracing("warn");
            cmd::bench_cluster::cluster(args).await?;
        }
        Command::Bench(BenchCommand::Detect(args)) => {
            init_tracing("warn");
            cmd::bench_detect::detect(args).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
