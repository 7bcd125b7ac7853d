//! Sealed segments: zstd Parquet files, one row per log entry.
//!
//! Every row keeps the raw signed `payload`, the `sig` and the `payload_blake3` beside the
//! decoded columns, so any row can be re-verified from the file alone. The decoded columns
//! are a convenience for SQL engines; `custos verify` re-derives them from the payload.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, FixedSizeBinaryArray, FixedSizeBinaryBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, TimestampMicrosecondBuilder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::entry::{EntryRef, LogEntry};

/// Key-value metadata keys written into every segment footer.
pub const META_LOG_ID: &str = "custos.log_id";
pub const META_FIRST_INDEX: &str = "custos.first_index";
pub const META_END_INDEX: &str = "custos.end_index";
pub const META_FORMAT: &str = "custos.format";

pub const STRING_FIELDS: [&str; 13] = [
    "agent",
    "prev",
    "realm",
    "kind",
    "action",
    "target",
    "outcome",
    "session",
    "trace_id",
    "span_id",
    "parent",
    "memory_id",
    "attrs",
];
pub const NUMBER_FIELDS: [&str; 5] = ["seq", "bytes_in", "bytes_out", "tokens_in", "tokens_out"];

/// Text columns with far fewer distinct values than rows per segment (a few kinds and
/// outcomes, tens of realms and actions, thousands of agents in a million rows). In the
/// file they are ordinary
/// dictionary-encoded Parquet strings like every other text column; only the Arrow schema
/// embedded in the footer (`ARROW:schema`) declares them `Dictionary(Int32, Utf8)`, so an
/// Arrow reader that follows it (the query engine) gets the dictionary pages as they are,
/// keys only, instead of one string per row. Custos's own readers ask for [`schema`].
pub const DICTIONARY_FIELDS: [&str; 6] = ["payload_type", "agent", "realm", "kind", "action", "outcome"];

/// The decoded columns of one row, derived from its payload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Values of [`STRING_FIELDS`], in order. `attrs` is the object as compact JSON.
    pub strings: [Option<String>; 13],
    /// Values of [`NUMBER_FIELDS`], in order.
    pub numbers: [Option<u64>; 5],
    /// `ts` in microseconds since the epoch.
    pub ts_us: Option<i64>,
}

impl Decoded {
    /// Extracts the decoded columns from payload JSON. Fields of the wrong type are left
    /// null rather than failing: the payload bytes are the record, these are an index.
    pub fn from_payload(payload: &[u8]) -> Self {
        Self::parse(payload).0
    }

    /// [`Decoded::from_payload`], also saying whether the payload is a JSON object.
    ///
    /// The common case (every field of the expected type) is parsed without building a
    /// JSON tree; anything unusual falls back to the general path, with the same result.
    pub fn parse(payload: &[u8]) -> (Self, bool) {
        if let Ok(fields) = serde_json::from_slice::<Fields<'_>>(payload) {
            return (fields.into_decoded(), true);
        }
        let value = serde_json::from_slice::<serde_json::Value>(payload).ok();
        let object = matches!(value, Some(serde_json::Value::Object(_)));
        (Self::from_json(value.as_ref()), object)
    }

    /// [`Decoded::from_payload`] for a payload already parsed.
    pub fn from_json(value: Option<&serde_json::Value>) -> Self {
        let mut decoded = Decoded::default();
        let Some(serde_json::Value::Object(object)) = value else {
            return decoded;
        };
        for (slot, name) in decoded.strings.iter_mut().zip(STRING_FIELDS) {
            *slot = match object.get(name) {
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(value @ serde_json::Value::Object(_)) if name == "attrs" => Some(value.to_string()),
                _ => None,
            };
        }
        for (slot, name) in decoded.numbers.iter_mut().zip(NUMBER_FIELDS) {
            *slot = object.get(name).and_then(serde_json::Value::as_u64);
        }
        decoded.ts_us = object
            .get("ts")
            .and_then(serde_json::Value::as_str)
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .map(|ts| ts.timestamp_micros());
        decoded
    }
}

impl Decoded {
    /// A borrowed view, for comparisons that should not allocate.
    pub fn view(&self) -> DecodedRef<'_> {
        DecodedRef {
            strings: std::array::from_fn(|slot| self.strings[slot].as_deref()),
            numbers: self.numbers,
            ts_us: self.ts_us,
        }
    }
}

/// [`Decoded`] borrowed from wherever it lies (an Arrow batch, a [`Decoded`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedRef<'a> {
    pub strings: [Option<&'a str>; 13],
    pub numbers: [Option<u64>; 5],
    pub ts_us: Option<i64>,
}

impl DecodedRef<'_> {
    pub fn to_owned_decoded(&self) -> Decoded {
        Decoded {
            strings: self.strings.map(|slot| slot.map(str::to_owned)),
            numbers: self.numbers,
            ts_us: self.ts_us,
        }
    }
}

/// What one parse of a payload tells the verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadCheck {
    /// The payload is a JSON object.
    pub json: bool,
    /// The stored decoded columns are exactly those derived from the payload.
    pub columns_match: bool,
    pub seq: Option<u64>,
    /// `prev`, when it is 64 hex digits.
    pub prev: Option<[u8; 32]>,
}

/// Parses `payload` once: compares it with the `stored` decoded columns (when given)
/// without building owned copies in the common case, and extracts the chain link.
pub fn check_payload(payload: &[u8], stored: Option<DecodedRef<'_>>) -> PayloadCheck {
    let hex32 = |text: &str| {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok().map(|()| out)
    };
    if let Ok(fields) = serde_json::from_slice::<Fields<'_>>(payload) {
        let columns_match = stored.is_none_or(|stored| fields.matches(&stored));
        return PayloadCheck {
            json: true,
            columns_match,
            seq: fields.seq,
            prev: fields.prev.as_deref().and_then(hex32),
        };
    }
    let (derived, json) = Decoded::parse(payload);
    PayloadCheck {
        json,
        columns_match: stored.is_none_or(|stored| stored == derived.view()),
        seq: derived.numbers[0],
        prev: derived.strings[1].as_deref().and_then(hex32),
    }
}

/// The decoded fields, borrowed from the payload where possible.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    agent: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    prev: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    realm: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    target: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    outcome: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    session: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    trace_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    span_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    parent: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    memory_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    attrs: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    bytes_in: Option<u64>,
    #[serde(default)]
    bytes_out: Option<u64>,
    #[serde(default)]
    tokens_in: Option<u64>,
    #[serde(default)]
    tokens_out: Option<u64>,
    #[serde(borrow, default)]
    ts: Option<std::borrow::Cow<'a, str>>,
}

impl Fields<'_> {
    /// Whether `stored` equals `self.into_decoded()`, without allocating for strings.
    fn matches(&self, stored: &DecodedRef<'_>) -> bool {
        let strings = [
            &self.agent,
            &self.prev,
            &self.realm,
            &self.kind,
            &self.action,
            &self.target,
            &self.outcome,
            &self.session,
            &self.trace_id,
            &self.span_id,
            &self.parent,
            &self.memory_id,
        ];
        let strings_match = strings
            .iter()
            .zip(&stored.strings)
            .all(|(ours, theirs)| ours.as_deref() == *theirs);
        let numbers = [self.seq, self.bytes_in, self.bytes_out, self.tokens_in, self.tokens_out];
        let ts_us = self
            .ts
            .as_deref()
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .map(|ts| ts.timestamp_micros());
        let attrs = self
            .attrs
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
            .filter(serde_json::Value::is_object)
            .map(|value| value.to_string());
        strings_match && numbers == stored.numbers && ts_us == stored.ts_us && attrs.as_deref() == stored.strings[12]
    }

    fn into_decoded(self) -> Decoded {
        let own = |value: Option<std::borrow::Cow<'_, str>>| value.map(std::borrow::Cow::into_owned);
        // Same as the general path: `attrs` only when it is an object, as compact JSON.
        let attrs = self
            .attrs
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok())
            .filter(serde_json::Value::is_object)
            .map(|value| value.to_string());
        Decoded {
            strings: [
                own(self.agent),
                own(self.prev),
                own(self.realm),
                own(self.kind),
                own(self.action),
                own(self.target),
                own(self.outcome),
                own(self.session),
                own(self.trace_id),
                own(self.span_id),
                own(self.parent),
                own(self.memory_id),
                attrs,
            ],
            numbers: [self.seq, self.bytes_in, self.bytes_out, self.tokens_in, self.tokens_out],
            ts_us: self
                .ts
                .and_then(|text| chrono::DateTime::parse_from_rfc3339(&text).ok())
                .map(|ts| ts.timestamp_micros()),
        }
    }
}

/// The Arrow schema embedded in a segment file: [`schema`] with the [`DICTIONARY_FIELDS`]
/// as dictionaries.
pub fn file_schema() -> SchemaRef {
    let logical = schema();
    let fields: Vec<Field> = logical
        .fields()
        .iter()
        .map(|field| {
            if DICTIONARY_FIELDS.contains(&field.name().as_str()) {
                field.as_ref().clone().with_data_type(dictionary())
            } else {
                field.as_ref().clone()
            }
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, logical.metadata().clone()))
}

fn dictionary() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Reader options that decode a segment as [`schema`], whatever Arrow schema the file
/// embeds (older segments embed `schema` itself).
pub(crate) fn read_options() -> parquet::arrow::arrow_reader::ArrowReaderOptions {
    parquet::arrow::arrow_reader::ArrowReaderOptions::new().with_schema(schema())
}

/// The Arrow schema of a segment, as Custos reads and writes rows.
pub fn schema() -> SchemaRef {
    let utc: Arc<str> = Arc::from("UTC");
    let timestamp = DataType::Timestamp(TimeUnit::Microsecond, Some(utc));
    let mut fields = vec![
        Field::new("log_index", DataType::UInt64, false),
        Field::new("ingest_ts", timestamp.clone(), false),
        Field::new("payload_type", DataType::Utf8, false),
        Field::new("keyid", DataType::Utf8, false),
        Field::new("ts", timestamp, true),
    ];
    fields.extend(STRING_FIELDS.iter().map(|name| Field::new(*name, DataType::Utf8, true)));
    fields.extend(
        NUMBER_FIELDS
            .iter()
            .map(|name| Field::new(*name, DataType::UInt64, true)),
    );
    fields.extend([
        Field::new("gap_from", DataType::UInt64, true),
        Field::new("gap_to", DataType::UInt64, true),
        Field::new("payload", DataType::Binary, false),
        Field::new("sig", DataType::FixedSizeBinary(64), false),
        Field::new("payload_blake3", DataType::FixedSizeBinary(32), false),
    ]);
    Arc::new(Schema::new(fields))
}

/// Why a segment could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("column `{0}` is missing or has the wrong type")]
    Column(&'static str),
    /// The Parquet decoder panicked on the bytes instead of returning an error (it does on
    /// some damaged pages); contained at this boundary and reported as damage.
    #[error("parquet: the decoder failed on damaged data ({0})")]
    Damaged(String),
}

thread_local! {
    /// Set while this thread runs a contained decoding step.
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `step` with this thread marked as contained: a panic in it is expected damage
/// and is not printed by the panic hook (the error that [`contain`] returns says it).
/// The hook is wrapped once per process; panics anywhere else still reach the hook that
/// was installed before, unchanged.
fn quietly<T>(step: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            CONTAINED.with(|flag| flag.set(self.0));
        }
    }
    let _reset = Reset(CONTAINED.with(|flag| flag.replace(true)));
    step()
}

/// Runs a Parquet decoding step, turning a panic inside the decoder into
/// [`SegmentError::Damaged`]. The `parquet` crate still panics on some malformed pages (found
/// by fuzzing the `segment` target); segment bytes come from disk or an evidence bundle and
/// are untrusted, so damage must be reported and located, not abort the reader.
pub(crate) fn contain<T>(step: impl FnOnce() -> Result<T, SegmentError>) -> Result<T, SegmentError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| quietly(step)))
        .unwrap_or_else(|panic| Err(SegmentError::Damaged(panic_message(panic.as_ref()))))
}

/// The message a caught panic carries (`panic!` with a literal or a formatted string).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".to_owned())
}

/// Encodes entries as one zstd Parquet file.
pub fn encode<'a>(log_id: &str, entries: impl IntoIterator<Item = &'a LogEntry>) -> Result<Vec<u8>, SegmentError> {
    encode_with_seqs(log_id, entries).map(|(bytes, _)| bytes)
}

/// [`encode`], also returning each row's decoded `seq` (for the segment's
/// [`crate::seqindex`]).
pub fn encode_with_seqs<'a>(
    log_id: &str,
    entries: impl IntoIterator<Item = &'a LogEntry>,
) -> Result<(Vec<u8>, Vec<Option<u64>>), SegmentError> {
    let entries: Vec<&LogEntry> = entries.into_iter().collect();
    let decoded: Vec<Decoded> = entries
        .iter()
        .map(|entry| Decoded::from_payload(&entry.payload))
        .collect();
    let bytes = write(log_id, entries.iter().copied().zip(&decoded))?;
    Ok((bytes, decoded.iter().map(|decoded| decoded.numbers[0]).collect()))
}

/// The rows a segment would hold for `entries`, as one Arrow batch of [`schema`]: how
/// readers see entries not yet sealed (the query engine's view of the tail).
pub fn batch<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> Result<RecordBatch, SegmentError> {
    let entries: Vec<&LogEntry> = entries.into_iter().collect();
    let decoded: Vec<Decoded> = entries
        .iter()
        .map(|entry| Decoded::from_payload(&entry.payload))
        .collect();
    record_batch(entries.iter().copied().zip(&decoded))
}

/// Encodes rows with the decoded columns they carry (tests use it to forge columns).
pub fn encode_rows(log_id: &str, rows: &[Row]) -> Result<Vec<u8>, SegmentError> {
    write(log_id, rows.iter().map(|row| (&row.entry, &row.decoded)))
}

fn write<'a>(
    log_id: &str,
    rows: impl ExactSizeIterator<Item = (&'a LogEntry, &'a Decoded)> + Clone,
) -> Result<Vec<u8>, SegmentError> {
    let entries: Vec<&LogEntry> = rows.clone().map(|(entry, _)| entry).collect();
    let batch = record_batch(rows)?;
    let first = entries.first().map_or(0, |entry| entry.log_index);
    let end = entries.last().map_or(0, |entry| entry.log_index + 1);
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(128 * 1024))
        .set_key_value_metadata(Some(vec![
            parquet::file::metadata::KeyValue::new(META_LOG_ID.into(), log_id.to_owned()),
            parquet::file::metadata::KeyValue::new(META_FIRST_INDEX.into(), first.to_string()),
            parquet::file::metadata::KeyValue::new(META_END_INDEX.into(), end.to_string()),
            parquet::file::metadata::KeyValue::new(META_FORMAT.into(), "1".to_owned()),
        ]))
        .build();
    let file_schema = file_schema();
    let columns = file_schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| arrow::compute::cast(column, field.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    let batch = RecordBatch::try_new(file_schema, columns)?;
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(out)
}

fn record_batch<'a>(
    rows_in: impl ExactSizeIterator<Item = (&'a LogEntry, &'a Decoded)> + Clone,
) -> Result<RecordBatch, SegmentError> {
    let rows = rows_in.len();
    // Byte totals first, so each builder allocates once instead of doubling (and copying)
    // its way up to a segment's tens of megabytes.
    let mut text_bytes = [0usize; 3];
    let mut string_bytes = [0usize; STRING_FIELDS.len()];
    for (entry, decoded) in rows_in.clone() {
        text_bytes[0] += entry.payload_type.len();
        text_bytes[1] += entry.keyid.len();
        text_bytes[2] += entry.payload.len();
        for (total, value) in string_bytes.iter_mut().zip(&decoded.strings) {
            *total += value.as_ref().map_or(0, String::len);
        }
    }
    let mut log_index = UInt64Builder::with_capacity(rows);
    let mut ingest_ts = TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC");
    let mut payload_type = StringBuilder::with_capacity(rows, text_bytes[0]);
    let mut keyid = StringBuilder::with_capacity(rows, text_bytes[1]);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC");
    let mut strings: Vec<StringBuilder> = string_bytes
        .iter()
        .map(|&bytes| StringBuilder::with_capacity(rows, bytes))
        .collect();
    let mut numbers: Vec<UInt64Builder> = NUMBER_FIELDS
        .iter()
        .map(|_| UInt64Builder::with_capacity(rows))
        .collect();
    let mut gap_from = UInt64Builder::with_capacity(rows);
    let mut gap_to = UInt64Builder::with_capacity(rows);
    let mut payload = BinaryBuilder::with_capacity(rows, text_bytes[2]);
    let mut sig = FixedSizeBinaryBuilder::with_capacity(rows, 64);
    let mut digest = FixedSizeBinaryBuilder::with_capacity(rows, 32);
    for (entry, decoded) in rows_in {
        log_index.append_value(entry.log_index);
        ingest_ts.append_value(entry.ingest_ts_us);
        payload_type.append_value(&entry.payload_type);
        keyid.append_value(&entry.keyid);
        ts.append_option(decoded.ts_us);
        for (builder, value) in strings.iter_mut().zip(&decoded.strings) {
            builder.append_option(value.as_deref());
        }
        for (builder, value) in numbers.iter_mut().zip(decoded.numbers) {
            builder.append_option(value);
        }
        gap_from.append_option(entry.gap.map(|gap| gap.0));
        gap_to.append_option(entry.gap.map(|gap| gap.1));
        payload.append_value(&entry.payload);
        sig.append_value(entry.sig)?;
        digest.append_value(entry.payload_blake3)?;
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(log_index.finish()),
        Arc::new(ingest_ts.finish()),
        Arc::new(payload_type.finish()),
        Arc::new(keyid.finish()),
        Arc::new(ts.finish()),
    ];
    columns.extend(strings.iter_mut().map(|builder| Arc::new(builder.finish()) as ArrayRef));
    columns.extend(numbers.iter_mut().map(|builder| Arc::new(builder.finish()) as ArrayRef));
    columns.extend([
        Arc::new(gap_from.finish()) as ArrayRef,
        Arc::new(gap_to.finish()),
        Arc::new(payload.finish()),
        Arc::new(sig.finish()),
        Arc::new(digest.finish()),
    ]);
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// One row read back from a segment: the entry as stored and its decoded columns as stored.
#[derive(Debug, Clone)]
pub struct Row {
    pub entry: LogEntry,
    pub decoded: Decoded,
}

/// A decoded segment file.
#[derive(Debug, Default)]
pub struct Segment {
    pub rows: Vec<Row>,
    pub metadata: Vec<(String, String)>,
}

impl Segment {
    pub fn meta(&self, key: &str) -> Option<&str> {
        meta(&self.metadata, key)
    }
}

/// The value of footer key `key`.
pub fn meta<'a>(metadata: &'a [(String, String)], key: &str) -> Option<&'a str> {
    metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A file's key/value footer metadata.
fn footer(metadata: &parquet::file::metadata::ParquetMetaData) -> Vec<(String, String)> {
    metadata
        .file_metadata()
        .key_value_metadata()
        .map(|pairs| {
            pairs
                .iter()
                .map(|pair| (pair.key.clone(), pair.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// Decodes a whole segment file.
pub fn decode(bytes: Bytes) -> Result<Segment, SegmentError> {
    contain(|| decode_unguarded(bytes))
}

fn decode_unguarded(bytes: Bytes) -> Result<Segment, SegmentError> {
    use parquet::arrow::arrow_reader::ArrowReaderMetadata;
    use rayon::prelude::*;
    let reader_metadata = ArrowReaderMetadata::load(&bytes, read_options())?;
    let metadata = footer(reader_metadata.metadata());
    // Row groups decode independently, on every core.
    let groups = reader_metadata.metadata().num_row_groups();
    let parts = (0..groups)
        .into_par_iter()
        .map(|group| {
            // On a rayon worker: mark it too, so a contained panic there stays quiet.
            quietly(|| {
                let builder =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(bytes.clone(), reader_metadata.clone())
                        .with_row_groups(vec![group]);
                let mut rows = Vec::new();
                for batch in builder.build()? {
                    read_batch(&batch?, &mut rows)?;
                }
                Ok(rows)
            })
        })
        .collect::<Result<Vec<Vec<Row>>, SegmentError>>()?;
    Ok(Segment {
        rows: parts.into_iter().flatten().collect(),
        metadata,
    })
}

/// A segment opened for streaming: the footer's key/value metadata at once, then its rows
/// in batches, so a reader can hand rows on before the whole file is decoded.
pub struct SegmentReader {
    pub metadata: Vec<(String, String)>,
    batches: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    /// The decoder panicked: its state is not to be trusted, so the stream ends.
    failed: bool,
}

/// Opens a segment file for streaming, `batch_rows` rows at a time. A truncated file fails
/// here (no footer); damage inside a page fails at the batch that holds it.
pub fn open_stream(bytes: Bytes, batch_rows: usize) -> Result<SegmentReader, SegmentError> {
    contain(|| {
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, read_options())?
            .with_batch_size(batch_rows.max(1));
        let metadata = footer(builder.metadata());
        Ok(SegmentReader {
            metadata,
            batches: builder.build()?,
            failed: false,
        })
    })
}

impl Iterator for SegmentReader {
    /// A batch whose columns have been checked: [`BatchView::new`] succeeds on it.
    type Item = Result<RecordBatch, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let batches = &mut self.batches;
        let next = contain(|| Ok(batches.next())).transpose()?;
        if matches!(next, Err(SegmentError::Damaged(_))) {
            self.failed = true;
        }
        Some(next.and_then(|batch| {
            let batch = batch?;
            BatchView::new(&batch)?;
            Ok(batch)
        }))
    }
}

/// The Merkle leaf hash of every row of a segment file, in log order: what a reader
/// that checks tree heads needs, without keeping the rows.
pub fn leaf_hashes(bytes: Vec<u8>) -> Result<Vec<crate::merkle::Hash>, SegmentError> {
    let mut leaves = Vec::new();
    for batch in open_stream(Bytes::from(bytes), 64 * 1024)? {
        let batch = batch?;
        let view = BatchView::new(&batch)?;
        for row in 0..view.len() {
            leaves.push(view.entry(row)?.leaf_hash());
        }
    }
    Ok(leaves)
}

/// blake3 of a whole file, hashed on every core.
pub fn file_digest(bytes: &[u8]) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update_rayon(bytes);
    hasher.finalize().to_hex().to_string()
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &'static str) -> Result<&'a T, SegmentError> {
    batch
        .column_by_name(name)
        .and_then(|array| array.as_any().downcast_ref::<T>())
        .ok_or(SegmentError::Column(name))
}

/// The columns of one decoded record batch, checked for presence and type once, so rows
/// can be viewed in place.
pub struct BatchView<'a> {
    log_index: &'a UInt64Array,
    ingest_ts: &'a TimestampMicrosecondArray,
    payload_type: &'a StringArray,
    keyid: &'a StringArray,
    ts: &'a TimestampMicrosecondArray,
    strings: [&'a StringArray; 13],
    numbers: [&'a UInt64Array; 5],
    gap_from: &'a UInt64Array,
    gap_to: &'a UInt64Array,
    payload: &'a BinaryArray,
    sig: &'a FixedSizeBinaryArray,
    digest: &'a FixedSizeBinaryArray,
    rows: usize,
}

impl<'a> BatchView<'a> {
    pub fn new(batch: &'a RecordBatch) -> Result<Self, SegmentError> {
        let mut strings = Vec::with_capacity(STRING_FIELDS.len());
        for name in STRING_FIELDS {
            strings.push(column::<StringArray>(batch, name)?);
        }
        let mut numbers = Vec::with_capacity(NUMBER_FIELDS.len());
        for name in NUMBER_FIELDS {
            numbers.push(column::<UInt64Array>(batch, name)?);
        }
        let sig: &FixedSizeBinaryArray = column(batch, "sig")?;
        let digest: &FixedSizeBinaryArray = column(batch, "payload_blake3")?;
        if sig.value_length() != 64 {
            return Err(SegmentError::Column("sig"));
        }
        if digest.value_length() != 32 {
            return Err(SegmentError::Column("payload_blake3"));
        }
        Ok(Self {
            log_index: column(batch, "log_index")?,
            ingest_ts: column(batch, "ingest_ts")?,
            payload_type: column(batch, "payload_type")?,
            keyid: column(batch, "keyid")?,
            ts: column(batch, "ts")?,
            strings: strings.try_into().map_err(|_| SegmentError::Column("agent"))?,
            numbers: numbers.try_into().map_err(|_| SegmentError::Column("seq"))?,
            gap_from: column(batch, "gap_from")?,
            gap_to: column(batch, "gap_to")?,
            payload: column(batch, "payload")?,
            sig,
            digest,
            rows: batch.num_rows(),
        })
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Row `row` (below [`BatchView::len`]) as stored.
    pub fn entry(&self, row: usize) -> Result<EntryRef<'a>, SegmentError> {
        let option_u64 = |array: &UInt64Array| (!array.is_null(row)).then(|| array.value(row));
        Ok(EntryRef {
            log_index: self.log_index.value(row),
            ingest_ts_us: self.ingest_ts.value(row),
            payload_type: self.payload_type.value(row),
            keyid: self.keyid.value(row),
            sig: self
                .sig
                .value(row)
                .try_into()
                .map_err(|_| SegmentError::Column("sig"))?,
            payload: self.payload.value(row),
            payload_blake3: self
                .digest
                .value(row)
                .try_into()
                .map_err(|_| SegmentError::Column("payload_blake3"))?,
            gap: option_u64(self.gap_from).zip(option_u64(self.gap_to)),
        })
    }

    /// Row `row`'s decoded columns as stored.
    pub fn decoded(&self, row: usize) -> DecodedRef<'a> {
        DecodedRef {
            strings: self
                .strings
                .map(|array| (!array.is_null(row)).then(|| array.value(row))),
            numbers: self
                .numbers
                .map(|array| (!array.is_null(row)).then(|| array.value(row))),
            ts_us: (!self.ts.is_null(row)).then(|| self.ts.value(row)),
        }
    }
}

/// The entries of a segment file whose payload type is one of `types`, in log order.
/// Reads the `payload_type` column, then only the rows that match (positioned reads: the
/// rest of the file is not read).
pub fn read_types(path: &std::path::Path, types: &[&str]) -> Result<Vec<LogEntry>, SegmentError> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
    let open =
        || std::fs::File::open(path).map_err(|error| SegmentError::Damaged(format!("{}: {error}", path.display())));
    let (file, again) = (open()?, open()?);
    contain(move || {
        let builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, read_options())?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), ["payload_type"]);
        let mut selectors = Vec::new();
        let mut skipped = 0usize;
        let mut any = false;
        for batch in builder.with_projection(mask).with_batch_size(64 * 1024).build()? {
            let batch = batch?;
            let column: &StringArray = column(&batch, "payload_type")?;
            for row in 0..batch.num_rows() {
                if types.contains(&column.value(row)) {
                    if skipped > 0 {
                        selectors.push(RowSelector::skip(skipped));
                        skipped = 0;
                    }
                    selectors.push(RowSelector::select(1));
                    any = true;
                } else {
                    skipped += 1;
                }
            }
        }
        if !any {
            return Ok(Vec::new());
        }
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(again, read_options())?
            .with_row_selection(RowSelection::from(selectors))
            .build()?;
        let mut rows = Vec::new();
        for batch in reader {
            read_batch(&batch?, &mut rows)?;
        }
        Ok(rows.into_iter().map(|row| row.entry).collect())
    })
}

fn read_batch(batch: &RecordBatch, rows: &mut Vec<Row>) -> Result<(), SegmentError> {
    let view = BatchView::new(batch)?;
    rows.reserve(view.len());
    for row in 0..view.len() {
        rows.push(Row {
            entry: view.entry(row)?.to_owned_entry(),
            decoded: view.decoded(row).to_owned_decoded(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast, borrowed path and the general path agree, including on odd payloads.
    #[test]
    fn both_decoding_paths_agree() {
        let payloads: [&[u8]; 9] = [
            br#"{"agent":"a","seq":3,"prev":"00","ts":"2026-01-01T00:00:00Z","realm":"r","kind":"tool_call","attrs":{"b":1, "a":[2]}}"#,
            br#"{"agent":"a\u00e9\n","seq":3,"bytes_out":7,"extra":{"x":1}}"#,
            br#"{"agent":"a","seq":"3"}"#,
            br#"{"agent":"a","seq":-1,"bytes_in":1.5}"#,
            br#"{"attrs":[1,2],"kind":5}"#,
            br#"{"agent":"a","agent":"b"}"#,
            br#"{"ts":"yesterday","prev":null}"#,
            br#"[1,2,3]"#,
            b"not json",
        ];
        for payload in payloads {
            let general = Decoded::from_json(serde_json::from_slice::<serde_json::Value>(payload).ok().as_ref());
            assert_eq!(
                Decoded::parse(payload).0,
                general,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        for payload in payloads {
            let derived = Decoded::parse(payload).0;
            assert!(check_payload(payload, Some(derived.view())).columns_match);
            let mut other = derived.clone();
            other.numbers[4] = Some(424_242);
            assert!(!check_payload(payload, Some(other.view())).columns_match);
            let mut other = derived.clone();
            other.strings[3] = Some("file_read".into());
            assert!(!check_payload(payload, Some(other.view())).columns_match);
        }
        assert_eq!(check_payload(payloads[0], None).seq, Some(3));
        assert!(Decoded::parse(payloads[0]).1);
        assert!(!Decoded::parse(payloads[7]).1);
        assert!(!Decoded::parse(payloads[8]).1);
    }
}
