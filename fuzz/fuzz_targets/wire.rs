#![no_main]
//! Records read from the Kafka topics (submissions, receipts, committed records) → the
//! stage contract's decoders, and every committed record into a query node's replica:
//! must never panic, a committed record that decodes must encode and decode to the same
//! record, and the replica's view stays an unbroken prefix of the log.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = custos_stage::wire::decode_submission(data);
    let _ = custos_stage::wire::decode_receipt(data);
    if let Ok(records) = custos_stage::wire::decode_committed(data) {
        let mut replica = custos_ingest::replica::Replica::new(std::env::temp_dir().join("custos-fuzz-replica"), 4);
        for record in &records {
            replica.apply(record);
            let bytes = custos_stage::wire::encode_committed(record).expect("a decoded record encodes");
            assert_eq!(
                custos_stage::wire::decode_committed(&bytes).expect("an encoded record decodes"),
                std::slice::from_ref(record)
            );
        }
        // Nothing is sealed: the view is an unbroken run of entries from log index 0.
        let view = replica.view();
        let shown: usize = view.tail.iter().map(|chunk| chunk.len()).sum();
        assert_eq!(shown as u64, view.size);
        let _ = replica.agents();
    }
});
