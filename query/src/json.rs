//! `json_get(payload, key)`: one top-level field of a JSON payload as text (strings
//! unquoted, anything else as compact JSON, NULL when absent). The `findings` and
//! `actions` views use it to expose the fields of signed payloads as columns; callers
//! may use it too. It reads only its arguments, never a file.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, ScalarValue, exec_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility};

#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct JsonGet {
    signature: Signature,
}

impl JsonGet {
    pub(crate) fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

fn extract(text: &[u8], key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(text).ok()?;
    text_of(value.get(key)?)
}

/// A JSON value as a text column shows it: strings unquoted, anything else as compact
/// JSON, null as NULL.
pub(crate) fn text_of(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

/// Hands `each` every row of a text or binary column (any layout the engine may pass:
/// scans read strings as views), `None` for a null row. `function` names the caller in
/// the error for any other column type.
pub(crate) fn for_each_bytes(
    function: &str,
    array: &ArrayRef,
    mut each: impl FnMut(Option<&[u8]>),
) -> datafusion::common::Result<()> {
    match array.data_type() {
        DataType::Binary => {
            let array = array.as_binary::<i32>();
            (0..array.len()).for_each(|row| each(array.is_valid(row).then(|| array.value(row))));
        }
        DataType::Utf8 => {
            let array = array.as_string::<i32>();
            (0..array.len()).for_each(|row| each(array.is_valid(row).then(|| array.value(row).as_bytes())));
        }
        DataType::Utf8View => {
            let array = array.as_string_view();
            (0..array.len()).for_each(|row| each(array.is_valid(row).then(|| array.value(row).as_bytes())));
        }
        DataType::BinaryView => {
            let array = array.as_binary_view();
            (0..array.len()).for_each(|row| each(array.is_valid(row).then(|| array.value(row))));
        }
        other => {
            return Err(DataFusionError::Execution(format!(
                "{function} reads a binary or text column, not {other}"
            )));
        }
    }
    Ok(())
}

impl ScalarUDFImpl for JsonGet {
    fn name(&self) -> &str {
        "json_get"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        let [payload, key] = args.args.as_slice() else {
            return exec_err!("json_get takes (payload, key)");
        };
        let key = match key {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(key)) | ScalarValue::LargeUtf8(Some(key))) => key.clone(),
            _ => return exec_err!("json_get's key must be a string literal, as in json_get(payload, 'score')"),
        };
        let array: ArrayRef = payload.to_array(args.number_rows)?;
        let mut out = StringBuilder::with_capacity(array.len(), array.len() * 8);
        for_each_bytes("json_get", &array, |bytes| {
            match bytes.and_then(|bytes| extract(bytes, &key)) {
                Some(text) => out.append_value(text),
                None => out.append_null(),
            }
        })?;
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// Every text and binary layout the engine may hand over (scans read strings as views)
    /// gives the same fields.
    #[tokio::test]
    async fn reads_every_text_and_binary_layout() {
        let ctx = SessionContext::new();
        ctx.register_udf(datafusion::logical_expr::ScalarUDF::from(JsonGet::new()));
        for layout in ["Utf8", "Utf8View", "Binary", "BinaryView"] {
            let sql = format!(
                "SELECT json_get(arrow_cast(p, '{layout}'), 'score') AS score, json_get(arrow_cast(p, '{layout}'), 'id') AS id \
                 FROM (VALUES ('{{\"id\":\"f-1\",\"score\":70}}'), ('not json'), (NULL)) AS x(p)"
            );
            let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
            let text = arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string();
            let rows: Vec<&str> = text.lines().filter(|line| line.starts_with("| ")).collect();
            assert_eq!(
                rows,
                [
                    "| score | id  |",
                    "| 70    | f-1 |",
                    "|       |     |",
                    "|       |     |"
                ],
                "{layout}"
            );
        }
    }
}
