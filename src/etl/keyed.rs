//! Derived tables refreshed by key (`refresh_by:` in a transform): which SELECTs allow it.
//!
//! A SELECT is *keyed* by a column of its driver table when each of its output rows carries a
//! key value in that column, and the rows with key value k depend only on the driver's rows with
//! key k (and on the other tables it reads). A per-customer summary over `fact_sales` is keyed by
//! `customer_id`; a ranking of all customers, or a column holding the latest order date of all,
//! is not. On a night when the driver only gained rows and nothing else the SELECT reads changed,
//! the load then recomputes the rows of the keys the new rows name (the SELECT over the driver's
//! rows of those keys) and keeps every other row (see `Run::refresh_keys` in `etl::load`).
//!
//! [`not_keyed`] proves it from the logical plan, conservatively: it follows the output columns
//! that hold the driver's key, step by step from the driver's scan, and requires every step over
//! the driver's rows to keep each key's rows apart — a GROUP BY that includes the key, a window
//! partitioned by it, a join of two parts of the driver on it; filters, projections, sorts,
//! DISTINCT, UNION, unnesting a list and joins to other tables keep them apart by themselves.
//! Across an outer join only the preserved side's columns hold the key (the other side's are NULL
//! where it has no row), and only columns of the key's type equal to it. A step that mixes keys (an aggregate
//! without the key, a LIMIT, a subquery over the driver, a FULL join), a function whose value
//! moves by itself (`current_date()`: every row would go stale, not only the keys' rows) or a
//! step it does not know makes the table recomputed in full, with the reason in the log. Views
//! and CTEs are followed into, never taken for the table they are named after.

use std::collections::BTreeSet;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Distinct, Expr, ExprSchemable, JoinType, LogicalPlan, Operator, Volatility};

/// Output columns (by position) that hold the driver's key; None: the step does not read the
/// driver at all.
type Keys = Option<BTreeSet<usize>>;

/// Why `plan` is not keyed by `driver`.`key` — see the module docs — or None when it is and its
/// output has a column named `key` holding the key. `inputs`: the tables the SELECT reads; they
/// are leaves, whether scanned or inlined as views.
pub fn not_keyed(plan: &LogicalPlan, driver: &str, key: &str, inputs: &[String]) -> Option<String> {
    if let Some(why) = time_dependent(plan) {
        return Some(why);
    }
    let walk = Walk { driver, key, inputs };
    match walk.keys(plan) {
        Err(why) => Some(why),
        Ok(None) => Some(format!("it does not read {driver}")),
        Ok(Some(keys)) => {
            let named = plan.schema().fields().iter().position(|f| f.name() == key);
            match named {
                Some(i) if keys.contains(&i) => None,
                Some(_) => Some(format!("its column '{key}' is not {driver}.{key}")),
                None => Some(format!("it has no column '{key}'")),
            }
        }
    }
}

/// Why `plan` cannot be refreshed by part, if it calls a function (subqueries included) whose
/// result is not fixed by its arguments — `now()`, `current_date()`, `random()`: a row computed
/// with it is stale the next night even when its inputs did not change.
pub fn time_dependent(plan: &LogicalPlan) -> Option<String> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        for e in node.expressions() {
            let _ = e.apply(|x| {
                if let Expr::ScalarFunction(f) = x
                    && f.func.signature().volatility != Volatility::Immutable
                {
                    found = Some(f.func.name().to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        Ok(if found.is_some() { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    found.map(|f| format!("it calls {f}(), whose value changes from one night to the next"))
}

struct Walk<'a> {
    driver: &'a str,
    key: &'a str,
    inputs: &'a [String],
}

impl Walk<'_> {
    /// The table a scan reads. Only scans: a view or a CTE is followed into (a CTE may carry an
    /// input's name and read the driver, `WITH fact_sales AS (… FROM fact_sales)`), so a driver
    /// registered as a view is not recognised and its table is recomputed in full.
    fn table(&self, n: &LogicalPlan) -> Option<String> {
        match n {
            LogicalPlan::TableScan(s) if self.inputs.iter().any(|i| i == s.table_name.table()) => Some(s.table_name.table().to_string()),
            _ => None,
        }
    }

    /// Whether `plan` reads the driver anywhere, subqueries included.
    fn reads(&self, plan: &LogicalPlan) -> bool {
        plan.exists(|n| Ok(self.table(n).as_deref() == Some(self.driver) || n.expressions().iter().any(|e| self.subquery_reads(e)))).unwrap_or(true)
    }

    fn subquery_reads(&self, e: &Expr) -> bool {
        e.exists(|x| {
            Ok(match x {
                Expr::ScalarSubquery(s) => self.reads(&s.subquery),
                Expr::InSubquery(s) => self.reads(&s.subquery.subquery),
                Expr::Exists(s) => self.reads(&s.subquery.subquery),
                Expr::SetComparison(s) => self.reads(&s.subquery.subquery),
                _ => false,
            })
        })
        .unwrap_or(true)
    }

    fn keys(&self, plan: &LogicalPlan) -> Result<Keys, String> {
        if let Some(t) = self.table(plan) {
            if t != self.driver {
                return Ok(None);
            }
            let at = plan.schema().fields().iter().position(|f| f.name() == self.key);
            return at.map(|i| Some(BTreeSet::from([i]))).ok_or_else(|| format!("{} has no column '{}'", self.driver, self.key));
        }
        if plan.expressions().iter().any(|e| self.subquery_reads(e)) {
            return Err(format!("a subquery reads {}", self.driver));
        }
        let step = || plan.display().to_string().split(':').next().unwrap_or_default().trim().to_string();
        let kept = |keys: Keys| -> Result<Keys, String> {
            match keys {
                Some(k) if k.is_empty() => Err(format!("the step `{}` drops the column '{}'", step(), self.key)),
                k => Ok(k),
            }
        };
        // A column of `input` that holds the key, as a position of its output.
        let key_at = |input: &LogicalPlan, keys: &BTreeSet<usize>, e: &Expr| -> Option<usize> {
            match strip(e) {
                Expr::Column(c) => input.schema().index_of_column(c).ok().filter(|i| keys.contains(i)),
                _ => None,
            }
        };
        match plan {
            LogicalPlan::Filter(f) => self.keys(&f.input),
            LogicalPlan::SubqueryAlias(a) => self.keys(&a.input),
            LogicalPlan::Sort(s) if s.fetch.is_none() => self.keys(&s.input),
            LogicalPlan::Distinct(Distinct::All(input)) => self.keys(input),
            LogicalPlan::Projection(p) => {
                let Some(keys) = self.keys(&p.input)? else { return Ok(None) };
                kept(Some(p.expr.iter().enumerate().filter(|(_, e)| key_at(&p.input, &keys, e).is_some()).map(|(i, _)| i).collect()))
            }
            LogicalPlan::Aggregate(a) => {
                let Some(keys) = self.keys(&a.input)? else { return Ok(None) };
                if a.group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
                    return Err("it groups by GROUPING SETS, CUBE or ROLLUP".into());
                }
                let grouped: BTreeSet<usize> = a.group_expr.iter().enumerate().filter(|(_, e)| key_at(&a.input, &keys, e).is_some()).map(|(i, _)| i).collect();
                if grouped.is_empty() {
                    return Err(format!("an aggregate over {} does not group by '{}'", self.driver, self.key));
                }
                Ok(Some(grouped))
            }
            LogicalPlan::Window(w) => {
                let Some(keys) = self.keys(&w.input)? else { return Ok(None) };
                for e in &w.window_expr {
                    let partitioned = match strip(e) {
                        Expr::WindowFunction(f) => f.params.partition_by.iter().any(|p| key_at(&w.input, &keys, p).is_some()),
                        _ => false,
                    };
                    if !partitioned {
                        return Err(format!("a window over {} is not partitioned by '{}'", self.driver, self.key));
                    }
                }
                Ok(Some(keys))
            }
            LogicalPlan::Join(j) => {
                let (left, right) = (self.keys(&j.left)?, self.keys(&j.right)?);
                if left.is_none() && right.is_none() {
                    return Ok(None);
                }
                let width = j.left.schema().fields().len();
                // Columns equal to a key column across the join hold the key too.
                let (mut on_left, mut on_right, mut both) = (BTreeSet::new(), BTreeSet::new(), false);
                let column = |side: &LogicalPlan, e: &Expr| match strip(e) {
                    Expr::Column(c) => side.schema().index_of_column(c).ok(),
                    _ => None,
                };
                // The equalities of the join: its keys, and `a = b` of a column of each side in
                // its filter (the SQL planner leaves ON conditions there).
                let mut equal: Vec<(&Expr, &Expr)> = j.on.iter().map(|(l, r)| (l, r)).collect();
                for c in j.filter.iter().flat_map(split_conjunction) {
                    if let Expr::BinaryExpr(b) = c
                        && b.op == Operator::Eq
                    {
                        if column(&j.left, &b.left).is_some() && column(&j.right, &b.right).is_some() {
                            equal.push((&b.left, &b.right));
                        } else if column(&j.left, &b.right).is_some() && column(&j.right, &b.left).is_some() {
                            equal.push((&b.right, &b.left));
                        }
                    }
                }
                // A key equal to a column of another type is not the same key ('007' and '7'
                // are both 7).
                equal.retain(|(l, r)| same_type(&j.left, l, &j.right, r));
                for (l, r) in equal {
                    let (lk, rk) = (left.as_ref().and_then(|k| key_at(&j.left, k, l)), right.as_ref().and_then(|k| key_at(&j.right, k, r)));
                    both |= lk.is_some() && rk.is_some();
                    if rk.is_some()
                        && let Some(i) = column(&j.left, l)
                    {
                        on_left.insert(i);
                    }
                    if lk.is_some()
                        && let Some(i) = column(&j.right, r)
                    {
                        on_right.insert(i);
                    }
                }
                if left.is_some() && right.is_some() && !both {
                    return Err(format!("it joins two parts of {} other than on '{}'", self.driver, self.key));
                }
                let on_left: BTreeSet<usize> = on_left.into_iter().chain(left.into_iter().flatten()).collect();
                let on_right: BTreeSet<usize> = on_right.into_iter().chain(right.into_iter().flatten()).collect();
                // Only columns never NULL for want of a match hold the key: an outer join's
                // preserved side's (a customer without sales has no sales key).
                let keys: BTreeSet<usize> = match j.join_type {
                    JoinType::Inner => on_left.into_iter().chain(on_right.into_iter().map(|i| i + width)).collect(),
                    JoinType::Left | JoinType::LeftSemi | JoinType::LeftAnti | JoinType::LeftMark => on_left,
                    JoinType::Right => on_right.into_iter().map(|i| i + width).collect(),
                    JoinType::RightSemi | JoinType::RightAnti | JoinType::RightMark => on_right,
                    JoinType::Full => return Err(format!("a FULL join leaves '{}' NULL on the rows one side lacks", self.key)),
                };
                if keys.is_empty() {
                    return Err(format!("the key '{}' of {} is on the side of a {} join that may be NULL", self.key, self.driver, j.join_type));
                }
                Ok(Some(keys))
            }
            // A row per element of a list: each keeps its row's other columns, the key with them.
            LogicalPlan::Unnest(u) => {
                let Some(keys) = self.keys(&u.input)? else { return Ok(None) };
                let unnested: BTreeSet<usize> = u.exec_columns.iter().filter_map(|c| u.input.schema().index_of_column(c).ok()).collect();
                kept(Some(u.dependency_indices.iter().enumerate().filter(|(_, d)| keys.contains(d) && !unnested.contains(d)).map(|(i, _)| i).collect()))
            }
            LogicalPlan::Union(u) => {
                let mut keys: Keys = None;
                for input in &u.inputs {
                    if let Some(k) = self.keys(input)? {
                        keys = Some(match keys {
                            None => k,
                            Some(before) => before.intersection(&k).copied().collect(),
                        });
                    }
                }
                kept(keys)
            }
            other if !self.reads(other) => Ok(None),
            _ => Err(format!("it has a step `{}` over {}", step(), self.driver)),
        }
    }
}

/// Whether column expressions `l` (of `left`) and `r` (of `right`) have one type.
fn same_type(left: &LogicalPlan, l: &Expr, right: &LogicalPlan, r: &Expr) -> bool {
    match (l.get_type(left.schema()), r.get_type(right.schema())) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn why(sql: &str) -> Option<String> {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE sales (customer_id VARCHAR, order_id VARCHAR, day DATE, revenue BIGINT) AS VALUES ('c', 'o', DATE '2026-01-01', 1)").await.unwrap();
        ctx.sql("CREATE TABLE customers (customer_id VARCHAR, region VARCHAR) AS VALUES ('c', 'north')").await.unwrap();
        let plan = ctx.sql(sql).await.unwrap().into_unoptimized_plan();
        not_keyed(&plan, "sales", "customer_id", &["sales".to_string(), "customers".to_string()])
    }

    #[tokio::test]
    async fn a_select_is_keyed_when_every_step_over_the_driver_keeps_each_keys_rows_apart() {
        // Keyed: per key aggregates, two levels deep and renamed on the way.
        assert_eq!(
            why("WITH per_order AS (SELECT customer_id AS c, order_id, min(day) AS day, sum(revenue) AS revenue FROM sales GROUP BY 1, 2)
                 SELECT c AS customer_id, count(*) AS orders, sum(revenue) AS revenue FROM per_order WHERE revenue > 0 GROUP BY c")
            .await,
            None
        );
        // A table of every customer, joined to the per-key rows: the key is the other side's.
        assert_eq!(
            why("SELECT k.customer_id, k.region, s.revenue FROM customers k
                 LEFT JOIN (SELECT customer_id, sum(revenue) AS revenue FROM sales GROUP BY 1) s ON s.customer_id = k.customer_id")
            .await,
            None
        );
        // Two parts of the driver joined on the key; a window partitioned by it; a UNION.
        assert_eq!(
            why("WITH a AS (SELECT customer_id, count(*) AS n FROM sales GROUP BY 1), b AS (SELECT customer_id, max(day) AS d FROM sales GROUP BY 1)
                 SELECT a.customer_id, a.n, b.d, row_number() OVER (PARTITION BY a.customer_id ORDER BY b.d) AS r FROM a JOIN b ON a.customer_id = b.customer_id
                 UNION ALL SELECT customer_id, 0, NULL, 0 FROM customers")
            .await,
            None
        );
        assert_eq!(why("SELECT DISTINCT customer_id, day FROM sales ORDER BY day").await, None);
        // A row per element of each key's list (customer_lifecycle's months).
        assert_eq!(why("SELECT customer_id, unnest(days) AS day FROM (SELECT customer_id, array_agg(day) AS days FROM sales GROUP BY 1)").await, None);
    }

    #[tokio::test]
    async fn a_select_that_mixes_keys_is_not_keyed_and_says_why() {
        let cases = [
            ("SELECT day, sum(revenue) AS revenue, min(customer_id) AS customer_id FROM sales GROUP BY day", "does not group by 'customer_id'"),
            ("SELECT customer_id, ntile(5) OVER (ORDER BY revenue) AS q FROM sales", "not partitioned by 'customer_id'"),
            ("SELECT customer_id, revenue - (SELECT avg(revenue) FROM sales) AS above FROM sales", "a subquery reads sales"),
            (
                "WITH obs AS (SELECT max(day) AS d FROM sales) SELECT s.customer_id, o.d - s.day AS age FROM sales s CROSS JOIN obs o",
                "does not group by 'customer_id'",
            ),
            ("SELECT customer_id FROM sales LIMIT 10", "step `Limit`"),
            ("SELECT order_id, sum(revenue) AS revenue FROM sales GROUP BY order_id", "does not group by 'customer_id'"),
            ("SELECT upper(customer_id) AS customer_id, revenue FROM sales", "drops the column 'customer_id'"),
            ("SELECT a.customer_id FROM sales a JOIN sales b ON a.order_id = b.order_id", "other than on 'customer_id'"),
            ("SELECT customer_id, region FROM customers", "does not read sales"),
            // Found by review: each would have left rows stale or doubled.
            ("SELECT customer_id, current_date() - max(day) AS days_since FROM sales GROUP BY 1", "calls current_date()"),
            (
                "SELECT s.customer_id, k.region, s.revenue FROM customers k
                 LEFT JOIN (SELECT customer_id, sum(revenue) AS revenue FROM sales GROUP BY 1) s ON s.customer_id = k.customer_id",
                "drops the column 'customer_id'",
            ),
            (
                "SELECT s.customer_id, count(*) AS n FROM customers k FULL JOIN sales s ON s.customer_id = k.customer_id GROUP BY 1",
                "FULL join",
            ),
            ("SELECT customer_id, revenue FROM sales WHERE revenue >= ALL (SELECT revenue FROM sales)", "a subquery reads sales"),
            // An unnested list is not the key, even when it held it.
            ("SELECT customer_id AS c, unnest(make_array(customer_id)) AS customer_id FROM sales", "is not sales.customer_id"),
            ("WITH sales AS (SELECT customer_id, sum(revenue) OVER () AS total FROM sales) SELECT customer_id, total FROM sales", "not partitioned by 'customer_id'"),
            (
                "WITH customers AS (SELECT max(day) AS last_day FROM sales) SELECT s.customer_id, k.last_day FROM sales s CROSS JOIN customers k",
                "does not group by 'customer_id'",
            ),
        ];
        for (sql, expected) in cases {
            let why = why(sql).await;
            assert!(why.as_deref().is_some_and(|w| w.contains(expected)), "{sql}: {why:?}, expected … {expected} …");
        }
    }
}
