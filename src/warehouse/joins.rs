//! Join estimates for a star schema, so DataFusion builds its hash tables on the dimensions.
//!
//! DataFusion picks a hash join's build side (the input it holds in memory) by comparing the
//! estimated sizes of the two inputs. Without distinct counts for the join keys — the Delta scans
//! report row counts but no distinct counts — its own estimate of a join's output is one of two
//! guesses, both wrong for a warehouse: the smaller input's row count (each key unique on both
//! sides), which makes `fact ⋈ date` look like a 1,126-row input, so the next join builds its
//! hash table on millions of fact rows and probes it with the 400,000 customers; or, through its
//! statistics registry, the Cartesian product.
//!
//! What a warehouse knows instead: its joins go from a many side to a one side (an order line
//! to its order, a sale to its customer, its date, its product), so a join's output has about as
//! many rows as its larger input. [`ManyToOneJoins`] says exactly that for every equi-join whose
//! keys lack distinct counts (where they have them, DataFusion's own estimate stands), and the
//! session uses it through DataFusion's statistics registry. A dimension is then always the side
//! held in memory, however many joins come before it; and a dimension small enough to be held
//! whole (up to [`COLLECT_ROWS`] rows) is collected once rather than both sides being
//! repartitioned by key.
//!
//! The effect is measured by the dashboard bench's base-table queries (`benches/dashboard.rs`).

use std::sync::Arc;

use datafusion::common::stats::Precision;
use datafusion::common::{JoinType, Result, Statistics};
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::operator_statistics::{ExtendedStatistics, StatisticsProvider, StatisticsRegistry, StatisticsResult};

/// Largest build side (rows) a hash join collects whole into one hash table shared by every
/// partition: a customer dimension at 10 M order lines has 400,000 rows (DataFusion's default,
/// 131,072 rows or 1 MiB, would repartition the fact by customer instead).
pub const COLLECT_ROWS: usize = 4_000_000;
/// The same bound in bytes.
pub const COLLECT_BYTES: usize = 512 * 1024 * 1024;

/// The session's statistics: [`ManyToOneJoins`] in front of DataFusion's own providers.
pub fn registry() -> StatisticsRegistry {
    let mut registry = StatisticsRegistry::default_with_builtin_providers();
    registry.register(Arc::new(ManyToOneJoins));
    registry
}

/// Estimates a hash join without key distinct counts as many-to-one: as many rows as its larger
/// input (see the module documentation).
#[derive(Debug, Default)]
pub struct ManyToOneJoins;

impl StatisticsProvider for ManyToOneJoins {
    fn compute_statistics(&self, plan: &dyn ExecutionPlan, child_stats: &[ExtendedStatistics]) -> Result<StatisticsResult> {
        let Some(join) = plan.downcast_ref::<HashJoinExec>() else { return Ok(StatisticsResult::Delegate) };
        let [left, right] = child_stats else { return Ok(StatisticsResult::Delegate) };
        let (left, right) = (left.base(), right.base());
        let (Some(&l), Some(&r)) = (left.num_rows.get_value(), right.num_rows.get_value()) else {
            return Ok(StatisticsResult::Delegate);
        };
        let distinct = |stats: &Statistics, key: &Arc<dyn datafusion::physical_plan::PhysicalExpr>| {
            key.downcast_ref::<Column>().and_then(|c| stats.column_statistics.get(c.index())).is_some_and(|s| s.distinct_count.get_value().is_some())
        };
        if join.on().iter().all(|(a, b)| distinct(left, a) && distinct(right, b)) {
            return Ok(StatisticsResult::Delegate);
        }
        let rows = match join.join_type() {
            JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => l.max(r),
            JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => l,
            JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => r,
        };
        let stats = Statistics { num_rows: Precision::Inexact(rows), total_byte_size: Precision::Absent, column_statistics: Statistics::unknown_column(&plan.schema()) };
        Ok(StatisticsResult::Computed(ExtendedStatistics::new(stats)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int32Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::physical_plan::ExecutionPlan;
    use datafusion::physical_plan::joins::HashJoinExec;
    use datafusion::prelude::SessionContext;

    fn table(columns: Vec<(&str, Arc<dyn datafusion::arrow::array::Array>)>) -> Arc<MemTable> {
        let schema = Arc::new(Schema::new(columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), false)).collect::<Vec<_>>()));
        let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|(_, a)| a).collect()).unwrap();
        Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap())
    }

    /// A fact of 20,000 rows, a date dimension of 1,000 days and a customer dimension of 5,000.
    fn star(ctx: &SessionContext) {
        let n = 20_000;
        ctx.register_table(
            "sales",
            table(vec![
                ("day", Arc::new(Int32Array::from_iter_values((0..n).map(|i| i % 1000)))),
                ("customer", Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("C{:05}", i % 5000))))),
                ("amount", Arc::new(Int32Array::from_iter_values(0..n))),
            ]),
        )
        .unwrap();
        ctx.register_table(
            "days",
            table(vec![("day", Arc::new(Int32Array::from_iter_values(0..1000))), ("year", Arc::new(Int32Array::from_iter_values((0..1000).map(|d| 2023 + d / 365))))]),
        )
        .unwrap();
        ctx.register_table(
            "customers",
            table(vec![
                ("customer", Arc::new(StringArray::from_iter_values((0..5000).map(|i| format!("C{i:05}"))))),
                ("region", Arc::new(StringArray::from_iter_values((0..5000).map(|i| ["East", "West"][i % 2])))),
            ]),
        )
        .unwrap();
    }

    /// Whether a plan reads the fact (the only input with an `amount` column).
    fn reads_fact(plan: &Arc<dyn ExecutionPlan>) -> bool {
        (plan.children().is_empty() && plan.schema().field_with_name("amount").is_ok()) || plan.children().iter().any(|c| reads_fact(c))
    }

    /// The hash joins whose build side (left) reads the fact.
    fn fact_builds(plan: &Arc<dyn ExecutionPlan>) -> usize {
        let here = usize::from(plan.downcast_ref::<HashJoinExec>().is_some_and(|j| reads_fact(j.left())));
        here + plan.children().iter().map(|c| fact_builds(c)).sum::<usize>()
    }

    const QUERY: &str = "SELECT c.region, sum(s.amount) FROM sales s JOIN days d ON s.day = d.day LEFT JOIN customers c ON s.customer = c.customer WHERE d.year = 2024 GROUP BY 1";

    async fn planned(ctx: &SessionContext) -> Arc<dyn ExecutionPlan> {
        ctx.sql(QUERY).await.unwrap().create_physical_plan().await.unwrap()
    }

    #[tokio::test]
    async fn a_star_join_holds_its_dimensions_in_memory_and_streams_the_fact() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::warehouse::Warehouse::new(dir.path()).context().unwrap();
        star(&ctx);
        let plan = planned(&ctx).await;
        let shown = datafusion::physical_plan::displayable(plan.as_ref()).indent(false).to_string();
        assert_eq!(fact_builds(&plan), 0, "a hash join builds on the fact:\n{shown}");
        // The dimensions are collected whole (one hash table), not repartitioned with the fact.
        assert!(!shown.contains("mode=Partitioned"), "{shown}");

        // What the estimates fix: DataFusion on its own takes `sales ⋈ days` (no key distinct
        // counts) for a join of at most 1,000 rows and builds the customer join on it.
        let plain = SessionContext::new();
        star(&plain);
        assert!(fact_builds(&planned(&plain).await) > 0, "DataFusion alone now builds on the dimensions: ManyToOneJoins may be unnecessary");

        // Same answer either way.
        let sum = |ctx: SessionContext| async move { datafusion::arrow::util::pretty::pretty_format_batches(&ctx.sql(&format!("{QUERY} ORDER BY 1")).await.unwrap().collect().await.unwrap()).unwrap().to_string() };
        assert_eq!(sum(ctx).await, sum(plain).await);
    }
}
