//! Parsing of export text into typed values, as DataFusion scalar functions.
//!
//! CRM exports write amounts as `1234.50`, `1,234.50` or `¥1,234`, and dates in more than one
//! format. The cleaning plan ([`super::clean`]) calls these functions on trimmed text; each
//! returns NULL where the text does not parse, and the plan turns that NULL into a quarantine
//! reason naming the column and the value. The pure functions are public for tests and reuse.

use std::sync::Arc;

use chrono::{NaiveDate, NaiveDateTime};
use datafusion::arrow::array::{
    Array, ArrayRef, Date32Array, Decimal128Array, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{Result, cast::as_string_array};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use datafusion::prelude::Expr;

/// Largest precision used for money and other decimal columns.
pub const DECIMAL_PRECISION: u8 = 18;

/// Currency symbols and codes accepted in front of (or after) an amount.
const CURRENCY: &[&str] = &["¥", "￥", "$", "€", "£", "RMB", "CNY", "USD", "EUR"];

/// Parses an amount into an integer count of `10^-scale` units.
///
/// Accepts an optional sign, an optional currency symbol, thousands separators in groups of
/// three (`1,234,567.5`), and at most `scale` significant fraction digits (extra trailing zeros
/// are fine). Anything else — `n/a`, `1,23`, `12.345` at scale 2 — is `None`: no silent rounding.
pub fn parse_decimal(text: &str, scale: u32) -> Option<i128> {
    let mut s = text.trim();
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest.trim_start();
    }
    for c in CURRENCY {
        if let Some(rest) = s.strip_prefix(c) {
            s = rest.trim_start();
            break;
        }
        if let Some(rest) = s.strip_suffix(c) {
            s = rest.trim_end();
            break;
        }
    }
    if !negative && let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    }
    let (int_part, frac_part) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    // Thousands separators: groups after the first must have exactly three digits.
    let groups: Vec<&str> = int_part.split(',').collect();
    if groups.len() > 1 && (groups[0].is_empty() || groups[0].len() > 3 || groups[1..].iter().any(|g| g.len() != 3)) {
        return None;
    }
    if !groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let digits: String = groups.concat();
    if !frac_part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = scale as usize;
    let (kept, extra) = frac_part.split_at(frac_part.len().min(scale));
    if extra.bytes().any(|b| b != b'0') {
        return None;
    }
    let mut units: i128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    for _ in 0..scale {
        units = units.checked_mul(10)?;
    }
    let mut frac: i128 = if kept.is_empty() { 0 } else { kept.parse().ok()? };
    for _ in kept.len()..scale {
        frac *= 10;
    }
    units = units.checked_add(frac)?;
    if units >= 10i128.pow(DECIMAL_PRECISION as u32) {
        return None;
    }
    Some(if negative { -units } else { units })
}

/// Parses a date with the first of `formats` (chrono syntax) that matches the whole text.
pub fn parse_date(text: &str, formats: &[String]) -> Option<NaiveDate> {
    formats.iter().find_map(|f| NaiveDate::parse_from_str(text.trim(), f).ok())
}

/// Parses a timestamp with the first of `formats` that matches the whole text.
pub fn parse_timestamp(text: &str, formats: &[String]) -> Option<NaiveDateTime> {
    formats.iter().find_map(|f| NaiveDateTime::parse_from_str(text.trim(), f).ok())
}

/// Days since 1970-01-01, as Arrow's Date32 stores dates.
pub fn date32(d: NaiveDate) -> i32 {
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch")).num_days() as i32
}

/// The kinds of parse the [`Parse`] function performs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ParseKind {
    Decimal { scale: i8 },
    Date { formats: Vec<String> },
    Timestamp { formats: Vec<String> },
}

/// A DataFusion scalar function `text -> typed value or NULL`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Parse {
    kind: ParseKind,
    signature: Signature,
}

impl ScalarUDFImpl for Parse {
    fn name(&self) -> &str {
        match self.kind {
            ParseKind::Decimal { .. } => "parse_decimal",
            ParseKind::Date { .. } => "parse_date",
            ParseKind::Timestamp { .. } => "parse_timestamp",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            ParseKind::Decimal { scale } => DataType::Decimal128(DECIMAL_PRECISION, scale),
            ParseKind::Date { .. } => DataType::Date32,
            ParseKind::Timestamp { .. } => DataType::Timestamp(TimeUnit::Microsecond, None),
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let input = args.args[0].to_array(args.number_rows)?;
        let text = as_string_array(&input)?;
        let out: ArrayRef = match &self.kind {
            ParseKind::Decimal { scale } => Arc::new(
                map_text(text, |s| parse_decimal(s, *scale as u32))
                    .collect::<Decimal128Array>()
                    .with_precision_and_scale(DECIMAL_PRECISION, *scale)?,
            ),
            ParseKind::Date { formats } => {
                Arc::new(map_text(text, |s| parse_date(s, formats).map(date32)).collect::<Date32Array>())
            }
            ParseKind::Timestamp { formats } => Arc::new(
                map_text(text, |s| parse_timestamp(s, formats).map(|t| t.and_utc().timestamp_micros()))
                    .collect::<TimestampMicrosecondArray>(),
            ),
        };
        Ok(ColumnarValue::Array(out))
    }
}

fn map_text<'a, T>(text: &'a StringArray, f: impl Fn(&str) -> Option<T> + 'a) -> impl Iterator<Item = Option<T>> + 'a {
    (0..text.len()).map(move |i| if text.is_null(i) { None } else { f(text.value(i)) })
}

fn udf(kind: ParseKind) -> ScalarUDF {
    ScalarUDF::from(Parse { kind, signature: Signature::uniform(1, vec![DataType::Utf8], Volatility::Immutable) })
}

/// `parse_decimal(text)` at `scale`: Decimal128(18, scale) or NULL.
pub fn decimal_expr(text: Expr, scale: i8) -> Expr {
    udf(ParseKind::Decimal { scale }).call(vec![text])
}

/// `parse_date(text)` with the given formats: Date32 or NULL.
pub fn date_expr(text: Expr, formats: &[String]) -> Expr {
    udf(ParseKind::Date { formats: formats.to_vec() }).call(vec![text])
}

/// `parse_timestamp(text)` with the given formats: Timestamp(µs) or NULL.
pub fn timestamp_expr(text: Expr, formats: &[String]) -> Expr {
    udf(ParseKind::Timestamp { formats: formats.to_vec() }).call(vec![text])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_in_export_spellings_parse_to_exact_cents() {
        assert_eq!(parse_decimal("1234.50", 2), Some(123450));
        assert_eq!(parse_decimal("1,234.50", 2), Some(123450));
        assert_eq!(parse_decimal("¥1,234", 2), Some(123400));
        assert_eq!(parse_decimal(" ¥ 1,234,567.5 ", 2), Some(123456750));
        assert_eq!(parse_decimal("-12.30", 2), Some(-1230));
        assert_eq!(parse_decimal("12.3000", 2), Some(1230));
        assert_eq!(parse_decimal(".5", 2), Some(50));
        assert_eq!(parse_decimal("0", 2), Some(0));
    }

    #[test]
    fn ambiguous_or_lossy_amounts_are_rejected() {
        for bad in ["n/a", "", "1,23", "12.345", "1.2.3", "12,3456", "abc", "¥", "-", "1e5", ",123"] {
            assert_eq!(parse_decimal(bad, 2), None, "{bad:?}");
        }
    }

    #[test]
    fn dates_parse_with_any_declared_format() {
        let formats = vec!["%Y-%m-%d".to_string(), "%d/%m/%Y".to_string()];
        let d = NaiveDate::from_ymd_opt(2025, 3, 14).unwrap();
        assert_eq!(parse_date("2025-03-14", &formats), Some(d));
        assert_eq!(parse_date("14/03/2025", &formats), Some(d));
        assert_eq!(parse_date("2024-13-45", &formats), None);
        assert_eq!(date32(NaiveDate::from_ymd_opt(1970, 1, 2).unwrap()), 1);
    }
}
