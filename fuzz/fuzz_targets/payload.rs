#![no_main]
//! Signed payload bytes → validated event: must never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(payload) = custos_event::Payload::parse(data) {
        let _ = payload.prev_digest();
    }
});
