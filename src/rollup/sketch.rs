//! Approximate distinct counts a rollup can store and re-aggregate: HyperLogLog sketches.
//!
//! A measure with `agg: approx_count_distinct` is `approx_distinct(crmcube_hll_value(column))`
//! over the base rows (DataFusion's HyperLogLog, 16,384 registers: a standard error of about
//! 0.8 %). A rollup stores, per group, the sketch itself — the registers `approx_distinct` keeps
//! as its state — written by [`sketch_udaf`]; a query at any coarser grouping merges the stored
//! sketches with [`merge_udaf`] (register by register, the maximum) and estimates from the merged
//! registers. The registers of a union are the merge of the parts' registers, so the answer from
//! a rollup is the very estimate the base rows give — approximate in the same way, and labelled so.
//!
//! DataFusion hashes `Utf8` and `Utf8View` text differently, and a load's tables hold `Utf8`
//! where a query's Parquet reads give `Utf8View`: [`value_udf`] (`crmcube_hll_value`) casts text
//! to one type first, so sketches built by a load and estimates made by a query agree.

use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::error::{DataFusionError, Result};
use datafusion::functions_aggregate::approx_distinct::ApproxDistinct;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature, Volatility,
};
use datafusion::scalar::ScalarValue;

/// Value types whose `approx_distinct` state is a register sketch (the small fixed domains,
/// booleans and 8/16-bit integers, are counted exactly by a bitmap instead).
fn sketched(t: &DataType) -> Result<()> {
    match t {
        DataType::Boolean | DataType::UInt8 | DataType::Int8 | DataType::UInt16 | DataType::Int16 => Err(DataFusionError::Plan(format!(
            "an approximate distinct count of a {t} column is not kept as a sketch: count it exactly (agg: count_distinct)"
        ))),
        _ => Ok(()),
    }
}

/// The type values are hashed as: every text type as `Utf8View`, other types as they are.
pub fn canonical_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8View,
        DataType::Dictionary(_, value) => canonical_type(value),
        other => other.clone(),
    }
}

/// `crmcube_hll_value(value)`: the value cast to [`canonical_type`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct Value {
    signature: Signature,
}

/// The scalar function every sketched value passes through (see the module docs).
pub fn value_udf() -> ScalarUDF {
    ScalarUDF::from(Value { signature: Signature::any(1, Volatility::Immutable) })
}

/// The name of [`value_udf`], for SQL text and for recognising it in plans.
pub const VALUE_FUNCTION: &str = "crmcube_hll_value";

impl ScalarUDFImpl for Value {
    fn name(&self) -> &str {
        VALUE_FUNCTION
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        Ok(canonical_type(&args[0]))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let to = canonical_type(&args.args[0].data_type());
        args.args[0].cast_to(&to, None)
    }
}

/// `crmcube_hll_sketch(value)`: the HyperLogLog sketch of a group's values (Binary).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Sketch {
    signature: Signature,
}

/// `crmcube_hll_merge(sketch)`: the distinct-count estimate of merged sketches of values of
/// `value_type` (UInt64, as `approx_distinct` returns); `crmcube_hll_union(sketch)`: the merged
/// sketch itself (Binary), for a rollup refreshed by adding tonight's rows to its stored ones.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Merge {
    signature: Signature,
    value_type: DataType,
    /// The merged sketch rather than its estimate.
    sketch: bool,
}

fn canonical_field(t: &DataType) -> FieldRef {
    Arc::new(Field::new("value", canonical_type(t), true))
}

/// The aggregate that builds a stored sketch.
pub fn sketch_udaf() -> AggregateUDF {
    AggregateUDF::from(Sketch { signature: Signature::any(1, Volatility::Immutable) })
}

/// The aggregate that merges stored sketches of values of `value_type` into an estimate.
pub fn merge_udaf(value_type: DataType) -> AggregateUDF {
    AggregateUDF::from(Merge { signature: sketches(), value_type, sketch: false })
}

/// The aggregate that merges sketches of values of `value_type` into one sketch (NULLs, groups
/// without a sketch, are skipped).
pub fn union_udaf(value_type: DataType) -> AggregateUDF {
    AggregateUDF::from(Merge { signature: sketches(), value_type, sketch: true })
}

/// Stored sketches read back from Parquet as binary views.
fn sketches() -> Signature {
    let binary = [DataType::Binary, DataType::BinaryView, DataType::LargeBinary].map(|t| TypeSignature::Exact(vec![t]));
    Signature::one_of(binary.to_vec(), Volatility::Immutable)
}

impl AggregateUDFImpl for Sketch {
    fn name(&self) -> &str {
        "crmcube_hll_sketch"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        sketched(&canonical_type(&args[0]))?;
        Ok(DataType::Binary)
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let value = canonical_field(args.input_fields[0].data_type());
        ApproxDistinct::new().state_fields(StateFieldsArgs { input_fields: &[value], ..args })
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let to = canonical_type(args.expr_fields[0].data_type());
        let value = canonical_field(&to);
        Ok(Box::new(HllAccumulator {
            inner: ApproxDistinct::new().accumulator(AccumulatorArgs { expr_fields: &[value], ..args })?,
            rows_as: to,
            merging: false,
            estimate: false,
        }))
    }
}

impl AggregateUDFImpl for Merge {
    fn name(&self) -> &str {
        if self.sketch { "crmcube_hll_union" } else { "crmcube_hll_merge" }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(if self.sketch { DataType::Binary } else { DataType::UInt64 })
    }

    fn is_nullable(&self) -> bool {
        self.sketch
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        if self.sketch { ScalarValue::try_from(data_type) } else { Ok(ScalarValue::UInt64(Some(0))) }
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let value = canonical_field(&self.value_type);
        ApproxDistinct::new().state_fields(StateFieldsArgs { input_fields: &[value], ..args })
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        sketched(&canonical_type(&self.value_type))?;
        // approx_distinct's own accumulator for the values' type: its state is the sketch.
        let value = canonical_field(&self.value_type);
        let inner = ApproxDistinct::new().accumulator(AccumulatorArgs { expr_fields: &[value], ..args })?;
        Ok(Box::new(HllAccumulator { inner, rows_as: DataType::Binary, merging: true, estimate: !self.sketch }))
    }
}

/// approx_distinct's own accumulator, fed values (building a sketch) or stored sketches (merging).
#[derive(Debug)]
struct HllAccumulator {
    inner: Box<dyn Accumulator>,
    /// Rows are cast to this type first: the canonical value type when building (see
    /// [`canonical_type`]), Binary when merging (stored sketches are states of `inner`).
    rows_as: DataType,
    /// Rows are stored sketches (merged) rather than values.
    merging: bool,
    /// The result is the estimate rather than the sketch (the state).
    estimate: bool,
}

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let rows = datafusion::arrow::compute::cast(&values[0], &self.rows_as)?;
        if !self.merging {
            return self.inner.update_batch(&[rows]);
        }
        // A group without a sketch (NULL) adds nothing; approx_distinct's merge refuses NULLs.
        let rows = match rows.logical_null_count() {
            0 => rows,
            _ => datafusion::arrow::compute::filter(&rows, &datafusion::arrow::compute::is_not_null(&rows)?)?,
        };
        self.inner.merge_batch(&[rows])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        if self.estimate {
            return self.inner.evaluate();
        }
        self.inner.state()?.into_iter().next().ok_or_else(|| DataFusionError::Internal("approx_distinct has no state".into()))
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}
