//! Sigma rules (v2, with correlations), evaluated by `rsigma-eval`.
//!
//! Every observation is flattened to a JSON object: the payload fields, `attrs` nested
//! as given, `product: ai_agent`, and a `custos` object with what ingest and enrichment
//! know (`signal`, `log_index`, `credential_owner_match`, `delegation_escalates`).
//! Rules state `logsource: {product: ai_agent, category: <kind>}` for readers and tools,
//! and select on `kind` in their detection too, since the evaluator applies every rule to
//! every event.

use std::path::Path;

use custos_event::Observation;
use rsigma_eval::event::JsonEvent;
use rsigma_eval::{CorrelationConfig, CorrelationEngine};

/// Correlation windows (one per rule and group key: agent, session, tool) kept at once,
/// across all correlation rules. Past it the engine evicts the stalest tenth, so a
/// half-finished correlation can be forgotten: the evaluator's default (100 000) was hit
/// at 100 000 agents by `custos bench detect`; this allows a few per agent at 200 000.
pub const MAX_CORRELATION_STATE: usize = 1_000_000;
use rsigma_parser::SigmaCollection;
use serde_json::{Value, json};

/// The rule pack shipped in `detect/rules/`, compiled into the binary.
pub const PACK: [(&str, &str); 5] = [
    ("credentials.yml", include_str!("../rules/credentials.yml")),
    ("delegation.yml", include_str!("../rules/delegation.yml")),
    ("exfiltration.yml", include_str!("../rules/exfiltration.yml")),
    ("integrity.yml", include_str!("../rules/integrity.yml")),
    ("memory.yml", include_str!("../rules/memory.yml")),
];

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("rule file `{file}`: {message}")]
    Parse { file: String, message: String },
    #[error("cannot read rules from `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
}

/// A rule that matched.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleHit {
    pub rule_id: String,
    pub title: String,
    /// `informational`, `low`, `medium`, `high` or `critical`.
    pub level: String,
    pub tags: Vec<String>,
    pub correlation: bool,
    /// For a correlation: the log indexes of the events it matched (the building-block
    /// hits in its window, up to [`MAX_CORRELATION_EVENTS`]).
    pub events: Vec<u64>,
}

/// Matched events a correlation keeps per window and group, for its evidence.
pub const MAX_CORRELATION_EVENTS: usize = 64;

/// The compiled rules and their correlation state.
pub struct Rules {
    engine: CorrelationEngine,
    pub count: usize,
}

fn parse(file: &str, text: &str) -> Result<SigmaCollection, RuleError> {
    let collection = rsigma_parser::parse_sigma_yaml(text).map_err(|error| RuleError::Parse {
        file: file.to_owned(),
        message: error.to_string(),
    })?;
    if collection.has_errors() {
        return Err(RuleError::Parse {
            file: file.to_owned(),
            message: format!("{:?}", collection.errors),
        });
    }
    Ok(collection)
}

impl Rules {
    /// The shipped pack plus every `*.yml`/`*.yaml` file in `extra` directories (operator
    /// rules and filters: a Sigma `filter` document adds an exception to a rule without
    /// editing it).
    pub fn load(extra: &[&Path]) -> Result<Self, RuleError> {
        let mut all = SigmaCollection::default();
        for (file, text) in PACK {
            merge(&mut all, parse(file, text)?);
        }
        for dir in extra {
            let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
                .map_err(|source| RuleError::Io {
                    path: dir.display().to_string(),
                    source,
                })?
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "yml" || ext == "yaml"))
                .collect();
            files.sort();
            for path in files {
                let text = std::fs::read_to_string(&path).map_err(|source| RuleError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                merge(&mut all, parse(&path.display().to_string(), &text)?);
            }
        }
        Self::compile(&all)
    }

    /// Compiles rules from YAML text alone (no shipped pack): for tests and tools.
    pub fn from_yaml(text: &str) -> Result<Self, RuleError> {
        Self::compile(&parse("<inline>", text)?)
    }

    fn compile(collection: &SigmaCollection) -> Result<Self, RuleError> {
        let mut engine = CorrelationEngine::new(CorrelationConfig {
            timestamp_fields: vec!["ts".into()],
            max_state_entries: MAX_CORRELATION_STATE,
            correlation_event_mode: rsigma_eval::CorrelationEventMode::Refs,
            max_correlation_events: MAX_CORRELATION_EVENTS,
            ..CorrelationConfig::default()
        });
        engine.add_collection(collection).map_err(|error| RuleError::Parse {
            file: "<collection>".into(),
            message: error.to_string(),
        })?;
        Ok(Self {
            engine,
            count: collection.rules.len() + collection.correlations.len(),
        })
    }

    /// Evaluates one observation at its own event time.
    pub fn process(&mut self, observation: &Observation) -> Vec<RuleHit> {
        let flat = flatten(observation);
        let event = JsonEvent::borrow(&flat);
        let results = self.engine.process_event_at(&event, observation.payload.ts.timestamp());
        results
            .iter()
            .map(|result| RuleHit {
                rule_id: result
                    .header
                    .rule_id
                    .clone()
                    .unwrap_or_else(|| result.header.rule_title.clone()),
                title: result.header.rule_title.clone(),
                level: result
                    .header
                    .level
                    .map_or("medium".into(), |level| format!("{level:?}").to_ascii_lowercase()),
                tags: result.header.tags.clone(),
                correlation: result.is_correlation(),
                events: match &result.body {
                    rsigma_eval::ResultBody::Correlation(body) => body
                        .event_refs
                        .iter()
                        .flatten()
                        .filter_map(|reference| reference.id.as_deref()?.parse().ok())
                        .collect(),
                    rsigma_eval::ResultBody::Detection(_) => Vec::new(),
                },
            })
            .filter(|hit| hit.level != "informational")
            .collect()
    }

    /// The correlation windows, for the detector snapshot.
    pub fn export_state(&self) -> Value {
        serde_json::to_value(self.engine.export_state()).unwrap_or(Value::Null)
    }

    /// Restores correlation windows; false when the snapshot does not fit these rules.
    pub fn import_state(&mut self, state: Value) -> bool {
        serde_json::from_value(state).is_ok_and(|snapshot| self.engine.import_state(snapshot))
    }
}

fn merge(into: &mut SigmaCollection, from: SigmaCollection) {
    into.rules.extend(from.rules);
    into.correlations.extend(from.correlations);
    into.filters.extend(from.filters);
}

/// The JSON a rule sees for one observation.
pub fn flatten(observation: &Observation) -> Value {
    let payload = &observation.payload;
    let mut flat = serde_json::to_value(payload).unwrap_or(Value::Null);
    let attrs = payload.attrs.as_ref();
    let text = |key: &str| attrs.and_then(|attrs| attrs.get(key)).and_then(Value::as_str);
    let list = |key: &str| -> Option<Vec<String>> {
        attrs
            .and_then(|attrs| attrs.get(key))
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Value::as_str).map(str::to_owned).collect())
    };
    let mut custos = json!({
        "signal": observation.signal_name(),
        "log_index": observation.log_index,
    });
    let event_id = observation.log_index.map(|index| index.to_string());
    if let Some(owner) = text("credential_owner") {
        custos["credential_owner_match"] = Value::Bool(owner == payload.agent);
    }
    if let (Some(granted), Some(held)) = (list("granted_scopes"), list("holder_scopes")) {
        custos["delegation_escalates"] = Value::Bool(granted.iter().any(|scope| !held.contains(scope)));
    }
    if let Value::Object(object) = &mut flat {
        object.insert("product".into(), Value::String("ai_agent".into()));
        object.insert("custos".into(), custos);
        // What a correlation cites as its matched events (rsigma's event references).
        if let Some(id) = event_id {
            object.insert("event_id".into(), Value::String(id));
        }
    }
    flat
}
