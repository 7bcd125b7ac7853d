//! The writer's own signature check of events that ingest nodes verified
//! (`custos serve --roles writer --verify-submissions`).
//!
//! ```text
//!  submissions topic ─▶ writer's intake ─▶ Reverified: decode each item the ingest node
//!        │                                 called verified (or a revoked agent's signed
//!        │                                 one), batch-verify on all cores
//!        │                                 a failing item ─▶ refused (bad_signature …),
//!        ▼                                 kept for forensics; its neighbours go on
//!  the writer's queue (registry, chain, WAL)
//! ```
//!
//! Without it the writer takes an ingest node's word for each signature, so whoever may
//! write the submissions topic (a compromised ingest node, a leaked broker credential)
//! could append events in any enrolled agent's name. With it, such an event is refused
//! and logged at WARN with the submitting node's client address; the cost is one more
//! batch verification of every event (docs/BENCHMARKS.md).

use custos_event::verify::{KeyCache, decode_envelope_cached, verify_signatures};
use custos_stage::{EventBatch, ItemCheck, Receipt, StageError, Submission, Submitter};

/// A submitter that checks events' signatures again before handing them on.
pub struct Reverified<S> {
    inner: S,
    keys: KeyCache,
}

impl<S> Reverified<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            keys: KeyCache::default(),
        }
    }
}

impl<S: Submitter> Submitter for Reverified<S> {
    fn submit(&self, submission: Submission) -> Result<Receipt, StageError> {
        match submission {
            Submission::Events(mut batch) => {
                check(&self.keys, &mut batch);
                self.inner.submit(Submission::Events(batch))
            }
            other => self.inner.submit(other),
        }
    }

    fn resubmitted(&self) -> u64 {
        self.inner.resubmitted()
    }
}

/// Turns every item whose signature does not verify into a refusal, in place.
fn check(keys: &KeyCache, batch: &mut EventBatch) {
    let mut decoded = Vec::new();
    for (position, item) in batch.items.iter_mut().enumerate() {
        if !matches!(
            item.check,
            ItemCheck::Verified | ItemCheck::Refused { signed: true, .. }
        ) {
            continue;
        }
        match decode_envelope_cached(&item.raw, usize::MAX, &[custos_event::EVENT_PAYLOAD_TYPE], Some(keys)) {
            Ok(envelope) => decoded.push((position, envelope)),
            Err(rejection) => {
                item.check = refused(rejection.reason.code(), &rejection.message);
            }
        }
    }
    let pairs: Vec<_> = decoded
        .iter()
        .map(|(_, decoded)| (&decoded.key, &decoded.envelope))
        .collect();
    let mut forged = 0;
    for ((position, _), result) in decoded.iter().zip(verify_signatures(&pairs)) {
        if let Err(rejection) = result {
            forged += 1;
            batch.items[*position].check = refused(rejection.reason.code(), &rejection.message);
        }
    }
    if forged > 0 {
        custos_http::metrics::FORGED.inc_by(forged);
        tracing::warn!(
            remote = batch.remote,
            forged,
            "events an ingest node passed on as verified do not verify here: refused (is a node or a broker credential compromised?)"
        );
    }
}

fn refused(code: &str, message: &str) -> ItemCheck {
    ItemCheck::Refused {
        code: code.to_owned(),
        message: format!("{message} (checked again by the log writer; the ingest node that sent it said it verified)"),
        signed: false,
        whole: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custos_event::{AgentKey, Signer};
    use custos_stage::EventItem;

    fn signed(seed: u8) -> Vec<u8> {
        let mut signer = Signer::new(AgentKey::from_seed(&[seed; 32]), "eng");
        let object = serde_json::json!({"kind": "tool_call"}).as_object().unwrap().clone();
        signer
            .sign_object(object, chrono::Utc::now())
            .unwrap()
            .to_json()
            .into_bytes()
    }

    /// A forged item is refused, named; its good neighbours, and the items the ingest
    /// node refused itself, are passed on as they came.
    #[test]
    fn a_forged_signature_is_refused_and_its_neighbours_go_on() {
        let good = signed(1);
        // The same envelope with another agent's keyid: well formed, signed by someone else.
        let other = AgentKey::from_seed(&[2; 32]);
        let mut envelope: serde_json::Value = serde_json::from_slice(&signed(1)).unwrap();
        envelope["signatures"][0]["keyid"] = serde_json::Value::from(other.did());
        let forged = serde_json::to_vec(&envelope).unwrap();
        let item = |raw: Vec<u8>, check: ItemCheck| EventItem {
            raw,
            keyid: None,
            check,
        };
        let malformed = ItemCheck::Refused {
            code: "malformed".into(),
            message: "not JSON".into(),
            signed: false,
            whole: None,
        };
        let mut batch = EventBatch {
            remote: "10.0.0.7:4000".into(),
            realm: "eng".into(),
            items: vec![
                item(good.clone(), ItemCheck::Verified),
                item(forged.clone(), ItemCheck::Verified),
                item(b"{".to_vec(), malformed.clone()),
                // A revoked agent's event the ingest node shows as signed: checked too.
                item(
                    forged,
                    ItemCheck::Refused {
                        code: "revoked_agent".into(),
                        message: "revoked".into(),
                        signed: true,
                        whole: None,
                    },
                ),
                item(b"not an envelope".to_vec(), ItemCheck::Verified),
            ],
        };
        let counted = custos_http::metrics::FORGED.get();
        check(&KeyCache::default(), &mut batch);
        assert!(
            custos_http::metrics::FORGED.get() >= counted + 2,
            "both forgeries counted"
        );
        assert_eq!(batch.items[0].check, ItemCheck::Verified);
        for position in [1, 3] {
            let ItemCheck::Refused {
                code, message, signed, ..
            } = &batch.items[position].check
            else {
                panic!("item {position} passed: {:?}", batch.items[position].check);
            };
            assert_eq!((code.as_str(), *signed), ("bad_signature", false));
            assert!(message.contains("checked again by the log writer"), "{message}");
        }
        assert_eq!(batch.items[2].check, malformed);
        assert!(
            matches!(&batch.items[4].check, ItemCheck::Refused { code, .. } if code == "malformed"),
            "{:?}",
            batch.items[4].check
        );
    }
}
