//! `crmcube_holds_any(where, x1, …, xn)`: whether a row meets `where` and holds, in some column
//! `xk`, one of a set of values fixed when the function is made — the filter of the rollup
//! append's one pass over the fact table (`partitions::Appended::register`): the rows of the
//! touched units (`where`, a date range) holding a customer or an order some new row holds.
//!
//! DataFusion evaluates both sides of an AND on every row unless the left keeps at most a fifth
//! of them, and both sides of an OR always; as separate IN tests, every fact row was looked up in
//! every set. Here the lookups are row by row and only where still needed: not where `where` is
//! false, not past the first set that holds the row's value, and not for a value outside its
//! set's least and greatest (new order ids lie in a narrow range; old ones fail one comparison).
//!
//! Integers are compared as `i64`, text as bytes, other types as their text (the same cast
//! for the set and the column, so equal values give equal text). A NULL holds nothing; the
//! result is never NULL (the function is meant for filters).

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayAccessor, ArrayRef, AsArray, BooleanArray, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};
use foldhash::fast::FixedState;

use crate::error::{Error, Result};

/// Makes `crmcube_holds_any` for one set per column: call it with the condition, then the
/// columns in the order of `sets`.
pub fn udf(sets: Vec<ArrayRef>) -> Result<ScalarUDF> {
    let sets = sets.iter().map(ValueSet::of).collect::<Result<Vec<_>>>()?;
    Ok(ScalarUDF::from(HoldsAny { signature: Signature::variadic_any(Volatility::Immutable), sets: Arc::new(sets) }))
}

/// The values of one set, with their least and greatest as a cheap first test.
struct Values<T> {
    set: HashSet<T, FixedState>,
    range: Option<(T, T)>,
}

impl<T: Hash + Eq + Ord + Clone> Values<T> {
    fn new(values: impl Iterator<Item = T>) -> Self {
        let set: HashSet<T, FixedState> = values.collect();
        let range = set.iter().min().cloned().zip(set.iter().max().cloned());
        Values { set, range }
    }
}

// Texts are kept as bytes: packing ids of up to 15 bytes into a u128 each was measured slower
// (the pass's predicate 122–142 ms against 85–99 ms at 10 M order lines).
enum ValueSet {
    Ints(Values<i64>),
    Texts(Values<Box<[u8]>>),
}

/// A column as the sets compare it: integers as `i64`, text as it is, anything else as text.
enum Keys {
    Ints(Int64Array),
    Texts(ArrayRef),
}

impl Keys {
    fn of(array: &ArrayRef) -> Result<Keys> {
        use DataType::*;
        Ok(match array.data_type() {
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 => Keys::Ints(cast(array, &Int64)?.as_primitive::<Int64Type>().clone()),
            Utf8 | LargeUtf8 | Utf8View => Keys::Texts(array.clone()),
            _ => Keys::Texts(cast(array, &Utf8)?),
        })
    }
}

impl ValueSet {
    fn of(values: &ArrayRef) -> Result<ValueSet> {
        Ok(match Keys::of(values)? {
            Keys::Ints(a) => ValueSet::Ints(Values::new(a.iter().flatten())),
            Keys::Texts(a) => {
                let mut texts = Vec::with_capacity(a.len());
                each_text(&a, &mut vec![true; a.len()], |_, t| {
                    texts.push(Box::<[u8]>::from(t));
                    false
                })?;
                ValueSet::Texts(Values::new(texts.into_iter()))
            }
        })
    }

    /// Marks in `hit` (and clears in `pending`) the pending rows of `column` holding a value of
    /// the set.
    fn test(&self, column: &ArrayRef, pending: &mut [bool], hit: &mut [bool]) -> Result<()> {
        match (self, Keys::of(column)?) {
            (ValueSet::Ints(v), Keys::Ints(a)) => {
                let Some((lo, hi)) = v.range else { return Ok(()) };
                for (i, p) in pending.iter_mut().enumerate() {
                    if *p && a.is_valid(i) {
                        let x = a.value(i);
                        if x >= lo && x <= hi && v.set.contains(&x) {
                            *p = false;
                            hit[i] = true;
                        }
                    }
                }
                Ok(())
            }
            (ValueSet::Texts(v), Keys::Texts(a)) => {
                let Some((lo, hi)) = &v.range else { return Ok(()) };
                each_text(&a, pending, |i, t| {
                    let found = t >= &**lo && t <= &**hi && v.set.contains(t);
                    hit[i] |= found;
                    found
                })
            }
            _ => Err(Error::Internal(format!("crmcube_holds_any: a set of other values than column type {}", column.data_type()))),
        }
    }
}

/// Calls `f(row, text)` for each valid row of a text column still `pending`; a row for which it
/// returns true is no longer pending.
fn each_text(array: &ArrayRef, pending: &mut [bool], mut f: impl FnMut(usize, &[u8]) -> bool) -> Result<()> {
    fn each<'a, A: ArrayAccessor<Item = &'a str>>(a: A, pending: &mut [bool], f: &mut impl FnMut(usize, &[u8]) -> bool) {
        for (i, p) in pending.iter_mut().enumerate() {
            if *p && a.is_valid(i) && f(i, a.value(i).as_bytes()) {
                *p = false;
            }
        }
    }
    match array.data_type() {
        DataType::Utf8 => each(array.as_string::<i32>(), pending, &mut f),
        DataType::LargeUtf8 => each(array.as_string::<i64>(), pending, &mut f),
        DataType::Utf8View => each(array.as_string_view(), pending, &mut f),
        other => return Err(Error::Internal(format!("crmcube_holds_any: {other} is not text"))),
    }
    Ok(())
}

struct HoldsAny {
    signature: Signature,
    sets: Arc<Vec<ValueSet>>,
}

impl std::fmt::Debug for HoldsAny {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HoldsAny({} sets)", self.sets.len())
    }
}

// Two of them are the same function only when they hold the same sets (the same allocation).
impl PartialEq for HoldsAny {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.sets, &other.sets)
    }
}

impl Eq for HoldsAny {}

impl std::hash::Hash for HoldsAny {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.sets), state)
    }
}

impl ScalarUDFImpl for HoldsAny {
    fn name(&self) -> &str {
        "crmcube_holds_any"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> datafusion::error::Result<DataType> {
        if args.len() != self.sets.len() + 1 || args[0] != DataType::Boolean {
            return datafusion::common::plan_err!("crmcube_holds_any takes a condition and {} column(s)", self.sets.len());
        }
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        let n = args.number_rows;
        let condition = args.args[0].to_array(n)?;
        let condition = condition.as_boolean();
        let mut pending: Vec<bool> = (0..n).map(|i| condition.is_valid(i) && condition.value(i)).collect();
        let mut hit = vec![false; n];
        for (set, column) in self.sets.iter().zip(&args.args[1..]) {
            set.test(&column.to_array(n)?, &mut pending, &mut hit).map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        }
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(hit))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Date32Array, RecordBatch, StringArray, StringViewArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::prelude::*;

    #[tokio::test]
    async fn keeps_the_rows_meeting_the_condition_that_hold_a_value_of_some_set() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("tag", DataType::Utf8View, true),
            Field::new("day", DataType::Date32, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(datafusion::arrow::array::Int32Array::from(vec![Some(1), Some(2), None, Some(5), Some(7), Some(9)])),
                Arc::new(StringArray::from(vec![Some("a"), Some("b"), Some("c"), None, Some("e"), Some("f")])),
                Arc::new(StringViewArray::from(vec![Some("x"), None, Some("a long tag beyond twelve bytes"), Some("y"), Some("z"), None])),
                Arc::new(Date32Array::from(vec![Some(10), Some(11), Some(12), Some(13), None, Some(10)])),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        let kept = |filter: Expr| {
            let df = ctx.read_batch(batch.clone()).unwrap();
            async move {
                let rows = df.filter(filter).unwrap().select(vec![col("name")]).unwrap().collect().await.unwrap();
                rows.iter().flat_map(|b| b.column(0).as_string::<i32>().iter().map(|s| s.unwrap_or("∅").to_string()).collect::<Vec<_>>()).collect::<Vec<_>>()
            }
        };
        // Sets of other types than their columns (Int64 for Int32), a NULL in a set.
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![Some(5), Some(1), Some(9), None]));
        let names: ArrayRef = Arc::new(StringArray::from(vec!["e", "zz"]));
        let tags: ArrayRef = Arc::new(StringArray::from(vec!["a long tag beyond twelve bytes"]));
        let days: ArrayRef = Arc::new(Date32Array::from(vec![11, 13]));
        let holds = udf(vec![ids.clone(), names.clone(), tags, days]).unwrap();
        let all = |cond: Expr| holds.call(vec![cond, col("id"), col("name"), col("tag"), col("day")]);
        assert_eq!(kept(all(lit(true))).await, ["a", "b", "c", "∅", "e", "f"]);
        assert_eq!(kept(all(col("id").gt(lit(1)))).await, ["b", "∅", "e", "f"], "a NULL condition keeps nothing");
        assert_eq!(kept(all(lit(false))).await, Vec::<String>::new());
        let ids_only = udf(vec![ids]).unwrap();
        assert_eq!(kept(ids_only.call(vec![lit(true), col("id")])).await, ["a", "∅", "f"]);
        let empty = udf(vec![Arc::new(StringArray::from(Vec::<&str>::new())), names]).unwrap();
        assert_eq!(kept(empty.call(vec![lit(true), col("name"), col("name")])).await, ["e"]);
        // Outside a set's range and not in it: not kept; NOT gives the complement (never NULL).
        assert_eq!(kept(!ids_only.call(vec![lit(true), col("id")])).await, ["b", "c", "e"]);
        let without_condition = async { ctx.read_batch(batch.clone())?.filter(ids_only.call(vec![col("id")]))?.collect().await };
        assert!(without_condition.await.is_err(), "the condition is required");
    }
}
