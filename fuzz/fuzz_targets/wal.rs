#![no_main]
//! WAL bytes (as found on a damaged disk) → records: must never panic or over-allocate.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = custos_store::wal::MAGIC.to_vec();
    bytes.extend_from_slice(data);
    let _ = custos_store::wal::scan(&bytes);
    let _ = custos_store::wal::scan(data);
});
