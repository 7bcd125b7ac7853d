#![no_main]
//! Segment files from untrusted storage → rows, through both decoding paths (whole file,
//! as the node and the evidence verifier read it; streamed, as `custos verify` does): must
//! never panic. The `parquet` crate panics on some damaged pages; `segment` contains those
//! at its boundary and returns `SegmentError::Damaged`, so only a panic that escapes the
//! boundary reaches libFuzzer as a crash.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = custos_store::segment::decode(bytes.clone());
    if let Ok(reader) = custos_store::segment::open_stream(bytes, 64) {
        for batch in reader {
            if batch.is_err() {
                break;
            }
        }
    }
});
