//! The node's Prometheus metrics, in the process-wide default registry and served at
//! `GET /metrics`. Every label takes values from a closed set (statuses, reason codes,
//! severities, action names and statuses, route names), so series stay bounded whatever
//! agents send. Names are listed in `docs/metrics.md`; `dashboards/` panels query them.

use std::sync::LazyLock;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, core::Collector};

fn register<T: Collector + Clone + 'static>(metric: T) -> T {
    // A name registered twice is a programming error caught by the metrics test.
    prometheus::default_registry()
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// Latency buckets from 50 µs to 10 s.
fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_05, 2.5, 14).expect("valid buckets")
}

/// Envelopes ingested, by `status`: accepted, duplicate, rejected.
pub static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("custos_ingest_events_total", "Envelopes ingested, by outcome"),
            &["status"],
        )
        .expect("valid metric"),
    )
});

/// Rejected inputs, by stable reason code (docs/reason-codes.md).
pub static REJECTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("custos_ingest_rejects_total", "Rejected inputs, by reason code"),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

/// Time to decode and verify the signatures of one request's envelopes.
pub static VERIFY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "custos_ingest_verify_seconds",
                "Decode and ed25519 batch verification of one request's envelopes",
            )
            .buckets(buckets()),
        )
        .expect("valid metric"),
    )
});

/// Time to write one group of entries to the WAL and fsync it.
pub static WAL_FSYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "custos_wal_fsync_seconds",
                "WAL group commit: write and fsync of one group of entries",
            )
            .buckets(buckets()),
        )
        .expect("valid metric"),
    )
});

/// An ingest node's hand-over to the log writer, by `step`: `submit` (until the broker
/// acknowledged the submission) and `receipt` (from then until the writer's durable
/// answer arrived).
pub static WRITER_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "custos_ingest_writer_seconds",
                "An ingest node's hand-over of one submission to the log writer, by step",
            )
            .buckets(buckets()),
            &["step"],
        )
        .expect("valid metric"),
    )
});

/// Events an ingest node passed on as verified whose signature did not verify when a
/// writer with `--verify-submissions` checked it again: something that can write the
/// submissions topic is sending events in agents' names.
pub static FORGED: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "custos_writer_forged_total",
            "Events an ingest node passed on as verified whose signature did not verify on the writer (--verify-submissions)",
        )
        .expect("valid metric"),
    )
});

/// Submissions an ingest node sent to the log writer again because their receipt was
/// late (`custos_stage::kafka::RESEND_AFTER`): each is a request that waited seconds.
pub static RESUBMITTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "custos_ingest_resubmitted_total",
            "Submissions an ingest node sent to the log writer again for a late receipt",
        )
        .expect("valid metric"),
    )
});

/// A writer bridged to Kafka: enrollments and revocations (and LastID enrollments)
/// answered once their control record was on the brokers, by whether that happened
/// within `PUBLISH_WAIT` (docs/architecture.md).
pub static CONTROL_WAITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_writer_control_waits_total",
                "Registry changes a writer bridged to Kafka answered once their control record was on the brokers, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// An ingest node's reads of the control topic to its end, asked for by a request that
/// named an agent the node did not know (docs/architecture.md), by whether the read
/// finished within its second.
pub static CATCH_UPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_ingest_catch_ups_total",
                "Reads of the control topic to its end an ingest node's requests waited on, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// Entries in the Merkle log.
pub static TREE_SIZE: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new("custos_log_tree_size", "Entries in the Merkle log").expect("valid metric"))
});

/// Size of the latest signed checkpoint.
pub static CHECKPOINT_SIZE: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new("custos_checkpoint_size", "Tree size of the latest signed checkpoint").expect("valid metric"),
    )
});

/// Seconds since the latest checkpoint was signed (or confirmed current).
pub static CHECKPOINT_AGE: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    register(
        prometheus::Gauge::new(
            "custos_checkpoint_age_seconds",
            "Seconds since the latest checkpoint was signed",
        )
        .expect("valid metric"),
    )
});

/// Seconds between the node receiving an event and the detector scoring it.
pub static DETECTOR_LAG: LazyLock<prometheus::Gauge> = LazyLock::new(|| {
    register(
        prometheus::Gauge::new(
            "custos_detector_lag_seconds",
            "Seconds between ingest of the last event the detector scored and its scoring",
        )
        .expect("valid metric"),
    )
});

/// Findings signed into the log, by severity.
pub static FINDINGS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("custos_findings_total", "Findings signed into the log, by severity"),
            &["severity"],
        )
        .expect("valid metric"),
    )
});

/// Response action records, by action and status.
pub static ACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("custos_actions_total", "Response action records, by action and status"),
            &["action", "status"],
        )
        .expect("valid metric"),
    )
});

/// Approvals waiting for a human.
pub static PENDING_APPROVALS: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new("custos_approvals_pending", "Approvals waiting for a decision").expect("valid metric"))
});

/// Query API latency, by route pattern and HTTP status.
pub static QUERY_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new("custos_query_seconds", "Query API latency, by route and HTTP status")
                .buckets(buckets()),
            &["route", "status"],
        )
        .expect("valid metric"),
    )
});

/// Store problems, by `step`: `append` (a WAL group failed; writes are refused until the
/// store takes one again), `maintenance` (a seal or checkpoint failed, retried) or
/// `audit` (a sealed segment found altered by the background check after start).
pub static STORE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("custos_store_errors_total", "Store writes that failed, by step"),
            &["step"],
        )
        .expect("valid metric"),
    )
});

/// Open HTTP connections.
pub static HTTP_CONNECTIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new("custos_http_connections", "Open HTTP connections").expect("valid metric"))
});

/// Connections refused at accept, by `reason`: `limit` (every slot taken: answered 503)
/// or `accept_error` (no descriptor left, say).
pub static HTTP_CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_http_connections_refused_total",
                "Connections refused at accept, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

/// Connections the node closed, by `reason`: `idle` (no byte moved for the idle
/// timeout) or `slow_body` (a body not sent within the body timeout).
pub static HTTP_CONNECTIONS_CLOSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_http_connections_closed_total",
                "Connections the node closed, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric"),
    )
});

/// Requests answered 503 because request bodies in flight filled the body budget.
pub static HTTP_BODIES_REFUSED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "custos_http_bodies_refused_total",
            "Requests answered 503: bodies in flight filled the body budget",
        )
        .expect("valid metric"),
    )
});

/// `POST /v1/events` requests answered 429: their source spent its budget of
/// unauthenticated rejections.
pub static OTLP_SPANS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_otlp_spans_total",
                "Spans received on POST /v1/traces, by outcome: stored, duplicate (attested before), rejected, ignored (not GenAI)",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

pub static ADAPTER_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_adapter_errors_total",
                "Failed calls of a platform adapter to its platform (the VaultysClaw audit pull), by adapter",
            ),
            &["adapter"],
        )
        .expect("valid metric"),
    )
});

pub static RATE_LIMITED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "custos_ingest_rate_limited_total",
            "Ingest requests answered 429: the source sent too much unauthenticated input",
        )
        .expect("valid metric"),
    )
});

/// Queries answered 429: every slot overall, or every slot of the token, was taken.
pub static QUERIES_REFUSED: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
    register(
        prometheus::IntCounter::new(
            "custos_query_refused_total",
            "Queries answered 429: the node or the token had every query slot taken",
        )
        .expect("valid metric"),
    )
});

/// Witness submission rounds, by `outcome`: `cosigned`, `failed` (unreachable or
/// refused; retried) or `behind` (the witness saw more than this log holds).
pub static WITNESS_ROUNDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "custos_witness_rounds_total",
                "Checkpoint submissions to witnesses, by outcome",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// Forces every metric into the registry, so each is exported (at zero) from the start.
pub fn init() {
    LazyLock::force(&EVENTS);
    LazyLock::force(&REJECTS);
    LazyLock::force(&VERIFY_SECONDS);
    LazyLock::force(&WAL_FSYNC_SECONDS);
    for step in ["submit", "receipt"] {
        WRITER_SECONDS.with_label_values(&[step]);
    }
    LazyLock::force(&RESUBMITTED);
    LazyLock::force(&CATCH_UPS);
    LazyLock::force(&CONTROL_WAITS);
    LazyLock::force(&FORGED);
    LazyLock::force(&TREE_SIZE);
    LazyLock::force(&CHECKPOINT_SIZE);
    LazyLock::force(&CHECKPOINT_AGE);
    LazyLock::force(&DETECTOR_LAG);
    LazyLock::force(&FINDINGS);
    LazyLock::force(&ACTIONS);
    LazyLock::force(&PENDING_APPROVALS);
    LazyLock::force(&QUERY_SECONDS);
    LazyLock::force(&STORE_ERRORS);
    LazyLock::force(&HTTP_CONNECTIONS);
    LazyLock::force(&HTTP_CONNECTIONS_REFUSED);
    LazyLock::force(&HTTP_CONNECTIONS_CLOSED);
    LazyLock::force(&HTTP_BODIES_REFUSED);
    LazyLock::force(&RATE_LIMITED);
    LazyLock::force(&QUERIES_REFUSED);
    LazyLock::force(&WITNESS_ROUNDS);
    for outcome in ["cosigned", "failed", "behind"] {
        WITNESS_ROUNDS.with_label_values(&[outcome]);
    }
    for reason in ["limit", "accept_error"] {
        HTTP_CONNECTIONS_REFUSED.with_label_values(&[reason]);
    }
    for reason in ["idle", "slow_body"] {
        HTTP_CONNECTIONS_CLOSED.with_label_values(&[reason]);
    }
    for step in ["append", "maintenance", "audit"] {
        STORE_ERRORS.with_label_values(&[step]);
    }
    for status in ["accepted", "duplicate", "rejected"] {
        EVENTS.with_label_values(&[status]);
    }
    for severity in ["low", "medium", "high", "critical"] {
        FINDINGS.with_label_values(&[severity]);
    }
    for outcome in ["stored", "duplicate", "rejected", "ignored"] {
        OTLP_SPANS.with_label_values(&[outcome]);
    }
}

/// The text exposition of every registered metric.
pub fn render() -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&prometheus::gather())
        .unwrap_or_else(|error| format!("# encoding metrics failed: {error}\n"))
}
