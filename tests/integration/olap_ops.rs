//! OLAP operations (pivot, compare, others, drill paths, trend windows, drill-through) checked
//! against SQL written by hand over the base tables (order_lines, orders, dim_customer), never
//! through fact_sales or the cube planner.

use std::collections::BTreeMap;
use std::process::Command;

use crmcube::query::CubeQuery;

use crate::common::{ask, cells, cents, loaded, session, sql};

/// Completed order lines with their customer and period, by hand.
const SALES: &str = "WITH s AS (
  SELECT o.order_id, o.customer_id, o.rep_id, o.order_date,
         CAST(date_part('year', o.order_date) AS INT) AS yr,
         to_char(o.order_date, '%Y-%m') AS mon,
         c.region, c.province,
         CAST(l.quantity * l.unit_price * (100 - l.discount_pct) / 100 AS DECIMAL(18, 2)) AS revenue
  FROM order_lines l
  JOIN orders o ON l.order_id = o.order_id
  JOIN dim_customer c ON o.customer_id = c.customer_id
  WHERE o.status = 'completed')";

async fn by_hand(q: &str) -> Vec<Vec<String>> {
    sql(&session().await, &format!("{SALES} {q}")).await
}

fn revenue(measures: &[&str]) -> CubeQuery {
    CubeQuery { cube: "sales".into(), measures: measures.iter().map(|s| s.to_string()).collect(), ..Default::default() }
}

/// An amount cell, or 0 for an empty (NULL) one.
fn amount(cell: &str) -> i128 {
    if cell.is_empty() { 0 } else { cents(cell) }
}

#[tokio::test]
async fn pivot_spreads_years_across_columns() {
    let rows = ask(CubeQuery { by: vec!["customer.region".into()], pivot: Some("time.year".into()), ..revenue(&["revenue"]) }).await;
    let expected = by_hand("SELECT region, yr, sum(revenue) FROM s GROUP BY 1, 2").await;
    let years: Vec<String> = {
        let mut y: Vec<String> = expected.iter().map(|r| r[1].clone()).collect();
        y.sort();
        y.dedup();
        y
    };
    assert_eq!(rows[0].len(), 1 + years.len());
    for e in expected {
        let row = rows.iter().find(|r| r[0] == e[0]).unwrap();
        let i = years.iter().position(|y| *y == e[1]).unwrap();
        assert_eq!(amount(&row[1 + i]), cents(&e[2]), "{} {}", e[0], e[1]);
    }
}

#[tokio::test]
async fn compare_two_years_side_by_side_with_change() {
    let rows =
        ask(CubeQuery { by: vec!["customer.region".into()], compare: Some("time.year=2025:2024".into()), ..revenue(&["revenue"]) }).await;
    let expected = by_hand(
        "SELECT region, sum(CASE WHEN yr = 2025 THEN revenue END), sum(CASE WHEN yr = 2024 THEN revenue END) FROM s GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(rows.len(), expected.len());
    for (r, e) in rows.iter().zip(&expected) {
        assert_eq!(r[0], e[0]);
        let (a, b) = (cents(&e[1]), cents(&e[2]));
        assert_eq!((cents(&r[1]), cents(&r[2])), (a, b));
        assert!((r[3].parse::<f64>().unwrap() * 100.0 - (a - b) as f64).abs() < 0.5, "change");
        let pct = ((a - b) as f64 * 100.0 / b as f64 * 10.0).round() / 10.0;
        assert_eq!(r[4].parse::<f64>().unwrap(), pct, "change %");
    }
}

#[tokio::test]
async fn top_five_customers_and_an_others_row_that_adds_up() {
    let rows = ask(CubeQuery {
        by: vec!["customer.customer".into()],
        order: vec!["revenue:desc".into()],
        limit: Some(5),
        others: true,
        ..revenue(&["revenue", "customers"])
    })
    .await;
    assert_eq!(rows.len(), 6);
    let top = by_hand("SELECT customer_id, sum(revenue) AS r FROM s GROUP BY 1 ORDER BY r DESC, customer_id LIMIT 5").await;
    for (r, e) in rows.iter().zip(&top) {
        assert_eq!((&r[0], cents(&r[2])), (&e[0], cents(&e[1])));
    }
    let totals = by_hand("SELECT sum(revenue), count(DISTINCT customer_id) FROM s").await;
    let top_sum: i128 = top.iter().map(|e| cents(&e[1])).sum();
    assert_eq!(rows[5][0], "(others)");
    assert_eq!(cents(&rows[5][2]), cents(&totals[0][0]) - top_sum);
    assert_eq!(rows[5][3].parse::<u64>().unwrap(), totals[0][1].parse::<u64>().unwrap() - 5);
}

#[tokio::test]
async fn a_drill_path_three_levels_deep_reaches_the_days_of_a_month() {
    let rows = ask(CubeQuery {
        drill: vec!["time.year=2025".into(), "time.quarter=2025-Q1".into(), "time.month=2025-02".into()],
        ..revenue(&["revenue"])
    })
    .await;
    let expected = by_hand("SELECT CAST(order_date AS VARCHAR), sum(revenue) FROM s WHERE mon = '2025-02' GROUP BY 1 ORDER BY 1").await;
    assert_eq!(rows.len(), expected.len());
    assert!(rows.len() >= 20, "most days of February have sales");
    for (r, e) in rows.iter().zip(&expected) {
        assert_eq!((&r[0], &r[1], &r[2]), (&"2025".to_string(), &"2025-Q1".to_string(), &"2025-02".to_string()));
        assert_eq!((&r[3], cents(&r[4])), (&e[0], cents(&e[1])));
    }
}

#[tokio::test]
async fn trend_windows_match_window_sql_over_monthly_sums() {
    let rows = ask(CubeQuery {
        trend: Some("time.month".into()),
        moving_average: Some(3),
        running_total: true,
        year_to_date: true,
        year_over_year: true,
        ..revenue(&["revenue"])
    })
    .await;
    let expected = by_hand(
        "SELECT mon, r,
                round(avg(CAST(r AS DOUBLE)) OVER (ORDER BY mon ROWS BETWEEN 2 PRECEDING AND CURRENT ROW), 2),
                sum(r) OVER (ORDER BY mon),
                sum(r) OVER (PARTITION BY yr ORDER BY mon),
                (SELECT sum(revenue) FROM s s2 WHERE s2.mon = concat(CAST(m.yr - 1 AS VARCHAR), substr(m.mon, 5)))
         FROM (SELECT mon, yr, sum(revenue) AS r FROM s GROUP BY 1, 2) m ORDER BY mon",
    )
    .await;
    assert_eq!(rows.len(), expected.len());
    // Columns: month, revenue, prev, change %, ma3, running, ytd, last year, yoy %.
    let mut prev: Option<i128> = None;
    for (r, e) in rows.iter().zip(&expected) {
        assert_eq!(r[0], e[0]);
        assert_eq!(cents(&r[1]), cents(&e[1]));
        assert_eq!(r[2].is_empty(), prev.is_none());
        if let Some(p) = prev {
            assert_eq!(cents(&r[2]), p, "previous month of {}", r[0]);
        }
        assert!((r[4].parse::<f64>().unwrap() - e[2].parse::<f64>().unwrap()).abs() < 0.011, "moving average {}", r[0]);
        assert_eq!(cents(&r[5]), cents(&e[3]), "running total {}", r[0]);
        assert_eq!(cents(&r[6]), cents(&e[4]), "year to date {}", r[0]);
        assert_eq!(amount(&r[7]), amount(&e[5]), "same month last year {}", r[0]);
        prev = Some(cents(&r[1]));
    }
    let january = rows.iter().find(|r| r[0] == "2026-01").unwrap();
    assert_eq!(january[1], january[6], "year to date restarts in January");
}

#[tokio::test]
async fn drill_through_lists_the_fact_rows_behind_a_cell() {
    let rows =
        ask(CubeQuery { detail: true, filters: vec!["customer.province=Zhejiang".into(), "time.month=2025-03".into()], limit: Some(100_000), ..revenue(&[]) })
            .await;
    let expected = by_hand("SELECT count(*), sum(revenue) FROM s WHERE province = 'Zhejiang' AND mon = '2025-03'").await;
    assert_eq!(rows.len().to_string(), expected[0][0]);
    let limited = ask(CubeQuery { detail: true, filters: vec!["customer.province=Zhejiang".into()], limit: Some(7), ..revenue(&[]) }).await;
    assert_eq!(limited.len(), 7);
}

#[tokio::test]
async fn empty_slices_and_null_members_are_answered() {
    let empty = ask(CubeQuery { filters: vec!["time.year=1999".into()], by: vec!["customer.region".into()], ..revenue(&["revenue"]) }).await;
    assert!(empty.is_empty());
    // Orders without a sales rep form a NULL member of the rep dimension.
    let rows = ask(CubeQuery { by: vec!["rep.region".into()], ..revenue(&["revenue"]) }).await;
    let null_row = rows.iter().find(|r| r[0].is_empty()).expect("a NULL rep region");
    let expected = by_hand("SELECT sum(revenue) FROM s WHERE rep_id IS NULL").await;
    assert_eq!(cents(&null_row[1]), cents(&expected[0][0]));
    let all: i128 = rows.iter().map(|r| cents(&r[1])).sum();
    assert_eq!(all, cents(&by_hand("SELECT sum(revenue) FROM s").await[0][0]), "members add up to the total");
}

#[test]
fn a_query_file_and_an_output_file_work_from_the_command_line() {
    let l = loaded();
    let dir = l.test.dir.path();
    std::fs::write(
        dir.join("by_region.yaml"),
        "cube: sales\nmeasures: [revenue]\nby: [customer.region]\nfilters: ['time.year=2025']\n",
    )
    .unwrap();
    let out = dir.join("by_region.parquet");
    let status = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(dir)
        .args(["query", "-f"])
        .arg(dir.join("by_region.yaml"))
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let rows: BTreeMap<String, i128> = crate::common::block_on(async move {
        let ctx = datafusion::prelude::SessionContext::new();
        let df = ctx.read_parquet(out.to_str().unwrap(), Default::default()).await.unwrap();
        cells(&df.collect().await.unwrap()).into_iter().map(|r| (r[0].clone(), cents(&r[1]))).collect()
    });
    let expected: BTreeMap<String, i128> = crate::common::block_on(async {
        by_hand("SELECT region, sum(revenue) FROM s WHERE yr = 2025 GROUP BY 1").await.into_iter().map(|r| (r[0].clone(), cents(&r[1]))).collect()
    });
    assert_eq!(rows, expected);
}

#[test]
fn charts_are_valid_svg_and_png_files() {
    let l = loaded();
    let dir = l.test.dir.path();
    for (file, args) in [("trend.svg", vec!["--trend", "time.month", "--forecast", "3"]), ("regions.png", vec!["-b", "customer.region"])] {
        let path = dir.join(file);
        let out = Command::new(env!("CARGO_BIN_EXE_crmcube"))
            .arg("--project")
            .arg(dir)
            .args(["query", "sales", "-m", "revenue"])
            .args(args)
            .arg("--chart")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let bytes = std::fs::read(&path).unwrap();
        if file.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
            assert!(bytes.len() > 5_000, "a drawn picture, not an empty one");
        } else {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.contains("<svg") && text.contains("</svg>") && text.contains("<polyline"), "an SVG with a line");
            assert!(text.contains("revenue") && text.contains("2026-10"), "legend and period labels");
        }
    }
}

#[test]
fn excel_output_holds_numbers_as_numbers() {
    let l = loaded();
    let dir = l.test.dir.path();
    let path = dir.join("regions.xlsx");
    let status = Command::new(env!("CARGO_BIN_EXE_crmcube"))
        .arg("--project")
        .arg(dir)
        .args(["query", "sales", "-m", "revenue,orders", "-b", "customer.region", "-w", "time.year=2025", "--output"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    // An .xlsx is a zip of XML parts; Python's standard library reads the sheet.
    let script = r#"import sys, zipfile, re
z = zipfile.ZipFile(sys.argv[1])
sheet = z.read('xl/worksheets/sheet1.xml').decode()
print(len(re.findall(r'<c (?![^>]*t="s")[^>]*><v>', sheet)))"#;
    let python = std::env::var("CRMCUBE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python).args(["-c", script]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numeric_cells: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(numeric_cells, 5 * 2, "five regions, two numeric measures each");
}
