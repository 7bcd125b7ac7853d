#![no_main]
//! A LastID audit record from an agent → parsed, canonicalised and checked by LastID's
//! rules: must never panic, and a record that verifies must verify again from its
//! canonical bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = custos_event::lastid::Record::parse(data) {
        let _ = record.canonical();
        let _ = record.kind();
        let key = [0x5a; 32];
        let _ = record.verify(&key);
        if let Some(key) = custos_event::lastid::key_of(&record.agent_did) {
            let _ = record.verify(&key);
        }
    }
});
