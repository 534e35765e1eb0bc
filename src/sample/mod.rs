//! Deterministic sample CRM export, used by `crmcube sample` and the demo project.
//!
//! [`generate`] writes a small but realistic CRM export into a folder: the same
//! `(customers, years, seed)` always gives the same bytes (one `ChaCha8Rng`, no hash-map
//! iteration, no wall clock). The data period ends on **2026-10-31** and starts `years` years
//! earlier (2023-11-01 for three years). With 2,500 customers and 3 years the folder is ~10 MB
//! (~29k orders, ~64k order lines, ~14k interactions); 400,000 customers give ~10 M order lines.
//!
//! The files stream to disk as they are generated: the reference files and customers first,
//! then the activity a month at a time (orders with their lines and invoices, the payments that
//! have come due, the interactions). Memory holds the customers and a few months of pending
//! payments (about 150 bytes a customer), never a file: 10 M order lines generate in 22 s and
//! 89 MiB, 100 M in 4 min and 634 MiB (release build, 2 cores).
//!
//! `sample-data/` was written by an earlier version of this generator, which planned every
//! order in memory and drew in another order: today's generator writes the same shapes and dirt
//! rates for its config, not the same bytes. The tests read `sample-data/dirt.json`, so the
//! folder is kept as it is (regenerating it would move every figure the tests print).
//!
//! # Files
//!
//! | file | columns |
//! |------|---------|
//! | `customers.csv` (**GBK**) | customer_id, name, segment, region, province, city, credit_limit, email, signup_date, updated_at |
//! | `sales_reps.csv` | rep_id, name, region, hire_date |
//! | `products.csv` | product_id, name, category, subcategory, list_price, unit_cost |
//! | `orders.csv` | order_id, customer_id, rep_id, channel, order_date, status, updated_at |
//! | `order_lines.csv` | order_id, line_no, product_id, quantity, unit_price, discount_pct |
//! | `invoices.csv` | invoice_id, order_id, customer_id, invoice_date, due_date, amount |
//! | `payments.csv` | payment_id, invoice_id, payment_date, amount, method |
//! | `interactions.jsonl` | one JSON object per line (contact-centre interactions) |
//! | `dirt.json` | the [`SampleSummary`]: rows and dirty-row counts per file |
//!
//! Clean values: amounts `1234.50`, dates `YYYY-MM-DD`, timestamps `YYYY-MM-DD HH:MM:SS`,
//! enums in lower case. Business shapes: heavy-tailed customer value (Pareto weights, ~2% key
//! accounts; the top 10% of customers carry well over half of revenue), seasonality (peak
//! Nov–Dec, trough in February, summer dip) with a mild upward trend, ~30% of customers churn
//! and order nothing afterwards, ~97% of orders complete, one invoice per completed order,
//! ~80% of invoices paid on time, ~8% late, ~5% partially, the rest unpaid (mostly recent).
//!
//! # Dirty rows
//!
//! A random subset of rows is made dirty at the rates below; a dirty row has exactly one kind,
//! and `dirt.json` counts rows per kind under these names.
//!
//! - **customers.csv**
//!   - `duplicate_later` 4% — an extra row for the customer, later in the file, with a later
//!     `updated_at` and a changed segment or city; the later row is the current state.
//!   - `duplicate_equal_ts` 0.5% — an extra row, later in the file, with the *same*
//!     `updated_at` and a changed city; the later line wins.
//!   - `amount_formatted` 5% — credit_limit `1,234.50` or `￥1,234.50`.
//!   - `date_alt_format` 8% — signup_date `DD/MM/YYYY`.
//!   - `padded` 5% — name or city surrounded by spaces (`"  Hangzhou "`).
//!   - `blank_optional` 3% — email empty.
//!   - `mixed_case_enum` 10% — segment `Enterprise`, `SMB`, `cOnSuMeR`.
//!   - `unparseable` 0.3% — an extra, garbled row right after the customer's clean row:
//!     credit_limit `n/a` or signup_date `2024-13-45`.
//! - **orders.csv**: `date_alt_format` 8% (order_date), `mixed_case_enum` 10% (channel),
//!   `padded` 3% (customer_id), `orphan_customer` 0.5% (`C9xxxxx`, no such customer),
//!   `unparseable` 0.2% (a ragged 4-field row, or order_date `not a date`).
//! - **order_lines.csv**: `amount_formatted` 5% (unit_price), `negative_quantity` 0.3%,
//!   `orphan_product` 0.3% (`P9xxx`), `unparseable` 0.2% (quantity in words, or a ragged
//!   3-field row), and `orphan_order_cascade` for every line of an orphan or unparseable order
//!   (the line itself is clean).
//! - **invoices.csv**: `amount_formatted` 5%, `date_alt_format` 8% (invoice_date),
//!   `unparseable` 0.2% (amount `n/a`).
//! - **payments.csv**: `amount_formatted` 5%, `date_alt_format` 8%, `mixed_case_enum` 10%
//!   (method), `orphan_invoice` 0.3% (`INV9xxxxxx`), `unparseable` 0.2% (amount `n/a` or
//!   payment_date `not a date`), and `orphan_invoice_cascade` for every payment of an
//!   unparseable invoice (the payment itself is clean).
//! - **interactions.jsonl**: `mixed_case_enum` 10% (channel), `unparseable` 0.2% (a truncated
//!   JSON line), `orphan_customer` 0.3%.
//! - **sales_reps.csv**, **products.csv**: `padded` 5% (name).
//!
//! Consequences: orphan and unparseable orders get no invoice; order lines with
//! `negative_quantity`, `orphan_product` or `unparseable` are left out of the invoice amount;
//! duplicate customer rows are otherwise clean. A formatted amount below 1,000 always carries
//! the currency sign, so every `amount_formatted` row really differs from the clean form.
//! customers.csv uses the full-width `￥` (U+FFE5) because GBK has no code for `¥` (U+00A5);
//! the UTF-8 files use `¥`.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta};
use encoding_rs::Encoding;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleConfig {
    /// Number of distinct customers.
    pub customers: usize,
    /// Length of the data period in years (clamped to 1..=50), ending 2026-10-31.
    pub years: u32,
    /// Seed of the random generator; same config ⇒ same bytes.
    pub seed: u64,
}

impl SampleConfig {
    /// Months of activity generated (one `generated` log event each): 12 per year.
    pub fn months(&self) -> u32 {
        12 * self.years.clamp(1, 50)
    }
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { customers: 2500, years: 3, seed: 42 }
    }
}

/// Rows and dirty-row counts of every generated file (also written as `dirt.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleSummary {
    /// Keyed by file name, e.g. `orders.csv`.
    pub files: BTreeMap<String, FileSummary>,
}

/// Rows and dirty-row counts of one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct FileSummary {
    /// Data rows (lines for JSONL) written, excluding the header.
    pub rows: u64,
    /// Dirt kind → number of rows of that kind (every kind of the file is listed, even at 0).
    pub dirt: BTreeMap<String, u64>,
}

/// Why the sample could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cannot write sample file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode CSV for sample file {}: {source}", path.display())]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Dirt kinds and rates
// ---------------------------------------------------------------------------------------------

const DUPLICATE_LATER: &str = "duplicate_later";
const DUPLICATE_EQUAL_TS: &str = "duplicate_equal_ts";
const AMOUNT_FORMATTED: &str = "amount_formatted";
const DATE_ALT_FORMAT: &str = "date_alt_format";
const PADDED: &str = "padded";
const BLANK_OPTIONAL: &str = "blank_optional";
const MIXED_CASE_ENUM: &str = "mixed_case_enum";
const UNPARSEABLE: &str = "unparseable";
const ORPHAN_CUSTOMER: &str = "orphan_customer";
const ORPHAN_PRODUCT: &str = "orphan_product";
const ORPHAN_INVOICE: &str = "orphan_invoice";
const ORPHAN_ORDER_CASCADE: &str = "orphan_order_cascade";
const ORPHAN_INVOICE_CASCADE: &str = "orphan_invoice_cascade";
const NEGATIVE_QUANTITY: &str = "negative_quantity";

/// `(kind, probability per clean row)`; kinds are mutually exclusive (one draw per row).
type DirtTable = &'static [(&'static str, f64)];

const CUSTOMER_DIRT: DirtTable = &[
    (DUPLICATE_LATER, 0.04),
    (DUPLICATE_EQUAL_TS, 0.005),
    (AMOUNT_FORMATTED, 0.05),
    (DATE_ALT_FORMAT, 0.08),
    (PADDED, 0.05),
    (BLANK_OPTIONAL, 0.03),
    (MIXED_CASE_ENUM, 0.10),
    (UNPARSEABLE, 0.003),
];
const ORDER_DIRT: DirtTable =
    &[(DATE_ALT_FORMAT, 0.08), (MIXED_CASE_ENUM, 0.10), (PADDED, 0.03), (ORPHAN_CUSTOMER, 0.005), (UNPARSEABLE, 0.002)];
const LINE_DIRT: DirtTable =
    &[(AMOUNT_FORMATTED, 0.05), (NEGATIVE_QUANTITY, 0.003), (ORPHAN_PRODUCT, 0.003), (UNPARSEABLE, 0.002)];
const INVOICE_DIRT: DirtTable = &[(AMOUNT_FORMATTED, 0.05), (DATE_ALT_FORMAT, 0.08), (UNPARSEABLE, 0.002)];
const PAYMENT_DIRT: DirtTable = &[
    (AMOUNT_FORMATTED, 0.05),
    (DATE_ALT_FORMAT, 0.08),
    (MIXED_CASE_ENUM, 0.10),
    (ORPHAN_INVOICE, 0.003),
    (UNPARSEABLE, 0.002),
];
const INTERACTION_DIRT: DirtTable = &[(MIXED_CASE_ENUM, 0.10), (UNPARSEABLE, 0.002), (ORPHAN_CUSTOMER, 0.003)];
const REFERENCE_DIRT: DirtTable = &[(PADDED, 0.05)];

// ---------------------------------------------------------------------------------------------
// Shape parameters and reference tables
// ---------------------------------------------------------------------------------------------

/// Expected orders per active customer-month for a customer of average frequency weight.
const ORDERS_PER_MONTH: f64 = 0.45;
/// Expected interactions per active customer-year (before the segment factor).
const INTERACTIONS_PER_YEAR: f64 = 3.0;
/// Seasonal factor of the order rate, January..December.
const SEASON: [f64; 12] = [0.90, 0.70, 0.95, 1.00, 1.00, 0.93, 0.85, 0.88, 1.00, 1.05, 1.30, 1.45];
/// Relative growth of the order rate per year.
const TREND_PER_YEAR: f64 = 0.06;

const SEGMENTS: [&str; 3] = ["enterprise", "smb", "consumer"];
const SEGMENT_WEIGHTS: [f64; 3] = [0.10, 0.30, 0.60];

struct Province {
    name: &'static str,
    cities: &'static [&'static str],
}
struct Region {
    name: &'static str,
    weight: f64,
    provinces: &'static [Province],
}
const fn prov(name: &'static str, cities: &'static [&'static str]) -> Province {
    Province { name, cities }
}
#[rustfmt::skip]
const GEOGRAPHY: &[Region] = &[
    Region { name: "East", weight: 0.30, provinces: &[
        prov("Zhejiang", &["Hangzhou", "Ningbo", "Wenzhou"]),
        prov("Jiangsu", &["Nanjing", "Suzhou", "Wuxi"]),
        prov("Shandong", &["Jinan", "Qingdao", "Yantai"]),
        prov("Fujian", &["Fuzhou", "Xiamen"]),
    ]},
    Region { name: "North", weight: 0.20, provinces: &[
        prov("Hebei", &["Shijiazhuang", "Tangshan", "Baoding"]),
        prov("Shanxi", &["Taiyuan", "Datong"]),
        prov("Liaoning", &["Shenyang", "Dalian"]),
    ]},
    Region { name: "South", weight: 0.22, provinces: &[
        prov("Guangdong", &["Guangzhou", "Shenzhen", "Dongguan"]),
        prov("Guangxi", &["Nanning", "Guilin"]),
        prov("Hainan", &["Haikou", "Sanya"]),
    ]},
    Region { name: "West", weight: 0.13, provinces: &[
        prov("Sichuan", &["Chengdu", "Mianyang"]),
        prov("Shaanxi", &["Xi'an", "Baoji"]),
        prov("Yunnan", &["Kunming", "Dali"]),
        prov("Guizhou", &["Guiyang", "Zunyi"]),
    ]},
    Region { name: "Central", weight: 0.15, provinces: &[
        prov("Hubei", &["Wuhan", "Yichang", "Xiangyang"]),
        prov("Hunan", &["Changsha", "Zhuzhou"]),
        prov("Henan", &["Zhengzhou", "Luoyang", "Kaifeng"]),
        prov("Jiangxi", &["Nanchang", "Ganzhou"]),
    ]},
];

const SURNAMES: &[&str] = &[
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭", "何", "高", "林",
    "罗", "郑", "梁", "谢", "宋", "唐", "许", "韩", "冯", "邓", "曹",
];
const GIVEN_NAMES: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超", "秀英", "霞",
    "平", "刚", "桂英", "华", "鹏", "辉", "玲", "建华", "志强", "晓明", "欣", "婷", "浩", "宇", "佳", "琳", "晨", "俊",
    "文", "斌", "海燕",
];
const REP_FIRST: &[&str] = &[
    "James", "Mary", "Robert", "Linda", "Michael", "Sarah", "David", "Emma", "Daniel", "Olivia", "Kevin", "Grace",
    "Thomas", "Sophia", "Brian", "Chloe", "Jason", "Emily", "Eric", "Hannah",
];
const REP_LAST: &[&str] = &[
    "Smith", "Chen", "Wong", "Miller", "Li", "Johnson", "Brown", "Zhang", "Taylor", "Wilson", "Liu", "Davis", "Lee",
    "Walker", "Huang", "Clark",
];
const REPS_PER_REGION: usize = 4;

/// `(category, subcategory, item name, price range in yuan)`; five products each.
const CATALOG: &[(&str, &str, &str, f64, f64)] = &[
    ("Hardware", "Laptops", "Laptop", 3500.0, 12000.0),
    ("Hardware", "Desktops", "Desktop", 2500.0, 9000.0),
    ("Hardware", "Monitors", "Monitor", 800.0, 4500.0),
    ("Hardware", "Accessories", "Dock", 99.0, 899.0),
    ("Software", "Licenses", "Office License", 300.0, 3000.0),
    ("Software", "Subscriptions", "Cloud Plan", 60.0, 1200.0),
    ("Software", "Security", "Antivirus", 80.0, 900.0),
    ("Services", "Support", "Support Pack", 500.0, 8000.0),
    ("Services", "Consulting", "Consulting Day", 3000.0, 15000.0),
    ("Services", "Training", "Training Seat", 600.0, 5000.0),
    ("Supplies", "Paper", "Paper Box", 25.0, 180.0),
    ("Supplies", "Toner", "Toner Cartridge", 90.0, 700.0),
];
const BRANDS: [&str; 5] = ["Nimbus", "Orion", "Vega", "Kestrel", "Lumen"];
const MODELS: [&str; 5] = ["Lite", "S", "Plus", "Pro", "Max"];

const ORDER_CHANNELS: [&str; 4] = ["online", "store", "phone", "partner"];
const PAYMENT_METHODS: [&str; 4] = ["bank_transfer", "card", "cash", "check"];
const NUMBER_WORDS: [&str; 10] = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];

/// A contact-centre channel and its shape.
struct ContactChannel {
    name: &'static str,
    share: f64,
    /// Mean of the exponential queue wait, in seconds (email hours, phone minutes).
    mean_wait: f64,
    /// Handling time range in seconds.
    handle: (i64, i64),
    /// Live channels are staffed in business hours and can be abandoned.
    live: bool,
}
const fn ch(name: &'static str, share: f64, mean_wait: f64, handle: (i64, i64), live: bool) -> ContactChannel {
    ContactChannel { name, share, mean_wait, handle, live }
}
const CONTACT_CHANNELS: [ContactChannel; 5] = [
    ch("phone", 0.40, 90.0, (120, 1200), true),
    ch("email", 0.25, 6.0 * 3600.0, (300, 1800), false),
    ch("web_chat", 0.22, 45.0, (180, 1500), true),
    ch("fax", 0.03, 24.0 * 3600.0, (300, 1200), false),
    ch("voice_mail", 0.10, 4.0 * 3600.0, (60, 600), true),
];
/// Abandonment probability for the live channels (phone, web chat, voice mail): ~8% overall.
const ABANDON_RATE: f64 = 0.11;
const AGENTS: u32 = 25;

// ---------------------------------------------------------------------------------------------
// Entities
// ---------------------------------------------------------------------------------------------

struct Rep {
    id: String,
    name: String,
    region: usize,
    hire: NaiveDate,
}

struct Product {
    id: String,
    name: String,
    category: &'static str,
    subcategory: &'static str,
    list_cents: i64,
    cost_cents: i64,
    popularity: f64,
}

/// A customer as held for the whole run. It carries no strings (its id is its index, its name
/// two indexes) because every customer stays in memory while the activity streams: ~4 M of them
/// at 100 M order lines.
struct Customer {
    /// Indexes into [`SURNAMES`] and [`GIVEN_NAMES`].
    name: (u8, u8),
    segment: usize,
    region: usize,
    province: usize,
    city: usize,
    credit_cents: i64,
    signup: NaiveDate,
    updated_at: NaiveDateTime,
    churn: Option<NaiveDate>,
    /// Order-frequency weight, normalised to mean 1.
    frequency: f64,
    /// Multiplier of the mean line quantity (≥ 1); with `frequency` it makes value heavy-tailed.
    size: f64,
    account_rep: usize,
}

impl Customer {
    fn name(&self) -> String {
        format!("{}{}", SURNAMES[self.name.0 as usize], GIVEN_NAMES[self.name.1 as usize])
    }
}

/// Rep indexes of each region of [`GEOGRAPHY`].
fn reps_by_region(reps: &[Rep]) -> Vec<Vec<usize>> {
    (0..GEOGRAPHY.len()).map(|g| (0..reps.len()).filter(|&r| reps[r].region == g).collect()).collect()
}

/// `C000001` for the first customer.
fn customer_id(index: usize) -> String {
    format!("C{:06}", index + 1)
}

struct Line {
    product: usize,
    qty: i64,
    discount: i64,
}

/// A payment drawn but not yet written. payments.csv is in `(date, invoice)` order and a payment
/// falls up to ~4 months after its invoice, so it waits until the month being generated is past
/// its date. The derived order is that file order.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Payment {
    date: NaiveDate,
    invoice: usize,
    cents: i64,
    method: &'static str,
    /// Its invoice was written with an unparseable amount: the payment cascades to quarantine.
    cascade: bool,
}

#[derive(Serialize)]
struct InteractionJson<'a> {
    interaction_id: String,
    customer_id: String,
    channel: Cow<'a, str>,
    agent: String,
    queued_at: String,
    answered_at: Option<String>,
    ended_at: String,
    outcome: &'static str,
    satisfaction: Option<u8>,
}

/// Common state of a generation run.
struct Gen {
    rng: ChaCha8Rng,
    out: PathBuf,
    start: NaiveDate,
    end: NaiveDate,
}

/// The reference data the activity is drawn from, with lookups computed once.
struct World<'a> {
    customers: &'a [Customer],
    reps: &'a [Rep],
    products: &'a [Product],
    /// Rep indexes of each region.
    region_reps: Vec<Vec<usize>>,
    popularity: Vec<f64>,
}

/// The five activity files being written, and the payments waiting for their month.
struct Activity {
    orders: Table,
    lines: Table,
    invoices: Table,
    payments: Table,
    interactions: JsonLines,
    pending: BinaryHeap<Reverse<Payment>>,
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// Writes the sample export into `out` (created if missing) and returns its summary, which is
/// also written to `out/dirt.json`.
///
/// The files are written as they are generated: reference data and customers first, then the
/// activity a month at a time (see `Gen::activity`). Memory holds the customers (~150 bytes
/// each) and a few months of pending payments, never a whole file.
pub fn generate(cfg: &SampleConfig, out: &Path) -> Result<SampleSummary, SampleError> {
    std::fs::create_dir_all(out).map_err(|source| SampleError::Io { path: out.to_path_buf(), source })?;
    let end = NaiveDate::from_ymd_opt(2026, 10, 31).expect("valid date");
    let years = cfg.years.clamp(1, 50) as i32;
    let start = NaiveDate::from_ymd_opt(2026 - years, 11, 1).expect("valid date");
    let mut g = Gen { rng: ChaCha8Rng::seed_from_u64(cfg.seed), out: out.to_path_buf(), start, end };

    let reps = g.reps();
    let products = g.products();
    let customers = g.customers(cfg.customers, &reps);

    let mut summary = SampleSummary { files: BTreeMap::new() };
    summary.files.extend([g.write_reps(&reps)?, g.write_products(&products)?, g.write_customers(&customers)?]);
    summary.files.extend(g.activity(&customers, &reps, &products)?);

    let mut json = serde_json::to_vec_pretty(&summary)
        .map_err(|e| SampleError::Io { path: out.join("dirt.json"), source: e.into() })?;
    json.push(b'\n');
    let path = out.join("dirt.json");
    std::fs::write(&path, &json).map_err(|source| SampleError::Io { path, source })?;
    Ok(summary)
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

impl Gen {
    fn reps(&mut self) -> Vec<Rep> {
        (0..GEOGRAPHY.len() * REPS_PER_REGION)
            .map(|i| Rep {
                id: format!("R{:03}", i + 1),
                name: format!("{} {}", pick(&mut self.rng, REP_FIRST), pick(&mut self.rng, REP_LAST)),
                region: i % GEOGRAPHY.len(),
                hire: self.start - TimeDelta::days(self.rng.random_range(30..3000)),
            })
            .collect()
    }

    fn products(&mut self) -> Vec<Product> {
        let mut products = Vec::new();
        for (k, &(category, subcategory, item, lo, hi)) in CATALOG.iter().enumerate() {
            for j in 0..5 {
                let x = lo + (hi - lo) * (j as f64 + self.rng.random::<f64>()) / 5.0;
                // Shop-style prices: 3599.00, 129.00, 29.90.
                let mut yuan = x.round() as i64;
                if yuan >= 100 {
                    yuan = yuan / 10 * 10 + 9;
                }
                let list_cents = if yuan < 100 { yuan * 100 - 10 } else { yuan * 100 };
                let margin = self.rng.random_range(0.45..0.80);
                let cost_cents = ((list_cents as f64 * margin).round() as i64).min(list_cents - 1);
                products.push(Product {
                    id: format!("P{:04}", products.len() + 1),
                    name: format!("{} {} {}", BRANDS[(k + j) % 5], item, MODELS[j]),
                    category,
                    subcategory,
                    list_cents,
                    cost_cents,
                    // Cheap items sell more often; a random factor makes a few best sellers.
                    popularity: (0.3 + self.rng.random::<f64>() * 1.7) / (yuan as f64).powf(0.3),
                });
            }
        }
        products
    }

    fn customers(&mut self, n: usize, reps: &[Rep]) -> Vec<Customer> {
        let (start, end) = (self.start, self.end);
        let rng = &mut self.rng;
        let region_weights: Vec<f64> = GEOGRAPHY.iter().map(|r| r.weight).collect();
        let region_reps = reps_by_region(reps);
        let mut customers: Vec<Customer> = (0..n)
            .map(|_| {
                let name = (rng.random_range(0..SURNAMES.len()) as u8, rng.random_range(0..GIVEN_NAMES.len()) as u8);
                let segment = weighted_index(rng, &SEGMENT_WEIGHTS);
                let region = weighted_index(rng, &region_weights);
                let province = rng.random_range(0..GEOGRAPHY[region].provinces.len());
                let city = rng.random_range(0..GEOGRAPHY[region].provinces[province].cities.len());
                let credit_yuan: f64 = match segment {
                    0 => rng.random_range(200_000.0..2_000_000.0),
                    1 => rng.random_range(20_000.0..200_000.0),
                    _ => rng.random_range(2_000.0..30_000.0),
                };
                let credit_cents = (credit_yuan / 100.0).round() as i64 * 10_000;
                // About half were customers before the period started.
                let signup = if rng.random_bool(0.5) {
                    start - TimeDelta::days(rng.random_range(1..=4 * 365))
                } else {
                    date_between(rng, start, end - TimeDelta::days(30))
                };
                let updated_day = date_between(rng, signup + TimeDelta::days(1), end);
                let updated_at = at_time(rng, updated_day, 0, 24);
                let first = signup.max(start);
                let churn = (rng.random_bool(0.30) && first + TimeDelta::days(30) < end)
                    .then(|| date_between(rng, first + TimeDelta::days(30), end));
                // Heavy-tailed value: Pareto(α = 1.2) by inverse CDF, ~2% key accounts on top.
                let mut value = (1.0 - rng.random::<f64>()).powf(-1.0 / 1.2).min(60.0);
                if rng.random_bool(0.02) {
                    value *= rng.random_range(10.0..25.0);
                }
                value *= [2.5, 1.3, 0.8][segment];
                Customer {
                    name,
                    segment,
                    region,
                    province,
                    city,
                    credit_cents,
                    signup,
                    updated_at,
                    churn,
                    frequency: value.powf(0.6),
                    size: value.max(1.0).powf(0.4),
                    account_rep: *pick(rng, &region_reps[region]),
                }
            })
            .collect();
        let mean = customers.iter().map(|c| c.frequency).sum::<f64>() / n.max(1) as f64;
        for c in &mut customers {
            c.frequency /= mean;
        }
        customers
    }

    /// orders.csv, order_lines.csv, invoices.csv, payments.csv and interactions.jsonl, a month
    /// at a time: the month's orders are drawn for every customer (a Poisson count per
    /// customer-month), sorted by date and written with their lines and invoice; each invoice's
    /// payments wait in a heap until a later month starts past their date; the month's
    /// interactions follow, sorted by queue time. Every file comes out in date order, and what
    /// is held is one month of order dates and interactions plus the pending payments, however
    /// long the period or large the export.
    fn activity(
        &mut self,
        customers: &[Customer],
        reps: &[Rep],
        products: &[Product],
    ) -> Result<Vec<(String, FileSummary)>, SampleError> {
        let world = World {
            customers,
            reps,
            products,
            region_reps: reps_by_region(reps),
            popularity: products.iter().map(|p| p.popularity).collect(),
        };
        let mut a = Activity::create(&self.out)?;
        let mut dated: Vec<(NaiveDate, usize)> = Vec::new();
        let mut month = self.start.with_day(1).expect("day 1");
        while month <= self.end {
            let next = month + Months::new(1);
            a.write_payments_before(&mut self.rng, month)?;
            dated.clear();
            for (ci, c) in customers.iter().enumerate() {
                let first = c.signup.max(self.start);
                let last = c.churn.map_or(self.end, |d| d - TimeDelta::days(1));
                let (lo, hi) = (month.max(first), (next - TimeDelta::days(1)).min(last));
                if lo > hi {
                    continue;
                }
                let active = (hi - lo).num_days() as f64 + 1.0;
                let elapsed_years = (month - self.start).num_days() as f64 / 365.25;
                let lambda = ORDERS_PER_MONTH
                    * c.frequency
                    * SEASON[month.month0() as usize]
                    * (1.0 + TREND_PER_YEAR * elapsed_years)
                    * active
                    / (next - month).num_days() as f64;
                for _ in 0..poisson(&mut self.rng, lambda) {
                    dated.push((date_between(&mut self.rng, lo, hi), ci));
                }
            }
            dated.sort_unstable();
            for &(date, cust) in &dated {
                self.order(&world, &mut a, date, cust)?;
            }
            self.interactions(&world, &mut a, month, next)?;
            tracing::info!(month = %month.format("%Y-%m"), orders = dated.len(), "generated");
            month = next;
        }
        a.write_payments_before(&mut self.rng, NaiveDate::MAX)?;
        a.finish()
    }

    /// One order: its row, its lines, and for a completed order that loads, its invoice.
    fn order(&mut self, w: &World, a: &mut Activity, date: NaiveDate, cust: usize) -> Result<(), SampleError> {
        let rng = &mut self.rng;
        let c = &w.customers[cust];
        let rep = match rng.random::<f64>() {
            u if u < 0.02 => None,
            u if u < 0.87 => Some(c.account_rep),
            _ => Some(*pick(rng, &w.region_reps[c.region])),
        };
        let channel_w = [[0.15, 0.05, 0.35, 0.45], [0.40, 0.15, 0.25, 0.20], [0.55, 0.25, 0.15, 0.05]];
        let channel = ORDER_CHANNELS[weighted_index(rng, &channel_w[c.segment])];
        let completed = rng.random_bool(0.97);
        let delay_days = if completed { rng.random_range(0..=5) } else { rng.random_range(1..=14) };
        let updated_at = at_time(rng, date + TimeDelta::days(delay_days), 8, 22).min(end_of_day(self.end));
        let n_lines = 1 + weighted_index(rng, &[0.40, 0.25, 0.17, 0.11, 0.07]);
        let mean_qty = [4.0, 1.5, 0.4][c.segment] * c.size;
        let discount_w = [[0.30, 0.30, 0.25, 0.15], [0.50, 0.30, 0.15, 0.05], [0.70, 0.20, 0.08, 0.02]];
        let lines: Vec<Line> = (0..n_lines)
            .map(|_| Line {
                product: weighted_index(rng, &w.popularity),
                qty: (1.0 + exponential(rng, mean_qty)).floor().min(500.0) as i64,
                discount: 5 * weighted_index(rng, &discount_w[c.segment]) as i64,
            })
            .collect();

        let order_no = a.orders.summary.rows as usize + 1;
        let id = format!("O{order_no:07}");
        let dirt = pick_dirt(rng, ORDER_DIRT);
        let mut f = vec![
            id.clone(),
            customer_id(cust),
            rep.map(|r| w.reps[r].id.clone()).unwrap_or_default(),
            channel.into(),
            fmt_date(date),
            if completed { "completed" } else { "cancelled" }.into(),
            fmt_ts(updated_at),
        ];
        match dirt {
            Some(DATE_ALT_FORMAT) => f[4] = fmt_alt_date(date),
            Some(MIXED_CASE_ENUM) => f[3] = mixed_case(rng, channel),
            Some(PADDED) => f[1] = pad(rng, &f[1]),
            Some(ORPHAN_CUSTOMER) => f[1] = format!("C9{:05}", rng.random_range(0..100_000)),
            Some(UNPARSEABLE) if rng.random_bool(0.5) => f.truncate(4),
            Some(UNPARSEABLE) => f[4] = "not a date".into(),
            _ => {}
        }
        a.orders.row(&f, dirt)?;

        // Orphan and unparseable orders are quarantined, and their lines with them.
        let cascade = matches!(dirt, Some(ORPHAN_CUSTOMER | UNPARSEABLE));
        // Σ qty·price·(100 − discount) in 1/100 cent over the lines that load.
        let mut hundredths = 0;
        for (n, l) in lines.iter().enumerate() {
            let product = &w.products[l.product];
            let dirt = if cascade { Some(ORPHAN_ORDER_CASCADE) } else { pick_dirt(rng, LINE_DIRT) };
            let mut f = vec![
                id.clone(),
                (n + 1).to_string(),
                product.id.clone(),
                l.qty.to_string(),
                fmt_cents(product.list_cents),
                l.discount.to_string(),
            ];
            match dirt {
                Some(AMOUNT_FORMATTED) => f[4] = fmt_formatted(rng, product.list_cents, "¥"),
                Some(NEGATIVE_QUANTITY) => f[3] = format!("-{}", l.qty),
                Some(ORPHAN_PRODUCT) => f[2] = format!("P9{:03}", rng.random_range(0..1000)),
                Some(UNPARSEABLE) if rng.random_bool(0.5) => f.truncate(3),
                Some(UNPARSEABLE) => f[3] = NUMBER_WORDS[(l.qty.clamp(1, 10) - 1) as usize].into(),
                _ => {}
            }
            a.lines.row(&f, dirt)?;
            if !matches!(dirt, Some(NEGATIVE_QUANTITY | ORPHAN_PRODUCT | UNPARSEABLE)) {
                hundredths += l.qty * product.list_cents * (100 - l.discount);
            }
        }
        if completed && !cascade {
            self.invoice(w, a, order_no, cust, date, (hundredths + 50) / 100)?;
        }
        Ok(())
    }

    /// The invoice of an order, and its payments by outcome (on time / late / partial / unpaid),
    /// queued for their months.
    fn invoice(
        &mut self,
        w: &World,
        a: &mut Activity,
        order_no: usize,
        cust: usize,
        order_date: NaiveDate,
        cents: i64,
    ) -> Result<(), SampleError> {
        let rng = &mut self.rng;
        let date = (order_date + TimeDelta::days(rng.random_range(0..=3))).min(self.end);
        let due = date + TimeDelta::days(30);
        let index = a.invoices.summary.rows as usize;
        let dirt = pick_dirt(rng, INVOICE_DIRT);
        let mut f = [
            invoice_id(index),
            format!("O{order_no:07}"),
            customer_id(cust),
            fmt_date(date),
            fmt_date(due),
            fmt_cents(cents),
        ];
        match dirt {
            Some(AMOUNT_FORMATTED) => f[5] = fmt_formatted(rng, cents, "¥"),
            Some(DATE_ALT_FORMAT) => f[3] = fmt_alt_date(date),
            Some(UNPARSEABLE) => f[5] = "n/a".into(),
            _ => {}
        }
        a.invoices.row(&f, dirt)?;

        if cents == 0 {
            return Ok(()); // every line was unusable: nothing to pay
        }
        let method_w = [[0.75, 0.05, 0.0, 0.20], [0.50, 0.25, 0.05, 0.20], [0.20, 0.60, 0.15, 0.05]];
        let method = PAYMENT_METHODS[weighted_index(rng, &method_w[w.customers[cust].segment])];
        let end = self.end;
        let pending = &mut a.pending;
        let mut pay = |date: NaiveDate, cents: i64| {
            // Payments that would fall after the export date simply have not happened yet.
            let paid = date <= end;
            if paid {
                pending.push(Reverse(Payment { date, invoice: index, cents, method, cascade: dirt == Some(UNPARSEABLE) }));
            }
            paid
        };
        match rng.random::<f64>() {
            u if u < 0.80 => {
                pay(date + TimeDelta::days(rng.random_range(1..=30)), cents);
            }
            u if u < 0.88 => {
                pay(due + TimeDelta::days(rng.random_range(1..=90)), cents);
            }
            u if u < 0.93 => {
                let part = cents * rng.random_range(30..=70) / 100;
                let first = date + TimeDelta::days(rng.random_range(5..=30));
                let second = first + TimeDelta::days(rng.random_range(15..=75));
                if pay(first, part) && rng.random_bool(0.5) {
                    pay(second, cents - part);
                }
            }
            _ => {} // unpaid
        }
        Ok(())
    }

    /// The contact-centre interactions queued in `month..next`: ~3 per active customer-year
    /// (a customer stays in contact for 30 days after churning), sorted by queue time.
    fn interactions(&mut self, w: &World, a: &mut Activity, month: NaiveDate, next: NaiveDate) -> Result<(), SampleError> {
        let rng = &mut self.rng;
        let eop = end_of_day(self.end);
        let shares = CONTACT_CHANNELS.map(|c| c.share);
        // (queued_at, customer, channel index, wait seconds, handling seconds)
        let mut planned: Vec<(NaiveDateTime, usize, usize, i64, i64)> = Vec::new();
        for (ci, c) in w.customers.iter().enumerate() {
            let first = c.signup.max(self.start);
            let last = c.churn.map_or(self.end, |d| (d + TimeDelta::days(30)).min(self.end));
            let (lo, hi) = (month.max(first), (next - TimeDelta::days(1)).min(last));
            if lo > hi {
                continue;
            }
            let years = ((hi - lo).num_days() + 1) as f64 / 365.25;
            let rate = INTERACTIONS_PER_YEAR * [1.3, 1.0, 0.9][c.segment];
            for _ in 0..poisson(rng, rate * years) {
                let ch = weighted_index(rng, &shares);
                let ContactChannel { mean_wait, handle: (lo_s, hi_s), live, .. } = CONTACT_CHANNELS[ch];
                let (h0, h1) = if live { (8, 21) } else { (0, 24) };
                let day = date_between(rng, lo, hi);
                let queued = at_time(rng, day, h0, h1);
                let wait = exponential(rng, mean_wait).round() as i64 + 1;
                planned.push((queued, ci, ch, wait, rng.random_range(lo_s..=hi_s)));
            }
        }
        planned.sort_by_key(|p| (p.0, p.1));

        for (mut queued, ci, ch, wait, handle) in planned {
            let ContactChannel { name: channel, live, .. } = CONTACT_CHANNELS[ch];
            let abandoned = live && rng.random_bool(ABANDON_RATE);
            let mut ended = queued + TimeDelta::seconds(wait + if abandoned { 0 } else { handle });
            if ended > eop {
                // Keep the whole interaction inside the period.
                queued -= ended - eop;
                ended = eop;
            }
            let answered = (!abandoned).then(|| queued + TimeDelta::seconds(wait));
            let outcome = if abandoned {
                "abandoned"
            } else {
                ["resolved", "escalated", "callback"][weighted_index(rng, &[0.70, 0.12, 0.18])]
            };
            let satisfaction = if abandoned || rng.random_bool(0.35) {
                None
            } else {
                let w: &[f64] = match outcome {
                    "resolved" => &[0.03, 0.05, 0.12, 0.40, 0.40],
                    "escalated" => &[0.15, 0.25, 0.30, 0.20, 0.10],
                    _ => &[0.08, 0.15, 0.35, 0.30, 0.12],
                };
                Some(1 + weighted_index(rng, w) as u8)
            };
            let dirt = pick_dirt(rng, INTERACTION_DIRT);
            let mut rec = InteractionJson {
                interaction_id: format!("I{:07}", a.interactions.summary.rows + 1),
                customer_id: customer_id(ci),
                channel: channel.into(),
                agent: format!("A{:02}", rng.random_range(1..=AGENTS)),
                queued_at: fmt_ts(queued),
                answered_at: answered.map(fmt_ts),
                ended_at: fmt_ts(ended),
                outcome,
                satisfaction,
            };
            match dirt {
                Some(MIXED_CASE_ENUM) => rec.channel = mixed_case(rng, channel).into(),
                Some(ORPHAN_CUSTOMER) => rec.customer_id = format!("C9{:05}", rng.random_range(0..100_000)),
                _ => {}
            }
            let mut line = serde_json::to_string(&rec)
                .map_err(|e| SampleError::Io { path: a.interactions.path.clone(), source: e.into() })?;
            if dirt == Some(UNPARSEABLE) {
                // A line cut off mid-record (all ASCII, so any byte index is a char boundary).
                line.truncate(rng.random_range(20..line.len() - 1));
            }
            a.interactions.line(&line, dirt)?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Reference files
    // -----------------------------------------------------------------------------------------

    fn write_reps(&mut self, reps: &[Rep]) -> Result<(String, FileSummary), SampleError> {
        let header = "rep_id,name,region,hire_date";
        let mut t = Table::create(&self.out, "sales_reps.csv", header, REFERENCE_DIRT, encoding_rs::UTF_8)?;
        for r in reps {
            let dirt = pick_dirt(&mut self.rng, REFERENCE_DIRT);
            let name = if dirt.is_some() { pad(&mut self.rng, &r.name) } else { r.name.clone() };
            t.row(&[r.id.clone(), name, GEOGRAPHY[r.region].name.into(), fmt_date(r.hire)], dirt)?;
        }
        t.finish()
    }

    fn write_products(&mut self, products: &[Product]) -> Result<(String, FileSummary), SampleError> {
        let header = "product_id,name,category,subcategory,list_price,unit_cost";
        let mut t = Table::create(&self.out, "products.csv", header, REFERENCE_DIRT, encoding_rs::UTF_8)?;
        for p in products {
            let dirt = pick_dirt(&mut self.rng, REFERENCE_DIRT);
            let name = if dirt.is_some() { pad(&mut self.rng, &p.name) } else { p.name.clone() };
            let f = [
                p.id.clone(),
                name,
                p.category.into(),
                p.subcategory.into(),
                fmt_cents(p.list_cents),
                fmt_cents(p.cost_cents),
            ];
            t.row(&f, dirt)?;
        }
        t.finish()
    }

    /// customers.csv, encoded as GBK. Duplicate rows go after a random later customer's row.
    fn write_customers(&mut self, customers: &[Customer]) -> Result<(String, FileSummary), SampleError> {
        let header = "customer_id,name,segment,region,province,city,credit_limit,email,signup_date,updated_at";
        let mut t = Table::create(&self.out, "customers.csv", header, CUSTOMER_DIRT, encoding_rs::GBK)?;
        let rng = &mut self.rng;
        let record = |i: usize, c: &Customer, segment: usize, city: usize, updated: NaiveDateTime| -> Vec<String> {
            let region = &GEOGRAPHY[c.region];
            let province = &region.provinces[c.province];
            let id = customer_id(i);
            let email = format!("{}@example.com", id.to_lowercase());
            vec![
                id,
                c.name(),
                SEGMENTS[segment].into(),
                region.name.into(),
                province.name.into(),
                province.cities[city].into(),
                fmt_cents(c.credit_cents),
                email,
                fmt_date(c.signup),
                fmt_ts(updated),
            ]
        };
        // extras[j]: rows written right after the j-th customer's row (~5% of customers have one).
        let mut extras: BTreeMap<usize, Vec<(Vec<String>, &'static str)>> = BTreeMap::new();
        for (i, c) in customers.iter().enumerate() {
            let kind = pick_dirt(rng, CUSTOMER_DIRT);
            let other_city = |rng: &mut ChaCha8Rng| {
                let n = GEOGRAPHY[c.region].provinces[c.province].cities.len();
                (c.city + rng.random_range(1..n)) % n
            };
            let mut f = record(i, c, c.segment, c.city, c.updated_at);
            match kind {
                Some(DUPLICATE_LATER) => {
                    // The first row is the older state; the extra row (current state) wins.
                    let earlier = (c.updated_at - TimeDelta::seconds(rng.random_range(86_400..180 * 86_400)))
                        .max(c.signup.and_time(NaiveTime::MIN));
                    let extra = std::mem::replace(
                        &mut f,
                        if rng.random_bool(0.5) {
                            record(i, c, (c.segment + rng.random_range(1..3)) % 3, c.city, earlier)
                        } else {
                            record(i, c, c.segment, other_city(rng), earlier)
                        },
                    );
                    extras.entry(rng.random_range(i..customers.len())).or_default().push((extra, DUPLICATE_LATER));
                }
                Some(DUPLICATE_EQUAL_TS) => {
                    let extra = std::mem::replace(&mut f, record(i, c, c.segment, other_city(rng), c.updated_at));
                    extras.entry(rng.random_range(i..customers.len())).or_default().push((extra, DUPLICATE_EQUAL_TS));
                }
                Some(AMOUNT_FORMATTED) => f[6] = fmt_formatted(rng, c.credit_cents, "￥"),
                Some(DATE_ALT_FORMAT) => f[8] = fmt_alt_date(c.signup),
                Some(PADDED) => {
                    let col = if rng.random_bool(0.5) { 1 } else { 5 };
                    f[col] = pad(rng, &f[col]);
                }
                Some(BLANK_OPTIONAL) => f[7].clear(),
                Some(MIXED_CASE_ENUM) => f[2] = mixed_case(rng, SEGMENTS[c.segment]),
                Some(UNPARSEABLE) => {
                    // A garbled re-export right after the clean row: quarantined, and the
                    // customer still loads from its clean row (so no orders are orphaned).
                    let mut extra = f.clone();
                    if rng.random_bool(0.5) {
                        extra[6] = "n/a".into();
                    } else {
                        extra[8] = "2024-13-45".into();
                    }
                    extras.entry(i).or_default().push((extra, UNPARSEABLE));
                }
                _ => {}
            }
            // The first row of a customer with an extra row is clean; the extra row carries the kind.
            let own = kind.filter(|k| ![DUPLICATE_LATER, DUPLICATE_EQUAL_TS, UNPARSEABLE].contains(k));
            t.row(&f, own)?;
            for (extra, k) in extras.remove(&i).unwrap_or_default() {
                t.row(&extra, Some(k))?;
            }
        }
        t.finish()
    }
}

impl Activity {
    fn create(out: &Path) -> Result<Self, SampleError> {
        let utf8 = encoding_rs::UTF_8;
        let header = "order_id,customer_id,rep_id,channel,order_date,status,updated_at";
        let orders = Table::create(out, "orders.csv", header, ORDER_DIRT, utf8)?;
        let header = "order_id,line_no,product_id,quantity,unit_price,discount_pct";
        let mut lines = Table::create(out, "order_lines.csv", header, LINE_DIRT, utf8)?;
        lines.summary.dirt.insert(ORPHAN_ORDER_CASCADE.into(), 0);
        let header = "invoice_id,order_id,customer_id,invoice_date,due_date,amount";
        let invoices = Table::create(out, "invoices.csv", header, INVOICE_DIRT, utf8)?;
        let header = "payment_id,invoice_id,payment_date,amount,method";
        let mut payments = Table::create(out, "payments.csv", header, PAYMENT_DIRT, utf8)?;
        payments.summary.dirt.insert(ORPHAN_INVOICE_CASCADE.into(), 0);
        let interactions = JsonLines::create(out, "interactions.jsonl", INTERACTION_DIRT)?;
        Ok(Self { orders, lines, invoices, payments, interactions, pending: BinaryHeap::new() })
    }

    /// Writes the pending payments dated before `limit`, in `(date, invoice)` order.
    fn write_payments_before(&mut self, rng: &mut ChaCha8Rng, limit: NaiveDate) -> Result<(), SampleError> {
        while self.pending.peek().is_some_and(|Reverse(p)| p.date < limit) {
            let Some(Reverse(p)) = self.pending.pop() else { break };
            let drawn = pick_dirt(rng, PAYMENT_DIRT);
            // A payment of an invoice that is itself quarantined cannot load: it is clean, but
            // counted as a cascade rather than under the kind drawn for it.
            let dirt = if p.cascade { Some(ORPHAN_INVOICE_CASCADE) } else { drawn };
            let mut f = [
                format!("PAY{:07}", self.payments.summary.rows + 1),
                invoice_id(p.invoice),
                fmt_date(p.date),
                fmt_cents(p.cents),
                p.method.into(),
            ];
            match dirt {
                Some(AMOUNT_FORMATTED) => f[3] = fmt_formatted(rng, p.cents, "¥"),
                Some(DATE_ALT_FORMAT) => f[2] = fmt_alt_date(p.date),
                Some(MIXED_CASE_ENUM) => f[4] = mixed_case(rng, p.method),
                Some(ORPHAN_INVOICE) => f[1] = format!("INV9{:06}", rng.random_range(0..1_000_000)),
                Some(UNPARSEABLE) if rng.random_bool(0.5) => f[3] = "n/a".into(),
                Some(UNPARSEABLE) => f[2] = "not a date".into(),
                _ => {}
            }
            self.payments.row(&f, dirt)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<(String, FileSummary)>, SampleError> {
        debug_assert!(self.pending.is_empty(), "every payment written");
        Ok(vec![
            self.orders.finish()?,
            self.lines.finish()?,
            self.invoices.finish()?,
            self.payments.finish()?,
            self.interactions.finish()?,
        ])
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

impl FileSummary {
    fn new(kinds: DirtTable) -> Self {
        Self { rows: 0, dirt: kinds.iter().map(|(k, _)| (k.to_string(), 0)).collect() }
    }

    fn count(&mut self, dirt: Option<&'static str>) {
        self.rows += 1;
        if let Some(k) = dirt {
            *self.dirt.entry(k.into()).or_default() += 1;
        }
    }
}

/// A sample file on disk behind a buffer. Text in another encoding than UTF-8 is encoded as it
/// passes: the CSV writer hands over UTF-8 in pieces that may end inside a character, so the
/// incomplete end waits for the rest.
struct Sink {
    file: BufWriter<File>,
    encoding: &'static Encoding,
    partial: Vec<u8>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.encoding == encoding_rs::UTF_8 {
            return self.file.write(buf);
        }
        self.partial.extend_from_slice(buf);
        let whole = match std::str::from_utf8(&self.partial) {
            Ok(text) => text.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        let text = std::str::from_utf8(&self.partial[..whole]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let (bytes, _, unmappable) = self.encoding.encode(text);
        if unmappable {
            let message = format!("a character {} cannot encode in {text:?}", self.encoding.name());
            return Err(io::Error::new(io::ErrorKind::InvalidData, message));
        }
        self.file.write_all(&bytes)?;
        self.partial.drain(..whole);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.partial.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the text ends inside a UTF-8 character"));
        }
        self.file.flush()
    }
}

/// A CSV file being written, with its running summary.
struct Table {
    name: &'static str,
    path: PathBuf,
    wtr: csv::Writer<Sink>,
    summary: FileSummary,
}

impl Table {
    /// `header` is the header line as written, e.g. `"rep_id,name,region,hire_date"`.
    fn create(
        out: &Path,
        name: &'static str,
        header: &str,
        kinds: DirtTable,
        encoding: &'static Encoding,
    ) -> Result<Self, SampleError> {
        let path = out.join(name);
        let file = File::create(&path).map_err(|source| SampleError::Io { path: path.clone(), source })?;
        let sink = Sink { file: BufWriter::with_capacity(1 << 20, file), encoding, partial: Vec::new() };
        // Flexible: ragged rows are one of the dirt kinds.
        let mut wtr = csv::WriterBuilder::new().flexible(true).from_writer(sink);
        wtr.write_record(header.split(',')).map_err(|source| SampleError::Csv { path: path.clone(), source })?;
        Ok(Self { name, path, wtr, summary: FileSummary::new(kinds) })
    }

    fn row(&mut self, fields: &[String], dirt: Option<&'static str>) -> Result<(), SampleError> {
        self.wtr.write_record(fields).map_err(|source| SampleError::Csv { path: self.path.clone(), source })?;
        self.summary.count(dirt);
        Ok(())
    }

    fn finish(self) -> Result<(String, FileSummary), SampleError> {
        let Table { name, path, wtr, summary } = self;
        let mut sink = wtr.into_inner().map_err(|e| SampleError::Io { path: path.clone(), source: e.into_error() })?;
        sink.flush().map_err(|source| SampleError::Io { path, source })?;
        Ok((name.to_string(), summary))
    }
}

/// A JSON-lines file being written, with its running summary.
struct JsonLines {
    name: &'static str,
    path: PathBuf,
    file: BufWriter<File>,
    summary: FileSummary,
}

impl JsonLines {
    fn create(out: &Path, name: &'static str, kinds: DirtTable) -> Result<Self, SampleError> {
        let path = out.join(name);
        let file = File::create(&path).map_err(|source| SampleError::Io { path: path.clone(), source })?;
        Ok(Self { name, path, file: BufWriter::with_capacity(1 << 20, file), summary: FileSummary::new(kinds) })
    }

    fn line(&mut self, line: &str, dirt: Option<&'static str>) -> Result<(), SampleError> {
        let written = self.file.write_all(line.as_bytes()).and_then(|()| self.file.write_all(b"\n"));
        written.map_err(|source| SampleError::Io { path: self.path.clone(), source })?;
        self.summary.count(dirt);
        Ok(())
    }

    fn finish(mut self) -> Result<(String, FileSummary), SampleError> {
        self.file.flush().map_err(|source| SampleError::Io { path: self.path.clone(), source })?;
        Ok((self.name.to_string(), self.summary))
    }
}

// ---------------------------------------------------------------------------------------------
// Random helpers
// ---------------------------------------------------------------------------------------------

/// Draws at most one dirt kind for a row (always consumes exactly one random number).
fn pick_dirt(rng: &mut ChaCha8Rng, table: DirtTable) -> Option<&'static str> {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for &(kind, rate) in table {
        acc += rate;
        if u < acc {
            return Some(kind);
        }
    }
    None
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn weighted_index(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i;
        }
        u -= w;
    }
    weights.len() - 1
}

/// Poisson draw by Knuth's method, in chunks of λ ≤ 30 so `e^-λ` never underflows.
fn poisson(rng: &mut ChaCha8Rng, mut lambda: f64) -> u32 {
    let mut total = 0;
    while lambda > 0.0 {
        let chunk = lambda.min(30.0);
        lambda -= chunk;
        let limit = (-chunk).exp();
        let mut prod: f64 = rng.random();
        while prod > limit {
            total += 1;
            prod *= rng.random::<f64>();
        }
    }
    total
}

fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// Uniform date in `lo..=hi` (`lo` if the range is empty).
fn date_between(rng: &mut ChaCha8Rng, lo: NaiveDate, hi: NaiveDate) -> NaiveDate {
    lo + TimeDelta::days(rng.random_range(0..=(hi - lo).num_days().max(0)))
}

/// `date` at a uniform second between `from_hour:00:00` and `to_hour:00:00`.
fn at_time(rng: &mut ChaCha8Rng, date: NaiveDate, from_hour: i64, to_hour: i64) -> NaiveDateTime {
    date.and_time(NaiveTime::MIN) + TimeDelta::seconds(rng.random_range(from_hour * 3600..to_hour * 3600))
}

fn end_of_day(date: NaiveDate) -> NaiveDateTime {
    date.and_hms_opt(23, 59, 59).expect("valid time")
}

/// "Enterprise", "SMB" or "cOnSuMeR" style; always differs from the lower-case original.
fn mixed_case(rng: &mut ChaCha8Rng, s: &str) -> String {
    match rng.random_range(0..3) {
        0 => s[..1].to_ascii_uppercase() + &s[1..],
        1 => s.to_ascii_uppercase(),
        _ => s.chars().enumerate().map(|(i, c)| if i % 2 == 1 { c.to_ascii_uppercase() } else { c }).collect(),
    }
}

/// Surrounds a value with 1–2 leading and 0–2 trailing spaces.
fn pad(rng: &mut ChaCha8Rng, s: &str) -> String {
    format!("{}{s}{}", " ".repeat(rng.random_range(1..=2)), " ".repeat(rng.random_range(0..=2)))
}

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

fn fmt_cents(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// `1,234.50`, or with a currency sign `¥1,234.50` (always signed below 1,000).
fn fmt_formatted(rng: &mut ChaCha8Rng, cents: i64, currency: &str) -> String {
    let digits = (cents / 100).to_string();
    let mut grouped = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let sign = if cents < 100_000 || rng.random_bool(0.5) { currency } else { "" };
    format!("{sign}{grouped}.{:02}", cents % 100)
}

fn fmt_date(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn fmt_alt_date(d: NaiveDate) -> String {
    d.format("%d/%m/%Y").to_string()
}

fn fmt_ts(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn invoice_id(index: usize) -> String {
    format!("INV{:07}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("crmcube-sample-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SMALL: SampleConfig = SampleConfig { customers: 200, years: 2, seed: 7 };

    fn records(bytes: &[u8]) -> Vec<csv::StringRecord> {
        csv::ReaderBuilder::new().flexible(true).from_reader(bytes).records().map(|r| r.unwrap()).collect()
    }

    #[test]
    fn same_seed_gives_identical_bytes() {
        let (a, b) = (TempDir::new("a"), TempDir::new("b"));
        let sa = generate(&SMALL, &a.0).unwrap();
        let sb = generate(&SMALL, &b.0).unwrap();
        assert_eq!(sa, sb);
        let names: BTreeSet<_> = std::fs::read_dir(&a.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 9, "8 data files and dirt.json");
        for name in names {
            assert_eq!(
                std::fs::read(a.0.join(&name)).unwrap(),
                std::fs::read(b.0.join(&name)).unwrap(),
                "{name:?} differs"
            );
        }
        let c = TempDir::new("c");
        generate(&SampleConfig { seed: 8, ..SMALL }, &c.0).unwrap();
        assert_ne!(std::fs::read(a.0.join("orders.csv")).unwrap(), std::fs::read(c.0.join("orders.csv")).unwrap());
    }

    #[test]
    fn customers_file_is_gbk() {
        let dir = TempDir::new("gbk");
        generate(&SMALL, &dir.0).unwrap();
        let bytes = std::fs::read(dir.0.join("customers.csv")).unwrap();
        assert!(std::str::from_utf8(&bytes).is_err(), "customers.csv must not be valid UTF-8");
        let text = encoding_rs::GBK.decode_without_bom_handling_and_without_replacement(&bytes).expect("valid GBK");
        assert!(
            text.starts_with(
                "customer_id,name,segment,region,province,city,credit_limit,email,signup_date,updated_at\n"
            )
        );
        assert!(text.contains('王') || text.contains('李') || text.contains('张'));
        assert!(!text.contains("&#"), "no HTML escapes from unmappable characters");
    }

    #[test]
    fn dirt_counts_match_the_files() {
        let dir = TempDir::new("dirt");
        let summary = generate(&SampleConfig { customers: 400, ..SMALL }, &dir.0).unwrap();
        let on_disk: SampleSummary = serde_json::from_slice(&std::fs::read(dir.0.join("dirt.json")).unwrap()).unwrap();
        assert_eq!(summary, on_disk);
        let kind = |file: &str, k: &str| summary.files[file].dirt[k];

        // Negative quantities in order_lines.csv.
        let lines = records(&std::fs::read(dir.0.join("order_lines.csv")).unwrap());
        assert_eq!(lines.len() as u64, summary.files["order_lines.csv"].rows);
        let negative =
            lines.iter().filter(|r| r.get(3).and_then(|q| q.parse::<i64>().ok()).is_some_and(|q| q < 0)).count();
        assert_eq!(negative as u64, kind("order_lines.csv", NEGATIVE_QUANTITY));

        // Extra rows for duplicated customer ids in customers.csv.
        let bytes = std::fs::read(dir.0.join("customers.csv")).unwrap();
        let (text, _) = encoding_rs::GBK.decode_without_bom_handling(&bytes);
        let customers = records(text.as_bytes());
        let ids: BTreeSet<&str> = customers.iter().map(|r| &r[0]).collect();
        assert_eq!(ids.len(), 400);
        let extra = (customers.len() - ids.len()) as u64;
        assert_eq!(
            extra,
            kind("customers.csv", DUPLICATE_LATER) + kind("customers.csv", DUPLICATE_EQUAL_TS) + kind("customers.csv", UNPARSEABLE)
        );
        assert!(extra > 0);

        // Lines of interactions.jsonl that are not JSON.
        let jsonl = std::fs::read_to_string(dir.0.join("interactions.jsonl")).unwrap();
        let broken = jsonl.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err()).count();
        assert_eq!(broken as u64, kind("interactions.jsonl", UNPARSEABLE));

        // No invoice for cancelled/orphan/unparseable orders: at most one per order.
        let invoices = records(&std::fs::read(dir.0.join("invoices.csv")).unwrap());
        let orders = summary.files["orders.csv"].rows;
        assert!((invoices.len() as u64) < orders);
    }

    /// The activity streams a month at a time; the files must still read as one export: in date
    /// order, numbered without gaps, and each invoice the sum of its order's loadable lines.
    #[test]
    fn streamed_activity_is_ordered_and_invoices_add_up() {
        let dir = TempDir::new("stream");
        generate(&SampleConfig { customers: 500, years: 2, seed: 9 }, &dir.0).unwrap();
        let read = |name: &str| records(&std::fs::read(dir.0.join(name)).unwrap());
        let date = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok();
        let any_date = |s: &str| date(s).or_else(|| NaiveDate::parse_from_str(s, "%d/%m/%Y").ok());
        let cents = |s: &str| -> Option<i64> {
            let (yuan, fen) = s.trim_start_matches(['¥', '￥']).replace(',', "").split_once('.').map(|(a, b)| (a.to_string(), b.to_string()))?;
            Some(yuan.parse::<i64>().ok()? * 100 + fen.parse::<i64>().ok()?)
        };
        let in_order = |dates: Vec<NaiveDate>, what: &str| {
            assert!(dates.len() > 100, "{what}: {} dated rows", dates.len());
            assert!(dates.windows(2).all(|w| w[0] <= w[1]), "{what} out of date order");
        };
        let numbered = |rows: &[csv::StringRecord], prefix: &str| {
            for (i, r) in rows.iter().enumerate() {
                assert_eq!(&r[0], format!("{prefix}{:07}", i + 1), "row {} of {prefix}", i + 1);
            }
        };

        let orders = read("orders.csv");
        numbered(&orders, "O");
        in_order(orders.iter().filter_map(|r| r.get(4).and_then(date)).collect(), "orders");
        let completed: BTreeSet<&str> = orders.iter().filter(|r| r.get(5) == Some("completed")).map(|r| &r[0]).collect();

        // Σ qty·price·(100 − discount) over the lines that load, per order, in 1/100 cent.
        let mut hundredths: BTreeMap<String, i64> = BTreeMap::new();
        for l in read("order_lines.csv") {
            if l.len() < 6 || l[2].starts_with("P9") {
                continue;
            }
            let (Ok(qty), Some(price), Ok(discount)) = (l[3].parse::<i64>(), cents(&l[4]), l[5].parse::<i64>()) else { continue };
            if qty > 0 {
                *hundredths.entry(l[0].to_string()).or_default() += qty * price * (100 - discount);
            }
        }
        let invoices = read("invoices.csv");
        let mut checked = 0;
        let mut invoice_dates = BTreeMap::new();
        for (i, inv) in invoices.iter().enumerate() {
            assert_eq!(&inv[0], invoice_id(i));
            assert!(completed.contains(&inv[1]), "{} invoices {}, not a completed order", &inv[0], &inv[1]);
            invoice_dates.insert(inv[0].to_string(), any_date(&inv[3]).unwrap());
            if let Some(amount) = cents(&inv[5]) {
                assert_eq!(amount, (hundredths.get(&inv[1]).copied().unwrap_or(0) + 50) / 100, "{}", &inv[0]);
                checked += 1;
            }
        }
        assert!(checked > 1000, "{checked} invoices checked");

        let payments = read("payments.csv");
        numbered(&payments, "PAY");
        in_order(payments.iter().filter_map(|r| r.get(2).and_then(date)).collect(), "payments");
        let last = NaiveDate::from_ymd_opt(2026, 10, 31).unwrap();
        for p in &payments {
            let (Some(paid), Some(invoiced)) = (any_date(&p[2]), invoice_dates.get(&p[1])) else { continue };
            assert!(*invoiced < paid && paid <= last, "{} paid {paid}, invoiced {invoiced}", &p[0]);
        }

        let jsonl = std::fs::read_to_string(dir.0.join("interactions.jsonl")).unwrap();
        let queued: Vec<NaiveDate> = jsonl
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["ended_at"] != "2026-10-31 23:59:59") // clipped to the period: moved earlier
            .map(|v| date(&v["queued_at"].as_str().unwrap()[..10]).unwrap())
            .collect();
        in_order(queued, "interactions");
    }

    #[test]
    fn revenue_is_skewed_and_payments_stay_in_period() {
        let dir = TempDir::new("shape");
        generate(&SampleConfig { customers: 1000, years: 3, seed: 3 }, &dir.0).unwrap();
        let invoices = records(&std::fs::read(dir.0.join("invoices.csv")).unwrap());
        let mut revenue: BTreeMap<String, f64> = BTreeMap::new();
        for r in &invoices {
            if let Ok(a) = r[5].trim_start_matches('¥').replace(',', "").parse::<f64>() {
                *revenue.entry(r[2].to_string()).or_default() += a;
            }
        }
        let mut values: Vec<f64> = revenue.into_values().collect();
        values.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = values.iter().sum();
        let top: f64 = values.iter().take(100).sum(); // top 10% of 1,000 customers
        assert!(top / total > 0.5, "top 10% share {}", top / total);

        let payments = records(&std::fs::read(dir.0.join("payments.csv")).unwrap());
        let last = NaiveDate::from_ymd_opt(2026, 10, 31).unwrap();
        for r in &payments {
            if let Ok(d) = NaiveDate::parse_from_str(&r[2], "%Y-%m-%d") {
                assert!(d <= last);
            }
        }
    }
}
