//! Recovery: replay, torn tails, and refusing to start on damage.

use crate::support::{append_events, build_with_wal_tail, open, verify};

#[test]
fn reopening_replays_the_wal_without_loss_or_duplicates() {
    let built = build_with_wal_tail(30, 17);
    let before = {
        let mut seen = Vec::new();
        let info = custos_store::StoreInfo::open(built.path(), false).unwrap();
        let log = custos_store::Log::open(
            built.path(),
            &info.store_id,
            "0",
            crate::support::config(30),
            custos_store::OpenMode::ReadWrite,
            &mut |entry| seen.push(entry.log_index),
        )
        .unwrap();
        assert_eq!(seen, (0..47).collect::<Vec<u64>>());
        assert_eq!(log.open_len(), 17);
        log.tree().root()
    };
    let mut tree = custos_store::merkle::Tree::new();
    for entry in &built.entries {
        tree.push(entry.leaf_hash());
    }
    assert_eq!(before, tree.root());
}

#[test]
fn a_torn_tail_is_dropped_and_the_log_continues() {
    let built = build_with_wal_tail(30, 5);
    let wal = built.wal_files().last().unwrap().clone();
    // A crash in the middle of a write: half a record at the end.
    let mut record = Vec::new();
    let mut next = built.entries[3].clone();
    next.log_index = 35;
    custos_store::wal::encode_record(&next, &mut record);
    let mut file = std::fs::OpenOptions::new().append(true).open(&wal).unwrap();
    std::io::Write::write_all(&mut file, &record[..record.len() / 2]).unwrap();
    drop(file);
    let report = verify(built.path());
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);

    let mut log = open(built.path(), 30);
    assert_eq!(log.next_index(), 35);
    let mut signers = built.signers.clone();
    let _ = append_events(&mut log, &mut signers, 3);
    log.close().unwrap();
    let report = verify(built.path());
    assert!(report.ok(), "{:#?}", report.problems);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(report.logs[0].entries, 38);
}

#[test]
fn damage_before_the_tail_refuses_to_start() {
    let built = build_with_wal_tail(30, 10);
    let wal = built.wal_files().last().unwrap().clone();
    let mut bytes = std::fs::read(&wal).unwrap();
    let scan = custos_store::wal::scan(&bytes);
    let (offset, _) = scan.entries[2];
    bytes[offset as usize + 20] ^= 0x10;
    std::fs::write(&wal, bytes).unwrap();
    let error = reopen(built.path()).unwrap_err();
    assert!(error.to_string().contains("corrupt"), "{error}");
    assert!(error.to_string().contains("log index 32"), "{error}");
}

#[test]
fn a_checkpoint_beyond_the_stored_entries_refuses_to_start() {
    let built = build_with_wal_tail(30, 12);
    // Lose the WAL: acknowledged, checkpointed entries are gone.
    for file in built.wal_files() {
        std::fs::remove_file(file).unwrap();
    }
    let error = reopen(built.path()).unwrap_err();
    assert!(
        error.to_string().contains("acknowledged entries are missing"),
        "{error}"
    );
}

fn reopen(dir: &std::path::Path) -> Result<custos_store::Log, custos_store::StoreError> {
    let info = custos_store::StoreInfo::open(dir, false).unwrap();
    custos_store::Log::open(
        dir,
        &info.store_id,
        "0",
        crate::support::config(30),
        custos_store::OpenMode::ReadWrite,
        &mut |_| {},
    )
}

#[test]
fn entries_that_disagree_with_the_signed_checkpoint_refuse_to_start() {
    let built = build_with_wal_tail(30, 12);
    // Rewrite a checkpointed WAL record with a valid checksum: only the tree can tell.
    let wal = built.wal_files().last().unwrap().clone();
    let bytes = std::fs::read(&wal).unwrap();
    let scan = custos_store::wal::scan(&bytes);
    let mut forged = Vec::from(custos_store::wal::MAGIC.as_slice());
    for (position, (_, entry)) in scan.entries.iter().enumerate() {
        let mut entry = entry.clone();
        if position == 3 {
            entry.ingest_ts_us += 1;
        }
        custos_store::wal::encode_record(&entry, &mut forged);
    }
    std::fs::write(&wal, forged).unwrap();
    let error = reopen(built.path()).unwrap_err();
    assert!(
        error.to_string().contains("do not match the signed checkpoint"),
        "{error}"
    );
    let report = verify(built.path());
    let mismatch = report.problems.iter().find(|problem| problem.code == "root_mismatch");
    assert!(mismatch.is_some(), "{:#?}", report.problems);
}

#[test]
fn checkpoints_follow_the_interval_as_well_as_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let info = custos_store::StoreInfo::open(dir.path(), true).unwrap();
    let config = custos_store::LogConfig {
        segment_max_entries: 1_000,
        checkpoint_every: 1_000,
        checkpoint_interval: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let mut log = custos_store::Log::open(
        dir.path(),
        &info.store_id,
        "0",
        config,
        custos_store::OpenMode::ReadWrite,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        log.latest_checkpoint().unwrap().0.size,
        0,
        "a new log signs its empty tree"
    );
    let mut signers = crate::support::signers();
    append_events(&mut log, &mut signers, 2);
    assert_eq!(
        log.latest_checkpoint().unwrap().0.size,
        0,
        "neither 1000 entries nor 50 ms yet"
    );
    std::thread::sleep(std::time::Duration::from_millis(60));
    log.maintain().unwrap();
    let (checkpoint, note) = log.latest_checkpoint().unwrap().clone();
    assert_eq!(checkpoint.size, 2);
    custos_store::checkpoint::verify_checkpoint(&note, log.note_key()).unwrap();
}

/// With `seal_after`, a quiet log seals its few open entries once the oldest is that old;
/// without it, only the entry count seals. A log reopened with open entries in its WAL
/// counts their age from the reopening.
#[test]
fn a_quiet_log_seals_after_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let info = custos_store::StoreInfo::open(dir.path(), true).unwrap();
    let config = |seal_after| custos_store::LogConfig {
        segment_max_entries: 1_000,
        seal_after,
        seal_retry: std::time::Duration::ZERO,
        ..Default::default()
    };
    let open = |seal_after| {
        custos_store::Log::open(
            dir.path(),
            &info.store_id,
            "0",
            config(seal_after),
            custos_store::OpenMode::ReadWrite,
            &mut |_| {},
        )
        .unwrap()
    };
    let mut signers = crate::support::signers();
    // By size only: three entries stay open however long they wait.
    let mut log = open(None);
    append_events(&mut log, &mut signers, 3);
    std::thread::sleep(std::time::Duration::from_millis(80));
    log.maintain().unwrap();
    log.settle().unwrap();
    assert_eq!((log.segments().len(), log.open_len()), (0, 3));
    drop(log);

    // Reopened with a 50 ms bound: the recovered entries are young at first, then sealed.
    let mut log = open(Some(std::time::Duration::from_millis(50)));
    assert_eq!(log.open_len(), 3);
    log.maintain().unwrap();
    log.settle().unwrap();
    assert_eq!(log.segments().len(), 0, "recovered entries age from the reopening");
    std::thread::sleep(std::time::Duration::from_millis(80));
    log.maintain().unwrap();
    log.settle().unwrap();
    assert_eq!((log.segments().len(), log.sealed_end()), (1, 3));
    // The next entry starts a new clock.
    append_events(&mut log, &mut signers, 1);
    log.settle().unwrap();
    assert_eq!(log.segments().len(), 1, "a fresh entry is not old yet");
    std::thread::sleep(std::time::Duration::from_millis(80));
    log.maintain().unwrap();
    log.settle().unwrap();
    assert_eq!((log.segments().len(), log.sealed_end()), (2, 4));
}
