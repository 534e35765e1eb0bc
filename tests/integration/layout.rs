//! A transform's `layout:`: the rows written sorted, row groups of the size asked for, Bloom
//! filters written — and what they let a query skip, with the answers checked against the
//! export tables; a layout naming a column the table lacks is a metadata error.

use crmcube::etl::{TransformSet, load};
use datafusion::arrow::util::display::ArrayFormatter;
use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
use datafusion::parquet::file::statistics::Statistics;

use crate::common::{block_on, scalar, test_project};

/// `name=N total → M matched` of a scan metric in EXPLAIN ANALYZE text, summed over scans.
fn pruned(plan: &str, name: &str) -> (u64, u64) {
    let mut total = (0, 0);
    for part in plan.split(&format!("{name}=")).skip(1) {
        let words: Vec<&str> = part.split_whitespace().collect();
        // "11 total → 4 matched,"
        total.0 += words[0].parse::<u64>().unwrap();
        total.1 += words[3].trim_end_matches(',').parse::<u64>().unwrap();
    }
    total
}

async fn explain_analyze(ctx: &datafusion::prelude::SessionContext, q: &str) -> String {
    let batches = ctx.sql(&format!("EXPLAIN ANALYZE {q}")).await.unwrap().collect().await.unwrap();
    let mut text = String::new();
    for b in &batches {
        let plan = ArrayFormatter::try_new(b.column(1).as_ref(), &Default::default()).unwrap();
        for i in 0..b.num_rows() {
            text.push_str(&plan.value(i).to_string());
        }
    }
    text
}

#[test]
fn sales_facts_sorted_by_date_with_a_customer_bloom_filter_let_queries_skip_row_groups() {
    let test = test_project();
    // The sample's layout (a customer Bloom filter), sorted by date, in row groups of 4,096 rows
    // so the sample's ~60,000 sales make more than ten.
    let path = test.project.transforms.join("fact_sales.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("layout:\n  bloom_filters: [customer_id]\n"), "the sample's layout changed");
    std::fs::write(&path, text.replace("layout:\n", "layout:\n  row_group_rows: 4096\n  sort_by: [order_date, order_id, line_no]\n")).unwrap();
    let (p, w) = (test.project.clone(), test.warehouse.clone());
    block_on(async move {
        load(&p, &w).await.unwrap();
        let ctx = w.session().await.unwrap();

        // The files of the snapshot's version: each in date order, row groups of 4,096 rows whose
        // date ranges follow each other, a Bloom filter on customer_id in every row group.
        let version = w.current().unwrap().unwrap().tables["fact_sales"].version;
        let table = deltalake::DeltaTableBuilder::from_url(url::Url::from_directory_path(w.table_path("fact_sales").canonicalize().unwrap()).unwrap())
            .unwrap()
            .with_version(version)
            .load()
            .await
            .unwrap();
        let mut groups = 0;
        for uri in table.get_file_uris().unwrap() {
            let path = url::Url::parse(&uri).ok().and_then(|u| u.to_file_path().ok()).unwrap_or_else(|| uri.clone().into());
            let file = std::fs::File::open(&path).unwrap();
            let reader = SerializedFileReader::new(file).unwrap();
            let meta = reader.metadata();
            let schema = meta.file_metadata().schema_descr();
            let column = |name: &str| (0..schema.num_columns()).find(|i| schema.column(*i).name() == name).unwrap();
            let (date, customer) = (column("order_date"), column("customer_id"));
            let mut last_max = i32::MIN;
            for rg in meta.row_groups() {
                groups += 1;
                assert!(rg.num_rows() <= 4096, "row group of {} rows", rg.num_rows());
                let Some(Statistics::Int32(s)) = rg.column(date).statistics() else { panic!("no order_date statistics") };
                let (min, max) = (*s.min_opt().unwrap(), *s.max_opt().unwrap());
                assert!(min >= last_max, "row groups overlap in date: {min} after a group ending {last_max}");
                last_max = max;
                assert!(rg.column(customer).bloom_filter_offset().is_some(), "no Bloom filter on customer_id");
                assert!(rg.column(date).bloom_filter_offset().is_none(), "a Bloom filter nobody asked for");
            }
        }
        assert!(groups > 10, "{groups} row groups");

        // A year's sales read only that year's row groups, and are all of them: the count of
        // completed order lines of 2025 by hand from the export tables.
        let year = "SELECT count(*) FROM fact_sales WHERE order_date >= DATE '2025-01-01' AND order_date < DATE '2026-01-01'";
        let (total, matched) = pruned(&explain_analyze(&ctx, year).await, "row_groups_pruned_statistics");
        assert!(matched < total / 2, "a year matched {matched} of {total} row groups");
        let by_hand = "SELECT count(*) FROM order_lines l JOIN orders o ON l.order_id = o.order_id
                       WHERE o.status = 'completed' AND o.order_date >= DATE '2025-01-01' AND o.order_date < DATE '2026-01-01'";
        assert_eq!(scalar(&ctx, year).await, scalar(&ctx, by_hand).await);

        // One customer's sales: the Bloom filters skip the row groups without them.
        let customer = scalar(&ctx, "SELECT customer_id FROM fact_sales GROUP BY 1 HAVING count(*) >= 3 ORDER BY count(*), 1 LIMIT 1").await;
        let lookup = format!("SELECT count(*), sum(quantity) FROM fact_sales WHERE customer_id = '{customer}'");
        let (total, matched) = pruned(&explain_analyze(&ctx, &lookup).await, "row_groups_pruned_bloom_filter");
        assert!(matched < total / 2, "customer {customer} matched {matched} of {total} row groups by Bloom filter");
        let by_hand = format!(
            "SELECT count(*), sum(l.quantity) FROM order_lines l JOIN orders o ON l.order_id = o.order_id WHERE o.status = 'completed' AND o.customer_id = '{customer}'"
        );
        assert_eq!(crate::common::sql(&ctx, &lookup).await, crate::common::sql(&ctx, &by_hand).await);
    });
}

#[test]
fn a_layout_naming_a_missing_column_is_reported_with_the_nearest_name() {
    // A source table's layout is checked with its metadata (crmcube check).
    let test = test_project();
    let path = test.project.transforms.join("orders.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}layout:\n  sort_by: [order_dat]\n")).unwrap();
    let line = text.lines().count() + 2;
    let e = TransformSet::load(&test.project).unwrap_err().to_string();
    assert!(e.contains(&format!("orders.yaml:{line}:")), "{e}");
    assert!(e.contains("layout › sort_by") && e.contains("'order_dat' not found") && e.contains("did you mean 'order_date'"), "{e}");

    // A derived table's columns are known once its SELECT is planned: the load says so and
    // commits nothing.
    let test = test_project();
    let path = test.project.transforms.join("fact_sales.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("bloom_filters: [customer_id]", "bloom_filters: [customer]")).unwrap();
    let (p, w) = (test.project.clone(), test.warehouse.clone());
    let e = block_on(async move { load(&p, &w).await.unwrap_err() });
    let message = e.to_string();
    assert_eq!(e.kind().exit_code(), 2, "{message}");
    assert!(message.contains("fact_sales.yaml") && message.contains("layout") && message.contains("'customer'"), "{message}");
    assert!(message.contains("did you mean 'customer_id'"), "{message}");
    assert!(test.warehouse.current().unwrap().is_none(), "a failed load committed a snapshot");
}

#[test]
fn a_table_is_partitioned_only_by_a_date_or_integer_column() {
    // A source's column types are declared: checked with its metadata.
    let test = test_project();
    let path = test.project.transforms.join("orders.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}layout:\n  partition_by: channel\n")).unwrap();
    let line = text.lines().count() + 2;
    let e = TransformSet::load(&test.project).unwrap_err().to_string();
    assert!(e.contains(&format!("orders.yaml:{line}:")), "{e}");
    assert!(e.contains("layout › partition_by") && e.contains("'channel' is text") && e.contains("date or integer"), "{e}");
    std::fs::write(&path, format!("{text}layout:\n  partition_by: order_dat\n")).unwrap();
    let e = TransformSet::load(&test.project).unwrap_err().to_string();
    assert!(e.contains("'order_dat' not found") && e.contains("did you mean 'order_date'"), "{e}");

    // A derived table's once its SELECT is planned: the load stops before writing anything.
    let test = test_project();
    let path = test.project.transforms.join("customer_monthly.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("partition_by: month_start"), "the sample's layout changed");
    std::fs::write(&path, text.replace("partition_by: month_start", "partition_by: customer_id")).unwrap();
    let (p, w) = (test.project.clone(), test.warehouse.clone());
    let e = block_on(async move { load(&p, &w).await.unwrap_err() });
    let message = e.to_string();
    assert_eq!(e.kind().exit_code(), 2, "{message}");
    assert!(message.contains("customer_monthly.yaml") && message.contains("partition_by") && message.contains("'customer_id' is of type Utf8"), "{message}");
    assert!(test.warehouse.current().unwrap().is_none(), "a failed load committed a snapshot");
}
