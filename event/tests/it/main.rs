//! Property tests: envelopes round-trip, and hostile bytes never panic or verify.

use custos_event::verify::check_event;
use custos_event::{
    AgentKey, EVENT_PAYLOAD_TYPE, Kind, Outcome, Payload, Reason, Signer, decode_envelope, verify_signatures,
};
use proptest::prelude::*;

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

fn payload() -> impl Strategy<Value = Payload> {
    (
        kind(),
        0i64..4_000_000_000,
        prop::option::of("[a-z._]{1,20}"),
        prop::option::of("\\PC{0,80}"),
        prop::option::of(prop::sample::select(vec![Outcome::Ok, Outcome::Denied, Outcome::Error])),
        prop::option::of(any::<u64>()),
        prop::option::of("[0-9a-f]{32}"),
        prop::option::of(prop::collection::btree_map("[a-z.]{1,12}", "\\PC{0,12}", 0..4)),
    )
        .prop_map(|(kind, seconds, action, target, outcome, bytes_out, trace_id, attrs)| {
            let ts = chrono::DateTime::from_timestamp(seconds, 0).unwrap();
            let mut payload = Payload::new(kind, ts);
            payload.action = action;
            payload.target = target;
            payload.outcome = outcome;
            payload.bytes_out = bytes_out;
            payload.trace_id = trace_id;
            payload.attrs = attrs.map(|map| {
                map.into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect()
            });
            payload
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// sign → wire JSON → decode → verify → parse gives back the same payload and chain.
    #[test]
    fn envelopes_round_trip(seed in any::<[u8; 32]>(), payloads in prop::collection::vec(payload(), 1..6)) {
        let mut signer = Signer::new(AgentKey::from_seed(&seed), "realm-1");
        let mut previous: Option<[u8; 32]> = None;
        for (seq, original) in payloads.into_iter().enumerate() {
            let envelope = signer.sign(original.clone());
            let wire = envelope.to_json();
            let decoded = decode_envelope(wire.as_bytes(), 1 << 20, &[EVENT_PAYLOAD_TYPE]).unwrap();
            prop_assert_eq!(&decoded.envelope, &envelope);
            prop_assert!(verify_signatures(&[(&decoded.key, &decoded.envelope)])[0].is_ok());
            let verified = check_event(decoded.envelope).unwrap();
            prop_assert_eq!(verified.payload.seq, seq as u64);
            prop_assert_eq!(verified.payload.prev_digest(), previous);
            prop_assert_eq!(verified.payload.kind, original.kind);
            prop_assert_eq!(&verified.payload.target, &original.target);
            prop_assert_eq!(&verified.payload.attrs, &original.attrs);
            previous = Some(verified.digest);
        }
    }

    /// Arbitrary bytes are rejected with a reason, never a panic.
    #[test]
    fn arbitrary_bytes_are_rejected(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(decoded) = decode_envelope(&bytes, 1 << 20, &[EVENT_PAYLOAD_TYPE]) {
            prop_assert!(verify_signatures(&[(&decoded.key, &decoded.envelope)])[0].is_err());
        }
        let _ = Payload::parse(&bytes);
    }

    /// Any single-byte change to a signed envelope's payload or signature is caught.
    #[test]
    fn any_flipped_bit_is_caught(seed in any::<[u8; 32]>(), position in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut signer = Signer::new(AgentKey::from_seed(&seed), "realm-1");
        let envelope = signer.sign(Payload::new(Kind::ToolCall, chrono::Utc::now()));
        let public = custos_event::verifying_key_from_did(AgentKey::from_seed(&seed).did()).unwrap();
        let mut tampered = envelope.clone();
        let total = tampered.payload.len() + 64;
        let at = position.index(total);
        if at < tampered.payload.len() {
            tampered.payload[at] ^= 1 << bit;
        } else {
            tampered.sig[at - tampered.payload.len()] ^= 1 << bit;
        }
        let result = &verify_signatures(&[(&public, &tampered)])[0];
        prop_assert_eq!(result.as_ref().unwrap_err().reason, Reason::BadSignature);
    }
}

#[test]
fn payload_validation_names_the_field() {
    let did = AgentKey::from_seed(&[1; 32]).did().to_owned();
    let cases = [
        (
            format!(r#"{{"agent":"{did}","seq":1,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth"}}"#),
            "`prev` is null at seq 1",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00+02:00","realm":"r","kind":"auth"}}"#
            ),
            "must be in UTC",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r r","kind":"auth"}}"#
            ),
            "`realm`",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"teleport"}}"#
            ),
            "teleport",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","span_id":"XYZ"}}"#
            ),
            "`span_id`",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","colour":"red"}}"#
            ),
            "colour",
        ),
        (
            r#"{"agent":"did:key:zzz","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth"}"#
                .to_owned(),
            "`agent`",
        ),
        // A seq with no successor would wrap the chain check.
        (
            format!(
                r#"{{"agent":"{did}","seq":18446744073709551615,"prev":"{zero}","ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth"}}"#,
                zero = "0".repeat(64)
            ),
            "has no successor",
        ),
        // One key twice, at any depth: two readers would see two different events.
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","attrs":{{"a":1,"a":2}}}}"#
            ),
            "`a` twice",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","attrs":{{"x":[{{"deep":{{"k":1,"k":1}}}}]}}}}"#
            ),
            "`k` twice",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","kind":"auth"}}"#
            ),
            "duplicate field `kind`",
        ),
        (
            format!(
                r#"{{"agent":"{did}","seq":0,"prev":null,"ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","attrs":[1]}}"#
            ),
            "`attrs` must be an object",
        ),
    ];
    for (text, expected) in cases {
        let error = Payload::parse(text.as_bytes()).unwrap_err();
        assert!(error.contains(expected), "{error} should mention {expected}");
    }
}

/// The largest seq that still has a successor is accepted; attrs keep nested values and
/// equal keys in different objects.
#[test]
fn payload_edges_that_are_accepted() {
    let did = AgentKey::generate().unwrap().did().to_owned();
    let text = format!(
        r#"{{"agent":"{did}","seq":18446744073709551614,"prev":"{zero}","ts":"2026-01-01T00:00:00Z","realm":"r","kind":"auth","attrs":{{"a":{{"k":1}},"b":{{"k":[{{"k":null}}]}},"n":1.5}}}}"#,
        zero = "0".repeat(64)
    );
    let payload = Payload::parse(text.as_bytes()).unwrap();
    assert_eq!(payload.seq, custos_event::chain::MAX_SEQ);
    let attrs = payload.attrs.unwrap();
    assert_eq!(attrs["b"]["k"][0]["k"], serde_json::Value::Null);
    assert_eq!(attrs["n"], 1.5);
}
