//! Rollups: every query of the OLAP suite gives identical results (values, order and Arrow
//! types) with rollups on and off, through the CLI planner and through cube SQL; EXPLAIN names
//! the rollup that answered; queries a rollup cannot answer exactly keep the base tables.

use std::sync::{Arc, Mutex};

use crmcube::cube::CubeSet;
use crmcube::etl::TransformSet;
use crmcube::query::{CubeQuery, run, sql as cube_sql};
use crmcube::rollup::Rewrites;
use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;

use crate::common::{cells, loaded, scalar, session, sql};
use crate::query_suite::cases;

fn cubes() -> CubeSet {
    let project = &loaded().test.project;
    CubeSet::load(project, &TransformSet::load(project).unwrap()).unwrap()
}

/// A session of the sample warehouse with cube tables, and with the rollup rule when `on`.
async fn ctx(on: bool) -> (SessionContext, Arc<Mutex<Vec<String>>>) {
    let cubes = cubes();
    let ctx = session().await;
    cube_sql::register_cubes(&ctx, &cubes).await.unwrap();
    let notes = if on {
        let snapshot = loaded().test.warehouse.current().unwrap().unwrap();
        crmcube::rollup::install(&ctx, &cubes, &snapshot).await.unwrap()
    } else {
        Arc::default()
    };
    (ctx, notes)
}

fn answered_by_rollup(notes: &Arc<Mutex<Vec<String>>>) -> bool {
    let notes = std::mem::take(&mut *notes.lock().unwrap());
    notes.iter().any(|n| n.starts_with("rollup ") && n.ends_with(" answers this aggregate"))
}

/// Cells and column types of a result; rows sorted unless the query orders them.
fn exact(batches: &[RecordBatch], ordered: bool) -> (Vec<Vec<String>>, Vec<String>) {
    let types = batches.first().map(|b| b.schema().fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect()).unwrap_or_default();
    let mut rows = cells(batches);
    if !ordered {
        rows.sort();
    }
    (rows, types)
}

#[tokio::test]
async fn every_suite_query_is_identical_with_rollups_on_and_off() {
    let cubes = cubes();
    let ((on, notes), (off, _)) = (ctx(true).await, ctx(false).await);
    let (mut failures, mut via_rollup_cli, mut via_rollup_sql, mut reran) = (Vec::new(), 0, 0, 0);
    // Rollup-answered queries that also read a base table (the others row) are planned again.
    let mut planned_again = Vec::new();
    let cases = cases();
    for case in &cases {
        let mut q: CubeQuery = serde_json::from_value(case.query.clone()).unwrap();
        q.cube = case.cube.clone();
        let cube = cubes.get(&case.cube).unwrap();
        // The CLI orders every result by its levels: compared row by row.
        let with = exact(&run(&on, cube, &q).await.unwrap_or_else(|e| panic!("{}: {e}", case.name)), true);
        via_rollup_cli += answered_by_rollup(&notes) as usize;
        let without = exact(&run(&off, cube, &q).await.unwrap(), true);
        if with != without {
            failures.push(format!("{} (cube query):\n  on  {:?}\n  off {:?}", case.name, with, without));
        }
        let with = exact(&cube_sql::sql(&on, &cubes, &case.cube_sql).await.unwrap().collect().await.unwrap_or_else(|e| panic!("{}: {e}", case.name)), case.ordered);
        let by_rollup = answered_by_rollup(&notes);
        via_rollup_sql += by_rollup as usize;
        let without = exact(&cube_sql::sql(&off, &cubes, &case.cube_sql).await.unwrap().collect().await.unwrap(), case.ordered);
        if with != without {
            failures.push(format!("{} (cube SQL):\n  on  {:?}\n  off {:?}", case.name, with, without));
        }
        // Asked again, a query answered from small rollups runs the plan the session kept.
        let again = exact(&cube_sql::sql(&on, &cubes, &case.cube_sql).await.unwrap().collect().await.unwrap(), case.ordered);
        let reused = std::mem::take(&mut *notes.lock().unwrap()).iter().any(|n| n == crmcube::rollup::PLAN_REUSED);
        reran += reused as usize;
        if by_rollup && !reused {
            planned_again.push(case.name.clone());
        }
        if again != without {
            failures.push(format!("{} (cube SQL, asked again):\n  on  {:?}\n  off {:?}", case.name, again, without));
        }
    }
    assert!(failures.is_empty(), "{} results differ:\n{}", failures.len(), failures.join("\n"));
    eprintln!(
        "rollups answered {via_rollup_cli} of {} suite cases through the CLI planner, {via_rollup_sql} through cube SQL; {reran} ran a kept plan when asked again",
        cases.len()
    );
    // The comparison means something only if rollups answered a good part of the suite.
    assert!(via_rollup_cli >= 15 && via_rollup_sql >= 15, "rollups answered {via_rollup_cli} CLI and {via_rollup_sql} SQL cases of {}", cases.len());
    assert!(planned_again.len() <= 2 && reran >= 15, "{reran} kept plans ran again; rollup answers planned again: {planned_again:?}");
}

/// A session of the sample warehouse with eager aggregation and no stored rollups.
async fn eager_ctx() -> (SessionContext, Arc<Mutex<Vec<String>>>) {
    let cubes = cubes();
    let ctx = session().await;
    cube_sql::register_cubes(&ctx, &cubes).await.unwrap();
    let snapshot = loaded().test.warehouse.current().unwrap().unwrap();
    let with = crmcube::rollup::Rewrites { rollups: false, eager: true };
    let notes = crmcube::rollup::install_with(&ctx, &cubes, &snapshot, with).await.unwrap();
    (ctx, notes)
}

/// `text` answered through cube SQL in `ctx`, as cells.
async fn answer(ctx: &SessionContext, cubes: &CubeSet, text: &str) -> Vec<Vec<String>> {
    cells(&cube_sql::sql(ctx, cubes, text).await.unwrap().collect().await.unwrap())
}

fn answered_eagerly(notes: &Arc<Mutex<Vec<String>>>) -> bool {
    let notes = std::mem::take(&mut *notes.lock().unwrap());
    notes.iter().any(|n| n.starts_with("eager aggregation: "))
}

/// Grouping the fact by its dimension keys before joining the large dimensions gives exactly the
/// plain plan's results (values, order and Arrow types) for every query of the suite it takes.
#[tokio::test]
async fn every_suite_query_is_identical_with_eager_aggregation_and_without() {
    let cubes = cubes();
    let ((eager, notes), (off, _)) = (eager_ctx().await, ctx(false).await);
    let (mut failures, mut taken_cli, mut taken_sql) = (Vec::new(), Vec::new(), Vec::new());
    let cases = cases();
    for case in &cases {
        let mut q: CubeQuery = serde_json::from_value(case.query.clone()).unwrap();
        q.cube = case.cube.clone();
        let cube = cubes.get(&case.cube).unwrap();
        let with = exact(&run(&eager, cube, &q).await.unwrap_or_else(|e| panic!("{}: {e}", case.name)), true);
        if answered_eagerly(&notes) {
            taken_cli.push(case.name.clone());
        }
        let without = exact(&run(&off, cube, &q).await.unwrap(), true);
        if with != without {
            failures.push(format!("{} (cube query):\n  eager {:?}\n  plain {:?}", case.name, with, without));
        }
        let with = exact(&cube_sql::sql(&eager, &cubes, &case.cube_sql).await.unwrap().collect().await.unwrap_or_else(|e| panic!("{}: {e}", case.name)), case.ordered);
        if answered_eagerly(&notes) {
            taken_sql.push(case.name.clone());
        }
        let without = exact(&cube_sql::sql(&off, &cubes, &case.cube_sql).await.unwrap().collect().await.unwrap(), case.ordered);
        if with != without {
            failures.push(format!("{} (cube SQL):\n  eager {:?}\n  plain {:?}", case.name, with, without));
        }
    }
    assert!(failures.is_empty(), "{} results differ:\n{}", failures.len(), failures.join("\n"));
    eprintln!("eager aggregation planned {} of {} suite cases through the CLI planner, {} through cube SQL: {taken_sql:?}", taken_cli.len(), cases.len(), taken_sql.len());
    // The comparison means something only if the eager plan answered a good part of the suite.
    assert!(taken_cli.len() >= 8 && taken_sql.len() >= 8, "eager plans: CLI {taken_cli:?}, SQL {taken_sql:?}");
}

/// The dashboard's base-table questions, eagerly planned, against SQL written by hand over the
/// base tables; EXPLAIN shows the grouping below the customer join; a grouping that would not
/// shrink the rows keeps the plain plan and says why.
#[tokio::test]
async fn eager_aggregation_answers_top_customers_and_rep_regions_as_hand_written_sql_does() {
    let cubes = cubes();
    let (eager, notes) = eager_ctx().await;
    let run_sql = |text: String| {
        let (eager, cubes) = (eager.clone(), cubes.clone());
        async move { answer(&eager, &cubes, &text).await }
    };
    let top = "SELECT customer_customer, customer_customer_name, revenue FROM cubes.sales WHERE time_year = 2025 GROUP BY 1, 2 ORDER BY revenue DESC, 1 LIMIT 10";
    let plan = run_sql(format!("EXPLAIN {top}")).await.into_iter().map(|r| r.join(" ")).collect::<Vec<_>>().join("\n");
    assert!(plan.contains("TableScan: eager_sales"), "{plan}");
    // The fact is grouped by the customer key, and that aggregate sits below the customer join.
    let line = |p: &dyn Fn(&str) -> bool| plan.lines().position(p).unwrap_or_else(|| panic!("{plan}"));
    let grouped = line(&|l| l.contains("gby=[customer_version@0 as customer_version]"));
    let joined = line(&|l| l.contains("HashJoinExec") && l.contains("__key_customer@"));
    assert!(joined < grouped, "the customer join is above the grouping: {plan}");
    // The year's dates filter the fact's scan as a range of order dates: no join to the dates.
    assert!(plan.contains("order_date@0 >= 2025-01-01 AND order_date@0 <= 2025-12-31") && !plan.contains("__key_time"), "{plan}");
    let said = notes.lock().unwrap().join("\n");
    assert!(said.contains("eager aggregation: fact_sales grouped by customer_version") && said.contains("before joining dim_customer_history"), "{said}");
    let got = run_sql(top.to_string()).await;
    assert!(answered_eagerly(&notes), "{:?}", notes.lock().unwrap());
    let expected = sql(
        &eager,
        "SELECT o.customer_id, c.name, sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))) AS r \
         FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_customer_history c ON o.customer_id = c.customer_id \
         AND (c.valid_from IS NULL OR o.order_date >= CAST(c.valid_from AS DATE)) AND (c.valid_to IS NULL OR o.order_date < CAST(c.valid_to AS DATE)) \
         WHERE o.status = 'completed' AND date_part('year', o.order_date) = 2025 GROUP BY 1, 2 ORDER BY r DESC, 1 LIMIT 10",
    )
    .await;
    assert_eq!(got, expected);
    assert_eq!(got.len(), 10);

    // Reps by region (a late dimension with no rows of its own for orders without a rep), with
    // a filter on the late dimension and one across both sides.
    let reps = "SELECT rep_region, revenue, cost, quantity FROM cubes.sales WHERE time_year = 2024 AND (rep_region <> 'West' OR time_month = '2024-03') GROUP BY 1 ORDER BY 1";
    let got = run_sql(reps.to_string()).await;
    assert!(answered_eagerly(&notes));
    let expected = sql(
        &eager,
        "SELECT r.region, sum(CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2))), \
         sum(CAST(l.quantity * p.unit_cost AS DECIMAL(18, 2))), sum(l.quantity) \
         FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_product p ON l.product_id = p.product_id \
         LEFT JOIN dim_sales_rep r ON o.rep_id = r.rep_id \
         WHERE o.status = 'completed' AND date_part('year', o.order_date) = 2024 \
         AND (r.region <> 'West' OR to_char(o.order_date, '%Y-%m') = '2024-03') GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(got, expected);
    assert!(got.len() >= 5 && got.iter().any(|r| r[0] == "West"), "{got:?}");

    // Dimension filters that become key filters (a list of months: the range of their dates,
    // then the join; one customer: its version keys, the days joined after grouping) and ones
    // that do not (string keys; a filter that keeps sales without a date row), each as the plain
    // plan answers.
    let (plain, _) = ctx(false).await;
    for text in [
        "SELECT customer_region, revenue FROM cubes.sales WHERE channel_channel IN ('online', 'partner') GROUP BY 1 ORDER BY 1",
        "SELECT customer_region, revenue FROM cubes.sales WHERE time_month IN ('2024-01', '2024-03', '2025-02') GROUP BY 1 ORDER BY 1",
        "SELECT rep_region, revenue FROM cubes.sales WHERE time_year = 2025 OR time_year IS NULL GROUP BY 1 ORDER BY 1",
        "SELECT rep_region, revenue FROM cubes.sales WHERE time_day = DATE '1990-01-01' GROUP BY 1 ORDER BY 1",
        "SELECT time_year, revenue FROM cubes.sales WHERE customer_customer = 'C000123' GROUP BY 1 ORDER BY 1",
    ] {
        let got = run_sql(text.to_string()).await;
        assert!(answered_eagerly(&notes), "{text}");
        let expected = answer(&plain, &cubes, text).await;
        assert_eq!(got, expected, "{text}");
    }

    // Customers by month: up to customers × days groups, no fewer than the fact's rows.
    let p = run_sql("EXPLAIN SELECT time_month, customer_customer, revenue FROM cubes.sales GROUP BY 1, 2".into()).await;
    assert!(!format!("{p:?}").contains("eager_sales"), "{p:?}");
    let said = notes.lock().unwrap().join("\n");
    assert!(said.contains("no eager aggregation: grouping the") && said.contains("could keep up to"), "{said}");
    // Distinct counts do not add up from groups.
    run_sql("SELECT customer_region, orders FROM cubes.sales GROUP BY 1".into()).await;
    let said = notes.lock().unwrap().join("\n");
    assert!(said.contains("no eager aggregation: measure 'orders' does not add up"), "{said}");
}

#[tokio::test]
async fn explain_names_the_rollup_and_the_reason_when_none_answers() {
    let cubes = cubes();
    let (on, notes) = ctx(true).await;
    let plan = |text: &'static str| {
        let (on, cubes) = (on.clone(), cubes.clone());
        async move {
            let df = cube_sql::sql(&on, &cubes, &format!("EXPLAIN {text}")).await.unwrap();
            cells(&df.collect().await.unwrap()).into_iter().map(|r| r.join(" ")).collect::<Vec<_>>().join("\n")
        }
    };
    // Revenue and distinct orders by region for one year: the year × region rollup, one partition.
    let p = plan("SELECT customer_region, revenue, orders FROM cubes.sales WHERE time_year = 2025 GROUP BY 1").await;
    assert!(p.contains("TableScan: rollup_sales_year_region"), "{p}");
    // Small rollups are answered from memory after their first read in a session, on one
    // partition: no exchange between threads.
    assert!(p.contains("DataSourceExec: partitions=1, partition_sizes="), "{p}");
    assert!(p.contains("mode=Single") && !p.contains("RepartitionExec"), "{p}");
    // On disk they are partitioned as declared: read as a table, a year reads one folder.
    let p = plan("SELECT customer_region, SUM(revenue) FROM rollup_sales_year_region WHERE time_year = 2025 GROUP BY 1").await;
    assert!(p.contains("time_year=2025/") && !p.contains("time_year=2024/"), "only the 2025 partition is read: {p}");
    assert!(notes.lock().unwrap().iter().any(|n| n.contains("rollup sales.year_region")));
    // Sums at a coarser grain pick the smallest rollup that has the levels: categories are in
    // year × province × subcategory (864 rows) and month × region × category × channel (2,880).
    let p = plan("SELECT product_category, revenue FROM cubes.sales GROUP BY 1").await;
    assert!(p.contains("TableScan: rollup_sales_year_province_subcategory"), "{p}");
    let p = plan("SELECT channel_channel, product_category, revenue FROM cubes.sales GROUP BY 1, 2").await;
    assert!(p.contains("TableScan: rollup_sales_month_region_category_channel"), "{p}");
    // Distinct customers by region over all years: no rollup holds that grain.
    let p = plan("SELECT customer_region, customers FROM cubes.sales GROUP BY 1").await;
    assert!(!p.contains("rollup_sales"), "{p}");
    // The base tables keep the session's partitions (one per core).
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        assert!(p.contains("RepartitionExec"), "{p}");
    }
    let why = notes.lock().unwrap().join("\n");
    assert!(why.contains("no rollup of cube sales answers") && why.contains("distinct count 'customers'"), "{why}");
    // A level no rollup has, and a filter on row values, keep the base tables.
    let p = plan("SELECT customer_city, revenue FROM cubes.sales GROUP BY 1").await;
    assert!(!p.contains("rollup_sales"), "{p}");
    assert!(notes.lock().unwrap().join("\n").contains("it has no level customer.city"));
    let p = plan("SELECT customer_region, SUM(revenue) FROM cubes.sales WHERE revenue > 1000 GROUP BY 1").await;
    assert!(!p.contains("rollup_sales"), "{p}");
}

#[tokio::test]
async fn min_max_and_distinct_members_of_levels_come_from_a_rollup_and_match_base_sql() {
    let cubes = cubes();
    let (on, notes) = ctx(true).await;
    let text = "SELECT customer_region, MIN(time_month), MAX(time_month), COUNT(DISTINCT product_category), SUM(quantity) \
                FROM cubes.sales GROUP BY 1 ORDER BY 1";
    let got = answer(&on, &cubes, text).await;
    assert!(answered_by_rollup(&notes));
    let expected = sql(
        &on,
        "SELECT c.region, min(to_char(o.order_date, '%Y-%m')), max(to_char(o.order_date, '%Y-%m')), count(DISTINCT p.category), sum(l.quantity) \
         FROM order_lines l JOIN orders o ON l.order_id = o.order_id JOIN dim_customer c ON o.customer_id = c.customer_id \
         JOIN dim_product p ON l.product_id = p.product_id WHERE o.status = 'completed' GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(got, expected);
    assert_eq!(got.len(), 5);
}

/// Distinct customers by quarter, which no rollup holds exactly, come approximately from the
/// sketches of the monthly rollup: labelled approximate, equal to approx_distinct over the base
/// rows, and within 2 % of the exact count written by hand.
#[tokio::test]
async fn approximate_distinct_counts_merge_rollup_sketches_at_a_coarser_grain() {
    let cubes = cubes();
    let (on, notes) = ctx(true).await;
    let text = "SELECT time_quarter, customers_approx FROM cubes.sales GROUP BY 1 ORDER BY 1";
    let got = answer(&on, &cubes, text).await;
    let said = notes.lock().unwrap().join("\n");
    assert!(said.contains("rollup sales.month (") && said.contains("approximate: its distinct-count estimates merge the HyperLogLog sketches"), "{said}");
    let exact = sql(
        &on,
        "SELECT to_char(o.order_date, '%Y') || '-Q' || CAST(date_part('quarter', o.order_date) AS INT), count(DISTINCT o.customer_id), \
         approx_distinct(o.customer_id) FROM order_lines l JOIN orders o ON l.order_id = o.order_id \
         WHERE o.status = 'completed' GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(got.len(), exact.len());
    assert!(got.len() >= 12, "{got:?}");
    for (g, e) in got.iter().zip(&exact) {
        assert_eq!(g[0], e[0]);
        let (estimate, count): (f64, f64) = (g[1].parse().unwrap(), e[1].parse().unwrap());
        assert!((estimate - count).abs() / count <= 0.02, "{}: estimate {estimate}, exact {count}", g[0]);
        assert_eq!(g[1], e[2], "{}: the rollup's merged sketches give the base rows' estimate", g[0]);
    }
}

#[tokio::test]
async fn restricted_users_never_read_rollups() {
    use crmcube::access::{Principal, restrict};
    let cubes = cubes();
    let project = &loaded().test.project;
    let transforms = TransformSet::load(project).unwrap();
    let snapshot = loaded().test.warehouse.current().unwrap().unwrap();
    let rep = Principal { user: "bo".into(), role: "rep".into(), attributes: [("region".to_string(), "East".to_string())].into() };
    let (ctx, notes) = restrict(&session().await, &transforms, &cubes, &rep, Some((&snapshot, Rewrites::ALL))).await.unwrap();
    let text = "SELECT customer_region, revenue FROM cubes.sales GROUP BY 1";
    let plan = answer(&ctx, &cubes, &format!("EXPLAIN {text}")).await;
    assert!(!format!("{plan:?}").contains("rollup_sales"), "{plan:?}");
    let rows = answer(&ctx, &cubes, text).await;
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["East"]);
    // Nor the rollup tables by name: they are not governed by any access rule.
    let direct = sql(&ctx, "SELECT COUNT(*) FROM rollup_sales_year_region").await;
    assert_eq!(direct, [["0"]]);

    // Eager aggregation regroups the rows the rep's own views return: the same answer as the
    // rep's plain session, and only East's customers (by hand, from the customer table).
    let (plain, _) = restrict(&session().await, &transforms, &cubes, &rep, None).await.unwrap();
    for text in [
        "SELECT customer_customer, customer_customer_name, revenue FROM cubes.sales WHERE time_year = 2025 GROUP BY 1, 2 ORDER BY revenue DESC, 1 LIMIT 10",
        "SELECT rep_region, revenue FROM cubes.sales WHERE time_year = 2024 GROUP BY 1 ORDER BY 1",
    ] {
        let got = answer(&ctx, &cubes, text).await;
        let said = notes.lock().unwrap().join("\n");
        assert!(said.contains("eager aggregation: fact_sales grouped by"), "{text}: {said}");
        assert!(!said.contains("rollup sales."), "{said}");
        let expected = answer(&plain, &cubes, text).await;
        assert_eq!(got, expected, "{text}");
        assert!(!got.is_empty(), "{text}");
    }
    let top = answer(&ctx, &cubes, "SELECT customer_customer, revenue FROM cubes.sales WHERE time_year = 2025 GROUP BY 1").await;
    let unrestricted = session().await;
    for r in &top {
        assert_eq!(scalar(&unrestricted, &format!("SELECT region FROM dim_customer WHERE customer_id = '{}'", r[0])).await, "East", "{r:?}");
    }
}

fn cli(dir: &std::path::Path, args: &[&str], fault: Option<u32>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_crmcube"));
    cmd.arg("--project").arg(dir).args(args);
    if let Some(n) = fault {
        cmd.env("CRMCUBE_FAULT_POINT", n.to_string());
    }
    cmd.output().unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_changed_rollup_is_stale_until_refresh_rebuilds_it_and_a_killed_refresh_changes_nothing() {
    use std::os::unix::process::ExitStatusExt;
    let t = crate::common::test_project();
    let dir = t.dir.path();
    stdout(&cli(dir, &["load"], None));
    let cube = dir.join("cubes/sales.yaml");
    let yaml = std::fs::read_to_string(&cube).unwrap();
    // The yearly rollup now keeps revenue only: the stored one (with orders) no longer matches.
    std::fs::write(&cube, yaml.replace("  - name: year\n    levels: [time.year]\n    partition: time.year\n", "  - name: year\n    levels: [time.year]\n    measures: [revenue]\n")).unwrap();
    let orders = "SELECT time_year, orders FROM cubes.sales GROUP BY 1 ORDER BY 1";
    let explain = stdout(&cli(dir, &["sql", "--explain", orders], None));
    assert!(!explain.contains("TableScan: rollup_sales"), "{explain}");
    assert!(explain.contains("rollup sales.year is stale"), "{explain}");
    let revenue = "SELECT time_year, revenue FROM cubes.sales GROUP BY 1 ORDER BY 1";
    assert!(!stdout(&cli(dir, &["sql", "--explain", revenue], None)).contains("rollup_sales_year "), "a stale rollup never answers");

    // A refresh killed after writing its table leaves the snapshot as it was.
    let before = t.warehouse.current().unwrap().unwrap();
    let killed = cli(dir, &["refresh"], Some(1));
    assert_eq!(killed.status.signal(), Some(9), "{}", String::from_utf8_lossy(&killed.stderr));
    assert_eq!(t.warehouse.current().unwrap().unwrap(), before);

    let out = stdout(&cli(dir, &["refresh"], None));
    assert!(out.contains("rebuilt rollup_sales_year: 4 rows") && out.lines().filter(|l| l.starts_with("rebuilt")).count() == 1, "{out}");
    let explain = stdout(&cli(dir, &["sql", "--explain", revenue], None));
    assert!(explain.contains("TableScan: rollup_sales_year projection"), "{explain}");
    assert_eq!(stdout(&cli(dir, &["sql", revenue], None)), stdout(&cli(dir, &["--no-rollups", "sql", revenue], None)));
    assert_eq!(stdout(&cli(dir, &["sql", orders], None)), stdout(&cli(dir, &["--no-rollups", "sql", orders], None)));

    // A rollup removed from the cube file leaves the next snapshot; then nothing is left to do.
    let yaml = std::fs::read_to_string(&cube).unwrap();
    std::fs::write(&cube, yaml.replace("  - name: year\n    levels: [time.year]\n    measures: [revenue]\n", "")).unwrap();
    let out = stdout(&cli(dir, &["refresh"], None));
    assert!(out.contains("dropped rollup_sales_year"), "{out}");
    let snapshot = t.warehouse.current().unwrap().unwrap();
    assert!(!snapshot.tables.contains_key("rollup_sales_year") && !snapshot.rollups.contains_key("rollup_sales_year"));
    assert_eq!(snapshot.tables.len(), before.tables.len() - 1);
    assert!(stdout(&cli(dir, &["refresh"], None)).contains("nothing to do"));
}
