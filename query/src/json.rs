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
    match value.get(key)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
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
        let mut push = |bytes: Option<&[u8]>| match bytes.and_then(|bytes| extract(bytes, &key)) {
            Some(text) => out.append_value(text),
            None => out.append_null(),
        };
        match array.data_type() {
            DataType::Binary => {
                let array = array.as_binary::<i32>();
                for row in 0..array.len() {
                    push(array.is_valid(row).then(|| array.value(row)));
                }
            }
            DataType::Utf8 => {
                let array = array.as_string::<i32>();
                for row in 0..array.len() {
                    push(array.is_valid(row).then(|| array.value(row).as_bytes()));
                }
            }
            other => {
                return Err(DataFusionError::Execution(format!(
                    "json_get reads a binary or text column, not {other}"
                )));
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}
