#![no_main]
//! Signed notes and verifier keys from an untrusted store or peer: must never panic.
use custos_store::checkpoint::{verify_checkpoint, Checkpoint, NoteKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = NoteKey::parse_verifier(text);
    let _ = Checkpoint::parse_body(text);
    let key = NoteKey { name: "custos/0123456789abcdef/0".into(), public: [0x42; 32] };
    let _ = verify_checkpoint(text, &key);
});
