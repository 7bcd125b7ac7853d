//! Every tamper case `custos verify` promises to detect, each located.

use custos_store::segment;
use custos_store::verify::Problem;

use crate::support::{build_sealed, build_with_wal_tail, find, verify};

fn file_name(problem: &Problem) -> String {
    std::path::Path::new(&problem.file)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Rewrites a segment as a careful attacker would: a valid Parquet file with one change.
fn rewrite(path: &std::path::Path, change: impl FnOnce(&mut Vec<segment::Row>)) {
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    let mut decoded = segment::decode(bytes).unwrap();
    change(&mut decoded.rows);
    let entries: Vec<_> = decoded.rows.into_iter().map(|row| row.entry).collect();
    std::fs::write(path, segment::encode("0", &entries).unwrap()).unwrap();
}

#[test]
fn an_intact_store_verifies() {
    let built = build_sealed(95, 40);
    assert_eq!(built.segments().len(), 3);
    let report = verify(built.path());
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.logs[0].entries, 95);
    assert_eq!(report.logs[0].signatures_checked, 95);
}

#[test]
fn flipped_payload_byte_is_located_to_the_row() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[1];
    rewrite(segment, |rows| {
        let payload = &mut rows[7].entry.payload;
        let at = payload.len() - 5;
        payload[at] ^= 0x01;
    });
    let report = verify(built.path());
    let digest = find(&report, "payload_digest");
    assert_eq!((digest[0].row, digest[0].log_index), (Some(7), Some(47)));
    assert_eq!(file_name(digest[0]), file_name_of(segment));
    let bad = find(&report, "bad_signature");
    assert_eq!(bad[0].log_index, Some(47));
    find(&report, "segment_digest");
}

fn file_name_of(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn flipped_payload_byte_with_matching_digest_is_located_by_chain_and_signature() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[0];
    rewrite(segment, |rows| {
        let entry = &mut rows[10].entry;
        let at = entry.payload.len() - 5;
        entry.payload[at] ^= 0x01;
        entry.payload_blake3 = *blake3::hash(&entry.payload).as_bytes();
    });
    let report = verify(built.path());
    assert_eq!(find(&report, "bad_signature")[0].log_index, Some(10));
    // The agent's next event (three entries later) no longer chains to it.
    let broken = find(&report, "chain_broken");
    assert_eq!(broken[0].log_index, Some(13));
    assert!(broken[0].detail.contains("log index 10"), "{}", broken[0].detail);
    find(&report, "root_mismatch");
}

#[test]
fn flipped_signature_byte_is_located() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[2];
    rewrite(segment, |rows| rows[3].entry.sig[20] ^= 0x40);
    let report = verify(built.path());
    let bad = find(&report, "bad_signature");
    assert_eq!((bad[0].row, bad[0].log_index), (Some(3), Some(83)));
    assert_eq!(file_name(bad[0]), file_name_of(segment));
    find(&report, "root_mismatch");
}

#[test]
fn raw_byte_flip_in_a_segment_file_is_located_to_the_file() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[1];
    let mut bytes = std::fs::read(segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(segment, bytes).unwrap();
    let report = verify(built.path());
    let digest = find(&report, "segment_digest");
    assert_eq!(file_name(digest[0]), file_name_of(segment));
    assert_eq!(digest[0].log_index, Some(40));
}

#[test]
fn deleted_row_is_located() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[0];
    rewrite(segment, |rows| {
        rows.remove(25);
    });
    let report = verify(built.path());
    let moved = find(&report, "row_index");
    assert_eq!((moved[0].row, moved[0].log_index), (Some(25), Some(26)));
    assert!(moved[0].detail.contains("where 25 was expected"), "{}", moved[0].detail);
    find(&report, "segment_rows");
    find(&report, "segment_digest");
}

#[test]
fn deleted_segment_is_named() {
    let built = build_sealed(95, 40);
    let segment = built.segments()[1].clone();
    std::fs::remove_file(&segment).unwrap();
    let report = verify(built.path());
    let missing = find(&report, "segment_missing");
    assert_eq!(file_name(missing[0]), file_name_of(&segment));
    assert_eq!(missing[0].log_index, Some(40));
}

#[test]
fn deleted_segment_and_its_manifest_line_are_caught_by_the_checkpoints() {
    let built = build_sealed(95, 40);
    // The last segment and its manifest line vanish: the store now "ends" at 80.
    let segment = built.segments()[2].clone();
    std::fs::remove_file(&segment).unwrap();
    let manifest = built.path().join("logs/0/segments.ndjson");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let kept: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&manifest, format!("{}\n", kept.join("\n"))).unwrap();
    let report = verify(built.path());
    let beyond = find(&report, "checkpoint_beyond_log");
    assert_eq!(beyond[0].log_index, Some(80));
}

#[test]
fn truncated_segment_is_named() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[0];
    let bytes = std::fs::read(segment).unwrap();
    std::fs::write(segment, &bytes[..bytes.len() / 2]).unwrap();
    let report = verify(built.path());
    assert_eq!(file_name(find(&report, "segment_unreadable")[0]), file_name_of(segment));
    assert_eq!(file_name(find(&report, "segment_digest")[0]), file_name_of(segment));
}

#[test]
fn swapped_segments_are_both_named() {
    let built = build_sealed(120, 40);
    let (a, b) = (built.segments()[0].clone(), built.segments()[1].clone());
    let temporary = a.with_extension("swap");
    std::fs::rename(&a, &temporary).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&temporary, &b).unwrap();
    let report = verify(built.path());
    let digests: Vec<String> = find(&report, "segment_digest").into_iter().map(file_name).collect();
    assert!(
        digests.contains(&file_name_of(&a)) && digests.contains(&file_name_of(&b)),
        "{digests:?}"
    );
    find(&report, "segment_metadata");
    find(&report, "row_index");
}

#[test]
fn edited_checkpoint_is_located_to_its_line() {
    let built = build_sealed(95, 40);
    let path = built.path().join("logs/0/checkpoints.ndjson");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    // Claim a different size in the signed body of line 3.
    let mut line: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    let size = line["size"].as_u64().unwrap();
    let note = line["note"]
        .as_str()
        .unwrap()
        .replacen(&format!("\n{size}\n"), &format!("\n{}\n", size + 1), 1);
    line["note"] = note.into();
    lines[3] = line.to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let report = verify(built.path());
    let problem = find(&report, "checkpoint_signature");
    assert_eq!(problem[0].row, Some(3));
}

#[test]
fn replaced_checkpoint_is_detected() {
    let built = build_sealed(95, 40);
    let path = built.path().join("logs/0/checkpoints.ndjson");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut line: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    let note = line["note"].as_str().unwrap().to_owned();
    let body = &note[..note.find("\n\n").unwrap() + 1];
    let checkpoint = custos_store::checkpoint::Checkpoint::parse_body(body).unwrap();
    // Same origin and size, a root the attacker prefers, signed by the attacker's key.
    let forged = custos_store::checkpoint::Checkpoint {
        root: [0x42; 32],
        ..checkpoint.clone()
    };
    let attacker = custos_event::AgentKey::from_seed(&[0x66; 32]);
    line["note"] = custos_store::checkpoint::sign_note(&forged.body(), &checkpoint.origin, &attacker).into();
    lines[2] = line.to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let report = verify(built.path());
    assert_eq!(find(&report, "checkpoint_signature")[0].row, Some(2));

    // Replacing the published key too is caught when the verifier pins the real key.
    let real_key = report.logs[0].verifier_key.clone();
    let forged_key = custos_store::checkpoint::NoteKey {
        name: checkpoint.origin.clone(),
        public: attacker.public_key(),
    };
    std::fs::write(
        built.path().join("logs/0/checkpoint.pub"),
        forged_key.verifier_string() + "\n",
    )
    .unwrap();
    let pinned = custos_store::verify::verify_store(
        built.path(),
        &custos_store::verify::VerifyOptions {
            signatures: false,
            log_key: Some(real_key),
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    find(&pinned, "log_key_mismatch");
}

#[test]
fn corrupted_wal_record_is_located() {
    let built = build_with_wal_tail(40, 25);
    let wal = built.wal_files().last().unwrap().clone();
    let report = verify(built.path());
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.logs[0].wal_entries, 25);
    // Damage a record in the middle of the WAL.
    let mut bytes = std::fs::read(&wal).unwrap();
    let scan = custos_store::wal::scan(&bytes);
    let (offset, entry) = &scan.entries[10];
    bytes[*offset as usize + 40] ^= 0x01;
    std::fs::write(&wal, bytes).unwrap();
    let report = verify(built.path());
    let corrupt = find(&report, "wal_corrupt");
    assert_eq!(corrupt[0].log_index, Some(entry.log_index));
    assert_eq!(corrupt[0].log_index, Some(50));
    assert!(
        corrupt[0].detail.contains(&format!("byte {offset}")),
        "{}",
        corrupt[0].detail
    );
}

#[test]
fn edited_decoded_column_is_located() {
    let built = build_sealed(95, 40);
    let segment = &built.segments()[0];
    // Change what SQL sees (`kind`) while leaving the signed payload alone.
    let mut rows = segment::decode(bytes::Bytes::from(std::fs::read(segment).unwrap()))
        .unwrap()
        .rows;
    let kind = segment::STRING_FIELDS.iter().position(|name| *name == "kind").unwrap();
    rows[4].decoded.strings[kind] = Some("file_read".into());
    std::fs::write(segment, segment::encode_rows("0", &rows).unwrap()).unwrap();
    let report = verify(built.path());
    let problem = find(&report, "decoded_column");
    assert_eq!((problem[0].row, problem[0].log_index), (Some(4), Some(4)));
}

/// Segment files declare the low-cardinality text columns as Arrow dictionaries (so the query
/// engine reads their dictionary pages as they are), while Custos's readers still decode every
/// file, including one written before that, to the same rows.
#[test]
fn segments_declare_dictionaries_and_files_without_them_still_decode() {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let built = build_sealed(95, 40);
    let path = &built.segments()[0];
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    let embedded = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .unwrap()
        .schema()
        .clone();
    for field in embedded.fields() {
        let dictionary = matches!(field.data_type(), arrow::datatypes::DataType::Dictionary(_, _));
        assert_eq!(
            dictionary,
            segment::DICTIONARY_FIELDS.contains(&field.name().as_str()),
            "{field:?}"
        );
    }
    let decoded = segment::decode(bytes).unwrap();
    assert_eq!(decoded.rows.len(), 40);

    // The same rows written with the plain schema, as older segments are.
    let entries: Vec<_> = decoded.rows.iter().map(|row| row.entry.clone()).collect();
    let batch = segment::batch(&entries).unwrap();
    assert_eq!(batch.schema(), segment::schema());
    let mut plain = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut plain, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let again = segment::decode(bytes::Bytes::from(plain)).unwrap();
    let rows = |segment: &segment::Segment| -> Vec<_> {
        segment
            .rows
            .iter()
            .map(|row| (row.entry.clone(), row.decoded.clone()))
            .collect()
    };
    assert_eq!(rows(&again), rows(&decoded));
}

/// A segment with more distinct agents than fit the writer's dictionary page (1 MiB) falls
/// back to plain pages for `agent`; an Arrow reader that follows the embedded schema still
/// gets a dictionary column, row for row the same agents, and Custos's decoder the same rows.
#[test]
fn an_agent_column_past_the_dictionary_limit_still_reads_as_a_dictionary() {
    use arrow::array::AsArray as _;
    use arrow::datatypes::Int32Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Encoding;

    let agent = |n: usize| format!("did:key:z6Mk{n:0>44}");
    let entries: Vec<custos_store::LogEntry> = (0..30_000)
        .map(|n| {
            let payload = format!(
                r#"{{"agent":"{}","seq":0,"ts":"2026-12-03T00:00:00Z","realm":"eng","kind":"tool_call"}}"#,
                agent(n)
            )
            .into_bytes();
            custos_store::LogEntry {
                log_index: n as u64,
                ingest_ts_us: 1_700_000_000_000_000 + n as i64,
                payload_type: custos_event::EVENT_PAYLOAD_TYPE.to_owned(),
                keyid: agent(n),
                sig: [0; 64],
                payload_blake3: *blake3::hash(&payload).as_bytes(),
                payload,
                gap: None,
            }
        })
        .collect();
    let bytes = bytes::Bytes::from(segment::encode("0", &entries).unwrap());

    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
    let column = builder
        .parquet_schema()
        .columns()
        .iter()
        .position(|column| column.name() == "agent")
        .unwrap();
    let chunk = builder.metadata().row_group(0).column(column);
    let encodings: Vec<Encoding> = chunk.encodings().collect();
    assert!(
        encodings.contains(&Encoding::PLAIN),
        "the writer kept a dictionary for every page: {encodings:?}; raise the agent count"
    );
    let mut seen = 0;
    for batch in builder.build().unwrap() {
        let batch = batch.unwrap();
        let agents = batch.column_by_name("agent").unwrap().as_dictionary::<Int32Type>();
        let values = agents.values().as_string::<i32>();
        for row in 0..agents.len() {
            let key = agents.keys().value(row) as usize;
            assert_eq!(values.value(key), agent(seen), "row {seen}");
            seen += 1;
        }
    }
    assert_eq!(seen, entries.len());
    let decoded = segment::decode(bytes).unwrap();
    assert_eq!(decoded.rows.len(), entries.len());
    assert_eq!(decoded.rows[29_999].entry.keyid, agent(29_999));
}

/// A damaged segment on which the `parquet` decoder panics instead of erroring (found by
/// the `segment` fuzz target, then minimised). It must come back as an error, from both
/// decoding paths, and `verify` must name the file rather than crash.
#[test]
fn a_segment_the_parquet_decoder_panics_on_is_reported_not_fatal() {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from);
    let damaged = std::fs::read(dir.join("tests/data/segment-decoder-panic.parquet")).unwrap();

    let Err(error) = segment::decode(bytes::Bytes::from(damaged.clone())) else {
        panic!("decoded a damaged file")
    };
    assert!(matches!(error, segment::SegmentError::Damaged(_)), "{error}");
    assert!(error.to_string().contains("damaged data"), "{error}");

    let stream = segment::open_stream(bytes::Bytes::from(damaged.clone()), 1024);
    let errors: Vec<String> = match stream {
        Err(error) => vec![error.to_string()],
        Ok(reader) => reader.filter_map(Result::err).map(|error| error.to_string()).collect(),
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("damaged data"), "{errors:?}");

    let built = build_sealed(95, 40);
    let segment = &built.segments()[1];
    std::fs::write(segment, &damaged).unwrap();
    let report = verify(built.path());
    assert_eq!(file_name(find(&report, "segment_unreadable")[0]), file_name_of(segment));
    assert_eq!(file_name(find(&report, "segment_digest")[0]), file_name_of(segment));
}
