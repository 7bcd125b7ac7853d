#![no_main]
//! An OTLP/HTTP trace body from a collector → spans mapped to event members: must never
//! panic, on protobuf or on OTLP-JSON, and every event it makes must be one the signer
//! takes or refuses with a reason.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for protobuf in [true, false] {
        if let Ok((groups, total, ignored)) = custos_ingest::otlp::events_of(data, protobuf) {
            assert!(ignored <= total);
            let key = custos_event::AgentKey::from_seed(&[7; 32]);
            let mut signer = custos_event::Signer::new(key, "fuzz");
            for (_, events) in groups {
                for event in events {
                    let _ = signer.sign_object(event, chrono::DateTime::UNIX_EPOCH);
                }
            }
        }
    }
});
