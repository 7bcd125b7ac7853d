//! The columns of the `findings` and `actions` views, read through the one type of each
//! record: [`custos_event::Finding`] (what the detector signs) and
//! [`custos_respond::ActionRecord`] (what the responder signs). A view's UDF decodes each
//! payload once into a struct of its columns; the view projects the struct's fields.
//!
//! ```text
//!   payload ──▶ Finding / ActionRecord (serde, the signer's type)
//!                 └─▶ struct { id, score, … }  (text: strings unquoted, others compact JSON)
//!                       └─▶ get_field(…, 'id') AS id, …
//! ```
//!
//! A payload that is not such a record (it cannot be: the writer signed it) gives a row
//! of NULLs rather than failing the query.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringBuilder, StructArray};
use arrow::datatypes::{DataType, Field, Fields};
use datafusion::common::exec_err;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility};

use crate::json::{for_each_bytes, text_of};

/// Which record type a view reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Record {
    Finding,
    Action,
}

impl Record {
    /// The payload as the JSON object its type serialises to.
    fn read(self, bytes: &[u8]) -> Option<serde_json::Value> {
        match self {
            Record::Finding => read_finding(bytes),
            Record::Action => read_action(bytes),
        }
    }
}

/// `payload` → struct of text columns, one decode per row.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct RecordColumns {
    name: &'static str,
    fields: Fields,
    record: Record,
    signature: Signature,
}

/// The columns the `findings` view takes from a finding.
const FINDING_FIELDS: [&str; 11] = [
    "id",
    "score",
    "severity",
    "confidence",
    "learning",
    "title",
    "rule_id",
    "tags",
    "evidence",
    "explanation",
    "window",
];

/// The columns the `actions` view takes from an action record.
const ACTION_FIELDS: [&str; 8] = [
    "id",
    "playbook",
    "finding_id",
    "status",
    "reason",
    "by",
    "approval_id",
    "undoes",
];

fn read_finding(bytes: &[u8]) -> Option<serde_json::Value> {
    let (finding, _seq) = custos_event::Finding::from_payload(bytes)?;
    serde_json::to_value(finding).ok()
}

fn read_action(bytes: &[u8]) -> Option<serde_json::Value> {
    let record: custos_respond::ActionRecord = serde_json::from_slice(bytes).ok()?;
    serde_json::to_value(record).ok()
}

impl RecordColumns {
    fn new(name: &'static str, columns: &[&str], record: Record) -> Self {
        Self {
            name,
            fields: columns
                .iter()
                .map(|column| Field::new(*column, DataType::Utf8, true))
                .collect(),
            record,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }

    pub(crate) fn finding() -> Self {
        Self::new("custos_finding", &FINDING_FIELDS, Record::Finding)
    }

    pub(crate) fn action() -> Self {
        Self::new("custos_action", &ACTION_FIELDS, Record::Action)
    }
}

impl ScalarUDFImpl for RecordColumns {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Struct(self.fields.clone()))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        let [payload] = args.args.as_slice() else {
            return exec_err!("{} takes (payload)", self.name);
        };
        let array: ArrayRef = payload.to_array(args.number_rows)?;
        let mut columns: Vec<StringBuilder> = self
            .fields
            .iter()
            .map(|_| StringBuilder::with_capacity(array.len(), array.len() * 8))
            .collect();
        for_each_bytes(self.name, &array, |bytes| {
            let record = bytes.and_then(|bytes| self.record.read(bytes));
            for (builder, field) in columns.iter_mut().zip(self.fields.iter()) {
                match record.as_ref().and_then(|record| text_of(record.get(field.name())?)) {
                    Some(text) => builder.append_value(text),
                    None => builder.append_null(),
                }
            }
        })?;
        let arrays: Vec<ArrayRef> = columns
            .iter_mut()
            .map(|builder| Arc::new(builder.finish()) as ArrayRef)
            .collect();
        Ok(ColumnarValue::Array(Arc::new(StructArray::try_new(
            self.fields.clone(),
            arrays,
            None,
        )?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use custos_event::{AgentKey, ChainState, Finding, Severity};
    use datafusion::logical_expr::ScalarUDF;
    use datafusion::prelude::SessionContext;

    fn finding() -> Finding {
        Finding {
            id: "f-7".into(),
            agent: "did:key:z6Mk".into(),
            realm: "acme".into(),
            finding_type: "exfiltration".into(),
            score: 88,
            severity: Severity::Critical,
            confidence: 0.5,
            learning: true,
            evidence: vec![3, 9],
            tags: vec!["attack.t1567".into()],
            title: "Bulk upload".into(),
            ts: chrono::Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
            ..Finding::default()
        }
    }

    /// The struct holds what the signer's type reads from the payload; a payload that is
    /// not a finding (or NULL) is a row of NULLs, and the query does not fail.
    #[tokio::test]
    async fn a_finding_payload_reads_through_the_finding_type() {
        let key = AgentKey::generate().unwrap();
        let envelope = finding().sign(&key, &mut ChainState::default()).unwrap();
        let signed = String::from_utf8(envelope.payload.clone()).unwrap();
        let ctx = SessionContext::new();
        ctx.register_udf(ScalarUDF::from(RecordColumns::finding()));
        let batches = ctx
            .sql(&format!(
                "SELECT get_field(custos_finding(p), 'id') AS id, get_field(custos_finding(p), 'score') AS score, \
                 get_field(custos_finding(p), 'severity') AS severity, get_field(custos_finding(p), 'learning') AS learning, \
                 get_field(custos_finding(p), 'evidence') AS evidence, get_field(custos_finding(p), 'tags') AS tags \
                 FROM (VALUES ('{}'), ('{{\"id\":\"x\"}}'), ('not json'), (NULL)) AS t(p)",
                signed.replace('\'', "''")
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("| ")).collect();
        assert_eq!(
            rows,
            [
                "| id  | score | severity | learning | evidence | tags             |",
                "| f-7 | 88    | critical | true     | [3,9]    | [\"attack.t1567\"] |",
                "|     |       |          |          |          |                  |",
                "|     |       |          |          |          |                  |",
                "|     |       |          |          |          |                  |",
            ]
        );
    }

    #[test]
    fn an_action_payload_reads_through_the_action_record_type() {
        let record = custos_respond::ActionRecord {
            id: "a-1".into(),
            idempotency_key: "k".into(),
            playbook: "contain".into(),
            finding_id: "f-7".into(),
            agent: "did:key:z6Mk".into(),
            realm: "acme".into(),
            action: "revoke_agent".into(),
            target: "did:key:z6Mk".into(),
            status: custos_respond::ActionStatus::DryRun,
            reason: "score 88".into(),
            by: "playbook:contain".into(),
            ts: chrono::Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
            approval_id: None,
            undoes: None,
            enforcement: custos_respond::Enforcement::None,
            approval: None,
            platform: None,
        };
        let value = read_action(&serde_json::to_vec(&record).unwrap()).expect("an action record");
        let text = |name: &str| value.get(name).and_then(text_of);
        assert_eq!(text("status").as_deref(), Some("dry_run"));
        assert_eq!(text("playbook").as_deref(), Some("contain"));
        assert_eq!(text("approval_id"), None);
        assert!(
            read_action(br#"{"id":"a-1"}"#).is_none(),
            "a partial record is not an action record"
        );
    }
}
