//! Loading the committed sample: every row accounted for, every kind of dirt handled.

use std::collections::BTreeMap;

use crate::common::{dirt, loaded, sample_text, scalar, session, sql};

/// Which export each source table reads.
const SOURCES: [(&str, &str); 8] = [
    ("dim_customer", "customers.csv"),
    ("dim_sales_rep", "sales_reps.csv"),
    ("dim_product", "products.csv"),
    ("orders", "orders.csv"),
    ("order_lines", "order_lines.csv"),
    ("fact_invoice", "invoices.csv"),
    ("fact_payment", "payments.csv"),
    ("fact_interaction", "interactions.jsonl"),
];

/// Dirt kinds that cannot load (everything else is repaired by the cleaning rules).
const QUARANTINED_KINDS: [&str; 8] = [
    "unparseable",
    "orphan_customer",
    "orphan_product",
    "orphan_invoice",
    "negative_quantity",
    "orphan_order_cascade",
    "orphan_invoice_cascade",
    "blank_required",
];
const DUPLICATE_KINDS: [&str; 2] = ["duplicate_later", "duplicate_equal_ts"];

#[tokio::test]
async fn every_source_row_is_loaded_quarantined_or_a_resolved_duplicate() {
    let report = &loaded().report;
    let dirt = dirt();
    let ctx = session().await;
    for (table, file) in SOURCES {
        let t = report.table(table).unwrap_or_else(|| panic!("no report for {table}"));
        let written = &dirt.files[file];
        assert_eq!(t.read, written.rows, "{table}: rows read vs rows the generator wrote");
        assert_eq!(t.read, t.loaded + t.quarantined + t.duplicates, "{table}: {t:?}");
        let expected_quarantine: u64 =
            written.dirt.iter().filter(|(k, _)| QUARANTINED_KINDS.contains(&k.as_str())).map(|(_, n)| n).sum();
        let expected_duplicates: u64 =
            written.dirt.iter().filter(|(k, _)| DUPLICATE_KINDS.contains(&k.as_str())).map(|(_, n)| n).sum();
        assert_eq!(t.quarantined, expected_quarantine, "{table}: quarantined vs dirty rows written");
        assert_eq!(t.duplicates, expected_duplicates, "{table}: duplicates");
        let in_table: u64 = scalar(&ctx, &format!("SELECT count(*) FROM {table}")).await.parse().unwrap();
        assert_eq!(in_table, t.loaded, "{table}: rows in the warehouse vs loaded");
        let in_quarantine: u64 =
            scalar(&ctx, &format!("SELECT count(*) FROM quarantine WHERE table_name = '{table}'")).await.parse().unwrap();
        assert_eq!(in_quarantine, t.quarantined, "{table}: rows in quarantine");
    }
}

#[tokio::test]
async fn each_kind_of_dirty_row_lands_in_quarantine_with_its_reason() {
    let dirt = dirt();
    let ctx = session().await;
    let count = |table: &'static str, reason_like: &'static str| {
        let ctx = ctx.clone();
        async move {
            let pattern = reason_like.replace('\'', "''");
            scalar(&ctx, &format!("SELECT count(*) FROM quarantine WHERE table_name = '{table}' AND reason LIKE '{pattern}'"))
                .await
                .parse::<u64>()
                .unwrap()
        }
    };
    let d = |file: &str, kind: &str| dirt.files[file].dirt.get(kind).copied().unwrap_or(0);
    assert!(d("order_lines.csv", "negative_quantity") > 0);
    assert_eq!(
        count("order_lines", "column 'quantity': expected a value of at least 1, found '-%").await,
        d("order_lines.csv", "negative_quantity")
    );
    assert_eq!(count("order_lines", "%not found in dim_product.product_id").await, d("order_lines.csv", "orphan_product"));
    assert_eq!(count("order_lines", "%not found in orders.order_id").await, d("order_lines.csv", "orphan_order_cascade"));
    assert_eq!(count("orders", "%not found in dim_customer.customer_id").await, d("orders.csv", "orphan_customer"));
    assert_eq!(count("fact_payment", "%not found in fact_invoice.invoice_id").await,
        d("payments.csv", "orphan_invoice") + d("payments.csv", "orphan_invoice_cascade"));
    assert_eq!(count("fact_interaction", "%not found in dim_customer.customer_id").await, d("interactions.jsonl", "orphan_customer"));
    assert_eq!(count("fact_interaction", "invalid JSON%").await, d("interactions.jsonl", "unparseable"));
    assert_eq!(count("fact_invoice", "column 'amount': expected a decimal amount%found 'n/a'").await, d("invoices.csv", "unparseable"));
    assert!(count("orders", "expected 7 fields, found 4").await > 0, "ragged order rows are rejected on read");
    assert!(count("dim_customer", "column 'signup_date': expected a date in format %found '2024-13-45'").await
        + count("dim_customer", "column 'credit_limit': %found 'n/a'").await == d("customers.csv", "unparseable"));
}

#[tokio::test]
async fn quarantine_rows_name_file_line_and_column_of_the_bad_value() {
    let ctx = session().await;
    let rows = sql(&ctx, "SELECT table_name, source_file, line, column_name, reason, raw FROM quarantine").await;
    assert!(!rows.is_empty());
    let mut texts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &rows {
        let (file, line, column, reason, raw) = (&r[1], r[2].parse::<usize>().unwrap(), &r[3], &r[4], &r[5]);
        assert!(file.starts_with("sample-data/") || file.contains("sample-data"), "{file}");
        assert!(line >= 1, "{r:?}");
        let name = file.rsplit('/').next().unwrap().to_string();
        let lines = texts.entry(name.clone()).or_insert_with(|| sample_text(&name).lines().map(str::to_string).collect());
        // The named line of the named file is the rejected record.
        let first_field = raw.split([',', '"']).find(|f| !f.is_empty() && !f.starts_with('{')).unwrap_or("");
        assert!(lines[line - 1].contains(first_field.trim()), "{name}:{line} is '{}', quarantined raw '{raw}'", lines[line - 1]);
        let structural = reason.starts_with("expected ") || reason.starts_with("invalid JSON");
        if !structural {
            assert!(!column.is_empty(), "a value error names its column: {r:?}");
            assert!(reason.contains(&format!("column '{column}'")), "{r:?}");
        }
    }
}

#[tokio::test]
async fn repairable_dirt_is_repaired_not_quarantined() {
    let ctx = session().await;
    // Formatted amounts (1,234.50 / ¥1,234), DD/MM/YYYY dates, padding and mixed case never
    // reach quarantine: they are parsed, trimmed and normalised.
    let bad = sql(
        &ctx,
        "SELECT reason FROM quarantine WHERE regexp_like(reason, 'found ''([^'']*[,¥￥][^'']*|[0-9]{2}/[0-9]{2}/[0-9]{4})''$') \
         OR column_name IN ('segment', 'channel', 'method')",
    )
    .await;
    assert!(bad.is_empty(), "repairable values were quarantined: {bad:?}");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM dim_customer WHERE segment NOT IN ('enterprise','smb','consumer')").await, "0");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM dim_customer WHERE name <> btrim(name) OR city <> btrim(city)").await, "0");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM orders WHERE customer_id <> btrim(customer_id)").await, "0");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM fact_payment WHERE method <> lower(method)").await, "0");
    // A blank optional value loads as NULL.
    let blank_emails: u64 = scalar(&ctx, "SELECT count(*) FROM dim_customer WHERE email IS NULL").await.parse().unwrap();
    assert!(blank_emails > 0);
}

#[tokio::test]
async fn latest_customer_row_wins_and_ties_go_to_the_later_line() {
    // Independent of the loader: resolve the customer export by hand.
    let text = sample_text("customers.csv");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let mut latest: BTreeMap<String, (String, usize, String, String)> = BTreeMap::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.unwrap();
        let (id, segment, city, credit, signup, updated) = (rec[0].trim(), rec[2].trim().to_lowercase(), rec[5].trim(), &rec[6], &rec[8], rec[9].trim().to_string());
        if credit.trim() == "n/a" || signup.trim() == "2024-13-45" {
            continue; // unparseable rows never win
        }
        let candidate = (updated, i, segment, city.to_string());
        match latest.get(id) {
            Some(cur) if (&cur.0, cur.1) > (&candidate.0, candidate.1) => {}
            _ => {
                latest.insert(id.to_string(), candidate);
            }
        }
    }
    let ctx = session().await;
    let rows = sql(&ctx, "SELECT customer_id, segment, city FROM dim_customer ORDER BY customer_id").await;
    assert_eq!(rows.len(), latest.len());
    for r in rows {
        let (_, _, segment, city) = &latest[&r[0]];
        assert_eq!((&r[1], &r[2]), (segment, city), "customer {}", r[0]);
    }
}
