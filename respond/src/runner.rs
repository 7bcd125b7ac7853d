//! The responder stage: reads committed findings, submits signed action records.
//!
//! ```text
//!  Subscription ──Committed::Finding──▶ Responder::on_finding ─▶ ActionRecord
//!               ──Committed::Action───▶ remember (replay)            │ sign (responder key)
//!               ──Committed::Replayed─▶ live                         ▼
//!  requests (approve, deny, undo, resume, stop) ◀── HTTP edge    Submission::Action
//!                                                                 (the writer applies the
//!                                                                  enforcement it carries
//!                                                                  in the same append)
//! ```
//!
//! There is exactly one responder per log, so caps and approvals hold everywhere. It
//! waits for each record's receipt: the writer never waits for the responder (its
//! subscription is unbounded and sees only findings and actions), so this cannot
//! deadlock. A record whose enforcement the writer refuses (the agent was never
//! enrolled) is signed again as `failed`, naming the refusal.
//!
//! Restarts: action records replay into the responder's memory (idempotency keys,
//! approvals, caps). Findings replayed from the last [`REPLAY_WINDOW`] are handed to the
//! playbooks once the replay ends, so a crash between a finding and its action still gets
//! the action; the idempotency keys keep those already acted on from acting twice.

use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use chrono::Utc;
use custos_event::{ACTION_PAYLOAD_TYPE, AgentKey, ChainLanes, ChainState};
use custos_stage::{Committed, Enforcement, Refused, Submission, Submitter, Subscription};
use serde_json::{Value, json};

use crate::{ActionRecord, ActionStatus, Approval, Finding, RespondError, Responder};

/// How old a finding read back at start may be and still go to the playbooks.
pub const REPLAY_WINDOW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// How long the responder waits for the writer to log one record.
const RECEIPT_WAIT: Duration = Duration::from_secs(30);

/// How many times a record is sent before the responder gives up on it.
const SUBMIT_ATTEMPTS: u32 = 5;

/// Why an operator's request failed; the HTTP edge picks the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpError {
    pub kind: OpErrorKind,
    pub code: &'static str,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpErrorKind {
    NotFound,
    Conflict,
    Forbidden,
    Unavailable,
}

impl OpError {
    fn new(kind: OpErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }
}

type Reply = Sender<Result<Value, OpError>>;

/// Requests from outside the stream.
pub enum Request {
    Decide {
        id: String,
        approve: bool,
        by: String,
        /// The caller's realms (all when empty).
        realms: Vec<String>,
        reply: Reply,
    },
    Undo {
        id: String,
        by: String,
        realms: Vec<String>,
        reply: Reply,
    },
    Resume {
        playbook: String,
        realm: String,
        by: String,
        realms: Vec<String>,
        reply: Reply,
    },
    /// A record made outside the responder's own flow (a webhook's final failure).
    Record(Box<ActionRecord>),
    Stop(Sender<()>),
}

/// What the stage reports, for metrics and the node's views.
pub enum Report<'a> {
    /// An action record is in the log (or could not be logged: `log_index` is `None`).
    Logged {
        record: &'a ActionRecord,
        log_index: Option<u64>,
        live: bool,
    },
    /// The writer applied a record's enforcement.
    Enforced { record: &'a ActionRecord },
    /// Pending approvals and each playbook with the realms where a cap paused it.
    State {
        pending: Vec<Approval>,
        playbooks: Vec<(Value, Vec<String>)>,
    },
}

/// The responder stage's state.
pub struct ResponderStage {
    responder: Responder,
    key: AgentKey,
    /// The signing chain, one per lane (one per partition log, see [`ChainLanes`]);
    /// rebuilt from the log's action records at each start.
    chains: ChainLanes,
    replayed: bool,
    /// Recent findings read during the replay, for the playbooks once it ends.
    held: Vec<(Finding, u64)>,
    /// Where webhook threads send their failures.
    own: Sender<Request>,
    report: Box<dyn FnMut(Report<'_>) + Send>,
    /// Agent platforms' APIs the platform actions call.
    platforms: crate::platform::Platforms,
}

fn visible(realms: &[String], realm: &str) -> bool {
    realms.is_empty() || realms.iter().any(|allowed| allowed == realm)
}

fn label(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

impl ResponderStage {
    /// `own` must be a sender of the `requests` the stage will run with.
    pub fn new(
        responder: Responder,
        key: AgentKey,
        own: Sender<Request>,
        report: Box<dyn FnMut(Report<'_>) + Send>,
    ) -> Self {
        Self {
            responder,
            key,
            chains: ChainLanes::default(),
            replayed: false,
            held: Vec::new(),
            own,
            report,
            platforms: crate::platform::Platforms::default(),
        }
    }

    /// The agent platforms whose APIs the `vaultysclaw.*` actions call.
    pub fn with_platforms(mut self, platforms: crate::platform::Platforms) -> Self {
        self.platforms = platforms;
        self
    }

    /// Keeps one signing chain per partition of `lanes` (by the record's realm), for
    /// writers that keep one log per partition.
    pub fn with_lanes(mut self, lanes: u32) -> Self {
        self.chains = ChainLanes::new(lanes);
        self
    }

    /// The responder's signing key as a `did:key` (the writer's system signer).
    pub fn did(&self) -> &str {
        self.key.did()
    }

    /// Runs until a [`Request::Stop`] or until the subscription closes.
    pub fn run(mut self, subscription: &mut dyn Subscription, submit: &dyn Submitter, requests: Receiver<Request>) {
        self.sync();
        let mut last_expire = Instant::now();
        loop {
            match subscription.recv(Duration::from_millis(50)) {
                Ok(Some(record)) => self.committed(record, submit),
                Ok(None) => {}
                Err(custos_stage::StageError::Closed) => return,
                Err(error) => {
                    tracing::error!(%error, "responder: reading committed records failed; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            while let Ok(request) = requests.try_recv() {
                if let Request::Stop(done) = request {
                    while let Ok(Some(record)) = subscription.recv(Duration::ZERO) {
                        self.committed(record, submit);
                    }
                    while let Ok(request) = requests.try_recv() {
                        self.request(request, submit);
                    }
                    // No acknowledgement: the responder rebuilds its state (idempotency
                    // keys, approvals, caps, its chain) from every action record at each
                    // start, so it always reads from the beginning.
                    let _ = done.send(());
                    return;
                }
                self.request(request, submit);
            }
            if self.replayed && last_expire.elapsed() >= Duration::from_secs(1) {
                last_expire = Instant::now();
                let expired = self.responder.expire(Utc::now());
                self.carry_out(expired, submit);
            }
        }
    }

    /// Handles one committed record.
    pub fn committed(&mut self, record: Committed, submit: &dyn Submitter) {
        match record {
            Committed::Finding { log_index, payload, .. } => match serde_json::from_slice::<Finding>(&payload) {
                Ok(finding) if self.replayed => {
                    let records = self.responder.on_finding(&finding, Utc::now());
                    self.carry_out(records, submit);
                }
                Ok(finding) => {
                    if Utc::now() - finding.ts <= REPLAY_WINDOW {
                        self.held.push((finding, log_index));
                    }
                }
                Err(error) => tracing::error!(%error, log_index, "the responder cannot read a finding payload"),
            },
            Committed::Action { log_index, payload, .. } => {
                self.chains.follow(&payload);
                if self.replayed {
                    // Our own record coming back (reported when its receipt came).
                    return;
                }
                match serde_json::from_slice::<ActionRecord>(&payload) {
                    Ok(record) => {
                        self.responder.remember(&record);
                        (self.report)(Report::Logged {
                            record: &record,
                            log_index: Some(log_index),
                            live: false,
                        });
                    }
                    Err(error) => tracing::warn!(%error, log_index, "unreadable action record in the log"),
                }
            }
            Committed::Replayed { .. } => {
                self.replayed = true;
                let held = std::mem::take(&mut self.held);
                for (finding, _) in held {
                    let records = self.responder.on_finding(&finding, Utc::now());
                    self.carry_out(records, submit);
                }
                self.sync();
            }
            Committed::Event(_) | Committed::Control { .. } => {}
        }
    }

    fn request(&mut self, request: Request, submit: &dyn Submitter) {
        match request {
            Request::Decide {
                id,
                approve,
                by,
                realms,
                reply,
            } => {
                let _ = reply.send(self.decide(&id, approve, &by, &realms, submit));
            }
            Request::Undo { id, by, realms, reply } => {
                let _ = reply.send(self.undo(&id, &by, &realms, submit));
            }
            Request::Resume {
                playbook,
                realm,
                by,
                realms,
                reply,
            } => {
                let _ = reply.send(self.resume(&playbook, &realm, &by, &realms, submit));
            }
            Request::Record(record) => {
                self.carry_out(vec![*record], submit);
            }
            Request::Stop(_) => {}
        }
    }

    fn decide(
        &mut self,
        id: &str,
        approve: bool,
        by: &str,
        realms: &[String],
        submit: &dyn Submitter,
    ) -> Result<Value, OpError> {
        let missing = || {
            OpError::new(
                OpErrorKind::NotFound,
                "unknown_approval",
                format!("no pending approval `{id}`"),
            )
        };
        let approval = self
            .responder
            .pending()
            .into_iter()
            .find(|approval| approval.id == id)
            .ok_or_else(missing)?;
        if !visible(realms, &approval.finding.realm) {
            return Err(missing());
        }
        let now = Utc::now();
        let records = if approve {
            self.responder.approve(id, by, now)
        } else {
            self.responder.deny(id, by, now).map(|record| vec![record])
        }
        .map_err(|error| OpError::new(OpErrorKind::Conflict, "approval_failed", error.to_string()))?;
        let records = self.carry_out(records, submit);
        Ok(json!({ "approval": id, "decision": if approve { "approved" } else { "denied" }, "actions": records }))
    }

    fn undo(&mut self, id: &str, by: &str, realms: &[String], submit: &dyn Submitter) -> Result<Value, OpError> {
        let visible_action = self
            .responder
            .history()
            .any(|record| record.id == id && visible(realms, &record.realm));
        if !visible_action {
            return Err(OpError::new(
                OpErrorKind::NotFound,
                "unknown_action",
                format!("no executed action `{id}`"),
            ));
        }
        let record = self
            .responder
            .request_undo(id, by, Utc::now())
            .map_err(|error| OpError::new(OpErrorKind::Conflict, "undo_refused", error.to_string()))?;
        let records = self.carry_out(vec![record], submit);
        Ok(json!({ "actions": records }))
    }

    fn resume(
        &mut self,
        playbook: &str,
        realm: &str,
        by: &str,
        realms: &[String],
        submit: &dyn Submitter,
    ) -> Result<Value, OpError> {
        if !visible(realms, realm) {
            return Err(OpError::new(
                OpErrorKind::Forbidden,
                "realm_not_allowed",
                format!("this token is scoped to realms {realms:?}; it cannot resume playbooks in realm `{realm}`"),
            ));
        }
        let record = self
            .responder
            .resume_paused(playbook, realm, by, Utc::now())
            .map_err(|error| match error {
                RespondError::NoPlaybook(_) => {
                    OpError::new(OpErrorKind::NotFound, "unknown_playbook", error.to_string())
                }
                _ => OpError::new(OpErrorKind::Conflict, "not_paused", error.to_string()),
            })?;
        let records = self.carry_out(vec![record], submit);
        Ok(json!({ "actions": records }))
    }

    /// Signs each record into the log, with its enforcement in the same append; starts
    /// webhooks once their record is logged. Returns the records as written.
    fn carry_out(&mut self, records: Vec<ActionRecord>, submit: &dyn Submitter) -> Vec<Value> {
        let mut written = Vec::new();
        for mut record in records {
            // A platform action is done first, and logged with what the platform said.
            if record.status == ActionStatus::Executed
                && let Enforcement::Platform {
                    platform,
                    operation,
                    subject,
                } = record.enforcement.clone()
            {
                let done = match platform.as_str() {
                    "lastid" => self.recommend(&record, &operation, &subject),
                    _ => self
                        .platforms
                        .carry_out(&platform, &operation, &subject, record.platform.as_ref()),
                };
                match done {
                    Ok(answer) => {
                        record.reason = format!("{}; {platform} answered {}", record.reason, answer["status"]);
                        record.platform = Some(answer);
                    }
                    Err(message) => {
                        record.status = ActionStatus::Failed;
                        record.reason = format!("{}; {platform} {operation} failed: {message}", record.reason);
                        record.enforcement = Enforcement::None;
                    }
                }
                self.responder.amend(&record);
            }
            let (record, log_index) = self.log(record, submit);
            if let Some(log_index) = log_index
                && record.status == ActionStatus::Executed
            {
                match &record.enforcement {
                    Enforcement::Webhook {
                        url,
                        secret_env,
                        timeout_ms,
                        retries,
                    } => self.webhook(&record, url.clone(), secret_env.clone(), *timeout_ms, *retries),
                    enforcement if enforcement.is_registry_change() => {
                        (self.report)(Report::Enforced { record: &record });
                    }
                    _ => {}
                }
                tracing::info!(
                    action = record.id,
                    r#type = record.action,
                    status = label(&record.status),
                    log_index,
                    "action"
                );
            }
            (self.report)(Report::Logged {
                record: &record,
                log_index,
                live: true,
            });
            let mut value = serde_json::to_value(&record).unwrap_or(Value::Null);
            value["log_index"] = json!(log_index);
            written.push(value);
        }
        self.sync();
        written
    }

    /// Sends LastID's operator a revocation recommendation signed by the responder key
    /// (`application/vnd.custos.recommendation+json`); answers what to record.
    fn recommend(&self, record: &ActionRecord, operation: &str, subject: &str) -> Result<Value, String> {
        let target = self
            .platforms
            .lastid
            .as_ref()
            .ok_or("the LastID operator webhook is not configured (custos serve --lastid-webhook URL)")?;
        let agent = target.agent_did(&record.agent)?;
        let recommendation = json!({
            "recommendation": operation,
            "agent_did": agent,
            "memory_id": (operation == "quarantine_memory").then_some(subject),
            "custos_agent": record.agent,
            "realm": record.realm,
            "finding_id": record.finding_id,
            "action_id": record.id,
            "approved_by": record.by,
            "reason": record.reason,
            "issued_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "issuer": self.key.did(),
        });
        let bytes = serde_json::to_vec(&recommendation).map_err(|error| error.to_string())?;
        let envelope = self
            .key
            .sign_envelope(custos_event::dsse::RECOMMENDATION_PAYLOAD_TYPE, bytes);
        let body: Value = serde_json::from_str(&envelope.to_json()).map_err(|error| error.to_string())?;
        let mut answer = target.send(&json!({ "recommendation": body }))?;
        answer["operation"] = json!(operation);
        Ok(answer)
    }

    /// Logs one record. When the writer cannot apply its enforcement, the record is
    /// logged instead as `failed`, with the writer's reason.
    fn log(&mut self, mut record: ActionRecord, submit: &dyn Submitter) -> (ActionRecord, Option<u64>) {
        match self.append(&record, submit) {
            Ok(log_index) => (record, Some(log_index)),
            Err(refused) if !refused.retryable && record.status == ActionStatus::Executed => {
                record.status = ActionStatus::Failed;
                record.reason = format!("{}; enforcement failed: {}", record.reason, refused.message);
                record.enforcement = Enforcement::None;
                let log_index = self.append(&record, submit).ok();
                (record, log_index)
            }
            Err(refused) => {
                tracing::error!(action = record.id, error = %refused, "could not log an action record");
                (record, None)
            }
        }
    }

    /// Signs the record with the responder key and waits for the writer's receipt.
    fn append(&mut self, record: &ActionRecord, submit: &dyn Submitter) -> Result<u64, Refused> {
        let chain = self.chains.chain_mut(&record.realm);
        let bytes = record
            .payload(chain)
            .map_err(|error| Refused::new("malformed_action", format!("cannot encode the record: {error}")))?;
        let before = chain.clone();
        chain.advance(&bytes);
        let envelope = self.key.sign_envelope(ACTION_PAYLOAD_TYPE, bytes);
        // A retryable failure (no receipt, brokers away) sends the same bytes again: the
        // writer answers a payload it already appended with that first append, so a
        // record is never logged twice and the chain never forks.
        let mut attempts = 0;
        let answer = loop {
            attempts += 1;
            let answer = submit
                .submit(Submission::Action {
                    envelope: envelope.clone(),
                    lease_epoch: None,
                })
                .map_err(|error| Refused::retryable("transport", error.to_string()))
                .and_then(|receipt| receipt.wait(RECEIPT_WAIT));
            match answer {
                Err(refused) if refused.retryable && attempts < SUBMIT_ATTEMPTS => {
                    tracing::warn!(action = record.id, error = %refused, attempts, "action record not logged yet; sending it again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                answer => break answer,
            }
        };
        match answer {
            Ok(appended) => appended
                .log_indexes
                .first()
                .copied()
                .ok_or_else(|| Refused::new("internal", "the writer logged the record without an index")),
            Err(refused) => {
                *self.chains.chain_mut(&record.realm) = before;
                Err(refused)
            }
        }
    }

    /// Sends a webhook on its own thread so a slow receiver never delays a revocation; a
    /// final failure comes back as a `failed` record.
    fn webhook(&self, record: &ActionRecord, url: String, secret_env: String, timeout_ms: u64, retries: u32) {
        let own = self.own.clone();
        let record = record.clone();
        let spawned = std::thread::Builder::new()
            .name("custos-webhook".into())
            .spawn(move || {
                let secret = std::env::var(&secret_env).unwrap_or_default();
                let body = json!({ "action": record.ocsf(), "finding_id": record.finding_id });
                if let Err(message) = crate::webhook::send(&url, secret.as_bytes(), &body, timeout_ms, retries) {
                    let mut failed = record;
                    failed.status = ActionStatus::Failed;
                    failed.idempotency_key = format!("{}|failed", failed.idempotency_key);
                    failed.reason = format!("webhook to {url} failed: {message}");
                    failed.enforcement = Enforcement::None;
                    let _ = own.send(Request::Record(Box::new(failed)));
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start a webhook thread");
        }
    }

    fn sync(&mut self) {
        let pending = self.responder.pending();
        let paused = self.responder.paused();
        let playbooks = self
            .responder
            .playbooks()
            .iter()
            .map(|playbook| {
                let summary = json!({
                    "name": playbook.name,
                    "description": playbook.description,
                    "dry_run": playbook.dry_run,
                    "caps": playbook.caps,
                });
                let realms = paused
                    .iter()
                    .filter(|(name, _)| *name == playbook.name)
                    .map(|(_, realm)| realm.clone())
                    .collect();
                (summary, realms)
            })
            .collect();
        (self.report)(Report::State { pending, playbooks });
    }
}

impl ActionRecord {
    /// The signed payload: the record plus the fields every log entry carries (`kind:
    /// action`, the responder's chain `seq`/`prev`, `ts` with microseconds).
    pub fn payload(&self, chain: &ChainState) -> Result<Vec<u8>, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        value["kind"] = json!("action");
        value["seq"] = json!(chain.next_seq);
        value["prev"] = json!(chain.prev);
        value["ts"] = json!(self.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        serde_json::to_vec(&value)
    }
}
