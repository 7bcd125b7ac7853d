#![no_main]
//! Wire bytes → envelope → signature check → payload: must never panic.
use custos_event::verify::{check_event, verify_one, LOG_PAYLOAD_TYPES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = custos_event::decode_envelope(data, 1 << 20, &LOG_PAYLOAD_TYPES) {
        let _ = verify_one(&decoded.key, &decoded.envelope);
        let _ = check_event(decoded.envelope);
    }
});
