//! Where the query API reads from: one log, seen by whatever process holds it.
//!
//! ```text
//!  query routes ──▶ dyn Source ──┬─▶ the log writer (custos_ingest::Api, in the same process)
//!                                └─▶ a query node's replica (custos_ingest::replica: sealed
//!                                    segments from object storage, the tail from Kafka)
//! ```
//!
//! The query crate knows nothing of the writer: the binary hands it a [`Source`] and the
//! token table, so `custos-query` builds on `custos-http` and `custos-store` only.
//!
//! A query node over a partition set (`--log-per-partition`) has one source per
//! partition: [`Logs`] holds them and picks the one each request reads
//! ([`Logs::pick`]), since a log index names an entry only within its partition's log.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use custos_event::Envelope;
use custos_event::agent::AgentRecord;
use custos_http::ApiError;
use custos_store::forensics::RejectedRecord;
use custos_store::{CheckpointView, EvidenceProofs, StoreView};

/// A source's answer, later.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, ApiError>> + Send + 'a>>;

/// What the query routes read. Every method is a read; [`Source::sign`] signs a bundle
/// manifest with the node key and writes nothing to the log.
pub trait Source: Send + Sync + 'static {
    /// The node's data directory: the access log and the last verification live there,
    /// and a partitioned store is found from it.
    fn data(&self) -> &Path;
    /// The store on disk `POST /v1/integrity/verify` checks: the data directory itself
    /// on a writer, the local copy of the sealed store on a query node.
    fn store_dir(&self) -> &Path {
        self.data()
    }
    /// The sealed segments and the unsealed tail, at one instant.
    fn view(&self) -> Pending<'_, StoreView>;
    /// Every enrolled agent.
    fn agents(&self) -> Pending<'_, Vec<AgentRecord>>;
    /// Kept rejected inputs, newest first, at most `limit`, of `reason` when given.
    fn rejected(&self, reason: Option<String>, limit: usize) -> Pending<'_, Vec<RejectedRecord>>;
    /// The latest signed checkpoint.
    fn checkpoint(&self) -> Pending<'_, CheckpointView>;
    /// A consistency proof between two tree sizes (JSON as `GET /v1/proofs/consistency`).
    fn consistency(&self, from: u64, to: u64) -> Pending<'_, serde_json::Value>;
    /// Signs a checkpoint if needed and proves `indexes` against it.
    fn evidence_proofs(&self, indexes: Vec<u64>) -> Pending<'_, EvidenceProofs>;
    /// Signs `bytes` as `payload_type` with the node key.
    fn sign(&self, payload_type: &'static str, bytes: Vec<u8>) -> Pending<'_, Envelope>;
}

/// The header a caller names a partition with, on a node over a partition set; the
/// answer carries it back, saying which partition's log answered.
pub const PARTITION_HEADER: &str = "x-custos-partition";

/// A log and, on a partition set, its partition.
pub type PartitionLog = (Option<u32>, Arc<dyn Source>);

/// The logs a node's query routes read: one, or one per partition of a partition set.
pub struct Logs {
    /// The node's data directory (the access log, the last verification).
    data: PathBuf,
    /// The store (or the partition set) `POST /v1/integrity/verify` checks.
    store: PathBuf,
    /// One source, or the partitions' in partition order.
    parts: Vec<Arc<dyn Source>>,
    set: bool,
}

impl Logs {
    /// A node with one log.
    pub fn one(source: Arc<dyn Source>) -> Self {
        Self {
            data: source.data().to_path_buf(),
            store: source.store_dir().to_path_buf(),
            parts: vec![source],
            set: false,
        }
    }

    /// A node over a partition set: `parts[p]` reads partition `p`'s log; `store` holds
    /// the whole set.
    pub fn partitions(data: PathBuf, store: PathBuf, parts: Vec<Arc<dyn Source>>) -> Self {
        Self {
            data,
            store,
            parts,
            set: true,
        }
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// How many partitions' logs there are, on a node over a partition set.
    pub fn partition_count(&self) -> Option<u32> {
        self.set.then_some(self.parts.len() as u32)
    }

    /// The log a request reads, and its partition on a partition set. In order: the
    /// partition the request names (`named`, from [`PARTITION_HEADER`]), the partition
    /// of the realm it asks about (`realm`), the one partition holding every realm the
    /// caller is limited to. Anything else is ambiguous and refused with
    /// `partition_required`: an answer merged from several logs would have cursors
    /// (log indexes) that mean nothing.
    pub fn pick(
        &self,
        named: Option<&str>,
        realm: Option<&str>,
        caller_realms: &[String],
    ) -> Result<(Option<u32>, Arc<dyn Source>), ApiError> {
        if !self.set {
            return Ok((None, self.parts[0].clone()));
        }
        let count = self.parts.len() as u32;
        let partition = if let Some(named) = named {
            named
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|partition| *partition < count)
                .ok_or_else(|| {
                    ApiError::new(
                        400,
                        "bad_partition",
                        format!(
                            "{PARTITION_HEADER} `{}` is not a partition of this set: give 0 to {}",
                            named.chars().take(32).collect::<String>(),
                            count - 1
                        ),
                    )
                })?
        } else if let Some(realm) = realm.filter(|realm| !realm.is_empty()) {
            custos_event::partition_of(realm, count)
        } else {
            let mut partitions = caller_realms
                .iter()
                .map(|realm| custos_event::partition_of(realm, count));
            match (partitions.next(), count) {
                (_, 1) => 0,
                (Some(first), _) if partitions.all(|partition| partition == first) => first,
                _ => {
                    return Err(ApiError::new(
                        400,
                        "partition_required",
                        format!(
                            "this node serves a partition set of {count} logs (one per partition, each with its own log \
                             indexes); name one with the {PARTITION_HEADER} header (0 to {}) or ask about one realm",
                            count - 1
                        ),
                    ));
                }
            }
        };
        Ok((Some(partition), self.parts[partition as usize].clone()))
    }

    /// The logs a SQL query reads, with their partitions on a partition set: the one the
    /// request names (`named`), else every partition holding one of the caller's realms
    /// (every partition for a caller limited to none). A SQL answer needs no cursor, so
    /// it may span partitions: its rows say whose log they came from (`partition`).
    pub fn spanned(&self, named: Option<&str>, caller_realms: &[String]) -> Result<Vec<PartitionLog>, ApiError> {
        if !self.set || named.is_some() {
            return Ok(vec![self.pick(named, None, caller_realms)?]);
        }
        let count = self.parts.len() as u32;
        let mut partitions: Vec<u32> = if caller_realms.is_empty() {
            (0..count).collect()
        } else {
            caller_realms
                .iter()
                .map(|realm| custos_event::partition_of(realm, count))
                .collect()
        };
        partitions.sort_unstable();
        partitions.dedup();
        Ok(partitions
            .into_iter()
            .map(|partition| (Some(partition), self.parts[partition as usize].clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that only knows its directory: `pick` is tested on which one it hands out.
    struct Numbered(PathBuf);

    impl Source for Numbered {
        fn data(&self) -> &Path {
            &self.0
        }
        fn view(&self) -> Pending<'_, StoreView> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
        fn agents(&self) -> Pending<'_, Vec<AgentRecord>> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
        fn rejected(&self, _: Option<String>, _: usize) -> Pending<'_, Vec<RejectedRecord>> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
        fn checkpoint(&self) -> Pending<'_, CheckpointView> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
        fn consistency(&self, _: u64, _: u64) -> Pending<'_, serde_json::Value> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
        fn evidence_proofs(&self, _: Vec<u64>) -> Pending<'_, EvidenceProofs> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
        fn sign(&self, _: &'static str, _: Vec<u8>) -> Pending<'_, Envelope> {
            Box::pin(async { Err(ApiError::new(500, "unused", "unused")) })
        }
    }

    fn set(count: u32) -> Logs {
        let parts = (0..count)
            .map(|n| Arc::new(Numbered(PathBuf::from(format!("/p/{n}")))) as Arc<dyn Source>)
            .collect();
        Logs::partitions("/node".into(), "/node/replica".into(), parts)
    }

    /// Which partition `pick` chose, and that it handed out that partition's log.
    fn chosen(logs: &Logs, named: Option<&str>, realm: Option<&str>, realms: &[&str]) -> Result<u32, String> {
        let realms: Vec<String> = realms.iter().map(|realm| (*realm).to_owned()).collect();
        match logs.pick(named, realm, &realms) {
            Ok((Some(partition), source)) => {
                assert_eq!(source.data(), Path::new(&format!("/p/{partition}")));
                Ok(partition)
            }
            Ok((None, _)) => Err("no partition".into()),
            Err(error) => Err(format!("{} {}: {}", error.status, error.error, error.message)),
        }
    }

    /// A realm on partition `partition` of `count`.
    fn realm_on(partition: u32, count: u32) -> String {
        (0..)
            .map(|n| format!("realm-{n}"))
            .find(|realm| custos_event::partition_of(realm, count) == partition)
            .unwrap()
    }

    #[test]
    fn a_named_partition_wins_then_the_realm_then_the_callers_realms() {
        let logs = set(3);
        let (zero, one, two) = (realm_on(0, 3), realm_on(1, 3), realm_on(2, 3));
        assert_eq!(chosen(&logs, Some("2"), Some(&zero), &[&one]), Ok(2));
        assert_eq!(chosen(&logs, Some(" 1 "), None, &[]), Ok(1));
        assert_eq!(chosen(&logs, None, Some(&two), &[&one]), Ok(2));
        assert_eq!(chosen(&logs, None, Some(""), &[&one]), Ok(1));
        assert_eq!(chosen(&logs, None, None, &[&one]), Ok(1));
        // Two realms on one partition are still one partition.
        let also_one = (0..)
            .map(|n| format!("other-{n}"))
            .find(|realm| custos_event::partition_of(realm, 3) == 1)
            .unwrap();
        assert_eq!(chosen(&logs, None, None, &[&one, &also_one]), Ok(1));
    }

    #[test]
    fn an_ambiguous_or_bad_partition_is_refused_with_a_reason() {
        let logs = set(3);
        let (zero, one) = (realm_on(0, 3), realm_on(1, 3));
        let unscoped = chosen(&logs, None, None, &[]).unwrap_err();
        assert!(unscoped.starts_with("400 partition_required"), "{unscoped}");
        assert!(
            unscoped.contains("x-custos-partition") && unscoped.contains("0 to 2"),
            "{unscoped}"
        );
        let spread = chosen(&logs, None, None, &[&zero, &one]).unwrap_err();
        assert!(spread.starts_with("400 partition_required"), "{spread}");
        for bad in ["3", "-1", "one", "", "99999999999999999999"] {
            let refused = chosen(&logs, Some(bad), None, &[]).unwrap_err();
            assert!(refused.starts_with("400 bad_partition"), "{bad}: {refused}");
        }
        let long = "9".repeat(500);
        let refused = chosen(&logs, Some(&long), None, &[]).unwrap_err();
        assert!(refused.len() < 200, "the echoed value is cut: {refused}");
    }

    /// The partitions `spanned` chose, checking it handed out each one's log.
    fn spanned(logs: &Logs, named: Option<&str>, realms: &[&str]) -> Result<Vec<Option<u32>>, String> {
        let realms: Vec<String> = realms.iter().map(|realm| (*realm).to_owned()).collect();
        let spanned = logs
            .spanned(named, &realms)
            .map_err(|error| format!("{} {}: {}", error.status, error.error, error.message))?;
        for (partition, source) in &spanned {
            if let Some(partition) = partition {
                assert_eq!(source.data(), Path::new(&format!("/p/{partition}")));
            }
        }
        Ok(spanned.into_iter().map(|(partition, _)| partition).collect())
    }

    #[test]
    fn sql_spans_the_partitions_of_the_callers_realms_unless_one_is_named() {
        let logs = set(3);
        let (zero, two) = (realm_on(0, 3), realm_on(2, 3));
        assert_eq!(spanned(&logs, None, &[]), Ok(vec![Some(0), Some(1), Some(2)]));
        assert_eq!(spanned(&logs, None, &[&two, &zero, &two]), Ok(vec![Some(0), Some(2)]));
        assert_eq!(spanned(&logs, None, &[&two]), Ok(vec![Some(2)]));
        assert_eq!(spanned(&logs, Some("1"), &[&two]), Ok(vec![Some(1)]));
        let refused = spanned(&logs, Some("3"), &[]).unwrap_err();
        assert!(refused.starts_with("400 bad_partition"), "{refused}");
        let one = Logs::one(Arc::new(Numbered(PathBuf::from("/writer"))));
        assert_eq!(spanned(&one, Some("7"), &[]), Ok(vec![None]));
        assert_eq!(spanned(&one, None, &[&zero, &two]), Ok(vec![None]));
    }

    #[test]
    fn one_partition_or_one_log_needs_no_choice() {
        assert_eq!(chosen(&set(1), None, None, &[]), Ok(0));
        let one = Logs::one(Arc::new(Numbered(PathBuf::from("/writer"))));
        let (partition, source) = one.pick(Some("7"), Some("any"), &[]).unwrap();
        assert_eq!(partition, None, "a node with one log ignores the header");
        assert_eq!(source.data(), Path::new("/writer"));
        assert_eq!(one.partition_count(), None);
        assert_eq!(set(3).partition_count(), Some(3));
    }
}
