//! `date_trunc` for UTC timestamps by arithmetic.
//!
//! Every timestamp Custos stores is `Timestamp(µs, "UTC")`. DataFusion's `date_trunc` takes
//! its integer fast path only for timestamps without a zone; with a zone it converts every
//! value through the calendar, which made "count per hour" queries spend most of their time
//! there. In UTC an hour and a day have fixed lengths, so this wrapper truncates those
//! granularities (and the finer ones) with a remainder, and hands every other case (other
//! zones, weeks, months, scalars) to the built-in function unchanged.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, PrimitiveArray};
use arrow::datatypes::{
    ArrowTimestampType, DataType, FieldRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};

#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct DateTruncUtc {
    inner: Arc<ScalarUDF>,
}

impl DateTruncUtc {
    pub(crate) fn new() -> Self {
        Self {
            inner: datafusion::functions::datetime::date_trunc(),
        }
    }
}

/// Whether `zone` names UTC itself (not merely a zone that is at +00:00 today).
fn is_utc(zone: &str) -> bool {
    matches!(zone, "UTC" | "utc" | "+00:00" | "Z" | "Etc/UTC")
}

/// The length of `granularity` in `unit`s, when it is fixed in UTC.
fn fixed_length(granularity: &str, unit: TimeUnit) -> Option<i64> {
    let micros: i64 = match granularity.to_ascii_lowercase().as_str() {
        "microsecond" => 1,
        "millisecond" => 1_000,
        "second" => 1_000_000,
        "minute" => 60_000_000,
        "hour" => 3_600_000_000,
        "day" => 86_400_000_000,
        _ => return None,
    };
    let length = match unit {
        TimeUnit::Second => micros / 1_000_000,
        TimeUnit::Millisecond => micros / 1_000,
        TimeUnit::Microsecond => micros,
        TimeUnit::Nanosecond => micros.checked_mul(1_000)?,
    };
    // A granularity finer than the unit leaves values as they are.
    Some(length.max(1))
}

fn truncate<T: ArrowTimestampType>(array: &dyn Array, length: i64, zone: Arc<str>) -> ArrayRef {
    let array = array.as_primitive::<T>();
    let out: PrimitiveArray<T> = array.unary(|value: i64| value - value.rem_euclid(length));
    Arc::new(out.with_timezone(zone))
}

impl ScalarUDFImpl for DateTruncUtc {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let [ColumnarValue::Scalar(granularity), ColumnarValue::Array(array)] = args.args.as_slice()
            && let (
                ScalarValue::Utf8(Some(granularity))
                | ScalarValue::Utf8View(Some(granularity))
                | ScalarValue::LargeUtf8(Some(granularity)),
                DataType::Timestamp(unit, Some(zone)),
            ) = (granularity, array.data_type())
            && is_utc(zone)
            && let Some(length) = fixed_length(granularity, *unit)
        {
            let zone = Arc::clone(zone);
            let out = match unit {
                TimeUnit::Second => truncate::<TimestampSecondType>(array, length, zone),
                TimeUnit::Millisecond => truncate::<TimestampMillisecondType>(array, length, zone),
                TimeUnit::Microsecond => truncate::<TimestampMicrosecondType>(array, length, zone),
                TimeUnit::Nanosecond => truncate::<TimestampNanosecondType>(array, length, zone),
            };
            return Ok(ColumnarValue::Array(out));
        }
        self.inner.invoke_with_args(args)
    }

    fn output_ordering(&self, input: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(input)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    /// The fast path gives exactly what the built-in gives, across zones it handles and
    /// those it hands on, including values before 1970 (negative) and on the boundaries.
    #[tokio::test]
    async fn agrees_with_the_builtin() {
        let values = "(TIMESTAMP '1969-12-31 23:59:59.999999'), (TIMESTAMP '1970-01-01 00:00:00'), \
                      (TIMESTAMP '2026-11-01 13:59:59.999999'), (TIMESTAMP '2026-11-01 14:00:00'), \
                      (TIMESTAMP '2024-02-29 23:30:00.5'), (NULL)";
        let builtin = SessionContext::new();
        let ours = SessionContext::new();
        ours.register_udf(ScalarUDF::from(DateTruncUtc::new()));
        for zone in ["UTC", "+00:00", "Europe/Paris"] {
            for granularity in ["second", "minute", "hour", "day", "week", "month"] {
                let sql = format!(
                    "SELECT CAST(date_trunc('{granularity}', arrow_cast(t, 'Timestamp(Microsecond, Some(\"{zone}\"))')) AS BIGINT) AS v \
                     FROM (VALUES {values}) AS x(t)"
                );
                let expected = builtin.sql(&sql).await.unwrap().collect().await.unwrap();
                let got = ours.sql(&sql).await.unwrap().collect().await.unwrap();
                assert_eq!(
                    arrow::util::pretty::pretty_format_batches(&got).unwrap().to_string(),
                    arrow::util::pretty::pretty_format_batches(&expected)
                        .unwrap()
                        .to_string(),
                    "{granularity} in {zone}"
                );
            }
        }
    }

    #[test]
    fn only_fixed_lengths_take_the_fast_path() {
        assert_eq!(fixed_length("HOUR", TimeUnit::Microsecond), Some(3_600_000_000));
        assert_eq!(fixed_length("millisecond", TimeUnit::Second), Some(1));
        assert_eq!(fixed_length("week", TimeUnit::Microsecond), None);
        assert_eq!(fixed_length("month", TimeUnit::Microsecond), None);
        assert!(is_utc("UTC") && !is_utc("Europe/London"));
    }
}
