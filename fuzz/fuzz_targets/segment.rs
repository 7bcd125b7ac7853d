#![no_main]
//! Segment files from untrusted storage → rows: must never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custos_store::segment::decode(bytes::Bytes::copy_from_slice(data));
});
