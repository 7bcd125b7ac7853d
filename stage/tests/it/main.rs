//! The contract's records and the embedded transport. (The same stages over Kafka are
//! tested against a real broker in the workspace's `tests/it/stages.rs`.)

use std::time::Duration;

use chrono::Utc;
use custos_event::{AgentKey, Observation, Payload, Signal};
use custos_stage::embedded::{self, Fanout};
use custos_stage::wire;
use custos_stage::{ActionHead, Committed, ControlOp, Enforcement, Submission, Submitter, Subscription};

fn observation() -> Observation {
    let payload: Payload = serde_json::from_value(serde_json::json!({
        "agent": "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
        "seq": 3, "prev": "ab".repeat(32), "ts": "2026-12-04T10:00:00Z", "realm": "eng",
        "kind": "tool_call", "action": "search"
    }))
    .unwrap();
    Observation {
        log_index: Some(9),
        ingest_ts: Utc::now(),
        payload,
        signal: Signal::Accepted { gap: Some((1, 2)) },
        entry: None,
    }
}

/// An entry as signed: the signature and payload are bytes (base64 on the wire).
fn signed(payload: Vec<u8>) -> Box<custos_event::SignedEntry> {
    Box::new(custos_event::SignedEntry {
        keyid: "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".into(),
        sig: (0..64).collect(),
        payload,
        ingest_ts_us: 1_796_000_000_123_456,
    })
}

#[test]
fn every_committed_record_round_trips_through_its_wire_form() {
    let records = vec![
        Committed::Event(Box::new(observation())),
        Committed::Finding {
            log_index: 10,
            payload: b"{\"agent\":\"did:key:a\",\"seq\":0}".to_vec(),
            entry: None,
        },
        Committed::Action {
            log_index: 11,
            payload: vec![0, 255, 10],
            entry: Some(signed(vec![0, 255, 10])),
        },
        Committed::Control {
            log_index: 12,
            payload: b"{}".to_vec(),
            entry: Some(signed(b"{}".to_vec())),
        },
        Committed::Replayed { next_index: 13 },
    ];
    for record in records {
        let bytes = wire::encode_committed(&record).unwrap();
        assert_eq!(wire::decode_committed(&bytes).unwrap(), [record]);
    }
    // A run of one agent's events is one record and comes back in order.
    let mut second = observation();
    second.log_index = second.log_index.map(|index| index + 1);
    second.entry = Some(signed(b"{\"seq\":4}".to_vec()));
    let run = [observation(), second];
    let bytes = wire::encode_events(&run).unwrap();
    let decoded = wire::decode_committed(&bytes).unwrap();
    assert_eq!(
        decoded,
        run.iter()
            .map(|observation| Committed::Event(Box::new(observation.clone())))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        wire::committed_key(&Committed::Finding {
            log_index: 0,
            payload: b"{\"agent\":\"did:key:a\"}".to_vec(),
            entry: None,
        }),
        "did:key:a"
    );
}

#[test]
fn submissions_round_trip_and_bad_records_are_named() {
    let key = AgentKey::from_seed(&[7; 32]);
    let envelope = key.sign_envelope(
        custos_event::FINDING_PAYLOAD_TYPE,
        b"{\"agent\":\"did:key:b\"}".to_vec(),
    );
    let action = key.sign_envelope(custos_event::ACTION_PAYLOAD_TYPE, b"{\"agent\":\"did:key:b\"}".to_vec());
    for submission in [
        Submission::Finding(envelope.clone()),
        // The lease tenure travels with an action record, and its absence too.
        Submission::Action {
            envelope: action.clone(),
            lease_epoch: Some(7),
        },
        Submission::Action {
            envelope: action,
            lease_epoch: None,
        },
        Submission::Control(ControlOp::Revoke {
            agent: "did:key:b".into(),
            realm: "eng".into(),
            by: "token:t1".into(),
            reason: Some("test".into()),
        }),
        Submission::Control(ControlOp::Enroll {
            agent: "did:key:c".into(),
            realm: "ops".into(),
            labels: [("team".to_owned(), "blue".to_owned())].into(),
            by: "token:t1".into(),
        }),
        Submission::Events(custos_stage::EventBatch {
            remote: "192.0.2.1:4000".into(),
            realm: "eng".into(),
            items: vec![
                custos_stage::EventItem {
                    raw: envelope.to_json().into_bytes(),
                    keyid: Some(envelope.keyid.clone()),
                    check: custos_stage::ItemCheck::Verified,
                },
                // Bytes that are not UTF-8 travel as they came.
                custos_stage::EventItem {
                    raw: vec![0xff, 0xfe, b'{'],
                    keyid: None,
                    check: custos_stage::ItemCheck::Refused {
                        code: "malformed".into(),
                        message: "not JSON".into(),
                        signed: false,
                        whole: None,
                    },
                },
                // A refused input cut to fit the record names the whole one.
                custos_stage::EventItem {
                    raw: b"xxxx".to_vec(),
                    keyid: None,
                    check: custos_stage::ItemCheck::Refused {
                        code: "too_large".into(),
                        message: "too large".into(),
                        signed: false,
                        whole: Some(custos_stage::WholeInput::of(b"xxxxxxxx")),
                    },
                },
            ],
        }),
        // An adapter request's body is binary (OTLP protobuf, gzip) and travels as it is.
        Submission::Adapter(custos_stage::AdapterRequest {
            route: "/v1/traces".into(),
            remote: "192.0.2.1:4000".into(),
            headers: vec![
                ("content-encoding".into(), "gzip".into()),
                ("content-type".into(), "application/x-protobuf".into()),
            ],
            token_sha256: Some("ab".repeat(32)),
            body: vec![0x1f, 0x8b, 0x00, 0xff],
            partition: None,
            realm: None,
        }),
        // Routed to its realm's partition over a partition set.
        Submission::Adapter(custos_stage::AdapterRequest {
            route: "/v1/adapters/vaultysclaw/webhook".into(),
            remote: "192.0.2.1:4000".into(),
            headers: Vec::new(),
            token_sha256: None,
            body: b"{}".to_vec(),
            partition: Some(2),
            realm: None,
        }),
        // A LastID batch placed by the realm the ingest node's view gives its agents.
        Submission::Adapter(custos_stage::AdapterRequest {
            route: "/v1/adapters/lastid/audit".into(),
            remote: "192.0.2.1:4000".into(),
            headers: Vec::new(),
            token_sha256: None,
            body: br#"{"records":[]}"#.to_vec(),
            partition: None,
            realm: Some("ops".into()),
        }),
    ] {
        let bytes = wire::encode_submission("origin-1", 42, &submission).unwrap();
        let (origin, ticket, decoded) = wire::decode_submission(&bytes).unwrap();
        assert_eq!((origin.as_str(), ticket), ("origin-1", 42));
        assert_eq!(decoded, submission);
    }
    // A finding envelope may not travel as an action record.
    let bytes = wire::encode_submission(
        "o",
        1,
        &Submission::Action {
            envelope,
            lease_epoch: None,
        },
    )
    .unwrap();
    let error = wire::decode_submission(&bytes).unwrap_err();
    assert!(
        error.contains("payloadType") || error.contains("payload type"),
        "{error}"
    );
    let error = wire::decode_submission(
        br#"{"v":1,"origin":"o","ticket":1,"submission":{"type":"events","remote":"r","items":[{"raw":"","check":"maybe"}]}}"#,
    )
    .unwrap_err();
    assert!(error.contains("`maybe`"), "{error}");
    // An adapter request names one of the adapter routes and carries only their headers,
    // so a forged record cannot reach another route of the writer's node or pass it a
    // header such as `authorization`.
    let adapter = |route: &str, headers: &str, token: &str| {
        let record = format!(
            r#"{{"v":1,"origin":"o","ticket":1,"submission":{{"type":"adapter","route":"{route}","remote":"r","headers":{headers},{token}"body":""}}}}"#
        );
        wire::decode_submission(record.as_bytes())
    };
    let error = adapter("/v1/tokens", "{}", "").unwrap_err();
    assert!(error.contains("`/v1/tokens` is not an adapter route"), "{error}");
    let error = adapter("/v1/traces", r#"{"authorization":"Bearer x"}"#, "").unwrap_err();
    assert!(error.contains("`authorization`"), "{error}");
    let error = adapter("/v1/traces", "{}", r#""token_sha256":"secret","#).unwrap_err();
    assert!(error.contains("64 hex digits"), "{error}");
    assert!(adapter("/v1/adapters/lastid/audit", "{}", "").is_ok());
    // A LastID agent's enrollment (the writer's node serves only those on this route).
    assert!(adapter("/v1/agents", "{}", "").is_ok());
    // A cut item names both the size and the blake3 of the whole input.
    for whole in [r#","size":8"#, r#","blake3":"00""#, r#","size":8,"blake3":"XYZ""#] {
        let record = format!(
            r#"{{"v":1,"origin":"o","ticket":1,"submission":{{"type":"events","remote":"r","realm":"","items":[{{"raw":"","check":"refused","code":"too_large"{whole}}}]}}}}"#
        );
        let error = wire::decode_submission(record.as_bytes()).unwrap_err();
        assert!(error.contains("`size` and `blake3`"), "{whole}: {error}");
    }
    // A writer of a partition set answers a request of another partition's realm with
    // that partition, as the documented receipt.
    let receipt = wire::encode_receipt("o", 10, Ok(custos_stage::Appended::route_to(2))).unwrap();
    assert_eq!(
        String::from_utf8(receipt.clone()).unwrap(),
        r#"{"v":1,"origin":"o","ticket":10,"outcome":{"status":"appended","log_indexes":[],"route_to":2}}"#
    );
    match wire::decode_receipt(&receipt).unwrap().outcome {
        wire::Outcome::Appended(appended) => {
            assert_eq!(appended, custos_stage::Appended::route_to(2));
            assert_eq!(appended.reply, None);
        }
        other => panic!("{other:?}"),
    }
    let error = wire::decode_committed(b"{\"v\":2,\"record\":{\"type\":\"replayed\",\"next_index\":1}}").unwrap_err();
    assert!(error.contains("version 2"), "{error}");
    let error = wire::decode_committed(b"not json").unwrap_err();
    assert!(error.contains("not a committed record"), "{error}");
    let error =
        wire::decode_committed(b"{\"v\":1,\"record\":{\"type\":\"finding\",\"log_index\":1,\"payload\":\"%%\"}}")
            .unwrap_err();
    assert!(error.contains("base64"), "{error}");
}

#[test]
fn only_executed_registry_changes_are_applied_by_the_writer() {
    let head = |status: &str, enforcement: serde_json::Value| {
        let payload =
            serde_json::json!({"status": status, "enforcement": enforcement, "by": "playbook:x", "reason": "r"});
        ActionHead::parse(&serde_json::to_vec(&payload).unwrap()).unwrap()
    };
    let revoke = serde_json::json!({"op": "revoke_agent", "agent": "did:key:c"});
    assert_eq!(
        head("executed", revoke.clone()).to_apply(),
        Some(&Enforcement::RevokeAgent {
            agent: "did:key:c".into()
        })
    );
    assert_eq!(head("pending", revoke.clone()).to_apply(), None);
    assert_eq!(head("dry_run", revoke).to_apply(), None);
    let webhook =
        serde_json::json!({"op": "webhook", "url": "https://x", "secret_env": "S", "timeout_ms": 1, "retries": 0});
    assert_eq!(head("executed", webhook).to_apply(), None);
    let error = ActionHead::parse(b"{\"status\": \"executed\"}").unwrap_err();
    assert!(error.contains("enforcement"), "{error}");
}

#[test]
fn the_fanout_filters_and_a_bounded_subscriber_holds_the_writer_back() {
    let fanout = Fanout::new();
    let mut everything = fanout.subscribe_bounded(1, embedded::everything);
    let mut responder = fanout.subscribe(embedded::findings_and_actions);
    fanout.send(Committed::Event(Box::new(observation())));
    // The bounded subscriber is full: the next send waits until it reads.
    let sender = fanout.clone();
    let writer = std::thread::spawn(move || {
        sender.send(Committed::Finding {
            log_index: 1,
            payload: b"{}".to_vec(),
            entry: None,
        })
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!writer.is_finished(), "the writer waits for room");
    assert!(matches!(
        everything.recv(Duration::from_secs(1)).unwrap(),
        Some(Committed::Event(_))
    ));
    writer.join().unwrap();
    assert!(matches!(
        everything.recv(Duration::from_secs(1)).unwrap(),
        Some(Committed::Finding { .. })
    ));
    // The responder saw only the finding.
    assert!(matches!(
        responder.recv(Duration::from_secs(1)).unwrap(),
        Some(Committed::Finding { .. })
    ));
    assert_eq!(responder.recv(Duration::ZERO).unwrap(), None);
    drop(fanout);
    assert!(matches!(
        responder.recv(Duration::ZERO),
        Err(custos_stage::StageError::Closed)
    ));
}

#[test]
fn a_queue_submission_is_answered_through_its_receipt() {
    let (submitter, mut intake) = embedded::queue();
    let receipt = submitter
        .submit(Submission::Control(ControlOp::Revoke {
            agent: "did:key:d".into(),
            realm: String::new(),
            by: "t".into(),
            reason: None,
        }))
        .unwrap();
    assert_eq!(receipt.try_take(), None);
    let (_, answer) = custos_stage::Intake::recv(&mut intake, Duration::from_secs(1))
        .unwrap()
        .unwrap();
    answer.send(Ok(custos_stage::Appended::entries(vec![4])));
    assert_eq!(receipt.wait(Duration::from_secs(1)).unwrap().log_indexes, vec![4]);
    let late = submitter
        .submit(Submission::Control(ControlOp::Revoke {
            agent: "did:key:d".into(),
            realm: String::new(),
            by: "t".into(),
            reason: None,
        }))
        .unwrap();
    drop(intake);
    let refused = late.wait(Duration::from_secs(1)).unwrap_err();
    assert!(refused.retryable, "{refused:?}");
}

/// The lease log's rule: the first record after the holder's TTL has run out takes the
/// lease, and starts a later tenure; the holder's own records renew it; others wait.
#[cfg(feature = "kafka")]
#[test]
fn the_lease_goes_to_the_first_claim_after_the_holder_lapses() {
    use custos_stage::kafka::{LEASE_TTL, LeaseLog};
    let ttl = LEASE_TTL.as_millis() as i64;
    let mut log = LeaseLog::default();
    log.apply("a", 1_000);
    log.apply("b", 1_001);
    assert_eq!(log.holder, Some(("a".into(), 1_000)), "the first record wins");
    assert_eq!(log.epoch, Some(1_000), "a's tenure starts at its record");
    log.apply("a", 1_000 + ttl);
    log.apply("b", 1_000 + ttl + 10);
    assert_eq!(log.holder.as_ref().unwrap().0, "a", "renewed in time");
    assert_eq!(log.epoch, Some(1_000), "a renewal is the same tenure");
    // a stops renewing: b's next record after the TTL takes it, and a's late record does not.
    log.apply("b", 1_000 + 2 * ttl + 1);
    assert_eq!(log.holder, Some(("b".into(), 1_000 + 2 * ttl + 1)));
    let later = (1_000 + 2 * ttl + 1) as u64;
    assert_eq!(log.epoch, Some(later), "b's tenure is later than a's");
    log.apply("a", 1_000 + 2 * ttl + 2);
    assert_eq!(log.holder.as_ref().unwrap().0, "b");
    assert_eq!(log.epoch, Some(later));
}

#[test]
fn a_submission_goes_to_the_partition_of_its_realm() {
    // The documented rule: u32 little-endian of blake3(realm)[0..4], modulo the count.
    for realm in ["eng", "ops", "", "finance-eu"] {
        let hash = blake3::hash(realm.as_bytes());
        let first = u32::from_le_bytes(hash.as_bytes()[..4].try_into().unwrap());
        assert_eq!(wire::partition_for(realm, 3), (first % 3) as i32, "{realm}");
        assert_eq!(wire::partition_for(realm, 1), 0);
    }
    // Realms spread over every partition.
    let used: std::collections::BTreeSet<i32> =
        (0..30).map(|n| wire::partition_for(&format!("realm-{n}"), 3)).collect();
    assert_eq!(used, [0, 1, 2].into());
    // A batch, a finding and a revocation of one realm have one key.
    let batch = Submission::Events(custos_stage::EventBatch {
        remote: String::new(),
        realm: "eng".into(),
        items: Vec::new(),
    });
    let revoke = Submission::Control(ControlOp::Revoke {
        agent: "did:key:x".into(),
        realm: "eng".into(),
        by: "t".into(),
        reason: None,
    });
    assert_eq!(wire::submission_key(&batch), "eng");
    assert_eq!(wire::submission_key(&revoke), "eng");
    assert_eq!(
        wire::submission_partition(&revoke, 3),
        Ok(wire::partition_for("eng", 3))
    );
    // An adapter request goes to the empty key's partition until a writer routes it to
    // its realm's; a partition the topic does not have is refused, naming it.
    let mut request = custos_stage::AdapterRequest {
        route: "/v1/traces".into(),
        remote: String::new(),
        headers: Vec::new(),
        token_sha256: None,
        body: Vec::new(),
        partition: None,
        realm: None,
    };
    let adapter = |request: &custos_stage::AdapterRequest| Submission::Adapter(request.clone());
    assert_eq!(
        wire::submission_partition(&adapter(&request), 3),
        Ok(wire::partition_for("", 3))
    );
    // One placed by a realm the ingest node could tell goes to that realm's partition.
    request.realm = Some("eng".into());
    assert_ne!(wire::partition_for("eng", 3), wire::partition_for("", 3));
    assert_eq!(
        wire::submission_partition(&adapter(&request), 3),
        Ok(wire::partition_for("eng", 3))
    );
    request.partition = Some(2);
    assert_eq!(wire::submission_partition(&adapter(&request), 3), Ok(2));
    request.partition = Some(3);
    let error = wire::submission_partition(&adapter(&request), 3).unwrap_err();
    assert!(error.contains("partition 3") && error.contains("3"), "{error}");
}

/// A receipt is answered to a waiting thread or to an awaiting task (which holds no
/// thread); an answer dropped unsent is `stopping`, one that never comes times out, both
/// retryable.
#[test]
fn a_receipt_is_answered_to_a_thread_or_a_task() {
    let appended = || custos_stage::Appended::entries(vec![7]);
    // A thread, answered from another thread.
    let (answer, receipt) = custos_stage::receipt();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        answer.send(Ok(appended()));
    });
    assert_eq!(receipt.wait(Duration::from_secs(30)).unwrap().log_indexes, vec![7]);
    sender.join().unwrap();
    // Nothing comes: a retryable timeout.
    let (_answer, receipt) = custos_stage::receipt();
    let late = receipt.wait(Duration::from_millis(20)).unwrap_err();
    assert!(late.retryable && late.code == "writer_timeout", "{late:?}");
    assert!(receipt.try_take().is_none());
    // The answer is dropped unsent (a writer that stopped): `stopping`, not a hang.
    let (answer, receipt) = custos_stage::receipt();
    drop(answer);
    let stopped = receipt.wait(Duration::from_secs(30)).unwrap_err();
    assert!(stopped.retryable && stopped.code == "stopping", "{stopped:?}");

    // A task: woken by the answer, sent after it began waiting.
    let (answer, receipt) = custos_stage::receipt();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        answer.send(Ok(appended()));
    });
    let answered = futures::executor::block_on(receipt.answered()).unwrap();
    assert_eq!(answered.log_indexes, vec![7]);
    sender.join().unwrap();
    let (answer, receipt) = custos_stage::receipt();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(answer);
    });
    let stopped = futures::executor::block_on(receipt.answered()).unwrap_err();
    assert_eq!(stopped.code, "stopping");
    sender.join().unwrap();
}
