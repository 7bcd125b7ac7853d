//! One input for every way an event can be rejected (and the two accepted-with-a-note
//! outcomes), built from real keys. The demo shows them; the tests assert them.

use chrono::{DateTime, Utc};
use custos_event::{AgentKey, EVENT_PAYLOAD_TYPE, Envelope, Kind, Payload, Reason, Signer};

/// What the node must answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Rejected(Reason),
    Duplicate,
    /// Accepted and flagged `chain_gap`.
    Gap,
}

/// One crafted input.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub expect: Expect,
    /// One envelope (a JSON value or a raw line).
    pub body: Vec<u8>,
}

/// The agents the cases need.
pub struct Actors<'a> {
    /// An enrolled, active agent whose events so far were all accepted, at least
    /// `chain_window + 2` of them, ending with `last`.
    pub agent: &'a mut Signer,
    /// The agent's first accepted envelope (seq 0).
    pub first: &'a Envelope,
    /// The agent's last accepted envelope.
    pub last: &'a Envelope,
    /// A key that was never enrolled.
    pub stranger: &'a AgentKey,
    /// An agent that has been revoked.
    pub revoked: &'a mut Signer,
    pub max_event_bytes: usize,
}

fn event(kind: Kind, ts: DateTime<Utc>) -> Payload {
    let mut payload = Payload::new(kind, ts);
    payload.action = Some("http.get".into());
    payload.target = Some("https://api.example.com/v1/orders".into());
    payload.outcome = Some(custos_event::Outcome::Ok);
    payload
}

fn json(envelope: &Envelope) -> Vec<u8> {
    envelope.to_json().into_bytes()
}

/// Every case, in the order they must be sent (later ones depend on earlier state).
pub fn cases(actors: Actors<'_>, now: DateTime<Utc>) -> Vec<Case> {
    let good = actors.agent.clone().sign(event(Kind::ToolCall, now));
    let good_json = good.to_json();
    let mut out = Vec::new();
    let mut push = |name, expect, body: Vec<u8>| out.push(Case { name, expect, body });

    push(
        "not JSON",
        Expect::Rejected(Reason::Malformed),
        b"{\"payloadType\": oops".to_vec(),
    );
    push(
        "payload not base64",
        Expect::Rejected(Reason::BadBase64),
        good_json
            .replacen("\"payload\":\"", "\"payload\":\"%%%", 1)
            .into_bytes(),
    );
    let other_type = actors
        .agent
        .key()
        .sign_envelope("application/json", good.payload.clone());
    push(
        "wrong payloadType",
        Expect::Rejected(Reason::WrongPayloadType),
        json(&other_type),
    );
    push(
        "keyid not a did:key",
        Expect::Rejected(Reason::BadKeyid),
        good_json
            .replace(&good.keyid, "did:web:agents.example.com")
            .into_bytes(),
    );
    let mut big = event(Kind::ToolResult, now);
    big.attrs = Some(serde_json::Map::from_iter([(
        "blob".to_owned(),
        serde_json::Value::String("x".repeat(actors.max_event_bytes)),
    )]));
    push(
        "oversized envelope",
        Expect::Rejected(Reason::TooLarge),
        json(&actors.agent.clone().sign(big)),
    );
    let mut forged = good.clone();
    forged.sig[10] ^= 0x01;
    push(
        "signature flipped",
        Expect::Rejected(Reason::BadSignature),
        json(&forged),
    );
    let not_an_event = actors
        .agent
        .key()
        .sign_envelope(EVENT_PAYLOAD_TYPE, br#"{"hello":"world"}"#.to_vec());
    push(
        "signed garbage payload",
        Expect::Rejected(Reason::BadPayload),
        json(&not_an_event),
    );
    let mut impostor = event(Kind::ToolCall, now);
    impostor.agent = actors.stranger.did().to_owned();
    impostor.realm = actors.agent.realm().to_owned();
    let impostor_bytes = serde_json::to_vec(&impostor).expect("a payload serialises");
    let mismatched = actors.agent.key().sign_envelope(EVENT_PAYLOAD_TYPE, {
        // The agent signs a payload that claims to be another agent.
        let mut value: serde_json::Value = serde_json::from_slice(&impostor_bytes).unwrap_or_default();
        value["seq"] = 0.into();
        value["prev"] = serde_json::Value::Null;
        serde_json::to_vec(&value).expect("a JSON value serialises")
    });
    push(
        "agent field names someone else",
        Expect::Rejected(Reason::KeyidMismatch),
        json(&mismatched),
    );
    let stranger = Signer::new(actors.stranger.clone(), actors.agent.realm()).sign(event(Kind::ToolCall, now));
    push(
        "never enrolled",
        Expect::Rejected(Reason::UnknownAgent),
        json(&stranger),
    );
    push(
        "revoked agent",
        Expect::Rejected(Reason::RevokedAgent),
        json(&actors.revoked.sign(event(Kind::ToolCall, now))),
    );
    let mut elsewhere = event(Kind::ToolCall, now);
    elsewhere.realm = "some-other-realm".into();
    push(
        "wrong realm",
        Expect::Rejected(Reason::RealmMismatch),
        json(&actors.agent.clone().sign(elsewhere)),
    );
    push(
        "timestamp an hour ahead",
        Expect::Rejected(Reason::ClockSkew),
        json(
            &actors
                .agent
                .clone()
                .sign(event(Kind::ToolCall, now + chrono::Duration::hours(1))),
        ),
    );
    push("same event resent", Expect::Duplicate, json(actors.last));
    // Same seq as the last accepted event, different content: a second holder of the key.
    let mut fork_signer = Signer::resume(
        actors.agent.key().clone(),
        actors.agent.realm(),
        custos_event::ChainState {
            next_seq: actors.agent.chain().next_seq.saturating_sub(1),
            prev: prev_of(actors.last),
        },
    );
    let mut forked = event(Kind::CredentialUse, now);
    forked.target = Some("vault://prod/db-root".into());
    // Sent last: a fork is what a cloned key looks like, and a node with the shipped
    // playbooks revokes the agent at once, which would change the answers after it.
    let fork = json(&fork_signer.sign(forked));
    let mut broken = actors.agent.clone();
    let mut wrong_prev = event(Kind::ToolCall, now);
    wrong_prev.action = Some("rewrite.history".into());
    let envelope = {
        let mut payload = wrong_prev;
        payload.agent = broken.did().to_owned();
        payload.seq = broken.chain().next_seq;
        payload.prev = Some(hex::encode([0xabu8; 32]));
        payload.realm = broken.realm().to_owned();
        broken.sign_bytes(serde_json::to_vec(&payload).expect("a payload serialises"))
    };
    push(
        "next seq, wrong prev",
        Expect::Rejected(Reason::ChainBroken),
        json(&envelope),
    );
    // However old, a resend of a stored event is a duplicate.
    push("first event resent", Expect::Duplicate, json(actors.first));
    // Skip five seqs: accepted, flagged, and the chain continues from here.
    let before_gap = actors.agent.chain().clone();
    let mut state = before_gap.clone();
    state.next_seq += 5;
    *actors.agent = Signer::resume(actors.agent.key().clone(), actors.agent.realm(), state);
    push(
        "five events lost in transit",
        Expect::Gap,
        json(&actors.agent.sign(event(Kind::ToolCall, now))),
    );
    // One of the lost ones turning up late: below the head, never stored.
    let late =
        Signer::resume(actors.agent.key().clone(), actors.agent.realm(), before_gap).sign(event(Kind::ToolCall, now));
    push(
        "a lost event arriving late",
        Expect::Rejected(Reason::Replay),
        json(&late),
    );
    push("same seq, different payload", Expect::Rejected(Reason::ChainFork), fork);
    out
}

fn prev_of(envelope: &Envelope) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(&envelope.payload).ok()?;
    value.get("prev")?.as_str().map(str::to_owned)
}
