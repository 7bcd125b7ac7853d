//! Resource exhaustion: a seal that cannot get a descriptor leaves the log as it was, and
//! the log seals by itself once descriptors are back. (Each test runs in its own process
//! under nextest, so lowering this process's descriptor limit touches no other test.)

use crate::support::{append_events, open, signers, verify};

/// Opens `/dev/null` until the process has no descriptor left; returns them.
fn exhaust() -> Vec<std::fs::File> {
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(24), "expected EMFILE, got {error}");
                return held;
            }
        }
    }
}

#[test]
fn a_seal_without_descriptors_waits_and_then_seals() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path(), 20);
    let mut signers = signers();
    let mut entries = append_events(&mut log, &mut signers, 19);

    // A low limit, then every descriptor taken: the next seal cannot open its WAL file.
    let original = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: original.maximum,
        },
    )
    .unwrap();
    let held = exhaust();
    let entry = custos_store::LogEntry::from_envelope(
        signers[0].sign(custos_event::Payload::new(custos_event::Kind::Auth, chrono::Utc::now())),
        log.next_index(),
        1_700_000_000_000_000,
        None,
    );
    entries.push(entry.clone());
    // The append itself goes to the WAL file already open.
    log.append(vec![entry]).unwrap();
    let error = log.maintain().unwrap_err();
    assert!(error.to_string().contains("Too many open files"), "{error}");
    // Nothing moved: the entries are still open, readable, and in the WAL.
    assert_eq!(log.open_len(), 20);
    assert_eq!(log.tail().iter().map(|chunk| chunk.len()).sum::<usize>(), 20);
    assert!(log.segments().is_empty());

    // Descriptors back: the seal runs (after its retry pause, zero here) and completes.
    drop(held);
    setrlimit(Resource::Nofile, original).unwrap();
    log.maintain().unwrap();
    log.settle().unwrap();
    assert_eq!(log.segments().len(), 1);
    assert_eq!(log.segments()[0].end_index, 20);
    log.close().unwrap();
    let report = verify(dir.path());
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.logs[0].entries, entries.len() as u64);
}
