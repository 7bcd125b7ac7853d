//! The Kafka transport: the contract's records on topics of a Kafka-protocol broker.
//!
//! ```text
//!  stage ── SubmissionRecord ──▶ <prefix>.submissions ──▶ writer (group <prefix>.writer)
//!    ▲                             key: agent DID              │ durable append
//!    │                                                         ├─▶ <prefix>.receipts  (key: origin)
//!    └── receipts thread ◀─────────────────────────────────────┘
//!  detector/responder (groups) ◀── <prefix>.committed ◀── CommittedRecord (key: agent DID)
//! ```
//!
//! Offsets are committed by the reader only when it says so ([`Subscription::ack`],
//! [`Intake::ack`]): a writer after its group commit, a detector after its snapshot. So a
//! crash redelivers, and the reader's own dedupe (the writer's chain check, the
//! detector's finding ids) makes the redelivery harmless. The record formats are in
//! [`crate::wire`] and `docs/architecture.md`.

#![cfg(feature = "kafka")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use serde::{Deserialize, Serialize};

use crate::wire;
use crate::{Answer, Committed, Intake, Publish, Receipt, Refused, StageError, Submission, Submitter, Subscription};

/// Where the cluster is, how to reach it and what its topics are called.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic names start with it: `<prefix>.submissions`, `<prefix>.committed`,
    /// `<prefix>.receipts`, `<prefix>.control`.
    pub prefix: String,
    /// How long a produce may take before it counts as failed.
    pub produce_timeout: Duration,
    /// Connection settings handed to librdkafka as they are: TLS (`security.protocol`,
    /// `ssl.*`) and SASL (`sasl.*`). Only those keys are taken ([`KafkaConfig::set`]):
    /// the others decide delivery and offsets, which Custos sets itself.
    settings: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(key, value)| format!("{key}={}", if secret(key) { "<redacted>" } else { value }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("prefix", &self.prefix)
            .field("produce_timeout", &self.produce_timeout)
            .field("settings", &settings)
            .finish()
    }
}

/// Whether a setting's value is a secret: never shown in logs, errors or `Debug`.
fn secret(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key.ends_with(".pem") && key.contains("key")
        || key == "sasl.oauthbearer.config"
}

/// The librdkafka settings `--kafka-config` takes: how to connect and authenticate.
const SETTING_PREFIXES: [&str; 2] = ["ssl.", "sasl."];
const SETTING_KEYS: [&str; 3] = ["security.protocol", "enable.ssl.certificate.verification", "client.id"];

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            prefix: "custos".into(),
            produce_timeout: Duration::from_secs(30),
            settings: Vec::new(),
        }
    }

    /// Adds a connection setting (a later one for the same key wins). Taken:
    /// `security.protocol`, `ssl.*`, `sasl.*`, `enable.ssl.certificate.verification`
    /// and `client.id`. Any other key is refused, named in the error: delivery,
    /// offsets and group settings are Custos's own.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let key = key.trim();
        let taken = SETTING_KEYS.contains(&key) || SETTING_PREFIXES.iter().any(|prefix| key.starts_with(prefix));
        if !taken {
            return Err(format!(
                "Kafka setting `{key}` is not one Custos passes on: only security.protocol, ssl.*, \
                 sasl.*, enable.ssl.certificate.verification and client.id are (delivery, offsets \
                 and groups are set by Custos)"
            ));
        }
        if key == "security.protocol"
            && !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&value.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "Kafka setting security.protocol=`{value}` is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"
            ));
        }
        if key.starts_with("sasl.kerberos") || key == "sasl.mechanism" && value.eq_ignore_ascii_case("GSSAPI") {
            return Err(format!(
                "Kafka setting `{key}`: GSSAPI (Kerberos) is not built in; use PLAIN, SCRAM-SHA-256, \
                 SCRAM-SHA-512 or OAUTHBEARER"
            ));
        }
        self.settings.retain(|(old, _)| old != key);
        self.settings.push((key.to_owned(), value.to_owned()));
        Ok(())
    }

    /// Reads `key=value` lines (Java client.properties style: `#` and `!` comments, blank
    /// lines skipped) from `text` into the settings; `origin` names the file in errors.
    pub fn set_properties(&mut self, text: &str, origin: &str) -> Result<(), String> {
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((key, value)) = line.split_once('=').or_else(|| line.split_once(':')) else {
                return Err(format!(
                    "{origin}:{}: expected key=value, found `{}`",
                    number + 1,
                    redact_line(line)
                ));
            };
            self.set(key, value.trim())
                .map_err(|error| format!("{origin}:{}: {error}", number + 1))?;
        }
        Ok(())
    }

    /// Hands the settings to librdkafka once, without connecting, so that a bad value or
    /// an unreadable certificate is reported at start. A secret value never appears in
    /// the error (librdkafka quotes the value it refuses).
    pub fn check(&self) -> Result<(), StageError> {
        let created: Result<BaseConsumer, KafkaError> = self.client().create();
        created.map(drop).map_err(|error| {
            let mut text = error.to_string();
            for (key, value) in &self.settings {
                if secret(key) && !value.is_empty() {
                    text = text.replace(value.as_str(), "<redacted>");
                }
            }
            StageError::Kafka(format!("the settings were refused: {text}"))
        })
    }

    pub fn submissions(&self) -> String {
        format!("{}.submissions", self.prefix)
    }

    pub fn committed(&self) -> String {
        format!("{}.committed", self.prefix)
    }

    pub fn receipts(&self) -> String {
        format!("{}.receipts", self.prefix)
    }

    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// The one-partition topic whose consumer group elects the holder of lease `name`.
    pub fn lease(&self, name: &str) -> String {
        format!("{}.lease.{name}", self.prefix)
    }

    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            // librdkafka logs through stderr by default; keep it to real problems.
            .set("log_level", "3");
        for (key, value) in &self.settings {
            config.set(key, value);
        }
        config
    }

    fn consumer(&self, group: &str) -> Result<BaseConsumer, StageError> {
        self.client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("enable.partition.eof", "false")
            // Records wait for a reader's fetch at most this long: an ingest request's
            // answer crosses two topics, so this bounds its latency.
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create()
            .map_err(kafka)
    }
}

/// A properties line for an error message: its value hidden when it may be a secret.
fn redact_line(line: &str) -> String {
    if secret(&line.to_ascii_lowercase()) {
        "<a line naming a secret, value not shown>".into()
    } else {
        line.chars().take(120).collect()
    }
}

/// librdkafka's default (500 ms) would add up to half a second per topic crossed.
const FETCH_WAIT_MS: &str = "10";

fn kafka(error: KafkaError) -> StageError {
    StageError::Kafka(error.to_string())
}

/// A consumer error while brokers are unreachable or a group rebalances: librdkafka
/// reconnects by itself, so the reader waits a little and polls again.
fn transient(error: &KafkaError) {
    tracing::warn!(%error, "kafka: waiting for the brokers");
    std::thread::sleep(Duration::from_millis(200));
}

/// How many times a partition is read again from offsets the broker skipped before they
/// are given up (each costs a fetch).
const READ_AGAIN: u32 = 20;

/// Offsets a broker handed out records past, read again before they are given up.
///
/// A Kafka broker leaves no gap in these topics (none is compacted or written in
/// transactions), but tansu 0.6's in-memory storage can: it raises a partition's high
/// watermark for a produce before it stores that batch, so a fetch in between gets the
/// batches after it and never that one. A reader handed offset 12 when 10 came next seeks
/// back to 10 and reads again (up to [`READ_AGAIN`] times) rather than skip 10 and 11
/// for good; then it takes 12 and says what it skipped.
#[derive(Default)]
struct Gaps {
    /// Per partition: the offset after the last record taken.
    next: HashMap<i32, i64>,
    /// Per partition: the first skipped offset being read again, and how often it was.
    again: HashMap<i32, (i64, u32)>,
}

/// What to do with a record at an offset, given those taken before it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Take it: it is the next one (or the first, or one read again).
    Next,
    /// Leave it and read the partition again from this offset.
    ReadAgain(i64),
    /// Take it: the offsets `first..=last` before it never came.
    Skipped { first: i64, last: i64 },
}

impl Gaps {
    fn seen(&mut self, partition: i32, offset: i64) -> Seen {
        let next = self.next.get(&partition).copied();
        match next {
            Some(next) if offset > next => {
                let again = self.again.entry(partition).or_insert((next, 0));
                if again.0 != next {
                    *again = (next, 0);
                }
                if again.1 < READ_AGAIN {
                    again.1 += 1;
                    return Seen::ReadAgain(next);
                }
                self.again.remove(&partition);
                self.next.insert(partition, offset + 1);
                Seen::Skipped {
                    first: next,
                    last: offset - 1,
                }
            }
            _ => {
                self.again.remove(&partition);
                self.next.insert(partition, offset + 1);
                Seen::Next
            }
        }
    }

    /// Takes the record at `partition`/`offset` as the next, whatever came before.
    fn forget(&mut self, partition: i32, offset: i64) {
        self.again.remove(&partition);
        self.next.insert(partition, offset + 1);
    }

    /// Whether the record at `partition`/`offset` is to be left because `consumer` was
    /// sent back to offsets it skipped (the record comes again after them).
    fn read_again(&mut self, consumer: &BaseConsumer, topic: &str, partition: i32, offset: i64) -> bool {
        match self.seen(partition, offset) {
            Seen::Next => false,
            Seen::ReadAgain(first) => {
                let new = self.again.get(&partition).is_some_and(|(_, tries)| *tries == 1);
                // A group member whose partition went to another member and came back
                // starts again where the group committed, past what it read before:
                // not a gap. Its readers only ever commit what they read, so a committed
                // offset past `first` was someone else's.
                if new && committed_past(consumer, topic, partition, first) {
                    tracing::info!(
                        topic,
                        partition,
                        offset,
                        "the partition was read elsewhere since this reader last had it: reading on from there"
                    );
                    self.forget(partition, offset);
                    return false;
                }
                if new {
                    tracing::warn!(
                        topic,
                        partition,
                        offset,
                        first,
                        "the broker handed out a record past offsets not read yet: reading the partition again from \
                         the first of them"
                    );
                }
                match consumer.seek(topic, partition, Offset::Offset(first), Duration::from_secs(1)) {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%error, topic, partition, first, "could not read a partition again");
                        self.forget(partition, offset);
                        false
                    }
                }
            }
            Seen::Skipped { first, last } => {
                tracing::warn!(
                    topic,
                    partition,
                    first,
                    last,
                    "offsets skipped: the broker handed out a record past offsets that never came, read again {READ_AGAIN} \
                     times"
                );
                false
            }
        }
    }
}

/// Whether `consumer`'s group has committed a position on `partition` past `offset`
/// (asked of the broker; `false` when it cannot say).
fn committed_past(consumer: &BaseConsumer, topic: &str, partition: i32, offset: i64) -> bool {
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    consumer
        .committed_offsets(list, Duration::from_secs(5))
        .ok()
        .and_then(|committed| {
            committed
                .find_partition(topic, partition)
                .map(|element| element.offset())
        })
        .is_some_and(|committed| matches!(committed, Offset::Offset(committed) if committed > offset))
}

/// Creates the topics (a topic that exists already is fine). The control topic is
/// compacted: it keeps the latest record per key (agent, memory, credential).
pub fn create_topics(config: &KafkaConfig, partitions: i32) -> Result<(), StageError> {
    reach(config)?;
    let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(kafka)?;
    let names = [
        (config.submissions(), false),
        (config.committed(), false),
        (config.receipts(), false),
        (config.control(), true),
    ];
    let lease = config.lease("responder");
    let mut topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|(name, compacted)| {
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
            if *compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    // One partition: exactly one member of its group holds it.
    topics.push(NewTopic::new(&lease, 1, TopicReplication::Fixed(1)));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(&topics, &options)).map_err(kafka)?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(StageError::Kafka(format!("creating topic `{topic}`: {code}"))),
        }
    }
    Ok(())
}

/// How long a node waits at start for the brokers to answer.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

/// A client context that keeps the most telling error librdkafka reported: a refused
/// password or a failed TLS handshake is kept over the "all brokers are down" that
/// follows it. (librdkafka logs each failure itself, through `tracing`.)
#[derive(Default)]
struct Watched {
    last: Mutex<Option<(rdkafka::types::RDKafkaErrorCode, String)>>,
}

impl Watched {
    fn last(&self) -> Option<(rdkafka::types::RDKafkaErrorCode, String)> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for Watched {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode::AllBrokersDown;
        let code = error
            .rdkafka_error_code()
            .unwrap_or(rdkafka::types::RDKafkaErrorCode::Fail);
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if code != AllBrokersDown || last.is_none() {
            *last = Some((code, format!("{error}: {reason}")));
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Watched {}

/// Waits up to [`REACH_TIMEOUT`] for the brokers to answer a metadata request, so that
/// a wrong address, password or certificate is named at start instead of the node
/// waiting on its topics without a word. The error carries what librdkafka last said.
pub fn reach(config: &KafkaConfig) -> Result<(), StageError> {
    let client: BaseConsumer<Watched> = config.client().create_with_context(Watched::default()).map_err(kafka)?;
    let started = Instant::now();
    loop {
        let error = match client.fetch_metadata(None, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        // Errors and logs reach the context only when the client's queue is polled.
        let _ = client.poll(Duration::from_millis(100));
        let last = client.context().last();
        // A refused password or certificate will not mend by waiting. A broker that
        // refuses the client's certificate (or its lack of one) in TLS 1.3 does so with
        // an alert after the handshake, which librdkafka reports as a transport failure
        // naming the alert.
        let settled = match &last {
            Some((rdkafka::types::RDKafkaErrorCode::Authentication | rdkafka::types::RDKafkaErrorCode::SSL, _)) => true,
            Some((_, said)) => said.contains("SSL alert number"),
            None => false,
        };
        if settled || started.elapsed() >= REACH_TIMEOUT {
            let why = last.map_or_else(
                || error.to_string(),
                |(_, last)| format!("{error}; the client said: {last}"),
            );
            let waited = match settled {
                true => String::new(),
                false => format!(" within {} s", REACH_TIMEOUT.as_secs()),
            };
            return Err(StageError::Kafka(format!(
                "cannot reach the Kafka brokers `{}`{waited}: {why}",
                config.brokers
            )));
        }
    }
}

/// Calls each record's delivery callback once the broker acknowledged it (or refused it).
struct Deliveries;

type Delivered = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A delivery callback as librdkafka's opaque (which must be `Sync`).
struct Callback(Mutex<Option<Delivered>>);

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Callback>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.to_string()),
        };
        let callback = opaque
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(callback) = callback {
            callback(outcome);
        }
    }
}

/// A producer whose sends can be waited for.
#[derive(Clone)]
struct Sender {
    producer: Arc<ThreadedProducer<Deliveries>>,
    timeout: Duration,
}

impl Sender {
    fn new(config: &KafkaConfig) -> Result<Self, StageError> {
        Self::with_timeout(config, config.produce_timeout)
    }

    /// `timeout` zero: a record is retried until the broker takes it (the writer's
    /// committed records must never be dropped; while the brokers are away the writer's
    /// bounded hand-over fills and ingest slows down instead).
    fn with_timeout(config: &KafkaConfig, timeout: Duration) -> Result<Self, StageError> {
        let producer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create_with_context(Deliveries)
            .map_err(kafka)?;
        Ok(Self {
            producer: Arc::new(producer),
            timeout: if timeout.is_zero() {
                config.produce_timeout
            } else {
                timeout
            },
        })
    }

    /// Queues `value`; `done` is called once the broker has it.
    fn send_then(
        &self,
        topic: &str,
        key: &str,
        partition: Option<i32>,
        value: &[u8],
        done: Delivered,
    ) -> Result<(), StageError> {
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(Callback(Mutex::new(Some(done)))))
            .key(key)
            .payload(value);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        let deadline = Instant::now() + self.timeout;
        let mut record = record;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < deadline =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Err(StageError::TooLarge { bytes: value.len() });
                }
                Err((error, _)) => return Err(kafka(error)),
            }
        }
    }

    /// Sends `value` and waits for the broker's acknowledgement.
    fn send(&self, topic: &str, key: &str, partition: Option<i32>, value: &[u8]) -> Result<(), StageError> {
        let (done, acked) = std::sync::mpsc::sync_channel(1);
        self.send_then(
            topic,
            key,
            partition,
            value,
            Box::new(move |outcome| {
                let _ = done.send(outcome);
            }),
        )?;
        match acked.recv_timeout(self.timeout + Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(StageError::Kafka(error)),
            Err(_) => Err(StageError::Kafka(format!(
                "no acknowledgement from the broker within {} s",
                self.timeout.as_secs()
            ))),
        }
    }

    fn flush(&self) -> Result<(), StageError> {
        self.producer.flush(self.timeout).map_err(kafka)
    }
}

/// A random id for this process's receipts.
fn origin() -> String {
    let mut bytes = [0u8; 12];
    // A clash only mixes up receipts between two processes that would both ignore the
    // other's tickets, so a weak source would do; getrandom is at hand anyway.
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

/// A submission waiting for its receipt.
struct Waiter {
    answer: Answer,
    /// The record as sent, sent again as it is when no receipt comes
    /// ([`RESEND_AFTER`]).
    record: Arc<Vec<u8>>,
    key: String,
    partition: i32,
    sent: Instant,
    resends: usize,
}

type Waiting = Arc<Mutex<HashMap<u64, Waiter>>>;

/// How long after its first send a submission without a receipt is sent again, as it is
/// (same origin and ticket). A receipt the broker lost then costs seconds, not the
/// ingest node's whole timeout: the writer answers a ticket it already answered with the
/// same receipt ([`KafkaIntake`]), and one it never saw as new.
pub const RESEND_AFTER: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(15)];

/// A waiter is forgotten this long after its first send (whoever waited gave up long
/// before, at `--writer-timeout-secs`); its receipt, should it still come, is ignored.
const FORGET_AFTER: Duration = Duration::from_secs(120);

/// Submits to the submissions topic and matches the writer's receipts to tickets.
pub struct KafkaSubmitter {
    config: KafkaConfig,
    sender: Sender,
    origin: String,
    /// Of the submissions topic: each submission goes to the partition of its realm.
    partitions: i32,
    next_ticket: AtomicU64,
    waiting: Waiting,
    stop: Arc<AtomicBool>,
    receipts: Option<std::thread::JoinHandle<()>>,
    /// Submissions sent again for a late receipt.
    resubmitted: Arc<AtomicU64>,
}

impl KafkaSubmitter {
    /// Connects, and starts reading receipts from the current end of the receipts topic.
    pub fn new(config: &KafkaConfig) -> Result<Self, StageError> {
        let sender = Sender::new(config)?;
        let origin = origin();
        let consumer: BaseConsumer = config
            .client()
            .set("group.id", format!("{}.receipts.{origin}", config.prefix))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create()
            .map_err(kafka)?;
        // Start at each partition's current end, found before the first submission, so
        // no receipt of ours can come before the position.
        assign_all(&consumer, &config.receipts(), |_, _, high| Offset::Offset(high))?;
        let partitions = partition_count(consumer.client(), &config.submissions())?;
        // The producer learns the submissions topic's leaders now, not on the first
        // request (which would otherwise wait for it).
        partition_count(sender.producer.client(), &config.submissions())?;
        let waiting: Waiting = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let resubmitted = Arc::new(AtomicU64::new(0));
        let receipts = {
            let waiting = waiting.clone();
            let stop = stop.clone();
            let origin = origin.clone();
            let topic = config.receipts();
            let resend = Resend {
                sender: sender.clone(),
                topic: config.submissions(),
                count: resubmitted.clone(),
            };
            std::thread::Builder::new()
                .name("custos-receipts".into())
                .spawn(move || read_receipts(&consumer, &topic, &origin, &waiting, &stop, &resend))
                .map_err(|error| StageError::Kafka(format!("cannot start the receipts thread: {error}")))?
        };
        Ok(Self {
            config: config.clone(),
            sender,
            origin,
            partitions,
            next_ticket: AtomicU64::new(0),
            waiting,
            stop,
            receipts: Some(receipts),
            resubmitted,
        })
    }
}

/// Where the receipts thread sends a submission again.
struct Resend {
    sender: Sender,
    topic: String,
    /// How many were sent again so far.
    count: Arc<AtomicU64>,
}

impl Resend {
    /// Sends again every waiter [`RESEND_AFTER`] says is due, and forgets those past
    /// [`FORGET_AFTER`].
    fn due(&self, waiting: &Waiting) {
        // Taken out under the lock and sent after it: a send may wait on a full producer
        // queue, and submitters and receipts need the lock meanwhile.
        let mut due = Vec::new();
        {
            let mut waiting = waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            waiting.retain(|_, waiter| waiter.sent.elapsed() < FORGET_AFTER);
            for (ticket, waiter) in waiting.iter_mut() {
                let Some(after) = RESEND_AFTER.get(waiter.resends) else {
                    continue;
                };
                if waiter.sent.elapsed() < *after {
                    continue;
                }
                waiter.resends += 1;
                due.push((
                    *ticket,
                    *after,
                    waiter.key.clone(),
                    waiter.partition,
                    waiter.record.clone(),
                ));
            }
        }
        for (ticket, after, key, partition, record) in due {
            self.count.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                ticket,
                after_secs = after.as_secs(),
                "no receipt from the log writer: the submission is sent again"
            );
            let lost = Box::new(move |delivered: Result<(), String>| {
                if let Err(error) = delivered {
                    tracing::warn!(error, ticket, "a submission sent again was not delivered");
                }
            });
            if let Err(error) = self.sender.send_then(&self.topic, &key, Some(partition), &record, lost) {
                tracing::warn!(%error, ticket, "could not send a submission again");
            }
        }
    }
}

fn read_receipts(
    consumer: &BaseConsumer,
    topic: &str,
    origin: &str,
    waiting: &Waiting,
    stop: &AtomicBool,
    resend: &Resend,
) {
    let mut checked = Instant::now();
    let mut gaps = Gaps::default();
    while !stop.load(Ordering::Relaxed) {
        if checked.elapsed() >= Duration::from_millis(500) {
            resend.due(waiting);
            checked = Instant::now();
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "reading receipts");
                continue;
            }
        };
        if gaps.read_again(consumer, topic, message.partition(), message.offset()) {
            continue;
        }
        if message.key() != Some(origin.as_bytes()) {
            continue;
        }
        match wire::decode_receipt(message.payload().unwrap_or_default()) {
            Ok(record) => {
                let waiter = waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&record.ticket);
                if let Some(Waiter { answer, .. }) = waiter {
                    answer.send(match record.outcome {
                        wire::Outcome::Appended(appended) => Ok(appended),
                        wire::Outcome::Refused(refused) => Err(refused),
                    });
                }
            }
            Err(error) => tracing::warn!(offset = message.offset(), error, "malformed receipt skipped"),
        }
    }
}

impl Drop for KafkaSubmitter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.receipts.take() {
            let _ = thread.join();
        }
    }
}

impl Submitter for KafkaSubmitter {
    fn submit(&self, submission: Submission) -> Result<Receipt, StageError> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        // Shared with the waiter (kept for a resend), not copied.
        let bytes = Arc::new(wire::encode_submission(&self.origin, ticket, &submission).map_err(StageError::Kafka)?);
        let (answer, receipt) = crate::receipt();
        let key = wire::submission_key(&submission);
        let partition = wire::submission_partition(&submission, self.partitions).map_err(StageError::Kafka)?;
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                ticket,
                Waiter {
                    answer,
                    record: Arc::clone(&bytes),
                    key: key.clone(),
                    partition,
                    sent: Instant::now(),
                    resends: 0,
                },
            );
        if let Err(error) = self
            .sender
            .send(&self.config.submissions(), &key, Some(partition), bytes.as_slice())
        {
            self.waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&ticket);
            return Err(error);
        }
        Ok(receipt)
    }

    fn resubmitted(&self) -> u64 {
        self.resubmitted.load(Ordering::Relaxed)
    }

    fn partitions(&self) -> u32 {
        self.partitions.max(1).unsigned_abs()
    }
}

/// Positions read but not yet committed, per partition.
#[derive(Default)]
struct Positions(HashMap<i32, i64>);

impl Positions {
    fn read(&mut self, partition: i32, offset: i64) {
        self.0.insert(partition, offset + 1);
    }

    fn commit(&mut self, consumer: &BaseConsumer, topic: &str, mode: CommitMode) -> Result<(), StageError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (partition, next) in &self.0 {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(kafka)?;
        }
        consumer.commit(&list, mode).map_err(kafka)?;
        self.0.clear();
        Ok(())
    }
}

/// A stage's subscription to the committed topic, in a consumer group.
///
/// What was already on the topic when the subscription got its partitions is the
/// stage's replay: once it has read up to those ends it hands the stage one
/// `Committed::Replayed`, as the embedded writer does at the end of its start-up replay,
/// so a restarted detector holds the findings it recomputes until it has seen which of
/// them are already logged.
pub struct KafkaSubscription {
    consumer: BaseConsumer,
    topic: String,
    positions: Positions,
    /// Per partition: the end at assignment (`None` until the group assigned some).
    ends: Option<HashMap<i32, i64>>,
    /// Per partition: the next offset to read.
    read: HashMap<i32, i64>,
    replayed: bool,
    /// The rest of a run of events read in one record, and where that record is: it
    /// counts as read only once all of it was handed out.
    pending: std::collections::VecDeque<Committed>,
    pending_at: Option<(i32, i64)>,
    gaps: Gaps,
}

impl KafkaSubscription {
    /// Joins `group` on the committed topic. Members of one group share the partitions;
    /// a new group starts from the beginning.
    pub fn new(config: &KafkaConfig, group: &str) -> Result<Self, StageError> {
        let consumer = config.consumer(group)?;
        let topic = config.committed();
        consumer.subscribe(&[&topic]).map_err(kafka)?;
        Ok(Self::reading(consumer, topic))
    }

    /// Partition `partition` only, from the offset `group` committed for it (the topic's
    /// start when none was), outside any group membership: for a stage that owns that
    /// partition's state (`crate::claim`). [`Subscription::ack`] commits as usual.
    pub fn for_partition(config: &KafkaConfig, group: &str, partition: i32) -> Result<Self, StageError> {
        let consumer = config.consumer(group)?;
        let topic = config.committed();
        assign_one(&consumer, &topic, partition)?;
        Ok(Self::reading(consumer, topic))
    }

    /// Every partition from its beginning, outside any group (so no rebalance ever moves
    /// it): for a reader that rebuilds its state from the whole log at each start and
    /// never acknowledges, such as the responder.
    pub fn from_beginning(config: &KafkaConfig) -> Result<Self, StageError> {
        Self::from_beginning_of(config, None)
    }

    /// As [`KafkaSubscription::from_beginning`], of partition `only` alone when given
    /// (a query node's replica of one partition's log, `--log-per-partition`).
    pub fn from_beginning_of(config: &KafkaConfig, only: Option<i32>) -> Result<Self, StageError> {
        let consumer = config.consumer(&format!("{}.reader.{}", config.prefix, origin()))?;
        let topic = config.committed();
        assign_some(&consumer, &topic, only, |_, low, _| Offset::Offset(low))?;
        Ok(Self::reading(consumer, topic))
    }

    /// Every partition from its first record stamped at or after `at_ms` (milliseconds
    /// since the epoch), outside any group: for a reader that has everything before that
    /// from elsewhere (a query node, from the sealed segments in the object store). A
    /// partition without such a record starts at its end; a broker that cannot say
    /// starts it at its beginning. With `only`, partition `only` alone.
    pub fn from_time(config: &KafkaConfig, at_ms: i64, only: Option<i32>) -> Result<Self, StageError> {
        let consumer = config.consumer(&format!("{}.reader.{}", config.prefix, origin()))?;
        let topic = config.committed();
        let mut wanted = TopicPartitionList::new();
        let count = partition_count(consumer.client(), &topic)?;
        for partition in (0..count).filter(|partition| only.is_none_or(|only| only == *partition)) {
            wanted
                .add_partition_offset(&topic, partition, Offset::Offset(at_ms))
                .map_err(kafka)?;
        }
        let found = consumer
            .offsets_for_times(wanted, Duration::from_secs(10))
            .map_err(kafka)?;
        // Some brokers (tansu) answer offset 0 rather than the end when no record is that
        // late: a partition whose last record is older starts at its end.
        // (Its end as seen then: a record that came since is read.)
        let last = last_stamps(config, &topic)?;
        let mut starts = HashMap::new();
        assign_some(&consumer, &topic, only, |partition, low, high| {
            let older = last
                .get(&partition)
                .filter(|(stamp, _)| stamp.is_none_or(|stamp| stamp < at_ms))
                .map(|(_, end)| *end);
            let start = match found.find_partition(&topic, partition).map(|element| element.offset()) {
                _ if older.is_some() => older.unwrap_or(high).clamp(low, high),
                Some(Offset::Offset(offset)) => offset.clamp(low, high),
                Some(Offset::End) => high,
                _ => low,
            };
            starts.insert(partition, start);
            Offset::Offset(start)
        })?;
        let mut subscription = Self::reading(consumer, topic);
        // Where each partition starts, so that the replay ends at the topic's end even
        // when nothing comes after the start.
        subscription.read = starts;
        Ok(subscription)
    }

    fn reading(consumer: BaseConsumer, topic: String) -> Self {
        Self {
            consumer,
            topic,
            positions: Positions::default(),
            ends: None,
            read: HashMap::new(),
            replayed: false,
            pending: std::collections::VecDeque::new(),
            pending_at: None,
            gaps: Gaps::default(),
        }
    }

    /// Once partitions are assigned: their ends, and the committed positions to start at.
    fn learn_ends(&mut self) -> Result<(), StageError> {
        if self.ends.is_some() {
            return Ok(());
        }
        let assignment = self.consumer.assignment().map_err(kafka)?;
        if assignment.count() == 0 {
            return Ok(());
        }
        let committed = self
            .consumer
            .committed_offsets(assignment.clone(), Duration::from_secs(10))
            .map_err(kafka)?;
        let mut ends = HashMap::new();
        for element in assignment.elements() {
            let partition = element.partition();
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                .map_err(kafka)?;
            let start = committed
                .find_partition(&self.topic, partition)
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                })
                .unwrap_or(low);
            ends.insert(partition, high);
            self.read.entry(partition).or_insert(start);
        }
        tracing::info!(topic = self.topic, partitions = ?ends.keys().collect::<Vec<_>>(), "reading partitions");
        self.ends = Some(ends);
        Ok(())
    }

    fn caught_up(&self) -> bool {
        self.ends.as_ref().is_some_and(|ends| {
            ends.iter()
                .all(|(partition, end)| self.read.get(partition).is_some_and(|read| read >= end))
        })
    }

    /// The record at `partition`/`offset` is wholly handed out.
    fn done_with(&mut self, partition: i32, offset: i64) {
        self.positions.read(partition, offset);
        self.read.insert(partition, offset + 1);
    }

    /// The next event of a run already read, if any.
    fn take_pending(&mut self) -> Option<Committed> {
        let record = self.pending.pop_front()?;
        if self.pending.is_empty()
            && let Some((partition, offset)) = self.pending_at.take()
        {
            self.done_with(partition, offset);
        }
        Some(record)
    }

    /// Hands out the end of the replay once, when it is reached.
    fn replay_done(&mut self) -> Result<Option<Committed>, StageError> {
        if self.replayed {
            return Ok(None);
        }
        self.learn_ends()?;
        if self.caught_up() {
            self.replayed = true;
            return Ok(Some(Committed::Replayed { next_index: 0 }));
        }
        Ok(None)
    }
}

impl Subscription for KafkaSubscription {
    fn recv(&mut self, timeout: Duration) -> Result<Option<Committed>, StageError> {
        if let Some(record) = self.take_pending() {
            return Ok(Some(record));
        }
        if let Some(done) = self.replay_done()? {
            return Ok(Some(done));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(message) = self.consumer.poll(left) else {
                return self.replay_done();
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    transient(&error);
                    return Ok(None);
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            if self.gaps.read_again(&self.consumer, &self.topic, partition, offset) {
                continue;
            }
            match wire::decode_committed(message.payload().unwrap_or_default()) {
                Ok(records) => {
                    self.pending = records.into();
                    self.pending_at = Some((partition, offset));
                    match self.take_pending() {
                        Some(record) => return Ok(Some(record)),
                        None => self.done_with(partition, offset),
                    }
                }
                // One bad record never stops the stage: say where it is and go on.
                Err(error) => {
                    self.done_with(partition, offset);
                    tracing::error!(
                        topic = self.topic,
                        partition,
                        offset,
                        error,
                        "malformed committed record skipped"
                    )
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    fn ack(&mut self) -> Result<(), StageError> {
        // A detector acknowledges after a snapshot, rarely: wait for the broker.
        self.positions.commit(&self.consumer, &self.topic, CommitMode::Sync)
    }
}

/// The writer's end: submissions from the submissions topic (group `<prefix>.writer`).
pub struct KafkaIntake {
    consumer: BaseConsumer,
    topic: String,
    receipts: String,
    sender: Sender,
    positions: Positions,
    answered: Arc<Mutex<Answered>>,
    gaps: Gaps,
}

/// The receipts this writer sent last, by (origin, ticket): a submission that comes
/// again (its submitter had no receipt after [`RESEND_AFTER`], or the group delivered it
/// again) is answered with the same receipt, not appended again (which would answer its
/// events `duplicate` where the lost receipt said `accepted`).
#[derive(Default)]
struct Answered {
    receipts: HashMap<(String, u64), Arc<[u8]>>,
    order: std::collections::VecDeque<(String, u64)>,
    bytes: usize,
    /// Submissions handed out and not answered yet: a copy that comes meanwhile (a
    /// resend while an adapter request still runs) is left, as the first one's receipt
    /// will answer its submitter.
    in_flight: std::collections::HashSet<(String, u64)>,
}

/// Takes a submission off [`Answered::in_flight`] when its answer is sent, or dropped
/// unsent (then a copy of it is taken as new).
struct InFlight {
    answered: Arc<Mutex<Answered>>,
    key: (String, u64),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.answered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .in_flight
            .remove(&self.key);
    }
}

/// The receipts [`Answered`] keeps at most, in bytes (a receipt of 256 events is about
/// 20 KiB; this keeps the last few thousand submissions, several seconds at full load).
const ANSWERED_BYTES: usize = 32 << 20;

impl Answered {
    /// Keeps the first receipt of a ticket (a copy read in the same batch as the first,
    /// and so appended again, is answered `duplicate`: that answer is not the one kept).
    fn keep(&mut self, origin: String, ticket: u64, receipt: Arc<[u8]>) {
        let key = (origin, ticket);
        if self.receipts.contains_key(&key) {
            return;
        }
        self.bytes += receipt.len();
        self.receipts.insert(key.clone(), receipt);
        self.order.push_back(key);
        while self.bytes > ANSWERED_BYTES {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(dropped) = self.receipts.remove(&oldest) {
                self.bytes -= dropped.len();
            }
        }
    }
}

impl KafkaIntake {
    pub fn new(config: &KafkaConfig) -> Result<Self, StageError> {
        let consumer = config.consumer(&format!("{}.writer", config.prefix))?;
        let topic = config.submissions();
        consumer.subscribe(&[&topic]).map_err(kafka)?;
        Self::reading(config, consumer, topic)
    }

    /// The writer of one partition's log: reads only `partition`, from the offset the
    /// writer group committed for it (the start of the topic when none was), outside
    /// any group membership. Whoever owns that log (see `docs/architecture.md`) calls
    /// this; offsets are committed as by [`KafkaIntake::new`].
    pub fn for_partition(config: &KafkaConfig, partition: i32) -> Result<Self, StageError> {
        let consumer = config.consumer(&format!("{}.writer", config.prefix))?;
        let topic = config.submissions();
        assign_one(&consumer, &topic, partition)?;
        Self::reading(config, consumer, topic)
    }

    fn reading(config: &KafkaConfig, consumer: BaseConsumer, topic: String) -> Result<Self, StageError> {
        Ok(Self {
            consumer,
            topic,
            receipts: config.receipts(),
            sender: Sender::new(config)?,
            positions: Positions::default(),
            answered: Arc::default(),
            gaps: Gaps::default(),
        })
    }
}

impl Intake for KafkaIntake {
    fn recv(&mut self, timeout: Duration) -> Result<Option<(Submission, Answer)>, StageError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(message) = self.consumer.poll(left) else {
                return Ok(None);
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    transient(&error);
                    return Ok(None);
                }
            };
            if self
                .gaps
                .read_again(&self.consumer, &self.topic, message.partition(), message.offset())
            {
                continue;
            }
            self.positions.read(message.partition(), message.offset());
            match wire::decode_submission(message.payload().unwrap_or_default()) {
                Ok((origin, ticket, submission)) => {
                    let sender = self.sender.clone();
                    let topic = self.receipts.clone();
                    let key = (origin.clone(), ticket);
                    let (again, running) = {
                        let mut answered = self.answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let again = answered.receipts.get(&key).cloned();
                        let running = again.is_none() && !answered.in_flight.insert(key.clone());
                        (again, running)
                    };
                    if running {
                        tracing::warn!(
                            origin,
                            ticket,
                            "a submission came again while the first copy is still being answered: the copy is left"
                        );
                        continue;
                    }
                    if let Some(receipt) = again {
                        tracing::warn!(
                            origin,
                            ticket,
                            "a submission came again after it was answered (its receipt was lost on the way, or \
                             the group delivered it again): the same receipt is sent again"
                        );
                        let sent = sender.send_then(&topic, &origin, None, &receipt, Box::new(|_| ()));
                        if let Err(error) = sent {
                            tracing::warn!(%error, ticket, "could not send a receipt again");
                        }
                        continue;
                    }
                    let answered = self.answered.clone();
                    let in_flight = InFlight {
                        answered: answered.clone(),
                        key,
                    };
                    let answer = Answer::new(move |outcome: Result<crate::Appended, Refused>| {
                        // Off the in-flight set only at the end, once the receipt is kept:
                        // a copy read meanwhile finds one or the other.
                        let _in_flight = in_flight;
                        match wire::encode_receipt(&origin, ticket, outcome) {
                            Ok(bytes) => {
                                let bytes: Arc<[u8]> = Arc::from(bytes);
                                answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keep(
                                    origin.clone(),
                                    ticket,
                                    bytes.clone(),
                                );
                                // A receipt the broker never took is said, not dropped in
                                // silence: its submitter sends the submission again.
                                let lost = Box::new(move |delivered: Result<(), String>| {
                                    if let Err(error) = delivered {
                                        tracing::warn!(
                                            error,
                                            ticket,
                                            "a receipt was not delivered; the submitter times out and resends"
                                        );
                                    }
                                });
                                let sent = sender.send_then(&topic, &origin, None, &bytes, lost);
                                if let Err(error) = sent {
                                    tracing::warn!(%error, ticket, "could not send a receipt; the submitter times out");
                                }
                            }
                            Err(error) => tracing::error!(error, "could not encode a receipt"),
                        }
                    });
                    return Ok(Some((submission, answer)));
                }
                Err(error) => tracing::error!(
                    topic = self.topic,
                    partition = message.partition(),
                    offset = message.offset(),
                    error,
                    "malformed submission skipped"
                ),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    fn ack(&mut self) -> Result<(), StageError> {
        // Asynchronous, and receipts are not flushed first: both only cost a resend when
        // lost (a submitter without a receipt resends; a batch redelivered after a crash
        // is answered from the log), and waiting for them would hold every ingest answer
        // for two more broker round trips.
        self.positions.commit(&self.consumer, &self.topic, CommitMode::Async)
    }
}

/// The writer's end: committed records onto the committed topic.
pub struct KafkaPublisher {
    sender: Sender,
    topic: String,
    /// Events waiting to go as runs, one per agent, in log order within each (sent at
    /// the next flush, or before any other record so every agent's order holds).
    runs: Vec<(String, Vec<custos_event::Observation>)>,
    /// Where each agent's run is in `runs`, and how many events wait in all.
    run_of: HashMap<String, usize>,
    waiting: usize,
    /// The partition this writer owns, when it owns one: its records go there.
    partition: Option<i32>,
    failed: Arc<Mutex<Option<String>>>,
}

impl KafkaPublisher {
    pub fn new(config: &KafkaConfig, partition: Option<i32>) -> Result<Self, StageError> {
        Ok(Self {
            sender: Sender::with_timeout(config, Duration::ZERO)?,
            topic: config.committed(),
            runs: Vec::new(),
            run_of: HashMap::new(),
            waiting: 0,
            partition,
            failed: Arc::default(),
        })
    }
}

/// Events of one agent per committed-topic record at most.
const RUN_LENGTH: usize = 256;

/// A committed-topic record of several events is cut below this many bytes, well under
/// the 1 000 000 bytes a Kafka client sends in one record by default
/// (`message.max.bytes`). One event alone stays under it: with `--kafka` an envelope is
/// at most [`MAX_EVENT_BYTES`].
const RUN_BYTES: usize = 512 * 1024;

/// The largest envelope a node takes with `--kafka` (`--max-event-bytes` may not be
/// set above it): its committed record (the payload parsed and in base64, with the
/// entry) and its submission then fit one broker record.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Events held for runs at most: a writer that never pauses still publishes as it goes.
const MAX_WAITING: usize = 4096;

impl KafkaPublisher {
    fn send(&self, key: &str, bytes: &[u8]) -> Result<(), StageError> {
        let failed = self.failed.clone();
        self.sender.send_then(
            &self.topic,
            key,
            self.partition,
            bytes,
            Box::new(move |outcome| {
                if let Err(error) = outcome {
                    *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
                }
            }),
        )
    }

    /// Sends the waiting runs of events.
    fn send_runs(&mut self) -> Result<(), StageError> {
        self.run_of.clear();
        self.waiting = 0;
        for (agent, observations) in std::mem::take(&mut self.runs) {
            for run in observations.chunks(RUN_LENGTH) {
                self.send_run(&agent, run)?;
            }
        }
        Ok(())
    }

    /// Sends `run` as one record, or in halves while it is larger than [`RUN_BYTES`]
    /// (large events: one record of them all would be refused by the client).
    fn send_run(&self, agent: &str, run: &[custos_event::Observation]) -> Result<(), StageError> {
        let bytes = wire::encode_events(run).map_err(StageError::Kafka)?;
        if bytes.len() > RUN_BYTES && run.len() > 1 {
            let (first, second) = run.split_at(run.len() / 2);
            self.send_run(agent, first)?;
            return self.send_run(agent, second);
        }
        self.send(agent, &bytes)
    }
}

impl Publish for KafkaPublisher {
    fn publish(&mut self, record: Committed) -> Result<(), StageError> {
        if let Committed::Event(observation) = record {
            let agent = &observation.payload.agent;
            match self.run_of.get(agent) {
                Some(&position) => self.runs[position].1.push(*observation),
                None => {
                    self.run_of.insert(agent.clone(), self.runs.len());
                    self.runs.push((agent.clone(), vec![*observation]));
                }
            }
            self.waiting += 1;
            if self.waiting >= MAX_WAITING {
                self.send_runs()?;
            }
            return Ok(());
        }
        self.send_runs()?;
        let bytes = wire::encode_committed(&record).map_err(StageError::Kafka)?;
        self.send(&wire::committed_key(&record), &bytes)
    }

    fn flush(&mut self) -> Result<(), StageError> {
        self.send_runs()?;
        self.sender.flush()?;
        match self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            Some(error) => Err(StageError::Kafka(error)),
            None => Ok(()),
        }
    }
}

/// Publishes the latest state of each subject to the compacted control topic (agent
/// status, revocations, memory quarantine), for ingest nodes and agent platforms.
pub struct ControlPublisher {
    sender: Sender,
    topic: String,
}

impl ControlPublisher {
    pub fn new(config: &KafkaConfig) -> Result<Self, StageError> {
        Ok(Self {
            sender: Sender::with_timeout(config, Duration::ZERO)?,
            topic: config.control(),
        })
    }

    /// Queues the record for `key` (sent in order; see [`ControlPublisher::flush`]).
    pub fn publish(&self, key: &str, value: &[u8]) -> Result<(), StageError> {
        self.sender.send_then(&self.topic, key, None, value, Box::new(|_| {}))
    }

    pub fn flush(&self) -> Result<(), StageError> {
        self.sender.flush()
    }
}

/// How long a lease lasts after its holder's last renewal in the lease topic.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// A lease held by exactly one process of a cluster at a time, decided by the order of
/// one partition's log, which every contender reads alike:
///
/// ```text
///  every contender appends {"holder": its id, "at_ms": its clock} to PREFIX.lease.NAME
///  (1 partition) each second
///  reading in offset order: a record whose time is more than LEASE_TTL after the holder's
///  last record makes its writer the holder; the holder's own records renew it;
///  anyone else's are ignored while it lasts
/// ```
///
/// A contender takes the lease when the log it has read says it holds it with a renewal
/// younger than `LEASE_TTL` less a margin of 2 s (so a standby never starts on a stale
/// view), and gives it up as soon as the log shows another holder. Record times are the
/// writers' clocks: keep them within a second of each other. Consumer groups would elect a holder too, but tansu does not always hand
/// a dead member's partition over, and this needs nothing of the broker but an ordered
/// log.
pub struct Lease {
    consumer: BaseConsumer,
    sender: Sender,
    topic: String,
    id: String,
    last_sent: Option<Instant>,
    log: LeaseLog,
    gaps: Gaps,
}

/// What a contender knows of a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// This process holds it: its last renewal read back is recent.
    Held,
    /// This process held it last, but has read no renewal of its own for a while (the
    /// brokers are away): nobody can take it without the brokers, and nobody can act
    /// without them either (submissions go through them).
    Unsure,
    /// Another process holds it, or nobody yet.
    Other,
}

/// The holder by the lease log read so far, and the time of its last record (ms).
#[derive(Debug, Default)]
pub struct LeaseLog {
    pub holder: Option<(String, i64)>,
    /// The holder's tenure: the time (`at_ms`) of the record that made it the holder. A
    /// later tenure always has a larger one, whoever reads the log and whatever the
    /// clocks: its first record is stamped more than the TTL after the last record of
    /// the tenure before. It survives the lease topic being made again (a recreated
    /// Kafka cluster), which offsets would not.
    pub epoch: Option<u64>,
}

impl LeaseLog {
    /// Takes the next record of the lease log: `holder` wrote it at `at_ms`.
    pub fn apply(&mut self, holder: &str, at_ms: i64) {
        let ttl = LEASE_TTL.as_millis() as i64;
        match &mut self.holder {
            Some((current, last)) if current == holder => *last = (*last).max(at_ms),
            Some((_, last)) if at_ms - *last <= ttl => {}
            _ => {
                self.holder = Some((holder.to_owned(), at_ms));
                self.epoch = Some(at_ms.max(0).unsigned_abs());
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct LeaseRecord {
    holder: String,
    /// When the holder wrote it (ms since the epoch, its clock).
    at_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| now.as_millis() as i64)
}

impl Lease {
    /// Starts contending for lease `name` (topic `PREFIX.lease.<name>`, made by
    /// [`create_topics`]), reading the recent end of its log.
    pub fn join(config: &KafkaConfig, name: &str) -> Result<Self, StageError> {
        let topic = config.lease(name);
        let consumer: BaseConsumer = config
            .client()
            .set("group.id", format!("{topic}.{}", origin()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create()
            .map_err(kafka)?;
        // A few hundred records cover well over LEASE_TTL of history (about one record
        // per contender per second).
        assign_all(&consumer, &topic, |_, low, high| Offset::Offset(low.max(high - 500)))?;
        Ok(Self {
            consumer,
            sender: Sender::new(config)?,
            topic,
            id: origin(),
            last_sent: None,
            log: LeaseLog::default(),
            gaps: Gaps::default(),
        })
    }

    /// This process's tenure (`LeaseLog::epoch`) while the log says it holds the lease:
    /// what its submissions carry so that the writer fences it once another took over.
    pub fn epoch(&self) -> Option<u64> {
        match &self.log.holder {
            Some((holder, _)) if *holder == self.id => self.log.epoch,
            _ => None,
        }
    }

    /// Renews (or claims) once a second, reads what came for up to `timeout`, and answers
    /// whether this process holds the lease now (see [`LeaseState`]). Call it at least
    /// every second.
    pub fn state(&mut self, timeout: Duration) -> LeaseState {
        if self
            .last_sent
            .is_none_or(|sent| sent.elapsed() >= Duration::from_secs(1))
        {
            let record = LeaseRecord {
                holder: self.id.clone(),
                at_ms: now_ms(),
            };
            let record = serde_json::to_vec(&record).unwrap_or_default();
            let queued = self
                .sender
                .send_then(&self.topic, &self.id, Some(0), &record, Box::new(|_| {}));
            if let Err(error) = queued {
                tracing::debug!(%error, "lease: could not renew");
            }
            self.last_sent = Some(Instant::now());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.consumer.poll(left) {
                // Every contender must apply the same records in the same order (a
                // record skipped by one would give it another holder).
                Some(Ok(message))
                    if self
                        .gaps
                        .read_again(&self.consumer, &self.topic, message.partition(), message.offset()) => {}
                Some(Ok(message)) => {
                    if let Ok(record) = serde_json::from_slice::<LeaseRecord>(message.payload().unwrap_or_default()) {
                        self.log.apply(&record.holder, record.at_ms);
                    }
                }
                Some(Err(error)) => tracing::debug!(%error, "lease: waiting for the brokers"),
                None => break,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let now = now_ms();
        let safe = (LEASE_TTL - Duration::from_secs(2)).as_millis() as i64;
        match &self.log.holder {
            Some((holder, last)) if *holder == self.id && now - *last < safe => LeaseState::Held,
            Some((holder, _)) if *holder == self.id => LeaseState::Unsure,
            _ => LeaseState::Other,
        }
    }
}

/// Per partition of `topic`: the timestamp (ms) of its last record (none when it is
/// empty; a record without a timestamp counts as late), and its end then.
fn last_stamps(config: &KafkaConfig, topic: &str) -> Result<HashMap<i32, (Option<i64>, i64)>, StageError> {
    let consumer = config.consumer(&format!("{}.reader.{}", config.prefix, origin()))?;
    let marks = assign_all(&consumer, topic, |_, low, high| Offset::Offset((high - 1).max(low)))?;
    let mut waiting: std::collections::HashSet<i32> = marks
        .iter()
        .filter(|(_, (low, high))| high > low)
        .map(|(partition, _)| *partition)
        .collect();
    let mut stamps: HashMap<i32, (Option<i64>, i64)> = marks
        .iter()
        .map(|(partition, (_, high))| (*partition, (None, *high)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StageError::Kafka(format!(
                "could not read the last record of `{topic}` partitions {waiting:?} within 10 s"
            )));
        }
        match consumer.poll(left) {
            Some(Ok(message)) if waiting.remove(&message.partition()) => {
                if let Some((stamp, _)) = stamps.get_mut(&message.partition()) {
                    *stamp = Some(message.timestamp().to_millis().unwrap_or(i64::MAX));
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(error)) => transient(&error),
        }
    }
    Ok(stamps)
}

/// Assigns every partition of `topic` to `consumer`, each at `start(partition, low,
/// high)` (its watermarks); answers the watermarks.
fn assign_all(
    consumer: &BaseConsumer,
    topic: &str,
    start: impl FnMut(i32, i64, i64) -> Offset,
) -> Result<HashMap<i32, (i64, i64)>, StageError> {
    assign_some(consumer, topic, None, start)
}

/// As [`assign_all`], of partition `only` alone when given (an error when the topic has
/// no such partition).
fn assign_some(
    consumer: &BaseConsumer,
    topic: &str,
    only: Option<i32>,
    mut start: impl FnMut(i32, i64, i64) -> Offset,
) -> Result<HashMap<i32, (i64, i64)>, StageError> {
    let partitions = partition_count(consumer.client(), topic)?;
    if let Some(only) = only.filter(|only| !(0..partitions).contains(only)) {
        return Err(StageError::Kafka(format!(
            "topic `{topic}` has {partitions} partitions; there is no partition {only}"
        )));
    }
    let mut assignment = TopicPartitionList::new();
    let mut marks = HashMap::new();
    for partition in (0..partitions).filter(|partition| only.is_none_or(|only| only == *partition)) {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .map_err(kafka)?;
        marks.insert(partition, (low, high));
        assignment
            .add_partition_offset(topic, partition, start(partition, low, high))
            .map_err(kafka)?;
    }
    consumer.assign(&assignment).map_err(kafka)?;
    Ok(marks)
}

/// How many partitions the submissions topic has: one log each, with
/// `--log-per-partition`.
pub fn submission_partitions(config: &KafkaConfig) -> Result<i32, StageError> {
    let consumer: BaseConsumer = config.client().create().map_err(kafka)?;
    partition_count(consumer.client(), &config.submissions())
}

/// Assigns partition `partition` of `topic` to `consumer`, from the offset its group
/// committed (the topic's start when none was).
fn assign_one(consumer: &BaseConsumer, topic: &str, partition: i32) -> Result<(), StageError> {
    let partitions = partition_count(consumer.client(), topic)?;
    if !(0..partitions).contains(&partition) {
        return Err(StageError::Kafka(format!(
            "topic `{topic}` has {partitions} partitions; there is no partition {partition}"
        )));
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Stored)
        .map_err(kafka)?;
    consumer.assign(&assignment).map_err(kafka)
}

/// How many partitions `topic` has (an error when it does not exist).
fn partition_count<C: ClientContext>(client: &rdkafka::client::Client<C>, topic: &str) -> Result<i32, StageError> {
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka)?;
    let partitions = metadata.topics().first().map_or(0, |topic| topic.partitions().len()) as i32;
    if partitions == 0 {
        return Err(StageError::Kafka(format!(
            "topic `{topic}` has no partitions (create the topics first: a writer does at its start)"
        )));
    }
    Ok(partitions)
}

/// Follows the compacted control topic from its beginning: every subject's latest
/// state, then each change as the writer publishes it. What an ingest node keeps its
/// registry view with, and what an agent platform can read.
pub struct ControlFeed {
    consumer: BaseConsumer,
    topic: String,
    /// Each partition's next offset to read (its start until a record is read).
    next: HashMap<i32, i64>,
    /// Partitions not yet read up to the end they had when the feed opened (or when
    /// [`ControlFeed::mark_end`] was last called).
    behind: HashMap<i32, i64>,
}

impl ControlFeed {
    pub fn open(config: &KafkaConfig) -> Result<Self, StageError> {
        let consumer: BaseConsumer = config
            .client()
            .set("group.id", format!("{}.control-reader.{}", config.prefix, origin()))
            .set("enable.auto.commit", "false")
            // A revocation must reach every ingest node within a second.
            .set("fetch.wait.max.ms", FETCH_WAIT_MS)
            .create()
            .map_err(kafka)?;
        let topic = config.control();
        let marks = assign_all(&consumer, &topic, |_, low, _| Offset::Offset(low))?;
        let next = marks.iter().map(|(partition, (low, _))| (*partition, *low)).collect();
        let behind = marks
            .into_iter()
            .filter(|(_, (low, high))| high > low)
            .map(|(partition, (_, high))| (partition, high))
            .collect();
        Ok(Self {
            consumer,
            topic,
            next,
            behind,
        })
    }

    /// Asks the brokers where each partition ends now: [`ControlFeed::caught_up`] is
    /// false again until the feed has read that far. What a reader uses to be sure it
    /// has seen every record published before a moment (an agent enrolled through
    /// another node, say).
    pub fn mark_end(&mut self, timeout: Duration) -> Result<(), StageError> {
        for (partition, next) in &self.next {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&self.topic, *partition, timeout)
                .map_err(kafka)?;
            if high > *next {
                self.behind.insert(*partition, high);
            }
        }
        Ok(())
    }

    /// The next record (`key`, `value`), waiting up to `timeout`; `None` when none came
    /// (or the brokers are away: the feed reconnects by itself).
    pub fn poll(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        let message = match self.consumer.poll(timeout)? {
            Ok(message) => message,
            Err(error) => {
                transient(&error);
                return None;
            }
        };
        self.next.insert(message.partition(), message.offset() + 1);
        if self
            .behind
            .get(&message.partition())
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            self.behind.remove(&message.partition());
        }
        let key = String::from_utf8_lossy(message.key()?).into_owned();
        Some((key, message.payload().unwrap_or_default().to_vec()))
    }

    /// Whether everything on the topic when the feed opened has been read.
    pub fn caught_up(&self) -> bool {
        self.behind.is_empty()
    }
}

/// Reads the whole control topic once, from the beginning to its current end: the latest
/// record per key. What an ingest node or an agent platform loads at start.
pub fn read_control(config: &KafkaConfig, timeout: Duration) -> Result<HashMap<String, Vec<u8>>, StageError> {
    let mut feed = ControlFeed::open(config)?;
    let mut latest = HashMap::new();
    let deadline = Instant::now() + timeout;
    while !feed.caught_up() {
        if Instant::now() >= deadline {
            return Err(StageError::Kafka(format!(
                "the control topic was not read to its end within {} s",
                timeout.as_secs()
            )));
        }
        if let Some((key, value)) = feed.poll(Duration::from_millis(100)) {
            latest.insert(key, value);
        }
    }
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::{Gaps, READ_AGAIN, Seen};

    /// In order, nothing is read again; the first record of a partition sets where it
    /// starts, and each partition is its own.
    #[test]
    fn records_in_order_are_taken() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.seen(0, 40), Seen::Next);
        assert_eq!(gaps.seen(1, 7), Seen::Next);
        assert_eq!(gaps.seen(0, 41), Seen::Next);
        assert_eq!(gaps.seen(1, 8), Seen::Next);
        // A record read again (a seek, a redelivery) is taken too.
        assert_eq!(gaps.seen(0, 30), Seen::Next);
        assert_eq!(gaps.seen(0, 31), Seen::Next);
    }

    /// A record past offsets not read yet sends the reader back to the first of them;
    /// when they come, everything is taken in order and nothing is said skipped.
    #[test]
    fn a_gap_that_fills_is_read_in_order() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.seen(2, 9), Seen::Next);
        assert_eq!(gaps.seen(2, 12), Seen::ReadAgain(10));
        assert_eq!(gaps.seen(2, 12), Seen::ReadAgain(10));
        assert_eq!(gaps.seen(2, 10), Seen::Next);
        assert_eq!(gaps.seen(2, 11), Seen::Next);
        assert_eq!(gaps.seen(2, 12), Seen::Next);
        // Another gap later starts its own count.
        for _ in 0..READ_AGAIN {
            assert_eq!(gaps.seen(2, 20), Seen::ReadAgain(13));
        }
        assert_eq!(gaps.seen(2, 13), Seen::Next);
        assert_eq!(gaps.seen(2, 14), Seen::Next);
    }

    /// A gap that never fills is given up after READ_AGAIN reads: the record after it is
    /// taken, the skipped range said, and the next gap is read again afresh.
    #[test]
    fn a_gap_that_never_fills_is_given_up() {
        let mut gaps = Gaps::default();
        assert_eq!(gaps.seen(0, 0), Seen::Next);
        for _ in 0..READ_AGAIN {
            assert_eq!(gaps.seen(0, 3), Seen::ReadAgain(1));
        }
        assert_eq!(gaps.seen(0, 3), Seen::Skipped { first: 1, last: 2 });
        assert_eq!(gaps.seen(0, 4), Seen::Next);
        assert_eq!(gaps.seen(0, 6), Seen::ReadAgain(5));
        // The gap moved on when part of it came: its count starts again.
        assert_eq!(gaps.seen(0, 5), Seen::Next);
        assert_eq!(gaps.seen(0, 8), Seen::ReadAgain(6));
    }
}
