//! A partition set: three partition stores, cross-partition checkpoints signed over their
//! heads, and what `verify` finds when a partition or a checkpoint is tampered with.

use custos_store::partitions::{CrossCheckpoint, CrossSigner, PartitionSet, latest_head, verify_cross_checkpoint};

use crate::support::{append_events, find, open, signers, verify};

/// A set of three partitions with 12, 0 and 25 events, a cross checkpoint signed after
/// each partition grew, and the set's directory.
fn build_set() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let set = PartitionSet::open_or_create(dir.path(), 3).unwrap();
    // A second opener (another writer starting) agrees on the same set.
    assert_eq!(PartitionSet::open_or_create(dir.path(), 3).unwrap(), set);
    let mut signer = CrossSigner::open(dir.path(), set.clone()).unwrap();
    // Nothing written yet: the heads are empty, and one checkpoint binds that.
    assert!(signer.tick().unwrap().is_some());
    assert!(signer.tick().unwrap().is_none(), "nothing moved");
    for (partition, count) in [(0u32, 12usize), (2, 25)] {
        let mut log = open(&PartitionSet::store_dir(dir.path(), partition), usize::MAX);
        append_events(&mut log, &mut signers(), count);
        log.close().unwrap();
        let checkpoint = signer.tick().unwrap().expect("a head moved");
        assert_eq!(checkpoint.heads[partition as usize].size, count as u64);
    }
    dir
}

#[test]
fn a_partition_set_verifies_and_binds_every_head() {
    let dir = build_set();
    let report = verify(dir.path());
    assert!(report.ok(), "{:#?}", report.problems);
    let set = report.partitions.as_ref().expect("a partition set");
    assert_eq!((set.partitions, set.checkpoints), (3, 3));
    // Partition 1 has no store: never written, bound as empty, a warning only.
    assert!(
        report
            .warnings
            .iter()
            .any(|warning| warning.contains("partition 1 has no store"))
    );
    assert_eq!(
        report.logs.iter().map(|log| log.log_id.as_str()).collect::<Vec<_>>(),
        ["0/0", "2/0"]
    );
    let head = latest_head(dir.path(), 2).unwrap();
    assert_eq!(head.size, 25);
    // The note round-trips through its published key.
    let key = custos_store::checkpoint::NoteKey::parse_verifier(
        &std::fs::read_to_string(PartitionSet::public_key_path(dir.path())).unwrap(),
    )
    .unwrap();
    let text = std::fs::read_to_string(PartitionSet::checkpoints_path(dir.path())).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let checkpoint = verify_cross_checkpoint(last["note"].as_str().unwrap(), &key).unwrap();
    assert_eq!(CrossCheckpoint::parse_body(&checkpoint.body()).unwrap(), checkpoint);
    assert_eq!(checkpoint.heads[2], head);
}

#[test]
fn a_partition_cut_back_below_its_bound_head_is_found() {
    let dir = build_set();
    // Drop partition 2's checkpoints (and with them its claim to 25 entries).
    let checkpoints = PartitionSet::store_dir(dir.path(), 2).join("logs/0/checkpoints.ndjson");
    let text = std::fs::read_to_string(&checkpoints).unwrap();
    let kept: Vec<&str> = text.lines().take(1).collect();
    std::fs::write(&checkpoints, format!("{}\n", kept.join("\n"))).unwrap();
    let report = verify(dir.path());
    let found = find(&report, "cross_head");
    assert!(found[0].detail.contains("partition 2"), "{found:?}");
}

#[test]
fn a_deleted_partition_is_found() {
    let dir = build_set();
    std::fs::remove_dir_all(PartitionSet::store_dir(dir.path(), 0)).unwrap();
    let report = verify(dir.path());
    // The bound head of partition 0 no longer matches any store.
    assert!(find(&report, "cross_head")[0].detail.contains("partition 0"));
    assert!(
        report
            .warnings
            .iter()
            .any(|warning| warning.contains("partition 0 has no store"))
    );
}

#[test]
fn an_edited_or_reordered_cross_checkpoint_is_found() {
    let dir = build_set();
    let path = PartitionSet::checkpoints_path(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    // A bound size changed in the note: the signature no longer verifies.
    let edited = text.replacen("\\n2 25 ", "\\n2 24 ", 1);
    assert_ne!(edited, text);
    std::fs::write(&path, &edited).unwrap();
    let report = verify(dir.path());
    assert_eq!(find(&report, "cross_signature")[0].row, Some(2));
    // Validly signed lines out of order: a head goes back.
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(1, 2);
    std::fs::write(&path, format!("{}\n", lines.join("\n"))).unwrap();
    let report = verify(dir.path());
    find(&report, "cross_order");
    // Another key's notes are not the set's.
    std::fs::write(&path, &text).unwrap();
    let options = custos_store::verify::VerifyOptions {
        partitions_key: Some(
            custos_store::checkpoint::NoteKey {
                name: PartitionSet::open(dir.path()).unwrap().unwrap().origin(),
                public: custos_event::AgentKey::from_seed(&[42; 32]).public_key(),
            }
            .verifier_string(),
        ),
        ..Default::default()
    };
    let report = custos_store::verify::verify_store(dir.path(), &options, &mut |_, _| {}).unwrap();
    assert_eq!(find(&report, "cross_signature").len(), 3);
}
