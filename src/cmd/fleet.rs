//! A small fleet sending role-typical events in real time, for the demo and the ingest
//! benchmark (the roles are the simulator's; `custos simulate` adds rhythms and attacks).

use chrono::{DateTime, Utc};
use custos_event::{AgentKey, Envelope, Kind, Outcome, Payload, Signer};
use rand::Rng as _;
use rand::SeedableRng as _;
use rand::rngs::StdRng;

use custos_sim::{ROLES, Role};

/// An agent of the fleet, with the envelopes it needs to remember.
pub(crate) struct FleetAgent {
    pub(crate) signer: Signer,
    pub(crate) role: &'static Role,
    pub(crate) first: Option<Envelope>,
    pub(crate) last: Option<Envelope>,
    step: usize,
}

impl FleetAgent {
    pub(crate) fn new(key: AgentKey, role: &'static Role) -> Self {
        Self {
            signer: Signer::new(key, role.realm),
            role,
            first: None,
            last: None,
            step: 0,
        }
    }

    pub(crate) fn did(&self) -> &str {
        self.signer.did()
    }

    /// Signs the agent's next typical event.
    pub(crate) fn next(&mut self, rng: &mut StdRng, ts: DateTime<Utc>) -> Envelope {
        let (kind, action, target) = self.role.step(self.step);
        self.step += 1;
        let mut payload = Payload::new(kind, ts);
        payload.action = Some(action.to_owned());
        payload.target = Some(target.replace("{n}", &rng.gen_range(1..40).to_string()));
        payload.session = Some(format!("s-{}", self.step / 20));
        let roll: f64 = rng.r#gen();
        payload.outcome = Some(if roll < 0.02 {
            Outcome::Error
        } else if roll < 0.03 {
            Outcome::Denied
        } else {
            Outcome::Ok
        });
        payload.bytes_in = Some(rng.gen_range(200..20_000));
        payload.bytes_out = Some(rng.gen_range(100..5_000));
        if kind == Kind::LlmCall {
            payload.tokens_in = Some(rng.gen_range(500..8_000));
            payload.tokens_out = Some(rng.gen_range(50..1_500));
            payload.attrs = Some(serde_json::Map::from_iter([
                ("gen_ai.system".to_owned(), "anthropic".into()),
                ("gen_ai.request.model".to_owned(), "claude".into()),
            ]));
        }
        if matches!(kind, Kind::MemoryWrite | Kind::MemoryRead) {
            payload.memory_id = Some(format!("mem-{}", rng.gen_range(1..500)));
        }
        let envelope = self.signer.sign(payload);
        self.remember(&envelope);
        envelope
    }

    pub(crate) fn remember(&mut self, envelope: &Envelope) {
        if self.first.is_none() {
            self.first = Some(envelope.clone());
        }
        self.last = Some(envelope.clone());
    }
}

/// A deterministic fleet of `count` agents cycling through the roles.
pub(crate) fn fleet(count: usize, seed: u64) -> (Vec<FleetAgent>, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed);
    let agents = (0..count)
        .map(|position| {
            let seed: [u8; 32] = rng.r#gen();
            FleetAgent::new(AgentKey::from_seed(&seed), &ROLES[position % ROLES.len()])
        })
        .collect();
    (agents, rng)
}

/// Enrolls every agent of a fleet in its role's realm, through `admin`.
pub(crate) async fn enroll(admin: &super::client::Client, agents: &[FleetAgent]) -> anyhow::Result<()> {
    for agent in agents {
        admin
            .post_json(
                "/v1/agents",
                &serde_json::json!({"did": agent.did(), "realm": agent.role.realm}),
            )
            .await?;
    }
    Ok(())
}
