//! One test per weakness the detection review named (issue "detection that holds up on
//! fleets we did not simulate"), each a case the earlier detector got wrong, plus the
//! two new scenarios (probing, an audit class switched off) and the crowd check.

use super::*;

/// Monday 2026-11-02 00:00 UTC: two weeks before `t0()`'s week.
fn monday() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 2, 0, 0, 0).unwrap()
}

/// `per_minute` ordinary tool calls a minute for `minutes` minutes.
fn minutes_of(
    feed: &mut Feed,
    agent: &str,
    from: DateTime<Utc>,
    minutes: i64,
    per_minute: i64,
    bytes: u64,
) -> Vec<Finding> {
    let mut found = Vec::new();
    for minute in 0..minutes {
        for i in 0..per_minute {
            let at = from + Duration::minutes(minute) + Duration::milliseconds(i * 55_000 / per_minute.max(1));
            found.extend(feed.event(agent, Kind::ToolCall, at, |p| {
                p.action = Some(format!("tool{}", i % 3));
                p.target = Some(format!("repo/{}", i % 4));
                p.outcome = Some(Outcome::Ok);
                p.bytes_out = Some(bytes + (i as u64 % 7) * bytes / 10);
            }));
        }
    }
    found
}

fn types(found: &[Finding]) -> Vec<&str> {
    found.iter().map(|finding| finding.finding_type.as_str()).collect()
}

/// Weakness 1: a finding's score was the single largest deviation, so an attack moving
/// several features a little each was never flagged.
#[test]
fn several_small_signals_add_up_to_a_finding() {
    let attack = |feed: &mut Feed, at: DateTime<Utc>, with_credential: bool| {
        minutes_of(feed, AGENT, at, 1, 10, 1000);
        feed.event(AGENT, Kind::ToolCall, at + Duration::seconds(56), |p| {
            p.action = Some("http.post".into());
            p.target = Some("https://collector.example.net/in".into());
            p.bytes_out = Some(900);
        });
        if with_credential {
            feed.event(AGENT, Kind::CredentialUse, at + Duration::seconds(57), |p| {
                p.action = Some("vault.read".into());
            });
        }
        settle(feed, at + Duration::minutes(2))
    };
    let mut feed = Feed::new();
    assert!(minutes_of(&mut feed, AGENT, t0(), 400, 10, 1000).is_empty());
    let found = attack(&mut feed, t0() + Duration::minutes(400), true);
    let anomaly = found
        .iter()
        .find(|finding| finding.finding_type == "anomaly")
        .unwrap_or_else(|| panic!("first outward tool + new destination + first credential use: {found:?}"));
    let features: Vec<&str> = anomaly.explanation.iter().map(|c| c.feature.as_str()).collect();
    assert!(features.len() >= 3, "each signal is explained: {features:?}");
    assert!(
        features.contains(&"credential_use") && features.contains(&"new_tools"),
        "{features:?}"
    );
    assert!(
        anomaly.explanation.iter().all(|c| c.deviation < 5.8),
        "no single signal would do: {:?}",
        anomaly.explanation
    );

    // Near miss: the new outward tool alone is not enough.
    let mut feed = Feed::new();
    minutes_of(&mut feed, AGENT, t0(), 400, 10, 1000);
    let found = attack(&mut feed, t0() + Duration::minutes(400), false);
    assert!(found.is_empty(), "{found:?}");
}

/// Weakness 2: error and denial rates were capped at 5 deviations, so an agent going from
/// 0% to 100% denied went unflagged. Near miss: the same after a policy change.
#[test]
fn a_switch_to_all_denied_is_probing_unless_a_policy_changed() {
    let denied_minute = |feed: &mut Feed, at: DateTime<Utc>| {
        for i in 0..10 {
            feed.event(AGENT, Kind::ToolCall, at + Duration::seconds(i * 5), |p| {
                p.action = Some(format!("tool{}", i % 3));
                p.target = Some(format!("repo/{}", i % 4));
                p.outcome = Some(Outcome::Denied);
                p.bytes_out = Some(1000);
            });
        }
        settle(feed, at + Duration::minutes(1))
    };
    let mut feed = Feed::new();
    minutes_of(&mut feed, AGENT, t0(), 100, 10, 1000);
    let found = denied_minute(&mut feed, t0() + Duration::minutes(100));
    assert_eq!(types(&found), ["probing"], "{found:?}");
    assert_eq!(found[0].explanation[0].feature, "denials");
    assert_eq!(found[0].evidence.len(), 10, "the denied calls are the evidence");

    let mut feed = Feed::new();
    minutes_of(&mut feed, AGENT, t0(), 100, 10, 1000);
    feed.event(OTHER, Kind::PolicyChange, t0() + Duration::minutes(95), |p| {
        p.action = Some("permissions.update".into());
    });
    let found = denied_minute(&mut feed, t0() + Duration::minutes(100));
    assert!(found.is_empty(), "denials right after a permission change: {found:?}");
}

/// Weakness 3: an hour of the week became "unusual" after 500 events, on a busy agent's
/// first day, and every new hour then raised an off-hours anomaly.
#[test]
fn unusual_hours_are_not_judged_in_the_first_weeks() {
    let mut feed = Feed::new();
    let mut found = Vec::new();
    // A bursty weekday agent: minutes of 5 and of 40 events, 09:00-17:00, Monday to Friday.
    for day in 0..5 {
        let from = monday() + Duration::days(day) + Duration::hours(9);
        for minute in 0..480 {
            let n = if minute % 2 == 0 { 5 } else { 40 };
            found.extend(minutes_of(
                &mut feed,
                AGENT,
                from + Duration::minutes(minute),
                1,
                n,
                500,
            ));
        }
    }
    // Saturday 03:00: an ordinary burst at an hour never seen before.
    let saturday = monday() + Duration::days(5) + Duration::hours(3);
    found.extend(minutes_of(&mut feed, AGENT, saturday, 1, 40, 500));
    found.extend(settle(&mut feed, saturday + Duration::minutes(2)));
    assert!(found.is_empty(), "{found:?}");
}

/// A weekday agent: `per_minute` events a minute, 09:00-17:00, for `days` days from `from`.
fn office_days(feed: &mut Feed, agent: &str, from: DateTime<Utc>, days: i64, per_minute: i64) -> Vec<Finding> {
    let mut found = Vec::new();
    for day in 0..days {
        let date = from + Duration::days(day);
        if date.weekday().num_days_from_monday() >= 5 {
            continue;
        }
        found.extend(minutes_of(feed, agent, date + Duration::hours(9), 480, per_minute, 800));
    }
    found
}

use chrono::Datelike as _;

/// Weakness 4: silence needed 48 of the last 64 minutes active, so agents that work in
/// sessions never qualified. Now: expected volume from the weekly rhythm against what
/// arrived; a whole realm going quiet at once (a holiday) is not one agent's silence.
/// One event a minute in the office makes one-event bursts: ten expected bursts missing
/// take ten minutes.
#[test]
fn silence_is_judged_against_the_expected_volume() {
    let mut feed = Feed::new();
    let office: Vec<String> = (0..4).map(|i| format!("did:key:z6Mkoffice{i}")).collect();
    let holiday: Vec<String> = (0..4).map(|i| format!("did:key:z6Mkcolleague{i}")).collect();
    let mut found = Vec::new();
    for day in 0..14 {
        let date = monday() + Duration::days(day);
        for agent in office.iter().chain(&holiday) {
            found.extend(office_days(&mut feed, agent, date, 1, 1));
        }
        // Nights and weekends pass by (ticks every 10 minutes).
        for step in 0..144 {
            found.extend(feed.detector.tick((date + Duration::minutes(step * 10)).timestamp()));
        }
    }
    assert!(
        found.iter().all(|finding| finding.finding_type != "silence"),
        "nights and weekends are not silence: {found:?}"
    );
    // Monday of week three is a holiday: the whole realm stays quiet. That is not eight
    // agents gone silent.
    let day = monday() + Duration::days(14);
    let mut found = Vec::new();
    for step in 0..=18 {
        found.extend(
            feed.detector
                .tick((day + Duration::hours(9) + Duration::minutes(step * 10)).timestamp()),
        );
    }
    let silent: Vec<&Finding> = found.iter().filter(|f| f.finding_type == "silence").collect();
    assert!(silent.is_empty(), "{silent:?}");

    // The same with only one agent stopping: reported within two hours of 09:00.
    let mut feed = Feed::new();
    for day in 0..14 {
        let date = monday() + Duration::days(day);
        for agent in &office {
            office_days(&mut feed, agent, date, 1, 1);
        }
        for step in 0..144 {
            feed.detector.tick((date + Duration::minutes(step * 10)).timestamp());
        }
    }
    let mut found = Vec::new();
    for agent in office.iter().skip(1) {
        found.extend(minutes_of(&mut feed, agent, day + Duration::hours(9), 120, 1, 800));
    }
    for step in 0..=12 {
        found.extend(
            feed.detector
                .tick((day + Duration::hours(9) + Duration::minutes(step * 10)).timestamp()),
        );
    }
    let silent: Vec<&Finding> = found.iter().filter(|f| f.finding_type == "silence").collect();
    assert_eq!(silent.len(), 1, "{found:?}");
    assert_eq!(silent[0].agent, office[0]);
    assert!(silent[0].ts <= day + Duration::hours(11), "{:?}", silent[0]);
}

/// Weakness 5: `bytes_out` had a fixed minimum spread of 50 000, so an agent whose
/// windows hold a few KB could grow twenty-fold unseen.
#[test]
fn the_bytes_floor_scales_with_the_agents_own_level() {
    let mut feed = Feed::new();
    minutes_of(&mut feed, AGENT, t0(), 100, 10, 300);
    let at = t0() + Duration::minutes(100);
    minutes_of(&mut feed, AGENT, at, 1, 10, 6000);
    let found = settle(&mut feed, at + Duration::minutes(1));
    let anomaly = found
        .iter()
        .find(|f| f.finding_type == "anomaly")
        .unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(anomaly.explanation[0].feature, "bytes_out");
}

/// Weakness 6: the baseline followed a slow ramp, so a steady rise over days never
/// tripped the drift test. Near miss: a noisy agent without a trend.
#[test]
fn a_slow_ramp_over_days_is_reported_as_drift() {
    let run = |ramp: bool| {
        let mut feed = Feed::new();
        let mut found = minutes_of(&mut feed, AGENT, t0(), 300, 3, 1000);
        let start = t0() + Duration::minutes(300);
        let total = 2 * 24 * 60;
        for minute in 0..total {
            let factor = if ramp {
                1.0 + 39.0 * minute as f64 / total as f64
            } else {
                1.0
            };
            let noise = [1.0, 0.6, 1.5, 0.8, 1.2][(minute % 5) as usize];
            let bytes = (1000.0 * factor * noise) as u64;
            found.extend(minutes_of(
                &mut feed,
                AGENT,
                start + Duration::minutes(minute),
                1,
                3,
                bytes,
            ));
        }
        found.extend(feed.detector.flush());
        (found, start)
    };
    let (found, start) = run(true);
    let drift = found
        .iter()
        .find(|f| f.finding_type == "drift")
        .unwrap_or_else(|| panic!("no drift over two days: {:?}", types(&found)));
    assert!(drift.ts <= start + Duration::days(2), "{drift:?}");
    assert!(drift.explanation[0].feature.starts_with("bytes"), "{drift:?}");
    let (found, _) = run(false);
    assert!(found.iter().all(|f| f.finding_type != "drift"), "{found:?}");
}

/// Weakness 7: an untrusted memory write followed by a credential use within the hour
/// fired, though it is what research and support agents do all day. The attack is
/// provenance: the untrusted memory is read back, then a credential is used.
#[test]
fn memory_poisoning_needs_the_untrusted_memory_read_back() {
    let mut feed = Feed::new();
    feed.event(AGENT, Kind::MemoryWrite, t0(), |p| {
        p.memory_id = Some("mem-42".into());
        p.attrs = attrs(json!({"source_trust": "untrusted"}));
    });
    let found = feed.event(AGENT, Kind::CredentialUse, t0() + Duration::minutes(3), |p| {
        p.target = Some("vault://ops/db".into());
    });
    assert!(
        found.is_empty(),
        "an untrusted note, then a credential: benign: {found:?}"
    );

    // Written from untrusted content (an inbound message in its session) by one agent,
    // read back by another, which then uses a credential.
    let mut feed = Feed::new();
    feed.event(OTHER, Kind::MessageReceived, t0(), |p| {
        p.session = Some("inbox".into());
        p.target = Some("https://mail.example.com/msg/1".into());
    });
    feed.event(OTHER, Kind::MemoryWrite, t0() + Duration::seconds(10), |p| {
        p.session = Some("inbox".into());
        p.memory_id = Some("runbook".into());
    });
    feed.event(AGENT, Kind::MemoryRead, t0() + Duration::minutes(30), |p| {
        p.session = Some("deploy".into());
        p.memory_id = Some("runbook".into());
    });
    let found = feed.event(AGENT, Kind::CredentialUse, t0() + Duration::minutes(31), |p| {
        p.session = Some("deploy".into());
        p.target = Some("vault://ops/prod-db-admin".into());
    });
    assert_eq!(types(&found), ["memory_poisoning"], "{found:?}");
    assert_eq!(found[0].evidence, [2, 3, 4], "write, read-back, credential use");
    assert_eq!(
        found[0].memories[0], "runbook",
        "the poisoned memory is named for quarantine"
    );
    assert_eq!(found[0].severity.as_str(), "critical");

    // Near miss: a trusted memory read back before the credential use.
    let mut feed = Feed::new();
    feed.event(AGENT, Kind::MemoryWrite, t0(), |p| p.memory_id = Some("notes".into()));
    feed.event(AGENT, Kind::MemoryRead, t0() + Duration::minutes(1), |p| {
        p.memory_id = Some("notes".into())
    });
    let found = feed.event(AGENT, Kind::CredentialUse, t0() + Duration::minutes(2), |p| {
        p.target = Some("vault://ops/db".into());
    });
    assert!(found.is_empty(), "{found:?}");
}

/// Weakness 8: exfiltration relied on `attrs.sensitivity` and `attrs.destination`, which
/// most agents never send. Now: untrusted content, then a send in the same session to a
/// destination neither the agent nor its realm ever sent to.
#[test]
fn injection_then_a_send_to_a_new_destination_is_exfiltration_without_labels() {
    let mut feed = Feed::new();
    // The realm's history: a day of work, and a partner API it sends to.
    minutes_of(&mut feed, AGENT, t0(), 1450, 1, 500);
    feed.event(OTHER, Kind::ToolCall, t0() + Duration::minutes(10), |p| {
        p.action = Some("http.post".into());
        p.target = Some("https://api.partner.example.com/orders".into());
    });
    let at = t0() + Duration::minutes(1451);
    let received = feed.event(AGENT, Kind::MessageReceived, at, |p| {
        p.session = Some("s-9".into());
        p.target = Some("ticket://88".into());
    });
    assert!(received.is_empty());
    let received_index = feed.index;
    let found = feed.event(AGENT, Kind::ToolCall, at + Duration::seconds(20), |p| {
        p.session = Some("s-9".into());
        p.action = Some("http.post".into());
        p.target = Some("https://paste.attacker.example.net/u".into());
        p.bytes_out = Some(700);
    });
    assert_eq!(types(&found), ["exfiltration"], "{found:?}");
    assert_eq!(found[0].evidence, [received_index, feed.index]);
    assert!(found[0].ts - at <= Duration::seconds(60));

    // Near misses: a first-time send with nothing untrusted in its session; untrusted
    // content then a send where the realm already sends; a fetch (not a send).
    let found = feed.event(AGENT, Kind::ToolCall, at + Duration::seconds(30), |p| {
        p.session = Some("s-10".into());
        p.action = Some("http.post".into());
        p.target = Some("https://new-partner.example.org/hook".into());
    });
    assert!(found.is_empty(), "{found:?}");
    feed.event(AGENT, Kind::MessageReceived, at + Duration::seconds(40), |p| {
        p.session = Some("s-11".into());
        p.target = Some("ticket://89".into());
    });
    for (action, target) in [
        ("http.post", "https://api.partner.example.com/orders"),
        ("web.fetch", "https://docs.never-seen.example/page"),
    ] {
        let found = feed.event(AGENT, Kind::ToolCall, at + Duration::seconds(50), |p| {
            p.session = Some("s-11".into());
            p.action = Some(action.into());
            p.target = Some(target.into());
        });
        assert!(found.is_empty(), "{action} {target}: {found:?}");
    }
}

/// Weakness 9: a once-a-day limit per rule and agent let one finding suppress the next,
/// different one. Now a repeat is a finding on events already cited.
#[test]
fn a_finding_does_not_hide_the_next_one_on_other_events() {
    let mut feed = Feed::new();
    let mut bursts = Vec::new();
    for burst in 0..2 {
        let from = t0() + Duration::minutes(burst * 10);
        let mut found = Vec::new();
        for i in 0..25 {
            found.extend(feed.event(AGENT, Kind::MemoryDelete, from + Duration::seconds(i), |p| {
                p.memory_id = Some(format!("m{burst}-{i}"));
            }));
        }
        let rule: Vec<&Finding> = found
            .iter()
            .filter(|f| f.rule_id.as_deref() == Some("custos-memory-delete-burst"))
            .collect();
        assert_eq!(
            rule.len(),
            1,
            "burst {burst}: one finding, not one per delete: {found:?}"
        );
        bursts.push(rule[0].evidence.clone());
    }
    assert!(bursts[0].iter().all(|index| !bursts[1].contains(index)));
}

/// Weakness 10: a correlation finding cited the first 16 events of its minute, not the
/// events that matched.
#[test]
fn a_rule_finding_cites_exactly_the_matched_events() {
    let mut feed = Feed::new();
    minutes_of(&mut feed, AGENT, t0(), 1, 20, 500);
    feed.event(AGENT, Kind::FileRead, t0() + Duration::seconds(56), |p| {
        p.session = Some("s1".into());
        p.target = Some("/secrets/customers.csv".into());
        p.attrs = attrs(json!({"sensitivity": "secret"}));
    });
    let read = feed.index;
    minutes_of(&mut feed, AGENT, t0() + Duration::minutes(1), 1, 20, 500);
    let found = feed.event(
        AGENT,
        Kind::MessageSent,
        t0() + Duration::minutes(1) + Duration::seconds(58),
        |p| {
            p.session = Some("s1".into());
            p.target = Some("https://paste.example.net/x".into());
            p.attrs = attrs(json!({"destination": "external"}));
        },
    );
    let rule = found
        .iter()
        .find(|f| f.rule_id.as_deref() == Some("custos-exfil-after-injection"))
        .unwrap_or_else(|| panic!("{found:?}"));
    assert_eq!(rule.evidence, [read, feed.index]);
}

/// New scenario: one class of events stops while the rest continues (audit switched off
/// at the source for that class).
#[test]
fn an_event_class_that_stops_while_the_rest_continues_is_an_audit_gap() {
    let mut feed = Feed::new();
    let mut found = Vec::new();
    let mut at = t0();
    for minute in 0..200 {
        for i in 0..10 {
            at = t0() + Duration::minutes(minute) + Duration::seconds(i * 5);
            let kind = if i % 5 == 0 { Kind::MemoryRead } else { Kind::ToolCall };
            // After minute 120 the memory reads are no longer reported.
            if kind == Kind::MemoryRead && minute >= 120 {
                continue;
            }
            found.extend(feed.event(AGENT, kind, at, |p| {
                p.action = Some("tool0".into());
                p.target = Some("repo/1".into());
            }));
        }
    }
    found.extend(settle(&mut feed, at + Duration::minutes(40)));
    let gaps: Vec<&Finding> = found.iter().filter(|f| f.finding_type == "audit_gap").collect();
    assert_eq!(gaps.len(), 1, "{found:?}");
    assert!(gaps[0].title.contains("memory_read"), "{}", gaps[0].title);
    assert!(gaps[0].ts < t0() + Duration::minutes(150), "{:?}", gaps[0].ts);
}

/// A fleet-wide change (a deploy that gives every agent of a realm a new tool and new
/// targets at once) is not an attack on each agent; the same change on one agent is.
#[test]
fn a_realm_changing_at_once_is_not_one_anomaly_per_agent() {
    let agents: Vec<String> = (0..6).map(|i| format!("did:key:z6Mkfleet{i}")).collect();
    let mut feed = Feed::new();
    for minute in 0..100 {
        for agent in &agents {
            minutes_of(&mut feed, agent, t0() + Duration::minutes(minute), 1, 5, 500);
        }
    }
    let change = |feed: &mut Feed, agent: &str, at: DateTime<Utc>| {
        for i in 0..6 {
            feed.event(agent, Kind::ToolCall, at + Duration::seconds(i), |p| {
                p.action = Some("deploy.v2".into());
                p.target = Some(format!("https://v2-{i}.rollout.example.com/"));
            });
        }
        feed.event(agent, Kind::CredentialUse, at + Duration::seconds(7), |p| {
            p.action = Some("vault.read".into())
        });
    };
    let at = t0() + Duration::minutes(100);
    for agent in &agents {
        change(&mut feed, agent, at);
    }
    let found = settle(&mut feed, at + Duration::minutes(1));
    assert!(found.iter().all(|f| f.finding_type != "anomaly"), "{found:?}");
    let later = t0() + Duration::minutes(140);
    for minute in 101..140 {
        for agent in &agents {
            minutes_of(&mut feed, agent, t0() + Duration::minutes(minute), 1, 5, 500);
        }
    }
    for i in 0..6 {
        feed.event(&agents[0], Kind::ToolCall, later + Duration::seconds(i), |p| {
            p.action = Some("shell.exec".into());
            p.target = Some(format!("https://c2-{i}.attacker.example.net/"));
        });
    }
    feed.event(&agents[0], Kind::Delegation, later + Duration::seconds(8), |p| {
        p.target = Some("did:key:z6Mkchild".into());
    });
    let found = settle(&mut feed, later + Duration::minutes(1));
    assert!(
        found
            .iter()
            .any(|f| f.finding_type == "anomaly" && f.agent == agents[0]),
        "{found:?}"
    );
}

/// Weakness 6, second half: nothing measured concentration, such as more and more calls
/// going to one new recipient. Now the share of outward sends going to destinations the
/// agent first sent to in the last three days is watched by the drift test. Near miss:
/// one send to a new partner, then business as usual.
#[test]
fn more_and_more_sends_to_one_new_recipient_is_drift() {
    let run = |concentrate: bool| {
        let mut feed = Feed::new();
        let start = t0() - Duration::days(4);
        let send = |feed: &mut Feed, at: DateTime<Utc>, target: &str| {
            feed.event(AGENT, Kind::ToolCall, at, |p| {
                p.action = Some("http.post".into());
                p.target = Some(target.into());
                p.bytes_out = Some(800);
            })
        };
        let mut found = send(&mut feed, start, "https://api.partner.example.com/orders");
        for minute in 0..400 {
            let at = t0() + Duration::minutes(minute);
            found.extend(send(&mut feed, at, "https://api.partner.example.com/orders"));
            found.extend(send(
                &mut feed,
                at + Duration::seconds(20),
                "https://api.partner.example.com/orders",
            ));
        }
        let ramp = t0() + Duration::minutes(400);
        let minutes = 24 * 60;
        for minute in 0..minutes {
            let at = ramp + Duration::minutes(minute);
            // The share of sends to the new recipient climbs from 0 to 1 over the day.
            let to_new = concentrate && (minute * 7919) % minutes < minute;
            let single = !concentrate && minute == 30;
            let target = if to_new || single {
                "https://drop.new-recipient.example/in"
            } else {
                "https://api.partner.example.com/orders"
            };
            found.extend(send(&mut feed, at, target));
            found.extend(send(
                &mut feed,
                at + Duration::seconds(20),
                if to_new {
                    target
                } else {
                    "https://api.partner.example.com/orders"
                },
            ));
        }
        found.extend(feed.detector.flush());
        (found, ramp)
    };
    let (found, ramp) = run(true);
    let drift = found
        .iter()
        .find(|f| f.finding_type == "drift" && f.explanation[0].feature == "young_destination_share")
        .unwrap_or_else(|| panic!("no concentration drift: {:?}", types(&found)));
    assert!(drift.ts <= ramp + Duration::days(2), "{drift:?}");
    let (found, _) = run(false);
    assert!(
        found.iter().all(|f| f.finding_type != "drift"),
        "one send to a new partner: {found:?}"
    );
}
