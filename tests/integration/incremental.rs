//! Incremental loads: a second night's export files are merged into the first night's tables,
//! a customer who moved region keeps a type-2 history, and the result equals a full load of
//! both nights' files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crmcube::etl::{LoadReport, load};
use crmcube::project::Project;
use crmcube::warehouse::{Warehouse, content_checksum};

use crate::common::{block_on, cents, copy_dir, repo, scalar, sql};

/// The customer who moves, and the day the move is recorded.
const MOVER: &str = "C000001";
const MOVED_AT: &str = "2026-11-01 08:00:00";

/// A project over a private copy of the sample exports whose customers, orders and order lines
/// load incrementally from `customers*.csv`, `orders*.csv` and `order_lines*.csv`.
fn incremental_project(dir: &Path, incremental: bool) -> Project {
    copy_dir(&repo().join("transforms"), &dir.join("transforms"));
    copy_dir(&repo().join("cubes"), &dir.join("cubes"));
    crate::common::nightly_transforms(&dir.join("transforms"), incremental);
    let sources = dir.join("sources");
    if !sources.exists() {
        copy_dir(&repo().join("sample-data"), &sources);
    }
    std::fs::write(dir.join("crmcube.yaml"), format!("version: 1\nname: nightly\nsources: {}\n", sources.display())).unwrap();
    Project::open(dir).unwrap()
}

/// [`incremental_project`] with one more derived table, `table`, `refresh_by` fact_sales'
/// customer_id: its `sql`, and `more` YAML lines.
fn with_table(dir: &Path, table: &str, more: &str, sql: &str) -> Project {
    let project = incremental_project(dir, true);
    let yaml = format!("version: 1\ntable: {table}\nrefresh_by: {{ table: fact_sales, key: customer_id }}\n{more}sql: |\n  {sql}\n");
    std::fs::write(project.transforms.join(format!("{table}.yaml")), yaml).unwrap();
    project
}

/// The second night's files: the mover in region West (and a corrected name), a new customer,
/// three new orders with their lines, and one of the mover's old orders re-exported cancelled.
/// Returns the revenue (cents) of the new orders' lines by customer.
fn write_second_night(sources: &Path, cancelled_line: &str) -> BTreeMap<&'static str, i128> {
    let customers = format!(
        "customer_id,name,segment,region,province,city,credit_limit,email,signup_date,updated_at\n\
         {MOVER},Tang Ming,smb,West,Sichuan,Chengdu,131900.00,c000001@example.com,2023-01-16,{MOVED_AT}\n\
         C900001,New Customer,consumer,North,Beijing,Beijing,5000.00,new@example.com,2026-11-01,2026-11-01 09:30:00\n"
    );
    std::fs::write(sources.join("customers_2026-11-01.csv"), customers).unwrap();
    let orders = format!(
        "order_id,customer_id,rep_id,channel,order_date,status,updated_at\n\
         O9000001,{MOVER},R004,online,2026-11-02,completed,2026-11-02 10:00:00\n\
         O9000002,{MOVER},R004,store,2026-11-03,completed,2026-11-03 10:00:00\n\
         O9000003,C900001,R004,online,2026-11-03,completed,2026-11-03 11:00:00\n\
         {cancelled_line}\n"
    );
    std::fs::write(sources.join("orders_2026-11-01.csv"), orders).unwrap();
    let lines = [
        ("O9000001", 1, "P0059", 4, "489.00", 5),
        ("O9000001", 2, "P0047", 1, "2019.00", 0),
        ("O9000002", 1, "P0047", 2, "2019.00", 10),
        ("O9000003", 1, "P0059", 1, "489.00", 0),
    ];
    let mut text = "order_id,line_no,product_id,quantity,unit_price,discount_pct\n".to_string();
    let mut revenue = BTreeMap::new();
    for (order, line, product, quantity, price, discount) in lines {
        text.push_str(&format!("{order},{line},{product},{quantity},{price},{discount}\n"));
        // revenue = quantity × unit_price × (100 − discount) / 100, in cents (exact here).
        let cents_value = quantity as i128 * cents(price) * (100 - discount as i128) / 100;
        *revenue.entry(if order == "O9000003" { "C900001" } else { MOVER }).or_insert(0) += cents_value;
    }
    std::fs::write(sources.join("order_lines_2026-11-01.csv"), text).unwrap();
    revenue
}

/// The partitions (`column=value`) whose files the newest Delta commit of `table` added, and the
/// ones whose files it removed.
fn last_commit_partitions(w: &Warehouse, table: &str) -> (std::collections::BTreeSet<String>, std::collections::BTreeSet<String>) {
    let log = w.table_path(table).join("_delta_log");
    let last = std::fs::read_dir(&log).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json")).max().unwrap();
    let (mut added, mut removed) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for line in std::fs::read_to_string(&last).unwrap().lines() {
        let action: serde_json::Value = serde_json::from_str(line).unwrap();
        for (kind, set) in [("add", &mut added), ("remove", &mut removed)] {
            if let Some(values) = action[kind]["partitionValues"].as_object() {
                set.extend(values.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("NULL"))));
            }
        }
    }
    (added, removed)
}

/// Asserts that each derived table in `tables` holds what its SELECT gives over the tables of
/// `ctx` as they are now (a recomputation from scratch).
async fn equal_their_selects(ctx: &datafusion::prelude::SessionContext, transforms: &crmcube::etl::TransformSet, tables: &[&str]) {
    for t in tables {
        let crmcube::etl::TransformBody::Derived { sql: select, .. } = &transforms.get(t).unwrap().body else { panic!("{t} is derived") };
        let whole = format!("{t}_recomputed");
        ctx.register_table(whole.as_str(), ctx.sql(select).await.unwrap().into_view()).unwrap();
        assert_eq!(content_checksum(ctx, t).await.unwrap(), content_checksum(ctx, &whole).await.unwrap(), "{t}");
    }
}

fn table<'a>(r: &'a LoadReport, name: &str) -> &'a crmcube::etl::TableReport {
    r.table(name).unwrap_or_else(|| panic!("no report for {name}"))
}

async fn count(w: &Warehouse, table: &str) -> i64 {
    scalar(&w.session().await.unwrap(), &format!("SELECT count(*) FROM {table}")).await.parse().unwrap()
}

/// Asserts that every rollup was refreshed incrementally in the units of `date` (an older
/// sale's day) and of November 2026: those months for a rollup by month, those years for one by
/// year; and, when `read` is given, that each read that many fact rows.
fn assert_refreshed_units(night: &LoadReport, date: &str, read: Option<u64>) {
    let units = |n: usize| {
        let mut u = vec![date[..n].to_string(), "2026-11"[..n].to_string()];
        u.sort();
        u
    };
    let (months, years) = (units(7), units(4));
    for (rollup, units) in [
        ("rollup_sales_month", &months),
        ("rollup_sales_month_region", &months),
        ("rollup_sales_month_region_category_channel", &months),
        ("rollup_sales_month_product", &months),
        ("rollup_sales_year", &years),
        ("rollup_sales_year_region", &years),
        ("rollup_sales_year_province_subcategory", &years),
    ] {
        let r = table(night, rollup);
        assert_eq!((r.mode, &r.partitions), ("incremental", units), "{rollup}: {r:?}");
        if let Some(n) = read {
            assert_eq!(r.read, n, "{rollup}: {r:?}");
        }
    }
}

/// Asserts that `crmcube refresh --all`, rebuilding every rollup `night` refreshed from the
/// whole base tables, gives the same rows; returns what `query` read before the rebuild.
async fn rollups_equal_a_full_rebuild(project: &Project, w: &Warehouse, night: &LoadReport, query: &str) -> Vec<Vec<String>> {
    let refreshed: Vec<String> = night.tables.iter().filter(|t| t.kind == "rollup").map(|t| t.table.clone()).collect();
    let ctx = w.session().await.unwrap();
    let mut before = BTreeMap::new();
    for t in &refreshed {
        before.insert(t.clone(), content_checksum(&ctx, t).await.unwrap());
    }
    let stored = sql(&ctx, query).await;
    drop(ctx);
    let cubes = crmcube::cube::CubeSet::load(project, &crmcube::etl::TransformSet::load(project).unwrap()).unwrap();
    let report = crmcube::rollup::refresh(w, &cubes, true).await.unwrap();
    assert_eq!(report.rebuilt.len(), refreshed.len());
    let ctx = w.session().await.unwrap();
    for t in &refreshed {
        assert_eq!(content_checksum(&ctx, t).await.unwrap(), before[t], "{t}: refreshed incrementally differs from a full rebuild");
    }
    stored
}

#[test]
fn a_second_nights_files_add_exactly_the_new_and_changed_rows_with_history() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), true);
    let w = Warehouse::new(project.warehouse.clone());
    let sources = project.sources.clone();
    let (p, w1, night_sources) = (project.clone(), w.clone(), sources.clone());
    block_on(async move {
        let first = load(&p, &w1).await.unwrap();
        assert_eq!(table(&first, "dim_customer").mode, "full", "the first load reads everything");
        let ctx = w1.session().await.unwrap();
        let before: BTreeMap<&str, i64> = {
            let mut m = BTreeMap::new();
            for t in ["dim_customer", "orders", "order_lines", "fact_sales", "dim_customer_history"] {
                m.insert(t, count(&w1, t).await);
            }
            m
        };
        let watermark = scalar(&ctx, "SELECT CAST(max(updated_at) AS VARCHAR) FROM dim_customer").await;
        // One of the mover's completed orders, re-exported tonight as cancelled.
        let old = sql(&ctx, &format!(
            "SELECT order_id, rep_id, channel, CAST(order_date AS VARCHAR) FROM orders WHERE customer_id = '{MOVER}' AND status = 'completed' ORDER BY order_id LIMIT 1"
        ))
        .await;
        let [cancelled, rep, channel, date] = [&old[0][0], &old[0][1], &old[0][2], &old[0][3]];
        let cancelled_revenue = cents(&scalar(&ctx, &format!("SELECT sum(revenue) FROM fact_sales WHERE order_id = '{cancelled}'")).await);
        let mover_revenue_before = cents(&scalar(&ctx, &format!("SELECT sum(revenue) FROM fact_sales WHERE customer_id = '{MOVER}'")).await);
        let old_region = scalar(&ctx, &format!("SELECT region FROM dim_customer WHERE customer_id = '{MOVER}'")).await;
        assert_ne!(old_region, "West");
        // Version keys: the first load numbers one version per customer, 1 to n.
        let keys = sql(&ctx, "SELECT CAST(min(version_key) AS VARCHAR), CAST(max(version_key) AS VARCHAR), CAST(count(DISTINCT version_key) AS VARCHAR) FROM dim_customer_history").await;
        assert_eq!(keys[0], ["1".to_string(), before["dim_customer_history"].to_string(), before["dim_customer_history"].to_string()]);
        let mover_key = scalar(&ctx, &format!("SELECT CAST(version_key AS VARCHAR) FROM dim_customer_history WHERE customer_id = '{MOVER}'")).await;
        drop(ctx);

        let new_revenue = write_second_night(
            &night_sources,
            &format!("{cancelled},{MOVER},{rep},{channel},{date},cancelled,2026-11-01 12:00:00"),
        );
        let second = load(&p, &w1).await.unwrap();
        assert!(!second.unchanged);
        assert_eq!(second.files.new.len(), 3, "{:?}", second.files);

        // Exactly the new and changed rows: read, inserted, updated, and the counts after.
        let c = table(&second, "dim_customer");
        assert_eq!((c.mode, c.read, c.loaded, c.updated, c.skipped), ("incremental", 2, 2, 1, 0), "{c:?}");
        assert_eq!(c.watermark_before.as_deref(), Some(watermark.as_str()));
        assert_eq!(c.watermark_after.as_deref(), Some("2026-11-01T09:30:00"));
        let o = table(&second, "orders");
        assert_eq!((o.mode, o.read, o.loaded, o.updated), ("incremental", 4, 4, 1), "{o:?}");
        let l = table(&second, "order_lines");
        assert_eq!((l.mode, l.read, l.loaded, l.updated), ("incremental", 4, 4, 0), "{l:?}");
        // New keys only: the Delta commit appends tonight's rows, it does not rewrite the table.
        let log = w1.table_path("order_lines").join("_delta_log");
        let last = std::fs::read_dir(&log).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json")).max().unwrap();
        let commit = std::fs::read_to_string(&last).unwrap();
        assert!(commit.contains(r#""mode":"Append""#), "{commit}");
        for t in ["dim_product", "dim_sales_rep", "fact_payment", "fact_invoice", "fact_interaction"] {
            assert_eq!(table(&second, t).mode, "unchanged", "{t} read nothing new");
        }
        // An order changed (cancelled) and a customer moved: the sales are recomputed, not grown.
        assert_eq!(table(&second, "fact_sales").mode, "full");
        assert_eq!(count(&w1, "dim_customer").await, before["dim_customer"] + 1);
        assert_eq!(count(&w1, "orders").await, before["orders"] + 3);
        assert_eq!(count(&w1, "order_lines").await, before["order_lines"] + 4);
        let cancelled_lines: i64 = scalar(&w1.session().await.unwrap(), &format!("SELECT count(*) FROM order_lines WHERE order_id = '{cancelled}'")).await.parse().unwrap();
        assert_eq!(count(&w1, "fact_sales").await, before["fact_sales"] + 4 - cancelled_lines, "new lines in, the cancelled order's out");

        // History: the mover has two versions split at the move; the new customer one.
        let ctx = w1.session().await.unwrap();
        assert_eq!(count(&w1, "dim_customer_history").await, before["dim_customer_history"] + 2);
        let versions = sql(&ctx, &format!(
            "SELECT version, region, name, CAST(valid_from AS VARCHAR), CAST(valid_to AS VARCHAR), is_current, version_key \
             FROM dim_customer_history WHERE customer_id = '{MOVER}' ORDER BY version"
        ))
        .await;
        let moved = "2026-11-01T08:00:00";
        assert_eq!(versions.len(), 2, "{versions:?}");
        // The old version keeps its key; the two versions opened tonight (the mover's second,
        // C900001's first) follow the largest stored key, in customer order.
        let n = before["dim_customer_history"];
        assert_eq!(versions[0], ["1", old_region.as_str(), "Tang Ming", "", moved, "false", mover_key.as_str()]);
        assert_eq!(versions[1], ["2", "West", "Tang Ming", moved, "", "true", &(n + 1).to_string()]);
        let new_key = scalar(&ctx, "SELECT CAST(version_key AS VARCHAR) FROM dim_customer_history WHERE customer_id = 'C900001'").await;
        assert_eq!(new_key, (n + 2).to_string());
        let distinct = scalar(&ctx, "SELECT CAST(count(DISTINCT version_key) AS VARCHAR) FROM dim_customer_history").await;
        assert_eq!(distinct, (n + 2).to_string(), "every version has its own key");

        // Past sales stay in the old region, tonight's are in the new one (cube and base SQL).
        let cubes = crmcube::cube::CubeSet::load(&p, &crmcube::etl::TransformSet::load(&p).unwrap()).unwrap();
        let q = crmcube::query::CubeQuery {
            cube: "sales".into(),
            measures: vec!["revenue".into()],
            by: vec!["customer.region".into()],
            filters: vec![format!("customer.customer={MOVER}")],
            ..Default::default()
        };
        let answer = crate::common::cells(&crmcube::query::run(&ctx, cubes.get("sales").unwrap(), &q).await.unwrap());
        let by_region: BTreeMap<String, i128> = answer.iter().map(|r| (r[0].clone(), cents(&r[1]))).collect();
        assert_eq!(by_region.get(&old_region).copied(), Some(mover_revenue_before - cancelled_revenue), "{answer:?}");
        assert_eq!(by_region.get("West").copied(), Some(new_revenue[MOVER]), "{answer:?}");
        let new_customer = sql(&ctx, "SELECT CAST(sum(revenue) AS VARCHAR) FROM fact_sales WHERE customer_id = 'C900001'").await;
        assert_eq!(cents(&new_customer[0][0]), new_revenue["C900001"]);

        // The same night again: a no-op.
        let again = load(&p, &w1).await.unwrap();
        assert!(again.unchanged && again.snapshot == second.snapshot, "{again:?}");
    });

    // A full load of both nights' files gives the same tables (the history aside: a first load
    // knows one version per customer, and facts join it).
    let full_dir = tempfile::Builder::new().prefix("crmcube-full").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    copy_dir(&sources, &full_dir.path().join("sources"));
    let full = incremental_project(full_dir.path(), false);
    let wf = Warehouse::new(full.warehouse.clone());
    block_on(async move {
        load(&full, &wf).await.unwrap();
        let (a, b) = (w.session().await.unwrap(), wf.session().await.unwrap());
        for t in ["dim_customer", "orders", "order_lines", "dim_product", "fact_payment", "fact_invoice", "customer_value", "customer_clv", "open_order_lines", "credit_exposure"] {
            assert_eq!(content_checksum(&a, t).await.unwrap(), content_checksum(&b, t).await.unwrap(), "{t}");
        }
        let without_version = "SELECT order_id, line_no, order_date, customer_id, product_id, quantity, revenue, cost FROM fact_sales";
        for ctx in [&a, &b] {
            ctx.register_table("sales_rows", ctx.sql(without_version).await.unwrap().into_view()).unwrap();
        }
        assert_eq!(content_checksum(&a, "sales_rows").await.unwrap(), content_checksum(&b, "sales_rows").await.unwrap());
    });
}

/// A warehouse loaded before version keys were integers (`C000001#1` in the history and the
/// sales): the next night that changes a customer renumbers the stored versions, opens the new
/// ones after them, and recomputes the sales, which then join the versions valid on their dates.
#[test]
fn a_history_stored_with_text_keys_is_renumbered_and_the_sales_follow() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), true);
    let w = Warehouse::new(project.warehouse.clone());
    let (p, w1) = (project.clone(), w.clone());
    block_on(async move {
        load(&p, &w1).await.unwrap();
        // The earlier format, written as a snapshot of its own: every key `<customer>#<version>`.
        let ctx = w1.session().await.unwrap();
        let mut snapshot = w1.current().unwrap().unwrap();
        let old_sales = sql(&ctx, "SELECT CAST(count(*) AS VARCHAR), CAST(sum(revenue) AS VARCHAR) FROM fact_sales").await;
        for (table, key, value) in [
            ("dim_customer_history", "version_key", "customer_id || '#' || CAST(version AS VARCHAR)"),
            ("fact_sales", "customer_version", "customer_id || '#1'"),
        ] {
            let stored = ctx.table(table).await.unwrap();
            let columns: Vec<String> =
                stored.schema().fields().iter().map(|f| if f.name() == key { format!("{value} AS {key}") } else { format!("\"{}\"", f.name()) }).collect();
            let df = ctx.sql(&format!("SELECT {} FROM {table}", columns.join(", "))).await.unwrap();
            let schema = std::sync::Arc::new(df.schema().as_arrow().clone());
            let rows = df.collect().await.unwrap();
            let version = w1.write_table(table, schema, rows).await.unwrap();
            snapshot.tables.get_mut(table).unwrap().version = version;
        }
        w1.commit(snapshot.tables, snapshot.files, snapshot.rollups).unwrap();
        drop(ctx);
        let ctx = w1.session().await.unwrap();
        assert_eq!(scalar(&ctx, &format!("SELECT customer_version FROM fact_sales WHERE customer_id = '{MOVER}' LIMIT 1")).await, format!("{MOVER}#1"));
        let customers = count(&w1, "dim_customer_history").await;
        let old = sql(&ctx, &format!("SELECT order_id, rep_id, channel, CAST(order_date AS VARCHAR) FROM orders WHERE customer_id = '{MOVER}' AND status = 'completed' ORDER BY order_id LIMIT 1")).await;
        let [cancelled, rep, channel, date] = [&old[0][0], &old[0][1], &old[0][2], &old[0][3]];
        drop(ctx);

        write_second_night(&p.sources, &format!("{cancelled},{MOVER},{rep},{channel},{date},cancelled,2026-11-01 12:00:00"));
        let night = load(&p, &w1).await.unwrap();
        assert_eq!(table(&night, "dim_customer_history").mode, "incremental");
        assert_eq!(table(&night, "fact_sales").mode, "full");
        let ctx = w1.session().await.unwrap();
        for (t, c) in [("dim_customer_history", "version_key"), ("fact_sales", "customer_version")] {
            let df = ctx.table(t).await.unwrap();
            assert_eq!(df.schema().field_with_unqualified_name(c).unwrap().data_type(), &datafusion::arrow::datatypes::DataType::Int64, "{t}.{c}");
        }
        // Stored versions numbered 1..n in customer order (the mover, C000001, is the first),
        // tonight's two after them; no key repeats.
        let versions = sql(&ctx, &format!("SELECT version, CAST(version_key AS VARCHAR) FROM dim_customer_history WHERE customer_id = '{MOVER}' ORDER BY version")).await;
        assert_eq!(versions, [["1".to_string(), "1".to_string()], ["2".to_string(), (customers + 1).to_string()]]);
        let keys = sql(&ctx, "SELECT CAST(min(version_key) AS VARCHAR), CAST(max(version_key) AS VARCHAR), CAST(count(DISTINCT version_key) AS VARCHAR), CAST(count(*) AS VARCHAR) FROM dim_customer_history").await;
        let n = (customers + 2).to_string();
        assert_eq!(keys[0], ["1".to_string(), n.clone(), n.clone(), n]);
        // Every sale joins the version valid on its date: by key as by date range.
        let by_key = sql(&ctx, "SELECT h.region, CAST(count(*) AS VARCHAR), CAST(sum(f.revenue) AS VARCHAR) FROM fact_sales f JOIN dim_customer_history h ON h.version_key = f.customer_version GROUP BY 1 ORDER BY 1").await;
        let by_date = sql(
            &ctx,
            "SELECT h.region, CAST(count(*) AS VARCHAR), CAST(sum(f.revenue) AS VARCHAR) FROM fact_sales f JOIN dim_customer_history h ON h.customer_id = f.customer_id \
             AND (h.valid_from IS NULL OR f.order_date >= CAST(h.valid_from AS DATE)) AND (h.valid_to IS NULL OR f.order_date < CAST(h.valid_to AS DATE)) GROUP BY 1 ORDER BY 1",
        )
        .await;
        assert_eq!(by_key, by_date);
        let joined: i64 = by_key.iter().map(|r| r[1].parse::<i64>().unwrap()).sum();
        assert_eq!(joined, count(&w1, "fact_sales").await, "no sale without its version");
        assert!(joined > old_sales[0][0].parse::<i64>().unwrap() - 20, "{joined} sales after the night, {old_sales:?} before");
    });
}

/// An export rewritten after it was loaded is reported; in an incremental table with a key its
/// rows upsert again (nothing doubles).
#[test]
fn a_rewritten_incremental_export_is_reported_and_upserted_not_doubled() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), true);
    let w = Warehouse::new(project.warehouse.clone());
    let lines: PathBuf = project.sources.join("order_lines.csv");
    let (p, w1) = (project.clone(), w.clone());
    block_on(async move {
        load(&p, &w1).await.unwrap();
        let rows = count(&w1, "order_lines").await;
        // The exporter rewrote yesterday's file: same rows, one quantity corrected.
        let text = std::fs::read_to_string(&lines).unwrap();
        let first_line = text.lines().nth(1).unwrap().to_string();
        let mut fields: Vec<String> = first_line.split(',').map(str::to_string).collect();
        fields[3] = "7".into();
        std::fs::write(&lines, text.replacen(&first_line, &fields.join(","), 1)).unwrap();
        let report = load(&p, &w1).await.unwrap();
        assert_eq!(report.files.changed, vec!["order_lines.csv".to_string()]);
        let l = table(&report, "order_lines");
        assert_eq!(l.updated, l.loaded, "every row of the rewritten file replaces its earlier self: {l:?}");
        assert_eq!(count(&w1, "order_lines").await, rows, "nothing doubled");
        let q = format!("SELECT quantity FROM order_lines WHERE order_id = '{}' AND line_no = {}", fields[0], fields[1]);
        assert_eq!(scalar(&w1.session().await.unwrap(), &q).await, "7");
    });
}

/// A second night touching two months (new orders in November 2026, one older order cancelled)
/// rebuilds only those months of each rollup by month (those years of each rollup by year); the
/// rollups then hold exactly what a full rebuild from the same tables holds, and one of them
/// what hand-written SQL over the base tables gives.
#[test]
fn a_second_night_rebuilds_only_the_rollup_partitions_its_rows_touch() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), true);
    let w = Warehouse::new(project.warehouse.clone());
    block_on(async move {
        let first = load(&project, &w).await.unwrap();
        assert_eq!(table(&first, "rollup_sales_month").mode, "full");
        let ctx = w.session().await.unwrap();
        let old = sql(&ctx, &format!(
            "SELECT order_id, rep_id, channel, CAST(order_date AS VARCHAR) FROM orders \
             WHERE customer_id = '{MOVER}' AND status = 'completed' AND order_date < DATE '2026-01-01' ORDER BY order_id LIMIT 1"
        ))
        .await;
        let [cancelled, rep, channel, date] = [&old[0][0], &old[0][1], &old[0][2], &old[0][3]];
        drop(ctx);
        write_second_night(&project.sources, &format!("{cancelled},{MOVER},{rep},{channel},{date},cancelled,2026-11-01 12:00:00"));
        let second = load(&project, &w).await.unwrap();

        // The months and years touched, from the night's own files: the new orders' and the
        // cancelled order's.
        assert_refreshed_units(&second, date, None);
        let stored = rollups_equal_a_full_rebuild(&project, &w, &second, "SELECT time_month, customer_region, CAST(revenue AS VARCHAR), CAST(orders AS VARCHAR), CAST(customers AS VARCHAR) \
                            FROM rollup_sales_month_region ORDER BY 1, 2").await;
        let ctx = w.session().await.unwrap();
        // And by hand, from the facts and the dimensions as of each sale.
        let by_hand = sql(
            &ctx,
            "SELECT d.month, h.region, CAST(sum(f.revenue) AS VARCHAR), CAST(count(DISTINCT f.order_id) AS VARCHAR), CAST(count(DISTINCT f.customer_id) AS VARCHAR) \
             FROM fact_sales f JOIN dim_date d ON d.date = f.order_date JOIN dim_customer_history h ON h.version_key = f.customer_version \
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .await;
        assert_eq!(stored, by_hand);

        // A third night with nothing new for the facts keeps every rollup as it is.
        let third = load(&project, &w).await.unwrap();
        assert!(third.unchanged, "{third:?}");
    });
}

/// A night of new orders and their lines only: the sales facts are appended (`grows_with:
/// order_lines`), not recomputed, and equal what their SQL gives over the whole base tables.
#[test]
fn a_night_of_new_orders_only_appends_the_sales_facts() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), true);
    let w = Warehouse::new(project.warehouse.clone());
    block_on(async move {
        load(&project, &w).await.unwrap();
        let before = count(&w, "fact_sales").await;
        // Besides the new orders, one more line for an order of an earlier year: its order and
        // customer are already counted in that month and year.
        let ctx = w.session().await.unwrap();
        let old = sql(&ctx, "SELECT order_id, CAST(order_date AS VARCHAR) FROM orders WHERE status = 'completed' AND order_date < DATE '2026-01-01' ORDER BY order_id LIMIT 1").await;
        let (old_order, old_date) = (old[0][0].clone(), old[0][1].clone());
        drop(ctx);
        std::fs::write(
            project.sources.join("orders_2026-11-01.csv"),
            format!(
                "order_id,customer_id,rep_id,channel,order_date,status,updated_at\n\
                 O9000001,{MOVER},R004,online,2026-11-02,completed,2026-11-02 10:00:00\n\
                 O9000002,{MOVER},R004,store,2026-11-03,cancelled,2026-11-03 10:00:00\n"
            ),
        )
        .unwrap();
        std::fs::write(
            project.sources.join("order_lines_2026-11-01.csv"),
            format!("order_id,line_no,product_id,quantity,unit_price,discount_pct\nO9000001,1,P0059,4,489.00,5\nO9000001,2,P0047,1,2019.00,0\nO9000002,1,P0047,2,2019.00,10\n{old_order},99,P0059,1,489.00,0\n"),
        )
        .unwrap();
        let second = load(&project, &w).await.unwrap();
        let f = table(&second, "fact_sales");
        // Three completed lines in; the cancelled order's line is filtered out as ever.
        assert_eq!((f.mode, f.read, f.rows), ("incremental", 3, before as u64 + 3), "{f:?}");
        assert_eq!(count(&w, "fact_sales").await, before + 3);
        let log = w.table_path("fact_sales").join("_delta_log");
        let last = std::fs::read_dir(&log).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "json")).max().unwrap();
        assert!(std::fs::read_to_string(&last).unwrap().contains(r#""mode":"Append""#));

        // The same rows as the transform's SELECT over the whole tables, and the new lines'
        // revenue by hand: 4 × 489.00 × 95 % + 1 × 2019.00.
        let ctx = w.session().await.unwrap();
        let transforms = crmcube::etl::TransformSet::load(&project).unwrap();
        let crmcube::etl::TransformBody::Derived { sql: select, .. } = &transforms.get("fact_sales").unwrap().body else { panic!("fact_sales is derived") };
        ctx.register_table("recomputed", ctx.sql(select).await.unwrap().into_view()).unwrap();
        assert_eq!(content_checksum(&ctx, "fact_sales").await.unwrap(), content_checksum(&ctx, "recomputed").await.unwrap());
        let revenue = scalar(&ctx, "SELECT CAST(sum(revenue) AS VARCHAR) FROM fact_sales WHERE order_id = 'O9000001'").await;
        assert_eq!(cents(&revenue), 4 * 48900 * 95 / 100 + 201900);

        // The per-customer tables `refresh_by` customer: only the months of the two customers
        // who ordered tonight (the mover, the old order's) are recomputed, counted here from the
        // sales; every other row is kept. Each table, and each one read from them, holds what its
        // SELECT over tonight's whole tables gives.
        let months = scalar(
            &ctx,
            &format!(
                "SELECT CAST(count(DISTINCT (customer_id, date_trunc('month', order_date))) AS VARCHAR) FROM fact_sales \
                 WHERE customer_id IN ('{MOVER}', (SELECT customer_id FROM orders WHERE order_id = '{old_order}'))"
            ),
        )
        .await;
        let m = table(&second, "customer_monthly");
        assert_eq!((m.mode, m.read), ("incremental", months.parse::<u64>().unwrap()), "{m:?}");
        assert!(m.read < m.rows / 10, "{m:?}");
        // Partitioned by month (`layout: partition_by`), each table rewrote only the months
        // whose rows changed: customer_monthly November (the mover's new order) and the old
        // order's month (its new line); customer_lifecycle November alone (tonight's orders
        // extend the observation end to it: a row for every customer; the old order's customer
        // had already bought in its month, so no earlier stage changed).
        let month_start = |date: &str| format!("month_start={}-01", &date[..7]);
        let expected: std::collections::BTreeSet<String> = [month_start("2026-11-02"), month_start(&old_date)].into();
        let (added, removed) = last_commit_partitions(&w, "customer_monthly");
        assert_eq!(added, expected, "customer_monthly's files written tonight");
        assert_eq!(removed, [month_start(&old_date)].into(), "customer_monthly's files replaced tonight");
        let last_month = scalar(&ctx, "SELECT CAST(max(month_end) AS VARCHAR) FROM customer_lifecycle WHERE month_end < DATE '2026-11-01'").await;
        assert!(last_month.as_str() < "2026-11-01", "the sample's last month {last_month}");
        let (added, removed) = last_commit_partitions(&w, "customer_lifecycle");
        assert_eq!((added, removed), (["month_end=2026-11-30".to_string()].into(), Default::default()), "customer_lifecycle's files written tonight");
        // The uninvoiced lines grow with the sales (no invoice came tonight): tonight's lines
        // without an invoice, counted here from the base tables, are appended.
        let open = scalar(
            &ctx,
            &format!(
                "SELECT CAST(count(*) AS VARCHAR) FROM order_lines l WHERE (l.order_id = 'O9000001' OR (l.order_id = '{old_order}' AND l.line_no = 99)) \
                 AND l.order_id NOT IN (SELECT order_id FROM fact_invoice)"
            ),
        )
        .await;
        let o = table(&second, "open_order_lines");
        assert_eq!((o.mode, o.read), ("incremental", open.parse::<u64>().unwrap()), "{o:?}");
        assert!(o.read >= 2, "O9000001's two lines are not invoiced: {o:?}");
        // customer_totals is refreshed by key from customer_monthly's refresh: the two customers'
        // rows (one if the old order is the mover's).
        let customers = scalar(&ctx, &format!("SELECT CAST(count(DISTINCT customer_id) AS VARCHAR) FROM orders WHERE order_id IN ('O9000001', '{old_order}')")).await;
        let c = table(&second, "customer_totals");
        assert_eq!((c.mode, c.read), ("incremental", customers.parse::<u64>().unwrap()), "{c:?}");
        equal_their_selects(&ctx, &transforms, &["customer_monthly", "customer_totals", "customer_value", "customer_cohort", "customer_lifecycle", "open_order_lines", "credit_exposure"]).await;
        drop(ctx);

        // Downstream tables read the grown table: every rollup adds the aggregate of the three
        // new rows (read: 3) to its stored rows, touching November and the old line's month (by
        // month) or their years (by year).
        assert_refreshed_units(&second, &old_date, Some(3));
        // The same rows a full rebuild gives; the exact distinct counts by hand: the old order's
        // new line adds no order and no customer to its year.
        let year_region = "SELECT time_year, customer_region, CAST(revenue AS VARCHAR), CAST(quantity AS VARCHAR), CAST(orders AS VARCHAR), CAST(customers AS VARCHAR) \
                           FROM rollup_sales_year_region ORDER BY 1, 2";
        let stored = rollups_equal_a_full_rebuild(&project, &w, &second, year_region).await;
        let ctx = w.session().await.unwrap();
        let by_hand = sql(
            &ctx,
            "SELECT d.year, h.region, CAST(sum(f.revenue) AS VARCHAR), CAST(sum(f.quantity) AS VARCHAR), CAST(count(DISTINCT f.order_id) AS VARCHAR), CAST(count(DISTINCT f.customer_id) AS VARCHAR) \
             FROM fact_sales f JOIN dim_date d ON d.date = f.order_date JOIN dim_customer_history h ON h.version_key = f.customer_version \
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .await;
        assert_eq!(stored, by_hand);
        drop(ctx);

        // A third night within November: the observation end stays (sales_months is kept), so
        // customer_lifecycle is refreshed by key too — the customer_monthly keys its refresh
        // recomputed — instead of in full: that customer's months, counted here from the sales
        // (every month from the first purchase to November), and November's files alone.
        let customer = "C000003";
        std::fs::write(
            project.sources.join("orders_2026-11-05.csv"),
            format!("order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000003,{customer},R004,online,2026-11-05,completed,2026-11-05 10:00:00\n"),
        )
        .unwrap();
        std::fs::write(project.sources.join("order_lines_2026-11-05.csv"), "order_id,line_no,product_id,quantity,unit_price,discount_pct\nO9000003,1,P0059,1,489.00,0\n").unwrap();
        // And the invoice of the second night's order: its lines are no longer open.
        let mut invoices = std::fs::OpenOptions::new().append(true).open(project.sources.join("invoices.csv")).unwrap();
        std::io::Write::write_all(&mut invoices, format!("INV9000001,O9000001,{MOVER},2026-11-06,2026-12-06,2347.00\n").as_bytes()).unwrap();
        drop(invoices);
        let third = load(&project, &w).await.unwrap();
        assert_eq!(table(&third, "sales_months").mode, "unchanged");
        let ctx = w.session().await.unwrap();
        let months = scalar(
            &ctx,
            &format!("SELECT CAST((2026 * 12 + 11) - (date_part('year', min(order_date)) * 12 + date_part('month', min(order_date))) + 1 AS BIGINT) FROM fact_sales WHERE customer_id = '{customer}'"),
        )
        .await;
        let l = table(&third, "customer_lifecycle");
        assert_eq!((l.mode, l.read), ("incremental", months.parse::<u64>().unwrap()), "{l:?}");
        assert_eq!(last_commit_partitions(&w, "customer_lifecycle"), (["month_end=2026-11-30".to_string()].into(), ["month_end=2026-11-30".to_string()].into()));
        assert_eq!((table(&third, "customer_totals").mode, table(&third, "customer_totals").read), ("incremental", 1));
        equal_their_selects(&ctx, &transforms, &["customer_monthly", "customer_lifecycle", "customer_totals", "customer_value"]).await;
        // A new invoice can close an open order of any night: the uninvoiced lines are
        // recomputed in full, not grown, and O9000001's are gone.
        assert_eq!(table(&third, "fact_invoice").mode, "full");
        assert_eq!(table(&third, "open_order_lines").mode, "full");
        assert_eq!(scalar(&ctx, "SELECT CAST(count(*) AS VARCHAR) FROM open_order_lines WHERE order_id = 'O9000001'").await, "0");
        equal_their_selects(&ctx, &transforms, &["open_order_lines", "credit_exposure"]).await;
    });
}

/// `refresh_by` on a SELECT that is not keyed by its column — a rank over every customer — is
/// recomputed in full on a night of new orders, so it still equals its SELECT.
#[test]
fn a_select_not_keyed_by_its_refresh_by_column_is_recomputed_in_full() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ranked = "SELECT customer_id, row_number() OVER (ORDER BY sum(revenue) DESC, customer_id) AS revenue_rank FROM fact_sales GROUP BY customer_id";
    let project = with_table(dir.path(), "sales_rank", "", ranked);
    let w = Warehouse::new(project.warehouse.clone());
    block_on(async move {
        load(&project, &w).await.unwrap();
        std::fs::write(
            project.sources.join("orders_2026-11-01.csv"),
            format!("order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000001,{MOVER},R004,online,2026-11-02,completed,2026-11-02 10:00:00\n"),
        )
        .unwrap();
        std::fs::write(project.sources.join("order_lines_2026-11-01.csv"), "order_id,line_no,product_id,quantity,unit_price,discount_pct\nO9000001,1,P0047,90,2019.00,0\n").unwrap();
        let night = load(&project, &w).await.unwrap();
        assert_eq!(table(&night, "fact_sales").mode, "incremental");
        assert_eq!(table(&night, "customer_monthly").mode, "incremental");
        assert_eq!(table(&night, "sales_rank").mode, "full");
        let ctx = w.session().await.unwrap();
        ctx.register_table("sales_rank_recomputed", ctx.sql(ranked).await.unwrap().into_view()).unwrap();
        assert_eq!(content_checksum(&ctx, "sales_rank").await.unwrap(), content_checksum(&ctx, "sales_rank_recomputed").await.unwrap());
        // The mover's big order moved the mover's rank: a refresh of the mover's row alone
        // would have left two customers at one rank.
        let ranks = scalar(&ctx, "SELECT CAST(count(DISTINCT revenue_rank) = count(*) AS VARCHAR) FROM sales_rank").await;
        assert_eq!(ranks, "true");
    });
}

/// A table partitioned by a value tonight's rows move: each customer's last month bought, NULL
/// until their second order. Refreshed by key, a customer who orders again leaves the partition
/// they were in for November's — from a month, and from the NULL partition — and the table
/// equals its SELECT. (The commit does not tell the by-partition path from its whole-table
/// fallback: the test checks the rows, not the path.)
#[test]
fn a_key_whose_partition_moves_leaves_its_old_partition() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let last = "SELECT customer_id, \
                CASE WHEN count(DISTINCT order_id) > 1 THEN CAST(date_trunc('month', max(order_date)) AS DATE) END AS last_month, \
                count(*) AS lines FROM fact_sales GROUP BY customer_id";
    let project = with_table(dir.path(), "customer_last", "layout: { partition_by: last_month }\n", last);
    let w = Warehouse::new(project.warehouse.clone());
    block_on(async move {
        load(&project, &w).await.unwrap();
        let ctx = w.session().await.unwrap();
        // Two customers last seen in a month other customers share, and one of several with a
        // single order (NULL): each partition keeps rows after they leave.
        let moved = sql(
            &ctx,
            "SELECT customer_id, CAST(last_month AS VARCHAR) AS month FROM customer_last \
             WHERE last_month IN (SELECT last_month FROM customer_last WHERE last_month < DATE '2026-10-01' GROUP BY 1 HAVING count(*) > 2) \
             ORDER BY last_month, customer_id LIMIT 2",
        )
        .await;
        let single = sql(&ctx, "SELECT customer_id FROM customer_last WHERE last_month IS NULL ORDER BY 1 LIMIT 2").await;
        assert_eq!((moved.len(), single.len()), (2, 2), "{moved:?} {single:?}");
        assert_eq!(moved[0][1], moved[1][1]);
        let (from, single) = (format!("last_month={}", moved[0][1]), single[0][0].clone());
        drop(ctx);
        let night = |day: u32, orders: &[(&str, &str)]| {
            let mut o = String::from("order_id,customer_id,rep_id,channel,order_date,status,updated_at\n");
            let mut l = String::from("order_id,line_no,product_id,quantity,unit_price,discount_pct\n");
            for (id, customer) in orders {
                o.push_str(&format!("{id},{customer},R004,online,2026-11-{day:02},completed,2026-11-{day:02} 10:00:00\n"));
                l.push_str(&format!("{id},1,P0059,1,489.00,0\n"));
            }
            std::fs::write(project.sources.join(format!("orders_2026-11-{day:02}.csv")), o).unwrap();
            std::fs::write(project.sources.join(format!("order_lines_2026-11-{day:02}.csv")), l).unwrap();
        };
        let transforms = crmcube::etl::TransformSet::load(&project).unwrap();
        let november = "last_month=2026-11-01".to_string();

        // Night 2: one customer leaves a month, one the NULL partition (the whole-table path).
        night(2, &[("O9000001", moved[0][0].as_str()), ("O9000002", single.as_str())]);
        let second = load(&project, &w).await.unwrap();
        let c = table(&second, "customer_last");
        assert_eq!((c.mode, c.read), ("incremental", 2), "{c:?}");
        let (added, removed) = last_commit_partitions(&w, "customer_last");
        assert_eq!(added, [from.clone(), november.clone(), "last_month=NULL".to_string()].into(), "written tonight");
        assert_eq!(removed, [from.clone(), "last_month=NULL".to_string()].into(), "replaced tonight");
        let ctx = w.session().await.unwrap();
        equal_their_selects(&ctx, &transforms, &["customer_last"]).await;
        drop(ctx);

        // Night 3: the other customer leaves the same month (the by-partition path); November is
        // rewritten with them.
        night(5, &[("O9000003", moved[1][0].as_str())]);
        let third = load(&project, &w).await.unwrap();
        let c = table(&third, "customer_last");
        assert_eq!((c.mode, c.read), ("incremental", 1), "{c:?}");
        assert_eq!(last_commit_partitions(&w, "customer_last"), ([from.clone(), november.clone()].into(), [from.clone(), november].into()));
        let ctx = w.session().await.unwrap();
        equal_their_selects(&ctx, &transforms, &["customer_last"]).await;
        let rows = sql(&ctx, &format!("SELECT CAST(last_month AS VARCHAR) AS month FROM customer_last WHERE customer_id IN ('{}', '{}', '{single}')", moved[0][0], moved[1][0])).await;
        assert_eq!(rows, vec![vec!["2026-11-01".to_string()]; 3]);
    });
}

/// A night of new orders under a small `--memory-limit`: the grown fact table and the tables
/// made tonight are read back from their files instead of memory, and the warehouse ends as the
/// same night without a limit leaves it, table for table.
#[test]
fn a_night_under_a_small_memory_limit_ends_as_the_unbounded_night_does() {
    const LIMIT: usize = 28 << 20;
    let (a, b) = (
        tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
        tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
    );
    let (pa, pb) = (incremental_project(a.path(), true), incremental_project(b.path(), true));
    let unbounded = Warehouse::new(pa.warehouse.clone());
    let bounded = Warehouse::new(pb.warehouse.clone()).with_memory_limit(Some(LIMIT));
    block_on(async move {
        load(&pa, &unbounded).await.unwrap();
        // The first night without a limit (a whole export needs more than 28 MiB).
        load(&pb, &Warehouse::new(pb.warehouse.clone())).await.unwrap();
        for p in [&pa, &pb] {
            std::fs::write(
                p.sources.join("orders_2026-11-01.csv"),
                format!("order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000001,{MOVER},R004,online,2026-11-02,completed,2026-11-02 10:00:00\n"),
            )
            .unwrap();
            std::fs::write(
                p.sources.join("order_lines_2026-11-01.csv"),
                "order_id,line_no,product_id,quantity,unit_price,discount_pct\nO9000001,1,P0059,4,489.00,5\nO9000001,2,P0047,1,2019.00,0\n",
            )
            .unwrap();
        }
        // The sales facts alone take more than a quarter of the limit in memory: they cannot be
        // kept there, so the tables after them read the stored rows and the two new ones.
        let ctx = unbounded.session().await.unwrap();
        let facts = ctx.table("fact_sales").await.unwrap().collect().await.unwrap();
        assert!(crmcube::warehouse::memory_size(&facts) > LIMIT / 4, "the sample's sales facts fit in a quarter of {LIMIT} bytes");
        drop((ctx, facts));

        let (x, y) = (load(&pa, &unbounded).await.unwrap(), load(&pb, &bounded).await.unwrap());
        assert_eq!(table(&y, "fact_sales").mode, "incremental", "{y:?}");
        let modes = |r: &LoadReport| r.tables.iter().map(|t| (t.table.clone(), t.mode, t.rows)).collect::<Vec<_>>();
        assert_eq!(modes(&y), modes(&x));
        let (sa, sb) = (unbounded.session().await.unwrap(), bounded.session().await.unwrap());
        for t in unbounded.current().unwrap().unwrap().tables.keys() {
            assert_eq!(content_checksum(&sb, t).await.unwrap(), content_checksum(&sa, t).await.unwrap(), "table {t} differs");
        }
    });
}

/// A derived table partitioned by month (`layout: partition_by`): a night that changes one month
/// writes that month's files alone, a night that recomputes the same rows writes nothing, and a
/// night after a killed load (a newer version no snapshot names) writes every month — each time
/// with the rows the SELECT gives over the whole tables.
#[test]
fn a_partitioned_table_rewrites_only_the_months_whose_rows_changed() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), true);
    // A thousand copies of each row: more rows than a small table's content check compares
    // (a small table recomputed to the same rows is kept whole, before it is written).
    let select = "SELECT month, channel, orders, copy FROM \
                  (SELECT CAST(date_trunc('month', order_date) AS DATE) AS month, channel, count(*) AS orders FROM orders WHERE status = 'completed' GROUP BY 1, 2) \
                  CROSS JOIN (SELECT unnest(range(0, 1000)) AS copy)";
    std::fs::write(
        project.transforms.join("monthly_orders.yaml"),
        format!("version: 1\ntable: monthly_orders\nsql: |\n  {select}\nlayout: {{ partition_by: month }}\n"),
    )
    .unwrap();
    let w = Warehouse::new(project.warehouse.clone());
    block_on(async move {
        let version = |w: &Warehouse| w.current().unwrap().unwrap().tables["monthly_orders"].version;
        let matches_select = |w: Warehouse| async move {
            let ctx = w.session().await.unwrap();
            ctx.register_table("recomputed", ctx.sql(select).await.unwrap().into_view()).unwrap();
            assert_eq!(content_checksum(&ctx, "monthly_orders").await.unwrap(), content_checksum(&ctx, "recomputed").await.unwrap());
            // The months by hand from the export: one row per month and channel of completed orders.
            let months = scalar(&ctx, "SELECT CAST(count(DISTINCT date_trunc('month', order_date)) AS VARCHAR) FROM orders WHERE status = 'completed'").await;
            assert_eq!(scalar(&ctx, "SELECT CAST(count(DISTINCT month) AS VARCHAR) FROM monthly_orders").await, months);
        };
        load(&project, &w).await.unwrap();
        let first = version(&w);
        let (added, _) = last_commit_partitions(&w, "monthly_orders");
        assert!(added.len() >= 36, "{added:?}");

        // A cancelled order: orders changed, the table's rows did not. Nothing is written.
        std::fs::write(
            project.sources.join("orders_2026-11-01.csv"),
            "order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000001,C000002,R004,online,2026-10-20,cancelled,2026-11-01 10:00:00\n",
        )
        .unwrap();
        let night = load(&project, &w).await.unwrap();
        assert_eq!(table(&night, "monthly_orders").mode, "full");
        assert_eq!(version(&w), first, "a table recomputed to the same rows is not written again");
        assert_eq!(w.latest_version("monthly_orders").await.unwrap(), Some(first));
        matches_select(w.clone()).await;

        // A completed phone order in October 2026: that month's files alone are replaced.
        std::fs::write(
            project.sources.join("orders_2026-11-02.csv"),
            "order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000002,C000002,R004,phone,2026-10-21,completed,2026-11-02 10:00:00\n",
        )
        .unwrap();
        load(&project, &w).await.unwrap();
        assert_eq!(version(&w), first + 1);
        let october: std::collections::BTreeSet<String> = ["month=2026-10-01".to_string()].into();
        assert_eq!(last_commit_partitions(&w, "monthly_orders"), (october.clone(), october.clone()));
        matches_select(w.clone()).await;
        // The other months are read from the files of the first night's version: a vacuum
        // keeping only this snapshot keeps them.
        let vacuumed = w.vacuum(1).await.unwrap();
        assert!(vacuumed.files_deleted > 0, "{vacuumed:?}");
        matches_select(w.clone()).await;
        // Nor do they stop a compaction from bin-packing the newest version: orders' two
        // nights' files become one, and the rows stay.
        let before = count(&w, "orders").await;
        let compacted = w.compact(2, &Default::default()).await.unwrap();
        let orders = compacted.tables.iter().find(|t| t.table == "orders").unwrap_or_else(|| panic!("{compacted:?}"));
        assert_eq!((orders.how, orders.files_after), ("optimize", 1), "{compacted:?}");
        assert_eq!(count(&w, "orders").await, before);
        // The vacuum's own Delta commits change no rows: the next night still writes one month.
        std::fs::write(
            project.sources.join("orders_2026-11-02b.csv"),
            "order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000012,C000002,R004,phone,2026-10-23,completed,2026-11-02 11:00:00\n",
        )
        .unwrap();
        let night = load(&project, &w).await.unwrap();
        assert_eq!(table(&night, "orders").mode, "incremental");
        assert_eq!(last_commit_partitions(&w, "monthly_orders"), (october.clone(), october.clone()));
        matches_select(w.clone()).await;

        // A killed load wrote a version no snapshot names (here: the table emptied). The next
        // load cannot build on it: every month is written again.
        let schema = w.session().await.unwrap().table("monthly_orders").await.unwrap().schema().as_arrow().clone();
        let stray = w.write_partitioned("monthly_orders", std::sync::Arc::new(schema), vec![], &["month".to_string()], &Default::default()).await.unwrap();
        std::fs::write(
            project.sources.join("orders_2026-11-03.csv"),
            "order_id,customer_id,rep_id,channel,order_date,status,updated_at\nO9000003,C000002,R004,phone,2026-10-22,completed,2026-11-03 10:00:00\n",
        )
        .unwrap();
        load(&project, &w).await.unwrap();
        assert_eq!(version(&w), stray + 1);
        let (added, _) = last_commit_partitions(&w, "monthly_orders");
        assert!(added.len() >= 36, "{added:?}");
        matches_select(w.clone()).await;
    });
}

/// A column renamed in a source's transform reaches the derived tables that `SELECT *` from it,
/// though their own transforms and their values did not change: a small table (kept whole when
/// it recomputes to the same rows) and a partitioned one (written by partition when its rows'
/// prints match).
#[test]
fn a_column_renamed_upstream_is_renamed_in_the_tables_that_select_it() {
    let dir = tempfile::Builder::new().prefix("crmcube-nightly").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let project = incremental_project(dir.path(), false);
    std::fs::write(project.transforms.join("reps_copy.yaml"), "version: 1\ntable: reps_copy\nsql: SELECT * FROM dim_sales_rep\n").unwrap();
    // 20 reps × 6,000 copies: more rows than the small-table check compares.
    std::fs::write(
        project.transforms.join("reps_many.yaml"),
        "version: 1\ntable: reps_many\nsql: SELECT r.*, c.copy % 4 AS bucket, c.copy FROM dim_sales_rep r CROSS JOIN (SELECT unnest(range(0, 6000)) AS copy) c\nlayout: { partition_by: bucket }\n",
    )
    .unwrap();
    let w = Warehouse::new(project.warehouse.clone());
    block_on(async move {
        load(&project, &w).await.unwrap();
        let reps = project.transforms.join("dim_sales_rep.yaml");
        let text = std::fs::read_to_string(&reps).unwrap();
        assert!(text.contains("{ name: hire_date, type: date }"), "the sample's rep columns changed");
        std::fs::write(&reps, text.replace("{ name: hire_date, type: date }", "{ name: hired_on, from: hire_date, type: date }")).unwrap();
        let night = load(&project, &w).await.unwrap();
        assert_eq!(table(&night, "dim_sales_rep").mode, "full");
        let ctx = w.session().await.unwrap();
        for t in ["reps_copy", "reps_many"] {
            let columns: Vec<String> = ctx.table(t).await.unwrap().schema().fields().iter().map(|f| f.name().clone()).collect();
            assert!(columns.contains(&"hired_on".to_string()) && !columns.contains(&"hire_date".to_string()), "{t}: {columns:?}");
            // The hire dates by hand from the source table, under the new name.
            let q = format!("SELECT CAST(count(DISTINCT hired_on) AS VARCHAR) FROM {t}");
            assert_eq!(scalar(&ctx, &q).await, scalar(&ctx, "SELECT CAST(count(DISTINCT hired_on) AS VARCHAR) FROM dim_sales_rep").await);
        }
    });
}
