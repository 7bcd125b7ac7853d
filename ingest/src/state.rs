//! The writer's state, loaded from the store: at start, and again in place after a write
//! failed (the registry had already taken in the group that never reached the disk).
//!
//! ```text
//!  segments + WAL ──Log::open──▶ every entry in order ──fold──▶ registry, node chain
//!                                       └──▶ the detector feed (events from `replay_from`,
//!                                            every finding and action record)
//! ```

use chrono::Utc;
use custos_event::{
    ACTION_PAYLOAD_TYPE, AgentKey, CONTROL_PAYLOAD_TYPE, ChainState, EVENT_PAYLOAD_TYPE, FINDING_PAYLOAD_TYPE, Feed,
    Observation, Payload, Signal,
};
use custos_store::{Log, LogEntry};

use crate::registry::{ControlPayload, Registry};
use crate::{FeedSink, NodeConfig, NodeError};

/// The log and what is folded from it.
pub(crate) struct Loaded {
    pub(crate) log: Log,
    pub(crate) registry: Registry,
    pub(crate) node_chain: ChainState,
}

/// Opens the log (recovering from the WAL) and folds the registry and the node's control
/// chain from it; hands `feed` the events from `replay_from` and every finding and action.
pub(crate) fn load(
    config: &NodeConfig,
    node_key: &AgentKey,
    feed: Option<&FeedSink>,
    replay_from: u64,
) -> Result<Loaded, NodeError> {
    let info = custos_store::StoreInfo::open(&config.data, true)?;
    let mut registry = Registry::new(config.chain_window);
    // Events in sealed segments need not stay in memory while the log is folded.
    let manifest = custos_store::LogPaths::new(&config.data, custos_store::DEFAULT_LOG_ID).manifest;
    registry.sealed_end = custos_store::log::read_ndjson::<custos_store::log::SegmentInfo>(&manifest)
        .ok()
        .and_then(|lines| lines.last().map(|line| line.end_index))
        .unwrap_or(0);
    let mut node_chain = ChainState::default();
    let node_did = node_key.did().to_owned();
    let mut fold = |entry: &LogEntry| {
        let payload = fold_entry(entry, &node_did, &mut registry, &mut node_chain);
        let Some(feed) = feed else { return };
        match (payload, entry.payload_type.as_str()) {
            (Some(payload), _) if entry.log_index >= replay_from => feed(Feed::Event(Box::new(Observation {
                log_index: Some(entry.log_index),
                ingest_ts: chrono::TimeZone::timestamp_micros(&Utc, entry.ingest_ts_us)
                    .single()
                    .unwrap_or_default(),
                payload,
                signal: Signal::Accepted { gap: entry.gap },
            }))),
            (None, FINDING_PAYLOAD_TYPE) => feed(Feed::Finding {
                log_index: entry.log_index,
                payload: entry.payload.clone(),
            }),
            (None, ACTION_PAYLOAD_TYPE) => feed(Feed::Action {
                log_index: entry.log_index,
                payload: entry.payload.clone(),
            }),
            _ => {}
        }
    };
    let log = Log::open(
        &config.data,
        &info.store_id,
        custos_store::DEFAULT_LOG_ID,
        config.log.clone(),
        custos_store::OpenMode::ReadWrite,
        &mut fold,
    )?;
    if let Some(feed) = feed {
        feed(Feed::Replayed {
            next_index: log.next_index(),
        });
    }
    registry.prune(log.sealed_end());
    tracing::info!(
        entries = log.next_index(),
        agents = registry.agents.len(),
        "store recovered"
    );
    Ok(Loaded {
        log,
        registry,
        node_chain,
    })
}

/// Rebuilds state from one stored entry; returns an event's parsed payload.
fn fold_entry(
    entry: &LogEntry,
    node_did: &str,
    registry: &mut Registry,
    node_chain: &mut ChainState,
) -> Option<Payload> {
    if entry.payload_type == CONTROL_PAYLOAD_TYPE {
        if entry.keyid != node_did {
            tracing::warn!(
                log_index = entry.log_index,
                "ignoring a control entry not signed by this node's key"
            );
            return None;
        }
        match serde_json::from_slice::<ControlPayload>(&entry.payload) {
            Ok(control) => {
                registry.apply_control(&control, entry.log_index);
                node_chain.next_seq = control.seq + 1;
                node_chain.prev = Some(custos_event::blake3_hex(&entry.payload));
            }
            Err(error) => tracing::warn!(log_index = entry.log_index, %error, "unreadable control entry"),
        }
    } else if entry.payload_type == EVENT_PAYLOAD_TYPE {
        match Payload::parse(&entry.payload) {
            Ok(payload) => {
                registry.apply_event(
                    &payload.agent,
                    payload.seq,
                    entry.payload_blake3,
                    entry.log_index,
                    payload.ts,
                );
                return Some(payload);
            }
            Err(error) => tracing::warn!(log_index = entry.log_index, %error, "unreadable event entry"),
        }
    }
    None
}
